//! Builds the Debian 12 host image that fleet tests run as containers, without any image
//! registry: `debootstrap` a minbase rootfs, finish it in a chroot (`tests/image/finish.sh`),
//! and `docker import` it as `keepup-host:<tag>`, where the tag hashes the recipe so the image
//! is rebuilt only when the recipe changes.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

/// Repository name of the host image (the tag is the recipe hash).
pub const IMAGE_NAME: &str = "keepup-host";

/// Bump to force a rebuild when the build steps in this file change meaningfully.
const RECIPE_VERSION: &str = "keepup-host/1 bookworm minbase";
const SUITE: &str = "bookworm";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Environment variable that overrides the Debian mirror debootstrap uses.
pub const MIRROR_ENV: &str = "KEEPUP_DEBIAN_MIRROR";
const PACKAGES_TXT: &str = include_str!("../image/packages.txt");
const FINISH_SH: &str = include_str!("../image/finish.sh");
/// Commands every host must have; checked in a container of the freshly imported image.
const REQUIRED_TOOLS: &[&str] = &[
    "/usr/sbin/useradd",
    "setpriv",
    "pkill",
    "ps",
    "dpkg",
    "rpm",
    "curl",
    "nc",
];

/// What the host image is made of; its hash is the image tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    /// Packages passed to `debootstrap --include`.
    pub packages: Vec<String>,
    /// Shell script run in the rootfs (chroot) after debootstrap.
    pub script: String,
    /// Version string of the build steps themselves.
    pub version: String,
}

impl Recipe {
    /// The recipe in `tests/image/` (compiled in).
    pub fn standard() -> Recipe {
        Recipe {
            packages: parse_packages(PACKAGES_TXT),
            script: FINISH_SH.to_string(),
            version: RECIPE_VERSION.to_string(),
        }
    }

    /// Image tag: the first 12 hex digits of the SHA-256 of version, packages and script.
    pub fn tag(&self) -> String {
        let mut h = Sha256::new();
        for part in [&self.version, &self.packages.join("\n"), &self.script] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        hex::encode(h.finalize())[..12].to_string()
    }

    /// Full image reference, e.g. `keepup-host:3f2a9c01d4e5`.
    pub fn reference(&self) -> String {
        format!("{IMAGE_NAME}:{}", self.tag())
    }
}

/// Parses a package list: one name per line, `#` comments and blank lines ignored.
pub fn parse_packages(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Returns the host image reference (e.g. `keepup-host:3f2a9c01d4e5`), building the image
/// first if Docker does not have it. Concurrent callers (also in other processes) wait for a
/// single build.
pub fn host_image() -> Result<String> {
    let recipe = Recipe::standard();
    let reference = recipe.reference();
    if image_exists(&reference)? {
        return Ok(reference);
    }
    let _lock = lock_builds()?;
    if image_exists(&reference)? {
        return Ok(reference);
    }
    build(&recipe, &reference)?;
    Ok(reference)
}

fn image_exists(reference: &str) -> Result<bool> {
    let status = Command::new("docker")
        .args(["image", "inspect", reference])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match status {
        Ok(s) => Ok(s.success()),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            bail!("docker CLI not found: install Docker (apt-get install docker.io) and start it")
        }
        Err(e) => Err(e).context("running `docker image inspect`"),
    }
}

/// Takes an exclusive flock shared by every process that may build the image.
fn lock_builds() -> Result<Flock<File>> {
    let path = std::env::temp_dir().join("keepup-host-image.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((file, _)) => {
            eprintln!("waiting for another process building the host image...");
            Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| anyhow!("locking {}: {e}", path.display()))
        }
    }
}

fn build(recipe: &Recipe, reference: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("building the host image {reference} needs root (debootstrap, chroot): run the tests as root");
    }
    let debootstrap = find_tool("debootstrap")
        .ok_or_else(|| anyhow!("debootstrap not found: apt-get install debootstrap"))?;
    let mirror = std::env::var(MIRROR_ENV).unwrap_or_else(|_| DEFAULT_MIRROR.to_string());
    eprintln!("building host image {reference} (debootstrap, ~1 min)...");
    let started = Instant::now();

    let work = WorkDir::new()?;
    let rootfs = work.path().join("rootfs");
    let log_path = work.path().join("debootstrap.log");
    let log = File::create(&log_path)?;
    let status = Command::new(&debootstrap)
        .arg("--variant=minbase")
        .arg(format!("--include={}", recipe.packages.join(",")))
        .args([SUITE, path_str(&rootfs)?, &mirror])
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("running debootstrap")?;
    if !status.success() {
        bail!(
            "debootstrap failed ({status}); last lines of its log:\n{}\n\
             Check that {mirror} is reachable, or set {MIRROR_ENV} to a Debian mirror that is.",
            tail(&log_path, 25)
        );
    }

    let mut chroot = Command::new("chroot")
        .args([path_str(&rootfs)?, "/bin/sh", "-s"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C.UTF-8")
        .stdin(Stdio::piped())
        .spawn()
        .context("running chroot (is coreutils installed?)")?;
    chroot
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(recipe.script.as_bytes())?;
    let status = chroot.wait()?;
    if !status.success() {
        bail!("tests/image/finish.sh failed in the new rootfs ({status}); see its output above");
    }

    import(&rootfs, reference, &recipe.version)?;
    if let Err(e) = check_tools(reference) {
        let _ = Command::new("docker")
            .args(["image", "rm", reference])
            .output();
        return Err(e);
    }
    eprintln!(
        "built host image {reference} in {} s",
        started.elapsed().as_secs()
    );
    Ok(())
}

/// `tar -C rootfs -c . | docker import - reference`, with a default environment and command.
fn import(rootfs: &Path, reference: &str, version: &str) -> Result<()> {
    let mut tar = Command::new("tar")
        .args(["-C", path_str(rootfs)?, "--numeric-owner", "-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("running tar")?;
    let output = Command::new("docker")
        .args([
            "import",
            "--change",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            "ENV LANG=C.UTF-8",
            "--change",
            r#"CMD ["sleep", "infinity"]"#,
            "--change",
            &format!("LABEL org.keepup.recipe=\"{version}\""),
            "-",
            reference,
        ])
        .stdin(tar.stdout.take().expect("piped stdout"))
        .output()
        .context("running docker import")?;
    let tar_status = tar.wait()?;
    if !tar_status.success() || !output.status.success() {
        bail!(
            "importing the rootfs failed (tar: {tar_status}, docker import: {}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Runs a throwaway container of the new image to check that the required tools exist.
fn check_tools(reference: &str) -> Result<()> {
    let script = REQUIRED_TOOLS
        .iter()
        .map(|t| format!("command -v {t} >/dev/null || echo missing: {t}"))
        .collect::<Vec<_>>()
        .join("; ");
    let out = Command::new("docker")
        .args(["run", "--rm", "--pull", "never", "--network", "none"])
        .args([reference, "sh", "-c", &script])
        .output()
        .context("running docker run to check the new image")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.trim().is_empty() {
        bail!(
            "the new image {reference} lacks required tools ({}): {} {}\n\
             Add the missing packages to tests/image/packages.txt.",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file());
    found
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", p.display()))
}

fn tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    let _ = File::open(path).and_then(|mut f| f.read_to_string(&mut text));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Temporary build directory. On drop it first unmounts anything debootstrap left mounted
/// inside (so removing it can never reach into /dev, /proc or /sys), then deletes it.
struct WorkDir(Option<tempfile::TempDir>);

impl WorkDir {
    fn new() -> Result<WorkDir> {
        let dir = tempfile::Builder::new()
            .prefix("keepup-host-")
            .tempdir()
            .context("creating a temporary build directory")?;
        Ok(WorkDir(Some(dir)))
    }

    fn path(&self) -> &Path {
        self.0.as_ref().expect("present until drop").path()
    }
}

/// Mount points strictly inside `dir`, deepest first.
fn mounts_inside(dir: &Path) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    mounts
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let dir = self.0.take().expect("present until drop");
        for m in mounts_inside(dir.path()) {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
        if mounts_inside(dir.path()).is_empty() {
            let _ = dir.close();
        } else {
            let kept = dir.keep();
            eprintln!(
                "warning: left {} in place: it still has mounts inside",
                kept.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_list_parsing() {
        let p = parse_packages("# c\nprocps\n\n  rpm  # why\n");
        assert_eq!(p, ["procps", "rpm"]);
    }

    #[test]
    fn standard_recipe_has_the_required_packages() {
        let r = Recipe::standard();
        for p in [
            "procps",
            "rpm",
            "curl",
            "netcat-openbsd",
            "iproute2",
            "gnupg",
        ] {
            assert!(r.packages.iter().any(|x| x == p), "{p} missing");
        }
    }

    #[test]
    fn work_dir_unmounts_before_deleting() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("keep-me"), "x").unwrap();
        let work = WorkDir::new().unwrap();
        let inner = work.path().join("rootfs/dev");
        fs::create_dir_all(&inner).unwrap();
        let mounted = Command::new("mount")
            .args([
                "--bind",
                path_str(outside.path()).unwrap(),
                path_str(&inner).unwrap(),
            ])
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipping: cannot bind-mount here (needs root)");
            return;
        }
        let root = work.path().to_path_buf();
        drop(work);
        assert!(!root.exists(), "work dir removed");
        assert!(
            outside.path().join("keep-me").exists(),
            "mounted content untouched"
        );
    }
}
