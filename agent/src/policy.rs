//! Supervision policy as plain functions: respawn delays, the give-up window, exit
//! classification and the states a service can be in. No side effects here; `service.rs`
//! acts on these decisions.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use keepup_deploy::wire::ServiceState;

/// Default fast-crash threshold: a run shorter than this is a *fast crash*, and only fast
/// crashes make the respawn delay grow.
pub const FAST_CRASH: Duration = Duration::from_secs(1);
/// Respawn delay after the first fast crash in a row; it doubles for each further one.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Default ceiling of the respawn delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The first tick after `now` of a timer that ticks every `every` from `epoch` (the agent's
/// start): the re-kick timer. Services that have something to re-kick sleep until it; the
/// others do not wake for it at all.
pub fn next_tick(epoch: Instant, every: Duration, now: Instant) -> Instant {
    let every = every.as_nanos().max(1);
    let n = now.saturating_duration_since(epoch).as_nanos() / every + 1;
    epoch + Duration::from_nanos(u64::try_from(n * every).unwrap_or(u64::MAX))
}

/// The respawn timing: what counts as a fast crash and how far the delay may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Respawn {
    /// A run shorter than this is a fast crash.
    pub fast_crash: Duration,
    /// The respawn delay never grows past this.
    pub max_delay: Duration,
}

impl Default for Respawn {
    fn default() -> Respawn {
        Respawn {
            fast_crash: FAST_CRASH,
            max_delay: MAX_BACKOFF,
        }
    }
}

impl Respawn {
    /// How long to wait before respawning a launch script that ran for `ran`, when this exit
    /// is the `fast_streak`-th fast crash in a row (0 when the run was not fast).
    ///
    /// A service that ran at least `fast_crash` is respawned at once, like upstart's
    /// `respawn`; fast crashes wait 100 ms, 200 ms, 400 ms, ... up to `max_delay`.
    pub fn delay(&self, ran: Duration, fast_streak: u32) -> Duration {
        if ran >= self.fast_crash || fast_streak == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32 << (fast_streak - 1).min(16);
        FIRST_BACKOFF.saturating_mul(factor).min(self.max_delay)
    }

    /// The fast-crash streak after a run of `ran`: one more if the run was fast, else zero.
    pub fn next_streak(&self, ran: Duration, streak: u32) -> u32 {
        if ran < self.fast_crash {
            streak.saturating_add(1)
        } else {
            0
        }
    }
}

/// Start times inside the give-up window, like upstart's `respawn limit COUNT INTERVAL`.
#[derive(Debug, Clone, Default)]
pub struct StartHistory {
    starts: VecDeque<Instant>,
}

impl StartHistory {
    /// An empty history (a fresh service, or one just re-kicked).
    pub fn new() -> StartHistory {
        StartHistory::default()
    }

    /// Whether another start at `now` is allowed: fewer than `count` starts happened within
    /// `within` before `now`.
    pub fn may_start(&mut self, now: Instant, count: u32, within: Duration) -> bool {
        self.forget_before(now, within);
        self.starts.len() < count as usize
    }

    /// Notes a start at `now`.
    pub fn record(&mut self, now: Instant) {
        self.starts.push_back(now);
    }

    /// Forgets every start (re-kick, `up`).
    pub fn clear(&mut self) {
        self.starts.clear();
    }

    fn forget_before(&mut self, now: Instant, within: Duration) {
        while let Some(&first) = self.starts.front() {
            if now.saturating_duration_since(first) >= within {
                self.starts.pop_front();
            } else {
                break;
            }
        }
    }
}

/// What to do after the launch script exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterExit {
    /// Respawn after this delay; the state meanwhile is `backoff` or `not-sane`.
    Respawn {
        /// Delay before the next start.
        delay: Duration,
        /// The state to show while waiting.
        state: ServiceState,
    },
    /// Too many starts within the window: given up until a re-kick.
    GiveUp,
}

/// Decides what follows an exit at `now` after running for `ran`: `fast_streak` counts this
/// exit, `not_sane` says whether the launch script printed a `not sane:` line.
#[allow(clippy::too_many_arguments)]
pub fn after_exit(
    respawn: &Respawn,
    history: &mut StartHistory,
    now: Instant,
    ran: Duration,
    fast_streak: u32,
    not_sane: bool,
    count: u32,
    within: Duration,
) -> AfterExit {
    let delay = respawn.delay(ran, fast_streak);
    if !history.may_start(now + delay, count, within) {
        return AfterExit::GiveUp;
    }
    let state = if not_sane {
        ServiceState::NotSane
    } else {
        ServiceState::Backoff
    };
    AfterExit::Respawn { delay, state }
}

/// Watches a launch script's output for what `run-<name>` prints about its environment: a
/// line starting `run-<name>: not sane:` (it is about to sleep and exit) or
/// `run-<name>: environment sane; exec` (the daemon runs now). Only whole lines from their
/// start count, so a daemon that logs "not sane:" somewhere does not turn its probes off.
#[derive(Debug, Clone)]
pub struct SaneWatch {
    not_sane: Vec<u8>,
    sane: Vec<u8>,
    line: Vec<u8>,
    /// The current line can no longer match either marker.
    skip: bool,
}

impl SaneWatch {
    /// A watch for service `name`'s launch script.
    pub fn new(name: &str) -> SaneWatch {
        SaneWatch {
            not_sane: format!("run-{name}: not sane:").into_bytes(),
            sane: format!("run-{name}: environment sane; exec").into_bytes(),
            line: Vec::new(),
            skip: false,
        }
    }

    /// Feeds more output (chunks may split lines anywhere); the last verdict in it:
    /// `Some(true)` not sane, `Some(false)` sane, `None` nothing said.
    pub fn feed(&mut self, output: &[u8]) -> Option<bool> {
        let mut verdict = None;
        for &b in output {
            if b == b'\n' {
                self.line.clear();
                self.skip = false;
                continue;
            }
            if self.skip {
                continue;
            }
            self.line.push(b);
            if self.line == self.not_sane {
                verdict = Some(true);
                self.skip = true;
            } else if self.line == self.sane {
                verdict = Some(false);
                self.skip = true;
            } else if !self.not_sane.starts_with(&self.line) && !self.sane.starts_with(&self.line) {
                self.skip = true;
            }
        }
        if self.skip {
            self.line.clear();
        }
        verdict
    }
}

/// Human-readable description of a wait status: `exit status 3`, `killed by SIGKILL`.
pub fn describe_exit(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by {}", signal_name(s)),
        (None, None) => "exited".into(),
    }
}

fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return format!("signal {sig}"),
    };
    name.to_owned()
}

/// `1.5s`, `3m20s`, `2h5m`, `4d3h`: short durations for status output.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s < 10 && d.subsec_millis() != 0 {
        format!("{:.1}s", d.as_secs_f64())
    } else if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{}s", s / 60, s % 60)
    } else if s < 86400 {
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{}h", s / 86400, (s % 86400) / 3600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn rekick_ticks_keep_the_agent_start_cadence() {
        let t0 = Instant::now();
        let every = Duration::from_secs(300);
        assert_eq!(next_tick(t0, every, t0), t0 + every);
        assert_eq!(next_tick(t0, every, t0 + MS(1)), t0 + every);
        // Woken at the tick (or just after it): the one after.
        assert_eq!(next_tick(t0, every, t0 + every), t0 + every * 2);
        assert_eq!(next_tick(t0, every, t0 + every * 7 + MS(5)), t0 + every * 8);
        assert_eq!(
            next_tick(t0, Duration::ZERO, t0),
            t0 + Duration::from_nanos(1)
        );
    }

    #[test]
    fn delay_grows_only_for_fast_crashes() {
        let r = Respawn::default();
        assert_eq!(r.delay(Duration::from_secs(5), 0), Duration::ZERO);
        assert_eq!(r.delay(Duration::from_secs(1), 0), Duration::ZERO);
        assert_eq!(r.delay(MS(10), 1), MS(100));
        assert_eq!(r.delay(MS(10), 2), MS(200));
        assert_eq!(r.delay(MS(10), 4), MS(800));
        assert_eq!(r.delay(MS(10), 8), MAX_BACKOFF);
        assert_eq!(r.delay(MS(10), 1000), MAX_BACKOFF);
        let quick = Respawn {
            fast_crash: MS(50),
            max_delay: MS(10),
        };
        assert_eq!(quick.delay(MS(10), 5), MS(10));
        assert_eq!(quick.delay(MS(60), 5), Duration::ZERO);
    }

    #[test]
    fn streak_resets_after_a_long_run() {
        let r = Respawn::default();
        assert_eq!(r.next_streak(MS(10), 0), 1);
        assert_eq!(r.next_streak(MS(10), 3), 4);
        assert_eq!(r.next_streak(Duration::from_secs(2), 3), 0);
        // So a long run after fast crashes respawns at once.
        let s = r.next_streak(Duration::from_secs(2), 5);
        assert_eq!(r.delay(Duration::from_secs(2), s), Duration::ZERO);
    }

    #[test]
    fn gives_up_after_count_starts_within_the_window() {
        let t0 = Instant::now();
        let within = Duration::from_secs(60);
        let mut h = StartHistory::new();
        for i in 0..3 {
            let now = t0 + Duration::from_secs(i);
            assert!(h.may_start(now, 3, within));
            h.record(now);
        }
        // The fourth start within a minute is refused ...
        assert!(!h.may_start(t0 + Duration::from_secs(10), 3, within));
        // ... but once the first start is a minute old there is room again.
        assert!(h.may_start(t0 + Duration::from_secs(60), 3, within));
        assert_eq!(h.starts.len(), 2);
        h.clear();
        assert!(h.starts.is_empty());
    }

    #[test]
    fn after_exit_respawns_until_the_limit_then_gives_up() {
        let t0 = Instant::now();
        let within = Duration::from_secs(60);
        let mut h = StartHistory::new();
        h.record(t0);
        let d = after_exit(
            &Respawn::default(),
            &mut h,
            t0 + MS(500),
            MS(500),
            1,
            false,
            2,
            within,
        );
        assert_eq!(
            d,
            AfterExit::Respawn {
                delay: MS(100),
                state: ServiceState::Backoff
            }
        );
        h.record(t0 + MS(600));
        let d = after_exit(
            &Respawn::default(),
            &mut h,
            t0 + MS(900),
            MS(300),
            2,
            false,
            2,
            within,
        );
        assert_eq!(d, AfterExit::GiveUp);
    }

    #[test]
    fn not_sane_exits_are_shown_as_such() {
        let mut h = StartHistory::new();
        let d = after_exit(
            &Respawn::default(),
            &mut h,
            Instant::now(),
            Duration::from_secs(10),
            0,
            true,
            10,
            Duration::from_secs(60),
        );
        assert_eq!(
            d,
            AfterExit::Respawn {
                delay: Duration::ZERO,
                state: ServiceState::NotSane
            }
        );
    }

    #[test]
    fn not_sane_only_from_the_launch_script_line() {
        let mut w = SaneWatch::new("foo");
        assert_eq!(
            w.feed(b"run-foo: not sane: required file /etc/foo/foo.conf is missing\n"),
            Some(true)
        );
        // Split across reads.
        let mut w = SaneWatch::new("foo");
        assert_eq!(w.feed(b"hello\nrun-foo: not"), None);
        assert_eq!(w.feed(b" sane: x\n"), Some(true));
        // The exec line clears it.
        assert_eq!(
            w.feed(b"run-foo: environment sane; exec /usr/bin/food as foo\n"),
            Some(false)
        );
        // Anywhere else in a line, another service's script, or a daemon's log: nothing.
        let mut w = SaneWatch::new("foo");
        assert_eq!(w.feed(b"food 1.0 ready\n"), None);
        assert_eq!(w.feed(b"food: config is not sane: x\n"), None);
        assert_eq!(w.feed(b"  run-foo: not sane: indented\n"), None);
        assert_eq!(w.feed(b"run-bar: not sane: other\n"), None);
        assert_eq!(w.feed(b"run-foo: not sane"), None);
    }

    #[test]
    fn describes_exits_and_durations() {
        assert_eq!(describe_exit(Some(3), None), "exit status 3");
        assert_eq!(describe_exit(None, Some(9)), "killed by SIGKILL");
        assert_eq!(describe_exit(None, Some(40)), "killed by signal 40");
        assert_eq!(short_duration(MS(1500)), "1.5s");
        assert_eq!(short_duration(Duration::from_secs(42)), "42s");
        assert_eq!(short_duration(Duration::from_secs(200)), "3m20s");
        assert_eq!(short_duration(Duration::from_secs(7500)), "2h5m");
        assert_eq!(short_duration(Duration::from_secs(90000)), "1d1h");
        assert_eq!(ServiceState::GivenUp.to_string(), "given-up");
    }
}
