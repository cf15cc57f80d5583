//! What the agent sends the coordinator, built in one place: acknowledgements (a refusal
//! with its [`JobError`]'s kind), `WorkerError`s, step reports from a data-parallel or a
//! pipeline step, heartbeats' clock; and rank 0's `metrics.jsonl`, the records of the
//! steps as `flotilla train` writes them.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_model::train::{StepRecord, Trainer};
use flotilla_proto::v1::worker_message::Body as Report;
use flotilla_proto::v1::{Ack, LayerLoad, StepReport, WorkerError as WorkerErrorMsg, WorkerMessage};

use super::error::JobError;
use super::plan::JobPlan;
use crate::dp::TimedStep;
use crate::pipeline::{PipelineStep, PipelineTrainer};

pub(super) fn message(body: Report) -> WorkerMessage {
    WorkerMessage { body: Some(body) }
}

/// Accepts command `command_id`.
pub(super) fn ack(command_id: u64) -> WorkerMessage {
    message(Report::Ack(Ack { command_id, ..Ack::default() }))
}

/// Refuses command `command_id`: the error's text, its kind, and for a checkpoint that
/// cannot be loaded its directory.
pub(super) fn refuse(command_id: u64, error: &JobError) -> WorkerMessage {
    message(Report::Ack(Ack {
        command_id,
        error: error.to_string(),
        bad_checkpoint: error.bad_checkpoint().to_string(),
        kind: error.kind().into(),
    }))
}

/// Job `job_id`'s assignment of `epoch` failed at `step` (0: before its first step).
pub(super) fn worker_error(job_id: &str, epoch: u64, step: u64, error: &JobError) -> WorkerMessage {
    message(Report::Error(WorkerErrorMsg {
        job_id: job_id.to_string(),
        step,
        message: error.to_string(),
        kind: error.kind().into(),
        epoch,
    }))
}

pub(super) fn dp_step_report(
    plan: &JobPlan,
    trainer: &Trainer,
    timed: &TimedStep,
) -> (StepRecord, WorkerMessage) {
    let tokens = (trainer.config.batch_size * trainer.config.seq_len) as u64;
    let report = step_report(plan, &timed.record, tokens, timed.compute, timed.communication);
    (timed.record.clone(), message(Report::StepReport(report)))
}

pub(super) fn pipeline_step_report(
    plan: &JobPlan,
    trainer: &PipelineTrainer,
    done: PipelineStep,
) -> (StepRecord, WorkerMessage) {
    let tokens = (trainer.config.batch_size * trainer.config.seq_len) as u64;
    let mut report = step_report(
        plan,
        &done.record,
        tokens,
        Duration::from_secs_f64(done.compute_seconds),
        Duration::from_secs_f64(done.communication_seconds),
    );
    report.executed = done.executed;
    report.bubble_fraction = done.bubble_fraction;
    report.exchange_bytes = done.exchange.bytes_sent;
    report.cross_node_bytes = done.exchange.cross_node_bytes;
    report.cross_node_bytes_flat = done.exchange.cross_node_bytes_flat;
    report.exchange_seconds = done.exchange.wait_seconds;
    (done.record, message(Report::StepReport(report)))
}

fn step_report(
    plan: &JobPlan,
    r: &StepRecord,
    tokens: u64,
    compute: Duration,
    communication: Duration,
) -> StepReport {
    StepReport {
        job_id: plan.job_id.clone(),
        epoch: plan.epoch,
        step: r.step,
        loss: r.loss,
        main_ce: r.main_ce,
        mtp_ce: r.mtp_ce.clone(),
        balance_loss: r.balance_loss,
        lr: r.lr,
        grad_norm: r.grad_norm,
        tokens,
        compute_seconds: compute.as_secs_f64(),
        communication_seconds: communication.as_secs_f64(),
        expert_loads: r
            .expert_loads
            .iter()
            .map(|l| LayerLoad {
                layer: u32::try_from(l.layer).unwrap_or(u32::MAX),
                tokens: l.tokens.clone(),
            })
            .collect(),
        ..StepReport::default()
    }
}

/// Rank 0's `metrics.jsonl`: one `StepRecord` per line, as `flotilla train` writes it,
/// flushed per step so that a crash leaves whole lines.
pub(super) struct Metrics {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl Metrics {
    pub(super) fn create(dir: &Path) -> Result<Metrics, JobError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| JobError::Data(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join("metrics.jsonl");
        let file = std::fs::File::create(&path)
            .map_err(|e| JobError::Data(format!("creating {}: {e}", path.display())))?;
        Ok(Metrics { path, file: std::io::BufWriter::new(file) })
    }

    /// Continues a resumed run's file: keeps the records of steps up to `step` (the
    /// checkpoint's), drops later ones (the lost steps, run again) and any line that is
    /// not a whole record (a torn last line), and appends after them. The kept lines go to
    /// a temporary file renamed over the old one, so a crash leaves one or the other.
    pub(super) fn resume(dir: &Path, step: u64) -> Result<Metrics, JobError> {
        use std::io::Write;
        std::fs::create_dir_all(dir)
            .map_err(|e| JobError::Data(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join("metrics.jsonl");
        let old = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(JobError::Data(format!("reading {}: {e}", path.display()))),
        };
        let mut kept = Vec::with_capacity(old.len());
        for line in old.split(|&b| b == b'\n') {
            if serde_json::from_slice::<StepRecord>(line).is_ok_and(|r| r.step <= step) {
                kept.extend_from_slice(line);
                kept.push(b'\n');
            }
        }
        let tmp = dir.join("metrics.jsonl.tmp");
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&kept).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        written.map_err(|e| JobError::Data(format!("rewriting {}: {e}", path.display())))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| JobError::Data(format!("opening {}: {e}", path.display())))?;
        Ok(Metrics { path, file: std::io::BufWriter::new(file) })
    }

    pub(super) fn append(&mut self, record: &StepRecord) -> Result<(), JobError> {
        use std::io::Write;
        let written = serde_json::to_writer(&mut self.file, record)
            .map_err(std::io::Error::from)
            .and_then(|()| self.file.write_all(b"\n"))
            .and_then(|()| self.file.flush());
        written.map_err(|e| JobError::Data(format!("writing {}: {e}", self.path.display())))
    }
}

pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
