//! The DeepSeek-V3 model as flotilla trains it (DeepSeek-V3 report §2; DESIGN §1.1).
//!
//! - [`config`]: [`ModelConfig`], with HF `DeepseekV3Config`'s field names, presets
//!   ([`Preset`]), loading from HF `config.json` and flotilla TOML, validation.
//! - [`params`]: parameter accounting by component, total and activated per token, with
//!   and without MTP ([`ParameterCounts`]).
//! - [`param`]: named parameters (HF names) with gradients, initialized per `(seed, name)`.
//! - [`checkpoint`]: weights in the HF DeepSeek-V3 layout (config.json + safetensors,
//!   one file or shards with `model.safetensors.index.json`; f32, BF16, F16 and DeepSeek's
//!   FP8 with 128×128 `weight_scale_inv`), read lazily from memory-mapped files
//!   ([`checkpoint::HfReader`]: a rank decodes only the tensors it holds, MTP optional)
//!   and written in shards by size as `save_pretrained` does.
//! - [`shard`]: layout-free training checkpoints: each rank's shard of FP32 values and
//!   BF16 AdamW moments as pieces of globally named tensors, checksummed, readable under
//!   any other layout ([`shard::CheckpointReader`]).
//! - [`train`]: the run configuration (TOML), AdamW with BF16 moments, the step loop and
//!   its metrics records, saving in the HF layout.
//! - [`data`]: byte tokenizer, the synthetic corpus, batches drawn from `(seed, step)`.
//! - [`embedding`], [`linear`], [`ffn`]: layers, each with forward and a backward split into B (input
//!   gradient) and W (weight gradient), generic over [`Real`] (f32, f64).
//! - [`moe`]: the DeepSeekMoE layer: sigmoid gate with group-limited top-k on
//!   bias-corrected scores, shared + routed SwiGLU experts on a grouped layout, the
//!   sequence-wise balance loss, and auxiliary-loss-free bias updates; routed experts
//!   sharded over an expert-parallel group, tokens moved by dispatch and combine.
//! - [`expert_parallel`]: the seam to the worker's transport ([`ExpertExchange`],
//!   [`LocalExchange`] for a group of one), the expert shards ([`ExpertShard`]) and the
//!   byte framing of dispatch/combine messages.
//! - [`norm`]: the RMSNorm layer (named weight, forward saving rstd, B and W backward).
//! - [`mla`]: Multi-head Latent Attention (low-rank or plain queries, decoupled RoPE with
//!   YaRN, causal attention core), with optional recomputation of the RMSNorms and
//!   up-projections in backward.
//! - [`block`]: the transformer block `model.layers.{i}` (pre-norm MLA and a dense or MoE
//!   FFN, residual adds), the unit a pipeline stage holds, with a B/W-split backward.
//! - [`mtp`]: Multi-Token Prediction modules (`enorm`/`hnorm`, `eh_proj`, a block,
//!   `shared_head.norm`), sharing the main model's embedding and head.
//! - [`precision`]: the linear layers' GEMM precision ([`Precision`]: f32, BF16, or
//!   DeepSeek-V3's block-scaled FP8 recipe for Fprop, Dgrad and Wgrad), and the
//!   activations kept for their backward ([`precision::CachedActivation`], FP8 under fp8).
//! - [`model`]: the whole model ([`Model`]): embedding, blocks, final norm, head (or tied),
//!   MTP modules; the loss (main CE + λ·mean MTP CE + balance losses, [`LossConfig`]) with
//!   full forward/backward accumulating gradients, statistics per step ([`StepStats`]),
//!   logits for scoring, and the bias update.
//! - [`paths`]: path confinement ([`paths::AllowedRoots`]), the one rule for the files a
//!   job may touch, applied by the coordinator at submission and by every worker.
//!
//! API boundary: this crate describes and computes the model on plain buffers through
//! the device seam of `flotilla-kernels` ([`flotilla_kernels::backend`]): every layer holds
//! a [`flotilla_kernels::backend::DeviceBackend`] (the CPU's unless
//! [`Model::set_backend`] or [`pipeline::RankModel::set_backend`] chose another) and calls
//! its ops, never an op's free function, so no layer knows which backend runs. A
//! parameter's value and gradient are [`flotilla_kernels::backend::Buffer`]s, placed on the
//! backend's device by `set_backend` and read on the host only through their explicit host
//! views ([`param`]). It knows
//! nothing of processes or networking, so the coordinator can use its config and
//! accounting for placement, and workers its layers.

pub mod block;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod embedding;
pub mod expert_parallel;
pub mod ffn;
pub mod generate;
pub mod linear;
pub mod mla;
pub mod model;
pub mod moe;
pub mod mtp;
pub mod norm;
pub mod packing;
pub mod param;
pub mod params;
pub mod paths;
pub mod pipeline;
pub mod precision;
pub mod shard;
pub mod train;

pub use block::Block;
pub use config::{ConfigError, Fp8Quantization, HfConfig, ModelConfig, Preset};
pub use expert_parallel::{ExchangeKey, ExchangePhase, ExpertExchange, ExpertShard, LocalExchange};
pub use model::{KvCache, LossConfig, Model, StepStats};
pub use mtp::MtpModule;
pub use params::{Breakdown, ParameterCounts};
pub use precision::Precision;

use flotilla_kernels::KernelError;

/// The element types layers compute in: f32 for training, f64 for gradient checks.
pub use flotilla_kernels::gemm::GemmFloat as Real;

/// What can go wrong building or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A kernel refused its inputs.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A backend could not hold or copy a parameter.
    #[error("`{tensor}`: {source}")]
    Backend {
        /// The parameter, by its HF name.
        tensor: String,
        /// What the backend said.
        source: flotilla_kernels::backend::BackendError,
    },
    /// A named tensor or buffer has the wrong size or content.
    #[error("`{tensor}`: {detail}")]
    Tensor {
        /// The parameter or activation, by its HF name where it has one.
        tensor: String,
        /// What is wrong.
        detail: String,
    },
}

/// Checks that the `what` buffer of the layer owning `tensor` holds `expected` elements.
pub(crate) fn check_len(tensor: &str, what: &str, expected: usize, actual: usize) -> Result<(), ModelError> {
    if expected != actual {
        return Err(ModelError::Tensor {
            tensor: tensor.to_string(),
            detail: format!("{what} has {actual} elements, expected {expected}"),
        });
    }
    Ok(())
}
