//! The GEMMs against f64 references computed here: dense f32 and BF16 over strided and
//! transposed views, the block-scaled FP8 GEMM in both accumulation models, the grouped
//! MoE form, and every error path.
//!
//! Tolerances come from the standard bound on a floating-point dot product: however the
//! `k` products are ordered (and whether they are fused), `|fl(Σ) − Σ| ≤ γ·Σ|aᵢbᵢ|` with
//! `γ ≈ k·u` and `u = 2⁻²⁴` for f32; each further scaling or addition adds one `u`.

mod common;

use common::limited_model;
use flotilla_kernels::KernelError;
use flotilla_kernels::fp8::E4M3_TO_F32;
use flotilla_kernels::gemm::{
    Accumulation, AccumulatorRounding, LimitedAccumulator, MatMut, MatRef, gemm_bf16, gemm_f32, gemm_fp8,
    grouped_gemm_fp8,
};
use flotilla_kernels::metrics::calc_diff;
use flotilla_kernels::quant::{Fp8Matrix, Granularity, QuantConfig, TILE, quantize};
use half::bf16;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// f32's unit roundoff.
const U32: f64 = 1.0 / (1u64 << 24) as f64;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn randn(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
}

/// `Σ_k a(i, k)·b(k, j)` and `Σ_k |a(i, k)·b(k, j)|` in f64, row-major `[m, n]`.
fn reference(
    m: usize,
    n: usize,
    k: usize,
    a: impl Fn(usize, usize) -> f64,
    b: impl Fn(usize, usize) -> f64,
) -> (Vec<f64>, Vec<f64>) {
    let (mut c, mut abs) = (vec![0f64; m * n], vec![0f64; m * n]);
    for i in 0..m {
        for kk in 0..k {
            let av = a(i, kk);
            for j in 0..n {
                let p = av * b(kk, j);
                c[i * n + j] += p;
                abs[i * n + j] += p.abs();
            }
        }
    }
    (c, abs)
}

/// Asserts `|got − want| ≤ (k + 3)·u·(|alpha|·Σ|ab| + |beta·c0|)` element-wise.
#[allow(clippy::too_many_arguments)]
fn assert_within_f32_bound(
    what: &str,
    got: &[f32],
    dot: &[f64],
    abs: &[f64],
    c0: &[f32],
    alpha: f32,
    beta: f32,
    k: usize,
) {
    for (idx, &g) in got.iter().enumerate() {
        let c0_term = if beta == 0.0 { 0.0 } else { beta as f64 * c0[idx] as f64 };
        let want = alpha as f64 * dot[idx] + c0_term;
        let scale = (alpha as f64).abs() * abs[idx] + c0_term.abs();
        let bound = (k as f64 + 3.0) * U32 * scale * 1.01 + f64::MIN_POSITIVE;
        let err = (g as f64 - want).abs();
        assert!(err <= bound, "{what}: element {idx}: got {g}, want {want}, error {err:e} > bound {bound:e}");
    }
}

const SHAPES: [(usize, usize, usize); 8] = [
    (1, 1, 1),
    (7, 13, 5),
    (1, 40, 9),
    (17, 1, 33),
    (64, 64, 64),
    (129, 65, 257),
    (300, 257, 130),
    (33, 70, 1100),
];

#[test]
fn f32_matches_f64_reference_across_shapes_and_scalars() {
    let mut rng = rng(1);
    for &(m, n, k) in &SHAPES {
        let a = randn(&mut rng, m * k);
        let b = randn(&mut rng, k * n);
        let c0 = randn(&mut rng, m * n);
        let (dot, abs) = reference(m, n, k, |i, kk| a[i * k + kk] as f64, |kk, j| b[kk * n + j] as f64);
        for (alpha, beta) in [(1.0f32, 0.0f32), (0.5, -2.0), (-1.25, 1.0)] {
            for threads in [1, 2] {
                let mut c = c0.clone();
                if beta == 0.0 {
                    // beta = 0 must not read C: garbage there may not leak into the result.
                    c.fill(f32::NAN);
                }
                gemm_f32(
                    MatMut::row_major(&mut c, m, n, "c").unwrap(),
                    beta,
                    MatRef::row_major(&a, m, k, "a").unwrap(),
                    MatRef::row_major(&b, k, n, "b").unwrap(),
                    alpha,
                    threads,
                )
                .unwrap();
                let what = format!("{m}×{n}×{k}, alpha {alpha}, beta {beta}, {threads} threads");
                assert_within_f32_bound(&what, &c, &dot, &abs, &c0, alpha, beta, k);
            }
        }
    }
}

#[test]
fn f32_degenerate_scalars_and_k_zero() {
    let mut rng = rng(2);
    let (m, n, k) = (5, 6, 7);
    let mut a = randn(&mut rng, m * k);
    let b = randn(&mut rng, k * n);
    let c0 = randn(&mut rng, m * n);
    fn view(c: &mut [f32], m: usize, n: usize) -> MatMut<'_, f32> {
        MatMut::row_major(c, m, n, "c").unwrap()
    }

    // alpha = 0: A and B are not read (NaN in A does not propagate); C = beta·C.
    a[3] = f32::NAN;
    let mut c = c0.clone();
    gemm_f32(
        view(&mut c, m, n),
        2.0,
        MatRef::row_major(&a, m, k, "a").unwrap(),
        MatRef::row_major(&b, k, n, "b").unwrap(),
        0.0,
        1,
    )
    .unwrap();
    assert!(c.iter().zip(&c0).all(|(&x, &y)| x == 2.0 * y));

    // K = 0: C = beta·C, and zeros when beta = 0 even over NaN.
    let mut c = c0.clone();
    let empty_a = MatRef::row_major(&[], m, 0, "a").unwrap();
    let empty_b = MatRef::row_major(&[], 0, n, "b").unwrap();
    gemm_f32(view(&mut c, m, n), -0.5, empty_a, empty_b, 1.0, 2).unwrap();
    assert!(c.iter().zip(&c0).all(|(&x, &y)| x == -0.5 * y));
    let mut c = vec![f32::NAN; m * n];
    gemm_f32(view(&mut c, m, n), 0.0, empty_a, empty_b, 1.0, 1).unwrap();
    assert!(c.iter().all(|&x| x == 0.0));
    let mut c = c0.clone();
    gemm_f32(view(&mut c, m, n), 1.0, empty_a, empty_b, 1.0, 1).unwrap();
    assert_eq!(c, c0);

    // Empty M or N: nothing to do, nothing touched.
    gemm_f32(
        MatMut::row_major(&mut [], 0, n, "c").unwrap(),
        0.0,
        MatRef::row_major(&[], 0, k, "a").unwrap(),
        MatRef::row_major(&b, k, n, "b").unwrap(),
        1.0,
        1,
    )
    .unwrap();
}

/// The backward GEMMs of `Y = X·W`: `dX = dY·Wᵀ` and `dW = Xᵀ·dY`, read through `.t()`
/// views, plus a column-major (transposed) output.
#[test]
fn backward_gemms_through_transposed_views() {
    let mut rng = rng(3);
    let (t, din, dout) = (150, 70, 90);
    let x = randn(&mut rng, t * din);
    let w = randn(&mut rng, din * dout);
    let dy = randn(&mut rng, t * dout);
    for threads in [1, 2] {
        // dX [t, din] = dY [t, dout] · Wᵀ [dout, din]
        let mut dx = vec![f32::NAN; t * din];
        gemm_f32(
            MatMut::row_major(&mut dx, t, din, "dx").unwrap(),
            0.0,
            MatRef::row_major(&dy, t, dout, "dy").unwrap(),
            MatRef::row_major(&w, din, dout, "w").unwrap().t(),
            1.0,
            threads,
        )
        .unwrap();
        let (dot, abs) =
            reference(t, din, dout, |i, kk| dy[i * dout + kk] as f64, |kk, j| w[j * dout + kk] as f64);
        assert_within_f32_bound("dX = dY·Wᵀ", &dx, &dot, &abs, &dx, 1.0, 0.0, dout);

        // dW [din, dout] = Xᵀ [din, t] · dY [t, dout]
        let mut dw = vec![f32::NAN; din * dout];
        gemm_f32(
            MatMut::row_major(&mut dw, din, dout, "dw").unwrap(),
            0.0,
            MatRef::row_major(&x, t, din, "x").unwrap().t(),
            MatRef::row_major(&dy, t, dout, "dy").unwrap(),
            1.0,
            threads,
        )
        .unwrap();
        let (dot, abs) =
            reference(din, dout, t, |i, kk| x[kk * din + i] as f64, |kk, j| dy[kk * dout + j] as f64);
        assert_within_f32_bound("dW = Xᵀ·dY", &dw, &dot, &abs, &dw, 1.0, 0.0, t);

        // Accumulating into a column-major dWᵀ buffer: (dWᵀ)ᵀ += Xᵀ·dY.
        let mut dwt: Vec<f32> = randn(&mut rng, dout * din);
        let c0: Vec<f32> = (0..din * dout).map(|idx| dwt[(idx % dout) * din + idx / dout]).collect();
        gemm_f32(
            MatMut::row_major(&mut dwt, dout, din, "dwt").unwrap().t(),
            1.0,
            MatRef::row_major(&x, t, din, "x").unwrap().t(),
            MatRef::row_major(&dy, t, dout, "dy").unwrap(),
            1.0,
            threads,
        )
        .unwrap();
        let got: Vec<f32> = (0..din * dout).map(|idx| dwt[(idx % dout) * din + idx / dout]).collect();
        assert_within_f32_bound("column-major C", &got, &dot, &abs, &c0, 1.0, 1.0, t);
    }
}

/// Sub-matrices of larger buffers (row stride > cols), with everything outside the
/// output view left untouched.
#[test]
fn strided_submatrix_views() {
    let mut rng = rng(4);
    let (m, n, k) = (37, 29, 45);
    let (lda, ldb, ldc) = (k + 11, n + 3, n + 7);
    let (a_off, b_off, c_off) = (5, 2, 9);
    let a_buf = randn(&mut rng, a_off + (m - 1) * lda + k + 4);
    let b_buf = randn(&mut rng, b_off + (k - 1) * ldb + n);
    let sentinel = 12345.0f32;
    for threads in [1, 2] {
        let mut c_buf = vec![sentinel; c_off + (m - 1) * ldc + n + 6];
        gemm_f32(
            MatMut::new(&mut c_buf[c_off..], m, n, ldc as isize, 1, "c").unwrap(),
            0.0,
            MatRef::new(&a_buf[a_off..], m, k, lda as isize, 1, "a").unwrap(),
            MatRef::new(&b_buf[b_off..], k, n, ldb as isize, 1, "b").unwrap(),
            1.0,
            threads,
        )
        .unwrap();
        let (dot, abs) = reference(
            m,
            n,
            k,
            |i, kk| a_buf[a_off + i * lda + kk] as f64,
            |kk, j| b_buf[b_off + kk * ldb + j] as f64,
        );
        let got: Vec<f32> = (0..m * n).map(|idx| c_buf[c_off + (idx / n) * ldc + idx % n]).collect();
        assert_within_f32_bound("strided views", &got, &dot, &abs, &got, 1.0, 0.0, k);
        for (pos, &v) in c_buf.iter().enumerate() {
            let inside = pos >= c_off && (pos - c_off) % ldc < n && (pos - c_off) / ldc < m;
            if !inside {
                assert_eq!(v, sentinel, "offset {pos} outside the view was written");
            }
        }
    }
}

/// The `gemm` crate splits work across threads by blocks of C, never along K, so one
/// element's sum is formed the same way whatever the thread count: results must match
/// bit for bit (this test is what establishes it for the shapes we use).
#[test]
fn f32_results_do_not_depend_on_thread_count() {
    let mut rng = rng(5);
    for &(m, n, k) in &[(300, 257, 130), (256, 256, 256), (129, 65, 1500), (512, 96, 600)] {
        let a = randn(&mut rng, m * k);
        let b = randn(&mut rng, k * n);
        let run = |threads| {
            let mut c = vec![0f32; m * n];
            gemm_f32(
                MatMut::row_major(&mut c, m, n, "c").unwrap(),
                0.0,
                MatRef::row_major(&a, m, k, "a").unwrap(),
                MatRef::row_major(&b, k, n, "b").unwrap().t().t(),
                1.0,
                threads,
            )
            .unwrap();
            c
        };
        let one = run(1);
        assert!(one.iter().zip(&run(2)).all(|(x, y)| x.to_bits() == y.to_bits()), "{m}×{n}×{k}");
    }
}

#[test]
fn bf16_matches_f64_reference_of_rounded_inputs() {
    let mut rng = rng(6);
    for &(m, n, k) in &SHAPES {
        let a: Vec<bf16> = randn(&mut rng, m * k).into_iter().map(bf16::from_f32).collect();
        // B stored transposed ([n, k]) and read through `.t()`: the column-major widening path.
        let bt: Vec<bf16> = randn(&mut rng, n * k).into_iter().map(bf16::from_f32).collect();
        let (dot, abs) = reference(m, n, k, |i, kk| a[i * k + kk].to_f64(), |kk, j| bt[j * k + kk].to_f64());
        for threads in [1, 2] {
            let mut c = vec![f32::NAN; m * n];
            gemm_bf16(
                MatMut::row_major(&mut c, m, n, "c").unwrap(),
                0.0,
                MatRef::row_major(&a, m, k, "a").unwrap(),
                MatRef::row_major(&bt, n, k, "b").unwrap().t(),
                1.0,
                threads,
            )
            .unwrap();
            assert_within_f32_bound(&format!("bf16 {m}×{n}×{k}"), &c, &dot, &abs, &c, 1.0, 0.0, k);
        }
    }
    // A strided A (every other column): the element-by-element widening path.
    let (m, n, k) = (9, 11, 13);
    let a: Vec<bf16> = randn(&mut rng, m * 2 * k).into_iter().map(bf16::from_f32).collect();
    let b: Vec<bf16> = randn(&mut rng, k * n).into_iter().map(bf16::from_f32).collect();
    let c0 = randn(&mut rng, m * n);
    let mut c = c0.clone();
    gemm_bf16(
        MatMut::row_major(&mut c, m, n, "c").unwrap(),
        0.5,
        MatRef::new(&a, m, k, 2 * k as isize, 2, "a").unwrap(),
        MatRef::row_major(&b, k, n, "b").unwrap(),
        -2.0,
        1,
    )
    .unwrap();
    let (dot, abs) =
        reference(m, n, k, |i, kk| a[i * 2 * k + 2 * kk].to_f64(), |kk, j| b[kk * n + j].to_f64());
    assert_within_f32_bound("bf16 strided", &c, &dot, &abs, &c0, -2.0, 0.5, k);
}

fn quantize_pair(
    rng: &mut ChaCha8Rng,
    m: usize,
    n: usize,
    k: usize,
) -> (Vec<f32>, Vec<f32>, Fp8Matrix, Fp8Matrix) {
    let a = randn(rng, m * k);
    let b = randn(rng, n * k);
    let cfg = QuantConfig::default();
    let qa = quantize(&a, m, k, Granularity::Tile1x128, &cfg).unwrap();
    let qb = quantize(&b, n, k, Granularity::Block128x128, &cfg).unwrap();
    (a, b, qa, qb)
}

/// A quantized element's exact value, in f64.
fn dequant(x: &Fp8Matrix, r: usize, c: usize) -> f64 {
    E4M3_TO_F32[x.codes[r * x.cols + c] as usize] as f64 * x.scale_at(r, c) as f64
}

/// `Σ_k A[i,k]·B[j,k]` of the dequantized operands, and its absolute-product sum.
fn fp8_reference(qa: &Fp8Matrix, qb: &Fp8Matrix) -> (Vec<f64>, Vec<f64>) {
    reference(qa.rows, qb.rows, qa.cols, |i, kk| dequant(qa, i, kk), |kk, j| dequant(qb, j, kk))
}

const FP8_SHAPES: [(usize, usize, usize); 8] = [
    (1, 1, 1),
    (7, 13, 5),
    (128, 128, 128),
    (129, 65, 257),
    (300, 257, 130),
    (200, 100, 1000),
    (257, 640, 384),
    (3, 5, 0),
];

#[test]
fn fp8_f32_mode_matches_references() {
    let mut rng = rng(7);
    for &(m, n, k) in &FP8_SHAPES {
        let (a, b, qa, qb) = quantize_pair(&mut rng, m, n, k);
        let mut out = vec![f32::NAN; m * n];
        gemm_fp8(&qa, &qb, Accumulation::F32, &mut out, 2).unwrap();

        // Against the unquantized inputs: DeepGEMM's acceptance threshold.
        if k > 0 {
            let (orig, _) = reference(m, n, k, |i, kk| a[i * k + kk] as f64, |kk, j| b[j * k + kk] as f64);
            let diff = calc_diff(&out, &orig).unwrap();
            assert!(diff < 1e-3, "{m}×{n}×{k}: calc_diff vs unquantized {diff:e}");
        }

        // Against the dequantized inputs: only f32 rounding is left. Each block sum of
        // ≤ 128 exact products costs ≤ 128·u relative to its Σ|ab|; scaling it costs 2u,
        // and folding ⌈k/128⌉ blocks into C another u each.
        let (dot, abs) = fp8_reference(&qa, &qb);
        let gamma = (TILE + 2 + k.div_ceil(TILE)) as f64 * U32 * 1.01;
        for (idx, (&g, (&w, &s))) in out.iter().zip(dot.iter().zip(&abs)).enumerate() {
            let err = (g as f64 - w).abs();
            assert!(err <= gamma * s + f64::MIN_POSITIVE, "{m}×{n}×{k} element {idx}: {g} vs {w}");
        }
        // The bound above is the worst case; typical rounding errors are a random walk,
        // about 1e-7 relative, i.e. calc_diff ~1e-14. An error of one part in 10⁶
        // anywhere (a scale applied wrongly, a product rounded) would show as ≥ 5e-13.
        let diff = calc_diff(&out, &dot).unwrap();
        assert!(diff < 1e-13, "{m}×{n}×{k}: calc_diff vs dequantized {diff:e}");

        // Same pieces for any thread count; BF16 output is the f32 result rounded once.
        for threads in [1, 5] {
            let mut other = vec![0f32; m * n];
            gemm_fp8(&qa, &qb, Accumulation::F32, &mut other, threads).unwrap();
            assert!(
                other.iter().zip(&out).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{m}×{n}×{k}: {threads} threads"
            );
        }
        let mut out_bf16 = vec![bf16::NAN; m * n];
        gemm_fp8(&qa, &qb, Accumulation::F32, &mut out_bf16, 2).unwrap();
        assert!(out_bf16.iter().zip(&out).all(|(&h, &f)| h.to_bits() == bf16::from_f32(f).to_bits()));
    }
}

#[test]
fn limited_mode_equals_the_model_on_ragged_shapes() {
    let mut rng = rng(8);
    let configs = [
        LimitedAccumulator::default(),
        LimitedAccumulator {
            mantissa_bits: 10,
            products_per_add: 16,
            rounding: AccumulatorRounding::NearestEven,
            promote_every: Some(64),
        },
        LimitedAccumulator {
            mantissa_bits: 7,
            products_per_add: 8,
            promote_every: None,
            ..Default::default()
        },
        LimitedAccumulator {
            products_per_add: 5,
            promote_every: None,
            rounding: AccumulatorRounding::NearestEven,
            ..Default::default()
        },
    ];
    for &(m, n, k) in &[(20, 37, 300), (1, 1, 1), (33, 130, 129), (4, 3, 0)] {
        let (_, _, qa, qb) = quantize_pair(&mut rng, m, n, k);
        for cfg in &configs {
            let want = limited_model(&qa, &qb, cfg);
            for threads in [1, 2, 5] {
                let mut got = vec![f32::NAN; m * n];
                gemm_fp8(&qa, &qb, Accumulation::Limited(*cfg), &mut got, threads).unwrap();
                assert!(
                    got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{m}×{n}×{k} {cfg:?}: kernel differs from the model"
                );
            }
        }
    }
}

#[test]
fn limited_mode_with_a_full_f32_accumulator_is_close_to_f32_mode() {
    let mut rng = rng(9);
    let (m, n, k) = (40, 50, 700);
    let (_, _, qa, qb) = quantize_pair(&mut rng, m, n, k);
    let (dot, abs) = fp8_reference(&qa, &qb);
    let mut f32_mode = vec![0f32; m * n];
    gemm_fp8(&qa, &qb, Accumulation::F32, &mut f32_mode, 2).unwrap();
    for promote_every in [Some(TILE), None] {
        let cfg = LimitedAccumulator {
            mantissa_bits: 23,
            products_per_add: 1,
            rounding: AccumulatorRounding::NearestEven,
            promote_every,
        };
        let mut limited = vec![0f32; m * n];
        gemm_fp8(&qa, &qb, Accumulation::Limited(cfg), &mut limited, 2).unwrap();
        // Both are f32 sums of the same products, in different orders: each within the
        // f32 bound of the exact result, so within twice it of each other.
        let gamma = (k + 2 + k.div_ceil(TILE)) as f64 * U32 * 1.01;
        for idx in 0..m * n {
            let (x, y) = (limited[idx] as f64, f32_mode[idx] as f64);
            assert!((x - dot[idx]).abs() <= gamma * abs[idx], "{promote_every:?} element {idx} vs f64");
            assert!((x - y).abs() <= 2.0 * gamma * abs[idx], "{promote_every:?} element {idx} vs F32 mode");
        }
        assert!(calc_diff(&limited, &f32_mode).unwrap() < 1e-12);
    }
}

/// Report §3.3.2: with K = 4096 a ~14-bit accumulator loses about 2% without promotion;
/// promoting every 128 elements of K to f32 fixes it.
#[test]
fn promotion_shrinks_the_limited_accumulator_error() {
    let mut rng = rng(10);
    let (m, n, k) = (64, 64, 4096);
    let (_, _, qa, qb) = quantize_pair(&mut rng, m, n, k);
    let (dot, _) = fp8_reference(&qa, &qb);
    let rel_error = |cfg: LimitedAccumulator| {
        let mut out = vec![0f32; m * n];
        gemm_fp8(&qa, &qb, Accumulation::Limited(cfg), &mut out, 2).unwrap();
        // Relative to the RMS of the result, so near-zero elements do not dominate.
        let rms = (dot.iter().map(|x| x * x).sum::<f64>() / dot.len() as f64).sqrt();
        out.iter().zip(&dot).map(|(&o, &d)| (o as f64 - d).abs()).fold(0f64, f64::max) / rms
    };
    let promoted = rel_error(LimitedAccumulator::default());
    let unpromoted = rel_error(LimitedAccumulator { promote_every: None, ..Default::default() });
    let wide_unpromoted =
        rel_error(LimitedAccumulator { promote_every: None, mantissa_bits: 23, ..Default::default() });
    assert!(promoted * 4.0 < unpromoted, "promoted {promoted:e} vs unpromoted {unpromoted:e}");
    assert!(wide_unpromoted * 100.0 < unpromoted, "23 bits {wide_unpromoted:e} vs 13 bits {unpromoted:e}");
}

/// Rows `start..end` of a 1×128-tiled matrix, as a matrix of its own.
fn lhs_rows(a: &Fp8Matrix, start: usize, end: usize) -> Fp8Matrix {
    let kb = a.cols.div_ceil(TILE);
    Fp8Matrix::from_parts(
        end - start,
        a.cols,
        a.codes[start * a.cols..end * a.cols].to_vec(),
        a.scales[start * kb..end * kb].to_vec(),
        Granularity::Tile1x128,
    )
    .unwrap()
}

#[test]
fn grouped_equals_per_expert_gemms() {
    let mut rng = rng(11);
    let (experts, n, k) = (4, 200, 300);
    let runs: [(i32, usize); 9] =
        [(0, 5), (-1, 3), (2, 130), (1, 1), (-1, 2), (0, 7), (3, 129), (2, 4), (-1, 1)];
    let m_indices: Vec<i32> = runs.iter().flat_map(|&(e, len)| std::iter::repeat_n(e, len)).collect();
    let m = m_indices.len();
    let cfg = QuantConfig::default();
    let qa = quantize(&randn(&mut rng, m * k), m, k, Granularity::Tile1x128, &cfg).unwrap();
    let qb: Vec<Fp8Matrix> = (0..experts)
        .map(|_| quantize(&randn(&mut rng, n * k), n, k, Granularity::Block128x128, &cfg).unwrap())
        .collect();
    for accumulation in [Accumulation::F32, Accumulation::Limited(LimitedAccumulator::default())] {
        let mut out = vec![f32::NAN; m * n];
        grouped_gemm_fp8(&qa, &qb, &m_indices, accumulation, &mut out, 2).unwrap();
        let mut start = 0;
        for &(e, len) in &runs {
            let got = &out[start * n..(start + len) * n];
            if e < 0 {
                assert!(got.iter().all(|&x| x == 0.0), "padding rows {start}.. must be zero");
            } else {
                let mut want = vec![0f32; len * n];
                gemm_fp8(&lhs_rows(&qa, start, start + len), &qb[e as usize], accumulation, &mut want, 1)
                    .unwrap();
                assert!(
                    got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "rows {start}..{} (expert {e}) differ from gemm_fp8",
                    start + len
                );
            }
            start += len;
        }
        let mut out_bf16 = vec![bf16::NAN; m * n];
        grouped_gemm_fp8(&qa, &qb, &m_indices, accumulation, &mut out_bf16, 1).unwrap();
        assert!(out_bf16.iter().zip(&out).all(|(&h, &f)| h.to_bits() == bf16::from_f32(f).to_bits()));
    }
}

fn is_err<T>(r: Result<T, KernelError>, what: &str, mentions: &str) {
    match r {
        Ok(_) => panic!("{what}: expected an error"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(mentions), "{what}: error {msg:?} does not mention {mentions:?}");
        }
    }
}

#[test]
fn view_and_dense_errors() {
    let data = vec![0f32; 12];
    is_err(MatRef::new(&data, 3, 4, 5, 1, "a"), "past the end", "`a`");
    is_err(MatRef::new(&data, 3, 4, -4, 1, "a"), "negative stride", "before the start");
    is_err(MatRef::row_major(&data, 5, 3, "a"), "row-major length", "`a`");
    let mut out = vec![0f32; 12];
    is_err(MatMut::new(&mut out, 4, 3, 1, 1, "c"), "aliasing", "same offset");
    is_err(MatMut::new(&mut out, 2, 2, 0, 1, "c"), "zero stride", "`c`");

    let a = [1f32; 6];
    let b = [1f32; 6];
    let mut c = [0f32; 9];
    let mut call = |cm: usize, cn: usize, am: usize, ak: usize, bk: usize, bn: usize, threads: usize| {
        gemm_f32(
            MatMut::row_major(&mut c[..cm * cn], cm, cn, "c").unwrap(),
            0.0,
            MatRef::row_major(&a[..am * ak], am, ak, "a").unwrap(),
            MatRef::row_major(&b[..bk * bn], bk, bn, "b").unwrap(),
            1.0,
            threads,
        )
    };
    assert!(call(2, 3, 2, 3, 3, 2, 1).is_err() && call(2, 2, 2, 3, 3, 2, 1).is_ok());
    is_err(call(3, 2, 2, 3, 3, 2, 1), "rows of C", "shape mismatch");
    is_err(call(2, 2, 2, 3, 2, 3, 1), "inner dimension", "`a` 2×3");
    is_err(call(2, 2, 2, 3, 3, 2, 0), "threads 0", "threads");

    let h = vec![bf16::ONE; 6];
    let mut c = vec![0f32; 4];
    is_err(
        gemm_bf16(
            MatMut::row_major(&mut c, 2, 2, "c").unwrap(),
            0.0,
            MatRef::row_major(&h, 2, 3, "a").unwrap(),
            MatRef::row_major(&h, 2, 3, "b").unwrap(),
            1.0,
            1,
        ),
        "bf16 inner dimension",
        "shape mismatch",
    );
    is_err(
        gemm_bf16(
            MatMut::row_major(&mut c, 2, 2, "c").unwrap(),
            0.0,
            MatRef::row_major(&h, 2, 3, "a").unwrap(),
            MatRef::row_major(&h, 3, 2, "b").unwrap(),
            1.0,
            0,
        ),
        "bf16 threads 0",
        "threads",
    );
}

#[test]
fn fp8_errors() {
    let mut rng = rng(12);
    let (m, n, k) = (5, 6, 200);
    let (_, _, qa, qb) = quantize_pair(&mut rng, m, n, k);
    let mut out = vec![0f32; m * n];
    assert!(gemm_fp8(&qa, &qb, Accumulation::F32, &mut out, 1).is_ok());

    is_err(gemm_fp8(&qb, &qb, Accumulation::F32, &mut out, 1), "lhs granularity", "`lhs`");
    // A Tile1x128 RHS is valid (Wgrad's form); a Tile128x1 one is not.
    let mut tile_rhs = qb.clone();
    tile_rhs.granularity = Granularity::Tile128x1;
    is_err(gemm_fp8(&qa, &tile_rhs, Accumulation::F32, &mut out, 1), "rhs granularity", "`rhs`");
    let mut short = qa.clone();
    short.codes.pop();
    is_err(gemm_fp8(&short, &qb, Accumulation::F32, &mut out, 1), "lhs codes", "`lhs codes`");
    let mut short = qb.clone();
    short.scales.pop();
    is_err(gemm_fp8(&qa, &short, Accumulation::F32, &mut out, 1), "rhs scales", "`rhs scales`");
    let mut wrong_shape = qb.clone();
    wrong_shape.rows = usize::MAX;
    is_err(gemm_fp8(&qa, &wrong_shape, Accumulation::F32, &mut out, 1), "overflowing shape", "rhs");
    let (_, _, _, qb_k) = quantize_pair(&mut rng, m, n, k + 1);
    is_err(gemm_fp8(&qa, &qb_k, Accumulation::F32, &mut out, 1), "K differs", "K columns");
    is_err(gemm_fp8(&qa, &qb, Accumulation::F32, &mut out[1..], 1), "out length", "`out`");
    is_err(gemm_fp8(&qa, &qb, Accumulation::F32, &mut out, 0), "threads 0", "threads");
    let limited = |cfg| Accumulation::Limited(cfg);
    let d = LimitedAccumulator::default();
    for (cfg, name) in [
        (LimitedAccumulator { mantissa_bits: 24, ..d }, "mantissa_bits"),
        (LimitedAccumulator { products_per_add: 0, ..d }, "products_per_add"),
        (LimitedAccumulator { promote_every: Some(48), ..d }, "promote_every"),
        (LimitedAccumulator { promote_every: Some(16), products_per_add: 32, ..d }, "promote_every"),
        (LimitedAccumulator { promote_every: Some(0), ..d }, "promote_every"),
    ] {
        is_err(gemm_fp8(&qa, &qb, limited(cfg), &mut out, 1), name, name);
    }

    // Empty dimensions are valid.
    let (_, _, qa0, qb0) = quantize_pair(&mut rng, 0, n, k);
    assert!(gemm_fp8(&qa0, &qb0, Accumulation::F32, &mut [] as &mut [f32], 1).is_ok());
    let (_, _, qa0, qb0) = quantize_pair(&mut rng, m, 0, k);
    assert!(gemm_fp8(&qa0, &qb0, Accumulation::Limited(d), &mut [] as &mut [f32], 2).is_ok());
}

#[test]
fn grouped_errors() {
    let mut rng = rng(13);
    let (m, n, k) = (6, 7, 130);
    let (_, _, qa, qb) = quantize_pair(&mut rng, m, n, k);
    let experts = vec![qb.clone(), qb.clone()];
    let mut out = vec![0f32; m * n];
    let ok_indices = [0, 0, -1, 1, 1, -1];
    let acc = Accumulation::F32;
    assert!(grouped_gemm_fp8(&qa, &experts, &ok_indices, acc, &mut out, 2).is_ok());

    is_err(
        grouped_gemm_fp8(&qa, &experts, &[0, 0, -1, 2, 1, -1], acc, &mut out, 1),
        "index = count",
        "row 3 names expert 2",
    );
    is_err(grouped_gemm_fp8(&qa, &experts, &[0, -2, -1, 1, 1, -1], acc, &mut out, 1), "index -2", "row 1");
    is_err(
        grouped_gemm_fp8(&qa, &experts, &ok_indices[1..], acc, &mut out, 1),
        "m_indices length",
        "`m_indices`",
    );
    is_err(grouped_gemm_fp8(&qa, &[], &ok_indices, acc, &mut out, 1), "no experts", "no experts");
    is_err(
        grouped_gemm_fp8(&qa, &experts, &ok_indices, acc, &mut out[..m * n - 1], 1),
        "out length",
        "`out`",
    );
    is_err(grouped_gemm_fp8(&qa, &experts, &ok_indices, acc, &mut out, 0), "threads 0", "threads");

    let (_, _, _, other) = quantize_pair(&mut rng, m, n + 1, k);
    is_err(
        grouped_gemm_fp8(&qa, &[qb.clone(), other], &ok_indices, acc, &mut out, 1),
        "differing experts",
        "rhs[1]",
    );
    let mut bad = qb.clone();
    bad.scales.push(1.0);
    is_err(
        grouped_gemm_fp8(&qa, &[qb.clone(), bad], &ok_indices, acc, &mut out, 1),
        "expert scales",
        "expert 1",
    );
    let mut bad = qb.clone();
    bad.granularity = Granularity::Tile128x1;
    is_err(
        grouped_gemm_fp8(&qa, &[bad, qb.clone()], &ok_indices, acc, &mut out, 1),
        "expert granularity",
        "expert 0",
    );
    let (_, _, _, qb_k) = quantize_pair(&mut rng, m, n, k + 3);
    is_err(
        grouped_gemm_fp8(&qa, &[qb_k.clone(), qb_k], &ok_indices, acc, &mut out, 1),
        "K differs",
        "K columns",
    );
    is_err(grouped_gemm_fp8(&qb, &experts, &ok_indices, acc, &mut out, 1), "lhs granularity", "`lhs`");
    let bad_cfg = Accumulation::Limited(LimitedAccumulator { products_per_add: 0, ..Default::default() });
    is_err(
        grouped_gemm_fp8(&qa, &experts, &ok_indices, bad_cfg, &mut out, 1),
        "bad limited config",
        "products_per_add",
    );

    // All rows padding: every output row is zero, no expert is computed.
    let mut out = vec![f32::NAN; m * n];
    grouped_gemm_fp8(&qa, &experts, &[-1; 6], acc, &mut out, 2).unwrap();
    assert!(out.iter().all(|&x| x == 0.0));
}
