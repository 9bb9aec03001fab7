//! `keepup pack --agent BINARY`: keepup-agent's own .deb and .rpm (BINARY and the
//! `keepup-agent-pass` beside it, default configuration, systemd unit, cron.d line), planned by
//! `keepup_packager::agent` and written by the same writers as service packages.

use std::io::Read as _;
use std::path::Path;

use anyhow::{bail, Context as _};
use keepup_packager::agent::{AgentPackage, MinSerials, DEFAULT_MAINTAINER, PASS_BINARY_NAME};
use keepup_packager::spec::Arch;
use keepup_packager::{pack_agent, PackOptions};

use crate::PackArgs;

/// Build the agent's packages as `args` asks and print the files written.
pub(crate) fn run(args: &PackArgs) -> anyhow::Result<()> {
    let binary = args.agent.as_deref().expect("dispatched on --agent");
    let (version, release) = match args.version.as_deref() {
        None => (env!("CARGO_PKG_VERSION").to_string(), "1".to_string()),
        Some(v) => match v.rsplit_once('-') {
            Some((v, r)) => (v.to_string(), r.to_string()),
            None => (v.to_string(), "1".to_string()),
        },
    };
    let arch = elf_arch(binary)?;
    let compression = args.checked_compression()?;
    // The agent's child for update passes and reports, from the same build.
    let pass_binary = binary.with_file_name(PASS_BINARY_NAME);
    if !pass_binary.is_file() {
        bail!(
            "{} is missing: keepup-agent runs its update passes and reports in it, so the \
             package ships both (`cargo build --profile agent -p keepup-agent` builds both into \
             the same directory)",
            pass_binary.display()
        );
    }
    if elf_arch(&pass_binary)? != arch {
        bail!(
            "{} and {} are built for different architectures",
            binary.display(),
            pass_binary.display()
        );
    }
    for b in [binary, pass_binary.as_path()] {
        if has_symbols(b).unwrap_or(false) {
            eprintln!(
                "keepup: warning: {} is not stripped (lintian: unstripped-binary-or-object); \
                 ship a release build (`cargo build --profile agent -p keepup-agent` strips it)",
                b.display()
            );
        }
    }
    let pkg = AgentPackage {
        binary: binary.to_path_buf(),
        pass_binary,
        version,
        release,
        arch,
        maintainer: args
            .maintainer
            .clone()
            .unwrap_or_else(|| DEFAULT_MAINTAINER.to_string()),
        ca_file: args.ca_file.clone(),
        min_serials: args
            .min_serials_from
            .as_deref()
            .map(min_serials)
            .transpose()?,
    };
    if let Some(ca) = &pkg.ca_file {
        check_ca_bundle(ca)?;
    }
    let opts = PackOptions {
        formats: crate::formats(&args.format),
        compression,
        epoch: epoch(binary)?,
        sign_key: args.sign_key.clone(),
    };
    eprintln!(
        "packing keepup-agent {}-{} ({}) ...",
        pkg.version,
        pkg.release,
        arch.deb()
    );
    let files = pack_agent(&pkg, &opts, &args.out)
        .with_context(|| format!("packing the agent {}", binary.display()))?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}

/// The serials the repository at `root` has committed: its policy's and each track's.
fn min_serials(root: &Path) -> anyhow::Result<MinSerials> {
    let repo = crate::repo::Repo::read_only(root).context("--min-serials-from")?;
    let mut m = MinSerials {
        fleet: repo.state.fleet.serial,
        ..MinSerials::default()
    };
    for t in &repo.state.tracks {
        m.tracks.insert(t.clone(), repo.track(t)?.serial);
    }
    Ok(m)
}

/// A CA bundle to ship must hold at least one PEM certificate and no private key (the CA's
/// key passed by mistake would be installed world-readable on every host).
fn check_ca_bundle(path: &Path) -> anyhow::Result<()> {
    use rustls::pki_types::pem::{PemObject as _, SectionKind};
    let text = std::fs::read(path).with_context(|| format!("--ca-file {}", path.display()))?;
    let mut certs = 0;
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(&text) {
        let (kind, _) = section.map_err(|e| {
            anyhow::anyhow!("--ca-file {}: not a valid PEM file: {e}", path.display())
        })?;
        match kind {
            SectionKind::Certificate => certs += 1,
            SectionKind::RsaPrivateKey | SectionKind::PrivateKey | SectionKind::EcPrivateKey => {
                bail!(
                    "--ca-file {}: holds a private key: ship only the CA certificate(s), never \
                     a key",
                    path.display()
                )
            }
            _ => {}
        }
    }
    if certs == 0 {
        bail!(
            "--ca-file {}: no certificate in it (expected PEM \"-----BEGIN CERTIFICATE-----\" \
             blocks: the CA that signed the server's certificate)",
            path.display()
        );
    }
    Ok(())
}

/// `SOURCE_DATE_EPOCH`, else the binary's modification time: the same binary gives the same
/// package bytes.
fn epoch(binary: &Path) -> anyhow::Result<u64> {
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds"));
    }
    let modified = std::fs::metadata(binary)
        .and_then(|m| m.modified())
        .with_context(|| format!("reading {}", binary.display()))?;
    Ok(modified
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0))
}

/// The first 64 bytes of an ELF file (its header), or an error saying what the file is not.
fn elf_header(binary: &Path) -> anyhow::Result<[u8; 64]> {
    let mut head = [0u8; 64];
    let mut f = std::fs::File::open(binary)
        .with_context(|| format!("opening the agent binary {}", binary.display()))?;
    let n = f
        .read(&mut head)
        .with_context(|| format!("reading {}", binary.display()))?;
    if n < 64 || &head[..4] != b"\x7fELF" {
        bail!(
            "{} is not an ELF program; pass the keepup-agent binary \
             (cargo build --profile agent -p keepup-agent: target/agent/keepup-agent)",
            binary.display()
        );
    }
    Ok(head)
}

/// The package architecture from the ELF header's `e_machine` (little-endian 64-bit only).
fn elf_arch(binary: &Path) -> anyhow::Result<Arch> {
    let head = elf_header(binary)?;
    if head[4] != 2 || head[5] != 1 {
        bail!(
            "{} is not a 64-bit little-endian program; keepup packages amd64 and arm64",
            binary.display()
        );
    }
    match u16::from_le_bytes([head[18], head[19]]) {
        0x3e => Ok(Arch::Amd64),
        0xb7 => Ok(Arch::Arm64),
        other => bail!(
            "{}: ELF machine {other:#x} is neither x86-64 nor aarch64",
            binary.display()
        ),
    }
}

/// Whether the ELF file still has a symbol table (`.symtab`), i.e. is not stripped.
fn has_symbols(binary: &Path) -> anyhow::Result<bool> {
    let head = elf_header(binary)?;
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let shoff = u64::from_le_bytes(head[40..48].try_into().expect("8 bytes"));
    let (shentsize, shnum) = (u16_at(&head, 58) as u64, u16_at(&head, 60) as u64);
    if shoff == 0 || shentsize < 64 {
        return Ok(false);
    }
    let data = std::fs::read(binary)?;
    let table = data
        .get(shoff as usize..(shoff + shentsize * shnum) as usize)
        .context("section headers past the end of the file")?;
    // SHT_SYMTAB = 2: present in unstripped programs, removed by strip.
    Ok(table
        .chunks(shentsize as usize)
        .any(|sh| u32_at(sh, 4) == 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_bundles_need_a_certificate_and_no_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        let e = check_ca_bundle(&p).unwrap_err();
        assert!(format!("{e:#}").contains("--ca-file"), "{e:#}");
        std::fs::write(&p, "nothing\n").unwrap();
        let e = check_ca_bundle(&p).unwrap_err().to_string();
        assert!(e.contains("no certificate in it"), "{e}");
        // Any base64 will do for the PEM layer.
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        std::fs::write(&p, cert).unwrap();
        check_ca_bundle(&p).unwrap();
        let key = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n";
        std::fs::write(&p, format!("{cert}{key}")).unwrap();
        let e = check_ca_bundle(&p).unwrap_err().to_string();
        assert!(e.contains("holds a private key"), "{e}");
    }

    #[test]
    fn the_running_test_binary_is_an_elf_of_this_host() {
        let me = std::env::current_exe().unwrap();
        let arch = elf_arch(&me).unwrap();
        let expected = if cfg!(target_arch = "aarch64") {
            Arch::Arm64
        } else {
            Arch::Amd64
        };
        assert_eq!(arch, expected);
        // Test binaries keep their symbols.
        assert!(has_symbols(&me).unwrap());
    }

    #[test]
    fn a_script_is_refused_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keepup-agent");
        std::fs::write(&p, "#!/bin/sh\necho hi\n").unwrap();
        let e = elf_arch(&p).unwrap_err().to_string();
        assert!(e.contains("not an ELF program"), "{e}");
    }
}
