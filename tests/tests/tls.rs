//! TLS between agents and `keepup serve` (issue 10), on Debian host containers with a CA and
//! server certificates made by the test (openssl CLI):
//! - an agent follows the repository and reports over HTTPS (the package is installed, the
//!   report arrives), and the server answers nothing in clear text;
//! - an agent whose `ca_file` is another CA refuses the server: its log and `keepup-agent
//!   update --now` say "certificate signed by an unknown authority" and what to do, and the
//!   server never gets its token; an agent that reaches the repository by a name the
//!   certificate does not carry reports the update error;
//! - `keepup report` reads the fleet over HTTPS with `--ca-file`, and refuses the server when
//!   that file is another CA;
//! - a plain-http report URL to another host is refused by the config check;
//! - SIGHUP reloads the certificate (a broken file keeps the old one and says why).

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use keepup_tests::fleet::{
    converged, host_view, wait_for, AgentHost, Fleet, FleetTls, HostSpec, TestCa, Timers,
    REMOTE_TLS_CERT, REMOTE_TLS_KEY, SERVE_PORT,
};
use keepup_tests::host::docker_or_skip;
use serde_json::Value;

const PASS: Duration = Duration::from_secs(90);

async fn fleet_view(fleet: &Fleet) -> Result<Value> {
    let body = fleet.server_get("/api/v1/fleet").await?;
    serde_json::from_str(&body).with_context(|| format!("/api/v1/fleet answered {body}"))
}

/// Waits until the agent's own log contains `text`.
async fn log_says(h: &AgentHost, text: &str) -> Result<String> {
    let last = Mutex::new(String::new());
    let seen = &last;
    let res = wait_for(
        &format!("{}'s log to say {text:?}", h.name()),
        PASS,
        || async move {
            let log = h.agent_log().await?;
            let found = log.contains(text);
            *seen.lock().unwrap() = log;
            Ok(found)
        },
    )
    .await;
    let last = last.into_inner().unwrap();
    res.with_context(|| format!("the log of {}:\n{last}", h.name()))?;
    Ok(last)
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_follow_and_report_over_https_and_refuse_other_cas() -> Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let pki = tmp.path().join("pki");
    let tls = FleetTls::generate(&pki)?;
    let timers = Timers {
        schedule: "*/5 * * * * *".into(),
        stagger: Duration::from_secs(2),
        ..Timers::default()
    };
    let fleet = Fleet::start_with_tls(
        tmp.path(),
        &[HostSpec::deb("tls-1")],
        &timers,
        Some(tls.clone()),
    )
    .await?;
    fleet.op(&["assign", "tls-*", "--track", "stable"])?;
    fleet.op(&["assign", "name-*", "--track", "stable"])?;
    fleet.publish_example(tmp.path(), "1.0.0", |s| s)?;
    fleet.op(&["promote", "foo", "--to", "testing"])?;
    fleet.op(&["promote", "foo", "--to", "stable"])?;

    // 1. Over HTTPS: the package is installed and running, and the report arrives.
    let h = fleet.host("tls-1");
    let config = h.host.ok("cat /etc/keepup/agent.yaml").await?;
    ensure!(
        config.contains(&format!("repo: https://repo:{SERVE_PORT}/"))
            && config.contains(&format!("report: https://repo:{SERVE_PORT}/"))
            && config.contains("ca_file: /etc/keepup/ca.pem")
            && !config.contains("allow_plain_http"),
        "the agent must use https with the fleet's CA:\n{config}"
    );
    let installed = wait_for("tls-1 to install foo over https", PASS, || async {
        Ok(h.installed("foo").await?.as_deref() == Some("1.0.0-1"))
    })
    .await;
    fleet.explain(installed).await?;
    let reported = wait_for("tls-1's report over https", PASS, || async {
        Ok(converged(&fleet_view(&fleet).await?, &["tls-1"], "foo"))
    })
    .await;
    fleet.explain(reported).await?;
    // The operator's `keepup report` reads the same view over HTTPS, trusting the fleet's CA.
    let table = fleet.report("").await?;
    ensure!(
        table
            .lines()
            .any(|l| l.contains("tls-1") && l.contains("foo")),
        "keepup report over https: {table}"
    );
    // Nothing is served in clear text on the TLS port.
    let plain = fleet
        .server
        .exec(&format!(
            "curl -sS --max-time 10 -o /dev/null http://127.0.0.1:{SERVE_PORT}/fleet.yaml"
        ))
        .await?;
    ensure!(
        plain.code != 0,
        "plain http must not be answered: {plain:?}"
    );

    // 2. A certificate from another CA is refused: the agent says why and what to do, and the
    //    server never sees its report.
    let other = TestCa::new(&pki, "other-ca")?;
    let rogue = fleet
        .add_host_trusting(
            tmp.path(),
            &HostSpec::deb("tls-other-ca"),
            &timers,
            Some(&other.cert),
        )
        .await?;
    let log = log_says(&rogue, "certificate signed by an unknown authority").await?;
    ensure!(
        log.contains("set ca_file to the CA that signed the server's certificate")
            && log.contains(&format!("https://repo:{SERVE_PORT}/")),
        "the error must name the URL and what to do:\n{log}"
    );
    let now = rogue.host.exec("keepup-agent update --now").await?;
    ensure!(
        now.code != 0
            && now
                .stdout
                .contains("certificate signed by an unknown authority")
            && now.stdout.contains(&format!("https://repo:{SERVE_PORT}/")),
        "keepup-agent update --now must fail naming the URL and the TLS failure: {now:?}"
    );
    ensure!(
        rogue.installed("foo").await?.is_none(),
        "nothing is installed from an untrusted server"
    );
    // `keepup report` trusting the other CA refuses the server too, and says what to do.
    fleet
        .server
        .copy_in(&other.cert, "/tmp/other-ca.pem")
        .await?;
    let cli = fleet
        .server
        .exec(&format!(
            "keepup report --server https://127.0.0.1:{SERVE_PORT} --ca-file /tmp/other-ca.pem"
        ))
        .await?;
    ensure!(
        cli.code != 0
            && cli
                .stderr
                .contains("certificate signed by an unknown authority")
            && cli.stderr.contains("pass --ca-file with the CA"),
        "keepup report must refuse a server its --ca-file did not sign: {cli:?}"
    );
    ensure!(
        host_view(&fleet_view(&fleet).await?, "tls-other-ca")
            .is_none_or(|v| v["last_seen"].is_null()),
        "the server must not have taken a report from an agent that refused its certificate"
    );

    // 3. The right CA but a name the certificate does not carry (the server's address): the
    //    update fails with the name, and the report (to `repo`) carries that error.
    let named = fleet
        .add_host(tmp.path(), &HostSpec::deb("name-mismatch"), &timers)
        .await?;
    let ip = named
        .host
        .ok("getent ahostsv4 repo | awk 'NR==1 {print $1}'")
        .await?;
    let ip = ip.trim();
    ensure!(!ip.is_empty(), "no address for repo");
    named
        .host
        .ok(&format!(
            "sed -i 's#^repo: https://repo:#repo: https://{ip}:#' /etc/keepup/agent.yaml && \
             grep -q '^repo: https://{ip}:' /etc/keepup/agent.yaml && \
             pkill -KILL -x keepup-agent; true"
        ))
        .await?;
    named.start_agent().await?;
    let latest = Mutex::new(Value::Null);
    let seen = &latest;
    let fleet_ref = &fleet;
    let error = wait_for(
        "name-mismatch to report its update error",
        PASS,
        || async move {
            let v = fleet_view(fleet_ref).await?;
            let found = host_view(&v, "name-mismatch")
                .and_then(|v| v["update"]["error"].as_str())
                .is_some_and(|e| e.contains("not valid for"));
            *seen.lock().unwrap() = v;
            Ok(found)
        },
    )
    .await;
    let view = latest.into_inner().unwrap();
    fleet
        .explain(error.with_context(|| format!("fleet view: {view}")))
        .await?;
    let e = host_view(&view, "name-mismatch").expect("checked")["update"]["error"].to_string();
    ensure!(
        e.contains(&format!("https://{ip}:{SERVE_PORT}/")) && e.contains(ip),
        "the update error must name the URL and the host: {e}"
    );

    // 4. The config check refuses a plain-http report URL to another host, saying why.
    let check = h
        .host
        .exec(
            "printf 'report: http://repo:8080\\n' >/tmp/plain.yaml && \
             keepup-agent --config /tmp/plain.yaml status",
        )
        .await?;
    ensure!(
        check.code != 0
            && check.stderr.contains("/tmp/plain.yaml: report:")
            && check.stderr.contains("clear text")
            && check.stderr.contains("allow_plain_http: true"),
        "a plain-http report URL to another host must be refused: {check:?}"
    );
    for ok in [
        "report: http://127.0.0.1:8080\\n",
        "report: http://repo:8080\\nallow_plain_http: true\\n",
    ] {
        let c = h
            .host
            .exec(&format!(
                "printf '{ok}' >/tmp/ok.yaml && keepup-agent --config /tmp/ok.yaml status"
            ))
            .await?;
        ensure!(c.code == 0, "{ok:?} must be accepted: {c:?}");
    }

    // 5. SIGHUP reload: a broken certificate file keeps the old one (and says why); a new
    //    certificate from the other CA is served after the next SIGHUP.
    let serves_with = |ca: &'static str| {
        let server = &fleet.server;
        async move {
            let r = server
                .exec(&format!(
                    "curl -fsS --max-time 10 -o /dev/null --cacert {ca} \
                     --resolve repo:{SERVE_PORT}:127.0.0.1 https://repo:{SERVE_PORT}/fleet.yaml"
                ))
                .await?;
            Ok::<bool, anyhow::Error>(r.code == 0)
        }
    };
    let (new_cert, new_key) = other.issue(&pki, "repo-2", "repo")?;
    fleet
        .server
        .copy_in(&other.cert, "/tmp/other-ca.pem")
        .await?;
    ensure!(serves_with("/etc/keepup/ca.pem").await?);
    ensure!(!serves_with("/tmp/other-ca.pem").await?);
    let hup = "kill -HUP $(pgrep -x keepup)";
    fleet
        .server
        .ok(&format!("printf 'garbage\\n' >{REMOTE_TLS_CERT} && {hup}"))
        .await?;
    wait_for("the server to log the failed reload", PASS, || async {
        let log = fleet.server.ok("cat /var/log/keepup-serve.out").await?;
        Ok(
            log.contains("TLS reload failed, still serving the previous certificate")
                && log.contains(&format!("{REMOTE_TLS_CERT}: no certificate in it")),
        )
    })
    .await?;
    ensure!(
        serves_with("/etc/keepup/ca.pem").await?,
        "after a failed reload the old certificate must still be served"
    );
    fleet.server.copy_in(&new_cert, REMOTE_TLS_CERT).await?;
    fleet.server.copy_in(&new_key, REMOTE_TLS_KEY).await?;
    fleet.server.ok(hup).await?;
    let reloaded = wait_for("the new certificate to be served", PASS, || async {
        serves_with("/tmp/other-ca.pem").await
    })
    .await;
    fleet.explain(reloaded).await?;
    ensure!(
        !serves_with("/etc/keepup/ca.pem").await?,
        "the old certificate must be gone after the reload"
    );
    let log = fleet.server.ok("cat /var/log/keepup-serve.out").await?;
    ensure!(
        log.contains("SIGHUP: reloaded the TLS certificate"),
        "the reload must be logged:\n{log}"
    );
    Ok(())
}
