//! The job task: one assignment from start to end. It builds the trainer (the whole model
//! data-parallel, or this rank's pipeline stages), restores the checkpoint it resumes
//! from, rendezvouses the data plane, acknowledges, then runs the `RunSteps` it is handed
//! and reports each step; rank 0 writes `metrics.jsonl` and the final weights.
//!
//! Invariants: the task owns the trainer, the communicator and its checkpoint writer, and
//! joins the writer on every way out; a failure before the first step refuses the
//! assignment (an `Ack` of the [`JobError`]'s kind), one after it is a `WorkerError` at
//! its step; an abort shows up as the communicator's error and is reported as nothing.

use std::sync::Arc;
use std::time::Duration;

use flotilla_model::checkpoint::WeightDtype;
use flotilla_model::train::{TrainConfig, Trainer};
use flotilla_proto::v1::worker_message::Body as Report;
use flotilla_proto::v1::{JobFinished, RunSteps, WorkerMessage};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::checkpoint::Writer;
use super::data_plane::{DataPlane, Rendezvous};
use super::error::JobError;
use super::plan::JobPlan;
use super::report::{Metrics, ack, dp_step_report, message, pipeline_step_report, refuse, worker_error};
use super::session::JobEvent;
use crate::comm::Communicator;
use crate::dp;
use crate::pipeline::PipelineTrainer;

/// A job task: owns the trainer and the communicator from assignment to end.
pub(super) struct Job<D: DataPlane> {
    pub(super) plan: JobPlan,
    /// The assignment's command id, acknowledged once the data plane is up.
    pub(super) ack_id: u64,
    /// What makes the job's communicator.
    pub(super) data_plane: Arc<D>,
    /// Spent by the rendezvous; the session binds the same address again when the task ends.
    pub(super) listener: Option<D::Listener>,
    pub(super) commands: mpsc::Receiver<(u64, RunSteps)>,
    pub(super) cancel: CancellationToken,
    pub(super) events: mpsc::UnboundedSender<JobEvent>,
    pub(super) rendezvous_timeout: Duration,
    pub(super) memory_bytes: Option<u64>,
    /// The checkpoint write in flight, if any: at most one per job, joined before the next
    /// starts and on every way out of the job.
    pub(super) writer: Option<Writer>,
}

/// What a job trains with: the whole model data-parallel, or this rank's pipeline stages.
pub(super) enum Training {
    DataParallel(Box<Trainer>),
    Pipeline(Box<PipelineTrainer>),
}

impl Training {
    fn step(&self) -> u64 {
        match self {
            Training::DataParallel(t) => t.step(),
            Training::Pipeline(t) => t.step(),
        }
    }

    pub(super) fn config(&self) -> &TrainConfig {
        match self {
            Training::DataParallel(t) => &t.config,
            Training::Pipeline(t) => &t.config,
        }
    }

    fn steps(&self) -> u64 {
        self.config().steps
    }
}

/// Why a job task stopped early.
enum Stop {
    /// Aborted by the coordinator or by the session's end: nothing more to report.
    Aborted,
    /// Failed at `step` (0: before the first step, which refuses the assignment with an
    /// `Ack` of the error's kind; a checkpoint that cannot be loaded also names its
    /// directory there): reported as a `WorkerError` at this step.
    Failed { step: u64, error: JobError },
}

impl<D: DataPlane> Job<D> {
    pub(super) fn send(&self, msg: WorkerMessage) {
        // The session outlives its job tasks; if it is gone, so is the stream.
        let _ = self.events.send(JobEvent::Send(msg));
    }

    pub(super) async fn run(mut self) {
        let job_id = self.plan.job_id.clone();
        let ack_id = self.ack_id;
        let (mut trainer, comm, metrics) = match self.start().await {
            Ok(started) => started,
            Err(Stop::Aborted) => {
                self.send(refuse(ack_id, &JobError::State("aborted before the job started".into())));
                return;
            }
            Err(Stop::Failed { error, .. }) => {
                if let JobError::Checkpoint { dir, reason } = &error {
                    warn!(job = %job_id, checkpoint = %dir, %reason, "assignment refused: bad checkpoint");
                }
                self.send(refuse(ack_id, &error));
                self.send(worker_error(&job_id, self.plan.epoch, 0, &error));
                return;
            }
        };
        self.send(ack(ack_id));
        let mut metrics = metrics;
        let served = self.serve(&mut trainer, &comm, &mut metrics).await;
        if let Err(Stop::Failed { error, .. }) = &served {
            // Peers learn of the failure before this rank waits for its checkpoint write.
            comm.abort(&format!("rank {} failed: {error}", self.plan.rank));
        }
        // Every way out joins the checkpoint writer, so that its report comes before the
        // job's last word (`JobFinished` or `WorkerError`) and nothing outlives the task.
        self.join_writer();
        match served {
            Ok(()) => {
                // Flush and say goodbye first, so that the task ends right after
                // `JobFinished` and the next assignment finds the worker free; unless told
                // to stop meanwhile (then dropping the communicator cuts the links).
                tokio::select! {
                    _ = self.cancel.cancelled() => {}
                    result = self.data_plane.shutdown(comm) => if let Err(err) = result {
                        debug!(job = %job_id, %err, "data-plane shutdown");
                    },
                }
                let steps = trainer.step();
                self.send(message(Report::Finished(JobFinished {
                    job_id: job_id.clone(),
                    steps,
                    epoch: self.plan.epoch,
                })));
                info!(job = %job_id, steps, "job finished");
            }
            Err(Stop::Aborted) => info!(job = %job_id, "job aborted"),
            Err(Stop::Failed { step, error }) => {
                warn!(job = %job_id, step, %error, "job failed");
                self.send(worker_error(&job_id, self.plan.epoch, step, &error));
            }
        }
    }

    /// Builds the trainer, rendezvouses the data plane and opens the metrics file.
    async fn start(&mut self) -> Result<(Training, D::Comm, Option<Metrics>), Stop> {
        let failed = |error: JobError| Stop::Failed { step: 0, error };
        // A resumed run restores its checkpoint, which holds the state `init_from` started
        // from and every step since: the HF checkpoint is not read then.
        let mut config = self.plan.config.clone();
        if self.plan.resume.is_some() {
            config.init_from = None;
        }
        // Not raced against the abort: the build cannot be interrupted, and a task left
        // to finish it would be nobody's.
        let trainer = match &self.plan.pipeline {
            None => dp::run_blocking(|| Trainer::new(config.clone(), &self.plan.model))
                .map(|t| Training::DataParallel(Box::new(t)))
                .map_err(|e| failed(JobError::Data(format!("building the trainer: {e}"))))?,
            Some(plan) => {
                let trainer =
                    dp::run_blocking(|| PipelineTrainer::new(config.clone(), &self.plan.model, plan.clone()))
                        .map_err(|e| {
                            failed(JobError::Data(format!("building this rank's pipeline stages: {e}")))
                        })?;
                check_capacity(&trainer, self.memory_bytes).map_err(failed)?;
                Training::Pipeline(Box::new(trainer))
            }
        };
        let mut trainer = trainer;
        let init = match &trainer {
            Training::DataParallel(t) => t.init.as_ref(),
            Training::Pipeline(t) => t.init.as_ref(),
        };
        if let (Some(report), Some(dir)) = (init, &config.init_from) {
            info!(
                job = %self.plan.job_id,
                checkpoint = %dir.display(),
                loaded = report.loaded,
                seeded = report.seeded.len(),
                "weights loaded from the HF checkpoint (init_from)"
            );
        }
        if let Some(resume) = &self.plan.resume {
            dp::run_blocking(|| trainer.restore(resume)).map_err(failed)?;
            info!(job = %self.plan.job_id, checkpoint = %resume.dir, step = resume.step, "checkpoint restored");
        }
        if self.cancel.is_cancelled() {
            return Err(Stop::Aborted);
        }
        let listener = self
            .listener
            .take()
            .ok_or_else(|| failed(JobError::Internal("the data-plane listener was spent".into())))?;
        let rendezvous = Rendezvous {
            rank: self.plan.rank,
            peers: &self.plan.peers,
            secret: &self.plan.secret,
            limits: self.plan.limits,
            session: self.plan.session,
            timeout: self.rendezvous_timeout,
        };
        let comm = tokio::select! {
            _ = self.cancel.cancelled() => return Err(Stop::Aborted),
            comm = self.data_plane.connect(listener, rendezvous) => {
                comm.map_err(|e| failed(JobError::Communication(format!("data-plane rendezvous: {e}"))))?
            }
        };
        let _ = self.events.send(JobEvent::DataPlane(self.data_plane.abort_handle(&comm)));
        let metrics = match (&self.plan.output_dir, self.plan.rank) {
            (Some(dir), 0) => Some(
                match &self.plan.resume {
                    Some(resume) => Metrics::resume(dir, resume.step),
                    None => Metrics::create(dir),
                }
                .map_err(failed)?,
            ),
            _ => None,
        };
        Ok((trainer, comm, metrics))
    }

    /// Runs `RunSteps` commands until the run's last step (`Ok`) or a stop.
    async fn serve(
        &mut self,
        trainer: &mut Training,
        comm: &D::Comm,
        metrics: &mut Option<Metrics>,
    ) -> Result<(), Stop> {
        let total = trainer.steps();
        while trainer.step() < total {
            let (id, run) = tokio::select! {
                _ = self.cancel.cancelled() => return Err(Stop::Aborted),
                command = self.commands.recv() => command.ok_or(Stop::Aborted)?,
            };
            let next = trainer.step() + 1;
            let last = run.first_step.checked_add(run.count).and_then(|end| end.checked_sub(1));
            if run.first_step != next || last.is_none_or(|last| last > total) {
                let refusal = format!(
                    "cannot run steps {}..{} (count {}): the next step is {next} and the run has {total}",
                    run.first_step,
                    run.first_step.saturating_add(run.count),
                    run.count
                );
                self.send(refuse(id, &JobError::State(refusal)));
                continue;
            }
            self.send(ack(id));
            for _ in 0..run.count {
                let step = trainer.step() + 1;
                let report = match trainer {
                    Training::DataParallel(trainer) => {
                        let timed = tokio::select! {
                            biased;
                            _ = self.cancel.cancelled() => return Err(Stop::Aborted),
                            timed = dp::data_parallel_step_timed(trainer, comm) => timed,
                        };
                        match timed {
                            Ok(timed) => dp_step_report(&self.plan, trainer, &timed),
                            // An abort shows up here as the communicator's error.
                            Err(_) if self.cancel.is_cancelled() => return Err(Stop::Aborted),
                            Err(err) => return Err(Stop::Failed { step, error: err.into() }),
                        }
                    }
                    Training::Pipeline(trainer) => {
                        // The whole step blocks this thread (the data plane's tasks and
                        // the session run elsewhere); an abort fails its next transfer.
                        let handle = tokio::runtime::Handle::current();
                        match dp::run_blocking(|| trainer.run_step(comm, &handle)) {
                            Ok(done) => pipeline_step_report(&self.plan, trainer, done),
                            Err(_) if self.cancel.is_cancelled() => return Err(Stop::Aborted),
                            Err(err) => return Err(Stop::Failed { step, error: err.into() }),
                        }
                    }
                };
                if let Some(m) = metrics.as_mut() {
                    m.append(&report.0).map_err(|error| Stop::Failed { step, error })?;
                }
                self.send(report.1);
                self.checkpoint(trainer, step);
            }
        }
        let step = trainer.step();
        match (trainer, &self.plan.output_dir) {
            (Training::DataParallel(trainer), Some(dir)) if self.plan.rank == 0 => {
                dp::run_blocking(|| trainer.save(dir, WeightDtype::F32)).map_err(|e| Stop::Failed {
                    step,
                    error: JobError::Data(format!("saving the weights: {e}")),
                })?;
            }
            (Training::Pipeline(trainer), Some(dir)) => {
                // Every rank sends the tensors it is first to hold; rank 0 writes them.
                let handle = tokio::runtime::Handle::current();
                dp::run_blocking(|| trainer.save(comm, &handle, dir, WeightDtype::F32)).map_err(|e| {
                    Stop::Failed { step, error: JobError::Data(format!("saving the weights: {e}")) }
                })?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Refuses an assignment whose stages and optimizer shard do not fit in `memory_bytes`
/// (the machine's available memory when `None`).
fn check_capacity(trainer: &PipelineTrainer, memory_bytes: Option<u64>) -> Result<(), JobError> {
    let needed = trainer.state_bytes();
    let (limit, what) = match memory_bytes {
        Some(limit) => (limit, "the worker's memory limit"),
        None => match available_memory() {
            Some(limit) => (limit, "the machine's available memory"),
            None => return Ok(()),
        },
    };
    if needed > limit {
        return Err(JobError::Capacity(format!(
            "this rank's stages {:?} need {:.1} MiB for weights, gradients and optimizer shard, above {what} of {:.1} MiB",
            trainer.model.stages(),
            needed as f64 / (1 << 20) as f64,
            limit as f64 / (1 << 20) as f64
        )));
    }
    Ok(())
}

/// `MemAvailable` from `/proc/meminfo` (Linux), in bytes.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
