//! `keepup repo sync` against a real S3-compatible server (moto, see `keepup_tests::s3`):
//! the bucket is a repository that stock apt installs from and an agent follows its track
//! from, over plain HTTP like a CDN in front of it; a second sync uploads only what changed;
//! a sync killed at every stage boundary leaves readers a consistent repository and the next
//! one completes it; the secret key never reaches the bucket.
//!
//! Skipped only with `KEEPUP_SKIP_S3_TESTS=1` (or `KEEPUP_SKIP_DOCKER_TESTS=1`).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use keepup_packager::plan::Format;
use keepup_tests::agent_pkg::agent_package;
use keepup_tests::example::built_bin;
use keepup_tests::fleet::keepup;
use keepup_tests::host::{docker_or_skip, Host, TestNet};
use keepup_tests::s3::{skip_s3, S3Server};
use keepup_tests::testkit::{keepup_pack_example, shared_signing_key};
use serde_json::Value;

const BUCKET: &str = "keepup-repo";
const PREFIX: &str = "apt";

/// A moto server with a public bucket, and a new repository signed with the shared key.
struct World {
    tmp: tempfile::TempDir,
    net: TestNet,
    s3: S3Server,
    repo: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl World {
    fn new() -> Result<World> {
        let tmp = tempfile::tempdir()?;
        let net = TestNet::new()?;
        let s3 = S3Server::start(&net)?;
        s3.public_bucket(BUCKET)?;
        let repo = tmp.path().join("repo");
        let key = shared_signing_key()?;
        keepup(&[
            "repo",
            "init",
            repo.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--key-dir",
            tmp.path().join("keys").to_str().unwrap(),
        ])?;
        Ok(World {
            tmp,
            net,
            s3,
            repo,
            key,
        })
    }
}

/// `keepup repo sync` with the server's credentials and `extra` environment; returns
/// (success, the JSON summary when it succeeded, stderr).
fn sync(
    repo: &Path,
    s3: &S3Server,
    extra: &[(&str, &str)],
    grace: &str,
) -> Result<(bool, Value, String)> {
    let mut cmd = Command::new(built_bin("keepup")?);
    cmd.args([
        "repo",
        "sync",
        "--repo",
        repo.to_str().unwrap(),
        "--to",
        &format!("s3://{BUCKET}/{PREFIX}"),
        "--endpoint",
        &s3.endpoint,
        "--grace",
        grace,
        "--json",
    ]);
    for (k, v) in s3.env() {
        cmd.env(k, v);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = cmd.output().context("running keepup repo sync")?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let summary = if out.status.success() {
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("sync summary: {}", String::from_utf8_lossy(&out.stdout)))?
    } else {
        Value::Null
    };
    Ok((out.status.success(), summary, stderr))
}

fn synced(repo: &Path, s3: &S3Server, grace: &str) -> Result<Value> {
    let (ok, summary, err) = sync(repo, s3, &[], grace)?;
    ensure!(ok, "keepup repo sync failed: {err}");
    Ok(summary)
}

fn files(summary: &Value) -> Vec<String> {
    summary["files"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// No object holds a secret key, and nothing private (`.keepup/`) is in the bucket.
fn no_secret(s3: &S3Server) -> Result<()> {
    for (key, body) in s3.objects(BUCKET)? {
        ensure!(
            !key.contains(".keepup"),
            "private object in the bucket: {key}"
        );
        let text = String::from_utf8_lossy(&body);
        ensure!(
            !text.contains("PRIVATE KEY"),
            "the bucket holds a secret key in {key}"
        );
    }
    Ok(())
}

/// Every object under the prefix (but the sync record) is the repository file of that path,
/// byte for byte; with `exact`, every file of the repository is there too.
fn bucket_mirrors(s3: &S3Server, repo: &Path, exact: bool) -> Result<usize> {
    let objects = s3.objects(BUCKET)?;
    let mut n = 0;
    for (key, body) in &objects {
        let rel = key
            .strip_prefix(&format!("{PREFIX}/"))
            .with_context(|| format!("object outside the prefix: {key}"))?;
        if rel == "keepup-sync.json" {
            continue;
        }
        if !exact && !repo.join(rel).exists() {
            continue; // awaiting deletion
        }
        let local =
            std::fs::read(repo.join(rel)).with_context(|| format!("object {key} has no file"))?;
        ensure!(
            &local == body,
            "object {key} differs from the repository's file"
        );
        n += 1;
    }
    if exact {
        for p in [
            "fleet.yaml.asc",
            "dists/stable/InRelease",
            "keys/repository.asc",
        ] {
            ensure!(
                objects.contains_key(&format!("{PREFIX}/{p}")),
                "{p} missing from the bucket"
            );
        }
    }
    Ok(n)
}

/// A host whose apt reads only the repository at `base` (the bucket's HTTP URL), trusting
/// its key.
async fn apt_client(net: &TestNet, name: &str, base: &str) -> Result<Host> {
    let client = Host::start(net, name).await?;
    client
        .ok(&format!(
            "mkdir -p /etc/apt/keyrings && curl -fsS -o /etc/apt/keyrings/keepup.asc {base}keys/repository.asc \
             && rm -f /etc/apt/sources.list /etc/apt/sources.list.d/* \
             && echo 'deb [signed-by=/etc/apt/keyrings/keepup.asc] {base} stable main' > /etc/apt/sources.list.d/keepup.list"
        ))
        .await?;
    Ok(client)
}

/// apt on `client` refreshes from the bucket with no error (no hash mismatch, no bad
/// signature); returns the candidate version of foo.
async fn apt_sees(client: &Host) -> Result<String> {
    let update = client
        .ok("rm -rf /var/lib/apt/lists/* && apt-get update 2>&1")
        .await?;
    ensure!(
        !update.contains("W:") && !update.contains("E:") && !update.contains("Mismatch"),
        "apt-get update from the bucket: {update}"
    );
    let policy = client.ok("apt-cache policy foo").await?;
    let candidate = policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .with_context(|| format!("no candidate for foo: {policy}"))?;
    Ok(candidate.to_string())
}

/// One update pass of the agent on `host`; it must succeed. Returns foo's installed version.
async fn agent_pass(host: &Host) -> Result<String> {
    let pass = host.exec("keepup-agent update --now").await?;
    ensure!(
        pass.code == 0,
        "agent pass from the bucket failed: {pass:?}\n{}",
        host.ok("tail -n 40 /var/log/keepup-agent.out").await?
    );
    Ok(host
        .ok("dpkg-query -W -f='${Version}' foo 2>/dev/null || true")
        .await?
        .trim()
        .to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn repo_sync_publishes_a_repository_that_apt_and_agents_read_from_the_bucket() -> Result<()> {
    if skip_s3() || !docker_or_skip() {
        return Ok(());
    }
    let w = World::new()?;
    let (dir, net, s3, repo, key) = (w.tmp.path(), &w.net, &w.s3, &w.repo, &w.key);
    let r = repo.to_str().unwrap();
    let (deb1, rpm1) = keepup_pack_example(&dir.join("v1"), "1.0.0", Some(key), |t| t)?;
    // A pre-release: its file name has a `~`, which must stay a `~` in the object's key
    // (the bucket is checked to mirror the repository file for file below).
    let (deb0, _) = keepup_pack_example(&dir.join("v0"), "0.9.0~rc1", Some(key), |t| t)?;
    ensure!(deb0.to_string_lossy().contains('~'), "{}", deb0.display());
    keepup(&[
        "publish",
        "--repo",
        r,
        deb0.to_str().unwrap(),
        deb1.to_str().unwrap(),
        rpm1.to_str().unwrap(),
    ])?;
    keepup(&["promote", "--repo", r, "foo", "--to", "testing"])?;
    keepup(&["promote", "--repo", r, "foo", "--to", "stable"])?;
    keepup(&["assign", "--repo", r, "s3-agent", "--track", "stable"])?;
    // The secret key where old versions kept it (inside .keepup/) and a stray copy at the
    // top: neither may leave the machine.
    std::fs::copy(key, repo.join(".keepup/signing-key.asc"))?;
    std::fs::copy(key, repo.join("stray-key.asc"))?;

    // 1. The first sync uploads the repository, refusing the stray key.
    let first = synced(repo, s3, "1h")?;
    ensure!(
        first["refused"] == serde_json::json!(["stray-key.asc"]),
        "the stray key is refused and named: {first}"
    );
    let uploaded = files(&first);
    ensure!(
        uploaded.iter().any(|f| f.starts_with("pool/"))
            && uploaded.contains(&"fleet.yaml.asc".to_string()),
        "{first}"
    );
    // Stage order: the commit is the last object up, every pool file before any root.
    ensure!(
        uploaded.last().map(String::as_str) == Some("fleet.yaml.asc"),
        "{uploaded:?}"
    );
    let last_pool = uploaded
        .iter()
        .rposition(|f| f.starts_with("pool/"))
        .unwrap();
    let first_root = uploaded
        .iter()
        .position(|f| f.ends_with("InRelease"))
        .unwrap();
    ensure!(
        last_pool < first_root,
        "pool files go up before the roots: {uploaded:?}"
    );
    ensure!(
        bucket_mirrors(s3, repo, true)? == uploaded.len(),
        "the bucket holds what was uploaded"
    );
    no_secret(s3)?;
    std::fs::remove_file(repo.join("stray-key.asc"))?;

    // 2. Stock apt installs from the bucket's HTTP URL.
    let base = format!("{}/{BUCKET}/{PREFIX}/", s3.endpoint);
    let client = apt_client(net, "s3-apt", &base).await?;
    ensure!(apt_sees(&client).await? == "1.0.0-1");
    client.ok("apt-get install -y foo 2>&1").await?;
    ensure!(client.ok("dpkg-query -W -f='${Version}' foo").await? == "1.0.0-1");

    // 3. An agent follows its track from the bucket.
    let agent = Host::start(net, "s3-agent").await?;
    let pkg = agent_package(&dir.join("agent-pkg"), Format::Deb);
    agent.copy_in(&pkg, "/tmp/keepup-agent.deb").await?;
    agent.ok("dpkg -i /tmp/keepup-agent.deb >/dev/null").await?;
    agent
        .copy_in(&repo.join("keys/repository.asc"), "/etc/keepup/repo.asc")
        .await?;
    // Passes run when the test asks (`update --now`); the schedule is once a year.
    agent
        .ok(&format!(
            "cat >/etc/keepup/agent.yaml <<'EOF'\nrepo: {base}\ntrusted_key: /etc/keepup/repo.asc\n\
             schedule: \"0 0 1 1 *\"\nstagger: 1s\npackage_timeout: 60s\npackage_format: deb\n\
             allow_plain_http: true\nEOF\n\
             setsid /usr/sbin/keepup-agent run >>/var/log/keepup-agent.out 2>&1 </dev/null &"
        ))
        .await?;
    keepup_tests::fleet::wait_for("the agent to answer", Duration::from_secs(30), || async {
        Ok(agent.exec("keepup-agent status").await?.code == 0)
    })
    .await?;
    ensure!(agent_pass(&agent).await? == "1.0.0-1");

    // 4. A second sync after a promote uploads only what changed: no pool file (the same
    // bytes), only the views of the track promoted into and the policy.
    let (deb2, rpm2) = keepup_pack_example(&dir.join("v2"), "1.1.0", Some(key), |t| t)?;
    keepup(&[
        "publish",
        "--repo",
        r,
        deb2.to_str().unwrap(),
        rpm2.to_str().unwrap(),
    ])?;
    synced(repo, s3, "1h")?;
    keepup(&["promote", "--repo", r, "foo", "1.1.0-1", "--to", "testing"])?;
    let second = synced(repo, s3, "1h")?;
    let changed = files(&second);
    ensure!(!changed.is_empty(), "{second}");
    for f in &changed {
        ensure!(
            f.starts_with("dists/testing/")
                || f.starts_with("rpm/testing/")
                || f.starts_with("tracks/testing/")
                || f.starts_with("fleet.yaml"),
            "a sync after promoting into testing uploaded {f}: {second}"
        );
    }
    ensure!(
        second["unchanged"].as_u64().unwrap_or(0) > changed.len() as u64,
        "{second}"
    );
    let again = synced(repo, s3, "1h")?;
    ensure!(
        files(&again).is_empty(),
        "nothing changed, nothing uploaded: {again}"
    );

    // 5. A sync killed at each stage boundary (SIGKILL, as a crash or `kill -9` leaves it):
    // apt and the agent read a consistent repository each time (old or new, never torn), and
    // the next sync completes it.
    keepup(&["promote", "--repo", r, "foo", "1.1.0-1", "--to", "stable"])?;
    for step in ["sync-content", "sync-indexes", "sync-first-root"] {
        let (ok, _, err) = sync(repo, s3, &[("KEEPUP_CRASH_AT", step)], "1h")?;
        ensure!(!ok, "the sync should have been killed at {step}: {err}");
        let candidate = apt_sees(&client)
            .await
            .with_context(|| format!("apt after a sync killed at {step}"))?;
        ensure!(
            ["1.0.0-1", "1.1.0-1"].contains(&candidate.as_str()),
            "{step}: {candidate}"
        );
        let installed = agent_pass(&agent)
            .await
            .with_context(|| format!("agent after a sync killed at {step}"))?;
        ensure!(
            installed == "1.0.0-1",
            "{step}: the agent's commit is not up yet, it keeps 1.0.0-1: {installed}"
        );
        no_secret(s3)?;
    }
    let done = synced(repo, s3, "1h")?;
    ensure!(
        files(&done).iter().all(|f| !f.starts_with("pool/")),
        "what the killed syncs uploaded is not sent again: {done}"
    );
    ensure!(apt_sees(&client).await? == "1.1.0-1");
    client.ok("apt-get install -y foo 2>&1").await?;
    ensure!(client.ok("dpkg-query -W -f='${Version}' foo").await? == "1.1.0-1");
    ensure!(
        agent_pass(&agent).await? == "1.1.0-1",
        "the agent follows stable from the bucket"
    );

    // 6. Deletions wait for the grace period: with it over, the bucket is the repository.
    bucket_mirrors(s3, repo, false)?;
    let purge = synced(repo, s3, "0s")?;
    ensure!(purge["pending_deletion"] == 0, "{purge}");
    bucket_mirrors(s3, repo, true)?;
    ensure!(apt_sees(&client).await? == "1.1.0-1");
    no_secret(s3)?;
    Ok(())
}

/// A pool file over 16 MiB goes up as a multipart upload (5 MiB parts): the object reads back
/// byte for byte, stock apt installs the package from the bucket (its SHA-256 is checked
/// against the signed index), and the next sync skips it (a multipart ETag is no MD5: the
/// recorded one is compared).
#[tokio::test(flavor = "multi_thread")]
async fn a_package_over_16_mib_goes_up_in_parts_and_installs_from_the_bucket() -> Result<()> {
    if skip_s3() || !docker_or_skip() {
        return Ok(());
    }
    let w = World::new()?;
    let (dir, net, s3, repo) = (w.tmp.path(), &w.net, &w.s3, &w.repo);
    let r = repo.to_str().unwrap();
    // 20 MiB that no compressor shrinks, packed uncompressed (a debug build's xz would take
    // minutes): the .deb is over the 16 MiB multipart threshold.
    let src = dir.join("spec");
    std::fs::create_dir_all(&src)?;
    let mut blob = vec![0u8; 20 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in blob.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(src.join("blob"), &blob)?;
    let examples = keepup_tests::workspace_root().join("docs/examples");
    std::fs::copy(examples.join("foo.conf"), src.join("foo.conf"))?;
    let spec = std::fs::read_to_string(examples.join("foo.yaml"))?
        .replace(
            "../../target/release/food",
            &built_bin("food")?.to_string_lossy(),
        )
        .replace(
            "files:\n",
            "files:\n  - src: blob\n    dst: /usr/share/foo/blob\n",
        );
    std::fs::write(src.join("foo.yaml"), spec)?;
    let dist = dir.join("dist");
    keepup(&[
        "pack",
        src.join("foo.yaml").to_str().unwrap(),
        "--out",
        dist.to_str().unwrap(),
        "--format",
        "deb",
        "--compression",
        "none",
    ])?;
    let deb = dist.join("foo_1.0.0-1_amd64.deb");
    let size = std::fs::metadata(&deb)?.len();
    ensure!(size > 16 << 20, "the .deb is only {size} bytes");
    keepup(&["publish", "--repo", r, deb.to_str().unwrap()])?;
    keepup(&["promote", "--repo", r, "foo", "--to", "testing"])?;
    keepup(&["promote", "--repo", r, "foo", "--to", "stable"])?;

    let first = synced(repo, s3, "1h")?;
    let pool = files(&first)
        .into_iter()
        .find(|f| f.starts_with("pool/") && f.ends_with(".deb"))
        .with_context(|| format!("the .deb was not uploaded: {first}"))?;
    bucket_mirrors(s3, repo, true)?;
    let again = synced(repo, s3, "1h")?;
    ensure!(
        files(&again).is_empty(),
        "the multipart object {pool} is sent again: {again}"
    );

    let base = format!("{}/{BUCKET}/{PREFIX}/", s3.endpoint);
    let client = apt_client(net, "s3-big", &base).await?;
    ensure!(apt_sees(&client).await? == "1.0.0-1");
    let install = client.ok("apt-get install -y foo 2>&1").await?;
    ensure!(!install.contains("Hash Sum mismatch"), "{install}");
    let blob_sum = client.ok("sha256sum /usr/share/foo/blob").await?;
    ensure!(
        blob_sum.starts_with(&sha256_of(&blob)),
        "the installed blob differs: {blob_sum}"
    );
    Ok(())
}

/// Hex SHA-256 of `data`.
fn sha256_of(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
