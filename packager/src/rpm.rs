//! The .rpm writer, on the `rpm` crate: header, file list, scriptlets, changelog and an
//! optional OpenPGP signature, reproducible through `source_date`.
//!
//! Known limit: the crate keeps the compressed payload in memory while it builds, so peak
//! memory grows with the compressed payload size (see docs/benchmarks.md).

use std::path::{Path, PathBuf};

use rpm::{CompressionWithLevel, Dependency, FileOptions, PackageBuilder, Scriptlet};

use crate::plan::{self, Entry, Kind, Source};
use crate::scripts;
use crate::spec::Spec;
use crate::{Compression, PackError, PackOptions};

/// Write `<name>-<version>-<release>.<arch>.rpm` into `out_dir`.
pub fn write(
    spec: &Spec,
    entries: &[Entry],
    opts: &PackOptions,
    out_dir: &Path,
) -> Result<PathBuf, PackError> {
    let dest = out_dir.join(format!(
        "{}-{}.{}.rpm",
        spec.name,
        spec.full_version(),
        spec.arch.rpm()
    ));
    let rpm_err = |e: rpm::Error| PackError::Rpm(format!("{}: {e}", dest.display()));

    let compression = match opts
        .compression
        .unwrap_or(Compression::default_for(crate::plan::Format::Rpm))
    {
        Compression::Zstd(l) => CompressionWithLevel::Zstd(l),
        Compression::Xz(l) => CompressionWithLevel::Xz(l),
        Compression::Gzip(l) => CompressionWithLevel::Gzip(l),
        Compression::None => CompressionWithLevel::None,
    };
    let config = rpm::BuildConfig::v4()
        .compression(compression)
        .source_date(opts.epoch as u32);
    let mut b = PackageBuilder::new(
        &spec.name,
        &spec.version,
        &spec.license,
        spec.arch.rpm(),
        &spec.summary,
    );
    b.using_config(config)
        .release(spec.release.clone())
        .description(if spec.description.trim().is_empty() {
            spec.summary.clone()
        } else {
            spec.description.trim_end().to_string()
        })
        .packager(spec.maintainer.clone())
        .vendor("keepup")
        .group("System Environment/Daemons")
        .build_host("keepup");
    if let Some(h) = &spec.homepage {
        b.url(h.clone());
    }
    b.add_changelog_entry(
        format!("{} - {}", spec.maintainer, spec.full_version()),
        plan::changelog_text(spec),
        opts.epoch as u32,
    );

    for e in entries {
        let mut o = match &e.kind {
            Kind::Dir => FileOptions::dir(&e.path),
            Kind::Symlink(target) => FileOptions::symlink(&e.path, target),
            Kind::File(_) => FileOptions::new(&e.path),
        };
        if !matches!(e.kind, Kind::Symlink(_)) {
            o = o.permissions(e.mode as u16);
        }
        o = o
            .user(&e.owner)
            .group(&e.group)
            .modified_at(rpm::Timestamp::from(opts.epoch as u32));
        if e.config {
            o = o.config().noreplace();
        }
        if e.path.starts_with("/usr/share/doc/") {
            o = o.doc();
        }
        match &e.kind {
            Kind::Dir => b.with_dir_entry(o).map_err(rpm_err)?,
            Kind::Symlink(_) => b.with_symlink(o).map_err(rpm_err)?,
            Kind::File(Source::Bytes(bytes)) => {
                b.with_file_contents(bytes.clone(), o).map_err(rpm_err)?
            }
            Kind::File(Source::Disk(p)) => b.with_file(p, o).map_err(rpm_err)?,
        };
    }
    // No Requires on procps-ng/shadow-utils/util-linux: every RPM host has them, and a
    // Debian host running rpm with its own database would refuse the package for them.
    for d in spec.depends.common.iter().chain(&spec.depends.rpm) {
        b.requires(dependency(d));
    }
    let s = scripts::rpm_scripts(spec);
    let sh = |body: String| Scriptlet::new(body).prog(vec!["/bin/sh"]);
    b.pre_install_script(sh(s.pre));
    b.post_uninstall_script(sh(s.postun));
    b.post_trans_script(sh(s.posttrans));

    let pkg = match &opts.sign_key {
        Some(key) => {
            let signer = rpm::signature::pgp::Signer::from_asc_file(key).map_err(|e| {
                PackError::Sign(format!(
                    "cannot load the signing key {}: {e}",
                    key.display()
                ))
            })?;
            b.build_and_sign(signer).map_err(rpm_err)?
        }
        None => b.build().map_err(rpm_err)?,
    };
    let tmp = tempfile::NamedTempFile::new_in(out_dir).map_err(|e| PackError::io(out_dir, e))?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file());
        pkg.write(&mut w).map_err(rpm_err)?;
        std::io::Write::flush(&mut w).map_err(|e| PackError::io(&dest, e))?;
    }
    crate::persist(tmp, &dest)?;
    Ok(dest)
}

/// `name`, `name (>= 1.2)` (Debian style) or `name >= 1.2` to an RPM dependency.
fn dependency(text: &str) -> Dependency {
    let cleaned = text.replace(['(', ')'], " ");
    let parts: Vec<&str> = cleaned.split_whitespace().collect();
    match parts.as_slice() {
        [name, op, version] => match *op {
            ">=" => Dependency::greater_eq(*name, *version),
            "<=" => Dependency::less_eq(*name, *version),
            ">>" | ">" => Dependency::greater(*name, *version),
            "<<" | "<" => Dependency::less(*name, *version),
            "=" => Dependency::eq(*name, *version),
            _ => Dependency::any(text),
        },
        _ => Dependency::any(text.trim()),
    }
}
