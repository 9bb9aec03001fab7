//! What an agent reports about its host (`POST /api/v1/report`, JSON, with the host's bearer
//! token): its track, what is installed, each service's state, restarts and last probe
//! results, the last update pass and recent events. The server keeps the latest report per
//! host and the events; `keepup report` and the fleet page are built from them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::index::Format;

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
    pub state: String,
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
    /// What the pass did or decided, one line per action.
    #[serde(default)]
    pub actions: Vec<String>,
    /// The serial of the track index it used.
    #[serde(default)]
    pub index_serial: Option<u64>,
    /// The serial of the fleet policy it used.
    #[serde(default)]
    pub fleet_serial: Option<u64>,
}

/// Something that happened on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unix time.
    pub at: u64,
    /// The service concerned, if any.
    #[serde(default)]
    pub service: Option<String>,
    /// Short kind: `install`, `upgrade`, `remove`, `update-failed`, `health-kill`,
    /// `given-up`, `started`, `failed-to-start`, `refused`, ...
    pub kind: String,
    /// For people.
    pub message: String,
}

impl Report {
    /// Checks what a server must not accept: an empty or overlong host name, too many
    /// events, absurd sizes. The body size itself is limited by [`MAX_REPORT_BYTES`].
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        };
        if !name_ok(&self.host) {
            return Err(format!("host {:?} is not a host name", self.host));
        }
        if self.events.len() > MAX_EVENTS {
            return Err(format!(
                "{} events; at most {MAX_EVENTS} per report",
                self.events.len()
            ));
        }
        if self.services.len() > 1000 || self.installed.len() > 1000 {
            return Err("more than 1000 services".into());
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
        assert!(bad.validate().unwrap_err().contains("not a host name"));
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
            state: "running".into(),
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
