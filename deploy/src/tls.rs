//! HTTPS for `keepup serve` (`--tls-cert FILE --tls-key FILE`): the PEM certificate chain and
//! private key are read into a rustls server configuration (ring provider), held behind an
//! [`Acceptor`] that every accepted connection clones and that a reload swaps atomically:
//! connections already open keep the configuration they started with, new ones get the new
//! one. A reload that fails (a missing file, a key that does not match the certificate) keeps
//! the old configuration and says why. Every handshake is bounded by [`HANDSHAKE_TIMEOUT`], so
//! a client that connects and says nothing cannot hold a connection.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// How long a client has to finish the TLS handshake after connecting.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The certificate chain and key files of `keepup serve --tls-cert/--tls-key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain: the server's certificate first, then intermediates.
    pub cert: PathBuf,
    /// PEM private key: PKCS#8, RSA (PKCS#1) or SEC1 (EC).
    pub key: PathBuf,
}

/// Why the certificate or key could not be used.
#[derive(Debug)]
pub struct TlsError {
    /// The file at fault (or the certificate file, when the two do not fit together).
    pub file: PathBuf,
    /// What is wrong with it.
    pub kind: TlsErrorKind,
}

/// What is wrong with a certificate or key file.
#[derive(Debug)]
pub enum TlsErrorKind {
    /// The file cannot be read.
    Read(std::io::Error),
    /// The file is not PEM, or holds no item of the expected kind.
    Pem(String),
    /// rustls refused the pair (e.g. the key does not match the certificate).
    Refused(rustls::Error),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        match &self.kind {
            TlsErrorKind::Read(e) => write!(f, "{file}: cannot read it: {e}"),
            TlsErrorKind::Pem(why) => write!(f, "{file}: {why}"),
            TlsErrorKind::Refused(e) => write!(
                f,
                "{file}: the certificate and key cannot be used together: {e} (is the key the \
                 one the certificate was issued for?)"
            ),
        }
    }
}

impl std::error::Error for TlsError {}

fn pem_error(file: &Path, what: &str, e: rustls::pki_types::pem::Error) -> TlsError {
    use rustls::pki_types::pem::Error as P;
    let kind = match e {
        P::Io(e) => TlsErrorKind::Read(e),
        P::NoItemsFound => TlsErrorKind::Pem(format!(
            "no {what} in it (expected a PEM file with a \"-----BEGIN {}-----\" block)",
            if what == "certificate" {
                "CERTIFICATE"
            } else {
                "PRIVATE KEY"
            }
        )),
        other => TlsErrorKind::Pem(format!("not a valid PEM file: {other}")),
    };
    TlsError {
        file: file.to_path_buf(),
        kind,
    }
}

/// Reads the PEM chain and key and builds a server configuration (HTTP/1.1 over TLS 1.2 or
/// 1.3).
pub fn load(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| pem_error(&files.cert, "certificate", e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error(&files.cert, "certificate", e))?;
    if certs.is_empty() {
        return Err(pem_error(
            &files.cert,
            "certificate",
            rustls::pki_types::pem::Error::NoItemsFound,
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| pem_error(&files.key, "private key", e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError {
            file: files.cert.clone(),
            kind: TlsErrorKind::Refused(e),
        })?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError {
            file: files.cert.clone(),
            kind: TlsErrorKind::Refused(e),
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS side of the listener: the files, and the configuration new connections get.
/// Cloning shares the same configuration slot.
#[derive(Clone)]
pub struct Acceptor {
    files: TlsFiles,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl Acceptor {
    /// Loads `files`; fails (naming the file and what is wrong) if they cannot serve.
    pub fn new(files: TlsFiles) -> Result<Acceptor, TlsError> {
        let config = load(&files)?;
        Ok(Acceptor {
            files,
            current: Arc::new(RwLock::new(config)),
        })
    }

    /// Reads the files again; on success new connections use them, on failure the old
    /// configuration stays and the error says why.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = load(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// Runs the TLS handshake on an accepted connection, within [`HANDSHAKE_TIMEOUT`].
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        let config = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let handshake = tokio_rustls::TlsAcceptor::from(config).accept(stream);
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake not done in time",
            )),
        }
    }

    /// Reloads on every SIGHUP, for as long as the process runs; logs each outcome.
    pub fn reload_on_sighup(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup())?;
        let me = self.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match me.reload() {
                    Ok(()) => eprintln!(
                        "keepup: SIGHUP: reloaded the TLS certificate {} and key {}",
                        me.files.cert.display(),
                        me.files.key.display()
                    ),
                    Err(e) => eprintln!(
                        "keepup: SIGHUP: TLS reload failed, still serving the previous \
                         certificate: {e}"
                    ),
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_and_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        };
        let e = load(&files).unwrap_err();
        assert!(matches!(e.kind, TlsErrorKind::Read(_)), "{e}");
        assert!(e.to_string().contains("cert.pem: cannot read it"), "{e}");
        std::fs::write(&files.cert, "not pem at all\n").unwrap();
        let e = load(&files).unwrap_err();
        assert!(
            e.to_string().contains("cert.pem: no certificate in it"),
            "{e}"
        );
        std::fs::write(
            &files.cert,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = load(&files).unwrap_err();
        assert!(e.to_string().contains("key.pem: cannot read it"), "{e}");
        std::fs::write(&files.key, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
        let e = load(&files).unwrap_err();
        assert!(e.to_string().contains("key.pem: "), "{e}");
    }
}
