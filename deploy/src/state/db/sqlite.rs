//! The SQLite backend of the fleet state (one file, the default): one server at a time. A
//! counter in `meta` tells the server that `keepup host` changed the host list.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, OptionalExtension as _};

use keepup_deploy::wire::{Event, EventKind};

use super::{
    new_token, now, token_hash, HostRow, Latest, LatestBody, MadeSummary, StoredReport, TokenHash,
};
use std::collections::HashMap;

/// Page cache of each connection, KiB.
const SQLITE_CACHE_KIB: i64 = 64 * 1024;

/// An open SQLite state database.
pub struct Sqlite {
    conn: Connection,
    /// The file, for the checkpoint thread's own connection.
    path: std::path::PathBuf,
    /// Held while a checkpoint thread works for this connection ([`Sqlite::checkpoint_aside`]);
    /// the thread ends when it sees the handle gone.
    checkpointer: Option<std::sync::Arc<()>>,
}

/// How often the checkpoint thread copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// WAL pages past which a commit checkpoints by itself even with a checkpoint thread (a
/// thread that fell behind; about 256 MB of 4 KiB pages): the WAL stays bounded.
const WAL_BACKSTOP_PAGES: i64 = 65_536;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS hosts (
    name TEXT PRIMARY KEY,
    token_sha256 BLOB NOT NULL UNIQUE,
    added_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    host TEXT PRIMARY KEY,
    received_at INTEGER NOT NULL,
    sent_at INTEGER NOT NULL,
    report TEXT NOT NULL,
    summary BLOB
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    host TEXT NOT NULL,
    at INTEGER NOT NULL,
    service TEXT,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    received_at INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta(key, value) VALUES ('hosts_version', 0);
";

/// Indexes, made after [`migrate`] added the columns they use: a host's events in the order
/// received (the events API, the per-host quota). The age retention needs none: events are
/// appended in the order received, so it walks the log by `id` ([`Sqlite::prune`]); the
/// index of receive times that older files have (one more b-tree write per event) goes.
const INDEXES: &str = "
DROP INDEX IF EXISTS events_host_at;
DROP INDEX IF EXISTS events_at;
DROP INDEX IF EXISTS events_received;
CREATE INDEX IF NOT EXISTS events_host_id ON events(host, id);
";

/// Databases made before events had `received_at` get the column, filled with the host's
/// event time (the best known); those made before reports had a `summary` get the column,
/// empty (the server fills it from the bodies at its first start).
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let has = |table: &str, column: &str| -> rusqlite::Result<bool> {
        tx.prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
            .exists([table, column])
    };
    if !has("events", "received_at")? {
        tx.execute_batch(
            "ALTER TABLE events ADD COLUMN received_at INTEGER NOT NULL DEFAULT 0;
             UPDATE events SET received_at = at;",
        )?;
    }
    if !has("reports", "summary")? {
        tx.execute_batch("ALTER TABLE reports ADD COLUMN summary BLOB;")?;
    }
    tx.execute_batch(INDEXES)?;
    tx.commit()
}

/// zstd's level for packed bodies: its first "fast" level, which leaves literals without
/// Huffman coding: a 1.7 KB report packs to about 610 bytes (level 1: 480) at twice level 1's
/// speed; on the request threads, the CPU is worth more than the bytes.
const PACK_LEVEL: i32 = -1;

/// How far past the server's clock an event's receive time may be before retention takes it
/// for a clock that jumped forward and then back (see [`Db::prune`]).
const FUTURE_SLACK: u64 = 300;

/// See [`super::pack_body`]. Each thread keeps its compression context (made once: making
/// one per body would cost more than the compression).
pub fn pack_body(body: &[u8]) -> Option<Vec<u8>> {
    thread_local! {
        static PACKER: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    PACKER.with(|p| {
        let mut p = p.borrow_mut();
        if p.is_none() {
            *p = zstd::bulk::Compressor::new(PACK_LEVEL).ok();
        }
        p.as_mut()?.compress(body).ok()
    })
}

/// A packed body's JSON.
fn unpack_body(packed: &[u8]) -> Result<Vec<u8>> {
    zstd::stream::decode_all(packed).context("unpacking a stored report body")
}

/// `host`'s stored packed body, unpacked; a damaged one is skipped with a message, not fatal:
/// failing would stop the server from starting, and the host's next report (which replaces
/// it) could then never arrive.
pub(super) fn unpack_stored(host: &str, packed: &[u8]) -> Option<Vec<u8>> {
    unpack_body(packed)
        .inspect_err(|e| {
            eprintln!(
                "keepup: the stored report of {host} is damaged ({e:#}): skipped; the host \
                 shows no report until its next one replaces it"
            )
        })
        .ok()
}

impl Sqlite {
    /// Open (creating if needed) the database at `path`: WAL journal, `synchronous=NORMAL`
    /// (a commit survives a crash of the process; the last commits may be lost on power loss).
    pub fn open(path: &Path) -> Result<Sqlite> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening the state database {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // The indexes of a million hosts are tens of megabytes each: a cache they fit in
        // (the default is 2 MB) spares the writer a read per index level and row.
        conn.pragma_update(None, "cache_size", -SQLITE_CACHE_KIB)?;
        let mut conn = conn;
        conn.execute_batch(SCHEMA)
            .and_then(|()| migrate(&mut conn))
            .with_context(|| {
                format!(
                    "{} is not a keepup state database (or is damaged)",
                    path.display()
                )
            })?;
        Ok(Sqlite {
            conn,
            path: path.to_path_buf(),
            checkpointer: None,
        })
    }

    /// Checkpoint the WAL on a thread of its own instead of in this connection's commits (the
    /// server's writer): a commit then only appends to the WAL, and the copy into the database
    /// file with its `fsync` runs beside it. Durability is unchanged: with `synchronous=NORMAL`
    /// a commit is in the WAL (safe from a crash of the process) either way, and a checkpoint
    /// syncs the WAL before it copies. The thread checkpoints `PASSIVE`ly (never waiting for
    /// the writer) every [`CHECKPOINT_EVERY`]; should it fall behind, this connection's
    /// commits checkpoint again past [`WAL_BACKSTOP_PAGES`].
    pub fn checkpoint_aside(&mut self) -> Result<()> {
        if self.checkpointer.is_some() {
            return Ok(());
        }
        let other = Connection::open(&self.path)?;
        other.busy_timeout(Duration::from_secs(10))?;
        self.conn
            .pragma_update(None, "wal_autocheckpoint", WAL_BACKSTOP_PAGES)?;
        let alive = std::sync::Arc::new(());
        let watch = std::sync::Arc::downgrade(&alive);
        std::thread::Builder::new()
            .name("state-checkpoint".into())
            .spawn(move || {
                while watch.upgrade().is_some() {
                    std::thread::sleep(CHECKPOINT_EVERY);
                    if let Err(e) =
                        other.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        eprintln!("keepup serve: checkpointing the state database: {e}");
                    }
                }
            })
            .context("starting the state database's checkpoint thread")?;
        self.checkpointer = Some(alive);
        Ok(())
    }

    fn conn(&self) -> &Connection {
        &self.conn
    }

    fn bump_hosts_version(tx: &rusqlite::Transaction<'_>) -> Result<()> {
        tx.execute(
            "UPDATE meta SET value = value + 1 WHERE key = 'hosts_version'",
            [],
        )?;
        Ok(())
    }

    /// Register hosts (or replace their tokens); returns each name with its new token and
    /// whether it replaced an older one. One transaction for all.
    pub fn add_hosts(&mut self, names: &[String]) -> Result<Vec<(String, String, bool)>> {
        let tx = self.conn.transaction()?;
        let mut out = Vec::with_capacity(names.len());
        {
            let mut exists = tx.prepare("SELECT 1 FROM hosts WHERE name = ?1")?;
            let mut upsert = tx.prepare(
                "INSERT INTO hosts(name, token_sha256, added_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET token_sha256 = excluded.token_sha256,
                 added_at = excluded.added_at",
            )?;
            let t = now();
            for name in names {
                let replaced = exists.exists([name])?;
                let token = new_token();
                upsert.execute(params![name, &token_hash(&token)[..], t as i64])?;
                out.push((name.clone(), token, replaced));
            }
        }
        Self::bump_hosts_version(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Forget a host: its token, latest report and events. False if it was not registered.
    pub fn remove_host(&mut self, name: &str) -> Result<bool> {
        let tx = self.conn.transaction()?;
        let n = tx.execute("DELETE FROM hosts WHERE name = ?1", [name])?;
        tx.execute("DELETE FROM reports WHERE host = ?1", [name])?;
        tx.execute("DELETE FROM events WHERE host = ?1", [name])?;
        Self::bump_hosts_version(&tx)?;
        tx.commit()?;
        Ok(n > 0)
    }

    /// Every registered host, by name.
    pub fn hosts(&self) -> Result<Vec<HostRow>> {
        let mut st = self.conn().prepare(
            "SELECT h.name, h.added_at, r.received_at FROM hosts h
             LEFT JOIN reports r ON r.host = h.name ORDER BY h.name",
        )?;
        let rows = st.query_map([], |r| {
            Ok(HostRow {
                name: r.get(0)?,
                added_at: r.get::<_, i64>(1)? as u64,
                last_report: r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Token hash -> host name, for every registered host.
    pub fn tokens(&self) -> Result<HashMap<TokenHash, String>> {
        let mut st = self
            .conn()
            .prepare("SELECT token_sha256, name FROM hosts")?;
        let rows = st.query_map([], |r| {
            let h: Vec<u8> = r.get(0)?;
            Ok((h, r.get::<_, String>(1)?))
        })?;
        let mut map = HashMap::new();
        for row in rows {
            let (h, name) = row?;
            if let Ok(h) = TokenHash::try_from(h.as_slice()) {
                map.insert(h, name);
            }
        }
        Ok(map)
    }

    /// Changes whenever hosts are added or removed.
    pub fn hosts_version(&self) -> Result<i64> {
        Ok(self
            .conn()
            .prepare_cached("SELECT value FROM meta WHERE key = 'hosts_version'")?
            .query_row([], |r| r.get(0))?)
    }

    /// The latest report of every host, its summary and not its body.
    pub fn latest_reports(&self) -> Result<Vec<Latest>> {
        let mut st = self
            .conn()
            .prepare("SELECT host, received_at, sent_at, summary FROM reports")?;
        let rows = st.query_map([], |r| {
            Ok(Latest {
                host: r.get(0)?,
                received_at: r.get::<_, i64>(1)? as u64,
                sent_at: r.get::<_, i64>(2)? as u64,
                summary: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// See [`super::Db::report_bodies`]: a body stored packed (a blob, [`pack_body`]) is
    /// unpacked; one stored as text (by an older keepup, or unpacked) is as it came.
    pub fn report_bodies(&self, hosts: &[&str]) -> Result<Vec<LatestBody>> {
        let mut st = self.conn().prepare_cached(
            "SELECT host, received_at, sent_at, report FROM reports WHERE host = ?1",
        )?;
        let mut out = Vec::new();
        for h in hosts {
            let mut rows = st.query([h])?;
            if let Some(r) = rows.next()? {
                let body = match r.get_ref(3)? {
                    ValueRef::Text(t) => t.to_vec(),
                    ValueRef::Blob(b) => match unpack_stored(h, b) {
                        Some(body) => body,
                        None => continue,
                    },
                    _ => {
                        eprintln!(
                            "keepup: the stored report of {h} is neither text nor a packed \
                             body: skipped; the host shows no report until its next one \
                             replaces it"
                        );
                        continue;
                    }
                };
                out.push((
                    r.get(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                    body,
                ));
            }
        }
        Ok(out)
    }

    /// See [`super::Db::put_summaries`].
    pub fn put_summaries(&mut self, rows: &[MadeSummary]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "UPDATE reports SET summary = ?4
                 WHERE host = ?1 AND received_at = ?2 AND sent_at = ?3",
            )?;
            for (host, received_at, sent_at, summary) in rows {
                st.execute(params![host, *received_at as i64, *sent_at as i64, summary])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Store a batch of reports in one transaction: each replaces its host's latest report
    /// and appends its new events (stamped with the receive time); a report with
    /// `apply_quota` then drops its host's oldest events beyond `keep_per_host`. A report of
    /// a host removed meanwhile is dropped.
    pub fn store(&mut self, batch: &[StoredReport<'_>], keep_per_host: u64) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO reports(host, received_at, sent_at, report, summary)
                 SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS (SELECT 1 FROM hosts WHERE name = ?1)
                 ON CONFLICT(host) DO UPDATE SET received_at = excluded.received_at,
                 sent_at = excluded.sent_at, report = excluded.report,
                 summary = excluded.summary",
            )?;
            let mut event = tx.prepare_cached(
                "INSERT INTO events(host, at, service, kind, message, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut quota = tx.prepare_cached(
                "DELETE FROM events WHERE host = ?1 AND id <= (SELECT id FROM events
                 WHERE host = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            )?;
            for r in batch {
                let body = ToSqlOutput::Borrowed(match r.packed_body {
                    Some(packed) => ValueRef::Blob(packed),
                    None => ValueRef::Text(r.body),
                });
                let n = upsert.execute(params![
                    r.host,
                    r.received_at as i64,
                    r.sent_at as i64,
                    body,
                    r.summary
                ])?;
                if n == 0 {
                    continue;
                }
                for e in r.new_events {
                    event.execute(params![
                        r.host,
                        e.at as i64,
                        e.service,
                        e.kind.as_str(),
                        e.message,
                        r.received_at as i64
                    ])?;
                }
                if r.apply_quota {
                    quota.execute(params![r.host, keep_per_host as i64])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// See [`super::Db::prune`] (one server: nothing to claim). One writer appends events
    /// in the order it receives them, so the log's ids follow receive times: what goes is the
    /// log's oldest part, up to the first event received since the cutoff, found by walking
    /// the log by `id` from its start (a few rows past what is dropped, no index). Should
    /// receive times not follow ids (the server's clock set back; a file migrated from
    /// before receive times, which took the hosts' times), an event received before the
    /// cutoff but after a younger one waits for that one: retention is late, never early.
    /// An event stamped in the future (more than [`FUTURE_SLACK`] past `now`: the clock went
    /// forward, then back) would stop the walk until that date: when the walk's first kept
    /// event is one, every such event is stamped `now` (one scan of the log, once per clock
    /// incident), so they are kept for the whole age from now: late, never early.
    pub fn prune(&mut self, now: u64, max_age_secs: u64) -> Result<usize> {
        let cutoff = now.saturating_sub(max_age_secs) as i64;
        let future = now.saturating_add(FUTURE_SLACK) as i64;
        let first_kept: Option<i64> = self
            .conn
            .query_row(
                "SELECT received_at FROM events WHERE received_at >= ?1 ORDER BY id LIMIT 1",
                [cutoff],
                |r| r.get(0),
            )
            .optional()?;
        if first_kept.is_some_and(|t| t > future) {
            self.conn.execute(
                "UPDATE events SET received_at = ?1 WHERE received_at > ?2",
                [now as i64, future],
            )?;
        }
        Ok(self.conn.execute(
            "DELETE FROM events WHERE id < coalesce(
                 (SELECT id FROM events WHERE received_at >= ?1 ORDER BY id LIMIT 1),
                 (SELECT max(id) FROM events) + 1)",
            [cutoff],
        )?)
    }

    /// A host's latest `limit` events, newest (last received) first.
    pub fn events(&self, host: &str, limit: usize) -> Result<Vec<Event>> {
        let mut st = self.conn().prepare_cached(
            "SELECT at, service, kind, message FROM events WHERE host = ?1
             ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![host, limit as i64], |r| {
            Ok(Event {
                at: r.get::<_, i64>(0)? as u64,
                service: r.get(1)?,
                kind: EventKind::parse(&r.get::<_, String>(2)?),
                message: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The latest `limit` events of each of `hosts`, newest first (one index walk per host).
    pub fn latest_events(&self, hosts: &[&str], limit: usize) -> Result<Vec<Vec<Event>>> {
        hosts.iter().map(|h| self.events(h, limit)).collect()
    }

    /// The fleet's `limit` latest events with their hosts, newest (last received) first.
    pub fn recent_events(&self, limit: usize) -> Result<Vec<(String, Event)>> {
        let mut st = self.conn().prepare_cached(
            "SELECT host, at, service, kind, message FROM events ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = st.query_map(params![limit as i64], |r| {
            Ok((
                r.get(0)?,
                Event {
                    at: r.get::<_, i64>(1)? as u64,
                    service: r.get(2)?,
                    kind: EventKind::parse(&r.get::<_, String>(3)?),
                    message: r.get(4)?,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many events the log holds.
    #[cfg(test)]
    pub fn event_count(&self) -> Result<u64> {
        Ok(self
            .conn()
            .query_row("SELECT count(*) FROM events", [], |r| r.get::<_, i64>(0))?
            as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Db;
    use super::*;

    fn ev(at: u64, kind: &str) -> Event {
        Event {
            at,
            service: Some("foo".into()),
            kind: kind.into(),
            message: format!("{kind} at {at}"),
        }
    }

    #[test]
    fn events_of_older_databases_get_a_receive_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE events (id INTEGER PRIMARY KEY, host TEXT NOT NULL, at INTEGER NOT NULL,
             service TEXT, kind TEXT NOT NULL, message TEXT NOT NULL);
             CREATE INDEX events_at ON events(at);
             INSERT INTO events(host, at, kind, message) VALUES ('web1', 500, 'install', 'm');",
        )
        .unwrap();
        drop(old);
        let mut db = Db::open_file(&path).unwrap();
        assert_eq!(db.events("web1", 10).unwrap()[0].at, 500);
        // Its receive time is taken from its own time (500).
        assert_eq!(db.prune(600, 200).unwrap(), Some(0));
        assert_eq!(db.prune(800, 200).unwrap(), Some(1));
        drop(db);
        Db::open_file(&path).unwrap();
    }

    /// A file as keepup stored it before the index of receive times went (the schema of
    /// then, verbatim): it opens with the same hosts, reports and events, without the index,
    /// and its retention still goes by receive time.
    #[test]
    fn files_with_the_receive_time_index_open_with_the_same_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE hosts (name TEXT PRIMARY KEY, token_sha256 BLOB NOT NULL UNIQUE,
                 added_at INTEGER NOT NULL);
             CREATE TABLE reports (host TEXT PRIMARY KEY, received_at INTEGER NOT NULL,
                 sent_at INTEGER NOT NULL, report TEXT NOT NULL, summary BLOB);
             CREATE TABLE events (id INTEGER PRIMARY KEY, host TEXT NOT NULL,
                 at INTEGER NOT NULL, service TEXT, kind TEXT NOT NULL, message TEXT NOT NULL,
                 received_at INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT INTO meta(key, value) VALUES ('hosts_version', 3);
             CREATE INDEX events_host_id ON events(host, id);
             CREATE INDEX events_received ON events(received_at);
             INSERT INTO hosts VALUES ('web1', x'01', 10), ('web2', x'02', 11);
             INSERT INTO reports VALUES ('web1', 300, 299, '{\"host\":\"web1\"}', x'0102');
             INSERT INTO events(host, at, service, kind, message, received_at) VALUES
                 ('web1', 100, 'foo', 'install', 'one', 300),
                 ('web2', 150, NULL, 'started', 'two', 400),
                 ('web1', 200, 'foo', 'started', 'three', 500);",
        )
        .unwrap();
        drop(old);
        let mut db = Db::open_file(&path).unwrap();
        let hosts: Vec<_> = db
            .hosts()
            .unwrap()
            .into_iter()
            .map(|h| (h.name, h.added_at, h.last_report))
            .collect();
        assert_eq!(
            hosts,
            [("web1".into(), 10, Some(300)), ("web2".into(), 11, None)]
        );
        assert_eq!(db.hosts_version().unwrap(), 3);
        assert_eq!(
            db.latest_reports().unwrap().0,
            [super::super::Latest {
                host: "web1".into(),
                received_at: 300,
                sent_at: 299,
                summary: Some(vec![1, 2]),
            }]
        );
        assert_eq!(
            db.report_bodies(&["web1"]).unwrap(),
            [("web1".into(), 300, 299, b"{\"host\":\"web1\"}".to_vec())]
        );
        // A damaged packed body is skipped (the server still starts), not an error.
        Connection::open(&path)
            .unwrap()
            .execute(
                "INSERT INTO reports (host, received_at, sent_at, report) VALUES ('web2', 5, 4, x'28b52ffd00')",
                [],
            )
            .unwrap();
        assert_eq!(
            db.report_bodies(&["web1", "web2"]).unwrap(),
            [("web1".into(), 300, 299, b"{\"host\":\"web1\"}".to_vec())]
        );
        Connection::open(&path)
            .unwrap()
            .execute("DELETE FROM reports WHERE host = 'web2'", [])
            .unwrap();
        let msgs = |v: Vec<Event>| v.into_iter().map(|e| e.message).collect::<Vec<_>>();
        assert_eq!(msgs(db.events("web1", 10).unwrap()), ["three", "one"]);
        assert_eq!(msgs(db.events("web2", 10).unwrap()), ["two"]);
        let indexes: Vec<String> = Connection::open(&path)
            .unwrap()
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(indexes, ["events_host_id"]);
        // Retention by receive time, walked by id: the events received before 450 go.
        assert_eq!(db.prune(1000, 550).unwrap(), Some(2));
        assert_eq!(msgs(db.events("web1", 10).unwrap()), ["three"]);
        assert_eq!(db.prune(1000, 0).unwrap(), Some(1));
        assert_eq!(db.event_count().unwrap(), 0);
    }

    /// Retention walks the log by id: an event received before the cutoff but stored after a
    /// younger one (the server's clock set back) stays until that one is due too.
    #[test]
    fn retention_is_late_not_early_when_receive_times_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open_file(&dir.path().join("state.db")).unwrap();
        db.add_hosts(&["web1".into()]).unwrap();
        // One report of web1 per (receive time, event time), each with one event.
        let store = |db: &mut Db, events: &[(u64, u64)]| {
            for &(received_at, at) in events {
                let events = [ev(at, "x")];
                db.store(
                    &[StoredReport {
                        host: "web1",
                        received_at,
                        sent_at: received_at,
                        body: b"{}",
                        packed_body: None,
                        summary: b"s",
                        new_events: &events,
                        apply_quota: false,
                    }],
                    100,
                )
                .unwrap();
            }
        };
        store(&mut db, &[(100, 1), (500, 2), (90, 3), (600, 4)]);
        let ats = |db: &Db| {
            let mut v: Vec<u64> = db
                .events("web1", 10)
                .unwrap()
                .iter()
                .map(|e| e.at)
                .collect();
            v.sort();
            v
        };
        // Cutoff 200: the first event goes; the third (received at 90) waits behind the second.
        assert_eq!(db.prune(1000, 800).unwrap(), Some(1));
        assert_eq!(ats(&db), [2, 3, 4]);
        // Cutoff 550: the second and the third go, never the fourth.
        assert_eq!(db.prune(1000, 450).unwrap(), Some(2));
        assert_eq!(ats(&db), [4]);
        // An event stamped a year ahead (the clock jumped forward, then back) does not stop
        // retention until then: it is kept for the whole age from now, then goes.
        store(&mut db, &[(700, 5), (1000 + 365 * 86400, 6), (800, 7)]);
        // Cutoff 750 at 1000: 4 and 5 go; 6 (now stamped 1000) and 7 stay.
        assert_eq!(db.prune(1000, 250).unwrap(), Some(2));
        assert_eq!(ats(&db), [6, 7]);
        assert_eq!(db.prune(1200, 250).unwrap(), Some(0));
        // Cutoff 1001 at 1251: all gone (without the stamp, 6 would have stopped the walk).
        assert_eq!(db.prune(1251, 250).unwrap(), Some(2));
        assert_eq!(ats(&db), Vec::<u64>::new());
    }

    #[test]
    fn hosts_tokens_reports_and_retention() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open_file(&dir.path().join("state.db")).unwrap();
        let v0 = db.hosts_version().unwrap();
        let added = db.add_hosts(&["web1".into(), "web2".into()]).unwrap();
        assert!(!added[0].2);
        assert!(db.hosts_version().unwrap() > v0);
        let tokens = db.tokens().unwrap();
        assert_eq!(tokens[&token_hash(&added[0].1)], "web1");
        // Re-adding replaces the token.
        let again = db.add_hosts(&["web1".into()]).unwrap();
        assert!(again[0].2);
        let tokens = db.tokens().unwrap();
        assert!(!tokens.contains_key(&token_hash(&added[0].1)));
        assert_eq!(tokens[&token_hash(&again[0].1)], "web1");

        let events = [ev(100, "install"), ev(200, "started")];
        // web1's body is stored packed, as the server stores bodies.
        let packed = pack_body(b"{\"host\":\"web1\",\"sent_at\":299}");
        assert!(packed.is_some());
        let batch = [
            StoredReport {
                host: "web1",
                received_at: 300,
                sent_at: 299,
                body: b"{\"host\":\"web1\",\"sent_at\":299}",
                packed_body: packed.as_deref(),
                summary: b"s1",
                new_events: &events,
                apply_quota: false,
            },
            StoredReport {
                host: "ghost",
                received_at: 300,
                sent_at: 299,
                body: b"{}",
                packed_body: None,
                summary: b"s2",
                new_events: &events,
                apply_quota: false,
            },
        ];
        db.store(&batch, 100).unwrap();
        let (latest, _) = db.latest_reports().unwrap();
        assert_eq!(latest.len(), 1, "reports of unregistered hosts are dropped");
        assert_eq!(
            latest[0],
            super::super::Latest {
                host: "web1".into(),
                received_at: 300,
                sent_at: 299,
                summary: Some(b"s1".to_vec()),
            }
        );
        // A summary made from the body is stored only for the report it was made of.
        db.put_summaries(&[
            ("web1".into(), 300, 298, b"stale".to_vec()),
            ("ghost".into(), 300, 299, b"x".to_vec()),
        ])
        .unwrap();
        assert_eq!(
            db.latest_reports().unwrap().0[0].summary.as_deref(),
            Some(&b"s1"[..])
        );
        db.put_summaries(&[("web1".into(), 300, 299, b"s1b".to_vec())])
            .unwrap();
        assert_eq!(
            db.latest_reports().unwrap().0[0].summary.as_deref(),
            Some(&b"s1b"[..])
        );
        assert_eq!(
            db.report_bodies(&["ghost", "web1"]).unwrap(),
            [("web1".to_string(), 300, 299, batch[0].body.to_vec())]
        );
        assert_eq!(db.events("web1", 10).unwrap()[0].kind, EventKind::Started);
        assert_eq!(db.event_count().unwrap(), 2);
        // Retention goes by receive time (300), not the events' own times (100, 200).
        assert_eq!(db.prune(1000, 750).unwrap(), Some(0));
        assert_eq!(db.prune(1000, 650).unwrap(), Some(2));
        // The quota keeps a host's newest events and leaves other hosts' alone.
        db.add_hosts(&["web2".into()]).unwrap();
        let many: Vec<Event> = (0..10).map(|i| ev(2000 + i, "x")).collect();
        let store = |db: &mut Db, host: &str, ev: &[Event], quota: bool| {
            db.store(
                &[StoredReport {
                    host,
                    received_at: 2000,
                    sent_at: 2000,
                    body: b"{}",
                    packed_body: None,
                    summary: b"s3",
                    new_events: ev,
                    apply_quota: quota,
                }],
                4,
            )
            .unwrap()
        };
        store(&mut db, "web2", &many[..2], false);
        store(&mut db, "web1", &many, true);
        let kept = db.events("web1", 100).unwrap();
        assert_eq!(kept.len(), 4);
        assert_eq!(kept[0].at, 2009);
        assert_eq!(db.events("web2", 100).unwrap().len(), 2);
        // The views' reads: each host's latest, in the order asked, and the fleet's newest.
        let latest = db.latest_events(&["web2", "nobody", "web1"], 3).unwrap();
        let ats = |v: &[Event]| v.iter().map(|e| e.at).collect::<Vec<_>>();
        assert_eq!(ats(&latest[0]), [2001, 2000]);
        assert!(latest[1].is_empty());
        assert_eq!(ats(&latest[2]), [2009, 2008, 2007]);
        // web1's 4 (kept by its quota, stored last), then web2's.
        let recent = db.recent_events(5).unwrap();
        let hosts: Vec<&str> = recent.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(hosts, ["web1", "web1", "web1", "web1", "web2"]);
        assert_eq!((recent[0].1.at, recent[4].1.at), (2009, 2001));
        assert!(db.remove_host("web2").unwrap());
        assert!(db.remove_host("web1").unwrap());
        assert!(db.latest_reports().unwrap().0.is_empty());
        assert!(!db.remove_host("web1").unwrap());
    }
}
