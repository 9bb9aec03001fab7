//! The agent manifest: `/usr/lib/keepup/services/<name>.yaml`, written into every package.
//!
//! It tells keepup-agent what to supervise (launch script, role, supervisor settings, probes).
//! Installing the package makes the service appear to the agent; removing it makes it
//! disappear. This module is the contract between the packager and the agent, so it is
//! available without the package writers (`default-features = false`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spec::{self, ProbeSpec, Spec, SupervisorKind};

/// Where packages install manifests.
pub const MANIFEST_DIR: &str = "/usr/lib/keepup/services";

/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// What the agent needs to know about one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version ([`MANIFEST_FORMAT`]).
    pub format: u32,
    /// Service (and package) name.
    pub name: String,
    /// Full package version, `<version>-<release>`.
    pub version: String,
    /// The role user whose processes belong to this service.
    pub role: String,
    /// Absolute path of the launch script.
    pub launch: String,
    /// Supervision settings.
    pub supervisor: ManifestSupervisor,
    /// Active probes.
    #[serde(default)]
    pub checks: Vec<ManifestCheck>,
}

/// Supervision settings as the agent reads them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSupervisor {
    /// Who runs the launch script.
    pub kind: Supervised,
    /// Starts allowed within `within` before giving up.
    pub count: u32,
    /// Window for `count`.
    #[serde(with = "duration_text")]
    pub within: Duration,
    /// TERM-to-KILL grace when stopping.
    #[serde(with = "duration_text")]
    pub stop_grace: Duration,
    /// The systemd unit name, for `kind: systemd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// When a run counts as ready; `None` (manifests written before readiness existed): see
    /// [`Manifest::ready`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<Ready>,
    /// A start not ready within this is a failed start; `None`: [`READY_TIMEOUT`] (see
    /// [`Manifest::ready_timeout`]).
    #[serde(
        default,
        with = "duration_text_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub ready_timeout: Option<Duration>,
    /// With `ready: notify` only: the daemon sends `WATCHDOG=1` at least this often, or it is
    /// killed and started again.
    #[serde(
        default,
        with = "duration_text_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub watchdog: Option<Duration>,
    /// Services this one starts after: it starts once they are ready, and stops before them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
}

/// How long a start may take to become ready when the manifest does not say (systemd's
/// `TimeoutStartSec=` default).
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// When a run of a service counts as ready: its dependants (`supervisor.after`) start only
/// then, and a start that is not ready within the ready timeout counts as a failed start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ready {
    /// The daemon says so: `READY=1` on `$NOTIFY_SOCKET`, systemd's notify protocol
    /// (`sd_notify`), so a daemon written for `Type=notify` works unchanged.
    Notify,
    /// Every check has passed once since the start.
    Probes,
    /// As soon as the launch script has `exec`ed the daemon (systemd's `Type=exec`).
    Exec,
}

impl Ready {
    /// Every value, in the order the docs and messages list them.
    pub const ALL: [Ready; 3] = [Ready::Notify, Ready::Probes, Ready::Exec];

    /// The name in specs and manifests (`notify`, `probes`, `exec`).
    pub fn as_str(self) -> &'static str {
        match self {
            Ready::Notify => "notify",
            Ready::Probes => "probes",
            Ready::Exec => "exec",
        }
    }

    /// The value named `s`, if any.
    pub fn parse(s: &str) -> Option<Ready> {
        Ready::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The valid names for messages: `notify, probes, exec`.
    pub fn names() -> String {
        Ready::ALL.map(Ready::as_str).join(", ")
    }
}

impl std::fmt::Display for Ready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who runs the launch script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Supervised {
    /// keepup-agent spawns it.
    Agent,
    /// systemd runs it; the agent re-kicks the unit.
    Systemd,
    /// runsv runs it from `/etc/sv/<name>`; the agent probes and kills the role.
    Runit,
    /// supervisord runs it as `[program:<name>]`; the agent re-kicks a `FATAL` program.
    Supervisord,
}

impl Supervised {
    /// The manifest's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Supervised::Agent => "agent",
            Supervised::Systemd => "systemd",
            Supervised::Runit => "runit",
            Supervised::Supervisord => "supervisord",
        }
    }

    /// Something other than the agent runs the launch script.
    pub fn is_external(self) -> bool {
        self != Supervised::Agent
    }
}

/// One probe with its schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestCheck {
    /// Name for reports.
    pub name: String,
    /// What the probe does.
    pub probe: ManifestProbe,
    /// Interval.
    #[serde(with = "duration_text")]
    pub every: Duration,
    /// Bound on one run.
    #[serde(with = "duration_text")]
    pub timeout: Duration,
    /// Consecutive failures before the role is killed.
    pub failures: u32,
    /// Wait after a start before probing.
    #[serde(with = "duration_text")]
    pub grace: Duration,
}

/// A probe definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ManifestProbe {
    /// Connect (+ send) (+ expect banner regex).
    Tcp {
        /// Host to connect to.
        host: String,
        /// Port.
        port: u16,
        /// Bytes to send first.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        send: Option<String>,
        /// Banner regex.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expect: Option<String>,
    },
    /// HTTP request.
    Http {
        /// URL.
        url: String,
        /// Method.
        method: String,
        /// Lowest accepted status.
        status_min: u16,
        /// Highest accepted status.
        status_max: u16,
        /// Body regex.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<String>,
        /// Host header override.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host_header: Option<String>,
    },
    /// Command run as the role user.
    Exec {
        /// argv.
        argv: Vec<String>,
    },
}

impl ManifestProbe {
    /// The manifest form of a spec's probe.
    pub fn from_spec(probe: &ProbeSpec) -> ManifestProbe {
        match probe {
            ProbeSpec::Tcp {
                host,
                port,
                send,
                expect,
            } => ManifestProbe::Tcp {
                host: host.clone(),
                port: *port,
                send: send.clone(),
                expect: expect.clone(),
            },
            ProbeSpec::Http {
                url,
                method,
                status,
                body,
                host_header,
            } => ManifestProbe::Http {
                url: url.clone(),
                method: method.clone(),
                status_min: status.0,
                status_max: status.1,
                body: body.clone(),
                host_header: host_header.clone(),
            },
            ProbeSpec::Exec { argv } => ManifestProbe::Exec { argv: argv.clone() },
        }
    }
}

/// Builds the probe a manifest describes with `keepup_checks`' constructors; exec probes run
/// as `run_as` (`None`: as whoever runs them). The agent runs what this returns, and `keepup
/// pack` calls it on every probe of a spec, so "the agent could not run this probe" means the
/// same at pack time as on the host.
pub fn build_probe(
    probe: &ManifestProbe,
    run_as: Option<keepup_checks::RunAs>,
) -> Result<keepup_checks::Probe, keepup_checks::ProbeError> {
    use keepup_checks::{ExecProbe, ExecSpec, HttpProbe, HttpSpec, StatusRange, TcpProbe, TcpSpec};
    Ok(match probe {
        ManifestProbe::Tcp {
            host,
            port,
            send,
            expect,
        } => {
            // IPv6 literals are bracketed.
            let addr = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            TcpProbe::new(TcpSpec {
                addr,
                send: send.as_ref().map(|s| s.as_bytes().to_vec()),
                expect: expect.clone(),
            })?
            .into()
        }
        ManifestProbe::Http {
            url,
            method,
            status_min,
            status_max,
            body,
            host_header,
        } => HttpProbe::new(HttpSpec {
            url: url.clone(),
            method: Some(method.clone()),
            status: StatusRange::new(*status_min, *status_max)?,
            body: body.clone(),
            host: host_header.clone(),
        })?
        .into(),
        ManifestProbe::Exec { argv } => ExecProbe::new(ExecSpec {
            argv: argv.clone(),
            run_as,
        })?
        .into(),
    })
}

/// Errors reading a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not valid YAML for a manifest.
    #[error("{path}: not a keepup manifest: {message}")]
    Parse {
        /// File.
        path: String,
        /// Parser message.
        message: String,
    },
    /// Written by a newer keepup.
    #[error("{path}: manifest format {found} is newer than this agent understands ({MANIFEST_FORMAT}); upgrade keepup-agent")]
    TooNew {
        /// File.
        path: String,
        /// Format found.
        found: u32,
    },
    /// A value the agent would put into a path, a `systemctl` argument or a kill decision is
    /// not what `keepup pack` writes (a hand-edited or forged manifest).
    #[error("{path}: {field}: {message}; not supervised (reinstall the package, or fix the manifest as `keepup pack` writes it)")]
    Invalid {
        /// File.
        path: String,
        /// The offending field (`name`, `role`, `launch`, `supervisor.unit`, or the file name).
        field: &'static str,
        /// What is wrong and what is expected.
        message: String,
    },
}

impl ManifestError {
    /// The file the error is about.
    pub fn path(&self) -> &str {
        match self {
            ManifestError::Parse { path, .. }
            | ManifestError::TooNew { path, .. }
            | ManifestError::Invalid { path, .. } => path,
        }
    }
}

/// Whether `s` is a systemd unit name keepup may pass to `systemctl`: `[A-Za-z0-9:_.\@-]`,
/// not starting with `-` or `.` (so never an option), at most 255 bytes, ending in `.service`
/// with something before it.
pub fn is_unit_name(s: &str) -> bool {
    s.len() <= 255
        && s.strip_suffix(".service")
            .is_some_and(|stem| !stem.is_empty())
        && !s.starts_with(['-', '.'])
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '-' | '\\' | '@'))
}

impl Manifest {
    /// The manifest for a validated spec.
    pub fn from_spec(spec: &Spec) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            name: spec.name.clone(),
            version: spec.full_version(),
            role: spec.role.clone(),
            launch: spec.launch_path(),
            supervisor: ManifestSupervisor {
                kind: match spec.supervisor.kind {
                    SupervisorKind::Agent => Supervised::Agent,
                    SupervisorKind::Systemd => Supervised::Systemd,
                    SupervisorKind::Runit => Supervised::Runit,
                    SupervisorKind::Supervisord => Supervised::Supervisord,
                },
                count: spec.supervisor.count,
                within: spec.supervisor.within,
                stop_grace: spec.supervisor.stop_grace,
                unit: (spec.supervisor.kind == SupervisorKind::Systemd)
                    .then(|| format!("{}.service", spec.name)),
                // Resolved: what the spec said or defaulted to, so the agent never guesses.
                ready: Some(spec.supervisor.ready),
                ready_timeout: Some(spec.supervisor.ready_timeout),
                watchdog: spec.supervisor.watchdog,
                after: spec.supervisor.after.clone(),
            },
            checks: spec
                .checks
                .iter()
                .map(|c| ManifestCheck {
                    name: c.name.clone(),
                    probe: ManifestProbe::from_spec(&c.probe),
                    every: c.every,
                    timeout: c.timeout,
                    failures: c.failures,
                    grace: c.grace,
                })
                .collect(),
        }
    }

    /// When a run counts as ready: `supervisor.ready`, or for manifests that do not say,
    /// `probes` when there are checks and `exec` when there are none.
    pub fn ready(&self) -> Ready {
        self.supervisor.ready.unwrap_or(if self.checks.is_empty() {
            Ready::Exec
        } else {
            Ready::Probes
        })
    }

    /// How long a start may take to become ready: `supervisor.ready_timeout`, else
    /// [`READY_TIMEOUT`].
    pub fn ready_timeout(&self) -> Duration {
        self.supervisor.ready_timeout.unwrap_or(READY_TIMEOUT)
    }

    /// The YAML text written into the package.
    pub fn to_yaml(&self) -> String {
        let body = serde_saphyr::to_string(self).expect("a manifest always serializes");
        format!(
            "# keepup agent manifest for {} {} (generated by `keepup pack`; do not edit)\n{body}",
            self.name, self.version
        )
    }

    /// Parse manifest text; `path` names the file in errors.
    pub fn parse(path: &str, text: &str) -> Result<Manifest, ManifestError> {
        // Read the format first so a newer manifest gets "upgrade the agent", not a parse error.
        #[derive(Deserialize)]
        struct Format {
            format: u32,
        }
        if let Ok(f) = serde_saphyr::from_str::<Format>(text) {
            if f.format > MANIFEST_FORMAT {
                return Err(ManifestError::TooNew {
                    path: path.into(),
                    found: f.format,
                });
            }
        }
        // serde_path_to_error names the field being read when parsing failed.
        let mut field = String::new();
        let parsed = serde_saphyr::with_deserializer_from_str(text, |de| {
            serde_path_to_error::deserialize(de).map_err(|e| {
                field = e.path().to_string();
                e.into_inner()
            })
        });
        let m: Manifest = parsed.map_err(|e| {
            let message = e.without_snippet().to_string();
            ManifestError::Parse {
                path: path.into(),
                message: match field.as_str() {
                    "" | "." => message,
                    f => format!("{f}: {message}"),
                },
            }
        })?;
        m.validate(path)?;
        Ok(m)
    }

    /// Parses the manifest file `path` (as [`Manifest::parse`]) and checks that its file name
    /// is `<name>.yaml`: one file per service, and the name in paths is the one in the file.
    pub fn parse_file(path: &std::path::Path, text: &str) -> Result<Manifest, ManifestError> {
        let shown = path.display().to_string();
        let m = Manifest::parse(&shown, text)?;
        let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
        if file != format!("{}.yaml", m.name) {
            return Err(ManifestError::Invalid {
                path: shown,
                field: "name",
                message: format!(
                    "the manifest of service {} must be named {}.yaml, not {file:?}",
                    m.name, m.name
                ),
            });
        }
        Ok(m)
    }

    /// Checks the values the agent uses in paths (`name`: logs, admin-down marks), in
    /// `systemctl` arguments (`supervisor.unit`), to find the role (`role`) and to spawn
    /// (`launch`), the way `keepup pack` validated them in the spec.
    pub fn validate(&self, path: &str) -> Result<(), ManifestError> {
        let invalid = |field: &'static str, message: String| ManifestError::Invalid {
            path: path.into(),
            field,
            message,
        };
        if !spec::is_package_name(&self.name) {
            return Err(invalid(
                "name",
                format!(
                    "{:?} is not a package name (2+ characters of a-z 0-9 + . -, starting with a \
                     letter or digit)",
                    self.name
                ),
            ));
        }
        if !spec::is_account_name(&self.role) {
            return Err(invalid(
                "role",
                format!(
                    "{:?} is not an account name (a-z 0-9 _ -, starting with a letter or _, at \
                     most 32)",
                    self.role
                ),
            ));
        }
        if !spec::is_clean_abs_path(&self.launch) {
            return Err(invalid(
                "launch",
                format!(
                    "{:?} is not a clean absolute path (no . or .. or empty components)",
                    self.launch
                ),
            ));
        }
        // The report server refuses reports with probe names that break this rule: a manifest
        // with one is refused here (and reported as such) instead of silencing the host.
        if let Some(c) = self.checks.iter().find(|c| !spec::is_check_name(&c.name)) {
            return Err(invalid(
                "checks.name",
                format!(
                    "{:?} is not a check name (1-128 printable ASCII characters without space, \
                     quotes, backslash or < >)",
                    c.name
                ),
            ));
        }
        self.validate_readiness(path)?;
        if let Some(unit) = &self.supervisor.unit {
            if !is_unit_name(unit) {
                return Err(invalid(
                    "supervisor.unit",
                    format!(
                        "{unit:?} is not a systemd service name (A-Z a-z 0-9 : _ . - \\ @, not \
                         starting with - or ., ending in .service)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Manifest {
    /// Checks `supervisor.ready`, `ready_timeout`, `watchdog` and `after` the way `keepup
    /// pack` validated them in the spec (see `docs/spec.md`, `supervisor`).
    fn validate_readiness(&self, path: &str) -> Result<(), ManifestError> {
        let invalid = |field: &'static str, message: String| ManifestError::Invalid {
            path: path.into(),
            field,
            message,
        };
        let s = &self.supervisor;
        for (field, d) in [
            ("supervisor.ready_timeout", s.ready_timeout),
            ("supervisor.watchdog", s.watchdog),
        ] {
            if d.is_some_and(|d| d.is_zero()) {
                return Err(invalid(
                    field,
                    "is zero; give a positive duration like \"30s\"".into(),
                ));
            }
        }
        if s.ready == Some(Ready::Probes) && self.checks.is_empty() {
            return Err(invalid(
                "supervisor.ready",
                "is probes, but there are no checks to pass; add a check or use `ready: exec`"
                    .into(),
            ));
        }
        if s.watchdog.is_some() && self.ready() != Ready::Notify {
            return Err(invalid(
                "supervisor.watchdog",
                format!(
                    "needs supervisor.ready: notify: only a notify service sends WATCHDOG=1 \
                     (ready is {})",
                    self.ready()
                ),
            ));
        }
        if matches!(s.kind, Supervised::Runit | Supervised::Supervisord) {
            let kind = s.kind.as_str();
            if self.ready() == Ready::Notify {
                return Err(invalid(
                    "supervisor.ready",
                    format!("is notify, but {kind} gives the daemon no notify socket"),
                ));
            }
            if !s.after.is_empty() {
                return Err(invalid(
                    "supervisor.after",
                    format!("{kind} starts its services in no order keepup can set"),
                ));
            }
        }
        for (i, a) in s.after.iter().enumerate() {
            if !spec::is_package_name(a) {
                return Err(invalid(
                    "supervisor.after",
                    format!(
                        "{a:?} is not a service name (2+ characters of a-z 0-9 + . -, starting \
                         with a letter or digit)"
                    ),
                ));
            }
            if *a == self.name {
                return Err(invalid(
                    "supervisor.after",
                    format!("names the service itself ({a}); a service cannot wait for itself"),
                ));
            }
            if s.after[..i].contains(a) {
                return Err(invalid(
                    "supervisor.after",
                    format!("names {a} twice; list each service once"),
                ));
            }
        }
        Ok(())
    }
}

/// Durations as `30s` / `5m` text.
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::spec::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::spec::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// Optional durations as `30s` / `5m` text (absent: `None`).
mod duration_text_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration_text::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => super::spec::parse_duration(&text)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip_as_text() {
        for d in [
            Duration::from_millis(1500),
            Duration::from_secs(30),
            Duration::from_secs(300),
        ] {
            assert_eq!(spec::parse_duration(&spec::format_duration(d)).unwrap(), d);
        }
        assert_eq!(spec::format_duration(Duration::from_secs(300)), "5m");
    }

    const GOOD: &str = "format: 1\nname: foo\nversion: 1.0.0-1\nrole: foo\nlaunch: /usr/sbin/run-foo\n\
                        supervisor:\n  kind: systemd\n  count: 10\n  within: 1m\n  stop_grace: 5s\n  \
                        unit: foo.service\n";

    /// GOOD with `field: value` replaced; fails loudly if the edit does not apply.
    fn with(field: &str, value: &str) -> String {
        let prefix = format!("{field}: ");
        let mut hit = false;
        let out = GOOD
            .lines()
            .map(|l| {
                if l.trim_start().starts_with(&prefix) {
                    hit = true;
                    let indent = &l[..l.len() - l.trim_start().len()];
                    format!("{indent}{prefix}{value}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        assert!(hit, "no {field} in the fixture");
        out
    }

    #[test]
    fn validates_values_that_reach_paths_and_systemctl() {
        Manifest::parse("foo.yaml", GOOD).unwrap();
        let cases = [
            ("name", "'../../etc/x'"),
            ("name", "'foo/bar'"),
            ("name", "'..'"),
            ("name", "'-foo'"),
            ("name", "Foo"),
            ("role", "'../root'"),
            ("role", "'foo bar'"),
            ("role", "''"),
            ("launch", "run-foo"),
            ("launch", "/usr/sbin/../../tmp/x"),
            ("launch", "'/usr//sbin/run-foo'"),
            ("unit", "'foo bar.service'"),
            ("unit", "'-foo.service'"),
            ("unit", "'--now.service'"),
            ("unit", "foo.socket"),
            ("unit", "'.service'"),
            ("unit", "\"foo\\n.service\""),
        ];
        for (field, value) in cases {
            let err = Manifest::parse("foo.yaml", &with(field, value)).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, ManifestError::Invalid { .. }) && msg.contains(field),
                "{field}: {value}: {msg}"
            );
        }
        for ok in ["foo@1.service", "foo-bar_2:x.service", "a\\x2db.service"] {
            assert!(is_unit_name(ok), "{ok}");
        }
    }

    #[test]
    fn the_file_name_is_the_service_name() {
        use std::path::Path;
        Manifest::parse_file(Path::new("/usr/lib/keepup/services/foo.yaml"), GOOD).unwrap();
        let err =
            Manifest::parse_file(Path::new("/usr/lib/keepup/services/bar.yaml"), GOOD).unwrap_err();
        assert!(err.to_string().contains("must be named foo.yaml"), "{err}");
        assert_eq!(err.path(), "/usr/lib/keepup/services/bar.yaml");
    }

    /// GOOD with `lines` added to the supervisor section.
    fn supervisor_with(lines: &str) -> String {
        let out = GOOD.replace(
            "  unit: foo.service\n",
            &format!("  unit: foo.service\n{lines}"),
        );
        assert_ne!(out, GOOD, "the fixture has no unit line");
        out
    }

    const CHECKS: &str =
        "checks:\n  - name: banner\n    probe:\n      exec:\n        argv: [/bin/true]\n    \
                          every: 10s\n    timeout: 2s\n    failures: 3\n    grace: 5s\n";

    #[test]
    fn older_manifests_resolve_readiness_from_their_checks() {
        let m = Manifest::parse("foo.yaml", GOOD).unwrap();
        assert_eq!(
            (
                m.supervisor.ready,
                m.supervisor.ready_timeout,
                m.supervisor.watchdog
            ),
            (None, None, None)
        );
        assert!(m.supervisor.after.is_empty());
        assert_eq!(m.ready(), Ready::Exec);
        assert_eq!(m.ready_timeout(), READY_TIMEOUT);
        assert_eq!(READY_TIMEOUT, Duration::from_secs(90));
        let m = Manifest::parse("foo.yaml", &format!("{GOOD}{CHECKS}")).unwrap();
        assert_eq!(m.ready(), Ready::Probes);
        // Nothing new is written when nothing is set: an older agent reads the same text.
        assert!(!m.to_yaml().contains("ready"), "{}", m.to_yaml());
        assert!(!m.to_yaml().contains("after"), "{}", m.to_yaml());
    }

    #[test]
    fn readiness_round_trips() {
        let text = supervisor_with(
            "  ready: notify\n  ready_timeout: 2m\n  watchdog: 1500ms\n  after: [db, cache]\n",
        );
        let m = Manifest::parse("foo.yaml", &text).unwrap();
        assert_eq!(m.ready(), Ready::Notify);
        assert_eq!(m.ready_timeout(), Duration::from_secs(120));
        assert_eq!(m.supervisor.watchdog, Some(Duration::from_millis(1500)));
        assert_eq!(m.supervisor.after, ["db", "cache"]);
        let yaml = m.to_yaml();
        assert!(yaml.contains("ready: notify"), "{yaml}");
        assert!(yaml.contains("watchdog: 1500ms"), "{yaml}");
        assert_eq!(Manifest::parse("foo.yaml", &yaml).unwrap(), m);
        for r in Ready::ALL {
            assert_eq!(Ready::parse(r.as_str()), Some(r));
            assert_eq!(r.to_string(), r.as_str());
        }
        assert_eq!(Ready::names(), "notify, probes, exec");
    }

    #[test]
    fn bad_readiness_values_are_refused_naming_the_field() {
        let cases = [
            ("  ready: probes\n", "supervisor.ready", "no checks"),
            (
                "  watchdog: 10s\n",
                "supervisor.watchdog",
                "only a notify service sends WATCHDOG=1",
            ),
            (
                "  ready: exec\n  watchdog: 10s\n",
                "supervisor.watchdog",
                "needs supervisor.ready: notify",
            ),
            ("  after: [foo]\n", "supervisor.after", "itself"),
            ("  after: [db, db]\n", "supervisor.after", "twice"),
            (
                "  after: ['../db']\n",
                "supervisor.after",
                "not a service name",
            ),
            ("  after: [Db]\n", "supervisor.after", "not a service name"),
        ];
        for (lines, field, why) in cases {
            let err = Manifest::parse("foo.yaml", &supervisor_with(lines)).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(&err, ManifestError::Invalid { field: f, .. } if *f == field)
                    && msg.contains(why),
                "{lines}: {msg}"
            );
        }
        // Values the parser refuses: still a refusal that says what is wrong.
        for (lines, why) in [
            (
                "  ready: soon\n",
                "supervisor.ready: unknown variant `soon`, expected one of notify, probes, exec",
            ),
            (
                "  ready_timeout: 0s\n",
                "supervisor.ready_timeout: \"0s\" is zero",
            ),
            (
                "  watchdog: 0s\n  ready: notify\n",
                "supervisor.watchdog: \"0s\" is zero",
            ),
            (
                "  ready_timeout: later\n",
                "supervisor.ready_timeout: \"later\" is not a duration",
            ),
            ("  after: db\n", "supervisor.after: "),
        ] {
            let err = Manifest::parse("foo.yaml", &supervisor_with(lines)).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(why), "{lines}: {msg}");
        }
        // A manifest built in code is validated the same way.
        let mut m = Manifest::parse("foo.yaml", GOOD).unwrap();
        m.supervisor.ready = Some(Ready::Notify);
        m.supervisor.watchdog = Some(Duration::ZERO);
        let err = m.validate("foo.yaml").unwrap_err();
        assert!(
            err.to_string().contains("supervisor.watchdog: is zero"),
            "{err}"
        );
    }

    #[test]
    fn newer_format_asks_for_an_agent_upgrade() {
        let err = Manifest::parse("x.yaml", "format: 9\nname: x\n").unwrap_err();
        assert!(err.to_string().contains("upgrade keepup-agent"), "{err}");
    }
}
