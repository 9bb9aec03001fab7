//! Services another supervisor runs: systemd (`supervisor: systemd`), runit (`runit`) and
//! supervisord (`supervisord`). That supervisor starts the launch script and restarts it when
//! it exits; the agent looks at it every few seconds, probes it and kills the role on live
//! death (the supervisor then starts it again), and plays the talk's cron line when the
//! supervisor gave up: systemd's failed unit gets `reset-failed` + `start`, supervisord's
//! `FATAL` program `supervisorctl start`, a runit service someone downed `sv up`. An admin's
//! runit `down` file is respected: such a service is left down.
//!
//! The parsers are pure (and unit-tested on the tools' real output); [`Outside::look`],
//! [`Outside::rekick`] and [`Outside::stop`] run the tool, each call bounded in time.

use std::process::ExitStatus;
use std::time::Duration;

use keepup_deploy::wire::ServiceState;
use keepup_packager::manifest::{Manifest, Supervised};
use tokio::process::Command;

use crate::reaper::Spawned;
use crate::systemd;

/// How long one call of `systemctl`, `sv` or `supervisorctl` may take.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where runit services live (the package ships `/etc/sv/<name>`).
pub const RUNIT_SV: &str = "/etc/sv";

/// The supervisor that runs a service, and its name for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outside {
    /// A systemd unit.
    Systemd {
        /// `<name>.service`.
        unit: String,
    },
    /// A runit service directory.
    Runit {
        /// `/etc/sv/<name>`.
        dir: String,
    },
    /// A supervisord program.
    Supervisord {
        /// The program's name.
        program: String,
    },
}

/// What the agent saw of a service another supervisor runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Look {
    /// The agent state it maps to.
    pub state: ServiceState,
    /// The process the supervisor started, if running.
    pub pid: Option<u32>,
    /// Restarts the supervisor counted (systemd only; for the others the agent counts the
    /// new pids it sees).
    pub restarts: Option<u64>,
    /// The supervisor's own words, for notes (`failed/failed (start-limit-hit)`, `FATAL`).
    pub detail: String,
    /// Nothing will start it again but a re-kick.
    pub needs_rekick: bool,
}

impl Outside {
    /// The supervisor of a manifest's service (`None`: the agent runs it).
    pub fn of(m: &Manifest) -> Option<Outside> {
        match m.supervisor.kind {
            Supervised::Agent => None,
            Supervised::Systemd => Some(Outside::Systemd {
                unit: m
                    .supervisor
                    .unit
                    .clone()
                    .unwrap_or_else(|| format!("{}.service", m.name)),
            }),
            Supervised::Runit => Some(Outside::Runit {
                dir: format!("{RUNIT_SV}/{}", m.name),
            }),
            Supervised::Supervisord => Some(Outside::Supervisord {
                program: m.name.clone(),
            }),
        }
    }

    /// Its name, as an operator would look it up.
    pub fn describe(&self) -> String {
        match self {
            Outside::Systemd { unit } => unit.clone(),
            Outside::Runit { dir } => format!("runit service {dir}"),
            Outside::Supervisord { program } => format!("supervisord program {program}"),
        }
    }

    /// What a re-kick does, for notes.
    pub fn rekick_words(&self) -> &'static str {
        match self {
            Outside::Systemd { .. } => "systemctl reset-failed + start",
            Outside::Runit { .. } => "sv up",
            Outside::Supervisord { .. } => "supervisorctl start",
        }
    }

    /// The service's current state.
    pub async fn look(&self, spawned: &Spawned) -> Result<Look, String> {
        match self {
            Outside::Systemd { unit } => {
                let u = systemd::show(unit, spawned).await?;
                Ok(Look {
                    state: u.state(),
                    pid: u.main_pid,
                    restarts: Some(u.restarts),
                    detail: format!("{}/{} ({})", u.active, u.sub, u.result),
                    needs_rekick: u.needs_rekick(),
                })
            }
            Outside::Runit { dir } => {
                let out = run("sv", &["status", dir], spawned).await?;
                let down_file = tokio::fs::symlink_metadata(format!("{dir}/down"))
                    .await
                    .is_ok();
                Ok(parse_sv_status(&out.text(), down_file))
            }
            Outside::Supervisord { program } => {
                let out = run("supervisorctl", &["status", program], spawned).await?;
                parse_supervisorctl_status(program, &out.text())
            }
        }
    }

    /// Starts it again (the talk's cron line).
    pub async fn rekick(&self, spawned: &Spawned) -> Result<(), String> {
        match self {
            Outside::Systemd { unit } => systemd::rekick(unit, spawned).await,
            Outside::Runit { dir } => run("sv", &["up", dir], spawned).await?.ok(),
            Outside::Supervisord { program } => {
                let out = run("supervisorctl", &["start", program], spawned).await?;
                let text = out.text();
                // Not loaded (supervisord restarted without the include, or the package's
                // update never reached it): read the configuration again, which starts it.
                if text.contains("no such process") {
                    run("supervisorctl", &["reread"], spawned).await?.ok()?;
                    return run("supervisorctl", &["update", program], spawned)
                        .await?
                        .ok();
                }
                // Starting one that already runs is not a failure.
                if text.contains("already started") {
                    return Ok(());
                }
                out.ok()
            }
        }
    }

    /// Admin-down: the supervisor stops it and does not start it again.
    pub async fn stop(&self, spawned: &Spawned) -> Result<(), String> {
        match self {
            Outside::Systemd { unit } => systemd::stop(unit, spawned).await,
            // `sv down` does not wait; the agent's role kill that follows does the waiting.
            Outside::Runit { dir } => run("sv", &["down", dir], spawned).await?.ok(),
            Outside::Supervisord { program } => {
                let out = run("supervisorctl", &["stop", program], spawned).await?;
                if out.text().contains("not running") {
                    return Ok(());
                }
                out.ok()
            }
        }
    }
}

/// Parses `sv status DIR` (`run: /etc/sv/foo: (pid 123) 45s; run: log: (pid 120) 45s`).
/// `down_file`: the admin's `DIR/down` exists, so a down service is meant to be down.
pub fn parse_sv_status(text: &str, down_file: bool) -> Look {
    let main = text.lines().next().unwrap_or("").trim();
    let main = main.split(';').next().unwrap_or("").trim();
    let (word, _) = main.split_once(':').unwrap_or((main, ""));
    let pid = main
        .split_once("(pid ")
        .and_then(|(_, r)| r.split(')').next())
        .and_then(|p| p.trim().parse().ok());
    let detail = if main.is_empty() {
        "sv said nothing".to_string()
    } else {
        main.to_string()
    };
    let (state, needs_rekick) = match word {
        "run" => (ServiceState::Running, false),
        "finish" => (ServiceState::Backoff, false),
        // The admin's down file: runsv does not start it, and neither does the agent.
        "down" if down_file => (ServiceState::Down, false),
        // Someone ran `sv down`: runsv will not start it again by itself.
        "down" => (ServiceState::GivenUp, true),
        // `fail: ...: runsv not running`, `warning: ...: unable to open supervise/ok`: no runsv
        // watches it (not linked into /etc/service, or runsvdir is not running).
        _ => (ServiceState::GivenUp, true),
    };
    let running = state == ServiceState::Running;
    Look {
        state,
        pid: if running { pid } else { None },
        restarts: None,
        detail,
        needs_rekick,
    }
}

/// Parses `supervisorctl status PROGRAM` (`foo   RUNNING   pid 123, uptime 0:00:05`).
pub fn parse_supervisorctl_status(program: &str, text: &str) -> Result<Look, String> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(program))
        .or_else(|| text.lines().find(|l| !l.trim().is_empty()))
        .unwrap_or("")
        .trim();
    let mut words = line.split_whitespace();
    let first = words.next().unwrap_or("");
    if first != program {
        // `foo: ERROR (no such process)`, or supervisord is not running
        // (`unix:///var/run/supervisor.sock no such file`).
        if line.contains("no such process") {
            return Ok(Look {
                state: ServiceState::GivenUp,
                pid: None,
                restarts: None,
                detail: format!("not loaded in supervisord ({line})"),
                needs_rekick: true,
            });
        }
        return Err(format!(
            "supervisorctl status {program}: {}",
            if line.is_empty() { "no answer" } else { line }
        ));
    }
    let word = words.next().unwrap_or("");
    let pid = line
        .split_once("pid ")
        .and_then(|(_, r)| r.split(',').next())
        .and_then(|p| p.trim().parse().ok());
    let (state, needs_rekick) = match word {
        "RUNNING" => (ServiceState::Running, false),
        "STARTING" => (ServiceState::Starting, false),
        "BACKOFF" | "EXITED" => (ServiceState::Backoff, false),
        "STOPPING" => (ServiceState::Stopping, false),
        // FATAL: it gave up after `startretries`; STOPPED: someone stopped it; UNKNOWN:
        // supervisord lost it. Nothing starts any of them but a re-kick.
        _ => (ServiceState::GivenUp, true),
    };
    let running = state == ServiceState::Running;
    Ok(Look {
        state,
        pid: if running { pid } else { None },
        restarts: None,
        detail: line
            .strip_prefix(program)
            .unwrap_or(line)
            .trim()
            .to_string(),
        needs_rekick,
    })
}

/// A finished tool run.
#[derive(Debug)]
pub struct Ran {
    what: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// Everything it printed.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// What it printed on stdout.
    pub fn stdout(&self) -> &str {
        &self.stdout
    }

    /// `Ok` when it exited 0, else an error with what it printed.
    pub fn ok(self) -> Result<(), String> {
        if self.status.success() {
            return Ok(());
        }
        let said = self.text();
        let said = said.trim();
        Err(format!(
            "{} failed ({}){}{}",
            self.what,
            self.status,
            if said.is_empty() { "" } else { ": " },
            said
        ))
    }
}

/// Runs `PROGRAM ARGS` with no input, bounded by [`TOOL_TIMEOUT`]; the child is the agent's
/// own (the subreaper leaves it to us).
pub async fn run(program: &str, args: &[&str], spawned: &Spawned) -> Result<Ran, String> {
    let what = format!("{program} {}", args.join(" "));
    let child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let pid = child.id().map(|p| p as i32);
    if let Some(p) = pid {
        spawned.insert(p);
    }
    let out = tokio::time::timeout(TOOL_TIMEOUT, child.wait_with_output()).await;
    if let Some(p) = pid {
        spawned.remove(p);
    }
    match out {
        Err(_) => Err(format!(
            "{what} timed out after {}s",
            TOOL_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Ok(Ok(o)) => Ok(Ran {
            what,
            status: o.status,
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runit_states() {
        let l = parse_sv_status(
            "run: /etc/sv/foo: (pid 1234) 45s; run: log: (pid 1200) 45s\n",
            false,
        );
        assert_eq!(
            (l.state.clone(), l.pid, l.needs_rekick),
            (ServiceState::Running, Some(1234), false)
        );
        let l = parse_sv_status(
            "down: /etc/sv/foo: 3s, normally up; run: log: (pid 1200) 45s\n",
            false,
        );
        assert_eq!(
            (l.state.clone(), l.needs_rekick),
            (ServiceState::GivenUp, true)
        );
        // The admin's down file: left down, never re-kicked.
        let l = parse_sv_status("down: /etc/sv/foo: 3s; run: log: (pid 1200) 45s\n", true);
        assert_eq!(
            (l.state.clone(), l.needs_rekick),
            (ServiceState::Down, false)
        );
        let l = parse_sv_status("finish: /etc/sv/foo: (pid 77) 0s\n", false);
        assert_eq!((l.state.clone(), l.pid), (ServiceState::Backoff, None));
        let l = parse_sv_status("fail: /etc/sv/foo: runsv not running\n", false);
        assert_eq!(
            (l.state.clone(), l.needs_rekick),
            (ServiceState::GivenUp, true)
        );
        assert!(l.detail.contains("runsv not running"), "{}", l.detail);
        let l = parse_sv_status(
            "warning: /etc/sv/foo: unable to open supervise/ok: file does not exist\n",
            false,
        );
        assert!(l.needs_rekick);
    }

    #[test]
    fn supervisord_states() {
        let l = parse_supervisorctl_status(
            "foo",
            "foo                              RUNNING   pid 4321, uptime 0:00:05\n",
        )
        .unwrap();
        assert_eq!(
            (l.state.clone(), l.pid, l.needs_rekick),
            (ServiceState::Running, Some(4321), false)
        );
        let l = parse_supervisorctl_status(
            "foo",
            "foo                              FATAL     Exited too quickly (process log may have details)\n",
        )
        .unwrap();
        assert_eq!(
            (l.state.clone(), l.needs_rekick),
            (ServiceState::GivenUp, true)
        );
        assert!(l.detail.starts_with("FATAL"), "{}", l.detail);
        let l = parse_supervisorctl_status("foo", "foo  BACKOFF   Exited too quickly\n").unwrap();
        assert_eq!(l.state, ServiceState::Backoff);
        let l = parse_supervisorctl_status("foo", "foo  STOPPED   Dec 07 02:00 AM\n").unwrap();
        assert!(l.needs_rekick);
        let l = parse_supervisorctl_status("foo", "foo: ERROR (no such process)\n").unwrap();
        assert!(l.needs_rekick && l.detail.contains("not loaded"));
        let e = parse_supervisorctl_status("foo", "unix:///var/run/supervisor.sock no such file\n")
            .unwrap_err();
        assert!(e.contains("supervisor.sock"), "{e}");
    }
}
