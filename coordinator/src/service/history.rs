//! The history compactor: keeps the store's watch history to the last
//! [`CoordinatorConfig::history_retention`] revisions.
//!
//! The store keeps every revision since its compaction point so that watches can resume
//! from any of them; without compaction its memory and log would grow for as long as the
//! coordinator runs. A watcher that falls further behind than the retention gets
//! `OUT_OF_RANGE` and re-reads the job. Job records and event keys are not touched: only
//! the history behind watches goes.

use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::store::{Revision, StateStore, StoreError};

/// Every `interval`, compacts the store to `retention` revisions behind its current one.
pub(crate) async fn compactor<S: StateStore>(
    store: S,
    retention: u64,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut compacted: Revision = 0;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let current = match store.current_revision().await {
            Ok(current) => current,
            Err(StoreError::Closed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "history compaction: reading the revision");
                continue;
            }
        };
        let target = current.saturating_sub(retention);
        if target <= compacted {
            continue;
        }
        match store.compact(target).await {
            Ok(()) => {
                tracing::debug!(revision = target, "history compacted");
                compacted = target;
            }
            // Someone (an operator) compacted further already.
            Err(StoreError::Compacted { compacted: at, .. }) => compacted = at,
            Err(StoreError::Closed) => return,
            Err(e) => tracing::warn!(error = %e, revision = target, "history compaction failed"),
        }
    }
}
