//! Attacks on what the packages do as root, performed on real Debian 12 hosts: a role that
//! plants a symlink among its launch directories or in its working directory, a package that names another daemon's
//! account, and a role that forks in a loop to outrun the maintainer scripts' kill. Each test
//! performs the attack and then checks the system, not our own output alone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use keepup_tests::example;
use keepup_tests::host::{docker_or_skip, Host, TestNet};

/// Stop grace and not-sane sleep of the test builds (short, to keep the tests quick).
const GRACE_SECS: u64 = 2;

/// Replace `from` by `to` in `text`, failing loudly when the fixture no longer has `from`.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "the example spec no longer contains {from:?}; update this test"
    );
    text.replacen(from, to, 1)
}

/// Build the example at `version` into `out/dist` with short timers and `change` applied.
fn build(out: &Path, version: &str, change: impl Fn(String) -> String) -> PathBuf {
    example::build_example(out, version, |t| {
        let t = edit(
            &t,
            "not_sane_sleep: 10s",
            &format!("not_sane_sleep: {GRACE_SECS}s"),
        );
        change(edit(
            &t,
            "stop_grace: 5s",
            &format!("stop_grace: {GRACE_SECS}s"),
        ))
    })
    .unwrap();
    out.join("dist")
}

/// Start `run-foo` as root the way a supervisor would (detached, output to a log) and wait
/// for the daemon's banner.
async fn start_launch_script(host: &Host) -> Result<()> {
    host.ok("setsid /usr/sbin/run-foo >/tmp/run-foo.log 2>&1 </dev/null &")
        .await?;
    let start = Instant::now();
    loop {
        let banner = host.exec("nc -w 2 127.0.0.1 7070 </dev/null").await?;
        if banner.stdout.contains("ready") {
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

/// A new host `name` with the built `foo` 1.0.0 installed (the network lives as long as the
/// host must).
async fn host_with_foo(dist: &Path, name: &str) -> Result<(TestNet, Host)> {
    let net = TestNet::new()?;
    let host = Host::start(&net, name).await?;
    host.copy_in(&dist.join("foo_1.0.0-1_amd64.deb"), "/pkgs/foo.deb")
        .await?;
    host.ok("dpkg -i /pkgs/foo.deb").await?;
    Ok((net, host))
}

/// The role's move: as `foo`, swap its directory `dir` for a link to `target` (keeping the
/// directory as `<dir>.old`), then crash the service (every process of the role killed) so
/// that the launch script runs again.
async fn swap_for_link_and_crash(host: &Host, dir: &str, target: &str) -> Result<()> {
    host.ok(&format!(
        "setpriv --reuid=foo --regid=foo --init-groups sh -c 'mv {dir} {dir}.old && ln -s {target} {dir}'"
    ))
    .await?;
    host.ok(&format!("test -L {dir} && pkill -KILL -u foo"))
        .await?;
    host.until_empty(&procs_of("foo"), Duration::from_secs(10))
        .await
}

/// Live (non-zombie) processes of `user`: `pid stat args`.
fn procs_of(user: &str) -> String {
    format!("ps -u {user} -o pid=,stat=,args= | awk '$2 !~ /^Z/'")
}

#[tokio::test]
async fn a_symlink_planted_by_the_role_never_hands_it_a_system_directory() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dist = build(tmp.path(), "1.0.0", |t| {
        edit(
            &t,
            "    - path: /var/lib/foo\n      mode: \"0750\"\n",
            "    - path: /var/lib/foo\n      mode: \"0750\"\n    - path: /var/lib/foo/data\n      mode: \"0700\"\n",
        )
    });
    let (_net, host) = host_with_foo(&dist, "symlink-host").await?;
    start_launch_script(&host).await?;
    let data = host.ok("stat -c '%U:%G %a' /var/lib/foo/data").await?;
    ensure!(data.trim() == "foo:foo 700", "launch dir: {data}");
    let cron = host.ok("stat -c '%U:%G %a' /etc/cron.d").await?;
    ensure!(cron.trim() == "root:root 755", "before the attack: {cron}");

    // The attack: as the role, swap the inner directory for a link to /etc/cron.d, then
    // crash the service so that it is started again.
    swap_for_link_and_crash(&host, "/var/lib/foo/data", "/etc/cron.d").await?;
    let start = Instant::now();
    // Bounded: a launch script that follows the link starts the daemon in the foreground.
    let run = host.exec("timeout 30 /usr/sbin/run-foo").await?;
    let took = start.elapsed();

    let cron = host.ok("stat -c '%U:%G %a' /etc/cron.d").await?;
    ensure!(
        cron.trim() == "root:root 755",
        "the role got /etc/cron.d: {cron}\n{run:?}"
    );
    ensure!(run.code != 0, "the launch script must fail: {run:?}");
    ensure!(
        run.stdout.contains(
            "run-foo: not sane: launch directory /var/lib/foo/data: /var/lib/foo/data is a symbolic link"
        ) && run.stdout.contains("remove the link"),
        "the launch script must say why: {run:?}"
    );
    ensure!(
        took >= Duration::from_secs(GRACE_SECS),
        "not sane must sleep {GRACE_SECS}s before exiting, took {took:?}"
    );
    ensure!(
        host.exec(&procs_of("foo")).await?.stdout.trim().is_empty(),
        "the daemon must not start"
    );

    // Once the operator removes the link, the service starts again.
    host.ok("rm /var/lib/foo/data && mv /var/lib/foo/data.old /var/lib/foo/data")
        .await?;
    start_launch_script(&host).await?;
    let data = host.ok("stat -c '%U:%G %a' /var/lib/foo/data").await?;
    ensure!(data.trim() == "foo:foo 700", "after the repair: {data}");
    Ok(())
}

/// The working directories of the role's `food` processes (with the processes if there is
/// none), one line each distinct.
const DAEMON_CWD: &str = "p=$(pgrep -u foo -x food) || { ps -eo pid,user,args; exit 1; }; for i in $p; do readlink -v /proc/$i/cwd; done | sort -u";

/// `launch.workdir` is entered as root before the launch script drops to the role: a role
/// that owns a component of it swaps that for a link (here to `/etc`), crashes its service,
/// and would get its daemon started with a working directory of the link's choosing.
#[tokio::test]
async fn a_symlinked_workdir_is_refused() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dist = build(tmp.path(), "1.0.0", |t| {
        edit(
            &t,
            "workdir: /var/lib/foo\n",
            "workdir: /var/lib/foo/work\n",
        )
    });
    let (_net, host) = host_with_foo(&dist, "workdir-host").await?;
    // The role's own directory, inside its launch directory /var/lib/foo (which the launch
    // script makes on its first start: here by hand, as it would).
    host.ok("install -d -o foo -g foo -m 0750 /var/lib/foo && setpriv --reuid=foo --regid=foo --init-groups mkdir /var/lib/foo/work")
        .await?;
    start_launch_script(&host).await?;
    let cwd = host.ok(DAEMON_CWD).await?;
    ensure!(cwd.trim() == "/var/lib/foo/work", "daemon's cwd: {cwd}");

    // The attack: as the role, swap the directory for a link to /etc, then crash the service.
    swap_for_link_and_crash(&host, "/var/lib/foo/work", "/etc").await?;
    // Bounded: a launch script that follows the link starts the daemon in the foreground.
    let run = host.exec("timeout 30 /usr/sbin/run-foo").await?;
    ensure!(
        run.code != 0 && run.code != 124,
        "the launch script must refuse, not run the daemon: {run:?}"
    );
    ensure!(
        run.stdout.contains(
            "run-foo: not sane: working directory /var/lib/foo/work: a component is a symbolic link (it leads to /etc)"
        ) && run.stdout.contains("remove the link"),
        "the launch script must say why: {run:?}"
    );
    ensure!(
        host.exec(&procs_of("foo")).await?.stdout.trim().is_empty(),
        "the daemon must not start"
    );

    // Once the operator removes the link, the service starts again, in its directory.
    host.ok("rm /var/lib/foo/work && mv /var/lib/foo/work.old /var/lib/foo/work")
        .await?;
    start_launch_script(&host).await?;
    let cwd = host.ok(DAEMON_CWD).await?;
    ensure!(cwd.trim() == "/var/lib/foo/work", "after the repair: {cwd}");
    Ok(())
}

/// Build `foo` with `role: postgres` (and `adopt`), or another package `bar` with it.
fn build_postgres_role(out: &Path, name: &str, adopt: bool) -> PathBuf {
    build(out, "1.0.0", |t| {
        let mut t = edit(&t, "role: foo\n", "role: postgres\n");
        if adopt {
            t = edit(&t, "role: postgres\n", "role: postgres\nrole_adopt: true\n");
        }
        if name != "foo" {
            t = edit(&t, "name: foo\n", &format!("name: {name}\n"));
        }
        t
    })
}

/// Everything an install could change besides the package database.
const SNAPSHOT: &str = "md5sum /etc/passwd /etc/group /etc/shadow; ls -la /var/lib/keepup/roles 2>&1; dpkg-statoverride --list; true";

#[tokio::test]
async fn a_package_cannot_take_over_another_daemons_account() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let plain = build_postgres_role(&tmp.path().join("plain"), "foo", false);
    let adopt = build_postgres_role(&tmp.path().join("adopt"), "foo", true);
    let bar = build_postgres_role(&tmp.path().join("bar"), "bar", false);
    let legacy = build(&tmp.path().join("legacy"), "1.0.0", |t| t);
    let net = TestNet::new()?;
    let host = Host::start(&net, "takeover-host").await?;
    for (dist, file, to) in [
        (&plain, "foo_1.0.0-1_amd64.deb", "/pkgs/plain.deb"),
        (&plain, "foo-1.0.0-1.x86_64.rpm", "/pkgs/plain.rpm"),
        (&adopt, "foo_1.0.0-1_amd64.deb", "/pkgs/adopt.deb"),
        (&bar, "bar_1.0.0-1_amd64.deb", "/pkgs/bar.deb"),
        (&legacy, "foo_1.0.0-1_amd64.deb", "/pkgs/legacy.deb"),
    ] {
        host.copy_in(&dist.join(file), to).await?;
    }

    // A running postgres: its account exists, keepup did not make it.
    host.ok(
        "useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/sh postgres",
    )
    .await?;
    host.ok("setsid su postgres -s /bin/sh -c 'exec sleep 600' </dev/null >/dev/null 2>&1 &")
        .await?;
    let postgres = "pgrep -u postgres -x sleep";
    host.ok(postgres).await?;
    let pid = host.ok(postgres).await?;
    let before = host.ok(SNAPSHOT).await?;

    // dpkg: refused by preinst, with a message that says what to do; nothing changed.
    let out = host.exec("dpkg -i /pkgs/plain.deb").await?;
    ensure!(
        out.code != 0,
        "installing role: postgres must fail: {out:?}"
    );
    ensure!(
        out.stderr.contains(
            "foo: the account postgres already exists and keepup did not create it for package foo"
        ) && out.stderr.contains("set role_adopt: true"),
        "dpkg must show why: {out:?}"
    );
    let status = host
        .exec("dpkg-query -W -f='${db:Status-Status}' foo")
        .await?;
    ensure!(
        status.code != 0 || status.stdout.trim() == "not-installed",
        "foo must not be installed: {status:?}"
    );
    // The scripts started no delayed killer, and postgres still runs.
    host.ok("! pgrep -f '[k]eepup-kill'").await?;
    ensure!(
        host.ok(postgres).await? == pid,
        "postgres was killed or restarted"
    );
    ensure!(
        host.ok(SNAPSHOT).await? == before,
        "a refused install changed the system"
    );

    // rpm: the same refusal from %pre.
    let out = host.exec("rpm -i /pkgs/plain.rpm").await?;
    ensure!(out.code != 0, "rpm -i of role: postgres must fail: {out:?}");
    ensure!(
        out.stderr.contains("the account postgres already exists"),
        "rpm must show why: {out:?}"
    );
    host.ok("! rpm -q foo && ! pgrep -f '[k]eepup-kill'")
        .await?;
    ensure!(host.ok(postgres).await? == pid, "rpm killed postgres");
    ensure!(
        host.ok(SNAPSHOT).await? == before,
        "a refused rpm install changed the system"
    );

    // The operator adopts the account explicitly: it installs, and the registry says so.
    host.ok("dpkg -i /pkgs/adopt.deb").await?;
    let reg = host
        .ok("stat -c '%U:%G %a %F' /var/lib/keepup/roles /var/lib/keepup/roles/postgres; cat /var/lib/keepup/roles/postgres")
        .await?;
    ensure!(
        reg == "root:root 755 directory\nroot:root 644 regular file\nfoo\nadopted\n",
        "registry after adopting: {reg}"
    );

    // A second package claiming the same role is refused, naming the owner.
    let out = host.exec("dpkg -i /pkgs/bar.deb").await?;
    ensure!(
        out.code != 0,
        "a second package on the role must fail: {out:?}"
    );
    ensure!(
        out.stderr.contains(
            "the role account postgres belongs to the keepup service foo (/var/lib/keepup/roles/postgres)"
        ),
        "{out:?}"
    );
    host.ok("! dpkg -s bar >/dev/null 2>&1 || dpkg -s bar | grep -q 'not-installed'")
        .await?;

    // An account made by keepup before the registry (its GECOS mark) is adopted and registered.
    host.ok("dpkg -r foo").await?;
    host.ok("useradd --system --user-group --home-dir /nonexistent --shell /usr/sbin/nologin --comment 'foo service (keepup)' foo")
        .await?;
    host.ok("dpkg -i /pkgs/legacy.deb").await?;
    let reg = host.ok("cat /var/lib/keepup/roles/foo").await?;
    ensure!(reg == "foo\n", "legacy registry: {reg:?}");
    // ...and reinstalling it keeps working (the registry says it is foo's).
    host.ok("dpkg -i /pkgs/legacy.deb").await?;
    Ok(())
}

/// A fork loop as the role that ignores TERM (children inherit the ignored TERM). It forks a
/// new long-lived child every 10 ms, so processes keep appearing after any snapshot of the
/// role's processes; RLIMIT_NPROC (`ulimit -p` in dash) caps it at 1000 processes so that the
/// shared test machine stays usable (an uncapped loop exhausts the kernel's limits, and a
/// capped loop that never pauses stops forking once full, which no longer tests anything).
const FORK_LOOP: &str = "setsid setpriv --reuid=foo --regid=foo --init-groups sh -c 'ulimit -p 1000; trap \"\" TERM; while :; do sleep 100 & sleep 0.01; done' >/dev/null 2>&1 </dev/null &";

/// Start the fork loop and wait until it has forked (a few processes of the role).
async fn start_fork_loop(host: &Host) -> Result<()> {
    host.ok(FORK_LOOP).await?;
    let start = Instant::now();
    loop {
        let n = host.ok("pgrep -u foo | wc -l").await?;
        if n.trim().parse::<u32>()? >= 20 {
            return Ok(());
        }
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "the fork loop did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Run `cmd` (a package manager run) with the fork loop going; it must not wait for the grace
/// and, within the grace plus a margin, no process of the role may be left.
async fn outrun(host: &Host, cmd: &str) -> Result<()> {
    start_fork_loop(host).await?;
    let start = Instant::now();
    host.ok(cmd).await?;
    ensure!(
        start.elapsed() < Duration::from_secs(GRACE_SECS + 10),
        "{cmd} blocked for {:?}",
        start.elapsed()
    );
    host.until_empty(&procs_of("foo"), Duration::from_secs(GRACE_SECS + 20))
        .await
}

#[tokio::test]
async fn a_fork_loop_cannot_outrun_the_maintainer_scripts() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dist = build(tmp.path(), "1.0.0", |t| t);
    build(tmp.path(), "1.1.0", |t| t);
    let net = TestNet::new()?;
    let host = Host::start(&net, "forkloop-host").await?;
    for f in [
        "foo_1.0.0-1_amd64.deb",
        "foo_1.1.0-1_amd64.deb",
        "foo-1.0.0-1.x86_64.rpm",
        "foo-1.1.0-1.x86_64.rpm",
    ] {
        host.copy_in(&dist.join(f), &format!("/pkgs/{f}")).await?;
    }
    // No agent runs here: the scripts alone must do it.
    host.ok("dpkg -i /pkgs/foo_1.0.0-1_amd64.deb").await?;
    outrun(&host, "dpkg -i /pkgs/foo_1.1.0-1_amd64.deb").await?;
    outrun(&host, "dpkg -r foo").await?;
    host.ok("rpm -i /pkgs/foo-1.0.0-1.x86_64.rpm").await?;
    outrun(&host, "rpm -U /pkgs/foo-1.1.0-1.x86_64.rpm").await?;
    outrun(&host, "rpm -e foo").await?;
    Ok(())
}
