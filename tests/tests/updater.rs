//! The agent's updater and reporter on real Debian 12 hosts. A `repo` host runs `keepup serve`
//! over a repository made with the real `keepup` binary (publish, promote, assign, quarantine,
//! rollback); agent hosts run the real `keepup-agent` (copied in) with the repository's key
//! pinned. Covered: each host installs its track's version in its stagger slot, quarantine
//! removes, rollback upgrades; tampered, wrongly signed and replayed policies, mixed snapshots
//! (an index from another publish than the policy that binds it) and a package whose sha256
//! does not match are refused with nothing installed; an agent polling through 200 promotes
//! sees no refusal; a hung postinst is killed
//! after `package_timeout` and the next pass repairs; an agent SIGKILLed mid-install (with its
//! package manager) recovers on restart; the RPM path (install, upgrade, quarantine) on a
//! Debian host with its own rpm database; an upgrade whose daemon fails its probes is "failed to
//! start" with the log tail, in `update --now` and in the report; reports stop and resume with
//! the server while the services keep running; a pass child killed mid-pass fails that pass
//! and nothing else.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use keepup_packager::plan::Format;
use keepup_tests::example::built_bin;
use keepup_tests::fleet::{stagger_offset, wait_for, AgentHost};
use keepup_tests::host::{docker_or_skip, Host, TestNet};
use keepup_tests::testkit::{keepup_pack_example, quick, shared_signing_key, with_flags};
use serde_json::Value;

/// The repository directory on the `repo` host.
const REPO: &str = "/srv/repo";
/// The agent's own output on agent hosts.
const AGENT_OUT: &str = "/var/log/keepup-agent.out";
/// The updater's pass marker (default state directory).
const MARKER: &str = "/var/lib/keepup-agent/update-in-progress";
/// A schedule that never fires during a test: passes only by `update --now`.
const YEARLY: &str = "0 0 1 1 *";
/// While this file exists, the "hanging" package's postinst waits.
const HANG_FILE: &str = "/etc/foo-hang";

/// At most two of these tests run at once (each starts two or three containers).
async fn slot() -> tokio::sync::SemaphorePermit<'static> {
    static SLOTS: OnceLock<tokio::sync::Semaphore> = OnceLock::new();
    SLOTS
        .get_or_init(|| tokio::sync::Semaphore::new(2))
        .acquire()
        .await
        .expect("never closed")
}

/// `r`, with `detail` (fetched only on failure: a log, the state seen last) added to its error.
async fn explained(r: Result<()>, detail: impl Future<Output = Result<String>>) -> Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(e) => Err(anyhow!("{e:#}:\n{}", detail.await?)),
    }
}

/// Packs the example service at `version` (quick timers, then `edit`) with `keepup pack`,
/// the .rpm signed with the repository key. Returns (deb, rpm).
fn pack(dir: &Path, version: &str, edit: impl Fn(String) -> String) -> Result<(PathBuf, PathBuf)> {
    let key = shared_signing_key()?;
    let spec_dir = dir.join(format!("spec-{version}"));
    keepup_pack_example(&spec_dir, version, Some(&key), |t| edit(quick(t)))
}

/// A copy of `deb` whose postinst waits while [`HANG_FILE`] exists (a maintainer script that
/// hangs, as far as the package manager can tell).
fn with_hanging_postinst(deb: &Path, out: &Path) -> Result<PathBuf> {
    let tree = out.with_extension("tree");
    let _ = std::fs::remove_dir_all(&tree);
    let run = |args: &[&str]| -> Result<()> {
        let st = Command::new(args[0]).args(&args[1..]).status()?;
        ensure!(st.success(), "{args:?} failed");
        Ok(())
    };
    run(&[
        "dpkg-deb",
        "-R",
        deb.to_str().unwrap(),
        tree.to_str().unwrap(),
    ])?;
    let postinst = tree.join("DEBIAN/postinst");
    let text = std::fs::read_to_string(&postinst)?;
    let (shebang, rest) = text.split_once('\n').context("empty postinst")?;
    std::fs::write(
        &postinst,
        format!("{shebang}\nwhile [ -e {HANG_FILE} ]; do sleep 1; done\n{rest}"),
    )?;
    run(&[
        "dpkg-deb",
        "--root-owner-group",
        "-b",
        tree.to_str().unwrap(),
        out.to_str().unwrap(),
    ])?;
    Ok(out.to_path_buf())
}

/// Starts the `repo` host: the repository (signed with [`shared_signing_key`]) at [`REPO`],
/// served on port 8080.
async fn repo_host(net: &TestNet) -> Result<Host> {
    let repo = Host::start(net, "repo").await?;
    repo.copy_in(&built_bin("keepup")?, "/usr/local/bin/keepup")
        .await?;
    repo.copy_in(&shared_signing_key()?, "/root/signing-key.asc")
        .await?;
    repo.ok(&format!(
        "keepup repo init {REPO} --key /root/signing-key.asc >/dev/null"
    ))
    .await?;
    start_serve(&repo).await?;
    Ok(repo)
}

/// Starts `keepup serve` on the repo host and waits until it answers.
async fn start_serve(repo: &Host) -> Result<()> {
    repo.ok(&format!(
        "setsid keepup serve --repo {REPO} --listen 0.0.0.0:8080 >>/tmp/serve.log 2>&1 </dev/null &"
    ))
    .await?;
    let answered = wait_for(
        "keepup serve to answer",
        Duration::from_secs(20),
        || async {
            let curl = "curl -fsS http://127.0.0.1:8080/keys/repository.asc >/dev/null";
            Ok(repo.exec(curl).await?.code == 0)
        },
    )
    .await;
    explained(answered, repo.ok("cat /tmp/serve.log")).await
}

/// Copies package files to the repo host and publishes them.
async fn publish(repo: &Host, files: &[&Path]) -> Result<()> {
    let mut remote = Vec::new();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy();
        let r = format!("/pkgs/{}-{name}", remote.len());
        repo.copy_in(f, &r).await?;
        remote.push(r);
    }
    repo.ok(&format!(
        "keepup publish --repo {REPO} {}",
        remote.join(" ")
    ))
    .await?;
    Ok(())
}

/// How foo 1.1.0, the upgrade, goes into the repository at the start of a test.
enum Upgrade {
    /// Published in both formats (not yet promoted).
    Published,
    /// Published in both formats, its daemon failing its health probe (`--fail-health`).
    FailsHealth,
    /// Not published: the test publishes [`Setup::upgrade`] itself.
    Unpublished,
    /// Only a .deb whose postinst hangs while [`HANG_FILE`] exists (see
    /// [`with_hanging_postinst`]).
    HangingDeb,
}

/// A test's repository: foo 1.0.0 (both formats) published and promoted to stable, foo 1.1.0
/// packed (and published as [`Upgrade`] says), served by the `repo` host on a test network.
struct Setup {
    /// The `repo` host.
    repo: Host,
    /// foo 1.1.0: (deb, rpm).
    upgrade: (PathBuf, PathBuf),
    net: TestNet,
    _tmp: tempfile::TempDir,
    _slot: tokio::sync::SemaphorePermit<'static>,
}

impl Setup {
    /// Waits for a slot and sets up, then runs `keepup assign` with each of `assign`; `None`
    /// when Docker tests are skipped.
    async fn start(upgrade: Upgrade, assign: &[&str]) -> Result<Option<Setup>> {
        if !docker_or_skip() {
            return Ok(None);
        }
        let slot = slot().await;
        let tmp = tempfile::tempdir()?;
        let (deb1, rpm1) = pack(tmp.path(), "1.0.0", |t| t)?;
        let (deb2, rpm2) = match upgrade {
            Upgrade::FailsHealth => {
                pack(tmp.path(), "1.1.0", |t| with_flags(t, &["--fail-health"]))?
            }
            _ => pack(tmp.path(), "1.1.0", |t| t)?,
        };
        let net = TestNet::new()?;
        let repo = repo_host(&net).await?;
        match upgrade {
            Upgrade::Published | Upgrade::FailsHealth => {
                publish(&repo, &[&deb1, &rpm1, &deb2, &rpm2]).await?
            }
            Upgrade::Unpublished => publish(&repo, &[&deb1, &rpm1]).await?,
            Upgrade::HangingDeb => {
                let hanging =
                    with_hanging_postinst(&deb2, &tmp.path().join("foo_1.1.0-1_amd64.deb"))?;
                publish(&repo, &[&deb1, &rpm1, &hanging]).await?
            }
        }
        let setup = Setup {
            repo,
            upgrade: (deb2, rpm2),
            net,
            _tmp: tmp,
            _slot: slot,
        };
        setup.promote_to_stable("1.0.0").await?;
        for a in assign {
            setup.keepup("assign", a).await?;
        }
        Ok(Some(setup))
    }

    /// Runs `keepup CMD --repo REPO ARGS` on the repo host.
    async fn keepup(&self, cmd: &str, args: &str) -> Result<String> {
        self.repo
            .ok(&format!("keepup {cmd} --repo {REPO} {args}"))
            .await
    }

    /// Promotes `version` of foo from unstable up to stable.
    async fn promote_to_stable(&self, version: &str) -> Result<()> {
        self.keepup("promote", &format!("foo {version} --to testing"))
            .await?;
        self.keepup("promote", &format!("foo {version} --to stable"))
            .await?;
        Ok(())
    }

    /// Starts an agent host (not its agent): the agent binary, the pinned key fetched from
    /// the repository, and `/etc/keepup/agent.yaml` with the updater keys plus `extra`; an
    /// rpm host gets its own rpm database.
    async fn agent_host(&self, name: &str, format: Format, extra: &str) -> Result<AgentHost> {
        let host = Host::start(&self.net, name).await?;
        host.copy_in(&built_bin("keepup-agent")?, "/usr/sbin/keepup-agent")
            .await?;
        host.copy_in(
            &built_bin("keepup-agent-pass")?,
            "/usr/sbin/keepup-agent-pass",
        )
        .await?;
        host.ok(&format!(
            "mkdir -p /etc/keepup && curl -fsS -o /etc/keepup/repository.asc \
             http://repo:8080/keys/repository.asc && cat > /etc/keepup/agent.yaml <<'EOF'\n\
             repo: http://repo:8080/\ntrusted_key: /etc/keepup/repository.asc\n\
             start_timeout: 8s\n{extra}\nEOF"
        ))
        .await?;
        if format == Format::Rpm {
            host.ok("rpm --initdb").await?;
        }
        Ok(AgentHost { host, format })
    }
}

/// Starts `keepup-agent run` in the background and waits until its socket answers.
async fn start_agent(agent: &AgentHost) -> Result<()> {
    let host = &agent.host;
    host.ok(&format!(
        "setsid sh -c 'keepup-agent run' >>{AGENT_OUT} 2>&1 </dev/null &"
    ))
    .await?;
    let answered = wait_for(
        "keepup-agent to answer",
        Duration::from_secs(20),
        || async { Ok(host.exec("keepup-agent status").await?.code == 0) },
    )
    .await;
    explained(answered, host.ok(&format!("cat {AGENT_OUT}"))).await
}

/// `keepup-agent update --now --json`: (exit code, the pass).
async fn update_now(agent: &AgentHost) -> Result<(i64, Value)> {
    let e = agent.host.exec("keepup-agent update --now --json").await?;
    let v: Value = serde_json::from_str(&e.stdout).with_context(|| {
        format!(
            "host {}: update --now printed no JSON (exit {}):\n{}\n{}",
            agent.name(),
            e.code,
            e.stdout,
            e.stderr
        )
    })?;
    Ok((e.code, v))
}

/// `update --now` that must succeed.
async fn update_ok(agent: &AgentHost) -> Result<Value> {
    let (code, v) = update_now(agent).await?;
    ensure!(
        code == 0 && v["ok"] == true,
        "host {}: pass failed: {v:#}",
        agent.name()
    );
    Ok(v)
}

/// dpkg's `Status|Version` of foo (empty if dpkg does not know it).
async fn dpkg_status(agent: &AgentHost) -> Result<String> {
    Ok(agent
        .host
        .exec("dpkg-query -W -f='${Status}|${Version}' foo 2>/dev/null")
        .await?
        .stdout)
}

/// Does `keepup-agent status --json` output `status` show foo at manifest `version`
/// (upstream, release optional) running, its probes passed?
fn foo_running(status: &str, version: &str) -> bool {
    let Ok(v) = serde_json::from_str::<Value>(status) else {
        return false;
    };
    let services = v["services"].as_array();
    let Some(svc) = services.and_then(|s| s.iter().find(|s| s["name"] == "foo")) else {
        return false;
    };
    let probes_ok = svc["probes"]
        .as_array()
        .is_some_and(|p| p.iter().all(|p| p["ok"] == true));
    // The manifest's version: `1.0.0` in the .deb, `1.0.0-1` in the .rpm.
    let v = svc["version"].as_str().unwrap_or_default();
    let same = v == version || v.strip_prefix(version).is_some_and(|r| r.starts_with('-'));
    same && svc["state"] == "running" && probes_ok
}

/// Waits until the agent supervises foo at manifest `version` (upstream, release optional),
/// running (probes passed).
async fn wait_running(agent: &AgentHost, version: &str, within: Duration) -> Result<()> {
    let status = || async {
        Ok::<_, anyhow::Error>(agent.host.exec("keepup-agent status --json").await?.stdout)
    };
    let running = wait_for(
        &format!("host {}: foo {version} running", agent.name()),
        within,
        || async { Ok(foo_running(&status().await?, version)) },
    )
    .await;
    let detail = async { Ok(format!("{}\n{}", status().await?, agent.agent_log().await?)) };
    explained(running, detail).await
}

#[tokio::test]
async fn hosts_follow_their_track_in_their_slot_quarantine_and_rollback() -> Result<()> {
    let assign = ["web1 --track stable", "web2 --track testing"];
    let Some(s) = Setup::start(Upgrade::Published, &assign).await? else {
        return Ok(());
    };
    s.keepup("promote", "foo 1.1.0 --to testing").await?;
    // Passes every 10 s plus an offset inside 8 s.
    let sched = "schedule: '*/10 * * * * *'\nstagger: 8s";
    let (web1, web2) = tokio::try_join!(
        s.agent_host("web1", Format::Deb, sched),
        s.agent_host("web2", Format::Deb, sched)
    )?;
    tokio::try_join!(start_agent(&web1), start_agent(&web2))?;
    tokio::try_join!(
        wait_running(&web1, "1.0.0", Duration::from_secs(60)),
        wait_running(&web2, "1.1.0", Duration::from_secs(60))
    )?;
    ensure!(web1.installed("foo").await?.as_deref() == Some("1.0.0-1"));
    ensure!(web2.installed("foo").await?.as_deref() == Some("1.1.0-1"));
    // Each host's first pass (the one that installed) ran in its slot: a multiple of 10 s
    // plus its offset (timers may be late by a little on a loaded machine).
    for h in [&web1, &web2] {
        let line = h
            .host
            .ok(&format!("grep -m1 'update: scheduled pass at' {AGENT_OUT}"))
            .await?;
        // `... scheduled pass at 2026-11-21T08:43:40.012Z`
        let time = line.trim().rsplit('T').next().context("pass time")?;
        let secs = time.trim_end_matches('Z').rsplit(':').next().unwrap();
        let (sec, ms) = secs.split_once('.').context("milliseconds")?;
        let at_ms = (sec.parse::<u64>()? % 10) * 1000 + ms.parse::<u64>()?;
        let off = stagger_offset(h.name(), Duration::from_secs(8)).as_millis() as u64;
        let late = (at_ms + 10_000 - off % 10_000) % 10_000;
        ensure!(
            late < 1500,
            "host {}: first pass at {time}, its slot is {off} ms after each 10 s: {line}",
            h.name()
        );
        let installed = h
            .host
            .ok("grep -m1 ' install foo' /var/log/dpkg.log")
            .await?;
        ensure!(!installed.is_empty());
    }

    // Quarantine on web1: the package goes, the service stops; web2 keeps it.
    s.keepup("quarantine", "foo --hosts web1").await?;
    let removed = wait_for("web1 to remove foo", Duration::from_secs(40), || async {
        let st = dpkg_status(&web1).await?;
        Ok(st.is_empty() || st.starts_with("deinstall ok config-files"))
    })
    .await;
    explained(removed, dpkg_status(&web1)).await?;
    web1.host
        .until_empty(
            "ps -u foo -o pid= 2>/dev/null || true",
            Duration::from_secs(15),
        )
        .await?;
    let status = web1.host.ok("keepup-agent status").await?;
    ensure!(!status.contains("foo "), "{status}");
    let v = update_ok(&web1).await?;
    ensure!(v["quarantined"][0] == "foo", "{v:#}");
    ensure!(v["plan"].as_array().unwrap().is_empty(), "{v:#}");

    // Rollback on testing: web2 upgrades to the rollback version (1.0.0's contents).
    s.keepup("rollback", "foo --to 1.0.0 --track testing")
        .await?;
    let taken = wait_for(
        "web2 to take the rollback",
        Duration::from_secs(40),
        || async { Ok(web2.installed("foo").await?.as_deref() == Some("1.1.0+rb1-1")) },
    )
    .await;
    explained(taken, dpkg_status(&web2)).await?;
    wait_running(&web2, "1.0.0", Duration::from_secs(30)).await?;
    // The human output through the running agent.
    let out = web2.host.ok("keepup-agent update --now").await?;
    ensure!(
        out.contains("host web2 follows track testing")
            && out.contains("keep foo 1.1.0+rb1-1 (current)")
            && out.trim_end().ends_with("update: ok"),
        "{out}"
    );
    let st = dpkg_status(&web1).await?;
    ensure!(st.is_empty() || st.starts_with("deinstall"), "{st}");
    Ok(())
}

#[tokio::test]
async fn tampered_wrongly_signed_replayed_and_corrupt_are_refused() -> Result<()> {
    let Some(s) = Setup::start(Upgrade::Unpublished, &["'*' --track stable"]).await? else {
        return Ok(());
    };
    let repo = &s.repo;
    // No agent runs: `update --now` runs the pass in-process.
    let web1 = s
        .agent_host("web1", Format::Deb, &format!("schedule: '{YEARLY}'"))
        .await?;
    let policy = format!("{REPO}/fleet.yaml.asc");
    // The index the signed policy binds: tracks/stable/by-hash/SHA256/<sha256>.
    let bound = || async {
        let sha = repo
            .ok(&format!(
                "sed -n 's/.*\"stable\": {{serial: [0-9]*, sha256: \"\\([0-9a-f]*\\)\"}}.*/\\1/p' {policy}"
            ))
            .await?;
        ensure!(
            sha.trim().len() == 64,
            "no binding for stable in {policy}: {sha:?}"
        );
        Ok::<_, anyhow::Error>(format!(
            "{REPO}/tracks/stable/by-hash/SHA256/{}",
            sha.trim()
        ))
    };
    let idx = bound().await?;
    repo.ok(&format!(
        "mkdir -p /root/old && cp {idx} /root/old/index.json && cp {policy} /root/old/"
    ))
    .await?;
    let nothing_installed = |v: &Value| v["installed"].as_object().is_none_or(|m| m.is_empty());

    // A tampered index: it no longer hashes to what the signed policy binds.
    repo.ok(&format!("sed -i 's/1.0.0-1/1.0.9-1/g' {idx}"))
        .await?;
    let (code, v) = update_now(&web1).await?;
    let err = v["error"].as_str().unwrap_or_default().to_string();
    ensure!(
        code == 1
            && err.starts_with("refused tracks/stable/index.json: it hashes to ")
            && err.ends_with("a mixed or tampered snapshot"),
        "{v:#}"
    );
    ensure!(
        dpkg_status(&web1).await?.is_empty() && nothing_installed(&v),
        "{v:#}"
    );
    repo.ok(&format!("cp /root/old/index.json {idx}")).await?;

    // A tampered policy (a host moved to another track).
    repo.ok(&format!("sed -i 's/stable/unstable/' {policy}"))
        .await?;
    let (code, v) = update_now(&web1).await?;
    let err = v["error"].as_str().unwrap_or_default();
    ensure!(
        code == 1
            && err
                .starts_with("refused fleet.yaml.asc: bad signature (not signed by the pinned key"),
        "{v:#}"
    );

    // A policy signed, but by another key.
    repo.ok(&format!(
        "export GNUPGHOME=$(mktemp -d) && \
         gpg --batch --quiet --pinentry-mode loopback --passphrase '' --quick-gen-key mallory@example.org ed25519 sign never && \
         gpg --batch --yes --clearsign -o {policy} {REPO}/fleet.yaml"
    ))
    .await?;
    let (code, v) = update_now(&web1).await?;
    let err = v["error"].as_str().unwrap_or_default();
    ensure!(
        code == 1 && err.contains("bad signature (not signed by the pinned key"),
        "{v:#}"
    );
    ensure!(dpkg_status(&web1).await?.is_empty());
    repo.ok(&format!("cp /root/old/fleet.yaml.asc {policy}"))
        .await?;

    // A package whose bytes are not what the signed index says (same size).
    let pool = repo
        .ok(&format!("ls {REPO}/pool/main/f/foo/foo_1.0.0-1_amd64.deb"))
        .await?;
    let pool = pool.trim();
    repo.ok(&format!(
        "cp {pool} /root/old/foo.deb && printf 'XXXX' | dd of={pool} bs=1 seek=2000 conv=notrunc 2>/dev/null"
    ))
    .await?;
    let (code, v) = update_now(&web1).await?;
    let err = v["error"].as_str().unwrap_or_default();
    ensure!(
        code == 1 && err.contains("install foo 1.0.0-1: refused: sha256 mismatch"),
        "{v:#}"
    );
    ensure!(dpkg_status(&web1).await?.is_empty());
    let cache = web1
        .host
        .exec("ls -A /var/lib/keepup-agent/cache 2>/dev/null")
        .await?
        .stdout;
    ensure!(
        cache.trim().is_empty(),
        "the refused download was kept: {cache}"
    );
    repo.ok(&format!("cp /root/old/foo.deb {pool}")).await?;

    // The real thing installs (no agent: nothing starts it, and the pass says so).
    let v = update_ok(&web1).await?;
    ensure!(
        v["results"]
            .to_string()
            .contains("installed; no agent running to start it"),
        "{v:#}"
    );
    ensure!(web1.installed("foo").await?.as_deref() == Some("1.0.0-1"));
    let first = v["index_serial"].as_u64().context("index serial")?;

    // A newer index is seen; then the old one is served again: a replay, refused.
    let (deb2, rpm2) = &s.upgrade;
    publish(repo, &[deb2, rpm2]).await?;
    s.promote_to_stable("1.1.0").await?;
    let v = update_ok(&web1).await?;
    let second = v["index_serial"].as_u64().context("index serial")?;
    ensure!(second > first && web1.installed("foo").await?.as_deref() == Some("1.1.0-1"));
    let new_idx = bound().await?;
    ensure!(
        new_idx != idx,
        "the promotion did not change the bound index"
    );
    repo.ok(&format!(
        "mkdir -p /root/new && cp {new_idx} {policy} /root/new/"
    ))
    .await?;

    // The old index served in place of the new one the policy binds (mix and match).
    repo.ok(&format!("cp /root/old/index.json {new_idx}"))
        .await?;
    let (code, v) = update_now(&web1).await?;
    let err = v["error"].as_str().unwrap_or_default();
    ensure!(
        code == 1 && err.ends_with("a mixed or tampered snapshot"),
        "{v:#}"
    );
    repo.ok(&format!("cp /root/new/$(basename {new_idx}) {new_idx}"))
        .await?;

    // The old policy served again, with the new index in place of the old one it binds: a
    // replay of the policy, refused by its serial before the index is looked at.
    repo.ok(&format!(
        "cp /root/old/fleet.yaml.asc {policy} && cp {new_idx} {idx}"
    ))
    .await?;
    let (code, v) = update_now(&web1).await?;
    let policy_serial = |asc: &str| -> Result<u64> {
        asc.lines()
            .find_map(|l| l.strip_prefix("serial: "))
            .context("no serial in the policy")?
            .trim()
            .parse()
            .context("serial")
    };
    let old_serial = policy_serial(&repo.ok("cat /root/old/fleet.yaml.asc").await?)?;
    let new_serial = policy_serial(&repo.ok("cat /root/new/fleet.yaml.asc").await?)?;
    let want = format!(
        "refused fleet.yaml.asc: serial {old_serial} is lower than {new_serial} already seen \
         (replayed or rolled-back repository?)"
    );
    ensure!(code == 1 && v["error"] == want.as_str(), "{v:#}");
    ensure!(web1.installed("foo").await?.as_deref() == Some("1.1.0-1"));
    let serials = web1
        .host
        .ok("cat /var/lib/keepup-agent/serials.json")
        .await?;
    ensure!(
        serials.contains(&format!("\"stable\": {second}")),
        "{serials}"
    );
    Ok(())
}

/// `versions` small .debs of foo (a 1 KiB payload instead of the daemon, stored
/// uncompressed: the test is about the repository's metadata, not the packages).
fn small_debs(dir: &Path, versions: &[String]) -> Result<Vec<PathBuf>> {
    let src = keepup_tests::host::workspace_root().join("docs/examples");
    let spec_dir = dir.join("small");
    std::fs::create_dir_all(&spec_dir)?;
    std::fs::copy(src.join("foo.conf"), spec_dir.join("foo.conf"))?;
    std::fs::write(spec_dir.join("payload"), vec![b'x'; 1024])?;
    let text = std::fs::read_to_string(src.join("foo.yaml"))?
        .replace("../../target/release/food", "payload");
    let mut out = Vec::new();
    for v in versions {
        let path = spec_dir.join(format!("foo-{v}.yaml"));
        std::fs::write(
            &path,
            text.replace("version: 1.0.0", &format!("version: {v}")),
        )?;
        let spec = keepup_packager::spec::Spec::load(&path).map_err(|e| anyhow!("{e}"))?;
        let opts = keepup_packager::PackOptions {
            formats: vec![Format::Deb],
            compression: Some(keepup_packager::Compression::None),
            epoch: 1_700_000_000,
            sign_key: None,
        };
        out.extend(keepup_packager::pack(&spec, &opts, &dir.join("debs"))?);
    }
    Ok(out)
}

/// Issue 11, consistent fetch: an agent polls (`update --now` in a loop) while 200 promotes
/// rewrite the track it follows and the policy. Every pass must check out: the policy is one
/// inline-signed file and the index it binds is fetched by hash, so no pass can read a
/// signature from one publish and data from another. foo is quarantined on the host, so each
/// pass fetches and checks the metadata and installs nothing (hundreds of passes, not a few).
#[tokio::test]
async fn agents_polling_during_200_promotes_see_no_signature_failure() -> Result<()> {
    let Some(s) = Setup::start(Upgrade::Unpublished, &["web1 --track testing"]).await? else {
        return Ok(());
    };
    s.keepup("quarantine", "foo --hosts web1").await?;
    let versions: Vec<String> = (1..=100).map(|i| format!("2.0.{i}")).collect();
    let debs = small_debs(s._tmp.path(), &versions)?;
    ensure!(debs.len() == versions.len(), "packed {} debs", debs.len());
    s.repo
        .copy_in(&s._tmp.path().join("debs"), "/pkgs/small")
        .await?;
    s.keepup("publish", "/pkgs/small/*.deb").await?;
    let web1 = s
        .agent_host("web1", Format::Deb, &format!("schedule: '{YEARLY}'"))
        .await?;
    update_ok(&web1).await?;

    // Poll until /tmp/stop exists, one JSON line per pass.
    web1.host
        .ok("setsid sh -c 'while [ ! -e /tmp/stop ]; do \
               keepup-agent update --now --json | tr -d \"\\n\" >>/tmp/passes; echo >>/tmp/passes; \
             done; touch /tmp/stopped' >/dev/null 2>&1 </dev/null &")
        .await?;
    // One exec per version: each exec has its own time limit, so a loaded machine slows the
    // loop down without failing it.
    for v in &versions {
        s.repo
            .ok(&format!(
                "keepup promote --repo {REPO} foo {v} --to testing >/dev/null && \
                 keepup promote --repo {REPO} foo {v} --to stable >/dev/null"
            ))
            .await?;
    }
    web1.host.ok("touch /tmp/stop").await?;
    wait_for(
        "the polling loop to stop",
        Duration::from_secs(60),
        || async { Ok(web1.host.exec("test -e /tmp/stopped").await?.code == 0) },
    )
    .await?;

    let passes = web1.host.ok("cat /tmp/passes").await?;
    let mut serials = std::collections::BTreeSet::new();
    let mut count = 0;
    for line in passes.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).with_context(|| format!("a pass: {line}"))?;
        ensure!(
            v["ok"] == true,
            "a pass failed while the repository changed: {v:#}"
        );
        serials.insert(v["index_serial"].as_u64().context("index serial")?);
        count += 1;
    }
    // The loop really ran across the promotes: it saw many different snapshots.
    ensure!(
        serials.len() >= 20,
        "{count} passes saw only {} index serials: {serials:?}",
        serials.len()
    );
    eprintln!(
        "{count} passes, {} distinct index serials, none refused",
        serials.len()
    );
    Ok(())
}

#[tokio::test]
async fn hung_postinst_is_killed_and_the_next_pass_repairs() -> Result<()> {
    let Some(s) = Setup::start(Upgrade::HangingDeb, &["web1 --track stable"]).await? else {
        return Ok(());
    };
    let config = format!("schedule: '{YEARLY}'\npackage_timeout: 5s");
    let web1 = s.agent_host("web1", Format::Deb, &config).await?;
    let host = &web1.host;
    start_agent(&web1).await?;
    let v = update_ok(&web1).await?;
    ensure!(v["starts"]["foo"]["started"] == true, "{v:#}");

    host.ok(&format!("touch {HANG_FILE}")).await?;
    s.promote_to_stable("1.1.0").await?;
    let t0 = Instant::now();
    let (code, v) = update_now(&web1).await?;
    let took = t0.elapsed();
    let err = v["error"].as_str().unwrap_or_default();
    ensure!(
        code == 1
            && err.contains(
                "upgrade foo 1.0.0-1 -> 1.1.0-1: package manager hung: still running after 5s"
            ),
        "{v:#}"
    );
    ensure!(took < Duration::from_secs(30), "the pass took {took:?}");
    // Killed with its process group: no package manager or maintainer script is left.
    host.until_empty(
        "ps -eo args= | grep -E '^(apt-get|dpkg|/bin/sh /var/lib/dpkg/info/foo)' || true",
        Duration::from_secs(5),
    )
    .await?;
    let st = dpkg_status(&web1).await?;
    ensure!(
        !st.starts_with("install ok installed"),
        "half-installed shown as installed: {st}"
    );
    ensure!(
        v["installed"].get("foo").is_none(),
        "the pass reports a half-installed package as installed: {v:#}"
    );
    ensure!(host.ok(&format!("cat {MARKER}")).await?.contains("hung"));

    // The postinst would finish now: the next pass repairs first, then all is current.
    host.ok(&format!("rm {HANG_FILE}")).await?;
    let v = update_ok(&web1).await?;
    ensure!(
        v["results"][0]
            .as_str()
            .unwrap_or_default()
            .starts_with("repaired: dpkg --configure -a"),
        "{v:#}"
    );
    ensure!(v["plan"][0] == "keep foo 1.1.0-1 (current)", "{v:#}");
    ensure!(web1.installed("foo").await?.as_deref() == Some("1.1.0-1"));
    ensure!(host.exec(&format!("test -e {MARKER}")).await?.code != 0);
    wait_running(&web1, "1.1.0", Duration::from_secs(20)).await?;
    Ok(())
}

#[tokio::test]
async fn agent_killed_mid_install_recovers_on_restart() -> Result<()> {
    let Some(s) = Setup::start(Upgrade::HangingDeb, &["web1 --track stable"]).await? else {
        return Ok(());
    };
    let web1 = s
        .agent_host("web1", Format::Deb, &format!("schedule: '{YEARLY}'"))
        .await?;
    let host = &web1.host;
    start_agent(&web1).await?;
    update_ok(&web1).await?;
    wait_running(&web1, "1.0.0", Duration::from_secs(20)).await?;

    // Start an upgrade and kill everything mid-install: the agent and its package manager
    // (like a crash of the host), while the postinst runs.
    host.ok(&format!("touch {HANG_FILE}")).await?;
    s.promote_to_stable("1.1.0").await?;
    host.ok("setsid keepup-agent update --now >/tmp/update.out 2>&1 </dev/null &")
        .await?;
    wait_for(
        "the upgrade to reach postinst",
        Duration::from_secs(30),
        // `[/]` keeps the pattern from matching the shell that runs pgrep.
        || async {
            let pgrep = "pgrep -f '[/]var/lib/dpkg/info/foo.postinst'";
            Ok(host.exec(pgrep).await?.code == 0)
        },
    )
    .await?;
    host.ok("pkill -KILL -f '[k]eepup-agent run'; pkill -KILL apt-get; pkill -KILL dpkg; pkill -KILL -f '[f]oo.postinst'; true")
        .await?;
    host.until_empty(
        // Zombies do not count: the container's PID 1 (`sleep`) does not reap orphans.
        "ps -eo stat=,args= | awk '$1 !~ /^Z/' \
         | grep -E '^[^ ]+ +(/usr/bin/)?(apt-get|dpkg|keepup-agent run)' || true",
        Duration::from_secs(5),
    )
    .await?;
    ensure!(host
        .ok(&format!("cat {MARKER}"))
        .await?
        .contains("upgrade foo 1.0.0-1 -> 1.1.0-1"));
    let st = dpkg_status(&web1).await?;
    ensure!(!st.starts_with("install ok installed"), "{st}");

    // Restart: the agent repairs first, then a pass finds everything current.
    host.ok(&format!("rm {HANG_FILE}")).await?;
    start_agent(&web1).await?;
    let repaired = wait_for(
        "a repair after the restart",
        Duration::from_secs(60),
        || async { Ok(host.exec(&format!("test -e {MARKER}")).await?.code != 0) },
    )
    .await;
    explained(repaired, host.ok(&format!("tail -20 {AGENT_OUT}"))).await?;
    let out = host.ok(&format!("cat {AGENT_OUT}")).await?;
    ensure!(
        out.contains("repairing with dpkg --configure -a")
            && out.contains("at start: repaired: dpkg --configure -a"),
        "{out}"
    );
    ensure!(web1.installed("foo").await?.as_deref() == Some("1.1.0-1"));
    let v = update_ok(&web1).await?;
    ensure!(v["plan"][0] == "keep foo 1.1.0-1 (current)", "{v:#}");
    wait_running(&web1, "1.1.0", Duration::from_secs(20)).await?;
    Ok(())
}

/// Issue 13: update passes run in a short-lived keepup-agent-pass child, so a pass that dies
/// (here SIGKILLed while it waits on a repository that stopped answering) fails that pass and
/// says why, and takes nothing else down: the same supervisor keeps the same service running,
/// and the next pass works.
#[tokio::test]
async fn a_pass_child_killed_mid_pass_leaves_supervision_alone() -> Result<()> {
    let Some(s) = Setup::start(Upgrade::Published, &["web1 --track stable"]).await? else {
        return Ok(());
    };
    let web1 = s
        .agent_host("web1", Format::Deb, &format!("schedule: '{YEARLY}'"))
        .await?;
    let host = &web1.host;
    start_agent(&web1).await?;
    update_ok(&web1).await?;
    wait_running(&web1, "1.0.0", Duration::from_secs(20)).await?;
    let agent_pid = host.ok("pgrep -x keepup-agent").await?;
    let foo_pid = |status: &str| -> Result<Value> {
        let v: Value = serde_json::from_str(status)?;
        Ok(v["services"][0]["pid"].clone())
    };
    let foo0 = foo_pid(&host.ok("keepup-agent status --json").await?)?;
    ensure!(foo0.is_u64(), "foo is not running: {foo0}");

    // The repository stops answering (its server stopped: connections are accepted by the
    // kernel, never answered), a pass starts, and its child is killed while it waits.
    s.repo.ok("pkill -STOP -f '[k]eepup serve'").await?;
    host.ok(
        "setsid sh -c 'keepup-agent update --now --json >/tmp/pass.json 2>/tmp/pass.err; \
         echo $? >/tmp/pass.rc' </dev/null >/dev/null 2>&1 &",
    )
    .await?;
    wait_for(
        "the pass child to start",
        Duration::from_secs(20),
        || async { Ok(host.exec("pgrep -f '^keepup-agent-pass'").await?.code == 0) },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    host.ok("pkill -KILL -f '^keepup-agent-pass'").await?;
    let answered = wait_for(
        "update --now to answer",
        Duration::from_secs(20),
        || async { Ok(host.exec("test -s /tmp/pass.rc").await?.code == 0) },
    )
    .await;
    explained(answered, web1.agent_log()).await?;
    let rc = host.ok("cat /tmp/pass.rc").await?;
    let v: Value = serde_json::from_str(&host.ok("cat /tmp/pass.json").await?)
        .context("update --now printed no JSON")?;
    let err = v["error"].as_str().unwrap_or_default();
    ensure!(
        rc.trim() == "1"
            && err.contains("the update pass (pid ")
            && err.contains("ended without an answer (killed by signal 9 (SIGKILL))"),
        "rc {rc}: {v:#}"
    );
    // Nothing else noticed: the same supervisor, the same service process.
    ensure!(host.ok("pgrep -x keepup-agent").await? == agent_pid);
    ensure!(foo_pid(&host.ok("keepup-agent status --json").await?)? == foo0);
    let log = host.ok(&format!("cat {AGENT_OUT}")).await?;
    ensure!(
        log.matches("ended without an answer").count() == 1,
        "said once:\n{log}"
    );

    // The repository is back: the next pass runs as usual.
    s.repo.ok("pkill -CONT -f '[k]eepup serve'").await?;
    let v = update_ok(&web1).await?;
    ensure!(v["plan"][0] == "keep foo 1.0.0-1 (current)", "{v:#}");
    ensure!(foo_pid(&host.ok("keepup-agent status --json").await?)? == foo0);
    Ok(())
}

#[tokio::test]
async fn rpm_host_installs_upgrades_and_quarantines() -> Result<()> {
    let Some(s) = Setup::start(Upgrade::Published, &["'rpm*' --track stable"]).await? else {
        return Ok(());
    };
    let config = format!("schedule: '{YEARLY}'\npackage_format: rpm");
    let rpm1 = s.agent_host("rpm1", Format::Rpm, &config).await?;
    start_agent(&rpm1).await?;

    let v = update_ok(&rpm1).await?;
    ensure!(v["plan"][0] == "install foo 1.0.0-1", "{v:#}");
    ensure!(v["starts"]["foo"]["started"] == true, "{v:#}");
    ensure!(rpm1.installed("foo").await?.as_deref() == Some("1.0.0-1"));
    ensure!(dpkg_status(&rpm1).await?.is_empty(), "dpkg knows foo too");
    wait_running(&rpm1, "1.0.0", Duration::from_secs(20)).await?;

    s.promote_to_stable("1.1.0").await?;
    let v = update_ok(&rpm1).await?;
    ensure!(v["plan"][0] == "upgrade foo 1.0.0-1 -> 1.1.0-1", "{v:#}");
    ensure!(v["starts"]["foo"]["started"] == true, "{v:#}");
    ensure!(
        rpm1.installed("foo").await?.as_deref() == Some("1.1.0-1"),
        "one version after the upgrade"
    );
    ensure!(v["installed"]["foo"] == "1.1.0-1", "{v:#}");
    wait_running(&rpm1, "1.1.0", Duration::from_secs(20)).await?;

    s.keepup("quarantine", "foo --hosts rpm1").await?;
    let v = update_ok(&rpm1).await?;
    ensure!(v["plan"][0] == "remove foo 1.1.0-1 (quarantined)", "{v:#}");
    ensure!(rpm1.installed("foo").await?.is_none());
    rpm1.host
        .until_empty(
            "ps -u foo -o pid= 2>/dev/null || true",
            Duration::from_secs(15),
        )
        .await?;
    let status = rpm1.host.ok("keepup-agent status").await?;
    ensure!(!status.contains("foo "), "{status}");
    Ok(())
}

/// A fake report server on the repo host: answers 204 to every connection on port 9000 and
/// appends what it received to /tmp/reports.
/// A stand-in report server on port 9000 (python3 is in the host image, for dnf): it reads
/// each whole request before it answers 204, and appends the request line, the headers
/// (lower-cased) and the body to /tmp/reports. Stopped with [`STOP_FAKE_SERVER`].
const FAKE_SERVER: &str = r#"cat > /tmp/fake-report-server.py <<'EOF'
import http.server
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        lines = [self.requestline] + [k.lower() + ": " + v for k, v in self.headers.items()]
        with open("/tmp/reports", "ab") as f:
            f.write(("\n".join(lines) + "\n\n").encode() + body + b"\n")
        self.send_response(204)
        self.send_header("Connection", "close")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 9000), Handler).serve_forever()
EOF
touch /tmp/reports
setsid python3 /tmp/fake-report-server.py >>/tmp/fake-report-server.log 2>&1 </dev/null &
for i in $(seq 100); do
    curl -s -o /dev/null http://127.0.0.1:9000/ && exit 0
    sleep 0.1
done
echo "the fake report server did not start" >&2; cat /tmp/fake-report-server.log >&2; exit 1"#;

/// Stops [`FAKE_SERVER`].
const STOP_FAKE_SERVER: &str = "pkill -f '[f]ake-report-server.py'; true";

/// What the fake server received so far.
async fn received(repo: &Host) -> Result<String> {
    repo.ok("cat /tmp/reports 2>/dev/null || true").await
}

/// Waits until the fake server got a report containing `what`; returns all it got.
async fn wait_report(repo: &Host, what: &str) -> Result<String> {
    let got = wait_for(
        &format!("a report with {what}"),
        Duration::from_secs(20),
        || async { Ok(received(repo).await?.contains(what)) },
    )
    .await;
    explained(got, received(repo)).await?;
    received(repo).await
}

#[tokio::test]
async fn reports_survive_an_outage_and_a_failed_start_comes_with_the_log_tail() -> Result<()> {
    let Some(s) = Setup::start(Upgrade::FailsHealth, &["web1 --track stable"]).await? else {
        return Ok(());
    };
    let repo = &s.repo;
    repo.ok(FAKE_SERVER).await?;
    let config = format!(
        "schedule: '{YEARLY}'\nreport: http://repo:9000\nallow_plain_http: true\nreport_every: 2s\n\
         report_token_file: /etc/keepup/token"
    );
    let web1 = s.agent_host("web1", Format::Deb, &config).await?;
    let host = &web1.host;
    host.ok("echo tok-web1 > /etc/keepup/token").await?;
    start_agent(&web1).await?;
    update_ok(&web1).await?;
    wait_running(&web1, "1.0.0", Duration::from_secs(20)).await?;
    let reports = wait_report(repo, "\"installed\":{\"foo\":\"1.0.0-1\"}").await?;
    ensure!(
        reports.contains("authorization: Bearer tok-web1"),
        "{reports}"
    );

    // The server (and the repository) go away: supervision goes on (the same daemon keeps
    // running), the outage is logged once, passes fail and say why; reports resume when the
    // server is back.
    let count = |text: &str, what: &str| text.matches(what).count();
    let out = host.ok(&format!("cat {AGENT_OUT}")).await?;
    let (failed0, resumed0) = (
        count(&out, "report not sent"),
        count(&out, "get through again"),
    );
    let pid = |s: &str| -> Result<Value> {
        let v: Value = serde_json::from_str(s)?;
        Ok(v["services"][0]["pid"].clone())
    };
    let pid0 = pid(&host.ok("keepup-agent status --json").await?)?;
    ensure!(pid0.is_u64(), "foo is not running: {pid0}");
    repo.ok(&format!(
        "{STOP_FAKE_SERVER}; pkill -f '[k]eepup serve'; true"
    ))
    .await?;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let (code, v) = update_now(&web1).await?;
    ensure!(
        code == 1
            && v["error"]
                .as_str()
                .unwrap_or_default()
                .contains("cannot fetch http://repo:8080/fleet.yaml"),
        "{v:#}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = host.ok(&format!("cat {AGENT_OUT}")).await?;
    ensure!(count(&out, "report not sent") == failed0 + 1, "{out}");
    ensure!(pid(&host.ok("keepup-agent status --json").await?)? == pid0);
    let before = repo.ok("wc -l < /tmp/reports").await?;
    repo.ok(FAKE_SERVER).await?;
    start_serve(repo).await?;
    let resumed = wait_for("reports to resume", Duration::from_secs(20), || async {
        let out = host.ok(&format!("cat {AGENT_OUT}")).await?;
        let now = repo.ok("wc -l < /tmp/reports").await?;
        Ok(count(&out, "get through again") > resumed0 && now != before)
    })
    .await;
    explained(resumed, host.ok(&format!("cat {AGENT_OUT}"))).await?;

    // The upgrade installs, but its daemon fails the health probe.
    s.promote_to_stable("1.1.0").await?;
    let (code, v) = update_now(&web1).await?;
    let start = &v["starts"]["foo"];
    ensure!(code == 1 && start["started"] == false, "{v:#}");
    ensure!(start["version"] == "1.1.0-1", "{v:#}");
    ensure!(
        start["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("healthz"),
        "{v:#}"
    );
    let tail = start["log_tail"].as_array().context("log tail")?;
    ensure!(
        !tail.is_empty()
            && tail
                .iter()
                .any(|l| l.as_str().unwrap_or_default().contains("healthz")),
        "{v:#}"
    );
    ensure!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("foo 1.1.0-1: failed to start"),
        "{v:#}"
    );
    ensure!(v["installed"]["foo"] == "1.1.0-1", "{v:#}");

    // The report after the pass says so.
    let reports = wait_report(repo, "\"kind\":\"failed-to-start\"").await?;
    let last = reports
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no report body")?;
    let r: Value = serde_json::from_str(last)?;
    ensure!(r["host"] == "web1" && r["track"] == "stable", "{r:#}");
    ensure!(r["installed"]["foo"] == "1.1.0-1", "{r:#}");
    let svc = &r["services"][0];
    ensure!(
        svc["name"] == "foo" && svc["start"]["started"] == false,
        "{r:#}"
    );
    ensure!(
        !svc["start"]["log_tail"].as_array().unwrap().is_empty(),
        "{r:#}"
    );
    ensure!(r["update"]["ok"] == false, "{r:#}");

    // A restarted agent reports what is installed, and the events before the restart, before
    // its next pass (none is due: the schedule is yearly).
    host.ok("pkill -TERM -x keepup-agent; for i in $(seq 100); do pgrep -x keepup-agent >/dev/null || exit 0; sleep 0.1; done; exit 1")
        .await?;
    repo.ok(": > /tmp/reports").await?;
    start_agent(&web1).await?;
    let reports = wait_report(repo, "\"kind\":\"agent-start\"").await?;
    let last = reports
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no report body")?;
    let r: Value = serde_json::from_str(last)?;
    ensure!(r["installed"]["foo"] == "1.1.0-1", "{r:#}");
    ensure!(r["track"] == "stable", "{r:#}");
    let kinds: Vec<&str> = r["events"]
        .as_array()
        .context("events")?
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    ensure!(
        kinds.contains(&"failed-to-start")
            && kinds.iter().filter(|k| **k == "agent-start").count() == 2,
        "{r:#}"
    );
    Ok(())
}

/// Issue 11, key rotation: `keepup repo rotate-key --overlap 20s`. A host pinned to the old
/// key that passes during the overlap learns the new key from `keys/rotation.asc` and goes on
/// updating after the overlap, when the repository signs with the new key only, with no
/// change on the host. A host that did not pass during the overlap is refused afterwards, and
/// told which key to install.
#[tokio::test]
async fn a_key_rotation_reaches_hosts_pinned_to_the_old_key() -> Result<()> {
    let Some(s) = Setup::start(Upgrade::Published, &["'*' --track stable"]).await? else {
        return Ok(());
    };
    let config = format!("schedule: '{YEARLY}'");
    let web1 = s.agent_host("web1", Format::Deb, &config).await?;
    let web2 = s.agent_host("web2", Format::Deb, &config).await?;
    update_ok(&web1).await?;
    update_ok(&web2).await?;
    let pinned = web1.host.ok("cat /etc/keepup/repository.asc").await?;

    let out = s.keepup("repo rotate-key", "--overlap 20s").await?;
    let fpr = |label: &str| -> Result<String> {
        out.lines()
            .find_map(|l| l.strip_prefix(label))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string)
            .with_context(|| format!("no {label:?} in rotate-key's output:\n{out}"))
    };
    let (new, old) = (fpr("new key:")?, fpr("old key:")?);
    let rotated_at = Instant::now();
    s.repo
        .ok(&format!("keepup repo verify --repo {REPO}"))
        .await?;
    // Signatures in the signed policy (gpg lists each, even by a key it does not have).
    let signatures = format!("gpg --verify {REPO}/fleet.yaml.asc 2>&1 | grep -c 'Signature made'");
    let during = s.repo.ok(&signatures).await?;
    ensure!(
        during.trim() == "2",
        "both keys sign during the overlap: {during}"
    );

    // During the overlap: web1 passes and learns the new key.
    let v = update_ok(&web1).await?;
    let learned = web1.host.ok("cat /var/lib/keepup-agent/keys.json").await?;
    ensure!(
        learned.contains(&new),
        "web1 did not learn {new}: {learned}\n{v:#}"
    );

    // After the overlap the repository signs with the new key only.
    let left = Duration::from_secs(21).saturating_sub(rotated_at.elapsed());
    tokio::time::sleep(left).await;
    s.keepup("repo refresh", "").await?;
    let after = s.repo.ok(&signatures).await?;
    ensure!(
        after.trim() == "1",
        "one signature after the overlap: {after}"
    );
    s.promote_to_stable("1.1.0").await?;

    // web1: nothing changed on the host (the same trusted_key), and it upgrades.
    ensure!(web1.host.ok("cat /etc/keepup/repository.asc").await? == pinned);
    update_ok(&web1).await?;
    ensure!(web1.installed("foo").await?.as_deref() == Some("1.1.0-1"));

    // web2 missed the overlap: refused, told what happened and what to install.
    let (code, v) = update_now(&web2).await?;
    let err = v["error"].as_str().unwrap_or_default();
    ensure!(
        code == 1
            && err
                .starts_with("refused fleet.yaml.asc: bad signature (not signed by the pinned key")
            && err.contains(&format!("the repository's key changed from {old} to {new}"))
            && err.contains("install the repository's current public key"),
        "{v:#}"
    );
    ensure!(web2.installed("foo").await?.as_deref() == Some("1.0.0-1"));
    Ok(())
}

/// A repository nobody re-signs (frozen, or an attacker replaying today's metadata forever):
/// once its metadata has expired, the agent refuses it with the time and keeps what is
/// installed, and stock apt refuses the Release too; `keepup repo refresh` makes both accept
/// it again.
#[tokio::test]
async fn expired_metadata_is_refused_by_the_agent_and_apt_until_refreshed() -> Result<()> {
    let Some(s) = Setup::start(Upgrade::Unpublished, &["'*' --track stable"]).await? else {
        return Ok(());
    };
    let repo = &s.repo;
    // 20 seconds of validity from now on: set, and everything signed again.
    s.keepup("repo config", "--valid-for 20s").await?;
    s.keepup("repo refresh", "").await?;
    let web1 = s
        .agent_host("web1", Format::Deb, &format!("schedule: '{YEARLY}'"))
        .await?;
    web1.host
        .ok("mkdir -p /etc/apt/keyrings && cp /etc/keepup/repository.asc /etc/apt/keyrings/keepup.asc \
             && rm -f /etc/apt/sources.list /etc/apt/sources.list.d/* \
             && echo 'deb [signed-by=/etc/apt/keyrings/keepup.asc] http://repo:8080/ stable main' > /etc/apt/sources.list.d/keepup.list")
        .await?;
    let apt_update = || {
        web1.host
            .exec("rm -rf /var/lib/apt/lists/* && apt-get update 2>&1")
    };
    let out = apt_update().await?;
    ensure!(
        out.code == 0 && !out.stdout.contains("E:"),
        "{}",
        out.stdout
    );
    update_ok(&web1).await?;
    ensure!(dpkg_status(&web1).await? == "install ok installed|1.0.0-1");

    // Frozen: wait (with a deadline) until the repository itself says its policy (signed
    // with everything else) has expired.
    wait_for(
        "the metadata to expire",
        Duration::from_secs(90),
        || async {
            let e = repo
                .exec(&format!("keepup repo verify --repo {REPO}"))
                .await?;
            Ok(e.code != 0
                && e.stderr
                    .contains("fleet.yaml: repository metadata expired at"))
        },
    )
    .await?;
    let (code, v) = update_now(&web1).await?;
    let err = v["error"].as_str().unwrap_or_default();
    ensure!(
        code == 1
            && err.starts_with("refused fleet.yaml.asc: repository metadata expired at ")
            && err.ends_with("(frozen or unmaintained repository?)"),
        "{v:#}"
    );
    ensure!(
        dpkg_status(&web1).await? == "install ok installed|1.0.0-1",
        "the installed package must stay"
    );
    // apt compares whole seconds with `<` (keepup with `<=`): it refuses within a second.
    wait_for(
        "apt to refuse the expired Release",
        Duration::from_secs(30),
        || async {
            let out = apt_update().await?;
            Ok(out.stdout.contains("is expired (invalid since"))
        },
    )
    .await?;
    ensure!(
        web1.host
            .exec("apt-cache policy foo | grep -c repo:8080")
            .await?
            .stdout
            .trim()
            == "0",
        "apt still lists foo from the expired Release"
    );

    // Signed again: both accept it.
    s.keepup("repo refresh", "").await?;
    let out = apt_update().await?;
    ensure!(
        out.code == 0 && !out.stdout.contains("E:"),
        "{}",
        out.stdout
    );
    update_ok(&web1).await?;
    Ok(())
}
