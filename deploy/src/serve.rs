//! `keepup serve`: the repository over plain HTTP/1 (hyper). GET and HEAD with the right
//! content types, whole files or one byte range (`Range: bytes=a-b`, `a-`, `-n`: 206 with
//! `Content-Range`, 416 when no byte of it exists); with `--state`, also the fleet state
//! server's routes ([`crate::state`]). Nothing outside the repository root is reachable: `..` and `.` segments
//! (also percent-encoded), backslashes, NUL, dot-files (the private `.keepup/` directory) and
//! symlinks that resolve outside the root are refused. The agent never links this module.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{
    HeaderValue, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, IF_RANGE, RANGE,
};
use hyper::{Method, Request, Response, StatusCode};
use keepup_deploy::wire::report::{FLEET_PATH, REPORT_PATH};

use crate::state::{Server, EVENTS_PATH};

/// Content type by file name.
pub fn content_type(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or(path);
    match name.rsplit_once('.').map(|(_, e)| e) {
        _ if name == "InRelease" => "text/plain; charset=utf-8",
        _ if name == "Release" || name == "Packages" => "text/plain; charset=utf-8",
        Some("deb") => "application/vnd.debian.binary-package",
        Some("rpm") => "application/x-rpm",
        Some("gz") => "application/gzip",
        Some("xz") => "application/x-xz",
        Some("zst") => "application/zstd",
        Some("xml") => "application/xml",
        Some("json") => "application/json",
        Some("yaml") => "application/yaml",
        Some("asc") | Some("sig") | Some("gpg") => "application/pgp-signature",
        _ => "application/octet-stream",
    }
}

/// Map a request path to a file under `root`, or the status to answer.
pub fn resolve(root: &Path, raw_path: &str) -> Result<PathBuf, StatusCode> {
    let decoded = percent_encoding::percent_decode_str(raw_path)
        .decode_utf8()
        .map_err(|_| StatusCode::BAD_REQUEST)?;
    if !decoded.starts_with('/') || decoded.contains('\\') || decoded.contains('\0') {
        return Err(StatusCode::BAD_REQUEST);
    }
    let mut rel = PathBuf::new();
    for seg in decoded.split('/').filter(|s| !s.is_empty()) {
        if seg == ".." || seg == "." {
            return Err(StatusCode::BAD_REQUEST);
        }
        if seg.starts_with('.') {
            return Err(StatusCode::NOT_FOUND);
        }
        rel.push(seg);
    }
    let full = root.join(&rel);
    // Symlinks: the resolved file must still be inside the (resolved) root.
    let real = full.canonicalize().map_err(|_| StatusCode::NOT_FOUND)?;
    let real_root = root.canonicalize().map_err(|_| StatusCode::NOT_FOUND)?;
    if !real.starts_with(&real_root) {
        return Err(StatusCode::NOT_FOUND);
    }
    Ok(real)
}

/// What a `Range` header asks of a file of a given length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// The whole file (no range, another unit, several ranges, or a malformed header).
    Full,
    /// Bytes `start..=end`.
    Part(u64, u64),
    /// No byte of the range exists: 416.
    Unsatisfiable,
}

/// Read a `Range` header (`bytes=a-b`, `bytes=a-`, `bytes=-n`) against a file of `len` bytes.
/// Only one range is served; a malformed or multi-range header is ignored (the whole file).
pub fn parse_range(header: &str, len: u64) -> RangeRequest {
    let Some((unit, spec)) = header.trim().split_once('=') else {
        return RangeRequest::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (a.trim(), b.trim()) {
        ("", n) => match num(n) {
            None => RangeRequest::Full,
            Some(0) => RangeRequest::Unsatisfiable,
            Some(_) if len == 0 => RangeRequest::Unsatisfiable,
            Some(n) => RangeRequest::Part(len.saturating_sub(n), len - 1),
        },
        (a, b) => {
            let Some(start) = num(a) else {
                return RangeRequest::Full;
            };
            let end = if b.is_empty() {
                None
            } else {
                match num(b) {
                    Some(e) if e >= start => Some(e),
                    _ => return RangeRequest::Full,
                }
            };
            if start >= len {
                return RangeRequest::Unsatisfiable;
            }
            RangeRequest::Part(start, end.map_or(len - 1, |e| e.min(len - 1)))
        }
    }
}

fn status(code: StatusCode, head: bool) -> Response<Full<Bytes>> {
    let body = if head {
        Bytes::new()
    } else {
        Bytes::from(format!("{code}\n"))
    };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = code;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// What every connection shares: the repository root and, with `--state`, the fleet state
/// server.
struct Site {
    root: PathBuf,
    state: Option<Arc<Server>>,
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut r = status(StatusCode::METHOD_NOT_ALLOWED, false);
    r.headers_mut()
        .insert("allow", HeaderValue::from_static(allow));
    r
}

async fn handle(
    site: Arc<Site>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let head = req.method() == Method::HEAD;
    let get = req.method() == Method::GET || head;
    if let Some(state) = &site.state {
        let query = req.uri().query().map(str::to_string);
        let path = req.uri().path();
        let mut r = match path {
            REPORT_PATH if req.method() == Method::POST => return Ok(state.post_report(req).await),
            REPORT_PATH => return Ok(not_allowed("POST")),
            FLEET_PATH if get => state.fleet_json(query.as_deref()).await,
            "/" if get => state.page(query.as_deref()).await,
            EVENTS_PATH if get => state.events_json(query.as_deref()).await,
            FLEET_PATH | "/" => return Ok(not_allowed("GET, HEAD")),
            _ => return Ok(serve_file(&site.root, req).await),
        };
        if head {
            *r.body_mut() = Full::new(Bytes::new());
        }
        return Ok(r);
    }
    Ok(serve_file(&site.root, req).await)
}

/// A repository file: full GET/HEAD, or one byte range.
async fn serve_file(root: &Path, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        return not_allowed("GET, HEAD");
    }
    let path = req.uri().path().to_string();
    let file = match resolve(root, &path) {
        Ok(f) => f,
        Err(code) => return status(code, head),
    };
    let file = if file.is_dir() {
        file.join("index.html")
    } else {
        file
    };
    let Ok(mut f) = tokio::fs::File::open(&file).await else {
        return status(StatusCode::NOT_FOUND, head);
    };
    let len = match f.metadata().await {
        Ok(m) if m.is_file() => m.len(),
        _ => return status(StatusCode::NOT_FOUND, head),
    };
    // If-Range: we send no validators, so no validator matches: the whole file.
    let range = match req.headers().get(RANGE).and_then(|v| v.to_str().ok()) {
        Some(h) if !req.headers().contains_key(IF_RANGE) => parse_range(h, len),
        _ => RangeRequest::Full,
    };
    let (code, start, count) = match range {
        RangeRequest::Full => (StatusCode::OK, 0, len),
        RangeRequest::Part(a, b) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        RangeRequest::Unsatisfiable => {
            let mut r = status(StatusCode::RANGE_NOT_SATISFIABLE, head);
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let body = if head {
        Bytes::new()
    } else {
        let mut data = vec![0u8; count as usize];
        let read = async {
            f.seek(std::io::SeekFrom::Start(start)).await?;
            f.read_exact(&mut data).await
        };
        if read.await.is_err() {
            return status(StatusCode::NOT_FOUND, head);
        }
        Bytes::from(data)
    };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = code;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type(&path)));
    h.insert(CONTENT_LENGTH, HeaderValue::from(count));
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if code == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", start + count - 1))
        {
            h.insert(CONTENT_RANGE, v);
        }
    }
    r
}

/// What `keepup serve` was asked to do. Each option of `keepup serve` is one field here.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The repository directory.
    pub root: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The fleet state database, when the server also takes reports and shows the fleet.
    pub state: Option<PathBuf>,
}

/// Serve the repository until interrupted; with `state`, also the fleet state server
/// (reports, `/api/v1/fleet`, the page at `/`) over that database.
pub fn serve(opts: ServeOptions) -> Result<()> {
    let ServeOptions {
        root,
        listen,
        state,
    } = opts;
    let root = root
        .canonicalize()
        .with_context(|| format!("{} does not exist", root.display()))?;
    let state = state.map(|s| Server::open(&root, &s)).transpose()?;
    let site = Arc::new(Site { root, state });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        if let Some(s) = &site.state {
            s.spawn_background();
        }
        eprintln!(
            "keepup: serving {} on http://{}/{}",
            site.root.display(),
            listener.local_addr()?,
            if site.state.is_some() {
                " (with fleet state: reports, /api/v1/fleet, the page at /)"
            } else {
                ""
            }
        );
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => r?,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            };
            let _ = stream.set_nodelay(true);
            let site = site.clone();
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let svc = hyper::service::service_fn(move |req| handle(site.clone(), req));
                // A slow or broken client only ends its own connection.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        std::fs::create_dir_all(root.join("dists")).unwrap();
        std::fs::create_dir_all(root.join(".keepup")).unwrap();
        std::fs::write(root.join("dists/Release"), "x").unwrap();
        std::fs::write(root.join(".keepup/signing-key.asc"), "secret").unwrap();
        std::fs::write(dir.path().join("outside"), "x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside"), root.join("link")).unwrap();
        assert!(resolve(&root, "/dists/Release").is_ok());
        assert!(resolve(&root, "/dists/../dists/Release").is_err());
        assert_eq!(resolve(&root, "/../outside"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(
            resolve(&root, "/%2e%2e/outside"),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            resolve(&root, "/%2E%2E%2Foutside"),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            resolve(&root, "/.keepup/signing-key.asc"),
            Err(StatusCode::NOT_FOUND)
        );
        assert_eq!(resolve(&root, "/link"), Err(StatusCode::NOT_FOUND));
        assert_eq!(
            resolve(&root, "/dists%5c..%5cx"),
            Err(StatusCode::BAD_REQUEST)
        );
    }

    #[test]
    fn ranges() {
        use RangeRequest::*;
        assert_eq!(parse_range("bytes=0-9", 100), Part(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), Part(90, 99));
        assert_eq!(parse_range("bytes=90-200", 100), Part(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), Part(90, 99));
        assert_eq!(parse_range("bytes=-1000", 100), Part(0, 99));
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-5", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Full);
        assert_eq!(parse_range("bytes=9-1", 100), Full);
        assert_eq!(parse_range("items=0-1", 100), Full);
        assert_eq!(parse_range("bytes=x-1", 100), Full);
    }
}
