//! The fleet policy: which hosts follow which track and run which services, and which
//! services are quarantined where, and (its `tracks:` binding) the serial and sha256 of the
//! index each track publishes now. Published inline-signed as `fleet.yaml.asc`, the one
//! document an agent trusts first: it names everything else it fetches. The operator side
//! edits it (`keepup assign`, `quarantine`); agents read their part with [`Fleet::for_host`].
//!
//! Unknown fields are tolerated (the document is signed, so they come from a newer keepup).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The agent's own package. It is never removed by policy: an agent that removed itself
/// would stop following the fleet for good. It can be assigned and promoted like a service.
pub const AGENT_PACKAGE: &str = "keepup-agent";

/// Hosts matching a glob follow a track (and run the listed services; empty = all).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Assignment {
    /// Host name or glob (`*`, `?`).
    pub hosts: String,
    /// Track the hosts follow.
    pub track: String,
    /// Services the hosts run; empty means every service in the track.
    #[serde(default)]
    pub services: Vec<String>,
}

/// A service quarantined on hosts matching a glob: agents remove its package there.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Quarantine {
    /// Service (package) name.
    pub service: String,
    /// Host name or glob.
    pub hosts: String,
}

/// What the policy says a track publishes now: the index an agent following it must get.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Binding {
    /// The index's serial.
    pub serial: u64,
    /// SHA-256 of the index's bytes, hex; the index is served at [`Binding::path`].
    pub sha256: String,
}

impl Binding {
    /// Where the bound index of `track` is served: content-addressed, so a publish never
    /// changes what an agent that read the previous policy fetches.
    pub fn path(&self, track: &str) -> String {
        index_by_hash(track, &self.sha256)
    }
}

/// The inline-signed policy document agents fetch first.
pub const SIGNED_POLICY: &str = "fleet.yaml.asc";

/// `tracks/<track>/by-hash/SHA256/<sha256>`: an index by its hash.
pub fn index_by_hash(track: &str, sha256: &str) -> String {
    format!("tracks/{track}/by-hash/SHA256/{sha256}")
}

/// The whole policy.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fleet {
    /// Only increases.
    #[serde(default)]
    pub serial: u64,
    /// Unix time after which agents refuse this policy (see [`crate::wire::verify::check_expiry`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    /// First matching assignment wins.
    #[serde(default)]
    pub assignments: Vec<Assignment>,
    /// Quarantines.
    #[serde(default)]
    pub quarantine: Vec<Quarantine>,
    /// The index each track publishes now (empty in the repository state and in the legacy
    /// `fleet.yaml`; set in `fleet.yaml.asc`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tracks: BTreeMap<String, Binding>,
}

/// Shell-style glob match with `*` and `?`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

fn check_glob(g: &str) -> Result<(), String> {
    if g.is_empty()
        || !g
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._*?".contains(c))
    {
        return Err(format!(
            "{g:?} is not a host name or glob (letters, digits, - . _ and the wildcards * ?)"
        ));
    }
    Ok(())
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("string")
}

impl Fleet {
    /// Assign hosts to a track (replacing an assignment for the same glob).
    pub fn assign(
        &mut self,
        hosts: &str,
        track: &str,
        services: Vec<String>,
    ) -> Result<(), String> {
        check_glob(hosts)?;
        let a = Assignment {
            hosts: hosts.into(),
            track: track.into(),
            services,
        };
        match self.assignments.iter_mut().find(|x| x.hosts == hosts) {
            Some(x) => *x = a,
            None => self.assignments.push(a),
        }
        Ok(())
    }

    /// Quarantine a service on hosts.
    pub fn quarantine(&mut self, service: &str, hosts: &str) -> Result<bool, String> {
        check_glob(hosts)?;
        if service == AGENT_PACKAGE {
            return Err(format!(
                "{AGENT_PACKAGE} cannot be quarantined: removing it would leave the hosts with \
                 nothing that follows the fleet policy; stop the agent by hand on a host, or \
                 roll back to an older {AGENT_PACKAGE} instead"
            ));
        }
        let q = Quarantine {
            service: service.into(),
            hosts: hosts.into(),
        };
        if self.quarantine.contains(&q) {
            return Ok(false);
        }
        self.quarantine.push(q);
        Ok(true)
    }

    /// Lift quarantines of a service (on `hosts`, or everywhere); returns how many.
    pub fn unquarantine(&mut self, service: &str, hosts: Option<&str>) -> usize {
        let before = self.quarantine.len();
        self.quarantine
            .retain(|q| !(q.service == service && hosts.is_none_or(|h| q.hosts == h)));
        before - self.quarantine.len()
    }

    /// What policy says for one host: its track, services (empty = all), quarantined services.
    pub fn for_host(&self, host: &str) -> (Option<&Assignment>, Vec<&str>) {
        let a = self.assignments.iter().find(|a| glob_match(&a.hosts, host));
        let q = self
            .quarantine
            .iter()
            .filter(|q| glob_match(&q.hosts, host))
            .map(|q| q.service.as_str())
            .collect();
        (a, q)
    }

    /// The YAML text published as `fleet.yaml`.
    pub fn to_yaml(&self) -> String {
        let mut y = String::from(
            "# keepup fleet policy: generated by `keepup assign`/`quarantine`; do not edit.\n",
        );
        let _ = writeln!(y, "serial: {}", self.serial);
        if let Some(t) = self.expires {
            let _ = writeln!(y, "expires: {t}");
        }
        y.push_str("assignments:\n");
        if self.assignments.is_empty() {
            y.truncate(y.len() - 1);
            y.push_str(" []\n");
        }
        for a in &self.assignments {
            let services: Vec<String> = a.services.iter().map(|s| yaml_str(s)).collect();
            let _ = writeln!(
                y,
                "  - hosts: {}\n    track: {}\n    services: [{}]",
                yaml_str(&a.hosts),
                yaml_str(&a.track),
                services.join(", ")
            );
        }
        y.push_str("quarantine:\n");
        if self.quarantine.is_empty() {
            y.truncate(y.len() - 1);
            y.push_str(" []\n");
        }
        for q in &self.quarantine {
            let _ = writeln!(
                y,
                "  - service: {}\n    hosts: {}",
                yaml_str(&q.service),
                yaml_str(&q.hosts)
            );
        }
        if !self.tracks.is_empty() {
            y.push_str("tracks:\n");
        }
        for (t, b) in &self.tracks {
            let _ = writeln!(
                y,
                "  {}: {{serial: {}, sha256: {}}}",
                yaml_str(t),
                b.serial,
                yaml_str(&b.sha256)
            );
        }
        y
    }

    /// Parse `fleet.yaml` text.
    pub fn from_yaml(text: &str) -> Result<Fleet, String> {
        serde_saphyr::from_str(text).map_err(|e| format!("fleet.yaml: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("web*", "web12"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("db-?", "db-1"));
        assert!(!glob_match("db-?", "db-12"));
        assert!(!glob_match("web*", "db1"));
        assert!(glob_match("*.eu", "a.b.eu"));
    }

    #[test]
    fn yaml_round_trip() {
        let mut f = Fleet::default();
        assert_eq!(Fleet::from_yaml(&f.to_yaml()).unwrap(), f);
        f.serial = 3;
        f.assign("web*", "stable", vec!["foo".into(), "bar".into()])
            .unwrap();
        f.assign("db*", "testing", vec![]).unwrap();
        f.quarantine("foo", "web3").unwrap();
        assert_eq!(Fleet::from_yaml(&f.to_yaml()).unwrap(), f);
        let (a, q) = f.for_host("web3");
        assert_eq!(a.unwrap().track, "stable");
        assert_eq!(q, vec!["foo"]);
        assert_eq!(f.unquarantine("foo", None), 1);
        f.tracks.insert(
            "stable".into(),
            Binding {
                serial: 7,
                sha256: "ab".repeat(32),
            },
        );
        assert_eq!(Fleet::from_yaml(&f.to_yaml()).unwrap(), f);
        assert_eq!(
            f.tracks["stable"].path("stable"),
            format!("tracks/stable/by-hash/SHA256/{}", "ab".repeat(32))
        );
    }

    #[test]
    fn unknown_fields_from_a_newer_keepup_are_tolerated() {
        let y = "serial: 3\nassignments:\n  - hosts: web1\n    track: stable\n    canary: 2\n\
                 quarantine: []\nrollout: {waves: 3}\n";
        let f = Fleet::from_yaml(y).unwrap();
        assert_eq!((f.serial, f.assignments[0].track.as_str()), (3, "stable"));
    }

    #[test]
    fn the_agent_cannot_be_quarantined() {
        let mut f = Fleet::default();
        let e = f.quarantine(AGENT_PACKAGE, "*").unwrap_err();
        assert!(e.contains("cannot be quarantined"), "{e}");
        assert!(f.quarantine.is_empty());
    }
}
