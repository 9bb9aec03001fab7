//! TLS to PostgreSQL: libpq's `sslmode` and `sslrootcert` URL parameters, and the connector
//! the `postgres` driver uses (rustls on the ring provider, through tokio-rustls).
//!
//! What each mode checks, as libpq does:
//!
//! | `sslmode` | encrypted | server's certificate checked |
//! |---|---|---|
//! | `disable` | no | - |
//! | `prefer` | if the server offers TLS (a network can say it does not) | no |
//! | `require` | yes | no |
//! | `verify-ca` | yes | signed by a trusted CA |
//! | `verify-full` | yes | signed by a trusted CA and issued for the host in the URL |
//!
//! keepup's default (no `sslmode`) is `disable` for a loopback address or a Unix socket, and
//! `verify-full` for any other host: the password never goes to a server that has not proved
//! who it is. The certificate is checked in the TLS handshake, before the startup message, so
//! a refused server gets neither the user name nor the password.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use postgres::Socket;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// libpq's `sslmode`: whether the connection is encrypted and what of the server is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext.
    Disable,
    /// TLS if the server offers it, plaintext otherwise; the certificate is not checked.
    Prefer,
    /// TLS; the certificate is not checked.
    Require,
    /// TLS; the certificate must chain to a trusted CA (any name).
    VerifyCa,
    /// TLS; the certificate must chain to a trusted CA and be issued for the host's name.
    VerifyFull,
}

impl SslMode {
    /// Parses libpq's spelling (`allow` is taken as `prefer`, as it also falls back to
    /// plaintext); `Err` lists the accepted values.
    pub fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other} is not a mode: write disable, prefer, require, verify-ca \
                     or verify-full"
                ))
            }
        })
    }

    /// libpq's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// The driver's mode: whether TLS is asked for, and whether a server without it is
    /// refused (the certificate checks are ours, in [`connector`]).
    pub fn driver(self) -> postgres::config::SslMode {
        match self {
            SslMode::Disable => postgres::config::SslMode::Disable,
            SslMode::Prefer => postgres::config::SslMode::Prefer,
            _ => postgres::config::SslMode::Require,
        }
    }
}

/// Which CAs a verified connection trusts (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// The CAs in this PEM file.
    File(PathBuf),
    /// The system's CA bundle (`sslrootcert=system`, or no file named and no
    /// `~/.postgresql/root.crt`).
    System,
}

impl RootCert {
    /// What `sslrootcert` says, else libpq's default file `~/.postgresql/root.crt` when it
    /// exists, else the system's bundle.
    pub fn resolve(given: Option<&str>) -> RootCert {
        match given {
            Some("system") => RootCert::System,
            Some(f) => RootCert::File(PathBuf::from(f)),
            None => std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".postgresql/root.crt"))
                .filter(|p| p.is_file())
                .map_or(RootCert::System, RootCert::File),
        }
    }

    fn store(&self) -> Result<RootCertStore, String> {
        match self {
            RootCert::File(p) => keepup_deploy::https::read_ca_bundle(p).map_err(|e| {
                format!("sslrootcert: {e}; name the CA that signed the server's certificate")
            }),
            RootCert::System => {
                let found = std::env::var_os("SSL_CERT_FILE")
                    .map(PathBuf::from)
                    .into_iter()
                    .chain(
                        keepup_deploy::https::SYSTEM_BUNDLES
                            .iter()
                            .map(PathBuf::from),
                    )
                    .find(|p| p.is_file());
                match found {
                    Some(p) => keepup_deploy::https::read_ca_bundle(&p),
                    None => Err(format!(
                        "no system CA bundle ({}): add sslrootcert=FILE (the CA that signed the \
                         server's certificate) to the URL",
                        keepup_deploy::https::SYSTEM_BUNDLES.join(", ")
                    )),
                }
            }
        }
    }

    /// How the trusted CAs are named in messages.
    pub fn describe(&self) -> String {
        match self {
            RootCert::File(p) => format!("trusting the CA file {}", p.display()),
            RootCert::System => "trusting the system's CAs".to_string(),
        }
    }
}

/// The rustls configuration for `mode` (`None` for [`SslMode::Disable`]); `Err` when the
/// trusted CAs cannot be read, saying what to fix.
pub fn connector(mode: SslMode, root: &RootCert) -> Result<Option<PgTls>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer | SslMode::Require => Arc::new(Unverified(provider.clone())),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let web = WebPkiServerVerifier::builder_with_provider(
                Arc::new(root.store()?),
                provider.clone(),
            )
            .build()
            .map_err(|e| format!("sslrootcert: {e}"))?;
            if mode == SslMode::VerifyCa {
                Arc::new(AnyName(web))
            } else {
                web
            }
        }
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // What libpq 17 sends; servers before 17 ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Some(PgTls(Arc::new(config))))
}

/// What a refused certificate means and what to do about it, for `host` under `mode`.
pub fn explain_certificate(
    host: &str,
    mode: SslMode,
    root: &RootCert,
    e: &CertificateError,
) -> String {
    let trusting = root.describe();
    match e {
        CertificateError::UnknownIssuer => match root {
            RootCert::File(_) => format!(
                "its certificate is signed by an unknown authority ({trusting}): if this is \
                 your database, point sslrootcert at the CA that signed its certificate; \
                 otherwise something else answers at this address"
            ),
            RootCert::System => format!(
                "its certificate is signed by an unknown authority ({trusting}): add \
                 sslrootcert=FILE to the URL with the CA that signed the server's certificate"
            ),
        },
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!(
                "its certificate is not issued for {host:?}: put the name it was issued for in \
                 the URL, issue it for {host:?} (subjectAltName){}",
                if mode == SslMode::VerifyFull {
                    ", or use sslmode=verify-ca to check only the CA"
                } else {
                    ""
                }
            )
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "its certificate has expired: renew it on the server".to_string()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "its certificate is not valid yet: check this host's clock".to_string()
        }
        other => format!("its certificate is refused ({other:?}, {trusting})"),
    }
}

/// The connector handed to the driver: one rustls configuration, a handshake per host.
#[derive(Clone)]
pub struct PgTls(Arc<ClientConfig>);

impl MakeTlsConnect<Socket> for PgTls {
    type Stream = PgTlsStream;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<PgTlsConnect> {
        let name = ServerName::try_from(domain.to_string()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{domain:?} is not a host name TLS can check: {e}"),
            )
        })?;
        Ok(PgTlsConnect {
            config: self.0.clone(),
            name,
        })
    }
}

/// One handshake, with the name the certificate is checked against.
pub struct PgTlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for PgTlsConnect {
    type Stream = PgTlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let s = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(PgTlsStream(Box::new(s)))
        })
    }
}

/// An established TLS session to PostgreSQL.
pub struct PgTlsStream(Box<tokio_rustls::client::TlsStream<Socket>>);

impl TlsStream for PgTlsStream {
    /// No channel binding: tls-server-end-point needs the hash named by the certificate's
    /// signature algorithm, which rustls does not expose; SCRAM without it is still safe
    /// under `verify-full`, where the server is authenticated by its certificate.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for PgTlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for PgTlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// `verify-ca`: the chain must reach a trusted CA; the name is not checked (libpq's meaning).
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain (and its validity period) before the name, so a name error
        // means everything else passed.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require` and `prefer`: encryption against a passive listener only; any certificate is
/// taken (the handshake's signatures are still checked, so the session is with the holder of
/// the key the certificate names).
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_as_libpq_spells_them() {
        for m in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
            assert_eq!(SslMode::parse(m).unwrap().as_str(), m);
        }
        assert_eq!(SslMode::parse("allow").unwrap(), SslMode::Prefer);
        assert!(SslMode::parse("verify")
            .unwrap_err()
            .contains("verify-full"));
    }
}
