//! `supervisor: runit` and `supervisor: supervisord` on real Debian 12 hosts with Debian's own
//! `runit`, `runit-helper` and `supervisor` packages: the host's supervisor runs the example
//! service from its package, keepup-agent probes it, kills the role on a hang (the supervisor
//! starts it again), re-kicks what gave up, and maps `down`/`up` to the supervisor; upgrades
//! restart it on the new bits and removal takes it away. The .deb and the .rpm of each go
//! through the same cycle (`dpkg -i/-r/--purge`, `rpm -i/-U/-e`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keepup_tests::agent_host::{
    setup, start_agent, status, wait_banner, wait_banner_from, wait_status, Setup, ROLE_PROCS,
};
use keepup_tests::example;
use keepup_tests::host::{docker_or_skip, Host};
use keepup_tests::testkit::{quick, with_flags};

/// The example as `kind`, probed every second (3 failures), `count: 3`; `flags` for food.
fn as_kind(kind: &'static str, flags: &'static [&'static str]) -> impl Fn(String) -> String {
    move |t: String| {
        with_flags(t, flags)
            .replace("kind: agent", &format!("kind: {kind}"))
            .replace("count: 10", "count: 3")
    }
}

/// Builds the example at `version` with `edit` (plus the test timers) and copies its .deb
/// and .rpm in as `/pkgs/foo-<version>.deb` and `.rpm`.
async fn copy_version(s: &Setup, version: &str, edit: impl Fn(String) -> String) -> Result<()> {
    let files = example::build_example(s.dir(), version, |t| edit(quick(t)))?;
    for ext in ["deb", "rpm"] {
        let f: &PathBuf = files
            .iter()
            .find(|f| f.extension().is_some_and(|e| e == ext))
            .with_context(|| format!("no .{ext} built"))?;
        s.host
            .copy_in(f, &format!("/pkgs/foo-{version}.{ext}"))
            .await?;
    }
    Ok(())
}

/// The pid of the food process that runs as the role, once exactly one does.
async fn food_pid(h: &Host) -> Result<Option<u32>> {
    let out = h
        .ok("ps -u foo -o pid=,stat=,comm= | awk '$2 !~ /^Z/ && $3 == \"food\" {print $1}'")
        .await?;
    let pids: Vec<u32> = out
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    Ok((pids.len() == 1).then(|| pids[0]))
}

/// The name of the parent process of `pid`.
async fn parent_of(h: &Host, pid: u32) -> Result<String> {
    Ok(h.ok(&format!("ps -o comm= -p $(ps -o ppid= -p {pid})"))
        .await?
        .trim()
        .to_string())
}

/// Polls `script` until its output satisfies `ok`, or fails after `within` with `debug`'s
/// output.
async fn wait_for(
    h: &Host,
    what: &str,
    script: &str,
    within: Duration,
    ok: impl Fn(&str) -> bool,
    debug: &str,
) -> Result<String> {
    let start = Instant::now();
    loop {
        let out = h.exec(script).await?;
        let text = format!("{}{}", out.stdout, out.stderr);
        if ok(&text) {
            return Ok(text);
        }
        if start.elapsed() > within {
            bail!(
                "after {within:?}, still waiting for {what}; `{script}` says:\n{text}\n---\n{}",
                h.exec(debug).await?.stdout
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One format's package commands, for the same cycle on the .deb and the .rpm.
struct Cycle {
    install: &'static str,
    upgrade: &'static str,
    remove: &'static str,
}

const DEB: Cycle = Cycle {
    install: "dpkg -i /pkgs/foo.deb",
    upgrade: "dpkg -i /pkgs/foo-1.0.1.deb",
    remove: "dpkg -r foo",
};

/// rpm's database does not know dpkg's runit and supervisor: `--nodeps`.
const RPM: Cycle = Cycle {
    install: "rpm --initdb && rpm -i --nodeps /pkgs/foo-1.0.0.rpm",
    upgrade: "rpm -U --nodeps /pkgs/foo-1.0.1.rpm",
    remove: "rpm -e --nodeps foo",
};

/// Stops the agent and waits until it is gone.
async fn stop_agent(h: &Host) -> Result<()> {
    h.ok("pkill -x keepup-agent; while pgrep -x keepup-agent >/dev/null; do sleep 0.1; done")
        .await?;
    Ok(())
}

/// SIGSTOPs food `pid`: the agent's probes fail, it kills the role, and `parent` (the host's
/// supervisor) starts a new food.
async fn hang_is_killed_and_restarted_by(h: &Host, pid: u32, parent: &str) -> Result<()> {
    h.ok(&format!("kill -STOP {pid}")).await?;
    let (new, _) = wait_banner_from(h, Duration::from_secs(30), Some(pid)).await?;
    ensure!(
        parent_of(h, new).await? == parent,
        "not restarted by {parent}"
    );
    let log = h.ok("cat /var/log/keepup/foo.log").await?;
    ensure!(log.contains("killing role foo"), "{log}");
    ensure!(
        !h.ok(ROLE_PROCS).await?.contains(&format!("{pid} ")),
        "the hung daemon survived"
    );
    Ok(())
}

/// Waits until the upgraded package's daemon answers.
async fn new_bits_answer(h: &Host, debug: &str) -> Result<()> {
    wait_for(
        h,
        "the new version's banner",
        "nc -w 2 127.0.0.1 7070 </dev/null",
        Duration::from_secs(20),
        |t| t.contains("food v2 ready"),
        debug,
    )
    .await?;
    Ok(())
}

/// After removal: no role process, and nothing starts it again; then the agent stops.
async fn gone_for_good(h: &Host) -> Result<()> {
    h.until_empty(ROLE_PROCS, Duration::from_secs(15)).await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    ensure!(
        h.ok(ROLE_PROCS).await?.trim().is_empty(),
        "started again after removal"
    );
    stop_agent(h).await
}

const RUNIT_DEBUG: &str = "sv status /etc/sv/foo; ls -la /etc/service/ /etc/sv/foo; tail -n 20 /var/log/foo/current; tail -n 30 /var/log/keepup/foo.log; ps -ef";

/// Starts runsvdir on /etc/service, as Debian's runit does at boot.
async fn start_runsvdir(h: &Host) -> Result<()> {
    h.ok("test -d /etc/service && setsid runsvdir -P /etc/service </dev/null >/dev/null 2>&1 &")
        .await?;
    Ok(())
}

/// The runit cycle with one format's install, upgrade and removal commands.
async fn runit_cycle(s: &Setup, c: &Cycle) -> Result<()> {
    let h = &s.host;
    h.ok(c.install).await?;
    // runsvdir sees the new service within 5 s; runsv starts it as the role.
    let pid = wait_food(h, Duration::from_secs(20)).await?;
    ensure!(
        parent_of(h, pid).await? == "runsv",
        "food {pid} is not runsv's child:\n{}",
        h.ok("ps -ef").await?
    );
    let sv = h.ok("sv status /etc/sv/foo").await?;
    ensure!(sv.starts_with("run: /etc/sv/foo"), "{sv}");
    // svlogd writes its output into /var/log/foo, as _runit-log.
    wait_for(
        h,
        "svlogd's log",
        "cat /var/log/foo/current",
        Duration::from_secs(10),
        |t| t.contains("serving banner"),
        RUNIT_DEBUG,
    )
    .await?;
    let owner = h.ok("stat -c '%U %a' /var/log/foo").await?;
    ensure!(owner.trim() == "_runit-log 750", "log dir: {owner}");
    // The attack: the role holds the log directory (say the spec made it the role's) and
    // plants `current` -> /etc/shadow. The restarted log/run refuses the directory, so no
    // svlogd ever writes through the link.
    h.ok("cp -p /etc/shadow /tmp/shadow.before && sv down /etc/sv/foo/log && chown foo /var/log/foo \
          && rm -f /var/log/foo/current && su -s /bin/sh foo -c 'ln -s /etc/shadow /var/log/foo/current' \
          && sv up /etc/sv/foo/log")
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    h.ok("cmp /etc/shadow /tmp/shadow.before").await?;
    let svlogd = h.ok("ps -o args= -C svlogd || true").await?;
    ensure!(
        !svlogd.contains("/var/log/foo"),
        "svlogd runs in the role's directory: {svlogd}"
    );
    h.ok("rm /var/log/foo/current && chown _runit-log /var/log/foo")
        .await?;

    start_agent(h).await?;
    let svc = wait_status(h, "runit's service running", Duration::from_secs(15), |s| {
        s.as_ref().is_some_and(|s| s.state == "running")
    })
    .await?
    .context("foo not listed")?;
    let json = h.ok("keepup-agent status --json").await?;
    ensure!(json.contains("\"supervisor\": \"runit\""), "{json}");
    eprintln!("runit: {svc:?}");

    // A hang: the agent's probes fail, it kills the role, runsv starts it again.
    hang_is_killed_and_restarted_by(h, pid, "runsv").await?;
    wait_status(h, "a restart counted", Duration::from_secs(15), |s| {
        s.as_ref().is_some_and(|s| s.restarts >= 1)
    })
    .await?;

    // down: sv down + the mark; it survives an agent restart; up brings it back.
    let out = h.ok("keepup-agent down foo").await?;
    ensure!(out.contains("down"), "{out}");
    h.until_empty(ROLE_PROCS, Duration::from_secs(10)).await?;
    let sv = h.ok("sv status /etc/sv/foo").await?;
    ensure!(sv.starts_with("down: /etc/sv/foo"), "{sv}");
    stop_agent(h).await?;
    // Behind the agent's back (as a reboot would): runsv is told to start it again.
    h.ok("sv up /etc/sv/foo").await?;
    start_agent(h).await?;
    h.until_empty(ROLE_PROCS, Duration::from_secs(10)).await?;
    let svc = status(h, "foo").await?.context("foo not listed")?;
    ensure!(svc.state == "down", "{svc:?}");
    h.ok("keepup-agent up foo").await?;
    wait_food(h, Duration::from_secs(15)).await?;

    // An admin's down file is respected: a re-kick leaves the service down, and nothing
    // deletes the file.
    h.ok("touch /etc/sv/foo/down && sv down /etc/sv/foo")
        .await?;
    h.until_empty(ROLE_PROCS, Duration::from_secs(10)).await?;
    wait_status(h, "down (the admin's file)", Duration::from_secs(15), |s| {
        s.as_ref().is_some_and(|s| s.state == "down")
    })
    .await?;
    h.ok("keepup-agent rekick foo").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        h.ok(ROLE_PROCS).await?.trim().is_empty(),
        "re-kicked despite the down file"
    );

    // An upgrade (the down file stays, as the admin left it): the new bits run once the admin
    // starts it.
    h.ok(c.upgrade).await?;
    h.ok("test -f /etc/sv/foo/down").await?;
    h.ok("rm /etc/sv/foo/down && sv up /etc/sv/foo").await?;
    new_bits_answer(h, RUNIT_DEBUG).await?;

    // Removal: the service leaves runit and no role process is left.
    h.ok(c.remove).await?;
    h.until_empty(ROLE_PROCS, Duration::from_secs(15)).await?;
    h.ok("test ! -e /etc/service/foo").await?;
    let sv = h.exec("sv status /etc/sv/foo").await?;
    ensure!(sv.code != 0 || !sv.stdout.starts_with("run:"), "{sv:?}");
    // Nothing starts it again (runsv is gone, the agent dropped it).
    gone_for_good(h).await
}

/// Waits until food answers as the role; returns its pid.
async fn wait_food(h: &Host, within: Duration) -> Result<u32> {
    let pid = wait_banner(h, within).await?;
    food_pid(h).await?.context("food not running as foo")?;
    Ok(pid)
}

#[tokio::test(flavor = "multi_thread")]
async fn runit_runs_it_and_the_agent_probes_kills_and_maps_down_up() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let s = setup("foreign-runit", as_kind("runit", &[]), "rekick_every: 5s").await?;
    copy_version(
        &s,
        "1.0.1",
        as_kind("runit", &["--banner", "food v2 ready"]),
    )
    .await?;
    copy_version(&s, "1.0.0", as_kind("runit", &[])).await?;
    let h = &s.host;
    start_runsvdir(h).await?;
    runit_cycle(&s, &DEB).await?;
    // Debian keeps conffiles until purge; purge takes the service directory away.
    h.ok("test -f /etc/sv/foo/run").await?;
    h.ok("dpkg --purge foo && test ! -e /etc/sv/foo").await?;

    // The .rpm through the same cycle.
    h.ok("rm -rf /var/log/foo /var/log/keepup/foo.log").await?;
    runit_cycle(&s, &RPM).await?;
    h.ok("test ! -e /etc/sv/foo/run").await?;
    Ok(())
}

const SUPERVISORD_DEBUG: &str = "supervisorctl status; ls -la /etc/supervisor/conf.d/; tail -n 20 /var/log/supervisor/foo.log; tail -n 30 /var/log/supervisor/supervisord.log; tail -n 30 /var/log/keepup/foo.log; ps -ef";

/// `supervisorctl status foo`.
async fn program(h: &Host) -> Result<String> {
    Ok(h.exec("supervisorctl status foo").await?.stdout)
}

/// The supervisord cycle with one format's install, upgrade and removal commands.
async fn supervisord_cycle(s: &Setup, c: &Cycle) -> Result<()> {
    let h = &s.host;
    h.ok(c.install).await?;
    let st = wait_for(
        h,
        "RUNNING",
        "supervisorctl status foo",
        Duration::from_secs(20),
        |t| t.contains("RUNNING"),
        SUPERVISORD_DEBUG,
    )
    .await?;
    let pid = wait_food(h, Duration::from_secs(10)).await?;
    ensure!(
        parent_of(h, pid).await? == "supervisord",
        "food {pid} is not supervisord's child: {st}\n{}",
        h.ok("ps -ef").await?
    );
    start_agent(h).await?;
    wait_status(
        h,
        "supervisord's program running",
        Duration::from_secs(15),
        |s| s.as_ref().is_some_and(|s| s.state == "running"),
    )
    .await?;
    let json = h.ok("keepup-agent status --json").await?;
    ensure!(json.contains("\"supervisor\": \"supervisord\""), "{json}");

    // A hang is killed by the probes; supervisord starts it again.
    hang_is_killed_and_restarted_by(h, pid, "supervisord").await?;

    // A crash loop reaches FATAL (3 starts that die at once); the re-kick timer (5 s) brings
    // it back once the cause is gone.
    h.ok("echo 'crash_after = 0' >> /etc/foo/foo.conf && kill $(ps -u foo -o pid= -o comm= | awk '$2 == \"food\" {print $1}')")
        .await?;
    wait_for(
        h,
        "FATAL",
        "supervisorctl status foo",
        Duration::from_secs(40),
        |t| t.contains("FATAL"),
        SUPERVISORD_DEBUG,
    )
    .await?;
    let fatal_at = Instant::now();
    h.ok("sed -i '/^crash_after/d' /etc/foo/foo.conf").await?;
    wait_for(
        h,
        "the re-kick",
        "supervisorctl status foo",
        Duration::from_secs(20),
        |t| t.contains("RUNNING"),
        SUPERVISORD_DEBUG,
    )
    .await?;
    let took = fatal_at.elapsed();
    let log = h.ok("cat /var/log/keepup/foo.log").await?;
    ensure!(
        log.contains("re-kicked supervisord program foo: supervisorctl start"),
        "{log}"
    );
    eprintln!("FATAL re-kicked after {took:?}");

    // down/up: supervisorctl stop/start plus the mark.
    h.ok("keepup-agent down foo").await?;
    h.until_empty(ROLE_PROCS, Duration::from_secs(10)).await?;
    ensure!(
        program(h).await?.contains("STOPPED"),
        "{}",
        program(h).await?
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    ensure!(
        program(h).await?.contains("STOPPED"),
        "a down program was re-kicked: {}",
        program(h).await?
    );
    h.ok("keepup-agent up foo").await?;
    wait_food(h, Duration::from_secs(15)).await?;

    // An upgrade restarts it on the new bits.
    h.ok(c.upgrade).await?;
    new_bits_answer(h, SUPERVISORD_DEBUG).await?;

    // Removal takes the program out of supervisord and leaves no role process.
    h.ok(c.remove).await?;
    h.until_empty(ROLE_PROCS, Duration::from_secs(15)).await?;
    let st = program(h).await?;
    ensure!(st.contains("no such process"), "{st}");
    gone_for_good(h).await
}

#[tokio::test(flavor = "multi_thread")]
async fn supervisord_runs_it_the_agent_kills_hangs_and_rekicks_fatal() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let s = setup(
        "foreign-supervisord",
        as_kind("supervisord", &[]),
        "rekick_every: 5s",
    )
    .await?;
    copy_version(
        &s,
        "1.0.1",
        as_kind("supervisord", &["--banner", "food v2 ready"]),
    )
    .await?;
    copy_version(&s, "1.0.0", as_kind("supervisord", &[])).await?;
    let h = &s.host;
    h.ok("supervisord -c /etc/supervisor/supervisord.conf")
        .await?;
    wait_for(
        h,
        "supervisord",
        "supervisorctl pid",
        Duration::from_secs(15),
        |t| t.trim().parse::<u32>().is_ok(),
        "cat /var/log/supervisor/supervisord.log",
    )
    .await?;
    supervisord_cycle(&s, &DEB).await?;
    h.ok("test ! -e /etc/supervisor/conf.d/foo.conf").await?;
    h.ok("dpkg --purge foo").await?;

    h.ok("rm -f /var/log/keepup/foo.log").await?;
    supervisord_cycle(&s, &RPM).await?;
    h.ok("test ! -e /etc/supervisor/conf.d/foo.conf").await?;
    Ok(())
}
