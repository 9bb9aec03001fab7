//! The `pkill -u ${role}` contract: find every process of a role's uid in `/proc` and stop it
//! (TERM, wait the grace, KILL). This is how the agent stops a service, kills a hung one, and
//! gains control at start: by the role's uid, never by a pidfile. A daemon that double-forked
//! away from its launch script keeps the uid, so it is still found.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

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
    /// Real uid (`None` when only `stat` was read).
    pub ruid: Option<u32>,
    /// Effective uid (`None` when only `stat` was read).
    pub euid: Option<u32>,
}

impl ProcInfo {
    /// Whether the process has exited and waits to be reaped.
    pub fn is_zombie(&self) -> bool {
        self.state == 'Z' || self.state == 'X'
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
    Some(ProcInfo {
        pid,
        ppid,
        pgrp,
        state,
        ruid: None,
        euid: None,
    })
}

/// Parses the `Uid:` line of `/proc/<pid>/status` into (real, effective).
pub fn parse_status_uids(text: &str) -> Option<(u32, u32)> {
    let line = text.lines().find(|l| l.starts_with("Uid:"))?;
    let mut f = line["Uid:".len()..].split_ascii_whitespace();
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

/// Every process now in `/proc`, with uids when `with_uids` (one more file read each).
/// Processes that vanish while being read are skipped.
pub fn scan(with_uids: bool) -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(mut info) = parse_stat(&stat) else {
            continue;
        };
        if with_uids {
            let Some((r, e)) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| parse_status_uids(&s))
            else {
                continue;
            };
            info.ruid = Some(r);
            info.euid = Some(e);
        }
        out.push(info);
    }
    out
}

/// Whether `p` is a live process the role kill must stop: its real or effective uid is the
/// role's, or it is in the launch script's process group `group`. Never pid 1, never the agent
/// itself, never a zombie, and never anything by uid 0.
pub fn is_victim(p: &ProcInfo, uid: u32, group: Option<i32>, me: i32) -> bool {
    if p.pid <= 1 || p.pid == me || p.is_zombie() {
        return false;
    }
    let by_uid = uid != 0 && (p.ruid == Some(uid) || p.euid == Some(uid));
    let by_group = group.is_some_and(|g| g > 1 && p.pgrp == g);
    by_uid || by_group
}

/// Live processes of the role (and of `group`), as pids.
pub fn victims(uid: u32, group: Option<i32>) -> Vec<i32> {
    let me = std::process::id() as i32;
    scan(true)
        .into_iter()
        .filter(|p| is_victim(p, uid, group, me))
        .map(|p| p.pid)
        .collect()
}

/// What a role kill did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KillReport {
    /// Processes sent SIGTERM.
    pub termed: usize,
    /// Processes still alive after the grace, sent SIGKILL.
    pub killed: usize,
    /// Processes still alive after SIGKILL (should be 0; e.g. stuck in uninterruptible I/O).
    pub survivors: usize,
}

/// How often a role kill looks again whether the role's processes are gone.
const POLL: Duration = Duration::from_millis(20);
/// How long to wait for SIGKILLed processes to disappear.
const AFTER_KILL: Duration = Duration::from_secs(2);

/// Stops every process of role `uid` (and of process group `group`, the launch script's, which
/// may still run as root before it switches to the role): SIGTERM (plus SIGCONT, so a stopped
/// process gets it), wait up to `grace` for them to exit, SIGKILL the rest.
pub async fn kill_role(uid: u32, group: Option<i32>, grace: Duration) -> KillReport {
    let mut report = KillReport::default();
    let first = victims(uid, group);
    report.termed = first.len();
    if first.is_empty() {
        return report;
    }
    for &pid in &first {
        signal(pid, Signal::SIGTERM);
        signal(pid, Signal::SIGCONT);
    }
    if let Some(g) = group.filter(|&g| g > 1) {
        let _ = killpg(Pid::from_raw(g), Signal::SIGTERM);
        let _ = killpg(Pid::from_raw(g), Signal::SIGCONT);
    }
    if wait_gone(uid, group, grace).await {
        return report;
    }
    let rest = victims(uid, group);
    report.killed = rest.len();
    for &pid in &rest {
        signal(pid, Signal::SIGKILL);
    }
    if let Some(g) = group.filter(|&g| g > 1) {
        let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
    }
    if !wait_gone(uid, group, AFTER_KILL).await {
        report.survivors = victims(uid, group).len();
    }
    report
}

fn signal(pid: i32, sig: Signal) {
    if pid > 1 && pid != std::process::id() as i32 {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// Polls until no victim is left (true) or `within` passed (false).
async fn wait_gone(uid: u32, group: Option<i32>, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if victims(uid, group).is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
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
        assert!(z.is_zombie());
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn parses_uids() {
        let s = "Name:\tfood\nState:\tS (sleeping)\nUid:\t998\t999\t998\t998\nGid:\t1\t1\t1\t1\n";
        assert_eq!(parse_status_uids(s), Some((998, 999)));
        assert_eq!(parse_status_uids("Name:\tx\n"), None);
    }

    fn p(pid: i32, pgrp: i32, uid: u32, state: char) -> ProcInfo {
        ProcInfo {
            pid,
            ppid: 1,
            pgrp,
            state,
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
    fn scan_finds_this_process() {
        let me = std::process::id() as i32;
        let all = scan(true);
        let mine = all.iter().find(|p| p.pid == me).expect("own pid in /proc");
        assert_eq!(mine.ruid, Some(nix::unistd::getuid().as_raw()));
    }
}
