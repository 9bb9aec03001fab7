//! `keepup-agent`: the per-host supervisor and its control commands (see `lib.rs`).

fn main() -> std::process::ExitCode {
    keepup_agent::agent_main()
}
