//! What the updater last found and did on this host ([`HostState`]), kept in the state
//! directory across agent restarts and read by the reporter. A leaf.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use keepup_deploy::wire::{Format, StartReport, UpdateReport};

use crate::statefile::save_json;

/// What the updater last found and did, for reports. Saved in `state_dir` after each pass
/// ([`HOST_STATE_FILE`]) and read back when the agent starts, so a restarted agent (its own
/// upgrade, a reboot) reports what is installed before its next pass, not "missing".
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct HostState {
    /// The track from the fleet policy (`None`: not assigned, or not known yet).
    pub track: Option<String>,
    /// The host's package format.
    pub format: Option<Format>,
    /// The host's architecture.
    pub arch: Option<String>,
    /// Fully installed packages of the repository's services.
    pub installed: BTreeMap<String, String>,
    /// Services quarantined here.
    pub quarantined: Vec<String>,
    /// The last pass.
    pub update: Option<UpdateReport>,
    /// The last start judgement per service.
    pub starts: BTreeMap<String, StartReport>,
}

/// Shared between the updater (writes) and the reporter (reads).
pub type SharedHost = Arc<Mutex<HostState>>;

/// The file in `state_dir` that keeps the [`HostState`] across agent restarts.
pub const HOST_STATE_FILE: &str = "host-state.json";

impl HostState {
    /// The state saved in `file`; empty if there is none or it cannot be read (said on
    /// stderr: the next pass finds it all again).
    pub fn load(file: &Path) -> HostState {
        match std::fs::read(file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                eprintln!(
                    "keepup-agent: {}: unreadable ({e}); the next pass finds it again",
                    file.display()
                );
                HostState::default()
            }),
            Err(_) => HostState::default(),
        }
    }

    /// Saves the state in `file` (a temporary file, then a rename).
    pub fn save(&self, file: &Path) -> std::io::Result<()> {
        save_json(file, self)
    }
}
