//! `supervisor: systemd` services: systemd runs the launch script (`Restart=always`) and gives
//! up after its start limit; the agent plays the talk's cron line for it: `systemctl
//! reset-failed` + `systemctl start` when the unit is not active. Probes and role kills work
//! the same as for agent-supervised services.

use std::collections::HashMap;

use crate::reaper::Spawned;
use keepup_deploy::wire::ServiceState;

/// What `systemctl show` says about a unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitState {
    /// `active`, `activating`, `failed`, `inactive`, ...
    pub active: String,
    /// `running`, `auto-restart`, `dead`, `failed`, ...
    pub sub: String,
    /// Main process id, if running.
    pub main_pid: Option<u32>,
    /// Restarts systemd did (`NRestarts`).
    pub restarts: u64,
    /// `Result=` (`success`, `exit-code`, `start-limit-hit`, ...).
    pub result: String,
}

impl UnitState {
    /// Parses `systemctl show -p ActiveState,SubState,MainPID,NRestarts,Result` output.
    pub fn parse(text: &str) -> UnitState {
        let kv: HashMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        UnitState {
            active: kv.get("ActiveState").unwrap_or(&"").to_string(),
            sub: kv.get("SubState").unwrap_or(&"").to_string(),
            main_pid: kv
                .get("MainPID")
                .and_then(|v| v.parse().ok())
                .filter(|&p| p != 0),
            restarts: kv
                .get("NRestarts")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            result: kv.get("Result").unwrap_or(&"").to_string(),
        }
    }

    /// The agent state this unit state corresponds to.
    pub fn state(&self) -> ServiceState {
        match (self.active.as_str(), self.sub.as_str()) {
            ("active", _) | ("reloading", _) => ServiceState::Running,
            ("activating", "auto-restart") => ServiceState::Backoff,
            ("activating", _) => ServiceState::Starting,
            // failed (start limit hit, or a plain failure), inactive, deactivating:
            // nothing will start it again but a re-kick.
            _ => ServiceState::GivenUp,
        }
    }

    /// Whether a re-kick has something to do.
    pub fn needs_rekick(&self) -> bool {
        self.state() == ServiceState::GivenUp
    }
}

/// Runs `systemctl ARGS`; returns stdout, or an error with what it printed.
pub async fn systemctl(args: &[&str], spawned: &Spawned) -> Result<String, String> {
    let ran = crate::external::run("systemctl", args, spawned).await?;
    let out = ran.stdout().to_string();
    ran.ok().map(|()| out)
}

/// The unit's current state.
pub async fn show(unit: &str, spawned: &Spawned) -> Result<UnitState, String> {
    systemctl(
        &[
            "show",
            "-p",
            "ActiveState,SubState,MainPID,NRestarts,Result",
            "--",
            unit,
        ],
        spawned,
    )
    .await
    .map(|t| UnitState::parse(&t))
}

/// The re-kick: `systemctl reset-failed UNIT` then `systemctl start UNIT` (without waiting
/// for the start job, so a slow unit cannot stall the agent).
pub async fn rekick(unit: &str, spawned: &Spawned) -> Result<(), String> {
    // reset-failed fails harmlessly when the unit is not failed.
    let _ = systemctl(&["reset-failed", "--", unit], spawned).await;
    systemctl(&["start", "--no-block", "--", unit], spawned)
        .await
        .map(|_| ())
}

/// Admin-down: `systemctl stop UNIT`.
pub async fn stop(unit: &str, spawned: &Spawned) -> Result<(), String> {
    systemctl(&["stop", "--", unit], spawned).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_unit_states() {
        let s = UnitState::parse(
            "ActiveState=failed\nSubState=failed\nMainPID=0\nNRestarts=5\nResult=start-limit-hit\n",
        );
        assert_eq!(s.state(), ServiceState::GivenUp);
        assert!(s.needs_rekick());
        assert_eq!(s.main_pid, None);
        assert_eq!(s.restarts, 5);
        assert_eq!(s.result, "start-limit-hit");
        let s = UnitState::parse("ActiveState=active\nSubState=running\nMainPID=42\n");
        assert_eq!((s.state(), s.main_pid), (ServiceState::Running, Some(42)));
        assert!(!s.needs_rekick());
        let s = UnitState::parse("ActiveState=activating\nSubState=auto-restart\n");
        assert_eq!(s.state(), ServiceState::Backoff);
        let s = UnitState::parse("ActiveState=inactive\nSubState=dead\n");
        assert!(s.needs_rekick());
    }
}
