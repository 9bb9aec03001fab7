//! Rollouts in waves, on the host: from the track's index (its rollouts, signed by the
//! repository key) and the track's progress document (signed by the rollout key the index
//! names), what this host's plan sees of each package rolling out: the new version, the
//! previous one (held back, and why), or the standby rollback. Pure: the pass fetches, this
//! decides.

use std::collections::BTreeMap;

use keepup_deploy::wire::rollout::{target, Progress, RolloutState, Target};
use keepup_deploy::wire::verify::{check_expiry, TrustedKey};
use keepup_deploy::wire::{Format, Index, PoolEntry, RolloutReport};

use super::plan::Hold;

/// What the plan sees once the rollouts are applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The track's packages, with each held package's new version replaced by its previous
    /// one (or the standby rollback).
    pub packages: Vec<PoolEntry>,
    /// The packages this host is held back from.
    pub holds: BTreeMap<String, Hold>,
    /// For the report: each rollout, this host's wave and whether it is held.
    pub report: Vec<RolloutReport>,
}

/// Check a progress document: signed by the index's rollout key, for `track`, not older than
/// the serial `seen`, not expired. The JSON inside is returned parsed.
pub fn check_progress(
    armored: &str,
    index: &Index,
    track: &str,
    seen: u64,
    now: u64,
) -> Result<RolloutState, String> {
    let what = keepup_deploy::wire::rollout::state_path(track);
    let refused = |e: String| format!("refused {what}: {e}");
    let key = index
        .rollout_key
        .as_deref()
        .ok_or_else(|| refused("the track's index names no rollout key".into()))?;
    let key = TrustedKey::from_armored(key).map_err(|e| refused(format!("rollout key: {e}")))?;
    let json = key.verify_inline(armored).map_err(|e| {
        refused(format!(
            "{e} (only the rollout key named by the track's index may sign it)"
        ))
    })?;
    let doc: RolloutState = serde_json::from_str(&json).map_err(|e| refused(e.to_string()))?;
    if doc.track != track {
        return Err(refused(format!(
            "it is the progress of track {:?}",
            doc.track
        )));
    }
    if doc.serial < seen {
        return Err(refused(format!(
            "serial {} is lower than {seen} already seen (a replayed, older progress)",
            doc.serial
        )));
    }
    check_expiry(Some(doc.expires), now).map_err(refused)?;
    Ok(doc)
}

/// Apply `index`'s rollouts for `host` (of `format`), whose installed versions are
/// `installed`, at `progress` (None: no valid document, so each rollout is where it starts:
/// its first wave open).
pub fn apply(
    index: &Index,
    progress: Option<&RolloutState>,
    host: &str,
    format: Format,
    installed: &BTreeMap<String, String>,
) -> Applied {
    let mut out = Applied {
        packages: index.packages.clone(),
        ..Applied::default()
    };
    for rollout in &index.rollouts {
        let p = progress
            .and_then(|d| d.rollouts.get(&rollout.id))
            .cloned()
            .unwrap_or_else(|| Progress::start(rollout.started));
        let have = installed.get(&rollout.name).map(String::as_str);
        let ge = |a: &str, b: &str| format.cmp_versions(a, b).is_ge();
        let t = target(rollout, &p, host, have, ge);
        let replace = |packages: &mut Vec<PoolEntry>, with: &[PoolEntry]| {
            packages.retain(|e| e.name != rollout.name);
            packages.extend(with.iter().cloned());
        };
        let held = match &t {
            Target::New => None,
            Target::Rollback => {
                replace(&mut out.packages, &rollout.rollback);
                None
            }
            Target::Held(why) => {
                replace(&mut out.packages, &rollout.from);
                out.holds.insert(
                    rollout.name.clone(),
                    Hold {
                        to: rollout.to.clone(),
                        why: why.clone(),
                    },
                );
                Some(why.clone())
            }
        };
        out.report.push(RolloutReport {
            id: rollout.id.clone(),
            name: rollout.name.clone(),
            wave: keepup_deploy::wire::rollout::wave_of(&rollout.rules.waves, &rollout.name, host),
            open: p.open,
            phase: p.phase.to_string(),
            held,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use keepup_deploy::wire::rollout::{parse_waves, MaxFailed, OnFailure, Phase, Rollout, Rules};

    fn entry(version: &str) -> PoolEntry {
        PoolEntry {
            name: "foo".into(),
            version: version.into(),
            arch: "all".into(),
            format: Format::Deb,
            path: format!("pool/foo_{version}_all.deb"),
            size: 1,
            sha256: "00".into(),
            rollback_of: None,
        }
    }

    fn index() -> Index {
        Index {
            track: "stable".into(),
            serial: 3,
            generated: 0,
            expires: None,
            packages: vec![entry("2.0-1")],
            rollouts: vec![Rollout {
                id: "stable/foo/2.0-1".into(),
                name: "foo".into(),
                to: "2.0-1".into(),
                from: vec![entry("1.0-1")],
                rollback: vec![entry("2.0+rb1-1")],
                rules: Rules {
                    waves: parse_waves("canary-1,100%").unwrap(),
                    soak: 10,
                    max_failed: MaxFailed::Count(0),
                    on_failure: OnFailure::Rollback,
                },
                started: 0,
            }],
            rollout_key: None,
        }
    }

    #[test]
    fn progress_must_be_signed_by_the_indexed_rollout_key_fresh_and_new() {
        use super::super::testgpg::{gpg_clearsign, gpg_key};
        let home = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let rollout_key = gpg_key(home.path(), "rollout@example.org").expect("gpg key");
        gpg_key(home.path(), "mallory@example.org").expect("gpg key");
        let mut i = index();
        i.rollout_key = Some(rollout_key);
        let doc = |track: &str, serial: u64, expires: u64| {
            serde_json::to_string(&RolloutState {
                track: track.into(),
                serial,
                expires,
                rollouts: BTreeMap::new(),
            })
            .unwrap()
        };
        let sign = |uid: &str, text: String| {
            String::from_utf8(gpg_clearsign(home.path(), uid, text.as_bytes())).unwrap()
        };
        let good = sign("rollout@example.org", doc("stable", 7, 2000));
        assert_eq!(
            check_progress(&good, &i, "stable", 7, 1000).unwrap().serial,
            7
        );
        // A replay: older than the serial seen.
        let e = check_progress(&good, &i, "stable", 8, 1000).unwrap_err();
        assert!(e.contains("lower than 8 already seen"), "{e}");
        // Expired.
        let e = check_progress(&good, &i, "stable", 0, 3000).unwrap_err();
        assert!(e.contains("expired"), "{e}");
        // Another track's progress.
        let other = sign("rollout@example.org", doc("testing", 9, 2000));
        let e = check_progress(&other, &i, "stable", 0, 1000).unwrap_err();
        assert!(e.contains("track \"testing\""), "{e}");
        // Signed by a key the index does not name.
        let forged = sign("mallory@example.org", doc("stable", 99, 2000));
        let e = check_progress(&forged, &i, "stable", 0, 1000).unwrap_err();
        assert!(e.contains("only the rollout key"), "{e}");
        // An index naming no rollout key accepts none.
        i.rollout_key = None;
        assert!(check_progress(&good, &i, "stable", 0, 1000).is_err());
    }

    fn versions(a: &Applied) -> Vec<&str> {
        a.packages.iter().map(|e| e.version.as_str()).collect()
    }

    #[test]
    fn waves_hold_and_roll_back() {
        let i = index();
        let none = BTreeMap::new();
        let canary = apply(&i, None, "canary-1", Format::Deb, &none);
        assert_eq!(versions(&canary), ["2.0-1"]);
        assert!(canary.holds.is_empty());
        assert_eq!(canary.report[0].wave, Some(1));
        let web = apply(&i, None, "web-1", Format::Deb, &none);
        assert_eq!(versions(&web), ["1.0-1"]);
        assert_eq!(web.holds["foo"].why, "wave 2 not open");
        assert_eq!(web.report[0].held.as_deref(), Some("wave 2 not open"));

        let mut doc = RolloutState {
            track: "stable".into(),
            serial: 1,
            expires: u64::MAX,
            rollouts: BTreeMap::new(),
        };
        let mut p = Progress::start(0);
        p.phase = Phase::RolledBack;
        doc.rollouts.insert("stable/foo/2.0-1".into(), p);
        let took: BTreeMap<String, String> = [("foo".into(), "2.0-1".into())].into();
        let canary = apply(&i, Some(&doc), "canary-1", Format::Deb, &took);
        assert_eq!(versions(&canary), ["2.0+rb1-1"]);
        let web = apply(&i, Some(&doc), "web-1", Format::Deb, &none);
        assert_eq!(versions(&web), ["1.0-1"]);
        assert!(web.holds["foo"].why.contains("rolled back"));
    }
}
