//! Commands to the job's crew, and the wait for aborted workers to confirm that they
//! stopped.
//!
//! Invariants: command ids come from the coordinator-wide counter, so an acknowledgement of
//! another job's command never matches one of this job's; an aborted rank stays in
//! `stopping` until it acknowledges the abort, is lost, or the stop timeout declares it
//! stuck; only then may the cluster actor hand it to another job.

use std::sync::atomic::Ordering;

use flotilla_proto::v1::{Abort, CoordinatorMessage, JobState, coordinator_message, worker_message};
use tokio::time::Instant;

use super::{CommandKind, JobActor};
use crate::service::error::ServiceError;
use crate::service::messages::{ClusterMsg, JobControl};
use crate::store::StateStore;

impl<S: StateStore + Clone + 'static> JobActor<S> {
    /// Sends a command; returns its id.
    pub(super) fn command(
        &mut self,
        rank: usize,
        kind: Option<CommandKind>,
        body: coordinator_message::Body,
    ) -> u64 {
        let command_id = self.env.commands.fetch_add(1, Ordering::Relaxed);
        if let Some(kind) = kind {
            self.awaiting.insert(command_id, (rank, kind));
        }
        self.crew[rank].session.send(CoordinatorMessage { command_id, body: Some(body) });
        command_id
    }

    /// Aborts the job on every rank still alive; their acknowledgements are awaited before
    /// the job releases them.
    pub(super) fn abort_crew(&mut self, reason: &str) {
        for rank in 0..self.crew.len() {
            if !self.crew[rank].lost && !self.stopping.values().any(|&(r, _)| r == rank) {
                let abort = Abort { job_id: self.record.id.clone(), reason: reason.to_string() };
                let id = self.command(rank, None, coordinator_message::Body::Abort(abort));
                self.stopping.insert(id, (rank, Instant::now()));
            }
        }
        self.awaiting.clear();
    }

    /// Aborts the survivors and fails the job.
    pub(super) async fn fail(&mut self, reason: String) -> Result<(), ServiceError> {
        self.abort_crew(&reason);
        self.transition(JobState::Failed, reason).await
    }

    /// Waits until every aborted worker has confirmed that it stopped, or the stop timeout
    /// has passed; returns the workers that did not, with the cause. `None`: shutdown.
    pub(super) async fn await_stopped(&mut self) -> Option<Vec<(String, String)>> {
        let mut stuck = std::mem::take(&mut self.stuck);
        while let Some(sent) = self.stopping.values().map(|&(_, sent)| sent).min() {
            let deadline = sent + self.env.stop_timeout;
            tokio::select! {
                biased;
                _ = self.env.cancel.cancelled() => return None,
                _ = tokio::time::sleep_until(deadline) => {
                    let late = self.take_late_stops();
                    stuck.extend(late);
                }
                message = self.control.recv() => match message {
                    Some(JobControl::WorkerLost { worker_id, .. }) => {
                        self.stopping.retain(|_, (rank, _)| self.crew[*rank].worker_id != worker_id);
                    }
                    // The job has ended: the client reads the outcome from the store.
                    Some(JobControl::Cancel { reply, .. }) => {
                        let _ = reply.send(Err(ServiceError::JobNotFound { job_id: self.record.id.clone() }));
                    }
                    Some(JobControl::Timeline { step, reply }) => {
                        let _ = reply.send(self.timeline(step));
                    }
                    Some(JobControl::Start(_)) => {}
                    None => return None,
                },
                Some(report) = self.reports.recv() => {
                    if let worker_message::Body::Ack(ack) = report.body
                        && let Some(&(rank, _)) = self.stopping.get(&ack.command_id)
                        && self.crew[rank].worker_id == report.worker_id
                    {
                        self.stopping.remove(&ack.command_id);
                    }
                }
            }
        }
        Some(stuck)
    }

    /// Removes the aborts unconfirmed for the stop timeout; returns their workers, with the
    /// cause, to be declared lost.
    pub(super) fn take_late_stops(&mut self) -> Vec<(String, String)> {
        let timeout = self.env.stop_timeout;
        let now = Instant::now();
        let late: Vec<u64> = self
            .stopping
            .iter()
            .filter(|(_, (_, sent))| now.duration_since(*sent) >= timeout)
            .map(|(&id, _)| id)
            .collect();
        let mut stuck = Vec::new();
        for id in late {
            let Some((rank, _)) = self.stopping.remove(&id) else { continue };
            let worker = self.crew[rank].worker_id.clone();
            tracing::warn!(job = %self.record.id, %worker, "worker did not stop in time");
            let cause = format!(
                "it did not confirm stopping job {} within {} ms of its abort",
                self.record.id,
                timeout.as_millis()
            );
            stuck.push((worker, cause));
        }
        stuck
    }

    /// Tells the cluster actor the job has ended, which releases its workers (and declares
    /// the `stuck` ones lost).
    pub(super) async fn end(&mut self, stuck: Vec<(String, String)>) {
        let timelines = self.timelines.take();
        let ended = ClusterMsg::JobEnded { job_id: self.record.id.clone(), stuck, timelines };
        let _ = self.env.cluster.send(ended).await;
    }
}
