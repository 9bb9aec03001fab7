//! keepup's packager: one YAML service spec in, complete `.deb` and `.rpm` service packages out.
//!
//! A package holds the payload (bins + configs), the generated `run-<name>` launch script, the
//! agent manifest, an optional systemd unit, docs, and maintainer scripts that follow the
//! upgrade flow of the OSCON 2013 "while (true) do" talk. [`spec`], [`manifest`] and [`Format`]
//! are always available (the agent reads manifests); the writers need the `build` feature. The
//! agent's own package (root, systemd, no spec) is planned by `agent` and written by the same
//! writers.

#[cfg(feature = "build")]
pub mod agent;
#[cfg(feature = "build")]
pub mod foreign;
pub mod format;
#[cfg(feature = "build")]
pub mod keyring;
pub mod manifest;
pub mod spec;
pub mod version;

#[cfg(feature = "build")]
mod deb;
#[cfg(feature = "build")]
pub mod plan;
#[cfg(feature = "build")]
pub mod reversion;
#[cfg(feature = "build")]
mod rpm;
#[cfg(feature = "build")]
pub mod scripts;

pub use format::Format;

#[cfg(feature = "build")]
pub use build::*;

#[cfg(feature = "build")]
mod build {
    use std::path::{Path, PathBuf};

    use crate::plan::{self, Format};
    use crate::spec::Spec;

    /// Payload compression and level.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Compression {
        /// zstd at a level (default 3).
        Zstd(i32),
        /// xz at a level (0-9).
        Xz(u32),
        /// gzip at a level (0-9).
        Gzip(u32),
        /// Stored.
        None,
    }

    impl Compression {
        /// Parse `zstd`, `xz`, `gzip` or `none`, with an optional `:LEVEL`.
        pub fn parse(s: &str) -> Result<Compression, String> {
            let (name, level) = match s.split_once(':') {
                Some((n, l)) => (
                    n,
                    Some(
                        l.parse::<u32>()
                            .map_err(|_| format!("compression level {l:?} is not a number"))?,
                    ),
                ),
                None => (s, None),
            };
            Ok(match name {
                "zstd" => Compression::Zstd(level.unwrap_or(3).min(19) as i32),
                "xz" => Compression::Xz(level.unwrap_or(6).min(9)),
                "gzip" => Compression::Gzip(level.unwrap_or(9).min(9)),
                "none" => Compression::None,
                other => {
                    return Err(format!(
                        "unknown compression {other:?}; use zstd, xz, gzip or none"
                    ))
                }
            })
        }

        /// The default per format: xz for .deb (what dpkg-deb uses, and all that bookworm's
        /// lintian accepts), zstd level 3 for .rpm (Fedora's default).
        pub fn default_for(format: Format) -> Compression {
            match format {
                Format::Deb => Compression::Xz(6),
                Format::Rpm => Compression::Zstd(3),
            }
        }

        pub(crate) fn extension(self) -> &'static str {
            match self {
                Compression::Zstd(_) => ".zst",
                Compression::Xz(_) => ".xz",
                Compression::Gzip(_) => ".gz",
                Compression::None => "",
            }
        }
    }

    /// How to build.
    #[derive(Debug, Clone)]
    pub struct PackOptions {
        /// Formats to write.
        pub formats: Vec<Format>,
        /// Payload compression; `None` picks each format's default ([`Compression::default_for`]).
        pub compression: Option<Compression>,
        /// Timestamp for every entry and header (`SOURCE_DATE_EPOCH`).
        pub epoch: u64,
        /// Armored OpenPGP secret key to sign the .rpm with.
        pub sign_key: Option<PathBuf>,
    }

    /// Why a build failed.
    #[derive(Debug, thiserror::Error)]
    pub enum PackError {
        /// The spec is invalid.
        #[error("{0}")]
        Spec(String),
        /// Reading an input or writing an output failed.
        #[error("{path}: {source}")]
        Io {
            /// File involved.
            path: PathBuf,
            /// Cause.
            source: std::io::Error,
        },
        /// The rpm writer failed.
        #[error("cannot write the rpm: {0}")]
        Rpm(String),
        /// Signing failed.
        #[error("{0}")]
        Sign(String),
    }

    impl PackError {
        pub(crate) fn io(path: &Path, source: std::io::Error) -> PackError {
            PackError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }

    /// The build timestamp: `SOURCE_DATE_EPOCH` if set, else the newest modification time of
    /// the spec and its sources, so the same inputs always give the same bytes.
    pub fn source_date_epoch(spec: &Spec) -> Result<u64, PackError> {
        if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
            return v.trim().parse().map_err(|_| {
                PackError::Spec(format!(
                    "SOURCE_DATE_EPOCH={v:?} is not a number of seconds since 1970"
                ))
            });
        }
        let mut newest = 0;
        let mut visit = |p: &Path| -> Result<(), PackError> {
            let m = std::fs::metadata(p).map_err(|e| PackError::io(p, e))?;
            let t = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
                .unwrap_or(0);
            newest = newest.max(t);
            Ok(())
        };
        visit(&spec.path)?;
        for f in &spec.files {
            visit(&f.src)?;
        }
        Ok(newest)
    }

    /// Give a finished package the usual 0644 mode (temporary files start as 0600) and move it
    /// to its final name.
    pub(crate) fn persist(tmp: tempfile::NamedTempFile, dest: &Path) -> Result<(), PackError> {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| PackError::io(dest, e))?;
        tmp.persist(dest)
            .map_err(|e| PackError::io(dest, e.error))?;
        Ok(())
    }

    /// Build every requested format of one spec into `out_dir`; returns the files written.
    pub fn pack(
        spec: &Spec,
        opts: &PackOptions,
        out_dir: &Path,
    ) -> Result<Vec<PathBuf>, PackError> {
        write_all(opts, out_dir, |format| {
            plan::service_plan(spec, format, opts.epoch)
        })
    }

    /// Build every requested format of the agent's own package into `out_dir`; returns the
    /// files written. `opts.sign_key` signs the .rpm as for services.
    pub fn pack_agent(
        pkg: &crate::agent::AgentPackage,
        opts: &PackOptions,
        out_dir: &Path,
    ) -> Result<Vec<PathBuf>, PackError> {
        write_all(opts, out_dir, |format| {
            crate::agent::agent_plan(pkg, format, opts.epoch)
        })
    }

    /// Build every requested format of the repository's keyring package into `out_dir`;
    /// returns the files written.
    pub fn pack_keyring(
        k: &crate::keyring::Keyring,
        opts: &PackOptions,
        out_dir: &Path,
    ) -> Result<Vec<PathBuf>, PackError> {
        write_all(opts, out_dir, |format| {
            crate::keyring::keyring_plan(k, format, opts.epoch)
        })
    }

    /// Plans and writes each of `opts.formats` into `out_dir` (created if missing).
    fn write_all(
        opts: &PackOptions,
        out_dir: &Path,
        plan_for: impl Fn(Format) -> Result<plan::Plan, PackError>,
    ) -> Result<Vec<PathBuf>, PackError> {
        std::fs::create_dir_all(out_dir).map_err(|e| PackError::io(out_dir, e))?;
        let mut written = Vec::new();
        for format in &opts.formats {
            written.push(write(&plan_for(*format)?, *format, opts, out_dir)?);
        }
        Ok(written)
    }

    /// Write one planned package in `format` into `out_dir` (which must exist).
    pub(crate) fn write(
        plan: &plan::Plan,
        format: Format,
        opts: &PackOptions,
        out_dir: &Path,
    ) -> Result<PathBuf, PackError> {
        match format {
            Format::Deb => crate::deb::write(plan, opts, out_dir),
            Format::Rpm => crate::rpm::write(plan, opts, out_dir),
        }
    }
}
