//! Checking the repository's detached OpenPGP signatures (`index.json.sig`, `fleet.yaml.sig`,
//! `Release.gpg`, `repomd.xml.asc`) against a public key: what `keepup repo verify` does on
//! the operator side and what every agent does with the key pinned in its configuration.

use pgp::composed::{Deserializable, DetachedSignature, SignedPublicKey};
use pgp::types::KeyDetails as _;

/// A public key that signatures are checked against.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    key: SignedPublicKey,
}

impl TrustedKey {
    /// Parses an armored OpenPGP public key (`keepup repo init` prints where it is).
    pub fn from_armored(text: &str) -> Result<TrustedKey, String> {
        let (key, _) = SignedPublicKey::from_string(text)
            .map_err(|e| format!("not an armored OpenPGP public key: {e}"))?;
        Ok(TrustedKey { key })
    }

    /// The parsed key.
    pub fn key(&self) -> &SignedPublicKey {
        &self.key
    }

    /// Hex fingerprint, upper case.
    pub fn fingerprint(&self) -> String {
        hex::encode_upper(self.key.fingerprint().as_bytes())
    }

    /// Checks an armored detached signature of `data`.
    pub fn verify(&self, data: &[u8], armored_sig: &str) -> Result<(), String> {
        verify_detached(&self.key, data, armored_sig)
    }
}

/// Checks an armored detached signature of `data` against `key`.
pub fn verify_detached(
    key: &SignedPublicKey,
    data: &[u8],
    armored_sig: &str,
) -> Result<(), String> {
    let (sig, _) = DetachedSignature::from_string(armored_sig)
        .map_err(|e| format!("not an armored signature: {e}"))?;
    sig.verify(&key.primary_key, data)
        .map_err(|e| format!("bad signature: {e}"))
}
