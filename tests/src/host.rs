//! Test hosts: Debian 12 containers of the host image (see [`crate::image`]) on a private
//! Docker network created for one test, with helpers to run shell commands and copy files in.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use testcontainers::core::{AccessMode, CgroupnsMode, ExecCommand, Mount};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// How long one [`Host::exec`] may run before the test fails.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(120);

/// Environment variable that skips Docker-based tests when set to `1`.
pub const SKIP_ENV: &str = "KEEPUP_SKIP_DOCKER_TESTS";

/// Returns whether Docker-based tests should run. Returns false (and says so) only when
/// `KEEPUP_SKIP_DOCKER_TESTS=1`; panics if Docker is not usable, so tests never skip silently.
pub fn docker_or_skip() -> bool {
    if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
        eprintln!("skipping: {SKIP_ENV}=1");
        return false;
    }
    let problem = match Command::new("docker").arg("info").output() {
        Ok(out) if out.status.success() => return true,
        Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
        Err(e) => format!("cannot run the docker CLI: {e}"),
    };
    panic!(
        "Docker is required for fleet tests: start the Docker daemon, or set {SKIP_ENV}=1 \
         to skip them explicitly ({problem})"
    );
}

/// The workspace root directory (the parent of the `tests` crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent directory")
        .to_path_buf()
}

/// Runs the docker CLI, returning its trimmed stdout or an error with its stderr.
pub(crate) fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .with_context(|| format!("running docker {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "docker {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// An internal Docker network for one test, named `keepup-test-<random>`. Hosts on it reach
/// each other by name and nothing else (no route outside). Removed when the `TestNet` and all its hosts are dropped.
pub struct TestNet {
    inner: Arc<NetInner>,
}

struct NetInner {
    name: String,
}

impl TestNet {
    /// Creates a fresh network.
    pub fn new() -> Result<TestNet> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let seed = format!(
            "{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let name = format!("keepup-test-{}", &crate::sha256_hex(&seed)[..10]);
        // --internal: no route out of the network; hosts reach only each other.
        docker(&[
            "network",
            "create",
            "--internal",
            "--label",
            "org.keepup.test=1",
            &name,
        ])
        .context("creating the test network")?;
        Ok(TestNet {
            inner: Arc::new(NetInner { name }),
        })
    }

    /// The Docker network name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }
}

impl Drop for NetInner {
    fn drop(&mut self) {
        // Containers are removed just before; retry briefly while Docker detaches them.
        for attempt in 0..10 {
            match docker(&["network", "rm", &self.name]) {
                Ok(_) => return,
                Err(e) if attempt == 9 => eprintln!("warning: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        }
    }
}

/// Output of a command run on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    /// Exit code.
    pub code: i64,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// A running Debian 12 host container (command `sleep infinity`), removed when dropped.
pub struct Host {
    // Field order matters: the container is removed before the network reference is released.
    container: ContainerAsync<GenericImage>,
    name: String,
    exec_timeout: Duration,
    _net: Arc<NetInner>,
}

impl Host {
    /// Starts a host with hostname `name` on `net`; other hosts on `net` reach it as `name`.
    /// Builds the host image first if needed.
    pub async fn start(net: &TestNet, name: &str) -> Result<Host> {
        Host::start_with(net, name, &[]).await
    }

    /// Like [`Host::start`], with local directories bind-mounted read-only: `(local, remote)`.
    /// The host sees changes to them as they happen (e.g. a repository the test edits).
    pub async fn start_with(net: &TestNet, name: &str, mounts: &[(&Path, &str)]) -> Result<Host> {
        Host::start_opts(net, name, mounts, false, AccessMode::ReadOnly).await
    }

    /// Like [`Host::start_with`], the directories mounted read-write (a server that writes
    /// into the repository: the rollout gate signs progress there).
    pub async fn start_with_writable(
        net: &TestNet,
        name: &str,
        mounts: &[(&Path, &str)],
    ) -> Result<Host> {
        Host::start_opts(net, name, mounts, false, AccessMode::ReadWrite).await
    }

    /// Like [`Host::start`], in a private cgroup namespace with CAP_SYS_ADMIN, so a test can
    /// mount a writable cgroup2 tree (the container's own subtree) inside.
    pub async fn start_with_cgroups(net: &TestNet, name: &str) -> Result<Host> {
        Host::start_opts(net, name, &[], true, AccessMode::ReadOnly).await
    }

    async fn start_opts(
        net: &TestNet,
        name: &str,
        mounts: &[(&Path, &str)],
        cgroups: bool,
        access: AccessMode,
    ) -> Result<Host> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            bail!(
                "host name {name:?} must be a DNS label: a-z, 0-9 and '-', at most 63 characters"
            );
        }
        let image = tokio::task::spawn_blocking(crate::image::host_image).await??;
        let (repo, tag) = image.split_once(':').expect("reference has a tag");
        let mut request = GenericImage::new(repo, tag).with_cmd(["sleep", "infinity"]);
        for (local, remote) in mounts {
            let local = local
                .canonicalize()
                .with_context(|| format!("mount source {}", local.display()))?;
            request = request.with_mount(
                Mount::bind_mount(local.to_string_lossy(), *remote).with_access_mode(access),
            );
        }
        request = request
            .with_hostname(name)
            .with_container_name(format!("{}-{name}", net.name()))
            .with_network(net.name())
            .with_label("org.keepup.test", "1")
            // Like root on a real host: read any process's /proc/PID/environ, exe, fd.
            .with_cap_add("SYS_PTRACE");
        if cgroups {
            request = request
                .with_cgroupns_mode(CgroupnsMode::Private)
                .with_cap_add("SYS_ADMIN");
        }
        let container = request
            .start()
            .await
            .with_context(|| format!("starting host {name} from {image}"))?;
        // Docker DNS resolves container names and aliases, not hostnames: reattach the
        // container to the network with its short name as an alias.
        let id = container.id().to_string();
        tokio::task::spawn_blocking({
            let (net, name) = (net.name().to_string(), name.to_string());
            move || -> Result<()> {
                docker(&["network", "disconnect", &net, &id])?;
                docker(&["network", "connect", "--alias", &name, &net, &id])?;
                Ok(())
            }
        })
        .await?
        .with_context(|| format!("giving host {name} its network alias"))?;
        Ok(Host {
            container,
            name: name.to_string(),
            exec_timeout: DEFAULT_EXEC_TIMEOUT,
            _net: net.inner.clone(),
        })
    }

    /// The host name (also its name on the test network).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Docker container id.
    pub fn id(&self) -> &str {
        self.container.id()
    }

    /// Sets how long each later `exec`/`ok` may run (default [`DEFAULT_EXEC_TIMEOUT`]).
    pub fn set_exec_timeout(&mut self, timeout: Duration) {
        self.exec_timeout = timeout;
    }

    /// Runs `sh -c script` as root and returns its exit code and output. Fails if it runs
    /// longer than the exec timeout.
    pub async fn exec(&self, script: &str) -> Result<Exec> {
        let run = async {
            let mut res = self
                .container
                .exec(ExecCommand::new(["sh", "-c", script]))
                .await?;
            let stdout = res.stdout_to_vec().await?;
            let stderr = res.stderr_to_vec().await?;
            // The output streams end when the command exits; the code follows shortly.
            for _ in 0..100 {
                if let Some(code) = res.exit_code().await? {
                    return Ok(Exec {
                        code,
                        stdout: String::from_utf8_lossy(&stdout).into_owned(),
                        stderr: String::from_utf8_lossy(&stderr).into_owned(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(anyhow!("output ended but no exit code was reported"))
        };
        match tokio::time::timeout(self.exec_timeout, run).await {
            Ok(result) => result.with_context(|| format!("host {}: exec {script:?}", self.name)),
            Err(_) => bail!(
                "host {}: command still running after {} s: {script:?} (a background process \
                 that keeps stdout/stderr open also makes exec wait: redirect its output)",
                self.name,
                self.exec_timeout.as_secs()
            ),
        }
    }

    /// Runs `sh -c script` and returns its stdout; an error (with all details) unless it
    /// exits 0.
    pub async fn ok(&self, script: &str) -> Result<String> {
        let e = self.exec(script).await?;
        if e.code != 0 {
            bail!(
                "host {}: `{script}` exited {}\n--- stdout:\n{}\n--- stderr:\n{}",
                self.name,
                e.code,
                e.stdout,
                e.stderr
            );
        }
        Ok(e.stdout)
    }

    /// Polls `script` every 200 ms until it prints nothing (e.g. no process left); fails
    /// after `within` with the last output.
    pub async fn until_empty(&self, script: &str, within: Duration) -> Result<()> {
        let start = std::time::Instant::now();
        loop {
            let out = self.exec(script).await?;
            if out.stdout.trim().is_empty() {
                return Ok(());
            }
            if start.elapsed() >= within {
                bail!(
                    "host {}: after {within:?}, `{script}` still prints:\n{}",
                    self.name,
                    out.stdout
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Copies a local file or directory to `remote` (an absolute path) on the host, creating
    /// the parent directory first. Modes are kept; the owner becomes root.
    pub async fn copy_in(&self, local: &Path, remote: &str) -> Result<()> {
        if !remote.starts_with('/') {
            bail!("copy_in: remote path {remote:?} must be absolute");
        }
        let parent = Path::new(remote)
            .parent()
            .and_then(Path::to_str)
            .unwrap_or("/");
        self.ok(&format!("mkdir -p '{}'", parent.replace('\'', r"'\''")))
            .await?;
        let (src, dst) = (
            local.to_string_lossy().into_owned(),
            format!("{}:{remote}", self.id()),
        );
        tokio::task::spawn_blocking(move || docker(&["cp", &src, &dst]))
            .await?
            .with_context(|| format!("copying {} to {}:{remote}", local.display(), self.name))?;
        Ok(())
    }
}
