//! [`FileStore`]: the embedded, crash-safe, file-backed [`StateStore`].
//!
//! # Ownership
//!
//! One tokio task owns the whole state (keys, leases, history, the log file); a
//! [`FileStore`] is a cheap, cloneable handle that sends requests to it through a bounded
//! mailbox and awaits a oneshot reply. No lock is shared, so none is held across an await.
//! The task ends when the last handle is dropped or when [`FileStore::close`] is called;
//! then every watch stream ends with [`StoreError::Closed`]. The task spawns nothing but
//! blocking file I/O (`spawn_blocking`), which it awaits.
//!
//! # Durability
//!
//! A write returns only after its log record is durable. The task takes every request
//! waiting in its mailbox (up to [`FileStoreOptions::max_batch`]), applies them in order to
//! the in-memory state, encodes the changes as one log frame, writes it and `sync_data`s
//! it on the blocking pool (group commit: one fsync for many writers), and only then sends
//! the replies and publishes the changes to watchers. Replies to reads in the same batch
//! are held back too, so nobody ever observes a state that a crash could take back. If a
//! write or fsync fails, what is in memory may be ahead of the disk, so the store stops:
//! every pending and later request gets [`StoreError::Failed`], and watches end; reopening
//! recovers exactly what was acknowledged.
//!
//! On open the store loads the newest snapshot, replays the log after it, truncates a torn
//! last frame (a write that was never acknowledged) with a warning, and refuses damage
//! anywhere else with an error naming the file and byte offset (see `format`).
//!
//! # History and compaction
//!
//! The task keeps in memory every revision since the compaction point, so a watch can
//! start or resume from any of them, also after a restart (the log holds them). Memory and
//! log therefore grow until [`StateStore::compact`] is called: the owner of the store (the
//! coordinator) compacts periodically, e.g. to the revision of a few minutes ago.
//! Compaction folds the discarded history into the base state, writes it as a new
//! snapshot together with a new log holding the retained history, and switches to them
//! atomically.
//!
//! # Watches
//!
//! A watch is registered inside the task, so its replay (the retained history from its
//! start revision) and its live feed (a `broadcast` subscription taken at the same moment)
//! meet exactly: the stream skips live commits it already replayed. Writers never wait for
//! watchers: a watcher that falls more than [`FileStoreOptions::watch_buffer`] revisions
//! (any revision, not only those under its prefix) behind the live feed is ended with
//! [`StoreError::WatchLagged`], naming the revision to resume from.
//!
//! # Leases
//!
//! Lease deadlines are timers of the task (tokio time, so tests can pause and advance it).
//! An expired lease is revoked like an explicit `revoke`: its keys are deleted in one
//! revision, which watchers see. Grants and revocations are logged; deadlines are not: after
//! a restart every lease gets its full TTL again, as in etcd.

mod format;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::Stream;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use self::format::{Commit, Entry, Event, FLUSH_BYTES, LogWriter, Snapshot};
use super::{
    EventKind, KeyValue, LeaseId, MAX_LEASE_TTL, MAX_TXN_BYTES, Op, OpResponse, Result, Revision, StateStore,
    StoreError, Txn, TxnResponse, WatchEvent, validate_ttl, validate_txn,
};

/// Tuning of a [`FileStore`].
#[derive(Clone, Debug)]
pub struct FileStoreOptions {
    /// How many revisions a watcher may fall behind the live feed before its stream is
    /// ended with [`StoreError::WatchLagged`] (rounded up to a power of two).
    pub watch_buffer: usize,
    /// Requests that may wait in the task's mailbox; callers wait when it is full.
    pub mailbox: usize,
    /// The most requests committed with one fsync.
    pub max_batch: usize,
}

impl Default for FileStoreOptions {
    fn default() -> Self {
        FileStoreOptions { watch_buffer: 4096, mailbox: 1024, max_batch: 256 }
    }
}

/// The embedded file-backed store; see the module docs. Clones are handles to one store.
#[derive(Clone, Debug)]
pub struct FileStore {
    mailbox: mpsc::Sender<Command>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
    dir: Arc<PathBuf>,
}

type Reply<T> = oneshot::Sender<Result<T>>;

enum Command {
    Txn {
        txn: Txn,
        reply: Reply<TxnResponse>,
    },
    Grant {
        ttl: Duration,
        reply: Reply<LeaseId>,
    },
    KeepAlive {
        lease: LeaseId,
        reply: Reply<Duration>,
    },
    Revoke {
        lease: LeaseId,
        reply: Reply<Option<Revision>>,
    },
    Watch {
        prefix: String,
        from: Revision,
        reply: Reply<WatchStream>,
    },
    Compact {
        revision: Revision,
        reply: Reply<()>,
    },
    /// The current and the compacted revision.
    Revisions {
        reply: Reply<(Revision, Revision)>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

impl FileStore {
    /// Opens the store in `dir` (created if missing) with default options. Must be called
    /// inside a tokio runtime; the store's task runs on it.
    pub async fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(dir, FileStoreOptions::default()).await
    }

    /// Opens the store in `dir` (created if missing): loads the snapshot, replays the log,
    /// truncates a torn tail, restarts the leases' TTLs and starts the store's task.
    ///
    /// One store per directory: two processes opening the same directory corrupt it (the
    /// store does not lock the directory).
    pub async fn open_with(dir: impl AsRef<Path>, options: FileStoreOptions) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let now = Instant::now();
        let loading = dir.clone();
        let (state, recovered) = tokio::task::spawn_blocking(move || {
            let recovered = format::recover(&loading)?;
            let state = State::recover(&recovered, now)?;
            Ok::<_, StoreError>((state, recovered))
        })
        .await
        .map_err(|e| StoreError::Failed { reason: format!("opening {}: {e}", dir.display()) })??;
        tracing::info!(
            dir = %dir.display(),
            revision = state.revision,
            compacted = state.compacted,
            keys = state.kvs.len(),
            leases = state.leases.len(),
            "state store opened"
        );

        let watch_buffer = options.watch_buffer.clamp(1, 1 << 24);
        let (tx, rx) = mpsc::channel(options.mailbox.max(1));
        let actor = Actor {
            dir: dir.clone(),
            generation: recovered.generation,
            writer: Some(recovered.writer),
            state,
            failed: None,
            watch_tx: broadcast::channel(watch_buffer).0,
            watch_buffer,
            max_batch: options.max_batch.max(1),
            staged: Vec::new(),
            staged_bytes: 0,
            published: Vec::new(),
            replies: Vec::new(),
        };
        let task = tokio::spawn(actor.run(rx));
        Ok(FileStore { mailbox: tx, task: Arc::new(Mutex::new(Some(task))), dir: Arc::new(dir) })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The earliest revision a watch may start from.
    pub async fn compacted_revision(&self) -> Result<Revision> {
        Ok(self.request(|reply| Command::Revisions { reply }).await?.1)
    }

    /// Stops the store for all handles: requests already in its mailbox are answered,
    /// later ones get [`StoreError::Closed`], watch streams end with [`StoreError::Closed`],
    /// and the store's task has ended when this returns. Closing a closed store is a no-op.
    pub async fn close(&self) -> Result<()> {
        let (reply, done) = oneshot::channel();
        if self.mailbox.send(Command::Close { reply }).await.is_ok() {
            // An error means the task ended by itself (all other handles dropped).
            let _ = done.await;
        }
        let task = self.task.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(task) = task {
            task.await.map_err(|e| StoreError::Failed { reason: format!("the store's task failed: {e}") })?;
        }
        Ok(())
    }

    async fn request<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (reply, response) = oneshot::channel();
        self.mailbox.send(command(reply)).await.map_err(|_| StoreError::Closed)?;
        response.await.map_err(|_| StoreError::Closed)?
    }
}

impl StateStore for FileStore {
    type Watch = WatchStream;

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        self.request(|reply| Command::Txn { txn, reply }).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.request(|reply| Command::Grant { ttl, reply }).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        self.request(|reply| Command::KeepAlive { lease, reply }).await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<Option<Revision>> {
        self.request(|reply| Command::Revoke { lease, reply }).await
    }

    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<WatchStream> {
        let prefix = prefix.to_string();
        self.request(|reply| Command::Watch { prefix, from: from_revision, reply }).await
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.request(|reply| Command::Compact { revision, reply }).await
    }

    async fn current_revision(&self) -> Result<Revision> {
        Ok(self.request(|reply| Command::Revisions { reply }).await?.0)
    }
}

/// The stream of a [`FileStore`] watch: the retained history from the start revision,
/// then live changes; see the module docs.
pub struct WatchStream {
    prefix: String,
    /// Commits not yet fully delivered: the replay, then live ones as they arrive.
    queue: VecDeque<Arc<Commit>>,
    /// The next event to look at in `queue.front()`.
    cursor: usize,
    live: BroadcastStream<Arc<Commit>>,
    /// Live commits below this revision were replayed already (or precede the start).
    next_revision: Revision,
    done: bool,
}

impl Stream for WatchStream {
    type Item = Result<WatchEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            while let Some(commit) = this.queue.front() {
                while let Some(event) = commit.events.get(this.cursor) {
                    this.cursor += 1;
                    if event.kv.key.starts_with(&this.prefix) {
                        let event = WatchEvent {
                            revision: commit.revision,
                            kind: event.kind,
                            kv: KeyValue::clone(&event.kv),
                        };
                        return Poll::Ready(Some(Ok(event)));
                    }
                }
                this.queue.pop_front();
                this.cursor = 0;
            }
            if this.done {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.live).poll_next(cx)) {
                Some(Ok(commit)) => {
                    if commit.revision >= this.next_revision {
                        this.next_revision = commit.revision + 1;
                        this.queue.push_back(commit);
                    }
                }
                Some(Err(BroadcastStreamRecvError::Lagged(_))) => {
                    this.done = true;
                    let prefix = this.prefix.clone();
                    return Poll::Ready(Some(Err(StoreError::WatchLagged {
                        prefix,
                        resume_from: this.next_revision,
                    })));
                }
                None => {
                    this.done = true;
                    return Poll::Ready(Some(Err(StoreError::Closed)));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// State

struct Lease {
    ttl: Duration,
    deadline: Instant,
    /// The keys attached to the lease now.
    keys: BTreeSet<String>,
}

/// Everything the store knows, owned by its task.
struct State {
    kvs: BTreeMap<String, Arc<KeyValue>>,
    revision: Revision,
    /// The state just before the compaction point (`compacted - 1`); with `history` it
    /// makes `kvs`, and compaction folds history into it.
    base: BTreeMap<String, Arc<KeyValue>>,
    /// The earliest revision a watch may start from.
    compacted: Revision,
    /// Every commit with revision ≥ `compacted`, in order.
    history: VecDeque<Arc<Commit>>,
    leases: HashMap<LeaseId, Lease>,
    deadlines: BTreeSet<(Instant, LeaseId)>,
    next_lease: u64,
}

fn deadline(now: Instant, ttl: Duration) -> Instant {
    // TTLs are bounded by MAX_LEASE_TTL, which every platform's clock can add.
    now.checked_add(ttl).unwrap_or(now)
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

fn tombstone(key: String, revision: Revision) -> Arc<KeyValue> {
    Arc::new(KeyValue {
        key,
        value: Vec::new(),
        create_revision: 0,
        mod_revision: revision,
        version: 0,
        lease: None,
    })
}

fn with_prefix<'a>(
    kvs: &'a BTreeMap<String, Arc<KeyValue>>,
    prefix: &'a str,
) -> impl Iterator<Item = (&'a String, &'a Arc<KeyValue>)> + 'a {
    kvs.range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(move |(k, _)| k.starts_with(prefix))
}

impl State {
    /// Rebuilds the state from the snapshot and the log; lease deadlines start at `now`.
    fn recover(recovered: &format::Recovered, now: Instant) -> Result<State> {
        let snapshot: &Snapshot = &recovered.snapshot;
        let mut base = BTreeMap::new();
        for kv in &snapshot.kvs {
            base.insert(kv.key.clone(), Arc::new(kv.clone()));
        }
        let mut state = State {
            kvs: base.clone(),
            revision: snapshot.revision,
            base,
            compacted: snapshot.compacted,
            history: VecDeque::new(),
            leases: HashMap::new(),
            deadlines: BTreeSet::new(),
            next_lease: snapshot.next_lease.max(1),
        };
        for &(lease, ttl_ms) in &snapshot.leases {
            state.restore_lease(lease, ttl_ms, now);
        }
        for (offset, entries) in &recovered.frames {
            for entry in entries {
                state.replay(entry, now).map_err(|reason| StoreError::Corrupt {
                    path: recovered.wal_path.clone(),
                    offset: *offset,
                    reason,
                })?;
            }
        }
        // Lease membership is derived, not logged: it follows from the keys' lease fields.
        let mut orphans = 0usize;
        for kv in state.kvs.values() {
            if let Some(lease) = kv.lease {
                match state.leases.get_mut(&lease) {
                    Some(l) => {
                        l.keys.insert(kv.key.clone());
                    }
                    None => orphans += 1,
                }
            }
        }
        if orphans > 0 {
            // Cannot follow from the log (a lease's end deletes its keys in the same record),
            // so this is outside damage; the keys stay, and can be deleted explicitly.
            tracing::warn!(orphans, "keys attached to leases that no longer exist; they will not expire");
        }
        Ok(state)
    }

    fn restore_lease(&mut self, lease: LeaseId, ttl_ms: u64, now: Instant) {
        let ttl = Duration::from_millis(ttl_ms).min(MAX_LEASE_TTL);
        if let Some(old) = self.leases.remove(&lease) {
            self.deadlines.remove(&(old.deadline, lease));
        }
        let deadline = deadline(now, ttl);
        self.leases.insert(lease, Lease { ttl, deadline, keys: BTreeSet::new() });
        self.deadlines.insert((deadline, lease));
        self.next_lease = self.next_lease.max(lease.0.saturating_add(1));
    }

    fn replay(&mut self, entry: &Entry, now: Instant) -> Result<(), String> {
        match entry {
            Entry::Write(commit) => self.replay_commit(commit),
            Entry::Grant { lease, ttl_ms } => {
                if lease.0 == 0 {
                    return Err("a grant of lease 0".into());
                }
                self.restore_lease(*lease, *ttl_ms, now);
                Ok(())
            }
            Entry::Revoke { lease, commit } => {
                if let Some(old) = self.leases.remove(lease) {
                    self.deadlines.remove(&(old.deadline, *lease));
                }
                commit.as_ref().map_or(Ok(()), |c| self.replay_commit(c))
            }
        }
    }

    fn replay_commit(&mut self, commit: &Arc<Commit>) -> Result<(), String> {
        if commit.revision != self.revision + 1 {
            return Err(format!("revision {} logged after revision {}", commit.revision, self.revision));
        }
        for event in &commit.events {
            if event.kv.mod_revision != commit.revision || event.kv.key.is_empty() {
                return Err(format!(
                    "an event of key {:?} does not belong to revision {}",
                    event.kv.key, commit.revision
                ));
            }
            match event.kind {
                EventKind::Put => self.kvs.insert(event.kv.key.clone(), event.kv.clone()),
                EventKind::Delete => self.kvs.remove(&event.kv.key),
            };
        }
        self.revision = commit.revision;
        self.history.push_back(commit.clone());
        Ok(())
    }

    fn detach(&mut self, kv: &KeyValue) {
        if let Some(lease) = kv.lease
            && let Some(lease) = self.leases.get_mut(&lease)
        {
            lease.keys.remove(&kv.key);
        }
    }

    fn attach(&mut self, kv: &KeyValue) {
        if let Some(lease) = kv.lease
            && let Some(lease) = self.leases.get_mut(&lease)
        {
            lease.keys.insert(kv.key.clone());
        }
    }

    fn put(
        &mut self,
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        revision: Revision,
    ) -> (Event, Option<KeyValue>) {
        let prev = self.kvs.get(&key).cloned();
        let kv = Arc::new(KeyValue {
            key,
            value,
            create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
            mod_revision: revision,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            lease,
        });
        if let Some(prev) = &prev {
            self.detach(prev);
        }
        self.attach(&kv);
        self.kvs.insert(kv.key.clone(), kv.clone());
        (Event { kind: EventKind::Put, kv }, prev.map(|p| KeyValue::clone(&p)))
    }

    fn delete(&mut self, key: &str, revision: Revision) -> Option<Event> {
        let prev = self.kvs.remove(key)?;
        self.detach(&prev);
        Some(Event { kind: EventKind::Delete, kv: tombstone(prev.key.clone(), revision) })
    }

    /// Records the events of a new revision; `None` when nothing changed.
    fn commit(&mut self, revision: Revision, events: Vec<Event>) -> Option<Arc<Commit>> {
        if events.is_empty() {
            return None;
        }
        self.revision = revision;
        let commit = Arc::new(Commit { revision, events });
        self.history.push_back(commit.clone());
        Some(commit)
    }

    /// Runs a transaction: everything that can fail is checked before anything changes.
    fn txn(&mut self, txn: Txn) -> Result<(TxnResponse, Option<Arc<Commit>>)> {
        validate_txn(&txn, MAX_TXN_BYTES)?;
        let succeeded = txn.compares.iter().all(|c| c.holds(self.kvs.get(&c.key).map(|kv| &**kv)));
        let ops = if succeeded { txn.success } else { txn.failure };
        for op in &ops {
            if let Op::Put { lease: Some(lease), .. } = op
                && !self.leases.contains_key(lease)
            {
                return Err(StoreError::LeaseNotFound { lease: *lease });
            }
        }

        let revision = self.revision + 1;
        let mut events = Vec::new();
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            responses.push(match op {
                Op::Get { key } => OpResponse::Get(self.kvs.get(&key).map(|kv| KeyValue::clone(kv))),
                Op::Range { prefix } => OpResponse::Range(
                    with_prefix(&self.kvs, &prefix).map(|(_, kv)| KeyValue::clone(kv)).collect(),
                ),
                Op::Put { key, value, lease } => {
                    let (event, prev) = self.put(key, value, lease, revision);
                    events.push(event);
                    OpResponse::Put { prev }
                }
                Op::Delete { key } => {
                    let event = self.delete(&key, revision);
                    let deleted = u64::from(event.is_some());
                    events.extend(event);
                    OpResponse::Delete { deleted }
                }
                Op::DeletePrefix { prefix } => {
                    let keys: Vec<String> = with_prefix(&self.kvs, &prefix).map(|(k, _)| k.clone()).collect();
                    let deleted = keys.len() as u64;
                    events.extend(keys.iter().filter_map(|k| self.delete(k, revision)));
                    OpResponse::Delete { deleted }
                }
            });
        }
        let commit = self.commit(revision, events);
        Ok((TxnResponse { succeeded, revision: self.revision, responses }, commit))
    }

    /// Ends a lease, deleting its keys in one revision. `None` when the lease is unknown.
    fn end_lease(&mut self, lease: LeaseId) -> Option<Option<Arc<Commit>>> {
        let ended = self.leases.remove(&lease)?;
        self.deadlines.remove(&(ended.deadline, lease));
        let revision = self.revision + 1;
        let mut events = Vec::new();
        for key in ended.keys {
            if self.kvs.get(&key).is_some_and(|kv| kv.lease == Some(lease)) {
                events.extend(self.delete(&key, revision));
            }
        }
        Some(self.commit(revision, events))
    }

    /// Folds the history before `revision` into the base.
    fn compact(&mut self, revision: Revision) {
        while let Some(commit) = self.history.front() {
            if commit.revision >= revision {
                break;
            }
            for event in &commit.events {
                match event.kind {
                    EventKind::Put => self.base.insert(event.kv.key.clone(), event.kv.clone()),
                    EventKind::Delete => self.base.remove(&event.kv.key),
                };
            }
            self.history.pop_front();
        }
        self.compacted = revision;
    }
}

// ---------------------------------------------------------------------------------------
// The task

type Deferred = Box<dyn FnOnce(Option<&str>) + Send>;

struct Actor {
    dir: PathBuf,
    generation: u64,
    /// `None` while a write is on the blocking pool, and after a failure.
    writer: Option<LogWriter>,
    state: State,
    /// Why the store stopped, after an I/O failure.
    failed: Option<String>,
    watch_tx: broadcast::Sender<Arc<Commit>>,
    watch_buffer: usize,
    max_batch: usize,
    /// Log entries of the current batch, not yet written.
    staged: Vec<Entry>,
    staged_bytes: usize,
    /// Commits of the current batch, published to watchers once durable.
    published: Vec<Arc<Commit>>,
    /// Replies of the current batch, sent once its entries are durable.
    replies: Vec<Deferred>,
}

impl Actor {
    async fn run(mut self, mut mailbox: mpsc::Receiver<Command>) {
        let mut closing = None;
        while closing.is_none() {
            let next_deadline = self.state.deadlines.first().map(|&(d, _)| d);
            let timers = next_deadline.is_some() && self.failed.is_none();
            tokio::select! {
                // Expiries first: a request arriving after a deadline sees the lease gone.
                biased;
                () = tokio::time::sleep_until(next_deadline.unwrap_or_else(Instant::now)), if timers => {
                    self.expire_leases();
                    self.flush().await;
                }
                command = mailbox.recv() => {
                    let Some(command) = command else { break };
                    let mut batch = vec![command];
                    while batch.len() < self.max_batch {
                        match mailbox.try_recv() {
                            Ok(command) => batch.push(command),
                            Err(_) => break,
                        }
                    }
                    for command in batch {
                        match command {
                            // Requests behind the close in this batch are dropped: their
                            // callers see `Closed`.
                            Command::Close { reply } if closing.is_none() => closing = Some(reply),
                            _ if closing.is_some() => {}
                            command => self.handle(command).await,
                        }
                        if self.staged_bytes >= FLUSH_BYTES {
                            self.flush().await;
                        }
                    }
                    self.flush().await;
                }
            }
        }
        // Refuse what is still queued, then drop the log and the watch feed (ending every
        // watch stream) before confirming the close.
        mailbox.close();
        while mailbox.try_recv().is_ok() {}
        drop(self);
        if let Some(reply) = closing {
            let _ = reply.send(());
        }
    }

    fn defer<T: Send + 'static>(&mut self, reply: Reply<T>, result: Result<T>) {
        self.replies.push(Box::new(move |failed: Option<&str>| {
            let result = match failed {
                Some(reason) => Err(StoreError::Failed { reason: reason.to_string() }),
                None => result,
            };
            // The caller may have given up waiting; the outcome stands either way.
            let _ = reply.send(result);
        }));
    }

    fn stage(&mut self, entry: Entry) {
        self.staged_bytes += format::entry_size(&entry);
        match &entry {
            Entry::Write(commit) | Entry::Revoke { commit: Some(commit), .. } => {
                self.published.push(commit.clone())
            }
            Entry::Grant { .. } | Entry::Revoke { commit: None, .. } => {}
        }
        self.staged.push(entry);
    }

    async fn handle(&mut self, command: Command) {
        if let Some(reason) = self.failed.clone() {
            let failed = || StoreError::Failed { reason: reason.clone() };
            match command {
                Command::Txn { reply, .. } => {
                    let _ = reply.send(Err(failed()));
                }
                Command::Grant { reply, .. } => {
                    let _ = reply.send(Err(failed()));
                }
                Command::KeepAlive { reply, .. } => {
                    let _ = reply.send(Err(failed()));
                }
                Command::Revoke { reply, .. } => {
                    let _ = reply.send(Err(failed()));
                }
                Command::Watch { reply, .. } => {
                    let _ = reply.send(Err(failed()));
                }
                Command::Compact { reply, .. } => {
                    let _ = reply.send(Err(failed()));
                }
                Command::Revisions { reply } => {
                    let _ = reply.send(Err(failed()));
                }
                Command::Close { .. } => {}
            }
            return;
        }
        match command {
            Command::Txn { txn, reply } => {
                let result = self.state.txn(txn).map(|(response, commit)| {
                    if let Some(commit) = commit {
                        self.stage(Entry::Write(commit));
                    }
                    response
                });
                self.defer(reply, result);
            }
            Command::Grant { ttl, reply } => {
                let result = self.grant(ttl);
                self.defer(reply, result);
            }
            Command::KeepAlive { lease, reply } => {
                let result = match self.state.leases.get_mut(&lease) {
                    Some(l) => {
                        self.state.deadlines.remove(&(l.deadline, lease));
                        l.deadline = deadline(Instant::now(), l.ttl);
                        self.state.deadlines.insert((l.deadline, lease));
                        Ok(l.ttl)
                    }
                    None => Err(StoreError::LeaseNotFound { lease }),
                };
                self.defer(reply, result);
            }
            Command::Revoke { lease, reply } => {
                let result = match self.state.end_lease(lease) {
                    Some(commit) => {
                        let revision = commit.as_ref().map(|c| c.revision);
                        self.stage(Entry::Revoke { lease, commit });
                        Ok(revision)
                    }
                    None => Err(StoreError::LeaseNotFound { lease }),
                };
                self.defer(reply, result);
            }
            Command::Watch { prefix, from, reply } => {
                let result = self.watch(prefix, from);
                self.defer(reply, result);
            }
            Command::Compact { revision, reply } => {
                let result = self.compact(revision).await;
                self.defer(reply, result);
            }
            Command::Revisions { reply } => {
                let revisions = (self.state.revision, self.state.compacted);
                self.defer(reply, Ok(revisions));
            }
            Command::Close { .. } => {}
        }
    }

    fn grant(&mut self, ttl: Duration) -> Result<LeaseId> {
        validate_ttl(ttl)?;
        let lease = LeaseId(self.state.next_lease);
        let ttl_ms = ttl_ms(ttl);
        // The logged TTL (whole milliseconds) is the one in force, before and after a restart.
        self.state.restore_lease(lease, ttl_ms, Instant::now());
        self.stage(Entry::Grant { lease, ttl_ms });
        Ok(lease)
    }

    fn expire_leases(&mut self) {
        let now = Instant::now();
        while let Some(&(deadline, lease)) = self.state.deadlines.first()
            && deadline <= now
        {
            if let Some(commit) = self.state.end_lease(lease) {
                tracing::debug!(%lease, revision = commit.as_ref().map(|c| c.revision), "lease expired");
                self.stage(Entry::Revoke { lease, commit });
            }
        }
    }

    fn watch(&mut self, prefix: String, from: Revision) -> Result<WatchStream> {
        if from < self.state.compacted {
            return Err(StoreError::Compacted { requested: from, compacted: self.state.compacted });
        }
        // Subscribing here, between two requests, makes replay and live feed meet exactly:
        // every commit after this point is either in `queue` (staged in this batch, then
        // skipped when it arrives live) or arrives live.
        let live = BroadcastStream::new(self.watch_tx.subscribe());
        let start = self.state.history.partition_point(|c| c.revision < from);
        let queue: VecDeque<Arc<Commit>> = self.state.history.range(start..).cloned().collect();
        Ok(WatchStream {
            prefix,
            queue,
            cursor: 0,
            live,
            next_revision: from.max(self.state.revision + 1),
            done: false,
        })
    }

    async fn compact(&mut self, revision: Revision) -> Result<()> {
        if revision > self.state.revision {
            return Err(StoreError::FutureRevision { requested: revision, current: self.state.revision });
        }
        if revision <= self.state.compacted {
            return Err(StoreError::Compacted { requested: revision, compacted: self.state.compacted });
        }
        // Earlier writes of this batch go to the old log first, so the new generation is
        // built from acknowledged state only.
        self.flush().await;
        if let Some(reason) = &self.failed {
            return Err(StoreError::Failed { reason: reason.clone() });
        }
        self.state.compact(revision);
        let generation = self.generation + 1;
        let mut leases: Vec<(LeaseId, u64)> =
            self.state.leases.iter().map(|(&id, lease)| (id, ttl_ms(lease.ttl))).collect();
        leases.sort();
        let header = Snapshot {
            revision: revision - 1,
            compacted: revision,
            next_lease: self.state.next_lease,
            leases,
            kvs: Vec::new(),
        };
        let snapshot = format::encode_snapshot(&header, self.state.base.values().map(|kv| &**kv));
        let retained: Vec<Entry> = self.state.history.iter().map(|c| Entry::Write(c.clone())).collect();
        let log = match format::encode_log(generation, &retained) {
            Ok(log) => log,
            Err(reason) => {
                let reason = format!("compaction to revision {revision}: {reason}");
                self.fail(reason.clone());
                return Err(StoreError::Failed { reason });
            }
        };
        // The old writer is done with: the new generation starts a new log.
        self.writer = None;
        let dir = self.dir.clone();
        let installed = tokio::task::spawn_blocking(move || {
            format::install_generation(&dir, generation, &log, &snapshot)
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Failed { reason: format!("compaction task: {e}") }));
        match installed {
            Ok(writer) => {
                self.writer = Some(writer);
                self.generation = generation;
                tracing::info!(revision, generation, retained = retained.len(), "state store compacted");
                Ok(())
            }
            Err(e) => {
                let reason = format!("compaction to revision {revision}: {e}");
                self.fail(reason.clone());
                Err(StoreError::Failed { reason })
            }
        }
    }

    /// Stops the store after an I/O failure: memory may be ahead of the disk now.
    fn fail(&mut self, reason: String) {
        tracing::error!(dir = %self.dir.display(), reason = reason.as_str(), "state store failed; reopen it to recover");
        self.failed = Some(reason);
        self.writer = None;
        // Dropping the feed ends every watch stream once it has drained what was durable.
        self.watch_tx = broadcast::channel(self.watch_buffer).0;
    }

    /// Makes the batch's entries durable, then publishes its commits and sends its replies
    /// (or fails them all if the write failed).
    async fn flush(&mut self) {
        if !self.staged.is_empty() && self.failed.is_none() {
            let mut frame = Vec::with_capacity(self.staged_bytes + 16);
            let encoded = format::encode_frame(&self.staged, &mut frame);
            self.staged.clear();
            self.staged_bytes = 0;
            let written = match (encoded, self.writer.take()) {
                (Err(reason), writer) => {
                    self.writer = writer;
                    Err(reason)
                }
                (Ok(()), Some(mut writer)) => match tokio::task::spawn_blocking(move || {
                    let result = writer.append(&frame);
                    (writer, result)
                })
                .await
                {
                    Ok((writer, result)) => {
                        self.writer = Some(writer);
                        result.map_err(|e| e.to_string())
                    }
                    Err(e) => Err(format!("log writer task: {e}")),
                },
                (Ok(()), None) => Err("no log file open".to_string()),
            };
            if let Err(reason) = written {
                self.fail(reason);
            }
        }
        self.staged.clear();
        self.staged_bytes = 0;
        let published = std::mem::take(&mut self.published);
        if self.failed.is_none() {
            for commit in published {
                // No receivers is not an error: nobody is watching.
                let _ = self.watch_tx.send(commit);
            }
        }
        let failed = self.failed.clone();
        for reply in self.replies.drain(..) {
            reply(failed.as_deref());
        }
    }
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream")
            .field("prefix", &self.prefix)
            .field("queued_commits", &self.queue.len())
            .field("next_revision", &self.next_revision)
            .field("done", &self.done)
            .finish()
    }
}
