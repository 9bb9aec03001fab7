//! The fleet view: hosts x services with their track, installed and track versions, status,
//! state, restarts, failing probes, quarantines and last-seen age, plus summary counts. Built
//! by pure code from the latest reports, the fleet policy (authoritative for tracks and
//! quarantines) and the track indexes; served as `/api/v1/fleet` and read back by
//! `keepup report`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use keepup_deploy::wire::{
    best_per_name, Event, Fleet, Format, Index, PoolEntry, ServiceState, StartReport,
};
use serde::{Deserialize, Serialize};

/// The default threshold after which a silent host counts as stale (3 x a 200 s report
/// interval, rounded): 10 minutes.
pub const DEFAULT_STALE_AFTER: u64 = 600;
/// Events shown per host.
pub const EVENTS_PER_HOST: usize = 10;

pub use super::entry::HostEntry;
use super::entry::{ProbeEntry, ServiceEntry};

/// The whole fleet view (`GET /api/v1/fleet`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FleetView {
    /// Unix time the view was built.
    pub generated_at: u64,
    /// Seconds of silence after which a host is stale.
    pub stale_after: u64,
    /// The serial of the fleet policy used (none: the repository has no fleet.yaml).
    #[serde(default)]
    pub fleet_serial: Option<u64>,
    /// Counts over all hosts.
    pub summary: Summary,
    /// Every registered host, by name.
    pub hosts: Vec<HostView>,
}

/// Summary counts: hosts unless said otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Registered hosts.
    pub hosts: usize,
    /// Hosts heard from within `stale_after`.
    pub reporting: usize,
    /// Hosts not heard from within `stale_after` (or never).
    pub stale: usize,
    /// Hosts with at least one service behind its track (or missing).
    pub behind: usize,
    /// Hosts with at least one unhealthy service or a failed update.
    pub unhealthy: usize,
    /// Quarantined services (host x service pairs).
    pub quarantined: usize,
    /// Hosts whose last update pass failed.
    pub failed_updates: usize,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Summary {
    /// Add the counts of another part of the fleet.
    pub fn add(&mut self, o: &Summary) {
        self.hosts += o.hosts;
        self.reporting += o.reporting;
        self.stale += o.stale;
        self.behind += o.behind;
        self.unhealthy += o.unhealthy;
        self.quarantined += o.quarantined;
        self.failed_updates += o.failed_updates;
    }

    /// Count a host (`hosts` aside: callers count those).
    fn count(&mut self, stale: bool, l: &HostLines<'_>) {
        if stale {
            self.stale += 1;
        } else {
            self.reporting += 1;
        }
        if l.services.iter().any(|s| s.behind) {
            self.behind += 1;
        }
        if l.update_failed || l.services.iter().any(|s| s.unhealthy) {
            self.unhealthy += 1;
        }
        if l.update_failed {
            self.failed_updates += 1;
        }
        self.quarantined += l.services.iter().filter(|s| s.quarantined).count();
    }
}

/// One host.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HostView {
    /// Host name.
    pub host: String,
    /// The track it follows (fleet policy; else what it reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track: Option<String>,
    /// Package format it reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    /// Architecture it reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// The agent's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Unix time of its latest report (none: never reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<u64>,
    /// Not heard from within `stale_after`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stale: bool,
    /// Its last update pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateView>,
    /// One entry per service (assigned, installed, supervised or quarantined).
    #[serde(default)]
    pub services: Vec<ServiceView>,
    /// Its latest events, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
}

/// The last update pass of a host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateView {
    /// Unix time it ended.
    pub at: u64,
    /// Whether every step succeeded.
    pub ok: bool,
    /// The first failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its kind (`unreachable`, `bad-signature`, ...), when the agent said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<keepup_deploy::wire::UpdateFailure>,
}

/// Where a service's installed version stands against its track.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Installed is the track's version.
    #[serde(rename = "current")]
    Current,
    /// Installed is older than the track's version.
    #[serde(rename = "behind")]
    Behind,
    /// Older than the track's version, which rolls out in waves that do not include this
    /// host yet (or halted): held back on purpose, not behind.
    #[serde(rename = "held")]
    Held,
    /// Installed is the track's version, which is a rollback.
    #[serde(rename = "rolled back")]
    RolledBack,
    /// Installed is newer than the track's version.
    #[serde(rename = "newer")]
    Newer,
    /// The track has it, the host does not.
    #[serde(rename = "missing")]
    Missing,
    /// Quarantined on this host by the fleet policy.
    #[serde(rename = "quarantined")]
    Quarantined,
    /// The host follows no track, or its track has no such package.
    #[serde(rename = "untracked")]
    Untracked,
}

impl Status {
    /// The word shown in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Current => "current",
            Status::Behind => "behind",
            Status::Held => "held",
            Status::RolledBack => "rolled back",
            Status::Newer => "newer",
            Status::Missing => "missing",
            Status::Quarantined => "quarantined",
            Status::Untracked => "untracked",
        }
    }
}

/// One host x service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceView {
    /// Service (package) name.
    pub name: String,
    /// Installed version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed: Option<String>,
    /// The track's version for this host's format and arch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_version: Option<String>,
    /// Installed vs track.
    pub status: Status,
    /// For `rolled back`: the version whose contents the track carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_to: Option<String>,
    /// Supervisor state (none: not supervised).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ServiceState>,
    /// Restarts since the agent started.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarts: u64,
    /// Probes whose latest result failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failing_probes: Vec<String>,
    /// Why each of `failing_probes` failed, in the same order (empty when not said).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probe_reasons: Vec<String>,
    /// Quarantined on this host.
    #[serde(default, skip_serializing_if = "is_false")]
    pub quarantined: bool,
    /// The last start after an install or upgrade, when it failed (with the log's tail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_start: Option<StartReport>,
    /// Older than its track, or missing.
    #[serde(default, skip_serializing_if = "is_false")]
    pub behind: bool,
    /// Not running, failing probes, failed to start, or the host's last update failed.
    #[serde(default, skip_serializing_if = "is_false")]
    pub unhealthy: bool,
}

impl ServiceView {
    /// The status as shown to people (`rolled back to 1.0-1`).
    pub fn status_text(&self) -> String {
        match (&self.status, &self.rolled_back_to) {
            (Status::RolledBack, Some(v)) => format!("rolled back to {v}"),
            (s, _) => s.as_str().to_string(),
        }
    }
}

/// What the view is built from besides the reports.
#[derive(Default)]
pub struct Policy<'a> {
    /// The fleet policy, if the repository has one.
    pub fleet: Option<&'a Fleet>,
    /// Track name -> its index.
    pub indexes: HashMap<&'a str, &'a Index>,
    /// Which policy this is ([`super::rows::PolicyStamp`]): hosts' rendered rows are kept
    /// under it. 0: untold, rows are rendered and not kept.
    pub stamp: u64,
}

fn default_arch(format: Format) -> &'static str {
    match format {
        Format::Deb => "amd64",
        Format::Rpm => "x86_64",
    }
}

/// Per (track, format, arch): the track's best entry of each name, and the names sorted.
type Table<'p> = (BTreeMap<&'p str, &'p PoolEntry>, Vec<&'p str>);

/// The tables of one build, each made when a host first needs it.
#[derive(Default)]
pub struct Tables<'p>(HashMap<(&'p str, Format, &'p str), Table<'p>>);

/// One host as the view sees it, borrowed from its summary and the policy: what
/// [`build`] copies into a [`HostView`] and the table form renders straight away.
pub struct HostLines<'a> {
    /// The track it follows (fleet policy; else what it reported).
    pub track: Option<&'a str>,
    /// Its last update pass failed.
    pub update_failed: bool,
    /// One line per service, by name.
    pub services: Vec<Line<'a>>,
}

/// One host x service, borrowed (see [`ServiceView`] for the fields).
pub struct Line<'a> {
    /// Service (package) name.
    pub name: &'a str,
    /// Installed version.
    pub installed: Option<&'a str>,
    /// The track's version for this host's format and arch.
    pub track_version: Option<&'a str>,
    /// Installed vs track.
    pub status: Status,
    /// For `rolled back`: the version whose contents the track carries.
    pub rolled_back_to: Option<&'a str>,
    /// The supervised service as reported (none: not supervised).
    pub service: Option<&'a ServiceEntry>,
    /// Quarantined on this host.
    pub quarantined: bool,
    /// The last start after an install or upgrade, when it failed.
    pub failed_start: Option<&'a StartReport>,
    /// Older than its track, or missing.
    pub behind: bool,
    /// Not running, failing probes, failed to start, or the host's last update failed.
    pub unhealthy: bool,
}

impl<'a> Line<'a> {
    /// The probes whose latest result failed.
    pub fn failing(&self) -> impl Iterator<Item = &'a ProbeEntry> {
        self.service
            .into_iter()
            .flat_map(|s| &*s.probes)
            .filter(|p| p.ok == Some(false))
    }
}

/// The services of host `name` (its latest report `report`, none before the first) under
/// `policy`: every assigned, installed, supervised or quarantined one, by name.
pub fn lines<'a>(
    name: &str,
    report: Option<&'a HostEntry>,
    policy: &Policy<'a>,
    tables: &mut Tables<'a>,
) -> HostLines<'a> {
    let (assignment, quarantined) = match policy.fleet {
        Some(f) => f.for_host(name),
        None => (None, Vec::new()),
    };
    let track: Option<&'a str> = assignment
        .map(|a| a.track.as_str())
        .or_else(|| report.and_then(|r| r.track.as_deref()));
    let format = report.and_then(|r| r.format).unwrap_or(Format::Deb);
    let arch: &'a str = report
        .and_then(|r| r.arch.as_deref())
        .unwrap_or_else(|| default_arch(format));
    let table: Option<&Table<'a>> = track
        .and_then(|t| policy.indexes.get(t).map(|i| (t, *i)))
        .map(|(t, idx)| {
            &*tables.0.entry((t, format, arch)).or_insert_with(|| {
                let best = best_per_name(&idx.packages, format, arch);
                let names: Vec<&str> = best.keys().copied().collect();
                (best, names)
            })
        });

    let mut names: BTreeSet<&'a str> = BTreeSet::new();
    if let Some(r) = report {
        names.extend(r.installed.iter().map(|(n, _)| &**n));
        names.extend(r.services.iter().map(|s| &*s.name));
    }
    if let Some(a) = assignment {
        if a.services.is_empty() {
            if let Some((_, all)) = table {
                names.extend(all.iter().copied());
            }
        } else {
            names.extend(a.services.iter().map(String::as_str));
        }
    }
    let update_failed = report
        .and_then(|r| r.update.as_ref())
        .is_some_and(|u| !u.ok);

    let mut services = Vec::with_capacity(names.len());
    for svc in names {
        let installed = report.and_then(|r| r.installed(svc));
        let sr = report.and_then(|r| r.service(svc));
        let entry: Option<&'a PoolEntry> = table.and_then(|(best, _)| best.get(svc).copied());
        let is_quarantined = quarantined.contains(&svc);
        let (status, rolled_back_to) = match (&installed, entry) {
            _ if is_quarantined => (Status::Quarantined, None),
            (_, None) => (Status::Untracked, None),
            (None, Some(_)) => (Status::Missing, None),
            // Most hosts run their track's version: no version comparison then.
            (Some(v), Some(e)) if *v == e.version => match &e.rollback_of {
                Some(to) => (Status::RolledBack, Some(to.as_str())),
                None => (Status::Current, None),
            },
            (Some(v), Some(e)) => match format.cmp_versions(v, &e.version) {
                std::cmp::Ordering::Less => (Status::Behind, None),
                std::cmp::Ordering::Greater => (Status::Newer, None),
                std::cmp::Ordering::Equal => match &e.rollback_of {
                    Some(to) => (Status::RolledBack, Some(to.as_str())),
                    None => (Status::Current, None),
                },
            },
        };
        // The host's last pass said a rollout holds it back from the track's version.
        let held = report
            .and_then(|r| r.update.as_ref())
            .is_some_and(|u| u.held.iter().any(|n| &**n == svc));
        let status = match status {
            Status::Behind | Status::Missing if held => Status::Held,
            s => s,
        };
        let failed_start = sr
            .and_then(|s| s.start.as_ref())
            .and_then(|s| s.failed.as_deref());
        let mut line = Line {
            name: svc,
            installed,
            track_version: entry.map(|e| e.version.as_str()),
            behind: matches!(status, Status::Behind | Status::Missing),
            status,
            rolled_back_to,
            service: sr,
            quarantined: is_quarantined,
            failed_start,
            unhealthy: false,
        };
        line.unhealthy = sr.is_some_and(|s| !s.state.is_ready())
            || line.failing().next().is_some()
            || failed_start.is_some()
            || update_failed;
        services.push(line);
    }
    HostLines {
        track,
        update_failed,
        services,
    }
}

/// Whether a host last heard from at `last_seen` (none: never) is stale at `now`.
pub fn is_stale(last_seen: Option<u64>, now: u64, stale_after: u64) -> bool {
    last_seen.is_none_or(|t| now.saturating_sub(t) > stale_after)
}

/// Build the view of `hosts` (registered host name -> latest report) at `now`.
/// Events are not in memory: callers that show them fill [`HostView::events`] from the
/// database.
pub fn build<'a>(
    hosts: &'a [(String, Option<Arc<HostEntry>>)],
    policy: &Policy<'a>,
    now: u64,
    stale_after: u64,
) -> FleetView {
    let mut tables = Tables::default();
    let mut summary = Summary {
        hosts: hosts.len(),
        ..Summary::default()
    };
    let mut out = Vec::with_capacity(hosts.len());
    for (name, entry) in hosts {
        let report = entry.as_deref();
        let l = lines(name, report, policy, &mut tables);
        let last_seen = report.map(|e| e.received_at);
        let stale = is_stale(last_seen, now, stale_after);
        let update = report.and_then(|r| r.update.as_ref()).map(|u| UpdateView {
            at: u.at,
            ok: u.ok,
            error: u.error.as_deref().map(str::to_string),
            failure: u.failure.clone(),
        });
        let services: Vec<ServiceView> = l
            .services
            .iter()
            .map(|x| ServiceView {
                name: x.name.to_string(),
                installed: x.installed.map(str::to_string),
                track_version: x.track_version.map(str::to_string),
                status: x.status,
                rolled_back_to: x.rolled_back_to.map(str::to_string),
                state: x.service.map(|s| s.state.clone()),
                restarts: x.service.map_or(0, |s| s.restarts),
                failing_probes: x.failing().map(|p| p.name.to_string()).collect(),
                probe_reasons: x
                    .failing()
                    .map(|p| p.reason.as_deref().unwrap_or_default().to_string())
                    .collect(),
                quarantined: x.quarantined,
                failed_start: x.failed_start.cloned(),
                behind: x.behind,
                unhealthy: x.unhealthy,
            })
            .collect();
        summary.count(stale, &l);
        out.push(HostView {
            host: name.clone(),
            track: l.track.map(str::to_string),
            format: report.and_then(|r| r.format),
            arch: report.and_then(|r| r.arch.as_deref()).map(str::to_string),
            agent_version: report
                .and_then(|r| r.agent_version.as_deref())
                .map(str::to_string),
            last_seen,
            stale,
            update,
            services,
            events: Vec::new(),
        });
    }
    FleetView {
        generated_at: now,
        stale_after,
        fleet_serial: policy.fleet.map(|f| f.serial),
        summary,
        hosts: out,
    }
}

/// Which rows a filter keeps (`keepup report --behind --unhealthy --stale`, the page's
/// links). Selected filters are alternatives: a row matching any of them is kept; none
/// selected keeps every row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filter {
    /// Installed older than the track, or missing.
    pub behind: bool,
    /// Not running, failing probes, failed start, failed update.
    pub unhealthy: bool,
    /// Host not heard from within `stale_after`.
    pub stale: bool,
    /// Quarantined.
    pub quarantined: bool,
}

impl Filter {
    /// True when no filter is selected.
    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    /// Does the row (`svc` of `host`; none for a host without services) match?
    pub fn keeps(&self, host: &HostView, svc: Option<&ServiceView>) -> bool {
        if self.is_empty() {
            return true;
        }
        let update_failed = host.update.as_ref().is_some_and(|u| !u.ok);
        (self.stale && host.stale)
            || (self.behind && svc.is_some_and(|s| s.behind))
            || (self.unhealthy && (svc.is_some_and(|s| s.unhealthy) || update_failed))
            || (self.quarantined && svc.is_some_and(|s| s.quarantined))
    }
}

/// "12s", "5m", "3h", "2d" ago; "never" without a time.
pub fn age(now: u64, then: Option<u64>) -> String {
    let Some(t) = then else {
        return "never".into();
    };
    let s = now.saturating_sub(t);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keepup_deploy::wire::{ProbeReport, Report, ServiceReport, UpdateReport};

    fn pool(name: &str, version: &str, rollback_of: Option<&str>) -> PoolEntry {
        PoolEntry {
            name: name.into(),
            version: version.into(),
            arch: "amd64".into(),
            format: Format::Deb,
            path: format!("pool/{name}_{version}.deb"),
            size: 1,
            sha256: "00".into(),
            rollback_of: rollback_of.map(String::from),
        }
    }

    fn entry(r: Report) -> (String, Option<Arc<HostEntry>>) {
        (r.host.clone(), Some(Arc::new(HostEntry::of(&r, 1000))))
    }

    fn host(name: &str, installed: &[(&str, &str)], state: &str) -> Report {
        let mut r = Report {
            host: name.into(),
            sent_at: 1000,
            format: Some(Format::Deb),
            ..Report::default()
        };
        for (n, v) in installed {
            r.installed.insert(n.to_string(), v.to_string());
            r.services.push(ServiceReport {
                name: n.to_string(),
                version: v.to_string(),
                state: state.into(),
                ..ServiceReport::default()
            });
        }
        r
    }

    #[test]
    fn statuses_and_counts() {
        let mut fleet = Fleet::default();
        fleet.assign("web*", "stable", vec![]).unwrap();
        fleet.assign("db*", "stable", vec!["bar".into()]).unwrap();
        fleet.quarantine("baz", "web3").unwrap();
        let index = Index {
            track: "stable".into(),
            serial: 4,
            generated: 0,
            expires: None,
            packages: vec![
                pool("foo", "1.2-1", None),
                pool("bar", "2.1-1", Some("2.0-1")),
                pool("baz", "1.0-1", None),
            ],
            rollouts: vec![],
            rollout_key: None,
        };
        let mut policy = Policy {
            fleet: Some(&fleet),
            ..Policy::default()
        };
        policy.indexes.insert("stable", &index);
        let mut web3 = host("web3", &[("foo", "1.2-1"), ("baz", "1.0-1")], "running");
        web3.services[0].probes.push(ProbeReport {
            name: "port".into(),
            ok: Some(false),
            ..ProbeReport::default()
        });
        web3.update = Some(UpdateReport {
            at: 999,
            ok: false,
            error: Some("repository unreachable".into()),
            ..UpdateReport::default()
        });
        // web2's last pass was held back from foo 1.2-1 by a rollout in waves.
        let mut web2 = host("web2", &[("foo", "1.1-1")], "running");
        web2.update = Some(UpdateReport {
            at: 999,
            ok: true,
            rollouts: vec![keepup_deploy::wire::RolloutReport {
                id: "stable/foo/1.2-1".into(),
                name: "foo".into(),
                wave: Some(3),
                open: 1,
                phase: "rolling".into(),
                held: Some("wave 3 not open".into()),
            }],
            ..UpdateReport::default()
        });
        let held = build(&[entry(web2)], &policy, 1100, 600);
        let foo = held.hosts[0]
            .services
            .iter()
            .find(|s| s.name == "foo")
            .unwrap();
        assert_eq!((foo.status, foo.behind), (Status::Held, false));
        let hosts = vec![
            entry(host("db1", &[("bar", "2.1-1")], "running")),
            entry(host("web1", &[("foo", "1.1-1")], "backoff")),
            entry(web3),
            ("web9".to_string(), None),
        ];
        let v = build(&hosts, &policy, 1100, 600);
        let db1 = &v.hosts[0];
        assert_eq!(db1.services.len(), 1);
        assert_eq!(db1.services[0].status_text(), "rolled back to 2.0-1");
        let web1 = &v.hosts[1];
        let names: Vec<_> = web1.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["bar", "baz", "foo"]);
        assert_eq!(web1.services[0].status, Status::Missing);
        assert_eq!(web1.services[2].status, Status::Behind);
        assert!(web1.services[2].unhealthy, "backoff is unhealthy");
        assert!(
            !web1.services[0].unhealthy,
            "not supervised is not unhealthy"
        );
        let web3 = &v.hosts[2];
        assert_eq!(web3.services[1].status, Status::Quarantined);
        assert_eq!(web3.services[2].failing_probes, ["port"]);
        assert!(v.hosts[3].stale);
        assert!(v.hosts[3].services.len() == 3);
        assert_eq!(
            v.summary,
            Summary {
                hosts: 4,
                reporting: 3,
                stale: 1,
                behind: 3,
                unhealthy: 2,
                quarantined: 1,
                failed_updates: 1,
            }
        );
        let behind = Filter {
            behind: true,
            ..Filter::default()
        };
        assert!(!behind.keeps(db1, Some(&db1.services[0])));
        assert!(behind.keeps(web1, Some(&web1.services[0])));
        // Round trip through JSON, as `keepup report` reads it.
        let json = serde_json::to_string(&v).unwrap();
        assert!(json.contains("\"rolled back\""));
        let back: FleetView = serde_json::from_str(&json).unwrap();
        assert_eq!(back.summary, v.summary);
        assert_eq!(back.hosts[2].services[2].failing_probes, ["port"]);
    }

    #[test]
    fn ages() {
        assert_eq!(age(100, None), "never");
        assert_eq!(age(100, Some(90)), "10s");
        assert_eq!(age(10_000, Some(100)), "2h");
        assert_eq!(age(3000, Some(100)), "48m");
        assert_eq!(age(1_000_000, Some(0)), "11d");
    }
}
