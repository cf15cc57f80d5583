//! Recovery: what a failure does to a job, until it runs past the point it had reached.
//!
//! A lost worker (broken stream, missed heartbeats), a worker's error, or a step not
//! completed within `recovery.step_timeout_s` (a hang, heartbeats flowing) starts a
//! recovery, if `recovery.max_restarts` allows one more: the step is aborted on every
//! survivor (their communicators fail every collective, so none stays blocked), and once
//! each has confirmed (or is declared stuck and lost after the stop timeout) and the
//! backoff (`recovery.backoff_ms`, doubling per restart) has passed, the crew goes back to
//! the cluster actor and the job asks for workers again ahead of every queued job. The
//! failed worker's replacement (the launcher restarts its process, or a cluster manager
//! starts another, which registers) joins the survivors; the job rendezvouses anew with
//! every assignment carrying the newest committed checkpoint (`ResumeFrom`), and
//! `RunSteps` starts right after it. Without one it restarts from the seeded
//! initialization, which is a checkpoint too: training is deterministic.
//!
//! Steps up to the point the job had reached are redone; their summaries are not published
//! again (every step appears once on `WatchJob`) but their losses are compared with the
//! first run's. When the first step past that point completes, a `Recovery` event gives the
//! cause, when it was detected, the restart and recompute times, the checkpoint resumed
//! from, the steps redone, the checkpoints skipped and the replay mismatches (0: the
//! trajectory replayed exactly).
//!
//! A data-parallel job with `recovery.min_workers` below its size does not wait forever
//! for a replacement: `recovery.replace_timeout_s` after asking for a crew it offers the
//! cluster actor every smaller world size down to `min_workers` that divides `batch_size`,
//! and goes on from the same checkpoint on the largest one the idle workers fill (the
//! checkpoint loads under any world size; the losses then equal the full world's to
//! rounding). Its record's `workers` follows.
//!
//! A worker that cannot load the checkpoint (a shard missing or failing its checksum, a
//! different model) refuses its assignment naming it: that checkpoint is never tried again
//! and the job rendezvouses from the one before (not counted as a restart). A job submitted
//! with `resume_from` fails instead if that checkpoint cannot be loaded: starting over
//! would silently discard it.
//!
//! A coordinator restarted on the same state settles a job it finds past Pending the same
//! way (`settle_after_restart`): Recovering, then a crew from the workers that register
//!
//! Invariants: the crew goes back to the cluster actor only once every abort is confirmed
//! (or declared stuck) and the backoff has passed; a recovery uses one of
//! `recovery.max_restarts` unless it falls back from a checkpoint that cannot be loaded,
//! which cannot loop since each checkpoint is tried once.

use std::time::Duration;

use flotilla_proto::v1::{JobState, Recovery, RecoveryCause, WorkerError, WorkerLost, job_event};
use tokio::time::Instant;

use super::JobActor;
use crate::service::error::ServiceError;
use crate::service::messages::ClusterMsg;
use crate::service::records::unix_ms;
use crate::store::StateStore;

/// A recovery from its detection to the first step past the failure.
pub(super) struct RecoveryProgress {
    pub(super) cause: String,
    /// `cause` as a closed set, for `Recovery.cause_kind`.
    pub(super) kind: RecoveryCause,
    pub(super) restart: u32,
    pub(super) detected: Instant,
    pub(super) detected_unix_ms: u64,
    /// `steps_done` when the failure struck: the recovery ends when a step past it (or the
    /// job's last step) completes.
    pub(super) reached: u64,
    /// The restart backoff: workers are not asked for before this.
    pub(super) not_before: Instant,
    /// Whether the job has given its workers back and asked the cluster for a crew, and
    /// when; when the cluster gave it one.
    pub(super) requeued: bool,
    pub(super) requeued_at: Option<Instant>,
    pub(super) crew_at: Option<Instant>,
    /// Whether the job has offered the cluster smaller world sizes (elastic DP).
    pub(super) shrink_offered: bool,
    /// When every rank of the new crew had loaded the checkpoint.
    pub(super) rendezvous_done: Option<Instant>,
    pub(super) skipped: Vec<String>,
    pub(super) mismatches: u32,
}

impl<S: StateStore + Clone + 'static> JobActor<S> {
    pub(super) async fn on_worker_lost(
        &mut self,
        worker_id: String,
        cause: String,
    ) -> Result<(), ServiceError> {
        let Some(rank) = self.crew.iter().position(|r| r.worker_id == worker_id && !r.lost) else {
            return Ok(());
        };
        self.crew[rank].lost = true;
        self.stopping.retain(|_, (r, _)| *r != rank);
        let lost = WorkerLost { worker_id: worker_id.clone(), reason: cause.clone() };
        self.append(job_event::Event::WorkerLost(lost)).await?;
        match self.record.state {
            // The step in flight (or the rendezvous) cannot complete without the lost rank.
            JobState::Running | JobState::Rendezvous => {
                self.begin_recovery(
                    format!("worker {worker_id} lost: {cause}"),
                    RecoveryCause::WorkerLost,
                    true,
                )
                .await
            }
            _ => Ok(()),
        }
    }

    pub(super) async fn on_worker_error(
        &mut self,
        rank: usize,
        error: WorkerError,
    ) -> Result<(), ServiceError> {
        if !self.is_ours(&error.job_id, true) {
            return Ok(());
        }
        let worker = &self.crew[rank].worker_id;
        let reason = format!("worker {worker} failed at step {}: {}", error.step, error.message);
        match self.record.state {
            // Its peers' errors (their collectives failing) follow; the recovery ignores them.
            JobState::Running => self.begin_recovery(reason, RecoveryCause::WorkerError, true).await,
            JobState::Rendezvous => self.fail(reason).await,
            _ => Ok(()),
        }
    }

    /// Starts a recovery (or restarts one under way) from `cause`: aborts the step on every
    /// survivor and goes to Recovering. Once every survivor has confirmed its abort (or the
    /// stop timeout declared it stuck) and the backoff has passed, [`Self::requeue`] gives
    /// the workers back and asks the cluster for a crew; [`Self::start`] then resumes from
    /// the newest loadable committed checkpoint. `counts`: whether this uses one of
    /// `recovery.max_restarts` (a failure does; falling back from a checkpoint that cannot
    /// be loaded does not, and cannot loop: each is tried once). With none left the job
    /// fails, naming the cause.
    pub(super) async fn begin_recovery(
        &mut self,
        cause: String,
        kind: RecoveryCause,
        counts: bool,
    ) -> Result<(), ServiceError> {
        let max = self.policy.recovery.max_restarts;
        if counts && self.record.restarts >= max {
            // The history still shows the failure detected (Recovering), then the decision.
            if matches!(self.record.state, JobState::Running | JobState::Rendezvous) {
                self.transition(JobState::Recovering, cause.clone()).await?;
            }
            let reason = if max == 0 {
                cause
            } else {
                format!("{cause}; giving up after {max} restarts (recovery.max_restarts)")
            };
            return self.fail(reason).await;
        }
        tracing::warn!(job = %self.record.id, %cause, restarts = self.record.restarts, "recovering");
        self.abort_crew(&cause);
        // Shards reported so far belong to an attempt that is over; its workers' reports
        // after the abort are dropped, so such a checkpoint could never complete.
        self.shards.clear();
        let now = Instant::now();
        let mut backoff = Duration::ZERO;
        if counts {
            let doublings = self.record.restarts.min(20);
            backoff = Duration::from_millis(self.policy.recovery.backoff_ms).saturating_mul(1 << doublings);
            self.record.restarts += 1;
        }
        let previous = self.recovery.take();
        let reached = self.record.steps_done.max(previous.as_ref().map_or(0, |p| p.reached));
        let mut recovery = RecoveryProgress {
            cause: cause.clone(),
            kind,
            restart: self.record.restarts,
            detected: now,
            detected_unix_ms: unix_ms(),
            reached,
            not_before: now + backoff,
            requeued: false,
            requeued_at: None,
            crew_at: None,
            shrink_offered: false,
            rendezvous_done: None,
            skipped: Vec::new(),
            mismatches: 0,
        };
        if let Some(previous) = previous {
            recovery.skipped = previous.skipped;
            if !counts {
                // Falling back to an older checkpoint is part of the recovery under way: it
                // keeps that failure's cause and detection time.
                recovery.cause = previous.cause;
                recovery.kind = previous.kind;
                recovery.detected = previous.detected;
                recovery.detected_unix_ms = previous.detected_unix_ms;
            }
        }
        self.recovery = Some(recovery);
        if self.record.state != JobState::Recovering {
            self.transition(JobState::Recovering, cause).await?;
        }
        Ok(())
    }

    /// When a recovering job asks for workers again: once its aborts are settled and its
    /// backoff has passed, if it has not asked yet.
    pub(super) fn requeue_at(&self) -> Option<Instant> {
        let recovery = self.recovery.as_ref()?;
        let ready =
            self.record.state == JobState::Recovering && !recovery.requeued && self.stopping.is_empty();
        ready.then_some(recovery.not_before)
    }

    /// Gives the crew back to the cluster actor (the stuck ones to be declared lost) and
    /// asks for a crew again, ahead of queued jobs.
    pub(super) async fn requeue(&mut self) -> Result<(), ServiceError> {
        let stuck = std::mem::take(&mut self.stuck);
        self.crew.clear();
        self.awaiting.clear();
        if let Some(recovery) = &mut self.recovery {
            recovery.requeued = true;
            recovery.requeued_at = Some(Instant::now());
        }
        let message = ClusterMsg::JobRecovering { job_id: self.record.id.clone(), stuck };
        self.env.cluster.send(message).await.map_err(|_| ServiceError::ShuttingDown)
    }

    /// A recovering data-parallel job allowed to shrink (`recovery.min_workers`): when it
    /// stops waiting for a replacement (`recovery.replace_timeout_s` after asking for a
    /// crew).
    pub(super) fn shrink_at(&self) -> Option<Instant> {
        let recovery = self.recovery.as_ref()?;
        let min = self.policy.recovery.min_workers;
        let elastic = matches!(self.placement, Ok(None)) && min > 0 && min < self.record.workers;
        let waiting =
            self.record.state == JobState::Recovering && recovery.requeued && !recovery.shrink_offered;
        let asked = recovery.requeued_at?;
        (elastic && waiting).then(|| asked + Duration::from_secs_f64(self.policy.recovery.replace_timeout_s))
    }

    /// The replacement did not come: offers the cluster every smaller world size from
    /// `recovery.min_workers` up that divides `batch_size`, largest first. The checkpoint
    /// loads under any world size; the losses then equal the full world's to rounding.
    pub(super) async fn offer_shrink(&mut self) -> Result<(), ServiceError> {
        if let Some(recovery) = &mut self.recovery {
            recovery.shrink_offered = true;
        }
        let batch_size = self
            .record
            .config_toml
            .parse::<toml::Table>()
            .ok()
            .and_then(|t| t.get("batch_size").and_then(toml::Value::as_integer))
            .and_then(|b| u64::try_from(b).ok())
            .unwrap_or(0);
        let sizes: Vec<u32> = (self.policy.recovery.min_workers..self.record.workers)
            .rev()
            .filter(|&w| w > 0 && batch_size.is_multiple_of(u64::from(w)))
            .collect();
        tracing::warn!(job = %self.record.id, ?sizes, "no replacement in time; the job may continue on fewer workers");
        if sizes.is_empty() {
            return Ok(());
        }
        let message = ClusterMsg::JobShrink { job_id: self.record.id.clone(), sizes };
        self.env.cluster.send(message).await.map_err(|_| ServiceError::ShuttingDown)
    }

    /// While running, with a step timeout: when the next step is overdue.
    pub(super) fn step_deadline(&self) -> Option<Instant> {
        let timeout = self.policy.recovery.step_timeout_s;
        (self.record.state == JobState::Running && timeout > 0.0)
            .then(|| self.steps.last + Duration::from_secs_f64(timeout))
    }

    /// The next step did not complete in time: a rank is hung (in compute, or in a
    /// collective whose peer is) though its heartbeats flow. Recovers, naming the ranks
    /// that had not reported the step.
    pub(super) async fn on_step_timeout(&mut self) -> Result<(), ServiceError> {
        let step = self.steps.next;
        let missing: Vec<String> = self
            .steps
            .missing(step)
            .into_iter()
            .filter_map(|rank| self.crew.get(rank).map(|r| format!("rank {rank} ({})", r.worker_id)))
            .collect();
        let timeout = self.policy.recovery.step_timeout_s;
        let cause = format!(
            "step {step} did not complete within {timeout} s (recovery.step_timeout_s); not reported by {}",
            missing.join(", ")
        );
        self.begin_recovery(cause, RecoveryCause::StepTimeout, true).await
    }

    /// Ends the recovery under way once `step` is past the point the job had reached (or is
    /// its last step): publishes it with its figures.
    pub(super) async fn finish_recovery(&mut self, step: u64) -> Result<(), ServiceError> {
        let Some(recovery) = &self.recovery else { return Ok(()) };
        let Some(resumed) = recovery.rendezvous_done else { return Ok(()) };
        if step < (recovery.reached + 1).min(self.record.total_steps) {
            return Ok(());
        }
        let Some(recovery) = self.recovery.take() else { return Ok(()) };
        let now = Instant::now();
        let requeued = recovery.requeued_at.unwrap_or(resumed);
        let crew = recovery.crew_at.unwrap_or(resumed);
        let event = Recovery {
            abort_seconds: requeued.duration_since(recovery.detected).as_secs_f64(),
            replace_seconds: crew.duration_since(requeued).as_secs_f64(),
            reload_seconds: resumed.duration_since(crew).as_secs_f64(),
            cause: recovery.cause,
            cause_kind: recovery.kind.into(),
            restart: recovery.restart,
            from_step: self.resumed_from,
            steps_redone: recovery.reached.saturating_sub(self.resumed_from),
            detected_unix_ms: recovery.detected_unix_ms,
            restart_seconds: resumed.duration_since(recovery.detected).as_secs_f64(),
            recompute_seconds: now.duration_since(resumed).as_secs_f64(),
            skipped_checkpoints: recovery.skipped,
            replay_mismatches: recovery.mismatches,
        };
        tracing::info!(job = %self.record.id, ?event, "recovered");
        self.append(job_event::Event::Recovery(event)).await.map(|_| ())
    }
}
