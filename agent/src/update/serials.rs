//! The replay guard: the highest serial seen of the fleet policy and of each track's index,
//! kept in `state_dir/serials.json` (written to a temporary file and renamed, so a crash leaves
//! the old or the new file, never half of one). A signed file with a lower serial than one
//! already seen is an old copy served again (a replay, or a repository restored from backup)
//! and is refused; the same serial is fine. A host that has seen nothing yet (new, reimaged,
//! or with a wiped `/var/lib`) checks against the minimum serials of its configuration
//! (`min_serials`, [`check_min`]) instead of accepting the oldest signed metadata.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::statefile::StateFile;

/// What has been seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serials {
    /// Highest fleet policy serial (`fleet.yaml.asc`).
    #[serde(default)]
    pub fleet: u64,
    /// Highest index serial per track.
    #[serde(default)]
    pub tracks: BTreeMap<String, u64>,
    /// Highest rollout progress serial per track (`tracks/<t>/rollout.json.asc`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rollouts: BTreeMap<String, u64>,
}

/// The store in `state_dir/serials.json`.
pub type SerialStore = StateFile<Serials>;

/// The serials store of `state_dir`.
pub fn serial_store(state_dir: &Path) -> SerialStore {
    StateFile::new(state_dir, "serials.json", "which serials were seen")
}

/// Checks `serial` of the file at `what` (e.g. `tracks/stable/index.json`) against the highest
/// seen, `seen`.
pub fn check(what: &str, serial: u64, seen: u64) -> Result<(), String> {
    if serial < seen {
        return Err(format!(
            "refused {what}: serial {serial} is lower than {seen} already seen (replayed or \
             rolled-back repository?)"
        ));
    }
    Ok(())
}

/// Checks `serial` of the file at `what` against the minimum the agent's configuration pins
/// (`min_serials`): what protects first contact.
pub fn check_min(what: &str, serial: u64, min: u64) -> Result<(), String> {
    if serial < min {
        return Err(format!(
            "refused {what}: serial {serial} is lower than the minimum {min} of this host's \
             configuration (min_serials; an old snapshot served to a new host?)"
        ));
    }
    Ok(())
}

impl Serials {
    /// The minimum serial of `track`'s index (0: none).
    pub fn track(&self, track: &str) -> u64 {
        self.tracks.get(track).copied().unwrap_or(0)
    }

    /// Checks the fleet policy's serial.
    pub fn check_fleet(&self, serial: u64) -> Result<(), String> {
        check(
            keepup_deploy::wire::fleet::SIGNED_POLICY,
            serial,
            self.fleet,
        )
    }

    /// Checks a track index's serial.
    pub fn check_track(&self, track: &str, serial: u64) -> Result<(), String> {
        check(
            &format!("tracks/{track}/index.json"),
            serial,
            self.tracks.get(track).copied().unwrap_or(0),
        )
    }

    /// Records serials that passed their checks; true if anything rose.
    pub fn record(&mut self, fleet: u64, track: Option<(&str, u64)>) -> bool {
        let mut changed = false;
        if fleet > self.fleet {
            self.fleet = fleet;
            changed = true;
        }
        if let Some((t, s)) = track {
            let e = self.tracks.entry(t.to_string()).or_insert(0);
            if s > *e {
                *e = s;
                changed = true;
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_is_refused_equal_is_fine() {
        let mut s = Serials::default();
        s.check_fleet(0).unwrap();
        assert!(s.record(4, Some(("stable", 5))));
        assert!(!s.record(4, Some(("stable", 5))));
        s.check_track("stable", 5).unwrap();
        s.check_track("stable", 6).unwrap();
        s.check_track("testing", 1).unwrap();
        assert_eq!(
            s.check_track("stable", 3).unwrap_err(),
            "refused tracks/stable/index.json: serial 3 is lower than 5 already seen \
             (replayed or rolled-back repository?)"
        );
        assert!(s
            .check_fleet(2)
            .unwrap_err()
            .starts_with("refused fleet.yaml.asc: serial 2"));
        // Never goes down.
        assert!(!s.record(1, Some(("stable", 2))));
        assert_eq!((s.fleet, s.tracks["stable"]), (4, 5));
    }

    #[test]
    fn below_the_configured_minimum_is_refused() {
        check_min("fleet.yaml", 4, 4).unwrap();
        check_min("fleet.yaml", 5, 0).unwrap();
        assert_eq!(
            check_min("tracks/stable/index.json", 3, 9).unwrap_err(),
            "refused tracks/stable/index.json: serial 3 is lower than the minimum 9 of this \
             host's configuration (min_serials; an old snapshot served to a new host?)"
        );
    }

    #[test]
    fn store_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let store = serial_store(&d.path().join("state"));
        assert_eq!(store.load().unwrap(), Serials::default());
        let mut s = Serials::default();
        s.record(2, Some(("stable", 7)));
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), s);
        assert!(!d.path().join("state/serials.json.tmp").exists());
        std::fs::write(d.path().join("state/serials.json"), "{not json").unwrap();
        assert!(store.load().unwrap_err().contains("serials.json"));
    }
}
