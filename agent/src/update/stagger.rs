//! The per-host stagger: each host runs its pass at the scheduled time plus an offset inside
//! the `stagger` window. The offset is a pure function of the host name (SHA-256 of the name,
//! its first 8 bytes read as a fraction of the window), so it is the same on every run and every
//! agent restart, spreads the fleet uniformly, and an operator can compute it.

use std::time::Duration;

use chrono::{DateTime, TimeZone};
use sha2::{Digest, Sha256};

use super::schedule::Schedule;

/// This host's offset in `[0, window)`, to the millisecond (zero for an empty window).
pub fn offset(host: &str, window: Duration) -> Duration {
    let window_ms = window.as_millis().min(u64::MAX as u128) as u64;
    if window_ms == 0 {
        return Duration::ZERO;
    }
    let digest = Sha256::digest(host.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let fraction = u64::from_be_bytes(first);
    // floor(fraction / 2^64 * window): uniform over [0, window) without modulo bias.
    let ms = ((fraction as u128 * window_ms as u128) >> 64) as u64;
    Duration::from_millis(ms)
}

/// When this host's next pass runs: the earliest `scheduled + offset` strictly after `after`.
/// Works for windows longer than the schedule's period too (the passes are just shifted).
pub fn next_pass<Tz: TimeZone>(
    schedule: &Schedule,
    host: &str,
    window: Duration,
    after: &DateTime<Tz>,
) -> Option<DateTime<Tz>> {
    let off = chrono::Duration::from_std(offset(host, window)).ok()?;
    let scheduled = schedule.next_after(&(after.clone() - off))?;
    Some(scheduled + off)
}

/// Passes per minute of `window` over `hosts` synthetic names (`host-00000` ...): the
/// histogram behind the stagger figure in docs/benchmarks.md (tests/bench/stagger.sh).
#[cfg(test)]
pub fn per_minute(hosts: usize, window: Duration) -> Vec<u32> {
    let minutes = window.as_secs().div_ceil(60) as usize;
    let mut bins = vec![0u32; minutes.max(1)];
    for i in 0..hosts {
        let off = offset(&format!("host-{i:05}"), window);
        bins[(off.as_secs() / 60) as usize] += 1;
    }
    bins
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    #[test]
    fn offset_is_stable_and_inside_the_window() {
        let w = Duration::from_secs(6 * 3600);
        assert_eq!(offset("web1", w), offset("web1", w));
        assert_ne!(offset("web1", w), offset("web2", w));
        for i in 0..1000 {
            assert!(offset(&format!("h{i}"), w) < w);
        }
        assert_eq!(offset("web1", Duration::ZERO), Duration::ZERO);
        assert!(offset("web1", Duration::from_millis(1)) < Duration::from_millis(1));
    }

    #[test]
    fn pass_is_schedule_plus_offset() {
        let s = Schedule::parse("0 1,13 * * *").unwrap();
        let w = Duration::from_secs(6 * 3600);
        let off = chrono::Duration::from_std(offset("web1", w)).unwrap();
        let t0 = Utc.with_ymd_and_hms(2026, 11, 1, 0, 30, 0).unwrap();
        let first = next_pass(&s, "web1", w, &t0).unwrap();
        // The 13:00 pass of the previous day may still be pending at 00:30 if off > 11.5 h;
        // with a 6 h window it is not, so the first pass is 01:00 + offset.
        assert_eq!(
            first,
            Utc.with_ymd_and_hms(2026, 11, 1, 1, 0, 0).unwrap() + off
        );
        let second = next_pass(&s, "web1", w, &first).unwrap();
        assert_eq!(
            second,
            Utc.with_ymd_and_hms(2026, 11, 1, 13, 0, 0).unwrap() + off
        );
        // Just before the pass, the pass is next; at it, the following one.
        let just_before = first - chrono::Duration::milliseconds(1);
        assert_eq!(next_pass(&s, "web1", w, &just_before).unwrap(), first);
    }

    #[test]
    fn window_longer_than_the_period_still_gives_every_pass() {
        let s = Schedule::parse("*/5 * * * *").unwrap();
        let w = Duration::from_secs(3600);
        let mut t = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        let mut gaps = Vec::new();
        for _ in 0..5 {
            let n = next_pass(&s, "db7", w, &t).unwrap();
            gaps.push((n - t).num_seconds());
            t = n;
        }
        assert!(gaps[1..].iter().all(|g| *g == 300), "{gaps:?}");
    }

    /// Issue 4's bound: over 10,000 host names no minute of a 6 h window gets more than twice
    /// the mean. `bash tests/bench/stagger.sh` prints the same figures.
    #[test]
    fn ten_thousand_hosts_spread_over_six_hours() {
        let bins = per_minute(10_000, Duration::from_secs(6 * 3600));
        assert_eq!(bins.len(), 360);
        let mean = 10_000.0 / 360.0;
        let max = *bins.iter().max().unwrap();
        let min = *bins.iter().min().unwrap();
        println!(
            "stagger: 10000 hosts, 360 minutes: mean {mean:.1}/min, max {max} ({:.2}x mean), \
             min {min} ({:.2}x mean)",
            max as f64 / mean,
            min as f64 / mean
        );
        assert!((max as f64) <= 2.0 * mean, "max {max} > 2 x mean {mean:.1}");
    }
}
