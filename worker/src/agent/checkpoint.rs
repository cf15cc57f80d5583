//! Checkpoints on the worker's side: restoring the committed checkpoint an assignment
//! resumes from (every shard's size and checksum checked, all of this rank's state or
//! none), and writing this rank's shard after a due step on a `checkpoint-writer` thread
//! (temporary file, fsync, rename, fsync of the directory) while training goes on.
//!
//! Invariants: at most one write is in flight per job, and the job joins it on every way
//! out, so a rank's last `CheckpointShard` precedes its `JobFinished` or `WorkerError`; a
//! shard is reported once durable, never before; a checkpoint already committed is never
//! written again.

use std::path::Path;
use std::time::Duration;

use flotilla_model::shard::{self, CheckpointReader, Snapshot, step_dir, write_shard};
use flotilla_proto::v1::worker_message::Body as Report;
use flotilla_proto::v1::{CheckpointShard, ResumeFrom};
use tracing::{info, warn};

use super::data_plane::DataPlane;
use super::error::JobError;
use super::job::{Job, Training};
use super::report::message;
use super::session::JobEvent;
use crate::dp;

/// The file whose presence in a checkpoint's directory is its commit (the coordinator's
/// `checkpoint::MANIFEST_FILE`; the worker does not depend on the coordinator crate).
pub(super) const COMMITTED_MANIFEST: &str = "manifest.json";

/// A background write of this rank's checkpoint shard.
pub(super) struct Writer {
    step: u64,
    thread: std::thread::JoinHandle<()>,
}

impl Training {
    /// This rank's shard of a checkpoint of the current state (a copy).
    pub(super) fn snapshot(&self, rank: usize, world: usize) -> Snapshot {
        match self {
            Training::DataParallel(t) => t.snapshot(rank, world),
            Training::Pipeline(t) => t.snapshot(),
        }
    }

    /// Loads the committed checkpoint `resume`: every shard's size and checksum checked,
    /// the model and seed checked, then the state this rank holds (all or nothing).
    /// Blocking. The error is a [`JobError::Checkpoint`] naming the checkpoint's directory,
    /// and the shard or the tensor.
    pub(super) fn restore(&mut self, resume: &ResumeFrom) -> Result<(), JobError> {
        let shards: Vec<shard::ShardFile> = resume
            .shards
            .iter()
            .map(|s| shard::ShardFile { file: s.file.clone(), bytes: s.bytes, crc32: s.crc32 })
            .collect();
        let restored = (|| {
            let reader =
                CheckpointReader::open(Path::new(&resume.dir), &shards).map_err(|e| e.to_string())?;
            if reader.step() != resume.step {
                return Err(format!("its shards hold step {}, not step {}", reader.step(), resume.step));
            }
            match self {
                Training::DataParallel(t) => t.restore(&reader).map_err(|e| e.to_string()),
                Training::Pipeline(t) => t.restore(&reader),
            }
        })();
        restored.map_err(|e| JobError::Checkpoint {
            dir: resume.dir.clone(),
            reason: format!("restoring checkpoint {} (step {}): {e}", resume.dir, resume.step),
        })
    }
}

impl<D: DataPlane> Job<D> {
    /// After step `step`: if a checkpoint is due, waits for the previous write (if still
    /// running: that wait is part of this step), copies this rank's shard of the state on
    /// this thread (the step's only checkpoint cost, `snapshot_seconds`) and hands it to a
    /// `checkpoint-writer` thread, which writes it under `step_dir(root, step)` and reports
    /// a `CheckpointShard` (with `error` set if the write failed: the job goes on, and the
    /// coordinator does not commit that checkpoint).
    pub(super) fn checkpoint(&mut self, trainer: &Training, step: u64) {
        let Some(root) = self.plan.checkpoint_root.clone() else { return };
        if !trainer.config().checkpoint.due(step) {
            return;
        }
        // Committed already (this run passes the step again after resuming from an older
        // checkpoint): training is deterministic, so it holds exactly this state, and
        // rewriting its shards under its manifest would only risk it.
        if flotilla_model::shard::step_dir(&root, step).join(COMMITTED_MANIFEST).exists() {
            return;
        }
        let waited = self.join_writer();
        if waited > Duration::from_millis(10) {
            info!(
                job = %self.plan.job_id,
                step,
                waited_s = waited.as_secs_f64(),
                "waited for the previous checkpoint write"
            );
        }
        let started = std::time::Instant::now();
        let (rank, world) = (self.plan.rank, self.plan.world);
        let snapshot = dp::run_blocking(|| trainer.snapshot(rank, world));
        let snapshot_seconds = started.elapsed().as_secs_f64();
        let events = self.events.clone();
        let (job_id, epoch) = (self.plan.job_id.clone(), self.plan.epoch);
        let spawned = std::thread::Builder::new().name("checkpoint-writer".into()).spawn(move || {
            let started = std::time::Instant::now();
            let written = write_checkpoint(&root, step, &snapshot);
            drop(snapshot);
            let mut report = CheckpointShard {
                job_id,
                epoch,
                step,
                snapshot_seconds,
                write_seconds: started.elapsed().as_secs_f64(),
                ..CheckpointShard::default()
            };
            match written {
                Ok(file) => {
                    report.file = file.file;
                    report.bytes = file.bytes;
                    report.crc32 = file.crc32;
                }
                Err(error) => {
                    warn!(job = %report.job_id, step, %error, "checkpoint shard not written");
                    report.error = error.to_string();
                }
            }
            // The session outlives its job tasks; if it is gone, so is the stream.
            let _ = events.send(JobEvent::Send(message(Report::CheckpointShard(report))));
        });
        match spawned {
            Ok(thread) => self.writer = Some(Writer { step, thread }),
            Err(err) => self.send(message(Report::CheckpointShard(CheckpointShard {
                job_id: self.plan.job_id.clone(),
                epoch: self.plan.epoch,
                step,
                snapshot_seconds,
                error: format!("starting the checkpoint writer: {err}"),
                ..CheckpointShard::default()
            }))),
        }
    }

    /// Waits for the checkpoint write in flight, if any; returns how long it waited. A
    /// writer that panicked has not reported: its failure is reported for it.
    pub(super) fn join_writer(&mut self) -> Duration {
        let Some(writer) = self.writer.take() else { return Duration::ZERO };
        let started = std::time::Instant::now();
        if dp::run_blocking(|| writer.thread.join()).is_err() {
            self.send(message(Report::CheckpointShard(CheckpointShard {
                job_id: self.plan.job_id.clone(),
                epoch: self.plan.epoch,
                step: writer.step,
                error: "the checkpoint writer panicked".into(),
                ..CheckpointShard::default()
            })));
        }
        started.elapsed()
    }
}

/// Writes `snapshot` as this rank's shard of the checkpoint at `step` under `root`.
fn write_checkpoint(root: &Path, step: u64, snapshot: &Snapshot) -> Result<shard::ShardFile, JobError> {
    let dir = step_dir(root, step);
    std::fs::create_dir_all(&dir).map_err(|e| JobError::Data(format!("creating {}: {e}", dir.display())))?;
    write_shard(&dir, snapshot)
        .map_err(|e| JobError::Data(format!("writing a shard to {}: {e}", dir.display())))
}
