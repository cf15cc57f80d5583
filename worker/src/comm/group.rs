//! [`Group`]: point-to-point messages and collectives over a subset of a communicator's
//! ranks, and [`GroupTransport`], what a communicator offers for groups to be carved
//! from it.
//!
//! Pipeline and expert parallelism need collectives over some of the ranks only: a
//! parameter's gradient is all-reduced over the ranks that hold it (the data-parallel
//! replicas of one pipeline stage), the step statistics over everyone. A `Group` is a
//! [`Communicator`] whose ranks are `members`, a subset of the world's, carried over the
//! connections of the communicator it was carved from: no new sockets, no rendezvous, no
//! messages to build one. It holds the communicator through any handle `C` that
//! dereferences to it: `Group<&TcpCommunicator>` for a group used within a scope (built
//! for one step, say), `Group<Arc<TcpCommunicator>>` for one shared between tasks.
//!
//! Any communicator that implements [`GroupTransport`] can be carved into groups: the
//! group needs collective-tagged messages that do not wait to be sent, receives that fail
//! with the communicator's first link failure, the communicator's collective wrapper
//! (abort on failure), and a registry of the group ids live on this rank. That is all a
//! group touches, so code generic over `C: GroupTransport` (the pipeline trainer, the MoE
//! exchange) runs unchanged on any such communicator: [`super::TcpCommunicator`] today,
//! an NCCL one later.
//!
//! # Invariants
//!
//! - `members` are world ranks, ascending and distinct, and include the caller's own rank;
//!   group rank `i` is world rank `members[i]`. The constructor checks all of this and
//!   refuses the group ([`CommError::InvalidArgument`]) otherwise; nothing a caller passes
//!   makes it panic.
//! - The group id is in `1..=`[`MAX_GROUP_ID`] (0 is the world's), the same on every
//!   member, and held by at most one live group of the communicator on each rank (the
//!   constructor refuses a second; dropping the group frees its id). So no rank ever has
//!   collectives of two groups with the same id in flight, and, as messages with the same
//!   peer and tag pair up in the order they were sent, groups with the same id never take
//!   each other's messages.
//! - Collective `k` of the group (counting from 0, in call order) uses the tags of
//!   [`collective_number`]`(group_id, k)`: the group id keeps them apart from the world's
//!   and every other group's collectives, the group's own counter keeps them apart from
//!   each other (module documentation of [`super`], *Tags*). A group built again after
//!   being dropped counts from 0 again, which is sound because messages with the same peer
//!   and tag pair up in the order they were sent, and every collective of the old group
//!   has completed on this rank (its futures borrowed the group) — unless one was dropped
//!   half-way, which is why dropping an unfinished group collective aborts the
//!   communicator (below).
//! - The collectives are the [`ring`] algorithms run with group ranks, so their results
//!   (the all-reduce's summation order included) are exactly those of a world made of the
//!   members in group-rank order.
//!
//! # Failure
//!
//! The underlying communicator is the failure domain (module documentation of [`super`],
//! *Groups*): a group's collectives watch the communicator's link failures like world
//! collectives do, and one that fails aborts the communicator through the same wrapper as
//! a world collective, blaming the error's culprit. Errors name world ranks: the transport
//! names them already, and the two errors the ring algorithms raise about a received
//! message ([`CommError::SizeMismatch`], [`CommError::LengthMismatch`]) are translated
//! from group ranks before they leave the group or reach the abort.
//!
//! A group collective whose future is dropped before it completes (never polled, or
//! cancelled half-way) aborts the communicator too: its number is spent, so its peers
//! would wait for this rank forever, and messages it left behind would be taken by the
//! collective of the same number of a rebuilt group.

use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::ring::{self, RingElement, Transport};
use super::{CommError, Communicator, MAX_GROUP_ID, WORLD_GROUP_ID, collective_number, describe_collective};

/// What a [`Group`] needs of the communicator it is carved from, beyond [`Communicator`]:
/// the transport layer under the collectives and the communicator's bookkeeping. Ranks
/// here are the communicator's own (world) ranks; tags are collective tags
/// ([`super::collective_tag`]), which user sends and receives can never take.
///
/// Implementations keep the semantics of [`super`] (module documentation): messages with
/// the same `(peer, tag)` pair up in the order they were posted, and a broken link or an
/// abort fails every pending and later collective fetch.
pub trait GroupTransport: Communicator {
    /// Queues a collective message for world rank `peer` under the collective tag `tag` and
    /// returns at once: it never waits for the matching fetch (the ring algorithms post
    /// before they wait, which is why no step deadlocks).
    fn post_collective(&self, peer: usize, tag: u64, bytes: Bytes) -> Result<(), CommError>;

    /// The next collective message from world rank `peer` under `tag`. Fails with the
    /// communicator's first link failure, whichever peer it was with (a collective needs
    /// everyone), or with [`CommError::Aborted`] once the communicator is aborted.
    fn fetch_collective(
        &self,
        peer: usize,
        tag: u64,
    ) -> impl Future<Output = Result<Bytes, CommError>> + Send;

    /// Runs `run`, the collective numbered `number` (see [`collective_number`]) called as
    /// `op`; if it fails other than by a local abort, aborts the communicator, blaming the
    /// error's [`CommError::culprit`] (so `run`'s errors must name world ranks), so that
    /// ranks waiting on this one fail too instead of hanging.
    fn run_collective<'a, T: Send + 'a>(
        &'a self,
        op: &'static str,
        number: u64,
        run: impl Future<Output = Result<T, CommError>> + Send + 'a,
    ) -> impl Future<Output = Result<T, CommError>> + Send + 'a;

    /// Reserves `group_id` for a group being built on this rank; `false` if a live group
    /// of this communicator holds it already.
    fn claim_group_id(&self, group_id: u32) -> bool;

    /// Frees `group_id` when its group is dropped.
    fn release_group_id(&self, group_id: u32);

    /// Whether the communicator has been aborted (or shut down).
    fn is_aborted(&self) -> bool;
}

/// A [`Communicator`] over some of a [`GroupTransport`]'s ranks, reached through the handle
/// `C` (`&TcpCommunicator`, `Arc<TcpCommunicator>`, …); see the module documentation.
/// Ranks, sizes and roots passed to its methods are group ranks.
pub struct Group<C>
where
    C: Deref,
    C::Target: GroupTransport,
{
    comm: C,
    group_id: u32,
    /// World ranks, ascending and distinct; `members[rank]` is the caller.
    members: Vec<usize>,
    /// The caller's group rank.
    rank: usize,
    /// How many of this group's collectives have been called.
    next_seq: AtomicU64,
}

impl<C> Group<C>
where
    C: Deref,
    C::Target: GroupTransport,
{
    /// The group `group_id` of `members` (world ranks, ascending and distinct, this rank
    /// among them) over `comm`. Every member must build it with the same members and id;
    /// building it is local (no messages). Fails with [`CommError::InvalidArgument`] when
    /// the members are empty, unsorted, repeated, out of range or lack this rank, when the
    /// id is 0 or above [`MAX_GROUP_ID`], or when a live group on this rank holds the id.
    pub fn new(comm: C, members: Vec<usize>, group_id: u32) -> Result<Self, CommError> {
        let world_size = Communicator::world_size(&*comm);
        let me = Communicator::rank(&*comm);
        let invalid = |reason: String| CommError::InvalidArgument { op: "Group::new", reason };
        let rank = check_members(group_id, &members, world_size, me).map_err(invalid)?;
        if !comm.claim_group_id(group_id) {
            return Err(invalid(format!(
                "group id {group_id} is already held by a live group on rank {me} (drop that group first)"
            )));
        }
        Ok(Group { comm, group_id, members, rank, next_seq: AtomicU64::new(0) })
    }

    /// The id every member built the group with.
    pub fn group_id(&self) -> u32 {
        self.group_id
    }

    /// The members' world ranks, ascending: group rank `i` is world rank `members()[i]`.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// The world rank of group rank `group_rank`, if there is one.
    pub fn world_rank(&self, group_rank: usize) -> Option<usize> {
        self.members.get(group_rank).copied()
    }

    /// The group rank of world rank `world_rank`, if it is a member.
    pub fn group_rank(&self, world_rank: usize) -> Option<usize> {
        self.members.binary_search(&world_rank).ok()
    }

    /// The handle to the communicator the group was carved from.
    pub fn communicator(&self) -> &C {
        &self.comm
    }

    /// The number of the group's next collective (see [`collective_number`]).
    fn take_seq(&self) -> u64 {
        collective_number(self.group_id, self.next_seq.fetch_add(1, Ordering::Relaxed))
    }

    /// The world rank of group rank `peer`, or the error for a peer argument out of range.
    fn world_peer(&self, peer: usize) -> Result<usize, CommError> {
        self.world_rank(peer).ok_or(CommError::InvalidPeer { peer, world_size: self.members.len() })
    }

    /// `err`, raised while running a ring algorithm over this group, with every rank in it
    /// a world rank. The match is exhaustive on purpose: a new error variant must decide
    /// whose ranks it carries.
    fn to_world(&self, err: CommError) -> CommError {
        // The ring algorithms name the peer a message came from by its group rank, which
        // they only ever fetched from through `world_peer`: always a member.
        let world = |peer: usize| self.world_rank(peer).unwrap_or(peer);
        match err {
            CommError::SizeMismatch { op, peer, tag, expected, got } => {
                CommError::SizeMismatch { op, peer: world(peer), tag, expected, got }
            }
            CommError::LengthMismatch { op, peer, tag, expected, got } => {
                CommError::LengthMismatch { op, peer: world(peer), tag, expected, got }
            }
            // Raised by the transport (whose ranks are world ranks already) or rank-free.
            // `InvalidPeer` cannot come out of a collective: the ring asks only for group
            // ranks below the group's size, and members are below the world's.
            err @ (CommError::InvalidPeer { .. }
            | CommError::ReservedTag { .. }
            | CommError::InvalidArgument { .. }
            | CommError::PeerFailed { .. }
            | CommError::PeerClosed { .. }
            | CommError::PeerAborted { .. }
            | CommError::FrameTooLarge { .. }
            | CommError::MessageTooLarge { .. }
            | CommError::BufferOverflow { .. }
            | CommError::Aborted { .. }
            | CommError::Handshake { .. }
            | CommError::HandshakeFrom { .. }
            | CommError::RendezvousTimeout { .. }
            | CommError::Io { .. }) => err,
        }
    }
}

impl<C> Group<C>
where
    C: Deref + Sync,
    C::Target: GroupTransport,
{
    /// Runs the group's collective numbered `number` under the communicator's collective
    /// wrapper (which aborts the communicator if it fails), with errors in world ranks;
    /// aborts the communicator if the returned future is dropped before it completes.
    fn collective<'a, T: Send + 'a>(
        &'a self,
        op: &'static str,
        number: u64,
        run: impl Future<Output = Result<T, CommError>> + Send + 'a,
    ) -> impl Future<Output = Result<T, CommError>> + Send + 'a {
        let unfinished = Unfinished { comm: &*self.comm, op, number };
        async move {
            let result =
                self.comm.run_collective(op, number, async { run.await.map_err(|e| self.to_world(e)) }).await;
            unfinished.disarm();
            result
        }
    }

    fn all_reduce_generic<'a, T: RingElement>(
        &'a self,
        data: &'a mut [T],
    ) -> impl Future<Output = Result<(), CommError>> + Send + 'a {
        // Numbered now, at the call, not at the first poll (module documentation of `super`).
        let number = self.take_seq();
        self.collective("all_reduce_sum", number, ring::all_reduce(self, number, data))
    }
}

/// Armed for the life of a group collective's future; if dropped (rather than forgotten
/// on completion), the collective was abandoned half-way: abort the communicator.
struct Unfinished<'a, T: GroupTransport + ?Sized> {
    comm: &'a T,
    op: &'static str,
    number: u64,
}

impl<T: GroupTransport + ?Sized> Unfinished<'_, T> {
    /// The collective completed (successfully or not): nothing to do.
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl<T: GroupTransport + ?Sized> Drop for Unfinished<'_, T> {
    fn drop(&mut self) {
        if !self.comm.is_aborted() {
            let reason = format!(
                "rank {}: {} ({}) was dropped before it completed",
                Communicator::rank(self.comm),
                self.op,
                describe_collective(self.number)
            );
            self.comm.abort(&reason);
        }
    }
}

/// Checks a group's definition (see [`Group::new`]) and returns the caller's group rank,
/// or why the group is refused.
fn check_members(group_id: u32, members: &[usize], world_size: usize, me: usize) -> Result<usize, String> {
    if group_id == WORLD_GROUP_ID || group_id > MAX_GROUP_ID {
        return Err(format!(
            "group id {group_id} is not in 1..={MAX_GROUP_ID} (id {WORLD_GROUP_ID} is the world communicator's)"
        ));
    }
    if members.is_empty() {
        return Err(format!("group {group_id} has no members"));
    }
    if let Some(&out) = members.iter().find(|&&m| m >= world_size) {
        return Err(format!(
            "group {group_id}: member {out} is out of range for world size {world_size} (members {})",
            show(members)
        ));
    }
    if let Some(pair) = members.windows(2).find(|pair| pair[0] >= pair[1]) {
        let why = if pair[0] == pair[1] {
            format!("rank {} is listed twice", pair[0])
        } else {
            format!("{} comes before {}", pair[0], pair[1])
        };
        return Err(format!(
            "group {group_id}: members {} must be ascending and distinct, but {why}",
            show(members)
        ));
    }
    members
        .binary_search(&me)
        .map_err(|_| format!("group {group_id}: this rank ({me}) is not among its members {}", show(members)))
}

/// A member list for an error message: the first few ranks, then how many in all.
fn show(members: &[usize]) -> String {
    const SHOWN: usize = 16;
    if members.len() <= SHOWN {
        format!("{members:?}")
    } else {
        let head: Vec<String> = members[..SHOWN].iter().map(usize::to_string).collect();
        format!("[{}, … ({} in all)]", head.join(", "), members.len())
    }
}

impl<C> Drop for Group<C>
where
    C: Deref,
    C::Target: GroupTransport,
{
    fn drop(&mut self) {
        self.comm.release_group_id(self.group_id);
    }
}

impl<C> fmt::Debug for Group<C>
where
    C: Deref,
    C::Target: GroupTransport,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group")
            .field("group_id", &self.group_id)
            .field("rank", &self.rank)
            .field("members", &show(&self.members))
            .field("world_rank", &Communicator::rank(&*self.comm))
            .finish()
    }
}

/// The ring algorithms' view: group ranks in, world ranks on the wire.
impl<C> Transport for Group<C>
where
    C: Deref + Sync,
    C::Target: GroupTransport,
{
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.members.len()
    }

    fn post(&self, peer: usize, tag: u64, bytes: Bytes) -> Result<(), CommError> {
        self.comm.post_collective(self.world_peer(peer)?, tag, bytes)
    }

    fn fetch(&self, peer: usize, tag: u64) -> impl Future<Output = Result<Bytes, CommError>> + Send {
        let world = self.world_peer(peer);
        async move { self.comm.fetch_collective(world?, tag).await }
    }
}

impl<C> Communicator for Group<C>
where
    C: Deref + Send + Sync,
    C::Target: GroupTransport,
{
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.members.len()
    }

    fn send(
        &self,
        peer: usize,
        tag: u64,
        bytes: Bytes,
    ) -> impl Future<Output = Result<(), CommError>> + Send {
        // Queued here, before the future is polled, as the communicator's own send does.
        let queued = self.world_peer(peer).map(|world| self.comm.send(world, tag, bytes));
        async move { queued?.await }
    }

    async fn recv(&self, peer: usize, tag: u64) -> Result<Bytes, CommError> {
        let world = self.world_peer(peer)?;
        self.comm.recv(world, tag).await
    }

    fn all_reduce_sum<'a>(
        &'a self,
        data: &'a mut [f32],
    ) -> impl Future<Output = Result<(), CommError>> + Send + 'a {
        self.all_reduce_generic(data)
    }

    fn all_reduce_sum_f64<'a>(
        &'a self,
        data: &'a mut [f64],
    ) -> impl Future<Output = Result<(), CommError>> + Send + 'a {
        self.all_reduce_generic(data)
    }

    fn reduce_scatter_sum<'a>(
        &'a self,
        data: &'a mut [f32],
    ) -> impl Future<Output = Result<(), CommError>> + Send + 'a {
        let number = self.take_seq();
        self.collective("reduce_scatter_sum", number, ring::reduce_scatter(self, number, data))
    }

    fn all_to_all_v(
        &self,
        buffers: Vec<Bytes>,
    ) -> impl Future<Output = Result<Vec<Bytes>, CommError>> + Send {
        let number = self.take_seq();
        self.collective("all_to_all_v", number, ring::all_to_all_v(self, number, buffers))
    }

    fn all_gather(&self, bytes: Bytes) -> impl Future<Output = Result<Vec<Bytes>, CommError>> + Send {
        let number = self.take_seq();
        self.collective("all_gather", number, ring::all_gather(self, number, bytes))
    }

    fn broadcast(&self, root: usize, bytes: Bytes) -> impl Future<Output = Result<Bytes, CommError>> + Send {
        let number = self.take_seq();
        self.collective("broadcast", number, ring::broadcast(self, number, root, bytes))
    }

    fn barrier(&self) -> impl Future<Output = Result<(), CommError>> + Send {
        let number = self.take_seq();
        self.collective("barrier", number, ring::barrier(self, number))
    }

    /// Aborts the underlying communicator: the world and every group over it.
    fn abort(&self, reason: &str) {
        self.comm.abort(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{COLLECTIVE_TAG_BIT, CONTROL_TAG_BITS, SEQUENCE_PERIOD, collective_tag};
    use super::*;
    use crate::comm::split_collective_number;

    #[test]
    fn tags_lay_out_group_sequence_and_step_as_documented() {
        let tag = collective_tag(collective_number(0x2abc, 0x12_3456), 0x65_4321);
        assert_eq!(tag, (1 << 63) | (0x2abc << 48) | (0x12_3456 << 24) | 0x65_4321);
        // The world is group 0: its tags are the old layout's for the first 2²⁴ collectives.
        assert_eq!(
            collective_tag(collective_number(WORLD_GROUP_ID, 5), 1),
            COLLECTIVE_TAG_BIT | (5 << 24) | 1
        );
        // No collective tag is a control tag, whatever the group, sequence and step.
        let extreme = collective_tag(collective_number(MAX_GROUP_ID, u64::MAX), u32::MAX);
        assert_ne!(extreme & CONTROL_TAG_BITS, CONTROL_TAG_BITS);
        assert_ne!(extreme & COLLECTIVE_TAG_BIT, 0);
    }

    #[test]
    fn numbers_wrap_within_their_group() {
        for group in [WORLD_GROUP_ID, 1, MAX_GROUP_ID] {
            let last = collective_number(group, SEQUENCE_PERIOD - 1);
            assert_eq!(collective_number(group, SEQUENCE_PERIOD), collective_number(group, 0));
            assert_eq!(split_collective_number(last), (group, SEQUENCE_PERIOD - 1));
            // Wrapping never spills into the next group's numbers.
            assert_eq!(split_collective_number(collective_number(group, SEQUENCE_PERIOD + 3)), (group, 3));
        }
        let mut seen = std::collections::HashSet::new();
        for group in [0, 1, 2, MAX_GROUP_ID] {
            for seq in [0, 1, SEQUENCE_PERIOD - 1] {
                assert!(seen.insert(collective_tag(collective_number(group, seq), 0)));
            }
        }
    }

    #[test]
    fn member_lists_are_checked() {
        assert_eq!(check_members(3, &[0, 2, 5], 6, 2), Ok(1));
        assert_eq!(check_members(MAX_GROUP_ID, &[4], 6, 4), Ok(0));
        let refused = |id, members: &[usize], me| check_members(id, members, 6, me).unwrap_err();
        assert!(refused(0, &[0, 1], 0).contains("id 0 is the world"));
        assert!(refused(MAX_GROUP_ID + 1, &[0, 1], 0).contains("not in 1..=16383"));
        assert!(refused(1, &[], 0).contains("no members"));
        assert!(refused(1, &[0, 6], 0).contains("member 6 is out of range for world size 6"));
        assert!(refused(1, &[0, 3, 3], 0).contains("rank 3 is listed twice"));
        assert!(refused(1, &[2, 0], 0).contains("2 comes before 0"));
        assert!(refused(1, &[0, 2], 1).contains("this rank (1) is not among its members [0, 2]"));
        let many: Vec<usize> = (0..40).collect();
        assert!(check_members(1, &many, 39, 0).unwrap_err().contains("… (40 in all)"));
    }
}
