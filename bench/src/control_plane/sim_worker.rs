//! The simulated workers: a stand-in for the worker protocol (`Register`, the `Session`
//! stream, heartbeats, acknowledgements), one task and one connection each, and the socket
//! duplicate that lets the bench drop a connection under a worker.
//!
//! Kept beside the real agents of `agent_worker.rs` (`--worker-kind agent`), and the
//! default, not for the count (idle real agents reach the default 2,048 on 2 cores,
//! BENCHMARKS.md) but for exact accounting: the stand-in knows when it queued each
//! heartbeat, which the hung-detection goal ("last heartbeat → unlisted" within the
//! timeout) is judged from, while an agent's is approximated by its last socket write.

use anyhow::{Context, Result, anyhow};
use flotilla_proto::PROTOCOL_VERSION;
use flotilla_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use flotilla_proto::v1::{
    Ack, CoordinatorMessage, Heartbeat, SessionOpen, WorkerInfo, WorkerMessage, worker_message,
};
use hyper_util::rt::TokioIo;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::codegen::Service;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connections being set up at once; more would overflow the listener's accept backlog
/// and wait for SYN retransmissions.
const CONNECT_CONCURRENCY: usize = 128;

/// A connector that keeps a duplicate of the connection's socket, so that the bench can
/// shut the connection down under the worker, as the kernel does when a process dies.
#[derive(Clone)]
pub(super) struct KillableConnector {
    pub(super) addr: SocketAddr,
    pub(super) socket: Arc<Mutex<Option<std::net::TcpStream>>>,
}

pub(super) type ConnectFuture<S = tokio::net::TcpStream> =
    Pin<Box<dyn Future<Output = std::io::Result<TokioIo<S>>> + Send>>;

impl Service<Uri> for KillableConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let addr = self.addr;
        let slot = self.socket.clone();
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            // As real workers: heartbeats are small and must not wait for Nagle.
            stream.set_nodelay(true)?;
            let twin = std::net::TcpStream::from(stream.as_fd().try_clone_to_owned()?);
            if let Ok(mut slot) = slot.lock() {
                *slot = Some(twin);
            }
            Ok(TokioIo::new(stream))
        })
    }
}

/// What the bench can do to a running worker, and what the worker tells it. A new one:
/// not hung, no heartbeat yet, no socket.
#[derive(Default)]
pub(super) struct WorkerControl {
    /// Stop heartbeating, keep the connection and keep reading (a hung process).
    pub(super) hang: AtomicBool,
    /// When the last heartbeat was queued, in nanoseconds since the bench's epoch.
    pub(super) last_heartbeat_ns: AtomicU64,
    pub(super) heartbeats: AtomicU64,
    pub(super) socket: Arc<Mutex<Option<std::net::TcpStream>>>,
}

pub(super) struct SimWorker {
    pub(super) id: String,
    pub(super) control: Arc<WorkerControl>,
    pub(super) task: JoinHandle<()>,
}

impl SimWorker {
    /// Shuts the connection down (both directions, as the kernel does for a dead process)
    /// and stops the task.
    pub(super) fn drop_connection(&self) -> Result<()> {
        let socket = self.control.socket.lock().map_err(|_| anyhow!("a worker's socket lock is poisoned"))?;
        let socket = socket.as_ref().with_context(|| format!("worker {} has no socket", self.id))?;
        socket
            .shutdown(Shutdown::Both)
            .with_context(|| format!("shutting down worker {}'s socket", self.id))?;
        self.task.abort();
        Ok(())
    }
}

pub(super) struct Shared {
    pub(super) addr: SocketAddr,
    pub(super) interval: Duration,
    pub(super) workers: u32,
    /// Heartbeat phases are offsets from this instant.
    pub(super) epoch: Instant,
    /// Sessions that ended while the bench did not end them: (worker, why).
    pub(super) ended: mpsc::UnboundedSender<(String, String)>,
}

pub(super) fn worker_id(index: u32) -> String {
    format!("bench-{index:05}")
}

pub(super) fn worker_info(index: u32) -> WorkerInfo {
    WorkerInfo {
        worker_id: worker_id(index),
        host: "bench-host".into(),
        cores: 1,
        // Never dialed: no job runs. Unique, as real ones are.
        data_plane_address: format!("127.0.0.1:{}", 10_000 + index % 50_000),
        protocol_version: PROTOCOL_VERSION,
        node_id: format!("bench-node-{}", index / 8),
        local_rank: index % 8,
        pid: std::process::id(),
        ..Default::default()
    }
}

/// Connects, registers and opens the session; returns what the heartbeat loop needs.
pub(super) async fn connect_worker(
    shared: &Shared,
    index: u32,
    socket: Arc<Mutex<Option<std::net::TcpStream>>>,
) -> Result<(CoordinatorServiceClient<Channel>, mpsc::Sender<WorkerMessage>, Streaming<CoordinatorMessage>)> {
    let id = worker_id(index);
    let endpoint = Endpoint::from_shared(format!("http://{}", shared.addr))
        .context("the coordinator's URL")?
        .connect_timeout(Duration::from_secs(10))
        // As real workers (flotilla_worker::agent): pings notice a vanished coordinator.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect_with_connector(KillableConnector { addr: shared.addr, socket })
        .await
        .with_context(|| format!("worker {id}: connecting to {}", shared.addr))?;
    let mut client = CoordinatorServiceClient::new(channel);
    let registration = client
        .register(worker_info(index))
        .await
        .map_err(|s| anyhow!("worker {id}: Register failed: {} ({:?})", s.message(), s.code()))?
        .into_inner();
    let (tx, rx) = mpsc::channel(64);
    let open = WorkerMessage {
        body: Some(worker_message::Body::Open(SessionOpen {
            worker_id: registration.worker_id.clone(),
            session_id: registration.session_id.clone(),
        })),
    };
    tx.send(open).await.map_err(|_| anyhow!("worker {id}: the session's request stream closed"))?;
    let inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|s| anyhow!("worker {id}: Session failed: {} ({:?})", s.message(), s.code()))?
        .into_inner();
    Ok((client, tx, inbound))
}

/// Heartbeats at the worker's phase of the interval and acknowledges commands, until the
/// session ends or the task is aborted.
pub(super) async fn heartbeat_loop(
    shared: Arc<Shared>,
    index: u32,
    control: Arc<WorkerControl>,
    // Kept so that the connection lives as long as the worker.
    _client: CoordinatorServiceClient<Channel>,
    tx: mpsc::Sender<WorkerMessage>,
    mut inbound: Streaming<CoordinatorMessage>,
) {
    let id = worker_id(index);
    let interval = shared.interval;
    // Worker i's heartbeats fall at epoch + i/n of the interval + k intervals.
    let phase = interval.mul_f64(f64::from(index) / f64::from(shared.workers));
    let now = Instant::now();
    let mut first = shared.epoch + phase;
    while first < now {
        first += interval;
    }
    let mut ticker = tokio::time::interval_at(first.into(), interval);
    // As real workers: a late tick delays the next ones rather than bursting.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sequence = 0;
    let why = loop {
        tokio::select! {
            _ = ticker.tick() => {
                if control.hang.load(Ordering::SeqCst) {
                    continue;
                }
                sequence += 1;
                let beat = Heartbeat { sequence, sent_unix_ms: unix_ms() };
                control.last_heartbeat_ns.store(nanos_since(shared.epoch), Ordering::SeqCst);
                control.heartbeats.fetch_add(1, Ordering::Relaxed);
                let message = WorkerMessage { body: Some(worker_message::Body::Heartbeat(beat)) };
                if tx.try_send(message).is_err() {
                    break "the request stream is full or closed".to_string();
                }
            }
            command = inbound.message() => match command {
                Ok(Some(command)) => {
                    let ack = Ack { command_id: command.command_id, ..Ack::default() };
                    if tx.try_send(WorkerMessage { body: Some(worker_message::Body::Ack(ack)) }).is_err() {
                        break "the request stream is full or closed".to_string();
                    }
                }
                Ok(None) => break "the coordinator closed the session".to_string(),
                Err(status) => break format!("{:?}: {}", status.code(), status.message()),
            },
        }
    };
    let _ = shared.ended.send((id, why));
}

pub(super) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(super) fn nanos_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Starts every worker, at most [`CONNECT_CONCURRENCY`] connecting at once; returns when
/// all have their session open.
pub(super) async fn start_workers(shared: &Arc<Shared>) -> Result<Vec<SimWorker>> {
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let (ready_tx, mut ready) = mpsc::unbounded_channel::<Result<()>>();
    let mut workers = Vec::with_capacity(shared.workers as usize);
    for index in 0..shared.workers {
        let control = Arc::new(WorkerControl::default());
        let task = tokio::spawn({
            let shared = shared.clone();
            let control = control.clone();
            let gate = gate.clone();
            let ready = ready_tx.clone();
            async move {
                let connected = {
                    let Ok(_permit) = gate.acquire().await else { return };
                    connect_worker(&shared, index, control.socket.clone()).await
                };
                match connected {
                    Ok((client, tx, inbound)) => {
                        let _ = ready.send(Ok(()));
                        heartbeat_loop(shared, index, control, client, tx, inbound).await;
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            }
        });
        workers.push(SimWorker { id: worker_id(index), control, task });
    }
    drop(ready_tx);
    let mut failure = None;
    for _ in 0..shared.workers {
        match ready.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                failure = Some(e);
                break;
            }
            None => {
                failure = Some(anyhow!("a worker task ended before connecting"));
                break;
            }
        }
    }
    if let Some(e) = failure {
        for worker in &workers {
            worker.task.abort();
        }
        return Err(e.context("starting the simulated workers"));
    }
    Ok(workers)
}
