//! Helpers shared by the GEMM integration tests.

use flotilla_kernels::fp8::E4M3_TO_F32;
use flotilla_kernels::gemm::{LimitedAccumulator, round_to_mantissa_bits};
use flotilla_kernels::quant::{Fp8Matrix, TILE};

/// An independent, element-at-a-time statement of the limited accumulator model, reading
/// scales through `scale_at` (so it holds for either RHS granularity).
pub fn limited_model(qa: &Fp8Matrix, qb: &Fp8Matrix, cfg: &LimitedAccumulator) -> Vec<f32> {
    let (m, n, k) = (qa.rows, qb.rows, qa.cols);
    let code = |x: &Fp8Matrix, r: usize, c: usize| E4M3_TO_F32[x.codes[r * k + c] as usize] as f64;
    let round = |x: f64| round_to_mantissa_bits(x, cfg.mantissa_bits, cfg.rounding);
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = match cfg.promote_every {
                Some(nc) => {
                    let mut c = 0f32;
                    for k0 in (0..k).step_by(TILE) {
                        let s = qa.scale_at(i, k0) * qb.scale_at(j, k0);
                        let k1 = (k0 + TILE).min(k);
                        for p0 in (k0..k1).step_by(nc) {
                            let mut acc = 0f64;
                            let p1 = (p0 + nc).min(k1);
                            for c0 in (p0..p1).step_by(cfg.products_per_add) {
                                let sum: f64 = (c0..(c0 + cfg.products_per_add).min(p1))
                                    .map(|kk| code(qa, i, kk) * code(qb, j, kk))
                                    .sum();
                                acc = round(acc + sum);
                            }
                            c += acc as f32 * s;
                        }
                    }
                    c
                }
                None => {
                    let mut acc = 0f64;
                    for c0 in (0..k).step_by(cfg.products_per_add) {
                        let mut s = acc;
                        for kk in c0..(c0 + cfg.products_per_add).min(k) {
                            s += code(qa, i, kk)
                                * qa.scale_at(i, kk) as f64
                                * (code(qb, j, kk) * qb.scale_at(j, kk) as f64);
                        }
                        acc = round(s);
                    }
                    acc as f32
                }
            };
        }
    }
    out
}
