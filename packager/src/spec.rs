//! The service spec: the one YAML file per service that `keepup pack` turns into packages.
//!
//! Parsing is strict (unknown keys are errors) and every error names the file, line, column
//! and field, and says what is expected. [`Spec::load`] parses and validates; the result is a
//! [`Spec`] whose values are known good (names, versions, paths, modes, durations, probes), so
//! the package writers never re-check them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use crate::manifest::{Ready, READY_TIMEOUT};

/// A spec error: where it is (file, line, column), which field, and what is expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// The spec file.
    pub file: PathBuf,
    /// 1-based line, 0 when unknown.
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
    /// Dotted path of the field, e.g. `files[1].dst`; empty for document-level errors.
    pub field: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for SpecError {}

/// Everything wrong with one spec, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

type S<T> = Spanned<T>;

/// A validated service spec.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The spec file it came from (relative `src` paths resolve against its directory).
    pub path: PathBuf,
    /// Package and service name (Debian and RPM rules: `[a-z0-9][a-z0-9+.-]+`).
    pub name: String,
    /// Upstream version (`[0-9][A-Za-z0-9.+~]*`, valid for both dpkg and rpm).
    pub version: String,
    /// Package release (Debian revision / RPM release).
    pub release: String,
    /// One-line summary.
    pub summary: String,
    /// Long description.
    pub description: String,
    /// `Name <email>`.
    pub maintainer: String,
    /// SPDX license expression.
    pub license: String,
    /// Architecture.
    pub arch: Arch,
    /// Upstream or team home page.
    pub homepage: Option<String>,
    /// Dependencies for both formats, then per-format extras.
    pub depends: Depends,
    /// The role user the service runs as (never `root` or another system account).
    pub role: String,
    /// The operator hands an existing account to this service (`role_adopt: true`).
    /// Dangerous: keepup then kills every process of that account on every stop, health kill
    /// and upgrade. Without it, the install refuses an account keepup did not create for
    /// this service (the role registry, `/var/lib/keepup/roles/<role>`).
    pub role_adopt: bool,
    /// Payload files.
    pub files: Vec<FileSpec>,
    /// What the launch script does.
    pub launch: Launch,
    /// Who supervises the launch script, and its respawn limits.
    pub supervisor: Supervisor,
    /// Active health probes.
    pub checks: Vec<Check>,
    /// Changelog lines for this version.
    pub changes: Vec<String>,
}

/// Package architecture, with its name in each format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// x86-64.
    Amd64,
    /// 64-bit ARM.
    Arm64,
    /// Architecture independent.
    All,
}

impl Arch {
    /// The Debian name (`amd64`, `arm64`, `all`).
    pub fn deb(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
            Arch::All => "all",
        }
    }
    /// The RPM name (`x86_64`, `aarch64`, `noarch`).
    pub fn rpm(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64",
            Arch::Arm64 => "aarch64",
            Arch::All => "noarch",
        }
    }
    fn parse(s: &str) -> Option<Arch> {
        match s {
            "amd64" | "x86_64" => Some(Arch::Amd64),
            "arm64" | "aarch64" => Some(Arch::Arm64),
            "all" | "noarch" => Some(Arch::All),
            _ => None,
        }
    }
    fn host() -> Arch {
        if std::env::consts::ARCH == "aarch64" {
            Arch::Arm64
        } else {
            Arch::Amd64
        }
    }
}

/// Package dependencies.
#[derive(Debug, Clone, Default)]
pub struct Depends {
    /// For both formats.
    pub common: Vec<String>,
    /// Only in the .deb.
    pub deb: Vec<String>,
    /// Only in the .rpm.
    pub rpm: Vec<String>,
}

/// One payload entry: a file, or a directory copied recursively.
#[derive(Debug, Clone)]
pub struct FileSpec {
    /// Source on the build machine (absolute, resolved against the spec's directory).
    pub src: PathBuf,
    /// Absolute destination on the host.
    pub dst: String,
    /// Permission bits; `None` keeps the source's mode (0755 if executable by owner, else 0644).
    pub mode: Option<u32>,
    /// Owner user name (default `root`).
    pub owner: String,
    /// Owner group name (default `root`).
    pub group: String,
    /// A configuration file kept across upgrades (conffile / `%config(noreplace)`).
    /// Always true under `/etc`.
    pub config: bool,
}

/// What the generated `run-<name>` launch script does, in order.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Directories to create (or fix) with owner and mode.
    pub dirs: Vec<LaunchDir>,
    /// Files that must exist.
    pub require: Vec<String>,
    /// Commands (argv) that must exit 0, run as the role user.
    pub check: Vec<Vec<String>>,
    /// Environment variables set for the daemon.
    pub env: BTreeMap<String, String>,
    /// Resource limits (`ulimit`).
    pub limits: Limits,
    /// Working directory (default `/`).
    pub workdir: String,
    /// The daemon's argv, run in the foreground as the role user.
    pub exec: Vec<String>,
    /// How long to sleep before exiting when the environment is not sane.
    pub not_sane_sleep: Duration,
}

/// A directory the launch script creates.
#[derive(Debug, Clone)]
pub struct LaunchDir {
    /// Absolute path.
    pub path: String,
    /// Owner (default: the role).
    pub owner: String,
    /// Group (default: the role).
    pub group: String,
    /// Mode (default 0755).
    pub mode: u32,
}

/// Resource limits applied by the launch script before `exec`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Open files (`ulimit -n`).
    pub nofile: Option<u64>,
    /// Core file size in blocks (`ulimit -c`).
    pub core: Option<u64>,
    /// Processes (`ulimit -u`).
    pub nproc: Option<u64>,
}

/// Who restarts the launch script when it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SupervisorKind {
    /// keepup-agent spawns and supervises `run-<name>` (default).
    Agent,
    /// systemd runs it from a generated unit with `Restart=always`; the agent re-kicks it.
    Systemd,
    /// runsv runs it from `/etc/sv/<name>` (runit); the agent probes and kills the role.
    Runit,
    /// supervisord runs it as `[program:<name>]`; the agent probes, kills the role and
    /// re-kicks a `FATAL` program.
    Supervisord,
}

impl SupervisorKind {
    /// Every kind, as the spec spells it.
    pub const ALL: [SupervisorKind; 4] = [
        SupervisorKind::Agent,
        SupervisorKind::Systemd,
        SupervisorKind::Runit,
        SupervisorKind::Supervisord,
    ];

    /// The spec's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SupervisorKind::Agent => "agent",
            SupervisorKind::Systemd => "systemd",
            SupervisorKind::Runit => "runit",
            SupervisorKind::Supervisord => "supervisord",
        }
    }

    /// The kind a spec names, if any.
    pub fn parse(s: &str) -> Option<SupervisorKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// A supervisor the host already runs (not the agent, not systemd): it has no notify
    /// socket and no start order keepup could set.
    pub fn is_foreign(self) -> bool {
        matches!(self, SupervisorKind::Runit | SupervisorKind::Supervisord)
    }
}

/// Supervision settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Supervisor {
    /// Agent or systemd.
    pub kind: SupervisorKind,
    /// Starts allowed within `within` before the service is given up.
    pub count: u32,
    /// The window for `count`.
    pub within: Duration,
    /// How long a stop waits after TERM before KILL.
    pub stop_grace: Duration,
    /// When a run counts as ready (default: `probes` with checks, else `exec`).
    pub ready: Ready,
    /// A start not ready within this is a failed start (default 90s).
    pub ready_timeout: Duration,
    /// With `ready: notify` only: the longest the daemon may go without `WATCHDOG=1`.
    pub watchdog: Option<Duration>,
    /// Services this one starts after (once they are ready) and stops before.
    pub after: Vec<String>,
}

/// One active health probe and its schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Short name for reports (default: derived from the probe).
    pub name: String,
    /// The probe.
    pub probe: ProbeSpec,
    /// Interval between runs.
    pub every: Duration,
    /// Bound on one run, connect through response.
    pub timeout: Duration,
    /// Consecutive failures (or timeouts) that trigger a role kill.
    pub failures: u32,
    /// Wait after a start before probing.
    pub grace: Duration,
}

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeSpec {
    /// Connect, optionally send, optionally expect a banner regex.
    Tcp {
        /// Host (default 127.0.0.1).
        host: String,
        /// Port.
        port: u16,
        /// Bytes to send after connecting.
        send: Option<String>,
        /// Regex the banner must match.
        expect: Option<String>,
    },
    /// An HTTP request.
    Http {
        /// `http://` URL.
        url: String,
        /// Method (default GET).
        method: String,
        /// Accepted status range, inclusive.
        status: (u16, u16),
        /// Regex the body must match.
        body: Option<String>,
        /// Host header override.
        host_header: Option<String>,
    },
    /// A command run as the role user; exit 0 passes.
    Exec {
        /// argv, no shell.
        argv: Vec<String>,
    },
}

// ---------------------------------------------------------------------------------------------
// Raw YAML shapes. Spanned where validation needs a location.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: S<String>,
    version: S<String>,
    #[serde(default)]
    release: Option<S<String>>,
    summary: S<String>,
    #[serde(default)]
    description: Option<S<String>>,
    maintainer: S<String>,
    license: S<String>,
    #[serde(default)]
    arch: Option<S<String>>,
    #[serde(default)]
    homepage: Option<S<String>>,
    #[serde(default)]
    depends: Vec<S<String>>,
    #[serde(default)]
    deb: Option<RawFormat>,
    #[serde(default)]
    rpm: Option<RawFormat>,
    role: S<String>,
    #[serde(default)]
    role_adopt: Option<S<bool>>,
    #[serde(default)]
    files: Vec<RawFile>,
    launch: S<RawLaunch>,
    #[serde(default)]
    supervisor: Option<RawSupervisor>,
    #[serde(default)]
    checks: Vec<S<RawCheck>>,
    #[serde(default)]
    changes: Vec<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFormat {
    #[serde(default)]
    depends: Vec<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    src: S<String>,
    dst: S<String>,
    #[serde(default)]
    mode: Option<S<RawMode>>,
    #[serde(default)]
    owner: Option<S<String>>,
    #[serde(default)]
    group: Option<S<String>>,
    #[serde(default)]
    config: Option<S<bool>>,
}

/// A mode as written: a quoted octal string, or a number read with legacy octal rules.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawMode {
    Int(u64),
    Str(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLaunch {
    #[serde(default)]
    dirs: Vec<RawDir>,
    #[serde(default)]
    require: Vec<S<String>>,
    #[serde(default)]
    check: Vec<S<Vec<String>>>,
    #[serde(default)]
    env: BTreeMap<String, S<String>>,
    #[serde(default)]
    limits: Option<RawLimits>,
    #[serde(default)]
    workdir: Option<S<String>>,
    exec: S<Vec<String>>,
    #[serde(default)]
    not_sane_sleep: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDir {
    path: S<String>,
    #[serde(default)]
    owner: Option<S<String>>,
    #[serde(default)]
    group: Option<S<String>>,
    #[serde(default)]
    mode: Option<S<RawMode>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default)]
    nofile: Option<u64>,
    #[serde(default)]
    core: Option<u64>,
    #[serde(default)]
    nproc: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSupervisor {
    #[serde(default)]
    kind: Option<S<String>>,
    #[serde(default)]
    count: Option<S<u32>>,
    #[serde(default)]
    within: Option<S<String>>,
    #[serde(default)]
    stop_grace: Option<S<String>>,
    #[serde(default)]
    ready: Option<S<String>>,
    #[serde(default)]
    ready_timeout: Option<S<String>>,
    #[serde(default)]
    watchdog: Option<S<String>>,
    #[serde(default)]
    after: Vec<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    #[serde(default)]
    name: Option<S<String>>,
    #[serde(default)]
    tcp: Option<RawTcp>,
    #[serde(default)]
    http: Option<RawHttp>,
    #[serde(default)]
    exec: Option<S<Vec<String>>>,
    #[serde(default)]
    every: Option<S<String>>,
    #[serde(default)]
    timeout: Option<S<String>>,
    #[serde(default)]
    failures: Option<S<u32>>,
    #[serde(default)]
    grace: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTcp {
    #[serde(default)]
    host: Option<S<String>>,
    port: S<u32>,
    #[serde(default)]
    send: Option<String>,
    #[serde(default)]
    expect: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    url: S<String>,
    #[serde(default)]
    method: Option<S<String>>,
    #[serde(default)]
    status: Option<S<RawStatus>>,
    #[serde(default)]
    body: Option<S<String>>,
    #[serde(default)]
    host: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawStatus {
    One(u16),
    Range(String),
}

// ---------------------------------------------------------------------------------------------
// Validation.

/// Whether `name` is a system account a service must never run as (the agent refuses such a
/// manifest, since stopping the service kills every process of its role).
pub fn is_reserved_role(name: &str) -> bool {
    RESERVED_ROLES.contains(&name)
}

/// Accounts a service must never run as: the base-system users and groups of Debian, Ubuntu,
/// Fedora and RHEL. Their processes are not a service's to kill, and a role's group of the same
/// name would hand the service that group's files (`shadow`, `disk`, `adm`, ...). Daemons'
/// own accounts (`postgres`, `redis`, ...) are not listed: the role registry refuses them at
/// install time, because keepup did not create them (see `docs/spec.md`, "The role").
///
/// Sources: Debian base-passwd 3.6 `passwd.master` and `group.master` (the static users and
/// groups of every Debian and Ubuntu system); the accounts that Debian 12 and Ubuntu 22.04/24.04
/// packages of priority important/standard create (systemd `sysusers.d/basic.conf` and
/// `systemd.conf`, dbus, apt, openssh, chrony, rsyslog, polkit, tpm2-tss, uuid-runtime,
/// tcpdump, avahi, dnsmasq, rtkit, colord, geoclue, usbmuxd, pipewire, landscape, lxd,
/// fwupd, pollinate); Fedora/RHEL `setup` (`/usr/share/doc/setup/uidgid`) and the accounts of
/// the Fedora 39+/RHEL 9 base and workstation package sets (systemd, dbus-broker, polkit, sssd,
/// chrony, unbound, rpcbind, nfs-utils, cyrus-sasl, libstoragemgmt, setroubleshoot, cockpit,
/// clevis, abrt, gdm, gnome-initial-setup, flatpak).
const RESERVED_ROLES: &[&str] = &[
    // Debian base-passwd: passwd.master.
    "root",
    "daemon",
    "bin",
    "sys",
    "sync",
    "games",
    "man",
    "lp",
    "mail",
    "news",
    "uucp",
    "proxy",
    "www-data",
    "backup",
    "list",
    "irc",
    "gnats",
    "nobody",
    // Debian base-passwd: group.master (a role's group has the role's name).
    "adm",
    "tty",
    "disk",
    "kmem",
    "dialout",
    "fax",
    "voice",
    "cdrom",
    "floppy",
    "tape",
    "sudo",
    "audio",
    "dip",
    "operator",
    "src",
    "shadow",
    "utmp",
    "video",
    "sasl",
    "plugdev",
    "staff",
    "users",
    "nogroup",
    // Debian 12 / Ubuntu: accounts of standard packages.
    "_apt",
    "messagebus",
    "sshd",
    "_chrony",
    "systemd-network",
    "systemd-resolve",
    "systemd-timesync",
    "systemd-coredump",
    "systemd-journal",
    "systemd-oom",
    "input",
    "kvm",
    "render",
    "sgx",
    "netdev",
    "crontab",
    "_ssh",
    "ssh",
    "syslog",
    "uuidd",
    "tcpdump",
    "tss",
    "avahi",
    "avahi-autoipd",
    "dnsmasq",
    "rtkit",
    "pulse",
    "pulse-access",
    "saned",
    "colord",
    "geoclue",
    "usbmux",
    "pipewire",
    "lightdm",
    "landscape",
    "lxd",
    "pollinate",
    "fwupd-refresh",
    "polkitd",
    "whoopsie",
    "kernoops",
    "speech-dispatcher",
    "cups-pk-helper",
    "lpadmin",
    "statd",
    "_rpc",
    "docker",
    // Fedora/RHEL setup (uidgid) and base packages.
    "shutdown",
    "halt",
    "ftp",
    "wheel",
    "mem",
    "lock",
    "dbus",
    "rpc",
    "rpcuser",
    "nfsnobody",
    "chrony",
    "unbound",
    "sssd",
    "saslauth",
    "libstoragemgmt",
    "setroubleshoot",
    "cockpit-ws",
    "cockpit-wsinstance",
    "clevis",
    "abrt",
    "gdm",
    "gnome-initial-setup",
    "flatpak",
    "printadmin",
    "ssh_keys",
    "utempter",
    "systemd-journal-remote",
    "pesign",
    "qemu",
    "radvd",
    // keepup's own.
    "keepup",
];

struct Checker<'a> {
    file: &'a Path,
    errors: Vec<SpecError>,
}

impl Checker<'_> {
    fn err(&mut self, at: Option<Location>, field: impl Into<String>, message: impl Into<String>) {
        let (line, column) = at.map(|l| (l.line(), l.column())).unwrap_or((0, 0));
        self.errors.push(SpecError {
            file: self.file.to_path_buf(),
            line,
            column,
            field: field.into(),
            message: message.into(),
        });
    }

    /// A string with no control characters (which no script, control file or header can carry).
    fn text(&mut self, v: &S<String>, field: &str, allow_newlines: bool) -> String {
        let bad = v
            .value
            .chars()
            .find(|c| c.is_control() && !(allow_newlines && (*c == '\n' || *c == '\t')));
        if let Some(c) = bad {
            self.err(
                Some(v.referenced),
                field,
                format!("contains the control character {c:?}; remove it"),
            );
        }
        v.value.clone()
    }

    fn nonempty(&mut self, v: &S<String>, field: &str) -> String {
        let s = self.text(v, field, false);
        if s.trim().is_empty() {
            self.err(Some(v.referenced), field, "must not be empty");
        }
        s
    }

    fn abs_path(&mut self, v: &S<String>, field: &str) -> String {
        let s = self.text(v, field, false);
        if !is_clean_abs_path(&s) {
            self.err(
                Some(v.referenced),
                field,
                format!("must be an absolute path without `..`, `.` or `//` (got {s:?})"),
            );
        }
        s
    }

    fn duration(&mut self, v: Option<&S<String>>, field: &str, default: Duration) -> Duration {
        let Some(v) = v else { return default };
        match parse_duration(&v.value) {
            Ok(d) => d,
            Err(msg) => {
                self.err(Some(v.referenced), field, msg);
                default
            }
        }
    }

    fn mode(&mut self, v: &S<RawMode>, field: &str) -> u32 {
        match parse_mode(&v.value) {
            Ok(m) => m,
            Err(msg) => {
                self.err(Some(v.referenced), field, msg);
                0o644
            }
        }
    }

    fn account(&mut self, v: &S<String>, field: &str) -> String {
        let s = self.text(v, field, false);
        if !is_account_name(&s) {
            self.err(
                Some(v.referenced),
                field,
                format!("{s:?} is not a valid user/group name (expected [a-z_][a-z0-9_-]*, at most 32 characters)"),
            );
        }
        s
    }
}

/// Every name under a `src` directory (walked recursively, links not followed) becomes part of
/// a destination path, so it must be as clean as a `dst`: UTF-8, no control characters (a
/// newline would split an md5sums or conffiles line). The first bad name is the error.
fn check_tree_names(src: &Path) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(src).map_err(|e| format!("{}: {e}", src.display()))?;
    if !meta.is_dir() {
        return Ok(());
    }
    let entries = std::fs::read_dir(src).map_err(|e| format!("{}: {e}", src.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", src.display()))?;
        let path = entry.path();
        let name = entry.file_name();
        let bad = match name.to_str() {
            None => Some("is not valid UTF-8"),
            Some(n) if n.chars().any(char::is_control) => {
                Some("contains a control character (a newline would break the package's md5sums and conffiles)")
            }
            Some(_) => None,
        };
        if let Some(why) = bad {
            return Err(format!(
                "the file name {:?} in {} {why}; rename the file (names under a `src` directory become destination paths)",
                name,
                src.display()
            ));
        }
        check_tree_names(&path)?;
    }
    Ok(())
}

/// True for `/a/b` style paths: absolute, no `.`/`..` components, no empty components, not `/`.
pub(crate) fn is_clean_abs_path(s: &str) -> bool {
    s.len() > 1
        && s.starts_with('/')
        && !s.ends_with('/')
        && s[1..]
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

pub(crate) fn is_account_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && s.len() <= 32
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'))
}

/// Is `name` a repository keyring package's name (`<repo>-archive-keyring`, see `keyring`)?
/// Service specs may not take such a name, so an agent that installs one knows it carries no
/// service.
pub fn is_keyring_name(name: &str) -> bool {
    name.ends_with("-archive-keyring")
}

/// Package names valid for both dpkg and rpm: 2+ characters of `a-z 0-9 + . -`, starting with a
/// letter or digit. Service names are package names; the report server applies the same rule
/// (`keepup_deploy::wire::names`).
pub fn is_package_name(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() >= 2
        && matches!(chars.next(), Some('a'..='z' | '0'..='9'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '+' | '.' | '-'))
}

/// Check (probe) names: 1 to 128 printable ASCII characters, no space, quote, backquote,
/// backslash or angle bracket (`tcp-8080`, `http/healthz?full=1`, `port`). The default names
/// keepup gives checks follow it; the report server refuses probe names that do not.
pub fn is_check_name(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes().all(|b| {
            b.is_ascii_graphic() && !matches!(b, b'"' | b'\'' | b'`' | b'\\' | b'<' | b'>')
        })
}

/// Versions valid for both dpkg (upstream part) and rpm: start with a digit, `[A-Za-z0-9.+~]`.
pub(crate) fn is_version(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('0'..='9'))
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '~'))
}

/// Releases valid for both dpkg (revision) and rpm: `[A-Za-z0-9.+~]`, starting alphanumeric.
pub(crate) fn is_release(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '~'))
}

/// Parse a duration such as `30s`, `5m`, `1h30m` or `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s.trim()) {
        Ok(d) if d.is_zero() => Err(format!("{s:?} is zero; give a positive duration like \"30s\"")),
        Ok(d) => Ok(d),
        Err(_) => Err(format!(
            "{s:?} is not a duration; write a number and a unit, like \"500ms\", \"30s\", \"5m\" or \"1h\""
        )),
    }
}

/// Format a duration the way specs and manifests write it (`30s`, `5m`, `1500ms`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn parse_mode(raw: &RawMode) -> Result<u32, String> {
    let value = match raw {
        RawMode::Int(n) => *n,
        RawMode::Str(s) => {
            let digits = s.trim().trim_start_matches("0o");
            u64::from_str_radix(digits, 8)
                .map_err(|_| format!("{s:?} is not an octal mode; write it like \"0755\""))?
        }
    };
    if value > 0o777 {
        return Err(format!(
            "mode {value:#o} has bits beyond 0777 (setuid, setgid and sticky are not allowed); write the mode as a quoted octal string like \"0755\""
        ));
    }
    Ok(value as u32)
}

/// Regex syntax is checked by the probe library at run time; here we only reject the empty one.
fn check_regex(c: &mut Checker<'_>, v: &S<String>, field: &str) -> String {
    let s = c.text(v, field, false);
    if s.is_empty() {
        c.err(
            Some(v.referenced),
            field,
            "must not be empty; omit it to accept any banner",
        );
    }
    s
}

impl Spec {
    /// Read, parse and validate a spec file. All problems are reported at once.
    pub fn load(path: &Path) -> Result<Spec, SpecErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            SpecErrors(vec![SpecError {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                field: String::new(),
                message: format!("cannot read the spec: {e}"),
            }])
        })?;
        Spec::parse(path, &text)
    }

    /// Parse and validate spec text; `path` names the file in errors and anchors relative `src`.
    pub fn parse(path: &Path, text: &str) -> Result<Spec, SpecErrors> {
        let options = serde_saphyr::options! { legacy_octal_numbers: true };
        // serde_path_to_error tracks which field was being read when parsing failed.
        let mut field = String::new();
        let parsed = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
            serde_path_to_error::deserialize(de).map_err(|e| {
                field = e.path().to_string();
                e.into_inner()
            })
        });
        let raw: RawSpec = parsed.map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            let message = e.without_snippet().to_string();
            SpecErrors(vec![SpecError {
                file: path.to_path_buf(),
                line,
                column,
                field: if field == "." {
                    String::new()
                } else {
                    field.replace(".value", "")
                },
                message: yaml_hint(strip_location(&message)),
            }])
        })?;
        let mut c = Checker {
            file: path,
            errors: Vec::new(),
        };
        let spec = validate(&mut c, path, raw);
        if c.errors.is_empty() {
            Ok(spec)
        } else {
            c.errors.sort_by_key(|e| (e.line, e.column));
            Err(SpecErrors(c.errors))
        }
    }

    /// `<version>-<release>`, the full package version in both formats.
    pub fn full_version(&self) -> String {
        format!("{}-{}", self.version, self.release)
    }

    /// Path of the generated launch script on the host.
    pub fn launch_path(&self) -> String {
        format!("/usr/sbin/run-{}", self.name)
    }

    /// Path of the agent manifest on the host.
    pub fn manifest_path(&self) -> String {
        format!("{}/{}.yaml", crate::manifest::MANIFEST_DIR, self.name)
    }
}

/// serde-saphyr appends " at line X column Y"; we print the location ourselves.
fn strip_location(msg: &str) -> &str {
    match msg.find(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    }
}

fn yaml_hint(msg: &str) -> String {
    if msg.contains("unknown field") {
        format!("{msg}; see docs/spec.md for the fields a spec may have")
    } else if msg.contains("expected sequence") {
        format!("{msg}: write a list, e.g. [/usr/bin/food, --config, /etc/foo/foo.conf]")
    } else {
        msg.to_string()
    }
}

fn validate(c: &mut Checker<'_>, path: &Path, raw: RawSpec) -> Spec {
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();

    let name = c.text(&raw.name, "name", false);
    if !is_package_name(&name) {
        c.err(Some(raw.name.referenced), "name", format!(
            "{name:?} is not a valid package name (lower case letters, digits, `+`, `-`, `.`; at least 2 characters, starting with a letter or digit)"
        ));
    } else if is_keyring_name(&name) {
        c.err(Some(raw.name.referenced), "name", format!(
            "{name:?} ends in `-archive-keyring`, which keepup keeps for repository keyring packages (`keepup repo keyring`); choose another name"
        ));
    }
    let version = c.text(&raw.version, "version", false);
    if !is_version(&version) {
        c.err(Some(raw.version.referenced), "version", format!(
            "{version:?} is not a valid version for both dpkg and rpm (start with a digit; then letters, digits, `.`, `+`, `~`; no `-` or `_`)"
        ));
    }
    let release = match &raw.release {
        Some(r) => {
            let s = c.text(r, "release", false);
            if !is_release(&s) {
                c.err(Some(r.referenced), "release", format!(
                    "{s:?} is not a valid release (letters, digits, `.`, `+`, `~`, starting with a letter or digit)"
                ));
            }
            s
        }
        None => "1".to_string(),
    };
    let summary = c.nonempty(&raw.summary, "summary");
    if summary.len() > 80 {
        c.err(Some(raw.summary.referenced), "summary", "is longer than 80 characters; keep it to one short line and put the rest in `description`");
    }
    if summary
        .to_lowercase()
        .split(|ch: char| !ch.is_alphanumeric() && ch != '-')
        .next()
        == Some(name.as_str())
    {
        c.err(Some(raw.summary.referenced), "summary", format!(
            "starts with the package name {name:?}; describe what it is instead (Debian policy 3.4.1), e.g. \"example daemon that ...\""
        ));
    }
    let description = raw
        .description
        .as_ref()
        .map(|d| c.text(d, "description", true))
        .unwrap_or_default();
    if let Some(d) = &raw.description {
        if let Some((i, _)) = description
            .lines()
            .enumerate()
            .find(|(_, l)| l.chars().count() > 79)
        {
            c.err(Some(d.referenced), "description", format!(
                "line {} is longer than 79 characters; wrap it (dpkg and rpm show descriptions as-is)", i + 1
            ));
        }
    }
    let maintainer = c.nonempty(&raw.maintainer, "maintainer");
    if !(maintainer.contains('<') && maintainer.trim_end().ends_with('>')) {
        c.err(
            Some(raw.maintainer.referenced),
            "maintainer",
            format!("{maintainer:?} should be `Full Name <email@example.com>`"),
        );
    }
    let license = c.nonempty(&raw.license, "license");
    let arch = match &raw.arch {
        Some(a) => Arch::parse(&a.value).unwrap_or_else(|| {
            c.err(Some(a.referenced), "arch", format!(
                "{:?} is not a supported architecture (amd64/x86_64, arm64/aarch64, all/noarch)", a.value
            ));
            Arch::host()
        }),
        None => Arch::host(),
    };
    let homepage = raw.homepage.as_ref().map(|h| {
        let s = c.text(h, "homepage", false);
        if !(s.starts_with("http://") || s.starts_with("https://")) {
            c.err(
                Some(h.referenced),
                "homepage",
                "must be an http:// or https:// URL",
            );
        }
        s
    });

    let mut depends = Depends::default();
    for (list, out, field) in [
        (Some(&raw.depends), &mut depends.common, "depends"),
        (
            raw.deb.as_ref().map(|f| &f.depends),
            &mut depends.deb,
            "deb.depends",
        ),
        (
            raw.rpm.as_ref().map(|f| &f.depends),
            &mut depends.rpm,
            "rpm.depends",
        ),
    ] {
        for (i, d) in list.into_iter().flatten().enumerate() {
            let field = format!("{field}[{i}]");
            let s = c.nonempty(d, &field);
            if s.contains(',') {
                c.err(
                    Some(d.referenced),
                    field,
                    "list one dependency per item (no commas)",
                );
            }
            out.push(s);
        }
    }

    let role = c.text(&raw.role, "role", false);
    if RESERVED_ROLES.contains(&role.as_str()) {
        c.err(Some(raw.role.referenced), "role", format!(
            "{role:?} is a system account; a service needs its own role user, because stopping it kills every process of that user (use e.g. the service name; `role_adopt` does not lift this)"
        ));
    } else if !is_account_name(&role) {
        c.err(
            Some(raw.role.referenced),
            "role",
            format!(
            "{role:?} is not a valid user name (expected [a-z_][a-z0-9_-]*, at most 32 characters)"
        ),
        );
    }

    let mut files = Vec::new();
    for (i, f) in raw.files.iter().enumerate() {
        let field = format!("files[{i}]");
        let src_text = c.text(&f.src, &format!("{field}.src"), false);
        let src = base.join(&src_text);
        if !src.exists() {
            c.err(
                Some(f.src.referenced),
                format!("{field}.src"),
                format!(
                    "{} does not exist (relative paths are relative to the spec's directory)",
                    src.display()
                ),
            );
        } else if let Err(msg) = check_tree_names(&src) {
            c.err(Some(f.src.referenced), format!("{field}.src"), msg);
        }
        let dst = c.abs_path(&f.dst, &format!("{field}.dst"));
        let mode = f.mode.as_ref().map(|m| c.mode(m, &format!("{field}.mode")));
        let owner = f
            .owner
            .as_ref()
            .map(|o| c.account(o, &format!("{field}.owner")))
            .unwrap_or_else(|| "root".into());
        let group = f
            .group
            .as_ref()
            .map(|o| c.account(o, &format!("{field}.group")))
            .unwrap_or_else(|| "root".into());
        let under_etc = dst.starts_with("/etc/");
        let config = match &f.config {
            Some(v) if v.value && !under_etc => {
                c.err(Some(v.referenced), format!("{field}.config"),
                    "configuration files must live under /etc (Debian policy); move the file or drop `config: true`");
                true
            }
            Some(v) if !v.value && under_etc => {
                c.err(Some(v.referenced), format!("{field}.config"),
                    "files under /etc are always configuration files (kept across upgrades); drop `config: false`");
                true
            }
            _ => under_etc,
        };
        if dst == "/usr/lib/keepup"
            || dst.starts_with("/usr/lib/keepup/")
            || dst == format!("/usr/sbin/run-{name}")
        {
            c.err(
                Some(f.dst.referenced),
                format!("{field}.dst"),
                "is generated by keepup; choose another destination",
            );
        }
        files.push(FileSpec {
            src,
            dst,
            mode,
            owner,
            group,
            config,
        });
    }

    let launch = validate_launch(c, &raw.launch, &role);
    // Checks written count for `ready: probes`, even one refused below for another reason.
    let supervisor = validate_supervisor(c, raw.supervisor.as_ref(), &name, !raw.checks.is_empty());
    let mut checks = Vec::new();
    for (i, ch) in raw.checks.iter().enumerate() {
        if let Some(check) = validate_check(c, ch, &format!("checks[{i}]")) {
            checks.push(check);
        }
    }
    let changes = raw
        .changes
        .iter()
        .enumerate()
        .map(|(i, l)| c.nonempty(l, &format!("changes[{i}]")))
        .collect();

    Spec {
        path: path.to_path_buf(),
        name,
        version,
        release,
        summary,
        description,
        maintainer,
        license,
        arch,
        homepage,
        depends,
        role,
        role_adopt: raw.role_adopt.as_ref().is_some_and(|a| a.value),
        files,
        launch,
        supervisor,
        checks,
        changes,
    }
}

fn validate_launch(c: &mut Checker<'_>, raw: &S<RawLaunch>, role: &str) -> Launch {
    let l = &raw.value;
    let mut dirs = Vec::new();
    for (i, d) in l.dirs.iter().enumerate() {
        let field = format!("launch.dirs[{i}]");
        dirs.push(LaunchDir {
            path: c.abs_path(&d.path, &format!("{field}.path")),
            owner: d
                .owner
                .as_ref()
                .map(|o| c.account(o, &format!("{field}.owner")))
                .unwrap_or_else(|| role.to_string()),
            group: d
                .group
                .as_ref()
                .map(|o| c.account(o, &format!("{field}.group")))
                .unwrap_or_else(|| role.to_string()),
            mode: d
                .mode
                .as_ref()
                .map(|m| c.mode(m, &format!("{field}.mode")))
                .unwrap_or(0o755),
        });
    }
    let require = l
        .require
        .iter()
        .enumerate()
        .map(|(i, r)| c.abs_path(r, &format!("launch.require[{i}]")))
        .collect();
    let mut check = Vec::new();
    for (i, argv) in l.check.iter().enumerate() {
        let field = format!("launch.check[{i}]");
        let argv_v = argv_of(c, argv, &field);
        no_assignment(c, argv, &field, &argv_v);
        check.push(argv_v);
    }
    let mut env = BTreeMap::new();
    for (k, v) in &l.env {
        let field = format!("launch.env.{k}");
        let valid_key = matches!(k.chars().next(), Some('A'..='Z' | 'a'..='z' | '_'))
            && k.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
        if !valid_key {
            c.err(
                Some(v.referenced),
                &field,
                format!("{k:?} is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)"),
            );
        } else if SUPERVISOR_ENV.contains(&k.as_str()) {
            c.err(
                Some(v.referenced),
                &field,
                format!("{k} is set by the supervisor for the notify protocol (`supervisor.ready: notify`) and passed through by the launch script; remove it from `launch.env`"),
            );
        }
        env.insert(k.clone(), c.text(v, &field, false));
    }
    let limits = l
        .limits
        .as_ref()
        .map(|r| Limits {
            nofile: r.nofile,
            core: r.core,
            nproc: r.nproc,
        })
        .unwrap_or_default();
    let workdir = l
        .workdir
        .as_ref()
        .map(|w| c.abs_path(w, "launch.workdir"))
        .unwrap_or_else(|| "/".into());
    let exec = argv_of(c, &l.exec, "launch.exec");
    if let Some(first) = exec.first() {
        if !is_clean_abs_path(first) {
            c.err(Some(l.exec.referenced), "launch.exec", format!(
                "the program {first:?} must be an absolute path (the launch script does not search PATH)"
            ));
        }
    }
    no_assignment(c, &l.exec, "launch.exec", &exec);
    let not_sane_sleep = c.duration(
        l.not_sane_sleep.as_ref(),
        "launch.not_sane_sleep",
        Duration::from_secs(30),
    );
    Launch {
        dirs,
        require,
        check,
        env,
        limits,
        workdir,
        exec,
        not_sane_sleep,
    }
}

/// The notify protocol's variables: the supervisor (keepup-agent or systemd) sets them, and the
/// launch script passes them through its clean environment when they are set.
pub const SUPERVISOR_ENV: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

fn argv_of(c: &mut Checker<'_>, v: &S<Vec<String>>, field: &str) -> Vec<String> {
    if v.value.is_empty() {
        c.err(
            Some(v.referenced),
            field,
            "must be a non-empty list: the program, then its arguments",
        );
    }
    for (i, a) in v.value.iter().enumerate() {
        if a.contains('\0') {
            c.err(
                Some(v.referenced),
                format!("{field}[{i}]"),
                "contains a NUL byte",
            );
        }
    }
    v.value.clone()
}

/// The launch script runs the program through `env -i VAR=value ... PROGRAM`: a program path
/// with `=` would be taken as one more variable, and the next argument run instead.
fn no_assignment(c: &mut Checker<'_>, v: &S<Vec<String>>, field: &str, argv: &[String]) {
    if let Some(first) = argv.first().filter(|p| p.contains('=')) {
        c.err(
            Some(v.referenced),
            format!("{field}[0]"),
            format!("the program {first:?} contains `=`, which `env` would take for a variable assignment; rename or link the program to a path without `=`"),
        );
    }
}

/// `name` is the service's own name (`after` may not list it); `has_checks`: the spec has
/// checks, which makes `probes` the default `ready` and possible at all.
fn validate_supervisor(
    c: &mut Checker<'_>,
    raw: Option<&RawSupervisor>,
    name: &str,
    has_checks: bool,
) -> Supervisor {
    let mut s = Supervisor {
        kind: SupervisorKind::Agent,
        count: 10,
        within: Duration::from_secs(60),
        stop_grace: Duration::from_secs(10),
        ready: if has_checks {
            Ready::Probes
        } else {
            Ready::Exec
        },
        ready_timeout: READY_TIMEOUT,
        watchdog: None,
        after: Vec::new(),
    };
    let Some(raw) = raw else { return s };
    if let Some(k) = &raw.kind {
        s.kind = SupervisorKind::parse(&k.value).unwrap_or_else(|| {
            let valid: Vec<String> = SupervisorKind::ALL
                .iter()
                .map(|k| format!("`{}`", k.as_str()))
                .collect();
            c.err(
                Some(k.referenced),
                "supervisor.kind",
                format!(
                    "{:?} is not a supervisor; expected one of {}",
                    k.value,
                    valid.join(", ")
                ),
            );
            SupervisorKind::Agent
        });
    }
    if let Some(n) = &raw.count {
        if n.value == 0 {
            c.err(Some(n.referenced), "supervisor.count", "must be at least 1");
        }
        s.count = n.value;
    }
    s.within = c.duration(raw.within.as_ref(), "supervisor.within", s.within);
    s.stop_grace = c.duration(
        raw.stop_grace.as_ref(),
        "supervisor.stop_grace",
        s.stop_grace,
    );
    validate_readiness(c, raw, &mut s, name, has_checks);
    if s.kind.is_foreign() {
        validate_foreign(c, raw, &s);
    }
    s
}

/// runit and supervisord start the launch script themselves: no notify socket reaches the
/// daemon, and keepup cannot order their starts.
fn validate_foreign(c: &mut Checker<'_>, raw: &RawSupervisor, s: &Supervisor) {
    let kind = s.kind.as_str();
    if let Some(r) = raw.ready.as_ref().filter(|_| s.ready == Ready::Notify) {
        c.err(
            Some(r.referenced),
            "supervisor.ready",
            format!(
                "is notify, but {kind} gives the daemon no notify socket; use `ready: probes` or `ready: exec`, or `kind: agent` or `kind: systemd`"
            ),
        );
    }
    if let (Some(a), false) = (raw.after.first(), s.after.is_empty()) {
        c.err(
            Some(a.referenced),
            "supervisor.after",
            format!(
                "{kind} starts its services in no order keepup can set; remove `after`, or use `kind: agent` or `kind: systemd`"
            ),
        );
    }
}

/// `ready`, `ready_timeout`, `watchdog` and `after` (the agent's manifest validation refuses
/// the same things: `Manifest::validate`).
fn validate_readiness(
    c: &mut Checker<'_>,
    raw: &RawSupervisor,
    s: &mut Supervisor,
    name: &str,
    has_checks: bool,
) {
    if let Some(r) = &raw.ready {
        match Ready::parse(&r.value) {
            Some(Ready::Probes) if !has_checks => c.err(
                Some(r.referenced),
                "supervisor.ready",
                "is probes, but the spec has no checks to pass; add a check under `checks`, or use `ready: exec`",
            ),
            Some(ready) => s.ready = ready,
            None => c.err(
                Some(r.referenced),
                "supervisor.ready",
                format!(
                    "{:?} is not a readiness; expected one of {}",
                    r.value,
                    Ready::names()
                ),
            ),
        }
    }
    s.ready_timeout = c.duration(
        raw.ready_timeout.as_ref(),
        "supervisor.ready_timeout",
        s.ready_timeout,
    );
    if let Some(w) = &raw.watchdog {
        let watchdog = c.duration(Some(w), "supervisor.watchdog", Duration::ZERO);
        // A refused `ready` value already has its error; do not add a second one here.
        let ready_refused = raw
            .ready
            .as_ref()
            .is_some_and(|r| Ready::parse(&r.value).is_none());
        if s.ready != Ready::Notify && !ready_refused {
            c.err(
                Some(w.referenced),
                "supervisor.watchdog",
                format!(
                    "needs supervisor.ready: notify: only a notify service sends WATCHDOG=1 (ready is {}); set `ready: notify` or remove `watchdog`",
                    s.ready
                ),
            );
        }
        if !watchdog.is_zero() {
            s.watchdog = Some(watchdog);
        }
    }
    for (i, a) in raw.after.iter().enumerate() {
        let field = format!("supervisor.after[{i}]");
        let svc = c.text(a, &field, false);
        if !is_package_name(&svc) {
            c.err(Some(a.referenced), &field, format!(
                "{svc:?} is not a service name (lower case letters, digits, `+`, `-`, `.`; at least 2 characters, starting with a letter or digit)"
            ));
        } else if svc == name {
            c.err(
                Some(a.referenced),
                &field,
                format!("names this service ({svc}); a service cannot start after itself"),
            );
        } else if s.after.contains(&svc) {
            c.err(
                Some(a.referenced),
                &field,
                format!("names {svc} twice; list each service once"),
            );
        } else if s.kind == SupervisorKind::Systemd
            && !crate::manifest::is_unit_name(&format!("{svc}.service"))
        {
            c.err(Some(a.referenced), &field, format!(
                "{svc:?} cannot be a systemd unit name (`+` is not allowed in one), and a `kind: systemd` service starts after `<name>.service`"
            ));
        }
        s.after.push(svc);
    }
}

fn validate_check(c: &mut Checker<'_>, raw: &S<RawCheck>, field: &str) -> Option<Check> {
    let r = &raw.value;
    let kinds = [r.tcp.is_some(), r.http.is_some(), r.exec.is_some()]
        .iter()
        .filter(|k| **k)
        .count();
    if kinds != 1 {
        c.err(
            Some(raw.referenced),
            field,
            "each check needs exactly one of `tcp`, `http` or `exec`",
        );
        return None;
    }
    let errors_before = c.errors.len();
    let probe = if let Some(t) = &r.tcp {
        let port = match u16::try_from(t.port.value) {
            Ok(p) if p > 0 => p,
            _ => {
                c.err(
                    Some(t.port.referenced),
                    format!("{field}.tcp.port"),
                    "must be a port number between 1 and 65535",
                );
                1
            }
        };
        ProbeSpec::Tcp {
            host: t
                .host
                .as_ref()
                .map(|h| c.nonempty(h, &format!("{field}.tcp.host")))
                .unwrap_or_else(|| "127.0.0.1".into()),
            port,
            send: t.send.clone(),
            expect: t
                .expect
                .as_ref()
                .map(|e| check_regex(c, e, &format!("{field}.tcp.expect"))),
        }
    } else if let Some(h) = &r.http {
        let url = c.text(&h.url, &format!("{field}.http.url"), false);
        if !url.starts_with("http://") || url.len() <= "http://".len() {
            c.err(
                Some(h.url.referenced),
                format!("{field}.http.url"),
                format!("{url:?} must be an http:// URL (TLS is not supported by probes)"),
            );
        } else if let Some(port) = url_port(&url).filter(|p| !is_port(p)) {
            // The URL parser the agent uses drops a port it cannot read and probes port 80.
            c.err(
                Some(h.url.referenced),
                format!("{field}.http.url"),
                format!("{url:?} has the port {port:?}; a port is a number between 1 and 65535"),
            );
        }
        let status = match &h.status {
            None => (200, 399),
            Some(s) => match parse_status(&s.value) {
                Ok(range) => range,
                Err(msg) => {
                    c.err(Some(s.referenced), format!("{field}.http.status"), msg);
                    (200, 399)
                }
            },
        };
        let method = h
            .method
            .as_ref()
            .map(|m| c.nonempty(m, &format!("{field}.http.method")))
            .unwrap_or_else(|| "GET".into());
        if !method.chars().all(|ch| ch.is_ascii_uppercase()) {
            c.err(
                h.method.as_ref().map(|m| m.referenced),
                format!("{field}.http.method"),
                format!("{method:?} is not an HTTP method (GET, HEAD, POST, ...)"),
            );
        }
        ProbeSpec::Http {
            url,
            method,
            status,
            body: h
                .body
                .as_ref()
                .map(|b| check_regex(c, b, &format!("{field}.http.body"))),
            host_header: h.host.clone(),
        }
    } else {
        let argv = r.exec.as_ref().expect("one kind is set");
        let argv_v = argv_of(c, argv, &format!("{field}.exec"));
        if argv_v.first().is_some_and(|p| !is_clean_abs_path(p)) {
            c.err(
                Some(argv.referenced),
                format!("{field}.exec"),
                "the program must be an absolute path",
            );
        }
        ProbeSpec::Exec { argv: argv_v }
    };
    if c.errors.len() == errors_before {
        agent_can_build(c, raw, field, &probe);
    }
    let every = c.duration(
        r.every.as_ref(),
        &format!("{field}.every"),
        Duration::from_secs(10),
    );
    let timeout = c.duration(
        r.timeout.as_ref(),
        &format!("{field}.timeout"),
        Duration::from_secs(2),
    );
    if timeout > every {
        c.err(
            r.timeout.as_ref().map(|t| t.referenced),
            format!("{field}.timeout"),
            format!(
                "the timeout ({}) must not be longer than the interval `every` ({})",
                format_duration(timeout),
                format_duration(every)
            ),
        );
    }
    let failures = match &r.failures {
        Some(f) if f.value == 0 => {
            c.err(
                Some(f.referenced),
                format!("{field}.failures"),
                "must be at least 1",
            );
            1
        }
        Some(f) => f.value,
        None => 3,
    };
    let grace = c.duration(
        r.grace.as_ref(),
        &format!("{field}.grace"),
        Duration::from_secs(5),
    );
    let name = match &r.name {
        Some(n) => c.nonempty(n, &format!("{field}.name")),
        None => default_check_name(&probe),
    };
    if !name.is_empty() && !is_check_name(&name) {
        c.err(
            r.name
                .as_ref()
                .map(|n| n.referenced)
                .or(Some(raw.referenced)),
            format!("{field}.name"),
            format!(
                "{name:?} is not a check name (1-128 printable ASCII characters without space, \
                 quotes, backslash or < >); give the check a `name:` like \"health\""
            ),
        );
    }
    Some(Check {
        name,
        probe,
        every,
        timeout,
        failures,
        grace,
    })
}

/// Build the probe with the agent's own [`manifest::build_probe`](crate::manifest::build_probe),
/// so "the agent could not run it" means exactly the same thing at pack time as on the host.
/// Errors point at the field the constructor refused.
fn agent_can_build(c: &mut Checker<'_>, raw: &S<RawCheck>, field: &str, probe: &ProbeSpec) {
    use crate::manifest::{build_probe, ManifestProbe};
    use keepup_checks::ProbeError;
    let r = &raw.value;
    let at = |v: Option<Location>| Some(v.unwrap_or(raw.referenced));
    let result = build_probe(&ManifestProbe::from_spec(probe), None);
    let Err(e) = result else { return };
    let tcp = r.tcp.as_ref();
    let http = r.http.as_ref();
    let (loc, sub) = match &e {
        ProbeError::InvalidAddress { .. } => (
            tcp.and_then(|t| t.host.as_ref().map(|h| h.referenced))
                .or(tcp.map(|t| t.port.referenced)),
            "tcp.host",
        ),
        ProbeError::InvalidRegex { .. } if tcp.is_some() => (
            tcp.and_then(|t| t.expect.as_ref().map(|e| e.referenced)),
            "tcp.expect",
        ),
        ProbeError::InvalidRegex { .. } => (
            http.and_then(|h| h.body.as_ref().map(|b| b.referenced)),
            "http.body",
        ),
        ProbeError::InvalidUrl { .. } | ProbeError::UnsupportedScheme { .. } => {
            (http.map(|h| h.url.referenced), "http.url")
        }
        ProbeError::InvalidMethod(_) => (
            http.and_then(|h| h.method.as_ref().map(|m| m.referenced)),
            "http.method",
        ),
        ProbeError::InvalidStatus { .. } => (
            http.and_then(|h| h.status.as_ref().map(|s| s.referenced)),
            "http.status",
        ),
        ProbeError::InvalidHost(_) => (None, "http.host"),
        ProbeError::EmptyCommand => (r.exec.as_ref().map(|e| e.referenced), "exec"),
    };
    // The regex compiler's message draws a caret under the pattern over several lines; its
    // last line says what is wrong, which is what fits on one error line.
    let why = match &e {
        ProbeError::InvalidRegex {
            what,
            pattern,
            reason,
        } => format!(
            "invalid {what} regex /{pattern}/: {}",
            reason.lines().last().unwrap_or_default().trim()
        ),
        other => other.to_string(),
    };
    c.err(
        at(loc),
        format!("{field}.{sub}"),
        format!("the agent could not run this probe: {why}; fix it so the health check can run"),
    );
}

/// The port written in an `http://` URL's authority, if any (`[v6]:port` or `host:port`).
fn url_port(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let after_host = match host_port.rfind(']') {
        Some(i) => &host_port[i + 1..],
        None => host_port,
    };
    after_host.rsplit_once(':').map(|(_, p)| p)
}

fn is_port(p: &str) -> bool {
    matches!(p.parse::<u16>(), Ok(n) if n > 0)
}

fn parse_status(raw: &RawStatus) -> Result<(u16, u16), String> {
    let ok = |n: u16| (100..=599).contains(&n);
    let range = match raw {
        RawStatus::One(n) => (*n, *n),
        RawStatus::Range(s) => {
            let parse = |p: &str| p.trim().parse::<u16>().ok();
            match s.split_once('-') {
                Some((a, b)) => match (parse(a), parse(b)) {
                    (Some(a), Some(b)) if a <= b => (a, b),
                    _ => {
                        return Err(format!(
                            "{s:?} is not a status range; write e.g. 200 or \"200-299\""
                        ))
                    }
                },
                None => match parse(s) {
                    Some(n) => (n, n),
                    None => {
                        return Err(format!(
                            "{s:?} is not a status; write e.g. 200 or \"200-299\""
                        ))
                    }
                },
            }
        }
    };
    if ok(range.0) && ok(range.1) {
        Ok(range)
    } else {
        Err("HTTP status codes are between 100 and 599".into())
    }
}

fn default_check_name(p: &ProbeSpec) -> String {
    match p {
        ProbeSpec::Tcp { port, .. } => format!("tcp-{port}"),
        ProbeSpec::Http { url, .. } => {
            let rest = url.trim_start_matches("http://");
            let path = rest.find('/').map(|i| &rest[i..]).unwrap_or("/");
            format!("http{path}")
        }
        ProbeSpec::Exec { argv } => {
            let prog = argv.first().map(String::as_str).unwrap_or("exec");
            let base = Path::new(prog)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(prog);
            format!("exec-{base}")
        }
    }
}
