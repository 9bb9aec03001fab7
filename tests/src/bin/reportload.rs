//! `reportload`: a load generator for `keepup serve --state`. Reads `NAME TOKEN` lines (the
//! output of `keepup host add --bulk`), then posts realistic agent reports for every host over
//! keep-alive HTTP/1.1 connections from several concurrent tasks and prints reports/s.
//!
//! ```text
//! reportload --server http://127.0.0.1:8080 --tokens tokens.txt [--connections 32] [--rounds 1]
//! reportload --server https://127.0.0.1:8443 --cacert ca.pem --tokens tokens.txt
//! reportload --server http://127.0.0.1:8080,http://127.0.0.1:8081 --tokens tokens.txt
//! ```
//!
//! With an `https://` server, each connection makes one TLS handshake (checked against
//! `--cacert`, for the name in the URL) and keeps it for all its reports, as agents'
//! reports through a keep-alive client would.
//!
//! Each round posts one report per host; a later round resends the host's events plus one new
//! one, as agents do. Used by tests/bench/report.sh.

use std::fmt::Write as _;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

struct Options {
    server: String,
    cacert: Option<String>,
    tokens: String,
    connections: usize,
    rounds: u64,
}

fn options() -> Result<Options> {
    let mut o = Options {
        server: "http://127.0.0.1:8080".into(),
        cacert: None,
        tokens: String::new(),
        connections: 32,
        rounds: 1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--server" => o.server = val()?,
            "--cacert" => o.cacert = Some(val()?),
            "--tokens" => o.tokens = val()?,
            "--connections" => o.connections = val()?.parse()?,
            "--rounds" => o.rounds = val()?.parse()?,
            _ => {
                bail!("usage: reportload --server URL [--cacert FILE] --tokens FILE [--connections N] [--rounds N]")
            }
        }
    }
    ensure!(
        !o.tokens.is_empty(),
        "--tokens FILE is required (keepup host add --bulk writes it)"
    );
    Ok(o)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A realistic report: three services with two probes each, a finished update pass with its
/// actions, and the host's recent events (5, plus one per round).
fn report(host: &str, i: usize, round: u64) -> String {
    let t = now();
    let behind = i % 10 == 0;
    let foo_version = if behind { "1.1-1" } else { "1.2-1" };
    let mut s = String::with_capacity(2048);
    let _ = write!(
        s,
        r#"{{"host":"{host}","agent_version":"0.1.0","sent_at":{t},"track":"stable","format":"deb","arch":"amd64","installed":{{"foo":"{foo_version}","bar":"2.1-1","baz":"1.0-1"}},"quarantined":[],"services":["#
    );
    for (n, (name, v)) in [("foo", foo_version), ("bar", "2.1-1"), ("baz", "1.0-1")]
        .iter()
        .enumerate()
    {
        let failing = i % 50 == 0 && n == 0;
        let _ = write!(
            s,
            r#"{}{{"name":"{name}","version":"{v}","state":"{}","restarts":{},"probes":[{{"name":"port","ok":{},"reason":{},"failures":{}}},{{"name":"health","ok":true,"reason":null,"failures":0}}],"start":{{"version":"{v}","started":true,"detail":"running for 1 s","log_tail":[],"at":{}}}}}"#,
            if n > 0 { "," } else { "" },
            if failing { "backoff" } else { "running" },
            (i + n) % 3,
            !failing,
            if failing {
                r#""connection refused""#
            } else {
                "null"
            },
            u32::from(failing) * 3,
            t - 3600,
        );
    }
    let _ = write!(
        s,
        r#"],"update":{{"at":{},"ok":{},"error":{},"actions":["foo: {foo_version} is current","bar: 2.1-1 is current","baz: 1.0-1 is current"],"index_serial":42,"fleet_serial":7}},"events":["#,
        t - 60,
        i % 100 != 0,
        if i % 100 == 0 {
            r#""repository unreachable: connection timed out""#
        } else {
            "null"
        },
    );
    let events = 5 + round;
    for e in 0..events {
        let _ = write!(
            s,
            r#"{}{{"at":{},"service":"foo","kind":"started","message":"foo {foo_version} started (pid {})"}}"#,
            if e > 0 { "," } else { "" },
            t - 3600 + e * 60,
            1000 + e
        );
    }
    s.push_str("]}");
    s
}

/// A connection, plain or TLS.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// TLS settings for an `https://` server: the client configuration and the server's name.
type Tls = Option<(std::sync::Arc<rustls::ClientConfig>, String)>;

fn tls_config(cacert: &str) -> Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(cacert)
        .with_context(|| format!("reading {cacert}"))?
    {
        roots.add(c.with_context(|| format!("{cacert}: not PEM"))?)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

/// Post each of `jobs` (host, token, index) on one keep-alive connection; returns
/// (accepted, rejected).
async fn worker(
    addr: String,
    authority: String,
    tls: Tls,
    jobs: Vec<(String, String, usize)>,
    round: u64,
) -> Result<(u64, u64)> {
    let tcp = TcpStream::connect(&addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let mut stream: Box<dyn Conn> = match tls {
        None => Box::new(tcp),
        Some((config, name)) => {
            let name = rustls::pki_types::ServerName::try_from(name)?;
            Box::new(
                tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .with_context(|| format!("TLS handshake with {addr}"))?,
            )
        }
    };
    let mut buf = vec![0u8; 16 * 1024];
    let (mut ok, mut bad) = (0, 0);
    let mut req = Vec::with_capacity(4096);
    for (host, token, i) in jobs {
        let body = report(&host, i, round);
        req.clear();
        let _ = write!(
            ByteWriter(&mut req),
            "POST /api/v1/report HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        req.extend_from_slice(body.as_bytes());
        stream.write_all(&req).await?;
        // Read one answer: headers, then Content-Length bytes of body.
        let mut have = 0;
        let (status, body_len, head_end) = loop {
            let n = stream.read(&mut buf[have..]).await?;
            ensure!(n > 0, "the server closed the connection");
            have += n;
            if let Some(p) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&buf[..p])?;
                let status: u16 = head.split_whitespace().nth(1).context("status")?.parse()?;
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0usize);
                break (status, len, p + 4);
            }
        };
        let mut rest = (head_end + body_len).saturating_sub(have);
        while rest > 0 {
            let n = stream.read(&mut buf).await?;
            ensure!(n > 0, "the server closed the connection");
            rest = rest.saturating_sub(n);
        }
        if status == 204 {
            ok += 1;
        } else {
            bad += 1;
        }
    }
    Ok((ok, bad))
}

/// `fmt::Write` into a byte vector.
struct ByteWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for ByteWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

fn main() -> Result<()> {
    let o = options()?;
    let text =
        std::fs::read_to_string(&o.tokens).with_context(|| format!("reading {}", o.tokens))?;
    let hosts: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(h, t)| (h.to_string(), t.trim().to_string()))
        .collect();
    ensure!(!hosts.is_empty(), "{}: no `NAME TOKEN` lines", o.tokens);
    let (authority, tls) = match o.server.strip_prefix("https://") {
        Some(rest) => {
            let cacert = o
                .cacert
                .as_deref()
                .context("an https:// --server needs --cacert FILE")?;
            let authority = rest.trim_end_matches('/').to_string();
            let name = authority
                .rsplit_once(':')
                .map_or(authority.as_str(), |(h, _)| h)
                .to_string();
            (authority, Some((tls_config(cacert)?, name)))
        }
        None => (o.server.clone(), None),
    };
    // Plain HTTP may name several servers (replicas), comma-separated: connection i goes to
    // server i modulo their number.
    let authorities: Vec<String> = match &tls {
        Some(_) => vec![authority],
        None => authority
            .split(',')
            .map(|s| {
                s.strip_prefix("http://")
                    .map(|a| a.trim_end_matches('/').to_string())
                    .context("--server must be http://HOST:PORT[,http://HOST:PORT...] or https://HOST:PORT")
            })
            .collect::<Result<_>>()?,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let size = report(&hosts[0].0, 1, 0).len();
    eprintln!(
        "reportload: {} hosts, {} round(s), {} connections, reports of ~{size} bytes",
        hosts.len(),
        o.rounds,
        o.connections
    );
    let (mut total_ok, mut total_bad) = (0, 0);
    let start = Instant::now();
    for round in 0..o.rounds {
        let t = Instant::now();
        let mut parts: Vec<Vec<(String, String, usize)>> = vec![Vec::new(); o.connections];
        for (i, (h, tok)) in hosts.iter().enumerate() {
            parts[i % o.connections].push((h.clone(), tok.clone(), i));
        }
        let (ok, bad) = rt.block_on(async {
            let tasks: Vec<_> = parts
                .into_iter()
                .enumerate()
                .map(|(k, jobs)| {
                    let authority = &authorities[k % authorities.len()];
                    tokio::spawn(worker(
                        authority.clone(),
                        authority.clone(),
                        tls.clone(),
                        jobs,
                        round,
                    ))
                })
                .collect();
            let (mut ok, mut bad) = (0, 0);
            for t in tasks {
                let (o, b) = t.await??;
                ok += o;
                bad += b;
            }
            Ok::<_, anyhow::Error>((ok, bad))
        })?;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "round {}: {ok} reports stored, {bad} rejected in {secs:.2} s: {:.0} reports/s",
            round + 1,
            ok as f64 / secs
        );
        total_ok += ok;
        total_bad += bad;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "total: {total_ok} reports stored, {total_bad} rejected in {secs:.2} s: {:.0} reports/s",
        total_ok as f64 / secs
    );
    ensure!(total_bad == 0, "{total_bad} reports were rejected");
    Ok(())
}
