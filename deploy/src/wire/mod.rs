//! Wire types shared by the agent and the operator side: the agent's track index
//! ([`index`]), the fleet policy ([`fleet`]), what an agent reports ([`report`]), the name
//! rules reports are checked with ([`names`]), health-gated rollouts ([`rollout`]), the states and event kinds branched on ([`state`]) and the OpenPGP signature check both sides apply
//! ([`verify`]). Everything here is plain data plus pure functions: no files, no network.

pub mod fleet;
pub mod index;
pub mod names;
pub mod report;
pub mod rollout;
pub mod rotation;
pub mod state;
pub mod verify;

pub use fleet::{glob_match, Assignment, Fleet, Quarantine, AGENT_PACKAGE};
pub use index::{best_per_name, Format, Index, PoolEntry};
pub use report::{
    Event, ProbeReport, Report, RolloutReport, ServiceReport, StartReport, UpdateReport,
};
pub use state::{EventKind, ServiceState, UpdateFailure};
