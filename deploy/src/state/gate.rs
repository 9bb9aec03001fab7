//! The rollout gate of `keepup serve --repo R --state DB`: from the hosts' latest reports,
//! decide for each rollout whether its next wave opens, it halts (or rolls back), or it is
//! done, and publish that in the track's progress document signed by the rollout key.
//!
//! [`judge`] and [`decide`] are pure; [`Gate::tick`] reads the repository and the reports and
//! writes the progress. The gate thread runs a tick after reports arrive and every
//! [`TICK`], resting at least 19 times as long as its last tick took between two (under a
//! twentieth of a core), so a halting report is acted on within seconds even at 100,000
//! hosts (docs/benchmarks.md).
//!
//! With replicas sharing PostgreSQL, only the replica holding the gate's [`Lease`] publishes
//! decisions; the others judge the same reports only to show the rollouts ([`Gate::observer`]).
//! A write is fenced ([`may_write`]) under the repository's rollout lock: it goes only if the
//! progress document is still the one the decision was made from, and the lease is still held
//! on the same database session. A replica that froze mid-tick (and lost its lease meanwhile)
//! or raced an operator's command writes nothing; the next tick decides again.
//!
//! The rules (docs/operations.md, "Rolling out safely"):
//! * a host on the new version is **healthy** when its start result for that version is
//!   `started`, the service is `running`, every probe passes and it has not restarted since
//!   the gate last looked (a restart starts the soak again);
//! * it is **failed** on `failed to start`, `given-up`, or a probe failing for longer than
//!   [`PROBE_GRACE`];
//! * the next wave opens when no reporting host of the open waves is anything but healthy,
//!   at least half of the open waves' hosts (rounded up) are healthy, and that has held for the
//!   soak (counted from the wave's opening, or from the last time a host was not healthy);
//! * more failed hosts than `max_failed` halts.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keepup_deploy::wire::rollout::{wave_of, OnFailure, Phase, Progress, Rollout};
use keepup_deploy::wire::{Fleet, Index, ServiceState};

use super::db::Lease;
use super::view::HostEntry;

/// How often the gate looks at every open rollout without being nudged.
pub const TICK: Duration = Duration::from_secs(1);
/// The least time between two ticks.
const MIN_REST: Duration = Duration::from_millis(100);
/// A probe failing for longer than this on the new version makes the host failed.
pub const PROBE_GRACE: u64 = 60;

/// What one host's latest report says about a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// On the new version, started, running, probes passing, no restart.
    Healthy,
    /// The new version failed here (why).
    Failed(String),
    /// Not (yet) on the new version, or not settled (why; most often a fixed text, so judging
    /// 100,000 hosts allocates little).
    Waiting(std::borrow::Cow<'static, str>),
    /// No report, or none within the stale window.
    NotReporting,
}

/// Judge `report` (received at `received_at`) for `rollout` at `now`. `failing_since` is when
/// this host was first seen with a failing probe on the new version, and `restarted` whether
/// its service's restart count grew since the gate last looked (the caller keeps both): a
/// restart makes the host not healthy at that look, so the soak starts again.
pub fn judge(
    rollout: &Rollout,
    entry: Option<&HostEntry>,
    now: u64,
    stale_after: u64,
    failing_since: Option<u64>,
    restarted: bool,
) -> Health {
    let Some(e) = entry.filter(|e| now.saturating_sub(e.received_at) <= stale_after) else {
        return Health::NotReporting;
    };
    let name = &rollout.name;
    let installed = e.installed(name);
    let svc = e.service(name);
    if let Some(start) = svc.and_then(|s| s.start.as_ref()) {
        if *start.version == *rollout.to && !start.started {
            let detail = start.failed.as_ref().map_or("", |f| f.detail.as_str());
            return Health::Failed(format!("failed to start: {detail}"));
        }
    }
    if installed != Some(rollout.to.as_str()) {
        return Health::Waiting(match installed {
            Some(_) => "still on the previous version".into(),
            None => "not installed yet".into(),
        });
    }
    let Some(svc) = svc else {
        return Health::Waiting("installed, not supervised yet".into());
    };
    if svc.state == ServiceState::GivenUp {
        return Health::Failed("given up: it kept exiting".into());
    }
    if svc.probes.iter().any(|p| p.ok == Some(false)) {
        if failing_since.is_some_and(|t| now.saturating_sub(t) >= PROBE_GRACE) {
            return Health::Failed(format!("probes failing for over {PROBE_GRACE}s"));
        }
        return Health::Waiting("a probe fails".into());
    }
    match &svc.start {
        Some(s) if *s.version == *rollout.to && s.started => {}
        _ => return Health::Waiting("start not judged yet".into()),
    }
    if !svc.state.is_ready() {
        return Health::Waiting(format!("service {}", svc.state).into());
    }
    if restarted {
        return Health::Waiting(format!("restarted ({} since the start)", svc.restarts).into());
    }
    if svc.probes.iter().any(|p| p.ok.is_none()) {
        return Health::Waiting("probes not run yet".into());
    }
    Health::Healthy
}

/// One host of a rollout's track: its wave and health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostState {
    /// Host name.
    pub host: String,
    /// Its wave (None: in no wave).
    pub wave: Option<u32>,
    /// What its report says.
    pub health: Health,
}

/// What the gate decides for one rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing changes (why, for status).
    Wait(String),
    /// Open the next wave.
    Open(String),
    /// Every wave passed.
    Done(String),
    /// Too many failed hosts: halt (or roll back), naming them.
    Halt {
        /// The failed hosts.
        failed: Vec<String>,
        /// Why.
        why: String,
    },
}

/// Decide a rollout at `progress` from its hosts, at `now`; `clean_since` is the last time a
/// reporting host of the open waves was not healthy (or when the newest wave opened, if
/// later).
pub fn decide(
    rollout: &Rollout,
    progress: &Progress,
    hosts: &[HostState],
    clean_since: u64,
    now: u64,
) -> Decision {
    if progress.phase != Phase::Rolling {
        return Decision::Wait(format!("{}", progress.phase));
    }
    let open: Vec<&HostState> = hosts
        .iter()
        .filter(|h| h.wave.is_some_and(|w| w <= progress.open))
        .collect();
    let failed: Vec<&HostState> = open
        .iter()
        .copied()
        .filter(|h| matches!(h.health, Health::Failed(_)))
        .collect();
    if rollout.rules.max_failed.exceeded(failed.len(), open.len()) {
        let why = failed
            .iter()
            .map(|h| match &h.health {
                Health::Failed(w) => format!("{}: {w}", h.host),
                _ => h.host.clone(),
            })
            .collect::<Vec<_>>()
            .join("; ");
        return Decision::Halt {
            failed: failed.iter().map(|h| h.host.clone()).collect(),
            why: format!(
                "{} failed host(s), more than {}: {why}",
                failed.len(),
                rollout.rules.max_failed
            ),
        };
    }
    let healthy = open.iter().filter(|h| h.health == Health::Healthy).count();
    if let Some(h) = open
        .iter()
        .find(|h| !matches!(h.health, Health::Healthy | Health::NotReporting))
    {
        return Decision::Wait(format!("{} is not healthy yet: {:?}", h.host, h.health));
    }
    let needed = open.len().div_ceil(2);
    if healthy < needed {
        return Decision::Wait(format!(
            "{healthy} of {} hosts of the open waves healthy, {needed} needed",
            open.len()
        ));
    }
    let soaked = now.saturating_sub(clean_since);
    if soaked < rollout.rules.soak {
        return Decision::Wait(format!("soaking: {}s left", rollout.rules.soak - soaked));
    }
    let what = format!(
        "{healthy} of {} host(s) healthy for {}s",
        open.len(),
        rollout.rules.soak
    );
    if progress.open as usize >= rollout.rules.waves.len() {
        Decision::Done(what)
    } else {
        Decision::Open(what)
    }
}

/// Apply a decision to `progress` at `now` (rolled back when it halts a rollout with a
/// standby rollback and `--on-failure rollback`); false when nothing changes.
pub fn apply(rollout: &Rollout, progress: &mut Progress, d: &Decision, now: u64) -> bool {
    match d {
        Decision::Wait(_) => return false,
        Decision::Open(why) => {
            progress.open += 1;
            progress.opened_at.push(now);
            progress.log(now, format!("wave {} opened: {why}", progress.open));
        }
        Decision::Done(why) => {
            progress.phase = Phase::Done;
            progress.log(now, format!("done: {why}"));
        }
        Decision::Halt { failed, why } => {
            let rollback =
                rollout.rules.on_failure == OnFailure::Rollback && !rollout.rollback.is_empty();
            progress.phase = if rollback {
                Phase::RolledBack
            } else {
                Phase::Halted
            };
            progress.failed = failed.clone();
            progress.note = why.clone();
            progress.log(now, format!("{}: {why}", progress.phase));
        }
    }
    true
}

/// The hosts of `rollout`'s track among `snapshot`, by the policy: assigned to the track, to
/// the package (or to every service), and not quarantined from it.
pub fn track_hosts<'a>(
    fleet: &Fleet,
    track: &str,
    name: &str,
    snapshot: &'a [(String, Option<Arc<HostEntry>>)],
) -> Vec<&'a (String, Option<Arc<HostEntry>>)> {
    snapshot
        .iter()
        .filter(|(host, _)| {
            let (a, q) = fleet.for_host(host);
            a.is_some_and(|a| {
                a.track == track && (a.services.is_empty() || a.services.iter().any(|s| s == name))
            }) && !q.contains(&name)
        })
        .collect()
}

/// One wave of a rollout as the gate saw it last (or the hosts in no wave).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WaveStatus {
    /// `1: canary-*`, `2: 50%`, or `no wave`.
    pub wave: String,
    /// Whether it is open.
    pub open: bool,
    /// Hosts in it.
    pub hosts: usize,
    /// Hosts on the new version.
    pub on_new: usize,
    /// Healthy on the new version.
    pub healthy: usize,
    /// Failed on the new version.
    pub failed: usize,
    /// Reporting, not healthy yet (or still on the previous version).
    pub waiting: usize,
    /// Silent for longer than the stale window.
    pub not_reporting: usize,
}

/// The columns of a wave's row, as `keepup rollout status --server` and the page show them.
pub const WAVE_COLUMNS: [&str; 8] = [
    "wave",
    "open",
    "hosts",
    "on new",
    "healthy",
    "failed",
    "waiting",
    "not reporting",
];

impl WaveStatus {
    /// The row's cells, in [`WAVE_COLUMNS`] order (unescaped: the wave is an operator's text).
    pub fn cells(&self) -> [String; 8] {
        [
            self.wave.clone(),
            if self.open { "open" } else { "closed" }.to_string(),
            self.hosts.to_string(),
            self.on_new.to_string(),
            self.healthy.to_string(),
            self.failed.to_string(),
            self.waiting.to_string(),
            self.not_reporting.to_string(),
        ]
    }
}

/// A rollout as the gate saw it last: `GET /api/v1/rollouts`, `keepup rollout status
/// --server`, the page.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RolloutStatus {
    /// The rollout's id.
    pub id: String,
    /// Its track.
    pub track: String,
    /// The package.
    pub name: String,
    /// The previous version (none: the track had none).
    pub from: Option<String>,
    /// The new version.
    pub to: String,
    /// `rolling`, `paused`, `halted`, `rolled back`, `done`.
    pub phase: String,
    /// Waves open.
    pub open: u32,
    /// Per wave, then the hosts in no wave (if any).
    pub waves: Vec<WaveStatus>,
    /// Seconds left in the soak, while the open waves are healthy.
    pub soak_left: Option<u64>,
    /// Failed hosts, by name.
    pub failed: Vec<String>,
    /// What the gate waits for, or what it just did.
    pub decision: String,
}

impl RolloutStatus {
    fn of(
        rollout: &Rollout,
        track: &str,
        progress: &Progress,
        hosts: &[HostState],
        decision: &Decision,
        soak_left: Option<u64>,
    ) -> RolloutStatus {
        let mut waves: Vec<WaveStatus> = rollout
            .rules
            .waves
            .iter()
            .enumerate()
            .map(|(i, w)| WaveStatus {
                wave: format!("{}: {w}", i + 1),
                open: progress.phase == Phase::Done || (i as u32) < progress.open,
                ..WaveStatus::default()
            })
            .collect();
        let mut outside = WaveStatus {
            wave: "no wave".into(),
            open: progress.phase == Phase::Done,
            ..WaveStatus::default()
        };
        let mut failed = Vec::new();
        for h in hosts {
            let w = match h.wave {
                Some(w) => &mut waves[w as usize - 1],
                None => &mut outside,
            };
            w.hosts += 1;
            match &h.health {
                Health::Healthy => {
                    w.healthy += 1;
                    w.on_new += 1;
                }
                Health::Failed(_) => {
                    w.failed += 1;
                    w.on_new += 1;
                    failed.push(h.host.clone());
                }
                Health::Waiting(why) => {
                    w.waiting += 1;
                    if !why.starts_with("still on") && !why.starts_with("not installed") {
                        w.on_new += 1;
                    }
                }
                Health::NotReporting => w.not_reporting += 1,
            }
        }
        if outside.hosts > 0 {
            waves.push(outside);
        }
        RolloutStatus {
            id: rollout.id.clone(),
            track: track.into(),
            name: rollout.name.clone(),
            from: rollout.from_version().map(str::to_string),
            to: rollout.to.clone(),
            phase: progress.phase.to_string(),
            open: progress.open,
            waves,
            soak_left,
            failed,
            decision: match decision {
                Decision::Wait(w) => format!("waiting: {w}"),
                Decision::Open(w) => format!("opened the next wave: {w}"),
                Decision::Done(w) => format!("done: {w}"),
                Decision::Halt { why, .. } => format!("halted: {why}"),
            },
        }
    }
}

/// What the gate remembers between ticks (not persisted: after a restart, soaks count again
/// from the restart, and failing probes from the first report after it).
#[derive(Default)]
pub struct Gate {
    /// Per rollout id: the last time a reporting host of the open waves was not healthy.
    clean_since: HashMap<String, u64>,
    /// Per rollout id, per host: when a probe was first seen failing on the new version.
    failing_since: HashMap<String, HashMap<String, u64>>,
    /// Per rollout id, per host: the service's restart count on the new version at the last
    /// look.
    restarts_seen: HashMap<String, HashMap<String, u64>>,
    /// Per (rollout id): each host's wave, computed once.
    waves: HashMap<String, HashMap<String, Option<u32>>>,
    /// Per rollout id: how it looked at the last tick.
    pub last: BTreeMap<String, RolloutStatus>,
    /// How long the repository's signed metadata stays valid (read once).
    valid_for: Option<u64>,
    /// Per track: the error the last tick logged.
    failing: HashMap<String, String>,
    /// Judge without publishing: another replica holds the gate's lease.
    pub observer: bool,
    /// The gate's lease, with replicas on PostgreSQL (`None`: one server, always the gate).
    pub lease: Option<Lease>,
}

/// Why a tick's decisions were not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Superseded {
    /// The progress document changed since it was read (an operator's command, or another
    /// replica that held the lease meanwhile).
    Changed,
    /// This replica no longer holds the gate's lease.
    LeaseLost,
}

impl std::fmt::Display for Superseded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Superseded::Changed => "the rollout progress changed since this tick read it",
            Superseded::LeaseLost => "this replica lost the rollout gate's lease",
        })
    }
}

impl std::error::Error for Superseded {}

/// The fence on a gate write, checked under the rollout lock: decisions made from the
/// progress document at serial `read` may replace the one at `current` only if no one wrote
/// in between and (`leader`, asked last because it is a query) the lease is still held.
pub fn may_write(read: u64, current: u64, leader: impl FnOnce() -> bool) -> Result<(), Superseded> {
    if read != current {
        return Err(Superseded::Changed);
    }
    if !leader() {
        return Err(Superseded::LeaseLost);
    }
    Ok(())
}

impl Gate {
    /// Evaluate every rollout of `indexes` and publish what changes in the repository at
    /// `root`. Errors are logged, not returned: the gate tries again next tick.
    pub fn tick(
        &mut self,
        root: &Path,
        fleet: &Fleet,
        indexes: &[(String, Arc<Index>)],
        snapshot: &[(String, Option<Arc<HostEntry>>)],
        now: u64,
        stale_after: u64,
    ) {
        let mut live = Vec::new();
        for (track, index) in indexes {
            if index.rollouts.is_empty() {
                continue;
            }
            match self.track_tick(root, fleet, track, index, snapshot, now, stale_after) {
                Ok(()) => {
                    self.failing.remove(track);
                }
                // Said once per cause, not every tick.
                Err(e) => {
                    let e = format!("{e:#}");
                    if self.failing.get(track) != Some(&e) {
                        eprintln!(
                            "keepup serve: rollout gate, track {track}: {e}; rollouts there stay \
                             where they are until this is fixed (the server needs write access \
                             to tracks/{track}/ and .keepup/, and .keepup/rollout-key.asc)"
                        );
                        self.failing.insert(track.clone(), e);
                    }
                }
            }
            live.extend(index.rollouts.iter().map(|r| r.id.clone()));
        }
        self.clean_since.retain(|id, _| live.contains(id));
        self.waves.retain(|id, _| live.contains(id));
        self.failing_since.retain(|id, _| live.contains(id));
        self.restarts_seen.retain(|id, _| live.contains(id));
        self.last.retain(|id, _| live.contains(id));
    }

    #[allow(clippy::too_many_arguments)]
    fn track_tick(
        &mut self,
        root: &Path,
        fleet: &Fleet,
        track: &str,
        index: &Index,
        snapshot: &[(String, Option<Arc<HostEntry>>)],
        now: u64,
        stale_after: u64,
    ) -> anyhow::Result<()> {
        let doc = crate::repo::rollouts::read_progress(root, track)?;
        let mut changes: Vec<(String, Progress)> = Vec::new();
        for rollout in &index.rollouts {
            let progress = doc
                .rollouts
                .get(&rollout.id)
                .cloned()
                .unwrap_or_else(|| Progress::start(rollout.started));
            let waves = self.waves.entry(rollout.id.clone()).or_default();
            let failing_since = self.failing_since.entry(rollout.id.clone()).or_default();
            let restarts_seen = self.restarts_seen.entry(rollout.id.clone()).or_default();
            let mut hosts = Vec::new();
            for (host, entry) in track_hosts(fleet, track, &rollout.name, snapshot) {
                let wave = match waves.get(host) {
                    Some(w) => *w,
                    None => *waves.entry(host.clone()).or_insert(wave_of(
                        &rollout.rules.waves,
                        &rollout.name,
                        host,
                    )),
                };
                let failing = entry.as_ref().is_some_and(|e| {
                    e.installed(&rollout.name) == Some(rollout.to.as_str())
                        && e.service(&rollout.name)
                            .is_some_and(|s| s.probes.iter().any(|p| p.ok == Some(false)))
                });
                if failing {
                    if !failing_since.contains_key(host) {
                        failing_since.insert(host.clone(), now);
                    }
                } else if !failing_since.is_empty() {
                    failing_since.remove(host);
                }
                // Restarts since the gate last looked (the first look sets the baseline).
                let restarts = entry.as_ref().and_then(|e| {
                    let s = e.service(&rollout.name)?;
                    (e.installed(&rollout.name) == Some(rollout.to.as_str())).then_some(s.restarts)
                });
                let restarted = match (restarts, restarts_seen.get(host)) {
                    (Some(now_r), Some(&before)) => {
                        if now_r != before {
                            restarts_seen.insert(host.clone(), now_r);
                        }
                        now_r > before
                    }
                    (Some(now_r), None) => {
                        restarts_seen.insert(host.clone(), now_r);
                        false
                    }
                    (None, _) => false,
                };
                let health = judge(
                    rollout,
                    entry.as_deref(),
                    now,
                    stale_after,
                    failing_since.get(host).copied(),
                    restarted,
                );
                hosts.push(HostState {
                    host: host.clone(),
                    wave,
                    health,
                });
            }
            let newest_open = progress
                .opened_at
                .last()
                .copied()
                .unwrap_or(rollout.started);
            let clean = self.clean_since.entry(rollout.id.clone()).or_insert(now);
            *clean = (*clean).max(newest_open);
            let unsettled = hosts.iter().any(|h| {
                h.wave.is_some_and(|w| w <= progress.open)
                    && !matches!(h.health, Health::Healthy | Health::NotReporting)
            });
            if unsettled {
                *clean = now;
            }
            let decision = decide(rollout, &progress, &hosts, *clean, now);
            let soak_left = (progress.phase == Phase::Rolling && !unsettled).then(|| {
                rollout
                    .rules
                    .soak
                    .saturating_sub(now.saturating_sub(*clean))
            });
            let mut next = progress.clone();
            if !self.observer && apply(rollout, &mut next, &decision, now) {
                if matches!(decision, Decision::Open(_)) {
                    self.clean_since.insert(rollout.id.clone(), now);
                }
                changes.push((rollout.id.clone(), next.clone()));
            }
            self.last.insert(
                rollout.id.clone(),
                RolloutStatus::of(rollout, track, &next, &hosts, &decision, soak_left),
            );
        }
        let valid_for = match self.valid_for {
            Some(v) => v,
            None => *self
                .valid_for
                .insert(crate::repo::Repo::read_only(root)?.valid_for()),
        };
        let stale = doc.serial == 0 || doc.expires.saturating_sub(now) < valid_for / 2;
        if self.observer || (changes.is_empty() && !stale) {
            return Ok(());
        }
        let mut said = Vec::new();
        let read = doc.serial;
        let lease = &mut self.lease;
        let written = crate::repo::rollouts::update_progress(root, track, valid_for, |d| {
            may_write(read, d.serial, || {
                lease.as_mut().is_none_or(Lease::still_held)
            })?;
            for (id, p) in changes {
                // An operator's command may have come in meanwhile: it wins.
                if d.rollouts
                    .get(&id)
                    .is_none_or(|cur| cur.phase == Phase::Rolling)
                {
                    said.push(format!(
                        "keepup serve: rollout {id}: {}",
                        p.history.last().map_or("", |t| t.what.as_str())
                    ));
                    d.rollouts.insert(id, p);
                }
            }
            Ok(())
        });
        match written {
            Ok(_) => {}
            Err(e) => match e.downcast_ref::<Superseded>() {
                // Nothing written: the next tick decides again from what is there now.
                Some(Superseded::Changed) => return Ok(()),
                Some(Superseded::LeaseLost) => {
                    eprintln!(
                        "keepup serve: rollout gate, track {track}: {}; nothing written",
                        Superseded::LeaseLost
                    );
                    self.observer = true;
                    return Ok(());
                }
                None => return Err(e),
            },
        }
        for line in said {
            eprintln!("{line}");
        }
        Ok(())
    }
}

/// The gate thread: a tick after each nudge (reports stored) and every [`TICK`].
/// With a `lease` (replicas on PostgreSQL), it publishes only while it holds the lease.
pub fn run(
    server: std::sync::Weak<super::Server>,
    nudges: std::sync::mpsc::Receiver<()>,
    lease: Option<Lease>,
    stale_after: u64,
) {
    let mut gate = Gate {
        observer: lease.is_some(),
        lease,
        ..Gate::default()
    };
    // The gate's share of one core stays under a twentieth: after a tick that took d, the
    // next waits at least 19 d (and 100 ms), however many reports nudge it.
    let mut rest = MIN_REST;
    loop {
        std::thread::sleep(rest);
        match nudges.recv_timeout(TICK.saturating_sub(rest)) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        }
        while nudges.try_recv().is_ok() {}
        let began = std::time::Instant::now();
        let Some(s) = server.upgrade() else { return };
        let (fleet, indexes) = s.policy_files();
        let Some(fleet) = fleet else { continue };
        if indexes.iter().all(|(_, i)| i.rollouts.is_empty()) {
            continue;
        }
        if let Some(l) = &mut gate.lease {
            let observer = !l.hold();
            if observer != gate.observer {
                eprintln!(
                    "keepup serve: {}",
                    if observer {
                        "another replica evaluates the rollout gates now"
                    } else {
                        "this replica evaluates the rollout gates now (it holds the lease)"
                    }
                );
                gate.observer = observer;
            }
        }
        let snapshot = s.snapshot();
        let root: PathBuf = s.repo.clone();
        gate.tick(
            &root,
            &fleet,
            &indexes,
            &snapshot,
            super::db::now(),
            stale_after,
        );
        *s.gate_view.lock().unwrap() = gate.last.values().cloned().collect();
        drop(s);
        rest = (began.elapsed() * 19).max(MIN_REST);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_write_is_fenced_by_the_serial_and_the_lease() {
        assert_eq!(may_write(7, 7, || true), Ok(()));
        // Someone wrote since the tick read the document: the lease is not even asked.
        let mut asked = false;
        let r = may_write(7, 8, || {
            asked = true;
            true
        });
        assert_eq!(r, Err(Superseded::Changed));
        assert!(!asked);
        assert_eq!(may_write(7, 7, || false), Err(Superseded::LeaseLost));
    }
    use keepup_deploy::wire::rollout::{parse_waves, MaxFailed, Rules};
    use keepup_deploy::wire::{ProbeReport, Report, ServiceReport, StartReport};

    fn rollout(waves: &str, max_failed: MaxFailed) -> Rollout {
        Rollout {
            id: "stable/foo/2.0-1".into(),
            name: "foo".into(),
            to: "2.0-1".into(),
            from: vec![],
            rollback: vec![],
            rules: Rules {
                waves: parse_waves(waves).unwrap(),
                soak: 10,
                max_failed,
                on_failure: OnFailure::Halt,
            },
            started: 100,
        }
    }

    fn report(version: &str, state: &str, started: bool, probe: Option<bool>) -> HostEntry {
        let mut r = Report {
            host: "h".into(),
            ..Report::default()
        };
        r.installed.insert("foo".into(), version.into());
        r.services.push(ServiceReport {
            name: "foo".into(),
            version: version.into(),
            state: state.into(),
            restarts: 0,
            probes: vec![ProbeReport {
                name: "port".into(),
                ok: probe,
                ..ProbeReport::default()
            }],
            start: Some(StartReport {
                version: version.into(),
                started,
                ..StartReport::default()
            }),
        });
        HostEntry::of(&r, 1000)
    }

    #[test]
    fn health_from_reports() {
        let r = rollout("canary-1,100%", MaxFailed::Count(0));
        let j = |e: &HostEntry, failing| judge(&r, Some(e), 1000, 600, failing, false);
        assert_eq!(
            j(&report("2.0-1", "running", true, Some(true)), None),
            Health::Healthy
        );
        assert!(matches!(
            j(&report("2.0-1", "backoff", false, Some(false)), None),
            Health::Failed(_)
        ));
        assert!(matches!(
            j(&report("2.0-1", "given-up", true, None), None),
            Health::Failed(_)
        ));
        assert!(matches!(
            j(&report("1.0-1", "running", true, Some(true)), None),
            Health::Waiting(_)
        ));
        assert!(matches!(
            j(&report("2.0-1", "running", true, Some(false)), Some(990)),
            Health::Waiting(_)
        ));
        assert!(matches!(
            j(&report("2.0-1", "running", true, Some(false)), Some(900)),
            Health::Failed(_)
        ));
        assert_eq!(
            judge(&r, None, 1000, 600, None, false),
            Health::NotReporting
        );
        let old = report("2.0-1", "running", true, Some(true));
        assert_eq!(
            judge(&r, Some(&old), 5000, 600, None, false),
            Health::NotReporting
        );
        // A restart since the last look: not healthy now (the soak starts again).
        assert!(matches!(
            judge(&r, Some(&old), 1000, 600, None, true),
            Health::Waiting(_)
        ));
    }

    fn hs(host: &str, wave: u32, health: Health) -> HostState {
        HostState {
            host: host.into(),
            wave: Some(wave),
            health,
        }
    }

    #[test]
    fn waves_open_after_the_soak_and_halt_on_failure() {
        let r = rollout("canary-1,50%,100%", MaxFailed::Count(0));
        let p = Progress::start(100);
        let hosts = vec![
            hs("canary-1", 1, Health::Healthy),
            hs("web-1", 2, Health::Waiting("still on 1.0-1".into())),
        ];
        assert!(matches!(
            decide(&r, &p, &hosts, 100, 105),
            Decision::Wait(_)
        ));
        assert!(matches!(
            decide(&r, &p, &hosts, 100, 110),
            Decision::Open(_)
        ));
        // A canary not healthy keeps the wave closed; one that failed halts.
        let waiting = vec![hs("canary-1", 1, Health::Waiting("starting".into()))];
        assert!(matches!(
            decide(&r, &p, &waiting, 100, 200),
            Decision::Wait(_)
        ));
        let failed = vec![hs("canary-1", 1, Health::Failed("failed to start".into()))];
        match decide(&r, &p, &failed, 100, 101) {
            Decision::Halt { failed, .. } => assert_eq!(failed, ["canary-1"]),
            d => panic!("{d:?}"),
        }
        // A silent canary is not evidence: the wave stays closed.
        let silent = vec![hs("canary-1", 1, Health::NotReporting)];
        assert!(matches!(
            decide(&r, &p, &silent, 100, 200),
            Decision::Wait(_)
        ));
        // Paused: nothing opens; the last wave passing is done.
        let mut paused = p.clone();
        paused.phase = Phase::Paused;
        assert!(matches!(
            decide(&r, &paused, &hosts, 100, 200),
            Decision::Wait(_)
        ));
        let mut last = p.clone();
        last.open = 3;
        assert!(matches!(
            decide(&r, &last, &hosts[..1], 100, 200),
            Decision::Done(_)
        ));
        // A share of failures is tolerated up to --max-failed.
        let r = rollout("100%", MaxFailed::Percent(50));
        let two = vec![
            hs("a", 1, Health::Failed("x".into())),
            hs("b", 1, Health::Healthy),
        ];
        assert!(!matches!(
            decide(&r, &p, &two, 100, 200),
            Decision::Halt { .. }
        ));
    }

    #[test]
    fn a_halt_rolls_back_only_with_a_standby() {
        let mut r = rollout("100%", MaxFailed::Count(0));
        r.rules.on_failure = OnFailure::Rollback;
        let halt = Decision::Halt {
            failed: vec!["a".into()],
            why: "x".into(),
        };
        let mut p = Progress::start(0);
        apply(&r, &mut p, &halt, 5);
        assert_eq!(p.phase, Phase::Halted, "no standby package: halt only");
        r.rollback = r.from.clone();
        r.rollback.push(keepup_deploy::wire::PoolEntry {
            name: "foo".into(),
            version: "2.0+rb1-1".into(),
            arch: "all".into(),
            format: keepup_deploy::wire::Format::Deb,
            path: "pool/x".into(),
            size: 1,
            sha256: "00".into(),
            rollback_of: Some("1.0-1".into()),
        });
        let mut p = Progress::start(0);
        apply(&r, &mut p, &halt, 5);
        assert_eq!(
            (p.phase, p.failed.clone()),
            (Phase::RolledBack, vec!["a".to_string()])
        );
        assert_eq!(p.history.len(), 1);
    }
}
