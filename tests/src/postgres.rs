//! A throwaway PostgreSQL cluster for tests: Debian's `postgresql` binaries (initdb, pg_ctl)
//! run as `nobody` (tests run as root; PostgreSQL refuses root) on a fresh data directory and
//! a free loopback port, stopped and deleted when dropped. The superuser `keepup` has a
//! password over TCP (what `keepup serve` uses) and trust over the cluster's own Unix socket
//! (what the test's `psql` checks use).
//!
//! Set `KEEPUP_SKIP_POSTGRES_TESTS=1` to skip the tests that need it; otherwise a missing
//! `initdb` is an error that says what to install.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, ensure, Context as _, Result};

/// The opt-out: set to 1, PostgreSQL tests skip (and say so).
pub const SKIP_ENV: &str = "KEEPUP_SKIP_POSTGRES_TESTS";
/// The superuser's password over TCP.
pub const PASSWORD: &str = "keepup-test-pw";
/// The database `keepup` gets.
pub const DATABASE: &str = "fleet";

/// Whether PostgreSQL tests run (false: skipped explicitly, said on stderr).
pub fn postgres_or_skip() -> bool {
    if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
        eprintln!("{SKIP_ENV}=1: skipping a PostgreSQL test");
        return false;
    }
    true
}

/// The directory of Debian's PostgreSQL server binaries (the newest installed major).
pub fn bin_dir() -> Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, b)) => Ok(b),
        None => bail!(
            "PostgreSQL's initdb is not installed (looked in /usr/lib/postgresql/*/bin): \
             `apt-get install postgresql` (tests/run.sh does), or set {SKIP_ENV}=1 to skip \
             the PostgreSQL tests"
        ),
    }
}

/// TLS for a [`PgCluster`]: the server's certificate chain and key (PEM), and whether TCP
/// clients must use TLS (every `host` line of pg_hba.conf becomes `hostssl`).
#[derive(Debug, Clone)]
pub struct PgTls {
    /// The server's certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// Refuse plaintext TCP connections.
    pub hostssl_only: bool,
}

/// A running throwaway cluster.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

fn as_nobody(bin: &Path, tool: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "nobody", "--"]).arg(bin.join(tool));
    c.current_dir("/");
    c
}

fn run(mut c: Command, what: &str) -> Result<Output> {
    let out = c.output().with_context(|| format!("running {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

impl PgCluster {
    /// initdb, start on a free port, create [`DATABASE`].
    pub fn start() -> Result<PgCluster> {
        PgCluster::start_with(None)
    }

    /// [`PgCluster::start`] with `ssl = on` and the given certificate (`log_connections` on,
    /// for tests that look at who got in); TCP clients must use TLS when `hostssl_only`.
    pub fn start_tls(tls: &PgTls) -> Result<PgCluster> {
        PgCluster::start_with(Some(tls))
    }

    fn start_with(tls: Option<&PgTls>) -> Result<PgCluster> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new().prefix("keepup-pg-").tempdir()?;
        let nobody = nix::unistd::User::from_name("nobody")?.context("no user nobody")?;
        nix::unistd::chown(dir.path(), Some(nobody.uid), Some(nobody.gid))?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, PASSWORD)?;
        nix::unistd::chown(&pwfile, Some(nobody.uid), Some(nobody.gid))?;
        let data = dir.path().join("data");
        let mut init = as_nobody(&bin, "initdb");
        init.arg("-D")
            .arg(&data)
            .args([
                "-U",
                "keepup",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        run(init, "initdb")?;
        let mut extra = String::new();
        if let Some(tls) = tls {
            // PostgreSQL wants its key owned by its user and private.
            let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
            std::fs::copy(&tls.cert, &cert)?;
            std::fs::copy(&tls.key, &key)?;
            for f in [&cert, &key] {
                nix::unistd::chown(f, Some(nobody.uid), Some(nobody.gid))?;
                std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600))?;
            }
            extra = format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={} -c log_connections=on",
                cert.display(),
                key.display()
            );
            if tls.hostssl_only {
                let hba = data.join("pg_hba.conf");
                let text = std::fs::read_to_string(&hba)?;
                let edited: Vec<String> = text
                    .lines()
                    .map(|l| match l.strip_prefix("host ") {
                        Some(rest) => format!("hostssl {rest}"),
                        None => l.to_string(),
                    })
                    .collect();
                ensure!(
                    edited.iter().any(|l| l.starts_with("hostssl ")),
                    "pg_hba.conf has no `host` line to make `hostssl`:\n{text}"
                );
                std::fs::write(&hba, edited.join("\n") + "\n")?;
            }
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let cluster = PgCluster { dir, bin, port };
        let mut start = as_nobody(&cluster.bin, "pg_ctl");
        start
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(cluster.dir.path().join("log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60{extra}",
                cluster.dir.path().display()
            ))
            .arg("start");
        if let Err(e) = run(start, "pg_ctl start") {
            let log = std::fs::read_to_string(cluster.dir.path().join("log")).unwrap_or_default();
            bail!("{e:#}\nserver log:\n{log}");
        }
        cluster.psql("postgres", &format!("CREATE DATABASE {DATABASE}"))?;
        Ok(cluster)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// The directory of the cluster's Unix socket (`.s.PGSQL.PORT`; `trust` lets `keepup` in).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cluster's TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://keepup@127.0.0.1:PORT/fleet`, with the password when asked.
    pub fn url(&self, with_password: bool) -> String {
        let pw = if with_password {
            format!(":{PASSWORD}")
        } else {
            String::new()
        };
        format!("postgres://keepup{pw}@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// Run `sql` in `db` over the Unix socket; the rows, `|`-separated, one a line.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let mut c = as_nobody(&self.bin, "psql");
        c.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "keepup",
                "-d",
                db,
                "-c",
                sql,
            ]);
        let out = run(c, &format!("psql {sql:?}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A `psql` session in `db` over the Unix socket that runs what is written to its stdin
    /// (rows on its stdout, `|`-separated): for a transaction held open across steps of a
    /// test. It ends when its stdin is closed.
    pub fn psql_session(&self, db: &str) -> Result<std::process::Child> {
        let mut c = as_nobody(&self.bin, "psql");
        c.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-U", "keepup", "-d", db])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        c.spawn().context("starting psql")
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut stop = as_nobody(&self.bin, "pg_ctl");
        stop.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = stop.output();
    }
}
