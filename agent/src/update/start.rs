//! Start confirmation after an install or upgrade, as pure judgement over the agent's own
//! `status` snapshots ([`ServiceStatus`]): the pass polls a service's snapshot until
//! [`judge_new_run`] says started or failed, and on failure reports [`log_tail`] of the
//! service's log.
//!
//! Started: the snapshot shows the new version, the service is starting or running, and every
//! probe has passed since the current run began (a result older than the run is from the
//! previous version); a service without probes counts once its launch script has run 1 s.
//! Failed: given up, refused or admin-down at the new version at once; anything else
//! (backoff, not sane, probes failing or not yet run, an older version) only when the
//! deadline — the longest probe `grace` plus a timeout — has passed.

use std::path::Path;
use std::time::Duration;

use crate::proto::ServiceStatus;
use keepup_deploy::wire::ServiceState;

/// How long a service without probes must have run to count as started.
pub const NO_PROBE_RUN: Duration = Duration::from_secs(1);

/// Where a start stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Up, at the new version, probes passing.
    Started,
    /// Not yet; ask again.
    Waiting,
    /// Did not start; why.
    FailedToStart(String),
}

/// Does a manifest version (`1.2`, or `1.2-1`) name the package version `[epoch:]1.2-1`?
pub fn version_matches(manifest: &str, package: &str) -> bool {
    let strip = |v: &str| match v.split_once(':') {
        Some((e, rest)) if e.chars().all(|c| c.is_ascii_digit()) => rest.to_string(),
        _ => v.to_string(),
    };
    let (m, p) = (strip(manifest), strip(package));
    m == p
        || p.rsplit_once('-')
            .is_some_and(|(upstream, _)| upstream == m)
}

/// When the package command began: as a run id ([`ServiceStatus::run`]) and how long ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Began {
    /// Microseconds since the Unix epoch.
    pub unix_micros: u64,
    /// How long ago.
    pub ago: Duration,
}

impl Began {
    /// `ago` before now.
    pub fn ago(ago: Duration) -> Began {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Began {
            unix_micros: now.saturating_sub(ago).as_micros() as u64,
            ago,
        }
    }
}

/// Judges one snapshot, `elapsed` after the install finished, against `deadline`.
pub fn judge(
    s: &ServiceStatus,
    package_version: &str,
    elapsed: Duration,
    deadline: Duration,
) -> Verdict {
    let late = elapsed >= deadline;
    let fail = |why: String| Verdict::FailedToStart(why);
    let new_version = version_matches(&s.version, package_version);
    match s.state {
        // Only the new manifest's verdict counts: the agent may not have read it yet, and an
        // upgrade starts a service that gave up on its old bits.
        ServiceState::GivenUp | ServiceState::Refused | ServiceState::Down if new_version => {
            let extra = s
                .note
                .as_deref()
                .or(s.last_exit.as_deref())
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            return fail(format!("{}{extra}", s.state.as_str()));
        }
        _ => {}
    }
    let why_not = if !new_version {
        format!(
            "still version {} (waiting for {package_version})",
            s.version
        )
    } else if !matches!(s.state, ServiceState::Starting | ServiceState::Running) {
        let mut w = s.state.as_str().to_string();
        if let Some(e) = &s.last_exit {
            w.push_str(&format!(", last exit: {e}"));
        }
        w
    } else {
        // Started once ready (`READY=1`, its probes passed, or its first second survived, by
        // its `supervisor.ready`; a systemd unit once active and past NO_PROBE_RUN) with every
        // probe passed in this run. Until then, the failing probes say why, else the state.
        let uptime = s.uptime_secs.unwrap_or(0.0);
        let pending: Vec<String> = s
            .probes
            .iter()
            .filter(|p| !(p.ok == Some(true) && p.age_secs.is_some_and(|a| a <= uptime)))
            .map(|p| match (&p.ok, &p.reason) {
                (Some(false), Some(r)) => format!("{} failing: {r}", p.name),
                (Some(false), None) => format!("{} failing", p.name),
                _ => format!("{} not passed yet", p.name),
            })
            .collect();
        let ran_enough = s.run.is_some() || uptime >= NO_PROBE_RUN.as_secs_f64();
        if s.state.is_ready() && pending.is_empty() && ran_enough {
            return Verdict::Started;
        }
        if !pending.is_empty() {
            pending.join("; ")
        } else if s.state.is_ready() {
            format!("running for {uptime:.1}s only")
        } else {
            match &s.note {
                Some(n) => format!("starting: {n}"),
                None => "starting".into(),
            }
        }
    };
    if late {
        fail(format!(
            "not started after {}: {why_not}",
            humantime::format_duration(deadline)
        ))
    } else {
        Verdict::Waiting
    }
}

/// [`judge`], where the current run must also have begun after the package command did
/// (`since_command` ago): a keepup package's scripts kill the role once the new files are in
/// place, so a run older than the command is the previous version's, even if the status
/// already shows the new manifest's version.
pub fn judge_new_run(
    s: &ServiceStatus,
    package_version: &str,
    began: Began,
    elapsed: Duration,
    deadline: Duration,
) -> Verdict {
    // Agent-run services carry the run's id, which is the spawn time in microseconds since
    // the Unix epoch (made strictly increasing): a run begun before the command has a smaller
    // one, even across a restart of the agent. systemd units have none: their uptime says.
    let old_run = match s.run {
        Some(run) => run < began.unix_micros,
        None => {
            matches!(s.state, ServiceState::Starting | ServiceState::Running)
                && s.uptime_secs.is_some_and(|u| u > began.ago.as_secs_f64())
        }
    };
    if !old_run {
        return judge(s, package_version, elapsed, deadline);
    }
    if elapsed >= deadline {
        Verdict::FailedToStart(format!(
            "not started after {}: the run from before the install is still the current one \
             (the package did not restart the service)",
            humantime::format_duration(deadline)
        ))
    } else {
        Verdict::Waiting
    }
}

/// The last `max` bytes of `log_dir/<service>.log` (from a line start when possible).
pub fn log_tail(log_dir: &Path, service: &str, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(log_dir.join(format!("{service}.log"))) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    match (start > 0, text.find('\n')) {
        (true, Some(i)) if i + 1 < text.len() => text[i + 1..].to_string(),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ProbeStatus;

    fn status(
        version: &str,
        state: ServiceState,
        uptime: f64,
        probes: Vec<ProbeStatus>,
    ) -> ServiceStatus {
        ServiceStatus {
            name: "hello".into(),
            version: version.into(),
            supervisor: "agent".into(),
            state,
            pid: Some(42),
            uptime_secs: Some(uptime),
            restarts: 0,
            last_exit: None,
            note: None,
            run: None,
            ready_secs: None,
            status_text: None,
            probes,
        }
    }

    fn probe(ok: Option<bool>, age: f64, reason: Option<&str>) -> ProbeStatus {
        ProbeStatus {
            name: "banner".into(),
            probe: "tcp 127.0.0.1:7070".into(),
            ok,
            reason: reason.map(String::from),
            failures: 0,
            age_secs: Some(age),
        }
    }

    const D: Duration = Duration::from_secs(15);
    const EARLY: Duration = Duration::from_secs(2);

    #[test]
    fn versions() {
        assert!(version_matches("1.2", "1.2-1"));
        assert!(version_matches("1.2-1", "1.2-1"));
        assert!(version_matches("1.2", "3:1.2-1"));
        assert!(!version_matches("1.1", "1.2-1"));
        assert!(version_matches("1.0+rb1", "1.0+rb1-1"));
    }

    #[test]
    fn no_probes_means_one_second_of_running() {
        let s = status("1.2", ServiceState::Starting, 0.4, vec![]);
        assert_eq!(judge(&s, "1.2-1", EARLY, D), Verdict::Waiting);
        let s = status("1.2", ServiceState::Running, 1.5, vec![]);
        assert_eq!(judge(&s, "1.2-1", EARLY, D), Verdict::Started);
    }

    #[test]
    fn probes_must_pass_during_this_run() {
        // A pass from before the restart (older than the run) does not count.
        let s = status(
            "1.2",
            ServiceState::Starting,
            3.0,
            vec![probe(Some(true), 10.0, None)],
        );
        assert_eq!(judge(&s, "1.2-1", EARLY, D), Verdict::Waiting);
        let s = status(
            "1.2",
            ServiceState::Running,
            3.0,
            vec![probe(Some(true), 0.5, None)],
        );
        assert_eq!(judge(&s, "1.2-1", EARLY, D), Verdict::Started);
    }

    #[test]
    fn old_version_waits_then_fails() {
        let s = status("1.1", ServiceState::Running, 30.0, vec![]);
        assert_eq!(judge(&s, "1.2-1", EARLY, D), Verdict::Waiting);
        let Verdict::FailedToStart(why) = judge(&s, "1.2-1", D, D) else {
            panic!()
        };
        assert!(why.contains("still version 1.1"), "{why}");
    }

    #[test]
    fn failing_probes_fail_at_the_deadline_with_the_reason() {
        let s = status(
            "1.2",
            ServiceState::Running,
            8.0,
            vec![probe(Some(false), 1.0, Some("connection refused"))],
        );
        assert_eq!(judge(&s, "1.2-1", EARLY, D), Verdict::Waiting);
        assert_eq!(
            judge(&s, "1.2-1", D, D),
            Verdict::FailedToStart(
                "not started after 15s: banner failing: connection refused".into()
            )
        );
    }

    #[test]
    fn given_up_fails_at_once() {
        let mut s = status("1.2", ServiceState::GivenUp, 0.0, vec![]);
        s.last_exit = Some("exit status 1 after 0.1s".into());
        assert_eq!(
            judge(&s, "1.2-1", EARLY, D),
            Verdict::FailedToStart("given-up (exit status 1 after 0.1s)".into())
        );
        let s = status("1.2", ServiceState::Backoff, 0.0, vec![]);
        assert_eq!(judge(&s, "1.2-1", EARLY, D), Verdict::Waiting);
        let Verdict::FailedToStart(why) = judge(&s, "1.2-1", D, D) else {
            panic!()
        };
        assert!(why.ends_with(": backoff"), "{why}");
        // Given up on the old bits, before the agent has read the new manifest: not yet.
        let s = status("1.1", ServiceState::GivenUp, 0.0, vec![]);
        assert_eq!(judge(&s, "1.2-1", EARLY, D), Verdict::Waiting);
        let Verdict::FailedToStart(why) = judge(&s, "1.2-1", D, D) else {
            panic!()
        };
        assert!(why.contains("still version 1.1"), "{why}");
    }

    #[test]
    fn the_run_must_be_newer_than_the_install() {
        // Shows the new version (manifest reloaded) with passing probes, but began before the
        // package command: the old daemon, not yet killed by the package's scripts.
        let s = status(
            "1.2",
            ServiceState::Running,
            20.0,
            vec![probe(Some(true), 0.5, None)],
        );
        let cmd = Began::ago(Duration::from_secs(5));
        assert_eq!(judge_new_run(&s, "1.2-1", cmd, EARLY, D), Verdict::Waiting);
        let Verdict::FailedToStart(why) = judge_new_run(&s, "1.2-1", cmd, D, D) else {
            panic!()
        };
        assert!(why.contains("the run from before the install"), "{why}");
        let s = status(
            "1.2",
            ServiceState::Running,
            3.0,
            vec![probe(Some(true), 0.5, None)],
        );
        assert_eq!(judge_new_run(&s, "1.2-1", cmd, EARLY, D), Verdict::Started);
        let s = status("1.2", ServiceState::GivenUp, 0.0, vec![]);
        assert!(matches!(
            judge_new_run(&s, "1.2-1", cmd, EARLY, D),
            Verdict::FailedToStart(_)
        ));
    }

    #[test]
    fn an_agent_run_is_judged_by_its_run_id() {
        let cmd = Began::ago(Duration::from_secs(5));
        let mut s = status(
            "1.2",
            ServiceState::Running,
            100.0,
            vec![probe(Some(true), 0.5, None)],
        );
        // The id says the run began before the command, whatever the uptime claims.
        s.run = Some(cmd.unix_micros - 1);
        s.uptime_secs = Some(1.0);
        assert_eq!(judge_new_run(&s, "1.2-1", cmd, EARLY, D), Verdict::Waiting);
        s.run = Some(cmd.unix_micros + 1);
        assert_eq!(judge_new_run(&s, "1.2-1", cmd, EARLY, D), Verdict::Started);
        // Not ready yet: starting, with the machine's note.
        s.state = ServiceState::Starting;
        s.note = Some("not ready yet (supervisor.ready: notify, timeout 90s)".into());
        let Verdict::FailedToStart(why) = judge_new_run(&s, "1.2-1", cmd, D, D) else {
            panic!()
        };
        assert!(why.contains("starting: not ready yet"), "{why}");
    }

    #[test]
    fn tail_of_the_log() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(log_tail(d.path(), "hello", 100), "");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(d.path().join("hello.log"), &text).unwrap();
        let t = log_tail(d.path(), "hello", 30);
        assert!(t.ends_with("line 99\n") && t.starts_with("line "), "{t:?}");
        assert!(t.len() <= 30);
        assert_eq!(log_tail(d.path(), "hello", 10_000), text);
    }
}
