//! The coordinator's durable state store: a revisioned key-value store with etcd v3's
//! semantics (revisions, compare-and-swap transactions, leases, resumable watches,
//! compaction), behind the [`StateStore`] trait, with [`FileStore`], an embedded
//! crash-safe file-backed implementation, as the default, and `EtcdStore` (cargo feature
//! `etcd`) on a real etcd cluster. [`StoreConfig`] is the one setting that picks and opens
//! one of them ([`AnyStore`]).
//!
//! # Model
//!
//! - The store maps `String` keys to byte values. Every write transaction that changes at
//!   least one key gets a new global revision, above every earlier one; all keys it changes carry
//!   that revision as their `mod_revision`, and a watcher sees all its events with that
//!   revision. A transaction that changes nothing (only reads, or deletes of absent keys)
//!   does not consume a revision, as in etcd. The file store's revisions are 1, 2, 3, …
//!   without gaps; etcd's are its cluster-wide revisions, which start above 1 and which
//!   other clients of the same etcd (another cluster under another prefix) also advance, so
//!   callers may rely on order, never on gap-freedom.
//! - A key's `create_revision` is the revision that created it (since it last did not
//!   exist), `version` counts its puts since then (1 after creation), and `lease` is the
//!   lease it is attached to. An absent key compares as version 0, create and mod revision
//!   0 and no lease; a value comparison on an absent key is false (etcd's rule).
//! - A lease has a TTL; unless kept alive, it expires and all keys attached to it are
//!   deleted in one revision. Revoking does the same at once. Granting a lease or keeping
//!   it alive consumes no revision.
//! - `watch(prefix, from)` yields every change with revision ≥ `from` to keys starting
//!   with `prefix`: first the history, then live changes, with no gap and no duplicate, in
//!   revision order. Resuming after a disconnect is `watch(prefix, last_seen + 1)`.
//! - `compact(r)` discards the history before revision `r`; afterwards a watch from a
//!   revision below `r` fails with [`StoreError::Compacted`] (like Kubernetes' 410 Gone):
//!   the caller re-reads the state and watches from there. Reads always see the latest
//!   state; the store keeps no old versions for reads.
//!
//! The list-then-watch pattern: run a [`Txn`] with an [`Op::Range`]; its
//! [`TxnResponse::revision`] is the revision the listing reflects, so watching from
//! `revision + 1` misses nothing and repeats nothing.
//!
//! # Invariants (of every implementation)
//!
//! - A write returns only after it is durable: a successful `put`, `delete`, `txn`,
//!   `grant_lease` or `revoke` survives a crash of the process (or, for etcd, is committed
//!   by a quorum).
//! - Revisions are strictly increasing across writes, and survive restarts.
//! - A watch stream never skips an event and never repeats one; when it cannot keep that
//!   promise (its watcher fell too far behind, the revision it resumes from was compacted,
//!   the store closed), it ends with an explicit error naming the revision to resume from.

mod any;
mod config;
#[cfg(feature = "etcd")]
mod etcd;
mod file;

pub use any::{AnyStore, AnyWatch};
pub use config::{DEFAULT_ETCD_PREFIX, EtcdConfig, EtcdTls, StoreConfig, StoreConfigError};
#[cfg(feature = "etcd")]
pub use etcd::{ETCD_MAX_TXN_BYTES, EtcdStore, EtcdWatch};
pub use file::{FileStore, FileStoreOptions, WatchStream};

use std::collections::BTreeSet;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use futures::Stream;
use serde::{Deserialize, Serialize};

/// A global store revision: every write transaction that changes something gets one above
/// all earlier ones. The file store's empty store is revision 0 and its writes count 1, 2,
/// 3, …; an etcd store's are etcd's cluster-wide revisions (see `EtcdStore`).
pub type Revision = u64;

/// The file store's largest total size, in bytes, of the keys and values written by one
/// transaction branch. Requests above it fail with [`StoreError::TooLarge`]. etcd's default
/// limit is 1.5 MiB per request, so the etcd store's is smaller (`ETCD_MAX_TXN_BYTES`).
pub const MAX_TXN_BYTES: usize = 32 << 20;

/// The longest lease TTL, etcd's (`MaxLeaseTTL`, 9·10⁹ s); longer grants fail with
/// [`StoreError::InvalidTtl`], as do grants under 1 ms.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(9_000_000_000);

/// The identifier of a lease. Identifiers are never reused within one store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LeaseId(pub u64);

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A key with its value and metadata, as etcd's `mvccpb.KeyValue`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision of the write that created the key (since it last did not exist).
    pub create_revision: Revision,
    /// The revision of the last write to the key.
    pub mod_revision: Revision,
    /// The number of puts since the key was created: 1 after the creating put.
    pub version: u64,
    /// The lease the key is attached to; the key is deleted when the lease ends.
    pub lease: Option<LeaseId>,
}

/// What happened to a key in a [`WatchEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watcher.
///
/// For a put, `kv` is the key as written. For a delete, `kv` is a tombstone as in etcd: the
/// key, an empty value, `mod_revision` equal to the deleting revision, and zero
/// `create_revision` and `version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    pub revision: Revision,
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// How a [`Compare`] relates a key's current state to its operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

/// What a [`Compare`] looks at, with the operand to compare against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    /// The key's `mod_revision` (0 when absent).
    ModRevision(Revision),
    /// The key's `create_revision` (0 when absent).
    CreateRevision(Revision),
    /// The key's `version` (0 when absent).
    Version(u64),
    /// The key's value, compared byte-wise; any comparison on an absent key is false.
    Value(Vec<u8>),
}

/// One condition of a [`Txn`]: `key`'s `target` field `op` the operand.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub key: String,
    pub op: CompareOp,
    pub target: CompareTarget,
}

impl Compare {
    pub fn mod_revision(key: impl Into<String>, op: CompareOp, revision: Revision) -> Self {
        Compare { key: key.into(), op, target: CompareTarget::ModRevision(revision) }
    }

    pub fn create_revision(key: impl Into<String>, op: CompareOp, revision: Revision) -> Self {
        Compare { key: key.into(), op, target: CompareTarget::CreateRevision(revision) }
    }

    pub fn version(key: impl Into<String>, op: CompareOp, version: u64) -> Self {
        Compare { key: key.into(), op, target: CompareTarget::Version(version) }
    }

    pub fn value(key: impl Into<String>, op: CompareOp, value: impl Into<Vec<u8>>) -> Self {
        Compare { key: key.into(), op, target: CompareTarget::Value(value.into()) }
    }

    /// True when the key does not exist (its version is 0): the guard of create-if-absent.
    pub fn absent(key: impl Into<String>) -> Self {
        Compare::version(key, CompareOp::Equal, 0)
    }

    /// True when the key exists.
    pub fn exists(key: impl Into<String>) -> Self {
        Compare::version(key, CompareOp::Greater, 0)
    }

    /// Evaluates the condition against the key's current state (`None` when absent).
    pub fn holds(&self, kv: Option<&KeyValue>) -> bool {
        use std::cmp::Ordering;
        let ordering: Ordering = match (&self.target, kv) {
            (CompareTarget::Value(_), None) => return false,
            (CompareTarget::Value(v), Some(kv)) => kv.value.as_slice().cmp(v.as_slice()),
            (CompareTarget::ModRevision(r), kv) => kv.map_or(0, |kv| kv.mod_revision).cmp(r),
            (CompareTarget::CreateRevision(r), kv) => kv.map_or(0, |kv| kv.create_revision).cmp(r),
            (CompareTarget::Version(v), kv) => kv.map_or(0, |kv| kv.version).cmp(v),
        };
        match self.op {
            CompareOp::Equal => ordering == Ordering::Equal,
            CompareOp::NotEqual => ordering != Ordering::Equal,
            CompareOp::Greater => ordering == Ordering::Greater,
            CompareOp::Less => ordering == Ordering::Less,
        }
    }
}

/// One operation of a [`Txn`] branch. Operations run in order and later ones see the
/// effects of earlier ones; all writes of a branch share one revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Get {
        key: String,
    },
    /// All keys starting with `prefix`, sorted by key (`""` is every key).
    Range {
        prefix: String,
    },
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
    /// Deletes all keys starting with `prefix` (`""` deletes every key).
    DeletePrefix {
        prefix: String,
    },
}

impl Op {
    pub fn get(key: impl Into<String>) -> Self {
        Op::Get { key: key.into() }
    }

    pub fn range(prefix: impl Into<String>) -> Self {
        Op::Range { prefix: prefix.into() }
    }

    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>, lease: Option<LeaseId>) -> Self {
        Op::Put { key: key.into(), value: value.into(), lease }
    }

    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }

    pub fn delete_prefix(prefix: impl Into<String>) -> Self {
        Op::DeletePrefix { prefix: prefix.into() }
    }
}

/// A transaction: if every compare holds, run `success`, else run `failure`, atomically.
///
/// A branch may not write the same key twice (two puts, or a put and a delete covering it):
/// such a transaction is refused with [`StoreError::DuplicateKey`], as etcd refuses it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Txn::default()
    }

    /// Adds conditions (all must hold).
    pub fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Self {
        self.compares.extend(compares);
        self
    }

    /// Adds operations to run when all conditions hold.
    pub fn and_then(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.success.extend(ops);
        self
    }

    /// Adds operations to run when some condition fails.
    pub fn or_else(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.failure.extend(ops);
        self
    }
}

/// The result of one [`Op`], in the order of the branch that ran.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResponse {
    Get(Option<KeyValue>),
    Range(Vec<KeyValue>),
    /// The key as it was before the put, if it existed.
    Put {
        prev: Option<KeyValue>,
    },
    /// How many keys the delete removed.
    Delete {
        deleted: u64,
    },
}

/// The outcome of a [`Txn`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    /// Whether all compares held (and so `success` ran).
    pub succeeded: bool,
    /// The store's revision after the transaction: the transaction's own revision if it
    /// wrote, else the revision its reads reflect.
    pub revision: Revision,
    /// One response per operation of the branch that ran.
    pub responses: Vec<OpResponse>,
}

/// Errors of a [`StateStore`]. Each names the key, lease, revision, file or endpoint at fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: corrupt at byte offset {offset}: {reason}", path.display())]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    #[error("{}: {reason}", path.display())]
    BadLayout { path: PathBuf, reason: String },
    #[error("revision {requested} has been compacted; the earliest revision available is {compacted}")]
    Compacted { requested: Revision, compacted: Revision },
    #[error("revision {requested} is in the future; the current revision is {current}")]
    FutureRevision { requested: Revision, current: Revision },
    #[error("lease {lease} not found (never granted, expired or revoked)")]
    LeaseNotFound { lease: LeaseId },
    #[error("invalid lease TTL {ttl:?}: {reason}")]
    InvalidTtl { ttl: Duration, reason: &'static str },
    #[error("empty key in {context}")]
    EmptyKey { context: &'static str },
    #[error("key {key:?} is written more than once in one transaction branch")]
    DuplicateKey { key: String },
    #[error("transaction writing {key:?} writes {bytes} bytes, above the limit of {limit}")]
    TooLarge { key: String, bytes: usize, limit: usize },
    #[error(
        "watch on prefix {prefix:?} fell too far behind the store and was ended; \
         resume with a watch from revision {resume_from}"
    )]
    WatchLagged { prefix: String, resume_from: Revision },
    #[error("the store failed after an I/O error and accepts no more requests: {reason}")]
    Failed { reason: String },
    /// The store could not be reached (no etcd member answered in time, the connection
    /// broke): retryable. A write that fails this way may or may not have happened.
    #[error("the state store at {endpoint} is unavailable (retryable): {reason}")]
    Unavailable { endpoint: String, reason: String },
    /// The store was reached and refused or failed the request for a reason of its own
    /// (authentication, permissions, a server-side error): not retryable as is.
    #[error("the state store at {endpoint} failed the request: {reason}")]
    Remote { endpoint: String, reason: String },
    /// The store setting cannot be used (a TLS file unreadable, a bad endpoint).
    #[error("store setting {field}: {reason}")]
    Config { field: String, reason: String },
    #[error("the store is closed")]
    Closed,
    #[error("the store answered {op} with a response of another kind (a bug in the store)")]
    UnexpectedResponse { op: &'static str },
}

impl StoreError {
    /// Whether retrying the same request later may succeed (the store was unreachable).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Refuses lease TTLs under 1 ms or above [`MAX_LEASE_TTL`], for every implementation.
pub(crate) fn validate_ttl(ttl: Duration) -> Result<()> {
    if ttl < Duration::from_millis(1) {
        return Err(StoreError::InvalidTtl { ttl, reason: "must be at least 1 ms" });
    }
    if ttl > MAX_LEASE_TTL {
        return Err(StoreError::InvalidTtl { ttl, reason: "longer than the maximum of 9e9 s" });
    }
    Ok(())
}

/// The bytes (keys and values) a branch's puts write.
pub(crate) fn branch_bytes(ops: &[Op]) -> usize {
    ops.iter()
        .map(|op| match op {
            Op::Put { key, value, .. } => key.len().saturating_add(value.len()),
            _ => 0,
        })
        .fold(0, usize::saturating_add)
}

/// The key of the largest put among `ops`: the one a size error names.
pub(crate) fn largest_put<'a>(ops: impl IntoIterator<Item = &'a Op>) -> String {
    ops.into_iter()
        .filter_map(|op| match op {
            Op::Put { key, value, .. } => Some((key.len() + value.len(), key)),
            _ => None,
        })
        .max_by_key(|(bytes, _)| *bytes)
        .map_or_else(String::new, |(_, key)| key.clone())
}

/// Refuses what etcd refuses before running anything, for every implementation: empty
/// keys (in operations and compares), a key written twice in a branch (two puts, or a put
/// under a delete), and a branch whose puts write more than `limit` bytes (the error names
/// the largest put's key).
pub(crate) fn validate_txn(txn: &Txn, limit: usize) -> Result<()> {
    validate_branch(&txn.success, limit)?;
    validate_branch(&txn.failure, limit)?;
    if txn.compares.iter().any(|c| c.key.is_empty()) {
        return Err(StoreError::EmptyKey { context: "compare" });
    }
    Ok(())
}

fn validate_branch(ops: &[Op], limit: usize) -> Result<()> {
    let mut puts = BTreeSet::new();
    let mut deleted_keys = BTreeSet::new();
    let mut deleted_prefixes = Vec::new();
    for op in ops {
        match op {
            Op::Get { key } if key.is_empty() => return Err(StoreError::EmptyKey { context: "get" }),
            Op::Delete { key } if key.is_empty() => return Err(StoreError::EmptyKey { context: "delete" }),
            Op::Put { key, .. } if key.is_empty() => return Err(StoreError::EmptyKey { context: "put" }),
            Op::Put { key, .. } => {
                if !puts.insert(key.as_str()) {
                    return Err(StoreError::DuplicateKey { key: key.clone() });
                }
            }
            Op::Delete { key } => {
                deleted_keys.insert(key.as_str());
            }
            Op::DeletePrefix { prefix } => deleted_prefixes.push(prefix.as_str()),
            Op::Get { .. } | Op::Range { .. } => {}
        }
    }
    if let Some(key) =
        puts.iter().find(|k| deleted_keys.contains(*k) || deleted_prefixes.iter().any(|p| k.starts_with(p)))
    {
        return Err(StoreError::DuplicateKey { key: key.to_string() });
    }
    let bytes = branch_bytes(ops);
    if bytes > limit {
        return Err(StoreError::TooLarge { key: largest_put(ops), bytes, limit });
    }
    Ok(())
}

/// A revisioned key-value store with etcd v3's semantics; see the module docs.
///
/// Every method returns a `Send` future, so a store can be used from any tokio task. The
/// trait is not object-safe (its methods return `impl Future`); callers are generic over
/// it. The single-key methods have default implementations in terms of [`StateStore::txn`].
///
/// Cancellation: dropping a write's future after it was issued does not undo the write; it
/// may or may not have happened, as with a lost reply from etcd.
pub trait StateStore: Send + Sync {
    /// The stream a watch returns.
    type Watch: Stream<Item = Result<WatchEvent>> + Send + Unpin + 'static;

    /// Runs a transaction atomically; returns after its writes are durable.
    fn txn(&self, txn: Txn) -> impl Future<Output = Result<TxnResponse>> + Send;

    /// Grants a lease that expires `ttl` after its grant or last keep-alive.
    fn grant_lease(&self, ttl: Duration) -> impl Future<Output = Result<LeaseId>> + Send;

    /// Restarts the lease's TTL; returns the TTL. An expired, revoked or unknown lease is
    /// [`StoreError::LeaseNotFound`].
    fn keep_alive(&self, lease: LeaseId) -> impl Future<Output = Result<Duration>> + Send;

    /// Ends a lease now, deleting its keys in one revision; returns that revision, or `None`
    /// when no key was attached. An unknown lease is [`StoreError::LeaseNotFound`].
    fn revoke(&self, lease: LeaseId) -> impl Future<Output = Result<Option<Revision>>> + Send;

    /// Streams the changes under `prefix` with revision ≥ `from_revision`: history first,
    /// then live changes. Fails with [`StoreError::Compacted`] when `from_revision` is below
    /// the compaction point. A revision above the current one waits for it.
    fn watch(
        &self,
        prefix: &str,
        from_revision: Revision,
    ) -> impl Future<Output = Result<Self::Watch>> + Send;

    /// Discards history before `revision` (`revision` ≤ the current revision); watches from
    /// below it fail afterwards. Compacting to or below the current compaction point is
    /// [`StoreError::Compacted`].
    fn compact(&self, revision: Revision) -> impl Future<Output = Result<()>> + Send;

    /// The revision of the last write.
    fn current_revision(&self) -> impl Future<Output = Result<Revision>> + Send;

    /// The key, if it exists.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>>> + Send {
        let txn = Txn::new().and_then([Op::get(key)]);
        async move {
            match self.txn(txn).await?.responses.pop() {
                Some(OpResponse::Get(kv)) => Ok(kv),
                _ => Err(StoreError::UnexpectedResponse { op: "get" }),
            }
        }
    }

    /// All keys starting with `prefix`, sorted by key.
    fn range(&self, prefix: &str) -> impl Future<Output = Result<Vec<KeyValue>>> + Send {
        let txn = Txn::new().and_then([Op::range(prefix)]);
        async move {
            match self.txn(txn).await?.responses.pop() {
                Some(OpResponse::Range(kvs)) => Ok(kvs),
                _ => Err(StoreError::UnexpectedResponse { op: "range" }),
            }
        }
    }

    /// Writes the key (attached to `lease`, or to none); returns the write's revision.
    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<Revision>> + Send {
        let txn = Txn::new().and_then([Op::put(key, value, lease)]);
        async move { Ok(self.txn(txn).await?.revision) }
    }

    /// Deletes the key; returns the deletion's revision, or `None` when it did not exist.
    fn delete(&self, key: &str) -> impl Future<Output = Result<Option<Revision>>> + Send {
        let txn = Txn::new().and_then([Op::delete(key)]);
        async move {
            let response = self.txn(txn).await?;
            match response.responses.last() {
                Some(OpResponse::Delete { deleted: 0 }) => Ok(None),
                Some(OpResponse::Delete { .. }) => Ok(Some(response.revision)),
                _ => Err(StoreError::UnexpectedResponse { op: "delete" }),
            }
        }
    }
}
