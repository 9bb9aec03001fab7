//! Running a package-manager command bounded in time: in its own process group, with a clean
//! environment, stdin from /dev/null, stdout and stderr in one pipe of which the last
//! [`TAIL_BYTES`] are kept. When the time is up the whole group gets SIGTERM (and SIGCONT), then
//! SIGKILL after a grace, and the command is reaped: a hung maintainer script cannot hang the
//! agent.
//!
//! When the agent is told to stop, a run in flight may finish (see [`finish_before_exit`]):
//! stopping the agent is also how its own package restarts it after an upgrade, from inside
//! the very dpkg run the updater started, and killing that run would leave the upgrade split.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::reaper::Spawned;

/// How much of a command's output is kept (its end).
pub const TAIL_BYTES: usize = 16 * 1024;

/// When the agent stops, how long a package-manager run in flight may take to finish (under
/// the systemd unit's `TimeoutStopSec=60s`).
pub const PACKAGE_RUN_GRACE: Duration = Duration::from_secs(45);

/// After the timeout's SIGTERM, how long before SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// After the command exits, how long to wait for the rest of its output (a process it left
/// running may hold the pipe open).
const DRAIN: Duration = Duration::from_millis(500);

/// The environment every package-manager command gets (nothing else is inherited).
pub const ENV: [(&str, &str); 6] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("LC_ALL", "C"),
    ("HOME", "/root"),
    ("DEBIAN_FRONTEND", "noninteractive"),
    ("DEBCONF_NONINTERACTIVE_SEEN", "true"),
    ("APT_LISTCHANGES_FRONTEND", "none"),
];

/// The agent is stopping: no new package-manager run that changes the system starts (see
/// `PackageManager`), and the ones in flight (in
/// `spawned`) get up to `bound` to finish; after that their process groups are killed (TERM,
/// then KILL after [`KILL_GRACE`]) and the next agent repairs. Returns how many runs were in
/// flight.
pub async fn finish_before_exit(spawned: &Spawned, bound: Duration) -> usize {
    spawned.stop_package_runs();
    let running = spawned.package_runs();
    if running.is_empty() {
        return 0;
    }
    eprintln!(
        "keepup-agent: waiting up to {} for the package manager (process group {}) to finish",
        humantime::format_duration(bound),
        running
            .iter()
            .map(i32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let gone = |within: Duration| async move {
        let deadline = tokio::time::Instant::now() + within;
        while !spawned.package_runs().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        spawned.package_runs().is_empty()
    };
    if gone(bound).await {
        eprintln!("keepup-agent: the package manager finished");
        return running.len();
    }
    eprintln!(
        "keepup-agent: the package manager is still running after {}: killing it (the next \
         agent repairs with the package manager before anything else)",
        humantime::format_duration(bound)
    );
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        for p in spawned.package_runs() {
            let _ = killpg(Pid::from_raw(p), signal);
            let _ = killpg(Pid::from_raw(p), Signal::SIGCONT);
        }
        if gone(KILL_GRACE).await {
            break;
        }
    }
    running.len()
}

/// How a bounded command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exit status 0.
    Ok {
        /// The end of its output.
        output_tail: String,
    },
    /// Exited non-zero, was killed by a signal, or could not be started.
    Failed {
        /// Exit code (None: killed by a signal, or not started).
        code: Option<i32>,
        /// The end of its output (or why it could not start).
        output_tail: String,
    },
    /// Still running after the timeout: its process group was killed.
    Hung {
        /// The timeout.
        after: Duration,
        /// The end of its output.
        output_tail: String,
    },
}

impl Outcome {
    /// Did it succeed?
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok { .. })
    }

    /// The end of the output, whatever the outcome.
    pub fn output_tail(&self) -> &str {
        match self {
            Outcome::Ok { output_tail }
            | Outcome::Failed { output_tail, .. }
            | Outcome::Hung { output_tail, .. } => output_tail,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Ok { .. } => f.write_str("ok"),
            Outcome::Failed { code: Some(c), .. } => write!(f, "failed (exit status {c})"),
            Outcome::Failed { code: None, .. } => f.write_str("failed (killed by a signal)"),
            Outcome::Hung { after, .. } => write!(
                f,
                "hung: still running after {}, killed with its process group",
                humantime::format_duration(*after)
            ),
        }
    }
}

#[derive(Default)]
struct Tail(VecDeque<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.0.extend(bytes);
        let excess = self.0.len().saturating_sub(TAIL_BYTES);
        self.0.drain(..excess);
    }

    fn text(&self) -> String {
        let (a, b) = self.0.as_slices();
        let mut v = Vec::with_capacity(a.len() + b.len());
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }
}

/// Runs `argv` bounded by `timeout` (see the module doc). `spawned` is the agent's list of
/// children it waits for itself, so the subreaper leaves this one alone.
pub async fn run(argv: &[&str], timeout: Duration, spawned: Option<&Spawned>) -> Outcome {
    let failed = |why: String| Outcome::Failed {
        code: None,
        output_tail: why,
    };
    let Some((prog, args)) = argv.split_first() else {
        return failed("empty command".into());
    };
    let (rx, tx): (OwnedFd, OwnedFd) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => return failed(format!("pipe: {e}")),
    };
    let tx2 = match tx.try_clone() {
        Ok(t) => t,
        Err(e) => return failed(format!("pipe: {e}")),
    };
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .env_clear()
        .envs(ENV)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::from(tx))
        .stderr(Stdio::from(tx2))
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return failed(format!("cannot run {prog}: {e}")),
    };
    // The parent's copies of the write end were moved into `cmd`: drop them so EOF comes.
    drop(cmd);
    let pid = child.id().map(|p| p as i32);
    if let (Some(s), Some(p)) = (spawned, pid) {
        s.insert_package_run(p);
    }
    let tail = Arc::new(Mutex::new(Tail::default()));
    let mut reader = {
        let tail = tail.clone();
        tokio::spawn(async move {
            let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(rx) else {
                return;
            };
            let mut buf = [0u8; 8192];
            while let Ok(n) = rx.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                tail.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(&buf[..n]);
            }
        })
    };
    let status = tokio::time::timeout(timeout, child.wait()).await;
    let hung = status.is_err();
    let status = match status {
        Ok(s) => s.ok(),
        Err(_) => {
            if let Some(p) = pid {
                let _ = killpg(Pid::from_raw(p), Signal::SIGTERM);
                let _ = killpg(Pid::from_raw(p), Signal::SIGCONT);
            }
            match tokio::time::timeout(KILL_GRACE, child.wait()).await {
                Ok(s) => s.ok(),
                Err(_) => {
                    if let Some(p) = pid {
                        let _ = killpg(Pid::from_raw(p), Signal::SIGKILL);
                    }
                    child.wait().await.ok()
                }
            }
        }
    };
    if hung {
        // Whatever is left of the group (the leader may have exited on TERM before its
        // children did) goes too.
        if let Some(p) = pid {
            let _ = killpg(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
    if let (Some(s), Some(p)) = (spawned, pid) {
        s.remove(p);
    }
    if tokio::time::timeout(DRAIN, &mut reader).await.is_err() {
        reader.abort();
    }
    let output_tail = tail.lock().unwrap_or_else(|e| e.into_inner()).text();
    if hung {
        return Outcome::Hung {
            after: timeout,
            output_tail,
        };
    }
    match status {
        Some(s) if s.success() => Outcome::Ok { output_tail },
        Some(s) => Outcome::Failed {
            code: s.code(),
            output_tail,
        },
        None => Outcome::Failed {
            code: None,
            output_tail,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn alive(pid: i32) -> bool {
        // A zombie counts as gone.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => !s
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z'),
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn ok_and_output() {
        let o = run(
            &["sh", "-c", "echo out; echo err >&2"],
            Duration::from_secs(10),
            None,
        )
        .await;
        assert!(o.is_ok(), "{o:?}");
        assert_eq!(o.output_tail(), "out\nerr\n");
    }

    #[tokio::test]
    async fn clean_environment() {
        std::env::set_var("KEEPUP_TEST_LEAK", "1");
        let o = run(&["sh", "-c", "env | sort"], Duration::from_secs(10), None).await;
        let env = o.output_tail();
        assert!(env.contains("DEBIAN_FRONTEND=noninteractive\n"), "{env}");
        assert!(!env.contains("KEEPUP_TEST_LEAK"), "{env}");
    }

    #[tokio::test]
    async fn failure_keeps_the_tail() {
        let o = run(
            &[
                "sh",
                "-c",
                "i=0; while [ $i -lt 5000 ]; do echo line $i; i=$((i+1)); done; exit 3",
            ],
            Duration::from_secs(10),
            None,
        )
        .await;
        match &o {
            Outcome::Failed { code, output_tail } => {
                assert_eq!(*code, Some(3));
                assert!(output_tail.len() <= TAIL_BYTES);
                assert!(output_tail.ends_with("line 4999\n"), "{output_tail}");
            }
            other => panic!("{other:?}"),
        }
        let o = run(&["/nonexistent/dpkg"], Duration::from_secs(1), None).await;
        assert!(
            o.output_tail().contains("cannot run /nonexistent/dpkg"),
            "{o:?}"
        );
    }

    #[tokio::test]
    async fn a_hung_command_is_killed_with_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        // A "maintainer script" that starts a helper which ignores TERM, then hangs.
        let script = format!(
            "sh -c 'trap \"\" TERM; echo $$ >> {p}; sleep 600' & echo $$ >> {p}; echo hanging; \
             sleep 600",
            p = pids.display()
        );
        let t0 = Instant::now();
        let o = run(&["sh", "-c", &script], Duration::from_millis(500), None).await;
        let took = t0.elapsed();
        match &o {
            Outcome::Hung { after, output_tail } => {
                assert_eq!(*after, Duration::from_millis(500));
                assert_eq!(output_tail, "hanging\n");
            }
            other => panic!("{other:?}"),
        }
        assert!(took < Duration::from_secs(8), "{took:?}");
        assert!(
            o.to_string().starts_with("hung: still running after 500ms"),
            "{o}"
        );
        // Give init (or the test's subreaper) a moment to reap the orphans.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let text = std::fs::read_to_string(&pids).unwrap();
        for pid in text.split_whitespace() {
            let pid: i32 = pid.parse().unwrap();
            assert!(!alive(pid), "pid {pid} survived");
        }
    }

    #[tokio::test]
    async fn a_stopping_agent_lets_the_run_finish() {
        let spawned = Spawned::default();
        let run_it = |cmd: &'static str, s: Spawned| {
            tokio::spawn(
                async move { run(&["sh", "-c", cmd], Duration::from_secs(60), Some(&s)).await },
            )
        };
        let first = run_it("sleep 0.5; echo done", spawned.clone());
        while spawned.package_runs().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            finish_before_exit(&spawned, Duration::from_secs(10)).await,
            1
        );
        let o = first.await.unwrap();
        assert_eq!(
            o,
            Outcome::Ok {
                output_tail: "done\n".into()
            }
        );
        assert!(spawned.stopping());
        assert!(spawned.package_runs().is_empty());
    }

    #[tokio::test]
    async fn a_run_past_the_bound_is_killed_with_its_group() {
        let spawned = Spawned::default();
        let s = spawned.clone();
        let hung = tokio::spawn(async move {
            run(
                &["sh", "-c", "trap '' TERM; sleep 600"],
                Duration::from_secs(600),
                Some(&s),
            )
            .await
        });
        while spawned.package_runs().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t0 = Instant::now();
        assert_eq!(
            finish_before_exit(&spawned, Duration::from_millis(300)).await,
            1
        );
        assert!(t0.elapsed() < KILL_GRACE * 2 + Duration::from_secs(2));
        let o = hung.await.unwrap();
        assert!(matches!(o, Outcome::Failed { code: None, .. }), "{o:?}");
    }
}
