//! The example service in tests: build `foo` packages from docs/examples/foo.yaml with the real
//! `food` daemon, and find the workspace binaries that tests copy into hosts.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use keepup_packager::plan::Format;
use keepup_packager::spec::Spec;
use keepup_packager::{pack, PackOptions};

use crate::host::workspace_root;

/// The directory cargo builds into (`CARGO_TARGET_DIR` or `<workspace>/target`).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Path of a workspace binary in the debug profile, built on demand if missing
/// (`food`, `keepup`, `keepup-agent`).
pub fn built_bin(name: &str) -> Result<PathBuf> {
    let path = target_dir().join("debug").join(name);
    if path.exists() {
        return Ok(path);
    }
    let package = match name {
        "food" => "keepup-tests",
        "keepup" => "keepup-deploy",
        "keepup-agent" | "keepup-agent-pass" => "keepup-agent",
        other => bail!("unknown workspace binary {other:?}"),
    };
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "-p", package, "--bin", name])
        .current_dir(workspace_root())
        .status()
        .context("running cargo build")?;
    if !status.success() || !path.exists() {
        bail!("could not build {name}: run `cargo build --workspace --bins` (tests/run.sh does)");
    }
    Ok(path)
}

/// Build the example spec at `version` (release 1) with the real `food` daemon into
/// `out/dist/`: `foo_<version>-1_amd64.deb` and `foo-<version>-1.x86_64.rpm`. `edit` rewrites
/// the spec text first (e.g. to shorten timers or add daemon flags). Returns the files.
pub fn build_example(
    out: &Path,
    version: &str,
    edit: impl Fn(String) -> String,
) -> Result<Vec<PathBuf>> {
    build_example_signed(out, version, None, edit)
}

/// [`build_example`] with the .rpm signed by the armored secret key `sign_key` (a repository
/// accepts only rpms signed with its own key, see [`crate::testkit::key_in`]).
pub fn build_example_signed(
    out: &Path,
    version: &str,
    sign_key: Option<&Path>,
    edit: impl Fn(String) -> String,
) -> Result<Vec<PathBuf>> {
    let src = workspace_root().join("docs/examples");
    let dir = out.join(format!("spec-{version}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(src.join("foo.conf"), dir.join("foo.conf"))?;
    let food = built_bin("food")?;
    let text = std::fs::read_to_string(src.join("foo.yaml"))?
        .replace("version: 1.0.0", &format!("version: {version}"))
        .replace("../../target/release/food", &food.to_string_lossy());
    let path = dir.join("foo.yaml");
    std::fs::write(&path, edit(text))?;
    let spec = Spec::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let opts = PackOptions {
        formats: vec![Format::Deb, Format::Rpm],
        compression: None,
        epoch: 1_700_000_000,
        sign_key: sign_key.map(Path::to_path_buf),
    };
    Ok(pack(&spec, &opts, &out.join("dist"))?)
}
