//! The workers' data plane: point-to-point messages and the collectives (all-reduce,
//! all-to-all-v, all-gather, broadcast, barrier) that pipeline transfers, MoE dispatch and
//! combine, and gradient reduction go through.
//!
//! [`Communicator`] is the contract; [`TcpCommunicator`] implements it over one TCP
//! connection per pair of ranks (CPU workers, tests); an NCCL implementation for GPU
//! workers will sit beside it. The collective algorithms live in [`ring`], written against
//! plain tagged send/receive, so every transport that has those shares them.
//! [`Group`] ([`group`]) is a [`Communicator`] over a subset of the ranks of any
//! communicator that implements [`GroupTransport`] (the TCP one does), for collectives that
//! involve only some of them (see *Groups* below). Code above the data plane (the pipeline
//! trainer, the MoE exchange, the agent's jobs) is generic over `C: GroupTransport`, so a
//! new transport plugs in beneath it unchanged.
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
//!   space belongs to the collectives (see *Tags* below), so a collective's messages can
//!   never be taken by a user receive and vice versa.
//! - **Collectives** are numbered per communicator (per group, for a group) in the order
//!   they are *called* (the sequence number is taken when the method is called, not when
//!   its future is first polled), and that number is part of every tag they use. Every
//!   rank must therefore call the same collectives of one communicator in the same order,
//!   as with MPI or NCCL; two collectives may be in flight at once if every rank issued
//!   them in the same order. A collective future must be driven to completion: one dropped
//!   half-way leaves its peers waiting or its messages behind (abort instead; a group's
//!   collective aborts its communicator itself when dropped unfinished, see *Groups*).
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
//!
//! # Groups
//!
//! Pipeline and expert parallelism reduce most tensors over a subset of the ranks (the
//! data-parallel replicas of one stage, the ranks sharing an expert) and only a few over
//! everyone. A [`Group`] is a view of a [`GroupTransport`] communicator restricted to `members`, a
//! sorted list of world ranks that includes the caller, and identified by a `group_id` in
//! `1..=`[`MAX_GROUP_ID`]: `Group::new(comm, members, group_id)`, where `comm` is any
//! handle to the communicator (`&TcpCommunicator` for a group built for one step,
//! `Arc<TcpCommunicator>` for one shared between tasks). Building one is local: no
//! messages, no new connections. It is itself a [`Communicator`], so code written against
//! the trait runs unchanged on a world or on a group:
//!
//! - **Ranks.** Inside a group, ranks are *group ranks*: `rank()` is the caller's index in
//!   `members` and `world_size()` is `members.len()`. Point-to-point messages go to
//!   `members[peer]`, with the user's tag unchanged, so they share the world's user-tag
//!   space (a message sent through a group can be received through the world communicator
//!   under the sender's world rank, and vice versa).
//! - **Collectives** run the [`ring`] algorithms over the members only, numbered by the
//!   group's own sequence counter, in tags of their own (below), so they never meet the
//!   world's collectives or another group's. The ordering rule above holds per group:
//!   every member calls the group's collectives in the same order, while collectives of
//!   *different* groups (the world included) may be issued in any relative order, as long
//!   as each one is in flight until it completes. (A rank that *waits* for group A's
//!   collective before issuing group B's, while another waits for B's before issuing A's,
//!   deadlocks, as with MPI or NCCL.)
//! - **Identity.** Every member must build the group with the same id and the same
//!   members (nothing checks this across ranks: a mismatch is a protocol error, like
//!   calling collectives in different orders). The groups one rank holds at the same time
//!   need distinct ids, which the constructor enforces: it refuses an id held by a live
//!   group of the same communicator on that rank. A group dropped and built again (for
//!   every step, say) numbers its collectives from 0 again; that is sound because messages
//!   with the same `(peer, tag)` pair up in the order they were sent and every collective
//!   of the old group has completed on each rank before the new group exists there.
//! - **Abandoned collectives.** A group collective whose future is dropped before it
//!   completes (never polled, or cancelled half-way) aborts the communicator: its peers
//!   would otherwise wait forever, and the messages it left behind would be taken by the
//!   same-numbered collective of a rebuilt group.
//! - **Determinism.** A group's all-reduce adds in the order [`ring`] fixes for a world of
//!   `members.len()` ranks: bit for bit [`ring_reference_sum`] over the members' inputs in
//!   group-rank order.
//! - **Failure.** The underlying communicator is the failure domain. A broken link fails
//!   every pending and later collective of the communicator and of all its groups (the
//!   job is torn down and re-formed either way), and a group collective that fails aborts
//!   the underlying communicator, so members waiting further round the group's ring fail
//!   rather than hang, and so do the other groups and the world. Errors name *world* ranks
//!   ([`CommError::peer`], [`CommError::culprit`]); only [`CommError::InvalidPeer`] from a
//!   group's `send` or `recv`, which rejects the caller's argument, names the group rank
//!   passed in. [`Communicator::abort`] on a group aborts the underlying communicator.
//!
//! # Tags
//!
//! A tag is 64 bits. User tags have bit 63 clear. Tags with bits 63 and 62 set are the
//! transport's control frames. The rest, bit 63 set and bit 62 clear, are collectives':
//!
//! ```text
//!  63  62  61 ........ 48  47 ........ 24  23 ........ 0
//!   1   0   group id (14)   sequence (24)    step (24)
//! ```
//!
//! - *group id*: 0 for the world communicator itself, the group's id (1..=[`MAX_GROUP_ID`])
//!   for a [`Group`]; so no two groups', nor a group's and the world's, collectives
//!   share a tag.
//! - *sequence*: the collective's number within its group (or world), modulo 2²⁴. Members
//!   count the same calls, so they agree on it. It wraps, which is safe as long as no rank
//!   has two collectives of one group 2²⁴ calls apart in flight at once: messages with the
//!   same `(peer, tag)` pair up in the order they were sent, so a rank running ahead into
//!   a later collective with the same tags is harmless.
//! - *step*: the message's step within the collective (a ring all-reduce over `n` ranks
//!   takes `2·(n−1)` steps, which bounds [`MAX_WORLD_SIZE`]).
//!
//! Group id and sequence together form the collective's *number*, [`collective_number`];
//! [`collective_tag`] places a number and a step into a tag. Since messages match by
//! `(peer, tag)`, two live groups with the same id could only mix up messages exchanged
//! between ranks that are members of both, and such a rank refuses to hold both: ids need
//! only be distinct among the groups one rank holds at once. (Ids that are unique over the
//! whole job, derived alike on every rank from what the group is for, are the simple way
//! to get there.)

pub mod group;
pub mod handshake;
pub mod limits;
pub mod ring;
pub mod tcp;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;

pub use group::{Group, GroupTransport};
pub use handshake::DataPlaneSecret;
pub use limits::DataPlaneLimits;
pub use ring::{RingElement, chunk_range, ring_reference_sum};
pub use tcp::{AbortHandle, TcpCommunicator, TcpOptions, TcpRendezvous, loopback_group};

/// The first tag reserved for collectives: user tags must be below it.
pub const COLLECTIVE_TAG_BIT: u64 = 1 << 63;

/// The largest tag a user may send or receive with.
pub const MAX_USER_TAG: u64 = COLLECTIVE_TAG_BIT - 1;

/// Bits of a collective tag that number the step inside one collective.
const STEP_BITS: u32 = 24;
/// Bits of a collective tag that hold the collective's number (group id and sequence).
const NUMBER_BITS: u32 = 38;
/// Bits of a collective's number that count the collectives of its group.
const SEQUENCE_BITS: u32 = 24;
/// Bits of a collective's number that hold its group's id.
const GROUP_ID_BITS: u32 = NUMBER_BITS - SEQUENCE_BITS;
/// Tags with both top bits set are the transport's own control frames, never a collective's.
pub(crate) const CONTROL_TAG_BITS: u64 = 0b11 << 62;

/// The most ranks a communicator may have: every collective step must fit its tag field
/// (the ring all-reduce takes 2·(n−1) steps).
pub const MAX_WORLD_SIZE: usize = 1 << (STEP_BITS - 2);

/// The group id of a communicator's world collectives; groups have ids from 1.
pub const WORLD_GROUP_ID: u32 = 0;

/// The largest group id: ids live in a 14-bit field of collective tags.
pub const MAX_GROUP_ID: u32 = (1 << GROUP_ID_BITS) - 1;

/// Collectives of one group (or of the world) are numbered modulo this many (2²⁴).
pub const SEQUENCE_PERIOD: u64 = 1 << SEQUENCE_BITS;

/// The number of the `seq`-th collective (counting from 0) of group `group_id`
/// ([`WORLD_GROUP_ID`] for the world communicator): `group_id` in bits 24..38, `seq mod
/// 2²⁴` in bits 0..24. Ids above [`MAX_GROUP_ID`] are truncated to 14 bits; constructors
/// refuse them.
pub fn collective_number(group_id: u32, seq: u64) -> u64 {
    let group_field = (u64::from(group_id) & u64::from(MAX_GROUP_ID)) << SEQUENCE_BITS;
    group_field | (seq % SEQUENCE_PERIOD)
}

/// The group id and sequence number of a collective's number.
pub(crate) fn split_collective_number(number: u64) -> (u32, u64) {
    let group_id = (number >> SEQUENCE_BITS) & u64::from(MAX_GROUP_ID);
    // Masked to 14 bits: fits u32.
    (group_id as u32, number % SEQUENCE_PERIOD)
}

/// How errors and abort reasons name the collective numbered `number`.
pub(crate) fn describe_collective(number: u64) -> String {
    match split_collective_number(number) {
        (WORLD_GROUP_ID, seq) => format!("collective #{seq}"),
        (group_id, seq) => format!("group {group_id} collective #{seq}"),
    }
}

/// The tag of step `step` of the collective numbered `number` (see [`collective_number`]):
/// bit 63 set, bit 62 clear, `number mod 2³⁸` in bits 24..62, `step` in bits 0..24. The
/// module documentation (*Tags*) has the layout and why sequence numbers may wrap.
pub fn collective_tag(number: u64, step: u32) -> u64 {
    let number_field = (number & ((1 << NUMBER_BITS) - 1)) << STEP_BITS;
    let step_field = u64::from(step) & ((1 << STEP_BITS) - 1);
    COLLECTIVE_TAG_BIT | number_field | step_field
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

    /// A peer sent more than this rank may hold for receives it has not posted yet.
    #[error(
        "rank {peer} sent a {len}-byte message with tag {tag:#x} that nobody is receiving yet, with \
         {buffered} bytes buffered from it already: above the limit of {max}"
    )]
    BufferOverflow { peer: usize, tag: u64, len: u64, buffered: u64, max: u64 },

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
            | CommError::BufferOverflow { peer, .. }
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
/// The ranks are those of a whole communicator ([`TcpCommunicator`]) or the members of a
/// group ([`Group`]), numbered `0..world_size()` either way: code written against this
/// trait runs unchanged over a subset of the ranks (module documentation, *Groups*).
///
/// Methods take `&self` so that one task can wait in a collective while another sends,
/// receives or aborts. Every returned future is `Send`. Collectives must be called in the
/// same order on every rank (see the module documentation). On error, the contents of a
/// buffer being reduced in place are unspecified.
pub trait Communicator: Send + Sync {
    /// This process's rank, in `0..world_size()` (for a group: its index in the members).
    fn rank(&self) -> usize;

    /// The number of ranks (for a group: of members).
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

    /// The reduce-scatter half of [`Communicator::all_reduce_sum`]: afterwards this rank's
    /// chunk [`chunk_range`]`(len, world_size, rank)` holds the sums, the same bits the
    /// all-reduce leaves there; the rest of `data` is unspecified. Half the all-reduce's
    /// traffic (ZeRO-1 needs only each rank's own part of the gradients).
    fn reduce_scatter_sum<'a>(
        &'a self,
        data: &'a mut [f32],
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
