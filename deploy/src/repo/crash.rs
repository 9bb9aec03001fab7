//! Crash injection for tests: `KEEPUP_CRASH_AT=<step>` makes a repository command kill itself
//! with SIGKILL (no destructors, no cleanup: what `kill -9` or a power cut leaves) when it
//! reaches that named step. The steps of `publish` and `promote` are listed here, once;
//! `keepup repo crash-steps` prints them for the crash test (`tests/tests/metadata.rs`).

use std::sync::OnceLock;

/// A point of a mutating repository command where a crash is injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A new pool file has been written (publish, rollback).
    PoolFile,
    /// A package name's pool metadata has been written (publish, rollback).
    PoolMeta,
    /// The APT view's Packages files are written, its Release not yet.
    AptPackages,
    /// The APT view is written (Release, Release.gpg, InRelease).
    AptRelease,
    /// The DNF view is written.
    RpmView,
    /// The agent's index is written.
    Index,
    /// The track file (the commit) is written.
    TrackCommit,
    /// The policy binding the new index is published, the policy state not yet saved.
    Binding,
    /// `repo sync`: the pool and by-hash files are uploaded, no index yet.
    SyncContent,
    /// `repo sync`: the per-track indexes are uploaded, no signed root yet.
    SyncIndexes,
    /// `repo sync`: the first signed root (`InRelease`, `repomd.xml`, ...) is uploaded, the
    /// others not yet.
    SyncFirstRoot,
}

/// The steps of `repo sync`, in the order it reaches them (not in [`STEPS`], which the
/// publish crash test walks).
#[cfg(test)]
pub const SYNC_STEPS: [Step; 3] = [Step::SyncContent, Step::SyncIndexes, Step::SyncFirstRoot];

/// Every step, in the order a publish reaches them.
pub const STEPS: [Step; 8] = [
    Step::PoolFile,
    Step::PoolMeta,
    Step::AptPackages,
    Step::AptRelease,
    Step::RpmView,
    Step::Index,
    Step::TrackCommit,
    Step::Binding,
];

impl Step {
    /// The name `KEEPUP_CRASH_AT` takes.
    pub fn name(self) -> &'static str {
        match self {
            Step::PoolFile => "pool-file",
            Step::PoolMeta => "pool-meta",
            Step::AptPackages => "apt-packages",
            Step::AptRelease => "apt-release",
            Step::RpmView => "rpm-view",
            Step::Index => "index",
            Step::TrackCommit => "track-commit",
            Step::Binding => "binding",
            Step::SyncContent => "sync-content",
            Step::SyncIndexes => "sync-indexes",
            Step::SyncFirstRoot => "sync-first-root",
        }
    }
}

/// The step `KEEPUP_CRASH_AT` names, if any.
fn at() -> Option<&'static str> {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    AT.get_or_init(|| std::env::var("KEEPUP_CRASH_AT").ok())
        .as_deref()
}

/// Is a crash step set? Views that are written in parallel are then written one after the
/// other, so that each step is a boundary of the whole command, not a point in one thread
/// while another is halfway through its view.
pub fn armed() -> bool {
    at().is_some()
}

/// Die here, at once, if `KEEPUP_CRASH_AT` names this step.
pub fn point(step: Step) {
    if at() == Some(step.name()) {
        // SAFETY: raise has no preconditions; SIGKILL ends the process here.
        unsafe { nix::libc::raise(nix::libc::SIGKILL) };
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_are_distinct() {
        let mut names: Vec<&str> = STEPS.iter().chain(&SYNC_STEPS).map(|s| s.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), STEPS.len() + SYNC_STEPS.len());
    }
}
