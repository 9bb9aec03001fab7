//! A Debian 12 host with systemd as PID 1, for tests of `supervisor: systemd` services: the
//! image is built like the host image (`debootstrap` minbase plus systemd, `docker import`, no
//! registry) and tagged `keepup-systemd:<recipe hash>`; containers run `/lib/systemd/systemd`
//! with a tmpfs `/run` and the host's cgroup tree mounted read-only (Docker 20.10, cgroup v1),
//! without a network.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};

use crate::host::Exec;

/// Longest a single [`SystemdHost::exec`] may take.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(120);

/// Repository name of the systemd image.
pub const IMAGE_NAME: &str = "keepup-systemd";
const RECIPE: &str = "keepup-systemd/1 bookworm minbase";
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "procps",
    "netcat-openbsd",
];
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// The image reference, building it first if Docker does not have it.
pub fn systemd_image() -> Result<String> {
    let tag = &crate::sha256_hex(&format!("{RECIPE}\n{}", PACKAGES.join(",")))[..12];
    let reference = format!("{IMAGE_NAME}:{tag}");
    if exists(&reference) {
        return Ok(reference);
    }
    let _lock = lock()?;
    if !exists(&reference) {
        build(&reference)?;
    }
    Ok(reference)
}

fn exists(reference: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", reference])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn lock() -> Result<Flock<File>> {
    let path = std::env::temp_dir().join("keepup-systemd-image.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow!("locking {}: {e}", path.display()))
}

fn build(reference: &str) -> Result<()> {
    let mirror = std::env::var(crate::image::MIRROR_ENV).unwrap_or_else(|_| DEFAULT_MIRROR.into());
    eprintln!("building systemd host image {reference} (debootstrap, ~2 min)...");
    let work = tempfile::tempdir()?;
    let rootfs = work.path().join("rootfs");
    let out = Command::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg("bookworm")
        .arg(&rootfs)
        .arg(&mirror)
        .output()
        .context("running debootstrap (apt-get install debootstrap)")?;
    if !out.status.success() {
        bail!(
            "debootstrap failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // No getty on a container console; an empty machine-id is filled in at boot.
    let finish = "apt-get clean; rm -rf /var/lib/apt/lists/*; : > /etc/machine-id; \
                  systemctl mask getty@tty1.service console-getty.service \
                  systemd-logind.service >/dev/null 2>&1 || true";
    run_ok(
        Command::new("chroot")
            .arg(&rootfs)
            .args(["/bin/sh", "-c", finish]),
    )?;
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .args(["--numeric-owner", "-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("running tar")?;
    let import = Command::new("docker")
        .args([
            "import",
            "--change",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            "ENV container=docker",
            "--change",
            r#"CMD ["/lib/systemd/systemd"]"#,
            "-",
            reference,
        ])
        .stdin(tar.stdout.take().expect("piped"))
        .output()
        .context("running docker import")?;
    let tar_status = tar.wait()?;
    if !tar_status.success() || !import.status.success() {
        bail!(
            "importing the systemd rootfs failed: {}",
            String::from_utf8_lossy(&import.stderr)
        );
    }
    Ok(())
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A container running systemd as PID 1, removed when dropped.
pub struct SystemdHost {
    id: String,
}

impl SystemdHost {
    /// Starts a container of the systemd image and waits until systemd has booted
    /// (`systemctl is-system-running` is `running` or `degraded`).
    pub fn start(name: &str) -> Result<SystemdHost> {
        let image = systemd_image()?;
        let id = run_ok(Command::new("docker").args([
            "run",
            "-d",
            "--network",
            "none",
            "--hostname",
            name,
            "--label",
            "org.keepup.test=1",
            "--tmpfs",
            "/run",
            "--tmpfs",
            "/run/lock",
            "--tmpfs",
            "/tmp",
            "-v",
            "/sys/fs/cgroup:/sys/fs/cgroup:ro",
            &image,
        ]))?
        .trim()
        .to_string();
        let host = SystemdHost { id };
        let start = Instant::now();
        loop {
            let state = host.exec("systemctl is-system-running")?.stdout;
            if matches!(state.trim(), "running" | "degraded") {
                return Ok(host);
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!(
                    "systemd in {name} did not finish booting (state {:?}); docker logs:\n{}",
                    state.trim(),
                    run_ok(Command::new("docker").args(["logs", &host.id])).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Runs `sh -c script` as root; fails if it is still running after [`EXEC_TIMEOUT`]
    /// (`docker exec` is run under `timeout(1)`, which kills the client, so a hung command
    /// cannot hang the test).
    pub fn exec(&self, script: &str) -> Result<Exec> {
        let secs = EXEC_TIMEOUT.as_secs().to_string();
        let out = Command::new("timeout")
            .args([
                "--kill-after=5",
                &secs,
                "docker",
                "exec",
                &self.id,
                "sh",
                "-c",
                script,
            ])
            .stdin(Stdio::null())
            .output()
            .context("running docker exec")?;
        if matches!(out.status.code(), Some(124) | Some(137) | None) {
            bail!(
                "container {}: command still running after {secs} s: {script:?} (a background \
                 process that keeps stdout/stderr open also makes exec wait: redirect its output)",
                self.id
            );
        }
        Ok(Exec {
            code: i64::from(out.status.code().unwrap_or(-1)),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs `sh -c script`; its stdout, or an error unless it exits 0.
    pub fn ok(&self, script: &str) -> Result<String> {
        let e = self.exec(script)?;
        if e.code != 0 {
            bail!(
                "`{script}` exited {}\n--- stdout:\n{}\n--- stderr:\n{}",
                e.code,
                e.stdout,
                e.stderr
            );
        }
        Ok(e.stdout)
    }

    /// Copies a local file to `remote` (absolute) in the container.
    pub fn copy_in(&self, local: &Path, remote: &str) -> Result<()> {
        if let Some(parent) = Path::new(remote).parent() {
            self.ok(&format!("mkdir -p '{}'", parent.display()))?;
        }
        run_ok(Command::new("docker").args([
            "cp",
            &local.to_string_lossy(),
            &format!("{}:{remote}", self.id),
        ]))?;
        Ok(())
    }

    /// Writes `text` to `remote` in the container.
    pub fn write(&self, remote: &str, text: &str) -> Result<()> {
        let mut child = Command::new("docker")
            .args([
                "exec",
                "-i",
                &self.id,
                "sh",
                "-c",
                &format!("cat > '{remote}'"),
            ])
            .stdin(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())?;
        if !child.wait()?.success() {
            bail!("writing {remote} failed");
        }
        Ok(())
    }
}

impl Drop for SystemdHost {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", "-v", &self.id])
            .output();
    }
}
