//! The repository (`keepup repo`, `publish`, `promote`, `rollback`, fleet policy, `serve`)
//! driven through the real `keepup` binary, and checked with real clients: stock apt-get and
//! dnf on Debian 12 hosts fetch from `keepup serve` running on another host, verify the
//! signatures and refuse tampered indexes; curl probes the server for paths outside the root.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use keepup_tests::example::built_bin;
use keepup_tests::fleet::{keepup, keepup_output};
use keepup_tests::host::{docker_or_skip, Host, TestNet};
use keepup_tests::testkit::{keepup_pack_example, key_in, shared_signing_key, stanza_fields};

/// Run `keepup ARGS` and require failure; returns stderr.
fn keepup_fails(args: &[&str]) -> Result<String> {
    let (ok, out, err) = keepup_output(args)?;
    ensure!(!ok, "keepup {args:?} should have failed:\n{out}");
    Ok(err)
}

/// A fresh repository in `dir/repo` signed with the shared key (kept in `dir/keys`).
fn new_repo(dir: &Path) -> Result<PathBuf> {
    let repo = dir.join("repo");
    let key = shared_signing_key()?;
    let out = keepup(&[
        "repo",
        "init",
        repo.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--key-dir",
        dir.join("keys").to_str().unwrap(),
    ])?;
    ensure!(
        out.contains("signed-by="),
        "init prints the apt line:\n{out}"
    );
    ensure!(
        out.contains(&format!("secret key (kept outside the repository, mode 0600; back it up offline; sign rpms with `keepup pack --sign-key`): {}", key_in(&dir.join("keys"))?.display())),
        "init says where the secret key is:\n{out}"
    );
    Ok(repo)
}

/// Build the example service at `version` with `keepup pack`, the rpm signed with `key`
/// (None: unsigned); `edit` is put in the summary, so builds can differ. Returns (deb, rpm).
fn build(out: &Path, version: &str, key: Option<&Path>, edit: &str) -> Result<(PathBuf, PathBuf)> {
    keepup_pack_example(
        &out.join(format!("spec-{version}{edit}")),
        version,
        key,
        |t| t.replace("summary: Example", &format!("summary: {edit}Example")),
    )
}

fn list_json(repo: &Path) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&keepup(&[
        "repo",
        "list",
        "--repo",
        repo.to_str().unwrap(),
        "--json",
    ])?)?)
}

fn index(repo: &Path, track: &str) -> Result<serde_json::Value> {
    Ok(serde_json::from_slice(&std::fs::read(
        repo.join(format!("tracks/{track}/index.json")),
    )?)?)
}

/// The index entry of `format` in `track`.
fn entry(repo: &Path, track: &str, format: &str) -> Result<serde_json::Value> {
    index(repo, track)?["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["format"] == format)
        .cloned()
        .with_context(|| format!("{track} has no {format}"))
}

#[test]
fn publish_promote_rollback_and_refusals() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo = new_repo(tmp.path())?;
    let r = repo.to_str().unwrap();
    let key = shared_signing_key()?;
    let (deb1, rpm1) = build(tmp.path(), "1.0.0", Some(&key), "")?;
    let (deb2, rpm2) = build(tmp.path(), "1.1.0", Some(&key), "")?;
    keepup(&[
        "publish",
        "--repo",
        r,
        deb1.to_str().unwrap(),
        rpm1.to_str().unwrap(),
    ])?;
    keepup(&[
        "publish",
        "--repo",
        r,
        deb2.to_str().unwrap(),
        rpm2.to_str().unwrap(),
    ])?;

    // Promotion moves exactly one version, with the bytes unstable has.
    keepup(&["promote", "--repo", r, "foo", "1.0.0", "--to", "testing"])?;
    let testing = index(&repo, "testing")?;
    let pkgs = testing["packages"].as_array().unwrap();
    ensure!(pkgs.len() == 2, "one deb and one rpm in testing: {testing}");
    for p in pkgs {
        ensure!(p["version"] == "1.0.0-1", "{p}");
        let file = std::fs::read(repo.join(p["path"].as_str().unwrap()))?;
        let original = std::fs::read(if p["format"] == "deb" { &deb1 } else { &rpm1 })?;
        ensure!(file == original, "{} is not the published bytes", p["path"]);
    }
    let serial = testing["serial"].as_u64().unwrap();
    keepup(&["promote", "--repo", r, "foo", "--to", "testing"])?;
    ensure!(entry(&repo, "testing", "deb")?["version"] == "1.1.0-1");
    ensure!(index(&repo, "testing")?["serial"].as_u64().unwrap() > serial);
    ensure!(
        entry(&repo, "testing", "deb")?["sha256"] == entry(&repo, "unstable", "deb")?["sha256"]
    );
    // stable is untouched by a promotion into testing.
    ensure!(index(&repo, "stable")?["packages"]
        .as_array()
        .unwrap()
        .is_empty());
    // Going down is not a promotion.
    keepup(&["promote", "--repo", r, "foo", "--to", "stable"])?;
    let err = keepup_fails(&["promote", "--repo", r, "foo", "1.0.0", "--to", "stable"])?;
    ensure!(err.contains("keepup rollback"), "{err}");

    // Refusals leave the repository as it was.
    let before = list_json(&repo)?;
    let garbage = tmp.path().join("garbage.deb");
    std::fs::write(&garbage, b"this is not a package")?;
    let err = keepup_fails(&["publish", "--repo", r, garbage.to_str().unwrap()])?;
    ensure!(err.contains("neither a .deb nor an .rpm"), "{err}");
    let corrupt = tmp.path().join("corrupt.deb");
    let mut bytes = std::fs::read(&deb2)?;
    let n = bytes.len();
    bytes[n - 2000..n - 1990].copy_from_slice(b"XXXXXXXXXX");
    std::fs::write(&corrupt, &bytes)?;
    let err = keepup_fails(&["publish", "--repo", r, corrupt.to_str().unwrap()])?;
    ensure!(err.contains("not a valid .deb"), "{err}");
    let (_, unsigned) = build(tmp.path(), "1.2.0", None, "")?;
    let err = keepup_fails(&["publish", "--repo", r, unsigned.to_str().unwrap()])?;
    ensure!(err.contains("not signed by this repository's key"), "{err}");
    let tampered = tmp.path().join("tampered.rpm");
    let mut bytes = std::fs::read(&rpm2)?;
    let n = bytes.len();
    bytes[n - 100] ^= 0xff;
    std::fs::write(&tampered, &bytes)?;
    let err = keepup_fails(&["publish", "--repo", r, tampered.to_str().unwrap()])?;
    ensure!(
        err.contains("corrupt") || err.contains("not signed"),
        "{err}"
    );
    let (dup_deb, _) = build(tmp.path(), "1.0.0", Some(&key), "Changed ")?;
    let err = keepup_fails(&["publish", "--repo", r, dup_deb.to_str().unwrap()])?;
    ensure!(
        err.contains("already in the pool with different contents"),
        "{err}"
    );
    // A batch with one bad file publishes nothing.
    let (deb3, _) = build(tmp.path(), "1.3.0", Some(&key), "")?;
    keepup_fails(&[
        "publish",
        "--repo",
        r,
        deb3.to_str().unwrap(),
        garbage.to_str().unwrap(),
    ])?;
    ensure!(
        list_json(&repo)? == before,
        "a failed command changed the repository"
    );
    ensure!(!repo.join("pool/main/f/foo/foo_1.3.0-1_amd64.deb").exists());
    keepup(&["repo", "verify", "--repo", r])?;
    // Publishing the same bytes again is harmless.
    keepup(&["publish", "--repo", r, deb1.to_str().unwrap()])?;

    // Rollback: testing's current is 1.1.0-1; bring back 1.0.0's contents, newer.
    keepup(&[
        "rollback", "--repo", r, "foo", "--to", "1.0.0", "--track", "testing",
    ])?;
    let deb = entry(&repo, "testing", "deb")?;
    let rpm = entry(&repo, "testing", "rpm")?;
    for e in [&deb, &rpm] {
        ensure!(e["version"] == "1.1.0+rb1-1", "{e}");
        ensure!(e["rollback_of"] == "1.0.0-1", "{e}");
    }
    let status = Command::new("dpkg")
        .args(["--compare-versions", "1.1.0+rb1-1", "gt", "1.1.0-1"])
        .status()?;
    ensure!(status.success(), "dpkg ranks the rollback lower");
    // rpm's own comparison (rpmvercmp through rpm's Lua).
    let cmp = Command::new("rpm")
        .arg("--eval")
        .arg("%{lua: print(rpm.vercmp('1.1.0+rb1-1', '1.1.0-1'))}")
        .output()?;
    ensure!(
        String::from_utf8_lossy(&cmp.stdout).trim() == "1",
        "rpm ranks the rollback lower: {:?}",
        cmp
    );
    // Same payload as 1.0.0 (dpkg-deb and rpm2cpio-free: compare the data member's files).
    let rb = repo.join(deb["path"].as_str().unwrap());
    let a = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(&rb)
        .output()?;
    let b = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(&deb1)
        .output()?;
    ensure!(
        a.status.success() && a.stdout == b.stdout,
        "rollback payload differs from 1.0.0"
    );
    let list = keepup(&["repo", "list", "--repo", r, "--track", "testing"])?;
    ensure!(list.contains("rollback of 1.0.0-1"), "{list}");
    // A second rollback climbs again.
    keepup(&[
        "rollback", "--repo", r, "foo", "--to", "1.0.0", "--track", "testing",
    ])?;
    ensure!(entry(&repo, "testing", "rpm")?["version"] == "1.1.0+rb2-1");
    keepup(&["repo", "verify", "--repo", r])?;

    // testing has had five different contents (empty, 1.0.0, 1.1.0, rb1, rb2): files of old
    // generations stay for the grace period (an hour) even beyond the three generations kept
    // (by-hash: Packages.gz; repodata: primary, filelists, other), so all five are here; the
    // pruning itself is the unit test in deploy/src/repo/views.rs.
    let count = |dir: &str| -> Result<usize> {
        Ok(std::fs::read_dir(repo.join(dir))?
            .filter(|f| {
                f.as_ref()
                    .is_ok_and(|f| !f.file_name().to_string_lossy().starts_with("repomd.xml"))
            })
            .count())
    };
    let by_hash = count("dists/testing/main/binary-amd64/by-hash/SHA256")?;
    ensure!(
        by_hash == 5,
        "{by_hash} by-hash files, expected 5 generations of Packages.gz (all inside the grace period)"
    );
    let repodata = count("rpm/testing/repodata")?;
    ensure!(
        repodata == 15,
        "{repodata} repodata files, expected 5 generations x 3 (all inside the grace period)"
    );

    // Tampering is found by verify.
    // (Packages.gz is a hard link to its by-hash file: replaced, not edited in place.)
    let packages = repo.join("dists/testing/main/binary-amd64/Packages.gz");
    let text = gunzip(&packages)?;
    let evil = text.replace("Maintainer:", "Maintainer: x");
    ensure!(
        evil != text,
        "no Maintainer field in {}",
        packages.display()
    );
    let plain = tmp.path().join("evil-Packages");
    std::fs::write(&plain, evil)?;
    std::fs::remove_file(&packages)?;
    let gz = Command::new("gzip").arg("-c").arg(&plain).output()?;
    ensure!(gz.status.success(), "gzip -c {}", plain.display());
    std::fs::write(&packages, gz.stdout)?;
    let err = keepup_fails(&["repo", "verify", "--repo", r])?;
    ensure!(err.contains("Packages"), "{err}");
    keepup(&["repo", "reindex", "--repo", r])?;
    keepup(&["repo", "verify", "--repo", r])?;
    Ok(())
}

#[test]
fn fleet_policy_is_signed_and_shown() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo = new_repo(tmp.path())?;
    let r = repo.to_str().unwrap();
    keepup(&[
        "assign",
        "--repo",
        r,
        "web*",
        "--track",
        "stable",
        "--services",
        "foo,bar",
    ])?;
    keepup(&["assign", "--repo", r, "*", "--track", "testing"])?;
    keepup(&["quarantine", "--repo", r, "foo", "--hosts", "web3"])?;
    let err = keepup_fails(&["assign", "--repo", r, "db*", "--track", "nope"])?;
    ensure!(err.contains("no track"), "{err}");
    let show = keepup(&["fleet", "show", "--repo", r])?;
    ensure!(
        show.contains("web*") && show.contains("foo,bar") && show.contains("web3"),
        "{show}"
    );
    let host: serde_json::Value = serde_json::from_str(&keepup(&[
        "fleet", "show", "--repo", r, "--host", "web3", "--json",
    ])?)?;
    ensure!(
        host["track"] == "stable" && host["quarantined"][0] == "foo",
        "{host}"
    );
    let yaml = std::fs::read_to_string(repo.join("fleet.yaml"))?;
    ensure!(yaml.contains("serial: 3"), "{yaml}");
    keepup(&["repo", "verify", "--repo", r])?;
    keepup(&["unquarantine", "--repo", r, "foo"])?;
    keepup_fails(&["unquarantine", "--repo", r, "foo"])?;
    // A hand edit breaks the signature.
    std::fs::write(repo.join("fleet.yaml"), yaml.replace("stable", "unstable"))?;
    let err = keepup_fails(&["repo", "verify", "--repo", r])?;
    ensure!(err.contains("fleet.yaml"), "{err}");
    Ok(())
}

/// A repository host running `keepup serve` on port 8080 with `foo` 1.0.0 in stable, and a
/// client host.
async fn served_repo(net: &TestNet, tmp: &Path) -> Result<(Host, Host)> {
    let repo = new_repo(tmp)?;
    let r = repo.to_str().unwrap();
    let key = shared_signing_key()?;
    let (deb, rpm) = build(tmp, "1.0.0", Some(&key), "")?;
    keepup(&[
        "publish",
        "--repo",
        r,
        deb.to_str().unwrap(),
        rpm.to_str().unwrap(),
    ])?;
    keepup(&["promote", "--repo", r, "foo", "--to", "testing"])?;
    keepup(&["promote", "--repo", r, "foo", "--to", "stable"])?;
    let (server, client) = tokio::try_join!(Host::start(net, "repo"), Host::start(net, "client"))?;
    server
        .copy_in(&built_bin("keepup")?, "/usr/local/bin/keepup")
        .await?;
    server.copy_in(&repo, "/srv/repo").await?;
    // The repository records where its secret key is: the same path on the server.
    let secret = key_in(&tmp.join("keys"))?;
    server.copy_in(&secret, secret.to_str().unwrap()).await?;
    server
        .ok("setsid keepup serve --repo /srv/repo --listen 0.0.0.0:8080 >/tmp/serve.log 2>&1 </dev/null &")
        .await?;
    for _ in 0..50 {
        if client
            .exec("curl -fsS http://repo:8080/keys/repository.asc >/dev/null")
            .await?
            .code
            == 0
        {
            return Ok((server, client));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    bail!(
        "keepup serve did not answer:\n{}",
        server.ok("cat /tmp/serve.log").await?
    )
}

#[tokio::test]
async fn stock_apt_installs_from_keepup_serve_and_refuses_tampering() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let net = TestNet::new()?;
    let (server, client) = served_repo(&net, tmp.path()).await?;
    client
        .ok("mkdir -p /etc/apt/keyrings && curl -fsS -o /etc/apt/keyrings/keepup.asc http://repo:8080/keys/repository.asc \
             && rm -f /etc/apt/sources.list /etc/apt/sources.list.d/* \
             && echo 'deb [signed-by=/etc/apt/keyrings/keepup.asc] http://repo:8080/ stable main' > /etc/apt/sources.list.d/keepup.list")
        .await?;
    let update = client.ok("apt-get update 2>&1").await?;
    ensure!(!update.contains("W:") && !update.contains("E:"), "{update}");
    client.ok("apt-get install -y foo 2>&1").await?;
    let v = client.ok("dpkg-query -W -f='${Version}' foo").await?;
    ensure!(v == "1.0.0-1", "installed {v}");

    // A tampered Packages (Release unchanged) is refused: hash mismatch.
    server
        .ok("cd /srv/repo/dists/stable/main/binary-amd64 && zcat Packages.gz | sed 's/^Description: .*/Description: evil/' > /tmp/P \
             && gzip -c /tmp/P > /tmp/P.gz && for f in Packages.gz by-hash/SHA256/*; do rm -f $f && cp /tmp/P.gz $f; done")
        .await?;
    let out = client
        .exec("rm -rf /var/lib/apt/lists/* && apt-get update 2>&1")
        .await?;
    ensure!(
        out.code != 0 || out.stdout.contains("E:") || out.stdout.contains("Hash Sum mismatch"),
        "apt accepted a tampered Packages:\n{}",
        out.stdout
    );
    ensure!(
        client
            .exec("apt-cache show foo 2>&1 | grep -c evil")
            .await?
            .stdout
            .trim()
            == "0",
        "apt used the tampered Packages"
    );
    // A tampered Release/InRelease is refused: bad signature.
    server
        .ok(
            "keepup repo reindex --repo /srv/repo && cd /srv/repo/dists/stable \
             && sed -i 's/^Label: keepup/Label: evil/' InRelease Release",
        )
        .await?;
    let out = client
        .exec("rm -rf /var/lib/apt/lists/* && apt-get update 2>&1")
        .await?;
    ensure!(
        out.code != 0
            || out.stdout.contains("NO_PUBKEY")
            || out.stdout.contains("not signed")
            || out.stdout.contains("BADSIG")
            || out.stdout.contains("E:"),
        "apt accepted a tampered Release:\n{}",
        out.stdout
    );
    ensure!(
        client
            .exec("apt-cache policy foo | grep -c repo:8080")
            .await?
            .stdout
            .trim()
            == "0",
        "apt still lists foo from a tampered Release"
    );
    // Reindexing restores a good view; apt is happy again.
    server
        .ok("keepup repo reindex --repo /srv/repo && keepup repo verify --repo /srv/repo")
        .await?;
    let update = client
        .ok("rm -rf /var/lib/apt/lists/* && apt-get update 2>&1")
        .await?;
    ensure!(!update.contains("E:"), "{update}");
    Ok(())
}

/// Issue 11, key rotation for hosts on stock apt: they trust the key in the repository's
/// keyring package (`keepup repo keyring`). `rotate-key` publishes a new version holding both
/// keys; during the overlap apt accepts the doubly signed InRelease whichever key it has. A
/// host that upgrades the package keeps updating after the overlap, when only the new key
/// signs; one that did not is refused.
#[tokio::test]
async fn apt_hosts_follow_a_key_rotation_by_upgrading_the_keyring_package() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let net = TestNet::new()?;
    let (server, client) = served_repo(&net, tmp.path()).await?;
    let late = Host::start(&net, "late").await?;
    server
        .ok("keepup repo keyring --repo /srv/repo --name kp")
        .await?;
    let keyring = "/usr/share/keyrings/kp-archive-keyring.gpg";
    let update = "rm -rf /var/lib/apt/lists/* && apt-get update 2>&1";
    for h in [&client, &late] {
        h.ok(&format!(
            "curl -fsS -o {keyring} http://repo:8080/keys/repository.gpg \
             && rm -f /etc/apt/sources.list /etc/apt/sources.list.d/* \
             && echo 'deb [signed-by={keyring}] http://repo:8080/ stable main' \
                > /etc/apt/sources.list.d/kp.list \
             && {update} && apt-get install -y kp-archive-keyring 2>&1"
        ))
        .await?;
    }

    server
        .ok("keepup repo rotate-key --repo /srv/repo --overlap 20s")
        .await?;
    let rotated = std::time::Instant::now();
    // Signatures in InRelease (gpg lists each, even by a key it does not have).
    let signatures =
        "gpg --verify /srv/repo/dists/stable/InRelease 2>&1 | grep -c 'Signature made'";
    let packets = server.ok(signatures).await?;
    ensure!(
        packets.trim() == "2",
        "InRelease during the overlap: {packets} signatures"
    );
    // During the overlap: both hosts accept the doubly signed InRelease; `client` upgrades
    // the keyring package, which now holds both keys.
    for h in [&client, &late] {
        let out = h.ok(update).await?;
        ensure!(!out.contains("W:") && !out.contains("E:"), "{out}");
    }
    client
        .ok("apt-get install -y --only-upgrade kp-archive-keyring 2>&1")
        .await?;
    let sha = |path: &str| format!("sha256sum {path} | cut -d' ' -f1");
    ensure!(
        client.ok(&sha(keyring)).await? == server.ok(&sha("/srv/repo/keys/repository.gpg")).await?,
        "the upgraded keyring package does not hold the repository's two keys"
    );

    // After the overlap the repository signs with the new key alone.
    tokio::time::sleep(std::time::Duration::from_secs(21).saturating_sub(rotated.elapsed())).await;
    server
        .ok("keepup repo refresh --repo /srv/repo && keepup repo verify --repo /srv/repo")
        .await?;
    let packets = server.ok(signatures).await?;
    ensure!(
        packets.trim() == "1",
        "InRelease after the overlap: {packets} signatures"
    );
    let out = client.ok(update).await?;
    ensure!(!out.contains("W:") && !out.contains("E:"), "{out}");
    client.ok("apt-get install -y --reinstall foo 2>&1").await?;
    let out = late.exec(update).await?;
    ensure!(
        out.stdout.contains("NO_PUBKEY") || out.stdout.contains("not signed"),
        "a host with only the old key accepted the new signature:\n{}",
        out.stdout
    );
    Ok(())
}

#[tokio::test]
async fn stock_dnf_lists_the_signed_rpm_track() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let net = TestNet::new()?;
    let (server, client) = served_repo(&net, tmp.path()).await?;
    client
        .ok(
            "mkdir -p /etc/yum.repos.d && printf '%s\\n' '[keepup]' 'name=keepup stable' \
             'baseurl=http://repo:8080/rpm/stable/' 'enabled=1' 'gpgcheck=1' 'repo_gpgcheck=1' \
             'gpgkey=http://repo:8080/keys/repository.asc' > /etc/yum.repos.d/keepup.repo",
        )
        .await?;
    let dnf = "dnf -y --setopt=reposdir=/etc/yum.repos.d --releasever=12 --disablerepo='*' --enablerepo=keepup";
    let list = client.ok(&format!("{dnf} list --available 2>&1")).await?;
    ensure!(
        list.contains("foo.x86_64") && list.contains("1.0.0-1"),
        "{list}"
    );
    // The package dnf would fetch verifies with the repository key (what gpgcheck checks).
    let k = client
        .ok("curl -fsS -o /tmp/foo.rpm http://repo:8080/rpm/stable/packages/foo-1.0.0-1.x86_64.rpm \
             && curl -fsS -o /tmp/key.asc http://repo:8080/keys/repository.asc \
             && rpmkeys --import /tmp/key.asc && rpmkeys -K /tmp/foo.rpm")
        .await?;
    ensure!(k.contains("signatures OK"), "{k}");
    // A tampered repomd.xml is refused (repo_gpgcheck).
    server
        .ok("sed -i 's/<revision>/<revision>1/' /srv/repo/rpm/stable/repodata/repomd.xml")
        .await?;
    let out = client
        .exec(&format!(
            "{dnf} clean all >/dev/null 2>&1; {dnf} list --available 2>&1"
        ))
        .await?;
    ensure!(
        !out.stdout.contains("foo.x86_64")
            && (out.code != 0 || out.stdout.contains("GPG signature verification error")),
        "dnf accepted a tampered repomd.xml:\n{}",
        out.stdout
    );
    Ok(())
}

#[tokio::test]
async fn serve_keeps_requests_inside_the_repository() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let net = TestNet::new()?;
    let (server, client) = served_repo(&net, tmp.path()).await?;
    server
        .ok("ln -s /etc/passwd /srv/repo/leak && ln -s /etc /srv/repo/etcdir && echo secret > /srv/outside")
        .await?;
    let code = |path: &str| {
        format!("curl -s --path-as-is -o /dev/null -w '%{{http_code}}' 'http://repo:8080{path}'")
    };
    for path in [
        "/../outside",
        "/dists/../../outside",
        "/%2e%2e/outside",
        "/%2E%2E%2Foutside",
        "/dists/%2e%2e/%2e%2e/outside",
        "/..%5coutside",
        "/.keepup/signing-key.asc",
        "/%2ekeepup/signing-key.asc",
        "/leak",
        "/etcdir/passwd",
        "/nope",
    ] {
        let c = client.ok(&code(path)).await?;
        ensure!(c == "404" || c == "400", "{path} answered {c}");
    }
    let c = client.ok(&code("/dists/stable/InRelease")).await?;
    ensure!(c == "200", "InRelease answered {c}");
    let head = client
        .ok("curl -sS -I http://repo:8080/dists/stable/main/binary-amd64/Packages.gz")
        .await?;
    ensure!(
        head.contains("200") && head.contains("application/gzip"),
        "{head}"
    );
    let head = client
        .ok("curl -sS -I http://repo:8080/pool/main/f/foo/foo_1.0.0-1_amd64.deb")
        .await?;
    ensure!(
        head.contains("application/vnd.debian.binary-package"),
        "{head}"
    );
    let c = client
        .ok("curl -s -o /dev/null -w '%{http_code}' -X POST http://repo:8080/dists/stable/InRelease")
        .await?;
    ensure!(c == "405", "POST answered {c}");
    // Same bytes over HTTP as in the pool.
    let sum = client
        .ok("curl -fsS http://repo:8080/pool/main/f/foo/foo_1.0.0-1_amd64.deb | sha256sum")
        .await?;
    let local = server
        .ok("sha256sum < /srv/repo/pool/main/f/foo/foo_1.0.0-1_amd64.deb")
        .await?;
    ensure!(sum == local, "{sum} vs {local}");
    Ok(())
}

/// One createrepo `<package>` entry, normalized for comparison: one trimmed line per line,
/// `&apos;` as `'`, the file's mtime and the location's directory dropped.
fn normalize_rpm_entry(xml: &str) -> Vec<String> {
    let start = xml.find("<package").expect("a <package>");
    let end = xml.rfind("</package>").expect("a </package>");
    xml[start..end]
        .replace("&apos;", "'")
        .lines()
        .map(|l| {
            let l = l.trim();
            if let Some(rest) = l.strip_prefix("<time file=\"") {
                // `<time file="MTIME" build="B"/>` -> `<time build="B"/>`
                format!("<time{}", rest.split_once('"').map_or("", |(_, b)| b))
            } else if let Some(rest) = l.strip_prefix("<location href=\"") {
                let href = rest.split('"').next().unwrap_or("");
                format!("<location {}", href.rsplit('/').next().unwrap_or(href))
            } else {
                l.to_string()
            }
        })
        .filter(|l| !l.is_empty())
        .collect()
}

fn gunzip(path: &Path) -> Result<String> {
    let out = Command::new("zcat").arg(path).output()?;
    ensure!(out.status.success(), "zcat {}", path.display());
    Ok(String::from_utf8(out.stdout)?)
}

/// The `KIND` metadata file (`primary`, ...) that a DNF repository's repomd.xml names.
fn repodata(dir: &Path, kind: &str) -> Result<PathBuf> {
    let repomd = std::fs::read_to_string(dir.join("repodata/repomd.xml"))?;
    let data = repomd
        .split("<data ")
        .find(|d| d.starts_with(&format!("type=\"{kind}\"")))
        .with_context(|| format!("no {kind} in {}", dir.display()))?;
    let href = data
        .split("<location href=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .context("no location")?;
    Ok(dir.join(href))
}

#[test]
fn views_match_apt_ftparchive_and_createrepo_c_field_by_field() -> Result<()> {
    let have = |t: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // The peers are part of the test: missing tools fail it (tests/run.sh installs them).
    ensure!(
        have("apt-ftparchive") && have("createrepo_c"),
        "this test compares with apt-ftparchive and createrepo_c: run `bash tests/run.sh`, or `apt-get install apt-utils createrepo-c`"
    );
    let tmp = tempfile::tempdir()?;
    let repo = new_repo(tmp.path())?;
    let r = repo.to_str().unwrap();
    let key = shared_signing_key()?;
    let (deb, rpm) = build(tmp.path(), "1.0.0", Some(&key), "")?;
    keepup(&[
        "publish",
        "--repo",
        r,
        deb.to_str().unwrap(),
        rpm.to_str().unwrap(),
    ])?;

    // APT: every field apt-ftparchive writes, with the same value (SHA1 left out on purpose).
    let theirs = Command::new("apt-ftparchive")
        .args(["packages", "pool/main"])
        .current_dir(&repo)
        .output()?;
    ensure!(theirs.status.success());
    let theirs = stanza_fields(&String::from_utf8(theirs.stdout)?);
    let ours = stanza_fields(&gunzip(
        &repo.join("dists/unstable/main/binary-amd64/Packages.gz"),
    )?);
    ensure!(theirs.len() > 10, "{theirs:?}");
    for (k, v) in &theirs {
        if k == "SHA1" {
            ensure!(!ours.contains_key(k));
            continue;
        }
        ensure!(
            ours.get(k) == Some(v),
            "{k}: apt-ftparchive {v:?}, keepup {:?}",
            ours.get(k)
        );
    }
    for k in ours.keys() {
        ensure!(
            theirs.contains_key(k),
            "keepup writes {k}, apt-ftparchive does not"
        );
    }

    // DNF: createrepo_c on the same rpm; primary, filelists and other entries agree.
    let cr = tmp.path().join("cr");
    std::fs::create_dir_all(&cr)?;
    std::fs::copy(&rpm, cr.join(rpm.file_name().unwrap()))?;
    let st = Command::new("createrepo_c")
        .args(["--no-database", "-q"])
        .arg(&cr)
        .status()?;
    ensure!(st.success());
    for kind in ["primary", "filelists", "other"] {
        let theirs = normalize_rpm_entry(&gunzip(&repodata(&cr, kind)?)?);
        let ours = normalize_rpm_entry(&gunzip(&repodata(&repo.join("rpm/unstable"), kind)?)?);
        ensure!(
            theirs == ours,
            "{kind}: createrepo_c\n{theirs:#?}\nkeepup\n{ours:#?}"
        );
    }
    Ok(())
}

#[test]
fn concurrent_commands_are_serialized() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo = new_repo(tmp.path())?;
    let r = repo.to_str().unwrap().to_string();
    let key = shared_signing_key()?;
    let versions = ["2.0.0", "2.1.0", "2.2.0", "2.3.0"];
    let mut files = Vec::new();
    for v in versions {
        files.push(build(tmp.path(), v, Some(&key), "")?);
    }
    // Four publishers and a fleet change at once: every one lands, nothing is lost.
    let bin = built_bin("keepup")?;
    let mut children = Vec::new();
    for (deb, rpm) in &files {
        children.push(
            Command::new(&bin)
                .args(["publish", "--repo", &r])
                .arg(deb)
                .arg(rpm)
                .stdout(std::process::Stdio::null())
                .spawn()?,
        );
    }
    children.push(
        Command::new(&bin)
            .args(["assign", "--repo", &r, "*", "--track", "stable"])
            .stdout(std::process::Stdio::null())
            .spawn()?,
    );
    for mut c in children {
        ensure!(c.wait()?.success(), "a concurrent command failed");
    }
    let list = list_json(&repo)?;
    let n = list.as_array().unwrap().len();
    ensure!(
        n == 2 * versions.len(),
        "expected {} entries, got {n}: {list}",
        2 * versions.len()
    );
    ensure!(index(&repo, "unstable")?["serial"].as_u64().unwrap() == 1 + versions.len() as u64);
    ensure!(std::fs::read_to_string(repo.join("fleet.yaml"))?.contains("stable"));
    keepup(&["repo", "verify", "--repo", &r])?;
    Ok(())
}

/// A repository of the old single-file layout (`.keepup/state.json` + `.keepup/meta/`) is
/// converted by the first command that opens it, and works as before.
#[test]
fn old_single_file_state_is_converted_on_open() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo = new_repo(tmp.path())?;
    let r = repo.to_str().unwrap();
    let key = shared_signing_key()?;
    let (deb, rpm) = build(tmp.path(), "1.0.0", Some(&key), "")?;
    // A name's first metadata file left half-written by a crash is written again.
    std::fs::create_dir_all(repo.join(".keepup/pool"))?;
    std::fs::write(repo.join(".keepup/pool/foo.json"), "[\n{\"entry\":{\"na")?;
    keepup(&[
        "publish",
        "--repo",
        r,
        deb.to_str().unwrap(),
        rpm.to_str().unwrap(),
    ])?;
    keepup(&["assign", "--repo", r, "web*", "--track", "stable"])?;
    let before = list_json(&repo)?;

    // Rewrite the private state as the old layout had it; drop the rpm's fragments (they are
    // computed again from the pool file).
    let private = repo.join(".keepup");
    let read = |p: &str| -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(&std::fs::read(private.join(p))?)?)
    };
    let metas = read("pool/foo.json")?;
    let mut pool = serde_json::Map::new();
    for m in metas.as_array().unwrap() {
        let e = &m["entry"];
        pool.insert(e["path"].as_str().unwrap().into(), e.clone());
        if let Some(stanza) = m.get("stanza") {
            let sha = e["sha256"].as_str().unwrap();
            let dir = private.join("meta").join(&sha[..2]);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(
                dir.join(format!("{sha}.json")),
                serde_json::json!({ "stanza": stanza }).to_string(),
            )?;
        }
    }
    let settings = read("repo.json")?;
    let mut tracks = serde_json::Map::new();
    for t in settings["tracks"].as_array().unwrap() {
        let t = t.as_str().unwrap();
        let mut track = read(&format!("tracks/{t}.json"))?;
        // The changes committed since the track file, one line each: fold them in.
        let log =
            std::fs::read_to_string(private.join(format!("tracks/{t}.log"))).unwrap_or_default();
        for line in log.lines() {
            let change: serde_json::Value = serde_json::from_str(line)?;
            for (name, entries) in change["set"].as_object().unwrap() {
                let packages = track["packages"].as_object_mut().unwrap();
                match entries.as_array().unwrap().is_empty() {
                    true => packages.remove(name),
                    false => packages.insert(name.clone(), entries.clone()),
                };
            }
            track["serial"] = change["serial"].clone();
        }
        let members: Vec<serde_json::Value> = track["packages"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|v| v.as_array().unwrap().iter().map(|e| e["path"].clone()))
            .collect();
        tracks.insert(
            t.into(),
            serde_json::json!({ "serial": track["serial"], "members": members }),
        );
    }
    let old = serde_json::json!({
        "tracks": settings["tracks"],
        "pool": pool,
        "track": tracks,
        "fleet": read("fleet.json")?,
    });
    std::fs::write(private.join("state.json"), old.to_string())?;
    for f in ["repo.json", "fleet.json"] {
        std::fs::remove_file(private.join(f))?;
    }
    for d in ["tracks", "pool"] {
        std::fs::remove_dir_all(private.join(d))?;
    }

    // Old repositories kept the secret key inside the tree, and recorded nothing.
    std::fs::copy(&key, private.join("signing-key.asc"))?;

    // A read-only command converts it (under the lock) and sees the same repository.
    ensure!(
        list_json(&repo)? == before,
        "the converted repository differs"
    );
    ensure!(!private.join("state.json").exists() && !private.join("meta").exists());
    ensure!(private.join("pool/foo.json").exists());
    keepup(&["repo", "verify", "--repo", r])?;
    keepup(&["promote", "--repo", r, "foo", "--to", "testing"])?;
    ensure!(entry(&repo, "testing", "rpm")?["version"] == "1.0.0-1");
    ensure!(std::fs::read_to_string(repo.join("fleet.yaml"))?.contains("web*"));
    keepup(&["repo", "verify", "--repo", r])?;

    // The key inside the tree keeps working, with a warning that says how to move it.
    let (ok, _, err) = keepup_output(&["repo", "verify", "--repo", r])?;
    ensure!(
        ok && err.contains(".keepup/signing-key.asc is inside the repository tree")
            && err.contains(&format!("keepup repo move-key --repo {r}")),
        "no warning about the key inside the tree:\n{err}"
    );
    let moved = tmp.path().join("moved-keys");
    let inside = keepup_fails(&[
        "repo",
        "move-key",
        "--repo",
        r,
        "--key-dir",
        &format!("{r}/keys-here"),
    ])?;
    ensure!(inside.contains("is inside the repository"), "{inside}");
    keepup(&[
        "repo",
        "move-key",
        "--repo",
        r,
        "--key-dir",
        moved.to_str().unwrap(),
    ])?;
    ensure!(!private.join("signing-key.asc").exists() && key_in(&moved)?.exists());
    keepup(&["promote", "--repo", r, "foo", "--to", "stable"])?;
    let (ok, _, err) = keepup_output(&["repo", "verify", "--repo", r])?;
    ensure!(ok && !err.contains("warning"), "{err}");
    Ok(())
}

/// `keepup serve` re-signs the signed metadata before it expires when it can read the secret
/// key (issue 11): with `--valid-for 4s`, the repository still verifies after the first
/// signatures have expired, and the server's log says each refresh.
#[test]
fn serve_refreshes_the_signed_metadata_before_it_expires() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo = new_repo(tmp.path())?;
    let r = repo.to_str().context("UTF-8 path")?;
    keepup(&["repo", "config", "--repo", r, "--valid-for", "4s"])?;
    keepup(&["repo", "refresh", "--repo", r])?;
    let first_expiry = std::time::SystemTime::now() + std::time::Duration::from_secs(4);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = tmp.path().join("serve.log");
    let mut serve = Command::new(built_bin("keepup")?)
        .args([
            "serve",
            "--repo",
            r,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let result = (|| -> Result<()> {
        let start = std::time::Instant::now();
        // Two refreshes: the second comes after the first signatures' expiry.
        loop {
            let text = std::fs::read_to_string(&log)?;
            if text
                .matches("signed metadata refreshed; valid until")
                .count()
                >= 2
                && std::time::SystemTime::now() > first_expiry
            {
                break;
            }
            if let Some(st) = serve.try_wait()? {
                bail!("keepup serve exited ({st}):\n{text}");
            }
            ensure!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "keepup serve did not refresh twice within 30 s:\n{text}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let out = keepup(&["repo", "verify", "--repo", r])?;
        ensure!(!out.contains("expired"), "{out}");
        Ok(())
    })();
    let _ = serve.kill();
    let _ = serve.wait();
    result
}
