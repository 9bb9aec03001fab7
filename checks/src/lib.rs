//! Active health probes for keepup: TCP connect + banner, HTTP, and exec, each bounded by one timeout.
//!
//! A probe interacts with the service the way a client would; it never looks at processes,
//! pidfiles or listening sockets. Build a probe once (patterns are compiled and inputs checked at
//! construction), then call [`Probe::run`] as often as needed. Every run returns a
//! [`ProbeResult`] with a human-readable reason; runs never panic and never outlive their timeout
//! by more than the time needed to kill and reap an exec probe's processes.

#![warn(missing_docs)]

mod exec;
mod http;
mod tcp;
mod text;

use std::time::Duration;

pub use exec::{ExecProbe, ExecSpec, RunAs};
pub use http::{HttpProbe, HttpSpec, StatusRange};
pub use tcp::{TcpProbe, TcpSpec};

/// The outcome of one probe run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// Whether the service answered as expected within the timeout.
    pub ok: bool,
    /// What happened, for logs and status output (e.g. `"HTTP 500 (expected 200-399)"`).
    pub reason: String,
    /// Wall-clock time the run took, including any cleanup after a timeout.
    pub duration: Duration,
}

/// Why a probe could not be constructed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The TCP address is not `host:port`.
    #[error("invalid tcp address {addr:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A banner or body pattern does not compile.
    #[error("invalid {what} regex /{pattern}/: {reason}")]
    InvalidRegex {
        /// Which pattern: `"banner"` or `"body"`.
        what: &'static str,
        /// The pattern as given.
        pattern: String,
        /// The regex compiler's message.
        reason: String,
    },
    /// The URL does not parse or lacks a host.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The URL's scheme is not `http` (TLS is not supported).
    #[error("unsupported scheme {scheme:?} in URL {url:?}: only http:// is supported")]
    UnsupportedScheme {
        /// The URL as given.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// The HTTP method is not a valid token.
    #[error("invalid HTTP method {0:?}")]
    InvalidMethod(String),
    /// The expected status is not a code or an inclusive range within 100-599.
    #[error("invalid expected HTTP status {spec:?}: {reason}")]
    InvalidStatus {
        /// The status or range as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The Host header override is not a valid header value.
    #[error("invalid Host header {0:?}")]
    InvalidHost(String),
    /// The exec probe has no program to run.
    #[error("exec probe needs a non-empty argv")]
    EmptyCommand,
}

/// Any probe; the agent builds one per health check from the service manifest.
#[derive(Debug, Clone)]
pub enum Probe {
    /// Connect, optionally send bytes, optionally match the banner.
    Tcp(TcpProbe),
    /// Send one HTTP/1.1 request and check status and, optionally, body.
    Http(HttpProbe),
    /// Run a command without a shell; exit status 0 passes.
    Exec(ExecProbe),
}

impl Probe {
    /// Runs the probe once; `timeout` covers everything from connect or spawn to the verdict.
    pub async fn run(&self, timeout: Duration) -> ProbeResult {
        match self {
            Probe::Tcp(p) => p.run(timeout).await,
            Probe::Http(p) => p.run(timeout).await,
            Probe::Exec(p) => p.run(timeout).await,
        }
    }

    /// One-line summary for logs, e.g. `tcp 127.0.0.1:7070 expect /ready/`.
    pub fn describe(&self) -> String {
        match self {
            Probe::Tcp(p) => p.describe(),
            Probe::Http(p) => p.describe(),
            Probe::Exec(p) => p.describe(),
        }
    }
}

impl From<TcpProbe> for Probe {
    fn from(p: TcpProbe) -> Self {
        Probe::Tcp(p)
    }
}

impl From<HttpProbe> for Probe {
    fn from(p: HttpProbe) -> Self {
        Probe::Http(p)
    }
}

impl From<ExecProbe> for Probe {
    fn from(p: ExecProbe) -> Self {
        Probe::Exec(p)
    }
}
