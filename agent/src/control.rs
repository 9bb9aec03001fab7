//! The control socket: a Unix stream socket (`/run/keepup/agent.sock` by default) that takes
//! one JSON request line per connection and answers with one JSON response line. The
//! `keepup-agent status|down|up|rekick|check|update` commands are its clients, and so is the
//! agent's own `keepup-agent-pass` child (`status`, `events`, `event`); connecting to it at all
//! proves the agent is alive.
//!
//! Who may ask what: the agent reads the client's credentials from the connection
//! (`SO_PEERCRED`). Root may make every request; members of `status_group` (none by default)
//! may make the read-only ones (`status`); anyone else is answered "permission denied". The
//! socket lives in a directory of its own that the agent creates or fixes at start, without
//! following a symlink and whatever the umask: mode 0750 root:`status_group` (0700 root:root
//! without a group), the socket 0660 (0600), so others cannot even reach it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

pub use crate::proto::{Incoming, Request, Response};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client waits for an answer (`check` runs probes, bounded by their timeouts).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Who asks, from the connection's credentials (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The client's uid.
    pub uid: u32,
    /// Whether the client is a member of `status_group` (false when none is configured).
    pub in_status_group: bool,
}

/// Whether `peer` may make `req`: root everything, a `status_group` member the read-only
/// requests; `Err` is the answer to everyone else.
pub fn permitted(req: &Request, peer: Peer) -> Result<(), String> {
    if peer.uid == 0 || (peer.in_status_group && req.read_only()) {
        return Ok(());
    }
    Err(format!(
        "permission denied: `keepup-agent {}` needs root (uid {} asked){}",
        req.describe(),
        peer.uid,
        if req.read_only() {
            "; members of the agent's status_group may run it (`status_group` in \
             /etc/keepup/agent.yaml)"
        } else {
            ""
        }
    ))
}

/// Whether user `uid`, whose connection carries primary group `peer_gid`, is a member of
/// group `gid`: by that primary group, by the account's own primary group, or as a listed
/// member (`getgrouplist`, which may ask NSS: call it on a blocking thread).
fn in_group(uid: u32, peer_gid: u32, gid: u32) -> bool {
    use nix::unistd::{Gid, Uid, User};
    if peer_gid == gid {
        return true;
    }
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return false;
    };
    if user.gid.as_raw() == gid {
        return true;
    }
    let Ok(name) = std::ffi::CString::new(user.name) else {
        return false;
    };
    nix::unistd::getgrouplist(&name, user.gid)
        .is_ok_and(|groups| groups.contains(&Gid::from_raw(gid)))
}

/// Directories that are never the control socket's own: the agent would lock everyone out of
/// them.
const SHARED_DIRS: &[&str] = &[
    "/", "/run", "/var/run", "/tmp", "/var/tmp", "/dev/shm", "/var", "/var/lib", "/etc", "/usr",
    "/root", "/home",
];

/// Makes `dir` the control socket's directory: created if missing, then, through a descriptor
/// opened without following a symlink, owned by the agent's uid and `group` (else its own
/// gid), mode 0750 with a group, 0700 without. Refuses a symlink, a directory of another user
/// and a shared directory (sticky, world-writable, or a system one).
pub fn own_dir(dir: &Path, group: Option<u32>) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
    let shown = dir.display();
    let own_directory = "the control socket needs a directory of its own, e.g. \
                         /run/keepup/agent.sock (`socket` in /etc/keepup/agent.yaml)";
    if SHARED_DIRS.iter().any(|d| Path::new(d) == dir) {
        bail!("socket: {shown} is a shared system directory: {own_directory}");
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {shown}")),
    }
    let fd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
        .open(dir)
        .map_err(|e| match e.raw_os_error() {
            Some(nix::libc::ELOOP) | Some(nix::libc::ENOTDIR) => anyhow::anyhow!(
                "{shown} is a symlink or not a directory: remove it ({own_directory})"
            ),
            _ => anyhow::anyhow!("opening {shown}: {e}"),
        })?;
    let meta = fd.metadata().with_context(|| format!("reading {shown}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        bail!(
            "{shown} belongs to uid {}, not {me}: remove it ({own_directory})",
            meta.uid()
        );
    }
    // A directory of ours that is merely too open (left 0777 under umask 000) is fixed below;
    // a sticky one is a shared one (like /tmp), whatever it is called.
    if meta.mode() & 0o1000 != 0 {
        bail!(
            "{shown} is shared (mode {:04o}, sticky): {own_directory}",
            meta.mode() & 0o7777
        );
    }
    let gid = group.unwrap_or_else(|| nix::unistd::getegid().as_raw());
    std::os::unix::fs::fchown(&fd, Some(me), Some(gid))
        .with_context(|| format!("chown {me}:{gid} {shown}"))?;
    let mode = if group.is_some() { 0o750 } else { 0o700 };
    fd.set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {shown}"))?;
    Ok(())
}

/// Binds the control socket at `path` (replacing a stale socket file: the caller holds the
/// agent lock, so no live agent owns it) in its own directory ([`own_dir`]): mode 0660 and
/// group `group`, or 0600 without one. The socket is created 0600 whatever the umask.
pub fn bind(path: &Path, group: Option<u32>) -> Result<UnixListener> {
    use nix::sys::stat::{umask, Mode};
    use std::os::unix::fs::PermissionsExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .with_context(|| format!("socket: {} has no directory", path.display()))?;
    own_dir(dir, group)?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    // The agent has started no thread or child yet: nothing else creates files meanwhile.
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener =
        bound.with_context(|| format!("binding the control socket {}", path.display()))?;
    let mode = match group {
        Some(gid) => {
            std::os::unix::fs::lchown(path, None, Some(gid))
                .with_context(|| format!("chgrp {gid} {}", path.display()))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
    Ok(listener)
}

/// The gid of `status_group`, or `None` (root only) when it is not set or does not exist (said
/// on stderr: a typo must not keep the agent, and so every service, from starting).
pub fn status_gid(group: Option<&str>) -> Option<u32> {
    let name = group?;
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Some(g.gid.as_raw()),
        Ok(None) => {
            eprintln!(
                "keepup-agent: status_group: there is no group {name:?}; the control socket is \
                 root's only (create it with `groupadd --system {name}`, then restart the agent)"
            );
            None
        }
        Err(e) => {
            eprintln!(
                "keepup-agent: status_group: cannot look up group {name:?} ({e}); the control \
                 socket is root's only"
            );
            None
        }
    }
}

/// A client must send its request line within this long, or it is hung up on.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the socket's backlog.
const MAX_CONNECTIONS: usize = 16;

/// Accepts connections forever, handing each request to `to_agent`. At most
/// [`MAX_CONNECTIONS`] are served at once, and each must send its request within
/// [`READ_TIMEOUT`], so clients that connect and say nothing cannot pile up.
pub async fn serve(
    listener: UnixListener,
    to_agent: mpsc::Sender<Incoming>,
    status_gid: Option<u32>,
) {
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
            let _ = answer(stream, to_agent, status_gid).await;
            drop(permit);
        });
    }
}

/// Whether the client with credentials `cred` may make `req`.
async fn check_peer(
    cred: &std::io::Result<tokio::net::unix::UCred>,
    req: &Request,
    status_gid: Option<u32>,
) -> Result<(), String> {
    let cred = cred
        .as_ref()
        .map_err(|e| format!("permission denied: cannot tell who is asking ({e})"))?;
    let uid = cred.uid();
    let in_status_group = match status_gid {
        Some(gid) if uid != 0 && req.read_only() => {
            let peer_gid = cred.gid();
            tokio::task::spawn_blocking(move || in_group(uid, peer_gid, gid))
                .await
                .unwrap_or(false)
        }
        _ => false,
    };
    permitted(
        req,
        Peer {
            uid,
            in_status_group,
        },
    )
    .inspect_err(|why| {
        eprintln!(
            "keepup-agent: control socket: {why} (pid {})",
            cred.pid().map_or("?".to_string(), |p| p.to_string())
        );
    })
}

async fn answer(
    stream: UnixStream,
    to_agent: mpsc::Sender<Incoming>,
    status_gid: Option<u32>,
) -> Result<()> {
    // Read when the client connected (`SO_PEERCRED`), not from what it sends.
    let cred = stream.peer_cred();
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
        Ok(req) => match check_peer(&cred, &req, status_gid).await {
            Err(why) => Response::failed(why),
            Ok(()) => {
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
        },
    };
    let mut text = serde_json::to_string(&response)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await?;
    Ok(())
}

/// Whether an agent answers on `socket` (something accepts connections there); an error when
/// one may run but this user may not reach it (not root, not in `status_group`).
pub async fn agent_answers(socket: &Path) -> Result<bool> {
    match UnixStream::connect(socket).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(denied(socket, &e)),
        Err(_) => Ok(false),
    }
}

/// The client's error when the socket (or its directory) is closed to it.
fn denied(socket: &Path, e: &std::io::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "permission denied: cannot reach keepup-agent's control socket {} ({e}): only root may \
         talk to the agent (and members of its status_group, for `status`)",
        socket.display()
    )
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

/// Sends one request and waits at most `limit` for the answer.
pub async fn request_within(socket: &Path, req: &Request, limit: Duration) -> Result<Response> {
    let run = async {
        let stream = UnixStream::connect(socket).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                denied(socket, &e)
            } else {
                anyhow::anyhow!(
                    "cannot reach keepup-agent at {} ({e}): is it running (`keepup-agent \
                     run`)?",
                    socket.display()
                )
            }
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

/// [`request_within`] without a runtime: for code that must not yield meanwhile (an event
/// forwarded by the pass child is in the supervisor's ring before the child goes on).
pub fn request_blocking(socket: &Path, req: &Request, limit: Duration) -> Result<Response> {
    use std::io::{BufRead, Write};
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(limit))?;
    stream.set_write_timeout(Some(limit))?;
    let mut text = serde_json::to_string(req)?;
    text.push('\n');
    (&stream).write_all(text.as_bytes())?;
    let mut line = String::new();
    std::io::BufReader::new(&stream).read_line(&mut line)?;
    if line.trim().is_empty() {
        bail!("keepup-agent closed the connection without answering");
    }
    serde_json::from_str::<Response>(line.trim()).context("reading the agent's answer")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{render_status, ProbeStatus, ServiceStatus};
    use keepup_deploy::wire::ServiceState;

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
        // What the pass child sends: an event (kind as reports spell it), and the ring.
        let r: Request = serde_json::from_str(
            r#"{"cmd":"event","kind":"upgrade","service":"foo","message":"upgraded foo"}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::Event {
                kind: keepup_deploy::wire::EventKind::Upgrade,
                service: Some("foo".into()),
                message: "upgraded foo".into(),
            }
        );
        assert_eq!(r.describe(), "event upgrade");
        let r: Request = serde_json::from_str(r#"{"cmd":"events"}"#).unwrap();
        assert_eq!(r, Request::Events);
    }

    #[test]
    fn root_does_everything_the_status_group_only_reads() {
        let all = [
            Request::Status,
            Request::Down {
                service: "foo".into(),
            },
            Request::Up {
                service: "foo".into(),
            },
            Request::Rekick { service: None },
            Request::Check {
                service: "foo".into(),
            },
            Request::Update,
            Request::Event {
                kind: keepup_deploy::wire::EventKind::Install,
                service: Some("foo".into()),
                message: "installed foo 1.0-1".into(),
            },
            Request::Events,
        ];
        let root = Peer {
            uid: 0,
            in_status_group: false,
        };
        let viewer = Peer {
            uid: 1001,
            in_status_group: true,
        };
        let other = Peer {
            uid: 1002,
            in_status_group: false,
        };
        for req in &all {
            assert_eq!(permitted(req, root), Ok(()), "{req:?}");
            let why = permitted(req, other).unwrap_err();
            assert!(
                why.starts_with(&format!(
                    "permission denied: `keepup-agent {}` needs root",
                    req.describe()
                )),
                "{why}"
            );
            assert!(why.contains("uid 1002"), "{why}");
            let viewer_may = permitted(req, viewer).is_ok();
            assert_eq!(viewer_may, *req == Request::Status, "{req:?}");
        }
        assert!(permitted(&all[0], other)
            .unwrap_err()
            .contains("status_group"));
        assert_eq!(all[1].describe(), "down foo");
    }

    #[test]
    fn the_socket_directory_is_fixed_without_following_links() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("keepup");
        // A lax directory left by someone (or an older agent) is fixed, whatever the umask.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let gid = nix::unistd::getegid().as_raw();
        own_dir(&dir, Some(gid)).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, 0o750);
        own_dir(&dir, None).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, 0o700);
        // Created fresh.
        let fresh = base.path().join("a/b");
        own_dir(&fresh, None).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o7777, 0o700);
        // The socket itself: 0600 although the umask is 000.
        let sock = base.path().join("s/agent.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let l = bind(&sock, None).unwrap();
        nix::sys::stat::umask(old);
        assert_eq!(std::fs::metadata(&sock).unwrap().mode() & 0o777, 0o600);
        drop(l);
        // A symlink in its place is refused, and its target left alone.
        let target = base.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = own_dir(&link, None).unwrap_err();
        assert!(format!("{e:#}").contains("symlink"), "{e:#}");
        assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o7777, 0o755);
        // Shared directories are never taken over.
        let e = own_dir(Path::new("/tmp"), None).unwrap_err();
        assert!(format!("{e:#}").contains("shared"), "{e:#}");
        let sticky = base.path().join("sticky");
        std::fs::create_dir(&sticky).unwrap();
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = own_dir(&sticky, None).unwrap_err();
        assert!(format!("{e:#}").contains("shared"), "{e:#}");
    }

    #[test]
    fn status_table_lines_up() {
        let s = ServiceStatus {
            name: "foo".into(),
            version: "1.0.0-1".into(),
            supervisor: "agent".into(),
            state: ServiceState::GivenUp,
            pid: None,
            uptime_secs: None,
            restarts: 9,
            last_exit: Some("exit status 3 after 1.0s".into()),
            note: Some("re-kick in 4m10s".into()),
            run: None,
            ready_secs: None,
            status_text: None,
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
