//! A small fleet on one test network, for the end-to-end tests and the demo: a repository
//! on the test machine (edited with the real `keepup` binary), a `repo` host that serves it
//! with `keepup serve --state` (the directory is bind-mounted read-only, so it sees every
//! change at once), and agent hosts that install keepup-agent from its own package, follow a
//! track and report to the server with their own token. With [`FleetTls`] the server speaks
//! HTTPS with a certificate from a test CA ([`TestCa`], made with the openssl CLI) and the
//! agents use `https://` URLs with that CA as their `ca_file`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keepup_packager::plan::Format;

use crate::agent_pkg::agent_package;
use crate::example::{build_example_signed, built_bin};
use crate::host::{Host, TestNet};

/// Port `keepup serve` listens on in the `repo` host.
pub const SERVE_PORT: u16 = 8080;

/// Where the `repo` host sees the repository.
const REMOTE_REPO: &str = "/srv/repo";
/// The server's state database in the `repo` host.
const REMOTE_STATE: &str = "/var/lib/keepup/fleet.db";
/// The server's TLS certificate chain, key and CA in the `repo` host (with [`FleetTls`]).
pub const REMOTE_TLS_CERT: &str = "/etc/keepup/tls/server.pem";
/// See [`REMOTE_TLS_CERT`].
pub const REMOTE_TLS_KEY: &str = "/etc/keepup/tls/server.key";
/// See [`REMOTE_TLS_CERT`]: the CA the agents (and the checks on the server) trust.
pub const REMOTE_TLS_CA: &str = "/etc/keepup/ca.pem";

/// A private CA on the test machine, made with the openssl CLI (EC P-256).
#[derive(Debug, Clone)]
pub struct TestCa {
    /// The CA certificate (PEM): what a client trusts.
    pub cert: PathBuf,
    /// The CA's private key (PEM).
    pub key: PathBuf,
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .context("running openssl (apt-get install openssl)")?;
    ensure!(
        out.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl TestCa {
    /// A new CA called `name`, its files `dir/<name>.pem` and `dir/<name>.key`.
    pub fn new(dir: &Path, name: &str) -> Result<TestCa> {
        std::fs::create_dir_all(dir)?;
        let ca = TestCa {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            path_str(&ca.key)?,
            "-out",
            path_str(&ca.cert)?,
        ])?;
        Ok(ca)
    }

    /// A server certificate for DNS name `host` (and 127.0.0.1) signed by this CA: returns
    /// (`dir/<stem>.pem`, `dir/<stem>.key`). The key is PKCS#8.
    pub fn issue(&self, dir: &Path, stem: &str, host: &str) -> Result<(PathBuf, PathBuf)> {
        let (cert, key, csr, ext) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
            dir.join(format!("{stem}.csr")),
            dir.join(format!("{stem}.ext")),
        );
        std::fs::write(
            &ext,
            format!(
                "subjectAltName=DNS:{host},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n\
                 basicConstraints=CA:FALSE\n"
            ),
        )?;
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={host}"),
            "-keyout",
            path_str(&key)?,
            "-out",
            path_str(&csr)?,
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            path_str(&csr)?,
            "-CA",
            path_str(&self.cert)?,
            "-CAkey",
            path_str(&self.key)?,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            path_str(&ext)?,
            "-out",
            path_str(&cert)?,
        ])?;
        Ok((cert, key))
    }
}

/// HTTPS for the fleet's server: its certificate and key, and the CA the agents trust.
#[derive(Debug, Clone)]
pub struct FleetTls {
    /// The CA certificate the agents get as `ca_file`.
    pub ca: PathBuf,
    /// The server's certificate chain (PEM), valid for the name `repo`.
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
}

impl FleetTls {
    /// A CA (`ca`) and a server certificate for `repo` from it, under `dir`.
    pub fn generate(dir: &Path) -> Result<FleetTls> {
        let ca = TestCa::new(dir, "fleet-ca")?;
        let (cert, key) = ca.issue(dir, "repo", "repo")?;
        Ok(FleetTls {
            ca: ca.cert,
            cert,
            key,
        })
    }
}

/// Runs the local `keepup` binary with `args`; returns (success, stdout, stderr).
pub fn keepup_output(args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(built_bin("keepup")?)
        .args(args)
        .output()
        .context("running keepup")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs the local `keepup` binary with `args`; returns stdout, or an error with all output.
pub fn keepup(args: &[&str]) -> Result<String> {
    let (ok, out, err) = keepup_output(args)?;
    ensure!(ok, "keepup {} failed:\n{out}{err}", args.join(" "));
    Ok(out)
}

/// Timers of the agents' updaters (short ones in tests).
#[derive(Debug, Clone)]
pub struct Timers {
    /// Crontab schedule of update passes (6 fields: with seconds).
    pub schedule: String,
    /// Stagger window.
    pub stagger: Duration,
    /// Bound on one package-manager run.
    pub package_timeout: Duration,
    /// How often agents report besides after each pass.
    pub report_every: Duration,
}

impl Default for Timers {
    fn default() -> Timers {
        Timers {
            schedule: "*/15 * * * * *".into(),
            stagger: Duration::from_secs(10),
            package_timeout: Duration::from_secs(60),
            report_every: Duration::from_secs(5),
        }
    }
}

/// One agent host to start: its name and package format.
#[derive(Debug, Clone, Copy)]
pub struct HostSpec<'a> {
    /// Host name (a DNS label).
    pub name: &'a str,
    /// deb (dpkg) or rpm (Debian's rpm with its own database).
    pub format: Format,
}

impl<'a> HostSpec<'a> {
    /// A dpkg host.
    pub fn deb(name: &'a str) -> HostSpec<'a> {
        HostSpec {
            name,
            format: Format::Deb,
        }
    }

    /// An rpm host.
    pub fn rpm(name: &'a str) -> HostSpec<'a> {
        HostSpec {
            name,
            format: Format::Rpm,
        }
    }
}

/// A host running keepup-agent from its package.
pub struct AgentHost {
    /// The container.
    pub host: Host,
    /// Its package format.
    pub format: Format,
}

impl AgentHost {
    /// The host name.
    pub fn name(&self) -> &str {
        self.host.name()
    }

    /// The fully installed version of package `name`, if any (half-installed is `None`).
    pub async fn installed(&self, name: &str) -> Result<Option<String>> {
        let script = match self.format {
            Format::Deb => format!(
                "dpkg-query -W -f='${{Status}}|${{Version}}' {name} 2>/dev/null | sed -n 's/^install ok installed|//p'"
            ),
            Format::Rpm => format!(
                "rpm -q --qf '%{{EPOCH}}:%{{VERSION}}-%{{RELEASE}}' {name} 2>/dev/null | sed 's/^(none)://' | grep -v 'not installed' || true"
            ),
        };
        let out = self.host.ok(&script).await?;
        let v = out.trim();
        Ok((!v.is_empty()).then(|| v.to_string()))
    }

    /// Starts the agent in the background (its output to /var/log/keepup-agent.out).
    pub async fn start_agent(&self) -> Result<()> {
        self.host
            .ok("setsid /usr/sbin/keepup-agent run >>/var/log/keepup-agent.out 2>&1 </dev/null &")
            .await?;
        let name = self.name().to_string();
        wait_for(
            &format!("keepup-agent on {name} to answer"),
            Duration::from_secs(30),
            || async { Ok(self.host.exec("keepup-agent status").await?.code == 0) },
        )
        .await
    }

    /// SIGKILLs the agent (services it started keep running; it finds them on restart).
    pub async fn kill_agent(&self) -> Result<()> {
        self.host.ok("pkill -KILL -x keepup-agent || true").await?;
        Ok(())
    }

    /// The agent's own output so far (for failure messages).
    pub async fn agent_log(&self) -> Result<String> {
        self.host
            .ok("tail -n 60 /var/log/keepup-agent.out 2>/dev/null || true")
            .await
    }
}

/// The fleet: repository, server host and agent hosts on one test network.
pub struct Fleet {
    /// The repository directory on the test machine.
    pub repo: PathBuf,
    /// The host running `keepup serve` (network name `repo`).
    pub server: Host,
    /// The agent hosts, in the order given.
    pub hosts: Vec<AgentHost>,
    /// HTTPS on the server, when the fleet was started with it.
    pub tls: Option<FleetTls>,
    /// The network (last: dropped after the hosts).
    pub net: TestNet,
}

impl Fleet {
    /// Creates a repository in `dir/repo` (its own new key), starts the server and one agent
    /// host per spec with `timers`. No host is assigned a track yet.
    pub async fn start(dir: &Path, hosts: &[HostSpec<'_>], timers: &Timers) -> Result<Fleet> {
        Fleet::start_with_tls(dir, hosts, timers, None).await
    }

    /// Like [`Fleet::start`]; with `tls`, the server serves HTTPS and the agents use
    /// `https://repo:8080/` with the fleet's CA as `ca_file`.
    pub async fn start_with_tls(
        dir: &Path,
        hosts: &[HostSpec<'_>],
        timers: &Timers,
        tls: Option<FleetTls>,
    ) -> Result<Fleet> {
        let repo = dir.join("repo");
        keepup(&[
            "repo",
            "init",
            path_str(&repo)?,
            "--key-dir",
            path_str(&dir.join("repo-keys"))?,
        ])?;
        let net = TestNet::new()?;
        // Writable: the rollout gate signs each track's progress into the repository.
        let server = Host::start_with_writable(&net, "repo", &[(&repo, REMOTE_REPO)]).await?;
        server
            .copy_in(&built_bin("keepup")?, "/usr/local/bin/keepup")
            .await?;
        let mut tls_args = String::new();
        if let Some(t) = &tls {
            server.copy_in(&t.cert, REMOTE_TLS_CERT).await?;
            server.copy_in(&t.key, REMOTE_TLS_KEY).await?;
            server.copy_in(&t.ca, REMOTE_TLS_CA).await?;
            tls_args = format!(" --tls-cert {REMOTE_TLS_CERT} --tls-key {REMOTE_TLS_KEY}");
        }
        server
            .ok(&format!(
                "mkdir -p /var/lib/keepup && setsid keepup serve --repo {REMOTE_REPO} \
                 --state {REMOTE_STATE} --listen 0.0.0.0:{SERVE_PORT}{tls_args} \
                 >>/var/log/keepup-serve.out 2>&1 </dev/null &"
            ))
            .await?;
        let mut fleet = Fleet {
            repo,
            server,
            hosts: Vec::new(),
            tls,
            net,
        };
        let answers = wait_for(
            "keepup serve to answer",
            Duration::from_secs(30),
            || async { Ok(fleet.server_get("/fleet.yaml").await.is_ok()) },
        )
        .await;
        fleet.explain(answers).await?;
        for spec in hosts {
            let host = fleet.add_host(dir, spec, timers).await?;
            fleet.hosts.push(host);
        }
        Ok(fleet)
    }

    /// Starts one more agent host: installs the agent package, writes its configuration, key
    /// and token, and starts the agent.
    pub async fn add_host(
        &self,
        dir: &Path,
        spec: &HostSpec<'_>,
        timers: &Timers,
    ) -> Result<AgentHost> {
        let ca = self.tls.as_ref().map(|t| t.ca.clone());
        self.add_host_trusting(dir, spec, timers, ca.as_deref())
            .await
    }

    /// Like [`Fleet::add_host`], with `ca` as the agent's `ca_file` (on a TLS fleet: a CA
    /// other than the fleet's makes the agent refuse the server).
    pub async fn add_host_trusting(
        &self,
        dir: &Path,
        spec: &HostSpec<'_>,
        timers: &Timers,
        ca: Option<&Path>,
    ) -> Result<AgentHost> {
        let host = Host::start(&self.net, spec.name).await?;
        let pkg = tokio::task::spawn_blocking({
            let (dir, format) = (dir.to_path_buf(), spec.format);
            move || agent_package(&dir.join("agent-pkg"), format)
        })
        .await?;
        let remote_pkg = format!("/tmp/{}", pkg.file_name().unwrap().to_string_lossy());
        host.copy_in(&pkg, &remote_pkg).await?;
        match spec.format {
            Format::Deb => host.ok(&format!("dpkg -i {remote_pkg} >/dev/null")).await?,
            Format::Rpm => {
                host.ok(&format!("rpm --initdb && rpm -i {remote_pkg}"))
                    .await?
            }
        };
        let token = self.host_token(spec.name).await?;
        host.copy_in(
            &self.repo.join("keys/repository.asc"),
            "/etc/keepup/repo.asc",
        )
        .await?;
        let format = match spec.format {
            Format::Deb => "deb",
            Format::Rpm => "rpm",
        };
        // Plain http over the test network is the fleet's default: allowed explicitly.
        let transport = match ca {
            Some(ca) => {
                host.copy_in(ca, REMOTE_TLS_CA).await?;
                format!("ca_file: {REMOTE_TLS_CA}\n")
            }
            None => "allow_plain_http: true\n".to_string(),
        };
        let scheme = self.scheme();
        let config = format!(
            "repo: {scheme}://repo:{SERVE_PORT}/\n\
             trusted_key: /etc/keepup/repo.asc\n\
             schedule: \"{}\"\n\
             stagger: {}ms\n\
             package_timeout: {}ms\n\
             package_format: {format}\n\
             report: {scheme}://repo:{SERVE_PORT}/\n\
             report_token_file: /etc/keepup/token\n\
             report_every: {}ms\n\
             {transport}",
            timers.schedule,
            timers.stagger.as_millis(),
            timers.package_timeout.as_millis(),
            timers.report_every.as_millis(),
        );
        host.ok(&format!(
            "printf '%s' '{token}' >/etc/keepup/token && chmod 600 /etc/keepup/token && \
             cat >/etc/keepup/agent.yaml <<'EOF'\n{config}EOF"
        ))
        .await?;
        let agent = AgentHost {
            host,
            format: spec.format,
        };
        agent.start_agent().await?;
        Ok(agent)
    }

    /// `https` on a TLS fleet, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// GETs `path` from the server, on the server host (curl; on a TLS fleet with the
    /// fleet's CA and the name `repo`); returns the body, or an error with curl's.
    pub async fn server_get(&self, path: &str) -> Result<String> {
        let tls = if self.tls.is_some() {
            format!("--cacert {REMOTE_TLS_CA} --resolve repo:{SERVE_PORT}:127.0.0.1 ")
        } else {
            String::new()
        };
        let host = if self.tls.is_some() {
            "repo"
        } else {
            "127.0.0.1"
        };
        self.server
            .ok(&format!(
                "curl -fsS {tls}{}://{host}:{SERVE_PORT}{path}",
                self.scheme()
            ))
            .await
    }

    /// Issues a report token for `host` on the server.
    pub async fn host_token(&self, host: &str) -> Result<String> {
        let out = self
            .server
            .ok(&format!("keepup host add {host} --state {REMOTE_STATE}"))
            .await?;
        let token = out.trim().to_string();
        ensure!(
            !token.is_empty() && !token.contains(char::is_whitespace),
            "keepup host add printed no token: {out:?}"
        );
        Ok(token)
    }

    /// The agent host called `name`.
    pub fn host(&self, name: &str) -> &AgentHost {
        self.hosts
            .iter()
            .find(|h| h.name() == name)
            .unwrap_or_else(|| panic!("no host {name} in the fleet"))
    }

    /// Runs `keepup` on the test machine with `--repo <repo>` appended.
    pub fn op(&self, args: &[&str]) -> Result<String> {
        let mut all = args.to_vec();
        all.extend(["--repo", path_str(&self.repo)?]);
        keepup(&all)
    }

    /// Builds the example service `foo` at `version` (spec rewritten by `edit`) into
    /// `dir/build-<version>`, the .rpm signed with the repository key, and publishes both
    /// packages into unstable. Returns what `keepup publish` printed.
    pub fn publish_example(
        &self,
        dir: &Path,
        version: &str,
        edit: impl Fn(String) -> String,
    ) -> Result<String> {
        let key = crate::testkit::key_in(&self.repo.with_file_name("repo-keys"))?;
        let out = dir.join(format!("build-{version}"));
        let files = build_example_signed(&out, version, Some(&key), edit)?;
        let names: Vec<String> = files
            .iter()
            .map(|f| f.to_string_lossy().into_owned())
            .collect();
        let mut args = vec!["publish"];
        args.extend(names.iter().map(String::as_str));
        self.op(&args)
    }

    /// `keepup report ARGS` run on the server host against the local server (on a TLS
    /// fleet, over HTTPS, trusting the fleet's CA).
    pub async fn report(&self, args: &str) -> Result<String> {
        let server = match &self.tls {
            Some(_) => format!("https://127.0.0.1:{SERVE_PORT} --ca-file {REMOTE_TLS_CA}"),
            None => format!("http://127.0.0.1:{SERVE_PORT}"),
        };
        self.server
            .ok(&format!("keepup report --server {server} {args}"))
            .await
    }

    /// The fleet view as JSON (`keepup report --json`).
    pub async fn report_json(&self) -> Result<serde_json::Value> {
        let out = self.report("--json").await?;
        serde_json::from_str(&out).with_context(|| format!("keepup report --json printed {out}"))
    }

    /// `r`, with every agent's and the server's log attached when it is an error.
    pub async fn explain<T>(&self, r: Result<T>) -> Result<T> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => Err(e.context(self.logs().await)),
        }
    }

    /// Logs of every agent and the server, for failure messages.
    pub async fn logs(&self) -> String {
        let mut all = String::new();
        for h in &self.hosts {
            let log = h.agent_log().await.unwrap_or_else(|e| e.to_string());
            all.push_str(&format!("--- agent on {}:\n{log}\n", h.name()));
        }
        let serve = self
            .server
            .ok("tail -n 30 /var/log/keepup-serve.out")
            .await
            .unwrap_or_else(|e| e.to_string());
        all.push_str(&format!("--- keepup serve:\n{serve}\n"));
        all
    }
}

/// Waits until every host in `hosts` has foo `version` fully installed and running (the
/// agent says so); on timeout, the error carries every agent's and the server's log.
pub async fn converge(
    fleet: &Fleet,
    hosts: &[&str],
    version: &str,
    within: Duration,
) -> Result<()> {
    for name in hosts {
        let h = fleet.host(name);
        let res = wait_for(&format!("{name} to run foo {version}"), within, || async {
            Ok(h.installed("foo").await?.as_deref() == Some(version)
                && h.host
                    .exec("keepup-agent status | grep -q '^foo .*running'")
                    .await?
                    .code
                    == 0)
        })
        .await;
        fleet.explain(res).await?;
    }
    Ok(())
}

/// Polls `check` every 500 ms until it returns true; fails after `within` naming `what`.
pub async fn wait_for<F, Fut>(what: &str, within: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    loop {
        if check().await? {
            return Ok(());
        }
        if start.elapsed() >= within {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// This host's stagger offset: the first 8 bytes of SHA-256(host name) as a fraction of the
/// window (the agent's documented formula, so a test can check when a host acted).
pub fn stagger_offset(host: &str, window: Duration) -> Duration {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(host.as_bytes());
    let fraction = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    let ms = ((fraction as u128 * window.as_millis()) >> 64) as u64;
    Duration::from_millis(ms)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// The fleet view's entry for `host` (from `keepup report --json`).
pub fn host_view<'a>(report: &'a serde_json::Value, host: &str) -> Option<&'a serde_json::Value> {
    report["hosts"]
        .as_array()?
        .iter()
        .find(|h| h["host"] == host)
}

/// The fleet view's row for `host` x `service`.
pub fn service_view<'a>(
    report: &'a serde_json::Value,
    host: &str,
    service: &str,
) -> Option<&'a serde_json::Value> {
    host_view(report, host)?["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == service)
}

/// A boolean field of the fleet view (absent means false: the JSON leaves out defaults).
fn flag(v: &serde_json::Value) -> bool {
    v.as_bool().unwrap_or(false)
}

/// Has every host in `hosts` reported recently, with `service` current (or rolled back),
/// healthy and its last update pass successful?
pub fn converged(report: &serde_json::Value, hosts: &[&str], service: &str) -> bool {
    hosts.iter().all(|h| {
        let Some(view) = host_view(report, h) else {
            return false;
        };
        let update_ok = view["update"]["ok"] == true;
        let svc_ok = service_view(report, h, service).is_some_and(|s| {
            (s["status"] == "current" || s["status"] == "rolled back")
                && !flag(&s["unhealthy"])
                && s["state"] == "running"
        });
        !flag(&view["stale"]) && update_ok && svc_ok
    })
}
