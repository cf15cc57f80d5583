//! The job's durable writes: every event is one transaction that appends the event and
//! rewrites the record, conditional on the record's revision being the one this actor
//! last wrote (see `service`'s module docs, "Durable job state").
//!
//! Invariants: memory follows the store — a write that fails leaves the record in memory
//! as it was (`next_event`, state and reason restored); a state changes only along
//! [`may_transition`]'s edges; an event's revision is its write's.

use flotilla_proto::v1::{JobEvent, JobState, StateChanged, job_event};

use super::{JobActor, may_transition};
use crate::service::error::ServiceError;
use crate::service::records::{encode_event, event_key, job_key, unix_ms};
use crate::store::{Compare, CompareOp, Op, Revision, StateStore, Txn};

impl<S: StateStore + Clone + 'static> JobActor<S> {
    /// Appends one event and the updated record in one transaction: the event's revision
    /// is the write's. Conditional on the record being where this actor left it.
    pub(super) async fn append(&mut self, event: job_event::Event) -> Result<Revision, ServiceError> {
        let now = unix_ms();
        let seq = self.record.next_event;
        self.record.next_event += 1;
        self.record.updated_unix_ms = now;
        let id = &self.record.id;
        let event = JobEvent { revision: 0, job_id: id.clone(), unix_ms: now, event: Some(event) };
        let key = job_key(id);
        let txn = Txn::new()
            // An absent key has mod_revision 0, so this also guards the creation.
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, self.revision)])
            .and_then([
                Op::put(event_key(id, seq), encode_event(&event), None),
                Op::put(key, self.record.encode(), None),
            ]);
        let response = match self.store.txn(txn).await {
            Ok(response) => response,
            Err(e) => {
                self.record.next_event = seq;
                return Err(e.into());
            }
        };
        if !response.succeeded {
            self.record.next_event = seq;
            return Err(ServiceError::Fenced { job_id: id.clone(), expected: self.revision });
        }
        self.revision = response.revision;
        Ok(response.revision)
    }

    pub(super) async fn transition(&mut self, to: JobState, reason: String) -> Result<(), ServiceError> {
        let from = self.record.state;
        if !may_transition(from, to) {
            return Err(ServiceError::Internal(format!(
                "job {}: no transition from {} to {}",
                self.record.id,
                from.as_str_name(),
                to.as_str_name()
            )));
        }
        tracing::info!(job = %self.record.id, from = from.as_str_name(), to = to.as_str_name(), %reason, "job state");
        let previous_reason = std::mem::replace(&mut self.record.reason, reason.clone());
        self.record.state = to;
        let event = StateChanged { from: from as i32, to: to as i32, reason };
        if let Err(e) = self.append(job_event::Event::StateChanged(event)).await {
            // Memory follows the store: the state did not change.
            self.record.state = from;
            self.record.reason = previous_reason;
            return Err(e);
        }
        Ok(())
    }
}
