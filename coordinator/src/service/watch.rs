//! `WatchJob`: a job's events after a revision, then live ones until the job ends, served
//! straight from a store watch on the job's event keys.
//!
//! The store's watch never skips or repeats a revision, and each event is its own
//! revision, so a client that resumes with the revision of the last event it received
//! gets every later event exactly once. The stream ends after the event that moves the job
//! to a terminal state; it ends with an error status when it cannot keep that promise (the
//! watch fell behind, the coordinator shuts down), and the message says where to resume.

use std::pin::Pin;

use flotilla_proto::v1::{JobEvent, JobState, job_event};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::error::ServiceError;
use super::records::{JobRecord, decode_event, events_prefix, job_key};
use crate::store::{EventKind, Op, OpResponse, Revision, StateStore, StoreError, Txn};

/// The response stream of `WatchJob`.
pub(crate) type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

/// Opens the watch; fails before the stream starts for an unknown job, a compacted or
/// future revision.
pub(crate) async fn watch_job<S: StateStore>(
    store: &S,
    job_id: &str,
    from_revision: Revision,
    cancel: CancellationToken,
) -> Result<EventStream, ServiceError> {
    // One read gives the job and the store revision it reflects, so that both describe
    // the same moment.
    let key = job_key(job_id);
    let response = store.txn(Txn::new().and_then([Op::get(key.clone())])).await?;
    let current = response.revision;
    let (record, revision) = match response.responses.into_iter().next() {
        Some(OpResponse::Get(Some(kv))) => (JobRecord::decode(&key, &kv.value)?, kv.mod_revision),
        Some(OpResponse::Get(None)) => return Err(ServiceError::JobNotFound { job_id: job_id.to_string() }),
        _ => return Err(StoreError::UnexpectedResponse { op: "get" }.into()),
    };
    if from_revision > current {
        return Err(ServiceError::FutureRevision { from_revision, current });
    }
    if record.state.is_terminal() && from_revision >= revision {
        // Nothing after this revision will ever come.
        return Ok(Box::pin(futures::stream::empty()));
    }
    // The API's revision is the last one the client has; the store's is the first one it
    // wants. A client that has the job's latest event (`from_revision ≥ revision`) has
    // every event up to `current`, so its watch starts after `current`: the recipe "re-read
    // the job, watch from its revision" then works however old the job's last event is
    // and wherever the store was compacted. `from_revision ≤ current` keeps the increment
    // from overflowing.
    let start = if from_revision >= revision { current.saturating_add(1) } else { from_revision + 1 };
    let watch = match store.watch(&events_prefix(job_id), start).await {
        Ok(watch) => watch,
        Err(StoreError::Compacted { compacted, .. }) => {
            return Err(ServiceError::Compacted {
                job_id: job_id.to_string(),
                from_revision,
                earliest: compacted.saturating_sub(1),
            });
        }
        Err(e) => return Err(e.into()),
    };
    let state = Watching { watch, job_id: job_id.to_string(), last: from_revision, done: false, cancel };
    Ok(Box::pin(futures::stream::unfold(state, next)))
}

struct Watching<W> {
    watch: W,
    job_id: String,
    /// The revision of the last event delivered (where a client resumes).
    last: Revision,
    done: bool,
    cancel: CancellationToken,
}

async fn next<W>(mut state: Watching<W>) -> Option<(Result<JobEvent, Status>, Watching<W>)>
where
    W: Stream<Item = Result<crate::store::WatchEvent, StoreError>> + Unpin,
{
    if state.done {
        return None;
    }
    loop {
        let item = tokio::select! {
            biased;
            _ = state.cancel.cancelled() => None,
            item = state.watch.next() => Some(item),
        };
        let Some(item) = item else {
            state.done = true;
            let message =
                format!("the coordinator is shutting down; resume with from_revision {}", state.last);
            return Some((Err(Status::unavailable(message)), state));
        };
        let error = match item {
            // Event keys are never deleted by the coordinator; an operator's cleanup is
            // not an event of the job.
            Some(Ok(event)) if event.kind == EventKind::Delete => continue,
            Some(Ok(event)) => match decode_event(&event) {
                Ok(event) => {
                    state.last = event.revision;
                    state.done = ends_job(&event);
                    return Some((Ok(event), state));
                }
                Err(e) => e,
            },
            Some(Err(StoreError::WatchLagged { .. })) => {
                ServiceError::WatchLagged { job_id: state.job_id.clone(), resume_after: state.last }
            }
            Some(Err(StoreError::Closed)) | None => ServiceError::ShuttingDown,
            Some(Err(e)) => ServiceError::Store(e),
        };
        state.done = true;
        return Some((Err(error.into()), state));
    }
}

/// Whether the event moves the job to a state it never leaves.
fn ends_job(event: &JobEvent) -> bool {
    matches!(
        &event.event,
        Some(job_event::Event::StateChanged(change))
            if JobState::try_from(change.to).is_ok_and(JobState::is_terminal)
    )
}
