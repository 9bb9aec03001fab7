//! The agent's configuration file (YAML, every key optional): where manifests, admin-down
//! marks, logs and the control socket live, the agent's timers, and the updater and reporter
//! (both off unless `repo` / `report` is set). With no file at all the defaults below apply,
//! so `keepup-agent run` works on a fresh host.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use keepup_packager::spec::parse_duration;
use serde::Deserialize;

use crate::policy::Respawn;
use crate::update::schedule::Schedule;
use keepup_deploy::wire::Format;

/// Where the agent looks for its configuration when `--config` is not given (optional).
pub const DEFAULT_CONFIG: &str = "/etc/keepup/agent.yaml";

/// The agent's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Directory of service manifests (`<name>.yaml`), installed by packages.
    pub manifest_dir: PathBuf,
    /// Agent state: admin-down marks are plain files `down/<service>`.
    pub state_dir: PathBuf,
    /// Per-service logs `<service>.log`.
    pub log_dir: PathBuf,
    /// Rotate a service log when it would grow past this many bytes.
    pub log_max_bytes: u64,
    /// Rotated logs kept per service (`<service>.log.1` ... `.N`).
    pub log_keep: u32,
    /// The control socket. Its directory is the agent's: created or fixed mode 0750
    /// root:`status_group` (0700 root:root without one), so it must be a directory of its own.
    pub socket: PathBuf,
    /// The group whose members may run `keepup-agent status` (read-only); `None`: root only.
    pub status_group: Option<String>,
    /// How often given-up services are started again (the talk's cron line).
    pub rekick_every: Duration,
    /// How often the manifest directory is looked at when it cannot be watched with inotify
    /// (and how soon a rescan follows a change that could not be handed on at once).
    pub scan_every: Duration,
    /// Respawn timing: a run shorter than `fast_crash` is a fast crash; the respawn delay
    /// after fast crashes grows up to `max_backoff`.
    pub respawn: Respawn,
    /// This host's name in the fleet policy and in reports (`None`: the hostname).
    pub host: Option<String>,
    /// The updater; `None` (no `repo` key) turns it off.
    pub updater: Option<UpdaterConfig>,
    /// The reporter; `None` (no `report` key) turns it off.
    pub report: Option<ReportConfig>,
    /// PEM bundle of the CAs that `https://` repo and report URLs are checked against
    /// (`None`: the system's CA bundle).
    pub ca_file: Option<PathBuf>,
    /// Allow a plain `http://` report URL to a host other than loopback (the host token then
    /// travels in clear text).
    pub allow_plain_http: bool,
}

/// The updater's settings (the `repo` key and its companions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdaterConfig {
    /// Repository base URL, ending in `/`.
    pub repo: String,
    /// The pinned repository key (armored OpenPGP public key file).
    pub trusted_key: PathBuf,
    /// Crontab line (5 or 6 fields), already checked.
    pub schedule: String,
    /// Window of the per-host offset added to each scheduled time.
    pub stagger: Duration,
    /// Bound of every package-manager run (and of each download).
    pub package_timeout: Duration,
    /// Package format (`None`: deb if `/usr/bin/dpkg` exists, else rpm).
    pub package_format: Option<Format>,
    /// Architecture as the format spells it (`None`: asked from dpkg/rpm).
    pub arch: Option<String>,
    /// Where downloaded packages are kept.
    pub cache_dir: PathBuf,
    /// Extra wait beyond the probes' longest `grace` when confirming a start.
    pub start_timeout: Duration,
    /// rpm's database directory when it is not rpm's default (`rpm --dbpath`).
    pub rpm_dbpath: Option<PathBuf>,
    /// First contact: the lowest serials this host accepts even with no `serials.json`
    /// (`min_serials: {fleet: N, tracks: {stable: M}}`; issue 11).
    pub min_serials: crate::update::serials::Serials,
}

/// The reporter's settings (the `report` key and its companions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportConfig {
    /// Server base URL (`/api/v1/report` is appended), without a trailing `/`.
    pub url: String,
    /// File holding this host's bearer token.
    pub token_file: PathBuf,
    /// Interval between reports (one is also sent after each update pass).
    pub every: Duration,
}

/// Every key the file may have, for error messages.
const KEYS: &str = "manifest_dir, state_dir, log_dir, log_max_bytes, log_keep, socket, \
                    status_group, rekick_every, scan_every, fast_crash, max_backoff, host, repo, trusted_key, \
                    schedule, stagger, package_timeout, package_format, arch, cache_dir, \
                    start_timeout, rpm_dbpath, min_serials, report, report_token_file, report_every, \
                    ca_file, allow_plain_http";

impl Default for Config {
    fn default() -> Config {
        Config {
            manifest_dir: PathBuf::from(keepup_packager::manifest::MANIFEST_DIR),
            state_dir: PathBuf::from("/var/lib/keepup-agent"),
            log_dir: PathBuf::from("/var/log/keepup"),
            log_max_bytes: 10 * 1024 * 1024,
            log_keep: 3,
            socket: PathBuf::from("/run/keepup/agent.sock"),
            status_group: None,
            rekick_every: Duration::from_secs(300),
            scan_every: Duration::from_secs(1),
            respawn: Respawn::default(),
            host: None,
            updater: None,
            report: None,
            ca_file: None,
            allow_plain_http: false,
        }
    }
}

/// The file as written; absent keys keep their defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    manifest_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    log_dir: Option<PathBuf>,
    log_max_bytes: Option<u64>,
    log_keep: Option<u32>,
    socket: Option<PathBuf>,
    status_group: Option<String>,
    rekick_every: Option<String>,
    scan_every: Option<String>,
    fast_crash: Option<String>,
    max_backoff: Option<String>,
    host: Option<String>,
    repo: Option<String>,
    trusted_key: Option<PathBuf>,
    schedule: Option<String>,
    stagger: Option<String>,
    package_timeout: Option<String>,
    package_format: Option<String>,
    arch: Option<String>,
    cache_dir: Option<PathBuf>,
    start_timeout: Option<String>,
    rpm_dbpath: Option<PathBuf>,
    min_serials: Option<crate::update::serials::Serials>,
    report: Option<String>,
    report_token_file: Option<PathBuf>,
    report_every: Option<String>,
    ca_file: Option<PathBuf>,
    allow_plain_http: Option<bool>,
}

/// A base URL: `http[s]://host[:port][/path]`, returned with a trailing `/`.
fn base_url(path: &Path, key: &str, url: &str) -> Result<String> {
    let url = url.trim();
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        bail!(
            "{}: {key}: {url:?} is not an http:// or https:// URL",
            path.display()
        );
    };
    if rest.is_empty() || rest.starts_with('/') || rest.contains(char::is_whitespace) {
        bail!("{}: {key}: {url:?} has no host", path.display());
    }
    Ok(if url.ends_with('/') {
        url.to_string()
    } else {
        format!("{url}/")
    })
}

/// Is `url` plain `http://` to a host other than this one (`localhost`, `127.0.0.0/8`,
/// `[::1]`)? Such a URL would carry the host token in clear text over a network.
pub fn plain_http_off_host(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !loopback
}

impl Config {
    /// Parses configuration text; `path` names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config> {
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_saphyr::from_str(text)
                .map_err(|e| anyhow::anyhow!("{}: {}\n(known keys: {KEYS})", path.display(), e))?
        };
        let d = Config::default();
        let dur = |key: &str, v: Option<String>, default: Duration| -> Result<Duration> {
            match v {
                None => Ok(default),
                Some(s) => parse_duration(&s)
                    .map_err(|e| anyhow::anyhow!("{}: {key}: {e}", path.display())),
            }
        };
        let state_dir = raw.state_dir.unwrap_or(d.state_dir);
        if let Some(h) = &raw.host {
            if h.is_empty()
                || h.len() > 253
                || !h
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
            {
                bail!(
                    "{}: host: {h:?} is not a host name (letters, digits, - . _)",
                    path.display()
                );
            }
        }
        if let Some(g) = &raw.status_group {
            let mut chars = g.chars();
            let ok = matches!(chars.next(), Some('a'..='z' | '_'))
                && g.len() <= 32
                && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'));
            if !ok || g == "root" {
                bail!(
                    "{}: status_group: {g:?} is not a group name (a-z 0-9 _ -, starting with a \
                     letter or _; not root): name the group whose members may run \
                     `keepup-agent status`, or leave the key out (root only)",
                    path.display()
                );
            }
        }
        let updater_keys = [
            ("trusted_key", raw.trusted_key.is_some()),
            ("schedule", raw.schedule.is_some()),
            ("stagger", raw.stagger.is_some()),
            ("package_timeout", raw.package_timeout.is_some()),
            ("package_format", raw.package_format.is_some()),
            ("arch", raw.arch.is_some()),
            ("cache_dir", raw.cache_dir.is_some()),
            ("start_timeout", raw.start_timeout.is_some()),
            ("rpm_dbpath", raw.rpm_dbpath.is_some()),
            ("min_serials", raw.min_serials.is_some()),
        ];
        let updater = match &raw.repo {
            None => {
                if let Some((key, _)) = updater_keys.iter().find(|(_, set)| *set) {
                    bail!(
                        "{}: {key} is set but repo is not: the updater is off without a \
                         repository URL (add `repo: http://REPO:8080/`)",
                        path.display()
                    );
                }
                None
            }
            Some(url) => {
                let repo = base_url(path, "repo", url)?;
                let trusted_key = raw.trusted_key.clone().ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: trusted_key: required when repo is set (the repository's armored \
                         public key, e.g. /etc/keepup/repository.asc)",
                        path.display()
                    )
                })?;
                let schedule = raw.schedule.clone().unwrap_or_else(|| "*/5 * * * *".into());
                Schedule::parse(&schedule)
                    .map_err(|e| anyhow::anyhow!("{}: schedule: {e}", path.display()))?;
                let package_format = match raw.package_format.as_deref() {
                    None => None,
                    Some("deb") => Some(Format::Deb),
                    Some("rpm") => Some(Format::Rpm),
                    Some(other) => bail!(
                        "{}: package_format: {other:?}: expected deb or rpm",
                        path.display()
                    ),
                };
                if let Some(a) = &raw.arch {
                    if a.is_empty() || !a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                        bail!(
                            "{}: arch: {a:?} is not an architecture name",
                            path.display()
                        );
                    }
                }
                Some(UpdaterConfig {
                    repo,
                    trusted_key,
                    schedule,
                    stagger: dur("stagger", raw.stagger.clone(), Duration::from_secs(300))?,
                    package_timeout: dur(
                        "package_timeout",
                        raw.package_timeout.clone(),
                        Duration::from_secs(600),
                    )?,
                    package_format,
                    arch: raw.arch.clone(),
                    cache_dir: raw
                        .cache_dir
                        .clone()
                        .unwrap_or_else(|| state_dir.join("cache")),
                    start_timeout: dur(
                        "start_timeout",
                        raw.start_timeout.clone(),
                        Duration::from_secs(30),
                    )?,
                    rpm_dbpath: raw.rpm_dbpath.clone(),
                    min_serials: raw.min_serials.clone().unwrap_or_default(),
                })
            }
        };
        if let Some(u) = &updater {
            if u.package_timeout.is_zero() {
                bail!("{}: package_timeout: must be more than 0", path.display());
            }
        }
        let report = match &raw.report {
            None => {
                for (key, set) in [
                    ("report_token_file", raw.report_token_file.is_some()),
                    ("report_every", raw.report_every.is_some()),
                ] {
                    if set {
                        bail!(
                            "{}: {key} is set but report is not: reporting is off without a \
                             server URL (add `report: http://SERVER:8080`)",
                            path.display()
                        );
                    }
                }
                None
            }
            Some(url) => {
                let every = dur(
                    "report_every",
                    raw.report_every.clone(),
                    Duration::from_secs(120),
                )?;
                if every.is_zero() {
                    bail!("{}: report_every: must be more than 0", path.display());
                }
                let url = base_url(path, "report", url)?
                    .trim_end_matches('/')
                    .to_string();
                if plain_http_off_host(&url) && raw.allow_plain_http != Some(true) {
                    bail!(
                        "{}: report: {url:?} is plain http to another host: this host's report \
                         token would travel in clear text, readable by anyone on the network \
                         path. Serve reports over TLS (`keepup serve --tls-cert ... --tls-key \
                         ...`) and use an https:// URL (with ca_file for a private CA), or set \
                         `allow_plain_http: true` to accept the risk (docs/tls.md)",
                        path.display()
                    );
                }
                Some(ReportConfig {
                    url,
                    token_file: raw
                        .report_token_file
                        .clone()
                        .unwrap_or_else(|| PathBuf::from("/etc/keepup/token")),
                    every,
                })
            }
        };
        let cfg = Config {
            manifest_dir: raw.manifest_dir.unwrap_or(d.manifest_dir),
            state_dir,
            log_dir: raw.log_dir.unwrap_or(d.log_dir),
            log_max_bytes: raw.log_max_bytes.unwrap_or(d.log_max_bytes),
            log_keep: raw.log_keep.unwrap_or(d.log_keep),
            socket: raw.socket.unwrap_or(d.socket),
            status_group: raw.status_group,
            rekick_every: dur("rekick_every", raw.rekick_every, d.rekick_every)?,
            scan_every: dur("scan_every", raw.scan_every, d.scan_every)?,
            respawn: Respawn {
                fast_crash: dur("fast_crash", raw.fast_crash, d.respawn.fast_crash)?,
                max_delay: dur("max_backoff", raw.max_backoff, d.respawn.max_delay)?,
            },
            host: raw.host,
            updater,
            report,
            ca_file: raw.ca_file,
            allow_plain_http: raw.allow_plain_http.unwrap_or(false),
        };
        let mut paths = vec![
            ("manifest_dir", &cfg.manifest_dir),
            ("state_dir", &cfg.state_dir),
            ("log_dir", &cfg.log_dir),
            ("socket", &cfg.socket),
        ];
        if let Some(u) = &cfg.updater {
            paths.push(("trusted_key", &u.trusted_key));
            paths.push(("cache_dir", &u.cache_dir));
            if let Some(db) = &u.rpm_dbpath {
                paths.push(("rpm_dbpath", db));
            }
        }
        if let Some(r) = &cfg.report {
            paths.push(("report_token_file", &r.token_file));
        }
        if let Some(ca) = &cfg.ca_file {
            paths.push(("ca_file", ca));
        }
        for (key, p) in paths {
            if !p.is_absolute() {
                bail!(
                    "{}: {key}: {} is not an absolute path",
                    path.display(),
                    p.display()
                );
            }
        }
        Ok(cfg)
    }

    /// Loads `path` if given (it must exist), else [`DEFAULT_CONFIG`] if it exists, else the
    /// defaults.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let (path, required) = match path {
            Some(p) => (p, true),
            None => (Path::new(DEFAULT_CONFIG), false),
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(path, &text),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                Ok(Config::default())
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The lock file that makes a second agent refuse to start: in the state directory, so it
    /// does not depend on which socket an agent answers on.
    pub fn lock_path(&self) -> PathBuf {
        self.state_dir.join("agent.lock")
    }

    /// Where `ready: notify` services' sockets live: beside the control socket's directory,
    /// `<dir>-notify` (`/run/keepup-notify` by default), mode 0711 so roles can reach their
    /// own socket but not the control socket.
    pub fn notify_dir(&self) -> PathBuf {
        let dir = self.socket.parent().unwrap_or(Path::new("/run/keepup"));
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "keepup".into());
        dir.with_file_name(format!("{name}-notify"))
    }

    /// The directory of admin-down marks.
    pub fn down_dir(&self) -> PathBuf {
        self.state_dir.join("down")
    }

    /// This host's name: `host` from the file, else the kernel's hostname.
    pub fn host_name(&self) -> String {
        if let Some(h) = &self.host {
            return h.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "localhost".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_means_defaults() {
        let c = Config::parse(Path::new("a.yaml"), "").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(
            c.lock_path(),
            PathBuf::from("/var/lib/keepup-agent/agent.lock")
        );
        assert_eq!(c.down_dir(), PathBuf::from("/var/lib/keepup-agent/down"));
    }

    #[test]
    fn reads_keys_and_durations() {
        let c = Config::parse(
            Path::new("a.yaml"),
            "manifest_dir: /tmp/m\nrekick_every: 10s\nscan_every: 500ms\nlog_keep: 5\n",
        )
        .unwrap();
        assert_eq!(c.manifest_dir, PathBuf::from("/tmp/m"));
        assert_eq!(c.rekick_every, Duration::from_secs(10));
        assert_eq!(c.scan_every, Duration::from_millis(500));
        assert_eq!(c.log_keep, 5);
        assert_eq!(c.status_group, None);
        let c = Config::parse(Path::new("a.yaml"), "status_group: keepupview\n").unwrap();
        assert_eq!(c.status_group.as_deref(), Some("keepupview"));
        for bad in ["'view ers'", "'../x'", "root", "''"] {
            let e =
                Config::parse(Path::new("a.yaml"), &format!("status_group: {bad}\n")).unwrap_err();
            assert!(format!("{e:#}").contains("status_group"), "{bad}: {e:#}");
        }
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let e = Config::parse(Path::new("/etc/keepup/agent.yaml"), "rekick: 5m\n").unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("/etc/keepup/agent.yaml"), "{msg}");
        assert!(msg.contains("known keys"), "{msg}");
        let e = Config::parse(Path::new("a.yaml"), "rekick_every: soon\n").unwrap_err();
        assert!(format!("{e:#}").contains("rekick_every"), "{e:#}");
        let e = Config::parse(Path::new("a.yaml"), "socket: run/x.sock\n").unwrap_err();
        assert!(format!("{e:#}").contains("absolute"), "{e:#}");
    }

    #[test]
    fn updater_and_report_defaults() {
        let c = Config::parse(
            Path::new("a.yaml"),
            "repo: http://repo:8080\ntrusted_key: /etc/keepup/repository.asc\n\
             report: http://server:8080/\nallow_plain_http: true\n",
        )
        .unwrap();
        let u = c.updater.unwrap();
        assert_eq!(u.repo, "http://repo:8080/");
        assert_eq!(u.schedule, "*/5 * * * *");
        assert_eq!(u.stagger, Duration::from_secs(300));
        assert_eq!(u.package_timeout, Duration::from_secs(600));
        assert_eq!(u.start_timeout, Duration::from_secs(30));
        assert_eq!(u.package_format, None);
        assert_eq!(u.cache_dir, PathBuf::from("/var/lib/keepup-agent/cache"));
        let r = c.report.unwrap();
        assert_eq!(r.url, "http://server:8080");
        assert_eq!(r.token_file, PathBuf::from("/etc/keepup/token"));
        assert_eq!(r.every, Duration::from_secs(120));
        assert!(Config::default().updater.is_none() && Config::default().report.is_none());
    }

    #[test]
    fn updater_keys() {
        let c = Config::parse(
            Path::new("a.yaml"),
            "host: web1\nstate_dir: /s\nrepo: http://repo/r/\ntrusted_key: /k.asc\n\
             schedule: '*/10 * * * * *'\nstagger: 3s\npackage_timeout: 20s\n\
             package_format: rpm\narch: x86_64\nstart_timeout: 5s\nrpm_dbpath: /r\n\
             min_serials: {fleet: 3, tracks: {stable: 9}}\n\
             report: http://s:1\nreport_token_file: /t\nreport_every: 10s\n\
             allow_plain_http: true\n",
        )
        .unwrap();
        assert_eq!(c.host_name(), "web1");
        let u = c.updater.unwrap();
        assert_eq!(u.repo, "http://repo/r/");
        assert_eq!(u.package_format, Some(Format::Rpm));
        assert_eq!(u.arch.as_deref(), Some("x86_64"));
        assert_eq!(u.cache_dir, PathBuf::from("/s/cache"));
        assert_eq!(u.stagger, Duration::from_secs(3));
        assert_eq!(u.rpm_dbpath, Some(PathBuf::from("/r")));
        assert_eq!(
            (u.min_serials.fleet, u.min_serials.tracks["stable"]),
            (3, 9)
        );
        assert_eq!(c.report.unwrap().every, Duration::from_secs(10));
    }

    #[test]
    fn updater_errors_name_the_key() {
        let err = |t: &str| format!("{:#}", Config::parse(Path::new("a.yaml"), t).unwrap_err());
        let e = err("repo: http://repo/\n");
        assert!(e.contains("trusted_key: required"), "{e}");
        let e = err("repo: ftp://repo/\ntrusted_key: /k\n");
        assert!(
            e.contains("repo:") && e.contains("not an http:// or https:// URL"),
            "{e}"
        );
        let e = err("ca_file: ca.pem\n");
        assert!(e.contains("ca_file") && e.contains("absolute"), "{e}");
        let e = err("repo: http://r/\ntrusted_key: /k\nschedule: '0 25 * * *'\n");
        assert!(e.contains("schedule:") && e.contains("(hour)"), "{e}");
        let e = err("repo: http://r/\ntrusted_key: /k\npackage_format: pacman\n");
        assert!(
            e.contains("package_format") && e.contains("deb or rpm"),
            "{e}"
        );
        let e = err("repo: http://r/\ntrusted_key: k.asc\n");
        assert!(e.contains("trusted_key") && e.contains("absolute"), "{e}");
        let e = err("stagger: 5m\n");
        assert!(e.contains("stagger is set but repo is not"), "{e}");
        let e = err("report_every: 5m\n");
        assert!(e.contains("report_every is set but report is not"), "{e}");
        let e = err("report: http://s\nreport_every: often\n");
        assert!(e.contains("report_every"), "{e}");
        let e = err("host: 'web 1'\n");
        assert!(e.contains("host:"), "{e}");
        let e = err("repo_url: x\n");
        assert!(e.contains("known keys") && e.contains("trusted_key"), "{e}");
    }

    #[test]
    fn https_urls_and_plain_http_reports() {
        let c = Config::parse(
            Path::new("a.yaml"),
            "repo: https://repo.example/r\ntrusted_key: /k.asc\n\
             report: https://state.example:8443/\nca_file: /etc/keepup/ca.pem\n",
        )
        .unwrap();
        assert_eq!(c.updater.unwrap().repo, "https://repo.example/r/");
        assert_eq!(c.report.unwrap().url, "https://state.example:8443");
        assert_eq!(c.ca_file, Some(PathBuf::from("/etc/keepup/ca.pem")));
        // Plain http to another host: refused, saying why and what to do.
        let e = Config::parse(Path::new("a.yaml"), "report: http://10.0.0.5:8080\n").unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("a.yaml: report:") && e.contains("clear text"),
            "{e}"
        );
        assert!(
            e.contains("https://") && e.contains("allow_plain_http: true"),
            "{e}"
        );
        // ... unless allowed, and always on loopback; a plain http repo is fine (signed).
        let c = Config::parse(
            Path::new("a.yaml"),
            "report: http://10.0.0.5:8080\nallow_plain_http: true\n",
        )
        .unwrap();
        assert!(c.allow_plain_http && c.report.is_some());
        for ok in [
            "http://127.0.0.1:9000",
            "http://localhost",
            "http://[::1]:80/",
            "https://10.0.0.5",
        ] {
            assert!(!plain_http_off_host(ok), "{ok}");
            Config::parse(Path::new("a.yaml"), &format!("report: {ok}\n")).unwrap();
        }
        for off in [
            "http://127.0.0.1.example",
            "http://[::2]:1",
            "http://repo:8080",
        ] {
            assert!(plain_http_off_host(off), "{off}");
        }
        Config::parse(
            Path::new("a.yaml"),
            "repo: http://10.0.0.5/\ntrusted_key: /k.asc\n",
        )
        .unwrap();
    }
}
