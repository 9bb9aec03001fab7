//! Version ordering and the rollback version rule live in the packager, shared with the agent.

pub use keepup_packager::version::*;
