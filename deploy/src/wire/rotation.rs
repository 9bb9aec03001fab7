//! The key rotation statement, `keys/rotation.asc`: the repository's old key vouching for its
//! new one. `keepup repo rotate-key` publishes it, signed (inline) by the old key only. An
//! agent that trusts the old key learns the new one from it, and stops trusting the old key
//! when the overlap the statement names is over; from then on the repository signs with the
//! new key only. What to make of a statement is decided here ([`Rotation::judge`]), pure.

use serde::{Deserialize, Serialize};

use super::verify::TrustedKey;

/// Where the statement is published, relative to the repository root.
pub const ROTATION: &str = "keys/rotation.asc";

/// The statement's signed content (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    /// Fingerprint (upper-case hex) of the key being retired, which signs the statement.
    pub old: String,
    /// Fingerprint of the new key.
    pub new: String,
    /// Unix time at which the old key stops being trusted: the end of the overlap, during
    /// which the repository signs with both keys.
    pub old_until: u64,
    /// The new public key, armored.
    pub new_key: String,
}

/// What an agent makes of a statement.
#[derive(Debug, Clone)]
pub enum Judgement {
    /// Nothing to do: the new key is already trusted, or the statement is not for a key this
    /// host trusts.
    Known,
    /// Trust the new key (and the old one until `old_until`).
    Learn {
        /// The new key.
        key: TrustedKey,
        /// The statement (what to record).
        rotation: Rotation,
    },
    /// The overlap ended before this host learned the new key: it cannot follow by itself.
    TooLate(Rotation),
}

impl Rotation {
    /// The statement's JSON text (what is signed).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plain data")
    }

    /// Judges an armored statement against what this host trusts, at `now`. Errors: the
    /// statement is malformed, or not consistent with its own contents.
    pub fn judge(armored: &str, trusted: &TrustedKey, now: u64) -> Result<Judgement, String> {
        let Ok((text, signer)) = trusted.verify_inline_by(armored) else {
            // Signed by a key this host does not trust: not a statement for it (an attacker's,
            // or the statement of a rotation this host already went through).
            return Ok(Judgement::Known);
        };
        let r: Rotation = serde_json::from_str(&text).map_err(|e| format!("{ROTATION}: {e}"))?;
        if r.old != signer {
            return Err(format!(
                "{ROTATION}: signed by {signer}, but it speaks for the key {}",
                r.old
            ));
        }
        if trusted.has(&r.new) {
            return Ok(Judgement::Known);
        }
        let key = TrustedKey::from_armored(&r.new_key).map_err(|e| format!("{ROTATION}: {e}"))?;
        if key.fingerprint() != r.new {
            return Err(format!(
                "{ROTATION}: the key in it is {}, not the {} it names",
                key.fingerprint(),
                r.new
            ));
        }
        if now >= r.old_until {
            return Ok(Judgement::TooLate(r));
        }
        Ok(Judgement::Learn { key, rotation: r })
    }

    /// What a host that missed the overlap is told.
    pub fn too_late(&self) -> String {
        format!(
            "the repository's key changed from {} to {}, and the old key stopped being trusted \
             at {}, before this host learned the new one: install the repository's current \
             public key (keys/repository.asc, fingerprint {}) as trusted_key",
            self.old,
            self.new,
            super::verify::utc(self.old_until),
            self.new
        )
    }
}
