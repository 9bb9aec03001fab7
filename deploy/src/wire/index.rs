//! The agent's index of a track (`tracks/<track>/index.json`, signed by `index.json.sig`): a
//! serial that only increases and the current package of each name, format and arch.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Package format: one type for the packager, the repository and the agent, defined in the
/// packager (so `keepup_deploy::wire::Format` is `keepup_packager::Format`).
pub use keepup_packager::Format;

/// One package file in the pool, as the index lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolEntry {
    /// Package (= service) name.
    pub name: String,
    /// Full version (`[epoch:]version-release`).
    pub version: String,
    /// Architecture as the format spells it.
    pub arch: String,
    /// deb or rpm.
    pub format: Format,
    /// Path relative to the repository root.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// For a rollback package: the version whose payload and scripts it carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<String>,
}

impl PoolEntry {
    /// Compare this entry's version with `other` the way its package manager does.
    pub fn version_cmp(&self, other: &str) -> Ordering {
        self.format.cmp_versions(&self.version, other)
    }

    /// Does `v` name this entry's version (full, or upstream part only)?
    pub fn matches_version(&self, v: &str) -> bool {
        self.version == v
            || self
                .version
                .rsplit_once('-')
                .is_some_and(|(u, _)| u == v || u.split_once(':').is_some_and(|(_, u)| u == v))
    }
}

/// The agent's index of one track.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Index {
    /// Track name.
    pub track: String,
    /// Only increases; agents refuse an index with a lower serial than one they have seen.
    pub serial: u64,
    /// Unix time of generation.
    pub generated: u64,
    /// Unix time after which agents refuse this index (a frozen or unmaintained repository);
    /// `keepup repo refresh` signs it again with a later one. None: from a repository made
    /// before expiry existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    /// The current version of each package (per name, format and arch).
    pub packages: Vec<PoolEntry>,
    /// Packages whose current version is rolling out in waves: hosts outside the open waves
    /// keep the previous version (see [`crate::wire::rollout::target`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollouts: Vec<crate::wire::rollout::Rollout>,
    /// The armored public rollout key: the only key whose signature agents accept over the
    /// track's rollout progress (and over nothing else). Set when `rollouts` is not empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_key: Option<String>,
}

impl Index {
    /// Parses `index.json` text (after its signature was checked).
    pub fn from_json(data: &[u8]) -> Result<Index, String> {
        serde_json::from_slice(data).map_err(|e| format!("index.json: {e}"))
    }
}

/// The newest package of each name among `packages` for a host of `format` and `arch` (its
/// own arch or the format's "any" arch; of equal versions, the first listed). What an agent
/// installs, and what the fleet view compares hosts with.
pub fn best_per_name<'a>(
    packages: &'a [PoolEntry],
    format: Format,
    arch: &str,
) -> BTreeMap<&'a str, &'a PoolEntry> {
    let mut best: BTreeMap<&str, &PoolEntry> = BTreeMap::new();
    for p in packages {
        if p.format != format || (p.arch != arch && p.arch != format.any_arch()) {
            continue;
        }
        match best.get(p.name.as_str()) {
            Some(b) if format.cmp_versions(&b.version, &p.version) != Ordering::Less => {}
            _ => {
                best.insert(&p.name, p);
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, version: &str, format: Format, arch: &str) -> PoolEntry {
        PoolEntry {
            name: name.into(),
            version: version.into(),
            arch: arch.into(),
            format,
            path: format!("pool/{name}"),
            size: 1,
            sha256: "00".into(),
            rollback_of: None,
        }
    }

    #[test]
    fn best_picks_format_arch_and_newest() {
        let packages = vec![
            entry("foo", "1.9-1", Format::Deb, "amd64"),
            entry("foo", "1.10-1", Format::Deb, "all"),
            entry("foo", "2.0-1", Format::Rpm, "x86_64"),
            entry("foo", "3.0-1", Format::Deb, "arm64"),
            entry("bar", "1.0-1", Format::Rpm, "x86_64"),
        ];
        let deb = best_per_name(&packages, Format::Deb, "amd64");
        assert_eq!(deb.len(), 1);
        assert_eq!(deb["foo"].version, "1.10-1");
        let rpm = best_per_name(&packages, Format::Rpm, "x86_64");
        assert_eq!(rpm["foo"].version, "2.0-1");
        assert_eq!(rpm["bar"].version, "1.0-1");
        assert!(best_per_name(&packages, Format::Rpm, "aarch64").is_empty());
    }

    #[test]
    fn upstream_version_matches() {
        let e = entry("foo", "1:2.0-3", Format::Deb, "amd64");
        assert!(e.matches_version("1:2.0-3"));
        assert!(e.matches_version("2.0"));
        assert!(!e.matches_version("2.1"));
    }
}
