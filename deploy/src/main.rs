//! `keepup`: the operator's command. Packs services into .deb/.rpm packages, manages the
//! repository (tracks, promotion, rollback, signed views), the fleet policy, and serves the
//! repository over HTTP.

mod cli;
mod fleet;
mod repo;
mod serve;
mod sign;

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
    /// Build .deb and .rpm service packages from YAML specs.
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
    /// Make hosts follow a track (and run some services).
    Assign(cli::AssignArgs),
    /// Remove a service from hosts (agents uninstall it there).
    Quarantine(cli::QuarantineArgs),
    /// Lift a quarantine.
    Unquarantine(cli::QuarantineArgs),
    /// Show the fleet policy.
    #[command(subcommand)]
    Fleet(cli::FleetCommand),
    /// Serve the repository over HTTP.
    Serve(cli::ServeArgs),
}

#[derive(clap::Args)]
struct PackArgs {
    /// Service spec files (YAML); see docs/spec.md.
    #[arg(required = true)]
    specs: Vec<PathBuf>,
    /// Output directory.
    #[arg(long, default_value = "dist")]
    out: PathBuf,
    /// Formats to build.
    #[arg(long, value_enum, default_value_t = FormatArg::All)]
    format: FormatArg,
    /// Payload compression: zstd, xz, gzip or none, optionally with a level (zstd:19).
    /// Default: xz for .deb, zstd for .rpm.
    #[arg(long)]
    compression: Option<String>,
    /// Armored OpenPGP secret key to sign the .rpm packages with.
    #[arg(long)]
    sign_key: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Deb,
    Rpm,
    All,
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
        Command::Assign(a) => cli::assign(a),
        Command::Quarantine(a) => cli::quarantine(a),
        Command::Unquarantine(a) => cli::unquarantine(a),
        Command::Fleet(c) => cli::fleet(c),
        Command::Serve(a) => cli::serve(a),
    }
}

fn pack_cmd(args: PackArgs) -> anyhow::Result<()> {
    let compression = args
        .compression
        .as_deref()
        .map(Compression::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let formats = match args.format {
        FormatArg::Deb => vec![Format::Deb],
        FormatArg::Rpm => vec![Format::Rpm],
        FormatArg::All => vec![Format::Deb, Format::Rpm],
    };
    if let Some(k) = &args.sign_key {
        anyhow::ensure!(
            k.is_file(),
            "signing key {} does not exist; pass an armored OpenPGP secret key",
            k.display()
        );
    }
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
