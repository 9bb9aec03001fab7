//! One supervised service: a task that owns its launch script's process, respawns it, gives
//! up and gets re-kicked, runs its probes and kills its role when they fail, and answers the
//! control commands that concern it. `policy.rs` makes the decisions; this is where they are
//! carried out (spawn, log, kill, `systemctl`).

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keepup_checks::{Probe, ProbeResult, RunAs};
use keepup_packager::manifest::{Manifest, ManifestCheck, ManifestProbe, Supervised};
use keepup_packager::spec::format_duration;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::config::Config;
use crate::logfile::{self, LogFile, SharedLog};
use crate::policy::{self, AfterExit, StartHistory};
use crate::proto::{ProbeStatus, Response, ServiceStatus};
use crate::reaper::Spawned;
use crate::refuse::{self, Roles};
use crate::role;
use crate::systemd::{self, UnitState};
use keepup_deploy::wire::{EventKind, ServiceState};

/// `PATH` for launch scripts (they set their own too).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How often a systemd unit's state is looked at.
const SYSTEMD_POLL: Duration = Duration::from_secs(5);
/// How long to wait for a killed launch script to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(5);
/// Delay before trying again when the role user does not exist or the launch script cannot
/// be spawned (counts as a start, so the give-up limit applies).
const SPAWN_RETRY: Duration = Duration::from_secs(5);

/// What every service task shares with the agent.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Agent configuration.
    pub cfg: Arc<Config>,
    /// Children waited for by their owners (the reaper leaves them alone).
    pub spawned: Spawned,
    /// Which service holds which role.
    pub roles: Roles,
    /// The first login uid (`UID_MIN`); roles at or above it are refused.
    pub uid_min: u32,
    /// The role registry directory ([`refuse::ROLE_REGISTRY`]).
    pub role_registry: PathBuf,
    /// When the agent started: the re-kick timer ticks every `rekick_every` from here.
    pub epoch: Instant,
    /// Recent events, for reports (give-ups, health kills).
    pub events: crate::events::Events,
}

/// Requests from the agent to a service task.
#[derive(Debug)]
pub enum ServiceCommand {
    /// Admin-down.
    Down(oneshot::Sender<Response>),
    /// Clear admin-down and start.
    Up(oneshot::Sender<Response>),
    /// Start again if given up (timer or `rekick`).
    Rekick(Option<oneshot::Sender<Response>>),
    /// Run the probes now.
    Check(oneshot::Sender<Response>),
    /// The manifest file changed.
    Reload(Box<Manifest>),
    /// The manifest was removed (`remove`: stop the service, role kill) or the agent is
    /// shutting down (agent-supervised services are stopped, systemd units left alone).
    Stop {
        /// Whether the service is going away for good.
        remove: bool,
        /// Signalled when done.
        done: oneshot::Sender<()>,
    },
}

impl ServiceCommand {
    /// The way back to the client, if the command has one.
    pub fn into_reply(self) -> Option<oneshot::Sender<Response>> {
        match self {
            ServiceCommand::Down(r)
            | ServiceCommand::Up(r)
            | ServiceCommand::Check(r)
            | ServiceCommand::Rekick(Some(r)) => Some(r),
            _ => None,
        }
    }
}

/// ServiceState visible to `status`, updated by the service task.
#[derive(Debug, Clone)]
pub struct Shared {
    name: String,
    version: String,
    supervisor: &'static str,
    state: ServiceState,
    pid: Option<u32>,
    started: Option<Instant>,
    /// A run counts as `starting` until it has run this long.
    settle: Duration,
    restarts: u64,
    last_exit: Option<String>,
    note: Option<String>,
    probes: Vec<ProbeSlot>,
    /// Set by the output reader when the current run printed `not sane:`.
    not_sane: Option<Arc<AtomicBool>>,
}

#[derive(Debug, Clone)]
struct ProbeSlot {
    name: String,
    probe: String,
    ok: Option<bool>,
    reason: Option<String>,
    failures: u32,
    at: Option<Instant>,
}

impl Shared {
    /// The status snapshot at `now`.
    pub fn snapshot(&self, now: Instant) -> ServiceStatus {
        let mut state = self.state.clone();
        let uptime = self.started.map(|s| now.saturating_duration_since(s));
        let said_not_sane = self
            .not_sane
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Relaxed));
        if state == ServiceState::Running && said_not_sane {
            // The launch script is in its not-sane sleep, about to exit.
            state = ServiceState::NotSane;
        } else if state == ServiceState::Running && uptime.is_some_and(|u| u < self.settle) {
            state = ServiceState::Starting;
        }
        ServiceStatus {
            name: self.name.clone(),
            version: self.version.clone(),
            supervisor: self.supervisor.into(),
            state,
            pid: self.pid,
            uptime_secs: uptime.map(|u| u.as_secs_f64()),
            restarts: self.restarts,
            last_exit: self.last_exit.clone(),
            note: self.note.clone(),
            probes: self
                .probes
                .iter()
                .map(|p| ProbeStatus {
                    name: p.name.clone(),
                    probe: p.probe.clone(),
                    ok: p.ok,
                    reason: p.reason.clone(),
                    failures: p.failures,
                    age_secs: p.at.map(|t| now.saturating_duration_since(t).as_secs_f64()),
                })
                .collect(),
        }
    }
}

/// The agent's handle on a running service task.
#[derive(Debug)]
pub struct Handle {
    /// Commands to the task.
    pub tx: mpsc::Sender<ServiceCommand>,
    /// What `status` shows.
    pub shared: Arc<Mutex<Shared>>,
    /// The manifest the task was last given.
    pub manifest: Manifest,
    /// The task: finished once a `Stop` is done.
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the task for `manifest`, read from `path`.
pub fn spawn(ctx: Ctx, manifest: Manifest, path: PathBuf) -> Handle {
    let (tx, rx) = mpsc::channel(16);
    // The agent said at start if the group is missing (`control::status_gid`).
    let log_gid = ctx
        .cfg
        .status_group
        .as_deref()
        .and_then(|g| nix::unistd::Group::from_name(g).ok().flatten())
        .map(|g| g.gid.as_raw());
    let log = LogFile::open(
        ctx.cfg.log_dir.join(format!("{}.log", manifest.name)),
        ctx.cfg.log_max_bytes,
        ctx.cfg.log_keep,
        log_gid,
    )
    .shared();
    let shared = Arc::new(Mutex::new(Shared {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        supervisor: supervisor_name(&manifest),
        state: ServiceState::Backoff,
        pid: None,
        started: None,
        settle: settle(&manifest, ctx.cfg.respawn.fast_crash),
        restarts: 0,
        last_exit: None,
        note: None,
        probes: Vec::new(),
        not_sane: None,
    }));
    let svc = Service {
        down_mark: ctx.cfg.down_dir().join(&manifest.name),
        ctx,
        m: manifest.clone(),
        shared: shared.clone(),
        log,
        history: StartHistory::new(),
        fast_streak: 0,
        run: None,
        respawn_at: None,
        down: false,
        given_up: false,
        refused: None,
        ids: None,
        path,
        checks: Vec::new(),
        in_flight: JoinSet::new(),
        generation: 0,
        starts: 0,
        unit_poll_at: None,
        rekick_at: None,
        path_key: None,
    };
    let task = tokio::spawn(svc.main(rx));
    Handle {
        tx,
        shared,
        manifest,
        task,
    }
}

fn supervisor_name(m: &Manifest) -> &'static str {
    match m.supervisor.kind {
        Supervised::Agent => "agent",
        Supervised::Systemd => "systemd",
    }
}

/// How long a run counts as `starting`: the fast-crash threshold or the longest probe grace.
fn settle(m: &Manifest, fast_crash: Duration) -> Duration {
    m.checks
        .iter()
        .map(|c| c.grace)
        .fold(fast_crash, Duration::max)
}

/// A launch script the agent waits for: spawned into its cgroup with `clone3`, or by tokio
/// (no cgroups, or `clone3` refused).
#[derive(Debug)]
enum Launched {
    Tokio(Child),
    Pidfd(crate::reaper::PidfdChild),
}

impl Launched {
    fn id(&self) -> i32 {
        match self {
            Launched::Tokio(c) => c.id().map_or(0, |p| p as i32),
            Launched::Pidfd(c) => c.id(),
        }
    }

    fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        match self {
            Launched::Tokio(c) => c.try_wait(),
            Launched::Pidfd(c) => c.try_wait(),
        }
    }

    async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self {
            Launched::Tokio(c) => c.wait().await,
            Launched::Pidfd(c) => c.wait().await,
        }
    }
}

/// The current run of the launch script.
#[derive(Debug)]
struct Run {
    child: Launched,
    pid: i32,
    started: Instant,
    not_sane: Arc<AtomicBool>,
    /// Why the agent killed this run, if it did.
    killed_for: Option<String>,
}

/// One probe with its schedule and its streak.
#[derive(Debug)]
struct Check {
    spec: ManifestCheck,
    probe: Result<Probe, ProbeProblem>,
    next: Option<Instant>,
    running: bool,
    failures: u32,
}

struct Service {
    ctx: Ctx,
    m: Manifest,
    shared: Arc<Mutex<Shared>>,
    log: SharedLog,
    down_mark: PathBuf,
    history: StartHistory,
    fast_streak: u32,
    run: Option<Run>,
    respawn_at: Option<Instant>,
    down: bool,
    given_up: bool,
    /// Why the manifest is not supervised at all (see `refuse.rs`); cleared by a re-kick, `up`
    /// or a manifest change, which look again.
    refused: Option<String>,
    /// The role's uid and gid, from the last successful lookup (kept for stopping after the
    /// role user was deleted).
    ids: Option<(u32, u32)>,
    /// The manifest file, re-read before each start.
    path: PathBuf,
    checks: Vec<Check>,
    in_flight: JoinSet<(usize, u64, ProbeResult)>,
    /// Bumped on each start and each health kill; older probe results are ignored.
    generation: u64,
    starts: u64,
    unit_poll_at: Option<Instant>,
    /// The next re-kick tick, while there is something to re-kick (given up, refused, or a
    /// systemd unit); otherwise the service does not wake up for the timer.
    rekick_at: Option<Instant>,
    /// The manifest file as last read before a start: re-parsed only when it changed.
    path_key: Option<FileKey>,
}

/// Identity of a version of a file: (inode, size, mtime, ctime).
type FileKey = (u64, u64, i64, i64, i64, i64);

fn file_key(path: &std::path::Path) -> Option<FileKey> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

async fn wait_run(run: &mut Option<Run>) -> std::io::Result<ExitStatus> {
    match run {
        Some(r) => r.child.wait().await,
        None => std::future::pending().await,
    }
}

impl Service {
    fn systemd(&self) -> bool {
        self.m.supervisor.kind == Supervised::Systemd
    }

    fn unit(&self) -> String {
        self.m
            .supervisor
            .unit
            .clone()
            .unwrap_or_else(|| format!("{}.service", self.m.name))
    }

    fn note(&self, message: &str) {
        logfile::lock(&self.log).note(message);
    }

    fn update(&self, f: impl FnOnce(&mut Shared)) {
        f(&mut self.shared.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn set_state(&self, state: ServiceState, note: Option<String>) {
        self.update(|s| {
            s.state = state;
            s.note = note;
        });
    }

    async fn main(mut self, mut rx: mpsc::Receiver<ServiceCommand>) {
        self.down = self.down_mark.exists();
        if self.down {
            self.note("admin-down mark present: not starting");
            self.set_state(ServiceState::Down, Some(self.down_note()));
        } else if self.systemd() {
            self.systemd_begin(false).await;
        } else {
            self.start().await;
        }
        loop {
            let probe_due = self.next_probe_due();
            if !self.wants_rekick() {
                self.rekick_at = None;
            } else if self.rekick_at.is_none() {
                let (epoch, every) = (self.ctx.epoch, self.ctx.cfg.rekick_every);
                self.rekick_at = Some(policy::next_tick(epoch, every, Instant::now()));
            }
            tokio::select! {
                status = wait_run(&mut self.run) => self.on_exit(status).await,
                _ = sleep_until(self.respawn_at) => {
                    self.respawn_at = None;
                    self.start().await;
                }
                _ = sleep_until(probe_due) => self.launch_probes(),
                Some(joined) = self.in_flight.join_next(), if !self.in_flight.is_empty() => {
                    if let Ok((i, gen, result)) = joined {
                        self.on_probe(i, gen, result).await;
                    }
                }
                _ = sleep_until(self.unit_poll_at) => self.poll_unit().await,
                _ = sleep_until(self.rekick_at) => {
                    self.rekick_at = None;
                    self.rekick().await;
                }
                cmd = rx.recv() => match cmd {
                    None => {
                        self.stop("the agent is exiting").await;
                        return;
                    }
                    Some(ServiceCommand::Stop { remove, done }) => {
                        if remove {
                            self.note("manifest removed: stopping and killing the role");
                            if self.systemd() && self.refused.is_none() {
                                let _ = systemd::stop(&self.unit(), &self.ctx.spawned).await;
                            }
                            self.stop("manifest removed").await;
                            self.ctx.roles.release(&self.m.name);
                        } else if !self.systemd() {
                            self.stop("the agent is stopping").await;
                        }
                        let _ = done.send(());
                        return;
                    }
                    Some(c) => self.command(c).await,
                },
            }
        }
    }

    /// Whether the re-kick timer has anything to do here.
    fn wants_rekick(&self) -> bool {
        !self.down && (self.given_up || self.refused.is_some() || self.systemd())
    }

    fn down_note(&self) -> String {
        format!(
            "admin-down ({}); `keepup-agent up {}` starts it again",
            self.down_mark.display(),
            self.m.name
        )
    }

    async fn command(&mut self, cmd: ServiceCommand) {
        match cmd {
            ServiceCommand::Down(reply) => {
                let r = self.admin_down().await;
                let _ = reply.send(r);
            }
            ServiceCommand::Up(reply) => {
                let r = self.admin_up().await;
                let _ = reply.send(r);
            }
            ServiceCommand::Rekick(reply) => {
                let r = self.rekick().await;
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
            }
            ServiceCommand::Check(reply) => self.check_now(reply),
            ServiceCommand::Reload(m) => {
                let new_version = self.reload(*m);
                // An upgrade of a service that gave up starts the new bits (the talk's
                // "restart on upgrade"); a refused one is tried again.
                if (self.refused.is_some() || (new_version && self.given_up)) && !self.down {
                    self.kick().await;
                }
            }
            ServiceCommand::Stop { .. } => unreachable!("handled by the main loop"),
        }
    }

    /// Checks the manifest, claims the role, looks it up (`getpwnam`, on a blocking thread:
    /// it may ask NSS over the network) and checks that it belongs to this service (the role
    /// registry, see `refuse.rs`). Refusals start with [`refuse::REFUSING`]. The uid is
    /// recorded (and so becomes killable) only once every check passed.
    async fn lookup_role(&mut self) -> Result<(u32, u32), String> {
        if let Some(why) = refuse::manifest_refusal(&self.m) {
            return Err(why);
        }
        self.ctx.roles.claim(&self.m.role, &self.m.name)?;
        let role = self.m.role.clone();
        let registry = self.ctx.role_registry.clone();
        let found = tokio::task::spawn_blocking(move || {
            nix::unistd::User::from_name(&role)
                .map(|u| u.map(|u| (u, refuse::read_registry(&registry, &role))))
        })
        .await
        .map_err(|e| format!("cannot look up role user {}: {e}", self.m.role))?;
        match found {
            Ok(Some((u, registry))) => {
                let (uid, gid) = (u.uid.as_raw(), u.gid.as_raw());
                if let Some(why) =
                    refuse::uid_refusal(&self.m.name, &self.m.role, uid, self.ctx.uid_min)
                {
                    return Err(why);
                }
                let gecos = u.gecos.to_string_lossy();
                refuse::role_belongs(&self.m.name, &self.m.role, &registry, &gecos)?;
                self.ids = Some((uid, gid));
                Ok((uid, gid))
            }
            Ok(None) => Err(format!(
                "role user {} does not exist; reinstall the {} package",
                self.m.role, self.m.name
            )),
            Err(e) => Err(format!("cannot look up role user {}: {e}", self.m.role)),
        }
    }

    /// Refuses to supervise the manifest: no start, no probes, no role kill, until a re-kick,
    /// `up` or a manifest change looks again.
    fn refuse(&mut self, why: String) {
        self.note(&why);
        eprintln!("keepup-agent: {}: {why}", self.m.name);
        // For the report: the state says `refused`, the event says why.
        self.ctx
            .events
            .push(EventKind::Refused, Some(&self.m.name), why.clone());
        self.refused = Some(why.clone());
        self.ids = None;
        self.respawn_at = None;
        self.rebuild_checks();
        if !why.contains("already used by service") {
            self.ctx.roles.release(&self.m.name);
        }
        self.update(|s| s.last_exit = Some(why.clone()));
        self.set_state(ServiceState::Refused, Some(why));
    }

    /// A systemd unit at agent start, `up` or a re-kick: look up the role (or refuse), probe,
    /// and re-kick the unit if it is not active.
    async fn systemd_begin(&mut self, force: bool) {
        match self.lookup_role().await {
            Err(why) if why.starts_with(refuse::REFUSING) => return self.refuse(why),
            Err(why) => self.note(&why),
            Ok(_) => {}
        }
        self.rebuild_checks();
        self.schedule_checks(Instant::now());
        self.systemd_rekick(force).await;
    }

    /// Re-reads the manifest file, so a start right after an upgrade (whose maintainer
    /// scripts killed the role before the next directory scan) uses the new launch script and
    /// role.
    fn reread_manifest(&mut self) {
        let key = file_key(&self.path);
        if key.is_some() && key == self.path_key {
            return;
        }
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return;
        };
        self.path_key = key;
        if let Ok(m) = Manifest::parse_file(&self.path, &text) {
            if m.name == self.m.name && m != self.m {
                self.reload(m);
            }
        }
    }

    /// Starts the launch script (agent-supervised): kill leftovers of the role first ("kill to
    /// gain control"), then spawn it in its own process group with its output to the log.
    async fn start(&mut self) {
        self.start_after(None).await;
    }

    /// [`Service::start`]; `previous` is the process group of the run that just exited, when
    /// this is the immediate respawn after a run that lasted at least `fast_crash`. Then, if
    /// nothing is left in that group, the launch script is spawned at once, without the
    /// `/proc` scan for the role: the common restart (a crash or kill of a long-running
    /// daemon) costs a fork/exec, not a walk over every process on the host. A daemon that
    /// escaped the group (`setsid`) is caught by the next uid-based kill: the next start after
    /// a fast crash (the new copy failing to bind, say), a re-kick, a health kill, `down`.
    async fn start_after(&mut self, previous: Option<i32>) {
        if self.down || self.given_up || self.run.is_some() || self.systemd() {
            return;
        }
        self.reread_manifest();
        if self.refused.is_some() {
            return;
        }
        let now = Instant::now();
        if !self
            .history
            .may_start(now, self.m.supervisor.count, self.m.supervisor.within)
        {
            self.give_up();
            return;
        }
        let (uid, _gid) = match self.lookup_role().await {
            Ok(ids) => ids,
            Err(why) if why.starts_with(refuse::REFUSING) => return self.refuse(why),
            Err(why) => return self.failed_start(now, why),
        };
        // The previous launch script is reaped: its group id may have been recycled, so the
        // group is only asked whether it has members (signal 0), never signalled or used to
        // pick victims; the service's cgroup, if any, answers exactly.
        let cgroup = crate::cgroup::for_service(&self.m.name);
        let previous = previous.filter(|&g| g > 1);
        let group_left = previous.is_some_and(|g| match &cgroup {
            Some(cg) => cg.populated() != Some(false),
            None => {
                nix::sys::signal::killpg(nix::unistd::Pid::from_raw(g), None)
                    != Err(nix::errno::Errno::ESRCH)
            }
        });
        let leftovers = if previous.is_some() && !group_left {
            role::KillReport::default()
        } else {
            let target = role::Target {
                uid,
                group: None,
                cgroup,
            };
            role::kill_role(&target, self.m.supervisor.stop_grace).await
        };
        if leftovers.termed > 0 {
            self.note(&format!(
                "killed {} leftover process(es) of role {} before starting ({} needed SIGKILL)",
                leftovers.termed, self.m.role, leftovers.killed
            ));
        }
        // The killed run's zombies still count against the role's process limit.
        let unreaped = crate::reaper::orphans_reaped(uid, 4 * crate::reaper::SETTLE).await;
        if unreaped > 0 {
            self.note(&format!(
                "{unreaped} exited process(es) of role {} not reaped yet; starting anyway",
                self.m.role
            ));
        }
        self.rebuild_checks();
        let (child, not_sane) = match self.spawn_launch() {
            Ok(c) => c,
            Err(why) => return self.failed_start(Instant::now(), why),
        };
        let now = Instant::now();
        let pid = child.id();
        self.ctx.spawned.insert(pid);
        self.history.record(now);
        self.starts += 1;
        self.generation += 1;
        self.note(&format!("started {} (pid {pid})", self.m.launch));
        self.run = Some(Run {
            child,
            pid,
            started: now,
            not_sane: not_sane.clone(),
            killed_for: None,
        });
        self.schedule_checks(now);
        let restarts = self.starts.saturating_sub(1);
        self.update(|s| {
            s.state = ServiceState::Running;
            s.note = None;
            s.pid = Some(pid as u32);
            s.started = Some(now);
            s.restarts = restarts;
            s.not_sane = Some(not_sane);
        });
    }

    fn spawn_launch(&self) -> Result<(Launched, Arc<AtomicBool>), String> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| format!("cannot create a pipe for the log: {e}"))?;
        let write2 = write
            .try_clone()
            .map_err(|e| format!("cannot create a pipe for the log: {e}"))?;
        let cgroup = crate::cgroup::for_service(&self.m.name);
        let child = match &cgroup {
            // With cgroups, the launch script is created in its service's cgroup.
            Some(cg) => self.spawn_into(cg, write, write2)?,
            None => Launched::Tokio(self.spawn_command(None, write, write2)?),
        };
        let not_sane = Arc::new(AtomicBool::new(false));
        let watch = policy::SaneWatch::new(&self.m.name);
        tokio::spawn(pump(read, self.log.clone(), not_sane.clone(), watch));
        Ok((child, not_sane))
    }

    /// Spawns the launch script inside `cg` with `clone3`, or, where that is refused, with
    /// tokio and a `cgroup.procs` write between fork and exec.
    fn spawn_into(
        &self,
        cg: &crate::cgroup::ServiceCgroup,
        write: OwnedFd,
        write2: OwnedFd,
    ) -> Result<Launched, String> {
        use std::os::unix::ffi::OsStrExt;
        let cstring = |b: &[u8]| {
            std::ffi::CString::new(b).map_err(|_| {
                format!(
                    "cannot run {}: a NUL byte in its path or environment",
                    self.m.launch
                )
            })
        };
        let launch = crate::cgroup::Launch {
            program: cstring(std::path::Path::new(&self.m.launch).as_os_str().as_bytes())?,
            env: vec![
                cstring(format!("PATH={PATH}").as_bytes())?,
                cstring(format!("KEEPUP_SERVICE={}", self.m.name).as_bytes())?,
            ],
            stdout: write,
            stderr: write2,
        };
        match cg.spawn(&launch) {
            Ok(child) => Ok(Launched::Pidfd(child)),
            Err(crate::cgroup::SpawnError::Failed(why)) => Err(why),
            Err(crate::cgroup::SpawnError::Unsupported(_)) => {
                let joiner = cg
                    .joiner()
                    .map_err(|e| format!("cannot put {} into its cgroup: {e}", self.m.launch))?;
                let child = self.spawn_command(Some(&joiner), launch.stdout, launch.stderr)?;
                Ok(Launched::Tokio(child))
            }
        }
    }

    /// Spawns the launch script with tokio; with `joiner`, it joins its cgroup between fork
    /// and exec.
    fn spawn_command(
        &self,
        joiner: Option<&crate::cgroup::Joiner>,
        write: OwnedFd,
        write2: OwnedFd,
    ) -> Result<Child, String> {
        let mut cmd = Command::new(&self.m.launch);
        cmd.env_clear()
            .env("PATH", PATH)
            .env("KEEPUP_SERVICE", &self.m.name)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::from(write))
            .stderr(Stdio::from(write2))
            .process_group(0);
        if let Some(fd) = joiner.map(crate::cgroup::Joiner::fd) {
            // SAFETY: the closure only calls write(2), which is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || crate::cgroup::Joiner::join(fd));
            }
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.m.launch))?;
        // The child has the write ends now; ours close with `cmd`.
        drop(cmd);
        Ok(child)
    }

    /// A start that could not even spawn: counts as a start and a fast crash.
    fn failed_start(&mut self, now: Instant, why: String) {
        self.note(&why);
        eprintln!("keepup-agent: {}: {why}", self.m.name);
        self.history.record(now);
        self.starts += 1;
        self.update(|s| s.last_exit = Some(why.clone()));
        self.fast_streak = self
            .ctx
            .cfg
            .respawn
            .next_streak(Duration::ZERO, self.fast_streak);
        match policy::after_exit(
            &self.ctx.cfg.respawn,
            &mut self.history,
            now,
            Duration::ZERO,
            self.fast_streak,
            true,
            self.m.supervisor.count,
            self.m.supervisor.within,
        ) {
            AfterExit::GiveUp => self.give_up(),
            AfterExit::Respawn { delay, .. } => {
                let delay = delay.max(SPAWN_RETRY);
                self.respawn_at = Some(now + delay);
                self.set_state(ServiceState::NotSane, Some(why));
            }
        }
    }

    async fn on_exit(&mut self, status: std::io::Result<ExitStatus>) {
        use std::os::unix::process::ExitStatusExt;
        let Some(run) = self.run.take() else { return };
        self.ctx.spawned.remove(run.pid);
        let now = Instant::now();
        let ran = now.saturating_duration_since(run.started);
        let mut what = match &status {
            Ok(st) => policy::describe_exit(st.code(), st.signal()),
            Err(e) => format!("lost track of it ({e})"),
        };
        what.push_str(&format!(" after {}", policy::short_duration(ran)));
        if let Some(why) = &run.killed_for {
            what.push_str(&format!(" (killed: {why})"));
        }
        let not_sane = run.not_sane.load(Ordering::Relaxed);
        if not_sane {
            what.push_str(" (not sane)");
        }
        self.note(&format!("{} exited: {what}", self.m.launch));
        self.generation += 1;
        self.update(|s| {
            s.pid = None;
            s.started = None;
            s.not_sane = None;
            s.last_exit = Some(what.clone());
        });
        if self.down || self.given_up {
            return;
        }
        self.fast_streak = self.ctx.cfg.respawn.next_streak(ran, self.fast_streak);
        match policy::after_exit(
            &self.ctx.cfg.respawn,
            &mut self.history,
            now,
            ran,
            self.fast_streak,
            not_sane,
            self.m.supervisor.count,
            self.m.supervisor.within,
        ) {
            AfterExit::GiveUp => self.give_up(),
            AfterExit::Respawn { delay, state } if delay.is_zero() => {
                self.set_state(state, None);
                // A run that lasted: respawn at once, with the cheap leftover check.
                let previous = (ran >= self.ctx.cfg.respawn.fast_crash).then_some(run.pid);
                self.start_after(previous).await;
            }
            AfterExit::Respawn { delay, state } => {
                self.respawn_at = Some(now + delay);
                self.set_state(
                    state,
                    Some(format!("respawn in {}", policy::short_duration(delay))),
                );
            }
        }
    }

    fn give_up(&mut self) {
        self.given_up = true;
        self.respawn_at = None;
        let why = format!(
            "given up after {} starts within {}; re-kicked every {} or by `keepup-agent rekick {}`",
            self.m.supervisor.count,
            format_duration(self.m.supervisor.within),
            format_duration(self.ctx.cfg.rekick_every),
            self.m.name
        );
        self.note(&why);
        eprintln!("keepup-agent: {}: {why}", self.m.name);
        self.ctx
            .events
            .push(EventKind::GivenUp, Some(&self.m.name), why.clone());
        self.set_state(ServiceState::GivenUp, Some(why));
    }

    /// The launch script's process group, while the launch script is the agent's unreaped
    /// child (its zombie holds the group id); `None` once it is reaped (`try_wait` reaps an
    /// exited one and keeps its status for `wait`).
    fn unreaped_group(&mut self) -> Option<i32> {
        let run = self.run.as_mut()?;
        matches!(run.child.try_wait(), Ok(None)).then_some(run.pid)
    }

    /// Stops the service: role kill (with the launch script's process group), then reap.
    async fn stop(&mut self, why: &str) {
        self.respawn_at = None;
        self.generation += 1;
        if self.ids.is_none() && self.refused.is_none() {
            let _ = self.lookup_role().await;
        }
        // Without a (valid) role only the launch script's process group and the service's
        // cgroup are stopped: uid 0 is never a victim by uid.
        let target = role::Target {
            uid: self.ids.map_or(0, |(uid, _)| uid),
            group: self.unreaped_group(),
            cgroup: crate::cgroup::for_service(&self.m.name),
        };
        let report = role::kill_role(&target, self.m.supervisor.stop_grace).await;
        if report.termed > 0 {
            self.note(&format!(
                "stopped ({why}), role {}: {}",
                self.m.role,
                report.describe()
            ));
        }
        if let Some(mut run) = self.run.take() {
            let status = tokio::time::timeout(REAP_WAIT, run.child.wait()).await;
            self.ctx.spawned.remove(run.pid);
            if let Ok(Ok(st)) = status {
                use std::os::unix::process::ExitStatusExt;
                let what = policy::describe_exit(st.code(), st.signal());
                self.update(|s| s.last_exit = Some(format!("{what} (stopped: {why})")));
            }
        }
        self.update(|s| {
            s.pid = None;
            s.started = None;
            s.not_sane = None;
        });
    }

    async fn admin_down(&mut self) -> Response {
        if let Some(dir) = self.down_mark.parent() {
            if let Err(e) = std::fs::create_dir_all(dir) {
                return Response::failed(format!("cannot create {}: {e}", dir.display()));
            }
        }
        if let Err(e) = std::fs::write(&self.down_mark, b"") {
            return Response::failed(format!(
                "cannot write the admin-down mark {}: {e}",
                self.down_mark.display()
            ));
        }
        self.down = true;
        self.given_up = false;
        self.note("admin-down: stopping");
        if self.systemd() {
            if let Err(e) = systemd::stop(&self.unit(), &self.ctx.spawned).await {
                self.note(&e);
            }
        }
        self.stop("admin-down").await;
        self.set_state(ServiceState::Down, Some(self.down_note()));
        Response::done(format!(
            "{} is down and stays down (mark {}) until `keepup-agent up {}`",
            self.m.name,
            self.down_mark.display(),
            self.m.name
        ))
    }

    async fn admin_up(&mut self) -> Response {
        match std::fs::remove_file(&self.down_mark) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Response::failed(format!(
                    "cannot remove the admin-down mark {}: {e}",
                    self.down_mark.display()
                ))
            }
        }
        let was_down = std::mem::replace(&mut self.down, false);
        self.note("admin-up");
        self.kick().await;
        Response::done(if was_down {
            format!("{} is up again", self.m.name)
        } else {
            format!("{} was not down; re-kicked if it had given up", self.m.name)
        })
    }

    /// Clears the give-up window and starts the service if nothing runs it.
    async fn kick(&mut self) {
        self.given_up = false;
        self.refused = None;
        self.history.clear();
        self.fast_streak = 0;
        if self.systemd() {
            self.systemd_begin(true).await;
        } else if self.run.is_none() {
            self.respawn_at = None;
            self.start().await;
        }
    }

    /// The re-kick (timer or `rekick`): only a given-up service is started again; for anything
    /// else it is a no-op, like the talk's cron line when upstart still has the process.
    async fn rekick(&mut self) -> Response {
        if self.down {
            return Response::done(format!(
                "{} is admin-down: not re-kicked (use `keepup-agent up {}`)",
                self.m.name, self.m.name
            ));
        }
        if self.refused.is_some() {
            self.note("re-kick: looking at the refused manifest again");
            self.kick().await;
            return Response::done(match &self.refused {
                Some(why) => format!("{}: still refused: {why}", self.m.name),
                None => format!("{}: re-kicked", self.m.name),
            });
        }
        if self.systemd() {
            return match self.systemd_rekick(false).await {
                true => Response::done(format!("{}: re-kicked {}", self.m.name, self.unit())),
                false => Response::done(format!("{}: {} is active", self.m.name, self.unit())),
            };
        }
        if self.given_up {
            self.note("re-kick: starting again");
            self.kick().await;
            return Response::done(format!("{}: re-kicked", self.m.name));
        }
        Response::done(format!("{}: not given up; nothing to do", self.m.name))
    }

    /// Re-kicks the unit if it is not active (or always, with `force`); true if it did.
    async fn systemd_rekick(&mut self, force: bool) -> bool {
        let unit = self.unit();
        let state = systemd::show(&unit, &self.ctx.spawned).await;
        let needs = match &state {
            Ok(s) => s.needs_rekick(),
            Err(_) => true,
        };
        if let Ok(s) = &state {
            self.show_unit(s);
        }
        let mut did = false;
        if needs || force {
            let res = systemd::rekick(&unit, &self.ctx.spawned).await;
            match res {
                Ok(()) => {
                    did = true;
                    self.schedule_checks(Instant::now());
                    self.note(&format!(
                        "re-kicked {unit}: systemctl reset-failed + start{}",
                        match &state {
                            Ok(s) => format!(" (it was {}/{}, {})", s.active, s.sub, s.result),
                            Err(_) => String::new(),
                        }
                    ));
                    self.set_state(ServiceState::Starting, None);
                }
                Err(e) => {
                    self.note(&e);
                    self.set_state(ServiceState::GivenUp, Some(e));
                }
            }
        }
        self.unit_poll_at = Some(Instant::now() + SYSTEMD_POLL.min(Duration::from_secs(1)));
        did
    }

    fn show_unit(&self, u: &UnitState) {
        let rekick = format_duration(self.ctx.cfg.rekick_every);
        self.update(|s| {
            if s.state == ServiceState::Down {
                return;
            }
            s.state = u.state();
            s.pid = u.main_pid;
            s.restarts = u.restarts;
            s.note = (u.state() == ServiceState::GivenUp).then(|| {
                format!(
                    "unit {}/{} ({}); re-kicked every {rekick}",
                    u.active, u.sub, u.result
                )
            });
            match (u.state(), s.started) {
                (ServiceState::Running, None) => s.started = Some(Instant::now()),
                (ServiceState::Running, Some(_)) => {}
                _ => s.started = None,
            }
        });
    }

    async fn poll_unit(&mut self) {
        self.unit_poll_at = None;
        if !self.systemd() || self.down || self.refused.is_some() {
            return;
        }
        match systemd::show(&self.unit(), &self.ctx.spawned).await {
            Ok(u) => self.show_unit(&u),
            Err(e) => self.set_state(ServiceState::GivenUp, Some(e)),
        }
        self.unit_poll_at = Some(Instant::now() + SYSTEMD_POLL);
    }

    /// Take a changed manifest; true when its version changed.
    fn reload(&mut self, m: Manifest) -> bool {
        if m == self.m {
            return false;
        }
        self.note(&format!(
            "manifest changed: {} {} -> {} (used from the next start)",
            m.name, self.m.version, m.version
        ));
        let settle = settle(&m, self.ctx.cfg.respawn.fast_crash);
        let version = m.version.clone();
        // A new version starts counting afresh: the kills of an upgrade are not crashes.
        let new_version = m.version != self.m.version;
        if new_version {
            self.starts = 0;
        }
        self.m = m;
        self.rebuild_checks();
        if self.run.is_some() || self.systemd() {
            self.schedule_checks(Instant::now());
        }
        self.update(|s| {
            s.version = version;
            s.settle = settle;
            if new_version {
                s.restarts = 0;
            }
        });
        new_version
    }

    // ---- probes ----

    fn rebuild_checks(&mut self) {
        let run_as = self.ids.map(|(uid, gid)| RunAs { uid, gid });
        self.checks = self
            .m
            .checks
            .iter()
            .map(|c| Check {
                spec: c.clone(),
                probe: build_probe(&c.probe, run_as),
                next: None,
                running: false,
                failures: 0,
            })
            .collect();
        self.generation += 1;
        // A probe that cannot be built is failing from the start, with the reason, and stays
        // so until the manifest is fixed: the service never looks healthy because of it. It
        // is not run, so it never counts toward a health kill (killing the service would not
        // fix its manifest, and would crash-loop it).
        let now = Instant::now();
        let slots = self
            .checks
            .iter()
            .map(|c| {
                let broken = match &c.probe {
                    Err(ProbeProblem::Invalid(why)) => Some(why.clone()),
                    _ => None,
                };
                ProbeSlot {
                    name: c.spec.name.clone(),
                    probe: describe(&c.probe),
                    ok: broken.is_some().then_some(false),
                    at: broken.is_some().then_some(now),
                    reason: broken.map(|why| broken_reason(&self.m.name, &why)),
                    failures: 0,
                }
            })
            .collect();
        self.update(|s| s.probes = slots);
    }

    /// Probes start `grace` after `from` (a start, or a health kill of a systemd service).
    fn schedule_checks(&mut self, from: Instant) {
        for c in &mut self.checks {
            c.failures = 0;
            c.next = Some(from + c.spec.grace);
        }
    }

    /// Whether probes run now: while the launch script runs, or while a systemd unit is not
    /// given up (failed units have nothing to probe until the re-kick).
    fn probing(&self) -> bool {
        if self.down || self.refused.is_some() {
            return false;
        }
        if self.systemd() {
            let state = self
                .shared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .state
                .clone();
            return state != ServiceState::GivenUp;
        }
        // A launch script that said it is not sane is waiting to exit: nothing to probe.
        self.run
            .as_ref()
            .is_some_and(|r| !r.not_sane.load(Ordering::Relaxed))
    }

    fn next_probe_due(&self) -> Option<Instant> {
        if !self.probing() {
            return None;
        }
        self.checks
            .iter()
            .filter(|c| !c.running && c.probe.is_ok())
            .filter_map(|c| c.next)
            .min()
    }

    fn launch_probes(&mut self) {
        let now = Instant::now();
        let generation = self.generation;
        for (i, c) in self.checks.iter_mut().enumerate() {
            let (Some(next), Ok(probe)) = (c.next, &c.probe) else {
                continue;
            };
            if c.running || next > now {
                continue;
            }
            let mut following = next + c.spec.every;
            if following <= now {
                following = now + c.spec.every;
            }
            c.next = Some(following);
            c.running = true;
            let probe = probe.clone();
            let timeout = c.spec.timeout;
            self.in_flight
                .spawn(async move { (i, generation, probe.run(timeout).await) });
        }
    }

    async fn on_probe(&mut self, i: usize, generation: u64, result: ProbeResult) {
        if result.ok && generation == self.generation {
            // The service answers: whatever the output said, it is not in a not-sane sleep.
            if let Some(run) = &self.run {
                run.not_sane.store(false, Ordering::Relaxed);
            }
        }
        let current = generation == self.generation && self.probing();
        let Some(c) = self.checks.get_mut(i) else {
            return;
        };
        c.running = false;
        if !current {
            return;
        }
        let was_failing = c.failures > 0;
        if result.ok {
            c.failures = 0;
        } else {
            c.failures += 1;
        }
        let (name, failures, limit) = (c.spec.name.clone(), c.failures, c.spec.failures);
        let now = Instant::now();
        self.update(|s| {
            if let Some(slot) = s.probes.get_mut(i) {
                slot.ok = Some(result.ok);
                slot.reason = Some(result.reason.clone());
                slot.failures = failures;
                slot.at = Some(now);
            }
        });
        if !result.ok {
            self.note(&format!(
                "probe {name} failed ({failures}/{limit}): {}",
                result.reason
            ));
        } else if was_failing {
            self.note(&format!("probe {name} passes again: {}", result.reason));
        }
        if failures >= limit {
            self.health_kill(format!(
                "probe {name} failed {failures} times in a row: {}",
                result.reason
            ))
            .await;
        }
    }

    /// Kills the role because a probe kept failing; the supervisor (the agent, or systemd)
    /// then starts it again.
    async fn health_kill(&mut self, why: String) {
        self.generation += 1;
        let Some((uid, _)) = self.ids else {
            // A systemd unit whose role could not be looked up: there is nothing to kill by.
            let msg = format!(
                "{why}; cannot kill: role {} is unknown (probes start again)",
                self.m.role
            );
            self.note(&msg);
            eprintln!("keepup-agent: {}: {msg}", self.m.name);
            self.schedule_checks(Instant::now());
            return;
        };
        self.note(&format!("{why}; killing role {}", self.m.role));
        self.ctx.events.push(
            EventKind::HealthKill,
            Some(&self.m.name),
            format!("{why}; killing role {}", self.m.role),
        );
        eprintln!(
            "keepup-agent: {}: {why}; killing role {}",
            self.m.name, self.m.role
        );
        let target = role::Target {
            uid,
            group: self.unreaped_group(),
            cgroup: crate::cgroup::for_service(&self.m.name),
        };
        if let Some(run) = self.run.as_mut() {
            run.killed_for = Some(why);
        }
        let report = role::kill_role(&target, self.m.supervisor.stop_grace).await;
        self.note(&format!("health kill: {}", report.describe()));
        // Probes start again `grace` from now. Agent-supervised, the launch script's exit is
        // normally noticed first and the start reschedules them; if something survived the
        // kill (or the launch script did), they keep watching it.
        self.schedule_checks(Instant::now());
    }

    /// `check`: runs every probe now, without counting towards the failure streaks.
    fn check_now(&self, reply: oneshot::Sender<Response>) {
        let probes: Vec<(String, Result<Probe, ProbeProblem>, Duration)> = self
            .checks
            .iter()
            .map(|c| (c.spec.name.clone(), c.probe.clone(), c.spec.timeout))
            .collect();
        let name = self.m.name.clone();
        tokio::spawn(async move {
            let mut set = JoinSet::new();
            for (i, (_, probe, timeout)) in probes.iter().enumerate() {
                if let Ok(p) = probe {
                    let (p, timeout) = (p.clone(), *timeout);
                    set.spawn(async move { (i, p.run(timeout).await) });
                }
            }
            let mut results: Vec<Option<ProbeResult>> = vec![None; probes.len()];
            while let Some(Ok((i, r))) = set.join_next().await {
                results[i] = Some(r);
            }
            let checks: Vec<ProbeStatus> = probes
                .iter()
                .zip(results)
                .map(|((n, p, _), r)| {
                    let (ok, reason) = match (p, r) {
                        (Err(ProbeProblem::Invalid(why)), _) => {
                            (Some(false), Some(broken_reason(&name, why)))
                        }
                        (_, r) => (r.as_ref().map(|r| r.ok), r.map(|r| r.reason)),
                    };
                    ProbeStatus {
                        name: n.clone(),
                        probe: describe(p),
                        ok,
                        reason,
                        failures: 0,
                        age_secs: Some(0.0),
                    }
                })
                .collect();
            let ok = checks.iter().all(|c| c.ok == Some(true));
            let _ = reply.send(Response {
                ok,
                error: (!ok).then(|| format!("{name}: a probe failed")),
                message: (checks.is_empty()).then(|| format!("{name} has no probes")),
                checks,
                ..Response::default()
            });
        });
    }
}

/// Why a manifest's probe cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeProblem {
    /// The manifest's probe is broken (a bad regex, URL, port, an empty argv): it is failing
    /// until the manifest is fixed.
    Invalid(String),
    /// An exec probe, while the role user is not known (not looked up yet, or refused).
    RoleUnknown,
}

impl std::fmt::Display for ProbeProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeProblem::Invalid(why) => f.write_str(why),
            ProbeProblem::RoleUnknown => f.write_str("exec probe: the role user is unknown"),
        }
    }
}

/// What `status` shows as the probe.
fn describe(p: &Result<Probe, ProbeProblem>) -> String {
    match p {
        Ok(p) => p.describe(),
        Err(e) => format!("invalid: {e}"),
    }
}

/// The failure reason of a probe its manifest describes badly.
fn broken_reason(service: &str, why: &str) -> String {
    format!(
        "cannot run: {why} (the manifest is broken: reinstall or fix the {service} package; \
         not counted toward health kills)"
    )
}

/// Builds the probe a manifest describes; exec probes run as the role (`run_as`).
pub fn build_probe(p: &ManifestProbe, run_as: Option<RunAs>) -> Result<Probe, ProbeProblem> {
    let exec = matches!(p, ManifestProbe::Exec { .. });
    // A broken probe is broken whoever would run it: that is checked first.
    let probe = keepup_packager::manifest::build_probe(p, run_as).map_err(|e| {
        // One line: a regex error spans several, and this is shown in the status table.
        ProbeProblem::Invalid(
            e.to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        )
    })?;
    if exec && run_as.is_none() {
        return Err(ProbeProblem::RoleUnknown);
    }
    Ok(probe)
}

/// Copies a run's output into the service log and watches for the launch script's
/// `run-<name>: not sane:` line (set) and its `environment sane; exec` line (cleared). Ends
/// when every writer (the launch script and anything that inherited its output) is gone.
async fn pump(
    read: OwnedFd,
    log: SharedLog,
    not_sane: Arc<AtomicBool>,
    mut watch: policy::SaneWatch,
) {
    let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(read) else {
        return;
    };
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match rx.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        logfile::lock(&log).write(&buf[..n]);
        if let Some(said) = watch.feed(&buf[..n]) {
            not_sane.store(said, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_probes_from_manifest_entries() {
        let tcp = build_probe(
            &ManifestProbe::Tcp {
                host: "127.0.0.1".into(),
                port: 7070,
                send: None,
                expect: Some("ready".into()),
            },
            None,
        )
        .unwrap();
        assert!(
            tcp.describe().contains("127.0.0.1:7070"),
            "{}",
            tcp.describe()
        );
        let v6 = build_probe(
            &ManifestProbe::Tcp {
                host: "::1".into(),
                port: 1,
                send: None,
                expect: None,
            },
            None,
        )
        .unwrap();
        assert!(v6.describe().contains("[::1]:1"), "{}", v6.describe());
        let http = build_probe(
            &ManifestProbe::Http {
                url: "http://127.0.0.1:7071/healthz".into(),
                method: "GET".into(),
                status_min: 200,
                status_max: 200,
                body: Some("ok".into()),
                host_header: None,
            },
            None,
        );
        assert!(http.is_ok());
        let exec = ManifestProbe::Exec {
            argv: vec!["true".into()],
        };
        assert_eq!(
            build_probe(&exec, None).unwrap_err(),
            ProbeProblem::RoleUnknown
        );
        let p = build_probe(&exec, Some(RunAs { uid: 5, gid: 6 })).unwrap();
        assert_eq!(p.describe(), "exec true as 5:6");
    }

    #[test]
    fn broken_probes_are_invalid_not_off() {
        let run_as = Some(RunAs { uid: 5, gid: 6 });
        let broken = [
            ManifestProbe::Tcp {
                host: "127.0.0.1".into(),
                port: 7070,
                send: None,
                expect: Some("rea(dy".into()),
            },
            ManifestProbe::Tcp {
                host: "127.0.0.1".into(),
                port: 0,
                send: None,
                expect: None,
            },
            ManifestProbe::Http {
                url: "ftp://x/".into(),
                method: "GET".into(),
                status_min: 200,
                status_max: 200,
                body: None,
                host_header: None,
            },
            ManifestProbe::Http {
                url: "http://127.0.0.1:7071/".into(),
                method: "GET".into(),
                status_min: 200,
                status_max: 299,
                body: Some("[".into()),
                host_header: None,
            },
            ManifestProbe::Exec { argv: vec![] },
            ManifestProbe::Exec {
                argv: vec!["".into()],
            },
        ];
        for p in &broken {
            for who in [None, run_as] {
                let e = build_probe(p, who).unwrap_err();
                assert!(matches!(e, ProbeProblem::Invalid(_)), "{p:?}: {e:?}");
                assert!(!e.to_string().contains('\n'), "{e}");
            }
        }
        let why = broken_reason("foo", "banner: bad regex");
        assert!(
            why.contains("banner: bad regex") && why.contains("not counted"),
            "{why}"
        );
    }
}
