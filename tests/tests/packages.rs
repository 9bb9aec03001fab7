//! The example service's packages on real Debian 12 hosts: install creates the role and
//! files, `run-foo` runs the daemon as the role, the not-sane path prints, sleeps and fails,
//! an upgrade kills the role's processes started before it, removal leaves no role process,
//! and `dpkg --verify` / `rpm -V` are clean. The same cycle runs with dpkg and with Debian's rpm.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use keepup_tests::example;
use keepup_tests::host::{docker_or_skip, Host, TestNet};

/// Stop grace and not-sane sleep used by the test builds (short, to keep the tests quick).
const GRACE_SECS: u64 = 2;

/// Build the example at `version` with short timers (quick tests).
fn build_example(out: &Path, version: &str, edit: impl Fn(String) -> String) -> Vec<PathBuf> {
    example::build_example(out, version, |t| {
        edit(
            t.replace(
                "not_sane_sleep: 10s",
                &format!("not_sane_sleep: {GRACE_SECS}s"),
            )
            .replace("stop_grace: 5s", &format!("stop_grace: {GRACE_SECS}s")),
        )
    })
    .unwrap()
}

/// Live (non-zombie) processes of the role: `user pid stat args`.
const ROLE_PROCS: &str = "ps -u foo -o user=,pid=,stat=,args= | awk '$3 !~ /^Z/'";

/// Start the launch script the way a supervisor would, detached, output to a log.
async fn start_launch_script(host: &Host) -> Result<()> {
    host.ok("setsid /usr/sbin/run-foo >/tmp/run-foo.log 2>&1 </dev/null &")
        .await?;
    let start = Instant::now();
    loop {
        if host
            .exec("nc -w 2 127.0.0.1 7070 </dev/null")
            .await?
            .stdout
            .contains("ready")
        {
            return Ok(());
        }
        ensure!(
            start.elapsed() < Duration::from_secs(15),
            "food never served its banner:\n{}",
            host.ok("cat /tmp/run-foo.log; ps -ef").await?
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Cycle {
    install: &'static str,
    upgrade: &'static str,
    remove: &'static str,
    verify: &'static str,
    v1: &'static str,
    v2: &'static str,
}

const DEB: Cycle = Cycle {
    install: "dpkg -i /pkgs/foo_1.0.0-1_amd64.deb",
    upgrade: "dpkg -i /pkgs/foo_1.1.0-1_amd64.deb",
    remove: "dpkg -r foo",
    verify: "dpkg --verify foo",
    v1: "foo_1.0.0-1_amd64.deb",
    v2: "foo_1.1.0-1_amd64.deb",
};

// Debian's rpm has its own, empty database; the packages require nothing but rpmlib
// features, so plain `rpm -i` works there without --nodeps.
const RPM: Cycle = Cycle {
    install: "rpm -i /pkgs/foo-1.0.0-1.x86_64.rpm",
    upgrade: "rpm -U /pkgs/foo-1.1.0-1.x86_64.rpm",
    remove: "rpm -e foo",
    verify: "rpm -V foo",
    v1: "foo-1.0.0-1.x86_64.rpm",
    v2: "foo-1.1.0-1.x86_64.rpm",
};

async fn full_cycle(host: &Host, dist: &Path, c: &Cycle) -> Result<()> {
    host.copy_in(&dist.join(c.v1), &format!("/pkgs/{}", c.v1))
        .await?;
    host.copy_in(&dist.join(c.v2), &format!("/pkgs/{}", c.v2))
        .await?;

    // Install: role user and files.
    ensure!(
        host.exec("getent passwd foo").await?.code != 0,
        "role must not exist before install"
    );
    host.ok(c.install).await?;
    let pw = host.ok("getent passwd foo").await?;
    let uid: u32 = pw.split(':').nth(2).unwrap().parse()?;
    ensure!(uid < 1000, "role should be a system user, got {pw}");
    ensure!(
        pw.trim_end().ends_with(":/nonexistent:/usr/sbin/nologin"),
        "{pw}"
    );
    host.ok("test -x /usr/bin/food && test -x /usr/sbin/run-foo && test -f /etc/foo/foo.conf && test -f /usr/lib/keepup/services/foo.yaml").await?;
    let secret = host.ok("stat -c '%U %G %a' /etc/foo/secret.conf").await?;
    ensure!(
        secret.trim() == "foo foo 640",
        "owner/group/mode of /etc/foo/secret.conf: {secret}"
    );
    let verify = host.exec(c.verify).await?;
    ensure!(
        verify.code == 0 && verify.stdout.trim().is_empty(),
        "{} not clean: {verify:?}",
        c.verify
    );

    // run-foo makes the environment sane and execs the daemon as the role.
    start_launch_script(host).await?;
    let procs = host.ok(ROLE_PROCS).await?;
    ensure!(
        procs.lines().any(
            |l| l.starts_with("foo ") && l.contains("/usr/bin/food --config /etc/foo/foo.conf")
        ),
        "food should run as foo:\n{procs}"
    );
    ensure!(
        !procs.contains("run-foo") && !procs.contains("setpriv"),
        "run-foo must exec the daemon, leaving no wrapper:\n{procs}"
    );
    let state = host.ok("stat -c '%U %G %a' /var/lib/foo").await?;
    ensure!(state.trim() == "foo foo 750", "launch dir: {state}");
    let env = host
        .ok("tr '\\0' '\\n' < /proc/$(pgrep -u foo -x food)/environ | sort")
        .await?;
    ensure!(
        env.contains("FOO_STATE_DIR=/var/lib/foo")
            && env.contains("USER=foo")
            && !env.contains("SUDO"),
        "daemon env:\n{env}"
    );

    // Not sane: a required file is missing -> says why on stdout, sleeps, exits non-zero.
    host.ok("mv /etc/foo/foo.conf /tmp/foo.conf.saved").await?;
    let t = Instant::now();
    let ns = host.exec("/usr/sbin/run-foo").await?;
    let slept = t.elapsed();
    host.ok("mv /tmp/foo.conf.saved /etc/foo/foo.conf").await?;
    ensure!(ns.code != 0, "not-sane run must fail: {ns:?}");
    ensure!(
        ns.stdout
            .contains("not sane: required file /etc/foo/foo.conf is missing"),
        "{ns:?}"
    );
    ensure!(
        slept >= Duration::from_secs(GRACE_SECS),
        "not-sane run must sleep {GRACE_SECS}s first, took {slept:?}"
    );

    // Upgrade: a role process started before the upgrade is killed, even one ignoring TERM;
    // the package manager is not held up by the grace period.
    host.ok("setsid setpriv --reuid=foo --regid=foo --init-groups sh -c 'trap \"\" TERM; exec sleep 1000' >/dev/null 2>&1 </dev/null &").await?;
    let before = host.ok("pgrep -u foo | sort").await?;
    ensure!(
        before.lines().count() >= 2,
        "expected food and the TERM-ignoring sleep:\n{before}"
    );
    let t = Instant::now();
    host.ok(c.upgrade).await?;
    ensure!(
        t.elapsed() < Duration::from_secs(GRACE_SECS + 10),
        "upgrade blocked for {:?}",
        t.elapsed()
    );
    host.until_empty(ROLE_PROCS, Duration::from_secs(GRACE_SECS + 5))
        .await?;
    host.ok("grep -qx 'version: 1.1.0-1' /usr/lib/keepup/services/foo.yaml")
        .await?;
    let verify = host.exec(c.verify).await?;
    ensure!(
        verify.code == 0 && verify.stdout.trim().is_empty(),
        "{} after upgrade: {verify:?}",
        c.verify
    );

    // The new version runs; removal stops it and leaves no role process.
    start_launch_script(host).await?;
    host.ok(c.remove).await?;
    host.ok("! test -e /usr/bin/food && ! test -e /usr/sbin/run-foo && ! test -e /usr/lib/keepup/services/foo.yaml").await?;
    host.until_empty(ROLE_PROCS, Duration::from_secs(GRACE_SECS + 5))
        .await?;
    Ok(())
}

/// Build versions 1.0.0 and 1.1.0, start a fresh host and run the whole cycle on it.
async fn cycle_on_fresh_host(name: &str, c: &Cycle) -> Result<(Host, TestNet)> {
    let tmp = tempfile::tempdir()?;
    // A secret readable by the role only: a payload file with a non-root owner.
    let secret = |t: String| {
        t.replace(
            "    dst: /etc/foo/foo.conf\n",
            "    dst: /etc/foo/foo.conf\n  - src: foo.conf\n    dst: /etc/foo/secret.conf\n    owner: foo\n    group: foo\n    mode: \"0640\"\n",
        )
    };
    build_example(tmp.path(), "1.0.0", secret);
    build_example(tmp.path(), "1.1.0", secret);
    let net = TestNet::new()?;
    let host = Host::start(&net, name).await?;
    full_cycle(&host, &tmp.path().join("dist"), c).await?;
    Ok((host, net))
}

#[tokio::test]
async fn deb_install_run_upgrade_remove_cycle() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let (host, _net) = cycle_on_fresh_host("deb-host", &DEB).await?;
    // Conffiles stay after remove, as Debian policy wants; purge removes them.
    host.ok("test -f /etc/foo/foo.conf && dpkg --purge foo && ! test -e /etc/foo/foo.conf")
        .await?;
    Ok(())
}

#[tokio::test]
async fn rpm_install_run_upgrade_remove_cycle() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    cycle_on_fresh_host("rpm-host", &RPM).await?;
    Ok(())
}

#[tokio::test]
async fn shell_metacharacters_in_spec_values_stay_literal() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let nasty =
        r#"x'$(touch /tmp/pwned1)`touch /tmp/pwned2`;touch /tmp/pwned3 "q" \ & | > < ready"#;
    let yaml_nasty = serde_json_string(nasty);
    let tmp = tempfile::tempdir()?;
    build_example(tmp.path(), "1.0.0", |t| {
        t.replace(
            "  exec: [/usr/bin/food, --config, /etc/foo/foo.conf]",
            &format!(
                "  exec: [/usr/bin/food, --config, /etc/foo/foo.conf, --banner, {yaml_nasty}]"
            ),
        )
        .replace(
            "    FOO_STATE_DIR: /var/lib/foo",
            &format!("    FOO_STATE_DIR: /var/lib/foo\n    WEIRD: {yaml_nasty}"),
        )
        .replace(
            "    - path: /var/lib/foo\n",
            &format!(
                "    - path: /var/lib/foo\n    - path: {}\n",
                serde_json_string(&format!("/var/lib/foo/{}", nasty.replace('/', "_")))
            ),
        )
        .replace(
            "summary: Example daemon kept running by keepup",
            "summary: \"Example $(touch /tmp/pwned4) daemon\"",
        )
    });
    let dist = tmp.path().join("dist");
    let net = TestNet::new()?;
    let host = Host::start(&net, "quote-host").await?;
    host.copy_in(&dist.join(DEB.v1), "/pkgs/foo.deb").await?;
    host.ok("dpkg -i /pkgs/foo.deb").await?;
    start_launch_script(&host).await?;
    let banner = host.ok("nc -w 2 127.0.0.1 7070 </dev/null").await?;
    ensure!(
        banner.trim_end() == nasty,
        "banner should be the literal value:\n{banner}"
    );
    let env = host
        .ok("tr '\\0' '\\n' < /proc/$(pgrep -u foo -x food)/environ")
        .await?;
    ensure!(
        env.lines().any(|l| l == format!("WEIRD={nasty}")),
        "env should carry the literal value:\n{env}"
    );
    host.ok("ls -d /var/lib/foo/x*").await?;
    host.ok("dpkg -r foo").await?;
    let pwned = host.exec("ls /tmp/pwned* 2>/dev/null").await?;
    ensure!(
        pwned.stdout.trim().is_empty(),
        "a spec value ran as shell: {}",
        pwned.stdout
    );
    Ok(())
}

/// A YAML double-quoted scalar (JSON string syntax is valid YAML).
fn serde_json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
