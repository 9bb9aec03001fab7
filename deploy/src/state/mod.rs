//! The fleet state server behind `keepup serve --state FILE|URL`: agents post reports
//! (`POST /api/v1/report`, bearer token per host), operators read the fleet view as JSON
//! (`GET /api/v1/fleet`) or as a page (`GET /`).
//!
//! How a report travels: the request task checks the token against an in-memory map of token
//! hashes (reloaded when `keepup host add/remove` bumps the database's host counter, which a
//! background task checks every second: a token the map does not know costs no database
//! query), reads the body under [`MAX_REPORT_BYTES`], parses and validates it (names follow
//! [`keepup_deploy::wire::names`]), and hands it over a bounded channel to the one writer
//! thread. The writer takes whatever is
//! queued (up to [`BATCH`] reports), stores it in one transaction, then updates the
//! in-memory latest reports and answers each request: 204 means the report is in the database.
//!
//! Replicas: with PostgreSQL ([`db`]), several servers share the database. The same background
//! task that polls the host counter reads the reports the other replicas stored (every
//! second), so every replica's views and gate see the whole fleet, and hands their event
//! windows to the writer (a host whose reports alternate between replicas logs each event
//! once). One replica at a time holds the rollout gate's lease and publishes its decisions;
//! the others judge the same way, only to show it.
//! A full channel makes request tasks wait (backpressure) instead of buffering without bound.
//! Views are built from the in-memory reports, the repository's `fleet.yaml` and track indexes
//! (re-read when they change), on a blocking thread so ingestion goes on meanwhile: the table
//! form and the JSON from the rows kept in the summaries ([`rows`]), sent as they are built
//! ([`stream`]); the page at most once per [`VIEW_TTL`] per query.
//!
//! Events: agents resend their recent events (a sliding window, oldest first); the new ones
//! are those after the overlap with the host's previous window, compared by content, so the
//! host's clock plays no part. The log keeps each host's newest [`EVENTS_KEPT_PER_HOST`] for
//! [`EVENT_MAX_AGE`] of server time: no host can evict another's history.
//!
//! Reads (`/`, `/api/v1/fleet`, `/api/v1/events`) carry log tails; with a read token
//! (`--read-token-file`) they need it, as a bearer token or as the password of HTTP Basic
//! credentials (what a browser asks for).

pub mod db;
pub mod entry;
pub mod gate;
pub mod hosts;
pub mod page;
pub mod rows;
mod stream;
pub mod summary_codec;
pub mod view;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _, Result};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{
    HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE,
};
use hyper::{Request, Response, StatusCode};
use keepup_deploy::wire::report::MAX_REPORT_BYTES;
use keepup_deploy::wire::{Event, Fleet, Index, Report};
use tokio::sync::{mpsc, oneshot};

use crate::report;
use db::{Db, Location, StoredReport, TokenHash};
use entry::Interner;
use view::{HostEntry, EVENTS_PER_HOST};

/// A host's logged events as JSON.
pub const EVENTS_PATH: &str = "/api/v1/events";
/// Every rollout as the gate saw it last, as JSON.
pub const ROLLOUTS_PATH: &str = "/api/v1/rollouts";
/// Most reports stored in one transaction.
pub const BATCH: usize = 500;
/// Reports waiting for the writer at most; more make request tasks wait.
const QUEUE: usize = 4 * BATCH;
/// How long a report waits to be stored before its request is answered `503` (and sent
/// again later): less than the agent's own 20 s bound on a post.
const STORE_WAIT: Duration = Duration::from_secs(10);
/// Events received longer ago than this are dropped (7 days, server time).
pub const EVENT_MAX_AGE: u64 = 7 * 86_400;
/// Events kept per host (the newest); more than [`QUOTA_SLACK`] over it are never stored.
pub const EVENTS_KEPT_PER_HOST: u64 = 500;
/// New events of a host between two applications of its quota.
const QUOTA_SLACK: usize = 100;
/// How often the age retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How often the server looks for hosts added or removed by `keepup host`.
const HOSTS_POLL: Duration = Duration::from_secs(1);
/// How long a built fleet view is served again.
pub const VIEW_TTL: Duration = Duration::from_secs(1);
/// With this environment variable set to 1, every answer of the state server carries
/// [`QUERIES_HEADER`]: how many times request handling read the database (tests show that
/// unknown tokens cost none).
pub const TEST_HOOKS_ENV: &str = "KEEPUP_SERVE_TEST_HOOKS";
/// See [`TEST_HOOKS_ENV`].
pub const QUERIES_HEADER: &str = "x-keepup-db-queries";

type Body = Full<Bytes>;

/// Registered host name -> its latest report (none before the first).
type HostMap = BTreeMap<String, Option<Arc<HostEntry>>>;

enum Msg {
    Report {
        report: Box<Incoming>,
        done: oneshot::Sender<bool>,
    },
    Prune,
    /// Reports other replicas stored, read by a query begun when this replica had stored
    /// `since` batches: a host stored here after that keeps its own, newer, entry and window.
    Peers {
        since: u64,
        reports: Vec<PeerReport>,
    },
}

/// A report as the writer takes it: what its request's thread made of it beforehand (the
/// summary, its stored encoding, the event window), so that the one writer thread does little
/// more than store it. The rest of the parsed report is dropped on the request's thread.
struct Incoming {
    /// Host name (checked against the token).
    host: String,
    /// The agent's `sent_at`.
    sent_at: u64,
    /// Unix time the server received it.
    received_at: u64,
    /// The JSON body as received.
    body: Bytes,
    /// The body packed for the database ([`db::pack_body`]), when it packs bodies.
    packed_body: Option<Vec<u8>>,
    /// The report's events (the new ones are stored).
    events: Vec<Event>,
    /// Their identities.
    window: EventWindow,
    /// The host's summary, published once stored.
    entry: Arc<HostEntry>,
    /// That summary and window encoded for the database (`summary_codec`).
    summary: Vec<u8>,
}

/// A report another replica stored: its host, event window and summary.
type PeerReport = (String, EventWindow, Arc<HostEntry>);

/// The identities of the events of a host's last stored report, in order.
type EventWindow = Vec<u32>;

/// An event's identity: its content, the host's time included (two equal events at one
/// second are told apart by their position in the window).
fn event_id(e: &Event) -> u32 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (e.at, &e.service, &e.kind, &e.message).hash(&mut h);
    h.finish() as u32
}

/// How many of `events` were stored before, and the new window. Agents send a sliding window
/// of their recent events, oldest first: the longest end of the previous window that starts
/// this one is what was stored; what follows is new. Event times are not compared, so a host
/// clock that jumped ahead hides nothing that comes after it.
fn new_events(prev: &[u32], events: &[Event]) -> (usize, EventWindow) {
    let ids = event_window(events);
    (stored_before(prev, &ids), ids)
}

/// The identities of `events`, in order: the window a report leaves for the next.
fn event_window(events: &[Event]) -> EventWindow {
    events.iter().map(event_id).collect()
}

/// How many of the events of window `ids` were stored before, after window `prev` (see
/// [`new_events`]).
fn stored_before(prev: &[u32], ids: &[u32]) -> usize {
    let most = prev.len().min(ids.len());
    (1..=most)
        .rev()
        .find(|&n| prev[prev.len() - n..] == ids[..n])
        .unwrap_or(0)
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

/// Values built at most once per [`VIEW_TTL`] per key; callers wait for one build instead of
/// building side by side.
struct TtlCache<K, V> {
    entries: tokio::sync::Mutex<Vec<(K, Instant, V)>>,
}

impl<K: PartialEq, V: Clone> TtlCache<K, V> {
    /// Keys kept at most (queries with other parameters evict the oldest).
    const KEYS: usize = 8;

    fn new() -> Self {
        TtlCache {
            entries: tokio::sync::Mutex::new(Vec::new()),
        }
    }

    /// Drop the values past their time (they can be large: the fleet view's JSON).
    async fn purge(&self) {
        self.entries
            .lock()
            .await
            .retain(|(_, at, _)| at.elapsed() < VIEW_TTL);
    }

    async fn get<F: Future<Output = V>>(&self, key: K, build: impl FnOnce() -> F) -> V {
        let mut entries = self.entries.lock().await;
        entries.retain(|(_, at, _)| at.elapsed() < VIEW_TTL);
        if let Some((_, _, v)) = entries.iter().find(|(k, ..)| *k == key) {
            return v.clone();
        }
        let v = build().await;
        if entries.len() >= Self::KEYS {
            entries.remove(0);
        }
        entries.push((key, Instant::now(), v.clone()));
        v
    }
}

/// Read the read token from `path`: one line, at least 16 characters.
pub fn read_token(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the read token from {}", path.display()))?;
    let token = text.trim();
    if token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!(
            "{}: a read token is one line of at least 16 characters without spaces \
             (make one with: head -c 32 /dev/urandom | xxd -p -c 64 > {})",
            path.display(),
            path.display()
        );
    }
    Ok(token.to_string())
}

/// Equal, in a time that does not depend on where they differ.
fn same_hash(a: &TokenHash, b: &TokenHash) -> bool {
    std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

/// The token of an `Authorization` header: `Bearer TOKEN`, or the password of `Basic`
/// credentials (a browser's login prompt; the user name is ignored).
fn presented_token(headers: &HeaderMap) -> Option<String> {
    use base64::Engine as _;
    let v = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_string()).filter(|t| !t.is_empty());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        return text.split_once(':').map(|(_, pw)| pw.to_string());
    }
    None
}

/// The fleet state server: shared by every connection.
pub struct Server {
    repo: PathBuf,
    hosts: Arc<RwLock<HostMap>>,
    /// The strings the hosts' entries share.
    syms: Arc<Mutex<Interner>>,
    tokens: RwLock<HashMap<TokenHash, String>>,
    /// The database as request handling reads it (the events API).
    reader: Arc<Mutex<Db>>,
    /// The database as the background host reload reads it.
    poller: Mutex<Db>,
    hosts_version: AtomicI64,
    /// How far [`Server::reload_hosts`] read the reports of other replicas.
    peer_mark: AtomicI64,
    /// Batches the writer has stored (counted after each commit), for [`Msg::Peers`].
    stored_batches: Arc<AtomicU64>,
    tx: mpsc::Sender<Msg>,
    cache: Mutex<RepoCache>,
    read_token: Option<TokenHash>,
    /// Whether request threads pack report bodies for the database ([`Db::packs_bodies`]).
    pack_bodies: bool,
    /// Which fleet policy and track indexes the hosts' kept rows were rendered under.
    policy_stamp: rows::PolicyStamp,
    #[allow(clippy::type_complexity)]
    page_views: TtlCache<
        (u64, Option<page::PageFilter>, Option<String>),
        Arc<(view::FleetView, page::RowCounts)>,
    >,
    test_hooks: bool,
    /// The rollout gate's last look at each rollout.
    gate_view: Mutex<Vec<gate::RolloutStatus>>,
}

impl Server {
    /// Open (or create) the state database and load the latest reports; starts the writer
    /// thread. `repo` is the repository directory whose `fleet.yaml` and track indexes the
    /// views use; with `read_token_file`, reads need the token it holds.
    pub fn open(
        repo: &Path,
        state: &Location,
        read_token_file: Option<&Path>,
    ) -> Result<Arc<Server>> {
        let read_token = read_token_file
            .map(|p| read_token(p).map(|t| db::token_hash(&t)))
            .transpose()?;
        let mut writer_db = Db::open(state)?;
        let reader = Db::open(state)?;
        let poller = Db::open(state)?;
        let tokens = poller.tokens()?;
        let version = poller.hosts_version()?;
        let mut hosts: HostMap = tokens.values().map(|h| (h.clone(), None)).collect();
        let (latest, peer_mark) = writer_db.latest_reports()?;
        let (loaded, syms) = load_entries(&mut writer_db, latest)?;
        writer_db.checkpoint_aside()?;
        let pack_bodies = writer_db.packs_bodies();
        let mut marks = HashMap::with_capacity(loaded.len());
        for (host, entry, window) in loaded {
            if let Some(slot) = hosts.get_mut(&host) {
                *slot = Some(Arc::new(entry));
            }
            marks.insert(host, window);
        }
        let syms = Arc::new(Mutex::new(syms));
        let hosts = Arc::new(RwLock::new(hosts));
        let (tx, rx) = mpsc::channel(QUEUE);
        let (nudge, nudges) = std::sync::mpsc::sync_channel(1);
        let shared = hosts.clone();
        let writer_syms = syms.clone();
        let stored_batches = Arc::new(AtomicU64::new(0));
        let batches = stored_batches.clone();
        std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || writer(writer_db, rx, nudge, shared, writer_syms, marks, batches))
            .context("starting the state writer")?;
        let server = Arc::new(Server {
            repo: repo.to_path_buf(),
            hosts,
            syms,
            tokens: RwLock::new(tokens),
            reader: Arc::new(Mutex::new(reader)),
            poller: Mutex::new(poller),
            hosts_version: AtomicI64::new(version),
            peer_mark: AtomicI64::new(peer_mark),
            stored_batches,
            tx,
            cache: Mutex::new(RepoCache::default()),
            read_token,
            pack_bodies,
            policy_stamp: rows::PolicyStamp::default(),
            page_views: TtlCache::new(),
            test_hooks: std::env::var(TEST_HOOKS_ENV).is_ok_and(|v| v == "1"),
            gate_view: Mutex::default(),
        });
        let weak = Arc::downgrade(&server);
        let lease = state.gate_lease();
        std::thread::Builder::new()
            .name("rollout-gate".into())
            .spawn(move || gate::run(weak, nudges, lease, view::DEFAULT_STALE_AFTER))
            .context("starting the rollout gate")?;
        Ok(server)
    }

    /// Background work on the current runtime: pick up hosts added or removed by
    /// `keepup host` and reports stored by other replicas (every second), and apply the event
    /// retention (every minute).
    pub fn spawn_background(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HOSTS_POLL);
            let mut last_prune = Instant::now();
            loop {
                tick.tick().await;
                let m = me.clone();
                let peers = tokio::task::spawn_blocking(move || {
                    if let Err(e) = m.reload_hosts() {
                        eprintln!("keepup serve: reading the host list: {e:#}");
                    }
                    m.read_peer_reports()
                        .map_err(|e| {
                            eprintln!("keepup serve: reading other replicas' reports: {e:#}")
                        })
                        .ok()
                })
                .await
                .unwrap_or_default();
                if let Some((since, reports)) = peers.filter(|(_, r)| !r.is_empty()) {
                    let _ = me.tx.send(Msg::Peers { since, reports }).await;
                }
                me.page_views.purge().await;
                if last_prune.elapsed() >= PRUNE_EVERY {
                    last_prune = Instant::now();
                    let _ = me.tx.send(Msg::Prune).await;
                }
            }
        });
    }

    /// Read the reports other replicas stored since the last look (PostgreSQL), for the
    /// writer to take in ([`Msg::Peers`]): how many batches this replica had stored when the
    /// read began, and each report's host, event window and summary.
    fn read_peer_reports(&self) -> Result<(u64, Vec<PeerReport>)> {
        // Counted before the query: a batch stored here after this may be newer than what
        // the query returns for its hosts (the writer then keeps its own).
        let since = self.stored_batches.load(Ordering::Acquire);
        let mark = self.peer_mark.load(Ordering::Relaxed);
        let poller = self.poller.lock().unwrap();
        let (rows, next) = poller.peer_reports(mark)?;
        let (mut loaded, stale) = from_summaries(rows, &mut self.syms.lock().unwrap());
        if !stale.is_empty() {
            // Stored by a replica of a keepup from before summaries.
            let hosts: Vec<&str> = stale.iter().map(|l| l.host.as_str()).collect();
            let bodies = poller.report_bodies(&hosts)?;
            loaded.extend(from_bodies(bodies, &mut self.syms.lock().unwrap()).0);
        }
        drop(poller);
        let out = loaded
            .into_iter()
            .map(|(host, entry, window)| (host, window, Arc::new(entry)))
            .collect();
        self.peer_mark.store(next, Ordering::Relaxed);
        Ok((since, out))
    }

    /// Re-read the host list if `keepup host` changed it.
    fn reload_hosts(&self) -> Result<()> {
        let db = self.poller.lock().unwrap();
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

    /// The host a bearer token belongs to, from the in-memory map only: an unknown token
    /// costs a hash and a lookup, never a database query. (The map is keyed by the token's
    /// SHA-256, which an attacker cannot steer, so the lookup's timing tells nothing about
    /// valid tokens.)
    fn authenticate(&self, token: &str) -> Option<String> {
        self.tokens
            .read()
            .unwrap()
            .get(&db::token_hash(token))
            .cloned()
    }

    /// Whether a read request may see the fleet: always without a read token, else only
    /// with it.
    fn may_read(&self, headers: &HeaderMap) -> bool {
        let Some(want) = &self.read_token else {
            return true;
        };
        presented_token(headers).is_some_and(|t| same_hash(&db::token_hash(&t), want))
    }

    /// The answer to a read without the read token: 401 with both challenges (a browser
    /// prompts for Basic credentials; programs send a bearer token).
    fn read_refused(&self) -> Response<Body> {
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            "this server's fleet views need its read token: send Authorization: Bearer TOKEN \
             (keepup report --read-token-file FILE), or log in with any user name and the token \
             as password",
        );
        let h = r.headers_mut();
        h.insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"keepup fleet\", charset=\"UTF-8\""),
        );
        h.append(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"keepup fleet\""),
        );
        r
    }

    /// The answer, with the test hook's header when [`TEST_HOOKS_ENV`] is set.
    fn finish(&self, mut r: Response<Body>) -> Response<Body> {
        if self.test_hooks {
            let n = self.reader.lock().unwrap().queries();
            r.headers_mut().insert(QUERIES_HEADER, HeaderValue::from(n));
        }
        r
    }

    /// `POST /api/v1/report`.
    pub async fn post_report(
        self: &Arc<Self>,
        req: Request<hyper::body::Incoming>,
    ) -> Response<Body> {
        let r = self.take_report(req).await;
        self.finish(r)
    }

    async fn take_report(self: &Arc<Self>, req: Request<hyper::body::Incoming>) -> Response<Body> {
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
        let Some(token_host) = self.authenticate(&token) else {
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
            return text(
                StatusCode::BAD_REQUEST,
                &format!("invalid report: {e}; the report is refused"),
            );
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
        // The summary, its encoding and the event window are made here, on the request's
        // thread (the writer, one thread for all reports, is the bound of ingestion).
        let received_at = db::now();
        let window = event_window(&report.events);
        let entry = HostEntry::new(&report, received_at, &mut self.syms.lock().unwrap());
        let summary = summary_codec::encode(&entry, report.sent_at, &window);
        let packed_body = if self.pack_bodies {
            db::pack_body(&body)
        } else {
            None
        };
        let Report {
            host,
            sent_at,
            events,
            ..
        } = report;
        let (done, stored) = oneshot::channel();
        let msg = Msg::Report {
            report: Box::new(Incoming {
                host,
                sent_at,
                received_at,
                body,
                packed_body,
                events,
                window,
                entry: Arc::new(entry),
                summary,
            }),
            done,
        };
        // A full queue or a slow store is a herd (or a stalled disk): the answer is `503`, to
        // which `keepup serve` adds a jittered `Retry-After`, not a wait the agent times out on.
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the server is storing other reports; send this one again after the \
                     Retry-After time",
                )
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return text(StatusCode::SERVICE_UNAVAILABLE, "the state writer stopped")
            }
        }
        match tokio::time::timeout(STORE_WAIT, stored).await {
            Err(_) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "the report was not stored within {} s (the database is slow or locked); \
                     send it again after the Retry-After time",
                    STORE_WAIT.as_secs()
                ),
            ),
            Ok(Ok(true)) => {
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

    /// The page's view (built on a blocking thread, at most once per [`VIEW_TTL`] and
    /// query): the hosts it shows only, and the fleet's row counts.
    async fn page_view(
        self: &Arc<Self>,
        stale_after: u64,
        q: &page::PageQuery,
    ) -> Arc<(view::FleetView, page::RowCounts)> {
        let key = (stale_after, q.filter, q.host.clone());
        let q = q.clone();
        self.page_views
            .get(key, || async {
                let me = self.clone();
                Arc::new(
                    tokio::task::spawn_blocking(move || me.build_page_view(stale_after, &q))
                        .await
                        .unwrap_or_default(),
                )
            })
            .await
    }

    /// See [`Server::page_view`]: the rows are counted and chosen from the rows kept in the
    /// hosts' summaries, and the view is built of the hosts of the first
    /// [`page::MAX_ROWS`] matching rows only (a million hosts' view is gigabytes).
    fn build_page_view(
        &self,
        stale_after: u64,
        q: &page::PageQuery,
    ) -> (view::FleetView, page::RowCounts) {
        let snapshot = self.snapshot();
        self.with_policy(|policy| {
            let now = db::now();
            let all = stream::counts(
                &snapshot,
                policy,
                now,
                stale_after,
                &view::Filter::default(),
            );
            // Without a filter in the query, the fleet's size chooses one.
            let chosen = page::choose(q, all.all_rows);
            let filter = chosen.rows();
            let hosts = match &q.host {
                Some(h) => snapshot
                    .binary_search_by(|(n, _)| n.as_str().cmp(h))
                    .map_or(&[][..], |i| &snapshot[i..=i]),
                None => &snapshot[..],
            };
            let (mut matched, mut rows, mut shown) = (0, 0, Vec::new());
            let _ = stream::in_order(
                hosts,
                |part| rows::kept(part, policy, now, stale_after, &filter, page::MAX_ROWS),
                |(m, kept)| {
                    matched += m;
                    for (h, n) in kept {
                        if rows < page::MAX_ROWS {
                            rows += n;
                            shown.push(h);
                        }
                    }
                    Ok(())
                },
            );
            let mut out = view::build(&shown, policy, now, stale_after);
            out.summary = all.summary;
            let counts = page::RowCounts {
                total: all.all_rows,
                matched,
            };
            (out, counts)
        })
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
            stamp: self.policy_stamp.of(&fleet, &indexes),
            ..view::Policy::default()
        };
        for (t, i) in &indexes {
            policy.indexes.insert(t.as_str(), i);
        }
        f(&policy)
    }

    /// Send the fleet view as JSON into `sink` as it is built ([`stream::json`]). With
    /// `with_events`, each host's latest [`EVENTS_PER_HOST`] events are read from the
    /// database (one index walk per host).
    fn stream_json(&self, stale_after: u64, with_events: bool, sink: stream::Sink) {
        let snapshot = self.snapshot();
        let done = self.with_policy(|policy| {
            let events = |hosts: &mut [view::HostView]| {
                if with_events {
                    self.fill_events(hosts);
                }
            };
            stream::json(
                &snapshot,
                policy,
                db::now(),
                stale_after,
                &events,
                &mut |b| sink.send(b),
            )
        });
        if done.is_ok() {
            sink.finish();
        }
    }

    /// Send the fleet view's table form (`keepup report`) into `sink` as it is rendered
    /// ([`stream::table`]).
    fn stream_table(&self, stale_after: u64, filter: view::Filter, sink: stream::Sink) {
        let snapshot = self.snapshot();
        let done = self.with_policy(|policy| {
            stream::table(
                &snapshot,
                policy,
                db::now(),
                stale_after,
                &filter,
                &mut |b| sink.send(b),
            )
        });
        if done.is_ok() {
            sink.finish();
        }
    }

    /// Each host's latest events from the database, oldest first (left empty if the log
    /// cannot be read: the view is still worth showing).
    fn fill_events(&self, hosts: &mut [view::HostView]) {
        let names: Vec<&str> = hosts.iter().map(|h| h.host.as_str()).collect();
        let events = self
            .reader
            .lock()
            .unwrap()
            .latest_events(&names, EVENTS_PER_HOST);
        match events {
            Ok(all) => {
                for (h, mut ev) in hosts.iter_mut().zip(all) {
                    ev.reverse();
                    h.events = ev;
                }
            }
            Err(e) => eprintln!("keepup serve: reading the event log for the view: {e:#}"),
        }
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

    /// `GET /api/v1/fleet[?stale_after=SECS&events=0]`: the JSON view, or with
    /// `form=table&rows=...` the table form, both sent as they are built.
    pub async fn fleet_json(
        self: &Arc<Self>,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Response<crate::serve::Body> {
        use http_body_util::BodyExt as _;
        if !self.may_read(headers) {
            return self
                .finish(self.read_refused())
                .map(|b| b.map_err(|never| match never {}).boxed());
        }
        let q = Query::parse(query);
        let (sink, body) = stream::channel();
        let me = self.clone();
        let content_type = match q.table {
            Some(rows) => {
                tokio::task::spawn_blocking(move || me.stream_table(q.stale_after, rows, sink));
                "text/tab-separated-values; charset=utf-8"
            }
            None => {
                tokio::task::spawn_blocking(move || me.stream_json(q.stale_after, q.events, sink));
                "application/json"
            }
        };
        let mut r = self.finish(Response::new(Body::new(Bytes::new())));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        r.map(|_| body.boxed())
    }

    /// `GET /api/v1/rollouts`: every rollout as the gate saw it last.
    pub async fn rollouts_json(self: &Arc<Self>, headers: &HeaderMap) -> Response<Body> {
        if !self.may_read(headers) {
            return self.finish(self.read_refused());
        }
        let list = self.gate_view.lock().unwrap().clone();
        let mut r = Response::new(Body::new(Bytes::from(
            serde_json::to_vec(&list).unwrap_or_default(),
        )));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        self.finish(r)
    }

    /// `GET /api/v1/events?host=NAME[&limit=N]`: a host's logged events, newest first
    /// (default 100, at most 1000).
    pub async fn events_json(
        self: &Arc<Self>,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Response<Body> {
        if !self.may_read(headers) {
            return self.finish(self.read_refused());
        }
        let r = self.events_answer(query).await;
        self.finish(r)
    }

    async fn events_answer(self: &Arc<Self>, query: Option<&str>) -> Response<Body> {
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

    /// `GET /[?filter=...&host=...]`: the page. It runs no script and loads nothing: the
    /// content security policy says so to the browser too.
    pub async fn page(
        self: &Arc<Self>,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Response<Body> {
        if !self.may_read(headers) {
            return self.finish(self.read_refused());
        }
        let q = Query::parse(query);
        let v = self.page_view(q.stale_after, &q.page).await;
        let rollouts = self.gate_view.lock().unwrap().clone();
        // Recent events: the host's, or the fleet's newest.
        let me = self.clone();
        let host = q.page.host.clone();
        let events = tokio::task::spawn_blocking(move || {
            let db = me.reader.lock().unwrap();
            match host {
                Some(h) => db
                    .events(&h, page::EVENTS_SHOWN)
                    .map(|ev| ev.into_iter().map(|e| (h.clone(), e)).collect()),
                None => db.recent_events(page::EVENTS_SHOWN),
            }
        })
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
        let html = page::render(&v.0, &q.page, &rollouts, &events, Some(v.1));
        let mut r = Response::new(Body::new(Bytes::from(html)));
        let h = r.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        h.insert(
            "content-security-policy",
            HeaderValue::from_static(
                "default-src 'none'; style-src 'unsafe-inline'; form-action 'none'; \
                 frame-ancestors 'none'",
            ),
        );
        h.insert(
            "x-content-type-options",
            HeaderValue::from_static("nosniff"),
        );
        h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
        self.finish(r)
    }
}

/// The query parameters the views take.
struct Query {
    stale_after: u64,
    events: bool,
    /// `form=table`: the table form, with the rows `rows=` selects.
    table: Option<view::Filter>,
    limit: usize,
    page: page::PageQuery,
}

impl Query {
    fn parse(query: Option<&str>) -> Query {
        let mut q = Query {
            stale_after: view::DEFAULT_STALE_AFTER,
            events: true,
            table: None,
            limit: 100,
            page: page::PageQuery::default(),
        };
        let mut pending_rows = None;
        for pair in query.unwrap_or("").split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned();
            match k {
                "stale_after" => q.stale_after = v.parse().unwrap_or(q.stale_after),
                "events" => q.events = v != "0",
                "form" if v == "table" => {
                    q.table.get_or_insert_with(view::Filter::default);
                }
                "rows" => {
                    let rows = report::parse_rows(&v);
                    if let Some(t) = &mut q.table {
                        *t = rows;
                    } else {
                        pending_rows = Some(rows);
                    }
                }
                "limit" => q.limit = v.parse().unwrap_or(q.limit),
                "filter" => {
                    q.page.filter = page::PageFilter::parse(&v);
                    q.page.unknown_filter = q.page.filter.is_none();
                }
                "host" => q.page.host = Some(v).filter(|h| !h.is_empty()),
                _ => {}
            }
        }
        if let (Some(t), Some(rows)) = (&mut q.table, pending_rows) {
            *t = rows;
        }
        q
    }
}

/// The writer thread: batches queued reports into one transaction each, then publishes them
/// in memory and answers their requests. It keeps each host's last event window (what is
/// new in the next report) and how many events it stored since its quota was last applied.
fn writer(
    mut db: Db,
    mut rx: mpsc::Receiver<Msg>,
    nudge: std::sync::mpsc::SyncSender<()>,
    hosts: Arc<RwLock<HostMap>>,
    syms: Arc<Mutex<Interner>>,
    mut windows: HashMap<String, EventWindow>,
    stored_batches: Arc<AtomicU64>,
) {
    let mut since_quota: HashMap<String, usize> = HashMap::new();
    let mut batch = Vec::with_capacity(BATCH);
    // With replicas: the batch that last stored each host, until no peer read can predate it.
    let replicas = db.has_peers();
    let mut stored_in: HashMap<String, u64> = HashMap::new();
    let mut batches = 0u64;
    while let Some(first) = rx.blocking_recv() {
        let mut prune = false;
        let mut take = |m: Msg, batch: &mut Vec<_>| match m {
            Msg::Prune => prune = true,
            Msg::Peers { since, reports } => {
                // A host added after the last host reload is known here already: its report
                // was stored only because it is registered.
                let mut map = hosts.write().unwrap();
                for (host, window, entry) in reports {
                    if stored_in.get(&host).is_some_and(|&b| b > since) {
                        continue;
                    }
                    windows.insert(host.clone(), window);
                    map.insert(host, Some(entry));
                }
                // Later peer reads began later: nothing stored before this one matters.
                stored_in.retain(|_, b| *b > since);
            }
            Msg::Report { report, done } => batch.push((report, done)),
        };
        take(first, &mut batch);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => take(m, &mut batch),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            // Per report: where its new events start and whether its host's quota applies (its
            // summary and encoding came made by its request's thread).
            let mut plan: Vec<(usize, bool)> = Vec::with_capacity(batch.len());
            let mut next_windows: HashMap<&str, &[u32]> = HashMap::new();
            let mut next_counts: HashMap<&str, usize> = HashMap::new();
            for (report, _) in &batch {
                let host = report.host.as_str();
                // Two reports of one host in a batch: the second sees the first's window.
                let prev = next_windows
                    .get(host)
                    .copied()
                    .or_else(|| windows.get(host).map(Vec::as_slice))
                    .unwrap_or(&[]);
                let seen = stored_before(prev, &report.window);
                let count = next_counts
                    .get(host)
                    .copied()
                    .unwrap_or_else(|| since_quota.get(host).copied().unwrap_or(0))
                    + (report.events.len() - seen);
                let quota = count >= QUOTA_SLACK;
                next_counts.insert(host, if quota { 0 } else { count });
                next_windows.insert(host, &report.window);
                plan.push((seen, quota));
            }
            let rows: Vec<StoredReport<'_>> = batch
                .iter()
                .zip(&plan)
                .map(|((r, _), (seen, quota))| StoredReport {
                    host: &r.host,
                    received_at: r.received_at,
                    sent_at: r.sent_at,
                    body: &r.body,
                    packed_body: r.packed_body.as_deref(),
                    summary: &r.summary,
                    new_events: &r.events[*seen..],
                    apply_quota: *quota,
                })
                .collect();
            let ok = match db.store(&rows, EVENTS_KEPT_PER_HOST) {
                Ok(()) => true,
                Err(e) => {
                    eprintln!("keepup serve: storing {} report(s): {e:#}", rows.len());
                    false
                }
            };
            drop(rows);
            drop(next_windows);
            if ok {
                batches += 1;
                if replicas {
                    for (r, _) in &batch {
                        stored_in.insert(r.host.clone(), batches);
                    }
                }
                stored_batches.store(batches, Ordering::Release);
                for (h, n) in next_counts {
                    match since_quota.get_mut(h) {
                        Some(c) => *c = n,
                        None => {
                            since_quota.insert(h.to_string(), n);
                        }
                    }
                }
                let mut map = hosts.write().unwrap();
                for (r, _) in &batch {
                    if let Some(slot) = map.get_mut(r.host.as_str()) {
                        *slot = Some(r.entry.clone());
                    }
                }
                drop(map);
                // In batch order: a host's last report leaves its window.
                for (r, _) in &mut batch {
                    let w = std::mem::take(&mut r.window);
                    match windows.get_mut(&r.host) {
                        Some(slot) => *slot = w,
                        None => {
                            windows.insert(r.host.clone(), w);
                        }
                    }
                }
            }
            for (_, done) in batch.drain(..) {
                let _ = done.send(ok);
            }
            // The rollout gate looks at the new reports (a full channel: it will anyway).
            let _ = nudge.try_send(());
        }
        if prune {
            if let Err(e) = db.prune(db::now(), EVENT_MAX_AGE) {
                eprintln!("keepup serve: event retention: {e:#}");
            }
            // Forget hosts that are gone.
            let map = hosts.read().unwrap();
            windows.retain(|h, _| map.contains_key(h));
            since_quota.retain(|h, _| map.contains_key(h));
            drop(map);
            syms.lock().unwrap().forget_unused();
        }
    }
}

/// A stored latest report, loaded: its host, summary and event window.
type Loaded = (String, HostEntry, EventWindow);

/// Decode the summaries of `rows`, their strings from `syms`. Rows whose summary is missing,
/// made for another report (an older keepup rewrote the row without it) or damaged are
/// returned as they came, to be loaded from their bodies ([`from_bodies`]).
fn from_summaries(rows: Vec<db::Latest>, syms: &mut Interner) -> (Vec<Loaded>, Vec<db::Latest>) {
    let mut loaded = Vec::with_capacity(rows.len());
    let mut stale = Vec::new();
    for row in rows {
        let decoded = row
            .summary
            .as_deref()
            .filter(|b| summary_codec::stamp(b) == Ok((row.received_at, row.sent_at)))
            .and_then(|b| summary_codec::decode(b, syms).ok());
        match decoded {
            Some((entry, _, window)) => loaded.push((row.host, entry, window)),
            None => stale.push(row),
        }
    }
    (loaded, stale)
}

/// Parse stored report bodies: what each loads as, and its summary encoded for the database
/// (host, received_at, sent_at, summary).
fn from_bodies(
    bodies: Vec<db::LatestBody>,
    syms: &mut Interner,
) -> (Vec<Loaded>, Vec<db::MadeSummary>) {
    let mut loaded = Vec::with_capacity(bodies.len());
    let mut made = Vec::with_capacity(bodies.len());
    for (host, received_at, sent_at, body) in bodies {
        let Ok(report) = serde_json::from_slice::<Report>(&body) else {
            eprintln!("keepup serve: the stored report of {host} does not parse; ignored");
            continue;
        };
        drop(body);
        let (_, window) = new_events(&[], &report.events);
        let entry = HostEntry::new(&report, received_at, syms);
        made.push((
            host.clone(),
            received_at,
            sent_at,
            summary_codec::encode(&entry, sent_at, &window),
        ));
        loaded.push((host, entry, window));
    }
    (loaded, made)
}

/// `f` on parts of `items`, one part per core (up to 8), each with strings of its own; the
/// results in no particular order, and the strings they share.
fn on_cores<T: Send, R: Send>(
    items: Vec<T>,
    f: impl Fn(Vec<T>, &mut Interner) -> R + Sync,
) -> (Vec<R>, Interner) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let chunk = items.len().div_ceil(threads).max(1);
    let mut items = items;
    let mut chunks = Vec::new();
    while items.len() > chunk {
        let rest = items.split_off(items.len() - chunk);
        chunks.push(rest);
    }
    chunks.push(items);
    let f = &f;
    let mut out = Vec::new();
    let mut syms = Interner::default();
    std::thread::scope(|sc| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|part| {
                sc.spawn(move || {
                    let mut syms = Interner::default();
                    let r = f(part, &mut syms);
                    (r, syms)
                })
            })
            .collect();
        for h in handles {
            if let Ok((r, part_syms)) = h.join() {
                out.push(r);
                // The parts keep their own copies of the strings they share (a few per
                // distinct string); new reports use the merged set.
                syms.absorb(part_syms);
            }
        }
    });
    (out, syms)
}

/// Stored reports loaded per host at start, in parts of this many when read from bodies.
const BODIES_AT_ONCE: usize = 10_000;

/// The entries and event windows of the stored latest reports, and the strings they share:
/// decoded from their summaries on every core (a few hundred bytes per host). Reports without
/// a usable summary (stored by a keepup from before summaries) are parsed from their bodies,
/// a part at a time, and their summaries stored, so the next start reads only summaries.
fn load_entries(db: &mut Db, latest: Vec<db::Latest>) -> Result<(Vec<Loaded>, Interner)> {
    let (parts, mut syms) = on_cores(latest, from_summaries);
    let mut all = Vec::with_capacity(parts.iter().map(|p| p.0.len() + p.1.len()).sum());
    let mut stale = Vec::new();
    for (loaded, rest) in parts {
        all.extend(loaded);
        stale.extend(rest);
    }
    if !stale.is_empty() {
        eprintln!(
            "keepup serve: {} stored report(s) have no summary yet; reading their bodies once",
            stale.len()
        );
    }
    for part in stale.chunks(BODIES_AT_ONCE) {
        let hosts: Vec<&str> = part.iter().map(|l| l.host.as_str()).collect();
        let bodies = db.report_bodies(&hosts)?;
        let (parsed, part_syms) = on_cores(bodies, from_bodies);
        syms.absorb(part_syms);
        let mut made = Vec::new();
        for (loaded, m) in parsed {
            all.extend(loaded);
            made.extend(m);
        }
        db.put_summaries(&made)
            .context("storing the summaries of reports stored before summaries")?;
    }
    Ok((all, syms))
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

    /// The kinds of the events `new_events` finds new after `prev`, and the new window.
    fn fresh(prev: &[u32], events: &[Event]) -> (Vec<String>, EventWindow) {
        let (seen, w) = new_events(prev, events);
        (
            events[seen..].iter().map(|e| e.kind.to_string()).collect(),
            w,
        )
    }

    #[test]
    fn resent_events_are_not_new() {
        let (a, w) = fresh(&[], &[ev(1, "a"), ev(2, "b")]);
        assert_eq!(a, ["a", "b"]);
        // Resent with one more at the same second and one later.
        let (b, w) = fresh(&w, &[ev(1, "a"), ev(2, "b"), ev(2, "c"), ev(3, "d")]);
        assert_eq!(b, ["c", "d"]);
        // The window slid: the oldest fell out, nothing new.
        let (c, w2) = fresh(&w, &[ev(2, "b"), ev(2, "c"), ev(3, "d")]);
        assert!(c.is_empty());
        // The same event twice is two events.
        let (d, _) = fresh(&w2, &[ev(2, "c"), ev(3, "d"), ev(3, "d")]);
        assert_eq!(d, ["d"]);
    }

    #[test]
    fn a_clock_that_jumped_ahead_hides_nothing() {
        let future = 4_000_000_000;
        let (a, w) = fresh(&[], &[ev(100, "a"), ev(future, "jump")]);
        assert_eq!(a, ["a", "jump"]);
        // The clock is fixed: later events carry earlier times, and are new all the same.
        let (b, w) = fresh(&w, &[ev(100, "a"), ev(future, "jump"), ev(101, "b")]);
        assert_eq!(b, ["b"]);
        // An agent that lost its window starts over: everything it sends is new.
        let (c, _) = fresh(&w, &[ev(102, "c")]);
        assert_eq!(c, ["c"]);
    }

    #[test]
    fn views_are_built_once_per_ttl_and_key() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cache = TtlCache::<u64, u64>::new();
        let builds = std::cell::Cell::new(0);
        let build = |v: u64| {
            builds.set(builds.get() + 1);
            async move { v }
        };
        rt.block_on(async {
            assert_eq!(cache.get(1, || build(10)).await, 10);
            assert_eq!(cache.get(1, || build(11)).await, 10, "served again");
            assert_eq!(cache.get(2, || build(20)).await, 20, "another key");
            cache.entries.lock().await[0].1 -= VIEW_TTL;
            assert_eq!(cache.get(1, || build(12)).await, 12, "expired");
        });
        assert_eq!(builds.get(), 3);
    }

    #[test]
    fn read_tokens_as_bearer_or_basic_password() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_token(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert_eq!(presented_token(&h).as_deref(), Some("abc"));
        // base64("ops:s3cret:x")
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_static("Basic b3BzOnMzY3JldDp4"),
        );
        assert_eq!(presented_token(&h).as_deref(), Some("s3cret:x"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic !!"));
        assert_eq!(presented_token(&h), None);
        let a = db::token_hash("abc");
        assert!(same_hash(&a, &db::token_hash("abc")) && !same_hash(&a, &db::token_hash("abd")));
    }
}
