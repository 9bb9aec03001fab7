//! Herd control for `keepup serve`: when more reports (or connections) arrive than the server
//! can take, the ones turned away get `503` with a `Retry-After` picked at random over a spread
//! wide enough for the herd to come back at a rate the server can store, instead of timing out
//! or all coming back in the same second. The spread is planned here from two figures the
//! server keeps: how many requests it turned away in the last second (the herd) and how many
//! reports it stored per second at best lately (its capacity). Agents honour the answer
//! (agent/src/report.rs); docs/reports.md, "Herds", says how.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use rand::Rng as _;

/// The shortest spread: even a small herd is spread over two seconds.
pub const MIN_SPREAD_SECS: u64 = 2;
/// The longest spread: no client is asked to wait more than this.
pub const MAX_SPREAD_SECS: u64 = 300;
/// The capacity assumed before any has been measured, and never less: reports per second
/// (a two-core server on SQLite stores 6,000 to 20,000: docs/benchmarks.md).
const MIN_CAPACITY: u64 = 5_000;
/// How much slack the spread leaves: the herd comes back at 1/SLACK of the capacity.
const SLACK: f64 = 1.5;
/// How fast the measured capacity is forgotten, per second (the best rate lately decays).
const CAPACITY_DECAY: f64 = 0.9;

/// Over how many seconds a herd of `herd` requests must come back so that a server storing
/// `capacity` reports per second takes them with room to spare (whole seconds, at least
/// [`MIN_SPREAD_SECS`], at most [`MAX_SPREAD_SECS`]).
pub fn spread_secs(herd: u64, capacity: u64) -> u64 {
    let capacity = capacity.max(MIN_CAPACITY) as f64;
    let secs = (herd as f64 * SLACK / capacity).ceil() as u64;
    secs.clamp(MIN_SPREAD_SECS, MAX_SPREAD_SECS)
}

/// The server's recent past, per whole second since it started.
#[derive(Debug, Default)]
struct Window {
    /// The second the counts below are for.
    second: u64,
    /// Requests turned away in that second, and in the one before.
    deferred: u64,
    deferred_before: u64,
    /// [`Herd::stored`]'s total when that second began.
    stored_at_start: u64,
    /// The best store rate lately (reports per second), decaying.
    capacity: f64,
}

impl Window {
    /// Moves the window to `second`, closing the seconds in between.
    fn advance(&mut self, second: u64, stored: u64) {
        if second <= self.second {
            return;
        }
        let gap = second - self.second;
        let rate = stored.saturating_sub(self.stored_at_start) as f64 / gap as f64;
        self.capacity = rate.max(self.capacity * CAPACITY_DECAY.powi(gap.min(1000) as i32));
        self.deferred_before = if gap == 1 { self.deferred } else { 0 };
        self.deferred = 0;
        self.stored_at_start = stored;
        self.second = second;
    }
}

/// What the server counts for herd control: shared by the connection cap and the report
/// handler.
#[derive(Debug)]
pub struct Herd {
    start: Instant,
    /// Reports stored since the start (counted without the lock: one per accepted report).
    stored: AtomicU64,
    window: Mutex<Window>,
}

impl Default for Herd {
    fn default() -> Herd {
        Herd::new()
    }
}

impl Herd {
    /// Nothing counted yet.
    pub fn new() -> Herd {
        Herd {
            start: Instant::now(),
            stored: AtomicU64::new(0),
            window: Mutex::new(Window::default()),
        }
    }

    /// One report was stored.
    pub fn stored(&self) {
        self.stored.fetch_add(1, Ordering::Relaxed);
    }

    /// One request is turned away: counts it in the herd and returns the seconds it should
    /// wait (`Retry-After`), picked at random between 1 and the spread the herd needs now.
    pub fn defer(&self) -> u64 {
        let spread = {
            let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
            w.advance(
                self.start.elapsed().as_secs(),
                self.stored.load(Ordering::Relaxed),
            );
            w.deferred += 1;
            spread_secs(w.deferred.max(w.deferred_before), w.capacity as u64)
        };
        rand::thread_rng().gen_range(1..=spread)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spread_grows_with_the_herd_and_shrinks_with_capacity() {
        assert_eq!(spread_secs(1, 20_000), MIN_SPREAD_SECS);
        // 100,000 agents at once against 20,000 reports/s: 7.5 s of them, with slack.
        assert_eq!(spread_secs(100_000, 20_000), 8);
        assert_eq!(spread_secs(100_000, 5_000), 30);
        // Unmeasured capacity counts as the floor, never as zero.
        assert_eq!(spread_secs(100_000, 0), 30);
        assert_eq!(spread_secs(u64::MAX / 4, 1), MAX_SPREAD_SECS);
    }

    #[test]
    fn the_window_keeps_the_last_second_and_the_best_rate() {
        let mut w = Window {
            deferred: 7,
            ..Window::default()
        };
        w.advance(1, 4_000);
        assert_eq!((w.deferred, w.deferred_before), (0, 7));
        assert_eq!(w.capacity, 4_000.0);
        // A quiet stretch: the herd is over, the capacity decays but is not forgotten at once.
        w.advance(4, 4_000);
        assert_eq!(w.deferred_before, 0);
        assert!(
            w.capacity > 2_000.0 && w.capacity < 4_000.0,
            "{}",
            w.capacity
        );
        // Going back in time (never happens with a monotonic clock) changes nothing.
        w.advance(2, 9_999);
        assert_eq!(w.second, 4);
    }

    #[test]
    fn retry_after_is_jittered_over_the_spread() {
        let herd = Herd::new();
        let picks: Vec<u64> = (0..20_000).map(|_| herd.defer()).collect();
        // 20,000 turned away in one second, capacity unmeasured: a spread of 6 s.
        let spread = spread_secs(20_000, 0);
        assert_eq!(spread, 6);
        assert!(picks.iter().all(|&s| (1..=spread).contains(&s)));
        let distinct: std::collections::BTreeSet<u64> = picks.iter().copied().collect();
        assert!(distinct.len() as u64 >= spread - 1, "{distinct:?}");
    }
}
