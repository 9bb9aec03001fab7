//! The plan of one pass: a pure function from what the fleet policy and the track's index say
//! about this host, and what is installed, to the actions to take. Quarantine wins over
//! assignment; a rollback is just a newer version; nothing is ever downgraded.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use keepup_deploy::wire::{best_per_name, AGENT_PACKAGE};
pub use keepup_deploy::wire::{Format, PoolEntry as PackageEntry};

/// Everything the plan depends on.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    /// This host's package format.
    pub format: Format,
    /// This host's architecture as its format spells it (`amd64` / `x86_64`).
    pub arch: &'a str,
    /// Services assigned to this host; empty means every service in the track (as in the
    /// fleet policy).
    pub services: &'a [String],
    /// The track's packages (every format and arch; the plan picks this host's).
    pub packages: &'a [PackageEntry],
    /// Services quarantined on this host.
    pub quarantined: &'a [String],
    /// Fully installed packages and their versions (half-installed ones are absent).
    pub installed: &'a BTreeMap<String, String>,
    /// Packages rolling out in waves that this host is held back from: name -> the version
    /// rolling out and why (`packages` then holds the previous version for them).
    pub holds: &'a BTreeMap<String, Hold>,
}

/// A package rolling out that this host does not take yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// The version rolling out.
    pub to: String,
    /// Why not here (`wave 3 not open`).
    pub why: String,
}

/// One thing the pass does (or decides not to do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Not installed: install the track's package.
    Install(PackageEntry),
    /// Installed at an older version: upgrade (a rollback is an upgrade too).
    Upgrade {
        /// The installed version.
        from: String,
        /// The track's package.
        to: PackageEntry,
    },
    /// Quarantined here and installed: remove.
    Remove {
        /// Package name.
        name: String,
        /// The installed version.
        version: String,
    },
    /// Installed at the track's version: nothing to do.
    Current {
        /// Package name.
        name: String,
        /// The version.
        version: String,
    },
    /// The track's version is older than the installed one: never downgrade; report it.
    NewerInstalled {
        /// Package name.
        name: String,
        /// The installed version.
        installed: String,
        /// The track's version.
        track: String,
    },
    /// The policy quarantines the agent's own package here: ignored, the agent never removes
    /// itself (it would stop following the fleet for good).
    KeepAgent,
    /// Assigned, but the track has no package for this host's format and architecture.
    NotInTrack {
        /// Service name.
        name: String,
    },
    /// A new version rolls out in waves and this host does not take it yet: it keeps what
    /// it has (or has nothing, when the track had no previous version).
    Held {
        /// Package name.
        name: String,
        /// The installed version, if any.
        installed: Option<String>,
        /// The version rolling out, and why not here.
        hold: Hold,
    },
}

impl Action {
    /// Does the action change the host?
    pub fn changes(&self) -> bool {
        matches!(
            self,
            Action::Install(_) | Action::Upgrade { .. } | Action::Remove { .. }
        )
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rb = |p: &PackageEntry| match &p.rollback_of {
            Some(v) => format!(" (rollback to {v})"),
            None => String::new(),
        };
        match self {
            Action::Install(p) => write!(f, "install {} {}{}", p.name, p.version, rb(p)),
            Action::Upgrade { from, to } => {
                write!(f, "upgrade {} {from} -> {}{}", to.name, to.version, rb(to))
            }
            Action::Remove { name, version } => {
                write!(f, "remove {name} {version} (quarantined)")
            }
            Action::Current { name, version } => write!(f, "keep {name} {version} (current)"),
            Action::NewerInstalled {
                name,
                installed,
                track,
            } => write!(
                f,
                "keep {name} {installed}: the track has {track}, which is older (no downgrades)"
            ),
            Action::KeepAgent => write!(
                f,
                "keep {AGENT_PACKAGE}: quarantine ignored (the agent never removes itself)"
            ),
            Action::Held {
                name,
                installed,
                hold,
            } => write!(
                f,
                "keep {name} {}: {} is rolling out; held: {}",
                installed.as_deref().unwrap_or("(not installed)"),
                hold.to,
                hold.why
            ),
            Action::NotInTrack { name } => {
                write!(
                    f,
                    "skip {name}: assigned, but not in the track for this host"
                )
            }
        }
    }
}

/// The actions for this host: removals of quarantined packages first, then per assigned
/// service (sorted by name) what the track says.
pub fn plan(input: &PlanInput<'_>) -> Vec<Action> {
    let fmt = input.format;
    // The track's best package per name for this host's format and architecture.
    let track = best_per_name(input.packages, fmt, input.arch);
    let mut actions = Vec::new();
    if input.quarantined.iter().any(|q| q == AGENT_PACKAGE) {
        actions.push(Action::KeepAgent);
    }
    let quarantine: Vec<&String> = input
        .quarantined
        .iter()
        .filter(|q| *q != AGENT_PACKAGE)
        .collect();
    let quarantined = |n: &str| quarantine.iter().any(|q| *q == n);
    let mut removed = quarantine.clone();
    removed.sort();
    removed.dedup();
    for name in removed {
        if let Some(v) = input.installed.get(name) {
            actions.push(Action::Remove {
                name: name.clone(),
                version: v.clone(),
            });
        }
    }
    let mut wanted: Vec<&str> = if input.services.is_empty() {
        track.keys().copied().collect()
    } else {
        input.services.iter().map(String::as_str).collect()
    };
    wanted.sort();
    wanted.dedup();
    for name in wanted.into_iter().filter(|n| !quarantined(n)) {
        let held = |installed: Option<&String>| {
            input.holds.get(name).map(|hold| Action::Held {
                name: name.into(),
                installed: installed.cloned(),
                hold: hold.clone(),
            })
        };
        let Some(p) = track.get(name) else {
            actions.push(
                held(input.installed.get(name))
                    .unwrap_or_else(|| Action::NotInTrack { name: name.into() }),
            );
            continue;
        };
        let action = match input.installed.get(name) {
            None => Action::Install((*p).clone()),
            Some(v) => match fmt.cmp_versions(&p.version, v) {
                Ordering::Greater => Action::Upgrade {
                    from: v.clone(),
                    to: (*p).clone(),
                },
                Ordering::Equal => held(Some(v)).unwrap_or_else(|| Action::Current {
                    name: name.into(),
                    version: v.clone(),
                }),
                // Under a halted rollout, a host that took the new version keeps it.
                Ordering::Less if input.holds.contains_key(name) => held(Some(v)).expect("a hold"),
                Ordering::Less => Action::NewerInstalled {
                    name: name.into(),
                    installed: v.clone(),
                    track: p.version.clone(),
                },
            },
        };
        actions.push(action);
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(name: &str, version: &str, format: Format, arch: &str) -> PackageEntry {
        let ext = format.to_string();
        PackageEntry {
            name: name.into(),
            version: version.into(),
            arch: arch.into(),
            format,
            path: format!("pool/{name}_{version}_{arch}.{ext}"),
            size: 1234,
            sha256: "0".repeat(64),
            rollback_of: None,
        }
    }

    fn debs(list: &[(&str, &str)]) -> Vec<PackageEntry> {
        list.iter()
            .map(|(n, v)| pkg(n, v, Format::Deb, "amd64"))
            .collect()
    }

    fn installed(list: &[(&str, &str)]) -> BTreeMap<String, String> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn run(
        services: &[&str],
        packages: &[PackageEntry],
        quarantined: &[&str],
        inst: &[(&str, &str)],
    ) -> Vec<String> {
        let (s, q, i) = (strings(services), strings(quarantined), installed(inst));
        plan(&PlanInput {
            format: Format::Deb,
            arch: "amd64",
            services: &s,
            packages,
            quarantined: &q,
            installed: &i,
            holds: &BTreeMap::new(),
        })
        .iter()
        .map(|a| a.to_string())
        .collect()
    }

    #[test]
    fn install_upgrade_keep() {
        let track = debs(&[("foo", "1.1-1"), ("bar", "2.0-1"), ("baz", "3.0-1")]);
        let got = run(&[], &track, &[], &[("foo", "1.0-1"), ("bar", "2.0-1")]);
        assert_eq!(
            got,
            [
                "keep bar 2.0-1 (current)",
                "install baz 3.0-1",
                "upgrade foo 1.0-1 -> 1.1-1",
            ]
        );
    }

    #[test]
    fn only_assigned_services() {
        let track = debs(&[("foo", "1.1-1"), ("bar", "2.0-1")]);
        let got = run(&["foo", "gone"], &track, &[], &[]);
        assert_eq!(
            got,
            [
                "install foo 1.1-1",
                "skip gone: assigned, but not in the track for this host",
            ]
        );
    }

    #[test]
    fn quarantine_wins_over_assignment() {
        let track = debs(&[("foo", "1.1-1"), ("bar", "2.0-1")]);
        let got = run(&["foo", "bar"], &track, &["foo"], &[("foo", "1.0-1")]);
        assert_eq!(got, ["remove foo 1.0-1 (quarantined)", "install bar 2.0-1"]);
        // Quarantined and not installed: nothing at all for it.
        let got = run(&["foo"], &track, &["foo"], &[]);
        assert!(got.is_empty(), "{got:?}");
        // Quarantined but not assigned (or not in the track): still removed.
        let got = run(
            &["bar"],
            &track,
            &["old"],
            &[("old", "0.1-1"), ("bar", "2.0-1")],
        );
        assert_eq!(
            got,
            ["remove old 0.1-1 (quarantined)", "keep bar 2.0-1 (current)"]
        );
    }

    #[test]
    fn the_agent_never_removes_itself() {
        let track = debs(&[("keepup-agent", "1.1-1"), ("bar", "2.0-1")]);
        let installed = [("keepup-agent", "1.0-1"), ("bar", "2.0-1")];
        let got = run(&[], &track, &["keepup-agent", "bar"], &installed);
        assert_eq!(
            got,
            [
                "keep keepup-agent: quarantine ignored (the agent never removes itself)",
                "remove bar 2.0-1 (quarantined)",
                "upgrade keepup-agent 1.0-1 -> 1.1-1",
            ]
        );
    }

    #[test]
    fn held_hosts_keep_or_get_the_previous_version() {
        let hold = |why: &str| Hold {
            to: "2.0-1".into(),
            why: why.into(),
        };
        let holds: BTreeMap<String, Hold> = [
            ("foo".to_string(), hold("wave 3 not open")),
            ("new".to_string(), hold("wave 2 not open")),
            ("bar".to_string(), hold("rollout stable/bar/2.0-1 halted")),
        ]
        .into();
        // `packages` holds the previous version of held packages (none for `new`).
        let track = debs(&[("foo", "1.0-1"), ("bar", "1.0-1"), ("old", "1.0-1")]);
        let q = strings(&[]);
        let inst = installed(&[("foo", "1.0-1"), ("bar", "2.0-1"), ("old", "0.9-1")]);
        let services = strings(&["bar", "foo", "new", "old"]);
        let got: Vec<String> = plan(&PlanInput {
            format: Format::Deb,
            arch: "amd64",
            services: &services,
            packages: &track,
            quarantined: &q,
            installed: &inst,
            holds: &holds,
        })
        .iter()
        .map(|a| a.to_string())
        .collect();
        assert_eq!(
            got,
            [
                "keep bar 2.0-1: 2.0-1 is rolling out; held: rollout stable/bar/2.0-1 halted",
                "keep foo 1.0-1: 2.0-1 is rolling out; held: wave 3 not open",
                "keep new (not installed): 2.0-1 is rolling out; held: wave 2 not open",
                "upgrade old 0.9-1 -> 1.0-1",
            ]
        );
    }

    #[test]
    fn rollback_is_an_upgrade() {
        let mut rb = pkg("foo", "1.0+rb1-1", Format::Deb, "amd64");
        rb.rollback_of = Some("0.9-1".into());
        let got = run(&[], &[rb], &[], &[("foo", "1.0-1")]);
        assert_eq!(got, ["upgrade foo 1.0-1 -> 1.0+rb1-1 (rollback to 0.9-1)"]);
    }

    #[test]
    fn never_a_downgrade() {
        let track = debs(&[("foo", "1.0-1")]);
        let got = run(&[], &track, &[], &[("foo", "1.0+rb1-1")]);
        assert_eq!(
            got,
            ["keep foo 1.0+rb1-1: the track has 1.0-1, which is older (no downgrades)"]
        );
        // dpkg ordering, not string ordering: 1.10 > 1.9.
        let got = run(&[], &debs(&[("foo", "1.9-1")]), &[], &[("foo", "1.10-1")]);
        assert!(got[0].starts_with("keep foo 1.10-1: the track has 1.9-1"));
        let plan_actions = {
            let (s, q, i) = (strings(&[]), strings(&[]), installed(&[("foo", "1.10-1")]));
            let t = debs(&[("foo", "1.9-1")]);
            plan(&PlanInput {
                format: Format::Deb,
                arch: "amd64",
                services: &s,
                packages: &t,
                quarantined: &q,
                installed: &i,
                holds: &BTreeMap::new(),
            })
        };
        assert!(!plan_actions[0].changes());
    }

    #[test]
    fn picks_this_hosts_format_and_arch() {
        let track = vec![
            pkg("foo", "1.1-1", Format::Rpm, "x86_64"),
            pkg("foo", "1.1-1", Format::Deb, "arm64"),
            pkg("foo", "1.0-1", Format::Deb, "amd64"),
            pkg("bar", "2.0-1", Format::Deb, "all"),
        ];
        let got = run(&[], &track, &[], &[]);
        assert_eq!(got, ["install bar 2.0-1", "install foo 1.0-1"]);
        let (s, q, i) = (strings(&[]), strings(&[]), installed(&[("foo", "1.0-1")]));
        let got = plan(&PlanInput {
            format: Format::Rpm,
            arch: "x86_64",
            services: &s,
            packages: &track,
            quarantined: &q,
            installed: &i,
            holds: &BTreeMap::new(),
        });
        assert_eq!(got.len(), 1);
        assert!(
            matches!(&got[0], Action::Upgrade { from, to } if from == "1.0-1" && to.format == Format::Rpm)
        );
    }

    #[test]
    fn several_versions_of_a_name_take_the_newest() {
        let track = debs(&[("foo", "1.0-1"), ("foo", "1.10-1"), ("foo", "1.9-1")]);
        assert_eq!(run(&[], &track, &[], &[]), ["install foo 1.10-1"]);
    }

    #[test]
    fn entries_read_the_index_json_shape() {
        let json = r#"{"name":"foo","version":"1.0+rb1-1","arch":"amd64","format":"deb",
            "path":"pool/f/foo.deb","size":10,"sha256":"ab","rollback_of":"0.9-1"}"#;
        let p: PackageEntry = serde_json::from_str(json).unwrap();
        assert_eq!(p.format, Format::Deb);
        assert_eq!(p.rollback_of.as_deref(), Some("0.9-1"));
    }
}
