//! The repository's OpenPGP key: generate or import it, and make the three kinds of signature
//! the repository publishes — cleartext (`InRelease`), detached armored (`Release.gpg`,
//! `repomd.xml.asc`, `index.json.sig`, `fleet.yaml.sig`) — and check them again (`repo verify`).
//!
//! Uses rPGP (`pgp` 0.20), the same library and version the `rpm` crate signs packages with.

use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};
use pgp::composed::{
    CleartextSignedMessage, Deserializable, DetachedSignature, KeyType, SecretKeyParamsBuilder,
    SignedPublicKey, SignedSecretKey,
};
use pgp::crypto::hash::HashAlgorithm;
use pgp::types::{KeyDetails, Password};

/// The loaded signing keys: the current one, and during a key rotation's overlap the old one
/// too. Every signature is made with each key (two signatures in one armored block).
pub struct Signer {
    keys: Vec<SignedSecretKey>,
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
    /// A signer with these keys (at least one).
    pub fn from_keys(keys: Vec<SignedSecretKey>) -> Signer {
        Signer { keys }
    }

    /// Load every armored secret key in `paths` (at least one).
    pub fn load_all(paths: &[&Path]) -> Result<Signer> {
        if paths.is_empty() {
            bail!("no signing key");
        }
        let keys = paths
            .iter()
            .map(|p| load_secret(p))
            .collect::<Result<_>>()?;
        Ok(Signer { keys })
    }

    /// A cleartext-signed message (`InRelease`, `fleet.yaml.asc`), signed by every key.
    pub fn cleartext(&self, text: &str) -> Result<String> {
        let sign = |key: &SignedSecretKey| {
            CleartextSignedMessage::sign(
                rand::thread_rng(),
                text,
                &key.primary_key,
                &Password::empty(),
            )
            .map(|m| m.signatures().to_vec())
        };
        let msg = CleartextSignedMessage::new_many(text, |_| {
            let mut all = Vec::new();
            for k in &self.keys {
                all.extend(sign(k)?);
            }
            Ok(all)
        })
        .map_err(|e| anyhow!("signing: {e}"))?;
        Ok(msg.to_armored_string(Default::default())?)
    }

    /// A detached armored binary signature of `data` (`Release.gpg`, `*.asc`, `*.sig`): one
    /// signature packet per key, in one armored block.
    pub fn detached(&self, data: &[u8]) -> Result<String> {
        let sigs = self
            .keys
            .iter()
            .map(|k| {
                DetachedSignature::sign_binary_data(
                    rand::thread_rng(),
                    &k.primary_key,
                    &Password::empty(),
                    HashAlgorithm::Sha256,
                    data,
                )
                .map_err(|e| anyhow!("signing: {e}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = Vec::new();
        pgp::armor::write(
            &sigs,
            pgp::armor::BlockType::Signature,
            &mut out,
            None,
            true,
        )?;
        Ok(String::from_utf8(out)?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use keepup_deploy::wire::rotation::{Judgement, Rotation};
    use keepup_deploy::wire::verify::TrustedKey;

    fn trusted(keys: &[&SignedSecretKey]) -> TrustedKey {
        let text: String = keys.iter().map(|k| armor_public(k).unwrap()).collect();
        TrustedKey::from_armored(&text).unwrap()
    }

    /// During an overlap every file carries both keys' signatures: a host that trusts either
    /// key alone accepts it, one that trusts neither refuses it.
    #[test]
    fn two_keys_sign_and_either_verifies_and_a_rotation_is_judged() {
        let (old, new, other) = (
            generate("old <old@example.org>").unwrap(),
            generate("new <new@example.org>").unwrap(),
            generate("other <other@example.org>").unwrap(),
        );
        let both = Signer::from_keys(vec![new.clone(), old.clone()]);
        let data = b"Origin: keepup\n";
        let detached = both.detached(data).unwrap();
        let inline = both.cleartext("serial: 3\n").unwrap();
        for k in [&old, &new] {
            let t = trusted(&[k]);
            t.verify(data, &detached).unwrap();
            assert_eq!(t.verify_inline(&inline).unwrap().trim_end(), "serial: 3");
        }
        let stranger = trusted(&[&other]);
        assert!(stranger.verify(data, &detached).is_err());
        assert!(stranger.verify_inline(&inline).is_err());
        assert!(trusted(&[&old]).verify(b"changed", &detached).is_err());

        // The statement, signed by the old key alone.
        let r = Rotation {
            old: fingerprint(&old),
            new: fingerprint(&new),
            old_until: 1_000,
            new_key: armor_public(&new).unwrap(),
        };
        let statement = Signer::from_keys(vec![old.clone()])
            .cleartext(&r.to_json())
            .unwrap();
        match Rotation::judge(&statement, &trusted(&[&old]), 999).unwrap() {
            Judgement::Learn { key, rotation } => {
                assert_eq!(
                    (key.fingerprint(), rotation),
                    (fingerprint(&new), r.clone())
                )
            }
            j => panic!("{j:?}"),
        }
        assert!(matches!(
            Rotation::judge(&statement, &trusted(&[&old, &new]), 999).unwrap(),
            Judgement::Known
        ));
        match Rotation::judge(&statement, &trusted(&[&old]), 1_000).unwrap() {
            Judgement::TooLate(r) => assert!(r.too_late().contains(&fingerprint(&new))),
            j => panic!("{j:?}"),
        }
        // Signed by a key the host does not trust: not for it.
        assert!(matches!(
            Rotation::judge(&statement, &stranger, 999).unwrap(),
            Judgement::Known
        ));
        // A statement whose key is not the one it names is refused.
        let lying = Rotation {
            new_key: armor_public(&other).unwrap(),
            ..r.clone()
        };
        let lying = Signer::from_keys(vec![old.clone()])
            .cleartext(&lying.to_json())
            .unwrap();
        let e = Rotation::judge(&lying, &trusted(&[&old]), 999).unwrap_err();
        assert!(e.contains("not the"), "{e}");
        // One signed by the new key speaking for the old: refused.
        let forged = Signer::from_keys(vec![new.clone()])
            .cleartext(&r.to_json())
            .unwrap();
        let e = Rotation::judge(&forged, &trusted(&[&new]), 999).unwrap_err();
        assert!(e.contains("speaks for"), "{e}");
    }
}
