//! The workers' data plane: point-to-point messages and the collectives (all-reduce,
//! all-to-all-v, all-gather, broadcast, barrier) that pipeline transfers, MoE dispatch and
//! combine, and gradient reduction go through.
//!
//! [`Communicator`] is the contract; [`TcpCommunicator`] implements it over one TCP
//! connection per pair of ranks (CPU workers, tests); an NCCL implementation for GPU
//! workers will sit beside it. The collective algorithms live in [`ring`], written against
//! plain tagged send/receive, so every transport that has those shares them.
//!
//! # Semantics every implementation keeps
//!
//! - **Messages** are opaque [`Bytes`] matched by `(peer, tag)`, in any arrival order: a
//!   receive posted before its message arrives waits, a message that arrives first is
//!   buffered. Two messages with the same `(peer, tag)` are delivered in the order they
//!   were sent. This is the pipeline schedule's execution model (a send never waits for its
//!   receive; messages match by kind, micro-batch and stage, encoded by the caller in the
//!   tag).
//! - **Tags.** User tags are below [`COLLECTIVE_TAG_BIT`] (2⁶³); the upper half of the tag
//!   space belongs to the collectives (see [`collective_tag`]), so a collective's messages
//!   can never be taken by a user receive and vice versa.
//! - **Collectives** are numbered per communicator in the order they are *called* (the
//!   sequence number is taken when the method is called, not when its future is first
//!   polled), and that number is part of every tag they use. Every rank must therefore call
//!   the same collectives in the same order, as with MPI or NCCL; two collectives may be in
//!   flight at once if every rank issued them in the same order.
//! - **Determinism.** [`Communicator::all_reduce_sum`] adds in an order fixed by the layout
//!   alone (world size and chunk index), never by timing: see [`ring`] for the order and
//!   [`ring_reference_sum`] for the same sums computed sequentially.
//! - **Failure.** When the link to a peer breaks, every pending and later receive from
//!   that peer fails with an error naming it, and every pending and later collective fails
//!   with an error naming the first peer lost (a collective needs everyone). A peer that
//!   shut down gracefully fails only the receives that name it. A collective that fails on
//!   a rank aborts that rank's communicator, so ranks waiting on it further round the ring
//!   fail rather than hang; the abort carries the blamed rank, so every survivor's error
//!   has the rank that died as its [`CommError::culprit`]. [`Communicator::abort`] makes
//!   every pending and later operation return [`CommError::Aborted`] at once and closes
//!   the connections, so peers stuck waiting on this rank fail too; it is terminal
//!   (rendezvous again to continue).
//! - **Errors** name the peer and tag at fault; nothing a peer sends can make a rank panic.

pub mod ring;
pub mod tcp;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;

pub use ring::{RingElement, chunk_range, ring_reference_sum};
pub use tcp::{AbortHandle, TcpCommunicator, TcpOptions, TcpRendezvous, loopback_group};

/// The first tag reserved for collectives: user tags must be below it.
pub const COLLECTIVE_TAG_BIT: u64 = 1 << 63;

/// The largest tag a user may send or receive with.
pub const MAX_USER_TAG: u64 = COLLECTIVE_TAG_BIT - 1;

/// Bits of a collective tag that number the step inside one collective.
const STEP_BITS: u32 = 24;
/// Bits of a collective tag that hold the collective's sequence number (modulo 2³⁸).
const SEQ_BITS: u32 = 38;
/// Tags with both top bits set are the transport's own control frames, never a collective's.
pub(crate) const CONTROL_TAG_BITS: u64 = 0b11 << 62;

/// The most ranks a communicator may have: every collective step must fit its tag field
/// (the ring all-reduce takes 2·(n−1) steps).
pub const MAX_WORLD_SIZE: usize = 1 << (STEP_BITS - 2);

/// The tag of step `step` of the collective numbered `seq`: bit 63 set, bit 62 clear,
/// `seq mod 2³⁸` in bits 24..62, `step` in bits 0..24.
///
/// Sequence numbers wrap after 2³⁸ collectives; ranks stay in step because they all count
/// the same calls, and two collectives 2³⁸ calls apart are never in flight together.
pub fn collective_tag(seq: u64, step: u32) -> u64 {
    let seq_field = (seq & ((1 << SEQ_BITS) - 1)) << STEP_BITS;
    let step_field = u64::from(step) & ((1 << STEP_BITS) - 1);
    COLLECTIVE_TAG_BIT | seq_field | step_field
}

/// Everything the data plane can fail with. Cloneable because one broken link fails many
/// waiters with the same cause.
#[derive(Debug, Clone, Error)]
pub enum CommError {
    #[error("peer rank {peer} is out of range for world size {world_size}")]
    InvalidPeer { peer: usize, world_size: usize },

    #[error("tag {tag:#x} is reserved for collectives (user tags must be at most {MAX_USER_TAG:#x})")]
    ReservedTag { tag: u64 },

    #[error("invalid argument to {op}: {reason}")]
    InvalidArgument { op: &'static str, reason: String },

    #[error("link to rank {peer} failed: {reason}")]
    PeerFailed { peer: usize, reason: String },

    #[error("rank {peer} shut down its connection")]
    PeerClosed { peer: usize },

    /// The peer aborted (its reason says why); `culprit` is the rank it blamed, if any, so
    /// a failure that cascades round the ring still names the rank that caused it.
    #[error("rank {peer} aborted: {reason}")]
    PeerAborted { peer: usize, culprit: Option<usize>, reason: String },

    #[error("frame from rank {peer} with tag {tag:#x} announces {len} bytes, above the maximum of {max}")]
    FrameTooLarge { peer: usize, tag: u64, len: u64, max: u64 },

    #[error("message for rank {peer} with tag {tag:#x} has {len} bytes, above the maximum frame of {max}")]
    MessageTooLarge { peer: usize, tag: u64, len: u64, max: u64 },

    #[error("message from rank {peer} with tag {tag:#x} has {got} bytes, expected {expected} ({op})")]
    SizeMismatch { op: &'static str, peer: usize, tag: u64, expected: usize, got: usize },

    #[error(
        "rank {peer} holds {got} elements of the chunk in message {tag:#x} where this rank holds {expected} \
         ({op}: buffers differ in length across ranks)"
    )]
    LengthMismatch { op: &'static str, peer: usize, tag: u64, expected: usize, got: u64 },

    #[error("communicator aborted: {reason}")]
    Aborted { reason: String },

    #[error("handshake with rank {peer} at {addr} refused: {reason}")]
    Handshake { peer: usize, addr: SocketAddr, reason: String },

    #[error("handshake from {addr} refused: {reason}")]
    HandshakeFrom { addr: SocketAddr, reason: String },

    #[error("rank {rank}: rendezvous timed out after {timeout:?}: {missing}")]
    RendezvousTimeout { rank: usize, timeout: Duration, missing: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: Arc<std::io::Error>,
    },
}

impl CommError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CommError::Io { context: context.into(), source: Arc::new(source) }
    }

    /// The peer this error is about (for a link error, the other end of the link), where
    /// there is one.
    pub fn peer(&self) -> Option<usize> {
        match self {
            CommError::InvalidPeer { peer, .. }
            | CommError::PeerFailed { peer, .. }
            | CommError::PeerClosed { peer }
            | CommError::PeerAborted { peer, .. }
            | CommError::FrameTooLarge { peer, .. }
            | CommError::MessageTooLarge { peer, .. }
            | CommError::SizeMismatch { peer, .. }
            | CommError::LengthMismatch { peer, .. }
            | CommError::Handshake { peer, .. } => Some(*peer),
            _ => None,
        }
    }

    /// The rank at the root of the failure, where known: the rank an aborting peer blamed,
    /// otherwise [`CommError::peer`]. When a rank dies mid-collective, every survivor's
    /// error has the dead rank as culprit, whether it saw the death directly or through a
    /// neighbour's abort.
    pub fn culprit(&self) -> Option<usize> {
        match self {
            CommError::PeerAborted { culprit: Some(culprit), .. } => Some(*culprit),
            _ => self.peer(),
        }
    }
}

/// Point-to-point messaging and collectives among `world_size` ranks.
///
/// Methods take `&self` so that one task can wait in a collective while another sends,
/// receives or aborts. Every returned future is `Send`. Collectives must be called in the
/// same order on every rank (see the module documentation). On error, the contents of a
/// buffer being reduced in place are unspecified.
pub trait Communicator: Send + Sync {
    /// This process's rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn world_size(&self) -> usize;

    /// Queues `bytes` for `peer` under `tag` and returns once queued: it never waits for the
    /// matching receive. Sending to oneself is allowed. `tag` must be at most
    /// [`MAX_USER_TAG`].
    fn send(&self, peer: usize, tag: u64, bytes: Bytes)
    -> impl Future<Output = Result<(), CommError>> + Send;

    /// The next message from `peer` under `tag`, waiting until it arrives.
    fn recv(&self, peer: usize, tag: u64) -> impl Future<Output = Result<Bytes, CommError>> + Send;

    /// Sums `data` element-wise over all ranks, in place, with the ring algorithm and the
    /// deterministic order documented in [`ring`]. Every rank must pass the same length.
    fn all_reduce_sum<'a>(
        &'a self,
        data: &'a mut [f32],
    ) -> impl Future<Output = Result<(), CommError>> + Send + 'a;

    /// [`Communicator::all_reduce_sum`] for `f64`, same algorithm and order.
    fn all_reduce_sum_f64<'a>(
        &'a self,
        data: &'a mut [f64],
    ) -> impl Future<Output = Result<(), CommError>> + Send + 'a;

    /// Sends `buffers[p]` to rank `p` (one buffer per rank, this rank's own included, any
    /// sizes, empty allowed) and returns what each rank sent here, indexed by source rank.
    fn all_to_all_v(&self, buffers: Vec<Bytes>)
    -> impl Future<Output = Result<Vec<Bytes>, CommError>> + Send;

    /// Every rank's `bytes` (sizes may differ), indexed by rank.
    fn all_gather(&self, bytes: Bytes) -> impl Future<Output = Result<Vec<Bytes>, CommError>> + Send;

    /// Returns `root`'s `bytes` on every rank; the argument is ignored on the other ranks.
    fn broadcast(&self, root: usize, bytes: Bytes) -> impl Future<Output = Result<Bytes, CommError>> + Send;

    /// Returns once every rank has entered the barrier.
    fn barrier(&self) -> impl Future<Output = Result<(), CommError>> + Send;

    /// Makes every pending and later operation fail with [`CommError::Aborted`] carrying
    /// `reason`, and drops the connections. Terminal: rendezvous again to continue.
    fn abort(&self, reason: &str);
}
