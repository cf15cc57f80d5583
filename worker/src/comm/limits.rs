//! How much a data-plane peer may make this rank hold: [`DataPlaneLimits`], the largest
//! frame a link accepts and the most bytes it buffers for tags nobody receives yet.
//!
//! [`DataPlaneLimits::for_job`] is the one place these are computed from a job. It is an
//! upper bound, not an exact figure: the largest message a step can send is bounded by the
//! larger of
//!
//! - every parameter of the model as `f64` plus 1 KiB per tensor (a pipeline rank's
//!   weights shipped to rank 0 for the final save, a ZeRO-1 part, a ring chunk of the
//!   data-parallel gradients: each is a subset of the parameters, in `f32`), and
//! - the step's tokens (`batch_size × seq_len`) times `hidden_size` as `f64`, times the
//!   routed experts per token plus the main stream and the MTP depths, plus 64 bytes a row
//!   (a micro-batch's activations or gradients between stages; an MoE dispatch or combine
//!   message, whose rows are at most the tokens times the experts each chooses, with their
//!   headers and a node message's row indices),
//!
//! with a floor of [`DataPlaneLimits::FLOOR`] (64 MiB frames) for small models, where
//! exactness buys nothing. A peer may have several messages in flight before their
//! receives are posted (a pipeline stage runs micro-batches ahead), so the buffer bound is
//! four frames' worth.

use flotilla_model::ModelConfig;
use flotilla_model::ParameterCounts;
use flotilla_model::train::TrainConfig;

/// What one link may make this rank hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataPlaneLimits {
    /// The largest payload a frame may announce; a larger one fails the link before
    /// anything is allocated, and `send` refuses a larger message up front.
    pub max_frame_bytes: u64,
    /// The most payload bytes one peer's link may hold for receives not yet posted; a
    /// frame that would exceed it fails the link with
    /// [`super::CommError::BufferOverflow`].
    pub max_buffered_bytes: u64,
}

impl DataPlaneLimits {
    /// The bounds for small jobs (and [`Default`]): 64 MiB frames, 256 MiB buffered.
    pub const FLOOR: DataPlaneLimits =
        DataPlaneLimits { max_frame_bytes: 64 << 20, max_buffered_bytes: 256 << 20 };

    /// The bounds for a job training `model` with `train` (module documentation: an upper
    /// bound on the largest message a step sends, at least [`DataPlaneLimits::FLOOR`]).
    pub fn for_job(model: &ModelConfig, train: &TrainConfig) -> DataPlaneLimits {
        let counts = ParameterCounts::of(model);
        let tensors = tensor_count(model);
        let params = counts.total_with_mtp().saturating_mul(8).saturating_add(tensors.saturating_mul(1024));
        let tokens = (train.batch_size as u64).saturating_mul(train.seq_len as u64);
        let streams = (model.num_experts_per_tok as u64)
            .saturating_add(1)
            .saturating_add(model.num_nextn_predict_layers as u64);
        let row = (model.hidden_size as u64).saturating_mul(8).saturating_add(64);
        let activations = tokens.saturating_mul(streams).saturating_mul(row);
        let frame = params.max(activations).max(Self::FLOOR.max_frame_bytes);
        DataPlaneLimits {
            max_frame_bytes: frame,
            max_buffered_bytes: frame.saturating_mul(4).max(Self::FLOOR.max_buffered_bytes),
        }
    }
}

impl Default for DataPlaneLimits {
    fn default() -> Self {
        DataPlaneLimits::FLOOR
    }
}

/// An upper bound on the model's parameter tensors (for the per-tensor framing of a save
/// message): a generous count per layer and per MTP module, plus the embedding, norm and
/// head.
fn tensor_count(model: &ModelConfig) -> u64 {
    const PER_LAYER: u64 = 64;
    let experts = model.n_routed_experts as u64 * 3;
    let layers = (model.num_hidden_layers as u64).saturating_add(model.num_nextn_predict_layers as u64);
    layers.saturating_mul(PER_LAYER.saturating_add(experts)).saturating_add(8)
}
