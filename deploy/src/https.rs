//! The client side of keepup's HTTPS, shared by the agent (repository and report URLs) and
//! `keepup report`: parsing `http[s]://` URLs, the trusted CAs (a PEM file the operator names,
//! or the system's bundle), the rustls client configuration, and what a failed handshake means
//! in words an operator can act on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use rustls::{CertificateError, ClientConfig, RootCertStore};

/// Where a URL points: how to connect and what to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `https://`: TLS, verified against the trusted CAs for `server_name`.
    pub tls: bool,
    /// `host:port` to connect to.
    pub connect: String,
    /// The Host header (the URL's authority).
    pub host: String,
    /// The name the certificate must be valid for (the host, without port or brackets).
    pub server_name: String,
    /// The request target (path and query), `/` when the URL has none.
    pub path: String,
}

impl Target {
    /// Parses `http[s]://host[:port][/path]`; `Err` says what is wrong with the URL.
    pub fn parse(url: &str) -> Result<Target, String> {
        let (tls, rest) = match url.split_once("://") {
            Some(("http", rest)) => (false, rest),
            Some(("https", rest)) => (true, rest),
            _ => return Err(format!("{url}: not an http:// or https:// URL")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("{url}: no host (or a user part)"));
        }
        let port = authority.rsplit_once(':').filter(|(_, p)| {
            !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) && !authority.ends_with(']')
        });
        let (connect, name) = match port {
            Some((name, _)) => (authority.to_string(), name),
            None => (
                format!("{authority}:{}", if tls { 443 } else { 80 }),
                authority,
            ),
        };
        Ok(Target {
            tls,
            connect,
            host: authority.to_string(),
            server_name: name
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            path: path.to_string(),
        })
    }
}

/// Which CAs an `https://` connection trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Only the CAs in this PEM file.
    CaFile(PathBuf),
    /// The system's CA bundle (`SSL_CERT_FILE`, else the distribution's usual paths).
    System,
}

/// CA bundles of the common distributions, tried in order for [`Trust::System`]
/// (`SSL_CERT_FILE` first, as OpenSSL does).
pub const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Reads a PEM bundle of CA certificates; `Err` says what is wrong with the file.
pub fn read_ca_bundle(path: &Path) -> Result<RootCertStore, String> {
    let bad = |why: String| format!("{}: {why}", path.display());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(format!("cannot read it: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("not a valid PEM file: {e}")))?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(bad(
            "no usable CA certificate in it (expected PEM \"-----BEGIN CERTIFICATE-----\" \
             blocks)"
                .into(),
        ));
    }
    Ok(roots)
}

/// The CAs `trust` names; `fix` says how the user names a CA file (`"set ca_file to"`,
/// `"pass --ca-file with"`), for the message when there is no system bundle.
fn roots(trust: &Trust, fix: &str) -> Result<RootCertStore, String> {
    if let Trust::CaFile(p) = trust {
        return read_ca_bundle(p).map_err(|e| format!("CA file {e}"));
    }
    let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let found = env
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
        .find(|p| p.is_file());
    match found {
        Some(p) => read_ca_bundle(&p),
        None => Err(format!(
            "no system CA bundle ({}): install ca-certificates, or {fix} the CA that signed \
             the server's certificate",
            SYSTEM_BUNDLES.join(", ")
        )),
    }
}

/// A rustls client configuration (ring provider, safe protocol versions, HTTP/1.1 over ALPN)
/// trusting `trust`; `fix` as for the error when there is no system bundle.
pub fn client_config(trust: &Trust, fix: &str) -> Result<Arc<ClientConfig>, String> {
    let roots = roots(trust, fix)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What a failed handshake with `host` means and what to do about it; `fix` as for
/// [`client_config`].
pub fn explain_failure(host: &str, trust: &Trust, fix: &str, e: &std::io::Error) -> String {
    let trusting = match trust {
        Trust::CaFile(p) => format!("trusting the CA file {}", p.display()),
        Trust::System => "trusting the system's CAs".to_string(),
    };
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            CertificateError::UnknownIssuer => format!(
                "certificate signed by an unknown authority ({trusting}): {fix} the CA that \
                 signed the server's certificate"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "the server's certificate is not valid for {host:?}: use the name it was \
                     issued for in the URL, or issue it for {host:?} (subjectAltName)"
                )
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server's certificate has expired: renew it on the server".to_string()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet: check this host's clock".to_string()
            }
            other => format!("the server's certificate is refused: {other:?}"),
        },
        Some(rustls::Error::InvalidMessage(_)) => format!(
            "{host} did not answer with TLS (does it serve https on that port? use http:// for a \
             plain-HTTP server)"
        ),
        Some(other) => format!("handshake with {host} failed: {other}"),
        None => format!("handshake with {host} failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            Target::parse("http://repo.example:8080/pool/a.deb").unwrap(),
            Target {
                tls: false,
                connect: "repo.example:8080".into(),
                host: "repo.example:8080".into(),
                server_name: "repo.example".into(),
                path: "/pool/a.deb".into()
            }
        );
        assert_eq!(Target::parse("http://repo").unwrap().connect, "repo:80");
        assert_eq!(Target::parse("http://repo").unwrap().path, "/");
        assert_eq!(Target::parse("http://[::1]").unwrap().connect, "[::1]:80");
        assert_eq!(
            Target::parse("http://[::1]:81/x").unwrap().connect,
            "[::1]:81"
        );
        let t = Target::parse("https://repo/x").unwrap();
        assert!(t.tls);
        assert_eq!(
            (t.connect.as_str(), t.server_name.as_str()),
            ("repo:443", "repo")
        );
        let t = Target::parse("https://[::1]:8443/").unwrap();
        assert_eq!(
            (t.connect.as_str(), t.server_name.as_str()),
            ("[::1]:8443", "::1")
        );
        assert!(Target::parse("ftp://repo/x").is_err());
        assert!(Target::parse("http:///x").is_err());
        assert!(Target::parse("http://user@repo/x").is_err());
    }

    #[test]
    fn ca_bundles_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        let e = read_ca_bundle(&p).unwrap_err();
        assert!(e.contains("ca.pem: cannot read it"), "{e}");
        std::fs::write(&p, "hello\n").unwrap();
        let e = read_ca_bundle(&p).unwrap_err();
        assert!(e.contains("no usable CA certificate"), "{e}");
        let e = client_config(&Trust::CaFile(p), "set ca_file to").unwrap_err();
        assert!(e.starts_with("CA file "), "{e}");
    }
}
