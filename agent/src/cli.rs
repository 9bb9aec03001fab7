//! The `keepup-agent` command line. `run` keeps every service whose manifest is installed
//! running (respawn, give up, re-kick, probes, role kills), and has what the repository says
//! this host should run installed, and reports sent to the server, each by a short-lived
//! `keepup-agent-pass` child; the other commands talk to a running agent over its control
//! socket (`update --now` runs `keepup-agent-pass` itself when no agent runs). See
//! docs/agent.md.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::control::Request;
use crate::proto::PassResult;
use crate::{agent, control, proto};

/// keepup's per-host agent: keeps services running without pidfiles.
#[derive(Debug, Parser)]
#[command(name = "keepup-agent", version, about)]
struct Cli {
    /// Agent configuration file (default: /etc/keepup/agent.yaml if it exists).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Control socket to talk to (default: from the configuration).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the agent in the foreground (it never daemonizes).
    Run,
    /// Show every service: state, uptime, restarts, last exit, probe results.
    Status {
        /// Print the agent's JSON answer instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Admin-down a service: stop it and keep it stopped, across agent restarts, until `up`.
    Down {
        /// Service name.
        service: String,
    },
    /// Clear a service's admin-down mark and start it.
    Up {
        /// Service name.
        service: String,
    },
    /// Start given-up services again now (one, or all).
    Rekick {
        /// Service name (default: every service).
        service: Option<String>,
    },
    /// Run a service's probes now and print the results.
    Check {
        /// Service name.
        service: String,
    },
    /// Run an update pass now (through the running agent, or with keepup-agent-pass if none
    /// runs) and print the plan and the result; exits 1 if the pass failed.
    Update {
        /// Run the pass now (required: otherwise passes run on the agent's schedule).
        #[arg(long)]
        now: bool,
        /// Print the pass as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keepup-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keepup-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The agent's runtime: one thread runs everything; a few blocking threads do the `/proc`
/// scans and user lookups (20 services starting at once queue up instead of starting 20
/// threads), and leave soon after, so an idle agent is one thread.
pub(crate) fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    small_malloc();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .thread_keep_alive(std::time::Duration::from_secs(2))
        .build()
}

/// `keepup-agent update --now`: asks the running agent for a pass, or runs
/// `keepup-agent-pass --standalone` if no agent answers on the socket.
async fn update_now(
    cfg: Config,
    config: Option<PathBuf>,
    now: bool,
    json: bool,
) -> Result<ExitCode> {
    if !now {
        anyhow::bail!(
            "`keepup-agent update` needs --now (passes otherwise run on the agent's schedule)"
        );
    }
    // A user who may not reach the agent runs no pass of their own either.
    let result = if control::agent_answers(&cfg.socket).await? {
        let resp = control::request(&cfg.socket, &Request::Update).await?;
        match resp.update {
            Some(r) => *r,
            None => anyhow::bail!(
                "{}",
                resp.error
                    .unwrap_or_else(|| "the agent ran no pass".to_string())
            ),
        }
    } else {
        if cfg.updater.is_none() {
            anyhow::bail!(
                "the updater is off: set `repo` and `trusted_key` in the configuration \
                 (docs/agent.md, \"Updater\")"
            );
        }
        standalone_pass(config, &cfg.socket).await?
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print!("{}", result.render());
    }
    Ok(if result.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A pass by `keepup-agent-pass --standalone` (its log on this stderr), for `update --now`
/// when no agent runs.
async fn standalone_pass(config: Option<PathBuf>, socket: &std::path::Path) -> Result<PassResult> {
    let program = crate::runner::Program::beside_this_binary(config.as_deref(), socket);
    let out = program
        .command(crate::child::Job::Standalone)
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", program.shown()))?;
    crate::runner::parse_answer(&out.stdout, Some(out.status))
        .map_err(|why| anyhow::anyhow!("{} {why}", program.shown()))?
        .pass
        .ok_or_else(|| anyhow::anyhow!("{} ran no pass", program.shown()))
}

/// One malloc arena for all threads: glibc gives each new thread its own (up to 8 per core),
/// and the few blocking threads need no parallel allocation; their arenas would outlive them
/// as resident memory.
fn small_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
    }
}

async fn main_async(cli: Cli) -> Result<ExitCode> {
    let mut cfg = Config::load(cli.config.as_deref())?;
    if let Some(s) = cli.socket {
        cfg.socket = s;
    }
    let (req, json) = match cli.command {
        Cmd::Run => {
            agent::run(cfg, cli.config).await?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Status { json } => (Request::Status, json),
        Cmd::Down { service } => (Request::Down { service }, false),
        Cmd::Up { service } => (Request::Up { service }, false),
        Cmd::Rekick { service } => (Request::Rekick { service }, false),
        Cmd::Check { service } => (Request::Check { service }, false),
        Cmd::Update { now, json } => return update_now(cfg, cli.config, now, json).await,
    };
    let is_status = req == Request::Status;
    let resp = control::request(&cfg.socket, &req).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&resp)?);
    } else if is_status {
        print!("{}", proto::render_status(&resp.services));
    } else {
        if let Some(m) = &resp.message {
            println!("{m}");
        }
        for c in &resp.checks {
            println!("{}", proto::render_probe(c));
        }
        if let Some(e) = &resp.error {
            eprintln!("keepup-agent: {e}");
        }
    }
    Ok(if resp.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
