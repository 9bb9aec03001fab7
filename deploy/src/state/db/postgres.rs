//! The PostgreSQL backend of the fleet state (`--state postgres://USER@HOST:PORT/DB`), shared
//! by several `keepup serve` replicas:
//!
//! * the schema comes from numbered migrations in `keepup_migrations`, applied at start under
//!   a transaction advisory lock, so replicas starting together apply each exactly once;
//! * the replicas store at once, with no lock between them: each report row carries the id of
//!   the transaction that wrote it (`reports.xid`), and a replica reads the others' reports
//!   only below the oldest transaction still running, so one that commits late is read late,
//!   never skipped ([`Postgres::peer_reports`]); a store locks the `hosts` rows of its hosts
//!   (`FOR KEY SHARE`), so a host being removed keeps no report;
//! * the age retention is claimed through `meta.pruned_at` (one replica per turn);
//! * the rollout gate runs where a session advisory lock is held ([`Lease`]).
//!
//! The password comes from the URL, else `PGPASSWORD`, else the password file (`PGPASSFILE`
//! or `~/.pgpass`, as libpq reads it). It is never shown: messages name the database by
//! [`PgUrl`]'s display, which has none. The connection is TLS as the URL's `sslmode` and
//! `sslrootcert` say ([`tls`]); without `sslmode`, a host other than loopback gets
//! `verify-full`, so the password only goes to a server whose certificate is checked. A Unix
//! socket is never TLS, whatever `sslmode` says (as with libpq).

use std::cell::{RefCell, RefMut};
use std::collections::{HashMap, HashSet};
use std::str::FromStr as _;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use postgres::config::Host;
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator as _;
use postgres::{Client, Statement};

use keepup_deploy::wire::{Event, EventKind};

pub mod tls;

use tls::{PgTls, RootCert, SslMode};

use super::{
    new_token, now, token_hash, HostRow, Latest, LatestBody, MadeSummary, StoredReport, TokenHash,
};

/// Advisory lock keys (one 64-bit space per database; "keepup" in the high bytes).
const MIGRATE_LOCK: i64 = 0x6b65_6570_7570_0001;
const GATE_LOCK: i64 = 0x6b65_6570_7570_0003;

/// The schema, one step per migration; a step is never edited once released, only added.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE hosts (
        name TEXT PRIMARY KEY,
        token_sha256 BYTEA NOT NULL UNIQUE,
        added_at BIGINT NOT NULL
    );
    CREATE SEQUENCE report_seq;
    CREATE TABLE reports (
        host TEXT PRIMARY KEY,
        received_at BIGINT NOT NULL,
        sent_at BIGINT NOT NULL,
        report TEXT NOT NULL,
        seq BIGINT NOT NULL,
        replica TEXT NOT NULL
    );
    CREATE INDEX reports_seq ON reports(seq);
    CREATE TABLE events (
        id BIGSERIAL PRIMARY KEY,
        host TEXT NOT NULL,
        at BIGINT NOT NULL,
        service TEXT,
        kind TEXT NOT NULL,
        message TEXT NOT NULL,
        received_at BIGINT NOT NULL
    );
    CREATE INDEX events_host_id ON events(host, id);
    CREATE INDEX events_received ON events(received_at);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
    INSERT INTO meta(key, value) VALUES ('hosts_version', 0), ('pruned_at', 0);",
    ),
    // Each report's summary (`state::summary_codec`), read at start and by the other
    // replicas instead of the body; rows stored before it have none until a server
    // starts and fills it in from their bodies.
    (2, "ALTER TABLE reports ADD COLUMN summary BYTEA;"),
    // Bodies stored packed (`super::pack_body`, made on the request threads): `packed` holds
    // the zstd frame and `report` is empty; a row whose `report` is not empty (stored before,
    // or by a replica of a keepup before this migration during an upgrade) is that text. The
    // packed frame is not compressed again (no pglz in the backend). Events lose the index of
    // their receive times: the age retention walks the log by `id` ([`Postgres::prune`]).
    (
        3,
        "ALTER TABLE reports ADD COLUMN packed BYTEA;
    ALTER TABLE reports ALTER COLUMN packed SET STORAGE EXTERNAL;
    DROP INDEX IF EXISTS events_received;",
    ),
    // Replicas store at once (no store lock): a report row carries the id of the transaction
    // that wrote it, and a replica reads the others' rows by it, below the oldest transaction
    // still running ([`Postgres::peer_reports`]). The sequence numbers, which needed the lock
    // to commit in order, go with their index: one b-tree insert less per report. A replica
    // of an earlier keepup still running stores nothing once this is applied (its statement
    // names `seq`): its batches answer 503, and their agents send them again.
    (
        4,
        "ALTER TABLE reports ADD COLUMN xid xid8;
    ALTER TABLE reports ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
    CREATE INDEX reports_xid ON reports(xid);
    ALTER TABLE reports DROP COLUMN seq;
    DROP SEQUENCE report_seq;",
    ),
];

/// How far past a replica's clock an event's receive time may be before the retention takes
/// it for a clock that jumped forward and then back ([`Postgres::prune`]).
const FUTURE_SLACK: u64 = 300;

/// A PostgreSQL database to connect to, parsed from `--state`.
#[derive(Clone)]
pub struct PgUrl {
    config: postgres::Config,
    /// The URL without its password, for messages.
    shown: String,
    /// libpq's `sslmode` (given, from `PGSSLMODE`, or keepup's default for the hosts).
    ssl: SslMode,
    /// Whether `ssl` is keepup's default rather than the operator's choice (for messages).
    ssl_defaulted: bool,
    /// The CAs trusted when `ssl` verifies (`sslrootcert`).
    root: RootCert,
    /// The TLS connector (`None` for `sslmode=disable`), made once so that an unreadable
    /// `sslrootcert` stops the start.
    tls: Option<PgTls>,
}

impl std::fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl std::fmt::Display for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

fn host_name(h: &Host) -> String {
    match h {
        Host::Tcp(n) => n.clone(),
        Host::Unix(p) => p.display().to_string(),
    }
}

/// Server-side limits for every keepup session (unless the URL sets `options`): a lock wait
/// (a host row another replica's store holds) or a statement gives up rather than hang, and a
/// transaction left idle by a frozen replica (SIGSTOP, a VM paused, a swap storm) is ended
/// within seconds, releasing its locks: keepup's transactions never wait on anything between
/// their statements, so 5 s idle inside one means the replica is not running. The frozen
/// replica finds its session ended when it runs again: its batch fails (`503`, the agents
/// resend) and it connects again.
const SESSION_LIMITS: &str = "-c lock_timeout=20s -c statement_timeout=120s \
     -c idle_in_transaction_session_timeout=5s";

/// The gate lease's session limit on top of [`SESSION_LIMITS`]: a thread of the holder's
/// process pings the lease's session every [`LEASE_PING`] whatever its gate is doing, so a
/// session idle for 10 s is a holder whose whole process stands still (SIGSTOP, a paused VM),
/// not a slow tick; the server ends it, which frees the lease for another replica (a kernel
/// still answers TCP keepalives for a stopped process, so keepalives alone would keep a
/// frozen holder's lease forever).
const LEASE_IDLE_LIMIT: &str = "-c idle_session_timeout=10s";

/// How often the lease's keeper thread pings its session (well inside [`LEASE_IDLE_LIMIT`]).
const LEASE_PING: Duration = Duration::from_secs(2);

/// The `sslmode`/`sslrootcert` query parameters (read here: the driver knows neither
/// `verify-ca` nor `verify-full` nor `sslrootcert`), and the URL without them for the driver.
/// Client certificates are refused with a message (passwords only, for now).
fn take_ssl_params(s: &str) -> Result<(String, Option<String>, Option<String>), String> {
    let Some((base, query)) = s.split_once('?') else {
        return Ok((s.to_string(), None, None));
    };
    let (mut mode, mut root, mut rest) = (None, None, Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let value = || {
            percent_encoding::percent_decode_str(v)
                .decode_utf8()
                .map(|v| v.into_owned())
                .map_err(|_| format!("--state: the URL's {k} is not UTF-8"))
        };
        match k {
            "sslmode" => mode = Some(value()?),
            "sslrootcert" => root = Some(value()?),
            "sslcert" | "sslkey" | "sslpassword" | "sslcertmode" => {
                return Err(format!(
                    "--state: {k}: keepup does not log in to PostgreSQL with a client \
                     certificate; use a password (PGPASSWORD or ~/.pgpass) over \
                     sslmode=verify-full"
                ))
            }
            "sslcrl" | "sslcrldir" => {
                return Err(format!(
                    "--state: {k}: certificate revocation lists are not read; remove it (and \
                     revoke by replacing the server's certificate and CA file)"
                ))
            }
            _ => rest.push(pair),
        }
    }
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, mode, root))
}

/// Whether `h` is this machine (a Unix socket, `localhost`, a loopback address): where a
/// plaintext connection crosses no network.
fn is_local(h: &Host) -> bool {
    match h {
        Host::Unix(_) => true,
        Host::Tcp(n) => {
            n.eq_ignore_ascii_case("localhost")
                || n.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    }
}

/// Whether `config`'s host `i` is a Unix socket: a path, with no `hostaddr` (the driver
/// connects to a `hostaddr` over TCP when one is given).
fn is_socket(config: &postgres::Config, i: usize) -> bool {
    matches!(config.get_hosts().get(i), Some(Host::Unix(_))) && config.get_hostaddrs().is_empty()
}

/// `config` with only its host `i` (with that host's `hostaddr` and port): everything else as
/// it is.
fn one_host(config: &postgres::Config, i: usize) -> postgres::Config {
    let mut one = postgres::Config::new();
    if let Some(user) = config.get_user() {
        one.user(user);
    }
    if let Some(pw) = config.get_password() {
        one.password(pw);
    }
    if let Some(db) = config.get_dbname() {
        one.dbname(db);
    }
    if let Some(options) = config.get_options() {
        one.options(options);
    }
    if let Some(name) = config.get_application_name() {
        one.application_name(name);
    }
    match config.get_hosts().get(i) {
        Some(Host::Tcp(name)) => {
            one.host(name);
        }
        Some(Host::Unix(path)) => {
            one.host_path(path);
        }
        None => {}
    }
    if let Some(addr) = config.get_hostaddrs().get(i) {
        one.hostaddr(*addr);
    }
    if let Some(port) = config.get_ports().get(i).or(config.get_ports().first()) {
        one.port(*port);
    }
    if let Some(t) = config.get_connect_timeout() {
        one.connect_timeout(*t);
    }
    if let Some(t) = config.get_tcp_user_timeout() {
        one.tcp_user_timeout(*t);
    }
    one.keepalives(config.get_keepalives())
        .keepalives_idle(config.get_keepalives_idle());
    if let Some(t) = config.get_keepalives_interval() {
        one.keepalives_interval(t);
    }
    if let Some(n) = config.get_keepalives_retries() {
        one.keepalives_retries(n);
    }
    one.ssl_mode(config.get_ssl_mode())
        .ssl_negotiation(config.get_ssl_negotiation())
        .target_session_attrs(config.get_target_session_attrs())
        .channel_binding(config.get_channel_binding());
    one
}

/// Whether every connection `config` makes stays on this machine: every host is local and so
/// is every `hostaddr` (the driver connects to a `hostaddr` when one is given and uses the
/// host only as the name to check, so `host=localhost&hostaddr=10.0.0.9` leaves the machine).
fn all_local(config: &postgres::Config) -> bool {
    config.get_hosts().iter().all(is_local)
        && config.get_hostaddrs().iter().all(|ip| ip.is_loopback())
}

/// Printed once per process: the warnings of [`PgUrl::warning`].
static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Free text as PostgreSQL can hold it: a `TEXT` value cannot contain NUL, and one NUL in one
/// host's event would fail the whole batch (every host's reports in it), so it becomes U+FFFD.
fn text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}").into()
    } else {
        s.into()
    }
}

impl PgUrl {
    /// Parse a `postgres://` (or `postgresql://`) URL; every libpq URL parameter the driver
    /// knows is accepted (`?target_session_attrs=read-write`, several hosts), and libpq's
    /// `sslmode` and `sslrootcert` (else `PGSSLMODE`, `PGSSLROOTCERT`).
    pub fn parse(s: &str) -> Result<PgUrl, String> {
        let (driver_url, mode, root) = take_ssl_params(s)?;
        let mut config = postgres::Config::from_str(&driver_url).map_err(|e| {
            format!(
                "--state: not a PostgreSQL URL ({e}); write postgres://USER@HOST:PORT/DB \
                 (the password in PGPASSWORD or ~/.pgpass)"
            )
        })?;
        if config.get_user().is_none() {
            return Err(
                "--state: the PostgreSQL URL names no user: write postgres://USER@HOST:PORT/DB"
                    .into(),
            );
        }
        if config.get_hosts().is_empty() {
            return Err(
                "--state: the PostgreSQL URL names no host: write postgres://USER@HOST:PORT/DB"
                    .into(),
            );
        }
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let (ssl, ssl_defaulted) = match mode.or_else(|| env("PGSSLMODE")) {
            Some(m) => (
                SslMode::parse(&m).map_err(|e| format!("--state: {e}"))?,
                false,
            ),
            None if all_local(&config) => (SslMode::Disable, true),
            None => (SslMode::VerifyFull, true),
        };
        config.ssl_mode(ssl.driver());
        let root = RootCert::resolve(root.or_else(|| env("PGSSLROOTCERT")).as_deref());
        if root == RootCert::System && ssl == SslMode::VerifyCa {
            // libpq's rule: any public CA's customer would pass a check without the name.
            return Err(
                "--state: sslmode=verify-ca with the system's CAs would take any \
                 certificate a public CA issued: add sslrootcert=FILE (your CA), or use \
                 sslmode=verify-full"
                    .into(),
            );
        }
        // Only TCP hosts get TLS: with Unix sockets alone there is nothing to configure.
        let tls = if (0..config.get_hosts().len()).all(|i| is_socket(&config, i)) {
            None
        } else {
            tls::connector(ssl, &root).map_err(|e| format!("--state: {e}"))?
        };
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        // A replica that freezes or loses its network must not hold its rows' locks and the
        // others' peer reads for the kernel's two-hour keepalive: the server ends its
        // idle transaction, statements and lock waits have a limit, and this side notices a
        // dead peer within about half a minute.
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(Duration::from_secs(30));
        }
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
        if config.get_options().is_none() {
            config.options(SESSION_LIMITS);
        }
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let port = config
                    .get_ports()
                    .get(i)
                    .or(config.get_ports().first())
                    .copied()
                    .unwrap_or(5432);
                format!("{}:{port}", host_name(h))
            })
            .collect();
        let shown = format!(
            "postgres://{}@{}/{}",
            config.get_user().unwrap_or_default(),
            hosts.join(","),
            config
                .get_dbname()
                .or(config.get_user())
                .unwrap_or_default()
        );
        Ok(PgUrl {
            config,
            shown,
            ssl,
            ssl_defaulted,
            root,
            tls,
        })
    }

    /// What an operator must hear about this URL's protection, if anything: plaintext or an
    /// unchecked certificate on a connection that leaves this machine.
    pub fn warning(&self) -> Option<String> {
        if all_local(&self.config) {
            return None;
        }
        let fix = "use sslmode=verify-full with sslrootcert=FILE (the CA of the server's \
                   certificate); docs/postgres.md, \"TLS\"";
        match self.ssl {
            SslMode::Disable => Some(format!(
                "WARNING: the connection to PostgreSQL at {self} is NOT ENCRYPTED \
                 (sslmode=disable): the reports, the token hashes and, unless the server asks \
                 for SCRAM, the password cross the network in clear, and anyone on the path \
                 can pose as the database: {fix}"
            )),
            SslMode::Prefer => Some(format!(
                "WARNING: sslmode=prefer for PostgreSQL at {self}: anyone on the network can \
                 turn TLS off (the server's \"no TLS\" answer is not authenticated) or pose as \
                 the database (the certificate is not checked): {fix}"
            )),
            SslMode::Require => Some(format!(
                "WARNING: sslmode=require for PostgreSQL at {self}: encrypted, but the \
                 server's certificate is not checked, so anyone on the path can pose as the \
                 database: {fix}"
            )),
            SslMode::VerifyCa | SslMode::VerifyFull => None,
        }
    }

    /// The connection's TLS mode, as libpq spells it.
    #[cfg(test)]
    pub fn ssl_mode(&self) -> &'static str {
        self.ssl.as_str()
    }

    /// Connect, with the password from the URL, `PGPASSWORD` or the password file. Errors
    /// say what is wrong (credentials, no such database, unreachable) and what to do.
    fn connect(&self) -> Result<Client> {
        self.connect_with(self.config.clone())
    }

    /// [`PgUrl::connect`] for the gate's lease: a session the server ends when it stays idle
    /// ([`LEASE_IDLE_LIMIT`]), so a frozen holder loses the lease.
    fn connect_lease(&self) -> Result<Client> {
        let mut config = self.config.clone();
        let options = format!(
            "{} {LEASE_IDLE_LIMIT}",
            config.get_options().unwrap_or_default()
        );
        config.options(options.trim());
        self.connect_with(config)
    }

    fn connect_with(&self, mut config: postgres::Config) -> Result<Client> {
        if config.get_password().is_none() {
            if let Some(pw) = self.password_from_env() {
                config.password(pw);
            }
        }
        if !(0..config.get_hosts().len()).any(|i| is_socket(&config, i)) {
            return self.connect_tcp(&config).map_err(|e| self.explain(&e));
        }
        // A Unix socket gets no TLS whatever `sslmode` says, as with libpq (the driver would
        // ask the server for TLS over it, and have no name to check): each host in turn,
        // in the URL's order, the sockets in plaintext and the TCP hosts as configured.
        let mut last = None;
        for i in 0..config.get_hosts().len() {
            let mut one = one_host(&config, i);
            let tried = if is_socket(&config, i) {
                one.ssl_mode(postgres::config::SslMode::Disable);
                one.connect(postgres::NoTls)
            } else {
                self.connect_tcp(&one)
            };
            match tried {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) => Err(self.explain(&e)),
            None => bail!("the PostgreSQL URL {self} names no host"),
        }
    }

    /// Connect as `config` says, with TLS as `sslmode` says.
    fn connect_tcp(&self, config: &postgres::Config) -> Result<Client, postgres::Error> {
        match &self.tls {
            Some(tls) => config.connect(tls.clone()),
            None => config.connect(postgres::NoTls),
        }
    }

    /// `PGPASSWORD`, else the first matching line of the password file.
    fn password_from_env(&self) -> Option<String> {
        if let Some(pw) = std::env::var_os("PGPASSWORD") {
            return Some(pw.to_string_lossy().into_owned());
        }
        let file = std::env::var_os("PGPASSFILE")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".pgpass"))
            })?;
        let meta = std::fs::metadata(&file).ok()?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            if meta.permissions().mode() & 0o077 != 0 {
                eprintln!(
                    "keepup: {} is readable by others; it is ignored (chmod 600 it)",
                    file.display()
                );
                return None;
            }
        }
        let text = std::fs::read_to_string(&file).ok()?;
        let host = self.config.get_hosts().first().map_or_else(
            || "localhost".to_string(),
            |h| match h {
                Host::Tcp(n) => n.clone(),
                Host::Unix(_) => "localhost".to_string(),
            },
        );
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let user = self.config.get_user().unwrap_or_default();
        let db = self.config.get_dbname().unwrap_or(user);
        pgpass_lookup(&text, &host, port, db, user)
    }

    /// A connection error as the operator needs it (never with the password).
    fn explain(&self, e: &postgres::Error) -> anyhow::Error {
        let user = self.config.get_user().unwrap_or_default();
        let mode = self.ssl.as_str();
        let why = if self.ssl_defaulted {
            " (keepup's default for a host that is not this machine)"
        } else {
            ""
        };
        if let Some(db) = e.as_db_error() {
            if self.ssl == SslMode::Disable && db.message().contains("no encryption") {
                return anyhow::anyhow!(
                    "PostgreSQL at {self} accepts {user:?} only over TLS (its pg_hba.conf has \
                     no plaintext line for it: {}): remove sslmode=disable and use \
                     sslmode=verify-full with sslrootcert=FILE (the CA of the server's \
                     certificate)",
                    db.message()
                );
            }
        }
        let source = std::error::Error::source(e);
        let io = source.and_then(|s| s.downcast_ref::<std::io::Error>());
        if let Some(tls) = io.and_then(|i| i.get_ref()?.downcast_ref::<rustls::Error>()) {
            let host = self
                .config
                .get_hosts()
                .first()
                .map(host_name)
                .unwrap_or_default();
            let what = match tls {
                rustls::Error::InvalidCertificate(c) => {
                    tls::explain_certificate(&host, self.ssl, &self.root, c)
                }
                rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                    "it did not answer with TLS: is it PostgreSQL?".to_string()
                }
                other => format!("the TLS handshake failed: {other}"),
            };
            return anyhow::anyhow!(
                "refused PostgreSQL at {self} (sslmode={mode}{why}): {what}. Nothing was sent \
                 to it: not the user name, not the password"
            );
        }
        if source.is_some_and(|s| s.to_string() == "server does not support TLS") {
            return anyhow::anyhow!(
                "PostgreSQL at {self} does not offer TLS and sslmode={mode}{why} requires it: \
                 turn it on at the server (ssl = on, ssl_cert_file, ssl_key_file in \
                 postgresql.conf), or, only if the network between is trusted, add \
                 sslmode=disable to the URL. Nothing was sent to it"
            );
        }
        if let Some(code) = e.code() {
            if *code == SqlState::INVALID_PASSWORD
                || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            {
                return anyhow::anyhow!(
                    "PostgreSQL at {self} refused user {user:?}: {}; check the password (in the \
                     URL, PGPASSWORD or ~/.pgpass) and the server's pg_hba.conf",
                    e.as_db_error()
                        .map_or("authentication failed", |d| d.message())
                );
            }
            if *code == SqlState::INVALID_CATALOG_NAME {
                return anyhow::anyhow!(
                    "PostgreSQL at {self}: the database does not exist; create it (createdb -O \
                     {user} DBNAME) and start again"
                );
            }
        }
        if let Some(io) = io {
            return anyhow::anyhow!(
                "cannot reach PostgreSQL at {self}: {io}; is the server running and listening \
                 there (listen_addresses, port, firewall)?"
            );
        }
        anyhow::anyhow!(
            "cannot connect to PostgreSQL at {self}: {e} (a password goes in PGPASSWORD or \
             ~/.pgpass; the server may also be unreachable within the connect timeout)"
        )
    }
}

/// The password of the first line of a libpq password file (`host:port:db:user:password`,
/// `*` matches anything, `\` escapes `:` and `\`) that matches.
fn pgpass_lookup(text: &str, host: &str, port: u16, db: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                }
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        let want = [host, port.as_str(), db, user];
        if fields[..4]
            .iter()
            .zip(want)
            .all(|(f, w)| f == "*" || f == w)
        {
            return Some(fields.pop().unwrap_or_default());
        }
    }
    None
}

/// Apply the migrations this database lacks, under an advisory lock held until commit;
/// returns those applied here.
fn migrate(client: &mut Client) -> Result<Vec<i32>> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS keepup_migrations (
            version INTEGER PRIMARY KEY,
            applied_at BIGINT NOT NULL
        )",
    )?;
    let done: Vec<i32> = tx
        .query("SELECT version FROM keepup_migrations", &[])?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(v) = done.iter().copied().filter(|v| *v > known).max() {
        bail!(
            "the database's schema is at migration {v}, newer than this keepup knows ({known}): \
             upgrade keepup on this machine"
        );
    }
    let mut applied = Vec::new();
    for (v, sql) in MIGRATIONS {
        if done.contains(v) {
            continue;
        }
        tx.batch_execute(sql)
            .with_context(|| format!("applying migration {v}"))?;
        tx.execute(
            "INSERT INTO keepup_migrations(version, applied_at) VALUES ($1, $2)",
            &[v, &(now() as i64)],
        )?;
        applied.push(*v);
    }
    tx.commit()?;
    Ok(applied)
}

/// A store's error, saying what happened when the server ended this replica's session
/// because it stood still inside a transaction ([`SESSION_LIMITS`]).
fn session_ended(e: postgres::Error) -> anyhow::Error {
    if e.code() == Some(&SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT) {
        anyhow::anyhow!(
            "this replica stood still for over 5 s inside a store (stopped, a paused VM, \
             swapping?), so PostgreSQL ended its session, which held back what the other \
             replicas read ({e}): these reports are answered 503 and their agents send them \
             again; the next store connects again"
        )
    } else {
        e.into()
    }
}

/// The store's one statement for a batch ([`Postgres::store`]): the reports (the last of each
/// host, and only hosts still registered, whose `hosts` rows it locks `FOR KEY SHARE`) and
/// their events; the events insert reads what the reports insert returned. `$4` is the body as
/// text (empty when packed), `$5` the packed body. Rows are written in host order, so two
/// replicas storing reports of the same hosts at once lock them in the same order (no
/// deadlock).
const STORE_SQL: &str = "WITH stored AS (
         INSERT INTO reports(host, received_at, sent_at, report, packed, summary, replica, xid)
         SELECT t.h, t.ra, t.sa, t.body, t.p, t.s, $7, pg_current_xact_id()
         FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::bytea[],
                     $6::bytea[]) AS t(h, ra, sa, body, p, s)
         WHERE EXISTS (SELECT 1 FROM hosts WHERE name = t.h FOR KEY SHARE)
         ORDER BY t.h
         ON CONFLICT(host) DO UPDATE SET received_at = excluded.received_at,
         sent_at = excluded.sent_at, report = excluded.report, packed = excluded.packed,
         summary = excluded.summary, replica = excluded.replica, xid = excluded.xid
         RETURNING host
     ), logged AS (
         INSERT INTO events(host, at, service, kind, message, received_at)
         SELECT e.h, e.at, e.sv, e.k, e.m, e.ra
         FROM unnest($8::text[], $9::bigint[], $10::text[], $11::text[], $12::text[],
                     $13::bigint[]) WITH ORDINALITY AS e(h, at, sv, k, m, ra, i)
         WHERE e.h IN (SELECT host FROM stored)
         ORDER BY e.i
     )
     SELECT host FROM stored";

/// The oldest transaction still running, as the statement's snapshot sees it: every report
/// row whose `xid` is below it was written by a transaction that has ended.
const HORIZON_SQL: &str = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint";

/// The reports other replicas than `$2` wrote in transactions from `$1` up to the horizon
/// ([`HORIZON_SQL`]), with the horizon in every row (and in a row of NULLs when there is
/// none).
const PEER_SQL: &str = "WITH h AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS x)
     SELECT h.x::text::bigint, r.host, r.received_at, r.sent_at, r.summary
     FROM h LEFT JOIN reports r
         ON r.xid >= $1::bigint::text::xid8 AND r.xid < h.x AND r.replica <> $2";

/// The event quota of the hosts in `$1`: each keeps its newest `$2` events.
const QUOTA_SQL: &str = "DELETE FROM events e USING (
         SELECT q.h, (SELECT id FROM events WHERE host = q.h
                      ORDER BY id DESC LIMIT 1 OFFSET $2) AS cut
         FROM unnest($1::text[]) AS q(h)) c
     WHERE e.host = c.h AND e.id <= c.cut";

/// Hosts registered per statement by `keepup host add --bulk`.
const ADD_HOSTS_CHUNK: usize = 10_000;

/// An open PostgreSQL state database (one connection, re-opened when it drops).
pub struct Postgres {
    url: PgUrl,
    client: RefCell<Client>,
    /// Statements prepared on `client`, by their SQL: parsed and planned once per connection,
    /// not at every call (emptied when the connection is opened again).
    prepared: RefCell<HashMap<&'static str, Statement>>,
}

impl Postgres {
    /// Connect and apply the migrations.
    pub fn open(url: &PgUrl) -> Result<Postgres> {
        if let Some(w) = url.warning() {
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                eprintln!("keepup: {w}");
            }
        }
        let mut client = url.connect()?;
        let applied =
            migrate(&mut client).with_context(|| format!("preparing the state database {url}"))?;
        for v in applied {
            eprintln!("keepup: state database {url}: applied migration {v}");
        }
        Ok(Postgres {
            url: url.clone(),
            client: RefCell::new(client),
            prepared: RefCell::new(HashMap::new()),
        })
    }

    /// The connection, opened again if the last one dropped (a restart or a failover).
    fn client(&self) -> Result<RefMut<'_, Client>> {
        let mut c = self.client.borrow_mut();
        if c.is_closed() {
            *c = self.url.connect()?;
            self.prepared.borrow_mut().clear();
        }
        Ok(c)
    }

    /// `sql` prepared on `c` (this handle's connection), once per connection.
    fn statement(&self, c: &mut Client, sql: &'static str) -> Result<Statement, postgres::Error> {
        if let Some(st) = self.prepared.borrow().get(sql) {
            return Ok(st.clone());
        }
        let st = c.prepare(sql)?;
        self.prepared.borrow_mut().insert(sql, st.clone());
        Ok(st)
    }

    /// See [`super::Db::add_hosts`].
    pub fn add_hosts(&mut self, names: &[String]) -> Result<Vec<(String, String, bool)>> {
        let mut c = self.client()?;
        let mut tx = c.transaction()?;
        let mut out = Vec::with_capacity(names.len());
        let t = now() as i64;
        // A name twice in one call: one row at a time, so the second replaces the first.
        let distinct = names.iter().collect::<HashSet<_>>().len() == names.len();
        if distinct {
            // Many hosts (`--bulk`): a few statements per thousands of names, not two round
            // trips per name.
            let existing = tx.prepare("SELECT name FROM hosts WHERE name = ANY($1)")?;
            let upsert = tx.prepare(
                "INSERT INTO hosts(name, token_sha256, added_at)
                 SELECT n, h, $3 FROM unnest($1::text[], $2::bytea[]) AS t(n, h)
                 ON CONFLICT(name) DO UPDATE SET token_sha256 = excluded.token_sha256,
                 added_at = excluded.added_at",
            )?;
            for chunk in names.chunks(ADD_HOSTS_CHUNK) {
                let names: Vec<&str> = chunk.iter().map(String::as_str).collect();
                let before: HashSet<String> = tx
                    .query(&existing, &[&names])?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let tokens: Vec<String> = chunk.iter().map(|_| new_token()).collect();
                let hashes: Vec<Vec<u8>> = tokens.iter().map(|t| token_hash(t).to_vec()).collect();
                tx.execute(&upsert, &[&names, &hashes, &t])?;
                for (name, token) in chunk.iter().zip(tokens) {
                    out.push((name.clone(), token, before.contains(name)));
                }
            }
        } else {
            let exists = tx.prepare("SELECT 1 FROM hosts WHERE name = $1")?;
            let upsert = tx.prepare(
                "INSERT INTO hosts(name, token_sha256, added_at) VALUES ($1, $2, $3)
                 ON CONFLICT(name) DO UPDATE SET token_sha256 = excluded.token_sha256,
                 added_at = excluded.added_at",
            )?;
            for name in names {
                let replaced = !tx.query(&exists, &[name])?.is_empty();
                let token = new_token();
                tx.execute(&upsert, &[name, &&token_hash(&token)[..], &t])?;
                out.push((name.clone(), token, replaced));
            }
        }
        tx.execute(
            "UPDATE meta SET value = value + 1 WHERE key = 'hosts_version'",
            &[],
        )?;
        tx.commit()?;
        Ok(out)
    }

    /// See [`super::Db::remove_host`].
    pub fn remove_host(&mut self, name: &str) -> Result<bool> {
        let mut c = self.client()?;
        let mut tx = c.transaction()?;
        // A store holding this host's row (`FOR KEY SHARE`) commits first, and its report is
        // deleted below (a statement of its own: it sees what committed before it); a store
        // that comes to the row after this delete finds the host gone and skips it.
        let n = tx.execute("DELETE FROM hosts WHERE name = $1", &[&name])?;
        tx.execute("DELETE FROM reports WHERE host = $1", &[&name])?;
        tx.execute("DELETE FROM events WHERE host = $1", &[&name])?;
        tx.execute(
            "UPDATE meta SET value = value + 1 WHERE key = 'hosts_version'",
            &[],
        )?;
        tx.commit()?;
        Ok(n > 0)
    }

    /// See [`super::Db::hosts`].
    pub fn hosts(&self) -> Result<Vec<HostRow>> {
        let rows = self.client()?.query(
            "SELECT h.name, h.added_at, r.received_at FROM hosts h
             LEFT JOIN reports r ON r.host = h.name ORDER BY h.name",
            &[],
        )?;
        Ok(rows
            .iter()
            .map(|r| HostRow {
                name: r.get(0),
                added_at: r.get::<_, i64>(1) as u64,
                last_report: r.get::<_, Option<i64>>(2).map(|v| v as u64),
            })
            .collect())
    }

    /// See [`super::Db::tokens`].
    pub fn tokens(&self) -> Result<HashMap<TokenHash, String>> {
        let rows = self
            .client()?
            .query("SELECT token_sha256, name FROM hosts", &[])?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let h: &[u8] = r.get(0);
                Some((TokenHash::try_from(h).ok()?, r.get(1)))
            })
            .collect())
    }

    /// See [`super::Db::hosts_version`].
    pub fn hosts_version(&self) -> Result<i64> {
        let mut c = self.client()?;
        let st = self.statement(&mut c, "SELECT value FROM meta WHERE key = 'hosts_version'")?;
        Ok(c.query_one(&st, &[])?.get(0))
    }

    /// Every host's latest report (its summary), and the mark for [`Postgres::peer_reports`]:
    /// the oldest transaction running when the read began (every report stored below it is
    /// read here; one stored at or above it may be read again by the next peer read, which
    /// does no harm). Rows are taken as they arrive, not all held as rows first.
    pub fn latest_reports(&self) -> Result<(Vec<Latest>, i64)> {
        let mut c = self.client()?;
        let mark: i64 = c.query_one(HORIZON_SQL, &[])?.get(0);
        let mut out = Vec::new();
        let mut rows = c.query_raw(
            "SELECT host, received_at, sent_at, summary FROM reports",
            std::iter::empty::<&str>(),
        )?;
        while let Some(r) = rows.next()? {
            out.push(Latest {
                host: r.get(0),
                received_at: r.get::<_, i64>(1) as u64,
                sent_at: r.get::<_, i64>(2) as u64,
                summary: r.get(3),
            });
        }
        Ok((out, mark))
    }

    /// The reports other replicas stored since `mark` (their summaries), and the new mark.
    ///
    /// The replicas store at once, so a transaction that began first may commit last: a
    /// reader that took what it saw and moved on would skip it. So a read takes only rows
    /// written by transactions below the oldest one still running (the statement's snapshot
    /// `xmin`): all of those have ended, and none can write again. The next read starts
    /// there. A transaction that stays open holds the others' reads back (a replica frozen
    /// inside a store: at most about 5 s, when PostgreSQL ends its session), but loses
    /// nothing.
    pub fn peer_reports(&self, mark: i64, me: &str) -> Result<(Vec<Latest>, i64)> {
        let mut c = self.client()?;
        let st = self.statement(&mut c, PEER_SQL)?;
        let rows = c.query(&st, &[&mark, &me])?;
        let mut next = mark;
        let mut out = Vec::new();
        for r in &rows {
            next = next.max(r.get::<_, i64>(0));
            if let Some(host) = r.get::<_, Option<String>>(1) {
                out.push(Latest {
                    host,
                    received_at: r.get::<_, i64>(2) as u64,
                    sent_at: r.get::<_, i64>(3) as u64,
                    summary: r.get(4),
                });
            }
        }
        Ok((out, next))
    }

    /// See [`super::Db::report_bodies`].
    /// A body stored packed (migration 3: `packed`, with `report` empty) is unpacked; one
    /// stored as text is as it came; a damaged one is skipped (the host's next report
    /// replaces it), as on SQLite.
    pub fn report_bodies(&self, hosts: &[&str]) -> Result<Vec<LatestBody>> {
        let rows = self.client()?.query(
            "SELECT host, received_at, sent_at, report, packed FROM reports
             WHERE host = ANY($1)",
            &[&hosts],
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let host: String = r.get(0);
            let text: &str = r.get(3);
            let body = match r.get::<_, Option<&[u8]>>(4) {
                Some(packed) if text.is_empty() => {
                    match super::sqlite::unpack_stored(&host, packed) {
                        Some(body) => body,
                        None => continue,
                    }
                }
                _ => text.as_bytes().to_vec(),
            };
            out.push((
                host,
                r.get::<_, i64>(1) as u64,
                r.get::<_, i64>(2) as u64,
                body,
            ));
        }
        Ok(out)
    }

    /// See [`super::Db::put_summaries`]. Each row is written only if it still
    /// holds the report the summary was made of, and its `xid` is left alone (the other replicas
    /// do not read the row again).
    pub fn put_summaries(&mut self, rows: &[MadeSummary]) -> Result<()> {
        let mut c = self.client()?;
        let st = c.prepare(
            "UPDATE reports r SET summary = t.s
             FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bytea[]) AS t(h, ra, sa, s)
             WHERE r.host = t.h AND r.received_at = t.ra AND r.sent_at = t.sa",
        )?;
        for chunk in rows.chunks(ADD_HOSTS_CHUNK) {
            let hosts: Vec<&str> = chunk.iter().map(|r| r.0.as_str()).collect();
            let received: Vec<i64> = chunk.iter().map(|r| r.1 as i64).collect();
            let sent: Vec<i64> = chunk.iter().map(|r| r.2 as i64).collect();
            let sums: Vec<&[u8]> = chunk.iter().map(|r| r.3.as_slice()).collect();
            c.execute(&st, &[&hosts, &received, &sent, &sums])?;
        }
        Ok(())
    }

    /// See [`super::Db::store`]; `me` marks the reports as this replica's. A batch is one
    /// statement whatever its size (the reports, one row per host, the last of a host that
    /// reported twice, and their new events), and one more when event quotas are due.
    ///
    /// The replicas' batches run at once; no lock is shared by all of them (until migration 4
    /// a transaction advisory lock serialized them: 30% fewer reports per second). What it
    /// gave is kept another way:
    ///
    /// * the others read every report: each row carries its transaction's id, and a reader
    ///   reads below the oldest transaction still running ([`Postgres::peer_reports`]);
    /// * a removed host keeps no report: the insert locks each host's `hosts` row
    ///   (`FOR KEY SHARE`), so `remove_host`'s delete of that row waits for this batch to
    ///   commit and then deletes what it stored, and a batch that comes to the row after the
    ///   delete finds the host gone and skips it. A check that only read the row would not
    ///   do: a removal committing between that read and this commit would leave the report
    ///   behind;
    /// * two replicas storing reports of one host at once: the later commit wins, as before;
    ///   rows are locked in host order, so the two cannot deadlock.
    pub fn store(
        &mut self,
        batch: &[StoredReport<'_>],
        keep_per_host: u64,
        me: &str,
    ) -> Result<()> {
        // The last report of each host in the batch: one statement cannot update a row twice.
        let mut last: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
        for (i, r) in batch.iter().enumerate() {
            last.insert(r.host, i);
        }
        let mut hosts = Vec::with_capacity(last.len());
        let mut received = Vec::with_capacity(last.len());
        let mut sent = Vec::with_capacity(last.len());
        let mut bodies = Vec::with_capacity(last.len());
        let mut packed = Vec::with_capacity(last.len());
        let mut sums = Vec::with_capacity(last.len());
        for (i, r) in batch.iter().enumerate() {
            if last.get(r.host) != Some(&i) {
                continue;
            }
            hosts.push(r.host);
            received.push(r.received_at as i64);
            sent.push(r.sent_at as i64);
            // Packed: `report` empty, the frame in `packed` (migration 3).
            bodies.push(match r.packed_body {
                Some(_) => "",
                None => std::str::from_utf8(r.body).unwrap_or_default(),
            });
            packed.push(r.packed_body);
            sums.push(r.summary);
        }
        // The events of every report, in the batch's order (their ids follow it); the
        // statement keeps those of the hosts it stored. Made before the lock is taken.
        let mut e_host = Vec::new();
        let mut e_at = Vec::new();
        let mut e_service: Vec<Option<std::borrow::Cow<'_, str>>> = Vec::new();
        let mut e_kind = Vec::new();
        let mut e_message = Vec::new();
        let mut e_received = Vec::new();
        for r in batch {
            for e in r.new_events {
                e_host.push(r.host);
                e_at.push(e.at as i64);
                e_service.push(e.service.as_deref().map(text));
                e_kind.push(text(e.kind.as_str()));
                e_message.push(text(&e.message));
                e_received.push(r.received_at as i64);
            }
        }
        let mut c = self.client()?;
        let store = self.statement(&mut c, STORE_SQL).map_err(session_ended)?;
        let trim = self.statement(&mut c, QUOTA_SQL).map_err(session_ended)?;
        let mut tx = c.transaction().map_err(session_ended)?;
        let stored: HashSet<String> = tx
            .query(
                &store,
                &[
                    &hosts,
                    &received,
                    &sent,
                    &bodies,
                    &packed,
                    &sums,
                    &me,
                    &e_host,
                    &e_at,
                    &e_service,
                    &e_kind,
                    &e_message,
                    &e_received,
                ],
            )
            .map_err(session_ended)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut quota: Vec<&str> = batch
            .iter()
            .filter(|r| r.apply_quota && stored.contains(r.host))
            .map(|r| r.host)
            .collect();
        if !quota.is_empty() {
            quota.sort_unstable();
            quota.dedup();
            tx.execute(&trim, &[&quota, &(keep_per_host as i64)])
                .map_err(session_ended)?;
        }
        tx.commit().map_err(session_ended)?;
        Ok(())
    }

    /// See [`super::Db::prune`]: done only if no replica did it in the last `claim` seconds.
    ///
    /// As on SQLite, without an index of receive times: events get their ids as the replicas
    /// store them, so receive times follow ids but for seconds (a report waits for its batch,
    /// batches of two replicas interleave) and the replicas' clocks. What goes is the log's oldest part, up to the first event (by
    /// `id`) received since the cutoff, found by walking the primary key from its start.
    /// Every event dropped was received before the cutoff; one received before it but
    /// after a younger one waits for that one: retention is late, never early. An event
    /// stamped more than [`FUTURE_SLACK`] past `now` (a clock that went forward, then back)
    /// would stop the walk until that date: when the walk's first kept event is one, every
    /// such event is stamped `now` (one scan of the log, once per clock incident).
    pub fn prune(&mut self, now: u64, max_age_secs: u64, claim: u64) -> Result<Option<usize>> {
        let cutoff = now.saturating_sub(max_age_secs) as i64;
        let future = now.saturating_add(FUTURE_SLACK) as i64;
        let mut c = self.client()?;
        let mut tx = c.transaction()?;
        let claimed = tx.execute(
            "UPDATE meta SET value = $1 WHERE key = 'pruned_at' AND value <= $2",
            &[&(now as i64), &(now.saturating_sub(claim) as i64)],
        )?;
        if claimed == 0 {
            return Ok(None);
        }
        let first_kept: Option<i64> = tx
            .query_opt(
                "SELECT received_at FROM events WHERE received_at >= $1 ORDER BY id LIMIT 1",
                &[&cutoff],
            )?
            .map(|r| r.get(0));
        if first_kept.is_some_and(|t| t > future) {
            tx.execute(
                "UPDATE events SET received_at = $1 WHERE received_at > $2",
                &[&(now as i64), &future],
            )?;
        }
        let n = tx.execute(
            "DELETE FROM events WHERE id < coalesce(
                 (SELECT id FROM events WHERE received_at >= $1 ORDER BY id LIMIT 1),
                 (SELECT max(id) FROM events) + 1)",
            &[&cutoff],
        )?;
        tx.commit()?;
        Ok(Some(n as usize))
    }

    /// See [`super::Db::events`].
    pub fn events(&self, host: &str, limit: usize) -> Result<Vec<Event>> {
        let rows = self.client()?.query(
            "SELECT at, service, kind, message FROM events WHERE host = $1
             ORDER BY id DESC LIMIT $2",
            &[&host, &(limit as i64)],
        )?;
        Ok(rows
            .iter()
            .map(|r| Event {
                at: r.get::<_, i64>(0) as u64,
                service: r.get(1),
                kind: EventKind::parse(r.get::<_, &str>(2)),
                message: r.get(3),
            })
            .collect())
    }

    /// The latest `limit` events of each of `hosts`, newest first, in one query (an index
    /// walk per host).
    pub fn latest_events(&self, hosts: &[&str], limit: usize) -> Result<Vec<Vec<Event>>> {
        let names: Vec<&str> = hosts.to_vec();
        let rows = self.client()?.query(
            "SELECT h.i, e.at, e.service, e.kind, e.message
             FROM unnest($1::text[]) WITH ORDINALITY AS h(name, i)
             CROSS JOIN LATERAL (SELECT id, at, service, kind, message FROM events
                                 WHERE host = h.name ORDER BY id DESC LIMIT $2) e
             ORDER BY h.i, e.id DESC",
            &[&names, &(limit as i64)],
        )?;
        let mut out = vec![Vec::new(); hosts.len()];
        for r in &rows {
            let i = r.get::<_, i64>(0) as usize;
            if let Some(v) = out.get_mut(i.wrapping_sub(1)) {
                v.push(Event {
                    at: r.get::<_, i64>(1) as u64,
                    service: r.get(2),
                    kind: EventKind::parse(r.get::<_, &str>(3)),
                    message: r.get(4),
                });
            }
        }
        Ok(out)
    }

    /// The fleet's `limit` latest events with their hosts, newest first.
    pub fn recent_events(&self, limit: usize) -> Result<Vec<(String, Event)>> {
        let rows = self.client()?.query(
            "SELECT host, at, service, kind, message FROM events ORDER BY id DESC LIMIT $1",
            &[&(limit as i64)],
        )?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    Event {
                        at: r.get::<_, i64>(1) as u64,
                        service: r.get(2),
                        kind: EventKind::parse(r.get::<_, &str>(3)),
                        message: r.get(4),
                    },
                )
            })
            .collect())
    }

    /// How many events the log holds.
    #[cfg(test)]
    pub fn event_count(&self) -> Result<u64> {
        Ok(self
            .client()?
            .query_one("SELECT count(*) FROM events", &[])?
            .get::<_, i64>(0) as u64)
    }
}

/// The rollout gate's lease: a session advisory lock on a connection of its own. The replica
/// holding it evaluates the gates; when the replica dies its connection closes, and when it
/// freezes its keeper stops pinging and the server ends the idle session: either way the lock
/// is free for the next replica that asks.
pub struct Lease {
    url: PgUrl,
    /// The lease's session, shared with the keeper thread that pings it.
    session: Arc<Mutex<Option<Client>>>,
    held: bool,
    /// The last failure to open the session, said once.
    failure: Option<String>,
}

impl Lease {
    /// A lease not held yet, with its keeper thread (which ends when the lease is dropped).
    pub fn new(url: PgUrl) -> Lease {
        let session = Arc::new(Mutex::new(None));
        let weak = Arc::downgrade(&session);
        std::thread::Builder::new()
            .name("gate-lease".into())
            .spawn(move || keep_lease_alive(weak))
            .expect("spawning the gate lease's keeper thread");
        Lease {
            url,
            session,
            held: false,
            failure: None,
        }
    }

    /// Whether this replica holds the lease now: taken if free, checked alive if held (a
    /// connection that dropped, or a session the server ended after [`LEASE_IDLE_LIMIT`]
    /// because this process stood still, lost it). A lost session is replaced at once by a
    /// new one that asks for the lock again.
    pub fn hold(&mut self) -> bool {
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..2 {
            if session.as_ref().is_none_or(Client::is_closed) {
                self.held = false;
                *session = match self.url.connect_lease() {
                    Ok(c) => {
                        self.failure = None;
                        Some(c)
                    }
                    Err(e) => {
                        // Said once per distinct failure: a lease that can never be taken
                        // (say PostgreSQL before 14 refusing `idle_session_timeout`, or a
                        // pooler refusing startup options) must not stop the gates silently.
                        let why = format!("{e:#}");
                        if self.failure.as_deref() != Some(why.as_str()) {
                            eprintln!(
                                "keepup serve: the rollout gate's lease session cannot be \
                                 opened, so this replica cannot evaluate the gates: {why} \
                                 (the lease needs PostgreSQL 14 or later, reached without a \
                                 pooler that refuses startup options)"
                            );
                            self.failure = Some(why);
                        }
                        None
                    }
                };
            }
            let Some(c) = session.as_mut() else {
                return false;
            };
            let answer = if self.held {
                c.simple_query("SELECT 1").map(|_| true)
            } else {
                c.query_one("SELECT pg_try_advisory_lock($1)", &[&GATE_LOCK])
                    .map(|r| r.get::<_, bool>(0))
            };
            match answer {
                Ok(h) => {
                    self.held = h;
                    return h;
                }
                Err(_) => {
                    *session = None;
                    self.held = false;
                }
            }
        }
        false
    }

    /// Whether the lease is still held on the session that took it, without taking it again
    /// (the fence on each gate write: a lease lost and taken back since the tick began is not
    /// the same lease). A session that fails the check is dropped.
    pub fn still_held(&mut self) -> bool {
        if !self.held {
            return false;
        }
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let alive = session
            .as_mut()
            .is_some_and(|c| !c.is_closed() && c.simple_query("SELECT 1").is_ok());
        if !alive {
            *session = None;
            self.held = false;
        }
        alive
    }
}

/// The keeper: pings the lease's session every [`LEASE_PING`] so that only a process that
/// stands still lets it go idle; a session that fails the ping is dropped (the next
/// [`Lease::hold`] finds it gone). Returns once the lease is dropped.
fn keep_lease_alive(session: Weak<Mutex<Option<Client>>>) {
    loop {
        std::thread::sleep(LEASE_PING);
        let Some(session) = session.upgrade() else {
            return;
        };
        let mut s = session.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = s.as_mut() {
            if c.is_closed() || c.simple_query("SELECT 1").is_err() {
                *s = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_password() {
        let u = PgUrl::parse("postgres://keepup:s3cret@db1:5433/fleet").unwrap();
        assert_eq!(u.to_string(), "postgres://keepup@db1:5433/fleet");
        assert!(!format!("{u:?}").contains("s3cret"));
        let u =
            PgUrl::parse("postgresql://ops@db1,db2/fleet?target_session_attrs=read-write").unwrap();
        assert_eq!(u.to_string(), "postgres://ops@db1:5432,db2:5432/fleet");
        assert!(PgUrl::parse("postgres://db1/fleet")
            .unwrap_err()
            .contains("no user"));
        // libpq's TLS parameters are read (and left out of what the driver parses).
        let u = PgUrl::parse("postgres://u@db1/fleet?sslmode=require&connect_timeout=3").unwrap();
        assert_eq!(
            (u.ssl_mode(), u.config.get_connect_timeout()),
            ("require", Some(&Duration::from_secs(3)))
        );
        assert!(u.warning().unwrap().contains("not checked"));
        assert!(PgUrl::parse("postgres://u@db1/fleet?sslmode=verify-ca")
            .unwrap_err()
            .contains("add sslrootcert=FILE"));
        assert!(PgUrl::parse(
            "postgres://u@db1/fleet?sslmode=verify-full&sslrootcert=/nonexistent"
        )
        .unwrap_err()
        .contains("/nonexistent"));
        assert!(PgUrl::parse("postgres://u@db1/fleet?sslcert=/x.pem")
            .unwrap_err()
            .contains("client certificate"));
        assert!(PgUrl::parse("postgres://u@db1/fleet?sslmode=maybe")
            .unwrap_err()
            .contains("verify-full"));
        // keepup's default: plaintext on this machine only, verify-full elsewhere.
        for (url, mode) in [
            ("postgres://u@db1/fleet", "verify-full"),
            ("postgres://u@127.0.0.1/fleet", "disable"),
            ("postgres://u@[::1]:5432/fleet", "disable"),
            ("postgres://u@localhost,db2/fleet", "verify-full"),
            ("postgres://u@%2Frun%2Fpostgresql/fleet", "disable"),
            // The driver connects to `hostaddr`: a remote one is not this machine.
            (
                "postgres://u@localhost/fleet?hostaddr=10.0.0.9",
                "verify-full",
            ),
            ("postgres://u@localhost/fleet?hostaddr=127.0.0.1", "disable"),
        ] {
            if std::env::var_os("PGSSLMODE").is_none() {
                let u = PgUrl::parse(url).unwrap();
                assert_eq!(u.ssl_mode(), mode, "{url}");
                assert!(u.warning().is_none(), "{url}");
            }
        }
        // A Unix socket gets no TLS (as with libpq), so nothing of TLS is set up for a URL
        // of sockets alone; a TCP host beside one keeps it.
        for url in [
            "postgres://u@%2Frun%2Fpostgresql/fleet?sslmode=verify-full&sslrootcert=/nonexistent",
            "postgres:///fleet?host=/run/postgresql&user=u&sslmode=require",
        ] {
            let u = PgUrl::parse(url).unwrap();
            assert!(u.tls.is_none() && is_socket(&u.config, 0), "{url}");
        }
        let u = PgUrl::parse("postgres://u@%2Frun%2Fpostgresql,db1/fleet?sslmode=require").unwrap();
        assert!(u.tls.is_some() && is_socket(&u.config, 0) && !is_socket(&u.config, 1));
        let one = one_host(&u.config, 1);
        assert_eq!(
            (one.get_hosts(), one.get_user()),
            (&[Host::Tcp("db1".into())][..], Some("u"))
        );
        assert_eq!(one.get_options(), u.config.get_options());
        let loud = PgUrl::parse("postgres://u@db1/fleet?sslmode=disable").unwrap();
        assert!(loud.warning().unwrap().contains("NOT ENCRYPTED"));
        let loud =
            PgUrl::parse("postgres://u@localhost/fleet?hostaddr=10.0.0.9&sslmode=disable").unwrap();
        assert!(loud.warning().unwrap().contains("NOT ENCRYPTED"));
        assert!(PgUrl::parse("postgres://u@db1/fleet?nonsense=1")
            .unwrap_err()
            .contains("not a PostgreSQL URL"));
    }

    #[test]
    fn password_file_lines_match_like_libpq() {
        let file = "# comment\n\
                    other:5432:*:keepup:no\n\
                    db1:5432:fleet:keepup:pa\\:ss\\\\word\n\
                    *:*:*:*:fallback\n";
        assert_eq!(
            pgpass_lookup(file, "db1", 5432, "fleet", "keepup").as_deref(),
            Some("pa:ss\\word")
        );
        assert_eq!(
            pgpass_lookup(file, "db2", 5432, "fleet", "keepup").as_deref(),
            Some("fallback")
        );
        assert_eq!(pgpass_lookup("db1:5432:x:y\n", "db1", 5432, "x", "y"), None);
    }
}
