//! The ring of recent events an agent reports (give-ups, health kills, installs, refusals),
//! kept in a file across agent restarts. A leaf: the supervisor, the updater and the reporter
//! push to it. The ring and its file have one owner, the supervisor: the short-lived
//! keepup-agent-pass child forwards its events to it ([`Events::forwarding`]).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use keepup_deploy::wire::report::{Event, MAX_EVENTS};
use keepup_deploy::wire::EventKind;

use crate::statefile::save_json;

/// How many of the latest events a new one is compared with (see [`Events::push`]).
const REPEAT_WINDOW: usize = 4;

/// Unix time now, in seconds.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The ring of recent events (the last [`MAX_EVENTS`]), shared by the services, the updater
/// and the reporter; with a file, kept across agent restarts (an upgrade of the agent, a
/// crash), so what led to the restart still reaches the server.
#[derive(Clone, Default)]
pub struct Events(Arc<Mutex<Ring>>);

/// Where a forwarding [`Events`] sends each event (the supervisor, over its control socket).
pub type Forward = Arc<dyn Fn(Event) + Send + Sync>;

#[derive(Default)]
struct Ring {
    events: VecDeque<Event>,
    file: Option<PathBuf>,
    forward: Option<Forward>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Events {
    /// Events saved in `file` (JSON, replaced atomically on every new event), starting with
    /// what it holds. A missing file is an empty ring; an unreadable one is logged and
    /// replaced.
    pub fn persistent(file: PathBuf) -> Events {
        let events = match std::fs::read(&file) {
            Ok(bytes) => match serde_json::from_slice::<VecDeque<Event>>(&bytes) {
                Ok(mut q) => {
                    while q.len() > MAX_EVENTS {
                        q.pop_front();
                    }
                    q
                }
                Err(e) => {
                    eprintln!(
                        "keepup-agent: {}: not a list of events ({e}); starting a new one",
                        file.display()
                    );
                    VecDeque::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => VecDeque::new(),
            Err(e) => {
                eprintln!(
                    "keepup-agent: cannot read {} ({e}); starting a new list of events",
                    file.display()
                );
                VecDeque::new()
            }
        };
        Events(Arc::new(Mutex::new(Ring {
            events,
            file: Some(file),
            forward: None,
        })))
    }

    /// Events that are handed to `forward` as they are pushed (and kept nowhere else): the
    /// ring that counts is the supervisor's.
    pub fn forwarding(forward: Forward) -> Events {
        Events(Arc::new(Mutex::new(Ring {
            forward: Some(forward),
            ..Ring::default()
        })))
    }

    /// Records an event now, unless the same one (kind, service, message) is among the last
    /// few: a failure that repeats every pass (an unreachable repository, a replayed index) is
    /// recorded once, with the time it began, instead of pushing everything else out.
    pub fn push(&self, kind: EventKind, service: Option<&str>, message: impl Into<String>) {
        let message = message.into();
        let forward = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forward
            .clone();
        if let Some(forward) = forward {
            forward(Event {
                at: now_unix(),
                service: service.map(String::from),
                kind,
                message,
            });
            return;
        }
        let mut ring = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let q = &mut ring.events;
        let repeated = q
            .iter()
            .rev()
            .take(REPEAT_WINDOW)
            .any(|e| e.kind == kind && e.service.as_deref() == service && e.message == message);
        if repeated {
            return;
        }
        q.push_back(Event {
            at: now_unix(),
            service: service.map(String::from),
            kind,
            message,
        });
        while q.len() > MAX_EVENTS {
            q.pop_front();
        }
        if let Some(file) = &ring.file {
            if let Err(e) = save_json(file, &ring.events) {
                eprintln!(
                    "keepup-agent: cannot save events to {}: {e} (they are still reported)",
                    file.display()
                );
            }
        }
    }

    /// The events, oldest first.
    pub fn list(&self) -> Vec<Event> {
        let ring = self.0.lock().unwrap_or_else(|e| e.into_inner());
        ring.events.iter().cloned().collect()
    }
}
