//! The fleet state server (`keepup serve --state`), `keepup host` and `keepup report`, driven
//! through the real `keepup` binary on loopback (no containers): authentication and request
//! checks, the fleet view as JSON, table and page, events, restarts, and range requests on the
//! repository files; and the attacks of a host token holder and of the network: markup and
//! terminal escapes in reports, event floods and a clock ten years ahead, reads without the
//! read token, floods of unknown tokens.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keepup_tests::example::built_bin;
use keepup_tests::fleet::{keepup, keepup_output};
use keepup_tests::testkit::{copy_dir, dechunk, template_repo, wait_until};
use serde_json::{json, Value};

/// A fresh repository in `dir/repo`: web* and db* follow `stable`; `baz` is quarantined on
/// web3; the stable index has foo 1.2-1, bar 2.1-1 (a rollback to 2.0-1) and baz 1.0-1.
fn new_repo(dir: &Path) -> Result<PathBuf> {
    let repo = dir.join("repo");
    copy_dir(&template_repo("server")?, &repo)?;
    let r = repo.to_str().unwrap();
    keepup(&["assign", "--repo", r, "web*", "--track", "stable"])?;
    keepup(&[
        "assign",
        "--repo",
        r,
        "db*",
        "--track",
        "stable",
        "--services",
        "bar",
    ])?;
    keepup(&["quarantine", "--repo", r, "baz", "--hosts", "web3"])?;
    let entry = |name: &str, version: &str, rollback_of: Option<&str>| {
        let mut e = json!({"name": name, "version": version, "arch": "amd64", "format": "deb",
            "path": format!("pool/{name}_{version}_amd64.deb"), "size": 1, "sha256": "00"});
        if let Some(r) = rollback_of {
            e["rollback_of"] = json!(r);
        }
        e
    };
    let index = json!({"track": "stable", "serial": 7, "generated": 0, "packages": [
        entry("foo", "1.2-1", None), entry("bar", "2.1-1", Some("2.0-1")), entry("baz", "1.0-1", None)]});
    std::fs::create_dir_all(repo.join("tracks/stable"))?;
    std::fs::write(repo.join("tracks/stable/index.json"), index.to_string())?;
    Ok(repo)
}

/// A running `keepup serve`, killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(repo: &Path, state: Option<&Path>, port: Option<u16>) -> Result<Server> {
        Self::start_with(repo, state, port, None)
    }

    /// With `read_token`: `--read-token-file` and the test hook that counts database reads.
    fn start_with(
        repo: &Path,
        state: Option<&Path>,
        port: Option<u16>,
        read_token: Option<&Path>,
    ) -> Result<Server> {
        let port = match port {
            Some(p) => p,
            None => TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
        };
        let mut cmd = Command::new(built_bin("keepup")?);
        cmd.args(["serve", "--repo"])
            .arg(repo)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(s) = state {
            cmd.arg("--state").arg(s);
        }
        if let Some(t) = read_token {
            cmd.arg("--read-token-file")
                .arg(t)
                .env("KEEPUP_SERVE_TEST_HOOKS", "1");
        }
        let mut child = cmd.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(st) = child.try_wait()? {
                bail!("keepup serve exited: {st}");
            }
            ensure!(Instant::now() < deadline, "keepup serve did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Server { child, port })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP answer: status, raw header block, body.
struct Answer {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on its own connection.
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Answer> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    // The server may answer (413, 401) before reading a large body and close.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP header in the answer")?;
    let headers = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = headers
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    Ok(Answer {
        status,
        body: match headers
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            true => dechunk(&raw[split + 4..])?,
            false => raw[split + 4..].to_vec(),
        },
        headers,
    })
}

fn post_report(port: u16, token: Option<&str>, report: &Value) -> Result<Answer> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    http(
        port,
        "POST",
        "/api/v1/report",
        &headers,
        report.to_string().as_bytes(),
    )
}

fn fleet(port: u16) -> Result<Value> {
    let a = http(port, "GET", "/api/v1/fleet", &[], b"")?;
    ensure!(a.status == 200, "fleet: {} {}", a.status, a.text());
    // Sent as it is built, never held whole (and decoded whole above: its last chunk came).
    ensure!(
        a.headers
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "the fleet view is not streamed: {}",
        a.headers
    );
    Ok(serde_json::from_slice(&a.body)?)
}

/// The fleet view once `check` holds for it (the server serves a built view for up to 1 s).
fn fleet_when(port: u16, what: &str, check: impl Fn(&Value) -> bool) -> Result<Value> {
    let mut last = Value::Null;
    wait_until(what, Duration::from_secs(10), || {
        last = fleet(port)?;
        Ok(check(&last))
    })
    .with_context(|| format!("last view: {last}"))?;
    Ok(last)
}

fn host_view<'a>(fleet: &'a Value, host: &str) -> &'a Value {
    fleet["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == host)
        .unwrap_or_else(|| panic!("no host {host} in {fleet}"))
}

fn service<'a>(host: &'a Value, name: &str) -> &'a Value {
    host["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no service {name} in {host}"))
}

fn add_host(state: &Path, name: &str) -> Result<String> {
    let out = keepup(&["host", "add", name, "--state", state.to_str().unwrap()])?;
    let token = out.trim().to_string();
    ensure!(token.len() == 64 && !token.contains(' '), "token: {out:?}");
    Ok(token)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A report: `services` as (name, installed version, state).
fn report(host: &str, services: &[(&str, &str, &str)]) -> Value {
    let installed: serde_json::Map<String, Value> = services
        .iter()
        .map(|(n, v, _)| (n.to_string(), json!(v)))
        .collect();
    let svcs: Vec<Value> = services
        .iter()
        .map(
            |(n, v, st)| json!({"name": n, "version": v, "state": st, "restarts": 0, "probes": []}),
        )
        .collect();
    json!({"host": host, "agent_version": "0.1.0", "sent_at": now(), "track": "stable",
        "format": "deb", "arch": "amd64", "installed": installed, "services": svcs,
        "update": {"at": now(), "ok": true}, "events": []})
}

#[test]
fn reports_are_authenticated_and_checked() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo = new_repo(tmp.path())?;
    let state = tmp.path().join("state.db");
    let web1 = add_host(&state, "web1")?;
    let web2 = add_host(&state, "web2")?;
    let server = Server::start(&repo, Some(&state), None)?;
    let p = server.port;
    let good = report("web1", &[("foo", "1.2-1", "running")]);

    let a = post_report(p, None, &good)?;
    ensure!(a.status == 401, "no token: {}", a.status);
    ensure!(a.header("www-authenticate").as_deref() == Some("Bearer"));
    ensure!(post_report(p, Some("not-a-token"), &good)?.status == 401);
    ensure!(
        post_report(p, Some(&web2), &good)?.status == 403,
        "another host's token"
    );
    let mut big = good.clone();
    big["agent_version"] = json!("x".repeat(300 * 1024));
    ensure!(post_report(p, Some(&web1), &big)?.status == 413);
    let a = http(
        p,
        "POST",
        "/api/v1/report",
        &[("Authorization", &format!("Bearer {web1}"))],
        b"{not json",
    )?;
    ensure!(a.status == 400, "malformed: {}", a.status);
    let mut bad_host = good.clone();
    bad_host["host"] = json!("../etc");
    ensure!(post_report(p, Some(&web1), &bad_host)?.status == 400);
    let a = http(p, "GET", "/api/v1/report", &[], b"")?;
    ensure!(a.status == 405);

    // Nothing of the rejected requests landed.
    let f = fleet(p)?;
    ensure!(host_view(&f, "web1").get("last_seen").is_none(), "{f}");
    ensure!(f["summary"]["reporting"] == 0);

    let a = post_report(p, Some(&web1), &good)?;
    ensure!(a.status == 204, "good report: {} {}", a.status, a.text());
    let f = fleet_when(p, "web1's report in the view", |f| {
        f["summary"]["reporting"] == 1
    })?;
    let h = host_view(&f, "web1");
    ensure!(h["last_seen"].as_u64().is_some());
    ensure!(service(h, "foo")["installed"] == "1.2-1", "{h}");
    ensure!(f["summary"]["reporting"] == 1);

    // A host added while the server runs can report within seconds (the server checks the
    // host list every second; unknown tokens never reach the database); a removed one cannot.
    let web5 = add_host(&state, "web5")?;
    wait_until(
        "the new host's token accepted",
        Duration::from_secs(10),
        || {
            let st = post_report(p, Some(&web5), &report("web5", &[]))?.status;
            ensure!(st == 204 || st == 401, "new host: {st}");
            Ok(st == 204)
        },
    )?;
    keepup(&["host", "remove", "web2", "--state", state.to_str().unwrap()])?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = post_report(p, Some(&web2), &report("web2", &[]))?.status;
        if st == 401 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "removed host still accepted ({st})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Re-adding replaces the token.
    let web1b = add_host(&state, "web1")?;
    wait_until(
        "the replaced token accepted",
        Duration::from_secs(10),
        || Ok(post_report(p, Some(&web1b), &good)?.status == 204),
    )?;
    ensure!(
        post_report(p, Some(&web1), &good)?.status == 401,
        "the old token"
    );
    let list = keepup(&["host", "list", "--state", state.to_str().unwrap()])?;
    ensure!(
        list.contains("web1") && list.contains("web5") && !list.contains("web2"),
        "{list}"
    );
    server.stop();
    Ok(())
}

#[test]
fn fleet_view_table_filters_and_page() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo = new_repo(tmp.path())?;
    let state = tmp.path().join("state.db");
    let mut tokens = std::collections::HashMap::new();
    for h in ["web1", "web2", "web3", "web4", "db1"] {
        tokens.insert(h, add_host(&state, h)?);
    }
    let server = Server::start(&repo, Some(&state), None)?;
    let p = server.port;
    let post = |host: &str, r: &Value| -> Result<()> {
        let a = post_report(p, Some(&tokens[host]), r)?;
        ensure!(a.status == 204, "{host}: {} {}", a.status, a.text());
        Ok(())
    };
    post(
        "web1",
        &report(
            "web1",
            &[
                ("foo", "1.2-1", "running"),
                ("bar", "2.1-1", "running"),
                ("baz", "1.0-1", "running"),
            ],
        ),
    )?;
    post(
        "web2",
        &report(
            "web2",
            &[
                ("foo", "1.1-1", "backoff"),
                ("bar", "2.1-1", "running"),
                ("baz", "1.0-1", "running"),
            ],
        ),
    )?;
    let mut web3 = report(
        "web3",
        &[("foo", "1.2-1", "running"), ("bar", "2.1-1", "running")],
    );
    web3["services"][0]["probes"] =
        json!([{"name": "port", "ok": false, "reason": "refused", "failures": 3}]);
    web3["update"] = json!({"at": now(), "ok": false, "error": "repository unreachable"});
    web3["events"] = json!([{"at": now(), "service": "foo", "kind": "health-kill", "message": "<script>alert(1)</script>"}]);
    post("web3", &web3)?;
    let mut db1 = report("db1", &[("bar", "2.1-1", "running")]);
    db1["services"][0]["start"] = json!({"version": "2.1-1", "started": false, "detail": "exited 1", "log_tail": ["boom"], "at": now()});
    post("db1", &db1)?;

    let f = fleet(p)?;
    let s = &f["summary"];
    ensure!(
        (
            s["hosts"].as_u64(),
            s["reporting"].as_u64(),
            s["stale"].as_u64()
        ) == (Some(5), Some(4), Some(1)),
        "{s}"
    );
    ensure!(
        s["behind"] == 2 && s["failed_updates"] == 1 && s["quarantined"] == 1,
        "{s}"
    );
    ensure!(s["unhealthy"] == 3, "{s}");
    let bar1 = &host_view(&f, "web1")["services"][0];
    ensure!(
        bar1["name"] == "bar"
            && bar1["status"] == "rolled back"
            && bar1["rolled_back_to"] == "2.0-1",
        "{bar1}"
    );
    let web2 = host_view(&f, "web2");
    ensure!(
        web2["services"][2]["status"] == "behind" && web2["services"][1]["status"] == "current",
        "{web2}"
    );
    ensure!(host_view(&f, "web4")["services"][0]["status"] == "missing");
    let web3v = host_view(&f, "web3");
    ensure!(web3v["services"][1]["status"] == "quarantined", "{web3v}");
    ensure!(web3v["services"][2]["failing_probes"] == json!(["port"]));
    ensure!(host_view(&f, "db1")["services"][0]["failed_start"]["log_tail"] == json!(["boom"]));
    ensure!(host_view(&f, "web4")["stale"] == true);

    let url = server.url();
    let table = keepup(&["report", "--server", &url])?;
    ensure!(
        table.starts_with(
            "5 hosts: 4 reporting, 1 stale, 2 behind, 3 unhealthy, 1 quarantined, 1 failed updates"
        ),
        "{table}"
    );
    ensure!(
        table.contains("rolled back to 2.0-1") && table.contains("failed to start 2.1-1"),
        "{table}"
    );
    let rows = |out: &str| -> Vec<String> {
        out.lines()
            .skip_while(|l| !l.starts_with("HOST"))
            .skip(1)
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect()
    };
    let behind = rows(&keepup(&["report", "--server", &url, "--behind"])?);
    ensure!(
        behind
            == [
                "web2 stable foo",
                "web4 stable bar",
                "web4 stable baz",
                "web4 stable foo"
            ],
        "{behind:?}"
    );
    // web4 never reported: its rows are stale (and missing); web3 quarantines baz.
    let stale = rows(&keepup(&["report", "--server", &url, "--stale"])?);
    ensure!(
        stale.iter().all(|r| r.starts_with("web4 ")) && stale.len() == 3,
        "{stale:?}"
    );
    let unhealthy = rows(&keepup(&["report", "--server", &url, "--unhealthy"])?);
    ensure!(
        unhealthy.iter().any(|r| r == "web2 stable foo"),
        "{unhealthy:?}"
    );
    ensure!(
        unhealthy.iter().any(|r| r == "db1 stable bar"),
        "{unhealthy:?}"
    );
    ensure!(
        unhealthy.iter().filter(|r| r.starts_with("web3 ")).count() == 3,
        "failed update marks web3's rows: {unhealthy:?}"
    );
    ensure!(
        !unhealthy.iter().any(|r| r.starts_with("web1 ")),
        "{unhealthy:?}"
    );
    let json: Value = serde_json::from_str(&keepup(&["report", "--server", &url, "--json"])?)?;
    ensure!(json["summary"] == f["summary"]);
    let json_behind: Value = serde_json::from_str(&keepup(&[
        "report", "--server", &url, "--json", "--behind",
    ])?)?;
    let hosts: Vec<&str> = json_behind["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["host"].as_str().unwrap())
        .collect();
    ensure!(hosts == ["web2", "web4"], "{hosts:?}");

    // The page: same view, escaped, refreshing, readable on a phone.
    let page = http(p, "GET", "/", &[], b"")?;
    ensure!(
        page.status == 200
            && page
                .header("content-type")
                .unwrap()
                .starts_with("text/html")
    );
    let html = page.text();
    ensure!(html.contains("<meta http-equiv=\"refresh\" content=\"10\">"));
    ensure!(html.contains("name=\"viewport\""));
    ensure!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;") && !html.contains("<script>"));
    ensure!(html.contains("rolled back to 2.0-1") && html.contains("repository unreachable"));
    let only_web3 = http(p, "GET", "/?host=web3", &[], b"")?.text();
    ensure!(only_web3.contains(">web3<") && !only_web3.contains(">web1<"));

    // Stale threshold from the client.
    std::thread::sleep(Duration::from_secs(2));
    let all_stale = keepup(&["report", "--server", &url, "--stale", "--stale-after", "1s"])?;
    ensure!(
        all_stale.starts_with("5 hosts: 0 reporting, 5 stale"),
        "{all_stale}"
    );
    server.stop();
    Ok(())
}

#[test]
fn state_survives_a_restart_and_events_are_logged_once() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo = new_repo(tmp.path())?;
    let state = tmp.path().join("state.db");
    let token = add_host(&state, "web1")?;
    let server = Server::start(&repo, Some(&state), None)?;
    let port = server.port;
    let t = now();
    let ev = |i: u64, kind: &str| json!({"at": t - 100 + i, "service": "foo", "kind": kind, "message": format!("{kind} {i}")});
    let mut r = report("web1", &[("foo", "1.2-1", "running")]);
    r["events"] = json!([ev(1, "install"), ev(2, "started")]);
    ensure!(post_report(port, Some(&token), &r)?.status == 204);
    ensure!(post_report(port, Some(&token), &r)?.status == 204, "resent");
    // The server dies (SIGKILL): what it acknowledged is in the database.
    server.stop();
    let (ok, _, err) = keepup_output(&["report", "--server", &format!("http://127.0.0.1:{port}")])?;
    ensure!(
        !ok && err.contains(&format!("http://127.0.0.1:{port}/api/v1/fleet"))
            && err.contains("keepup serve"),
        "{err}"
    );

    let server = Server::start(&repo, Some(&state), Some(port))?;
    let f = fleet(port)?;
    ensure!(
        service(host_view(&f, "web1"), "foo")["installed"] == "1.2-1",
        "{f}"
    );
    r["events"] = json!([ev(1, "install"), ev(2, "started"), ev(3, "health-kill")]);
    r["installed"]["foo"] = json!("1.3-1");
    ensure!(
        post_report(port, Some(&token), &r)?.status == 204,
        "reports resume"
    );
    let events: Value =
        serde_json::from_slice(&http(port, "GET", "/api/v1/events?host=web1", &[], b"")?.body)?;
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    ensure!(kinds == ["health-kill", "started", "install"], "{events}");
    let f = fleet_when(port, "the second report in the view", |f| {
        service(host_view(f, "web1"), "foo")["status"] == "newer"
    })?;
    ensure!(host_view(&f, "web1")["events"].as_array().unwrap().len() == 3);
    server.stop();
    Ok(())
}

#[test]
fn range_requests() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo = new_repo(tmp.path())?;
    let data = std::fs::read(repo.join("tracks/stable/index.json"))?;
    let len = data.len();
    for state in [None, Some(tmp.path().join("state.db"))] {
        let server = Server::start(&repo, state.as_deref(), None)?;
        let p = server.port;
        let path = "/tracks/stable/index.json";
        let full = http(p, "GET", path, &[], b"")?;
        ensure!(full.status == 200 && full.body == data);
        ensure!(full.header("accept-ranges").as_deref() == Some("bytes"));
        let a = http(p, "GET", path, &[("Range", "bytes=0-9")], b"")?;
        ensure!(a.status == 206 && a.body == data[..10], "{}", a.status);
        ensure!(a.header("content-range") == Some(format!("bytes 0-9/{len}")));
        ensure!(a.header("content-length") == Some("10".into()));
        let a = http(p, "GET", path, &[("Range", "bytes=10-")], b"")?;
        ensure!(a.status == 206 && a.body == data[10..]);
        ensure!(a.header("content-range") == Some(format!("bytes 10-{}/{len}", len - 1)));
        let a = http(p, "GET", path, &[("Range", "bytes=-5")], b"")?;
        ensure!(a.status == 206 && a.body == data[len - 5..]);
        let a = http(p, "GET", path, &[("Range", &format!("bytes={len}-"))], b"")?;
        ensure!(a.status == 416, "{}", a.status);
        ensure!(a.header("content-range") == Some(format!("bytes */{len}")));
        let a = http(p, "HEAD", path, &[("Range", "bytes=0-3")], b"")?;
        ensure!(a.status == 206 && a.body.is_empty());
        // Several ranges: the whole file.
        let a = http(p, "GET", path, &[("Range", "bytes=0-1,4-5")], b"")?;
        ensure!(a.status == 200 && a.body == data);
        ensure!(http(p, "GET", "/fleet.yaml", &[], b"")?.status == 200);
        server.stop();
    }
    Ok(())
}

/// A registered host's token, once the running server accepts it.
fn accepted(port: u16, state: &Path, host: &str) -> Result<String> {
    let token = add_host(state, host)?;
    wait_until(
        &format!("{host}'s token accepted"),
        Duration::from_secs(10),
        || Ok(post_report(port, Some(&token), &report(host, &[]))?.status == 204),
    )?;
    Ok(token)
}

/// Markup a host token holder plants in free text (probe reasons, update errors, log tails,
/// event messages) reaches the page escaped; in names, the report is refused with 400 naming
/// the field; in the query (`filter`, `host`), it is escaped or mapped onto the fixed filters.
#[test]
fn markup_from_hosts_and_queries_never_reaches_the_page_raw() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo = new_repo(tmp.path())?;
    let state = tmp.path().join("state.db");
    let token = add_host(&state, "web1")?;
    let server = Server::start(&repo, Some(&state), None)?;
    let p = server.port;
    let x = |what: &str| format!("<script>alert('{what}')</script>");
    let escaped = |what: &str| format!("&lt;script&gt;alert(&#39;{what}&#39;)&lt;/script&gt;");

    // Names: refused, and the answer names the field.
    type Plant = fn(&mut Value, &str);
    let refused: [(&str, Plant); 5] = [
        ("services[0].name", |r, v| {
            r["services"][0]["name"] = json!(v)
        }),
        ("services[0].probes[0].name", |r, v| {
            r["services"][0]["probes"] = json!([{"name": v, "ok": false}])
        }),
        ("installed[", |r, v| r["installed"][v] = json!("1.0-1")),
        ("quarantined[0]", |r, v| r["quarantined"] = json!([v])),
        (
            "events[0].service",
            |r, v| r["events"] = json!([{"at": 1, "service": v, "kind": "x", "message": "m"}]),
        ),
    ];
    for (field, plant) in refused {
        let mut r = report("web1", &[("foo", "1.2-1", "running")]);
        plant(&mut r, &x(field));
        let a = post_report(p, Some(&token), &r)?;
        ensure!(
            a.status == 400 && a.text().contains(field),
            "{field}: {} {}",
            a.status,
            a.text()
        );
    }
    let mut r = report("web1", &[]);
    r["host"] = json!(x("host"));
    let a = post_report(p, Some(&token), &r)?;
    ensure!(
        a.status == 400 && a.text().contains("host: "),
        "host: {}",
        a.text()
    );

    // Free text: stored, shown escaped.
    let mut r = report(
        "web1",
        &[("foo", "1.2-1", "running"), ("bar", "2.1-1", "backoff")],
    );
    r["services"][0]["probes"] =
        json!([{"name": "port", "ok": false, "reason": x("reason"), "failures": 3}]);
    r["services"][1]["start"] = json!({"version": "2.1-1", "started": false,
        "detail": x("detail"), "log_tail": ["ok", x("tail")], "at": now()});
    r["update"] = json!({"at": now(), "ok": false, "error": x("update")});
    r["events"] =
        json!([{"at": now(), "service": "foo", "kind": x("kind"), "message": x("message")}]);
    let a = post_report(p, Some(&token), &r)?;
    ensure!(a.status == 204, "free text: {} {}", a.status, a.text());

    let get = |path: &str| -> Result<Answer> {
        let a = http(p, "GET", path, &[], b"")?;
        ensure!(a.status == 200, "{path}: {}", a.status);
        Ok(a)
    };
    let mut page = String::new();
    wait_until("the report on the page", Duration::from_secs(10), || {
        page = get("/")?.text();
        Ok(page.contains(&escaped("reason")))
    })?;
    for what in ["reason", "detail", "tail", "update", "kind", "message"] {
        ensure!(
            page.contains(&escaped(what)),
            "{what} not escaped on the page"
        );
    }
    let no_markup = |html: &str| {
        let lower = html.to_ascii_lowercase();
        !lower.contains("<script") && !lower.contains("<img")
    };
    ensure!(no_markup(&page), "{page}");
    let a = get("/")?;
    ensure!(
        a.header("content-security-policy")
            .is_some_and(|c| c.contains("default-src 'none'")),
        "{}",
        a.headers
    );

    // The query: `filter` is one of a fixed set, `host` is escaped wherever it appears.
    let page = get("/?filter=%3Cscript%3Ealert(1)%3C%2Fscript%3E")?.text();
    ensure!(
        no_markup(&page) && page.contains("unknown filter; showing all."),
        "{page}"
    );
    ensure!(
        !page.contains("alert(1)"),
        "the unknown filter is echoed: {page}"
    );
    let page = get("/?filter=behind")?.text();
    ensure!(page.contains("matching rows (behind)"), "{page}");
    let page = get("/?host=%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E&filter=stale")?.text();
    ensure!(no_markup(&page), "{page}");
    ensure!(
        page.contains("keepup fleet: &quot;&gt;&lt;img src=x onerror=alert(1)&gt;"),
        "{page}"
    );
    ensure!(
        page.contains(
            "href=\"/?filter=all&amp;host=%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E\""
        ),
        "the host in links: {page}"
    );
    server.stop();
    Ok(())
}

/// Escape sequences, carriage returns, newlines, bells, C1 controls and bidi overrides in a
/// report reach `keepup report`'s table as visible `\u{..}` text, never as bytes; `--json`
/// stays the exact JSON.
#[test]
fn report_table_sends_no_control_characters_to_the_terminal() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo = new_repo(tmp.path())?;
    let state = tmp.path().join("state.db");
    let token = add_host(&state, "web1")?;
    let server = Server::start(&repo, Some(&state), None)?;
    let p = server.port;
    let nasty = "\u{1b}]0;owned\u{7}\u{1b}[2J\u{1b}[31mred\r\nweb9  stable  fake\u{9b}1m\u{202e}txt.exe\u{7f}";
    let mut r = report("web1", &[("foo", "1.2-1", nasty)]);
    r["track"] = json!(nasty);
    r["services"][0]["probes"] = json!([{"name": "port", "ok": false, "reason": nasty}]);
    r["services"][0]["start"] =
        json!({"version": nasty, "started": false, "detail": nasty, "log_tail": [nasty]});
    r["update"] = json!({"at": now(), "ok": false, "error": nasty});
    let a = post_report(p, Some(&token), &r)?;
    ensure!(a.status == 204, "{} {}", a.status, a.text());
    fleet_when(p, "the report in the view", |f| {
        f["summary"]["reporting"] == 1
    })?;

    let (ok, out, err) = keepup_output(&["report", "--server", &server.url()])?;
    ensure!(ok, "{err}");
    let bad: Vec<char> = out
        .chars()
        .filter(|c| (c.is_control() && *c != '\n') || ('\u{202a}'..='\u{202e}').contains(c))
        .collect();
    ensure!(bad.is_empty(), "control characters {bad:?} in\n{out}");
    ensure!(!out.as_bytes().contains(&0x1b), "an ESC byte in\n{out}");
    // The summary, a blank line, the header and web1's three services (foo, bar, baz from
    // the policy): no line was injected.
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines.len() == 6, "{out}");
    ensure!(lines[3..].iter().all(|l| l.starts_with("web1  ")), "{out}");
    ensure!(
        out.contains("\\u{1b}[2J") && out.contains("\\u{202e}"),
        "{out}"
    );
    let (ok, json, _) = keepup_output(&["report", "--server", &server.url(), "--json"])?;
    ensure!(ok);
    let v: Value = serde_json::from_str(&json)?;
    ensure!(
        service(host_view(&v, "web1"), "foo")["state"] == nasty,
        "{json}"
    );
    server.stop();
    Ok(())
}

/// The events of the host `host`, newest first.
fn events_of(port: u16, host: &str, headers: &[(&str, &str)]) -> Result<Vec<Value>> {
    let a = http(
        port,
        "GET",
        &format!("/api/v1/events?host={host}&limit=1000"),
        headers,
        b"",
    )?;
    ensure!(a.status == 200, "events: {} {}", a.status, a.text());
    Ok(serde_json::from_slice::<Vec<Value>>(&a.body)?)
}

/// One host flooding 20,000 events keeps only its own newest ones and evicts nobody else's;
/// a host whose clock jumped ten years ahead hides none of its later events.
#[test]
fn events_cannot_be_flooded_or_hidden_by_a_clock() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo = new_repo(tmp.path())?;
    let state = tmp.path().join("state.db");
    let server = Server::start(&repo, Some(&state), None)?;
    let p = server.port;
    let quiet = accepted(p, &state, "web1")?;
    let flood = accepted(p, &state, "web2")?;
    let skewed = accepted(p, &state, "web3")?;
    let t = now();
    let ev = |at: u64, kind: &str, i: u64| json!({"at": at, "service": "foo", "kind": kind, "message": format!("{kind} {i}")});

    let mut r = report("web1", &[]);
    r["events"] = json!([ev(t - 3600, "install", 0)]);
    ensure!(post_report(p, Some(&quiet), &r)?.status == 204);

    // 400 reports of 50 new events each, as fast as the server takes them.
    let mut last = String::new();
    for round in 0..400u64 {
        let events: Vec<Value> = (0..50)
            .map(|i| ev(t, "health-kill", round * 50 + i))
            .collect();
        last = events[49]["message"].as_str().unwrap().to_string();
        let mut r = report("web2", &[]);
        r["events"] = json!(events);
        let a = post_report(p, Some(&flood), &r)?;
        ensure!(a.status == 204, "flood round {round}: {}", a.status);
    }
    let kept = events_of(p, "web2", &[])?;
    ensure!(
        (500..=600).contains(&kept.len()),
        "the flooding host keeps its quota of newest events, not {}",
        kept.len()
    );
    ensure!(
        kept[0]["message"] == last.as_str(),
        "newest first: {}",
        kept[0]
    );
    let web1 = events_of(p, "web1", &[])?;
    ensure!(
        web1.len() == 1 && web1[0]["message"] == "install 0",
        "another host's history survives the flood: {web1:?}"
    );

    // Ten years ahead, then the clock is fixed: the later events are all logged.
    let ahead = t + 10 * 365 * 86_400;
    let mut window = vec![ev(ahead, "started", 1)];
    let mut r = report("web3", &[]);
    r["sent_at"] = json!(ahead);
    r["events"] = json!(window);
    ensure!(post_report(p, Some(&skewed), &r)?.status == 204);
    for i in 2..=4 {
        window.push(ev(t + i, "health-kill", i));
        let mut r = report("web3", &[]);
        r["events"] = json!(window);
        ensure!(post_report(p, Some(&skewed), &r)?.status == 204);
    }
    let got: Vec<String> = events_of(p, "web3", &[])?
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect();
    ensure!(
        got == [
            "health-kill 4",
            "health-kill 3",
            "health-kill 2",
            "started 1"
        ],
        "{got:?}"
    );
    server.stop();
    Ok(())
}

/// With `--read-token-file`, the page, the fleet view and the events need the read token
/// (bearer, or as a browser's Basic password); reports still use host tokens; `keepup report`
/// presents it. Tokens the server does not know, host or read, cost no database read: the test
/// hook counts the reads request handling makes.
#[test]
fn read_token_closes_the_views_and_unknown_tokens_cost_no_query() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo = new_repo(tmp.path())?;
    let state = tmp.path().join("state.db");
    let token_file = tmp.path().join("read-token");
    let read = "read-token-0123456789abcdef";
    std::fs::write(&token_file, format!("{read}\n"))?;
    let server = Server::start_with(&repo, Some(&state), None, Some(&token_file))?;
    let p = server.port;
    let web1 = accepted(p, &state, "web1")?;

    let bearer = format!("Bearer {read}");
    // base64("ops:read-token-0123456789abcdef"): what a browser sends after the login prompt.
    let basic = "Basic b3BzOnJlYWQtdG9rZW4tMDEyMzQ1Njc4OWFiY2RlZg==";
    let wrong = "Bearer read-token-0123456789abcdeX".to_string();
    for path in [
        "/",
        "/api/v1/fleet",
        "/api/v1/events?host=web1",
        "/api/v1/rollouts",
    ] {
        let a = http(p, "GET", path, &[], b"")?;
        ensure!(a.status == 401, "{path} without the token: {}", a.status);
        ensure!(
            a.headers.contains("Basic realm=\"keepup fleet\""),
            "{path}: a browser is asked to log in: {}",
            a.headers
        );
        ensure!(!a.text().contains("web1"), "{path}: {}", a.text());
        for bad in [wrong.as_str(), &format!("Bearer {web1}")] {
            let a = http(p, "GET", path, &[("Authorization", bad)], b"")?;
            ensure!(a.status == 401, "{path} with {bad}: {}", a.status);
        }
        for good in [bearer.as_str(), basic] {
            let a = http(p, "GET", path, &[("Authorization", good)], b"")?;
            ensure!(a.status == 200, "{path} with {good}: {}", a.status);
        }
    }
    // Reports still take host tokens, and only those.
    ensure!(post_report(p, Some(&web1), &report("web1", &[]))?.status == 204);
    ensure!(post_report(p, Some(read), &report("web1", &[]))?.status == 401);

    let url = server.url();
    let (ok, _, err) = keepup_output(&["report", "--server", &url])?;
    ensure!(!ok && err.contains("--read-token-file"), "{err}");
    let table = keepup(&[
        "report",
        "--server",
        &url,
        "--read-token-file",
        token_file.to_str().unwrap(),
    ])?;
    ensure!(
        table.starts_with("5 hosts:") || table.contains("web1"),
        "{table}"
    );

    // Unknown tokens: the count of database reads does not move.
    let queries = |a: &Answer| -> Result<u64> {
        Ok(a.header("x-keepup-db-queries")
            .context("the test hook's header is missing")?
            .parse()?)
    };
    let before = queries(&post_report(p, Some("unknown-0"), &report("web1", &[]))?)?;
    for i in 1..=300 {
        let a = post_report(p, Some(&format!("unknown-{i}")), &report("web1", &[]))?;
        ensure!(a.status == 401, "unknown token {i}: {}", a.status);
        ensure!(
            queries(&a)? == before,
            "an unknown host token made the server read its database"
        );
        let a = http(
            p,
            "GET",
            "/api/v1/events?host=web1",
            &[("Authorization", &format!("Bearer guess-{i}"))],
            b"",
        )?;
        ensure!(
            a.status == 401 && queries(&a)? == before,
            "an unknown read token"
        );
    }
    // The hook does count: an authorised events read is one.
    let a = http(
        p,
        "GET",
        "/api/v1/events?host=web1",
        &[("Authorization", &bearer)],
        b"",
    )?;
    ensure!(
        queries(&a)? > before,
        "the hook counts nothing: {}",
        a.headers
    );
    server.stop();
    Ok(())
}

/// A server that answers every request with `head` and the start of a chunked body, then
/// closes the connection before the last chunk.
fn cutting_server(
    head: &'static str,
    start: &'static str,
) -> Result<(u16, std::thread::JoinHandle<()>)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    let t = std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let answer = format!(
                "HTTP/1.1 200 OK\r\n{head}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{start}\r\n",
                start.len()
            );
            let _ = s.write_all(answer.as_bytes());
        }
    });
    Ok((port, t))
}

/// A fleet view whose answer stops before its end (the server failed while sending it) is
/// an error for `keepup report`, in both forms, never a shorter view.
#[test]
fn a_view_cut_short_is_an_error() -> Result<()> {
    let forms: [(&[&str], &str, &str); 2] = [
        (
            &["--json"],
            "Content-Type: application/json",
            "{\"generated_at\":1,\"stale_after\":600,\"summary\":{\"hosts\":2",
        ),
        (
            &[],
            "Content-Type: text/tab-separated-values",
            "{\"generated_at\":1,\"summary\":{\"hosts\":2,\"reporting\":2,\"stale\":0,\
             \"behind\":0,\"unhealthy\":0,\"quarantined\":0,\"failed_updates\":0},\
             \"rows\":2,\"widths\":[4,5,7,9,13,6,5,8,14,9,6]}\nweb1\tstable\tfoo\t1\t1\tcurrent\trunning\t0\t-\t1s\tok\n",
        ),
    ];
    for (args, head, start) in forms {
        let (port, t) = cutting_server(head, start)?;
        let url = format!("http://127.0.0.1:{port}");
        let mut all = vec!["report", "--server", url.as_str()];
        all.extend_from_slice(args);
        let (ok, out, err) = keepup_output(&all)?;
        t.join().ok();
        ensure!(
            !ok,
            "keepup {} succeeded on a cut answer:\n{out}",
            all.join(" ")
        );
        ensure!(err.contains("cut short"), "keepup {}: {err}", all.join(" "));
        if args.contains(&"--json") {
            ensure!(
                serde_json::from_str::<Value>(&out).is_err(),
                "what was printed parses as a whole view: {out}"
            );
        }
    }
    Ok(())
}
