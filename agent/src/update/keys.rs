//! The keys an agent trusts: the one pinned in its configuration (`trusted_key`), plus the keys
//! it learned from the repository's rotation statements (`keys/rotation.asc`, see
//! [`keepup_deploy::wire::rotation`]), minus each old key once its overlap is over. What was
//! learned is kept in `state_dir/keys.json` (written to a temporary file and renamed).

use std::path::{Path, PathBuf};

use keepup_deploy::wire::rotation::Rotation;
use keepup_deploy::wire::verify::TrustedKey;
use serde::{Deserialize, Serialize};

/// What was learned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Learned {
    /// Every rotation statement accepted, oldest first.
    #[serde(default)]
    pub rotations: Vec<Rotation>,
}

/// The store in `state_dir/keys.json`.
#[derive(Debug, Clone)]
pub struct KeyStore {
    path: PathBuf,
}

impl KeyStore {
    /// The store under `state_dir`.
    pub fn new(state_dir: &Path) -> KeyStore {
        KeyStore {
            path: state_dir.join("keys.json"),
        }
    }

    /// What was learned so far (nothing if the file does not exist).
    pub fn load(&self) -> Result<Learned, String> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                format!(
                    "{}: {e} (fix or remove it; removing it forgets the keys learned from \
                     rotations, and the host then trusts only its trusted_key)",
                    self.path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Learned::default()),
            Err(e) => Err(format!("reading {}: {e}", self.path.display())),
        }
    }

    /// Writes `l` atomically.
    pub fn save(&self, l: &Learned) -> Result<(), String> {
        let write = || -> std::io::Result<()> {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = self.path.with_extension("json.tmp");
            let data = serde_json::to_vec_pretty(l).map_err(std::io::Error::other)?;
            std::fs::write(&tmp, data)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| format!("writing {}: {e}", self.path.display()))
    }
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
