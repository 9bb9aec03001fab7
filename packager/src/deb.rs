//! The .deb writer: `ar` of `debian-binary`, `control.tar.*` and `data.tar.*`, as dpkg-deb
//! builds it, streamed so memory stays flat whatever the payload size.
//!
//! First the md5sums are computed, on every core, so the control member is complete before
//! the data member is written; then the data member is streamed through the compressor
//! (multi-threaded for zstd) straight into the package, and its size is patched into its
//! `ar` header afterwards. The package is written under a temporary name and renamed into
//! place only when complete, so a failed build leaves no partial package.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use md5::{Digest, Md5};

use crate::plan::{Entry, Info, Kind, Plan, Source};
use crate::{Compression, PackError, PackOptions};

/// Write `<name>_<version>-<release>_<arch>.deb` into `out_dir`.
pub fn write(plan: &Plan, opts: &PackOptions, out_dir: &Path) -> Result<PathBuf, PackError> {
    let (spec, entries) = (&plan.info, &plan.entries[..]);
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

    // 1. md5sums, conffiles, Installed-Size and the libc check, before any data is written.
    let digests = md5_all(entries)?;
    let mut md5sums = String::new();
    let mut conffiles = String::new();
    let mut installed_kib: u64 = 0;
    let mut has_elf = false;
    for (e, digest) in entries.iter().zip(&digests) {
        match &e.kind {
            Kind::Dir | Kind::Symlink(_) => installed_kib += 1,
            Kind::File(src) => {
                let size = e
                    .size()
                    .map_err(|err| PackError::io(Path::new(&e.path), err))?;
                installed_kib += size.div_ceil(1024);
                if let Source::Disk(p) = src {
                    has_elf |= is_elf(p).map_err(|err| PackError::io(p, err))?;
                }
                if e.config {
                    conffiles.push_str(&e.path);
                    conffiles.push('\n');
                } else {
                    md5sums.push_str(&format!("{digest}  {}\n", &e.path[1..]));
                }
            }
        }
    }

    // 2. control.tar, small, in memory.
    let mut members: Vec<(&str, u32, Vec<u8>)> = vec![
        (
            "control",
            0o644,
            control(spec, installed_kib, has_elf).into_bytes(),
        ),
        ("md5sums", 0o644, md5sums.into_bytes()),
    ];
    let s = &plan.scripts;
    for (name, body) in [
        ("preinst", &s.pre_install),
        ("postinst", &s.post_install),
        ("prerm", &s.pre_remove),
        ("postrm", &s.post_remove),
    ] {
        if let Some(body) = body {
            members.push((name, 0o755, body.clone().into_bytes()));
        }
    }
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

    // 3. The package: ar magic, debian-binary, control, then data streamed in place.
    let out_tmp =
        tempfile::NamedTempFile::new_in(out_dir).map_err(|e| PackError::io(out_dir, e))?;
    let io_err = |e| PackError::io(&dest, e);
    let handle = out_tmp.reopen().map_err(io_err)?;
    let mut out = BufWriter::with_capacity(1 << 20, handle);
    out.write_all(b"!<arch>\n").map_err(io_err)?;
    ar_member(&mut out, "debian-binary", opts.epoch, b"2.0\n").map_err(io_err)?;
    ar_member(
        &mut out,
        &format!("control.tar{ext}"),
        opts.epoch,
        &control_tar,
    )
    .map_err(io_err)?;
    let data_header_at = 8 + 60 + 4 + 60 + control_tar.len().next_multiple_of(2) as u64;
    out.write_all(&ar_header(&format!("data.tar{ext}"), opts.epoch, 0))
        .map_err(io_err)?;
    let counted = Counting { inner: out, len: 0 };
    let mut tar = tar::Builder::new(Compressor::new(compression, counted).map_err(io_err)?);
    for e in entries {
        let rel = format!(".{}", e.path);
        let mut h = header(opts.epoch, e.mode);
        match &e.kind {
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                tar.append_data(&mut h, format!("{rel}/"), io::empty())
                    .map_err(io_err)?;
            }
            Kind::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                tar.append_link(&mut h, &rel, target).map_err(io_err)?;
            }
            Kind::File(src) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(
                    e.size()
                        .map_err(|err| PackError::io(Path::new(&e.path), err))?,
                );
                match src {
                    Source::Bytes(b) => tar
                        .append_data(&mut h, &rel, b.as_slice())
                        .map_err(io_err)?,
                    Source::Disk(p) => {
                        let f = File::open(p).map_err(|err| PackError::io(p, err))?;
                        tar.append_data(&mut h, &rel, f)
                            .map_err(|err| PackError::io(p, err))?;
                    }
                }
            }
        }
    }
    let counted = tar
        .into_inner()
        .and_then(Compressor::finish)
        .map_err(io_err)?;
    let Counting {
        inner: mut out,
        len: data_len,
    } = counted;
    if data_len % 2 == 1 {
        out.write_all(b"\n").map_err(io_err)?;
    }
    let mut file = out.into_inner().map_err(|e| io_err(e.into_error()))?;
    file.seek(SeekFrom::Start(data_header_at)).map_err(io_err)?;
    file.write_all(&ar_header(&format!("data.tar{ext}"), opts.epoch, data_len))
        .map_err(io_err)?;
    file.flush().map_err(io_err)?;
    crate::persist(out_tmp, &dest)?;
    Ok(dest)
}

/// MD5 of every regular file (empty for other entries), computed on all cores.
fn md5_all(entries: &[Entry]) -> Result<Vec<String>, PackError> {
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let work = || -> Result<Vec<(usize, String)>, PackError> {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(e) = entries.get(i) else {
                return Ok(done);
            };
            let digest = match &e.kind {
                Kind::File(Source::Bytes(b)) => hex::encode(Md5::digest(b)),
                Kind::File(Source::Disk(p)) => {
                    let mut f = File::open(p).map_err(|err| PackError::io(p, err))?;
                    let mut md5 = Md5::new();
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        let n = f.read(&mut buf).map_err(|err| PackError::io(p, err))?;
                        if n == 0 {
                            break;
                        }
                        md5.update(&buf[..n]);
                    }
                    hex::encode(md5.finalize())
                }
                _ => String::new(),
            };
            done.push((i, digest));
        }
    };
    let mut digests = vec![String::new(); entries.len()];
    std::thread::scope(|s| -> Result<(), PackError> {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(work)).collect();
        for h in handles {
            for (i, d) in h.join().expect("md5 worker panicked")? {
                digests[i] = d;
            }
        }
        Ok(())
    })?;
    Ok(digests)
}

/// A 60-byte `ar` member header (common format, as dpkg-deb writes it).
fn ar_header(name: &str, mtime: u64, size: u64) -> Vec<u8> {
    let h = format!(
        "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
        name, mtime, 0, 0, "100644", size
    );
    debug_assert_eq!(h.len(), 60);
    h.into_bytes()
}

/// A whole `ar` member: header, data, and the padding byte to an even length.
fn ar_member(out: &mut impl Write, name: &str, mtime: u64, data: &[u8]) -> io::Result<()> {
    out.write_all(&ar_header(name, mtime, data.len() as u64))?;
    out.write_all(data)?;
    if data.len() % 2 == 1 {
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Counts the bytes written through it.
struct Counting<W> {
    inner: W,
    len: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
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
fn control(spec: &Info, installed_kib: u64, has_elf: bool) -> String {
    let mut depends = spec.deb_depends.clone();
    // Compiled programs need the C library; keepup does not compute shlibs, so it adds the
    // floor every Debian binary needs (a spec can list a stricter `libc6 (>= ...)` itself).
    if has_elf && !depends.iter().any(|d| d.starts_with("libc6")) {
        depends.push("libc6".into());
    }
    let mut c = format!(
        "Package: {}\nVersion: {}\nArchitecture: {}\nMaintainer: {}\nInstalled-Size: {}\n",
        spec.name,
        spec.full_version(),
        spec.arch.deb(),
        spec.maintainer,
        installed_kib.max(1),
    );
    for (field, list) in [
        ("Pre-Depends", &spec.deb_pre_depends),
        ("Depends", &depends),
        ("Recommends", &spec.deb_recommends),
    ] {
        if !list.is_empty() {
            c.push_str(&format!("{field}: {}\n", list.join(", ")));
        }
    }
    c.push_str("Section: admin\nPriority: optional\n");
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

/// True when the file starts with the ELF magic.
fn is_elf(p: &Path) -> io::Result<bool> {
    let mut magic = [0u8; 4];
    let n = File::open(p)?.read(&mut magic)?;
    Ok(n == 4 && &magic == b"\x7fELF")
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
