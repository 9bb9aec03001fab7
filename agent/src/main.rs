//! keepup-agent: the per-host supervisor. `run` keeps every service whose manifest is installed
//! running (respawn, give up, re-kick, probes, role kills); the other commands talk to a running
//! agent over its control socket. See docs/agent.md.

mod agent;
mod config;
mod control;
mod logfile;
mod policy;
mod reaper;
mod refuse;
mod role;
mod service;
mod systemd;
mod update;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::control::Request;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
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

async fn main_async(cli: Cli) -> Result<ExitCode> {
    let mut cfg = Config::load(cli.config.as_deref())?;
    if let Some(s) = cli.socket {
        cfg.socket = s;
    }
    let (req, json) = match cli.command {
        Cmd::Run => {
            agent::run(cfg).await?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Status { json } => (Request::Status, json),
        Cmd::Down { service } => (Request::Down { service }, false),
        Cmd::Up { service } => (Request::Up { service }, false),
        Cmd::Rekick { service } => (Request::Rekick { service }, false),
        Cmd::Check { service } => (Request::Check { service }, false),
    };
    let is_status = req == Request::Status;
    let resp = control::request(&cfg.socket, &req).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&resp)?);
    } else if is_status {
        print!("{}", control::render_status(&resp.services));
    } else {
        if let Some(m) = &resp.message {
            println!("{m}");
        }
        for c in &resp.checks {
            println!("{}", control::render_probe(c));
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
