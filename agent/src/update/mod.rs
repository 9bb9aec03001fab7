//! The updater: keeps the host at what the repository says it should run. When a pass runs
//! ([`schedule`] plus this host's [`stagger`] offset, or `keepup-agent update --now`), what it
//! does ([`pass`]: signed index and policy, [`serials`] against replay, the [`plan`], downloads
//! with a checked sha256 ([`fetch`]), the package manager bounded in time ([`pkg`], [`run`]),
//! and whether each installed service started ([`start`])). Passes run in the short-lived
//! keepup-agent-pass child that the supervisor's runner (`crate::runner`) starts for each
//! one (`crate::child`): the supervisor itself never runs this code, so a crash, a hang or a
//! leak here cannot take supervision down.

pub mod error;
pub mod fetch;
pub mod keys;
pub mod pass;
pub mod pkg;
pub mod plan;
pub mod run;
pub mod schedule;
pub mod serials;
pub mod stagger;
pub mod start;
#[cfg(test)]
pub mod testgpg;
pub mod waves;

use keepup_deploy::wire::report::UpdateReport;

use crate::hoststate::SharedHost;
use pass::{PassResult, Updater};

/// Records a pass in the state reports are built from.
pub fn publish(state: &SharedHost, u: &Updater, r: &PassResult) {
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    s.format = Some(u.format());
    s.arch = Some(u.arch().to_string());
    if r.fleet_serial.is_some() {
        s.track = r.track.clone();
        s.quarantined = r.quarantined.clone();
    }
    if let Some(i) = &r.installed {
        s.installed = i.clone();
        // Start results of services no longer installed are no longer news.
        s.starts.retain(|name, _| i.contains_key(name));
    }
    for (name, start) in &r.starts {
        s.starts.insert(name.clone(), start.clone());
    }
    let mut actions = r.plan.clone();
    actions.extend(r.results.iter().cloned());
    s.update = Some(UpdateReport {
        at: r.at,
        ok: r.ok,
        error: r.error.clone(),
        failure: r.failure.clone(),
        actions,
        index_serial: r.index_serial,
        fleet_serial: r.fleet_serial,
        rollouts: r.rollouts.clone(),
    });
}
