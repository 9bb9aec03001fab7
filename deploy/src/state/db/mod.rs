//! The fleet state database: registered hosts with the SHA-256 of their token, the latest
//! report of each host, and the event log with its retention (by the server's receive time,
//! and a quota per host so no host can evict another's history).
//!
//! Two backends behind one [`Db`]: SQLite (one file, the default, one server) and PostgreSQL
//! (`--state postgres://...`, shared by several `keepup serve` replicas). `keepup host` edits
//! hosts while servers run; a counter in `meta` tells every server that the host list changed.
//! With PostgreSQL each replica also picks up the reports the others stored
//! ([`Db::peer_reports`]), one replica at a time applies the age retention ([`Db::prune`]), and
//! one holds the rollout gate's lease ([`Lease`]).

mod postgres;
mod sqlite;

use std::cell::Cell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::Result;
use sha2::{Digest as _, Sha256};

use keepup_deploy::wire::Event;

use self::postgres::Postgres;
pub use self::postgres::{Lease, PgUrl};
use self::sqlite::Sqlite;

/// SHA-256 of a host token: what the database keeps instead of the token.
pub type TokenHash = [u8; 32];

/// Hash a token as presented by an agent.
pub fn token_hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// A fresh random token: 32 bytes from the OS, hex.
pub fn new_token() -> String {
    use rand::RngCore as _;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// This process's name among the replicas sharing a database (random, made once): a replica
/// skips its own reports when it reads what the others stored.
pub fn replica_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| new_token()[..16].to_string())
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where the fleet state lives: the `--state` argument of `keepup serve` and `keepup host`.
#[derive(Debug, Clone)]
pub enum Location {
    /// A SQLite file (created if missing).
    File(PathBuf),
    /// A PostgreSQL database.
    Postgres(Box<PgUrl>),
}

impl Location {
    /// `postgres://` or `postgresql://` URLs name a PostgreSQL database; anything else is a
    /// SQLite file path.
    pub fn parse(s: &str) -> Result<Location, String> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            PgUrl::parse(s).map(|u| Location::Postgres(Box::new(u)))
        } else if s.is_empty() {
            Err("--state needs a SQLite file path or a postgres:// URL".into())
        } else {
            Ok(Location::File(PathBuf::from(s)))
        }
    }

    /// The rollout gate's lease: `None` with SQLite (one server, always the gate).
    pub fn gate_lease(&self) -> Option<Lease> {
        match self {
            Location::File(_) => None,
            Location::Postgres(u) => Some(Lease::new(u.as_ref().clone())),
        }
    }
}

/// clap's parser for `--state`. clap's own error for a bad value repeats the value, which for
/// a URL may hold a password; this one names only what is wrong.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocationArg;

impl clap::builder::TypedValueParser for LocationArg {
    type Value = Location;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Location, clap::Error> {
        let bad = |why: String| {
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{why}\n"))
        };
        let s = value
            .to_str()
            .ok_or_else(|| bad("--state: the value is not UTF-8".into()))?;
        Location::parse(s).map_err(bad)
    }
}

/// Shown in messages: the path, or the URL without its password.
impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::File(p) => write!(f, "{}", p.display()),
            Location::Postgres(u) => write!(f, "{u}"),
        }
    }
}

/// One registered host, for `keepup host list`.
#[derive(Debug, Clone)]
pub struct HostRow {
    /// Host name.
    pub name: String,
    /// Unix time its (current) token was issued.
    pub added_at: u64,
    /// Unix time of its latest stored report.
    pub last_report: Option<u64>,
}

/// A report the writer stores: the host, when it arrived, its send time, the body as received,
/// its summary, the events not stored before, and whether to apply the host's event quota
/// after them.
pub struct StoredReport<'a> {
    /// Host name (already checked against the token).
    pub host: &'a str,
    /// Unix time the server received it.
    pub received_at: u64,
    /// The agent's `sent_at`.
    pub sent_at: u64,
    /// The JSON body.
    pub body: &'a [u8],
    /// The body as [`pack_body`] compressed it, for a backend that stores it so
    /// ([`Db::packs_bodies`]); `None`: the body is stored as it came.
    pub packed_body: Option<&'a [u8]>,
    /// The host's summary and event window, encoded (`state::summary_codec`): what a server
    /// reads at start and from other replicas instead of the body.
    pub summary: &'a [u8],
    /// Events to append to the log.
    pub new_events: &'a [Event],
    /// Drop the host's oldest events beyond the quota ([`Db::store`]'s `keep_per_host`).
    pub apply_quota: bool,
}

/// A report body compressed as the backends store it (a zstd frame: the reports table, its
/// WAL writes and checkpoints are a third of what the JSON takes). Made by the request's
/// thread, beside the one writer ([`StoredReport::packed_body`]). `None` should zstd fail: the
/// body is then stored as it came.
pub fn pack_body(body: &[u8]) -> Option<Vec<u8>> {
    sqlite::pack_body(body)
}

/// A stored latest report as a server loads it: its host, times and summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latest {
    /// Host name.
    pub host: String,
    /// Unix time the server received it.
    pub received_at: u64,
    /// The agent's `sent_at`.
    pub sent_at: u64,
    /// The encoded summary; none when a keepup from before summaries stored the report.
    pub summary: Option<Vec<u8>>,
}

/// A stored latest report in full: (host, received_at, sent_at, JSON body).
pub type LatestBody = (String, u64, u64, Vec<u8>);

/// A summary made from a stored body, to store: (host, received_at, sent_at, summary).
pub type MadeSummary = (String, u64, u64, Vec<u8>);

enum Backend {
    Sqlite(Sqlite),
    Postgres(Box<Postgres>),
}

/// An open state database.
pub struct Db {
    backend: Backend,
    /// Reads of the database through this handle (a test hook shows that unknown tokens cost
    /// none).
    queries: Cell<u64>,
}

/// Calls the same method on whichever backend is open.
macro_rules! dispatch {
    ($self:expr, $b:ident => $e:expr) => {
        match $self {
            Backend::Sqlite($b) => $e,
            Backend::Postgres($b) => $e,
        }
    };
}

impl Db {
    /// Open the state at `at`: a SQLite file is created if missing; a PostgreSQL database
    /// gets its schema migrations applied (once, whatever the number of replicas starting).
    pub fn open(at: &Location) -> Result<Db> {
        let backend = match at {
            Location::File(p) => Backend::Sqlite(Sqlite::open(p)?),
            Location::Postgres(u) => Backend::Postgres(Box::new(Postgres::open(u)?)),
        };
        Ok(Db {
            backend,
            queries: Cell::new(0),
        })
    }

    /// Open a SQLite file.
    #[cfg(test)]
    pub fn open_file(path: &std::path::Path) -> Result<Db> {
        Db::open(&Location::File(path.to_path_buf()))
    }

    /// Count one read (see [`Db::queries`]).
    fn read(&self) -> &Backend {
        self.queries.set(self.queries.get() + 1);
        &self.backend
    }

    /// How many times this handle read the database.
    pub fn queries(&self) -> u64 {
        self.queries.get()
    }

    /// Register hosts (or replace their tokens); returns each name with its new token and
    /// whether it replaced an older one. One transaction for all.
    pub fn add_hosts(&mut self, names: &[String]) -> Result<Vec<(String, String, bool)>> {
        dispatch!(&mut self.backend, b => b.add_hosts(names))
    }

    /// Forget a host: its token, latest report and events. False if it was not registered.
    pub fn remove_host(&mut self, name: &str) -> Result<bool> {
        dispatch!(&mut self.backend, b => b.remove_host(name))
    }

    /// Every registered host, by name.
    pub fn hosts(&self) -> Result<Vec<HostRow>> {
        dispatch!(self.read(), b => b.hosts())
    }

    /// Token hash -> host name, for every registered host.
    pub fn tokens(&self) -> Result<HashMap<TokenHash, String>> {
        dispatch!(self.read(), b => b.tokens())
    }

    /// Changes whenever hosts are added or removed.
    pub fn hosts_version(&self) -> Result<i64> {
        dispatch!(self.read(), b => b.hosts_version())
    }

    /// The latest report of every host (its summary, not its body), and the mark to give
    /// [`Db::peer_reports`] next.
    pub fn latest_reports(&self) -> Result<(Vec<Latest>, i64)> {
        match self.read() {
            Backend::Sqlite(b) => Ok((b.latest_reports()?, 0)),
            Backend::Postgres(b) => b.latest_reports(),
        }
    }

    /// The stored bodies of the latest reports of `hosts` (those whose summary is missing or
    /// out of date); hosts with none are left out.
    pub fn report_bodies(&self, hosts: &[&str]) -> Result<Vec<LatestBody>> {
        dispatch!(self.read(), b => b.report_bodies(hosts))
    }

    /// Store summaries made from bodies: each `(host, received_at, sent_at, summary)` is
    /// written only if the host's stored report still has those times (a newer report keeps
    /// its own).
    pub fn put_summaries(&mut self, rows: &[MadeSummary]) -> Result<()> {
        dispatch!(&mut self.backend, b => b.put_summaries(rows))
    }

    /// Checkpoint a SQLite file's WAL on a thread of its own rather than in this handle's
    /// commits (the server's writer); nothing to do on PostgreSQL.
    pub fn checkpoint_aside(&mut self) -> Result<()> {
        match &mut self.backend {
            Backend::Sqlite(b) => b.checkpoint_aside(),
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// Whether this backend stores report bodies packed ([`pack_body`]): both do
    /// (PostgreSQL since its migration 3).
    pub fn packs_bodies(&self) -> bool {
        matches!(self.backend, Backend::Sqlite(_) | Backend::Postgres(_))
    }

    /// Whether other replicas may store reports in this database (PostgreSQL).
    pub fn has_peers(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// The latest reports other replicas stored after `mark`, and the new mark (PostgreSQL;
    /// a SQLite file has one server, so nothing).
    pub fn peer_reports(&self, mark: i64) -> Result<(Vec<Latest>, i64)> {
        match &self.backend {
            Backend::Sqlite(_) => Ok((Vec::new(), mark)),
            Backend::Postgres(b) => b.peer_reports(mark, replica_id()),
        }
    }

    /// Store a batch of reports in one transaction: each replaces its host's latest report
    /// and appends its new events (stamped with the receive time); a report with
    /// `apply_quota` then drops its host's oldest events beyond `keep_per_host`. A report of
    /// a host removed meanwhile is dropped.
    pub fn store(&mut self, batch: &[StoredReport<'_>], keep_per_host: u64) -> Result<()> {
        match &mut self.backend {
            Backend::Sqlite(b) => b.store(batch, keep_per_host),
            Backend::Postgres(b) => b.store(batch, keep_per_host, replica_id()),
        }
    }

    /// Apply the age retention: drop events received more than `max_age_secs` before `now`
    /// (server time: a host's clock cannot keep its events forever or age them out early).
    /// Returns how many were dropped, or `None` when another replica applied it less than
    /// [`PRUNE_CLAIM`] seconds ago (retention is not done twice).
    pub fn prune(&mut self, now: u64, max_age_secs: u64) -> Result<Option<usize>> {
        match &mut self.backend {
            Backend::Sqlite(b) => b.prune(now, max_age_secs).map(Some),
            Backend::Postgres(b) => b.prune(now, max_age_secs, PRUNE_CLAIM),
        }
    }

    /// A host's latest `limit` events, newest (last received) first.
    pub fn events(&self, host: &str, limit: usize) -> Result<Vec<Event>> {
        dispatch!(self.read(), b => b.events(host, limit))
    }

    /// How many events the log holds.
    /// The latest `limit` events of each of `hosts` (in that order), newest first.
    pub fn latest_events(&self, hosts: &[&str], limit: usize) -> Result<Vec<Vec<Event>>> {
        dispatch!(self.read(), b => b.latest_events(hosts, limit))
    }

    /// The fleet's `limit` latest events with their hosts, newest first.
    pub fn recent_events(&self, limit: usize) -> Result<Vec<(String, Event)>> {
        dispatch!(self.read(), b => b.recent_events(limit))
    }

    #[cfg(test)]
    pub fn event_count(&self) -> Result<u64> {
        dispatch!(self.read(), b => b.event_count())
    }
}

/// With PostgreSQL, the age retention runs at most once per this many seconds across all
/// replicas (each replica asks every minute; the first to claim the turn does it).
pub const PRUNE_CLAIM: u64 = 50;
