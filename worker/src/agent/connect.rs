//! Reaching the coordinator: the [`Connector`] that makes a channel to it, registration
//! with its retry policy (exponential backoff with jitter; fatal refusals), and what the
//! worker says about itself (`WorkerInfo`: host, cores, memory, data-plane address).
//!
//! Invariant: a registration attempt uses a channel of its own, asked of the connector
//! when the attempt begins; nothing of a failed attempt is reused.
//!
//! Credentials: [`CoordinatorTls`] (the CA the coordinator's certificate chains to, and a
//! client certificate for a coordinator with mutual TLS) goes into the endpoint
//! [`run_worker`](super::run_worker) dials, and the [`WorkerToken`] rides on every call of
//! the channel, whatever connector made it. The token's text is never logged: its `Debug`
//! is redacted, and errors never quote it.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::PROTOCOL_VERSION;
use flotilla_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use flotilla_proto::v1::{Device, Registration, WorkerInfo};
use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};
use tonic::{Code, Request, Status};

use super::data_plane::{DataPlane, Listening};
use super::{AgentError, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, RPC_TIMEOUT, WorkerOptions};

/// Makes the agent's channel to the coordinator, once per registration attempt: a tonic
/// [`Endpoint`] dialed over TCP ([`Connector::endpoint`], what [`super::run_worker`]
/// uses), or any function that yields a [`Channel`] ([`Connector::from_fn`]), such as
/// `Endpoint::connect_with_connector` over an in-process duplex stream or a simulated
/// network's socket.
#[derive(Clone)]
pub struct Connector {
    connect: Arc<dyn Fn() -> BoxFuture<'static, Result<Channel, tonic::transport::Error>> + Send + Sync>,
    what: String,
    /// Whether what travels over its channels is safe from the network: TLS, or no
    /// network at all (in process). The data-plane secret arrives over it.
    confidential: bool,
}

impl Connector {
    /// Dials `endpoint` (its URI, timeouts and keepalive as configured on it).
    /// Confidential when the URI is `https://` (tonic dials those only with TLS).
    pub fn endpoint(endpoint: Endpoint) -> Self {
        let what = endpoint.uri().to_string();
        let tls = endpoint.uri().scheme_str() == Some("https");
        Connector::from_fn(what, move || {
            let endpoint = endpoint.clone();
            async move { endpoint.connect().await }
        })
        .with_confidential(tls)
    }

    /// Calls `connect` for every registration attempt; `what` names the coordinator in
    /// `Debug` output. Not confidential unless [`Connector::with_confidential`] says so.
    pub fn from_fn<F, Fut>(what: impl Into<String>, connect: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Channel, tonic::transport::Error>> + Send + 'static,
    {
        Connector { connect: Arc::new(move || Box::pin(connect())), what: what.into(), confidential: false }
    }

    /// Declares whether this connector's channels are safe from the network (TLS, or no
    /// network at all): the worker's data-plane listening rule depends on it.
    pub fn with_confidential(mut self, confidential: bool) -> Self {
        self.confidential = confidential;
        self
    }

    /// Whether this connector's channels are safe from the network.
    pub fn is_confidential(&self) -> bool {
        self.confidential
    }

    /// An in-process link to a coordinator in this process: every channel the connector
    /// makes is a tokio duplex stream (`buffer` bytes each way) whose far end comes out of
    /// the returned [`InProcessIncoming`], the connections a server accepts (the
    /// coordinator's `serve_with_incoming` takes it as is). No socket, no port; the link
    /// breaks when the server drops the stream's end or the incoming is dropped.
    /// Confidential: nothing leaves the process.
    pub fn in_process(buffer: usize) -> (Connector, InProcessIncoming) {
        let (accepted, incoming) = mpsc::unbounded_channel();
        let connector = Connector::from_fn("in-process", move || {
            let accepted: mpsc::UnboundedSender<Result<DuplexStream, std::io::Error>> = accepted.clone();
            // The URI is only the HTTP/2 authority: the connector below makes the stream.
            let endpoint = Endpoint::from_static("http://in-process")
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT);
            async move {
                endpoint
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let (near, far) = tokio::io::duplex(buffer);
                        let sent = accepted.send(Ok(far)).map_err(|_| {
                            std::io::Error::new(
                                std::io::ErrorKind::ConnectionRefused,
                                "the in-process coordinator accepts no more connections",
                            )
                        });
                        async move { sent.map(|()| TokioIo::new(near)) }
                    }))
                    .await
            }
        });
        (connector.with_confidential(true), UnboundedReceiverStream::new(incoming))
    }

    /// A new channel to the coordinator.
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        (self.connect)().await
    }
}

/// The server's end of [`Connector::in_process`]: one duplex stream per connection made.
pub type InProcessIncoming = UnboundedReceiverStream<Result<DuplexStream, std::io::Error>>;

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("coordinator", &self.what)
            .field("confidential", &self.confidential)
            .finish()
    }
}

/// TLS to the coordinator: the CA its certificate must chain to, and this worker's
/// certificate for a coordinator that asks for one (mutual TLS).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoordinatorTls {
    /// PEM CA certificates (`--tls-ca`).
    pub ca: PathBuf,
    /// This worker's PEM certificate and key (`--tls-cert`, `--tls-key`).
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name the coordinator's certificate must carry, when it is not the URL's host.
    pub domain: Option<String>,
}

impl CoordinatorTls {
    /// Reads and checks the files: an error names the option and the file.
    fn load(&self) -> Result<ClientTlsConfig, AgentError> {
        let ca = read_certificates(&self.ca, "tls_ca")?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert_path, key_path)) = &self.identity {
            let cert = read_certificates(cert_path, "tls_cert")?;
            let key = read_file(key_path, "tls_key")?;
            PrivateKeyDer::from_pem_slice(&key).map_err(|e| AgentError::InvalidOption {
                option: "tls_key",
                reason: format!("{} holds no PEM private key: {e}", key_path.display()),
            })?;
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        Ok(config)
    }
}

fn read_file(path: &Path, option: &'static str) -> Result<Vec<u8>, AgentError> {
    std::fs::read(path)
        .map_err(|e| AgentError::InvalidOption { option, reason: format!("reading {}: {e}", path.display()) })
}

fn read_certificates(path: &Path, option: &'static str) -> Result<Vec<u8>, AgentError> {
    let pem = read_file(path, option)?;
    let bad = |reason: String| AgentError::InvalidOption {
        option,
        reason: format!("{}: {reason}", path.display()),
    };
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| bad(e.to_string()))?;
        count += 1;
    }
    if count == 0 {
        return Err(bad("no `BEGIN CERTIFICATE` section".into()));
    }
    Ok(pem)
}

/// The bearer token a worker sends (a `worker` token of the coordinator's token file).
/// Its `Debug` does not show it.
#[derive(Clone)]
pub struct WorkerToken(AsciiMetadataValue);

impl WorkerToken {
    /// `token` as an `authorization: Bearer TOKEN` value; refused if it is empty or has
    /// characters other than visible ASCII.
    pub fn new(token: &str) -> Result<WorkerToken, AgentError> {
        let token = token.trim();
        let invalid = || AgentError::InvalidOption {
            option: "token",
            reason: "is empty or has characters other than visible ASCII".into(),
        };
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid());
        }
        let mut value: AsciiMetadataValue =
            MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| invalid())?;
        value.set_sensitive(true);
        Ok(WorkerToken(value))
    }
}

impl fmt::Debug for WorkerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WorkerToken(<redacted>)")
    }
}

/// Puts the worker's token (if any) on every call.
#[derive(Clone, Debug)]
pub(super) struct TokenInterceptor(Option<WorkerToken>);

impl Interceptor for TokenInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request.metadata_mut().insert("authorization", token.0.clone());
        }
        Ok(request)
    }
}

/// The agent's client of the coordinator: every call carries the worker's token.
pub(super) type CoordinatorClient = CoordinatorServiceClient<InterceptedService<Channel, TokenInterceptor>>;

/// The coordinator's URL as a tonic endpoint (a bare `host:port` is `https://` with TLS,
/// `http://` without), with TLS as `options.tls` says, the connection timeout and HTTP/2
/// keepalive pings (which notice a coordinator that vanished without closing).
pub(super) fn endpoint(options: &WorkerOptions) -> Result<Endpoint, AgentError> {
    let invalid = |reason: &str| AgentError::InvalidOption { option: "coordinator", reason: reason.into() };
    let tls = options.tls.is_some();
    let url = match options.coordinator.split_once("://") {
        None => format!("{}://{}", if tls { "https" } else { "http" }, options.coordinator),
        Some(("https", _)) if !tls => {
            return Err(invalid("an https:// coordinator needs tls_ca (the CA its certificate chains to)"));
        }
        Some(("http", _)) if tls => return Err(invalid("TLS settings are given but the URL is http://")),
        Some(_) => options.coordinator.clone(),
    };
    let mut endpoint = Endpoint::from_shared(url)
        .map_err(|e| AgentError::InvalidOption { option: "coordinator", reason: e.to_string() })?;
    if let Some(tls) = &options.tls {
        endpoint = endpoint
            .tls_config(tls.load()?)
            .map_err(|e| AgentError::InvalidOption { option: "tls_ca", reason: e.to_string() })?;
    }
    Ok(endpoint
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// Exponential backoff with "equal jitter": each delay is drawn from `[d/2, d]` where `d`
/// doubles from `initial` up to `max`, so that many workers restarted together do not dial
/// in lockstep.
pub(super) struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    hasher: RandomState,
    draws: u64,
}

impl Backoff {
    pub(super) fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max, current: initial, hasher: RandomState::new(), draws: 0 }
    }

    pub(super) fn reset(&mut self) {
        self.current = self.initial;
    }

    pub(super) fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (d * 2).min(self.max);
        // Randomness without a dependency: std's randomly keyed hasher over a counter.
        self.draws += 1;
        let mut h = self.hasher.build_hasher();
        h.write_u64(self.draws);
        let unit = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
        d / 2 + d.mul_f64(unit / 2.0)
    }
}

pub(super) enum RegisterError {
    /// Retrying cannot help.
    Fatal(String),
    /// Try again after the backoff.
    Retry(String),
}

pub(super) async fn register<D: DataPlane>(
    coordinator: &Connector,
    options: &WorkerOptions,
    plane: &mut Listening<D>,
) -> Result<(CoordinatorClient, Registration), RegisterError> {
    plane.ensure(options).await.map_err(|e| RegisterError::Retry(format!("data plane: {e}")))?;
    let channel = coordinator
        .connect()
        .await
        .map_err(|e| RegisterError::Retry(format!("connecting to {}: {e}", options.coordinator)))?;
    let mut client =
        CoordinatorServiceClient::with_interceptor(channel, TokenInterceptor(options.token.clone()));
    let info = worker_info(options, &plane.advertised);
    let registered = timeout(RPC_TIMEOUT, client.register(info))
        .await
        .map_err(|_| RegisterError::Retry(format!("Register took over {RPC_TIMEOUT:?}")))?;
    let registration = match registered {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let reason = format!("Register: {}: {}", status.code(), status.message());
            return Err(match status.code() {
                Code::FailedPrecondition
                | Code::InvalidArgument
                | Code::PermissionDenied
                | Code::Unauthenticated => RegisterError::Fatal(reason),
                _ => RegisterError::Retry(reason),
            });
        }
    };
    if registration.protocol_version != PROTOCOL_VERSION {
        return Err(RegisterError::Fatal(format!(
            "the coordinator speaks protocol version {}, this worker {PROTOCOL_VERSION}",
            registration.protocol_version
        )));
    }
    if registration.session_id.is_empty() || registration.worker_id.is_empty() {
        return Err(RegisterError::Retry("the registration has no worker or session id".into()));
    }
    Ok((client, registration))
}

fn worker_info(options: &WorkerOptions, data_plane_address: &str) -> WorkerInfo {
    let host = host_name();
    WorkerInfo {
        worker_id: options.worker_id.clone().unwrap_or_default(),
        node_id: options.node_id.clone().unwrap_or_else(|| host.clone()),
        host,
        cores: std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX)),
        devices: vec![Device {
            kind: "cpu".into(),
            index: 0,
            name: "cpu".into(),
            memory_bytes: options.memory_bytes.unwrap_or_else(memory_bytes),
        }],
        data_plane_address: data_plane_address.to_string(),
        protocol_version: PROTOCOL_VERSION,
        local_rank: options.local_rank,
        pid: std::process::id(),
    }
}

/// The kernel's host name, else `$HOSTNAME`, else "localhost".
pub(super) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".into())
}

/// Physical memory from `/proc/meminfo` (0 where unknown).
fn memory_bytes() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else { return 0 };
    text.lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib.saturating_mul(1024))
}
