//! The fleet state server behind `keepup serve --state FILE`: agents post reports
//! (`POST /api/v1/report`, bearer token per host), operators read the fleet view as JSON
//! (`GET /api/v1/fleet`) or as a page (`GET /`).
//!
//! How a report travels: the request task checks the token against an in-memory map of token
//! hashes (re-checking the database for tokens it does not know, so `keepup host add` works
//! while the server runs), reads the body under [`MAX_REPORT_BYTES`], parses and validates it,
//! and hands it over a bounded channel to the one writer thread. The writer takes whatever is
//! queued (up to [`BATCH`] reports), stores it in one SQLite transaction, then updates the
//! in-memory latest reports and answers each request: 204 means the report is in the database.
//! A full channel makes request tasks wait (backpressure) instead of buffering without bound.
//! Views are built from the in-memory reports, the repository's `fleet.yaml` and track indexes
//! (re-read when they change), on a blocking thread so ingestion goes on meanwhile.

pub mod db;
pub mod hosts;
pub mod page;
pub mod view;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode};
use keepup_deploy::wire::report::MAX_REPORT_BYTES;
use keepup_deploy::wire::{Event, Fleet, Index, Report};
use tokio::sync::{mpsc, oneshot};

use db::{Db, StoredReport, TokenHash};
use view::{HostEntry, EVENTS_PER_HOST};

/// A host's logged events as JSON.
pub const EVENTS_PATH: &str = "/api/v1/events";
/// Most reports stored in one transaction.
pub const BATCH: usize = 500;
/// Reports waiting for the writer at most; more make request tasks wait.
const QUEUE: usize = 4 * BATCH;
/// Events older than this are dropped (7 days).
pub const EVENT_MAX_AGE: u64 = 7 * 86_400;
/// The event log keeps at most this many events.
pub const EVENT_MAX_COUNT: u64 = 1_000_000;
/// How often the retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How often the server looks for hosts added or removed by `keepup host`.
const HOSTS_POLL: Duration = Duration::from_secs(2);

type Body = Full<Bytes>;

/// Registered host name -> its latest report (none before the first).
type HostMap = BTreeMap<String, Option<Arc<HostEntry>>>;

enum Msg {
    Report {
        report: Box<Report>,
        body: Bytes,
        received_at: u64,
        done: oneshot::Sender<bool>,
    },
    Prune,
}

/// The newest event time stored for a host, and the identities of the events at that time:
/// agents resend their recent events, and only the ones after this mark are new.
#[derive(Debug, Clone, Default, PartialEq)]
struct Watermark {
    at: u64,
    keys: Vec<u64>,
}

fn event_key(e: &Event) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&e.service, &e.kind, &e.message).hash(&mut h);
    h.finish()
}

/// The events of `events` not stored before (per `mark`), and the new mark.
fn new_events(mark: Option<&Watermark>, events: &[Event]) -> (Vec<Event>, Option<Watermark>) {
    let fresh: Vec<Event> = events
        .iter()
        .filter(|e| match mark {
            None => true,
            Some(m) => e.at > m.at || (e.at == m.at && !m.keys.contains(&event_key(e))),
        })
        .cloned()
        .collect();
    let Some(top) = fresh.iter().map(|e| e.at).max() else {
        return (fresh, mark.cloned());
    };
    let mut next = match mark {
        Some(m) if m.at == top => m.clone(),
        _ => Watermark {
            at: top,
            keys: Vec::new(),
        },
    };
    next.keys
        .extend(fresh.iter().filter(|e| e.at == top).map(event_key));
    (fresh, Some(next))
}

/// What the server keeps in memory of a report: the last events only, no update actions,
/// the log tail only of a failed start.
fn trim(mut r: Report) -> Report {
    let skip = r.events.len().saturating_sub(EVENTS_PER_HOST);
    r.events.drain(..skip);
    r.events.shrink_to_fit();
    if let Some(u) = &mut r.update {
        u.actions = Vec::new();
    }
    for s in &mut r.services {
        if let Some(st) = &mut s.start {
            if st.started {
                st.log_tail = Vec::new();
            }
        }
    }
    r
}

struct Cached<T> {
    stamp: Option<(SystemTime, u64)>,
    value: Option<Arc<T>>,
}

impl<T> Default for Cached<T> {
    fn default() -> Self {
        Cached {
            stamp: None,
            value: None,
        }
    }
}

impl<T> Cached<T> {
    /// The file's parsed content, re-read when its mtime or size changed. A file that does not
    /// parse keeps the previous content (and says so on stderr).
    fn get(&mut self, path: &Path, parse: impl Fn(&[u8]) -> Result<T, String>) -> Option<Arc<T>> {
        let Ok(meta) = std::fs::metadata(path) else {
            self.stamp = None;
            self.value = None;
            return None;
        };
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        if self.stamp != Some(stamp) {
            self.stamp = Some(stamp);
            match std::fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|d| parse(&d))
            {
                Ok(v) => self.value = Some(Arc::new(v)),
                Err(e) => eprintln!("keepup serve: {}: {e}", path.display()),
            }
        }
        self.value.clone()
    }
}

/// The fleet policy and each track's index, as last read.
type PolicyFiles = (Option<Arc<Fleet>>, Vec<(String, Arc<Index>)>);

#[derive(Default)]
struct RepoCache {
    fleet: Cached<Fleet>,
    tracks: HashMap<String, Cached<Index>>,
}

/// The fleet state server: shared by every connection.
pub struct Server {
    repo: PathBuf,
    hosts: Arc<RwLock<HostMap>>,
    tokens: RwLock<HashMap<TokenHash, String>>,
    reader: Arc<Mutex<Db>>,
    hosts_version: AtomicI64,
    tx: mpsc::Sender<Msg>,
    cache: Mutex<RepoCache>,
}

impl Server {
    /// Open (or create) the state database and load the latest reports; starts the writer
    /// thread. `repo` is the repository directory whose `fleet.yaml` and track indexes the
    /// views use.
    pub fn open(repo: &Path, state: &Path) -> Result<Arc<Server>> {
        let writer_db = Db::open(state)?;
        let reader = Db::open(state)?;
        let tokens = reader.tokens()?;
        let version = reader.hosts_version()?;
        let mut hosts: HostMap = tokens.values().map(|h| (h.clone(), None)).collect();
        let mut marks = HashMap::new();
        for (host, received_at, body) in writer_db.latest_reports()? {
            let Ok(report) = serde_json::from_slice::<Report>(&body) else {
                eprintln!("keepup serve: the stored report of {host} does not parse; ignored");
                continue;
            };
            let (_, mark) = new_events(None, &report.events);
            if let Some(m) = mark {
                marks.insert(host.clone(), m);
            }
            if let Some(slot) = hosts.get_mut(&host) {
                *slot = Some(Arc::new(HostEntry {
                    report: trim(report),
                    received_at,
                }));
            }
        }
        let hosts = Arc::new(RwLock::new(hosts));
        let (tx, rx) = mpsc::channel(QUEUE);
        let shared = hosts.clone();
        std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || writer(writer_db, rx, shared, marks))
            .context("starting the state writer")?;
        Ok(Arc::new(Server {
            repo: repo.to_path_buf(),
            hosts,
            tokens: RwLock::new(tokens),
            reader: Arc::new(Mutex::new(reader)),
            hosts_version: AtomicI64::new(version),
            tx,
            cache: Mutex::new(RepoCache::default()),
        }))
    }

    /// Background work on the current runtime: pick up hosts added or removed by
    /// `keepup host` (every 2 s) and apply the event retention (every minute).
    pub fn spawn_background(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HOSTS_POLL);
            let mut last_prune = Instant::now();
            loop {
                tick.tick().await;
                let m = me.clone();
                let _ = tokio::task::spawn_blocking(move || m.reload_hosts()).await;
                if last_prune.elapsed() >= PRUNE_EVERY {
                    last_prune = Instant::now();
                    let _ = me.tx.send(Msg::Prune).await;
                }
            }
        });
    }

    /// Re-read the host list if `keepup host` changed it.
    fn reload_hosts(&self) -> Result<()> {
        let db = self.reader.lock().unwrap();
        let v = db.hosts_version()?;
        if v == self.hosts_version.load(Ordering::Relaxed) {
            return Ok(());
        }
        let tokens = db.tokens()?;
        drop(db);
        {
            let mut hosts = self.hosts.write().unwrap();
            let names: std::collections::HashSet<&String> = tokens.values().collect();
            hosts.retain(|h, _| names.contains(h));
            for n in names {
                hosts.entry(n.clone()).or_insert(None);
            }
        }
        *self.tokens.write().unwrap() = tokens;
        self.hosts_version.store(v, Ordering::Relaxed);
        Ok(())
    }

    /// The host a bearer token belongs to: from memory, else from the database (a host
    /// added since the last reload).
    async fn authenticate(self: &Arc<Self>, token: &str) -> Option<String> {
        let hash = db::token_hash(token);
        if let Some(h) = self.tokens.read().unwrap().get(&hash) {
            return Some(h.clone());
        }
        let me = self.clone();
        let host = tokio::task::spawn_blocking(move || {
            me.reader.lock().unwrap().token_host(&hash).ok().flatten()
        })
        .await
        .ok()
        .flatten()?;
        self.tokens.write().unwrap().insert(hash, host.clone());
        self.hosts
            .write()
            .unwrap()
            .entry(host.clone())
            .or_insert(None);
        Some(host)
    }

    /// `POST /api/v1/report`.
    pub async fn post_report(
        self: &Arc<Self>,
        req: Request<hyper::body::Incoming>,
    ) -> Response<Body> {
        let token = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, t) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| t.trim())
            })
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        let Some(token) = token else {
            return unauthorized("a host token is required: Authorization: Bearer <token> (keepup host add NAME issues one)");
        };
        let Some(token_host) = self.authenticate(&token).await else {
            return unauthorized("unknown host token; issue one with `keepup host add NAME`");
        };
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_REPORT_BYTES as u64) {
            return too_large();
        }
        let body = match Limited::new(req.into_body(), MAX_REPORT_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
            Err(_) => return text(StatusCode::BAD_REQUEST, "could not read the request body"),
        };
        let report: Report = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return text(StatusCode::BAD_REQUEST, &format!("not a report: {e}")),
        };
        if let Err(e) = report.validate() {
            return text(StatusCode::BAD_REQUEST, &format!("invalid report: {e}"));
        }
        if report.host != token_host {
            return text(
                StatusCode::FORBIDDEN,
                &format!(
                    "this token belongs to host {token_host:?}, not {:?}",
                    report.host
                ),
            );
        }
        let (done, stored) = oneshot::channel();
        let msg = Msg::Report {
            report: Box::new(report),
            body,
            received_at: db::now(),
            done,
        };
        if self.tx.send(msg).await.is_err() {
            return text(StatusCode::SERVICE_UNAVAILABLE, "the state writer stopped");
        }
        match stored.await {
            Ok(true) => {
                let mut r = Response::new(Body::new(Bytes::new()));
                *r.status_mut() = StatusCode::NO_CONTENT;
                r
            }
            _ => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the report could not be stored; try again",
            ),
        }
    }

    /// Build the fleet view (on a blocking thread).
    async fn view(self: &Arc<Self>, stale_after: u64, with_events: bool) -> view::FleetView {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.build_view(stale_after, with_events))
            .await
            .unwrap_or_default()
    }

    fn snapshot(&self) -> Vec<(String, Option<Arc<HostEntry>>)> {
        self.hosts
            .read()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Calls `f` with the fleet policy and track indexes as read from the repository now.
    fn with_policy<R>(&self, f: impl FnOnce(&view::Policy) -> R) -> R {
        let (fleet, indexes) = self.policy_files();
        let mut policy = view::Policy {
            fleet: fleet.as_deref(),
            ..view::Policy::default()
        };
        for (t, i) in &indexes {
            policy.indexes.insert(t.as_str(), i);
        }
        f(&policy)
    }

    fn build_view(&self, stale_after: u64, with_events: bool) -> view::FleetView {
        let snapshot = self.snapshot();
        self.with_policy(|policy| {
            view::build(&snapshot, policy, db::now(), stale_after, with_events)
        })
    }

    /// The fleet view as JSON, built and serialized in parts on every core (the view of
    /// 100,000 hosts is tens of megabytes).
    fn view_json(&self, stale_after: u64, with_events: bool) -> Vec<u8> {
        let snapshot = self.snapshot();
        self.with_policy(|policy| {
            let now = db::now();
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
            let chunk = snapshot.len().div_ceil(threads).max(1);
            let parts: Vec<(view::Summary, Vec<u8>)> = std::thread::scope(|sc| {
                let handles: Vec<_> = snapshot
                    .chunks(chunk)
                    .map(|part| {
                        sc.spawn(move || {
                            let v = view::build(part, policy, now, stale_after, with_events);
                            let mut buf = Vec::with_capacity(part.len() * 512);
                            for (i, h) in v.hosts.iter().enumerate() {
                                if i > 0 {
                                    buf.push(b',');
                                }
                                let _ = serde_json::to_writer(&mut buf, h);
                            }
                            (v.summary, buf)
                        })
                    })
                    .collect();
                handles.into_iter().filter_map(|h| h.join().ok()).collect()
            });
            let mut head = view::FleetView {
                generated_at: now,
                stale_after,
                fleet_serial: policy.fleet.map(|f| f.serial),
                ..view::FleetView::default()
            };
            for (s, _) in &parts {
                head.summary.add(s);
            }
            // `hosts` is the last field: open its array and splice the parts in.
            let mut out = serde_json::to_vec(&head).unwrap_or_default();
            out.truncate(out.len().saturating_sub(2));
            out.reserve(parts.iter().map(|p| p.1.len() + 1).sum::<usize>() + 2);
            for (i, (_, p)) in parts.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(p);
            }
            out.extend_from_slice(b"]}");
            out
        })
    }

    /// `fleet.yaml` and every `tracks/<t>/index.json` of the repository, re-read when changed.
    fn policy_files(&self) -> PolicyFiles {
        let mut cache = self.cache.lock().unwrap();
        let fleet = cache.fleet.get(&self.repo.join("fleet.yaml"), |d| {
            Fleet::from_yaml(&String::from_utf8_lossy(d))
        });
        let mut indexes = Vec::new();
        let tracks_dir = self.repo.join("tracks");
        let names: Vec<String> = std::fs::read_dir(&tracks_dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        cache.tracks.retain(|t, _| names.contains(t));
        for t in names {
            let path = tracks_dir.join(&t).join("index.json");
            if let Some(i) = cache
                .tracks
                .entry(t.clone())
                .or_default()
                .get(&path, Index::from_json)
            {
                indexes.push((t, i));
            }
        }
        (fleet, indexes)
    }

    /// `GET /api/v1/fleet[?stale_after=SECS&events=0]`.
    pub async fn fleet_json(self: &Arc<Self>, query: Option<&str>) -> Response<Body> {
        let q = Query::parse(query);
        let me = self.clone();
        let body = tokio::task::spawn_blocking(move || me.view_json(q.stale_after, q.events))
            .await
            .unwrap_or_default();
        let mut r = Response::new(Body::new(Bytes::from(body)));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    }

    /// `GET /api/v1/events?host=NAME[&limit=N]`: a host's logged events, newest first
    /// (default 100, at most 1000).
    pub async fn events_json(self: &Arc<Self>, query: Option<&str>) -> Response<Body> {
        let q = Query::parse(query);
        let Some(host) = q.page.host else {
            return text(
                StatusCode::BAD_REQUEST,
                "which host? /api/v1/events?host=NAME",
            );
        };
        let limit = q.limit.min(1000);
        let me = self.clone();
        let events =
            tokio::task::spawn_blocking(move || me.reader.lock().unwrap().events(&host, limit))
                .await;
        match events {
            Ok(Ok(ev)) => {
                let mut r = Response::new(Body::new(Bytes::from(
                    serde_json::to_vec(&ev).unwrap_or_default(),
                )));
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                r
            }
            _ => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not read the event log",
            ),
        }
    }

    /// `GET /[?filter=...&host=...]`: the page.
    pub async fn page(self: &Arc<Self>, query: Option<&str>) -> Response<Body> {
        let q = Query::parse(query);
        let v = self.view(q.stale_after, true).await;
        let html = page::render(&v, &q.page);
        let mut r = Response::new(Body::new(Bytes::from(html)));
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        r
    }
}

/// The query parameters the views take.
struct Query {
    stale_after: u64,
    events: bool,
    limit: usize,
    page: page::PageQuery,
}

impl Query {
    fn parse(query: Option<&str>) -> Query {
        let mut q = Query {
            stale_after: view::DEFAULT_STALE_AFTER,
            events: true,
            limit: 100,
            page: page::PageQuery::default(),
        };
        for pair in query.unwrap_or("").split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned();
            match k {
                "stale_after" => q.stale_after = v.parse().unwrap_or(q.stale_after),
                "events" => q.events = v != "0",
                "limit" => q.limit = v.parse().unwrap_or(q.limit),
                "filter" => q.page.filter = Some(v),
                "host" => q.page.host = Some(v).filter(|h| !h.is_empty()),
                _ => {}
            }
        }
        q
    }
}

/// The writer thread: batches queued reports into one transaction each, then publishes them
/// in memory and answers their requests.
fn writer(
    mut db: Db,
    mut rx: mpsc::Receiver<Msg>,
    hosts: Arc<RwLock<HostMap>>,
    mut marks: HashMap<String, Watermark>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.blocking_recv() {
        let mut prune = false;
        let mut take = |m: Msg, batch: &mut Vec<_>| match m {
            Msg::Prune => prune = true,
            Msg::Report {
                report,
                body,
                received_at,
                done,
            } => batch.push((report, body, received_at, done)),
        };
        take(first, &mut batch);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => take(m, &mut batch),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            let mut fresh = Vec::with_capacity(batch.len());
            let mut next_marks = Vec::with_capacity(batch.len());
            for (report, ..) in &batch {
                // Two reports of one host in a batch: the second sees the first's mark.
                let prev = next_marks
                    .iter()
                    .rev()
                    .find(|(h, _): &&(String, Option<Watermark>)| *h == report.host)
                    .map(|(_, m)| m.clone())
                    .unwrap_or_else(|| marks.get(&report.host).cloned());
                let (events, mark) = new_events(prev.as_ref(), &report.events);
                fresh.push(events);
                next_marks.push((report.host.clone(), mark));
            }
            let rows: Vec<StoredReport<'_>> = batch
                .iter()
                .zip(&fresh)
                .map(|((r, body, at, _), ev)| StoredReport {
                    host: &r.host,
                    received_at: *at,
                    sent_at: r.sent_at,
                    body,
                    new_events: ev,
                })
                .collect();
            let ok = match db.store(&rows) {
                Ok(()) => true,
                Err(e) => {
                    eprintln!("keepup serve: storing {} report(s): {e:#}", rows.len());
                    false
                }
            };
            drop(rows);
            if ok {
                for (h, m) in next_marks {
                    if let Some(m) = m {
                        marks.insert(h, m);
                    }
                }
                let mut map = hosts.write().unwrap();
                for (report, _, at, _) in batch.iter_mut() {
                    if let Some(slot) = map.get_mut(&report.host) {
                        let r = std::mem::take(report.as_mut());
                        *slot = Some(Arc::new(HostEntry {
                            report: trim(r),
                            received_at: *at,
                        }));
                    }
                }
            }
            for (_, _, _, done) in batch.drain(..) {
                let _ = done.send(ok);
            }
        }
        if prune {
            if let Err(e) = db.prune(db::now(), EVENT_MAX_AGE, EVENT_MAX_COUNT) {
                eprintln!("keepup serve: event retention: {e:#}");
            }
        }
    }
}

fn text(code: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(Body::new(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = code;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn unauthorized(msg: &str) -> Response<Body> {
    let mut r = text(StatusCode::UNAUTHORIZED, msg);
    r.headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

fn too_large() -> Response<Body> {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("a report is at most {MAX_REPORT_BYTES} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(at: u64, kind: &str) -> Event {
        Event {
            at,
            service: None,
            kind: kind.into(),
            message: kind.into(),
        }
    }

    #[test]
    fn resent_events_are_not_new() {
        let (a, mark) = new_events(None, &[ev(1, "a"), ev(2, "b")]);
        assert_eq!(a.len(), 2);
        assert_eq!(mark.as_ref().unwrap().at, 2);
        // Resent with one more at the same second and one later.
        let (b, mark) = new_events(
            mark.as_ref(),
            &[ev(1, "a"), ev(2, "b"), ev(2, "c"), ev(3, "d")],
        );
        let kinds: Vec<_> = b.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["c", "d"]);
        let (c, mark2) = new_events(mark.as_ref(), &[ev(2, "c"), ev(3, "d")]);
        assert!(c.is_empty());
        assert_eq!(mark2, mark);
    }

    #[test]
    fn trimmed_reports_keep_the_last_events() {
        let r = Report {
            host: "h".into(),
            events: (0..30).map(|i| ev(i, "x")).collect(),
            ..Report::default()
        };
        let t = trim(r);
        assert_eq!(t.events.len(), EVENTS_PER_HOST);
        assert_eq!(t.events[0].at, 20);
    }
}
