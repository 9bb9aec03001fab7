//! The updater: keeps the host at what the repository says it should run. When a pass runs
//! ([`schedule`] plus this host's [`stagger`] offset, or `keepup-agent update --now`), what it
//! does ([`pass`]: signed index and policy, [`serials`] against replay, the [`plan`], downloads
//! with a checked sha256 ([`fetch`]), the package manager bounded in time ([`pkg`], [`run`]),
//! and whether each installed service started ([`start`])). [`run_task`] is the agent's
//! updater task; it never blocks supervision: passes run in this task, package managers in
//! child processes, HTTP with timeouts.

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

use std::sync::Arc;
use std::time::Duration;

use keepup_deploy::wire::report::UpdateReport;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::hoststate::SharedHost;
use crate::proto::Response;
use pass::{PassResult, Updater};
use schedule::Schedule;

/// A request for a pass now, with the way back.
pub type PassRequest = oneshot::Sender<Response>;

/// The answer to `{"cmd":"update"}`.
pub fn response(r: PassResult) -> Response {
    Response {
        ok: r.ok,
        error: r.error.clone(),
        update: Some(Box::new(r)),
        ..Response::default()
    }
}

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
        actions,
        index_serial: r.index_serial,
        fleet_serial: r.fleet_serial,
        rollouts: r.rollouts.clone(),
    });
}

/// The agent's updater task: repairs first if a pass was interrupted, then runs a pass at
/// each scheduled time plus this host's offset, and whenever `requests` asks for one. After
/// each pass the reporter is told (`report_now`).
pub async fn run_task(
    updater: Updater,
    schedule: Schedule,
    stagger_window: Duration,
    mut requests: mpsc::Receiver<PassRequest>,
    state: SharedHost,
    report_now: Arc<Notify>,
) {
    let host = updater.host().to_string();
    let offset = stagger::offset(&host, stagger_window);
    eprintln!(
        "keepup-agent: updater: host {host} ({} {}), schedule {:?} + {} (stagger {})",
        updater.format(),
        updater.arch(),
        schedule.line(),
        humantime::format_duration(Duration::from_millis(offset.as_millis() as u64)),
        keepup_packager::spec::format_duration(stagger_window),
    );
    match updater.recover().await {
        Some(Ok(line)) => eprintln!("keepup-agent: updater: at start: {line}"),
        Some(Err(e)) => {
            eprintln!("keepup-agent: updater: at start: {e} (the next pass tries again)")
        }
        None => {}
    }
    // What the last agent saved may be out of date (it may have stopped in the middle of a
    // pass, e.g. the one that upgraded it): read the installed versions again.
    let names: std::collections::BTreeSet<String> = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.format = Some(updater.format());
        s.arch = Some(updater.arch().to_string());
        s.installed.keys().cloned().collect()
    };
    if !names.is_empty() {
        if let Ok(now) = updater.installed(&names).await {
            state.lock().unwrap_or_else(|e| e.into_inner()).installed = now;
        }
    }
    loop {
        let now = chrono::Utc::now();
        let next = stagger::next_pass(&schedule, &host, stagger_window, &now);
        let wait = next
            .and_then(|n| (n - now).to_std().ok())
            .unwrap_or(Duration::from_secs(3600));
        let reply = tokio::select! {
            _ = tokio::time::sleep(wait) => None,
            req = requests.recv() => match req {
                Some(reply) => Some(reply),
                None => return,
            },
        };
        // The start of each pass, to the millisecond: where this host's slot really is.
        let at = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        match reply {
            None => eprintln!("keepup-agent: update: scheduled pass at {at}"),
            Some(_) => eprintln!("keepup-agent: update: pass at {at} (update --now)"),
        }
        let result = updater.pass().await;
        publish(&state, &updater, &result);
        let saved = state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let file = updater.state_dir().join(crate::hoststate::HOST_STATE_FILE);
        if let Err(e) = saved.save(&file) {
            eprintln!(
                "keepup-agent: cannot save {}: {e} (reports after a restart wait for a pass)",
                file.display()
            );
        }
        report_now.notify_one();
        if let Some(reply) = reply {
            let _ = reply.send(response(result));
        }
    }
}
