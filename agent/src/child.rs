//! `keepup-agent-pass`: the short-lived child that does the updater's and the reporter's work
//! for the supervisor, one job per process (the supervisor's [`runner`](crate::runner) starts
//! it): an update pass and then a report, a report alone, or what the updater does when the
//! agent starts (repair an interrupted pass, read the installed versions again, report). With
//! `--standalone` it is `keepup-agent update --now` on a host where no agent runs: a pass and
//! nothing else. The
//! HTTP and TLS client, the signature checks and the package managers live only here, so a
//! crash, a hang or a leak in them cannot take supervision down, and the supervisor's memory
//! holds none of them.
//!
//! It talks to the supervisor over the control socket: `status` to watch installed services
//! start and to build reports, `events` for the report, and `event` to record what it did in
//! the supervisor's ring (one writer for the ring and its file). What it found and did is
//! kept in `state_dir/host-state.json` ([`HostState`]) for the next report. Its answer, a
//! [`JobOutcome`], is one JSON line on stdout; its log lines go to stderr, which is the
//! supervisor's.
//!
//! On SIGTERM (the supervisor is stopping, e.g. restarted by the postinst of its own upgrade
//! that this very child is installing) no new package-manager run starts, a run in flight may
//! finish (up to [`PACKAGE_RUN_GRACE`]), the pass does its bookkeeping and the child exits.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keepup_deploy::wire::report::Event;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;

use crate::config::{Config, ReportConfig};
use crate::control;
use crate::events::Events;
use crate::hoststate::{HostState, SharedHost, HOST_STATE_FILE};
use crate::proto::{JobOutcome, PassResult, Request};
use crate::reaper::Spawned;
use crate::update::error::PassError;
use crate::update::pass::Updater;
use crate::update::run::{finish_before_exit, PACKAGE_RUN_GRACE};

/// What one child does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// An update pass, then a report.
    Pass,
    /// A report.
    Report,
    /// At agent start: repair an interrupted pass, read the installed versions again, report.
    Start,
    /// A pass with no agent running (`keepup-agent update --now` there): no report, no
    /// events kept, no start to confirm.
    Standalone,
}

impl Job {
    /// The keepup-agent-pass flags that ask for this job.
    pub fn flags(self) -> &'static [&'static str] {
        match self {
            Job::Pass => &[],
            Job::Report => &["--report-only"],
            Job::Start => &["--at-start"],
            Job::Standalone => &["--standalone"],
        }
    }
}

/// keepup-agent's child for one update pass or report (started by `keepup-agent run`; prints
/// its outcome as one JSON line).
#[derive(Debug, clap::Parser)]
#[command(name = "keepup-agent-pass", version, about)]
struct Args {
    /// The agent's configuration file (default: /etc/keepup/agent.yaml if it exists).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The agent's control socket (default: from the configuration).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Only send a report.
    #[arg(long, group = "job")]
    report_only: bool,
    /// What the updater does when the agent starts: repair, installed versions, report.
    #[arg(long, group = "job")]
    at_start: bool,
    /// A pass with no agent running.
    #[arg(long, group = "job")]
    standalone: bool,
}

/// `keepup-agent-pass`.
pub fn main() -> ExitCode {
    let args = <Args as clap::Parser>::parse();
    let job = match (args.report_only, args.at_start, args.standalone) {
        (true, _, _) => Job::Report,
        (_, true, _) => Job::Start,
        (_, _, true) => Job::Standalone,
        _ => Job::Pass,
    };
    let mut cfg = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keepup-agent-pass: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(s) = args.socket {
        cfg.socket = s;
    }
    match crate::cli::runtime() {
        Ok(rt) => rt.block_on(run(cfg, job)),
        Err(e) => {
            eprintln!("keepup-agent-pass: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How long forwarding one event may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// After SIGTERM and the package manager, how long the pass may take to record what it did.
const AFTER_STOP: Duration = Duration::from_secs(5);

/// Runs `job` for the agent whose configuration is `cfg` (its control socket included) and
/// prints the [`JobOutcome`]. Exit status 0 whenever the outcome was printed, whatever it says.
pub async fn run(cfg: Config, job: Job) -> ExitCode {
    let mut sigterm = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keepup-agent: pass: cannot watch SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    let spawned = Spawned::default();
    let work = tokio::spawn(job_outcome(Arc::new(cfg), job, spawned.clone()));
    tokio::pin!(work);
    let outcome = tokio::select! {
        done = &mut work => done.unwrap_or_default(),
        _ = sigterm.recv() => {
            // No new package-manager run; the one in flight may finish.
            finish_before_exit(&spawned, PACKAGE_RUN_GRACE).await;
            match tokio::time::timeout(AFTER_STOP, &mut work).await {
                Ok(done) => done.unwrap_or_default(),
                Err(_) => JobOutcome::default(),
            }
        }
    };
    match serde_json::to_string(&outcome) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keepup-agent: pass: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Events go to the supervisor's ring: each is recorded there before the pass goes on.
fn forward_to(socket: PathBuf) -> Events {
    Events::forwarding(Arc::new(move |e: Event| {
        let req = Request::Event {
            kind: e.kind,
            service: e.service,
            message: e.message,
        };
        match control::request_blocking(&socket, &req, FORWARD_TIMEOUT) {
            Ok(r) if r.ok => {}
            Ok(r) => eprintln!(
                "keepup-agent: pass: the agent did not record `{}`: {}",
                req.describe(),
                r.error.unwrap_or_default()
            ),
            Err(err) => eprintln!(
                "keepup-agent: pass: the agent did not record `{}`: {err:#}",
                req.describe()
            ),
        }
    }))
}

/// Sends reports for one child, one at a time, and remembers how each went.
struct Reporter {
    cfg: Option<ReportConfig>,
    host: String,
    socket: PathBuf,
    state: SharedHost,
    sent: tokio::sync::Mutex<Vec<Result<(), crate::report::NotSent>>>,
}

impl Reporter {
    /// Reports the current host state (a no-op when reporting is off).
    async fn send(&self) {
        let Some(cfg) = &self.cfg else { return };
        let mut sent = self.sent.lock().await;
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let r = crate::report::send(cfg, &self.host, &self.socket, &state).await;
        sent.push(r);
    }

    /// How each report went, and the wait the server asked for after the last one.
    async fn outcomes(&self) -> (Vec<Option<String>>, Option<u64>) {
        let sent = self.sent.lock().await;
        let retry = match sent.last() {
            Some(Err(e)) => e.retry_after.map(|d| d.as_secs()),
            _ => None,
        };
        let each = sent
            .iter()
            .map(|r| r.as_ref().err().map(|e| e.why.clone()))
            .collect();
        (each, retry)
    }
}

async fn job_outcome(cfg: Arc<Config>, job: Job, spawned: Spawned) -> JobOutcome {
    let file = cfg.state_dir.join(HOST_STATE_FILE);
    let state: SharedHost = Arc::new(Mutex::new(HostState::load(&file)));
    let reporter = Arc::new(Reporter {
        cfg: cfg.report.clone(),
        host: cfg.host_name(),
        socket: cfg.socket.clone(),
        state: state.clone(),
        sent: tokio::sync::Mutex::new(Vec::new()),
    });
    let trusted = match &cfg.ca_file {
        Some(ca) => crate::http::trust_ca_file(ca),
        None => Ok(()),
    };
    if let Err(why) = trusted {
        eprintln!("keepup-agent: pass: {why}");
        let mut r = PassResult {
            host: cfg.host_name(),
            at: crate::events::now_unix(),
            ..PassResult::default()
        };
        r.fail(PassError::local(why.clone()));
        return JobOutcome {
            pass: matches!(job, Job::Pass | Job::Standalone).then_some(r),
            reports: if cfg.report.is_some() && job != Job::Standalone {
                vec![Some(why)]
            } else {
                Vec::new()
            },
            retry_after_secs: None,
        };
    }
    let stopping = spawned.clone();
    if job == Job::Standalone {
        let pass = match Updater::new(cfg.clone(), None, None, Events::default()).await {
            Some(u) => u.pass().await,
            None => {
                let mut r = PassResult {
                    host: cfg.host_name(),
                    at: crate::events::now_unix(),
                    ..PassResult::default()
                };
                r.fail(PassError::local(
                    "the updater is off: set `repo` and `trusted_key` in the configuration \
                     (docs/agent.md, \"Updater\")",
                ));
                r
            }
        };
        return JobOutcome {
            pass: Some(pass),
            reports: Vec::new(),
            retry_after_secs: None,
        };
    }
    let updater = match (job, cfg.updater.is_some()) {
        (Job::Report, _) | (_, false) => None,
        _ => {
            let events = forward_to(cfg.socket.clone());
            Updater::new(cfg.clone(), Some(cfg.socket.clone()), Some(spawned), events).await
        }
    };
    let mut pass = None;
    match (job, updater) {
        (Job::Pass, None) => {
            let mut r = PassResult {
                host: cfg.host_name(),
                at: crate::events::now_unix(),
                ..PassResult::default()
            };
            r.fail(PassError::local(
                "the updater is off: no `repo` in the configuration",
            ));
            pass = Some(r);
        }
        (Job::Pass, Some(mut u)) => {
            // The reporter hears of package changes at once, before starts are confirmed.
            let progress = Arc::new(Notify::new());
            u.report_progress_to(state.clone(), progress.clone());
            let woken = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let early = {
                let (reporter, woken) = (reporter.clone(), woken.clone());
                tokio::spawn(async move {
                    progress.notified().await;
                    woken.store(true, std::sync::atomic::Ordering::SeqCst);
                    reporter.send().await;
                })
            };
            let result = u.pass().await;
            crate::update::publish(&state, &u, &result);
            save(&state, &file);
            // A report under way goes out before the final one; one never woken is dropped.
            if woken.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = early.await;
            } else {
                early.abort();
            }
            pass = Some(result);
        }
        (Job::Start, Some(u)) => {
            eprintln!(
                "keepup-agent: updater: host {} ({} {})",
                u.host(),
                u.format(),
                u.arch()
            );
            match u.recover().await {
                Some(Ok(line)) => eprintln!("keepup-agent: updater: at start: {line}"),
                Some(Err(e)) => {
                    eprintln!("keepup-agent: updater: at start: {e} (the next pass tries again)")
                }
                None => {}
            }
            // What the last agent saved may be out of date (it may have stopped in the middle
            // of a pass, e.g. the one that upgraded it): read the installed versions again.
            let names: std::collections::BTreeSet<String> = {
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                s.format = Some(u.format());
                s.arch = Some(u.arch().to_string());
                s.installed.keys().cloned().collect()
            };
            if !names.is_empty() {
                if let Ok(now) = u.installed(&names).await {
                    state.lock().unwrap_or_else(|e| e.into_inner()).installed = now;
                }
            }
            save(&state, &file);
        }
        (Job::Start, None) | (Job::Report | Job::Standalone, _) => {}
    }
    // A stopping agent answers no `status`: the next one reports.
    if !stopping.stopping() {
        reporter.send().await;
    }
    let (reports, retry_after_secs) = reporter.outcomes().await;
    JobOutcome {
        pass,
        reports,
        retry_after_secs,
    }
}

/// Saves the host state for the next report (and the next agent).
fn save(state: &SharedHost, file: &std::path::Path) {
    let saved = state.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Err(e) = saved.save(file) {
        eprintln!(
            "keepup-agent: cannot save {}: {e} (reports after a restart wait for a pass)",
            file.display()
        );
    }
}
