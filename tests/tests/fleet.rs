//! The whole loop on a small fleet of Debian host containers: the operator publishes and
//! promotes with `keepup`, `keepup serve` serves the repository and collects reports, and
//! keepup-agent (installed from its own package) on each host follows its track inside its
//! stagger slot, installs with real dpkg (and rpm on one host), removes quarantined services,
//! takes rollbacks as upgrades, confirms starts, and reports. Checked on the hosts themselves
//! and in `keepup report`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use keepup_tests::fleet::{
    converge, converged, host_view, service_view as row, stagger_offset, wait_for, Fleet, HostSpec,
    Timers,
};
use keepup_tests::host::docker_or_skip;
use serde_json::Value;

/// Gives the daemon a banner naming the build, so a payload can be told from another.
fn banner(tag: &str) -> impl Fn(String) -> String + '_ {
    move |spec: String| {
        spec.replace(
            "exec: [/usr/bin/food, --config, /etc/foo/foo.conf]",
            &format!("exec: [/usr/bin/food, --config, /etc/foo/foo.conf, --banner, \"food {tag} ready\"]"),
        )
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread")]
async fn hosts_follow_their_tracks_take_quarantine_and_rollback() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let timers = Timers {
        schedule: "*/30 * * * * *".into(),
        stagger: Duration::from_secs(20),
        ..Timers::default()
    };
    let hosts = [
        HostSpec::deb("testing-1"),
        HostSpec::deb("testing-2"),
        HostSpec::deb("stable-1"),
        HostSpec::deb("stable-2"),
        HostSpec::rpm("stable-rpm"),
    ];
    let fleet = Fleet::start(tmp.path(), &hosts, &timers).await?;
    fleet.op(&["assign", "testing-*", "--track", "testing"])?;
    fleet.op(&["assign", "stable-*", "--track", "stable"])?;
    let testing = ["testing-1", "testing-2"];
    let stable = ["stable-1", "stable-2", "stable-rpm"];
    let everyone = [&testing[..], &stable[..]].concat();
    let pass = Duration::from_secs(90);

    // 1.0.0 all the way to stable: every host runs it.
    fleet.publish_example(tmp.path(), "1.0.0", banner("payload-1.0"))?;
    fleet.op(&["promote", "foo", "--to", "testing"])?;
    fleet.op(&["promote", "foo", "--to", "stable"])?;
    converge(&fleet, &everyone, "1.0.0-1", pass).await?;

    // 1.1.0 to testing only: testing hosts upgrade, each inside its own stagger slot;
    // stable hosts stay.
    fleet.publish_example(tmp.path(), "1.1.0", banner("payload-1.1"))?;
    let promoted_at = now();
    fleet.op(&["promote", "foo", "--to", "testing"])?;
    converge(&fleet, &testing, "1.1.0-1", pass).await?;
    let report = fleet.report_json().await?;
    for name in testing {
        let offset = stagger_offset(name, timers.stagger).as_secs_f64();
        let events = report_events(&report, name);
        let upgrade = events
            .iter()
            .filter(|e| e["kind"] == "upgrade" && e["at"].as_u64().unwrap_or(0) >= promoted_at)
            .filter_map(|e| e["at"].as_u64())
            .next()
            .with_context(|| format!("no upgrade event for {name} in {events:?}"))?;
        // Passes start at :00 and :30 plus the host's offset; the install ends a few seconds
        // later. Event times are whole seconds, so "just before the slot" is on time too.
        let into_slot = (upgrade as f64 - offset).rem_euclid(30.0);
        ensure!(
            into_slot <= 8.0 || into_slot >= 28.5,
            "{name} upgraded {into_slot:.1}s after its slot (offset {offset:.1}s): not staggered"
        );
    }
    for name in stable {
        ensure!(
            fleet.host(name).installed("foo").await?.as_deref() == Some("1.0.0-1"),
            "{name} follows stable and must keep 1.0.0"
        );
    }
    let current = wait_for("the report to show every host current", pass, || async {
        Ok(converged(&fleet.report_json().await?, &everyone, "foo"))
    })
    .await;
    fleet.explain(current).await?;

    // Quarantine on stable-1 only: its package goes, the service is down there only.
    fleet.op(&["quarantine", "foo", "--hosts", "stable-1"])?;
    let s1 = fleet.host("stable-1");
    let removed = wait_for("stable-1 to remove foo", pass, || async {
        Ok(s1.installed("foo").await?.is_none())
    })
    .await;
    fleet.explain(removed).await?;
    s1.host
        .until_empty("pgrep -u foo || true", Duration::from_secs(20))
        .await?;
    ensure!(fleet.host("stable-2").installed("foo").await?.as_deref() == Some("1.0.0-1"));
    wait_for("the report to show the quarantine", pass, || async {
        let report = fleet.report_json().await?;
        Ok(row(&report, "stable-1", "foo").is_some_and(|r| r["status"] == "quarantined"))
    })
    .await?;
    fleet.op(&["unquarantine", "foo"])?;
    converge(&fleet, &["stable-1"], "1.0.0-1", pass).await?;

    // Roll stable back from 1.1.0 to 1.0.0: a newer version with the old payload.
    fleet.op(&["promote", "foo", "--to", "stable"])?;
    converge(&fleet, &stable, "1.1.0-1", pass).await?;
    fleet.op(&["rollback", "foo", "--to", "1.0.0", "--track", "stable"])?;
    converge(&fleet, &stable, "1.1.0+rb1-1", pass).await?;
    for name in ["stable-1", "stable-2"] {
        let b = fleet
            .host(name)
            .host
            .ok("nc -w 2 127.0.0.1 7070 </dev/null")
            .await?;
        ensure!(
            b.contains("payload-1.0"),
            "{name} runs the old payload: {b}"
        );
    }
    let report = fleet.report_json().await?;
    let r = row(&report, "stable-2", "foo").context("row stable-2")?;
    ensure!(r["status"] == "rolled back", "stable-2 row: {r}");
    Ok(())
}

/// The events the report holds for `host`.
fn report_events(report: &Value, host: &str) -> Vec<Value> {
    host_view(report, host)
        .and_then(|h| h["events"].as_array().cloned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_start_is_reported_and_outages_change_nothing() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let timers = Timers::default();
    let fleet = Fleet::start(tmp.path(), &[HostSpec::deb("web-1")], &timers).await?;
    fleet.op(&["assign", "*", "--track", "testing"])?;
    fleet.publish_example(tmp.path(), "1.0.0", |s| s)?;
    fleet.op(&["promote", "foo", "--to", "testing"])?;
    let pass = Duration::from_secs(60);
    converge(&fleet, &["web-1"], "1.0.0-1", pass).await?;
    let web = fleet.host("web-1");

    // The server goes away: the service keeps running, the agent keeps going; reports resume.
    fleet.server.ok("pkill -x keepup || true").await?;
    tokio::time::sleep(Duration::from_secs(12)).await;
    ensure!(
        web.host
            .exec("keepup-agent status | grep -q '^foo'")
            .await?
            .code
            == 0,
        "the agent still supervises foo"
    );
    ensure!(web.host.exec("pgrep -u foo food >/dev/null").await?.code == 0);
    let before = now();
    fleet
        .server
        .ok("setsid keepup serve --repo /srv/repo --state /var/lib/keepup/fleet.db --listen 0.0.0.0:8080 >>/var/log/keepup-serve.out 2>&1 </dev/null &")
        .await?;
    wait_for("reports to resume", Duration::from_secs(60), || async {
        let Ok(report) = fleet.report_json().await else {
            return Ok(false);
        };
        let seen = host_view(&report, "web-1")
            .and_then(|h| h["last_seen"].as_u64())
            .unwrap_or(0);
        Ok(seen >= before)
    })
    .await?;

    // A wrong or missing token is refused.
    for auth in ["", "-H 'Authorization: Bearer not-a-token'"] {
        let code = web
            .host
            .ok(&format!(
                "curl -s -o /dev/null -w '%{{http_code}}' {auth} -H 'Content-Type: application/json' \
                 --data '{{\"host\":\"web-1\",\"sent_at\":1}}' http://repo:8080/api/v1/report"
            ))
            .await?;
        ensure!(code.trim() == "401", "report with {auth:?}: HTTP {code}");
    }
    // An upgrade whose daemon fails its health probe: "failed to start" with the log tail.
    fleet.publish_example(tmp.path(), "1.2.0", |s| {
        s.replace(
            "exec: [/usr/bin/food, --config, /etc/foo/foo.conf]",
            "exec: [/usr/bin/food, --config, /etc/foo/foo.conf, --fail-health]",
        )
        .replace("grace: 2s", "grace: 1s")
        .replace("every: 10s", "every: 2s")
    })?;
    fleet.op(&["promote", "foo", "--to", "testing"])?;
    let failed = wait_for(
        "the report to say failed to start",
        Duration::from_secs(120),
        || async {
            let report = fleet.report_json().await?;
            Ok(row(&report, "web-1", "foo").is_some_and(|r| {
                r["failed_start"]["started"] == false && r["failed_start"]["version"] == "1.2.0-1"
            }))
        },
    )
    .await;
    fleet.explain(failed).await?;
    let table = fleet.report("--unhealthy").await?;
    ensure!(
        table.contains("failed to start"),
        "report --unhealthy:\n{table}"
    );
    let report = fleet.report_json().await?;
    let tail = row(&report, "web-1", "foo").unwrap()["failed_start"]["log_tail"].to_string();
    ensure!(
        tail.contains("food"),
        "the log tail holds the daemon's output: {tail}"
    );

    Ok(())
}

/// A server too busy to store a report (its database locked by another process) answers the
/// agent `503` with `Retry-After`; the real agent sends its next report after that wait, not
/// after its `report_every` of an hour, and the report is stored once the lock is gone.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_honours_a_busy_server_s_retry_after() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    // Passes (each ends with a report) once a year, reports every hour: any report in the
    // test comes from the start, `update --now`, or a retry.
    let timers = Timers {
        schedule: "0 0 0 1 1 *".into(),
        report_every: Duration::from_secs(3600),
        ..Timers::default()
    };
    let fleet = Fleet::start(tmp.path(), &[HostSpec::deb("web-1")], &timers).await?;
    let web = fleet.host("web-1");
    let seen = || async {
        let report = fleet.report_json().await?;
        Ok::<u64, anyhow::Error>(
            host_view(&report, "web-1")
                .and_then(|h| h["last_seen"].as_u64())
                .unwrap_or(0),
        )
    };
    let first = wait_for(
        "the agent's first report",
        Duration::from_secs(60),
        || async { Ok(seen().await? > 0) },
    )
    .await;
    fleet.explain(first).await?;

    // Another process holds the state database's write lock until /tmp/unlock appears.
    fleet
        .server
        .ok(r#"cat > /tmp/lock-db.py <<'PY'
import os, sqlite3, sys, time
c = sqlite3.connect("/var/lib/keepup/fleet.db", isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
open("/tmp/locked", "w").close()
while not os.path.exists("/tmp/unlock"):
    time.sleep(0.1)
PY
setsid python3 /tmp/lock-db.py >/tmp/lock-db.log 2>&1 </dev/null &
for i in $(seq 100); do test -e /tmp/locked && exit 0; sleep 0.1; done
cat /tmp/lock-db.log >&2; exit 1"#)
        .await?;
    // What the server holds once the lock is taken (read from its memory: the lock does not
    // stop reads). Times are whole seconds: a report stored just before the lock may carry
    // this very second, so later ones are told by being newer than it.
    let locked = seen().await?;
    // A pass ends with a report: the server holds it 10 s, then answers 503 + Retry-After.
    web.host.ok("keepup-agent update --now").await?;
    let asked = wait_for(
        "the agent to say it retries when the server asked",
        Duration::from_secs(60),
        || async { Ok(web.agent_log().await?.contains("as the server asked")) },
    )
    .await;
    fleet.explain(asked).await?;
    ensure!(
        seen().await? == locked,
        "a report was stored while the database was locked"
    );
    fleet.server.ok("touch /tmp/unlock").await?;
    // The next report comes at the server's Retry-After (seconds), not in an hour.
    let resumed = wait_for(
        "the report to be stored after the lock",
        Duration::from_secs(120),
        || async { Ok(seen().await? > locked) },
    )
    .await;
    fleet.explain(resumed).await?;
    Ok(())
}
