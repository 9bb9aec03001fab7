//! The repository: a directory of static files that any web server can serve.
//!
//! ```text
//! pool/                       immutable package files (deb: pool/main/<l>/<name>/, rpm: pool/rpm/<l>/<name>/)
//! dists/<track>/              APT view: InRelease, Release, Release.gpg, main/binary-<arch>/Packages{,.gz} + by-hash
//! rpm/<track>/                DNF view: repodata/ (repomd.xml + .asc, primary/filelists/other), packages/ (hard links into pool/)
//! tracks/<track>/index.json   the agent's index (+ index.json.sig)
//! fleet.yaml (+ .sig)         fleet policy
//! keys/repository.asc         public key for agents and apt (also keys/repository.gpg, binary)
//! .keepup/                    private: signing-key.asc, lock, and the state (see `state`)
//! ```
//!
//! The state is split per track and per package name (`.keepup/tracks/<track>.json`,
//! `.keepup/pool/<name>.json`), so a command reads and rewrites only the track it
//! changes, and that track's views are assembled from pre-rendered fragments. Every mutating
//! command holds `.keepup/lock` (flock), checks everything before writing, and writes in an
//! order that keeps readers safe: new pool files and their metadata first (no index names them
//! yet), then the track's views (each index after the files it names), then the track file,
//! which is the commit. A command that fails puts the track's views back as its unchanged
//! track file describes them and removes the pool files it added.

pub mod inspect;
mod state;
pub mod version;
mod views;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use sha2::Digest as _;

use crate::sign::{self, Signer};
pub use inspect::Format;
pub use keepup_deploy::wire::PoolEntry;
pub use state::Track;
use state::{Layout, PoolMeta, Settings};

/// The default tracks, lowest first: packages enter at the first and are promoted upwards.
pub const DEFAULT_TRACKS: [&str; 3] = ["unstable", "testing", "stable"];

/// What every command loads: the track names and the fleet policy (tracks are read on demand).
#[derive(Debug, Clone, Default)]
pub struct State {
    /// Track names, lowest first.
    pub tracks: Vec<String>,
    /// Fleet policy.
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
}

/// A package file offered for publication, when the pool may share its inode (hard link).
struct Source {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

/// A package checked and ready to be stored: its metadata (entry + fragments) and bytes.
struct Staged {
    meta: PoolMeta,
    bytes: Vec<u8>,
    /// Where the bytes came from, if the pool file may be a hard link to it.
    source: Option<Source>,
    /// Not in the pool yet (false: the identical file is there already).
    new: bool,
}

/// What a failed command takes back: new pool and metadata files to remove, metadata files
/// to put back as they were.
#[derive(Default)]
struct Undo {
    remove: Vec<PathBuf>,
    put_back: Vec<(PathBuf, Vec<u8>)>,
}

impl Undo {
    fn run(&self) {
        for p in &self.remove {
            let _ = std::fs::remove_file(p);
        }
        for (p, b) in &self.put_back {
            let _ = write_new(p, b, 0o600);
        }
    }
}

/// An open repository, locked for the lifetime of this value when opened for writing.
pub struct Repo {
    /// Repository root.
    pub root: PathBuf,
    /// Track names and fleet policy.
    pub state: State,
    layout: Layout,
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

/// Write a file that no index names yet (a new pool file, its metadata) straight to its final
/// name: it becomes visible to clients only when a view naming it is renamed into place, after
/// this returns; a file left half-written by a crash is in no track and is rewritten by the
/// next publish of the same package.
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

/// Make `dest` a hard link to the offered file if it is still the file that was checked (same
/// inode); false if it cannot be (another filesystem, no permission), and nothing is left.
fn link_source(src: &Source, dest: &Path) -> bool {
    let link = || std::fs::hard_link(&src.path, dest);
    let linked = match link() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => dest
            .parent()
            .is_some_and(|d| std::fs::create_dir_all(d).is_ok() && link().is_ok()),
        r => r.is_ok(),
    };
    if !linked {
        return false;
    }
    match std::fs::metadata(dest) {
        Ok(m) if m.dev() == src.dev && m.ino() == src.ino => true,
        // Replaced since it was checked: copy the checked bytes instead.
        _ => {
            let _ = std::fs::remove_file(dest);
            false
        }
    }
}

/// `f(item)` for every item, spread over the cores, in order; the first error wins.
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> Result<R> + Sync) -> Result<Vec<R>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len().div_ceil(16).max(1));
    if threads == 1 {
        return items.iter().map(&f).collect();
    }
    let f = &f;
    let parts: Vec<Result<Vec<(usize, R)>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    items
                        .iter()
                        .enumerate()
                        .skip(t)
                        .step_by(threads)
                        .map(|(i, x)| Ok((i, f(x)?)))
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker thread panicked"))
            .collect()
    });
    let mut all = Vec::with_capacity(items.len());
    for p in parts {
        all.extend(p?);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, r)| r).collect())
}

/// Take the exclusive lock of the repository whose private directory is `private`.
fn lock(private: &Path) -> Result<nix::fcntl::Flock<File>> {
    let lock_file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(private.join("lock"))
        .with_context(|| format!("opening {}/lock", private.display()))?;
    nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow!("locking {}/lock: {e}", private.display()))
}

impl Repo {
    /// Path of the private signing key.
    pub fn secret_key_path(&self) -> PathBuf {
        self.layout.private.join("signing-key.asc")
    }

    /// Path of the public key (armored).
    pub fn public_key_path(&self) -> PathBuf {
        self.root.join("keys/repository.asc")
    }

    /// Create a repository at `root` with a new key, or with the armored secret key `key`.
    pub fn init(root: &Path, key: Option<&Path>, tracks: &[String]) -> Result<Repo> {
        let layout = Layout::new(root);
        if layout.settings().exists() || layout.old_state().exists() {
            bail!(
                "{} is already a keepup repository; use `keepup repo list --repo {}`",
                root.display(),
                root.display()
            );
        }
        std::fs::create_dir_all(&layout.private)
            .with_context(|| format!("creating {}", layout.private.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&layout.private, std::fs::Permissions::from_mode(0o700))?;
        }
        let secret = match key {
            Some(k) => sign::load_secret(k)?,
            None => sign::generate("keepup repository <keepup@localhost>")?,
        };
        let repo = Repo {
            root: root.to_path_buf(),
            state: State {
                tracks: tracks.to_vec(),
                fleet: Default::default(),
            },
            _lock: Some(lock(&layout.private)?),
            layout,
        };
        write_new(
            &repo.secret_key_path(),
            sign::armor_secret(&secret)?.as_bytes(),
            0o600,
        )?;
        let public = sign::armor_public(&secret)?;
        write_atomic(&repo.public_key_path(), public.as_bytes())?;
        let binary = {
            use pgp::ser::Serialize as _;
            secret.to_public_key().to_bytes()?
        };
        write_atomic(&root.join("keys/repository.gpg"), &binary)?;
        for t in tracks {
            repo.commit_track(
                t,
                &Track::default(),
                Track::default(),
                &Undo::default(),
                &[],
            )?;
        }
        repo.commit_fleet_from(&Default::default())?;
        // Last: a repository exists once repo.json does.
        let settings = Settings {
            layout: state::LAYOUT,
            tracks: tracks.to_vec(),
        };
        write_new(
            &repo.layout.settings(),
            &serde_json::to_vec_pretty(&settings)?,
            0o600,
        )?;
        Ok(repo)
    }

    /// Open and lock the repository at `root` for a mutating command (converting a
    /// repository of the old single-file layout first).
    pub fn open(root: &Path) -> Result<Repo> {
        let layout = Layout::new(root);
        if !layout.private.is_dir() {
            bail!(
                "{} is not a keepup repository (no .keepup/); create one with `keepup repo init {}`",
                root.display(),
                root.display()
            );
        }
        let lock = lock(&layout.private)?;
        // Read the state only now that we hold the lock.
        let mut repo = Repo::load(root, true)?;
        repo._lock = Some(lock);
        Ok(repo)
    }

    /// Open without locking (list, verify, serve). Each track file is read whole, so a track
    /// is always seen consistent; two tracks may be seen either side of a concurrent command.
    pub fn read_only(root: &Path) -> Result<Repo> {
        Repo::load(root, false)
    }

    /// Load repo.json and fleet.json. A repository of the old layout is converted first
    /// (under the lock: taken here unless `locked`).
    fn load(root: &Path, locked: bool) -> Result<Repo> {
        let mut repo = Repo {
            root: root.to_path_buf(),
            state: State::default(),
            layout: Layout::new(root),
            _lock: None,
        };
        let layout = &repo.layout;
        if !layout.settings().exists() && layout.old_state().exists() {
            let _lock = if locked {
                None
            } else {
                Some(lock(&layout.private)?)
            };
            if !layout.settings().exists() {
                repo.migrate()?;
            }
        }
        let layout = &repo.layout;
        let Some(settings) = state::read_json::<Settings>(&layout.settings())? else {
            bail!(
                "{} is not a keepup repository (no .keepup/repo.json); create one with `keepup repo init {}`",
                root.display(),
                root.display()
            );
        };
        if settings.layout > state::LAYOUT {
            bail!(
                "{} was written by a newer keepup (state layout {}); upgrade keepup",
                root.display(),
                settings.layout
            );
        }
        repo.state = State {
            tracks: settings.tracks,
            fleet: state::read_json(&layout.fleet())?.unwrap_or_default(),
        };
        Ok(repo)
    }

    /// Convert `.keepup/state.json` (one file for everything) to per-track state files.
    fn migrate(&self) -> Result<()> {
        let key = inspect::rpm_verifier(&std::fs::read(self.public_key_path())?)?;
        let write = |p: &Path, b: &[u8]| write_new(p, b, 0o600);
        let refragment = |e: &PoolEntry| self.refragment(e, &key);
        state::migrate(&self.layout, write, refragment).with_context(|| {
            format!(
                "converting {} to the per-track layout (nothing public changed; run `keepup repo reindex --repo {}` to retry)",
                self.layout.old_state().display(),
                self.root.display()
            )
        })
    }

    /// The loaded signer.
    pub fn signer(&self) -> Result<Signer> {
        Signer::load(&self.secret_key_path())
    }

    /// A track's serial and members.
    pub fn track(&self, track: &str) -> Result<Track> {
        self.state.track_index(track)?;
        let path = self.layout.track(track);
        state::read_json(&path)?.ok_or_else(|| {
            anyhow!(
                "{} is missing: the repository's state is damaged; restore .keepup/ from a backup",
                path.display()
            )
        })
    }

    /// The members of `track` named `name` (reads one line of the track file).
    fn track_entries(&self, track: &str, name: &str) -> Result<Vec<PoolEntry>> {
        let path = self.layout.track(track);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        state::lookup(&bytes, name).with_context(|| format!("{} is damaged", path.display()))
    }

    /// Every pool file's metadata.
    pub fn pool(&self) -> Result<Vec<PoolEntry>> {
        Ok(state::all_meta(&self.layout)?
            .into_iter()
            .map(|m| m.entry)
            .collect())
    }

    /// Write the views of `name` for `new` and save it; on failure, put back the views of
    /// `old` (under a higher serial: serials never go down) and undo the pool changes.
    /// `known`: metadata already in memory (of the packages just stored), not read again.
    fn commit_track(
        &self,
        name: &str,
        old: &Track,
        mut new: Track,
        undo: &Undo,
        known: &[&PoolMeta],
    ) -> Result<()> {
        let signer = match self.signer() {
            Ok(s) => s,
            Err(e) => {
                undo.run();
                return Err(e);
            }
        };
        new.serial = old.serial + 1;
        let write = |t: &Track, known: &[&PoolMeta]| -> Result<()> {
            let mut by_path: HashMap<&str, &PoolMeta> =
                known.iter().map(|m| (m.entry.path.as_str(), *m)).collect();
            // One metadata file per package name that has members not in memory.
            let names: Vec<&String> = t
                .packages
                .iter()
                .filter(|(_, v)| v.iter().any(|e| !by_path.contains_key(e.path.as_str())))
                .map(|(n, _)| n)
                .collect();
            let read = par_map(&names, |n| state::read_meta(&self.layout, n))?;
            by_path.extend(read.iter().flatten().map(|m| (m.entry.path.as_str(), m)));
            let members = t
                .entries()
                .map(|e| {
                    by_path.get(e.path.as_str()).copied().ok_or_else(|| {
                        anyhow!(
                            "the metadata of {} is missing from {}; restore .keepup/ from a backup",
                            e.path,
                            self.layout.meta(&e.name).display()
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            views::write_track(&self.root, &signer, name, t.serial, &members)
        };
        let save = |t: &Track| write_new(&self.layout.track(name), &state::track_json(t)?, 0o600);
        let Err(err) = write(&new, known).and_then(|_| save(&new)) else {
            return Ok(());
        };
        let back = Track {
            serial: new.serial + 1,
            packages: old.packages.clone(),
        };
        match save(&back).and_then(|_| write(&back, &[])) {
            Ok(()) => {
                undo.run();
                Err(err)
            }
            Err(e) => Err(err.context(format!(
                "putting the views of {name} back failed too ({e:#}); run `keepup repo reindex --repo {}` once the cause is fixed",
                self.root.display()
            ))),
        }
    }

    /// Publish package files into `track`. Everything is checked before anything is written.
    pub fn publish(&mut self, files: &[PathBuf], track: &str) -> Result<Vec<PoolEntry>> {
        self.state.track_index(track)?;
        let key = inspect::rpm_verifier(&std::fs::read(self.public_key_path())?)?;
        let owner = std::fs::metadata(&self.layout.private)?.uid();
        // Checking packages and computing their index fragments is the expensive part: spread
        // it over the cores. Nothing is written until every file has passed.
        let mut staged = par_map(files, |f| self.check_file(f, &key, owner))?;
        // The same file given twice is stored once; two different files for one pool path
        // are refused.
        let mut seen: HashMap<String, String> = HashMap::new();
        for s in &staged {
            let e = &s.meta.entry;
            match seen.get(&e.path) {
                Some(sha) if *sha != e.sha256 => bail!(
                    "{} {} ({}) is given twice with different contents; publish one of them",
                    e.name,
                    e.version,
                    e.arch
                ),
                Some(_) => {}
                None => {
                    seen.insert(e.path.clone(), e.sha256.clone());
                }
            }
        }
        let mut first = std::collections::HashSet::new();
        staged.retain(|s| first.insert(s.meta.entry.path.clone()));
        self.add_to_track(track, staged)
    }

    /// Read and check one file offered for publication. The pool may hard-link it if it is a
    /// plain file of the repository's owner that only the owner can change.
    fn check_file(
        &self,
        f: &Path,
        key: &rpm::signature::pgp::Verifier,
        owner: u32,
    ) -> Result<Staged> {
        let mut file = File::open(f).with_context(|| format!("reading {}", f.display()))?;
        let m = file.metadata()?;
        let mut bytes = Vec::with_capacity(m.len() as usize);
        file.read_to_end(&mut bytes)
            .with_context(|| format!("reading {}", f.display()))?;
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
        let mut s = self.stage(info, bytes, None)?;
        if m.is_file() && m.uid() == owner && m.mode() & 0o7022 == 0 && m.mode() & 0o444 == 0o444 {
            s.source = Some(Source {
                path: f.to_path_buf(),
                dev: m.dev(),
                ino: m.ino(),
            });
        }
        Ok(s)
    }

    /// The pool path of a package.
    fn pool_path(info: &inspect::Inspected) -> String {
        let letter = &info.name[..1];
        let plain_version = info
            .version
            .split_once(':')
            .map_or(info.version.as_str(), |(_, v)| v);
        match info.format {
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
        }
    }

    /// Check one package against the pool; returns its metadata (entry and index fragments)
    /// and bytes.
    fn stage(
        &self,
        info: inspect::Inspected,
        bytes: Vec<u8>,
        rollback_of: Option<String>,
    ) -> Result<Staged> {
        let entry = PoolEntry {
            path: Self::pool_path(&info),
            name: info.name.clone(),
            version: info.version.clone(),
            arch: info.arch.clone(),
            format: info.format,
            size: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
            rollback_of,
        };
        // A pool file whose metadata exists is in the pool, unless no track names it (left by
        // a command that crashed before its commit): that one may be replaced.
        let metas = match state::read_meta(&self.layout, &entry.name) {
            Ok(m) => m,
            // A name's first metadata file is written straight to its name: one left
            // half-written by a crash names nothing any track holds, and is written again.
            Err(_) if !self.name_in_some_track(&entry.name)? => Vec::new(),
            Err(e) => return Err(e),
        };
        let existing = metas.into_iter().find(|m| m.entry.path == entry.path);
        if let Some(existing) = existing {
            if existing.entry.sha256 == entry.sha256 {
                return Ok(Staged {
                    meta: existing,
                    bytes,
                    source: None,
                    new: false,
                });
            }
            if self.in_some_track(&existing.entry)? {
                bail!(
                    "{} {} ({}, {}) is already in the pool with different contents (sha256 {} there, {} here); the pool is immutable: bump the version or release and publish again",
                    entry.name, entry.version, entry.arch, entry.format, existing.entry.sha256, entry.sha256
                );
            }
        }
        let meta = fragments(entry, &info, &bytes)?;
        Ok(Staged {
            meta,
            bytes,
            source: None,
            new: true,
        })
    }

    /// Does any track hold a package of this name?
    fn name_in_some_track(&self, name: &str) -> Result<bool> {
        for t in &self.state.tracks {
            if !self.track_entries(t, name)?.is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Is this pool entry a member of any track?
    fn in_some_track(&self, e: &PoolEntry) -> Result<bool> {
        for t in &self.state.tracks {
            if self
                .track_entries(t, &e.name)?
                .iter()
                .any(|x| x.path == e.path)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The metadata of a pool file computed again from the file (old repositories whose
    /// fragments are missing).
    fn refragment(&self, e: &PoolEntry, key: &rpm::signature::pgp::Verifier) -> Result<PoolMeta> {
        let path = self.root.join(&e.path);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let info = match e.format {
            Format::Deb => inspect::inspect_deb(&path, &bytes)?,
            Format::Rpm => inspect::inspect_rpm(&path, &bytes, key)?,
        };
        fragments(e.clone(), &info, &bytes)
    }

    /// Write staged packages into the pool, then their metadata (one file per name); returns
    /// how to undo that.
    fn store(&self, staged: &[Staged]) -> Result<Undo> {
        let undo = std::sync::Mutex::new(Undo::default());
        let undo_ = &undo;
        let files = par_map(staged, |s| {
            let e = &s.meta.entry;
            let dest = self.root.join(&e.path);
            if s.new {
                let _ = std::fs::remove_file(&dest);
                let linked = s.source.as_ref().is_some_and(|src| link_source(src, &dest));
                if !linked {
                    write_unreferenced(&dest, &s.bytes, 0o644)?;
                }
            } else if !dest.exists() {
                write_unreferenced(&dest, &s.bytes, 0o644)?;
            } else {
                return Ok(());
            }
            undo_.lock().expect("not poisoned").remove.push(dest);
            Ok(())
        });
        let mut by_name: BTreeMap<&str, Vec<&PoolMeta>> = BTreeMap::new();
        for s in staged.iter().filter(|s| s.new) {
            by_name.entry(&s.meta.entry.name).or_default().push(&s.meta);
        }
        let by_name: Vec<_> = by_name.into_iter().collect();
        let metas = files.and_then(|_| {
            par_map(&by_name, |(name, metas)| {
                let path = self.layout.meta(name);
                let before = match std::fs::read(&path) {
                    Ok(b) => Some(b),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
                };
                // Unreadable: left half-written by a crash (stage found no track naming it).
                let parsed = before
                    .as_deref()
                    .and_then(|b| serde_json::from_slice::<Vec<PoolMeta>>(b).ok());
                let before = before.filter(|_| parsed.is_some());
                let mut all = parsed.unwrap_or_default();
                for m in metas {
                    all.retain(|x| x.entry.path != m.entry.path);
                    all.push((*m).clone());
                }
                all.sort_by(|a, b| a.entry.path.cmp(&b.entry.path));
                let json = state::meta_json(&all)?;
                match before {
                    // Other tracks may name this name's other files: replace it whole.
                    Some(b) => {
                        write_new(&path, &json, 0o600)?;
                        undo_.lock().expect("not poisoned").put_back.push((path, b));
                    }
                    None => {
                        write_unreferenced(&path, &json, 0o600)?;
                        undo_.lock().expect("not poisoned").remove.push(path);
                    }
                }
                Ok(())
            })
        });
        let undo = undo.into_inner().expect("not poisoned");
        if let Err(err) = metas {
            undo.run();
            return Err(err);
        }
        Ok(undo)
    }

    /// Promote one version of `name` (default: the current one) from the track below `to`.
    pub fn promote(
        &mut self,
        name: &str,
        version: Option<&str>,
        to: &str,
    ) -> Result<Vec<PoolEntry>> {
        let from = self.state.below(to)?.to_string();
        let candidates = self.track_entries(&from, name)?;
        let chosen: Vec<PoolEntry> = match version {
            Some(v) => candidates
                .iter()
                .filter(|e| e.matches_version(v))
                .cloned()
                .collect(),
            None => state::current_of(candidates.iter())
                .into_values()
                .cloned()
                .collect(),
        };
        if chosen.is_empty() {
            bail!(
                "{from} has no {name}{}; see `keepup repo list --repo {} --track {from}`",
                version.map(|v| format!(" {v}")).unwrap_or_default(),
                self.root.display()
            );
        }
        let versions: std::collections::BTreeSet<&str> =
            chosen.iter().map(|e| e.version.as_str()).collect();
        if versions.len() > 1 {
            bail!(
                "{from} has several versions of {name} matching: {}; name one exactly",
                versions.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
        let old = self.track(to)?;
        let mut new = old.clone();
        {
            let current = state::current_of(old.packages.get(name).into_iter().flatten());
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
        }
        let mut added = false;
        for e in &chosen {
            added |= new.insert(e.clone());
        }
        if !added {
            bail!(
                "{to} already has {name} {}: nothing to promote",
                chosen[0].version
            );
        }
        self.commit_track(to, &old, new, &Undo::default(), &[])?;
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
        let members = self.track_entries(track, name)?;
        let current = state::current_of(members.iter());
        let mut olds: Vec<PoolEntry> = state::read_meta(&self.layout, name)?
            .into_iter()
            .map(|m| m.entry)
            .filter(|e| e.matches_version(old_version))
            .collect();
        olds.sort_by(|a, b| a.path.cmp(&b.path));
        if olds.is_empty() {
            bail!(
                "the pool has no {name} {old_version}; see `keepup repo list --repo {}`",
                self.root.display()
            );
        }
        let secret = self.secret_key_path();
        let key = inspect::rpm_verifier(&std::fs::read(self.public_key_path())?)?;
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
        self.add_to_track(track, staged)
    }

    /// Store staged packages in the pool, add them to `track` and commit; on failure the
    /// track is as it was and the new pool files are removed.
    fn add_to_track(&mut self, track: &str, staged: Vec<Staged>) -> Result<Vec<PoolEntry>> {
        let old = self.track(track)?;
        let undo = self.store(&staged)?;
        let mut new = old.clone();
        for s in &staged {
            new.insert(s.meta.entry.clone());
        }
        let known: Vec<&PoolMeta> = staged.iter().map(|s| &s.meta).collect();
        self.commit_track(track, &old, new, &undo, &known)?;
        Ok(staged.into_iter().map(|s| s.meta.entry).collect())
    }

    /// Save a changed fleet policy (`self.state.fleet`; views of tracks unchanged).
    pub fn commit_fleet(&mut self) -> Result<()> {
        let old: crate::fleet::Fleet = state::read_json(&self.layout.fleet())?.unwrap_or_default();
        self.state.fleet.serial = old.serial + 1;
        self.commit_fleet_from(&old)
    }

    /// Write fleet.yaml for `self.state.fleet`, then fleet.json; on failure put `old` back.
    fn commit_fleet_from(&self, old: &crate::fleet::Fleet) -> Result<()> {
        let signer = self.signer()?;
        let save = |f: &crate::fleet::Fleet| {
            crate::fleet::write(&self.root, &signer, f)?;
            write_new(&self.layout.fleet(), &serde_json::to_vec_pretty(f)?, 0o600)
        };
        if let Err(e) = save(&self.state.fleet) {
            let mut back = old.clone();
            back.serial = self.state.fleet.serial + 1;
            let _ = save(&back);
            return Err(e);
        }
        Ok(())
    }

    /// Rebuild every view from the state (after a restore, or to time a full index build).
    pub fn reindex(&mut self) -> Result<()> {
        for t in self.state.tracks.clone() {
            let old = self.track(&t)?;
            self.commit_track(&t, &old, old.clone(), &Undo::default(), &[])?;
        }
        crate::fleet::write(&self.root, &self.signer()?, &self.state.fleet)
    }

    /// Check every signature and hash; returns the problems found.
    pub fn verify(&self) -> Result<Vec<String>> {
        views::verify(self)
    }
}

/// A pool entry's metadata: the entry and its index fragments, computed from the package.
fn fragments(entry: PoolEntry, info: &inspect::Inspected, bytes: &[u8]) -> Result<PoolMeta> {
    let mut meta = PoolMeta {
        stanza: None,
        primary: None,
        filelists: None,
        other: None,
        entry,
    };
    let e = &meta.entry;
    match e.format {
        Format::Deb => {
            meta.stanza = Some(views::deb_stanza(
                e,
                info.control.as_deref().unwrap_or(""),
                bytes,
            ))
        }
        Format::Rpm => {
            let href = format!("packages/{}", file_name(&e.path));
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let rpm = info
                .rpm
                .as_ref()
                .ok_or_else(|| anyhow!("{}: rpm headers missing", e.path))?;
            let [p, f, o] = inspect::rpm_fragments(rpm, &e.sha256, e.size, &href, now)?;
            meta.primary = Some(p);
            meta.filelists = Some(f);
            meta.other = Some(o);
        }
    }
    Ok(meta)
}

/// Last component of a slash-separated path.
pub fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}
