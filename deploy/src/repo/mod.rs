//! The repository: a directory of static files that any web server can serve.
//!
//! ```text
//! pool/                       immutable package files (deb: pool/main/<l>/<name>/, rpm: pool/rpm/<l>/<name>/)
//! dists/<track>/              APT view: InRelease, Release, Release.gpg, main/binary-<arch>/Packages{,.gz} + by-hash
//! rpm/<track>/                DNF view: repodata/ (repomd.xml + .asc, primary/filelists/other), packages/ (hard links into pool/)
//! tracks/<track>/index.json   the agent's index (+ index.json.sig; by-hash/SHA256/ keeps recent ones by hash)
//! fleet.yaml.asc              fleet policy, inline-signed, binding each track's index
//! fleet.yaml (+ .sig)         the same policy without the binding (older agents)
//! keys/repository.asc         public key for agents and apt (also keys/repository.gpg, binary)
//! .keepup/                    private: lock, incoming/ (copies being checked), the state (see `state`)
//! ```
//!
//! The secret key lives outside the tree (`--key-dir`; `.keepup/repo.json` says where), is
//! named by its fingerprint, and a key found inside the tree is warned about. Every file is
//! fsync'ed before its rename and its directory after; pool files are the repository's own
//! copies of what was offered.
//!
//! The state is split per track and per package name (`.keepup/tracks/<track>.json`,
//! `.keepup/pool/<name>.json`), so a command reads and rewrites only the track it
//! changes, and that track's views are assembled from pre-rendered fragments. Every mutating
//! command holds `.keepup/lock` (flock), checks everything before writing, and writes in an
//! order that keeps readers safe: new pool files and their metadata first (no index names them
//! yet), then the track's views (each index after the files it names), then the track file,
//! which is the commit. A command that fails puts the track's views back as its unchanged
//! track file describes them and removes the pool files it added.

mod chunks;
pub mod crash;
pub mod inspect;
pub mod rollouts;
mod state;
pub mod sync;
pub mod version;
mod views;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use sha2::Digest as _;

use crate::sign::{self, Signer};
pub use inspect::Format;
use keepup_deploy::wire::rollout::Rollout;
pub use keepup_deploy::wire::PoolEntry;
pub use state::Track;
pub use state::DEFAULT_VALID_FOR;
use state::{Layout, PoolMeta, Settings};
pub use views::now;

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

/// A package checked and ready to be stored: its metadata (entry + fragments) and bytes.
struct Staged {
    meta: PoolMeta,
    bytes: Vec<u8>,
    /// The repository's own copy of the offered file (a reflink in `.keepup/incoming/`),
    /// whose bytes are `bytes`: renamed into the pool. None: write `bytes` (no reflink, or a
    /// rollback's new package).
    copy: Option<tempfile::NamedTempFile>,
    /// Not in the pool yet (false: the identical file is there already).
    new: bool,
    /// The name had a metadata file when it was staged (false: a new name, whose metadata
    /// file, and most likely its pool directory, are created, not read again).
    known_name: bool,
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
    /// The secret signing key's file.
    secret_key: PathBuf,
    /// The key a rotation retires (it signs too until its overlap ends).
    retiring: Option<state::Retiring>,
    /// How long signed metadata stays valid (seconds).
    valid_for: u64,
    /// When what this command signs expires: one time for all it signs, so the views of a
    /// command expire together.
    expires: std::sync::OnceLock<u64>,
    _lock: Option<nix::fcntl::Flock<File>>,
}

/// Where `repo init` puts a new repository's secret key unless told (`--key-dir`): root's
/// `/etc/keepup/keys/`, or the user's `~/.config/keepup/`; never inside the served tree.
pub fn default_key_dir() -> Result<PathBuf> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { nix::libc::geteuid() } == 0 {
        return Ok(PathBuf::from("/etc/keepup/keys"));
    }
    let config = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(std::env::var_os("HOME").ok_or_else(|| {
            anyhow!("HOME is not set; say where the secret key goes with --key-dir DIR")
        })?)
        .join(".config"),
    };
    Ok(config.join("keepup"))
}

/// Store the armored secret key in `dir` (made 0700; outside the tree at `root`) as
/// `<FINGERPRINT>.asc` (0600); returns its absolute path. A key already stored there under
/// that name is kept.
fn store_key(dir: &Path, root: &Path, secret: &pgp::composed::SignedSecretKey) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::path::absolute(dir)?;
    let root = std::path::absolute(root)?;
    if dir.starts_with(&root)
        || std::fs::canonicalize(&dir)
            .is_ok_and(|d| std::fs::canonicalize(&root).is_ok_and(|r| d.starts_with(r)))
    {
        bail!(
            "the key directory {} is inside the repository {}, which is served; choose a --key-dir outside it",
            dir.display(),
            root.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private (0700)", dir.display()))?;
    let path = dir.join(format!("{}.asc", sign::fingerprint(secret)));
    match sign::load_secret(&path) {
        Ok(k) if sign::fingerprint(&k) == sign::fingerprint(secret) => {}
        _ => write_new(&path, sign::armor_secret(secret)?.as_bytes(), 0o600)?,
    }
    Ok(path)
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
    // The data reaches the disk before the name does, and the name before we go on.
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("writing {} to disk", path.display()))?;
    tmp.persist(path)
        .map_err(|e| anyhow!("renaming into {}: {}", path.display(), e.error))?;
    sync_dir(dir)
}

/// fsync a directory, so that the names just created or renamed in it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("writing the directory {} to disk", dir.display()))
}

/// Write every dirty page of the filesystem holding `dir` to disk (`syncfs`): one call where a
/// publish of thousands of new files would otherwise fsync each file and each directory
/// (most of what publishing cost on ext4, where every fsync commits the journal).
pub fn sync_fs(dir: &Path) -> Result<()> {
    let d = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    nix::unistd::syncfs(&d)
        .with_context(|| format!("writing the filesystem of {} to disk", dir.display()))
}

/// Write a file that no index names yet (a new pool file, its metadata) straight to its final
/// name: it becomes visible to clients only when a view naming it is renamed into place, after
/// this returns; a file left half-written by a crash is in no track and is rewritten by the
/// next publish of the same package. Not synced: the caller syncs the filesystem ([`sync_fs`])
/// before anything names the file.
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
        .with_context(|| format!("writing {}", path.display()))
}

/// [`write_unreferenced`] of a file that most likely does not exist yet, in as few system
/// calls as that takes: `mkdir` of its directory first when it is most likely missing too
/// (`new_dir`: a new package name's pool directory), then an exclusive create. A file found
/// there (left by a crash: nothing names it) is unlinked and created again, never truncated
/// in place (it may have other links). Publishing thousands of packages does this twice per
/// package; with `read_sized` this cut its system calls from 19 to 14 per package.
fn write_fresh(path: &Path, data: &[u8], mode: u32, new_dir: bool) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mkdir = || {
        match std::fs::create_dir(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            r => r,
        }
        .with_context(|| format!("creating {}", dir.display()))
    };
    if new_dir {
        mkdir()?;
    }
    let open = || {
        File::options()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
    };
    let mut f = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            mkdir()?;
            open()
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
            open()
        }
        r => r,
    }
    .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))
}

/// The bytes of an offered package file, and the repository's own copy of it where the
/// filesystem can make one cheaply: a reflink in `incoming` (a directory on the pool's
/// filesystem, btrfs or XFS), read back (the operator's file may change after it), which is
/// renamed into the pool. Elsewhere (ext4, tmpfs, another filesystem: `reflinks` is cleared at
/// the first refusal, so the other files do not try) there is no copy: the bytes read are
/// what is checked, hashed and then written into the pool ([`Repo::store`]), so a later `cp`
/// over the operator's file changes nothing in the pool either way. (A byte copy in
/// `incoming` renamed into the pool cost a file creation, a chmod and a rename per package,
/// most of the system time of a publish.)
fn copy_in(
    src: &Path,
    incoming: &Path,
    reflinks: &std::sync::atomic::AtomicBool,
) -> Result<(Option<tempfile::NamedTempFile>, Vec<u8>)> {
    use std::io::Seek as _;
    use std::sync::atomic::Ordering::Relaxed;
    let mut from = File::open(src).with_context(|| format!("reading {}", src.display()))?;
    let info = from.metadata()?;
    if !info.is_file() {
        bail!("{} is not a regular file", src.display());
    }
    let mut bytes = Vec::new();
    let read = |from: &mut File, bytes: &mut Vec<u8>| {
        read_sized(from, info.len(), bytes).with_context(|| format!("reading {}", src.display()))
    };
    if !reflinks.load(Relaxed) {
        read(&mut from, &mut bytes)?;
        return Ok((None, bytes));
    }
    let temp = || {
        tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(incoming)
    };
    let mut copy = match temp() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(incoming)
                .with_context(|| format!("creating {}", incoming.display()))?;
            temp()
        }
        r => r,
    }
    .with_context(|| format!("creating a file in {}", incoming.display()))?;
    if !reflink(&from, copy.as_file()) {
        reflinks.store(false, Relaxed);
        drop(copy);
        read(&mut from, &mut bytes)?;
        return Ok((None, bytes));
    }
    copy.as_file_mut().rewind()?;
    copy.as_file_mut()
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading the copy of {}", src.display()))?;
    Ok((Some(copy), bytes))
}

/// Read all of `from`, whose size `fstat` said is `len`, into `bytes` (empty): one `read` of
/// that size and one that finds the end (or reads on, if the file grew), where
/// `read_to_end` asks the size again (`statx`, `lseek`): two system calls per offered file.
fn read_sized(from: &mut File, len: u64, bytes: &mut Vec<u8>) -> std::io::Result<()> {
    let len = usize::try_from(len).map_err(std::io::Error::other)?;
    bytes.resize(len, 0);
    let mut n = 0;
    while n < len {
        match from.read(&mut bytes[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    bytes.truncate(n);
    if n == len {
        // The end, or more than fstat said (a file still being written): read the rest.
        let mut probe = [0u8; 64];
        loop {
            match from.read(&mut probe) {
                Ok(0) => break,
                Ok(k) => {
                    bytes.extend_from_slice(&probe[..k]);
                    from.read_to_end(bytes)?;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Make `to` (empty) a copy-on-write clone of `from` (`FICLONE`); false where the filesystem
/// cannot (ext4, tmpfs, another filesystem), and `to` is left empty.
fn reflink(from: &File, to: &File) -> bool {
    use std::os::fd::AsRawFd as _;
    // SAFETY: both descriptors are open for the duration of the call; FICLONE takes the
    // source descriptor as its argument and touches no memory of ours.
    let r = unsafe { nix::libc::ioctl(to.as_raw_fd(), nix::libc::FICLONE, from.as_raw_fd()) };
    r == 0
}

/// Move the repository's copy of an offered file to its pool path (not synced: the caller
/// syncs the filesystem, [`sync_fs`]); false if it cannot be renamed there (`.keepup/` on
/// another filesystem): then write the bytes.
fn place_copy(copy: &tempfile::NamedTempFile, dest: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let f = copy.as_file();
    if f.set_permissions(std::fs::Permissions::from_mode(0o644))
        .is_err()
    {
        return false;
    }
    let rename = || std::fs::rename(copy.path(), dest);
    match rename() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => dest
            .parent()
            .is_some_and(|d| std::fs::create_dir_all(d).is_ok() && rename().is_ok()),
        r => r.is_ok(),
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

/// A change of at most this many names is committed without reading the whole track
/// (each name's entries are read from the track file, one scan each).
const FEW_NAMES: usize = 8;

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
        self.secret_key.clone()
    }

    /// Where repositories made before `--key-dir` kept the secret key: inside the tree.
    fn key_in_tree(&self) -> PathBuf {
        self.layout.private.join("signing-key.asc")
    }

    /// A warning if a secret key lies inside the served tree (anything that copies the tree,
    /// `rsync`, `aws s3 sync`, a web server's root, publishes it), with the command that moves
    /// it out.
    pub fn key_warning(&self) -> Option<String> {
        let found = [self.key_in_tree(), self.secret_key.clone()]
            .into_iter()
            .find(|p| self.inside_tree(p))?;
        Some(format!(
            "warning: the secret signing key {} is inside the repository tree, where copying or serving the tree publishes it; move it out with `keepup repo move-key --repo {}` (to {}, or --key-dir DIR)",
            found.display(),
            self.root.display(),
            default_key_dir().map_or_else(|_| "DIR".into(), |d| d.display().to_string())
        ))
    }

    /// Move the secret key out of the tree into `key_dir`, and record where it is.
    pub fn move_key(&mut self, key_dir: &Path) -> Result<PathBuf> {
        let secret = sign::load_secret(&self.secret_key)?;
        let path = store_key(key_dir, &self.root, &secret)?;
        let mut settings = self.settings()?;
        settings.key = Some(path.clone());
        self.save_settings(&settings)?;
        let old = self.key_in_tree();
        if old.exists() && old != path {
            std::fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
            sync_dir(&self.layout.private)?;
        }
        self.secret_key = path.clone();
        Ok(path)
    }

    /// Does `p` exist inside the repository tree?
    fn inside_tree(&self, p: &Path) -> bool {
        let root = std::fs::canonicalize(&self.root).unwrap_or_else(|_| self.root.clone());
        std::fs::canonicalize(p).is_ok_and(|p| p.starts_with(root))
    }

    /// Replace `.keepup/repo.json` (the commit of a settings change).
    fn save_settings(&self, settings: &Settings) -> Result<()> {
        write_new(
            &self.layout.settings(),
            &serde_json::to_vec_pretty(settings)?,
            0o600,
        )
    }

    fn settings(&self) -> Result<Settings> {
        state::read_json::<Settings>(&self.layout.settings())?.ok_or_else(|| {
            anyhow!(
                "{} is missing; restore .keepup/ from a backup",
                self.layout.settings().display()
            )
        })
    }

    /// Path of the public key (armored).
    pub fn public_key_path(&self) -> PathBuf {
        self.root.join("keys/repository.asc")
    }

    /// Create a repository at `root` with a new key, or with the armored secret key `key`;
    /// the secret key is stored in `key_dir` (None: [`default_key_dir`]).
    pub fn init(
        root: &Path,
        key: Option<&Path>,
        key_dir: Option<&Path>,
        tracks: &[String],
        valid_for: u64,
    ) -> Result<Repo> {
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
        let key_dir = match key_dir {
            Some(d) => d.to_path_buf(),
            None => default_key_dir()?,
        };
        let repo = Repo {
            root: root.to_path_buf(),
            state: State {
                tracks: tracks.to_vec(),
                fleet: Default::default(),
            },
            _lock: Some(lock(&layout.private)?),
            secret_key: store_key(&key_dir, root, &secret)?,
            retiring: None,
            valid_for,
            expires: Default::default(),
            layout,
        };
        let public = sign::armor_public(&secret)?;
        write_atomic(&repo.public_key_path(), public.as_bytes())?;
        let binary = {
            use pgp::ser::Serialize as _;
            secret.to_public_key().to_bytes()?
        };
        write_atomic(&root.join("keys/repository.gpg"), &binary)?;
        for t in tracks {
            repo.commit_track_views(
                t,
                &Track::default(),
                Track::default(),
                &Undo::default(),
                &[],
            )?;
        }
        repo.commit_fleet_from(&repo.state.fleet, &Default::default())?;
        // Last: a repository exists once repo.json does.
        let settings = Settings {
            layout: state::LAYOUT,
            tracks: tracks.to_vec(),
            key: Some(repo.secret_key.clone()),
            valid_for: Some(valid_for),
            retiring: None,
            keyring: None,
            rollout_defaults: Default::default(),
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
        // Copies left in incoming/ by a command that died: we hold the lock, so no command
        // is using them.
        if let Ok(dir) = std::fs::read_dir(layout.incoming()) {
            for f in dir.flatten() {
                let _ = std::fs::remove_file(f.path());
            }
        }
        // Read the state only now that we hold the lock.
        let mut repo = Repo::load(root, true)?;
        repo._lock = Some(lock);
        // Layout 2 differs from 3 only in having no track logs: record 3 before any command
        // writes one, so that a keepup from before logs refuses the repository instead of
        // reading its tracks without their logs.
        let mut settings = repo.settings()?;
        if settings.layout < state::LAYOUT {
            settings.layout = state::LAYOUT;
            repo.save_settings(&settings)?;
        }
        // A repository from before the binding: publish the bound policy agents now read.
        if !repo.root.join(crate::fleet::SIGNED_POLICY).exists() {
            repo.rebind()?;
        }
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
        let layout = Layout::new(root);
        let mut repo = Repo {
            root: root.to_path_buf(),
            state: State::default(),
            secret_key: layout.private.join("signing-key.asc"),
            retiring: None,
            valid_for: DEFAULT_VALID_FOR,
            expires: Default::default(),
            layout,
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
        if let Some(k) = settings.key {
            repo.secret_key = k;
        }
        repo.valid_for = settings.valid_for.unwrap_or(DEFAULT_VALID_FOR);
        repo.retiring = settings.retiring;
        if let Some(w) = repo.key_warning() {
            eprintln!("{w}");
        }
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

    /// The loaded signer: the current key, and the retiring one during a rotation's overlap.
    pub fn signer(&self) -> Result<Signer> {
        let current = self.secret_key_path();
        let mut keys = vec![current.as_path()];
        if let Some(r) = self.retiring_key() {
            keys.push(r.key.as_path());
        }
        Signer::load_all(&keys)
    }

    /// The key a rotation retires, while its overlap lasts.
    fn retiring_key(&self) -> Option<&state::Retiring> {
        self.retiring.as_ref().filter(|r| views::now() < r.until)
    }

    /// Write the public keys (`keys/repository.asc`, `keys/repository.gpg`): the current key
    /// first, then the retiring one during a rotation's overlap.
    fn write_public_keys(&self) -> Result<()> {
        use pgp::ser::Serialize as _;
        let mut keys = vec![sign::load_secret(&self.secret_key)?];
        if let Some(r) = self.retiring_key() {
            keys.push(sign::load_secret(&r.key)?);
        }
        let mut armored = String::new();
        let mut binary = Vec::new();
        for k in &keys {
            armored.push_str(&sign::armor_public(k)?);
            binary.extend(k.to_public_key().to_bytes()?);
        }
        write_atomic(&self.root.join("keys/repository.gpg"), &binary)?;
        write_atomic(&self.public_key_path(), armored.as_bytes())
    }

    /// Rotate the signing key: to the armored secret key `new`, or a new one, stored in
    /// `key_dir` (default: beside the current key). The old key signs beside it for
    /// `overlap` seconds and vouches for it in `keys/rotation.asc`; everything is signed again.
    pub fn rotate_key(
        &mut self,
        new: Option<&Path>,
        key_dir: Option<&Path>,
        overlap: u64,
    ) -> Result<keepup_deploy::wire::rotation::Rotation> {
        let now = views::now();
        if let Some(r) = self.retiring_key() {
            bail!(
                "the last key rotation is still in its overlap, until {}; rotate again after it",
                keepup_deploy::wire::verify::utc(r.until)
            );
        }
        let old = sign::load_secret(&self.secret_key)?;
        let secret = match new {
            Some(k) => sign::load_secret(k)?,
            None => sign::generate("keepup repository <keepup@localhost>")?,
        };
        if sign::fingerprint(&secret) == sign::fingerprint(&old) {
            bail!(
                "the new key is the current key ({})",
                sign::fingerprint(&old)
            );
        }
        let dir = match key_dir {
            Some(d) => d.to_path_buf(),
            None => match self.secret_key.parent() {
                Some(d) if !self.inside_tree(d) => d.to_path_buf(),
                _ => default_key_dir()?,
            },
        };
        let path = store_key(&dir, &self.root, &secret)?;
        let rotation = keepup_deploy::wire::rotation::Rotation {
            old: sign::fingerprint(&old),
            new: sign::fingerprint(&secret),
            old_until: now + overlap,
            new_key: sign::armor_public(&secret)?,
        };
        // Signed by the old key alone: it is what hosts trust now.
        let statement = Signer::from_keys(vec![old]).cleartext(&rotation.to_json())?;
        // The commit: from here on the repository signs with both keys.
        let mut settings = self.settings()?;
        let retiring = state::Retiring {
            key: self.secret_key.clone(),
            until: rotation.old_until,
        };
        settings.retiring = Some(retiring.clone());
        settings.key = Some(path.clone());
        self.save_settings(&settings)?;
        self.retiring = Some(retiring);
        self.secret_key = path;
        write_atomic(
            &self.root.join(keepup_deploy::wire::rotation::ROTATION),
            statement.as_bytes(),
        )?;
        self.write_public_keys()?;
        self.reindex()?;
        if let Some(name) = self.settings()?.keyring {
            self.publish_keyring(&name)?;
        }
        Ok(rotation)
    }

    /// Build the keyring package `<name>-archive-keyring` (deb and rpm) holding the public
    /// keys published now, versioned by the time, and publish it into every track, so that
    /// apt and dnf hosts get a rotated key by upgrading it. Later rotations publish a new
    /// version by themselves.
    pub fn publish_keyring(&mut self, name: &str) -> Result<Vec<PoolEntry>> {
        let keyring = keepup_packager::keyring::Keyring {
            name: name.to_string(),
            version: views::now().to_string(),
            binary: std::fs::read(self.root.join("keys/repository.gpg"))?,
            armored: std::fs::read_to_string(self.public_key_path())?,
            maintainer: "keepup repository <keepup@localhost>".into(),
        };
        let out = tempfile::Builder::new()
            .prefix(".keyring-")
            .tempdir_in(&self.layout.private)?;
        let opts = keepup_packager::PackOptions {
            formats: vec![
                keepup_packager::plan::Format::Deb,
                keepup_packager::plan::Format::Rpm,
            ],
            compression: None,
            epoch: views::now(),
            sign_key: Some(self.secret_key_path()),
        };
        let files = keepup_packager::pack_keyring(&keyring, &opts, out.path())
            .map_err(|e| anyhow!("building the keyring package: {e}"))?;
        let mut settings = self.settings()?;
        if settings.keyring.as_deref() != Some(name) {
            settings.keyring = Some(name.to_string());
            self.save_settings(&settings)?;
        }
        let mut published = Vec::new();
        for t in self.state.tracks.clone() {
            published = self.publish(&files, &t)?;
        }
        Ok(published)
    }

    /// A track's serial and members.
    pub fn track(&self, track: &str) -> Result<Track> {
        self.state.track_index(track)?;
        let path = self.layout.track(track);
        state::read_track(&self.layout, track)?.ok_or_else(|| {
            anyhow!(
                "{} is missing: the repository's state is damaged; restore .keepup/ from a backup",
                path.display()
            )
        })
    }

    /// The members of `track` named `name` (reads one line of the track file, and its log).
    fn track_entries(&self, track: &str, name: &str) -> Result<Vec<PoolEntry>> {
        state::read_entries(&self.layout, track, name)
    }

    /// The serial of the index `track` publishes now (0: none, or unreadable). Read from
    /// the start of the file, where keepup writes it: the index of a large track is megabytes.
    fn published_serial(&self, track: &str) -> u64 {
        let path = self.root.join("tracks").join(track).join("index.json");
        let Ok(f) = File::open(&path) else {
            return 0;
        };
        let mut head = Vec::with_capacity(4096);
        if f.take(4096).read_to_end(&mut head).is_err() {
            return 0;
        }
        if let Some(serial) = views::index_serial(&head) {
            return serial;
        }
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<views::Index>(&b).ok())
            .map_or(0, |i| i.serial)
    }

    /// Every pool file's metadata.
    pub fn pool(&self) -> Result<Vec<PoolEntry>> {
        Ok(state::all_meta(&self.layout)?
            .into_iter()
            .map(|m| m.entry)
            .collect())
    }

    /// [`Self::commit_track_views`], then sign the policy again, bound to the new index.
    fn commit_track(
        &self,
        name: &str,
        old: &Track,
        new: Track,
        undo: &Undo,
        known: &[&PoolMeta],
    ) -> Result<()> {
        self.commit_track_views(name, old, new, undo, known)?;
        self.rebind()
    }

    /// Write the views of `name` for `new` and save it; on failure, put back the views of
    /// `old` (under a higher serial: serials never go down, and the policy is bound to them)
    /// and undo the pool changes. On success the policy still binds the previous index: the
    /// caller signs it again, once for all the tracks it changes.
    /// `known`: metadata already in memory (of the packages just stored), not read again.
    fn commit_track_views(
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
        // A command that died after writing the views but before its commit published a
        // serial the track file does not know: never sign other contents under it.
        new.serial = old.serial.max(self.published_serial(name)) + 1;
        // A rollout ends once its version is no longer the current one (a later publish,
        // promotion or rollback of the name).
        // (Only the names with a rollout are looked at: a track may hold many thousands.)
        let packages = &new.packages;
        new.rollouts.retain(|n, r| {
            state::current_of(packages.get(n).into_iter().flatten())
                .values()
                .any(|e| e.version == r.to)
        });
        // The commit: a line appended to the track's log when `old` is what is committed
        // and few names changed; else the track file, written again.
        let base = self.layout.track(name).exists().then_some(old);
        let written = self
            .write_views(&signer, name, &new, known)
            .and_then(|c| self.save_track(name, &new, base).map(|_| c));
        match written {
            Ok(chunks) => {
                crash::point(crash::Step::TrackCommit);
                // A cache: the next change of a few names starts from it.
                let _ = chunks
                    .manifest(new.serial)
                    .save(&chunks::cache_dir(&self.layout.private, name));
                Ok(())
            }
            Err(err) => self.put_back(&signer, name, old, new.serial, undo, err),
        }
    }

    /// Commit `t` as the state of `track` (see [`state::save_track`]).
    fn save_track(&self, track: &str, t: &Track, base: Option<&Track>) -> Result<()> {
        state::save_track(&self.layout, track, base, t, |p, b| write_new(p, b, 0o600))
    }

    /// After `err` while committing serial `serial` of `name`: save `old` again under a
    /// higher serial, rewrite its views, sign the policy again and undo the pool changes;
    /// returns `err` (with what else failed, if putting back failed too).
    fn put_back(
        &self,
        signer: &Signer,
        name: &str,
        old: &Track,
        serial: u64,
        undo: &Undo,
        err: anyhow::Error,
    ) -> Result<()> {
        let back = Track {
            serial: serial + 1,
            ..old.clone()
        };
        match self
            .save_track(name, &back, None)
            .and_then(|_| self.write_views(signer, name, &back, &[]))
            .and_then(|_| self.rebind())
        {
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

    /// The metadata of `names` (members of `packages`) for chunks to render: from memory
    /// where the command has it (`known`), else one metadata file per name.
    fn load_meta(
        &self,
        packages: &BTreeMap<String, Vec<PoolEntry>>,
        names: &[&String],
        known: &[&PoolMeta],
    ) -> Result<Vec<PoolMeta>> {
        let by_path: HashMap<&str, &PoolMeta> =
            known.iter().map(|m| (m.entry.path.as_str(), *m)).collect();
        let mut out = Vec::new();
        let mut unread = Vec::new();
        for n in names {
            let entries = packages.get(*n).map_or(&[][..], |v| v.as_slice());
            match entries
                .iter()
                .map(|e| by_path.get(e.path.as_str()))
                .collect::<Option<Vec<_>>>()
            {
                Some(ms) => out.extend(ms.into_iter().map(|m| (*m).clone())),
                None => unread.push(*n),
            }
        }
        let read = par_map(&unread, |n| state::read_meta(&self.layout, n))?;
        for (n, metas) in unread.iter().zip(read) {
            for e in packages.get(*n).into_iter().flatten() {
                let m = metas
                    .iter()
                    .find(|m| m.entry.path == e.path)
                    .ok_or_else(|| {
                        anyhow!(
                            "the metadata of {} is missing from {}; restore .keepup/ from a backup",
                            e.path,
                            self.layout.meta(&e.name).display()
                        )
                    })?;
                out.push(m.clone());
            }
        }
        Ok(out)
    }

    /// The rollouts a track's index carries.
    fn index_rollouts(&self, rollouts: &BTreeMap<String, Rollout>) -> Result<views::IndexRollouts> {
        Ok(views::IndexRollouts {
            list: rollouts.values().cloned().collect(),
            key: match rollouts.is_empty() {
                true => None,
                false => Some(self.rollout_public_key()?),
            },
        })
    }

    /// Write every view of `name` for the state `t`, its chunks built from the whole track.
    fn write_views(
        &self,
        signer: &Signer,
        name: &str,
        t: &Track,
        known: &[&PoolMeta],
    ) -> Result<chunks::Chunks> {
        let load = |names: &[&String]| self.load_meta(&t.packages, names, known);
        let arches = views::apt_arches(t.entries());
        let chunks = chunks::build(
            &chunks::cache_dir(&self.layout.private, name),
            &t.packages,
            &arches,
            &load,
        )?;
        let rpms = t.entries().filter(|e| e.format == Format::Rpm).collect();
        views::write_track(
            &self.root,
            signer,
            name,
            t.serial,
            self.expires(),
            &chunks,
            &views::RpmLinks::All(rpms),
            &self.index_rollouts(&t.rollouts)?,
        )?;
        Ok(chunks)
    }

    /// Commit a change of a few names of `track` without reading the whole track: `head` is
    /// its committed head, `olds` and `news` every entry of each changed name before and
    /// after. The chunks the names fall in are rendered again, the others taken from the
    /// cache as they are (see `chunks::update`). Ok(false), with nothing written, when this
    /// cannot be done so (no manifest of the committed state in the cache, a full log, a
    /// chunk missing): the caller commits the whole track instead. The policy is not signed
    /// again (the caller does).
    fn commit_change(
        &self,
        track: &str,
        head: &state::Head,
        olds: &BTreeMap<String, Vec<PoolEntry>>,
        news: &BTreeMap<String, Vec<PoolEntry>>,
        undo: &Undo,
        known: &[&PoolMeta],
    ) -> Result<bool> {
        let cache = chunks::cache_dir(&self.layout.private, track);
        if !head.room || news.len() > state::log_names() {
            return Ok(false);
        }
        let Some(manifest) = chunks::Manifest::read(&cache).filter(|m| m.serial == head.serial)
        else {
            return Ok(false);
        };
        let signer = match self.signer() {
            Ok(s) => s,
            Err(e) => {
                undo.run();
                return Err(e);
            }
        };
        let serial = head.serial.max(self.published_serial(track)) + 1;
        let load = |packages: &BTreeMap<String, Vec<PoolEntry>>, names: &[&String]| {
            self.load_meta(packages, names, known)
        };
        let prepared = (|| -> Result<Option<(chunks::Chunks, BTreeMap<String, Rollout>)>> {
            // A rollout ends once its version is no longer the current one.
            let mut rollouts = BTreeMap::new();
            for (n, r) in &head.rollouts {
                let entries = match news.get(n) {
                    Some(e) => e.clone(),
                    None => self.track_entries(track, n)?,
                };
                if state::current_of(entries.iter())
                    .values()
                    .any(|e| e.version == r.to)
                {
                    rollouts.insert(n.clone(), r.clone());
                }
            }
            Ok(chunks::update(&cache, &manifest, news, &load)?.map(|c| (c, rollouts)))
        })();
        let (chunks, rollouts) = match prepared {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(false),
            Err(e) => {
                undo.run();
                return Err(e);
            }
        };
        let links = views::RpmLinks::Changed {
            added: rpms_not_in(news, olds),
            removed: rpms_not_in(olds, news),
        };
        let written = self.index_rollouts(&rollouts).and_then(|r| {
            views::write_track(
                &self.root,
                &signer,
                track,
                serial,
                self.expires(),
                &chunks,
                &links,
                &r,
            )
        });
        let written = written
            .and_then(|_| state::save_change(&self.layout, track, head, serial, news, &rollouts));
        match written {
            Ok(()) => {
                crash::point(crash::Step::TrackCommit);
                let _ = chunks.manifest(serial).save(&cache);
                Ok(true)
            }
            Err(err) => {
                let old = self.track(track)?;
                self.put_back(&signer, track, &old, serial, undo, err)?;
                Ok(true)
            }
        }
    }

    /// Publish package files into `track`. Everything is checked before anything is written.
    pub fn publish(&mut self, files: &[PathBuf], track: &str) -> Result<Vec<PoolEntry>> {
        self.state.track_index(track)?;
        let key = inspect::rpm_verifier(&std::fs::read(self.public_key_path())?)?;
        // Checking packages and computing their index fragments is the expensive part: spread
        // it over the cores. Nothing is written until every file has passed.
        let reflinks = std::sync::atomic::AtomicBool::new(true);
        let mut staged = par_map(files, |f| self.check_file(f, &key, &reflinks))?;
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

    /// Copy one file offered for publication into the repository, then read and check the
    /// copy (the operator's file is never linked, and never read again).
    fn check_file(
        &self,
        f: &Path,
        key: &rpm::signature::pgp::Verifier,
        reflinks: &std::sync::atomic::AtomicBool,
    ) -> Result<Staged> {
        let (copy, bytes) = copy_in(f, &self.layout.incoming(), reflinks)?;
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
        s.copy = copy;
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
        let (known_name, metas) =
            match state::read_json::<Vec<PoolMeta>>(&self.layout.meta(&entry.name)) {
                Ok(m) => (m.is_some(), m.unwrap_or_default()),
                // A name's first metadata file is written straight to its name: one left
                // half-written by a crash names nothing any track holds, and is written again.
                Err(_) if !self.name_in_some_track(&entry.name)? => (true, Vec::new()),
                Err(e) => return Err(e),
            };
        let existing = metas.into_iter().find(|m| m.entry.path == entry.path);
        if let Some(existing) = existing {
            if existing.entry.sha256 == entry.sha256 {
                return Ok(Staged {
                    meta: existing,
                    bytes,
                    copy: None,
                    new: false,
                    known_name,
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
            copy: None,
            new: true,
            known_name,
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
            // Written straight to its pool path: a write that fails (ENOSPC) leaves no partial
            // file there (nothing names it yet, and the undo list does not hold it).
            let write = || {
                write_unreferenced(&dest, &s.bytes, 0o644).inspect_err(|_| {
                    let _ = std::fs::remove_file(&dest);
                })
            };
            if s.new {
                match &s.copy {
                    Some(c) => {
                        let _ = std::fs::remove_file(&dest);
                        if !place_copy(c, &dest) {
                            write()?;
                        }
                    }
                    // A new name's pool directory is made first (it is most likely missing);
                    // a file left at the path by a crash is replaced, not truncated.
                    None => {
                        write_fresh(&dest, &s.bytes, 0o644, !s.known_name).inspect_err(|_| {
                            let _ = std::fs::remove_file(&dest);
                        })?
                    }
                }
            } else if !dest.exists() {
                write()?;
            } else {
                return Ok(());
            }
            crash::point(crash::Step::PoolFile);
            undo_.lock().expect("not poisoned").remove.push(dest);
            Ok(())
        });
        // Every new pool file (bytes and name) is on disk before any metadata or view names
        // it: one sync of the filesystem (the pool and `.keepup/` are in the repository's
        // tree), not one fsync per file and per directory.
        let wrote = !undo.lock().expect("not poisoned").remove.is_empty();
        let files = files.and_then(|_| match wrote {
            true => self.sync_pool(),
            false => Ok(()),
        });
        // Per name: its new files' metadata, and whether it had a metadata file at staging.
        let mut by_name: BTreeMap<&str, (Vec<&PoolMeta>, bool)> = BTreeMap::new();
        for s in staged.iter().filter(|s| s.new) {
            let n = by_name.entry(&s.meta.entry.name).or_default();
            n.0.push(&s.meta);
            n.1 |= s.known_name;
        }
        let by_name: Vec<_> = by_name.into_iter().collect();
        let metas = files.and_then(|_| {
            par_map(&by_name, |(name, (metas, known))| {
                let path = self.layout.meta(name);
                if !*known {
                    // A new name (no metadata file when staged; we hold the lock): its file
                    // is created, not read first.
                    let mut all: Vec<PoolMeta> = metas.iter().map(|m| (*m).clone()).collect();
                    all.sort_by(|a, b| a.entry.path.cmp(&b.entry.path));
                    write_fresh(&path, &state::meta_json(&all)?, 0o600, false).inspect_err(
                        |_| {
                            let _ = std::fs::remove_file(&path);
                        },
                    )?;
                    undo_.lock().expect("not poisoned").remove.push(path);
                    crash::point(crash::Step::PoolMeta);
                    return Ok(());
                }
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
                crash::point(crash::Step::PoolMeta);
                Ok(())
            })
        });
        let metas = metas.and_then(|_| match by_name.is_empty() {
            true => Ok(()),
            false => sync_fs(&self.layout.private),
        });
        let undo = undo.into_inner().expect("not poisoned");
        if let Err(err) = metas {
            undo.run();
            return Err(err);
        }
        Ok(undo)
    }

    /// Sync the filesystems of the pool: the repository's, and the pool's own if `pool/` is
    /// a mount point.
    fn sync_pool(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        sync_fs(&self.root)?;
        let pool = self.root.join("pool");
        let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
        if dev(&pool).is_some_and(|d| Some(d) != dev(&self.root)) {
            sync_fs(&pool)?;
        }
        Ok(())
    }

    /// Promote one version of `name` (default: the current one) from the track below `to`.
    pub fn promote(
        &mut self,
        name: &str,
        version: Option<&str>,
        to: &str,
    ) -> Result<Vec<PoolEntry>> {
        // A promotion changes one name: committed without reading the whole track where the
        // chunk cache allows.
        if let Some(head) = state::read_head(&self.layout, to)? {
            let old = self.track_entries(to, name)?;
            let chosen = self.choose_promotion(name, version, to, &old)?;
            let mut t = Track::default();
            for e in &old {
                t.insert(e.clone());
            }
            let mut added = false;
            for e in &chosen {
                added |= t.insert(e.clone());
            }
            if !added {
                bail!(
                    "{to} already has {name} {}: nothing to promote",
                    chosen[0].version
                );
            }
            let olds = BTreeMap::from([(name.to_string(), old)]);
            if self.commit_change(to, &head, &olds, &t.packages, &Undo::default(), &[])? {
                self.rebind()?;
                return Ok(chosen);
            }
        }
        let old = self.track(to)?;
        let entries = old.packages.get(name).cloned().unwrap_or_default();
        let chosen = self.choose_promotion(name, version, to, &entries)?;
        let mut new = old.clone();
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

    /// The entries a promotion of `name` (`version`, default the current one) into `to`
    /// (whose state is `old`) copies from the track below, checked: one version, and no
    /// downgrade.
    fn choose_promotion(
        &self,
        name: &str,
        version: Option<&str>,
        to: &str,
        old: &[PoolEntry],
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
        {
            let current = state::current_of(old.iter());
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
        let staged = self.stage_rollbacks(name, &olds, &current, track)?;
        if staged.is_empty() {
            bail!("{track} has no {name}; a rollback replaces the current version of a track");
        }
        // The rollback is the current version now: a rollout of the name ends with it.
        self.add_to_track(track, staged)
    }

    /// Rebuild each of `olds` (one version of `name`, per format and arch) under a version
    /// above the `current` entry of its format and arch, signed; staged, not stored.
    fn stage_rollbacks(
        &self,
        name: &str,
        olds: &[PoolEntry],
        current: &state::Current<'_>,
        track: &str,
    ) -> Result<Vec<Staged>> {
        let secret = self.secret_key_path();
        let key = inspect::rpm_verifier(&std::fs::read(self.public_key_path())?)?;
        let mut staged = Vec::new();
        for old in olds {
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
        Ok(staged)
    }

    /// Store staged packages in the pool, add them to `track` and commit; on failure the
    /// track is as it was and the new pool files are removed.
    fn add_to_track(&mut self, track: &str, staged: Vec<Staged>) -> Result<Vec<PoolEntry>> {
        let known: Vec<&PoolMeta> = staged.iter().map(|s| &s.meta).collect();
        // A few names (each read from the track file): committed without reading the whole
        // track where the chunk cache allows.
        let names: std::collections::BTreeSet<&String> =
            staged.iter().map(|s| &s.meta.entry.name).collect();
        let head = match names.len() <= FEW_NAMES {
            true => state::read_head(&self.layout, track)?,
            false => None,
        };
        if let Some(head) = head {
            let mut olds = BTreeMap::new();
            let mut news = Track::default();
            for n in names {
                let old = self.track_entries(track, n)?;
                for e in &old {
                    news.insert(e.clone());
                }
                olds.insert(n.clone(), old);
            }
            for s in &staged {
                news.insert(s.meta.entry.clone());
            }
            // Files published again change nothing: their names are not part of the change.
            news.packages.retain(|n, v| olds.get(n) != Some(&*v));
            olds.retain(|n, _| news.packages.contains_key(n));
            let undo = self.store(&staged)?;
            if self.commit_change(track, &head, &olds, &news.packages, &undo, &known)? {
                self.rebind()?;
                return Ok(staged.into_iter().map(|s| s.meta.entry).collect());
            }
            return self.add_to_whole_track(track, staged, undo);
        }
        let undo = self.store(&staged)?;
        self.add_to_whole_track(track, staged, undo)
    }

    /// [`Self::add_to_track`] reading and committing the whole track.
    fn add_to_whole_track(
        &mut self,
        track: &str,
        staged: Vec<Staged>,
        undo: Undo,
    ) -> Result<Vec<PoolEntry>> {
        let old = match self.track(track) {
            Ok(t) => t,
            Err(e) => {
                undo.run();
                return Err(e);
            }
        };
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
        let (old, serial) = self.next_fleet_serial()?;
        self.state.fleet.serial = serial;
        self.commit_fleet_from(&self.state.fleet, &old)
    }

    /// The committed policy and the serial its next version takes: as for tracks, past any
    /// serial published by a command that died before its commit.
    fn next_fleet_serial(&self) -> Result<(crate::fleet::Fleet, u64)> {
        let old: crate::fleet::Fleet = state::read_json(&self.layout.fleet())?.unwrap_or_default();
        let serial = old.serial.max(crate::fleet::published_serial(&self.root)) + 1;
        Ok((old, serial))
    }

    /// Sign the policy again, bound to the indexes the tracks publish now: after every
    /// change of a track, so that agents see the change (they fetch the index the policy
    /// binds). The state's policy is unchanged but for its serial.
    fn rebind(&self) -> Result<()> {
        let (old, serial) = self.next_fleet_serial()?;
        let fleet = crate::fleet::Fleet {
            serial,
            ..self.state.fleet.clone()
        };
        self.commit_fleet_from(&fleet, &old).with_context(|| {
            format!(
                "the track changed, but {} could not be signed again, so agents still see the \
                 previous snapshot; run `keepup repo refresh --repo {}` once the cause is fixed",
                crate::fleet::SIGNED_POLICY,
                self.root.display()
            )
        })
    }

    /// Write the policy files for `fleet`, then fleet.json; on failure put `old` back.
    fn commit_fleet_from(
        &self,
        fleet: &crate::fleet::Fleet,
        old: &crate::fleet::Fleet,
    ) -> Result<()> {
        let signer = self.signer()?;
        let save = |f: &crate::fleet::Fleet| {
            crate::fleet::write(&self.root, &signer, f, &self.state.tracks, self.expires())?;
            crash::point(crash::Step::Binding);
            write_new(&self.layout.fleet(), &serde_json::to_vec_pretty(f)?, 0o600)
        };
        if let Err(e) = save(fleet) {
            let mut back = old.clone();
            back.serial = fleet.serial + 1;
            let _ = save(&back);
            return Err(e);
        }
        Ok(())
    }

    /// Rebuild every view from the state, signed again with a new expiry and new serials
    /// and no other change (`repo reindex` after a restore, `repo refresh` before expiry).
    pub fn reindex(&mut self) -> Result<()> {
        // After a rotation's overlap, the retiring key leaves the published keyring too.
        self.write_public_keys()?;
        for t in self.state.tracks.clone() {
            let old = self.track(&t)?;
            self.commit_track_views(&t, &old, old.clone(), &Undo::default(), &[])?;
        }
        // Signed once for all the tracks: bound to their new indexes, with a new expiry.
        self.commit_fleet()?;
        // Rollout progress too, so it outlives a gate that is not running (unchanged but for
        // its serial and expiry).
        for t in &self.state.tracks {
            let published = self.root.join(keepup_deploy::wire::rollout::state_path(t));
            if published.exists() {
                rollouts::update_progress(&self.root, t, self.valid_for, |_| Ok(()))?;
            }
        }
        Ok(())
    }

    /// Remove the rendered-chunk cache (`.keepup/cache`), so the next views are rendered from
    /// the pool metadata alone (`repo reindex --fresh`).
    pub fn drop_view_cache(&self) -> Result<()> {
        let dir = self.layout.private.join("cache");
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", dir.display()))
            }
            _ => Ok(()),
        }
    }

    /// When the metadata this command signs expires (Unix time; fixed at the first call).
    pub fn expires(&self) -> u64 {
        *self.expires.get_or_init(|| views::now() + self.valid_for)
    }

    /// How long signed metadata stays valid (seconds).
    pub fn valid_for(&self) -> u64 {
        self.valid_for
    }

    /// Change how long signed metadata stays valid; takes effect at the next command that
    /// signs (`repo refresh` re-signs everything).
    pub fn set_valid_for(&mut self, secs: u64) -> Result<()> {
        if secs == 0 {
            bail!("--valid-for must be longer than 0s");
        }
        let mut settings = self.settings()?;
        settings.valid_for = Some(secs);
        self.save_settings(&settings)?;
        self.valid_for = secs;
        Ok(())
    }

    /// Check every signature and hash; returns the problems found.
    pub fn verify(&self) -> Result<Vec<String>> {
        views::verify(self)
    }

    /// When the first of the published signed documents (each track's `index.json`,
    /// `fleet.yaml`) expires, as they say (unsigned reads: for scheduling a refresh, not for
    /// trust); `None` if none carries an expiry.
    pub fn signed_until(&self) -> Result<Option<u64>> {
        let mut first: Option<u64> = None;
        let mut note = |t: Option<u64>| {
            if let Some(t) = t {
                first = Some(first.map_or(t, |f| f.min(t)));
            }
        };
        for t in &self.state.tracks {
            let path = self.root.join("tracks").join(t).join("index.json");
            match std::fs::read(&path) {
                Ok(b) => {
                    let index: keepup_deploy::wire::index::Index = serde_json::from_slice(&b)
                        .with_context(|| format!("reading {}", path.display()))?;
                    note(index.expires);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            }
        }
        let path = self.root.join("fleet.yaml");
        if let Ok(text) = std::fs::read_to_string(&path) {
            let fleet = keepup_deploy::wire::fleet::Fleet::from_yaml(&text)
                .map_err(|e| anyhow!("reading {}: {e}", path.display()))?;
            note(fleet.expires);
        }
        Ok(first)
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

/// The rpm entries of `a` that `b` does not hold (by path), name by name.
fn rpms_not_in<'a>(
    a: &'a BTreeMap<String, Vec<PoolEntry>>,
    b: &BTreeMap<String, Vec<PoolEntry>>,
) -> Vec<&'a PoolEntry> {
    let mut out = Vec::new();
    for (n, v) in a {
        let other = b.get(n);
        out.extend(v.iter().filter(|e| {
            e.format == Format::Rpm && !other.is_some_and(|o| o.iter().any(|x| x.path == e.path))
        }));
    }
    out
}

/// Last component of a slash-separated path.
pub fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_file_gets_its_directory_and_replaces_a_leftover_without_touching_its_links(
    ) -> Result<()> {
        let tmp = tempfile::tempdir()?;
        // A new name: its directory (and the one above) are made.
        let p = tmp.path().join("pool/main/f/foo/foo_1_amd64.deb");
        write_fresh(&p, b"one", 0o644, true)?;
        assert_eq!(std::fs::read(&p)?, b"one");
        // A known name whose directory is gone: made at the first refusal.
        let q = tmp.path().join("pool/main/b/bar/bar_1_amd64.deb");
        write_fresh(&q, b"two", 0o600, false)?;
        assert_eq!(std::fs::read(&q)?, b"two");
        // A file left at the path by a crash, linked elsewhere: replaced, the link untouched.
        let link = tmp.path().join("link");
        std::fs::hard_link(&p, &link)?;
        write_fresh(&p, b"three", 0o644, true)?;
        assert_eq!(std::fs::read(&p)?, b"three");
        assert_eq!(std::fs::read(&link)?, b"one");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&q)?.permissions().mode() & 0o777, 0o600);
        Ok(())
    }

    #[test]
    fn a_file_is_read_whole_whatever_its_size_said() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let p = tmp.path().join("f");
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        std::fs::write(&p, &data)?;
        for said in [data.len() as u64, 0, 10, data.len() as u64 + 5] {
            let mut bytes = Vec::new();
            read_sized(&mut File::open(&p)?, said, &mut bytes)?;
            assert!(bytes == data, "size said {said}: read {}", bytes.len());
        }
        Ok(())
    }
}
