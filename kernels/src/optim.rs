//! The optimizer as DeepSeek-V3 trains: AdamW over FP32 master weights with both moments
//! stored in BF16, global-norm gradient clipping, and the warm-up / constant / cosine
//! learning-rate schedule.
//!
//! ## AdamW step ([`adamw_step`])
//! The update follows PyTorch's `AdamW` (decoupled weight decay scaled by the step's lr,
//! bias correction on both moments, `eps` added after the bias-corrected square root). The
//! moments live in BF16 to halve their memory; each step widens them to f32, computes the
//! update entirely in f32 from the widened values, and stores the new moments rounded to
//! BF16 (round to nearest, ties to even, `half::bf16::from_f32`). The parameter update
//! uses the f32 moments, before their rounding.
//!
//! Exact order of operations, so that any implementation (a GPU kernel, a checkpoint
//! replay) can reproduce a step bit for bit. Step scalars, in f64 from the f32 inputs and
//! rounded once to f32:
//! - `bc1 = 1 − β1^step`, `bc2 = 1 − β2^step` (f64 `powf`, kept in f64);
//! - `step_size = f32(lr / bc1)`, `bc2_sqrt = f32(sqrt(bc2))`;
//! - `decay = f32(1 − lr · weight_decay)` when weight decay applies, else exactly 1.
//!
//! Then `c1 = 1 − β1` and `c2 = 1 − β2` in f32, and per element, in f32 without fused
//! multiply-adds:
//! 1. `m = β1 · m_old + c1 · g`
//! 2. `v = β2 · v_old + c2 · (g · g)`
//! 3. `p = p · decay − step_size · (m / (sqrt(v) / bc2_sqrt + eps))`
//! 4. store `bf16(m)`, `bf16(v)`.
//!
//! Elements are independent, so fixed chunks run in parallel and the result never depends
//! on the number of threads. Non-finite gradients are not rejected (that is a scan of every
//! gradient); check [`global_grad_norm`] for finiteness before stepping.
//!
//! Which tensors get weight decay (PyTorch practice exempts norms' weights and biases) is
//! the caller's choice through `apply_weight_decay`.
//!
//! ## Gradient clipping
//! [`global_grad_norm`] is the 2-norm of all gradients together, from sums of squares in f64
//! in a fixed order; [`clip_scale`] turns it into the factor (≤ 1) the gradients are
//! multiplied by, as DeepSeek-V3 clips at 1.0. In data-parallel training each rank can
//! all-reduce [`grad_sum_of_squares`] and take the square root itself.
//!
//! ## Learning rate ([`LrSchedule`])
//! Linear warm-up from 0, a constant phase at the peak, a cosine decay to the final rate,
//! then the final rate: DeepSeek-V3 warms up to 2.2e-4 over 2K steps and decays to 2.2e-5.

use crate::KernelError;
use half::bf16;
use rayon::prelude::*;

/// Elements handed to one rayon task.
const CHUNK: usize = 1 << 15;

/// Elements whose squares are summed sequentially before joining the running total; fixed,
/// so the summation order depends on the data's layout alone, never on the thread count.
pub const NORM_BLOCK: usize = 1 << 16;

/// AdamW's hyper-parameters except the learning rate, which changes every step and is
/// passed to [`adamw_step`] (from an [`LrSchedule`]).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Decay of the first moment, in `[0, 1)`.
    pub beta1: f32,
    /// Decay of the second moment, in `[0, 1)`.
    pub beta2: f32,
    /// Added to the bias-corrected root of the second moment; finite and > 0.
    pub eps: f32,
    /// Decoupled weight decay per unit of learning rate; finite and ≥ 0.
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// DeepSeek-V3's: β = (0.9, 0.95), weight decay 0.1, and PyTorch's eps = 1e-8.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

impl AdamWConfig {
    /// Checks every field's range; the error names the first field out of range.
    pub fn validate(&self) -> Result<(), KernelError> {
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            // `contains` is false for NaN, so NaN is rejected too.
            if !(0.0..1.0).contains(&beta) {
                return Err(KernelError::InvalidParameter {
                    name,
                    detail: format!("must be in [0, 1), got {beta}"),
                });
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(KernelError::InvalidParameter {
                name: "eps",
                detail: format!("must be finite and > 0, got {}", self.eps),
            });
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(KernelError::InvalidParameter {
                name: "weight_decay",
                detail: format!("must be finite and ≥ 0, got {}", self.weight_decay),
            });
        }
        Ok(())
    }
}

fn check_len(tensor: &'static str, expected: usize, actual: usize) -> Result<(), KernelError> {
    if actual != expected {
        return Err(KernelError::LengthMismatch { tensor, expected, actual });
    }
    Ok(())
}

fn check_lr(name: &'static str, lr: f32) -> Result<(), KernelError> {
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(KernelError::InvalidParameter {
            name,
            detail: format!("must be finite and ≥ 0, got {lr}"),
        });
    }
    Ok(())
}

/// One AdamW step over one tensor, in place (see the module docs for the exact formula).
///
/// `params` are the FP32 master weights; `grads` their gradients (already clipped);
/// `m`, `v` the BF16 moments (zero before the first step); all of the same length. `step`
/// counts steps taken including this one, from 1. Nothing is written on error.
#[allow(clippy::too_many_arguments, reason = "one tensor's four buffers plus the step's scalars")]
pub fn adamw_step(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [bf16],
    v: &mut [bf16],
    step: u64,
    lr: f32,
    cfg: &AdamWConfig,
    apply_weight_decay: bool,
) -> Result<(), KernelError> {
    cfg.validate()?;
    check_lr("lr", lr)?;
    if step == 0 {
        return Err(KernelError::InvalidParameter {
            name: "step",
            detail: "counts from 1 (bias correction divides by 1 − β^step)".into(),
        });
    }
    let n = params.len();
    check_len("grads", n, grads.len())?;
    check_len("m", n, m.len())?;
    check_len("v", n, v.len())?;

    // `step as f64` is inexact only beyond 2^53, where β^step is 0 in f64 anyway.
    let steps = step as f64;
    let bc1 = 1.0 - f64::from(cfg.beta1).powf(steps);
    let bc2 = 1.0 - f64::from(cfg.beta2).powf(steps);
    let step_size = (f64::from(lr) / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let decay =
        if apply_weight_decay { (1.0 - f64::from(lr) * f64::from(cfg.weight_decay)) as f32 } else { 1.0 };
    let (b1, b2, eps) = (cfg.beta1, cfg.beta2, cfg.eps);
    let (c1, c2) = (1.0 - b1, 1.0 - b2);

    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let mi = b1 * m.to_f32() + c1 * g;
                let vi = b2 * v.to_f32() + c2 * (g * g);
                *p = *p * decay - step_size * (mi / (vi.sqrt() / bc2_sqrt + eps));
                *m = bf16::from_f32(mi);
                *v = bf16::from_f32(vi);
            }
        });
    Ok(())
}

/// `Σ g²` over every gradient tensor, in f64, in a fixed order: tensors in the order given,
/// each cut into consecutive blocks of [`NORM_BLOCK`] elements; a block's squares are
/// summed left to right from 0, and the block sums are added left to right into the total.
/// Blocks run in parallel; the result never depends on the number of threads.
pub fn grad_sum_of_squares(grads: &[&[f32]]) -> f64 {
    let mut total = 0.0f64;
    for g in grads {
        let blocks: Vec<f64> = g
            .par_chunks(NORM_BLOCK)
            .map(|b| b.iter().fold(0.0f64, |s, &x| s + f64::from(x) * f64::from(x)))
            .collect();
        total = blocks.iter().fold(total, |t, &b| t + b);
    }
    total
}

/// The 2-norm of all gradients together: `sqrt(`[`grad_sum_of_squares`]`)`. NaN or
/// infinity here means some gradient is not finite, and the step should be skipped.
pub fn global_grad_norm(grads: &[&[f32]]) -> f64 {
    grad_sum_of_squares(grads).sqrt()
}

/// The factor to multiply gradients by to clip their global norm to `max_norm`:
/// `max_norm / norm` when `norm > max_norm > 0`, else 1 (so `max_norm ≤ 0` disables
/// clipping, and a NaN norm leaves gradients as they are: detect it before, see
/// [`global_grad_norm`]). An infinite norm gives 0.
pub fn clip_scale(norm: f64, max_norm: f64) -> f32 {
    if max_norm > 0.0 && norm > max_norm { (max_norm / norm) as f32 } else { 1.0 }
}

/// Warm-up, constant, cosine decay, then constant, over 1-based optimizer steps.
///
/// `lr_at(step)` for `step` = steps taken including the one about to be applied (as
/// [`adamw_step`] counts), computed in f64 and rounded once to f32:
/// - `step ≤ warmup_steps` (when `warmup_steps > 0`): `peak_lr · step / warmup_steps`, so
///   0 at step 0 and exactly `peak_lr` at `warmup_steps`;
/// - the next `constant_steps` steps: `peak_lr`;
/// - the next `decay_steps` steps, `d` = 1 … `decay_steps` into the decay:
///   `final_lr + (peak_lr − final_lr) · (1 + cos(π · d / decay_steps)) / 2`, exactly
///   `final_lr` at the last one;
/// - afterwards: `final_lr`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    /// The rate reached at the end of warm-up and held through the constant phase.
    pub peak_lr: f32,
    /// Steps of the linear warm-up from 0.
    pub warmup_steps: u64,
    /// Steps at `peak_lr` after warm-up.
    pub constant_steps: u64,
    /// Steps of the cosine decay from `peak_lr` to `final_lr`.
    pub decay_steps: u64,
    /// The rate at the end of the decay and after it.
    pub final_lr: f32,
}

impl LrSchedule {
    /// DeepSeek-V3's: warm-up 0 → 2.2e-4 over 2000 steps, then the given constant and decay
    /// lengths (the report gives them in tokens: 10T constant, cosine over 4.3T, under a
    /// ramping batch size), down to 2.2e-5.
    pub fn deepseek_v3(constant_steps: u64, decay_steps: u64) -> Self {
        Self { peak_lr: 2.2e-4, warmup_steps: 2000, constant_steps, decay_steps, final_lr: 2.2e-5 }
    }

    /// Checks that both rates are finite and ≥ 0; the error names the field.
    pub fn validate(&self) -> Result<(), KernelError> {
        check_lr("peak_lr", self.peak_lr)?;
        check_lr("final_lr", self.final_lr)
    }

    /// The learning rate of optimizer step `step` (1-based; see the type's docs).
    pub fn lr_at(&self, step: u64) -> f32 {
        let peak = f64::from(self.peak_lr);
        if self.warmup_steps > 0 && step <= self.warmup_steps {
            // step / warmup first, so the last warm-up step gives exactly `peak`.
            return (peak * (step as f64 / self.warmup_steps as f64)) as f32;
        }
        let after_warmup = step.saturating_sub(self.warmup_steps);
        if after_warmup <= self.constant_steps {
            return self.peak_lr;
        }
        let d = after_warmup - self.constant_steps;
        if d >= self.decay_steps {
            return self.final_lr;
        }
        let fin = f64::from(self.final_lr);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * (d as f64 / self.decay_steps as f64)).cos());
        (fin + (peak - fin) * cosine) as f32
    }
}
