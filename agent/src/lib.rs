//! keepup-agent: the per-host supervisor and updater, as two programs built from this library.
//!
//! * `keepup-agent` ([`agent_main`]): `run` keeps every service whose manifest is installed
//!   running (respawn, give up, re-kick, probes, role kills), and starts a short-lived
//!   `keepup-agent-pass` for each update pass and report; the other commands talk to a running
//!   agent over its control socket. It links none of the updater's or the reporter's code.
//! * `keepup-agent-pass` ([`pass_main`]): one update pass and its report, a report, or what
//!   the updater does when the agent starts, for the agent that started it (docs/agent.md,
//!   "Updater"); also `update --now` when no agent runs.
//!
//! Two binaries, not one that runs itself again: what stays resident is the supervisor's own
//! program text, and the kernel maps a program's text in 64 KiB windows around every page
//! touched, so code that never runs in the supervisor still costs it memory when it lies in
//! the same file (docs/benchmarks.md, "Updater and reporter out of the resident process").

mod agent;
mod cgroup;
mod child;
mod cli;
mod config;
mod control;
mod events;
mod external;
mod hoststate;
mod http;
mod logfile;
mod machine;
mod notify;
mod order;
mod policy;
mod proto;
mod reaper;
mod refuse;
mod report;
mod role;
mod runner;
mod service;
mod statefile;
mod systemd;
mod update;
mod watch;

/// `keepup-agent`: the supervisor and its control commands.
pub fn agent_main() -> std::process::ExitCode {
    cli::main()
}

/// `keepup-agent-pass`: the supervisor's child for one update pass or report.
pub fn pass_main() -> std::process::ExitCode {
    child::main()
}
