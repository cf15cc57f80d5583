//! TLS (rustls, on ring) for the coordinator's port and for the clients that dial it, and
//! the bearer token clients send.
//!
//! Every PEM file is read and parsed here before tonic sees it, so a missing, unreadable
//! or wrong file is an error naming it (tonic would silently skip an unparsable CA, or
//! fail with no file name).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::{Request, Status};

use super::AuthError;

/// How long a TLS handshake on the coordinator's port may take: a peer that opens a
/// connection and says nothing holds no task for longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads `path` and checks that it holds at least one PEM certificate.
fn read_certificates(path: &Path, what: &'static str) -> Result<Vec<u8>, AuthError> {
    let pem =
        std::fs::read(path).map_err(|source| AuthError::Read { path: path.to_path_buf(), what, source })?;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| AuthError::Pem { path: path.to_path_buf(), what, reason: e.to_string() })?;
        count += 1;
    }
    if count == 0 {
        return Err(AuthError::Pem {
            path: path.to_path_buf(),
            what,
            reason: "no `BEGIN CERTIFICATE` section".into(),
        });
    }
    Ok(pem)
}

/// Reads `path` and checks that it holds a PEM private key (PKCS#8, PKCS#1 or SEC1).
fn read_key(path: &Path, what: &'static str) -> Result<Vec<u8>, AuthError> {
    let pem =
        std::fs::read(path).map_err(|source| AuthError::Read { path: path.to_path_buf(), what, source })?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| AuthError::Pem {
        path: path.to_path_buf(),
        what,
        reason: match e {
            rustls_pki_types::pem::Error::NoItemsFound => "no `BEGIN … PRIVATE KEY` section".into(),
            other => other.to_string(),
        },
    })?;
    Ok(pem)
}

/// The coordinator's TLS: its certificate chain and key, and optionally the CA that
/// client certificates must chain to (mutual TLS: a client without one is refused in the
/// handshake).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    /// PEM certificate chain, the coordinator's own first (`--tls-cert`).
    pub cert: PathBuf,
    /// PEM private key (`--tls-key`).
    pub key: PathBuf,
    /// PEM CA certificates for client certificates (`--tls-ca`); `None`: no client
    /// certificates asked for.
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// Reads and checks the files into tonic's server configuration.
    pub fn load(&self) -> Result<ServerTlsConfig, AuthError> {
        let cert = read_certificates(&self.cert, "TLS certificate")?;
        let key = read_key(&self.key, "TLS key")?;
        let mut config =
            ServerTlsConfig::new().identity(Identity::from_pem(cert, key)).timeout(HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read_certificates(ca, "client CA")?));
        }
        Ok(config)
    }
}

/// How a client reaches a coordinator over TLS: the CA its certificate chains to, and a
/// client certificate for a coordinator that asks for one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM CA certificates the coordinator's certificate must chain to (`--tls-ca`).
    pub ca: PathBuf,
    /// This client's PEM certificate and key (`--tls-cert`, `--tls-key`), for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name the coordinator's certificate must carry, when it is not the URL's host.
    pub domain: Option<String>,
}

impl ClientTls {
    /// Reads and checks the files into tonic's client configuration.
    pub fn load(&self) -> Result<ClientTlsConfig, AuthError> {
        let ca = read_certificates(&self.ca, "TLS CA")?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = &self.identity {
            let cert = read_certificates(cert, "client TLS certificate")?;
            let key = read_key(key, "client TLS key")?;
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        Ok(config)
    }
}

/// A bearer token a client sends, as its `authorization` header value. Its `Debug` does
/// not show it.
#[derive(Clone)]
pub struct BearerToken(AsciiMetadataValue);

impl BearerToken {
    /// `token` as `Bearer TOKEN`; refused if it cannot travel in a header.
    pub fn new(token: &str) -> Result<BearerToken, AuthError> {
        let token = token.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuthError::BadToken);
        }
        let mut value: AsciiMetadataValue =
            MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| AuthError::BadToken)?;
        value.set_sensitive(true);
        Ok(BearerToken(value))
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// Adds the bearer token (if any) to every request of a client.
#[derive(Clone, Debug, Default)]
pub struct BearerInterceptor(Option<BearerToken>);

impl Interceptor for BearerInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request.metadata_mut().insert("authorization", token.0.clone());
        }
        Ok(request)
    }
}

/// A client's channel: a tonic channel whose every request carries the bearer token.
pub type AuthChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerInterceptor>;

/// What a client presents to a coordinator: TLS settings and a token, each optional.
#[derive(Clone, Debug, Default)]
pub struct ClientAuth {
    pub tls: Option<ClientTls>,
    pub token: Option<BearerToken>,
}

impl ClientAuth {
    /// The coordinator's URL as an endpoint: a bare `host:port` is `https://` with TLS and
    /// `http://` without; an explicit scheme must agree with the TLS settings.
    pub fn endpoint(&self, coordinator: &str) -> Result<Endpoint, AuthError> {
        let url = coordinator_url(coordinator, self.tls.is_some())?;
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| AuthError::Url { url: url.clone(), reason: e.to_string() })?;
        match &self.tls {
            None => Ok(endpoint),
            Some(tls) => {
                endpoint.tls_config(tls.load()?).map_err(|e| AuthError::Url { url, reason: e.to_string() })
            }
        }
    }

    /// The interceptor that sends the token.
    pub fn interceptor(&self) -> BearerInterceptor {
        BearerInterceptor(self.token.clone())
    }
}

/// `coordinator` with its scheme: `https://` with TLS, `http://` without, for a bare
/// `host:port`; a scheme that contradicts the TLS settings is an error.
pub fn coordinator_url(coordinator: &str, tls: bool) -> Result<String, AuthError> {
    let bad = |reason: &str| AuthError::Url { url: coordinator.to_string(), reason: reason.into() };
    match coordinator.split_once("://") {
        None => Ok(format!("{}://{coordinator}", if tls { "https" } else { "http" })),
        Some(("https", _)) if !tls => {
            Err(bad("an https:// coordinator needs --tls-ca (the CA its certificate chains to)"))
        }
        Some(("http", _)) if tls => Err(bad("TLS settings are given but the URL is http://; use https://")),
        Some(("http" | "https", _)) => Ok(coordinator.to_string()),
        Some(_) => Err(bad("the scheme must be http:// or https://")),
    }
}
