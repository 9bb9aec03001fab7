//! Downloading a package into the cache and checking it: over [`crate::http`] (plain or
//! TLS: what makes a package trustworthy is its sha256 in the signed index, not the
//! transport), bounded in time and in size (never more bytes than the index declares), written
//! to a temporary file in the cache directory and renamed into place only when its size and
//! sha256 match. A file already in the cache with the right sha256 is used without downloading
//! again.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::http::{self, HttpError};

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
    /// The request failed (URL, connection, TLS, status, time).
    Http(HttpError),
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
            FetchError::Http(e) => e.fmt(f),
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

impl From<HttpError> for FetchError {
    fn from(e: HttpError) -> FetchError {
        FetchError::Http(e)
    }
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
        return Err(HttpError::BadUrl(format!(
            "{file_name:?} is not a plain file name for the cache"
        ))
        .into());
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
        .unwrap_or(Err(HttpError::Timeout(timeout).into()));
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

/// Streams the body into `tmp`, hashing and counting; returns the sha256.
async fn download(want: &Wanted<'_>, tmp: &Path) -> Result<String, FetchError> {
    let mut answer = http::open(want.url).await?;
    let mut file = tokio::fs::File::create(tmp).await?;
    let mut hash = Sha256::new();
    let mut got: u64 = 0;
    while let Some(data) = answer.chunk().await? {
        got += data.len() as u64;
        if got > want.size {
            return Err(FetchError::TooLarge(want.size));
        }
        hash.update(&data);
        file.write_all(&data).await?;
    }
    drop(answer);
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
    use crate::http::testserver::ok_reply;

    /// Every connection gets `reply` (after `delay`).
    async fn server(reply: Vec<u8>, delay: Duration) -> String {
        crate::http::testserver::server(reply, delay, "/pool/foo_1.0-1_amd64.deb").await
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
        assert!(matches!(e, FetchError::Http(HttpError::Timeout(_))), "{e}");
        let url = server(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
            Duration::ZERO,
        )
        .await;
        let want = Wanted { url: &url, ..want };
        let e = fetch(&want, dir.path(), "a.deb", T).await.unwrap_err();
        assert!(e.to_string().contains("404"), "{e}");
    }
}
