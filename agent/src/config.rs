//! The agent's configuration file (YAML, every key optional): where manifests, admin-down
//! marks, logs and the control socket live, and the agent's timers. With no file at all the
//! defaults below apply, so `keepup-agent run` works on a fresh host.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use keepup_packager::spec::parse_duration;
use serde::Deserialize;

use crate::policy::Respawn;

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
    /// The control socket; its lock file is the same path plus `.lock`.
    pub socket: PathBuf,
    /// How often given-up services are started again (the talk's cron line).
    pub rekick_every: Duration,
    /// How often the manifest directory is looked at when it cannot be watched with inotify
    /// (and how soon a rescan follows a change that could not be handed on at once).
    pub scan_every: Duration,
    /// Respawn timing: a run shorter than `fast_crash` is a fast crash; the respawn delay
    /// after fast crashes grows up to `max_backoff`.
    pub respawn: Respawn,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            manifest_dir: PathBuf::from(keepup_packager::manifest::MANIFEST_DIR),
            state_dir: PathBuf::from("/var/lib/keepup-agent"),
            log_dir: PathBuf::from("/var/log/keepup"),
            log_max_bytes: 10 * 1024 * 1024,
            log_keep: 3,
            socket: PathBuf::from("/run/keepup/agent.sock"),
            rekick_every: Duration::from_secs(300),
            scan_every: Duration::from_secs(1),
            respawn: Respawn::default(),
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
    rekick_every: Option<String>,
    scan_every: Option<String>,
    fast_crash: Option<String>,
    max_backoff: Option<String>,
}

impl Config {
    /// Parses configuration text; `path` names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config> {
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {}\n(known keys: manifest_dir, state_dir, log_dir, log_max_bytes, \
                     log_keep, socket, rekick_every, scan_every, fast_crash, max_backoff)",
                    path.display(),
                    e
                )
            })?
        };
        let d = Config::default();
        let dur = |key: &str, v: Option<String>, default: Duration| -> Result<Duration> {
            match v {
                None => Ok(default),
                Some(s) => parse_duration(&s)
                    .map_err(|e| anyhow::anyhow!("{}: {key}: {e}", path.display())),
            }
        };
        let cfg = Config {
            manifest_dir: raw.manifest_dir.unwrap_or(d.manifest_dir),
            state_dir: raw.state_dir.unwrap_or(d.state_dir),
            log_dir: raw.log_dir.unwrap_or(d.log_dir),
            log_max_bytes: raw.log_max_bytes.unwrap_or(d.log_max_bytes),
            log_keep: raw.log_keep.unwrap_or(d.log_keep),
            socket: raw.socket.unwrap_or(d.socket),
            rekick_every: dur("rekick_every", raw.rekick_every, d.rekick_every)?,
            scan_every: dur("scan_every", raw.scan_every, d.scan_every)?,
            respawn: Respawn {
                fast_crash: dur("fast_crash", raw.fast_crash, d.respawn.fast_crash)?,
                max_delay: dur("max_backoff", raw.max_backoff, d.respawn.max_delay)?,
            },
        };
        for (key, p) in [
            ("manifest_dir", &cfg.manifest_dir),
            ("state_dir", &cfg.state_dir),
            ("log_dir", &cfg.log_dir),
            ("socket", &cfg.socket),
        ] {
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

    /// The directory of admin-down marks.
    pub fn down_dir(&self) -> PathBuf {
        self.state_dir.join("down")
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
}
