//! The package format: `.deb` (dpkg/apt) or `.rpm` (rpm/dnf). One type for everything that
//! branches on it: the package writers, the repository and its index (`keepup_deploy::wire`
//! re-exports it), and the agent's updater. Available without the package writers
//! (`default-features = false`).

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::version;

/// Package format; `deb` and `rpm` on the wire and in text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Debian package (dpkg/apt).
    Deb,
    /// RPM package (rpm/dnf).
    Rpm,
}

impl Format {
    /// Compares two full versions the way this format's package manager does.
    pub fn cmp_versions(self, a: &str, b: &str) -> Ordering {
        match self {
            Format::Deb => version::dpkg_cmp(a, b),
            Format::Rpm => version::rpm_cmp(a, b),
        }
    }

    /// The architecture name that installs on any machine (`all` / `noarch`).
    pub fn any_arch(self) -> &'static str {
        match self {
            Format::Deb => "all",
            Format::Rpm => "noarch",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Deb => "deb",
            Format::Rpm => "rpm",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_wire_names_agree() {
        for (f, name) in [(Format::Deb, "deb"), (Format::Rpm, "rpm")] {
            assert_eq!(f.to_string(), name);
            assert_eq!(serde_saphyr::to_string(&f).unwrap().trim(), name);
            assert_eq!(serde_saphyr::from_str::<Format>(name).unwrap(), f);
        }
        assert!(Format::Deb < Format::Rpm);
    }

    #[test]
    fn versions_compare_as_each_package_manager_does() {
        // dpkg: `~` sorts before anything, even the end; rpm 4.10+ agrees on `~`.
        assert_eq!(
            Format::Deb.cmp_versions("1.0~rc1-1", "1.0-1"),
            Ordering::Less
        );
        assert_eq!(
            Format::Rpm.cmp_versions("1.10-1", "1.9-1"),
            Ordering::Greater
        );
        assert_eq!(Format::Deb.any_arch(), "all");
        assert_eq!(Format::Rpm.any_arch(), "noarch");
    }
}
