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

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

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
