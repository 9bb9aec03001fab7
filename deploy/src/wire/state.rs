//! The words an agent and the operator side branch on: a supervised service's state
//! ([`ServiceState`]) and the kind of an event ([`EventKind`]). Both travel as the kebab-case
//! strings `keepup-agent status`, reports and the page show; a word from another agent version
//! that this one does not know is kept as `Unknown` (shown verbatim, never matched on), so a
//! newer agent's report is neither refused nor mislabelled by an older server.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Declares a string-backed enum with an `Unknown(String)` fallback.
macro_rules! wire_words {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $word:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// A word this version does not know (from another agent version), kept as sent.
            Unknown(String),
        }

        impl $name {
            /// Every known value, in declaration order.
            pub const KNOWN: &'static [$name] = &[$($name::$variant,)*];

            /// The word as shown and as sent.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $word,)*
                    $name::Unknown(s) => s,
                }
            }

            /// Reads a word; never fails (unknown words are kept as [`Self::Unknown`]).
            pub fn parse(s: &str) -> $name {
                match s {
                    $($word => $name::$variant,)*
                    other => $name::Unknown(other.to_string()),
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> $name {
                $name::parse(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<$name, D::Error> {
                let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
                Ok($name::parse(&s))
            }
        }
    };
}

wire_words! {
    /// What a supervised service is doing.
    ServiceState {
        /// Started, not ready yet (no `READY=1`, probes not all passed, or not past its
        /// first second, by its `supervisor.ready`).
        Starting => "starting",
        /// Ready, and still so.
        Running => "running",
        /// Sent `STOPPING=1`: shutting down on its own.
        Stopping => "stopping",
        /// Exited; waiting out the respawn delay.
        Backoff => "backoff",
        /// Started `count` times within `within`: no more starts until the next re-kick.
        GivenUp => "given-up",
        /// Admin-down: stopped, and neither started nor re-kicked until `up`.
        Down => "down",
        /// The launch script said its environment is not sane; it will be started again.
        NotSane => "not-sane",
        /// Not supervised at all: its role kill would hit what is not the service's, or its
        /// manifest is refused.
        Refused => "refused",
        /// Waits for the services it starts after (`supervisor.after`) to be ready.
        Waiting => "waiting",
    }
}

impl ServiceState {
    /// Up and ready: the only state that counts as healthy.
    pub fn is_ready(&self) -> bool {
        *self == ServiceState::Running
    }

    /// A state a start confirmation fails on at once (nothing will change it without an
    /// operator or a re-kick).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            ServiceState::GivenUp | ServiceState::Refused | ServiceState::Down
        )
    }
}

impl Default for ServiceState {
    fn default() -> ServiceState {
        ServiceState::Unknown(String::new())
    }
}

wire_words! {
    /// What an event reports.
    EventKind {
        /// The agent started.
        AgentStart => "agent-start",
        /// A manifest or service is not supervised (why in the message).
        Refused => "refused",
        /// A service was started `count` times within `within` and is given up.
        GivenUp => "given-up",
        /// Probes kept failing: the role was killed.
        HealthKill => "health-kill",
        /// A `notify` service missed its watchdog: the role was killed.
        WatchdogKill => "watchdog-kill",
        /// A start was not ready within `ready_timeout`.
        ReadyTimeout => "ready-timeout",
        /// A package was installed.
        Install => "install",
        /// A package was upgraded.
        Upgrade => "upgrade",
        /// A package was removed (quarantine, or gone from the track).
        Remove => "remove",
        /// An update pass failed.
        UpdateFailed => "update-failed",
        /// A half-installed package was repaired.
        Repair => "repair",
        /// Repairing a half-installed package failed.
        RepairFailed => "repair-failed",
        /// The service installed or upgraded by a pass started.
        Started => "started",
        /// The service installed or upgraded by a pass did not start.
        FailedToStart => "failed-to-start",
        /// The agent learned the repository's new key from a rotation statement.
        KeyLearned => "key-learned",
    }
}

wire_words! {
    /// Why an update pass failed: the kind of its first failure. Reports carry it beside the
    /// message, so `keepup report` and scripts tell a refused (possibly attacked) repository
    /// from an unreachable one without reading prose.
    UpdateFailure {
        /// Another pass held the pass lock.
        Busy => "busy",
        /// The repository did not answer (network, DNS, HTTP error).
        Unreachable => "unreachable",
        /// Signed metadata was not signed by a trusted key.
        BadSignature => "bad-signature",
        /// Signed metadata was refused otherwise: expired, replayed, below the minimum serial,
        /// not bound to the policy, malformed.
        Refused => "refused",
        /// The host's own state: the pinned key file, the state directory, the package
        /// database, the updater's configuration.
        Local => "local",
        /// A package action failed or hung (after a sha256 check, the package manager).
        Install => "install",
        /// Repairing an interrupted pass failed.
        Repair => "repair",
        /// A service the pass installed or upgraded did not start.
        NotStarted => "not-started",
        /// The pass ended without an answer: its child could not start, crashed or was killed.
        Aborted => "aborted",
    }
}

impl Default for EventKind {
    fn default() -> EventKind {
        EventKind::Unknown(String::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_and_unknown_ones_are_kept() {
        for s in ServiceState::KNOWN {
            let json = serde_json::to_string(s).unwrap();
            assert_eq!(serde_json::from_str::<ServiceState>(&json).unwrap(), *s);
            assert_eq!(ServiceState::parse(s.as_str()), *s);
        }
        for k in EventKind::KNOWN {
            assert_eq!(EventKind::parse(k.as_str()), *k);
        }
        let newer: ServiceState = serde_json::from_str("\"hibernating\"").unwrap();
        assert_eq!(newer, ServiceState::Unknown("hibernating".into()));
        assert_eq!(serde_json::to_string(&newer).unwrap(), "\"hibernating\"");
        assert!(!newer.is_ready());
        assert_eq!(EventKind::parse("given-up"), EventKind::GivenUp);
        for f in UpdateFailure::KNOWN {
            assert_eq!(UpdateFailure::parse(f.as_str()), *f);
        }
        assert_eq!(ServiceState::GivenUp.to_string(), "given-up");
    }
}
