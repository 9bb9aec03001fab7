//! herdload: a herd of agents reconnecting at once (tests/bench/herd.sh). Every host of a
//! tokens file (`keepup host add --bulk` output) posts one report, starting at a random moment
//! within `--window-ms`, on a connection of its own, as agents do; a `503` with `Retry-After`
//! is honoured as keepup-agent honours it (that many seconds plus a random part of one), a
//! post that gets no answer is tried again a second later, and one that takes longer than the
//! agent's 20 s bound counts as a timeout. It prints how the herd went: stored, answers, the
//! spread of `Retry-After`, timeouts, and how long until every report was stored.
//!
//! With `--fixed-retry-secs N` the herd ignores the `Retry-After` values and comes back after
//! N s (plus the part of a second), as every client did when the server always said
//! `Retry-After: 1`: the comparison the benchmark prints.
//!
//! ```text
//! herdload --server 127.0.0.1:8080 --tokens tokens.txt [--window-ms 1000] [--fixed-retry-secs 1]
//! ```

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpSocket;

/// The agent's bound on one post (agent/src/report.rs, `POST_TIMEOUT`).
const POST_TIMEOUT: Duration = Duration::from_secs(20);
/// The agent's bound on an honoured `Retry-After` (agent/src/report.rs, `MAX_RETRY_AFTER`).
const MAX_RETRY_AFTER: u64 = 600;

struct Options {
    server: String,
    tokens: String,
    window: Duration,
    fixed_retry: Option<u64>,
}

fn options() -> Result<Options> {
    let mut o = Options {
        server: "127.0.0.1:8080".into(),
        tokens: String::new(),
        window: Duration::from_millis(1000),
        fixed_retry: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--server" => o.server = val()?.trim_start_matches("http://").to_string(),
            "--tokens" => o.tokens = val()?,
            "--window-ms" => o.window = Duration::from_millis(val()?.parse()?),
            "--fixed-retry-secs" => o.fixed_retry = Some(val()?.parse()?),
            _ => bail!(
                "usage: herdload --server HOST:PORT --tokens FILE [--window-ms N] \
                 [--fixed-retry-secs N]"
            ),
        }
    }
    ensure!(
        !o.tokens.is_empty(),
        "--tokens FILE is required (keepup host add --bulk writes it)"
    );
    Ok(o)
}

/// splitmix64: a spread of bits from any seed (the bench needs no better randomness).
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What one post got.
enum Answer {
    Stored,
    Busy(Option<u64>),
    Other,
    /// The connection could not be made (refused, or the listen queue overflowed).
    NotConnected,
    /// Connected, but closed (or reset) with no answer.
    Unanswered,
    TimedOut,
}

/// Source addresses the herd connects from (127.0.0.2 ...): one address's ephemeral ports
/// (about 28,000) would run out before 100,000 agents have connected, which would measure the
/// client, not the server.
const SOURCES: u64 = 32;

/// One report on a connection of its own (`Connection: close`), bounded like the agent's,
/// from the loopback source address `source`.
async fn post(server: SocketAddr, source: u64, request: &[u8]) -> Answer {
    let run = async {
        let socket = TcpSocket::new_v4()?;
        let from = Ipv4Addr::new(127, 0, 0, 2 + (source % SOURCES) as u8);
        socket.bind(SocketAddr::from((from, 0)))?;
        let mut s = match socket.connect(server).await {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        s.write_all(request).await?;
        let mut raw = Vec::with_capacity(512);
        s.read_to_end(&mut raw).await?;
        std::io::Result::Ok(Ok(raw))
    };
    let raw = match tokio::time::timeout(POST_TIMEOUT, run).await {
        Err(_) => return Answer::TimedOut,
        Ok(Ok(Err(_))) => return Answer::NotConnected,
        Ok(Err(_)) => return Answer::Unanswered,
        Ok(Ok(Ok(raw))) => raw,
    };
    let head = String::from_utf8_lossy(&raw);
    let Some(status) = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
    else {
        return Answer::Unanswered;
    };
    match status {
        204 => Answer::Stored,
        503 | 429 => Answer::Busy(head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("retry-after")
                .then(|| v.trim().parse().ok())?
        })),
        _ => Answer::Other,
    }
}

#[derive(Default)]
struct Tally {
    stored: AtomicU64,
    busy: AtomicU64,
    busy_without_retry_after: AtomicU64,
    unanswered: AtomicU64,
    not_connected: AtomicU64,
    timed_out: AtomicU64,
    other: AtomicU64,
    last_stored_ms: AtomicU64,
    /// `Retry-After` value -> how many times it was given.
    asked: Mutex<BTreeMap<u64, u64>>,
}

fn report(host: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{{\"host\":\"{host}\",\"agent_version\":\"0.1.0\",\"sent_at\":{now},\"track\":\"stable\",\
         \"format\":\"deb\",\"arch\":\"amd64\",\"installed\":{{\"foo\":\"1.2-1\"}},\
         \"services\":[{{\"name\":\"foo\",\"version\":\"1.2-1\",\"state\":\"running\",\
         \"restarts\":0,\"probes\":[{{\"name\":\"port\",\"ok\":true,\"failures\":0}}]}}],\
         \"update\":{{\"at\":{now},\"ok\":true}},\"events\":[]}}"
    )
}

fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn main() -> Result<()> {
    let o = options()?;
    raise_nofile();
    let hosts: Vec<(String, String)> = std::fs::read_to_string(&o.tokens)
        .with_context(|| format!("reading {}", o.tokens))?
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(h, t)| (h.to_string(), t.trim().to_string()))
        .collect();
    ensure!(!hosts.is_empty(), "{}: no `host token` lines", o.tokens);
    let n = hosts.len();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let seed = start.elapsed().as_nanos() as u64 ^ u64::from(std::process::id());
    let server: SocketAddr = o
        .server
        .to_socket_addrs()?
        .next()
        .with_context(|| format!("{}: no address", o.server))?;
    rt.block_on(async {
        let mut tasks = Vec::with_capacity(n);
        for (i, (host, token)) in hosts.into_iter().enumerate() {
            let (tally, fixed_retry) = (tally.clone(), o.fixed_retry);
            let own = mix(seed ^ i as u64);
            let first = Duration::from_micros(own % (o.window.as_micros() as u64).max(1));
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(first).await;
                for attempt in 0u64.. {
                    let body = report(&host);
                    let request = format!(
                        "POST /api/v1/report HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\
                         Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let jitter = Duration::from_millis(mix(own ^ attempt) % 1000);
                    let wait = match post(server, i as u64, request.as_bytes()).await {
                        Answer::Stored => {
                            tally.stored.fetch_add(1, Ordering::Relaxed);
                            tally
                                .last_stored_ms
                                .fetch_max(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                            return;
                        }
                        Answer::Busy(Some(secs)) => {
                            tally.busy.fetch_add(1, Ordering::Relaxed);
                            *tally.asked.lock().unwrap().entry(secs).or_default() += 1;
                            let secs = fixed_retry.unwrap_or(secs);
                            Duration::from_secs(secs.clamp(1, MAX_RETRY_AFTER)) + jitter
                        }
                        // No wait asked: the agent's own next try, a second on.
                        failed @ (Answer::Busy(None)
                        | Answer::Unanswered
                        | Answer::NotConnected
                        | Answer::TimedOut) => {
                            let count = match failed {
                                Answer::Busy(None) => &tally.busy_without_retry_after,
                                Answer::Unanswered => &tally.unanswered,
                                Answer::NotConnected => &tally.not_connected,
                                _ => &tally.timed_out,
                            };
                            count.fetch_add(1, Ordering::Relaxed);
                            Duration::from_secs(1) + jitter
                        }
                        Answer::Other => {
                            tally.other.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    };
                    tokio::time::sleep(wait).await;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let t = &tally;
    let stored = t.stored.load(Ordering::Relaxed);
    let last = t.last_stored_ms.load(Ordering::Relaxed) as f64 / 1000.0;
    let asked = t.asked.lock().unwrap();
    let total_asked: u64 = asked.values().sum();
    let quantile = |q: f64| {
        let want = (total_asked as f64 * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (secs, count) in asked.iter() {
            seen += count;
            if seen >= want {
                return *secs;
            }
        }
        0
    };
    println!(
        "herd: {n} agents starting within {} ms, each on a connection of its own, {}",
        o.window.as_millis(),
        match o.fixed_retry {
            Some(s) => format!("coming back after {s} s whatever the server asks"),
            None => "honouring Retry-After".to_string(),
        }
    );
    println!(
        "stored: {stored} of {n} (lost: {}); every report stored after {last:.1} s ({:.0} reports/s)",
        n as u64 - stored,
        stored as f64 / last.max(0.001)
    );
    println!(
        "answers: 503 + Retry-After {}, 503 without Retry-After {}, closed with no answer {}, \
         not connected {}, timed out (> {} s) {}, other {}",
        t.busy.load(Ordering::Relaxed),
        t.busy_without_retry_after.load(Ordering::Relaxed),
        t.unanswered.load(Ordering::Relaxed),
        t.not_connected.load(Ordering::Relaxed),
        POST_TIMEOUT.as_secs(),
        t.timed_out.load(Ordering::Relaxed),
        t.other.load(Ordering::Relaxed),
    );
    if total_asked > 0 {
        println!(
            "Retry-After: {} distinct values, min {} / median {} / p90 {} / max {} s",
            asked.len(),
            asked.keys().next().unwrap(),
            quantile(0.5),
            quantile(0.9),
            asked.keys().next_back().unwrap(),
        );
    }
    Ok(())
}
