//! `keepup serve`: the repository over plain HTTP/1 (hyper). Full GETs and HEAD with the right
//! content types; nothing outside the repository root is reachable: `..` and `.` segments
//! (also percent-encoded), backslashes, NUL, dot-files (the private `.keepup/` directory) and
//! symlinks that resolve outside the root are refused. The agent never links this module.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

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

async fn handle(
    root: Arc<PathBuf>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut r = status(StatusCode::METHOD_NOT_ALLOWED, false);
        r.headers_mut()
            .insert("allow", HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    let path = req.uri().path().to_string();
    let file = match resolve(&root, &path) {
        Ok(f) => f,
        Err(code) => return Ok(status(code, head)),
    };
    let file = if file.is_dir() {
        file.join("index.html")
    } else {
        file
    };
    let data = match tokio::fs::read(&file).await {
        Ok(d) => d,
        Err(_) => return Ok(status(StatusCode::NOT_FOUND, head)),
    };
    let len = data.len();
    let mut r = Response::new(Full::new(if head {
        Bytes::new()
    } else {
        Bytes::from(data)
    }));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type(&path)));
    r.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(len));
    Ok(r)
}

/// Serve `root` on `listen` until interrupted.
pub fn serve(root: &Path, listen: SocketAddr) -> Result<()> {
    let root = Arc::new(
        root.canonicalize()
            .with_context(|| format!("{} does not exist", root.display()))?,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        eprintln!(
            "keepup: serving {} on http://{}/",
            root.display(),
            listener.local_addr()?
        );
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => r?,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            };
            let root = root.clone();
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let svc = hyper::service::service_fn(move |req| handle(root.clone(), req));
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
}
