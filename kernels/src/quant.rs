//! Fine-grained FP8 (E4M3) quantization, as in DeepSeek-V3's FP8 recipe: one FP32 scale per
//! 1×128 tile of activations, per 128×128 block of weights, and per 128×1 tile of the
//! activations that Wgrad consumes transposed.
//!
//! ## Scales
//! For each tile, `scale = max(amax, eps) / 448` (448 = E4M3's max finite), optionally
//! rounded *up* to a power of two ([`ScaleRounding::PowerOfTwo`], DeepSeek's "UE8M0"
//! variant, whose scales are exact exponents). Elements are stored as
//! `E4M3::from_f32_saturating(x * (1 / scale))` and read back as `code · scale`. Tiles at
//! the right or bottom edge may be shorter than 128: their amax is taken over the elements
//! that exist, which equals zero padding, and nothing outside the matrix is read.
//!
//! ## Layouts (DeepGEMM's conventions, so that a CUDA path can consume them as they are)
//! Codes are row-major `[rows, cols]`. Scales are row-major f32 of logical shape
//!
//! | granularity | role | scale shape |
//! | --- | --- | --- |
//! | [`Granularity::Tile1x128`] | GEMM LHS `[m, k]` (activations) | `[m, ⌈k/128⌉]` |
//! | [`Granularity::Block128x128`] | GEMM RHS `[n, k]` (weights) | `[⌈n/128⌉, ⌈k/128⌉]` |
//! | [`Granularity::Tile128x1`] | activations kept `[tokens, channels]` for Wgrad | `[⌈tokens/128⌉, channels]` |
//!
//! DeepGEMM's kernels want the LHS scales stored column-major with TMA alignment
//! (`get_col_major_tma_aligned_tensor`); that is a storage permutation a device upload
//! makes, not a different logical layout. A `Tile128x1` matrix `[t, c]` is exactly the
//! transpose of a `Tile1x128` matrix `[c, t]`: [`Fp8Matrix::transposed`] converts between
//! them without requantizing, which is how cached activations are re-tiled for Wgrad.
//!
//! ## Non-finite input
//! Quantizing a tile that holds NaN or ±inf has no meaningful scale, so every quantizer
//! returns [`KernelError::NonFinite`] naming the first such element instead.

use crate::fp8::{E4M3, E4M3_TO_F32, Overflow};
use crate::{KernelError, check_matrix_len};
use half::bf16;
use rayon::prelude::*;

/// The tile edge of fine-grained quantization.
pub const TILE: usize = 128;

/// Rows of work handed to one rayon task; below this the overhead outweighs the gain.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;

/// How a tile's scale is rounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
pub enum ScaleRounding {
    /// `scale = max(amax, eps) / 448` as computed in f32.
    #[default]
    Exact,
    /// The same, rounded up to the next power of two (UE8M0 scales).
    PowerOfTwo,
}

/// Which elements share a scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Granularity {
    /// 1×128 tiles along rows: activations, the LHS of a GEMM.
    Tile1x128,
    /// 128×128 blocks: weights, the RHS of a GEMM.
    Block128x128,
    /// 128×1 tiles along columns: activations `[tokens, channels]` re-tiled for Wgrad.
    Tile128x1,
}

impl Granularity {
    /// The logical `[rows, cols]` shape of the scale tensor of a `rows × cols` matrix.
    pub fn scale_shape(self, rows: usize, cols: usize) -> (usize, usize) {
        match self {
            Granularity::Tile1x128 => (rows, cols.div_ceil(TILE)),
            Granularity::Block128x128 => (rows.div_ceil(TILE), cols.div_ceil(TILE)),
            Granularity::Tile128x1 => (rows.div_ceil(TILE), cols),
        }
    }

    /// Row-major index into the scale tensor for element `(row, col)`.
    #[inline]
    pub fn scale_index(self, cols: usize, row: usize, col: usize) -> usize {
        match self {
            Granularity::Tile1x128 => row * cols.div_ceil(TILE) + col / TILE,
            Granularity::Block128x128 => (row / TILE) * cols.div_ceil(TILE) + col / TILE,
            Granularity::Tile128x1 => (row / TILE) * cols + col,
        }
    }

    fn transposed(self) -> Self {
        match self {
            Granularity::Tile1x128 => Granularity::Tile128x1,
            Granularity::Block128x128 => Granularity::Block128x128,
            Granularity::Tile128x1 => Granularity::Tile1x128,
        }
    }
}

/// Settings of the scale computation.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QuantConfig {
    /// Lower bound on a tile's amax, so all-zero tiles get a finite scale.
    pub eps: f32,
    /// Whether scales are rounded up to powers of two.
    pub rounding: ScaleRounding,
}

impl Default for QuantConfig {
    /// DeepSeek-V3's inference kernel: `eps = 1e-4`, exact scales.
    fn default() -> Self {
        Self { eps: 1e-4, rounding: ScaleRounding::Exact }
    }
}

impl QuantConfig {
    fn validate(&self) -> Result<(), KernelError> {
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(KernelError::InvalidParameter {
                name: "eps",
                detail: format!("must be finite and > 0, got {}", self.eps),
            });
        }
        Ok(())
    }

    /// The scale of a tile whose largest magnitude is `amax` (finite, ≥ 0).
    #[inline(always)]
    fn scale(&self, amax: f32) -> f32 {
        let scale = amax.max(self.eps) / E4M3::MAX;
        match self.rounding {
            ScaleRounding::Exact => scale,
            ScaleRounding::PowerOfTwo => round_up_to_power_of_two(scale),
        }
    }
}

/// Smallest power of two ≥ `x`, for positive normal `x`.
#[inline(always)]
fn round_up_to_power_of_two(x: f32) -> f32 {
    let bits = x.to_bits();
    let exponent = bits & 0x7F80_0000;
    if bits & 0x007F_FFFF == 0 { x } else { f32::from_bits(exponent + 0x0080_0000) }
}

/// Element types a matrix may be quantized from.
pub trait QuantInput: Copy + Send + Sync {
    /// Widens `src` to f32 into `buf`, or returns `src` itself when it already is f32.
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
}

impl QuantInput for f32 {
    #[inline(always)]
    fn as_f32<'a>(src: &'a [f32], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl QuantInput for bf16 {
    #[inline(always)]
    fn as_f32<'a>(src: &'a [bf16], buf: &'a mut [f32]) -> &'a [f32] {
        let buf = &mut buf[..src.len()];
        for (d, s) in buf.iter_mut().zip(src) {
            *d = s.to_f32();
        }
        buf
    }
}

/// A matrix of E4M3 codes with its fine-grained scales.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Matrix {
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Row-major E4M3 codes, `rows * cols` of them.
    pub codes: Vec<u8>,
    /// Row-major scales of shape [`Granularity::scale_shape`].
    pub scales: Vec<f32>,
    /// Which elements share a scale.
    pub granularity: Granularity,
}

impl Fp8Matrix {
    /// Wraps existing codes and scales, checking every length against the shape.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        codes: Vec<u8>,
        scales: Vec<f32>,
        granularity: Granularity,
    ) -> Result<Self, KernelError> {
        check_matrix_len("codes", rows, cols, codes.len())?;
        let (sr, sc) = granularity.scale_shape(rows, cols);
        if scales.len() != sr * sc {
            return Err(KernelError::LengthMismatch {
                tensor: "scales",
                expected: sr * sc,
                actual: scales.len(),
            });
        }
        Ok(Self { rows, cols, codes, scales, granularity })
    }

    /// The logical shape of [`Self::scales`].
    pub fn scale_shape(&self) -> (usize, usize) {
        self.granularity.scale_shape(self.rows, self.cols)
    }

    /// The scale that applies to element `(row, col)`.
    #[inline]
    pub fn scale_at(&self, row: usize, col: usize) -> f32 {
        self.scales[self.granularity.scale_index(self.cols, row, col)]
    }

    /// Dequantizes into a new row-major f32 matrix.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        self.dequantize_into(&mut out).expect("buffer sized from the shape");
        out
    }

    /// Dequantizes into `out` (`rows * cols` elements): `out[r, c] = code[r, c] · scale(r, c)`.
    pub fn dequantize_into(&self, out: &mut [f32]) -> Result<(), KernelError> {
        check_matrix_len("dequantize output", self.rows, self.cols, out.len())?;
        if self.cols == 0 {
            return Ok(());
        }
        out.par_chunks_mut(self.cols)
            .with_min_len((PARALLEL_MIN_ELEMENTS / self.cols).max(1))
            .enumerate()
            .for_each(|(r, out_row)| {
                let codes = &self.codes[r * self.cols..(r + 1) * self.cols];
                for (c, (o, &code)) in out_row.iter_mut().zip(codes).enumerate() {
                    *o = E4M3_TO_F32[code as usize] * self.scale_at(r, c);
                }
            });
        Ok(())
    }

    /// The transpose, with codes moved and scales permuted but nothing requantized:
    /// `Tile128x1 [t, c]` becomes `Tile1x128 [c, t]` (and back); 128×128 blocks stay blocks.
    pub fn transposed(&self) -> Fp8Matrix {
        let (rows, cols) = (self.rows, self.cols);
        let mut codes = vec![0u8; rows * cols];
        // Blocked so that both the reads and the writes stay within a few cache lines.
        const B: usize = 32;
        for r0 in (0..rows).step_by(B) {
            for c0 in (0..cols).step_by(B) {
                for r in r0..(r0 + B).min(rows) {
                    for c in c0..(c0 + B).min(cols) {
                        codes[c * rows + r] = self.codes[r * cols + c];
                    }
                }
            }
        }
        let (sr, sc) = self.scale_shape();
        let mut scales = vec![0f32; sr * sc];
        for i in 0..sr {
            for j in 0..sc {
                scales[j * sr + i] = self.scales[i * sc + j];
            }
        }
        Fp8Matrix { rows: cols, cols: rows, codes, scales, granularity: self.granularity.transposed() }
    }
}

/// Largest `|x|` as f32 bits; ≥ 0x7F80_0000 exactly when a NaN or ±inf is present (as
/// integers, NaN's magnitude bits exceed inf's, which exceed every finite value's).
#[inline(always)]
fn amax_bits(x: &[f32]) -> u32 {
    x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7FFF_FFFF))
}

#[inline(always)]
fn encode_scaled(src: &[f32], inv_scale: f32, dst: &mut [u8]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = E4M3::from_f32_with(s * inv_scale, Overflow::Saturate).to_bits();
    }
}

fn first_non_finite<T: QuantInput>(x: &[T]) -> KernelError {
    let mut buf = [0f32; TILE];
    for (t, tile) in x.chunks(TILE).enumerate() {
        if let Some((i, &value)) = T::as_f32(tile, &mut buf).iter().enumerate().find(|(_, v)| !v.is_finite())
        {
            return KernelError::NonFinite { tensor: "quantize input", index: t * TILE + i, value };
        }
    }
    unreachable!("called only after a tile with a non-finite element was seen")
}

/// Quantizes one row in 1×128 tiles; returns false, leaving the rest of the row undone, at
/// the first tile that holds a non-finite element.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn quantize_row_1x128(row: &[f32], cfg: &QuantConfig, codes: &mut [u8], scales: &mut [f32]) -> bool {
    for ((tile, code_tile), scale) in row.chunks(TILE).zip(codes.chunks_mut(TILE)).zip(scales.iter_mut()) {
        let amax = amax_bits(tile);
        if amax >= 0x7F80_0000 {
            return false;
        }
        let s = cfg.scale(f32::from_bits(amax));
        *scale = s;
        encode_scaled(tile, 1.0 / s, code_tile);
    }
    true
}

/// Quantizes a row-major `rows × cols` matrix with the given granularity.
pub fn quantize<T: QuantInput>(
    x: &[T],
    rows: usize,
    cols: usize,
    granularity: Granularity,
    cfg: &QuantConfig,
) -> Result<Fp8Matrix, KernelError> {
    check_matrix_len("quantize input", rows, cols, x.len())?;
    let (sr, sc) = granularity.scale_shape(rows, cols);
    let mut m =
        Fp8Matrix { rows, cols, codes: vec![0; rows * cols], scales: vec![0.0; sr * sc], granularity };
    quantize_into(x, rows, cols, cfg, &mut m)?;
    Ok(m)
}

/// Quantizes into an existing [`Fp8Matrix`] whose shape and granularity are already set
/// (so a training step reuses its buffers).
pub fn quantize_into<T: QuantInput>(
    x: &[T],
    rows: usize,
    cols: usize,
    cfg: &QuantConfig,
    out: &mut Fp8Matrix,
) -> Result<(), KernelError> {
    cfg.validate()?;
    check_matrix_len("quantize input", rows, cols, x.len())?;
    if out.rows != rows || out.cols != cols {
        return Err(KernelError::ShapeMismatch {
            detail: format!("quantize output is {}×{}, input is {rows}×{cols}", out.rows, out.cols),
        });
    }
    check_matrix_len("quantize output codes", rows, cols, out.codes.len())?;
    let (sr, sc) = out.scale_shape();
    if out.scales.len() != sr * sc {
        return Err(KernelError::LengthMismatch {
            tensor: "quantize output scales",
            expected: sr * sc,
            actual: out.scales.len(),
        });
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let found = match out.granularity {
        Granularity::Tile1x128 => quantize_1x128(x, cols, cfg, &mut out.codes, &mut out.scales),
        Granularity::Block128x128 => quantize_blocks(x, cols, cfg, true, &mut out.codes, &mut out.scales),
        Granularity::Tile128x1 => quantize_blocks(x, cols, cfg, false, &mut out.codes, &mut out.scales),
    };
    // Parallel tasks stop at whichever bad tile they meet first; a sequential scan names the
    // first bad element in row-major order, so the error is the same on every run.
    found.map_err(|FoundNonFinite| first_non_finite(x))
}

/// Marks a tile that holds NaN or ±inf; the caller then names the first such element.
struct FoundNonFinite;

fn quantize_1x128<T: QuantInput>(
    x: &[T],
    cols: usize,
    cfg: &QuantConfig,
    codes: &mut [u8],
    scales: &mut [f32],
) -> Result<(), FoundNonFinite> {
    let tiles_per_row = cols.div_ceil(TILE);
    let rows_per_task = (PARALLEL_MIN_ELEMENTS / cols).max(1);
    x.par_chunks(cols * rows_per_task)
        .zip(codes.par_chunks_mut(cols * rows_per_task))
        .zip(scales.par_chunks_mut(tiles_per_row * rows_per_task))
        .try_for_each(|((x, codes), scales)| {
            let mut buf = vec![0f32; cols];
            for ((row, code_row), scale_row) in
                x.chunks(cols).zip(codes.chunks_mut(cols)).zip(scales.chunks_mut(tiles_per_row))
            {
                let row = T::as_f32(row, &mut buf);
                if !quantize_row_1x128(row, cfg, code_row, scale_row) {
                    return Err(FoundNonFinite);
                }
            }
            Ok(())
        })
}

/// 128×128 blocks (`square`) or 128×1 tiles. Both walk a band of up to 128 rows one
/// 128-column chunk at a time (64 KiB of f32, cache-resident): per-column amax over the
/// chunk, the chunk's scales, then encoding, so each element is read from memory once.
fn quantize_blocks<T: QuantInput>(
    x: &[T],
    cols: usize,
    cfg: &QuantConfig,
    square: bool,
    codes: &mut [u8],
    scales: &mut [f32],
) -> Result<(), FoundNonFinite> {
    let scale_cols = if square { cols.div_ceil(TILE) } else { cols };
    x.par_chunks(TILE * cols)
        .zip(codes.par_chunks_mut(TILE * cols))
        .zip(scales.par_chunks_mut(scale_cols))
        .try_for_each(|((x, codes), band_scales)| {
            let band_rows = x.len() / cols;
            let mut buf = [0f32; TILE];
            let mut col_amax = [0u32; TILE];
            let mut inv_scales = [0f32; TILE];
            for c0 in (0..cols).step_by(TILE) {
                let width = TILE.min(cols - c0);
                let chunk = |r: usize| c0 + r * cols..c0 + r * cols + width;
                let col_amax = &mut col_amax[..width];
                col_amax.fill(0);
                for r in 0..band_rows {
                    accumulate_column_amax(T::as_f32(&x[chunk(r)], &mut buf), col_amax);
                }
                if col_amax.iter().any(|&m| m >= 0x7F80_0000) {
                    return Err(FoundNonFinite);
                }
                let inv_scales = &mut inv_scales[..width];
                if square {
                    let amax = col_amax.iter().copied().max().unwrap_or(0);
                    let scale = cfg.scale(f32::from_bits(amax));
                    band_scales[c0 / TILE] = scale;
                    inv_scales.fill(1.0 / scale);
                } else {
                    for ((s, inv), &amax) in
                        band_scales[c0..c0 + width].iter_mut().zip(inv_scales.iter_mut()).zip(&*col_amax)
                    {
                        *s = cfg.scale(f32::from_bits(amax));
                        *inv = 1.0 / *s;
                    }
                }
                for r in 0..band_rows {
                    let row = T::as_f32(&x[chunk(r)], &mut buf);
                    encode_row_per_column(row, inv_scales, &mut codes[chunk(r)]);
                }
            }
            Ok(())
        })
}

/// `amax[c] = max(amax[c], |row[c]|)` on f32 bits (see [`amax_bits`]).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn accumulate_column_amax(row: &[f32], amax: &mut [u32]) {
    for (m, v) in amax.iter_mut().zip(row) {
        *m = (*m).max(v.to_bits() & 0x7FFF_FFFF);
    }
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn encode_row_per_column(row: &[f32], inv_scales: &[f32], codes: &mut [u8]) {
    for ((d, &s), &inv) in codes.iter_mut().zip(row).zip(inv_scales) {
        *d = E4M3::from_f32_with(s * inv, Overflow::Saturate).to_bits();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_of_two_rounding_is_upward() {
        assert_eq!(round_up_to_power_of_two(1.0), 1.0);
        assert_eq!(round_up_to_power_of_two(1.0001), 2.0);
        assert_eq!(round_up_to_power_of_two(0.3), 0.5);
        assert_eq!(round_up_to_power_of_two(3.0e-7), 2f32.powi(-21));
    }

    #[test]
    fn scale_shapes_follow_deepgemm() {
        assert_eq!(Granularity::Tile1x128.scale_shape(300, 257), (300, 3));
        assert_eq!(Granularity::Block128x128.scale_shape(300, 257), (3, 3));
        assert_eq!(Granularity::Tile128x1.scale_shape(300, 257), (3, 257));
    }
}
