//! Multi-Token Prediction modules (DeepSeek-V3 report §2.2; DESIGN §1.1).
//!
//! ## Computation
//! Module `k` (1-based, `k = 1..=D`, `D = num_nextn_predict_layers`) maps, at every input
//! position `i` of a sequence,
//!
//! ```text
//! h'_i   = eh_proj( concat[ enorm(Emb(t_{i+k})), hnorm(h^{k−1}_i) ] )   [2·hidden → hidden]
//! h^k_i  = block(h')_i                                                   (a full decoder layer)
//! logits = head( shared_head.norm(h^k_i) )                              predicting t_{i+k+1}
//! ```
//!
//! with `Emb` and `head` the main model's embedding and output head, **shared**: a module
//! holds no copy of either, and its gradients flow into the main model's (and, through
//! `h^{k−1}`, into the main model's blocks). The module here is the part from `enorm` /
//! `hnorm` to the block's output `h^k`; its `shared_head.norm` is a field the caller
//! applies before the shared head (as for the main model's `model.norm`), since `h^k`
//! also feeds module `k + 1`.
//!
//! ## Layout choices
//! - **Concatenation order: embedding first.** The report writes
//!   `[RMSNorm(h^{k−1}_i); RMSNorm(Emb(t_{i+k}))]`, but DeepSeek's released weights are
//!   used, by vLLM's `deepseek_mtp` (and SGLang), as
//!   `eh_proj(cat([enorm(inputs_embeds), hnorm(previous_hidden_states)]))`: columns
//!   `0..hidden` of `eh_proj.weight` multiply the normalized embedding and columns
//!   `hidden..2·hidden` the normalized hidden state. flotilla follows the released
//!   layout, so a released checkpoint's MTP weights mean the same here.
//! - **`h^0` is the main model's last hidden state before `model.norm`** (the residual
//!   stream after the last block), and `h^{k−1}` for `k > 1` likewise the previous
//!   module's block output before its `shared_head.norm`. vLLM feeds the target model's
//!   returned hidden states, which are after `model.norm`; since `hnorm` is itself an
//!   RMSNorm, `hnorm(norm(h))` and `hnorm(h)` differ only by `model.norm`'s per-channel
//!   weight (exactly equal while it is 1, as at initialization, up to eps).
//! - **Stored as HF layer `num_hidden_layers + k − 1`** (DeepSeek-V3's one module is layer
//!   61): `model.layers.{L+k−1}.{enorm, hnorm, eh_proj, shared_head.norm}.weight` and the
//!   block's `input_layernorm`, `self_attn.*`, `post_attention_layernorm`, `mlp.*` under
//!   the same prefix. `eh_proj.weight` is `[hidden, 2·hidden]`. The block's `mlp` is MoE
//!   whenever the model has routed experts (`n_routed_experts > 0`), dense otherwise.
//!   HF checkpoints also store `embed_tokens` and `shared_head.head` under each module's
//!   layer; those are the main model's and are not parameters here.
//! - vLLM zeroes the embedding at position 0 (an inference-only convenience of its
//!   speculative decoding); training does not.
//!
//! ## Positions and targets
//! A training window holds `S + 1 + D` tokens (see [`crate::data::Window`]); module `k`
//! reads `t_{i+k}` and predicts `t_{i+k+1}` for every position `i = 0..S`, so every
//! position of every module has its target. The block attends causally over positions
//! `0..S`, as the main model's.
//!
//! ## Backward
//! [`MtpModule::backward_input`] (B) returns the gradients at both inputs (`h^{k−1}` and
//! the embedding rows) and a [`MtpWeightGradInputs`]; [`MtpModule::backward_weight`] (W)
//! accumulates the weight gradients. The concatenated norm outputs (`eh_proj`'s input)
//! are kept as `eh_proj` keeps its input (FP8 under fp8, [`crate::precision`]); with
//! `recompute` the cache drops them, and W recomputes them (kept the same way). The block
//! recomputes as [`Block`] does.

use crate::block::{Block, BlockCache, BlockWeightGradInputs};
use crate::config::ModelConfig;
use crate::linear::Linear;
use crate::mla::MlaKvCache;
use crate::moe::{ExpertExchange, ExpertShard};
use crate::norm::{RmsNorm, RmsNormCache};
use crate::packing::Packing;
use crate::param::Param;
use crate::precision::{CacheBytes, CachedActivation, Precision};
use crate::{ModelError, Real, check_len};
use flotilla_kernels::rope::RopeTable;
use std::sync::Arc;

/// One MTP module (see the module docs).
#[derive(Clone, Debug)]
pub struct MtpModule<T> {
    /// `{prefix}.enorm.weight`: RMSNorm of the shifted token's embedding.
    pub enorm: RmsNorm<T>,
    /// `{prefix}.hnorm.weight`: RMSNorm of the previous depth's hidden state.
    pub hnorm: RmsNorm<T>,
    /// `{prefix}.eh_proj.weight`, `[hidden, 2·hidden]`: the projection `M_k`.
    pub eh_proj: Linear<T>,
    /// The decoder layer, `{prefix}.{input_layernorm, self_attn, post_attention_layernorm, mlp}`.
    pub block: Block<T>,
    /// `{prefix}.shared_head.norm.weight`: applied by the caller to the module's output
    /// before the shared output head.
    pub shared_head_norm: RmsNorm<T>,
    /// Whether forward drops `eh_proj`'s input for W to recompute. See
    /// [`MtpModule::set_recompute`].
    pub recompute: bool,
    depth: usize,
    layer: usize,
    hidden: usize,
}

/// What [`MtpModule::forward`] keeps for backward.
#[derive(Clone, Debug, PartialEq)]
pub struct MtpCache<T> {
    /// Sequences of the call.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// `enorm`'s `rstd`.
    pub enorm: RmsNormCache<T>,
    /// `hnorm`'s `rstd`.
    pub hnorm: RmsNormCache<T>,
    /// `[enorm(emb) | hnorm(h)]` per row, `[rows, 2·hidden]`, as `eh_proj` keeps its
    /// input; `None` under recompute.
    pub concat: Option<CachedActivation<T>>,
    /// `eh_proj`'s output, the block's input, `[rows, hidden]`.
    pub block_input: Vec<T>,
    /// The block's cache.
    pub block: BlockCache<T>,
}

impl<T: Real> MtpCache<T> {
    /// Tokens of the call.
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }

    /// The bytes held.
    pub fn bytes(&self) -> CacheBytes {
        let floats = self.enorm.rstd.len() + self.hnorm.rstd.len() + self.block_input.len();
        CacheBytes::of::<T>(floats)
            + self.concat.as_ref().map_or(CacheBytes::default(), |c| c.bytes())
            + self.block.bytes()
    }
}

/// What B hands to W.
#[derive(Clone, Debug, PartialEq)]
pub struct MtpWeightGradInputs<T> {
    /// The block's.
    pub block: BlockWeightGradInputs<T>,
    /// Gradient at `eh_proj`'s output, `[rows, hidden]`.
    pub d_block_input: Vec<T>,
    /// Gradient at `enorm`'s output, `[rows, hidden]`.
    pub d_emb_normed: Vec<T>,
    /// Gradient at `hnorm`'s output, `[rows, hidden]`.
    pub d_hidden_normed: Vec<T>,
}

fn zeros<T: Real>(n: usize) -> Vec<T> {
    vec![T::zero(); n]
}

impl<T: Real> MtpModule<T> {
    /// Module `depth` (1-based, `1..=num_nextn_predict_layers`) of `config`, named
    /// `model.layers.{num_hidden_layers + depth − 1}`, sharing the rope table `rope`;
    /// weights drawn by `(seed, name)`, norms at 1. An MoE block holds every routed
    /// expert ([`MtpModule::new_sharded`] with [`ExpertShard::FULL`]).
    pub fn new(
        config: &ModelConfig,
        depth: usize,
        seed: u64,
        recompute: bool,
        rope: Arc<RopeTable<T>>,
    ) -> Result<Self, ModelError> {
        Self::new_sharded(config, depth, seed, recompute, rope, ExpertShard::FULL)
    }

    /// [`MtpModule::new`] whose block's MoE layer holds only the routed experts of `shard`
    /// ([`Block::new_sharded`]).
    pub fn new_sharded(
        config: &ModelConfig,
        depth: usize,
        seed: u64,
        recompute: bool,
        rope: Arc<RopeTable<T>>,
        shard: ExpertShard,
    ) -> Result<Self, ModelError> {
        if depth == 0 || depth > config.num_nextn_predict_layers {
            return Err(ModelError::Tensor {
                tensor: "mtp".into(),
                detail: format!(
                    "MTP depth {depth} is outside 1..={} (num_nextn_predict_layers)",
                    config.num_nextn_predict_layers
                ),
            });
        }
        let layer = config.num_hidden_layers + depth - 1;
        let prefix = format!("model.layers.{layer}");
        let name = |p: &str| format!("{prefix}.{p}");
        let (hidden, eps) = (config.hidden_size, config.rms_norm_eps);
        let moe = config.n_routed_experts > 0;
        let block = Block::new_sharded(config, layer, moe, seed, recompute, rope, shard)?;
        Ok(MtpModule {
            enorm: RmsNorm::new(&name("enorm"), hidden, eps),
            hnorm: RmsNorm::new(&name("hnorm"), hidden, eps),
            eh_proj: Linear::new(&name("eh_proj"), 2 * hidden, hidden, config.initializer_range, seed),
            block,
            shared_head_norm: RmsNorm::new(&name("shared_head.norm"), hidden, eps),
            recompute,
            depth,
            layer,
            hidden,
        })
    }

    /// The depth `k` (1-based).
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// The HF layer index, `num_hidden_layers + k − 1`.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// Sets the module's and its block's recomputation.
    pub fn set_recompute(&mut self, recompute: bool) {
        self.recompute = recompute;
        self.block.set_recompute(recompute);
    }

    /// Sets the precision of `eh_proj` and of the block's linear layers
    /// ([`crate::precision`]).
    pub fn set_precision(&mut self, precision: Precision) {
        self.eh_proj.precision = precision;
        self.block.set_precision(precision);
    }

    /// Runs the module's norms, `eh_proj` and its block on `backend`.
    pub fn set_backend(&mut self, backend: flotilla_kernels::backend::DeviceBackend) {
        for norm in [&mut self.enorm, &mut self.hnorm, &mut self.shared_head_norm] {
            norm.backend = backend;
        }
        self.eh_proj.backend = backend;
        self.block.set_backend(backend);
    }

    fn rows(&self, batch: usize, seq: usize) -> Result<usize, ModelError> {
        batch.checked_mul(seq).ok_or_else(|| ModelError::Tensor {
            tensor: format!("model.layers.{}.eh_proj", self.layer),
            detail: format!("{batch} × {seq} rows overflow usize"),
        })
    }

    /// `[enorm(emb) | hnorm(h_prev)]` per row as `eh_proj` keeps its input, with both
    /// norms' caches (`enorm`'s, then `hnorm`'s).
    #[allow(clippy::type_complexity)]
    fn concat(
        &self,
        h_prev: &[T],
        emb: &[T],
        rows: usize,
    ) -> Result<(CachedActivation<T>, RmsNormCache<T>, RmsNormCache<T>), ModelError> {
        let h = self.hidden;
        let mut e_normed = zeros(rows * h);
        let enorm = self.enorm.forward(emb, rows, &mut e_normed)?;
        let mut h_normed = zeros(rows * h);
        let hnorm = self.hnorm.forward(h_prev, rows, &mut h_normed)?;
        let mut concat = Vec::with_capacity(rows * 2 * h);
        for (e, hh) in e_normed.chunks_exact(h).zip(h_normed.chunks_exact(h)) {
            concat.extend_from_slice(e);
            concat.extend_from_slice(hh);
        }
        Ok((self.eh_proj.cache_input(concat, rows)?, enorm, hnorm))
    }

    /// `h^k` into `out` (`[batch·seq, hidden]`, overwritten) from the previous depth's
    /// hidden state `h_prev` and the embeddings `emb` of the tokens `t_{i+k}` (both
    /// `[batch·seq, hidden]`), with the block's balance loss of weight `balance_alpha`; an
    /// MoE block moves its routed rows through `exchange` ([`Block::forward`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        h_prev: &[T],
        emb: &[T],
        batch: usize,
        seq: usize,
        balance_alpha: f64,
        out: &mut [T],
        threads: usize,
        exchange: &mut dyn ExpertExchange,
    ) -> Result<MtpCache<T>, ModelError> {
        self.forward_packed(h_prev, emb, batch, seq, None, balance_alpha, out, threads, exchange)
    }

    /// [`MtpModule::forward`] over a packed batch: the block's attention stays inside each
    /// sample of `packing` ([`Block::forward_packed`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_packed(
        &self,
        h_prev: &[T],
        emb: &[T],
        batch: usize,
        seq: usize,
        packing: Option<&Arc<Packing>>,
        balance_alpha: f64,
        out: &mut [T],
        threads: usize,
        exchange: &mut dyn ExpertExchange,
    ) -> Result<MtpCache<T>, ModelError> {
        let rows = self.rows(batch, seq)?;
        let n = rows * self.hidden;
        check_len(&self.hnorm.weight.name, "previous hidden state", n, h_prev.len())?;
        check_len(&self.enorm.weight.name, "embeddings", n, emb.len())?;
        check_len(&self.eh_proj.weight.name, "module output", n, out.len())?;
        let (concat, enorm, hnorm) = self.concat(h_prev, emb, rows)?;
        let mut block_input = zeros(n);
        self.eh_proj.forward_from(&concat, rows, &mut block_input, threads)?;
        let block = self.block.forward_packed(
            &block_input,
            batch,
            seq,
            packing,
            balance_alpha,
            out,
            threads,
            exchange,
        )?;
        let concat = (!self.recompute).then_some(concat);
        Ok(MtpCache { batch, seq, enorm, hnorm, concat, block_input, block })
    }

    /// Inference: `h^k` into `out` for the new positions of several sequences
    /// (`counts[s]` rows of sequence `s`, in order), attention through each sequence's
    /// cache of this module's block ([`Block::forward_cached`]); `h_prev` and `emb` as in
    /// [`MtpModule::forward`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward_cached(
        &self,
        h_prev: &[T],
        emb: &[T],
        counts: &[usize],
        caches: &mut [MlaKvCache<T>],
        out: &mut [T],
        threads: usize,
        exchange: &mut dyn ExpertExchange,
    ) -> Result<(), ModelError> {
        let rows: usize = counts.iter().sum();
        let n = rows * self.hidden;
        check_len(&self.hnorm.weight.name, "previous hidden state", n, h_prev.len())?;
        check_len(&self.enorm.weight.name, "embeddings", n, emb.len())?;
        let (concat, _, _) = self.concat(h_prev, emb, rows)?;
        let mut block_input = zeros(n);
        self.eh_proj.forward_from(&concat, rows, &mut block_input, threads)?;
        self.block.forward_cached(&block_input, counts, caches, out, threads, exchange)
    }

    /// B: from `d_out`, the gradient at `h^k`, writes (overwriting) the gradients at the
    /// inputs, `d_h_prev` and `d_emb` (`[batch·seq, hidden]`); `h_prev` and `emb` are the
    /// forward inputs, `balance_grad` the gradient of the total loss with respect to the
    /// block's balance loss; an MoE block exchanges through `exchange` (the forward's group).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_input(
        &self,
        cache: &MtpCache<T>,
        h_prev: &[T],
        emb: &[T],
        d_out: &[T],
        balance_grad: T,
        d_h_prev: &mut [T],
        d_emb: &mut [T],
        threads: usize,
        exchange: &mut dyn ExpertExchange,
    ) -> Result<MtpWeightGradInputs<T>, ModelError> {
        let rows = cache.rows();
        let h = self.hidden;
        let n = rows * h;
        check_len(&self.eh_proj.weight.name, "output gradient", n, d_out.len())?;
        check_len(&self.eh_proj.weight.name, "cached block input", n, cache.block_input.len())?;
        check_len(&self.hnorm.weight.name, "previous hidden state gradient", n, d_h_prev.len())?;
        check_len(&self.enorm.weight.name, "embedding gradient", n, d_emb.len())?;

        let mut d_block_input = zeros(n);
        let block = self.block.backward_input(
            &cache.block,
            &cache.block_input,
            d_out,
            balance_grad,
            &mut d_block_input,
            threads,
            exchange,
        )?;
        let mut d_concat = zeros(2 * n);
        self.eh_proj.backward_input(&d_block_input, rows, &mut d_concat, false, threads)?;
        let mut d_emb_normed = Vec::with_capacity(n);
        let mut d_hidden_normed = Vec::with_capacity(n);
        for row in d_concat.chunks_exact(2 * h) {
            d_emb_normed.extend_from_slice(&row[..h]);
            d_hidden_normed.extend_from_slice(&row[h..]);
        }
        drop(d_concat);
        self.enorm.backward_input(&cache.enorm, emb, &d_emb_normed, d_emb, false)?;
        self.hnorm.backward_input(&cache.hnorm, h_prev, &d_hidden_normed, d_h_prev, false)?;
        Ok(MtpWeightGradInputs { block, d_block_input, d_emb_normed, d_hidden_normed })
    }

    /// W: accumulates the weight gradients of the block, `eh_proj`, `enorm` and `hnorm`
    /// (not of `shared_head_norm`, which the caller applies); `h_prev` and `emb` are the
    /// forward inputs.
    pub fn backward_weight(
        &mut self,
        cache: &MtpCache<T>,
        grads: &MtpWeightGradInputs<T>,
        h_prev: &[T],
        emb: &[T],
        threads: usize,
    ) -> Result<(), ModelError> {
        let rows = cache.rows();
        let n = rows * self.hidden;
        check_len(&self.hnorm.weight.name, "previous hidden state", n, h_prev.len())?;
        check_len(&self.enorm.weight.name, "embeddings", n, emb.len())?;
        self.block.backward_weight(&cache.block, &grads.block, &cache.block_input, threads)?;
        let recomputed;
        let concat = match &cache.concat {
            Some(c) => c,
            None => {
                recomputed = self.concat(h_prev, emb, rows)?.0;
                &recomputed
            }
        };
        let x = concat.wgrad_input(&self.eh_proj.backend)?;
        self.eh_proj.backward_weight_from(&grads.d_block_input, &x, rows, threads)?;
        self.enorm.backward_weight(&cache.enorm, emb, &grads.d_emb_normed)?;
        self.hnorm.backward_weight(&cache.hnorm, h_prev, &grads.d_hidden_normed)?;
        Ok(())
    }

    /// Every parameter a checkpoint holds (the shared embedding and head excluded), in
    /// order: `enorm`, `hnorm`, `eh_proj`, the block's ([`Block::params`]),
    /// `shared_head.norm`.
    pub fn params(&self) -> Vec<&Param<T>> {
        let mut out = vec![&self.enorm.weight, &self.hnorm.weight, &self.eh_proj.weight];
        out.extend(self.block.params());
        out.push(&self.shared_head_norm.weight);
        out
    }

    /// The parameters an optimizer updates: [`MtpModule::params`] without the MoE
    /// selection bias.
    pub fn trainable_params_mut(&mut self) -> Vec<&mut Param<T>> {
        let mut out = vec![&mut self.enorm.weight, &mut self.hnorm.weight, &mut self.eh_proj.weight];
        out.extend(self.block.trainable_params_mut());
        out.push(&mut self.shared_head_norm.weight);
        out
    }

    /// Every parameter of [`MtpModule::params`], mutable, the selection bias included.
    pub fn params_mut(&mut self) -> Vec<&mut Param<T>> {
        let mut out = vec![&mut self.enorm.weight, &mut self.hnorm.weight, &mut self.eh_proj.weight];
        out.extend(self.block.params_mut());
        out.push(&mut self.shared_head_norm.weight);
        out
    }
}
