//! The public views of one track, regenerated from its state: the APT view (`dists/<track>/`),
//! the DNF view (`rpm/<track>/`) and the agent's index (`tracks/<track>/index.json`). Only the
//! track that changed is rewritten; per-package fragments (Packages stanzas, createrepo
//! entries) are computed once at publish time and kept in `.keepup/pool/`, and assembled
//! into chunks that are rendered and compressed once (`chunks`), so a view costs a
//! concatenation of cached chunks, its hashing and a few signatures. The APT view publishes
//! `Packages.gz` only and lists the uncompressed `Packages` in the Release without publishing
//! it, as Debian's own archive does (apt needs the listing, not the file): the uncompressed
//! Packages was most of the bytes every promotion wrote and synced. Each index file is written once,
//! as its by-hash file, and hard-linked to its plain name. Old by-hash files and DNF
//! metadata are pruned after a few generations. Also `repo verify`.

use std::io::Write as _;
use std::path::Path;

use anyhow::{anyhow, Context as _, Result};
use sha2::Digest as _;

use super::chunks::{gzip, Chunks};
use super::{file_name, sha256_hex, write_atomic, Format, PoolEntry, Repo};
use crate::sign::{self, Signer};
use keepup_deploy::wire::fleet::index_by_hash;

/// Architectures every APT view lists, so stock apt on these hosts finds an index even when
/// the track is empty.
pub const APT_ARCHES: [&str; 2] = ["amd64", "arm64"];

/// A Packages stanza for a .deb: its control fields plus where and what the file is (the
/// fields `apt-ftparchive packages` adds, except the SHA1 that apt no longer trusts).
pub fn deb_stanza(e: &PoolEntry, control: &str, bytes: &[u8]) -> String {
    let md5 = hex::encode(md5::Md5::digest(bytes));
    let sha512 = hex::encode(sha2::Sha512::digest(bytes));
    format!(
        "{}\nFilename: {}\nSize: {}\nMD5sum: {md5}\nSHA256: {}\nSHA512: {sha512}\n",
        control.trim_end(),
        e.path,
        e.size,
        e.sha256
    )
}

/// RFC 2822 date in UTC, as Release files carry it (`UTC`, like apt-ftparchive writes); the
/// date arithmetic is the packager's, which dates Debian changelogs.
pub fn rfc2822(secs: u64) -> String {
    keepup_packager::plan::rfc2822(secs).replace("+0000", "UTC")
}

/// Unix time now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Generations of by-hash files and DNF metadata kept besides the current one, for clients
/// that fetched an older `InRelease` or `repomd.xml` and have not yet fetched what it names.
pub const PREVIOUS_GENERATIONS: usize = 3;

/// The rollouts a track's index carries, and the public rollout key that signs their
/// progress (set when there are rollouts).
#[derive(Debug, Clone, Default)]
pub struct IndexRollouts {
    /// The rollouts.
    pub list: Vec<keepup_deploy::wire::rollout::Rollout>,
    /// The armored public rollout key.
    pub key: Option<String>,
}

/// The rpm files a DNF view links to: all of the track's (links of others are removed), or
/// those a change added and removed.
pub enum RpmLinks<'a> {
    /// Every rpm of the track.
    All(Vec<&'a PoolEntry>),
    /// The rpms a change added, and those it removed.
    Changed {
        /// Added to the track.
        added: Vec<&'a PoolEntry>,
        /// No longer in the track.
        removed: Vec<&'a PoolEntry>,
    },
}

/// Rewrite every view of `track` from its `chunks`: the APT and DNF views and the agents'
/// index, with its new serial and, in the agents' index only, its rollouts (stock apt and
/// dnf see the new version at once).
#[allow(clippy::too_many_arguments)]
pub fn write_track(
    root: &Path,
    signer: &Signer,
    track: &str,
    serial: u64,
    expires: u64,
    chunks: &Chunks,
    links: &RpmLinks,
    rollouts: &IndexRollouts,
) -> Result<()> {
    if super::crash::armed() {
        return write_apt(root, signer, track, expires, chunks)
            .and_then(|_| write_rpm(root, signer, track, chunks, links))
            .and_then(|_| write_index(root, signer, track, serial, expires, chunks, rollouts));
    }
    // Four signatures and the hashing of every file: the APT view on one core, the rest on
    // the other.
    std::thread::scope(|s| {
        let apt = s.spawn(|| write_apt(root, signer, track, expires, chunks));
        let rest = write_rpm(root, signer, track, chunks, links)
            .and_then(|_| write_index(root, signer, track, serial, expires, chunks, rollouts));
        apt.join().expect("APT view thread panicked").and(rest)
    })
}

/// The architectures a track's APT view lists: amd64 and arm64 always, and those of its
/// .debs (other than `all`), sorted.
pub fn apt_arches<'a>(members: impl Iterator<Item = &'a PoolEntry>) -> Vec<String> {
    let mut arches: Vec<String> = APT_ARCHES.iter().map(|s| s.to_string()).collect();
    for e in members {
        if e.format == Format::Deb && e.arch != "all" && !arches.contains(&e.arch) {
            arches.push(e.arch.clone());
        }
    }
    arches.sort();
    arches
}

/// A file written from its parts into `dir` under a temporary name, with its SHA-256 (hex)
/// and size; renamed by the caller.
struct Written {
    tmp: tempfile::NamedTempFile,
    sha256: String,
    size: usize,
}

/// Write `parts` one after the other into a new temporary file in `dir`, hashing as it goes,
/// and fsync it. (Release files list the SHA-256 only: apt verifies nothing else, and
/// treats MD5 as no verification at all; an MD5Sum section cost a second pass over every
/// byte of every index of a promotion.)
fn write_parts<'a>(dir: &Path, parts: impl Iterator<Item = &'a [u8]>) -> Result<Written> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file());
    let mut sha = sha2::Sha256::new();
    let mut size = 0;
    for p in parts {
        sha.update(p);
        size += p.len();
        out.write_all(p)?;
    }
    out.flush()?;
    drop(out);
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("writing a file in {} to disk", dir.display()))?;
    Ok(Written {
        tmp,
        sha256: hex::encode(sha.finalize()),
        size,
    })
}

/// Put a written file in place as `by-hash/SHA256/<sha256>` of `dir` and as `dir/name` (with
/// `link`, a hard link to the same file where the filesystem allows; else a copy): by-hash
/// first, so that a client holding the new Release finds every file it names.
fn place_by_hash(w: Written, dir: &Path, name: &str, link: bool) -> Result<String> {
    let hash_dir = dir.join("by-hash/SHA256");
    std::fs::create_dir_all(&hash_dir)
        .with_context(|| format!("creating {}", hash_dir.display()))?;
    let by_hash = hash_dir.join(&w.sha256);
    w.tmp
        .persist(&by_hash)
        .map_err(|e| anyhow!("renaming into {}: {}", by_hash.display(), e.error))?;
    super::sync_dir(&hash_dir)?;
    let plain = dir.join(name);
    let tmp = dir.join(format!(".tmp-{name}"));
    let _ = std::fs::remove_file(&tmp);
    if !link || std::fs::hard_link(&by_hash, &tmp).is_err() {
        std::fs::copy(&by_hash, &tmp)
            .with_context(|| format!("copying {} to {}", by_hash.display(), tmp.display()))?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all())?;
    }
    std::fs::rename(&tmp, &plain).with_context(|| format!("renaming into {}", plain.display()))?;
    super::sync_dir(dir)?;
    Ok(w.sha256)
}

fn write_apt(
    root: &Path,
    signer: &Signer,
    track: &str,
    expires: u64,
    chunks: &Chunks,
) -> Result<()> {
    let dist = root.join("dists").join(track);
    let arches = &chunks.arches;
    let mut sums = Vec::new();
    let mut by_hash = Vec::new();
    let empty_gz = gzip(b"")?;
    for (a, arch) in arches.iter().enumerate() {
        let dir = format!("main/binary-{arch}");
        let full = dist.join(&dir);
        let hash_dir = full.join("by-hash/SHA256");
        // A Packages.gz of no package is one empty member.
        let gz = if chunks.apt(a).all(|p| p.gz.is_empty()) {
            write_parts(&hash_dir, std::iter::once(empty_gz.as_slice()))?
        } else {
            write_parts(&hash_dir, chunks.apt(a).map(|p| p.gz.as_slice()))?
        };
        let name = "Packages.gz";
        sums.push((format!("{dir}/{name}"), gz.size, gz.sha256.clone()));
        // The uncompressed Packages is listed (apt fetches an index only if the Release
        // lists its uncompressed name, and checks what it decompresses against it), but
        // not published: Debian's archive does the same.
        let mut sha = sha2::Sha256::new();
        let mut size = 0;
        for p in chunks.apt(a) {
            sha.update(&p.text);
            size += p.text.len();
        }
        sums.push((format!("{dir}/Packages"), size, hex::encode(sha.finalize())));
        let current = vec![place_by_hash(gz, &full, name, true)?];
        super::crash::point(super::crash::Step::AptPackages);
        by_hash.push((hash_dir, current));
    }
    let mut release = format!(
        "Origin: keepup\nLabel: keepup\nSuite: {track}\nCodename: {track}\nDate: {}\nValid-Until: {}\nArchitectures: {}\nComponents: main\nDescription: keepup track {track}\nAcquire-By-Hash: yes\nSHA256:\n",
        rfc2822(now()),
        rfc2822(expires),
        arches.join(" ")
    );
    for (p, size, sha) in &sums {
        release.push_str(&format!(" {sha} {size:>16} {p}\n"));
    }
    let gpg = signer.detached(release.as_bytes())?;
    let inrelease = signer.cleartext(&release)?;
    // InRelease first: it carries its own signature, and it is what apt fetches.
    write_atomic(&dist.join("InRelease"), inrelease.as_bytes())?;
    write_atomic(&dist.join("Release"), release.as_bytes())?;
    write_atomic(&dist.join("Release.gpg"), gpg.as_bytes())?;
    super::crash::point(super::crash::Step::AptRelease);
    // Only now that the new Release is in place: the generations no Release names any more,
    // but for the last few (apt clients mid-update may hold them).
    for (dir, current) in by_hash {
        prune_generations(&dir, &current, 1, GRACE, |_| false)?;
        // The uncompressed Packages of repositories from before it was left out.
        if let Some(bin) = dir.parent().and_then(Path::parent) {
            let _ = std::fs::remove_file(bin.join("Packages"));
        }
    }
    Ok(())
}

const PRIMARY_OPEN: &str = r#"<metadata xmlns="http://linux.duke.edu/metadata/common" xmlns:rpm="http://linux.duke.edu/metadata/rpm" packages="{N}">"#;
const FILELISTS_OPEN: &str =
    r#"<filelists xmlns="http://linux.duke.edu/metadata/filelists" packages="{N}">"#;
const OTHER_OPEN: &str =
    r#"<otherdata xmlns="http://linux.duke.edu/metadata/other" packages="{N}">"#;

fn write_rpm(
    root: &Path,
    signer: &Signer,
    track: &str,
    chunks: &Chunks,
    links: &RpmLinks,
) -> Result<()> {
    let base = root.join("rpm").join(track);
    let pkgdir = base.join("packages");
    std::fs::create_dir_all(&pkgdir)?;
    // Hard links: the same bytes as the pool, at a path inside the DNF repository. One
    // directory listing instead of a lookup per package (after a change of a few names,
    // only theirs).
    let mut present = std::collections::BTreeSet::new();
    let (rpms, removed) = match links {
        RpmLinks::All(rpms) => {
            for f in std::fs::read_dir(&pkgdir)? {
                present.insert(f?.file_name().to_string_lossy().into_owned());
            }
            (rpms, None)
        }
        RpmLinks::Changed { added, removed } => (added, Some(removed)),
    };
    let mut wanted = std::collections::BTreeSet::new();
    for e in rpms {
        let name = file_name(&e.path);
        wanted.insert(name);
        if !present.contains(name) {
            let link = pkgdir.join(name);
            let tmp = pkgdir.join(format!(".tmp-{name}"));
            let _ = std::fs::remove_file(&tmp);
            std::fs::hard_link(root.join(&e.path), &tmp)
                .or_else(|_| std::fs::copy(root.join(&e.path), &tmp).map(|_| ()))
                .with_context(|| format!("linking {} into {}", e.path, pkgdir.display()))?;
            std::fs::rename(&tmp, &link)?;
        }
    }
    let n = chunks.rpms().to_string();
    let mut records = Vec::new();
    let repodata = base.join("repodata");
    for (k, (kind, open, close)) in [
        ("primary", PRIMARY_OPEN, "</metadata>"),
        ("filelists", FILELISTS_OPEN, "</filelists>"),
        ("other", OTHER_OPEN, "</otherdata>"),
    ]
    .into_iter()
    .enumerate()
    {
        let head = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{}\n",
            open.replace("{N}", &n)
        );
        let tail = format!("{close}\n");
        let (head_gz, tail_gz) = (gzip(head.as_bytes())?, gzip(tail.as_bytes())?);
        // The uncompressed file is not published: only its checksum and size.
        let mut open_sum = sha2::Sha256::new();
        let mut open_size = 0;
        for p in std::iter::once(head.as_bytes())
            .chain(chunks.rpm(k).map(|p| p.text.as_slice()))
            .chain(std::iter::once(tail.as_bytes()))
        {
            open_sum.update(p);
            open_size += p.len();
        }
        let gz = write_parts(
            &repodata,
            std::iter::once(head_gz.as_slice())
                .chain(chunks.rpm(k).map(|p| p.gz.as_slice()))
                .chain(std::iter::once(tail_gz.as_slice())),
        )?;
        let href = format!("repodata/{}-{kind}.xml.gz", gz.sha256);
        let path = base.join(&href);
        gz.tmp
            .persist(&path)
            .map_err(|e| anyhow!("renaming into {}: {}", path.display(), e.error))?;
        records.push((
            kind,
            gz.sha256,
            hex::encode(open_sum.finalize()),
            href,
            gz.size,
            open_size,
        ));
    }
    super::sync_dir(&repodata)?;
    let t = now();
    let mut repomd = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<repomd xmlns=\"http://linux.duke.edu/metadata/repo\" xmlns:rpm=\"http://linux.duke.edu/metadata/rpm\">\n  <revision>{t}</revision>\n"
    );
    for (kind, sum, open_sum, href, size, open_size) in &records {
        repomd.push_str(&format!(
            "  <data type=\"{kind}\">\n    <checksum type=\"sha256\">{sum}</checksum>\n    <open-checksum type=\"sha256\">{open_sum}</open-checksum>\n    <location href=\"{href}\"/>\n    <timestamp>{t}</timestamp>\n    <size>{size}</size>\n    <open-size>{open_size}</open-size>\n  </data>\n"
        ));
    }
    repomd.push_str("</repomd>\n");
    let asc = signer.detached(repomd.as_bytes())?;
    write_atomic(&base.join("repodata/repomd.xml.asc"), asc.as_bytes())?;
    write_atomic(&base.join("repodata/repomd.xml"), repomd.as_bytes())?;
    super::crash::point(super::crash::Step::RpmView);
    // Metadata that no repomd.xml names any more: keep the last few generations for clients
    // mid-download, remove the rest.
    let current: Vec<String> = records
        .iter()
        .map(|r| file_name(&r.3).to_string())
        .collect();
    prune_generations(&base.join("repodata"), &current, 3, GRACE, |name| {
        name.starts_with("repomd.xml")
    })?;
    // Links of packages that left the track.
    for name in present.iter().filter(|n| !wanted.contains(n.as_str())) {
        let _ = std::fs::remove_file(pkgdir.join(name));
    }
    for e in removed.into_iter().flatten() {
        let _ = std::fs::remove_file(pkgdir.join(file_name(&e.path)));
    }
    Ok(())
}

/// How long a by-hash file or DNF metadata file stays after no `Release`/`repomd.xml` names
/// it: a client that fetched the index just before a publish still finds what it names.
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Remove the files of `dir` that are not `current`, not among the newest
/// [`PREVIOUS_GENERATIONS`] generations of `per_generation` files before it (by modification
/// time: each generation is written after the one before), and older than `grace`. Files for
/// which `skip` is true are left alone, and so are temporary files of a write in progress.
fn prune_generations(
    dir: &Path,
    current: &[String],
    per_generation: usize,
    grace: std::time::Duration,
    skip: impl Fn(&str) -> bool,
) -> Result<()> {
    let cutoff = std::time::SystemTime::now() - grace;
    let mut old: Vec<(std::time::SystemTime, String)> = Vec::new();
    for f in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let f = f?;
        let name = f.file_name().to_string_lossy().into_owned();
        if skip(&name) || name.starts_with(".tmp-") || current.contains(&name) {
            continue;
        }
        old.push((f.metadata()?.modified()?, name));
    }
    // Newest first.
    old.sort_by(|a, b| b.cmp(a));
    for (_, name) in old
        .into_iter()
        .skip(PREVIOUS_GENERATIONS * per_generation)
        .filter(|(t, _)| *t < cutoff)
    {
        let _ = std::fs::remove_file(dir.join(name));
    }
    Ok(())
}

pub use keepup_deploy::wire::Index;

/// The serial of an index from the first bytes of its file, as [`write_index`] lays it out
/// (`"serial": N` among the first lines); None if it is not there.
pub fn index_serial(head: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(head).ok().or_else(|| {
        // Cut inside a multi-byte character: what is valid is enough.
        std::str::from_utf8(&head[..head.len().saturating_sub(3)]).ok()
    })?;
    // Only the top-level field: it comes before "packages" (the wire type's field order).
    let end = text.find("\"packages\"").unwrap_or(text.len());
    let rest = text[..end].split("\n  \"serial\": ").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// An index as `index.json` holds it: the top-level fields one per line, as
/// [`index_serial`] reads them, and each package compact on a line of its own (a third of
/// the bytes of pretty-printing them, which every promotion writes, hashes and signs).
#[cfg(test)]
pub fn index_json(index: &Index) -> Result<Vec<u8>> {
    let mut lines = Vec::with_capacity(index.packages.len());
    for p in &index.packages {
        lines.push(serde_json::to_vec(p)?);
    }
    let head = Index {
        packages: Vec::new(),
        ..index.clone()
    };
    index_json_of(&head, lines.iter().map(Vec::as_slice))
}

/// [`index_json`] of `head` (its packages left out) with the packages of `parts`: each a
/// run of packages as compact JSON lines joined by [`super::chunks::INDEX_SEP`], none
/// empty.
pub fn index_json_of<'a>(head: &Index, parts: impl Iterator<Item = &'a [u8]>) -> Result<Vec<u8>> {
    let pretty = serde_json::to_vec_pretty(&head)?;
    // serde_json prints the empty list at two spaces of indentation; no string can hold the
    // newline before it.
    let empty = b"\n  \"packages\": []";
    let at = pretty
        .windows(empty.len())
        .position(|w| w == empty)
        .ok_or_else(|| anyhow!("internal error: no packages field in an index"))?;
    let mut out = Vec::with_capacity(pretty.len() + (1 << 20));
    out.extend_from_slice(&pretty[..at]);
    out.extend_from_slice(b"\n  \"packages\": [");
    let mut any = false;
    for p in parts {
        out.extend_from_slice(if any {
            super::chunks::INDEX_SEP
        } else {
            b"\n    "
        });
        out.extend_from_slice(p);
        any = true;
    }
    if any {
        out.extend_from_slice(b"\n  ");
    }
    out.push(b']');
    out.extend_from_slice(&pretty[at + empty.len()..]);
    out.push(b'\n');
    Ok(out)
}

fn write_index(
    root: &Path,
    signer: &Signer,
    track: &str,
    serial: u64,
    expires: u64,
    chunks: &Chunks,
    rollouts: &IndexRollouts,
) -> Result<()> {
    let head = Index {
        track: track.to_string(),
        serial,
        generated: now(),
        expires: Some(expires),
        packages: Vec::new(),
        rollouts: rollouts.list.clone(),
        rollout_key: rollouts.key.clone(),
    };
    let json = index_json_of(&head, chunks.index())?;
    let sig = signer.detached(&json)?;
    let dir = root.join("tracks").join(track);
    // By hash first: what agents fetch, once the policy binds it. index.json and its
    // detached signature are for older agents and for people.
    let sha256 = sha256_hex(&json);
    let by_hash = root.join(index_by_hash(track, &sha256));
    write_atomic(&by_hash, &json)?;
    write_atomic(&dir.join("index.json.sig"), sig.as_bytes())?;
    // index.json is a hard link to the by-hash file (the bytes are written and synced
    // once), else a copy.
    let plain = dir.join("index.json");
    let tmp = dir.join(".tmp-index.json");
    let _ = std::fs::remove_file(&tmp);
    match std::fs::hard_link(&by_hash, &tmp) {
        Ok(()) => {
            std::fs::rename(&tmp, &plain)
                .with_context(|| format!("renaming into {}", plain.display()))?;
            super::sync_dir(&dir)?;
        }
        Err(_) => write_atomic(&plain, &json)?,
    }
    crate::fleet::remember_index(root, track, serial, &sha256);
    super::crash::point(super::crash::Step::Index);
    // An agent that read the previous policy still finds the index it binds.
    prune_generations(&dir.join("by-hash/SHA256"), &[sha256], 1, GRACE, |_| false)
}

/// Check every signature and every hash the views carry, and the pool against the state.
pub fn verify(repo: &Repo) -> Result<Vec<String>> {
    let key = sign::load_public(&repo.public_key_path())?;
    let mut problems = Vec::new();
    let root = &repo.root;
    let read = |rel: &str| std::fs::read(root.join(rel)).map_err(|e| anyhow!("{rel}: {e}"));
    // A file whose detached signature is `sig`, checked against the key.
    let read_signed = |rel: &str, sig: &str| -> Result<Vec<u8>> {
        let data = read(rel)?;
        let armored = String::from_utf8(read(sig)?).map_err(|_| anyhow!("{sig}: not text"))?;
        sign::verify_detached(&key, &data, &armored).with_context(|| sig.to_string())?;
        Ok(data)
    };
    let pool = repo.pool()?;
    for e in &pool {
        match read(&e.path) {
            Ok(b) if sha256_hex(&b) == e.sha256 && b.len() as u64 == e.size => {}
            Ok(_) => problems.push(format!(
                "{}: contents changed (sha256 or size differs from when it was published)",
                e.path
            )),
            Err(err) => problems.push(err.to_string()),
        }
    }
    for track in &repo.state.tracks {
        let mut check = |what: &str, r: Result<()>| {
            if let Err(e) = r {
                problems.push(format!("{track}: {what}: {e:#}"));
            }
        };
        let d = format!("dists/{track}");
        check(
            "InRelease",
            (|| {
                let text = String::from_utf8(read(&format!("{d}/InRelease"))?)?;
                let signed = sign::verify_cleartext(&key, &text)?;
                let release = String::from_utf8(read_signed(
                    &format!("{d}/Release"),
                    &format!("{d}/Release.gpg"),
                )?)?;
                if signed.trim_end() != release.trim_end() {
                    return Err(anyhow!("InRelease and Release differ"));
                }
                let until =
                    super::inspect::control_field(&release, "Valid-Until").ok_or_else(|| {
                        anyhow!(
                            "Release has no Valid-Until; run `keepup repo refresh --repo {}`",
                            root.display()
                        )
                    })?;
                let until = parse_rfc2822(&until)?;
                keepup_deploy::wire::verify::check_expiry(Some(until), now()).map_err(|e| {
                    anyhow!(
                        "{e}; re-sign with `keepup repo refresh --repo {}`",
                        root.display()
                    )
                })?;
                let mut in_sha = false;
                let mut listed = Vec::new();
                for line in release.lines() {
                    if !line.starts_with(' ') {
                        in_sha = line.starts_with("SHA256:");
                        continue;
                    }
                    if in_sha {
                        listed.push(line.split_whitespace().collect::<Vec<&str>>());
                    }
                }
                // The uncompressed Packages is listed, not published: it must be what its
                // Packages.gz decompresses to.
                let (plain, files): (Vec<_>, Vec<_>) = listed
                    .into_iter()
                    .partition(|f| f.len() == 3 && f[2].ends_with("/Packages"));
                for f in &plain {
                    let (sum, size, path) = (f[0], f[1], f[2]);
                    let gz = files
                        .iter()
                        .find(|g| g.len() == 3 && g[2] == format!("{path}.gz"))
                        .ok_or_else(|| anyhow!("{path} is listed without {path}.gz"))?;
                    let (dir, _) = path.rsplit_once('/').unwrap_or((".", path));
                    let b = read(&format!("{d}/{dir}/by-hash/SHA256/{}", gz[0]))?;
                    let mut text = Vec::new();
                    std::io::Read::read_to_end(
                        &mut flate2::read::MultiGzDecoder::new(b.as_slice()),
                        &mut text,
                    )
                    .map_err(|e| anyhow!("{path}.gz: {e}"))?;
                    if sha256_hex(&text) != sum || text.len().to_string() != size {
                        return Err(anyhow!("{path}.gz does not decompress to its {path} line"));
                    }
                }
                for f in files {
                    if let [sum, size, path] = f[..] {
                        // The signed Release says `Acquire-By-Hash: yes`: clients fetch the
                        // by-hash file, which must match.
                        let (dir, _) = path.rsplit_once('/').unwrap_or((".", path));
                        let b = read(&format!("{d}/{dir}/by-hash/SHA256/{sum}"))?;
                        if sha256_hex(&b) != sum || b.len().to_string() != size {
                            return Err(anyhow!("{path} does not match its SHA256 line"));
                        }
                        if path.ends_with("/Packages.gz") {
                            let mut text = Vec::new();
                            std::io::Read::read_to_end(
                                &mut flate2::read::MultiGzDecoder::new(b.as_slice()),
                                &mut text,
                            )
                            .map_err(|e| anyhow!("{path}: {e}"))?;
                            check_packages(root, &String::from_utf8(text)?)?;
                        }
                        // The plain name, for old clients, is replaced before the Release
                        // that names it: one of another generation is what a command that
                        // was interrupted there leaves (the next command or `repo reindex`
                        // rewrites it).
                        let plain = read(&format!("{d}/{path}"))?;
                        if sha256_hex(&plain) != sum {
                            let other = format!("{d}/{dir}/by-hash/SHA256/{}", sha256_hex(&plain));
                            if !root.join(&other).exists() {
                                return Err(anyhow!("{path} does not match its SHA256 line"));
                            }
                            eprintln!(
                                "note: {d}/{path} is of another generation than the Release (an interrupted command; clients fetch by hash); `keepup repo reindex` rewrites it"
                            );
                        }
                    }
                }
                Ok(())
            })(),
        );
        let r = format!("rpm/{track}/repodata");
        check(
            "repomd.xml",
            (|| {
                let md = read_signed(&format!("{r}/repomd.xml"), &format!("{r}/repomd.xml.asc"))?;
                let md = String::from_utf8(md)?;
                for data in md.split("<data ").skip(1) {
                    let sum = between(data, "<checksum type=\"sha256\">", "<")
                        .ok_or_else(|| anyhow!("no checksum"))?;
                    let href = between(data, "<location href=\"", "\"")
                        .ok_or_else(|| anyhow!("no location"))?;
                    let b = read(&format!("rpm/{track}/{href}"))?;
                    if sha256_hex(&b) != sum {
                        return Err(anyhow!("{href} does not match repomd.xml"));
                    }
                }
                Ok(())
            })(),
        );
        let t = format!("tracks/{track}");
        check(
            "index.json",
            (|| {
                let json = read_signed(&format!("{t}/index.json"), &format!("{t}/index.json.sig"))?;
                let index: Index = serde_json::from_slice(&json)?;
                keepup_deploy::wire::verify::check_expiry(index.expires, now()).map_err(|e| {
                    anyhow!(
                        "{e}; re-sign with `keepup repo refresh --repo {}`",
                        root.display()
                    )
                })?;
                for e in &index.packages {
                    let b = read(&e.path)?;
                    if sha256_hex(&b) != e.sha256 {
                        return Err(anyhow!("{} does not match the index", e.path));
                    }
                }
                Ok(())
            })(),
        );
    }
    if let Err(e) = crate::fleet::verify(repo, &key) {
        problems.push(format!("fleet.yaml: {e:#}"));
    }
    if let Err(e) = verify_rotation(repo) {
        problems.push(format!(
            "{}: {e:#}",
            keepup_deploy::wire::rotation::ROTATION
        ));
    }
    Ok(problems)
}

/// The key rotation chain: the statement (if any) is signed by the key the last rotation
/// retired, and names the current key as the new one.
fn verify_rotation(repo: &Repo) -> Result<()> {
    use keepup_deploy::wire::rotation::{Rotation, ROTATION};
    let path = repo.root.join(ROTATION);
    let armored = match std::fs::read_to_string(&path) {
        Ok(a) => a,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let Some(retiring) = &repo.retiring else {
        return Err(anyhow!(
            "published, but the repository's settings name no retired key"
        ));
    };
    let old = sign::load_secret(&retiring.key)?.to_public_key();
    let text = sign::verify_cleartext(&old, &armored)
        .context("not signed by the key the last rotation retired")?;
    let r: Rotation = serde_json::from_str(&text)?;
    let current = sign::fingerprint(&sign::load_secret(&repo.secret_key)?);
    if r.new != current {
        return Err(anyhow!(
            "it names {} as the new key, but the repository signs with {current}",
            r.new
        ));
    }
    Ok(())
}

/// The Unix time of a Release date as [`rfc2822`] writes it (`Thu, 01 Jan 1970 00:00:00 UTC`).
fn parse_rfc2822(s: &str) -> Result<u64> {
    let bad = || anyhow!("{s:?} is not a Release date");
    let f: Vec<&str> = s.split_whitespace().collect();
    let [_, day, month, year, time, _] = f[..] else {
        return Err(bad());
    };
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == month)
    .ok_or_else(bad)? as i64
        + 1;
    let (day, year): (i64, i64) = (day.parse()?, year.parse()?);
    let hms: Vec<u64> = time
        .split(':')
        .map(|x| x.parse::<u64>().map_err(|_| bad()))
        .collect::<Result<_>>()?;
    let [h, m, sec] = hms[..] else {
        return Err(bad());
    };
    // Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(days as u64 * 86_400 + h * 3600 + m * 60 + sec)
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let i = s.find(start)? + start.len();
    let j = s[i..].find(end)? + i;
    Some(&s[i..j])
}

/// Every Packages stanza's file exists and has the size and SHA256 it claims.
fn check_packages(root: &Path, packages: &str) -> Result<()> {
    for stanza in packages.split("\n\n").filter(|s| !s.trim().is_empty()) {
        let field = |k: &str| {
            super::inspect::control_field(stanza, k).ok_or_else(|| anyhow!("stanza without {k}"))
        };
        let path = field("Filename")?;
        let b = std::fs::read(root.join(&path)).map_err(|e| anyhow!("{path}: {e}"))?;
        if sha256_hex(&b) != field("SHA256")? || b.len().to_string() != field("Size")? {
            return Err(anyhow!("{path} does not match its Packages entry"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_file_is_one_package_per_line_and_reads_back() {
        let e = |n: &str| PoolEntry {
            name: n.into(),
            version: "1.0-1".into(),
            arch: "amd64".into(),
            format: Format::Deb,
            path: format!("pool/main/{n}.deb"),
            size: 3,
            sha256: "ab".repeat(32),
            rollback_of: None,
        };
        for packages in [vec![], vec![e("a")], vec![e("a"), e("b"), e("c")]] {
            let index = Index {
                track: "stable".into(),
                serial: 9,
                generated: 1,
                expires: Some(2),
                packages,
                rollouts: vec![],
                rollout_key: Some("KEY".into()),
            };
            let json = index_json(&index).unwrap();
            assert_eq!(serde_json::from_slice::<Index>(&json).unwrap(), index);
            assert_eq!(index_serial(&json), Some(9));
            let text = String::from_utf8(json).unwrap();
            assert!(text.ends_with("}\n"), "{text}");
            for p in &index.packages {
                let line = format!("\"path\":\"{}\"", p.path);
                assert_eq!(
                    text.lines().filter(|l| l.contains(&line)).count(),
                    1,
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn the_serial_is_read_from_the_head_of_an_index() {
        let index = Index {
            track: "stable".into(),
            serial: 42,
            generated: 1,
            expires: Some(2),
            packages: vec![],
            rollouts: vec![],
            rollout_key: None,
        };
        let json = serde_json::to_vec_pretty(&index).unwrap();
        assert_eq!(index_serial(&json), Some(42));
        assert_eq!(index_serial(b"{\n  \"track\": \"x\"\n"), None);
        assert_eq!(index_serial(b"{\"packages\": [{\"serial\": 3}]}"), None);
    }

    #[test]
    fn release_dates_are_rfc2822_utc() {
        for t in [0, 1_700_000_000, 951_782_400, 4_102_444_799] {
            assert_eq!(parse_rfc2822(&rfc2822(t)).unwrap(), t);
        }
        assert_eq!(rfc2822(0), "Thu, 01 Jan 1970 00:00:00 UTC");
        assert_eq!(rfc2822(1_700_000_000), "Tue, 14 Nov 2023 22:13:20 UTC");
        assert_eq!(rfc2822(951_782_400), "Tue, 29 Feb 2000 00:00:00 UTC");
    }

    #[test]
    fn prune_keeps_current_the_last_generations_and_young_files() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = std::time::SystemTime::now() - std::time::Duration::from_secs(1000);
        // Generations 0..7 of two files each, 10s apart, oldest first; 7 is current.
        for g in 0..8u64 {
            for kind in ["a", "b"] {
                let p = dir.path().join(format!("{g}{kind}"));
                std::fs::write(&p, b"x").unwrap();
                let f = std::fs::File::options().write(true).open(&p).unwrap();
                f.set_modified(t0 + std::time::Duration::from_secs(10 * g))
                    .unwrap();
            }
        }
        // The current generation may reuse an old file (same contents, same hash).
        let current = vec!["7a".to_string(), "0b".to_string()];
        std::fs::write(dir.path().join("repomd.xml"), b"x").unwrap();
        std::fs::write(dir.path().join(".tmp-123"), b"x").unwrap();
        // Generation 4 is 960s old, inside the grace; generation 3 (970s) is past it.
        let grace = std::time::Duration::from_secs(965);
        prune_generations(dir.path(), &current, 2, grace, |n| n == "repomd.xml").unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        // current (7a, 0b), the newest 3 x 2 others (7b, 6a, 6b, 5a, 5b, 4a), and 4b (young).
        assert_eq!(
            left,
            [
                ".tmp-123",
                "0b",
                "4a",
                "4b",
                "5a",
                "5b",
                "6a",
                "6b",
                "7a",
                "7b",
                "repomd.xml"
            ]
        );
    }

    #[test]
    fn stanza_adds_location_and_digests() {
        let e = PoolEntry {
            name: "foo".into(),
            version: "1.0-1".into(),
            arch: "amd64".into(),
            format: Format::Deb,
            path: "pool/main/f/foo/foo_1.0-1_amd64.deb".into(),
            size: 3,
            sha256: sha256_hex(b"abc"),
            rollback_of: None,
        };
        let s = deb_stanza(&e, "Package: foo\nVersion: 1.0-1\n", b"abc");
        assert!(s.starts_with("Package: foo\nVersion: 1.0-1\nFilename: pool/main/f/foo/"));
        assert!(s.contains("\nSize: 3\nMD5sum: 900150983cd24fb0d6963f7d28e17f72\n"));
        assert!(s.contains(
            "\nSHA256: ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
        ));
    }
}
