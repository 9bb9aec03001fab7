//! The repository's OpenPGP key: generate or import it, and make the three kinds of signature
//! the repository publishes — cleartext (`InRelease`), detached armored (`Release.gpg`,
//! `repomd.xml.asc`, `index.json.sig`, `fleet.yaml.sig`) — and check them again (`repo verify`).
//!
//! Uses rPGP (`pgp` 0.20), the same library and version the `rpm` crate signs packages with.

use std::path::Path;

use anyhow::{anyhow, Context as _, Result};
use pgp::composed::{
    CleartextSignedMessage, Deserializable, DetachedSignature, KeyType, SecretKeyParamsBuilder,
    SignedPublicKey, SignedSecretKey,
};
use pgp::crypto::hash::HashAlgorithm;
use pgp::types::{KeyDetails, Password};

/// A loaded signing key.
pub struct Signer {
    secret: SignedSecretKey,
}

/// Generate a new RSA signing key (RSA is what every client here verifies: apt's gpgv, dnf's
/// gpgme and rpm's own parser).
pub fn generate(user_id: &str) -> Result<SignedSecretKey> {
    let mut params = SecretKeyParamsBuilder::default();
    params
        .key_type(KeyType::Rsa(3072))
        .can_certify(true)
        .can_sign(true)
        .primary_user_id(user_id.into());
    let params = params.build().map_err(|e| anyhow!("key parameters: {e}"))?;
    let key = params
        .generate(rand::thread_rng())
        .map_err(|e| anyhow!("generating the signing key: {e}"))?;
    Ok(key)
}

/// Armored text of a secret key.
pub fn armor_secret(key: &SignedSecretKey) -> Result<String> {
    Ok(key.to_armored_string(Default::default())?)
}

/// Armored public half of a secret key.
pub fn armor_public(key: &SignedSecretKey) -> Result<String> {
    Ok(key.to_public_key().to_armored_string(Default::default())?)
}

/// Read an armored secret key.
pub fn load_secret(path: &Path) -> Result<SignedSecretKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the signing key {}", path.display()))?;
    let (key, _) = SignedSecretKey::from_string(&text).map_err(|e| {
        anyhow!(
            "{} is not an armored OpenPGP secret key ({e}); export one with `gpg --armor --export-secret-keys KEYID`",
            path.display()
        )
    })?;
    Ok(key)
}

/// Read an armored public key.
pub fn load_public(path: &Path) -> Result<SignedPublicKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the public key {}", path.display()))?;
    let (key, _) = SignedPublicKey::from_string(&text).map_err(|e| {
        anyhow!(
            "{} is not an armored OpenPGP public key: {e}",
            path.display()
        )
    })?;
    Ok(key)
}

/// Hex fingerprint of a key.
pub fn fingerprint(key: &SignedSecretKey) -> String {
    hex::encode_upper(key.fingerprint().as_bytes())
}

impl Signer {
    /// Load the armored secret key at `path`.
    pub fn load(path: &Path) -> Result<Signer> {
        let secret = load_secret(path)?;
        Ok(Signer { secret })
    }

    /// A cleartext-signed message (`InRelease`).
    pub fn cleartext(&self, text: &str) -> Result<String> {
        let msg = CleartextSignedMessage::sign(
            rand::thread_rng(),
            text,
            &self.secret.primary_key,
            &Password::empty(),
        )
        .map_err(|e| anyhow!("signing: {e}"))?;
        Ok(msg.to_armored_string(Default::default())?)
    }

    /// A detached armored binary signature of `data` (`Release.gpg`, `*.asc`, `*.sig`).
    pub fn detached(&self, data: &[u8]) -> Result<String> {
        let sig = DetachedSignature::sign_binary_data(
            rand::thread_rng(),
            &self.secret.primary_key,
            &Password::empty(),
            HashAlgorithm::Sha256,
            data,
        )
        .map_err(|e| anyhow!("signing: {e}"))?;
        Ok(sig.to_armored_string(Default::default())?)
    }
}

/// Check a detached armored signature of `data` against `key`.
pub fn verify_detached(key: &SignedPublicKey, data: &[u8], armored_sig: &str) -> Result<()> {
    keepup_deploy::wire::verify::verify_detached(key, data, armored_sig).map_err(anyhow::Error::msg)
}

/// Check a cleartext-signed message against `key`; returns the signed text.
pub fn verify_cleartext(key: &SignedPublicKey, armored: &str) -> Result<String> {
    keepup_deploy::wire::verify::verify_cleartext(key, armored).map_err(anyhow::Error::msg)
}
