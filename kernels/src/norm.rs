//! RMSNorm over the rows of a row-major matrix, as DeepSeek-V3 normalizes its hidden states
//! and MLA's compressed latents:
//!
//! `y[r, j] = x[r, j] · rstd[r] · weight[j]`, with `rstd[r] = 1 / sqrt(mean_j x[r, j]² + eps)`,
//!
//! for `x`, `y` of shape `[rows, dim]` and `weight` of shape `[dim]`.
//!
//! ## Passes
//! - forward, [`rms_norm_forward`]: writes `y` and saves `rstd` (one value per row).
//! - B, [`rms_norm_backward_input`]: **overwrites** `dx` (a layer's input gradient is
//!   produced once per micro-batch; a caller that sums it with a residual branch adds it).
//! - W, [`rms_norm_backward_weight`]: **accumulates** into `dweight`, because weight
//!   gradients sum over the micro-batches of a step.
//!
//! ## Recomputation
//! Neither backward reads `y`: both need only `x` and the saved `rstd` and form
//! `x̂ = x · rstd` on the fly. DeepSeek-V3 drops RMSNorm outputs after forward and
//! recomputes them in backward; with these kernels nothing beyond the per-row `rstd` has to
//! be kept, and if even that is dropped, rerunning [`rms_norm_forward`] into scratch buffers
//! restores it bit for bit.
//!
//! ## Order of operations (determinism)
//! All arithmetic is in `T`, with no fused multiply-adds:
//! - forward, per row: `ss = Σ_j x_j²` summed left to right from 0; `rstd = 1 / sqrt(ss / dim
//!   + eps)`; `y_j = (x_j · rstd) · w_j`.
//! - B, per row: `x̂_j = x_j · rstd`; `c = (Σ_j (dy_j · w_j) · x̂_j) / dim` summed left to
//!   right from 0; `dx_j = rstd · (dy_j · w_j − x̂_j · c)`.
//! - W, per column `j`, over rows in order: `dweight_j = dweight_j + dy[r, j] · (x[r, j] ·
//!   rstd[r])`. Consecutive row ranges passed in order therefore give bit for bit what one
//!   call over all of them gives.
//!
//! Forward and B run rows in parallel; W runs blocks of columns in parallel, each summing
//! over rows in order. No result depends on the number of threads.
//!
//! Non-finite inputs are not rejected: they propagate into the outputs as IEEE arithmetic
//! carries them, which the caller's loss and gradient-norm checks then see.

use crate::{KernelError, check_matrix_len};
use num_traits::Float;
use rayon::prelude::*;

/// Elements of work handed to one rayon task; below this the overhead outweighs the gain.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;

/// Columns of `dweight` owned by one task in the W pass: wide enough to stream rows, narrow
/// enough to give tasks at DeepSeek's `dim` (7168 → 28 blocks).
const W_COLUMN_BLOCK: usize = 256;

/// Checks the shape and `eps` common to every pass.
fn check_params<T: Float>(dim: usize, eps: Option<T>) -> Result<(), KernelError> {
    if dim == 0 {
        // The mean over zero channels is undefined.
        return Err(KernelError::InvalidShape { tensor: "x", detail: "dim must be > 0".into() });
    }
    if let Some(eps) = eps
        && !(eps.is_finite() && eps > T::zero())
    {
        return Err(KernelError::InvalidParameter {
            name: "eps",
            detail: format!("must be finite and > 0, got {}", eps.to_f64().unwrap_or(f64::NAN)),
        });
    }
    Ok(())
}

fn check_vector_len(tensor: &'static str, expected: usize, len: usize) -> Result<(), KernelError> {
    if len != expected {
        return Err(KernelError::LengthMismatch { tensor, expected, actual: len });
    }
    Ok(())
}

/// Rows handed to one rayon task.
fn rows_per_task(dim: usize) -> usize {
    (PARALLEL_MIN_ELEMENTS / dim).max(1)
}

/// `T` from a `usize` count; exact for any count a buffer can hold in f64.
fn count<T: Float>(n: usize) -> T {
    T::from(n).unwrap_or_else(T::nan)
}

/// RMSNorm forward: `y = x · rstd · weight` per row, saving `rstd_out[r]` for backward.
///
/// Shapes: `x`, `y` `[rows, dim]`; `weight` `[dim]`; `rstd_out` `[rows]`. `eps` must be
/// finite and positive (DeepSeek-V3 uses 1e-6), so an all-zero row gives `y = 0`, not NaN.
pub fn rms_norm_forward<T: Float + Send + Sync>(
    x: &[T],
    weight: &[T],
    eps: T,
    rows: usize,
    dim: usize,
    y: &mut [T],
    rstd_out: &mut [T],
) -> Result<(), KernelError> {
    check_params(dim, Some(eps))?;
    check_matrix_len("x", rows, dim, x.len())?;
    check_vector_len("weight", dim, weight.len())?;
    check_matrix_len("y", rows, dim, y.len())?;
    check_vector_len("rstd_out", rows, rstd_out.len())?;
    let dim_t = count::<T>(dim);
    x.par_chunks(dim)
        .zip(y.par_chunks_mut(dim))
        .zip(rstd_out.par_iter_mut())
        .with_min_len(rows_per_task(dim))
        .for_each(|((x, y), rstd)| {
            let ss = x.iter().fold(T::zero(), |s, &v| s + v * v);
            let r = T::one() / (ss / dim_t + eps).sqrt();
            *rstd = r;
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(weight) {
                *y = (x * r) * w;
            }
        });
    Ok(())
}

/// RMSNorm backward, input gradient (B): **overwrites** `dx` with `∂L/∂x` given `dy = ∂L/∂y`.
///
/// With `x̂ = x · rstd`, `∂rstd/∂x_k = −rstd³ · x_k / dim`, so
/// `dx_k = rstd · (w_k · dy_k − x̂_k · Σ_j dy_j · w_j · x̂_j / dim)`.
/// Shapes: `dy`, `x`, `dx` `[rows, dim]`; `weight` `[dim]`; `rstd` `[rows]` as saved by
/// [`rms_norm_forward`]. `y` is not needed.
pub fn rms_norm_backward_input<T: Float + Send + Sync>(
    dy: &[T],
    x: &[T],
    weight: &[T],
    rstd: &[T],
    rows: usize,
    dim: usize,
    dx: &mut [T],
) -> Result<(), KernelError> {
    check_params::<T>(dim, None)?;
    check_matrix_len("dy", rows, dim, dy.len())?;
    check_matrix_len("x", rows, dim, x.len())?;
    check_vector_len("weight", dim, weight.len())?;
    check_vector_len("rstd", rows, rstd.len())?;
    check_matrix_len("dx", rows, dim, dx.len())?;
    let dim_t = count::<T>(dim);
    dy.par_chunks(dim)
        .zip(x.par_chunks(dim))
        .zip(rstd.par_iter())
        .zip(dx.par_chunks_mut(dim))
        .with_min_len(rows_per_task(dim))
        .for_each(|(((dy, x), &r), dx)| {
            let dot =
                dy.iter().zip(weight).zip(x).fold(T::zero(), |s, ((&dy, &w), &x)| s + (dy * w) * (x * r));
            let c = dot / dim_t;
            for (((dx, &dy), &w), &x) in dx.iter_mut().zip(dy).zip(weight).zip(x) {
                *dx = r * (dy * w - (x * r) * c);
            }
        });
    Ok(())
}

/// RMSNorm backward, weight gradient (W): **accumulates** `Σ_r dy[r, j] · x̂[r, j]` into
/// `dweight[j]`, so a step's micro-batches sum into one buffer (zero it at the start of the
/// step). Shapes: `dy`, `x` `[rows, dim]`; `rstd` `[rows]`; `dweight` `[dim]`.
pub fn rms_norm_backward_weight<T: Float + Send + Sync>(
    dy: &[T],
    x: &[T],
    rstd: &[T],
    rows: usize,
    dim: usize,
    dweight: &mut [T],
) -> Result<(), KernelError> {
    check_params::<T>(dim, None)?;
    check_matrix_len("dy", rows, dim, dy.len())?;
    check_matrix_len("x", rows, dim, x.len())?;
    check_vector_len("rstd", rows, rstd.len())?;
    check_vector_len("dweight", dim, dweight.len())?;
    // Each task owns a block of columns and walks every row in order, so the sum for a
    // column is the same sequence of additions whatever the partition into tasks.
    let work_per_block = rows.saturating_mul(W_COLUMN_BLOCK).max(1);
    dweight
        .par_chunks_mut(W_COLUMN_BLOCK)
        .with_min_len((PARALLEL_MIN_ELEMENTS / work_per_block).max(1))
        .enumerate()
        .for_each(|(b, dw)| {
            let j0 = b * W_COLUMN_BLOCK;
            for (r, &rs) in rstd.iter().enumerate() {
                let at = r * dim + j0;
                let dy = &dy[at..at + dw.len()];
                let x = &x[at..at + dw.len()];
                for ((dw, &dy), &x) in dw.iter_mut().zip(dy).zip(x) {
                    *dw = *dw + dy * (x * rs);
                }
            }
        });
    Ok(())
}
