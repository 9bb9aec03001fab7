//! Rollouts in waves on the repository side: `keepup promote --waves`, per-track defaults,
//! the rollout key, and the progress document (`tracks/<t>/rollout.json.asc`) that operators
//! (`keepup rollout pause ...`) and the gate in `keepup serve` sign with it.
//!
//! The rollout key lives in `.keepup/rollout-key.asc` (never served: dot-files are refused):
//! the server that gates rollouts needs it online, so it is not the repository key. The
//! index names its public half; agents accept its signature over progress only.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};

use super::{state, write_new, Repo};
use crate::sign::{self, Signer};
use keepup_deploy::wire::rollout::{Phase, Progress, Rollout, RolloutState, Rules};
use keepup_deploy::wire::verify::TrustedKey;
use keepup_deploy::wire::PoolEntry;

/// The secret rollout key of the repository at `root`.
pub fn key_path(root: &Path) -> PathBuf {
    root.join(".keepup/rollout-key.asc")
}

/// Its public half, armored.
pub fn public_key_path(root: &Path) -> PathBuf {
    root.join(".keepup/rollout-key.pub.asc")
}

/// The rollout key's signer, with a hint when it is missing.
pub fn signer(root: &Path) -> Result<Signer> {
    let path = key_path(root);
    if !path.exists() {
        bail!(
            "{} has no rollout key ({}): it is made by the first `keepup promote --waves` or \
             `keepup rollout defaults`",
            root.display(),
            path.display()
        );
    }
    Signer::load_all(&[path.as_path()])
}

/// Read and check the progress of `track`'s rollouts (empty if none was written yet).
pub fn read_progress(root: &Path, track: &str) -> Result<RolloutState> {
    let path = root.join(keepup_deploy::wire::rollout::state_path(track));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(RolloutState {
                track: track.into(),
                ..Default::default()
            })
        }
        Err(e) => return Err(anyhow!("reading {}: {e}", path.display())),
    };
    let public = std::fs::read_to_string(public_key_path(root))
        .with_context(|| format!("reading {}", public_key_path(root).display()))?;
    let key = TrustedKey::from_armored(&public).map_err(|e| anyhow!(e))?;
    let json = key
        .verify_inline(&text)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let doc: RolloutState =
        serde_json::from_str(&json).with_context(|| format!("{} is damaged", path.display()))?;
    if doc.track != track {
        bail!("{} names track {:?}", path.display(), doc.track);
    }
    Ok(doc)
}

/// Change the progress of `track`'s rollouts with `change` and publish it signed by the
/// rollout key, with the next serial and an expiry `valid_for` seconds away. Serialized by
/// `.keepup/rollout.lock`, not the repository's lock: the gate never waits for a publish.
/// Returns the document written.
pub fn update_progress(
    root: &Path,
    track: &str,
    valid_for: u64,
    change: impl FnOnce(&mut RolloutState) -> Result<()>,
) -> Result<RolloutState> {
    let lock_file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join(".keepup/rollout.lock"))
        .context("opening .keepup/rollout.lock")?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow!("locking .keepup/rollout.lock: {e}"))?;
    let signer = signer(root)?;
    let mut doc = read_progress(root, track)?;
    change(&mut doc)?;
    doc.track = track.into();
    doc.serial += 1;
    doc.expires = super::views::now() + valid_for;
    let signed = signer.cleartext(&serde_json::to_string_pretty(&doc)?)?;
    super::write_atomic(
        &root.join(keepup_deploy::wire::rollout::state_path(track)),
        signed.as_bytes(),
    )?;
    Ok(doc)
}

/// An operator's command on one rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Keep the next wave closed.
    Pause,
    /// Let the gate open waves again.
    Resume,
    /// Halt: nobody else installs the new version.
    Abort,
    /// Open the next wave now, whatever the gate says.
    Advance,
}

/// Apply `control` to `progress` (a rollout with `waves` waves) at `now`; the new phase.
pub fn apply(control: Control, progress: &mut Progress, waves: u32, now: u64) -> Result<()> {
    let p = progress.phase;
    let finished = matches!(p, Phase::Halted | Phase::RolledBack | Phase::Done);
    match control {
        Control::Pause if p == Phase::Rolling => progress.phase = Phase::Paused,
        Control::Resume if p == Phase::Paused => progress.phase = Phase::Rolling,
        Control::Abort if !finished => {
            progress.phase = Phase::Halted;
            progress.note = "aborted by an operator".into();
        }
        Control::Advance if !finished => {
            if progress.open >= waves {
                progress.phase = Phase::Done;
            } else {
                progress.open += 1;
                progress.opened_at.push(now);
            }
        }
        _ => bail!("the rollout is {p}: nothing to {control:?}"),
    }
    let what = match control {
        Control::Advance if progress.phase == Phase::Done => {
            "done: advanced by an operator".to_string()
        }
        Control::Advance => format!("wave {} opened by an operator", progress.open),
        c => format!("{:?} by an operator: {}", c, progress.phase).to_lowercase(),
    };
    progress.log(now, what);
    Ok(())
}

impl Repo {
    /// The armored public rollout key, made (with its secret half) on first use.
    pub fn rollout_public_key(&self) -> Result<String> {
        let public = public_key_path(&self.root);
        if let Ok(k) = std::fs::read_to_string(&public) {
            return Ok(k);
        }
        let secret = sign::generate(&format!("keepup rollout key ({})", self.root.display()))?;
        write_new(
            &key_path(&self.root),
            sign::armor_secret(&secret)?.as_bytes(),
            0o600,
        )?;
        let armored = sign::armor_public(&secret)?;
        write_new(&public, armored.as_bytes(), 0o644)?;
        Ok(armored)
    }

    /// The rollout defaults of `track` (None: a promotion opens at once, to every host).
    pub fn rollout_defaults(&self, track: &str) -> Result<Option<Rules>> {
        self.state.track_index(track)?;
        Ok(self.settings()?.rollout_defaults.get(track).cloned())
    }

    /// Set (or with None, clear) the rollout defaults of `track`.
    pub fn set_rollout_defaults(&mut self, track: &str, rules: Option<Rules>) -> Result<()> {
        self.state.track_index(track)?;
        let mut settings = self.settings()?;
        match rules {
            Some(r) => {
                self.rollout_public_key()?;
                settings.rollout_defaults.insert(track.into(), r);
            }
            None => {
                settings.rollout_defaults.remove(track);
            }
        }
        self.save_settings(&settings)
    }

    /// Promote `name` into `to` in waves under `rules` (see [`Repo::promote`]): the index
    /// keeps the previous version for hosts outside the open waves, and with
    /// `on_failure: rollback` a standby rollback of it, signed now so that the gate never
    /// needs the repository key.
    pub fn promote_in_waves(
        &mut self,
        name: &str,
        version: Option<&str>,
        to: &str,
        rules: Rules,
    ) -> Result<Vec<PoolEntry>> {
        let before = self.track(to)?;
        let previous_rollout = before.rollouts.get(name).cloned();
        let current_before = state::current_of(before.packages.get(name).into_iter().flatten())
            .into_values()
            .cloned()
            .collect::<Vec<_>>();
        let chosen = self.choose_promotion(
            name,
            version,
            to,
            before.packages.get(name).map_or(&[][..], |v| v.as_slice()),
        )?;
        let to_version = chosen[0].version.clone();
        // Hosts outside the open waves keep what they were meant to run before: the previous
        // rollout's starting point while that one was not done, else the current version.
        let from = match &previous_rollout {
            Some(r) if !self.rollout_done(to, &r.id) => r.from.clone(),
            _ => current_before.clone(),
        };
        self.rollout_public_key()?;
        let mut staged = Vec::new();
        if rules.on_failure == keepup_deploy::wire::rollout::OnFailure::Rollback && !from.is_empty()
        {
            let current = state::current_of(chosen.iter());
            staged = self.stage_rollbacks(name, &from, &current, to)?;
        }
        let old = before;
        let undo = self.store(&staged)?;
        let mut new = old.clone();
        let mut added = false;
        for e in &chosen {
            added |= new.insert(e.clone());
        }
        if !added {
            undo.run();
            bail!("{to} already has {name} {to_version}: nothing to promote");
        }
        new.rollouts.insert(
            name.into(),
            Rollout {
                id: Rollout::id_for(to, name, &to_version),
                name: name.into(),
                to: to_version,
                from,
                rollback: staged.iter().map(|s| s.meta.entry.clone()).collect(),
                rules,
                started: super::views::now(),
            },
        );
        let known: Vec<&state::PoolMeta> = staged.iter().map(|s| &s.meta).collect();
        self.commit_track(to, &old, new, &undo, &known)?;
        Ok(chosen)
    }

    /// Has the rollout `id` of `track` finished opening every wave?
    fn rollout_done(&self, track: &str, id: &str) -> bool {
        read_progress(&self.root, track)
            .ok()
            .and_then(|d| d.rollouts.get(id).map(|p| p.phase == Phase::Done))
            .unwrap_or(false)
    }
}
