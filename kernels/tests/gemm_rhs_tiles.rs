//! The FP8 GEMM with a 1×128-tiled RHS (scales `[n, ⌈k/128⌉]`), the form of Wgrad
//! `dW = dYᵀ·X`: accuracy against f64 on ragged shapes, the Wgrad construction from
//! 128×1-tiled activations, bit-equality with the 128×128-block path when the per-row
//! scales of each 128-row group agree, thread-count independence, the limited-accumulator
//! model, and the grouped form.

mod common;

use common::limited_model;
use flotilla_kernels::fp8::E4M3_TO_F32;
use flotilla_kernels::gemm::{Accumulation, LimitedAccumulator, gemm_fp8, grouped_gemm_fp8};
use flotilla_kernels::metrics::calc_diff;
use flotilla_kernels::quant::{Fp8Matrix, Granularity, QuantConfig, TILE, quantize};
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

/// Rows with magnitudes spread over four orders, so per-row scales differ a lot.
fn randn_spread(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Vec<f32> {
    let mut x = randn(rng, rows * cols);
    for (r, row) in x.chunks_mut(cols.max(1)).enumerate() {
        let s = 10f32.powi((r % 5) as i32 - 2);
        row.iter_mut().for_each(|v| *v *= s);
    }
    x
}

/// `C[i, j] = Σ_k A[i, k]·B[j, k]` in f64 and `Σ_k |A[i, k]·B[j, k]|`.
fn nt_reference(
    m: usize,
    n: usize,
    k: usize,
    a: impl Fn(usize, usize) -> f64,
    b: impl Fn(usize, usize) -> f64,
) -> (Vec<f64>, Vec<f64>) {
    let (mut c, mut abs) = (vec![0f64; m * n], vec![0f64; m * n]);
    for i in 0..m {
        for j in 0..n {
            for kk in 0..k {
                let p = a(i, kk) * b(j, kk);
                c[i * n + j] += p;
                abs[i * n + j] += p.abs();
            }
        }
    }
    (c, abs)
}

fn dequant(x: &Fp8Matrix, r: usize, c: usize) -> f64 {
    E4M3_TO_F32[x.codes[r * x.cols + c] as usize] as f64 * x.scale_at(r, c) as f64
}

fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

const SHAPES: [(usize, usize, usize); 8] = [
    (1, 1, 1),
    (7, 13, 5),
    (128, 128, 128),
    (129, 65, 257),
    (300, 257, 130),
    (200, 100, 1000),
    (65, 640, 384),
    (3, 5, 0),
];

#[test]
fn tile_rhs_matches_f64_on_ragged_shapes() {
    let mut rng = rng(21);
    let cfg = QuantConfig::default();
    for &(m, n, k) in &SHAPES {
        let a = randn(&mut rng, m * k);
        let b = randn_spread(&mut rng, n, k);
        let qa = quantize(&a, m, k, Granularity::Tile1x128, &cfg).unwrap();
        let qb = quantize(&b, n, k, Granularity::Tile1x128, &cfg).unwrap();
        assert_eq!(qb.scales.len(), n * k.div_ceil(TILE));
        let mut out = vec![f32::NAN; m * n];
        gemm_fp8(&qa, &qb, Accumulation::F32, &mut out, 2).unwrap();
        if k == 0 {
            assert!(out.iter().all(|&x| x == 0.0));
            continue;
        }
        let (orig, _) = nt_reference(m, n, k, |i, kk| a[i * k + kk] as f64, |j, kk| b[j * k + kk] as f64);
        let diff = calc_diff(&out, &orig).unwrap();
        assert!(diff < 1e-3, "{m}×{n}×{k}: calc_diff vs unquantized {diff:e}");

        // Against the dequantized operands only f32 rounding is left (as for the block
        // path: ≤ 128·u per block sum, 2u for the scaling, u per block folded into C).
        let (dot, abs) = nt_reference(m, n, k, |i, kk| dequant(&qa, i, kk), |j, kk| dequant(&qb, j, kk));
        let gamma = (TILE + 2 + k.div_ceil(TILE)) as f64 * U32 * 1.01;
        for (idx, (&g, (&w, &s))) in out.iter().zip(dot.iter().zip(&abs)).enumerate() {
            let err = (g as f64 - w).abs();
            assert!(err <= gamma * s + f64::MIN_POSITIVE, "{m}×{n}×{k} element {idx}: {g} vs {w}");
        }
        let diff = calc_diff(&out, &dot).unwrap();
        assert!(diff < 1e-13, "{m}×{n}×{k}: calc_diff vs dequantized {diff:e}");

        for threads in [1, 3] {
            let mut other = vec![0f32; m * n];
            gemm_fp8(&qa, &qb, Accumulation::F32, &mut other, threads).unwrap();
            assert!(bits_equal(&other, &out), "{m}×{n}×{k}: {threads} threads");
        }
    }
}

/// Wgrad of a linear layer: `dW[o, i] = Σ_t dy[t, o]·x[t, i]`, both operands quantized
/// in 128×1 tiles along tokens and transposed into the NT layout.
#[test]
fn wgrad_from_128x1_tiles_matches_f64() {
    let mut rng = rng(22);
    let cfg = QuantConfig::default();
    for &(tokens, out_f, in_f) in &[(512, 128, 64), (300, 96, 130), (129, 33, 257), (1, 5, 7), (1000, 64, 64)]
    {
        let dy = randn_spread(&mut rng, tokens, out_f);
        let x = randn(&mut rng, tokens * in_f);
        let q_dy = quantize(&dy, tokens, out_f, Granularity::Tile128x1, &cfg).unwrap().transposed();
        let q_x = quantize(&x, tokens, in_f, Granularity::Tile128x1, &cfg).unwrap().transposed();
        assert_eq!((q_dy.granularity, q_dy.rows, q_dy.cols), (Granularity::Tile1x128, out_f, tokens));
        assert_eq!((q_x.granularity, q_x.rows, q_x.cols), (Granularity::Tile1x128, in_f, tokens));
        let mut dw = vec![0f32; out_f * in_f];
        gemm_fp8(&q_dy, &q_x, Accumulation::F32, &mut dw, 2).unwrap();
        let (want, _) =
            nt_reference(out_f, in_f, tokens, |o, t| dy[t * out_f + o] as f64, |i, t| x[t * in_f + i] as f64);
        let diff = calc_diff(&dw, &want).unwrap();
        assert!(diff < 1e-3, "{tokens} tokens, {out_f}×{in_f}: calc_diff {diff:e}");
    }
}

/// A Tile1x128 copy of a 128×128-block matrix: the same codes, each row carrying its
/// block's scale.
fn as_row_tiles(block: &Fp8Matrix) -> Fp8Matrix {
    assert_eq!(block.granularity, Granularity::Block128x128);
    let kb = block.cols.div_ceil(TILE);
    let mut scales = vec![0f32; block.rows * kb];
    for j in 0..block.rows {
        for b in 0..kb {
            scales[j * kb + b] = block.scale_at(j, b * TILE);
        }
    }
    Fp8Matrix::from_parts(block.rows, block.cols, block.codes.clone(), scales, Granularity::Tile1x128)
        .unwrap()
}

fn accumulations() -> Vec<Accumulation> {
    let d = LimitedAccumulator::default();
    vec![
        Accumulation::F32,
        Accumulation::Limited(d),
        Accumulation::Limited(LimitedAccumulator { promote_every: Some(32), ..d }),
        Accumulation::Limited(LimitedAccumulator { promote_every: None, ..d }),
    ]
}

#[test]
fn tile_rhs_with_block_constant_scales_equals_the_block_path() {
    let mut rng = rng(23);
    let cfg = QuantConfig::default();
    for &(m, n, k) in &[(7, 13, 5), (129, 65, 257), (40, 300, 130), (130, 640, 384)] {
        let a = randn(&mut rng, m * k);
        let b = randn_spread(&mut rng, n, k);
        let qa = quantize(&a, m, k, Granularity::Tile1x128, &cfg).unwrap();
        let q_block = quantize(&b, n, k, Granularity::Block128x128, &cfg).unwrap();
        let q_tiles = as_row_tiles(&q_block);
        for acc in accumulations() {
            for threads in [1, 2] {
                let (mut x, mut y) = (vec![0f32; m * n], vec![0f32; m * n]);
                gemm_fp8(&qa, &q_block, acc, &mut x, threads).unwrap();
                gemm_fp8(&qa, &q_tiles, acc, &mut y, threads).unwrap();
                assert!(bits_equal(&x, &y), "{m}×{n}×{k}, {acc:?}, {threads} threads");
            }
        }
    }
}

#[test]
fn tile_rhs_limited_mode_matches_the_model_and_f64() {
    let mut rng = rng(24);
    let cfg = QuantConfig::default();
    for &(m, n, k) in &[(7, 13, 5), (33, 70, 257), (65, 40, 384)] {
        let a = randn(&mut rng, m * k);
        let b = randn_spread(&mut rng, n, k);
        let qa = quantize(&a, m, k, Granularity::Tile1x128, &cfg).unwrap();
        let qb = quantize(&b, n, k, Granularity::Tile1x128, &cfg).unwrap();
        let (orig, _) = nt_reference(m, n, k, |i, kk| a[i * k + kk] as f64, |j, kk| b[j * k + kk] as f64);
        for acc in accumulations().into_iter().skip(1) {
            let Accumulation::Limited(lim) = acc else { unreachable!() };
            let mut out = vec![0f32; m * n];
            gemm_fp8(&qa, &qb, acc, &mut out, 2).unwrap();
            assert!(bits_equal(&out, &limited_model(&qa, &qb, &lim)), "{m}×{n}×{k}, {lim:?}");
            let diff = calc_diff(&out, &orig).unwrap();
            assert!(diff < 1e-3, "{m}×{n}×{k}, {lim:?}: calc_diff {diff:e}");
        }
    }
}

#[test]
fn grouped_gemm_accepts_tile_rhs_and_equals_per_expert_calls() {
    let mut rng = rng(25);
    let cfg = QuantConfig::default();
    let (m, n, k) = (150, 70, 200);
    let a = randn(&mut rng, m * k);
    let qa = quantize(&a, m, k, Granularity::Tile1x128, &cfg).unwrap();
    let experts: Vec<Fp8Matrix> = (0..3)
        .map(|_| quantize(&randn_spread(&mut rng, n, k), n, k, Granularity::Tile1x128, &cfg).unwrap())
        .collect();
    let m_indices: Vec<i32> = (0..m).map(|r| [0, 0, 2, -1, 1][(r / 20) % 5]).collect();
    for acc in [Accumulation::F32, Accumulation::Limited(LimitedAccumulator::default())] {
        let mut out = vec![f32::NAN; m * n];
        grouped_gemm_fp8(&qa, &experts, &m_indices, acc, &mut out, 2).unwrap();
        let mut start = 0;
        while start < m {
            let e = m_indices[start];
            let end = (start..m).find(|&r| m_indices[r] != e).unwrap_or(m);
            let got = &out[start * n..end * n];
            if e < 0 {
                assert!(got.iter().all(|&x| x == 0.0));
            } else {
                let rows = Fp8Matrix::from_parts(
                    end - start,
                    k,
                    qa.codes[start * k..end * k].to_vec(),
                    qa.scales[start * k.div_ceil(TILE)..end * k.div_ceil(TILE)].to_vec(),
                    Granularity::Tile1x128,
                )
                .unwrap();
                let mut want = vec![0f32; (end - start) * n];
                gemm_fp8(&rows, &experts[e as usize], acc, &mut want, 1).unwrap();
                assert!(bits_equal(got, &want), "rows {start}..{end}, {acc:?}");
            }
            start = end;
        }
    }
}

#[test]
fn tile128x1_rhs_is_still_rejected() {
    let mut rng = rng(26);
    let cfg = QuantConfig::default();
    let qa = quantize(&randn(&mut rng, 4 * 10), 4, 10, Granularity::Tile1x128, &cfg).unwrap();
    let qb = quantize(&randn(&mut rng, 6 * 10), 6, 10, Granularity::Tile128x1, &cfg).unwrap();
    let err = gemm_fp8(&qa, &qb, Accumulation::F32, &mut [0f32; 24], 1).unwrap_err().to_string();
    assert!(err.contains("rhs") && err.contains("Tile128x1"), "{err}");
}
