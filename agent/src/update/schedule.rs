//! When an update pass runs: a crontab line (standard 5 fields, or 6 with seconds first),
//! read with the `cron` crate after translating it to the crate's dialect.
//!
//! The crate (0.17) differs from crontab(5) in two ways that matter: it requires a seconds
//! field (a 5-field line gets `0` prepended) and it numbers days of the week 1-7 from Sunday,
//! where crontab uses 0-7 with 0 and 7 both Sunday and 1 Monday (numeric days are rewritten as
//! names, which both agree on). Its error messages are a caret under the line, so every field
//! is checked on its own and the error names the field, its value and what it accepts.
//! Like the crate, a line restricting both day-of-month and day-of-week needs both to match
//! (crontab would run when either matches).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, TimeZone};

/// The fields of a 6-field line, in order, with what each accepts.
const FIELDS: [(&str, &str); 6] = [
    ("second", "0-59"),
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day of month", "1-31"),
    ("month", "1-12 or JAN-DEC"),
    ("day of week", "0-7 (0 and 7 are Sunday) or SUN-SAT"),
];

const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// A parsed update schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    line: String,
    inner: cron::Schedule,
}

/// Why a schedule line was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleError(String);

impl fmt::Display for ScheduleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScheduleError {}

impl Schedule {
    /// Parses a crontab line: `min hour dom month dow` or `sec min hour dom month dow`.
    pub fn parse(line: &str) -> Result<Schedule, ScheduleError> {
        let given: Vec<&str> = line.split_whitespace().collect();
        let mut fields: Vec<String> = match given.len() {
            5 => std::iter::once("0")
                .chain(given.iter().copied())
                .map(String::from)
                .collect(),
            6 => given.iter().map(|s| s.to_string()).collect(),
            n => {
                return Err(ScheduleError(format!(
                    "schedule {line:?}: {n} fields; expected 5 (minute hour day-of-month month \
                     day-of-week, as in crontab: \"0 1,13 * * *\") or 6 (second first: \
                     \"0 0 1,13 * * *\")"
                )))
            }
        };
        // Position of field i in what the user wrote (1-based), for messages.
        let shown = |i: usize| if given.len() == 5 { i } else { i + 1 };
        let bad = |i: usize, why: &str| {
            let (name, accepts) = FIELDS[i];
            ScheduleError(format!(
                "schedule {line:?}: field {} ({name}) {:?}{why}: expected {accepts}, lists \
                 (a,b), ranges (a-b), steps (*/n, a-b/n) or *",
                shown(i),
                if given.len() == 5 && i == 0 {
                    "0"
                } else {
                    given[i + given.len() - 6]
                }
            ))
        };
        fields[5] = dow_to_names(&fields[5]).map_err(|why| bad(5, &why))?;
        // Check each field alone (the others `*`) so the error can name it.
        for i in 0..6 {
            let mut probe: Vec<&str> = vec!["*"; 6];
            probe[0] = "0";
            probe[i] = &fields[i];
            if cron::Schedule::from_str(&probe.join(" ")).is_err() {
                return Err(bad(i, " is not valid"));
            }
        }
        let inner = cron::Schedule::from_str(&fields.join(" "))
            .map_err(|e| ScheduleError(format!("schedule {line:?}: {e}")))?;
        if inner.after(&chrono::Utc::now()).next().is_none() {
            return Err(ScheduleError(format!("schedule {line:?}: never fires")));
        }
        Ok(Schedule {
            line: line.trim().to_string(),
            inner,
        })
    }

    /// The line as written.
    pub fn line(&self) -> &str {
        &self.line
    }

    /// The first scheduled instant strictly after `after`.
    pub fn next_after<Tz: TimeZone>(&self, after: &DateTime<Tz>) -> Option<DateTime<Tz>> {
        self.inner.after(after).next()
    }
}

impl FromStr for Schedule {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Schedule, ScheduleError> {
        Schedule::parse(s)
    }
}

/// Rewrites crontab day-of-week numbers (0-7, Sunday 0 or 7) as day names; names, `*` and `?`
/// pass through.
fn dow_to_names(field: &str) -> Result<String, String> {
    if field.chars().any(|c| c.is_ascii_alphabetic()) || field == "?" {
        return Ok(field.to_string());
    }
    let mut days = [false; 7];
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!(": step {s:?} is not a positive number"))?;
                (r, step)
            }
            None => (item, 1),
        };
        let num = |s: &str| -> Result<u32, String> {
            s.parse::<u32>()
                .ok()
                .filter(|n| *n <= 7)
                .ok_or_else(|| format!(": {s:?} is not a day of the week"))
        };
        let (lo, hi) = match range {
            "*" => (0, 6),
            r => match r.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None if step > 1 => (num(r)?, 7),
                None => (num(r)?, num(r)?),
            },
        };
        if lo > hi {
            return Err(format!(": range {range:?} runs backwards"));
        }
        for d in (lo..=hi).step_by(step as usize) {
            days[(d % 7) as usize] = true;
        }
    }
    if days.iter().all(|d| *d) {
        return Ok("*".into());
    }
    let names: Vec<&str> = (0..7).filter(|d| days[*d]).map(|d| DAYS[d]).collect();
    Ok(names.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, Timelike, Utc, Weekday};

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    #[test]
    fn the_talks_five_field_line() {
        let s = Schedule::parse("0 1,13 * * *").unwrap();
        let t0 = at(2026, 11, 1, 0, 30);
        let a = s.next_after(&t0).unwrap();
        assert_eq!(a, at(2026, 11, 1, 1, 0));
        let b = s.next_after(&a).unwrap();
        assert_eq!(b, at(2026, 11, 1, 13, 0));
        assert_eq!(s.next_after(&b).unwrap(), at(2026, 11, 2, 1, 0));
    }

    #[test]
    fn six_fields_have_seconds_first() {
        let s = Schedule::parse("*/10 * * * * *").unwrap();
        let t0 = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 3).unwrap();
        assert_eq!(s.next_after(&t0).unwrap().second(), 10);
        let s = Schedule::parse("30 */5 * * * *").unwrap();
        let n = s.next_after(&at(2026, 11, 1, 0, 1)).unwrap();
        assert_eq!((n.minute(), n.second()), (5, 30));
    }

    #[test]
    fn crontab_day_numbers_mean_what_crontab_says() {
        // 2026-11-01 is a Sunday.
        assert_eq!(at(2026, 11, 1, 0, 0).weekday(), Weekday::Sun);
        let next_day = |line: &str| {
            Schedule::parse(line)
                .unwrap()
                .next_after(&at(2026, 11, 1, 12, 0))
                .unwrap()
                .weekday()
        };
        assert_eq!(next_day("0 0 * * 1"), Weekday::Mon);
        assert_eq!(next_day("0 0 * * 0"), Weekday::Sun);
        assert_eq!(next_day("0 0 * * 7"), Weekday::Sun);
        assert_eq!(next_day("0 0 * * 5-7"), Weekday::Fri);
        assert_eq!(next_day("0 0 * * 6"), Weekday::Sat);
        assert_eq!(next_day("0 0 * * 1-5"), Weekday::Mon);
        assert_eq!(next_day("0 0 * * MON-FRI"), Weekday::Mon);
        assert_eq!(next_day("0 0 0 * * 2"), Weekday::Tue);
        assert_eq!(dow_to_names("1-5").unwrap(), "MON,TUE,WED,THU,FRI");
        assert_eq!(dow_to_names("*/2").unwrap(), "SUN,TUE,THU,SAT");
        assert_eq!(dow_to_names("0-7").unwrap(), "*");
    }

    #[test]
    fn errors_name_the_field() {
        let err = |l: &str| Schedule::parse(l).unwrap_err().to_string();
        let e = err("0 25 * * *");
        assert!(
            e.contains("field 2 (hour) \"25\" is not valid: expected 0-23"),
            "{e}"
        );
        let e = err("61 1 * * *");
        assert!(e.contains("field 1 (minute) \"61\""), "{e}");
        let e = err("0 0 1 * * *x");
        assert!(e.contains("field 6 (day of week)"), "{e}");
        let e = err("0 0 * * 8");
        assert!(
            e.contains("field 5 (day of week) \"8\": \"8\" is not a day"),
            "{e}"
        );
        let e = err("0 0 32 * *");
        assert!(e.contains("field 3 (day of month)"), "{e}");
        let e = err("0 0 * 13 *");
        assert!(e.contains("field 4 (month)"), "{e}");
        let e = err("70 0 0 * * *");
        assert!(e.contains("field 1 (second)"), "{e}");
        let e = err("0 1,13 * *");
        assert!(e.contains("4 fields; expected 5"), "{e}");
        let e = err("");
        assert!(e.contains("0 fields"), "{e}");
        let e = err("0 0 31 2 *");
        assert!(e.contains("never fires"), "{e}");
    }
}
