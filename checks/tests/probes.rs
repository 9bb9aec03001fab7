//! Probes against real servers and commands on this host (127.0.0.1 only, no mocks).

use std::future::Future;
use std::time::{Duration, Instant};

use keepup_checks::{
    ExecProbe, ExecSpec, HttpProbe, HttpSpec, Probe, ProbeResult, RunAs, StatusRange, TcpProbe,
    TcpSpec,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How much longer than its timeout a probe may take to return.
const SLACK: Duration = Duration::from_millis(500);

/// Listens on 127.0.0.1 and runs `handler` for every connection; returns `host:port`.
async fn serve<F, Fut>(handler: F) -> String
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(handler(stream));
        }
    });
    addr
}

/// A port on 127.0.0.1 with nothing listening.
async fn closed_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().to_string()
}

fn tcp(addr: &str, send: Option<&[u8]>, expect: Option<&str>) -> Probe {
    TcpProbe::new(TcpSpec {
        addr: addr.into(),
        send: send.map(<[u8]>::to_vec),
        expect: expect.map(str::to_owned),
    })
    .unwrap()
    .into()
}

fn assert_within(result: &ProbeResult, timeout: Duration) {
    assert!(
        result.duration >= timeout && result.duration < timeout + SLACK,
        "took {:?} with a {timeout:?} timeout: {result:?}",
        result.duration
    );
}

// ---------------------------------------------------------------- tcp

#[tokio::test]
async fn tcp_banner_matches() {
    let addr = serve(|mut s| async move {
        s.write_all(b"220 svc ready\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let r = tcp(&addr, None, Some("ready"))
        .run(Duration::from_secs(2))
        .await;
    assert!(r.ok, "{r:?}");
    assert_eq!(
        r.reason,
        format!("connected to {addr}, banner matched /ready/")
    );
    assert!(r.duration < Duration::from_secs(1));
}

#[tokio::test]
async fn tcp_send_then_expect() {
    let addr = serve(|mut s| async move {
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).await.unwrap();
        let reply: &[u8] = if &buf == b"PING\r\n" {
            b"PONG\r\n"
        } else {
            b"ERR\r\n"
        };
        s.write_all(reply).await.unwrap();
    })
    .await;
    let r = tcp(&addr, Some(b"PING\r\n"), Some("^PONG"))
        .run(Duration::from_secs(2))
        .await;
    assert!(r.ok, "{r:?}");
    assert_eq!(
        r.reason,
        format!("connected to {addr}, sent 6 bytes, banner matched /^PONG/")
    );
}

#[tokio::test]
async fn tcp_connect_only() {
    let addr = serve(|_s| async move {}).await;
    let r = tcp(&addr, None, None).run(Duration::from_secs(2)).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.reason, format!("connected to {addr}"));
}

#[tokio::test]
async fn tcp_wrong_banner_then_close() {
    let addr = serve(|mut s| async move {
        s.write_all(b"500 busy\r\n").await.unwrap();
    })
    .await;
    let r = tcp(&addr, None, Some("ready"))
        .run(Duration::from_secs(2))
        .await;
    assert!(!r.ok);
    assert_eq!(
        r.reason,
        format!(
            "connected to {addr}, connection closed after 10 bytes; \
             banner did not match /ready/: \"500 busy\\r\\n\""
        )
    );
}

#[tokio::test]
async fn tcp_wrong_banner_kept_open_times_out() {
    let addr = serve(|mut s| async move {
        s.write_all(b"500 busy\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
    })
    .await;
    let timeout = Duration::from_millis(800);
    let r = tcp(&addr, None, Some("ready")).run(timeout).await;
    assert!(!r.ok);
    assert_eq!(
        r.reason,
        "timed out after 800ms waiting for banner (got 10 bytes: \"500 busy\\r\\n\")"
    );
    assert_within(&r, timeout);
}

#[tokio::test]
async fn tcp_silent_server_times_out() {
    let addr = serve(|s| async move {
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(s);
    })
    .await;
    let timeout = Duration::from_secs(1);
    let r = tcp(&addr, None, Some("ready")).run(timeout).await;
    assert!(!r.ok);
    assert_eq!(
        r.reason,
        "timed out after 1s waiting for banner (got 0 bytes)"
    );
    assert_within(&r, timeout);
}

#[tokio::test]
async fn tcp_reset_by_server() {
    let addr = serve(|s| async move {
        s.set_zero_linger().unwrap();
        drop(s);
    })
    .await;
    let r = tcp(&addr, None, Some("ready"))
        .run(Duration::from_secs(2))
        .await;
    assert!(!r.ok);
    assert!(
        r.reason.contains("connection reset by peer after 0 bytes"),
        "{r:?}"
    );
}

#[tokio::test]
async fn tcp_closed_port_is_refused() {
    let addr = closed_port().await;
    let r = tcp(&addr, None, None).run(Duration::from_secs(2)).await;
    assert!(!r.ok);
    assert_eq!(r.reason, format!("connect to {addr}: connection refused"));
    assert!(r.duration < Duration::from_secs(1));
}

// ---------------------------------------------------------------- http

/// A request as the test server saw it: the request line and lower-cased header lines.
struct Seen {
    line: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the test server sends back.
struct Reply {
    delay: Duration,
    status: u16,
    body: String,
    /// Send only this many body bytes, then stall (Content-Length still says the full size).
    stall_after: Option<usize>,
}

fn reply(status: u16, body: &str) -> Reply {
    Reply {
        delay: Duration::ZERO,
        status,
        body: body.into(),
        stall_after: None,
    }
}

/// A minimal HTTP/1.1 server; returns the base URL `http://127.0.0.1:port`.
async fn http_server(handler: fn(&Seen) -> Reply) -> String {
    let addr = serve(move |mut s| async move {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.unwrap() == 0 {
                return;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let mut lines = head.split("\r\n");
        let line = lines.next().unwrap().to_owned();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let r = handler(&Seen { line, headers });
        tokio::time::sleep(r.delay).await;
        let head = format!(
            "HTTP/1.1 {} Whatever\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            r.status,
            r.body.len()
        );
        if s.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let send = r.stall_after.unwrap_or(r.body.len());
        let _ = s.write_all(&r.body.as_bytes()[..send]).await;
        if r.stall_after.is_some() {
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    })
    .await;
    format!("http://{addr}")
}

fn http(url: String, status: StatusRange, body: Option<&str>) -> Probe {
    HttpProbe::new(HttpSpec {
        url,
        status,
        body: body.map(str::to_owned),
        ..HttpSpec::default()
    })
    .unwrap()
    .into()
}

#[tokio::test]
async fn http_200_with_matching_body() {
    let base = http_server(|_| reply(200, "status: ok\n")).await;
    let probe = |re: &str| http(format!("{base}/health"), StatusRange::default(), Some(re));
    let r = probe("(?m)ok$").run(Duration::from_secs(2)).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.reason, "HTTP 200, body matched /(?m)ok$/");
    // Rust regex semantics: without (?m), `$` is the very end of the body, after the newline.
    let r = probe("ok$").run(Duration::from_secs(2)).await;
    assert!(!r.ok, "{r:?}");
}

#[tokio::test]
async fn http_slow_server_times_out() {
    let base = http_server(|_| Reply {
        delay: Duration::from_secs(5),
        ..reply(200, "ok")
    })
    .await;
    let timeout = Duration::from_secs(1);
    let r = http(base, StatusRange::default(), None).run(timeout).await;
    assert!(!r.ok);
    assert_eq!(r.reason, "timed out after 1s waiting for the response");
    assert_within(&r, timeout);
}

#[tokio::test]
async fn http_stalled_body_times_out() {
    let base = http_server(|_| Reply {
        stall_after: Some(3),
        ..reply(200, "partial body that never ends")
    })
    .await;
    let timeout = Duration::from_millis(700);
    let r = http(base, StatusRange::default(), Some("ends"))
        .run(timeout)
        .await;
    assert!(!r.ok);
    assert_eq!(
        r.reason,
        "timed out after 700ms reading the body (got 3 bytes)"
    );
    assert_within(&r, timeout);
}

#[tokio::test]
async fn http_500_fails() {
    let base = http_server(|_| reply(500, "ok")).await;
    let r = http(base, StatusRange::default(), Some("ok"))
        .run(Duration::from_secs(2))
        .await;
    assert!(!r.ok);
    assert_eq!(r.reason, "HTTP 500 (expected 200-399)");
}

#[tokio::test]
async fn http_body_mismatch_fails() {
    let base = http_server(|_| reply(200, "degraded")).await;
    let r = http(base, StatusRange::default(), Some("^ok"))
        .run(Duration::from_secs(2))
        .await;
    assert!(!r.ok);
    assert_eq!(
        r.reason,
        "HTTP 200, body did not match /^ok/ (read 8 bytes: \"degraded\")"
    );
}

#[tokio::test]
async fn http_status_ranges() {
    let base = http_server(|seen| match seen.line.split(' ').nth(1) {
        Some("/moved") => reply(302, ""),
        _ => reply(404, "nope"),
    })
    .await;
    let run = |path: &str, status: &str| {
        let probe = http(format!("{base}{path}"), status.parse().unwrap(), None);
        async move { probe.run(Duration::from_secs(2)).await }
    };
    let r = run("/moved", "200-399").await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.reason, "HTTP 302");
    let r = run("/moved", "200-299").await;
    assert!(!r.ok);
    assert_eq!(r.reason, "HTTP 302 (expected 200-299)");
    assert!(run("/moved", "302").await.ok);
    assert!(run("/gone", "404").await.ok);
    assert!(run("/gone", "400-499").await.ok);
    let r = run("/gone", "200-399").await;
    assert_eq!(
        (r.ok, r.reason.as_str()),
        (false, "HTTP 404 (expected 200-399)")
    );
}

#[tokio::test]
async fn http_sends_host_method_and_target() {
    let base = http_server(|seen| {
        if seen.line != "HEAD /health?deep=1 HTTP/1.1" {
            return reply(400, "");
        }
        let hosts = seen.headers.iter().filter(|(n, _)| n == "host").count();
        match seen.header("host") {
            Some("app.example") if hosts == 1 => reply(204, ""),
            _ => reply(421, ""),
        }
    })
    .await;
    let probe = |host: Option<&str>| -> Probe {
        HttpProbe::new(HttpSpec {
            url: format!("{base}/health?deep=1"),
            method: Some("head".into()),
            status: StatusRange::single(204).unwrap(),
            host: host.map(str::to_owned),
            ..HttpSpec::default()
        })
        .unwrap()
        .into()
    };
    let r = probe(Some("app.example")).run(Duration::from_secs(2)).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.reason, "HTTP 204");
    let r = probe(None).run(Duration::from_secs(2)).await;
    assert_eq!(
        (r.ok, r.reason.as_str()),
        (false, "HTTP 421 (expected 204)")
    );
}

#[tokio::test]
async fn http_default_host_is_url_authority() {
    let base = http_server(|seen| match seen.header("host") {
        Some(h) if h.starts_with("127.0.0.1:") => reply(200, "host ok"),
        _ => reply(400, ""),
    })
    .await;
    let r = http(base, StatusRange::single(200).unwrap(), Some("host ok"))
        .run(Duration::from_secs(2))
        .await;
    assert!(r.ok, "{r:?}");
}

#[tokio::test]
async fn http_closed_port_is_refused() {
    let addr = closed_port().await;
    let r = http(format!("http://{addr}/"), StatusRange::default(), None)
        .run(Duration::from_secs(2))
        .await;
    assert!(!r.ok);
    assert_eq!(r.reason, format!("connect to {addr}: connection refused"));
}

#[tokio::test]
async fn http_server_closing_without_response_fails() {
    let addr = serve(|mut s| async move {
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
    })
    .await;
    let r = http(format!("http://{addr}/"), StatusRange::default(), None)
        .run(Duration::from_secs(2))
        .await;
    assert!(!r.ok);
    assert!(r.reason.starts_with("request failed: "), "{r:?}");
    assert!(r.duration < Duration::from_secs(1));
}

// ---------------------------------------------------------------- exec

fn exec(argv: &[&str]) -> Probe {
    ExecProbe::new(ExecSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        run_as: None,
    })
    .unwrap()
    .into()
}

/// True when `pid` no longer exists or is a zombie (a reparented orphan nobody reaped yet).
fn gone_or_zombie(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat[stat.rfind(')').unwrap() + 1..]
            .trim_start()
            .starts_with('Z'),
    }
}

/// Polls [`gone_or_zombie`] for up to a second (SIGKILL delivery is asynchronous).
async fn eventually_gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        if gone_or_zombie(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn exec_true_passes() {
    let r = exec(&["true"]).run(Duration::from_secs(2)).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.reason, "exit status 0");
}

#[tokio::test]
async fn exec_false_fails_with_status() {
    let r = exec(&["false"]).run(Duration::from_secs(2)).await;
    assert!(!r.ok);
    assert_eq!(r.reason, "exit status 1");
}

#[tokio::test]
async fn exec_failure_reports_first_line_of_output() {
    let r = exec(&[
        "sh",
        "-c",
        "echo checking; echo 'db: connection refused' >&2; exit 3",
    ])
    .run(Duration::from_secs(2))
    .await;
    assert!(!r.ok);
    assert_eq!(r.reason, "exit status 3: db: connection refused");
}

#[tokio::test]
async fn exec_missing_program_fails() {
    let r = exec(&["/nonexistent/check"])
        .run(Duration::from_secs(2))
        .await;
    assert!(!r.ok);
    assert_eq!(r.reason, "cannot run /nonexistent/check: not found");
}

#[tokio::test]
async fn exec_timeout_kills_and_reaps() {
    let timeout = Duration::from_secs(1);
    let r = exec(&["sleep", "30"]).run(timeout).await;
    assert!(!r.ok);
    assert_within(&r, timeout);
    let pid: i32 = r
        .reason
        .strip_prefix("timed out after 1s; killed process group ")
        .unwrap_or_else(|| panic!("{r:?}"))
        .parse()
        .unwrap();
    // Our own child: reaped means it is gone entirely, not a zombie.
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "sleep {pid} still exists"
    );
}

#[tokio::test]
async fn exec_timeout_kills_grandchildren() {
    let timeout = Duration::from_secs(1);
    let r = exec(&["sh", "-c", "sleep 30 & echo $!; wait"])
        .run(timeout)
        .await;
    assert!(!r.ok);
    assert_within(&r, timeout);
    let (_, grandchild) = r.reason.split_once("; output: ").expect(&r.reason);
    let grandchild: i32 = grandchild.parse().unwrap();
    assert!(
        eventually_gone(grandchild).await,
        "grandchild {grandchild} lives"
    );
}

#[tokio::test]
async fn exec_grandchild_holding_stdout_does_not_hang() {
    let r = exec(&["sh", "-c", "sleep 30 & echo $!"])
        .run(Duration::from_secs(5))
        .await;
    assert!(r.ok, "{r:?}");
    assert!(r.duration < Duration::from_secs(1), "{r:?}");
    let grandchild: i32 = r
        .reason
        .strip_prefix("exit status 0: ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        eventually_gone(grandchild).await,
        "grandchild {grandchild} lives"
    );
}

#[tokio::test]
async fn exec_escaped_grandchild_holding_stdout_does_not_hang() {
    // setsid moves the grandchild out of the probe's process group, so it survives the
    // cleanup kill and keeps the pipe open; the probe must still return promptly.
    let r = exec(&["sh", "-c", "setsid sleep 30 & echo $!"])
        .run(Duration::from_secs(5))
        .await;
    let grandchild: i32 = r
        .reason
        .strip_prefix("exit status 0: ")
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    if grandchild > 1 {
        // SAFETY: plain syscall on the pid the command printed.
        unsafe { libc::kill(grandchild, libc::SIGKILL) };
    }
    assert!(r.ok, "{r:?}");
    assert!(r.duration < Duration::from_secs(1), "{r:?}");
}

#[tokio::test]
async fn exec_cancelled_run_kills_the_group() {
    let child_pid_path =
        std::env::temp_dir().join(format!("keepup-checks-cancel-{}", std::process::id()));
    let script = format!("sleep 30 & echo $! > {}; wait", child_pid_path.display());
    let probe = exec(&["sh", "-c", &script]);
    // Dropping the run future (as a cancelled agent task would) must not leave processes behind.
    let cancelled = tokio::time::timeout(
        Duration::from_millis(500),
        probe.run(Duration::from_secs(10)),
    );
    assert!(cancelled.await.is_err());
    let pid: i32 = std::fs::read_to_string(&child_pid_path)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = std::fs::remove_file(&child_pid_path);
    assert!(eventually_gone(pid).await, "grandchild {pid} lives");
}

#[tokio::test]
async fn exec_as_another_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: switching uid needs root");
        return;
    }
    let probe: Probe = ExecProbe::new(ExecSpec {
        argv: vec!["id".into()],
        run_as: Some(RunAs {
            uid: 65534,
            gid: 65534,
        }),
    })
    .unwrap()
    .into();
    let r = probe.run(Duration::from_secs(2)).await;
    assert!(r.ok, "{r:?}");
    assert!(r.reason.starts_with("exit status 0: uid=65534("), "{r:?}");
    assert!(r.reason.contains(" gid=65534("), "{r:?}");
    // Supplementary groups are dropped: only the primary group remains.
    let groups = r.reason.split(" groups=").nth(1).expect(&r.reason);
    assert!(
        groups.starts_with("65534(") && !groups.contains(','),
        "{r:?}"
    );
}

// ---------------------------------------------------------------- common

#[tokio::test]
async fn run_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let probes = [
        tcp("127.0.0.1:1", None, None),
        http("http://127.0.0.1:1/".into(), StatusRange::default(), None),
        exec(&["true"]),
    ];
    for p in &probes {
        let fut = p.run(Duration::from_millis(1));
        assert_send(&fut);
    }
}

#[test]
fn describe_through_probe() {
    assert_eq!(
        tcp("127.0.0.1:7070", None, Some("ready")).describe(),
        "tcp 127.0.0.1:7070 expect /ready/"
    );
    assert_eq!(
        http(
            "http://127.0.0.1:8080/health".into(),
            StatusRange::default(),
            Some("ok")
        )
        .describe(),
        "http GET http://127.0.0.1:8080/health status 200-399 body /ok/"
    );
    assert_eq!(exec(&["check", "--quick"]).describe(), "exec check --quick");
}
