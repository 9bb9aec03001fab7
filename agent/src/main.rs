//! keepup-agent: the per-host supervisor (work in progress; see docs/agent.md).

fn main() {
    eprintln!("keepup-agent: not implemented yet");
    std::process::exit(2);
}
