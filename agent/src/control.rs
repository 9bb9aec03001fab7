//! The control socket: a Unix stream socket (`/run/keepup/agent.sock` by default) that takes
//! one JSON request line per connection and answers with one JSON response line. The
//! `keepup-agent status|down|up|rekick|check|update` commands are its clients; connecting to it
//! at all proves the agent is alive. Only root can connect (the socket is mode 0600).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::policy::{short_duration, State};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client waits for an answer (`check` runs probes, bounded by their timeouts).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Every service's state.
    Status,
    /// Admin-down a service: persist the mark, stop it.
    Down {
        /// Service name.
        service: String,
    },
    /// Clear the admin-down mark and start the service.
    Up {
        /// Service name.
        service: String,
    },
    /// Start given-up services again now (one, or all when `None`).
    Rekick {
        /// Service name, or every service.
        #[serde(default)]
        service: Option<String>,
    },
    /// Run a service's probes now and report.
    Check {
        /// Service name.
        service: String,
    },
    /// Run an update pass now and report its plan and result.
    Update,
}

/// The agent's answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What was done, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Per-service state (`status`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceStatus>,
    /// Probe results (`check`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<ProbeStatus>,
    /// The pass (`update`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<Box<crate::update::pass::PassResult>>,
}

impl Response {
    /// A success with a message.
    pub fn done(message: impl Into<String>) -> Response {
        Response {
            ok: true,
            message: Some(message.into()),
            ..Response::default()
        }
    }

    /// A failure with a reason.
    pub fn failed(error: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(error.into()),
            ..Response::default()
        }
    }
}

/// One service as `status` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// Package version from the manifest.
    pub version: String,
    /// `agent` or `systemd`.
    pub supervisor: String,
    /// Current state.
    pub state: State,
    /// The launch script's pid (agent-supervised, while running).
    #[serde(default)]
    pub pid: Option<u32>,
    /// Seconds since the current run started.
    #[serde(default)]
    pub uptime_secs: Option<f64>,
    /// Starts after the first one since the agent started or the version changed.
    pub restarts: u64,
    /// How the last run ended, e.g. `exit status 3 after 1.2s`.
    #[serde(default)]
    pub last_exit: Option<String>,
    /// Extra information, e.g. when a given-up service is re-kicked next.
    #[serde(default)]
    pub note: Option<String>,
    /// Latest result of each probe.
    #[serde(default)]
    pub probes: Vec<ProbeStatus>,
}

/// The latest result of one probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeStatus {
    /// Check name from the manifest.
    pub name: String,
    /// What the probe does (`tcp 127.0.0.1:7070 expect /ready/`).
    pub probe: String,
    /// Pass or fail; `None` before the first run.
    #[serde(default)]
    pub ok: Option<bool>,
    /// Why, from the probe.
    #[serde(default)]
    pub reason: Option<String>,
    /// Consecutive failures so far.
    pub failures: u32,
    /// Seconds since the result.
    #[serde(default)]
    pub age_secs: Option<f64>,
}

/// A request from a client, with the way back.
pub type Incoming = (Request, oneshot::Sender<Response>);

/// Binds the control socket at `path` (replacing a stale socket file: the caller holds the
/// agent lock, so no live agent owns it), mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(listener)
}

/// A client must send its request line within this long, or it is hung up on.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the socket's backlog.
const MAX_CONNECTIONS: usize = 16;

/// Accepts connections forever, handing each request to `to_agent`. At most
/// [`MAX_CONNECTIONS`] are served at once, and each must send its request within
/// [`READ_TIMEOUT`], so clients that connect and say nothing cannot pile up.
pub async fn serve(listener: UnixListener, to_agent: mpsc::Sender<Incoming>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let to_agent = to_agent.clone();
        tokio::spawn(async move {
            let _ = answer(stream, to_agent).await;
            drop(permit);
        });
    }
}

async fn answer(stream: UnixStream, to_agent: mpsc::Sender<Incoming>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(
        READ_TIMEOUT,
        BufReader::new(read.take(MAX_REQUEST)).read_line(&mut line),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no request within {READ_TIMEOUT:?}"))??;
    let response = match serde_json::from_str::<Request>(line.trim()) {
        Err(e) => Response::failed(format!("bad request: {e}")),
        Ok(req) => {
            let (tx, rx) = oneshot::channel();
            if to_agent.send((req, tx)).await.is_err() {
                Response::failed("the agent is shutting down")
            } else {
                rx.await.unwrap_or_else(|_| {
                    Response::failed(
                        "the agent dropped the request (the service was removed, or the agent \
                         is stopping)",
                    )
                })
            }
        }
    };
    let mut text = serde_json::to_string(&response)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await?;
    Ok(())
}

/// Whether an agent answers on `socket` (something accepts connections there).
pub async fn agent_answers(socket: &Path) -> bool {
    UnixStream::connect(socket).await.is_ok()
}

/// Sends one request to the agent at `socket` and returns its answer (waiting at most
/// [`CLIENT_TIMEOUT`], or much longer for an update pass).
pub async fn request(socket: &Path, req: &Request) -> Result<Response> {
    let limit = if *req == Request::Update {
        UPDATE_TIMEOUT
    } else {
        CLIENT_TIMEOUT
    };
    request_within(socket, req, limit).await
}

/// How long `update --now` waits for the agent's pass (package-manager runs are bounded by
/// `package_timeout` each).
const UPDATE_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

async fn request_within(socket: &Path, req: &Request, limit: Duration) -> Result<Response> {
    let run = async {
        let stream = UnixStream::connect(socket).await.with_context(|| {
            format!(
                "cannot reach keepup-agent at {}: is it running (`keepup-agent run`)? \
                 Are you root?",
                socket.display()
            )
        })?;
        let (read, mut write) = stream.into_split();
        let mut text = serde_json::to_string(req)?;
        text.push('\n');
        write.write_all(text.as_bytes()).await?;
        let mut line = String::new();
        BufReader::new(read).read_line(&mut line).await?;
        if line.trim().is_empty() {
            if *req == Request::Update {
                bail!(
                    "keepup-agent stopped before the pass ended (stopped or restarted, e.g. by \
                     an upgrade of keepup-agent itself; a package-manager run in flight was \
                     let finish): see `journalctl -u keepup-agent` and run `keepup-agent \
                     update --now` again"
                );
            }
            bail!("keepup-agent closed the connection without answering");
        }
        serde_json::from_str::<Response>(line.trim()).context("reading the agent's answer")
    };
    tokio::time::timeout(limit, run)
        .await
        .map_err(|_| anyhow::anyhow!("keepup-agent did not answer within {limit:?}"))?
}

/// The `status` table: one line per service, then its probes indented.
pub fn render_status(services: &[ServiceStatus]) -> String {
    let mut rows = vec![[
        "SERVICE".to_string(),
        "STATE".into(),
        "UPTIME".into(),
        "RESTARTS".into(),
        "LAST EXIT".into(),
    ]];
    for s in services {
        rows.push([
            s.name.clone(),
            s.state.to_string(),
            s.uptime_secs
                .map(|u| short_duration(Duration::from_secs_f64(u.max(0.0))))
                .unwrap_or_else(|| "-".into()),
            s.restarts.to_string(),
            s.last_exit.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (n, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if n == 0 {
            continue;
        }
        let s = &services[n - 1];
        if let Some(note) = &s.note {
            out.push_str(&format!("    {note}\n"));
        }
        for p in &s.probes {
            out.push_str(&format!("    {}\n", render_probe(p)));
        }
    }
    if services.is_empty() {
        out.push_str("(no services: no manifests in the manifest directory)\n");
    }
    out
}

/// One probe result line: `probe banner: ok (12ms ago) tcp 127.0.0.1:7070: ...`.
pub fn render_probe(p: &ProbeStatus) -> String {
    let verdict = match p.ok {
        None => "not run yet".to_string(),
        Some(true) => "ok".to_string(),
        // A probe that cannot run (a broken manifest) fails without a streak.
        Some(false) if p.failures == 0 => "FAILED".to_string(),
        Some(false) => format!("FAILED ({} in a row)", p.failures),
    };
    let age = p
        .age_secs
        .map(|a| {
            format!(
                " {} ago",
                short_duration(Duration::from_secs_f64(a.max(0.0)))
            )
        })
        .unwrap_or_default();
    let reason = p
        .reason
        .as_deref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    format!("probe {} [{}]: {verdict}{age}{reason}", p.name, p.probe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json() {
        let r: Request = serde_json::from_str(r#"{"cmd":"down","service":"foo"}"#).unwrap();
        assert_eq!(
            r,
            Request::Down {
                service: "foo".into()
            }
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"rekick"}"#).unwrap();
        assert_eq!(r, Request::Rekick { service: None });
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"cmd":"status"}"#
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"update"}"#).unwrap();
        assert_eq!(r, Request::Update);
    }

    #[test]
    fn status_table_lines_up() {
        let s = ServiceStatus {
            name: "foo".into(),
            version: "1.0.0-1".into(),
            supervisor: "agent".into(),
            state: State::GivenUp,
            pid: None,
            uptime_secs: None,
            restarts: 9,
            last_exit: Some("exit status 3 after 1.0s".into()),
            note: Some("re-kick in 4m10s".into()),
            probes: vec![ProbeStatus {
                name: "banner".into(),
                probe: "tcp 127.0.0.1:7070".into(),
                ok: Some(false),
                reason: Some("connection refused".into()),
                failures: 2,
                age_secs: Some(3.0),
            }],
        };
        let t = render_status(&[s]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "SERVICE  STATE     UPTIME  RESTARTS  LAST EXIT");
        assert_eq!(
            lines[1],
            "foo      given-up  -       9         exit status 3 after 1.0s"
        );
        assert_eq!(lines[2], "    re-kick in 4m10s");
        assert_eq!(
            lines[3],
            "    probe banner [tcp 127.0.0.1:7070]: FAILED (2 in a row) 3s ago: connection refused"
        );
    }
}
