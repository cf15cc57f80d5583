//! Why a job failed or a command was refused, typed by what the coordinator acts on.
//!
//! Every failure the agent reports (an `Ack`'s `error`, a `WorkerError`'s `message`) is a
//! [`JobError`]: its variant travels as the proto's [`FailureKind`] beside the text, so the
//! coordinator decides on the kind (a [`JobError::Checkpoint`] makes it fall back to the
//! checkpoint before) and never parses the text. The text is the one people read: it names
//! the field, file, tensor or peer at fault, and is exactly the message's `Display`.

use flotilla_proto::v1::FailureKind;

use crate::comm::CommError;
use crate::dp::DpError;
use crate::pipeline::PipelineError;

/// A failure of a job or a refusal of a command, as reported to the coordinator.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// The assignment cannot run as given: ranks, peers, the pipeline layout, stages or
    /// stream, or the run's configuration.
    #[error("{0}")]
    Assignment(String),
    /// The committed checkpoint to resume from, in `dir`, cannot be loaded.
    #[error("{reason}")]
    Checkpoint {
        /// The checkpoint's directory, as the assignment named it.
        dir: String,
        /// What is wrong with it, naming the directory and the shard or tensor.
        reason: String,
    },
    /// The run's inputs or outputs: datasets, tokenizer, initial weights, `metrics.jsonl`,
    /// the saved weights.
    #[error("{0}")]
    Data(String),
    /// A step's compute: a model error, a non-finite loss, ranks that disagree.
    #[error("{0}")]
    Compute(String),
    /// The data plane: a peer's address, the rendezvous, a transfer or a collective.
    #[error("{0}")]
    Communication(String),
    /// This rank's state does not fit the memory the worker may use.
    #[error("{0}")]
    Capacity(String),
    /// The command does not fit what the worker is doing (another job runs or is stopping,
    /// steps out of order, a command without a body).
    #[error("{0}")]
    State(String),
    /// The worker itself failed (its job task panicked).
    #[error("{0}")]
    Internal(String),
}

impl JobError {
    /// The kind the coordinator decides on.
    pub fn kind(&self) -> FailureKind {
        match self {
            JobError::Assignment(_) => FailureKind::Assignment,
            JobError::Checkpoint { .. } => FailureKind::Checkpoint,
            JobError::Data(_) => FailureKind::Data,
            JobError::Compute(_) => FailureKind::Compute,
            JobError::Communication(_) => FailureKind::Communication,
            JobError::Capacity(_) => FailureKind::Capacity,
            JobError::State(_) => FailureKind::State,
            JobError::Internal(_) => FailureKind::Internal,
        }
    }

    /// The directory of the checkpoint that cannot be loaded (`Ack.bad_checkpoint`);
    /// empty for every other kind.
    pub fn bad_checkpoint(&self) -> &str {
        match self {
            JobError::Checkpoint { dir, .. } => dir,
            _ => "",
        }
    }
}

impl From<DpError> for JobError {
    fn from(err: DpError) -> Self {
        match err {
            DpError::Comm { .. } => JobError::Communication(err.to_string()),
            DpError::Train { .. } | DpError::Mismatch { .. } => JobError::Compute(err.to_string()),
        }
    }
}

impl From<PipelineError> for JobError {
    fn from(err: PipelineError) -> Self {
        match err {
            PipelineError::Comm { .. } => JobError::Communication(err.to_string()),
            // The stream needs a tensor it never produced: the compiled stream is at fault.
            PipelineError::Stream { .. } => JobError::Assignment(err.to_string()),
            PipelineError::Model { .. } | PipelineError::Step { .. } => JobError::Compute(err.to_string()),
        }
    }
}

impl From<CommError> for JobError {
    fn from(err: CommError) -> Self {
        JobError::Communication(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_and_the_directory_follow_the_variant_and_the_text_is_unchanged() {
        let bad = JobError::Checkpoint {
            dir: "/ckpt/step-00000004".into(),
            reason: "shard rank-1 truncated".into(),
        };
        assert_eq!(bad.kind(), FailureKind::Checkpoint);
        assert_eq!(bad.bad_checkpoint(), "/ckpt/step-00000004");
        assert_eq!(bad.to_string(), "shard rank-1 truncated");
        let refused = JobError::Assignment("dp_rank 3 is not below dp_size 2".into());
        assert_eq!(refused.kind(), FailureKind::Assignment);
        assert_eq!(refused.bad_checkpoint(), "");
        assert_eq!(refused.to_string(), "dp_rank 3 is not below dp_size 2");
        let lost = JobError::from(CommError::PeerClosed { peer: 1 });
        assert_eq!(lost.kind(), FailureKind::Communication);
        assert_eq!(lost.to_string(), "rank 1 shut down its connection");
    }
}
