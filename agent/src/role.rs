//! The `pkill -u ${role}` contract: find every process of a role's uid in `/proc` and stop it
//! (TERM, wait the grace, KILL). This is how the agent stops a service, kills a hung one, and
//! gains control at start: by the role's uid, never by a pidfile. A daemon that double-forked
//! away from its launch script keeps the uid, so it is still found. Processes in another PID
//! namespace (a container on the host that happens to run as the same numeric uid) are not the
//! role's and are left alone.
//!
//! A stop cannot be outrun: what outlives the grace is killed where it cannot fork any more,
//! by `cgroup.kill` on the service's cgroup (`cgroup.rs`) or, without one, by freezing every
//! process (SIGSTOP, rescan until nothing is new) and then SIGKILLing them all. Every signal
//! goes through a pidfd opened and checked against the process's start time, so a recycled
//! pid never receives one; the launch script's process group is used only while its leader is
//! the agent's unreaped child. Waiting for signalled processes to go is done on the same
//! pidfds (readable the moment a process exits), so a kill ends when its processes do.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::cgroup::ServiceCgroup;

/// What `/proc/<pid>/stat` and `/proc/<pid>/status` say about one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcInfo {
    /// Process id.
    pub pid: i32,
    /// Parent process id.
    pub ppid: i32,
    /// Process group id.
    pub pgrp: i32,
    /// One-letter state (`R`, `S`, `Z`, `T`, ...).
    pub state: char,
    /// Threads in the thread group (`None` if `stat` was cut short).
    pub threads: Option<u32>,
    /// Start time in clock ticks after boot: with the pid, identifies the process.
    pub start: Option<u64>,
    /// Real uid (`None` when only `stat` was read).
    pub ruid: Option<u32>,
    /// Effective uid (`None` when only `stat` was read).
    pub euid: Option<u32>,
}

impl ProcInfo {
    /// Whether the process has exited and waits to be reaped. A thread-group leader whose main
    /// thread exited while other threads still run is also `Z`, but it is alive: see
    /// [`ProcInfo::is_dead`].
    pub fn is_zombie(&self) -> bool {
        self.state == 'Z' || self.state == 'X'
    }

    /// Whether nothing of the process runs any more: a zombie with no thread left but its
    /// (exited) main thread.
    pub fn is_dead(&self) -> bool {
        self.is_zombie() && self.threads.is_none_or(|t| t <= 1)
    }
}

/// Parses `/proc/<pid>/stat`: `pid (comm) state ppid pgrp ...`; `comm` may hold spaces and
/// parentheses, so fields are read after the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcInfo> {
    let (head, tail) = text.rsplit_once(')')?;
    let pid = head.split_once('(')?.0.trim().parse().ok()?;
    let mut f = tail.split_ascii_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    // Fields 6..: session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime
    // cstime priority nice num_threads(20) itrealvalue starttime(22).
    let rest: Vec<&str> = f.take(17).collect();
    let threads = rest.get(14).and_then(|t| t.parse().ok());
    let start = rest.get(16).and_then(|t| t.parse().ok());
    Some(ProcInfo {
        pid,
        ppid,
        pgrp,
        state,
        threads,
        start,
        ruid: None,
        euid: None,
    })
}

/// What `/proc/<pid>/status` alone says about a process: everything [`is_victim`] needs
/// (state, threads, parent, process group from `NSpgid:`, real and effective uid), but not
/// the start time. `pgrp` is `None` on kernels without `NSpgid:` (before 4.1).
pub fn parse_status(pid: i32, text: &str) -> Option<ProcInfo> {
    let (mut state, mut ppid, mut pgrp, mut threads, mut uids) = (None, None, None, None, None);
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let first = || value.split_ascii_whitespace().next();
        match key {
            "State" => state = first().and_then(|v| v.chars().next()),
            "PPid" => ppid = first().and_then(|v| v.parse().ok()),
            "NSpgid" => pgrp = first().and_then(|v| v.parse().ok()),
            "Threads" => threads = first().and_then(|v| v.parse().ok()),
            "Uid" => {
                let mut f = value.split_ascii_whitespace();
                uids = f
                    .next()
                    .and_then(|r| r.parse().ok())
                    .zip(f.next().and_then(|e| e.parse().ok()));
            }
            _ => {}
        }
    }
    let (ruid, euid) = uids?;
    Some(ProcInfo {
        pid,
        ppid: ppid?,
        pgrp: pgrp.unwrap_or(0),
        state: state?,
        threads,
        start: None,
        ruid: Some(ruid),
        euid: Some(euid),
    })
}

/// How deep the process is in nested PID namespaces, as seen from this `/proc`: the number of
/// pids on the `NSpid:` line of `/proc/<pid>/status` (`None` on kernels without it).
pub fn parse_nspid_depth(text: &str) -> Option<usize> {
    let line = text.lines().find(|l| l.starts_with("NSpid:"))?;
    Some(line["NSpid:".len()..].split_ascii_whitespace().count())
}

/// Every process now in `/proc` (stat only: pid, parents, state, threads).
/// Processes that vanish while being read are skipped.
pub fn scan() -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(read_stat)
        .collect()
}

/// `/proc/<pid>/stat`, parsed.
pub fn read_stat(pid: i32) -> Option<ProcInfo> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Whether `p` is a live process the role kill must stop: its real or effective uid is the
/// role's, or it is in the launch script's process group `group`. Never pid 1, never the agent
/// itself, never a dead process (a zombie whose threads all exited), and never anything by
/// uid 0.
pub fn is_victim(p: &ProcInfo, uid: u32, group: Option<i32>, me: i32) -> bool {
    if p.pid <= 1 || p.pid == me || p.is_dead() {
        return false;
    }
    let by_uid = uid != 0 && (p.ruid == Some(uid) || p.euid == Some(uid));
    let by_group = group.is_some_and(|g| g > 1 && p.pgrp == g);
    by_uid || by_group
}

/// This process's PID namespace: the `/proc/<pid>/ns/pid` link (readable for the agent's own
/// processes and with CAP_SYS_PTRACE), else the depth of its `NSpid:` line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PidNs {
    link: Option<PathBuf>,
    depth: Option<usize>,
}

impl PidNs {
    fn of(pid: &str, status: &str) -> PidNs {
        PidNs {
            link: std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok(),
            depth: parse_nspid_depth(status),
        }
    }

    /// Whether `other` is in the same PID namespace. The link is exact; without it (no
    /// CAP_SYS_PTRACE, e.g. in a container), the `NSpid` depth: every process this `/proc`
    /// shows is in its namespace or a nested one, so the same depth is the same namespace.
    fn same(&self, other: &PidNs) -> bool {
        match (&self.link, &other.link) {
            (Some(a), Some(b)) => a == b,
            _ => self.depth == other.depth,
        }
    }
}

/// Whom a role kill stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    /// The role's uid: every process whose real or effective uid it is (never uid 0).
    pub uid: u32,
    /// The launch script's process group, and only while the launch script is the agent's
    /// unreaped child: once its leader is reaped, a group id can be recycled by an unrelated
    /// process group.
    pub group: Option<i32>,
    /// The service's cgroup, when the agent uses cgroups: everything in it is the service's.
    pub cgroup: Option<ServiceCgroup>,
}

/// Live processes of the target in the agent's PID namespace: the role's, the launch
/// script's group's, and those in the service's cgroup.
///
/// `/proc/<pid>` is owned by the process's effective uid, or by root when the process is not
/// dumpable, which is what changing credentials (setuid, a setuid binary) makes it; so a
/// process whose real or effective uid is the role's has its `/proc` entry owned by the role
/// or by root, and only those entries are read further.
pub fn victims(t: &Target) -> Vec<ProcInfo> {
    let (uid, group) = (t.uid, t.group);
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mine = std::fs::read_to_string("/proc/self/status")
        .map(|s| PidNs::of("self", &s))
        .ok();
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Ok(pid) = name.parse::<i32>() else {
            continue;
        };
        let Ok(meta) = entry.metadata() else { continue };
        if meta.uid() != 0 && meta.uid() != uid {
            continue;
        }
        // One read decides for most processes; `stat` (the start time, and the process group
        // on kernels without `NSpgid:`) only for candidates.
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let Some(mut info) = parse_status(pid, &status) else {
            continue;
        };
        let need_group = group.is_some() && !status.contains("\nNSpgid:");
        if !need_group && !is_victim(&info, uid, group, me) {
            continue;
        }
        let Some(st) = read_stat(pid) else {
            continue;
        };
        info.pgrp = st.pgrp;
        info.start = st.start;
        if !is_victim(&info, uid, group, me) {
            continue;
        }
        if let Some(mine) = &mine {
            if !mine.same(&PidNs::of(name, &status)) {
                continue;
            }
        }
        out.push(info);
    }
    // The cgroup's other members: the launch script and its helpers before they switch to
    // the role (`cgroup.procs` lists only pids this namespace can see).
    if let Some(cg) = &t.cgroup {
        for pid in cg.pids() {
            if pid <= 1 || pid == me || out.iter().any(|p| p.pid == pid) {
                continue;
            }
            if let Some(st) = read_stat(pid).filter(|p| !p.is_dead()) {
                out.push(st);
            }
        }
    }
    out
}

/// [`victims`] on a blocking thread: `/proc` reads stay off the runtime's only thread.
async fn victims_async(t: &Target) -> Vec<ProcInfo> {
    let t = t.clone();
    tokio::task::spawn_blocking(move || victims(&t))
        .await
        .unwrap_or_default()
}

/// How a signal to one process went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The process got it.
    Delivered,
    /// The process was gone already.
    Gone,
    /// The pid now belongs to another process (or is pid 1 or the agent): nothing was sent.
    NotSame,
}

/// Whether the kernel has pidfds; cleared at the first ENOSYS.
static PIDFDS: AtomicBool = AtomicBool::new(true);

fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn pidfd_send_signal(fd: &OwnedFd, sig: Signal) -> Result<(), Errno> {
    // SAFETY: pidfd_send_signal(2) with a valid pidfd, no siginfo and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// Sends `sig` to the process `pid` that started at `start` (clock ticks after boot, from its
/// `stat`), and to no other. A pidfd is opened first, then the start time is read again: a pid
/// recycled meanwhile has another start time and is left alone, and the pidfd pins the
/// process that was checked, so the signal cannot reach one that takes the pid afterwards.
/// Kernels without pidfds (before 5.3: ENOSYS, said once on stderr) get kill(2) right after
/// the same check, which narrows the window to microseconds but cannot close it. Never pid 1,
/// never the agent.
pub fn signal_exact(pid: i32, start: Option<u64>, sig: Signal) -> Sent {
    if pid <= 1 || pid == std::process::id() as i32 {
        return Sent::NotSame;
    }
    let Some(start) = start else {
        return Sent::NotSame;
    };
    let fd = if PIDFDS.load(Ordering::Relaxed) {
        match pidfd_open(pid) {
            Ok(fd) => Some(fd),
            Err(Errno::ESRCH) => return Sent::Gone,
            Err(Errno::ENOSYS) => {
                if PIDFDS.swap(false, Ordering::Relaxed) {
                    eprintln!(
                        "keepup-agent: this kernel has no pidfds (pidfd_open: ENOSYS); processes \
                         are signalled by pid right after their start time is checked"
                    );
                }
                None
            }
            // Out of descriptors, say: the same fallback as without pidfds.
            Err(_) => None,
        }
    } else {
        None
    };
    match read_stat(pid) {
        Some(now) if now.start == Some(start) => {}
        Some(_) => return Sent::NotSame,
        None => return Sent::Gone,
    }
    let sent = match &fd {
        Some(fd) => pidfd_send_signal(fd, sig),
        None => kill(Pid::from_raw(pid), sig),
    };
    match sent {
        Ok(()) => Sent::Delivered,
        Err(_) => Sent::Gone,
    }
}

/// How a role kill ended what outlived the SIGTERM and the grace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Finish {
    /// Nothing outlived the grace.
    #[default]
    Term,
    /// `cgroup.kill` on the service's cgroup; `outside` role processes outside the cgroup
    /// were then frozen and killed.
    Cgroup {
        /// Role processes found outside the service's cgroup.
        outside: usize,
    },
    /// Freeze-then-kill: SIGSTOP to every process, rescans until none was new, SIGKILL.
    Freeze {
        /// Scans it took (the last one found nothing new).
        rounds: u32,
        /// Whether the scans settled (none new) within the bound; if not, what was found was
        /// killed anyway, then whatever appeared.
        settled: bool,
    },
}

/// What a role kill did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KillReport {
    /// Processes sent SIGTERM.
    pub termed: usize,
    /// Processes still alive after the grace, sent SIGKILL (by `cgroup.kill` or by pidfd).
    pub killed: usize,
    /// Processes still alive after SIGKILL (should be 0; e.g. stuck in uninterruptible I/O).
    pub survivors: usize,
    /// How the processes that outlived the grace were ended.
    pub finish: Finish,
}

impl KillReport {
    /// One line for the service log: `SIGTERM to 3 process(es), SIGKILL to 2 (cgroup.kill)`.
    pub fn describe(&self) -> String {
        let how = match self.finish {
            Finish::Term => String::new(),
            Finish::Cgroup { outside: 0 } => " (cgroup.kill)".into(),
            Finish::Cgroup { outside } => {
                format!(" (cgroup.kill; {outside} outside the cgroup frozen, then killed)")
            }
            Finish::Freeze {
                rounds,
                settled: true,
            } => format!(" (frozen, then killed; {rounds} scan(s))"),
            Finish::Freeze {
                rounds,
                settled: false,
            } => format!(" (still forking after {rounds} freeze scan(s): killed as found)"),
        };
        let survived = if self.survivors > 0 {
            format!(", {} survived", self.survivors)
        } else {
            String::new()
        };
        format!(
            "SIGTERM to {} process(es), SIGKILL to {}{how}{survived}",
            self.termed, self.killed
        )
    }
}

/// The longest a role kill waits between two looks at processes it could not open a pidfd
/// for (it looks after 1 ms, then 2, 4, ... up to this).
const POLL: Duration = Duration::from_millis(100);
/// Most pidfds one wait holds open; the processes beyond are polled (a fork loop can leave
/// thousands, and descriptors are limited).
const MAX_PIDFDS: usize = 256;
/// How often, after `cgroup.kill`, the cgroup is looked at until it is empty.
const CGROUP_POLL: Duration = Duration::from_millis(5);
/// How long the kill phase (after the grace) may take in all.
const AFTER_KILL: Duration = Duration::from_secs(2);
/// Most scans freeze-then-kill makes before it kills what it found even if it is still
/// finding new processes (each scan finds the children forked since the one before, and a
/// stopped process forks no more: a fork loop settles in two or three).
const MAX_FREEZE_ROUNDS: u32 = 50;

/// Stops every process of the target: SIGTERM (plus SIGCONT, so a stopped process gets it) to
/// each, by pidfd, waiting up to `grace` for them to exit and signalling newcomers; then what
/// is left is killed without a chance to fork: `cgroup.kill` on the service's cgroup, and
/// freeze-then-kill for the rest (everything, without a cgroup). An empty service cgroup is
/// removed at the end.
pub async fn kill_role(t: &Target, grace: Duration) -> KillReport {
    let mut report = KillReport::default();
    let term = signal_until_gone(t, grace, &[Signal::SIGTERM, Signal::SIGCONT]).await;
    report.termed = term.signalled;
    if term.left > 0 {
        let deadline = Instant::now() + AFTER_KILL;
        let mut in_cgroup = None;
        // (A cgroup that does not exist or is empty, e.g. of a systemd unit, is skipped.)
        if let Some(cg) = t.cgroup.as_ref().filter(|cg| cg.populated() == Some(true)) {
            let before = cg.pids().len();
            match cg.kill() {
                Ok(()) => {
                    in_cgroup = Some(before);
                    while cg.populated() == Some(true) && Instant::now() < deadline {
                        tokio::time::sleep(CGROUP_POLL).await;
                    }
                }
                Err(e) => eprintln!("keepup-agent: {e}; freezing the processes instead"),
            }
        }
        let frozen = freeze_then_kill(t, deadline).await;
        report.killed = in_cgroup.unwrap_or(0) + frozen.killed;
        report.finish = match in_cgroup {
            Some(_) => Finish::Cgroup {
                outside: frozen.killed,
            },
            None => Finish::Freeze {
                rounds: frozen.rounds,
                settled: frozen.settled,
            },
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let last = signal_until_gone(t, left, &[Signal::SIGKILL]).await;
        if !frozen.settled {
            report.killed += last.signalled;
        }
        report.survivors = last.left;
    }
    if let Some(cg) = &t.cgroup {
        if cg.populated() == Some(false) {
            cg.remove();
        }
    }
    report
}

/// One step of freeze-then-kill, decided from what a scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// SIGSTOP these (new since the last scan), then scan again.
    Stop(Vec<ProcInfo>),
    /// SIGKILL these: every one was stopped before this scan (`settled`), or the bound of
    /// scans or time was reached.
    Kill { procs: Vec<ProcInfo>, settled: bool },
}

/// The decisions of freeze-then-kill: a stopped process cannot fork, and a fork that raced
/// the SIGSTOP either completed before it (so the child shows in the next scan) or is
/// restarted after it; so once a scan finds nothing that was not stopped before, nothing
/// can appear any more, and SIGKILL to all of them ends the role.
#[derive(Debug, Default)]
struct Freezer {
    stopped: HashSet<(i32, Option<u64>)>,
    rounds: u32,
}

impl Freezer {
    fn next(&mut self, found: &[ProcInfo], out_of_time: bool) -> Step {
        self.rounds += 1;
        let new: Vec<ProcInfo> = found
            .iter()
            .filter(|p| !self.stopped.contains(&(p.pid, p.start)))
            .copied()
            .collect();
        if new.is_empty() || out_of_time || self.rounds >= MAX_FREEZE_ROUNDS {
            return Step::Kill {
                procs: found.to_vec(),
                settled: new.is_empty(),
            };
        }
        self.stopped.extend(new.iter().map(|p| (p.pid, p.start)));
        Step::Stop(new)
    }
}

struct Frozen {
    killed: usize,
    rounds: u32,
    settled: bool,
}

/// Freeze-then-kill (see [`Freezer`]), bounded by `deadline` and [`MAX_FREEZE_ROUNDS`]. The
/// launch script's process group, while its leader is unreaped (see [`Target::group`]), is
/// first stopped as a whole (one `killpg`, which a fork cannot race) and killed as a whole at
/// the end.
async fn freeze_then_kill(t: &Target, deadline: Instant) -> Frozen {
    let group = t.group.filter(|&g| g > 1).map(Pid::from_raw);
    if let Some(g) = group {
        let _ = killpg(g, Signal::SIGSTOP);
    }
    let mut freezer = Freezer::default();
    loop {
        let found = victims_async(t).await;
        match freezer.next(&found, Instant::now() >= deadline) {
            Step::Stop(new) => {
                for p in &new {
                    signal_exact(p.pid, p.start, Signal::SIGSTOP);
                }
            }
            Step::Kill { procs, settled } => {
                let killed = procs
                    .iter()
                    .filter(|p| signal_exact(p.pid, p.start, Signal::SIGKILL) == Sent::Delivered)
                    .count();
                if let Some(g) = group {
                    let _ = killpg(g, Signal::SIGKILL);
                }
                return Frozen {
                    killed,
                    rounds: freezer.rounds,
                    settled,
                };
            }
        }
    }
}

struct Round {
    signalled: usize,
    left: usize,
}

/// Sends `sigs` to every victim, waits up to `within` for them to go, and signals newcomers
/// (forked meanwhile) as they are found. Polls only the signalled pids until they are gone,
/// then scans `/proc` again.
async fn signal_until_gone(t: &Target, within: Duration, sigs: &[Signal]) -> Round {
    let deadline = Instant::now() + within;
    let mut done: HashSet<(i32, Option<u64>)> = HashSet::new();
    loop {
        let live = victims_async(t).await;
        if live.is_empty() {
            return Round {
                signalled: done.len(),
                left: 0,
            };
        }
        for p in &live {
            if done.insert((p.pid, p.start)) {
                for &s in sigs {
                    signal_exact(p.pid, p.start, s);
                }
            }
        }
        if Instant::now() >= deadline {
            return Round {
                signalled: done.len(),
                left: live.len(),
            };
        }
        wait_gone(&live, deadline).await;
    }
}

/// Whether the process `p` was is still alive (same pid and start time, not dead).
fn alive(p: &ProcInfo) -> bool {
    read_stat(p.pid).is_some_and(|now| now.start == p.start && !now.is_dead())
}

/// A process a wait can watch: by its pidfd, or by looking at `/proc`.
enum Watch {
    /// The pidfd of the process that was checked (it becomes readable when it exits).
    Pidfd(OwnedFd),
    /// No pidfd (none left, or a kernel without them): look at `/proc`.
    Poll(ProcInfo),
}

/// Opens a pidfd for `p` if it is still the process it was (pid and start time); `None` when it
/// is gone already. The pidfd pins the process, so the start time read after opening it proves
/// which one it watches.
fn watch(p: &ProcInfo, use_pidfd: bool) -> Option<Watch> {
    if !use_pidfd || !PIDFDS.load(Ordering::Relaxed) {
        return alive(p).then_some(Watch::Poll(*p));
    }
    match pidfd_open(p.pid) {
        Ok(fd) => alive(p).then_some(Watch::Pidfd(fd)),
        Err(Errno::ESRCH) => None,
        Err(e) => {
            if e == Errno::ENOSYS {
                PIDFDS.store(false, Ordering::Relaxed);
            }
            alive(p).then_some(Watch::Poll(*p))
        }
    }
}

/// Waits until none of `procs` is alive or `deadline` passed. Each process is watched by its
/// pidfd, which wakes the wait the moment it exits (they are not the agent's children, so
/// there is nothing to `wait` for); those without one (past [`MAX_PIDFDS`], a kernel without
/// pidfds, out of descriptors) are looked at in `/proc` after 1 ms, 2, 4, ... up to [`POLL`].
async fn wait_gone(procs: &[ProcInfo], deadline: Instant) {
    wait_gone_with(procs, deadline, MAX_PIDFDS).await
}

/// [`wait_gone`] with at most `max_pidfds` pidfds.
async fn wait_gone_with(procs: &[ProcInfo], deadline: Instant, max_pidfds: usize) {
    let mut polled = Vec::new();
    let mut fds = Vec::new();
    for (i, p) in procs.iter().enumerate() {
        match watch(p, i < max_pidfds) {
            Some(Watch::Pidfd(fd)) => fds.push((fd, *p)),
            Some(Watch::Poll(p)) => polled.push(p),
            None => {}
        }
    }
    for (fd, p) in fds {
        // SAFETY: an `OwnedFd` is open until dropped, and always returns the same descriptor.
        match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
            Ok(fd) => {
                let exited = tokio::time::timeout_at(deadline.into(), fd.readable()).await;
                if exited.is_err() {
                    return;
                }
            }
            // Not pollable here (no reactor?): look at /proc instead.
            Err(_) => polled.push(p),
        }
    }
    let mut pause = Duration::from_millis(1);
    loop {
        polled.retain(alive);
        if polled.is_empty() || Instant::now() >= deadline {
            return;
        }
        let next = (Instant::now() + pause).min(deadline);
        tokio::time::sleep_until(next.into()).await;
        pause = (pause * 2).min(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let p = parse_stat("4242 (food (x) y) S 17 4242 4242 0 -1 4194560 ...").unwrap();
        assert_eq!((p.pid, p.state, p.ppid, p.pgrp), (4242, 'S', 17, 4242));
        let z = parse_stat("99 (run-foo) Z 1 99 99 0").unwrap();
        assert!(z.is_zombie() && z.is_dead());
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn a_zombie_leader_with_live_threads_is_alive() {
        let line = |state: &str, threads: u32| {
            format!("77 (food) {state} 1 77 77 0 -1 4194560 10 0 0 0 5 3 0 0 20 0 {threads} 0 123456 100 10")
        };
        let p = parse_stat(&line("Z", 3)).unwrap();
        assert_eq!((p.threads, p.start), (Some(3), Some(123456)));
        assert!(p.is_zombie() && !p.is_dead());
        let victim = ProcInfo {
            ruid: Some(998),
            euid: Some(998),
            ..p
        };
        assert!(is_victim(&victim, 998, None, 10));
        let gone = parse_stat(&line("Z", 1)).unwrap();
        assert!(gone.is_dead());
        let me = read_stat(std::process::id() as i32).unwrap();
        assert!(me.threads.is_some_and(|t| t >= 1) && me.start.is_some());
    }

    #[test]
    fn parses_uids_and_namespace_depth() {
        let s = "Name:\tfood\nState:\tS (sleeping)\nPPid:\t1\nUid:\t998\t999\t998\t998\nGid:\t1\t1\t1\t1\nNSpid:\t4242\t7\n";
        let p = parse_status(4242, s).unwrap();
        assert_eq!((p.ruid, p.euid), (Some(998), Some(999)));
        assert_eq!(parse_nspid_depth(s), Some(2));
        assert_eq!(parse_nspid_depth("Name:\tx\n"), None);
    }

    #[test]
    fn parses_status_alone() {
        let s = "Name:\tfood\nUmask:\t0022\nState:\tT (stopped)\nTgid:\t4242\nPPid:\t17\n\
                 Uid:\t998\t999\t998\t998\nNSpid:\t4242\nNSpgid:\t4240\nThreads:\t3\n";
        let p = parse_status(4242, s).unwrap();
        assert_eq!((p.pid, p.ppid, p.pgrp, p.state), (4242, 17, 4240, 'T'));
        assert_eq!(
            (p.ruid, p.euid, p.threads, p.start),
            (Some(998), Some(999), Some(3), None)
        );
        assert!(parse_status(1, "Name:\tx\n").is_none());
        let me = std::fs::read_to_string("/proc/self/status").unwrap();
        let mine = parse_status(std::process::id() as i32, &me).unwrap();
        let stat = read_stat(std::process::id() as i32).unwrap();
        assert_eq!((mine.ppid, mine.pgrp), (stat.ppid, stat.pgrp));
    }

    #[test]
    fn other_pid_namespaces_are_not_the_same() {
        let a = PidNs {
            link: Some("pid:[4026531836]".into()),
            depth: Some(1),
        };
        let b = PidNs {
            link: Some("pid:[4026532999]".into()),
            depth: Some(2),
        };
        assert!(a.same(&a.clone()));
        assert!(!a.same(&b));
        // Without the link (no CAP_SYS_PTRACE): a nested namespace is deeper.
        let nested = PidNs {
            link: None,
            depth: Some(2),
        };
        let same = PidNs {
            link: None,
            depth: Some(1),
        };
        assert!(!a.same(&nested));
        assert!(a.same(&same));
    }

    fn p(pid: i32, pgrp: i32, uid: u32, state: char) -> ProcInfo {
        ProcInfo {
            pid,
            ppid: 1,
            pgrp,
            state,
            threads: Some(1),
            start: Some(1),
            ruid: Some(uid),
            euid: Some(uid),
        }
    }

    #[test]
    fn victims_are_the_role_and_the_launch_group_only() {
        let me = 10;
        assert!(is_victim(&p(50, 50, 998, 'S'), 998, None, me));
        // A stopped (SIGSTOPped) process is still a victim.
        assert!(is_victim(&p(50, 50, 998, 'T'), 998, None, me));
        // Other users, zombies, pid 1 and the agent are not.
        assert!(!is_victim(&p(51, 51, 1000, 'S'), 998, None, me));
        assert!(!is_victim(&p(52, 52, 998, 'Z'), 998, None, me));
        assert!(!is_victim(&p(1, 1, 998, 'S'), 998, None, me));
        assert!(!is_victim(&p(me, me, 998, 'S'), 998, None, me));
        // Root is never a victim by uid, even for a role that resolves to 0 ...
        assert!(!is_victim(&p(53, 53, 0, 'S'), 0, None, me));
        // ... only as a member of the launch script's own process group.
        assert!(is_victim(&p(54, 77, 0, 'S'), 998, Some(77), me));
        assert!(!is_victim(&p(55, 78, 0, 'S'), 998, Some(77), me));
    }

    #[test]
    fn finds_own_processes_in_own_namespace() {
        let uid = nix::unistd::getuid().as_raw();
        if uid == 0 {
            return; // uid 0 is never a victim by uid.
        }
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let found = victims(&Target {
            uid,
            ..Target::default()
        });
        let _ = child.kill();
        let _ = child.wait();
        assert!(found.iter().any(|p| p.pid == pid), "{found:?}");
        assert!(!found.iter().any(|p| p.pid == std::process::id() as i32));
    }

    fn started(pid: i32, start: u64) -> ProcInfo {
        ProcInfo {
            start: Some(start),
            ..p(pid, pid, 998, 'S')
        }
    }

    #[test]
    fn freeze_stops_newcomers_until_a_scan_finds_none() {
        let mut f = Freezer::default();
        let (shell, s1, s2) = (started(10, 1), started(11, 2), started(12, 3));
        // A fork loop: each scan finds the children forked since the last one.
        assert_eq!(f.next(&[shell, s1], false), Step::Stop(vec![shell, s1]));
        assert_eq!(f.next(&[shell, s1, s2], false), Step::Stop(vec![s2]));
        // Nothing new: every process found is stopped; kill them all.
        assert_eq!(
            f.next(&[shell, s1, s2], false),
            Step::Kill {
                procs: vec![shell, s1, s2],
                settled: true
            }
        );
        // A recycled pid (same pid, new start time) is a new process.
        let mut f = Freezer::default();
        f.next(&[shell], false);
        let reborn = started(10, 99);
        assert_eq!(f.next(&[reborn], false), Step::Stop(vec![reborn]));
        // Nothing at all: kill nothing, at once.
        assert_eq!(
            Freezer::default().next(&[], false),
            Step::Kill {
                procs: vec![],
                settled: true
            }
        );
    }

    #[test]
    fn freeze_is_bounded_in_scans_and_time() {
        let mut f = Freezer::default();
        let mut last = None;
        for i in 0..MAX_FREEZE_ROUNDS as i32 {
            last = Some(f.next(&[started(100 + i, 1)], false));
        }
        assert_eq!(
            last,
            Some(Step::Kill {
                procs: vec![started(100 + MAX_FREEZE_ROUNDS as i32 - 1, 1)],
                settled: false
            })
        );
        let mut f = Freezer::default();
        f.next(&[started(1000, 1)], false);
        assert_eq!(
            f.next(&[started(1000, 1), started(1001, 1)], true),
            Step::Kill {
                procs: vec![started(1000, 1), started(1001, 1)],
                settled: false
            }
        );
    }

    #[test]
    fn a_signal_reaches_only_the_process_with_the_start_time_it_was_meant_for() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let start = read_stat(pid).unwrap().start.unwrap();
        // The pid with another start time is another process (a recycled pid): not signalled.
        assert_eq!(
            signal_exact(pid, Some(start + 1), Signal::SIGKILL),
            Sent::NotSame
        );
        assert_eq!(signal_exact(pid, None, Signal::SIGKILL), Sent::NotSame);
        std::thread::sleep(Duration::from_millis(50));
        assert!(child.try_wait().unwrap().is_none(), "the wrong kill landed");
        // The right start time: delivered.
        assert_eq!(
            signal_exact(pid, Some(start), Signal::SIGKILL),
            Sent::Delivered
        );
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.wait().unwrap().signal(), Some(9));
        // Reaped: gone (or, if the pid was reused already, not the same).
        assert_ne!(
            signal_exact(pid, Some(start), Signal::SIGKILL),
            Sent::Delivered
        );
        // Never pid 1 or the agent itself.
        let me = std::process::id() as i32;
        let my_start = read_stat(me).unwrap().start;
        assert_eq!(signal_exact(me, my_start, Signal::SIGCONT), Sent::NotSame);
        assert_eq!(
            signal_exact(1, read_stat(1).and_then(|p| p.start), Signal::SIGCONT),
            Sent::NotSame
        );
    }

    /// Waits (pidfds for the first `max_pidfds`, `/proc` for the rest) for two processes
    /// that exit by themselves after a moment, with a deadline far away.
    fn wait_for_two_exits(max_pidfds: usize) -> Duration {
        let mut children: Vec<_> = (0..2)
            .map(|_| {
                std::process::Command::new("sleep")
                    .arg("0.3")
                    .spawn()
                    .unwrap()
            })
            .collect();
        let procs: Vec<ProcInfo> = children
            .iter()
            .map(|c| read_stat(c.id() as i32).unwrap())
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let t0 = Instant::now();
        rt.block_on(wait_gone_with(
            &procs,
            t0 + Duration::from_secs(600),
            max_pidfds,
        ));
        let took = t0.elapsed();
        // Exited (zombies until reaped here): the wait saw them go.
        assert!(!procs.iter().any(alive), "the wait returned early");
        for c in &mut children {
            c.wait().unwrap();
        }
        took
    }

    #[test]
    fn a_wait_ends_when_the_processes_exit_not_at_its_deadline() {
        // By pidfd, by /proc polling, and mixed: well before the 600 s deadline.
        for max_pidfds in [MAX_PIDFDS, 0, 1] {
            let took = wait_for_two_exits(max_pidfds);
            assert!(took < Duration::from_secs(300), "{max_pidfds}: {took:?}");
        }
    }

    #[test]
    fn a_pidfd_watches_only_the_process_that_was_checked() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let p = read_stat(child.id() as i32).unwrap();
        assert!(matches!(watch(&p, true), Some(Watch::Pidfd(_))));
        assert!(matches!(watch(&p, false), Some(Watch::Poll(_))));
        // Another start time is another process: nothing to watch.
        let other = ProcInfo {
            start: p.start.map(|s| s + 1),
            ..p
        };
        assert!(watch(&other, true).is_none());
        let Some(Watch::Pidfd(fd)) = watch(&p, true) else {
            panic!("no pidfd")
        };
        let readable = |fd: &OwnedFd| {
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, valid for the call; a zero timeout does not block.
            unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
        };
        assert!(!readable(&fd), "readable before the exit");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(readable(&fd), "not readable after the exit");
        // Exited and reaped: nothing to watch.
        assert!(watch(&p, true).is_none());
    }

    #[test]
    fn reports_say_how_the_stop_ended() {
        let r = KillReport {
            termed: 3,
            killed: 2,
            survivors: 0,
            finish: Finish::Cgroup { outside: 0 },
        };
        assert_eq!(
            r.describe(),
            "SIGTERM to 3 process(es), SIGKILL to 2 (cgroup.kill)"
        );
        let f = KillReport {
            finish: Finish::Freeze {
                rounds: 3,
                settled: true,
            },
            survivors: 1,
            ..r
        };
        assert_eq!(
            f.describe(),
            "SIGTERM to 3 process(es), SIGKILL to 2 (frozen, then killed; 3 scan(s)), 1 survived"
        );
    }
}
