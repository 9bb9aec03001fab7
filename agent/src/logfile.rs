//! Per-service log files (`<log_dir>/<service>.log`): the launch script's stdout and stderr
//! plus the agent's own lines about the service (started, exited, probe failed, killed),
//! rotated by size like logrotate's `size` + `rotate N` (`foo.log.1` is the newest old file).
//!
//! A daemon may print secrets, so a log is not world-readable whatever the agent's umask:
//! every file is made (and, if it exists, fixed to) [`LOG_MODE`], owned by root and the
//! agent's `status_group` (root's group without one). Rotation renames, so old files keep that.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// A size-rotated append-only log file; shared between the agent and the output readers of
/// a service's runs as [`SharedLog`].
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max_bytes: u64,
    keep: u32,
    /// The group that may read the log (`status_group`, or root's).
    gid: u32,
}

/// Mode of every log file: root writes, the log's group reads, others nothing.
pub const LOG_MODE: u32 = 0o640;

/// A log file shared by the tasks that write to it.
pub type SharedLog = Arc<Mutex<LogFile>>;

impl LogFile {
    /// Opens (creating) `path` for appending, readable by group `gid` (see the module
    /// documentation); it is rotated once it would grow past `max_bytes`, keeping `keep` old
    /// files.
    pub fn open(path: PathBuf, max_bytes: u64, keep: u32, gid: Option<u32>) -> LogFile {
        let mut log = LogFile {
            path,
            file: None,
            size: 0,
            max_bytes: max_bytes.max(1024),
            keep,
            gid: gid.unwrap_or(0),
        };
        log.reopen();
        log
    }

    /// Shares the log between tasks.
    pub fn shared(self) -> SharedLog {
        Arc::new(Mutex::new(self))
    }

    fn reopen(&mut self) {
        if let Some(dir) = self.path.parent() {
            if !dir.exists() {
                // root's, 0755 whatever the umask (the log group must be able to enter it).
                let _ = std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(dir);
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
            }
        }
        // Owner and mode are set on the descriptor, never through the path; the log directory
        // is root's, and a link in it is not followed anyway.
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(LOG_MODE)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&self.path)
            .ok()
            .inspect(|f| {
                // Not root (unit tests): the file stays the caller's, still LOG_MODE.
                let _ = std::os::unix::fs::fchown(f, Some(0), Some(self.gid));
                let _ = f.set_permissions(std::fs::Permissions::from_mode(LOG_MODE));
            });
        self.size = self
            .file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
    }

    /// Appends raw bytes (launch-script output), rotating first if they would not fit.
    /// Logging never fails the caller: if the file cannot be written the bytes are dropped.
    pub fn write(&mut self, bytes: &[u8]) {
        if self.size > 0 && self.size + bytes.len() as u64 > self.max_bytes {
            self.rotate();
        }
        if self.file.is_none() {
            self.reopen();
        }
        if let Some(f) = self.file.as_mut() {
            if f.write_all(bytes).is_ok() {
                self.size += bytes.len() as u64;
            }
        }
    }

    /// Appends one timestamped line from the agent: `2024-05-01T12:00:00Z keepup-agent: ...`.
    pub fn note(&mut self, message: &str) {
        let line = format!("{} keepup-agent: {message}\n", timestamp(SystemTime::now()));
        self.write(line.as_bytes());
    }

    fn rotate(&mut self) {
        self.file = None;
        if self.keep == 0 {
            let _ = std::fs::remove_file(&self.path);
        } else {
            for i in (1..self.keep).rev() {
                let _ = std::fs::rename(numbered(&self.path, i), numbered(&self.path, i + 1));
            }
            let _ = std::fs::rename(&self.path, numbered(&self.path, 1));
        }
        self.reopen();
    }
}

fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Locks a shared log, even if a writer panicked while holding it.
pub fn lock(log: &SharedLog) -> std::sync::MutexGuard<'_, LogFile> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn an_existing_world_readable_log_is_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("foo.log");
        std::fs::write(&path, "old\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        LogFile::open(path.clone(), 1024, 2, None).note("hi");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, LOG_MODE);
    }

    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096); // leap day 2024
        assert_eq!(timestamp(t), "2024-02-29T12:34:56Z");
    }

    #[test]
    fn rotates_by_size_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("foo.log");
        let mut log = LogFile::open(path.clone(), 1024, 2, None);
        let chunk = vec![b'x'; 600];
        for _ in 0..5 {
            log.write(&chunk);
        }
        let size = |p: PathBuf| std::fs::metadata(p).map(|m| m.len()).ok();
        assert_eq!(size(path.clone()), Some(600));
        assert_eq!(size(numbered(&path, 1)), Some(600));
        assert_eq!(size(numbered(&path, 2)), Some(600));
        assert_eq!(size(numbered(&path, 3)), None);
        // Reopening continues the current file.
        let mut again = LogFile::open(path.clone(), 1024, 2, None);
        again.note("hello");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with(" keepup-agent: hello\n"), "{text}");
        // Never world-readable, old files included, whatever the umask.
        for p in [path.clone(), numbered(&path, 1), numbered(&path, 2)] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, LOG_MODE, "{}", p.display());
        }
    }
}
