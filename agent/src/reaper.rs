//! Child subreaper: orphans of supervised services (a double-forked daemon's parent exiting,
//! a launch script's background helper) are reparented to the agent instead of PID 1, and the
//! agent reaps them so no zombie is left, even when the agent is a container's PID 1 or runs
//! under an init that does not reap.
//!
//! The agent also has children that tokio reaps itself (launch scripts, exec probes,
//! `systemctl`): a blind `waitpid(-1)` would steal their exit statuses. So the reaper never
//! does that. On SIGCHLD it lists the agent's children (`/proc/self/task/*/children`), finds
//! the zombies among them, skips the pids the agent spawned and still waits for ([`Spawned`]),
//! and reaps the others by pid, but only once they have been zombies for [`SETTLE`]: tokio reaps a child it
//! waits for within milliseconds, so anything still a zombie after that is an orphan (or a
//! child nobody waits for any more; an exec probe's child is always waited for).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::libc;
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::signal::unix::{signal, SignalKind};

/// How long a zombie child must have been seen before the reaper takes it.
pub const SETTLE: Duration = Duration::from_millis(200);

/// Pids of children the agent spawned and waits for through tokio; the reaper leaves them alone.
/// Among them, the package-manager runs in flight, which a stopping agent lets finish.
#[derive(Debug, Clone, Default)]
pub struct Spawned(Arc<Mutex<Children>>);

#[derive(Debug, Default)]
struct Children {
    pids: HashSet<i32>,
    package_runs: BTreeSet<i32>,
    stopping: bool,
}

impl Spawned {
    fn lock(&self) -> std::sync::MutexGuard<'_, Children> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `pid` as waited for by its owner.
    pub fn insert(&self, pid: i32) {
        self.lock().pids.insert(pid);
    }

    /// Forgets `pid` (its owner reaped it).
    pub fn remove(&self, pid: i32) {
        let mut c = self.lock();
        c.pids.remove(&pid);
        c.package_runs.remove(&pid);
    }

    fn contains(&self, pid: i32) -> bool {
        self.lock().pids.contains(&pid)
    }

    /// Marks `pid` (the leader of its own process group) as a package-manager run, waited for
    /// by its owner.
    pub fn insert_package_run(&self, pid: i32) {
        let mut c = self.lock();
        c.pids.insert(pid);
        c.package_runs.insert(pid);
    }

    /// Package-manager runs in flight (their process groups).
    pub fn package_runs(&self) -> Vec<i32> {
        self.lock().package_runs.iter().copied().collect()
    }

    /// From now on, no new package-manager run may start (the agent is stopping).
    pub fn stop_package_runs(&self) {
        self.lock().stopping = true;
    }

    /// Is the agent stopping?
    pub fn stopping(&self) -> bool {
        self.lock().stopping
    }
}

/// A child the agent spawned itself (not through tokio's `Command`) and waits for through
/// its pidfd: the pidfd becomes readable when the child exits, then `waitpid` reaps it. Its
/// owner keeps the pid in [`Spawned`] until it has the exit status, so the subreaper leaves
/// it alone; a dropped, unreaped one is reaped by the subreaper once its pid is removed.
#[derive(Debug)]
pub struct PidfdChild {
    pid: i32,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
}

impl PidfdChild {
    /// Watches `pidfd` (of child `pid`) on the current tokio runtime.
    pub fn new(pid: i32, pidfd: OwnedFd) -> std::io::Result<PidfdChild> {
        // SAFETY: an `OwnedFd` is open until dropped, and always returns the same descriptor.
        let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE)? };
        Ok(PidfdChild {
            pid,
            pidfd,
            status: None,
        })
    }

    /// The child's pid.
    pub fn id(&self) -> i32 {
        self.pid
    }

    /// Reaps the child if it has exited (never blocks).
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        reap(self.pid, &mut self.status)
    }

    /// Waits for the child to exit and reaps it.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        loop {
            if let Some(status) = reap(self.pid, &mut self.status)? {
                return Ok(status);
            }
            let mut ready = self.pidfd.readable().await?;
            if reap(self.pid, &mut self.status)?.is_none() {
                ready.clear_ready();
            }
        }
    }
}

/// `waitpid(pid, WNOHANG)` once, keeping the status in `status`.
fn reap(pid: i32, status: &mut Option<ExitStatus>) -> std::io::Result<Option<ExitStatus>> {
    if status.is_none() {
        let mut raw = 0;
        // SAFETY: waitpid on our own child, which nobody else reaps (see `Spawned`).
        match unsafe { libc::waitpid(pid, &mut raw, libc::WNOHANG) } {
            0 => {}
            p if p == pid => *status = Some(ExitStatus::from_raw(raw)),
            _ => return Err(std::io::Error::last_os_error()),
        }
    }
    Ok(*status)
}

/// Makes the agent the child subreaper for everything it starts.
pub fn become_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// Zombie children of `me` that are ready to be reaped at `now`: seen as zombies for at least
/// [`SETTLE`] (first sightings are recorded in `seen`) and not in `spawned`.
fn ready(
    zombies: &[i32],
    spawned: &dyn Fn(i32) -> bool,
    seen: &mut HashMap<i32, Instant>,
    now: Instant,
) -> Vec<i32> {
    seen.retain(|pid, _| zombies.contains(pid));
    let mut out = Vec::new();
    for &pid in zombies {
        if spawned(pid) {
            continue;
        }
        let first = *seen.entry(pid).or_insert(now);
        if now.saturating_duration_since(first) >= SETTLE {
            out.push(pid);
        }
    }
    out
}

/// Pids of the agent's direct children, from `/proc/self/task/*/children` (one small read per
/// agent thread instead of a walk over every process), or a full `/proc` scan if the kernel
/// lacks that file.
fn children(me: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        match std::fs::read_to_string(t.path().join("children")) {
            Ok(text) => out.extend(
                text.split_ascii_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            ),
            Err(_) => {
                return crate::role::scan()
                    .into_iter()
                    .filter(|p| p.ppid == me)
                    .map(|p| p.pid)
                    .collect()
            }
        }
    }
    out
}

/// The agent's zombie children now, except those in `spawned` (tokio reaps them; their
/// `stat` is not even read, so the SIGCHLD of a launch script's exit costs one small read).
/// A zombie thread-group leader whose other threads still run cannot be reaped yet (and is
/// not gone): it is left out, so the reaper does not poll it; its last thread's exit brings
/// another SIGCHLD.
fn zombies(me: i32, spawned: &Spawned) -> Vec<i32> {
    children(me)
        .into_iter()
        .filter(|&pid| !spawned.contains(pid))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| crate::role::parse_stat(&s))
                .is_some_and(|p| p.ppid == me && p.is_dead())
        })
        .collect()
}

/// Dead children of the agent (zombies it has not reaped yet) whose real uid is `uid`.
fn dead_children_of(uid: u32) -> usize {
    let me = std::process::id() as i32;
    children(me)
        .into_iter()
        .filter(|&pid| {
            crate::role::read_stat(pid).is_some_and(|p| p.ppid == me && p.is_dead())
                && std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| crate::role::parse_status(pid, &s))
                    .and_then(|p| p.ruid)
                    == Some(uid)
        })
        .count()
}

/// Waits until no dead child of the agent has real uid `uid`, or `within` has passed; the
/// number still unreaped. A killed run's processes become the agent's zombies (orphans
/// reparented to the subreaper), which [`run`] reaps after [`SETTLE`]. Until then they count
/// against the role's process limit (`RLIMIT_NPROC`, a spec's `limits.nproc`), so a run started
/// earlier could not fork as many processes as its spec allows. Costs one small read per
/// agent thread when there is nothing to wait for.
pub async fn orphans_reaped(uid: u32, within: Duration) -> usize {
    let start = Instant::now();
    loop {
        let left = dead_children_of(uid);
        if left == 0 || start.elapsed() >= within {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs forever: reaps orphaned zombies as described in the module documentation. Idle costs
/// nothing: it wakes on SIGCHLD, and again after [`SETTLE`] while zombies are pending.
pub async fn run(spawned: Spawned) {
    let me = std::process::id() as i32;
    let Ok(mut sigchld) = signal(SignalKind::child()) else {
        eprintln!("keepup-agent: cannot watch SIGCHLD; orphans will not be reaped");
        return;
    };
    let mut seen: HashMap<i32, Instant> = HashMap::new();
    loop {
        if seen.is_empty() {
            if sigchld.recv().await.is_none() {
                return;
            }
        } else {
            // Zombies are pending: look again once they have settled (or at the next SIGCHLD).
            tokio::select! {
                _ = tokio::time::sleep(SETTLE) => {}
                _ = sigchld.recv() => {}
            }
        }
        let zombies = zombies(me, &spawned);
        let pids = ready(
            &zombies,
            &|p| spawned.contains(p),
            &mut seen,
            Instant::now(),
        );
        for pid in pids {
            let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
            seen.remove(&pid);
        }
        // Zombies that are spawned children are tokio's business, not pending for us.
        seen.retain(|p, _| !spawned.contains(*p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reaps_only_settled_zombies_that_are_not_spawned_children() {
        let t0 = Instant::now();
        let mut seen = HashMap::new();
        let spawned = |p: i32| p == 7;
        // First sighting: nothing yet.
        assert!(ready(&[5, 7], &spawned, &mut seen, t0).is_empty());
        // After the settle time the orphan goes, the spawned child stays.
        assert_eq!(ready(&[5, 7], &spawned, &mut seen, t0 + SETTLE), vec![5]);
        // A zombie that vanished (its owner reaped it) is forgotten.
        ready(&[], &spawned, &mut seen, t0 + SETTLE);
        assert!(seen.is_empty());
    }
}
