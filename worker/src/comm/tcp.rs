//! [`TcpCommunicator`]: the data plane over TCP, one connection per pair of ranks.
//!
//! # Rendezvous
//!
//! Every rank binds a listener ([`TcpRendezvous::bind`]), the addresses are exchanged out
//! of band (through the coordinator; [`loopback_group`] does it in-process), and every
//! rank calls [`TcpRendezvous::connect`] with the full address list and the rendezvous's
//! [`DataPlaneSecret`]. For each pair the lower rank dials the higher one, retrying with
//! exponential backoff until the deadline; the higher rank accepts. Every connection runs
//! the mutual challenge–response of [`super::handshake`] before a single frame is read.
//!
//! A connection that does not complete it (garbage, a bad magic or version, a wrong
//! proof, a replayed proof, silence, a close half-way: a port scanner, a health probe, an
//! attacker, a rank of another rendezvous) is a *stranger*: dropped and logged with its
//! address, and the acceptor keeps waiting; it never fails the rendezvous. At most
//! [`MAX_PENDING_HANDSHAKES`] handshakes are in progress at once, each for at most
//! [`HANDSHAKE_TIMEOUT`]; a connection arriving when all are taken evicts the oldest, so a
//! flood of silent strangers cannot keep a real peer, whose handshake takes one round
//! trip, out. A dialer whose handshake fails dials again until the deadline. Only a peer
//! that proved it holds the secret can fail the rendezvous: a wrong world size or session,
//! a rank that is not the one dialed or that dials the wrong way, a rank that connects
//! twice, each an error naming the peer (and never the session or the secret).
//! `TCP_NODELAY` is set on every connection.
//!
//! # Frames
//!
//! After the handshake a connection carries frames `tag: u64 LE | len: u64 LE | payload`.
//! Frames whose tag has both top bits set are the transport's own: *goodbye* (`u64::MAX`,
//! empty: graceful shutdown follows) and *abort* (`u64::MAX − 1`, payload: the rank the
//! sender blames as `u64` LE, `u64::MAX` for none, then its reason in UTF-8).
//!
//! Bounds ([`DataPlaneLimits`], set per job by [`DataPlaneLimits::for_job`]): a frame
//! announcing more than `max_frame_bytes` fails the link with
//! [`CommError::FrameTooLarge`] before anything is allocated, and `send` refuses such a
//! message up front ([`CommError::MessageTooLarge`]). A payload is read in chunks of at
//! most [`READ_CHUNK`] more than has arrived (the buffer grows by doubling), so a frame
//! announced but never sent costs at most one chunk. A link holds at most
//! `max_buffered_bytes` of messages that arrived before their receive was posted; a frame
//! that would exceed it fails the link with [`CommError::BufferOverflow`].
//!
//! # Tasks and state
//!
//! Per peer, a writer task drains an unbounded queue into the socket (so `send` never
//! waits) and a reader task demultiplexes frames into that peer's mailbox, a map from tag
//! to the messages that arrived or the receivers waiting (a oneshot each). Mailboxes sit
//! behind plain mutexes held only for map operations, never across an await. The tasks
//! belong to the communicator (`JoinSet`s): [`TcpCommunicator::shutdown`] ends them after
//! flushing, dropping the communicator aborts them.
//!
//! # Failure
//!
//! Each link has a cancellation token, a child of the communicator's abort token. A read
//! or write error, an oversized or malformed frame, a buffer overflow, an abort frame, or
//! end of stream without a goodbye fails the link: the peer's mailbox is closed with that
//! error (pending receives wake, later ones fail at once), the link's tasks stop and close
//! the socket (so the peer notices too), and the communicator's *failure* token fires,
//! failing every pending and later collective with the first such error. A goodbye closes
//! only the mailbox, with [`CommError::PeerClosed`]. A collective that fails for any
//! reason but a local abort aborts the communicator, which closes every link after an
//! abort frame, so a rank waiting on this one further round the ring fails instead of
//! hanging. The collectives of a [`super::Group`] are this communicator's collectives as
//! far as all of this goes: they watch the same failure token and abort the same
//! communicator.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use bytes::{BufMut, Bytes};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use super::group::GroupTransport;
use super::handshake::{self, DataPlaneSecret, Hello, NotAPeer};
use super::limits::DataPlaneLimits;
use super::ring::{self, RingElement, Transport};
use super::{
    CONTROL_TAG_BITS, CommError, Communicator, MAX_USER_TAG, MAX_WORLD_SIZE, WORLD_GROUP_ID,
    collective_number, describe_collective,
};

const HEADER_LEN: usize = 16;
/// Control frame: the sender shuts down gracefully; nothing follows.
const GOODBYE_TAG: u64 = u64::MAX;
/// Control frame: the sender aborted; the payload is its reason (UTF-8).
const ABORT_TAG: u64 = u64::MAX - 1;
/// Longest abort reason put on the wire.
const MAX_ABORT_REASON: usize = 4096;
/// How long an aborting writer tries to get its abort frame out before closing anyway.
const ABORT_NOTICE_TIMEOUT: Duration = Duration::from_millis(200);
/// How long an accepted connection may take to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most handshakes an acceptor runs at once; one more evicts the oldest.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Strangers logged one by one per rendezvous; the rest are counted.
const STRANGERS_LOGGED: u64 = 16;
/// A payload's buffer grows by at most this much beyond what has arrived.
pub const READ_CHUNK: usize = 1 << 20;
/// Socket-side buffers: small frames coalesce in them; a large payload bypasses them, except
/// for the part the reader's buffer picked up along with the frame's header (copied once
/// more), which is why they are kept small.
const IO_BUFFER: usize = 64 * 1024;
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Rendezvous and link settings.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// Identifies one rendezvous (one job incarnation). Not a credential: the secret is.
    pub session: u64,
    /// What every connection proves it holds before a frame is read.
    pub secret: DataPlaneSecret,
    /// Deadline for the whole rendezvous: dialing (with retries), accepting, handshakes.
    pub connect_timeout: Duration,
    /// The frame and buffer bounds of every link.
    pub limits: DataPlaneLimits,
    /// How long [`TcpCommunicator::shutdown`] waits for queued frames to drain and for
    /// peers to say goodbye.
    pub shutdown_linger: Duration,
}

impl TcpOptions {
    /// Defaults: 30 s to rendezvous, [`DataPlaneLimits::FLOOR`], 2 s shutdown linger.
    pub fn new(session: u64, secret: DataPlaneSecret) -> Self {
        TcpOptions {
            session,
            secret,
            connect_timeout: Duration::from_secs(30),
            limits: DataPlaneLimits::FLOOR,
            shutdown_linger: Duration::from_secs(2),
        }
    }

    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    pub fn with_limits(mut self, limits: DataPlaneLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn with_max_frame_bytes(mut self, max: u64) -> Self {
        self.limits.max_frame_bytes = max;
        self
    }

    pub fn with_max_buffered_bytes(mut self, max: u64) -> Self {
        self.limits.max_buffered_bytes = max;
        self
    }

    pub fn with_shutdown_linger(mut self, linger: Duration) -> Self {
        self.shutdown_linger = linger;
        self
    }
}

/// A bound listener waiting for [`TcpRendezvous::connect`]; its address is what the other
/// ranks dial.
#[derive(Debug)]
pub struct TcpRendezvous {
    listener: TcpListener,
    local_addr: SocketAddr,
}

impl TcpRendezvous {
    /// Binds the listener (port 0 picks a free port).
    pub async fn bind(addr: impl ToSocketAddrs) -> Result<Self, CommError> {
        let listener = TcpListener::bind(addr).await.map_err(|e| CommError::io("binding the listener", e))?;
        let local_addr =
            listener.local_addr().map_err(|e| CommError::io("reading the listener's address", e))?;
        Ok(TcpRendezvous { listener, local_addr })
    }

    /// The address peers dial.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connects this rank to every other: `peers[p]` is rank `p`'s listener address
    /// (`peers[rank]`, this rank's own, is not used), so `peers.len()` is the world size.
    pub async fn connect(
        self,
        rank: usize,
        peers: Vec<SocketAddr>,
        options: TcpOptions,
    ) -> Result<TcpCommunicator, CommError> {
        let world_size = peers.len();
        if world_size == 0 || world_size > MAX_WORLD_SIZE {
            return Err(CommError::InvalidArgument {
                op: "connect",
                reason: format!("world size {world_size} is not in 1..={MAX_WORLD_SIZE}"),
            });
        }
        if rank >= world_size {
            return Err(CommError::InvalidPeer { peer: rank, world_size });
        }
        let me = Me { rank, world_size, session: options.session, secret: &options.secret };
        let deadline = Instant::now() + options.connect_timeout;
        let accept = accept_lower(&self.listener, &me, deadline, options.connect_timeout);
        let dial = futures::future::try_join_all(
            ((rank + 1)..world_size)
                .map(|peer| dial_higher(&me, peer, peers[peer], deadline, options.connect_timeout)),
        );
        let (lower, higher) = tokio::try_join!(accept, dial)?;
        let mut streams: Vec<Option<TcpStream>> = lower.into_iter().map(Some).collect();
        streams.push(None);
        streams.extend(higher.into_iter().map(Some));
        Ok(TcpCommunicator::start(rank, streams, &options))
    }
}

/// This rank in its rendezvous: what its hellos say and the secret it proves.
struct Me<'a> {
    rank: usize,
    world_size: usize,
    session: u64,
    secret: &'a DataPlaneSecret,
}

impl Me<'_> {
    /// A hello with a nonce fresh for one connection.
    fn hello(&self) -> Hello {
        Hello::new(self.rank, self.world_size, self.session)
    }
}

/// The lower rank's side of one pair: dial `peer` until a handshake with it succeeds or
/// the deadline passes. Whatever answers at `addr` without proving it holds the secret is
/// not `peer`: dialed again after a backoff. An authenticated peer that disagrees (world
/// size, session, rank) fails the rendezvous.
async fn dial_higher(
    me: &Me<'_>,
    peer: usize,
    addr: SocketAddr,
    deadline: Instant,
    total: Duration,
) -> Result<TcpStream, CommError> {
    let timed_out =
        |what: String| CommError::RendezvousTimeout { rank: me.rank, timeout: total, missing: what };
    let mut backoff = FIRST_BACKOFF;
    loop {
        let why = match timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => return Err(timed_out(format!("could not connect to rank {peer} at {addr}"))),
            Ok(Err(e)) => format!("could not connect to rank {peer} at {addr}: {e}"),
            Ok(Ok(mut stream)) => {
                stream
                    .set_nodelay(true)
                    .map_err(|e| CommError::io(format!("setting TCP_NODELAY towards rank {peer}"), e))?;
                let mine = me.hello();
                match timeout_at(deadline, handshake::dial(&mut stream, &mine, me.secret)).await {
                    Err(_) => {
                        return Err(timed_out(format!(
                            "rank {peer} at {addr} accepted but did not complete the handshake"
                        )));
                    }
                    Ok(Ok(theirs)) => {
                        let refused = |reason: String| CommError::Handshake { peer, addr, reason };
                        if let Some(reason) = mine.mismatch(&theirs) {
                            return Err(refused(format!("peer is on {reason}")));
                        }
                        if theirs.rank != peer {
                            return Err(refused(format!("the listener there is rank {}", theirs.rank)));
                        }
                        return Ok(stream);
                    }
                    Ok(Err(not_a_peer)) => {
                        tracing::debug!(rank = me.rank, peer, %addr, why = %not_a_peer, "handshake failed; dialing again");
                        format!("the listener of rank {peer} at {addr}: {not_a_peer}")
                    }
                }
            }
        };
        if Instant::now() + backoff >= deadline {
            return Err(timed_out(why));
        }
        sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// An accepted connection's handshake, or why it was dropped.
enum Incoming {
    Peer(Hello, TcpStream, SocketAddr),
    /// Not a peer of this rendezvous; keep accepting.
    Stranger(SocketAddr, String),
}

/// Runs the acceptor's handshake on one connection, for at most [`HANDSHAKE_TIMEOUT`]
/// (and not past the rendezvous's deadline), or until `evicted` fires.
async fn greet_incoming(
    mut stream: TcpStream,
    addr: SocketAddr,
    mine: Hello,
    secret: &DataPlaneSecret,
    deadline: Instant,
    evicted: CancellationToken,
) -> Incoming {
    let limit = deadline.min(Instant::now() + HANDSHAKE_TIMEOUT);
    tokio::select! {
        biased;
        () = evicted.cancelled() => {
            Incoming::Stranger(addr, format!("evicted: {MAX_PENDING_HANDSHAKES} handshakes were in progress"))
        }
        shaken = timeout_at(limit, handshake::accept(&mut stream, &mine, secret)) => match shaken {
            Ok(Ok(theirs)) => Incoming::Peer(theirs, stream, addr),
            Ok(Err(not_a_peer)) => Incoming::Stranger(addr, not_a_peer.to_string()),
            Err(_) => Incoming::Stranger(addr, NotAPeer::Io("no complete handshake in time".into()).to_string()),
        },
    }
}

/// The strangers one rendezvous dropped: the first few logged one by one, all counted.
#[derive(Default)]
struct Strangers {
    count: u64,
    last: Option<(SocketAddr, String)>,
}

impl Strangers {
    fn drop_one(&mut self, rank: usize, addr: SocketAddr, why: String) {
        self.count += 1;
        if self.count <= STRANGERS_LOGGED {
            tracing::warn!(rank, %addr, why, "dropped a data-plane connection that is not a peer of this rendezvous");
        } else {
            tracing::debug!(rank, %addr, why, "dropped a data-plane connection that is not a peer of this rendezvous");
        }
        self.last = Some((addr, why));
    }

    /// For a timeout's message: what was dropped, so that a misconfigured peer (another
    /// version, another rendezvous) shows up in the error.
    fn describe(&self) -> String {
        match &self.last {
            None => String::new(),
            Some((addr, why)) => format!(
                "; dropped {} connection(s) that did not prove they belong to this rendezvous (last: {addr}, {why})",
                self.count
            ),
        }
    }
}

/// The higher rank's side: accept one authenticated connection from each lower rank.
/// Returns them in rank order.
async fn accept_lower(
    listener: &TcpListener,
    me: &Me<'_>,
    deadline: Instant,
    total: Duration,
) -> Result<Vec<TcpStream>, CommError> {
    let mut accepted: Vec<Option<TcpStream>> = (0..me.rank).map(|_| None).collect();
    let mut missing = me.rank;
    let mut greeting = FuturesUnordered::new();
    // The eviction tokens of the handshakes in progress, oldest first, by id.
    let mut pending: VecDeque<(u64, CancellationToken)> = VecDeque::new();
    let mut next_id = 0u64;
    let mut strangers = Strangers::default();
    while missing > 0 {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, addr)) => {
                    if pending.len() >= MAX_PENDING_HANDSHAKES
                        && let Some((_, oldest)) = pending.pop_front()
                    {
                        oldest.cancel();
                    }
                    let (id, evicted) = (next_id, CancellationToken::new());
                    next_id += 1;
                    pending.push_back((id, evicted.clone()));
                    let greeted = greet_incoming(stream, addr, me.hello(), me.secret, deadline, evicted);
                    greeting.push(async move { (id, greeted.await) });
                }
                // Accept errors (e.g. out of descriptors) are usually transient: keep going
                // until the deadline says otherwise.
                Err(e) => {
                    tracing::warn!(rank = me.rank, error = %e, "accept failed");
                    sleep(FIRST_BACKOFF).await;
                }
            },
            Some((id, incoming)) = greeting.next(), if !greeting.is_empty() => {
                pending.retain(|(p, _)| *p != id);
                match incoming {
                    Incoming::Stranger(addr, why) => strangers.drop_one(me.rank, addr, why),
                    Incoming::Peer(theirs, stream, addr) => {
                        let refused = |reason: String| CommError::Handshake { peer: theirs.rank, addr, reason };
                        let mine = me.hello();
                        if let Some(reason) = mine.mismatch(&theirs) {
                            return Err(refused(format!("peer is on {reason}")));
                        }
                        if theirs.rank >= me.rank {
                            return Err(refused(format!(
                                "rank {} dialed rank {}, but only lower ranks dial higher ones",
                                theirs.rank, me.rank
                            )));
                        }
                        let slot = &mut accepted[theirs.rank];
                        if slot.is_some() {
                            return Err(refused(format!("duplicate rank: rank {} is already connected", theirs.rank)));
                        }
                        stream.set_nodelay(true).map_err(|e| {
                            CommError::io(format!("setting TCP_NODELAY towards rank {}", theirs.rank), e)
                        })?;
                        *slot = Some(stream);
                        missing -= 1;
                    }
                }
            },
            () = sleep_until(deadline) => {
                let absent: Vec<String> = accepted
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.is_none())
                    .map(|(r, _)| r.to_string())
                    .collect();
                return Err(CommError::RendezvousTimeout {
                    rank: me.rank,
                    timeout: total,
                    missing: format!("no connection from ranks [{}]{}", absent.join(", "), strangers.describe()),
                });
            }
        }
    }
    if strangers.count > STRANGERS_LOGGED {
        tracing::warn!(
            rank = me.rank,
            dropped = strangers.count,
            "the rendezvous dropped data-plane strangers"
        );
    }
    Ok(accepted.into_iter().flatten().collect())
}

/// Everything a communicator's tasks share.
struct Shared {
    rank: usize,
    world_size: usize,
    limits: DataPlaneLimits,
    /// Indexed by peer; this rank's own entry holds messages it sent itself.
    mailboxes: Vec<Mutex<Mailbox>>,
    abort: Arc<AbortState>,
    /// Fires when any link fails; collectives watch it.
    failure: CancellationToken,
    first_failure: OnceLock<CommError>,
}

struct AbortState {
    token: CancellationToken,
    cause: OnceLock<AbortCause>,
}

struct AbortCause {
    reason: String,
    /// The rank blamed for the abort, carried to peers in the abort frame.
    culprit: Option<usize>,
    /// Whether the writers send abort frames. Not when the communicator is dropped: to
    /// its peers that looks exactly like a process that died, whatever the timing.
    notify: bool,
}

impl AbortState {
    fn abort(&self, reason: &str, culprit: Option<usize>) {
        self.set(AbortCause { reason: reason.to_owned(), culprit, notify: true });
    }

    fn abort_silently(&self, reason: &str) {
        self.set(AbortCause { reason: reason.to_owned(), culprit: None, notify: false });
    }

    fn set(&self, cause: AbortCause) {
        // The first cause wins: later aborts are consequences. Set before cancelling, so
        // whoever sees the token cancelled sees the cause.
        let _ = self.cause.set(cause);
        self.token.cancel();
    }

    fn error(&self) -> CommError {
        CommError::Aborted { reason: self.cause.get().map_or_else(|| "aborted".into(), |c| c.reason.clone()) }
    }
}

/// Aborts a [`TcpCommunicator`] from anywhere (another task, the coordinator session)
/// without holding the communicator itself.
#[derive(Clone)]
pub struct AbortHandle {
    state: Arc<AbortState>,
}

impl AbortHandle {
    /// See [`Communicator::abort`].
    pub fn abort(&self, reason: &str) {
        self.state.abort(reason, None);
    }

    pub fn is_aborted(&self) -> bool {
        self.state.token.is_cancelled()
    }
}

impl std::fmt::Debug for AbortHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AbortHandle").field("aborted", &self.is_aborted()).finish()
    }
}

fn lock(m: &Mutex<Mailbox>) -> MutexGuard<'_, Mailbox> {
    // Nothing panics while holding a mailbox lock; if something ever did, the mailbox is
    // still structurally sound (each operation leaves it consistent), so keep using it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One peer's messages, by tag. Invariant: a slot never has both arrived messages and
/// waiting receivers (an arrival goes to the first live waiter).
#[derive(Default)]
struct Mailbox {
    slots: HashMap<u64, Slot>,
    /// Payload bytes of the messages in `slots` (arrived, not yet taken).
    buffered: u64,
    /// Set once the link is gone: no receiver waits after this, messages already arrived
    /// are still handed out.
    closed: Option<CommError>,
}

#[derive(Default)]
struct Slot {
    arrived: VecDeque<Bytes>,
    waiting: VecDeque<oneshot::Sender<Bytes>>,
}

enum Take {
    Ready(Bytes),
    Wait(oneshot::Receiver<Bytes>),
    Closed(CommError),
}

impl Mailbox {
    /// Hands `bytes` to the first live receiver waiting on `tag`, or buffers it; refuses
    /// to buffer past `limit` bytes (`Err` with what is buffered already, `bytes` dropped).
    fn deliver(&mut self, tag: u64, bytes: Bytes, limit: Option<u64>) -> Result<(), u64> {
        let slot = self.slots.entry(tag).or_default();
        let mut bytes = bytes;
        while let Some(waiter) = slot.waiting.pop_front() {
            match waiter.send(bytes) {
                Ok(()) => {
                    self.drop_if_empty(tag);
                    return Ok(());
                }
                // That receive was cancelled: try the next one.
                Err(back) => bytes = back,
            }
        }
        let len = bytes.len() as u64;
        if limit.is_some_and(|max| self.buffered.saturating_add(len) > max) {
            let buffered = self.buffered;
            self.drop_if_empty(tag);
            return Err(buffered);
        }
        slot.arrived.push_back(bytes);
        self.buffered += len;
        Ok(())
    }

    /// Returns a message a cancelled receive had already been handed: it was first in line,
    /// so it goes to the next waiter or to the front of the queue.
    fn put_back(&mut self, tag: u64, bytes: Bytes) {
        let slot = self.slots.entry(tag).or_default();
        if slot.waiting.iter().any(|w| !w.is_closed()) {
            // Without a limit: these bytes were counted when they arrived.
            let _ = self.deliver(tag, bytes, None);
        } else {
            slot.waiting.clear();
            self.buffered += bytes.len() as u64;
            slot.arrived.push_front(bytes);
        }
    }

    fn take(&mut self, tag: u64) -> Take {
        if let Some(slot) = self.slots.get_mut(&tag)
            && let Some(bytes) = slot.arrived.pop_front()
        {
            self.buffered -= bytes.len() as u64;
            self.drop_if_empty(tag);
            return Take::Ready(bytes);
        }
        if let Some(err) = &self.closed {
            return Take::Closed(err.clone());
        }
        let (tx, rx) = oneshot::channel();
        let slot = self.slots.entry(tag).or_default();
        slot.waiting.retain(|w| !w.is_closed());
        slot.waiting.push_back(tx);
        Take::Wait(rx)
    }

    fn close(&mut self, err: CommError) {
        if self.closed.is_none() {
            self.closed = Some(err);
        }
        // Dropping the senders wakes every waiting receive, which then reads `closed`.
        for slot in self.slots.values_mut() {
            slot.waiting.clear();
        }
        self.slots.retain(|_, s| !s.arrived.is_empty());
    }

    /// Drops the cancelled receivers waiting on `tag`.
    fn prune(&mut self, tag: u64) {
        if let Some(slot) = self.slots.get_mut(&tag) {
            slot.waiting.retain(|w| !w.is_closed());
        }
        self.drop_if_empty(tag);
    }

    fn drop_if_empty(&mut self, tag: u64) {
        if self.slots.get(&tag).is_some_and(|s| s.arrived.is_empty() && s.waiting.is_empty()) {
            self.slots.remove(&tag);
        }
    }
}

impl Shared {
    /// The link to `peer` is broken: fail its receives and every collective.
    fn fail_link(&self, peer: usize, err: CommError) {
        lock(&self.mailboxes[peer]).close(err.clone());
        let _ = self.first_failure.set(err);
        self.failure.cancel();
    }

    fn failure_error(&self) -> CommError {
        // `failure` is cancelled only after `first_failure` is set; the fallback is for form.
        self.first_failure
            .get()
            .cloned()
            .unwrap_or_else(|| CommError::Aborted { reason: "a link failed".into() })
    }

    /// What an aborting writer tells its peer, if anything: the communicator's abort cause,
    /// or else why this one link was closed.
    fn abort_notice(&self, peer: usize) -> Option<(Option<usize>, String)> {
        if let Some(cause) = self.abort.cause.get() {
            return cause.notify.then(|| (cause.culprit, cause.reason.clone()));
        }
        Some(match &lock(&self.mailboxes[peer]).closed {
            Some(err) => (err.culprit(), format!("rank {} closed the link: {err}", self.rank)),
            None => (None, format!("rank {} closed the link", self.rank)),
        })
    }
}

/// A receive waiting on its oneshot. If the receive is cancelled after a message was
/// handed to it but before it was read, the message goes back to the mailbox instead of
/// being lost.
struct PendingRecv<'a> {
    rx: oneshot::Receiver<Bytes>,
    mailbox: &'a Mutex<Mailbox>,
    tag: u64,
    done: bool,
}

impl Drop for PendingRecv<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.rx.close();
        let mut mailbox = lock(self.mailbox);
        if let Ok(bytes) = self.rx.try_recv() {
            mailbox.put_back(self.tag, bytes);
        } else {
            // Forget this receive's slot, so abandoned tags do not accumulate.
            mailbox.prune(self.tag);
        }
    }
}

type Outgoing = (u64, Bytes);

/// The TCP [`Communicator`]. Build it with [`TcpRendezvous`] (or [`loopback_group`]); end
/// it with [`TcpCommunicator::shutdown`] to flush, or drop it to cut every link at once.
pub struct TcpCommunicator {
    shared: Arc<Shared>,
    /// Writer queues by peer (`None` for this rank).
    outboxes: Vec<Option<mpsc::UnboundedSender<Outgoing>>>,
    /// How many world collectives have been called.
    next_seq: AtomicU64,
    /// The ids of this rank's live [`super::Group`]s over this communicator.
    group_ids: Mutex<HashSet<u32>>,
    writers: Mutex<JoinSet<(usize, Result<(), CommError>)>>,
    readers: Mutex<JoinSet<()>>,
    linger: Duration,
}

impl std::fmt::Debug for TcpCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpCommunicator")
            .field("rank", &self.shared.rank)
            .field("world_size", &self.shared.world_size)
            .field("aborted", &self.shared.abort.token.is_cancelled())
            .finish()
    }
}

impl TcpCommunicator {
    /// Binds a listener: step one of the rendezvous (see [`TcpRendezvous`]).
    pub async fn bind(addr: impl ToSocketAddrs) -> Result<TcpRendezvous, CommError> {
        TcpRendezvous::bind(addr).await
    }

    /// Spawns the reader and writer of every link. `streams[p]` is the connection to rank
    /// `p` (`None` for `rank`).
    fn start(rank: usize, streams: Vec<Option<TcpStream>>, options: &TcpOptions) -> Self {
        let world_size = streams.len();
        let abort = Arc::new(AbortState { token: CancellationToken::new(), cause: OnceLock::new() });
        let shared = Arc::new(Shared {
            rank,
            world_size,
            limits: options.limits,
            mailboxes: (0..world_size).map(|_| Mutex::new(Mailbox::default())).collect(),
            abort,
            failure: CancellationToken::new(),
            first_failure: OnceLock::new(),
        });
        let mut writers = JoinSet::new();
        let mut readers = JoinSet::new();
        let mut outboxes = Vec::with_capacity(world_size);
        for (peer, stream) in streams.into_iter().enumerate() {
            let Some(stream) = stream else {
                outboxes.push(None);
                continue;
            };
            let (read_half, write_half) = stream.into_split();
            let (tx, rx) = mpsc::unbounded_channel();
            let link = shared.abort.token.child_token();
            writers.spawn(run_writer(peer, rx, write_half, link.clone(), shared.clone()));
            readers.spawn(run_reader(peer, read_half, link, shared.clone()));
            outboxes.push(Some(tx));
        }
        TcpCommunicator {
            shared,
            outboxes,
            next_seq: AtomicU64::new(0),
            group_ids: Mutex::new(HashSet::new()),
            writers: Mutex::new(writers),
            readers: Mutex::new(readers),
            linger: options.shutdown_linger,
        }
    }

    /// A handle that aborts this communicator from elsewhere.
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle { state: self.shared.abort.clone() }
    }

    pub fn is_aborted(&self) -> bool {
        self.shared.abort.token.is_cancelled()
    }

    /// Graceful end: every queued frame is written, each peer is told goodbye (so its
    /// receives from this rank fail with [`CommError::PeerClosed`] rather than as a broken
    /// link, and its collectives are not disturbed), then this rank waits up to the linger
    /// for its peers' goodbyes so that closing the sockets cannot reset a connection whose
    /// last frames the peer has not read yet. Every task is ended on return. Errors if a
    /// link failed to flush.
    pub async fn shutdown(mut self) -> Result<(), CommError> {
        // Closing the queues is what tells the writers to say goodbye.
        self.outboxes.clear();
        let deadline = Instant::now() + self.linger;
        let mut writers = std::mem::take(&mut *self.writers.lock().unwrap_or_else(PoisonError::into_inner));
        let mut readers = std::mem::take(&mut *self.readers.lock().unwrap_or_else(PoisonError::into_inner));
        let mut result = Ok(());
        loop {
            match timeout_at(deadline, writers.join_next()).await {
                Ok(None) => break,
                Ok(Some(Ok((_, Ok(()))))) => {}
                Ok(Some(Ok((peer, Err(e))))) => {
                    // A peer that already said goodbye may have closed its socket before
                    // ours: failing to say goodbye back loses nothing.
                    let peer_left = matches!(
                        lock(&self.shared.mailboxes[peer]).closed,
                        Some(CommError::PeerClosed { .. })
                    );
                    if result.is_ok() && !peer_left {
                        result = Err(match e {
                            CommError::Aborted { .. } => e,
                            other => CommError::PeerFailed {
                                peer,
                                reason: format!("queued frames were not all delivered: {other}"),
                            },
                        });
                    }
                }
                Ok(Some(Err(join))) => {
                    if result.is_ok() {
                        result = Err(CommError::PeerFailed {
                            peer: self.shared.rank,
                            reason: format!("writer task: {join}"),
                        });
                    }
                }
                Err(_) => {
                    if result.is_ok() {
                        result = Err(CommError::PeerFailed {
                            peer: self.shared.rank,
                            reason: format!("queued frames not flushed within {:?}", self.linger),
                        });
                    }
                    break;
                }
            }
        }
        while let Ok(Some(_)) = timeout_at(deadline, readers.join_next()).await {}
        // Whatever did not finish in time is aborted here (JoinSet drop); later uses of an
        // AbortHandle see an aborted communicator.
        self.shared.abort.abort_silently("communicator shut down");
        writers.abort_all();
        readers.abort_all();
        result
    }

    fn check_peer(&self, peer: usize) -> Result<(), CommError> {
        if peer < self.shared.world_size {
            Ok(())
        } else {
            Err(CommError::InvalidPeer { peer, world_size: self.shared.world_size })
        }
    }

    fn check_abort(&self) -> Result<(), CommError> {
        if self.shared.abort.token.is_cancelled() { Err(self.shared.abort.error()) } else { Ok(()) }
    }

    fn check_user_tag(tag: u64) -> Result<(), CommError> {
        if tag <= MAX_USER_TAG { Ok(()) } else { Err(CommError::ReservedTag { tag }) }
    }

    fn post_frame(&self, peer: usize, tag: u64, bytes: Bytes) -> Result<(), CommError> {
        self.check_peer(peer)?;
        self.check_abort()?;
        if peer == self.shared.rank {
            // This rank's own messages: no limit but its own program's.
            let _ = lock(&self.shared.mailboxes[peer]).deliver(tag, bytes, None);
            return Ok(());
        }
        if let Some(err) = &lock(&self.shared.mailboxes[peer]).closed {
            return Err(err.clone());
        }
        // Refused here rather than by the peer's reader, which would fail the whole link
        // (ranks are expected to share one limit).
        let len = bytes.len() as u64;
        let max = self.shared.limits.max_frame_bytes;
        if len > max {
            return Err(CommError::MessageTooLarge { peer, tag, len, max });
        }
        let queue = self.outboxes.get(peer).and_then(Option::as_ref);
        match queue.map(|q| q.send((tag, bytes))) {
            Some(Ok(())) => Ok(()),
            // The writer is gone; its link failure is (or is about to be) recorded.
            _ => Err(self.link_error(peer)),
        }
    }

    fn link_error(&self, peer: usize) -> CommError {
        self.check_abort().err().unwrap_or_else(|| {
            lock(&self.shared.mailboxes[peer])
                .closed
                .clone()
                .unwrap_or_else(|| CommError::PeerFailed { peer, reason: "connection closed".into() })
        })
    }

    async fn receive(&self, peer: usize, tag: u64, collective: bool) -> Result<Bytes, CommError> {
        self.check_peer(peer)?;
        self.check_abort()?;
        if collective && self.shared.failure.is_cancelled() {
            return Err(self.shared.failure_error());
        }
        let mailbox = &self.shared.mailboxes[peer];
        let taken = lock(mailbox).take(tag);
        let rx = match taken {
            Take::Ready(bytes) => return Ok(bytes),
            Take::Closed(err) => return Err(err),
            Take::Wait(rx) => rx,
        };
        let mut pending = PendingRecv { rx, mailbox, tag, done: false };
        tokio::select! {
            biased;
            () = self.shared.abort.token.cancelled() => Err(self.shared.abort.error()),
            () = self.shared.failure.cancelled(), if collective => Err(self.shared.failure_error()),
            got = &mut pending.rx => {
                pending.done = got.is_ok();
                got.map_err(|_| self.link_error(peer))
            }
        }
    }

    /// The number of the next world collective: group [`WORLD_GROUP_ID`], sequence modulo
    /// 2²⁴ (see [`collective_number`]).
    fn take_seq(&self) -> u64 {
        collective_number(WORLD_GROUP_ID, self.next_seq.fetch_add(1, Ordering::Relaxed))
    }

    /// Runs the collective numbered `number` (the world's or a group's); if it fails other
    /// than by a local abort, aborts the communicator so that ranks waiting on this one fail
    /// too instead of hanging. `run`'s errors must name world ranks: the abort blames
    /// [`CommError::culprit`].
    async fn collective<T>(
        &self,
        op: &'static str,
        number: u64,
        run: impl Future<Output = Result<T, CommError>>,
    ) -> Result<T, CommError> {
        self.check_abort()?;
        let result = run.await;
        if let Err(err) = &result
            && !self.is_aborted()
        {
            let reason =
                format!("rank {}: {op} ({}) failed: {err}", self.shared.rank, describe_collective(number));
            self.shared.abort.abort(&reason, err.culprit());
        }
        result
    }

    fn all_reduce_generic<'a, T: RingElement>(
        &'a self,
        data: &'a mut [T],
    ) -> impl Future<Output = Result<(), CommError>> + Send + 'a {
        let seq = self.take_seq();
        async move { self.collective("all_reduce_sum", seq, ring::all_reduce(self, seq, data)).await }
    }
}

impl Drop for TcpCommunicator {
    fn drop(&mut self) {
        self.shared.abort.abort_silently("communicator dropped");
        self.writers.get_mut().unwrap_or_else(PoisonError::into_inner).abort_all();
        self.readers.get_mut().unwrap_or_else(PoisonError::into_inner).abort_all();
    }
}

impl Transport for TcpCommunicator {
    fn rank(&self) -> usize {
        self.shared.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world_size
    }

    fn post(&self, peer: usize, tag: u64, bytes: Bytes) -> Result<(), CommError> {
        self.post_frame(peer, tag, bytes)
    }

    fn fetch(&self, peer: usize, tag: u64) -> impl Future<Output = Result<Bytes, CommError>> + Send {
        self.receive(peer, tag, true)
    }
}

/// What a [`super::Group`] is carried over: the collectives' own transport (collective
/// receives watch the failure token), the collective wrapper, and the live group ids.
impl GroupTransport for TcpCommunicator {
    fn post_collective(&self, peer: usize, tag: u64, bytes: Bytes) -> Result<(), CommError> {
        self.post_frame(peer, tag, bytes)
    }

    fn fetch_collective(
        &self,
        peer: usize,
        tag: u64,
    ) -> impl Future<Output = Result<Bytes, CommError>> + Send {
        self.receive(peer, tag, true)
    }

    fn run_collective<'a, T: Send + 'a>(
        &'a self,
        op: &'static str,
        number: u64,
        run: impl Future<Output = Result<T, CommError>> + Send + 'a,
    ) -> impl Future<Output = Result<T, CommError>> + Send + 'a {
        self.collective(op, number, run)
    }

    fn claim_group_id(&self, group_id: u32) -> bool {
        self.group_ids.lock().unwrap_or_else(PoisonError::into_inner).insert(group_id)
    }

    fn release_group_id(&self, group_id: u32) {
        self.group_ids.lock().unwrap_or_else(PoisonError::into_inner).remove(&group_id);
    }

    fn is_aborted(&self) -> bool {
        TcpCommunicator::is_aborted(self)
    }
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.shared.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world_size
    }

    fn send(
        &self,
        peer: usize,
        tag: u64,
        bytes: Bytes,
    ) -> impl Future<Output = Result<(), CommError>> + Send {
        // Queued here, before the future is polled: the send is in effect on return.
        let queued = Self::check_user_tag(tag).and_then(|()| self.post_frame(peer, tag, bytes));
        std::future::ready(queued)
    }

    async fn recv(&self, peer: usize, tag: u64) -> Result<Bytes, CommError> {
        Self::check_user_tag(tag)?;
        self.receive(peer, tag, false).await
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
        let seq = self.take_seq();
        async move { self.collective("reduce_scatter_sum", seq, ring::reduce_scatter(self, seq, data)).await }
    }

    fn all_to_all_v(
        &self,
        buffers: Vec<Bytes>,
    ) -> impl Future<Output = Result<Vec<Bytes>, CommError>> + Send {
        let seq = self.take_seq();
        async move { self.collective("all_to_all_v", seq, ring::all_to_all_v(self, seq, buffers)).await }
    }

    fn all_gather(&self, bytes: Bytes) -> impl Future<Output = Result<Vec<Bytes>, CommError>> + Send {
        let seq = self.take_seq();
        async move { self.collective("all_gather", seq, ring::all_gather(self, seq, bytes)).await }
    }

    fn broadcast(&self, root: usize, bytes: Bytes) -> impl Future<Output = Result<Bytes, CommError>> + Send {
        let seq = self.take_seq();
        async move { self.collective("broadcast", seq, ring::broadcast(self, seq, root, bytes)).await }
    }

    fn barrier(&self) -> impl Future<Output = Result<(), CommError>> + Send {
        let seq = self.take_seq();
        async move { self.collective("barrier", seq, ring::barrier(self, seq)).await }
    }

    fn abort(&self, reason: &str) {
        self.shared.abort.abort(reason, None);
    }
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, tag: u64, payload: &[u8]) -> std::io::Result<()> {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&tag.to_le_bytes());
    header[8..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    w.write_all(&header).await?;
    w.write_all(payload).await
}

/// Writes `first` and whatever else is already queued, then flushes once, so that bursts
/// of small frames share segments while a lone frame leaves at once.
async fn write_batch<W: AsyncWrite + Unpin>(
    w: &mut W,
    first: Outgoing,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
) -> std::io::Result<()> {
    write_frame(w, first.0, &first.1).await?;
    while let Ok((tag, payload)) = rx.try_recv() {
        write_frame(w, tag, &payload).await?;
    }
    w.flush().await
}

/// An abort frame's payload: the culprit rank (`u64::MAX` for none), then the reason,
/// truncated at a character boundary.
fn abort_frame_payload(culprit: Option<usize>, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_ABORT_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let culprit = culprit.map_or(u64::MAX, |c| c as u64);
    let mut payload = culprit.to_le_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    payload
}

fn parse_abort_frame(peer: usize, payload: &[u8]) -> CommError {
    let Some((culprit, reason)) = payload.split_first_chunk::<8>() else {
        return CommError::PeerFailed { peer, reason: "malformed abort frame".into() };
    };
    let culprit = u64::from_le_bytes(*culprit);
    CommError::PeerAborted {
        peer,
        culprit: usize::try_from(culprit).ok().filter(|&c| c < MAX_WORLD_SIZE),
        reason: String::from_utf8_lossy(reason).into_owned(),
    }
}

/// How a writer's loop ended.
enum WriterEnd {
    /// Goodbye written and the stream shut down.
    Closed,
    /// The link was cancelled; `at_boundary` says whether an abort frame can still follow.
    Cancelled {
        at_boundary: bool,
    },
    Failed(std::io::Error),
}

async fn write_until_end<W: AsyncWrite + Unpin>(
    w: &mut W,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
    link: &CancellationToken,
) -> WriterEnd {
    loop {
        let next = tokio::select! {
            biased;
            () = link.cancelled() => return WriterEnd::Cancelled { at_boundary: true },
            next = rx.recv() => next,
        };
        let Some(frame) = next else {
            // Every sender is gone: graceful shutdown.
            let goodbye = async {
                write_frame(w, GOODBYE_TAG, &[]).await?;
                w.shutdown().await
            };
            return tokio::select! {
                biased;
                () = link.cancelled() => WriterEnd::Cancelled { at_boundary: false },
                said = goodbye => said.map_or_else(WriterEnd::Failed, |()| WriterEnd::Closed),
            };
        };
        let batch = write_batch(w, frame, rx);
        tokio::pin!(batch);
        let written = tokio::select! {
            biased;
            () = link.cancelled() => {
                // Let the frames in flight finish (briefly) so that the abort frame lands on
                // a frame boundary and the peer learns the cause; if the peer is not
                // reading, give up and let it see a truncated frame.
                let finished = matches!(timeout(ABORT_NOTICE_TIMEOUT, &mut batch).await, Ok(Ok(())));
                return WriterEnd::Cancelled { at_boundary: finished };
            }
            written = &mut batch => written,
        };
        if let Err(e) = written {
            return WriterEnd::Failed(e);
        }
    }
}

async fn run_writer(
    peer: usize,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    half: OwnedWriteHalf,
    link: CancellationToken,
    shared: Arc<Shared>,
) -> (usize, Result<(), CommError>) {
    let mut w = BufWriter::with_capacity(IO_BUFFER, half);
    match write_until_end(&mut w, &mut rx, &link).await {
        WriterEnd::Closed => (peer, Ok(())),
        WriterEnd::Cancelled { at_boundary } => {
            if at_boundary && let Some((culprit, reason)) = shared.abort_notice(peer) {
                // Best effort and bounded: the peer may be gone already.
                let notice = async {
                    write_frame(&mut w, ABORT_TAG, &abort_frame_payload(culprit, &reason)).await?;
                    w.shutdown().await
                };
                let _ = timeout(ABORT_NOTICE_TIMEOUT, notice).await;
            }
            let err = if shared.abort.token.is_cancelled() {
                shared.abort.error()
            } else {
                lock(&shared.mailboxes[peer])
                    .closed
                    .clone()
                    .unwrap_or(CommError::PeerFailed { peer, reason: "link closed".into() })
            };
            (peer, Err(err))
        }
        WriterEnd::Failed(e) => {
            let err = CommError::PeerFailed { peer, reason: format!("write failed: {e}") };
            shared.fail_link(peer, err.clone());
            link.cancel();
            (peer, Err(err))
        }
    }
}

async fn run_reader(peer: usize, half: OwnedReadHalf, link: CancellationToken, shared: Arc<Shared>) {
    let mut r = BufReader::with_capacity(IO_BUFFER, half);
    let outcome = tokio::select! {
        biased;
        () = link.cancelled() => return,
        outcome = read_frames(peer, &mut r, &shared) => outcome,
    };
    match outcome {
        // Goodbye: only receives naming this peer are affected; the writer keeps going
        // (this rank may still be flushing its own last frames).
        Ok(()) => lock(&shared.mailboxes[peer]).close(CommError::PeerClosed { peer }),
        Err(err) => {
            shared.fail_link(peer, err);
            link.cancel();
        }
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on end of stream before the first byte.
async fn read_or_eof<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = r.read(&mut buf[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(false)
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "stream ended inside a frame header",
                ))
            };
        }
        filled += n;
    }
    Ok(true)
}

/// Demultiplexes frames into the peer's mailbox until a goodbye (`Ok`) or a failure.
async fn read_frames<R: AsyncRead + Unpin>(peer: usize, r: &mut R, shared: &Shared) -> Result<(), CommError> {
    let failed = |reason: String| CommError::PeerFailed { peer, reason };
    loop {
        let mut header = [0u8; HEADER_LEN];
        match read_or_eof(r, &mut header).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(failed(
                    "connection closed without goodbye (the process died or dropped it)".into(),
                ));
            }
            Err(e) => return Err(failed(format!("read failed: {e}"))),
        }
        let tag = u64::from_le_bytes(std::array::from_fn(|i| header[i]));
        let len = u64::from_le_bytes(std::array::from_fn(|i| header[8 + i]));
        let max = shared.limits.max_frame_bytes;
        let size = match usize::try_from(len) {
            Ok(size) if len <= max => size,
            _ => return Err(CommError::FrameTooLarge { peer, tag, len, max }),
        };
        let payload = read_payload(r, size).await.map_err(|(got, e)| match e {
            Some(e) => failed(format!("read failed inside a frame (tag {tag:#x}): {e}")),
            None => failed(format!("connection closed inside a frame (tag {tag:#x}, {got} of {len} bytes)")),
        })?;
        if tag & CONTROL_TAG_BITS == CONTROL_TAG_BITS {
            return match tag {
                GOODBYE_TAG => Ok(()),
                ABORT_TAG => Err(parse_abort_frame(peer, &payload)),
                _ => Err(failed(format!("unknown control frame {tag:#x}"))),
            };
        }
        let max = shared.limits.max_buffered_bytes;
        if let Err(buffered) = lock(&shared.mailboxes[peer]).deliver(tag, payload, Some(max)) {
            return Err(CommError::BufferOverflow { peer, tag, len, buffered, max });
        }
    }
}

/// Reads a `size`-byte payload, growing the buffer by doubling from [`READ_CHUNK`] as the
/// bytes arrive (never to more than twice what arrived, plus a chunk), so that an announced
/// length costs nothing until it is sent. On failure: the bytes read, and the I/O error
/// (`None`: end of stream).
async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    size: usize,
) -> Result<Bytes, (usize, Option<std::io::Error>)> {
    // A `Vec` grown with `reserve_exact` ends at exactly `size` bytes of capacity, and
    // becomes `Bytes` without a copy.
    let mut payload: Vec<u8> = Vec::with_capacity(size.min(READ_CHUNK));
    while payload.len() < size {
        if payload.capacity() == payload.len() {
            let target = size.min(payload.len().saturating_mul(2).max(READ_CHUNK));
            payload.reserve_exact(target - payload.len());
        }
        let room = payload.capacity() - payload.len();
        let want = (size - payload.len()).min(room);
        match r.read_buf(&mut (&mut payload).limit(want)).await {
            Ok(0) => return Err((payload.len(), None)),
            Ok(_) => {}
            Err(e) => return Err((payload.len(), Some(e))),
        }
    }
    Ok(Bytes::from(payload))
}

/// A whole group on this host: binds `world_size` listeners on 127.0.0.1 (free ports),
/// rendezvouses them concurrently, and returns the communicators in rank order. For tests,
/// benchmarks and single-host runs.
pub async fn loopback_group(
    world_size: usize,
    options: TcpOptions,
) -> Result<Vec<TcpCommunicator>, CommError> {
    let mut listeners = Vec::with_capacity(world_size);
    for _ in 0..world_size {
        listeners.push(TcpRendezvous::bind("127.0.0.1:0").await?);
    }
    let addrs: Vec<SocketAddr> = listeners.iter().map(TcpRendezvous::local_addr).collect();
    futures::future::try_join_all(
        listeners.into_iter().enumerate().map(|(rank, l)| l.connect(rank, addrs.clone(), options.clone())),
    )
    .await
}
