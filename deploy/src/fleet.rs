//! Fleet policy: which hosts follow which track and run which services, and which services are
//! quarantined where. Kept in the repository state (`.keepup/fleet.json`) and published as
//! `fleet.yaml` with a detached signature `fleet.yaml.sig`; agents check the signature and the
//! serial.

use std::path::Path;

use anyhow::{anyhow, bail, Result};

use crate::repo::{write_atomic, Repo};
use crate::sign::{self, Signer};
pub use keepup_deploy::wire::fleet::Fleet;

/// Write `fleet.yaml` for `fleet`, valid until `expires` (Unix time), and its signature
/// (signature first) in the repository at `root`.
pub fn write(root: &Path, signer: &Signer, fleet: &Fleet, expires: u64) -> Result<()> {
    let y = Fleet {
        expires: Some(expires),
        ..fleet.clone()
    }
    .to_yaml();
    let sig = signer.detached(y.as_bytes())?;
    write_atomic(&root.join("fleet.yaml.sig"), sig.as_bytes())?;
    write_atomic(&root.join("fleet.yaml"), y.as_bytes())?;
    Ok(())
}

/// Check `fleet.yaml` against its signature and the state.
pub fn verify(repo: &Repo, key: &pgp::composed::SignedPublicKey) -> Result<()> {
    let y = std::fs::read(repo.root.join("fleet.yaml"))?;
    let sig = std::fs::read_to_string(repo.root.join("fleet.yaml.sig"))?;
    sign::verify_detached(key, &y, &sig)?;
    let mut parsed = Fleet::from_yaml(std::str::from_utf8(&y)?).map_err(anyhow::Error::msg)?;
    keepup_deploy::wire::verify::check_expiry(parsed.expires, crate::repo::now()).map_err(|e| {
        anyhow!(
            "{e}; re-sign with `keepup repo refresh --repo {}`",
            repo.root.display()
        )
    })?;
    // The state does not keep the expiry: it is set when the policy is signed.
    parsed.expires = repo.state.fleet.expires;
    if parsed != repo.state.fleet {
        bail!("fleet.yaml does not match the repository state");
    }
    Ok(())
}
