//! What the server keeps in memory per host: a compact summary of its latest report, enough
//! for the fleet view, `keepup report`, the page and the rollout gate, and nothing else
//! (events, update actions and start logs stay in the database, read when a request needs
//! them). Strings that repeat across hosts (tracks, architectures, agent versions, service,
//! package and probe names, versions, probe reasons) are interned: a million hosts running
//! the same three services share one copy of each name and version.

use std::collections::HashSet;
use std::sync::Arc;

use keepup_deploy::wire::{Format, Report, ServiceState, StartReport, UpdateFailure};

use super::rows::RowSlot;

/// An interned string.
pub type Sym = Arc<str>;

/// The set of interned strings. [`Interner::forget_unused`] drops the strings no entry uses
/// any more, so what hosts once sent does not pile up.
#[derive(Default)]
pub struct Interner {
    set: HashSet<Sym>,
}

impl Interner {
    /// The shared copy of `s`.
    pub fn sym(&mut self, s: &str) -> Sym {
        if let Some(x) = self.set.get(s) {
            return x.clone();
        }
        let x: Sym = Arc::from(s);
        self.set.insert(x.clone());
        x
    }

    /// Take in the strings of `other` that this one does not hold.
    pub fn absorb(&mut self, other: Interner) {
        for x in other.set {
            if !self.set.contains(&x) {
                self.set.insert(x);
            }
        }
    }

    /// Forget the strings only the interner holds.
    pub fn forget_unused(&mut self) {
        self.set.retain(|s| Arc::strong_count(s) > 1);
        self.set.shrink_to_fit();
    }

    /// Strings held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// True when no string is held.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

/// A host's latest report, summarized, and when it arrived.
#[derive(Debug, Clone)]
pub struct HostEntry {
    /// Unix time the server received it.
    pub received_at: u64,
    /// The track the host said it follows.
    pub track: Option<Sym>,
    /// Its package format.
    pub format: Option<Format>,
    /// Its architecture.
    pub arch: Option<Sym>,
    /// The agent's version (none: not said).
    pub agent_version: Option<Sym>,
    /// Installed packages: name -> version, sorted by name.
    pub installed: Box<[(Sym, Sym)]>,
    /// Supervised services, as reported.
    pub services: Box<[ServiceEntry]>,
    /// The last update pass.
    pub update: Option<Box<UpdateEntry>>,
    /// Its table rows as last rendered (a new report is a new entry: they start empty).
    pub rows: RowSlot,
}

/// One supervised service.
#[derive(Debug, Clone)]
pub struct ServiceEntry {
    /// Service name.
    pub name: Sym,
    /// Supervisor state.
    pub state: ServiceState,
    /// Restarts since the agent started or the version changed.
    pub restarts: u64,
    /// Latest result of each probe.
    pub probes: Box<[ProbeEntry]>,
    /// The last start after an install or upgrade.
    pub start: Option<StartEntry>,
}

/// The latest result of one probe.
#[derive(Debug, Clone)]
pub struct ProbeEntry {
    /// Probe name.
    pub name: Sym,
    /// Pass or fail; none before the first run.
    pub ok: Option<bool>,
    /// Why it failed (kept for failures only).
    pub reason: Option<Sym>,
}

/// The last start of a service after an install or upgrade.
#[derive(Debug, Clone)]
pub struct StartEntry {
    /// The version installed.
    pub version: Sym,
    /// Whether it started.
    pub started: bool,
    /// A failed start in full (detail, log tail), as the view shows it.
    pub failed: Option<Box<StartReport>>,
}

/// The last update pass.
#[derive(Debug, Clone)]
pub struct UpdateEntry {
    /// Unix time it ended.
    pub at: u64,
    /// Whether every step succeeded.
    pub ok: bool,
    /// The first failure.
    pub error: Option<Box<str>>,
    /// Its kind.
    pub failure: Option<UpdateFailure>,
    /// Packages a rollout in waves held back from the track's version.
    pub held: Box<[Sym]>,
}

impl HostEntry {
    /// The summary of `r`, received at `received_at`, with its strings from `syms`.
    pub fn new(r: &Report, received_at: u64, syms: &mut Interner) -> HostEntry {
        let mut sym = |s: &str| syms.sym(s);
        HostEntry {
            received_at,
            track: r.track.as_deref().map(&mut sym),
            format: r.format,
            arch: r.arch.as_deref().map(&mut sym),
            agent_version: Some(r.agent_version.as_str())
                .filter(|v| !v.is_empty())
                .map(&mut sym),
            installed: r.installed.iter().map(|(n, v)| (sym(n), sym(v))).collect(),
            services: r
                .services
                .iter()
                .map(|s| ServiceEntry {
                    name: sym(&s.name),
                    state: s.state.clone(),
                    restarts: s.restarts,
                    probes: s
                        .probes
                        .iter()
                        .map(|p| ProbeEntry {
                            name: sym(&p.name),
                            ok: p.ok,
                            reason: match p.ok {
                                Some(false) => p.reason.as_deref().map(&mut sym),
                                _ => None,
                            },
                        })
                        .collect(),
                    start: s.start.as_ref().map(|st| StartEntry {
                        version: sym(&st.version),
                        started: st.started,
                        failed: (!st.started).then(|| Box::new(st.clone())),
                    }),
                })
                .collect(),
            update: r.update.as_ref().map(|u| {
                Box::new(UpdateEntry {
                    at: u.at,
                    ok: u.ok,
                    error: u.error.as_deref().map(Box::from),
                    failure: u.failure.clone(),
                    held: u
                        .rollouts
                        .iter()
                        .filter(|x| x.held.is_some())
                        .map(|x| sym(&x.name))
                        .collect(),
                })
            }),
            rows: RowSlot::default(),
        }
    }

    /// The summary of `r` with strings of its own.
    #[cfg(test)]
    pub fn of(r: &Report, received_at: u64) -> HostEntry {
        HostEntry::new(r, received_at, &mut Interner::default())
    }

    /// The installed version of package `name`.
    pub fn installed(&self, name: &str) -> Option<&str> {
        self.installed
            .binary_search_by(|(n, _)| (**n).cmp(name))
            .ok()
            .map(|i| &*self.installed[i].1)
    }

    /// The supervised service `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceEntry> {
        self.services.iter().find(|s| &*s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keepup_deploy::wire::{ProbeReport, ServiceReport};

    #[test]
    fn entries_share_interned_strings_and_keep_what_views_need() {
        let mut r = Report {
            host: "web1".into(),
            track: Some("stable".into()),
            ..Report::default()
        };
        r.installed.insert("foo".into(), "1.2-1".into());
        r.installed.insert("bar".into(), "2.0-1".into());
        r.services.push(ServiceReport {
            name: "foo".into(),
            state: "running".into(),
            probes: vec![
                ProbeReport {
                    name: "port".into(),
                    ok: Some(false),
                    reason: Some("refused".into()),
                    ..ProbeReport::default()
                },
                ProbeReport {
                    name: "http".into(),
                    ok: Some(true),
                    reason: Some("fine".into()),
                    ..ProbeReport::default()
                },
            ],
            start: Some(StartReport {
                version: "1.2-1".into(),
                started: true,
                log_tail: vec!["x".into()],
                ..StartReport::default()
            }),
            ..ServiceReport::default()
        });
        let mut syms = Interner::default();
        let a = HostEntry::new(&r, 10, &mut syms);
        let b = HostEntry::new(&r, 11, &mut syms);
        assert!(Arc::ptr_eq(
            a.track.as_ref().unwrap(),
            b.track.as_ref().unwrap()
        ));
        assert_eq!(a.installed("foo"), Some("1.2-1"));
        assert_eq!(a.installed("bar"), Some("2.0-1"));
        assert_eq!(a.installed("baz"), None);
        let foo = a.service("foo").unwrap();
        assert_eq!(foo.probes[0].reason.as_deref(), Some("refused"));
        assert_eq!(foo.probes[1].reason, None, "reasons of passing probes");
        assert!(foo.start.as_ref().unwrap().failed.is_none());
        let n = syms.len();
        drop(b);
        syms.forget_unused();
        assert_eq!(syms.len(), n, "a still uses every string");
        drop(a);
        syms.forget_unused();
        assert!(syms.is_empty());
    }
}
