//! Manifests the agent refuses to supervise, because the role kill (`pkill -u ${role}`) would
//! hit processes that are not the service's: a reserved system account (`nobody`, `www-data`,
//! ...), a uid in the login range (a human's processes) or 65534, uid 0, a role another
//! manifest already uses (the two would kill each other in a loop), a role account that keepup
//! did not create for this service (the role registry, below), and `count: 0` or
//! `failures: 0` (a give-up limit of nothing, a probe that kills on success).
//!
//! The role registry: a role account belongs to service NAME when
//! `/var/lib/keepup/roles/<role>` is a regular file (not a symlink), owned by root, writable by
//! no one else, whose first line is NAME (a second line `adopted`: the operator adopted an
//! existing account with `role_adopt: true`). The package's preinst writes it. An account made
//! by keepup before the registry existed is recognized by its GECOS, exactly
//! `NAME service (keepup)`, while no registry file exists. Anything else (`postgres`, `dbus`,
//! `redis`: another daemon's account) is refused, so nothing of that uid is ever killed.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
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

/// The role registry directory (see the module documentation).
pub const ROLE_REGISTRY: &str = "/var/lib/keepup/roles";

/// What the role registry holds for one role, as far as it can be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registry {
    /// No registry file for the role (or no registry at all).
    Absent,
    /// A trustworthy registry file: its first line, the service the role belongs to.
    Marked(String),
    /// A registry file (or directory) that root did not write alone: why it is ignored.
    Untrusted(String),
}

/// Whether a registry file or directory with owner `uid` and `mode` (from `lstat`) can be
/// trusted: owned by root, writable by no one else; `None` if so, else why not.
pub fn registry_owner_problem(path: &Path, uid: u32, mode: u32) -> Option<String> {
    if uid != 0 {
        return Some(format!(
            "{} is owned by uid {uid}, not root: only root may mark a role",
            path.display()
        ));
    }
    if mode & 0o022 != 0 {
        return Some(format!(
            "{} is writable by group or others (mode {:04o}): only root may mark a role",
            path.display(),
            mode & 0o7777
        ));
    }
    None
}

/// Reads the registry entry of `role` in `dir`, without following a symlink planted in place
/// of the directory or the file.
pub fn read_registry(dir: &Path, role: &str) -> Registry {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Registry::Absent,
        Err(e) => return Registry::Untrusted(format!("cannot read {}: {e}", dir.display())),
        Ok(m) if !m.is_dir() => {
            return Registry::Untrusted(format!(
                "{} is not a directory (a symlink?): the role registry must be a directory of \
                 root",
                dir.display()
            ))
        }
        Ok(m) => {
            if let Some(why) = registry_owner_problem(dir, m.uid(), m.mode()) {
                return Registry::Untrusted(why);
            }
        }
    }
    let path = dir.join(role);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(&path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Registry::Absent,
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Registry::Untrusted(format!(
                "{} is a symlink: the role registry takes only regular files",
                path.display()
            ))
        }
        Err(e) => return Registry::Untrusted(format!("cannot read {}: {e}", path.display())),
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Registry::Untrusted(format!("cannot read {}: {e}", path.display())),
    };
    if !meta.is_file() {
        return Registry::Untrusted(format!("{} is not a regular file", path.display()));
    }
    if let Some(why) = registry_owner_problem(&path, meta.uid(), meta.mode()) {
        return Registry::Untrusted(why);
    }
    let mut text = String::new();
    if let Err(e) = file.by_ref().take(4096).read_to_string(&mut text) {
        return Registry::Untrusted(format!("cannot read {}: {e}", path.display()));
    }
    Registry::Marked(text.lines().next().unwrap_or("").to_string())
}

/// The GECOS (comment) that keepup gave the accounts it created before the registry existed.
pub fn legacy_gecos(name: &str) -> String {
    format!("{name} service (keepup)")
}

/// Whether role `role` belongs to service `name`: by its registry entry, or, when there is
/// none, by the legacy GECOS mark. `Err` is the refusal.
pub fn role_belongs(
    name: &str,
    role: &str,
    registry: &Registry,
    gecos: &str,
) -> Result<(), String> {
    let file = Path::new(ROLE_REGISTRY).join(role);
    let file = file.display();
    let todo = format!(
        "reinstall the {name} package so its preinst marks the account (it refuses an account \
         it did not create), or, if {role} is meant to be this service's own account, adopt it \
         with `role_adopt: true` in the spec (dangerous: every process of {role} is killed on \
         stop)"
    );
    match registry {
        Registry::Marked(owner) if owner == name => Ok(()),
        Registry::Marked(owner) => Err(format!(
            "{REFUSING} {name}: role {role} belongs to service {owner:?} ({file} says so); \
             stopping {name} would kill {owner}'s processes. Give {name} a role of its own, or \
             {todo}"
        )),
        Registry::Untrusted(why) => Err(format!(
            "{REFUSING} {name}: role {role}: {why}. Remove {file} and {todo}"
        )),
        Registry::Absent if gecos == legacy_gecos(name) => Ok(()),
        Registry::Absent => Err(format!(
            "{REFUSING} {name}: role {role} is an existing account that keepup did not create \
             for {name} (no {file} naming {name}, and its GECOS is not \"{}\"); stopping the \
             service would kill every process of {role}. To fix: {todo}",
            legacy_gecos(name)
        )),
    }
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
                ready: None,
                ready_timeout: None,
                watchdog: None,
                after: Vec::new(),
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
    fn a_role_belongs_to_its_service_by_registry_or_legacy_mark() {
        let marked = |s: &str| Registry::Marked(s.into());
        // The registry names the service (gecos does not matter then).
        assert_eq!(role_belongs("foo", "foo", &marked("foo"), ""), Ok(()));
        assert_eq!(
            role_belongs("foo", "pg", &marked("foo"), "PostgreSQL"),
            Ok(())
        );
        // No registry file: the legacy GECOS mark, exactly.
        let legacy = "foo service (keepup)";
        assert_eq!(
            role_belongs("foo", "foo", &Registry::Absent, legacy),
            Ok(())
        );
        for gecos in [
            "",
            "PostgreSQL administrator",
            "bar service (keepup)",
            "foo service",
        ] {
            let why = role_belongs("foo", "postgres", &Registry::Absent, gecos).unwrap_err();
            assert!(why.starts_with(REFUSING), "{why}");
            assert!(why.contains("role postgres"), "{why}");
            assert!(why.contains("/var/lib/keepup/roles/postgres"), "{why}");
            assert!(
                why.contains("role_adopt: true") && why.contains("reinstall"),
                "{why}"
            );
        }
        // The registry names another service: refused, even with foo's legacy mark.
        let why = role_belongs("foo", "foo", &marked("bar"), legacy).unwrap_err();
        assert!(why.contains("belongs to service \"bar\""), "{why}");
        // An untrusted registry file is not a mark, and not a reason to fall back to GECOS.
        let bad = Registry::Untrusted("/var/lib/keepup/roles/foo is a symlink".into());
        let why = role_belongs("foo", "foo", &bad, legacy).unwrap_err();
        assert!(
            why.contains("is a symlink") && why.contains("Remove"),
            "{why}"
        );
    }

    #[test]
    fn registry_files_must_be_roots_alone() {
        let p = Path::new("/var/lib/keepup/roles/foo");
        assert_eq!(registry_owner_problem(p, 0, 0o100644), None);
        assert_eq!(registry_owner_problem(p, 0, 0o100600), None);
        let why = registry_owner_problem(p, 998, 0o100644).unwrap();
        assert!(why.contains("uid 998"), "{why}");
        for mode in [0o100664, 0o100646, 0o40777] {
            let why = registry_owner_problem(p, 0, mode).unwrap();
            assert!(why.contains("writable by group or others"), "{why}");
        }
    }

    #[test]
    fn reads_the_registry_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let roles = dir.path().join("roles");
        assert_eq!(read_registry(&roles, "foo"), Registry::Absent);
        std::fs::create_dir(&roles).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&roles, std::fs::Permissions::from_mode(0o755)).unwrap();
        let root = nix::unistd::geteuid().is_root();
        std::fs::write(roles.join("foo"), "foo\nadopted\n").unwrap();
        std::fs::set_permissions(roles.join("foo"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        std::os::unix::fs::symlink(roles.join("foo"), roles.join("bar")).unwrap();
        let link = read_registry(&roles, "bar");
        if root {
            assert_eq!(read_registry(&roles, "foo"), Registry::Marked("foo".into()));
            assert_eq!(read_registry(&roles, "nobody-here"), Registry::Absent);
            assert!(
                matches!(&link, Registry::Untrusted(w) if w.contains("symlink")),
                "{link:?}"
            );
        } else {
            // Not root: the directory itself is not root's.
            assert!(
                matches!(&link, Registry::Untrusted(w) if w.contains("not root")),
                "{link:?}"
            );
        }
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
