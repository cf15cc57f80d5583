//! [`TimedStore`]: the state store as the service uses it, each operation timed into
//! `flotilla_store_operation_duration_seconds`. A transaction is a `read` when neither
//! branch writes, else a `write` (which returns once durable: the fsync, or etcd's quorum).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Metrics;
use crate::store::{LeaseId, Op, Result, Revision, StateStore, Txn, TxnResponse};

/// A store whose operations are timed; otherwise the store it wraps.
#[derive(Clone, Debug)]
pub(crate) struct TimedStore<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> TimedStore<S> {
    pub fn new(inner: S, metrics: Arc<Metrics>) -> Self {
        TimedStore { inner, metrics }
    }
}

fn writes(ops: &[Op]) -> bool {
    ops.iter().any(|op| !matches!(op, Op::Get { .. } | Op::Range { .. }))
}

impl<S: StateStore> TimedStore<S> {
    async fn timed<T>(&self, op: &'static str, future: impl Future<Output = T>) -> T {
        let start = Instant::now();
        let result = future.await;
        self.metrics.store_op(op, start.elapsed().as_secs_f64());
        result
    }
}

impl<S: StateStore> StateStore for TimedStore<S> {
    type Watch = S::Watch;

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        let op = if writes(&txn.success) || writes(&txn.failure) { "write" } else { "read" };
        self.timed(op, self.inner.txn(txn)).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.timed("grant_lease", self.inner.grant_lease(ttl)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        self.timed("keep_alive", self.inner.keep_alive(lease)).await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<Option<Revision>> {
        self.timed("revoke", self.inner.revoke(lease)).await
    }

    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<Self::Watch> {
        // Opening the watch (the history it replays is streamed after).
        self.timed("watch", self.inner.watch(prefix, from_revision)).await
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.timed("compact", self.inner.compact(revision)).await
    }

    async fn current_revision(&self) -> Result<Revision> {
        self.timed("current_revision", self.inner.current_revision()).await
    }
}
