//! The fleet state server (`keepup serve --state`), `keepup host` and `keepup report`, driven
//! through the real `keepup` binary on loopback (no containers): authentication and request
//! checks, the fleet view as JSON, table and page, events, restarts, and range requests on the
//! repository files.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keepup_tests::example::built_bin;
use keepup_tests::fleet::{keepup, keepup_output};
use serde_json::{json, Value};

/// A repository initialised once (key generation is slow in debug builds), copied per test.
fn template_repo() -> Result<PathBuf> {
    static REPO: OnceLock<PathBuf> = OnceLock::new();
    if let Some(r) = REPO.get() {
        return Ok(r.clone());
    }
    let dir = std::env::temp_dir().join(format!("keepup-server-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let repo = dir.join("repo");
    keepup(&["repo", "init", repo.to_str().unwrap()])?;
    Ok(REPO.get_or_init(|| repo).clone())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

/// A fresh repository in `dir/repo`: web* and db* follow `stable`; `baz` is quarantined on
/// web3; the stable index has foo 1.2-1, bar 2.1-1 (a rollback to 2.0-1) and baz 1.0-1.
fn new_repo(dir: &Path) -> Result<PathBuf> {
    let repo = dir.join("repo");
    copy_dir(&template_repo()?, &repo)?;
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
        headers,
        body: raw[split + 4..].to_vec(),
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
    Ok(serde_json::from_slice(&a.body)?)
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
    let f = fleet(p)?;
    let h = host_view(&f, "web1");
    ensure!(h["last_seen"].as_u64().is_some());
    ensure!(service(h, "foo")["installed"] == "1.2-1", "{h}");
    ensure!(f["summary"]["reporting"] == 1);

    // A host added while the server runs can report at once; a removed one cannot.
    let web5 = add_host(&state, "web5")?;
    ensure!(post_report(p, Some(&web5), &report("web5", &[]))?.status == 204);
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
    ensure!(post_report(p, Some(&web1b), &good)?.status == 204);
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
    let f = fleet(port)?;
    ensure!(service(host_view(&f, "web1"), "foo")["status"] == "newer");
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
