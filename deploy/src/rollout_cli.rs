//! `keepup rollout ...` and the rollout flags of `keepup promote`: argument types, and the
//! thin layer over [`crate::repo::rollouts`] that prints tables (or JSON with `--json`).

use anyhow::{bail, Result};
use clap::Subcommand;
use keepup_deploy::wire::rollout::{
    parse_waves, MaxFailed, OnFailure, Phase, Progress, Rollout, Rules,
};

use crate::cli::RepoArg;
use crate::repo::rollouts::{self, Control};
use crate::repo::Repo;
use crate::state::gate::WAVE_COLUMNS;

/// The rollout flags of `keepup promote` and `keepup rollout defaults`.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct RuleArgs {
    /// Waves: host globs and cumulative shares of hosts, e.g. `canary-*,5%,25%,100%`.
    #[arg(long, value_name = "SPEC")]
    pub waves: Option<String>,
    /// How long every reporting host of the open waves must stay healthy before the next
    /// wave opens (default 30m).
    #[arg(long, value_name = "DUR", value_parser = crate::report::parse_duration)]
    pub soak: Option<u64>,
    /// More failed hosts than this in the open waves halts: a number, or a share like 10%
    /// (default 0).
    #[arg(long, value_name = "N|P%")]
    pub max_failed: Option<String>,
    /// What halting also does: `halt` (hosts keep what they run) or `rollback` (hosts that
    /// took the new version move to its previous contents, under a newer version).
    #[arg(long, value_name = "halt|rollback")]
    pub on_failure: Option<String>,
}

/// What a promotion uses when it is given nothing else.
const DEFAULT_SOAK: u64 = 30 * 60;

impl RuleArgs {
    fn given(&self) -> bool {
        self.waves.is_some()
            || self.soak.is_some()
            || self.max_failed.is_some()
            || self.on_failure.is_some()
    }

    /// These flags over `base` (the track's defaults); None when neither says anything.
    pub fn over(&self, base: Option<Rules>) -> Result<Option<Rules>> {
        if !self.given() {
            return Ok(base);
        }
        let waves = match (&self.waves, &base) {
            (Some(w), _) => parse_waves(w).map_err(anyhow::Error::msg)?,
            (None, Some(b)) => b.waves.clone(),
            (None, None) => bail!(
                "--soak, --max-failed and --on-failure need --waves (this track has no \
                 rollout defaults; see `keepup rollout defaults`)"
            ),
        };
        Ok(Some(Rules {
            waves,
            soak: self
                .soak
                .or(base.as_ref().map(|b| b.soak))
                .unwrap_or(DEFAULT_SOAK),
            max_failed: match &self.max_failed {
                Some(m) => MaxFailed::parse(m).map_err(anyhow::Error::msg)?,
                None => base.as_ref().map_or(MaxFailed::Count(0), |b| b.max_failed),
            },
            on_failure: match &self.on_failure {
                Some(o) => OnFailure::parse(o).map_err(anyhow::Error::msg)?,
                None => base.as_ref().map_or(OnFailure::Halt, |b| b.on_failure),
            },
        }))
    }
}

/// `keepup rollout ...`
#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Set how promotions into a track roll out unless `keepup promote` says otherwise.
    Defaults {
        #[command(flatten)]
        repo: RepoArg,
        /// The track.
        #[arg(long)]
        track: String,
        #[command(flatten)]
        rules: RuleArgs,
        /// Remove the track's defaults: promotions reach every host at once again.
        #[arg(long, conflicts_with_all = ["waves", "soak", "max_failed", "on_failure"])]
        clear: bool,
    },
    /// Show each track's rollouts: from the repository (versions, waves, phase, history), or
    /// from the server's gate (also host counts per wave and the failing hosts).
    Status {
        /// Repository directory.
        #[arg(long, required_unless_present = "server")]
        repo: Option<std::path::PathBuf>,
        /// The `keepup serve --state` server: `http://` or `https://HOST[:PORT]`.
        #[arg(long, conflicts_with = "repo")]
        server: Option<String>,
        /// For an `https://` server: trust only the CA certificates in this PEM file.
        #[arg(long, requires = "server")]
        ca_file: Option<std::path::PathBuf>,
        /// File holding the server's read token (`keepup serve --read-token-file`).
        #[arg(long, requires = "server")]
        read_token_file: Option<std::path::PathBuf>,
        /// Only this track.
        #[arg(long)]
        track: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Keep the next wave closed (open waves stay open).
    Pause(ControlArgs),
    /// Let the gate open waves again.
    Resume(ControlArgs),
    /// Halt: no other host installs the new version (hosts that have it keep it).
    Abort(ControlArgs),
    /// Open the next wave now, whatever the gate says.
    Advance(ControlArgs),
}

/// The arguments of `keepup rollout pause|resume|abort|advance`.
#[derive(clap::Args)]
pub struct ControlArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Package name.
    name: String,
    /// The track it rolls out in.
    #[arg(long)]
    track: String,
}

/// Run `keepup rollout ...`.
pub fn rollout(c: RolloutCommand) -> Result<()> {
    match c {
        RolloutCommand::Defaults {
            repo,
            track,
            rules,
            clear,
        } => {
            let mut r = Repo::open(&repo.dir)?;
            if clear {
                r.set_rollout_defaults(&track, None)?;
                println!("{track}: promotions reach every host at once");
                return Ok(());
            }
            let base = r.rollout_defaults(&track)?;
            let Some(rules) = rules.over(base)? else {
                bail!("give --waves (and --soak, --max-failed, --on-failure), or --clear");
            };
            println!("{track}: promotions roll out {}", describe(&rules));
            r.set_rollout_defaults(&track, Some(rules))
        }
        RolloutCommand::Status {
            repo,
            server,
            ca_file,
            read_token_file,
            track,
            json,
        } => match (repo, server) {
            (Some(dir), _) => status(&RepoArg { dir }, track.as_deref(), json),
            (None, Some(server)) => {
                let read_token = read_token_file
                    .as_deref()
                    .map(crate::state::read_token)
                    .transpose()?;
                let trust = ca_file.map_or(
                    keepup_deploy::https::Trust::System,
                    keepup_deploy::https::Trust::CaFile,
                );
                server_status(
                    &server,
                    &trust,
                    read_token.as_deref(),
                    track.as_deref(),
                    json,
                )
            }
            (None, None) => bail!("give --repo DIR or --server URL"),
        },
        RolloutCommand::Pause(a) => control(a, Control::Pause),
        RolloutCommand::Resume(a) => control(a, Control::Resume),
        RolloutCommand::Abort(a) => control(a, Control::Abort),
        RolloutCommand::Advance(a) => control(a, Control::Advance),
    }
}

/// `waves canary-*,50%,100%, soak 30m, ...`
pub fn describe(r: &Rules) -> String {
    let waves: Vec<String> = r.waves.iter().map(|w| w.to_string()).collect();
    format!(
        "in waves {}, soak {}, halting past {} failed host(s){}",
        waves.join(","),
        crate::report::format_duration(r.soak),
        r.max_failed,
        match r.on_failure {
            OnFailure::Halt => "",
            OnFailure::Rollback => " and rolling back",
        }
    )
}

fn control(a: ControlArgs, what: Control) -> Result<()> {
    let r = Repo::read_only(&a.repo.dir)?;
    let track = r.track(&a.track)?;
    let Some(rollout) = track.rollouts.get(&a.name) else {
        bail!(
            "{} has no rollout of {}; see `keepup rollout status --repo {}`",
            a.track,
            a.name,
            a.repo.dir.display()
        );
    };
    let now = crate::repo::now();
    let waves = rollout.rules.waves.len() as u32;
    let doc = rollouts::update_progress(&r.root, &a.track, r.valid_for(), |doc| {
        let p = doc
            .rollouts
            .entry(rollout.id.clone())
            .or_insert_with(|| Progress::start(rollout.started));
        rollouts::apply(what, p, waves, now)
    })?;
    let p = &doc.rollouts[&rollout.id];
    println!(
        "{}: {} of {} waves open, {} (progress serial {})",
        rollout.id, p.open, waves, p.phase, doc.serial
    );
    Ok(())
}

/// One rollout as `keepup rollout status` shows it.
#[derive(serde::Serialize)]
struct Row<'a> {
    track: &'a str,
    rollout: &'a Rollout,
    progress: Progress,
}

fn status(repo: &RepoArg, only: Option<&str>, json: bool) -> Result<()> {
    let r = Repo::read_only(&repo.dir)?;
    let tracks: Vec<String> = match only {
        Some(t) => vec![t.to_string()],
        None => r.state.tracks.clone(),
    };
    let mut rows = Vec::new();
    let mut tracks_read = Vec::new();
    for t in &tracks {
        let doc = rollouts::read_progress(&r.root, t)?;
        tracks_read.push((t.clone(), r.track(t)?, doc));
    }
    for (t, track, doc) in &tracks_read {
        for rollout in track.rollouts.values() {
            let progress = doc
                .rollouts
                .get(&rollout.id)
                .cloned()
                .unwrap_or_else(|| Progress::start(rollout.started));
            rows.push(Row {
                track: t,
                rollout,
                progress,
            });
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no rollouts");
        return Ok(());
    }
    println!(
        "{:<10} {:<20} {:<24} {:<12} {:<6} WAVES",
        "TRACK", "PACKAGE", "FROM -> TO", "STATE", "OPEN"
    );
    for row in &rows {
        let r = row.rollout;
        let waves: Vec<String> = r.rules.waves.iter().map(|w| w.to_string()).collect();
        let state = match row.progress.phase {
            Phase::Done => "done".to_string(),
            p => p.to_string(),
        };
        println!(
            "{:<10} {:<20} {:<24} {:<12} {:<6} {}{}",
            row.track,
            r.name,
            format!("{} -> {}", r.from_version().unwrap_or("(none)"), r.to),
            state,
            format!("{}/{}", row.progress.open, waves.len()),
            waves.join(","),
            if row.progress.note.is_empty() {
                String::new()
            } else {
                format!("  ({})", row.progress.note)
            }
        );
    }
    Ok(())
}

/// Widths of the number columns of a wave's row (as wide as their headings).
const WIDTHS: [usize; 6] = [6, 7, 8, 7, 8, 14];

/// `keepup rollout status --server URL`: the gate's last look, with host counts per wave.
fn server_status(
    server: &str,
    trust: &keepup_deploy::https::Trust,
    read_token: Option<&str>,
    track: Option<&str>,
    json: bool,
) -> Result<()> {
    let body = crate::report::fetch_path(server, trust, crate::state::ROLLOUTS_PATH, read_token)?;
    let mut list: Vec<crate::state::gate::RolloutStatus> =
        serde_json::from_slice(&body).map_err(|e| {
            anyhow::anyhow!("{server} answered something that is not a rollout list: {e}")
        })?;
    list.retain(|r| track.is_none_or(|t| r.track == t));
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if list.is_empty() {
        println!("no rollouts (or the server's gate has not looked yet)");
        return Ok(());
    }
    let p = |s: &str| crate::report::printable(s.into()).into_owned();
    for r in &list {
        println!(
            "{} {} {} -> {} in {}: {}{}",
            p(&r.id),
            p(&r.name),
            p(r.from.as_deref().unwrap_or("(none)")),
            p(&r.to),
            p(&r.track),
            p(&r.phase),
            r.soak_left
                .map(|s| format!(", soak {s}s left"))
                .unwrap_or_default()
        );
        let row = |cells: [String; 8]| {
            let [wave, open, rest @ ..] = cells;
            let rest: Vec<String> = rest
                .iter()
                .zip(WIDTHS)
                .map(|(c, w)| format!("{c:>w$}"))
                .collect();
            println!("  {wave:<16} {open:<7} {}", rest.join(" "));
        };
        row(WAVE_COLUMNS.map(|c| c.to_uppercase()));
        for w in &r.waves {
            row(w.cells().map(|c| p(&c)));
        }
        if !r.failed.is_empty() {
            println!("  failed: {}", p(&r.failed.join(", ")));
        }
        println!("  {}", p(&r.decision));
    }
    Ok(())
}
