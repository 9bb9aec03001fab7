//! A Debian host container with keepup-agent started by the test (`docker exec`), and the
//! example service `foo` as a package: what the agent tests and the runit and supervisord
//! tests share. The agent is the parent (and child subreaper) of what it supervises; the
//! containers' PID 1 is `sleep`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::example;
use crate::host::{Host, TestNet};
use crate::testkit::quick;

/// Live (non-zombie) processes of the role: `pid stat args`.
pub const ROLE_PROCS: &str = "ps -u foo -o pid=,stat=,args= | awk '$2 !~ /^Z/'";
/// Where the tests put the agent's own output.
pub const AGENT_OUT: &str = "/var/log/keepup-agent.out";
/// Where the tests put the exit status of the last `keepup-agent run`.
pub const AGENT_RC: &str = "/var/log/keepup-agent.rc";
/// The agent lock (in the default state directory).
pub const LOCK: &str = "/var/lib/keepup-agent/agent.lock";

/// A host with the agent binary and the example's .deb copied in (not yet installed).
pub struct Setup {
    /// The host.
    pub host: Host,
    _net: TestNet,
    dir: tempfile::TempDir,
}

impl Setup {
    /// A scratch directory on the test machine, removed with the setup.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// Builds the example with `edit`, starts a host, copies the .deb (to /pkgs/foo.deb) and the
/// agent (to /usr/sbin/keepup-agent) in, and writes the agent config `config`.
pub async fn setup(name: &str, edit: impl Fn(String) -> String, config: &str) -> Result<Setup> {
    let dir = tempfile::tempdir()?;
    let files = example::build_example(dir.path(), "1.0.0", |t| edit(quick(t)))?;
    let deb: PathBuf = files
        .into_iter()
        .find(|f| f.extension().is_some_and(|e| e == "deb"))
        .context("no .deb built")?;
    let net = TestNet::new()?;
    let host = Host::start(&net, name).await?;
    host.copy_in(&deb, "/pkgs/foo.deb").await?;
    host.copy_in(
        &example::built_bin("keepup-agent")?,
        "/usr/sbin/keepup-agent",
    )
    .await?;
    // Reports are sent by keepup-agent-pass, installed beside it.
    host.copy_in(
        &example::built_bin("keepup-agent-pass")?,
        "/usr/sbin/keepup-agent-pass",
    )
    .await?;
    host.ok(&format!(
        "mkdir -p /etc/keepup && cat > /etc/keepup/agent.yaml <<'EOF'\n{config}\nEOF"
    ))
    .await?;
    Ok(Setup {
        host,
        _net: net,
        dir,
    })
}

/// Starts `keepup-agent run` in the background (its exit status goes to [`AGENT_RC`]) and
/// waits until its socket answers.
pub async fn start_agent(host: &Host) -> Result<()> {
    host.ok(&format!(
        "rm -f {AGENT_RC}; setsid sh -c 'keepup-agent run; echo $? >{AGENT_RC}' >>{AGENT_OUT} 2>&1 </dev/null &"
    ))
    .await?;
    let start = Instant::now();
    loop {
        if host.exec("keepup-agent status").await?.code == 0 {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!(
                "keepup-agent never answered:\n{}",
                host.ok(&format!("cat {AGENT_OUT}; ps -ef")).await?
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The agent's pid (the `keepup-agent run` process), if running.
pub async fn agent_pid(host: &Host) -> Result<Option<u32>> {
    let out = host
        .exec("ps -eo pid=,stat=,args= | awk '$2 !~ /^Z/ && $3 ~ /keepup-agent$/ && $4 == \"run\" {print $1}'")
        .await?;
    Ok(out
        .stdout
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok()))
}

/// One line of `keepup-agent status` for a service.
#[derive(Debug, Clone)]
pub struct Svc {
    /// The state column.
    pub state: String,
    /// The restarts column.
    pub restarts: u64,
    /// The line and the lines under it.
    pub text: String,
}

/// The service's status line (and the lines under it), or None if the agent does not list it.
pub async fn status(host: &Host, name: &str) -> Result<Option<Svc>> {
    let out = host.ok("keepup-agent status").await?;
    let mut lines = out
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{name} ")));
    let Some(first) = lines.next() else {
        return Ok(None);
    };
    let cols: Vec<&str> = first.split_whitespace().collect();
    let mut text = first.to_string();
    for l in lines.take_while(|l| l.starts_with("    ")) {
        text.push('\n');
        text.push_str(l);
    }
    Ok(Some(Svc {
        state: cols[1].to_string(),
        restarts: cols[3].parse()?,
        text,
    }))
}

/// Polls the status until `ok` holds, or fails after `within` with the agent's view and log.
pub async fn wait_status(
    host: &Host,
    what: &str,
    within: Duration,
    ok: impl Fn(&Option<Svc>) -> bool,
) -> Result<Option<Svc>> {
    let start = Instant::now();
    loop {
        let s = status(host, "foo").await?;
        if ok(&s) {
            return Ok(s);
        }
        if start.elapsed() > within {
            bail!(
                "after {within:?}, still waiting for {what}; last status: {s:?}\n--- foo.log:\n{}",
                host.exec(
                    "tail -n 40 /var/log/keepup/foo.log; echo; cat /var/log/keepup-agent.out"
                )
                .await?
                .stdout
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until food answers its banner; returns the daemon's pid.
pub async fn wait_banner(host: &Host, within: Duration) -> Result<u32> {
    Ok(wait_banner_from(host, within, None).await?.0)
}

/// Waits until a food other than `not` (if given) answers its banner; returns its pid and when
/// the answering attempt began (so the time `nc` itself took is not counted).
pub async fn wait_banner_from(
    host: &Host,
    within: Duration,
    not: Option<u32>,
) -> Result<(u32, Instant)> {
    let start = Instant::now();
    loop {
        let attempt = Instant::now();
        let banner = host.exec("nc -w 2 127.0.0.1 7070 </dev/null").await?.stdout;
        if banner.contains("ready") {
            let pid = host
                .ok("ps -u foo -o pid=,stat=,comm= | awk '$2 !~ /^Z/ && $3 == \"food\" {print $1}'")
                .await?;
            let pids: Vec<u32> = pid
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
            if let Some(&p) = pids.first() {
                if pids.len() == 1 && Some(p) != not {
                    return Ok((p, attempt));
                }
            }
        }
        if start.elapsed() > within {
            bail!(
                "food never answered its banner within {within:?}:\n{}",
                host.exec("tail -n 40 /var/log/keepup/foo.log; ps -ef")
                    .await?
                    .stdout
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `script` until it prints nothing, or fails after `within` showing foo's log.
pub async fn until_empty(host: &Host, script: &str, within: Duration) -> Result<()> {
    if let Err(e) = host.until_empty(script, within).await {
        let log = host
            .exec("tail -n 30 /var/log/keepup/foo.log")
            .await?
            .stdout;
        bail!("{e:#}\n--- foo.log:\n{log}");
    }
    Ok(())
}
