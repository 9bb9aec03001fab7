//! Reports: what the agent tells the server about its host (`POST <report>/api/v1/report` with
//! the host's bearer token), after each update pass and every `report_every`. A report is built
//! from the supervisor's live `status` (state, restarts, probes per service), what the last
//! update pass found and did (track, installed versions, quarantines, start results) and the
//! ring of recent [`Events`]. Posting never blocks supervision: it runs in its own task with a
//! timeout, a failure is logged once per outage and the next report simply tries again.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keepup_deploy::wire::report::{
    Event, ProbeReport, Report, ServiceReport, StartReport, UpdateReport, MAX_EVENTS, REPORT_PATH,
};
use keepup_deploy::wire::Format;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::config::ReportConfig;
use crate::control::{Incoming, Request, ServiceStatus};

/// How many of the latest events a new one is compared with (see [`Events::push`]).
const REPEAT_WINDOW: usize = 4;

/// How long one post may take.
const POST_TIMEOUT: Duration = Duration::from_secs(20);

/// Unix time now, in seconds.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The ring of recent events (the last [`MAX_EVENTS`]), shared by the services, the updater
/// and the reporter; with a file, kept across agent restarts (an upgrade of the agent, a
/// crash), so what led to the restart still reaches the server.
#[derive(Debug, Clone, Default)]
pub struct Events(Arc<Mutex<Ring>>);

#[derive(Debug, Default)]
struct Ring {
    events: VecDeque<Event>,
    file: Option<PathBuf>,
}

impl Events {
    /// Events saved in `file` (JSON, replaced atomically on every new event), starting with
    /// what it holds. A missing file is an empty ring; an unreadable one is logged and
    /// replaced.
    pub fn persistent(file: PathBuf) -> Events {
        let events = match std::fs::read(&file) {
            Ok(bytes) => match serde_json::from_slice::<VecDeque<Event>>(&bytes) {
                Ok(mut q) => {
                    while q.len() > MAX_EVENTS {
                        q.pop_front();
                    }
                    q
                }
                Err(e) => {
                    eprintln!(
                        "keepup-agent: {}: not a list of events ({e}); starting a new one",
                        file.display()
                    );
                    VecDeque::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => VecDeque::new(),
            Err(e) => {
                eprintln!(
                    "keepup-agent: cannot read {} ({e}); starting a new list of events",
                    file.display()
                );
                VecDeque::new()
            }
        };
        Events(Arc::new(Mutex::new(Ring {
            events,
            file: Some(file),
        })))
    }

    /// Records an event now, unless the same one (kind, service, message) is among the last
    /// few: a failure that repeats every pass (an unreachable repository, a replayed index) is
    /// recorded once, with the time it began, instead of pushing everything else out.
    pub fn push(&self, kind: &str, service: Option<&str>, message: impl Into<String>) {
        let message = message.into();
        let mut ring = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let q = &mut ring.events;
        let repeated = q
            .iter()
            .rev()
            .take(REPEAT_WINDOW)
            .any(|e| e.kind == kind && e.service.as_deref() == service && e.message == message);
        if repeated {
            return;
        }
        q.push_back(Event {
            at: now_unix(),
            service: service.map(String::from),
            kind: kind.into(),
            message,
        });
        while q.len() > MAX_EVENTS {
            q.pop_front();
        }
        if let Some(file) = &ring.file {
            if let Err(e) = save_json(file, &ring.events) {
                eprintln!(
                    "keepup-agent: cannot save events to {}: {e} (they are still reported)",
                    file.display()
                );
            }
        }
    }

    /// The events, oldest first.
    pub fn list(&self) -> Vec<Event> {
        let ring = self.0.lock().unwrap_or_else(|e| e.into_inner());
        ring.events.iter().cloned().collect()
    }
}

/// Writes `value` as JSON to `file` through a temporary file and a rename.
fn save_json(file: &Path, value: &impl serde::Serialize) -> std::io::Result<()> {
    let tmp = file.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(value)?)?;
    std::fs::rename(&tmp, file)
}

/// What the updater last found and did, for reports. Saved in `state_dir` after each pass
/// ([`HOST_STATE_FILE`]) and read back when the agent starts, so a restarted agent (its own
/// upgrade, a reboot) reports what is installed before its next pass, not "missing".
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct HostState {
    /// The track from the fleet policy (`None`: not assigned, or not known yet).
    pub track: Option<String>,
    /// The host's package format.
    pub format: Option<Format>,
    /// The host's architecture.
    pub arch: Option<String>,
    /// Fully installed packages of the repository's services.
    pub installed: BTreeMap<String, String>,
    /// Services quarantined here.
    pub quarantined: Vec<String>,
    /// The last pass.
    pub update: Option<UpdateReport>,
    /// The last start judgement per service.
    pub starts: BTreeMap<String, StartReport>,
}

/// Shared between the updater (writes) and the reporter (reads).
pub type SharedHost = Arc<Mutex<HostState>>;

/// The file in `state_dir` that keeps the [`HostState`] across agent restarts.
pub const HOST_STATE_FILE: &str = "host-state.json";

impl HostState {
    /// The state saved in `file`; empty if there is none or it cannot be read (said on
    /// stderr: the next pass finds it all again).
    pub fn load(file: &Path) -> HostState {
        match std::fs::read(file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                eprintln!(
                    "keepup-agent: {}: unreadable ({e}); the next pass finds it again",
                    file.display()
                );
                HostState::default()
            }),
            Err(_) => HostState::default(),
        }
    }

    /// Saves the state in `file` (a temporary file, then a rename).
    pub fn save(&self, file: &Path) -> std::io::Result<()> {
        save_json(file, self)
    }
}

/// Builds a report from the host state, the events and the supervisor's status.
pub fn build(host: &str, state: &HostState, events: &Events, services: &[ServiceStatus]) -> Report {
    Report {
        host: host.to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        sent_at: now_unix(),
        track: state.track.clone(),
        format: state.format,
        arch: state.arch.clone(),
        installed: state.installed.clone(),
        quarantined: state.quarantined.clone(),
        services: services
            .iter()
            .map(|s| ServiceReport {
                name: s.name.clone(),
                version: s.version.clone(),
                state: s.state.as_str().to_string(),
                restarts: s.restarts,
                probes: s
                    .probes
                    .iter()
                    .map(|p| ProbeReport {
                        name: p.name.clone(),
                        ok: p.ok,
                        reason: p.reason.clone(),
                        failures: p.failures,
                    })
                    .collect(),
                start: state.starts.get(&s.name).cloned(),
            })
            .collect(),
        update: state.update.clone(),
        events: events.list(),
    }
}

/// Asks the agent's own request loop for the status of every service (what
/// `keepup-agent status` shows); empty if the agent is stopping.
pub async fn service_status(to_agent: &mpsc::Sender<Incoming>) -> Vec<ServiceStatus> {
    let (tx, rx) = oneshot::channel();
    if to_agent.send((Request::Status, tx)).await.is_err() {
        return Vec::new();
    }
    rx.await.map(|r| r.services).unwrap_or_default()
}

/// Reads the token file: one line, the host's token.
fn read_token(path: &Path) -> Result<String, String> {
    let t = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read the report token {}: {e}; no report sent (put this host's token \
             there: `keepup` on the server issues it)",
            path.display()
        )
    })?;
    let t = t.trim();
    if t.is_empty() || t.contains(char::is_whitespace) {
        return Err(format!(
            "the report token {} is empty or not one word; no report sent",
            path.display()
        ));
    }
    Ok(t.to_string())
}

/// Posts one report; `Err` says why it was not accepted.
pub async fn post(cfg: &ReportConfig, report: &Report) -> Result<(), String> {
    let token = read_token(&cfg.token_file)?;
    let url = format!("{}{REPORT_PATH}", cfg.url);
    let body = serde_json::to_vec(report).map_err(|e| e.to_string())?;
    match crate::update::fetch::post(&url, &token, body, POST_TIMEOUT).await {
        Ok((s, _)) if s.is_success() => Ok(()),
        Ok((s, text)) => Err(format!(
            "{url}: the server answered {s}{}",
            if text.is_empty() {
                String::new()
            } else {
                format!(": {text}")
            }
        )),
        Err(e) => Err(format!("{url}: {e}")),
    }
}

/// The reporter task: a report every `every`, and one whenever `now` is notified (after an
/// update pass). Logs a failure once per outage, and when reports get through again.
pub async fn run(
    cfg: ReportConfig,
    host: String,
    state: SharedHost,
    events: Events,
    to_agent: mpsc::Sender<Incoming>,
    now: Arc<Notify>,
) {
    eprintln!(
        "keepup-agent: reporting to {}{REPORT_PATH} as {host} every {}",
        cfg.url,
        keepup_packager::spec::format_duration(cfg.every)
    );
    let mut failing: Option<String> = None;
    // The first report goes out soon after start, once the services have been started.
    let mut next = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = now.notified() => {}
        }
        next = tokio::time::Instant::now() + cfg.every;
        let services = service_status(&to_agent).await;
        let report = {
            let s = state.lock().unwrap_or_else(|e| e.into_inner());
            build(&host, &s, &events, &services)
        };
        match post(&cfg, &report).await {
            Ok(()) => {
                if let Some(why) = failing.take() {
                    eprintln!("keepup-agent: reports get through again (after: {why})");
                }
            }
            Err(why) => {
                if failing.is_none() {
                    eprintln!(
                        "keepup-agent: report not sent: {why} (trying again every {}; \
                         supervision goes on; said once until it works again)",
                        keepup_packager::spec::format_duration(cfg.every)
                    );
                }
                failing = Some(why);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ProbeStatus;
    use crate::policy::State;

    #[test]
    fn events_keep_the_last_ones() {
        let e = Events::default();
        for i in 0..MAX_EVENTS + 5 {
            e.push("install", Some("foo"), format!("n{i}"));
        }
        let l = e.list();
        assert_eq!(l.len(), MAX_EVENTS);
        assert_eq!(l[0].message, "n5");
        assert_eq!(l.last().unwrap().message, format!("n{}", MAX_EVENTS + 4));
    }

    #[test]
    fn events_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("events.json");
        let e = Events::persistent(file.clone());
        assert!(e.list().is_empty());
        e.push("upgrade", Some("foo"), "upgraded foo 1 -> 2");
        e.push("agent-start", None, "started");
        let again = Events::persistent(file.clone());
        let kinds: Vec<String> = again.list().into_iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["upgrade", "agent-start"]);
        // A damaged file is replaced, not fatal.
        std::fs::write(&file, "{not json").unwrap();
        let fresh = Events::persistent(file.clone());
        assert!(fresh.list().is_empty());
        fresh.push("agent-start", None, "started");
        assert_eq!(Events::persistent(file).list().len(), 1);
    }

    #[test]
    fn host_state_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(HOST_STATE_FILE);
        assert!(HostState::load(&file).installed.is_empty());
        let mut s = HostState {
            track: Some("stable".into()),
            format: Some(Format::Deb),
            ..HostState::default()
        };
        s.installed.insert("foo".into(), "1.0.0-1".into());
        s.save(&file).unwrap();
        let back = HostState::load(&file);
        assert_eq!(back.track.as_deref(), Some("stable"));
        assert_eq!(
            back.installed.get("foo").map(String::as_str),
            Some("1.0.0-1")
        );
        std::fs::write(&file, "[").unwrap();
        assert!(HostState::load(&file).installed.is_empty());
    }

    #[test]
    fn a_repeating_failure_is_recorded_once() {
        let e = Events::default();
        for _ in 0..10 {
            e.push(
                "refused",
                None,
                "refused fleet.yaml: serial 1 is lower than 2",
            );
            e.push(
                "update-failed",
                None,
                "refused fleet.yaml: serial 1 is lower than 2",
            );
        }
        assert_eq!(e.list().len(), 2);
        e.push("started", Some("foo"), "foo 1.1-1: started");
        e.push(
            "update-failed",
            None,
            "refused fleet.yaml: serial 1 is lower than 2",
        );
        assert_eq!(e.list().len(), 3);
        // Once other things have happened, it is news again.
        for i in 0..4 {
            e.push("install", Some("foo"), format!("n{i}"));
        }
        e.push(
            "update-failed",
            None,
            "refused fleet.yaml: serial 1 is lower than 2",
        );
        assert_eq!(e.list().len(), 8);
    }

    #[test]
    fn report_from_status_and_state() {
        let events = Events::default();
        events.push("given-up", Some("foo"), "given up after 10 starts");
        let mut st = HostState {
            track: Some("stable".into()),
            format: Some(Format::Deb),
            arch: Some("amd64".into()),
            ..HostState::default()
        };
        st.installed.insert("foo".into(), "1.0.0-1".into());
        st.starts.insert(
            "foo".into(),
            StartReport {
                version: "1.0.0-1".into(),
                started: false,
                detail: "given-up".into(),
                log_tail: vec!["boom".into()],
                at: 1,
            },
        );
        let svc = ServiceStatus {
            name: "foo".into(),
            version: "1.0.0".into(),
            supervisor: "agent".into(),
            state: State::GivenUp,
            pid: None,
            uptime_secs: None,
            restarts: 9,
            last_exit: None,
            note: None,
            probes: vec![ProbeStatus {
                name: "banner".into(),
                probe: "tcp".into(),
                ok: Some(false),
                reason: Some("refused".into()),
                failures: 3,
                age_secs: Some(1.0),
            }],
        };
        let r = build("web1", &st, &events, &[svc]);
        r.validate().unwrap();
        assert_eq!(r.track.as_deref(), Some("stable"));
        assert_eq!(r.services[0].state, "given-up");
        assert_eq!(r.services[0].restarts, 9);
        assert_eq!(r.services[0].probes[0].failures, 3);
        assert!(!r.services[0].start.as_ref().unwrap().started);
        assert_eq!(r.events[0].kind, "given-up");
        assert_eq!(r.installed["foo"], "1.0.0-1");
    }

    #[tokio::test]
    async fn missing_token_is_a_clear_error() {
        let cfg = ReportConfig {
            url: "http://127.0.0.1:1".into(),
            token_file: "/nonexistent/keepup-token".into(),
            every: Duration::from_secs(60),
        };
        let e = post(&cfg, &Report::default()).await.unwrap_err();
        assert!(
            e.contains("cannot read the report token /nonexistent/keepup-token"),
            "{e}"
        );
        let d = tempfile::tempdir().unwrap();
        let tf = d.path().join("token");
        std::fs::write(&tf, "abc\n").unwrap();
        let cfg = ReportConfig {
            token_file: tf,
            ..cfg
        };
        let e = post(&cfg, &Report::default()).await.unwrap_err();
        assert!(e.contains("http://127.0.0.1:1/api/v1/report"), "{e}");
    }
}
