//! Layer kernels (RMSNorm, SwiGLU, cross-entropy) against central finite differences in
//! f64, f32 forwards against f64, the in-place and fused cross-entropy variants against the
//! out-of-place one, AdamW against references of its documented formula, gradient
//! clipping, the learning-rate schedule, thread-count independence, and bad input.
//!
//! ## Finite-difference tolerance
//! Every backward is checked through a scalar objective `L = Σ dy ⊙ y` (so `∂L/∂input` is
//! exactly what the backward computes given `dy`), differentiated numerically as
//! `(L(x + h) − L(x − h)) / 2h` with `h = 1e-5 · max(1, |x|)`. In f64 the truncation error
//! is `h² · |L'''| / 6 ≈ 1e-11` for the O(1)-scaled inputs used here, and the rounding error
//! is `≈ k · 2⁻⁵³ · |L| / h ≈ 1e-10` for objectives of `k ≤ 10³` O(1) terms; so the
//! difference quotient is good to ~1e-9 absolute. The check
//! `|a − n| ≤ 1e-6 · max(|a|, |n|) + 1e-8` has three orders of magnitude of room over that
//! noise, yet any wrong term of a backward (a missing `1/dim`, a sign, a dropped eps) shows
//! as an O(1e-3 … 1) relative error. The absolute floor covers gradients that are (near)
//! zero, where a relative comparison with FD noise is meaningless.

use flotilla_kernels::KernelError;
use flotilla_kernels::activation::{sigmoid, silu, silu_grad, swiglu_backward, swiglu_forward};
use flotilla_kernels::loss::{
    cross_entropy_backward, cross_entropy_backward_in_place, cross_entropy_forward,
    cross_entropy_forward_backward_in_place, log_softmax_at,
};
use flotilla_kernels::norm::{rms_norm_backward_input, rms_norm_backward_weight, rms_norm_forward};
use flotilla_kernels::optim::{
    AdamWConfig, LrSchedule, adamw_step, clip_scale, global_grad_norm, grad_sum_of_squares,
};
use half::bf16;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const FD_STEP: f64 = 1e-5;
const FD_RTOL: f64 = 1e-6;
const FD_ATOL: f64 = 1e-8;
/// Elements perturbed per tensor at most; larger tensors get a seeded random subset.
const FD_MAX_POINTS: usize = 200;

fn uniform(n: usize, lo: f64, hi: f64, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// All indices of a tensor of `n` elements, or a seeded random subset of `FD_MAX_POINTS`.
fn fd_indices(n: usize, seed: u64) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    if n > FD_MAX_POINTS {
        all.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        all.truncate(FD_MAX_POINTS);
    }
    all
}

/// Compares `analytic[i]` with the central difference of `objective` in element `i` of
/// `x`, for the chosen indices.
fn check_fd(what: &str, x: &[f64], analytic: &[f64], seed: u64, mut objective: impl FnMut(&[f64]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let mut xp = x.to_vec();
    for i in fd_indices(x.len(), seed) {
        let h = FD_STEP * x[i].abs().max(1.0);
        xp[i] = x[i] + h;
        let up = objective(&xp);
        let hi = xp[i];
        xp[i] = x[i] - h;
        let down = objective(&xp);
        let lo = xp[i];
        xp[i] = x[i];
        // Divide by the step actually taken, which rounding may have changed.
        let numeric = (up - down) / (hi - lo);
        let a = analytic[i];
        let tol = FD_RTOL * a.abs().max(numeric.abs()) + FD_ATOL;
        assert!((a - numeric).abs() <= tol, "{what}[{i}]: analytic {a:e} vs numeric {numeric:e}");
    }
}

fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool").install(f)
}

// ---------------------------------------------------------------------------------------
// RMSNorm

/// (rows, dim, eps): a single channel, odd sizes, and one larger than FD_MAX_POINTS.
const NORM_CASES: [(usize, usize, f64); 4] = [(1, 1, 1e-2), (3, 7, 1e-6), (4, 64, 1e-1), (16, 300, 1e-6)];

fn rms_forward_f64(x: &[f64], w: &[f64], eps: f64, rows: usize, dim: usize) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; rows * dim];
    let mut rstd = vec![0.0; rows];
    rms_norm_forward(x, w, eps, rows, dim, &mut y, &mut rstd).unwrap();
    (y, rstd)
}

#[test]
fn rms_norm_forward_matches_definition() {
    let (rows, dim, eps) = (5, 33, 1e-6);
    let x = uniform(rows * dim, -2.0, 2.0, 1);
    let w = uniform(dim, 0.5, 1.5, 2);
    let (y, rstd) = rms_forward_f64(&x, &w, eps, rows, dim);
    for r in 0..rows {
        let row = &x[r * dim..(r + 1) * dim];
        let ms = row.iter().map(|v| v * v).sum::<f64>() / dim as f64;
        let want_rstd = 1.0 / (ms + eps).sqrt();
        assert!((rstd[r] - want_rstd).abs() <= 1e-14 * want_rstd);
        for j in 0..dim {
            let want = row[j] * want_rstd * w[j];
            assert!((y[r * dim + j] - want).abs() <= 1e-14 * want.abs().max(1.0));
        }
    }
    // An all-zero row normalizes to zero (eps keeps rstd finite).
    let (y, rstd) = rms_forward_f64(&[0.0; 4], &[1.0; 4], 1e-6, 1, 4);
    assert_eq!(y, vec![0.0; 4]);
    assert!(rstd[0].is_finite());
}

#[test]
fn rms_norm_backward_input_matches_fd() {
    for (case, &(rows, dim, eps)) in NORM_CASES.iter().enumerate() {
        let seed = 100 + case as u64 * 10;
        let x = uniform(rows * dim, -2.0, 2.0, seed);
        let w = uniform(dim, 0.5, 1.5, seed + 1);
        let dy = uniform(rows * dim, -1.0, 1.0, seed + 2);
        let (_, rstd) = rms_forward_f64(&x, &w, eps, rows, dim);
        let mut dx = vec![f64::NAN; rows * dim]; // overwritten, so the initial value is irrelevant
        rms_norm_backward_input(&dy, &x, &w, &rstd, rows, dim, &mut dx).unwrap();
        check_fd(&format!("rmsnorm dx {rows}x{dim}"), &x, &dx, seed + 3, |x| {
            dot(&dy, &rms_forward_f64(x, &w, eps, rows, dim).0)
        });
    }
}

#[test]
fn rms_norm_backward_weight_matches_fd_and_accumulates() {
    for (case, &(rows, dim, eps)) in NORM_CASES.iter().enumerate() {
        let seed = 200 + case as u64 * 10;
        let x = uniform(rows * dim, -2.0, 2.0, seed);
        let w = uniform(dim, 0.5, 1.5, seed + 1);
        let dy = uniform(rows * dim, -1.0, 1.0, seed + 2);
        let (_, rstd) = rms_forward_f64(&x, &w, eps, rows, dim);
        let start = uniform(dim, -3.0, 3.0, seed + 4);
        let mut dw = start.clone();
        rms_norm_backward_weight(&dy, &x, &rstd, rows, dim, &mut dw).unwrap();
        let added: Vec<f64> = dw.iter().zip(&start).map(|(a, s)| a - s).collect();
        check_fd(&format!("rmsnorm dweight {rows}x{dim}"), &w, &added, seed + 3, |w| {
            dot(&dy, &rms_forward_f64(&x, w, eps, rows, dim).0)
        });
    }
}

#[test]
fn rms_norm_weight_grad_over_micro_batches_is_bitwise_one_batch() {
    let (rows, dim) = (10, 300);
    let x = to_f32(&uniform(rows * dim, -2.0, 2.0, 7));
    let w = to_f32(&uniform(dim, 0.5, 1.5, 8));
    let dy = to_f32(&uniform(rows * dim, -1.0, 1.0, 9));
    let mut y = vec![0f32; rows * dim];
    let mut rstd = vec![0f32; rows];
    rms_norm_forward(&x, &w, 1e-6, rows, dim, &mut y, &mut rstd).unwrap();
    let mut whole = vec![0f32; dim];
    rms_norm_backward_weight(&dy, &x, &rstd, rows, dim, &mut whole).unwrap();
    let mut split = vec![0f32; dim];
    let cut = 4 * dim;
    rms_norm_backward_weight(&dy[..cut], &x[..cut], &rstd[..4], 4, dim, &mut split).unwrap();
    rms_norm_backward_weight(&dy[cut..], &x[cut..], &rstd[4..], rows - 4, dim, &mut split).unwrap();
    assert_eq!(whole, split);
}

#[test]
fn rms_norm_is_independent_of_thread_count() {
    // Large enough that every pass splits into several rayon tasks.
    let (rows, dim) = (96, 2048);
    let x = to_f32(&uniform(rows * dim, -2.0, 2.0, 11));
    let w = to_f32(&uniform(dim, 0.5, 1.5, 12));
    let dy = to_f32(&uniform(rows * dim, -1.0, 1.0, 13));
    let run = || {
        let mut y = vec![0f32; rows * dim];
        let mut rstd = vec![0f32; rows];
        rms_norm_forward(&x, &w, 1e-6, rows, dim, &mut y, &mut rstd).unwrap();
        let mut dx = vec![0f32; rows * dim];
        rms_norm_backward_input(&dy, &x, &w, &rstd, rows, dim, &mut dx).unwrap();
        let mut dw = vec![0f32; dim];
        rms_norm_backward_weight(&dy, &x, &rstd, rows, dim, &mut dw).unwrap();
        (y, rstd, dx, dw)
    };
    let one = with_threads(1, run);
    assert_eq!(one, with_threads(2, run));
    assert_eq!(one, with_threads(5, run));
}

#[test]
fn rms_norm_f32_forward_agrees_with_f64() {
    let (rows, dim) = (8, 7168);
    let x = to_f32(&uniform(rows * dim, -3.0, 3.0, 21));
    let w = to_f32(&uniform(dim, 0.5, 1.5, 22));
    let mut y32 = vec![0f32; rows * dim];
    let mut r32 = vec![0f32; rows];
    rms_norm_forward(&x, &w, 1e-6, rows, dim, &mut y32, &mut r32).unwrap();
    let (y64, r64) = rms_forward_f64(&to_f64(&x), &to_f64(&w), 1e-6, rows, dim);
    for (a, b) in r32.iter().zip(&r64) {
        assert!((f64::from(*a) - b).abs() <= 1e-5 * b.abs());
    }
    for (a, b) in y32.iter().zip(&y64) {
        assert!((f64::from(*a) - b).abs() <= 1e-5 * b.abs().max(1e-3), "{a} vs {b}");
    }
}

#[test]
fn rms_norm_rejects_bad_input() {
    let (x, w, dy) = (vec![1f32; 6], vec![1f32; 3], vec![1f32; 6]);
    let (mut y, mut rstd, mut dx, mut dw) = (vec![0f32; 6], vec![0f32; 2], vec![0f32; 6], vec![0f32; 3]);
    let len = |tensor: &str, e: KernelError| {
        assert!(matches!(e, KernelError::LengthMismatch { tensor: t, .. } if t == tensor), "{tensor}: {e}")
    };
    len("x", rms_norm_forward(&x[..5], &w, 1e-6, 2, 3, &mut y, &mut rstd).unwrap_err());
    len("weight", rms_norm_forward(&x, &w[..2], 1e-6, 2, 3, &mut y, &mut rstd).unwrap_err());
    len("y", rms_norm_forward(&x, &w, 1e-6, 2, 3, &mut y[..5], &mut rstd).unwrap_err());
    len("rstd_out", rms_norm_forward(&x, &w, 1e-6, 2, 3, &mut y, &mut rstd[..1]).unwrap_err());
    len("dy", rms_norm_backward_input(&dy[..1], &x, &w, &rstd, 2, 3, &mut dx).unwrap_err());
    len("rstd", rms_norm_backward_input(&dy, &x, &w, &rstd[..1], 2, 3, &mut dx).unwrap_err());
    len("dx", rms_norm_backward_input(&dy, &x, &w, &rstd, 2, 3, &mut dx[..1]).unwrap_err());
    len("dweight", rms_norm_backward_weight(&dy, &x, &rstd, 2, 3, &mut dw[..2]).unwrap_err());
    for eps in [0.0, -1e-6, f32::NAN, f32::INFINITY] {
        let e = rms_norm_forward(&x, &w, eps, 2, 3, &mut y, &mut rstd).unwrap_err();
        assert!(matches!(e, KernelError::InvalidParameter { name: "eps", .. }), "{e}");
    }
    let e = rms_norm_forward(&[], &[], 1e-6, 2, 0, &mut [], &mut rstd).unwrap_err();
    assert!(matches!(e, KernelError::InvalidShape { tensor: "x", .. }), "{e}");
    let e = rms_norm_backward_weight::<f32>(&[], &[], &[], usize::MAX, 2, &mut dw[..2]).unwrap_err();
    assert!(matches!(e, KernelError::InvalidShape { .. }), "{e}");
    // Zero rows is a valid, empty batch.
    rms_norm_forward::<f32>(&[], &w, 1e-6, 0, 3, &mut [], &mut []).unwrap();
}

// ---------------------------------------------------------------------------------------
// SwiGLU

fn swiglu_f64(gate: &[f64], up: &[f64], rows: usize, inter: usize) -> Vec<f64> {
    let mut h = vec![0.0; rows * inter];
    swiglu_forward(gate, up, rows, inter, &mut h).unwrap();
    h
}

/// Gates over the interesting range of silu, plus large magnitudes where σ saturates.
fn gates(n: usize, seed: u64) -> Vec<f64> {
    let mut g = uniform(n, -8.0, 8.0, seed);
    for (i, v) in [-40.0, -20.0, -1.2785, 0.0, 1e-3, 20.0, 40.0].into_iter().enumerate() {
        if i < n {
            g[i] = v;
        }
    }
    g
}

#[test]
fn swiglu_forward_matches_definition() {
    let gate = gates(50, 31);
    let up = uniform(50, -2.0, 2.0, 32);
    let h = swiglu_f64(&gate, &up, 5, 10);
    for ((h, g), u) in h.iter().zip(&gate).zip(&up) {
        let want = g / (1.0 + (-g).exp()) * u;
        assert!((h - want).abs() <= 4e-15 * want.abs().max(1e-300), "{h} vs {want}");
    }
}

#[test]
fn swiglu_backward_matches_fd() {
    for (case, &(rows, inter)) in [(1, 1), (3, 7), (4, 64), (8, 512)].iter().enumerate() {
        let seed = 300 + case as u64 * 10;
        let gate = gates(rows * inter, seed);
        let up = uniform(rows * inter, -2.0, 2.0, seed + 1);
        let dh = uniform(rows * inter, -1.0, 1.0, seed + 2);
        let (mut dgate, mut dup) = (vec![f64::NAN; rows * inter], vec![f64::NAN; rows * inter]);
        swiglu_backward(&dh, &gate, &up, rows, inter, &mut dgate, &mut dup).unwrap();
        check_fd(&format!("swiglu dgate {rows}x{inter}"), &gate, &dgate, seed + 3, |g| {
            dot(&dh, &swiglu_f64(g, &up, rows, inter))
        });
        check_fd(&format!("swiglu dup {rows}x{inter}"), &up, &dup, seed + 4, |u| {
            dot(&dh, &swiglu_f64(&gate, u, rows, inter))
        });
    }
}

#[test]
fn silu_is_stable_at_extremes() {
    for x in [-1e4f32, -200.0, -104.0, -90.0, 90.0, 200.0, 1e4, f32::MAX, f32::MIN] {
        assert!(sigmoid(x).is_finite() && silu(x).is_finite() && silu_grad(x).is_finite(), "{x}");
    }
    assert_eq!(sigmoid(1e4f32), 1.0);
    assert_eq!(sigmoid(-1e4f32), 0.0);
    assert_eq!(silu(1e4f32), 1e4);
    assert_eq!(silu(-1e4f32), 0.0);
    assert_eq!(silu_grad(1e4f32), 1.0);
    assert_eq!(silu_grad(-1e4f32), 0.0);
    // The small tail survives: σ(−90) ≈ 8.2e-40 is a subnormal f32, not a flushed 0.
    assert!(sigmoid(-90f32) > 0.0);
    assert_eq!(silu(f64::INFINITY), f64::INFINITY);
    assert_eq!(silu(f64::NEG_INFINITY), 0.0);
    assert_eq!(silu_grad(f64::INFINITY), 1.0);
    assert_eq!(silu_grad(f64::NEG_INFINITY), 0.0);
    assert!(silu(f64::NAN).is_nan() && silu_grad(f64::NAN).is_nan() && sigmoid(f64::NAN).is_nan());
    assert_eq!(silu(0.0f64), 0.0);
    assert_eq!(silu_grad(0.0f64), 0.5);
    // silu has its minimum where silu' = 0, at x ≈ −1.2785.
    assert!(silu_grad(-1.2785f64).abs() < 1e-4);
}

#[test]
fn swiglu_f32_agrees_with_f64() {
    let n = 4 * 2048;
    let gate = to_f32(&gates(n, 41));
    let up = to_f32(&uniform(n, -2.0, 2.0, 42));
    let dh = to_f32(&uniform(n, -1.0, 1.0, 43));
    let mut h = vec![0f32; n];
    swiglu_forward(&gate, &up, 4, 2048, &mut h).unwrap();
    let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
    swiglu_backward(&dh, &gate, &up, 4, 2048, &mut dg, &mut du).unwrap();
    let (g64, u64_, dh64) = (to_f64(&gate), to_f64(&up), to_f64(&dh));
    let h64 = swiglu_f64(&g64, &u64_, 4, 2048);
    let (mut dg64, mut du64) = (vec![0f64; n], vec![0f64; n]);
    swiglu_backward(&dh64, &g64, &u64_, 4, 2048, &mut dg64, &mut du64).unwrap();
    // silu and the products are well conditioned: relative agreement.
    for (a, b) in h.iter().zip(&h64).chain(du.iter().zip(&du64)) {
        assert!((f64::from(*a) - b).abs() <= 1e-6 * b.abs() + 1e-30, "{a} vs {b}");
    }
    // silu' = s · (1 + g · (1 − s)) cancels near its zero at g ≈ −1.28, where f32 keeps
    // only an absolute error of a few ulps of the terms `s` and `s · g · (1 − s)`.
    for i in 0..n {
        let (a, b) = (f64::from(dg[i]), dg64[i]);
        let terms = (dh64[i] * u64_[i]).abs() * (1.0 + g64[i].abs());
        let tol = 1e-6 * b.abs() + 8.0 * f64::from(f32::EPSILON) * terms + 1e-30;
        assert!((a - b).abs() <= tol, "dgate[{i}] at g = {}: {a} vs {b}", g64[i]);
    }
}

#[test]
fn swiglu_rejects_bad_lengths() {
    let v = vec![0f32; 6];
    let mut o = vec![0f32; 6];
    let mut o2 = vec![0f32; 6];
    let name = |e: KernelError| match e {
        KernelError::LengthMismatch { tensor, .. } => tensor,
        e => panic!("unexpected {e}"),
    };
    assert_eq!(name(swiglu_forward(&v[..5], &v, 2, 3, &mut o).unwrap_err()), "gate");
    assert_eq!(name(swiglu_forward(&v, &v[..5], 2, 3, &mut o).unwrap_err()), "up");
    assert_eq!(name(swiglu_forward(&v, &v, 2, 3, &mut o[..5]).unwrap_err()), "h");
    assert_eq!(name(swiglu_backward(&v[..1], &v, &v, 2, 3, &mut o, &mut o2).unwrap_err()), "dh");
    assert_eq!(name(swiglu_backward(&v, &v, &v, 2, 3, &mut o[..1], &mut o2).unwrap_err()), "dgate");
    assert_eq!(name(swiglu_backward(&v, &v, &v, 2, 3, &mut o, &mut o2[..1]).unwrap_err()), "dup");
}

// ---------------------------------------------------------------------------------------
// Cross-entropy

fn targets(rows: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..rows).map(|_| rng.random_range(0..vocab as u32)).collect()
}

fn ce_losses<T: num_traits::Float + Send + Sync>(
    logits: &[T],
    t: &[u32],
    rows: usize,
    vocab: usize,
) -> (Vec<T>, T) {
    let mut losses = vec![T::zero(); rows];
    let mean = cross_entropy_forward(logits, t, rows, vocab, &mut losses).unwrap();
    (losses, mean)
}

#[test]
fn cross_entropy_forward_matches_definition() {
    let (rows, vocab) = (6, 40);
    let logits = uniform(rows * vocab, -5.0, 5.0, 51);
    let t = targets(rows, vocab, 52);
    let (losses, mean) = ce_losses(&logits, &t, rows, vocab);
    for r in 0..rows {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let want = row.iter().map(|v| v.exp()).sum::<f64>().ln() - row[t[r] as usize];
        assert!((losses[r] - want).abs() <= 1e-13, "{} vs {want}", losses[r]);
        assert_eq!(log_softmax_at(row, t[r]).unwrap(), -losses[r]);
        let total: f64 = (0..vocab as u32).map(|j| log_softmax_at(row, j).unwrap().exp()).sum();
        assert!((total - 1.0).abs() < 1e-14);
    }
    assert!((mean - losses.iter().sum::<f64>() / rows as f64).abs() < 1e-15);
}

#[test]
fn cross_entropy_backward_matches_fd() {
    for (case, &(rows, vocab)) in [(1, 1), (3, 5), (4, 50), (8, 1000)].iter().enumerate() {
        let seed = 400 + case as u64 * 10;
        let logits = uniform(rows * vocab, -4.0, 4.0, seed);
        let t = targets(rows, vocab, seed + 1);
        let scale = 0.37;
        let mut d = vec![f64::NAN; rows * vocab];
        cross_entropy_backward(&logits, &t, rows, vocab, scale, &mut d).unwrap();
        check_fd(&format!("ce dlogits {rows}x{vocab}"), &logits, &d, seed + 2, |l| {
            scale * ce_losses(l, &t, rows, vocab).0.iter().sum::<f64>()
        });
    }
}

#[test]
fn cross_entropy_variants_are_bit_equal() {
    fn check<T: num_traits::Float + Send + Sync + std::fmt::Debug>(
        logits: Vec<T>,
        t: &[u32],
        rows: usize,
        vocab: usize,
    ) {
        let scale = T::one() / T::from(rows).unwrap();
        let (losses, mean) = ce_losses(&logits, t, rows, vocab);
        let mut out_of_place = vec![T::zero(); rows * vocab];
        cross_entropy_backward(&logits, t, rows, vocab, scale, &mut out_of_place).unwrap();
        let mut in_place = logits.clone();
        cross_entropy_backward_in_place(&mut in_place, t, rows, vocab, scale).unwrap();
        assert_eq!(in_place, out_of_place);
        let mut fused = logits.clone();
        let mut fused_losses = vec![T::zero(); rows];
        let fused_mean =
            cross_entropy_forward_backward_in_place(&mut fused, t, rows, vocab, scale, &mut fused_losses)
                .unwrap();
        assert_eq!(fused, out_of_place);
        assert_eq!(fused_losses, losses);
        assert_eq!(fused_mean, mean);
    }
    let (rows, vocab) = (37, 3000);
    let logits = uniform(rows * vocab, -10.0, 10.0, 61);
    let t = targets(rows, vocab, 62);
    check(to_f32(&logits), &t, rows, vocab);
    check(logits, &t, rows, vocab);
}

#[test]
fn cross_entropy_of_uniform_logits_is_ln_vocab() {
    let (rows, vocab) = (3, 129_280);
    let t = targets(rows, vocab, 71);
    let (l64, m64) = ce_losses(&vec![3.7f64; rows * vocab], &t, rows, vocab);
    let (l32, m32) = ce_losses(&vec![3.7f32; rows * vocab], &t, rows, vocab);
    // exp(0) = 1 exactly, so the sum is exactly `vocab` and the loss exactly ln(vocab).
    let ln_v = (vocab as f64).ln();
    assert!(l64.iter().all(|&l| l == ln_v) && l32.iter().all(|&l| l == ln_v as f32));
    // The mean divides a rounded sum by `rows`: exact in f32 (the f64 sum of f32 values
    // is), within an ulp in f64.
    assert_eq!(m32, ln_v as f32);
    assert!((m64 - ln_v).abs() <= f64::EPSILON * ln_v);
    let mut d = vec![0f64; 2 * vocab];
    cross_entropy_backward(&vec![0.0; 2 * vocab], &t[..2], 2, vocab, 1.0, &mut d).unwrap();
    let p = 1.0 / vocab as f64;
    assert_eq!(d[1 - (t[0] as usize).min(1)], p);
    assert_eq!(d[t[0] as usize], p - 1.0);
}

#[test]
fn cross_entropy_is_stable_and_shift_invariant() {
    let (rows, vocab) = (4, 500);
    let logits = to_f32(&uniform(rows * vocab, -5.0, 5.0, 81));
    let t = targets(rows, vocab, 82);
    let (base, _) = ce_losses(&logits, &t, rows, vocab);
    for shift in [1e3f32, -1e3, 3e4] {
        let shifted: Vec<f32> = logits.iter().map(|v| v + shift).collect();
        let (l, _) = ce_losses(&shifted, &t, rows, vocab);
        for (a, b) in l.iter().zip(&base) {
            // Adding `shift` rounds each logit to the spacing of f32 at |shift|.
            let ulp = shift.abs() * f32::EPSILON;
            assert!(a.is_finite() && (a - b).abs() <= 4.0 * ulp, "shift {shift}: {a} vs {b}");
        }
    }
    // A logit of 1e30 would overflow exp without the max-subtraction.
    let (l, _) = ce_losses(&[1e30f32, 0.0], &[0], 1, 2);
    assert_eq!(l[0], 0.0);
    let (l, _) = ce_losses(&[1e30f32, 0.0], &[1], 1, 2);
    assert_eq!(l[0], 1e30);
}

#[test]
fn cross_entropy_f32_agrees_with_f64() {
    let (rows, vocab) = (8, 32_768);
    let logits = to_f32(&uniform(rows * vocab, -8.0, 8.0, 91));
    let t = targets(rows, vocab, 92);
    let (l32, m32) = ce_losses(&logits, &t, rows, vocab);
    let l64f = to_f64(&logits);
    let (l64, m64) = ce_losses(&l64f, &t, rows, vocab);
    for (a, b) in l32.iter().zip(&l64) {
        assert!((f64::from(*a) - b).abs() <= 1e-6 * b.abs(), "{a} vs {b}");
    }
    assert!((f64::from(m32) - m64).abs() <= 1e-6 * m64);
    let mut d32 = vec![0f32; rows * vocab];
    cross_entropy_backward(&logits, &t, rows, vocab, 0.125, &mut d32).unwrap();
    let mut d64 = vec![0f64; rows * vocab];
    cross_entropy_backward(&l64f, &t, rows, vocab, 0.125, &mut d64).unwrap();
    for (a, b) in d32.iter().zip(&d64) {
        assert!((f64::from(*a) - b).abs() <= 1e-5 * b.abs() + 1e-12, "{a} vs {b}");
    }
}

#[test]
fn cross_entropy_is_independent_of_thread_count() {
    let (rows, vocab) = (64, 4096);
    let logits = to_f32(&uniform(rows * vocab, -6.0, 6.0, 95));
    let t = targets(rows, vocab, 96);
    let run = || {
        let mut l = logits.clone();
        let mut losses = vec![0f32; rows];
        let mean =
            cross_entropy_forward_backward_in_place(&mut l, &t, rows, vocab, 0.5, &mut losses).unwrap();
        (l, losses, mean)
    };
    let one = with_threads(1, run);
    assert_eq!(one, with_threads(2, run));
    assert_eq!(one, with_threads(7, run));
}

#[test]
fn cross_entropy_rejects_bad_input_and_writes_nothing() {
    let (rows, vocab) = (3, 129_280);
    let logits = vec![0.5f32; rows * vocab];
    let t = [5u32, 129_279, 129_280];
    let mut losses = vec![0f32; rows];
    let e = cross_entropy_forward(&logits, &t, rows, vocab, &mut losses).unwrap_err();
    match &e {
        KernelError::InvalidParameter { name: "targets", detail } => {
            assert!(detail.contains("row 2") && detail.contains("129280"), "{detail}")
        }
        e => panic!("unexpected {e}"),
    }
    let mut inplace = logits.clone();
    assert_eq!(cross_entropy_backward_in_place(&mut inplace, &t, rows, vocab, 1.0).unwrap_err(), e);
    assert_eq!(
        cross_entropy_forward_backward_in_place(&mut inplace, &t, rows, vocab, 1.0, &mut losses).unwrap_err(),
        e
    );
    assert_eq!(inplace, logits);
    assert_eq!(losses, vec![0.0; rows]);

    let ok = [1u32, 2, 3];
    let len = |e: KernelError| match e {
        KernelError::LengthMismatch { tensor, .. } => tensor,
        e => panic!("unexpected {e}"),
    };
    assert_eq!(
        len(cross_entropy_forward(&logits[1..], &ok, rows, vocab, &mut losses).unwrap_err()),
        "logits"
    );
    assert_eq!(
        len(cross_entropy_forward(&logits, &ok[..2], rows, vocab, &mut losses).unwrap_err()),
        "targets"
    );
    assert_eq!(
        len(cross_entropy_forward(&logits, &ok, rows, vocab, &mut losses[..2]).unwrap_err()),
        "losses"
    );
    let mut d = vec![0f32; 5];
    assert_eq!(len(cross_entropy_backward(&logits, &ok, rows, vocab, 1.0, &mut d).unwrap_err()), "dlogits");
    let e = cross_entropy_backward_in_place(&mut inplace, &ok, rows, vocab, f32::NAN).unwrap_err();
    assert!(matches!(e, KernelError::InvalidParameter { name: "scale", .. }), "{e}");
    let e = cross_entropy_forward::<f32>(&[], &[], 0, 0, &mut []).unwrap_err();
    assert!(matches!(e, KernelError::InvalidShape { tensor: "logits", .. }), "{e}");
    assert_eq!(cross_entropy_forward::<f32>(&[], &[], 0, 10, &mut []).unwrap(), 0.0);

    let e = log_softmax_at(&[1.0f32, 2.0], 2).unwrap_err();
    assert!(matches!(e, KernelError::InvalidParameter { name: "target", .. }), "{e}");
    let e = log_softmax_at::<f32>(&[], 0).unwrap_err();
    assert!(matches!(e, KernelError::InvalidShape { tensor: "logits_row", .. }), "{e}");
}

// ---------------------------------------------------------------------------------------
// AdamW

struct AdamState {
    p: Vec<f32>,
    g: Vec<f32>,
    m: Vec<bf16>,
    v: Vec<bf16>,
}

/// Random parameters and gradients, and moments as they look after some training (v ≥ 0).
fn adam_state(n: usize, seed: u64) -> AdamState {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let p = (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect();
    let g = (0..n).map(|_| rng.random_range(-1e-2f32..1e-2) * 2f32.powi(rng.random_range(-6..3))).collect();
    let m = (0..n).map(|_| bf16::from_f32(rng.random_range(-1e-2f32..1e-2))).collect();
    let v = (0..n).map(|_| bf16::from_f32(rng.random_range(0f32..1e-4))).collect();
    AdamState { p, g, m, v }
}

/// The module docs' formula, transcribed operation by operation in f32.
fn adamw_reference_f32(s: &mut AdamState, step: u64, lr: f32, cfg: &AdamWConfig, decay_on: bool) {
    let bc1 = 1.0 - (cfg.beta1 as f64).powf(step as f64);
    let bc2 = 1.0 - (cfg.beta2 as f64).powf(step as f64);
    let step_size = (lr as f64 / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let decay = if decay_on { (1.0 - lr as f64 * cfg.weight_decay as f64) as f32 } else { 1.0 };
    for i in 0..s.p.len() {
        let g = s.g[i];
        let m = cfg.beta1 * s.m[i].to_f32() + (1.0 - cfg.beta1) * g;
        let v = cfg.beta2 * s.v[i].to_f32() + (1.0 - cfg.beta2) * (g * g);
        s.p[i] = s.p[i] * decay - step_size * (m / (v.sqrt() / bc2_sqrt + cfg.eps));
        s.m[i] = bf16::from_f32(m);
        s.v[i] = bf16::from_f32(v);
    }
}

fn step_kernel(s: &mut AdamState, step: u64, lr: f32, cfg: &AdamWConfig, decay_on: bool) {
    adamw_step(&mut s.p, &s.g, &mut s.m, &mut s.v, step, lr, cfg, decay_on).unwrap();
}

#[test]
fn adamw_default_is_deepseek_v3() {
    let c = AdamWConfig::default();
    assert_eq!((c.beta1, c.beta2, c.eps, c.weight_decay), (0.9, 0.95, 1e-8, 0.1));
    c.validate().unwrap();
}

#[test]
fn adamw_step_matches_f64_reference() {
    let cfg = AdamWConfig::default();
    let n = 5000;
    for (step, lr) in [(1u64, 2.2e-4f32), (2, 1e-3), (37, 2.2e-4), (5000, 2.2e-5)] {
        let mut s = adam_state(n, step);
        let before = AdamState { p: s.p.clone(), g: s.g.clone(), m: s.m.clone(), v: s.v.clone() };
        step_kernel(&mut s, step, lr, &cfg, true);
        let (b1, b2, eps, wd, lr64) =
            (cfg.beta1 as f64, cfg.beta2 as f64, cfg.eps as f64, cfg.weight_decay as f64, lr as f64);
        let bc1 = 1.0 - b1.powi(step as i32);
        let bc2 = 1.0 - b2.powi(step as i32);
        for i in 0..n {
            let g = before.g[i] as f64;
            let m = b1 * before.m[i].to_f64() + (1.0 - b1) * g;
            let v = b2 * before.v[i].to_f64() + (1.0 - b2) * g * g;
            let update = lr64 / bc1 * m / ((v / bc2).sqrt() + eps);
            let p = before.p[i] as f64 * (1.0 - lr64 * wd) - update;
            // f32 arithmetic: a few ulps of the parameter and of the update.
            let tol = 4.0 * f32::EPSILON as f64 * ((before.p[i] as f64).abs() + update.abs());
            assert!((s.p[i] as f64 - p).abs() <= tol, "step {step} p[{i}]: {} vs {p}", s.p[i]);
            // Stored moments: within half a BF16 ulp (2⁻⁸ relative) of the exact ones, plus
            // the f32 arithmetic before the rounding.
            assert!((s.m[i].to_f64() - m).abs() <= (2f64.powi(-8) + 1e-6) * m.abs(), "m[{i}]");
            assert!((s.v[i].to_f64() - v).abs() <= (2f64.powi(-8) + 1e-6) * v.abs(), "v[{i}]");
        }
    }
}

#[test]
fn adamw_step_is_the_documented_f32_formula_bit_for_bit() {
    let cfg = AdamWConfig { beta1: 0.8, beta2: 0.99, eps: 1e-6, weight_decay: 0.05 };
    let mut kernel = adam_state(3 * (1 << 15) + 17, 5);
    let mut reference = adam_state(3 * (1 << 15) + 17, 5);
    for step in 1..=4u64 {
        let lr = 1e-3 / step as f32;
        let decay_on = !step.is_multiple_of(2);
        step_kernel(&mut kernel, step, lr, &cfg, decay_on);
        adamw_reference_f32(&mut reference, step, lr, &cfg, decay_on);
        assert_eq!(kernel.p, reference.p, "params after step {step}");
        // Moments stored as bf16::from_f32 of the reference's f32 moments.
        assert_eq!(kernel.m, reference.m, "m after step {step}");
        assert_eq!(kernel.v, reference.v, "v after step {step}");
    }
}

#[test]
fn adamw_first_step_from_zero_moments_moves_by_lr() {
    // Bias correction makes step 1 an update of lr · g / (|g| + eps): ±lr for |g| ≫ eps.
    let cfg = AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() };
    let mut s = adam_state(100, 9);
    // Gradients far above eps (1e-8), of either sign, over four decades.
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    for g in &mut s.g {
        let magnitude = 10f32.powf(rng.random_range(-4.0..0.0));
        *g = if rng.random() { magnitude } else { -magnitude };
    }
    s.m.fill(bf16::ZERO);
    s.v.fill(bf16::ZERO);
    let before = s.p.clone();
    step_kernel(&mut s, 1, 1e-3, &cfg, true);
    for ((b, p), g) in before.iter().zip(&s.p).zip(&s.g) {
        let moved = f64::from(b - p);
        let want = 1e-3 * f64::from(g.signum());
        assert!((moved - want).abs() <= 1e-3 * 1e-3, "{moved} vs {want}");
    }
}

#[test]
fn adamw_weight_decay_switch() {
    let cfg = AdamWConfig::default();
    let lr = 2.2e-4f32;
    // apply_weight_decay = false is exactly weight_decay = 0.
    let mut off = adam_state(1000, 3);
    let mut zero_wd = adam_state(1000, 3);
    step_kernel(&mut off, 10, lr, &cfg, false);
    step_kernel(&mut zero_wd, 10, lr, &AdamWConfig { weight_decay: 0.0, ..cfg }, true);
    assert_eq!(off.p, zero_wd.p);
    // With zero gradients and moments the Adam term vanishes: decay alone moves parameters.
    let mut s = adam_state(1000, 4);
    s.g.fill(0.0);
    s.m.fill(bf16::ZERO);
    s.v.fill(bf16::ZERO);
    let before = s.p.clone();
    step_kernel(&mut s, 3, lr, &cfg, false);
    assert_eq!(s.p, before);
    step_kernel(&mut s, 4, lr, &cfg, true);
    let decay = (1.0 - lr as f64 * 0.1) as f32;
    assert_eq!(s.p, before.iter().map(|p| p * decay).collect::<Vec<_>>());
}

#[test]
fn adamw_is_deterministic_across_runs_and_thread_counts() {
    let cfg = AdamWConfig::default();
    let run = || {
        let mut s = adam_state(200_003, 17);
        for step in 1..=3 {
            step_kernel(&mut s, step, 2.2e-4, &cfg, true);
        }
        (s.p, s.m, s.v)
    };
    let one = with_threads(1, run);
    assert_eq!(one, with_threads(1, run));
    assert_eq!(one, with_threads(2, run));
    assert_eq!(one, with_threads(6, run));
}

#[test]
fn adamw_rejects_bad_input_and_writes_nothing() {
    let mut s = adam_state(8, 1);
    let p0 = s.p.clone();
    let ok = AdamWConfig::default();
    let param = |e: KernelError| match e {
        KernelError::InvalidParameter { name, .. } => name,
        e => panic!("unexpected {e}"),
    };
    let bad_cfgs = [
        (AdamWConfig { beta1: 1.0, ..ok }, "beta1"),
        (AdamWConfig { beta1: -0.1, ..ok }, "beta1"),
        (AdamWConfig { beta2: f32::NAN, ..ok }, "beta2"),
        (AdamWConfig { eps: 0.0, ..ok }, "eps"),
        (AdamWConfig { weight_decay: -0.1, ..ok }, "weight_decay"),
        (AdamWConfig { weight_decay: f32::INFINITY, ..ok }, "weight_decay"),
    ];
    for (cfg, field) in bad_cfgs {
        assert_eq!(param(cfg.validate().unwrap_err()), field);
        assert_eq!(
            param(adamw_step(&mut s.p, &s.g, &mut s.m, &mut s.v, 1, 1e-3, &cfg, true).unwrap_err()),
            field
        );
    }
    for lr in [-1e-3f32, f32::NAN, f32::INFINITY] {
        assert_eq!(
            param(adamw_step(&mut s.p, &s.g, &mut s.m, &mut s.v, 1, lr, &ok, true).unwrap_err()),
            "lr"
        );
    }
    assert_eq!(
        param(adamw_step(&mut s.p, &s.g, &mut s.m, &mut s.v, 0, 1e-3, &ok, true).unwrap_err()),
        "step"
    );
    let len = |e: KernelError| match e {
        KernelError::LengthMismatch { tensor, .. } => tensor,
        e => panic!("unexpected {e}"),
    };
    assert_eq!(
        len(adamw_step(&mut s.p, &s.g[..7], &mut s.m, &mut s.v, 1, 1e-3, &ok, true).unwrap_err()),
        "grads"
    );
    assert_eq!(
        len(adamw_step(&mut s.p, &s.g, &mut s.m[..7], &mut s.v, 1, 1e-3, &ok, true).unwrap_err()),
        "m"
    );
    assert_eq!(
        len(adamw_step(&mut s.p, &s.g, &mut s.m, &mut s.v[..7], 1, 1e-3, &ok, true).unwrap_err()),
        "v"
    );
    assert_eq!(s.p, p0);
    // β1 = 0 (no momentum) is allowed.
    adamw_step(&mut s.p, &s.g, &mut s.m, &mut s.v, 1, 1e-3, &AdamWConfig { beta1: 0.0, ..ok }, true).unwrap();
}

// ---------------------------------------------------------------------------------------
// Gradient norm and clipping

#[test]
fn global_grad_norm_sums_in_f64() {
    assert_eq!(global_grad_norm(&[&[3.0, 0.0][..], &[][..], &[4.0][..]]), 5.0);
    assert_eq!(global_grad_norm(&[]), 0.0);
    // Squares of 1e20 overflow f32 but not f64.
    let big = global_grad_norm(&[&[1e20f32; 4][..]]);
    assert!((big - 2.0 * f64::from(1e20f32)).abs() <= 1e-15 * big);
    let tensors: Vec<Vec<f32>> = [1usize, 70_000, 150_001, 3]
        .iter()
        .enumerate()
        .map(|(i, &n)| to_f32(&uniform(n, -1.0, 1.0, 500 + i as u64)))
        .collect();
    let views: Vec<&[f32]> = tensors.iter().map(Vec::as_slice).collect();
    let naive: f64 = tensors.iter().flatten().map(|&g| f64::from(g) * f64::from(g)).sum();
    let ss = grad_sum_of_squares(&views);
    assert!((ss - naive).abs() <= 1e-12 * naive);
    assert_eq!(global_grad_norm(&views), ss.sqrt());
    let one = with_threads(1, || grad_sum_of_squares(&views));
    assert_eq!(one.to_bits(), with_threads(2, || grad_sum_of_squares(&views)).to_bits());
    assert_eq!(one.to_bits(), with_threads(5, || grad_sum_of_squares(&views)).to_bits());
    assert!(global_grad_norm(&[&[1.0, f32::NAN]]).is_nan());
}

#[test]
fn clip_scale_cases() {
    assert_eq!(clip_scale(0.5, 1.0), 1.0);
    assert_eq!(clip_scale(1.0, 1.0), 1.0);
    assert_eq!(clip_scale(4.0, 1.0), 0.25);
    assert_eq!(clip_scale(4.0, 0.0), 1.0);
    assert_eq!(clip_scale(4.0, -1.0), 1.0);
    assert_eq!(clip_scale(f64::NAN, 1.0), 1.0);
    assert_eq!(clip_scale(f64::INFINITY, 1.0), 0.0);
}

// ---------------------------------------------------------------------------------------
// Learning-rate schedule

#[test]
fn lr_schedule_boundaries() {
    let s = LrSchedule::deepseek_v3(100, 1000);
    s.validate().unwrap();
    let (peak, fin) = (2.2e-4f32, 2.2e-5f32);
    assert_eq!(s.lr_at(0), 0.0);
    assert_eq!(s.lr_at(1), (f64::from(peak) * (1.0 / 2000.0)) as f32);
    assert_eq!(s.lr_at(1000), (f64::from(peak) / 2.0) as f32);
    assert_eq!(s.lr_at(2000), peak);
    assert_eq!(s.lr_at(2001), peak);
    assert_eq!(s.lr_at(2100), peak);
    assert!(s.lr_at(2101) < peak && s.lr_at(2101) > 0.9999 * peak);
    let mid = (f64::from(peak) + f64::from(fin)) / 2.0;
    assert!((f64::from(s.lr_at(2600)) - mid).abs() <= 1e-7 * mid);
    assert!(s.lr_at(3099) > fin && s.lr_at(3099) < 1.0001 * fin);
    assert_eq!(s.lr_at(3100), fin);
    assert_eq!(s.lr_at(3101), fin);
    assert_eq!(s.lr_at(u64::MAX), fin);
    // Warm-up rises and decay falls monotonically.
    assert!((1..=2000).all(|t| s.lr_at(t) >= s.lr_at(t - 1)));
    assert!((2101..=3100).all(|t| s.lr_at(t) <= s.lr_at(t - 1)));

    // No warm-up: the peak from step 0; no decay: straight to the final rate.
    let flat =
        LrSchedule { peak_lr: 1e-3, warmup_steps: 0, constant_steps: 5, decay_steps: 0, final_lr: 1e-4 };
    assert_eq!(flat.lr_at(0), 1e-3);
    assert_eq!(flat.lr_at(5), 1e-3);
    assert_eq!(flat.lr_at(6), 1e-4);

    let bad = |s: LrSchedule| match s.validate().unwrap_err() {
        KernelError::InvalidParameter { name, .. } => name,
        e => panic!("unexpected {e}"),
    };
    assert_eq!(bad(LrSchedule { peak_lr: -1e-3, ..flat }), "peak_lr");
    assert_eq!(bad(LrSchedule { final_lr: f32::NAN, ..flat }), "final_lr");
}
