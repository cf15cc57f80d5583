//! The MoE all-to-all of a pipeline chunk over the data plane (DESIGN §1.4): what the
//! model's [`ExpertExchange`] asks for — send buffer `p` to EP rank `p`, return what every
//! EP rank sent here — as point-to-point messages tagged with the chunk, the layer and the
//! phase, so that two chunks' exchanges (DualPipe's overlapped pairs, on two threads) can
//! be in flight at once without mixing.
//!
//! Each exchange counts what it moved and how long it waited ([`ExchangeStats`]), so a step
//! can report its all-to-all volume and the time its compute threads sat waiting on it.

use std::time::Instant;

use bytes::Bytes;
use flotilla_model::ModelError;
use flotilla_model::moe::{ExchangeKey, ExpertExchange};
use tokio::runtime::Handle;

use crate::comm::{Communicator, TcpCommunicator};
use crate::pipeline::{Chunk, tags};

/// What the MoE exchanges of a step moved and waited.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ExchangeStats {
    /// Exchanges run (one per MoE layer and phase of each chunk).
    pub exchanges: u64,
    /// Payload bytes sent to other ranks.
    pub bytes_sent: u64,
    /// Of those, bytes that left this rank's node.
    pub cross_node_bytes: u64,
    /// Seconds from the first send of an exchange until its last receive completed, summed.
    pub wait_seconds: f64,
}

impl ExchangeStats {
    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &ExchangeStats) {
        self.exchanges += other.exchanges;
        self.bytes_sent += other.bytes_sent;
        self.cross_node_bytes += other.cross_node_bytes;
        self.wait_seconds += other.wait_seconds;
    }
}

/// The MoE exchange of one chunk over the data plane: point-to-point messages to the EP
/// group's ranks, tagged with the chunk, the layer and the phase. Runs on a blocking
/// thread and waits on the data plane through the runtime's handle.
pub(crate) struct DataPlaneExchange<'a> {
    pub(crate) comm: &'a TcpCommunicator,
    pub(crate) handle: &'a Handle,
    /// World ranks of the EP group, in EP-rank order.
    pub(crate) group: &'a [usize],
    /// This rank's index in `group`.
    pub(crate) me: usize,
    /// Whether each member of `group` is on another node than this rank.
    pub(crate) remote: &'a [bool],
    pub(crate) chunk: Chunk,
    /// What this exchange object has moved so far.
    pub(crate) stats: ExchangeStats,
}

impl ExpertExchange for DataPlaneExchange<'_> {
    fn group_size(&self) -> usize {
        self.group.len()
    }

    fn group_rank(&self) -> usize {
        self.me
    }

    fn exchange(&mut self, key: ExchangeKey, outgoing: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, ModelError> {
        let n = self.group.len();
        let fail = |what: String| ModelError::Tensor {
            tensor: format!(
                "MoE layer {} {:?} exchange of micro-batch {}",
                key.layer, key.phase, self.chunk.micro_batch
            ),
            detail: what,
        };
        if outgoing.len() != n {
            return Err(fail(format!("{} buffers for an EP group of {n}", outgoing.len())));
        }
        let tag = tags::expert(self.chunk, key);
        let mut own = None;
        let (comm, group, me) = (self.comm, self.group, self.me);
        let started = Instant::now();
        self.stats.exchanges += 1;
        for (p, buffer) in outgoing.iter().enumerate() {
            if p != me {
                self.stats.bytes_sent += buffer.len() as u64;
                if self.remote.get(p).copied().unwrap_or(false) {
                    self.stats.cross_node_bytes += buffer.len() as u64;
                }
            }
        }
        let result = self.handle.block_on(async {
            for (p, buffer) in outgoing.into_iter().enumerate() {
                if p == me {
                    own = Some(buffer);
                } else {
                    comm.send(group[p], tag, Bytes::from(buffer)).await.map_err(|e| {
                        fail(format!("sending to EP rank {p} (world rank {}): {e}", group[p]))
                    })?;
                }
            }
            let mut incoming = Vec::with_capacity(n);
            for (p, &world) in group.iter().enumerate() {
                if p == me {
                    incoming.push(own.take().unwrap_or_default());
                } else {
                    let bytes = comm
                        .recv(world, tag)
                        .await
                        .map_err(|e| fail(format!("receiving from EP rank {p} (world rank {world}): {e}")))?;
                    incoming.push(bytes.to_vec());
                }
            }
            Ok(incoming)
        });
        self.stats.wait_seconds += started.elapsed().as_secs_f64();
        result
    }
}
