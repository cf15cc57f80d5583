//! The metrics feed: one task that lists the job records, then watches every key of the
//! store from the listing's revision on, and turns what it sees into [`Metrics`]: job
//! records into the per-job gauges and the jobs by state, events into step time,
//! throughput, checkpoints, recoveries and each job's crew.
//!
//! It is the only writer of those series, so a job's state and its series change in the
//! order the store wrote them. When its watch fails (it fell behind, or the store's history
//! was compacted past it), it lists again and resumes: gauges are exact again at once;
//! counters miss what happened in between (Prometheus counters count from the process's
//! start anyway).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::v1::{JobState, job_event};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Metrics;
use crate::service::error::ServiceError;
use crate::service::records::{JOBS_PREFIX, JobRecord, decode_event};
use crate::store::{EventKind, Op, OpResponse, StateStore, StoreError, Txn, WatchEvent};

/// How long the feed waits before listing again after its watch failed.
const RETRY: Duration = Duration::from_millis(500);

/// What the feed knows of each job: its state and world size (to remove its ranks' series).
#[derive(Default)]
struct Jobs {
    jobs: HashMap<String, (JobState, u32)>,
}

impl Jobs {
    fn publish_states(&self, metrics: &Metrics) {
        let mut counts = HashMap::new();
        for (state, _) in self.jobs.values() {
            *counts.entry(*state).or_insert(0) += 1;
        }
        metrics.set_job_states(&counts);
    }

    /// A record was written (or listed).
    fn record(&mut self, metrics: &Metrics, record: &JobRecord) {
        metrics.job_record(record);
        let before = self.jobs.insert(record.id.clone(), (record.state, record.workers));
        let was_terminal = before.is_some_and(|(state, _)| state.is_terminal());
        if record.state.is_terminal() && !was_terminal {
            metrics.job_ended(&record.id, record.workers);
        }
    }

    /// A record was deleted (retention).
    fn removed(&mut self, metrics: &Metrics, job_id: &str) {
        let workers = self.jobs.remove(job_id).map_or(0, |(_, workers)| workers);
        metrics.job_removed(job_id, workers);
    }
}

/// Runs the feed until `cancel`.
pub(crate) async fn feeder<S: StateStore + 'static>(
    store: S,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut jobs = Jobs::default();
    loop {
        match follow(&store, &metrics, &mut jobs, &cancel).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, "the metrics feed lost its store watch; listing again"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// One list-then-watch; `Ok` only when cancelled.
async fn follow<S: StateStore>(
    store: &S,
    metrics: &Metrics,
    jobs: &mut Jobs,
    cancel: &CancellationToken,
) -> Result<(), ServiceError> {
    let listing = store.txn(Txn::new().and_then([Op::range(JOBS_PREFIX)])).await?;
    let Some(OpResponse::Range(kvs)) = listing.responses.into_iter().next() else {
        return Err(StoreError::UnexpectedResponse { op: "range" }.into());
    };
    let mut listed = HashSet::new();
    for kv in kvs {
        match JobRecord::decode(&kv.key, &kv.value) {
            Ok(record) => {
                listed.insert(record.id.clone());
                jobs.record(metrics, &record);
            }
            Err(e) => tracing::warn!(error = %e, "metrics: skipping a job record"),
        }
    }
    // Jobs deleted while the feed was not watching.
    let gone: Vec<String> = jobs.jobs.keys().filter(|id| !listed.contains(*id)).cloned().collect();
    for id in gone {
        jobs.removed(metrics, &id);
    }
    jobs.publish_states(metrics);

    let mut watch = store.watch("", listing.revision.saturating_add(1)).await?;
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            event = watch.next() => event,
        };
        match event {
            None => return Err(StoreError::Closed.into()),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(event)) => apply(metrics, jobs, &event),
        }
    }
}

fn apply(metrics: &Metrics, jobs: &mut Jobs, event: &WatchEvent) {
    let key = event.kv.key.as_str();
    if let Some(job_id) = key.strip_prefix(JOBS_PREFIX) {
        match event.kind {
            EventKind::Put => match JobRecord::decode(key, &event.kv.value) {
                Ok(record) => jobs.record(metrics, &record),
                Err(e) => tracing::warn!(error = %e, "metrics: skipping a job record"),
            },
            EventKind::Delete => jobs.removed(metrics, job_id),
        }
        jobs.publish_states(metrics);
    } else if key.starts_with("events/") && event.kind == EventKind::Put {
        let decoded = match decode_event(event) {
            Ok(decoded) => decoded,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: skipping an event");
                return;
            }
        };
        let job = decoded.job_id.as_str();
        match &decoded.event {
            Some(job_event::Event::Step(summary)) => metrics.step(job, summary),
            Some(job_event::Event::CheckpointCommitted(committed)) => metrics.checkpoint(committed),
            Some(job_event::Event::Recovery(recovery)) => metrics.recovery(recovery),
            // A job in a terminal state has no crew; a late event cannot bring one back.
            Some(job_event::Event::WorkerJoined(joined))
                if !jobs.jobs.get(job).is_some_and(|(state, _)| state.is_terminal()) =>
            {
                metrics.worker_joined(job, joined.rank, &joined.worker_id)
            }
            _ => {}
        }
    }
}
