//! `keepup serve`: the repository over HTTP/1 (hyper), plain or with TLS ([`crate::tls`]), built to stay up on the edge of a
//! fleet. Files stream from disk in bounded frames ([`FileBody`]), whatever their size and however
//! many clients; GET and HEAD carry a strong `ETag` and `Last-Modified`, answer conditional
//! requests with 304 and one byte range (`Range`, honouring `If-Range`) with 206, or 416 when no
//! byte of it exists ([`plan`], pure). With `--state`, the same listener also serves the fleet
//! state server's routes ([`crate::state`]).
//!
//! Never die, never hang: an `accept` error is logged and retried (after a short pause when file
//! descriptors ran out); connections are capped ([`Limits::max_connections`]) and those past the
//! cap get a `503` with a `Retry-After` jittered over what the herd needs ([`crate::herd`]), as
//! do reports the state writer cannot take now; the request head must arrive within a header timeout, a
//! connection on which no byte moves is closed after an idle timeout, and a report must arrive
//! within a request timeout. Each accepted connection is served by [`serve_connection`], generic
//! over the byte stream, so a TLS stream gets the same limits as a TCP one.
//!
//! Nothing outside the repository root is reachable: `..` and `.` segments (also
//! percent-encoded), backslashes, NUL, dot-files (the private `.keepup/` directory) and symlinks
//! that resolve outside the root or onto a dot-file are refused. The agent never links this module.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::{Bytes, Frame, SizeHint};
use hyper::header::{
    HeaderMap, HeaderValue, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG,
    IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, LAST_MODIFIED, RANGE, RETRY_AFTER,
};
use hyper::{Method, Request, Response, StatusCode};
use keepup_deploy::wire::report::{FLEET_PATH, REPORT_PATH};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::sync::Semaphore;

use crate::herd::Herd;
use crate::state::{Server, EVENTS_PATH, ROLLOUTS_PATH};

/// The body of every response: a file streamed from disk, or a small buffer.
pub type Body = BoxBody<Bytes, io::Error>;

/// Bytes read from a file per body frame: one frame is in flight per download, and hyper
/// queues at most about [`WRITE_BUFFER`] more, so a download holds about 256 KiB at most.
const CHUNK: usize = 128 * 1024;

/// hyper's per-connection buffer limit (read and write).
const WRITE_BUFFER: usize = 128 * 1024;

/// File descriptors kept back from the connection budget: the listener, the state database,
/// stdio, the blocking pool's work, and the refusals below.
const RESERVED_FDS: u64 = 128;

/// Connections past the cap being answered `503` at the same time, at least (out of
/// [`RESERVED_FDS`]); more when the file limit leaves room ([`max_refusing`]). Past it, a
/// connection is closed at once (still counted in the herd).
const MIN_REFUSING: usize = 64;
/// ... and at most.
const MAX_REFUSING: usize = 8_192;

/// The default cap on connections, whatever the file descriptor limit allows: it also bounds
/// memory (an idle connection holds a few KiB, a download about 256 KiB).
const DEFAULT_MAX_CONNECTIONS: usize = 16_384;

/// Pause after `accept` failed for want of file descriptors or memory: the failing call
/// would otherwise spin; connections wait in the listen backlog meanwhile.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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
        Some("yaml") | Some("yml") => "application/yaml",
        Some("html") | Some("htm") => "text/html; charset=utf-8",
        Some("txt") | Some("md") => "text/plain; charset=utf-8",
        Some("asc") | Some("sig") | Some("gpg") => "application/pgp-signature",
        _ => "application/octet-stream",
    }
}

/// Content type of an APT `by-hash/<algorithm>/<digest>` file, named by its hash: the
/// compressed or plain index it is a copy of, told apart by its first bytes.
pub fn by_hash_content_type(magic: &[u8]) -> &'static str {
    match magic {
        [0x1f, 0x8b, ..] => "application/gzip",
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => "application/x-xz",
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "application/zstd",
        _ => "text/plain; charset=utf-8",
    }
}

/// A repository root: its canonical path and a descriptor that files are opened beneath.
pub struct Root {
    path: PathBuf,
    dir: std::fs::File,
}

impl Root {
    /// Open the directory `path` (canonicalized once, here).
    pub fn open(path: &Path) -> io::Result<Root> {
        let path = path.canonicalize()?;
        let dir = std::fs::File::open(&path)?;
        Ok(Root { path, dir })
    }
}

/// Open the file a request path names under `root`, or the status to answer. The kernel keeps
/// the lookup beneath the root (`openat2` with `RESOLVE_BENEATH`: `..` or a symlink that leaves
/// it fails, and so does an absolute symlink); a symlink inside it must not land on a dot-file
/// either.
pub fn resolve(root: &Root, raw_path: &str) -> Result<std::fs::File, StatusCode> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    let decoded = percent_encoding::percent_decode_str(raw_path)
        .decode_utf8()
        .map_err(|_| StatusCode::BAD_REQUEST)?;
    if !decoded.starts_with('/') || decoded.contains('\\') || decoded.contains('\0') {
        return Err(StatusCode::BAD_REQUEST);
    }
    let mut rel = PathBuf::from(".");
    for seg in decoded.split('/').filter(|s| !s.is_empty()) {
        if seg == ".." || seg == "." {
            return Err(StatusCode::BAD_REQUEST);
        }
        if seg.starts_with('.') {
            return Err(StatusCode::NOT_FOUND);
        }
        rel.push(seg);
    }
    let how = |more| {
        OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS | more)
    };
    // The common case first: no symlink on the way, so the lookup landed on the path asked
    // for, whose segments were checked above. One system call.
    match openat2(&root.dir, &rel, how(ResolveFlag::RESOLVE_NO_SYMLINKS)) {
        Ok(fd) => return Ok(std::fs::File::from(fd)),
        Err(nix::errno::Errno::ELOOP | nix::errno::Errno::ENOSYS) => {}
        Err(_) => return Err(StatusCode::NOT_FOUND),
    }
    let file = match openat2(&root.dir, &rel, how(ResolveFlag::empty())) {
        Ok(fd) => std::fs::File::from(fd),
        // Before Linux 5.6: resolve in user space; the check below keeps it inside the root.
        Err(nix::errno::Errno::ENOSYS) => root
            .path
            .join(&rel)
            .canonicalize()
            .and_then(std::fs::File::open)
            .map_err(|_| StatusCode::NOT_FOUND)?,
        Err(_) => return Err(StatusCode::NOT_FOUND),
    };
    // Where the lookup landed: the path asked for unless a symlink led elsewhere.
    use std::os::fd::AsRawFd as _;
    let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .or_else(|_| root.path.join(&rel).canonicalize())
        .map_err(|_| StatusCode::NOT_FOUND)?;
    let inside = real
        .strip_prefix(&root.path)
        .map_err(|_| StatusCode::NOT_FOUND)?;
    if inside
        .components()
        .any(|c| c.as_os_str().as_encoded_bytes().starts_with(b"."))
    {
        return Err(StatusCode::NOT_FOUND);
    }
    Ok(file)
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

/// A file's validators, from one `fstat` of the open file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validators {
    /// Strong entity tag, quoted: inode, size and modification time in nanoseconds. Published
    /// files are replaced by rename, so a new version is a new inode.
    pub etag: String,
    /// Modification time, whole seconds since the epoch (what `Last-Modified` can say).
    pub modified: u64,
}

impl Validators {
    /// The validators of a file with this metadata.
    pub fn of(meta: &std::fs::Metadata) -> Validators {
        let ns = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
        Validators {
            etag: format!("\"{:x}-{:x}-{:x}\"", meta.ino(), meta.len(), ns),
            modified: meta.mtime().max(0) as u64,
        }
    }

    fn last_modified(&self) -> String {
        httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(self.modified))
    }
}

/// The request headers that decide what a GET or HEAD of a file answers.
#[derive(Debug, Default, Clone, Copy)]
pub struct Conditions<'a> {
    /// `If-None-Match`.
    pub if_none_match: Option<&'a str>,
    /// `If-Modified-Since`.
    pub if_modified_since: Option<&'a str>,
    /// `Range`.
    pub range: Option<&'a str>,
    /// `If-Range`.
    pub if_range: Option<&'a str>,
}

impl<'a> Conditions<'a> {
    /// The conditions of a request's headers (values that are not text count as absent).
    pub fn of(h: &'a HeaderMap) -> Conditions<'a> {
        let get = |n| h.get(n).and_then(|v: &HeaderValue| v.to_str().ok());
        Conditions {
            if_none_match: get(IF_NONE_MATCH),
            if_modified_since: get(IF_MODIFIED_SINCE),
            range: get(RANGE),
            if_range: get(IF_RANGE),
        }
    }
}

/// What to answer for a GET or HEAD of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 304: the client's copy is current.
    NotModified,
    /// 200 with the whole file.
    Whole,
    /// 206 with bytes `start..=end`.
    Part(u64, u64),
    /// 416: no byte of the range exists.
    Unsatisfiable,
}

/// Decide a GET or HEAD of a file of `len` bytes (RFC 9110, section 13.2.2): `If-None-Match`
/// (weak comparison; when present, `If-Modified-Since` is ignored), then `If-Modified-Since`,
/// then `Range`, served only if `If-Range` (when present) names the current file: its strong
/// ETag, or its `Last-Modified` date when that is at least a second older than `now`.
pub fn plan(c: &Conditions<'_>, v: &Validators, len: u64, now: u64) -> Answer {
    if let Some(inm) = c.if_none_match {
        if etag_list_matches(inm, &v.etag) {
            return Answer::NotModified;
        }
    } else if let Some(since) = c.if_modified_since.and_then(http_date) {
        if v.modified <= since {
            return Answer::NotModified;
        }
    }
    let Some(range) = c.range else {
        return Answer::Whole;
    };
    if let Some(if_range) = c.if_range.map(str::trim) {
        let current = if if_range.starts_with('"') || if_range.starts_with("W/") {
            // Strong comparison: a weak tag never matches.
            if_range == v.etag
        } else {
            http_date(if_range) == Some(v.modified) && v.modified < now
        };
        if !current {
            return Answer::Whole;
        }
    }
    match parse_range(range, len) {
        RangeRequest::Full => Answer::Whole,
        RangeRequest::Part(a, b) => Answer::Part(a, b),
        RangeRequest::Unsatisfiable => Answer::Unsatisfiable,
    }
}

/// Does an `If-None-Match` list (`*`, or tags separated by commas) match `etag` (weak
/// comparison: `W/` prefixes are ignored)?
fn etag_list_matches(list: &str, etag: &str) -> bool {
    let list = list.trim();
    list == "*"
        || list
            .split(',')
            .map(|t| t.trim())
            .any(|t| t.strip_prefix("W/").unwrap_or(t) == etag)
}

/// Seconds since the epoch of an HTTP date (IMF-fixdate, or the obsolete forms).
fn http_date(s: &str) -> Option<u64> {
    let t = httpdate::parse_http_date(s.trim()).ok()?;
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

/// A file's bytes `pos..end`, read in [`CHUNK`] frames, one frame ahead of the socket at most:
/// on the worker when the page cache holds the frame ([`read_cached`]), else on the blocking
/// pool. The file stays open: a file replaced mid-download (by rename) is still
/// sent whole, in its old version, matching the validators already sent.
struct FileBody {
    file: Arc<std::fs::File>,
    pos: u64,
    end: u64,
    reading: Option<tokio::task::JoinHandle<io::Result<Bytes>>>,
}

impl hyper::body::Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.pos >= this.end {
            return Poll::Ready(None);
        }
        if this.reading.is_none() {
            let n = (this.end - this.pos).min(CHUNK as u64) as usize;
            if let Some(data) = read_cached(&this.file, this.pos, n) {
                this.pos += data.len() as u64;
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
        }
        let reading = this.reading.get_or_insert_with(|| {
            let (file, pos) = (this.file.clone(), this.pos);
            let n = (this.end - pos).min(CHUNK as u64) as usize;
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; n];
                file.read_exact_at(&mut buf, pos)?;
                Ok(Bytes::from(buf))
            })
        });
        let read = std::task::ready!(std::future::Future::poll(Pin::new(reading), cx));
        this.reading = None;
        Poll::Ready(Some(match read {
            Ok(Ok(data)) => {
                this.pos += data.len() as u64;
                Ok(Frame::data(data))
            }
            Ok(Err(e)) => Err(e),
            Err(e) => Err(io::Error::other(e)),
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end.saturating_sub(self.pos))
    }
}

/// Read `n` bytes at `pos` if the page cache holds them all (`preadv2` with `RWF_NOWAIT`: no
/// wait on the disk, so the worker thread can do it); `None` sends the read to the blocking
/// pool.
fn read_cached(file: &std::fs::File, pos: u64, n: usize) -> Option<Bytes> {
    use std::os::fd::AsRawFd as _;
    let mut buf = vec![0u8; n];
    let iov = nix::libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: n,
    };
    // SAFETY: `iov` points into `buf`, which outlives the call and has `n` bytes; the file
    // descriptor is open for as long as `file` is borrowed.
    let got = unsafe {
        nix::libc::preadv2(
            file.as_raw_fd(),
            &iov,
            1,
            pos as nix::libc::off_t,
            nix::libc::RWF_NOWAIT,
        )
    };
    (got == n as isize).then(|| Bytes::from(buf))
}

/// A small body held in memory.
fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn status(code: StatusCode, head: bool) -> Response<Body> {
    text(code, head, &format!("{code}\n"))
}

fn text(code: StatusCode, head: bool, msg: &str) -> Response<Body> {
    let mut r = Response::new(if head { empty() } else { full(msg.to_string()) });
    *r.status_mut() = code;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// What every connection shares: the repository root, the limits and, with `--state`, the
/// fleet state server.
struct Site {
    root: Root,
    limits: Limits,
    state: Option<Arc<Server>>,
    tls: Option<crate::tls::Acceptor>,
    /// Requests turned away and reports stored, for the `Retry-After` of the next refusal.
    herd: Herd,
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = status(StatusCode::METHOD_NOT_ALLOWED, false);
    r.headers_mut()
        .insert("allow", HeaderValue::from_static(allow));
    r
}

async fn handle(
    site: Arc<Site>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    let head = req.method() == Method::HEAD;
    let get = req.method() == Method::GET || head;
    let Some(state) = &site.state else {
        return Ok(serve_file(&site.root, req).await);
    };
    let query = req.uri().query().map(str::to_string);
    let r = match req.uri().path() {
        REPORT_PATH if req.method() == Method::POST => {
            let limit = site.limits.request_timeout;
            match tokio::time::timeout(limit, state.post_report(req)).await {
                Ok(mut r) => {
                    // Stored: it counts toward the capacity. Not now: come back later,
                    // at a moment of the herd's spread.
                    match r.status() {
                        StatusCode::NO_CONTENT => site.herd.stored(),
                        StatusCode::SERVICE_UNAVAILABLE => {
                            r.headers_mut()
                                .insert(RETRY_AFTER, HeaderValue::from(site.herd.defer()));
                        }
                        _ => {}
                    }
                    r
                }
                Err(_) => {
                    return Ok(text(
                        StatusCode::REQUEST_TIMEOUT,
                        false,
                        &format!(
                            "the report was not received and stored within {} s \
                             (--request-timeout); send it again",
                            limit.as_secs()
                        ),
                    ))
                }
            }
        }
        REPORT_PATH => return Ok(not_allowed("POST")),
        FLEET_PATH if get => {
            // Sent as it is built (a million hosts' view is a gigabyte): HEAD drops the body,
            // which stops the building.
            let r = state.fleet_json(query.as_deref(), req.headers()).await;
            return Ok(if head { r.map(|_| empty()) } else { r });
        }
        "/" if get => state.page(query.as_deref(), req.headers()).await,
        EVENTS_PATH if get => state.events_json(query.as_deref(), req.headers()).await,
        ROLLOUTS_PATH if get => state.rollouts_json(req.headers()).await,
        FLEET_PATH | "/" => return Ok(not_allowed("GET, HEAD")),
        _ => return Ok(serve_file(&site.root, req).await),
    };
    // The state server's answers are small buffers; HEAD keeps their headers only.
    Ok(r.map(|b| {
        if head {
            empty()
        } else {
            b.map_err(|never| match never {}).boxed()
        }
    }))
}

/// A repository file, opened and checked on the blocking pool.
struct Opened {
    file: std::fs::File,
    len: u64,
    validators: Validators,
    content_type: &'static str,
}

/// Open the file `path` names under `root` (a directory answers with its `index.html`).
fn open(root: &Root, path: &str) -> Result<Opened, StatusCode> {
    let mut f = resolve(root, path)?;
    let mut name = path;
    let mut meta = f.metadata().map_err(|_| StatusCode::NOT_FOUND)?;
    if meta.is_dir() {
        f = resolve(root, &format!("{}/index.html", path.trim_end_matches('/')))?;
        name = "index.html";
        meta = f.metadata().map_err(|_| StatusCode::NOT_FOUND)?;
    }
    if !meta.is_file() {
        return Err(StatusCode::NOT_FOUND);
    }
    let content_type = if path.contains("/by-hash/") {
        let mut magic = [0u8; 6];
        let n = f.read_at(&mut magic, 0).unwrap_or(0);
        by_hash_content_type(&magic[..n])
    } else {
        content_type(name)
    };
    Ok(Opened {
        len: meta.len(),
        validators: Validators::of(&meta),
        file: f,
        content_type,
    })
}

/// A repository file: 200, 206, 304 or 416, streamed; HEAD gets the same headers, no body.
async fn serve_file(root: &Root, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        return not_allowed("GET, HEAD");
    }
    // Path lookups, `open` and `fstat` run here, on the worker, as in nginx: they hit the
    // kernel's caches; a hop to the blocking pool cost more than them (docs/benchmarks.md,
    // "Serving (issue 10)"). Data reads may wait on the disk: see [`FileBody`].
    let opened = match open(root, req.uri().path()) {
        Ok(o) => o,
        Err(code) => return status(code, head),
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let Opened {
        file,
        len,
        validators,
        content_type,
    } = opened;
    let answer = plan(&Conditions::of(req.headers()), &validators, len, now);
    let (code, start, end) = match answer {
        Answer::NotModified => (StatusCode::NOT_MODIFIED, 0, 0),
        Answer::Whole => (StatusCode::OK, 0, len),
        Answer::Part(a, b) => (StatusCode::PARTIAL_CONTENT, a, b + 1),
        Answer::Unsatisfiable => {
            let mut r = status(StatusCode::RANGE_NOT_SATISFIABLE, head);
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let body = if head || code == StatusCode::NOT_MODIFIED {
        empty()
    } else {
        FileBody {
            file: Arc::new(file),
            pos: start,
            end,
            reading: None,
        }
        .boxed()
    };
    let mut r = Response::new(body);
    *r.status_mut() = code;
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&validators.etag) {
        h.insert(ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&validators.last_modified()) {
        h.insert(LAST_MODIFIED, v);
    }
    if code == StatusCode::NOT_MODIFIED {
        return r;
    }
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CONTENT_LENGTH, HeaderValue::from(end - start));
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if code == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", end - 1)) {
            h.insert(CONTENT_RANGE, v);
        }
    }
    r
}

/// How much the server lets connections take: how many at once, and how long each may wait.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; past it, a connection gets `503` and is closed. `None`:
    /// what the file descriptor limit allows ([`default_max_connections`]).
    pub max_connections: Option<usize>,
    /// The request line and headers must arrive within this, counted from the connection's
    /// start or the end of the previous response (so it is also the keep-alive idle limit).
    pub header_read: Duration,
    /// A connection on which no byte moves either way for this long is closed (a client that
    /// stopped reading its download or sending its request body).
    pub idle: Duration,
    /// A report (`POST /api/v1/report`) must be received and stored within this.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: None,
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// The connection cap that fits `nofile` file descriptors: each connection may hold its socket
/// and one open file, and [`RESERVED_FDS`] stay for the rest.
pub fn default_max_connections(nofile: u64) -> usize {
    let fit = nofile.saturating_sub(RESERVED_FDS) / 2;
    (fit as usize).clamp(1, DEFAULT_MAX_CONNECTIONS)
}

/// How many connections past a cap of `max` may be answered `503` at once with `nofile` file
/// descriptors: what the served connections (two each) and the reserve leave, within
/// [`MIN_REFUSING`]..=[`MAX_REFUSING`]. A herd of 100,000 agents then mostly hears when to
/// come back instead of seeing its connections closed.
pub fn max_refusing(nofile: u64, max: usize) -> usize {
    let left = nofile.saturating_sub(2 * max as u64 + RESERVED_FDS);
    (left as usize).clamp(MIN_REFUSING, MAX_REFUSING)
}

/// Raise the soft limit on open files to the hard limit; returns the limit now in force.
fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// When a byte last moved on a connection, for the idle timeout.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Completes once no byte has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            if last.elapsed() >= idle {
                return;
            }
            tokio::time::sleep_until((last + idle).into()).await;
        }
    }
}

/// A byte stream that records its progress in an [`Activity`].
struct Watched<S> {
    io: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serve HTTP/1 requests on one accepted connection (plain TCP, or a TLS stream around it)
/// until the client closes it, a timeout of `site.limits` ends it, or it breaks. A slow or
/// broken client only ends its own connection.
async fn serve_connection<S>(site: Arc<Site>, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = hyper_util::rt::TokioIo::new(Watched {
        io,
        activity: activity.clone(),
    });
    let limits = site.limits;
    let svc = hyper::service::service_fn(move |req| handle(site.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .max_buf_size(WRITE_BUFFER)
        .serve_connection(io, svc);
    tokio::select! {
        _ = conn => {}
        _ = activity.idle_for(limits.idle) => {}
    }
}

/// The answer to a connection past the cap, asked to come back in `retry_after` seconds.
fn refusal(retry_after: u64) -> Vec<u8> {
    const BODY: &str = "too many connections to this server; retry after the time given\n";
    format!(
        "HTTP/1.1 503 Service Unavailable\r\n\
         Retry-After: {retry_after}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n\
         \r\n\
         {BODY}",
        BODY.len()
    )
    .into_bytes()
}

/// Answer `503` with `Retry-After: retry_after` and close: write it, shut down our side, then
/// read what the client sent for a moment (closing with unread bytes would reset the
/// connection and could destroy the answer before the client reads it).
async fn refuse<S>(mut io: S, retry_after: u64)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let bound = Duration::from_secs(1);
    let answer = async {
        io.write_all(&refusal(retry_after)).await?;
        io.shutdown().await?;
        let mut sink = [0u8; 4096];
        while io.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(bound, answer).await;
}

/// Answer `503` with `Retry-After: retry_after` to a connection past the refusals that may
/// linger ([`refuse`]): one write that does not wait (the answer fits the empty send buffer
/// of a new connection), then the caller closes. A client whose request had already arrived
/// may see a reset instead of the answer (closing with unread bytes resets); one still sending
/// it, as most of a herd's are at accept, reads the answer.
fn refuse_at_once(stream: &tokio::net::TcpStream, retry_after: u64) {
    let _ = stream.try_write(&refusal(retry_after));
}

/// What an `accept` error means for the accept loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptFailure {
    /// Out of file descriptors or kernel memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): pause,
    /// then retry; the listen backlog holds new connections meanwhile.
    Exhausted,
    /// One connection failed before it was accepted (ECONNABORTED, EPERM from a firewall,
    /// network errors that Linux reports through `accept`): retry at once.
    Connection,
    /// Anything else: pause like [`AcceptFailure::Exhausted`], so that an error that repeats
    /// does not spin.
    Unexpected,
}

impl AcceptFailure {
    /// Classify an `accept` error.
    pub fn of(e: &io::Error) -> AcceptFailure {
        use nix::libc::*;
        match e.raw_os_error() {
            Some(EMFILE | ENFILE | ENOBUFS | ENOMEM) => AcceptFailure::Exhausted,
            Some(
                ECONNABORTED | EPERM | EPROTO | ENOPROTOOPT | ENETDOWN | ENONET | EHOSTDOWN
                | EHOSTUNREACH | ENETUNREACH | EOPNOTSUPP | ETIMEDOUT | EINTR | EAGAIN,
            ) => AcceptFailure::Connection,
            _ => AcceptFailure::Unexpected,
        }
    }

    /// How long the accept loop pauses before it accepts again.
    pub fn pause(self) -> Duration {
        match self {
            AcceptFailure::Connection => Duration::ZERO,
            AcceptFailure::Exhausted | AcceptFailure::Unexpected => ACCEPT_BACKOFF,
        }
    }
}

/// Log accept errors, at most once a second, with how many were not logged.
struct AcceptLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl AcceptLog {
    fn failed(&mut self, e: &io::Error, kind: AcceptFailure) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            self.unlogged += 1;
            return;
        }
        let more = std::mem::take(&mut self.unlogged);
        let more = if more > 0 {
            format!(" ({more} more since the last message)")
        } else {
            String::new()
        };
        match kind {
            AcceptFailure::Exhausted => eprintln!(
                "keepup: accepting a connection failed: {e}{more}; retrying in {} ms. Raise \
                 the open file limit (LimitNOFILE=) or lower --max-connections",
                ACCEPT_BACKOFF.as_millis()
            ),
            AcceptFailure::Connection | AcceptFailure::Unexpected => {
                eprintln!("keepup: accepting a connection failed: {e}{more}; serving goes on")
            }
        }
        self.last = Some(Instant::now());
    }
}

/// The serving threads: each runs a single-threaded runtime, and a connection is served on
/// one of them from accept to close.
struct Workers {
    threads: Vec<Worker>,
}

/// One serving thread: its runtime and how many connections it serves now.
struct Worker {
    handle: tokio::runtime::Handle,
    live: Arc<AtomicU64>,
}

impl Workers {
    /// The worker serving the fewest connections (the first of equals).
    fn least_loaded(&self) -> usize {
        (0..self.threads.len())
            .min_by_key(|&i| self.threads[i].live.load(Ordering::Relaxed))
            .unwrap_or(0)
    }
}

/// Counts a connection on its worker while it lives.
struct Live(Arc<AtomicU64>);

impl Live {
    fn new(count: &Arc<AtomicU64>) -> Live {
        count.fetch_add(1, Ordering::Relaxed);
        Live(count.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serve one accepted connection under its slot: TLS wraps `stream` inside the task and the
/// slot; the acceptor bounds the handshake, and a failed one ends only this connection.
async fn serve_accepted(site: Arc<Site>, stream: tokio::net::TcpStream) {
    match site.tls.clone() {
        None => serve_connection(site, stream).await,
        Some(tls) => {
            if let Ok(stream) = tls.accept(stream).await {
                serve_connection(site, stream).await;
            }
        }
    }
}

/// Accept connections until interrupted; each one takes a slot under the cap or is refused.
/// A served connection goes to the least loaded worker (`workers.threads[0]` runs this loop):
/// connections are spread evenly, whatever order they come in, and each stays on one thread.
async fn accept_loop(
    site: Arc<Site>,
    listener: tokio::net::TcpListener,
    (max, max_refusing): (usize, usize),
    workers: Workers,
) {
    let slots = Arc::new(Semaphore::new(max));
    let refusing = Arc::new(Semaphore::new(max_refusing));
    let mut log = AcceptLog {
        last: None,
        unlogged: 0,
    };
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                let kind = AcceptFailure::of(&e);
                log.failed(&e, kind);
                if !kind.pause().is_zero() {
                    tokio::time::sleep(kind.pause()).await;
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let site = site.clone();
                let i = workers.least_loaded();
                let worker = &workers.threads[i];
                let live = Live::new(&worker.live);
                if i == 0 {
                    tokio::spawn(async move {
                        serve_accepted(site, stream).await;
                        drop((slot, live));
                    });
                    continue;
                }
                // Move the socket to the worker's own event loop, so that its wake-ups stay
                // on that thread.
                let Ok(stream) = stream.into_std() else {
                    continue;
                };
                worker.handle.spawn(async move {
                    if let Ok(stream) = tokio::net::TcpStream::from_std(stream) {
                        serve_accepted(site, stream).await;
                    }
                    drop((slot, live));
                });
            }
            Err(_) => {
                // Past the cap: answer 503 while not too many are being refused; past those,
                // answer without lingering and close. Either way it counts in the herd.
                // Under TLS the answer goes inside the session (a plaintext 503 would read as
                // a corrupt record and the agent would never see its Retry-After); past the
                // lingering refusals a TLS connection is closed unanswered, since answering
                // would take a handshake.
                let retry_after = site.herd.defer();
                if let Ok(permit) = refusing.clone().try_acquire_owned() {
                    let tls = site.tls.clone();
                    tokio::spawn(async move {
                        match tls {
                            None => refuse(stream, retry_after).await,
                            Some(tls) => {
                                let handshake = tls.accept(stream);
                                let bound = Duration::from_secs(1);
                                if let Ok(Ok(stream)) = tokio::time::timeout(bound, handshake).await
                                {
                                    refuse(stream, retry_after).await;
                                }
                            }
                        }
                        drop(permit);
                    });
                } else if site.tls.is_none() {
                    refuse_at_once(&stream, retry_after);
                }
            }
        }
    }
}

/// What `keepup serve` was asked to do. Each option of `keepup serve` is one field here.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The repository directory.
    pub root: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The fleet state database, when the server also takes reports and shows the fleet.
    pub state: Option<crate::state::db::Location>,
    /// The file holding the read token for the fleet views (none: they are open).
    pub read_token_file: Option<PathBuf>,
    /// The connection cap and the timeouts.
    pub limits: Limits,
    /// Serve HTTPS with this certificate and key (reloaded on SIGHUP) instead of plain HTTP.
    pub tls: Option<crate::tls::TlsFiles>,
}

/// Serve the repository until interrupted; with `state`, also the fleet state server
/// (reports, `/api/v1/fleet`, the page at `/`) over that database.
pub fn serve(opts: ServeOptions) -> Result<()> {
    let ServeOptions {
        root,
        listen,
        state,
        read_token_file,
        limits,
        tls,
    } = opts;
    let tls = tls
        .map(crate::tls::Acceptor::new)
        .transpose()
        .context("--tls-cert/--tls-key")?;
    let root = root
        .canonicalize()
        .with_context(|| format!("{} does not exist", root.display()))?;
    let nofile = raise_nofile_limit();
    let max = limits
        .max_connections
        .unwrap_or_else(|| default_max_connections(nofile));
    anyhow::ensure!(max > 0, "--max-connections must be at least 1");
    let state = state
        .map(|s| Server::open(&root, &s, read_token_file.as_deref()))
        .transpose()?;
    let site = Arc::new(Site {
        root: Root::open(&root).with_context(|| format!("opening {}", root.display()))?,
        limits,
        state,
        tls,
        herd: Herd::new(),
    });
    // One single-threaded runtime per core (as nginx runs a worker per core), and each
    // connection served on one of them from accept to close: no wake-ups cross threads and no
    // tasks are stolen, which kept the latency tail at 2 to 3 times nginx's on the
    // multi-threaded runtime (docs/benchmarks.md, "Serving"). Heavy work (fleet views, the
    // database) runs on the blocking pools and the database writer, not on these threads.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads((64 / threads).max(8))
            .enable_all()
            .build()
    };
    let rt = runtime()?;
    let mut workers = Workers {
        threads: vec![Worker {
            handle: rt.handle().clone(),
            live: Arc::default(),
        }],
    };
    for i in 1..threads {
        let worker = runtime()?;
        workers.threads.push(Worker {
            handle: worker.handle().clone(),
            live: Arc::default(),
        });
        std::thread::Builder::new()
            .name(format!("keepup-serve-{i}"))
            .spawn(move || worker.block_on(std::future::pending::<()>()))
            .context("starting a serving thread")?;
    }
    rt.block_on(async move {
        let listener = bind(listen).with_context(|| format!("listening on {listen}"))?;
        if let Some(s) = &site.state {
            s.spawn_background();
        }
        if let Some(t) = &site.tls {
            t.reload_on_sighup()
                .context("installing the SIGHUP handler (TLS reload)")?;
        }
        eprintln!(
            "keepup: serving {} on {}://{}/{}; at most {max} connections (open file limit \
             {nofile}), {threads} threads",
            site.root.path.display(),
            if site.tls.is_some() { "https" } else { "http" },
            listener.local_addr()?,
            if site.state.is_some() {
                " (with fleet state: reports, /api/v1/fleet, the page at /)"
            } else {
                ""
            }
        );
        tokio::select! {
            _ = accept_loop(site, listener, (max, max_refusing(nofile, max)), workers) => Ok(()),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}

/// The listen backlog: connections past the cap wait here while the server is short of file
/// descriptors.
const BACKLOG: u32 = 4096;

/// A listening socket on `addr`, on the current runtime.
fn bind(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_past_the_lingering_ones_is_answered_at_once() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            refuse_at_once(&stream, 7);
            drop(stream);
            let mut got = String::new();
            client.read_to_string(&mut got).await.unwrap();
            assert!(got.starts_with("HTTP/1.1 503 "), "{got}");
            assert!(got.contains("\r\nRetry-After: 7\r\n"), "{got}");
            assert!(got.ends_with("retry after the time given\n"), "{got}");
        });
    }

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
        std::fs::create_dir_all(root.join("pool")).unwrap();
        std::os::unix::fs::symlink("../dists/Release", root.join("pool/inside")).unwrap();
        let r = Root::open(&root).unwrap();
        assert!(resolve(&r, "/dists/Release").is_ok());
        assert!(resolve(&r, "/dists/../dists/Release").is_err());
        // A symlink that stays inside the root is followed.
        assert!(resolve(&r, "/pool/inside").is_ok());
        assert_eq!(
            resolve(&r, "/../outside").err(),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            resolve(&r, "/%2e%2e/outside").err(),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            resolve(&r, "/%2E%2E%2Foutside").err(),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            resolve(&r, "/.keepup/signing-key.asc").err(),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(resolve(&r, "/link").err(), Some(StatusCode::NOT_FOUND));
        // A link inside the root onto the private directory is still a dot-file.
        std::os::unix::fs::symlink(root.join(".keepup/signing-key.asc"), root.join("key")).unwrap();
        assert_eq!(resolve(&r, "/key").err(), Some(StatusCode::NOT_FOUND));
        // So is a file reached through a directory link onto it.
        std::os::unix::fs::symlink(".keepup", root.join("alias")).unwrap();
        assert_eq!(
            resolve(&r, "/alias/signing-key.asc").err(),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            resolve(&r, "/dists%5c..%5cx").err(),
            Some(StatusCode::BAD_REQUEST)
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

    fn validators() -> Validators {
        Validators {
            etag: "\"1-2-3\"".into(),
            modified: 1_000_000,
        }
    }

    #[test]
    fn conditional_requests() {
        use Answer::*;
        let v = validators();
        let now = 2_000_000;
        let at =
            |secs: u64| httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        let (same, before, after) = (at(1_000_000), at(999_999), at(1_000_001));
        let c = |inm, ims, range, if_range| Conditions {
            if_none_match: inm,
            if_modified_since: ims,
            range,
            if_range,
        };
        let cases: &[(Conditions, Answer)] = &[
            (c(None, None, None, None), Whole),
            (c(Some("\"1-2-3\""), None, None, None), NotModified),
            (c(Some("W/\"1-2-3\""), None, None, None), NotModified),
            (c(Some("\"x\", \"1-2-3\""), None, None, None), NotModified),
            (c(Some("*"), None, None, None), NotModified),
            (c(Some("\"x\""), None, None, None), Whole),
            // If-None-Match wins over If-Modified-Since.
            (c(Some("\"x\""), Some(&same), None, None), Whole),
            (c(None, Some(&same), None, None), NotModified),
            (c(None, Some(&after), None, None), NotModified),
            (c(None, Some(&before), None, None), Whole),
            (c(None, Some("yesterday"), None, None), Whole),
            (c(None, None, Some("bytes=0-9"), None), Part(0, 9)),
            (c(None, None, Some("bytes=100-"), None), Unsatisfiable),
            (
                c(None, None, Some("bytes=0-9"), Some("\"1-2-3\"")),
                Part(0, 9),
            ),
            (c(None, None, Some("bytes=0-9"), Some("\"x\"")), Whole),
            // If-Range compares strongly.
            (c(None, None, Some("bytes=0-9"), Some("W/\"1-2-3\"")), Whole),
            (c(None, None, Some("bytes=0-9"), Some(&same)), Part(0, 9)),
            (c(None, None, Some("bytes=0-9"), Some(&before)), Whole),
            // A 304 needs no range.
            (
                c(Some("\"1-2-3\""), None, Some("bytes=0-9"), None),
                NotModified,
            ),
        ];
        for (cond, want) in cases {
            assert_eq!(plan(cond, &v, 100, now), *want, "{cond:?}");
        }
        // A date validator of a file changed this second is weak: If-Range does not match.
        let fresh = c(None, None, Some("bytes=0-9"), Some(&same));
        assert_eq!(plan(&fresh, &v, 100, 1_000_000), Whole);
    }

    #[test]
    fn content_types() {
        let cases = [
            (
                "/pool/foo_1.0-1_amd64.deb",
                "application/vnd.debian.binary-package",
            ),
            ("/pool/foo-1.0-1.x86_64.rpm", "application/x-rpm"),
            ("/dists/stable/InRelease", "text/plain; charset=utf-8"),
            ("/dists/stable/Release", "text/plain; charset=utf-8"),
            ("/dists/stable/Release.gpg", "application/pgp-signature"),
            (
                "/dists/stable/main/binary-amd64/Packages",
                "text/plain; charset=utf-8",
            ),
            (
                "/dists/stable/main/binary-amd64/Packages.gz",
                "application/gzip",
            ),
            ("/rpm/stable/repodata/repomd.xml", "application/xml"),
            (
                "/rpm/stable/repodata/repomd.xml.asc",
                "application/pgp-signature",
            ),
            (
                "/rpm/stable/repodata/abc-primary.xml.zst",
                "application/zstd",
            ),
            ("/tracks/stable/index.json", "application/json"),
            ("/tracks/stable/index.json.sig", "application/pgp-signature"),
            ("/fleet.yaml", "application/yaml"),
            ("/index.html", "text/html; charset=utf-8"),
            ("/keys/repository.asc", "application/pgp-signature"),
            ("/pool/blob", "application/octet-stream"),
        ];
        for (path, want) in cases {
            assert_eq!(content_type(path), want, "{path}");
        }
        assert_eq!(
            by_hash_content_type(&[0x1f, 0x8b, 8, 0]),
            "application/gzip"
        );
        assert_eq!(by_hash_content_type(b"\xfd7zXZ\0"), "application/x-xz");
        assert_eq!(
            by_hash_content_type(&[0x28, 0xb5, 0x2f, 0xfd]),
            "application/zstd"
        );
        assert_eq!(
            by_hash_content_type(b"Package: foo"),
            "text/plain; charset=utf-8"
        );
        assert_eq!(by_hash_content_type(b""), "text/plain; charset=utf-8");
    }

    #[test]
    fn connection_cap_fits_the_file_limit() {
        assert_eq!(default_max_connections(1024), 448);
        assert_eq!(default_max_connections(20_000), 9936);
        assert_eq!(default_max_connections(1 << 20), DEFAULT_MAX_CONNECTIONS);
        // Refusals take what the served connections leave, within bounds.
        assert_eq!(
            max_refusing(1024, default_max_connections(1024)),
            MIN_REFUSING
        );
        assert_eq!(max_refusing(1024, 5000), MIN_REFUSING);
        assert_eq!(max_refusing(40_000, 16_384), 40_000 - 2 * 16_384 - 128);
        assert_eq!(max_refusing(1 << 20, DEFAULT_MAX_CONNECTIONS), MAX_REFUSING);
        assert_eq!(default_max_connections(10), 1);
    }

    #[test]
    fn accept_failures() {
        use nix::libc;
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(
            AcceptFailure::of(&e(libc::EMFILE)),
            AcceptFailure::Exhausted
        );
        assert_eq!(
            AcceptFailure::of(&e(libc::ENFILE)),
            AcceptFailure::Exhausted
        );
        assert_eq!(
            AcceptFailure::of(&e(libc::ENOBUFS)),
            AcceptFailure::Exhausted
        );
        assert_eq!(
            AcceptFailure::of(&e(libc::ECONNABORTED)),
            AcceptFailure::Connection
        );
        assert_eq!(
            AcceptFailure::of(&e(libc::EPERM)),
            AcceptFailure::Connection
        );
        assert_eq!(
            AcceptFailure::of(&e(libc::EINVAL)),
            AcceptFailure::Unexpected
        );
        assert!(AcceptFailure::Connection.pause().is_zero());
        assert!(!AcceptFailure::Unexpected.pause().is_zero());
    }
}
