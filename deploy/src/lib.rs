//! keepup's deploy side as a library. [`wire`] holds what agents and the operator side
//! exchange (the track index, the fleet policy, host reports, signature checks) and is all that
//! is built with `default-features = false`, which is how the agent depends on this crate: it
//! links no repository, packaging or server code. [`https`] (feature `https`) is the HTTPS
//! client's shared part: the agent and `keepup report` both use it.

#[cfg(feature = "https")]
pub mod https;
pub mod wire;
