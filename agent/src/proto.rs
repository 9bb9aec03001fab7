//! The control protocol's types: what a client asks ([`Request`]) and what the agent answers
//! ([`Response`], with each service's [`ServiceStatus`] and an update pass's [`PassResult`]),
//! and how `keepup-agent status` renders them, and what a keepup-agent-pass child answers the
//! supervisor ([`JobOutcome`]). A leaf: the socket code (`control.rs`), the supervisor, the
//! runner, the updater and the reporter all use it, and it uses none of them.

use std::collections::BTreeMap;
use std::time::Duration;

use keepup_deploy::wire::report::Event;
use keepup_deploy::wire::{EventKind, ServiceState, StartReport, UpdateFailure};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::policy::short_duration;
use crate::update::error::PassError;

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Every service's state.
    Status,
    /// Admin-down a service: persist the mark, stop it.
    Down {
        /// Service name.
        service: String,
    },
    /// Clear the admin-down mark and start the service.
    Up {
        /// Service name.
        service: String,
    },
    /// Start given-up services again now (one, or all when `None`).
    Rekick {
        /// Service name, or every service.
        #[serde(default)]
        service: Option<String>,
    },
    /// Run a service's probes now and report.
    Check {
        /// Service name.
        service: String,
    },
    /// Run an update pass now and report its plan and result.
    Update,
    /// Record an event in the agent's ring of recent events (what reports carry). Sent by
    /// the agent's own keepup-agent-pass child, so that the ring and its file have one
    /// writer: the supervisor.
    Event {
        /// What happened.
        kind: EventKind,
        /// The service it concerns, if any.
        #[serde(default)]
        service: Option<String>,
        /// For people.
        message: String,
    },
    /// The ring of recent events, oldest first (what the next report carries).
    Events,
}

impl Request {
    /// Whether the request only reads the agent's state (what `status_group` may ask).
    /// `check` is not: it runs the service's probes (exec probes spawn commands as the role).
    pub fn read_only(&self) -> bool {
        matches!(self, Request::Status)
    }

    /// The request as a command line, for messages: `down foo`, `status`.
    pub fn describe(&self) -> String {
        match self {
            Request::Status => "status".into(),
            Request::Down { service } => format!("down {service}"),
            Request::Up { service } => format!("up {service}"),
            Request::Rekick { service: None } => "rekick".into(),
            Request::Rekick {
                service: Some(service),
            } => format!("rekick {service}"),
            Request::Check { service } => format!("check {service}"),
            Request::Update => "update --now".into(),
            Request::Event { kind, .. } => format!("event {kind}"),
            Request::Events => "events".into(),
        }
    }
}

/// The agent's answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What was done, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Per-service state (`status`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceStatus>,
    /// Probe results (`check`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<ProbeStatus>,
    /// The pass (`update`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<Box<PassResult>>,
    /// Recent events, oldest first (`events`; boxed: most answers carry none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Box<EventList>>,
}

impl Response {
    /// A success with a message.
    pub fn done(message: impl Into<String>) -> Response {
        Response {
            ok: true,
            message: Some(message.into()),
            ..Response::default()
        }
    }

    /// A failure with a reason.
    pub fn failed(error: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(error.into()),
            ..Response::default()
        }
    }
}

/// The agent's recent events, oldest first (the answer to `events`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventList(pub Vec<Event>);

/// One service as `status` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// Package version from the manifest.
    pub version: String,
    /// `agent` or `systemd`.
    pub supervisor: String,
    /// Current state.
    pub state: ServiceState,
    /// The launch script's pid (agent-supervised, while running).
    #[serde(default)]
    pub pid: Option<u32>,
    /// Seconds since the current run started.
    #[serde(default)]
    pub uptime_secs: Option<f64>,
    /// Starts after the first one since the agent started or the version changed.
    pub restarts: u64,
    /// How the last run ended, e.g. `exit status 3 after 1.2s`.
    #[serde(default)]
    pub last_exit: Option<String>,
    /// Extra information, e.g. when a given-up service is re-kicked next.
    #[serde(default)]
    pub note: Option<String>,
    /// The current run's id: unique across agent restarts, larger for a later run (agent-run
    /// services, while running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<u64>,
    /// Seconds from the run's start to its readiness (`READY=1`, probes passed, or its first
    /// second), once ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_secs: Option<f64>,
    /// The daemon's own `STATUS=` text (`ready: notify`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_text: Option<String>,
    /// Latest result of each probe.
    #[serde(default)]
    pub probes: Vec<ProbeStatus>,
}

/// The latest result of one probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeStatus {
    /// Check name from the manifest.
    pub name: String,
    /// What the probe does (`tcp 127.0.0.1:7070 expect /ready/`).
    pub probe: String,
    /// Pass or fail; `None` before the first run.
    #[serde(default)]
    pub ok: Option<bool>,
    /// Why, from the probe.
    #[serde(default)]
    pub reason: Option<String>,
    /// Consecutive failures so far.
    pub failures: u32,
    /// Seconds since the result.
    #[serde(default)]
    pub age_secs: Option<f64>,
}

/// A request from a client, with the way back.
pub type Incoming = (Request, oneshot::Sender<Response>);

/// What a keepup-agent-pass child prints on its stdout, as one JSON line, for the
/// supervisor that started it: the pass (if it ran one) and how each report it tried went.
/// The supervisor answers `update --now` with the pass and logs a report outage once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobOutcome {
    /// The pass, when the job was one.
    #[serde(default)]
    pub pass: Option<PassResult>,
    /// Each report the child tried, in order: `None` sent, `Some(why)` not.
    #[serde(default)]
    pub reports: Vec<Option<String>>,
    /// The server was busy with the last report and asked for it again after this many
    /// seconds (`Retry-After`): the next report goes then, not after `report_every`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

/// What a pass found and did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PassResult {
    /// This host's name.
    pub host: String,
    /// The track the policy assigns (`None`: not assigned, or the policy was not read).
    pub track: Option<String>,
    /// Unix time the pass ended.
    pub at: u64,
    /// Whether every step succeeded.
    pub ok: bool,
    /// The first failure.
    #[serde(default)]
    pub error: Option<String>,
    /// The kind of that failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<UpdateFailure>,
    /// The plan, one line per action (`install foo 1.1.0-1`, ...).
    #[serde(default)]
    pub plan: Vec<String>,
    /// What happened, one line per step that did something.
    #[serde(default)]
    pub results: Vec<String>,
    /// Serial of the index used.
    #[serde(default)]
    pub index_serial: Option<u64>,
    /// Serial of the policy used.
    #[serde(default)]
    pub fleet_serial: Option<u64>,
    /// Fully installed packages of the repository's services after the pass (`None`: not
    /// looked at).
    #[serde(default)]
    pub installed: Option<BTreeMap<String, String>>,
    /// Services quarantined here.
    #[serde(default)]
    pub quarantined: Vec<String>,
    /// Start judgements of the services installed or upgraded by this pass.
    #[serde(default)]
    pub starts: BTreeMap<String, StartReport>,
    /// The track's rollouts in waves: this host's wave, and whether it is held back.
    #[serde(default)]
    pub rollouts: Vec<keepup_deploy::wire::RolloutReport>,
}

impl PassResult {
    /// Did the pass do (or try) anything beyond keeping what is installed?
    pub(crate) fn plan_changed(&self) -> bool {
        !self.results.is_empty()
    }

    /// Records a failure: the first one is the pass's error.
    pub(crate) fn fail(&mut self, e: PassError) {
        self.ok = false;
        if self.error.is_none() {
            self.error = Some(e.why);
            self.failure = Some(e.kind);
        }
    }

    /// The human output of `update --now`: plan, results, verdict.
    pub fn render(&self) -> String {
        let mut out = String::new();
        match &self.track {
            Some(t) => out.push_str(&format!("host {} follows track {t}\n", self.host)),
            None if self.fleet_serial.is_some() => out.push_str(&format!(
                "host {} is not assigned to a track in fleet.yaml: nothing to install\n",
                self.host
            )),
            None => {}
        }
        for l in &self.plan {
            out.push_str(&format!("{l}\n"));
        }
        for l in &self.results {
            out.push_str(&format!("  {l}\n"));
        }
        match (&self.ok, &self.error) {
            (true, _) => out.push_str("update: ok\n"),
            (false, Some(e)) => out.push_str(&format!("update: failed: {e}\n")),
            (false, None) => out.push_str("update: failed\n"),
        }
        out
    }
}

/// The `status` table: one line per service, then its probes indented.
pub fn render_status(services: &[ServiceStatus]) -> String {
    let mut rows = vec![[
        "SERVICE".to_string(),
        "STATE".into(),
        "UPTIME".into(),
        "RESTARTS".into(),
        "LAST EXIT".into(),
    ]];
    for s in services {
        rows.push([
            s.name.clone(),
            s.state.to_string(),
            s.uptime_secs
                .map(|u| short_duration(Duration::from_secs_f64(u.max(0.0))))
                .unwrap_or_else(|| "-".into()),
            s.restarts.to_string(),
            s.last_exit.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (n, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if n == 0 {
            continue;
        }
        let s = &services[n - 1];
        if let Some(note) = &s.note {
            out.push_str(&format!("    {note}\n"));
        }
        for p in &s.probes {
            out.push_str(&format!("    {}\n", render_probe(p)));
        }
    }
    if services.is_empty() {
        out.push_str("(no services: no manifests in the manifest directory)\n");
    }
    out
}

/// One probe result line: `probe banner: ok (12ms ago) tcp 127.0.0.1:7070: ...`.
pub fn render_probe(p: &ProbeStatus) -> String {
    let verdict = match p.ok {
        None => "not run yet".to_string(),
        Some(true) => "ok".to_string(),
        // A probe that cannot run (a broken manifest) fails without a streak.
        Some(false) if p.failures == 0 => "FAILED".to_string(),
        Some(false) => format!("FAILED ({} in a row)", p.failures),
    };
    let age = p
        .age_secs
        .map(|a| {
            format!(
                " {} ago",
                short_duration(Duration::from_secs_f64(a.max(0.0)))
            )
        })
        .unwrap_or_default();
    let reason = p
        .reason
        .as_deref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    format!("probe {} [{}]: {verdict}{age}{reason}", p.name, p.probe)
}
