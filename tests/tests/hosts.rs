//! Fleet test foundations: the registry-free host image, hosts on a private network, and the
//! example daemon `food` behaving (and misbehaving) as later supervision tests expect.

use std::path::Path;
use std::time::Duration;

use keepup_tests::image::Recipe;
use keepup_tests::{docker_or_skip, Host, TestNet};

const FOOD: &str = env!("CARGO_BIN_EXE_food");

#[test]
fn recipe_tag_is_stable_and_tracks_every_part() {
    let fixed = Recipe {
        packages: vec!["procps".into(), "rpm".into()],
        script: "apt-get clean\n".into(),
        version: "v1".into(),
    };
    // Pinned: a change here means every developer and CI rebuilds the image.
    assert_eq!(fixed.tag(), "99420d896f9a");
    assert_eq!(fixed.reference(), format!("keepup-host:{}", fixed.tag()));

    let standard = Recipe::standard().tag();
    assert_eq!(standard, Recipe::standard().tag());
    assert_eq!(standard.len(), 12);
    assert!(standard
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));

    let mut other = fixed.clone();
    other.packages.push("curl".into());
    assert_ne!(other.tag(), fixed.tag(), "packages must change the tag");
    let mut other = fixed.clone();
    other.script.push_str("true\n");
    assert_ne!(other.tag(), fixed.tag(), "the script must change the tag");
    let mut other = fixed.clone();
    other.version = "v2".into();
    assert_ne!(other.tag(), fixed.tag(), "the version must change the tag");
    // Parts are length-prefixed: moving text between them changes the tag.
    let mut other = fixed.clone();
    other.version = "v1apt-get clean\n".into();
    other.script = String::new();
    assert_ne!(other.tag(), fixed.tag());
}

#[tokio::test(flavor = "multi_thread")]
async fn hosts_are_debian_12_with_the_tools_keepup_needs() -> anyhow::Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let internal = std::process::Command::new("docker")
        .args(["network", "inspect", "-f", "{{.Internal}}", net.name()])
        .output()?;
    assert_eq!(String::from_utf8_lossy(&internal.stdout).trim(), "true");
    let host = Host::start(&net, "tools").await?;
    assert!(host.ok("cat /etc/debian_version").await?.starts_with("12"));
    assert_eq!(host.ok("hostname").await?.trim(), "tools");
    for cmd in [
        "dpkg --version",
        "rpm --version",
        "useradd --help",
        "setpriv --version",
        "ps --version",
        "pkill --version",
        "dnf --version",
        "curl --version",
        "ip -V",
        "gpg --version",
    ] {
        host.ok(cmd).await?;
    }
    assert_eq!(host.ok("id -u").await?.trim(), "0");
    // Root sees other users' processes fully, as on a real host (kill-by-uid relies on it).
    host.ok("useradd --system probe || exit 1
         setpriv --reuid=probe --regid=probe --clear-groups sleep 60 >/dev/null 2>&1 &
         sleep 0.5; [ \"$(stat -c %U /proc/$!)\" = probe ] || exit 1
         tr '\\0' '\\n' </proc/$!/environ | grep -q PATH")
        .await?;
    assert!(host.ok("ls /var/lib/apt/lists").await?.trim().is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_reports_failures_and_times_out() -> anyhow::Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let mut host = Host::start(&net, "slow").await?;
    let e = host.exec("echo out; echo err >&2; exit 7").await?;
    assert_eq!(
        (e.code, e.stdout.as_str(), e.stderr.as_str()),
        (7, "out\n", "err\n")
    );
    let msg = format!(
        "{:#}",
        host.ok("echo out; echo err >&2; exit 7").await.unwrap_err()
    );
    for part in ["slow", "exit 7", "exited 7", "out", "err"] {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }
    host.set_exec_timeout(Duration::from_secs(2));
    let msg = format!("{:#}", host.exec("sleep 30").await.unwrap_err());
    assert!(msg.contains("still running after 2 s"), "{msg}");
    Ok(())
}

/// Starts `food ARGS` in the background on `host` and waits until its banner port listens.
async fn start_food(host: &Host, args: &str, banner_port: u16) -> anyhow::Result<()> {
    host.ok(&format!(
        "nohup /usr/local/bin/food {args} >/tmp/food-{banner_port}.log 2>&1 &"
    ))
    .await?;
    wait_listening(host, banner_port).await
}

async fn wait_listening(host: &Host, port: u16) -> anyhow::Result<()> {
    host.ok(&format!(
        "for i in $(seq 100); do nc -z localhost {port} && exit 0; sleep 0.1; done; \
         echo 'nothing listens on {port}'; cat /tmp/food-*.log; exit 1"
    ))
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn food_serves_across_the_test_network() -> anyhow::Result<()> {
    if !docker_or_skip() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let (a, b) = tokio::try_join!(Host::start(&net, "host-a"), Host::start(&net, "host-b"))?;
    a.copy_in(Path::new(FOOD), "/usr/local/bin/food").await?;
    let version = a.ok("/usr/local/bin/food --version").await?;
    assert_eq!(
        version.trim(),
        format!("food {}", env!("CARGO_PKG_VERSION"))
    );

    // Defaults: banner on 7070, HTTP on 7071, reached by host name from the other host.
    start_food(&a, "", 7070).await?;
    let banner = b.ok("nc -w 3 host-a 7070").await?;
    assert_eq!(
        banner,
        format!("food {} ready\n", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(b.ok("curl -fsS http://host-a:7071/healthz").await?, "ok\n");
    let code = "curl -s -o /dev/null -w '%{http_code}'";
    assert_eq!(
        b.ok(&format!("{code} http://host-a:7071/nope")).await?,
        "404"
    );

    // A config file, with a flag overriding it.
    a.ok("printf 'banner = hello from a\\nbanner_port = 7076\\nhttp_port = 9\\n' >/etc/food.conf")
        .await?;
    start_food(&a, "--config /etc/food.conf --http-port 7077", 7076).await?;
    assert_eq!(b.ok("nc -w 3 host-a 7076").await?, "hello from a\n");
    assert_eq!(b.ok("curl -fsS http://host-a:7077/healthz").await?, "ok\n");

    // A second copy on taken ports refuses to start, saying why.
    let e = a.exec("/usr/local/bin/food").await?;
    assert_ne!(e.code, 0);
    assert!(e.stderr.contains("already in use"), "{e:?}");

    // --fail-health: the health endpoint answers 500.
    start_food(
        &a,
        "--fail-health --banner-port 7072 --http-port 7073",
        7072,
    )
    .await?;
    assert_eq!(
        b.ok(&format!("{code} http://host-a:7073/healthz")).await?,
        "500"
    );

    // --crash-after: exits 3.
    let e = a
        .exec("/usr/local/bin/food --crash-after 1 --banner-port 7078 --http-port 7079")
        .await?;
    assert_eq!(e.code, 3, "{e:?}");
    assert!(e.stdout.contains("crashing as asked"), "{e:?}");

    // --hang-after: still alive and accepting, but answers nothing.
    start_food(
        &a,
        "--hang-after 2 --banner-port 7074 --http-port 7075",
        7074,
    )
    .await?;
    assert!(b.ok("nc -w 3 host-a 7074").await?.starts_with("food"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(b.ok("nc -w 2 host-a 7074 || true").await?, "");
    let e = b.exec("curl -sS -m 2 http://host-a:7075/healthz").await?;
    assert_eq!(e.code, 28, "curl should time out: {e:?}");
    assert!(a.ok("ps -eo args").await?.contains("--hang-after 2"));

    // --daemonize: the command returns at once; a grandchild in its own session serves on.
    let out = a
        .ok(
            "/usr/local/bin/food --daemonize --banner-port 7080 --http-port 7081 \
             >/tmp/food-7080.log 2>&1; echo \"rc=$? shell=$$\"",
        )
        .await?;
    let shell = out
        .trim()
        .strip_prefix("rc=0 shell=")
        .expect(&out)
        .to_string();
    wait_listening(&a, 7080).await?;
    let ps = a.ok("ps -eo pid=,ppid=,sid=,args=").await?;
    let daemon: Vec<&str> = ps
        .lines()
        .find(|l| l.contains("food --daemonize"))
        .expect(&ps)
        .split_whitespace()
        .collect();
    let (pid, ppid, sid) = (daemon[0], daemon[1], daemon[2]);
    assert_ne!(ppid, shell, "{ps}");
    assert_ne!(
        pid, sid,
        "double fork: the daemon must not lead its session: {ps}"
    );
    assert!(b.ok("nc -w 3 host-a 7080").await?.starts_with("food"));
    Ok(())
}
