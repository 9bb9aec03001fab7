//! The repository and fleet subcommands of `keepup`: argument types, and the thin layer that
//! calls [`crate::repo`] / [`crate::fleet`] and prints tables (or JSON with `--json`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;

use crate::repo::{Repo, DEFAULT_TRACKS};

/// `keepup repo ...`
#[derive(Subcommand)]
pub enum RepoCommand {
    /// Create a repository: layout, tracks and an OpenPGP signing key (or import one).
    Init {
        /// Repository directory (created if missing).
        dir: PathBuf,
        /// Armored OpenPGP secret key to sign with, instead of generating one.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Where to keep the secret key, outside the served tree (default: /etc/keepup/keys
        /// for root, ~/.config/keepup otherwise). It is stored as <FINGERPRINT>.asc, mode 0600.
        #[arg(long)]
        key_dir: Option<PathBuf>,
        /// Track names, lowest first.
        #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_TRACKS.map(String::from))]
        tracks: Vec<String>,
        /// How long signed metadata stays valid (Release's Valid-Until, the indexes' and
        /// fleet.yaml's `expires`); re-sign before that with `keepup repo refresh`.
        #[arg(long, default_value = "7d", value_parser = crate::report::parse_duration)]
        valid_for: u64,
    },
    /// Re-sign every view and fleet.yaml with a new expiry (new serials, no other change):
    /// run it from a timer well within `--valid-for`.
    Refresh {
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Show or change the repository's settings.
    Config {
        #[command(flatten)]
        repo: RepoArg,
        /// How long signed metadata stays valid from now on (takes effect at the next
        /// command that signs; `keepup repo refresh` re-signs everything).
        #[arg(long, value_parser = crate::report::parse_duration)]
        valid_for: Option<u64>,
    },
    /// Show the versions in each track.
    List {
        #[command(flatten)]
        repo: RepoArg,
        /// Only this track.
        #[arg(long)]
        track: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Check every signature and every hash in the repository.
    Verify {
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Rebuild every view and index from the repository state.
    Reindex {
        #[command(flatten)]
        repo: RepoArg,
        /// Render every view chunk again from the pool metadata instead of reusing the
        /// checksummed cache in `.keepup/cache` (a repair; slower on large repositories).
        #[arg(long)]
        fresh: bool,
    },
    /// Move a secret key kept inside the repository tree (`.keepup/signing-key.asc`, where
    /// older versions put it) out of the tree.
    MoveKey {
        #[command(flatten)]
        repo: RepoArg,
        /// Where to keep it (default: /etc/keepup/keys for root, ~/.config/keepup otherwise).
        #[arg(long)]
        key_dir: Option<PathBuf>,
    },
    /// Change the signing key without touching hosts: the old key signs beside the new one
    /// for the overlap and vouches for it in keys/rotation.asc, from which agents learn it.
    RotateKey {
        #[command(flatten)]
        repo: RepoArg,
        /// Armored OpenPGP secret key to rotate to, instead of generating one.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Where to keep the new secret key (default: beside the current one).
        #[arg(long)]
        key_dir: Option<PathBuf>,
        /// How long the old key keeps signing, and agents keep trusting it.
        #[arg(long, default_value = "14d", value_parser = crate::report::parse_duration)]
        overlap: u64,
    },
    /// Publish the repository's keyring package, `<NAME>-archive-keyring` (deb and rpm, the
    /// public keys for apt's Signed-By and dnf's gpgkey), into every track; each key rotation
    /// then publishes a new version of it.
    Keyring {
        #[command(flatten)]
        repo: RepoArg,
        /// The repository's name: lower-case letters, digits and `-`.
        #[arg(long)]
        name: String,
    },
    /// Publish the repository to S3-compatible object storage (AWS S3, MinIO, Ceph RGW, GCS
    /// interop): content first, then indexes, then the signed roots, so readers of the bucket
    /// never see it torn; unchanged objects are skipped; deletions wait for `--grace`.
    /// Credentials: the AWS environment (AWS_ACCESS_KEY_ID, ...) or ~/.aws/credentials.
    Sync(SyncArgs),
    /// The steps `KEEPUP_CRASH_AT` can crash a command at (for crash tests).
    #[command(hide = true)]
    CrashSteps,
}

/// `keepup repo sync`
#[derive(clap::Args)]
pub struct SyncArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Where to: s3://BUCKET/PREFIX.
    #[arg(long, value_parser = crate::repo::sync::Target::parse)]
    to: crate::repo::sync::Target,
    /// The S3 endpoint of a store other than AWS (MinIO, Ceph RGW, GCS interop), e.g.
    /// http://minio.internal:9000 (default: AWS_ENDPOINT_URL, else AWS).
    #[arg(long)]
    endpoint: Option<String>,
    /// The bucket's region (default: AWS_REGION, AWS_DEFAULT_REGION, the profile's, else
    /// us-east-1).
    #[arg(long)]
    region: Option<String>,
    /// How long an object the repository no longer has stays in the bucket (readers may hold
    /// an index that still names it).
    #[arg(long, default_value = "1h", value_parser = crate::report::parse_duration)]
    grace: u64,
    /// Uploads in flight at once.
    #[arg(long, default_value_t = 8)]
    jobs: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// `--repo DIR`.
#[derive(clap::Args)]
pub struct RepoArg {
    /// Repository directory.
    #[arg(long = "repo")]
    pub dir: PathBuf,
}

/// `keepup publish`
#[derive(clap::Args)]
pub struct PublishArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Track to publish into (default: the lowest, `unstable`).
    #[arg(long)]
    track: Option<String>,
    /// .deb and .rpm files (rpms must be signed with the repository key).
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

/// `keepup promote`
#[derive(clap::Args)]
pub struct PromoteArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Package name.
    name: String,
    /// Version (default: the current one in the track below).
    version: Option<String>,
    /// Track to promote into; the package comes from the track below it.
    #[arg(long)]
    to: String,
    /// Roll out in waves (over the track's defaults, `keepup rollout defaults`).
    #[command(flatten)]
    rules: crate::rollout_cli::RuleArgs,
    /// Reach every host at once, whatever the track's rollout defaults say.
    #[arg(long, conflicts_with_all = ["waves", "soak", "max_failed", "on_failure"])]
    at_once: bool,
}

/// `keepup rollback`
#[derive(clap::Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Package name.
    name: String,
    /// The old version whose contents to bring back.
    #[arg(long)]
    to: String,
    /// Track to roll back.
    #[arg(long)]
    track: String,
}

/// `keepup assign`
#[derive(clap::Args)]
pub struct AssignArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Host name or glob (`web*`).
    hosts: String,
    /// Track these hosts follow.
    #[arg(long)]
    track: String,
    /// Services these hosts run (default: all in the track).
    #[arg(long, value_delimiter = ',')]
    services: Vec<String>,
}

/// `keepup quarantine` / `unquarantine`
#[derive(clap::Args)]
pub struct QuarantineArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Service (package) name.
    service: String,
    /// Host name or glob (quarantine: default every host; unquarantine: default all entries).
    #[arg(long)]
    hosts: Option<String>,
}

/// `keepup fleet ...`
#[derive(Subcommand)]
pub enum FleetCommand {
    /// Show the fleet policy.
    Show {
        #[command(flatten)]
        repo: RepoArg,
        /// Show only what applies to this host.
        #[arg(long)]
        host: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// `keepup serve`
#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Fleet state database: a SQLite file (created if missing) or a PostgreSQL URL
    /// `postgres://USER@HOST:PORT/DB` (password in PGPASSWORD or ~/.pgpass; several replicas
    /// may share it). Also accept agent reports and serve the fleet view (`/`,
    /// `/api/v1/fleet`). See docs/reports.md and docs/postgres.md.
    #[arg(long, value_name = "FILE|URL", value_parser = crate::state::db::LocationArg)]
    state: Option<crate::state::db::Location>,
    /// File holding a read token: `/`, `/api/v1/fleet` and `/api/v1/events` then answer only
    /// requests that present it (`Authorization: Bearer TOKEN`, or a browser's login with the
    /// token as password). Reports still use host tokens. See docs/reports.md.
    #[arg(long, requires = "state")]
    read_token_file: Option<PathBuf>,
    /// Connections served at once; past it, new ones get `503` with `Retry-After`. Default:
    /// what the open file limit allows (half of it, at most 16384). See docs/operations.md.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Time a client has to send a request's headers, from its connection or the end of the
    /// previous response (also the keep-alive idle limit).
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    header_read_timeout: std::time::Duration,
    /// A connection on which no byte moves either way for this long is closed.
    #[arg(long, default_value = "60s", value_parser = parse_timeout)]
    idle_timeout: std::time::Duration,
    /// A report must be received and stored within this (bounds a slowly sent body).
    #[arg(long, default_value = "30s", value_parser = parse_timeout)]
    request_timeout: std::time::Duration,
    /// Serve HTTPS: PEM certificate chain (server certificate first). Needs --tls-key;
    /// both files are read again on SIGHUP. See docs/tls.md.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, RSA or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Do not re-sign the signed metadata before it expires. By default, when this process
    /// can read the secret key, it runs `keepup repo refresh` once less than half of
    /// `--valid-for` is left.
    #[arg(long)]
    no_refresh: bool,
}

/// A timeout of `keepup serve`: a duration of at least one second.
fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    match crate::report::parse_duration(s)? {
        0 => Err(format!("{s:?}: a timeout must be at least 1s")),
        n => Ok(std::time::Duration::from_secs(n)),
    }
}

/// `--state FILE|URL` of `keepup host`.
#[derive(clap::Args)]
pub struct StateArg {
    /// Fleet state database (the one `keepup serve --state` uses): a SQLite file or a
    /// `postgres://USER@HOST:PORT/DB` URL.
    #[arg(long = "state", value_name = "FILE|URL", value_parser = crate::state::db::LocationArg)]
    pub at: crate::state::db::Location,
}

/// `keepup host ...`: who may report to `keepup serve --state`.
#[derive(Subcommand)]
pub enum HostCommand {
    /// Register a host (or replace its token); prints the new token on stdout.
    Add {
        /// Host name, as its agent reports it.
        #[arg(required_unless_present = "bulk")]
        name: Option<String>,
        /// Read host names from stdin, one per line; print `NAME TOKEN` lines.
        #[arg(long, conflicts_with = "name")]
        bulk: bool,
        #[command(flatten)]
        state: StateArg,
    },
    /// List registered hosts and when each last reported.
    List {
        #[command(flatten)]
        state: StateArg,
    },
    /// Forget a host: its token stops working, its report and events are deleted.
    Remove {
        /// Host name.
        name: String,
        #[command(flatten)]
        state: StateArg,
    },
}

/// `keepup report`
#[derive(clap::Args)]
pub struct ReportArgs {
    /// The `keepup serve --state` server: `http://` or `https://HOST[:PORT]`.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    server: String,
    /// For an `https://` server: trust only the CA certificates in this PEM file (default:
    /// the system's CA bundle).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Print the fleet view as JSON.
    #[arg(long)]
    json: bool,
    /// Only services older than their track's version, or missing.
    #[arg(long)]
    behind: bool,
    /// Only services not running, with failing probes, failed to start, or whose host's
    /// last update failed.
    #[arg(long)]
    unhealthy: bool,
    /// Only hosts not heard from within --stale-after.
    #[arg(long)]
    stale: bool,
    /// Only quarantined services.
    #[arg(long)]
    quarantined: bool,
    /// Silence after which a host is stale (3 x the agents' report interval).
    #[arg(long, default_value = "10m", value_parser = crate::report::parse_duration)]
    stale_after: u64,
    /// File holding the server's read token (`keepup serve --read-token-file`).
    #[arg(long)]
    read_token_file: Option<PathBuf>,
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `keepup repo ...`
pub fn repo(cmd: RepoCommand) -> Result<()> {
    match cmd {
        RepoCommand::Init {
            dir,
            key,
            key_dir,
            tracks,
            valid_for,
        } => {
            if tracks.is_empty()
                || tracks.iter().any(|t| {
                    t.is_empty()
                        || !t
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                })
            {
                bail!("track names are letters, digits, - and _ (got {tracks:?})");
            }
            if valid_for == 0 {
                bail!("--valid-for must be longer than 0s");
            }
            let repo = Repo::init(&dir, key.as_deref(), key_dir.as_deref(), &tracks, valid_for)?;
            let key = repo.public_key_path();
            let fpr = crate::sign::fingerprint(&crate::sign::load_secret(&repo.secret_key_path())?);
            println!("repository: {}", dir.display());
            println!("tracks:     {}", tracks.join(" -> "));
            println!("key:        {fpr}");
            println!("public key for agents and apt: {}", key.display());
            println!(
                "  (binary form: {})",
                dir.join("keys/repository.gpg").display()
            );
            println!(
                "secret key (kept outside the repository, mode 0600; back it up offline; sign rpms with `keepup pack --sign-key`): {}",
                repo.secret_key_path().display()
            );
            println!();
            println!("On hosts: copy the public key to /etc/apt/keyrings/keepup.asc and add");
            println!(
                "  deb [signed-by=/etc/apt/keyrings/keepup.asc] http://REPO-HOST:8080/ {} main",
                tracks.last().unwrap()
            );
            println!("Serve it with: keepup serve --repo {}", dir.display());
            Ok(())
        }
        RepoCommand::List { repo, track, json } => {
            let r = Repo::read_only(&repo.dir)?;
            if r.state.tracks.is_empty() {
                bail!(
                    "{} is not a keepup repository; create one with `keepup repo init`",
                    repo.dir.display()
                );
            }
            let tracks: Vec<String> = match track {
                Some(t) if !r.state.tracks.contains(&t) => {
                    bail!("no track {t:?}; tracks are {}", r.state.tracks.join(", "))
                }
                Some(t) => vec![t],
                None => r.state.tracks.clone(),
            };
            let mut rows = vec![];
            let mut out = vec![];
            for t in &tracks {
                let ts = r.track(t)?;
                let current = ts.current();
                let mut entries: Vec<_> = ts.entries().collect();
                entries.sort_by(|a, b| {
                    (&a.name, a.format, &a.arch)
                        .cmp(&(&b.name, b.format, &b.arch))
                        .then(a.version_cmp(&b.version))
                });
                for e in entries {
                    let is_current = current
                        .get(&(e.name.clone(), e.format, e.arch.clone()))
                        .is_some_and(|c| c.path == e.path);
                    rows.push(vec![
                        t.clone(),
                        e.name.clone(),
                        e.version.clone(),
                        e.arch.clone(),
                        e.format.to_string(),
                        if is_current {
                            "current".into()
                        } else {
                            String::new()
                        },
                        e.rollback_of
                            .as_ref()
                            .map(|v| format!("rollback of {v}"))
                            .unwrap_or_default(),
                    ]);
                    out.push(serde_json::json!({
                        "track": t, "serial": ts.serial, "current": is_current, "package": e,
                    }));
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else if rows.is_empty() {
                println!(
                    "no packages; add some with `keepup publish --repo {} FILE...`",
                    repo.dir.display()
                );
            } else {
                let mut all = vec![["TRACK", "NAME", "VERSION", "ARCH", "FORMAT", "", "NOTE"]
                    .map(String::from)
                    .to_vec()];
                all.extend(rows);
                print!("{}", table(&all));
            }
            Ok(())
        }
        RepoCommand::Verify { repo } => {
            let r = Repo::read_only(&repo.dir)?;
            let problems = r.verify()?;
            if problems.is_empty() {
                println!(
                    "ok: {} pool files, {} tracks; every signature and hash checks out",
                    r.pool()?.len(),
                    r.state.tracks.len()
                );
                Ok(())
            } else {
                for p in &problems {
                    eprintln!("problem: {p}");
                }
                bail!("{} problem(s); `keepup repo reindex --repo {}` rewrites the views from the state (pool files that changed must be restored from a backup)", problems.len(), repo.dir.display())
            }
        }
        RepoCommand::Refresh { repo } => {
            let mut r = Repo::open(&repo.dir)?;
            r.reindex()?;
            println!(
                "signed again; valid until {}",
                keepup_deploy::wire::verify::utc(r.expires())
            );
            Ok(())
        }
        RepoCommand::Config { repo, valid_for } => {
            let mut r = Repo::open(&repo.dir)?;
            if let Some(v) = valid_for {
                r.set_valid_for(v)?;
            }
            println!("valid-for:  {}s", r.valid_for());
            println!("secret key: {}", r.secret_key_path().display());
            Ok(())
        }
        RepoCommand::MoveKey { repo, key_dir } => {
            let mut r = Repo::open(&repo.dir)?;
            let dir = match key_dir {
                Some(d) => d,
                None => crate::repo::default_key_dir()?,
            };
            let path = r.move_key(&dir)?;
            println!("secret key: {}", path.display());
            Ok(())
        }
        RepoCommand::RotateKey {
            repo,
            key,
            key_dir,
            overlap,
        } => {
            let mut r = Repo::open(&repo.dir)?;
            let rot = r.rotate_key(key.as_deref(), key_dir.as_deref(), overlap)?;
            println!(
                "new key:    {} ({})",
                rot.new,
                r.secret_key_path().display()
            );
            println!(
                "old key:    {} signs too, and agents trust it, until {}",
                rot.old,
                keepup_deploy::wire::verify::utc(rot.old_until)
            );
            println!(
                "statement:  {}/{} (agents learn the new key from it)",
                repo.dir.display(),
                keepup_deploy::wire::rotation::ROTATION
            );
            Ok(())
        }
        RepoCommand::Keyring { repo, name } => {
            let mut r = Repo::open(&repo.dir)?;
            let entries = r.publish_keyring(&name)?;
            for t in r.state.tracks.clone() {
                print_entries("published", &t, &entries);
            }
            Ok(())
        }
        RepoCommand::Sync(a) => sync(a),
        RepoCommand::CrashSteps => {
            for s in crate::repo::crash::STEPS {
                println!("{}", s.name());
            }
            Ok(())
        }
        RepoCommand::Reindex { repo, fresh } => {
            let mut r = Repo::open(&repo.dir)?;
            if fresh {
                r.drop_view_cache()?;
            }
            r.reindex()?;
            println!("rewrote the views of {} tracks", r.state.tracks.len());
            Ok(())
        }
    }
}

fn sync(a: SyncArgs) -> Result<()> {
    use crate::repo::sync::{self, Stage};
    if a.jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    // The lock: no publish or promote changes the tree while it is read and uploaded.
    let r = Repo::open(&a.repo.dir)?;
    let opts = sync::SyncOptions {
        target: a.to.clone(),
        endpoint: sync::Endpoint {
            url: a.endpoint,
            region: a.region,
        },
        grace: a.grace,
        jobs: a.jobs,
    };
    let s = sync::sync(&r, &opts)?;
    for f in &s.refused {
        eprintln!("keepup: warning: not uploaded: {f} is not part of a keepup repository");
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let mut rows = vec![["STAGE", "UPLOADED"].map(String::from).to_vec()];
    for stage in Stage::ALL {
        rows.push(vec![
            stage.label().to_string(),
            s.uploaded.get(&stage).copied().unwrap_or(0).to_string(),
        ]);
    }
    rows.push(vec!["unchanged (skipped)".into(), s.unchanged.to_string()]);
    rows.push(vec!["deleted".into(), s.deleted.len().to_string()]);
    rows.push(vec![
        "awaiting deletion (--grace)".into(),
        s.pending_deletion.to_string(),
    ]);
    print!("{}", table(&rows));
    println!(
        "synced to s3://{}/{} ({:.1} MiB uploaded)",
        a.to.bucket,
        a.to.prefix,
        s.bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

/// One line per entry, written through one buffer (stdout is line-buffered: a `write` per line
/// would be a tenth of a large publish's system calls).
fn print_entries(verb: &str, track: &str, entries: &[crate::repo::PoolEntry]) {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    let written = entries.iter().try_for_each(|e| {
        writeln!(
            out,
            "{verb} {} {} {} ({}) -> {track}  sha256 {}",
            e.name, e.version, e.arch, e.format, e.sha256
        )
    });
    // A closed stdout (`keepup publish ... | head`) is not a failed publish: the packages are in.
    let _ = written.and_then(|()| out.flush());
}

/// `keepup publish`
pub fn publish(a: PublishArgs) -> Result<()> {
    let mut r = Repo::open(&a.repo.dir)?;
    let track = a.track.unwrap_or_else(|| r.state.tracks[0].clone());
    let entries = r.publish(&a.files, &track)?;
    print_entries("published", &track, &entries);
    Ok(())
}

/// `keepup promote`
pub fn promote(a: PromoteArgs) -> Result<()> {
    let mut r = Repo::open(&a.repo.dir)?;
    let rules = match a.at_once {
        true => None,
        false => a.rules.over(r.rollout_defaults(&a.to)?)?,
    };
    let entries = match &rules {
        Some(rules) => r.promote_in_waves(&a.name, a.version.as_deref(), &a.to, rules.clone())?,
        None => r.promote(&a.name, a.version.as_deref(), &a.to)?,
    };
    print_entries("promoted", &a.to, &entries);
    if let Some(rules) = rules {
        println!(
            "rolling out {}; see `keepup rollout status --repo {}`",
            crate::rollout_cli::describe(&rules),
            a.repo.dir.display()
        );
    }
    Ok(())
}

/// `keepup rollback`
pub fn rollback(a: RollbackArgs) -> Result<()> {
    let mut r = Repo::open(&a.repo.dir)?;
    let entries = r.rollback(&a.name, &a.to, &a.track)?;
    for e in &entries {
        println!(
            "rolled back {} in {} to the contents of {} as {} {} ({})",
            e.name, a.track, a.to, e.version, e.arch, e.format
        );
    }
    Ok(())
}

/// `keepup assign`
pub fn assign(a: AssignArgs) -> Result<()> {
    let mut r = Repo::open(&a.repo.dir)?;
    if !r.state.tracks.contains(&a.track) {
        bail!(
            "no track {:?}; tracks are {}",
            a.track,
            r.state.tracks.join(", ")
        );
    }
    r.state
        .fleet
        .assign(&a.hosts, &a.track, a.services)
        .map_err(anyhow::Error::msg)?;
    r.commit_fleet()?;
    println!("hosts {} follow {}", a.hosts, a.track);
    Ok(())
}

/// `keepup quarantine`
pub fn quarantine(a: QuarantineArgs) -> Result<()> {
    let mut r = Repo::open(&a.repo.dir)?;
    let hosts = a.hosts.unwrap_or_else(|| "*".into());
    if r.state
        .fleet
        .quarantine(&a.service, &hosts)
        .map_err(anyhow::Error::msg)?
    {
        r.commit_fleet()?;
        println!(
            "{} quarantined on {hosts}: agents there remove it",
            a.service
        );
    } else {
        println!("{} is already quarantined on {hosts}", a.service);
    }
    Ok(())
}

/// `keepup unquarantine`
pub fn unquarantine(a: QuarantineArgs) -> Result<()> {
    let mut r = Repo::open(&a.repo.dir)?;
    let n = r.state.fleet.unquarantine(&a.service, a.hosts.as_deref());
    if n == 0 {
        bail!(
            "{} is not quarantined{}; see `keepup fleet show`",
            a.service,
            a.hosts.map(|h| format!(" on {h}")).unwrap_or_default()
        );
    }
    r.commit_fleet()?;
    println!("lifted {n} quarantine(s) of {}", a.service);
    Ok(())
}

/// `keepup fleet ...`
pub fn fleet(cmd: FleetCommand) -> Result<()> {
    match cmd {
        FleetCommand::Show { repo, host, json } => {
            let r = Repo::read_only(&repo.dir)?;
            let f = &r.state.fleet;
            if let Some(h) = host {
                let (a, q) = f.for_host(&h);
                let v = serde_json::json!({
                    "host": h,
                    "track": a.map(|a| a.track.clone()),
                    "services": a.map(|a| a.services.clone()).unwrap_or_default(),
                    "quarantined": q,
                });
                if json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    match a {
                        Some(a) => println!("{h} follows {} and runs {}", a.track, if a.services.is_empty() { "every service".into() } else { a.services.join(", ") }),
                        None => println!("{h} matches no assignment; add one with `keepup assign --repo {} GLOB --track TRACK`", repo.dir.display()),
                    }
                    if !q.is_empty() {
                        println!("quarantined there: {}", q.join(", "));
                    }
                }
                return Ok(());
            }
            if json {
                println!("{}", serde_json::to_string_pretty(f)?);
                return Ok(());
            }
            println!("fleet policy (serial {})", f.serial);
            let mut rows = vec![["HOSTS", "TRACK", "SERVICES"].map(String::from).to_vec()];
            for a in &f.assignments {
                rows.push(vec![
                    a.hosts.clone(),
                    a.track.clone(),
                    if a.services.is_empty() {
                        "(all)".into()
                    } else {
                        a.services.join(",")
                    },
                ]);
            }
            print!("{}", table(&rows));
            if !f.quarantine.is_empty() {
                println!();
                let mut rows = vec![["QUARANTINED", "ON HOSTS"].map(String::from).to_vec()];
                for q in &f.quarantine {
                    rows.push(vec![q.service.clone(), q.hosts.clone()]);
                }
                print!("{}", table(&rows));
            }
            Ok(())
        }
    }
}

/// `keepup serve`
pub fn serve(a: ServeArgs) -> Result<()> {
    Repo::read_only(&a.repo.dir)?;
    if !a.no_refresh {
        crate::refresh::start(&a.repo.dir)?;
    }
    crate::serve::serve(crate::serve::ServeOptions {
        root: a.repo.dir,
        listen: a.listen,
        state: a.state,
        read_token_file: a.read_token_file,
        limits: crate::serve::Limits {
            max_connections: a.max_connections,
            header_read: a.header_read_timeout,
            idle: a.idle_timeout,
            request_timeout: a.request_timeout,
        },
        tls: a
            .tls_cert
            .zip(a.tls_key)
            .map(|(cert, key)| crate::tls::TlsFiles { cert, key }),
    })
}

/// `keepup host`
pub fn host(c: HostCommand) -> Result<()> {
    match c {
        HostCommand::Add { name, bulk, state } => {
            crate::state::hosts::add(&state.at, name.as_deref(), bulk)
        }
        HostCommand::List { state } => crate::state::hosts::list(&state.at),
        HostCommand::Remove { name, state } => crate::state::hosts::remove(&state.at, &name),
    }
}

/// `keepup report`
pub fn report(a: ReportArgs) -> Result<()> {
    let read_token = a
        .read_token_file
        .as_deref()
        .map(crate::state::read_token)
        .transpose()?;
    crate::report::run(&crate::report::ReportOptions {
        server: a.server,
        trust: a.ca_file.map_or(
            keepup_deploy::https::Trust::System,
            keepup_deploy::https::Trust::CaFile,
        ),
        json: a.json,
        filter: crate::state::view::Filter {
            behind: a.behind,
            unhealthy: a.unhealthy,
            stale: a.stale,
            quarantined: a.quarantined,
        },
        stale_after: a.stale_after,
        read_token,
    })
}
