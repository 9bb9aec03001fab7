//! The repository's keyring package, `<name>-archive-keyring`: the repository's public keys for
//! apt (`/usr/share/keyrings/<name>-archive-keyring.gpg`, what a sources entry's `Signed-By`
//! names) and for rpm and dnf (`/etc/pki/rpm-gpg/RPM-GPG-KEY-<name>`, what a `.repo` file's
//! `gpgkey=file://` names). `keepup repo rotate-key` publishes a new version holding both keys
//! for the overlap, so hosts that use stock apt or dnf get the new key by upgrading a package.
//! Like the agent's own package it has no spec: it is planned here, with no scripts.

use crate::plan::{self, Entry, Format, Info, Plan, Scripts};
use crate::spec::Arch;
use crate::PackError;

/// What goes into one build of the keyring package.
#[derive(Debug, Clone)]
pub struct Keyring {
    /// The repository's name (`<name>-archive-keyring`): lower-case letters, digits, `-`.
    pub name: String,
    /// Upstream version (`[0-9][A-Za-z0-9.+~]*`); each rotation a higher one.
    pub version: String,
    /// The public keys as a binary OpenPGP keyring (apt).
    pub binary: Vec<u8>,
    /// The same keys, armored (rpm).
    pub armored: String,
    /// `Name <email>`.
    pub maintainer: String,
}

pub use crate::spec::is_keyring_name;

/// The package's name.
pub fn package_name(name: &str) -> String {
    format!("{name}-archive-keyring")
}

/// Where apt hosts find the keys.
pub fn deb_keyring_path(name: &str) -> String {
    format!("/usr/share/keyrings/{name}-archive-keyring.gpg")
}

/// Where rpm hosts find the keys.
pub fn rpm_key_path(name: &str) -> String {
    format!("/etc/pki/rpm-gpg/RPM-GPG-KEY-{name}")
}

/// Plan the keyring package in one format. `epoch` dates the changelog.
pub fn keyring_plan(k: &Keyring, format: Format, epoch: u64) -> Result<Plan, PackError> {
    let name_ok = !k.name.is_empty()
        && k.name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && k.name.as_bytes()[0].is_ascii_alphanumeric();
    if !name_ok {
        return Err(PackError::Spec(format!(
            "repository name {:?} is not valid: lower-case letters, digits and `-`, starting \
             with a letter or digit",
            k.name
        )));
    }
    if !crate::spec::is_version(&k.version) {
        return Err(PackError::Spec(format!(
            "version {:?} is not valid: start with a digit, then letters, digits, `.`, `+`, `~`",
            k.version
        )));
    }
    let info = Info {
        name: package_name(&k.name),
        version: k.version.clone(),
        release: "1".into(),
        arch: Arch::All,
        summary: format!("OpenPGP keys of the {} package repository", k.name),
        description: [
            "The public keys that sign the repository's metadata and packages,",
            "for apt (Signed-By) and for rpm and dnf (gpgkey). A key rotation",
            "publishes a new version with both keys while they overlap.",
        ]
        .join("\n"),
        maintainer: k.maintainer.clone(),
        license: "Apache-2.0".into(),
        homepage: None,
        deb_pre_depends: Vec::new(),
        deb_depends: Vec::new(),
        deb_recommends: Vec::new(),
        rpm_requires: Vec::new(),
        rpm_recommends: Vec::new(),
        changes: vec!["The repository's current signing keys.".into()],
    };
    let doc = format!("/usr/share/doc/{}", info.name);
    let mut entries = vec![Entry::generated(
        format!("{doc}/copyright"),
        0o644,
        plan::copyright(&info).into_bytes(),
    )];
    match format {
        Format::Deb => {
            entries.push(Entry::generated(
                deb_keyring_path(&k.name),
                0o644,
                k.binary.clone(),
            ));
            entries.push(Entry::generated(
                format!("{doc}/changelog.Debian.gz"),
                0o644,
                plan::gzip_n(plan::changelog_debian(&info, epoch).as_bytes()),
            ));
        }
        Format::Rpm => entries.push(Entry::generated(
            rpm_key_path(&k.name),
            0o644,
            k.armored.clone().into_bytes(),
        )),
    }
    Ok(Plan {
        entries: plan::finish(entries, format)?,
        info,
        scripts: Scripts::default(),
    })
}
