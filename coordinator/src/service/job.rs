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
//! # Checkpoints
//!
//! With a `[checkpoint]` interval and an output directory, each assignment names the run's
//! checkpoint root (`output_dir/checkpoints/<run id>`, see `crate::checkpoint`); every rank
//! writes its shard of step s's state there in the background and reports it durable
//! (`CheckpointShard`). Once every rank's shard of a step is in, the actor commits the
//! checkpoint: writes its manifest atomically, deletes the ones beyond `checkpoint.keep`,
//! and publishes `CheckpointCommitted`. A shard that could not be written leaves that
//! checkpoint uncommitted; training goes on.
//!
//! # Recovery
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
//! again, resuming from the newest committed checkpoint.
//!
//! A pipeline job (one with a `[parallel]` table) is placed when it is submitted (see
//! `crate::placement`): at rendezvous its workers are ordered into world ranks by (node,
//! local rank, worker id), and each one's assignment carries the layout, every rank's
//! coordinates, every stage and its pipeline rank's compiled stream (`dp_rank` and
//! `dp_size` are then the world rank and size). Every step report of such a job must list
//! exactly that stream as executed, op by op (kind, chunks, peer); the first difference,
//! a missing tail or extra ops fail the job with a reason naming the world rank, the
//! worker, the step, the instruction and both ops. What each rank executed is kept for
//! `GetStepTimeline` (`super::timeline`), and each step's summary carries the bubble
//! measured from the reported spans. A data-parallel job ignores `executed`.
//!
//! Steps are numbered from 1, as the trainer and `metrics.jsonl` number them: a job of
//! `steps = S` runs steps 1..=S, and `steps_done = s` means steps 1..=s are summarized.
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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flotilla_proto::v1::{
    Abort, Ack, Assignment, CheckpointCommitted, CheckpointShard, CoordinatorMessage, Job, JobEvent,
    JobFinished, JobState, Peer, Recovery, ResumeFrom, RunSteps, ShardFile, StateChanged, StepReport,
    StepSummary, StepTimeline, WorkerError, WorkerInfo, WorkerJoined, WorkerLost, coordinator_message,
    job_event, worker_message,
};
use tokio::sync::{mpsc, oneshot};
// Tokio's clock, so that paused-time tests and simulations see the timeouts they set.
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cluster::ClusterMsg;
use super::records::{JobRecord, encode_event, event_key, job_key, unix_ms};
use super::session::SessionHandle;
use super::timeline::{JobTimelines, RankInfo};
use super::{JobPolicy, ServiceError};
use crate::checkpoint::{self as ckpt, Manifest, ShardEntry};
use crate::placement::{Placement, WorkerKey, world_order};
use crate::schedule::{RankSpan, bubble_fraction, predicted_bubble_fraction, rank_span};
use crate::store::StoreError;
use crate::store::{Compare, CompareOp, Op, Revision, StateStore, Txn};

/// Reports buffered per job before the sessions forwarding them wait.
const REPORT_MAILBOX: usize = 1024;

/// How many steps a rank may report ahead of the oldest step not every rank reported.
/// Data-parallel ranks move in lockstep (they all-reduce every step), so honest workers
/// are at most a step apart; this only bounds what a misbehaving worker can make the
/// coordinator buffer.
const MAX_STEPS_AHEAD: u64 = 1024;

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

/// Where a session forwards the job messages of a worker assigned to a job.
#[derive(Clone, Debug)]
pub(crate) struct JobRoute {
    pub reports: mpsc::Sender<WorkerReport>,
}

/// A job message of one worker, forwarded by its session.
#[derive(Debug)]
pub(crate) struct WorkerReport {
    pub worker_id: String,
    pub body: worker_message::Body,
}

/// A worker given to a job by the cluster actor.
#[derive(Debug)]
pub(crate) struct Member {
    pub worker_id: String,
    pub info: WorkerInfo,
    pub session: SessionHandle,
}

/// The job actor's control mailbox, fed by the cluster actor (never awaited, hence
/// unbounded; see `service`'s module docs).
pub(crate) enum JobControl {
    /// The job's workers, in rank order.
    Start(Vec<Member>),
    WorkerLost {
        worker_id: String,
        cause: String,
    },
    Cancel {
        reason: String,
        reply: oneshot::Sender<Result<Job, ServiceError>>,
    },
    /// A step's executed timeline (pipeline jobs).
    Timeline {
        step: u64,
        reply: oneshot::Sender<Result<TimelineAnswer, ServiceError>>,
    },
}

/// Where a step timeline comes from: the job actor of a running job builds it; the cluster
/// actor hands over an ended job's timelines for the gRPC handler to read.
pub(crate) enum TimelineAnswer {
    Step(StepTimeline),
    Ended(Arc<JobTimelines>),
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
}

/// The cluster actor's handle to a job actor.
#[derive(Clone, Debug)]
pub(crate) struct JobHandle {
    control: mpsc::UnboundedSender<JobControl>,
    reports: mpsc::Sender<WorkerReport>,
}

impl JobHandle {
    /// Sends a control message; a job actor that has ended ignores it (its end is on its
    /// way to the cluster actor).
    pub fn send(&self, message: JobControl) {
        let _ = self.control.send(message);
    }

    pub fn route(&self) -> JobRoute {
        JobRoute { reports: self.reports.clone() }
    }
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
    shards: BTreeMap<u64, PendingCheckpoint>,
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
}

/// A checkpoint's shards as the ranks report them durable.
#[derive(Default)]
struct PendingCheckpoint {
    shards: Vec<Option<CheckpointShard>>,
    /// A rank could not write its shard: the checkpoint will not be committed.
    failed: bool,
}

/// A recovery from its detection to the first step past the failure.
struct RecoveryProgress {
    cause: String,
    restart: u32,
    detected: Instant,
    detected_unix_ms: u64,
    /// `steps_done` when the failure struck: the recovery ends when a step past it (or the
    /// job's last step) completes.
    reached: u64,
    /// The restart backoff: workers are not asked for before this.
    not_before: Instant,
    /// Whether the job has given its workers back and asked the cluster for a crew, and
    /// when; when the cluster gave it one.
    requeued: bool,
    requeued_at: Option<Instant>,
    crew_at: Option<Instant>,
    /// Whether the job has offered the cluster smaller world sizes (elastic DP).
    shrink_offered: bool,
    /// When every rank of the new crew had loaded the checkpoint.
    rendezvous_done: Option<Instant>,
    skipped: Vec<String>,
    mismatches: u32,
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
        let (control_tx, control) = mpsc::unbounded_channel();
        let (reports_tx, reports) = mpsc::channel(REPORT_MAILBOX);
        let steps = StepTracker::new(&record, record.steps_done + 1, 0, false);
        // Checked at submission; a job read at startup under other rules keeps the defaults.
        let policy = super::job_policy(&record.config_toml).unwrap_or_else(|e| {
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
            shards: BTreeMap::new(),
            bad_checkpoints: Vec::new(),
            resumed_from: 0,
            recovery: None,
            stuck: Vec::new(),
            losses: BTreeMap::new(),
        };
        (JobHandle { control: control_tx, reports: reports_tx }, actor)
    }

    /// A new job's record, not yet written.
    pub fn new_record(job_id: String, spec: &super::JobSpec) -> JobRecord {
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
                self.begin_recovery(RESTART_REASON.into(), true).await
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

    /// Waits until every aborted worker has confirmed that it stopped, or the stop timeout
    /// has passed; returns the workers that did not, with the cause. `None`: shutdown.
    async fn await_stopped(&mut self) -> Option<Vec<(String, String)>> {
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
    fn take_late_stops(&mut self) -> Vec<(String, String)> {
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
    async fn end(&mut self, stuck: Vec<(String, String)>) {
        let timelines = self.timelines.take();
        let ended = ClusterMsg::JobEnded { job_id: self.record.id.clone(), stuck, timelines };
        let _ = self.env.cluster.send(ended).await;
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

    // ---------------------------------------------------------------------------------
    // Writing

    /// Appends one event and the updated record in one transaction: the event's revision
    /// is the write's. Conditional on the record being where this actor left it.
    async fn append(&mut self, event: job_event::Event) -> Result<Revision, ServiceError> {
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

    async fn transition(&mut self, to: JobState, reason: String) -> Result<(), ServiceError> {
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

    // ---------------------------------------------------------------------------------
    // Commands

    /// Sends a command; returns its id.
    fn command(&mut self, rank: usize, kind: Option<CommandKind>, body: coordinator_message::Body) -> u64 {
        let command_id = self.env.commands.fetch_add(1, Ordering::Relaxed);
        if let Some(kind) = kind {
            self.awaiting.insert(command_id, (rank, kind));
        }
        self.crew[rank].session.send(CoordinatorMessage { command_id, body: Some(body) });
        command_id
    }

    /// Aborts the job on every rank still alive; their acknowledgements are awaited before
    /// the job releases them.
    fn abort_crew(&mut self, reason: &str) {
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
    async fn fail(&mut self, reason: String) -> Result<(), ServiceError> {
        self.abort_crew(&reason);
        self.transition(JobState::Failed, reason).await
    }

    // ---------------------------------------------------------------------------------
    // Control

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

    /// Rendezvous: records the workers, then sends each its assignment with every peer's
    /// data-plane address. A pipeline job orders its workers into world ranks by (node,
    /// local rank, worker id) and ships each its place in the layout and its stream; a
    /// data-parallel job keeps the cluster actor's order (worker ids).
    async fn start(&mut self, members: Vec<Member>) -> Result<(), ServiceError> {
        let recovering =
            self.record.state == JobState::Recovering && self.recovery.as_ref().is_some_and(|r| r.requeued);
        if recovering && let Some(recovery) = &mut self.recovery {
            recovery.crew_at = Some(Instant::now());
        }
        if !(self.record.state == JobState::Pending || recovering) || !self.crew.is_empty() {
            // The cluster actor starts a job once per request; the workers are released
            // when it ends.
            tracing::warn!(job = %self.record.id, "ignoring a second start");
            return Ok(());
        }
        let placement = match &self.placement {
            Ok(placement) => placement.clone(),
            Err(why) => {
                // Nothing was sent to the workers: they are free again once the job ends.
                let reason = format!("the job's [parallel] layout cannot be placed: {why}");
                return self.transition(JobState::Failed, reason).await;
            }
        };
        let mut members = members;
        if let Some(placement) = &placement {
            if members.len() != placement.world_size() as usize {
                let reason = format!(
                    "the layout needs {} workers, but the job was given {}",
                    placement.world_size(),
                    members.len()
                );
                return self.transition(JobState::Failed, reason).await;
            }
            let keys: Vec<WorkerKey<'_>> = members
                .iter()
                .map(|m| WorkerKey {
                    node_id: if m.info.node_id.is_empty() { &m.info.host } else { &m.info.node_id },
                    local_rank: m.info.local_rank,
                    worker_id: &m.worker_id,
                })
                .collect();
            let order = world_order(&keys);
            let mut slots: Vec<Option<Member>> = members.into_iter().map(Some).collect();
            members = order.into_iter().filter_map(|i| slots[i].take()).collect();
        }
        let n = members.len();
        let peers: Vec<(String, WorkerInfo)> =
            members.iter().map(|m| (m.worker_id.clone(), m.info.clone())).collect();
        self.crew = members
            .into_iter()
            .map(|m| Rank {
                worker_id: m.worker_id,
                host: m.info.host.clone(),
                session: m.session,
                ready: false,
                finished: false,
                lost: false,
            })
            .collect();
        let resume = match self.choose_checkpoint().await {
            Ok(resume) => resume,
            // Nothing was sent to the workers: they are free again once the job ends.
            Err(reason) => return self.transition(JobState::Failed, reason).await,
        };
        let from = resume.as_ref().map_or(0, |r| r.step);
        self.resumed_from = from;
        // Steps up to the checkpoint's are done (by this job before a failure, or by the run
        // it resumes); after a recovery, those past it are redone and checked.
        self.record.steps_done = self.record.steps_done.max(from);
        self.steps = StepTracker::new(&self.record, from + 1, n, placement.is_some());
        if let Some(placement) = &placement {
            let ranks = self
                .crew
                .iter()
                .enumerate()
                .map(|(g, rank)| RankInfo {
                    worker_id: rank.worker_id.clone(),
                    coordinates: placement.coordinates(g as u32),
                })
                .collect();
            let layout = placement.parallel().layout();
            self.timelines = Some(JobTimelines::new(self.record.id.clone(), layout, ranks));
        }
        // An elastic data-parallel job may have been given fewer workers than it had.
        let shrunk = (n as u32) < self.record.workers && placement.is_none();
        let before = self.record.workers;
        if shrunk {
            self.record.workers = n as u32;
        }
        let assigned = match &resume {
            Some(resume) => {
                format!("{n} workers assigned; resuming from the checkpoint at step {from} ({})", resume.dir)
            }
            None if recovering => format!("{n} workers assigned; restarting from the seeded initialization"),
            None => format!("{n} workers assigned"),
        };
        let assigned = if shrunk {
            format!(
                "{assigned}, {} fewer than before (recovery.min_workers = {})",
                before - n as u32,
                self.policy.recovery.min_workers
            )
        } else {
            assigned
        };
        self.transition(JobState::Rendezvous, assigned).await?;
        for rank in 0..n {
            let joined = WorkerJoined {
                worker_id: self.crew[rank].worker_id.clone(),
                rank: rank as u32,
                host: self.crew[rank].host.clone(),
            };
            self.append(job_event::Event::WorkerJoined(joined)).await?;
        }
        let peers: Vec<Peer> = peers
            .into_iter()
            .enumerate()
            .map(|(rank, (worker_id, info))| Peer {
                rank: rank as u32,
                worker_id,
                data_plane_address: info.data_plane_address,
                node_id: if info.node_id.is_empty() { info.host } else { info.node_id },
            })
            .collect();
        // A fresh id per rendezvous: a peer left over from an earlier one is refused on
        // the data plane.
        let data_plane_session = super::cluster::random_u64();
        let mut pipelines = placement.as_ref().map(|p| p.assignments().into_iter());
        let checkpoint_root = match self.checkpoint_root() {
            Some(root) if self.policy.checkpoint.interval > 0 => root.display().to_string(),
            _ => String::new(),
        };
        for rank in 0..n {
            // dp_rank and dp_size are the world rank and size: `peers` is by world rank.
            let assignment = Assignment {
                job_id: self.record.id.clone(),
                dp_rank: rank as u32,
                dp_size: n as u32,
                peers: peers.clone(),
                config_toml: self.record.config_toml.clone(),
                output_dir: self.record.output_dir.clone(),
                data_plane_session,
                pipeline: pipelines.as_mut().and_then(Iterator::next),
                checkpoint_root: checkpoint_root.clone(),
                resume: resume.clone(),
            };
            self.command(
                rank,
                Some(CommandKind::Assignment),
                coordinator_message::Body::Assignment(assignment),
            );
        }
        Ok(())
    }

    /// Every rank accepted its assignment: run the steps.
    async fn run_steps(&mut self) -> Result<(), ServiceError> {
        let n = self.crew.len();
        let ready = match &mut self.recovery {
            Some(recovery) => {
                recovery.rendezvous_done = Some(Instant::now());
                format!("all {n} workers ready; running again from step {}", self.steps.next)
            }
            None => format!("all {n} workers ready"),
        };
        self.transition(JobState::Running, ready).await?;
        self.steps.last = Instant::now();
        let first_step = self.steps.next;
        let count = self.steps.end - first_step;
        for rank in 0..n {
            let run = RunSteps { job_id: self.record.id.clone(), first_step, count };
            self.command(rank, Some(CommandKind::RunSteps), coordinator_message::Body::RunSteps(run));
        }
        Ok(())
    }

    async fn on_worker_lost(&mut self, worker_id: String, cause: String) -> Result<(), ServiceError> {
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
                self.begin_recovery(format!("worker {worker_id} lost: {cause}"), true).await
            }
            _ => Ok(()),
        }
    }

    // ---------------------------------------------------------------------------------
    // Recovery

    /// Starts a recovery (or restarts one under way) from `cause`: aborts the step on every
    /// survivor and goes to Recovering. Once every survivor has confirmed its abort (or the
    /// stop timeout declared it stuck) and the backoff has passed, [`Self::requeue`] gives
    /// the workers back and asks the cluster for a crew; [`Self::start`] then resumes from
    /// the newest loadable committed checkpoint. `counts`: whether this uses one of
    /// `recovery.max_restarts` (a failure does; falling back from a checkpoint that cannot
    /// be loaded does not, and cannot loop: each is tried once). With none left the job
    /// fails, naming the cause.
    async fn begin_recovery(&mut self, cause: String, counts: bool) -> Result<(), ServiceError> {
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
    fn requeue_at(&self) -> Option<Instant> {
        let recovery = self.recovery.as_ref()?;
        let ready =
            self.record.state == JobState::Recovering && !recovery.requeued && self.stopping.is_empty();
        ready.then_some(recovery.not_before)
    }

    /// Gives the crew back to the cluster actor (the stuck ones to be declared lost) and
    /// asks for a crew again, ahead of queued jobs.
    async fn requeue(&mut self) -> Result<(), ServiceError> {
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
    fn shrink_at(&self) -> Option<Instant> {
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
    async fn offer_shrink(&mut self) -> Result<(), ServiceError> {
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
    fn step_deadline(&self) -> Option<Instant> {
        let timeout = self.policy.recovery.step_timeout_s;
        (self.record.state == JobState::Running && timeout > 0.0)
            .then(|| self.steps.last + Duration::from_secs_f64(timeout))
    }

    /// The next step did not complete in time: a rank is hung (in compute, or in a
    /// collective whose peer is) though its heartbeats flow. Recovers, naming the ranks
    /// that had not reported the step.
    async fn on_step_timeout(&mut self) -> Result<(), ServiceError> {
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
        self.begin_recovery(cause, true).await
    }

    /// Where this run's checkpoints go: `output_dir/checkpoints/<run id>`; none without an
    /// output directory.
    fn checkpoint_root(&self) -> Option<std::path::PathBuf> {
        let dir = &self.record.output_dir;
        (!dir.is_empty()).then(|| ckpt::run_root(std::path::Path::new(dir), &self.record.run_id()))
    }

    /// The checkpoint to start from: this run's newest committed one that no worker failed
    /// to load, else the one the job was submitted to resume from, else none (the seeded
    /// initialization, which every layout reproduces). The error says why the job cannot
    /// start: the checkpoint it was submitted with cannot be loaded.
    async fn choose_checkpoint(&self) -> Result<Option<ResumeFrom>, String> {
        let root = self.checkpoint_root();
        let resume_from = self.record.resume_from.clone();
        let bad = self.bad_checkpoints.clone();
        let found = tokio::task::spawn_blocking(move || -> Result<Option<ckpt::Committed>, String> {
            if let Some(root) = root {
                match ckpt::list_committed(&root) {
                    Ok(committed) => {
                        let usable =
                            committed.into_iter().rev().find(|c| !bad.contains(&c.dir.display().to_string()));
                        if usable.is_some() {
                            return Ok(usable);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "listing the job's checkpoints"),
                }
            }
            if resume_from.is_empty() {
                return Ok(None);
            }
            if bad.contains(&resume_from) {
                return Err(format!("the checkpoint the job resumes from, {resume_from}, cannot be loaded"));
            }
            let dir = std::path::PathBuf::from(&resume_from);
            let manifest =
                ckpt::read_manifest(&dir).map_err(|e| format!("cannot resume from {resume_from}: {e}"))?;
            Ok(Some(ckpt::Committed { dir, manifest }))
        })
        .await
        .map_err(|e| format!("looking for checkpoints: {e}"))??;
        Ok(found.map(|c| ResumeFrom {
            dir: c.dir.display().to_string(),
            step: c.manifest.step,
            shards: c
                .manifest
                .shards
                .iter()
                .map(|s| ShardFile { file: s.file.clone(), bytes: s.bytes, crc32: s.crc32 })
                .collect(),
        }))
    }

    /// Ends the recovery under way once `step` is past the point the job had reached (or is
    /// its last step): publishes it with its figures.
    async fn finish_recovery(&mut self, step: u64) -> Result<(), ServiceError> {
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

    // ---------------------------------------------------------------------------------
    // Checkpoints

    /// A rank's shard of a checkpoint is durable (or failed). Once every rank's is, the
    /// checkpoint is committed: its manifest written atomically, older ones beyond
    /// `checkpoint.keep` deleted, and the commit published.
    async fn on_checkpoint_shard(&mut self, rank: usize, shard: CheckpointShard) -> Result<(), ServiceError> {
        if self.record.state != JobState::Running || !self.is_ours(&shard.job_id, false) {
            return Ok(());
        }
        let step = shard.step;
        if step <= self.record.checkpoint_step || step > self.record.total_steps {
            // Redone after a recovery and committed already, or nonsense.
            return Ok(());
        }
        let n = self.crew.len();
        let worker = self.crew[rank].worker_id.clone();
        let pending = self
            .shards
            .entry(step)
            .or_insert_with(|| PendingCheckpoint { shards: vec![None; n], failed: false });
        if !shard.error.is_empty() {
            tracing::warn!(job = %self.record.id, step, %worker, error = %shard.error, "a checkpoint shard could not be written; the checkpoint will not be committed");
            pending.failed = true;
            return Ok(());
        }
        if let Some(slot) = pending.shards.get_mut(rank) {
            *slot = Some(shard);
        }
        if pending.failed || pending.shards.iter().any(Option::is_none) {
            return Ok(());
        }
        let Some(complete) = self.shards.remove(&step) else { return Ok(()) };
        // Each rank writes its checkpoints in order: none will complete an older one now.
        self.shards.retain(|&s, _| s > step);
        let shards: Vec<CheckpointShard> = complete.shards.into_iter().flatten().collect();
        self.commit_checkpoint(step, shards).await
    }

    async fn commit_checkpoint(
        &mut self,
        step: u64,
        shards: Vec<CheckpointShard>,
    ) -> Result<(), ServiceError> {
        let Some(root) = self.checkpoint_root() else { return Ok(()) };
        let dir = flotilla_model::shard::step_dir(&root, step);
        let bytes = shards.iter().map(|s| s.bytes).fold(0, u64::saturating_add);
        let snapshot_seconds = shards.iter().map(|s| s.snapshot_seconds).fold(0.0, f64::max);
        let write_seconds = shards.iter().map(|s| s.write_seconds).fold(0.0, f64::max);
        let manifest = Manifest {
            format: ckpt::MANIFEST_FORMAT.into(),
            job_id: self.record.id.clone(),
            run_id: self.record.run_id(),
            step,
            created_unix_ms: self.record.created_unix_ms,
            workers: shards.len() as u32,
            layout: self.layout_name(),
            config_toml: self.record.config_toml.clone(),
            shards: shards
                .iter()
                .enumerate()
                .map(|(rank, s)| ShardEntry {
                    rank: rank as u32,
                    file: s.file.clone(),
                    bytes: s.bytes,
                    crc32: s.crc32,
                })
                .collect(),
            bytes,
        };
        let keep = self.policy.checkpoint.keep as usize;
        let commit_dir = dir.clone();
        let committed = tokio::task::spawn_blocking(move || {
            ckpt::commit(&commit_dir, &manifest).map_err(|e| e.to_string())?;
            // The commit stands even if clean-up fails; the next commit tries again.
            Ok::<_, String>(ckpt::retain(&root, keep).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "deleting old checkpoints");
                Vec::new()
            }))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let deleted_steps = match committed {
            Ok(deleted) => deleted,
            Err(e) => {
                // Training goes on: the previous committed checkpoint still stands.
                tracing::error!(job = %self.record.id, step, error = %e, "committing a checkpoint");
                return Ok(());
            }
        };
        let before = (self.record.checkpoint_step, std::mem::take(&mut self.record.checkpoint_dir));
        self.record.checkpoint_step = step;
        self.record.checkpoint_dir = dir.display().to_string();
        let event = CheckpointCommitted {
            step,
            dir: self.record.checkpoint_dir.clone(),
            shards: shards.len() as u32,
            bytes,
            snapshot_seconds,
            write_seconds,
            deleted_steps,
        };
        if let Err(e) = self.append(job_event::Event::CheckpointCommitted(event)).await {
            (self.record.checkpoint_step, self.record.checkpoint_dir) = before;
            return Err(e);
        }
        Ok(())
    }

    /// The job's layout in a manifest: "pp 2 ep 2 dp 1 dualpipe, 4 micro-batches" or
    /// "data-parallel 2".
    fn layout_name(&self) -> String {
        match &self.placement {
            Ok(Some(placement)) => {
                let l = placement.parallel().layout();
                format!(
                    "pp {} ep {} dp {} {}, {} micro-batches",
                    l.pp, l.ep, l.dp, l.schedule, l.micro_batches
                )
            }
            _ => format!("data-parallel {}", self.crew.len()),
        }
    }

    // ---------------------------------------------------------------------------------
    // Reports

    async fn on_report(&mut self, report: WorkerReport) -> Result<(), ServiceError> {
        use worker_message::Body;
        let Some(rank) = self.crew.iter().position(|r| r.worker_id == report.worker_id && !r.lost) else {
            tracing::debug!(job = %self.record.id, worker = %report.worker_id, "dropping a report from outside the crew");
            return Ok(());
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

    /// Whether a message names this job; messages about another (an earlier job of the same
    /// worker, arriving late) are dropped. An empty id is a worker-level error and counts.
    fn is_ours(&self, job_id: &str, allow_empty: bool) -> bool {
        job_id == self.record.id || (allow_empty && job_id.is_empty())
    }

    async fn on_ack(&mut self, rank: usize, ack: Ack) -> Result<(), ServiceError> {
        if self.stopping.get(&ack.command_id).is_some_and(|&(owner, _)| owner == rank) {
            // The rank stopped the aborted step.
            self.stopping.remove(&ack.command_id);
            return Ok(());
        }
        let Some(&(owner, kind)) = self.awaiting.get(&ack.command_id) else { return Ok(()) };
        if owner != rank {
            return Ok(());
        }
        self.awaiting.remove(&ack.command_id);
        if !ack.error.is_empty()
            && !ack.bad_checkpoint.is_empty()
            && self.record.state == JobState::Rendezvous
        {
            return self.on_bad_checkpoint(rank, ack).await;
        }
        if !ack.error.is_empty() {
            let worker = &self.crew[rank].worker_id;
            let kind = match kind {
                CommandKind::Assignment => "its assignment",
                CommandKind::RunSteps => "the steps to run",
            };
            return self.fail(format!("worker {worker} refused {kind}: {}", ack.error)).await;
        }
        if let CommandKind::Assignment = kind {
            self.crew[rank].ready = true;
            if self.record.state == JobState::Rendezvous && self.crew.iter().all(|r| r.ready) {
                return self.run_steps().await;
            }
        }
        Ok(())
    }

    /// A rank could not load the checkpoint it was assigned (a shard missing, truncated or
    /// failing its checksum, or from another model): it is never tried again, and the job
    /// rendezvouses anew from the committed checkpoint before it. A job submitted to resume
    /// from that very checkpoint fails instead: starting over would silently drop it.
    async fn on_bad_checkpoint(&mut self, rank: usize, ack: Ack) -> Result<(), ServiceError> {
        let worker = self.crew[rank].worker_id.clone();
        let dir = ack.bad_checkpoint;
        tracing::warn!(job = %self.record.id, %worker, checkpoint = %dir, error = %ack.error, "a checkpoint cannot be loaded");
        if !self.bad_checkpoints.contains(&dir) {
            self.bad_checkpoints.push(dir.clone());
        }
        if dir == self.record.resume_from && self.recovery.is_none() {
            return self
                .fail(format!("worker {worker} cannot load the checkpoint to resume from: {}", ack.error))
                .await;
        }
        let cause = format!("worker {worker} cannot load the checkpoint {dir}: {}", ack.error);
        self.begin_recovery(cause, false).await?;
        if let Some(recovery) = &mut self.recovery
            && !recovery.skipped.contains(&dir)
        {
            recovery.skipped.push(dir);
        }
        Ok(())
    }

    /// Takes a rank's report of a step. A pipeline job's rank must have executed exactly
    /// its compiled stream (op by op: kind, chunks, peer); any difference fails the job.
    /// What it executed is kept for `GetStepTimeline`, a deviating stream included.
    async fn on_step(&mut self, rank: usize, mut report: StepReport) -> Result<(), ServiceError> {
        if self.record.state != JobState::Running || !self.is_ours(&report.job_id, false) {
            return Ok(());
        }
        let step = report.step;
        // Taken out of every report: a data-parallel job ignores it, a pipeline job keeps it
        // in its timelines rather than in the pending reports.
        let executed = std::mem::take(&mut report.executed);
        let (deviation, span) = match &self.placement {
            Ok(Some(placement)) => {
                (placement.check_executed(rank as u32, &executed).err(), rank_span(&executed))
            }
            _ => (None, None),
        };
        let reported_bubble = report.bubble_fraction;
        if let Err(violation) = self.steps.accept(rank, report, span) {
            let worker = &self.crew[rank].worker_id;
            return self.fail(format!("worker {worker} sent an invalid step report: {violation}")).await;
        }
        if let Some(timelines) = &mut self.timelines {
            timelines.record(step, rank, executed, reported_bubble);
        }
        if let Some(deviation) = deviation {
            let worker = &self.crew[rank].worker_id;
            let reason = format!("rank {rank} (worker {worker}) step {step}: {deviation}");
            tracing::error!(job = %self.record.id, %reason, "pipeline stream deviation");
            return self.fail(reason).await;
        }
        while let Some(mut summary) = self.steps.pop() {
            if let (Ok(Some(placement)), Some(timelines)) = (&self.placement, &self.timelines)
                && let Ok(timeline) = timelines.step(summary.step)
            {
                summary.predicted_bubble_fraction =
                    predicted_bubble_fraction(placement.schedule(), &timeline).unwrap_or(0.0);
            }
            let step = summary.step;
            if step <= self.record.steps_done {
                // Redone after a recovery: published before, and it must reproduce the loss.
                if let Some(&bits) = self.losses.get(&step)
                    && bits != summary.loss.to_bits()
                {
                    tracing::warn!(job = %self.record.id, step, before = f64::from_bits(bits), now = summary.loss, "a redone step's loss differs");
                    if let Some(recovery) = &mut self.recovery {
                        recovery.mismatches += 1;
                    }
                }
            } else {
                let before = (self.record.steps_done, self.record.last_loss);
                self.record.steps_done = step;
                self.record.last_loss = summary.loss;
                let loss = summary.loss.to_bits();
                if let Err(e) = self.append(job_event::Event::Step(summary)).await {
                    // Memory follows the store: the step was not recorded.
                    (self.record.steps_done, self.record.last_loss) = before;
                    return Err(e);
                }
                self.losses.insert(step, loss);
            }
            self.finish_recovery(step).await?;
        }
        Ok(())
    }

    async fn on_worker_error(&mut self, rank: usize, error: WorkerError) -> Result<(), ServiceError> {
        if !self.is_ours(&error.job_id, true) {
            return Ok(());
        }
        let worker = &self.crew[rank].worker_id;
        let reason = format!("worker {worker} failed at step {}: {}", error.step, error.message);
        match self.record.state {
            // Its peers' errors (their collectives failing) follow; the recovery ignores them.
            JobState::Running => self.begin_recovery(reason, true).await,
            JobState::Rendezvous => self.fail(reason).await,
            _ => Ok(()),
        }
    }

    async fn on_finished(&mut self, rank: usize, finished: JobFinished) -> Result<(), ServiceError> {
        if self.record.state != JobState::Running || !self.is_ours(&finished.job_id, false) {
            return Ok(());
        }
        self.crew[rank].finished = true;
        if !self.crew.iter().all(|r| r.finished) {
            return Ok(());
        }
        let n = self.crew.len();
        let (done, total) = (self.record.steps_done, self.record.total_steps);
        if done == total {
            // A recovery that resumed from the last step's checkpoint ran no step: it ends
            // here.
            self.finish_recovery(total).await?;
            self.transition(JobState::Succeeded, format!("all {n} workers finished {total} steps")).await
        } else {
            self.fail(format!(
                "all {n} workers reported the job finished, but only {done} of {total} steps were reported by every rank"
            ))
            .await
        }
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

/// A rank's report of a step (a pipeline job's executed ops taken out) and their span.
type Reported = (StepReport, Option<RankSpan>);

/// Collects the ranks' step reports and releases one summary per step, in step order, once
/// every rank has reported it.
struct StepTracker {
    /// The first step of the run.
    first: u64,
    /// The next step to summarize.
    next: u64,
    /// One past the last step of the job.
    end: u64,
    ranks: usize,
    /// Whether the job is a pipeline job (its steps have a bubble).
    pipeline: bool,
    pending: BTreeMap<u64, Vec<Option<Reported>>>,
    /// When the previous step was summarized (or the steps started): the fallback for the
    /// step time when workers report none.
    last: Instant,
}

impl StepTracker {
    /// The steps of `record`'s job from `next` on, for `ranks` ranks.
    fn new(record: &JobRecord, next: u64, ranks: usize, pipeline: bool) -> StepTracker {
        let end = record.total_steps.saturating_add(1).max(next);
        StepTracker {
            first: next,
            next,
            end,
            ranks,
            pipeline,
            pending: BTreeMap::new(),
            last: Instant::now(),
        }
    }

    /// Takes a report; an error describes a protocol violation.
    fn accept(&mut self, rank: usize, report: StepReport, span: Option<RankSpan>) -> Result<(), String> {
        let step = report.step;
        if step >= self.end {
            return Err(format!("step {step} is past the job's last step {}", self.end.saturating_sub(1)));
        }
        if step < self.first {
            return Err(format!("step {step} is before the run's first step {}", self.first));
        }
        if step < self.next {
            // Already summarized: a duplicate, harmless.
            return Ok(());
        }
        if step - self.next >= MAX_STEPS_AHEAD {
            return Err(format!(
                "step {step} is more than {MAX_STEPS_AHEAD} steps ahead of step {}, which not every rank has reported",
                self.next
            ));
        }
        let slots = self.pending.entry(step).or_insert_with(|| vec![None; self.ranks]);
        if let Some(slot) = slots.get_mut(rank)
            && slot.is_none()
        {
            *slot = Some((report, span));
        }
        Ok(())
    }

    /// The ranks that have not reported `step`.
    fn missing(&self, step: u64) -> Vec<usize> {
        match self.pending.get(&step) {
            Some(slots) => {
                slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(rank, _)| rank).collect()
            }
            None => (0..self.ranks).collect(),
        }
    }

    /// The next step every rank has reported, summarized.
    fn pop(&mut self) -> Option<StepSummary> {
        let slots = self.pending.get(&self.next)?;
        if slots.iter().any(Option::is_none) {
            return None;
        }
        let (reports, spans): (Vec<StepReport>, Vec<Option<RankSpan>>) =
            self.pending.remove(&self.next)?.into_iter().flatten().unzip();
        let now = Instant::now();
        let observed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.next += 1;
        let mut summary = summarize(&reports, observed);
        if self.pipeline {
            summary.bubble_fraction = measured_bubble(&reports, &spans);
        }
        Some(summary)
    }
}

/// A pipeline step's bubble: from the ranks' spans ([`bubble_fraction`]: the largest over
/// ranks of 1 − busy / makespan), or, when the spans measure no time, the largest fraction
/// the ranks reported (each clamped to [0, 1]; a non-finite one counts as 0).
fn measured_bubble(reports: &[StepReport], spans: &[Option<RankSpan>]) -> f64 {
    bubble_fraction(spans.iter().flatten().copied()).unwrap_or_else(|| {
        reports
            .iter()
            .map(|r| if r.bubble_fraction.is_finite() { r.bubble_fraction.clamp(0.0, 1.0) } else { 0.0 })
            .fold(0.0, f64::max)
    })
}

/// One step of the job from every rank's report. Losses, tokens and expert loads are of
/// the global batch (all-reduced on the data plane), the same on every rank, so rank 0's
/// are taken; the step took as long as its slowest rank (compute + communication as the
/// workers measured it, or, if they measured nothing, the time the coordinator saw pass).
/// The summary has the largest and the mean of the per-(layer, expert) token counts.
fn summarize(reports: &[StepReport], observed_seconds: f64) -> StepSummary {
    let Some(first) = reports.first() else { return StepSummary::default() };
    let tokens = first.tokens;
    let reported = reports.iter().map(|r| r.compute_seconds + r.communication_seconds).fold(0.0, f64::max);
    let seconds = if reported > 0.0 { reported } else { observed_seconds };
    let tokens_per_second = if seconds > 0.0 { tokens as f64 / seconds } else { 0.0 };

    let counts = first.expert_loads.iter().flat_map(|layer| layer.tokens.iter().copied());
    let (n, sum, max) =
        counts.fold((0u64, 0f64, 0u64), |(n, sum, max), c| (n + 1, sum + c as f64, max.max(c)));
    let max_expert_load = max as f64;
    let mean_expert_load = if n == 0 { 0.0 } else { sum / n as f64 };

    StepSummary {
        step: first.step,
        loss: first.loss,
        main_ce: first.main_ce,
        mtp_ce: first.mtp_ce.clone(),
        balance_loss: first.balance_loss,
        lr: first.lr,
        grad_norm: first.grad_norm,
        tokens,
        tokens_per_second,
        max_expert_load,
        mean_expert_load,
        bubble_fraction: 0.0,
        predicted_bubble_fraction: 0.0,
        exchange_bytes: reports.iter().map(|r| r.exchange_bytes).fold(0, u64::saturating_add),
        cross_node_bytes: reports.iter().map(|r| r.cross_node_bytes).fold(0, u64::saturating_add),
        cross_node_bytes_flat: reports.iter().map(|r| r.cross_node_bytes_flat).fold(0, u64::saturating_add),
        exchange_seconds: reports.iter().map(|r| r.exchange_seconds).fold(0.0, f64::max),
    }
}
