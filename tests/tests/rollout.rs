//! Health-gated rollouts on a fleet of Debian host containers: `keepup promote --waves`
//! publishes a rollout, real agents install the new version only in open waves, and the gate in
//! `keepup serve` opens the next wave after the soak, or halts and rolls back when a host fails.
//! Checked on the hosts themselves (dpkg's log says when each installed what) against the
//! progress the gate signed (`keepup rollout status --json`).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use keepup_deploy::wire::rollout::{parse_waves, wave_of};
use keepup_tests::fleet::{converge, wait_for, AgentHost, Fleet, HostSpec, Timers};
use keepup_tests::host::docker_or_skip;
use serde_json::Value;

/// Short passes, so waves follow each other within seconds.
fn timers() -> Timers {
    Timers {
        schedule: "*/5 * * * * *".into(),
        stagger: Duration::from_secs(3),
        package_timeout: Duration::from_secs(60),
        report_every: Duration::from_secs(2),
    }
}

/// Fast probes, so a start is judged (and a bad one fails) within seconds.
fn quick(spec: String) -> String {
    spec.replace("grace: 2s", "grace: 1s")
        .replace("every: 10s", "every: 2s")
}

/// Unix time dpkg first logged `foo` `version` installed on `h`, if it did.
async fn installed_at(h: &AgentHost, version: &str) -> Result<Option<u64>> {
    let out = h
        .host
        .ok(&format!(
            "line=$(grep -m1 ' status installed foo:[a-z0-9]* {version}$' /var/log/dpkg.log) \
             && date -u -d \"$(echo \"$line\" | cut -c1-19)\" +%s || true"
        ))
        .await?;
    Ok(out.trim().parse().ok())
}

/// The rollout of foo into stable, as `keepup rollout status --json` shows it.
fn status(fleet: &Fleet) -> Result<Value> {
    let out = fleet.op(&["rollout", "status", "--track", "stable", "--json"])?;
    let rows: Value = serde_json::from_str(&out).context("rollout status --json")?;
    rows.as_array()
        .and_then(|a| a.iter().find(|r| r["rollout"]["name"] == "foo"))
        .cloned()
        .with_context(|| format!("no rollout of foo in {out}"))
}

/// A fleet of `names` (dpkg hosts) following stable, all running foo 1.0.0 (promoted at
/// once).
async fn stable_on_1_0(dir: &std::path::Path, names: &[&str]) -> Result<Fleet> {
    let specs: Vec<HostSpec> = names.iter().map(|n| HostSpec::deb(n)).collect();
    let fleet = Fleet::start(dir, &specs, &timers()).await?;
    fleet.op(&["assign", "*", "--track", "stable"])?;
    fleet.publish_example(dir, "1.0.0", quick)?;
    fleet.op(&["promote", "foo", "--to", "testing"])?;
    fleet.op(&["promote", "foo", "--to", "stable"])?;
    converge(&fleet, names, "1.0.0-1", Duration::from_secs(90)).await?;
    Ok(fleet)
}

/// The page's rollout section: an SVG bar whose rectangles count `hosts` hosts, one of them
/// healthy on the new version; rendered by headless Chromium into
/// `target/test-artifacts/rollout-page.png` for people to look at.
fn page_shows_the_spread(page: &str, hosts: usize) -> Result<()> {
    ensure!(
        page.contains("<h2>Rollouts</h2>"),
        "no rollout section:\n{page}"
    );
    let svg_start = page
        .find("<svg class=\"spread\"")
        .context("no spread bar on the page")?;
    let svg_len = page[svg_start..].find("</svg>").context("</svg>")?;
    let svg = &page[svg_start..svg_start + svg_len];
    ensure!(svg.contains("data-rollout=\"stable/foo/2.0.0-1\""), "{svg}");
    let counted: usize = svg
        .split("data-hosts=\"")
        .skip(1)
        .filter_map(|p| p.split('"').next()?.parse::<usize>().ok())
        .sum();
    ensure!(
        counted == hosts,
        "the bar counts {counted} hosts, not {hosts}: {svg}"
    );
    ensure!(svg.contains("healthy on the new version</title>"), "{svg}");

    let dir = keepup_tests::host::workspace_root().join("target/test-artifacts");
    std::fs::create_dir_all(&dir)?;
    let html = dir.join("rollout-page.html");
    let png = dir.join("rollout-page.png");
    std::fs::write(&html, page)?;
    let _ = std::fs::remove_file(&png);
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1100,900",
        ])
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", html.display()))
        .output()
        .context("running chromium (tests/run.sh installs it: apt-get install chromium)")?;
    let shot = std::fs::read(&png).with_context(|| {
        format!(
            "chromium made no screenshot: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    ensure!(
        shot.starts_with(b"\x89PNG") && shot.len() > 10_000,
        "{} is not a screenshot of the page",
        png.display()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_good_version_rolls_through_its_waves_in_order() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let names = ["canary-1", "web-1", "web-2", "web-3", "web-4", "web-5"];
    let fleet = stable_on_1_0(tmp.path(), &names).await?;

    fleet.publish_example(tmp.path(), "2.0.0", quick)?;
    fleet.op(&["promote", "foo", "--to", "testing"])?;
    let spec = "canary-1,50%,100%";
    let out = fleet.op(&[
        "promote", "foo", "--to", "stable", "--waves", spec, "--soak", "4s",
    ])?;
    ensure!(out.contains("rolling out in waves"), "{out}");
    let waves = parse_waves(spec).map_err(anyhow::Error::msg)?;

    // While wave 1 soaks, nobody else may have it: a host outside the open waves is held.
    let web = fleet.host("web-1");
    let held = wait_for(
        "web-1's plan to say it is held",
        Duration::from_secs(30),
        || async {
            Ok(web
                .host
                .exec("keepup-agent update --now 2>&1 | grep -q 'held: wave [23] not open'")
                .await?
                .code
                == 0
                || status(&fleet)?["progress"]["open"].as_u64() != Some(1))
        },
    )
    .await;
    fleet.explain(held).await?;

    // The gate's view: host counts per wave from the server, and the page's version spread.
    converge(&fleet, &["canary-1"], "2.0.0-1", Duration::from_secs(90)).await?;
    let counted = wait_for(
        "the gate to count a healthy canary",
        Duration::from_secs(30),
        || async {
            let out = fleet
                .server
                .ok("keepup rollout status --server http://127.0.0.1:8080 --json")
                .await?;
            let list: Value = serde_json::from_str(&out)?;
            Ok(list[0]["waves"][0]["healthy"] == 1)
        },
    )
    .await;
    fleet.explain(counted).await?;
    let table = fleet
        .server
        .ok("keepup rollout status --server http://127.0.0.1:8080")
        .await?;
    ensure!(
        table.contains("1: canary-1") && table.contains("NOT REPORTING"),
        "{table}"
    );
    let page = fleet.server_get("/").await?;
    page_shows_the_spread(&page, names.len())?;

    converge(&fleet, &names, "2.0.0-1", Duration::from_secs(180)).await?;
    let s = wait_for(
        "the rollout to be done",
        Duration::from_secs(60),
        || async { Ok(status(&fleet)?["progress"]["phase"] == "done") },
    )
    .await;
    fleet.explain(s).await?;
    let s = status(&fleet)?;
    let opened: Vec<u64> = s["progress"]["opened_at"]
        .as_array()
        .context("opened_at")?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    ensure!(opened.len() == 3, "three waves opened: {s}");
    // Each host installed the new version only after its wave opened.
    for name in names {
        let w = wave_of(&waves, "foo", name).context("every host is in a wave")?;
        let at = installed_at(fleet.host(name), "2.0.0-1")
            .await?
            .with_context(|| format!("dpkg on {name} never installed 2.0.0-1"))?;
        ensure!(
            at >= opened[w as usize - 1],
            "{name} (wave {w}) installed 2.0.0-1 at {at}, before its wave opened at {}: {s}",
            opened[w as usize - 1]
        );
    }
    // The gate waited for the soak between waves.
    for pair in opened.windows(2) {
        ensure!(pair[1] >= pair[0] + 4, "waves opened {opened:?}, soak 4s");
    }
    let history = s["progress"]["history"].to_string();
    ensure!(
        history.contains("wave 2 opened") && history.contains("done"),
        "{history}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_version_halts_at_the_canary_and_rolls_back() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let names = ["canary-1", "web-1", "web-2", "web-3", "web-4", "web-5"];
    let fleet = stable_on_1_0(tmp.path(), &names).await?;

    // 2.0.0 fails its health probe.
    fleet.publish_example(tmp.path(), "2.0.0", |s| {
        quick(s).replace(
            "exec: [/usr/bin/food, --config, /etc/foo/foo.conf]",
            "exec: [/usr/bin/food, --config, /etc/foo/foo.conf, --fail-health]",
        )
    })?;
    fleet.op(&["promote", "foo", "--to", "testing"])?;
    fleet.op(&[
        "promote",
        "foo",
        "--to",
        "stable",
        "--waves",
        "canary-1,100%",
        "--soak",
        "3s",
        "--on-failure",
        "rollback",
    ])?;
    let halted = wait_for(
        "the gate to roll the rollout back",
        Duration::from_secs(120),
        || async { Ok(status(&fleet)?["progress"]["phase"] == "rolled-back") },
    )
    .await;
    fleet.explain(halted).await?;
    let s = status(&fleet)?;
    ensure!(
        s["progress"]["failed"] == serde_json::json!(["canary-1"]),
        "{s}"
    );
    ensure!(
        s["progress"]["note"]
            .as_str()
            .is_some_and(|n| n.contains("canary-1") && n.contains("failed to start")),
        "{s}"
    );
    // The canary upgrades to the standby rollback (the old payload, a newer version).
    let rb = s["rollout"]["rollback"][0]["version"]
        .as_str()
        .context("a standby rollback")?
        .to_string();
    ensure!(rb.starts_with("2.0.0+rb1"), "{rb}");
    converge(&fleet, &["canary-1"], &rb, Duration::from_secs(90)).await?;
    let canary = fleet.host("canary-1");
    let banner = canary.host.ok("ps -u foo -o args=").await?;
    ensure!(
        !banner.contains("--fail-health"),
        "the canary runs the old payload: {banner}"
    );
    // The others never ran the bad version, and keep 1.0.0 (no rollback needed there).
    tokio::time::sleep(Duration::from_secs(8)).await;
    for name in &names[1..] {
        let h = fleet.host(name);
        ensure!(
            installed_at(h, "2.0.0-1").await?.is_none(),
            "{name} installed the bad version"
        );
        ensure!(
            h.installed("foo").await?.as_deref() == Some("1.0.0-1"),
            "{name} keeps 1.0.0-1"
        );
    }
    Ok(())
}

/// Where the fleet's repository is on the server host.
const REPO: &str = "/srv/repo";

#[tokio::test(flavor = "multi_thread")]
async fn pause_resume_and_a_restart_hold_and_the_rollout_key_signs_nothing_else() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let names = ["canary-1", "web-1"];
    let fleet = stable_on_1_0(tmp.path(), &names).await?;

    // Track defaults: a promotion without flags rolls out in waves.
    fleet.op(&[
        "rollout",
        "defaults",
        "--track",
        "stable",
        "--waves",
        "canary-1,100%",
        "--soak",
        "3s",
    ])?;
    fleet.publish_example(tmp.path(), "2.0.0", quick)?;
    fleet.op(&["promote", "foo", "--to", "testing"])?;
    let out = fleet.op(&["promote", "foo", "--to", "stable"])?;
    ensure!(out.contains("canary-1,100%"), "{out}");
    fleet.op(&["rollout", "pause", "foo", "--track", "stable"])?;

    // Paused: the open wave takes the version, the next stays closed past the soak, and a
    // server restart changes nothing.
    converge(&fleet, &["canary-1"], "2.0.0-1", Duration::from_secs(90)).await?;
    fleet.server.ok("pkill -x keepup || true").await?;
    fleet
        .server
        .ok(
            "setsid keepup serve --repo /srv/repo --state /var/lib/keepup/fleet.db \
             --listen 0.0.0.0:8080 >>/var/log/keepup-serve.out 2>&1 </dev/null &",
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let s = status(&fleet)?;
    ensure!(
        s["progress"]["phase"] == "paused" && s["progress"]["open"] == 1,
        "{s}"
    );
    let web = fleet.host("web-1");
    ensure!(
        web.installed("foo").await?.as_deref() == Some("1.0.0-1"),
        "web-1 took 2.0.0-1 while its wave was closed"
    );

    // Resumed: the restarted server's gate opens the last wave after the soak.
    fleet.op(&["rollout", "resume", "foo", "--track", "stable"])?;
    converge(&fleet, &["web-1"], "2.0.0-1", Duration::from_secs(120)).await?;
    let done = wait_for(
        "the rollout to be done",
        Duration::from_secs(60),
        || async { Ok(status(&fleet)?["progress"]["phase"] == "done") },
    )
    .await;
    fleet.explain(done).await?;

    // Whoever steals the rollout key (it is on the server) signs a policy binding an index
    // that changes foo's sha256 and adds a package: agents refuse it, as they refuse any
    // signature but the repository key's over policy and indexes.
    let policy = format!("{REPO}/fleet.yaml.asc");
    fleet
        .server
        .ok(&format!(
            "set -e; cp {policy} /root/policy.good; idx=$(mktemp); \
             sed -e 's/\"sha256\": \"[0-9a-f]*\"/\"sha256\": \"{zero}\"/' \
                 {REPO}/tracks/stable/index.json >$idx; \
             sum=$(sha256sum $idx | cut -d' ' -f1); \
             cp $idx {REPO}/tracks/stable/by-hash/SHA256/$sum; \
             serial=$(sed -n 's/^serial: //p' {REPO}/fleet.yaml); \
             iserial=$(sed -n 's/^  \"serial\": \\([0-9]*\\),/\\1/p' $idx | head -1); \
             {{ sed \"s/^serial: .*/serial: $((serial + 100))/\" {REPO}/fleet.yaml; \
                printf 'tracks:\\n  \"stable\": {{serial: %s, sha256: \"%s\"}}\\n' $iserial $sum; \
             }} >/root/policy.yaml; \
             export GNUPGHOME=$(mktemp -d); \
             gpg --batch --quiet --import {REPO}/.keepup/rollout-key.asc; \
             gpg --batch --yes --clearsign -o {policy} /root/policy.yaml; \
             gpg --batch --verify {policy}",
            zero = "0".repeat(64)
        ))
        .await?;
    let (code, v) = {
        let r = web.host.exec("keepup-agent update --now --json").await?;
        let v: Value = serde_json::from_str(&r.stdout).unwrap_or(Value::Null);
        (r.code, v)
    };
    let err = v["error"].as_str().unwrap_or_default();
    ensure!(
        code == 1 && err.contains("refused fleet.yaml.asc: bad signature"),
        "{v:#}"
    );
    ensure!(web.installed("foo").await?.as_deref() == Some("2.0.0-1"));
    fleet
        .server
        .ok(&format!("cp /root/policy.good {policy}"))
        .await?;
    Ok(())
}
