//! The agent's own package, `keepup-agent`: the binaries (the supervisor `keepup-agent` and its
//! short-lived child `keepup-agent-pass`, which does the update passes and reports), a
//! commented default configuration, the
//! systemd unit, a cron.d line that restarts the agent if it is not active, and maintainer
//! scripts that follow debhelper's and the systemd rpm macros' conventions.
//!
//! The agent is not a service: it runs as root, in the foreground under systemd (or as a
//! container's PID 1), and has no spec, role, launch script or manifest. So it is planned here
//! into the same [`Plan`] the .deb and .rpm writers take, with its own fields and scripts.

use std::path::PathBuf;

use crate::plan::{self, Entry, Format, Info, Kind, Plan, Scripts, Source};
use crate::spec::Arch;
use crate::PackError;

/// Package (and unit) name.
pub const NAME: &str = "keepup-agent";
/// Where the binary is installed.
pub const BINARY_PATH: &str = "/usr/sbin/keepup-agent";
/// Where the agent's child for update passes and reports is installed: beside the agent,
/// where the agent looks for it.
pub const PASS_BINARY_PATH: &str = "/usr/sbin/keepup-agent-pass";
/// The child's file name, which `keepup pack --agent BINARY` finds beside BINARY.
pub const PASS_BINARY_NAME: &str = "keepup-agent-pass";
/// The configuration file (a conffile).
pub const CONFIG_PATH: &str = "/etc/keepup/agent.yaml";
/// The cron.d file that restarts the agent if it is not active (a conffile).
pub const CRON_PATH: &str = "/etc/cron.d/keepup-agent";
/// The systemd unit's name.
pub const UNIT: &str = "keepup-agent.service";
/// The agent's state directory (admin-down marks, lock, updater cache).
pub const STATE_DIR: &str = "/var/lib/keepup-agent";
/// Service logs written by the agent.
pub const LOG_DIR: &str = "/var/log/keepup";
/// Default maintainer when none is given.
pub const DEFAULT_MAINTAINER: &str = "keepup developers <keepup@example.org>";

/// What goes into one build of the agent's package.
#[derive(Debug, Clone)]
pub struct AgentPackage {
    /// The `keepup-agent` binary to ship (a release build: the workspace profile strips it).
    pub binary: PathBuf,
    /// The `keepup-agent-pass` binary of the same build.
    pub pass_binary: PathBuf,
    /// Upstream version (`[0-9][A-Za-z0-9.+~]*`).
    pub version: String,
    /// Debian revision / RPM release.
    pub release: String,
    /// Architecture of the binary.
    pub arch: Arch,
    /// `Name <email>`.
    pub maintainer: String,
    /// A PEM bundle of CA certificates to ship as [`CA_PATH`] (a conffile), for `https://`
    /// URLs signed by a private CA.
    pub ca_file: Option<PathBuf>,
    /// Serials to write as `min_serials` into the shipped configuration: a new host then
    /// refuses older signed metadata on first contact (`keepup pack --agent
    /// --min-serials-from REPO`).
    pub min_serials: Option<MinSerials>,
}

/// The lowest serials an agent accepts on first contact (its `min_serials` setting).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MinSerials {
    /// `fleet.yaml`'s serial.
    pub fleet: u64,
    /// Each track's index serial.
    pub tracks: std::collections::BTreeMap<String, u64>,
}

/// Where a CA bundle given to `keepup pack --agent --ca-file` is installed.
pub const CA_PATH: &str = "/etc/keepup/ca.pem";

/// Where each format installs systemd units (Debian 12 policy: `/lib`; RPM: `/usr/lib`).
pub fn unit_dir(format: Format) -> &'static str {
    match format {
        Format::Deb => "/lib/systemd/system",
        Format::Rpm => "/usr/lib/systemd/system",
    }
}

/// The package's fields. Nothing is required but the C library (added by the .deb writer for
/// the ELF binary): systemd and cron are used when present, and the package installs cleanly
/// without them.
pub fn info(pkg: &AgentPackage) -> Info {
    Info {
        name: NAME.into(),
        version: pkg.version.clone(),
        release: pkg.release.clone(),
        arch: pkg.arch,
        summary: "Host agent of keepup: keeps this host's services running".into(),
        description: [
            "keepup-agent supervises the services installed from keepup packages:",
            "it starts each service's launch script, respawns it, gives up on crash",
            "loops and re-kicks them later, probes the services and restarts them",
            "when they stop answering. It runs in the foreground under systemd; a",
            "cron.d line restarts it if it is not active.",
        ]
        .join("\n"),
        maintainer: pkg.maintainer.clone(),
        license: "Apache-2.0".into(),
        homepage: None,
        deb_pre_depends: Vec::new(),
        deb_depends: Vec::new(),
        deb_recommends: vec!["cron".into()],
        rpm_requires: Vec::new(),
        // cronie's package on RPM distributions; weak, so `rpm -i` works without it.
        rpm_recommends: vec!["crontabs".into()],
        changes: Vec::new(),
    }
}

/// Plan the agent's package in one format. `epoch` dates the changelog.
pub fn agent_plan(pkg: &AgentPackage, format: Format, epoch: u64) -> Result<Plan, PackError> {
    if !crate::spec::is_version(&pkg.version) {
        return Err(PackError::Spec(format!(
            "version {:?} is not valid: start with a digit, then letters, digits, `.`, `+`, `~`",
            pkg.version
        )));
    }
    if !crate::spec::is_release(&pkg.release) {
        return Err(PackError::Spec(format!(
            "release {:?} is not valid: letters, digits, `.`, `+`, `~`, starting with a letter or digit",
            pkg.release
        )));
    }
    for binary in [&pkg.binary, &pkg.pass_binary] {
        let meta = std::fs::metadata(binary).map_err(|e| PackError::io(binary, e))?;
        if !meta.is_file() {
            return Err(PackError::Spec(format!(
                "{} is not a file; pass the keepup-agent binary, with keepup-agent-pass beside \
                 it (cargo build --profile agent -p keepup-agent builds both)",
                binary.display()
            )));
        }
    }
    let info = info(pkg);
    let config = |path: &str, bytes: Vec<u8>| Entry {
        config: true,
        ..Entry::generated(path, 0o644, bytes)
    };
    let dir = |path: &str| Entry {
        path: path.into(),
        kind: Kind::Dir,
        mode: 0o755,
        owner: "root".into(),
        group: "root".into(),
        config: false,
    };
    let doc = format!("/usr/share/doc/{NAME}");
    let mut entries = vec![
        Entry {
            kind: Kind::File(Source::Disk(pkg.binary.clone())),
            ..Entry::generated(BINARY_PATH, 0o755, Vec::new())
        },
        Entry {
            kind: Kind::File(Source::Disk(pkg.pass_binary.clone())),
            ..Entry::generated(PASS_BINARY_PATH, 0o755, Vec::new())
        },
        config(CONFIG_PATH, shipped_config(pkg).into_bytes()),
        config(CRON_PATH, cron_file().into_bytes()),
        Entry::generated(
            format!("{}/{UNIT}", unit_dir(format)),
            0o644,
            unit().into_bytes(),
        ),
        Entry::generated(
            format!("{doc}/copyright"),
            0o644,
            plan::copyright(&info).into_bytes(),
        ),
        dir(STATE_DIR),
        dir(LOG_DIR),
    ];
    if let Some(ca) = &pkg.ca_file {
        entries.push(Entry {
            config: true,
            kind: Kind::File(Source::Disk(ca.clone())),
            ..Entry::generated(CA_PATH, 0o644, Vec::new())
        });
    }
    match format {
        Format::Deb => entries.push(Entry::generated(
            format!("{doc}/changelog.Debian.gz"),
            0o644,
            plan::gzip_n(plan::changelog_debian(&info, epoch).as_bytes()),
        )),
        Format::Rpm => {
            // RPM packages own the directories they bring; presets are how RPM
            // distributions decide what is enabled on install.
            entries.push(dir("/etc/keepup"));
            entries.push(dir(&doc));
            entries.push(Entry::generated(
                format!("/usr/lib/systemd/system-preset/90-{NAME}.preset"),
                0o644,
                format!("# keepup-agent keeps this host's services running: enable it.\nenable {UNIT}\n")
                    .into_bytes(),
            ));
        }
    }
    let scripts = match format {
        Format::Deb => deb_scripts(&info),
        Format::Rpm => rpm_scripts(&info),
    };
    Ok(Plan {
        entries: plan::finish(entries, format)?,
        info,
        scripts,
    })
}

/// The systemd unit: the agent in the foreground, restarted whatever way it ends.
///
/// `KillMode=process`: stopping or restarting the unit signals only the agent, which stops its
/// services itself (role kills, each within its `stop_grace`) and lets a package-manager run
/// in flight finish (whose postinst may be what restarts the agent); systemd does not TERM
/// every process in the cgroup at once. Whatever is left behind is killed
/// by the next agent's leftover kill (by uid) before it starts each service.
///
/// `Delegate=yes`: the agent's cgroup subtree is its own, so it can give each service a
/// cgroup (`<unit>/services/<name>`, itself in `<unit>/agent`) and end a stop with
/// `cgroup.kill`, which a fork loop cannot outrun.
pub fn unit() -> String {
    format!(
        "[Unit]
Description=keepup agent: keeps this host's services running
After=network.target
# Never give up: the agent is what restarts everything else (the cron line backs this up).
StartLimitIntervalSec=0

[Service]
Type=exec
ExecStart={BINARY_PATH} run
Restart=always
RestartSec=2s
# Stop signals go to the agent only; it stops its services (see docs/agent.md).
KillMode=process
# The agent puts each service in its own cgroup below its own and stops it with cgroup.kill.
Delegate=yes
TimeoutStopSec=60s

[Install]
WantedBy=multi-user.target
"
    )
}

/// The command of the cron line: restart the agent if it is not active. It does nothing where
/// it cannot or should not: no binary (removed, not purged), no systemd running, or the unit
/// not enabled (an operator's `systemctl disable --now` is the off switch; a bare `stop` is
/// undone within 5 minutes, like the talk's cron re-kick).
pub fn cron_command() -> String {
    format!(
        "test -x {BINARY_PATH} && test -d /run/systemd/system && systemctl is-enabled --quiet {NAME} && {{ systemctl is-active --quiet {NAME} || systemctl restart {NAME}; }}"
    )
}

/// `/etc/cron.d/keepup-agent`.
pub fn cron_file() -> String {
    format!(
        "# /etc/cron.d/keepup-agent: restart keepup-agent if it is not active (every 5 minutes).
# A no-op without systemd, without the binary, or when the unit is disabled.
SHELL=/bin/sh
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

*/5 * * * * root {}
",
        cron_command()
    )
}

/// The `/etc/keepup/agent.yaml` this package ships: [`default_config`], plus `min_serials`
/// when the package carries them (track names follow the repository's rules: plain YAML keys).
pub fn shipped_config(pkg: &AgentPackage) -> String {
    let mut text = default_config();
    if let Some(m) = &pkg.min_serials {
        text.push_str(
            "\n# First contact: with no serials.json yet, refuse signed metadata older than the\n\
             # repository's when this package was built (keepup pack --agent --min-serials-from).\n",
        );
        text.push_str(&format!("min_serials:\n  fleet: {}\n", m.fleet));
        if !m.tracks.is_empty() {
            text.push_str("  tracks:\n");
            for (track, serial) in &m.tracks {
                text.push_str(&format!("    {track}: {serial}\n"));
            }
        }
    }
    text
}

/// The shipped `/etc/keepup/agent.yaml`: every key commented out, with its default or an
/// example, so the agent runs with its defaults until an operator edits it.
pub fn default_config() -> String {
    r#"# /etc/keepup/agent.yaml: keepup-agent's configuration (see docs/agent.md, "Configuration").
# Every key is optional; as shipped, everything is commented out and the defaults shown apply.
# Unknown keys are errors. This is a conffile: your edits are kept across upgrades.
# After editing: systemctl restart keepup-agent

# Where packages install service manifests (<name>.yaml).
#manifest_dir: /usr/lib/keepup/services
# Admin-down marks (down/<service>), the agent's lock, the updater's cache.
#state_dir: /var/lib/keepup-agent
# Service logs (<service>.log), rotated by size.
#log_dir: /var/log/keepup
#log_max_bytes: 10485760
#log_keep: 3
# Control socket for keepup-agent status/down/up/rekick/check/update. The agent owns its
# directory (a directory of its own, never /run or /tmp): 0750 root:<status_group>, or 0700
# root:root without a group; the socket is 0660 (0600). Root may make every request.
#socket: /run/keepup/agent.sock
# Members of this group may run `keepup-agent status` (read-only); everything else (down, up,
# rekick, check, update) needs root. Default: none (root only). The group must exist.
#status_group: keepupview
# Given-up services are started again this often.
#rekick_every: 5m
# How often the manifest directory is looked at when inotify cannot watch it.
#scan_every: 1s
# A run shorter than fast_crash is a fast crash; respawn delays grow up to max_backoff.
#fast_crash: 1s
#max_backoff: 10s

# This host's name in the fleet policy and in reports (default: the hostname).
#host: web-01

# The updater: off unless repo is set. trusted_key is then required.
#repo: http://repo.example.org:8080/
#trusted_key: /etc/keepup/repository.asc
#schedule: "*/5 * * * *"
#stagger: 5m
#package_timeout: 10m
#package_format: deb

# Reports to `keepup serve`: off unless report is set.
#report: https://keepup.example.org:8080
#report_token_file: /etc/keepup/token
#report_every: 2m

# TLS: https:// repo and report URLs are checked against the CA certificates in ca_file (PEM),
# else the system's bundle (/etc/ssl/certs/ca-certificates.crt). A package built with
# `keepup pack --agent --ca-file FILE` ships FILE as /etc/keepup/ca.pem.
#ca_file: /etc/keepup/ca.pem
# A plain http:// report URL to another host is refused (this host's token would travel in
# clear text) unless this is true. Plain http:// for repo is fine (everything is signed).
#allow_plain_http: false
"#
    .to_string()
}

fn header(info: &Info, which: &str, what: &str) -> String {
    format!(
        "#!/bin/sh\n# {which} for {} {}, generated by `keepup pack --agent`.\n# {what}\nset -e\n\nunit={UNIT}\n\n",
        info.name,
        info.full_version()
    )
}

/// The .deb maintainer scripts, shaped like debhelper's `dh_installsystemd` output (restart
/// after upgrade): enable with `deb-systemd-helper`, start or restart only when systemd runs
/// (honouring policy-rc.d like `deb-systemd-invoke`, but queued with `--no-block`, so that the
/// agent's own updater never waits for itself), stop on removal, mask on remove and forget on
/// purge. Every systemd step is skipped without systemd, and none can fail the install.
pub fn deb_scripts(info: &Info) -> Scripts {
    let postinst = format!(
        r#"{}case "$1" in
configure|abort-upgrade|abort-deconfigure|abort-remove)
    # Enable the unit on first install; on upgrade keep the admin's choice (was-enabled).
    if command -v deb-systemd-helper >/dev/null 2>&1; then
        deb-systemd-helper unmask "$unit" >/dev/null || true
        if deb-systemd-helper --quiet was-enabled "$unit"; then
            deb-systemd-helper enable "$unit" >/dev/null || true
        else
            deb-systemd-helper update-state "$unit" >/dev/null || true
        fi
    elif [ -z "$2" ] && command -v systemctl >/dev/null 2>&1; then
        systemctl enable "$unit" >/dev/null 2>&1 || true
    fi
    # Start on install, restart into the new binary on upgrade; only with systemd running
    # (in a container without it, whatever runs the container starts `keepup-agent run`).
    # Like deb-systemd-invoke: start an enabled unit, restart one that is enabled or running,
    # and do nothing when policy-rc.d forbids it (101). Unlike it, the job is queued
    # (--no-block): the agent's own updater may be running this dpkg, and a restart that
    # waited for the agent to stop would wait for itself.
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null 2>&1 || true
        if [ -n "$2" ]; then
            action=restart
        else
            action=start
        fi
        policy=0
        if command -v policy-rc.d >/dev/null 2>&1; then
            policy-rc.d "$unit" "$action" >/dev/null 2>&1 || policy=$?
        fi
        wanted=no
        if systemctl --quiet is-enabled "$unit" 2>/dev/null; then
            wanted=yes
        elif [ "$action" = restart ] && systemctl --quiet is-active "$unit" 2>/dev/null; then
            wanted=yes
        fi
        if [ "$policy" != 101 ] && [ "$wanted" = yes ]; then
            systemctl --no-block "$action" "$unit" >/dev/null 2>&1 || true
        fi
    fi
    ;;
esac

exit 0
"#,
        header(
            info,
            "postinst",
            "Enable the unit and (re)start the agent when systemd runs."
        ),
    );
    let prerm = format!(
        r#"{}# On upgrade the agent keeps running until the new postinst restarts it.
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    if command -v deb-systemd-invoke >/dev/null 2>&1; then
        deb-systemd-invoke stop "$unit" >/dev/null || true
    else
        systemctl stop "$unit" >/dev/null 2>&1 || true
    fi
fi

exit 0
"#,
        header(
            info,
            "prerm",
            "On removal, stop the agent (it stops its services first)."
        ),
    );
    let postrm = format!(
        r#"{}case "$1" in
remove)
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null 2>&1 || true
    fi
    # Removed but not purged: keep the unit's enablement from starting anything.
    if command -v deb-systemd-helper >/dev/null 2>&1; then
        deb-systemd-helper mask "$unit" >/dev/null || true
    fi
    ;;
purge)
    if command -v deb-systemd-helper >/dev/null 2>&1; then
        deb-systemd-helper purge "$unit" >/dev/null || true
        deb-systemd-helper unmask "$unit" >/dev/null || true
    fi
    # State (admin-down marks, lock, updater cache) and the service logs the agent wrote.
    rm -rf {STATE_DIR} {LOG_DIR}
    ;;
esac

exit 0
"#,
        header(
            info,
            "postrm",
            "Forget the unit on removal; remove the agent's state and logs on purge."
        ),
    );
    Scripts {
        post_install: Some(postinst),
        pre_remove: Some(prerm),
        post_remove: Some(postrm),
        ..Default::default()
    }
}

/// The .rpm scriptlets, shaped like the systemd rpm macros (`%systemd_post`,
/// `%systemd_preun`, `%systemd_postun_with_restart`): `$1` is the number of versions left
/// installed (1 on install, 2 on upgrade in `%post`; 0 on erase in `%preun`/`%postun`). RPM
/// runs new `%post`, then old `%preun` and `%postun`, so an upgrade reloads in `%post` and
/// restarts in the old `%postun`. Every step needs `systemctl`, and none can fail.
pub fn rpm_scripts(info: &Info) -> Scripts {
    let post = format!(
        r#"{}if [ "$1" -eq 1 ] && [ -x /usr/bin/systemctl ]; then
    # First install: enable as the shipped preset says (90-keepup-agent.preset: enable).
    systemctl --no-reload preset "$unit" >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ] && systemctl --quiet is-enabled "$unit"; then
        systemctl --no-block start "$unit" >/dev/null 2>&1 || :
    fi
fi
exit 0
"#,
        header(
            info,
            "%post",
            "Enable on first install (preset) and start when systemd runs."
        ),
    );
    let preun = format!(
        r#"{}if [ "$1" -eq 0 ] && [ -x /usr/bin/systemctl ]; then
    # Erase: disable, and stop the agent (it stops its services first).
    systemctl --no-reload disable --now "$unit" >/dev/null 2>&1 || :
fi
exit 0
"#,
        header(info, "%preun", "On erase, disable and stop the agent."),
    );
    let postun = format!(
        r#"{}if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    # Upgrade ($1 >= 1): restart into the new binary if it runs. Queued (--no-block): the
    # agent's own updater may be running this rpm, and must not wait for itself to stop.
    if [ "$1" -ge 1 ]; then
        systemctl --no-block try-restart "$unit" >/dev/null 2>&1 || :
    fi
fi
exit 0
"#,
        header(
            info,
            "%postun",
            "After an upgrade, restart the agent into the new binary."
        ),
    );
    Scripts {
        post_install: Some(post),
        pre_remove: Some(preun),
        post_remove: Some(postun),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(dir: &std::path::Path) -> AgentPackage {
        let binary = dir.join("keepup-agent");
        std::fs::write(&binary, b"\x7fELF not really").unwrap();
        let pass_binary = dir.join(PASS_BINARY_NAME);
        std::fs::write(&pass_binary, b"\x7fELF not really either").unwrap();
        AgentPackage {
            binary,
            pass_binary,
            version: "1.2.3".into(),
            release: "1".into(),
            arch: Arch::Amd64,
            maintainer: DEFAULT_MAINTAINER.into(),
            ca_file: None,
            min_serials: None,
        }
    }

    fn find<'a>(plan: &'a Plan, path: &str) -> &'a Entry {
        plan.entries
            .iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("{path} is not in the plan"))
    }

    fn text(e: &Entry) -> String {
        match &e.kind {
            Kind::File(Source::Bytes(b)) => String::from_utf8(b.clone()).unwrap(),
            other => panic!("{} is not generated text: {other:?}", e.path),
        }
    }

    #[test]
    fn a_ca_file_is_shipped_as_a_conffile_only_when_given() {
        let dir = tempfile::tempdir().unwrap();
        let plan = agent_plan(&pkg(dir.path()), Format::Deb, 0).unwrap();
        assert!(!plan.entries.iter().any(|e| e.path == CA_PATH));
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let with = AgentPackage {
            ca_file: Some(ca.clone()),
            ..pkg(dir.path())
        };
        for format in [Format::Deb, Format::Rpm] {
            let plan = agent_plan(&with, format, 0).unwrap();
            let e = find(&plan, CA_PATH);
            assert!(e.config && e.mode == 0o644, "{format:?}");
            assert!(matches!(&e.kind, Kind::File(Source::Disk(p)) if *p == ca));
        }
    }

    #[test]
    fn min_serials_are_written_into_the_shipped_config() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(shipped_config(&pkg(dir.path())), default_config());
        let with = AgentPackage {
            min_serials: Some(MinSerials {
                fleet: 7,
                tracks: [("stable".to_string(), 12), ("testing".to_string(), 3)].into(),
            }),
            ..pkg(dir.path())
        };
        let cfg = shipped_config(&with);
        assert!(
            cfg.ends_with("min_serials:\n  fleet: 7\n  tracks:\n    stable: 12\n    testing: 3\n"),
            "{cfg}"
        );
        let plan = agent_plan(&with, Format::Deb, 0).unwrap();
        assert_eq!(text(find(&plan, CONFIG_PATH)), cfg);
    }

    #[test]
    fn deb_plan_has_binary_config_unit_cron_and_docs() {
        let dir = tempfile::tempdir().unwrap();
        let plan = agent_plan(&pkg(dir.path()), Format::Deb, 0).unwrap();
        let bin = find(&plan, BINARY_PATH);
        assert_eq!(bin.mode, 0o755);
        assert!(matches!(&bin.kind, Kind::File(Source::Disk(p)) if p.ends_with("keepup-agent")));
        assert!(find(&plan, CONFIG_PATH).config);
        let cron = find(&plan, CRON_PATH);
        assert!(cron.config && cron.mode == 0o644);
        let unit = text(find(&plan, "/lib/systemd/system/keepup-agent.service"));
        for line in [
            "ExecStart=/usr/sbin/keepup-agent run",
            "Restart=always",
            "KillMode=process",
            "Delegate=yes",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line} missing:\n{unit}");
        }
        find(&plan, "/usr/share/doc/keepup-agent/copyright");
        find(&plan, "/usr/share/doc/keepup-agent/changelog.Debian.gz");
        assert!(matches!(find(&plan, STATE_DIR).kind, Kind::Dir));
        assert!(matches!(find(&plan, LOG_DIR).kind, Kind::Dir));
        // Parent directories are listed, entries are sorted, and nothing service-like is in it.
        assert!(matches!(find(&plan, "/etc/cron.d").kind, Kind::Dir));
        assert!(plan.entries.windows(2).all(|w| w[0].path < w[1].path));
        assert!(!plan
            .entries
            .iter()
            .any(|e| e.path.contains("/run-") || e.path.starts_with("/usr/lib/keepup")));
        assert!(plan.info.deb_pre_depends.is_empty() && plan.info.deb_depends.is_empty());
        let s = &plan.scripts;
        assert!(s.pre_install.is_none() && s.post_trans.is_none());
        let postinst = s.post_install.as_ref().unwrap();
        assert!(postinst.contains("deb-systemd-helper enable"));
        assert!(postinst.contains("systemctl --no-block \"$action\""));
        assert!(s
            .pre_remove
            .as_ref()
            .unwrap()
            .contains("deb-systemd-invoke stop"));
        assert!(s.post_remove.as_ref().unwrap().contains("purge)"));
    }

    #[test]
    fn rpm_plan_uses_usr_lib_owns_its_directories_and_ships_a_preset() {
        let dir = tempfile::tempdir().unwrap();
        let plan = agent_plan(&pkg(dir.path()), Format::Rpm, 0).unwrap();
        find(&plan, "/usr/lib/systemd/system/keepup-agent.service");
        assert!(!plan.entries.iter().any(|e| e.path.starts_with("/lib/")));
        assert!(matches!(find(&plan, "/etc/keepup").kind, Kind::Dir));
        assert!(!plan.entries.iter().any(|e| e.path == "/etc"));
        let preset = text(find(
            &plan,
            "/usr/lib/systemd/system-preset/90-keepup-agent.preset",
        ));
        assert!(preset.contains("enable keepup-agent.service"));
        let s = &plan.scripts;
        assert!(s.post_install.as_ref().unwrap().contains("preset"));
        assert!(s.pre_remove.as_ref().unwrap().contains(r#""$1" -eq 0"#));
        assert!(s.post_remove.as_ref().unwrap().contains("try-restart"));
    }

    #[test]
    fn bad_versions_and_missing_binaries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = pkg(dir.path());
        p.version = "v1".into();
        let e = agent_plan(&p, Format::Deb, 0).unwrap_err().to_string();
        assert!(e.contains("version \"v1\""), "{e}");
        let mut p = pkg(dir.path());
        p.binary = dir.path().join("missing");
        assert!(agent_plan(&p, Format::Rpm, 0).is_err());
    }

    #[test]
    fn scripts_are_valid_sh() {
        let info = info(&pkg(tempfile::tempdir().unwrap().path()));
        let deb = deb_scripts(&info);
        let rpm = rpm_scripts(&info);
        for body in [deb, rpm].iter().flat_map(|s| {
            [
                &s.pre_install,
                &s.post_install,
                &s.pre_remove,
                &s.post_remove,
            ]
            .into_iter()
            .flatten()
        }) {
            let out = std::process::Command::new("sh")
                .args(["-n", "-c", body])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{body}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn cron_line_is_a_no_op_without_systemd() {
        // On this build machine or container the guard is what runs; it must never fail loudly.
        let cron = cron_file();
        let line = cron.lines().find(|l| l.starts_with("*/5 ")).unwrap();
        let fields: Vec<&str> = line.splitn(7, ' ').collect();
        assert_eq!(fields[5], "root");
        assert_eq!(fields[6], cron_command());
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", fields[6]])
            .output()
            .unwrap();
        assert!(out.status.success());
    }

    #[test]
    fn default_config_is_all_comments() {
        let cfg = default_config();
        assert!(cfg.lines().all(|l| l.is_empty() || l.starts_with('#')));
        for key in [
            "manifest_dir",
            "state_dir",
            "rekick_every",
            "repo",
            "trusted_key",
            "host",
            "schedule",
            "stagger",
            "package_timeout",
            "report",
            "report_token_file",
            "report_every",
            "package_format",
        ] {
            assert!(cfg.contains(&format!("\n#{key}: ")), "{key} missing");
        }
    }
}
