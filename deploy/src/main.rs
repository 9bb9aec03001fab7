//! `keepup`: the operator's command. Packs services into .deb/.rpm packages, manages the
//! repository (tracks, promotion, rollback, signed views), the fleet policy, and serves the
//! repository over HTTP.

mod cli;
mod fleet;
mod herd;
mod pack_agent;
mod refresh;
mod repo;
mod report;
mod rollout_cli;
mod serve;
mod sign;
mod state;
mod tls;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use keepup_packager::plan::Format;
use keepup_packager::spec::Spec;
use keepup_packager::{pack, source_date_epoch, Compression, PackOptions};

#[derive(Parser)]
#[command(
    name = "keepup",
    version,
    about = "Keep services deployed and running across a fleet"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build .deb and .rpm packages from service specs, or keepup-agent's own (--agent).
    Pack(PackArgs),
    /// Create, list and verify a repository.
    #[command(subcommand)]
    Repo(cli::RepoCommand),
    /// Add packages to a track (default: the lowest, `unstable`).
    Publish(cli::PublishArgs),
    /// Copy one version (the same bytes) from the track below into a track.
    Promote(cli::PromoteArgs),
    /// Bring back an old version's contents under a version newer than the track's current one.
    Rollback(cli::RollbackArgs),
    /// Health-gated rollouts: per-track defaults, status, pause, resume, abort, advance.
    #[command(subcommand)]
    Rollout(rollout_cli::RolloutCommand),
    /// Make hosts follow a track (and run some services).
    Assign(cli::AssignArgs),
    /// Remove a service from hosts (agents uninstall it there).
    Quarantine(cli::QuarantineArgs),
    /// Lift a quarantine.
    Unquarantine(cli::QuarantineArgs),
    /// Show the fleet policy.
    #[command(subcommand)]
    Fleet(cli::FleetCommand),
    /// Serve the repository over HTTP (with --state: also collect agent reports).
    Serve(cli::ServeArgs),
    /// Register and remove the hosts allowed to report.
    #[command(subcommand)]
    Host(cli::HostCommand),
    /// Show the fleet: hosts x services, behind, unhealthy, stale.
    Report(cli::ReportArgs),
}

#[derive(clap::Args)]
struct PackArgs {
    /// Service spec files (YAML); see docs/spec.md.
    #[arg(required_unless_present = "agent")]
    specs: Vec<PathBuf>,
    /// Build keepup-agent's own package from this binary instead (see docs/agent.md).
    #[arg(long, value_name = "BINARY", conflicts_with = "specs")]
    agent: Option<PathBuf>,
    /// With --agent: package version, `V` or `V-RELEASE` (default: keepup's version, release 1).
    #[arg(long, value_name = "V", requires = "agent")]
    version: Option<String>,
    /// With --agent: the packages' maintainer, `Name <email>`.
    #[arg(long, requires = "agent")]
    maintainer: Option<String>,
    /// With --agent: a PEM file of CA certificates to ship as /etc/keepup/ca.pem (the agent's
    /// `ca_file` for https:// repo and report URLs signed by a private CA).
    #[arg(long, requires = "agent", value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// With --agent: write this repository's current serials (policy and every track) as
    /// `min_serials` into the shipped /etc/keepup/agent.yaml, so a new host refuses older
    /// signed metadata on first contact.
    #[arg(long, requires = "agent", value_name = "REPO")]
    min_serials_from: Option<PathBuf>,
    /// Output directory.
    #[arg(long, default_value = "dist")]
    out: PathBuf,
    /// Formats to build (a comma-separated list: deb,rpm).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    format: Vec<FormatArg>,
    /// Payload compression: zstd, xz, gzip or none, optionally with a level (zstd:19).
    /// Default: xz for .deb, zstd for .rpm.
    #[arg(long)]
    compression: Option<String>,
    /// Armored OpenPGP secret key to sign the .rpm packages with.
    #[arg(long)]
    sign_key: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FormatArg {
    Deb,
    Rpm,
    All,
}

/// The formats named on the command line, each once, .deb first.
fn formats(args: &[FormatArg]) -> Vec<Format> {
    let has = |f: FormatArg| args.iter().any(|a| *a == f || *a == FormatArg::All);
    [(FormatArg::Deb, Format::Deb), (FormatArg::Rpm, Format::Rpm)]
        .into_iter()
        .filter(|(a, _)| has(*a))
        .map(|(_, f)| f)
        .collect()
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keepup: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Pack(args) => pack_cmd(args),
        Command::Repo(c) => cli::repo(c),
        Command::Publish(a) => cli::publish(a),
        Command::Promote(a) => cli::promote(a),
        Command::Rollback(a) => cli::rollback(a),
        Command::Rollout(c) => rollout_cli::rollout(c),
        Command::Assign(a) => cli::assign(a),
        Command::Quarantine(a) => cli::quarantine(a),
        Command::Unquarantine(a) => cli::unquarantine(a),
        Command::Fleet(c) => cli::fleet(c),
        Command::Serve(a) => cli::serve(a),
        Command::Host(c) => cli::host(c),
        Command::Report(a) => cli::report(a),
    }
}

impl PackArgs {
    /// The `--compression` asked for (none: each format's default), after checking that the
    /// `--sign-key` file, if any, exists.
    fn checked_compression(&self) -> anyhow::Result<Option<Compression>> {
        if let Some(k) = &self.sign_key {
            anyhow::ensure!(
                k.is_file(),
                "signing key {} does not exist; pass an armored OpenPGP secret key",
                k.display()
            );
        }
        self.compression
            .as_deref()
            .map(Compression::parse)
            .transpose()
            .map_err(anyhow::Error::msg)
    }
}

fn pack_cmd(args: PackArgs) -> anyhow::Result<()> {
    if args.agent.is_some() {
        return pack_agent::run(&args);
    }
    anyhow::ensure!(
        args.version.is_none() && args.maintainer.is_none(),
        "--version and --maintainer are for --agent; a service's version and maintainer are in its spec"
    );
    let compression = args.checked_compression()?;
    let formats = formats(&args.format);
    // Validate every spec before building anything, so one bad spec builds nothing.
    let mut specs = Vec::new();
    let mut bad = 0;
    for path in &args.specs {
        match Spec::load(path) {
            Ok(s) => specs.push(s),
            Err(errors) => {
                eprintln!("{errors}");
                bad += errors.0.len();
            }
        }
    }
    anyhow::ensure!(bad == 0, "{bad} problem(s) in the spec(s) above; fix them and run `keepup pack` again (field reference: docs/spec.md)");
    for spec in &specs {
        let opts = PackOptions {
            formats: formats.clone(),
            compression,
            epoch: source_date_epoch(spec)?,
            sign_key: args.sign_key.clone(),
        };
        eprintln!("packing {} {} ...", spec.name, spec.full_version());
        let files = pack(spec, &opts, &args.out)
            .with_context(|| format!("packing {}", spec.path.display()))?;
        for f in files {
            println!("{}", f.display());
        }
    }
    Ok(())
}
