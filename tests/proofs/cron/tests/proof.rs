//! `cron` 0.17 wants a seconds field: the 5-field crontab line users write is rejected, so
//! keepup must translate it (prepend a `0` seconds field) before handing it to the crate.

use std::str::FromStr;

use chrono::{TimeZone, Timelike, Utc};
use cron::Schedule;

/// The talk's schedule: 01:00 and 13:00 every day, as a crontab(5) line.
const CRONTAB: &str = "0 1,13 * * *";

/// What keepup must do with a 5-field line before giving it to `cron`.
fn to_cron_crate(line: &str) -> String {
    if line.split_whitespace().count() == 5 {
        format!("0 {line}")
    } else {
        line.to_string()
    }
}

#[test]
fn five_field_crontab_line_is_rejected() {
    let err = Schedule::from_str(CRONTAB).expect_err("cron 0.17 rejects 5 fields");
    println!("cron 0.17 on {CRONTAB:?}: Err({err:?})\nDisplay:\n{err}");
}

#[test]
fn six_field_line_is_accepted_and_means_the_same() {
    let six = to_cron_crate(CRONTAB);
    assert_eq!(six, "0 0 1,13 * * *");
    let schedule = Schedule::from_str(&six).expect("6 fields accepted");
    let start = Utc.with_ymd_and_hms(2026, 11, 1, 0, 30, 0).unwrap();
    let next: Vec<_> = schedule.after(&start).take(3).collect();
    println!("cron 0.17 on {six:?}: next after {start}: {next:?}");
    let hours: Vec<u32> = next.iter().map(|t| t.hour()).collect();
    assert_eq!(hours, [1, 13, 1]);
    assert!(next.iter().all(|t| t.minute() == 0 && t.second() == 0));
}
