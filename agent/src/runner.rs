//! The supervisor's side of the updater and the reporter: when a pass or a report is due, it
//! starts a short-lived `keepup-agent-pass` child ([`crate::child`]) that does the work, and
//! reads its answer. The supervisor keeps only the timers (the crontab schedule plus this
//! host's stagger offset, `report_every`) and this runner; the HTTP and TLS client, the
//! signature checks and the package managers run in the child, so a crash, a hang or a leak
//! there cannot take supervision down, and none of that code or memory stays resident.
//!
//! One child at a time: a pass asked for (`update --now`) or due while another child runs
//! waits for it (up to [`MAX_WAITING`] asks); a report due meanwhile is dropped, since every
//! child reports when it is done. Each child is bounded ([`bound`]): past it, it gets SIGTERM
//! (it lets a package-manager run finish), then SIGKILL with its process group, and the
//! supervisor says so once. A child that crashes or is killed answers nothing: its pass
//! fails with why, and the next one runs as usual.
//!
//! When the agent stops, the child in flight gets SIGTERM and up to [`STOP_BOUND`]: it may be
//! the very pass that is upgrading keepup-agent, whose postinst is what stopped the agent.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use keepup_deploy::wire::EventKind;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

use crate::child::Job;
use crate::config::Config;
use crate::events::{now_unix, Events};
use crate::proto::{JobOutcome, PassResult, Response};
use crate::reaper::Spawned;
use crate::update::error::{PassError, UpdateFailure};
use crate::update::run::PACKAGE_RUN_GRACE;
use crate::update::schedule::Schedule;
use crate::update::stagger;

/// `update --now` asks that may wait for the child in flight; more are refused.
pub const MAX_WAITING: usize = 4;
/// When the agent stops, how long the child in flight may take: a package-manager run's
/// grace, its kill, and the pass's bookkeeping (under the unit's `TimeoutStopSec=60s`).
pub const STOP_BOUND: Duration = Duration::from_secs(PACKAGE_RUN_GRACE.as_secs() + 10);
/// The first child (at agent start) waits this long, so the services have been started.
const FIRST_DELAY: Duration = Duration::from_secs(2);
/// Largest answer read from a child.
const MAX_ANSWER: u64 = 16 * 1024 * 1024;

/// The wait before a report that a busy server asked for again in `secs` seconds: that long
/// (at most [`crate::report::MAX_RETRY_AFTER`]) plus a part of a second drawn from `seed`, so
/// hosts told the same second do not all come back at its start.
pub fn retry_wait(secs: u64, seed: u64) -> Duration {
    // splitmix64's finaliser: any seed, evenly spread bits.
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    Duration::from_secs(secs).min(crate::report::MAX_RETRY_AFTER) + Duration::from_millis(z % 1000)
}

/// A seed for [`retry_wait`] that differs between hosts and between moments.
fn jitter_seed() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (now.as_nanos() as u64) ^ (u64::from(std::process::id()) << 40)
}

/// How long a child may run before it is stopped: a report is a few requests; a pass may
/// download and install several packages, each bounded by `package_timeout`.
pub fn bound(job: Job, package_timeout: Duration) -> Duration {
    match job {
        Job::Report => Duration::from_secs(120),
        Job::Start => package_timeout * 2 + Duration::from_secs(120),
        Job::Pass | Job::Standalone => (package_timeout * 6).max(Duration::from_secs(3600)),
    }
}

/// How to start a child: the program, and the arguments every job gets (the agent's
/// configuration file and control socket).
#[derive(Debug, Clone)]
pub struct Program {
    /// The program as found (for messages).
    path: PathBuf,
    /// What is executed: the program as it was when the agent started (`/proc/self/fd/N` of
    /// a descriptor held open), so that an upgrade that replaces the file meanwhile does not
    /// hand this agent a child of another version; the next agent runs the new one.
    exec: PathBuf,
    _pinned: Option<Arc<std::os::fd::OwnedFd>>,
    args: Vec<OsString>,
}

/// The name of the child program, installed beside `keepup-agent`.
pub const PASS_PROGRAM: &str = "keepup-agent-pass";

impl Program {
    /// `keepup-agent-pass` beside this program, held open from now on, with the agent's
    /// `--config` and socket.
    pub fn beside_this_binary(config: Option<&Path>, socket: &Path) -> Program {
        let mut args: Vec<OsString> = Vec::new();
        if let Some(c) = config {
            args.push("--config".into());
            args.push(c.into());
        }
        args.push("--socket".into());
        args.push(socket.into());
        let path = pass_program();
        let (exec, pinned) = match std::fs::File::open(&path) {
            Ok(f) => {
                use std::os::fd::AsRawFd;
                let fd = std::os::fd::OwnedFd::from(f);
                let exec = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
                (exec, Some(Arc::new(fd)))
            }
            Err(_) => (path.clone(), None),
        };
        Program {
            path,
            exec,
            _pinned: pinned,
            args,
        }
    }

    /// A program of one's choosing (tests).
    #[cfg(test)]
    pub fn new(path: impl Into<PathBuf>, args: Vec<OsString>) -> Program {
        let path = path.into();
        Program {
            exec: path.clone(),
            path,
            _pinned: None,
            args,
        }
    }

    /// The program's path, for messages.
    pub fn shown(&self) -> String {
        self.path.display().to_string()
    }

    /// Whether the program was there when the agent started.
    pub fn found(&self) -> bool {
        self._pinned.is_some()
    }

    /// The command for `job`: its own process group (so it can be killed with whatever it
    /// started in it), killed by the kernel if the agent dies (SIGKILL, like the updater task
    /// it replaces: the next agent repairs), stdout piped for its answer, stderr the agent's.
    pub fn command(&self, job: Job) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.exec);
        cmd.arg0(PASS_PROGRAM)
            .args(&self.args)
            .args(job.flags())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: prctl and getppid are async-signal-safe; nothing is allocated.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                if nix::unistd::getppid() == Pid::from_raw(1) {
                    return Err(std::io::Error::other("the agent is gone"));
                }
                Ok(())
            });
        }
        cmd
    }
}

/// Where `keepup-agent-pass` is: beside the program of this process (`/proc/self/exe`, also
/// after an upgrade replaced that file).
pub fn pass_program() -> PathBuf {
    let me = std::fs::read_link("/proc/self/exe")
        .or_else(|_| std::env::current_exe())
        .unwrap_or_default();
    let me = me.to_string_lossy();
    let me = Path::new(me.strip_suffix(" (deleted)").unwrap_or(&me));
    me.parent()
        .unwrap_or(Path::new("/usr/sbin"))
        .join(PASS_PROGRAM)
}

/// The way to the runner task.
#[derive(Debug, Clone)]
pub struct Runner {
    tx: mpsc::Sender<Msg>,
}

#[derive(Debug)]
enum Msg {
    /// `update --now`: a pass, answered when it is done.
    Update(oneshot::Sender<Response>),
    /// The agent is stopping: stop the child in flight (bounded), then say so.
    Stop(oneshot::Sender<()>),
}

impl Runner {
    /// Starts the runner task when the updater or the reporter is configured.
    pub fn start(
        cfg: &Arc<Config>,
        program: Program,
        spawned: &Spawned,
        events: &Events,
    ) -> Option<Runner> {
        let schedule = match &cfg.updater {
            None => None,
            Some(up) => match Schedule::parse(&up.schedule) {
                Ok(s) => Some((s, up.stagger)),
                Err(e) => {
                    eprintln!("keepup-agent: updater off: {e}");
                    None
                }
            },
        };
        if schedule.is_none() && cfg.report.is_none() {
            return None;
        }
        let host = cfg.host_name();
        if !program.found() {
            eprintln!(
                "keepup-agent: {} is missing: update passes and reports fail until it is \
                 installed beside keepup-agent (and the agent restarted); supervision goes on",
                program.shown()
            );
        }
        if let Some((s, window)) = &schedule {
            let offset = stagger::offset(&host, *window);
            eprintln!(
                "keepup-agent: updater: host {host}, schedule {:?} + {} (stagger {}); each pass \
                 runs in a keepup-agent-pass child",
                s.line(),
                humantime::format_duration(Duration::from_millis(offset.as_millis() as u64)),
                keepup_packager::spec::format_duration(*window),
            );
        }
        if let Some(r) = &cfg.report {
            eprintln!(
                "keepup-agent: reporting to {}{} as {host} every {}",
                r.url,
                keepup_deploy::wire::report::REPORT_PATH,
                keepup_packager::spec::format_duration(r.every)
            );
        }
        let (tx, rx) = mpsc::channel(MAX_WAITING);
        let task = Task {
            package_timeout: cfg
                .updater
                .as_ref()
                .map_or(Duration::from_secs(600), |u| u.package_timeout),
            report_every: cfg.report.as_ref().map(|r| r.every),
            host,
            schedule,
            program,
            spawned: spawned.clone(),
            events: events.clone(),
        };
        tokio::spawn(task.run(rx));
        Some(Runner { tx })
    }

    /// Asks for a pass; the reply comes when it is done (or at once, when too many passes
    /// are asked for already).
    pub fn update(&self, reply: oneshot::Sender<Response>) {
        if let Err(e) = self.tx.try_send(Msg::Update(reply)) {
            let (why, msg) = match e {
                mpsc::error::TrySendError::Full(m) => {
                    ("passes are already queued; try again later", m)
                }
                mpsc::error::TrySendError::Closed(m) => ("the updater stopped", m),
            };
            if let Msg::Update(reply) = msg {
                let _ = reply.send(Response::failed(why));
            }
        }
    }

    /// Stops the child in flight (SIGTERM, up to [`STOP_BOUND`], then SIGKILL) and the runner.
    pub async fn stop(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Msg::Stop(done)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The answer to `{"cmd":"update"}`.
pub fn response(r: PassResult) -> Response {
    Response {
        ok: r.ok,
        error: r.error.clone(),
        update: Some(Box::new(r)),
        ..Response::default()
    }
}

/// What the runner task owns.
struct Task {
    schedule: Option<(Schedule, Duration)>,
    report_every: Option<Duration>,
    package_timeout: Duration,
    host: String,
    program: Program,
    spawned: Spawned,
    events: Events,
}

/// A child in flight.
struct Running {
    job: Job,
    /// `update --now` asks it answers.
    replies: Vec<oneshot::Sender<Response>>,
    /// Tells it to stop (the agent is stopping).
    stop: Arc<Notify>,
    done: tokio::task::JoinHandle<Result<JobOutcome, String>>,
}

impl Task {
    async fn run(self, mut rx: mpsc::Receiver<Msg>) {
        let mut waiting: Vec<oneshot::Sender<Response>> = Vec::new();
        let mut want_pass = false;
        let mut want_start = true;
        let mut want_report = false;
        let first = Instant::now() + FIRST_DELAY;
        let mut next_report = first;
        let mut failing: Option<String> = None;
        let mut running: Option<Running> = None;
        loop {
            if running.is_none() {
                let job = if Instant::now() < first {
                    None
                } else if want_start {
                    want_start = false;
                    Some(Job::Start)
                } else if want_pass {
                    want_pass = false;
                    Some(Job::Pass)
                } else if want_report {
                    want_report = false;
                    Some(Job::Report)
                } else {
                    None
                };
                if let Some(job) = job {
                    let replies = if job == Job::Pass {
                        std::mem::take(&mut waiting)
                    } else {
                        Vec::new()
                    };
                    running = Some(self.spawn(job, replies));
                }
            }
            let next_pass = self.next_pass();
            let is_running = running.is_some();
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::Update(reply)) => {
                        eprintln!(
                            "keepup-agent: update: pass at {} (update --now)",
                            humantime::format_rfc3339_millis(std::time::SystemTime::now())
                        );
                        if waiting.len() >= MAX_WAITING {
                            let _ = reply.send(Response::failed(
                                "passes are already queued; try again later",
                            ));
                        } else {
                            waiting.push(reply);
                            want_pass = true;
                        }
                    }
                    Some(Msg::Stop(done)) => {
                        self.stop(running.take(), waiting, &mut failing).await;
                        let _ = done.send(());
                        return;
                    }
                    None => {
                        self.stop(running.take(), waiting, &mut failing).await;
                        return;
                    }
                },
                _ = sleep_until(next_pass) => {
                    // The start of each slot, to the millisecond: where this host's slot
                    // really is (the pass itself waits for a child in flight).
                    eprintln!(
                        "keepup-agent: update: scheduled pass at {}",
                        humantime::format_rfc3339_millis(std::time::SystemTime::now())
                    );
                    want_pass = true;
                    // Do not wake again for the same slot.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                _ = tokio::time::sleep_until(next_report), if self.report_every.is_some() && !is_running && !want_start => {
                    want_report = true;
                }
                _ = tokio::time::sleep_until(first), if Instant::now() < first => {}
                outcome = finished_ref(running.as_mut().map(|r| &mut r.done)), if is_running => {
                    let r = running.take().expect("running");
                    // A busy server's Retry-After sets the next report, not report_every.
                    let retry = outcome.as_ref().ok().and_then(|o| o.retry_after_secs);
                    self.answer(r.job, outcome, r.replies, &mut failing);
                    if let Some(every) = self.report_every {
                        next_report = Instant::now()
                            + retry.map_or(every, |s| retry_wait(s, jitter_seed()));
                    }
                }
            }
        }
    }

    /// The agent is stopping: the child in flight is stopped (bounded) and its answer given;
    /// passes not started yet are answered that they did not run.
    async fn stop(
        &self,
        running: Option<Running>,
        waiting: Vec<oneshot::Sender<Response>>,
        failing: &mut Option<String>,
    ) {
        if let Some(r) = running {
            r.stop.notify_one();
            let outcome = finished(r.done).await;
            self.answer(r.job, outcome, r.replies, failing);
        }
        for reply in waiting {
            let _ = reply.send(Response::failed(
                "keepup-agent stopped before the pass ran: run `keepup-agent update --now` again",
            ));
        }
    }

    /// When the next scheduled pass is due (`None`: no updater, or never).
    fn next_pass(&self) -> Option<Instant> {
        let (schedule, window) = self.schedule.as_ref()?;
        let now = chrono::Utc::now();
        let next = stagger::next_pass(schedule, &self.host, *window, &now)?;
        let wait = (next - now).to_std().unwrap_or_default();
        Some(Instant::now() + wait)
    }

    /// Starts a child for `job`; its outcome comes from the returned handle.
    fn spawn(&self, job: Job, replies: Vec<oneshot::Sender<Response>>) -> Running {
        let stop = Arc::new(Notify::new());
        let mut cmd = self.program.command(job);
        let limit = bound(job, self.package_timeout);
        let spawned = self.spawned.clone();
        let stopped = stop.clone();
        // The reaper must leave the child to tokio: it is registered before it can exit
        // (spawning runs on this thread, and the reaper only runs when this task yields).
        let done = match cmd.spawn() {
            Err(e) => {
                let why = format!("cannot start {}: {e}", self.program.shown());
                tokio::spawn(async move { Err(why) })
            }
            Ok(child) => {
                let pid = child.id().map_or(0, |p| p as i32);
                spawned.insert(pid);
                tokio::spawn(async move {
                    let r = watch(child, pid, job, limit, stopped).await;
                    spawned.remove(pid);
                    r
                })
            }
        };
        Running {
            job,
            replies,
            stop,
            done,
        }
    }

    /// Takes a child's outcome: answers `update --now`, logs a report outage once, and records
    /// a pass that ended without an answer as a failed pass.
    fn answer(
        &self,
        job: Job,
        outcome: Result<JobOutcome, String>,
        replies: Vec<oneshot::Sender<Response>>,
        failing: &mut Option<String>,
    ) {
        let outcome = match outcome {
            Ok(o) => o,
            // A report that could not even start is a report not sent: said once per outage
            // (a missing keepup-agent-pass would otherwise be said every `report_every`).
            Err(why) if job != Job::Pass && self.report_every.is_some() => JobOutcome {
                pass: None,
                reports: vec![Some(why)],
                retry_after_secs: None,
            },
            Err(why) => {
                eprintln!("keepup-agent: {why}");
                if job == Job::Pass {
                    self.events.push(EventKind::UpdateFailed, None, why.clone());
                }
                let mut r = PassResult {
                    host: self.host.clone(),
                    at: now_unix(),
                    ..PassResult::default()
                };
                r.fail(PassError::new(UpdateFailure::Aborted, why));
                JobOutcome {
                    pass: Some(r),
                    reports: Vec::new(),
                    retry_after_secs: None,
                }
            }
        };
        let again = match outcome.retry_after_secs {
            Some(s) => format!("trying again in {s} s, as the server asked, then every"),
            None => "trying again every".to_string(),
        };
        for sent in &outcome.reports {
            match sent {
                None => {
                    if let Some(why) = failing.take() {
                        eprintln!("keepup-agent: reports get through again (after: {why})");
                    }
                }
                Some(why) => {
                    if failing.is_none() {
                        eprintln!(
                            "keepup-agent: report not sent: {why} ({again} {}; \
                             supervision goes on; said once until it works again)",
                            keepup_packager::spec::format_duration(
                                self.report_every.unwrap_or_default()
                            )
                        );
                    }
                    *failing = Some(why.clone());
                }
            }
        }
        if replies.is_empty() {
            return;
        }
        let answer = match outcome.pass {
            Some(r) => response(r),
            None => Response::failed(
                "the pass was cut short: keepup-agent is stopping (see `journalctl -u \
                 keepup-agent`); run `keepup-agent update --now` again",
            ),
        };
        for reply in replies {
            let _ = reply.send(answer.clone());
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn finished(
    done: tokio::task::JoinHandle<Result<JobOutcome, String>>,
) -> Result<JobOutcome, String> {
    done.await
        .unwrap_or_else(|e| Err(format!("the child's watcher failed: {e}")))
}

async fn finished_ref(
    done: Option<&mut tokio::task::JoinHandle<Result<JobOutcome, String>>>,
) -> Result<JobOutcome, String> {
    match done {
        Some(done) => done
            .await
            .unwrap_or_else(|e| Err(format!("the child's watcher failed: {e}"))),
        None => std::future::pending().await,
    }
}

/// What a job is called in messages.
fn what(job: Job) -> &'static str {
    match job {
        Job::Pass | Job::Standalone => "update pass",
        Job::Report => "report",
        Job::Start => "updater's start-up",
    }
}

/// Waits for the child (reading its answer meanwhile) until it exits, `limit` passes, or
/// `stop` is notified; in the last two cases it is stopped: SIGTERM, then after
/// [`STOP_BOUND`] SIGKILL to its process group.
async fn watch(
    mut child: tokio::process::Child,
    pid: i32,
    job: Job,
    limit: Duration,
    stop: Arc<Notify>,
) -> Result<JobOutcome, String> {
    let mut out = child.stdout.take();
    let reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.take(MAX_ANSWER).read_to_end(&mut buf).await;
        }
        buf
    });
    let status = tokio::select! {
        s = child.wait() => s.ok(),
        _ = tokio::time::sleep(limit) => {
            eprintln!(
                "keepup-agent: the {} (pid {pid}) is still running after {}: stopping it \
                 (SIGTERM, then SIGKILL to its process group after {}); supervision goes on",
                what(job),
                humantime::format_duration(limit),
                humantime::format_duration(STOP_BOUND),
            );
            terminate(&mut child, pid).await
        }
        _ = stop.notified() => {
            eprintln!(
                "keepup-agent: stopping the {} (pid {pid}): a package-manager run in flight may \
                 finish first",
                what(job)
            );
            terminate(&mut child, pid).await
        }
    };
    let answer = match tokio::time::timeout(Duration::from_secs(2), reader).await {
        Ok(Ok(b)) => b,
        _ => Vec::new(),
    };
    parse_answer(&answer, status).map_err(|why| format!("the {} (pid {pid}) {why}", what(job)))
}

/// SIGTERM to the child, then SIGKILL to its process group if it is still there after
/// [`STOP_BOUND`].
async fn terminate(child: &mut tokio::process::Child, pid: i32) -> Option<ExitStatus> {
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    match tokio::time::timeout(STOP_BOUND, child.wait()).await {
        Ok(s) => s.ok(),
        Err(_) => {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            child.wait().await.ok()
        }
    }
}

/// A child's answer: the last line of its stdout, a [`JobOutcome`]; else why there is none.
pub fn parse_answer(stdout: &[u8], status: Option<ExitStatus>) -> Result<JobOutcome, String> {
    use std::os::unix::process::ExitStatusExt;
    let text = String::from_utf8_lossy(stdout);
    let last = text.lines().rev().find(|l| !l.trim().is_empty());
    if let Some(Ok(o)) = last.map(|l| serde_json::from_str::<JobOutcome>(l.trim())) {
        return Ok(o);
    }
    let how = match status {
        None => "could not be waited for".to_string(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(sig)) => format!(
                "killed by signal {sig}{}",
                Signal::try_from(sig)
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default()
            ),
            _ => s.to_string(),
        },
    };
    Err(format!(
        "ended without an answer ({how}); see the agent's log above. Supervision goes on; the \
         next pass runs as scheduled"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn a_retry_wait_is_the_asked_seconds_plus_a_part_of_one() {
        let waits: Vec<Duration> = (0..1000).map(|seed| retry_wait(3, seed)).collect();
        assert!(waits
            .iter()
            .all(|w| *w >= Duration::from_secs(3) && *w < Duration::from_secs(4)));
        // Spread over the second, not bunched at its start.
        let early = waits
            .iter()
            .filter(|w| **w < Duration::from_millis(3500))
            .count();
        assert!((350..650).contains(&early), "{early}");
        // Bounded, however long the server asks.
        assert!(retry_wait(u64::MAX, 7) < crate::report::MAX_RETRY_AFTER + Duration::from_secs(1));
    }

    #[test]
    fn answers_are_the_last_line_and_crashes_say_how() {
        let pass = PassResult {
            host: "web1".into(),
            ok: true,
            ..PassResult::default()
        };
        let o = JobOutcome {
            pass: Some(pass.clone()),
            reports: vec![None, Some("refused".into())],
            retry_after_secs: Some(4),
        };
        let line = serde_json::to_string(&o).unwrap();
        let out = format!("noise\n{line}\n\n");
        let ok = ExitStatus::from_raw(0);
        assert_eq!(parse_answer(out.as_bytes(), Some(ok)).unwrap(), o);
        // Killed mid-pass: no answer, and the signal is named.
        let killed = ExitStatus::from_raw(9);
        let e = parse_answer(b"", Some(killed)).unwrap_err();
        assert!(
            e.starts_with("ended without an answer (killed by signal 9 (SIGKILL))"),
            "{e}"
        );
        // A half-written line is no answer either.
        let e =
            parse_answer(&line.as_bytes()[..10], Some(ExitStatus::from_raw(3 << 8))).unwrap_err();
        assert!(
            e.starts_with("ended without an answer (exit status 3)"),
            "{e}"
        );
    }

    #[test]
    fn bounds_grow_with_the_package_timeout() {
        let t = Duration::from_secs(600);
        assert_eq!(bound(Job::Report, t), Duration::from_secs(120));
        assert_eq!(bound(Job::Pass, t), Duration::from_secs(3600));
        assert_eq!(
            bound(Job::Pass, Duration::from_secs(1200)),
            Duration::from_secs(7200)
        );
        assert!(STOP_BOUND < Duration::from_secs(60));
    }

    /// A child that hangs is stopped at its bound, and one that dies says how; the runner
    /// answers `update --now` either way, and goes on.
    #[tokio::test]
    async fn a_hung_or_killed_child_is_a_failed_pass() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("child.sh");
        // The "child" answers `pass` by hanging, and reports by printing an outcome.
        std::fs::write(
            &script,
            "#!/bin/sh\ncase \"$*\" in *--report-only*) echo '{\"reports\":[null]}';; \
             *--at-start*) echo '{}';; *) kill -KILL $$;; esac\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let program = Program::new(&script, vec!["--socket".into(), "/nonexistent".into()]);
        let task = Task {
            schedule: None,
            report_every: None,
            package_timeout: Duration::from_secs(1),
            host: "web1".into(),
            program,
            spawned: Spawned::default(),
            events: Events::default(),
        };
        let r = task.spawn(Job::Pass, Vec::new());
        let e = finished(r.done).await.unwrap_err();
        assert!(e.starts_with("the update pass (pid "), "{e}");
        assert!(e.contains("killed by signal 9"), "{e}");
        let (tx, rx) = oneshot::channel();
        let mut failing = None;
        task.answer(Job::Pass, Err(e.clone()), vec![tx], &mut failing);
        let resp = rx.await.unwrap();
        assert!(!resp.ok && resp.error.as_deref() == Some(e.as_str()));
        assert_eq!(task.events.list()[0].kind, EventKind::UpdateFailed);
        let r = task.spawn(Job::Report, Vec::new());
        assert_eq!(finished(r.done).await.unwrap().reports, vec![None]);
        // A report child that cannot start at all is a report not sent (said once per
        // outage), not a failed pass.
        let missing = Task {
            program: Program::new(dir.path().join("missing"), Vec::new()),
            report_every: Some(Duration::from_secs(60)),
            ..task
        };
        let r = missing.spawn(Job::Report, Vec::new());
        let e = finished(r.done).await.unwrap_err();
        assert!(e.starts_with("cannot start "), "{e}");
        missing.answer(Job::Report, Err(e.clone()), Vec::new(), &mut failing);
        assert_eq!(failing, Some(e));
        assert_eq!(
            missing.events.list().len(),
            1,
            "no update-failed for a report"
        );
    }
}
