//! systemd's readiness protocol (`sd_notify`) for `supervisor.ready: notify` services: one
//! datagram socket per service, named by `NOTIFY_SOCKET` in the launch script's environment,
//! that takes `READY=1`, `STATUS=...`, `STOPPING=1`, `WATCHDOG=1` and `MAINPID=...` lines, so
//! daemons written for `Type=notify` work unchanged.
//!
//! Who may speak: the sockets live in a directory of the agent's (mode 0711 root, created
//! without following a link), each socket is owned by its service's role and mode 0600, so
//! only that role (and root) can send to it; the sender's credentials (`SCM_CREDENTIALS`) are
//! checked again on every datagram. A service can only ever speak for itself, and what it
//! can say is what it could already show by answering its probes.

use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::sys::socket::{recvmsg, sockopt, ControlMessageOwned, MsgFlags, UnixAddr};
use tokio::io::Interest;
use tokio::net::UnixDatagram;

/// One thing a daemon said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `READY=1`: started up.
    Ready,
    /// `STOPPING=1`: shutting down.
    Stopping,
    /// `WATCHDOG=1`: alive.
    Watchdog,
    /// `STATUS=...`: free text for `status`.
    Status(String),
    /// `MAINPID=...`: the daemon's main pid.
    MainPid(u32),
}

/// The messages in one datagram (newline-separated `KEY=VALUE` lines; unknown keys are
/// ignored, as systemd does).
pub fn parse(datagram: &[u8]) -> Vec<Message> {
    let text = String::from_utf8_lossy(datagram);
    text.lines()
        .filter_map(|line| {
            let (k, v) = line.split_once('=')?;
            match (k, v) {
                ("READY", "1") => Some(Message::Ready),
                ("STOPPING", "1") => Some(Message::Stopping),
                ("WATCHDOG", "1") => Some(Message::Watchdog),
                ("STATUS", s) => Some(Message::Status(s.chars().take(200).collect())),
                ("MAINPID", p) => p.parse().ok().filter(|&p| p > 1).map(Message::MainPid),
                _ => None,
            }
        })
        .collect()
}

/// A service's notify socket.
#[derive(Debug)]
pub struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    uid: u32,
}

impl NotifySocket {
    /// Binds `dir/<name>` for role `uid` (replacing a stale socket there).
    pub fn bind(dir: &Path, name: &str, uid: u32, gid: u32) -> std::io::Result<NotifySocket> {
        own_dir(dir)?;
        let path = dir.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {
                return Err(std::io::Error::other(format!(
                    "{} is a directory, not a notify socket",
                    path.display()
                )))
            }
            Ok(_) => std::fs::remove_file(&path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let sock = UnixDatagram::bind(&path)?;
        nix::sys::socket::setsockopt(&sock, sockopt::PassCred, &true)
            .map_err(std::io::Error::from)?;
        // Nobody but root can create entries in `dir`, so `path` is the socket just bound.
        nix::unistd::chown(
            &path,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .map_err(std::io::Error::from)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(NotifySocket { sock, path, uid })
    }

    /// The socket's path (`NOTIFY_SOCKET`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The role it was bound for.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The next datagram's messages, from the role or root; others are dropped.
    pub async fn recv(&self) -> Vec<Message> {
        loop {
            let got = self
                .sock
                .async_io(Interest::READABLE, || {
                    let mut buf = [0u8; 4096];
                    let mut iov = [IoSliceMut::new(&mut buf)];
                    let mut space = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
                    let msg = recvmsg::<UnixAddr>(
                        self.sock.as_raw_fd(),
                        &mut iov,
                        Some(&mut space),
                        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC,
                    )
                    .map_err(std::io::Error::from)?;
                    let mut uid = None;
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for c in cmsgs {
                            if let ControlMessageOwned::ScmCredentials(cred) = c {
                                uid = Some(cred.uid());
                            }
                        }
                    }
                    let n = msg.bytes.min(buf.len());
                    Ok((uid, buf[..n].to_vec()))
                })
                .await;
            match got {
                Ok((Some(uid), data)) if uid == self.uid || uid == 0 => return parse(&data),
                Ok(_) => continue,
                Err(_) => std::future::pending::<()>().await,
            }
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Creates `dir` (mode 0711, root) or checks it is a real directory of root's and fixes its
/// mode; a symlink in its place is refused.
fn own_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o711).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let m = std::fs::symlink_metadata(dir)?;
    if !m.is_dir() || m.uid() != nix::unistd::geteuid().as_raw() {
        return Err(std::io::Error::other(format!(
            "{} is not a directory of the agent's user; remove it",
            dir.display()
        )));
    }
    if m.mode() & 0o7777 != 0o711 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_systemd_notify_lines() {
        assert_eq!(
            parse(b"READY=1\nSTATUS=serving 3 clients\nMAINPID=4242\nX=1\n"),
            vec![
                Message::Ready,
                Message::Status("serving 3 clients".into()),
                Message::MainPid(4242)
            ]
        );
        assert_eq!(parse(b"WATCHDOG=1"), vec![Message::Watchdog]);
        assert_eq!(parse(b"STOPPING=1\nREADY=0"), vec![Message::Stopping]);
        assert_eq!(parse(b"MAINPID=1\nMAINPID=x"), vec![]);
        assert_eq!(parse(b"\xff\xfeREADY=1"), vec![]);
    }

    #[tokio::test]
    async fn a_datagram_from_the_role_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        let sock = NotifySocket::bind(&dir.path().join("n"), "svc", me, gid).unwrap();
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        client.send_to(b"READY=1\n", sock.path()).unwrap();
        assert_eq!(sock.recv().await, vec![Message::Ready]);
    }
}
