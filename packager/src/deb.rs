//! The .deb writer: `ar` of `debian-binary`, `control.tar.*` and `data.tar.*`, as dpkg-deb
//! builds it, streamed so memory stays flat whatever the payload size.
//!
//! The data member is compressed (multi-threaded for zstd) into a temporary file in the
//! output directory while md5sums and Installed-Size are computed on the way; then the
//! control member is built and the three members are joined. The result appears under its
//! final name only when complete (rename), so a failed build leaves no partial package.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};

use crate::plan::{Entry, Kind, Source};
use crate::scripts;
use crate::spec::Spec;
use crate::{Compression, PackError, PackOptions};

/// Write `<name>_<version>-<release>_<arch>.deb` into `out_dir`.
pub fn write(
    spec: &Spec,
    entries: &[Entry],
    opts: &PackOptions,
    out_dir: &Path,
) -> Result<PathBuf, PackError> {
    let file_name = format!(
        "{}_{}_{}.deb",
        spec.name,
        spec.full_version(),
        spec.arch.deb()
    );
    let dest = out_dir.join(&file_name);
    let compression = opts
        .compression
        .unwrap_or(Compression::default_for(crate::plan::Format::Deb));
    let ext = compression.extension();

    // 1. data.tar, streamed into a temporary file.
    let data_tmp =
        tempfile::NamedTempFile::new_in(out_dir).map_err(|e| PackError::io(out_dir, e))?;
    let writer = Compressor::new(
        compression,
        BufWriter::with_capacity(
            1 << 20,
            data_tmp
                .reopen()
                .map_err(|e| PackError::io(data_tmp.path(), e))?,
        ),
    )
    .map_err(|e| PackError::io(data_tmp.path(), e))?;
    let mut tar = tar::Builder::new(writer);
    let mut md5sums = String::new();
    let mut conffiles = String::new();
    let mut installed_kib: u64 = 0;
    let mut has_elf = false;
    for e in entries {
        let rel = format!(".{}", e.path);
        let mut h = header(opts.epoch, e.mode);
        match &e.kind {
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                tar.append_data(&mut h, format!("{rel}/"), io::empty())
                    .map_err(|err| PackError::io(&dest, err))?;
                installed_kib += 1;
            }
            Kind::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                tar.append_link(&mut h, &rel, target)
                    .map_err(|err| PackError::io(&dest, err))?;
                installed_kib += 1;
            }
            Kind::File(src) => {
                let size = e
                    .size()
                    .map_err(|err| PackError::io(Path::new(&e.path), err))?;
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(size);
                let digest = match src {
                    Source::Bytes(b) => {
                        tar.append_data(&mut h, &rel, b.as_slice())
                            .map_err(|err| PackError::io(&dest, err))?;
                        hex::encode(Md5::digest(b))
                    }
                    Source::Disk(p) => {
                        let mut f = File::open(p).map_err(|err| PackError::io(p, err))?;
                        has_elf |= is_elf(&mut f).map_err(|err| PackError::io(p, err))?;
                        let mut reader = Md5Reader {
                            inner: f,
                            md5: Md5::new(),
                        };
                        tar.append_data(&mut h, &rel, &mut reader)
                            .map_err(|err| PackError::io(p, err))?;
                        hex::encode(reader.md5.finalize())
                    }
                };
                installed_kib += size.div_ceil(1024);
                if e.config {
                    conffiles.push_str(&e.path);
                    conffiles.push('\n');
                } else {
                    md5sums.push_str(&format!("{digest}  {}\n", &e.path[1..]));
                }
            }
        }
    }
    let mut data_file = tar
        .into_inner()
        .and_then(Compressor::finish)
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .map_err(|e| PackError::io(data_tmp.path(), e))?;
    data_file
        .flush()
        .map_err(|e| PackError::io(data_tmp.path(), e))?;
    let data_len = data_file
        .metadata()
        .map_err(|e| PackError::io(data_tmp.path(), e))?
        .len();

    // 2. control.tar, small, in memory.
    let scripts = scripts::deb_scripts(spec);
    let mut members: Vec<(&str, u32, Vec<u8>)> = vec![
        (
            "control",
            0o644,
            control(spec, installed_kib, has_elf).into_bytes(),
        ),
        ("md5sums", 0o644, md5sums.into_bytes()),
        ("postinst", 0o755, scripts.postinst.into_bytes()),
        ("postrm", 0o755, scripts.postrm.into_bytes()),
        ("preinst", 0o755, scripts.preinst.into_bytes()),
    ];
    if !conffiles.is_empty() {
        members.push(("conffiles", 0o644, conffiles.into_bytes()));
    }
    members.sort_by(|a, b| a.0.cmp(b.0));
    let mut ctar = tar::Builder::new(
        Compressor::new(compression, Vec::new()).map_err(|e| PackError::io(&dest, e))?,
    );
    let mut h = header(opts.epoch, 0o755);
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    ctar.append_data(&mut h, "./", io::empty())
        .map_err(|e| PackError::io(&dest, e))?;
    for (name, mode, bytes) in &members {
        let mut h = header(opts.epoch, *mode);
        h.set_size(bytes.len() as u64);
        ctar.append_data(&mut h, format!("./{name}"), bytes.as_slice())
            .map_err(|e| PackError::io(&dest, e))?;
    }
    let control_tar = ctar
        .into_inner()
        .and_then(Compressor::finish)
        .map_err(|e| PackError::io(&dest, e))?;

    // 3. The ar archive, written beside the destination and renamed into place.
    let out_tmp =
        tempfile::NamedTempFile::new_in(out_dir).map_err(|e| PackError::io(out_dir, e))?;
    {
        let mut ar = ar::Builder::new(BufWriter::new(out_tmp.as_file()));
        let mut add = |name: String, size: u64, reader: &mut dyn Read| -> io::Result<()> {
            let mut h = ar::Header::new(name.into_bytes(), size);
            h.set_mtime(opts.epoch);
            h.set_mode(0o100644);
            ar.append(&h, reader)
        };
        add("debian-binary".into(), 4, &mut &b"2.0\n"[..]).map_err(|e| PackError::io(&dest, e))?;
        add(
            format!("control.tar{ext}"),
            control_tar.len() as u64,
            &mut control_tar.as_slice(),
        )
        .map_err(|e| PackError::io(&dest, e))?;
        data_file
            .rewind()
            .map_err(|e| PackError::io(data_tmp.path(), e))?;
        add(format!("data.tar{ext}"), data_len, &mut data_file)
            .map_err(|e| PackError::io(&dest, e))?;
        ar.into_inner()
            .and_then(|mut w| w.flush())
            .map_err(|e| PackError::io(&dest, e))?;
    }
    crate::persist(out_tmp, &dest)?;
    Ok(dest)
}

fn header(epoch: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_mtime(epoch);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mode(mode);
    let _ = h.set_username("root");
    let _ = h.set_groupname("root");
    h
}

/// The `control` file.
fn control(spec: &Spec, installed_kib: u64, has_elf: bool) -> String {
    let mut depends: Vec<String> = vec!["procps".into()];
    depends.extend(spec.depends.common.iter().cloned());
    depends.extend(spec.depends.deb.iter().cloned());
    // Compiled programs need the C library; keepup does not compute shlibs, so it adds the
    // floor every Debian binary needs (a spec can list a stricter `libc6 (>= ...)` itself).
    if has_elf && !depends.iter().any(|d| d.starts_with("libc6")) {
        depends.push("libc6".into());
    }
    let mut c = format!(
        "Package: {}\nVersion: {}\nArchitecture: {}\nMaintainer: {}\nInstalled-Size: {}\nPre-Depends: passwd\nDepends: {}\nSection: admin\nPriority: optional\n",
        spec.name,
        spec.full_version(),
        spec.arch.deb(),
        spec.maintainer,
        installed_kib.max(1),
        depends.join(", "),
    );
    if let Some(h) = &spec.homepage {
        c.push_str(&format!("Homepage: {h}\n"));
    }
    c.push_str(&format!("Description: {}\n", spec.summary));
    let long = if spec.description.trim().is_empty() {
        &spec.summary
    } else {
        &spec.description
    };
    for line in long.trim_end().lines() {
        if line.trim().is_empty() {
            c.push_str(" .\n");
        } else {
            c.push_str(&format!(" {line}\n"));
        }
    }
    c
}

/// True when the file starts with the ELF magic; leaves the file at its start.
fn is_elf(f: &mut File) -> io::Result<bool> {
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic)?;
    f.rewind()?;
    Ok(n == 4 && &magic == b"\x7fELF")
}

/// A reader that hashes what passes through it.
struct Md5Reader<R> {
    inner: R,
    md5: Md5,
}

impl<R: Read> Read for Md5Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.md5.update(&buf[..n]);
        Ok(n)
    }
}

/// One of the compressors dpkg understands, behind one `Write`.
pub(crate) enum Compressor<W: Write> {
    Zstd(zstd::Encoder<'static, W>),
    Xz(liblzma::write::XzEncoder<W>),
    Gzip(flate2::write::GzEncoder<W>),
    None(W),
}

impl<W: Write> Compressor<W> {
    pub(crate) fn new(c: Compression, w: W) -> io::Result<Self> {
        Ok(match c {
            Compression::Zstd(level) => {
                let mut e = zstd::Encoder::new(w, level)?;
                // Any worker count >= 1 gives the same bytes, so builds stay reproducible
                // across machines while using every core.
                let threads = std::thread::available_parallelism()
                    .map(|n| n.get() as u32)
                    .unwrap_or(1);
                e.multithread(threads.max(1))?;
                e.include_checksum(true)?;
                Compressor::Zstd(e)
            }
            Compression::Xz(level) => Compressor::Xz(liblzma::write::XzEncoder::new(w, level)),
            Compression::Gzip(level) => Compressor::Gzip(
                flate2::GzBuilder::new()
                    .mtime(0)
                    .write(w, flate2::Compression::new(level)),
            ),
            Compression::None => Compressor::None(w),
        })
    }

    pub(crate) fn finish(self) -> io::Result<W> {
        match self {
            Compressor::Zstd(e) => e.finish(),
            Compressor::Xz(e) => e.finish(),
            Compressor::Gzip(e) => e.finish(),
            Compressor::None(w) => Ok(w),
        }
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::Zstd(e) => e.write(buf),
            Compressor::Xz(e) => e.write(buf),
            Compressor::Gzip(e) => e.write(buf),
            Compressor::None(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::Zstd(e) => e.flush(),
            Compressor::Xz(e) => e.flush(),
            Compressor::Gzip(e) => e.flush(),
            Compressor::None(w) => w.flush(),
        }
    }
}
