//! The repository's private state under `.keepup/`, one small file per concern so that a
//! command reads and rewrites only what it changes:
//!
//! ```text
//! .keepup/repo.json               layout version and track names, lowest first (written once)
//! .keepup/fleet.json              fleet policy (fleet.yaml is rendered from it)
//! .keepup/tracks/<track>.json     a track's serial and members, one package name per line
//! .keepup/tracks/<track>.log      the changes committed since (one line each), see below
//! .keepup/pool/<name>.json       every pool file of one package name, one per line: its entry
//!                                 and pre-rendered index fragments
//! ```
//!
//! Pool metadata holds everything the views need from a package (the Packages stanza, or the
//! createrepo primary/filelists/other entries), so views are assembled by concatenation and no
//! command re-reads package files. It is kept per name, not per file: creating files is what
//! costs most on a busy ext4, and a publish of N new services then creates N metadata files. Repositories from before this layout kept everything
//! in `.keepup/state.json`; [`migrate`] converts them.
//!
//! A change of a few names (a promotion, a publish of a few packages) is committed by
//! appending one line to the track's log: the new serial, the serial it follows, the full
//! entries of each name it changed and the track's rollouts. Rewriting the snapshot would
//! cost a write and fsync of the whole track (megabytes at tens of thousands of packages)
//! on every promotion. After [`LOG_LINES`] lines, or a larger change, the snapshot is
//! written again and the log removed; a log line whose serial the snapshot already has is
//! skipped, so a crash between the two leaves a readable state. A torn last line (a crash
//! mid-append) was never committed: readers ignore it and the next append cuts it off.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{Format, PoolEntry};
use crate::fleet::Fleet;
use keepup_deploy::wire::rollout::Rollout;

/// The layout version `repo.json` records (3: track logs, which keepup before 3 would not
/// read).
pub const LAYOUT: u32 = 3;

/// `.keepup/repo.json`: the repository's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// State layout version ([`LAYOUT`]).
    pub layout: u32,
    /// Track names, lowest first.
    pub tracks: Vec<String>,
    /// Where the secret signing key is (outside the served tree, named by its fingerprint).
    /// None: `.keepup/signing-key.asc`, where repositories made before kept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// How long signed metadata stays valid, in seconds (None: [`DEFAULT_VALID_FOR`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_for: Option<u64>,
    /// The key of the last rotation (`keepup repo rotate-key`): it signs beside `key` until
    /// its overlap ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring: Option<Retiring>,
    /// The repository's name for its keyring package (`<name>-archive-keyring`), once one
    /// was published (`keepup repo keyring`); each rotation then publishes a new version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring: Option<String>,
    /// How promotions into each track roll out unless told otherwise (`keepup rollout
    /// defaults`); a track without is promoted to every host at once.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rollout_defaults: BTreeMap<String, keepup_deploy::wire::rollout::Rules>,
}

/// A key being retired by a rotation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Retiring {
    /// Its secret key file.
    pub key: PathBuf,
    /// Unix time at which it stops signing (and agents stop trusting it).
    pub until: u64,
}

/// How long signed metadata stays valid unless the repository says otherwise: 7 days.
pub const DEFAULT_VALID_FOR: u64 = 7 * 86_400;

/// One track: its index serial and its members, grouped by package name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Track {
    /// Serial of the last index written; only increases.
    pub serial: u64,
    /// Members by package name: every version, format and arch of that name in the track.
    pub packages: BTreeMap<String, Vec<PoolEntry>>,
    /// Rollouts in waves by package name (signed into the index as they are).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rollouts: BTreeMap<String, Rollout>,
}

/// The current (highest) entry per (name, format, arch).
pub type Current<'a> = BTreeMap<(String, Format, String), &'a PoolEntry>;

impl Track {
    /// Every member.
    pub fn entries(&self) -> impl Iterator<Item = &PoolEntry> {
        self.packages.values().flatten()
    }

    /// Add a member; false if it was already there.
    pub fn insert(&mut self, e: PoolEntry) -> bool {
        let v = self.packages.entry(e.name.clone()).or_default();
        if v.iter().any(|x| x.path == e.path) {
            return false;
        }
        v.push(e);
        v.sort_by(|a, b| a.path.cmp(&b.path));
        true
    }

    /// The current (highest) entry per (name, format, arch).
    pub fn current(&self) -> Current<'_> {
        current_of(self.entries())
    }
}

/// The highest entry per (name, format, arch) among `entries`.
pub fn current_of<'a>(entries: impl Iterator<Item = &'a PoolEntry>) -> Current<'a> {
    let mut cur: Current<'a> = BTreeMap::new();
    for e in entries {
        let key = (e.name.clone(), e.format, e.arch.clone());
        match cur.get(&key) {
            Some(old) if old.version_cmp(&e.version).is_ge() => {}
            _ => {
                cur.insert(key, e);
            }
        }
    }
    cur
}

/// A track file: one line per package name, so `cat` shows it and a command that needs one
/// name's entries ([`lookup`]) reads one line instead of parsing the whole track.
pub fn track_json(t: &Track) -> Result<Vec<u8>> {
    let mut out = format!("{{\"serial\":{},\"packages\":{{", t.serial).into_bytes();
    for (i, (name, entries)) in t.packages.iter().enumerate() {
        out.extend_from_slice(if i == 0 { b"\n" } else { b",\n" });
        serde_json::to_writer(&mut out, name)?;
        out.push(b':');
        serde_json::to_writer(&mut out, entries)?;
    }
    out.extend_from_slice(b"\n}");
    // After the packages, on a line of its own that no package name can start.
    if !t.rollouts.is_empty() {
        out.extend_from_slice(b",\"rollouts\":");
        serde_json::to_writer(&mut out, &t.rollouts)?;
    }
    out.extend_from_slice(b"}\n");
    Ok(out)
}

/// The entries of `name` in a track file's bytes, found by its line; falls back to parsing
/// the whole file if the file is not laid out one name per line (edited by hand).
pub fn lookup(bytes: &[u8], name: &str) -> Result<Vec<PoolEntry>> {
    let key = format!("{}:", serde_json::to_string(name)?);
    let line = bytes
        .split(|&b| b == b'\n')
        .find(|l| l.starts_with(key.as_bytes()));
    if let Some(line) = line {
        let rest = &line[key.len()..];
        let rest = rest.strip_suffix(b",").unwrap_or(rest);
        if let Ok(v) = serde_json::from_slice::<Vec<PoolEntry>>(rest) {
            if v.iter().all(|e| e.name == name) {
                return Ok(v);
            }
        }
    }
    let t: Track = serde_json::from_slice(bytes)?;
    Ok(t.packages.get(name).cloned().unwrap_or_default())
}

/// Lines a track log holds before the snapshot is written again.
pub const LOG_LINES: usize = 256;

/// Names a change may touch and still be committed as a log line.
const LOG_NAMES: usize = 64;

/// One committed change of a track (a line of its log).
#[derive(Debug, Serialize, Deserialize)]
struct LogLine {
    /// The serial of the track this change applies to.
    prev: u64,
    /// The track's serial after it.
    serial: u64,
    /// Every entry of each name changed (none: the name left the track).
    set: BTreeMap<String, Vec<PoolEntry>>,
    /// The track's rollouts after it.
    #[serde(default)]
    rollouts: BTreeMap<String, Rollout>,
}

/// The complete lines of a log (a torn last line left out) and the length they take.
fn log_lines(log: &[u8]) -> (Vec<&[u8]>, usize) {
    let end = log.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let lines = log[..end]
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    (lines, end)
}

/// Why a log could not be applied to a snapshot.
enum Replay {
    /// The log does not follow the snapshot (read while a command replaced both): read again.
    Raced,
    /// A line is not what keepup writes.
    Damaged(anyhow::Error),
}

/// Apply `log` to `t` (a snapshot), calling `apply` for each line that follows it.
fn replay(t_serial: &mut u64, log: &[u8], mut apply: impl FnMut(LogLine)) -> Result<(), Replay> {
    for line in log_lines(log).0 {
        let l: LogLine = serde_json::from_slice(line).map_err(|e| Replay::Damaged(e.into()))?;
        if l.serial <= *t_serial {
            continue;
        }
        if l.prev != *t_serial {
            return Err(Replay::Raced);
        }
        *t_serial = l.serial;
        apply(l);
    }
    Ok(())
}

fn read_or_empty(path: &Path) -> Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// A track as committed: its file and its log. None if the track file does not exist.
pub fn read_track(layout: &Layout, track: &str) -> Result<Option<Track>> {
    let path = layout.track(track);
    let log_path = layout.track_log(track);
    for _ in 0..8 {
        let Some(mut t) = read_json::<Track>(&path)? else {
            return Ok(None);
        };
        let log = read_or_empty(&log_path)?;
        let mut serial = t.serial;
        match replay(&mut serial, &log, |l| {
            for (name, entries) in l.set {
                match entries.is_empty() {
                    true => t.packages.remove(&name),
                    false => t.packages.insert(name, entries),
                };
            }
            t.rollouts = l.rollouts;
        }) {
            Ok(()) => {
                t.serial = serial;
                return Ok(Some(t));
            }
            Err(Replay::Raced) => continue,
            Err(Replay::Damaged(e)) => {
                return Err(e.context(format!(
                "{} is damaged (not the JSON lines keepup writes); restore .keepup/ from a backup",
                log_path.display()
            )))
            }
        }
    }
    bail!(
        "{} kept changing while it was read; try again",
        path.display()
    )
}

/// The committed entries of `name` in `track`: one line of the track file, and the log.
/// The line is found by a binary search with positioned reads (the names are sorted, one
/// per line), so a lookup reads a few kilobytes of a track file of megabytes.
pub fn read_entries(layout: &Layout, track: &str, name: &str) -> Result<Vec<PoolEntry>> {
    let path = layout.track(track);
    let log_path = layout.track_log(track);
    for _ in 0..8 {
        let file =
            std::fs::File::open(&path).with_context(|| format!("reading {}", path.display()))?;
        let (serial, mut entries) =
            lookup_in(&file, name).with_context(|| format!("{} is damaged", path.display()))?;
        let log = read_or_empty(&log_path)?;
        if log.is_empty() {
            return Ok(entries);
        }
        let Some(mut serial) = serial else {
            return Ok(read_track(layout, track)?
                .and_then(|mut t| t.packages.remove(name))
                .unwrap_or_default());
        };
        match replay(&mut serial, &log, |mut l| {
            if let Some(e) = l.set.remove(name) {
                entries = e;
            }
        }) {
            Ok(()) => return Ok(entries),
            Err(Replay::Raced) => continue,
            Err(Replay::Damaged(e)) => {
                return Err(e.context(format!("{} is damaged", log_path.display())))
            }
        }
    }
    bail!(
        "{} kept changing while it was read; try again",
        path.display()
    )
}

/// Positioned reads of an open track file (the same file throughout, even if a command
/// renames a new one into its place meanwhile).
struct Lines<'a> {
    file: &'a std::fs::File,
    len: u64,
}

impl Lines<'_> {
    /// The line starting at `start`, without its newline.
    fn line(&self, start: u64) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt as _;
        let mut out = Vec::new();
        let mut pos = start;
        let mut block = 4096usize;
        while pos < self.len {
            let mut buf = vec![0; block.min((self.len - pos) as usize)];
            self.file.read_exact_at(&mut buf, pos)?;
            if let Some(i) = buf.iter().position(|&b| b == b'\n') {
                out.extend_from_slice(&buf[..i]);
                return Ok(out);
            }
            pos += buf.len() as u64;
            out.extend_from_slice(&buf);
            block *= 2;
        }
        Ok(out)
    }

    /// Where the first line starting at or after `pos` starts (`len` if none does).
    fn next_start(&self, pos: u64) -> std::io::Result<u64> {
        use std::os::unix::fs::FileExt as _;
        if pos == 0 {
            return Ok(0);
        }
        let mut at = pos - 1;
        while at < self.len {
            let mut buf = vec![0; 4096usize.min((self.len - at) as usize)];
            self.file.read_exact_at(&mut buf, at)?;
            if let Some(i) = buf.iter().position(|&b| b == b'\n') {
                return Ok(at + i as u64 + 1);
            }
            at += buf.len() as u64;
        }
        Ok(self.len)
    }

    /// The last line (its trailing newline left out).
    fn last(&self) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt as _;
        let mut window = 65536u64;
        loop {
            let from = self.len.saturating_sub(window);
            let mut buf = vec![0; (self.len - from) as usize];
            self.file.read_exact_at(&mut buf, from)?;
            let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
            match body.iter().rposition(|&b| b == b'\n') {
                Some(i) => return Ok(body[i + 1..].to_vec()),
                None if from == 0 => return Ok(body.to_vec()),
                None => window *= 4,
            }
        }
    }
}

/// The name a track file's package line is of, as [`track_json`] writes it (`"name":[...]`);
/// None for a line that is not a package's (the closing line), Err if the name is escaped
/// (then the file is read whole).
fn line_name(line: &[u8]) -> Result<Option<&[u8]>, ()> {
    let Some(rest) = line.strip_prefix(b"\"") else {
        return Ok(None);
    };
    let end = rest.iter().position(|&b| b == b'"').ok_or(())?;
    let name = &rest[..end];
    if name.contains(&b'\\') || rest.get(end + 1) != Some(&b':') {
        return Err(());
    }
    Ok(Some(name))
}

/// The serial at the head of an open track file and the entries of `name` in it: a binary
/// search over its lines when it is laid out as [`track_json`] writes it (a first line of its
/// own, then one name per line in order), else the whole file read and parsed.
fn lookup_in(file: &std::fs::File, name: &str) -> Result<(Option<u64>, Vec<PoolEntry>)> {
    let len = file.metadata()?.len();
    let lines = Lines { file, len };
    let head = lines.line(0)?;
    // A file cut short (a damaged or partly restored copy) has no closing line: it is read
    // whole, so that it is reported damaged rather than searched as if complete.
    let laid_out = head.starts_with(b"{\"serial\":")
        && head.ends_with(b",\"packages\":{")
        && !name.contains(['"', '\\'])
        && name.bytes().all(|b| b >= 0x20)
        && lines.last()?.starts_with(b"}");
    if laid_out {
        let serial = head_serial(&head);
        let (mut lo, mut hi) = (head.len() as u64 + 1, len);
        let mut escaped = false;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let start = match mid == lo {
                true => lo,
                false => lines.next_start(mid)?,
            };
            if start >= hi {
                hi = mid;
                continue;
            }
            let line = lines.line(start)?;
            let order = match line_name(&line) {
                Ok(Some(n)) => n.cmp(name.as_bytes()),
                // The closing line: after every name.
                Ok(None) => std::cmp::Ordering::Greater,
                Err(()) => {
                    escaped = true;
                    break;
                }
            };
            match order {
                std::cmp::Ordering::Less => lo = start + line.len() as u64 + 1,
                std::cmp::Ordering::Greater => hi = start,
                std::cmp::Ordering::Equal => {
                    let mut with_nl = line;
                    with_nl.push(b'\n');
                    return Ok((serial, lookup(&with_nl, name)?));
                }
            }
        }
        if !escaped && serial.is_some() {
            return Ok((serial, Vec::new()));
        }
    }
    let mut bytes = vec![0; len as usize];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut bytes, 0)?;
    Ok((head_serial(&bytes), lookup(&bytes, name)?))
}

/// What a change of a few names needs of a track's committed state, read without parsing
/// its members: its serial and rollouts, and whether its log has room for one more line.
#[derive(Debug)]
pub struct Head {
    /// The committed serial.
    pub serial: u64,
    /// The committed rollouts.
    pub rollouts: BTreeMap<String, Rollout>,
    /// The log can take another line.
    pub room: bool,
}

/// The committed head of `track` (under the repository's lock); None if the track file is
/// missing or not laid out as [`track_json`] writes it (then read it whole).
pub fn read_head(layout: &Layout, track: &str) -> Result<Option<Head>> {
    let path = layout.track(track);
    // Its first and last lines only: the file is megabytes at tens of thousands of names.
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let read = || -> std::io::Result<(Vec<u8>, Vec<u8>)> {
        let lines = Lines {
            file: &file,
            len: file.metadata()?.len(),
        };
        Ok((lines.line(0)?, lines.last()?))
    };
    let (head, last) = read().with_context(|| format!("reading {}", path.display()))?;
    let Some(mut serial) = head_serial(&head) else {
        return Ok(None);
    };
    // The rollouts: the last line, after the packages' closing brace.
    let last = last.as_slice();
    let mut rollouts = match last {
        b"}}" => BTreeMap::new(),
        _ => match last
            .strip_prefix(b"},\"rollouts\":")
            .and_then(|r| r.strip_suffix(b"}"))
            .and_then(|r| serde_json::from_slice(r).ok())
        {
            Some(r) => r,
            None => return Ok(None),
        },
    };
    let log_path = layout.track_log(track);
    let log = read_or_empty(&log_path)?;
    let lines = log_lines(&log).0.len();
    match replay(&mut serial, &log, |l| rollouts = l.rollouts) {
        Ok(()) => Ok(Some(Head {
            serial,
            rollouts,
            room: lines < LOG_LINES,
        })),
        Err(Replay::Raced) => Ok(None),
        Err(Replay::Damaged(e)) => Err(e.context(format!(
            "{} is damaged (not the JSON lines keepup writes); restore .keepup/ from a backup",
            log_path.display()
        ))),
    }
}

/// Commit a change of a few names of `track` (whose committed head is `head`, read under
/// the lock) as one line of its log: `set` holds every entry of each name changed (none if
/// it left), `rollouts` the track's rollouts after it.
pub fn save_change(
    layout: &Layout,
    track: &str,
    head: &Head,
    serial: u64,
    set: &BTreeMap<String, Vec<PoolEntry>>,
    rollouts: &BTreeMap<String, Rollout>,
) -> Result<()> {
    if !head.room || set.len() > LOG_NAMES {
        bail!(
            "internal error: a change of {} names committed as a log line",
            set.len()
        );
    }
    #[derive(Serialize)]
    struct Line<'a> {
        prev: u64,
        serial: u64,
        set: &'a BTreeMap<String, Vec<PoolEntry>>,
        rollouts: &'a BTreeMap<String, Rollout>,
    }
    let log_path = layout.track_log(track);
    let log = read_or_empty(&log_path)?;
    let (_, end) = log_lines(&log);
    let mut bytes = serde_json::to_vec(&Line {
        prev: head.serial,
        serial,
        set,
        rollouts,
    })?;
    bytes.push(b'\n');
    append(&log_path, end, log.is_empty(), &bytes)
}

/// Names a change may touch and still be committed as a log line.
pub const fn log_names() -> usize {
    LOG_NAMES
}

/// The serial at the head of a track file as [`track_json`] writes it.
fn head_serial(bytes: &[u8]) -> Option<u64> {
    let rest = bytes.strip_prefix(b"{\"serial\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// Commit `new` as the state of `track`. `base`: the committed state it was made from (read
/// under the lock); then a change of a few names is appended to the log, else (and without
/// `base`) the track file is written again and the log removed. `write` replaces a file
/// atomically.
pub fn save_track(
    layout: &Layout,
    track: &str,
    base: Option<&Track>,
    new: &Track,
    write: impl Fn(&Path, &[u8]) -> Result<()>,
) -> Result<()> {
    let log_path = layout.track_log(track);
    if let Some(base) = base {
        if let Some(set) = changed_names(base, new) {
            let log = read_or_empty(&log_path)?;
            let (lines, end) = log_lines(&log);
            if lines.len() < LOG_LINES {
                let line = LogLine {
                    prev: base.serial,
                    serial: new.serial,
                    set,
                    rollouts: new.rollouts.clone(),
                };
                let mut bytes = serde_json::to_vec(&line)?;
                bytes.push(b'\n');
                return append(&log_path, end, log.is_empty(), &bytes);
            }
        }
    }
    write(&layout.track(track), &track_json(new)?)?;
    match std::fs::remove_file(&log_path) {
        Ok(()) => super::sync_dir(&layout.private.join("tracks")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", log_path.display())),
    }
}

/// The names whose entries differ between `a` and `b`, with their entries in `b` (none if
/// gone); None if there are more than [`LOG_NAMES`].
fn changed_names(a: &Track, b: &Track) -> Option<BTreeMap<String, Vec<PoolEntry>>> {
    let mut set = BTreeMap::new();
    let mut note = |name: &String, entries: Option<&Vec<PoolEntry>>| {
        set.insert(name.clone(), entries.cloned().unwrap_or_default());
        set.len() <= LOG_NAMES
    };
    for (name, entries) in &b.packages {
        if a.packages.get(name) != Some(entries) && !note(name, Some(entries)) {
            return None;
        }
    }
    for name in a.packages.keys() {
        if !b.packages.contains_key(name) && !note(name, None) {
            return None;
        }
    }
    Some(set)
}

/// Append `line` to the log at `path` after its first `end` bytes (cutting off a torn
/// line), on disk before returning.
fn append(path: &Path, end: usize, new_file: bool, line: &[u8]) -> Result<()> {
    use std::io::{Seek as _, Write as _};
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.set_len(end as u64)
        .and_then(|_| f.seek(std::io::SeekFrom::Start(end as u64)))
        .and_then(|_| f.write_all(line))
        .and_then(|_| f.sync_data())
        .with_context(|| format!("writing {}", path.display()))?;
    if new_file {
        super::sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    }
    Ok(())
}

/// One pool file's metadata: its entry and the index fragments the views are made of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolMeta {
    /// The pool entry (as the agent index lists it).
    pub entry: PoolEntry,
    /// .deb: the Packages stanza (no trailing blank line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stanza: Option<String>,
    /// .rpm: the `<package>` element of primary.xml.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// .rpm: the `<package>` element of filelists.xml.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filelists: Option<String>,
    /// .rpm: the `<package>` element of other.xml.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other: Option<String>,
}

impl PoolMeta {
    /// A fragment by kind (`stanza`, `primary`, `filelists`, `other`).
    pub fn fragment(&self, kind: &str) -> Result<&str> {
        match kind {
            "stanza" => &self.stanza,
            "primary" => &self.primary,
            "filelists" => &self.filelists,
            "other" => &self.other,
            _ => &None,
        }
        .as_deref()
        .ok_or_else(|| anyhow!("the {kind} fragment of {} is missing", self.entry.path))
    }
}

/// Paths of the private state files of the repository at `root`.
pub struct Layout {
    /// `.keepup/`.
    pub private: PathBuf,
}

impl Layout {
    /// The layout of the repository at `root`.
    pub fn new(root: &Path) -> Layout {
        Layout {
            private: root.join(".keepup"),
        }
    }

    /// `.keepup/repo.json`.
    pub fn settings(&self) -> PathBuf {
        self.private.join("repo.json")
    }

    /// `.keepup/incoming/`: copies of offered package files while they are checked (renamed
    /// into the pool, or removed).
    pub fn incoming(&self) -> PathBuf {
        self.private.join("incoming")
    }

    /// `.keepup/fleet.json`.
    pub fn fleet(&self) -> PathBuf {
        self.private.join("fleet.json")
    }

    /// `.keepup/tracks/<track>.json`.
    pub fn track(&self, track: &str) -> PathBuf {
        self.private.join("tracks").join(format!("{track}.json"))
    }

    /// `.keepup/tracks/<track>.log`: changes committed since the track file.
    pub fn track_log(&self, track: &str) -> PathBuf {
        self.private.join("tracks").join(format!("{track}.log"))
    }

    /// `.keepup/pool/<name>.json`: the metadata of every pool file of one package name.
    pub fn meta(&self, name: &str) -> PathBuf {
        self.private.join("pool").join(format!("{name}.json"))
    }

    /// The single-file state of repositories made before [`LAYOUT`] 2.
    pub fn old_state(&self) -> PathBuf {
        self.private.join("state.json")
    }
}

/// Read a JSON state file; `None` if it does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
            format!(
                "{} is damaged (not the JSON keepup wrote); restore it from a backup",
                path.display()
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The metadata of every pool file of one package name (none: empty).
pub fn read_meta(layout: &Layout, name: &str) -> Result<Vec<PoolMeta>> {
    Ok(read_json(&layout.meta(name))?.unwrap_or_default())
}

/// A name's metadata file: a JSON array, one pool file per line.
pub fn meta_json(metas: &[PoolMeta]) -> Result<Vec<u8>> {
    let mut out = b"[".to_vec();
    for (i, m) in metas.iter().enumerate() {
        out.extend_from_slice(if i == 0 { b"\n" } else { b",\n" });
        serde_json::to_writer(&mut out, m)?;
    }
    out.extend_from_slice(b"\n]\n");
    Ok(out)
}

/// The metadata of every pool file (reads all of `.keepup/pool/`).
pub fn all_meta(layout: &Layout) -> Result<Vec<PoolMeta>> {
    let dir = layout.private.join("pool");
    let mut out = Vec::new();
    let files = match std::fs::read_dir(&dir) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for f in files {
        let p = f?.path();
        if p.extension().is_some_and(|x| x == "json") {
            out.extend(read_json::<Vec<PoolMeta>>(&p)?.unwrap_or_default());
        }
    }
    out.sort_by(|a, b| a.entry.path.cmp(&b.entry.path));
    Ok(out)
}

/// The single-file state of layout 1 (`.keepup/state.json`).
#[derive(Deserialize)]
struct OldState {
    tracks: Vec<String>,
    pool: BTreeMap<String, PoolEntry>,
    track: BTreeMap<String, OldTrack>,
    #[serde(default)]
    fleet: Fleet,
}

#[derive(Deserialize)]
struct OldTrack {
    serial: u64,
    members: BTreeSet<String>,
}

/// Convert a layout-1 repository (`.keepup/state.json` + `.keepup/meta/<sha>.json`) to this
/// layout; the public files stay as they are. Call with the lock held. `refragment` computes
/// the fragments of a pool file whose old ones are missing. Idempotent: `repo.json` is written
/// last, so an interrupted migration runs again from the start.
pub fn migrate(
    layout: &Layout,
    write: impl Fn(&Path, &[u8]) -> Result<()>,
    refragment: impl Fn(&PoolEntry) -> Result<PoolMeta>,
) -> Result<()> {
    let old_path = layout.old_state();
    let Some(old) = read_json::<OldState>(&old_path)? else {
        bail!("{} is missing", old_path.display());
    };
    let mut by_name: BTreeMap<&str, Vec<PoolMeta>> = BTreeMap::new();
    for e in old.pool.values() {
        let frags = layout
            .private
            .join("meta")
            .join(e.sha256.get(..2).unwrap_or("00"))
            .join(format!("{}.json", e.sha256));
        let meta = match read_json::<BTreeMap<String, String>>(&frags).ok().flatten() {
            Some(mut f) => PoolMeta {
                entry: e.clone(),
                stanza: f.remove("stanza"),
                primary: f.remove("primary"),
                filelists: f.remove("filelists"),
                other: f.remove("other"),
            },
            None => refragment(e)
                .with_context(|| format!("recomputing the index fragments of {}", e.path))?,
        };
        by_name.entry(&e.name).or_default().push(meta);
    }
    for (name, metas) in &by_name {
        write(&layout.meta(name), &meta_json(metas)?)?;
    }
    for t in &old.tracks {
        let mut track = Track::default();
        if let Some(ot) = old.track.get(t) {
            track.serial = ot.serial;
            for p in &ot.members {
                let e = old.pool.get(p).ok_or_else(|| {
                    anyhow!(
                        "{}: track {t} names {p}, which is not in the pool",
                        old_path.display()
                    )
                })?;
                track.insert(e.clone());
            }
        }
        write(&layout.track(t), &track_json(&track)?)?;
    }
    write(&layout.fleet(), &serde_json::to_vec_pretty(&old.fleet)?)?;
    let settings = Settings {
        retiring: None,
        keyring: None,
        rollout_defaults: Default::default(),
        layout: LAYOUT,
        tracks: old.tracks,
        key: None,
        valid_for: None,
    };
    write(&layout.settings(), &serde_json::to_vec_pretty(&settings)?)?;
    let _ = std::fs::remove_file(&old_path);
    let _ = std::fs::remove_dir_all(layout.private.join("meta"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, version: &str, format: Format) -> PoolEntry {
        let path = match format {
            Format::Deb => format!("pool/main/{}/{name}/{name}_{version}_amd64.deb", &name[..1]),
            Format::Rpm => format!("pool/rpm/{}/{name}/{name}-{version}.x86_64.rpm", &name[..1]),
        };
        PoolEntry {
            name: name.into(),
            version: version.into(),
            arch: if format == Format::Deb {
                "amd64"
            } else {
                "x86_64"
            }
            .into(),
            format,
            path,
            size: 1,
            sha256: format!("{name}{version}{format}"),
            rollback_of: None,
        }
    }

    #[test]
    fn lookup_in_a_file_finds_every_name_by_binary_search() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        for n in [0usize, 1, 2, 3, 50, 700] {
            let mut t = Track {
                serial: 3,
                ..Default::default()
            };
            for i in 0..n {
                // Names of different lengths, one with many entries (a line longer than
                // the 4 KiB block a read starts with).
                let name = format!("p{}", i * 7919 % 100_003);
                let versions = if i == n / 2 { 60 } else { 1 };
                for v in 0..versions {
                    t.insert(entry(&name, &format!("1.{v}-1"), Format::Deb));
                }
            }
            {
                let b = track_json(&t).unwrap();
                std::fs::write(&path, &b).unwrap();
                let f = std::fs::File::open(&path).unwrap();
                for name in t.packages.keys() {
                    let (serial, got) = lookup_in(&f, name).unwrap();
                    assert_eq!(serial, Some(3));
                    assert_eq!(&got, &t.packages[name], "{name} of {n}");
                }
                for absent in ["", "a", "p", "p00", "p1x", "q", "zzz", "p99999999"] {
                    if !t.packages.contains_key(absent) {
                        assert!(lookup_in(&f, absent).unwrap().1.is_empty(), "{absent}");
                    }
                }
                // A file cut short (no closing line) is not searched as if complete: a
                // name it lacks is an error (damaged), not "absent".
                if n >= 2 {
                    std::fs::write(&path, &b[..b.len() - 3]).unwrap();
                    let f = std::fs::File::open(&path).unwrap();
                    assert!(lookup_in(&f, "zzz").is_err(), "{n}");
                }
                // A hand-formatted file: read whole.
                std::fs::write(&path, serde_json::to_vec_pretty(&t).unwrap()).unwrap();
                let f = std::fs::File::open(&path).unwrap();
                for name in t.packages.keys().take(5) {
                    assert_eq!(&lookup_in(&f, name).unwrap().1, &t.packages[name]);
                }
            }
        }
    }

    #[test]
    fn track_file_is_one_name_per_line_and_lookup_reads_one_line() {
        let mut t = Track {
            serial: 7,
            ..Default::default()
        };
        assert!(t.insert(entry("foo", "1.0-1", Format::Deb)));
        assert!(t.insert(entry("foo", "1.1-1", Format::Deb)));
        assert!(t.insert(entry("foo", "1.1-1", Format::Rpm)));
        assert!(t.insert(entry("bar", "2.0-1", Format::Deb)));
        assert!(!t.insert(entry("bar", "2.0-1", Format::Deb)));
        let b = track_json(&t).unwrap();
        let text = String::from_utf8(b.clone()).unwrap();
        assert_eq!(text.lines().count(), 4, "{text}");
        assert_eq!(serde_json::from_slice::<Track>(&b).unwrap(), t);
        let foo = lookup(&b, "foo").unwrap();
        assert_eq!(foo.len(), 3);
        assert!(lookup(&b, "fo").unwrap().is_empty());
        assert!(lookup(&b, "baz").unwrap().is_empty());
        // A hand-formatted file still reads.
        let pretty = serde_json::to_vec_pretty(&t).unwrap();
        assert_eq!(lookup(&pretty, "bar").unwrap().len(), 1);
        let cur = t.current();
        assert_eq!(cur.len(), 3);
        assert_eq!(
            cur[&("foo".to_string(), Format::Deb, "amd64".to_string())].version,
            "1.1-1"
        );
        assert_eq!(t.entries().count(), 4);
    }

    #[test]
    fn small_changes_are_log_lines_and_read_back_with_the_track_file() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.private.join("tracks")).unwrap();
        let write = |p: &Path, b: &[u8]| -> Result<()> { Ok(std::fs::write(p, b)?) };
        let read = || read_track(&layout, "t").unwrap().unwrap();
        let mut t = Track::default();
        for i in 0..100 {
            t.insert(entry(&format!("p{i:03}"), "1.0-1", Format::Deb));
        }
        t.serial = 1;
        save_track(&layout, "t", None, &t, write).unwrap();
        assert!(!layout.track_log("t").exists());
        // One promotion: a line of the log; the track file is untouched.
        let file = std::fs::read(layout.track("t")).unwrap();
        let mut next = t.clone();
        next.serial = 2;
        next.insert(entry("p005", "1.1-1", Format::Deb));
        next.packages.remove("p007");
        save_track(&layout, "t", Some(&t), &next, write).unwrap();
        assert_eq!(std::fs::read(layout.track("t")).unwrap(), file);
        let log = std::fs::read_to_string(layout.track_log("t")).unwrap();
        assert_eq!(log.lines().count(), 1, "{log}");
        assert_eq!(read(), next);
        assert_eq!(read_entries(&layout, "t", "p005").unwrap().len(), 2);
        assert!(read_entries(&layout, "t", "p007").unwrap().is_empty());
        // A torn last line (a crash mid-append) was never committed, and is cut off.
        let mut torn = log.clone().into_bytes();
        torn.extend_from_slice(b"{\"prev\":2,\"ser");
        std::fs::write(layout.track_log("t"), &torn).unwrap();
        assert_eq!(read(), next);
        let mut third = next.clone();
        third.serial = 5;
        third.insert(entry("p001", "2.0-1", Format::Deb));
        save_track(&layout, "t", Some(&next), &third, write).unwrap();
        let log = std::fs::read_to_string(layout.track_log("t")).unwrap();
        assert_eq!(log.lines().count(), 2, "{log}");
        assert_eq!(read(), third);
        // A log that does not follow the track file is not applied (read again, then an
        // error says so).
        let mut other = third.clone();
        other.serial = 3;
        save_track(&layout, "t", None, &other, write).unwrap();
        std::fs::write(layout.track_log("t"), &log).unwrap();
        let err = read_track(&layout, "t").unwrap_err();
        assert!(err.to_string().contains("kept changing"), "{err}");
        // Lines the track file already has are skipped.
        other.serial = 5;
        save_track(&layout, "t", None, &other, write).unwrap();
        assert!(!layout.track_log("t").exists());
        std::fs::write(layout.track_log("t"), &log).unwrap();
        assert_eq!(read(), other);
        // After LOG_LINES lines, the track file is written again and the log removed.
        std::fs::remove_file(layout.track_log("t")).unwrap();
        let mut cur = other.clone();
        for i in 0..LOG_LINES {
            let mut n = cur.clone();
            n.serial += 1;
            n.insert(entry("p010", &format!("3.{i}-1"), Format::Deb));
            save_track(&layout, "t", Some(&cur), &n, write).unwrap();
            cur = n;
        }
        let lines = std::fs::read_to_string(layout.track_log("t"))
            .unwrap()
            .lines()
            .count();
        assert_eq!(lines, LOG_LINES);
        let mut n = cur.clone();
        n.serial += 1;
        n.insert(entry("p011", "9-1", Format::Deb));
        save_track(&layout, "t", Some(&cur), &n, write).unwrap();
        assert!(!layout.track_log("t").exists());
        assert_eq!(read(), n);
        // A change of many names rewrites the track file too.
        let mut big = n.clone();
        big.serial += 1;
        for i in 0..LOG_NAMES + 1 {
            big.insert(entry(&format!("q{i:03}"), "1-1", Format::Deb));
        }
        save_track(&layout, "t", Some(&n), &big, write).unwrap();
        assert!(!layout.track_log("t").exists());
        assert_eq!(read(), big);
    }

    #[test]
    fn the_head_is_read_without_the_members_and_a_change_is_a_log_line() {
        use keepup_deploy::wire::rollout::{parse_waves, MaxFailed, OnFailure, Rules};
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.private.join("tracks")).unwrap();
        let write = |p: &Path, b: &[u8]| -> Result<()> { Ok(std::fs::write(p, b)?) };
        assert!(read_head(&layout, "t").unwrap().is_none());
        let mut t = Track {
            serial: 4,
            ..Default::default()
        };
        for i in 0..10 {
            t.insert(entry(&format!("p{i}"), "1.0-1", Format::Deb));
        }
        save_track(&layout, "t", None, &t, write).unwrap();
        let head = read_head(&layout, "t").unwrap().unwrap();
        assert_eq!((head.serial, head.rollouts.len(), head.room), (4, 0, true));
        // Rollouts after the members, and a change committed as a log line.
        let rollout = Rollout {
            id: "t/p1/2.0-1".into(),
            name: "p1".into(),
            to: "2.0-1".into(),
            from: vec![],
            rollback: vec![],
            rules: Rules {
                waves: parse_waves("10%,100%").unwrap(),
                soak: 30,
                max_failed: MaxFailed::Count(0),
                on_failure: OnFailure::Halt,
            },
            started: 0,
        };
        t.serial = 5;
        t.rollouts.insert("p1".into(), rollout.clone());
        save_track(&layout, "t", None, &t, write).unwrap();
        let head = read_head(&layout, "t").unwrap().unwrap();
        assert_eq!(head.serial, 5);
        assert_eq!(head.rollouts.get("p1"), Some(&rollout));
        let mut next = t.clone();
        next.serial = 9;
        next.insert(entry("p3", "1.1-1", Format::Deb));
        next.rollouts.clear();
        let set = BTreeMap::from([("p3".to_string(), next.packages["p3"].clone())]);
        save_change(&layout, "t", &head, 9, &set, &next.rollouts).unwrap();
        assert_eq!(read_track(&layout, "t").unwrap().unwrap(), next);
        let head = read_head(&layout, "t").unwrap().unwrap();
        assert_eq!((head.serial, head.rollouts.len()), (9, 0));
        // A track file not laid out as keepup writes it: read whole instead.
        std::fs::write(layout.track("t"), serde_json::to_vec_pretty(&t).unwrap()).unwrap();
        assert!(read_head(&layout, "t").unwrap().is_none());
    }

    #[test]
    fn migrates_the_single_file_state() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let deb = entry("foo", "1.0-1", Format::Deb);
        let rpm = entry("foo", "1.0-1", Format::Rpm);
        let old = serde_json::json!({
            "tracks": ["unstable", "stable"],
            "pool": { deb.path.clone(): deb, rpm.path.clone(): rpm },
            "track": {
                "unstable": { "serial": 4, "members": [deb.path, rpm.path] },
                "stable": { "serial": 2, "members": [deb.path] },
            },
            "fleet": { "serial": 3, "assignments": [], "quarantine": [] },
        });
        std::fs::create_dir_all(layout.private.join("meta/fo")).unwrap();
        std::fs::write(layout.old_state(), old.to_string()).unwrap();
        std::fs::write(
            layout.private.join(format!("meta/fo/{}.json", deb.sha256)),
            r#"{"stanza":"Package: foo"}"#,
        )
        .unwrap();
        let write = |p: &Path, b: &[u8]| -> Result<()> {
            std::fs::create_dir_all(p.parent().unwrap())?;
            Ok(std::fs::write(p, b)?)
        };
        // The rpm's fragments are missing: recomputed.
        let refragment = |e: &PoolEntry| -> Result<PoolMeta> {
            Ok(PoolMeta {
                entry: e.clone(),
                stanza: None,
                primary: Some("<package/>".into()),
                filelists: Some(String::new()),
                other: Some(String::new()),
            })
        };
        migrate(&layout, write, refragment).unwrap();
        assert!(!layout.old_state().exists());
        let s: Settings = read_json(&layout.settings()).unwrap().unwrap();
        assert_eq!(s.tracks, ["unstable", "stable"]);
        let f: Fleet = read_json(&layout.fleet()).unwrap().unwrap();
        assert_eq!(f.serial, 3);
        let u: Track = read_json(&layout.track("unstable")).unwrap().unwrap();
        assert_eq!((u.serial, u.entries().count()), (4, 2));
        let st: Track = read_json(&layout.track("stable")).unwrap().unwrap();
        assert_eq!((st.serial, st.entries().count()), (2, 1));
        let m = read_meta(&layout, "foo").unwrap();
        assert_eq!(m.len(), 2);
        let text = String::from_utf8(std::fs::read(layout.meta("foo")).unwrap()).unwrap();
        assert_eq!(text.lines().count(), 4, "one pool file per line: {text}");
        let deb_meta = m.iter().find(|m| m.entry == deb).unwrap();
        assert_eq!(deb_meta.fragment("stanza").unwrap(), "Package: foo");
        assert_eq!(all_meta(&layout).unwrap().len(), 2);
    }
}
