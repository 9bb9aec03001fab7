//! What an agent reports about its host (`POST /api/v1/report`, JSON, with the host's bearer
//! token): its track, what is installed, each service's state, restarts and last probe
//! results, the last update pass and recent events. The server keeps the latest report per
//! host and the events; `keepup report` and the fleet page are built from them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::index::Format;
use super::state::{EventKind, ServiceState};

/// Where agents post reports.
pub const REPORT_PATH: &str = "/api/v1/report";
/// The fleet view as JSON.
pub const FLEET_PATH: &str = "/api/v1/fleet";
/// The largest report body a server accepts, in bytes.
pub const MAX_REPORT_BYTES: usize = 256 * 1024;
/// Events an agent keeps (and sends) at most.
pub const MAX_EVENTS: usize = 50;

/// One host's state, as its agent sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Host name (must match the token's host).
    pub host: String,
    /// The agent's version.
    #[serde(default)]
    pub agent_version: String,
    /// Unix time the report was made.
    pub sent_at: u64,
    /// The track the host follows, from the fleet policy (none: not assigned).
    #[serde(default)]
    pub track: Option<String>,
    /// The host's package format.
    #[serde(default)]
    pub format: Option<Format>,
    /// The host's architecture as its format spells it (`amd64`, `x86_64`).
    #[serde(default)]
    pub arch: Option<String>,
    /// Fully installed packages of the repository's services: name -> version.
    #[serde(default)]
    pub installed: BTreeMap<String, String>,
    /// Services quarantined on this host, as the agent last read the policy.
    #[serde(default)]
    pub quarantined: Vec<String>,
    /// Every supervised service.
    #[serde(default)]
    pub services: Vec<ServiceReport>,
    /// The last update pass.
    #[serde(default)]
    pub update: Option<UpdateReport>,
    /// Recent events, oldest first (at most [`MAX_EVENTS`]).
    #[serde(default)]
    pub events: Vec<Event>,
}

/// One supervised service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceReport {
    /// Service name.
    pub name: String,
    /// Version from its manifest.
    #[serde(default)]
    pub version: String,
    /// The supervisor's state (`running`, `starting`, `backoff`, `given-up`, `down`, ...).
    pub state: ServiceState,
    /// Starts after the first one since the agent started or the version changed.
    #[serde(default)]
    pub restarts: u64,
    /// Latest result of each probe.
    #[serde(default)]
    pub probes: Vec<ProbeReport>,
    /// Whether the last install or upgrade of it started.
    #[serde(default)]
    pub start: Option<StartReport>,
}

/// The latest result of one probe.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// Check name.
    pub name: String,
    /// Pass or fail; `None` before the first run.
    #[serde(default)]
    pub ok: Option<bool>,
    /// Why it failed.
    #[serde(default)]
    pub reason: Option<String>,
    /// Consecutive failures.
    #[serde(default)]
    pub failures: u32,
}

/// The outcome of starting a service after its package was installed or upgraded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StartReport {
    /// The version installed.
    pub version: String,
    /// `started` or `failed to start`.
    pub started: bool,
    /// Why (for people).
    #[serde(default)]
    pub detail: String,
    /// The service log's last lines when it failed.
    #[serde(default)]
    pub log_tail: Vec<String>,
    /// Unix time of the judgement.
    #[serde(default)]
    pub at: u64,
}

/// One update pass.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateReport {
    /// Unix time the pass ended.
    pub at: u64,
    /// Whether every step succeeded.
    pub ok: bool,
    /// Why not (the first failure: unreachable repository, refused index, hung package
    /// manager, ...).
    #[serde(default)]
    pub error: Option<String>,
    /// The kind of that failure (absent from agents before it was added).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<super::UpdateFailure>,
    /// What the pass did or decided, one line per action.
    #[serde(default)]
    pub actions: Vec<String>,
    /// The serial of the track index it used.
    #[serde(default)]
    pub index_serial: Option<u64>,
    /// The serial of the fleet policy it used.
    #[serde(default)]
    pub fleet_serial: Option<u64>,
    /// The track's rollouts in waves, as this host saw them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollouts: Vec<RolloutReport>,
}

/// A rollout in waves, as one host saw it in its last pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutReport {
    /// The rollout's id (`<track>/<name>/<to>`).
    pub id: String,
    /// The package.
    pub name: String,
    /// This host's wave (1-based); none: in no wave.
    #[serde(default)]
    pub wave: Option<u32>,
    /// Waves open.
    #[serde(default)]
    pub open: u32,
    /// The phase the host read (`rolling`, `halted`, ...).
    #[serde(default)]
    pub phase: String,
    /// Why this host does not take the new version, when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
}

/// Something that happened on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unix time.
    pub at: u64,
    /// The service concerned, if any.
    #[serde(default)]
    pub service: Option<String>,
    /// What happened: `install`, `upgrade`, `remove`, `update-failed`, `health-kill`,
    /// `given-up`, `started`, `failed-to-start`, `refused`, ...
    pub kind: EventKind,
    /// For people.
    pub message: String,
}

/// Why a server refuses a report: the field (`host`, `services[2].probes[0].name`, `events`)
/// and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidReport {
    /// The offending field, as a path into the report.
    pub field: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl std::fmt::Display for InvalidReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for InvalidReport {}

impl Report {
    /// Checks what a server must not accept: names that break the rules of
    /// [`names`](super::names) (host, services, probes, quarantines, installed packages, event
    /// services), too many events, absurd sizes. The body size itself is limited by
    /// [`MAX_REPORT_BYTES`]. Free text (probe reasons, errors, log tails, messages) is not
    /// checked here: whoever shows it escapes it.
    pub fn validate(&self) -> Result<(), InvalidReport> {
        use super::names::{
            is_check_name, is_host_name, is_service_name, CHECK_NAME_RULE, HOST_NAME_RULE,
            SERVICE_NAME_RULE,
        };
        let bad = |field: String, message: String| Err(InvalidReport { field, message });
        let service = |field: String, name: &str| {
            if is_service_name(name) {
                Ok(())
            } else {
                bad(
                    field,
                    format!("{name:?} is not a service name ({SERVICE_NAME_RULE})"),
                )
            }
        };
        if !is_host_name(&self.host) {
            return bad(
                "host".into(),
                format!("{:?} is not a host name ({HOST_NAME_RULE})", self.host),
            );
        }
        if self.events.len() > MAX_EVENTS {
            return bad(
                "events".into(),
                format!(
                    "{} events; at most {MAX_EVENTS} per report",
                    self.events.len()
                ),
            );
        }
        if self.services.len() > 1000 || self.installed.len() > 1000 {
            return bad("services".into(), "more than 1000 services".into());
        }
        for (i, s) in self.services.iter().enumerate() {
            service(format!("services[{i}].name"), &s.name)?;
            if s.probes.len() > 100 {
                return bad(
                    format!("services[{i}].probes"),
                    "more than 100 probes".into(),
                );
            }
            for (j, p) in s.probes.iter().enumerate() {
                if !is_check_name(&p.name) {
                    return bad(
                        format!("services[{i}].probes[{j}].name"),
                        format!("{:?} is not a probe name ({CHECK_NAME_RULE})", p.name),
                    );
                }
            }
        }
        for name in self.installed.keys() {
            service(format!("installed[{name:?}]"), name)?;
        }
        for (i, name) in self.quarantined.iter().enumerate() {
            service(format!("quarantined[{i}]"), name)?;
        }
        for (i, e) in self.events.iter().enumerate() {
            if let Some(name) = &e.service {
                service(format!("events[{i}].service"), name)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_report_parses_and_validates() {
        let r: Report = serde_json::from_str(r#"{"host":"web1","sent_at":5}"#).unwrap();
        assert_eq!(r.host, "web1");
        r.validate().unwrap();
        let bad: Report = serde_json::from_str(r#"{"host":"../x","sent_at":5}"#).unwrap();
        let e = bad.validate().unwrap_err();
        assert_eq!(e.field, "host");
        assert!(e.message.contains("not a host name"), "{e}");
    }

    #[test]
    fn names_in_reports_follow_the_rules() {
        let svc = |name: &str, probe: &str| ServiceReport {
            name: name.into(),
            state: ServiceState::Running,
            probes: vec![ProbeReport {
                name: probe.into(),
                reason: Some("<script>free text is not checked</script>".into()),
                ..ProbeReport::default()
            }],
            ..ServiceReport::default()
        };
        let mut r = Report {
            host: "web1".into(),
            services: vec![svc("foo", "port")],
            ..Report::default()
        };
        r.validate().unwrap();
        r.services.push(svc("<script>", "port"));
        assert_eq!(r.validate().unwrap_err().field, "services[1].name");
        r.services[1] = svc("bar", "x\u{1b}[2J");
        assert_eq!(
            r.validate().unwrap_err().field,
            "services[1].probes[0].name"
        );
        r.services.pop();
        r.installed.insert("<b>".into(), "1".into());
        assert_eq!(r.validate().unwrap_err().field, "installed[\"<b>\"]");
        r.installed.clear();
        r.events.push(Event {
            service: Some("a b".into()),
            ..Event::default()
        });
        assert_eq!(r.validate().unwrap_err().field, "events[0].service");
    }

    #[test]
    fn round_trip() {
        let mut r = Report {
            host: "web1".into(),
            sent_at: 10,
            track: Some("stable".into()),
            format: Some(Format::Deb),
            ..Report::default()
        };
        r.installed.insert("foo".into(), "1.0-1".into());
        r.services.push(ServiceReport {
            name: "foo".into(),
            state: ServiceState::Running,
            probes: vec![ProbeReport {
                name: "port".into(),
                ok: Some(false),
                reason: Some("refused".into()),
                failures: 2,
            }],
            ..ServiceReport::default()
        });
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), r);
    }
}
