//! The agent's small HTTP/1 client (hyper), plain or over TLS (rustls, for `https://` URLs):
//! GETs of the repository's signed metadata ([`get`], bounded in size), streamed downloads of
//! packages ([`open`], which `update::fetch` checks against the signed index), and report
//! POSTs with the host's bearer token ([`post`]). Every request is one connection, bounded in
//! time by its caller. A leaf: the updater and the reporter use it, and it uses nothing of
//! theirs. Only the short-lived keepup-agent-pass child makes requests (docs/agent.md,
//! "Updater"): the supervisor never loads TLS settings or a CA bundle.
//!
//! `https://` URLs are verified against the CAs of the agent's `ca_file` (set once per process
//! with [`trust_ca_file`]) or else the system's CA bundle, and the certificate must be valid
//! for the URL's host.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST, USER_AGENT};
pub use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use keepup_deploy::https::{self, Target, Trust};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Why a request failed.
#[derive(Debug)]
pub enum HttpError {
    /// Not a URL this client fetches.
    BadUrl(String),
    /// Connecting, sending or receiving failed.
    Http(String),
    /// The TLS handshake failed: the server's certificate is not trusted, or TLS is not set
    /// up (what is wrong and what to do).
    Tls(String),
    /// The server answered something other than 200.
    Status(StatusCode),
    /// The whole request took longer than the timeout.
    Timeout(Duration),
    /// The answer is longer than the caller accepts (bytes).
    TooLarge(u64),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::BadUrl(why) => f.write_str(why),
            HttpError::Http(why) => write!(f, "download failed: {why}"),
            HttpError::Tls(why) => write!(f, "TLS: {why}"),
            HttpError::Status(s) => write!(f, "download failed: the server answered {s}"),
            HttpError::Timeout(t) => write!(
                f,
                "download failed: not complete after {}",
                humantime::format_duration(*t)
            ),
            HttpError::TooLarge(max) => write!(f, "refused: the server sent more than {max} bytes"),
        }
    }
}

impl std::error::Error for HttpError {}

/// The `ca_file` of the agent's configuration, when set.
static CA_FILE: OnceLock<PathBuf> = OnceLock::new();

/// The TLS client configuration, built at the first `https://` request (and again after a
/// failure to build it, e.g. a CA bundle that was missing).
static CLIENT: Mutex<Option<Arc<ClientConfig>>> = Mutex::new(None);

/// How the agent's configuration names a CA file, for messages.
const FIX: &str = "set ca_file to";

/// Makes `https://` requests trust only the CAs in `path` (PEM) instead of the system's,
/// after checking that it holds at least one certificate. The first call wins (the
/// configuration is read once per process).
pub fn trust_ca_file(path: &Path) -> Result<(), String> {
    https::read_ca_bundle(path).map_err(|e| {
        format!(
            "ca_file: {e} (name a PEM file with the CA certificate(s) that signed the server's \
             certificate)"
        )
    })?;
    let _ = CA_FILE.set(path.to_path_buf());
    Ok(())
}

/// The CAs `https://` requests trust: `ca_file`, else the system's bundle.
fn trust() -> Trust {
    CA_FILE
        .get()
        .map_or(Trust::System, |p| Trust::CaFile(p.clone()))
}

fn client_config() -> Result<Arc<ClientConfig>, HttpError> {
    let mut slot = CLIENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = &*slot {
        return Ok(c.clone());
    }
    let config = https::client_config(&trust(), FIX).map_err(HttpError::Tls)?;
    *slot = Some(config.clone());
    Ok(config)
}

/// What a failed handshake with `host` means, and what to do about it.
fn tls_failure(host: &str, e: &std::io::Error) -> HttpError {
    HttpError::Tls(https::explain_failure(host, &trust(), FIX, e))
}

fn http(what: &str, e: &dyn fmt::Display) -> HttpError {
    HttpError::Http(format!("{what}: {e}"))
}

type Connection = (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
);

/// HTTP/1 on a connected stream (plain or TLS); the connection runs as its own task.
async fn handshake<I>(io: I) -> Result<Connection, HttpError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| http("handshake", &e))?;
    Ok((sender, tokio::spawn(conn)))
}

/// An answer being read: its status, and its body chunk by chunk. Dropping it closes the
/// connection.
pub struct Answer {
    url: String,
    status: StatusCode,
    retry_after: Option<Duration>,
    body: hyper::body::Incoming,
    conn: tokio::task::JoinHandle<hyper::Result<()>>,
}

impl Answer {
    /// The status the server answered.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// How long the server asked to wait before trying again (`Retry-After`, in seconds; an
    /// HTTP date is not used: it would need this host's clock to agree with the server's).
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The next piece of the body; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, HttpError> {
        while let Some(frame) = self.body.frame().await {
            let frame = frame.map_err(|e| http(&self.url, &e))?;
            if let Ok(data) = frame.into_data() {
                return Ok(Some(data));
            }
        }
        Ok(None)
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// Sends one request (a GET, or a POST with a JSON body and a bearer token) on a new
/// connection and returns the answer, whatever its status.
async fn send(url: &str, body: Option<(Vec<u8>, &str)>) -> Result<Answer, HttpError> {
    let to = Target::parse(url).map_err(HttpError::BadUrl)?;
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
                HttpError::BadUrl(format!("{url}: {:?} is not a host name", to.server_name))
            })?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map_err(|e| tls_failure(&to.server_name, &e))?;
            handshake(stream).await?
        }
    };
    let builder = |method: &str| {
        hyper::Request::builder()
            .method(method)
            .uri(to.path.as_str())
            .header(HOST, to.host.as_str())
            .header(USER_AGENT, "keepup-agent")
            .header(CONNECTION, "close")
    };
    let req = match body {
        None => builder("GET").body(Full::new(Bytes::new())),
        Some((data, token)) => builder("POST")
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::new(Bytes::from(data))),
    }
    .map_err(|e| http("request", &e))?;
    match sender.send_request(req).await {
        Ok(r) => Ok(Answer {
            url: url.to_string(),
            status: r.status(),
            retry_after: retry_after(r.headers()),
            body: r.into_body(),
            conn,
        }),
        Err(e) => {
            conn.abort();
            Err(http(url, &e))
        }
    }
}

/// GETs `url` and returns the answer if it is 200 (the caller reads and bounds the body, and
/// bounds the whole in time).
pub async fn open(url: &str) -> Result<Answer, HttpError> {
    let answer = send(url, None).await?;
    if answer.status() != StatusCode::OK {
        return Err(HttpError::Status(answer.status()));
    }
    Ok(answer)
}

/// GETs `url` into memory: at most `max` bytes, within `timeout`. For the signed index,
/// policy and signatures (small files).
pub async fn get(url: &str, max: u64, timeout: Duration) -> Result<Vec<u8>, HttpError> {
    let run = async {
        let mut answer = open(url).await?;
        let mut out = Vec::new();
        while let Some(data) = answer.chunk().await? {
            if (out.len() + data.len()) as u64 > max {
                return Err(HttpError::TooLarge(max));
            }
            out.extend_from_slice(&data);
        }
        Ok(out)
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or(Err(HttpError::Timeout(timeout)))
}

/// `Retry-After` as delta-seconds (RFC 9110, 10.2.3), when there is one.
fn retry_after(headers: &hyper::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(hyper::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    v.parse::<u64>().ok().map(Duration::from_secs)
}

/// What a POST got: the status, (the start of) the body, and `Retry-After` if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posted {
    /// The status the server answered.
    pub status: StatusCode,
    /// The start of the answer's body (4 KiB at most), trimmed.
    pub text: String,
    /// How long the server asked to wait before trying again.
    pub retry_after: Option<Duration>,
}

/// POSTs a JSON `body` to `url` with a bearer `token`, within `timeout`.
pub async fn post(
    url: &str,
    token: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Posted, HttpError> {
    let run = async {
        let mut answer = send(url, Some((body, token))).await?;
        let retry_after = answer.retry_after();
        let mut text = Vec::new();
        while let Ok(Some(d)) = answer.chunk().await {
            text.extend_from_slice(&d);
            if text.len() > 4096 {
                break;
            }
        }
        text.truncate(4096);
        Ok(Posted {
            status: answer.status(),
            text: String::from_utf8_lossy(&text).trim().to_string(),
            retry_after,
        })
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or(Err(HttpError::Timeout(timeout)))
}

/// A tiny HTTP server for tests, shared by this module's and the package download's tests.
#[cfg(test)]
pub(crate) mod testserver {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Every connection gets `reply`, after `delay`; the URL is `http://ADDR{path}`.
    pub(crate) async fn server(reply: Vec<u8>, delay: Duration, path: &str) -> String {
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
        format!("http://{addr}{path}")
    }

    /// A `200 OK` response with `body`.
    pub(crate) fn ok_reply(body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::testserver::ok_reply;
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Every connection gets `reply`.
    async fn server(reply: Vec<u8>) -> String {
        super::testserver::server(reply, Duration::ZERO, "/tracks/stable/index.json").await
    }

    const T: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn get_is_bounded_and_post_sends_the_token() {
        let url = server(ok_reply(b"{\"serial\":1}")).await;
        assert_eq!(get(&url, 100, T).await.unwrap(), b"{\"serial\":1}");
        let e = get(&url, 5, T).await.unwrap_err();
        assert!(matches!(e, HttpError::TooLarge(5)), "{e}");
        let e = get("http://127.0.0.1:1/x", 5, T).await.unwrap_err();
        assert!(e.to_string().contains("connecting to 127.0.0.1:1"), "{e}");
        let url = server(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec()).await;
        let e = get(&url, 5, T).await.unwrap_err();
        assert!(
            matches!(e, HttpError::Status(s) if s == StatusCode::NOT_FOUND),
            "{e}"
        );
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
                "HTTP/1.1 401 Unauthorized\r\nRetry-After: 7\r\nContent-Length: {}\r\n\r\n",
                req.len()
            )
            .into_bytes();
            r.extend_from_slice(&req);
            s.write_all(&r).await.unwrap();
        });
        let Posted {
            status,
            text: body,
            retry_after,
        } = post(
            &format!("http://{addr}/api/v1/report"),
            "s3cret",
            br#"{"host":"web1"}"#.to_vec(),
            T,
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(retry_after, Some(Duration::from_secs(7)));
        assert!(body.starts_with("POST /api/v1/report HTTP/1.1"), "{body}");
        assert!(body.contains("authorization: Bearer s3cret"), "{body}");
        assert!(body.contains("content-type: application/json"), "{body}");
    }

    #[tokio::test]
    async fn https_to_a_plain_http_server_says_so() {
        let url = server(ok_reply(b"x")).await;
        let url = url.replacen("http://", "https://", 1);
        // Any root will do: the server never gets as far as a certificate.
        let e = get(&url, 100, T).await.unwrap_err();
        assert!(matches!(e, HttpError::Tls(_)), "{e}");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("ca.pem");
        std::fs::write(&f, "not a certificate\n").unwrap();
        let e = trust_ca_file(&f).unwrap_err();
        assert!(
            e.starts_with("ca_file: ") && e.contains("name a PEM file"),
            "{e}"
        );
        assert!(CA_FILE.get().is_none());
    }
}
