//! Small helpers the end-to-end tests share: the example spec's quick timers and daemon flags,
//! one repository signing key per test process, and the example packed with the real
//! `keepup pack`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{ensure, Context as _, Result};

use crate::example::built_bin;
use crate::fleet::keepup;
use crate::host::workspace_root;

/// Spec edits for tests: short stop grace and not-sane sleep, quick probes, so that starts
/// are judged within seconds.
pub fn quick(text: String) -> String {
    text.replace("not_sane_sleep: 10s", "not_sane_sleep: 2s")
        .replace("stop_grace: 5s", "stop_grace: 2s")
        .replace("every: 10s", "every: 1s")
        .replace("timeout: 2s", "timeout: 1s")
        .replace("grace: 2s", "grace: 1s")
}

/// Adds daemon flags to the example's `exec` line.
pub fn with_flags(text: String, flags: &[&str]) -> String {
    let extra: String = flags.iter().map(|f| format!(", \"{f}\"")).collect();
    text.replace(
        "exec: [/usr/bin/food, --config, /etc/foo/foo.conf]",
        &format!("exec: [/usr/bin/food, --config, /etc/foo/foo.conf{extra}]"),
    )
}

/// One repository signing key (armored secret key) for every test of this process: an RSA
/// key takes seconds in a debug build, and the lock makes tests running at once share it.
pub fn shared_signing_key() -> Result<PathBuf> {
    static KEY: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut key = KEY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(k) = key.as_ref() {
        return Ok(k.clone());
    }
    let dir = std::env::temp_dir().join(format!("keepup-test-key-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let keys = dir.join("keys");
    keepup(&[
        "repo",
        "init",
        dir.join("r").to_str().unwrap(),
        "--key-dir",
        keys.to_str().unwrap(),
    ])?;
    let path = key_in(&keys)?;
    *key = Some(path.clone());
    Ok(path)
}

/// The secret key `keepup repo init --key-dir DIR` stored in `DIR` (named by its fingerprint;
/// DIR must hold just that one).
pub fn key_in(dir: &Path) -> Result<PathBuf> {
    let keys: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the key directory {}", dir.display()))?
        .map(|f| Ok(f?.path()))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "asc"))
        .collect();
    match &keys[..] {
        [k] => Ok(k.clone()),
        _ => anyhow::bail!(
            "{} should hold one secret key, holds {keys:?}",
            dir.display()
        ),
    }
}

/// Writes the example spec (docs/examples: foo.yaml and foo.conf) at `version`, with the real
/// `food` daemon and then `edit` applied, into `dir`, and packs it with the real `keepup pack`
/// into `dir/dist`, the .rpm signed with `sign_key` (None: unsigned). Returns (deb, rpm).
pub fn keepup_pack_example(
    dir: &Path,
    version: &str,
    sign_key: Option<&Path>,
    edit: impl FnOnce(String) -> String,
) -> Result<(PathBuf, PathBuf)> {
    let src = workspace_root().join("docs/examples");
    std::fs::create_dir_all(dir)?;
    std::fs::copy(src.join("foo.conf"), dir.join("foo.conf"))?;
    let text = std::fs::read_to_string(src.join("foo.yaml"))?
        .replace("version: 1.0.0", &format!("version: {version}"))
        .replace(
            "../../target/release/food",
            &built_bin("food")?.to_string_lossy(),
        );
    std::fs::write(dir.join("foo.yaml"), edit(text))?;
    let dist = dir.join("dist");
    let mut args = vec![
        "pack".to_string(),
        dir.join("foo.yaml").to_string_lossy().into_owned(),
        "--out".into(),
        dist.to_string_lossy().into_owned(),
    ];
    if let Some(k) = sign_key {
        args.extend(["--sign-key".into(), k.to_string_lossy().into_owned()]);
    }
    keepup(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok((
        dist.join(format!("foo_{version}-1_amd64.deb")),
        dist.join(format!("foo-{version}-1.x86_64.rpm")),
    ))
}

/// Copy the tree at `from` to `to` (directories and regular files).
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

/// A repository initialised once per test process under a temporary directory named by
/// `tag` (key generation is slow in debug builds); copy it ([`copy_dir`]) to change it.
/// Tests of one process running at once all wait for the first one's `repo init`: none may
/// copy the template while another is making it.
pub fn template_repo(tag: &str) -> Result<PathBuf> {
    static REPO: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    let mut made = REPO.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = &*made {
        return Ok(r.clone());
    }
    let dir = std::env::temp_dir().join(format!("keepup-{tag}-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let repo = dir.join("repo");
    keepup(&[
        "repo",
        "init",
        repo.to_str().context("a UTF-8 temporary directory")?,
    ])?;
    *made = Some(repo.clone());
    Ok(repo)
}

/// `Field: value` pairs of a Packages stanza (continuation lines joined to their field).
pub fn stanza_fields(stanza: &str) -> std::collections::BTreeMap<String, String> {
    let mut fields = std::collections::BTreeMap::new();
    let mut last = String::new();
    for line in stanza.lines() {
        if line.starts_with(' ') {
            if let Some(v) = fields.get_mut(&last) {
                *v = format!("{v}\n{line}");
            }
        } else if let Some((k, v)) = line.split_once(':') {
            last = k.to_string();
            fields.insert(last.clone(), v.trim().to_string());
        }
    }
    fields
}

/// Calls `check` until it returns true (every 100 ms); fails after `within` naming `what`.
pub fn wait_until(
    what: &str,
    within: std::time::Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = std::time::Instant::now() + within;
    loop {
        if check()? {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The body of an answer sent with `Transfer-Encoding: chunked`, decoded; an error if it
/// does not end with its last (empty) chunk: a truncated answer never looks complete.
pub fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let eol = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("a chunk without its size line: the answer was cut short")?;
        let size = std::str::from_utf8(&raw[..eol])?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size:?}"))?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Ok(body);
        }
        ensure!(
            raw.len() >= size + 2,
            "a chunk of {size} bytes with {} left: the answer was cut short",
            raw.len()
        );
        body.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}
