//! The thin layer around one service's [`Machine`]: a task that turns the world into
//! machine events (its launch script exited, a probe answered, a deadline passed, a client
//! asked, the daemon wrote to its notify socket, a dependency became ready) and carries out
//! the machine's effects (spawn into the service's cgroup, pump the output into the log, kill
//! the role, `systemctl`, write the admin-down mark, record an event, answer). Every decision
//! is the machine's (`machine.rs`); what `status` shows is derived from it.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keepup_checks::{Probe, ProbeResult, RunAs};
use keepup_deploy::wire::ServiceState;
use keepup_packager::manifest::{Manifest, ManifestProbe, Ready};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::config::Config;
use crate::events::Events;
use crate::external::{Look, Outside};
use crate::logfile::{self, LogFile, SharedLog};
use crate::machine::{
    Deps, Effect, Event, Machine, ProbeProblemKind, Refusal, ReplyTo, SupervisorOp, Tuning,
};
use crate::notify::{Message, NotifySocket};
use crate::order::{self, Registry, Services};
use crate::proto::{ProbeStatus, Response, ServiceStatus};
use crate::reaper::Spawned;
use crate::refuse::{self, Roles};
use crate::role;

/// `PATH` for launch scripts (they set their own too).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long to wait for a killed launch script to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(5);

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
    pub events: Events,
    /// Every service's state, for start order.
    pub registry: Registry,
    /// The last run id given out (see [`next_run_id`]).
    pub runs: Arc<std::sync::atomic::AtomicU64>,
}

/// Microseconds since the Unix epoch.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}

/// A new run id: the spawn time in microseconds since the Unix epoch, made strictly larger
/// than the last one, so a later run always has a larger id, across agent restarts too (as
/// long as the clock does not go back). The updater compares it with when its package
/// command began.
fn next_run_id(last: &std::sync::atomic::AtomicU64) -> u64 {
    use std::sync::atomic::Ordering;
    let now = unix_micros();
    let mut prev = last.load(Ordering::Relaxed);
    loop {
        let id = now.max(prev + 1);
        match last.compare_exchange(prev, id, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return id,
            Err(p) => prev = p,
        }
    }
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

/// The agent's handle on a running service task.
#[derive(Debug)]
pub struct Handle {
    /// Commands to the task.
    pub tx: mpsc::Sender<ServiceCommand>,
    /// The machine, for `status`.
    pub machine: Arc<Mutex<Machine>>,
    /// The manifest the task was last given.
    pub manifest: Manifest,
    /// The task: finished once a `Stop` is done.
    pub task: tokio::task::JoinHandle<()>,
}

impl Handle {
    /// The status snapshot at `now`.
    pub fn status(&self, now: Instant) -> ServiceStatus {
        lock(&self.machine).status(now)
    }
}

fn lock(m: &Mutex<Machine>) -> std::sync::MutexGuard<'_, Machine> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
    let tuning = Tuning {
        respawn: ctx.cfg.respawn,
        rekick_every: ctx.cfg.rekick_every,
        epoch: ctx.epoch,
    };
    let machine = Arc::new(Mutex::new(Machine::new(manifest.clone(), tuning)));
    let (sane_tx, sane_rx) = mpsc::unbounded_channel();
    let deps = ctx.registry.subscribe();
    let exec = Exec {
        down_mark: ctx.cfg.down_dir().join(&manifest.name),
        ctx,
        machine: machine.clone(),
        log,
        path,
        path_key: None,
        run: None,
        ids: None,
        probes: Vec::new(),
        in_flight: JoinSet::new(),
        replies: HashMap::new(),
        next_reply: 0,
        sane_tx,
        sane_rx,
        notify: None,
        deps,
        published: None,
        outside_pids: (None, 0),
    };
    let task = tokio::spawn(exec.main(rx));
    Handle {
        tx,
        machine,
        manifest,
        task,
    }
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

/// The executor of one service's machine.
struct Exec {
    ctx: Ctx,
    machine: Arc<Mutex<Machine>>,
    log: SharedLog,
    down_mark: PathBuf,
    /// The manifest file, re-read before each start.
    path: PathBuf,
    /// The manifest file as last read before a start: re-parsed only when it changed.
    path_key: Option<FileKey>,
    /// The launch script, while it runs (and its pid).
    run: Option<(Launched, i32)>,
    /// The role's uid and gid, from the last successful lookup (kept for stopping after the
    /// role user was deleted).
    ids: Option<(u32, u32)>,
    probes: Vec<Result<Probe, ProbeProblem>>,
    in_flight: JoinSet<(usize, u64, ProbeResult)>,
    replies: HashMap<ReplyTo, oneshot::Sender<Response>>,
    next_reply: ReplyTo,
    /// What the output pumps saw (`not sane:` / `environment sane; exec` lines).
    sane_tx: mpsc::UnboundedSender<bool>,
    sane_rx: mpsc::UnboundedReceiver<bool>,
    /// The notify socket (`ready: notify` services).
    notify: Option<NotifySocket>,
    /// Every service's state (start order).
    deps: watch::Receiver<Services>,
    /// What this service last published.
    published: Option<order::Entry>,
    /// runit and supervisord count no restarts: the last pid seen, and the new pids since.
    outside_pids: (Option<u32>, u64),
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

async fn wait_run(run: &mut Option<(Launched, i32)>) -> std::io::Result<ExitStatus> {
    match run {
        Some((child, _)) => child.wait().await,
        None => std::future::pending().await,
    }
}

async fn notified(sock: &Option<NotifySocket>) -> Vec<Message> {
    match sock {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

fn describe_status(status: &std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(st) => crate::policy::describe_exit(st.code(), st.signal()),
        Err(e) => format!("lost track of it ({e})"),
    }
}

impl Exec {
    fn name(&self) -> String {
        lock(&self.machine).manifest().name.clone()
    }

    fn manifest(&self) -> Manifest {
        lock(&self.machine).manifest().clone()
    }

    fn note(&self, message: &str) {
        logfile::lock(&self.log).note(message);
    }

    async fn main(mut self, mut rx: mpsc::Receiver<ServiceCommand>) {
        let deps = self.current_deps();
        self.feed(Event::Deps(deps)).await;
        let down = self.down_mark.exists();
        self.feed(Event::Begin { down }).await;
        loop {
            let deadline = lock(&self.machine).next_deadline();
            let event = tokio::select! {
                status = wait_run(&mut self.run) => self.exited(status),
                _ = sleep_until(deadline) => Event::Timer,
                Some(joined) = self.in_flight.join_next(), if !self.in_flight.is_empty() => {
                    match joined {
                        Ok((index, generation, result)) => Event::Probe { index, generation, result },
                        Err(_) => continue,
                    }
                }
                Some(said) = self.sane_rx.recv() => Event::SaneLine(said),
                msgs = notified(&self.notify) => {
                    for m in msgs {
                        let ev = match m {
                            Message::Ready => Event::Ready,
                            Message::Stopping => Event::Stopping,
                            Message::Watchdog => Event::Watchdog,
                            Message::Status(s) => Event::StatusText(s),
                            Message::MainPid(p) => Event::MainPid(p),
                        };
                        self.feed(ev).await;
                    }
                    continue;
                }
                Ok(()) = self.deps.changed() => Event::Deps(self.current_deps()),
                cmd = rx.recv() => match cmd {
                    None => {
                        self.feed(Event::Stop { remove: false }).await;
                        return;
                    }
                    Some(ServiceCommand::Stop { remove, done }) => {
                        self.feed(Event::Stop { remove }).await;
                        if remove {
                            self.ctx.registry.remove(&self.name());
                        }
                        let _ = done.send(());
                        return;
                    }
                    Some(ServiceCommand::Down(reply)) => Event::Down(self.reply_to(reply)),
                    Some(ServiceCommand::Up(reply)) => Event::Up(self.reply_to(reply)),
                    Some(ServiceCommand::Rekick(reply)) => {
                        Event::Rekick(reply.map(|r| self.reply_to(r)))
                    }
                    Some(ServiceCommand::Check(reply)) => {
                        self.check_now(reply);
                        continue;
                    }
                    Some(ServiceCommand::Reload(m)) => Event::Reload(m),
                },
            };
            self.feed(event).await;
        }
    }

    fn reply_to(&mut self, reply: oneshot::Sender<Response>) -> ReplyTo {
        self.next_reply += 1;
        self.replies.insert(self.next_reply, reply);
        self.next_reply
    }

    fn current_deps(&mut self) -> Deps {
        let (name, after) = {
            let m = lock(&self.machine);
            (
                m.manifest().name.clone(),
                m.manifest().supervisor.after.clone(),
            )
        };
        order::deps_of(&name, &after, &self.deps.borrow_and_update())
    }

    /// The launch script exited: reap its bookkeeping, and say how.
    fn exited(&mut self, status: std::io::Result<ExitStatus>) -> Event {
        if let Some((_, pid)) = self.run.take() {
            self.ctx.spawned.remove(pid);
        }
        let mut not_sane = false;
        while let Ok(said) = self.sane_rx.try_recv() {
            not_sane = said;
        }
        Event::Exited {
            how: describe_status(&status),
            not_sane,
        }
    }

    /// Hands `event` to the machine and carries out what it says, feeding back the events
    /// the effects produce, in order.
    async fn feed(&mut self, event: Event) {
        let mut queue = VecDeque::from([event]);
        while let Some(ev) = queue.pop_front() {
            let effects = lock(&self.machine).on(ev, Instant::now());
            for fx in effects {
                if let Some(next) = self.act(fx).await {
                    queue.push_back(next);
                }
            }
        }
        self.publish();
    }

    /// Publishes this service's state for the services that start after it.
    fn publish(&mut self) {
        let (name, entry) = {
            let m = lock(&self.machine);
            (
                m.manifest().name.clone(),
                order::Entry {
                    state: m.state(),
                    after: m.manifest().supervisor.after.clone(),
                },
            )
        };
        if self.published.as_ref() != Some(&entry) {
            self.ctx.registry.publish(&name, entry.clone());
            self.published = Some(entry);
        }
    }

    async fn act(&mut self, fx: Effect) -> Option<Event> {
        match fx {
            Effect::Spawn { previous } => Some(self.start(previous.map(|p| p as i32)).await),
            Effect::KillRole(_) => {
                self.kill_role().await;
                Some(Event::Killed)
            }
            Effect::StopRun(why) => self.stop(&why).await,
            Effect::Supervisor(op) => self.supervisor(op).await,
            Effect::Mark { down, reply } => Some(Event::Marked {
                down,
                reply,
                result: self.mark(down),
            }),
            Effect::RunProbes { which, generation } => {
                for i in which {
                    if let Some(Ok(probe)) = self.probes.get(i) {
                        let probe = probe.clone();
                        let timeout = lock(&self.machine)
                            .manifest()
                            .checks
                            .get(i)
                            .map_or(Duration::from_secs(1), |c| c.timeout);
                        self.in_flight
                            .spawn(async move { (i, generation, probe.run(timeout).await) });
                    }
                }
                None
            }
            Effect::RebuildProbes => {
                self.rebuild_probes();
                None
            }
            Effect::ReleaseRole => {
                self.ctx.roles.release(&self.name());
                None
            }
            Effect::Record(kind, message) => {
                let name = self.name();
                eprintln!("keepup-agent: {name}: {message}");
                self.ctx.events.push(kind, Some(&name), message);
                None
            }
            Effect::Note(line) => {
                self.note(&line);
                None
            }
            Effect::Reply(to, response) => {
                if let Some(reply) = self.replies.remove(&to) {
                    let _ = reply.send(response);
                }
                None
            }
        }
    }

    fn mark(&self, down: bool) -> Result<(), String> {
        if down {
            if let Some(dir) = self.down_mark.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
            std::fs::write(&self.down_mark, b"").map_err(|e| {
                format!(
                    "cannot write the admin-down mark {}: {e}",
                    self.down_mark.display()
                )
            })
        } else {
            match std::fs::remove_file(&self.down_mark) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(format!(
                    "cannot remove the admin-down mark {}: {e}",
                    self.down_mark.display()
                )),
            }
        }
    }

    /// Checks the manifest, claims the role, looks it up (`getpwnam`, on a blocking thread:
    /// it may ask NSS over the network) and checks that it belongs to this service (the role
    /// registry, see `refuse.rs`). The uid is recorded (and so becomes killable) only once
    /// every check passed.
    async fn lookup_role(&mut self) -> Result<(u32, u32), RoleError> {
        let m = self.manifest();
        if let Some(why) = refuse::manifest_refusal(&m) {
            return Err(RoleError::Refused(why));
        }
        self.ctx
            .roles
            .claim(&m.role, &m.name)
            .map_err(RoleError::Taken)?;
        let role = m.role.clone();
        let registry = self.ctx.role_registry.clone();
        let found = tokio::task::spawn_blocking(move || {
            nix::unistd::User::from_name(&role)
                .map(|u| u.map(|u| (u, refuse::read_registry(&registry, &role))))
        })
        .await
        .map_err(|e| RoleError::Failed(format!("cannot look up role user {}: {e}", m.role)))?;
        match found {
            Ok(Some((u, registry))) => {
                let (uid, gid) = (u.uid.as_raw(), u.gid.as_raw());
                if let Some(why) = refuse::uid_refusal(&m.name, &m.role, uid, self.ctx.uid_min) {
                    return Err(RoleError::Refused(why));
                }
                let gecos = u.gecos.to_string_lossy();
                refuse::role_belongs(&m.name, &m.role, &registry, &gecos)
                    .map_err(RoleError::Refused)?;
                self.ids = Some((uid, gid));
                lock(&self.machine).set_role_known(true);
                Ok((uid, gid))
            }
            Ok(None) => Err(RoleError::Failed(format!(
                "role user {} does not exist; reinstall the {} package",
                m.role, m.name
            ))),
            Err(e) => Err(RoleError::Failed(format!(
                "cannot look up role user {}: {e}",
                m.role
            ))),
        }
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
            let mut machine = lock(&self.machine);
            if m.name == machine.manifest().name && m != *machine.manifest() {
                // Taken synchronously: a reload during a start changes nothing but the
                // manifest and the probes.
                let fx = machine.on(Event::Reload(Box::new(m)), Instant::now());
                drop(machine);
                for f in fx {
                    if let Effect::Note(line) = f {
                        self.note(&line);
                    }
                }
            }
        }
    }

    /// Starts the launch script: kill leftovers of the role first ("kill to gain control"),
    /// then spawn it in its own process group with its output to the log.
    ///
    /// `previous` is the process group of the run that just exited, when this is the
    /// immediate respawn after a run that lasted at least `fast_crash`. Then, if nothing is
    /// left in that group, the launch script is spawned at once, without the `/proc` scan for
    /// the role: the common restart (a crash or kill of a long-running daemon) costs a
    /// fork/exec, not a walk over every process on the host. A daemon that escaped the group
    /// (`setsid`) is caught by the next uid-based kill: the next start after a fast crash, a
    /// re-kick, a health kill, `down`.
    async fn start(&mut self, previous: Option<i32>) -> Event {
        self.reread_manifest();
        let (uid, gid) = match self.lookup_role().await {
            Ok(ids) => ids,
            Err(RoleError::Refused(why)) => return Event::Refused(Refusal::new(why)),
            Err(RoleError::Taken(why)) => {
                return Event::Refused(Refusal {
                    why,
                    role_taken: true,
                })
            }
            Err(RoleError::Failed(why)) => {
                eprintln!("keepup-agent: {}: {why}", self.name());
                return Event::SpawnFailed(why);
            }
        };
        let m = self.manifest();
        // The previous launch script is reaped: its group id may have been recycled, so the
        // group is only asked whether it has members (signal 0), never signalled or used to
        // pick victims; the service's cgroup, if any, answers exactly.
        let cgroup = crate::cgroup::for_service(&m.name);
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
            role::kill_role(&target, m.supervisor.stop_grace).await
        };
        if leftovers.termed > 0 {
            self.note(&format!(
                "killed {} leftover process(es) of role {} before starting ({} needed SIGKILL)",
                leftovers.termed, m.role, leftovers.killed
            ));
        }
        // The killed run's zombies still count against the role's process limit.
        let unreaped = crate::reaper::orphans_reaped(uid, 4 * crate::reaper::SETTLE).await;
        if unreaped > 0 {
            self.note(&format!(
                "{unreaped} exited process(es) of role {} not reaped yet; starting anyway",
                m.role
            ));
        }
        self.rebuild_probes();
        let mut env = vec![
            ("PATH".to_string(), PATH.to_string()),
            ("KEEPUP_SERVICE".to_string(), m.name.clone()),
        ];
        if m.ready() == Ready::Notify {
            match self.notify_socket(&m.name, uid, gid) {
                Ok(path) => {
                    env.push(("NOTIFY_SOCKET".into(), path));
                    if let Some(dog) = m.supervisor.watchdog {
                        env.push(("WATCHDOG_USEC".into(), dog.as_micros().to_string()));
                    }
                }
                Err(why) => return Event::SpawnFailed(why),
            }
        }
        // Output seen from a previous run's pump means nothing for this one.
        while self.sane_rx.try_recv().is_ok() {}
        let child = match self.spawn_launch(&m, &env) {
            Ok(c) => c,
            Err(why) => {
                eprintln!("keepup-agent: {}: {why}", m.name);
                return Event::SpawnFailed(why);
            }
        };
        let pid = child.id();
        self.ctx.spawned.insert(pid);
        self.run = Some((child, pid));
        let run = next_run_id(&self.ctx.runs);
        Event::Spawned {
            run,
            pid: pid as u32,
        }
    }

    /// The notify socket's path, bound for `uid` (bound again when the role changed).
    fn notify_socket(&mut self, name: &str, uid: u32, gid: u32) -> Result<String, String> {
        if self.notify.as_ref().is_none_or(|s| s.uid() != uid) {
            self.notify = None;
            let dir = self.ctx.cfg.notify_dir();
            let sock = NotifySocket::bind(&dir, name, uid, gid).map_err(|e| {
                format!(
                    "cannot create the notify socket {}: {e}",
                    dir.join(name).display()
                )
            })?;
            self.notify = Some(sock);
        }
        let path = self.notify.as_ref().map(|s| s.path().display().to_string());
        Ok(path.unwrap_or_default())
    }

    fn spawn_launch(&self, m: &Manifest, env: &[(String, String)]) -> Result<Launched, String> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| format!("cannot create a pipe for the log: {e}"))?;
        let write2 = write
            .try_clone()
            .map_err(|e| format!("cannot create a pipe for the log: {e}"))?;
        let cgroup = crate::cgroup::for_service(&m.name);
        let child = match &cgroup {
            // With cgroups, the launch script is created in its service's cgroup.
            Some(cg) => self.spawn_into(m, env, cg, write, write2)?,
            None => Launched::Tokio(self.spawn_command(m, env, None, write, write2)?),
        };
        let watch = crate::policy::SaneWatch::new(&m.name);
        tokio::spawn(pump(read, self.log.clone(), self.sane_tx.clone(), watch));
        Ok(child)
    }

    /// Spawns the launch script inside `cg` with `clone3`, or, where that is refused, with
    /// tokio and a `cgroup.procs` write between fork and exec.
    fn spawn_into(
        &self,
        m: &Manifest,
        env: &[(String, String)],
        cg: &crate::cgroup::ServiceCgroup,
        write: OwnedFd,
        write2: OwnedFd,
    ) -> Result<Launched, String> {
        use std::os::unix::ffi::OsStrExt;
        let cstring = |b: &[u8]| {
            std::ffi::CString::new(b).map_err(|_| {
                format!(
                    "cannot run {}: a NUL byte in its path or environment",
                    m.launch
                )
            })
        };
        let launch = crate::cgroup::Launch {
            program: cstring(std::path::Path::new(&m.launch).as_os_str().as_bytes())?,
            env: env
                .iter()
                .map(|(k, v)| cstring(format!("{k}={v}").as_bytes()))
                .collect::<Result<_, _>>()?,
            stdout: write,
            stderr: write2,
        };
        match cg.spawn(&launch) {
            Ok(child) => Ok(Launched::Pidfd(child)),
            Err(crate::cgroup::SpawnError::Failed(why)) => Err(why),
            Err(crate::cgroup::SpawnError::Unsupported(_)) => {
                let joiner = cg
                    .joiner()
                    .map_err(|e| format!("cannot put {} into its cgroup: {e}", m.launch))?;
                let child =
                    self.spawn_command(m, env, Some(&joiner), launch.stdout, launch.stderr)?;
                Ok(Launched::Tokio(child))
            }
        }
    }

    /// Spawns the launch script with tokio; with `joiner`, it joins its cgroup between fork
    /// and exec.
    fn spawn_command(
        &self,
        m: &Manifest,
        env: &[(String, String)],
        joiner: Option<&crate::cgroup::Joiner>,
        write: OwnedFd,
        write2: OwnedFd,
    ) -> Result<Child, String> {
        let mut cmd = Command::new(&m.launch);
        cmd.env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
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
            .map_err(|e| format!("cannot run {}: {e}", m.launch))?;
        // The child has the write ends now; ours close with `cmd`.
        drop(cmd);
        Ok(child)
    }

    /// The launch script's process group, while the launch script is the agent's unreaped
    /// child (its zombie holds the group id); `None` once it is reaped (`try_wait` reaps an
    /// exited one and keeps its status for `wait`).
    fn unreaped_group(&mut self) -> Option<i32> {
        let (child, pid) = self.run.as_mut()?;
        matches!(child.try_wait(), Ok(None)).then_some(*pid)
    }

    /// Kills the role (a health, watchdog or readiness kill); the supervisor (the agent, or
    /// systemd) then starts it again.
    async fn kill_role(&mut self) {
        let Some((uid, _)) = self.ids else { return };
        let m = self.manifest();
        let target = role::Target {
            uid,
            group: self.unreaped_group(),
            cgroup: crate::cgroup::for_service(&m.name),
        };
        let report = role::kill_role(&target, m.supervisor.stop_grace).await;
        self.note(&format!("health kill: {}", report.describe()));
    }

    /// Stops the service: role kill (with the launch script's process group), then reap;
    /// says how the run ended.
    async fn stop(&mut self, why: &str) -> Option<Event> {
        let m = self.manifest();
        let refused = matches!(
            lock(&self.machine).phase(),
            crate::machine::Phase::Refused(_)
        );
        if self.ids.is_none() && !refused {
            let _ = self.lookup_role().await;
        }
        // Without a (valid) role only the launch script's process group and the service's
        // cgroup are stopped: uid 0 is never a victim by uid.
        let target = role::Target {
            uid: self.ids.map_or(0, |(uid, _)| uid),
            group: self.unreaped_group(),
            cgroup: crate::cgroup::for_service(&m.name),
        };
        let report = role::kill_role(&target, m.supervisor.stop_grace).await;
        if report.termed > 0 {
            self.note(&format!(
                "stopped ({why}), role {}: {}",
                m.role,
                report.describe()
            ));
        }
        let (mut child, pid) = self.run.take()?;
        let status = tokio::time::timeout(REAP_WAIT, child.wait()).await;
        self.ctx.spawned.remove(pid);
        let status = status.ok()?;
        Some(Event::Exited {
            how: format!("{} (stopped: {why})", describe_status(&status)),
            not_sane: false,
        })
    }

    /// An operation on the supervisor that runs the service (systemd, runit, supervisord).
    async fn supervisor(&mut self, op: SupervisorOp) -> Option<Event> {
        let m = self.manifest();
        let outside = Outside::of(&m)?;
        let spawned = self.ctx.spawned.clone();
        let force = match op {
            SupervisorOp::Stop => {
                if let Err(e) = outside.stop(&spawned).await {
                    self.note(&e);
                }
                return None;
            }
            SupervisorOp::Show => {
                let shown = outside.look(&spawned).await;
                return Some(Event::Unit {
                    shown: shown.map(|l| self.seen(l)),
                    rekicked: None,
                });
            }
            SupervisorOp::Begin { force } => {
                match self.lookup_role().await {
                    Err(RoleError::Refused(why)) => return Some(Event::Refused(Refusal::new(why))),
                    Err(RoleError::Taken(why)) => {
                        return Some(Event::Refused(Refusal {
                            why,
                            role_taken: true,
                        }))
                    }
                    Err(RoleError::Failed(why)) => self.note(&why),
                    Ok(_) => {}
                }
                self.rebuild_probes();
                force
            }
            SupervisorOp::Rekick => false,
        };
        let state = outside.look(&spawned).await;
        // An admin's runit `down` file makes `needs_rekick` false: only an explicit `up`
        // (`force`) starts such a service, and the file stays.
        let needs = state.as_ref().map_or(true, |s| s.needs_rekick);
        let rekicked = if needs || force {
            let r = outside.rekick(&spawned).await;
            match &r {
                Ok(()) => self.note(&format!(
                    "re-kicked {}: {}{}",
                    outside.describe(),
                    outside.rekick_words(),
                    match &state {
                        Ok(s) => format!(" (it was {})", s.detail),
                        Err(_) => String::new(),
                    }
                )),
                Err(e) => self.note(e),
            }
            Some(r)
        } else {
            None
        };
        Some(Event::Unit {
            shown: state.map(|l| self.seen(l)),
            rekicked,
        })
    }

    /// What the machine needs of a look: the state, the pid, the restarts (systemd's count,
    /// or the new pids the agent has seen) and the supervisor's words.
    fn seen(&mut self, l: Look) -> (ServiceState, Option<u32>, u64, String) {
        let restarts = match l.restarts {
            Some(n) => n,
            None => {
                let (last, count) = &mut self.outside_pids;
                if let Some(pid) = l.pid {
                    if last.is_some_and(|p| p != pid) {
                        *count += 1;
                    }
                    *last = Some(pid);
                }
                *count
            }
        };
        (l.state, l.pid, restarts, l.detail)
    }

    // ---- probes ----

    fn rebuild_probes(&mut self) {
        let run_as = self.ids.map(|(uid, gid)| RunAs { uid, gid });
        let m = self.manifest();
        self.probes = m
            .checks
            .iter()
            .map(|c| build_probe(&c.probe, run_as))
            .collect();
        // A probe that cannot be built is failing from the start, with the reason, and stays
        // so until the manifest is fixed: the service never looks healthy because of it. It
        // is not run, so it never counts toward a health kill (killing the service would not
        // fix its manifest, and would crash-loop it).
        let built = self
            .probes
            .iter()
            .map(|p| {
                let kind = match p {
                    Ok(_) => None,
                    Err(ProbeProblem::Invalid(why)) => {
                        Some(ProbeProblemKind::Invalid(broken_reason(&m.name, why)))
                    }
                    Err(ProbeProblem::RoleUnknown) => Some(ProbeProblemKind::RoleUnknown),
                };
                (describe(p), kind)
            })
            .collect();
        lock(&self.machine).set_probes(built, Instant::now());
    }

    /// `check`: runs every probe now, without counting towards the failure streaks.
    fn check_now(&self, reply: oneshot::Sender<Response>) {
        let m = self.manifest();
        let probes: Vec<(String, Result<Probe, ProbeProblem>, Duration)> = m
            .checks
            .iter()
            .zip(
                self.probes
                    .iter()
                    .cloned()
                    .chain(std::iter::repeat(Err(ProbeProblem::RoleUnknown))),
            )
            .map(|(c, p)| (c.name.clone(), p, c.timeout))
            .collect();
        let name = m.name.clone();
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

/// Why the role could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RoleError {
    /// The manifest is refused (see `refuse.rs`): no start until it is looked at again.
    Refused(String),
    /// Another service holds the role (refused too, but the claim is the other's).
    Taken(String),
    /// A lookup failed (no such user, NSS down): counts as a failed start.
    Failed(String),
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
/// `run-<name>: not sane:` line (sends true) and its `environment sane; exec` line (false).
/// Ends when every writer (the launch script and anything that inherited its output) is gone.
async fn pump(
    read: OwnedFd,
    log: SharedLog,
    said: mpsc::UnboundedSender<bool>,
    mut watch: crate::policy::SaneWatch,
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
        if let Some(s) = watch.feed(&buf[..n]) {
            let _ = said.send(s);
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
