//! Manifests the agent refuses to supervise, because the role kill (`pkill -u ${role}`) would
//! hit processes that are not the service's: a reserved system account (`nobody`, `www-data`,
//! ...), a uid in the login range (a human's processes) or 65534, uid 0, a role another
//! manifest already uses (the two would kill each other in a loop), and `count: 0` or
//! `failures: 0` (a give-up limit of nothing, a probe that kills on success).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use keepup_packager::manifest::Manifest;

/// How every refusal starts (in the log, the status note and `last exit`).
pub const REFUSING: &str = "refusing to supervise";

/// `nobody` on Debian, Red Hat and most others.
pub const NOBODY_UID: u32 = 65534;
/// The first uid of regular (login) users when `/etc/login.defs` does not say.
pub const DEFAULT_UID_MIN: u32 = 1000;

/// `UID_MIN` from `login.defs` text, if set.
pub fn parse_uid_min(login_defs: &str) -> Option<u32> {
    login_defs.lines().find_map(|l| {
        let mut f = l.split_ascii_whitespace();
        (f.next() == Some("UID_MIN")).then(|| f.next()?.parse().ok())?
    })
}

/// The first login uid on this host: `UID_MIN` from `/etc/login.defs`, else 1000.
pub fn uid_min() -> u32 {
    std::fs::read_to_string("/etc/login.defs")
        .ok()
        .and_then(|t| parse_uid_min(&t))
        .unwrap_or(DEFAULT_UID_MIN)
}

/// Why the manifest itself (before looking up the role) cannot be supervised.
pub fn manifest_refusal(m: &Manifest) -> Option<String> {
    if keepup_packager::spec::is_reserved_role(&m.role) {
        return Some(format!(
            "{REFUSING} {}: role {} is a system account; stopping the service kills every \
             process of its role, so it needs a role user of its own",
            m.name, m.role
        ));
    }
    if m.supervisor.count == 0 {
        return Some(format!(
            "{REFUSING} {}: supervisor.count is 0 (it could never start)",
            m.name
        ));
    }
    if let Some(c) = m.checks.iter().find(|c| c.failures == 0) {
        return Some(format!(
            "{REFUSING} {}: check {} has failures: 0 (it would kill the role on every probe, \
             passing or not)",
            m.name, c.name
        ));
    }
    None
}

/// Why role `role` resolving to `uid` cannot be supervised, on a host whose login uids start
/// at `uid_min`.
pub fn uid_refusal(name: &str, role: &str, uid: u32, uid_min: u32) -> Option<String> {
    if uid == 0 {
        return Some(format!(
            "{REFUSING} {name}: role {role} is uid 0; keepup never supervises or kills by uid 0"
        ));
    }
    if uid == NOBODY_UID {
        return Some(format!(
            "{REFUSING} {name}: role {role} is uid {NOBODY_UID} (nobody), shared by unrelated \
             processes"
        ));
    }
    if uid >= uid_min {
        return Some(format!(
            "{REFUSING} {name}: role {role} is uid {uid}, a login user's (UID_MIN is {uid_min} \
             in /etc/login.defs); a service role must be a system user"
        ));
    }
    None
}

/// Which service holds which role: the first to claim it; another service asking for the same
/// role is refused until the holder lets go (removed, or its role changed).
#[derive(Debug, Clone, Default)]
pub struct Roles(Arc<Mutex<HashMap<String, String>>>);

impl Roles {
    /// Claims `role` for `service`; on conflict, the reason (naming the holder).
    pub fn claim(&self, role: &str, service: &str) -> Result<(), String> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|r, s| !(s == service && r != role));
        match map.get(role) {
            Some(holder) if holder != service => Err(format!(
                "{REFUSING} {service}: role {role} is already used by service {holder}; two \
                 services sharing a role would kill each other"
            )),
            Some(_) => Ok(()),
            None => {
                map.insert(role.to_string(), service.to_string());
                Ok(())
            }
        }
    }

    /// Lets go of whatever role `service` holds.
    pub fn release(&self, service: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, s| s != service);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(role: &str) -> Manifest {
        use keepup_packager::manifest::{
            ManifestCheck, ManifestProbe, ManifestSupervisor, Supervised,
        };
        use std::time::Duration;
        Manifest {
            format: 1,
            name: "foo".into(),
            version: "1.0.0-1".into(),
            role: role.into(),
            launch: "/usr/sbin/run-foo".into(),
            supervisor: ManifestSupervisor {
                kind: Supervised::Agent,
                count: 10,
                within: Duration::from_secs(60),
                stop_grace: Duration::from_secs(5),
                unit: None,
            },
            checks: vec![ManifestCheck {
                name: "banner".into(),
                probe: ManifestProbe::Exec {
                    argv: vec!["true".into()],
                },
                every: Duration::from_secs(10),
                timeout: Duration::from_secs(2),
                failures: 3,
                grace: Duration::from_secs(2),
            }],
        }
    }

    #[test]
    fn refuses_reserved_roles_and_zero_limits() {
        assert_eq!(manifest_refusal(&manifest("foo")), None);
        for role in ["nobody", "www-data", "root", "daemon"] {
            let why = manifest_refusal(&manifest(role)).unwrap();
            assert!(why.contains("system account"), "{why}");
        }
        let mut m = manifest("foo");
        m.supervisor.count = 0;
        assert!(manifest_refusal(&m).unwrap().contains("count is 0"));
        let mut m = manifest("foo");
        m.checks[0].failures = 0;
        assert!(manifest_refusal(&m).unwrap().contains("failures: 0"));
    }

    #[test]
    fn refuses_root_nobody_and_login_uids() {
        assert_eq!(uid_refusal("foo", "foo", 998, 1000), None);
        assert!(uid_refusal("foo", "foo", 0, 1000)
            .unwrap()
            .contains("uid 0"));
        assert!(uid_refusal("foo", "x", 65534, 1000)
            .unwrap()
            .contains("nobody"));
        assert!(uid_refusal("foo", "alice", 1000, 1000)
            .unwrap()
            .contains("login user"));
        assert_eq!(uid_refusal("foo", "foo", 1000, 5000), None);
        assert_eq!(
            parse_uid_min("# UID_MIN 7\nUID_MIN\t\t\t 2000\nUID_MAX 60000\n"),
            Some(2000)
        );
        assert_eq!(parse_uid_min("UID_MAX 60000\n"), None);
    }

    #[test]
    fn a_role_belongs_to_one_service() {
        let roles = Roles::default();
        roles.claim("foo", "foo").unwrap();
        roles.claim("foo", "foo").unwrap();
        let why = roles.claim("foo", "bar").unwrap_err();
        assert!(why.contains("already used by service foo"), "{why}");
        // foo moves to another role: bar may have it.
        roles.claim("foo2", "foo").unwrap();
        roles.claim("foo", "bar").unwrap();
        roles.release("bar");
        roles.claim("foo", "baz").unwrap();
    }
}
