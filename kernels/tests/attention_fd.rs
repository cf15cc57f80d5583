//! RoPE and the MLA attention core against finite differences and naive f64 references.
//!
//! ## Finite-difference tolerance
//! Gradients are checked by central differences in f64, `(L(x + h) − L(x − h)) / 2h` with
//! `h = 1e-5` and the loss `L = Σ w ⊙ y` for a random `w`. The truncation error is
//! `h²/6 · |∂³L|` ≈ 2·10⁻¹¹ for the O(1) derivatives of these inputs, and the rounding
//! error is about `ε·|L| / h` ≈ 2·10⁻¹⁶ · 10 / 10⁻⁵ = 2·10⁻¹⁰. Each element must satisfy
//! `|fd − analytic| ≤ 1e-6·|analytic| + 1e-9`, a margin of ≥ 5× over both, while any real
//! mistake in a backward formula shows up as an O(|analytic|) error.

use flotilla_kernels::KernelError;
use flotilla_kernels::attention::{AttentionShape, BLOCK, attention_backward, attention_forward};
use flotilla_kernels::rope::{
    RopeConfig, RopeLayout, RopeTable, YarnScaling, rope_backward, rope_forward,
    yarn_softmax_scale_multiplier,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

const FD_H: f64 = 1e-5;
const FD_REL: f64 = 1e-6;
const FD_ABS: f64 = 1e-9;

fn randn(seed: u64, n: usize) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| StandardNormal.sample(&mut rng)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn max_abs(x: &[f64]) -> f64 {
    x.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// Central differences of `f` at every `stride`-th element of `x`, checked against `grad`.
fn check_fd(name: &str, x: &[f64], grad: &[f64], stride: usize, f: impl Fn(&[f64]) -> f64) {
    assert_eq!(x.len(), grad.len());
    let mut xp = x.to_vec();
    let mut worst = 0f64;
    for i in (0..x.len()).step_by(stride) {
        xp[i] = x[i] + FD_H;
        let up = f(&xp);
        xp[i] = x[i] - FD_H;
        let down = f(&xp);
        xp[i] = x[i];
        let fd = (up - down) / (2.0 * FD_H);
        let err = (fd - grad[i]).abs();
        worst = worst.max(err / (grad[i].abs() + FD_ABS / FD_REL));
        assert!(
            err <= FD_REL * grad[i].abs() + FD_ABS,
            "{name}[{i}]: finite difference {fd:e}, analytic {:e}, error {err:e}",
            grad[i]
        );
    }
    eprintln!("{name}: worst relative FD error {worst:.2e}");
}

// ---------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------

struct Inputs {
    shape: AttentionShape,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    scale: f64,
}

fn inputs(shape: AttentionShape, seed: u64) -> Inputs {
    let AttentionShape { batch, seq, heads, qk_dim, v_dim } = shape;
    let n = batch * seq * heads;
    Inputs {
        shape,
        q: randn(seed, n * qk_dim),
        k: randn(seed + 1, n * qk_dim),
        v: randn(seed + 2, n * v_dim),
        scale: 1.0 / (qk_dim as f64).sqrt(),
    }
}

fn shape(batch: usize, seq: usize, heads: usize, qk_dim: usize, v_dim: usize) -> AttentionShape {
    AttentionShape { batch, seq, heads, qk_dim, v_dim }
}

fn forward<T: flotilla_kernels::attention::AttentionFloat>(
    s: AttentionShape,
    q: &[T],
    k: &[T],
    v: &[T],
    scale: T,
) -> (Vec<T>, Vec<T>) {
    let mut o = vec![T::zero(); s.batch * s.seq * s.heads * s.v_dim];
    let mut lse = vec![T::zero(); s.batch * s.heads * s.seq];
    attention_forward(&mut o, &mut lse, q, k, v, s, scale).unwrap();
    (o, lse)
}

#[allow(clippy::type_complexity)]
fn backward<T: flotilla_kernels::attention::AttentionFloat>(
    s: AttentionShape,
    d_o: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    scale: T,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (o, lse) = forward(s, q, k, v, scale);
    let mut dq = vec![T::nan(); q.len()];
    let mut dk = vec![T::nan(); k.len()];
    let mut dv = vec![T::nan(); v.len()];
    attention_backward(&mut dq, &mut dk, &mut dv, d_o, q, k, v, &o, &lse, s, scale).unwrap();
    (dq, dk, dv)
}

/// Naive f64 attention with the full probability matrix: `(o, lse, P)` with
/// `P[b][h][i][j]` flattened.
fn naive_forward(x: &Inputs) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let AttentionShape { batch, seq, heads, qk_dim, v_dim } = x.shape;
    let qi = |b: usize, i: usize, h: usize| ((b * seq + i) * heads + h) * qk_dim;
    let vi = |b: usize, i: usize, h: usize| ((b * seq + i) * heads + h) * v_dim;
    let mut o = vec![0.0; batch * seq * heads * v_dim];
    let mut lse = vec![0.0; batch * heads * seq];
    let mut p = vec![0.0; batch * heads * seq * seq];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..seq {
                let s: Vec<f64> = (0..=i)
                    .map(|j| x.scale * dot(&x.q[qi(b, i, h)..][..qk_dim], &x.k[qi(b, j, h)..][..qk_dim]))
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                lse[(b * heads + h) * seq + i] = m + z.ln();
                for j in 0..=i {
                    let pij = (s[j] - m).exp() / z;
                    p[((b * heads + h) * seq + i) * seq + j] = pij;
                    for d in 0..v_dim {
                        o[vi(b, i, h) + d] += pij * x.v[vi(b, j, h) + d];
                    }
                }
            }
        }
    }
    (o, lse, p)
}

/// Naive f64 backward from the full probability matrix.
fn naive_backward(x: &Inputs, d_o: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let AttentionShape { batch, seq, heads, qk_dim, v_dim } = x.shape;
    let (_, _, p) = naive_forward(x);
    let qi = |b: usize, i: usize, h: usize| ((b * seq + i) * heads + h) * qk_dim;
    let vi = |b: usize, i: usize, h: usize| ((b * seq + i) * heads + h) * v_dim;
    let (mut dq, mut dk, mut dv) = (vec![0.0; x.q.len()], vec![0.0; x.k.len()], vec![0.0; x.v.len()]);
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..seq {
                let prow = &p[((b * heads + h) * seq + i) * seq..][..seq];
                let dp: Vec<f64> = (0..seq)
                    .map(|j| dot(&d_o[vi(b, i, h)..][..v_dim], &x.v[vi(b, j, h)..][..v_dim]))
                    .collect();
                let sum_pdp: f64 = (0..seq).map(|j| prow[j] * dp[j]).sum();
                for j in 0..=i {
                    let ds = prow[j] * (dp[j] - sum_pdp);
                    for d in 0..v_dim {
                        dv[vi(b, j, h) + d] += prow[j] * d_o[vi(b, i, h) + d];
                    }
                    for d in 0..qk_dim {
                        dq[qi(b, i, h) + d] += x.scale * ds * x.k[qi(b, j, h) + d];
                        dk[qi(b, j, h) + d] += x.scale * ds * x.q[qi(b, i, h) + d];
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

fn fd_attention(s: AttentionShape, seed: u64, stride: usize) {
    let x = inputs(s, seed);
    let w = randn(seed + 10, x.v.len());
    let (dq, dk, dv) = backward(s, &w, &x.q, &x.k, &x.v, x.scale);
    let loss = |q: &[f64], k: &[f64], v: &[f64]| dot(&forward(s, q, k, v, x.scale).0, &w);
    check_fd("dq", &x.q, &dq, stride, |q| loss(q, &x.k, &x.v));
    check_fd("dk", &x.k, &dk, stride, |k| loss(&x.q, k, &x.v));
    check_fd("dv", &x.v, &dv, stride, |v| loss(&x.q, &x.k, v));
}

#[test]
fn attention_gradients_match_finite_differences() {
    // qk_dim ≠ v_dim, as in MLA.
    fd_attention(shape(2, 5, 3, 6, 4), 1, 1);
    // qk_dim == v_dim.
    fd_attention(shape(1, 4, 2, 5, 5), 2, 1);
}

#[test]
fn attention_gradients_match_finite_differences_across_blocks() {
    // seq > BLOCK, so a row block meets keys of earlier blocks and dK, dV accumulate over
    // blocks; every 7th element keeps the test fast.
    const { assert!(BLOCK < 70) };
    fd_attention(shape(1, 70, 2, 3, 2), 3, 7);
}

#[test]
fn attention_matches_naive_reference() {
    // MLA's head dims at a CPU-sized sequence spanning several row blocks.
    let s = shape(2, 160, 2, 192, 128);
    let x = inputs(s, 4);
    let (o, lse) = forward(s, &x.q, &x.k, &x.v, x.scale);
    let (o_ref, lse_ref, _) = naive_forward(&x);
    let rel =
        |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / max_abs(b);
    assert!(rel(&o, &o_ref) < 1e-12, "o: {:e}", rel(&o, &o_ref));
    assert!(rel(&lse, &lse_ref) < 1e-12, "lse: {:e}", rel(&lse, &lse_ref));

    let d_o = randn(40, o.len());
    let (dq, dk, dv) = backward(s, &d_o, &x.q, &x.k, &x.v, x.scale);
    let (dq_ref, dk_ref, dv_ref) = naive_backward(&x, &d_o);
    for (name, a, b) in [("dq", &dq, &dq_ref), ("dk", &dk, &dk_ref), ("dv", &dv, &dv_ref)] {
        assert!(rel(a, b) < 1e-11, "{name}: {:e}", rel(a, b));
    }
}

#[test]
fn attention_is_causal() {
    let s = shape(2, 80, 2, 8, 6);
    let x = inputs(s, 5);
    let (o, lse) = forward(s, &x.q, &x.k, &x.v, x.scale);
    let t = 67; // in the second row block
    let (mut k2, mut v2) = (x.k.clone(), x.v.clone());
    for b in 0..s.batch {
        for h in 0..s.heads {
            let row = (b * s.seq + t) * s.heads + h;
            k2[row * s.qk_dim..][..s.qk_dim].iter_mut().for_each(|e| *e += 3.0);
            v2[row * s.v_dim..][..s.v_dim].iter_mut().for_each(|e| *e -= 5.0);
        }
    }
    let (o2, lse2) = forward(s, &x.q, &k2, &v2, x.scale);
    let row_len = s.heads * s.v_dim;
    for b in 0..s.batch {
        for i in 0..s.seq {
            let r = (b * s.seq + i) * row_len;
            let (a, c) = (&o[r..r + row_len], &o2[r..r + row_len]);
            if i < t {
                assert_eq!(a, c, "output at position {i} < {t} changed");
            } else {
                assert_ne!(a, c, "output at position {i} ≥ {t} did not change");
            }
        }
        for h in 0..s.heads {
            let r = (b * s.heads + h) * s.seq;
            assert_eq!(lse[r..r + t], lse2[r..r + t]);
        }
    }
}

#[test]
fn attention_f32_agrees_with_f64() {
    let s = shape(2, 96, 3, 48, 32);
    let x = inputs(s, 6);
    let d_o = randn(60, s.batch * s.seq * s.heads * s.v_dim);
    let f = |v: &[f64]| v.iter().map(|&e| e as f32).collect::<Vec<f32>>();
    let (o64, lse64) = forward(s, &x.q, &x.k, &x.v, x.scale);
    let (o32, lse32) = forward(s, &f(&x.q), &f(&x.k), &f(&x.v), x.scale as f32);
    let (g64, g32) = (
        backward(s, &d_o, &x.q, &x.k, &x.v, x.scale),
        backward(s, &f(&d_o), &f(&x.q), &f(&x.k), &f(&x.v), x.scale as f32),
    );
    // Dot products of ≤ 96 terms with unit roundoff 6e-8 and a softmax in f32: errors
    // are a few 1e-7 of the tensor's scale; 1e-5 leaves ample margin.
    let rel = |a: &[f32], b: &[f64]| {
        a.iter().zip(b).map(|(&x, y)| (x as f64 - y).abs()).fold(0.0, f64::max) / max_abs(b)
    };
    for (name, a, b) in [
        ("o", &o32, &o64),
        ("lse", &lse32, &lse64),
        ("dq", &g32.0, &g64.0),
        ("dk", &g32.1, &g64.1),
        ("dv", &g32.2, &g64.2),
    ] {
        let e = rel(a, b);
        eprintln!("{name}: f32 vs f64 relative error {e:.2e}");
        assert!(e < 1e-5, "{name}: {e:e}");
    }
}

#[test]
fn attention_is_deterministic_across_thread_counts() {
    let s = shape(2, 100, 3, 24, 16);
    let x = inputs(s, 7);
    let x32 = |v: &[f64]| v.iter().map(|&e| e as f32).collect::<Vec<f32>>();
    let (q, k, v) = (x32(&x.q), x32(&x.k), x32(&x.v));
    let d_o = x32(&randn(70, s.batch * s.seq * s.heads * s.v_dim));
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| (forward(s, &q, &k, &v, 0.3f32), backward(s, &d_o, &q, &k, &v, 0.3f32)))
    };
    let one = run(1);
    for threads in [2, 5] {
        let many = run(threads);
        assert!(one.0.0 == many.0.0 && one.0.1 == many.0.1, "forward differs with {threads} threads");
        assert!(
            one.1.0 == many.1.0 && one.1.1 == many.1.1 && one.1.2 == many.1.2,
            "backward differs with {threads} threads"
        );
    }
}

#[test]
fn attention_rejects_bad_inputs() {
    let s = shape(2, 3, 2, 4, 5);
    let n = 2 * 3 * 2;
    let (q, k, v) = (vec![0f32; n * 4], vec![0f32; n * 4], vec![0f32; n * 5]);
    let (mut o, mut lse) = (vec![0f32; n * 5], vec![0f32; n]);
    let len_err = |tensor: &'static str, expected: usize, actual: usize| {
        Err(KernelError::LengthMismatch { tensor, expected, actual })
    };
    assert_eq!(attention_forward(&mut o, &mut lse, &q[1..], &k, &v, s, 0.5), len_err("q", n * 4, n * 4 - 1));
    assert_eq!(attention_forward(&mut o, &mut lse, &q, &k[..4], &v, s, 0.5), len_err("k", n * 4, 4));
    assert_eq!(attention_forward(&mut o, &mut lse, &q, &k, &q, s, 0.5), len_err("v", n * 5, n * 4));
    assert_eq!(attention_forward(&mut o[1..], &mut lse, &q, &k, &v, s, 0.5), len_err("o", n * 5, n * 5 - 1));
    assert_eq!(attention_forward(&mut o, &mut lse[1..], &q, &k, &v, s, 0.5), len_err("lse", n, n - 1));
    assert!(matches!(
        attention_forward(&mut o, &mut lse, &q, &k, &v, s, f32::NAN),
        Err(KernelError::InvalidParameter { name: "softmax_scale", .. })
    ));
    let huge = shape(usize::MAX, 2, 1, 1, 1);
    assert!(matches!(
        attention_forward(&mut o, &mut lse, &q, &k, &v, huge, 0.5),
        Err(KernelError::InvalidShape { tensor: "q", .. })
    ));

    attention_forward(&mut o, &mut lse, &q, &k, &v, s, 0.5).unwrap();
    let (mut dq, mut dk, mut dv) = (vec![0f32; n * 4], vec![0f32; n * 4], vec![0f32; n * 5]);
    let d_o = vec![0f32; n * 5];
    assert_eq!(
        attention_backward(&mut dq, &mut dk, &mut dv, &d_o[1..], &q, &k, &v, &o, &lse, s, 0.5),
        len_err("d_o", n * 5, n * 5 - 1)
    );
    assert_eq!(
        attention_backward(&mut dq[1..], &mut dk, &mut dv, &d_o, &q, &k, &v, &o, &lse, s, 0.5),
        len_err("dq", n * 4, n * 4 - 1)
    );
    assert_eq!(
        attention_backward(&mut dq, &mut dk[1..], &mut dv, &d_o, &q, &k, &v, &o, &lse, s, 0.5),
        len_err("dk", n * 4, n * 4 - 1)
    );
    assert_eq!(
        attention_backward(&mut dq, &mut dk, &mut dv[1..], &d_o, &q, &k, &v, &o, &lse, s, 0.5),
        len_err("dv", n * 5, n * 5 - 1)
    );
    assert_eq!(
        attention_backward(&mut dq, &mut dk, &mut dv, &d_o, &q, &k, &v, &o, &lse[1..], s, 0.5),
        len_err("lse", n, n - 1)
    );
    assert!(matches!(
        attention_backward(&mut dq, &mut dk, &mut dv, &d_o, &q, &k, &v, &o, &lse, s, f32::INFINITY),
        Err(KernelError::InvalidParameter { name: "softmax_scale", .. })
    ));
    // Empty shapes are no-ops, not errors.
    let empty = shape(0, 3, 2, 4, 5);
    assert_eq!(attention_forward::<f32>(&mut [], &mut [], &[], &[], &[], empty, 0.5), Ok(()));
}

// ---------------------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------------------

fn plain(head_dim: usize) -> RopeConfig {
    RopeConfig { head_dim, theta: 10000.0, scaling: None }
}

fn v3_yarn() -> YarnScaling {
    YarnScaling {
        factor: 40.0,
        original_max_position_embeddings: 4096,
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: 1.0,
        mscale_all_dim: 1.0,
    }
}

/// MLA's query layout in miniature: `[tokens, heads, nope + rope]`, rope at offset `nope`.
const NOPE: usize = 3;
const ROPE: usize = 6;
const HEADS: usize = 3;
const TOKENS: usize = 4;

fn q_layout() -> RopeLayout {
    RopeLayout { tokens: TOKENS, heads: HEADS, head_stride: NOPE + ROPE, offset: NOPE }
}

#[test]
fn rope_backward_matches_finite_differences() {
    let table = RopeTable::<f64>::new(&plain(ROPE), 50).unwrap();
    let positions = [0, 7, 31, 49];
    let x = randn(20, TOKENS * HEADS * (NOPE + ROPE));
    let w = randn(21, x.len());
    let mut grad = w.clone();
    rope_backward(&mut grad, q_layout(), &positions, &table).unwrap();
    check_fd("rope dx", &x, &grad, 1, |x| {
        let mut y = x.to_vec();
        rope_forward(&mut y, q_layout(), &positions, &table).unwrap();
        dot(&y, &w)
    });
    // The nope dims' gradient passes through bit for bit.
    for (i, (g, w)) in grad.iter().zip(&w).enumerate() {
        if i % (NOPE + ROPE) < NOPE {
            assert_eq!(g, w);
        }
    }
}

#[test]
fn rope_preserves_pair_norms_and_inverts() {
    let table = RopeTable::<f64>::new(&plain(ROPE), 1000).unwrap();
    let positions = [3, 999, 0, 512];
    let x = randn(22, TOKENS * HEADS * (NOPE + ROPE));
    let mut y = x.clone();
    rope_forward(&mut y, q_layout(), &positions, &table).unwrap();
    for (t, (xt, yt)) in x.chunks(HEADS * (NOPE + ROPE)).zip(y.chunks(HEADS * (NOPE + ROPE))).enumerate() {
        for (xh, yh) in xt.chunks(NOPE + ROPE).zip(yt.chunks(NOPE + ROPE)) {
            assert_eq!(xh[..NOPE], yh[..NOPE], "nope dims must not change");
            for (xp, yp) in xh[NOPE..].chunks(2).zip(yh[NOPE..].chunks(2)) {
                let (nx, ny) = (xp[0].hypot(xp[1]), yp[0].hypot(yp[1]));
                assert!((nx - ny).abs() <= 1e-14 * nx, "pair norm {nx} → {ny}");
            }
            if positions[t] == 0 {
                assert_eq!(xh, yh, "position 0 is the identity");
            }
        }
    }
    rope_backward(&mut y, q_layout(), &positions, &table).unwrap();
    let err = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(err < 1e-14, "forward then backward is off by {err:e}");
}

#[test]
fn rope_rotates_interleaved_pairs_as_deepseek_and_hf_up_to_the_documented_permutation() {
    let d = 8;
    let table = RopeTable::<f64>::new(&plain(d), 100).unwrap();
    let p = 37usize;
    let x = randn(23, d);
    let mut ours = x.clone();
    rope_forward(&mut ours, RopeLayout::contiguous(1, 1, d), &[p], &table).unwrap();
    // DeepSeek: pair (x[2i], x[2i+1]) times e^{i·p·θ^(−2i/d)}.
    for i in 0..d / 2 {
        let ang = p as f64 * 10000f64.powf(-((2 * i) as f64) / d as f64);
        let (re, im) = (x[2 * i], x[2 * i + 1]);
        assert!((ours[2 * i] - (re * ang.cos() - im * ang.sin())).abs() < 1e-13);
        assert!((ours[2 * i + 1] - (re * ang.sin() + im * ang.cos())).abs() < 1e-13);
    }
    // HF: half[j] = x[2j], half[d/2 + j] = x[2j+1], then x·cos + rotate_half(x)·sin with
    // cos/sin = cat(freqs, freqs). Its output must be P·ours.
    let half: Vec<f64> = (0..d).map(|j| if j < d / 2 { x[2 * j] } else { x[2 * (j - d / 2) + 1] }).collect();
    let hf: Vec<f64> = (0..d)
        .map(|j| {
            let ang = p as f64 * 10000f64.powf(-((2 * (j % (d / 2))) as f64) / d as f64);
            let rot = if j < d / 2 { -half[j + d / 2] } else { half[j - d / 2] };
            half[j] * ang.cos() + rot * ang.sin()
        })
        .collect();
    for j in 0..d / 2 {
        assert!((hf[j] - ours[2 * j]).abs() < 1e-13);
        assert!((hf[d / 2 + j] - ours[2 * j + 1]).abs() < 1e-13);
    }
}

#[test]
fn rope_rotates_the_shared_key_inside_the_kv_a_output_without_copies() {
    // kv_a output rows [latent | rope]: the rope key is a strided slice with one "head".
    let (latent, tokens) = (5, 3);
    let table = RopeTable::<f64>::new(&plain(ROPE), 10).unwrap();
    let positions = [4, 1, 9];
    let kv = randn(24, tokens * (latent + ROPE));
    let mut in_place = kv.clone();
    let layout = RopeLayout { tokens, heads: 1, head_stride: latent + ROPE, offset: latent };
    rope_forward(&mut in_place, layout, &positions, &table).unwrap();
    let mut k_pe: Vec<f64> = kv.chunks(latent + ROPE).flat_map(|r| r[latent..].to_vec()).collect();
    rope_forward(&mut k_pe, RopeLayout::contiguous(tokens, 1, ROPE), &positions, &table).unwrap();
    for (t, row) in in_place.chunks(latent + ROPE).enumerate() {
        assert_eq!(row[..latent], kv[t * (latent + ROPE)..][..latent]);
        assert_eq!(row[latent..], k_pe[t * ROPE..][..ROPE]);
    }
}

#[test]
fn yarn_table_matches_hand_computed_values() {
    let config = RopeConfig { head_dim: 64, theta: 10000.0, scaling: Some(v3_yarn()) };
    let table = RopeTable::<f64>::new(&config, 5001).unwrap();
    assert!(table.yarn_applied());

    // The correction range, from cd(r) = d·ln(L/(2π r)) / (2 ln θ):
    // cd(32) = 64·ln(4096/(64π))/(2 ln 10⁴) = 10.47 → ⌊⌋ = 10; cd(1) = 22.51 → ⌈⌉ = 23.
    let cd = |r: f64| 64.0 * (4096.0 / (2.0 * std::f64::consts::PI * r)).ln() / (2.0 * 10000f64.ln());
    assert_eq!((cd(32.0).floor(), cd(1.0).ceil()), (10.0, 23.0));
    // Below dim 10 frequencies are kept, from 23 on divided by 40, and in between
    // interpolated: dim 16 has ω = 10⁴^(−1/2) = 0.01 and ramp (16−10)/13, so
    // ω' = 0.01·(7/13 + (6/13)/40) = 0.01·286/520 = 0.0055.
    let expected = [
        (0, 1.0),
        (9, 10000f64.powf(-18.0 / 64.0)),
        (16, 0.0055),
        (22, 10000f64.powf(-44.0 / 64.0) * (1.0 / 13.0 + (12.0 / 13.0) / 40.0)),
        (23, 10000f64.powf(-46.0 / 64.0) / 40.0),
        (31, 10000f64.powf(-62.0 / 64.0) / 40.0),
    ];
    for (i, w) in expected {
        let got = table.inv_freq()[i];
        assert!((got - w).abs() <= 1e-15 * w, "ω[{i}] = {got:e}, expected {w:e}");
        for p in [1usize, 4097, 5000] {
            let (c, s) = (table.cos_row(p).unwrap()[i], table.sin_row(p).unwrap()[i]);
            // The angle p·ω is ≤ 5000 rad, so its rounding bounds the agreement.
            assert!((c - (p as f64 * w).cos()).abs() < 1e-11, "cos at p = {p}, i = {i}");
            assert!((s - (p as f64 * w).sin()).abs() < 1e-11, "sin at p = {p}, i = {i}");
        }
    }
    // mscale = 0.1·ln 40 + 1 = 1.36889…, squared 1.87385…
    let m: f64 = 0.1 * 40f64.ln() + 1.0;
    assert!((table.softmax_scale_multiplier() - m * m).abs() < 1e-15);
    assert!((yarn_softmax_scale_multiplier(&v3_yarn()) - 1.873_854_207_092_626).abs() < 1e-12);

    // As in DeepSeek's code, a table no longer than the original context gets no YaRN.
    let short = RopeTable::<f64>::new(&config, 4096).unwrap();
    assert!(!short.yarn_applied());
    assert_eq!(short.softmax_scale_multiplier(), 1.0);
    assert_eq!(short.inv_freq()[31], 10000f64.powf(-62.0 / 64.0));
}

#[test]
fn rope_f32_agrees_with_f64() {
    let config = RopeConfig { head_dim: 64, theta: 10000.0, scaling: Some(v3_yarn()) };
    let (t32, t64) =
        (RopeTable::<f32>::new(&config, 8192).unwrap(), RopeTable::<f64>::new(&config, 8192).unwrap());
    let layout = RopeLayout { tokens: 5, heads: 4, head_stride: 192, offset: 128 };
    let positions = [0, 1, 100, 4095, 8191];
    let x = randn(25, 5 * 4 * 192);
    let mut y64 = x.clone();
    let mut y32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    rope_forward(&mut y64, layout, &positions, &t64).unwrap();
    rope_forward(&mut y32, layout, &positions, &t32).unwrap();
    // Each output is a 2-term dot product of f32-rounded values: a few ulps of its pair.
    let err = y32.iter().zip(&y64).map(|(&a, b)| (a as f64 - b).abs()).fold(0.0, f64::max);
    assert!(err < 1e-6 * max_abs(&y64), "f32 vs f64: {err:e}");
}

#[test]
fn rope_rejects_bad_inputs() {
    let err_name = |r: Result<RopeTable<f32>, KernelError>| match r {
        Err(KernelError::InvalidParameter { name, .. }) => name,
        other => panic!("expected an invalid parameter, got {other:?}"),
    };
    assert_eq!(err_name(RopeTable::new(&plain(7), 10)), "head_dim");
    assert_eq!(err_name(RopeTable::new(&plain(0), 10)), "head_dim");
    assert_eq!(err_name(RopeTable::new(&RopeConfig { theta: f64::NAN, ..plain(4) }, 10)), "theta");
    assert_eq!(err_name(RopeTable::new(&plain(4), 0)), "max_positions");
    let with = |s: YarnScaling| RopeConfig { scaling: Some(s), ..plain(4) };
    assert_eq!(err_name(RopeTable::new(&with(YarnScaling { factor: 0.0, ..v3_yarn() }), 10)), "factor");
    assert_eq!(
        err_name(RopeTable::new(&with(YarnScaling { beta_slow: -1.0, ..v3_yarn() }), 10)),
        "beta_slow"
    );
    assert_eq!(
        err_name(RopeTable::new(&with(YarnScaling { original_max_position_embeddings: 0, ..v3_yarn() }), 10)),
        "original_max_position_embeddings"
    );
    assert_eq!(err_name(RopeTable::new(&with(YarnScaling { mscale: 0.707, ..v3_yarn() }), 10)), "mscale");
    assert!(matches!(
        RopeTable::<f32>::new(&plain(4), usize::MAX),
        Err(KernelError::InvalidShape { tensor: "rope_table", .. })
    ));

    let table = RopeTable::<f32>::new(&plain(ROPE), 8).unwrap();
    let mut x = vec![0f32; TOKENS * HEADS * (NOPE + ROPE)];
    match rope_forward(&mut x, q_layout(), &[0, 1, 8, 2], &table) {
        Err(KernelError::InvalidParameter { name: "positions", detail }) => {
            assert!(detail.contains("token 2"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        rope_forward(&mut x, q_layout(), &[0, 1], &table),
        Err(KernelError::LengthMismatch { tensor: "positions", expected: TOKENS, actual: 2 })
    );
    assert_eq!(
        rope_backward(&mut x[1..], q_layout(), &[0; TOKENS], &table),
        Err(KernelError::LengthMismatch { tensor: "dy", expected: x.len(), actual: x.len() - 1 })
    );
    let overhanging = RopeLayout { offset: NOPE + 1, ..q_layout() };
    assert!(matches!(
        rope_forward(&mut x, overhanging, &[0; TOKENS], &table),
        Err(KernelError::InvalidShape { tensor: "x", .. })
    ));
    let overflow = RopeLayout { offset: usize::MAX, ..q_layout() };
    assert!(matches!(
        rope_forward(&mut x, overflow, &[0; TOKENS], &table),
        Err(KernelError::InvalidShape { tensor: "x", .. })
    ));
    let huge = RopeLayout { tokens: 2, heads: usize::MAX, head_stride: ROPE, offset: 0 };
    assert!(matches!(rope_forward(&mut x, huge, &[0, 0], &table), Err(KernelError::InvalidShape { .. })));
}
