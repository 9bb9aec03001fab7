//! Checking the repository's OpenPGP signatures (detached: `index.json.sig`, `Release.gpg`,
//! `repomd.xml.asc`; inline: `fleet.yaml.asc`, `InRelease`) against a public key: what
//! `keepup repo verify` does on the operator side and what every agent does with the key
//! pinned in its configuration. Also the expiry check of signed metadata ([`check_expiry`]).

use pgp::composed::{CleartextSignedMessage, Deserializable, DetachedSignature, SignedPublicKey};
use pgp::types::KeyDetails as _;

/// The public keys that signatures are checked against: one, or during a key rotation's
/// overlap two (an armored keyring may hold several). A signature by any of them is accepted.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    keys: Vec<SignedPublicKey>,
}

impl TrustedKey {
    /// Parses armored OpenPGP public keys, one or several (`keepup repo init` prints where
    /// the repository's is).
    pub fn from_armored(text: &str) -> Result<TrustedKey, String> {
        let bad = |e: String| format!("not an armored OpenPGP public key: {e}");
        // Each armored block (a keyring file may hold several), each block's keys.
        const BEGIN: &str = "-----BEGIN PGP PUBLIC KEY BLOCK-----";
        let mut keys = Vec::new();
        for block in text.split(BEGIN).skip(1) {
            let armored = format!("{BEGIN}{block}");
            let (parsed, _) =
                SignedPublicKey::from_string_many(&armored).map_err(|e| bad(e.to_string()))?;
            for k in parsed {
                keys.push(k.map_err(|e| bad(e.to_string()))?);
            }
        }
        if keys.is_empty() {
            return Err(bad("no key in it".into()));
        }
        Ok(TrustedKey { keys })
    }

    /// The parsed keys.
    pub fn keys(&self) -> &[SignedPublicKey] {
        &self.keys
    }

    /// Adds `other`'s keys (those not already here).
    pub fn extend(&mut self, other: TrustedKey) {
        for k in other.keys {
            if !self.keys.iter().any(|h| h.fingerprint() == k.fingerprint()) {
                self.keys.push(k);
            }
        }
    }

    /// Drops the keys for which `retired` is true (by fingerprint); never the last one.
    pub fn retain(&mut self, retired: impl Fn(&str) -> bool) {
        let keep: Vec<SignedPublicKey> = self
            .keys
            .iter()
            .filter(|k| !retired(&fingerprint(k)))
            .cloned()
            .collect();
        if !keep.is_empty() {
            self.keys = keep;
        }
    }

    /// Hex fingerprints, upper case, comma-separated.
    pub fn fingerprint(&self) -> String {
        self.keys
            .iter()
            .map(fingerprint)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Is a key with this fingerprint (upper-case hex) among these?
    pub fn has(&self, fpr: &str) -> bool {
        self.keys.iter().any(|k| fingerprint(k) == fpr)
    }

    /// Checks an armored detached signature of `data`.
    pub fn verify(&self, data: &[u8], armored_sig: &str) -> Result<(), String> {
        let mut last = String::new();
        for k in &self.keys {
            match verify_detached(k, data, armored_sig) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Checks an inline (cleartext) signed message; returns the signed text.
    pub fn verify_inline(&self, armored: &str) -> Result<String, String> {
        self.verify_inline_by(armored).map(|(text, _)| text)
    }

    /// [`Self::verify_inline`], also returning the fingerprint of the key that signed.
    pub fn verify_inline_by(&self, armored: &str) -> Result<(String, String), String> {
        let mut last = String::new();
        for k in &self.keys {
            match verify_cleartext(k, armored) {
                Ok(text) => return Ok((text, fingerprint(k))),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// A key's fingerprint, upper-case hex.
pub fn fingerprint(key: &SignedPublicKey) -> String {
    hex::encode_upper(key.fingerprint().as_bytes())
}

/// Checks a cleartext-signed message (`fleet.yaml.asc`, `InRelease`) against `key`; returns
/// the signed text, with line ends as signed (`\n`).
pub fn verify_cleartext(key: &SignedPublicKey, armored: &str) -> Result<String, String> {
    let (msg, _) = CleartextSignedMessage::from_string(armored)
        .map_err(|e| format!("not a cleartext-signed message: {e}"))?;
    msg.verify(&key.primary_key)
        .map_err(|e| format!("bad signature: {e}"))?;
    Ok(msg.signed_text().replace("\r\n", "\n"))
}

/// Checks an armored detached signature of `data` against `key`.
pub fn verify_detached(
    key: &SignedPublicKey,
    data: &[u8],
    armored_sig: &str,
) -> Result<(), String> {
    // During a key rotation a file carries one signature per key: one by `key` suffices.
    let (sigs, _) = DetachedSignature::from_string_many(armored_sig)
        .map_err(|e| format!("not an armored signature: {e}"))?;
    let mut last = String::from("no signature in it");
    for sig in sigs {
        match sig
            .map_err(|e| e.to_string())
            .and_then(|s| s.verify(&key.primary_key, data).map_err(|e| e.to_string()))
        {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(format!("bad signature: {last}"))
}

/// Refuse signed metadata whose `expires` (Unix time) is not after `now`: a repository that
/// nobody re-signs, or an attacker serving yesterday's metadata forever (a freeze). Metadata
/// without `expires` comes from a repository made before expiry existed and is accepted.
pub fn check_expiry(expires: Option<u64>, now: u64) -> Result<(), String> {
    match expires {
        Some(t) if t <= now => Err(format!(
            "repository metadata expired at {} (frozen or unmaintained repository?)",
            utc(t)
        )),
        _ => Ok(()),
    }
}

/// Unix time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc(t: u64) -> String {
    let (days, secs) = ((t / 86_400) as i64, t % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod expiry_tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn expired_metadata_is_refused_with_the_time() {
        assert_eq!(check_expiry(None, 5), Ok(()));
        assert_eq!(check_expiry(Some(6), 5), Ok(()));
        assert_eq!(
            check_expiry(Some(1_700_000_000), 1_700_000_000),
            Err("repository metadata expired at 2023-11-14T22:13:20Z (frozen or unmaintained repository?)".into())
        );
    }
}
