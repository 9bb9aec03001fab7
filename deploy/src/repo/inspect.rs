//! Reading packages offered to the repository: a `.deb`'s control stanza (after checking that
//! every member decompresses), an `.rpm`'s name/version/arch (after checking its digests and
//! its signature by the repository key). Also the per-package index fragments the views are
//! assembled from (a Packages stanza; createrepo-style primary/filelists/other entries).

use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};

pub use keepup_deploy::wire::Format;

/// What the repository learns from a package file.
#[derive(Debug)]
pub struct Inspected {
    /// deb or rpm.
    pub format: Format,
    /// Package name.
    pub name: String,
    /// Full version: `[epoch:]version-release`, as the format's own tools print it.
    pub version: String,
    /// Architecture as the format spells it (`amd64`, `x86_64`, `all`, `noarch`).
    pub arch: String,
    /// For a .deb: its control stanza, rebuilt from the parsed fields (no trailing newline).
    pub control: Option<String>,
    /// For an .rpm: its parsed headers (the createrepo entries are made from them).
    pub rpm: Option<rpm::PackageMetadata>,
}

/// Decompress a `.deb` member by its file name suffix. The member is in memory, so the
/// decoders read the slice itself (their `bufread` forms): the `read` forms would each
/// allocate and zero a buffer of their own (32 KiB for gzip) for every member of every package.
pub fn decompressor<'a>(name: &str, data: &'a [u8]) -> Result<Box<dyn Read + 'a>> {
    Ok(if name.ends_with(".xz") {
        Box::new(liblzma::bufread::XzDecoder::new(data))
    } else if name.ends_with(".zst") {
        Box::new(zstd::Decoder::with_buffer(data)?)
    } else if name.ends_with(".gz") {
        Box::new(flate2::bufread::GzDecoder::new(data))
    } else if name.ends_with(".tar") {
        Box::new(data)
    } else {
        bail!("unsupported member {name:?}")
    })
}

/// Check a .deb and read its control stanza.
pub fn inspect_deb(path: &Path, bytes: &[u8]) -> Result<Inspected> {
    let bad = |why: String| anyhow!("{} is not a valid .deb: {why}", path.display());
    if !bytes.starts_with(b"!<arch>\n") {
        return Err(bad("no ar header (is it a .deb at all?)".into()));
    }
    let mut ar = ar::Archive::new(bytes);
    let mut control = None;
    let mut members = Vec::new();
    while let Some(entry) = ar.next_entry() {
        let mut entry = entry.map_err(|e| bad(format!("broken ar archive: {e}")))?;
        let name = String::from_utf8_lossy(entry.header().identifier()).to_string();
        let mut data = Vec::new();
        entry
            .read_to_end(&mut data)
            .map_err(|e| bad(format!("member {name}: {e}")))?;
        if name == "debian-binary" {
            if !data.starts_with(b"2.") {
                return Err(bad("debian-binary is not 2.x".into()));
            }
        } else if name.starts_with("control.tar") || name.starts_with("data.tar") {
            // Read every tar entry to the end: a truncated or corrupt member fails here.
            let mut tar =
                tar::Archive::new(decompressor(&name, &data).map_err(|e| bad(e.to_string()))?);
            for file in tar.entries().map_err(|e| bad(format!("{name}: {e}")))? {
                let mut file = file.map_err(|e| bad(format!("{name}: {e}")))?;
                let fname = file
                    .path()
                    .map(|p| p.to_string_lossy().to_string())
                    .unwrap_or_default();
                if !(name.starts_with("control.tar") && fname.trim_start_matches("./") == "control")
                {
                    // Read to its end (the check), kept nowhere.
                    std::io::copy(&mut file, &mut std::io::sink())
                        .map_err(|e| bad(format!("{name}: {fname}: {e}")))?;
                    continue;
                }
                let mut content = Vec::new();
                file.read_to_end(&mut content)
                    .map_err(|e| bad(format!("{name}: {fname}: {e}")))?;
                {
                    control = Some(
                        String::from_utf8(content)
                            .map_err(|_| bad("control is not UTF-8".into()))?,
                    );
                }
            }
            // The tar ends at its zero blocks, before the compressed stream does: read the
            // rest (padding, then the trailer with the stream's checksum), or a member whose
            // bytes were changed but still decompress would pass unchecked.
            std::io::copy(&mut tar.into_inner(), &mut std::io::sink())
                .map_err(|e| bad(format!("{name}: {e}")))?;
        }
        members.push(name);
    }
    if members.first().map(String::as_str) != Some("debian-binary")
        || !members.iter().any(|m| m.starts_with("data.tar"))
    {
        return Err(bad(format!(
            "members are {members:?}; expected debian-binary, control.tar.*, data.tar.*"
        )));
    }
    let control = control.ok_or_else(|| bad("no control file in control.tar".into()))?;
    let control = rebuild_control(&control).map_err(|why| bad(format!("control: {why}")))?;
    let field = |k: &str| {
        control_field(&control, k).ok_or_else(|| bad(format!("control has no {k} field")))
    };
    let name = field("Package")?;
    let version = field("Version")?;
    let arch = field("Architecture")?;
    check_token(path, "name", &name)?;
    check_token(path, "version", &version)?;
    check_token(path, "architecture", &arch)?;
    Ok(Inspected {
        format: Format::Deb,
        name,
        version,
        arch,
        control: Some(control),
        rpm: None,
    })
}

/// Fields the repository writes into a Packages stanza itself: a control file that carries
/// one could point apt at another file or digest.
const REPOSITORY_FIELDS: [&str; 6] = ["Filename", "Size", "MD5sum", "SHA1", "SHA256", "SHA512"];

/// Parse a control file into its fields and write them again, one `Name: value` line each
/// (continuation lines kept): the only text of the package that reaches the signed Packages.
/// Refuses blank lines (a second stanza), comments, malformed or repeated field names, control
/// characters, and the fields the repository adds ([`REPOSITORY_FIELDS`]).
pub fn rebuild_control(control: &str) -> Result<String, String> {
    let body = control.strip_suffix('\n').unwrap_or(control);
    let mut fields: Vec<(String, String)> = Vec::new();
    for (i, line) in body.split('\n').enumerate() {
        let n = i + 1;
        if line.chars().any(|c| c.is_control() && c != '\t') {
            return Err(format!("line {n} has a control character"));
        }
        if line.trim().is_empty() {
            return Err(format!(
                "line {n} is blank: a control file is one stanza (a blank line would start another in Packages)"
            ));
        }
        if line.starts_with([' ', '\t']) {
            let Some((_, value)) = fields.last_mut() else {
                return Err(format!(
                    "line {n} continues a field, but no field comes before it"
                ));
            };
            value.push('\n');
            value.push_str(line);
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("line {n} is not `Field: value`: {line:?}"));
        };
        if name.is_empty()
            || name.starts_with(['#', '-'])
            || !name.chars().all(|c| c.is_ascii_graphic())
        {
            return Err(format!("line {n}: {name:?} is not a field name"));
        }
        if let Some(f) = REPOSITORY_FIELDS
            .iter()
            .find(|f| f.eq_ignore_ascii_case(name))
        {
            return Err(format!(
                "line {n}: the package sets {f}, which only the repository may write (it says where the file is and what it hashes to); rebuild it without that field"
            ));
        }
        if fields.iter().any(|(k, _)| k.eq_ignore_ascii_case(name)) {
            return Err(format!("line {n}: {name} is given twice"));
        }
        fields.push((name.to_string(), value.trim().to_string()));
    }
    let mut out = String::new();
    for (k, v) in &fields {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v.trim_end());
    }
    Ok(out)
}

/// Names, versions and arches end up in file names and URLs: allow only what dpkg and rpm do.
fn check_token(path: &Path, what: &str, v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && !v.starts_with('.')
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+-~:_^".contains(c));
    if !ok {
        bail!(
            "{}: {what} {v:?} has characters a repository cannot carry",
            path.display()
        );
    }
    Ok(())
}

/// The value of a (single-line) field in a control stanza.
pub fn control_field(control: &str, key: &str) -> Option<String> {
    control.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.eq_ignore_ascii_case(key) && !l.starts_with(' ')).then(|| v.trim().to_string())
    })
}

/// The repository key as the rpm library checks signatures with it (parse it once).
pub fn rpm_verifier(key_asc: &[u8]) -> Result<rpm::signature::pgp::Verifier> {
    rpm::signature::pgp::Verifier::from_asc_bytes(key_asc)
        .context("loading the repository's public key")
}

/// Check an rpm (digests, and a signature by the repository key) and read its identity.
pub fn inspect_rpm(
    path: &Path,
    bytes: &[u8],
    verifier: &rpm::signature::pgp::Verifier,
) -> Result<Inspected> {
    let pkg = rpm::Package::parse(&mut std::io::BufReader::new(bytes))
        .map_err(|e| anyhow!("{} is not a valid .rpm: {e}", path.display()))?;
    // The digests once (header and payload), then the header signatures: what
    // `verify_digests` and `verify_signature` check together, without hashing the payload
    // twice (`verify_signature` checks every digest again). The header signature covers the
    // payload through the payload digest the header carries.
    let corrupt =
        |e: rpm::Error| anyhow!("{} is corrupt (digest check failed: {e})", path.display());
    let digests = pkg.check_digests().map_err(corrupt)?;
    if !digests.has_header_digest() {
        return Err(corrupt(rpm::Error::NoHeaderDigestError));
    }
    digests.result().map_err(corrupt)?;
    let header = pkg.header_bytes().map_err(corrupt)?;
    let signed = pkg.raw_signatures().is_ok_and(|sigs| {
        sigs.iter()
            .any(|sig| rpm::signature::Verifying::verify(verifier, header.as_slice(), sig).is_ok())
    });
    if !signed {
        bail!(
            "{} is not signed by this repository's key; build it with `keepup pack --sign-key KEY` (KEY: the secret key `keepup repo init` stored, in /etc/keepup/keys/ by default) or `rpmsign --addsign`, and publish again",
            path.display()
        );
    }
    let m = &pkg.metadata;
    if m.is_source_package() {
        bail!(
            "{} is a source rpm; publish binary packages",
            path.display()
        );
    }
    let name = m.get_name()?.to_string();
    let epoch = m.get_epoch().unwrap_or(0);
    let ver = m.get_version()?;
    let rel = m.get_release()?;
    let arch = m.get_arch()?.to_string();
    let version = if epoch > 0 {
        format!("{epoch}:{ver}-{rel}")
    } else {
        format!("{ver}-{rel}")
    };
    check_token(path, "name", &name)?;
    check_token(path, "version", &version)?;
    check_token(path, "architecture", &arch)?;
    Ok(Inspected {
        format: Format::Rpm,
        name,
        version,
        arch,
        control: None,
        rpm: Some(pkg.metadata),
    })
}

/// The three createrepo entries (`<package>` elements of primary, filelists, other) of one rpm
/// (its parsed headers, file digest and size), to be listed at `href` (relative to the
/// track's rpm base).
pub fn rpm_fragments(
    meta: &rpm::PackageMetadata,
    sha256: &str,
    size: u64,
    href: &str,
    time_file: u64,
) -> Result<[String; 3]> {
    use rpmrepo_metadata::{
        Checksum, FilelistsXml, OtherXml, Package, PackageOptions, PackageSource, PrimaryXml,
        Repository,
    };
    let pkg = Package::from_package_metadata(
        meta,
        PackageSource {
            checksum: Some(Checksum::Sha256(sha256.to_string())),
            size_package: Some(size),
            time_file,
            location_href: href.to_string(),
            location_base: None,
        },
        PackageOptions::default(),
    )
    .map_err(|e| anyhow!("reading rpm metadata of {href}: {e}"))?;
    let mut repo = Repository::new();
    repo.add_package(pkg);
    let texts = [
        repo.write_metadata_string::<PrimaryXml>(),
        repo.write_metadata_string::<FilelistsXml>(),
        repo.write_metadata_string::<OtherXml>(),
    ];
    let mut out: [String; 3] = Default::default();
    for (i, text) in texts.into_iter().enumerate() {
        let text = text.map_err(|e| anyhow!("writing rpm metadata of {href}: {e}"))?;
        let start = text
            .find("<package")
            .ok_or_else(|| anyhow!("no <package> in the metadata of {href}"))?;
        let end = text
            .rfind("</package>")
            .ok_or_else(|| anyhow!("no </package> in the metadata of {href}"))?
            + "</package>".len();
        out[i] = format!("  {}\n", &text[start..end]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    /// A .deb of one control file and one data file, its tars compressed as `ext` says.
    fn deb(ext: &str, mangle: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
        let tar = |path: &str, body: &[u8]| {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, body).unwrap();
            b.into_inner().unwrap()
        };
        let pack = |raw: Vec<u8>| -> Vec<u8> {
            match ext {
                "gz" => {
                    let mut e = flate2::write::GzEncoder::new(Vec::new(), Default::default());
                    e.write_all(&raw).unwrap();
                    e.finish().unwrap()
                }
                "xz" => {
                    let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
                    e.write_all(&raw).unwrap();
                    e.finish().unwrap()
                }
                _ => {
                    let mut e = zstd::Encoder::new(Vec::new(), 3).unwrap();
                    e.include_checksum(true).unwrap();
                    e.write_all(&raw).unwrap();
                    e.finish().unwrap()
                }
            }
        };
        let control = pack(tar(
            "./control",
            b"Package: foo\nVersion: 1.0-1\nArchitecture: amd64\nDescription: x\n",
        ));
        let mut data = pack(tar("./usr/bin/foo", &[7u8; 3000]));
        mangle(&mut data);
        let mut ar = ar::Builder::new(Vec::new());
        for (name, body) in [
            ("debian-binary".to_string(), b"2.0\n".to_vec()),
            (format!("control.tar.{ext}"), control),
            (format!("data.tar.{ext}"), data),
        ] {
            let h = ar::Header::new(name.into_bytes(), body.len() as u64);
            ar.append(&h, body.as_slice()).unwrap();
        }
        ar.into_inner().unwrap()
    }

    #[test]
    fn a_data_member_whose_checksum_does_not_match_is_refused() {
        let p = Path::new("foo.deb");
        for ext in ["gz", "xz", "zst"] {
            let good = deb(ext, |_| {});
            let i = inspect_deb(p, &good).unwrap_or_else(|e| panic!("{ext}: {e:#}"));
            assert_eq!((i.name.as_str(), i.version.as_str()), ("foo", "1.0-1"));
            // The stream's own checksum, after the tar's end: gzip's CRC-32 (8 bytes from the
            // end), xz's CRC-64 of the block (just before the index), zstd's content checksum
            // (the frame's last 4 bytes).
            let bad = deb(ext, |d| {
                let at = match ext {
                    "gz" => d.len() - 8,
                    "xz" => xz_check_offset(d),
                    _ => d.len() - 1,
                };
                d[at] ^= 0x55;
            });
            let err = inspect_deb(p, &bad).expect_err(ext).to_string();
            assert!(
                err.contains("not a valid .deb") && err.contains("data.tar"),
                "{ext}: {err}"
            );
        }
    }

    /// Where the CRC-64 check of an xz stream's one block starts: the index begins with a
    /// zero byte right after it, and the stream ends with a 12-byte footer whose
    /// backward size says how long the index is.
    fn xz_check_offset(d: &[u8]) -> usize {
        let footer = &d[d.len() - 12..];
        let backward = u32::from_le_bytes(footer[4..8].try_into().unwrap()) as usize;
        let index_len = (backward + 1) * 4;
        d.len() - 12 - index_len - 8
    }

    #[test]
    fn control_is_rebuilt_from_its_fields() {
        let c = "Package: foo\nVersion:  1.0-1 \nDescription: x\n more\n .\n end\n";
        assert_eq!(
            rebuild_control(c).unwrap(),
            "Package: foo\nVersion: 1.0-1\nDescription: x\n more\n .\n end"
        );
    }

    #[test]
    fn control_that_could_steer_packages_is_refused() {
        for (c, why) in [
            ("Package: foo\n\nPackage: evil\n", "line 2 is blank"),
            ("Package: foo\n \n", "line 2 is blank"),
            ("Package: foo\nFilename: pool/x.deb\n", "sets Filename"),
            ("Package: foo\nsha256: 00\n", "sets SHA256"),
            ("Package: foo\nSize: 1\n", "sets Size"),
            ("Package: foo\nMD5sum: 00\n", "sets MD5sum"),
            ("Package: foo\npackage: bar\n", "given twice"),
            (" Package: foo\n", "no field comes before"),
            ("Package foo\n", "not `Field: value`"),
            ("#Package: foo\n", "not a field name"),
            ("Package: foo\rbar\n", "control character"),
        ] {
            let err = rebuild_control(c).unwrap_err();
            assert!(err.contains(why), "{c:?}: {err}");
        }
    }
}
