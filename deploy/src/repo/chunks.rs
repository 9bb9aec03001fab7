//! Incremental views: a track's Packages files and DNF metadata are made of chunks, so that
//! a change of one package re-renders and recompresses one chunk, not the whole track.
//!
//! A track's package names, in order, are cut into chunks where a name's hash says so
//! ([`ends_chunk`]: on average every [`CHUNK_NAMES`] names); the cut depends only on the
//! names, so a full rebuild and an incremental one cut alike and write the same bytes. Each
//! chunk is rendered once into its Packages text per architecture and its primary, filelists
//! and other XML, each also compressed as a gzip member of its own. A `Packages.gz` (or
//! `primary.xml.gz`) is then the concatenation of its chunks' members, which gzip, zlib, apt
//! and dnf read as one stream.
//!
//! Rendered chunks are cached under `.keepup/cache/<track>/<id>`, named by a hash of what
//! they are made of (each member's pool path and sha256, and the track's architectures), so
//! a cached chunk is valid as long as its name matches and needs no invalidation; chunks no
//! longer used by the track are removed after each build. Only the names of chunks missing
//! from the cache have their pool metadata read.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use sha2::Digest as _;

use super::state::PoolMeta;
use super::{Format, PoolEntry};

/// Names per chunk, on average.
pub const CHUNK_NAMES: u64 = 64;

/// The kinds of DNF metadata, in the order [`Rendered::rpm`] holds them.
pub const RPM_KINDS: [&str; 3] = ["primary", "filelists", "other"];

/// Does the chunk holding `name` end after it? A hash of the name alone (FNV-1a), so the
/// cut is the same whatever else the track holds.
pub fn ends_chunk(name: &str) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h % CHUNK_NAMES == 0
}

/// Bytes held by a chunk: a range of a buffer shared with the chunk's other bytes, so that
/// a cache file read from disk is not copied again into each of its parts (a promotion into
/// a track of 50,000 packages reads about 60 MB of them).
#[derive(Clone, Default)]
pub struct Blob {
    buf: std::sync::Arc<Vec<u8>>,
    start: usize,
    end: usize,
}

impl Blob {
    /// Its bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

impl From<Vec<u8>> for Blob {
    fn from(v: Vec<u8>) -> Blob {
        let end = v.len();
        Blob {
            buf: std::sync::Arc::new(v),
            start: 0,
            end,
        }
    }
}

impl std::ops::Deref for Blob {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for Blob {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl PartialEq for Blob {
    fn eq(&self, other: &Blob) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_slice()))
    }
}

/// One view file's part from one chunk: its text and that text as one gzip member (empty
/// when the text is).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Part {
    /// Uncompressed.
    pub text: Blob,
    /// A gzip member of `text`.
    pub gz: Blob,
}

impl Part {
    fn of(text: Vec<u8>) -> Result<Part> {
        let gz = if text.is_empty() {
            Vec::new()
        } else {
            gzip(&text)?
        };
        Ok(Part {
            text: text.into(),
            gz: gz.into(),
        })
    }
}

/// A chunk rendered: per architecture its Packages part, its three DNF parts, its lines of
/// the agents' index, and what a change of one of its names starts from (its members).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rendered {
    /// Packages parts, by architecture (the track's, in order).
    pub apt: Vec<Part>,
    /// primary, filelists, other.
    pub rpm: [Part; 3],
    /// Its lines of `index.json`: the current entry per (name, format, arch), compact JSON,
    /// joined by [`INDEX_SEP`] (as [`super::views::index_json`] lays them out).
    pub index: Blob,
    /// Its members by name, as JSON (a map of name to entries, as the track holds them).
    pub members: Blob,
    /// The architectures of its .debs other than `all`, sorted, space-separated.
    pub deb_arches: String,
    /// How many of its members are rpms.
    pub rpms: u64,
}

/// What separates two packages in `index.json`.
pub const INDEX_SEP: &[u8] = b",\n    ";

/// One gzip member of `data` (level 6; no name, no time: the same bytes every time).
pub fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

/// The names of one chunk and the id of what it is made of.
struct Cut<'a> {
    names: Vec<&'a String>,
    id: String,
}

/// Cut `packages` (a track's members by name, or a run of whole chunks of them) into chunks
/// and name each.
fn cut<'a>(packages: &'a BTreeMap<String, Vec<PoolEntry>>, arches: &[String]) -> Vec<Cut<'a>> {
    let mut cuts = Vec::new();
    let mut names = Vec::new();
    let mut hash = sha2::Sha256::new();
    let start = |h: &mut sha2::Sha256| {
        h.update(b"keepup chunk 1\n");
        h.update(arches.join(" ").as_bytes());
        h.update(b"\n");
    };
    start(&mut hash);
    for (name, entries) in packages {
        names.push(name);
        for e in entries {
            hash.update(e.path.as_bytes());
            hash.update(b" ");
            hash.update(e.sha256.as_bytes());
            hash.update(b"\n");
        }
        if ends_chunk(name) {
            let h = std::mem::replace(&mut hash, sha2::Sha256::new());
            start(&mut hash);
            cuts.push(Cut {
                names: std::mem::take(&mut names),
                id: hex::encode(h.finalize()),
            });
        }
    }
    if !names.is_empty() {
        cuts.push(Cut {
            names,
            id: hex::encode(hash.finalize()),
        });
    }
    cuts
}

/// Render one chunk from its members' metadata (in any order); `entries`: its names'
/// entries as the track holds them.
pub fn render(
    members: &mut [&PoolMeta],
    entries: &BTreeMap<&String, &Vec<PoolEntry>>,
    arches: &[String],
) -> Result<Rendered> {
    members.sort_by(|a, b| {
        let (a, b) = (&a.entry, &b.entry);
        a.name
            .cmp(&b.name)
            .then(a.version_cmp(&b.version))
            .then(a.path.cmp(&b.path))
    });
    let mut apt = Vec::with_capacity(arches.len());
    for arch in arches {
        let mut text = String::new();
        for m in members.iter().filter(|m| {
            m.entry.format == Format::Deb && (&m.entry.arch == arch || m.entry.arch == "all")
        }) {
            let stanza = m.fragment("stanza")?;
            text.push_str(stanza);
            if !stanza.ends_with('\n') {
                text.push('\n');
            }
            // A blank line after every stanza, as apt-ftparchive writes.
            text.push('\n');
        }
        apt.push(Part::of(text.into_bytes())?);
    }
    let mut rpm: [Part; 3] = Default::default();
    for (part, kind) in rpm.iter_mut().zip(RPM_KINDS) {
        let mut text = String::new();
        for m in members.iter().filter(|m| m.entry.format == Format::Rpm) {
            text.push_str(m.fragment(kind)?);
        }
        *part = Part::of(text.into_bytes())?;
    }
    let mut index = Vec::new();
    for (i, e) in super::state::current_of(entries.values().copied().flatten())
        .into_values()
        .enumerate()
    {
        if i > 0 {
            index.extend_from_slice(INDEX_SEP);
        }
        serde_json::to_writer(&mut index, e)?;
    }
    let all = || entries.values().copied().flatten();
    let mut deb_arches: Vec<&str> = all()
        .filter(|e| e.format == Format::Deb && e.arch != "all")
        .map(|e| e.arch.as_str())
        .collect();
    deb_arches.sort_unstable();
    deb_arches.dedup();
    Ok(Rendered {
        apt,
        rpm,
        index: index.into(),
        members: serde_json::to_vec(entries)?.into(),
        deb_arches: deb_arches.join(" "),
        rpms: all().filter(|e| e.format == Format::Rpm).count() as u64,
    })
}

impl Rendered {
    /// Its members by name.
    pub fn members(&self) -> Result<BTreeMap<String, Vec<PoolEntry>>> {
        Ok(serde_json::from_slice(&self.members)?)
    }
}

/// The cache file format: `KCH4`, the number of parts, then each part's text and gz, then
/// the index lines, the members and the .deb architectures, each as a little-endian u64
/// length and the bytes, then the number of rpms (u64), then the CRC-32 of all that
/// (little-endian).
/// A file whose checksum does not hold (a flipped bit, a torn copy from a backup) is
/// rendered again, never published. A CRC, not a cryptographic hash: the cache is private
/// (whoever can write it can write the pool metadata it is made from), it guards against
/// accidents only, and every promotion reads the whole track's cache (a SHA-256 of it cost
/// more than the rest of reading it).
const MAGIC: &[u8; 4] = b"KCH4";

fn crc32(b: &[u8]) -> [u8; 4] {
    let mut c = flate2::Crc::new();
    c.update(b);
    c.sum().to_le_bytes()
}

fn encode(r: &Rendered) -> Vec<u8> {
    let parts: Vec<&Part> = r.apt.iter().chain(r.rpm.iter()).collect();
    let size: usize = parts
        .iter()
        .map(|p| 16 + p.text.len() + p.gz.len())
        .sum::<usize>()
        + r.index.len()
        + r.members.len()
        + r.deb_arches.len()
        + 40;
    let mut out = Vec::with_capacity(8 + size);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(parts.len() as u32).to_le_bytes());
    let blobs = parts.iter().flat_map(|p| [&p.text[..], &p.gz[..]]).chain([
        &r.index[..],
        &r.members[..],
        r.deb_arches.as_bytes(),
    ]);
    for b in blobs {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
    }
    out.extend_from_slice(&r.rpms.to_le_bytes());
    let sum = crc32(&out);
    out.extend_from_slice(&sum);
    out
}

/// A cached chunk back, its parts ranges of `b`; None if it is not one (damaged, or for
/// other architectures).
fn decode(b: Vec<u8>, arches: usize) -> Option<Rendered> {
    let buf = std::sync::Arc::new(b);
    let b = buf.as_slice();
    let (body, sum) = b.split_at_checked(b.len().checked_sub(4)?)?;
    if crc32(body) != sum {
        return None;
    }
    let rest = body.strip_prefix(MAGIC)?;
    let (n, mut rest) = rest.split_at_checked(4)?;
    let n = u32::from_le_bytes(n.try_into().ok()?) as usize;
    if n != arches + 3 {
        return None;
    }
    let mut take = || -> Option<Blob> {
        let (len, r) = rest.split_at_checked(8)?;
        let len = usize::try_from(u64::from_le_bytes(len.try_into().ok()?)).ok()?;
        let (data, r) = r.split_at_checked(len)?;
        rest = r;
        let start = data.as_ptr() as usize - b.as_ptr() as usize;
        Some(Blob {
            buf: buf.clone(),
            start,
            end: start + len,
        })
    };
    let mut parts = Vec::with_capacity(n);
    for _ in 0..n {
        parts.push(Part {
            text: take()?,
            gz: take()?,
        });
    }
    let (index, members) = (take()?, take()?);
    let deb_arches = String::from_utf8(take()?.to_vec()).ok()?;
    let rpms = u64::from_le_bytes(rest.try_into().ok()?);
    let rpm: [Part; 3] = parts.split_off(arches).try_into().ok()?;
    Some(Rendered {
        apt: parts,
        rpm,
        index,
        members,
        deb_arches,
        rpms,
    })
}

/// A track's views, rendered chunk by chunk.
pub struct Chunks {
    /// The architectures the APT view lists, in order.
    pub arches: Vec<String>,
    /// The rendered chunks, in order.
    pub chunks: Vec<std::sync::Arc<Rendered>>,
    /// Each chunk's id and last name, in order.
    pub ids: Vec<(String, String)>,
    /// How many chunks were rendered now (not found in the cache).
    #[cfg_attr(not(test), allow(dead_code))]
    pub rendered: usize,
}

impl Chunks {
    /// Packages of `arch` (an index into [`Chunks::arches`]): its parts in order.
    pub fn apt(&self, arch: usize) -> impl Iterator<Item = &Part> {
        self.chunks.iter().map(move |c| &c.apt[arch])
    }

    /// DNF metadata `kind` (an index into [`RPM_KINDS`]): its parts in order.
    pub fn rpm(&self, kind: usize) -> impl Iterator<Item = &Part> {
        self.chunks.iter().map(move |c| &c.rpm[kind])
    }

    /// The chunks' lines of the agents' index, in order (empty chunks left out).
    pub fn index(&self) -> impl Iterator<Item = &[u8]> {
        self.chunks
            .iter()
            .map(|c| c.index.as_slice())
            .filter(|b| !b.is_empty())
    }

    /// How many rpms the track holds.
    pub fn rpms(&self) -> u64 {
        self.chunks.iter().map(|c| c.rpms).sum()
    }

    /// The manifest of these chunks, for the track state of `serial`.
    pub fn manifest(&self, serial: u64) -> Manifest {
        Manifest {
            serial,
            arches: self.arches.clone(),
            chunks: self.ids.clone(),
        }
    }
}

/// What the cache holds for a track state: its serial, the APT view's architectures, and
/// each chunk's id and last name, in order. Saved after each commit
/// (`.keepup/cache/<track>/manifest`), so that a change of a few names finds the chunks it
/// touches and takes every other chunk from the cache as it is, without reading the whole
/// track's state. Valid only for the committed state of the same serial (serials of
/// committed states only increase, and it is saved after its commit is on disk).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// The serial of the committed track state the chunks are of.
    pub serial: u64,
    /// The APT view's architectures.
    pub arches: Vec<String>,
    /// Each chunk's id and last name, in order.
    pub chunks: Vec<(String, String)>,
}

const MANIFEST: &str = "manifest";

impl Manifest {
    /// The manifest saved in `cache`; None if there is none or it is unreadable.
    pub fn read(cache: &Path) -> Option<Manifest> {
        serde_json::from_slice(&std::fs::read(cache.join(MANIFEST)).ok()?).ok()
    }

    /// Save it in `cache` (not synced: it is written after the commit it describes is on
    /// disk, and one lost or torn is only a slower next command).
    pub fn save(&self, cache: &Path) -> Result<()> {
        let path = cache.join(MANIFEST);
        let tmp = cache.join(".tmp-manifest");
        std::fs::write(&tmp, serde_json::to_vec(self)?)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The range of chunks holding or bordering `names` (sorted): for each name, the first
    /// chunk whose last name is not before it (the last chunk if none).
    fn touched(&self, names: &[&String]) -> Vec<usize> {
        let mut out: Vec<usize> = names
            .iter()
            .map(|n| {
                self.chunks
                    .partition_point(|(_, last)| last.as_str() < n.as_str())
                    .min(self.chunks.len() - 1)
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// Reads the pool metadata of some names, given the changed names' entries.
pub type LoadChanged<'a> =
    dyn Fn(&BTreeMap<String, Vec<PoolEntry>>, &[&String]) -> Result<Vec<PoolMeta>> + Sync + 'a;

/// The chunks of a track after a change of a few names, from the `manifest` of the state
/// before it: each run of chunks holding a changed name is cut and rendered again from its
/// members with `changes` applied (a name to all its entries after the change, none if it
/// left), every other chunk is read from the cache as it is. None when this cannot be done
/// that way (a chunk missing from the cache, or the architectures changed): the caller
/// builds from the whole track.
pub fn update(
    cache: &Path,
    manifest: &Manifest,
    changes: &BTreeMap<String, Vec<PoolEntry>>,
    load: &LoadChanged<'_>,
) -> Result<Option<Chunks>> {
    if manifest.chunks.is_empty() {
        return Ok(None);
    }
    let arches = &manifest.arches;
    let names: Vec<&String> = changes.keys().collect();
    let mut touched = manifest.touched(&names);
    // A name leaving may join its chunk to the next one: render that one again too.
    if changes.values().any(|v| v.is_empty()) {
        let more: Vec<usize> = touched
            .iter()
            .map(|i| i + 1)
            .filter(|i| *i < manifest.chunks.len())
            .collect();
        touched.extend(more);
        touched.sort_unstable();
        touched.dedup();
    }
    let read: Vec<Option<Rendered>> = super::par_map(&manifest.chunks, |(id, _)| {
        Ok(std::fs::read(cache.join(id))
            .ok()
            .and_then(|b| decode(b, arches.len())))
    })?;
    if read.iter().any(Option::is_none) {
        return Ok(None);
    }
    let mut read: Vec<Rendered> = read.into_iter().flatten().collect();
    // Runs of consecutive touched chunks: each run starts after a cut and ends at one (or
    // at the track's end), so cutting its names again cuts as the whole track would.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &i in &touched {
        match runs.last_mut() {
            Some((_, end)) if *end == i => *end = i + 1,
            _ => runs.push((i, i + 1)),
        }
    }
    let mut out: Vec<(Rendered, (String, String))> = Vec::new();
    let mut rendered = 0;
    let mut next = 0;
    for (start, end) in runs {
        let kept = read[next..start].iter_mut().map(std::mem::take);
        out.extend(kept.zip(manifest.chunks[next..start].iter().cloned()));
        next = end;
        let mut region: BTreeMap<String, Vec<PoolEntry>> = BTreeMap::new();
        for r in &read[start..end] {
            region.append(&mut r.members()?);
        }
        let (lo, hi) = (
            start.checked_sub(1).map(|i| manifest.chunks[i].1.as_str()),
            (end < manifest.chunks.len()).then(|| manifest.chunks[end - 1].1.as_str()),
        );
        for (name, entries) in changes {
            let inside =
                lo.is_none_or(|lo| name.as_str() > lo) && hi.is_none_or(|hi| name.as_str() <= hi);
            if !inside {
                continue;
            }
            match entries.is_empty() {
                true => region.remove(name),
                false => region.insert(name.clone(), entries.clone()),
            };
        }
        let cuts = cut(&region, arches);
        let need: Vec<&String> = cuts.iter().flat_map(|c| c.names.iter().copied()).collect();
        let metas = if need.is_empty() {
            Vec::new()
        } else {
            load(&region, &need)?
        };
        let by_path: std::collections::HashMap<&str, &PoolMeta> =
            metas.iter().map(|m| (m.entry.path.as_str(), m)).collect();
        for c in &cuts {
            let r = match std::fs::read(cache.join(&c.id))
                .ok()
                .and_then(|b| decode(b, arches.len()))
            {
                Some(r) => r,
                None => {
                    let r = render_cut(c, &region, &by_path, arches)?;
                    save(cache, &c.id, &encode(&r))?;
                    rendered += 1;
                    r
                }
            };
            let last = c.names.last().map_or(String::new(), |n| n.to_string());
            out.push((r, (c.id.clone(), last)));
        }
    }
    let kept = read[next..].iter_mut().map(std::mem::take);
    out.extend(kept.zip(manifest.chunks[next..].iter().cloned()));
    if rendered > 0 {
        super::sync_dir(cache)?;
    }
    let mut deb: Vec<&str> = out
        .iter()
        .flat_map(|(r, _)| r.deb_arches.split_ascii_whitespace())
        .collect();
    deb.sort_unstable();
    deb.dedup();
    let mut now: Vec<String> = super::views::APT_ARCHES
        .iter()
        .map(|s| s.to_string())
        .chain(deb.into_iter().map(str::to_string))
        .collect();
    now.sort();
    now.dedup();
    if &now != arches {
        return Ok(None);
    }
    // The chunks the change replaced leave the cache.
    let keep: std::collections::HashSet<&str> =
        out.iter().map(|(_, (id, _))| id.as_str()).collect();
    for (id, _) in &manifest.chunks {
        if !keep.contains(id.as_str()) {
            let _ = std::fs::remove_file(cache.join(id));
        }
    }
    let (chunks, ids) = out
        .into_iter()
        .map(|(r, id)| (std::sync::Arc::new(r), id))
        .unzip();
    Ok(Some(Chunks {
        arches: arches.clone(),
        chunks,
        ids,
        rendered,
    }))
}

/// Render the chunk `c` of `packages` from the metadata by pool path.
fn render_cut(
    c: &Cut,
    packages: &BTreeMap<String, Vec<PoolEntry>>,
    by_path: &std::collections::HashMap<&str, &PoolMeta>,
    arches: &[String],
) -> Result<Rendered> {
    let mut members = Vec::new();
    for name in &c.names {
        for e in &packages[*name] {
            let m = by_path.get(e.path.as_str()).copied().ok_or_else(|| {
                anyhow!(
                    "the metadata of {} is missing; restore .keepup/ from a backup",
                    e.path
                )
            })?;
            if m.entry.sha256 != e.sha256 {
                bail!(
                    "the metadata of {} is of another file (sha256 {}, the track says {}); restore .keepup/ from a backup",
                    e.path,
                    m.entry.sha256,
                    e.sha256
                );
            }
            members.push(m);
        }
    }
    let entries = c.names.iter().map(|n| (*n, &packages[*n])).collect();
    render(&mut members, &entries, arches)
}

/// The chunks of a track whose members are `packages`, with the APT view listing `arches`:
/// from the cache in `cache` where there, else rendered from the metadata `load` returns for
/// the names given (each member's, in any order) and saved to the cache. Cached chunks the
/// track no longer uses are removed.
pub fn build(
    cache: &Path,
    packages: &BTreeMap<String, Vec<PoolEntry>>,
    arches: &[String],
    load: &(dyn Fn(&[&String]) -> Result<Vec<PoolMeta>> + Sync),
) -> Result<Chunks> {
    let cuts = cut(packages, arches);
    let cached: Vec<Option<Rendered>> = super::par_map(&cuts, |c| {
        Ok(std::fs::read(cache.join(&c.id))
            .ok()
            .and_then(|b| decode(b, arches.len())))
    })?;
    let missing: Vec<&Cut> = cuts
        .iter()
        .zip(&cached)
        .filter(|(_, r)| r.is_none())
        .map(|(c, _)| c)
        .collect();
    // The metadata of every missing chunk's names, read in one go (spread over the cores).
    let names: Vec<&String> = missing
        .iter()
        .flat_map(|c| c.names.iter().copied())
        .collect();
    let metas = if names.is_empty() {
        Vec::new()
    } else {
        load(&names)?
    };
    let by_path: std::collections::HashMap<&str, &PoolMeta> =
        metas.iter().map(|m| (m.entry.path.as_str(), m)).collect();
    let fresh = super::par_map(&missing, |c| {
        let r = render_cut(c, packages, &by_path, arches)?;
        save(cache, &c.id, &encode(&r))?;
        Ok(r)
    })?;
    if !fresh.is_empty() {
        super::sync_dir(cache)?;
    }
    let rendered = fresh.len();
    let mut fresh = fresh.into_iter();
    let chunks = cached
        .into_iter()
        .map(|r| {
            std::sync::Arc::new(match r {
                Some(r) => r,
                None => fresh.next().expect("one rendered chunk per missing one"),
            })
        })
        .collect();
    prune(cache, &cuts)?;
    Ok(Chunks {
        arches: arches.to_vec(),
        chunks,
        ids: cuts
            .iter()
            .map(|c| {
                (
                    c.id.clone(),
                    c.names.last().map_or(String::new(), |n| n.to_string()),
                )
            })
            .collect(),
        rendered,
    })
}

/// Write a cache file (its name is its contents' id: written once, never replaced).
fn save(cache: &Path, id: &str, data: &[u8]) -> Result<()> {
    let path = cache.join(id);
    let tmp = cache.join(format!(".tmp-{id}"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_data()?;
        std::fs::rename(&tmp, &path)
    };
    match write() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(cache)
                .with_context(|| format!("creating {}", cache.display()))?;
            write()
        }
        r => r,
    }
    .with_context(|| format!("writing {}", path.display()))
}

/// Remove the cache files of chunks no longer in the track.
fn prune(cache: &Path, cuts: &[Cut]) -> Result<()> {
    let keep: std::collections::HashSet<&str> = cuts.iter().map(|c| c.id.as_str()).collect();
    let dir = match std::fs::read_dir(cache) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", cache.display())),
    };
    for f in dir {
        let f = f?;
        let name = f.file_name();
        let name = name.to_string_lossy();
        if !keep.contains(name.as_ref()) && name != MANIFEST {
            let _ = std::fs::remove_file(f.path());
        }
    }
    Ok(())
}

/// Where the chunks of `track` are cached.
pub fn cache_dir(private: &Path, track: &str) -> PathBuf {
    private.join("cache").join(track)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, version: &str, arch: &str, format: Format) -> PoolMeta {
        let path = match format {
            Format::Deb => format!(
                "pool/main/{}/{name}/{name}_{version}_{arch}.deb",
                &name[..1]
            ),
            Format::Rpm => format!("pool/rpm/{}/{name}/{name}-{version}.{arch}.rpm", &name[..1]),
        };
        let entry = PoolEntry {
            name: name.into(),
            version: version.into(),
            arch: arch.into(),
            format,
            sha256: super::super::sha256_hex(path.as_bytes()),
            path,
            size: 1,
            rollback_of: None,
        };
        let mut m = PoolMeta {
            stanza: None,
            primary: None,
            filelists: None,
            other: None,
            entry,
        };
        match format {
            Format::Deb => {
                m.stanza = Some(format!(
                    "Package: {name}\nVersion: {version}\nArchitecture: {arch}\nFilename: {}\n",
                    m.entry.path
                ))
            }
            Format::Rpm => {
                for (i, f) in [&mut m.primary, &mut m.filelists, &mut m.other]
                    .into_iter()
                    .enumerate()
                {
                    *f = Some(format!(
                        "<package n=\"{name}\" v=\"{version}\" k=\"{i}\"/>\n"
                    ));
                }
            }
        }
        m
    }

    fn gunzip(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(b), &mut out).unwrap();
        out
    }

    /// The track's packages and its metadata by path.
    fn track(metas: &[PoolMeta]) -> BTreeMap<String, Vec<PoolEntry>> {
        let mut t: BTreeMap<String, Vec<PoolEntry>> = BTreeMap::new();
        for m in metas {
            t.entry(m.entry.name.clone())
                .or_default()
                .push(m.entry.clone());
        }
        t
    }

    fn loader(metas: &[PoolMeta]) -> impl Fn(&[&String]) -> Result<Vec<PoolMeta>> + Sync + '_ {
        move |names: &[&String]| {
            Ok(metas
                .iter()
                .filter(|m| names.contains(&&m.entry.name))
                .cloned()
                .collect())
        }
    }

    fn whole(c: &Chunks) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let mut files = Vec::new();
        let mut gzs = Vec::new();
        for a in 0..c.arches.len() {
            files.push(c.apt(a).flat_map(|p| p.text.to_vec()).collect());
            gzs.push(c.apt(a).flat_map(|p| p.gz.to_vec()).collect());
        }
        for k in 0..3 {
            files.push(c.rpm(k).flat_map(|p| p.text.to_vec()).collect());
            gzs.push(c.rpm(k).flat_map(|p| p.gz.to_vec()).collect());
        }
        (files, gzs)
    }

    #[test]
    fn an_incremental_build_is_a_full_one_and_renders_one_chunk() {
        let arches: Vec<String> = vec!["amd64".into(), "arm64".into()];
        let mut metas: Vec<PoolMeta> = (0..1000)
            .flat_map(|i| {
                let n = format!("pkg{i:04}");
                [
                    meta(
                        &n,
                        "1.0-1",
                        if i % 10 == 0 { "all" } else { "amd64" },
                        Format::Deb,
                    ),
                    meta(&n, "1.0-1", "x86_64", Format::Rpm),
                ]
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let first = build(dir.path(), &track(&metas), &arches, &loader(&metas)).unwrap();
        assert!(first.chunks.len() > 5, "{} chunks", first.chunks.len());
        assert_eq!(first.rendered, first.chunks.len());
        // Nothing changed: nothing rendered, no metadata read.
        let none = |_: &[&String]| -> Result<Vec<PoolMeta>> { panic!("metadata read") };
        let again = build(dir.path(), &track(&metas), &arches, &none).unwrap();
        assert_eq!(again.rendered, 0);
        assert_eq!(whole(&again), whole(&first));

        // One new version of one name: one chunk rendered; the same bytes as from scratch.
        metas.push(meta("pkg0500", "1.1-1", "amd64", Format::Deb));
        let inc = build(dir.path(), &track(&metas), &arches, &loader(&metas)).unwrap();
        assert_eq!(inc.rendered, 1);
        let scratch = tempfile::tempdir().unwrap();
        let full = build(scratch.path(), &track(&metas), &arches, &loader(&metas)).unwrap();
        assert_eq!(whole(&inc), whole(&full));
        // Unused chunks left the cache.
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, inc.chunks.len());

        // Every multi-member gzip file decompresses to its text; stanzas in order.
        let (files, gzs) = whole(&inc);
        for (f, g) in files.iter().zip(&gzs) {
            assert_eq!(&gunzip(g), f);
        }
        let amd64 = String::from_utf8(files[0].clone()).unwrap();
        let stanzas: Vec<&str> = amd64.split_terminator("\n\n").collect();
        assert_eq!(stanzas.len(), 1001);
        assert!(amd64.ends_with("\n\n"));
        let i = stanzas.iter().position(|s| s.contains("pkg0500")).unwrap();
        assert!(stanzas[i].contains("1.0-1") && stanzas[i + 1].contains("1.1-1"));
        // arm64 lists the "all" packages only.
        let arm64 = String::from_utf8(files[1].clone()).unwrap();
        assert_eq!(arm64.matches("Package: ").count(), 100);
    }

    /// Files, gzip members, index lines, ids and rpm count of a chunk list.
    type AllOf = (
        Vec<Vec<u8>>,
        Vec<Vec<u8>>,
        Vec<u8>,
        Vec<(String, String)>,
        u64,
    );

    /// Everything of a chunk list a view is made of, index lines and ids included.
    fn all_of(c: &Chunks) -> AllOf {
        let (files, gzs) = whole(c);
        let index = c.index().collect::<Vec<_>>().join(INDEX_SEP);
        (files, gzs, index, c.ids.clone(), c.rpms())
    }

    #[test]
    fn a_change_of_a_few_names_is_a_full_build() {
        let arches: Vec<String> = vec!["amd64".into(), "arm64".into()];
        let mut metas: Vec<PoolMeta> = (0..2000)
            .flat_map(|i| {
                let n = format!("pkg{i:04}");
                [
                    meta(&n, "1.0-1", "amd64", Format::Deb),
                    meta(&n, "1.0-1", "x86_64", Format::Rpm),
                ]
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let loader2 = |metas: &[PoolMeta]| {
            let metas = metas.to_vec();
            move |_: &BTreeMap<String, Vec<PoolEntry>>, names: &[&String]| {
                Ok(metas
                    .iter()
                    .filter(|m| names.contains(&&m.entry.name))
                    .cloned()
                    .collect())
            }
        };
        let first = build(dir.path(), &track(&metas), &arches, &loader(&metas)).unwrap();
        let mut manifest = first.manifest(1);
        // Names that end a chunk and names that do not, new ones, one past the end, one
        // before the start, and a name leaving.
        let enders: Vec<String> = (0..100_000)
            .map(|i| format!("new{i}"))
            .filter(|n| ends_chunk(n))
            .take(2)
            .collect();
        let steps: Vec<Vec<(String, Option<&str>)>> = vec![
            vec![("pkg0500".into(), Some("1.1-1"))],
            vec![(enders[0].clone(), Some("1-1"))],
            vec![("zzz".into(), Some("1-1")), ("aaa".into(), Some("1-1"))],
            vec![
                (enders[1].clone(), Some("1-1")),
                ("pkg0501".into(), Some("2-1")),
            ],
            vec![(enders[0].clone(), None)],
            vec![("pkg0100".into(), None), ("pkg1999".into(), None)],
        ];
        for (serial, step) in steps.into_iter().enumerate() {
            let mut news = BTreeMap::new();
            for (name, version) in step {
                match version {
                    Some(v) => metas.push(meta(&name, v, "amd64", Format::Deb)),
                    None => metas.retain(|m| m.entry.name != name),
                }
                news.insert(
                    name.clone(),
                    track(&metas).remove(&name).unwrap_or_default(),
                );
            }
            let inc = update(dir.path(), &manifest, &news, &loader2(&metas))
                .unwrap()
                .expect("updated from the cache");
            assert!(inc.rendered <= 4, "{} chunks rendered", inc.rendered);
            let scratch = tempfile::tempdir().unwrap();
            let full = build(scratch.path(), &track(&metas), &arches, &loader(&metas)).unwrap();
            assert_eq!(all_of(&inc), all_of(&full), "step {serial}");
            manifest = inc.manifest(serial as u64 + 2);
            // The cache holds the chunks the manifest names (and the manifest).
            manifest.save(dir.path()).unwrap();
            let files = std::fs::read_dir(dir.path()).unwrap().count();
            assert_eq!(files, manifest.chunks.len() + 1);
            assert_eq!(Manifest::read(dir.path()), Some(manifest.clone()));
        }
        // A new architecture changes every chunk: not done from the cache.
        metas.push(meta("pkg0001", "1.1-1", "riscv64", Format::Deb));
        let news = BTreeMap::from([(
            "pkg0001".to_string(),
            track(&metas).remove("pkg0001").unwrap(),
        )]);
        assert!(update(dir.path(), &manifest, &news, &loader2(&metas))
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_damaged_cache_file_is_rendered_again() {
        let arches: Vec<String> = vec!["amd64".into()];
        let metas: Vec<PoolMeta> = (0..300)
            .map(|i| meta(&format!("p{i}"), "1-1", "amd64", Format::Deb))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let first = build(dir.path(), &track(&metas), &arches, &loader(&metas)).unwrap();
        let victim = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let b = std::fs::read(victim.path()).unwrap();
        std::fs::write(victim.path(), &b[..b.len() - 1]).unwrap();
        let again = build(dir.path(), &track(&metas), &arches, &loader(&metas)).unwrap();
        assert_eq!(again.rendered, 1);
        assert_eq!(whole(&again), whole(&first));
        // A flipped bit inside a stanza (the same length, so the layout still parses) is
        // caught by the checksum: rendered again, not published.
        let b = std::fs::read(victim.path()).unwrap();
        let mut flipped = b.clone();
        let at = b.windows(9).position(|w| w == b"Package: ").unwrap() + 9;
        flipped[at] ^= 0x01;
        std::fs::write(victim.path(), &flipped).unwrap();
        let third = build(dir.path(), &track(&metas), &arches, &loader(&metas)).unwrap();
        assert_eq!(third.rendered, 1);
        assert_eq!(whole(&third), whole(&first));
        // Metadata of another file than the track names is refused.
        let mut other = metas.clone();
        other[0].entry.sha256 = "0".repeat(64);
        let err = build(
            tempfile::tempdir().unwrap().path(),
            &track(&metas),
            &arches,
            &loader(&other),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("another file"), "{err}");
    }

    #[test]
    fn cache_files_round_trip() {
        let r = Rendered {
            apt: vec![Part::of(b"a\n\n".to_vec()).unwrap(), Part::default()],
            rpm: [
                Part::of(b"<p/>".to_vec()).unwrap(),
                Part::default(),
                Part::of(b"<o/>".to_vec()).unwrap(),
            ],
            index: b"{\"name\":\"a\"}".to_vec().into(),
            members: b"{\"a\":[]}".to_vec().into(),
            deb_arches: "amd64 riscv64".into(),
            rpms: 7,
        };
        let b = encode(&r);
        assert_eq!(decode(b.clone(), 2), Some(r));
        assert_eq!(decode(b.clone(), 1), None);
        assert_eq!(decode(b[..b.len() - 1].to_vec(), 2), None);
    }
}
