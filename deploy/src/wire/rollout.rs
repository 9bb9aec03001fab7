//! Health-gated rollouts: a promotion that opens in waves. The track's index (signed by the
//! repository key) carries each [`Rollout`]: the previous and the new version, the wave rules,
//! and for `--on-failure rollback` a standby rollback package. How far it went, its
//! [`Progress`], is a separate small document per track, [`RolloutState`], signed by the
//! **rollout key** the index names: the server that gates rollouts holds only that key, so a
//! stolen one can open, pause or halt waves of content the repository key signed, and never
//! add or change a package. [`target`] is what a host runs of a package under a rollout.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::fleet::glob_match;
use super::index::PoolEntry;

/// `tracks/<track>/rollout.json.asc`: the track's rollout progress, inline-signed by the
/// rollout key.
pub fn state_path(track: &str) -> String {
    format!("tracks/{track}/rollout.json.asc")
}

/// One wave: hosts by name, or a cumulative share of the hosts by a stable hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wave {
    /// Hosts whose name matches a glob (`canary-*`).
    Hosts(String),
    /// The first `n` percent of hosts by [`share`] (cumulative: `25%` includes `5%`).
    Percent(u8),
}

impl fmt::Display for Wave {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wave::Hosts(g) => f.write_str(g),
            Wave::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for Wave {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Wave {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Wave, D::Error> {
        let s = String::deserialize(d)?;
        Wave::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Wave {
    /// `canary-*` or `25%`.
    pub fn parse(s: &str) -> Result<Wave, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            return match p.parse::<u8>() {
                Ok(p @ 1..=100) => Ok(Wave::Percent(p)),
                _ => Err(format!("{s:?}: a share of hosts is 1% to 100%")),
            };
        }
        if s.is_empty()
            || !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._*?".contains(c))
        {
            return Err(format!(
                "{s:?} is neither a host glob (letters, digits, - . _ and * ?) nor a share of \
                 hosts like 25%"
            ));
        }
        Ok(Wave::Hosts(s.to_string()))
    }

    /// Does this wave include `host` (whose [`share`] for the package is `share`)?
    fn includes(&self, host: &str, share: u64) -> bool {
        match self {
            Wave::Hosts(g) => glob_match(g, host),
            Wave::Percent(p) => share < u64::from(*p) * SHARE_SCALE / 100,
        }
    }
}

/// Parse a wave list, `canary-*,5%,25%,100%`: globs anywhere, shares increasing.
pub fn parse_waves(spec: &str) -> Result<Vec<Wave>, String> {
    let waves = spec
        .split(',')
        .map(Wave::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("--waves {spec:?}: {e}"))?;
    let shares: Vec<u8> = waves
        .iter()
        .filter_map(|w| match w {
            Wave::Percent(p) => Some(*p),
            Wave::Hosts(_) => None,
        })
        .collect();
    if shares.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!(
            "--waves {spec:?}: shares are cumulative, so each must be larger than the one \
             before (e.g. 5%,25%,100%)"
        ));
    }
    if waves.len() > MAX_WAVES {
        return Err(format!("--waves {spec:?}: at most {MAX_WAVES} waves"));
    }
    Ok(waves)
}

/// Waves a rollout may have at most.
pub const MAX_WAVES: usize = 20;

/// [`share`] is in `[0, SHARE_SCALE)`: a millionth of the fleet.
pub const SHARE_SCALE: u64 = 1_000_000;

/// Where a host falls among all hosts for one package, in millionths: the first 8 bytes of
/// SHA-256 of `keepup-wave`, the package name and the host name, as a fraction. Salted by
/// the package, so the 5% that take a new version first differ from service to service, and
/// unlike the stagger's hash (of the host name alone), so a wave is spread over the whole
/// stagger window instead of being its first minutes.
pub fn share(package: &str, host: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(b"keepup-wave\0");
    h.update(package.as_bytes());
    h.update(b"\0");
    h.update(host.as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    ((u64::from_be_bytes(first) as u128 * SHARE_SCALE as u128) >> 64) as u64
}

/// The wave (1-based) that first includes `host`, or None when none does: such a host gets
/// the new version when the rollout is done.
pub fn wave_of(waves: &[Wave], package: &str, host: &str) -> Option<u32> {
    let s = share(package, host);
    waves
        .iter()
        .position(|w| w.includes(host, s))
        .map(|i| i as u32 + 1)
}

/// How many failed hosts halt a rollout: more than this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxFailed {
    /// More than `n` failed hosts halts.
    Count(u32),
    /// More than this percentage of the open waves' hosts halts.
    Percent(u8),
}

impl MaxFailed {
    /// `0`, `2` or `10%`.
    pub fn parse(s: &str) -> Result<MaxFailed, String> {
        let s = s.trim();
        let bad = || format!("--max-failed {s:?}: a number of hosts (0, 2) or a share (10%)");
        match s.strip_suffix('%') {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 100)
                .map(MaxFailed::Percent)
                .ok_or_else(bad),
            None => s.parse().map(MaxFailed::Count).map_err(|_| bad()),
        }
    }

    /// Do `failed` failed hosts out of `hosts` in the open waves exceed the limit?
    pub fn exceeded(self, failed: usize, hosts: usize) -> bool {
        match self {
            MaxFailed::Count(n) => failed > n as usize,
            MaxFailed::Percent(p) => failed * 100 > hosts * p as usize,
        }
    }
}

impl fmt::Display for MaxFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaxFailed::Count(n) => write!(f, "{n}"),
            MaxFailed::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for MaxFailed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MaxFailed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MaxFailed, D::Error> {
        let s = String::deserialize(d)?;
        MaxFailed::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What a halt also does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Stop opening waves; hosts keep what they run.
    #[default]
    Halt,
    /// Stop, and move the hosts that took the new version to the standby rollback package
    /// (the previous contents under a newer version).
    Rollback,
}

impl OnFailure {
    /// `halt` or `rollback`.
    pub fn parse(s: &str) -> Result<OnFailure, String> {
        match s {
            "halt" => Ok(OnFailure::Halt),
            "rollback" => Ok(OnFailure::Rollback),
            _ => Err(format!("--on-failure {s:?}: halt or rollback")),
        }
    }
}

/// How a rollout proceeds: the per-track defaults, or what `keepup promote` was given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rules {
    /// The waves, in order.
    pub waves: Vec<Wave>,
    /// Seconds every reporting host of the open waves must stay healthy before the next
    /// wave opens.
    pub soak: u64,
    /// More failed hosts than this in the open waves halts.
    pub max_failed: MaxFailed,
    /// What halting also does.
    #[serde(default)]
    pub on_failure: OnFailure,
}

/// A rollout of one package in a track, as the repository key signs it into the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Unique in the repository: `<track>/<name>/<to>`.
    pub id: String,
    /// The package.
    pub name: String,
    /// The new version (the index's current one).
    pub to: String,
    /// The previous current entries (per format and arch): what hosts outside the open waves
    /// keep or install. Empty when the track had no version before.
    #[serde(default)]
    pub from: Vec<PoolEntry>,
    /// The standby rollback entries (`--on-failure rollback`): the previous contents under a
    /// version above `to`, installed by hosts that took `to` once the rollout is rolled back.
    #[serde(default)]
    pub rollback: Vec<PoolEntry>,
    /// Waves, soak, failure limit.
    pub rules: Rules,
    /// Unix time of the promotion.
    pub started: u64,
}

impl Rollout {
    /// The rollout's id for a promotion of `name` `to` into `track`.
    pub fn id_for(track: &str, name: &str, to: &str) -> String {
        format!("{track}/{name}/{to}")
    }

    /// The previous version, if the track had one.
    pub fn from_version(&self) -> Option<&str> {
        self.from.first().map(|e| e.version.as_str())
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Waves open as the gate allows.
    #[default]
    Rolling,
    /// An operator paused it: open waves stay open, no new one opens.
    Paused,
    /// Too many failed hosts, or an operator aborted: nobody else installs the new version;
    /// hosts that have it keep it (no downgrades).
    Halted,
    /// Halted, and hosts that took the new version move to the standby rollback package.
    RolledBack,
    /// Every wave passed: every host gets the new version.
    Done,
    /// A phase from a newer keepup: treated as [`Phase::Paused`].
    #[serde(other)]
    Unknown,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Rolling => "rolling",
            Phase::Paused => "paused",
            Phase::Halted => "halted",
            Phase::RolledBack => "rolled back",
            Phase::Done => "done",
            Phase::Unknown => "unknown",
        })
    }
}

/// How far one rollout went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Waves open (1 at the promotion).
    pub open: u32,
    /// Where it is.
    #[serde(default)]
    pub phase: Phase,
    /// Unix time each open wave opened (index 0: wave 1).
    #[serde(default)]
    pub opened_at: Vec<u64>,
    /// Why it halted, or who paused it (for people).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
    /// The failed hosts named by a halt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
    /// Every transition, oldest first (the newest [`HISTORY_KEPT`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Transition>,
}

/// Transitions a progress keeps.
pub const HISTORY_KEPT: usize = 50;

/// One transition of a rollout: a wave opened, paused, halted, rolled back, done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Unix time.
    pub at: u64,
    /// What happened and why, for people (`wave 2 opened: 1 host healthy for 10s`).
    pub what: String,
}

impl Progress {
    /// Where a rollout starts, and what an agent assumes without a valid progress document:
    /// the first wave open.
    pub fn start(at: u64) -> Progress {
        Progress {
            open: 1,
            phase: Phase::Rolling,
            opened_at: vec![at],
            note: String::new(),
            failed: Vec::new(),
            history: Vec::new(),
        }
    }

    /// Record a transition.
    pub fn log(&mut self, at: u64, what: impl Into<String>) {
        self.history.push(Transition {
            at,
            what: what.into(),
        });
        let over = self.history.len().saturating_sub(HISTORY_KEPT);
        self.history.drain(..over);
    }
}

/// A track's rollout progress document, signed by the rollout key.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RolloutState {
    /// The track.
    pub track: String,
    /// Only increases; agents refuse a lower one than they saw (a replayed, older progress).
    pub serial: u64,
    /// Unix time after which agents refuse it.
    pub expires: u64,
    /// Progress by rollout id.
    #[serde(default)]
    pub rollouts: BTreeMap<String, Progress>,
}

/// What a host runs of a package under a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The new version.
    New,
    /// The previous version (or nothing, if there was none): held back, and why.
    Held(String),
    /// The standby rollback package.
    Rollback,
}

/// What `host`, whose installed version of the package is `installed`, runs under `rollout`
/// at `progress`. `newer_or_equal(a, b)` compares versions the host's way (a >= b).
pub fn target(
    rollout: &Rollout,
    progress: &Progress,
    host: &str,
    installed: Option<&str>,
    newer_or_equal: impl Fn(&str, &str) -> bool,
) -> Target {
    let took_new = installed.is_some_and(|v| newer_or_equal(v, &rollout.to));
    let wave = wave_of(&rollout.rules.waves, &rollout.name, host);
    let in_open = wave.is_some_and(|w| w <= progress.open);
    match progress.phase {
        Phase::Done => Target::New,
        Phase::RolledBack if took_new && !rollout.rollback.is_empty() => Target::Rollback,
        Phase::RolledBack | Phase::Halted => Target::Held(format!(
            "rollout {} {}{}",
            rollout.id,
            progress.phase,
            if progress.note.is_empty() {
                String::new()
            } else {
                format!(": {}", progress.note)
            }
        )),
        Phase::Rolling | Phase::Paused | Phase::Unknown if in_open => Target::New,
        Phase::Rolling | Phase::Paused | Phase::Unknown => Target::Held(match wave {
            Some(w) => format!("wave {w} not open"),
            None => "in no wave: waits until the rollout is done".to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(waves: &str) -> Rollout {
        Rollout {
            id: "stable/foo/2.0-1".into(),
            name: "foo".into(),
            to: "2.0-1".into(),
            from: vec![],
            rollback: vec![],
            rules: Rules {
                waves: parse_waves(waves).unwrap(),
                soak: 30,
                max_failed: MaxFailed::Count(0),
                on_failure: OnFailure::Halt,
            },
            started: 0,
        }
    }

    #[test]
    fn waves_parse_and_refuse() {
        let w = parse_waves("canary-*, 5%,25%,100%").unwrap();
        assert_eq!(
            w,
            vec![
                Wave::Hosts("canary-*".into()),
                Wave::Percent(5),
                Wave::Percent(25),
                Wave::Percent(100)
            ]
        );
        for bad in ["25%,5%", "0%", "101%", "a b", "", "web;rm"] {
            assert!(parse_waves(bad).is_err(), "{bad}");
        }
        assert_eq!(
            serde_json::from_str::<Vec<Wave>>(&serde_json::to_string(&w).unwrap()).unwrap(),
            w
        );
        assert_eq!(MaxFailed::parse("10%").unwrap(), MaxFailed::Percent(10));
        assert_eq!(MaxFailed::parse("2").unwrap(), MaxFailed::Count(2));
        assert!(MaxFailed::parse("-1").is_err() && MaxFailed::parse("200%").is_err());
        assert!(MaxFailed::Count(0).exceeded(1, 10) && !MaxFailed::Count(1).exceeded(1, 10));
        assert!(MaxFailed::Percent(10).exceeded(2, 10) && !MaxFailed::Percent(10).exceeded(1, 10));
    }

    #[test]
    fn shares_are_cumulative_stable_and_spread() {
        let waves = parse_waves("canary-1,5%,50%,100%").unwrap();
        assert_eq!(wave_of(&waves, "foo", "canary-1"), Some(1));
        let hosts: Vec<String> = (0..10_000).map(|i| format!("host-{i:05}")).collect();
        let mut per_wave = [0usize; 5];
        for h in &hosts {
            let w = wave_of(&waves, "foo", h).unwrap();
            assert_eq!(wave_of(&waves, "foo", h), Some(w), "stable");
            per_wave[w as usize] += 1;
        }
        assert_eq!(per_wave[1], 0);
        // 5%, then 45%, then 50% of 10,000, give or take the hash's spread.
        assert!((400..600).contains(&per_wave[2]), "{per_wave:?}");
        assert!((4_300..4_700).contains(&per_wave[3]), "{per_wave:?}");
        assert!((4_800..5_200).contains(&per_wave[4]), "{per_wave:?}");
        // Another package puts other hosts first.
        let first = |pkg: &str| -> Vec<&String> {
            hosts
                .iter()
                .filter(|h| wave_of(&waves, pkg, h) == Some(2))
                .collect()
        };
        let (a, b) = (first("foo"), first("bar"));
        let common = a.iter().filter(|h| b.contains(h)).count();
        assert!(common < a.len() / 5, "{common} of {}", a.len());
        // A host outside every glob and past the last share is in no wave.
        let partial = parse_waves("canary-*,10%").unwrap();
        let outside = hosts
            .iter()
            .filter(|h| wave_of(&partial, "foo", h).is_none())
            .count();
        assert!((8_800..9_200).contains(&outside), "{outside}");
    }

    #[test]
    fn targets_follow_the_phase_and_never_downgrade() {
        let mut r = rollout("canary-1,100%");
        r.rollback = vec![PoolEntry {
            name: "foo".into(),
            version: "2.0+rb1-1".into(),
            arch: "all".into(),
            format: super::super::Format::Deb,
            path: "pool/x".into(),
            size: 1,
            sha256: "00".into(),
            rollback_of: Some("1.0-1".into()),
        }];
        let ge = |a: &str, b: &str| a >= b;
        let mut p = Progress::start(0);
        assert_eq!(target(&r, &p, "canary-1", None, ge), Target::New);
        assert_eq!(
            target(&r, &p, "web-1", Some("1.0-1"), ge),
            Target::Held("wave 2 not open".into())
        );
        p.phase = Phase::Paused;
        assert_eq!(target(&r, &p, "canary-1", Some("1.0-1"), ge), Target::New);
        p.phase = Phase::Halted;
        assert!(matches!(
            target(&r, &p, "canary-1", Some("1.0-1"), ge),
            Target::Held(_)
        ));
        p.phase = Phase::RolledBack;
        assert_eq!(
            target(&r, &p, "canary-1", Some("2.0-1"), ge),
            Target::Rollback
        );
        assert!(matches!(
            target(&r, &p, "web-1", Some("1.0-1"), ge),
            Target::Held(_)
        ));
        p.phase = Phase::Done;
        assert_eq!(target(&r, &p, "web-1", Some("1.0-1"), ge), Target::New);
        p.phase = Phase::Rolling;
        p.open = 2;
        assert_eq!(target(&r, &p, "web-1", Some("1.0-1"), ge), Target::New);
        let unknown: Phase = serde_json::from_str("\"frozen\"").unwrap();
        assert_eq!(unknown, Phase::Unknown);
    }
}
