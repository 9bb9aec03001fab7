//! keepup-agent's own packages for tests and the demo: built once per agent build with the
//! real `keepup pack --agent`, from a stripped copy of the workspace's `keepup-agent`, and
//! cached next to the binaries.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use keepup_packager::plan::Format;
use nix::fcntl::{Flock, FlockArg};

use crate::example::built_bin;

/// The package build date (`SOURCE_DATE_EPOCH`): the same binary gives the same bytes.
const EPOCH: &str = "1700000000";

/// The agent's package in `format` at the workspace version (release 1), copied into `out`;
/// returns its path there. Panics with the reason if it cannot be built.
pub fn agent_package(out: &Path, format: Format) -> PathBuf {
    agent_package_version(out, format, env!("CARGO_PKG_VERSION"))
        .unwrap_or_else(|e| panic!("building keepup-agent's package: {e:#}"))
}

/// Like [`agent_package`], at `version` (`V` or `V-RELEASE`), e.g. a second version to test
/// upgrades.
pub fn agent_package_version(out: &Path, format: Format, version: &str) -> Result<PathBuf> {
    let dir = cached_build(version)?;
    let name = match format {
        Format::Deb => ".deb",
        Format::Rpm => ".rpm",
    };
    let built = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with(name))
        .ok_or_else(|| anyhow!("no {name} in {}", dir.display()))?;
    std::fs::create_dir_all(out)?;
    let dest = out.join(built.file_name().expect("a file name"));
    std::fs::copy(&built, &dest)
        .with_context(|| format!("copying {} to {}", built.display(), dest.display()))?;
    Ok(dest)
}

/// Both formats at `version`, built into `<target>/debug/keepup-agent-packages/<key>/`, where
/// the key names the agent and keepup builds (size and mtime) and the version.
fn cached_build(version: &str) -> Result<PathBuf> {
    let agent = built_bin("keepup-agent")?;
    let pass = built_bin("keepup-agent-pass")?;
    let keepup = built_bin("keepup")?;
    let stamp = |p: &Path| -> Result<String> {
        let m = std::fs::metadata(p)?;
        let t = m.modified()?.duration_since(std::time::UNIX_EPOCH)?;
        Ok(format!("{}:{}.{}", m.len(), t.as_secs(), t.subsec_nanos()))
    };
    let key = crate::sha256_hex(&format!(
        "{}\n{}\n{}\n{version}",
        stamp(&agent)?,
        stamp(&pass)?,
        stamp(&keepup)?
    ));
    let root = agent
        .parent()
        .expect("binaries live in a directory")
        .join("keepup-agent-packages");
    let dir = root.join(&key[..16]);
    if dir.is_dir() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&root)?;
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join(".lock"))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow!("locking {}: {e}", root.display()))?;
    if dir.is_dir() {
        return Ok(dir);
    }
    let work = tempfile::tempdir_in(&root)?;
    // Stripped copies, as a release build ships them: smaller and quicker to compress. The
    // agent's keepup-agent-pass goes beside it, where `keepup pack --agent` finds it.
    let binary = work.path().join("keepup-agent");
    for (from, to) in [
        (&agent, binary.clone()),
        (&pass, work.path().join("keepup-agent-pass")),
    ] {
        std::fs::copy(from, &to)?;
        let stripped = Command::new("strip").arg(&to).status();
        if !matches!(stripped, Ok(s) if s.success()) {
            eprintln!("agent_pkg: `strip` failed or is missing (apt-get install binutils); packing the unstripped agent");
        }
    }
    let out = Command::new(&keepup)
        .args(["pack", "--agent"])
        .arg(&binary)
        .arg("--version")
        .arg(version)
        .arg("--out")
        .arg(work.path().join("dist"))
        .env("SOURCE_DATE_EPOCH", EPOCH)
        .output()
        .context("running keepup pack --agent")?;
    if !out.status.success() {
        bail!(
            "keepup pack --agent failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::rename(work.path().join("dist"), &dir)?;
    Ok(dir)
}
