//! The data plane as the agent uses it: the [`DataPlane`] trait (bind a listener, say its
//! address, rendezvous with an assignment's peers into a communicator, abort it, shut it
//! down), its TCP implementation [`TcpDataPlane`] (what [`super::run_worker`] uses), and
//! the listener the agent keeps between jobs with the address registered for it.
//!
//! Whatever implements [`DataPlane`] runs the agent's jobs unchanged: its communicator is
//! a [`GroupTransport`], which is all the data-parallel step, the pipeline trainer and the
//! MoE exchange ask for.
//!
//! Invariant: the registered address is stable for the worker's life while the same
//! address can be bound again after each job (a job spends the listener; the session binds
//! it again when the job ends); otherwise a fresh one is bound and registered anew.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::WorkerOptions;
use crate::comm::{
    CommError, DataPlaneLimits, DataPlaneSecret, GroupTransport, TcpCommunicator, TcpOptions, TcpRendezvous,
};

/// Aborts a job's communicator from the session's task (see
/// [`crate::comm::Communicator::abort`]).
pub type AbortFn = Box<dyn Fn(&str) + Send + Sync>;

/// One job's rendezvous, as the assignment gives it.
#[derive(Debug, Clone, Copy)]
pub struct Rendezvous<'a> {
    /// The assignment's `data_plane_secret`: every connection proves it holds it.
    pub secret: &'a DataPlaneSecret,
    /// The job's frame and buffer bounds ([`DataPlaneLimits::for_job`]).
    pub limits: DataPlaneLimits,
    /// This worker's rank in the job's world.
    pub rank: usize,
    /// Every rank's data-plane address as registered with the coordinator, this rank's
    /// included (at `rank`; an implementation uses its own listener there).
    pub peers: &'a [String],
    /// The assignment's `data_plane_session`: an authenticated peer of another session
    /// is refused.
    pub session: u64,
    /// How long the whole rendezvous may take.
    pub timeout: Duration,
}

/// How the agent makes each job's data plane. The agent binds a listener before it
/// registers (its address is what the coordinator hands to peers), spends it in the
/// rendezvous of each assignment, and binds the same address again when the job ends.
///
/// Implementations must keep the [`crate::comm`] semantics (ordering, failure, abort) in
/// the communicators they make; the agent adds nothing on top.
pub trait DataPlane: Send + Sync + 'static {
    /// A bound listener that one rendezvous spends.
    type Listener: Send + 'static;
    /// The communicator a rendezvous yields.
    type Comm: GroupTransport + 'static;

    /// Binds a listener at `addr`: the worker's `data_plane_listen` first, then, after a
    /// job, the address the previous listener had (so that it stays the registered one).
    fn bind(&self, addr: &str) -> impl Future<Output = Result<Self::Listener, CommError>> + Send;

    /// Where `listener` is reached, in the form [`DataPlane::bind`] accepts and peers are
    /// given (unless the worker's `data_plane_advertise` overrides it).
    fn local_addr(&self, listener: &Self::Listener) -> String;

    /// Spends `listener` to connect with every peer of the job; fails (naming the peer)
    /// if a peer is unreachable, refuses the handshake, or the timeout passes.
    fn connect(
        &self,
        listener: Self::Listener,
        rendezvous: Rendezvous<'_>,
    ) -> impl Future<Output = Result<Self::Comm, CommError>> + Send;

    /// A handle that aborts `comm` from another task (the session's `Abort`, its loss).
    fn abort_handle(&self, comm: &Self::Comm) -> AbortFn;

    /// The graceful end of a finished job's communicator: queued messages delivered, the
    /// peers told, every task of the communicator ended.
    fn shutdown(&self, comm: Self::Comm) -> impl Future<Output = Result<(), CommError>> + Send;
}

/// The TCP data plane: [`TcpRendezvous`] listeners, [`TcpCommunicator`]s, peers' addresses
/// resolved by DNS (`host:port`). Every frame, handshake and failure is `comm::tcp`'s.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpDataPlane;

impl DataPlane for TcpDataPlane {
    type Listener = TcpRendezvous;
    type Comm = TcpCommunicator;

    async fn bind(&self, addr: &str) -> Result<TcpRendezvous, CommError> {
        TcpCommunicator::bind(addr).await
    }

    fn local_addr(&self, listener: &TcpRendezvous) -> String {
        listener.local_addr().to_string()
    }

    async fn connect(
        &self,
        listener: TcpRendezvous,
        rendezvous: Rendezvous<'_>,
    ) -> Result<TcpCommunicator, CommError> {
        let mut addrs = Vec::with_capacity(rendezvous.peers.len());
        for (p, addr) in rendezvous.peers.iter().enumerate() {
            if p == rendezvous.rank {
                // Not dialed: the rendezvous only needs the list to be complete.
                addrs.push(listener.local_addr());
                continue;
            }
            let resolved = resolve(addr)
                .await
                .map_err(|e| CommError::io(format!("rank {p}'s data-plane address {addr:?}"), e))?;
            addrs.push(resolved);
        }
        let options = TcpOptions::new(rendezvous.session, rendezvous.secret.clone())
            .with_connect_timeout(rendezvous.timeout)
            .with_limits(rendezvous.limits);
        listener.connect(rendezvous.rank, addrs, options).await
    }

    fn abort_handle(&self, comm: &TcpCommunicator) -> AbortFn {
        let handle = comm.abort_handle();
        Box::new(move |reason| handle.abort(reason))
    }

    async fn shutdown(&self, comm: TcpCommunicator) -> Result<(), CommError> {
        comm.shutdown().await
    }
}

/// The data-plane listener between jobs, and the address registered for it.
pub(super) struct Listening<D: DataPlane> {
    pub(super) plane: Arc<D>,
    pub(super) listener: Option<D::Listener>,
    pub(super) bound: String,
    pub(super) advertised: String,
}

impl<D: DataPlane> Listening<D> {
    pub(super) async fn bind(plane: Arc<D>, options: &WorkerOptions) -> Result<Self, CommError> {
        let listener = plane.bind(options.data_plane_listen.as_str()).await?;
        let bound = plane.local_addr(&listener);
        let advertised = options.data_plane_advertise.clone().unwrap_or_else(|| bound.clone());
        Ok(Listening { plane, listener: Some(listener), bound, advertised })
    }

    /// Binds the registered address again if a job consumed the listener.
    pub(super) async fn rebind(&mut self) -> Result<(), CommError> {
        if self.listener.is_none() {
            self.listener = Some(self.plane.bind(&self.bound).await?);
        }
        Ok(())
    }

    /// Before registering: the same address if possible, otherwise a fresh one (which is
    /// then what gets registered).
    pub(super) async fn ensure(&mut self, options: &WorkerOptions) -> Result<(), CommError> {
        if let Err(err) = self.rebind().await {
            warn!(address = %self.bound, %err, "data-plane address lost; binding a new one");
            *self = Listening::bind(self.plane.clone(), options).await?;
        }
        Ok(())
    }
}

/// The first address `addr` (a peer's data-plane `host:port`) resolves to; the error says
/// why it resolves to none.
async fn resolve(addr: &str) -> Result<SocketAddr, std::io::Error> {
    let mut found = tokio::net::lookup_host(addr).await?;
    found.next().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "resolves to no address"))
}
