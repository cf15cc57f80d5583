//! SwiGLU, the activation of DeepSeek-V3's dense FFNs and of every (shared and routed)
//! expert, in the form of DeepSeek's and Hugging Face's code:
//!
//! `h = silu(gate) ⊙ up`, with `silu(x) = x · sigmoid(x)`,
//!
//! where `gate = x · W_gateᵀ` and `up = x · W_upᵀ` are two separate `[rows, inter]` buffers
//! (the outputs of the two up-projection GEMMs) and `h` feeds the down-projection.
//!
//! SwiGLU has no weights, so its backward is all B: [`swiglu_backward`] turns `dh` into
//! `dgate` and `dup`, both **overwritten**. It reads only `gate` and `up`, never `h`: the FP8
//! recipe does not keep the SwiGLU output but recomputes it in backward, and these kernels
//! need nothing but the two GEMM outputs to do that.
//!
//! ## Numerics
//! [`sigmoid`] never evaluates `exp` of a positive argument, so it neither overflows nor
//! loses the small tail for large `|x|`; [`silu`] and [`silu_grad`] take their limits at
//! `±∞` (`silu(−∞) = 0`, `silu'(+∞) = 1`, `silu'(−∞) = 0`) instead of forming `∞ · 0`.
//! NaN propagates.
//!
//! ## Order of operations (determinism)
//! All arithmetic is in `T`, element by element, with no fused multiply-adds:
//! - forward: `h = (g · σ(g)) · u`;
//! - backward: `s = σ(g)`; `dup = dh · (g · s)`; `dgate = (dh · u) · (s · (1 + g · (1 − s)))`.
//!
//! Elements are independent, so work is split into fixed chunks in parallel and the result
//! never depends on the number of threads.

use crate::{KernelError, check_matrix_len};
use num_traits::Float;
use rayon::prelude::*;

/// Elements handed to one rayon task.
const CHUNK: usize = 1 << 15;

/// The logistic function `1 / (1 + e^{−x})`, evaluated so that `exp` only ever sees a
/// non-positive argument.
#[inline(always)]
pub fn sigmoid<T: Float>(x: T) -> T {
    if x >= T::zero() {
        T::one() / (T::one() + (-x).exp())
    } else {
        // Also the NaN path: exp(NaN) is NaN.
        let e = x.exp();
        e / (T::one() + e)
    }
}

/// `silu(x) = x · sigmoid(x)` (a.k.a. swish), with `silu(−∞) = 0`.
#[inline(always)]
pub fn silu<T: Float>(x: T) -> T {
    if x == T::neg_infinity() { T::zero() } else { x * sigmoid(x) }
}

/// `silu'(x) = σ(x) · (1 + x · (1 − σ(x)))`, with its limits 1 at `+∞` and 0 at `−∞`.
#[inline(always)]
pub fn silu_grad<T: Float>(x: T) -> T {
    silu_and_grad(x).1
}

/// `(silu(x), silu'(x))` from one evaluation of `σ(x)`, bit-equal to [`silu`] and
/// [`silu_grad`].
#[inline(always)]
fn silu_and_grad<T: Float>(x: T) -> (T, T) {
    if x.is_infinite() {
        return if x > T::zero() { (x, T::one()) } else { (T::zero(), T::zero()) };
    }
    let s = sigmoid(x);
    (x * s, s * (T::one() + x * (T::one() - s)))
}

/// SwiGLU forward: `h = silu(gate) ⊙ up`. Shapes: `gate`, `up`, `h` `[rows, inter]`.
pub fn swiglu_forward<T: Float + Send + Sync>(
    gate: &[T],
    up: &[T],
    rows: usize,
    inter: usize,
    h: &mut [T],
) -> Result<(), KernelError> {
    check_matrix_len("gate", rows, inter, gate.len())?;
    check_matrix_len("up", rows, inter, up.len())?;
    check_matrix_len("h", rows, inter, h.len())?;
    h.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK)).zip(up.par_chunks(CHUNK)).for_each(
        |((h, gate), up)| {
            for ((h, &g), &u) in h.iter_mut().zip(gate).zip(up) {
                *h = silu(g) * u;
            }
        },
    );
    Ok(())
}

/// SwiGLU backward (B only; there are no weights): **overwrites** `dgate = dh ⊙ up ⊙
/// silu'(gate)` and `dup = dh ⊙ silu(gate)`. Shapes: all `[rows, inter]`.
pub fn swiglu_backward<T: Float + Send + Sync>(
    dh: &[T],
    gate: &[T],
    up: &[T],
    rows: usize,
    inter: usize,
    dgate: &mut [T],
    dup: &mut [T],
) -> Result<(), KernelError> {
    check_matrix_len("dh", rows, inter, dh.len())?;
    check_matrix_len("gate", rows, inter, gate.len())?;
    check_matrix_len("up", rows, inter, up.len())?;
    check_matrix_len("dgate", rows, inter, dgate.len())?;
    check_matrix_len("dup", rows, inter, dup.len())?;
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(dh.par_chunks(CHUNK))
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((((dgate, dup), dh), gate), up)| {
            for ((((dg, du), &dh), &g), &u) in dgate.iter_mut().zip(dup.iter_mut()).zip(dh).zip(gate).zip(up)
            {
                let (silu, grad) = silu_and_grad(g);
                *du = dh * silu;
                *dg = (dh * u) * grad;
            }
        });
    Ok(())
}
