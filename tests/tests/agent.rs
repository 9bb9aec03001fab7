//! keepup-agent on real Debian 12 hosts, supervising the example service installed from its
//! real package: crashes are respawned, a crash loop is given up and re-kicked, a hung daemon
//! is found by its probes and its role killed, a double-forking daemon is still stopped,
//! admin-down survives an agent restart, a killed agent's leftovers are killed on start, a
//! second agent is refused, package removal stops the service, and no zombies pile up.
//!
//! The agent binary is copied in and started by the test (`docker exec`), so it is the parent
//! (and child subreaper) of everything it supervises; the containers' PID 1 is `sleep`.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keepup_tests::agent_host::{
    agent_pid, setup, start_agent, status, until_empty, wait_banner, wait_banner_from, wait_status,
    AGENT_OUT, AGENT_RC, LOCK, ROLE_PROCS,
};
use keepup_tests::example;
use keepup_tests::host::{docker_or_skip, Host};
use keepup_tests::testkit::{quick, with_flags};

/// Crash -> respawned at once (it ran over a second); a crash loop is given up after `count`
/// starts within `within`; the re-kick timer starts it again; `rekick` does it on demand.
#[tokio::test(flavor = "multi_thread")]
async fn crash_loop_is_given_up_then_rekicked() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let s = setup(
        "agent-crash",
        |t| with_flags(t, &["--crash-after", "1"]).replace("count: 10", "count: 3"),
        "rekick_every: 12s",
    )
    .await?;
    let h = &s.host;
    h.ok("dpkg -i /pkgs/foo.deb").await?;
    start_agent(h).await?;

    // Crash -> restarted: the second run starts right after the first exits with status 3.
    let svc = wait_status(h, "a restart", Duration::from_secs(10), |s| {
        s.as_ref().is_some_and(|s| s.restarts >= 1)
    })
    .await?
    .unwrap();
    let log = h.ok("cat /var/log/keepup/foo.log").await?;
    ensure!(log.contains("exited: exit status 3"), "{log}");
    ensure!(
        log.contains("crashing as asked"),
        "daemon output is logged:\n{log}"
    );
    eprintln!("restarted: {svc:?}");

    // Third start within a minute is the last: given up, with 2 restarts.
    let svc = wait_status(h, "given-up", Duration::from_secs(15), |s| {
        s.as_ref().is_some_and(|s| s.state == "given-up")
    })
    .await?
    .unwrap();
    ensure!(svc.restarts == 2, "{svc:?}");
    ensure!(svc.text.contains("next re-kick in"), "{svc:?}");
    let given_up_at = Instant::now();
    // It stays given up (nothing respawns it) ...
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = status(h, "foo").await?.unwrap();
    ensure!(
        still.state == "given-up" && still.restarts == 2,
        "{still:?}"
    );
    // ... until the re-kick timer (12 s) starts it again.
    let svc = wait_status(h, "the re-kick", Duration::from_secs(20), |s| {
        s.as_ref().is_some_and(|s| s.restarts >= 3)
    })
    .await?
    .unwrap();
    ensure!(
        given_up_at.elapsed() < Duration::from_secs(16),
        "re-kick took {:?}",
        given_up_at.elapsed()
    );
    eprintln!("re-kicked: {svc:?}");

    // Given up again; `keepup-agent rekick foo` does not wait for the timer.
    wait_status(h, "given-up again", Duration::from_secs(15), |s| {
        s.as_ref().is_some_and(|s| s.state == "given-up")
    })
    .await?;
    let before = status(h, "foo").await?.unwrap().restarts;
    let out = h.ok("keepup-agent rekick foo").await?;
    ensure!(out.contains("re-kicked"), "{out}");
    let svc = status(h, "foo").await?.unwrap();
    ensure!(
        svc.restarts == before + 1 && svc.state != "given-up",
        "{svc:?}"
    );
    // A running service is left alone by a re-kick.
    let out = h.ok("keepup-agent rekick").await?;
    ensure!(out.contains("nothing to do"), "{out}");
    Ok(())
}

/// Hang (the daemon SIGSTOPped: connections are accepted by the kernel, never answered) ->
/// probes time out -> after `failures` in a row the role is killed -> the agent respawns it,
/// all within `every x failures + timeout + 1 s` (+ slack for a busy 2-core machine).
#[tokio::test(flavor = "multi_thread")]
async fn hung_daemon_is_found_by_probes_and_restarted() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    // Besides the example's tcp and http probes, an exec probe that must run as the role.
    let exec_probe = "checks:\n  - exec: [/bin/sh, -c, 'test \"$(id -un)\" = foo && nc -w 1 127.0.0.1 7070 </dev/null | grep -q ready']\n    every: 1s\n    timeout: 1s\n    failures: 3\n    grace: 1s\n";
    let s = setup("agent-hang", |t| t.replace("checks:\n", exec_probe), "").await?;
    let h = &s.host;
    h.ok("dpkg -i /pkgs/foo.deb").await?;
    start_agent(h).await?;
    let old = wait_banner(h, Duration::from_secs(15)).await?;
    // All three probes pass before the hang.
    wait_status(h, "passing probes", Duration::from_secs(10), |s| {
        s.as_ref()
            .is_some_and(|s| s.state == "running" && s.text.matches(": ok").count() == 3)
    })
    .await?;
    let check = h.ok("keepup-agent check foo").await?;
    ensure!(
        check.lines().filter(|l| l.contains("]: ok")).count() == 3,
        "{check}"
    );
    ensure!(
        check.contains(" as "),
        "exec probe runs as the role: {check}"
    );
    let json = h.ok("keepup-agent status --json").await?;
    ensure!(json.contains("\"state\": \"running\""), "{json}");

    h.ok(&format!("kill -STOP {old}")).await?;
    let hung_at = Instant::now();
    let (new, answered) = wait_banner_from(h, Duration::from_secs(30), Some(old)).await?;
    // Measured to the start of the `nc` that got the new banner: a hung attempt's `-w 2` wait
    // is not counted, only the poll interval (100 ms) and `docker exec` latency are.
    let took = answered.saturating_duration_since(hung_at);
    // every 1 s x failures 3 + timeout 1 s + 1 s = 5 s; slack 3 s for the kill, the restart,
    // the poll and `docker exec` round trips on a busy 2-core machine.
    let bound = Duration::from_secs(5 + 3);
    ensure!(took <= bound, "back after {took:?}, bound {bound:?}");
    let log = h.ok("cat /var/log/keepup/foo.log").await?;
    ensure!(log.contains("failed 3 times in a row"), "{log}");
    ensure!(log.contains("killing role foo"), "{log}");
    let left = h.ok(ROLE_PROCS).await?;
    ensure!(
        !left.contains(&format!("{old} ")),
        "old daemon survived:\n{left}"
    );
    eprintln!("hung daemon {old} replaced by {new} after {took:?}");
    // `check` fails (exit 1) while the service does not answer.
    h.ok(&format!("kill -STOP {new}")).await?;
    let check = h.exec("keepup-agent check foo").await?;
    ensure!(
        check.code == 1 && check.stdout.contains("FAILED"),
        "{check:?}"
    );
    Ok(())
}

/// A daemon that double-forks away from its launch script (`--daemonize`) is still found by
/// its uid: `down` leaves no role process. Admin-down is a file that survives an agent restart;
/// `up` starts the service again.
#[tokio::test(flavor = "multi_thread")]
async fn double_forking_daemon_is_stopped_and_down_survives_a_restart() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let s = setup("agent-fork", |t| with_flags(t, &["--daemonize"]), "").await?;
    let h = &s.host;
    h.ok("dpkg -i /pkgs/foo.deb").await?;
    start_agent(h).await?;
    // The launch script exits as soon as food has forked away; the daemon keeps the role. It
    // really detached: its parent is not the launch script (the agent, as subreaper, adopted
    // it). Each respawn's leftover kill replaces the daemon until the service is given up, so
    // a pid may vanish between two looks: retry.
    let start = Instant::now();
    loop {
        let daemon = wait_banner(h, Duration::from_secs(15)).await?;
        let ppid = h.exec(&format!("ps -o ppid= -p {daemon}")).await?.stdout;
        let parent = h
            .exec(&format!("ps -o args= -p {}", ppid.trim()))
            .await?
            .stdout;
        if !ppid.trim().is_empty() && !parent.trim().is_empty() {
            ensure!(
                !parent.contains("run-foo"),
                "food {daemon} is still a child of the launch script: {parent}"
            );
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "food never stayed up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = h.ok("keepup-agent down foo").await?;
    ensure!(out.contains("is down"), "{out}");
    // `down` returns after the role kill: nothing of the role is left, at once.
    let left = h.ok(ROLE_PROCS).await?;
    ensure!(left.trim().is_empty(), "left after down:\n{left}");
    h.ok("test -f /var/lib/keepup-agent/down/foo").await?;
    let svc = status(h, "foo").await?.unwrap();
    ensure!(svc.state == "down", "{svc:?}");

    // Restart the agent: the service stays down, nothing is started.
    let pid = agent_pid(h).await?.context("agent not running")?;
    h.ok(&format!("kill -TERM {pid}")).await?;
    until_empty(
        h,
        &format!("ps -o pid=,stat= -p {pid} | awk '$2 !~ /^Z/'"),
        Duration::from_secs(10),
    )
    .await?;
    start_agent(h).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let svc = status(h, "foo").await?.unwrap();
    ensure!(svc.state == "down", "{svc:?}");
    let left = h.ok(ROLE_PROCS).await?;
    ensure!(
        left.trim().is_empty(),
        "started despite admin-down:\n{left}"
    );
    // A re-kick does not start an admin-down service either.
    let out = h.ok("keepup-agent rekick foo").await?;
    ensure!(out.contains("admin-down"), "{out}");

    let out = h.ok("keepup-agent up foo").await?;
    ensure!(out.contains("up again"), "{out}");
    h.ok("test ! -e /var/lib/keepup-agent/down/foo").await?;
    wait_banner(h, Duration::from_secs(15)).await?;
    Ok(())
}

/// An agent killed with SIGKILL leaves its services running; the next agent kills those
/// leftovers of the role before it starts the service ("kill to gain control"). While an agent
/// runs, a second one refuses to start. SIGTERM stops every service and exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn leftovers_are_killed_on_start_and_a_second_agent_is_refused() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let s = setup("agent-lock", |t| t, "").await?;
    let h = &s.host;
    h.ok("dpkg -i /pkgs/foo.deb").await?;
    start_agent(h).await?;
    let old = wait_banner(h, Duration::from_secs(15)).await?;

    // A second agent: refused, with a clear message, and the first is undisturbed.
    let second = h.exec("timeout 10 keepup-agent run").await?;
    ensure!(second.code == 1, "{second:?}");
    ensure!(
        second
            .stderr
            .contains("another keepup-agent is already running"),
        "{second:?}"
    );
    ensure!(
        second.stderr.contains(LOCK) && second.stderr.contains("keepup-agent status"),
        "{second:?}"
    );
    // Another socket does not make another agent: the lock is the state directory's.
    let other = h
        .exec("timeout 10 keepup-agent run --socket /tmp/other.sock")
        .await?;
    ensure!(
        other.code == 1
            && other
                .stderr
                .contains("another keepup-agent is already running"),
        "{other:?}"
    );
    ensure!(h.exec("keepup-agent status").await?.code == 0);
    // No pidfile anywhere: the lock file is empty; only root can open it.
    h.ok(&format!("test ! -s {LOCK}")).await?;
    let mode = h.ok(&format!("stat -c '%a %U' {LOCK}")).await?;
    ensure!(mode.trim() == "600 root", "lock file: {mode}");
    let open = h
        .exec(&format!("su nobody -s /bin/sh -c 'exec 3<{LOCK}'"))
        .await?;
    ensure!(open.code != 0, "nobody could open the lock file: {open:?}");

    let pid = agent_pid(h).await?.context("agent not running")?;
    h.ok(&format!("kill -KILL {pid}")).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let procs = h.ok(ROLE_PROCS).await?;
    ensure!(
        procs.contains(&format!("{old} ")),
        "food should outlive a SIGKILLed agent:\n{procs}"
    );

    start_agent(h).await?;
    // The old daemon may answer until the new agent has killed it: wait for another one.
    let _ = wait_banner_from(h, Duration::from_secs(15), Some(old)).await?;
    let procs = h.ok(ROLE_PROCS).await?;
    ensure!(
        !procs.contains(&format!("{old} ")),
        "leftover {old} alive:\n{procs}"
    );
    let log = h.ok("cat /var/log/keepup/foo.log").await?;
    ensure!(log.contains("leftover process(es) of role foo"), "{log}");

    // SIGTERM: every service stopped (role kill), exit 0.
    let pid = agent_pid(h).await?.context("agent not running")?;
    h.ok(&format!("kill -TERM {pid}")).await?;
    until_empty(h, ROLE_PROCS, Duration::from_secs(10)).await?;
    until_empty(
        h,
        &format!("ps -o pid=,stat= -p {pid} | awk '$2 !~ /^Z/'"),
        Duration::from_secs(10),
    )
    .await?;
    let out = h.ok(&format!("cat {AGENT_OUT}")).await?;
    ensure!(out.contains("SIGTERM: stopping every service"), "{out}");
    ensure!(out.trim_end().ends_with("keepup-agent: stopped"), "{out}");
    let rc = h.ok(&format!("cat {AGENT_RC}")).await?;
    ensure!(rc.trim() == "0", "exit status after SIGTERM: {rc}");
    Ok(())
}

/// Installing the package while the agent runs starts the service (manifest added); upgrading
/// it restarts it as the new version; removing it with `dpkg -r` stops it (manifest removed)
/// and nothing restarts it.
#[tokio::test(flavor = "multi_thread")]
async fn package_install_starts_and_removal_stops_the_service() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let s = setup("agent-pkg", |t| t, "").await?;
    let h = &s.host;
    start_agent(h).await?;
    ensure!(status(h, "foo").await?.is_none());
    let installed = Instant::now();
    h.ok("dpkg -i /pkgs/foo.deb").await?;
    wait_banner(h, Duration::from_secs(15)).await?;
    eprintln!("installed -> serving after {:?}", installed.elapsed());

    // Upgrade: the new manifest is picked up and the postinst's role kill makes the agent
    // respawn the service at once, now the new version.
    let dir = tempfile::tempdir()?;
    let v2 = example::build_example(dir.path(), "1.1.0", quick)?
        .into_iter()
        .find(|f| f.extension().is_some_and(|e| e == "deb"))
        .context("no .deb built")?;
    h.copy_in(&v2, "/pkgs/foo2.deb").await?;
    let old = wait_banner(h, Duration::from_secs(5)).await?;
    h.ok("dpkg -i /pkgs/foo2.deb").await?;
    let new = wait_banner(h, Duration::from_secs(15)).await?;
    ensure!(new != old, "the old daemon {old} survived the upgrade");
    // The manifest change is noticed at the next scan (1 s).
    let start = Instant::now();
    loop {
        let json = h.ok("keepup-agent status --json").await?;
        if json.contains("\"version\": \"1.1.0-1\"") {
            break;
        }
        ensure!(start.elapsed() < Duration::from_secs(5), "{json}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = h.ok("cat /var/log/keepup/foo.log").await?;
    ensure!(
        log.contains("manifest changed: foo 1.0.0-1 -> 1.1.0-1"),
        "{log}"
    );

    // A manifest deleted by hand (no maintainer script kills anything): the agent alone stops
    // the service, within the next scan (1 s) + stop_grace (2 s) + slack.
    let manifest = "/usr/lib/keepup/services/foo.yaml";
    h.ok(&format!("mv {manifest} /root/foo.yaml")).await?;
    let removed = Instant::now();
    until_empty(h, ROLE_PROCS, Duration::from_secs(1 + 2 + 3)).await?;
    eprintln!("manifest deleted -> stopped after {:?}", removed.elapsed());
    wait_status(h, "foo to disappear", Duration::from_secs(5), |s| {
        s.is_none()
    })
    .await?;
    // Put back: started again.
    h.ok(&format!("mv /root/foo.yaml {manifest}")).await?;
    wait_banner(h, Duration::from_secs(15)).await?;

    h.ok("dpkg -r foo").await?;
    wait_status(h, "foo to disappear", Duration::from_secs(5), |s| {
        s.is_none()
    })
    .await?;
    until_empty(h, ROLE_PROCS, Duration::from_secs(5)).await?;
    // Stays stopped.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let left = h.ok(ROLE_PROCS).await?;
    ensure!(left.trim().is_empty(), "restarted after removal:\n{left}");
    let log = h.ok("cat /var/log/keepup/foo.log").await?;
    ensure!(log.contains("manifest removed"), "{log}");
    Ok(())
}

/// Manifests whose role kill would hit processes that are not the service's are refused
/// (state `refused`, with the reason) and nothing of theirs is started or killed: a role
/// another service holds, a reserved system account (`nobody`), a login user's uid, and a check
/// with `failures: 0`.
#[tokio::test(flavor = "multi_thread")]
async fn manifests_that_would_kill_others_are_refused() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let s = setup("agent-refuse", |t| t, "").await?;
    let h = &s.host;
    h.ok("dpkg -i /pkgs/foo.deb").await?;
    start_agent(h).await?;
    let food = wait_banner(h, Duration::from_secs(15)).await?;
    // Processes of other users, which no role kill may touch.
    h.ok("useradd -M -u 1000 alice").await?;
    for user in ["nobody", "alice"] {
        h.ok(&format!(
            "setsid su {user} -s /bin/sh -c 'exec sleep 600' >/dev/null 2>&1 </dev/null &"
        ))
        .await?;
    }
    let dir = "/usr/lib/keepup/services";
    let cases = [
        (
            "bar",
            "s/^role: foo$/role: foo/",
            "already used by service foo",
        ),
        ("baz", "s/^role: foo$/role: nobody/", "system account"),
        ("qux", "s/^role: foo$/role: alice/", "login user"),
        ("quux", "s/failures: [0-9]*/failures: 0/", "failures: 0"),
    ];
    for (name, edit, _) in cases {
        h.ok(&format!(
            "sed -e 's/^name: foo$/name: {name}/' -e '{edit}' {dir}/foo.yaml >{dir}/{name}.yaml"
        ))
        .await?;
    }
    let start = Instant::now();
    for (name, _, why) in cases {
        loop {
            let svc = status(h, name).await?;
            if svc
                .as_ref()
                .is_some_and(|s| s.state == "refused" && s.text.contains(why))
            {
                break;
            }
            ensure!(
                start.elapsed() < Duration::from_secs(10),
                "{name} not refused for {why:?}: {svc:?}\n{}",
                h.exec(&format!("cat {AGENT_OUT}")).await?.stdout
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Give a wrong kill time to happen, then: foo's daemon, nobody's and alice's processes are
    // all still there, and a re-kick (which looks again) changes nothing.
    let out = h.ok("keepup-agent rekick baz").await?;
    ensure!(out.contains("still refused"), "{out}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    h.ok(&format!("kill -0 {food}")).await?;
    for user in ["nobody", "alice"] {
        let left = h.exec(&format!("pgrep -u {user} -x sleep")).await?;
        ensure!(left.code == 0, "{user}'s sleep was killed");
    }
    ensure!(status(h, "foo")
        .await?
        .is_some_and(|s| s.state == "running"));
    Ok(())
}

/// A service that crashes at once, double-forking on the way (two orphans per run), restarted
/// over 100 times: the agent, as child subreaper, reaps every orphan; no zombies pile up.
#[tokio::test(flavor = "multi_thread")]
async fn no_zombies_after_100_restarts() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let s = setup(
        "agent-zombies",
        |t| {
            with_flags(t, &["--daemonize", "--crash-after", "0"])
                .replace("count: 10", "count: 100000")
        },
        // Respawn fast crashes after 10 ms, so 100 restarts take seconds, not minutes.
        "max_backoff: 10ms",
    )
    .await?;
    let h = &s.host;
    h.ok("dpkg -i /pkgs/foo.deb").await?;
    start_agent(h).await?;
    let zombies = "ps -eo stat=,pid=,ppid=,args= | awk '$1 ~ /^Z/'";
    let start = Instant::now();
    let mut most = 0;
    loop {
        let svc = status(h, "foo").await?.context("foo not listed")?;
        let z = h.ok(zombies).await?;
        if z.lines().count() > most {
            most = z.lines().count();
            eprintln!(
                "{most} zombies at once after {} restarts:\n{z}",
                svc.restarts
            );
        }
        if svc.restarts >= 100 {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(120),
            "only {} restarts in 2 minutes",
            svc.restarts
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Orphans are reaped once they have been zombies for 200 ms (the reaper leaves tokio's own
    // children to tokio), so with several restarts a second a few exist at any moment; without
    // reaping there would be two per restart, over 200.
    ensure!(most <= 20, "up to {most} zombies at once");
    h.ok("keepup-agent down foo").await?;
    until_empty(h, zombies, Duration::from_secs(5)).await?;
    Ok(())
}

/// `supervisor: systemd`: systemd (PID 1 in the container) runs the crashing service until its
/// start limit and marks the unit failed; the agent's re-kick (`systemctl reset-failed` +
/// `start`) brings it back.
#[test]
fn systemd_unit_that_hit_its_start_limit_is_rekicked() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    use keepup_tests::systemd::SystemdHost;
    let dir = tempfile::tempdir()?;
    let files = example::build_example(dir.path(), "1.0.0", |t| {
        with_flags(quick(t), &["--crash-after", "1"])
            .replace("kind: agent", "kind: systemd")
            .replace("count: 10", "count: 3")
    })?;
    let deb = files
        .into_iter()
        .find(|f| f.extension().is_some_and(|e| e == "deb"))
        .context("no .deb built")?;
    let h = SystemdHost::start("agent-systemd")?;
    h.copy_in(&deb, "/pkgs/foo.deb")?;
    h.copy_in(
        &example::built_bin("keepup-agent")?,
        "/usr/sbin/keepup-agent",
    )?;
    h.copy_in(
        &example::built_bin("keepup-agent-pass")?,
        "/usr/sbin/keepup-agent-pass",
    )?;
    h.ok("mkdir -p /etc/keepup && echo 'rekick_every: 10s' > /etc/keepup/agent.yaml")?;
    h.ok("dpkg -i /pkgs/foo.deb")?;
    h.ok("systemctl cat foo.service | grep -q StartLimitBurst=3")?;
    h.ok(&format!(
        "setsid keepup-agent run >>{AGENT_OUT} 2>&1 </dev/null &"
    ))?;
    let unit = "systemctl show -p ActiveState --value foo.service";
    let wait = |what: &str, within: Duration, ok: &dyn Fn(&str) -> bool| -> Result<Instant> {
        let start = Instant::now();
        loop {
            let state = h.ok(unit)?.trim().to_string();
            if ok(&state) {
                return Ok(Instant::now());
            }
            if start.elapsed() > within {
                bail!(
                    "after {within:?} still waiting for {what} (unit {state}):\n{}",
                    h.exec(&format!(
                        "systemctl status foo.service; tail -n 30 /var/log/keepup/foo.log; cat {AGENT_OUT}"
                    ))?
                    .stdout
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // systemd gives up: 3 starts within a minute, each crashing after 1 s.
    let failed_at = wait("the start limit", Duration::from_secs(40), &|s| {
        s == "failed"
    })?;
    // The agent re-kicks it within its 10 s timer.
    let back_at = wait("the re-kick", Duration::from_secs(20), &|s| s != "failed")?;
    let took = back_at - failed_at;
    ensure!(took <= Duration::from_secs(13), "re-kicked after {took:?}");
    let log = h.ok("cat /var/log/keepup/foo.log")?;
    ensure!(log.contains("re-kicked foo.service"), "{log}");
    // The daemon runs again, as the role.
    let start = Instant::now();
    while !h.ok("ps -u foo -o comm=")?.contains("food") {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "food not running again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = h.ok("keepup-agent status")?;
    ensure!(status.starts_with("SERVICE"), "{status}");
    eprintln!("unit failed, re-kicked after {took:?}\n{status}");
    Ok(())
}

/// A launch script that finds its environment not sane prints why, sleeps and exits non-zero:
/// the agent shows `not-sane` and keeps retrying; once the environment is fixed it runs again.
/// Restarting by `pkill -u foo` (the talk's contract) is just a respawn.
#[tokio::test(flavor = "multi_thread")]
async fn not_sane_launch_is_shown_and_retried() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let s = setup("agent-sane", |t| t, "").await?;
    let h = &s.host;
    h.ok("dpkg -i /pkgs/foo.deb").await?;
    start_agent(h).await?;
    let old = wait_banner(h, Duration::from_secs(15)).await?;

    // Break the environment (a required file), then restart by the contract.
    h.ok("mv /etc/foo/foo.conf /root/foo.conf && pkill -u foo")
        .await?;
    // Shown as soon as the launch script says so, during its not-sane sleep ...
    wait_status(h, "not-sane", Duration::from_secs(15), |s| {
        s.as_ref().is_some_and(|s| s.state == "not-sane")
    })
    .await?;
    // ... and its exit (status 1 after the sleep) is retried, with no probes meanwhile.
    wait_status(h, "a not-sane exit", Duration::from_secs(15), |s| {
        s.as_ref().is_some_and(|s| {
            s.text.contains("exit status 1 after") && s.text.contains("(not sane)")
        })
    })
    .await?;
    let log = h.ok("cat /var/log/keepup/foo.log").await?;
    ensure!(
        log.contains("run-foo: not sane: required file /etc/foo/foo.conf is missing"),
        "{log}"
    );

    h.ok("mv /root/foo.conf /etc/foo/foo.conf").await?;
    let new = wait_banner(h, Duration::from_secs(15)).await?;
    ensure!(new != old);
    wait_status(h, "running", Duration::from_secs(10), |s| {
        s.as_ref().is_some_and(|s| s.state == "running")
    })
    .await?;
    Ok(())
}

// ---- issue 9: the agent's inputs (roles, probes, control socket, manifest values) ----

/// Where packages install manifests.
const MANIFESTS: &str = "/usr/lib/keepup/services";

/// Agent configuration that reports every second to [`REPORT_RECEIVER`] on the same host.
const REPORT_CONFIG: &str = "report: http://127.0.0.1:9000\nreport_every: 1s\n\
                             report_token_file: /etc/keepup/token";

/// A report receiver on port 9000 of the host (python3 is in the host image): it reads each
/// whole request, answers 204, and appends the body (one JSON line) to /tmp/reports.
const REPORT_RECEIVER: &str = r#"echo tok > /etc/keepup/token
cat > /tmp/report-receiver.py <<'PY'
import http.server
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with open("/tmp/reports", "ab") as f:
            f.write(body.replace(b"\n", b" ") + b"\n")
        self.send_response(204)
        self.send_header("Connection", "close")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", 9000), Handler).serve_forever()
PY
touch /tmp/reports
setsid python3 /tmp/report-receiver.py >>/tmp/report-receiver.log 2>&1 </dev/null &
for i in $(seq 100); do
    curl -s -o /dev/null http://127.0.0.1:9000/ && exit 0
    sleep 0.1
done
echo "the report receiver did not start" >&2; cat /tmp/report-receiver.log >&2; exit 1"#;

/// Waits (20 s at most) for a report the agent posted for which `ok` holds; returns it.
async fn wait_report(
    h: &Host,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let start = Instant::now();
    loop {
        let all = h.ok("cat /tmp/reports").await?;
        let last = all
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|r| ok(r));
        if let Some(r) = last {
            return Ok(r);
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!(
                "no report with {what} within 20 s; the last one:\n{}\n--- agent:\n{}",
                all.lines().last().unwrap_or("(none)"),
                h.exec(&format!("tail -n 20 {AGENT_OUT}")).await?.stdout
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The service `name` in a report (or in `status --json`: both list `services`).
fn service_in<'a>(r: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    r["services"].as_array()?.iter().find(|s| s["name"] == name)
}

/// `keepup-agent status --json`, parsed.
async fn status_json(h: &Host) -> Result<serde_json::Value> {
    let out = h.ok("keepup-agent status --json").await?;
    serde_json::from_str(&out).with_context(|| format!("status --json: {out}"))
}

/// Writes `MANIFESTS/file` (through a temporary file and a rename, as dpkg does): the installed
/// foo.yaml with each `(from, to)` replaced; fails if an edit does not apply exactly once.
async fn derive_manifest(h: &Host, file: &str, edits: &[(&str, &str)]) -> Result<()> {
    let mut text = h.ok(&format!("cat {MANIFESTS}/foo.yaml")).await?;
    for (from, to) in edits {
        ensure!(
            text.matches(from).count() == 1,
            "manifest edit {from:?} does not apply exactly once:\n{text}"
        );
        text = text.replacen(from, to, 1);
    }
    h.ok(&format!(
        "cat > /tmp/{file}.new <<'EOF'\n{text}EOF\nmv /tmp/{file}.new {MANIFESTS}/{file}"
    ))
    .await?;
    Ok(())
}

/// Waits until `status` lists `name` as refused with `why` in its lines; returns them.
async fn wait_refused(h: &Host, name: &str, why: &str) -> Result<String> {
    let start = Instant::now();
    loop {
        let svc = status(h, name).await?;
        if let Some(s) = &svc {
            if s.state == "refused" && s.text.contains(why) {
                return Ok(s.text.clone());
            }
        }
        ensure!(
            start.elapsed() < Duration::from_secs(15),
            "{name} not refused for {why:?}: {svc:?}\n{}",
            h.exec(&format!("tail -n 20 {AGENT_OUT}")).await?.stdout
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Account takeover, agent side: a manifest naming another daemon's account (`postgres`, no
/// registry file, no keepup GECOS mark) is refused with the reason in `status`, `status
/// --json` and the report, and the postgres process survives re-kicks; registry files that
/// root did not write alone (group-writable, a symlink, owned by the role) or that name
/// another service do not help; a proper registry file naming the service makes it accepted.
#[tokio::test(flavor = "multi_thread")]
async fn another_daemons_account_is_refused_unless_registered() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let s = setup("agent-takeover", |t| t, REPORT_CONFIG).await?;
    let h = &s.host;
    h.ok(REPORT_RECEIVER).await?;
    h.ok("dpkg -i /pkgs/foo.deb").await?;
    // Another daemon's system account, with its process running.
    h.ok("useradd --system -M -c 'PostgreSQL administrator' postgres")
        .await?;
    h.ok("setsid su postgres -s /bin/sh -c 'exec sleep 600' >/dev/null 2>&1 </dev/null &")
        .await?;
    let pg = h
        .ok("for i in $(seq 50); do p=$(pgrep -u postgres -x sleep) && echo $p && exit 0; sleep 0.1; done; exit 1")
        .await?
        .trim()
        .to_string();
    start_agent(h).await?;
    wait_banner(h, Duration::from_secs(15)).await?;

    derive_manifest(
        h,
        "pgx.yaml",
        &[
            ("name: foo\n", "name: pgx\n"),
            ("role: foo\n", "role: postgres\n"),
        ],
    )
    .await?;
    let text = wait_refused(h, "pgx", "role postgres").await?;
    for needle in [
        "/var/lib/keepup/roles/postgres",
        "role_adopt: true",
        "reinstall",
    ] {
        ensure!(text.contains(needle), "reason lacks {needle:?}:\n{text}");
    }
    let json = status_json(h).await?;
    let svc = service_in(&json, "pgx").context("pgx not in status --json")?;
    ensure!(svc["state"] == "refused", "{svc}");
    let note = svc["note"].as_str().unwrap_or_default();
    ensure!(
        note.contains("role postgres") && note.contains("/var/lib/keepup/roles/postgres"),
        "{svc}"
    );
    // The report says so too: the state, and an event with the reason.
    wait_report(h, "pgx refused with the reason", |r| {
        service_in(r, "pgx").is_some_and(|s| s["state"] == "refused")
            && r["events"].as_array().is_some_and(|evs| {
                evs.iter().any(|e| {
                    e["kind"] == "refused"
                        && e["service"] == "pgx"
                        && e["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("/var/lib/keepup/roles/postgres"))
                })
            })
    })
    .await?;
    // A re-kick looks again, and kills nothing.
    let out = h.ok("keepup-agent rekick pgx").await?;
    ensure!(out.contains("still refused"), "{out}");
    h.ok(&format!("kill -0 {pg}")).await?;

    // Registry files that do not count.
    let file = "/var/lib/keepup/roles/postgres";
    let cases = [
        (
            format!("printf 'pgx\\n' >{file}; chmod 0664 {file}"),
            "writable by group or others",
        ),
        (
            format!("printf 'pgx\\n' >{file}; chmod 0644 {file}; chown postgres {file}"),
            "not root",
        ),
        (
            format!(
                "printf 'pgx\\n' >/root/pgmark; chmod 0644 /root/pgmark; ln -s /root/pgmark {file}"
            ),
            "is a symlink",
        ),
        (
            format!("printf 'other\\n' >{file}; chmod 0644 {file}"),
            "belongs to service \"other\"",
        ),
    ];
    h.ok("mkdir -p -m 0755 /var/lib/keepup/roles").await?;
    for (plant, why) in &cases {
        h.ok(&format!("rm -f {file}; {plant}")).await?;
        let out = h.ok("keepup-agent rekick pgx").await?;
        ensure!(
            out.contains("still refused") && out.contains(why),
            "with `{plant}`: {out}"
        );
        h.ok(&format!("kill -0 {pg}")).await?;
    }
    ensure!(
        status(h, "foo")
            .await?
            .is_some_and(|s| s.state == "running"),
        "foo disturbed"
    );

    // A registry file root wrote, naming pgx: the role is pgx's (adopted), supervised.
    h.ok(&format!(
        "rm -f {file}; printf 'pgx\\nadopted\\n' >{file}; chmod 0644 {file}"
    ))
    .await?;
    let out = h.ok("keepup-agent rekick pgx").await?;
    ensure!(
        out.contains("re-kicked") && !out.contains("refused"),
        "{out}"
    );
    let svc = status(h, "pgx").await?.context("pgx gone")?;
    ensure!(svc.state != "refused", "{svc:?}");
    Ok(())
}

/// Bad probe: a hand-broken manifest (a banner regex that does not compile) makes that probe
/// failing with the reason in `status --json` and in the report the agent posts; it is not
/// counted toward health kills (the daemon keeps running), and the other probe still runs.
#[tokio::test(flavor = "multi_thread")]
async fn broken_probe_is_failing_in_status_and_report() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let s = setup("agent-badprobe", |t| t, REPORT_CONFIG).await?;
    let h = &s.host;
    h.ok(REPORT_RECEIVER).await?;
    h.ok("dpkg -i /pkgs/foo.deb").await?;
    start_agent(h).await?;
    let food = wait_banner(h, Duration::from_secs(15)).await?;
    wait_status(h, "passing probes", Duration::from_secs(10), |s| {
        s.as_ref()
            .is_some_and(|s| s.state == "running" && s.text.matches(": ok").count() == 2)
    })
    .await?;

    derive_manifest(
        h,
        "foo.yaml",
        &[("expect: ^food .* ready\n", "expect: '^food (ready'\n")],
    )
    .await?;
    let broken = |p: &serde_json::Value| {
        p["name"] == "banner"
            && p["ok"] == false
            && p["reason"]
                .as_str()
                .is_some_and(|r| r.contains("cannot run") && r.contains("invalid banner regex"))
    };
    let start = Instant::now();
    loop {
        let json = status_json(h).await?;
        let foo = service_in(&json, "foo").context("foo not in status --json")?;
        if foo["probes"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(broken))
        {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "the broken probe is not failing: {foo:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = status(h, "foo").await?.context("foo not listed")?.text;
    ensure!(
        text.contains("probe banner") && text.contains("FAILED"),
        "{text}\n{}",
        h.ok("keepup-agent status; keepup-agent status --json")
            .await?
    );
    // In the report, as a failing probe (which the server counts as unhealthy).
    let report = wait_report(h, "foo's banner probe failing", |r| {
        service_in(r, "foo").is_some_and(|s| {
            s["probes"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(broken))
        })
    })
    .await?;
    // Not a health kill: a later report still shows the healthz probe passing and the same
    // daemon answers.
    let sent = report["sent_at"].as_u64().unwrap_or_default();
    wait_report(h, "a later report with healthz passing", |r| {
        r["sent_at"].as_u64().unwrap_or_default() >= sent + 3
            && service_in(r, "foo").is_some_and(|s| {
                s["state"] == "running"
                    && s["probes"].as_array().is_some_and(|ps| {
                        ps.iter().any(|p| p["name"] == "healthz" && p["ok"] == true)
                    })
            })
    })
    .await?;
    let now = wait_banner(h, Duration::from_secs(5)).await?;
    ensure!(now == food, "food {food} was replaced by {now}");
    let log = h.ok("cat /var/log/keepup/foo.log").await?;
    ensure!(!log.contains("killing role"), "{log}");
    Ok(())
}

/// Control socket: a user outside `status_group` cannot reach the socket at all (`down` and
/// `status` get "permission denied", foo keeps running); a member may run `status` but
/// `down` is refused by the agent (SO_PEERCRED). The socket's directory, left 0777 by someone
/// and with the agent started under umask 000, ends up 0750 root:keepupview, the socket 0660.
#[tokio::test(flavor = "multi_thread")]
async fn control_socket_checks_who_is_asking() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let s = setup("agent-socket", |t| t, "status_group: keepupview").await?;
    let h = &s.host;
    h.ok("dpkg -i /pkgs/foo.deb").await?;
    h.ok("groupadd --system keepupview && useradd -M -G keepupview viewer && useradd -M mallory")
        .await?;
    h.ok("mkdir -p /run/keepup && chmod 0777 /run/keepup")
        .await?;
    h.ok(&format!(
        "umask 000; setsid sh -c 'keepup-agent run; echo $? >{AGENT_RC}' >>{AGENT_OUT} 2>&1 </dev/null &"
    ))
    .await?;
    let start = Instant::now();
    while h.exec("keepup-agent status").await?.code != 0 {
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "keepup-agent never answered:\n{}",
            h.exec(&format!("cat {AGENT_OUT}")).await?.stdout
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let food = wait_banner(h, Duration::from_secs(15)).await?;
    let modes = h
        .ok("stat -c '%a %U:%G' /run/keepup /run/keepup/agent.sock")
        .await?;
    ensure!(
        modes == "750 root:keepupview\n660 root:keepupview\n",
        "socket directory and socket: {modes}"
    );

    let as_user = |user: &str, cmd: &str| format!("su {user} -s /bin/sh -c '{cmd}'");
    // Not in the group: the directory keeps them out.
    for cmd in [
        "keepup-agent down foo",
        "keepup-agent status",
        "keepup-agent update --now",
    ] {
        let out = h.exec(&as_user("mallory", cmd)).await?;
        ensure!(
            out.code != 0 && out.stderr.contains("permission denied"),
            "mallory: {cmd}: {out:?}"
        );
    }
    let ls = h.exec(&as_user("mallory", "ls /run/keepup")).await?;
    ensure!(ls.code != 0, "mallory can list /run/keepup: {ls:?}");
    // Service logs (a daemon may print secrets): never world-readable, even under umask
    // 000; the status group reads them.
    let modes = h
        .ok("stat -c '%a %U:%G' /var/log/keepup /var/log/keepup/foo.log")
        .await?;
    ensure!(
        modes == "755 root:root\n640 root:keepupview\n",
        "log directory and log: {modes}"
    );
    let cat = h
        .exec(&as_user("mallory", "cat /var/log/keepup/foo.log"))
        .await?;
    ensure!(
        cat.code != 0 && cat.stderr.contains("Permission denied"),
        "mallory can read the service log: {cat:?}"
    );
    let cat = h
        .exec(&as_user("viewer", "cat /var/log/keepup/foo.log"))
        .await?;
    ensure!(
        cat.code == 0 && cat.stdout.contains("keepup-agent: started"),
        "viewer: the service log: {cat:?}"
    );
    // In the group: status yes, down no.
    let st = h.exec(&as_user("viewer", "keepup-agent status")).await?;
    ensure!(
        st.code == 0 && st.stdout.lines().any(|l| l.starts_with("foo ")),
        "viewer: status: {st:?}"
    );
    let st = h
        .exec(&as_user("viewer", "keepup-agent status --json"))
        .await?;
    ensure!(
        st.code == 0 && st.stdout.contains("\"name\": \"foo\""),
        "{st:?}"
    );
    for cmd in ["down foo", "rekick", "check foo"] {
        let out = h
            .exec(&as_user("viewer", &format!("keepup-agent {cmd}")))
            .await?;
        ensure!(
            out.code == 1
                && out.stderr.contains(&format!(
                    "permission denied: `keepup-agent {cmd}` needs root"
                )),
            "viewer: {cmd}: {out:?}"
        );
    }
    // A member cannot forge an event for the reports either (the `event` request the pass
    // child uses is root-only): refused, and the events file never holds it.
    h.ok(r#"cat > /tmp/forge.py <<'PY'
import socket
s = socket.socket(socket.AF_UNIX)
s.connect("/run/keepup/agent.sock")
s.sendall(b'{"cmd":"event","kind":"install","service":"foo","message":"forged by viewer"}\n')
print(s.makefile().readline())
PY"#)
        .await?;
    let out = h.exec(&as_user("viewer", "python3 /tmp/forge.py")).await?;
    ensure!(
        out.code == 0 && out.stdout.contains("permission denied"),
        "viewer: event: {out:?}"
    );
    let events = h
        .exec("cat /var/lib/keepup-agent/events.json")
        .await?
        .stdout;
    ensure!(!events.contains("forged by viewer"), "{events}");
    // Nothing was stopped, no mark written; root still may.
    h.ok("test ! -e /var/lib/keepup-agent/down/foo").await?;
    let now = wait_banner(h, Duration::from_secs(5)).await?;
    ensure!(now == food, "food {food} was replaced by {now}");
    // Still the first run (`starting` until it has run for the settle time, then `running`).
    let st = wait_status(h, "foo running", Duration::from_secs(10), |s| {
        s.as_ref().is_some_and(|s| s.state == "running")
    })
    .await?;
    ensure!(st.is_some_and(|s| s.restarts == 0), "foo was restarted");
    let out = h.ok("keepup-agent down foo").await?;
    ensure!(out.contains("is down"), "{out}");
    Ok(())
}

/// Hostile manifest values: a `name` that climbs out of the log directory, a `unit` with a
/// space or a leading `-` (an option to `systemctl`), and a file that is not `<name>.yaml`
/// are refused and reported (status, report), foo is left alone, nothing is written outside
/// the agent's directories and `systemctl` never sees those units.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_manifest_values_are_refused_and_reported() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let s = setup("agent-hostile", |t| t, REPORT_CONFIG).await?;
    let h = &s.host;
    h.ok(REPORT_RECEIVER).await?;
    // A stand-in systemctl that records its arguments (and fails: no systemd here).
    h.ok("printf '#!/bin/sh\\necho \"$*\" >>/tmp/systemctl.args\\nexit 1\\n' >/usr/local/sbin/systemctl && chmod 755 /usr/local/sbin/systemctl && touch /tmp/systemctl.args")
        .await?;
    h.ok("dpkg -i /pkgs/foo.deb").await?;
    // A legitimate systemd service (a keepup-made account), so `systemctl` is seen being used.
    h.ok("useradd --system -M -c 'ctl service (keepup)' ctl && touch /tmp/before")
        .await?;
    start_agent(h).await?;
    let food = wait_banner(h, Duration::from_secs(15)).await?;
    let systemd = |unit: &'static str| -> (&'static str, String) {
        (
            "  kind: agent\n",
            format!("  kind: systemd\n  unit: '{unit}'\n"),
        )
    };
    let (k, ctl_unit) = systemd("ctl.service");
    derive_manifest(
        h,
        "ctl.yaml",
        &[
            ("name: foo\n", "name: ctl\n"),
            ("role: foo\n", "role: ctl\n"),
            (k, &ctl_unit),
        ],
    )
    .await?;
    derive_manifest(
        h,
        "evil.yaml",
        &[("name: foo\n", "name: ../../../etc/cron.d/evil\n")],
    )
    .await?;
    let (k, dash) = systemd("-H evil.service");
    derive_manifest(
        h,
        "dash.yaml",
        &[("name: foo\n", "name: dash\n"), (k, &dash)],
    )
    .await?;
    let (k, space) = systemd("sp ace.service");
    derive_manifest(
        h,
        "space.yaml",
        &[("name: foo\n", "name: space\n"), (k, &space)],
    )
    .await?;
    derive_manifest(h, "other.yaml", &[("role: foo\n", "role: other\n")]).await?;
    let cases = [
        (
            "evil",
            "name: \"../../../etc/cron.d/evil\" is not a package name",
        ),
        (
            "dash",
            "supervisor.unit: \"-H evil.service\" is not a systemd service name",
        ),
        (
            "space",
            "supervisor.unit: \"sp ace.service\" is not a systemd service name",
        ),
        ("other", "must be named foo.yaml"),
    ];
    for (name, why) in cases {
        wait_refused(h, name, why).await?;
    }
    wait_report(h, "the refused manifests", |r| {
        cases.iter().all(|(name, why)| {
            service_in(r, name).is_some_and(|s| s["state"] == "refused")
                && r["events"].as_array().is_some_and(|evs| {
                    evs.iter().any(|e| {
                        e["kind"] == "refused"
                            && e["message"].as_str().is_some_and(|m| m.contains(why))
                    })
                })
        })
    })
    .await?;
    // The legitimate unit reached systemctl (so the stand-in is the one used) ...
    let start = Instant::now();
    while !h
        .ok("cat /tmp/systemctl.args")
        .await?
        .contains("ctl.service")
    {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "systemctl never asked about ctl.service"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ... the hostile ones never did, nothing landed outside the agent's directories, and foo
    // (whose name other.yaml claims) runs on undisturbed.
    let args = h.ok("cat /tmp/systemctl.args").await?;
    ensure!(!args.contains("evil") && !args.contains("ace"), "{args}");
    h.ok("test ! -e /etc/cron.d/evil.log && test ! -e /etc/cron.d/evil")
        .await?;
    let logs = h.ok("ls /var/log/keepup").await?;
    ensure!(
        logs.split_whitespace()
            .all(|f| f.starts_with("foo.log") || f.starts_with("ctl.log")),
        "{logs}"
    );
    let found = h
        .ok(&format!(
            "find / -xdev -newer /tmp/before -name '*evil*' -not -path '{MANIFESTS}/*' \
             -not -path '/tmp/*' 2>/dev/null; true"
        ))
        .await?;
    ensure!(found.trim().is_empty(), "{found}");
    let now = wait_banner(h, Duration::from_secs(5)).await?;
    ensure!(now == food, "food {food} was replaced by {now}");
    Ok(())
}

// ---- issue 13: readiness (sd_notify), watchdog, start order ----

/// The example with `ready: notify` (READY=1 four seconds after start) and a 2 s watchdog
/// whose pings stop while /tmp/stop-watchdog exists; food records start/stop in /tmp/order.log.
fn notify_spec(t: String) -> String {
    with_flags(
        quick(t).replace(
            "  kind: agent\n",
            "  kind: agent\n  ready: notify\n  watchdog: 2s\n  ready_timeout: 20s\n",
        ),
        &[
            "--ready-after",
            "4",
            "--watchdog-stop-file",
            "/tmp/stop-watchdog",
            "--events-file",
            "/tmp/order.log",
        ],
    )
}

/// foo's entry in `status --json`.
async fn foo_json(h: &Host) -> Result<serde_json::Value> {
    let v = status_json(h).await?;
    service_in(&v, "foo")
        .cloned()
        .with_context(|| format!("foo not in status: {v}"))
}

/// A daemon that sends READY=1 after 4 s is `starting` until then and `running` after; when
/// it stops sending WATCHDOG=1 it is killed and started again within the watchdog + 2 s, and
/// its last exit says why.
#[tokio::test(flavor = "multi_thread")]
async fn notify_readiness_and_watchdog() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let s = setup("agent-notify", notify_spec, "").await?;
    let h = &s.host;
    h.ok("touch /tmp/order.log && chmod 666 /tmp/order.log && dpkg -i /pkgs/foo.deb")
        .await?;
    start_agent(h).await?;
    // Starting while the daemon warms up: it answers its banner, but has not said READY=1.
    let svc = wait_status(h, "starting", Duration::from_secs(10), |s| {
        s.as_ref().is_some_and(|s| s.state == "starting")
    })
    .await?;
    ensure!(
        svc.as_ref()
            .is_some_and(|s| s.text.contains("not ready yet")),
        "{svc:?}"
    );
    // Another uid cannot speak for foo: its READY=1 is refused by the socket's permissions.
    let forged = h
        .exec(
            "setpriv --reuid nobody --regid nogroup --clear-groups python3 -c \"import socket; \
             s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); \
             s.sendto(b'READY=1', '/run/keepup-notify/foo')\"",
        )
        .await?;
    ensure!(
        forged.code != 0 && forged.stderr.contains("PermissionError"),
        "nobody could send to foo's notify socket: {forged:?}\n{}",
        h.exec("ls -la /run /run/keepup-notify; cat /usr/lib/keepup/services/foo.yaml; keepup-agent status --json; cat /var/log/keepup-agent.out")
            .await?
            .stdout
    );
    wait_banner(h, Duration::from_secs(10)).await?;
    let j = foo_json(h).await?;
    ensure!(j["state"] == "starting", "answers, but not ready yet: {j}");
    ensure!(
        j["status_text"]
            .as_str()
            .is_some_and(|t| t.starts_with("warming up")),
        "STATUS= shown: {j}"
    );
    wait_status(h, "running", Duration::from_secs(10), |s| {
        s.as_ref().is_some_and(|s| s.state == "running")
    })
    .await?;
    let j = foo_json(h).await?;
    let ready = j["ready_secs"].as_f64().context("ready_secs")?;
    ensure!((3.9..6.0).contains(&ready), "READY=1 after 4 s: {j}");
    ensure!(j["status_text"] == "serving", "{j}");
    let run = j["run"].as_u64().context("run id")?;

    // The watchdog: pings stop, the role is killed and food started again.
    h.ok("touch /tmp/stop-watchdog").await?;
    let stopped = Instant::now();
    let within = Duration::from_secs(2 + 2);
    loop {
        let j = foo_json(h).await?;
        if j["run"].as_u64().is_some_and(|r| r > run) {
            let last = j["last_exit"].as_str().unwrap_or_default();
            ensure!(last.contains("no WATCHDOG=1"), "the exit says why: {j}");
            break;
        }
        ensure!(
            stopped.elapsed() < within,
            "not restarted within {within:?} of the last ping: {j}\n{}",
            h.ok("tail -n 20 /var/log/keepup/foo.log").await?
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.ok("rm /tmp/stop-watchdog").await?;
    wait_status(h, "running again", Duration::from_secs(10), |s| {
        s.as_ref().is_some_and(|s| s.state == "running")
    })
    .await?;
    let log = h.ok(&format!("cat {AGENT_OUT}")).await?;
    ensure!(log.contains("no WATCHDOG=1"), "{log}");
    Ok(())
}

/// The script that adds service `bar` (a second food on other ports, its own role, after
/// foo), `lonely` (after a service that does not exist) and `ping`/`pong` (a cycle).
const ORDER_SERVICES: &str = r#"useradd --system -M -s /usr/sbin/nologin -c 'bar service (keepup)' bar
cat > /usr/local/sbin/run-bar <<'EOF'
#!/bin/sh
exec setpriv --reuid bar --regid bar --clear-groups /usr/bin/food --bind 127.0.0.1 \
  --banner-port 7090 --http-port 7091 --events-file /tmp/order.log
EOF
chmod 755 /usr/local/sbin/run-bar
manifest() {
cat > /usr/lib/keepup/services/$1.yaml.new <<EOT
format: 1
name: $1
version: 1.0.0-1
role: $1
launch: /usr/local/sbin/run-bar
supervisor:
  kind: agent
  count: 10
  within: 1m
  stop_grace: 2s
  ready: exec
  after: [$2]
checks: []
EOT
mv /usr/lib/keepup/services/$1.yaml.new /usr/lib/keepup/services/$1.yaml
}
manifest bar foo
manifest lonely nosuch
manifest ping pong
manifest pong ping"#;

/// Start order: `bar` (after foo) waits while foo is not ready, starts once it is, and stops
/// before it when the agent stops; a service after one that does not exist waits and says so;
/// a cycle is refused, naming it.
#[tokio::test(flavor = "multi_thread")]
async fn start_order_waits_for_readiness_and_stops_in_reverse() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let s = setup("agent-order", notify_spec, "").await?;
    let h = &s.host;
    h.ok("touch /tmp/order.log && chmod 666 /tmp/order.log && dpkg -i /pkgs/foo.deb")
        .await?;
    h.ok(ORDER_SERVICES).await?;
    start_agent(h).await?;
    let bar = loop {
        let v = status_json(h).await?;
        let foo = service_in(&v, "foo").cloned().unwrap_or_default();
        let bar = service_in(&v, "bar").cloned().unwrap_or_default();
        if foo["state"] == "starting" && bar["state"] == "waiting" {
            break bar;
        }
        ensure!(
            foo["state"] != "running",
            "bar was never seen waiting for foo: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(
        bar["note"]
            .as_str()
            .is_some_and(|n| n.contains("foo: starting")),
        "says what it waits for: {bar}"
    );
    let within = Instant::now();
    loop {
        let v = status_json(h).await?;
        let state = |n: &str| service_in(&v, n).map(|s| s["state"].clone());
        if state("bar") == Some("running".into()) {
            ensure!(state("foo") == Some("running".into()), "{v}");
            let lonely = service_in(&v, "lonely").cloned().unwrap_or_default();
            ensure!(lonely["state"] == "waiting", "{v}");
            ensure!(
                lonely["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("nosuch: not supervised on this host")),
                "{lonely}"
            );
            for n in ["ping", "pong"] {
                let c = service_in(&v, n).cloned().unwrap_or_default();
                ensure!(c["state"] == "refused", "{c}");
                ensure!(
                    c["note"].as_str().is_some_and(|t| t.contains("cycle")),
                    "the cycle is named: {c}"
                );
            }
            break;
        }
        ensure!(
            within.elapsed() < Duration::from_secs(20),
            "bar never started: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let order = h.ok("cat /tmp/order.log").await?;
    ensure!(
        order.lines().collect::<Vec<_>>() == ["7070 start", "7090 start"],
        "foo starts first: {order}"
    );
    // The agent stops: bar first, then foo.
    let pid = agent_pid(h).await?.context("agent pid")?;
    h.ok(&format!("kill -TERM {pid}")).await?;
    h.until_empty(
        "ps -eo args= | grep -x 'keepup-agent run' || true",
        Duration::from_secs(20),
    )
    .await?;
    let order = h.ok("cat /tmp/order.log").await?;
    ensure!(
        order.lines().collect::<Vec<_>>() == ["7070 start", "7090 start", "7090 stop", "7070 stop"],
        "bar stops before foo: {order}"
    );
    Ok(())
}
