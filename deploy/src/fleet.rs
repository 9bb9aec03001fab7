//! Fleet policy: which hosts follow which track and run which services, and which services are
//! quarantined where. Kept in the repository state (`.keepup/fleet.json`) and published as
//! `fleet.yaml.asc`: inline-signed (one file, so an agent never reads a policy and a signature
//! from two different publishes), with the `tracks:` binding that names the serial and sha256
//! of the index each track publishes now. `fleet.yaml` with its detached `fleet.yaml.sig` is
//! the same policy without the binding, kept for agents older than the binding and for the
//! state server.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};

use crate::repo::{sha256_hex, write_atomic, Repo};
use crate::sign::{self, Signer};
pub use keepup_deploy::wire::fleet::Fleet;
pub use keepup_deploy::wire::fleet::SIGNED_POLICY;
use keepup_deploy::wire::fleet::{index_by_hash, Binding};
use keepup_deploy::wire::verify::check_expiry;
use keepup_deploy::wire::Index;

/// The binding of each of `tracks` to the index it publishes now (`tracks/<t>/index.json`),
/// making sure that index is also served by its hash. A track with no index yet is left out.
fn bindings(root: &Path, tracks: &[String]) -> Result<BTreeMap<String, Binding>> {
    let mut out = BTreeMap::new();
    for t in tracks {
        let path = root.join("tracks").join(t).join("index.json");
        let stat = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        // The index of a large track is megabytes, and every change of one track binds
        // every track's index again: an index unchanged since it was last bound (the same
        // file, by inode, size and times) is not read and hashed again.
        let memo = root.join(".keepup/cache/bindings").join(t);
        let key = stat_key(&stat);
        if let Some(b) = std::fs::read_to_string(&memo)
            .ok()
            .and_then(|m| read_memo(&m, &key))
        {
            if root.join(index_by_hash(t, &b.sha256)).exists() {
                out.insert(t.clone(), b);
                continue;
            }
        }
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        // Only its serial: the index of a large track is megabytes, and every change of a
        // track binds every track's index again.
        #[derive(serde::Deserialize)]
        struct Serial {
            serial: u64,
        }
        let index = serde_json::from_slice::<Serial>(&bytes)
            .map_err(|e| anyhow!("{}: {e}; run `keepup repo reindex`", path.display()))?;
        let sha256 = sha256_hex(&bytes);
        // Written with the index; a repository from before the binding lacks it.
        let by_hash = root.join(index_by_hash(t, &sha256));
        if !by_hash.exists() {
            write_atomic(&by_hash, &bytes)?;
        }
        // A memo of what was read (private, not fsync'ed: a lost or stale memo is only
        // read again). Taken from the stat before the read: a file replaced meanwhile has
        // another inode, and its memo does not match next time.
        let _ = std::fs::create_dir_all(memo.parent().expect("memo has a directory"))
            .and_then(|_| std::fs::write(&memo, format!("{key} {} {sha256}\n", index.serial)));
        out.insert(
            t.clone(),
            Binding {
                serial: index.serial,
                sha256,
            },
        );
    }
    Ok(out)
}

/// Record that `tracks/<track>/index.json`, as it is now on disk, is the index of `serial`
/// with hash `sha256` (what the command that just wrote it knows), so the binding that
/// follows need not read and hash it. Best effort: without a memo the index is read.
pub fn remember_index(root: &Path, track: &str, serial: u64, sha256: &str) {
    let path = root.join("tracks").join(track).join("index.json");
    let memo = root.join(".keepup/cache/bindings").join(track);
    if let Ok(stat) = std::fs::metadata(&path) {
        let _ =
            std::fs::create_dir_all(memo.parent().expect("memo has a directory")).and_then(|_| {
                std::fs::write(&memo, format!("{} {serial} {sha256}\n", stat_key(&stat)))
            });
    }
}

/// What identifies one version of a file without reading it: device, inode, size, and
/// modification and change times in nanoseconds (a rename into place makes a new inode; an
/// edit in place changes the times).
fn stat_key(m: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{}:{}:{}:{}.{}:{}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    )
}

/// The binding a memo (`<stat key> <serial> <sha256>`) records, if it is of the file whose
/// stat key is `key`.
fn read_memo(memo: &str, key: &str) -> Option<Binding> {
    let mut f = memo.split_whitespace();
    if f.next()? != key {
        return None;
    }
    let serial = f.next()?.parse().ok()?;
    let sha256 = f.next()?;
    (sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()) && f.next().is_none())
        .then(|| Binding {
            serial,
            sha256: sha256.to_string(),
        })
}

/// Write the policy `fleet`, valid until `expires` (Unix time), bound to the indexes `tracks`
/// publish now, in the repository at `root`: `fleet.yaml.sig` and `fleet.yaml` (legacy), then
/// `fleet.yaml.asc`.
pub fn write(
    root: &Path,
    signer: &Signer,
    fleet: &Fleet,
    tracks: &[String],
    expires: u64,
) -> Result<()> {
    let legacy = Fleet {
        expires: Some(expires),
        tracks: BTreeMap::new(),
        ..fleet.clone()
    };
    let y = legacy.to_yaml();
    let sig = signer.detached(y.as_bytes())?;
    write_atomic(&root.join("fleet.yaml.sig"), sig.as_bytes())?;
    write_atomic(&root.join("fleet.yaml"), y.as_bytes())?;
    let bound = Fleet {
        tracks: bindings(root, tracks)?,
        ..legacy
    };
    let signed = signer.cleartext(&bound.to_yaml())?;
    write_atomic(&root.join(SIGNED_POLICY), signed.as_bytes())?;
    Ok(())
}

/// The highest policy serial published at `root` (0: none), read without checking signatures:
/// for choosing the next serial, never for trust.
pub fn published_serial(root: &Path) -> u64 {
    let legacy = std::fs::read_to_string(root.join("fleet.yaml"))
        .ok()
        .and_then(|y| Fleet::from_yaml(&y).ok())
        .map_or(0, |f| f.serial);
    let signed = std::fs::read_to_string(root.join(SIGNED_POLICY))
        .ok()
        .and_then(|a| {
            use pgp::composed::CleartextSignedMessage;
            CleartextSignedMessage::from_string(&a).ok()
        })
        .and_then(|(m, _)| Fleet::from_yaml(&m.signed_text()).ok())
        .map_or(0, |f| f.serial);
    legacy.max(signed)
}

/// The policy as published in `fleet.yaml.asc`, its signature checked against `key`.
pub fn read_signed(root: &Path, key: &pgp::composed::SignedPublicKey) -> Result<Fleet> {
    let path = root.join(SIGNED_POLICY);
    let armored = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (a repository from before the binding: run `keepup repo refresh --repo {}`)",
            path.display(),
            root.display()
        )
    })?;
    let text = sign::verify_cleartext(key, &armored)?;
    Fleet::from_yaml(&text).map_err(anyhow::Error::msg)
}

/// Check `fleet.yaml` and `fleet.yaml.asc` against their signatures, each other, the state
/// and the indexes they bind.
pub fn verify(repo: &Repo, key: &pgp::composed::SignedPublicKey) -> Result<()> {
    let root = &repo.root;
    let refresh = |e: String| {
        anyhow!(
            "{e}; re-sign with `keepup repo refresh --repo {}`",
            root.display()
        )
    };
    let y = std::fs::read(root.join("fleet.yaml"))?;
    let sig = std::fs::read_to_string(root.join("fleet.yaml.sig"))?;
    sign::verify_detached(key, &y, &sig)?;
    let legacy = Fleet::from_yaml(std::str::from_utf8(&y)?).map_err(anyhow::Error::msg)?;
    check_expiry(legacy.expires, crate::repo::now()).map_err(refresh)?;
    let state = &repo.state.fleet;
    // A command killed after publishing and before saving the state leaves a higher
    // published serial; the policy itself must be the state's.
    let same_policy =
        |f: &Fleet| f.assignments == state.assignments && f.quarantine == state.quarantine;
    if !same_policy(&legacy) || legacy.serial < state.serial {
        bail!("fleet.yaml does not match the repository state");
    }
    let signed = read_signed(root, key).context(SIGNED_POLICY)?;
    check_expiry(signed.expires, crate::repo::now())
        .map_err(refresh)
        .context(SIGNED_POLICY)?;
    if !same_policy(&signed) || signed.serial != legacy.serial {
        bail!("{SIGNED_POLICY} and fleet.yaml differ (serial {} and {}); run `keepup repo refresh --repo {}`", signed.serial, legacy.serial, root.display());
    }
    for (t, b) in &signed.tracks {
        let path = b.path(t);
        let bytes = std::fs::read(root.join(&path))
            .with_context(|| format!("{SIGNED_POLICY} binds {path}, which is missing"))?;
        if sha256_hex(&bytes) != b.sha256 {
            bail!("{path} does not match its hash in {SIGNED_POLICY}");
        }
        let index = Index::from_json(&bytes).map_err(anyhow::Error::msg)?;
        if index.track != *t || index.serial != b.serial {
            bail!(
                "{path} is the index of track {} serial {}, {SIGNED_POLICY} binds track {t} serial {}",
                index.track,
                index.serial,
                b.serial
            );
        }
    }
    // A command killed between publishing a track's index and re-signing the policy leaves
    // the binding one snapshot behind: consistent, and caught up by the next command.
    for t in &repo.state.tracks {
        if root.join("tracks").join(t).join("index.json").exists() && !signed.tracks.contains_key(t)
        {
            bail!(
                "{SIGNED_POLICY} binds no index for track {t}; run `keepup repo refresh --repo {}`",
                root.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_is_read_again_when_its_index_changed_and_only_then() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let tracks = vec!["stable".to_string()];
        let index = root.join("tracks/stable/index.json");
        let publish = |serial: u64| {
            let json = format!("{{\n  \"track\": \"stable\",\n  \"serial\": {serial}\n}}\n");
            std::fs::create_dir_all(index.parent().unwrap()).unwrap();
            // As views write it: a new file renamed into place.
            let tmp = root.join("tracks/stable/.tmp");
            std::fs::write(&tmp, &json).unwrap();
            std::fs::rename(&tmp, &index).unwrap();
            sha256_hex(json.as_bytes())
        };
        let first = publish(1);
        let b = bindings(root, &tracks).unwrap();
        assert_eq!((b["stable"].serial, &b["stable"].sha256), (1, &first));
        assert!(root.join(index_by_hash("stable", &first)).exists());
        // Unchanged: the memo answers (a memo that lies is believed: it is private state).
        let memo = root.join(".keepup/cache/bindings/stable");
        let text = std::fs::read_to_string(&memo).unwrap();
        assert!(text.ends_with(&format!(" 1 {first}\n")), "{text}");
        // A new index (another inode): read and hashed again.
        let second = publish(2);
        let b = bindings(root, &tracks).unwrap();
        assert_eq!((b["stable"].serial, &b["stable"].sha256), (2, &second));
        // What the writer remembers is used as it is.
        let third = publish(3);
        remember_index(root, "stable", 3, &third);
        std::fs::write(root.join(index_by_hash("stable", &third)), "x").unwrap();
        assert_eq!(bindings(root, &tracks).unwrap()["stable"].sha256, third);
        // An edit in place (same inode) changes the size and times: read again.
        std::fs::write(&index, "{\"serial\": 4}").unwrap();
        let b = bindings(root, &tracks).unwrap();
        assert_eq!(b["stable"].serial, 4);
        assert_eq!(b["stable"].sha256, sha256_hex(b"{\"serial\": 4}"));
        // Memos of another shape are ignored.
        assert!(read_memo("k 1 abc", "k").is_none());
        assert!(read_memo(&format!("k 1 {first} extra"), "k").is_none());
        assert!(read_memo(&format!("j 1 {first}"), "k").is_none());
        assert_eq!(read_memo(&format!("k 7 {first}"), "k").unwrap().serial, 7);
    }
}
