//! Noticing changes in the manifest directory without waking up while nothing changes:
//! inotify on the directory (create, delete, modify, close-after-write, attribute change and
//! renames of `*.yaml` entries, plus the directory itself going away), a short debounce, then
//! the caller rescans. A slow safety rescan ([`SAFETY_RESCAN`]) covers what inotify cannot
//! see (a manifest that is a symlink to a file elsewhere being edited in place). Where inotify
//! is unavailable (no directory yet, out of watches, a kernel without it) the agent polls every
//! `scan_every` instead, and tries to set the watch up again at each poll.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// After the first event, wait this long for more (a package manager writes several files,
/// an editor writes and renames) and rescan once.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// Rescan this often even when inotify reported nothing.
pub const SAFETY_RESCAN: Duration = Duration::from_secs(60);

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Watches one directory; [`DirWatch::changed`] returns when it should be rescanned.
pub struct DirWatch {
    dir: PathBuf,
    poll: Duration,
    fd: Option<AsyncFd<Fd>>,
    /// Why the last attempt to watch failed (reported once per distinct reason).
    failed: Option<String>,
    /// A rescan is due then (events seen, or the next poll).
    due: Option<Instant>,
    /// The next safety rescan.
    safety_at: Instant,
}

fn flags() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
}

fn watch(dir: &Path) -> Result<AsyncFd<Fd>, String> {
    let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .map_err(|e| format!("inotify_init: {e}"))?;
    ino.add_watch(dir, flags())
        .map_err(|e| format!("inotify_add_watch {}: {e}", dir.display()))?;
    // SAFETY: `Fd` owns the inotify descriptor: it stays open, and is the same descriptor,
    // for as long as the `AsyncFd` holds it.
    unsafe { AsyncFd::register_with_interest(Fd(ino), Interest::READABLE) }
        .map_err(|e| format!("registering the inotify descriptor: {e}"))
}

/// Whether an event calls for a rescan, and whether the watch itself is gone (the directory
/// was removed or renamed, or the queue overflowed: start over).
fn classify(ev: &InotifyEvent) -> (bool, bool) {
    let gone = ev.mask.intersects(
        AddWatchFlags::IN_IGNORED
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_UNMOUNT,
    );
    if gone || ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
        return (true, gone);
    }
    let relevant = match &ev.name {
        Some(n) => Path::new(n).extension().is_some_and(|e| e == "yaml"),
        None => true,
    };
    (relevant, false)
}

impl DirWatch {
    /// Watches `dir` (or prepares to poll it every `poll`).
    pub fn new(dir: &Path, poll: Duration) -> DirWatch {
        let mut w = DirWatch {
            dir: dir.to_path_buf(),
            poll,
            fd: None,
            failed: None,
            due: None,
            safety_at: Instant::now() + SAFETY_RESCAN,
        };
        w.try_watch();
        w
    }

    /// Makes the next rescan come within `d` at the latest.
    pub fn rescan_within(&mut self, d: Duration) {
        let at = Instant::now() + d;
        self.due = Some(self.due.map_or(at, |due| due.min(at)));
    }

    /// Whether inotify is in use (else the directory is polled).
    #[cfg(test)]
    pub fn watching(&self) -> bool {
        self.fd.is_some()
    }

    fn try_watch(&mut self) {
        match watch(&self.dir) {
            Ok(fd) => {
                if self.failed.take().is_some() {
                    eprintln!(
                        "keepup-agent: watching {} with inotify again",
                        self.dir.display()
                    );
                }
                self.fd = Some(fd);
            }
            Err(why) => {
                if self.failed.as_deref() != Some(why.as_str()) {
                    eprintln!(
                        "keepup-agent: cannot watch the manifest directory ({why}); looking at it every {} instead",
                        keepup_packager::spec::format_duration(self.poll)
                    );
                    self.failed = Some(why);
                }
            }
        }
    }

    /// Reads what is queued and notes a rescan as due ([`DEBOUNCE`] from now) if something
    /// relevant happened. Drops the watch when it is gone.
    fn drain(&mut self) {
        let Some(fd) = &self.fd else { return };
        let mut relevant = false;
        let mut gone = false;
        loop {
            match fd.get_ref().0.read_events() {
                Ok(evs) => {
                    for ev in &evs {
                        let (r, g) = classify(ev);
                        relevant |= r;
                        gone |= g;
                    }
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(_) => {
                    gone = true;
                    break;
                }
            }
        }
        if gone {
            self.fd = None;
            relevant = true;
        }
        if relevant && self.due.is_none() {
            self.due = Some(Instant::now() + DEBOUNCE);
        }
    }

    /// Returns when the directory should be looked at again: [`DEBOUNCE`] after a relevant
    /// inotify event, [`SAFETY_RESCAN`] after the last rescan without one, or, while not
    /// watching, every `poll`. Cancel-safe: events stay queued in the kernel, and what was
    /// already read is remembered as a due rescan.
    pub async fn changed(&mut self) {
        loop {
            if self.fd.is_none() && self.due.is_none() {
                self.due = Some(Instant::now() + self.poll);
            }
            let wake = self.due.unwrap_or(self.safety_at);
            let readable = async {
                match &self.fd {
                    Some(fd) => fd.readable().await.map(|mut g| g.clear_ready()),
                    None => std::future::pending().await,
                }
            };
            let timer = tokio::select! {
                _ = tokio::time::sleep_until(wake.into()) => true,
                r = readable => {
                    if let Err(e) = r {
                        eprintln!("keepup-agent: inotify: {e}; polling the manifest directory");
                        self.fd = None;
                    }
                    false
                }
            };
            self.drain();
            if timer {
                self.due = None;
                self.safety_at = Instant::now() + SAFETY_RESCAN;
                if self.fd.is_none() {
                    // Back to inotify if the directory is there (again); either way, rescan.
                    self.try_watch();
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn notices_added_changed_and_removed_manifests_but_not_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DirWatch::new(dir.path(), Duration::from_secs(3600));
        assert!(w.watching());
        let quick = Duration::from_secs(2);
        let file = dir.path().join("foo.yaml");

        std::fs::write(&file, "a").unwrap();
        tokio::time::timeout(quick, w.changed()).await.unwrap();
        // Another file is not a manifest: no wakeup.
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), w.changed())
                .await
                .is_err()
        );
        // A rename into place (how dpkg installs files).
        let tmp = dir.path().join("bar.yaml.dpkg-new");
        std::fs::write(&tmp, "b").unwrap();
        std::fs::rename(&tmp, dir.path().join("bar.yaml")).unwrap();
        tokio::time::timeout(quick, w.changed()).await.unwrap();
        std::fs::remove_file(&file).unwrap();
        tokio::time::timeout(quick, w.changed()).await.unwrap();
        assert!(w.watching());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn falls_back_to_polling_and_watches_once_the_directory_exists() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("services");
        let mut w = DirWatch::new(&dir, Duration::from_millis(50));
        assert!(!w.watching());
        tokio::time::timeout(Duration::from_secs(1), w.changed())
            .await
            .unwrap();
        std::fs::create_dir(&dir).unwrap();
        tokio::time::timeout(Duration::from_secs(1), w.changed())
            .await
            .unwrap();
        assert!(w.watching());
        // The directory goes away: a rescan, and polling again.
        std::fs::remove_dir(&dir).unwrap();
        tokio::time::timeout(Duration::from_secs(2), w.changed())
            .await
            .unwrap();
        assert!(!w.watching());
    }
}
