//! The .rpm writer: lead, signature header, header, and a cpio payload, streamed so that
//! memory stays flat whatever the payload size.
//!
//! The payload (cpio "newc", `./`-prefixed names) is compressed into a temporary file in the
//! output directory while each file's SHA-256 and the compressed stream's SHA-256 are computed
//! on the way. Then the header is built from the `rpm` crate's header types (so the binary
//! layout is the crate's, well-tested code), signed when a key is given, and the package is
//! written as lead + signature + header + the payload copied from the temporary file. The
//! `rpm` crate's own `PackageBuilder` keeps the whole compressed payload in memory, which is
//! why the payload is streamed here (see docs/benchmarks.md).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use rpm::signature::Signing;
use rpm::{
    Header, HeaderEntry, IndexData, IndexTag, Lead, PackageMetadata, SignatureHeaderBuilder,
};
use sha2::{Digest, Sha256};

use crate::deb::Compressor;
use crate::plan::{self, Kind, Plan, Source};
use crate::{Compression, PackError, PackOptions};

// File flags and dependency senses, from rpm's rpmfiles.h and rpmds.h.
const RPMFILE_CONFIG: u32 = 1 << 0;
const RPMFILE_DOC: u32 = 1 << 1;
const RPMFILE_NOREPLACE: u32 = 1 << 4;
const RPMSENSE_LESS: u32 = 1 << 1;
const RPMSENSE_GREATER: u32 = 1 << 2;
const RPMSENSE_EQUAL: u32 = 1 << 3;
const RPMSENSE_RPMLIB: u32 = 1 << 24;
const PGPHASHALGO_SHA256: u32 = 8;

/// Write `<name>-<version>-<release>.<arch>.rpm` into `out_dir`.
pub fn write(plan: &Plan, opts: &PackOptions, out_dir: &Path) -> Result<PathBuf, PackError> {
    let (spec, entries) = (&plan.info, &plan.entries[..]);
    let dest = out_dir.join(format!(
        "{}-{}.{}.rpm",
        spec.name,
        spec.full_version(),
        spec.arch.rpm()
    ));
    let rpm_err = |e: rpm::Error| PackError::Rpm(format!("{}: {e}", dest.display()));
    let compression = opts
        .compression
        .unwrap_or(Compression::default_for(crate::plan::Format::Rpm));
    let signer = match &opts.sign_key {
        Some(key) => Some(
            rpm::signature::pgp::Signer::from_asc_file(key).map_err(|e| {
                PackError::Sign(format!(
                    "cannot load the signing key {}: {e}",
                    key.display()
                ))
            })?,
        ),
        None => None,
    };

    // 1. The payload, compressed into a temporary file.
    let payload_tmp =
        tempfile::NamedTempFile::new_in(out_dir).map_err(|e| PackError::io(out_dir, e))?;
    let file = payload_tmp
        .reopen()
        .map_err(|e| PackError::io(payload_tmp.path(), e))?;
    let sink = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
    let compressor = Compressor::new(compression, sink).map_err(|e| PackError::io(&dest, e))?;
    let mut cpio = Cpio::new(compressor);
    let mut digests = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        let name = format!(".{}", e.path);
        let digest = match &e.kind {
            Kind::Dir => {
                cpio.entry(
                    &name,
                    0o040000 | e.mode,
                    ino,
                    2,
                    opts.epoch,
                    0,
                    &mut io::empty(),
                )
                .map_err(|err| PackError::io(&dest, err))?;
                String::new()
            }
            Kind::Symlink(target) => {
                let bytes = target.as_bytes();
                cpio.entry(
                    &name,
                    0o120000 | 0o777,
                    ino,
                    1,
                    opts.epoch,
                    bytes.len() as u64,
                    &mut &bytes[..],
                )
                .map_err(|err| PackError::io(&dest, err))?;
                String::new()
            }
            Kind::File(src) => {
                let size = e
                    .size()
                    .map_err(|err| PackError::io(Path::new(&e.path), err))?;
                let mut hashed = match src {
                    Source::Bytes(b) => HashingReader::new(Box::new(&b[..]) as Box<dyn Read>),
                    Source::Disk(p) => HashingReader::new(Box::new(
                        File::open(p).map_err(|err| PackError::io(p, err))?,
                    )),
                };
                cpio.entry(
                    &name,
                    0o100000 | e.mode,
                    ino,
                    1,
                    opts.epoch,
                    size,
                    &mut hashed,
                )
                .map_err(|err| PackError::io(&dest, err))?;
                if hashed.len != size {
                    return Err(PackError::Spec(format!(
                        "{} changed size while it was being packed",
                        e.path
                    )));
                }
                hex::encode(hashed.sha256.finalize())
            }
        };
        digests.push(digest);
    }
    // Only the compressed payload is digested (PAYLOADSHA256); the optional digest of the
    // uncompressed archive would hash every byte a second time.
    let sink = cpio
        .finish()
        .and_then(Compressor::finish)
        .map_err(|e| PackError::io(&dest, e))?;
    let (payload_len, payload_sha256) = (sink.len, hex::encode(sink.sha256.clone().finalize()));
    let mut payload_file = sink
        .inner
        .into_inner()
        .map_err(|e| PackError::io(payload_tmp.path(), e.into_error()))?;

    // 2. The header.
    let header = Header::<IndexTag>::from_entries(
        header_entries(plan, &digests, compression, opts.epoch, &payload_sha256)?,
        IndexTag::RPMTAG_HEADERIMMUTABLE,
    );
    let mut metadata = PackageMetadata {
        lead: Lead::new(&format!("{}-{}", spec.name, spec.full_version())),
        signature: SignatureHeaderBuilder::new().build().map_err(rpm_err)?,
        header,
    };
    let header_bytes = metadata.header_bytes().map_err(rpm_err)?;

    // 3. The signature header: digests of the header, sizes, and the OpenPGP signature.
    let mut sig = SignatureHeaderBuilder::new()
        .format(rpm::RpmFormat::V4)
        .set_content_length(header_bytes.len() as u64 + payload_len)
        .calculate_digests(&header_bytes);
    if let Some(signer) = &signer {
        let t = rpm::Timestamp::from(opts.epoch as u32);
        let signature = signer.sign(&header_bytes[..], t).map_err(rpm_err)?;
        sig = sig.add_openpgp_signature(signature);
    }
    metadata.signature = sig.build().map_err(rpm_err)?;

    // 4. Lead, signature and header, then the payload.
    let out_tmp =
        tempfile::NamedTempFile::new_in(out_dir).map_err(|e| PackError::io(out_dir, e))?;
    {
        let mut w = BufWriter::new(out_tmp.as_file());
        metadata.write(&mut w).map_err(rpm_err)?;
        payload_file
            .rewind()
            .map_err(|e| PackError::io(payload_tmp.path(), e))?;
        io::copy(&mut payload_file, &mut w).map_err(|e| PackError::io(&dest, e))?;
        w.flush().map_err(|e| PackError::io(&dest, e))?;
    }
    crate::persist(out_tmp, &dest)?;
    Ok(dest)
}

/// Every tag of the main header, in no particular order (the crate sorts them).
#[allow(clippy::too_many_arguments)]
fn header_entries(
    plan: &Plan,
    digests: &[String],
    compression: Compression,
    epoch: u64,
    payload_sha256: &str,
) -> Result<Vec<HeaderEntry>, PackError> {
    let (spec, entries) = (&plan.info, &plan.entries[..]);
    let too_big = || PackError::Spec("the .rpm writer supports payloads up to 4 GiB".into());
    let s = |v: &str| IndexData::StringTag(v.to_string());
    let t = |tag: IndexTag, data: IndexData| HeaderEntry::new(tag as u32, data);
    let evr = spec.full_version();
    let epoch32 = u32::try_from(epoch)
        .map_err(|_| PackError::Spec("SOURCE_DATE_EPOCH is past 2106".into()))?;

    // File list: directory names and base names, as rpm stores them.
    let mut dirnames: Vec<String> = Vec::new();
    let mut dir_index: HashMap<String, u32> = HashMap::new();
    let (mut dirindexes, mut basenames) = (Vec::new(), Vec::new());
    let (mut sizes, mut modes, mut mtimes, mut flags, mut linktos) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut users, mut groups) = (Vec::new(), Vec::new());
    let mut total: u64 = 0;
    for e in entries {
        let (dir, base) = e.path.rsplit_once('/').expect("paths are absolute");
        let dir = format!("{dir}/");
        let next = dirnames.len() as u32;
        let idx = *dir_index.entry(dir.clone()).or_insert_with(|| {
            dirnames.push(dir);
            next
        });
        dirindexes.push(idx);
        basenames.push(base.to_string());
        let (size, mode, link) = match &e.kind {
            Kind::Dir => (4096, 0o040000 | e.mode, String::new()),
            Kind::Symlink(target) => (target.len() as u64, 0o120000 | 0o777, target.clone()),
            Kind::File(_) => (
                e.size()
                    .map_err(|err| PackError::io(Path::new(&e.path), err))?,
                0o100000 | e.mode,
                String::new(),
            ),
        };
        total += size;
        sizes.push(u32::try_from(size).map_err(|_| too_big())?);
        modes.push(mode as u16);
        mtimes.push(epoch32);
        linktos.push(link);
        let mut f = 0;
        if e.config {
            f |= RPMFILE_CONFIG | RPMFILE_NOREPLACE;
        }
        if e.path.starts_with("/usr/share/doc/") {
            f |= RPMFILE_DOC;
        }
        flags.push(f);
        users.push(e.owner.clone());
        groups.push(e.group.clone());
    }
    let n = entries.len();

    // Requires: rpmlib features the package uses, then the spec's dependencies.
    let mut requires: Vec<(String, u32, String)> = vec![
        (
            "rpmlib(CompressedFileNames)".into(),
            RPMSENSE_RPMLIB | RPMSENSE_LESS | RPMSENSE_EQUAL,
            "3.0.4-1".into(),
        ),
        (
            "rpmlib(FileDigests)".into(),
            RPMSENSE_RPMLIB | RPMSENSE_LESS | RPMSENSE_EQUAL,
            "4.6.0-1".into(),
        ),
        (
            "rpmlib(PayloadFilesHavePrefix)".into(),
            RPMSENSE_RPMLIB | RPMSENSE_LESS | RPMSENSE_EQUAL,
            "4.0-1".into(),
        ),
    ];
    match compression {
        Compression::Zstd(_) => requires.push((
            "rpmlib(PayloadIsZstd)".into(),
            RPMSENSE_RPMLIB | RPMSENSE_LESS | RPMSENSE_EQUAL,
            "5.4.18-1".into(),
        )),
        Compression::Xz(_) => requires.push((
            "rpmlib(PayloadIsXz)".into(),
            RPMSENSE_RPMLIB | RPMSENSE_LESS | RPMSENSE_EQUAL,
            "5.2-1".into(),
        )),
        _ => {}
    }
    // No Requires on procps-ng/shadow-utils/util-linux or /bin/sh: every RPM host has them,
    // and a Debian host running rpm with its own database would refuse the package for them.
    for d in &spec.rpm_requires {
        requires.push(dependency(d));
    }

    let (compressor, level) = match compression {
        Compression::Zstd(l) => ("zstd", l.to_string()),
        Compression::Xz(l) => ("xz", l.to_string()),
        Compression::Gzip(l) => ("gzip", l.to_string()),
        Compression::None => ("none", String::new()),
    };
    let description = if spec.description.trim().is_empty() {
        spec.summary.clone()
    } else {
        spec.description.trim_end().to_string()
    };
    let sh = || IndexData::StringArray(vec!["/bin/sh".into()]);

    let mut h = vec![
        t(
            IndexTag::RPMTAG_HEADERI18NTABLE,
            IndexData::StringArray(vec!["C".into()]),
        ),
        t(IndexTag::RPMTAG_NAME, s(&spec.name)),
        t(IndexTag::RPMTAG_VERSION, s(&spec.version)),
        t(IndexTag::RPMTAG_RELEASE, s(&spec.release)),
        t(
            IndexTag::RPMTAG_SUMMARY,
            IndexData::I18NString(vec![spec.summary.clone()]),
        ),
        t(
            IndexTag::RPMTAG_DESCRIPTION,
            IndexData::I18NString(vec![description]),
        ),
        t(IndexTag::RPMTAG_BUILDTIME, IndexData::Int32(vec![epoch32])),
        t(IndexTag::RPMTAG_BUILDHOST, s("keepup")),
        t(
            IndexTag::RPMTAG_SIZE,
            IndexData::Int32(vec![u32::try_from(total).map_err(|_| too_big())?]),
        ),
        t(IndexTag::RPMTAG_VENDOR, s("keepup")),
        t(IndexTag::RPMTAG_LICENSE, s(&spec.license)),
        t(IndexTag::RPMTAG_PACKAGER, s(&spec.maintainer)),
        t(
            IndexTag::RPMTAG_GROUP,
            IndexData::I18NString(vec!["System Environment/Daemons".into()]),
        ),
        t(IndexTag::RPMTAG_OS, s("linux")),
        t(IndexTag::RPMTAG_ARCH, s(spec.arch.rpm())),
        // Its presence is what makes rpm treat the package as binary, not source.
        t(
            IndexTag::RPMTAG_SOURCERPM,
            s(&format!("{}-{evr}.src.rpm", spec.name)),
        ),
        t(IndexTag::RPMTAG_RPMVERSION, s("4.18.0")),
        t(
            IndexTag::RPMTAG_PROVIDENAME,
            IndexData::StringArray(vec![
                spec.name.clone(),
                format!("{}({})", spec.name, isa(spec.arch.rpm())),
            ]),
        ),
        t(
            IndexTag::RPMTAG_PROVIDEFLAGS,
            IndexData::Int32(vec![RPMSENSE_EQUAL, RPMSENSE_EQUAL]),
        ),
        t(
            IndexTag::RPMTAG_PROVIDEVERSION,
            IndexData::StringArray(vec![evr.clone(), evr.clone()]),
        ),
        t(
            IndexTag::RPMTAG_REQUIRENAME,
            IndexData::StringArray(requires.iter().map(|r| r.0.clone()).collect()),
        ),
        t(
            IndexTag::RPMTAG_REQUIREFLAGS,
            IndexData::Int32(requires.iter().map(|r| r.1).collect()),
        ),
        t(
            IndexTag::RPMTAG_REQUIREVERSION,
            IndexData::StringArray(requires.iter().map(|r| r.2.clone()).collect()),
        ),
        t(
            IndexTag::RPMTAG_CHANGELOGTIME,
            IndexData::Int32(vec![epoch32]),
        ),
        t(
            IndexTag::RPMTAG_CHANGELOGNAME,
            IndexData::StringArray(vec![format!("{} - {evr}", spec.maintainer)]),
        ),
        t(
            IndexTag::RPMTAG_CHANGELOGTEXT,
            IndexData::StringArray(vec![plan::changelog_text(spec)]),
        ),
        t(IndexTag::RPMTAG_PAYLOADFORMAT, s("cpio")),
        t(IndexTag::RPMTAG_PAYLOADCOMPRESSOR, s(compressor)),
        t(IndexTag::RPMTAG_PAYLOADFLAGS, s(&level)),
        t(IndexTag::RPMTAG_ENCODING, s("utf-8")),
        t(
            IndexTag::RPMTAG_PAYLOADSHA256,
            IndexData::StringArray(vec![payload_sha256.to_string()]),
        ),
        t(
            IndexTag::RPMTAG_PAYLOADSHA256ALGO,
            IndexData::Int32(vec![PGPHASHALGO_SHA256]),
        ),
    ];
    if let Some(url) = &spec.homepage {
        h.push(t(IndexTag::RPMTAG_URL, s(url)));
    }
    if !spec.rpm_recommends.is_empty() {
        let weak: Vec<_> = spec.rpm_recommends.iter().map(|d| dependency(d)).collect();
        h.extend([
            t(
                IndexTag::RPMTAG_RECOMMENDNAME,
                IndexData::StringArray(weak.iter().map(|r| r.0.clone()).collect()),
            ),
            t(
                IndexTag::RPMTAG_RECOMMENDFLAGS,
                IndexData::Int32(weak.iter().map(|r| r.1).collect()),
            ),
            t(
                IndexTag::RPMTAG_RECOMMENDVERSION,
                IndexData::StringArray(weak.iter().map(|r| r.2.clone()).collect()),
            ),
        ]);
    }
    let sc = &plan.scripts;
    for (body, tag, prog) in [
        (
            &sc.pre_install,
            IndexTag::RPMTAG_PREIN,
            IndexTag::RPMTAG_PREINPROG,
        ),
        (
            &sc.post_install,
            IndexTag::RPMTAG_POSTIN,
            IndexTag::RPMTAG_POSTINPROG,
        ),
        (
            &sc.pre_remove,
            IndexTag::RPMTAG_PREUN,
            IndexTag::RPMTAG_PREUNPROG,
        ),
        (
            &sc.post_remove,
            IndexTag::RPMTAG_POSTUN,
            IndexTag::RPMTAG_POSTUNPROG,
        ),
        (
            &sc.post_trans,
            IndexTag::RPMTAG_POSTTRANS,
            IndexTag::RPMTAG_POSTTRANSPROG,
        ),
    ] {
        if let Some(body) = body {
            // The interpreter is a header tag, not a shebang line.
            let body = body.strip_prefix("#!/bin/sh\n").unwrap_or(body);
            h.push(t(tag, s(body)));
            h.push(t(prog, sh()));
        }
    }
    if n > 0 {
        h.extend([
            t(IndexTag::RPMTAG_FILESIZES, IndexData::Int32(sizes)),
            t(IndexTag::RPMTAG_FILEMODES, IndexData::Int16(modes)),
            t(IndexTag::RPMTAG_FILERDEVS, IndexData::Int16(vec![0; n])),
            t(IndexTag::RPMTAG_FILEMTIMES, IndexData::Int32(mtimes)),
            t(
                IndexTag::RPMTAG_FILEDIGESTS,
                IndexData::StringArray(digests.to_vec()),
            ),
            t(
                IndexTag::RPMTAG_FILELINKTOS,
                IndexData::StringArray(linktos),
            ),
            t(IndexTag::RPMTAG_FILEFLAGS, IndexData::Int32(flags)),
            t(IndexTag::RPMTAG_FILEUSERNAME, IndexData::StringArray(users)),
            t(
                IndexTag::RPMTAG_FILEGROUPNAME,
                IndexData::StringArray(groups),
            ),
            t(
                IndexTag::RPMTAG_FILEVERIFYFLAGS,
                IndexData::Int32(vec![u32::MAX; n]),
            ),
            t(IndexTag::RPMTAG_FILEDEVICES, IndexData::Int32(vec![1; n])),
            t(
                IndexTag::RPMTAG_FILEINODES,
                IndexData::Int32((1..=n as u32).collect()),
            ),
            t(
                IndexTag::RPMTAG_FILELANGS,
                IndexData::StringArray(vec![String::new(); n]),
            ),
            t(IndexTag::RPMTAG_DIRINDEXES, IndexData::Int32(dirindexes)),
            t(
                IndexTag::RPMTAG_BASENAMES,
                IndexData::StringArray(basenames),
            ),
            t(IndexTag::RPMTAG_DIRNAMES, IndexData::StringArray(dirnames)),
            t(
                IndexTag::RPMTAG_FILEDIGESTALGO,
                IndexData::Int32(vec![PGPHASHALGO_SHA256]),
            ),
        ]);
    }
    Ok(h)
}

/// The ISA suffix rpm uses in provides, e.g. `x86-64` for `foo(x86-64)`.
fn isa(arch: &str) -> &str {
    match arch {
        "x86_64" => "x86-64",
        "aarch64" => "aarch-64",
        other => other,
    }
}

/// `name`, `name (>= 1.2)` (Debian style) or `name >= 1.2` to an rpm (name, flags, version).
fn dependency(text: &str) -> (String, u32, String) {
    let cleaned = text.replace(['(', ')'], " ");
    let parts: Vec<&str> = cleaned.split_whitespace().collect();
    if let [name, op, version] = parts.as_slice() {
        let sense = match *op {
            ">=" => RPMSENSE_GREATER | RPMSENSE_EQUAL,
            "<=" => RPMSENSE_LESS | RPMSENSE_EQUAL,
            ">>" | ">" => RPMSENSE_GREATER,
            "<<" | "<" => RPMSENSE_LESS,
            "=" => RPMSENSE_EQUAL,
            _ => return (text.trim().to_string(), 0, String::new()),
        };
        return (name.to_string(), sense, version.to_string());
    }
    (text.trim().to_string(), 0, String::new())
}

/// A cpio "newc" archive writer (the format rpm payloads use).
struct Cpio<W: Write> {
    out: W,
}

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Self {
        Cpio { out }
    }

    #[allow(clippy::too_many_arguments)]
    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        ino: u32,
        nlink: u32,
        mtime: u64,
        size: u64,
        data: &mut dyn Read,
    ) -> io::Result<()> {
        let size32 = u32::try_from(size).map_err(|_| {
            io::Error::other("a file larger than 4 GiB cannot go into a cpio payload")
        })?;
        let namesize = name.len() + 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size32:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, 0, mtime as u32, 0, 0, 0, 0, 0
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(110 + namesize)?;
        let copied = io::copy(&mut data.take(size), &mut self.out)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{name}: expected {size} bytes, read {copied}"),
            ));
        }
        self.pad(size as usize)
    }

    fn pad(&mut self, len: usize) -> io::Result<()> {
        let pad = (4 - len % 4) % 4;
        self.out.write_all(&[0u8; 3][..pad])
    }

    fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 0, 1, 0, 0, &mut io::empty())?;
        Ok(self.out)
    }
}

/// A writer that counts and hashes what passes through it.
struct HashingWriter<W> {
    inner: W,
    sha256: Sha256,
    len: u64,
}

impl<W> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            sha256: Sha256::new(),
            len: 0,
        }
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha256.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that counts and hashes what passes through it.
struct HashingReader<'a> {
    inner: Box<dyn Read + 'a>,
    sha256: Sha256,
    len: u64,
}

impl<'a> HashingReader<'a> {
    fn new(inner: Box<dyn Read + 'a>) -> Self {
        HashingReader {
            inner,
            sha256: Sha256::new(),
            len: 0,
        }
    }
}

impl Read for HashingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha256.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}
