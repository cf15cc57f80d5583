//! Softmax cross-entropy over the rows of a `[rows, vocab]` logits matrix with one `u32`
//! target token per row: the loss of DeepSeek-V3's output head, and of each MTP module
//! through the shared head.
//!
//! `loss[r] = logsumexp_j(logits[r, j]) − logits[r, targets[r]]`
//!
//! ## Passes
//! - [`cross_entropy_forward`]: per-row losses and their mean.
//! - [`cross_entropy_backward`]: `dlogits = (softmax(logits) − onehot(target)) · scale` into
//!   a separate buffer, where `scale` is the upstream gradient of each row's loss (`1/rows`
//!   for a mean, times λ/D for an MTP loss, …).
//! - [`cross_entropy_backward_in_place`]: the same, **overwriting the logits**, as llm.c
//!   does: at DeepSeek's vocabulary (129280) the logits are the largest activation of the
//!   model and a second buffer of that size is worth saving.
//! - [`cross_entropy_forward_backward_in_place`]: both at once, reading each row's
//!   maximum and normalizer once; bit-equal to forward followed by in-place backward.
//! - [`log_softmax_at`]: `log p(target)` of one row, for scoring.
//!
//! ## Numerics and order of operations (determinism)
//! Per row: `max` = the largest logit (NaN logits are skipped by the comparison, but then
//! poison the sum); `sum = Σ_j exp(x_j − max)`, each `exp` in `T`, accumulated left to right
//! in f64 from 0, so the sum loses nothing at any vocabulary size. Then, in f64,
//! `loss = (max − x_t) + ln(sum)`, rounded once to `T`. Backward, per element in `T`:
//! `p_j = exp(x_j − max) · inv_sum` with `inv_sum = T(1 / sum)`, and
//! `dlogits_j = (p_j − [j = t]) · scale`. The mean is `Σ_r loss[r]` over the returned `T`
//! losses, widened to f64 and added in row order, then divided by `rows`; it is 0 for zero
//! rows, so that row-weighted sums of means stay right. Rows run in parallel; nothing
//! depends on the number of threads.
//!
//! Targets are checked before anything is written: one outside `[0, vocab)` is an error
//! naming the first such row and the vocabulary size. There is no ignore index; a caller
//! that masks rows passes only the rows it scores.

use crate::{KernelError, check_matrix_len};
use num_traits::Float;
use rayon::prelude::*;

/// Elements of work handed to one rayon task.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;

#[inline(always)]
fn widen<T: Float>(v: T) -> f64 {
    v.to_f64().unwrap_or(f64::NAN)
}

#[inline(always)]
fn narrow<T: Float>(v: f64) -> T {
    T::from(v).unwrap_or_else(T::nan)
}

/// A row's largest logit and `Σ_j exp(x_j − max)` (see the module docs for the order).
#[inline]
fn row_stats<T: Float>(row: &[T]) -> (T, f64) {
    let max = row.iter().fold(T::neg_infinity(), |m, &v| if v > m { v } else { m });
    let sum = row.iter().fold(0.0f64, |s, &v| s + widen((v - max).exp()));
    (max, sum)
}

/// `(max − x_t) + ln(sum)` in f64, rounded once.
#[inline]
fn row_loss<T: Float>(max: T, sum: f64, target_logit: T) -> T {
    narrow((widen(max) - widen(target_logit)) + sum.ln())
}

/// Overwrites `out` (may be the logits row itself) with `(softmax − onehot) · scale`.
#[inline]
fn row_grad<T: Float>(max: T, sum: f64, target: usize, scale: T, row: &[T], out: &mut [T]) {
    let inv_sum: T = narrow(1.0 / sum);
    for (j, (o, &x)) in out.iter_mut().zip(row).enumerate() {
        let onehot = if j == target { T::one() } else { T::zero() };
        *o = ((x - max).exp() * inv_sum - onehot) * scale;
    }
}

/// The in-place twin of [`row_grad`]: each element is read before it is overwritten.
#[inline]
fn row_grad_in_place<T: Float>(max: T, sum: f64, target: usize, scale: T, row: &mut [T]) {
    let inv_sum: T = narrow(1.0 / sum);
    for (j, x) in row.iter_mut().enumerate() {
        let onehot = if j == target { T::one() } else { T::zero() };
        *x = ((*x - max).exp() * inv_sum - onehot) * scale;
    }
}

fn check_shapes<T>(logits: &[T], targets: &[u32], rows: usize, vocab: usize) -> Result<(), KernelError> {
    if vocab == 0 {
        return Err(KernelError::InvalidShape {
            tensor: "logits",
            detail: "vocab must be > 0 (softmax over no classes)".into(),
        });
    }
    check_matrix_len("logits", rows, vocab, logits.len())?;
    if targets.len() != rows {
        return Err(KernelError::LengthMismatch { tensor: "targets", expected: rows, actual: targets.len() });
    }
    if let Some((r, &t)) = targets.iter().enumerate().find(|&(_, &t)| t as usize >= vocab) {
        return Err(KernelError::InvalidParameter {
            name: "targets",
            detail: format!("row {r} has target {t}, outside the vocabulary of size {vocab}"),
        });
    }
    Ok(())
}

fn check_scale<T: Float>(scale: T) -> Result<(), KernelError> {
    if !scale.is_finite() {
        return Err(KernelError::InvalidParameter {
            name: "scale",
            detail: format!("must be finite, got {}", widen(scale)),
        });
    }
    Ok(())
}

fn check_losses<T>(rows: usize, losses: &[T]) -> Result<(), KernelError> {
    if losses.len() != rows {
        return Err(KernelError::LengthMismatch { tensor: "losses", expected: rows, actual: losses.len() });
    }
    Ok(())
}

/// Rows handed to one rayon task.
fn rows_per_task(vocab: usize) -> usize {
    (PARALLEL_MIN_ELEMENTS / vocab).max(1)
}

/// The mean of the per-row losses, in row order in f64 (0 for no rows).
fn mean<T: Float>(losses: &[T]) -> T {
    if losses.is_empty() {
        return T::zero();
    }
    let total = losses.iter().fold(0.0f64, |s, &l| s + widen(l));
    narrow(total / losses.len() as f64)
}

/// Cross-entropy forward: writes `losses[r]` (`[rows]`) and returns their mean.
/// Shapes: `logits` `[rows, vocab]`, `targets` `[rows]` with every id `< vocab`.
pub fn cross_entropy_forward<T: Float + Send + Sync>(
    logits: &[T],
    targets: &[u32],
    rows: usize,
    vocab: usize,
    losses: &mut [T],
) -> Result<T, KernelError> {
    check_shapes(logits, targets, rows, vocab)?;
    check_losses(rows, losses)?;
    logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .zip(losses.par_iter_mut())
        .with_min_len(rows_per_task(vocab))
        .for_each(|((row, &t), loss)| {
            let (max, sum) = row_stats(row);
            *loss = row_loss(max, sum, row[t as usize]);
        });
    Ok(mean(losses))
}

/// Cross-entropy backward into a separate buffer: **overwrites** `dlogits` (`[rows, vocab]`)
/// with `(softmax(logits) − onehot(targets)) · scale`. `scale` must be finite.
pub fn cross_entropy_backward<T: Float + Send + Sync>(
    logits: &[T],
    targets: &[u32],
    rows: usize,
    vocab: usize,
    scale: T,
    dlogits: &mut [T],
) -> Result<(), KernelError> {
    check_shapes(logits, targets, rows, vocab)?;
    check_scale(scale)?;
    check_matrix_len("dlogits", rows, vocab, dlogits.len())?;
    logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .zip(dlogits.par_chunks_mut(vocab))
        .with_min_len(rows_per_task(vocab))
        .for_each(|((row, &t), out)| {
            let (max, sum) = row_stats(row);
            row_grad(max, sum, t as usize, scale, row, out);
        });
    Ok(())
}

/// Cross-entropy backward in place: **overwrites `logits`** with
/// `(softmax(logits) − onehot(targets)) · scale`, bit-equal to [`cross_entropy_backward`].
/// On error nothing is written.
pub fn cross_entropy_backward_in_place<T: Float + Send + Sync>(
    logits: &mut [T],
    targets: &[u32],
    rows: usize,
    vocab: usize,
    scale: T,
) -> Result<(), KernelError> {
    check_shapes(logits, targets, rows, vocab)?;
    check_scale(scale)?;
    logits.par_chunks_mut(vocab).zip(targets.par_iter()).with_min_len(rows_per_task(vocab)).for_each(
        |(row, &t)| {
            let (max, sum) = row_stats(row);
            row_grad_in_place(max, sum, t as usize, scale, row);
        },
    );
    Ok(())
}

/// Fused forward and in-place backward (llm.c's fused classifier): writes `losses` and
/// returns their mean as [`cross_entropy_forward`] does, then **overwrites `logits`** as
/// [`cross_entropy_backward_in_place`] does, computing each row's max and normalizer once.
/// On error nothing is written.
pub fn cross_entropy_forward_backward_in_place<T: Float + Send + Sync>(
    logits: &mut [T],
    targets: &[u32],
    rows: usize,
    vocab: usize,
    scale: T,
    losses: &mut [T],
) -> Result<T, KernelError> {
    check_shapes(logits, targets, rows, vocab)?;
    check_scale(scale)?;
    check_losses(rows, losses)?;
    logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .zip(losses.par_iter_mut())
        .with_min_len(rows_per_task(vocab))
        .for_each(|((row, &t), loss)| {
            let (max, sum) = row_stats(row);
            *loss = row_loss(max, sum, row[t as usize]);
            row_grad_in_place(max, sum, t as usize, scale, row);
        });
    Ok(mean(losses))
}

/// `log softmax(logits_row)[target]`, i.e. `−loss` of one row, computed as the forward does.
pub fn log_softmax_at<T: Float>(logits_row: &[T], target: u32) -> Result<T, KernelError> {
    if logits_row.is_empty() {
        return Err(KernelError::InvalidShape {
            tensor: "logits_row",
            detail: "must hold at least one logit".into(),
        });
    }
    let Some(&target_logit) = logits_row.get(target as usize) else {
        return Err(KernelError::InvalidParameter {
            name: "target",
            detail: format!("{target} is outside the vocabulary of size {}", logits_row.len()),
        });
    };
    let (max, sum) = row_stats(logits_row);
    Ok(-row_loss(max, sum, target_logit))
}
