//! Multi-head Latent Attention (DeepSeek-V3 report §2.1.1; DESIGN §1.1), forward and a
//! backward split into B ([`Mla::backward_input`]) and W ([`Mla::backward_weight`]).
//!
//! ## Computation
//! For `x: [batch·seq, hidden]` (sequences one after another, token `t` of a sequence at
//! position `t`), with `H` heads, `nope`/`rope`/`v` head dims and `qk = nope + rope`:
//!
//! ```text
//! queries   c_q = q_a_proj(x)                 [rows, q_lora_rank]     (low-rank path)
//!           q   = q_b_proj(q_a_layernorm(c_q)) [rows, H, qk]   or   q = q_proj(x) (plain path)
//!           q[h] = [q_nope | RoPE(q_rope)]
//! keys/vals kv_a = kv_a_proj_with_mqa(x)      [rows, kv_lora_rank + rope]
//!           c_kv = kv_a[.., :kv_lora_rank],   k_rope = RoPE(kv_a[.., kv_lora_rank:])  (shared)
//!           kv_b = kv_b_proj(kv_a_layernorm(c_kv)) [rows, H, nope + v] = per head [k_nope | v]
//!           k[h] = [k_nope[h] | k_rope]
//! attention o = causal softmax(scale · q·kᵀ)·v per head, scale = qk^-½ · YaRN mscale²
//! output    y = o_proj(o)                     [rows, hidden]
//! ```
//!
//! RoPE is DeepSeek's interleaved-pair rotation ([`flotilla_kernels::rope`]), applied in
//! place on the rope slices of every query head and once on the shared key. The softmax
//! scale is multiplied by the rope table's [`RopeTable::softmax_scale_multiplier`] (YaRN's
//! `mscale²` exactly when the table applied YaRN, as DeepSeek does).
//!
//! ## The rope table
//! The table depends only on the config (`qk_rope_head_dim`, `rope_theta`, `rope_scaling`)
//! and covers positions `0..max_position_embeddings`, which also decides whether YaRN
//! applies (`max_position_embeddings > original_max_position_embeddings`). Build it once
//! with [`Mla::rope_table`] and share it between layers through [`Mla::with_rope_table`]
//! (for DeepSeek-V3 in f32 it is 42 MB); [`Mla::new`] builds a private one. A sequence
//! longer than the table is an error naming the layer.
//!
//! ## Recomputation ([`Mla::recompute`])
//! The report recomputes "all RMSNorm operations and MLA up-projections during
//! back-propagation". With `recompute` set, forward's [`MlaCache`] keeps only the
//! compressed latents, i.e. the RMSNorm inputs ([`MlaCache::q_input`], the
//! [`MlaCache::kv_latent`]), the rotated shared rope key, the attention output and its
//! log-sum-exp; B reruns the norms, `q_b_proj`/`kv_b_proj`, RoPE and the k/v assembly to
//! rebuild `q`, `k`, `v`, and W reruns the two norms (no GEMM) for the up-projections'
//! inputs. Without it, the cache also holds [`MlaCache::normed`] and [`MlaCache::heads`].
//! Both paths run the same functions on the same values, so every result is bit-identical
//! either way.
//!
//! ## Inference ([`Mla::forward_cached`])
//! Generation keeps, per layer and sequence, an [`MlaKvCache`]: per token the normed KV
//! latent `kv_a_layernorm(c_kv)` and the rotated shared rope key, `kv_lora_rank +
//! qk_rope_head_dim` values — not the `heads·(qk + v)` expanded keys and values (DeepSeek's
//! `kv_cache`/`pe_cache`). The up-projection `kv_b_proj = [W_UK | W_UV]` per head is absorbed
//! instead of applied to the cache:
//!
//! ```text
//! score[h, j] = scale · ((q_nope[h]·W_UK[h])·c_kv[j] + q_rope[h]·k_rope[j])     (= scale · q[h]·k[h, j])
//! o[h]        = (Σ_j softmax_j · c_kv[j]) · W_UV[h]ᵀ                             (= Σ_j softmax_j · v[h, j])
//! ```
//!
//! so a step's new tokens cost GEMMs against the latent cache only. A call appends its
//! tokens to the cache and attends causally over everything cached (prefill is the call with
//! the whole prompt, decode the calls with one token each); positions continue from the
//! cache's length. The results equal [`Mla::forward`]'s up to rounding (the sums are
//! reassociated), which `tests/generate.rs` checks against the full forward in f64.
//!
//! ## Precision ([`Mla::set_precision`])
//! The projections' inputs are kept as [`CachedActivation`]s, FP8 under fp8
//! ([`crate::precision`]): the layer input `x` is the caller's ([`Mla::cache_input`]),
//! read by `q_a_proj` (or `q_proj`) and `kv_a_proj_with_mqa` and re-tiled once for both
//! Wgrads; the normed latents (the up-projections' inputs) are the cache's (or rebuilt
//! under recompute, quantized the same way); the attention output, `o_proj`'s input, is
//! kept with power-of-two scales, and the attention backward reads it dequantized. The
//! latents, the rope key, `q`, `k`, `v` and the log-sum-exp stay f32.
//!
//! ## Determinism
//! Every kernel used (dense GEMM, RMSNorm, RoPE, attention core) gives results independent
//! of the number of threads, and the shared key's gradient is summed over heads in head
//! order, so the layer's outputs and gradients do not depend on `threads` or the rayon
//! pool.

/// The eps of `q_a_layernorm` and `kv_a_layernorm`: fixed, as in DeepSeek's reference and HF.
pub const LATENT_NORM_EPS: f64 = 1e-6;

use crate::config::ModelConfig;
use crate::linear::Linear;
use crate::norm::{RmsNorm, RmsNormCache};
use crate::packing::Packing;
use crate::param::Param;
use crate::precision::{CacheBytes, CachedActivation, Precision};
use crate::{ModelError, Real, check_len};
use flotilla_kernels::attention::AttentionShape;
use flotilla_kernels::backend::{Backend, DeviceBackend};
use flotilla_kernels::gemm::{MatMut, MatRef};
use flotilla_kernels::quant::ScaleRounding;
use flotilla_kernels::rope::{RopeConfig, RopeLayout, RopeTable, YarnScaling};
use std::borrow::Cow;
use std::sync::Arc;

/// MLA's dimensions, from the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlaDims {
    /// Model width.
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// Query compression rank, or `None` for a plain query projection.
    pub q_lora_rank: Option<usize>,
    /// Key/value latent rank.
    pub kv_lora_rank: usize,
    /// Non-rotary query/key dims per head.
    pub qk_nope_head_dim: usize,
    /// Rotary dims per query head and of the shared key.
    pub qk_rope_head_dim: usize,
    /// Value dims per head.
    pub v_head_dim: usize,
}

impl MlaDims {
    /// The dimensions of `config`'s attention.
    pub fn from_config(config: &ModelConfig) -> Self {
        MlaDims {
            hidden: config.hidden_size,
            heads: config.num_attention_heads,
            q_lora_rank: config.q_lora_rank,
            kv_lora_rank: config.kv_lora_rank,
            qk_nope_head_dim: config.qk_nope_head_dim,
            qk_rope_head_dim: config.qk_rope_head_dim,
            v_head_dim: config.v_head_dim,
        }
    }

    /// Query/key dims per head, `nope + rope`.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Width of all query heads, `heads · qk`.
    fn q_width(&self) -> usize {
        self.heads * self.qk_head_dim()
    }

    /// Width of `kv_b_proj`'s output, `heads · (nope + v)`.
    fn kv_b_width(&self) -> usize {
        self.heads * (self.qk_nope_head_dim + self.v_head_dim)
    }

    /// Width of `kv_a_proj_with_mqa`'s output, `kv_lora_rank + rope`.
    fn kv_a_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// Width of all value heads, `heads · v`.
    fn o_width(&self) -> usize {
        self.heads * self.v_head_dim
    }

    /// Where the rope dims of `rows` query rows lie.
    fn q_rope_layout(&self, rows: usize) -> RopeLayout {
        RopeLayout {
            tokens: rows,
            heads: self.heads,
            head_stride: self.qk_head_dim(),
            offset: self.qk_nope_head_dim,
        }
    }
}

/// The query projection: DeepSeek-V3's low-rank one, or a plain one (`q_lora_rank: null`).
// One per layer, never in a collection: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum QueryProjection<T> {
    /// `q_b_proj(q_a_layernorm(q_a_proj(x)))`.
    LowRank {
        /// `[q_lora_rank, hidden]`.
        q_a_proj: Linear<T>,
        /// `[q_lora_rank]`.
        q_a_layernorm: RmsNorm<T>,
        /// `[heads·qk_head_dim, q_lora_rank]`.
        q_b_proj: Linear<T>,
    },
    /// `q_proj(x)`.
    Plain {
        /// `[heads·qk_head_dim, hidden]`.
        q_proj: Linear<T>,
    },
}

/// One MLA layer: parameters `{prefix}.{q_a_proj,q_a_layernorm,q_b_proj | q_proj,
/// kv_a_proj_with_mqa,kv_a_layernorm,kv_b_proj,o_proj}.weight`.
#[derive(Clone, Debug)]
pub struct Mla<T> {
    /// The query projection.
    pub query: QueryProjection<T>,
    /// `[kv_lora_rank + qk_rope_head_dim, hidden]`: the latent and the shared rope key.
    pub kv_a_proj_with_mqa: Linear<T>,
    /// `[kv_lora_rank]`.
    pub kv_a_layernorm: RmsNorm<T>,
    /// `[heads·(qk_nope_head_dim + v_head_dim), kv_lora_rank]`.
    pub kv_b_proj: Linear<T>,
    /// `[hidden, heads·v_head_dim]`.
    pub o_proj: Linear<T>,
    /// Whether forward drops the RMSNorm outputs and up-projection outputs for backward to
    /// recompute (see the module doc). May be changed between calls; a cache records
    /// which way it was made.
    pub recompute: bool,
    prefix: String,
    dims: MlaDims,
    rope: Arc<RopeTable<T>>,
    softmax_scale: T,
    backend: DeviceBackend,
}

/// What forward keeps for backward.
#[derive(Clone, Debug, PartialEq)]
pub struct MlaCache<T> {
    /// Sequences of the call.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Low-rank queries: the `q_a_proj` output, before `q_a_layernorm`,
    /// `[rows, q_lora_rank]`. Plain queries: `q` after RoPE, `[rows, heads·qk]`.
    pub q_input: Vec<T>,
    /// The KV latent, `kv_a_proj_with_mqa`'s first `kv_lora_rank` outputs, before
    /// `kv_a_layernorm`, `[rows, kv_lora_rank]`.
    pub kv_latent: Vec<T>,
    /// The shared rope key after RoPE, `[rows, qk_rope_head_dim]`.
    pub k_rope: Vec<T>,
    /// The attention output (`o_proj`'s input), `[rows, heads·v]`; under fp8 in FP8 with
    /// power-of-two scales.
    pub o: CachedActivation<T>,
    /// The attention core's log-sum-exp, `[batch, heads, seq]`.
    pub lse: Vec<T>,
    /// The RMSNorm outputs and `rstd`; `None` when made with `recompute`.
    pub normed: Option<NormedLatents<T>>,
    /// The per-head `q`, `k`, `v`; `None` when made with `recompute`.
    pub heads: Option<HeadActivations<T>>,
    /// The samples of a packed batch: attention ran once per span, at positions restarting
    /// in each ([`crate::packing`]); `None`: one sample per sequence.
    pub packing: Option<Arc<Packing>>,
}

/// One RMSNorm's output with its saved `rstd`.
#[derive(Clone, Debug, PartialEq)]
pub struct NormedLatent<T> {
    /// `rstd` per row.
    pub norm: RmsNormCache<T>,
    /// The normalized latent (the up-projection's input), `[rows, rank]`, as the
    /// up-projection keeps it.
    pub normed: CachedActivation<T>,
}

/// One sequence's inference cache for one MLA layer (see the module doc): per token, the
/// normed KV latent and the rotated shared rope key, in position order.
#[derive(Clone, Debug, PartialEq)]
pub struct MlaKvCache<T> {
    /// `kv_a_layernorm(c_kv)`, `[len, kv_lora_rank]`.
    latent: Vec<T>,
    /// The shared rope key after RoPE, `[len, qk_rope_head_dim]`.
    k_rope: Vec<T>,
    len: usize,
}

impl<T> Default for MlaKvCache<T> {
    fn default() -> Self {
        MlaKvCache { latent: Vec::new(), k_rope: Vec::new(), len: 0 }
    }
}

impl<T: Real> MlaKvCache<T> {
    /// Tokens cached: the next token's position.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes the cached values take, `len · (kv_lora_rank + qk_rope_head_dim) ·
    /// size_of::<T>()`.
    pub fn bytes(&self) -> usize {
        (self.latent.len() + self.k_rope.len()) * std::mem::size_of::<T>()
    }

    fn append(&mut self, latent: &[T], k_rope: &[T], tokens: usize) {
        self.latent.extend_from_slice(latent);
        self.k_rope.extend_from_slice(k_rope);
        self.len += tokens;
    }

    /// Forgets every token from position `len` on (a rejected speculative token).
    pub fn truncate(&mut self, len: usize, dims: &MlaDims) {
        if len < self.len {
            self.latent.truncate(len * dims.kv_lora_rank);
            self.k_rope.truncate(len * dims.qk_rope_head_dim);
            self.len = len;
        }
    }
}

impl MlaDims {
    /// Values an [`MlaKvCache`] keeps per token: `kv_lora_rank + qk_rope_head_dim`
    /// (DeepSeek-V3: 512 + 64 = 576 per layer).
    pub fn cached_values_per_token(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

impl<T: Real> MlaCache<T> {
    /// The bytes held.
    pub fn bytes(&self) -> CacheBytes {
        let floats = self.q_input.len() + self.kv_latent.len() + self.k_rope.len() + self.lse.len();
        let normed = self.normed.iter().flat_map(|n| n.q.iter().chain([&n.kv]));
        let normed: CacheBytes =
            normed.map(|n| CacheBytes::of::<T>(n.norm.rstd.len()) + n.normed.bytes()).sum();
        let heads = self.heads.as_ref().map_or(0, |h| h.q.len() + h.k.len() + h.v.len());
        CacheBytes::of::<T>(floats + heads) + self.o.bytes() + normed
    }
}

/// The outputs of MLA's two RMSNorms.
#[derive(Clone, Debug, PartialEq)]
pub struct NormedLatents<T> {
    /// `q_a_layernorm`'s (`None` for plain queries).
    pub q: Option<NormedLatent<T>>,
    /// `kv_a_layernorm`'s.
    pub kv: NormedLatent<T>,
}

/// The attention core's inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadActivations<T> {
    /// Low-rank queries: `q` after RoPE, `[rows, heads, qk]`; empty for plain queries,
    /// whose `q` is [`MlaCache::q_input`].
    pub q: Vec<T>,
    /// `[k_nope_h | k_rope]` per head, `[rows, heads, qk]`.
    pub k: Vec<T>,
    /// `[rows, heads, v]`.
    pub v: Vec<T>,
}

/// What B hands to W: the gradients at the outputs of every weighted operation.
#[derive(Clone, Debug, PartialEq)]
pub struct MlaWeightGradInputs<T> {
    /// At the layer output (`o_proj`), `[rows, hidden]`.
    pub d_out: Vec<T>,
    /// At `q_b_proj`'s (or `q_proj`'s) output, before RoPE, `[rows, heads·qk]`.
    pub d_q: Vec<T>,
    /// At `q_a_layernorm`'s output, `[rows, q_lora_rank]`; empty for plain queries.
    pub d_q_normed: Vec<T>,
    /// At `q_a_proj`'s output, `[rows, q_lora_rank]`; empty for plain queries.
    pub d_q_latent: Vec<T>,
    /// At `kv_b_proj`'s output, `[rows, heads·(nope + v)]`.
    pub d_kv_b: Vec<T>,
    /// At `kv_a_layernorm`'s output, `[rows, kv_lora_rank]`.
    pub d_kv_normed: Vec<T>,
    /// At `kv_a_proj_with_mqa`'s output (rope part before RoPE), `[rows, kv_lora_rank + rope]`.
    pub d_kv_a: Vec<T>,
}

/// The kernels' RoPE configuration for `config`.
pub fn rope_config(config: &ModelConfig) -> RopeConfig {
    RopeConfig {
        head_dim: config.qk_rope_head_dim,
        theta: config.rope_theta,
        scaling: config.rope_scaling.as_ref().map(|s| YarnScaling {
            factor: s.factor,
            original_max_position_embeddings: s.original_max_position_embeddings,
            beta_fast: s.beta_fast,
            beta_slow: s.beta_slow,
            mscale: s.mscale,
            mscale_all_dim: s.mscale_all_dim,
        }),
    }
}

/// Softmax of each of the `n` rows of `scores` (`[n, t]`) over its causal prefix: row `i`
/// is the token at position `t − n + i` and sees columns `0..=t − n + i`; the rest become 0.
fn causal_softmax<T: Real>(scores: &mut [T], n: usize, t: usize) {
    for (i, row) in scores.chunks_exact_mut(t).enumerate() {
        let (seen, unseen) = row.split_at_mut(t - n + i + 1);
        let max = seen.iter().copied().fold(T::neg_infinity(), T::max);
        let mut sum = T::zero();
        for v in seen.iter_mut() {
            *v = (*v - max).exp();
            sum = sum + *v;
        }
        seen.iter_mut().for_each(|v| *v = *v / sum);
        unseen.iter_mut().for_each(|v| *v = T::zero());
    }
}

/// Positions `0..seq` for each of `batch` sequences.
fn positions(batch: usize, seq: usize) -> Vec<usize> {
    (0..batch).flat_map(|_| 0..seq).collect()
}

fn zeros<T: Real>(n: usize) -> Vec<T> {
    vec![T::zero(); n]
}

impl<T: Real> Mla<T> {
    /// The rope table for `config`: positions `0..max_position_embeddings`, YaRN applied
    /// when `rope_scaling` is set and `max_position_embeddings` exceeds its
    /// `original_max_position_embeddings`. Share it between layers.
    pub fn rope_table(config: &ModelConfig) -> Result<Arc<RopeTable<T>>, ModelError> {
        Ok(Arc::new(RopeTable::new(&rope_config(config), config.max_position_embeddings)?))
    }

    /// A layer named `prefix` (e.g. `model.layers.3.self_attn`) with its own rope table;
    /// weights drawn from Normal(0, `initializer_range`) by `(seed, name)`, norms at 1.
    pub fn new(config: &ModelConfig, prefix: &str, seed: u64, recompute: bool) -> Result<Self, ModelError> {
        Self::with_rope_table(config, prefix, seed, recompute, Self::rope_table(config)?)
    }

    /// As [`Mla::new`], sharing `rope`, which must be [`Mla::rope_table`]`(config)`'s
    /// equal: `qk_rope_head_dim` dims and `max_position_embeddings` positions (checked).
    pub fn with_rope_table(
        config: &ModelConfig,
        prefix: &str,
        seed: u64,
        recompute: bool,
        rope: Arc<RopeTable<T>>,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let dims = MlaDims::from_config(config);
        if rope.head_dim() != dims.qk_rope_head_dim || rope.max_positions() != config.max_position_embeddings
        {
            return Err(ModelError::Tensor {
                tensor: format!("{prefix} rope table"),
                detail: format!(
                    "covers {} dims × {} positions, the config needs qk_rope_head_dim = {} × \
                     max_position_embeddings = {}",
                    rope.head_dim(),
                    rope.max_positions(),
                    dims.qk_rope_head_dim,
                    config.max_position_embeddings
                ),
            });
        }
        let scale = (dims.qk_head_dim() as f64).powf(-0.5) * rope.softmax_scale_multiplier();
        let softmax_scale = T::from(scale).ok_or_else(|| ModelError::Tensor {
            tensor: prefix.to_string(),
            detail: format!("softmax scale {scale} does not convert to the element type"),
        })?;
        let std = config.initializer_range;
        // The latent norms use a fixed eps of 1e-6, not `rms_norm_eps`: DeepSeek's
        // reference (`RMSNorm(q_lora_rank)`) and HF's `DeepseekV3Attention` both build them
        // with the default, whatever the config says.
        let eps = LATENT_NORM_EPS;
        let name = |p: &str| format!("{prefix}.{p}");
        let (hidden, heads) = (dims.hidden, dims.heads);
        let query = match dims.q_lora_rank {
            Some(rank) => QueryProjection::LowRank {
                q_a_proj: Linear::new(&name("q_a_proj"), hidden, rank, std, seed),
                q_a_layernorm: RmsNorm::new(&name("q_a_layernorm"), rank, eps),
                q_b_proj: Linear::new(&name("q_b_proj"), rank, dims.q_width(), std, seed),
            },
            None => QueryProjection::Plain {
                q_proj: Linear::new(&name("q_proj"), hidden, dims.q_width(), std, seed),
            },
        };
        Ok(Mla {
            query,
            kv_a_proj_with_mqa: Linear::new(
                &name("kv_a_proj_with_mqa"),
                hidden,
                dims.kv_a_width(),
                std,
                seed,
            ),
            kv_a_layernorm: RmsNorm::new(&name("kv_a_layernorm"), dims.kv_lora_rank, eps),
            kv_b_proj: Linear::new(&name("kv_b_proj"), dims.kv_lora_rank, dims.kv_b_width(), std, seed),
            o_proj: Linear::new(&name("o_proj"), heads * dims.v_head_dim, hidden, std, seed),
            recompute,
            prefix: prefix.to_string(),
            dims,
            rope,
            softmax_scale,
            backend: DeviceBackend::default(),
        })
    }

    /// Sets the precision of every projection ([`crate::precision`]); the norms, RoPE and
    /// the attention core stay f32.
    pub fn set_precision(&mut self, precision: Precision) {
        match &mut self.query {
            QueryProjection::LowRank { q_a_proj, q_b_proj, .. } => {
                q_a_proj.precision = precision;
                q_b_proj.precision = precision;
            }
            QueryProjection::Plain { q_proj } => q_proj.precision = precision,
        }
        for linear in [&mut self.kv_a_proj_with_mqa, &mut self.kv_b_proj, &mut self.o_proj] {
            linear.precision = precision;
        }
    }

    /// Runs RoPE, the attention core, the norms and every projection on `backend`.
    pub fn set_backend(&mut self, backend: DeviceBackend) {
        match &mut self.query {
            QueryProjection::LowRank { q_a_proj, q_a_layernorm, q_b_proj } => {
                q_a_proj.backend = backend;
                q_a_layernorm.backend = backend;
                q_b_proj.backend = backend;
            }
            QueryProjection::Plain { q_proj } => q_proj.backend = backend,
        }
        for linear in [&mut self.kv_a_proj_with_mqa, &mut self.kv_b_proj, &mut self.o_proj] {
            linear.backend = backend;
        }
        self.kv_a_layernorm.backend = backend;
        self.backend = backend;
    }

    /// The layer input `x: [rows, hidden]` as the projections that read it (`q_a_proj` or
    /// `q_proj`, and `kv_a_proj_with_mqa`, all of one precision) keep it
    /// ([`Linear::cache_input`]).
    pub fn cache_input<'a>(
        &self,
        x: impl Into<Cow<'a, [T]>>,
        rows: usize,
    ) -> Result<CachedActivation<T>, ModelError> {
        self.kv_a_proj_with_mqa.cache_input(x, rows)
    }

    /// The layer's name prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The layer's dimensions.
    pub fn dims(&self) -> MlaDims {
        self.dims
    }

    /// The rope table in use.
    pub fn rope(&self) -> &Arc<RopeTable<T>> {
        &self.rope
    }

    /// The attention softmax scale, `qk_head_dim^-½ ·` the table's YaRN multiplier.
    pub fn softmax_scale(&self) -> T {
        self.softmax_scale
    }

    /// Every parameter, in HF order: query weights, `kv_a_proj_with_mqa`,
    /// `kv_a_layernorm`, `kv_b_proj`, `o_proj`.
    pub fn params(&self) -> Vec<&Param<T>> {
        let mut out = match &self.query {
            QueryProjection::LowRank { q_a_proj, q_a_layernorm, q_b_proj } => {
                vec![&q_a_proj.weight, &q_a_layernorm.weight, &q_b_proj.weight]
            }
            QueryProjection::Plain { q_proj } => vec![&q_proj.weight],
        };
        out.extend([
            &self.kv_a_proj_with_mqa.weight,
            &self.kv_a_layernorm.weight,
            &self.kv_b_proj.weight,
            &self.o_proj.weight,
        ]);
        out
    }

    /// [`Mla::params`], mutable, for optimizers and checkpoints.
    pub fn params_mut(&mut self) -> Vec<&mut Param<T>> {
        let mut out = match &mut self.query {
            QueryProjection::LowRank { q_a_proj, q_a_layernorm, q_b_proj } => {
                vec![&mut q_a_proj.weight, &mut q_a_layernorm.weight, &mut q_b_proj.weight]
            }
            QueryProjection::Plain { q_proj } => vec![&mut q_proj.weight],
        };
        out.extend([
            &mut self.kv_a_proj_with_mqa.weight,
            &mut self.kv_a_layernorm.weight,
            &mut self.kv_b_proj.weight,
            &mut self.o_proj.weight,
        ]);
        out
    }

    fn tensor_error(&self, detail: String) -> ModelError {
        ModelError::Tensor { tensor: self.prefix.clone(), detail }
    }

    /// `batch · seq`, checking the positions against the rope table.
    fn rows(&self, batch: usize, seq: usize) -> Result<usize, ModelError> {
        if seq > self.rope.max_positions() {
            return Err(self.tensor_error(format!(
                "sequences of {seq} tokens need positions up to {}, past max_position_embeddings = {}",
                seq - 1,
                self.rope.max_positions()
            )));
        }
        batch
            .checked_mul(seq)
            .ok_or_else(|| self.tensor_error(format!("{batch} × {seq} rows overflow usize")))
    }

    fn attention_shape(&self, batch: usize, seq: usize) -> AttentionShape {
        let d = &self.dims;
        AttentionShape { batch, seq, heads: d.heads, qk_dim: d.qk_head_dim(), v_dim: d.v_head_dim }
    }

    /// `y = MLA(x)` for `x` ([`Mla::cache_input`]), `y`: `[batch·seq, hidden]` (`y`
    /// overwritten), each sequence at positions `0..seq`. `threads` bounds the
    /// projections' GEMMs.
    pub fn forward(
        &self,
        x: &CachedActivation<T>,
        batch: usize,
        seq: usize,
        y: &mut [T],
        threads: usize,
    ) -> Result<MlaCache<T>, ModelError> {
        self.forward_packed(x, batch, seq, None, y, threads)
    }

    /// [`Mla::forward`] over a packed batch: with `packing`, every sample of a sequence
    /// attends only within itself, at positions from 0 ([`crate::packing`]); the backward
    /// follows the cache's packing.
    pub fn forward_packed(
        &self,
        x: &CachedActivation<T>,
        batch: usize,
        seq: usize,
        packing: Option<&Arc<Packing>>,
        y: &mut [T],
        threads: usize,
    ) -> Result<MlaCache<T>, ModelError> {
        let rows = self.rows(batch, seq)?;
        let d = self.dims;
        check_len(&self.prefix, "input", rows * d.hidden, x.len())?;
        check_len(&self.prefix, "output", rows * d.hidden, y.len())?;
        let pos = self.positions_of(packing, batch, seq)?;

        // Down projections: the query latent (or the plain queries), the KV latent and the
        // shared rope key.
        let q_input = match &self.query {
            QueryProjection::LowRank { q_a_proj, .. } => {
                let mut c_q = zeros(rows * q_a_proj.out_features);
                q_a_proj.forward_from(x, rows, &mut c_q, threads)?;
                c_q
            }
            QueryProjection::Plain { q_proj } => {
                let mut q = zeros(rows * d.q_width());
                q_proj.forward_from(x, rows, &mut q, threads)?;
                self.backend.rope_forward(&mut q, d.q_rope_layout(rows), &pos, &self.rope)?;
                q
            }
        };
        let mut kv_a = zeros(rows * d.kv_a_width());
        self.kv_a_proj_with_mqa.forward_from(x, rows, &mut kv_a, threads)?;
        let (kv_latent, k_rope) = self.split_kv_a(&kv_a, &pos)?;

        // Norms and up projections.
        let normed = self.normed(&q_input, &kv_latent, rows)?;
        let heads = self.up(&normed, &k_rope, &pos, rows, threads)?;

        let mut o = zeros(rows * d.o_width());
        let mut lse = zeros(batch * d.heads * seq);
        let q = self.query_of(&q_input, &heads);
        match packing {
            None => self.backend.attention_forward(
                &mut o,
                &mut lse,
                q,
                &heads.k,
                &heads.v,
                self.attention_shape(batch, seq),
                self.softmax_scale,
            )?,
            Some(p) => self.packed_attention_forward(p, &mut o, &mut lse, q, &heads.k, &heads.v)?,
        }
        // Power-of-two scales, so that Wgrad's re-tiling adds no error (report §3.3.3).
        let o = self.o_proj.cache_input_with(o, rows, ScaleRounding::PowerOfTwo)?;
        self.o_proj.forward_from(&o, rows, y, threads)?;

        let (normed, heads) = if self.recompute { (None, None) } else { (Some(normed), Some(heads)) };
        let packing = packing.cloned();
        Ok(MlaCache { batch, seq, q_input, kv_latent, k_rope, o, lse, normed, heads, packing })
    }

    /// The RoPE position of every row: `0..seq` per sequence, or per sample when packed
    /// (checked against the batch's shape).
    fn positions_of(
        &self,
        packing: Option<&Arc<Packing>>,
        batch: usize,
        seq: usize,
    ) -> Result<Vec<usize>, ModelError> {
        match packing {
            None => Ok(positions(batch, seq)),
            Some(p) if p.batch() == batch && p.seq() == seq => Ok(p.positions().to_vec()),
            Some(p) => Err(self.tensor_error(format!(
                "a packing of {} × {} positions for a call of {batch} × {seq}",
                p.batch(),
                p.seq()
            ))),
        }
    }

    /// The attention core once per packed sample: each span is a contiguous run of rows
    /// of `q`, `k`, `v`, `o` (`[rows, heads, dim]`), so it runs as a batch of one; its
    /// log-sum-exp rows go to their places in `lse` (`[batch, heads, seq]`).
    fn packed_attention_forward(
        &self,
        packing: &Packing,
        o: &mut [T],
        lse: &mut [T],
        q: &[T],
        k: &[T],
        v: &[T],
    ) -> Result<(), ModelError> {
        let d = self.dims;
        let (heads, qk, vd, seq) = (d.heads, d.qk_head_dim(), d.v_head_dim, packing.seq());
        for (b, span) in packing.spans() {
            let (r0, r1) = (b * seq + span.start, b * seq + span.end);
            let n = span.len();
            let mut lse_s = zeros(heads * n);
            self.backend.attention_forward(
                &mut o[r0 * heads * vd..r1 * heads * vd],
                &mut lse_s,
                &q[r0 * heads * qk..r1 * heads * qk],
                &k[r0 * heads * qk..r1 * heads * qk],
                &v[r0 * heads * vd..r1 * heads * vd],
                self.attention_shape(1, n),
                self.softmax_scale,
            )?;
            for h in 0..heads {
                let at = (b * heads + h) * seq + span.start;
                lse[at..at + n].copy_from_slice(&lse_s[h * n..(h + 1) * n]);
            }
        }
        Ok(())
    }

    /// The backward of [`Mla::packed_attention_forward`], span by span.
    #[allow(clippy::too_many_arguments)]
    fn packed_attention_backward(
        &self,
        packing: &Packing,
        dq: &mut [T],
        dk: &mut [T],
        dv: &mut [T],
        d_o: &[T],
        q: &[T],
        k: &[T],
        v: &[T],
        o: &[T],
        lse: &[T],
    ) -> Result<(), ModelError> {
        let d = self.dims;
        let (heads, qk, vd, seq) = (d.heads, d.qk_head_dim(), d.v_head_dim, packing.seq());
        for (b, span) in packing.spans() {
            let (r0, r1) = (b * seq + span.start, b * seq + span.end);
            let n = span.len();
            let mut lse_s = Vec::with_capacity(heads * n);
            for h in 0..heads {
                let at = (b * heads + h) * seq + span.start;
                lse_s.extend_from_slice(&lse[at..at + n]);
            }
            let (qs, vs) = (r0 * heads * qk..r1 * heads * qk, r0 * heads * vd..r1 * heads * vd);
            self.backend.attention_backward(
                &mut dq[qs.clone()],
                &mut dk[qs.clone()],
                &mut dv[vs.clone()],
                &d_o[vs.clone()],
                &q[qs.clone()],
                &k[qs],
                &v[vs.clone()],
                &o[vs],
                &lse_s,
                self.attention_shape(1, n),
                self.softmax_scale,
            )?;
        }
        Ok(())
    }

    /// `kv_a_proj_with_mqa`'s output split into the KV latent and the shared rope key,
    /// rotated at `pos` (one position per row).
    fn split_kv_a(&self, kv_a: &[T], pos: &[usize]) -> Result<(Vec<T>, Vec<T>), ModelError> {
        let d = self.dims;
        let rows = pos.len();
        let mut kv_latent = Vec::with_capacity(rows * d.kv_lora_rank);
        let mut k_rope = Vec::with_capacity(rows * d.qk_rope_head_dim);
        for row in kv_a.chunks_exact(d.kv_a_width()) {
            let (latent, rope) = row.split_at(d.kv_lora_rank);
            kv_latent.extend_from_slice(latent);
            k_rope.extend_from_slice(rope);
        }
        let layout = RopeLayout::contiguous(rows, 1, d.qk_rope_head_dim);
        self.backend.rope_forward(&mut k_rope, layout, pos, &self.rope)?;
        Ok((kv_latent, k_rope))
    }

    /// Inference: `y = MLA(x)` for the new tokens of several sequences at once, `x`, `y`:
    /// `[rows, hidden]` with `counts[s]` rows of sequence `s` after those of `s − 1`
    /// (`x` is the block's normed input, as for [`Mla::cache_input`]). Sequence `s`'s
    /// tokens take the positions after `caches[s]`'s, are appended to it, and attend to
    /// everything cached through the absorbed up-projections (module doc).
    pub fn forward_cached(
        &self,
        x: &[T],
        counts: &[usize],
        caches: &mut [MlaKvCache<T>],
        y: &mut [T],
        threads: usize,
    ) -> Result<(), ModelError> {
        let d = self.dims;
        if counts.len() != caches.len() {
            return Err(self.tensor_error(format!(
                "{} token counts for {} sequence caches",
                counts.len(),
                caches.len()
            )));
        }
        let rows: usize = counts.iter().sum();
        check_len(&self.prefix, "input", rows * d.hidden, x.len())?;
        check_len(&self.prefix, "output", rows * d.hidden, y.len())?;
        let mut pos = Vec::with_capacity(rows);
        for (cache, &n) in caches.iter().zip(counts) {
            let end = cache.len + n;
            if end > self.rope.max_positions() {
                return Err(self.tensor_error(format!(
                    "a sequence of {end} tokens passes max_position_embeddings = {}",
                    self.rope.max_positions()
                )));
            }
            pos.extend(cache.len..end);
        }

        let mut q = zeros(rows * d.q_width());
        match &self.query {
            QueryProjection::LowRank { q_a_proj, q_a_layernorm, q_b_proj } => {
                let mut c_q = zeros(rows * q_a_proj.out_features);
                q_a_proj.forward(x, rows, &mut c_q, threads)?;
                let mut normed = zeros(c_q.len());
                q_a_layernorm.forward(&c_q, rows, &mut normed)?;
                q_b_proj.forward(&normed, rows, &mut q, threads)?;
            }
            QueryProjection::Plain { q_proj } => q_proj.forward(x, rows, &mut q, threads)?,
        }
        self.backend.rope_forward(&mut q, d.q_rope_layout(rows), &pos, &self.rope)?;
        let mut kv_a = zeros(rows * d.kv_a_width());
        self.kv_a_proj_with_mqa.forward(x, rows, &mut kv_a, threads)?;
        let (kv_latent, k_rope) = self.split_kv_a(&kv_a, &pos)?;
        let mut latent = zeros(kv_latent.len());
        self.kv_a_layernorm.forward(&kv_latent, rows, &mut latent)?;

        let mut o = zeros(rows * d.o_width());
        let mut row = 0;
        for (cache, &n) in caches.iter_mut().zip(counts).filter(|(_, n)| **n > 0) {
            let (r, rope) = (d.kv_lora_rank, d.qk_rope_head_dim);
            cache.append(&latent[row * r..(row + n) * r], &k_rope[row * rope..(row + n) * rope], n);
            let q = &q[row * d.q_width()..(row + n) * d.q_width()];
            self.absorbed_attention(
                q,
                n,
                cache,
                &mut o[row * d.o_width()..(row + n) * d.o_width()],
                threads,
            )?;
            row += n;
        }
        self.o_proj.forward(&o, rows, y, threads)
    }

    /// The attention of one sequence's `n` newest tokens (rotated queries `q`, `[n, heads·qk]`)
    /// over its cache, which already holds them: `o`, `[n, heads·v]`, overwritten.
    fn absorbed_attention(
        &self,
        q: &[T],
        n: usize,
        cache: &MlaKvCache<T>,
        o: &mut [T],
        threads: usize,
    ) -> Result<(), ModelError> {
        let d = self.dims;
        let (nope, rope, r, vd) = (d.qk_nope_head_dim, d.qk_rope_head_dim, d.kv_lora_rank, d.v_head_dim);
        let (t, qk, per_head) = (cache.len, d.qk_head_dim(), nope + vd);
        let be = &self.backend;
        let w = self.kv_b_proj.weight.value.host();
        let latent = MatRef::row_major(&cache.latent, t, r, "cached latent")?;
        let k_rope = MatRef::row_major(&cache.k_rope, t, rope, "cached rope key")?;
        let (mut q_abs, mut scores, mut o_latent) = (zeros(n * r), zeros(n * t), zeros(n * r));
        let stride = (d.heads * qk) as isize;
        for h in 0..d.heads {
            let q_nope = MatRef::new(&q[h * qk..], n, nope, stride, 1, "q_nope")?;
            let q_rope = MatRef::new(&q[h * qk + nope..], n, rope, stride, 1, "q_rope")?;
            let w_uk = MatRef::row_major(&w[h * per_head * r..(h * per_head + nope) * r], nope, r, "W_UK")?;
            let w_uv =
                MatRef::row_major(&w[(h * per_head + nope) * r..(h + 1) * per_head * r], vd, r, "W_UV")?;
            be.matmul(
                MatMut::row_major(&mut q_abs, n, r, "q_abs")?,
                T::zero(),
                q_nope,
                w_uk,
                T::one(),
                threads,
            )?;
            let q_abs = MatRef::row_major(&q_abs, n, r, "q_abs")?;
            let mut s = MatMut::row_major(&mut scores, n, t, "scores")?;
            be.matmul(s.reborrow(), T::zero(), q_abs, latent.t(), self.softmax_scale, threads)?;
            be.matmul(s, T::one(), q_rope, k_rope.t(), self.softmax_scale, threads)?;
            causal_softmax(&mut scores, n, t);
            let p = MatRef::row_major(&scores, n, t, "probabilities")?;
            be.matmul(
                MatMut::row_major(&mut o_latent, n, r, "o_latent")?,
                T::zero(),
                p,
                latent,
                T::one(),
                threads,
            )?;
            let o_h = MatMut::new(&mut o[h * vd..], n, vd, (d.heads * vd) as isize, 1, "o")?;
            let o_latent = MatRef::row_major(&o_latent, n, r, "o_latent")?;
            be.matmul(o_h, T::zero(), o_latent, w_uv.t(), T::one(), threads)?;
        }
        Ok(())
    }

    /// The rotated queries: the plain path's are the cache's `q_input`.
    fn query_of<'a>(&self, q_input: &'a [T], heads: &'a HeadActivations<T>) -> &'a [T] {
        match self.query {
            QueryProjection::LowRank { .. } => &heads.q,
            QueryProjection::Plain { .. } => q_input,
        }
    }

    /// The two RMSNorms over the stored latents, kept as the up-projections keep their
    /// inputs.
    fn normed(&self, q_input: &[T], kv_latent: &[T], rows: usize) -> Result<NormedLatents<T>, ModelError> {
        let norm = |layer: &RmsNorm<T>, up: &Linear<T>, x: &[T]| -> Result<NormedLatent<T>, ModelError> {
            let mut normed = zeros(x.len());
            let norm = layer.forward(x, rows, &mut normed)?;
            Ok(NormedLatent { norm, normed: up.cache_input(normed, rows)? })
        };
        let q = match &self.query {
            QueryProjection::LowRank { q_a_layernorm, q_b_proj, .. } => {
                Some(norm(q_a_layernorm, q_b_proj, q_input)?)
            }
            QueryProjection::Plain { .. } => None,
        };
        Ok(NormedLatents { q, kv: norm(&self.kv_a_layernorm, &self.kv_b_proj, kv_latent)? })
    }

    /// The up projections: rotated `q` (low-rank path) and per-head `k`, `v`.
    fn up(
        &self,
        normed: &NormedLatents<T>,
        k_rope: &[T],
        pos: &[usize],
        rows: usize,
        threads: usize,
    ) -> Result<HeadActivations<T>, ModelError> {
        let d = self.dims;
        let q = match (&self.query, &normed.q) {
            (QueryProjection::LowRank { q_b_proj, .. }, Some(nq)) => {
                let mut q = zeros(rows * d.q_width());
                q_b_proj.forward_from(&nq.normed, rows, &mut q, threads)?;
                self.backend.rope_forward(&mut q, d.q_rope_layout(rows), pos, &self.rope)?;
                q
            }
            _ => Vec::new(),
        };
        let mut kv_b = zeros(rows * d.kv_b_width());
        self.kv_b_proj.forward_from(&normed.kv.normed, rows, &mut kv_b, threads)?;
        check_len(&self.prefix, "shared rope key", rows * d.qk_rope_head_dim, k_rope.len())?;
        let (nope, qk, vd) = (d.qk_nope_head_dim, d.qk_head_dim(), d.v_head_dim);
        let mut k = zeros(rows * d.q_width());
        let mut v = zeros(rows * d.o_width());
        for (((kv_b, k), v), k_rope) in kv_b
            .chunks_exact(d.kv_b_width())
            .zip(k.chunks_exact_mut(d.q_width()))
            .zip(v.chunks_exact_mut(d.o_width()))
            .zip(k_rope.chunks_exact(d.qk_rope_head_dim))
        {
            for ((src, k), v) in
                kv_b.chunks_exact(nope + vd).zip(k.chunks_exact_mut(qk)).zip(v.chunks_exact_mut(vd))
            {
                k[..nope].copy_from_slice(&src[..nope]);
                k[nope..].copy_from_slice(k_rope);
                v.copy_from_slice(&src[nope..]);
            }
        }
        Ok(HeadActivations { q, k, v })
    }

    /// Checks a cache's buffers against the layer and its own `batch`, `seq`; returns rows.
    fn check_cache(&self, cache: &MlaCache<T>) -> Result<usize, ModelError> {
        let rows = self.rows(cache.batch, cache.seq)?;
        let d = self.dims;
        let q_width = match &self.query {
            QueryProjection::LowRank { q_a_proj, .. } => q_a_proj.out_features,
            QueryProjection::Plain { .. } => d.q_width(),
        };
        let p = &self.prefix;
        check_len(p, "cached query input", rows * q_width, cache.q_input.len())?;
        check_len(p, "cached kv latent", rows * d.kv_lora_rank, cache.kv_latent.len())?;
        check_len(p, "cached shared rope key", rows * d.qk_rope_head_dim, cache.k_rope.len())?;
        check_len(p, "cached attention output", rows * d.o_width(), cache.o.len())?;
        check_len(p, "cached log-sum-exp", cache.batch * d.heads * cache.seq, cache.lse.len())?;
        Ok(rows)
    }

    /// B: `dx` (`[batch·seq, hidden]`, overwritten, or added to with `accumulate`) from
    /// `dy`; returns what [`Mla::backward_weight`] needs. Under recompute, reruns the norms
    /// and up projections from the cached latents.
    pub fn backward_input(
        &self,
        cache: &MlaCache<T>,
        dy: &[T],
        dx: &mut [T],
        accumulate: bool,
        threads: usize,
    ) -> Result<MlaWeightGradInputs<T>, ModelError> {
        let rows = self.check_cache(cache)?;
        let d = self.dims;
        check_len(&self.prefix, "output gradient", rows * d.hidden, dy.len())?;
        check_len(&self.prefix, "input gradient", rows * d.hidden, dx.len())?;
        let pos = self.positions_of(cache.packing.as_ref(), cache.batch, cache.seq)?;

        let recomputed;
        let (normed, heads) = match (&cache.normed, &cache.heads) {
            (Some(normed), Some(heads)) => (normed, heads),
            _ => {
                let normed = self.normed(&cache.q_input, &cache.kv_latent, rows)?;
                let heads = self.up(&normed, &cache.k_rope, &pos, rows, threads)?;
                recomputed = (normed, heads);
                (&recomputed.0, &recomputed.1)
            }
        };

        // o_proj and the attention core.
        let mut d_o = zeros(rows * d.o_width());
        self.o_proj.backward_input(dy, rows, &mut d_o, false, threads)?;
        let mut d_q = zeros(rows * d.q_width());
        let mut d_k = zeros(rows * d.q_width());
        let mut d_v = zeros(rows * d.o_width());
        // Dequantized under fp8: the report's attention backward reads the low-precision
        // copy too, and no f32 one is kept.
        let o = cache.o.values(&self.backend)?;
        let q = self.query_of(&cache.q_input, heads);
        match &cache.packing {
            None => self.backend.attention_backward(
                &mut d_q,
                &mut d_k,
                &mut d_v,
                &d_o,
                q,
                &heads.k,
                &heads.v,
                &o,
                &cache.lse,
                self.attention_shape(cache.batch, cache.seq),
                self.softmax_scale,
            )?,
            Some(p) => self.packed_attention_backward(
                p, &mut d_q, &mut d_k, &mut d_v, &d_o, q, &heads.k, &heads.v, &o, &cache.lse,
            )?,
        }
        drop(o);
        drop(d_o);

        // Disassemble k and v: kv_b's gradient per head, the shared key's summed over heads.
        let (nope, qk, vd, rope) = (d.qk_nope_head_dim, d.qk_head_dim(), d.v_head_dim, d.qk_rope_head_dim);
        let mut d_kv_b = zeros(rows * d.kv_b_width());
        let mut d_k_rope = zeros(rows * rope);
        for (((d_kv_b, d_k_rope), d_k), d_v) in d_kv_b
            .chunks_exact_mut(d.kv_b_width())
            .zip(d_k_rope.chunks_exact_mut(rope))
            .zip(d_k.chunks_exact(d.q_width()))
            .zip(d_v.chunks_exact(d.o_width()))
        {
            for ((dst, d_k), d_v) in
                d_kv_b.chunks_exact_mut(nope + vd).zip(d_k.chunks_exact(qk)).zip(d_v.chunks_exact(vd))
            {
                dst[..nope].copy_from_slice(&d_k[..nope]);
                dst[nope..].copy_from_slice(d_v);
                d_k_rope.iter_mut().zip(&d_k[nope..]).for_each(|(s, &g)| *s = *s + g);
            }
        }
        drop((d_k, d_v));
        self.backend.rope_backward(&mut d_k_rope, RopeLayout::contiguous(rows, 1, rope), &pos, &self.rope)?;

        // kv_b, kv_a_layernorm, kv_a.
        let mut d_kv_normed = zeros(rows * d.kv_lora_rank);
        self.kv_b_proj.backward_input(&d_kv_b, rows, &mut d_kv_normed, false, threads)?;
        let mut d_kv_latent = zeros(rows * d.kv_lora_rank);
        self.kv_a_layernorm.backward_input(
            &normed.kv.norm,
            &cache.kv_latent,
            &d_kv_normed,
            &mut d_kv_latent,
            false,
        )?;
        let mut d_kv_a = Vec::with_capacity(rows * d.kv_a_width());
        for (latent, rope) in d_kv_latent.chunks_exact(d.kv_lora_rank).zip(d_k_rope.chunks_exact(rope)) {
            d_kv_a.extend_from_slice(latent);
            d_kv_a.extend_from_slice(rope);
        }
        drop((d_kv_latent, d_k_rope));
        self.kv_a_proj_with_mqa.backward_input(&d_kv_a, rows, dx, accumulate, threads)?;

        // The query path.
        self.backend.rope_backward(&mut d_q, d.q_rope_layout(rows), &pos, &self.rope)?;
        let (d_q_normed, d_q_latent) = match (&self.query, &normed.q) {
            (QueryProjection::LowRank { q_a_proj, q_a_layernorm, q_b_proj }, Some(nq)) => {
                let mut d_q_normed = zeros(rows * q_b_proj.in_features);
                q_b_proj.backward_input(&d_q, rows, &mut d_q_normed, false, threads)?;
                let mut d_q_latent = zeros(rows * q_b_proj.in_features);
                q_a_layernorm.backward_input(
                    &nq.norm,
                    &cache.q_input,
                    &d_q_normed,
                    &mut d_q_latent,
                    false,
                )?;
                q_a_proj.backward_input(&d_q_latent, rows, dx, true, threads)?;
                (d_q_normed, d_q_latent)
            }
            (QueryProjection::Plain { q_proj }, _) => {
                q_proj.backward_input(&d_q, rows, dx, true, threads)?;
                (Vec::new(), Vec::new())
            }
            (QueryProjection::LowRank { .. }, None) => {
                return Err(self.tensor_error("low-rank queries without a q_a_layernorm output".into()));
            }
        };

        Ok(MlaWeightGradInputs {
            d_out: dy.to_vec(),
            d_q,
            d_q_normed,
            d_q_latent,
            d_kv_b,
            d_kv_normed,
            d_kv_a,
        })
    }

    /// W: accumulates every weight's gradient into [`Param::grad`]; `x` is the forward
    /// input. Under recompute the norm outputs (the up projections' inputs) are recomputed
    /// from the cached latents.
    pub fn backward_weight(
        &mut self,
        cache: &MlaCache<T>,
        grads: &MlaWeightGradInputs<T>,
        x: &CachedActivation<T>,
        threads: usize,
    ) -> Result<(), ModelError> {
        let rows = self.check_cache(cache)?;
        check_len(&self.prefix, "input", rows * self.dims.hidden, x.len())?;
        let recomputed;
        let normed = match &cache.normed {
            Some(normed) => normed,
            None => {
                recomputed = self.normed(&cache.q_input, &cache.kv_latent, rows)?;
                &recomputed
            }
        };

        self.o_proj.backward_weight_from(
            &grads.d_out,
            &cache.o.wgrad_input(&self.backend)?,
            rows,
            threads,
        )?;
        let kv_normed = normed.kv.normed.wgrad_input(&self.backend)?;
        self.kv_b_proj.backward_weight_from(&grads.d_kv_b, &kv_normed, rows, threads)?;
        self.kv_a_layernorm.backward_weight(&normed.kv.norm, &cache.kv_latent, &grads.d_kv_normed)?;
        // One re-tiling of the input serves both down projections.
        let x = x.wgrad_input(&self.backend)?;
        self.kv_a_proj_with_mqa.backward_weight_from(&grads.d_kv_a, &x, rows, threads)?;
        match (&mut self.query, &normed.q) {
            (QueryProjection::LowRank { q_a_proj, q_a_layernorm, q_b_proj }, Some(nq)) => {
                q_b_proj.backward_weight_from(
                    &grads.d_q,
                    &nq.normed.wgrad_input(&self.backend)?,
                    rows,
                    threads,
                )?;
                q_a_layernorm.backward_weight(&nq.norm, &cache.q_input, &grads.d_q_normed)?;
                q_a_proj.backward_weight_from(&grads.d_q_latent, &x, rows, threads)?;
            }
            (QueryProjection::Plain { q_proj }, _) => {
                q_proj.backward_weight_from(&grads.d_q, &x, rows, threads)?;
            }
            (QueryProjection::LowRank { .. }, None) => {
                return Err(ModelError::Tensor {
                    tensor: self.prefix.clone(),
                    detail: "low-rank queries without a q_a_layernorm output".into(),
                });
            }
        }
        Ok(())
    }
}
