//! Bad specs give errors that name the file, line, column and field, and say what is expected.

use std::path::{Path, PathBuf};

use keepup_packager::spec::{Spec, SpecErrors};

/// A valid spec; tests break one thing at a time.
const GOOD: &str = r#"name: foo
version: 1.2.0
summary: Example daemon
maintainer: Ops <ops@example.org>
license: Apache-2.0
role: foo
files:
  - src: food
    dst: /usr/bin/food
launch:
  exec: [/usr/bin/food]
"#;

fn dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("food"), b"#!/bin/sh\n").unwrap();
    d
}

fn parse(dir: &Path, text: &str) -> Result<Spec, SpecErrors> {
    let path: PathBuf = dir.join("foo.yaml");
    std::fs::write(&path, text).unwrap();
    Spec::load(&path)
}

/// Parse `text`, expect exactly one error, and return it rendered.
fn one_error(text: &str) -> (keepup_packager::spec::SpecError, String) {
    let d = dir();
    let errs = parse(d.path(), text).expect_err("spec should be rejected");
    assert_eq!(errs.0.len(), 1, "expected one error, got: {errs}");
    let e = errs.0[0].clone();
    let shown = e.to_string();
    assert!(
        shown.starts_with(&d.path().join("foo.yaml").display().to_string()),
        "{shown}"
    );
    (e, shown)
}

#[test]
fn the_good_spec_parses_with_defaults() {
    let d = dir();
    let s = parse(d.path(), GOOD).unwrap();
    assert_eq!(s.full_version(), "1.2.0-1");
    assert_eq!(s.launch_path(), "/usr/sbin/run-foo");
    assert_eq!(s.supervisor.count, 10);
    assert_eq!(s.launch.not_sane_sleep.as_secs(), 30);
}

#[test]
fn malformed_yaml_names_the_place() {
    let (e, shown) = one_error("name: foo\nversion: [1.2\n");
    assert!(e.line >= 2, "{shown}");
}

#[test]
fn unknown_key_is_an_error_with_its_location() {
    let (e, shown) = one_error(&GOOD.replace("role: foo\n", "role: foo\nrestart: always\n"));
    assert_eq!((e.line, e.field.as_str()), (7, "restart"), "{shown}");
    assert!(shown.contains("docs/spec.md"), "{shown}");
}

#[test]
fn nested_unknown_key_and_wrong_type_name_the_full_field() {
    let (e, shown) = one_error(&format!(
        "{GOOD}checks:\n  - tcp: {{ port: 1, bogus: 2 }}\n"
    ));
    assert_eq!(
        (e.line, e.field.as_str()),
        (13, "checks[0].tcp.bogus"),
        "{shown}"
    );
    let (e, shown) = one_error(&GOOD.replace("  exec: [/usr/bin/food]", "  exec: /usr/bin/food"));
    assert_eq!((e.line, e.field.as_str()), (11, "launch.exec"), "{shown}");
    assert!(shown.contains("write a list"), "{shown}");
}

#[test]
fn bad_version_names_field_and_rule() {
    let (e, shown) = one_error(&GOOD.replace("version: 1.2.0", "version: 1.2_beta-3"));
    assert_eq!(
        (e.line, e.column, e.field.as_str()),
        (2, 10, "version"),
        "{shown}"
    );
    assert!(shown.contains("no `-` or `_`"), "{shown}");
}

#[test]
fn keyring_package_names_are_kept_for_the_repository() {
    let (e, shown) = one_error(&GOOD.replace("name: foo\n", "name: foo-archive-keyring\n"));
    assert_eq!((e.line, e.field.as_str()), (1, "name"), "{shown}");
    assert!(shown.contains("keepup repo keyring"), "{shown}");
}

#[test]
fn root_role_is_refused() {
    let (e, shown) = one_error(&GOOD.replace("role: foo", "role: root"));
    assert_eq!((e.line, e.field.as_str()), (6, "role"), "{shown}");
    assert!(shown.contains("system account"), "{shown}");
}

#[test]
fn missing_role_is_refused() {
    let (_, shown) = one_error(&GOOD.replace("role: foo\n", ""));
    assert!(shown.contains("role"), "{shown}");
}

#[test]
fn relative_dst_and_dotdot_are_refused() {
    for bad in ["usr/bin/food", "/usr/../etc/passwd"] {
        let (e, shown) = one_error(&GOOD.replace("dst: /usr/bin/food", &format!("dst: {bad}")));
        assert_eq!((e.line, e.field.as_str()), (9, "files[0].dst"), "{shown}");
        assert!(shown.contains("absolute path without `..`"), "{shown}");
    }
}

#[test]
fn missing_src_is_refused() {
    let (e, shown) = one_error(&GOOD.replace("src: food", "src: nothere"));
    assert_eq!((e.line, e.field.as_str()), (8, "files[0].src"), "{shown}");
    assert!(shown.contains("does not exist"), "{shown}");
}

#[test]
fn bad_durations_modes_and_probes_are_refused() {
    let (e, shown) = one_error(&GOOD.replace(
        "  exec: [/usr/bin/food]",
        "  exec: [/usr/bin/food]\n  not_sane_sleep: soon",
    ));
    assert_eq!(e.field, "launch.not_sane_sleep", "{shown}");
    assert!(shown.contains("\"30s\""), "{shown}");

    let (e, shown) = one_error(&GOOD.replace(
        "    dst: /usr/bin/food",
        "    dst: /usr/bin/food\n    mode: 755",
    ));
    assert_eq!(e.field, "files[0].mode", "{shown}");
    assert!(shown.contains("quoted octal"), "{shown}");

    let (e, shown) = one_error(&format!("{GOOD}checks:\n  - tcp: {{ port: 70000 }}\n"));
    assert_eq!(e.field, "checks[0].tcp.port", "{shown}");

    // Check names follow the rule the report server applies to probe names.
    let (e, shown) = one_error(&format!(
        "{GOOD}checks:\n  - name: \"<b>port</b>\"\n    tcp: {{ port: 80 }}\n"
    ));
    assert_eq!(e.field, "checks[0].name", "{shown}");
    assert!(shown.contains("not a check name"), "{shown}");

    let (e, shown) = one_error(&format!("{GOOD}checks:\n  - every: 10s\n"));
    assert_eq!(e.field, "checks[0]", "{shown}");
    assert!(shown.contains("exactly one of"), "{shown}");

    let (e, shown) = one_error(&format!(
        "{GOOD}checks:\n  - http: {{ url: \"http://x/\" }}\n    every: 1s\n    timeout: 5s\n"
    ));
    assert_eq!(e.field, "checks[0].timeout", "{shown}");
}

#[test]
fn legacy_octal_modes_are_read_as_octal() {
    let d = dir();
    let s = parse(
        d.path(),
        &GOOD.replace(
            "    dst: /usr/bin/food",
            "    dst: /usr/bin/food\n    mode: 0750",
        ),
    )
    .unwrap();
    assert_eq!(s.files[0].mode, Some(0o750));
    let s = parse(
        d.path(),
        &GOOD.replace(
            "    dst: /usr/bin/food",
            "    dst: /usr/bin/food\n    mode: \"0640\"",
        ),
    )
    .unwrap();
    assert_eq!(s.files[0].mode, Some(0o640));
}

#[test]
fn control_characters_are_refused_but_shell_metacharacters_are_data() {
    let (e, shown) = one_error(&GOOD.replace(
        "summary: Example daemon",
        "summary: \"Example\\u0007 daemon\"",
    ));
    assert_eq!(e.field, "summary", "{shown}");
    // Shell metacharacters are legal values: the scripts quote them (tested in the package tests).
    let d = dir();
    let s = parse(
        d.path(),
        &GOOD.replace(
            "  exec: [/usr/bin/food]",
            "  exec: [/usr/bin/food, \"$(touch /tmp/x)\", \"a'b;c\"]",
        ),
    )
    .unwrap();
    assert_eq!(s.launch.exec[1], "$(touch /tmp/x)");
}

#[test]
fn every_problem_is_reported_at_once() {
    let d = dir();
    let text = GOOD
        .replace("role: foo", "role: root")
        .replace("version: 1.2.0", "version: x");
    let errs = parse(d.path(), &text).unwrap_err();
    let fields: Vec<_> = errs.0.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["version", "role"], "{errs}");
}

#[test]
fn config_outside_etc_and_summary_starting_with_name_are_refused() {
    let (e, shown) = one_error(&GOOD.replace(
        "    dst: /usr/bin/food",
        "    dst: /usr/bin/food\n    config: true",
    ));
    assert_eq!(e.field, "files[0].config", "{shown}");
    let (e, shown) = one_error(&GOOD.replace("summary: Example daemon", "summary: foo daemon"));
    assert_eq!(e.field, "summary", "{shown}");
}

#[test]
fn probes_the_agent_could_not_build_are_refused_with_their_place() {
    // A banner regex that does not compile: the checks library's own message, at the value.
    let (e, shown) = one_error(&format!(
        "{GOOD}checks:\n  - tcp: {{ port: 7070, expect: \"ready (\" }}\n"
    ));
    assert_eq!(
        (e.line, e.column, e.field.as_str()),
        (13, 32, "checks[0].tcp.expect"),
        "{shown}"
    );
    assert!(
        shown.contains("the agent could not run this probe"),
        "{shown}"
    );
    assert!(
        shown.contains("regex /ready (/: error: unclosed group"),
        "{shown}"
    );
    assert!(!shown.contains('\n'), "one line per error: {shown}");

    let (e, shown) = one_error(&format!(
        "{GOOD}checks:\n  - http:\n      url: \"http://127.0.0.1:7071/\"\n      body: \"[a-\"\n"
    ));
    assert_eq!(
        (e.line, e.field.as_str()),
        (15, "checks[0].http.body"),
        "{shown}"
    );

    // URLs: a space in the authority, and a port out of range.
    for url in ["http://exa mple/healthz", "http://127.0.0.1:99999/"] {
        let (e, shown) = one_error(&format!("{GOOD}checks:\n  - http:\n      url: \"{url}\"\n"));
        assert_eq!(
            (e.line, e.field.as_str()),
            (14, "checks[0].http.url"),
            "{shown}"
        );
    }

    // A TCP host the agent cannot make an address of.
    let (e, shown) = one_error(&format!(
        "{GOOD}checks:\n  - tcp: {{ host: \"db host\", port: 5432 }}\n"
    ));
    assert_eq!(
        (e.line, e.field.as_str()),
        (13, "checks[0].tcp.host"),
        "{shown}"
    );
    assert!(shown.contains("whitespace"), "{shown}");

    // A Host header the agent could not send.
    let (e, shown) = one_error(&format!(
        "{GOOD}checks:\n  - http:\n      url: \"http://127.0.0.1/\"\n      host: \"a\\u007fb\"\n"
    ));
    assert_eq!(e.field, "checks[0].http.host", "{shown}");

    // A good probe still parses.
    let d = dir();
    parse(
        d.path(),
        &format!("{GOOD}checks:\n  - tcp: {{ port: 7070, expect: \"^food .* ready\" }}\n"),
    )
    .unwrap();
}

#[test]
fn a_program_with_an_equals_sign_is_refused() {
    // `env -i A=b /opt/x=y/food` would take the program for one more assignment.
    let (e, shown) = one_error(&GOOD.replace(
        "  exec: [/usr/bin/food]",
        "  exec: [/opt/x=y/food, --flag=1]",
    ));
    assert_eq!(
        (e.line, e.field.as_str()),
        (11, "launch.exec[0]"),
        "{shown}"
    );
    assert!(shown.contains("contains `=`"), "{shown}");
    let (e, shown) = one_error(&GOOD.replace(
        "  exec: [/usr/bin/food]",
        "  check:\n    - [/usr/bin/a=b]\n  exec: [/usr/bin/food]",
    ));
    assert_eq!(e.field, "launch.check[0][0]", "{shown}");
}

#[test]
fn file_names_under_a_src_directory_are_checked_like_dst() {
    let d = dir();
    let tree = d.path().join("static");
    std::fs::create_dir_all(tree.join("ok/deeper")).unwrap();
    std::fs::write(tree.join("ok/fine.css"), b"").unwrap();
    // A newline in a name would split the md5sums and conffiles lines.
    std::fs::write(tree.join("ok/deeper/evil\nname"), b"").unwrap();
    let text = GOOD.replace(
        "    dst: /usr/bin/food\n",
        "    dst: /usr/bin/food\n  - src: static\n    dst: /usr/share/foo\n",
    );
    let errs = parse(d.path(), &text).expect_err("a newline in a src name must be refused");
    assert_eq!(errs.0.len(), 1, "{errs}");
    let e = &errs.0[0];
    assert_eq!((e.line, e.field.as_str()), (10, "files[1].src"), "{errs}");
    assert!(e.message.contains("evil\\nname"), "{errs}");
    assert!(e.message.contains("rename the file"), "{errs}");
    std::fs::remove_file(tree.join("ok/deeper/evil\nname")).unwrap();
    parse(d.path(), &text).unwrap();
}

#[test]
fn system_accounts_are_reserved_even_when_adopted() {
    for role in [
        "dbus",
        "_chrony",
        "syslog",
        "systemd-oom",
        "shadow",
        "rpcuser",
        "tss",
    ] {
        let (e, shown) =
            one_error(&GOOD.replace("role: foo", &format!("role: {role}\nrole_adopt: true")));
        assert_eq!((e.line, e.field.as_str()), (6, "role"), "{shown}");
        assert!(shown.contains("system account"), "{shown}");
        assert!(shown.contains("`role_adopt` does not lift this"), "{shown}");
    }
    // A daemon's account is not reserved by name: the role registry refuses it at install
    // unless the operator adopts it.
    let d = dir();
    let s = parse(d.path(), &GOOD.replace("role: foo", "role: postgres")).unwrap();
    assert!(!s.role_adopt);
    let s = parse(
        d.path(),
        &GOOD.replace("role: foo", "role: postgres\nrole_adopt: true"),
    )
    .unwrap();
    assert!(s.role_adopt);
}

#[test]
fn control_characters_in_unit_values_are_refused_where_they_are() {
    let (e, shown) = one_error(&GOOD.replace(
        "license: Apache-2.0",
        "license: Apache-2.0\nhomepage: \"https://example.org/\\nExecStartPre=/bin/sh\"",
    ));
    assert_eq!(
        (e.line, e.column, e.field.as_str()),
        (6, 11, "homepage"),
        "{shown}"
    );
    let (e, shown) = one_error(&GOOD.replace(
        "summary: Example daemon",
        "summary: \"Example daemon\\u0085\"",
    ));
    assert_eq!((e.line, e.field.as_str()), (3, "summary"), "{shown}");
}

/// GOOD with a `supervisor:` section of `lines` (each indented by the caller).
fn with_supervisor(lines: &str) -> String {
    format!("{GOOD}supervisor:\n{lines}")
}

const CHECK: &str = "checks:\n  - tcp: { port: 7070 }\n";

#[test]
fn readiness_defaults_follow_the_checks() {
    use keepup_packager::manifest::Ready;
    let d = dir();
    let s = parse(d.path(), GOOD).unwrap();
    assert_eq!(s.supervisor.ready, Ready::Exec);
    assert_eq!(s.supervisor.ready_timeout.as_secs(), 90);
    assert_eq!(s.supervisor.watchdog, None);
    assert!(s.supervisor.after.is_empty());
    let s = parse(d.path(), &format!("{GOOD}{CHECK}")).unwrap();
    assert_eq!(s.supervisor.ready, Ready::Probes);
}

#[test]
fn readiness_watchdog_and_start_order_parse() {
    use keepup_packager::manifest::{Manifest, Ready};
    use std::time::Duration;
    let d = dir();
    let s = parse(
        d.path(),
        &with_supervisor(
            "  ready: notify\n  ready_timeout: 2m\n  watchdog: 30s\n  after: [db, cache.v2]\n",
        ),
    )
    .unwrap();
    let sv = &s.supervisor;
    assert_eq!(sv.ready, Ready::Notify);
    assert_eq!(sv.ready_timeout, Duration::from_secs(120));
    assert_eq!(sv.watchdog, Some(Duration::from_secs(30)));
    assert_eq!(sv.after, ["db", "cache.v2"]);
    // `ready: exec` with checks: the checks still run, readiness does not wait for them.
    let s = parse(
        d.path(),
        &format!("{}{CHECK}", with_supervisor("  ready: exec\n")),
    )
    .unwrap();
    assert_eq!(s.supervisor.ready, Ready::Exec);

    // The manifest carries the resolved values, and reads back the same.
    for text in [
        GOOD.to_string(),
        format!("{GOOD}{CHECK}"),
        with_supervisor("  ready: notify\n  watchdog: 1500ms\n  after: [db]\n"),
    ] {
        let s = parse(d.path(), &text).unwrap();
        let m = Manifest::from_spec(&s);
        assert_eq!(m.supervisor.ready, Some(s.supervisor.ready));
        assert_eq!(m.ready(), s.supervisor.ready);
        assert_eq!(m.supervisor.ready_timeout, Some(s.supervisor.ready_timeout));
        assert_eq!(m.supervisor.watchdog, s.supervisor.watchdog);
        assert_eq!(m.supervisor.after, s.supervisor.after);
        let yaml = m.to_yaml();
        assert!(
            yaml.contains(&format!("ready: {}", s.supervisor.ready)),
            "{yaml}"
        );
        assert_eq!(Manifest::parse("foo.yaml", &yaml).unwrap(), m, "{yaml}");
    }
}

#[test]
fn bad_readiness_watchdog_and_start_order_are_refused() {
    // (supervisor lines, extra spec text, field, what the message says)
    let cases = [
        (
            "  ready: soon\n",
            "",
            "supervisor.ready",
            "\"soon\" is not a readiness; expected one of notify, probes, exec",
        ),
        (
            "  ready: probes\n",
            "",
            "supervisor.ready",
            "no checks to pass; add a check under `checks`, or use `ready: exec`",
        ),
        (
            "  watchdog: 10s\n",
            "",
            "supervisor.watchdog",
            "needs supervisor.ready: notify: only a notify service sends WATCHDOG=1 (ready is exec)",
        ),
        (
            "  ready: probes\n  watchdog: 10s\n",
            CHECK,
            "supervisor.watchdog",
            "(ready is probes)",
        ),
        (
            "  ready: notify\n  watchdog: 0s\n",
            "",
            "supervisor.watchdog",
            "is zero",
        ),
        (
            "  ready_timeout: 0s\n",
            "",
            "supervisor.ready_timeout",
            "is zero",
        ),
        (
            "  ready_timeout: forever\n",
            "",
            "supervisor.ready_timeout",
            "is not a duration",
        ),
        (
            "  after: [db, foo]\n",
            "",
            "supervisor.after[1]",
            "names this service (foo); a service cannot start after itself",
        ),
        (
            "  after: [db, cache, db]\n",
            "",
            "supervisor.after[2]",
            "names db twice",
        ),
        (
            "  after: [\"../db\"]\n",
            "",
            "supervisor.after[0]",
            "\"../db\" is not a service name",
        ),
        (
            "  after: [x]\n",
            "",
            "supervisor.after[0]",
            "is not a service name",
        ),
        (
            "  kind: systemd\n  after: [c++d]\n",
            "",
            "supervisor.after[0]",
            "cannot be a systemd unit name",
        ),
    ];
    for (lines, extra, field, why) in cases {
        let (e, shown) = one_error(&format!("{}{extra}", with_supervisor(lines)));
        assert_eq!(e.field, field, "{lines}: {shown}");
        assert!(e.line >= 13, "{lines}: {shown}");
        assert!(shown.contains(why), "{lines}: {shown}");
    }
    // Not a list.
    let (e, shown) = one_error(&with_supervisor("  after: db\n"));
    assert_eq!(e.field, "supervisor.after", "{shown}");
    assert!(shown.contains("write a list"), "{shown}");
    // An agent-supervised service may start after a service whose name has a `+`.
    let d = dir();
    parse(d.path(), &with_supervisor("  after: [c++d]\n")).unwrap();
}

#[test]
fn the_notify_variables_are_the_supervisors_not_the_specs() {
    for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
        let (e, shown) = one_error(&GOOD.replace(
            "  exec: [/usr/bin/food]",
            &format!("  env:\n    {var}: /tmp/x\n  exec: [/usr/bin/food]"),
        ));
        assert_eq!(e.field, format!("launch.env.{var}"), "{shown}");
        assert!(shown.contains("set by the supervisor"), "{shown}");
    }
}

#[test]
fn runit_and_supervisord_kinds_parse_and_refuse_what_they_cannot_do() {
    use keepup_packager::manifest::{Manifest, Supervised};
    use keepup_packager::spec::SupervisorKind;
    let d = dir();
    for (kind, want, manifest) in [
        ("runit", SupervisorKind::Runit, Supervised::Runit),
        (
            "supervisord",
            SupervisorKind::Supervisord,
            Supervised::Supervisord,
        ),
    ] {
        let s = parse(
            d.path(),
            &format!("{}{CHECK}", with_supervisor(&format!("  kind: {kind}\n"))),
        )
        .unwrap();
        assert_eq!(s.supervisor.kind, want);
        let m = Manifest::from_spec(&s);
        assert_eq!(m.supervisor.kind, manifest);
        let yaml = m.to_yaml();
        assert!(yaml.contains(&format!("kind: {kind}")), "{yaml}");
        assert_eq!(Manifest::parse("foo.yaml", &yaml).unwrap(), m);

        // No notify socket under these supervisors, and no start order.
        let (e, shown) = one_error(&with_supervisor(&format!(
            "  kind: {kind}\n  ready: notify\n"
        )));
        assert_eq!(e.field, "supervisor.ready", "{shown}");
        assert!(shown.contains("no notify socket"), "{shown}");
        let (e, shown) = one_error(&with_supervisor(&format!(
            "  kind: {kind}\n  after: [db]\n"
        )));
        assert_eq!(e.field, "supervisor.after", "{shown}");
        assert!(shown.contains("no order"), "{shown}");
    }
    // An unknown kind is refused with the list of valid ones.
    let (e, shown) = one_error(&with_supervisor("  kind: s6\n"));
    assert_eq!(e.field, "supervisor.kind", "{shown}");
    assert!(
        shown.contains("`agent`, `systemd`, `runit`, `supervisord`"),
        "{shown}"
    );
}
