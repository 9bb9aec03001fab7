//! The repository: a directory of static files that any web server can serve.
//!
//! ```text
//! pool/                       immutable package files (deb: pool/main/<l>/<name>/, rpm: pool/rpm/<l>/<name>/)
//! dists/<track>/              APT view: InRelease, Release, Release.gpg, main/binary-<arch>/Packages{,.gz} + by-hash
//! rpm/<track>/                DNF view: repodata/ (repomd.xml + .asc, primary/filelists/other), packages/ (hard links into pool/)
//! tracks/<track>/index.json   the agent's index (+ index.json.sig)
//! fleet.yaml (+ .sig)         fleet policy
//! keys/repository.asc         public key for agents and apt (also keys/repository.gpg, binary)
//! .keepup/                    private: signing-key.asc, state.json, lock, meta/ (never served)
//! ```
//!
//! `.keepup/state.json` is the repository's whole state (which packages exist, which track
//! holds which, serial numbers, fleet policy); every public file is a view regenerated from it.
//! Every mutating command holds `.keepup/lock` (flock), checks everything before writing, writes
//! new files under temporary names and renames them into place — pool files first, then views,
//! then indexes, then the state — so a reader never sees an index naming a missing file and a
//! failed command leaves the state (and so `repo list` and `repo verify`) as it was.

pub mod inspect;
pub mod version;
mod views;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::sign::{self, Signer};
pub use inspect::Format;

/// The default tracks, lowest first: packages enter at the first and are promoted upwards.
pub const DEFAULT_TRACKS: [&str; 3] = ["unstable", "testing", "stable"];

/// One package file in the pool.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolEntry {
    /// Package name.
    pub name: String,
    /// Full version (`[epoch:]version-release`).
    pub version: String,
    /// Architecture as the format spells it.
    pub arch: String,
    /// deb or rpm.
    pub format: Format,
    /// Path relative to the repository root.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// For a rollback package: the version whose payload and scripts it carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<String>,
}

impl PoolEntry {
    /// Compare versions the way this entry's package manager does.
    pub fn version_cmp(&self, other: &str) -> std::cmp::Ordering {
        match self.format {
            Format::Deb => version::dpkg_cmp(&self.version, other),
            Format::Rpm => version::rpm_cmp(&self.version, other),
        }
    }

    /// Does `v` name this entry's version (full, or upstream part only)?
    pub fn matches_version(&self, v: &str) -> bool {
        self.version == v
            || self
                .version
                .rsplit_once('-')
                .is_some_and(|(u, _)| u == v || u.split_once(':').is_some_and(|(_, u)| u == v))
    }
}

/// One track: its members (pool paths) and its index serial.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrackState {
    /// Serial of the last index written; only increases.
    pub serial: u64,
    /// Pool paths in this track.
    pub members: BTreeSet<String>,
}

/// The repository's whole state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// Track names, lowest first.
    pub tracks: Vec<String>,
    /// Every pool file, by pool path.
    pub pool: BTreeMap<String, PoolEntry>,
    /// Track contents.
    pub track: BTreeMap<String, TrackState>,
    /// Fleet policy.
    #[serde(default)]
    pub fleet: crate::fleet::Fleet,
}

impl State {
    /// The track below `track` (where promotions into `track` come from).
    pub fn below(&self, track: &str) -> Result<&str> {
        let i = self.track_index(track)?;
        if i == 0 {
            bail!(
                "{track} is the lowest track; packages enter it with `keepup publish --track {track}`"
            );
        }
        Ok(&self.tracks[i - 1])
    }

    fn track_index(&self, track: &str) -> Result<usize> {
        self.tracks.iter().position(|t| t == track).ok_or_else(|| {
            anyhow!(
                "no track {track:?}; this repository's tracks are {}",
                self.tracks.join(", ")
            )
        })
    }

    /// The current (highest) entry per (name, format, arch) in `track`.
    pub fn current(&self, track: &str) -> BTreeMap<(String, Format, String), &PoolEntry> {
        let mut cur: BTreeMap<(String, Format, String), &PoolEntry> = BTreeMap::new();
        if let Some(t) = self.track.get(track) {
            for p in &t.members {
                let Some(e) = self.pool.get(p) else { continue };
                let key = (e.name.clone(), e.format, e.arch.clone());
                match cur.get(&key) {
                    Some(old) if old.version_cmp(&e.version).is_ge() => {}
                    _ => {
                        cur.insert(key, e);
                    }
                }
            }
        }
        cur
    }
}

/// A package checked and ready to be stored: entry, bytes, and index fragments by kind.
struct Staged {
    entry: PoolEntry,
    bytes: Vec<u8>,
    fragments: Vec<(&'static str, String)>,
}

/// An open repository, locked for the lifetime of this value when opened for writing.
pub struct Repo {
    /// Repository root.
    pub root: PathBuf,
    /// Current state.
    pub state: State,
    /// The state as last saved (to put the views back if a command fails half-way).
    saved: Vec<u8>,
    _lock: Option<nix::fcntl::Flock<File>>,
}

/// SHA-256 of bytes, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

/// Write `data` to `path` under a temporary name in the same directory, then rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_new(path, data, 0o644)
}

/// [`write_atomic`] with a mode (private files: 0600).
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let temp = || tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir);
    // Creating the directory only when it is missing saves a syscall per file (publishing
    // thousands of packages writes thousands of files).
    let mut tmp = match temp() {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            temp()
        }
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?,
        Err(e) => {
            return Err(e)
                .with_context(|| format!("creating a temporary file in {}", dir.display()))
        }
    };
    tmp.write_all(data)
        .with_context(|| format!("writing {}", path.display()))?;
    if mode != 0o600 {
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    tmp.persist(path)
        .map_err(|e| anyhow!("renaming into {}: {}", path.display(), e.error))?;
    Ok(())
}

/// Write a file that no index names yet (a new pool file, its fragments) straight to its
/// final name: it becomes visible to clients only when a view naming it is renamed into
/// place, after this returns; a file left half-written by a crash is not in the state and is
/// rewritten by the next publish of the same package.
fn write_unreferenced(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = || {
        File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
    };
    let mut f = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            open()
        }
        r => r,
    }
    .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

impl Repo {
    fn private(root: &Path) -> PathBuf {
        root.join(".keepup")
    }

    /// Path of the private signing key.
    pub fn secret_key_path(&self) -> PathBuf {
        Self::private(&self.root).join("signing-key.asc")
    }

    /// Path of the public key (armored).
    pub fn public_key_path(&self) -> PathBuf {
        self.root.join("keys/repository.asc")
    }

    /// Create a repository at `root` with a new key, or with the armored secret key `key`.
    pub fn init(root: &Path, key: Option<&Path>, tracks: &[String]) -> Result<Repo> {
        let private = Self::private(root);
        if private.join("state.json").exists() {
            bail!(
                "{} is already a keepup repository; use `keepup repo list --repo {}`",
                root.display(),
                root.display()
            );
        }
        std::fs::create_dir_all(private.join("meta"))
            .with_context(|| format!("creating {}", private.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))?;
        }
        let secret = match key {
            Some(k) => sign::load_secret(k)?,
            None => sign::generate("keepup repository <keepup@localhost>")?,
        };
        let mut repo = Repo::open(root)?;
        write_atomic(
            &repo.secret_key_path(),
            sign::armor_secret(&secret)?.as_bytes(),
        )?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                repo.secret_key_path(),
                std::fs::Permissions::from_mode(0o600),
            )?;
        }
        let public = sign::armor_public(&secret)?;
        write_atomic(&repo.public_key_path(), public.as_bytes())?;
        let binary = {
            use pgp::ser::Serialize as _;
            secret.to_public_key().to_bytes()?
        };
        write_atomic(&root.join("keys/repository.gpg"), &binary)?;
        repo.state = State {
            tracks: tracks.to_vec(),
            ..Default::default()
        };
        for t in tracks {
            repo.state.track.insert(t.clone(), TrackState::default());
        }
        let all: Vec<String> = tracks.to_vec();
        repo.commit(&all, true)?;
        Ok(repo)
    }

    /// Open and lock the repository at `root` for a mutating command.
    pub fn open(root: &Path) -> Result<Repo> {
        let private = Self::private(root);
        if !private.is_dir() {
            bail!(
                "{} is not a keepup repository (no .keepup/); create one with `keepup repo init {}`",
                root.display(),
                root.display()
            );
        }
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(private.join("lock"))
            .with_context(|| format!("opening {}/lock", private.display()))?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow!("locking {}/lock: {e}", private.display()))?;
        // Read the state only now that we hold the lock.
        let mut repo = Repo::read_only(root)?;
        repo._lock = Some(lock);
        Ok(repo)
    }

    /// Open without locking (list, verify, serve): reads one consistent state file.
    pub fn read_only(root: &Path) -> Result<Repo> {
        let (state, saved) = Self::load_state(root)?;
        Ok(Repo {
            root: root.to_path_buf(),
            state,
            saved,
            _lock: None,
        })
    }

    /// The state and the bytes it was read from.
    fn load_state(root: &Path) -> Result<(State, Vec<u8>)> {
        let path = Self::private(root).join("state.json");
        match std::fs::read(&path) {
            Ok(b) => Ok((
                serde_json::from_slice(&b)
                    .with_context(|| format!("{} is damaged", path.display()))?,
                b,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((State::default(), vec![])),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The loaded signer.
    pub fn signer(&self) -> Result<Signer> {
        Signer::load(&self.secret_key_path())
    }

    /// Where the index fragments of the pool file with this digest are kept (one JSON object:
    /// `stanza` for a .deb; `primary`, `filelists`, `other` for an .rpm).
    fn meta_path(&self, sha256: &str) -> PathBuf {
        Self::private(&self.root)
            .join("meta")
            .join(&sha256[..2])
            .join(format!("{sha256}.json"))
    }

    /// The index fragments of a pool entry.
    fn fragments(&self, e: &PoolEntry) -> Result<BTreeMap<String, String>> {
        let p = self.meta_path(&e.sha256);
        let b = std::fs::read(&p).with_context(|| {
            format!(
                "the index fragments of {} are missing ({})",
                e.path,
                p.display()
            )
        })?;
        Ok(serde_json::from_slice(&b)?)
    }

    /// Regenerate the views and indexes of `tracks` (and, if `fleet`, the fleet policy), then
    /// save the state.
    fn commit(&mut self, tracks: &[String], fleet: bool) -> Result<()> {
        let signer = self.signer()?;
        for t in tracks {
            let ts = self.state.track.get_mut(t).expect("known track");
            ts.serial += 1;
            views::write_track(self, &signer, t)?;
        }
        if fleet {
            crate::fleet::write(self, &signer)?;
        }
        let state = serde_json::to_vec(&self.state)?;
        write_new(&Self::private(&self.root).join("state.json"), &state, 0o600)?;
        self.saved = state;
        Ok(())
    }

    /// Commit, and if that fails, put the views of `tracks` back as the old state had them.
    fn commit_or_restore(&mut self, tracks: &[String]) -> Result<()> {
        if let Err(e) = self.commit(tracks, false) {
            self.state = if self.saved.is_empty() {
                State::default()
            } else {
                serde_json::from_slice(&self.saved)?
            };
            if let Ok(signer) = self.signer() {
                for t in tracks {
                    let _ = views::write_track(self, &signer, t);
                }
            }
            return Err(e);
        }
        Ok(())
    }

    /// Publish package files into `track`. Everything is checked before anything is written.
    pub fn publish(&mut self, files: &[PathBuf], track: &str) -> Result<Vec<PoolEntry>> {
        self.state.track_index(track)?;
        let key = inspect::rpm_verifier(&std::fs::read(self.public_key_path())?)?;
        // Checking packages and computing their index fragments is the expensive part: spread
        // it over the cores. Nothing is written until every file has passed.
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(files.len().max(1));
        let this = &*self;
        let results: Vec<Result<Vec<(usize, Staged)>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let key = &key;
                    scope.spawn(move || {
                        let mut out = Vec::new();
                        for (i, f) in files.iter().enumerate().skip(t).step_by(threads) {
                            out.push((i, this.check_file(f, key)?));
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("staging thread panicked"))
                .collect()
        });
        let mut staged: Vec<(usize, Staged)> = Vec::new();
        for r in results {
            staged.extend(r?);
        }
        staged.sort_by_key(|(i, _)| *i);
        let staged: Vec<Staged> = staged.into_iter().map(|(_, s)| s).collect();
        for (i, a) in staged.iter().enumerate() {
            if let Some(b) = staged[..i]
                .iter()
                .find(|b| b.entry.path == a.entry.path && b.entry.sha256 != a.entry.sha256)
            {
                bail!(
                    "{} {} ({}) is given twice with different contents; publish one of them",
                    b.entry.name,
                    b.entry.version,
                    b.entry.arch
                );
            }
        }
        self.add_to_track(track, &staged)
    }

    /// Read and check one file offered for publication.
    fn check_file(&self, f: &Path, key: &rpm::signature::pgp::Verifier) -> Result<Staged> {
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        let info = if bytes.starts_with(b"!<arch>\n") {
            inspect::inspect_deb(f, &bytes)?
        } else if bytes.starts_with(&[0xed, 0xab, 0xee, 0xdb]) {
            inspect::inspect_rpm(f, &bytes, key)?
        } else {
            bail!(
                "{} is neither a .deb nor an .rpm; build packages with `keepup pack`",
                f.display()
            );
        };
        self.stage(info, bytes, None)
    }

    /// Check one package against the pool; returns its entry, bytes and index fragments.
    fn stage(
        &self,
        info: inspect::Inspected,
        bytes: Vec<u8>,
        rollback_of: Option<String>,
    ) -> Result<Staged> {
        let sha256 = sha256_hex(&bytes);
        let letter = &info.name[..1];
        let plain_version = info
            .version
            .split_once(':')
            .map_or(info.version.as_str(), |(_, v)| v);
        let path = match info.format {
            Format::Deb => format!(
                "pool/main/{letter}/{n}/{n}_{plain_version}_{a}.deb",
                n = info.name,
                a = info.arch
            ),
            Format::Rpm => format!(
                "pool/rpm/{letter}/{n}/{n}-{plain_version}.{a}.rpm",
                n = info.name,
                a = info.arch
            ),
        };
        if let Some(existing) = self.state.pool.get(&path) {
            if existing.sha256 != sha256 {
                bail!(
                    "{} {} ({}, {}) is already in the pool with different contents (sha256 {} there, {} here); the pool is immutable: bump the version or release and publish again",
                    info.name, info.version, info.arch, info.format, existing.sha256, sha256
                );
            }
        }
        let entry = PoolEntry {
            name: info.name,
            version: info.version,
            arch: info.arch,
            format: info.format,
            path,
            size: bytes.len() as u64,
            sha256,
            rollback_of,
        };
        let fragments = match entry.format {
            Format::Deb => vec![(
                "stanza",
                views::deb_stanza(&entry, info.control.as_deref().unwrap_or(""), &bytes),
            )],
            Format::Rpm => {
                let href = format!("packages/{}", file_name(&entry.path));
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let meta = info
                    .rpm
                    .as_ref()
                    .ok_or_else(|| anyhow!("{}: rpm headers missing", entry.path))?;
                let [p, f, o] =
                    inspect::rpm_fragments(meta, &entry.sha256, entry.size, &href, now)?;
                vec![("primary", p), ("filelists", f), ("other", o)]
            }
        };
        Ok(Staged {
            entry,
            bytes,
            fragments,
        })
    }

    /// Write staged packages into the pool (and their index fragments); returns new files.
    fn store(&mut self, staged: &[Staged]) -> Result<Vec<PathBuf>> {
        let mut written = Vec::new();
        let result = (|| -> Result<()> {
            for s in staged {
                let e = &s.entry;
                let dest = self.root.join(&e.path);
                if !self.state.pool.contains_key(&e.path) || !dest.exists() {
                    write_unreferenced(&dest, &s.bytes, 0o644)?;
                    written.push(dest.clone());
                }
                let frags: BTreeMap<&str, &str> =
                    s.fragments.iter().map(|(k, v)| (*k, v.as_str())).collect();
                write_unreferenced(
                    &self.meta_path(&e.sha256),
                    &serde_json::to_vec(&frags)?,
                    0o600,
                )?;
                self.state.pool.insert(e.path.clone(), e.clone());
            }
            Ok(())
        })();
        if let Err(err) = result {
            for p in &written {
                let _ = std::fs::remove_file(p);
            }
            return Err(err);
        }
        Ok(written)
    }

    /// Promote one version of `name` (default: the current one) from the track below `to`.
    pub fn promote(
        &mut self,
        name: &str,
        version: Option<&str>,
        to: &str,
    ) -> Result<Vec<PoolEntry>> {
        let from = self.state.below(to)?.to_string();
        let chosen: Vec<PoolEntry> = match version {
            Some(v) => self.state.track[&from]
                .members
                .iter()
                .filter_map(|p| self.state.pool.get(p))
                .filter(|e| e.name == name && e.matches_version(v))
                .cloned()
                .collect(),
            None => self
                .state
                .current(&from)
                .into_iter()
                .filter(|((n, _, _), _)| n == name)
                .map(|(_, e)| e.clone())
                .collect(),
        };
        if chosen.is_empty() {
            bail!(
                "{from} has no {name}{}; see `keepup repo list --repo {} --track {from}`",
                version.map(|v| format!(" {v}")).unwrap_or_default(),
                self.root.display()
            );
        }
        let versions: BTreeSet<&str> = chosen.iter().map(|e| e.version.as_str()).collect();
        if versions.len() > 1 {
            bail!(
                "{from} has several versions of {name} matching: {}; name one exactly",
                versions.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
        let current = self.state.current(to);
        for e in &chosen {
            if let Some(cur) = current.get(&(e.name.clone(), e.format, e.arch.clone())) {
                if cur.version_cmp(&e.version).is_gt() {
                    bail!(
                        "{to} already has {name} {} ({}), newer than {}; promotion never downgrades: to go back, use `keepup rollback --repo {} {name} --to {} --track {to}`",
                        cur.version, e.format, e.version, self.root.display(), e.version
                    );
                }
            }
        }
        let ts = self.state.track.get_mut(to).expect("checked");
        let mut added = false;
        for e in &chosen {
            added |= ts.members.insert(e.path.clone());
        }
        if !added {
            bail!(
                "{to} already has {name} {}: nothing to promote",
                chosen[0].version
            );
        }
        self.commit_or_restore(&[to.to_string()])?;
        Ok(chosen)
    }

    /// Republish `old_version`'s payload and scripts of `name` in `track` under a version
    /// newer than the track's current one.
    pub fn rollback(
        &mut self,
        name: &str,
        old_version: &str,
        track: &str,
    ) -> Result<Vec<PoolEntry>> {
        self.state.track_index(track)?;
        let current = self.state.current(track);
        let olds: Vec<PoolEntry> = self
            .state
            .pool
            .values()
            .filter(|e| e.name == name && e.matches_version(old_version))
            .cloned()
            .collect();
        if olds.is_empty() {
            bail!(
                "the pool has no {name} {old_version}; see `keepup repo list --repo {}`",
                self.root.display()
            );
        }
        let secret = self.secret_key_path();
        let mut staged = Vec::new();
        for old in &olds {
            let Some(cur) = current.get(&(old.name.clone(), old.format, old.arch.clone())) else {
                continue;
            };
            if old.version_cmp(&cur.version).is_ge() {
                bail!(
                    "{name} {} is not older than {track}'s current {} ({}); nothing to roll back",
                    old.version,
                    cur.version,
                    old.format
                );
            }
            let (cur_upstream, cur_release) = cur
                .version
                .rsplit_once('-')
                .ok_or_else(|| anyhow!("{} has no release part", cur.version))?;
            let upstream = version::rollback_upstream(cur_upstream);
            let bytes = std::fs::read(self.root.join(&old.path))?;
            let new_bytes = match old.format {
                Format::Deb => {
                    keepup_packager::reversion::deb(&bytes, &format!("{upstream}-{cur_release}"))?
                }
                Format::Rpm => {
                    let upstream = upstream
                        .split_once(':')
                        .map_or(upstream.as_str(), |(_, u)| u);
                    keepup_packager::reversion::rpm(&bytes, upstream, cur_release, &secret)?
                }
            };
            let label = PathBuf::from(format!("rollback of {} {}", old.name, old.version));
            let key = inspect::rpm_verifier(&std::fs::read(self.public_key_path())?)?;
            let info = match old.format {
                Format::Deb => inspect::inspect_deb(&label, &new_bytes)?,
                Format::Rpm => inspect::inspect_rpm(&label, &new_bytes, &key)?,
            };
            if cur.version_cmp(&info.version).is_ge() {
                bail!(
                    "internal error: rollback version {} is not above {}",
                    info.version,
                    cur.version
                );
            }
            staged.push(self.stage(info, new_bytes, Some(old.version.clone()))?);
        }
        if staged.is_empty() {
            bail!("{track} has no {name}; a rollback replaces the current version of a track");
        }
        self.add_to_track(track, &staged)
    }

    /// Store staged packages in the pool, add them to `track` and commit; on failure the
    /// repository is restored and the new pool files are removed.
    fn add_to_track(&mut self, track: &str, staged: &[Staged]) -> Result<Vec<PoolEntry>> {
        let written = self.store(staged)?;
        let entries: Vec<PoolEntry> = staged.iter().map(|s| s.entry.clone()).collect();
        let ts = self.state.track.get_mut(track).expect("checked");
        for e in &entries {
            ts.members.insert(e.path.clone());
        }
        let res = self.commit_or_restore(&[track.to_string()]);
        if res.is_err() {
            for p in written {
                let _ = std::fs::remove_file(p);
            }
        }
        res.map(|_| entries)
    }

    /// Save a changed fleet policy (views of tracks unchanged).
    pub fn commit_fleet(&mut self) -> Result<()> {
        self.state.fleet.serial += 1;
        self.commit(&[], true)
    }

    /// Rebuild every view from the state (after a restore, or to time a full index build).
    pub fn reindex(&mut self) -> Result<()> {
        let tracks = self.state.tracks.clone();
        self.commit(&tracks, true)
    }

    /// Check every signature and hash; returns the problems found.
    pub fn verify(&self) -> Result<Vec<String>> {
        views::verify(self)
    }
}

/// Last component of a slash-separated path.
pub fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}
