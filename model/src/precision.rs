//! The numeric precision of the linear layers' GEMMs during training: the f32 reference,
//! BF16 mixed precision, and DeepSeek-V3's FP8 recipe (report §3.3; DESIGN §1.2).
//!
//! [`Precision`] is chosen per run (`precision = "fp32" | "bf16" | "fp8"` in the training
//! TOML, default `fp32`) and stored in every [`crate::linear::Linear`] that obeys it:
//! every projection of MLA (`q_a_proj`, `q_b_proj` or `q_proj`, `kv_a_proj_with_mqa`,
//! `kv_b_proj`, `o_proj`), every SwiGLU FFN (dense, shared and routed experts) and the MTP
//! modules' `eh_proj`. The embedding, the output head, the MoE gate, the RMSNorms, RoPE,
//! the attention core, SwiGLU, the losses and the optimizer always compute in f32, as the
//! report keeps them in higher precision; master weights ([`crate::param::Param::value`])
//! and gradients stay f32, AdamW's moments BF16 (see [`crate::train`]).
//!
//! ## BF16
//! Each GEMM reads its operands rounded to BF16 (nearest even) and accumulates in f32
//! ([`gemm_bf16`]). Fprop `y = x·Wᵀ` and Dgrad `dx = dy·W` round their result to BF16 (an
//! accumulating Dgrad adds the rounded product to the f32 buffer); Wgrad `dW += dyᵀ·x` is
//! accumulated into the f32 gradient unrounded, as fused-accumulation BF16 training does.
//!
//! ## FP8 (E4M3 everywhere, block-scaled, f32 accumulation per 128-wide K block)
//! | GEMM | LHS (1×128 tiles along K) | RHS | K |
//! | --- | --- | --- | --- |
//! | Fprop `y = x·Wᵀ` | `x [rows, in]` | `W [out, in]`, 128×128 blocks | `in` |
//! | Dgrad `dx = dy·W` | `dy [rows, out]` | `Wᵀ [in, out]`: W's blocks transposed | `out` |
//! | Wgrad `dW = dyᵀ·x` | `dyᵀ [out, rows]`: dy in 128×1 tiles, transposed | `xᵀ [in, rows]`: x re-tiled 128×1, transposed (1×128 tiles) | `rows` |
//!
//! All three run on [`gemm_fp8`] with [`Accumulation::F32`] and write f32 results.
//! Scales are `max(amax, eps)/448` with [`FP8_QUANT`] (`eps = 1e-12`, not the inference
//! kernel's 1e-4: backward gradients here are often below 1e-4, and a 1e-4 floor would
//! push whole tiles of them into E4M3's subnormals).
//!
//! - **W's quantization is shared by Fprop and Dgrad**: Dgrad uses the exact transpose of
//!   the 128×128-block quantization of `W` (codes moved, scales permuted, nothing
//!   requantized), as DeepSeek does. The layer keeps no state between calls, so Dgrad
//!   quantizes `W` again; `W` does not change between forward and backward, so the codes
//!   and scales are bit-identical to the forward's.
//! - **Activations for Wgrad**: Wgrad quantizes `x` in 128×1 tiles (scales along tokens)
//!   directly from the f32 activation the caller kept, one rounding. The paper instead
//!   caches `x` in FP8 as Fprop read it (1×128 tiles) and re-tiles that cache for Wgrad
//!   (dequantize, requantize 128×1: two roundings); [`fp8_retile_for_wgrad`] forms that
//!   operand. On Gaussian data the second rounding raises Wgrad's calc_diff against f64
//!   from ≈6.5e-4 to ≈9.6e-4–1.0e-3, at DeepGEMM's 1e-3 acceptance threshold, so the
//!   single rounding is used.
//!   **Memory is not saved**: the layers' callers keep their f32 activations for backward
//!   as in the fp32 mode (4 bytes per element), and each FP8 GEMM additionally allocates
//!   its operands' transient codes (1 byte per element) and scales (4 bytes per 128
//!   elements) for the duration of the call. An FP8 activation cache would hold 1 byte +
//!   4/128 bytes per element (≈26% of f32; twice that to keep both tilings instead of
//!   re-tiling) but needs the layers' caches to change type.
//! - **MoE dispatch in FP8**: the experts' inputs are quantized per token (1×128 tiles)
//!   after the gather, which is the same as quantizing before the dispatch and sending
//!   codes and scales, since a token's tiles do not depend on the other tokens.
//! - Not emulated: power-of-two scales for `o_proj`'s input (attention output), FP8
//!   combine/dispatch communication, the limited-precision tensor-core accumulator
//!   ([`Accumulation::Limited`] exists in the kernels but training uses exact f32).
//!
//! The FP8 and BF16 paths exist for f32 only; a model in f64 (gradient checks) must use
//! [`Precision::Fp32`], and the layers return an error otherwise.

use crate::ModelError;
use flotilla_kernels::gemm::{Accumulation, MatMut, MatRef, gemm_bf16, gemm_fp8, matmul};
use flotilla_kernels::quant::{Fp8Matrix, Granularity, QuantConfig, ScaleRounding, quantize};
use half::bf16;
use serde::{Deserialize, Serialize};

/// The precision of the linear layers' GEMMs (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 operands and results: the reference.
    #[default]
    Fp32,
    /// BF16-rounded operands, f32 accumulation, BF16-rounded Fprop/Dgrad results.
    Bf16,
    /// DeepSeek-V3's block-scaled E4M3 GEMMs for Fprop, Dgrad and Wgrad.
    Fp8,
}

impl Precision {
    /// The TOML spelling: `fp32`, `bf16`, `fp8`.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp8 => "fp8",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            "fp8" => Ok(Precision::Fp8),
            _ => Err(format!("unknown precision `{s}` (expected fp32, bf16 or fp8)")),
        }
    }
}

/// The scale settings of every FP8 quantization in training: exact scales
/// `max(amax, 1e-12)/448` (see the module docs for the floor).
pub const FP8_QUANT: QuantConfig = QuantConfig { eps: 1e-12, rounding: ScaleRounding::Exact };

/// The accumulation of the training FP8 GEMMs: exact f32, promoted per 128-wide K block.
pub const FP8_ACCUMULATION: Accumulation = Accumulation::F32;

/// Rounds every element to the nearest BF16 (ties to even), in place.
pub fn round_to_bf16(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32());
}

fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// Fprop's weight operand: `W [out, in]` in 128×128 blocks.
pub fn fp8_weight(w: &[f32], out_features: usize, in_features: usize) -> Result<Fp8Matrix, ModelError> {
    Ok(quantize(w, out_features, in_features, Granularity::Block128x128, &FP8_QUANT)?)
}

/// An activation or output gradient `[rows, cols]` as a GEMM LHS, in 1×128 tiles.
pub fn fp8_rows(x: &[f32], rows: usize, cols: usize) -> Result<Fp8Matrix, ModelError> {
    Ok(quantize(x, rows, cols, Granularity::Tile1x128, &FP8_QUANT)?)
}

/// `xᵀ [cols, rows]` with scales along `rows` (Wgrad's operands): `x` quantized in 128×1
/// tiles and transposed into 1×128 tiles.
pub fn fp8_columns(x: &[f32], rows: usize, cols: usize) -> Result<Fp8Matrix, ModelError> {
    Ok(quantize(x, rows, cols, Granularity::Tile128x1, &FP8_QUANT)?.transposed())
}

/// Wgrad's activation operand as the paper forms it: the forward's 1×128-tiled FP8 `x`
/// (`cached`, `[rows, cols]`) re-tiled into 128×1 tiles (dequantized, requantized) and
/// transposed, `[cols, rows]` in 1×128 tiles. Training uses [`fp8_columns`] on the f32
/// `x` instead (one rounding; see the module docs); this is for comparisons.
pub fn fp8_retile_for_wgrad(cached: &Fp8Matrix) -> Result<Fp8Matrix, ModelError> {
    fp8_columns(&cached.dequantize(), cached.rows, cached.cols)
}

/// `y = x·Wᵀ` (overwritten) under `precision`, `x: [rows, in]`,
/// `W: [out, in]`, `y: [rows, out]`; lengths are the caller's to check.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    precision: Precision,
    w: &[f32],
    out_features: usize,
    in_features: usize,
    x: &[f32],
    rows: usize,
    y: &mut [f32],
    threads: usize,
) -> Result<(), ModelError> {
    match precision {
        Precision::Fp32 => {
            matmul(
                MatMut::row_major(y, rows, out_features, "y")?,
                0.0,
                MatRef::row_major(x, rows, in_features, "x")?,
                MatRef::row_major(w, out_features, in_features, "weight")?.t(),
                1.0,
                threads,
            )?;
            Ok(())
        }
        Precision::Bf16 => {
            let (xb, wb) = (to_bf16(x), to_bf16(w));
            gemm_bf16(
                MatMut::row_major(y, rows, out_features, "y")?,
                0.0,
                MatRef::row_major(&xb, rows, in_features, "x")?,
                MatRef::row_major(&wb, out_features, in_features, "weight")?.t(),
                1.0,
                threads,
            )?;
            round_to_bf16(y);
            Ok(())
        }
        Precision::Fp8 => {
            let qx = fp8_rows(x, rows, in_features)?;
            let qw = fp8_weight(w, out_features, in_features)?;
            gemm_fp8(&qx, &qw, FP8_ACCUMULATION, y, threads)?;
            Ok(())
        }
    }
}

/// Dgrad: `dx = dy·W`, or `dx += dy·W` with `accumulate`, under `precision`.
#[allow(clippy::too_many_arguments)]
pub fn backward_input(
    precision: Precision,
    w: &[f32],
    out_features: usize,
    in_features: usize,
    dy: &[f32],
    rows: usize,
    dx: &mut [f32],
    accumulate: bool,
    threads: usize,
) -> Result<(), ModelError> {
    if precision == Precision::Fp32 {
        matmul(
            MatMut::row_major(dx, rows, in_features, "dx")?,
            if accumulate { 1.0 } else { 0.0 },
            MatRef::row_major(dy, rows, out_features, "dy")?,
            MatRef::row_major(w, out_features, in_features, "weight")?,
            1.0,
            threads,
        )?;
        return Ok(());
    }
    // Accumulation adds the finished (rounded) product to dx.
    let mut tmp = if accumulate { vec![0f32; dx.len()] } else { Vec::new() };
    let target: &mut [f32] = if accumulate { &mut tmp } else { &mut *dx };
    match precision {
        Precision::Fp32 => unreachable!("handled above"),
        Precision::Bf16 => {
            let (dyb, wb) = (to_bf16(dy), to_bf16(w));
            gemm_bf16(
                MatMut::row_major(target, rows, in_features, "dx")?,
                0.0,
                MatRef::row_major(&dyb, rows, out_features, "dy")?,
                MatRef::row_major(&wb, out_features, in_features, "weight")?,
                1.0,
                threads,
            )?;
            round_to_bf16(target);
        }
        Precision::Fp8 => {
            let q_dy = fp8_rows(dy, rows, out_features)?;
            let q_wt = fp8_weight(w, out_features, in_features)?.transposed();
            gemm_fp8(&q_dy, &q_wt, FP8_ACCUMULATION, target, threads)?;
        }
    }
    if accumulate {
        dx.iter_mut().zip(&tmp).for_each(|(d, &p)| *d += p);
    }
    Ok(())
}

/// Wgrad: `grad += dyᵀ·x` under `precision`, `grad: [out, in]` (f32).
#[allow(clippy::too_many_arguments)]
pub fn backward_weight(
    precision: Precision,
    grad: &mut [f32],
    out_features: usize,
    in_features: usize,
    dy: &[f32],
    x: &[f32],
    rows: usize,
    threads: usize,
) -> Result<(), ModelError> {
    match precision {
        Precision::Fp32 => {
            matmul(
                MatMut::row_major(grad, out_features, in_features, "dW")?,
                1.0,
                MatRef::row_major(dy, rows, out_features, "dy")?.t(),
                MatRef::row_major(x, rows, in_features, "x")?,
                1.0,
                threads,
            )?;
            Ok(())
        }
        Precision::Bf16 => {
            let (dyb, xb) = (to_bf16(dy), to_bf16(x));
            gemm_bf16(
                MatMut::row_major(grad, out_features, in_features, "dW")?,
                1.0,
                MatRef::row_major(&dyb, rows, out_features, "dy")?.t(),
                MatRef::row_major(&xb, rows, in_features, "x")?,
                1.0,
                threads,
            )?;
            Ok(())
        }
        Precision::Fp8 => {
            let q_dyt = fp8_columns(dy, rows, out_features)?;
            let q_xt = fp8_columns(x, rows, in_features)?;
            let mut dw = vec![0f32; out_features * in_features];
            gemm_fp8(&q_dyt, &q_xt, FP8_ACCUMULATION, &mut dw, threads)?;
            grad.iter_mut().zip(&dw).for_each(|(g, &d)| *g += d);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_spelling_is_lowercase() {
        #[derive(Deserialize, Serialize)]
        struct W {
            p: Precision,
        }
        for (p, s) in [(Precision::Fp32, "fp32"), (Precision::Bf16, "bf16"), (Precision::Fp8, "fp8")] {
            let w: W = toml::from_str(&format!("p = \"{s}\"")).unwrap();
            assert_eq!(w.p, p);
            assert_eq!(s.parse::<Precision>().unwrap(), p);
            assert_eq!(p.to_string(), s);
        }
        assert!(toml::from_str::<W>("p = \"FP8\"").is_err());
        assert_eq!(Precision::default(), Precision::Fp32);
    }
}
