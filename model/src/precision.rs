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
//! ([`Backend::gemm_bf16`]). Fprop `y = x·Wᵀ` and Dgrad `dx = dy·W` round their result to BF16 (an
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
//! All three run on [`Backend::gemm_fp8`] with [`Accumulation::F32`] and write f32 results.
//! Scales are `max(amax, eps)/448` with [`FP8_QUANT`] (`eps = 1e-12`, not the inference
//! kernel's 1e-4: backward gradients here are often below 1e-4, and a 1e-4 floor would
//! push whole tiles of them into E4M3's subnormals).
//!
//! - **W's quantization is shared by Fprop and Dgrad**: Dgrad uses the exact transpose of
//!   the 128×128-block quantization of `W` (codes moved, scales permuted, nothing
//!   requantized), as DeepSeek does. The layer keeps no state between calls, so Dgrad
//!   quantizes `W` again; `W` does not change between forward and backward, so the codes
//!   and scales are bit-identical to the forward's.
//! - **MoE dispatch in FP8**: the MoE layer's input is quantized once per token (1×128
//!   tiles), and each expert gathers its rows' codes and scales: the payload a
//!   distributed dispatch sends, bit-identical to quantizing each expert's gathered rows.
//!   Under expert parallelism those codes and scales are what travels
//!   ([`crate::expert_parallel`]), and the combine returns BF16.
//! - Not emulated: power-of-two scales for the dispatch payload and for the activation
//!   gradient before the down-projections (the report uses them there too), the
//!   limited-precision tensor-core accumulator
//!   ([`Accumulation::Limited`] exists in the kernels but training uses exact f32).
//!
//! ## Cached activations (report §3.3.3, "Low-Precision Storage")
//! What forward keeps for a linear layer's Wgrad is a [`CachedActivation`]: under fp32
//! and bf16 the f32 activation as computed (as before FP8 caching existed), under fp8
//! [`CachedActivation::Fp8`]: the E4M3 codes and 1×128-tile scales that Fprop consumed,
//! about 1.03 bytes per element instead of 4. Layers take their input as a
//! `CachedActivation` that the caller built ([`crate::linear::Linear::cache_input`]) and
//! keeps for W, so a tensor read by several layers is quantized and kept once:
//! `q_a_proj` and `kv_a_proj_with_mqa` share the normed hidden state, `gate_proj` and
//! `up_proj` their input, the shared and routed experts the MoE input.
//!
//! - **Wgrad re-tiles the cache**: [`CachedActivation::wgrad_input`] gives Wgrad's
//!   activation operand, for FP8 [`fp8_retile_for_wgrad`] of the cache (dequantize,
//!   requantize in 128×1 tiles, transpose), formed once per cache and shared by the
//!   layers that read it. That is two roundings of `x` where quantizing the f32 `x` in
//!   128×1 tiles would be one: on the layer test's data (Gaussian, tokens of 1–7× spread)
//!   Wgrad's calc_diff against f32 rises from 6.5e-4 to 9.8e-4, just inside DeepGEMM's
//!   1e-3 acceptance threshold. Activations that only exist in f32 at W time are
//!   quantized in 128×1 tiles directly (one rounding): the SwiGLU output `down_proj`
//!   reads, recomputed in backward, and any activation a caller passes as
//!   [`CachedActivation::Full`] to an fp8 layer. Activations recomputed under `recompute`
//!   (RMSNorm outputs) are requantized in 1×128 tiles exactly as forward did, so results
//!   stay bit-identical with and without recomputation.
//! - **The attention output** (`o_proj`'s input): the report stores it in a custom E5M6
//!   format with power-of-two scales, because the attention backward reads it too (for
//!   `D = rowsum(dO∘O)`), which makes it sensitive to precision, and so that the 1×128 →
//!   128×1 re-tiling adds no error. Here it is quantized once, for Fprop and the cache,
//!   with power-of-two (UE8M0) scales ([`FP8_QUANT_POW2`]) and re-tiled with
//!   power-of-two scales too, which moves each code by a power of two: exact for every
//!   value that stays in E4M3's normal range under its 128×1 tile's scale; values below
//!   2⁻⁶ of that scale lose low bits to E4M3's subnormals. **Deviation: E4M3 codes, not
//!   E5M6**, since the kernels have no E5M6 codec: 3 mantissa bits instead of 6 (relative
//!   rounding up to 2⁻⁴ instead of 2⁻⁷) and 4 exponent bits instead of 5 (hence the
//!   subnormal caveat). The attention backward reads the dequantized cache, as the
//!   report's does, so no f32 copy of the attention output is kept; on `tiny` that leaves
//!   the whole model's gradient calc_diff against fp32 where an f32 copy puts it
//!   (3.4e-3–3.5e-3 either way, one step at 8 × 64 tokens).
//! - **The SwiGLU inputs of the MoE experts** (shared and routed: the `gate_proj` and
//!   `up_proj` outputs) are kept in FP8, 1×128 tiles, exact scales; backward dequantizes
//!   them for SwiGLU's backward and recomputes the SwiGLU output from them. Forward's
//!   SwiGLU reads the f32 outputs. The dense FFN keeps its SwiGLU inputs in f32 (the
//!   report names MoE's).
//! - **Everything else stays f32**: the residual stream and RMSNorm inputs, the MLA
//!   latents, the shared rope key, the attention core's `q`, `k`, `v` and log-sum-exp,
//!   the MoE scores and expert outputs, the heads. The MoE gate, which computes in f32,
//!   reads its input in f32 in forward and W; under fp8 the block keeps only the FP8
//!   copy of that input and recomputes the RMSNorm (bit-identical) for the gate's Wgrad.
//!
//! ## The device seam
//! Every function here that computes takes the [`DeviceBackend`] it runs on (the layer's,
//! see [`crate::linear::Linear::backend`]) and reaches the GEMMs and quantization only
//! through it: this module is the funnel through which the linear layers reach the
//! backend.
//!
//! The FP8 and BF16 paths exist for f32 only; a model in f64 (gradient checks) must use
//! [`Precision::Fp32`], and the layers return an error otherwise.

use crate::{ModelError, Real, check_len};
use flotilla_kernels::backend::{Backend, DeviceBackend};
use flotilla_kernels::gemm::{Accumulation, MatMut, MatRef};
use flotilla_kernels::quant::{Fp8Matrix, Granularity, QuantConfig, ScaleRounding, TILE};
use half::bf16;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

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

/// Checks that `precision` can run on `T`: every precision on f32, only
/// [`Precision::Fp32`] on f64 (the BF16 and FP8 kernels are f32-only). `what` names the
/// layer or model in the error.
pub fn check_precision<T: Real>(precision: Precision, what: &str) -> Result<(), ModelError> {
    if precision == Precision::Fp32 || T::as_f32_slice(&[]).is_some() {
        return Ok(());
    }
    Err(ModelError::Tensor {
        tensor: what.to_string(),
        detail: format!(
            "precision {precision} runs on f32 only; a {}-byte float model (gradient checks) must use fp32",
            std::mem::size_of::<T>()
        ),
    })
}

/// The scale settings of every FP8 quantization in training: exact scales
/// `max(amax, 1e-12)/448` (see the module docs for the floor).
pub const FP8_QUANT: QuantConfig = QuantConfig { eps: 1e-12, rounding: ScaleRounding::Exact };

/// [`FP8_QUANT`] with scales rounded up to powers of two (UE8M0): the attention output's
/// (see the module docs).
pub const FP8_QUANT_POW2: QuantConfig = QuantConfig { eps: 1e-12, rounding: ScaleRounding::PowerOfTwo };

/// The FP8 scale settings of an activation whose scales are rounded by `rounding`.
pub fn fp8_quant(rounding: ScaleRounding) -> QuantConfig {
    match rounding {
        ScaleRounding::Exact => FP8_QUANT,
        ScaleRounding::PowerOfTwo => FP8_QUANT_POW2,
    }
}

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
pub fn fp8_weight(
    be: &DeviceBackend,
    w: &[f32],
    out_features: usize,
    in_features: usize,
) -> Result<Fp8Matrix, ModelError> {
    Ok(be.quantize(w, out_features, in_features, Granularity::Block128x128, &FP8_QUANT)?)
}

/// An activation or output gradient `[rows, cols]` as a GEMM LHS, in 1×128 tiles.
pub fn fp8_rows(be: &DeviceBackend, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Matrix, ModelError> {
    Ok(be.quantize(x, rows, cols, Granularity::Tile1x128, &FP8_QUANT)?)
}

/// `xᵀ [cols, rows]` with scales along `rows` (Wgrad's operands): `x` quantized in 128×1
/// tiles and transposed into 1×128 tiles.
pub fn fp8_columns(be: &DeviceBackend, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Matrix, ModelError> {
    fp8_columns_with(be, x, rows, cols, &FP8_QUANT)
}

fn fp8_columns_with(
    be: &DeviceBackend,
    x: &[f32],
    rows: usize,
    cols: usize,
    cfg: &QuantConfig,
) -> Result<Fp8Matrix, ModelError> {
    Ok(be.quantize(x, rows, cols, Granularity::Tile128x1, cfg)?.transposed())
}

/// Wgrad's activation operand as the paper forms it from the FP8 cache: the forward's
/// 1×128-tiled `x` (`cached`, `[rows, cols]`) dequantized, requantized in 128×1 tiles with
/// scales rounded as `rounding` (the cache's own: power-of-two scales on both tilings
/// make the re-tiling exact, see the module docs), and transposed: `xᵀ [cols, rows]` in
/// 1×128 tiles.
pub fn fp8_retile_for_wgrad(
    be: &DeviceBackend,
    cached: &Fp8Matrix,
    rounding: ScaleRounding,
) -> Result<Fp8Matrix, ModelError> {
    if cached.granularity != Granularity::Tile1x128 {
        return Err(ModelError::Tensor {
            tensor: "cached activation".into(),
            detail: format!("re-tiling for Wgrad needs 1×128 tiles, got {:?}", cached.granularity),
        });
    }
    let mut x = vec![0f32; cached.codes.len()];
    be.dequantize_into(cached, &mut x)?;
    fp8_columns_with(be, &x, cached.rows, cached.cols, &fp8_quant(rounding))
}

/// An activation kept from forward for the Wgrad of the linear layers that read it (see
/// the module docs): as computed, or under fp8 as the E4M3 codes and 1×128-tile scales
/// that their Fprop read.
#[derive(Clone, Debug, PartialEq)]
pub enum CachedActivation<T> {
    /// The activation as computed, row-major `[rows, cols]` (fp32, bf16, f64 models).
    Full(Vec<T>),
    /// Under fp8: Fprop's LHS, `[rows, cols]` in 1×128 tiles.
    Fp8 {
        /// Codes and scales.
        matrix: Fp8Matrix,
        /// How the scales were rounded; the Wgrad re-tiling rounds the same way.
        rounding: ScaleRounding,
    },
}

/// Wgrad's activation operand, from [`CachedActivation::wgrad_input`].
#[derive(Clone, Debug, PartialEq)]
pub enum WgradInput<'a, T> {
    /// The activation as computed, `[rows, cols]`.
    Full(&'a [T]),
    /// Under fp8: `xᵀ [cols, rows]` in 1×128 tiles (scales along tokens), the cache
    /// re-tiled by [`fp8_retile_for_wgrad`].
    Fp8(Fp8Matrix),
}

/// Bytes held by caches, split by storage: f32 (or f64) elements, and FP8 codes with their
/// f32 scales.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheBytes {
    /// Elements kept as the layer's float type.
    pub full: usize,
    /// FP8 codes (1 byte each) and their scales (4 bytes each).
    pub fp8: usize,
}

impl CacheBytes {
    /// `len` elements of `T`.
    pub fn of<T>(len: usize) -> Self {
        CacheBytes { full: len * std::mem::size_of::<T>(), fp8: 0 }
    }

    /// Both kinds together.
    pub fn total(&self) -> usize {
        self.full + self.fp8
    }
}

impl std::ops::Add for CacheBytes {
    type Output = CacheBytes;

    fn add(self, other: CacheBytes) -> CacheBytes {
        CacheBytes { full: self.full + other.full, fp8: self.fp8 + other.fp8 }
    }
}

impl std::iter::Sum for CacheBytes {
    fn sum<I: Iterator<Item = CacheBytes>>(iter: I) -> CacheBytes {
        iter.fold(CacheBytes::default(), |a, b| a + b)
    }
}

impl<T: Real> CachedActivation<T> {
    /// `x` (`[rows, cols]`) as `precision` keeps it: quantized in 1×128 tiles with scales
    /// rounded as `rounding` under fp8 (which needs `T = f32`), `x` itself otherwise. A
    /// borrowed `x` is copied only when kept as it is. `what` names the activation in
    /// errors (a length mismatch; under fp8 a non-finite element).
    pub fn new<'a>(
        be: &DeviceBackend,
        precision: Precision,
        x: impl Into<Cow<'a, [T]>>,
        rows: usize,
        cols: usize,
        rounding: ScaleRounding,
        what: &str,
    ) -> Result<Self, ModelError> {
        let x = x.into();
        let n = rows.checked_mul(cols).ok_or_else(|| ModelError::Tensor {
            tensor: what.to_string(),
            detail: format!("{rows} × {cols} overflows usize"),
        })?;
        check_len(what, "activation", n, x.len())?;
        if precision != Precision::Fp8 {
            return Ok(CachedActivation::Full(x.into_owned()));
        }
        let xf = T::as_f32_slice(&x).ok_or_else(|| f32_only::<T>(precision, what))?;
        let matrix = be.quantize(xf, rows, cols, Granularity::Tile1x128, &fp8_quant(rounding))?;
        Ok(CachedActivation::Fp8 { matrix, rounding })
    }

    /// Elements (`rows · cols`).
    pub fn len(&self) -> usize {
        match self {
            CachedActivation::Full(x) => x.len(),
            CachedActivation::Fp8 { matrix, .. } => matrix.codes.len(),
        }
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it holds FP8 codes.
    pub fn is_fp8(&self) -> bool {
        matches!(self, CachedActivation::Fp8 { .. })
    }

    /// The bytes it holds.
    pub fn bytes(&self) -> CacheBytes {
        match self {
            CachedActivation::Full(x) => CacheBytes::of::<T>(x.len()),
            CachedActivation::Fp8 { matrix, .. } => CacheBytes {
                full: 0,
                fp8: matrix.codes.len() + std::mem::size_of_val(matrix.scales.as_slice()),
            },
        }
    }

    /// The values: the activation itself, or the FP8 cache dequantized.
    pub fn values(&self, be: &DeviceBackend) -> Result<Cow<'_, [T]>, ModelError> {
        match self {
            CachedActivation::Full(x) => Ok(Cow::Borrowed(x)),
            CachedActivation::Fp8 { matrix, .. } => {
                let mut out = vec![T::zero(); matrix.codes.len()];
                let target = T::as_f32_slice_mut(&mut out)
                    .ok_or_else(|| f32_only::<T>(Precision::Fp8, "cached activation"))?;
                be.dequantize_into(matrix, target)?;
                Ok(Cow::Owned(out))
            }
        }
    }

    /// Wgrad's operand: the activation itself, or the FP8 cache re-tiled
    /// ([`fp8_retile_for_wgrad`]). Form it once for all the layers that read the cache.
    pub fn wgrad_input(&self, be: &DeviceBackend) -> Result<WgradInput<'_, T>, ModelError> {
        match self {
            CachedActivation::Full(x) => Ok(WgradInput::Full(x)),
            CachedActivation::Fp8 { matrix, rounding } => {
                Ok(WgradInput::Fp8(fp8_retile_for_wgrad(be, matrix, *rounding)?))
            }
        }
    }

    /// The rows `rows` (in order) of the `[_, cols]` activation: an FP8 cache's codes with
    /// their tiles' scales, unchanged (a token's 1×128 tiles do not depend on the other
    /// tokens). Every index must be a row of the activation.
    pub fn gather_rows(&self, rows: &[usize], cols: usize) -> Result<Self, ModelError> {
        let total = self.len().checked_div(cols).unwrap_or(0);
        if let Some(&bad) = rows.iter().find(|&&r| r >= total) {
            return Err(ModelError::Tensor {
                tensor: "cached activation".into(),
                detail: format!("row {bad} gathered from {total} rows"),
            });
        }
        match self {
            CachedActivation::Full(x) => Ok(CachedActivation::Full(gather(x, rows, cols))),
            CachedActivation::Fp8 { matrix, rounding } => {
                if matrix.cols != cols || matrix.granularity != Granularity::Tile1x128 {
                    return Err(ModelError::Tensor {
                        tensor: "cached activation".into(),
                        detail: format!(
                            "gathering rows of width {cols} from a {}×{} FP8 matrix in {:?}",
                            matrix.rows, matrix.cols, matrix.granularity
                        ),
                    });
                }
                let codes = gather(&matrix.codes, rows, cols);
                let scales = gather(&matrix.scales, rows, cols.div_ceil(TILE));
                let matrix = Fp8Matrix::from_parts(rows.len(), cols, codes, scales, Granularity::Tile1x128)?;
                Ok(CachedActivation::Fp8 { matrix, rounding: *rounding })
            }
        }
    }
}

/// The rows `rows` of `v: [_, width]`, in order (indices checked by the caller).
fn gather<E: Copy>(v: &[E], rows: &[usize], width: usize) -> Vec<E> {
    let mut out = Vec::with_capacity(rows.len() * width);
    for &r in rows {
        out.extend_from_slice(&v[r * width..(r + 1) * width]);
    }
    out
}

fn f32_only<T: Real>(precision: Precision, what: &str) -> ModelError {
    check_precision::<T>(precision, what).err().unwrap_or_else(|| ModelError::Tensor {
        tensor: what.to_string(),
        detail: format!("precision {precision} runs on f32 only"),
    })
}

/// `y = x·Wᵀ` (overwritten) under `precision`, `x: [rows, in]`,
/// `W: [out, in]`, `y: [rows, out]`; lengths are the caller's to check.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    be: &DeviceBackend,
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
            be.matmul(
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
            be.gemm_bf16(
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
            let qx = fp8_rows(be, x, rows, in_features)?;
            forward_fp8(be, w, out_features, in_features, &qx, y, threads)
        }
    }
}

/// FP8 Fprop `y = x·Wᵀ` (overwritten) on an already quantized `x` (`[rows, in]`, 1×128
/// tiles), `y: [rows, out]`.
pub fn forward_fp8(
    be: &DeviceBackend,
    w: &[f32],
    out_features: usize,
    in_features: usize,
    qx: &Fp8Matrix,
    y: &mut [f32],
    threads: usize,
) -> Result<(), ModelError> {
    let qw = fp8_weight(be, w, out_features, in_features)?;
    be.gemm_fp8(qx, &qw, FP8_ACCUMULATION, y, threads)?;
    Ok(())
}

/// Dgrad: `dx = dy·W`, or `dx += dy·W` with `accumulate`, under `precision`.
#[allow(clippy::too_many_arguments)]
pub fn backward_input(
    be: &DeviceBackend,
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
        be.matmul(
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
            be.gemm_bf16(
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
            let q_dy = fp8_rows(be, dy, rows, out_features)?;
            let q_wt = fp8_weight(be, w, out_features, in_features)?.transposed();
            be.gemm_fp8(&q_dy, &q_wt, FP8_ACCUMULATION, target, threads)?;
        }
    }
    if accumulate {
        dx.iter_mut().zip(&tmp).for_each(|(d, &p)| *d += p);
    }
    Ok(())
}

/// Wgrad: `grad += dyᵀ·x` under `precision`, `grad: [out, in]` (f32). Under fp8 `x` is
/// quantized in 128×1 tiles directly (one rounding): for activations that exist in f32
/// at W time; cached ones go through [`backward_weight_fp8`].
#[allow(clippy::too_many_arguments)]
pub fn backward_weight(
    be: &DeviceBackend,
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
            be.matmul(
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
            be.gemm_bf16(
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
            let q_xt = fp8_columns(be, x, rows, in_features)?;
            backward_weight_fp8(be, grad, out_features, in_features, dy, &q_xt, threads)
        }
    }
}

/// FP8 Wgrad `grad += dyᵀ·x` with `x` given as `q_xt`, `xᵀ [in, rows]` in 1×128 tiles
/// (scales along tokens: [`fp8_columns`] or [`fp8_retile_for_wgrad`]); `dy: [rows, out]`
/// is quantized in 128×1 tiles here.
pub fn backward_weight_fp8(
    be: &DeviceBackend,
    grad: &mut [f32],
    out_features: usize,
    in_features: usize,
    dy: &[f32],
    q_xt: &Fp8Matrix,
    threads: usize,
) -> Result<(), ModelError> {
    check_len("dW", "gradient", out_features * in_features, grad.len())?;
    let q_dyt = fp8_columns(be, dy, q_xt.cols, out_features)?;
    let mut dw = vec![0f32; out_features * in_features];
    be.gemm_fp8(&q_dyt, q_xt, FP8_ACCUMULATION, &mut dw, threads)?;
    grad.iter_mut().zip(&dw).for_each(|(g, &d)| *g += d);
    Ok(())
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
