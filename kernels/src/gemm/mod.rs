//! GEMMs on the CPU: the reference implementations that a CUDA path is checked against,
//! and the engine of CPU workers.
//!
//! - [`gemm_f32`], [`gemm_bf16`]: `C = alpha·A·B + beta·C` over strided [`MatRef`] /
//!   [`MatMut`] views, so the backward GEMMs `dX = dY·Wᵀ` and `dW = Xᵀ·dY` take
//!   [`MatRef::t`] views instead of transpose copies.
//! - [`gemm_fp8`]: DeepGEMM's block-scaled FP8 GEMM in its NT layout, `C = A·Bᵀ` with `A`
//!   quantized in 1×128 tiles and `B` in 128×128 blocks ([`crate::quant`]) or, for
//!   Wgrad, in 1×128 tiles as well (a transposed 128×1-tiled activation), either with
//!   exact f32 accumulation promoted per 128-wide K block ([`Accumulation::F32`]) or with
//!   the H800 tensor core's limited-precision accumulator emulated
//!   ([`Accumulation::Limited`]); f32 or BF16 output ([`GemmOutput`]).
//! - [`grouped_gemm_fp8`]: the MoE form over DeepGEMM's "contiguous" layout, rows of all
//!   experts concatenated and tagged with their expert by `m_indices`.
//!
//! ## Invariants
//! - No kernel panics or reads outside a buffer on a caller's bad input: shapes, strides,
//!   buffer and scale lengths, granularities, expert indices and parameters are all
//!   checked before any data is touched, and each failure is a [`crate::KernelError`]
//!   naming the tensor or parameter at fault.
//! - `threads` bounds how many rayon workers of the current pool a call occupies (1 runs
//!   on the calling thread; 0 is an error). The FP8 kernels cut rows into bands and
//!   columns into tiles of fixed sizes and compute each band's tile the same way however
//!   the work is shared out, so their results are bit-identical for every thread count,
//!   and the grouped kernel equals per-expert [`gemm_fp8`] calls bit for bit. The dense
//!   kernels are deterministic across thread counts too: the `gemm` crate splits only the
//!   M and N dimensions between threads, never K (and the tests check it).

mod dense;
mod fp8;
mod grouped;
mod view;

pub use dense::{gemm_bf16, gemm_f32, matmul};
pub use fp8::{
    Accumulation, AccumulatorRounding, GemmOutput, LimitedAccumulator, gemm_fp8, round_to_mantissa_bits,
};
pub use grouped::grouped_gemm_fp8;
pub use view::{MatMut, MatRef};

use crate::KernelError;
use rayon::prelude::*;
use std::sync::{Mutex, PoisonError};

/// The element types the dense GEMM computes in: f32 for training, f64 for references.
/// Sealed, because the `gemm` crate dispatches on the concrete type at run time.
pub trait GemmFloat: num_traits::Float + Send + Sync + 'static + sealed::Sealed {
    /// The slice itself when the type is f32 (so generic code can reach the f32-only
    /// BF16 and FP8 kernels without a copy), `None` for f64.
    fn as_f32_slice(x: &[Self]) -> Option<&[f32]>;
    /// [`GemmFloat::as_f32_slice`], mutable.
    fn as_f32_slice_mut(x: &mut [Self]) -> Option<&mut [f32]>;
}
impl GemmFloat for f32 {
    fn as_f32_slice(x: &[f32]) -> Option<&[f32]> {
        Some(x)
    }
    fn as_f32_slice_mut(x: &mut [f32]) -> Option<&mut [f32]> {
        Some(x)
    }
}
impl GemmFloat for f64 {
    fn as_f32_slice(_: &[f64]) -> Option<&[f32]> {
        None
    }
    fn as_f32_slice_mut(_: &mut [f64]) -> Option<&mut [f32]> {
        None
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

fn check_threads(threads: usize) -> Result<(), KernelError> {
    if threads == 0 {
        return Err(KernelError::InvalidParameter { name: "threads", detail: "must be at least 1".into() });
    }
    Ok(())
}

/// Runs `f` on every task with at most `threads` rayon workers of the current pool and
/// returns the first error (the remaining tasks are then skipped).
///
/// Workers pull tasks from a shared queue, so uneven tasks balance themselves; which
/// worker runs a task never changes what the task computes.
fn run_tasks<T: Send>(
    threads: usize,
    tasks: impl IntoIterator<Item = T>,
    f: impl Fn(T) -> Result<(), KernelError> + Sync,
) -> Result<(), KernelError> {
    let tasks: Vec<T> = tasks.into_iter().collect();
    let workers = threads.min(tasks.len());
    if workers <= 1 {
        return tasks.into_iter().try_for_each(f);
    }
    let queue = Mutex::new(tasks.into_iter());
    let first_error = Mutex::new(None);
    (0..workers).into_par_iter().for_each(|_| {
        loop {
            // The guard is a temporary, so the lock is released before the task runs.
            let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
            let Some(task) = next else { break };
            if let Err(e) = f(task) {
                first_error.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(e);
                // Drain the queue so every worker stops.
                queue.lock().unwrap_or_else(PoisonError::into_inner).by_ref().for_each(drop);
                break;
            }
        }
    });
    match first_error.into_inner().unwrap_or_else(PoisonError::into_inner) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
