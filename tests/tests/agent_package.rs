//! keepup-agent's own packages (`keepup pack --agent`): lintian and rpmlint find no errors and
//! builds are reproducible; on a Debian host without systemd the .deb and the .rpm install,
//! verify and remove cleanly and the agent runs when started by hand; with systemd as PID 1 the
//! unit is enabled and active after install, the cron line restarts a stopped agent, and an
//! upgrade restarts it (and the services it supervises come back).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keepup_packager::plan::Format;
use keepup_tests::agent_pkg::{agent_package, agent_package_version};
use keepup_tests::example::{self, built_bin};
use keepup_tests::host::{docker_or_skip, Host, TestNet};
use keepup_tests::systemd::SystemdHost;
use keepup_tests::testkit::{keepup_pack_example, shared_signing_key};

/// Live (non-zombie) agent processes; a container whose PID 1 is `sleep` never reaps them.
const LIVE_AGENT: &str = "ps -eo stat=,comm= | awk '$1 !~ /^Z/ && $2 == \"keepup-agent\"'";

/// Runs the cron.d line's command the way cron would (`/bin/sh`, the file's PATH).
const RUN_CRON_LINE: &str = "cmd=$(sed -n 's|^\\*/5 \\* \\* \\* \\* root ||p' /etc/cron.d/keepup-agent); \
     [ -n \"$cmd\" ] || { echo 'no cron line'; exit 99; }; \
     PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin sh -c \"$cmd\"; echo \"cron exit $?\"";

fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .expect("running sh");
    assert!(
        found.status.success(),
        "`{name}` is not installed: run `bash tests/run.sh` (it installs it) or apt-get install it"
    );
    Command::new(name)
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    Ok(text)
}

/// A stripped copy of the workspace's agent and of its keepup-agent-pass beside it, as a
/// release build would ship them; returns the agent's path.
fn stripped_agent(dir: &Path) -> Result<PathBuf> {
    for name in ["keepup-agent-pass", "keepup-agent"] {
        let bin = dir.join(name);
        std::fs::copy(built_bin(name)?, &bin)?;
        output(tool("strip").arg(&bin))?;
    }
    Ok(dir.join("keepup-agent"))
}

fn pack_agent(bin: &Path, out: &Path, extra: &[&str]) -> Result<Vec<PathBuf>> {
    let text = output(
        Command::new(built_bin("keepup")?)
            .args(["pack", "--agent"])
            .arg(bin)
            .arg("--out")
            .arg(out)
            .args(extra)
            .env("SOURCE_DATE_EPOCH", "1700000000"),
    )?;
    Ok(text
        .lines()
        .filter(|l| l.ends_with(".deb") || l.ends_with(".rpm"))
        .map(PathBuf::from)
        .collect())
}

/// An RSA signing key and a private rpm database that trusts it (rpmlint reads it).
struct SigningKey {
    _dir: tempfile::TempDir,
    secret: PathBuf,
    rpm_home: PathBuf,
}

fn signing_key() -> Result<SigningKey> {
    let dir = tempfile::tempdir()?;
    let gnupg = dir.path().join("gnupg");
    std::fs::create_dir(&gnupg)?;
    std::fs::set_permissions(&gnupg, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let gpg = |args: &[&str]| {
        output(
            tool("gpg")
                .env("GNUPGHOME", &gnupg)
                .args(["--batch", "--passphrase", ""])
                .args(args),
        )
    };
    gpg(&[
        "--quick-gen-key",
        "keepup agent test <agent@example.org>",
        "rsa3072",
        "sign",
        "never",
    ])?;
    let secret = dir.path().join("secret.asc");
    std::fs::write(&secret, gpg(&["--armor", "--export-secret-keys"])?)?;
    let public = dir.path().join("public.asc");
    std::fs::write(&public, gpg(&["--armor", "--export"])?)?;
    let rpm_home = dir.path().join("home");
    std::fs::create_dir_all(rpm_home.join("rpmdb"))?;
    std::fs::write(
        rpm_home.join(".rpmmacros"),
        format!("%_dbpath {}\n", rpm_home.join("rpmdb").display()),
    )?;
    output(
        tool("rpm")
            .env("HOME", &rpm_home)
            .arg("--import")
            .arg(&public),
    )?;
    Ok(SigningKey {
        _dir: dir,
        secret,
        rpm_home,
    })
}

#[test]
fn agent_packages_pass_lintian_and_rpmlint_and_are_reproducible() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bin = stripped_agent(dir.path())?;
    let key = signing_key()?;
    let sign = ["--sign-key", key.secret.to_str().expect("utf-8 path")];
    let a = pack_agent(&bin, &dir.path().join("a"), &sign)?;
    let b = pack_agent(&bin, &dir.path().join("b"), &sign)?;
    ensure!(a.len() == 2, "expected a .deb and an .rpm: {a:?}");
    for (x, y) in a.iter().zip(&b) {
        ensure!(
            std::fs::read(x)? == std::fs::read(y)?,
            "{} and {} differ: builds must be reproducible",
            x.display(),
            y.display()
        );
    }
    let deb = a.iter().find(|p| p.extension().is_some_and(|e| e == "deb"));
    let rpm = a.iter().find(|p| p.extension().is_some_and(|e| e == "rpm"));
    let (deb, rpm) = (deb.expect("a .deb"), rpm.expect("an .rpm"));
    let version = env!("CARGO_PKG_VERSION");
    let name = deb.file_name().unwrap_or_default().to_string_lossy();
    ensure!(
        name.starts_with(&format!("keepup-agent_{version}-1_")),
        "{name}"
    );

    // The .deb: control fields and contents (conffiles: on a host, below).
    let info = output(tool("dpkg-deb").arg("--info").arg(deb))?;
    for want in [
        "Package: keepup-agent",
        "Depends: libc6",
        "Recommends: cron",
        " postinst ",
        " prerm ",
        " postrm ",
    ] {
        ensure!(
            info.contains(want),
            "dpkg-deb --info lacks {want:?}:\n{info}"
        );
    }
    let contents = output(tool("dpkg-deb").arg("--contents").arg(deb))?;
    for want in [
        "-rwxr-xr-x root/root",
        " usr/sbin/keepup-agent\n",
        " usr/sbin/keepup-agent-pass\n",
        " etc/keepup/agent.yaml",
        " etc/cron.d/keepup-agent",
        " lib/systemd/system/keepup-agent.service",
        " usr/share/doc/keepup-agent/copyright",
        " usr/share/doc/keepup-agent/changelog.Debian.gz",
        " var/lib/keepup-agent/",
        " var/log/keepup/",
    ] {
        ensure!(
            contents.contains(want),
            "the .deb lacks {want}:\n{contents}"
        );
    }
    let lintian = tool("lintian").arg(deb).output()?;
    let report = String::from_utf8_lossy(&lintian.stdout).into_owned();
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    ensure!(errors.is_empty(), "lintian errors:\n{report}");

    // The .rpm: signed, config files, scriptlets, and rpmlint.
    let rpm_q = |args: &[&str]| output(tool("rpm").env("HOME", &key.rpm_home).args(args).arg(rpm));
    let config = rpm_q(&["-qp", "--configfiles"])?;
    ensure!(
        config.lines().collect::<Vec<_>>()
            == ["/etc/cron.d/keepup-agent", "/etc/keepup/agent.yaml"],
        "config files: {config}"
    );
    let scripts = rpm_q(&["-qp", "--scripts"])?;
    for want in [
        "postinstall scriptlet",
        "preuninstall scriptlet",
        "postuninstall scriptlet",
        "try-restart",
    ] {
        ensure!(
            scripts.contains(want),
            "rpm scripts lack {want:?}:\n{scripts}"
        );
    }
    ensure!(rpm_q(&["-K"])?.contains("signatures OK"));
    let lint = tool("rpmlint")
        .env("HOME", &key.rpm_home)
        .arg(rpm)
        .output()?;
    let report = String::from_utf8_lossy(&lint.stdout).into_owned();
    ensure!(report.contains(" 0 errors"), "rpmlint errors:\n{report}");
    Ok(())
}

/// Starts `keepup-agent run` in the background (as a container without systemd would) and
/// waits until `keepup-agent status` answers.
async fn start_agent_by_hand(host: &Host) -> Result<()> {
    host.ok("setsid /usr/sbin/keepup-agent run >/var/log/agent.out 2>&1 </dev/null &")
        .await?;
    let start = Instant::now();
    loop {
        if host.exec("keepup-agent status").await?.code == 0 {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!(
                "keepup-agent started by hand does not answer:\n{}",
                host.ok("cat /var/log/agent.out; ps -ef").await?
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stops the agent started by [`start_agent_by_hand`] with SIGTERM and waits until it is gone.
async fn stop_agent_by_hand(host: &Host) -> Result<()> {
    host.ok("pkill -TERM -x keepup-agent").await?;
    host.until_empty(LIVE_AGENT, Duration::from_secs(10)).await
}

#[tokio::test]
async fn deb_and_rpm_install_cleanly_without_systemd() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let deb = agent_package(dir.path(), Format::Deb);
    let rpm = agent_package(dir.path(), Format::Rpm);
    let deb2 = agent_package_version(dir.path(), Format::Deb, "99.0.0")?;
    let rpm2 = agent_package_version(dir.path(), Format::Rpm, "99.0.0")?;
    let net = TestNet::new()?;
    let host = Host::start(&net, "agent-pkg").await?;
    host.copy_in(&deb, "/pkgs/keepup-agent.deb").await?;
    host.copy_in(&rpm, "/pkgs/keepup-agent.rpm").await?;
    host.copy_in(&deb2, "/pkgs/keepup-agent-2.deb").await?;
    host.copy_in(&rpm2, "/pkgs/keepup-agent-2.rpm").await?;
    ensure!(
        host.exec("test -d /run/systemd/system").await?.code != 0,
        "the plain host must not run systemd"
    );

    // dpkg: installs without systemd, files in place, verify clean, unit enabled for later.
    host.ok("dpkg -i /pkgs/keepup-agent.deb").await?;
    let modes = host
        .ok(
            "stat -c '%a %U %n' /usr/sbin/keepup-agent /usr/sbin/keepup-agent-pass \
             /etc/keepup/agent.yaml \
             /etc/cron.d/keepup-agent /lib/systemd/system/keepup-agent.service \
             /var/lib/keepup-agent /var/log/keepup",
        )
        .await?;
    ensure!(
        modes
            == "755 root /usr/sbin/keepup-agent\n755 root /usr/sbin/keepup-agent-pass\n\
                644 root /etc/keepup/agent.yaml\n\
                644 root /etc/cron.d/keepup-agent\n644 root /lib/systemd/system/keepup-agent.service\n\
                755 root /var/lib/keepup-agent\n755 root /var/log/keepup\n",
        "modes:\n{modes}"
    );
    let conffiles = host
        .ok("cat /var/lib/dpkg/info/keepup-agent.conffiles")
        .await?;
    ensure!(
        conffiles == "/etc/cron.d/keepup-agent\n/etc/keepup/agent.yaml\n",
        "{conffiles}"
    );
    host.ok("test -L /etc/systemd/system/multi-user.target.wants/keepup-agent.service")
        .await
        .context("deb-systemd-helper should enable the unit even without systemd running")?;
    let verify = host.exec("dpkg --verify keepup-agent").await?;
    ensure!(
        verify.code == 0 && verify.stdout.is_empty(),
        "dpkg --verify: {verify:?}"
    );

    // The shipped (all-comments) config is accepted; the agent runs when started by hand.
    start_agent_by_hand(&host).await?;
    // The cron line does nothing without systemd, and says nothing.
    let cron = host.ok(RUN_CRON_LINE).await?;
    ensure!(
        cron.starts_with("cron exit "),
        "the cron line printed: {cron}"
    );
    host.ok("keepup-agent status").await?;
    stop_agent_by_hand(&host).await?;

    // Upgrade without systemd: an edited configuration is kept, and the agent accepts it.
    host.ok("echo 'rekick_every: 1m' >> /etc/keepup/agent.yaml")
        .await?;
    host.ok("dpkg -i /pkgs/keepup-agent-2.deb").await?;
    let version = host
        .ok("dpkg-query -W -f '${Version}' keepup-agent")
        .await?;
    ensure!(version == "99.0.0-1", "version after upgrade: {version}");
    host.ok("grep -qx 'rekick_every: 1m' /etc/keepup/agent.yaml")
        .await?;
    let verify = host.exec("dpkg --verify keepup-agent").await?;
    ensure!(
        verify.stdout == "??5?????? c /etc/keepup/agent.yaml\n",
        "dpkg --verify after editing the configuration: {verify:?}"
    );
    start_agent_by_hand(&host).await?;
    stop_agent_by_hand(&host).await?;

    // Remove keeps conffiles; purge removes them and the agent's state and logs.
    host.ok("dpkg -r keepup-agent").await?;
    host.ok("! test -e /usr/sbin/keepup-agent && test -f /etc/keepup/agent.yaml && test -f /etc/cron.d/keepup-agent")
        .await?;
    let cron = host.ok(RUN_CRON_LINE).await?;
    ensure!(cron.starts_with("cron exit "), "after removal: {cron}");
    host.ok("dpkg --purge keepup-agent").await?;
    host.ok("! test -e /etc/keepup/agent.yaml && ! test -e /etc/cron.d/keepup-agent && ! test -e /var/lib/keepup-agent && ! test -e /var/log/keepup")
        .await?;
    host.ok("! test -e /etc/systemd/system/multi-user.target.wants/keepup-agent.service")
        .await?;

    // rpm with its own database on the same (now clean) host.
    host.ok("rpm -i /pkgs/keepup-agent.rpm").await?;
    host.ok("test -x /usr/sbin/keepup-agent && test -f /usr/lib/systemd/system/keepup-agent.service && test -f /etc/cron.d/keepup-agent")
        .await?;
    let verify = host.exec("rpm -V keepup-agent").await?;
    ensure!(
        verify.code == 0 && verify.stdout.is_empty(),
        "rpm -V: {verify:?}"
    );
    start_agent_by_hand(&host).await?;
    stop_agent_by_hand(&host).await?;
    host.ok("echo 'rekick_every: 1m' >> /etc/keepup/agent.yaml")
        .await?;
    host.ok("rpm -U /pkgs/keepup-agent-2.rpm").await?;
    let version = host
        .ok("rpm -q --qf '%{VERSION}-%{RELEASE}' keepup-agent")
        .await?;
    ensure!(version == "99.0.0-1", "version after rpm -U: {version}");
    host.ok("grep -qx 'rekick_every: 1m' /etc/keepup/agent.yaml && ! test -e /etc/keepup/agent.yaml.rpmnew")
        .await?;
    host.ok("rpm -e keepup-agent").await?;
    host.ok("! test -e /usr/sbin/keepup-agent && ! test -e /etc/keepup/agent.yaml")
        .await?;
    Ok(())
}

/// Polls `script` on `h` until it exits 0; fails after `within` with its last output.
fn wait_for(h: &SystemdHost, script: &str, within: Duration) -> Result<String> {
    let start = Instant::now();
    loop {
        let e = h.exec(script)?;
        if e.code == 0 {
            return Ok(e.stdout);
        }
        if start.elapsed() > within {
            bail!(
                "`{script}` still fails after {within:?}: {e:?}\n{}",
                h.exec("systemctl status keepup-agent --no-pager; journalctl -u keepup-agent --no-pager | tail -20")?
                    .stdout
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn main_pid(h: &SystemdHost) -> Result<String> {
    Ok(h.ok("systemctl show -p MainPID --value keepup-agent")?
        .trim()
        .to_string())
}

#[test]
fn systemd_runs_the_agent_and_the_cron_line_restarts_it() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let v1 = agent_package(dir.path(), Format::Deb);
    let v2 = agent_package_version(dir.path(), Format::Deb, "99.0.0")?;
    let foo = example::build_example(dir.path(), "1.0.0", |t| t)?
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("the example's .deb")?;
    let h = SystemdHost::start("agent-unit")?;
    h.copy_in(&v1, "/pkgs/keepup-agent-1.deb")?;
    h.copy_in(&v2, "/pkgs/keepup-agent-2.deb")?;
    h.copy_in(&foo, "/pkgs/foo.deb")?;

    // Install: enabled and active, and the agent answers on its socket.
    h.ok("dpkg -i /pkgs/keepup-agent-1.deb")?;
    let enabled = h.ok("systemctl is-enabled keepup-agent")?;
    ensure!(enabled.trim() == "enabled", "is-enabled: {enabled}");
    wait_for(
        &h,
        "systemctl is-active --quiet keepup-agent",
        Duration::from_secs(10),
    )?;
    wait_for(&h, "keepup-agent status", Duration::from_secs(10))?;
    let kill_mode = h.ok("systemctl show -p KillMode --value keepup-agent")?;
    ensure!(kill_mode.trim() == "process", "KillMode: {kill_mode}");

    // A service the agent supervises.
    h.ok("dpkg -i /pkgs/foo.deb")?;
    wait_for(
        &h,
        "keepup-agent status | grep -E '^foo +running'",
        Duration::from_secs(15),
    )?;

    // Stopped: the cron line (run now rather than in 5 minutes) restarts it.
    h.ok("systemctl stop keepup-agent")?;
    ensure!(h.exec("systemctl is-active --quiet keepup-agent")?.code != 0);
    let cron = h.ok(RUN_CRON_LINE)?;
    ensure!(cron.trim() == "cron exit 0", "cron line: {cron}");
    wait_for(
        &h,
        "systemctl is-active --quiet keepup-agent",
        Duration::from_secs(10),
    )?;
    wait_for(&h, "keepup-agent status", Duration::from_secs(10))?;
    // Active: the cron line leaves it alone.
    let before = main_pid(&h)?;
    h.ok(RUN_CRON_LINE)?;
    ensure!(
        main_pid(&h)? == before,
        "the cron line restarted an active agent"
    );

    // Upgrade: the postinst restarts the agent into the new package, and foo comes back.
    h.ok("dpkg -i /pkgs/keepup-agent-2.deb")?;
    let version = h.ok("dpkg-query -W -f '${Version}' keepup-agent")?;
    ensure!(version == "99.0.0-1", "version after upgrade: {version}");
    wait_for(
        &h,
        "systemctl is-active --quiet keepup-agent",
        Duration::from_secs(10),
    )?;
    // The restart is queued (--no-block), so it may still be under way when dpkg returns.
    let restarted = format!(
        "pid=$(systemctl show -p MainPID --value keepup-agent); [ \"$pid\" != 0 ] && [ \"$pid\" != {before} ]"
    );
    wait_for(&h, &restarted, Duration::from_secs(20))
        .context("the upgrade did not restart the agent")?;
    wait_for(
        &h,
        "systemctl is-active --quiet keepup-agent",
        Duration::from_secs(10),
    )?;
    wait_for(
        &h,
        "keepup-agent status | grep -E '^foo +running'",
        Duration::from_secs(15),
    )?;
    let verify = h.exec("dpkg --verify keepup-agent")?;
    ensure!(verify.code == 0 && verify.stdout.is_empty(), "{verify:?}");

    // Removal stops it and disables it; purge forgets it.
    h.ok("dpkg -r keepup-agent")?;
    ensure!(h.exec("systemctl is-active --quiet keepup-agent")?.code != 0);
    ensure!(
        h.exec("pgrep -x keepup-agent")?.code != 0,
        "agent still runs after removal"
    );
    let cron = h.ok(RUN_CRON_LINE)?;
    ensure!(
        cron.trim() != "cron exit 0",
        "the cron line acted after removal: {cron}"
    );
    h.ok("dpkg --purge keepup-agent")?;
    h.ok("! test -e /etc/keepup/agent.yaml && ! test -e /var/lib/keepup-agent")?;
    Ok(())
}

/// The repository of the self-upgrade test, on the host itself.
const SELF_REPO: &str = "/srv/repo";

/// Publishes the package file `deb` into [`SELF_REPO`] and promotes it up to stable.
fn publish_to_stable(h: &SystemdHost, deb: &str) -> Result<String> {
    h.ok(&format!(
        "keepup publish --repo {SELF_REPO} {deb} && \
         keepup promote --repo {SELF_REPO} keepup-agent --to testing && \
         keepup promote --repo {SELF_REPO} keepup-agent --to stable"
    ))
}

#[test]
fn the_agent_upgrades_itself_through_its_own_updater() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let v1 = agent_package(dir.path(), Format::Deb);
    let v2 = agent_package_version(dir.path(), Format::Deb, "99.0.0")?;
    let h = SystemdHost::start("agent-self")?;
    h.copy_in(&built_bin("keepup")?, "/usr/local/bin/keepup")?;
    h.copy_in(&shared_signing_key()?, "/root/signing-key.asc")?;
    h.copy_in(&v1, "/pkgs/v1/keepup-agent.deb")?;
    h.copy_in(&v2, "/pkgs/v2/keepup-agent.deb")?;
    // The repository, served on the host's loopback, with keepup-agent v1 in stable; every
    // host follows stable.
    h.ok(&format!(
        "keepup repo init {SELF_REPO} --key /root/signing-key.asc >/dev/null && \
         keepup assign --repo {SELF_REPO} '*' --track stable && \
         systemd-run --unit keepup-serve keepup serve --repo {SELF_REPO} --listen 127.0.0.1:8080"
    ))?;
    publish_to_stable(&h, "/pkgs/v1/keepup-agent.deb")?;
    // Installed by hand, as a new host is, then pointed at the repository. dpkg's post-invoke
    // hook keeps every dpkg run going 3 s after the maintainer scripts: the postinst's restart
    // of the agent always comes while the updater's dpkg still runs.
    h.ok("dpkg -i /pkgs/v1/keepup-agent.deb")?;
    h.write(
        "/etc/keepup/agent.yaml",
        "repo: http://127.0.0.1:8080/\ntrusted_key: /etc/keepup/repository.asc\n\
         schedule: '0 0 1 1 *'\n",
    )?;
    h.ok(&format!(
        "cp {SELF_REPO}/keys/repository.asc /etc/keepup/repository.asc && \
         echo 'post-invoke=sleep 3' > /etc/dpkg/dpkg.cfg.d/zz-slow-post-invoke && \
         systemctl restart keepup-agent"
    ))?;
    wait_for(&h, "keepup-agent status", Duration::from_secs(10))?;
    let first = h.ok("keepup-agent update --now")?;
    ensure!(
        first.contains("keep keepup-agent") && first.contains("(current)"),
        "{first}"
    );
    let before = main_pid(&h)?;

    // v2 reaches stable: the agent's own pass installs it, the postinst restarts the agent,
    // and the stopping agent lets that dpkg run finish before it exits. The pass's answer may
    // be cut off by the restart, so only what follows is judged.
    publish_to_stable(&h, "/pkgs/v2/keepup-agent.deb")?;
    let pass = h.exec("keepup-agent update --now")?;
    ensure!(
        pass.code == 0
            || pass
                .stderr
                .contains("keepup-agent stopped before the pass ended"),
        "{pass:?}"
    );
    let restarted = format!(
        "pid=$(systemctl show -p MainPID --value keepup-agent); [ \"$pid\" != 0 ] && [ \"$pid\" != {before} ]"
    );
    wait_for(&h, &restarted, Duration::from_secs(30))
        .with_context(|| format!("the agent did not restart into v2; the pass said: {pass:?}"))?;
    wait_for(&h, "keepup-agent status", Duration::from_secs(15))?;
    let status = h.ok("dpkg-query -W -f '${Status} ${Version}' keepup-agent")?;
    ensure!(
        status == "install ok installed 99.0.0-1",
        "keepup-agent after its own upgrade: {status}; the pass said: {pass:?}"
    );
    let audit = h.ok("dpkg --audit")?;
    ensure!(audit.trim().is_empty(), "dpkg --audit: {audit}");
    let log = h.ok("journalctl -u keepup-agent --no-pager -o cat")?;
    for want in [
        "SIGTERM: stopping every service",
        "waiting up to 45s for the package manager",
        "the package manager finished",
    ] {
        ensure!(log.contains(want), "no `{want}` in the agent's log:\n{log}");
    }
    // The new agent finds nothing to repair and nothing to do.
    let next = h.ok("keepup-agent update --now")?;
    ensure!(
        next.contains("keep keepup-agent 99.0.0-1 (current)"),
        "{next}"
    );
    let log = h.ok("journalctl -u keepup-agent --no-pager -o cat")?;
    ensure!(!log.contains("repair"), "{log}");
    Ok(())
}

/// A stand-in `systemctl` that logs its arguments and says "enabled", and the directory that
/// tells scripts systemd runs: the .rpm scriptlets' systemd calls, on a host without systemd.
const FAKE_SYSTEMD: &str = "mkdir -p /run/systemd/system && \
     printf '#!/bin/sh\\necho \"$*\" >> /tmp/systemctl.log\\nexit 0\\n' > /usr/bin/systemctl && \
     chmod 755 /usr/bin/systemctl";

#[tokio::test]
async fn rpm_scriptlets_call_systemctl_like_the_systemd_macros() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let rpm = agent_package(dir.path(), Format::Rpm);
    let rpm2 = agent_package_version(dir.path(), Format::Rpm, "99.0.0")?;
    let net = TestNet::new()?;
    let host = Host::start(&net, "agent-rpm-systemctl").await?;
    host.copy_in(&rpm, "/pkgs/keepup-agent.rpm").await?;
    host.copy_in(&rpm2, "/pkgs/keepup-agent-2.rpm").await?;
    host.ok(FAKE_SYSTEMD).await?;
    let calls = |step: &'static str| {
        let host = &host;
        async move {
            host.ok(&format!(
                "{step} && cat /tmp/systemctl.log && rm -f /tmp/systemctl.log"
            ))
            .await
        }
    };
    let unit = "keepup-agent.service";

    // Install ($1 = 1): enable by preset, reload, start without waiting.
    let install = calls("rpm -i /pkgs/keepup-agent.rpm").await?;
    ensure!(
        install
            == format!(
                "--no-reload preset {unit}\ndaemon-reload\n--quiet is-enabled {unit}\n--no-block start {unit}\n"
            ),
        "rpm -i:\n{install}"
    );
    // Upgrade: new %post ($1 = 2) reloads; old %postun ($1 = 1) reloads and restarts.
    let upgrade = calls("rpm -U /pkgs/keepup-agent-2.rpm").await?;
    ensure!(
        upgrade == format!("daemon-reload\ndaemon-reload\n--no-block try-restart {unit}\n"),
        "rpm -U:\n{upgrade}"
    );
    // Erase: %preun ($1 = 0) disables and stops; %postun ($1 = 0) only reloads.
    let erase = calls("rpm -e keepup-agent").await?;
    ensure!(
        erase == format!("--no-reload disable --now {unit}\ndaemon-reload\n"),
        "rpm -e:\n{erase}"
    );
    Ok(())
}

/// First contact (issue 11): `keepup pack --agent --min-serials-from REPO` writes the
/// repository's serials into the shipped configuration. A new host served an older copy of
/// the repository (a replay of an old, validly signed snapshot) refuses it on its first pass,
/// says why, and installs nothing; served the current repository, it installs.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_host_pinned_by_its_package_refuses_an_old_snapshot() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("repo");
    let r = repo.to_str().context("UTF-8 path")?;
    let keepup = |args: &[&str]| output(Command::new(built_bin("keepup").unwrap()).args(args));
    keepup(&[
        "repo",
        "init",
        r,
        "--key",
        shared_signing_key()?.to_str().context("UTF-8 path")?,
        "--key-dir",
        dir.path().join("keys").to_str().context("UTF-8 path")?,
    ])?;
    keepup(&["assign", "--repo", r, "*", "--track", "stable"])?;
    // The .rpm is signed with the repository's key, as `keepup publish` requires.
    let (deb, rpm) = keepup_pack_example(
        &dir.path().join("foo"),
        "1.0.0",
        Some(&shared_signing_key()?),
        |s| s,
    )?;
    let mut publish = vec!["publish", "--repo", r];
    publish.extend([&deb, &rpm].iter().filter_map(|p| p.to_str()));
    keepup(&publish)?;
    keepup(&["promote", "--repo", r, "foo", "--to", "testing"])?;
    keepup(&["promote", "--repo", r, "foo", "--to", "stable"])?;
    // The old snapshot: foo in stable, signed and valid, but at lower serials than today's.
    let old = dir.path().join("old");
    output(Command::new("cp").arg("-a").arg(&repo).arg(&old))?;
    keepup(&["repo", "refresh", "--repo", r])?;
    let bin = stripped_agent(dir.path())?;
    let pkgs = pack_agent(
        &bin,
        &dir.path().join("pkg"),
        &["--format", "deb", "--min-serials-from", r],
    )?;
    let deb = pkgs.first().context("no .deb")?;

    let net = TestNet::new()?;
    let host = Host::start(&net, "agent-pinned").await?;
    host.copy_in(&built_bin("keepup")?, "/usr/local/bin/keepup")
        .await?;
    host.copy_in(&old, "/srv/old").await?;
    host.copy_in(&repo, "/srv/new").await?;
    host.copy_in(deb, "/pkgs/keepup-agent.deb").await?;
    host.ok("dpkg -i /pkgs/keepup-agent.deb").await?;
    let config = host.ok("cat /etc/keepup/agent.yaml").await?;
    ensure!(
        config.contains("min_serials:\n  fleet: "),
        "the shipped configuration has no min_serials:\n{config}"
    );
    host.ok(
        "cp /srv/new/keys/repository.asc /etc/keepup/repository.asc && \
         printf 'repo: http://127.0.0.1:8080/\\ntrusted_key: /etc/keepup/repository.asc\\n\
         schedule: \"0 0 1 1 *\"\\n' >>/etc/keepup/agent.yaml",
    )
    .await?;
    // The container's PID 1 (`sleep infinity`) reaps nothing: a killed server stays a
    // zombie, so wait for no *live* keepup.
    let serve = |tree: &str| {
        format!(
            "pkill -x keepup; while ps -o stat= -C keepup | grep -qv Z; do sleep 0.1; done; \
             setsid keepup serve --repo {tree} --listen 127.0.0.1:8080 --no-refresh \
             >>/var/log/serve.out 2>&1 </dev/null & \
             for i in $(seq 100); do \
               curl -fsS -o /dev/null http://127.0.0.1:8080/fleet.yaml && exit 0; sleep 0.1; \
             done; echo 'keepup serve did not answer:' >&2; cat /var/log/serve.out >&2; exit 1"
        )
    };
    host.ok(&serve("/srv/old")).await?;
    start_agent_by_hand(&host).await?;
    let pass = host.exec("keepup-agent update --now").await?;
    ensure!(
        pass.code != 0
            && pass.stdout.contains("lower than the minimum")
            && pass.stdout.contains("min_serials"),
        "the old snapshot must be refused on first contact: {pass:?}"
    );
    ensure!(
        host.exec("dpkg -s foo").await?.code != 0,
        "nothing may be installed from the old snapshot"
    );
    host.ok(&serve("/srv/new")).await?;
    let pass = host.exec("keepup-agent update --now").await?;
    ensure!(
        pass.code == 0 && host.exec("dpkg -s foo").await?.code == 0,
        "the current repository must be accepted: {pass:?}"
    );
    Ok(())
}
