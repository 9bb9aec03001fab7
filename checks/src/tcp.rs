//! TCP probe: connect, optionally send bytes, optionally wait for a banner matching a regex.

use std::time::{Duration, Instant};

use regex::bytes::Regex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{text, ProbeError, ProbeResult};

/// The most banner bytes read before giving up on a match.
const BANNER_CAP: usize = 64 * 1024;

/// What a TCP probe does, as plain data (e.g. converted from a manifest).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TcpSpec {
    /// `host:port` to connect to; `[v6addr]:port` for IPv6 literals. Names are resolved per run.
    pub addr: String,
    /// Bytes written right after connecting (e.g. `b"PING\r\n"`).
    pub send: Option<Vec<u8>>,
    /// Regex the bytes read back must match; without it, connecting (and sending) is enough.
    /// Rust `regex` syntax with Unicode mode off (`\d`, `\w`, `(?i)` are ASCII), searched
    /// anywhere in what was read so far (`(?m)^220 ` anchors to a line).
    pub expect: Option<String>,
}

/// A validated TCP probe with its banner regex compiled.
#[derive(Debug, Clone)]
pub struct TcpProbe {
    addr: String,
    send: Option<Vec<u8>>,
    expect: Option<Regex>,
}

/// How far a run got, so a timeout can say what it was waiting for.
enum Phase {
    Connecting,
    Sending,
    Reading,
}

struct Progress {
    phase: Phase,
    peer: String,
    got: Vec<u8>,
}

impl TcpProbe {
    /// Checks the address and compiles the banner regex.
    pub fn new(spec: TcpSpec) -> Result<Self, ProbeError> {
        check_addr(&spec.addr)?;
        let expect = spec
            .expect
            .as_deref()
            .map(|p| text::regex("banner", p))
            .transpose()?;
        Ok(TcpProbe {
            addr: spec.addr,
            send: spec.send,
            expect,
        })
    }

    /// One-line summary, e.g. `tcp 127.0.0.1:7070 send "PING\r\n" expect /PONG/`.
    pub fn describe(&self) -> String {
        let mut s = format!("tcp {}", self.addr);
        if let Some(bytes) = &self.send {
            s.push_str(&format!(" send {}", text::snippet(bytes, 40)));
        }
        if let Some(re) = &self.expect {
            s.push_str(&format!(" expect /{}/", re.as_str()));
        }
        s
    }

    /// Runs the probe once; `timeout` covers resolve, connect, send and the banner read.
    pub async fn run(&self, timeout: Duration) -> ProbeResult {
        let start = Instant::now();
        let mut progress = Progress {
            phase: Phase::Connecting,
            peer: self.addr.clone(),
            got: Vec::new(),
        };
        let (ok, reason) = match tokio::time::timeout(timeout, self.exchange(&mut progress)).await {
            Ok(verdict) => verdict,
            Err(_) => (false, timeout_reason(timeout, &progress)),
        };
        ProbeResult {
            ok,
            reason,
            duration: start.elapsed(),
        }
    }

    async fn exchange(&self, progress: &mut Progress) -> (bool, String) {
        let mut stream = match TcpStream::connect(self.addr.as_str()).await {
            Ok(s) => s,
            Err(e) => {
                return (
                    false,
                    format!("connect to {}: {}", self.addr, text::io_error(&e)),
                )
            }
        };
        if let Ok(peer) = stream.peer_addr() {
            progress.peer = peer.to_string();
        }
        let peer = progress.peer.clone();
        let mut done = format!("connected to {peer}");
        if let Some(bytes) = &self.send {
            progress.phase = Phase::Sending;
            if let Err(e) = stream.write_all(bytes).await {
                return (
                    false,
                    format!("{done}, send failed: {}", text::io_error(&e)),
                );
            }
            done.push_str(&format!(", sent {} bytes", bytes.len()));
        }
        let Some(re) = &self.expect else {
            return (true, done);
        };
        progress.phase = Phase::Reading;
        let got = &mut progress.got;
        let mut chunk = vec![0u8; 8192];
        loop {
            let room = (BANNER_CAP - got.len()).min(chunk.len());
            match stream.read(&mut chunk[..room]).await {
                Ok(0) => {
                    if re.is_match(got) {
                        return (true, format!("{done}, banner matched /{}/", re.as_str()));
                    }
                    return (
                        false,
                        format!(
                            "{done}, connection closed after {} bytes; banner did not match /{}/: {}",
                            got.len(),
                            re.as_str(),
                            text::snippet(got, 80)
                        ),
                    );
                }
                Ok(n) => {
                    got.extend_from_slice(&chunk[..n]);
                    if re.is_match(got) {
                        return (true, format!("{done}, banner matched /{}/", re.as_str()));
                    }
                    if got.len() >= BANNER_CAP {
                        return (
                            false,
                            format!(
                                "{done}, banner did not match /{}/ in the first {} bytes: {}",
                                re.as_str(),
                                got.len(),
                                text::snippet(got, 80)
                            ),
                        );
                    }
                }
                Err(e) => {
                    return (
                        false,
                        format!(
                            "{done}, {} after {} bytes waiting for banner",
                            text::io_error(&e),
                            got.len()
                        ),
                    )
                }
            }
        }
    }
}

fn timeout_reason(timeout: Duration, progress: &Progress) -> String {
    let after = text::duration(timeout);
    match progress.phase {
        Phase::Connecting => format!("timed out after {after} connecting to {}", progress.peer),
        Phase::Sending => format!("timed out after {after} sending to {}", progress.peer),
        Phase::Reading if progress.got.is_empty() => {
            format!("timed out after {after} waiting for banner (got 0 bytes)")
        }
        Phase::Reading => format!(
            "timed out after {after} waiting for banner (got {} bytes: {})",
            progress.got.len(),
            text::snippet(&progress.got, 80)
        ),
    }
}

/// Accepts `host:port` and `[v6]:port` with a non-zero port; the host is resolved at run time.
fn check_addr(addr: &str) -> Result<(), ProbeError> {
    let bad = |reason: &str| ProbeError::InvalidAddress {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    };
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| bad("expected host:port"))?;
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err(bad("port must be 1-65535")),
        Ok(_) => {}
    }
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    if let Some(inner) = host.strip_prefix('[') {
        if !inner.ends_with(']') || inner.len() < 2 {
            return Err(bad("unbalanced brackets around IPv6 address"));
        }
    } else if host.contains(':') {
        return Err(bad("IPv6 addresses need brackets: [addr]:port"));
    }
    if host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(bad("host contains whitespace or '/'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(addr: &str) -> TcpSpec {
        TcpSpec {
            addr: addr.into(),
            ..TcpSpec::default()
        }
    }

    #[test]
    fn describe_includes_send_and_expect() {
        let p = TcpProbe::new(TcpSpec {
            addr: "127.0.0.1:7070".into(),
            send: Some(b"PING\r\n".to_vec()),
            expect: Some("^PONG".into()),
        })
        .unwrap();
        assert_eq!(
            p.describe(),
            r#"tcp 127.0.0.1:7070 send "PING\r\n" expect /^PONG/"#
        );
        let p = TcpProbe::new(spec("db.internal:5432")).unwrap();
        assert_eq!(p.describe(), "tcp db.internal:5432");
    }

    #[test]
    fn rejects_bad_addresses() {
        for addr in [
            "",
            "localhost",
            ":80",
            "host:0",
            "host:http",
            "host:70000",
            "::1:80",
            "[::1:80",
            "a b:80",
        ] {
            match TcpProbe::new(spec(addr)) {
                Err(ProbeError::InvalidAddress { addr: a, .. }) => assert_eq!(a, addr),
                other => panic!("{addr:?} gave {other:?}"),
            }
        }
        for addr in ["127.0.0.1:1", "[::1]:80", "example.com:443"] {
            TcpProbe::new(spec(addr)).unwrap();
        }
    }

    #[test]
    fn rejects_bad_regex() {
        let err = TcpProbe::new(TcpSpec {
            addr: "127.0.0.1:1".into(),
            expect: Some("ready(".into()),
            ..TcpSpec::default()
        })
        .unwrap_err();
        assert!(matches!(
            &err,
            ProbeError::InvalidRegex { what: "banner", pattern, .. } if pattern == "ready("
        ));
        assert!(
            err.to_string().starts_with("invalid banner regex /ready(/"),
            "{err}"
        );
    }
}
