//! One cgroup v2 per agent-supervised service, where the agent may create cgroups (a systemd
//! unit with `Delegate=yes`, or a container whose private cgroup namespace has a writable
//! cgroup2 mount): the launch script is spawned into `<agent's cgroup>/services/<name>`, and
//! a stop ends with `cgroup.kill`, which kills every process in it at once, so a fork loop
//! cannot outrun it. The agent moves itself into the leaf `<agent's cgroup>/agent` first
//! (cgroup v2 puts processes only in leaves once a subtree is used, and systemd's delegation
//! contract asks the same).
//!
//! Which way the host stops services is decided once, at agent start ([`init`]); without a
//! writable cgroup2 (cgroup v1, a read-only `/sys/fs/cgroup`, a kernel without `cgroup.kill`)
//! `role.rs` stops services by freezing their processes and then killing them.
//!
//! A launch script is created directly in its cgroup with `clone3(CLONE_INTO_CGROUP)`
//! ([`ServiceCgroup::spawn`], Linux 5.7): moving a process into a cgroup (a `cgroup.procs`
//! write) takes the kernel's cgroup thread-group lock for writing and waits for an RCU grace
//! period, several milliseconds on every restart. Where `clone3` is refused (an older kernel,
//! a seccomp filter that answers ENOSYS, as Docker's default one does without CAP_SYS_ADMIN)
//! the launch script writes itself into `cgroup.procs` between fork and exec ([`Joiner`]).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use nix::libc;

use crate::reaper::PidfdChild;

/// The leaf the agent moves itself into, under its own cgroup.
pub const AGENT_LEAF: &str = "agent";
/// The directory of the services' cgroups, under the agent's own cgroup.
pub const SERVICES: &str = "services";

/// The cgroup2 tree the agent uses: `<own>/agent` (the agent) and `<own>/services/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroups {
    /// The agent's own cgroup directory (e.g. `/sys/fs/cgroup/system.slice/keepup-agent.service`).
    pub own: PathBuf,
}

/// One service's cgroup directory (it may not exist yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCgroup {
    dir: PathBuf,
}

static HOST: OnceLock<Option<Cgroups>> = OnceLock::new();

/// Decides once how this agent stops services: sets up the cgroup tree if it can, and says
/// which path it took (logged by the caller). Later calls return the first answer.
pub fn init() -> Result<&'static Cgroups, String> {
    let mut why = None;
    let host = HOST.get_or_init(|| match Cgroups::setup() {
        Ok(c) => Some(c),
        Err(e) => {
            why = Some(e);
            None
        }
    });
    host.as_ref().ok_or_else(|| {
        why.unwrap_or_else(|| "no writable cgroup v2 (decided at agent start)".into())
    })
}

/// The cgroup for service `name`, if the agent uses cgroups (after [`init`]) and `name` is a
/// plain file name.
pub fn for_service(name: &str) -> Option<ServiceCgroup> {
    let host = HOST.get()?.as_ref()?;
    host.service(name)
}

/// Where the agent's cgroup is: the line `0::<path>` of `/proc/self/cgroup` resolved against
/// the cgroup2 mounts of `/proc/self/mountinfo` (a mount shows the tree from its `root`
/// field down; hybrid hosts mount cgroup2 at `/sys/fs/cgroup/unified`). `None` without a
/// cgroup2 mount that shows the agent's cgroup.
pub fn locate(mountinfo: &str, proc_cgroup: &str) -> Option<PathBuf> {
    let own = proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim_end();
    if !own.starts_with('/') || own.ends_with(" (deleted)") {
        return None;
    }
    for line in mountinfo.lines() {
        // id parent major:minor root mountpoint options [optional...] - fstype source super
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_ascii_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let f: Vec<&str> = left.split_ascii_whitespace().collect();
        let (Some(root), Some(point)) = (f.get(3), f.get(4)) else {
            continue;
        };
        let (root, point) = (unescape(root), unescape(point));
        let rest = if root == "/" {
            Some(own)
        } else {
            own.strip_prefix(root.as_str())
                .filter(|r| r.is_empty() || r.starts_with('/'))
        };
        if let Some(rest) = rest {
            let rest = rest.trim_start_matches('/');
            let mut dir = PathBuf::from(point);
            if !rest.is_empty() {
                dir.push(rest);
            }
            return Some(dir);
        }
    }
    None
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the agent's services go, given the agent's cgroup `own`: when `own` is already the
/// agent leaf (a process started from inside it, e.g. an agent run by the previous one's
/// package-manager run), its parent.
pub fn base_of(own: &Path) -> PathBuf {
    if own.file_name().is_some_and(|n| n == AGENT_LEAF) {
        if let Some(parent) = own.parent() {
            return parent.to_path_buf();
        }
    }
    own.to_path_buf()
}

/// Whether `name` can be a cgroup directory name: one plain path component.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.starts_with("cgroup.")
        && !name.contains(['/', '\0', '\n'])
        && name.len() <= 200
}

impl Cgroups {
    /// Finds the agent's cgroup, moves the agent into its `agent` leaf and creates
    /// `services/`. Fails (and the freeze path is used) when any step is not allowed.
    fn setup() -> Result<Cgroups, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let cgroup = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let own = locate(&mountinfo, &cgroup).ok_or_else(|| {
            "no cgroup v2 mount shows the agent's cgroup (cgroup v1 or hybrid host)".to_string()
        })?;
        let own = base_of(&own);
        if !own.join("cgroup.kill").exists() {
            return Err(format!(
                "{} has no cgroup.kill (kernel before 5.14, or not the agent's cgroup)",
                own.display()
            ));
        }
        let leaf = own.join(AGENT_LEAF);
        mkdir(&leaf)?;
        write(&leaf.join("cgroup.procs"), "0")?;
        mkdir(&own.join(SERVICES))?;
        Ok(Cgroups { own })
    }

    /// The cgroup of service `name` (`None` if `name` is not a plain file name).
    pub fn service(&self, name: &str) -> Option<ServiceCgroup> {
        plain_name(name).then(|| ServiceCgroup {
            dir: self.own.join(SERVICES).join(name),
        })
    }
}

fn mkdir(dir: &Path) -> Result<(), String> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("cannot create cgroup {}: {e}", dir.display())),
    }
}

fn write(file: &Path, text: &str) -> Result<(), String> {
    OpenOptions::new()
        .write(true)
        .open(file)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("cannot write {text:?} to {}: {e}", file.display()))
}

/// `cgroup.procs` of a service's cgroup, open for writing: the launch script writes `0` to
/// it between fork and exec ([`Joiner::join`]), so it and everything it starts are in the
/// cgroup from their first instruction.
#[derive(Debug)]
pub struct Joiner {
    file: File,
}

impl Joiner {
    /// Moves the calling process into the cgroup. Async-signal-safe: one `write(2)`, for
    /// use between fork and exec.
    pub fn join(fd: RawFd) -> std::io::Result<()> {
        // SAFETY: write(2) on a file descriptor with a static buffer.
        let n = unsafe { nix::libc::write(fd, b"0".as_ptr().cast(), 1) };
        if n == 1 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// The descriptor to pass to [`Joiner::join`] in the child.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl ServiceCgroup {
    /// Creates the cgroup if needed and opens its `cgroup.procs` for the launch script.
    pub fn joiner(&self) -> Result<Joiner, String> {
        mkdir(&self.dir)?;
        let procs = self.dir.join("cgroup.procs");
        let file = OpenOptions::new()
            .write(true)
            .open(&procs)
            .map_err(|e| format!("cannot open {}: {e}", procs.display()))?;
        Ok(Joiner { file })
    }

    /// Runs `launch` as a new process created inside this cgroup (`clone3` with
    /// `CLONE_INTO_CGROUP | CLONE_PIDFD`), in a process group of its own, with `/` as its
    /// directory, stdin on `/dev/null`, an empty signal mask and default signal dispositions.
    /// Everything the child needs is prepared before the clone; the child only calls
    /// async-signal-safe functions and reports an `execve` failure over a close-on-exec pipe,
    /// as std's `Command` does. [`SpawnError::Unsupported`] means: use [`Joiner`] instead.
    pub fn spawn(&self, launch: &Launch) -> Result<PidfdChild, SpawnError> {
        if !CLONE3_WORKS.load(Ordering::Relaxed) {
            return Err(SpawnError::Unsupported("clone3 was refused before".into()));
        }
        mkdir(&self.dir).map_err(SpawnError::Failed)?;
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&self.dir)
            .map_err(|e| SpawnError::Failed(format!("cannot open {}: {e}", self.dir.display())))?;
        let null = File::open("/dev/null")
            .map_err(|e| SpawnError::Failed(format!("cannot open /dev/null: {e}")))?;
        let (err_read, err_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| SpawnError::Failed(format!("cannot create a pipe: {e}")))?;
        let argv = [launch.program.as_ptr(), std::ptr::null()];
        let mut envp: Vec<*const libc::c_char> = launch.env.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());
        let fds = ChildFds {
            stdin: null.as_raw_fd(),
            stdout: launch.stdout.as_raw_fd(),
            stderr: launch.stderr.as_raw_fd(),
            exec_error: err_write.as_raw_fd(),
        };
        let mut pidfd: libc::c_int = -1;
        let args = CloneArgs {
            flags: CLONE_PIDFD | CLONE_INTO_CGROUP,
            pidfd: std::ptr::addr_of_mut!(pidfd) as u64,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: dir.as_raw_fd() as u64,
            ..CloneArgs::default()
        };
        // SAFETY: clone3 without CLONE_VM (and without a new stack) is a fork: the child gets
        // a copy of this address space and returns here with 0. It then runs only
        // `exec_child`, which calls async-signal-safe functions on memory prepared above.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                std::ptr::addr_of!(args),
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if pid == 0 {
            // SAFETY: in the child; see above.
            unsafe { exec_child(&fds, launch.program.as_ptr(), &argv, &envp) }
        }
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            let errno = e.raw_os_error().unwrap_or(0);
            let why = format!("clone3 into {}: {e}", self.dir.display());
            if matches!(
                errno,
                libc::ENOSYS | libc::EINVAL | libc::EPERM | libc::E2BIG | libc::EOPNOTSUPP
            ) && CLONE3_WORKS.swap(false, Ordering::Relaxed)
            {
                eprintln!(
                    "keepup-agent: {why}; launch scripts join their cgroup between fork and \
                     exec instead (restarts take a few ms longer)"
                );
            }
            return Err(SpawnError::Unsupported(why));
        }
        let pid = pid as i32;
        // SAFETY: CLONE_PIDFD stored a new descriptor (close-on-exec) that only we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        drop(err_write);
        let mut buf = [0u8; 4];
        let n = loop {
            match nix::unistd::read(&err_read, &mut buf) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => break r,
            }
        };
        match n {
            Ok(4) => {
                // The child reported why execve failed and exited: reap it.
                let mut status = 0;
                // SAFETY: waitpid on our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                let e = std::io::Error::from_raw_os_error(i32::from_ne_bytes(buf));
                Err(SpawnError::Failed(format!(
                    "cannot run {}: {e}",
                    launch.program.to_string_lossy()
                )))
            }
            _ => {
                if !ANNOUNCED.swap(true, Ordering::Relaxed) {
                    eprintln!("keepup-agent: launch scripts are created in their cgroups (clone3)");
                }
                PidfdChild::new(pid, pidfd).map_err(|e| {
                    // Not watched, it must not run: kill and reap it (our unreaped child, so
                    // the pid cannot have been recycled).
                    // SAFETY: kill and waitpid on our own child.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                        libc::waitpid(pid, std::ptr::null_mut(), 0);
                    }
                    SpawnError::Failed(format!("cannot watch the launch script's pidfd: {e}"))
                })
            }
        }
    }

    /// Whether any process is in the cgroup (`populated` of `cgroup.events`); `false` when
    /// the cgroup does not exist, `None` if it cannot be read.
    pub fn populated(&self) -> Option<bool> {
        match std::fs::read_to_string(self.dir.join("cgroup.events")) {
            Ok(text) => parse_populated(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(false),
            Err(_) => None,
        }
    }

    /// Pids in the cgroup (`cgroup.procs`; empty if it does not exist).
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|t| {
                t.split_ascii_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// SIGKILLs every process in the cgroup at once (`cgroup.kill`): a process forking
    /// meanwhile has its child killed too.
    pub fn kill(&self) -> Result<(), String> {
        write(&self.dir.join("cgroup.kill"), "1")
    }

    /// Removes the cgroup if it exists and is empty (a populated one stays).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Whether `clone3(CLONE_INTO_CGROUP)` may work here; cleared when the kernel (or a seccomp
/// filter) refuses it, so later starts go straight to [`Joiner`].
static CLONE3_WORKS: AtomicBool = AtomicBool::new(true);
/// Whether the first launch script created by `clone3` was announced.
static ANNOUNCED: AtomicBool = AtomicBool::new(false);

const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` of `clone3(2)` (the kernel's layout, size 88 since Linux 5.7).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// A launch script to run: the program (run with itself as its only argument), its whole
/// environment (`NAME=value`), and where its stdout and stderr go.
#[derive(Debug)]
pub struct Launch {
    /// The launch script's path.
    pub program: CString,
    /// The environment, `NAME=value` each.
    pub env: Vec<CString>,
    /// Its stdout (the log pipe's write end).
    pub stdout: OwnedFd,
    /// Its stderr (the log pipe's write end).
    pub stderr: OwnedFd,
}

/// Why [`ServiceCgroup::spawn`] did not start the launch script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpawnError {
    /// `clone3` into the cgroup is not available here: spawn another way.
    Unsupported(String),
    /// The launch script could not be run (says why).
    Failed(String),
}

/// The descriptors the child puts on 0, 1, 2, and its exec-error pipe.
struct ChildFds {
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    exec_error: RawFd,
}

/// The child's side of [`ServiceCgroup::spawn`]: async-signal-safe calls only, no
/// allocation. Never returns: `execve`, or `_exit(127)` after writing errno to the pipe.
unsafe fn exec_child(
    fds: &ChildFds,
    program: *const libc::c_char,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    let fail = |fd: RawFd| -> ! {
        let errno = *libc::__errno_location();
        let bytes = errno.to_ne_bytes();
        libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(127)
    };
    // Signals: the agent's mask and ignored signals (Rust ignores SIGPIPE) are not the
    // launch script's; caught ones are reset by execve anyway.
    let mut set: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut set);
    if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
        fail(fds.exec_error);
    }
    let mut dfl: libc::sigaction = std::mem::zeroed();
    dfl.sa_sigaction = libc::SIG_DFL;
    for sig in 1..32 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        }
    }
    for (from, to) in [(fds.stdin, 0), (fds.stdout, 1), (fds.stderr, 2)] {
        let ok = if from == to {
            // Already in place (the agent's own 0..2 were closed): only drop close-on-exec.
            libc::fcntl(to, libc::F_SETFD, 0) == 0
        } else {
            libc::dup2(from, to) == to
        };
        if !ok {
            fail(fds.exec_error);
        }
    }
    if libc::setpgid(0, 0) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
        fail(fds.exec_error);
    }
    libc::execve(program, argv.as_ptr(), envp.as_ptr());
    fail(fds.exec_error)
}

/// `populated 0|1` from `cgroup.events`.
fn parse_populated(events: &str) -> Option<bool> {
    events
        .lines()
        .find_map(|l| match l.strip_prefix("populated ") {
            Some("1") => Some(true),
            Some("0") => Some(false),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PURE_V2: &str = "\
22 27 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
29 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
";
    const HYBRID: &str = "\
30 25 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:28 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
32 30 0:29 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
";

    #[test]
    fn finds_the_agents_cgroup_under_a_cgroup2_mount() {
        let unit = "0::/system.slice/keepup-agent.service\n";
        assert_eq!(
            locate(PURE_V2, unit),
            Some("/sys/fs/cgroup/system.slice/keepup-agent.service".into())
        );
        // Hybrid: cgroup2 is mounted at .../unified; v1 lines are ignored.
        let hybrid = "12:pids:/docker/abc\n1:name=systemd:/docker/abc\n0::/docker/abc\n";
        assert_eq!(
            locate(HYBRID, hybrid),
            Some("/sys/fs/cgroup/unified/docker/abc".into())
        );
        // A container's private namespace: its root is "/".
        assert_eq!(locate(PURE_V2, "0::/\n"), Some("/sys/fs/cgroup".into()));
        // A mount of a subtree (root field) shows only what is under it.
        let sub = "40 25 0:26 /docker/abc /mnt/cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(locate(sub, "0::/docker/abc/x\n"), Some("/mnt/cg/x".into()));
        assert_eq!(locate(sub, "0::/docker/abcdef\n"), None);
        // cgroup v1 only, no cgroup2 line, or a deleted cgroup: no cgroups.
        assert_eq!(locate(HYBRID.lines().next().unwrap(), "0::/\n"), None);
        assert_eq!(locate(PURE_V2, "1:name=systemd:/\n"), None);
        assert_eq!(locate(PURE_V2, "0::/gone (deleted)\n"), None);
        // Escaped mount points.
        let esc = "29 22 0:26 / /sys/fs/my\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(locate(esc, "0::/a\n"), Some("/sys/fs/my cg/a".into()));
    }

    #[test]
    fn services_go_beside_the_agent_leaf() {
        let own = Path::new("/sys/fs/cgroup/system.slice/keepup-agent.service");
        assert_eq!(base_of(own), own);
        assert_eq!(base_of(&own.join(AGENT_LEAF)), own);
        let c = Cgroups { own: own.into() };
        assert_eq!(c.service("foo").unwrap().dir, own.join("services/foo"));
        for bad in ["", ".", "..", "a/b", "cgroup.kill", ".hidden"] {
            assert!(c.service(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn reads_populated() {
        assert_eq!(parse_populated("populated 1\nfrozen 0\n"), Some(true));
        assert_eq!(parse_populated("populated 0\nfrozen 0\n"), Some(false));
        assert_eq!(parse_populated("frozen 0\n"), None);
        let gone = ServiceCgroup {
            dir: "/nonexistent/keepup-test".into(),
        };
        assert_eq!(gone.populated(), Some(false));
        assert!(gone.pids().is_empty());
    }
}
