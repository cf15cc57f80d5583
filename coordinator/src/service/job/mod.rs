//! The job actor: one per active job, owning the job's state machine, its workers (the
//! "crew", by DP rank) while it runs, its checkpoints' commits, its recoveries, and the
//! only writer of its record and events.
//!
//! ```text
//!            start           all assignments acked         every rank finished
//!  Pending ────────▶ Rendezvous ──────────────────▶ Running ───────────────────▶ Succeeded
//!                     ▲   │                          │  ▲
//!    a crew again,    │   │ worker lost, bad         │  │ all acked (state restored)
//!    resuming from    │   │ checkpoint               │  │
//!    a checkpoint     │   ▼                          ▼  │
//!                    Recovering ◀──── worker lost, worker error, step timeout
//!                         │
//!                         └──▶ Failed (no restarts left; also: refusals, invalid reports,
//!                              stream deviations, from Rendezvous / Running)
//!
//!  any non-terminal state ── cancel ──▶ Cancelled
//! ```
//!
//! # Where things are
//!
//! - here: the actor, its event loop (`run`), the control and report dispatch, and the
//!   state machine's edges ([`may_transition`]);
//! - `journal`: the only writes of the job's record and events (one transaction each,
//!   fenced on the record's revision);
//! - `crew`: commands to the job's workers, aborts and the wait for their confirmation;
//! - `rendezvous`: starting an attempt on a crew (world order, assignments), and the
//!   acknowledgements that make it run;
//! - `checkpoints`: the shards the ranks report, committing checkpoints, choosing the one
//!   to resume from, and refusing one that cannot be loaded;
//! - `recovery`: what a lost worker, a worker's error or a step timeout does, the requeue
//!   and the elastic shrink, and the `Recovery` event;
//! - `steps`: step reports, their accounting into one summary per step
//!   ([`StepTracker`](steps::StepTracker), a pure helper the actor owns), and the job's end.
//!
//! Module graph: `job` uses `messages`, `records`, `timeline`, `config`, `error`, `ids`
//! and the crate's `checkpoint`, `placement`, `schedule` and `store`; never `cluster` or
//! `session`, which it reaches only through the mailboxes in `messages`.
//!
//! # Invariants
//!
//! A worker's message changes the job only if `reporter` accepts it: it comes
//! from the session that holds the worker's rank in the crew and, where it names one, the
//! current assignment epoch (one per attempt, sent in every `Assignment`). Anything else
//! is refused and logged, in that one place.
//!
//! Assignments and `RunSteps` go out only after the state they belong to is written, so a
//! worker never runs steps of a job that the store does not show running. Aborts go out as
//! soon as the job decides to stop, before the write: stopping the survivors matters more,
//! and a crash in between leaves a state that the restart recovery settles anyway.
//!
//! A job that aborted its workers keeps them until each acknowledges the abort, which a
//! worker does once its job has stopped: only then does the cluster actor give them to
//! another job (or back to this one, recovering), so a worker is never assigned work while
//! it is still winding down the last one. A worker that does not confirm within the
//! heartbeat timeout (stuck in compute, or in a collective that the abort failed to break)
//! is reported stuck and declared lost.

mod checkpoints;
mod crew;
mod journal;
mod recovery;
mod rendezvous;
mod steps;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use flotilla_proto::v1::{Job, JobState, RecoveryCause, worker_message};
use tokio::sync::{mpsc, oneshot};
// Tokio's clock, so that paused-time tests and simulations see the timeouts they set.
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::checkpoints::PendingCheckpoints;
use self::recovery::RecoveryProgress;
use self::steps::StepTracker;
use super::config::{JobPolicy, JobSpec, job_policy};
use super::error::ServiceError;
use super::messages::{ClusterMsg, JobControl, JobHandle, SessionHandle, TimelineAnswer, WorkerReport};
use super::metrics::Metrics;
use super::records::{JobRecord, unix_ms};
use super::timeline::JobTimelines;
use crate::placement::Placement;
use crate::store::{Revision, StateStore, StoreError};

/// Reports buffered per job before the sessions forwarding them wait.
const REPORT_MAILBOX: usize = 1024;

/// The reason recorded for jobs interrupted by a coordinator restart.
pub(crate) const RESTART_REASON: &str = "coordinator restarted";

/// Whether the job state machine has the edge `from → to` (see the module docs).
/// `Unspecified → Pending` is a job's creation.
pub fn may_transition(from: JobState, to: JobState) -> bool {
    use JobState::*;
    match (from, to) {
        (Unspecified, Pending) => true,
        (Pending, Rendezvous | Failed | Cancelled) => true,
        // Recovering from a rendezvous: a worker lost, or a checkpoint that cannot be loaded.
        (Rendezvous, Running | Recovering | Failed | Cancelled) => true,
        (Running, Recovering | Succeeded | Failed | Cancelled) => true,
        // Resuming from a checkpoint (re-rendezvous, or on the survivors), or giving up.
        (Recovering, Rendezvous | Running | Failed | Cancelled) => true,
        _ => false,
    }
}

/// A job's placement as its actor gets it: `None` for a data-parallel job, or why the
/// config cannot be placed (a job read at startup under other rules than it was submitted
/// under).
pub(crate) type JobPlacement = Result<Option<Arc<Placement>>, String>;

/// What every job actor gets from the cluster actor that spawns it.
#[derive(Clone, Debug)]
pub(crate) struct JobEnv {
    pub cluster: mpsc::Sender<ClusterMsg>,
    pub cancel: CancellationToken,
    /// Command ids, unique across the coordinator, so an acknowledgement of another job's
    /// command never matches one of this job's.
    pub commands: Arc<AtomicU64>,
    /// How long an aborted worker has to confirm that it stopped.
    pub stop_timeout: Duration,
    /// Where accepted step reports set their rank's last step.
    pub metrics: Arc<Metrics>,
}

/// How a job actor begins.
pub(crate) enum Launch {
    /// A new job: write it, then answer the submitter.
    Create { reply: oneshot::Sender<Result<Job, ServiceError>> },
    /// A job read from the store at startup (already settled by
    /// [`JobActor::settle_after_restart`]).
    Resume,
}

/// What a command sent to a worker was, to name it when the worker refuses it.
#[derive(Clone, Copy, Debug)]
enum CommandKind {
    Assignment,
    RunSteps,
}

/// One rank of the job.
struct Rank {
    worker_id: String,
    host: String,
    session: SessionHandle,
    ready: bool,
    finished: bool,
    lost: bool,
}

/// The job actor; see the module docs.
pub(crate) struct JobActor<S> {
    store: S,
    record: JobRecord,
    /// The revision of the record (and of the job's latest event); writes are conditional
    /// on it.
    revision: Revision,
    control: mpsc::UnboundedReceiver<JobControl>,
    reports: mpsc::Receiver<WorkerReport>,
    env: JobEnv,
    crew: Vec<Rank>,
    awaiting: HashMap<u64, (usize, CommandKind)>,
    /// Aborts not yet acknowledged, by command id: the rank they went to and when.
    stopping: BTreeMap<u64, (usize, Instant)>,
    steps: StepTracker,
    /// Pipeline jobs: the layout, stages and compiled streams every rank is held to.
    placement: JobPlacement,
    /// Pipeline jobs, once started: what each rank executed in the last steps.
    timelines: Option<JobTimelines>,
    /// The config's `[checkpoint]` and `[recovery]` tables.
    policy: JobPolicy,
    /// Checkpoints whose shards are being reported, by step.
    shards: PendingCheckpoints,
    /// Committed checkpoints a worker could not load; never tried again.
    bad_checkpoints: Vec<String>,
    /// The checkpoint this attempt resumed from (step 0: the seeded initialization).
    resumed_from: u64,
    /// The recovery under way, from detection until a step past the failure completes.
    recovery: Option<RecoveryProgress>,
    /// Workers that did not confirm their abort in time during a recovery: declared lost
    /// when the job asks for workers again.
    stuck: Vec<(String, String)>,
    /// The loss of every step this coordinator summarized, as bits: redone steps must
    /// reproduce them.
    losses: BTreeMap<u64, u64>,
    /// The current assignment epoch: one per attempt (rendezvous), from 1. Job messages
    /// of another epoch are refused.
    epoch: u64,
}

impl<S: StateStore + Clone + 'static> JobActor<S> {
    /// A job actor for `record` at `revision` (0 for a job not yet written).
    pub fn new(
        store: S,
        record: JobRecord,
        revision: Revision,
        env: JobEnv,
        placement: JobPlacement,
    ) -> (JobHandle, JobActor<S>) {
        let (handle, control, reports) = JobHandle::channel(REPORT_MAILBOX);
        let steps = StepTracker::new(&record, record.steps_done + 1, 0, false);
        // Checked at submission; a job read at startup under other rules keeps the defaults.
        let policy = job_policy(&record.config_toml).unwrap_or_else(|e| {
            tracing::warn!(job = %record.id, error = %e, "the job's [checkpoint]/[recovery] tables; using defaults");
            JobPolicy::default()
        });
        let actor = JobActor {
            store,
            record,
            revision,
            control,
            reports,
            env,
            crew: Vec::new(),
            awaiting: HashMap::new(),
            stopping: BTreeMap::new(),
            steps,
            placement,
            timelines: None,
            policy,
            shards: PendingCheckpoints::default(),
            bad_checkpoints: Vec::new(),
            resumed_from: 0,
            recovery: None,
            stuck: Vec::new(),
            losses: BTreeMap::new(),
            epoch: 0,
        };
        (handle, actor)
    }

    /// A new job's record, not yet written.
    pub fn new_record(job_id: String, spec: &JobSpec) -> JobRecord {
        let now = unix_ms();
        JobRecord {
            id: job_id,
            name: spec.name.clone(),
            state: JobState::Unspecified,
            reason: String::new(),
            config_toml: spec.config_toml.clone(),
            workers: spec.workers,
            steps_done: 0,
            total_steps: spec.steps,
            created_unix_ms: now,
            updated_unix_ms: now,
            last_loss: 0.0,
            output_dir: spec.output_dir.clone(),
            next_event: 0,
            resume_from: spec.resume_from.clone(),
            checkpoint_step: 0,
            checkpoint_dir: String::new(),
            restarts: 0,
        }
    }

    pub fn job_id(&self) -> &str {
        &self.record.id
    }

    pub fn state(&self) -> JobState {
        self.record.state
    }

    pub fn workers_needed(&self) -> u32 {
        self.record.workers
    }

    /// Settles a job read at startup: its workers' sessions died with the previous
    /// process. A job past Pending recovers as from a lost worker (this uses one of its
    /// restarts): it goes to Recovering and, once enough workers have registered again,
    /// resumes from its newest committed checkpoint. With no restarts left it fails with
    /// [`RESTART_REASON`] in the reason. A pending job stays pending.
    pub async fn settle_after_restart(&mut self) -> Result<(), ServiceError> {
        match self.record.state {
            JobState::Running | JobState::Rendezvous | JobState::Recovering => {
                self.begin_recovery(RESTART_REASON.into(), RecoveryCause::CoordinatorRestarted, true).await
            }
            _ => Ok(()),
        }
    }

    pub async fn run(mut self, launch: Launch) {
        if let Launch::Create { reply } = launch {
            let created = self.transition(JobState::Pending, "submitted".into()).await;
            match created {
                Ok(()) => {
                    let _ = reply.send(Ok(self.proto()));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                    self.end(Vec::new()).await;
                    return;
                }
            }
        }
        if self.record.state == JobState::Pending {
            let pending = ClusterMsg::JobPending { job_id: self.record.id.clone() };
            if self.env.cluster.send(pending).await.is_err() {
                return;
            }
        }
        while !self.record.state.is_terminal() {
            let stop_deadline = self.stopping.values().map(|&(_, sent)| sent + self.env.stop_timeout).min();
            let step_deadline = self.step_deadline();
            let requeue_at = self.requeue_at();
            let shrink_at = self.shrink_at();
            let handled = tokio::select! {
                biased;
                // Shutdown: stop without writing, so the store looks as after a crash.
                _ = self.env.cancel.cancelled() => return,
                message = self.control.recv() => match message {
                    Some(message) => self.on_control(message).await,
                    None => return,
                },
                Some(report) = self.reports.recv() => self.on_report(report).await,
                _ = tokio::time::sleep_until(stop_deadline.unwrap_or_else(Instant::now)), if stop_deadline.is_some() => {
                    let late = self.take_late_stops();
                    self.stuck.extend(late);
                    Ok(())
                }
                _ = tokio::time::sleep_until(step_deadline.unwrap_or_else(Instant::now)), if step_deadline.is_some() => {
                    self.on_step_timeout().await
                }
                _ = tokio::time::sleep_until(requeue_at.unwrap_or_else(Instant::now)), if requeue_at.is_some() => {
                    self.requeue().await
                }
                _ = tokio::time::sleep_until(shrink_at.unwrap_or_else(Instant::now)), if shrink_at.is_some() => {
                    self.offer_shrink().await
                }
            };
            if let Err(e) = handled {
                tracing::error!(job = %self.record.id, error = %e, "job actor stopping");
                let reason = format!("the coordinator cannot record the job's state: {e}");
                self.abort_crew(&reason);
                if store_still_ours(&e) {
                    // The store works and the job is still ours, so the failure was this
                    // one write's: record the end, or watchers would wait for it forever.
                    if let Err(e) = self.transition(JobState::Failed, reason).await {
                        tracing::error!(job = %self.record.id, error = %e, "recording the job's failure");
                    }
                }
                // Otherwise the store is left as it is, for the next coordinator to settle.
                break;
            }
        }
        let Some(stuck) = self.await_stopped().await else { return };
        self.end(stuck).await;
    }

    async fn on_control(&mut self, message: JobControl) -> Result<(), ServiceError> {
        match message {
            JobControl::Start(members) => self.start(members).await,
            JobControl::WorkerLost { worker_id, cause } => self.on_worker_lost(worker_id, cause).await,
            JobControl::Timeline { step, reply } => {
                let _ = reply.send(self.timeline(step));
                Ok(())
            }
            JobControl::Cancel { reason, reply } => {
                let reason = if reason.is_empty() { "cancelled by a client".to_string() } else { reason };
                self.abort_crew(&reason);
                match self.transition(JobState::Cancelled, reason).await {
                    Ok(()) => {
                        let _ = reply.send(Ok(self.proto()));
                        Ok(())
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ServiceError::Internal(format!("cancelling the job: {e}"))));
                        Err(e)
                    }
                }
            }
        }
    }

    async fn on_report(&mut self, report: WorkerReport) -> Result<(), ServiceError> {
        use worker_message::Body;
        let rank = match self.reporter(&report) {
            Ok(rank) => rank,
            Err(why) => {
                tracing::warn!(job = %self.record.id, worker = %report.worker_id, conn = report.conn, %why, "refused a job message");
                return Ok(());
            }
        };
        match report.body {
            Body::Ack(ack) => self.on_ack(rank, ack).await,
            Body::StepReport(step) => self.on_step(rank, step).await,
            Body::Error(error) => self.on_worker_error(rank, error).await,
            Body::Finished(finished) => self.on_finished(rank, finished).await,
            Body::CheckpointShard(shard) => self.on_checkpoint_shard(rank, shard).await,
            // Sessions handle these themselves.
            Body::Open(_) | Body::Heartbeat(_) => Ok(()),
        }
    }

    /// The rank `report` may speak for: its worker's rank in the crew, if it came from the
    /// session that holds that rank and (for the messages that carry one) names the current
    /// assignment epoch. The one check of who may report what; anything else is refused,
    /// and the caller logs it and changes nothing. A message about another job is left to
    /// the handlers, which drop it.
    fn reporter(&self, report: &WorkerReport) -> Result<usize, String> {
        let worker = &report.worker_id;
        let Some(rank) = self.crew.iter().position(|r| r.worker_id == *worker && !r.lost) else {
            return Err(format!("worker {worker} holds no rank of the current attempt"));
        };
        let holder = self.crew[rank].session.conn;
        if holder != report.conn {
            return Err(format!(
                "it came on session {} of worker {worker}, but rank {rank} is held by its session {holder}",
                report.conn
            ));
        }
        if let Some((job_id, epoch)) = epoch_of(&report.body)
            && self.is_ours(job_id, false)
            && epoch != self.epoch
        {
            return Err(format!(
                "it is of assignment epoch {epoch}, but rank {rank}'s current assignment is of epoch {}",
                self.epoch
            ));
        }
        Ok(rank)
    }

    /// Whether a message names this job; messages about another (an earlier job of the same
    /// worker, arriving late) are dropped. An empty id is a worker-level error and counts.
    fn is_ours(&self, job_id: &str, allow_empty: bool) -> bool {
        job_id == self.record.id || (allow_empty && job_id.is_empty())
    }

    /// A step's timeline, or `NOT_FOUND` saying why there is none.
    fn timeline(&self, step: u64) -> Result<TimelineAnswer, ServiceError> {
        let id = &self.record.id;
        match (&self.placement, &self.timelines) {
            (_, Some(timelines)) => timelines.step(step).map(TimelineAnswer::Step),
            (Ok(None), None) => Err(ServiceError::NotFound(format!(
                "job {id} has no step timelines: it is a data-parallel job (its config has no [parallel] table)"
            ))),
            (_, None) => Err(ServiceError::NotFound(format!(
                "job {id} has no timeline of step {step}: it has not started running"
            ))),
        }
    }

    fn proto(&self) -> Job {
        self.record.to_proto(self.revision)
    }
}

/// The job and assignment epoch a job message names; `None` for an acknowledgement,
/// which names its command instead (command ids are never reused).
fn epoch_of(body: &worker_message::Body) -> Option<(&str, u64)> {
    use worker_message::Body;
    match body {
        Body::StepReport(m) => Some((&m.job_id, m.epoch)),
        Body::Error(m) => Some((&m.job_id, m.epoch)),
        Body::Finished(m) => Some((&m.job_id, m.epoch)),
        Body::CheckpointShard(m) => Some((&m.job_id, m.epoch)),
        Body::Ack(_) | Body::Open(_) | Body::Heartbeat(_) => None,
    }
}

/// Whether the store still takes this actor's writes after `error`: not when the store
/// failed or closed, nor when another writer took the job over.
fn store_still_ours(error: &ServiceError) -> bool {
    !matches!(
        error,
        ServiceError::Fenced { .. }
            | ServiceError::ShuttingDown
            | ServiceError::Store(StoreError::Failed { .. } | StoreError::Closed)
    )
}
