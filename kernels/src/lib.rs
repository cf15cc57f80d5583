//! flotilla's numerics, on plain buffers with explicit shapes and no knowledge of
//! networking, processes or the training loop.
//!
//! - [`fp8`]: the E4M3 and E5M2 formats, bit-exact with ml_dtypes, scalar and bulk.
//! - [`quant`]: fine-grained FP8 quantization (1×128 activation tiles, 128×128 weight
//!   blocks, 128×1 tiles for Wgrad) with DeepGEMM's scale layouts.
//! - [`gemm`]: dense f32 and BF16 GEMMs over strided views, the block-scaled FP8 GEMM
//!   (exact or with the H800's limited accumulator emulated) and its grouped MoE form.
//! - [`rope`]: rotary position embedding on MLA's decoupled rope dims (DeepSeek's
//!   interleaved pairs, YaRN), forward and backward in place over strided head vectors.
//! - [`attention`]: the causal MLA attention core (separate qk and v head dims), forward
//!   saving only the log-sum-exp, and backward recomputing the probabilities.
//! - [`norm`]: RMSNorm over rows: forward saving the per-row rstd, input-gradient (B) and
//!   accumulating weight-gradient (W) backward, neither needing the output.
//! - [`activation`]: SwiGLU (`silu(gate) · up`) forward and backward, numerically stable silu.
//! - [`loss`]: softmax cross-entropy over `[rows, vocab]` logits with u32 targets, backward
//!   out of place, in place over the logits, or fused with the forward.
//! - [`optim`]: AdamW with FP32 master weights and BF16 moments, global-norm clipping and
//!   the warm-up / constant / cosine learning-rate schedule.
//! - [`backend`]: the device seam, the one interface the model calls its ops through:
//!   the [`backend::Backend`] trait, the CPU reference backend and, with the `cuda`
//!   feature, a CUDA backend that has no kernels yet.
//! - [`metrics`]: the error measures numerics are judged by (DeepGEMM's `calc_diff`, …).
//! - [`experiments`]: reproductions of numerical findings of the DeepSeek-V3 report.
//!
//! Invariant: no function here panics or reads out of bounds on a caller's bad shapes or
//! buffer lengths; each returns a [`KernelError`] naming the tensor at fault.

pub mod activation;
pub mod attention;
pub mod backend;
pub mod experiments;
pub mod fp8;
pub mod gemm;
pub mod loss;
pub mod metrics;
pub mod norm;
pub mod optim;
pub mod quant;
pub mod rope;

/// Checks that a buffer named `tensor` holds exactly the `rows × cols` elements of its
/// shape; a product that overflows `usize` is an invalid shape, not a wrap-around.
pub(crate) fn check_matrix_len(
    tensor: &'static str,
    rows: usize,
    cols: usize,
    len: usize,
) -> Result<(), KernelError> {
    let expected = rows.checked_mul(cols).ok_or_else(|| KernelError::InvalidShape {
        tensor,
        detail: format!("{rows} × {cols} overflows usize"),
    })?;
    if len != expected {
        return Err(KernelError::LengthMismatch { tensor, expected, actual: len });
    }
    Ok(())
}

/// What can go wrong when a kernel is handed its inputs.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum KernelError {
    /// A buffer's length does not match the shape it is said to hold.
    #[error("`{tensor}` has {actual} elements, expected {expected}")]
    LengthMismatch {
        /// The buffer at fault.
        tensor: &'static str,
        /// The length its shape implies.
        expected: usize,
        /// The length it has.
        actual: usize,
    },
    /// Two shapes that must agree do not.
    #[error("shape mismatch: {detail}")]
    ShapeMismatch {
        /// What disagrees with what, with the numbers.
        detail: String,
    },
    /// A dimension that must be positive is zero, or a stride would read outside its buffer.
    #[error("invalid `{tensor}`: {detail}")]
    InvalidShape {
        /// The tensor at fault.
        tensor: &'static str,
        /// Why.
        detail: String,
    },
    /// An input holds NaN or infinity where the operation is undefined for them.
    #[error("`{tensor}` contains a non-finite value ({value}) at index {index}")]
    NonFinite {
        /// The tensor at fault.
        tensor: &'static str,
        /// The flat index of the first non-finite element.
        index: usize,
        /// That element.
        value: f32,
    },
    /// A parameter outside its allowed range.
    #[error("invalid parameter `{name}`: {detail}")]
    InvalidParameter {
        /// The parameter.
        name: &'static str,
        /// What is allowed.
        detail: String,
    },
}
