//! `keepup serve` keeps the repository's signed metadata from expiring: when it can read the
//! secret key, a thread re-signs every view (`keepup repo refresh`) once the first published
//! document is within half its validity of expiring. Without the key it says, once, until when
//! the metadata is valid and what to run. When to act is planned in [`plan`] (pure); the
//! thread only reads the repository, sleeps and refreshes.

use std::path::Path;
use std::time::Duration;

use crate::repo::Repo;

/// Longest sleep between two looks: a `repo config --valid-for` change, or a command that
/// re-signed only some views, is noticed within this.
const MAX_NAP: Duration = Duration::from_secs(3600);

/// Pause after a failed look or refresh.
const RETRY: Duration = Duration::from_secs(60);

/// What the refresher does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Re-sign everything now.
    Refresh,
    /// Look again after this long.
    Wait(Duration),
}

/// At `now`, with the first published expiry `until` (None: nothing expires) and the
/// repository's `valid_for` (seconds): refresh once less than half the validity is left,
/// else wait until then (at most [`MAX_NAP`], at least a second).
pub fn plan(now: u64, until: Option<u64>, valid_for: u64) -> Next {
    let Some(until) = until else {
        return Next::Wait(MAX_NAP);
    };
    let margin = valid_for / 2;
    let due = until.saturating_sub(margin);
    if now >= due {
        return Next::Refresh;
    }
    Next::Wait(Duration::from_secs(due - now).clamp(Duration::from_secs(1), MAX_NAP))
}

/// Starts the refresher for the repository at `root` if this process can read its secret key;
/// otherwise prints why it will not refresh and when the metadata expires.
pub fn start(root: &Path) -> anyhow::Result<()> {
    let repo = Repo::read_only(root)?;
    let key = repo.secret_key_path();
    if let Err(e) = std::fs::File::open(&key) {
        let until = repo
            .signed_until()
            .ok()
            .flatten()
            .map_or_else(|| "never".to_string(), keepup_deploy::wire::verify::utc);
        eprintln!(
            "keepup: not refreshing the signed metadata (cannot read the secret key {}: {e}); \
             it is valid until {until}: run `keepup repo refresh --repo {}` before then, from \
             cron or a systemd timer (docs/repository.md)",
            key.display(),
            root.display()
        );
        return Ok(());
    }
    let root = root.to_path_buf();
    std::thread::Builder::new()
        .name("keepup-refresh".into())
        .spawn(move || run(&root))?;
    Ok(())
}

/// The refresher's loop: look, then refresh or sleep.
fn run(root: &Path) {
    loop {
        let next = Repo::read_only(root).and_then(|r| {
            let until = r.signed_until()?;
            Ok(plan(now(), until, r.valid_for()))
        });
        let nap = match next {
            Ok(Next::Wait(d)) => d,
            Ok(Next::Refresh) => match refresh(root) {
                Ok(until) => {
                    eprintln!(
                        "keepup: signed metadata refreshed; valid until {}",
                        keepup_deploy::wire::verify::utc(until)
                    );
                    continue;
                }
                Err(e) => {
                    eprintln!(
                        "keepup: refreshing the signed metadata failed: {e:#}; trying again in \
                         {}s",
                        RETRY.as_secs()
                    );
                    RETRY
                }
            },
            Err(e) => {
                eprintln!(
                    "keepup: reading the repository to plan a refresh failed: {e:#}; looking \
                     again in {}s",
                    RETRY.as_secs()
                );
                RETRY
            }
        };
        std::thread::sleep(nap);
    }
}

/// Unix time now.
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `keepup repo refresh`: waits for the repository lock, re-signs every view; the new expiry.
fn refresh(root: &Path) -> anyhow::Result<u64> {
    let mut r = Repo::open(root)?;
    r.reindex()?;
    Ok(r.expires())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshes_in_the_second_half_of_the_validity() {
        let day = 86_400;
        // Signed now for 7 days: wait 3.5 days.
        assert_eq!(
            plan(1_000, Some(1_000 + 7 * day), 7 * day),
            Next::Wait(MAX_NAP)
        );
        assert_eq!(plan(0, Some(20), 20), Next::Wait(Duration::from_secs(10)));
        assert_eq!(plan(10, Some(20), 20), Next::Refresh);
        // Already expired, or an hour left of a week: at once.
        assert_eq!(plan(30, Some(20), 20), Next::Refresh);
        assert_eq!(plan(7 * day - 3_600, Some(7 * day), 7 * day), Next::Refresh);
        // Nothing expires (metadata from before expiry existed): look again later.
        assert_eq!(plan(0, None, 20), Next::Wait(MAX_NAP));
        // Never busy-loop: at least a second.
        assert_eq!(plan(9, Some(20), 21), Next::Wait(Duration::from_secs(1)));
    }
}
