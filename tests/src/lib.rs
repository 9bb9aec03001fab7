//! Fleet test support: builds the Debian 12 host image without a registry ([`image`]), and
//! starts hosts as containers on per-test networks ([`host`]). The example service daemon
//! `food` lives in `src/bin/food.rs`; [`example`] packs it.

pub mod agent_host;
pub mod agent_pkg;
pub mod example;
pub mod fleet;
pub mod host;
pub mod image;
pub mod postgres;
pub mod s3;
pub mod systemd;
pub mod testkit;

pub use host::{docker_or_skip, workspace_root, Exec, Host, TestNet};
pub use image::host_image;

/// Hex SHA-256 of `s`.
pub(crate) fn sha256_hex(s: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(s.as_bytes()))
}
