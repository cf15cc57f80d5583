//! DeepGEMM's block-scaled FP8 GEMM on the CPU, in its NT layout ([`gemm_fp8`]), with
//! two accumulation models ([`Accumulation`]): exact f32 accumulation promoted per
//! 128-wide K block, which runs on the f32 GEMM over decoded panels, and an emulation of
//! the H800 tensor core's limited-precision accumulator, which is scalar per output
//! element (vectorized across a few columns) and meant for numerical experiments.
//!
//! Invariant: rows are cut into bands, counted from the first row of the segment they
//! belong to, and columns into tiles, with sizes fixed by the accumulation mode; a band's
//! result within a tile depends on nothing else. Tasks group bands (so a tile's RHS is
//! decoded once per group) as `threads` suggests, which therefore never changes a bit of
//! the result, and the grouped GEMM, which cuts each run of rows into bands the same way,
//! reproduces [`gemm_fp8`] on that run exactly.

use super::dense::gemm_with;
use super::view::{MatMut, MatRef};
use super::{check_threads, run_tasks};
use crate::KernelError;
use crate::quant::{Fp8Matrix, Granularity, TILE};
use half::bf16;

/// How the limited-precision accumulator rounds after each addition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum AccumulatorRounding {
    /// Drop the bits that do not fit (round toward zero), as the H800's FP8 tensor-core
    /// accumulator is reported to do.
    #[default]
    TowardZero,
    /// Round to nearest, ties to even (IEEE's default).
    NearestEven,
}

/// The limited-precision accumulator of an FP8 tensor core, as a numerical model.
///
/// Per output element, K is walked in chunks of [`products_per_add`] products (the K depth
/// of one MMA instruction). Each step forms the exact sum of the accumulator and the
/// chunk's products (in f64; FP8 code products and their sums are exact there) and rounds
/// it to `1 + mantissa_bits` significant bits in f32's exponent range
/// ([`round_to_mantissa_bits`]). A K tail shorter than a chunk is a shorter chunk, which
/// is what zero padding would give.
///
/// With [`promote_every`] `= Some(nc)` (DeepGEMM's scheme), the accumulator sums raw code
/// products and, every `nc` elements of K, is promoted: `C += acc·(sa[i, kb]·sb[j/128, kb])`
/// in f32 and `acc = 0` (`sb[j, kb]` for a Tile1x128 RHS). With `None`, nothing is promoted: since per-block scales cannot
/// be applied inside a tensor core, each product enters already scaled (`a·b·sa·sb`,
/// computed in f64, whose rounding is ~2⁻⁵³, far below the accumulator's) and the
/// accumulator runs across the whole of K; `C` is its final value. That isolates the
/// effect of the accumulator's precision, which is what the report's 2% figure measures.
///
/// [`products_per_add`]: Self::products_per_add
/// [`promote_every`]: Self::promote_every
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitedAccumulator {
    /// Explicit mantissa bits the accumulator keeps (at most 23, f32's). Default 13.
    pub mantissa_bits: u32,
    /// Products summed exactly before each rounded accumulator update. NVIDIA does not
    /// publish this depth for FP8 MMA; Fasi et al. (2021) measured 4 on earlier tensor
    /// cores, which is the default. It moves the unpromoted error a lot (at K = 4096 on
    /// uniform inputs ≈2.3% at 4, ≈1.2% at 8, ≈0.3% at 32, a single `wgmma`'s K), so read
    /// it as the model's free parameter.
    pub products_per_add: usize,
    /// Rounding of each update. Default [`AccumulatorRounding::TowardZero`].
    pub rounding: AccumulatorRounding,
    /// `N_C`: elements of K between promotions to f32; must divide 128 and be a multiple
    /// of `products_per_add`. `None` disables promotion. Default `Some(128)`.
    pub promote_every: Option<usize>,
}

impl Default for LimitedAccumulator {
    /// The H800 as DeepSeek-V3 uses it: 13 mantissa bits, 4 products per update,
    /// truncation, promotion every 128 elements of K.
    fn default() -> Self {
        Self {
            mantissa_bits: 13,
            products_per_add: 4,
            rounding: AccumulatorRounding::TowardZero,
            promote_every: Some(TILE),
        }
    }
}

impl LimitedAccumulator {
    /// Checks the parameters against the constraints documented on each field.
    pub fn validate(&self) -> Result<(), KernelError> {
        if self.mantissa_bits > 23 {
            return Err(KernelError::InvalidParameter {
                name: "mantissa_bits",
                detail: format!(
                    "must be at most 23 (the accumulator is at most an f32), got {}",
                    self.mantissa_bits
                ),
            });
        }
        if self.products_per_add == 0 {
            return Err(KernelError::InvalidParameter {
                name: "products_per_add",
                detail: "must be at least 1".into(),
            });
        }
        if let Some(nc) = self.promote_every
            && (nc == 0 || !TILE.is_multiple_of(nc) || !nc.is_multiple_of(self.products_per_add))
        {
            return Err(KernelError::InvalidParameter {
                name: "promote_every",
                detail: format!(
                    "must divide {TILE} (the scale block) and be a multiple of products_per_add = {}, got {nc}",
                    self.products_per_add
                ),
            });
        }
        Ok(())
    }
}

/// How an FP8 GEMM accumulates.
///
/// - [`Accumulation::F32`], what DeepGEMM computes: for each 128-wide K block `kb`, the
///   raw code products (exact in f32: each code has 4 significant bits) are summed in f32
///   into `P`, then promoted: `C += P·(sa[i, kb]·sb[j/128, kb])` in f32
///   (`sb[j, kb]` for a Tile1x128 RHS).
/// - [`Accumulation::Limited`]: the H800 tensor core's accumulator, which keeps about 14
///   significant bits instead of f32's 24 (DeepSeek-V3 report §3.3.2; SageAttention2
///   measured it as "FP22": 1 sign, 8 exponent, 13 mantissa bits), with or without
///   DeepGEMM's promotion to f32 every `N_C` elements of K. See [`LimitedAccumulator`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Accumulation {
    /// Exact f32 accumulation with scales applied per 128-wide K block: each block's raw
    /// code products are summed in f32, then scaled into the f32 result (DeepGEMM's
    /// promotion semantics).
    #[default]
    F32,
    /// The tensor core's limited-precision accumulator, emulated.
    Limited(LimitedAccumulator),
}

impl Accumulation {
    /// Checks the parameters of a [`Accumulation::Limited`] model.
    pub fn validate(&self) -> Result<(), KernelError> {
        match self {
            Accumulation::F32 => Ok(()),
            Accumulation::Limited(cfg) => cfg.validate(),
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

/// Element types an FP8 GEMM can write: `f32`, or `bf16` rounded to nearest even.
pub trait GemmOutput: Copy + Send + Sync + sealed::Sealed {
    /// Writes finished f32 results.
    fn store(src: &[f32], dst: &mut [Self]);
}

impl GemmOutput for f32 {
    fn store(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl GemmOutput for bf16 {
    fn store(src: &[f32], dst: &mut [bf16]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = bf16::from_f32(s);
        }
    }
}

/// `C = A·Bᵀ`, i.e. `C[i, j] = Σ_k A[i, k]·B[j, k]`, for E4M3 `a: [m, k]` quantized in
/// 1×128 tiles (scales `[m, ⌈k/128⌉]`) and `b: [n, k]` quantized in 128×128 blocks
/// (scales `[⌈n/128⌉, ⌈k/128⌉]`): DeepGEMM's NT layout, which [`crate::quant`] produces.
///
/// `b` may instead be in 1×128 tiles (scales `[n, ⌈k/128⌉]`, one per row and K block):
/// the form of Wgrad `dW = dYᵀ·X`, whose K is tokens, so both operands carry scales
/// along tokens (`dY` and `X` quantized in 128×1 tiles, then [`Fp8Matrix::transposed`]).
/// The promotion then scales by `sa[i, kb]·sb[j, kb]` instead of `sa[i, kb]·sb[j/128, kb]`,
/// in both accumulation modes; when every row of a 128-row group of `b` has the same
/// scale, the result equals the block path's bit for bit.
/// `out` is row-major `[m, n]`, f32 or BF16 ([`GemmOutput`]; BF16 is the finished f32
/// value rounded to nearest even, once). Any of `m`, `n`, `k` may be ragged (not a
/// multiple of 128): the last K block is then shorter, which is what zero padding would
/// give. `k = 0` is valid and yields zeros. See [`Accumulation`] for how sums are formed;
/// the result does not depend on `threads`.
///
/// Errors name the operand: a wrong granularity (the LHS must be Tile1x128, the RHS
/// Block128x128 or Tile1x128) or a codes/scales length that does not match the shape
/// ("lhs"/"rhs"), differing K ([`KernelError::ShapeMismatch`]), a wrong
/// `out` length, invalid [`LimitedAccumulator`] parameters, `threads == 0`.
pub fn gemm_fp8<O: GemmOutput>(
    a: &Fp8Matrix,
    b: &Fp8Matrix,
    accumulation: Accumulation,
    out: &mut [O],
    threads: usize,
) -> Result<(), KernelError> {
    check_threads(threads)?;
    accumulation.validate()?;
    check_operand(a, Operand::Lhs)?;
    check_operand(b, Operand::Rhs(None))?;
    check_k(a, b, None)?;
    crate::check_matrix_len("out", a.rows, b.rows, out.len())?;
    compute(vec![(Lhs::of(a), out)], b, accumulation, threads)
}

/// Which operand a check is about, for the error message.
#[derive(Clone, Copy)]
pub(super) enum Operand {
    Lhs,
    /// The RHS, or expert `e`'s RHS in a grouped GEMM.
    Rhs(Option<usize>),
}

/// Checks one FP8 operand's granularity and its buffers against its shape.
pub(super) fn check_operand(x: &Fp8Matrix, operand: Operand) -> Result<(), KernelError> {
    let (tensor, codes_name, scales_name) = match operand {
        Operand::Lhs => ("lhs", "lhs codes", "lhs scales"),
        Operand::Rhs(_) => ("rhs", "rhs codes", "rhs scales"),
    };
    let who = match operand {
        Operand::Rhs(Some(e)) => format!("expert {e}'s "),
        _ => String::new(),
    };
    let (allowed, wanted) = match operand {
        Operand::Lhs => (x.granularity == Granularity::Tile1x128, "Tile1x128 (DeepGEMM's NT layout)"),
        Operand::Rhs(_) => (
            matches!(x.granularity, Granularity::Block128x128 | Granularity::Tile1x128),
            "Block128x128 (DeepGEMM's NT layout) or Tile1x128 (a transposed 128×1-tiled activation, for Wgrad)",
        ),
    };
    if !allowed {
        return Err(KernelError::InvalidShape {
            tensor,
            detail: format!("{who}granularity must be {wanted}, got {:?}", x.granularity),
        });
    }
    let want = x.granularity;
    // A plain length mismatch names the buffer; an expert's (whose index a static name
    // cannot carry) or an unrepresentable length is described in words.
    let len_error = |name: &'static str, expected: Option<usize>, actual: usize| match (operand, expected) {
        (Operand::Lhs | Operand::Rhs(None), Some(expected)) => {
            KernelError::LengthMismatch { tensor: name, expected, actual }
        }
        _ => KernelError::InvalidShape {
            tensor,
            detail: format!(
                "{who}{name} hold {actual} elements, a {}×{} {want:?} matrix needs {}",
                x.rows,
                x.cols,
                expected.map_or("more than usize::MAX".into(), |e| e.to_string())
            ),
        },
    };
    let codes = x.rows.checked_mul(x.cols);
    if codes != Some(x.codes.len()) {
        return Err(len_error(codes_name, codes, x.codes.len()));
    }
    let (sr, sc) = x.scale_shape();
    let scales = sr.checked_mul(sc);
    if scales != Some(x.scales.len()) {
        return Err(len_error(scales_name, scales, x.scales.len()));
    }
    Ok(())
}

/// Checks that both operands have the same K (both are stored K-major).
pub(super) fn check_k(a: &Fp8Matrix, b: &Fp8Matrix, expert: Option<usize>) -> Result<(), KernelError> {
    if a.cols != b.cols {
        let rhs = expert.map_or("rhs".to_string(), |e| format!("rhs[{e}]"));
        return Err(KernelError::ShapeMismatch {
            detail: format!(
                "lhs is {}×{} and {rhs} is {}×{}: both must have K columns (C = lhs·rhsᵀ)",
                a.rows, a.cols, b.rows, b.cols
            ),
        });
    }
    Ok(())
}

/// A range of rows of a checked LHS: codes `[rows, k]`, scales `[rows, ⌈k/128⌉]`.
#[derive(Clone, Copy)]
pub(super) struct Lhs<'a> {
    codes: &'a [u8],
    scales: &'a [f32],
    rows: usize,
    k: usize,
}

impl<'a> Lhs<'a> {
    /// The whole of an LHS that passed [`check_operand`].
    pub(super) fn of(a: &'a Fp8Matrix) -> Self {
        Self { codes: &a.codes, scales: &a.scales, rows: a.rows, k: a.cols }
    }

    /// Rows `start..end` (`end ≤ rows`).
    pub(super) fn rows(&self, start: usize, end: usize) -> Self {
        let kb = self.k.div_ceil(TILE);
        Self {
            codes: &self.codes[start * self.k..end * self.k],
            scales: &self.scales[start * kb..end * kb],
            rows: end - start,
            k: self.k,
        }
    }
}

/// The value of one E4M3 code, computed rather than looked up so that loops over codes
/// vectorize (equal to [`crate::fp8::E4M3_TO_F32`] for every code, NaN bits included).
#[inline(always)]
fn e4m3_value(code: u8) -> f32 {
    let code = code as u32;
    let sign = (code & 0x80) << 24;
    let magnitude = code & 0x7F;
    // Normal: exponent field E (bias 7) becomes E + 120 (bias 127); mantissa bits move up.
    let normal = (magnitude << 20) + (120 << 23);
    // Subnormal (E = 0): m · 2⁻⁹, exact in f32.
    let subnormal = ((magnitude & 7) as f32 * (1.0 / 512.0)).to_bits();
    let bits = if magnitude == 0x7F {
        0x7FC0_0000
    } else if magnitude < 8 {
        subnormal
    } else {
        normal
    };
    f32::from_bits(sign | bits)
}

/// Decodes E4M3 codes to f32.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn decode(src: &[u8], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = e4m3_value(s);
    }
}

/// Transposes the 8×8 bytes held in eight little-endian words (byte `c` of word `r` is
/// element `(r, c)`), by swapping 4×4, then 2×2, then 1×1 sub-blocks across the diagonal.
#[inline(always)]
fn transpose_8x8(r: &mut [u64; 8]) {
    const LOW32: u64 = 0x0000_0000_FFFF_FFFF;
    const M16: u64 = 0x0000_FFFF_0000_FFFF;
    const M8: u64 = 0x00FF_00FF_00FF_00FF;
    for i in 0..4 {
        let (a, b) = (r[i], r[i + 4]);
        r[i] = (a & LOW32) | (b << 32);
        r[i + 4] = (a >> 32) | (b & !LOW32);
    }
    for i in [0, 1, 4, 5] {
        let (a, b) = (r[i], r[i + 2]);
        r[i] = (a & M16) | ((b & M16) << 16);
        r[i + 2] = ((a >> 16) & M16) | (b & !M16);
    }
    for i in [0, 2, 4, 6] {
        let (a, b) = (r[i], r[i + 1]);
        r[i] = (a & M8) | ((b & M8) << 8);
        r[i + 1] = ((a >> 8) & M8) | (b & !M8);
    }
}

/// Decodes the transpose of the block `codes[j0..j0 + nt, k0..k0 + kw]` of the `[n, k]`
/// RHS codes into `dst`, row-major `[kw, nt]`. The codes are transposed as bytes, 8×8 at
/// a time in registers, into a byte panel whose rows then decode contiguously
/// (vectorized); each visit to a source row (its own page, when k is large) reads up to
/// 128 contiguous bytes.
fn decode_transposed(
    codes: &[u8],
    k: usize,
    (j0, nt): (usize, usize),
    (k0, kw): (usize, usize),
    dst: &mut [f32],
) {
    let mut panel = vec![0u8; kw * nt];
    let full = kw / 8 * 8;
    let mut j = 0;
    while j + 8 <= nt {
        for sub in (0..full).step_by(8) {
            let mut words = [0u64; 8];
            for (t, word) in words.iter_mut().enumerate() {
                let at = (j0 + j + t) * k + k0 + sub;
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&codes[at..at + 8]);
                *word = u64::from_le_bytes(bytes);
            }
            transpose_8x8(&mut words);
            for (c, word) in words.iter().enumerate() {
                let row = (sub + c) * nt;
                panel[row + j..row + j + 8].copy_from_slice(&word.to_le_bytes());
            }
        }
        for jj in j..j + 8 {
            for c in full..kw {
                panel[c * nt + jj] = codes[(j0 + jj) * k + k0 + c];
            }
        }
        j += 8;
    }
    // The last nt % 8 columns, element by element.
    for jj in j..nt {
        for c in 0..kw {
            panel[c * nt + jj] = codes[(j0 + jj) * k + k0 + c];
        }
    }
    decode(&panel, &mut dst[..kw * nt]);
}

/// Rows per band in [`Accumulation::F32`] mode: large enough that each block GEMM
/// amortizes its packing, small enough that a tile's partial and accumulator stay in L2.
const F32_BAND_ROWS: usize = 128;
/// Columns per tile in [`Accumulation::F32`] mode; a multiple of 128, so a tile holds
/// whole RHS scale blocks.
const F32_TILE_COLS: usize = 512;
/// Rows per band in the limited mode: the result of an element does not depend on how
/// rows are grouped, so bands are small for load balance.
const LIMITED_BAND_ROWS: usize = 16;
/// Columns per task in the limited mode (a multiple of [`LIMITED_LANES`]).
const LIMITED_TILE_COLS: usize = 128;
/// Fewest rows a limited-mode task takes, so that decoding its RHS lanes stays cheap
/// against the rows' work.
const LIMITED_GROUP_ROWS: usize = 64;
/// Columns the limited mode's inner loop advances together (its vector width); divides
/// 128, so a group of lanes lies within one RHS scale block.
const LIMITED_LANES: usize = 32;

/// One band of rows and its output rows inside one column tile.
struct Band<'a, 'o, O> {
    lhs: Lhs<'a>,
    out_rows: Vec<&'o mut [O]>,
}

/// One task: a column tile `[j0, j0 + width)` of several bands, which share the tile's
/// decoded RHS.
struct Task<'a, 'o, O> {
    j0: usize,
    bands: Vec<Band<'a, 'o, O>>,
}

/// Computes `out = lhs·rhsᵀ` for each `(lhs rows, out rows)` segment.
///
/// Each segment is cut into bands of rows counted from its first row and the output
/// into tiles of columns; a task is one tile of a group of bands, so the tile's RHS is
/// decoded once per group. What a band computes depends only on the band and the tile
/// (never on how bands are grouped, which follows `threads`), so a segment gives the same
/// bits whichever call it comes from (grouped or not) and with any thread count.
pub(super) fn compute<O: GemmOutput>(
    segments: Vec<(Lhs<'_>, &mut [O])>,
    rhs: &Fp8Matrix,
    accumulation: Accumulation,
    threads: usize,
) -> Result<(), KernelError> {
    let n = rhs.rows;
    if n == 0 {
        return Ok(());
    }
    let (band_rows, tile_cols, min_group_rows) = match accumulation {
        Accumulation::F32 => (F32_BAND_ROWS, F32_TILE_COLS, F32_BAND_ROWS),
        Accumulation::Limited(_) => (LIMITED_BAND_ROWS, LIMITED_TILE_COLS, LIMITED_GROUP_ROWS),
    };
    let tiles = n.div_ceil(tile_cols);
    // bands_of[t]: every band's output rows inside tile t, in order.
    let mut bands_of: Vec<Vec<Band<'_, '_, O>>> = (0..tiles).map(|_| Vec::new()).collect();
    for (lhs, out) in segments {
        for (b, band_out) in out.chunks_mut(band_rows * n).enumerate() {
            let start = b * band_rows;
            let band = lhs.rows(start, start + band_out.len() / n);
            // Every tile holds the same bands, so this band's index is the same in each.
            let at = bands_of[0].len();
            for bands in &mut bands_of {
                bands.push(Band { lhs: band, out_rows: Vec::with_capacity(band.rows) });
            }
            for row in band_out.chunks_mut(n) {
                for (bands, part) in bands_of.iter_mut().zip(row.chunks_mut(tile_cols)) {
                    bands[at].out_rows.push(part);
                }
            }
        }
    }
    // Enough groups per tile to keep `threads` workers busy (a few tasks each), but no
    // smaller than `min_group_rows`, below which decoding the tile's RHS would dominate.
    let total_bands = bands_of.first().map_or(0, Vec::len);
    let groups = if threads == 1 { 1 } else { (4 * threads).div_ceil(tiles) };
    let per_group = total_bands.div_ceil(groups).max(min_group_rows / band_rows).max(1);
    let mut tasks = Vec::new();
    for (t, bands) in bands_of.into_iter().enumerate() {
        let mut bands = bands.into_iter().peekable();
        while bands.peek().is_some() {
            tasks.push(Task { j0: t * tile_cols, bands: bands.by_ref().take(per_group).collect() });
        }
    }
    run_tasks(threads, tasks, |task| match accumulation {
        Accumulation::F32 => task_f32(task, rhs),
        Accumulation::Limited(cfg) => {
            task_limited(task, rhs, &cfg);
            Ok(())
        }
    })
}

/// One task in F32 mode. Per K block: decode the tile's RHS block once; then per band,
/// decode the LHS block, take the block product on the f32 GEMM and fold it into the
/// band's accumulator with its scales.
fn task_f32<O: GemmOutput>(task: Task<'_, '_, O>, rhs: &Fp8Matrix) -> Result<(), KernelError> {
    let Task { j0, mut bands } = task;
    let Some(first) = bands.first() else { return Ok(()) };
    let (k, n) = (first.lhs.k, rhs.rows);
    let nt = F32_TILE_COLS.min(n - j0);
    let kblocks = k.div_ceil(TILE);
    let rows_total: usize = bands.iter().map(|b| b.lhs.rows).sum();
    let max_rows = bands.iter().map(|b| b.lhs.rows).max().unwrap_or(0);
    let mut b_block = vec![0f32; TILE.min(k) * nt];
    let mut a_block = vec![0f32; max_rows * TILE.min(k)];
    let mut partial = vec![0f32; max_rows * nt];
    // A Tile1x128 RHS has one scale per row j and K block: `sb_cols[jj]` is column
    // `j0 + jj`'s for the current block.
    let per_row_rhs = rhs.granularity == Granularity::Tile1x128;
    let mut sb_cols = vec![0f32; if per_row_rhs { nt } else { 0 }];
    // The bands' accumulators, one after another.
    let mut acc = vec![0f32; rows_total * nt];
    for kb in 0..kblocks {
        let k0 = kb * TILE;
        let kw = TILE.min(k - k0);
        let b_block = &mut b_block[..kw * nt];
        decode_transposed(&rhs.codes, k, (j0, nt), (k0, kw), b_block);
        if per_row_rhs {
            for (jj, s) in sb_cols.iter_mut().enumerate() {
                *s = rhs.scales[(j0 + jj) * kblocks + kb];
            }
        }
        let mut acc_rest = &mut acc[..];
        for band in &bands {
            let (lhs, rows) = (band.lhs, band.lhs.rows);
            let (acc_band, tail) = acc_rest.split_at_mut(rows * nt);
            acc_rest = tail;
            let a_block = &mut a_block[..rows * kw];
            for (dst, src) in a_block.chunks_exact_mut(kw).zip(lhs.codes.chunks_exact(k)) {
                decode(&src[k0..k0 + kw], dst);
            }
            let partial = &mut partial[..rows * nt];
            gemm_with(
                MatMut::row_major(partial, rows, nt, "fp8 block partial")?,
                0.0,
                MatRef::row_major(a_block, rows, kw, "lhs")?,
                MatRef::row_major(b_block, kw, nt, "rhs")?,
                1.0,
                gemm::Parallelism::None,
            )?;
            for (i, (acc_row, p_row)) in
                acc_band.chunks_exact_mut(nt).zip(partial.chunks_exact(nt)).enumerate()
            {
                let sa = lhs.scales[i * kblocks + kb];
                if per_row_rhs {
                    scaled_add_per_column(acc_row, p_row, sa, &sb_cols[..nt]);
                } else {
                    // j0 is a multiple of 128, so each 128-chunk of the tile is one RHS block.
                    for (jb, (acc_blk, p_blk)) in acc_row.chunks_mut(TILE).zip(p_row.chunks(TILE)).enumerate()
                    {
                        let sb = rhs.scales[(j0 / TILE + jb) * kblocks + kb];
                        scaled_add(acc_blk, p_blk, sa * sb);
                    }
                }
            }
        }
    }
    let acc_rows = acc.chunks_exact(nt);
    for (out_row, acc_row) in bands.iter_mut().flat_map(|b| b.out_rows.iter_mut()).zip(acc_rows) {
        O::store(acc_row, out_row);
    }
    Ok(())
}

/// `acc += p·s`, each product and sum rounded to f32 (Rust never fuses them), as
/// DeepGEMM's promotion `final += scale·partial`.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn scaled_add(acc: &mut [f32], p: &[f32], s: f32) {
    for (a, &x) in acc.iter_mut().zip(p) {
        *a += x * s;
    }
}

/// `acc[j] += p[j]·(sa·sb[j])`, rounded as [`scaled_add`] rounds (the scale product
/// first), so a per-row RHS whose rows share a block's scale gives the block path's bits.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn scaled_add_per_column(acc: &mut [f32], p: &[f32], sa: f32, sb: &[f32]) {
    for ((a, &x), &s) in acc.iter_mut().zip(p).zip(sb) {
        *a += x * (sa * s);
    }
}

/// One task in the limited mode. Per group of [`LIMITED_LANES`] columns, the group's RHS
/// is decoded K-major into f64 (`bt[kk][jj]`) once for all the task's rows, so the inner
/// loop runs across columns and vectorizes without reassociating any sum.
fn task_limited<O: GemmOutput>(task: Task<'_, '_, O>, rhs: &Fp8Matrix, cfg: &LimitedAccumulator) {
    const W: usize = LIMITED_LANES;
    let Task { j0: tile_j0, mut bands } = task;
    let Some(first) = bands.first() else { return };
    let (k, n) = (first.lhs.k, rhs.rows);
    let kblocks = k.div_ceil(TILE);
    // Without promotion the scales go into the products; with it, raw codes accumulate.
    let scaled = cfg.promote_every.is_none();
    let mut bt = vec![0f64; k * W];
    let mut a_row = vec![0f64; k];
    // The RHS scale of column j (a row of the RHS) in K block kb.
    let rhs_scale = |j: usize, kb: usize| match rhs.granularity {
        Granularity::Tile1x128 => rhs.scales[j * kblocks + kb],
        _ => rhs.scales[(j / TILE) * kblocks + kb],
    };
    for j0 in (tile_j0..(tile_j0 + LIMITED_TILE_COLS).min(n)).step_by(W) {
        let nt = W.min(n - j0);
        if nt < W {
            // Lanes past n are computed and dropped; keep them finite and deterministic.
            bt.fill(0.0);
        }
        for jj in 0..nt {
            let codes = &rhs.codes[(j0 + jj) * k..(j0 + jj + 1) * k];
            for (kk, &c) in codes.iter().enumerate() {
                let v = e4m3_value(c) as f64;
                bt[kk * W + jj] = if scaled { v * rhs_scale(j0 + jj, kk / TILE) as f64 } else { v };
            }
        }
        for band in &mut bands {
            let lhs = band.lhs;
            for (i, out_row) in band.out_rows.iter_mut().enumerate() {
                let codes = &lhs.codes[i * k..(i + 1) * k];
                for (kk, (d, &c)) in a_row.iter_mut().zip(codes).enumerate() {
                    let v = e4m3_value(c) as f64;
                    *d = if scaled { v * lhs.scales[i * kblocks + kk / TILE] as f64 } else { v };
                }
                let mut c = [0f32; W];
                match cfg.promote_every {
                    Some(nc) => {
                        for kb in 0..kblocks {
                            let (k0, k1) = (kb * TILE, (kb * TILE + TILE).min(k));
                            let sa = lhs.scales[i * kblocks + kb];
                            let mut s = [0f32; W];
                            for (jj, s) in s.iter_mut().enumerate().take(nt) {
                                *s = sa * rhs_scale(j0 + jj, kb);
                            }
                            for p0 in (k0..k1).step_by(nc) {
                                let mut acc = [0f64; W];
                                accumulate(&mut acc, &a_row, &bt, p0, (p0 + nc).min(k1), cfg);
                                for ((c, &a), &s) in c.iter_mut().zip(&acc).zip(&s) {
                                    *c += a as f32 * s;
                                }
                            }
                        }
                    }
                    None => {
                        let mut acc = [0f64; W];
                        accumulate(&mut acc, &a_row, &bt, 0, k, cfg);
                        // Exact: the accumulator holds at most 24 significant bits in f32's range.
                        for (c, &a) in c.iter_mut().zip(&acc) {
                            *c = a as f32;
                        }
                    }
                }
                O::store(&c[..nt], &mut out_row[j0 - tile_j0..j0 - tile_j0 + nt]);
            }
        }
    }
}

/// Runs the limited accumulator over K elements `from..to`: per chunk of
/// `products_per_add`, add the chunk's products to `acc` (exactly, for raw codes), then
/// round every lane.
fn accumulate(
    acc: &mut [f64; LIMITED_LANES],
    a: &[f64],
    bt: &[f64],
    from: usize,
    to: usize,
    cfg: &LimitedAccumulator,
) {
    for c0 in (from..to).step_by(cfg.products_per_add) {
        let c1 = (c0 + cfg.products_per_add).min(to);
        add_products(acc, &a[c0..c1], &bt[c0 * LIMITED_LANES..c1 * LIMITED_LANES]);
        for x in acc.iter_mut() {
            *x = round_to_mantissa_bits(*x, cfg.mantissa_bits, cfg.rounding);
        }
    }
}

/// `acc[jj] += Σ_kk a[kk]·bt[kk][jj]`, in K order per lane. For raw codes every product
/// and partial sum is exact in f64 (products are multiples of 2⁻¹⁸ below 2¹⁸, sums stay
/// far inside 53 bits), so the order could not matter anyway.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn add_products(acc: &mut [f64; LIMITED_LANES], a: &[f64], bt: &[f64]) {
    for (&av, b) in a.iter().zip(bt.chunks_exact(LIMITED_LANES)) {
        for (x, &bv) in acc.iter_mut().zip(b) {
            *x += av * bv;
        }
    }
}

/// `2^q` for `-1074 ≤ q ≤ 1023` (subnormal at the low end), built from its bits.
#[inline]
fn pow2(q: i64) -> f64 {
    if q >= -1022 { f64::from_bits(((q + 1023) as u64) << 52) } else { f64::from_bits(1u64 << (q + 1074)) }
}

/// Rounds `x` to a float format with `1 + mantissa_bits` significant bits and f32's
/// exponent range: normal numbers down to 2⁻¹²⁶, gradual underflow below (quantum
/// `2^(−126 − mantissa_bits)`), and overflow past `(2 − 2^−mantissa_bits)·2¹²⁷` to ±inf
/// (nearest even) or ±max (toward zero), as IEEE rounding does. With 23 bits and
/// [`AccumulatorRounding::NearestEven`] this is exactly `x as f32`. Zero (with its sign),
/// infinities and NaN pass through.
///
/// Works on the f64 representation: the significand is shifted right by the number of
/// bits the target drops, with the dropped bits deciding the rounding.
pub fn round_to_mantissa_bits(x: f64, mantissa_bits: u32, rounding: AccumulatorRounding) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    const SIGN: u64 = 1 << 63;
    let bits = x.to_bits();
    let biased = ((bits >> 52) & 0x7FF) as i64;
    let fraction = bits & ((1 << 52) - 1);
    // |x| = sig · 2^(e − 52), with the hidden bit made explicit (f64 subnormals have none).
    let (sig, e) = if biased == 0 { (fraction, -1022) } else { (fraction | (1 << 52), biased - 1023) };
    // The target's quantum (value of its last kept bit) is 2^q.
    let q = e.max(-126) - mantissa_bits as i64;
    let drop = q - (e - 52);
    let magnitude = if drop <= 0 {
        f64::from_bits(bits & !SIGN)
    } else if drop >= 64 {
        // sig < 2^53 ≤ half a quantum: rounds to zero either way.
        0.0
    } else {
        let drop = drop as u32;
        let mut kept = sig >> drop;
        if rounding == AccumulatorRounding::NearestEven {
            let rest = sig & ((1u64 << drop) - 1);
            let half = 1u64 << (drop - 1);
            if rest > half || (rest == half && kept & 1 == 1) {
                kept += 1;
            }
        }
        // kept < 2^54 converts exactly; q lies in [-1073, 1023] here, and the product is a
        // multiple of 2^q, so it is exact as well.
        kept as f64 * pow2(q)
    };
    let magnitude = if magnitude >= pow2(128) {
        match rounding {
            AccumulatorRounding::NearestEven => f64::INFINITY,
            AccumulatorRounding::TowardZero if mantissa_bits >= 52 => f64::from_bits(pow2(128).to_bits() - 1),
            AccumulatorRounding::TowardZero => (2.0 - pow2(-(mantissa_bits as i64))) * pow2(127),
        }
    } else {
        magnitude
    };
    f64::from_bits(magnitude.to_bits() | (bits & SIGN))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::E4M3_TO_F32;
    use AccumulatorRounding::{NearestEven as Ne, TowardZero as Tz};

    fn p(q: i32) -> f64 {
        2f64.powi(q)
    }

    #[test]
    fn rounding_hand_checked_cases() {
        // 13 mantissa bits: ulp(1) = 2^-13, half ulp = 2^-14.
        let r = |x: f64, mode| round_to_mantissa_bits(x, 13, mode);
        assert_eq!(r(1.0, Ne), 1.0);
        assert_eq!(r(1.0 + p(-13), Tz), 1.0 + p(-13), "representable: unchanged");
        assert_eq!(r(1.0 + p(-14), Ne), 1.0, "tie, even below");
        assert_eq!(r(1.0 + p(-14), Tz), 1.0);
        assert_eq!(r(1.0 + p(-13) + p(-14), Ne), 1.0 + p(-12), "tie, odd below: up to even");
        assert_eq!(r(1.0 + p(-13) + p(-14), Tz), 1.0 + p(-13));
        assert_eq!(r(1.0 + p(-14) + p(-30), Ne), 1.0 + p(-13), "above the tie");
        assert_eq!(r(1.0 + p(-14) + p(-30), Tz), 1.0);
        assert_eq!(r(-(1.0 + p(-14) + p(-30)), Ne), -(1.0 + p(-13)), "negative: magnitude rounds");
        assert_eq!(r(-(1.0 + p(-14) + p(-30)), Tz), -1.0, "toward zero, not toward -inf");
        assert_eq!(r(2.0 - p(-20), Ne), 2.0, "carry into the exponent");
        assert_eq!(r(2.0 - p(-20), Tz), 2.0 - p(-13));
        assert_eq!(r(0.0, Tz).to_bits(), 0f64.to_bits());
        assert_eq!(r(-0.0, Ne).to_bits(), (-0f64).to_bits(), "sign of zero kept");
        assert!(r(f64::NAN, Ne).is_nan());
        assert_eq!(r(f64::NEG_INFINITY, Tz), f64::NEG_INFINITY);
        // 3 mantissa bits: 12345.678 = 1.507·2^13 → 1.5·2^13 both ways.
        assert_eq!(round_to_mantissa_bits(12345.678, 3, Ne), 12288.0);
        assert_eq!(round_to_mantissa_bits(12345.678, 3, Tz), 12288.0);
        // 0 mantissa bits: powers of two; 3 is a tie between 2 and 4 (kept bit 1 is odd).
        assert_eq!(round_to_mantissa_bits(3.0, 0, Ne), 4.0);
        assert_eq!(round_to_mantissa_bits(3.0, 0, Tz), 2.0);
        assert_eq!(round_to_mantissa_bits(-5.0, 0, Ne), -4.0);
    }

    #[test]
    fn rounding_range_ends() {
        // Gradual underflow: with 13 bits the quantum below 2^-126 is 2^-139.
        assert_eq!(round_to_mantissa_bits(p(-140), 13, Ne), 0.0, "half a quantum ties to 0");
        assert_eq!(round_to_mantissa_bits(3.0 * p(-141), 13, Ne), p(-139));
        assert_eq!(round_to_mantissa_bits(3.0 * p(-141), 13, Tz), 0.0);
        assert_eq!(round_to_mantissa_bits(-3.0 * p(-141), 13, Ne), -p(-139));
        assert_eq!(round_to_mantissa_bits(f64::from_bits(1), 13, Ne), 0.0, "f64 subnormal");
        // Overflow: 1.9926·2^127 with 3 bits rounds up to 2^128.
        let big = 1.9926 * p(127);
        assert_eq!(round_to_mantissa_bits(big, 3, Ne), f64::INFINITY);
        assert_eq!(round_to_mantissa_bits(-big, 3, Ne), f64::NEG_INFINITY);
        assert_eq!(round_to_mantissa_bits(big, 3, Tz), 1.875 * p(127));
        assert_eq!(round_to_mantissa_bits(1e300, 23, Tz), f32::MAX as f64);
        assert_eq!(round_to_mantissa_bits(1e300, 60, Tz), f64::from_bits(p(128).to_bits() - 1));
        assert_eq!(round_to_mantissa_bits(1.0 + p(-40), 60, Ne), 1.0 + p(-40), "wider than f64: unchanged");
    }

    #[test]
    fn rounding_with_23_bits_is_the_f32_cast() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        for i in 0..200_000 {
            let (r1, r2) = (next(), next());
            // Exponents across f32's whole range and past both ends.
            let e = (r1 % 300) as i64 - 165;
            let mut mantissa = r2 & ((1 << 52) - 1);
            if i % 4 == 0 {
                // An exact tie for a 23-bit target (in the normal range).
                mantissa = (mantissa & !((1 << 29) - 1)) | (1 << 28);
            }
            let x = f64::from_bits((r1 >> 63) << 63 | ((e + 1023) as u64) << 52 | mantissa);
            let want = x as f32 as f64;
            let got = round_to_mantissa_bits(x, 23, Ne);
            assert_eq!(got.to_bits(), want.to_bits(), "{x:e}: {got:e} vs {want:e}");
        }
    }

    #[test]
    fn computed_decode_matches_the_table() {
        for code in 0..=255u8 {
            let (got, want) = (e4m3_value(code), E4M3_TO_F32[code as usize]);
            assert_eq!(got.to_bits(), want.to_bits(), "code {code:#04x}");
        }
        let codes: Vec<u8> = (0..=255).collect();
        let mut out = vec![0f32; 256];
        decode(&codes, &mut out);
        assert!(out.iter().zip(&E4M3_TO_F32).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn transposed_decode_matches_a_naive_transpose() {
        for (n, k, (j0, nt), (k0, kw)) in [
            (8, 8, (0, 8), (0, 8)),
            (21, 37, (0, 21), (3, 29)),
            (64, 130, (8, 40), (128, 2)),
            (5, 3, (1, 4), (0, 3)),
            (600, 300, (512, 88), (256, 44)),
        ] {
            let codes: Vec<u8> = (0..n * k).map(|i| (i * 37 % 256) as u8).collect();
            let mut dst = vec![0f32; kw * nt];
            decode_transposed(&codes, k, (j0, nt), (k0, kw), &mut dst);
            for kk in 0..kw {
                for j in 0..nt {
                    let want = E4M3_TO_F32[codes[(j0 + j) * k + k0 + kk] as usize];
                    assert_eq!(dst[kk * nt + j].to_bits(), want.to_bits(), "{n}×{k} at ({kk}, {j})");
                }
            }
        }
    }

    #[test]
    fn limited_accumulator_validation() {
        let d = LimitedAccumulator::default();
        assert!(d.validate().is_ok());
        assert!(LimitedAccumulator { mantissa_bits: 24, ..d }.validate().is_err());
        assert!(LimitedAccumulator { products_per_add: 0, ..d }.validate().is_err());
        assert!(LimitedAccumulator { promote_every: Some(48), ..d }.validate().is_err());
        assert!(
            LimitedAccumulator { promote_every: Some(16), products_per_add: 32, ..d }.validate().is_err()
        );
        assert!(LimitedAccumulator { promote_every: Some(0), ..d }.validate().is_err());
        assert!(LimitedAccumulator { promote_every: Some(64), ..d }.validate().is_ok());
        assert!(LimitedAccumulator { promote_every: None, products_per_add: 1000, ..d }.validate().is_ok());
    }
}
