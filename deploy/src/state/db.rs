//! The fleet state database (SQLite, one file): registered hosts with the SHA-256 of their
//! token, the latest report of each host, and the event log with its retention. `keepup host`
//! edits hosts from the command line while `keepup serve --state` runs; a counter in `meta`
//! tells the server that the host list changed.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use rusqlite::{params, Connection, OptionalExtension as _};
use sha2::{Digest as _, Sha256};

use keepup_deploy::wire::Event;

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

/// A report the writer stores: the host, when it arrived, its send time, the body as received
/// and the events not stored before.
pub struct StoredReport<'a> {
    /// Host name (already checked against the token).
    pub host: &'a str,
    /// Unix time the server received it.
    pub received_at: u64,
    /// The agent's `sent_at`.
    pub sent_at: u64,
    /// The JSON body.
    pub body: &'a [u8],
    /// Events to append to the log.
    pub new_events: &'a [Event],
}

/// An open state database.
pub struct Db {
    conn: Connection,
}

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
    report TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    host TEXT NOT NULL,
    at INTEGER NOT NULL,
    service TEXT,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_host_at ON events(host, at);
CREATE INDEX IF NOT EXISTS events_at ON events(at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta(key, value) VALUES ('hosts_version', 0);
";

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Db {
    /// Open (creating if needed) the database at `path`: WAL journal, `synchronous=NORMAL`
    /// (a commit survives a crash of the process; the last commits may be lost on power loss).
    pub fn open(path: &Path) -> Result<Db> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening the state database {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA).with_context(|| {
            format!(
                "{} is not a keepup state database (or is damaged)",
                path.display()
            )
        })?;
        Ok(Db { conn })
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
        let mut st = self.conn.prepare(
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
        let mut st = self.conn.prepare("SELECT token_sha256, name FROM hosts")?;
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

    /// The host a token hash belongs to, straight from the database.
    pub fn token_host(&self, hash: &TokenHash) -> Result<Option<String>> {
        Ok(self
            .conn
            .prepare_cached("SELECT name FROM hosts WHERE token_sha256 = ?1")?
            .query_row([&hash[..]], |r| r.get(0))
            .optional()?)
    }

    /// Changes whenever hosts are added or removed.
    pub fn hosts_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .prepare_cached("SELECT value FROM meta WHERE key = 'hosts_version'")?
            .query_row([], |r| r.get(0))?)
    }

    /// The latest report of every host: (host, received_at, JSON body).
    pub fn latest_reports(&self) -> Result<Vec<(String, u64, Vec<u8>)>> {
        let mut st = self
            .conn
            .prepare("SELECT host, received_at, report FROM reports")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, String>(2)?.into_bytes(),
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Store a batch of reports in one transaction: each replaces its host's latest report
    /// and appends its new events. A report of a host removed meanwhile is dropped.
    pub fn store(&mut self, batch: &[StoredReport<'_>]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO reports(host, received_at, sent_at, report)
                 SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM hosts WHERE name = ?1)
                 ON CONFLICT(host) DO UPDATE SET received_at = excluded.received_at,
                 sent_at = excluded.sent_at, report = excluded.report",
            )?;
            let mut event = tx.prepare_cached(
                "INSERT INTO events(host, at, service, kind, message) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for r in batch {
                let body = std::str::from_utf8(r.body).unwrap_or_default();
                let n = upsert.execute(params![
                    r.host,
                    r.received_at as i64,
                    r.sent_at as i64,
                    body
                ])?;
                if n == 0 {
                    continue;
                }
                for e in r.new_events {
                    event.execute(params![r.host, e.at as i64, e.service, e.kind, e.message])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Apply the event retention: drop events older than `max_age_secs` and all but the
    /// newest `max_count`. Returns how many were dropped.
    pub fn prune(&mut self, now: u64, max_age_secs: u64, max_count: u64) -> Result<usize> {
        let old = self.conn.execute(
            "DELETE FROM events WHERE at < ?1",
            [now.saturating_sub(max_age_secs) as i64],
        )?;
        let over = self.conn.execute(
            "DELETE FROM events WHERE id <= (SELECT max(id) FROM events) - ?1",
            [max_count as i64],
        )?;
        Ok(old + over)
    }

    /// A host's latest `limit` events, newest first.
    pub fn events(&self, host: &str, limit: usize) -> Result<Vec<Event>> {
        let mut st = self.conn.prepare_cached(
            "SELECT at, service, kind, message FROM events WHERE host = ?1
             ORDER BY at DESC, id DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![host, limit as i64], |r| {
            Ok(Event {
                at: r.get::<_, i64>(0)? as u64,
                service: r.get(1)?,
                kind: r.get(2)?,
                message: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many events the log holds.
    #[cfg(test)]
    pub fn event_count(&self) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM events", [], |r| r.get::<_, i64>(0))?
            as u64)
    }
}

#[cfg(test)]
mod tests {
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
    fn hosts_tokens_reports_and_retention() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("state.db")).unwrap();
        let v0 = db.hosts_version().unwrap();
        let added = db.add_hosts(&["web1".into(), "web2".into()]).unwrap();
        assert!(!added[0].2);
        assert!(db.hosts_version().unwrap() > v0);
        let tokens = db.tokens().unwrap();
        assert_eq!(tokens[&token_hash(&added[0].1)], "web1");
        // Re-adding replaces the token.
        let again = db.add_hosts(&["web1".into()]).unwrap();
        assert!(again[0].2);
        assert!(db.token_host(&token_hash(&added[0].1)).unwrap().is_none());
        assert_eq!(
            db.token_host(&token_hash(&again[0].1)).unwrap().as_deref(),
            Some("web1")
        );

        let events = [ev(100, "install"), ev(200, "started")];
        let batch = [
            StoredReport {
                host: "web1",
                received_at: 300,
                sent_at: 299,
                body: b"{\"host\":\"web1\",\"sent_at\":299}",
                new_events: &events,
            },
            StoredReport {
                host: "ghost",
                received_at: 300,
                sent_at: 299,
                body: b"{}",
                new_events: &events,
            },
        ];
        db.store(&batch).unwrap();
        let latest = db.latest_reports().unwrap();
        assert_eq!(latest.len(), 1, "reports of unregistered hosts are dropped");
        assert_eq!(db.events("web1", 10).unwrap()[0].kind, "started");
        assert_eq!(db.event_count().unwrap(), 2);
        assert_eq!(db.prune(1000, 850, 100).unwrap(), 1);
        assert_eq!(db.prune(1000, 10_000, 0).unwrap(), 1);
        assert!(db.remove_host("web1").unwrap());
        assert!(db.latest_reports().unwrap().is_empty());
        assert!(!db.remove_host("web1").unwrap());
    }
}
