//! Reaching the coordinator: the [`Connector`] that makes a channel to it, registration
//! with its retry policy (exponential backoff with jitter; fatal refusals), and what the
//! worker says about itself (`WorkerInfo`: host, cores, memory, data-plane address).
//!
//! Invariant: a registration attempt uses a channel of its own, asked of the connector
//! when the attempt begins; nothing of a failed attempt is reused.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::PROTOCOL_VERSION;
use flotilla_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use flotilla_proto::v1::{Device, Registration, WorkerInfo};
use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint, Uri};

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
}

impl Connector {
    /// Dials `endpoint` (its URI, timeouts and keepalive as configured on it).
    pub fn endpoint(endpoint: Endpoint) -> Self {
        let what = endpoint.uri().to_string();
        Connector::from_fn(what, move || {
            let endpoint = endpoint.clone();
            async move { endpoint.connect().await }
        })
    }

    /// Calls `connect` for every registration attempt; `what` names the coordinator in
    /// `Debug` output.
    pub fn from_fn<F, Fut>(what: impl Into<String>, connect: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Channel, tonic::transport::Error>> + Send + 'static,
    {
        Connector { connect: Arc::new(move || Box::pin(connect())), what: what.into() }
    }

    /// An in-process link to a coordinator in this process: every channel the connector
    /// makes is a tokio duplex stream (`buffer` bytes each way) whose far end comes out of
    /// the returned [`InProcessIncoming`], the connections a server accepts (the
    /// coordinator's `serve_with_incoming` takes it as is). No socket, no port; the link
    /// breaks when the server drops the stream's end or the incoming is dropped.
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
        (connector, UnboundedReceiverStream::new(incoming))
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
        f.debug_struct("Connector").field("coordinator", &self.what).finish()
    }
}

/// The coordinator's URL as a tonic endpoint, with the connection timeout and HTTP/2
/// keepalive pings (which notice a coordinator that vanished without closing).
pub(super) fn endpoint(options: &WorkerOptions) -> Result<Endpoint, AgentError> {
    let url = if options.coordinator.contains("://") {
        options.coordinator.clone()
    } else {
        format!("http://{}", options.coordinator)
    };
    let endpoint = Endpoint::from_shared(url)
        .map_err(|e| AgentError::InvalidOption { option: "coordinator", reason: e.to_string() })?;
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
) -> Result<(CoordinatorServiceClient<Channel>, Registration), RegisterError> {
    plane.ensure(options).await.map_err(|e| RegisterError::Retry(format!("data plane: {e}")))?;
    let channel = coordinator
        .connect()
        .await
        .map_err(|e| RegisterError::Retry(format!("connecting to {}: {e}", options.coordinator)))?;
    let mut client = CoordinatorServiceClient::new(channel);
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
            memory_bytes: memory_bytes(),
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
