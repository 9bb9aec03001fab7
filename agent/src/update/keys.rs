//! The keys an agent trusts: the one pinned in its configuration (`trusted_key`), plus the keys
//! it learned from the repository's rotation statements (`keys/rotation.asc`, see
//! [`keepup_deploy::wire::rotation`]), minus each old key once its overlap is over. What was
//! learned is kept in `state_dir/keys.json` (a [`StateFile`]).

use std::path::Path;

use keepup_deploy::wire::rotation::Rotation;
use keepup_deploy::wire::verify::TrustedKey;
use serde::{Deserialize, Serialize};

use crate::statefile::StateFile;

/// What was learned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Learned {
    /// Every rotation statement accepted, oldest first.
    #[serde(default)]
    pub rotations: Vec<Rotation>,
}

/// The store in `state_dir/keys.json`.
pub type KeyStore = StateFile<Learned>;

/// The learned-keys store of `state_dir`.
pub fn key_store(state_dir: &Path) -> KeyStore {
    StateFile::new(
        state_dir,
        "keys.json",
        "the keys learned from rotations, and the host then trusts only its trusted_key",
    )
}

/// The keys trusted at `now`: `pinned`, plus every key learned, minus each old key whose
/// overlap is over (never the last key).
pub fn trusted(pinned: TrustedKey, learned: &Learned, now: u64) -> TrustedKey {
    let mut t = pinned;
    for r in &learned.rotations {
        if let Ok(k) = TrustedKey::from_armored(&r.new_key) {
            t.extend(k);
        }
    }
    t.retain(|fpr| {
        learned
            .rotations
            .iter()
            .any(|r| r.old == fpr && now >= r.old_until)
    });
    t
}
