//! The transformer block `model.layers.{i}` (DeepSeek-V3 report §2.1; DESIGN §1.1): a
//! pre-norm decoder layer
//!
//! ```text
//! h = x + self_attn(input_layernorm(x))               (MLA)
//! y = h + mlp(post_attention_layernorm(h))            (dense SwiGLU or DeepSeekMoE)
//! ```
//!
//! The `mlp` is the dense [`SwiGluFfn`] (`intermediate_size`) for the first
//! `first_k_dense_replace` layers and a [`MoeLayer`] after them
//! ([`ModelConfig::is_moe_layer`]); MTP modules' blocks are MoE whenever the model has
//! routed experts. The caller decides with `moe` in [`Block::new`].
//!
//! The block is the unit a pipeline stage holds, so its backward is split as DualPipe
//! needs it: [`Block::backward_input`] (B) returns `dx` and a [`BlockWeightGradInputs`],
//! [`Block::backward_weight`] (W) accumulates every weight gradient from it, later.
//! As for every layer, the block input `x` stays with the caller (it is the previous
//! block's output, which the caller keeps anyway) and is passed to forward, B and W.
//! The cache holds the mid-block residual `h` and the sub-layers' caches.
//!
//! ## Recomputation ([`Block::recompute`])
//! With `recompute` the cache drops the two RMSNorm outputs (the inputs of `self_attn` and
//! `mlp`); W recomputes them from `x` and `h` (B does not need them). Together with
//! [`Mla::recompute`], which [`Block::new`] sets the same way, this is the report's
//! "recompute all RMSNorm operations and MLA up-projections". Recomputation reruns the
//! same functions on the same values, so results are bit-identical either way.
//!
//! ## Cached norm outputs under fp8
//! The two RMSNorm outputs are kept as their readers keep them ([`Mla::cache_input`],
//! [`SwiGluFfn::cache_input`], [`MoeLayer::cache_input`]): FP8 under fp8, quantized once
//! for Fprop and W. The MoE gate computes in f32, so under fp8 its Wgrad reads
//! `post_attention_layernorm(h)` recomputed (as under recompute) rather than a second,
//! f32 copy.

use crate::config::ModelConfig;
use crate::ffn::{FfnCache, FfnWeightGradInputs, SwiGluFfn};
use crate::mla::{Mla, MlaCache, MlaKvCache, MlaWeightGradInputs};
use crate::moe::{ExpertExchange, ExpertShard, MoeCache, MoeLayer, MoeWeightGradInputs};
use crate::norm::{RmsNorm, RmsNormCache};
use crate::packing::Packing;
use crate::param::Param;
use crate::precision::{CacheBytes, CachedActivation, Precision};
use crate::{ModelError, Real, check_len};
use flotilla_kernels::rope::RopeTable;
use std::borrow::Cow;
use std::sync::Arc;

/// A block's feed-forward sub-layer, `{prefix}.mlp`.
// One per block, never in a large collection: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Mlp<T> {
    /// The dense SwiGLU FFN: `{prefix}.mlp.{gate,up,down}_proj.weight`.
    Dense(SwiGluFfn<T>),
    /// DeepSeekMoE: `{prefix}.mlp.gate.*`, `.shared_experts.*`, `.experts.{e}.*`.
    Moe(MoeLayer<T>),
}

/// What [`Mlp`]'s forward keeps.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum MlpCache<T> {
    /// The dense FFN's.
    Dense(FfnCache<T>),
    /// The MoE layer's (with the call's balance loss and expert loads).
    Moe(MoeCache<T>),
}

/// What [`Mlp`]'s B hands to its W.
#[derive(Clone, Debug, PartialEq)]
pub enum MlpWeightGradInputs<T> {
    /// The dense FFN's.
    Dense(FfnWeightGradInputs<T>),
    /// The MoE layer's.
    Moe(MoeWeightGradInputs<T>),
}

/// One decoder layer: `{prefix}.{input_layernorm, self_attn, post_attention_layernorm, mlp}`.
#[derive(Clone, Debug)]
pub struct Block<T> {
    /// `{prefix}.input_layernorm.weight`.
    pub input_layernorm: RmsNorm<T>,
    /// `{prefix}.self_attn.*`.
    pub self_attn: Mla<T>,
    /// `{prefix}.post_attention_layernorm.weight`.
    pub post_attention_layernorm: RmsNorm<T>,
    /// `{prefix}.mlp.*`.
    pub mlp: Mlp<T>,
    /// Whether forward drops the RMSNorm outputs for W to recompute (see the module doc).
    /// May be changed between calls; a cache records which way it was made.
    pub recompute: bool,
    prefix: String,
    hidden: usize,
}

/// What [`Block::forward`] keeps for backward.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockCache<T> {
    /// Sequences of the call.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// `input_layernorm`'s `rstd`.
    pub attn_norm: RmsNormCache<T>,
    /// `input_layernorm(x)`, `self_attn`'s input as it keeps it; `None` when made with
    /// `recompute`.
    pub attn_input: Option<CachedActivation<T>>,
    /// `self_attn`'s cache.
    pub attn: MlaCache<T>,
    /// The mid-block residual `h = x + self_attn(…)`, `[rows, hidden]`.
    pub h: Vec<T>,
    /// `post_attention_layernorm`'s `rstd`.
    pub mlp_norm: RmsNormCache<T>,
    /// `post_attention_layernorm(h)`, `mlp`'s input as its experts or FFN keep it; `None`
    /// when made with `recompute`.
    pub mlp_input: Option<CachedActivation<T>>,
    /// `mlp`'s cache.
    pub mlp: MlpCache<T>,
}

impl<T: Real> BlockCache<T> {
    /// Tokens of the call.
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }

    /// The MoE cache, for MoE blocks.
    pub fn moe(&self) -> Option<&MoeCache<T>> {
        match &self.mlp {
            MlpCache::Moe(c) => Some(c),
            MlpCache::Dense(_) => None,
        }
    }

    /// Tokens routed to each expert in this call (MoE blocks only).
    pub fn expert_load(&self) -> Option<&[u64]> {
        self.moe().map(|c| c.expert_load.as_slice())
    }

    /// The call's sequence-wise balance loss (0 for dense blocks or α = 0).
    pub fn balance_loss(&self) -> T {
        self.moe().map_or(T::zero(), |c| c.balance_loss)
    }

    /// The bytes held.
    pub fn bytes(&self) -> CacheBytes {
        let inputs: CacheBytes =
            self.attn_input.iter().chain(&self.mlp_input).map(CachedActivation::bytes).sum();
        let mlp = match &self.mlp {
            MlpCache::Dense(c) => c.bytes(),
            MlpCache::Moe(c) => c.bytes(),
        };
        CacheBytes::of::<T>(self.attn_norm.rstd.len() + self.h.len() + self.mlp_norm.rstd.len())
            + inputs
            + self.attn.bytes()
            + mlp
    }
}

/// What B hands to W.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockWeightGradInputs<T> {
    /// Gradient at `input_layernorm`'s output, `[rows, hidden]`.
    pub d_attn_input: Vec<T>,
    /// `self_attn`'s.
    pub attn: MlaWeightGradInputs<T>,
    /// Gradient at `post_attention_layernorm`'s output, `[rows, hidden]`.
    pub d_mlp_input: Vec<T>,
    /// `mlp`'s.
    pub mlp: MlpWeightGradInputs<T>,
}

fn zeros<T: Real>(n: usize) -> Vec<T> {
    vec![T::zero(); n]
}

impl<T: Real> Block<T> {
    /// The block `model.layers.{layer}` of `config`, with an MoE `mlp` if `moe` (else the
    /// dense FFN), sharing the rope table `rope` ([`Mla::rope_table`]`(config)`); weights
    /// drawn by `(seed, name)`, norms at 1, selection bias at 0. `recompute` is set on
    /// the block and its attention. An MoE `mlp` holds every routed expert
    /// ([`Block::new_sharded`] with [`ExpertShard::FULL`]).
    pub fn new(
        config: &ModelConfig,
        layer: usize,
        moe: bool,
        seed: u64,
        recompute: bool,
        rope: Arc<RopeTable<T>>,
    ) -> Result<Self, ModelError> {
        Self::new_sharded(config, layer, moe, seed, recompute, rope, ExpertShard::FULL)
    }

    /// [`Block::new`] whose MoE `mlp` holds only the routed experts of `shard`
    /// ([`MoeLayer::new_sharded`]); a dense block ignores `shard`.
    pub fn new_sharded(
        config: &ModelConfig,
        layer: usize,
        moe: bool,
        seed: u64,
        recompute: bool,
        rope: Arc<RopeTable<T>>,
        shard: ExpertShard,
    ) -> Result<Self, ModelError> {
        let prefix = format!("model.layers.{layer}");
        let name = |p: &str| format!("{prefix}.{p}");
        let (hidden, eps) = (config.hidden_size, config.rms_norm_eps);
        let self_attn = Mla::with_rope_table(config, &name("self_attn"), seed, recompute, rope)?;
        let mlp = if moe {
            Mlp::Moe(MoeLayer::new_sharded(config, &name("mlp"), seed, shard)?)
        } else {
            Mlp::Dense(SwiGluFfn::new(
                &name("mlp"),
                hidden,
                config.intermediate_size,
                config.initializer_range,
                seed,
            ))
        };
        Ok(Block {
            input_layernorm: RmsNorm::new(&name("input_layernorm"), hidden, eps),
            self_attn,
            post_attention_layernorm: RmsNorm::new(&name("post_attention_layernorm"), hidden, eps),
            mlp,
            recompute,
            prefix,
            hidden,
        })
    }

    /// The name prefix, `model.layers.{i}`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Model width.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Whether the `mlp` is an MoE layer.
    pub fn is_moe(&self) -> bool {
        matches!(self.mlp, Mlp::Moe(_))
    }

    /// The MoE layer, for MoE blocks.
    pub fn moe(&self) -> Option<&MoeLayer<T>> {
        match &self.mlp {
            Mlp::Moe(m) => Some(m),
            Mlp::Dense(_) => None,
        }
    }

    /// The MoE layer, mutable (for the bias update), for MoE blocks.
    pub fn moe_mut(&mut self) -> Option<&mut MoeLayer<T>> {
        match &mut self.mlp {
            Mlp::Moe(m) => Some(m),
            Mlp::Dense(_) => None,
        }
    }

    /// Sets [`Block::recompute`] and the attention's [`Mla::recompute`].
    pub fn set_recompute(&mut self, recompute: bool) {
        self.recompute = recompute;
        self.self_attn.recompute = recompute;
    }

    /// Sets the precision of the attention's and the FFN's linear layers
    /// ([`crate::precision`]); the norms and the MoE gate stay f32.
    pub fn set_precision(&mut self, precision: Precision) {
        self.self_attn.set_precision(precision);
        match &mut self.mlp {
            Mlp::Dense(ffn) => ffn.set_precision(precision),
            Mlp::Moe(moe) => moe.set_precision(precision),
        }
    }

    /// Runs the norms, the attention and the FFN or MoE layer on `backend`.
    pub fn set_backend(&mut self, backend: flotilla_kernels::backend::DeviceBackend) {
        self.input_layernorm.backend = backend;
        self.post_attention_layernorm.backend = backend;
        self.self_attn.set_backend(backend);
        match &mut self.mlp {
            Mlp::Dense(ffn) => ffn.set_backend(backend),
            Mlp::Moe(moe) => moe.set_backend(backend),
        }
    }

    /// `mlp`'s input `[rows, hidden]` as the FFN or the experts keep it.
    fn cache_mlp_input<'a>(
        &self,
        x: impl Into<Cow<'a, [T]>>,
        rows: usize,
    ) -> Result<CachedActivation<T>, ModelError> {
        match &self.mlp {
            Mlp::Dense(ffn) => ffn.cache_input(x, rows),
            Mlp::Moe(moe) => moe.cache_input(x, rows),
        }
    }

    /// `y = block(x)` for `x`, `y`: `[batch·seq, hidden]` (`y` overwritten), with the MoE
    /// balance loss of weight `balance_alpha` (ignored by dense blocks; 0 disables). An MoE
    /// block moves its routed rows through `exchange` (its EP group; [`crate::moe::LocalExchange`]
    /// when it holds every expert); a dense block never calls it.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &[T],
        batch: usize,
        seq: usize,
        balance_alpha: f64,
        y: &mut [T],
        threads: usize,
        exchange: &mut dyn ExpertExchange,
    ) -> Result<BlockCache<T>, ModelError> {
        self.forward_packed(x, batch, seq, None, balance_alpha, y, threads, exchange)
    }

    /// [`Block::forward`] over a packed batch: attention stays inside each sample of
    /// `packing` ([`Mla::forward_packed`]); the MoE balance loss still treats each packed
    /// sequence as one.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_packed(
        &self,
        x: &[T],
        batch: usize,
        seq: usize,
        packing: Option<&Arc<Packing>>,
        balance_alpha: f64,
        y: &mut [T],
        threads: usize,
        exchange: &mut dyn ExpertExchange,
    ) -> Result<BlockCache<T>, ModelError> {
        let rows = batch.checked_mul(seq).ok_or_else(|| ModelError::Tensor {
            tensor: self.prefix.clone(),
            detail: format!("{batch} × {seq} rows overflow usize"),
        })?;
        let n = rows * self.hidden;
        check_len(&self.prefix, "input", n, x.len())?;
        check_len(&self.prefix, "output", n, y.len())?;

        let mut attn_input = zeros(n);
        let attn_norm = self.input_layernorm.forward(x, rows, &mut attn_input)?;
        let attn_input = self.self_attn.cache_input(attn_input, rows)?;
        let mut h = zeros(n);
        let attn = self.self_attn.forward_packed(&attn_input, batch, seq, packing, &mut h, threads)?;
        h.iter_mut().zip(x).for_each(|(h, &x)| *h = x + *h);

        let (mlp_norm, mlp, mlp_input) =
            self.mlp_forward(&h, batch, seq, balance_alpha, y, threads, exchange)?;

        let (attn_input, mlp_input) =
            if self.recompute { (None, None) } else { (Some(attn_input), Some(mlp_input)) };
        Ok(BlockCache { batch, seq, attn_norm, attn_input, attn, h, mlp_norm, mlp_input, mlp })
    }

    /// Inference: `y = block(x)` for the new tokens of several sequences (`counts[s]` rows
    /// of sequence `s`, in order; `x`, `y`: `[rows, hidden]`), attention through and into
    /// each sequence's cache ([`Mla::forward_cached`]); an MoE block routes every row
    /// through `exchange` with no balance loss.
    pub fn forward_cached(
        &self,
        x: &[T],
        counts: &[usize],
        caches: &mut [MlaKvCache<T>],
        y: &mut [T],
        threads: usize,
        exchange: &mut dyn ExpertExchange,
    ) -> Result<(), ModelError> {
        let rows: usize = counts.iter().sum();
        let n = rows * self.hidden;
        check_len(&self.prefix, "input", n, x.len())?;
        check_len(&self.prefix, "output", n, y.len())?;
        let mut attn_input = zeros(n);
        self.input_layernorm.forward(x, rows, &mut attn_input)?;
        let mut h = zeros(n);
        self.self_attn.forward_cached(&attn_input, counts, caches, &mut h, threads)?;
        h.iter_mut().zip(x).for_each(|(h, &x)| *h = x + *h);
        self.mlp_forward(&h, 1, rows, 0.0, y, threads, exchange)?;
        Ok(())
    }

    /// The block's second half: `y = h + mlp(post_attention_layernorm(h))`, with the norm's
    /// cache, the MLP's cache and its kept input.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn mlp_forward(
        &self,
        h: &[T],
        batch: usize,
        seq: usize,
        balance_alpha: f64,
        y: &mut [T],
        threads: usize,
        exchange: &mut dyn ExpertExchange,
    ) -> Result<(RmsNormCache<T>, MlpCache<T>, CachedActivation<T>), ModelError> {
        let rows = batch * seq;
        let mut mlp_normed = zeros(h.len());
        let mlp_norm = self.post_attention_layernorm.forward(h, rows, &mut mlp_normed)?;
        let (mlp, mlp_input) = match &self.mlp {
            Mlp::Dense(ffn) => {
                let input = ffn.cache_input(mlp_normed, rows)?;
                (MlpCache::Dense(ffn.forward(&input, rows, y, threads)?), input)
            }
            Mlp::Moe(moe) => {
                // The gate reads the f32 values and the experts the kept form, so both
                // live through the forward: the kept form is built from a borrow (a copy
                // under fp32 and bf16).
                let input = moe.cache_input(&mlp_normed, rows)?;
                let cache =
                    moe.forward(&mlp_normed, &input, batch, seq, balance_alpha, y, threads, exchange)?;
                (MlpCache::Moe(cache), input)
            }
        };
        y.iter_mut().zip(h).for_each(|(y, &h)| *y = h + *y);
        Ok((mlp_norm, mlp, mlp_input))
    }

    fn check_cache(&self, cache: &BlockCache<T>, x: &[T]) -> Result<usize, ModelError> {
        let n = cache.rows() * self.hidden;
        check_len(&self.prefix, "input", n, x.len())?;
        check_len(&self.prefix, "cached mid-block residual", n, cache.h.len())?;
        Ok(n)
    }

    fn mismatch(&self) -> ModelError {
        ModelError::Tensor {
            tensor: format!("{}.mlp", self.prefix),
            detail: "the cache or gradients do not match the layer's kind (dense or MoE)".into(),
        }
    }

    /// B: `dx` (`[batch·seq, hidden]`, overwritten) from the output gradient `dy`, given
    /// the forward input `x`; `balance_grad` is the gradient of the total loss with
    /// respect to this block's balance loss (normally 1; ignored by dense blocks and when
    /// its α was 0); an MoE block exchanges its routed rows' gradients through `exchange`
    /// (the forward's group). Returns what [`Block::backward_weight`] needs.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_input(
        &self,
        cache: &BlockCache<T>,
        x: &[T],
        dy: &[T],
        balance_grad: T,
        dx: &mut [T],
        threads: usize,
        exchange: &mut dyn ExpertExchange,
    ) -> Result<BlockWeightGradInputs<T>, ModelError> {
        let n = self.check_cache(cache, x)?;
        check_len(&self.prefix, "output gradient", n, dy.len())?;
        check_len(&self.prefix, "input gradient", n, dx.len())?;

        // y = h + mlp(norm(h)): dh = dy + norm_B(mlp_B(dy)).
        let mut d_mlp_input = zeros(n);
        let mlp = match (&self.mlp, &cache.mlp) {
            (Mlp::Dense(ffn), MlpCache::Dense(c)) => {
                MlpWeightGradInputs::Dense(ffn.backward_input(c, dy, &mut d_mlp_input, false, threads)?)
            }
            (Mlp::Moe(moe), MlpCache::Moe(c)) => MlpWeightGradInputs::Moe(moe.backward_input(
                c,
                dy,
                balance_grad,
                &mut d_mlp_input,
                false,
                threads,
                exchange,
            )?),
            _ => return Err(self.mismatch()),
        };
        let mut dh = dy.to_vec();
        self.post_attention_layernorm.backward_input(
            &cache.mlp_norm,
            &cache.h,
            &d_mlp_input,
            &mut dh,
            true,
        )?;

        // h = x + attn(norm(x)): dx = dh + norm_B(attn_B(dh)).
        let mut d_attn_input = zeros(n);
        let attn = self.self_attn.backward_input(&cache.attn, &dh, &mut d_attn_input, false, threads)?;
        dx.copy_from_slice(&dh);
        self.input_layernorm.backward_input(&cache.attn_norm, x, &d_attn_input, dx, true)?;
        Ok(BlockWeightGradInputs { d_attn_input, attn, d_mlp_input, mlp })
    }

    /// W: accumulates every weight gradient into [`Param::grad`] (the MoE selection bias
    /// gets none); `x` is the forward input. Under recompute the two RMSNorm outputs are
    /// recomputed first.
    pub fn backward_weight(
        &mut self,
        cache: &BlockCache<T>,
        grads: &BlockWeightGradInputs<T>,
        x: &[T],
        threads: usize,
    ) -> Result<(), ModelError> {
        let n = self.check_cache(cache, x)?;
        let rows = cache.rows();
        check_len(&self.prefix, "attention input gradient", n, grads.d_attn_input.len())?;
        check_len(&self.prefix, "mlp input gradient", n, grads.d_mlp_input.len())?;
        let recompute = |norm: &RmsNorm<T>, input: &[T]| -> Result<Vec<T>, ModelError> {
            let mut out = zeros(n);
            norm.forward(input, rows, &mut out)?;
            Ok(out)
        };
        let mlp_normed = || recompute(&self.post_attention_layernorm, &cache.h);
        // Recomputed inputs are kept exactly as forward kept them (quantized the same way).
        let recomputed_mlp;
        let mlp_input = match &cache.mlp_input {
            Some(v) => v,
            None => {
                recomputed_mlp = self.cache_mlp_input(mlp_normed()?, rows)?;
                &recomputed_mlp
            }
        };
        let recomputed_attn;
        let attn_input = match &cache.attn_input {
            Some(v) => v,
            None => {
                recomputed_attn = self.self_attn.cache_input(recompute(&self.input_layernorm, x)?, rows)?;
                &recomputed_attn
            }
        };

        // Reverse order of the forward: mlp, its norm, attention, its norm.
        match (&mut self.mlp, &cache.mlp, &grads.mlp) {
            (Mlp::Dense(ffn), MlpCache::Dense(c), MlpWeightGradInputs::Dense(g)) => {
                ffn.backward_weight(c, g, mlp_input, threads)?
            }
            (Mlp::Moe(moe), MlpCache::Moe(c), MlpWeightGradInputs::Moe(g)) => {
                // The gate's Wgrad reads its input in f32: as kept, or recomputed.
                let gate_input = match mlp_input {
                    CachedActivation::Full(v) => Cow::Borrowed(v.as_slice()),
                    CachedActivation::Fp8 { .. } => Cow::Owned(mlp_normed()?),
                };
                moe.backward_weight(c, g, &gate_input, mlp_input, threads)?
            }
            _ => return Err(self.mismatch()),
        }
        self.post_attention_layernorm.backward_weight(&cache.mlp_norm, &cache.h, &grads.d_mlp_input)?;
        self.self_attn.backward_weight(&cache.attn, &grads.attn, attn_input, threads)?;
        self.input_layernorm.backward_weight(&cache.attn_norm, x, &grads.d_attn_input)?;
        Ok(())
    }

    /// Every parameter a checkpoint holds, in HF order: `input_layernorm`, `self_attn.*`,
    /// `post_attention_layernorm`, `mlp.*` (the MoE selection bias included).
    pub fn params(&self) -> Vec<&Param<T>> {
        let mut out = vec![&self.input_layernorm.weight];
        out.extend(self.self_attn.params());
        out.push(&self.post_attention_layernorm.weight);
        match &self.mlp {
            Mlp::Dense(ffn) => {
                out.extend([&ffn.gate_proj.weight, &ffn.up_proj.weight, &ffn.down_proj.weight])
            }
            Mlp::Moe(moe) => out.extend(moe.params()),
        }
        out
    }

    /// The parameters an optimizer updates: [`Block::params`] without the MoE selection
    /// bias (as [`MoeLayer::params_mut`]).
    pub fn trainable_params_mut(&mut self) -> Vec<&mut Param<T>> {
        let mut out = vec![&mut self.input_layernorm.weight];
        out.extend(self.self_attn.params_mut());
        out.push(&mut self.post_attention_layernorm.weight);
        match &mut self.mlp {
            Mlp::Dense(ffn) => out.extend(ffn.params_mut()),
            Mlp::Moe(moe) => out.extend(moe.params_mut()),
        }
        out
    }

    /// Every parameter of [`Block::params`], mutable, the MoE selection bias included (for
    /// checkpoint loading; optimizers use [`Block::trainable_params_mut`]).
    pub fn params_mut(&mut self) -> Vec<&mut Param<T>> {
        let mut out = vec![&mut self.input_layernorm.weight];
        out.extend(self.self_attn.params_mut());
        out.push(&mut self.post_attention_layernorm.weight);
        match &mut self.mlp {
            Mlp::Dense(ffn) => out.extend(ffn.params_mut()),
            Mlp::Moe(moe) => {
                let MoeLayer { gate, e_score_correction_bias, shared_experts, experts, .. } = moe;
                out.push(gate);
                out.push(e_score_correction_bias);
                for ffn in shared_experts.iter_mut().chain(experts.iter_mut()) {
                    out.extend(ffn.params_mut());
                }
            }
        }
        out
    }
}
