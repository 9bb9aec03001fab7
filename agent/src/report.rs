//! Reports: what the agent tells the server about its host (`POST <report>/api/v1/report` with
//! the host's bearer token), after each update pass and every `report_every`. A report is built
//! from the supervisor's live `status` (state, restarts, probes per service), what the last
//! update pass found and did (track, installed versions, quarantines, start results, the
//! [`HostState`] file) and the supervisor's ring of recent events. Reports are built and posted
//! by the short-lived keepup-agent-pass child (docs/agent.md, "Updater"), which asks the
//! supervisor for `status` and `events` over its control socket: posting never blocks
//! supervision, and the supervisor never loads the HTTP or TLS code. The supervisor logs a
//! failure once per outage (the child tells it how each report went).
//!
//! A server in a herd answers `503` (or a proxy `429`) with `Retry-After`: the report is
//! [`NotSent::retry_after`], and the supervisor sends the next one then (bounded by
//! [`MAX_RETRY_AFTER`]) instead of after `report_every`, so a herd spreads out and no host's
//! report waits a whole period or is given up.

use std::path::Path;
use std::time::Duration;

use keepup_deploy::wire::report::{Event, ProbeReport, Report, ServiceReport, REPORT_PATH};

use crate::config::ReportConfig;
use crate::control;
use crate::events::now_unix;
use crate::hoststate::HostState;
use crate::proto::{Request, ServiceStatus};

/// How long one post may take.
const POST_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the supervisor may take to answer `status` or `events`.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `Retry-After` honoured: a longer one (a misconfigured proxy) is cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Why a report was not sent or accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotSent {
    /// What went wrong, for the log.
    pub why: String,
    /// The server is busy and asked to be sent the report again after this long (`503` or
    /// `429` with `Retry-After`, at most [`MAX_RETRY_AFTER`]).
    pub retry_after: Option<Duration>,
}

impl NotSent {
    /// Not sent, for a reason that asks no particular wait.
    fn new(why: String) -> NotSent {
        NotSent {
            why,
            retry_after: None,
        }
    }
}

/// Builds a report from the host state, the events and the supervisor's status.
pub fn build(
    host: &str,
    state: &HostState,
    events: &[Event],
    services: &[ServiceStatus],
) -> Report {
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
                state: s.state.clone(),
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
        events: events.to_vec(),
    }
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

/// Posts one report; `Err` says why it was not accepted, and when to try again if the server
/// said.
pub async fn post(cfg: &ReportConfig, report: &Report) -> Result<(), NotSent> {
    let token = read_token(&cfg.token_file).map_err(NotSent::new)?;
    let url = format!("{}{REPORT_PATH}", cfg.url);
    let body = serde_json::to_vec(report).map_err(|e| NotSent::new(e.to_string()))?;
    match crate::http::post(&url, &token, body, POST_TIMEOUT).await {
        Ok(p) if p.status.is_success() => Ok(()),
        Ok(p) => {
            let busy = matches!(p.status.as_u16(), 429 | 503);
            let retry_after = p
                .retry_after
                .filter(|_| busy)
                .map(|d| d.clamp(Duration::from_secs(1), MAX_RETRY_AFTER));
            let wait = retry_after.map_or(String::new(), |d| {
                format!(" (it asked for the report again in {} s)", d.as_secs())
            });
            let text = if p.text.is_empty() {
                String::new()
            } else {
                format!(": {}", p.text)
            };
            Err(NotSent {
                why: format!("{url}: the server answered {}{text}{wait}", p.status),
                retry_after,
            })
        }
        Err(e) => Err(NotSent::new(format!("{url}: {e}"))),
    }
}

/// Builds this host's report from `state`, with the services' status and the recent events
/// that the supervisor at `socket` answers, and posts it. `Err` says why no report was sent or
/// accepted.
pub async fn send(
    cfg: &ReportConfig,
    host: &str,
    socket: &Path,
    state: &HostState,
) -> Result<(), NotSent> {
    let ask = |req: Request| async move {
        let what = req.describe();
        match control::request_within(socket, &req, ASK_TIMEOUT).await {
            Ok(r) if r.ok => Ok(r),
            Ok(r) => Err(format!(
                "no report sent: the agent did not answer `{what}`: {}",
                r.error.unwrap_or_default()
            )),
            Err(e) => Err(format!(
                "no report sent: the agent did not answer `{what}`: {e:#}"
            )),
        }
    };
    let services = ask(Request::Status).await.map_err(NotSent::new)?.services;
    let events = ask(Request::Events)
        .await
        .map_err(NotSent::new)?
        .events
        .map(|e| e.0)
        .unwrap_or_default();
    post(cfg, &build(host, state, &events, &services)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Events;
    use crate::hoststate::HOST_STATE_FILE;
    use crate::proto::ProbeStatus;
    use keepup_deploy::wire::report::{StartReport, MAX_EVENTS};
    use keepup_deploy::wire::{EventKind, Format, ServiceState};

    #[test]
    fn events_keep_the_last_ones() {
        let e = Events::default();
        for i in 0..MAX_EVENTS + 5 {
            e.push(EventKind::Install, Some("foo"), format!("n{i}"));
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
        e.push(EventKind::Upgrade, Some("foo"), "upgraded foo 1 -> 2");
        e.push(EventKind::AgentStart, None, "started");
        let again = Events::persistent(file.clone());
        let kinds: Vec<String> = again
            .list()
            .into_iter()
            .map(|e| e.kind.to_string())
            .collect();
        assert_eq!(kinds, ["upgrade", "agent-start"]);
        // A damaged file is replaced, not fatal.
        std::fs::write(&file, "{not json").unwrap();
        let fresh = Events::persistent(file.clone());
        assert!(fresh.list().is_empty());
        fresh.push(EventKind::AgentStart, None, "started");
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
                EventKind::Refused,
                None,
                "refused fleet.yaml: serial 1 is lower than 2",
            );
            e.push(
                EventKind::UpdateFailed,
                None,
                "refused fleet.yaml: serial 1 is lower than 2",
            );
        }
        assert_eq!(e.list().len(), 2);
        e.push(EventKind::Started, Some("foo"), "foo 1.1-1: started");
        e.push(
            EventKind::UpdateFailed,
            None,
            "refused fleet.yaml: serial 1 is lower than 2",
        );
        assert_eq!(e.list().len(), 3);
        // Once other things have happened, it is news again.
        for i in 0..4 {
            e.push(EventKind::Install, Some("foo"), format!("n{i}"));
        }
        e.push(
            EventKind::UpdateFailed,
            None,
            "refused fleet.yaml: serial 1 is lower than 2",
        );
        assert_eq!(e.list().len(), 8);
    }

    #[test]
    fn report_from_status_and_state() {
        let events = Events::default();
        events.push(EventKind::GivenUp, Some("foo"), "given up after 10 starts");
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
            state: ServiceState::GivenUp,
            pid: None,
            uptime_secs: None,
            restarts: 9,
            last_exit: None,
            note: None,
            run: None,
            ready_secs: None,
            status_text: None,
            probes: vec![ProbeStatus {
                name: "banner".into(),
                probe: "tcp".into(),
                ok: Some(false),
                reason: Some("refused".into()),
                failures: 3,
                age_secs: Some(1.0),
            }],
        };
        let r = build("web1", &st, &events.list(), &[svc]);
        r.validate().unwrap();
        assert_eq!(r.track.as_deref(), Some("stable"));
        assert_eq!(r.services[0].state, ServiceState::GivenUp);
        assert_eq!(r.services[0].restarts, 9);
        assert_eq!(r.services[0].probes[0].failures, 3);
        assert!(!r.services[0].start.as_ref().unwrap().started);
        assert_eq!(r.events[0].kind, EventKind::GivenUp);
        assert_eq!(r.installed["foo"], "1.0.0-1");
    }

    #[tokio::test]
    async fn a_busy_server_s_retry_after_is_kept_and_bounded() {
        let d = tempfile::tempdir().unwrap();
        let tf = d.path().join("token");
        std::fs::write(&tf, "abc\n").unwrap();
        let answer = |status: &str, after: &str| {
            format!(
                "HTTP/1.1 {status}\r\nRetry-After: {after}\r\nContent-Length: 4\r\n\
                 Connection: close\r\n\r\nbusy"
            )
            .into_bytes()
        };
        let cases = [
            ("503 Service Unavailable", "17", Some(17)),
            ("429 Too Many Requests", "3", Some(3)),
            // A proxy asking for a day is cut to the bound; 0 still waits a second.
            (
                "503 Service Unavailable",
                "86400",
                Some(MAX_RETRY_AFTER.as_secs()),
            ),
            ("503 Service Unavailable", "0", Some(1)),
            // A date is not used (the clocks may disagree), nor a wait on a refusal.
            (
                "503 Service Unavailable",
                "Fri, 31 Dec 1999 23:59:59 GMT",
                None,
            ),
            ("400 Bad Request", "17", None),
        ];
        for (status, after, want) in cases {
            let url =
                crate::http::testserver::server(answer(status, after), Duration::ZERO, "").await;
            let cfg = ReportConfig {
                url,
                token_file: tf.clone(),
                every: Duration::from_secs(60),
            };
            let e = post(&cfg, &Report::default()).await.unwrap_err();
            assert_eq!(e.retry_after.map(|d| d.as_secs()), want, "{status} {after}");
            assert!(e.why.contains(status.split(' ').next().unwrap()), "{e:?}");
        }
    }

    #[tokio::test]
    async fn missing_token_is_a_clear_error() {
        let cfg = ReportConfig {
            url: "http://127.0.0.1:1".into(),
            token_file: "/nonexistent/keepup-token".into(),
            every: Duration::from_secs(60),
        };
        let e = post(&cfg, &Report::default()).await.unwrap_err().why;
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
        assert!(e.why.contains("http://127.0.0.1:1/api/v1/report"), "{e:?}");
        assert_eq!(e.retry_after, None);
    }
}
