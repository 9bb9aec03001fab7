//! The repository's signed metadata under failure, driven through the real `keepup` binary:
//! a command killed at every named step of `publish` and `promote` (`KEEPUP_CRASH_AT`), a
//! disk that fills up during a publish (a small tmpfs in a private mount namespace), and an
//! operator who overwrites the file they published. Each time `keepup repo verify` must pass,
//! serials must never be reused for other contents, and the pool must not change.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context as _, Result};
use keepup_tests::example::built_bin;
use keepup_tests::fleet::{keepup, keepup_output};
use keepup_tests::testkit::{keepup_pack_example, shared_signing_key};

const TRACKS: [&str; 3] = ["unstable", "testing", "stable"];

/// A fresh repository in `dir/repo` signed with the shared key (kept in `dir/keys`).
fn new_repo(dir: &Path) -> Result<PathBuf> {
    let repo = dir.join("repo");
    let key = shared_signing_key()?;
    keepup(&[
        "repo",
        "init",
        path(&repo),
        "--key",
        path(&key),
        "--key-dir",
        path(&dir.join("keys")),
    ])?;
    Ok(repo)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// The example service at `version`, packed with the shared key. Returns (deb, rpm).
fn build(dir: &Path, version: &str, summary: &str) -> Result<(PathBuf, PathBuf)> {
    keepup_pack_example(
        &dir.join(format!("spec-{version}{summary}")),
        version,
        Some(&shared_signing_key()?),
        |t| {
            assert!(t.contains("summary: Example"), "the example spec changed");
            t.replace("summary: Example", &format!("summary: {summary}Example"))
        },
    )
}

/// Every (track, serial) ever published, with the sha256 of the index that carried it.
#[derive(Default)]
struct Serials(BTreeMap<(String, u64), String>);

impl Serials {
    /// Record the indexes published now; fails if a serial already seen signs other contents.
    fn observe(&mut self, repo: &Path) -> Result<()> {
        for t in TRACKS {
            let bytes = std::fs::read(repo.join(format!("tracks/{t}/index.json")))?;
            let index: serde_json::Value = serde_json::from_slice(&bytes)?;
            let serial = index["serial"].as_u64().context("index without serial")?;
            let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            if let Some(before) = self.0.insert((t.to_string(), serial), sha.clone()) {
                ensure!(
                    before == sha,
                    "serial {serial} of {t} signed two different indexes"
                );
            }
        }
        Ok(())
    }

    /// The highest serial of `track` seen so far.
    fn max(&self, track: &str) -> u64 {
        self.0
            .keys()
            .filter(|(t, _)| t == track)
            .map(|(_, s)| *s)
            .max()
            .unwrap_or(0)
    }
}

/// The serial `track` publishes now.
fn serial(repo: &Path, track: &str) -> Result<u64> {
    let bytes = std::fs::read(repo.join(format!("tracks/{track}/index.json")))?;
    let index: serde_json::Value = serde_json::from_slice(&bytes)?;
    index["serial"].as_u64().context("index without serial")
}

/// `keepup ARGS` with `KEEPUP_CRASH_AT=step`: true if it was killed there, false if it
/// finished (the command never reaches that step).
fn crash_at(step: &str, args: &[&str]) -> Result<bool> {
    let out = Command::new(built_bin("keepup")?)
        .args(args)
        .env("KEEPUP_CRASH_AT", step)
        .output()?;
    match out.status.signal() {
        Some(9) => Ok(true),
        None if out.status.success() => Ok(false),
        _ => bail!(
            "keepup {args:?} with KEEPUP_CRASH_AT={step} neither crashed nor succeeded: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn a_crash_at_every_step_of_publish_and_promote_leaves_a_verifying_repository_and_no_reused_serial(
) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo = new_repo(tmp.path())?;
    let r = path(&repo);
    let steps: Vec<String> = keepup(&["repo", "crash-steps"])?
        .lines()
        .map(String::from)
        .collect();
    ensure!(
        steps.len() >= 7 && steps.iter().any(|s| s == "track-commit"),
        "crash steps: {steps:?}"
    );
    let mut serials = Serials::default();
    serials.observe(&repo)?;
    for (i, step) in steps.iter().enumerate() {
        let (deb, rpm) = build(tmp.path(), &format!("1.{i}.0"), "")?;
        let publish = ["publish", "--repo", r, path(&deb), path(&rpm)];
        ensure!(
            crash_at(step, &publish)?,
            "publish never reached the step {step}"
        );
        serials.observe(&repo)?;
        keepup(&["repo", "verify", "--repo", r])
            .with_context(|| format!("after a crash at {step} in publish"))?;
        let before = serials.max("unstable");
        keepup(&publish).with_context(|| format!("publishing again after a crash at {step}"))?;
        serials.observe(&repo)?;
        ensure!(
            serial(&repo, "unstable")? > before,
            "after a crash at {step}, publish reused serial {} of unstable",
            serial(&repo, "unstable")?
        );
        keepup(&["repo", "verify", "--repo", r])?;

        let promote = ["promote", "--repo", r, "foo", "--to", "testing"];
        let crashed = crash_at(step, &promote)?;
        // A promote writes no pool file: it cannot crash at the pool steps.
        ensure!(
            crashed != step.starts_with("pool-"),
            "promote {} at {step}",
            if crashed { "crashed" } else { "did not crash" }
        );
        serials.observe(&repo)?;
        keepup(&["repo", "verify", "--repo", r])
            .with_context(|| format!("after a crash at {step} in promote"))?;
        if crashed {
            let before = serials.max("testing");
            let (ok, out, err) = keepup_output(&promote)?;
            // A crash after the commit leaves the promotion done: "nothing to promote".
            ensure!(
                ok || err.contains("nothing to promote"),
                "promoting again after a crash at {step}:\n{out}{err}"
            );
            serials.observe(&repo)?;
            ensure!(
                !ok || serial(&repo, "testing")? > before,
                "after a crash at {step}, promote reused serial {} of testing",
                serial(&repo, "testing")?
            );
        }
        keepup(&["repo", "verify", "--repo", r])?;
    }
    Ok(())
}

#[test]
fn overwriting_the_published_file_changes_nothing_in_the_pool() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo = new_repo(tmp.path())?;
    let r = path(&repo);
    let (deb, _) = build(tmp.path(), "1.0.0", "")?;
    keepup(&["publish", "--repo", r, path(&deb)])?;
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.join("tracks/unstable/index.json"))?)?;
    let pooled = repo.join(
        index["packages"][0]["path"]
            .as_str()
            .context("index without a package")?,
    );
    let published = std::fs::read(&pooled)?;
    ensure!(published == std::fs::read(&deb)?);

    // Another build of the same version, copied over the operator's file (`cp` writes into
    // the same inode).
    let (other, _) = build(tmp.path(), "1.0.0", "Rebuilt ")?;
    let other = std::fs::read(other)?;
    ensure!(other != published, "the rebuild should differ");
    std::fs::write(&deb, &other)?;
    ensure!(
        std::fs::read(&pooled)? == published,
        "overwriting the operator's file changed the pool"
    );
    keepup(&["repo", "verify", "--repo", r])?;
    Ok(())
}

/// One try: the repository copied onto a tmpfs with `free` bytes left, then a publish. Returns
/// (published, verify passed, list --json afterwards) from a script run in a private mount
/// namespace.
fn publish_on_a_full_disk(
    tmp: &Path,
    repo: &Path,
    free: u64,
    files: &[&Path],
) -> Result<(bool, String)> {
    let mnt = tmp.join(format!("mnt-{free}"));
    std::fs::create_dir_all(&mnt)?;
    let k = built_bin("keepup")?;
    let files: Vec<&str> = files.iter().map(|f| path(f)).collect();
    let script = format!(
        r#"set -eu
mount -t tmpfs -o size=16m tmpfs "{mnt}"
cp -a "{repo}" "{mnt}/repo"
avail=$(df --output=avail -B1 "{mnt}" | tail -1)
fill=$((avail - {free}))
if [ "$fill" -gt 0 ]; then head -c "$fill" /dev/zero > "{mnt}/fill" || true; fi
if "{k}" publish --repo "{mnt}/repo" {files} >/dev/null 2>"{mnt}/publish.err"; then echo PUBLISHED; else echo REFUSED; fi
rm -f "{mnt}/fill"
"{k}" repo verify --repo "{mnt}/repo" >&2
"{k}" repo list --repo "{mnt}/repo" --json
echo
echo ----INDEX
cat "{mnt}/repo/tracks/unstable/index.json"
"#,
        mnt = path(&mnt),
        repo = path(repo),
        k = path(&k),
        files = files.join(" "),
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .context("running unshare (the test needs root, to mount a tmpfs)")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "with {free} bytes free: repo verify failed or the script broke:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (first, rest) = stdout.split_once('\n').unwrap_or((&stdout, ""));
    let (list, index) = rest
        .split_once("----INDEX\n")
        .context("the script printed no index")?;
    Ok((first == "PUBLISHED", contents(list, index)?))
}

/// What a track holds, without serials (a failed command may raise them): the members as
/// `repo list --json` shows them, and the packages of the published index.
fn contents(list: &str, index: &str) -> Result<String> {
    let mut list: serde_json::Value = serde_json::from_str(list)?;
    for row in list.as_array_mut().context("list --json is not an array")? {
        row.as_object_mut()
            .context("a row is not an object")?
            .remove("serial");
    }
    let index: serde_json::Value = serde_json::from_str(index)?;
    Ok(format!("{list}\n{}", index["packages"]))
}

#[test]
fn a_disk_full_during_publish_leaves_the_repository_verifying_as_before() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo = new_repo(tmp.path())?;
    let r = path(&repo);
    let (deb1, rpm1) = build(tmp.path(), "1.0.0", "")?;
    keepup(&["publish", "--repo", r, path(&deb1), path(&rpm1)])?;
    let before = contents(
        &keepup(&["repo", "list", "--repo", r, "--json"])?,
        &std::fs::read_to_string(repo.join("tracks/unstable/index.json"))?,
    )?;
    let (deb2, rpm2) = build(tmp.path(), "2.0.0", "")?;
    // From no room at all, in steps of 16 KiB, until the publish fits: each step fails at a
    // later write.
    let mut refused = 0;
    for free in (0..).map(|i| i * 16 * 1024) {
        ensure!(free < 4 << 20, "the publish never fitted");
        let (published, after) = publish_on_a_full_disk(tmp.path(), &repo, free, &[&deb2, &rpm2])?;
        if published {
            ensure!(after != before, "a successful publish changed nothing");
            break;
        }
        refused += 1;
        ensure!(
            after == before,
            "with {free} bytes free, the failed publish changed the repository:\n{after}"
        );
    }
    ensure!(
        refused > 3,
        "the disk was never full enough ({refused} refusals)"
    );
    Ok(())
}
