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
    /// `agent` or `systemd`.
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
}

/// Who runs the launch script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Supervised {
    /// keepup-agent spawns it.
    Agent,
    /// systemd runs it; the agent re-kicks the unit.
    Systemd,
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
                },
                count: spec.supervisor.count,
                within: spec.supervisor.within,
                stop_grace: spec.supervisor.stop_grace,
                unit: (spec.supervisor.kind == SupervisorKind::Systemd)
                    .then(|| format!("{}.service", spec.name)),
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
        let m: Manifest = serde_saphyr::from_str(text).map_err(|e| ManifestError::Parse {
            path: path.into(),
            message: e.without_snippet().to_string(),
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

    #[test]
    fn newer_format_asks_for_an_agent_upgrade() {
        let err = Manifest::parse("x.yaml", "format: 9\nname: x\n").unwrap_err();
        assert!(err.to_string().contains("upgrade keepup-agent"), "{err}");
    }
}
