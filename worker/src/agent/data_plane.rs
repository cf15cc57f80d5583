//! The data plane between jobs: the listener a job's rendezvous accepts its peers on, and
//! the address registered for it.
//!
//! Invariant: the registered address is stable for the worker's life while the same port
//! can be bound again after each job (a job spends the listener; the session binds it
//! again when the job ends); otherwise a fresh port is bound and registered anew.

use std::net::SocketAddr;

use tracing::warn;

use super::WorkerOptions;
use crate::comm::{CommError, TcpCommunicator, TcpRendezvous};

/// The data-plane listener between jobs, and the address registered for it.
pub(super) struct DataPlane {
    pub(super) listener: Option<TcpRendezvous>,
    bound: SocketAddr,
    pub(super) advertised: String,
}

impl DataPlane {
    pub(super) async fn bind(options: &WorkerOptions) -> Result<Self, CommError> {
        let listener = TcpCommunicator::bind(options.data_plane_listen.as_str()).await?;
        let bound = listener.local_addr();
        let advertised = options.data_plane_advertise.clone().unwrap_or_else(|| bound.to_string());
        Ok(DataPlane { listener: Some(listener), bound, advertised })
    }

    /// Binds the registered address again if a job consumed the listener.
    pub(super) async fn rebind(&mut self) -> Result<(), CommError> {
        if self.listener.is_none() {
            self.listener = Some(TcpCommunicator::bind(self.bound).await?);
        }
        Ok(())
    }

    /// Before registering: the same address if possible, otherwise a fresh one (which is
    /// then what gets registered).
    pub(super) async fn ensure(&mut self, options: &WorkerOptions) -> Result<(), CommError> {
        if let Err(err) = self.rebind().await {
            warn!(address = %self.bound, %err, "data-plane address lost; binding a new one");
            *self = DataPlane::bind(options).await?;
        }
        Ok(())
    }
}

/// The first address `addr` (a peer's data-plane `host:port`) resolves to; the error says
/// why it resolves to none.
pub(super) async fn resolve(addr: &str) -> Result<SocketAddr, std::io::Error> {
    let mut found = tokio::net::lookup_host(addr).await?;
    found.next().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "resolves to no address"))
}
