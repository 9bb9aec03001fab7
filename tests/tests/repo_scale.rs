//! The repository at scale, for correctness (speed is `tests/bench/repo.sh`): 2,000 packages
//! made by `tests/bench/gendebs.py`, published and promoted through the real `keepup`. The
//! views built incrementally (each command re-rendering only the chunks it changed) are the
//! same bytes as a full rebuild from an empty cache; 100 random stanzas agree field by field
//! with apt-ftparchive; apt's own reader and a stock `apt-get update` take the multi-member
//! Packages.gz.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use keepup_tests::fleet::keepup;
use keepup_tests::testkit::{shared_signing_key, stanza_fields};

/// Packages generated.
const N: usize = 2000;

/// Fail with what to install when a tool the test compares with is missing.
fn need(tools: &[&str]) -> Result<()> {
    for t in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success());
        ensure!(
            found,
            "this test needs {t}: run `bash tests/run.sh`, or `apt-get install apt-utils python3`"
        );
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// `python3 tests/bench/gendebs.py OUT N ARGS...`; returns the files made, sorted.
fn gendebs(out: &Path, n: usize, args: &[&str]) -> Result<Vec<PathBuf>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/gendebs.py");
    run(Command::new("python3")
        .arg(script)
        .arg(out)
        .arg(n.to_string())
        .args(args))?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(out)?
        .map(|f| f.map(|f| f.path()))
        .collect::<std::io::Result<_>>()?;
    files.sort();
    Ok(files)
}

/// `keepup ARGS... FILES...`.
fn keepup_files(args: &[&str], files: &[PathBuf]) -> Result<String> {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(files.iter().map(|f| f.to_str().unwrap()));
    keepup(&all)
}

/// Every APT index file of every track: (track/file, bytes).
fn apt_files(repo: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for track in ["unstable", "testing", "stable"] {
        for arch in ["amd64", "arm64"] {
            // Packages.gz only: the uncompressed Packages is listed in the Release, not
            // published.
            let rel = format!("dists/{track}/main/binary-{arch}/Packages.gz");
            out.insert(rel.clone(), std::fs::read(repo.join(&rel))?);
            let plain = repo.join(format!("dists/{track}/main/binary-{arch}/Packages"));
            ensure!(!plain.exists(), "{} is published", plain.display());
        }
    }
    Ok(out)
}

/// The stanzas of a Packages file, each as its fields (continuation lines joined).
fn stanzas(text: &str) -> Vec<BTreeMap<String, String>> {
    text.split("\n\n")
        .filter(|s| !s.trim().is_empty())
        .map(stanza_fields)
        .collect()
}

#[test]
fn incremental_views_match_a_full_rebuild_apt_ftparchive_and_apt() -> Result<()> {
    need(&["python3", "apt-ftparchive", "apt-get", "apt-cache"])?;
    let apt_helper = Path::new("/usr/lib/apt/apt-helper");
    ensure!(
        apt_helper.exists(),
        "this test reads Packages.gz with apt's own reader, {}: install apt",
        apt_helper.display()
    );
    let tmp = tempfile::tempdir()?;
    let debs = gendebs(&tmp.path().join("debs"), N, &[])?;
    let newer = gendebs(
        &tmp.path().join("newer"),
        3,
        &["--start", "1500", "--width", "4", "--version", "1.1-1"],
    )?;
    ensure!(debs.len() == N && newer.len() == 3);

    let repo = tmp.path().join("repo");
    let r = repo.to_str().unwrap();
    let key = shared_signing_key()?;
    keepup(&[
        "repo",
        "init",
        r,
        "--key",
        key.to_str().unwrap(),
        "--key-dir",
        tmp.path().join("keys").to_str().unwrap(),
    ])?;
    // unstable: all; testing: the first half at once, then five promotions one by one;
    // then newer versions of three names, one of them promoted.
    keepup_files(&["publish", "--repo", r], &debs)?;
    keepup_files(
        &["publish", "--repo", r, "--track", "testing"],
        &debs[..N / 2],
    )?;
    for i in [1200, 1001, 1999, 1450, 1600] {
        keepup(&[
            "promote",
            "--repo",
            r,
            &format!("gpkg{i:04}"),
            "--to",
            "testing",
        ])?;
    }
    keepup_files(&["publish", "--repo", r], &newer)?;
    keepup(&["promote", "--repo", r, "gpkg1501", "--to", "testing"])?;
    let cache = repo.join(".keepup/cache/unstable");
    let chunks = std::fs::read_dir(&cache)?.count();
    ensure!(
        (N / 128..N / 32).contains(&chunks),
        "{chunks} cached chunks for {N} packages in unstable, expected about {}",
        N / 64
    );
    let incremental = apt_files(&repo)?;

    // A full rebuild from an empty cache (`--fresh` drops it) writes the same bytes. A
    // marker in the cache shows it was dropped, not reused.
    let marker = repo.join(".keepup/cache/marker");
    std::fs::write(&marker, "")?;
    keepup(&["repo", "reindex", "--fresh", "--repo", r])?;
    ensure!(!marker.exists(), "reindex --fresh kept the cache");
    let full = apt_files(&repo)?;
    for (f, bytes) in &incremental {
        ensure!(
            full.get(f) == Some(bytes),
            "{f} differs between the incremental views and a full rebuild"
        );
    }
    keepup(&["repo", "verify", "--repo", r])?;

    let dir = repo.join("dists/unstable/main/binary-amd64");
    let packages = String::from_utf8(run(Command::new("python3")
        .arg("-c")
        .arg("import gzip, sys\nsys.stdout.buffer.write(gzip.decompress(open(sys.argv[1], 'rb').read()))")
        .arg(dir.join("Packages.gz")))?)?;
    let release = std::fs::read_to_string(repo.join("dists/unstable/Release"))?;
    ensure!(
        release.contains("main/binary-amd64/Packages.gz\n")
            && release.contains(&format!(
                " {} {:>16} main/binary-amd64/Packages\n",
                <sha2::Sha256 as sha2::Digest>::digest(packages.as_bytes())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>(),
                packages.len()
            ))
            && !release.contains("MD5Sum:"),
        "the Release lists Packages.gz and what it decompresses to, by SHA256 alone:\n{release}"
    );
    // Packages.gz is several gzip members (one per chunk); apt's reader takes them all.
    let members = run(Command::new("python3").arg("-c").arg(
        "import sys, zlib\nb = open(sys.argv[1], 'rb').read()\nn = 0\nwhile b:\n    d = zlib.decompressobj(31)\n    d.decompress(b)\n    b = d.unused_data\n    n += 1\nprint(n)",
    ).arg(dir.join("Packages.gz")))?;
    let members: usize = String::from_utf8(members)?.trim().parse()?;
    ensure!(members > 10, "Packages.gz has {members} gzip members");
    let by_apt = run(Command::new(apt_helper)
        .arg("cat-file")
        .arg(dir.join("Packages.gz")))?;
    ensure!(
        by_apt == packages.as_bytes(),
        "apt-helper cat-file reads Packages.gz as {} bytes, Python's gzip as {}",
        by_apt.len(),
        packages.len()
    );

    // 100 random stanzas against apt-ftparchive's for the same files (SHA1 left out on
    // purpose: apt no longer trusts it).
    let theirs = run(Command::new("apt-ftparchive")
        .args(["packages", "pool/main"])
        .current_dir(&repo))?;
    let theirs: BTreeMap<(String, String), BTreeMap<String, String>> =
        stanzas(&String::from_utf8(theirs)?)
            .into_iter()
            .map(|s| ((s["Package"].clone(), s["Version"].clone()), s))
            .collect();
    let ours = stanzas(&packages);
    ensure!(ours.len() == N + 3, "{} stanzas in unstable", ours.len());
    ensure!(
        theirs.len() == N + 3,
        "apt-ftparchive found {}",
        theirs.len()
    );
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..100 {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let ours = &ours[(seed >> 33) as usize % ours.len()];
        let key = (ours["Package"].clone(), ours["Version"].clone());
        let theirs = theirs
            .get(&key)
            .with_context(|| format!("{key:?} not in apt-ftparchive's"))?;
        let mut theirs = theirs.clone();
        theirs.remove("SHA1");
        ensure!(
            &theirs == ours,
            "{key:?}: apt-ftparchive\n{theirs:#?}\nkeepup\n{ours:#?}"
        );
    }

    // Stock apt-get update takes the signed track, and apt-cache finds a package in it.
    let apt = tmp.path().join("apt");
    for d in ["state/lists/partial", "cache/archives/partial", "etc"] {
        std::fs::create_dir_all(apt.join(d))?;
    }
    std::fs::write(apt.join("status"), "")?;
    std::fs::write(
        apt.join("etc/sources.list"),
        format!(
            "deb [signed-by={}] file:{} testing main\n",
            repo.join("keys/repository.gpg").display(),
            repo.display()
        ),
    )?;
    let opts = |cmd: &mut Command| {
        let a = apt.display();
        for o in [
            format!("Dir::Etc::SourceList={a}/etc/sources.list"),
            format!("Dir::Etc::SourceParts={a}/etc/none"),
            format!("Dir::Etc::Preferences={a}/etc/none"),
            format!("Dir::Etc::PreferencesParts={a}/etc/none"),
            format!("Dir::State={a}/state"),
            format!("Dir::State::status={a}/status"),
            format!("Dir::Cache={a}/cache"),
            "Debug::NoLocking=1".into(),
            "APT::Sandbox::User=root".into(),
            "APT::Architecture=amd64".into(),
            "Acquire::Languages=none".into(),
        ] {
            cmd.arg("-o").arg(o);
        }
    };
    let mut update = Command::new("apt-get");
    opts(&mut update);
    let out = run(update.args(["-q", "update"]))?;
    let out = String::from_utf8_lossy(&out);
    ensure!(
        !out.contains("Err:") && !out.contains("W:"),
        "apt-get update:\n{out}"
    );
    let mut show = Command::new("apt-cache");
    opts(&mut show);
    let shown = String::from_utf8(run(show.args(["show", "gpkg1501"]))?)?;
    ensure!(
        shown.contains("Version: 1.1-1\n") && !shown.contains("Version: 1.0-1\n"),
        "apt-cache show gpkg1501 (testing has 1.1-1 only, the version promoted):\n{shown}"
    );
    Ok(())
}
