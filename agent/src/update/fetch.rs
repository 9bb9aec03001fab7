//! Downloading a package into the cache and checking it: HTTP/1 (hyper), plain or over TLS
//! (rustls, for `https://` URLs: what makes a package trustworthy is its sha256 in the signed
//! index, not the transport; TLS is what keeps the report token secret), bounded
//! in time and in size (never more bytes than the index declares), written to a temporary file
//! in the cache directory and renamed into place only when its size and sha256 match. A file
//! already in the cache with the right sha256 is used without downloading again.
//!
//! The same small client fetches the signed index and policy ([`get`], bounded in size) and
//! posts reports ([`post`]).
//!
//! `https://` URLs are verified against the CAs of the agent's `ca_file` (set once at start
//! with [`trust_ca_file`]) or else the system's CA bundle, and the certificate must be valid
//! for the URL's host.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
pub use keepup_deploy::https::read_ca_bundle;
use keepup_deploy::https::{self, Target, Trust};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// What to fetch and what it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted<'a> {
    /// `http[s]://host[:port]/path`.
    pub url: &'a str,
    /// Exact size in bytes (from the index).
    pub size: u64,
    /// SHA-256, lowercase hex (from the index).
    pub sha256: &'a str,
}

/// Why a download was refused or failed.
#[derive(Debug)]
pub enum FetchError {
    /// Not a URL this client fetches.
    BadUrl(String),
    /// Connecting, sending or receiving failed.
    Http(String),
    /// The TLS handshake failed: the server's certificate is not trusted, or TLS is not set
    /// up (what is wrong and what to do).
    Tls(String),
    /// The server answered something other than 200.
    Status(StatusCode),
    /// The whole download took longer than the timeout.
    Timeout(Duration),
    /// More bytes than the index says the file has.
    TooLarge(u64),
    /// Fewer bytes than the index says.
    TooShort {
        /// Bytes received.
        got: u64,
        /// Bytes expected.
        want: u64,
    },
    /// The content is not what the index says.
    Sha256Mismatch {
        /// What the bytes hash to.
        got: String,
        /// What the index says.
        want: String,
    },
    /// Writing the cache failed.
    Io(std::io::Error),
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::BadUrl(why) => f.write_str(why),
            FetchError::Http(why) => write!(f, "download failed: {why}"),
            FetchError::Tls(why) => write!(f, "TLS: {why}"),
            FetchError::Status(s) => write!(f, "download failed: the server answered {s}"),
            FetchError::Timeout(t) => write!(
                f,
                "download failed: not complete after {}",
                humantime::format_duration(*t)
            ),
            FetchError::TooLarge(want) => write!(
                f,
                "refused: the server sent more than the {want} bytes the signed index lists"
            ),
            FetchError::TooShort { got, want } => write!(
                f,
                "refused: the server sent {got} bytes, the signed index lists {want}"
            ),
            FetchError::Sha256Mismatch { got, want } => write!(
                f,
                "refused: sha256 mismatch: the file hashes to {got}, the signed index lists \
                 {want}; not installed"
            ),
            FetchError::Io(e) => write!(f, "writing the package cache: {e}"),
        }
    }
}

impl std::error::Error for FetchError {}

impl From<std::io::Error> for FetchError {
    fn from(e: std::io::Error) -> FetchError {
        FetchError::Io(e)
    }
}

/// `http[s]://host[:port]/path` -> where to connect and what to ask.
fn split_url(url: &str) -> Result<Target, FetchError> {
    Target::parse(url).map_err(FetchError::BadUrl)
}

/// The `ca_file` of the agent's configuration, when set.
static CA_FILE: OnceLock<PathBuf> = OnceLock::new();

/// The TLS client configuration, built at the first `https://` request (and again after a
/// failure to build it, e.g. a CA bundle that was missing).
static CLIENT: Mutex<Option<Arc<ClientConfig>>> = Mutex::new(None);

/// How the agent's configuration names a CA file, for messages.
const FIX: &str = "set ca_file to";

/// Makes `https://` requests trust only the CAs in `path` (PEM) instead of the system's. The
/// first call wins (the configuration is read once per process).
pub fn trust_ca_file(path: &Path) {
    let _ = CA_FILE.set(path.to_path_buf());
}

/// The CAs `https://` requests trust: `ca_file`, else the system's bundle.
fn trust() -> Trust {
    CA_FILE
        .get()
        .map_or(Trust::System, |p| Trust::CaFile(p.clone()))
}

fn client_config() -> Result<Arc<ClientConfig>, FetchError> {
    let mut slot = CLIENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = &*slot {
        return Ok(c.clone());
    }
    let config = https::client_config(&trust(), FIX).map_err(FetchError::Tls)?;
    *slot = Some(config.clone());
    Ok(config)
}

/// What a failed handshake with `host` means, and what to do about it.
fn tls_failure(host: &str, e: &std::io::Error) -> FetchError {
    FetchError::Tls(https::explain_failure(host, &trust(), FIX, e))
}

/// SHA-256 of bytes, hex.
pub fn sha256_bytes(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// SHA-256 of a file, hex, or None if it cannot be read.
pub fn sha256_file(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match f.read(&mut buf).ok()? {
            0 => return Some(hex::encode(h.finalize())),
            n => h.update(&buf[..n]),
        }
    }
}

/// Fetches `want` into `cache_dir/<file_name>` within `timeout`; returns the file's path.
pub async fn fetch(
    want: &Wanted<'_>,
    cache_dir: &Path,
    file_name: &str,
    timeout: Duration,
) -> Result<PathBuf, FetchError> {
    if file_name.is_empty() || file_name.contains('/') || file_name.starts_with('.') {
        return Err(FetchError::BadUrl(format!(
            "{file_name:?} is not a plain file name for the cache"
        )));
    }
    let want_sha = want.sha256.to_ascii_lowercase();
    let dest = cache_dir.join(file_name);
    let cached = {
        let d = dest.clone();
        tokio::task::spawn_blocking(move || sha256_file(&d))
            .await
            .ok()
            .flatten()
    };
    if cached.as_deref() == Some(want_sha.as_str()) {
        return Ok(dest);
    }
    tokio::fs::create_dir_all(cache_dir).await?;
    let tmp = cache_dir.join(format!(".{file_name}.part"));
    let result = tokio::time::timeout(timeout, download(want, &tmp))
        .await
        .unwrap_or(Err(FetchError::Timeout(timeout)));
    let checked = result.and_then(|got| {
        if got == want_sha {
            Ok(())
        } else {
            Err(FetchError::Sha256Mismatch {
                got,
                want: want_sha.clone(),
            })
        }
    });
    match checked {
        Ok(()) => {
            tokio::fs::rename(&tmp, &dest).await?;
            Ok(dest)
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
}

fn http(what: &str, e: &dyn fmt::Display) -> FetchError {
    FetchError::Http(format!("{what}: {e}"))
}

type Connection = (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
);

/// HTTP/1 on a connected stream (plain or TLS); the connection runs as its own task.
async fn handshake<I>(io: I) -> Result<Connection, FetchError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| http("handshake", &e))?;
    Ok((sender, tokio::spawn(conn)))
}

/// Sends one request (a GET, or a POST with a JSON body) on a new connection; returns the
/// response and the connection task (aborted by the caller when done).
async fn send(
    url: &str,
    body: Option<(Vec<u8>, Option<&str>)>,
) -> Result<
    (
        hyper::Response<hyper::body::Incoming>,
        tokio::task::JoinHandle<hyper::Result<()>>,
    ),
    FetchError,
> {
    let to = split_url(url)?;
    // The TLS settings are checked before connecting: a missing CA bundle is not a network
    // problem.
    let tls = if to.tls { Some(client_config()?) } else { None };
    let stream = TcpStream::connect(&to.connect)
        .await
        .map_err(|e| http(&format!("connecting to {}", to.connect), &e))?;
    let (mut sender, conn) = match tls {
        None => handshake(stream).await?,
        Some(config) => {
            let name = ServerName::try_from(to.server_name.clone()).map_err(|_| {
                FetchError::BadUrl(format!("{url}: {:?} is not a host name", to.server_name))
            })?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map_err(|e| tls_failure(&to.server_name, &e))?;
            handshake(stream).await?
        }
    };
    let builder = |method: &str| {
        Request::builder()
            .method(method)
            .uri(to.path.as_str())
            .header(HOST, to.host.as_str())
            .header(USER_AGENT, "keepup-agent")
            .header(CONNECTION, "close")
    };
    let req = match body {
        None => builder("GET").body(Full::new(Bytes::new())),
        Some((data, token)) => {
            let mut b = builder("POST").header(CONTENT_TYPE, "application/json");
            if let Some(t) = token {
                b = b.header(AUTHORIZATION, format!("Bearer {t}"));
            }
            b.body(Full::new(Bytes::from(data)))
        }
    }
    .map_err(|e| http("request", &e))?;
    match sender.send_request(req).await {
        Ok(r) => Ok((r, conn)),
        Err(e) => {
            conn.abort();
            Err(http(url, &e))
        }
    }
}

/// GETs `url` into memory: at most `max` bytes, within `timeout`. For the signed index,
/// policy and signatures (small files).
pub async fn get(url: &str, max: u64, timeout: Duration) -> Result<Vec<u8>, FetchError> {
    let run = async {
        let (resp, conn) = send(url, None).await?;
        if resp.status() != StatusCode::OK {
            conn.abort();
            return Err(FetchError::Status(resp.status()));
        }
        let mut body = resp.into_body();
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| http(url, &e))?;
            if let Ok(data) = frame.into_data() {
                if (out.len() + data.len()) as u64 > max {
                    conn.abort();
                    return Err(FetchError::TooLarge(max));
                }
                out.extend_from_slice(&data);
            }
        }
        conn.abort();
        Ok(out)
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or(Err(FetchError::Timeout(timeout)))
}

/// POSTs a JSON `body` to `url` with a bearer `token`, within `timeout`; returns the status
/// and (the start of) the answer's body.
pub async fn post(
    url: &str,
    token: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<(StatusCode, String), FetchError> {
    let run = async {
        let (resp, conn) = send(url, Some((body, Some(token)))).await?;
        let status = resp.status();
        let mut text = Vec::new();
        let mut b = resp.into_body();
        while let Some(Ok(frame)) = b.frame().await {
            if let Ok(d) = frame.into_data() {
                text.extend_from_slice(&d);
                if text.len() > 4096 {
                    break;
                }
            }
        }
        conn.abort();
        text.truncate(4096);
        Ok((status, String::from_utf8_lossy(&text).trim().to_string()))
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or(Err(FetchError::Timeout(timeout)))
}

/// Streams the body into `tmp`, hashing and counting; returns the sha256.
async fn download(want: &Wanted<'_>, tmp: &Path) -> Result<String, FetchError> {
    let (resp, conn) = send(want.url, None).await?;
    if resp.status() != StatusCode::OK {
        conn.abort();
        return Err(FetchError::Status(resp.status()));
    }
    let mut body = resp.into_body();
    let mut file = tokio::fs::File::create(tmp).await?;
    let mut hash = Sha256::new();
    let mut got: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| http(want.url, &e))?;
        if let Ok(data) = frame.into_data() {
            got += data.len() as u64;
            if got > want.size {
                conn.abort();
                return Err(FetchError::TooLarge(want.size));
            }
            hash.update(&data);
            file.write_all(&data).await?;
        }
    }
    conn.abort();
    if got < want.size {
        return Err(FetchError::TooShort {
            got,
            want: want.size,
        });
    }
    file.sync_all().await?;
    Ok(hex::encode(hash.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A tiny HTTP/1.0-style server: every connection gets `reply` (after `delay`).
    async fn server(reply: Vec<u8>, delay: Duration) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let reply = reply.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    tokio::time::sleep(delay).await;
                    let _ = s.write_all(&reply).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        format!("http://{addr}/pool/foo_1.0-1_amd64.deb")
    }

    fn ok_reply(body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    const T: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn fetches_and_checks() {
        let body = b"package bytes".repeat(1000);
        let url = server(ok_reply(&body), Duration::ZERO).await;
        let dir = tempfile::tempdir().unwrap();
        let s = sha(&body);
        let want = Wanted {
            url: &url,
            size: body.len() as u64,
            sha256: &s,
        };
        let p = fetch(&want, dir.path(), "foo.deb", T).await.unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), body);
        // Cached: no server needed any more.
        let gone = Wanted {
            url: "http://127.0.0.1:1/x",
            ..want
        };
        assert_eq!(fetch(&gone, dir.path(), "foo.deb", T).await.unwrap(), p);
    }

    #[tokio::test]
    async fn sha256_mismatch_is_refused_and_leaves_nothing() {
        let body = b"tampered".to_vec();
        let url = server(ok_reply(&body), Duration::ZERO).await;
        let dir = tempfile::tempdir().unwrap();
        let s = sha(b"original");
        let want = Wanted {
            url: &url,
            size: body.len() as u64,
            sha256: &s,
        };
        let e = fetch(&want, dir.path(), "foo.deb", T).await.unwrap_err();
        assert!(matches!(e, FetchError::Sha256Mismatch { .. }), "{e}");
        assert!(e.to_string().starts_with("refused: sha256 mismatch"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn size_is_bounded_both_ways() {
        let body = vec![7u8; 100_000];
        let url = server(ok_reply(&body), Duration::ZERO).await;
        let dir = tempfile::tempdir().unwrap();
        let s = sha(&body);
        let small = Wanted {
            url: &url,
            size: 1000,
            sha256: &s,
        };
        let e = fetch(&small, dir.path(), "a.deb", T).await.unwrap_err();
        assert!(matches!(e, FetchError::TooLarge(1000)), "{e}");
        let big = Wanted {
            url: &url,
            size: 200_000,
            sha256: &s,
        };
        let e = fetch(&big, dir.path(), "a.deb", T).await.unwrap_err();
        assert!(
            matches!(
                e,
                FetchError::TooShort {
                    got: 100_000,
                    want: 200_000
                }
            ),
            "{e}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn slow_server_times_out_and_bad_status_fails() {
        let url = server(ok_reply(b"x"), Duration::from_secs(30)).await;
        let dir = tempfile::tempdir().unwrap();
        let s = sha(b"x");
        let want = Wanted {
            url: &url,
            size: 1,
            sha256: &s,
        };
        let e = fetch(&want, dir.path(), "a.deb", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::Timeout(_)), "{e}");
        let url = server(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
            Duration::ZERO,
        )
        .await;
        let want = Wanted { url: &url, ..want };
        let e = fetch(&want, dir.path(), "a.deb", T).await.unwrap_err();
        assert!(e.to_string().contains("404"), "{e}");
    }

    #[tokio::test]
    async fn get_is_bounded_and_post_sends_the_token() {
        let url = server(ok_reply(b"{\"serial\":1}"), Duration::ZERO).await;
        assert_eq!(get(&url, 100, T).await.unwrap(), b"{\"serial\":1}");
        let e = get(&url, 5, T).await.unwrap_err();
        assert!(matches!(e, FetchError::TooLarge(5)), "{e}");
        let e = get("http://127.0.0.1:1/x", 5, T).await.unwrap_err();
        assert!(e.to_string().contains("connecting to 127.0.0.1:1"), "{e}");
        // A server that echoes the request back as the body.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&req).contains("\"host\"") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            let mut r = format!(
                "HTTP/1.1 401 Unauthorized\r\nContent-Length: {}\r\n\r\n",
                req.len()
            )
            .into_bytes();
            r.extend_from_slice(&req);
            s.write_all(&r).await.unwrap();
        });
        let (status, body) = post(
            &format!("http://{addr}/api/v1/report"),
            "s3cret",
            br#"{"host":"web1"}"#.to_vec(),
            T,
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(body.starts_with("POST /api/v1/report HTTP/1.1"), "{body}");
        assert!(body.contains("authorization: Bearer s3cret"), "{body}");
        assert!(body.contains("content-type: application/json"), "{body}");
    }

    #[tokio::test]
    async fn https_to_a_plain_http_server_says_so() {
        let url = server(ok_reply(b"x"), Duration::ZERO).await;
        let url = url.replacen("http://", "https://", 1);
        // Any root will do: the server never gets as far as a certificate.
        let e = get(&url, 100, T).await.unwrap_err();
        assert!(matches!(e, FetchError::Tls(_)), "{e}");
    }
}
