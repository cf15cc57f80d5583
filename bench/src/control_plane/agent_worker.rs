//! Real workers for `--worker-kind agent`: `flotilla_worker::agent::run_worker_with`, the
//! agent `flotilla worker` runs, one task each in this process, every one with its own TCP
//! connection to the coordinator child and its own TCP data-plane listener
//! ([`TcpDataPlane`]). They register, hold their session and heartbeat exactly as in
//! production; they idle between heartbeats, unless `--agent-job-steps` has them train the
//! tiny model data-parallel after the window.
//!
//! The bench reaches an agent only through its connection: the connector
//! (`Connector::from_fn`, dialed with the agent's own endpoint settings) wraps the socket
//! in a [`GatedStream`] that counts writes and can stop them (a hung process: the
//! connection stays open and read, nothing more is written), and keeps a duplicate of the
//! socket so the bench can shut it down under the agent (a killed process). So the figures
//! named "heartbeats sent" count the agents' socket writes instead (heartbeats, and the
//! rare HTTP/2 ping or window update), and the last heartbeat is the last write.
//!
//! Idle, real agents cost this process about what the stand-ins do (2,048 of them fit on
//! 2 cores, BENCHMARKS.md); the default kind stays `sim` for its exact heartbeat times
//! (`sim_worker.rs`).

use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Result;
use flotilla_worker::agent::{Connector, TcpDataPlane, WorkerOptions, run_worker_with};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::Service;
use tonic::transport::{Endpoint, Uri};

use super::sim_worker::{ConnectFuture, Shared, SimWorker, WorkerControl, nanos_since, worker_id};

/// The agent's own keepalive settings (`flotilla_worker::agent`'s endpoint).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A connection to the coordinator that the bench can hang (writes stop) or drop (the
/// duplicate socket is shut down), counting the writes that got through.
pub(super) struct GatedStream {
    inner: TcpStream,
    control: Arc<WorkerControl>,
    epoch: std::time::Instant,
}

impl AsyncRead for GatedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GatedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.control.hang.load(Ordering::SeqCst) {
            // Hung for good: the write never completes, and nothing will wake it.
            return Poll::Pending;
        }
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written
            && n > 0
        {
            self.control.heartbeats.fetch_add(1, Ordering::Relaxed);
            self.control.last_heartbeat_ns.store(nanos_since(self.epoch), Ordering::SeqCst);
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        if self.control.hang.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Dials the coordinator for one agent, keeping the socket's duplicate in its control.
#[derive(Clone)]
struct GatedConnector {
    shared: Arc<Shared>,
    control: Arc<WorkerControl>,
}

impl Service<Uri> for GatedConnector {
    type Response = TokioIo<GatedStream>;
    type Error = io::Error;
    type Future = ConnectFuture<GatedStream>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (shared, control) = (self.shared.clone(), self.control.clone());
        Box::pin(async move {
            let stream = TcpStream::connect(shared.addr).await?;
            stream.set_nodelay(true)?;
            let twin = std::net::TcpStream::from(stream.as_fd().try_clone_to_owned()?);
            if let Ok(mut slot) = control.socket.lock() {
                *slot = Some(twin);
            }
            Ok(TokioIo::new(GatedStream { inner: stream, control, epoch: shared.epoch }))
        })
    }
}

/// The options `flotilla worker` would have for agent `index`: one compute thread, a
/// loopback data plane on a free port, the bench's node layout (8 workers a node).
fn options(shared: &Shared, index: u32) -> WorkerOptions {
    let mut options = WorkerOptions::new(format!("http://{}", shared.addr));
    options.worker_id = Some(worker_id(index));
    options.node_id = Some(format!("bench-node-{}", index / 8));
    options.local_rank = index % 8;
    options.threads = Some(1);
    options
}

/// Starts every agent, agent `i` at `i / n` of an interval after the first (so that their
/// heartbeats spread over the interval as the simulated workers' do). Returns at once:
/// the caller waits until the coordinator lists them all.
pub(super) fn start_agents(shared: &Arc<Shared>) -> Result<Vec<SimWorker>> {
    let start = tokio::time::Instant::now();
    let mut agents = Vec::with_capacity(shared.workers as usize);
    for index in 0..shared.workers {
        let control = Arc::new(WorkerControl::default());
        let options = options(shared, index);
        let endpoint = Endpoint::from_shared(options.coordinator.clone())?
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let connector = {
            let gated = GatedConnector { shared: shared.clone(), control: control.clone() };
            Connector::from_fn(options.coordinator.clone(), move || {
                let (endpoint, gated) = (endpoint.clone(), gated.clone());
                async move { endpoint.connect_with_connector(gated).await }
            })
        };
        let at = start + shared.interval.mul_f64(f64::from(index) / f64::from(shared.workers));
        let shared = shared.clone();
        let id = worker_id(index);
        let task = tokio::spawn({
            let id = id.clone();
            async move {
                tokio::time::sleep_until(at).await;
                // Never cancelled: the bench aborts the task (a process killed), or ends.
                let ended = run_worker_with(options, connector, TcpDataPlane, CancellationToken::new()).await;
                let _ = shared.ended.send((id, format!("the agent returned: {ended:?}")));
            }
        });
        agents.push(SimWorker { id, control, task });
    }
    Ok(agents)
}
