//! `keepup-agent-pass`: the supervisor's short-lived child for one update pass or report
//! (see `lib.rs` and `child.rs`).

fn main() -> std::process::ExitCode {
    keepup_agent::pass_main()
}
