//! Exec probe: run a command (no shell) in its own process group; exit status 0 passes.
//!
//! The command gets `/dev/null` as stdin, a cleared environment with a standard `PATH`, `/` as
//! working directory, and optionally another uid/gid (supplementary groups are then dropped). On
//! timeout the whole process group is SIGKILLed and the command reaped. When the command exits,
//! anything it left behind in its process group is SIGKILLed too, so a probe never accumulates
//! stray processes or waits on a grandchild that holds its output open.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use crate::{text, ProbeError, ProbeResult};

/// Output kept per stream (stdout, stderr) for the reason.
const OUTPUT_CAP: usize = 4096;
/// How long to keep reading output after the command exited (a process outside the group may
/// still hold the pipes open).
const DRAIN: Duration = Duration::from_millis(200);
/// How long to wait for a SIGKILLed command to be reaped.
const REAP: Duration = Duration::from_secs(5);
/// `PATH` given to probe commands.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Numeric credentials to run an exec probe with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// User id (the service's role user).
    pub uid: u32,
    /// Primary group id; supplementary groups are cleared.
    pub gid: u32,
}

/// What an exec probe runs, as plain data (e.g. converted from a manifest).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecSpec {
    /// Program and arguments; the program is looked up in the standard `PATH`. No shell.
    pub argv: Vec<String>,
    /// Credentials to switch to before exec (needs root); `None` keeps the agent's.
    pub run_as: Option<RunAs>,
}

/// A validated exec probe.
#[derive(Debug, Clone)]
pub struct ExecProbe {
    argv: Vec<String>,
    run_as: Option<RunAs>,
}

/// SIGKILLs a process group when dropped while armed (e.g. when a run is cancelled).
struct GroupKiller {
    pgid: i32,
    armed: bool,
}

impl GroupKiller {
    fn kill(&self) {
        if self.pgid > 1 {
            // SAFETY: plain syscall; a negative pid addresses the process group we created.
            unsafe {
                libc::kill(-self.pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if self.armed {
            self.kill();
        }
    }
}

impl ExecProbe {
    /// Checks that there is a program to run.
    pub fn new(spec: ExecSpec) -> Result<Self, ProbeError> {
        match spec.argv.first() {
            Some(program) if !program.is_empty() => Ok(ExecProbe {
                argv: spec.argv,
                run_as: spec.run_as,
            }),
            _ => Err(ProbeError::EmptyCommand),
        }
    }

    /// One-line summary, e.g. `exec /usr/bin/check --quick as 1001:1001`.
    pub fn describe(&self) -> String {
        let args: Vec<String> = self.argv.iter().map(|a| quote(a)).collect();
        let mut s = format!("exec {}", args.join(" "));
        if let Some(r) = self.run_as {
            s.push_str(&format!(" as {}:{}", r.uid, r.gid));
        }
        s
    }

    /// Runs the command once; `timeout` covers spawn to exit. A timed-out command's process
    /// group is killed and reaped before this returns.
    pub async fn run(&self, timeout: Duration) -> ProbeResult {
        let start = Instant::now();
        let (ok, reason) = self.execute(timeout).await;
        ProbeResult {
            ok,
            reason,
            duration: start.elapsed(),
        }
    }

    async fn execute(&self, timeout: Duration) -> (bool, String) {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .env_clear()
            .env("PATH", PATH)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(r) = self.run_as {
            // std drops supplementary groups (setgroups(0)) when it switches uid as root.
            cmd.uid(r.uid).gid(r.gid);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let who = match self.run_as {
                    Some(r) => format!(" as {}:{}", r.uid, r.gid),
                    None => String::new(),
                };
                return (
                    false,
                    format!("cannot run {}{who}: {}", self.argv[0], text::io_error(&e)),
                );
            }
        };
        let pgid = child.id().map_or(0, |id| id as i32);
        let mut killer = GroupKiller { pgid, armed: true };
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return (false, "cannot capture the command's output".into());
        };
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut exited = None;
        let _ = tokio::time::timeout(timeout, async {
            let reading = async {
                tokio::join!(read_capped(stdout, &mut out), read_capped(stderr, &mut err))
            };
            tokio::pin!(reading);
            let mut read_all = false;
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    _ = &mut reading, if !read_all => read_all = true,
                }
            };
            exited = Some(status);
            // The leader is reaped; whatever it left in its group goes now.
            killer.kill();
            killer.armed = false;
            if !read_all {
                let _ = tokio::time::timeout(DRAIN, &mut reading).await;
            }
        })
        .await;
        match exited {
            Some(Ok(status)) => verdict(status, &out, &err),
            Some(Err(e)) => (
                false,
                format!("waiting for the command failed: {}", text::io_error(&e)),
            ),
            None => {
                killer.kill();
                let reaped = matches!(tokio::time::timeout(REAP, child.wait()).await, Ok(Ok(_)));
                killer.armed = false;
                let mut reason = format!(
                    "timed out after {}; killed process group {pgid}",
                    text::duration(timeout)
                );
                if !reaped {
                    reason.push_str(" (not yet reaped)");
                }
                let output = text::first_line(&err, 200).or_else(|| text::first_line(&out, 200));
                if let Some(line) = output {
                    reason.push_str(&format!("; output: {line}"));
                }
                (false, reason)
            }
        }
    }
}

/// Pass/fail and reason from the exit status and the first line of output (stderr first when
/// failing, stdout first when passing).
fn verdict(status: ExitStatus, out: &[u8], err: &[u8]) -> (bool, String) {
    let ok = status.success();
    let summary = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}{}", signal_name(sig)),
        (None, None) => status.to_string(),
    };
    let (first, second) = if ok { (out, err) } else { (err, out) };
    match text::first_line(first, 200).or_else(|| text::first_line(second, 200)) {
        Some(line) => (ok, format!("{summary}: {line}")),
        None => (ok, summary),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => " (SIGHUP)",
        libc::SIGINT => " (SIGINT)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGPIPE => " (SIGPIPE)",
        libc::SIGTERM => " (SIGTERM)",
        _ => "",
    }
}

/// Reads `r` to EOF, keeping the first [`OUTPUT_CAP`] bytes and discarding the rest (so the
/// command never blocks on a full pipe).
async fn read_capped<R: AsyncRead + Unpin>(mut r: R, keep: &mut Vec<u8>) {
    let mut chunk = vec![0u8; 4096];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let take = n.min(OUTPUT_CAP - keep.len());
                keep.extend_from_slice(&chunk[..take]);
            }
        }
    }
}

/// Shell-style quoting for display only.
fn quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn describe_quotes_and_shows_credentials() {
        let p = ExecProbe::new(ExecSpec {
            argv: argv(&["/usr/bin/check", "--url=http://x/", "two words", "", "it's"]),
            run_as: Some(RunAs {
                uid: 1001,
                gid: 1002,
            }),
        })
        .unwrap();
        assert_eq!(
            p.describe(),
            r#"exec /usr/bin/check --url=http://x/ 'two words' '' 'it'\''s' as 1001:1002"#
        );
        let p = ExecProbe::new(ExecSpec {
            argv: argv(&["true"]),
            run_as: None,
        })
        .unwrap();
        assert_eq!(p.describe(), "exec true");
    }

    #[test]
    fn rejects_empty_argv() {
        for a in [vec![], argv(&[""]), argv(&["", "x"])] {
            let err = ExecProbe::new(ExecSpec {
                argv: a,
                run_as: None,
            })
            .unwrap_err();
            assert_eq!(err, ProbeError::EmptyCommand);
        }
    }

    #[test]
    fn verdict_prefers_stderr_on_failure() {
        let st = ExitStatus::from_raw(1 << 8);
        assert_eq!(
            verdict(st, b"progress\n", b"\nboom: refused\nmore"),
            (false, "exit status 1: boom: refused".to_owned())
        );
        let st = ExitStatus::from_raw(0);
        assert_eq!(
            verdict(st, b"ok 3 workers\n", b"warn"),
            (true, "exit status 0: ok 3 workers".to_owned())
        );
        assert_eq!(verdict(st, b"", b""), (true, "exit status 0".to_owned()));
        let st = ExitStatus::from_raw(libc::SIGSEGV);
        assert_eq!(
            verdict(st, b"", b""),
            (false, "killed by signal 11 (SIGSEGV)".to_owned())
        );
    }
}
