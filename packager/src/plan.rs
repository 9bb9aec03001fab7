//! The content plan: every entry a package holds (payload, launch script, manifest, unit,
//! docs), with its final path, mode, owner and source, sorted by path, plus the package's
//! fields and maintainer scripts ([`Plan`]).
//!
//! Both writers consume the same plan, so a .deb and an .rpm of one spec install the same
//! service. Generated text is built here in memory; payload files stay on disk and are
//! streamed by the writers. A service's plan comes from its spec ([`service_plan`]); the
//! agent's own package has no spec, role, launch script or manifest (see `crate::agent`).

use std::io::Write as _;
use std::path::{Path, PathBuf};

pub use crate::format::Format;
use crate::manifest::Manifest;
use crate::scripts;
use crate::spec::{Arch, Spec, SupervisorKind};
use crate::PackError;

/// A package's identity and descriptive fields: what the .deb `control` file and the .rpm
/// header say about it.
#[derive(Debug, Clone)]
pub struct Info {
    /// Package name.
    pub name: String,
    /// Upstream version.
    pub version: String,
    /// Debian revision / RPM release.
    pub release: String,
    /// Architecture.
    pub arch: Arch,
    /// One-line summary.
    pub summary: String,
    /// Long description (empty: the summary).
    pub description: String,
    /// `Name <email>`.
    pub maintainer: String,
    /// SPDX license expression.
    pub license: String,
    /// Home page.
    pub homepage: Option<String>,
    /// .deb `Pre-Depends`.
    pub deb_pre_depends: Vec<String>,
    /// .deb `Depends` (`libc6` is added for packages with ELF files when missing).
    pub deb_depends: Vec<String>,
    /// .deb `Recommends`.
    pub deb_recommends: Vec<String>,
    /// .rpm `Requires`, besides the rpmlib features.
    pub rpm_requires: Vec<String>,
    /// .rpm `Recommends` (weak: `rpm -i` does not need them installed).
    pub rpm_recommends: Vec<String>,
    /// Changelog lines for this version (empty: a generated line).
    pub changes: Vec<String>,
}

impl Info {
    /// A service package's fields, from its spec. The .deb depends on `procps` (the
    /// maintainer scripts' `pgrep` and `ps`; their `awk` is required on every Debian system)
    /// and pre-depends on `passwd` (`useradd` in `preinst`).
    pub fn from_spec(spec: &Spec) -> Info {
        let mut deb_depends = vec!["procps".to_string()];
        deb_depends.extend(spec.depends.common.iter().cloned());
        deb_depends.extend(spec.depends.deb.iter().cloned());
        deb_depends.extend(crate::foreign::depends(spec, true));
        let mut rpm_requires: Vec<String> = spec
            .depends
            .common
            .iter()
            .chain(&spec.depends.rpm)
            .cloned()
            .collect();
        rpm_requires.extend(crate::foreign::depends(spec, false));
        Info {
            name: spec.name.clone(),
            version: spec.version.clone(),
            release: spec.release.clone(),
            arch: spec.arch,
            summary: spec.summary.clone(),
            description: spec.description.clone(),
            maintainer: spec.maintainer.clone(),
            license: spec.license.clone(),
            homepage: spec.homepage.clone(),
            deb_pre_depends: vec!["passwd".into()],
            deb_depends,
            deb_recommends: Vec::new(),
            rpm_requires,
            rpm_recommends: Vec::new(),
            changes: spec.changes.clone(),
        }
    }

    /// `<version>-<release>`.
    pub fn full_version(&self) -> String {
        format!("{}-{}", self.version, self.release)
    }
}

/// Maintainer scripts by the moment they run; each writer ships the ones its format has
/// (`None`: not shipped). Bodies are complete `/bin/sh` scripts; the .rpm writer drops the
/// shebang line.
#[derive(Debug, Clone, Default)]
pub struct Scripts {
    /// .deb `preinst` / .rpm `%pre`.
    pub pre_install: Option<String>,
    /// .deb `postinst` / .rpm `%post`.
    pub post_install: Option<String>,
    /// .deb `prerm` / .rpm `%preun`.
    pub pre_remove: Option<String>,
    /// .deb `postrm` / .rpm `%postun`.
    pub post_remove: Option<String>,
    /// .rpm `%posttrans` (the .deb has no such hook).
    pub post_trans: Option<String>,
}

/// Everything a writer needs for one package in one format.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Control / header fields.
    pub info: Info,
    /// The entries, sorted by path.
    pub entries: Vec<Entry>,
    /// Maintainer scripts for this format.
    pub scripts: Scripts,
}

/// The plan of a service package: [`plan`]'s entries, the spec's fields, and the
/// maintainer scripts of the talk's upgrade flow.
pub fn service_plan(spec: &Spec, format: Format, epoch: u64) -> Result<Plan, PackError> {
    Ok(Plan {
        info: Info::from_spec(spec),
        entries: plan(spec, format, epoch)?,
        scripts: match format {
            Format::Deb => scripts::deb_scripts(spec).into(),
            Format::Rpm => scripts::rpm_scripts(spec).into(),
        },
    })
}

/// Where an entry's bytes come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A file on the build machine, streamed at write time.
    Disk(PathBuf),
    /// Generated bytes.
    Bytes(Vec<u8>),
}

/// What an entry is.
#[derive(Debug, Clone)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File(Source),
    /// A symbolic link to the target.
    Symlink(String),
}

/// One entry of the package.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Absolute path on the host.
    pub path: String,
    /// Directory, file or symlink.
    pub kind: Kind,
    /// Permission bits.
    pub mode: u32,
    /// Owner name.
    pub owner: String,
    /// Group name.
    pub group: String,
    /// Configuration file (conffile / `%config(noreplace)`).
    pub config: bool,
}

impl Entry {
    /// A generated root-owned file.
    pub(crate) fn generated(path: impl Into<String>, mode: u32, bytes: Vec<u8>) -> Entry {
        Entry {
            path: path.into(),
            kind: Kind::File(Source::Bytes(bytes)),
            mode,
            owner: "root".into(),
            group: "root".into(),
            config: false,
        }
    }

    /// Size in bytes of a regular file's contents (0 for others).
    pub fn size(&self) -> std::io::Result<u64> {
        match &self.kind {
            Kind::File(Source::Bytes(b)) => Ok(b.len() as u64),
            Kind::File(Source::Disk(p)) => Ok(std::fs::metadata(p)?.len()),
            _ => Ok(0),
        }
    }
}

/// Plan the contents of one package. `epoch` dates generated documents.
pub fn plan(spec: &Spec, format: Format, epoch: u64) -> Result<Vec<Entry>, PackError> {
    let mut entries = Vec::new();
    for f in &spec.files {
        let meta = std::fs::symlink_metadata(&f.src).map_err(|e| PackError::io(&f.src, e))?;
        if meta.is_dir() {
            add_tree(&mut entries, &f.src, &f.dst, f, format)?;
        } else {
            entries.push(disk_entry(
                &f.src,
                &meta,
                f.dst.clone(),
                f.mode,
                f,
                f.config,
            )?);
        }
    }

    entries.push(Entry::generated(
        spec.launch_path(),
        0o755,
        scripts::launch_script(spec).into_bytes(),
    ));
    entries.push(Entry::generated(
        spec.manifest_path(),
        0o644,
        Manifest::from_spec(spec).to_yaml().into_bytes(),
    ));
    if spec.supervisor.kind == SupervisorKind::Systemd {
        let dir = match format {
            Format::Deb => "/lib/systemd/system",
            Format::Rpm => "/usr/lib/systemd/system",
        };
        entries.push(Entry::generated(
            format!("{dir}/{}.service", spec.name),
            0o644,
            scripts::systemd_unit(spec).into_bytes(),
        ));
    }
    for f in crate::foreign::files(spec) {
        let mut e = match f.body {
            crate::foreign::ForeignBody::Text(t) => {
                Entry::generated(f.path, f.mode, t.into_bytes())
            }
            crate::foreign::ForeignBody::Link(target) => Entry {
                kind: Kind::Symlink(target),
                ..Entry::generated(f.path, f.mode, Vec::new())
            },
        };
        e.config = f.config && format == Format::Deb;
        entries.push(e);
    }
    let doc = format!("/usr/share/doc/{}", spec.name);
    entries.push(Entry::generated(
        format!("{doc}/copyright"),
        0o644,
        copyright(&Info::from_spec(spec)).into_bytes(),
    ));
    if format == Format::Deb {
        entries.push(Entry::generated(
            format!("{doc}/changelog.Debian.gz"),
            0o644,
            gzip_n(changelog_debian(&Info::from_spec(spec), epoch).as_bytes()),
        ));
    }
    finish(entries, format)
}

/// Sort the entries, refuse duplicate destinations, and (.deb) add every parent directory.
pub(crate) fn finish(mut entries: Vec<Entry>, format: Format) -> Result<Vec<Entry>, PackError> {
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    for pair in entries.windows(2) {
        if pair[0].path == pair[1].path {
            return Err(PackError::Spec(format!(
                "two entries install {}; each destination must be unique",
                pair[0].path
            )));
        }
    }
    if format == Format::Deb {
        add_parent_dirs(&mut entries);
    }
    Ok(entries)
}

fn disk_entry(
    src: &Path,
    meta: &std::fs::Metadata,
    dst: String,
    mode: Option<u32>,
    f: &crate::spec::FileSpec,
    config: bool,
) -> Result<Entry, PackError> {
    use std::os::unix::fs::PermissionsExt;
    let kind = if meta.file_type().is_symlink() {
        let target = std::fs::read_link(src).map_err(|e| PackError::io(src, e))?;
        Kind::Symlink(target.to_string_lossy().into_owned())
    } else if meta.is_file() {
        Kind::File(Source::Disk(src.to_path_buf()))
    } else {
        return Err(PackError::Spec(format!(
            "{} is neither a file, a directory nor a symlink",
            src.display()
        )));
    };
    // Normalize modes so the build machine's umask does not leak into the package.
    let default = if meta.permissions().mode() & 0o100 != 0 {
        0o755
    } else {
        0o644
    };
    let mode = if matches!(kind, Kind::Symlink(_)) {
        0o777
    } else {
        mode.unwrap_or(default)
    };
    Ok(Entry {
        path: dst,
        kind,
        mode,
        owner: f.owner.clone(),
        group: f.group.clone(),
        config,
    })
}

fn add_tree(
    entries: &mut Vec<Entry>,
    src: &Path,
    dst: &str,
    f: &crate::spec::FileSpec,
    format: Format,
) -> Result<(), PackError> {
    if format == Format::Rpm {
        // The package owns directories it brings; system directories stay unowned.
        entries.push(Entry {
            path: dst.to_string(),
            kind: Kind::Dir,
            mode: 0o755,
            owner: f.owner.clone(),
            group: f.group.clone(),
            config: false,
        });
    }
    let mut children: Vec<_> = std::fs::read_dir(src)
        .map_err(|e| PackError::io(src, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| PackError::io(src, e))?;
    children.sort_by_key(|c| c.file_name());
    for child in children {
        let name = child.file_name().to_string_lossy().into_owned();
        let path = child.path();
        let meta = std::fs::symlink_metadata(&path).map_err(|e| PackError::io(&path, e))?;
        let child_dst = format!("{dst}/{name}");
        if meta.is_dir() {
            add_tree(entries, &path, &child_dst, f, format)?;
        } else {
            let config = f.config || child_dst.starts_with("/etc/");
            entries.push(disk_entry(&path, &meta, child_dst, None, f, config)?);
        }
    }
    Ok(())
}

/// Debian archives list every parent directory, root-owned 0755.
fn add_parent_dirs(entries: &mut Vec<Entry>) {
    let mut dirs = std::collections::BTreeSet::new();
    for e in entries.iter() {
        let mut p = e.path.as_str();
        while let Some(i) = p.rfind('/') {
            p = &p[..i];
            if p.is_empty() {
                break;
            }
            dirs.insert(p.to_string());
        }
    }
    for e in entries.iter() {
        if matches!(e.kind, Kind::Dir) {
            dirs.remove(&e.path);
        }
    }
    for d in dirs {
        entries.push(Entry {
            path: d,
            kind: Kind::Dir,
            mode: 0o755,
            owner: "root".into(),
            group: "root".into(),
            config: false,
        });
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
}

/// Machine-readable Debian copyright file (DEP-5).
pub(crate) fn copyright(spec: &Info) -> String {
    let mut s = format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: {}\n",
        spec.name
    );
    if let Some(h) = &spec.homepage {
        s.push_str(&format!("Source: {h}\n"));
    }
    s.push_str(&format!(
        "\nFiles: *\nCopyright: {}\nLicense: {}\n",
        spec.maintainer, spec.license
    ));
    let common = [
        "Apache-2.0",
        "GPL-2",
        "GPL-3",
        "LGPL-2.1",
        "LGPL-3",
        "MPL-2.0",
        "BSD-3-clause",
        "Artistic",
        "CC0-1.0",
    ];
    if let Some(c) = common.iter().find(|c| spec.license.eq_ignore_ascii_case(c)) {
        s.push_str(&format!(" On Debian systems, the full text of this license can be found in\n /usr/share/common-licenses/{c}.\n"));
    } else {
        s.push_str(" See the upstream project for the full license text.\n");
    }
    s
}

/// The Debian changelog entry for this build.
pub(crate) fn changelog_debian(spec: &Info, epoch: u64) -> String {
    let mut s = format!(
        "{} ({}) unstable; urgency=medium\n\n",
        spec.name,
        spec.full_version()
    );
    if spec.changes.is_empty() {
        s.push_str(&format!(
            "  * Package {} built by keepup.\n",
            spec.full_version()
        ));
    } else {
        for line in &spec.changes {
            s.push_str(&format!("  * {line}\n"));
        }
    }
    s.push_str(&format!("\n -- {}  {}\n", spec.maintainer, rfc2822(epoch)));
    s
}

/// Changelog lines for the RPM header.
pub fn changelog_text(spec: &Info) -> String {
    if spec.changes.is_empty() {
        format!("- Package {} built by keepup.", spec.full_version())
    } else {
        spec.changes
            .iter()
            .map(|l| format!("- {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// gzip with no name and no timestamp (`gzip -9n`), for reproducible docs.
pub(crate) fn gzip_n(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    enc.write_all(data).expect("writing to memory");
    enc.finish().expect("writing to memory")
}

/// `Thu, 01 Jan 1970 00:00:00 +0000` for a Unix time.
pub fn rfc2822(epoch: u64) -> String {
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    let (y, m, d) = civil_from_days(days);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days.rem_euclid(7)) as usize];
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(m - 1) as usize];
    format!(
        "{weekday}, {d:02} {month} {y} {:02}:{:02}:{:02} +0000",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's method).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc2822_dates() {
        assert_eq!(rfc2822(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc2822(1_700_000_000), "Tue, 14 Nov 2023 22:13:20 +0000");
    }
}
