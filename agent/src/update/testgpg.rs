//! Test helpers: OpenPGP keys and cleartext signatures made by the real `gpg`, for the checks
//! of signed metadata.

use std::path::Path;
use std::process::Command;

/// Makes an ed25519 key with gpg in `home`; returns the armored public key.
pub fn gpg_key(home: &Path, uid: &str) -> Option<String> {
    let ok = Command::new("gpg")
        .env("GNUPGHOME", home)
        .args([
            "--batch",
            "--quiet",
            "--passphrase",
            "",
            "--quick-gen-key",
            uid,
            "ed25519",
            "sign",
            "never",
        ])
        .status()
        .ok()?
        .success();
    if !ok {
        return None;
    }
    let out = Command::new("gpg")
        .env("GNUPGHOME", home)
        .args(["--batch", "--armor", "--export", uid])
        .output()
        .ok()?;
    String::from_utf8(out.stdout).ok()
}

/// `data` inline-signed (cleartext) by `uid`, as `fleet.yaml.asc` is.
pub fn gpg_clearsign(home: &Path, uid: &str, data: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("data");
    std::fs::write(&f, data).unwrap();
    let st = Command::new("gpg")
        .env("GNUPGHOME", home)
        .args(["--batch", "--yes", "--local-user", uid, "--clearsign"])
        .arg(&f)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read(dir.path().join("data.asc")).unwrap()
}
