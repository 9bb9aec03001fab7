//! `keepup-demo`: the README's main command (`bash tests/demo.sh` runs it). Starts a small
//! fleet of Debian host containers (two on `testing`, three on `stable`, one of them an RPM
//! host), `keepup serve` over HTTPS with a certificate from a CA the demo makes (openssl; the
//! agents trust it as `ca_file`), publishes the example service `foo` and promotes it, and
//! shows the fleet converging in `keepup report`. The fleet page is on
//! https://127.0.0.1:PORT/ (a loopback forwarder to the server container). Then it waits
//! for the user to try things, and removes every container on Ctrl-C.
//!
//! `--once` stops after the fleet has converged (for CI).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use keepup_tests::fleet::{converged, Fleet, FleetTls, HostSpec, Timers, SERVE_PORT};
use keepup_tests::host::workspace_root;
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};

const USAGE: &str = "usage: keepup-demo [--once] [--port N]";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut once = false;
    let mut port = 8080u16;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--once" => once = true,
            "--port" => {
                port = args
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| die(USAGE))
            }
            _ => die(USAGE),
        }
    }
    let dir = workspace_root().join("target/keepup-demo");
    let result = tokio::select! {
        r = run(&dir, once, port) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\nkeepup-demo: Ctrl-C: removing the fleet's containers...");
            Ok(())
        }
    };
    // Containers and the network are removed when `run`'s fleet is dropped (above).
    if let Err(e) = result {
        eprintln!("keepup-demo: {e:#}");
        std::process::exit(1);
    }
    eprintln!(
        "keepup-demo: done; the repository stays in {}",
        dir.display()
    );
}

fn die(msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(2);
}

fn step(msg: &str) {
    println!("\n==> {msg}");
}

async fn run(dir: &Path, once: bool, port: u16) -> Result<()> {
    if std::process::Command::new("docker")
        .arg("info")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        bail!("the demo needs Docker: start the Docker daemon (docker info must work)");
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let timers = Timers {
        schedule: "*/20 * * * * *".into(),
        stagger: Duration::from_secs(15),
        package_timeout: Duration::from_secs(120),
        report_every: Duration::from_secs(5),
    };
    let hosts = [
        HostSpec::deb("testing-1"),
        HostSpec::deb("testing-2"),
        HostSpec::deb("stable-1"),
        HostSpec::deb("stable-2"),
        HostSpec::rpm("stable-3"),
    ];
    step("starting keepup serve and 5 hosts (the first run builds the Debian host image: a few minutes)");
    let pki = dir.join("pki");
    let tls = FleetTls::generate(&pki)?;
    println!(
        "    TLS: CA {} (the agents' ca_file), server certificate {} for `repo` and 127.0.0.1",
        tls.ca.display(),
        tls.cert.display()
    );
    let fleet = Fleet::start_with_tls(dir, &hosts, &timers, Some(tls.clone())).await?;
    let page = forward(port, &fleet).await?;
    println!(
        "    fleet page: {page}  (refreshes itself; `curl --cacert {} {page}`)",
        tls.ca.display()
    );

    step("assigning testing-* to the testing track and stable-* to stable");
    fleet.op(&["assign", "testing-*", "--track", "testing"])?;
    fleet.op(&["assign", "stable-*", "--track", "stable"])?;

    step("publishing foo 1.0.0 and promoting it to testing and stable");
    print!("{}", fleet.publish_example(dir, "1.0.0", |s| s)?);
    fleet.op(&["promote", "foo", "--to", "testing"])?;
    fleet.op(&["promote", "foo", "--to", "stable"])?;
    watch(&fleet, Duration::from_secs(240)).await?;

    step("publishing foo 1.1.0 and promoting it to testing only");
    print!("{}", fleet.publish_example(dir, "1.1.0", |s| s)?);
    fleet.op(&["promote", "foo", "--to", "testing"])?;
    watch(&fleet, Duration::from_secs(240)).await?;

    let repo = fleet.repo.display().to_string();
    let keepup = workspace_root().join("target/debug/keepup");
    let k = keepup.display();
    println!(
        "\nThe fleet has converged: testing runs foo 1.1.0, stable runs 1.0.0.\n\
         \nTry next (in another terminal), and watch {page} or\n\
         `{k} report --server {report} --ca-file {ca}`:\n\
         \x20 {k} promote --repo {repo} foo --to stable                 # stable follows, host by host\n\
         \x20 {k} quarantine --repo {repo} foo --hosts stable-1         # stable-1 removes foo\n\
         \x20 {k} unquarantine --repo {repo} foo                        # and gets it back\n\
         \x20 {k} rollback --repo {repo} foo --to 1.0.0 --track testing # old payload, newer version\n\
         \x20 docker exec {net}-testing-1 pkill -KILL -u foo            # the agent restarts foo\n\
         \nPress Ctrl-C to remove the fleet.",
        net = fleet.net.name(),
        report = page.trim_end_matches('/'),
        ca = tls.ca.display(),
    );
    if once {
        return Ok(());
    }
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// Prints `keepup report` every few seconds until nothing is behind or unhealthy.
async fn watch(fleet: &Fleet, within: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let table = fleet
            .report("")
            .await
            .unwrap_or_else(|e| format!("{e:#}\n"));
        println!(
            "\n--- keepup report ({}s)\n{table}",
            start.elapsed().as_secs()
        );
        let names: Vec<&str> = fleet.hosts.iter().map(|h| h.name()).collect();
        if let Ok(v) = fleet.report_json().await {
            if converged(&v, &names, "foo") {
                return Ok(());
            }
        }
        if start.elapsed() > within {
            bail!(
                "the fleet did not converge within {within:?}; agent logs:\n{}",
                fleet.logs().await
            );
        }
    }
}

/// Forwards 127.0.0.1:`port` (or the next free port) to the server container, so the page
/// and `keepup report` work from this machine. Returns the page's URL.
async fn forward(port: u16, fleet: &Fleet) -> Result<String> {
    let ip = fleet
        .server
        .ok("hostname -I | awk '{print $1}'")
        .await?
        .trim()
        .to_string();
    let mut listener = None;
    for p in port..port + 20 {
        if let Ok(l) = TcpListener::bind(("127.0.0.1", p)).await {
            listener = Some(l);
            break;
        }
    }
    let listener = listener.with_context(|| format!("no free port on 127.0.0.1 from {port}"))?;
    let url = format!("{}://{}/", fleet.scheme(), listener.local_addr()?);
    let target = format!("{ip}:{SERVE_PORT}");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut up) = TcpStream::connect(&target).await {
                    let _ = copy_bidirectional(&mut conn, &mut up).await;
                }
            });
        }
    });
    Ok(url)
}
