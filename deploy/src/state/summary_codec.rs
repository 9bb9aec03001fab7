//! The stored form of a host's summary ([`HostEntry`]) and event window: what the writer
//! puts in the `summary` column next to each report body, so that a server starts by reading
//! a few hundred bytes per host instead of parsing every stored report (kilobytes of JSON).
//!
//! Encoding (version 1), a compact binary form read and written only here:
//!
//! * a version byte (`1`), then the report's `received_at` and `sent_at`: a summary counts
//!   only for the row whose columns hold the same two values (a row that an older keepup
//!   rewrote without its summary falls back to its body);
//! * integers as LEB128 varints; strings as a varint byte length and UTF-8; an optional
//!   value as a byte `0` (none) or `1` followed by the value; a list as a varint count and
//!   its items;
//! * the fields of [`HostEntry`] in declaration order (words such as service states as their
//!   wire strings, so an unknown word survives), a failed start in full, then the event
//!   window as 4-byte little-endian identities.

use std::fmt;

use keepup_deploy::wire::{Format, ServiceState, StartReport, UpdateFailure};

use super::entry::{HostEntry, Interner, ProbeEntry, ServiceEntry, StartEntry, Sym, UpdateEntry};

/// The encoding's version byte.
const VERSION: u8 = 1;

/// Why a stored summary was not read back (the server then parses the report body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryError(&'static str);

impl fmt::Display for SummaryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stored summary: {}", self.0)
    }
}

impl std::error::Error for SummaryError {}

/// Encode `entry` and `window` for the report received at `received_at` and sent at
/// `sent_at`.
pub fn encode(entry: &HostEntry, sent_at: u64, window: &[u32]) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(256));
    w.0.push(VERSION);
    w.uint(entry.received_at);
    w.uint(sent_at);
    w.opt(entry.track.as_deref(), Writer::str);
    w.opt(entry.format, |w, f| {
        w.0.push(match f {
            Format::Deb => 0,
            Format::Rpm => 1,
        })
    });
    w.opt(entry.arch.as_deref(), Writer::str);
    w.opt(entry.agent_version.as_deref(), Writer::str);
    w.uint(entry.installed.len() as u64);
    for (n, v) in entry.installed.iter() {
        w.str(n);
        w.str(v);
    }
    w.uint(entry.services.len() as u64);
    for s in entry.services.iter() {
        w.str(&s.name);
        w.str(s.state.as_str());
        w.uint(s.restarts);
        w.uint(s.probes.len() as u64);
        for p in s.probes.iter() {
            w.str(&p.name);
            w.0.push(match p.ok {
                None => 0,
                Some(false) => 1,
                Some(true) => 2,
            });
            w.opt(p.reason.as_deref(), Writer::str);
        }
        w.opt(s.start.as_ref(), |w, st| {
            w.str(&st.version);
            w.bool(st.started);
            w.opt(st.failed.as_deref(), |w, f| {
                w.str(&f.version);
                w.bool(f.started);
                w.str(&f.detail);
                w.uint(f.log_tail.len() as u64);
                for l in &f.log_tail {
                    w.str(l);
                }
                w.uint(f.at);
            });
        });
    }
    w.opt(entry.update.as_deref(), |w, u| {
        w.uint(u.at);
        w.bool(u.ok);
        w.opt(u.error.as_deref(), Writer::str);
        w.opt(u.failure.as_ref(), |w, f| w.str(f.as_str()));
        w.uint(u.held.len() as u64);
        for h in u.held.iter() {
            w.str(h);
        }
    });
    w.uint(window.len() as u64);
    for id in window {
        w.0.extend_from_slice(&id.to_le_bytes());
    }
    w.0
}

/// The `received_at` and `sent_at` a summary was made for, read without decoding the rest.
pub fn stamp(bytes: &[u8]) -> Result<(u64, u64), SummaryError> {
    let mut r = Reader(bytes);
    if r.byte()? != VERSION {
        return Err(SummaryError("unknown encoding version"));
    }
    Ok((r.uint()?, r.uint()?))
}

/// Decode a summary, its strings from `syms`: the entry, its `sent_at`, and the event window.
pub fn decode(
    bytes: &[u8],
    syms: &mut Interner,
) -> Result<(HostEntry, u64, Vec<u32>), SummaryError> {
    let mut r = Reader(bytes);
    if r.byte()? != VERSION {
        return Err(SummaryError("unknown encoding version"));
    }
    let received_at = r.uint()?;
    let sent_at = r.uint()?;
    let track = r.opt(|r| r.sym(syms))?;
    let format = r.opt(|r| match r.byte()? {
        0 => Ok(Format::Deb),
        1 => Ok(Format::Rpm),
        _ => Err(SummaryError("unknown package format")),
    })?;
    let arch = r.opt(|r| r.sym(syms))?;
    let agent_version = r.opt(|r| r.sym(syms))?;
    let installed = r.list(|r| Ok((r.sym(syms)?, r.sym(syms)?)))?;
    let services = r.list(|r| {
        Ok(ServiceEntry {
            name: r.sym(syms)?,
            state: ServiceState::parse(r.str()?),
            restarts: r.uint()?,
            probes: r.list(|r| {
                Ok(ProbeEntry {
                    name: r.sym(syms)?,
                    ok: match r.byte()? {
                        0 => None,
                        1 => Some(false),
                        2 => Some(true),
                        _ => return Err(SummaryError("bad probe result")),
                    },
                    reason: r.opt(|r| r.sym(syms))?,
                })
            })?,
            start: r.opt(|r| {
                Ok(StartEntry {
                    version: r.sym(syms)?,
                    started: r.bool()?,
                    failed: r.opt(|r| {
                        Ok(Box::new(StartReport {
                            version: r.str()?.to_string(),
                            started: r.bool()?,
                            detail: r.str()?.to_string(),
                            log_tail: r.list(|r| Ok(r.str()?.to_string()))?.into_vec(),
                            at: r.uint()?,
                        }))
                    })?,
                })
            })?,
        })
    })?;
    let update = r.opt(|r| {
        Ok(Box::new(UpdateEntry {
            at: r.uint()?,
            ok: r.bool()?,
            error: r.opt(|r| Ok(Box::from(r.str()?)))?,
            failure: r.opt(|r| Ok(UpdateFailure::parse(r.str()?)))?,
            held: r.list(|r| r.sym(syms))?,
        }))
    })?;
    let n = r.uint()? as usize;
    let ids = r.take(n.checked_mul(4).ok_or(SummaryError("bad window length"))?)?;
    let window = ids
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if !r.0.is_empty() {
        return Err(SummaryError("trailing bytes"));
    }
    let entry = HostEntry {
        received_at,
        track,
        format,
        arch,
        agent_version,
        installed,
        services,
        update,
        rows: Default::default(),
    };
    Ok((entry, sent_at, window))
}

struct Writer(Vec<u8>);

impl Writer {
    fn uint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn bool(&mut self, b: bool) {
        self.0.push(u8::from(b));
    }

    fn str(&mut self, s: &str) {
        self.uint(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }

    fn opt<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Writer, T)) {
        match v {
            None => self.0.push(0),
            Some(v) => {
                self.0.push(1);
                f(self, v);
            }
        }
    }
}

struct Reader<'a>(&'a [u8]);

const SHORT: SummaryError = SummaryError("cut short");

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, SummaryError> {
        let (&b, rest) = self.0.split_first().ok_or(SHORT)?;
        self.0 = rest;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], SummaryError> {
        if self.0.len() < n {
            return Err(SHORT);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn uint(&mut self) -> Result<u64, SummaryError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(SummaryError("integer too long"))
    }

    fn bool(&mut self) -> Result<bool, SummaryError> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(SummaryError("bad boolean")),
        }
    }

    fn str(&mut self) -> Result<&'a str, SummaryError> {
        let n = self.uint()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| SummaryError("a string is not UTF-8"))
    }

    fn sym(&mut self, syms: &mut Interner) -> Result<Sym, SummaryError> {
        Ok(syms.sym(self.str()?))
    }

    fn opt<T>(
        &mut self,
        f: impl FnOnce(&mut Reader<'a>) -> Result<T, SummaryError>,
    ) -> Result<Option<T>, SummaryError> {
        match self.byte()? {
            0 => Ok(None),
            1 => f(self).map(Some),
            _ => Err(SummaryError("bad option tag")),
        }
    }

    fn list<T>(
        &mut self,
        mut f: impl FnMut(&mut Reader<'a>) -> Result<T, SummaryError>,
    ) -> Result<Box<[T]>, SummaryError> {
        let n = self.uint()? as usize;
        // Every item takes a byte at least: a corrupt count cannot reserve gigabytes.
        if n > self.0.len() {
            return Err(SHORT);
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(f(self)?);
        }
        Ok(v.into_boxed_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keepup_deploy::wire::{
        Event, ProbeReport, Report, RolloutReport, ServiceReport, UpdateReport,
    };

    fn report() -> Report {
        let mut r = Report {
            host: "web1".into(),
            agent_version: "0.9.0".into(),
            sent_at: 99,
            track: Some("stable".into()),
            format: Some(Format::Rpm),
            arch: Some("x86_64".into()),
            ..Report::default()
        };
        r.installed.insert("foo".into(), "1.2-1".into());
        r.installed.insert("bar".into(), "2.0-1".into());
        r.services.push(ServiceReport {
            name: "foo".into(),
            state: "some-new-state".into(),
            restarts: 300,
            probes: vec![
                ProbeReport {
                    name: "port".into(),
                    ok: Some(false),
                    reason: Some("refused".into()),
                    ..ProbeReport::default()
                },
                ProbeReport {
                    name: "http".into(),
                    ..ProbeReport::default()
                },
            ],
            start: Some(StartReport {
                version: "1.2-1".into(),
                started: false,
                detail: "exited 1".into(),
                log_tail: vec!["a".into(), "b ü".into()],
                at: 1_700_000_000,
            }),
            ..ServiceReport::default()
        });
        r.update = Some(UpdateReport {
            at: 98,
            ok: false,
            error: Some("no route".into()),
            failure: Some(UpdateFailure::Unreachable),
            rollouts: vec![RolloutReport {
                name: "bar".into(),
                held: Some("wave 2".into()),
                ..RolloutReport::default()
            }],
            ..UpdateReport::default()
        });
        r.events.push(Event {
            at: 5,
            service: None,
            kind: "install".into(),
            message: "m".into(),
        });
        r
    }

    #[test]
    fn summaries_read_back_as_made() {
        let r = report();
        let entry = HostEntry::of(&r, 1234);
        let bytes = encode(&entry, r.sent_at, &[7, u32::MAX]);
        assert_eq!(stamp(&bytes), Ok((1234, 99)));
        let mut syms = Interner::default();
        let (back, sent_at, window) = decode(&bytes, &mut syms).unwrap();
        assert_eq!(sent_at, 99);
        assert_eq!(window, [7, u32::MAX]);
        assert_eq!(format!("{back:?}"), format!("{entry:?}"));
        // Names are interned: a second host shares them.
        let (again, ..) = decode(&bytes, &mut syms).unwrap();
        assert!(std::sync::Arc::ptr_eq(
            back.track.as_ref().unwrap(),
            again.track.as_ref().unwrap()
        ));
        // An empty report too.
        let empty = HostEntry::of(&Report::default(), 0);
        let (e, ..) = decode(&encode(&empty, 0, &[]), &mut syms).unwrap();
        assert_eq!(format!("{e:?}"), format!("{empty:?}"));
    }

    #[test]
    fn damaged_summaries_are_refused_not_misread() {
        let r = report();
        let bytes = encode(&HostEntry::of(&r, 1), 2, &[1, 2, 3]);
        let mut syms = Interner::default();
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n], &mut syms).is_err(), "cut at {n}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer, &mut syms).is_err());
        let mut other = bytes;
        other[0] = 9;
        assert_eq!(
            decode(&other, &mut syms).unwrap_err(),
            SummaryError("unknown encoding version")
        );
    }

    /// The reports table as keepup wrote it before summaries (hosts and events unchanged).
    const OLD_SCHEMA: &str = "
        CREATE TABLE hosts (name TEXT PRIMARY KEY, token_sha256 BLOB NOT NULL UNIQUE,
                            added_at INTEGER NOT NULL);
        CREATE TABLE reports (host TEXT PRIMARY KEY, received_at INTEGER NOT NULL,
                              sent_at INTEGER NOT NULL, report TEXT NOT NULL);
        CREATE TABLE events (id INTEGER PRIMARY KEY, host TEXT NOT NULL, at INTEGER NOT NULL,
                             service TEXT, kind TEXT NOT NULL, message TEXT NOT NULL,
                             received_at INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO meta(key, value) VALUES ('hosts_version', 1);";

    /// What a server holds of each host, as text (the views are built from it).
    fn held(s: &super::super::Server) -> Vec<String> {
        s.snapshot().iter().map(|h| format!("{h:?}")).collect()
    }

    #[test]
    fn a_database_from_before_summaries_starts_and_serves_the_same_view() {
        use super::super::db::{Db, Location, StoredReport};
        use super::super::{new_events, Server};

        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        let mut reports = Vec::new();
        for (i, host) in ["web1", "web2", "web3"].into_iter().enumerate() {
            let mut r = report();
            r.host = host.into();
            r.sent_at = 1_000 + i as u64;
            reports.push(r);
        }
        reports[2].services.clear();
        let bodies: Vec<Vec<u8>> = reports
            .iter()
            .map(|r| serde_json::to_vec(r).unwrap())
            .collect();

        // Written by the old schema: no summary column.
        let old = dir.path().join("old.db");
        let conn = rusqlite::Connection::open(&old).unwrap();
        conn.execute_batch(OLD_SCHEMA).unwrap();
        for (i, (r, body)) in reports.iter().zip(&bodies).enumerate() {
            conn.execute(
                "INSERT INTO hosts VALUES (?1, ?2, 1)",
                rusqlite::params![r.host, vec![i as u8; 32]],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO reports VALUES (?1, 2000, ?2, ?3)",
                rusqlite::params![r.host, r.sent_at as i64, std::str::from_utf8(body).unwrap()],
            )
            .unwrap();
        }
        drop(conn);

        // The same reports stored by this keepup's writer path, with their summaries.
        let new = dir.path().join("new.db");
        let mut db = Db::open_file(&new).unwrap();
        db.add_hosts(&reports.iter().map(|r| r.host.clone()).collect::<Vec<_>>())
            .unwrap();
        let sums: Vec<Vec<u8>> = reports
            .iter()
            .map(|r| {
                let window = new_events(&[], &r.events).1;
                encode(&HostEntry::of(r, 2000), r.sent_at, &window)
            })
            .collect();
        let rows: Vec<StoredReport<'_>> = reports
            .iter()
            .zip(&bodies)
            .zip(&sums)
            .map(|((r, body), summary)| StoredReport {
                host: &r.host,
                received_at: 2000,
                sent_at: r.sent_at,
                body,
                packed_body: None,
                summary,
                new_events: &[],
                apply_quota: false,
            })
            .collect();
        db.store(&rows, 100).unwrap();
        drop(db);

        let want = held(&Server::open(&repo, &Location::File(new), None).unwrap());
        assert_eq!(want.len(), 3);
        assert!(
            want[0].contains("web1") && want[0].contains("Some("),
            "{}",
            want[0]
        );
        let first = Server::open(&repo, &Location::File(old.clone()), None).unwrap();
        assert_eq!(held(&first), want, "first start: from the bodies");
        drop(first);
        // The first start stored each report's summary, made for that report.
        let (latest, _) = Db::open_file(&old).unwrap().latest_reports().unwrap();
        assert_eq!(latest.len(), 3);
        for (l, want) in latest.iter().zip(&sums) {
            let got = l.summary.as_deref().expect("a summary was stored");
            assert_eq!(stamp(got), Ok((l.received_at, l.sent_at)));
            assert_eq!(got, want.as_slice(), "{}", l.host);
        }
        // An older keepup rewriting a report leaves a summary of another report: the body
        // counts.
        let conn = rusqlite::Connection::open(&old).unwrap();
        let mut changed = reports[1].clone();
        changed.sent_at += 1;
        changed.arch = Some("aarch64".into());
        conn.execute(
            "UPDATE reports SET sent_at = ?1, report = ?2 WHERE host = 'web2'",
            rusqlite::params![
                changed.sent_at as i64,
                serde_json::to_string(&changed).unwrap()
            ],
        )
        .unwrap();
        drop(conn);
        let second = held(&Server::open(&repo, &Location::File(old), None).unwrap());
        assert_eq!(second[0], want[0]);
        assert_eq!(second[2], want[2]);
        assert!(second[1].contains("aarch64"), "{}", second[1]);
    }
}
