//! HTTP probe: one plain-HTTP/1.1 request, then check the status and optionally the body.

use std::error::Error as _;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CONNECTION, HOST, USER_AGENT};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use regex::bytes::Regex;
use tokio::net::TcpStream;

use crate::{text, ProbeError, ProbeResult};

/// The most body bytes read for the body regex.
const BODY_CAP: usize = 1024 * 1024;

/// An inclusive range of acceptable HTTP status codes; the default is `200-399`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    min: u16,
    max: u16,
}

impl StatusRange {
    /// The range `min..=max`; both must lie in 100-599 and `min <= max`.
    pub fn new(min: u16, max: u16) -> Result<Self, ProbeError> {
        let bad = |reason: &str| ProbeError::InvalidStatus {
            spec: format!("{min}-{max}"),
            reason: reason.to_owned(),
        };
        if !(100..=599).contains(&min) || !(100..=599).contains(&max) {
            return Err(bad("status codes must be within 100-599"));
        }
        if min > max {
            return Err(bad("range start is above its end"));
        }
        Ok(StatusRange { min, max })
    }

    /// Exactly one status code.
    pub fn single(code: u16) -> Result<Self, ProbeError> {
        StatusRange::new(code, code).map_err(|e| match e {
            ProbeError::InvalidStatus { reason, .. } => ProbeError::InvalidStatus {
                spec: code.to_string(),
                reason,
            },
            other => other,
        })
    }

    /// Whether `code` is acceptable.
    pub fn contains(&self, code: u16) -> bool {
        (self.min..=self.max).contains(&code)
    }
}

impl Default for StatusRange {
    fn default() -> Self {
        StatusRange { min: 200, max: 399 }
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

impl FromStr for StatusRange {
    type Err = ProbeError;

    /// Parses `"200"` or `"200-399"`.
    fn from_str(s: &str) -> Result<Self, ProbeError> {
        let bad = |reason: &str| ProbeError::InvalidStatus {
            spec: s.to_owned(),
            reason: reason.to_owned(),
        };
        let num = |part: &str| {
            part.trim()
                .parse::<u16>()
                .map_err(|_| bad("expected a status code like 200 or a range like 200-399"))
        };
        let range = match s.split_once('-') {
            Some((lo, hi)) => StatusRange::new(num(lo)?, num(hi)?),
            None => StatusRange::single(num(s)?),
        };
        range.map_err(|e| match e {
            ProbeError::InvalidStatus { reason, .. } => bad(&reason),
            other => other,
        })
    }
}

/// What an HTTP probe does, as plain data (e.g. converted from a manifest).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpSpec {
    /// `http://host[:port]/path[?query]`; https is not supported.
    pub url: String,
    /// Request method; `None` means `GET`. Case-insensitive.
    pub method: Option<String>,
    /// Acceptable status codes.
    pub status: StatusRange,
    /// Regex the response body (its first 1 MiB) must match. Rust `regex` syntax, Unicode mode
    /// off (`\d`, `\w`, `(?i)` are ASCII); `$` is the end of the body unless `(?m)` is given.
    pub body: Option<String>,
    /// Host header to send instead of the URL's authority (the connection still goes to the URL).
    pub host: Option<String>,
}

/// A validated HTTP probe with its URL parsed and body regex compiled.
#[derive(Debug, Clone)]
pub struct HttpProbe {
    url: String,
    method: Method,
    connect_to: String,
    target: String,
    host: HeaderValue,
    host_override: bool,
    status: StatusRange,
    body: Option<Regex>,
}

/// How far a run got, so a timeout can say what it was waiting for.
enum Phase {
    Connecting,
    AwaitingResponse,
    ReadingBody,
}

struct Progress {
    phase: Phase,
    body_bytes: usize,
}

impl HttpProbe {
    /// Parses the URL, method and Host override, and compiles the body regex.
    pub fn new(spec: HttpSpec) -> Result<Self, ProbeError> {
        let bad_url = |reason: &str| ProbeError::InvalidUrl {
            url: spec.url.clone(),
            reason: reason.to_owned(),
        };
        let uri: Uri = spec.url.parse().map_err(|e| bad_url(&format!("{e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(ProbeError::UnsupportedScheme {
                    url: spec.url.clone(),
                    scheme: other.to_owned(),
                })
            }
            None => return Err(bad_url("expected http://host[:port]/path")),
        }
        let authority = uri.authority().ok_or_else(|| bad_url("missing host"))?;
        if authority.as_str().contains('@') {
            return Err(bad_url("credentials in the URL are not supported"));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(bad_url("missing host"));
        }
        let port = match authority.port() {
            Some(p) => match p.as_u16() {
                0 => return Err(bad_url("port must be 1-65535")),
                n => n,
            },
            None if authority.as_str().ends_with(':') => {
                return Err(bad_url("empty port"));
            }
            None => 80,
        };
        let method = match spec.method.as_deref() {
            None => Method::GET,
            Some(m) => Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| ProbeError::InvalidMethod(m.to_owned()))?,
        };
        let (host_header, host_override) = match &spec.host {
            Some(h) => {
                let value = HeaderValue::from_str(h)
                    .ok()
                    .filter(|_| !h.is_empty())
                    .ok_or_else(|| ProbeError::InvalidHost(h.clone()))?;
                (value, true)
            }
            None => (
                HeaderValue::from_str(authority.as_str()).map_err(|_| bad_url("bad host"))?,
                false,
            ),
        };
        let body = spec
            .body
            .as_deref()
            .map(|p| text::regex("body", p))
            .transpose()?;
        let target = uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .filter(|pq| !pq.is_empty())
            .unwrap_or("/")
            .to_owned();
        Ok(HttpProbe {
            connect_to: format!("{host}:{port}"),
            url: spec.url,
            method,
            target,
            host: host_header,
            host_override,
            status: spec.status,
            body,
        })
    }

    /// One-line summary, e.g. `http GET http://127.0.0.1:8080/health status 200-399 body /ok/`.
    pub fn describe(&self) -> String {
        let mut s = format!("http {} {} status {}", self.method, self.url, self.status);
        if self.host_override {
            s.push_str(&format!(" host {}", self.host.to_str().unwrap_or("?")));
        }
        if let Some(re) = &self.body {
            s.push_str(&format!(" body /{}/", re.as_str()));
        }
        s
    }

    /// Runs the probe once; `timeout` covers resolve, connect, request, headers and body read.
    pub async fn run(&self, timeout: Duration) -> ProbeResult {
        let start = Instant::now();
        let mut progress = Progress {
            phase: Phase::Connecting,
            body_bytes: 0,
        };
        let (ok, reason) = match tokio::time::timeout(timeout, self.exchange(&mut progress)).await {
            Ok(verdict) => verdict,
            Err(_) => {
                let after = text::duration(timeout);
                let reason = match progress.phase {
                    Phase::Connecting => {
                        format!("timed out after {after} connecting to {}", self.connect_to)
                    }
                    Phase::AwaitingResponse => {
                        format!("timed out after {after} waiting for the response")
                    }
                    Phase::ReadingBody => format!(
                        "timed out after {after} reading the body (got {} bytes)",
                        progress.body_bytes
                    ),
                };
                (false, reason)
            }
        };
        ProbeResult {
            ok,
            reason,
            duration: start.elapsed(),
        }
    }

    async fn exchange(&self, progress: &mut Progress) -> (bool, String) {
        let stream = match TcpStream::connect(self.connect_to.as_str()).await {
            Ok(s) => s,
            Err(e) => {
                return (
                    false,
                    format!("connect to {}: {}", self.connect_to, text::io_error(&e)),
                )
            }
        };
        progress.phase = Phase::AwaitingResponse;
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(pair) => pair,
                Err(e) => return (false, format!("HTTP handshake failed: {}", chain(&e))),
            };
        let request = Request::builder()
            .method(self.method.clone())
            .uri(self.target.as_str())
            .header(HOST, self.host.clone())
            .header(USER_AGENT, "keepup-probe")
            .header(CONNECTION, "close")
            .body(Empty::<Bytes>::new());
        let request = match request {
            Ok(r) => r,
            Err(e) => return (false, format!("cannot build request: {e}")),
        };
        // The connection future does the I/O; drive it alongside the exchange in this task so
        // that a timeout (which drops this future) also drops the connection.
        let exchange = async {
            let response = match sender.send_request(request).await {
                Ok(r) => r,
                Err(e) => return (false, format!("request failed: {}", chain(&e))),
            };
            let code = response.status().as_u16();
            if !self.status.contains(code) {
                return (false, format!("HTTP {code} (expected {})", self.status));
            }
            let Some(re) = &self.body else {
                return (true, format!("HTTP {code}"));
            };
            progress.phase = Phase::ReadingBody;
            let mut body = response.into_body();
            let mut got: Vec<u8> = Vec::new();
            while got.len() < BODY_CAP {
                match body.frame().await {
                    None => break,
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            let take = data.len().min(BODY_CAP - got.len());
                            got.extend_from_slice(&data[..take]);
                            progress.body_bytes = got.len();
                        }
                    }
                    Some(Err(e)) => {
                        return (
                            false,
                            format!(
                                "HTTP {code}, reading the body failed after {} bytes: {}",
                                got.len(),
                                chain(&e)
                            ),
                        )
                    }
                }
            }
            if re.is_match(&got) {
                (true, format!("HTTP {code}, body matched /{}/", re.as_str()))
            } else {
                (
                    false,
                    format!(
                        "HTTP {code}, body did not match /{}/ (read {} bytes: {})",
                        re.as_str(),
                        got.len(),
                        text::snippet(&got, 80)
                    ),
                )
            }
        };
        tokio::pin!(exchange);
        tokio::pin!(conn);
        tokio::select! {
            verdict = &mut exchange => verdict,
            // The connection ended first (cleanly or not): the exchange sees the outcome.
            _ = &mut conn => exchange.await,
        }
    }
}

/// An error and its sources, joined with `": "`.
fn chain(e: &hyper::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let part = match inner.downcast_ref::<std::io::Error>() {
            Some(io) => text::io_error(io),
            None => inner.to_string(),
        };
        s.push_str(": ");
        s.push_str(&part);
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str) -> HttpSpec {
        HttpSpec {
            url: url.into(),
            ..HttpSpec::default()
        }
    }

    #[test]
    fn describe_defaults_and_options() {
        let p = HttpProbe::new(spec("http://127.0.0.1:8080/health")).unwrap();
        assert_eq!(
            p.describe(),
            "http GET http://127.0.0.1:8080/health status 200-399"
        );
        let p = HttpProbe::new(HttpSpec {
            url: "http://10.0.0.1/".into(),
            method: Some("head".into()),
            status: StatusRange::single(204).unwrap(),
            body: Some("ok".into()),
            host: Some("app.example".into()),
        })
        .unwrap();
        assert_eq!(
            p.describe(),
            "http HEAD http://10.0.0.1/ status 204 host app.example body /ok/"
        );
    }

    #[test]
    fn parses_targets() {
        let p = HttpProbe::new(spec("http://localhost")).unwrap();
        assert_eq!(
            (p.connect_to.as_str(), p.target.as_str()),
            ("localhost:80", "/")
        );
        assert_eq!(p.host, "localhost");
        let p = HttpProbe::new(spec("http://[::1]:8080/a/b?c=d")).unwrap();
        assert_eq!(p.connect_to, "[::1]:8080");
        assert_eq!(p.target, "/a/b?c=d");
        assert_eq!(p.host, "[::1]:8080");
    }

    #[test]
    fn rejects_bad_urls() {
        for url in [
            "",
            "not a url",
            "/health",
            "localhost:8080/x",
            "http://",
            "http://h:0/",
        ] {
            let err = HttpProbe::new(spec(url)).unwrap_err();
            assert!(
                matches!(&err, ProbeError::InvalidUrl { url: u, .. } | ProbeError::UnsupportedScheme { url: u, .. } if u == url),
                "{url:?} gave {err:?}"
            );
        }
        let err = HttpProbe::new(spec("https://example.com/")).unwrap_err();
        assert_eq!(
            err,
            ProbeError::UnsupportedScheme {
                url: "https://example.com/".into(),
                scheme: "https".into()
            }
        );
        let err = HttpProbe::new(spec("http://user:pw@example.com/")).unwrap_err();
        assert!(matches!(err, ProbeError::InvalidUrl { .. }), "{err:?}");
    }

    #[test]
    fn rejects_bad_method_host_and_regex() {
        let err = HttpProbe::new(HttpSpec {
            method: Some("GE T".into()),
            ..spec("http://h/")
        })
        .unwrap_err();
        assert_eq!(err, ProbeError::InvalidMethod("GE T".into()));
        let err = HttpProbe::new(HttpSpec {
            host: Some("a\nb".into()),
            ..spec("http://h/")
        })
        .unwrap_err();
        assert_eq!(err, ProbeError::InvalidHost("a\nb".into()));
        let err = HttpProbe::new(HttpSpec {
            body: Some("[ok".into()),
            ..spec("http://h/")
        })
        .unwrap_err();
        assert!(
            matches!(&err, ProbeError::InvalidRegex { what: "body", pattern, .. } if pattern == "[ok"),
            "{err:?}"
        );
    }

    #[test]
    fn status_ranges() {
        let r: StatusRange = "200-299".parse().unwrap();
        assert!(r.contains(200) && r.contains(299) && !r.contains(300));
        assert_eq!(r.to_string(), "200-299");
        assert_eq!("204".parse::<StatusRange>().unwrap().to_string(), "204");
        assert_eq!(
            " 301 - 302 ".parse::<StatusRange>().unwrap().to_string(),
            "301-302"
        );
        assert_eq!(StatusRange::default().to_string(), "200-399");
        for bad in ["", "abc", "99", "600", "300-200", "200-", "2xx"] {
            match bad.parse::<StatusRange>() {
                Err(ProbeError::InvalidStatus { spec, .. }) => assert_eq!(spec, bad),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
        assert!(StatusRange::new(400, 300).is_err());
        assert_eq!(
            StatusRange::single(42).unwrap_err(),
            ProbeError::InvalidStatus {
                spec: "42".into(),
                reason: "status codes must be within 100-599".into()
            }
        );
    }
}
