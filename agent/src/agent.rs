//! `keepup-agent run`: the agent's top level. Takes the lock (a second agent refuses to
//! start), becomes the child subreaper, opens the control socket, follows the manifest
//! directory (a service per manifest; added -> started, removed -> stopped and its role
//! killed), runs the re-kick timer, answers control requests, starts the runner of update
//! passes and reports (each in a short-lived `keepup-agent-pass` child, see `runner.rs`) when
//! they are configured, and on SIGTERM stops every service and exits 0.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use keepup_packager::manifest::Manifest;
use nix::fcntl::{Flock, FlockArg};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::control::{self, Incoming, Request, Response};
use crate::events::Events;
use crate::reaper::{self, Spawned};
use crate::refuse::Roles;
use crate::runner::{Program, Runner};
use crate::service::{self, Ctx, Handle, ServiceCommand};
use crate::statefile::open_lock_file;
use crate::watch::DirWatch;
use keepup_deploy::wire::{EventKind, ServiceState};

/// Upper bound on the shutdown: every service's stop runs in parallel within its
/// `stop_grace`; this covers the longest plus reaping.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(10);

/// Holds the agent lock: an exclusive `flock` on `agent.lock` in the state directory, a file
/// only root can open (mode 0600, in a root-owned directory no one else can write), so no other
/// user can hold the lock and make the agent think another one runs. Nothing is written into
/// the file (it is not a pidfile); the kernel drops the lock when the agent dies, however it
/// dies. The path does not depend on `--socket`: one agent per state directory, whatever
/// socket it answers on.
pub struct AgentLock {
    _lock: Flock<File>,
}

/// Takes the agent lock or explains who has it.
pub fn lock(cfg: &Config) -> Result<AgentLock> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let path = cfg.lock_path();
    let me = nix::unistd::geteuid().as_raw();
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
        if meta.uid() != me || meta.mode() & 0o022 != 0 {
            bail!(
                "{} must be owned by uid {me} and writable by no one else (it is uid {}, mode                  {:o}): another user could take the agent lock in it",
                dir.display(),
                meta.uid(),
                meta.mode() & 0o7777
            );
        }
    }
    let file = open_lock_file(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    let meta = file.metadata()?;
    if meta.uid() != me {
        bail!(
            "the lock file {} belongs to uid {}, not {me}; remove it",
            path.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", path.display()))?;
    }
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(AgentLock { _lock: lock }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => bail!(
            "another keepup-agent is already running: it holds the lock on {}. \
             Ask it with `keepup-agent status` (or find it with `fuser -v {}`), and stop it \
             before starting a new one",
            path.display(),
            path.display()
        ),
        Err((_, e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

/// Runs the agent until SIGTERM or SIGINT. `config` is the file it was started with (its
/// keepup-agent-pass children read it too).
pub async fn run(cfg: Config, config: Option<PathBuf>) -> Result<()> {
    let _lock = lock(&cfg)?;
    reaper::become_subreaper().context("becoming the child subreaper")?;
    match crate::cgroup::init() {
        Ok(c) => eprintln!(
            "keepup-agent: stopping services with cgroup.kill: one cgroup each under {}/{}",
            c.own.display(),
            crate::cgroup::SERVICES
        ),
        Err(why) => eprintln!(
            "keepup-agent: stopping services by freezing, then killing their processes: {why}"
        ),
    }
    let status_gid = control::status_gid(cfg.status_group.as_deref());
    let listener = control::bind(&cfg.socket, status_gid)?;
    let mut sigterm = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    let spawned = Spawned::default();
    tokio::spawn(reaper::run(spawned.clone()));
    let (to_agent, mut requests) = mpsc::channel::<Incoming>(16);
    tokio::spawn(control::serve(listener, to_agent.clone(), status_gid));

    let cfg = Arc::new(cfg);
    eprintln!(
        "keepup-agent: supervising services from {} (control socket {}, re-kick every {})",
        cfg.manifest_dir.display(),
        cfg.socket.display(),
        keepup_packager::spec::format_duration(cfg.rekick_every)
    );
    let events = Events::persistent(cfg.state_dir.join("events.json"));
    events.push(
        EventKind::AgentStart,
        None,
        format!("keepup-agent started (pid {})", std::process::id()),
    );
    let program = Program::beside_this_binary(config.as_deref(), &cfg.socket);
    let runner = Runner::start(&cfg, program, &spawned, &events);
    let mut agent = Agent {
        ctx: Ctx {
            cfg: cfg.clone(),
            spawned,
            roles: Roles::default(),
            uid_min: crate::refuse::uid_min(),
            role_registry: PathBuf::from(crate::refuse::ROLE_REGISTRY),
            epoch: Instant::now(),
            events,
            registry: crate::order::Registry::default(),
            runs: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        },
        runner,
        services: BTreeMap::new(),
        stopping: HashMap::new(),
        seen: HashMap::new(),
    };
    // Set up before the first scan, so nothing added meanwhile is missed. Idle, the agent
    // does not wake up at all: the directory is watched, and each service task sleeps until
    // its child exits, a probe or re-kick is due, or a request comes.
    let mut watch = DirWatch::new(&cfg.manifest_dir, cfg.scan_every);
    if !agent.sync_manifests() {
        watch.rescan_within(cfg.scan_every);
    }
    let why = loop {
        tokio::select! {
            _ = watch.changed() => {
                if !agent.sync_manifests() {
                    watch.rescan_within(cfg.scan_every);
                }
            }
            Some((req, reply)) = requests.recv() => agent.request(req, reply),
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
        }
    };
    eprintln!("keepup-agent: {why}: stopping every service");
    // The keepup-agent-pass child in flight is stopped meanwhile: a package-manager run it
    // has under way may finish (it may be the upgrade of this very agent, whose postinst is
    // what stopped it). Until it is done, the events it sends are still recorded.
    let runner = agent.runner.take();
    let events = agent.ctx.events.clone();
    let stopping = async {
        tokio::join!(
            async {
                if let Some(r) = &runner {
                    r.stop().await;
                }
            },
            agent.shutdown()
        )
    };
    let answering = async {
        while let Some((req, reply)) = requests.recv().await {
            let answer = match req {
                Request::Event {
                    kind,
                    service,
                    message,
                } => {
                    events.push(kind, service.as_deref(), message);
                    Response {
                        ok: true,
                        ..Response::default()
                    }
                }
                _ => Response::failed("keepup-agent is stopping"),
            };
            let _ = reply.send(answer);
        }
    };
    tokio::select! {
        _ = stopping => {}
        _ = answering => {}
    }
    let _ = std::fs::remove_file(&cfg.socket);
    eprintln!("keepup-agent: stopped");
    Ok(())
}

/// Identity of a manifest file version: reparse only when it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileKey {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

struct Agent {
    ctx: Ctx,
    /// Starts update passes and reports in keepup-agent-pass children (`None`: neither
    /// the updater nor the reporter is configured).
    runner: Option<Runner>,
    services: BTreeMap<String, Handle>,
    /// Services whose manifest was removed, still stopping: a service of the same name is not
    /// started again until its old task has finished (its role kill would kill the new run).
    stopping: HashMap<String, tokio::task::JoinHandle<()>>,
    /// Manifest files last seen, with what they parsed to, or why they are not supervised
    /// (unreadable, not a manifest, a refused value: reported once per file version, and
    /// shown by `status` and in reports as a `refused` entry).
    seen: HashMap<PathBuf, (FileKey, Result<Manifest, String>)>,
}

impl Agent {
    /// Brings the set of services in line with the manifest directory. False if a change
    /// could not be handed on yet (a service's queue was full): look again soon.
    fn sync_manifests(&mut self) -> bool {
        let mut complete = true;
        let dir = self.ctx.cfg.manifest_dir.clone();
        let files = list_manifests(&dir);
        self.seen.retain(|p, _| files.contains(p));
        let mut wanted: BTreeMap<String, (Manifest, PathBuf)> = BTreeMap::new();
        for path in files {
            let Some(key) = file_key(&path) else { continue };
            let fresh = !matches!(self.seen.get(&path), Some((k, _)) if *k == key);
            if fresh {
                let parsed = read_manifest(&path);
                if let Err(why) = &parsed {
                    self.ctx.events.push(EventKind::Refused, None, why.clone());
                }
                self.seen.insert(path.clone(), (key, parsed));
            }
            match self.seen.get(&path) {
                Some((_, Ok(m))) => {
                    if let Some((other, _)) = wanted.get(&m.name) {
                        if fresh {
                            eprintln!(
                                "keepup-agent: {}: service {} is already defined by another \
                                 manifest (version {}); ignoring this one",
                                path.display(),
                                m.name,
                                other.version
                            );
                        }
                        continue;
                    }
                    wanted.insert(m.name.clone(), (m.clone(), path.clone()));
                }
                // Unreadable or refused now: keep whatever runs under that file's name as it
                // is (`status` shows why the file is not used).
                _ => {
                    if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                        if let Some(h) = self.services.get(stem) {
                            wanted.insert(stem.to_string(), (h.manifest.clone(), path.clone()));
                        }
                    }
                }
            }
        }
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(h) = self.services.remove(&name) {
                eprintln!("keepup-agent: {name}: manifest removed; stopping it");
                let (done, _) = oneshot::channel();
                // The task stops the service and ends on its own; `send` waits for room in a
                // full queue instead of dropping the stop.
                let tx = h.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(ServiceCommand::Stop { remove: true, done }).await;
                });
                self.stopping.insert(name, h.task);
            }
        }
        self.stopping.retain(|_, task| !task.is_finished());
        for (name, (m, path)) in wanted {
            match self.services.get_mut(&name) {
                Some(h) if h.manifest != m => {
                    // Recorded only once the task has it: a full queue is retried by a rescan
                    // soon.
                    if h.tx
                        .try_send(ServiceCommand::Reload(Box::new(m.clone())))
                        .is_ok()
                    {
                        h.manifest = m;
                    } else {
                        complete = false;
                    }
                }
                Some(_) => {}
                None if self.stopping.contains_key(&name) => {
                    // Removed and added again: wait for the old one to finish stopping, and
                    // look again soon.
                    complete = false;
                }
                None => {
                    eprintln!(
                        "keepup-agent: {name}: new manifest ({} {}); starting it",
                        m.version, m.launch
                    );
                    let h = service::spawn(self.ctx.clone(), m, path);
                    self.services.insert(name, h);
                }
            }
        }
        complete
    }

    fn request(&mut self, req: Request, reply: oneshot::Sender<Response>) {
        let find = |name: &str| -> Result<&Handle, Response> {
            self.services.get(name).ok_or_else(|| {
                let known: Vec<&str> = self.services.keys().map(String::as_str).collect();
                Response::failed(format!(
                    "no service {name:?} (known: {}); its manifest would be {}",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    },
                    self.ctx
                        .cfg
                        .manifest_dir
                        .join(format!("{name}.yaml"))
                        .display()
                ))
            })
        };
        let forward = |h: &Handle, cmd: ServiceCommand| {
            if let Err(e) = h.tx.try_send(cmd) {
                let (why, cmd) = match e {
                    mpsc::error::TrySendError::Full(c) => {
                        ("is busy (too many requests queued); try again", c)
                    }
                    mpsc::error::TrySendError::Closed(c) => ("is being removed", c),
                };
                if let Some(reply) = cmd.into_reply() {
                    let _ = reply.send(Response::failed(format!(
                        "service {} {why}",
                        h.manifest.name
                    )));
                }
            }
        };
        match req {
            Request::Status => {
                let now = Instant::now();
                let services: Vec<_> = self.services.values().map(|h| h.status(now)).collect();
                let mut services = services;
                self.show_refused_files(&mut services);
                let _ = reply.send(Response {
                    ok: true,
                    services,
                    ..Response::default()
                });
            }
            Request::Down { service } => match find(&service) {
                Ok(h) => forward(h, ServiceCommand::Down(reply)),
                Err(r) => drop(reply.send(r)),
            },
            Request::Up { service } => match find(&service) {
                Ok(h) => forward(h, ServiceCommand::Up(reply)),
                Err(r) => drop(reply.send(r)),
            },
            Request::Check { service } => match find(&service) {
                Ok(h) => forward(h, ServiceCommand::Check(reply)),
                Err(r) => drop(reply.send(r)),
            },
            Request::Rekick {
                service: Some(service),
            } => match find(&service) {
                Ok(h) => forward(h, ServiceCommand::Rekick(Some(reply))),
                Err(r) => drop(reply.send(r)),
            },
            Request::Update => match &self.runner {
                Some(r) if self.ctx.cfg.updater.is_some() => r.update(reply),
                _ => drop(reply.send(Response::failed(format!(
                    "the updater is off: no `repo` in the configuration (see `keepup-agent \
                     update --now` in docs/agent.md; state directory {})",
                    self.ctx.cfg.state_dir.display()
                )))),
            },
            Request::Event {
                kind,
                service,
                message,
            } => {
                self.ctx.events.push(kind, service.as_deref(), message);
                let _ = reply.send(Response {
                    ok: true,
                    ..Response::default()
                });
            }
            Request::Events => {
                let _ = reply.send(Response {
                    ok: true,
                    events: Some(Box::new(crate::proto::EventList(self.ctx.events.list()))),
                    ..Response::default()
                });
            }
            Request::Rekick { service: None } => {
                let mut answers = Vec::new();
                for h in self.services.values() {
                    let (tx, rx) = oneshot::channel();
                    forward(h, ServiceCommand::Rekick(Some(tx)));
                    answers.push(rx);
                }
                tokio::spawn(async move {
                    let mut lines = Vec::new();
                    for rx in answers {
                        if let Ok(r) = rx.await {
                            lines.extend(r.message.or(r.error));
                        }
                    }
                    if lines.is_empty() {
                        lines.push("no services".into());
                    }
                    let _ = reply.send(Response::done(lines.join("\n")));
                });
            }
        }
    }

    /// Adds the manifest files that are not used (unreadable, not a manifest, a refused
    /// value) to a status: as a `refused` entry named after the file, or, when a service of
    /// that name runs from an earlier version of the file, as a note on it.
    fn show_refused_files(&self, services: &mut Vec<crate::proto::ServiceStatus>) {
        let mut refused: Vec<(&PathBuf, &String)> = self
            .seen
            .iter()
            .filter_map(|(p, (_, r))| r.as_ref().err().map(|why| (p, why)))
            .collect();
        refused.sort();
        for (path, why) in refused {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Some(s) = services.iter_mut().find(|s| s.name == stem) {
                s.note = Some(format!(
                    "{}still running the manifest read before: {why}",
                    s.note
                        .as_deref()
                        .map(|n| format!("{n}; "))
                        .unwrap_or_default()
                ));
                continue;
            }
            services.push(crate::proto::ServiceStatus {
                name: stem,
                version: String::new(),
                supervisor: "-".into(),
                state: ServiceState::Refused,
                pid: None,
                uptime_secs: None,
                restarts: 0,
                last_exit: None,
                note: Some(format!("{} {why}", crate::refuse::REFUSING)),
                run: None,
                ready_secs: None,
                status_text: None,
                probes: Vec::new(),
            });
        }
    }

    /// Stops every service and waits (bounded) for them: those that start after others
    /// first, layer by layer ([`crate::order::stop_layers`]), each layer in parallel.
    async fn shutdown(&mut self) {
        let longest = self
            .services
            .values()
            .map(|h| h.manifest.supervisor.stop_grace)
            .max()
            .unwrap_or_default();
        let after: BTreeMap<String, Vec<String>> = self
            .services
            .iter()
            .map(|(n, h)| (n.clone(), h.manifest.supervisor.after.clone()))
            .collect();
        let layers = crate::order::stop_layers(&after);
        let rounds = layers.len() as u32 + 1;
        let mut services = std::mem::take(&mut self.services);
        let stopping: Vec<_> = self.stopping.drain().map(|(_, t)| t).collect();
        let all = async {
            for layer in layers {
                let mut waits = Vec::new();
                for name in layer {
                    let Some(h) = services.remove(&name) else {
                        continue;
                    };
                    let (done, rx) = oneshot::channel();
                    if h.tx
                        .send(ServiceCommand::Stop {
                            remove: false,
                            done,
                        })
                        .await
                        .is_ok()
                    {
                        waits.push(rx);
                    }
                }
                for rx in waits {
                    let _ = rx.await;
                }
            }
            // Services whose manifest was removed and that are still stopping.
            for task in stopping {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(longest * rounds + SHUTDOWN_SLACK, all)
            .await
            .is_err()
        {
            eprintln!("keepup-agent: some services did not stop in time");
        }
    }
}

/// `*.yaml` files in the manifest directory (none if it does not exist).
fn list_manifests(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn file_key(path: &Path) -> Option<FileKey> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileKey {
        modified: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
    })
}

/// Reads, parses and validates one manifest (its values, and that its file is
/// `<name>.yaml`); problems are reported on stderr (once per file version) and returned.
fn read_manifest(path: &Path) -> Result<Manifest, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let why = format!("{}: {e}", path.display());
        eprintln!("keepup-agent: {why}");
        why
    })?;
    Manifest::parse_file(path, &text).map_err(|e| {
        eprintln!("keepup-agent: {e} (ignored until the file changes)");
        e.to_string()
    })
}
