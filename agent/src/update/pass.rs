//! One update pass, end to end: repair what an interrupted or failed pass left, fetch the fleet
//! policy and this host's track index, check their signatures against the pinned key and their
//! serials against the highest seen, compute the [`plan`](super::plan), download (sha256
//! checked) and install or remove with the package manager (every run bounded), then confirm
//! that each installed service started. The outcome is a [`PassResult`]: what
//! `keepup-agent update --now` prints and what the next report carries.
//!
//! Only one pass runs at a time on a host: an exclusive `flock` on `state_dir/update.lock`,
//! taken by the agent's passes and by `update --now` run without an agent alike.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keepup_deploy::wire::fleet::SIGNED_POLICY;
use keepup_deploy::wire::report::StartReport;
use keepup_deploy::wire::rollout::RolloutState;
use keepup_deploy::wire::rotation::{Judgement, Rotation, ROTATION};
use keepup_deploy::wire::verify::{check_expiry, TrustedKey};
use keepup_deploy::wire::{EventKind, Fleet, Index, AGENT_PACKAGE};
use keepup_packager::manifest::Manifest;
use nix::fcntl::{Flock, FlockArg};
use tokio::sync::Notify;

use super::error::{PassError, UpdateFailure};
use super::fetch::{self, FetchError, Wanted};
use super::keys::{self, key_store};
use super::pkg::{PackageManager, PassMarker, System};
use super::plan::{self, Action, Format, PackageEntry, PlanInput};
use super::run::{run, Outcome};
use super::serials::{check_min, serial_store, SerialStore, Serials};
use super::start::{self, Verdict};
use super::waves;
use crate::config::{Config, UpdaterConfig};
use crate::events::{now_unix, Events};
use crate::hoststate::SharedHost;
use crate::http::{self, HttpError};
pub use crate::proto::PassResult;
use crate::proto::Request;
use crate::reaper::Spawned;

/// Bound of one fetch of the index, the policy or a signature.
const META_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest index or policy accepted.
const MAX_META: u64 = 16 * 1024 * 1024;
/// Log lines kept in a "failed to start" report.
const LOG_TAIL_LINES: usize = 20;
/// How often a starting service's status is looked at.
const START_POLL: Duration = Duration::from_millis(250);
/// How long the supervisor may take to answer one `status`.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// The package format and architecture of this host: from the configuration, else deb if
/// `/usr/bin/dpkg` exists (rpm otherwise), and the architecture as the package manager says.
pub async fn host_system(up: &UpdaterConfig) -> (Format, String) {
    let format = up
        .package_format
        .unwrap_or(if Path::new("/usr/bin/dpkg").exists() {
            Format::Deb
        } else {
            Format::Rpm
        });
    if let Some(a) = &up.arch {
        return (format, a.clone());
    }
    let argv: &[&str] = match format {
        Format::Deb => &["dpkg", "--print-architecture"],
        Format::Rpm => &["rpm", "--eval", "%_arch"],
    };
    let asked = match run(argv, Duration::from_secs(30), None).await {
        Outcome::Ok { output_tail } => Some(output_tail.trim().to_string()),
        _ => None,
    }
    .filter(|a| !a.is_empty() && !a.contains(char::is_whitespace) && !a.starts_with('%'));
    let arch = asked.unwrap_or_else(|| {
        let m = std::env::consts::ARCH;
        match (format, m) {
            (Format::Deb, "x86_64") => "amd64".into(),
            (Format::Deb, "aarch64") => "arm64".into(),
            (Format::Deb, "x86") => "i386".into(),
            _ => m.to_string(),
        }
    });
    (format, arch)
}

/// Takes the one-pass-at-a-time lock, or says that another pass holds it.
fn pass_lock(state_dir: &Path) -> Result<Flock<File>, PassError> {
    let path = state_dir.join("update.lock");
    let open = || -> std::io::Result<File> {
        std::fs::create_dir_all(state_dir)?;
        crate::statefile::open_lock_file(&path)
    };
    let file = open().map_err(|e| PassError::local(format!("opening {}: {e}", path.display())))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        if e == nix::errno::Errno::EWOULDBLOCK {
            PassError::new(
                UpdateFailure::Busy,
                format!(
                    "another update pass is running (it holds the lock on {}); try again when it \
                 is done",
                    path.display()
                ),
            )
        } else {
            PassError::local(format!("locking {}: {e}", path.display()))
        }
    })
}

/// Checks an inline-signed document against the pinned key and returns the signed text; the
/// refusal names the file and the key.
pub fn check_signature(key: &TrustedKey, what: &str, armored: &[u8]) -> Result<String, PassError> {
    let refused = |e: String| {
        PassError::new(
            UpdateFailure::BadSignature,
            format!(
                "refused {what}: bad signature (not signed by the pinned key {}): {e}",
                key.fingerprint()
            ),
        )
    };
    let armored =
        std::str::from_utf8(armored).map_err(|_| refused("the document is not text".into()))?;
    key.verify_inline(armored).map_err(refused)
}

/// Runs passes for one host.
pub struct Updater {
    cfg: Arc<Config>,
    up: UpdaterConfig,
    host: String,
    format: Format,
    arch: String,
    pm: PackageManager,
    serials: SerialStore,
    marker: PassMarker,
    events: Events,
    /// The running agent's control socket, to watch services start (`None`: no agent runs).
    socket: Option<std::path::PathBuf>,
    /// The package-manager runs of this process, and whether it is stopping.
    spawned: Option<Spawned>,
    /// The reporter, told as soon as packages changed (before the starts are confirmed).
    progress: Option<(SharedHost, Arc<Notify>)>,
}

impl Updater {
    /// An updater for the configured host. `socket` is the running agent's control socket
    /// (None for `update --now` without an agent); `spawned` this process's own children.
    pub async fn new(
        cfg: Arc<Config>,
        socket: Option<std::path::PathBuf>,
        spawned: Option<Spawned>,
        events: Events,
    ) -> Option<Updater> {
        let up = cfg.updater.clone()?;
        let (format, arch) = host_system(&up).await;
        let system = match format {
            Format::Deb => System::Dpkg,
            Format::Rpm => System::Rpm,
        };
        let mut pm = PackageManager::new(system, up.package_timeout);
        pm.spawned = spawned.clone();
        pm.rpm_dbpath = up.rpm_dbpath.clone();
        Some(Updater {
            host: cfg.host_name(),
            serials: serial_store(&cfg.state_dir),
            marker: PassMarker::new(&cfg.state_dir),
            cfg,
            up,
            format,
            arch,
            pm,
            events,
            socket,
            spawned,
            progress: None,
        })
    }

    /// Makes the pass update `state` and wake the reporter as soon as its package changes are
    /// done, so the server learns of an install without waiting for the start confirmation.
    pub fn report_progress_to(&mut self, state: SharedHost, report_now: Arc<Notify>) {
        self.progress = Some((state, report_now));
    }

    /// This host's name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The package format.
    pub fn format(&self) -> Format {
        self.pm.system.format()
    }

    /// The architecture.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// At agent start: if a pass was interrupted (the marker is there: the agent was killed
    /// mid-install, or the last pass failed), repair now. Returns what happened, if anything.
    pub async fn recover(&self) -> Option<Result<String, PassError>> {
        self.marker.pending()?;
        let _lock = match pass_lock(&self.cfg.state_dir) {
            Ok(l) => l,
            Err(e) => return Some(Err(e)),
        };
        self.repair().await
    }

    /// Repairs if the marker says so: `Some(Ok(line))` repaired, `Some(Err)` repair failed.
    async fn repair(&self) -> Option<Result<String, PassError>> {
        let pending = self.marker.pending()?;
        let what: Vec<&str> = pending
            .lines()
            .skip(1)
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let cmd = match self.pm.system {
            System::Dpkg => "dpkg --configure -a",
            System::Rpm => {
                "rpm (nothing to run: the next plan reinstalls what is not fully installed)"
            }
        };
        eprintln!(
            "keepup-agent: update: the previous pass did not finish ({}); repairing with {cmd}",
            what.join("; ")
        );
        let o = self.pm.repair().await;
        if o.is_ok() {
            let _ = self.marker.clear();
            let line = format!("repaired: {cmd} (after: {})", what.join("; "));
            eprintln!("keepup-agent: update: {line}");
            self.events.push(EventKind::Repair, None, line.clone());
            Some(Ok(line))
        } else {
            let why = format!("repair ({cmd}) {o}: {}", last_lines(o.output_tail(), 5));
            eprintln!("keepup-agent: update: {why}");
            self.events.push(EventKind::RepairFailed, None, why.clone());
            Some(Err(PassError::new(UpdateFailure::Repair, why)))
        }
    }

    /// Runs one pass.
    pub async fn pass(&self) -> PassResult {
        let mut r = PassResult {
            host: self.host.clone(),
            ok: true,
            ..PassResult::default()
        };
        match pass_lock(&self.cfg.state_dir) {
            Err(e) => r.fail(e),
            Ok(_lock) => {
                if let Err(e) = self.pass_locked(&mut r).await {
                    r.fail(e);
                }
            }
        }
        r.at = now_unix();
        // What changed goes to the agent's log (the journal) too.
        for l in &r.results {
            eprintln!("keepup-agent: update: {l}");
        }
        if let Some(e) = &r.error {
            eprintln!(
                "keepup-agent: update: pass failed ({}): {e}",
                r.failure.as_ref().map_or("?", |f| f.as_str())
            );
            self.events.push(EventKind::UpdateFailed, None, e.clone());
        }
        r
    }

    /// GETs `path` from the repository (a small metadata file).
    async fn fetch_meta(&self, path: &str) -> Result<Vec<u8>, PassError> {
        let url = format!("{}{path}", self.up.repo);
        http::get(&url, MAX_META, META_TIMEOUT).await.map_err(|e| {
            PassError::new(
                UpdateFailure::Unreachable,
                format!("cannot fetch {url}: {e} (repository unreachable? installed services keep running; retried next pass)"),
            )
        })
    }

    /// The keys to check signatures with: `pinned` and what rotation statements taught (see
    /// [`keys`](super::keys)), after reading the repository's current statement. Also, when
    /// the statement's overlap ended before this host learned its new key, what to tell.
    async fn keys(&self, pinned: TrustedKey) -> Result<(TrustedKey, Option<String>), PassError> {
        let store = key_store(&self.cfg.state_dir);
        let mut learned = store.load().map_err(PassError::local)?;
        let now = unix_now();
        let trusted = keys::trusted(pinned.clone(), &learned, now);
        // No statement (none published, or the repository unreachable: the policy fetch
        // says so) leaves the keys as they are.
        let Ok(bytes) = self.fetch_meta(ROTATION).await else {
            return Ok((trusted, None));
        };
        let armored = String::from_utf8_lossy(&bytes);
        match Rotation::judge(&armored, &trusted, now) {
            Ok(Judgement::Known) => Ok((trusted, None)),
            Ok(Judgement::TooLate(r)) => Ok((trusted, Some(r.too_late()))),
            Ok(Judgement::Learn { rotation, .. }) => {
                let note = format!(
                    "learned the repository's new key {} from {ROTATION} (signed by {}, \
                     trusted until {})",
                    rotation.new,
                    rotation.old,
                    keepup_deploy::wire::verify::utc(rotation.old_until)
                );
                learned.rotations.push(rotation);
                store.save(&learned).map_err(PassError::local)?;
                eprintln!("keepup-agent: update: {note}");
                self.events.push(EventKind::KeyLearned, None, note);
                Ok((keys::trusted(pinned, &learned, now), None))
            }
            Err(e) => {
                self.refused(None, &e);
                Ok((trusted, None))
            }
        }
    }

    /// The fleet policy: `fleet.yaml.asc`, its inline signature checked against the pinned
    /// key, then its serial (against the highest seen and the configured minimum) and expiry.
    async fn fetch_policy(&self, key: &TrustedKey, seen: &Serials) -> Result<Fleet, PassError> {
        let bytes = self.fetch_meta(SIGNED_POLICY).await?;
        let refused = |e: String| format!("refused {SIGNED_POLICY}: {e}");
        let text = check_signature(key, SIGNED_POLICY, &bytes)
            .inspect_err(|e| self.refused(None, &e.why))?;
        let fleet = Fleet::from_yaml(&text)
            .map_err(refused)
            .and_then(|fleet| {
                seen.check_fleet(fleet.serial)
                    .and_then(|_| check_min(SIGNED_POLICY, fleet.serial, self.up.min_serials.fleet))
                    .and_then(|_| check_expiry(fleet.expires, unix_now()).map_err(refused))
                    .map(|_| fleet)
            })
            .inspect_err(|e| self.refused(None, e))
            .map_err(PassError::refused)?;
        Ok(fleet)
    }

    /// The index of `track` that `fleet` binds: fetched by its hash, which must match, then
    /// its track and serial (against the binding, the highest seen and the configured
    /// minimum) and expiry. A policy and an index from different publishes never mix.
    async fn fetch_index(
        &self,
        fleet: &Fleet,
        track: &str,
        seen: &Serials,
    ) -> Result<Index, PassError> {
        let label = format!("tracks/{track}/index.json");
        let refused = |e: String| format!("refused {label}: {e}");
        let Some(binding) = fleet.tracks.get(track) else {
            let e = refused(format!(
                "{SIGNED_POLICY} (serial {}) binds no index for track {track:?} (a repository \
                 from before the binding, or a track with nothing published: run `keepup repo \
                 refresh` on the repository)",
                fleet.serial
            ));
            self.refused(None, &e);
            return Err(PassError::refused(e));
        };
        let bytes = self.fetch_meta(&binding.path(track)).await?;
        let check = || -> Result<Index, String> {
            let got = fetch::sha256_bytes(&bytes);
            if got != binding.sha256 {
                return Err(refused(format!(
                    "it hashes to {got}, but {SIGNED_POLICY} (serial {}) binds sha256 {} \
                     (serial {}): a mixed or tampered snapshot",
                    fleet.serial, binding.sha256, binding.serial
                )));
            }
            let index = Index::from_json(&bytes).map_err(refused)?;
            if index.track != track || index.serial != binding.serial {
                return Err(refused(format!(
                    "it is the index of track {:?} serial {}, {SIGNED_POLICY} binds track \
                     {track:?} serial {}",
                    index.track, index.serial, binding.serial
                )));
            }
            seen.check_track(track, index.serial)
                .and_then(|_| check_min(&label, index.serial, self.up.min_serials.track(track)))
                .and_then(|_| check_expiry(index.expires, unix_now()).map_err(refused))?;
            Ok(index)
        };
        check()
            .inspect_err(|e| self.refused(None, e))
            .map_err(PassError::refused)
    }

    /// The track's rollout progress (`tracks/<t>/rollout.json.asc`), checked against the
    /// rollout key `index` names and the serial seen (recorded when it checks out). None when
    /// there is none yet or it is refused (a refusal is an event): every rollout is then
    /// where it starts, its first wave open, which the repository key signed.
    async fn fetch_progress(&self, index: &Index, seen: &mut Serials) -> Option<RolloutState> {
        let track = &index.track;
        let path = keepup_deploy::wire::rollout::state_path(track);
        let url = format!("{}{path}", self.up.repo);
        let bytes = match http::get(&url, MAX_META, META_TIMEOUT).await {
            Ok(b) => b,
            Err(HttpError::Status(code)) if code.as_u16() == 404 => return None,
            Err(e) => {
                self.refused(
                    None,
                    &format!("cannot fetch {url}: {e}; waves as first opened"),
                );
                return None;
            }
        };
        let seen_serial = seen.rollouts.get(track).copied().unwrap_or(0);
        let text = String::from_utf8_lossy(&bytes);
        match waves::check_progress(&text, index, track, seen_serial, unix_now()) {
            Ok(doc) => {
                if doc.serial > seen_serial {
                    seen.rollouts.insert(track.clone(), doc.serial);
                    let _ = self.serials.save(seen);
                }
                Some(doc)
            }
            Err(e) => {
                self.refused(None, &format!("{e}; waves as first opened"));
                None
            }
        }
    }

    fn refused(&self, service: Option<&str>, why: &str) {
        eprintln!("keepup-agent: update: {why}");
        self.events.push(EventKind::Refused, service, why);
    }

    async fn pass_locked(&self, r: &mut PassResult) -> Result<(), PassError> {
        if let Some(repaired) = self.repair().await {
            r.results.push(repaired?);
        }
        let key_path = &self.up.trusted_key;
        let key_text = std::fs::read_to_string(key_path).map_err(|e| {
            PassError::local(format!(
                "cannot read trusted_key {}: {e}",
                key_path.display()
            ))
        })?;
        let pinned = TrustedKey::from_armored(&key_text)
            .map_err(|e| PassError::local(format!("trusted_key {}: {e}", key_path.display())))?;
        let (key, too_late) = self.keys(pinned).await?;
        let mut seen = self.serials.load().map_err(PassError::local)?;

        let fleet = self
            .fetch_policy(&key, &seen)
            .await
            .map_err(|e| match &too_late {
                Some(why) if e.kind == UpdateFailure::BadSignature => e.and(why),
                _ => e,
            })?;
        // A policy that checks out is recorded at once: an older one is a replay even if
        // this pass goes no further (its index refused, the repository unreachable).
        if seen.record(fleet.serial, None) {
            self.serials.save(&seen).map_err(PassError::local)?;
        }
        let (assignment, quarantined) = fleet.for_host(&self.host);
        r.fleet_serial = Some(fleet.serial);
        r.quarantined = quarantined.iter().map(|s| s.to_string()).collect();
        r.track = assignment.map(|a| a.track.clone());

        let index = match assignment {
            None => None,
            Some(a) => {
                let index = self.fetch_index(&fleet, &a.track, &seen).await?;
                r.index_serial = Some(index.serial);
                Some(index)
            }
        };
        if seen.record(
            fleet.serial,
            index.as_ref().map(|i| (i.track.as_str(), i.serial)),
        ) {
            self.serials.save(&seen).map_err(PassError::local)?;
        }

        // Only packages the repository or the manifest directory knows are looked at, so a
        // quarantine can never remove a package that is not one of keepup's services.
        let mut names: BTreeSet<String> = index
            .iter()
            .flat_map(|i| i.packages.iter().map(|p| p.name.clone()))
            .collect();
        names.extend(self.manifest_names());
        let installed = self.installed(&names).await.map_err(PassError::local)?;
        let applied = match &index {
            None => waves::Applied::default(),
            Some(i) if i.rollouts.is_empty() => waves::Applied {
                packages: i.packages.clone(),
                ..Default::default()
            },
            Some(i) => {
                let progress = self.fetch_progress(i, &mut seen).await;
                waves::apply(i, progress.as_ref(), &self.host, self.format, &installed)
            }
        };
        r.rollouts = applied.report;
        let packages = applied.packages;
        let services: Vec<String> = assignment.map(|a| a.services.clone()).unwrap_or_default();
        let actions = plan::plan(&PlanInput {
            format: self.format,
            arch: &self.arch,
            services: &services,
            packages: &packages,
            quarantined: &r.quarantined,
            installed: &installed,
            holds: &applied.holds,
        });
        r.plan = actions.iter().map(|a| a.to_string()).collect();

        let changing: Vec<&Action> = actions.iter().filter(|a| a.changes()).collect();
        // Installed packages, with when their install command began.
        let mut to_confirm: Vec<(PackageEntry, Instant)> = Vec::new();
        if !changing.is_empty() {
            let lines: Vec<String> = changing.iter().map(|a| a.to_string()).collect();
            self.marker.begin(&lines).map_err(|e| {
                PassError::local(format!("writing {}: {e}", self.marker.path().display()))
            })?;
            let mut broken: Option<String> = None;
            for a in changing {
                if let Err(f) = self.act(a, r, &mut to_confirm).await {
                    r.fail(PassError::new(UpdateFailure::Install, f.why.clone()));
                    // The package manager failed or hung: nothing more until the repair.
                    if f.broken {
                        broken = Some(f.why);
                        break;
                    }
                }
            }
            match broken {
                Some(why) => {
                    let _ = self.marker.failed(&why);
                }
                None => {
                    let _ = self.marker.clear();
                }
            }
        }
        let installed_after = self.installed(&names).await;
        if let Ok(i) = &installed_after {
            r.installed = Some(i.clone());
            if let (Some((state, report_now)), true) = (&self.progress, r.plan_changed()) {
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                s.installed = i.clone();
                s.track = r.track.clone();
                s.quarantined = r.quarantined.clone();
                drop(s);
                report_now.notify_one();
            }
        }
        self.prune_cache(&packages);

        let since = Instant::now();
        for (p, began) in to_confirm {
            let s = self.confirm_start(&p, began, since).await;
            let line = format!(
                "{} {}: {}{}",
                p.name,
                p.version,
                if s.started {
                    "started"
                } else {
                    "failed to start"
                },
                if s.detail.is_empty() || s.detail == "started" {
                    String::new()
                } else {
                    format!(" ({})", s.detail)
                }
            );
            let unsupervised = self.socket.is_none();
            if unsupervised {
                r.results
                    .push(format!("{} {}: {}", p.name, p.version, s.detail));
            } else if s.started {
                self.events
                    .push(EventKind::Started, Some(&p.name), line.clone());
                r.results.push(line);
            } else {
                self.events
                    .push(EventKind::FailedToStart, Some(&p.name), line.clone());
                eprintln!("keepup-agent: update: {line}");
                r.results.push(line.clone());
                r.fail(PassError::new(UpdateFailure::NotStarted, line));
            }
            r.starts.insert(p.name.clone(), s);
        }
        installed_after.map(|_| ()).map_err(PassError::local)
    }

    /// Service names that have a manifest installed.
    fn manifest_names(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.cfg.manifest_dir) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| {
                let p = e.path();
                (p.extension()? == "yaml").then_some(())?;
                Some(p.file_stem()?.to_str()?.to_string())
            })
            .collect()
    }

    /// Fully installed versions of `names`.
    pub async fn installed(
        &self,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, String>, String> {
        let mut out = BTreeMap::new();
        for n in names {
            if let Some(v) = self.pm.installed_version(n).await? {
                out.insert(n.clone(), v);
            }
        }
        Ok(out)
    }

    /// Carries out one changing action.
    async fn act(
        &self,
        a: &Action,
        r: &mut PassResult,
        to_confirm: &mut Vec<(PackageEntry, Instant)>,
    ) -> Result<(), ActFailed> {
        let broken = |why: String| ActFailed { why, broken: true };
        match a {
            Action::Remove { name, version } => {
                let o = self.pm.remove(name).await;
                if !o.is_ok() {
                    let line = format!(
                        "{a}: package manager {o}: {}",
                        last_lines(o.output_tail(), 5)
                    );
                    r.results.push(line.clone());
                    return Err(broken(line));
                }
                if let Some(v) = self.pm.installed_version(name).await.map_err(broken)? {
                    return Err(broken(format!(
                        "{a}: still installed ({v}) after the removal"
                    )));
                }
                let line = format!("removed {name} {version} (quarantined)");
                self.events
                    .push(EventKind::Remove, Some(name), line.clone());
                r.results.push(line);
                Ok(())
            }
            Action::Install(p) | Action::Upgrade { to: p, .. } => {
                let kind = if matches!(a, Action::Install(_)) {
                    EventKind::Install
                } else {
                    EventKind::Upgrade
                };
                let url = format!("{}{}", self.up.repo, p.path.trim_start_matches('/'));
                let file_name = p.path.rsplit('/').next().unwrap_or_default();
                let want = Wanted {
                    url: &url,
                    size: p.size,
                    sha256: &p.sha256,
                };
                let file = match fetch::fetch(
                    &want,
                    &self.up.cache_dir,
                    file_name,
                    self.up.package_timeout,
                )
                .await
                {
                    Ok(f) => f,
                    Err(e) => {
                        let refusal = matches!(
                            e,
                            FetchError::Sha256Mismatch { .. }
                                | FetchError::TooLarge(_)
                                | FetchError::TooShort { .. }
                        );
                        let line = format!("{kind} {} {}: {e}", p.name, p.version);
                        if refusal {
                            self.refused(Some(&p.name), &line);
                        }
                        r.results.push(line.clone());
                        return Err(ActFailed {
                            why: line,
                            broken: false,
                        });
                    }
                };
                let began = Instant::now();
                let o = self.pm.install(&file).await;
                if !o.is_ok() {
                    let line = format!(
                        "{a}: package manager {o}: {}",
                        last_lines(o.output_tail(), 8)
                    );
                    r.results.push(line.clone());
                    return Err(broken(line));
                }
                let now = self.pm.installed_version(&p.name).await.map_err(broken)?;
                if now
                    .as_deref()
                    .map(|v| self.format.cmp_versions(v, &p.version))
                    != Some(std::cmp::Ordering::Equal)
                {
                    let line = format!(
                        "{a}: the package manager succeeded, but {} is {} (not fully installed at {})",
                        p.name,
                        now.as_deref().unwrap_or("not installed"),
                        p.version
                    );
                    r.results.push(line.clone());
                    return Err(broken(line));
                }
                let line = match a {
                    Action::Upgrade { from, .. } => {
                        format!("upgraded {} {from} -> {}", p.name, p.version)
                    }
                    _ => format!("installed {} {}", p.name, p.version),
                };
                self.events.push(kind, Some(&p.name), line.clone());
                r.results.push(line);
                if p.name == AGENT_PACKAGE {
                    // Not a service: its postinst restarts the agent (this one lets the
                    // package manager finish first), and the next agent reports the version.
                    r.results.push(format!(
                        "{} {}: the agent restarts into it",
                        p.name, p.version
                    ));
                } else {
                    to_confirm.push((p.clone(), began));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Removes cached packages the index no longer lists for this host.
    fn prune_cache(&self, packages: &[PackageEntry]) {
        let keep: BTreeSet<&str> = packages
            .iter()
            .filter(|p| p.format == self.format)
            .filter_map(|p| p.path.rsplit('/').next())
            .collect();
        let Ok(rd) = std::fs::read_dir(&self.up.cache_dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if !name.starts_with('.') && !keep.contains(name.as_ref()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Waits until `p`'s service has started or failed to (bounded by its probes' longest
    /// `grace` plus `start_timeout` after `since`), judging the agent's status snapshots; the
    /// run must have begun after the install command did (`began`).
    async fn confirm_start(&self, p: &PackageEntry, began: Instant, since: Instant) -> StartReport {
        let mut rep = StartReport {
            version: p.version.clone(),
            started: false,
            detail: String::new(),
            log_tail: Vec::new(),
            at: 0,
        };
        if keepup_packager::spec::is_keyring_name(&p.name) {
            rep.started = true;
            rep.detail = "installed (the repository's keyring: no service to start)".into();
            rep.at = now_unix();
            return rep;
        }
        let Some(socket) = &self.socket else {
            rep.detail = "installed; no agent running to start it".into();
            rep.at = now_unix();
            return rep;
        };
        let manifest_path = self.cfg.manifest_dir.join(format!("{}.yaml", p.name));
        let grace = std::fs::read_to_string(&manifest_path)
            .ok()
            .and_then(|t| Manifest::parse(&manifest_path.display().to_string(), &t).ok())
            .map(|m| m.checks.iter().map(|c| c.grace).max().unwrap_or_default());
        let Some(grace) = grace else {
            rep.detail = format!(
                "no readable manifest {} after the install: not a keepup service package?",
                manifest_path.display()
            );
            rep.at = now_unix();
            return rep;
        };
        let deadline = grace + self.up.start_timeout;
        let verdict = loop {
            let elapsed = since.elapsed();
            if self.spawned.as_ref().is_some_and(Spawned::stopping) {
                break Verdict::FailedToStart(
                    "not confirmed: the agent is stopping (its next report shows the service)"
                        .into(),
                );
            }
            let services = crate::control::request_within(socket, &Request::Status, STATUS_TIMEOUT)
                .await
                .map(|r| r.services)
                .unwrap_or_default();
            let v = match services.iter().find(|s| s.name == p.name) {
                Some(s) => {
                    // A rollback package carries the old version's manifest.
                    let want = match &p.rollback_of {
                        Some(old) if start::version_matches(&s.version, old) => old.as_str(),
                        _ => p.version.as_str(),
                    };
                    start::judge_new_run(
                        s,
                        want,
                        start::Began::ago(began.elapsed()),
                        elapsed,
                        deadline,
                    )
                }
                None if elapsed >= deadline => Verdict::FailedToStart(format!(
                    "the agent does not supervise {} (no manifest picked up)",
                    p.name
                )),
                None => Verdict::Waiting,
            };
            if v != Verdict::Waiting {
                break v;
            }
            tokio::time::sleep(START_POLL).await;
        };
        rep.at = now_unix();
        match verdict {
            Verdict::Started => {
                rep.started = true;
                rep.detail = "started".into();
            }
            Verdict::FailedToStart(why) => {
                rep.detail = why;
                let tail = start::log_tail(&self.cfg.log_dir, &p.name, 8192);
                let lines: Vec<&str> = tail.lines().collect();
                rep.log_tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..]
                    .iter()
                    .map(|l| l.to_string())
                    .collect();
            }
            Verdict::Waiting => {}
        }
        rep
    }
}

/// Why an action failed; `broken`: the package system may be left half-way, so the pass
/// stops and the next one repairs first.
struct ActFailed {
    why: String,
    broken: bool,
}

/// The last `n` non-empty lines of `text`, joined with " | ".
/// Unix time now (expiry checks).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::super::testgpg::{gpg_clearsign, gpg_key};
    use super::*;
    use std::process::Command;

    #[test]
    fn signatures_are_checked_against_the_pinned_key() {
        if Command::new("gpg").arg("--version").output().is_err() {
            eprintln!("skipping: no gpg (tests/run.sh installs gnupg)");
            return;
        }
        let home = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let pinned = gpg_key(home.path(), "repo@example.org").expect("gpg key");
        gpg_key(home.path(), "mallory@example.org").expect("gpg key");
        let key = TrustedKey::from_armored(&pinned).unwrap();
        let data = "serial: 5\nassignments: []\nquarantine: []\n";
        let good = gpg_clearsign(home.path(), "repo@example.org", data.as_bytes());
        // The line end before the signature is not part of the signed text.
        assert_eq!(
            check_signature(&key, SIGNED_POLICY, &good).unwrap(),
            data.trim_end()
        );
        // Tampered text, another key's signature, garbage: all refused, naming file and key.
        let tampered = String::from_utf8(good.clone())
            .unwrap()
            .replace("serial: 5", "serial: 9");
        let e = check_signature(&key, SIGNED_POLICY, tampered.as_bytes()).unwrap_err();
        assert_eq!(e.kind, UpdateFailure::BadSignature);
        let e = e.why;
        let prefix = format!(
            "refused fleet.yaml.asc: bad signature (not signed by the pinned key {})",
            key.fingerprint()
        );
        assert!(e.starts_with(&prefix), "{e}");
        let other = gpg_clearsign(home.path(), "mallory@example.org", data.as_bytes());
        let e = check_signature(&key, SIGNED_POLICY, &other)
            .unwrap_err()
            .why;
        assert!(e.starts_with(&prefix), "{e}");
        let e = check_signature(&key, SIGNED_POLICY, b"not a signature")
            .unwrap_err()
            .why;
        assert!(e.starts_with(&prefix), "{e}");
    }

    /// What rotations taught is trusted beside the pinned key, and each old key is dropped
    /// when its overlap ends (never the last key).
    #[test]
    fn learned_keys_are_trusted_and_old_ones_dropped_after_their_overlap() {
        if Command::new("gpg").arg("--version").output().is_err() {
            eprintln!("skipping: no gpg (tests/run.sh installs gnupg)");
            return;
        }
        let home = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let old_text = gpg_key(home.path(), "old@example.org").expect("gpg key");
        let new_text = gpg_key(home.path(), "new@example.org").expect("gpg key");
        let (old, new) = (
            TrustedKey::from_armored(&old_text).unwrap(),
            TrustedKey::from_armored(&new_text).unwrap(),
        );
        let learned = keys::Learned {
            rotations: vec![Rotation {
                old: old.fingerprint(),
                new: new.fingerprint(),
                old_until: 100,
                new_key: new_text.clone(),
            }],
        };
        let during = keys::trusted(old.clone(), &learned, 99);
        assert!(during.has(&old.fingerprint()) && during.has(&new.fingerprint()));
        let after = keys::trusted(old.clone(), &learned, 100);
        assert!(!after.has(&old.fingerprint()) && after.has(&new.fingerprint()));
        // Nothing learned: the pinned key stays, whatever the time.
        let alone = keys::trusted(old.clone(), &keys::Learned::default(), u64::MAX);
        assert_eq!(alone.fingerprint(), old.fingerprint());
        // The store round-trips.
        let dir = tempfile::tempdir().unwrap();
        let store = keys::key_store(dir.path());
        assert_eq!(store.load().unwrap(), keys::Learned::default());
        store.save(&learned).unwrap();
        assert_eq!(store.load().unwrap(), learned);
    }

    /// A repository over HTTP on 127.0.0.1: path -> bytes (404 otherwise), changeable while
    /// it runs.
    type Files = Arc<std::sync::Mutex<BTreeMap<String, Vec<u8>>>>;

    async fn serve(files: Files) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let files = files.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let body = files.lock().unwrap().get(&path).cloned();
                    let head = match &body {
                        Some(b) => {
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", b.len())
                        }
                        None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".into(),
                    };
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(&body.unwrap_or_default()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        format!("http://{addr}/")
    }

    /// Whole passes against a local repository: signed policy and index, a package whose bytes
    /// do not match, a replayed index, a host with no assignment, a tampered policy. Needs gpg
    /// (to sign) and dpkg-query (nothing is installed: the package name is made up).
    #[tokio::test]
    async fn passes_refuse_what_does_not_check_out() {
        let have = |t: &str| Command::new(t).arg("--version").output().is_ok();
        if !have("gpg") || !have("dpkg-query") {
            eprintln!("skipping: needs gpg and dpkg-query");
            return;
        }
        let home = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let uid = "repo@example.org";
        let public = gpg_key(home.path(), uid).expect("gpg key");
        let files: Files = Arc::default();
        let put = |path: &str, data: &[u8]| {
            files
                .lock()
                .unwrap()
                .insert(format!("/{path}"), data.to_vec());
        };
        let sha = |b: &[u8]| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b));
        let by_hash =
            |index: &str| format!("tracks/stable/by-hash/SHA256/{}", sha(index.as_bytes()));
        let real = b"the real package".to_vec();
        let index = |serial: u64| {
            format!(
                r#"{{"track":"stable","serial":{serial},"generated":0,"packages":[{{"name":
                "keepup-unit-test-no-such-pkg","version":"1.0-1","arch":"amd64","format":"deb",
                "path":"pool/k.deb","size":{},"sha256":"{}"}}]}}"#,
                real.len(),
                sha(&real)
            )
        };
        // The policy text, serial `serial`, binding `index` (None: no binding).
        let policy = |serial: u64, index: Option<&str>| {
            let mut y = format!(
                "serial: {serial}\nassignments:\n  - hosts: web1\n    track: stable\n    \
                 services: []\nquarantine: []\n"
            );
            if let Some(i) = index {
                let i_serial = Index::from_json(i.as_bytes()).unwrap().serial;
                y += &format!(
                    "tracks:\n  stable: {{serial: {i_serial}, sha256: {}}}\n",
                    sha(i.as_bytes())
                );
            }
            y
        };
        // Publish as the repository does: the index by hash, then the signed policy.
        let publish = |text: &str, index: Option<&str>| {
            if let Some(i) = index {
                put(&by_hash(i), i.as_bytes());
            }
            put(
                SIGNED_POLICY,
                &gpg_clearsign(home.path(), uid, text.as_bytes()),
            );
        };
        let (i5, i6) = (index(5), index(6));
        publish(&policy(2, Some(&i5)), Some(&i5));
        put("pool/k.deb", b"the fake package");
        let repo = serve(files.clone()).await;

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key.asc"), &public).unwrap();
        let d = dir.path().display();
        let text = format!(
            "state_dir: {d}/state\nmanifest_dir: {d}/manifests\nlog_dir: {d}/log\n\
             socket: {d}/sock\nrepo: {repo}\ntrusted_key: {d}/key.asc\npackage_format: deb\n\
             arch: amd64\nhost: web1\n"
        );
        let cfg = Config::parse(Path::new("agent.yaml"), &text).unwrap();
        let updater = |cfg: Config| async {
            Updater::new(Arc::new(cfg), None, None, Events::default())
                .await
                .unwrap()
        };
        let u = updater(cfg.clone()).await;

        // The package's bytes are not what the signed index says: refused, nothing kept.
        let r = u.pass().await;
        assert_eq!(r.track.as_deref(), Some("stable"));
        assert_eq!(r.plan, ["install keepup-unit-test-no-such-pkg 1.0-1"]);
        assert_eq!((r.fleet_serial, r.index_serial), (Some(2), Some(5)));
        assert_eq!(r.failure, Some(UpdateFailure::Install));
        let e = r.error.unwrap();
        assert!(
            e.starts_with("install keepup-unit-test-no-such-pkg 1.0-1: refused: sha256 mismatch"),
            "{e}"
        );
        let cache = dir.path().join("state/cache");
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
        assert!(!dir.path().join("state/update-in-progress").exists());
        let serials = std::fs::read_to_string(dir.path().join("state/serials.json")).unwrap();
        assert!(serials.contains("\"stable\": 5"), "{serials}");

        // Mixed snapshots. The old policy (binding index 5) with index 6 served in its place:
        let i5_path = by_hash(&i5);
        put(&i5_path, i6.as_bytes());
        let mixed = format!(
            "refused tracks/stable/index.json: it hashes to {}, but fleet.yaml.asc (serial 2) \
             binds sha256 {} (serial 5): a mixed or tampered snapshot",
            sha(i6.as_bytes()),
            sha(i5.as_bytes())
        );
        assert_eq!(u.pass().await.error.as_deref(), Some(mixed.as_str()));
        // A new policy (binding index 6) with the old index 5 served in its place:
        publish(&policy(3, Some(&i6)), None);
        put(&by_hash(&i6), i5.as_bytes());
        let mixed = format!(
            "refused tracks/stable/index.json: it hashes to {}, but fleet.yaml.asc (serial 3) \
             binds sha256 {} (serial 6): a mixed or tampered snapshot",
            sha(i5.as_bytes()),
            sha(i6.as_bytes())
        );
        let r = u.pass().await;
        assert_eq!(r.error.as_deref(), Some(mixed.as_str()));
        assert_eq!(r.failure, Some(UpdateFailure::Refused));
        assert!(r.plan.is_empty());

        // An older policy, properly signed, served again: a replay.
        put(&i5_path, i5.as_bytes());
        publish(&policy(2, Some(&i5)), None);
        let r = u.pass().await;
        assert_eq!(
            r.error.as_deref(),
            Some(
                "refused fleet.yaml.asc: serial 2 is lower than 3 already seen \
                 (replayed or rolled-back repository?)"
            )
        );
        // A newer policy that binds an older index (a repository restored from a backup).
        let i3 = index(3);
        publish(&policy(4, Some(&i3)), Some(&i3));
        let r = u.pass().await;
        assert_eq!(
            r.error.as_deref(),
            Some(
                "refused tracks/stable/index.json: serial 3 is lower than 5 already seen \
                 (replayed or rolled-back repository?)"
            )
        );
        assert!(r.plan.is_empty());

        // A newer index that expired (a frozen repository): refused with the time.
        let expired = index(7).replace(
            r#""generated":0,"#,
            r#""generated":0,"expires":1700000000,"#,
        );
        assert!(expired.contains("expires"), "the index fixture changed");
        publish(&policy(5, Some(&expired)), Some(&expired));
        let r = u.pass().await;
        assert_eq!(
            r.error.as_deref(),
            Some(
                "refused tracks/stable/index.json: repository metadata expired at \
                 2023-11-14T22:13:20Z (frozen or unmaintained repository?)"
            )
        );
        assert!(r.plan.is_empty() && !r.ok);
        let serials = std::fs::read_to_string(dir.path().join("state/serials.json")).unwrap();
        assert!(serials.contains("\"stable\": 5"), "{serials}");

        // A new host (no serials.json) whose configuration carries a minimum serial: the
        // older snapshot is refused on first contact, and its index serial is not recorded.
        let fresh = tempfile::tempdir().unwrap();
        let old_state = format!("state_dir: {d}/state\n");
        assert!(text.contains(&old_state), "the config fixture changed");
        let pinned = text.replace(
            &old_state,
            &format!("state_dir: {}/state\n", fresh.path().display()),
        ) + "min_serials: {tracks: {stable: 9}}\n";
        let cfg_pinned = Config::parse(Path::new("agent.yaml"), &pinned).unwrap();
        let r = updater(cfg_pinned).await.pass().await;
        assert_eq!(
            r.error.as_deref(),
            Some(
                "refused tracks/stable/index.json: serial 7 is lower than the minimum 9 of \
                 this host's configuration (min_serials; an old snapshot served to a new host?)"
            )
        );
        // Only the policy, which checked out, is recorded.
        let serials = std::fs::read_to_string(fresh.path().join("state/serials.json")).unwrap();
        assert!(
            r.plan.is_empty() && !serials.contains("stable"),
            "{serials}"
        );

        // A host no assignment matches: nothing to do, track none, and that is fine.
        let mut other = cfg.clone();
        other.host = Some("db1".into());
        let r = updater(other).await.pass().await;
        assert!(r.ok && r.track.is_none() && r.plan.is_empty(), "{r:?}");
        assert!(
            r.render().contains("not assigned to a track"),
            "{}",
            r.render()
        );

        // A policy that binds no index for the host's track.
        publish(&policy(6, None), None);
        let e = u.pass().await.error.unwrap();
        assert!(
            e.starts_with(
                "refused tracks/stable/index.json: fleet.yaml.asc (serial 6) binds no index \
                 for track \"stable\""
            ),
            "{e}"
        );

        // A policy edited after signing.
        let signed = gpg_clearsign(home.path(), uid, policy(7, Some(&i6)).as_bytes());
        let edited = String::from_utf8(signed).unwrap().replace("web1", "web*");
        put(SIGNED_POLICY, edited.as_bytes());
        let r = u.pass().await;
        assert_eq!(r.failure, Some(UpdateFailure::BadSignature));
        let e = r.error.unwrap();
        assert!(
            e.starts_with("refused fleet.yaml.asc: bad signature (not signed by the pinned key"),
            "{e}"
        );
        assert_eq!(r.fleet_serial, None);

        // An expired policy, properly signed.
        let expired =
            policy(8, Some(&i6)).replace("serial: 8\n", "serial: 8\nexpires: 1700000000\n");
        assert!(expired.contains("expires"), "the policy fixture changed");
        publish(&expired, Some(&i6));
        let r = u.pass().await;
        assert_eq!(
            r.error.as_deref(),
            Some(
                "refused fleet.yaml.asc: repository metadata expired at 2023-11-14T22:13:20Z \
                 (frozen or unmaintained repository?)"
            )
        );
    }

    #[test]
    fn one_pass_at_a_time() {
        let d = tempfile::tempdir().unwrap();
        let held = pass_lock(d.path()).unwrap();
        let e = pass_lock(d.path()).unwrap_err();
        assert_eq!(e.kind, UpdateFailure::Busy);
        assert!(e.why.contains("another update pass is running"), "{e}");
        drop(held);
        pass_lock(d.path()).unwrap();
    }

    #[test]
    fn render_lists_plan_results_and_verdict() {
        let r = PassResult {
            host: "web1".into(),
            track: Some("stable".into()),
            ok: false,
            error: Some("install foo 1.1-1: refused: sha256 mismatch".into()),
            plan: vec!["install foo 1.1-1".into()],
            results: vec!["install foo 1.1-1: refused: sha256 mismatch".into()],
            fleet_serial: Some(1),
            ..PassResult::default()
        };
        assert_eq!(
            r.render(),
            "host web1 follows track stable\ninstall foo 1.1-1\n  install foo 1.1-1: refused: \
             sha256 mismatch\nupdate: failed: install foo 1.1-1: refused: sha256 mismatch\n"
        );
        assert_eq!(last_lines("a\n\nb\nc\n", 2), "b | c");
    }
}
