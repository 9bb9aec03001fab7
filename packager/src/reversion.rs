//! Re-versioning an existing package: the same payload and maintainer scripts under another
//! version. This is how a rollback is published: the old version's contents with a version
//! newer than the current one, so every package manager sees an upgrade, never a downgrade.
//!
//! For a `.deb` only the `Version` field of `control` changes (the data member is copied byte
//! for byte). For an `.rpm` the header's version, release and self-provide change, the payload
//! is copied byte for byte, and the package is signed again.

use std::io::{Read, Write};
use std::path::Path;

/// Why re-versioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ReversionError {
    /// The input is not a package this module can read.
    #[error("cannot re-version the package: {0}")]
    Bad(String),
    /// The rpm library failed.
    #[error("cannot re-version the rpm: {0}")]
    Rpm(#[from] ::rpm::Error),
    /// I/O on in-memory data or the key file.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn bad(s: impl Into<String>) -> ReversionError {
    ReversionError::Bad(s.into())
}

/// A `.deb` (bytes) with its control `Version` replaced by `version`.
pub fn deb(bytes: &[u8], version: &str) -> Result<Vec<u8>, ReversionError> {
    let mut archive = ar::Archive::new(bytes);
    let mut out = ar::Builder::new(Vec::new());
    let mut found = false;
    while let Some(entry) = archive.next_entry() {
        let mut entry = entry.map_err(|e| bad(format!("ar: {e}")))?;
        let header = entry.header().clone();
        let name = String::from_utf8_lossy(header.identifier()).to_string();
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        if name.starts_with("control.tar") {
            data = rewrite_control(&name, &data, version)?;
            found = true;
        }
        let mut h = ar::Header::new(header.identifier().to_vec(), data.len() as u64);
        h.set_mtime(header.mtime());
        h.set_uid(header.uid());
        h.set_gid(header.gid());
        h.set_mode(header.mode());
        out.append(&h, &data[..])?;
    }
    if !found {
        return Err(bad("no control.tar member"));
    }
    Ok(out.into_inner()?)
}

fn rewrite_control(member: &str, data: &[u8], version: &str) -> Result<Vec<u8>, ReversionError> {
    let mut raw = Vec::new();
    if member.ends_with(".xz") {
        liblzma::read::XzDecoder::new(data).read_to_end(&mut raw)?;
    } else if member.ends_with(".zst") {
        zstd::Decoder::new(data)?.read_to_end(&mut raw)?;
    } else if member.ends_with(".gz") {
        flate2::read::GzDecoder::new(data).read_to_end(&mut raw)?;
    } else {
        raw = data.to_vec();
    }
    let mut tar_in = tar::Archive::new(&raw[..]);
    let mut tar_out = tar::Builder::new(Vec::new());
    for entry in tar_in.entries()? {
        let mut entry = entry?;
        let mut header = entry.header().clone();
        let path = entry.path()?.to_string_lossy().to_string();
        let mut content = Vec::new();
        entry.read_to_end(&mut content)?;
        if path.trim_start_matches("./") == "control" {
            let text = String::from_utf8(content).map_err(|_| bad("control is not UTF-8"))?;
            let mut replaced = false;
            let lines: Vec<String> = text
                .lines()
                .map(|l| {
                    if l.starts_with("Version:") {
                        replaced = true;
                        format!("Version: {version}")
                    } else {
                        l.to_string()
                    }
                })
                .collect();
            if !replaced {
                return Err(bad("control has no Version field"));
            }
            content = (lines.join("\n") + "\n").into_bytes();
            header.set_size(content.len() as u64);
            header.set_cksum();
        }
        tar_out.append(&header, &content[..])?;
    }
    let tarball = tar_out.into_inner()?;
    Ok(if member.ends_with(".xz") {
        let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 6);
        enc.write_all(&tarball)?;
        enc.finish()?
    } else if member.ends_with(".zst") {
        zstd::encode_all(&tarball[..], 3)?
    } else if member.ends_with(".gz") {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&tarball)?;
        enc.finish()?
    } else {
        tarball
    })
}

const RPMTAG_HEADERIMMUTABLE: u32 = 63;
const RPMTAG_VERSION: u32 = 1001;
const RPMTAG_RELEASE: u32 = 1002;
const RPMTAG_PROVIDENAME: u32 = 1047;
const RPMTAG_PROVIDEVERSION: u32 = 1113;

/// An `.rpm` (bytes) with version and release replaced, signed with the armored secret key
/// at `sign_key`.
pub fn rpm(
    bytes: &[u8],
    version: &str,
    release: &str,
    sign_key: &Path,
) -> Result<Vec<u8>, ReversionError> {
    use ::rpm::{HeaderEntry, IndexData, IndexTag};
    let mut pkg = ::rpm::Package::parse(&mut std::io::BufReader::new(bytes))?;
    let name = pkg.metadata.get_name()?.to_string();
    let old_evr = format!(
        "{}-{}",
        pkg.metadata.get_version()?,
        pkg.metadata.get_release()?
    );
    let new_evr = format!("{version}-{release}");
    let entries = pkg.metadata.header.get_all_entries()?;
    let provide_names: Vec<String> = entries
        .iter()
        .find(|(t, _)| *t == RPMTAG_PROVIDENAME)
        .and_then(|(_, d)| match d {
            IndexData::StringArray(v) => Some(v.clone()),
            _ => None,
        })
        .unwrap_or_default();
    let rebuilt: Vec<HeaderEntry> = entries
        .into_iter()
        .filter(|(t, _)| *t != RPMTAG_HEADERIMMUTABLE)
        .map(|(tag, data)| {
            let data = match (tag, data) {
                (RPMTAG_VERSION, _) => IndexData::StringTag(version.to_string()),
                (RPMTAG_RELEASE, _) => IndexData::StringTag(release.to_string()),
                (RPMTAG_PROVIDEVERSION, IndexData::StringArray(v)) => IndexData::StringArray(
                    v.into_iter()
                        .enumerate()
                        .map(|(i, pv)| {
                            let own = provide_names.get(i).is_some_and(|n| n.starts_with(&name));
                            if own && pv.ends_with(&old_evr) {
                                format!("{}{new_evr}", &pv[..pv.len() - old_evr.len()])
                            } else {
                                pv
                            }
                        })
                        .collect(),
                ),
                (_, d) => d,
            };
            HeaderEntry::new(tag, data)
        })
        .collect();
    pkg.metadata.header = ::rpm::Header::from_entries(rebuilt, IndexTag::RPMTAG_HEADERIMMUTABLE);
    pkg.clear_signatures()?;
    let key = std::fs::read(sign_key)?;
    let signer = ::rpm::signature::pgp::Signer::from_asc_bytes(&key)?;
    pkg.sign(signer)?;
    let mut out = Vec::new();
    pkg.write(&mut out)?;
    Ok(out)
}
