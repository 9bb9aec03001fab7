//! `keepup repo sync`: publish the repository to S3-compatible object storage (AWS S3, MinIO,
//! Ceph RGW, GCS interop), where a CDN can serve it to stock apt, dnf and the agents.
//!
//! Readers of the bucket never see a torn repository because objects go up in stages, each
//! one finished before the next starts ([`Stage`]): files named by content (pool, by-hash,
//! DNF metadata) and the public keys first; then the per-track `Packages` files; then the
//! signed roots that name them (`InRelease`, `repomd.xml`, `index.json`, ...); and last the
//! agents' commit, `fleet.yaml.asc`, which binds each track's index by hash. A reader holding
//! any root finds every file it names. Objects the repository no longer has are deleted only
//! after `--grace` (a reader may hold a root that still names them): `keepup-sync.json` in the
//! bucket records when each was first seen unreferenced, and what each object uploaded hashes
//! to (so a multipart upload, whose ETag is no MD5, is still skipped when unchanged).
//!
//! Only what a repository serves may be uploaded ([`classify`], an allow-list): `.keepup/`
//! is never read, and any other file is refused and named; a file that would be uploaded and
//! holds a secret key stops the sync before anything is sent.
//!
//! The plan is pure ([`plan`]); the thin layer below it lists, uploads and deletes with
//! Apache Arrow's `object_store` (SigV4 signing, retries, multipart), holding the
//! repository's lock so that no command changes the tree while it is read.

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use md5::Digest as _;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{Attribute, Attributes, ObjectStore, ObjectStoreExt as _, PutOptions};
use serde::{Deserialize, Serialize};

use super::crash::{self, Step};

/// The object, under the prefix, where a sync keeps what it uploaded and what awaits
/// deletion.
pub const STATE_OBJECT: &str = "keepup-sync.json";

/// Files larger than this go up in parts (parts retry alone, and memory stays bounded: a
/// smaller file is read whole, `--jobs` of them at a time).
const MULTIPART_OVER: u64 = 16 * 1024 * 1024;

/// Part size of a multipart upload (S3's minimum is 5 MiB).
const PART_SIZE: usize = 8 * 1024 * 1024;

/// The stages of a sync, in upload order. Each stage finishes before the next starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Files named by content or immutable (pool, by-hash, DNF metadata, rpm package links),
    /// and the public keys and rotation statement (learned before anything they sign).
    Content,
    /// Per-track indexes at fixed names (`Packages`, `Packages.gz`): apt fetches them by hash,
    /// older clients by name.
    Indexes,
    /// The signed roots: `InRelease`, `Release` (+ `.gpg`), `repomd.xml` (+ `.asc`),
    /// `index.json` (+ `.sig`), `rollout.json.asc`, `fleet.yaml` (+ `.sig`).
    Roots,
    /// `fleet.yaml.asc`: the agents' entry point, binding each track's index by hash.
    Commit,
}

impl Stage {
    /// Every stage, in upload order.
    pub const ALL: [Stage; 4] = [Stage::Content, Stage::Indexes, Stage::Roots, Stage::Commit];

    /// What the stage uploads, for progress lines.
    pub fn label(self) -> &'static str {
        match self {
            Stage::Content => "pool, by-hash and keys",
            Stage::Indexes => "per-track indexes",
            Stage::Roots => "signed roots",
            Stage::Commit => "fleet.yaml.asc",
        }
    }
}

/// Where a repository lands: `s3://BUCKET/PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The bucket.
    pub bucket: String,
    /// The key prefix, without leading or trailing `/` (empty: the bucket's root).
    pub prefix: String,
}

impl Target {
    /// Parse `s3://BUCKET` or `s3://BUCKET/PREFIX`.
    pub fn parse(s: &str) -> Result<Target, String> {
        let rest = s.strip_prefix("s3://").ok_or_else(|| {
            format!("--to {s:?}: expected s3://BUCKET/PREFIX (for example s3://packages/keepup)")
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !bucket_ok {
            return Err(format!(
                "--to {s:?}: bucket name {bucket:?} is not valid: 3-63 characters of a-z 0-9 . -, \
                 starting and ending with a letter or digit"
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix
            .split('/')
            .any(|p| p == "." || p == ".." || (p.is_empty() && !prefix.is_empty()))
        {
            return Err(format!(
                "--to {s:?}: prefix {prefix:?} has an empty, `.` or `..` segment"
            ));
        }
        Ok(Target {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// The object key of a repository path (`dists/stable/InRelease`).
    pub fn key(&self, rel: &str) -> String {
        if self.prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.prefix)
        }
    }

    /// The repository path of an object key under the prefix (None outside it).
    pub fn rel<'a>(&self, key: &'a str) -> Option<&'a str> {
        if self.prefix.is_empty() {
            Some(key)
        } else {
            key.strip_prefix(&self.prefix)?.strip_prefix('/')
        }
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The stage a repository path is uploaded in, or None when a repository does not serve it
/// (then it is refused). Pure: the allow-list of what may leave the machine.
pub fn classify(rel: &str) -> Option<Stage> {
    let parts: Vec<&str> = rel.split('/').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || p.starts_with('.') || *p == "..")
    {
        return None;
    }
    match parts.as_slice() {
        ["pool", .., _] if parts.len() >= 3 => Some(Stage::Content),
        ["keys", "repository.asc" | "repository.gpg" | "rotation.asc"] => Some(Stage::Content),
        ["dists", _, "InRelease" | "Release" | "Release.gpg"] => Some(Stage::Roots),
        ["dists", _, "main", arch, "Packages" | "Packages.gz"] if arch.starts_with("binary-") => {
            Some(Stage::Indexes)
        }
        ["dists", _, "main", arch, "by-hash", "SHA256", h]
            if arch.starts_with("binary-") && is_sha256(h) =>
        {
            Some(Stage::Content)
        }
        ["rpm", _, "packages", f] if f.ends_with(".rpm") => Some(Stage::Content),
        ["rpm", _, "repodata", "repomd.xml" | "repomd.xml.asc"] => Some(Stage::Roots),
        ["rpm", _, "repodata", f]
            if f.split_once('-').is_some_and(|(h, _)| is_sha256(h))
                && (f.ends_with(".xml.gz") || f.ends_with(".xml.zst") || f.ends_with(".xml")) =>
        {
            Some(Stage::Content)
        }
        ["tracks", _, "index.json" | "index.json.sig" | "rollout.json.asc"] => Some(Stage::Roots),
        ["tracks", _, "by-hash", "SHA256", h] if is_sha256(h) => Some(Stage::Content),
        ["fleet.yaml" | "fleet.yaml.sig"] => Some(Stage::Roots),
        [p] if *p == crate::fleet::SIGNED_POLICY => Some(Stage::Commit),
        _ => None,
    }
}

/// Whether an object never changes once written (named by content, or a pool file), so a
/// CDN may cache it for ever; everything else is an index that must be revalidated often.
pub fn immutable(rel: &str) -> bool {
    classify(rel) == Some(Stage::Content) && !rel.starts_with("keys/")
}

/// `Cache-Control` of an object.
pub fn cache_control(rel: &str) -> &'static str {
    if immutable(rel) {
        "public, max-age=31536000, immutable"
    } else {
        "public, max-age=60"
    }
}

/// Does `data` hold a secret key (OpenPGP, or PEM)?
pub fn holds_secret_key(data: &[u8]) -> bool {
    const MARKERS: [&[u8]; 2] = [b"PRIVATE KEY BLOCK-----", b"PRIVATE KEY-----"];
    MARKERS
        .iter()
        .any(|m| data.windows(m.len()).any(|w| w == *m))
}

/// One file of the local repository that will be uploaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalFile {
    /// Path inside the repository, `/`-separated.
    pub rel: String,
    /// Its stage.
    pub stage: Stage,
    /// Size in bytes.
    pub size: u64,
    /// Hex SHA-256.
    pub sha256: String,
    /// Hex MD5 (the ETag S3 gives a single-part upload).
    pub md5: String,
}

/// One object found under the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteObject {
    /// Size in bytes.
    pub size: u64,
    /// Its ETag, without quotes.
    pub etag: Option<String>,
}

/// What the last syncs recorded in [`STATE_OBJECT`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    /// Per repository path: what its object hashes to, and the ETag the upload got.
    #[serde(default)]
    pub uploaded: BTreeMap<String, Uploaded>,
    /// Per repository path no longer in the repository: when a sync first saw that (Unix
    /// seconds). Deleted `grace` after.
    #[serde(default)]
    pub unreferenced: BTreeMap<String, u64>,
}

/// An object a sync uploaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uploaded {
    /// Hex SHA-256 of its bytes.
    pub sha256: String,
    /// The ETag the store answered, without quotes.
    pub etag: Option<String>,
}

/// What a sync will do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Files to upload, by stage (stages in upload order; each list sorted by path).
    pub uploads: Vec<(Stage, Vec<LocalFile>)>,
    /// Files whose object already holds the same bytes.
    pub unchanged: usize,
    /// Objects to delete now: unreferenced for at least the grace period.
    pub delete: Vec<String>,
    /// Objects unreferenced but still within the grace period, with when first seen so.
    pub pending: BTreeMap<String, u64>,
}

fn unquote(etag: &str) -> &str {
    etag.trim_matches('"')
}

/// Does the object already hold `f`'s bytes? Same size and either the MD5 ETag of a single
/// PUT, or the ETag a previous sync recorded for these very bytes.
fn same(f: &LocalFile, o: &RemoteObject, state: &SyncState) -> bool {
    if o.size != f.size {
        return false;
    }
    let etag = o.etag.as_deref().map(unquote);
    if etag == Some(f.md5.as_str()) {
        return true;
    }
    state
        .uploaded
        .get(&f.rel)
        .is_some_and(|u| u.sha256 == f.sha256 && etag.is_some() && u.etag.as_deref() == etag)
}

/// Plan a sync: upload what differs, stage by stage; delete what has been unreferenced for
/// `grace` seconds at `now`; start the clock for what just became unreferenced. `remote` is
/// keyed by repository path; objects outside the allow-list are not ours and never deleted.
pub fn plan(
    local: &[LocalFile],
    remote: &BTreeMap<String, RemoteObject>,
    state: &SyncState,
    now: u64,
    grace: u64,
) -> Plan {
    let mut out = Plan::default();
    for stage in Stage::ALL {
        let mut files: Vec<LocalFile> = local
            .iter()
            .filter(|f| f.stage == stage)
            .filter(|f| match remote.get(&f.rel) {
                Some(o) if same(f, o, state) => {
                    out.unchanged += 1;
                    false
                }
                _ => true,
            })
            .cloned()
            .collect();
        files.sort_by(|a, b| a.rel.cmp(&b.rel));
        if !files.is_empty() {
            out.uploads.push((stage, files));
        }
    }
    let have: std::collections::HashSet<&str> = local.iter().map(|f| f.rel.as_str()).collect();
    for rel in remote.keys() {
        if have.contains(rel.as_str()) || classify(rel).is_none() {
            continue;
        }
        let since = state.unreferenced.get(rel).copied().unwrap_or(now);
        if now.saturating_sub(since) >= grace {
            out.delete.push(rel.clone());
        } else {
            out.pending.insert(rel.clone(), since);
        }
    }
    out
}

/// The local repository, scanned: what will be uploaded, and what is refused.
#[derive(Debug, Default)]
pub struct Scan {
    /// Files of the repository, with their hashes.
    pub files: Vec<LocalFile>,
    /// Paths that are not part of a repository (never uploaded).
    pub refused: Vec<String>,
}

/// The package files the repository published (from its state): only these leave the
/// machine from `pool/` and the rpm views' `packages/`, so a stray file dropped there (a key,
/// a dump) is refused however it is named.
#[derive(Debug, Default)]
pub struct Published {
    /// Pool path -> sha256.
    pool: std::collections::HashMap<String, String>,
    /// Every published package's sha256 (the rpm views link pool files under other names).
    sha256: std::collections::HashSet<String>,
}

impl Published {
    /// From the repository's pool entries.
    pub fn new(entries: &[super::PoolEntry]) -> Published {
        Published {
            pool: entries
                .iter()
                .map(|e| (e.path.clone(), e.sha256.clone()))
                .collect(),
            sha256: entries.iter().map(|e| e.sha256.clone()).collect(),
        }
    }
}

/// Walk the repository at `root`: hash every file the allow-list admits, name every other
/// one; `.keepup/` (the private state) and temporary `.tmp-*` files are skipped unread. A
/// package file must be one `published` lists (a pool file with the sha256 the state
/// records: one that differs is an error). A file to upload that holds a secret key is an
/// error.
pub fn scan(root: &Path, published: &Published) -> Result<Scan> {
    let mut out = Scan::default();
    let mut stack = vec![PathBuf::new()];
    while let Some(dir) = stack.pop() {
        let full = root.join(&dir);
        let entries =
            std::fs::read_dir(&full).with_context(|| format!("reading {}", full.display()))?;
        for e in entries {
            let e = e?;
            let name = e.file_name();
            let name = name
                .to_str()
                .ok_or_else(|| anyhow!("{}: a name that is not UTF-8", e.path().display()))?;
            let rel = dir.join(name);
            let rel_s = rel.to_string_lossy().into_owned();
            if rel_s == ".keepup" || name.starts_with(".tmp-") {
                continue;
            }
            let ty = e.file_type()?;
            if ty.is_dir() {
                stack.push(rel);
                continue;
            }
            let Some(stage) = classify(&rel_s).filter(|_| ty.is_file()) else {
                out.refused.push(rel_s);
                continue;
            };
            // Package files are the operator's payloads, checked by `publish`; everything
            // else the repository wrote itself and must hold no secret key.
            let pool = rel_s.starts_with("pool/");
            let package = pool || rel_s.contains("/packages/");
            if pool && !published.pool.contains_key(&rel_s) {
                out.refused.push(rel_s);
                continue;
            }
            let (size, sha256, md5) = hash_file(&e.path(), !package)
                .with_context(|| format!("reading {}", e.path().display()))?;
            if pool && published.pool.get(&rel_s) != Some(&sha256) {
                bail!(
                    "{} is not the file the repository published (its sha256 is {sha256}, the \
                     state says {}): refusing to sync; run `keepup repo verify` and restore it",
                    e.path().display(),
                    published.pool[&rel_s]
                );
            }
            if package && !published.sha256.contains(&sha256) {
                out.refused.push(rel_s);
                continue;
            }
            out.files.push(LocalFile {
                rel: rel_s,
                stage,
                size,
                sha256,
                md5,
            });
        }
    }
    out.files.sort_by(|a, b| a.rel.cmp(&b.rel));
    out.refused.sort();
    Ok(out)
}

/// Size, SHA-256 and MD5 of a file; with `check_secret`, an error if it holds a secret key.
fn hash_file(path: &Path, check_secret: bool) -> Result<(u64, String, String)> {
    let mut f = std::fs::File::open(path)?;
    let (mut sha, mut md5) = (sha2::Sha256::new(), md5::Md5::new());
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    // The marker may straddle two reads: keep the tail of the previous one.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        md5.update(&buf[..n]);
        size += n as u64;
        if check_secret {
            tail.extend_from_slice(&buf[..n]);
            if holds_secret_key(&tail) {
                bail!(
                    "{} holds a secret key: refusing to sync (move the key out of the repository, \
                     e.g. with `keepup repo move-key`, and publish its public half only)",
                    path.display()
                );
            }
            let keep = tail.len().saturating_sub(32);
            tail.drain(..keep);
        }
    }
    Ok((
        size,
        hex::encode(sha.finalize()),
        hex::encode(md5.finalize()),
    ))
}

/// How to reach the store.
#[derive(Debug, Clone, Default)]
pub struct Endpoint {
    /// `--endpoint URL` (MinIO, Ceph RGW, GCS interop, ...); None: AWS, or `AWS_ENDPOINT_URL`.
    pub url: Option<String>,
    /// `--region`; None: `AWS_REGION`/`AWS_DEFAULT_REGION`, the profile's, or us-east-1.
    pub region: Option<String>,
}

/// Access keys read from the AWS shared files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProfileKeys {
    /// `aws_access_key_id`.
    pub access_key_id: Option<String>,
    /// `aws_secret_access_key`.
    pub secret_access_key: Option<String>,
    /// `aws_session_token`.
    pub session_token: Option<String>,
    /// `region` (from the config file).
    pub region: Option<String>,
}

/// Read section `section` of an INI file as the AWS CLI writes them (`[name]`, `key = value`,
/// `#` and `;` comments). Pure.
pub fn ini_section(text: &str, section: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
    }
    out
}

/// The keys and region of `profile` from the shared credentials file and the config file
/// (`[profile NAME]` there, `[default]` for the default).
pub fn profile_keys(credentials: &str, config: &str, profile: &str) -> ProfileKeys {
    let creds = ini_section(credentials, profile);
    let config_section = if profile == "default" {
        "default".to_string()
    } else {
        format!("profile {profile}")
    };
    let conf = ini_section(config, &config_section);
    let get = |k: &str| creds.get(k).or_else(|| conf.get(k)).cloned();
    ProfileKeys {
        access_key_id: get("aws_access_key_id"),
        secret_access_key: get("aws_secret_access_key"),
        session_token: get("aws_session_token"),
        region: conf.get("region").cloned(),
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The S3 client: the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`, web identity, container and
/// instance credentials, as object_store reads them), then the shared files
/// (`~/.aws/credentials`, `~/.aws/config`, `AWS_PROFILE`), then the flags.
fn store(target: &Target, endpoint: &Endpoint) -> Result<AmazonS3> {
    // reqwest's rustls has no provider of its own here: the tree's one is ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = AmazonS3Builder::from_env().with_bucket_name(&target.bucket);
    let home = env("HOME").map(PathBuf::from);
    let read = |var: &str, default: &str| {
        env(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(default)))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    };
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let keys = profile_keys(
        &read("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
        &read("AWS_CONFIG_FILE", "config"),
        &profile,
    );
    if env("AWS_ACCESS_KEY_ID").is_none() {
        if let (Some(id), Some(secret)) = (&keys.access_key_id, &keys.secret_access_key) {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
            if let Some(t) = &keys.session_token {
                b = b.with_token(t);
            }
        }
    }
    let region = endpoint
        .region
        .clone()
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .or(keys.region)
        .unwrap_or_else(|| "us-east-1".into());
    b = b.with_region(region);
    let url = endpoint.url.clone().or_else(|| env("AWS_ENDPOINT_URL"));
    if let Some(url) = url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("--endpoint {url:?}: expected an http:// or https:// URL");
        }
        // A plain-http endpoint (a local MinIO or test server) is allowed because it was
        // named; path-style requests, which every S3-compatible server answers.
        b = b
            .with_allow_http(url.starts_with("http://"))
            .with_endpoint(url.trim_end_matches('/'))
            .with_virtual_hosted_style_request(false);
    }
    b.build().context("setting up the S3 client")
}

/// Options of one sync.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Where to.
    pub target: Target,
    /// How to reach it.
    pub endpoint: Endpoint,
    /// Seconds an unreferenced object is kept before it is deleted.
    pub grace: u64,
    /// Uploads in flight at once.
    pub jobs: usize,
}

/// What a sync did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Objects uploaded, per stage.
    pub uploaded: BTreeMap<Stage, usize>,
    /// Bytes uploaded.
    pub bytes: u64,
    /// The repository paths uploaded, in upload order.
    pub files: Vec<String>,
    /// Files whose object already held the same bytes.
    pub unchanged: usize,
    /// Objects deleted (unreferenced for longer than the grace period).
    pub deleted: Vec<String>,
    /// Objects unreferenced, kept until the grace period ends.
    pub pending_deletion: usize,
    /// Files of the tree that are not part of a repository and were not uploaded.
    pub refused: Vec<String>,
}

/// Progress on a terminal (stderr), one line rewritten in place; silent otherwise.
struct Progress {
    tty: bool,
    done: AtomicUsize,
    bytes: AtomicU64,
}

impl Progress {
    fn show(&self, stage: Stage, total: usize) {
        if self.tty {
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r\x1b[Ksync: {:<24} {}/{} objects, {:.1} MiB",
                stage.label(),
                self.done.load(Ordering::Relaxed),
                total,
                self.bytes.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0)
            );
            let _ = err.flush();
        }
    }

    fn end(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// The object key for `key` exactly as written. `ObjectPath::from` would percent-encode
/// characters such as `~` (common in Debian versions: `foo_1.0~rc1-1_amd64.deb`), so the
/// object would not be where apt and dnf look for it.
fn object_path(key: &str) -> Result<ObjectPath> {
    ObjectPath::parse(key).map_err(|e| anyhow!("{key:?} cannot be an object key: {e}"))
}

/// Sync the repository at `root` to the bucket: scan, plan, upload stage by stage, record,
/// then delete what the grace period lets go. Holds the repository's lock throughout.
pub fn sync(repo: &super::Repo, opts: &SyncOptions) -> Result<Summary> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let published = Published::new(&repo.pool()?);
    rt.block_on(run(&repo.root, &published, opts))
}

async fn run(root: &Path, published: &Published, opts: &SyncOptions) -> Result<Summary> {
    let scan = tokio::task::block_in_place(|| scan(root, published))?;
    let store = Arc::new(store(&opts.target, &opts.endpoint)?);
    let where_ = format!("s3://{}/{}", opts.target.bucket, opts.target.prefix);
    let prefix = match opts.target.prefix.is_empty() {
        true => None,
        false => Some(object_path(&opts.target.prefix)?),
    };
    let listed: Vec<_> = store
        .list(prefix.as_ref())
        .try_collect()
        .await
        .map_err(|e| anyhow!("listing {where_}: {e} (check the bucket name, --endpoint, --region and the credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, ~/.aws/credentials (AWS_PROFILE), or an instance role)"))?;
    let mut remote = BTreeMap::new();
    for o in listed {
        if let Some(rel) = opts.target.rel(o.location.as_ref()) {
            remote.insert(
                rel.to_string(),
                RemoteObject {
                    size: o.size,
                    etag: o.e_tag.as_deref().map(|e| unquote(e).to_string()),
                },
            );
        }
    }
    let state_path = object_path(&opts.target.key(STATE_OBJECT))?;
    let mut state: SyncState = match store.get(&state_path).await {
        Ok(r) => {
            let bytes = r.bytes().await?;
            serde_json::from_slice(&bytes).with_context(|| {
                format!("{where_}/{STATE_OBJECT} is not a keepup sync record: delete it, and the next sync rewrites it")
            })?
        }
        Err(object_store::Error::NotFound { .. }) => SyncState::default(),
        Err(e) => return Err(anyhow!("reading {where_}/{STATE_OBJECT}: {e}")),
    };
    let now = super::views::now();
    let plan = plan(&scan.files, &remote, &state, now, opts.grace);
    let mut summary = Summary {
        unchanged: plan.unchanged,
        refused: scan.refused,
        ..Summary::default()
    };
    let progress = Arc::new(Progress {
        tty: std::io::stderr().is_terminal(),
        done: AtomicUsize::new(0),
        bytes: AtomicU64::new(0),
    });
    // A crash test kills the sync at a stage boundary: one upload at a time makes that
    // boundary exact.
    let jobs = if crash::armed() { 1 } else { opts.jobs.max(1) };
    let result = upload_stages(
        root,
        &store,
        opts,
        &plan,
        &progress,
        jobs,
        &mut state,
        &mut summary,
    )
    .await;
    progress.end();
    // Whatever got up is recorded, so that a failed sync's successor skips it.
    state.unreferenced = plan.pending.clone();
    let saved = save_state(&store, &state_path, &state).await;
    result?;
    saved?;
    for rel in &plan.delete {
        let path = object_path(&opts.target.key(rel))?;
        match store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(anyhow!("deleting {where_}/{rel}: {e}")),
        }
        state.uploaded.remove(rel);
        summary.deleted.push(rel.clone());
    }
    if !plan.delete.is_empty() {
        save_state(&store, &state_path, &state).await?;
    }
    summary.pending_deletion = plan.pending.len();
    Ok(summary)
}

#[allow(clippy::too_many_arguments)]
async fn upload_stages(
    root: &Path,
    store: &Arc<AmazonS3>,
    opts: &SyncOptions,
    plan: &Plan,
    progress: &Arc<Progress>,
    jobs: usize,
    state: &mut SyncState,
    summary: &mut Summary,
) -> Result<()> {
    for (stage, files) in &plan.uploads {
        progress.done.store(0, Ordering::Relaxed);
        progress.show(*stage, files.len());
        let results: Vec<Result<(String, Uploaded, u64)>> =
            futures::stream::iter(files.iter().cloned())
                .map(|f| {
                    let (store, progress, target) =
                        (store.clone(), progress.clone(), opts.target.clone());
                    let total = files.len();
                    let stage = *stage;
                    let path = root.join(&f.rel);
                    async move {
                        let etag = upload(&store, &target, &f, &path).await?;
                        progress.done.fetch_add(1, Ordering::Relaxed);
                        progress.bytes.fetch_add(f.size, Ordering::Relaxed);
                        progress.show(stage, total);
                        if stage == Stage::Roots {
                            crash::point(Step::SyncFirstRoot);
                        }
                        Ok((
                            f.rel.clone(),
                            Uploaded {
                                sha256: f.sha256.clone(),
                                etag,
                            },
                            f.size,
                        ))
                    }
                })
                .buffer_unordered(jobs)
                .collect()
                .await;
        let mut first_error = None;
        for r in results {
            match r {
                Ok((rel, up, size)) => {
                    summary.files.push(rel.clone());
                    state.uploaded.insert(rel, up);
                    *summary.uploaded.entry(*stage).or_default() += 1;
                    summary.bytes += size;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            // No later stage starts: readers keep the roots they had, which name what is
            // there.
            return Err(e.context(format!(
                "uploading the {} stopped the sync before the next stage; run it again to finish",
                stage.label()
            )));
        }
        match stage {
            Stage::Content => crash::point(Step::SyncContent),
            Stage::Indexes => crash::point(Step::SyncIndexes),
            _ => {}
        }
    }
    Ok(())
}

/// Upload one file; returns the store's ETag.
async fn upload(
    store: &AmazonS3,
    target: &Target,
    f: &LocalFile,
    path: &Path,
) -> Result<Option<String>> {
    let key = object_path(&target.key(&f.rel))?;
    let mut attributes = Attributes::new();
    attributes.insert(Attribute::CacheControl, cache_control(&f.rel).into());
    let what = || format!("uploading {} to s3://{}/{}", f.rel, target.bucket, key);
    let result = if f.size <= MULTIPART_OVER {
        let data = tokio::fs::read(path).await.with_context(what)?;
        if data.len() as u64 != f.size || super::sha256_hex(&data) != f.sha256 {
            bail!(
                "{} changed while the sync ran: run it again",
                path.display()
            );
        }
        let opts = PutOptions {
            attributes,
            ..PutOptions::default()
        };
        store
            .put_opts(&key, data.into(), opts)
            .await
            .map_err(|e| anyhow!("{}: {e}", what()))?
    } else {
        let opts = object_store::PutMultipartOptions {
            attributes,
            ..Default::default()
        };
        let up = store
            .put_multipart_opts(&key, opts)
            .await
            .map_err(|e| anyhow!("{}: {e}", what()))?;
        let mut w = object_store::WriteMultipart::new_with_chunk_size(up, PART_SIZE);
        // The bytes sent are hashed as they go: a file that changed since the scan is not
        // completed under the scanned hash. Any failure aborts the upload, so no parts are
        // left in the bucket (billed, invisible) by a failed or refused sync.
        let sent: Result<()> = async {
            let mut file = tokio::fs::File::open(path).await.with_context(what)?;
            let mut buf = vec![0u8; PART_SIZE];
            let mut sha = sha2::Sha256::new();
            let mut size = 0u64;
            loop {
                use tokio::io::AsyncReadExt as _;
                let n = file.read(&mut buf).await.with_context(what)?;
                if n == 0 {
                    break;
                }
                sha.update(&buf[..n]);
                size += n as u64;
                w.wait_for_capacity(4)
                    .await
                    .map_err(|e| anyhow!("{}: {e}", what()))?;
                w.write(&buf[..n]);
            }
            if size != f.size || hex::encode(sha.finalize()) != f.sha256 {
                bail!(
                    "{} changed while the sync ran: run it again",
                    path.display()
                );
            }
            Ok(())
        }
        .await;
        match sent {
            Ok(()) => w.finish().await.map_err(|e| anyhow!("{}: {e}", what()))?,
            Err(e) => {
                let _ = w.abort().await;
                return Err(e);
            }
        }
    };
    Ok(result.e_tag.as_deref().map(|e| unquote(e).to_string()))
}

async fn save_state(store: &AmazonS3, path: &ObjectPath, state: &SyncState) -> Result<()> {
    let json = serde_json::to_vec_pretty(state)?;
    let mut attributes = Attributes::new();
    attributes.insert(Attribute::CacheControl, "no-store".into());
    let opts = PutOptions {
        attributes,
        ..PutOptions::default()
    };
    store
        .put_opts(path, json.into(), opts)
        .await
        .map_err(|e| anyhow!("writing {path}: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(rel: &str, body: &str) -> LocalFile {
        LocalFile {
            rel: rel.into(),
            stage: classify(rel).expect(rel),
            size: body.len() as u64,
            sha256: super::super::sha256_hex(body.as_bytes()),
            md5: hex::encode(md5::Md5::digest(body.as_bytes())),
        }
    }

    fn remote_of(f: &LocalFile) -> RemoteObject {
        RemoteObject {
            size: f.size,
            etag: Some(f.md5.clone()),
        }
    }

    const H: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn classify_admits_the_repository_and_nothing_else() {
        let cases: &[(&str, Option<Stage>)] = &[
            ("pool/main/f/foo/foo_1.0-1_amd64.deb", Some(Stage::Content)),
            ("pool/rpm/f/foo/foo-1.0-1.x86_64.rpm", Some(Stage::Content)),
            ("keys/repository.asc", Some(Stage::Content)),
            ("keys/rotation.asc", Some(Stage::Content)),
            (
                &format!("dists/stable/main/binary-amd64/by-hash/SHA256/{H}"),
                Some(Stage::Content),
            ),
            (
                &format!("tracks/stable/by-hash/SHA256/{H}"),
                Some(Stage::Content),
            ),
            (
                &format!("rpm/stable/repodata/{H}-primary.xml.gz"),
                Some(Stage::Content),
            ),
            (
                "rpm/stable/packages/foo-1.0-1.x86_64.rpm",
                Some(Stage::Content),
            ),
            (
                "dists/stable/main/binary-amd64/Packages.gz",
                Some(Stage::Indexes),
            ),
            ("dists/stable/InRelease", Some(Stage::Roots)),
            ("dists/stable/Release.gpg", Some(Stage::Roots)),
            ("rpm/stable/repodata/repomd.xml.asc", Some(Stage::Roots)),
            ("tracks/stable/index.json", Some(Stage::Roots)),
            ("tracks/stable/rollout.json.asc", Some(Stage::Roots)),
            ("fleet.yaml", Some(Stage::Roots)),
            ("fleet.yaml.asc", Some(Stage::Commit)),
            // never: the private state, keys, strays, hidden or odd names
            (".keepup/repo.json", None),
            (".keepup/signing-key.asc", None),
            ("keys/secret.asc", None),
            ("signing-key.asc", None),
            ("pool/.tmp-123", None),
            (
                "dists/stable/main/binary-amd64/by-hash/SHA256/notahash",
                None,
            ),
            ("rpm/stable/repodata/primary.xml.gz", None),
            ("notes.txt", None),
            ("pool/x", None),
            ("tracks/stable/index.json~", None),
        ];
        for (rel, want) in cases {
            assert_eq!(classify(rel), *want, "{rel}");
        }
    }

    #[test]
    fn only_content_is_immutable_for_a_cdn() {
        assert!(immutable("pool/main/f/foo/foo_1.0-1_amd64.deb"));
        assert!(immutable(&format!("tracks/stable/by-hash/SHA256/{H}")));
        assert!(!immutable("keys/repository.asc"));
        assert!(!immutable("dists/stable/InRelease"));
        assert!(!immutable("dists/stable/main/binary-amd64/Packages"));
    }

    #[test]
    fn targets_parse_and_say_what_is_wrong() {
        assert_eq!(
            Target::parse("s3://bkt/a/b/").unwrap(),
            Target {
                bucket: "bkt".into(),
                prefix: "a/b".into()
            }
        );
        let t = Target::parse("s3://bkt").unwrap();
        assert_eq!(t.prefix, "");
        assert_eq!(t.key("fleet.yaml"), "fleet.yaml");
        let t = Target::parse("s3://bkt/repo").unwrap();
        assert_eq!(t.key("fleet.yaml"), "repo/fleet.yaml");
        assert_eq!(t.rel("repo/fleet.yaml"), Some("fleet.yaml"));
        assert_eq!(t.rel("repository/x"), None);
        for (bad, says) in [
            ("bkt/x", "expected s3://"),
            ("s3://B/x", "bucket name"),
            ("s3://ab", "bucket name"),
            ("s3://bkt/a//b", "segment"),
            ("s3://bkt/a/../b", "segment"),
        ] {
            let e = Target::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn plan_uploads_in_stages_and_skips_what_matches() {
        let local = vec![
            file("fleet.yaml.asc", "policy 2"),
            file("dists/stable/InRelease", "release 2"),
            file("dists/stable/main/binary-amd64/Packages", "pkgs 2"),
            file("pool/main/f/foo/foo_1_amd64.deb", "deb 1"),
            file("pool/main/f/foo/foo_2_amd64.deb", "deb 2"),
        ];
        let mut remote = BTreeMap::new();
        remote.insert(local[3].rel.clone(), remote_of(&local[3]));
        // same size, other bytes: uploaded again
        let mut stale = remote_of(&local[1]);
        stale.etag = Some("ffff".into());
        remote.insert(local[1].rel.clone(), stale);
        let p = plan(&local, &remote, &SyncState::default(), 100, 3600);
        let stages: Vec<(Stage, Vec<&str>)> = p
            .uploads
            .iter()
            .map(|(s, f)| (*s, f.iter().map(|f| f.rel.as_str()).collect()))
            .collect();
        assert_eq!(
            stages,
            vec![
                (Stage::Content, vec!["pool/main/f/foo/foo_2_amd64.deb"]),
                (
                    Stage::Indexes,
                    vec!["dists/stable/main/binary-amd64/Packages"]
                ),
                (Stage::Roots, vec!["dists/stable/InRelease"]),
                (Stage::Commit, vec!["fleet.yaml.asc"]),
            ]
        );
        assert_eq!(p.unchanged, 1);
    }

    #[test]
    fn a_recorded_etag_skips_a_multipart_object() {
        let f = file("pool/main/f/foo/foo_1_amd64.deb", "deb 1");
        let mut remote = BTreeMap::new();
        remote.insert(
            f.rel.clone(),
            RemoteObject {
                size: f.size,
                etag: Some("abc-3".into()),
            },
        );
        let mut state = SyncState::default();
        let p = plan(std::slice::from_ref(&f), &remote, &state, 0, 0);
        assert_eq!(p.unchanged, 0, "an unknown ETag is uploaded again");
        state.uploaded.insert(
            f.rel.clone(),
            Uploaded {
                sha256: f.sha256.clone(),
                etag: Some("abc-3".into()),
            },
        );
        let p = plan(std::slice::from_ref(&f), &remote, &state, 0, 0);
        assert_eq!(p.unchanged, 1);
        assert!(p.uploads.is_empty());
    }

    #[test]
    fn deletions_wait_for_the_grace_period_and_spare_foreign_objects() {
        let gone = format!("tracks/stable/by-hash/SHA256/{H}");
        let mut remote = BTreeMap::new();
        for rel in [gone.as_str(), "index.html", STATE_OBJECT] {
            remote.insert(
                rel.to_string(),
                RemoteObject {
                    size: 1,
                    etag: None,
                },
            );
        }
        // first seen unreferenced now: pending
        let p = plan(&[], &remote, &SyncState::default(), 1000, 3600);
        assert!(p.delete.is_empty());
        assert_eq!(p.pending, BTreeMap::from([(gone.clone(), 1000)]));
        // later, within the grace: still pending, same first-seen time
        let state = SyncState {
            unreferenced: p.pending.clone(),
            ..Default::default()
        };
        let p = plan(&[], &remote, &state, 4599, 3600);
        assert_eq!(p.pending, BTreeMap::from([(gone.clone(), 1000)]));
        // after it: deleted; the foreign page and the record stay
        let p = plan(&[], &remote, &state, 4600, 3600);
        assert_eq!(p.delete, vec![gone.clone()]);
        assert!(p.pending.is_empty());
        // referenced again: neither
        let f = LocalFile {
            rel: gone.clone(),
            stage: Stage::Content,
            size: 1,
            sha256: H.into(),
            md5: "x".into(),
        };
        let p = plan(&[f], &remote, &state, 9999, 3600);
        assert!(p.delete.is_empty() && p.pending.is_empty());
    }

    #[test]
    fn object_keys_keep_debian_version_characters() {
        // A tilde version must land under its own name, not a percent-encoded one.
        let key = "keepup/pool/main/f/foo/foo_1.0~rc1+b1-1_amd64.deb";
        assert_eq!(object_path(key).unwrap().as_ref(), key);
        assert!(object_path("pool/../x").is_err());
    }

    #[test]
    fn secret_keys_are_found() {
        assert!(holds_secret_key(
            b"x\n-----BEGIN PGP PRIVATE KEY BLOCK-----\n"
        ));
        assert!(holds_secret_key(b"-----BEGIN PRIVATE KEY-----"));
        assert!(holds_secret_key(b"-----BEGIN EC PRIVATE KEY-----"));
        assert!(!holds_secret_key(b"-----BEGIN PGP PUBLIC KEY BLOCK-----"));
    }

    #[test]
    fn scan_refuses_strays_and_stops_at_a_secret_key() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let put = |rel: &str, body: &str| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        };
        put(
            ".keepup/signing-key.asc",
            "-----BEGIN PGP PRIVATE KEY BLOCK-----",
        );
        put(
            "keys/repository.asc",
            "-----BEGIN PGP PUBLIC KEY BLOCK-----",
        );
        put("dists/stable/.tmp-1", "partial");
        put("notes.txt", "hello");
        // Package files: only those the state lists, with the bytes it records.
        put("pool/main/f/foo/foo_1.0_amd64.deb", "a package");
        put("rpm/stable/packages/foo-1.0-1.x86_64.rpm", "a package");
        put(
            "pool/main/f/foo/signing.deb",
            "-----BEGIN PGP PRIVATE KEY BLOCK-----",
        );
        put(
            "rpm/stable/packages/key.rpm",
            "-----BEGIN PGP PRIVATE KEY BLOCK-----",
        );
        let entry = |path: &str, body: &str| super::super::PoolEntry {
            name: "foo".into(),
            version: "1.0".into(),
            arch: "amd64".into(),
            format: super::super::Format::Deb,
            path: path.into(),
            size: body.len() as u64,
            sha256: super::super::sha256_hex(body.as_bytes()),
            rollback_of: None,
        };
        let published = Published::new(&[entry("pool/main/f/foo/foo_1.0_amd64.deb", "a package")]);
        let s = scan(root, &published).unwrap();
        assert_eq!(
            s.files.iter().map(|f| f.rel.as_str()).collect::<Vec<_>>(),
            [
                "keys/repository.asc",
                "pool/main/f/foo/foo_1.0_amd64.deb",
                "rpm/stable/packages/foo-1.0-1.x86_64.rpm"
            ]
        );
        assert_eq!(
            s.refused,
            [
                "notes.txt",
                "pool/main/f/foo/signing.deb",
                "rpm/stable/packages/key.rpm"
            ]
        );
        // A pool file whose bytes changed since it was published stops the sync.
        let changed = Published::new(&[entry("pool/main/f/foo/foo_1.0_amd64.deb", "another")]);
        let e = format!("{:#}", scan(root, &changed).unwrap_err());
        assert!(e.contains("not the file the repository published"), "{e}");
        std::fs::remove_dir_all(root.join("pool")).unwrap();
        std::fs::remove_dir_all(root.join("rpm")).unwrap();
        let published = Published::default();
        put(
            "keys/rotation.asc",
            "x\n-----BEGIN PGP PRIVATE KEY BLOCK-----\ny",
        );
        let e = format!("{:#}", scan(root, &published).unwrap_err());
        assert!(
            e.contains("keys/rotation.asc") && e.contains("secret key"),
            "{e}"
        );
    }

    #[test]
    fn profiles_come_from_the_shared_files() {
        let creds = "[default]\naws_access_key_id = AK1\naws_secret_access_key = SK1\n\n[ci]\naws_access_key_id=AK2\naws_secret_access_key=SK2\naws_session_token = T2\n";
        let config = "[default]\nregion = eu-west-1\n[profile ci]\nregion=us-west-2\n";
        let d = profile_keys(creds, config, "default");
        assert_eq!(
            (d.access_key_id.as_deref(), d.region.as_deref()),
            (Some("AK1"), Some("eu-west-1"))
        );
        let c = profile_keys(creds, config, "ci");
        assert_eq!(c.secret_access_key.as_deref(), Some("SK2"));
        assert_eq!(c.session_token.as_deref(), Some("T2"));
        assert_eq!(c.region.as_deref(), Some("us-west-2"));
        assert_eq!(profile_keys("", "", "none"), ProfileKeys::default());
    }
}
