//! A pass's failures, typed: the kind ([`UpdateFailure`], which reports carry) beside the
//! message operators read. Code that branches on why a pass failed matches the kind, never
//! the message.

use std::fmt;

pub use keepup_deploy::wire::UpdateFailure;

/// Why a pass (or one of its steps) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassError {
    /// What kind of failure.
    pub kind: UpdateFailure,
    /// What happened and what to do, for people.
    pub why: String,
}

impl PassError {
    /// A failure of `kind`.
    pub fn new(kind: UpdateFailure, why: impl Into<String>) -> PassError {
        PassError {
            kind,
            why: why.into(),
        }
    }

    /// The host's own state failed (a file, the package database, the configuration).
    pub fn local(why: impl Into<String>) -> PassError {
        PassError::new(UpdateFailure::Local, why)
    }

    /// Signed metadata refused for a reason other than its signature.
    pub fn refused(why: impl Into<String>) -> PassError {
        PassError::new(UpdateFailure::Refused, why)
    }

    /// The same kind, the message extended.
    pub fn and(self, more: &str) -> PassError {
        PassError {
            why: format!("{}; {more}", self.why),
            ..self
        }
    }
}

impl fmt::Display for PassError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.why)
    }
}

impl std::error::Error for PassError {}
