//! One supervised service as a pure state machine: `on(event, now) -> Vec<Effect>` over one
//! explicit [`Phase`]. Nothing here touches a process, a file or a clock: `service.rs` turns
//! the world into [`Event`]s (a child exited, a probe answered, a timer fired, a request came,
//! the daemon said `READY=1`) and carries out the [`Effect`]s (spawn, kill the role,
//! `systemctl`, write the admin-down mark, record an event, answer a client). The status a
//! client sees is derived from the phase ([`Machine::status`]), never stored beside it.
//!
//! The supervisors are match arms: an agent-run service moves through `Launching`, `Up`,
//! `Backoff` and `GivenUp`; one that systemd, runit or supervisord runs sits in `Unit`, where
//! the agent only watches, probes and re-kicks (`external.rs`). `Down`, `Refused` and
//! `Waiting` are shared.

use std::time::{Duration, Instant};

use keepup_checks::ProbeResult;
use keepup_deploy::wire::{EventKind, ServiceState};
use keepup_packager::manifest::{Manifest, ManifestCheck, Ready, Supervised};
use keepup_packager::spec::format_duration;

use crate::policy::{self, AfterExit, Respawn, StartHistory};
use crate::proto::{ProbeStatus, Response, ServiceStatus};

/// Delay before trying again when a start could not even spawn (no role user, no launch
/// script): it counts as a start, so the give-up limit applies.
pub const SPAWN_RETRY: Duration = Duration::from_secs(5);
/// How often the state of a service another supervisor runs is looked at.
pub const UNIT_POLL: Duration = Duration::from_secs(5);

/// Which client request an answer goes to (the executor keeps the channels).
pub type ReplyTo = u64;

/// Where a service stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Created, not begun yet.
    Idle,
    /// Waits for the services it starts after (or, with a cycle among them, is refused).
    Waiting,
    /// A start is in progress: leftovers killed, role looked up, launch script spawned.
    Launching,
    /// The launch script runs.
    Up(Run),
    /// The launch script exited; the next start is due at `until`.
    Backoff {
        /// When the next start is due.
        until: Instant,
        /// The run said its environment is not sane.
        not_sane: bool,
    },
    /// Started `count` times within `within`: nothing starts it but a re-kick.
    GivenUp,
    /// Admin-down (the mark exists).
    Down,
    /// Not supervised: why.
    Refused(String),
    /// systemd runs it; the agent watches the unit.
    Unit(UnitView),
}

/// The current run of the launch script.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// The run's id, unique across the agent's restarts ([`ServiceStatus::run`]).
    pub id: u64,
    /// The launch script's pid (the daemon's, after its `exec`).
    pub pid: u32,
    /// When it was spawned.
    pub started: Instant,
    /// When it became ready.
    pub ready_at: Option<Instant>,
    /// The launch script said `not sane:` and is about to exit.
    pub not_sane: bool,
    /// The daemon sent `STOPPING=1`.
    pub stopping: bool,
    /// The daemon's `STATUS=` text.
    pub status_text: Option<String>,
    /// The daemon's `MAINPID=`.
    pub main_pid: Option<u32>,
    /// The last `WATCHDOG=1` (or the moment it became ready).
    pub last_ping: Option<Instant>,
    /// Why the agent killed this run, if it did.
    pub killed_for: Option<String>,
}

/// What the agent last saw of a systemd unit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UnitView {
    /// The state it maps to (`None`: not looked at yet).
    pub state: Option<ServiceState>,
    /// Its main pid.
    pub pid: Option<u32>,
    /// Restarts systemd did.
    pub restarts: u64,
    /// Why it is given up, when it is.
    pub note: Option<String>,
    /// Since when it is active.
    pub since: Option<Instant>,
    /// The re-kick failed: why.
    pub failed: Option<String>,
}

/// What the dependencies (`supervisor.after`) allow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Deps {
    /// Every dependency is ready (or there are none).
    #[default]
    Clear,
    /// These are not ready: (name, why).
    Blocked(Vec<(String, String)>),
    /// The services' `after` entries form a cycle (the names, in order, back to this one).
    Cycle(Vec<String>),
}

/// The agent-wide settings a machine needs.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Fast-crash threshold and respawn ceiling.
    pub respawn: Respawn,
    /// The re-kick timer period.
    pub rekick_every: Duration,
    /// When the agent started (the re-kick timer's epoch).
    pub epoch: Instant,
}

/// Something that happened.
#[derive(Debug, Clone)]
pub enum Event {
    /// The task starts; `down`: the admin-down mark exists.
    Begin {
        /// The admin-down mark exists.
        down: bool,
    },
    /// A start spawned the launch script.
    Spawned {
        /// The run's id.
        run: u64,
        /// Its pid.
        pid: u32,
    },
    /// A start could not spawn (no role user, no launch script): counts as a fast crash.
    SpawnFailed(String),
    /// The manifest is refused (see `refuse.rs`).
    Refused(Refusal),
    /// The launch script exited: how (`exit status 3`), and whether it said `not sane:`.
    Exited {
        /// `exit status 3`, `killed by SIGKILL`.
        how: String,
        /// It printed `run-<name>: not sane:`.
        not_sane: bool,
    },
    /// The launch script's output said `not sane:` (true) or `environment sane; exec` (false).
    SaneLine(bool),
    /// A probe finished.
    Probe {
        /// Which probe.
        index: usize,
        /// The generation it was started in (older ones are ignored).
        generation: u64,
        /// Its result.
        result: ProbeResult,
    },
    /// A deadline ([`Machine::next_deadline`]) passed.
    Timer,
    /// `keepup-agent down`.
    Down(ReplyTo),
    /// `keepup-agent up`.
    Up(ReplyTo),
    /// The admin-down mark was written (`down: true`) or removed, or could not be.
    Marked {
        /// Which way.
        down: bool,
        /// Who asked.
        reply: ReplyTo,
        /// Failure, for the client.
        result: Result<(), String>,
    },
    /// `keepup-agent rekick` (with a reply) or the re-kick timer.
    Rekick(Option<ReplyTo>),
    /// The manifest file changed.
    Reload(Box<Manifest>),
    /// The manifest was removed (`remove`) or the agent is stopping.
    Stop {
        /// Gone for good: stop a systemd unit too, and release the role.
        remove: bool,
    },
    /// A role kill the machine asked for is done.
    Killed,
    /// The daemon sent `READY=1`.
    Ready,
    /// The daemon sent `WATCHDOG=1`.
    Watchdog,
    /// The daemon sent `STOPPING=1`.
    Stopping,
    /// The daemon sent `STATUS=...`.
    StatusText(String),
    /// The daemon sent `MAINPID=...`.
    MainPid(u32),
    /// What the dependencies allow now.
    Deps(Deps),
    /// A look at the systemd unit (after a poll or re-kick).
    Unit {
        /// The unit's state, or why it could not be read.
        shown: Result<(ServiceState, Option<u32>, u64, String), String>,
        /// A re-kick was done: its outcome.
        rekicked: Option<Result<(), String>>,
    },
}

/// Why a manifest is not supervised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// For people.
    pub why: String,
    /// Another service holds the role: its claim is not this service's to give up.
    pub role_taken: bool,
}

impl Refusal {
    /// A refusal for `why` (the role is not held by another service).
    pub fn new(why: impl Into<String>) -> Refusal {
        Refusal {
            why: why.into(),
            role_taken: false,
        }
    }
}

/// Something to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Start the launch script: kill leftovers of the role (only the process group
    /// `previous` is checked when given), look the role up, spawn. Answers with
    /// [`Event::Spawned`], [`Event::SpawnFailed`] or [`Event::Refused`].
    Spawn {
        /// The process group of the run that just exited, for the cheap leftover check.
        previous: Option<u32>,
    },
    /// Kill the role (health, watchdog or readiness kill); answers with [`Event::Killed`].
    KillRole(String),
    /// Stop the service: role kill with the launch script's group, then reap it.
    StopRun(String),
    /// An operation on the supervisor that runs the service (systemd, runit, supervisord).
    Supervisor(SupervisorOp),
    /// Write (`true`) or remove the admin-down mark; answers with [`Event::Marked`].
    Mark {
        /// Which way.
        down: bool,
        /// Who asked.
        reply: ReplyTo,
    },
    /// Run these probes (indexes) for `generation`.
    RunProbes {
        /// Probe indexes.
        which: Vec<usize>,
        /// The generation their results must match.
        generation: u64,
    },
    /// Rebuild the probes (the manifest or the role changed).
    RebuildProbes,
    /// Give up the role claim (refused for a reason other than a taken role, or removed).
    ReleaseRole,
    /// Record an event for reports (and say it on stderr).
    Record(EventKind, String),
    /// A line in the service's log.
    Note(String),
    /// Answer a client.
    Reply(ReplyTo, Response),
}

/// An operation on the supervisor that runs the service (`external.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SupervisorOp {
    /// Look the role up, then re-kick the unit if it is not active (always, with `force`);
    /// answers with [`Event::Unit`] (or [`Event::Refused`]).
    Begin {
        /// Re-kick even an active unit.
        force: bool,
    },
    /// Re-kick if not active; answers with [`Event::Unit`].
    Rekick,
    /// Read the unit's state; answers with [`Event::Unit`].
    Show,
    /// Admin-down: `systemctl stop`, `sv down`, `supervisorctl stop`.
    Stop,
}

/// One probe's schedule and streak.
#[derive(Debug, Clone, PartialEq)]
struct Slot {
    spec: ManifestCheck,
    describe: String,
    /// Why it cannot run (a broken manifest), or `None`.
    broken: Option<String>,
    /// Cannot run yet: an exec probe while the role is unknown.
    waiting_role: bool,
    next: Option<Instant>,
    running: bool,
    failures: u32,
    ok: Option<bool>,
    reason: Option<String>,
    at: Option<Instant>,
    /// Passed at least once in the current run.
    passed: bool,
}

/// The machine.
#[derive(Debug, Clone)]
pub struct Machine {
    m: Manifest,
    tuning: Tuning,
    phase: Phase,
    history: StartHistory,
    fast_streak: u32,
    starts: u64,
    last_exit: Option<String>,
    probes: Vec<Slot>,
    generation: u64,
    deps: Deps,
    rekick_at: Option<Instant>,
    unit_poll_at: Option<Instant>,
    /// Whether the role's uid is known (a health kill has something to kill).
    role_known: bool,
    /// A `rekick` of a refused manifest, answered once the new look is done.
    look_reply: Option<ReplyTo>,
}

impl Machine {
    /// A machine for `m`, not begun.
    pub fn new(m: Manifest, tuning: Tuning) -> Machine {
        let mut machine = Machine {
            m,
            tuning,
            phase: Phase::Idle,
            history: StartHistory::new(),
            fast_streak: 0,
            starts: 0,
            last_exit: None,
            probes: Vec::new(),
            generation: 0,
            deps: Deps::Clear,
            rekick_at: None,
            unit_poll_at: None,
            role_known: false,
            look_reply: None,
        };
        machine.reset_probes();
        machine
    }

    /// The manifest in use.
    pub fn manifest(&self) -> &Manifest {
        &self.m
    }

    /// The phase.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The executor knows the role's uid now (or no more).
    pub fn set_role_known(&mut self, known: bool) {
        self.role_known = known;
    }

    /// Takes what the executor built of each probe: how `status` describes it, and why it
    /// cannot run (broken: failing until the manifest is fixed; an exec probe while the role
    /// is unknown: not run yet).
    pub fn set_probes(&mut self, built: Vec<(String, Option<ProbeProblemKind>)>, now: Instant) {
        for (slot, (describe, p)) in self.probes.iter_mut().zip(built) {
            slot.describe = describe;
            slot.waiting_role = p == Some(ProbeProblemKind::RoleUnknown);
            slot.broken = match p {
                Some(ProbeProblemKind::Invalid(why)) => Some(why),
                _ => None,
            };
            if slot.broken.is_some() {
                slot.ok = Some(false);
                slot.at = Some(now);
                slot.reason = slot.broken.clone();
            }
        }
    }

    /// systemd, runit or supervisord runs it: the agent watches, probes and re-kicks.
    fn external(&self) -> bool {
        self.m.supervisor.kind.is_external()
    }

    fn ready_mode(&self) -> Ready {
        self.m.ready()
    }

    fn note(&self, fx: &mut Vec<Effect>, s: impl Into<String>) {
        fx.push(Effect::Note(s.into()));
    }

    fn down_note(&self) -> String {
        format!(
            "admin-down; `keepup-agent up {}` starts it again",
            self.m.name
        )
    }

    /// The earliest moment the machine wants an [`Event::Timer`].
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut at: Vec<Instant> = Vec::new();
        at.extend(self.rekick_at);
        at.extend(self.unit_poll_at);
        if let Phase::Backoff { until, .. } = &self.phase {
            at.push(*until);
        }
        if self.probing() {
            at.extend(
                self.probes
                    .iter()
                    .filter(|s| !s.running && s.broken.is_none() && !s.waiting_role)
                    .filter_map(|s| s.next),
            );
        }
        if let Phase::Up(run) = &self.phase {
            if run.ready_at.is_none() && !run.not_sane && run.killed_for.is_none() {
                at.push(run.started + self.m.ready_timeout());
                if self.ready_mode() == Ready::Exec {
                    at.push(run.started + self.tuning.respawn.fast_crash);
                }
            }
            if let (Some(dog), Some(ping)) = (self.m.supervisor.watchdog, run.last_ping) {
                if run.killed_for.is_none() {
                    at.push(ping + dog);
                }
            }
        }
        at.into_iter().min()
    }

    /// Whether probes run now.
    fn probing(&self) -> bool {
        match &self.phase {
            Phase::Up(run) => !run.not_sane,
            Phase::Unit(u) => u.state.as_ref() != Some(&ServiceState::GivenUp),
            _ => false,
        }
    }

    /// Whether the re-kick timer has anything to do.
    fn wants_rekick(&self) -> bool {
        match &self.phase {
            Phase::GivenUp | Phase::Refused(_) | Phase::Unit(_) => true,
            Phase::Waiting => matches!(self.deps, Deps::Cycle(_)),
            _ => false,
        }
    }

    /// Whether a start or a systemd look is in flight (a refused manifest being looked at).
    fn awaiting_look(&self) -> bool {
        match &self.phase {
            Phase::Launching => true,
            Phase::Unit(u) => u.state.is_none(),
            _ => false,
        }
    }

    /// Handles `event` at `now`.
    pub fn on(&mut self, event: Event, now: Instant) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.handle(event, now, &mut fx);
        if self.look_reply.is_some() && !self.awaiting_look() {
            let name = &self.m.name;
            let r = match &self.phase {
                Phase::Refused(why) => Response::done(format!("{name}: still refused: {why}")),
                _ => Response::done(format!("{name}: re-kicked")),
            };
            fx.extend(self.look_reply.take().map(|to| Effect::Reply(to, r)));
        }
        if !self.wants_rekick() {
            self.rekick_at = None;
        } else if self.rekick_at.is_none() {
            self.rekick_at = Some(policy::next_tick(
                self.tuning.epoch,
                self.tuning.rekick_every,
                now,
            ));
        }
        fx
    }

    fn handle(&mut self, event: Event, now: Instant, fx: &mut Vec<Effect>) {
        match event {
            Event::Begin { down } => {
                if down {
                    self.note(fx, "admin-down mark present: not starting");
                    if self.external() {
                        // The supervisor may have started it meanwhile (a reboot, runsv or
                        // supervisord restarted): down again.
                        fx.push(Effect::Supervisor(SupervisorOp::Stop));
                        fx.push(Effect::StopRun("admin-down".into()));
                    }
                    self.phase = Phase::Down;
                } else {
                    self.begin(now, fx, false);
                }
            }
            Event::Spawned { run, pid } => {
                if self.phase != Phase::Launching {
                    return;
                }
                self.history.record(now);
                self.starts += 1;
                self.generation += 1;
                self.role_known = true;
                self.phase = Phase::Up(Run {
                    id: run,
                    pid,
                    started: now,
                    ready_at: None,
                    not_sane: false,
                    stopping: false,
                    status_text: None,
                    main_pid: None,
                    last_ping: None,
                    killed_for: None,
                });
                self.schedule_probes(now);
                self.note(fx, format!("started {} (pid {pid})", self.m.launch));
            }
            Event::SpawnFailed(why) => {
                if self.phase != Phase::Launching {
                    return;
                }
                self.note(fx, why.clone());
                self.history.record(now);
                self.starts += 1;
                self.last_exit = Some(why.clone());
                self.fast_streak = self
                    .tuning
                    .respawn
                    .next_streak(Duration::ZERO, self.fast_streak);
                match self.after_exit(now, Duration::ZERO, true) {
                    AfterExit::GiveUp => self.give_up(fx),
                    AfterExit::Respawn { delay, .. } => {
                        self.phase = Phase::Backoff {
                            until: now + delay.max(SPAWN_RETRY),
                            not_sane: true,
                        };
                    }
                }
            }
            Event::Refused(refusal) => self.refuse(refusal, fx),
            Event::Exited { how, not_sane } => self.exited(how, not_sane, now, fx),
            Event::SaneLine(said) => {
                if let Phase::Up(run) = &mut self.phase {
                    run.not_sane = said;
                }
            }
            Event::Probe {
                index,
                generation,
                result,
            } => self.probe_result(index, generation, result, now, fx),
            Event::Timer => self.timer(now, fx),
            Event::Down(reply) => fx.push(Effect::Mark { down: true, reply }),
            Event::Up(reply) => fx.push(Effect::Mark { down: false, reply }),
            Event::Marked {
                down,
                reply,
                result,
            } => self.marked(down, reply, result, now, fx),
            Event::Rekick(reply) => {
                let r = self.rekick(now, fx);
                match reply {
                    // A refused manifest looked at again: the answer says how that went.
                    Some(reply) if self.awaiting_look() => self.look_reply = Some(reply),
                    Some(reply) => fx.push(Effect::Reply(reply, r)),
                    None => {}
                }
            }
            Event::Reload(m) => self.reload(*m, now, fx),
            Event::Stop { remove } => {
                if remove {
                    self.note(fx, "manifest removed: stopping and killing the role");
                    if self.external() && !matches!(self.phase, Phase::Refused(_)) {
                        fx.push(Effect::Supervisor(SupervisorOp::Stop));
                    }
                    fx.push(Effect::StopRun("manifest removed".into()));
                    fx.push(Effect::ReleaseRole);
                } else if !self.external() {
                    fx.push(Effect::StopRun("the agent is stopping".into()));
                }
                self.generation += 1;
                self.phase = Phase::Idle;
            }
            Event::Killed => {
                // Probes start again `grace` from now: agent-run, the exit is normally seen
                // first and the start reschedules them; if something survived the kill, they
                // keep watching it.
                self.generation += 1;
                self.schedule_probes(now);
            }
            Event::Ready => {
                if let Phase::Up(run) = &mut self.phase {
                    if run.ready_at.is_none() && self.m.ready() == Ready::Notify {
                        run.ready_at = Some(now);
                        run.last_ping = Some(now);
                        let took = now.saturating_duration_since(run.started);
                        let line =
                            format!("ready (READY=1) after {}", policy::short_duration(took));
                        self.note(fx, line);
                    }
                }
            }
            Event::Watchdog => {
                if let Phase::Up(run) = &mut self.phase {
                    if run.ready_at.is_some() || run.last_ping.is_some() {
                        run.last_ping = Some(now);
                    }
                }
            }
            Event::Stopping => {
                if let Phase::Up(run) = &mut self.phase {
                    run.stopping = true;
                }
            }
            Event::StatusText(text) => {
                if let Phase::Up(run) = &mut self.phase {
                    run.status_text = Some(text);
                }
            }
            Event::MainPid(pid) => {
                if let Phase::Up(run) = &mut self.phase {
                    run.main_pid = Some(pid);
                }
            }
            Event::Deps(deps) => {
                let changed = deps != self.deps;
                self.deps = deps;
                if changed && self.phase == Phase::Waiting {
                    self.begin(now, fx, false);
                }
            }
            Event::Unit { shown, rekicked } => self.unit(shown, rekicked, now),
        }
    }

    /// First start, `up`, a re-kick or dependencies now ready: start (agent-run) or look at
    /// the unit (systemd), unless dependencies hold it back.
    fn begin(&mut self, now: Instant, fx: &mut Vec<Effect>, force: bool) {
        match &self.deps {
            Deps::Clear => {}
            Deps::Blocked(_) => {
                self.phase = Phase::Waiting;
                return;
            }
            Deps::Cycle(names) => {
                let why = format!(
                    "refusing to start: its start order is a cycle ({}); remove one of these \
                     `supervisor.after` entries",
                    names.join(" -> ")
                );
                if self.phase != Phase::Waiting {
                    fx.push(Effect::Record(EventKind::Refused, why.clone()));
                    self.note(fx, why);
                }
                self.phase = Phase::Waiting;
                return;
            }
        }
        if self.external() {
            self.phase = Phase::Unit(UnitView::default());
            self.unit_poll_at = None;
            self.generation += 1;
            self.schedule_probes(now);
            fx.push(Effect::Supervisor(SupervisorOp::Begin { force }));
        } else {
            self.start(now, None, fx);
        }
    }

    fn start(&mut self, now: Instant, previous: Option<u32>, fx: &mut Vec<Effect>) {
        if !self
            .history
            .may_start(now, self.m.supervisor.count, self.m.supervisor.within)
        {
            return self.give_up(fx);
        }
        self.phase = Phase::Launching;
        fx.push(Effect::Spawn { previous });
    }

    fn after_exit(&mut self, now: Instant, ran: Duration, not_sane: bool) -> AfterExit {
        policy::after_exit(
            &self.tuning.respawn,
            &mut self.history,
            now,
            ran,
            self.fast_streak,
            not_sane,
            self.m.supervisor.count,
            self.m.supervisor.within,
        )
    }

    fn exited(&mut self, how: String, not_sane: bool, now: Instant, fx: &mut Vec<Effect>) {
        let Phase::Up(run) = &self.phase else {
            // A run stopped on purpose (down, removal, the agent stopping).
            self.last_exit = Some(how);
            return;
        };
        let run = run.clone();
        let ran = now.saturating_duration_since(run.started);
        let not_sane = not_sane || run.not_sane;
        let mut what = format!("{how} after {}", policy::short_duration(ran));
        if let Some(why) = &run.killed_for {
            what.push_str(&format!(" (killed: {why})"));
        }
        if not_sane {
            what.push_str(" (not sane)");
        }
        self.note(fx, format!("{} exited: {what}", self.m.launch));
        self.last_exit = Some(what);
        self.generation += 1;
        self.fast_streak = self.tuning.respawn.next_streak(ran, self.fast_streak);
        match self.after_exit(now, ran, not_sane) {
            AfterExit::GiveUp => self.give_up(fx),
            AfterExit::Respawn { delay, .. } if delay.is_zero() => {
                if self.deps != Deps::Clear {
                    return self.begin(now, fx, false);
                }
                // A run that lasted: respawn at once, with the cheap leftover check.
                let previous = (ran >= self.tuning.respawn.fast_crash).then_some(run.pid);
                self.start(now, previous, fx);
            }
            AfterExit::Respawn { delay, .. } => {
                self.phase = Phase::Backoff {
                    until: now + delay,
                    not_sane,
                };
            }
        }
    }

    fn give_up(&mut self, fx: &mut Vec<Effect>) {
        self.phase = Phase::GivenUp;
        let why = format!(
            "given up after {} starts within {}; re-kicked every {} or by `keepup-agent rekick {}`",
            self.m.supervisor.count,
            format_duration(self.m.supervisor.within),
            format_duration(self.tuning.rekick_every),
            self.m.name
        );
        fx.push(Effect::Record(EventKind::GivenUp, why.clone()));
        self.note(fx, why);
    }

    fn refuse(&mut self, refusal: Refusal, fx: &mut Vec<Effect>) {
        let why = refusal.why;
        fx.push(Effect::Record(EventKind::Refused, why.clone()));
        self.note(fx, why.clone());
        self.role_known = false;
        if !refusal.role_taken {
            fx.push(Effect::ReleaseRole);
        }
        fx.push(Effect::RebuildProbes);
        self.last_exit = Some(why.clone());
        self.phase = Phase::Refused(why);
    }

    fn timer(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        if self.rekick_at.is_some_and(|t| t <= now) {
            self.rekick_at = None;
            self.rekick(now, fx);
        }
        if self.unit_poll_at.is_some_and(|t| t <= now) {
            self.unit_poll_at = None;
            if matches!(self.phase, Phase::Unit(_)) {
                fx.push(Effect::Supervisor(SupervisorOp::Show));
            }
        }
        if let Phase::Backoff { until, .. } = self.phase {
            if until <= now {
                return self.begin(now, fx, false);
            }
        }
        if let Phase::Up(run) = &mut self.phase {
            let age = now.saturating_duration_since(run.started);
            if run.ready_at.is_none()
                && !run.not_sane
                && self.m.ready() == Ready::Exec
                && age >= self.tuning.respawn.fast_crash
            {
                run.ready_at = Some(now);
            }
            if run.ready_at.is_none()
                && !run.not_sane
                && run.killed_for.is_none()
                && age >= self.m.ready_timeout()
            {
                let why = format!(
                    "not ready within {} (supervisor.ready: {})",
                    format_duration(self.m.ready_timeout()),
                    self.m.ready()
                );
                return self.kill(EventKind::ReadyTimeout, why, now, fx);
            }
            if let (Some(dog), Some(ping)) = (self.m.supervisor.watchdog, run.last_ping) {
                if run.killed_for.is_none() && now.saturating_duration_since(ping) > dog {
                    let why = format!(
                        "no WATCHDOG=1 for {} (supervisor.watchdog: {})",
                        policy::short_duration(now.saturating_duration_since(ping)),
                        format_duration(dog)
                    );
                    return self.kill(EventKind::WatchdogKill, why, now, fx);
                }
            }
        }
        if self.probing() {
            let mut due = Vec::new();
            for (i, s) in self.probes.iter_mut().enumerate() {
                let Some(next) = s.next else { continue };
                if s.running || next > now || s.broken.is_some() || s.waiting_role {
                    continue;
                }
                let mut following = next + s.spec.every;
                if following <= now {
                    following = now + s.spec.every;
                }
                s.next = Some(following);
                s.running = true;
                due.push(i);
            }
            if !due.is_empty() {
                fx.push(Effect::RunProbes {
                    which: due,
                    generation: self.generation,
                });
            }
        }
    }

    /// Kills the role for `why` (probes, watchdog, readiness); the supervisor starts it again.
    fn kill(&mut self, kind: EventKind, why: String, now: Instant, fx: &mut Vec<Effect>) {
        self.generation += 1;
        if !self.role_known {
            let msg = format!(
                "{why}; cannot kill: role {} is unknown (probes start again)",
                self.m.role
            );
            fx.push(Effect::Record(kind, msg));
            self.schedule_probes(now);
            return;
        }
        let msg = format!("{why}; killing role {}", self.m.role);
        self.note(fx, msg.clone());
        fx.push(Effect::Record(kind, msg));
        if let Phase::Up(run) = &mut self.phase {
            run.killed_for = Some(why.clone());
        }
        fx.push(Effect::KillRole(why));
    }

    fn probe_result(
        &mut self,
        index: usize,
        generation: u64,
        result: ProbeResult,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        let current = generation == self.generation && self.probing();
        if result.ok && generation == self.generation {
            // The service answers: whatever its output said, it is not in a not-sane sleep.
            if let Phase::Up(run) = &mut self.phase {
                run.not_sane = false;
            }
        }
        let Some(s) = self.probes.get_mut(index) else {
            return;
        };
        s.running = false;
        if !current {
            return;
        }
        let was_failing = s.failures > 0;
        if result.ok {
            s.failures = 0;
            s.passed = true;
        } else {
            s.failures += 1;
        }
        s.ok = Some(result.ok);
        s.reason = Some(result.reason.clone());
        s.at = Some(now);
        let (name, failures, limit) = (s.spec.name.clone(), s.failures, s.spec.failures);
        if !result.ok {
            self.note(
                fx,
                format!(
                    "probe {name} failed ({failures}/{limit}): {}",
                    result.reason
                ),
            );
        } else if was_failing {
            self.note(fx, format!("probe {name} passes again: {}", result.reason));
        }
        if self.m.ready() == Ready::Probes {
            let all = self
                .probes
                .iter()
                .filter(|s| s.broken.is_none())
                .all(|s| s.passed);
            if let Phase::Up(run) = &mut self.phase {
                if all && run.ready_at.is_none() {
                    run.ready_at = Some(now);
                }
            }
        }
        if failures >= limit {
            let why = format!(
                "probe {name} failed {failures} times in a row: {}",
                result.reason
            );
            self.kill(EventKind::HealthKill, why, now, fx);
        }
    }

    fn marked(
        &mut self,
        down: bool,
        reply: ReplyTo,
        result: Result<(), String>,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        if let Err(why) = result {
            fx.push(Effect::Reply(reply, Response::failed(why)));
            return;
        }
        let name = self.m.name.clone();
        if down {
            self.note(fx, "admin-down: stopping");
            if self.external() {
                fx.push(Effect::Supervisor(SupervisorOp::Stop));
            }
            fx.push(Effect::StopRun("admin-down".into()));
            self.generation += 1;
            self.phase = Phase::Down;
            fx.push(Effect::Reply(
                reply,
                Response::done(format!(
                    "{name} is down and stays down until `keepup-agent up {name}`"
                )),
            ));
        } else {
            let was_down = self.phase == Phase::Down;
            self.note(fx, "admin-up");
            self.kick(now, fx);
            fx.push(Effect::Reply(
                reply,
                Response::done(if was_down {
                    format!("{name} is up again")
                } else {
                    format!("{name} was not down; re-kicked if it had given up")
                }),
            ));
        }
    }

    /// Clears the give-up window and starts the service if nothing runs it.
    fn kick(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        self.history.clear();
        self.fast_streak = 0;
        match &self.phase {
            Phase::Up(_) | Phase::Launching => {}
            Phase::Unit(_) => self.begin(now, fx, true),
            _ => self.begin(now, fx, self.external()),
        }
    }

    fn rekick(&mut self, now: Instant, fx: &mut Vec<Effect>) -> Response {
        let name = self.m.name.clone();
        match &self.phase {
            Phase::Down => Response::done(format!(
                "{name} is admin-down: not re-kicked (use `keepup-agent up {name}`)"
            )),
            Phase::Refused(_) => {
                self.note(fx, "re-kick: looking at the refused manifest again");
                self.kick(now, fx);
                match &self.phase {
                    Phase::Refused(why) => Response::done(format!("{name}: still refused: {why}")),
                    _ => Response::done(format!("{name}: re-kicked")),
                }
            }
            Phase::Unit(_) => {
                fx.push(Effect::Supervisor(SupervisorOp::Rekick));
                Response::done(format!(
                    "{name}: re-kicking {} if it is not active",
                    self.unit_name()
                ))
            }
            Phase::GivenUp => {
                self.note(fx, "re-kick: starting again");
                self.kick(now, fx);
                Response::done(format!("{name}: re-kicked"))
            }
            Phase::Waiting => {
                self.begin(now, fx, false);
                Response::done(format!("{name}: {}", self.waiting_note()))
            }
            _ => Response::done(format!("{name}: not given up; nothing to do")),
        }
    }

    /// The supervisor's name for it: the unit, runit service or supervisord program.
    fn unit_name(&self) -> String {
        crate::external::Outside::of(&self.m).map_or_else(|| self.m.name.clone(), |o| o.describe())
    }

    fn reload(&mut self, m: Manifest, now: Instant, fx: &mut Vec<Effect>) {
        if m == self.m {
            return;
        }
        self.note(
            fx,
            format!(
                "manifest changed: {} {} -> {} (used from the next start)",
                m.name, self.m.version, m.version
            ),
        );
        // A new version starts counting afresh: the kills of an upgrade are not crashes, and
        // the old bits' crashes say nothing of the new ones. Its give-up window and backoff
        // start empty too, or an upgrade out of a crash loop (a rollback) gives up at the
        // package's own kill.
        let new_version = m.version != self.m.version;
        if new_version {
            self.starts = 0;
            self.history.clear();
            self.fast_streak = 0;
        }
        self.m = m;
        self.reset_probes();
        fx.push(Effect::RebuildProbes);
        if matches!(self.phase, Phase::Up(_) | Phase::Unit(_)) {
            self.generation += 1;
            self.schedule_probes(now);
        }
        // An upgrade of a service that gave up, or waits out a backoff the old bits earned,
        // starts the new bits now (the talk's "restart on upgrade"); a refused one is looked
        // at again.
        let again = matches!(self.phase, Phase::Refused(_))
            || (new_version && matches!(self.phase, Phase::GivenUp | Phase::Backoff { .. }));
        if again {
            self.kick(now, fx);
        }
    }

    fn reset_probes(&mut self) {
        self.probes = self
            .m
            .checks
            .iter()
            .map(|c| Slot {
                spec: c.clone(),
                describe: String::new(),
                broken: None,
                waiting_role: false,
                next: None,
                running: false,
                failures: 0,
                ok: None,
                reason: None,
                at: None,
                passed: false,
            })
            .collect();
    }

    fn schedule_probes(&mut self, from: Instant) {
        for s in &mut self.probes {
            s.failures = 0;
            s.passed = false;
            s.next = Some(from + s.spec.grace);
        }
    }

    fn unit(
        &mut self,
        shown: Result<(ServiceState, Option<u32>, u64, String), String>,
        rekicked: Option<Result<(), String>>,
        now: Instant,
    ) {
        let Phase::Unit(view) = &mut self.phase else {
            return;
        };
        let rekick_every = format_duration(self.tuning.rekick_every);
        match shown {
            Ok((state, pid, restarts, detail)) => {
                let whose = match self.m.supervisor.kind {
                    Supervised::Systemd => "unit",
                    Supervised::Runit => "runit",
                    _ => "supervisord",
                };
                view.note = (state == ServiceState::GivenUp)
                    .then(|| format!("{whose} {detail}; re-kicked every {rekick_every}"));
                match (&state, view.since) {
                    (ServiceState::Running, None) => view.since = Some(now),
                    (ServiceState::Running, Some(_)) => {}
                    _ => view.since = None,
                }
                view.state = Some(state);
                view.pid = pid;
                view.restarts = restarts;
                view.failed = None;
            }
            Err(e) => {
                view.state = Some(ServiceState::GivenUp);
                view.note = Some(e);
            }
        }
        match rekicked {
            Some(Ok(())) => {
                view.state = Some(ServiceState::Starting);
                view.since = None;
                self.generation += 1;
                self.schedule_probes(now);
            }
            Some(Err(e)) => {
                view.state = Some(ServiceState::GivenUp);
                view.failed = Some(e.clone());
                view.note = Some(e);
            }
            None => {}
        }
        let first_look = self.unit_poll_at.is_none();
        let poll = if first_look {
            Duration::from_secs(1)
        } else {
            UNIT_POLL
        };
        self.unit_poll_at = Some(now + poll);
    }

    fn waiting_note(&self) -> String {
        match &self.deps {
            Deps::Clear => "starting".into(),
            Deps::Blocked(list) => format!(
                "waits for {} (supervisor.after)",
                list.iter()
                    .map(|(n, why)| format!("{n}: {why}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            Deps::Cycle(names) => format!(
                "refused: start order cycle {}; remove one of these `supervisor.after` entries",
                names.join(" -> ")
            ),
        }
    }

    /// The state a client sees.
    pub fn state(&self) -> ServiceState {
        match &self.phase {
            Phase::Idle | Phase::Launching => ServiceState::Starting,
            Phase::Waiting => match self.deps {
                Deps::Cycle(_) => ServiceState::Refused,
                _ => ServiceState::Waiting,
            },
            Phase::Up(run) if run.not_sane => ServiceState::NotSane,
            Phase::Up(run) if run.stopping => ServiceState::Stopping,
            Phase::Up(run) if run.ready_at.is_some() => ServiceState::Running,
            Phase::Up(_) => ServiceState::Starting,
            Phase::Backoff { not_sane: true, .. } => ServiceState::NotSane,
            Phase::Backoff { .. } => ServiceState::Backoff,
            Phase::GivenUp => ServiceState::GivenUp,
            Phase::Down => ServiceState::Down,
            Phase::Refused(_) => ServiceState::Refused,
            Phase::Unit(u) => u.state.clone().unwrap_or(ServiceState::Starting),
        }
    }

    /// The status snapshot at `now`.
    pub fn status(&self, now: Instant) -> ServiceStatus {
        let state = self.state();
        let (pid, started, run, ready_secs, status_text, restarts) = match &self.phase {
            Phase::Up(r) => (
                Some(r.main_pid.unwrap_or(r.pid)),
                Some(r.started),
                Some(r.id),
                r.ready_at
                    .map(|t| t.saturating_duration_since(r.started).as_secs_f64()),
                r.status_text.clone(),
                self.starts.saturating_sub(1),
            ),
            Phase::Unit(u) => (u.pid, u.since, None, None, None, u.restarts),
            _ => (None, None, None, None, None, self.starts.saturating_sub(1)),
        };
        let note = match &self.phase {
            Phase::Down => Some(self.down_note()),
            Phase::Refused(why) => Some(why.clone()),
            Phase::Waiting => Some(self.waiting_note()),
            Phase::GivenUp => {
                let next = self
                    .rekick_at
                    .unwrap_or_else(|| {
                        policy::next_tick(self.tuning.epoch, self.tuning.rekick_every, now)
                    })
                    .saturating_duration_since(now);
                Some(format!(
                    "given up after {} starts within {}; next re-kick in {}",
                    self.m.supervisor.count,
                    format_duration(self.m.supervisor.within),
                    policy::short_duration(next)
                ))
            }
            Phase::Backoff { until, .. } => Some(format!(
                "respawn in {}",
                policy::short_duration(until.saturating_duration_since(now))
            )),
            Phase::Unit(u) => u.note.clone(),
            Phase::Up(r) if r.ready_at.is_none() && !r.not_sane => Some(format!(
                "not ready yet (supervisor.ready: {}, timeout {})",
                self.m.ready(),
                format_duration(self.m.ready_timeout())
            )),
            _ => None,
        };
        ServiceStatus {
            name: self.m.name.clone(),
            version: self.m.version.clone(),
            supervisor: self.m.supervisor.kind.as_str().into(),
            state,
            pid,
            uptime_secs: started.map(|s| now.saturating_duration_since(s).as_secs_f64()),
            restarts,
            last_exit: self.last_exit.clone(),
            note,
            run,
            ready_secs,
            status_text,
            probes: self
                .probes
                .iter()
                .map(|s| ProbeStatus {
                    name: s.spec.name.clone(),
                    probe: s.describe.clone(),
                    ok: s.ok,
                    reason: s.reason.clone(),
                    failures: s.failures,
                    age_secs: s.at.map(|t| now.saturating_duration_since(t).as_secs_f64()),
                })
                .collect(),
        }
    }
}

/// Why a probe cannot run, as the machine needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeProblemKind {
    /// The manifest describes it badly: failing until fixed, never counted toward kills or
    /// readiness.
    Invalid(String),
    /// An exec probe while the role is unknown.
    RoleUnknown,
}

#[cfg(test)]
mod tests {
    use super::*;
    use keepup_packager::manifest::ManifestSupervisor;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn manifest(ready: Option<Ready>, watchdog: Option<Duration>, after: &[&str]) -> Manifest {
        Manifest {
            format: 1,
            name: "foo".into(),
            version: "1.0-1".into(),
            role: "foo".into(),
            launch: "/usr/sbin/run-foo".into(),
            supervisor: ManifestSupervisor {
                kind: Supervised::Agent,
                count: 3,
                within: S(60),
                stop_grace: S(2),
                unit: None,
                ready,
                ready_timeout: Some(S(20)),
                watchdog,
                after: after.iter().map(|s| s.to_string()).collect(),
            },
            checks: Vec::new(),
        }
    }

    /// A machine begun at `t0`, its first run spawned (run 1, pid 100).
    fn running(m: Manifest, t0: Instant) -> Machine {
        let mut mc = Machine::new(
            m,
            Tuning {
                respawn: Respawn::default(),
                rekick_every: S(300),
                epoch: t0,
            },
        );
        assert_eq!(
            mc.on(Event::Begin { down: false }, t0),
            vec![Effect::Spawn { previous: None }]
        );
        mc.on(Event::Spawned { run: 1, pid: 100 }, t0);
        mc
    }

    fn exited(mc: &mut Machine, at: Instant) -> Vec<Effect> {
        mc.on(
            Event::Exited {
                how: "exit status 1".into(),
                not_sane: false,
            },
            at,
        )
    }

    fn has(fx: &[Effect], f: impl Fn(&Effect) -> bool) -> bool {
        fx.iter().any(f)
    }

    #[test]
    fn table_of_states_and_events() {
        let t0 = Instant::now();
        // (name, setup, event, expected state after, expected effect predicate)
        type Case = (
            &'static str,
            fn(Instant) -> Machine,
            fn(Instant) -> Event,
            ServiceState,
            fn(&[Effect]) -> bool,
        );
        let exec = |t0| running(manifest(None, None, &[]), t0);
        let cases: Vec<Case> = vec![
            (
                "exec: starting until its first second",
                exec,
                |_| Event::Timer,
                ServiceState::Starting,
                |fx| fx.is_empty(),
            ),
            (
                "a long run's exit respawns at once",
                exec,
                |_| Event::Exited {
                    how: "x".into(),
                    not_sane: false,
                },
                ServiceState::Starting,
                |fx| {
                    has(fx, |e| {
                        matches!(
                            e,
                            Effect::Spawn {
                                previous: Some(100)
                            }
                        )
                    })
                },
            ),
            (
                "down: the mark first",
                exec,
                |_| Event::Down(7),
                ServiceState::Starting,
                |fx| {
                    fx == [Effect::Mark {
                        down: true,
                        reply: 7,
                    }]
                },
            ),
            (
                "rekick of a running service does nothing",
                exec,
                |_| Event::Rekick(Some(1)),
                ServiceState::Starting,
                |fx| {
                    has(
                        fx,
                        |e| matches!(e, Effect::Reply(1, r) if r.message.as_deref().is_some_and(|m| m.contains("nothing to do"))),
                    )
                },
            ),
            (
                "stop kills the run",
                exec,
                |_| Event::Stop { remove: false },
                ServiceState::Starting,
                |fx| has(fx, |e| matches!(e, Effect::StopRun(_))),
            ),
            (
                "removal releases the role",
                exec,
                |_| Event::Stop { remove: true },
                ServiceState::Starting,
                |fx| has(fx, |e| *e == Effect::ReleaseRole),
            ),
        ];
        for (name, setup, event, state, effects) in cases {
            let mut mc = setup(t0);
            let fx = mc.on(
                event(t0),
                t0 + MS(10)
                    + if name.contains("long run") {
                        S(5)
                    } else {
                        Duration::ZERO
                    },
            );
            assert_eq!(mc.state(), state, "{name}: {:?}", mc.phase());
            assert!(effects(&fx), "{name}: {fx:?}");
        }
    }

    #[test]
    fn fast_crashes_back_off_then_give_up_and_a_rekick_starts_again() {
        let t0 = Instant::now();
        let mut mc = running(manifest(None, None, &[]), t0);
        let fx = exited(&mut mc, t0 + MS(100));
        assert_eq!(mc.state(), ServiceState::Backoff, "{fx:?}");
        // Down during the backoff: the mark, then down; the timer does not start it.
        mc.on(Event::Down(1), t0 + MS(150));
        let fx = mc.on(
            Event::Marked {
                down: true,
                reply: 1,
                result: Ok(()),
            },
            t0 + MS(150),
        );
        assert_eq!(mc.state(), ServiceState::Down);
        assert!(has(&fx, |e| matches!(e, Effect::Reply(1, r) if r.ok)));
        assert!(mc.on(Event::Timer, t0 + S(1)).is_empty());
        assert_eq!(mc.state(), ServiceState::Down);
        // Up: started again.
        let fx = mc.on(
            Event::Marked {
                down: false,
                reply: 2,
                result: Ok(()),
            },
            t0 + S(2),
        );
        assert!(has(&fx, |e| matches!(e, Effect::Spawn { .. })), "{fx:?}");
        mc.on(Event::Spawned { run: 2, pid: 101 }, t0 + S(2));
        // Three starts within a minute: the third fast crash gives up.
        exited(&mut mc, t0 + S(2) + MS(10));
        mc.on(Event::Timer, t0 + S(3));
        mc.on(Event::Spawned { run: 3, pid: 102 }, t0 + S(3));
        exited(&mut mc, t0 + S(3) + MS(10));
        mc.on(Event::Timer, t0 + S(4));
        mc.on(Event::Spawned { run: 4, pid: 103 }, t0 + S(4));
        let fx = exited(&mut mc, t0 + S(4) + MS(10));
        assert_eq!(mc.state(), ServiceState::GivenUp, "{:?}", mc.phase());
        assert!(has(&fx, |e| matches!(
            e,
            Effect::Record(EventKind::GivenUp, _)
        )));
        // A reload of a new version while given up starts the new bits.
        let mut m2 = mc.manifest().clone();
        m2.version = "1.1-1".into();
        let fx = mc.on(Event::Reload(Box::new(m2)), t0 + S(5));
        assert!(has(&fx, |e| matches!(e, Effect::Spawn { .. })), "{fx:?}");
    }

    #[test]
    fn an_upgrade_out_of_a_crash_loop_starts_afresh() {
        let t0 = Instant::now();
        // The old bits crash fast: `runs` starts of the window's 3 used.
        let crash_loop = |runs: u32| {
            let mut mc = running(manifest(None, None, &[]), t0);
            for run in 2..=runs {
                let at = t0 + S(run as u64 - 1);
                exited(&mut mc, at - MS(900));
                mc.on(Event::Timer, at);
                mc.on(
                    Event::Spawned {
                        run: run as u64,
                        pid: 99 + run,
                    },
                    at,
                );
            }
            mc
        };
        let rollback = |mc: &Machine| {
            let mut m = mc.manifest().clone();
            m.version = "1.0+rb1-1".into();
            Event::Reload(Box::new(m))
        };

        // The new version (a rollback) is unpacked while the third run of the old bits is
        // up; the package's scripts then kill the role. That kill is not a crash of the new
        // version: it starts again and does not give up.
        let mut mc = crash_loop(3);
        assert_eq!(mc.state(), ServiceState::Starting);
        mc.on(rollback(&mc), t0 + S(3));
        let fx = exited(&mut mc, t0 + S(3) + MS(100));
        assert!(has(&fx, |e| matches!(e, Effect::Spawn { .. })), "{fx:?}");

        // It arrives while the old bits wait out their backoff: started now.
        let mut mc = crash_loop(2);
        exited(&mut mc, t0 + S(1) + MS(100));
        assert_eq!(mc.state(), ServiceState::Backoff);
        let fx = mc.on(rollback(&mc), t0 + S(2));
        assert!(has(&fx, |e| matches!(e, Effect::Spawn { .. })), "{fx:?}");

        // A reload of the same version keeps the window: the third fast crash gives up.
        let mut mc = crash_loop(3);
        let same = mc.manifest().clone();
        mc.on(Event::Reload(Box::new(same)), t0 + S(3));
        exited(&mut mc, t0 + S(3) + MS(100));
        assert_eq!(mc.state(), ServiceState::GivenUp, "{:?}", mc.phase());
    }

    #[test]
    fn a_refused_manifest_is_looked_at_again_by_a_rekick_and_answered_after() {
        let t0 = Instant::now();
        let mut mc = running(manifest(None, None, &[]), t0);
        exited(&mut mc, t0 + S(5));
        let fx = mc.on(
            Event::Refused(Refusal::new("refusing: role foo")),
            t0 + S(5),
        );
        assert_eq!(mc.state(), ServiceState::Refused);
        assert!(has(&fx, |e| *e == Effect::ReleaseRole));
        let fx = mc.on(Event::Rekick(Some(9)), t0 + S(6));
        assert!(
            !has(&fx, |e| matches!(e, Effect::Reply(..))),
            "not before the look"
        );
        let fx = mc.on(
            Event::Refused(Refusal::new("refusing: role foo")),
            t0 + S(6),
        );
        assert!(has(&fx, |e| matches!(e, Effect::Reply(9, r)
            if r.message.as_deref().is_some_and(|m| m.contains("still refused")))));
    }

    #[test]
    fn notify_readiness_timeout_and_watchdog() {
        let t0 = Instant::now();
        let mut mc = running(manifest(Some(Ready::Notify), Some(S(2)), &[]), t0);
        assert_eq!(mc.on(Event::Timer, t0 + S(3)), vec![]);
        assert_eq!(mc.state(), ServiceState::Starting);
        mc.on(Event::StatusText("warming".into()), t0 + S(3));
        mc.on(Event::Ready, t0 + S(4));
        assert_eq!(mc.state(), ServiceState::Running);
        let st = mc.status(t0 + S(4));
        assert_eq!(st.ready_secs, Some(4.0));
        assert_eq!(st.status_text.as_deref(), Some("warming"));
        // Pings keep it alive; a missed one kills the role.
        mc.on(Event::Watchdog, t0 + S(5));
        assert_eq!(mc.next_deadline(), Some(t0 + S(7)));
        assert!(mc.on(Event::Timer, t0 + S(6)).is_empty());
        let fx = mc.on(Event::Timer, t0 + S(7) + MS(1));
        assert!(
            has(
                &fx,
                |e| matches!(e, Effect::KillRole(w) if w.contains("no WATCHDOG=1"))
            ),
            "{fx:?}"
        );
        assert!(has(&fx, |e| matches!(
            e,
            Effect::Record(EventKind::WatchdogKill, _)
        )));
        // No second kill while the first one's exit is awaited.
        mc.on(Event::Killed, t0 + S(8));
        assert!(mc.next_deadline().is_none_or(|d| d > t0 + S(8)));
        let fx = exited(&mut mc, t0 + S(9));
        assert!(has(&fx, |e| matches!(e, Effect::Spawn { .. })));
        // A run that never says READY=1 is killed at ready_timeout.
        mc.on(Event::Spawned { run: 2, pid: 101 }, t0 + S(9));
        let fx = mc.on(Event::Timer, t0 + S(29));
        assert!(
            has(&fx, |e| matches!(
                e,
                Effect::Record(EventKind::ReadyTimeout, _)
            )),
            "{fx:?}"
        );
    }

    #[test]
    fn dependants_wait_and_cycles_are_refused() {
        let t0 = Instant::now();
        let mut mc = Machine::new(
            manifest(None, None, &["db"]),
            Tuning {
                respawn: Respawn::default(),
                rekick_every: S(300),
                epoch: t0,
            },
        );
        mc.on(
            Event::Deps(Deps::Blocked(vec![("db".into(), "starting".into())])),
            t0,
        );
        assert!(mc.on(Event::Begin { down: false }, t0).is_empty());
        assert_eq!(mc.state(), ServiceState::Waiting);
        assert!(mc
            .status(t0)
            .note
            .is_some_and(|n| n.contains("db: starting")));
        let fx = mc.on(Event::Deps(Deps::Clear), t0 + S(1));
        assert_eq!(fx, vec![Effect::Spawn { previous: None }]);
        mc.on(Event::Spawned { run: 1, pid: 5 }, t0 + S(1));
        // A dependency going away does not stop a running dependant; its next start waits.
        mc.on(
            Event::Deps(Deps::Blocked(vec![("db".into(), "given-up".into())])),
            t0 + S(2),
        );
        let fx = exited(&mut mc, t0 + S(10));
        assert!(
            fx.iter().all(|e| !matches!(e, Effect::Spawn { .. })),
            "{fx:?}"
        );
        assert_eq!(mc.state(), ServiceState::Waiting);
        let fx = mc.on(
            Event::Deps(Deps::Cycle(vec!["foo".into(), "db".into(), "foo".into()])),
            t0 + S(11),
        );
        assert_eq!(mc.state(), ServiceState::Refused);
        let _ = fx;
        assert!(mc
            .status(t0 + S(11))
            .note
            .is_some_and(|n| n.contains("foo -> db -> foo")));
    }
}
