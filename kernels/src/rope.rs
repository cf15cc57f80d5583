//! Rotary position embedding (RoPE) on DeepSeek-V3's decoupled rope dimensions, with YaRN
//! context extension, forward and backward, in place on plain row-major buffers.
//!
//! ## Convention: interleaved pairs, as DeepSeek's reference code
//! This follows `precompute_freqs_cis` and `apply_rotary_emb` of deepseek-ai/DeepSeek-V3
//! `inference/model.py`: a rope vector `x` of `d` dims (`qk_rope_head_dim`, 64 in V3) is
//! read as `d/2` complex numbers `x[2i] + i·x[2i+1]`, and pair `i` of the token at position
//! `p` is multiplied by `e^{i·p·ω_i}`:
//!
//! ```text
//! y[2i]   = x[2i]·cos(p·ω_i) − x[2i+1]·sin(p·ω_i)
//! y[2i+1] = x[2i]·sin(p·ω_i) + x[2i+1]·cos(p·ω_i)        ω_i = θ^(−2i/d),  i < d/2
//! ```
//!
//! Each pair is rotated by an orthogonal 2×2 matrix, so the backward pass is the transpose,
//! a rotation by `−p·ω_i` ([`rope_backward`]), and the non-rope dimensions of a head pass
//! through untouched in both directions.
//!
//! ## HF transformers' layout, and the permutation between the two
//! HF's `DeepseekV3Attention` (with the default `rope_interleave = true`) loads the same
//! checkpoint weights but, before rotating, reshapes each rope vector `[d/2, 2] → [2, d/2]`
//! (`q.view(…, d//2, 2).transpose(4, 3).reshape(…, d)`) and then applies the half-split
//! ("NeoX", `rotate_half`) rotation, which pairs dim `j` with dim `j + d/2`. That reshape is
//! the permutation
//!
//! ```text
//! P: half[j] = inter[2j],   half[d/2 + j] = inter[2j + 1]        (j < d/2)
//! ```
//!
//! and `rotate_half_rope(P·x) = P·interleaved_rope(x)` with the same `cos/sin(p·ω_j)` for
//! pair `j`. HF therefore produces this module's rotated vectors with their dims permuted
//! by `P`; since the same `P` is applied to the query and the key rope parts, every score
//! `q·k` is identical. A loader that wants HF-style half-split rotation on DeepSeek's
//! (interleaved) checkpoint must permute the *output rows* of the rope slice of each
//! head of `q_b_proj` (rows `h·(nope+d) + nope + ·` of `wq_b`) and of the shared rope
//! key rows of `kv_a_proj_with_mqa` (rows `kv_lora_rank + ·`) by `P`: new row `j` = old
//! row `2j`, new row `d/2 + j` = old row `2j + 1`. Conversely, a checkpoint trained with
//! half-split rotation is brought to this module's layout by `P⁻¹`: row `2j` = old row `j`,
//! row `2j + 1` = old row `d/2 + j`. DeepSeek-V3's published checkpoints (and HF's copy of
//! them) are interleaved and need no permutation here.
//!
//! ## YaRN
//! With [`YarnScaling`], [`RopeTable::new`] applies DeepSeek's correction exactly when the
//! table covers more positions than `original_max_position_embeddings` (DeepSeek's
//! `max_seq_len > original_seq_len`; HF applies it whenever `rope_scaling` is set):
//!
//! ```text
//! cd(r)      = d·ln(L_orig / (2π·r)) / (2·ln θ)
//! low, high  = max(⌊cd(beta_fast)⌋, 0), min(⌈cd(beta_slow)⌉, d − 1)   (high += 0.001 if equal)
//! ramp_i     = clamp((i − low) / (high − low), 0, 1),   smooth_i = 1 − ramp_i,   i < d/2
//! ω_i        ← ω_i/factor·(1 − smooth_i) + ω_i·smooth_i
//! ```
//!
//! (`high` is clamped to `d − 1` although the ramp runs over `d/2` indices: DeepSeek's code
//! does so, and this module reproduces it.) The attention softmax scale is then multiplied
//! by `mscale²`, `mscale = 0.1·mscale_all_dim·ln(factor) + 1` for `factor > 1`
//! ([`yarn_softmax_scale_multiplier`], [`RopeTable::softmax_scale_multiplier`]). HF also
//! multiplies cos/sin by `m(factor, mscale)/m(factor, mscale_all_dim)`; that factor is 1
//! in every released DeepSeek config (`mscale == mscale_all_dim`), DeepSeek's code does
//! not apply it, and a table that would need it (a non-rotation) is rejected instead.
//!
//! ## Precision
//! Frequencies and angles `p·ω_i` are computed in f64 and only cos/sin are stored as `T`.
//! (DeepSeek computes them in f32; at position 1.6·10⁵ that loses ~10⁻² rad, which the f64
//! table does not.) The rotation itself runs in `T`.
//!
//! ## Invariants
//! No function panics or reads outside a buffer on bad input: lengths, layouts, positions
//! and parameters are checked before any data is touched, and each failure is a
//! [`KernelError`] naming the buffer, parameter or token at fault. Every element is
//! computed independently, so results do not depend on the number of rayon threads.

use crate::KernelError;
use num_traits::Float;
use rayon::prelude::*;

/// Elements below which the rotation stays on the calling thread.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;

fn default_beta_fast() -> f64 {
    32.0
}
fn default_beta_slow() -> f64 {
    1.0
}
fn default_mscale() -> f64 {
    1.0
}
fn default_theta() -> f64 {
    10000.0
}

/// YaRN context extension, with the field names of HF's `rope_scaling` dict (other keys
/// of that dict, such as `"type": "yarn"`, are ignored when deserializing).
///
/// DeepSeek-V3: `factor` 40, `original_max_position_embeddings` 4096, `beta_fast` 32,
/// `beta_slow` 1, `mscale` 1.0, `mscale_all_dim` 1.0.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct YarnScaling {
    /// Context extension factor (> 0; extension when > 1).
    pub factor: f64,
    /// The context length the model was pre-trained at.
    pub original_max_position_embeddings: usize,
    /// Rotations above which a dimension keeps its frequency (extrapolation).
    #[serde(default = "default_beta_fast")]
    pub beta_fast: f64,
    /// Rotations below which a dimension's frequency is divided by `factor` (interpolation).
    #[serde(default = "default_beta_slow")]
    pub beta_slow: f64,
    /// HF's cos/sin magnitude numerator; must give a magnitude of 1 with `mscale_all_dim`.
    #[serde(default = "default_mscale")]
    pub mscale: f64,
    /// The coefficient of the softmax-scale correction `mscale = 0.1·mscale_all_dim·ln(factor) + 1`.
    #[serde(default = "default_mscale")]
    pub mscale_all_dim: f64,
}

/// The rotary embedding of one model. Deserializes from HF config names too
/// (`qk_rope_head_dim`, `rope_theta`, `rope_scaling`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RopeConfig {
    /// Rope dims per head (`qk_rope_head_dim`, 64 in DeepSeek-V3); even and positive.
    #[serde(alias = "qk_rope_head_dim")]
    pub head_dim: usize,
    /// The frequency base (`rope_theta`, 10000 in DeepSeek-V3); finite and > 1.
    #[serde(alias = "rope_theta", default = "default_theta")]
    pub theta: f64,
    /// YaRN, or `None` for plain RoPE.
    #[serde(alias = "rope_scaling", default)]
    pub scaling: Option<YarnScaling>,
}

/// YaRN's `m(scale, coefficient)`: 1 for `scale ≤ 1`, else `0.1·coefficient·ln(scale) + 1`.
fn yarn_mscale(scale: f64, coefficient: f64) -> f64 {
    if scale <= 1.0 { 1.0 } else { 0.1 * coefficient * scale.ln() + 1.0 }
}

/// The factor the attention softmax scale is multiplied by under YaRN: `mscale²` with
/// `mscale = 0.1·mscale_all_dim·ln(factor) + 1` when `factor > 1`, else 1.
///
/// This is unconditional; [`RopeTable::softmax_scale_multiplier`] gives the factor that
/// goes with a table, 1 when the table did not apply YaRN.
pub fn yarn_softmax_scale_multiplier(scaling: &YarnScaling) -> f64 {
    let m = yarn_mscale(scaling.factor, scaling.mscale_all_dim);
    m * m
}

fn invalid(name: &'static str, detail: String) -> KernelError {
    KernelError::InvalidParameter { name, detail }
}

fn check_finite_positive(name: &'static str, value: f64) -> Result<(), KernelError> {
    if !(value.is_finite() && value > 0.0) {
        return Err(invalid(name, format!("must be finite and positive, got {value}")));
    }
    Ok(())
}

impl RopeConfig {
    /// Checks every parameter; [`RopeTable::new`] calls it.
    pub fn validate(&self) -> Result<(), KernelError> {
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(invalid(
                "head_dim",
                format!(
                    "rope dims are rotated in pairs, so must be even and positive, got {}",
                    self.head_dim
                ),
            ));
        }
        if !(self.theta.is_finite() && self.theta > 1.0) {
            return Err(invalid("theta", format!("must be finite and > 1, got {}", self.theta)));
        }
        if let Some(s) = &self.scaling {
            check_finite_positive("factor", s.factor)?;
            check_finite_positive("beta_fast", s.beta_fast)?;
            check_finite_positive("beta_slow", s.beta_slow)?;
            if s.original_max_position_embeddings == 0 {
                return Err(invalid("original_max_position_embeddings", "must be positive".into()));
            }
            if !(s.mscale.is_finite() && s.mscale_all_dim.is_finite()) {
                return Err(invalid(
                    "mscale",
                    format!("mscale {} and mscale_all_dim {} must be finite", s.mscale, s.mscale_all_dim),
                ));
            }
            // HF scales cos/sin by this ratio (with its fallback for a zero mscale_all_dim);
            // anything but 1 makes the map a scaled rotation, which this table does not model.
            let magnitude = if s.mscale != 0.0 && s.mscale_all_dim != 0.0 {
                yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
            } else {
                yarn_mscale(s.factor, 1.0)
            };
            if (magnitude - 1.0).abs() > 1e-12 {
                return Err(invalid(
                    "mscale",
                    format!(
                        "mscale {} with mscale_all_dim {} scales HF's cos/sin by {magnitude}; only \
                         pure rotations (mscale == mscale_all_dim, as in DeepSeek's configs) are supported",
                        s.mscale, s.mscale_all_dim
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Precomputed `cos(p·ω_i)` and `sin(p·ω_i)`, row-major `[max_positions, head_dim/2]`.
#[derive(Clone, Debug)]
pub struct RopeTable<T> {
    head_dim: usize,
    max_positions: usize,
    inv_freq: Vec<f64>,
    cos: Vec<T>,
    sin: Vec<T>,
    yarn_applied: bool,
    softmax_scale_multiplier: f64,
}

impl<T: Float> RopeTable<T> {
    /// The table for positions `0..max_positions`; `max_positions` plays the role of
    /// DeepSeek's `max_seq_len`, so YaRN (when configured) is applied iff it exceeds
    /// `original_max_position_embeddings`.
    ///
    /// Errors: [`KernelError::InvalidParameter`] for a bad config (odd `head_dim`, …) or a
    /// zero `max_positions`; [`KernelError::InvalidShape`] when the table size overflows.
    pub fn new(config: &RopeConfig, max_positions: usize) -> Result<Self, KernelError> {
        config.validate()?;
        if max_positions == 0 {
            return Err(invalid("max_positions", "must be at least 1".into()));
        }
        let d = config.head_dim;
        let half = d / 2;
        let len = max_positions.checked_mul(half).ok_or_else(|| KernelError::InvalidShape {
            tensor: "rope_table",
            detail: format!("{max_positions} positions × {half} pairs overflows usize"),
        })?;

        let mut inv_freq: Vec<f64> =
            (0..half).map(|i| 1.0 / config.theta.powf((2 * i) as f64 / d as f64)).collect();
        let yarn = config.scaling.as_ref().filter(|s| max_positions > s.original_max_position_embeddings);
        if let Some(s) = yarn {
            let log_base = 2.0 * config.theta.ln();
            let orig = s.original_max_position_embeddings as f64;
            let correction_dim =
                |rotations: f64| d as f64 * (orig / (rotations * 2.0 * std::f64::consts::PI)).ln() / log_base;
            let low = correction_dim(s.beta_fast).floor().max(0.0);
            let mut high = correction_dim(s.beta_slow).ceil().min((d - 1) as f64);
            if low == high {
                high += 0.001;
            }
            for (i, f) in inv_freq.iter_mut().enumerate() {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let smooth = 1.0 - ramp;
                *f = *f / s.factor * (1.0 - smooth) + *f * smooth;
            }
        }

        let cast =
            |v: f64| T::from(v).ok_or_else(|| invalid("T", format!("cannot represent the table value {v}")));
        let mut cos = Vec::with_capacity(len);
        let mut sin = Vec::with_capacity(len);
        for p in 0..max_positions {
            for &f in &inv_freq {
                let (s, c) = (p as f64 * f).sin_cos();
                cos.push(cast(c)?);
                sin.push(cast(s)?);
            }
        }
        let softmax_scale_multiplier = yarn.map_or(1.0, yarn_softmax_scale_multiplier);
        Ok(Self {
            head_dim: d,
            max_positions,
            inv_freq,
            cos,
            sin,
            yarn_applied: yarn.is_some(),
            softmax_scale_multiplier,
        })
    }

    /// Rope dims per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Positions `0..max_positions()` are covered.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The (YaRN-corrected, if applied) angular frequencies `ω_i`, `head_dim/2` of them.
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// Whether the YaRN correction was applied to the frequencies.
    pub fn yarn_applied(&self) -> bool {
        self.yarn_applied
    }

    /// The factor to multiply the attention softmax scale by: `mscale²` when YaRN was
    /// applied, else 1 (DeepSeek applies both or neither).
    pub fn softmax_scale_multiplier(&self) -> f64 {
        self.softmax_scale_multiplier
    }

    /// `cos(p·ω_i)` for `i < head_dim/2`, or `None` past the table.
    pub fn cos_row(&self, position: usize) -> Option<&[T]> {
        self.row(&self.cos, position)
    }

    /// `sin(p·ω_i)` for `i < head_dim/2`, or `None` past the table.
    pub fn sin_row(&self, position: usize) -> Option<&[T]> {
        self.row(&self.sin, position)
    }

    fn row<'a>(&self, data: &'a [T], position: usize) -> Option<&'a [T]> {
        let half = self.head_dim / 2;
        data.get(position.checked_mul(half)?..)?.get(..half)
    }
}

/// Where the rope dims lie in a buffer: `tokens × heads` head vectors of `head_stride`
/// elements each, row-major (`[tokens, heads, head_stride]`), with the table's
/// `head_dim` rope dims at `offset..offset + head_dim` of every head vector.
///
/// - The rope part of MLA's queries `[tokens, heads, nope + rope]`:
///   `{ tokens, heads, head_stride: nope + rope, offset: nope }`.
/// - The shared rope key inside the `kv_a` output `[tokens, kv_lora_rank + rope]`:
///   `{ tokens, heads: 1, head_stride: kv_lora_rank + rope, offset: kv_lora_rank }`.
/// - A bare `[tokens, rope]` key: [`RopeLayout::contiguous`]`(tokens, 1, rope)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeLayout {
    /// Tokens (rows); each has one position.
    pub tokens: usize,
    /// Head vectors per token, all rotated by the token's position.
    pub heads: usize,
    /// Elements per head vector.
    pub head_stride: usize,
    /// Where the rope dims start within a head vector.
    pub offset: usize,
}

impl RopeLayout {
    /// `[tokens, heads, head_dim]` holding only rope dims.
    pub fn contiguous(tokens: usize, heads: usize, head_dim: usize) -> Self {
        Self { tokens, heads, head_stride: head_dim, offset: 0 }
    }
}

/// Rotates the rope dims of `x` in place by `+p·ω_i`, `p = positions[token]`.
///
/// `x` holds `layout.tokens · layout.heads · layout.head_stride` elements; `positions`
/// holds one position per token (for a batch of sequences, each sequence's positions in
/// turn). Dims outside `offset..offset + table.head_dim()` are not touched.
///
/// Errors: [`KernelError::LengthMismatch`] for `x` or `positions` of the wrong length,
/// [`KernelError::InvalidShape`] when the rope dims do not fit in a head vector or the
/// sizes overflow, [`KernelError::InvalidParameter`] naming the first token whose position
/// is past the table.
pub fn rope_forward<T: Float + Send + Sync>(
    x: &mut [T],
    layout: RopeLayout,
    positions: &[usize],
    table: &RopeTable<T>,
) -> Result<(), KernelError> {
    rotate(x, "x", layout, positions, table, false)
}

/// The backward of [`rope_forward`], in place: turns `dy` into `dx = Rᵀ·dy`, a rotation by
/// `−p·ω_i` of the rope dims; the other dims' gradients pass through untouched. Same
/// arguments and errors as [`rope_forward`] (the buffer is named `dy`).
pub fn rope_backward<T: Float + Send + Sync>(
    dy: &mut [T],
    layout: RopeLayout,
    positions: &[usize],
    table: &RopeTable<T>,
) -> Result<(), KernelError> {
    rotate(dy, "dy", layout, positions, table, true)
}

fn rotate<T: Float + Send + Sync>(
    x: &mut [T],
    name: &'static str,
    layout: RopeLayout,
    positions: &[usize],
    table: &RopeTable<T>,
    inverse: bool,
) -> Result<(), KernelError> {
    let RopeLayout { tokens, heads, head_stride, offset } = layout;
    let d = table.head_dim;
    if offset.checked_add(d).is_none_or(|end| end > head_stride) {
        return Err(KernelError::InvalidShape {
            tensor: name,
            detail: format!(
                "rope dims {offset}..{offset}+{d} do not fit in head vectors of {head_stride} elements"
            ),
        });
    }
    let row = heads.checked_mul(head_stride).ok_or_else(|| KernelError::InvalidShape {
        tensor: name,
        detail: format!("{heads} heads × {head_stride} overflows usize"),
    })?;
    crate::check_matrix_len(name, tokens, row, x.len())?;
    if positions.len() != tokens {
        return Err(KernelError::LengthMismatch {
            tensor: "positions",
            expected: tokens,
            actual: positions.len(),
        });
    }
    if let Some((t, &p)) = positions.iter().enumerate().find(|&(_, &p)| p >= table.max_positions) {
        return Err(invalid(
            "positions",
            format!("token {t} has position {p}, past the rope table's {} positions", table.max_positions),
        ));
    }
    if row == 0 || tokens == 0 {
        return Ok(());
    }

    let half = d / 2;
    let rotate_token = |(t, token): (usize, &mut [T])| {
        let base = positions[t] * half;
        let (cos, sin) = (&table.cos[base..base + half], &table.sin[base..base + half]);
        for head in token.chunks_exact_mut(head_stride) {
            let rope = &mut head[offset..offset + d];
            for ((pair, &c), &s) in rope.chunks_exact_mut(2).zip(cos).zip(sin) {
                let (a, b) = (pair[0], pair[1]);
                // Rᵀ = R(−angle): only the sign of sin changes.
                let s = if inverse { -s } else { s };
                pair[0] = a * c - b * s;
                pair[1] = a * s + b * c;
            }
        }
    };
    if x.len() < PARALLEL_MIN_ELEMENTS {
        x.chunks_exact_mut(row).enumerate().for_each(rotate_token);
    } else {
        let min_tokens = (PARALLEL_MIN_ELEMENTS / row).max(1);
        x.par_chunks_exact_mut(row).enumerate().with_min_len(min_tokens).for_each(rotate_token);
    }
    Ok(())
}
