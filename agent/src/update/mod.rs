//! The updater (issue 4), groundwork: when a pass runs ([`schedule`], [`stagger`]), what it
//! does ([`plan`], with dpkg/rpm [`version`] ordering), running the package manager safely
//! ([`pkg`]), fetching packages with a checked sha256 ([`fetch`]), and judging whether an
//! installed service started ([`start`]). Not yet wired into
//! `keepup-agent run`: the index/fleet wire format and signatures come from the repository
//! work (deploy/src/repo, deploy/src/sign.rs).

// Nothing outside the tests calls this yet.
#![allow(dead_code)]

pub mod fetch;
pub mod pkg;
pub mod plan;
pub mod run;
pub mod schedule;
pub mod stagger;
pub mod start;
pub mod version;
