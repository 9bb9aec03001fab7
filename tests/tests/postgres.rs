//! The fleet state on PostgreSQL with two `keepup serve` replicas (issue 14): a real cluster
//! ([`keepup_tests::postgres`]) and the real `keepup` binary on loopback. Reports and tokens
//! go through either replica, the schema migrations run once when both start together, a
//! replica killed under load loses no report it accepted, both replicas storing at once lose
//! none and keep nothing of a host removed meanwhile, a database of the first schema starts
//! and shows what it holds, and bad credentials or an unreachable database stop the server at
//! start with a clear message.
//!
//! `KEEPUP_SKIP_POSTGRES_TESTS=1` skips these tests.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use keepup_tests::example::built_bin;
use keepup_tests::fleet::{keepup, keepup_output, TestCa};
use keepup_tests::postgres::{postgres_or_skip, PgCluster, PgTls, PASSWORD};
use keepup_tests::testkit::{copy_dir, template_repo, wait_until};
use serde_json::{json, Value};

/// A `keepup serve --state postgres://...` replica; stderr goes to a file.
struct Replica {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Replica {
    /// Spawn (not waiting for it to listen). The password travels in `PGPASSWORD` when
    /// `url` has none.
    fn spawn(repo: &Path, url: &str, log: PathBuf) -> Result<Replica> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(built_bin("keepup")?)
            .args(["serve", "--no-refresh", "--repo"])
            .arg(repo)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--state", url])
            .env("PGPASSWORD", PASSWORD)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        Ok(Replica { child, port, log })
    }

    fn wait_listening(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(st) = self.child.try_wait()? {
                bail!("keepup serve exited ({st}):\n{}", self.stderr());
            }
            ensure!(
                Instant::now() < deadline,
                "keepup serve did not listen:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Two replicas started together on one fresh database.
fn two_replicas(pg: &PgCluster, dir: &Path) -> Result<(Replica, Replica)> {
    let repo = template_repo("pg")?;
    // A has the password in its URL, B takes it from PGPASSWORD.
    let mut a = Replica::spawn(&repo, &pg.url(true), dir.join("a.log"))?;
    let mut b = Replica::spawn(&repo, &pg.url(false), dir.join("b.log"))?;
    a.wait_listening()?;
    b.wait_listening()?;
    Ok((a, b))
}

/// POST a report; the HTTP status (0 when the connection failed).
fn post(port: u16, token: &str, body: &str) -> u16 {
    let go = || -> Result<u16> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "POST /api/v1/report HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
             Content-Type: application/json\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        Ok(raw
            .split_whitespace()
            .nth(1)
            .context("no status")?
            .parse()?)
    };
    go().unwrap_or(0)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A report of `host` running foo `version`, with one event naming `mark`.
fn report(host: &str, version: &str, mark: &str) -> String {
    json!({"host": host, "agent_version": "0.1.0", "sent_at": now(), "track": "stable",
        "format": "deb", "arch": "amd64", "installed": {"foo": version},
        "services": [{"name": "foo", "version": version, "state": "running", "restarts": 0,
            "probes": []}],
        "update": {"at": now(), "ok": true},
        "events": [{"at": now(), "service": "foo", "kind": "install", "message": mark}]})
    .to_string()
}

/// `keepup report --json` through `server`: host -> foo's version.
fn versions_via(server: &str) -> Result<Vec<(String, String)>> {
    let out = keepup(&["report", "--server", server, "--json"])?;
    let v: Value = serde_json::from_str(&out)?;
    Ok(v["hosts"]
        .as_array()
        .context("no hosts in the report")?
        .iter()
        .map(|h| {
            let version = h["services"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["name"] == "foo"))
                .map(|s| s["installed"].as_str().unwrap_or("").to_string())
                .unwrap_or_default();
            (h["host"].as_str().unwrap_or("").to_string(), version)
        })
        .collect())
}

#[test]
fn replicas_share_reports_and_tokens_and_migrate_once() -> Result<()> {
    if !postgres_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let pg = PgCluster::start()?;
    let (a, b) = two_replicas(&pg, tmp.path())?;

    // Both started together; each of the schema's migrations was applied once, by one of
    // them.
    let applied = [&a, &b]
        .iter()
        .filter(|r| r.stderr().contains("applied migration 1"))
        .count();
    let applied_2 = [&a, &b]
        .iter()
        .filter(|r| r.stderr().contains("applied migration 2"))
        .count();
    ensure!(
        applied_2 == 1,
        "migration 2 applied by {applied_2} replicas"
    );
    ensure!(
        applied == 1,
        "migration applied by {applied} replicas:\nA: {}\nB: {}",
        a.stderr(),
        b.stderr()
    );
    ensure!(
        pg.psql(
            "fleet",
            "SELECT version FROM keepup_migrations ORDER BY version"
        )?
        .split_whitespace()
        .collect::<Vec<_>>()
            == ["1", "2", "3", "4"]
    );

    // A host registered while both run (the URL without a password: PGPASSWORD).
    let url = pg.url(false);
    let token = |host: &str| -> Result<String> {
        let out = Command::new(built_bin("keepup")?)
            .args(["host", "add", host, "--state", &url])
            .env("PGPASSWORD", PASSWORD)
            .output()?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    };
    let t1 = token("web1")?;
    // Its token works on A; the report is then visible through B.
    wait_until("A takes web1's token", Duration::from_secs(10), || {
        Ok(post(a.port, &t1, &report("web1", "1.2-1", "a1")) == 204)
    })?;
    wait_until("web1's report through B", Duration::from_secs(10), || {
        Ok(versions_via(&b.url())?.contains(&("web1".into(), "1.2-1".into())))
    })?;
    // A token added later works on both, and a report to B shows through A.
    let t2 = token("web2")?;
    wait_until("B takes web2's token", Duration::from_secs(10), || {
        Ok(post(b.port, &t2, &report("web2", "1.1-1", "b1")) == 204)
    })?;
    wait_until("A takes web2's token", Duration::from_secs(10), || {
        Ok(post(a.port, &t2, &report("web2", "1.3-1", "a2")) == 204)
    })?;
    wait_until(
        "web2's latest report through B",
        Duration::from_secs(10),
        || Ok(versions_via(&b.url())?.contains(&("web2".into(), "1.3-1".into()))),
    )?;
    // Each event was logged once, whichever replica took the report.
    let events = pg.psql(
        "fleet",
        "SELECT message FROM events WHERE host = 'web2' ORDER BY id",
    )?;
    ensure!(
        events.split_whitespace().collect::<Vec<_>>() == ["b1", "a2"],
        "{events}"
    );
    // The events API of either replica reads them from the database, newest first.
    for r in [&a, &b] {
        let mut c = TcpStream::connect(("127.0.0.1", r.port))?;
        c.set_read_timeout(Some(Duration::from_secs(30)))?;
        c.write_all(
            b"GET /api/v1/events?host=web2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )?;
        let mut raw = String::new();
        c.read_to_string(&mut raw)?;
        let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let list: Vec<Value> = serde_json::from_str(body).with_context(|| raw.clone())?;
        let messages: Vec<&str> = list.iter().filter_map(|e| e["message"].as_str()).collect();
        ensure!(messages == ["a2", "b1"], "{raw}");
    }
    // Attack: a host (its token) sends an event holding NUL, which a PostgreSQL TEXT value
    // cannot hold. Stored as it was, it would fail the whole batch it joins (every host's
    // reports in it) on every retry; it is stored with U+FFFD instead and all goes on.
    ensure!(post(a.port, &t2, &report("web2", "1.3-1", "nul\u{0}here")) == 204);
    ensure!(post(b.port, &t2, &report("web2", "1.3-1", "after")) == 204);
    let events = pg.psql(
        "fleet",
        "SELECT message FROM events WHERE host = 'web2' ORDER BY id",
    )?;
    ensure!(
        events.split_whitespace().collect::<Vec<_>>() == ["b1", "a2", "nul\u{FFFD}here", "after"],
        "{events}"
    );
    // A removed host's token stops working on both.
    keepup(&["host", "remove", "web1", "--state", &pg.url(true)])?;
    for r in [&a, &b] {
        wait_until("web1's token refused", Duration::from_secs(10), || {
            Ok(post(r.port, &t1, &report("web1", "1.2-1", "x")) == 401)
        })?;
    }
    // Nothing of it is left in the database.
    ensure!(
        pg.psql(
            "fleet",
            "SELECT (SELECT count(*) FROM reports WHERE host = 'web1') \
             + (SELECT count(*) FROM events WHERE host = 'web1')"
        )?
        .trim()
            == "0"
    );
    // `keepup host list` reads the same database.
    let list = keepup(&["host", "list", "--state", &pg.url(true)])?;
    ensure!(list.contains("web2") && !list.contains("web1"), "{list}");
    Ok(())
}

#[test]
fn a_replica_killed_under_load_loses_no_accepted_report() -> Result<()> {
    if !postgres_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let pg = PgCluster::start()?;
    let (mut a, b) = two_replicas(&pg, tmp.path())?;
    const HOSTS: usize = 400;
    let names: Vec<String> = (0..HOSTS).map(|i| format!("load{i:03}")).collect();
    let tokens = add_bulk(&pg, &names)?;
    let first = &tokens[0];
    wait_until("A knows the new tokens", Duration::from_secs(10), || {
        Ok(post(a.port, &first.1, &report(&first.0, "1.0-1", "warmup")) == 204)
    })?;

    // 8 clients post one report per host to A; A is SIGKILLed once 100 were accepted.
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let tokens = Arc::new(tokens);
    let port = a.port;
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (accepted, count, failed, tokens) = (
                accepted.clone(),
                count.clone(),
                failed.clone(),
                tokens.clone(),
            );
            std::thread::spawn(move || {
                for (host, token) in tokens.iter().skip(1).skip(c).step_by(8) {
                    match post(port, token, &report(host, "2.0-1", &format!("load-{host}"))) {
                        204 => {
                            accepted.lock().unwrap().push(host.clone());
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        0 => {}
                        _ => failed.store(true, Ordering::SeqCst),
                    }
                }
            })
        })
        .collect();
    wait_until("100 reports accepted", Duration::from_secs(60), || {
        Ok(count.load(Ordering::SeqCst) >= 100)
    })?;
    a.kill();
    for c in clients {
        c.join().unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    ensure!(
        !failed.load(Ordering::SeqCst),
        "a report got an error answer"
    );
    ensure!(
        accepted.len() < HOSTS - 1,
        "A was killed after the run ended ({} accepted): the test shows nothing",
        accepted.len()
    );
    // Every accepted report is in the database, with its event.
    let stored = pg.psql(
        "fleet",
        "SELECT r.host FROM reports r JOIN events e ON e.host = r.host \
         AND e.message = 'load-' || r.host \
         WHERE r.report LIKE '%2.0-1%' OR (r.report = '' AND r.packed IS NOT NULL)",
    )?;
    let stored: std::collections::HashSet<&str> = stored.lines().collect();
    let lost: Vec<&String> = accepted
        .iter()
        .filter(|h| !stored.contains(h.as_str()))
        .collect();
    ensure!(
        lost.is_empty(),
        "{} of {} accepted reports are not in the database: {lost:?}",
        lost.len(),
        accepted.len()
    );
    // B, still up, shows them (it reads what A stored every second).
    let mut missing = Vec::new();
    wait_until(
        "B shows every accepted report",
        Duration::from_secs(10),
        || {
            let via_b = versions_via(&b.url())?;
            missing = accepted
                .iter()
                .filter(|h| !via_b.contains(&((*h).clone(), "2.0-1".into())))
                .cloned()
                .collect();
            Ok(missing.is_empty())
        },
    )
    .with_context(|| format!("not shown through B: {missing:?}"))?;
    eprintln!(
        "{} reports accepted before A was killed, all stored",
        accepted.len()
    );
    Ok(())
}

/// Register `names` with `keepup host add --bulk`: (host, token) in the same order.
#[test]
fn a_store_that_commits_after_a_later_one_is_still_read_by_the_other_replicas() -> Result<()> {
    if !postgres_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let pg = PgCluster::start()?;
    let (a, b) = two_replicas(&pg, tmp.path())?;
    let tokens = add_bulk(&pg, &["seed".into(), "early".into(), "late".into()])?;
    let token = |h: &str| tokens.iter().find(|(n, _)| n == h).unwrap().1.clone();
    // A reads what B stores.
    wait_until("B takes seed's report", Duration::from_secs(10), || {
        Ok(post(b.port, &token("seed"), &report("seed", "1.0-1", "seed")) == 204)
    })?;
    wait_until("A shows seed's report", Duration::from_secs(10), || {
        Ok(versions_via(&a.url())?.contains(&("seed".into(), "1.0-1".into())))
    })?;

    // A store that began first and commits last: a session of its own (standing for a
    // replica slow to commit) writes late's report, a copy of seed's row, and stays open.
    let mut late = pg.psql_session("fleet")?;
    let mut to_late = late.stdin.take().context("psql stdin")?;
    let mut from_late = std::io::BufReader::new(late.stdout.take().context("psql stdout")?);
    writeln!(
        to_late,
        "BEGIN; INSERT INTO reports(host, received_at, sent_at, report, packed, summary, replica) \
         SELECT 'late', received_at, sent_at, report, packed, summary, 'psql' \
         FROM reports WHERE host = 'seed'; SELECT 'written';"
    )?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut from_late, &mut line)?;
    ensure!(line.trim() == "written", "psql said {line:?}");

    // Meanwhile B stores early's report and commits, and A reads (every second) while late's
    // transaction is still open: a reader that took what had committed and moved past it
    // would never read late's report.
    ensure!(post(b.port, &token("early"), &report("early", "2.0-1", "early")) == 204);
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        !versions_via(&a.url())?.contains(&("late".into(), "1.0-1".into())),
        "A shows a report whose transaction has not committed"
    );
    writeln!(to_late, "COMMIT;")?;
    drop(to_late);
    ensure!(late.wait()?.success(), "psql failed");

    wait_until(
        "A shows both early's and late's reports",
        Duration::from_secs(10),
        || {
            let shown = versions_via(&a.url())?;
            Ok(shown.contains(&("early".into(), "2.0-1".into()))
                && shown.contains(&("late".into(), "1.0-1".into())))
        },
    )
    .with_context(|| format!("A shows {:?}", versions_via(&a.url()).unwrap_or_default()))?;
    Ok(())
}

fn add_bulk(pg: &PgCluster, names: &[String]) -> Result<Vec<(String, String)>> {
    let mut add = Command::new(built_bin("keepup")?)
        .args(["host", "add", "--bulk", "--state", &pg.url(true)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    add.stdin
        .take()
        .unwrap()
        .write_all(names.join("\n").as_bytes())?;
    let out = add.wait_with_output()?;
    ensure!(out.status.success());
    let tokens: Vec<(String, String)> = String::from_utf8(out.stdout)?
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(h, t)| (h.to_string(), t.to_string()))
        .collect();
    ensure!(tokens.len() == names.len());
    Ok(tokens)
}

#[test]
fn replicas_storing_at_once_lose_nothing_and_keep_nothing_of_removed_hosts() -> Result<()> {
    if !postgres_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let pg = PgCluster::start()?;
    let (a, b) = two_replicas(&pg, tmp.path())?;
    const HOSTS: usize = 240;
    const ROUNDS: usize = 3;
    const REMOVED: usize = 40;
    let names: Vec<String> = (0..HOSTS).map(|i| format!("both{i:03}")).collect();
    let tokens = add_bulk(&pg, &names)?;
    let last = tokens.last().unwrap().clone();
    for r in [&a, &b] {
        wait_until(
            "the replicas know the tokens",
            Duration::from_secs(10),
            || Ok(post(r.port, &last.1, &report(&last.0, "1.0-1", "warmup")) == 204),
        )?;
    }

    // 8 clients, each host's reports in order, round k of host i to replica (i + k) % 2;
    // meanwhile the first REMOVED hosts are removed one at a time.
    let ports = [a.port, b.port];
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let tokens = Arc::new(tokens);
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (accepted, failed, tokens) = (accepted.clone(), failed.clone(), tokens.clone());
            std::thread::spawn(move || {
                for k in 0..ROUNDS {
                    for (i, (host, token)) in tokens.iter().enumerate().skip(c).step_by(8) {
                        let mark = format!("r{k}-{host}");
                        let version = format!("2.{k}-1");
                        match post(ports[(i + k) % 2], token, &report(host, &version, &mark)) {
                            204 => accepted.lock().unwrap().push((host.clone(), k)),
                            // A removed host's token is refused.
                            401 if i < REMOVED => {}
                            code => failed.lock().unwrap().push((host.clone(), k, code)),
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for host in &names[..REMOVED] {
        keepup(&["host", "remove", host, "--state", &pg.url(true)])?;
    }
    for c in clients {
        c.join().unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    ensure!(failed.is_empty(), "answers other than 204: {failed:?}");
    let accepted = accepted.lock().unwrap().clone();
    ensure!(
        accepted.iter().any(|(h, _)| names[..REMOVED].contains(h)),
        "no removed host was accepted before its removal: the test shows nothing"
    );

    // A removed host keeps no report and no event, whichever replica stored its last one.
    let left = pg.psql(
        "fleet",
        &format!(
            "SELECT host FROM reports WHERE host < '{0}' UNION ALL \
             SELECT host FROM events WHERE host < '{0}'",
            names[REMOVED]
        ),
    )?;
    ensure!(left.trim().is_empty(), "left of removed hosts: {left}");
    // Every other host: its last report stored, and each accepted report's event once, in
    // order.
    let events = pg.psql(
        "fleet",
        "SELECT host || ' ' || message FROM events ORDER BY id",
    )?;
    let mut logged: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    for line in events.lines() {
        if let Some((h, m)) = line.split_once(' ') {
            logged.entry(h).or_default().push(m);
        }
    }
    for host in &names[REMOVED..] {
        let want: Vec<String> = accepted
            .iter()
            .filter(|(h, _)| h == host)
            .map(|(_, k)| format!("r{k}-{host}"))
            .collect();
        let got: Vec<&str> = logged
            .get(host.as_str())
            .map(|v| v.iter().copied().filter(|m| *m != "warmup").collect())
            .unwrap_or_default();
        ensure!(got == want, "{host}: events {got:?}, accepted {want:?}");
    }
    let newest = format!("2.{}-1", ROUNDS - 1);
    for r in [&a, &b] {
        let mut missing = Vec::new();
        wait_until(
            "both replicas show the last reports",
            Duration::from_secs(10),
            || {
                let shown = versions_via(&r.url())?;
                missing = names[REMOVED..]
                    .iter()
                    .filter(|h| !shown.contains(&((*h).clone(), newest.clone())))
                    .cloned()
                    .collect();
                Ok(missing.is_empty())
            },
        )
        .with_context(|| format!("not shown through {}: {missing:?}", r.url()))?;
    }

    // Reports of one host racing into one batch (one statement cannot update a row twice):
    // all are stored, each event once.
    let (host, token) = &tokens[HOSTS - 1];
    let racers: Vec<_> = (0..16)
        .map(|i| {
            let (host, token) = (host.clone(), token.clone());
            std::thread::spawn(move || {
                post(
                    ports[0],
                    &token,
                    &report(&host, "3.0-1", &format!("race{i}")),
                )
            })
        })
        .collect();
    let codes: Vec<u16> = racers.into_iter().map(|t| t.join().unwrap()).collect();
    ensure!(codes.iter().all(|c| *c == 204), "{codes:?}");
    let raced = pg.psql(
        "fleet",
        &format!("SELECT count(*) FROM events WHERE host = '{host}' AND message LIKE 'race%'"),
    )?;
    ensure!(raced.trim() == "16", "{raced}");
    Ok(())
}

/// Migration 1 as released: the schema a database made before summaries has.
const FIRST_SCHEMA: &str = "CREATE TABLE keepup_migrations (version INTEGER PRIMARY KEY,
        applied_at BIGINT NOT NULL);
    INSERT INTO keepup_migrations VALUES (1, 0);
    CREATE TABLE hosts (name TEXT PRIMARY KEY, token_sha256 BYTEA NOT NULL UNIQUE,
        added_at BIGINT NOT NULL);
    CREATE SEQUENCE report_seq;
    CREATE TABLE reports (host TEXT PRIMARY KEY, received_at BIGINT NOT NULL,
        sent_at BIGINT NOT NULL, report TEXT NOT NULL, seq BIGINT NOT NULL,
        replica TEXT NOT NULL);
    CREATE INDEX reports_seq ON reports(seq);
    CREATE TABLE events (id BIGSERIAL PRIMARY KEY, host TEXT NOT NULL, at BIGINT NOT NULL,
        service TEXT, kind TEXT NOT NULL, message TEXT NOT NULL, received_at BIGINT NOT NULL);
    CREATE INDEX events_host_id ON events(host, id);
    CREATE INDEX events_received ON events(received_at);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
    INSERT INTO meta(key, value) VALUES ('hosts_version', 1), ('pruned_at', 0);";

#[test]
fn a_database_of_the_first_schema_starts_and_shows_what_it_holds() -> Result<()> {
    if !postgres_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let pg = PgCluster::start()?;
    pg.psql("fleet", FIRST_SCHEMA)?;
    let body = report("web1", "1.4-1", "old").replace('\'', "''");
    pg.psql(
        "fleet",
        &format!(
            "INSERT INTO hosts VALUES ('web1', sha256('tok-web1'), 1);
             INSERT INTO reports VALUES ('web1', {}, {}, '{body}', nextval('report_seq'), 'old')",
            now(),
            now()
        ),
    )?;
    let repo = template_repo("pg")?;
    let mut a = Replica::spawn(&repo, &pg.url(true), tmp.path().join("a.log"))?;
    a.wait_listening()?;
    ensure!(a.stderr().contains("applied migration 2"), "{}", a.stderr());
    ensure!(
        versions_via(&a.url())? == [("web1".to_string(), "1.4-1".to_string())],
        "{}",
        a.stderr()
    );
    // Its summary was made from the body once, and the next start reads it.
    ensure!(
        pg.psql("fleet", "SELECT summary IS NOT NULL FROM reports")?
            .trim()
            == "t"
    );
    a.kill();
    let mut again = Replica::spawn(&repo, &pg.url(true), tmp.path().join("b.log"))?;
    again.wait_listening()?;
    ensure!(
        !again.stderr().contains("no summary yet"),
        "{}",
        again.stderr()
    );
    ensure!(versions_via(&again.url())? == [("web1".to_string(), "1.4-1".to_string())]);
    // The host's token, as the first schema stored it, still works.
    ensure!(post(again.port, "tok-web1", &report("web1", "1.5-1", "new")) == 204);
    // Its new report's body is stored packed (migration 3), and read back as JSON when a
    // server has to make the summary from it.
    ensure!(
        pg.psql(
            "fleet",
            "SELECT report = '' AND packed IS NOT NULL FROM reports WHERE host = 'web1'"
        )?
        .trim()
            == "t"
    );
    again.kill();
    pg.psql("fleet", "UPDATE reports SET summary = NULL")?;
    let mut third = Replica::spawn(&repo, &pg.url(true), tmp.path().join("c.log"))?;
    third.wait_listening()?;
    ensure!(
        versions_via(&third.url())? == [("web1".to_string(), "1.5-1".to_string())],
        "{}",
        third.stderr()
    );
    Ok(())
}

#[test]
fn retention_drops_only_events_older_than_the_cutoff() -> Result<()> {
    if !postgres_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let pg = PgCluster::start()?;
    let repo = template_repo("pg")?;
    let mut a = Replica::spawn(&repo, &pg.url(true), tmp.path().join("a.log"))?;
    a.wait_listening()?;
    let tokens = add_bulk(&pg, &["web1".to_string()])?;
    // Events received 8 days ago (the age limit is 7), logged before the host's report...
    let aged = |what: &str| {
        let old = now() - 8 * 86_400;
        format!(
            "INSERT INTO events(host, at, service, kind, message, received_at)
             SELECT 'web1', {old}, 'foo', 'install', '{what} ' || i, {old}
             FROM generate_series(1, 3) i"
        )
    };
    pg.psql("fleet", &aged("aged"))?;
    wait_until(
        "the replica knows the token",
        Duration::from_secs(10),
        || Ok(post(a.port, &tokens[0].1, &report("web1", "1.4-1", "fresh")) == 204),
    )?;
    // ... and after it: the log is walked by id and stops at the first event it keeps, so
    // these wait for the fresh one (late, never early).
    pg.psql("fleet", &aged("late"))?;
    let count = |like: &str| -> Result<u32> {
        Ok(pg
            .psql(
                "fleet",
                &format!("SELECT count(*) FROM events WHERE message LIKE '{like}%'"),
            )?
            .trim()
            .parse()?)
    };
    ensure!(count("aged")? == 3);
    // The first retention runs a minute after the start.
    wait_until("the retention ran", Duration::from_secs(120), || {
        Ok(count("aged")? == 0)
    })
    .with_context(|| a.stderr())?;
    ensure!(
        count("fresh")? >= 1 && count("late")? == 3,
        "{}",
        a.stderr()
    );
    Ok(())
}

#[test]
fn a_wrong_password_or_an_unreachable_database_stops_the_start() -> Result<()> {
    if !postgres_or_skip() {
        return Ok(());
    }
    let pg = PgCluster::start()?;
    let repo = template_repo("pg")?;
    let serve = |url: &str| -> Result<String> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let out = Command::new(built_bin("keepup")?)
            .args(["serve", "--no-refresh", "--repo"])
            .arg(&repo)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--state", url])
            .env_remove("PGPASSWORD")
            .output()?;
        ensure!(!out.status.success(), "keepup serve started with {url}");
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let wrong = format!(
        "postgres://keepup:not-the-password@127.0.0.1:{}/fleet",
        pg.port()
    );
    let err = serve(&wrong)?;
    ensure!(
        err.contains("refused user \"keepup\"") && err.contains("password"),
        "{err}"
    );
    ensure!(
        !err.contains("not-the-password"),
        "the password is shown: {err}"
    );
    // `keepup host` says the same.
    let (ok, _, err) = keepup_output(&["host", "list", "--state", &wrong])?;
    ensure!(!ok && err.contains("refused user"), "{err}");

    // A URL that is refused before connecting: the message does not repeat it (clap's own
    // error would print the value, password and all).
    let refused = format!(
        "postgres://keepup:s3cret-pw@127.0.0.1:{}/fleet?sslmode=maybe",
        pg.port()
    );
    let err = serve(&refused)?;
    ensure!(
        err.contains("sslmode=maybe") && !err.contains("s3cret-pw"),
        "{err}"
    );
    let (ok, _, err) = keepup_output(&["host", "list", "--state", &refused])?;
    ensure!(!ok && !err.contains("s3cret-pw"), "{err}");
    // Nothing listens on this port.
    let free = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let err = serve(&format!("postgres://keepup:x@127.0.0.1:{free}/fleet"))?;
    ensure!(
        err.contains(&format!(
            "cannot reach PostgreSQL at postgres://keepup@127.0.0.1:{free}/fleet"
        )),
        "{err}"
    );
    // A database that does not exist.
    let err = serve(&format!(
        "postgres://keepup:{PASSWORD}@127.0.0.1:{}/nosuchdb",
        pg.port()
    ))?;
    ensure!(err.contains("database does not exist"), "{err}");
    Ok(())
}

#[test]
fn one_replica_at_a_time_evaluates_the_rollout_gates() -> Result<()> {
    if !postgres_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    // A repository of its own with foo rolling out in waves on stable.
    let repo = tmp.path().join("repo");
    copy_dir(&template_repo("pg")?, &repo)?;
    let r = repo.to_str().unwrap();
    keepup(&["assign", "--repo", r, "*", "--track", "stable"])?;
    for (version, waves) in [("1.0.0", None), ("1.1.0", Some("canary-1,100%"))] {
        let (deb, _) = keepup_tests::testkit::keepup_pack_example(
            &tmp.path().join(version),
            version,
            None,
            |s| s,
        )?;
        keepup(&["publish", deb.to_str().unwrap(), "--repo", r])?;
        keepup(&["promote", "foo", "--to", "testing", "--repo", r])?;
        let mut promote = vec!["promote", "foo", "--to", "stable", "--repo", r];
        if let Some(w) = waves {
            promote.extend(["--waves", w, "--soak", "1h"]);
        }
        keepup(&promote)?;
    }
    let pg = PgCluster::start()?;
    let mut a = Replica::spawn(&repo, &pg.url(true), tmp.path().join("a.log"))?;
    let mut b = Replica::spawn(&repo, &pg.url(true), tmp.path().join("b.log"))?;
    a.wait_listening()?;
    b.wait_listening()?;
    const LEADS: &str = "this replica evaluates the rollout gates now";
    let mut leader = None;
    wait_until(
        "a replica takes the gate's lease",
        Duration::from_secs(15),
        || {
            leader = match (a.stderr().contains(LEADS), b.stderr().contains(LEADS)) {
                (true, false) => Some(true),
                (false, true) => Some(false),
                (true, true) => bail!(
                    "both replicas evaluate the gates:\nA: {}\nB: {}",
                    a.stderr(),
                    b.stderr()
                ),
                (false, false) => None,
            };
            Ok(leader.is_some())
        },
    )?;
    // Some ticks later, still one.
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        !(a.stderr().contains(LEADS) && b.stderr().contains(LEADS)),
        "both replicas evaluate the gates"
    );
    // The leader freezes (SIGSTOP; its kernel still answers TCP keepalives): its idle lease
    // session is ended by the server and the other replica takes the lease. Woken, the
    // frozen one finds its session gone and steps down.
    const STEPS_DOWN: &str = "another replica evaluates the rollout gates now";
    let (first, second) = if leader == Some(true) {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let pid = nix::unistd::Pid::from_raw(first.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
    let frozen = Instant::now();
    let taken = wait_until(
        "the other replica takes the lease from the frozen one",
        Duration::from_secs(45),
        || Ok(second.stderr().contains(LEADS)),
    )
    .with_context(|| second.stderr());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
    taken?;
    eprintln!(
        "the lease moved {:?} after its holder froze",
        frozen.elapsed()
    );
    wait_until(
        "the woken replica steps down",
        Duration::from_secs(10),
        || Ok(first.stderr().contains(STEPS_DOWN)),
    )
    .with_context(|| first.stderr())?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        first.stderr().matches(LEADS).count() == 1,
        "the woken replica took the lease back while the other holds it:\n{}",
        first.stderr()
    );
    // The holder dies: the first takes the lease again.
    second.kill();
    wait_until(
        "the first replica takes the lease again",
        Duration::from_secs(15),
        || Ok(first.stderr().matches(LEADS).count() == 2),
    )
    .with_context(|| first.stderr())?;
    Ok(())
}

/// `keepup host list --state URL` with the password in `PGPASSWORD`: (success, stderr).
fn host_list(url: &str) -> Result<(bool, String)> {
    let out = Command::new(built_bin("keepup")?)
        .args(["host", "list", "--state", url])
        .env("PGPASSWORD", PASSWORD)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn a_unix_socket_ignores_sslmode_as_libpq_does() -> Result<()> {
    if !postgres_or_skip() {
        return Ok(());
    }
    let pg = PgCluster::start()?;
    let port = pg.port();
    let dir = pg.socket_dir().display().to_string();
    let encoded = dir.replace('/', "%2F");
    // The socket in the URL's host (percent-encoded) or in `host=`: no TLS over it whatever
    // `sslmode` says (the driver asked the server for TLS over the socket and failed).
    for url in [
        format!("postgres://keepup@{encoded}:{port}/fleet?sslmode=require"),
        format!("postgres:///fleet?host={dir}&port={port}&user=keepup&sslmode=verify-full"),
        // A socket and a TCP host: the TCP host keeps its TLS (refused: this cluster has
        // none), the socket after it is used in plaintext.
        format!("postgres://keepup@127.0.0.1:{port},{encoded}:{port}/fleet?sslmode=require"),
    ] {
        let (ok, err) = host_list(&url)?;
        ensure!(ok, "{url}: {err}");
    }
    // TLS is still required of a TCP host.
    let (ok, err) = host_list(&format!(
        "postgres://keepup@127.0.0.1:{port}/fleet?sslmode=require"
    ))?;
    ensure!(!ok && err.contains("does not offer TLS"), "{err}");
    Ok(())
}

/// An impostor PostgreSQL on loopback: it answers the TLS request with `cert`, and if the
/// client goes on, asks for the password in clear (what a man in the middle does). Every byte
/// it reads, before and after decryption, is kept.
struct Impostor {
    port: u16,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Impostor {
    fn start(cert: &Path, key: &Path) -> Result<Impostor> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(key)?;
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?,
        );
        // Every address: a test reaches it through this machine's own non-loopback one too.
        let listener = TcpListener::bind("0.0.0.0:0")?;
        let port = listener.local_addr()?.port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut tcp) = conn else { return };
                let log = log.clone();
                let config = config.clone();
                std::thread::spawn(move || {
                    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut req = [0u8; 8];
                    if tcp.read_exact(&mut req).is_err() {
                        return;
                    }
                    log.lock().unwrap().extend_from_slice(&req);
                    // SSLRequest: length 8, code 80877103.
                    if req != [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f] || tcp.write_all(b"S").is_err() {
                        let mut rest = Vec::new();
                        let _ = tcp.read_to_end(&mut rest);
                        log.lock().unwrap().extend_from_slice(&rest);
                        return;
                    }
                    let Ok(conn) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let mut len = [0u8; 4];
                    if tls.read_exact(&mut len).is_err() {
                        return; // the client refused the handshake: nothing decrypted
                    }
                    let mut startup =
                        vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
                    let _ = tls.read_exact(&mut startup);
                    log.lock().unwrap().extend_from_slice(&startup);
                    // AuthenticationCleartextPassword, then whatever comes (the password).
                    let _ = tls.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
                    let _ = tls.flush();
                    let mut buf = [0u8; 256];
                    while let Ok(n @ 1..) = tls.read(&mut buf) {
                        log.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Ok(Impostor { port, seen })
    }

    fn saw(&self, what: &str) -> bool {
        let seen = self.seen.lock().unwrap();
        seen.windows(what.len()).any(|w| w == what.as_bytes())
    }
}

#[test]
fn tls_to_postgresql_checks_the_server_before_the_password_is_sent() -> Result<()> {
    if !postgres_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let pki = tmp.path().join("pki");
    let ca = TestCa::new(&pki, "pg-ca")?;
    let rogue = TestCa::new(&pki, "rogue-ca")?;
    // Valid for db.test and 127.0.0.1, not for "localhost".
    let (cert, key) = ca.issue(&pki, "db", "db.test")?;
    let pg = PgCluster::start_tls(&PgTls {
        cert: cert.clone(),
        key: key.clone(),
        hostssl_only: true,
    })?;
    let ca_file = ca.cert.display().to_string();
    let at = |host: &str, port: u16, params: &str| {
        format!("postgres://keepup@{host}:{port}/fleet?{params}")
    };

    // 1. verify-full with the right CA: two replicas store and show reports.
    let verified = at(
        "127.0.0.1",
        pg.port(),
        &format!("sslmode=verify-full&sslrootcert={ca_file}"),
    );
    let repo = template_repo("pg")?;
    let mut a = Replica::spawn(&repo, &verified, tmp.path().join("a.log"))?;
    let mut b = Replica::spawn(&repo, &verified, tmp.path().join("b.log"))?;
    a.wait_listening()?;
    b.wait_listening()?;
    let add = Command::new(built_bin("keepup")?)
        .args(["host", "add", "tls1", "--state", &verified])
        .env("PGPASSWORD", PASSWORD)
        .output()?;
    ensure!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    let token = String::from_utf8(add.stdout)?
        .split_whitespace()
        .last()
        .context("no token printed")?
        .to_string();
    wait_until("A takes tls1's report", Duration::from_secs(10), || {
        Ok(post(a.port, &token, &report("tls1", "3.0-1", "over-tls")) == 204)
    })?;
    wait_until("B shows tls1's report", Duration::from_secs(10), || {
        Ok(versions_via(&b.url())?.contains(&("tls1".into(), "3.0-1".into())))
    })?;
    // Every keepup session is encrypted (the server says so).
    let plain = pg.psql(
        "fleet",
        "SELECT count(*) FROM pg_stat_activity a LEFT JOIN pg_stat_ssl s USING (pid) \
         WHERE a.usename = 'keepup' AND a.client_addr IS NOT NULL AND NOT coalesce(s.ssl, false)",
    )?;
    ensure!(plain.trim() == "0", "{plain} keepup sessions without TLS");
    ensure!(!a.stderr().contains("WARNING"), "{}", a.stderr());
    drop((a, b));

    // 2. The server accepts only TLS: sslmode=disable is refused, saying what to do.
    let (ok, err) = host_list(&at("127.0.0.1", pg.port(), "sslmode=disable"))?;
    eprintln!("keepup host list: {err}");
    ensure!(
        !ok && err.contains("only over TLS") && err.contains("remove sslmode=disable"),
        "{err}"
    );

    // 3. The real server, checked against another CA, or under a name its certificate does
    //    not carry: refused in the handshake, and the server never saw a login.
    let before = pg.log().len();
    let other_ca = format!("sslmode=verify-full&sslrootcert={}", rogue.cert.display());
    let (ok, err) = host_list(&at("127.0.0.1", pg.port(), &other_ca))?;
    eprintln!("keepup host list: {err}");
    ensure!(
        !ok && err.contains("signed by an unknown authority")
            && err.contains("point sslrootcert at the CA")
            && err.contains("Nothing was sent"),
        "{err}"
    );
    let full = format!("sslmode=verify-full&sslrootcert={ca_file}");
    let (ok, err) = host_list(&at("localhost", pg.port(), &full))?;
    eprintln!("keepup host list: {err}");
    ensure!(
        !ok && err.contains("not issued for \"localhost\"") && err.contains("sslmode=verify-ca"),
        "{err}"
    );
    let log = pg.log()[before..].to_string();
    ensure!(
        !log.contains("connection authorized") && !log.contains("authentication failed"),
        "the server saw a login from a client that refused its certificate:\n{log}"
    );
    // verify-ca checks the CA only: the same name passes.
    let (ok, err) = host_list(&at(
        "localhost",
        pg.port(),
        &format!("sslmode=verify-ca&sslrootcert={ca_file}"),
    ))?;
    eprintln!("keepup host list: {err}");
    ensure!(ok, "verify-ca with the right CA: {err}");

    // 4. Impostors: one with the right CA's certificate for another server (db.test, asked as
    //    localhost), one with its own CA. Neither gets a byte of the login, nor the password.
    let impostor = Impostor::start(&cert, &key)?;
    let (ok, err) = host_list(&at("localhost", impostor.port, &full))?;
    eprintln!("keepup host list: {err}");
    ensure!(!ok && err.contains("not issued for"), "{err}");
    let (rogue_cert, rogue_key) = rogue.issue(&pki, "rogue", "db.test")?;
    let impostor2 = Impostor::start(&rogue_cert, &rogue_key)?;
    let (ok, err) = host_list(&at("127.0.0.1", impostor2.port, &full))?;
    eprintln!("keepup host list: {err}");
    ensure!(!ok && err.contains("unknown authority"), "{err}");
    // With no sslmode, a host that is not this machine's loopback gets verify-full against
    // the system's CAs: the impostor, reached at this machine's own network address, is
    // refused too. (Skipped when the machine has no such address.)
    let own = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|u| u.connect("10.255.255.1:9").map(|_| u))
        .and_then(|u| u.local_addr())
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified());
    match own {
        Some(ip) => {
            let (ok, err) = host_list(&format!("postgres://keepup@{ip}:{}/fleet", impostor2.port))?;
            eprintln!("keepup host list: {err}");
            ensure!(
                !ok && err.contains("sslmode=verify-full (keepup's default")
                    && err.contains("unknown authority")
                    && err.contains("add sslrootcert=FILE"),
                "{err}"
            );
        }
        None => eprintln!("no non-loopback address here: keepup's default not tried remotely"),
    }
    std::thread::sleep(Duration::from_millis(200));
    for i in [&impostor, &impostor2] {
        ensure!(
            !i.saw("keepup") && !i.saw(PASSWORD),
            "an impostor got the login: {:?}",
            String::from_utf8_lossy(&i.seen.lock().unwrap())
        );
    }
    // The control: with sslmode=require (no certificate check) the same impostor gets the
    // password, which is why keepup warns about require and defaults to verify-full.
    let (ok, err) = host_list(&at("localhost", impostor2.port, "sslmode=require"))?;
    eprintln!("keepup host list: {err}");
    ensure!(!ok, "the impostor is not a database");
    wait_until(
        "the impostor reads the password",
        Duration::from_secs(5),
        || Ok(impostor2.saw(PASSWORD)),
    )
    .with_context(|| err.clone())?;
    Ok(())
}

/// The local TCP ports of process `pid`'s sockets (its sockets' inodes found in
/// `/proc/net/tcp`): which PostgreSQL sessions are its.
fn local_ports(pid: u32) -> Result<Vec<u16>> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_str()?.to_string();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    Ok(table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = f.get(1)?.rsplit_once(':')?.1;
            inodes
                .contains(*f.get(9)?)
                .then(|| u16::from_str_radix(port, 16).ok())?
        })
        .collect())
}

#[test]
fn a_frozen_replica_does_not_stall_the_others_and_loses_nothing() -> Result<()> {
    if !postgres_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let pg = PgCluster::start()?;
    let (mut a, b) = two_replicas(&pg, tmp.path())?;
    const HOSTS: usize = 300;
    let names: Vec<String> = (0..HOSTS).map(|i| format!("frz{i:03}")).collect();
    let tokens = Arc::new(add_bulk(&pg, &names)?);
    wait_until(
        "both replicas know the tokens",
        Duration::from_secs(10),
        || {
            let (h, t) = &tokens[0];
            Ok(post(a.port, t, &report(h, "1.0-1", "warm-a")) == 204
                && post(b.port, t, &report(h, "1.0-1", "warm-b")) == 204)
        },
    )?;

    // 8 clients, 4 on each replica, post reports with a unique event each until told to
    // stop; each 2xx is remembered (its mark must be in the database at the end).
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let other = Arc::new(Mutex::new(Vec::<(u16, u16)>::new()));
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (stop, accepted, other, tokens) = (
                stop.clone(),
                accepted.clone(),
                other.clone(),
                tokens.clone(),
            );
            let port = if c % 2 == 0 { a.port } else { b.port };
            std::thread::spawn(move || {
                let mut n = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    let (host, token) = &tokens[1 + (c + 8 * n) % (HOSTS - 1)];
                    let mark = format!("frz-{c}-{n}");
                    n += 1;
                    match post(port, token, &report(host, "2.0-1", &mark)) {
                        200..=299 => accepted.lock().unwrap().push(mark),
                        code => other.lock().unwrap().push((port, code)),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));

    // Freeze A inside a store transaction that has written (it lasts milliseconds: stop,
    // look, go on, up to 100 times). Such a transaction holds its rows' locks and holds the
    // others' peer reads back (they read below the oldest transaction running).
    let pid = nix::unistd::Pid::from_raw(a.child.id() as i32);
    // Whether one of A's sessions (told by its client port) is inside a transaction that
    // has written.
    let holds = |pg: &PgCluster| -> Result<bool> {
        let ports = local_ports(a.child.id())?;
        if ports.is_empty() {
            return Ok(false);
        }
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        Ok(pg
            .psql(
                "fleet",
                &format!(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE backend_xid IS NOT NULL AND client_port IN ({})",
                    ports.join(",")
                ),
            )?
            .trim()
            != "0")
    };
    let mut caught = false;
    for _ in 0..100 {
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
        std::thread::sleep(Duration::from_millis(100));
        if holds(&pg)? {
            caught = true;
            break;
        }
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(
        caught,
        "A was never caught inside a store transaction in 100 tries"
    );
    let frozen_at = Instant::now();
    let a_leads = a
        .stderr()
        .contains("this replica evaluates the rollout gates now");
    eprintln!("A frozen inside a store (gate lease: {a_leads})");

    // B goes on: a new report through B is stored, and `keepup report` through B answers,
    // within 15 s of the freeze; PostgreSQL ends A's transaction within the same time.
    let (host, token) = &tokens[0];
    wait_until(
        "B stores a report while A is frozen",
        Duration::from_secs(15),
        || Ok(post(b.port, token, &report(host, "9.0-1", "while-a-frozen")) == 204),
    )?;
    let shown = versions_via(&b.url())?;
    ensure!(
        shown.contains(&(host.clone(), "9.0-1".into())),
        "keepup report through B does not show the report it took"
    );
    let took = frozen_at.elapsed();
    ensure!(took < Duration::from_secs(15), "B took {took:?}");
    wait_until(
        "PostgreSQL ends A's frozen transaction",
        Duration::from_secs(15).saturating_sub(frozen_at.elapsed()),
        || Ok(!holds(&pg)?),
    )?;
    // The gate's lease, if A held it, moves to B.
    if a_leads {
        wait_until("B takes the gate's lease", Duration::from_secs(20), || {
            Ok(b.stderr()
                .contains("this replica evaluates the rollout gates now"))
        })
        .with_context(|| b.stderr())?;
    }
    eprintln!("B stored and answered {took:?} after A froze");

    // A runs again: it finds its session ended, connects again and takes reports again.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
    wait_until("A takes reports again", Duration::from_secs(20), || {
        Ok(post(a.port, token, &report(host, "9.1-1", "after-thaw")) == 204)
    })
    .with_context(|| a.stderr())?;
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    a.kill();
    // A noticed, said why, and answered the batch it was storing 503.
    ensure!(
        a.stderr().contains("so PostgreSQL ended its session"),
        "A did not say its session was ended:\n{}",
        a.stderr()
    );
    let other = other.lock().unwrap().clone();
    ensure!(
        other.iter().all(|(_, code)| *code == 503 || *code == 0),
        "answers other than 2xx and 503: {other:?}"
    );
    ensure!(
        other.contains(&(a.port, 503)),
        "the batch A was storing when it froze was not answered 503: {other:?}"
    );
    // Every report answered 2xx by either replica is stored, with its event.
    let accepted = accepted.lock().unwrap().clone();
    let stored = pg.psql(
        "fleet",
        "SELECT message FROM events WHERE message LIKE 'frz-%'",
    )?;
    let stored: std::collections::HashSet<&str> = stored.lines().collect();
    let lost: Vec<&String> = accepted
        .iter()
        .filter(|m| !stored.contains(m.as_str()))
        .collect();
    ensure!(
        lost.is_empty(),
        "{} of {} accepted reports are lost: {lost:?}",
        lost.len(),
        accepted.len()
    );
    eprintln!(
        "{} reports accepted, all stored; {} answered 503 or cut",
        accepted.len(),
        other.len()
    );
    Ok(())
}
