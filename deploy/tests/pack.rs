//! `keepup pack` end to end on this machine, checked with the real tools: dpkg-deb, lintian,
//! rpm and rpmlint. (Installing and running the packages is tested on Debian hosts in
//! containers, in tests/tests/packages.rs.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn keepup() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keepup"))
}

fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "`{name}` is not installed; these tests use the real tool: run `bash tests/run.sh` (it installs lintian, rpmlint, rpm, gnupg) or `apt-get install {name}`"
    );
    Command::new(name)
}

fn run(mut cmd: Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A copy of the example spec with a real ELF program standing in for the daemon.
fn example(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let ex = dir.join("docs/examples");
    std::fs::create_dir_all(&ex).unwrap();
    std::fs::create_dir_all(dir.join("target/release")).unwrap();
    std::fs::copy("/bin/sleep", dir.join("target/release/food")).unwrap();
    for f in ["foo.yaml", "foo.conf"] {
        std::fs::copy(root.join("docs/examples").join(f), ex.join(f)).unwrap();
    }
    ex.join("foo.yaml")
}

fn pack(spec: &Path, out: &Path, extra: &[&str]) -> Vec<PathBuf> {
    let mut cmd = keepup();
    cmd.arg("pack")
        .arg(spec)
        .arg("--out")
        .arg(out)
        .args(extra)
        .env("SOURCE_DATE_EPOCH", "1700000000");
    let o = run(cmd);
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(PathBuf::from)
        .collect()
}

/// An OpenPGP signing key made with gpg, exported armored, and an rpm database that trusts it.
struct Keys {
    _dir: tempfile::TempDir,
    secret: PathBuf,
    home: PathBuf,
}

fn keys() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let gnupg = dir.path().join("gnupg");
    std::fs::create_dir_all(&gnupg).unwrap();
    std::fs::set_permissions(&gnupg, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let gpg = |args: &[&str]| {
        let mut c = tool("gpg");
        c.env("GNUPGHOME", &gnupg)
            .args(["--batch", "--passphrase", ""])
            .args(args);
        run(c)
    };
    gpg(&[
        "--quick-gen-key",
        "keepup test <test@example.org>",
        "rsa3072",
        "sign",
        "never",
    ]);
    let secret = dir.path().join("key.asc");
    std::fs::write(&secret, gpg(&["--armor", "--export-secret-keys"]).stdout).unwrap();
    let public = dir.path().join("key.pub");
    std::fs::write(&public, gpg(&["--armor", "--export"]).stdout).unwrap();
    // rpmlint checks signatures against the rpm database: give it a private one.
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join("rpmdb")).unwrap();
    std::fs::write(
        home.join(".rpmmacros"),
        format!("%_dbpath {}\n", home.join("rpmdb").display()),
    )
    .unwrap();
    let mut imp = tool("rpm");
    imp.env("HOME", &home).arg("--import").arg(&public);
    run(imp);
    Keys {
        _dir: dir,
        secret,
        home,
    }
}

#[test]
fn deb_has_the_expected_control_data_and_contents() {
    let dir = tempfile::tempdir().unwrap();
    let files = pack(
        &example(dir.path()),
        &dir.path().join("dist"),
        &["--format", "deb"],
    );
    assert_eq!(files.len(), 1);
    assert!(files[0].ends_with("foo_1.0.0-1_amd64.deb"), "{files:?}");

    let mut info = tool("dpkg-deb");
    info.arg("--info").arg(&files[0]);
    let info = text(&run(info));
    for want in [
        "Package: foo",
        "Version: 1.0.0-1",
        "Architecture: amd64",
        "Pre-Depends: passwd",
        "Depends: procps, libc6",
        "conffiles",
        "preinst",
        "postinst",
        "postrm",
        "md5sums",
    ] {
        assert!(
            info.contains(want),
            "dpkg-deb --info lacks {want:?}:\n{info}"
        );
    }
    assert!(
        !info.contains("prerm"),
        "prerm should be absent (the upgrade flow keeps it empty):\n{info}"
    );

    let mut contents = tool("dpkg-deb");
    contents.arg("--contents").arg(&files[0]);
    let contents = text(&run(contents));
    for want in [
        "-rwxr-xr-x root/root",
        "usr/bin/food",
        "usr/sbin/run-foo",
        "usr/lib/keepup/services/foo.yaml",
        "etc/foo/foo.conf",
        "usr/share/doc/foo/copyright",
        "usr/share/doc/foo/changelog.Debian.gz",
        "2023-11-14 22:13", // SOURCE_DATE_EPOCH
    ] {
        assert!(
            contents.contains(want),
            "dpkg-deb --contents lacks {want:?}:\n{contents}"
        );
    }
    let mut conffiles = tool("dpkg-deb");
    conffiles.arg("--field").arg(&files[0]).arg("Version");
    assert_eq!(text(&run(conffiles)).trim(), "1.0.0-1");
}

#[test]
fn deb_passes_lintian_with_no_errors() {
    let dir = tempfile::tempdir().unwrap();
    let files = pack(
        &example(dir.path()),
        &dir.path().join("dist"),
        &["--format", "deb"],
    );
    let mut l = tool("lintian");
    l.arg("--tag-display-limit").arg("0").arg(&files[0]);
    let out = l.output().unwrap();
    let report = text(&out);
    let errors: Vec<_> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{report}");
    assert!(out.status.success(), "lintian failed:\n{report}");
}

#[test]
fn signed_rpm_has_scriptlets_and_passes_rpmlint_with_no_errors() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let files = pack(
        &example(dir.path()),
        &dir.path().join("dist"),
        &["--format", "rpm", "--sign-key", k.secret.to_str().unwrap()],
    );
    assert!(files[0].ends_with("foo-1.0.0-1.x86_64.rpm"), "{files:?}");

    let mut q = tool("rpm");
    q.env("HOME", &k.home).arg("-qip").arg(&files[0]);
    let info = text(&run(q));
    for want in [
        "Name        : foo",
        "Version     : 1.0.0",
        "Release     : 1",
        "Architecture: x86_64",
        "Signature   : RSA/SHA256",
    ] {
        assert!(info.contains(want), "rpm -qip lacks {want:?}:\n{info}");
    }
    let mut l = tool("rpm");
    l.env("HOME", &k.home).arg("-qlvp").arg(&files[0]);
    let list = text(&run(l));
    assert!(
        list.contains("-rwxr-xr-x    1 root     root") && list.contains("/usr/sbin/run-foo"),
        "{list}"
    );
    let mut c = tool("rpm");
    c.env("HOME", &k.home)
        .args(["-qp", "--configfiles"])
        .arg(&files[0]);
    assert_eq!(text(&run(c)).trim(), "/etc/foo/foo.conf");
    let mut s = tool("rpm");
    s.env("HOME", &k.home)
        .args(["-qp", "--scripts"])
        .arg(&files[0]);
    let scripts = text(&run(s));
    for want in [
        "preinstall scriptlet (using /bin/sh)",
        "postuninstall scriptlet (using /bin/sh)",
        "posttrans scriptlet (using /bin/sh)",
        "useradd --system",
        "if [ \"$1\" -eq 0 ]",
    ] {
        assert!(
            scripts.contains(want),
            "rpm --scripts lacks {want:?}:\n{scripts}"
        );
    }
    let mut k2 = tool("rpm");
    k2.env("HOME", &k.home).arg("-K").arg(&files[0]);
    assert!(text(&run(k2)).contains("signatures OK"));

    let mut lint = tool("rpmlint");
    lint.env("HOME", &k.home).arg(&files[0]);
    let out = lint.output().unwrap();
    let report = text(&out);
    assert!(report.contains(" 0 errors"), "rpmlint errors:\n{report}");
}

#[test]
fn unsigned_rpm_is_flagged_by_rpmlint() {
    // The counterpart of the test above: rpmlint really does look at signatures.
    let dir = tempfile::tempdir().unwrap();
    let files = pack(
        &example(dir.path()),
        &dir.path().join("dist"),
        &["--format", "rpm"],
    );
    let out = tool("rpmlint").arg(&files[0]).output().unwrap();
    assert!(text(&out).contains("no-signature"), "{}", text(&out));
}

#[test]
fn builds_are_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let spec = example(dir.path());
    let a = pack(&spec, &dir.path().join("a"), &[]);
    let b = pack(&spec, &dir.path().join("b"), &[]);
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            std::fs::read(x).unwrap(),
            std::fs::read(y).unwrap(),
            "{} differs between builds",
            x.display()
        );
    }
    // A different SOURCE_DATE_EPOCH changes the bytes: the timestamp really is used.
    let mut cmd = keepup();
    cmd.arg("pack")
        .arg(&spec)
        .arg("--out")
        .arg(dir.path().join("c"))
        .env("SOURCE_DATE_EPOCH", "1600000000");
    let c: Vec<PathBuf> = String::from_utf8(run(cmd).stdout)
        .unwrap()
        .lines()
        .map(PathBuf::from)
        .collect();
    assert_ne!(std::fs::read(&a[0]).unwrap(), std::fs::read(&c[0]).unwrap());
}

#[test]
fn every_compression_builds_a_package_dpkg_reads() {
    let dir = tempfile::tempdir().unwrap();
    let spec = example(dir.path());
    for (c, member) in [
        ("zstd", "data.tar.zst"),
        ("xz", "data.tar.xz"),
        ("gzip", "data.tar.gz"),
        ("none", "data.tar"),
    ] {
        let out = dir.path().join(c);
        let files = pack(&spec, &out, &["--format", "deb", "--compression", c]);
        let ar = run({
            let mut a = Command::new("ar");
            a.arg("t").arg(&files[0]);
            a
        });
        assert!(text(&ar).lines().any(|l| l == member), "{c}: {}", text(&ar));
        let mut x = tool("dpkg-deb");
        x.arg("-x").arg(&files[0]).arg(out.join("root"));
        run(x);
        assert!(out.join("root/usr/sbin/run-foo").exists());
    }
}

#[test]
fn every_compression_builds_an_rpm_that_rpm_verifies_and_unpacks() {
    let dir = tempfile::tempdir().unwrap();
    let spec = example(dir.path());
    for c in ["zstd", "xz", "gzip", "none"] {
        let out = dir.path().join(format!("rpm-{c}"));
        let files = pack(&spec, &out, &["--format", "rpm", "--compression", c]);
        let mut k = tool("rpm");
        k.arg("-K").arg(&files[0]);
        assert!(text(&run(k)).contains("digests OK"), "{c}");
        // The streamed cpio payload unpacks to the same bytes that went in.
        let unpack = format!(
            "cd {} && rpm2cpio {} | cpio -idm --quiet && cmp usr/bin/food {}",
            out.display(),
            files[0].display(),
            dir.path().join("target/release/food").display()
        );
        tool("cpio"); // a clear failure if cpio is missing
        let mut sh = Command::new("sh");
        sh.arg("-c").arg(unpack);
        run(sh);
        assert!(
            out.join("usr/sbin/run-foo").exists() && out.join("etc/foo/foo.conf").exists(),
            "{c}"
        );
    }
}

#[test]
fn a_bad_spec_fails_with_the_documented_error_and_builds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spec = example(dir.path());
    let text_in = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("role: foo", "role: root");
    std::fs::write(&spec, text_in).unwrap();
    let out = keepup()
        .arg("pack")
        .arg(&spec)
        .arg("--out")
        .arg(dir.path().join("dist"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("foo.yaml:") && err.contains("field `role`") && err.contains("system account"),
        "{err}"
    );
    assert!(
        !dir.path().join("dist").exists()
            || std::fs::read_dir(dir.path().join("dist"))
                .unwrap()
                .next()
                .is_none()
    );
}

#[test]
fn a_missing_signing_key_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = keepup()
        .arg("pack")
        .arg(example(dir.path()))
        .args(["--sign-key", "/nonexistent/key.asc"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("signing key /nonexistent/key.asc does not exist"));
}

#[test]
fn a_probe_the_agent_could_not_run_fails_the_pack_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let spec = example(dir.path());
    let good = std::fs::read_to_string(&spec).unwrap();
    let from = r#"expect: "^food .* ready""#;
    assert!(
        good.contains(from),
        "the example's banner check changed; update this test"
    );
    std::fs::write(&spec, good.replace(from, r#"expect: "^food (.* ready""#)).unwrap();
    let out = keepup()
        .arg("pack")
        .arg(&spec)
        .arg("--out")
        .arg(dir.path().join("dist"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = good.lines().position(|l| l.contains(from)).unwrap() + 1;
    assert!(
        err.contains(&format!("foo.yaml:{line}:"))
            && err.contains("field `checks[0].tcp.expect`")
            && err.contains("the agent could not run this probe")
            && err.contains("unclosed group"),
        "{err}"
    );
    assert!(!dir.path().join("dist").exists());
}

/// `kind: runit` and `kind: supervisord`: the supervisor's files are in both formats, the
/// runit ones as conffiles, the dependencies are declared, and lintian and rpmlint find no
/// errors.
#[test]
fn runit_and_supervisord_packages_carry_their_files_and_pass_the_linters() {
    let k = keys();
    for (kind, files_wanted, depends) in [
        (
            "runit",
            &[
                " etc/sv/foo/run\n",
                " etc/sv/foo/log/run\n",
                " etc/sv/foo/supervise -> /run/runit/supervise/foo\n",
            ][..],
            "runit, runit-helper (>= 2.8.2)",
        ),
        (
            "supervisord",
            &[" usr/lib/keepup/supervisor/foo.conf\n"][..],
            "supervisor",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let spec = example(dir.path());
        let yaml = std::fs::read_to_string(&spec)
            .unwrap()
            .replace("kind: agent", &format!("kind: {kind}"));
        std::fs::write(&spec, yaml).unwrap();
        let files = pack(
            &spec,
            &dir.path().join("dist"),
            &["--sign-key", k.secret.to_str().unwrap()],
        );
        let deb = files
            .iter()
            .find(|f| f.extension().unwrap() == "deb")
            .unwrap();
        let rpm = files
            .iter()
            .find(|f| f.extension().unwrap() == "rpm")
            .unwrap();

        let mut c = tool("dpkg-deb");
        c.arg("--contents").arg(deb);
        let contents = text(&run(c));
        for want in files_wanted {
            assert!(
                contents.contains(want),
                "{kind}: .deb lacks {want}:\n{contents}"
            );
        }
        let mut f = tool("dpkg-deb");
        f.arg("--field").arg(deb).arg("Depends");
        let deps = text(&run(f));
        assert!(deps.contains(depends), "{kind}: Depends: {deps}");
        let mut i = tool("dpkg-deb");
        i.arg("--info").arg(deb).arg("conffiles");
        let conffiles = text(&i.output().unwrap());
        let mut s = tool("dpkg-deb");
        s.arg("--info").arg(deb).arg("postrm");
        let postrm = text(&run(s));
        if kind == "runit" {
            assert!(conffiles.contains("/etc/sv/foo/run"), "{conffiles}");
            assert!(
                postrm.contains("/lib/runit-helper/runit-helper postrm"),
                "{postrm}"
            );
        } else {
            assert!(!conffiles.contains("supervisor"), "{conffiles}");
            assert!(postrm.contains("supervisorctl update 'foo'"), "{postrm}");
        }

        let mut l = tool("lintian");
        l.arg("--tag-display-limit").arg("0").arg(deb);
        let report = text(&l.output().unwrap());
        let errors: Vec<_> = report.lines().filter(|l| l.starts_with("E:")).collect();
        assert!(errors.is_empty(), "{kind}: lintian errors:\n{report}");

        let mut q = tool("rpm");
        q.env("HOME", &k.home).args(["-qlp"]).arg(rpm);
        let list = text(&run(q));
        for want in files_wanted {
            let path = format!("/{}", want.trim().split(" -> ").next().unwrap());
            assert!(list.contains(&path), "{kind}: .rpm lacks {path}:\n{list}");
        }
        let mut lint = tool("rpmlint");
        lint.env("HOME", &k.home).arg(rpm);
        let report = text(&lint.output().unwrap());
        assert!(
            report.contains(" 0 errors"),
            "{kind}: rpmlint errors:\n{report}"
        );
    }
}
