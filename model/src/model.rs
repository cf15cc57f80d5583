//! The whole DeepSeek-V3 model: embedding, blocks, final norm, output head and MTP
//! modules, with the training loss and its full backward (DeepSeek-V3 report §2; DESIGN
//! §1.1).
//!
//! ## Parameters (HF names)
//! `model.embed_tokens.weight` `[vocab, hidden]`; blocks `model.layers.{0..L}` ([`Block`]:
//! dense FFN for the first `first_k_dense_replace`, MoE after); `model.norm.weight`;
//! `lm_head.weight` `[vocab, hidden]`, absent when `tie_word_embeddings` (the head then
//! multiplies by the embedding matrix); MTP modules `model.layers.{L..L+D}` ([`MtpModule`],
//! sharing the embedding and the head). [`Model::params`] lists every tensor in layer
//! order: `embed_tokens`, the main blocks, the MTP modules, `model.norm`, `lm_head`.
//!
//! ## Loss
//! For windows of `S + 1 + D` tokens (`D` = MTP depth; [`crate::data::Window`]) the inputs
//! are the first `S` tokens of each window, and with `T = windows·S` positions,
//!
//! ```text
//! L = CE_main + (λ/D)·Σ_k CE_k + Σ_{MoE layers, main and MTP} L_bal
//! ```
//!
//! `CE_main` is the mean over the `T` positions of the cross-entropy of `t_{i+1}` under the
//! main head, `CE_k` the same for module `k` predicting `t_{i+k+1}`, λ =
//! [`LossConfig::mtp_lambda`] (the MTP term is absent when `D = 0`), and `L_bal` each MoE
//! layer's sequence-wise balance loss of weight α = [`LossConfig::balance_alpha`] (the
//! mean over the call's sequences, see [`crate::moe`]; α = 0 disables it).
//!
//! A packed SFT batch ([`Model::forward_backward_packed`], [`crate::packing`]) replaces
//! each mean over positions by a weighted sum: the weights are 0 where the target is not a
//! response token of the position's own sample, and normalize per token or per sample over
//! the step's batch; attention then stays inside each sample.
//!
//! ## Backward
//! [`Model::forward_backward`] runs the forward (keeping every layer's cache and input),
//! the fused cross-entropy forward/backward of every head (llm.c's in-place classifier:
//! the logits buffer becomes their gradient), then B and W of every layer in reverse
//! order: MTP modules `D..1` (head, `shared_head.norm`, module, the embedding's rows of
//! `t_{i+k}`), the main head and `model.norm`, blocks `L−1..0`, the embedding. The
//! gradient at `h^k` sums its head's and module `k + 1`'s. Gradients **accumulate** into
//! [`Param::grad`], so micro-batches add up; the caller scales them and clears them
//! ([`Model::zero_grad`]). The logits gradients of all `D + 1` heads live until the
//! backward, `(D + 1)·T·vocab` elements.
//!
//! ## Determinism
//! Every layer's results are independent of `threads` (see the layers' docs), and every
//! accumulation runs in a fixed order, so losses and gradients are bit-identical for
//! every thread count.

use crate::block::{Block, BlockCache};
use crate::config::ModelConfig;
use crate::embedding::Embedding;
use crate::linear::Linear;
use crate::mla::{Mla, MlaDims, MlaKvCache};
use crate::moe::{LocalExchange, MoeLayer};
use crate::mtp::{MtpCache, MtpModule};
use crate::norm::{RmsNorm, RmsNormCache};
use crate::packing::{Packing, Sft};
use crate::param::Param;
use crate::precision::{CacheBytes, Precision, check_precision};
use crate::{ModelError, Real, check_len};
use flotilla_kernels::backend::{Backend, DeviceBackend};
use flotilla_kernels::gemm::{MatMut, MatRef};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The weights of the loss terms.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// λ, the weight of the mean MTP loss (report: 0.3 for the first 10T tokens, 0.1
    /// after).
    pub mtp_lambda: f64,
    /// α, the weight of the sequence-wise balance loss in every MoE layer (report:
    /// 0.0001); 0 disables it.
    pub balance_alpha: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig { mtp_lambda: 0.3, balance_alpha: 1e-4 }
    }
}

impl LossConfig {
    /// Checks that both weights are finite and ≥ 0.
    pub fn validate(&self) -> Result<(), ModelError> {
        for (name, v) in [("mtp_lambda", self.mtp_lambda), ("balance_alpha", self.balance_alpha)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ModelError::Tensor {
                    tensor: format!("loss.{name}"),
                    detail: format!("must be finite and ≥ 0, got {v}"),
                });
            }
        }
        Ok(())
    }
}

/// What one forward (and backward) pass measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// The total loss `CE_main + (λ/D)·Σ_k CE_k + Σ L_bal`.
    pub loss: f64,
    /// `CE_main`, the mean next-token cross-entropy of the main head.
    pub main_ce: f64,
    /// `CE_k` for each MTP depth `k = 1..=D` (unweighted).
    pub mtp_ce: Vec<f64>,
    /// `Σ L_bal` over every MoE layer (main and MTP), α included.
    pub balance_loss: f64,
    /// Positions scored per head, `windows · seq_len`.
    pub tokens: usize,
    /// The HF layer index of each entry of `expert_loads`: MoE blocks of the main model,
    /// then the MTP modules' (the order of [`Model::moe_layers_mut`]).
    pub moe_layers: Vec<usize>,
    /// Tokens routed to each expert, per MoE layer, `[moe layers][n_routed_experts]`.
    pub expert_loads: Vec<Vec<u64>>,
}

impl StepStats {
    /// Folds in another micro-batch's statistics: losses become the token-weighted means,
    /// tokens and expert loads add up. A default (empty) `self` becomes `other`.
    pub fn merge(&mut self, other: &StepStats) -> Result<(), ModelError> {
        if self.tokens == 0 && self.moe_layers.is_empty() && self.mtp_ce.is_empty() {
            *self = other.clone();
            return Ok(());
        }
        let shape_ok = self.moe_layers == other.moe_layers
            && self.mtp_ce.len() == other.mtp_ce.len()
            && self.expert_loads.iter().zip(&other.expert_loads).all(|(a, b)| a.len() == b.len());
        if !shape_ok {
            return Err(ModelError::Tensor {
                tensor: "step statistics".into(),
                detail: "cannot merge statistics of models with different MoE layers or MTP depths".into(),
            });
        }
        let total = self.tokens + other.tokens;
        if total > 0 {
            let (a, b) = (self.tokens as f64 / total as f64, other.tokens as f64 / total as f64);
            let mix = |x: f64, y: f64| a * x + b * y;
            self.loss = mix(self.loss, other.loss);
            self.main_ce = mix(self.main_ce, other.main_ce);
            self.balance_loss = mix(self.balance_loss, other.balance_loss);
            for (x, &y) in self.mtp_ce.iter_mut().zip(&other.mtp_ce) {
                *x = mix(*x, y);
            }
        }
        self.tokens = total;
        for (la, lb) in self.expert_loads.iter_mut().zip(&other.expert_loads) {
            la.iter_mut().zip(lb).for_each(|(x, &y)| *x += y);
        }
        Ok(())
    }
}

/// The DeepSeek-V3 model (see the module docs).
#[derive(Clone, Debug)]
pub struct Model<T> {
    /// `model.embed_tokens.weight`.
    pub embed_tokens: Embedding<T>,
    /// `model.layers.{0..num_hidden_layers}`.
    pub layers: Vec<Block<T>>,
    /// `model.norm.weight`.
    pub norm: RmsNorm<T>,
    /// `lm_head.weight`; `None` when the head is tied to the embedding.
    pub lm_head: Option<Linear<T>>,
    /// The MTP modules, depth 1 first (`model.layers.{L..L+D}`).
    pub mtp: Vec<MtpModule<T>>,
    config: ModelConfig,
    precision: Precision,
    /// The backend every layer, the heads and the losses run on ([`Model::set_backend`]).
    backend: DeviceBackend,
}

/// One head's forward: the norm's cache and output, and (training) the logits gradient.
pub(crate) struct HeadPass<T> {
    pub(crate) norm: RmsNormCache<T>,
    pub(crate) normed: Vec<T>,
    pub(crate) dlogits: Vec<T>,
}

/// Applies `norm` and the head `w` (`[vocab, hidden]`) to `h` and scores `targets`; with
/// `train`, the logits are overwritten by their gradient, scaled by `scale`. Returns the
/// mean CE, or with `weights` (one per row, a packed batch's [`crate::packing::loss_weights`])
/// the weighted sum `Σ w_i·CE_i`, whose gradient rows are then scaled by `scale·w_i`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn head_pass<T: Real>(
    be: &DeviceBackend,
    w: &Param<T>,
    norm: &RmsNorm<T>,
    h: &[T],
    rows: usize,
    targets: &[u32],
    weights: Option<&[T]>,
    scale: T,
    train: bool,
    threads: usize,
) -> Result<(T, HeadPass<T>), ModelError> {
    let vocab = w.shape[0];
    if let Some(weights) = weights {
        check_len(&w.name, "loss weights", rows, weights.len())?;
    }
    let mut normed = zeros(h.len());
    let norm_cache = norm.forward(h, rows, &mut normed)?;
    let mut logits = zeros(rows * vocab);
    head_forward(be, w, &normed, rows, &mut logits, threads)?;
    let mut losses = zeros(rows);
    let weighted = |losses: &[T], weights: &[T]| {
        losses
            .iter()
            .zip(weights)
            .fold(T::zero(), |acc, (&l, &w)| if w == T::zero() { acc } else { acc + w * l })
    };
    let loss = match (train, weights) {
        (true, None) => {
            be.cross_entropy_forward_backward_in_place(&mut logits, targets, rows, vocab, scale, &mut losses)?
        }
        (true, Some(weights)) => {
            be.cross_entropy_forward_backward_in_place(
                &mut logits,
                targets,
                rows,
                vocab,
                T::one(),
                &mut losses,
            )?;
            for (row, &wi) in logits.chunks_exact_mut(vocab).zip(weights) {
                let f = scale * wi;
                row.iter_mut().for_each(|g| *g = *g * f);
            }
            weighted(&losses, weights)
        }
        (false, weights) => {
            let loss = be.cross_entropy_forward(&logits, targets, rows, vocab, &mut losses)?;
            logits = Vec::new();
            weights.map_or(loss, |w| weighted(&losses, w))
        }
    };
    Ok((loss, HeadPass { norm: norm_cache, normed, dlogits: logits }))
}

/// A packed batch's loss weights for the head `offset` tokens ahead, in `T`.
pub(crate) fn packed_weights<T: Real>(
    sft: Option<&Sft<'_>>,
    seq: usize,
    offset: usize,
) -> Result<Option<Vec<T>>, ModelError> {
    sft.map(|s| {
        crate::packing::loss_weights(s, seq, offset).into_iter().map(|w| cast(w, "loss weight")).collect()
    })
    .transpose()
}

/// The packing of a packed batch's windows (one mask per window, each covering it).
pub(crate) fn packing_of(
    sft: Option<&Sft<'_>>,
    windows: usize,
    seq: usize,
    window_len: usize,
) -> Result<Option<Arc<Packing>>, ModelError> {
    let Some(sft) = sft else { return Ok(None) };
    if sft.masks.len() != windows {
        return Err(ModelError::Tensor {
            tensor: "sample masks".into(),
            detail: format!("{} masks for {windows} windows", sft.masks.len()),
        });
    }
    Ok(Some(Arc::new(Packing::new(sft.masks, seq, window_len)?)))
}

/// One MTP module's forward.
struct MtpPass<T> {
    /// The tokens `t_{i+k}` whose embeddings enter.
    tokens: Vec<u32>,
    /// Their embeddings.
    emb: Vec<T>,
    /// The module's output `h^k`.
    h: Vec<T>,
    cache: MtpCache<T>,
}

/// Everything a training forward keeps.
struct Activations<T> {
    batch: usize,
    seq: usize,
    /// The input tokens, `[batch·seq]`.
    inputs: Vec<u32>,
    /// `xs[i]` is block `i`'s input; `xs[L]` is `h^0`.
    xs: Vec<Vec<T>>,
    blocks: Vec<BlockCache<T>>,
    /// The main head first, then MTP depth 1..=D.
    heads: Vec<HeadPass<T>>,
    mtp: Vec<MtpPass<T>>,
}

impl<T: Real> Activations<T> {
    /// The bytes held: everything the backward reads, the logits gradients included.
    fn bytes(&self) -> CacheBytes {
        let heads = self
            .heads
            .iter()
            .map(|p| CacheBytes::of::<T>(p.norm.rstd.len() + p.normed.len() + p.dlogits.len()));
        let mtp = self.mtp.iter().map(|p| {
            CacheBytes::of::<u32>(p.tokens.len())
                + CacheBytes::of::<T>(p.emb.len() + p.h.len())
                + p.cache.bytes()
        });
        CacheBytes::of::<u32>(self.inputs.len())
            + CacheBytes::of::<T>(self.xs.iter().map(Vec::len).sum())
            + self.blocks.iter().map(BlockCache::bytes).sum()
            + heads.sum()
            + mtp.sum()
    }
}

fn zeros<T: Real>(n: usize) -> Vec<T> {
    vec![T::zero(); n]
}

fn to_f64<T: Real>(v: T) -> f64 {
    v.to_f64().unwrap_or(f64::NAN)
}

pub(crate) fn cast<T: Real>(v: f64, what: &str) -> Result<T, ModelError> {
    T::from(v).ok_or_else(|| ModelError::Tensor {
        tensor: what.into(),
        detail: format!("{v} does not convert to the element type"),
    })
}

/// `y = x·Wᵀ` with `W: [vocab, hidden]` (the head or the tied embedding).
fn head_forward<T: Real>(
    be: &DeviceBackend,
    w: &Param<T>,
    x: &[T],
    rows: usize,
    y: &mut [T],
    threads: usize,
) -> Result<(), ModelError> {
    let (vocab, hidden) = (w.shape[0], w.shape[1]);
    check_len(&w.name, "head input", rows * hidden, x.len())?;
    check_len(&w.name, "logits", rows * vocab, y.len())?;
    be.matmul(
        MatMut::row_major(y, rows, vocab, "logits")?,
        T::zero(),
        MatRef::row_major(x, rows, hidden, "x")?,
        MatRef::row_major(w.value.host(), vocab, hidden, "head")?.t(),
        T::one(),
        threads,
    )?;
    Ok(())
}

/// B of the head: `dx = dlogits·W`.
pub(crate) fn head_backward_input<T: Real>(
    be: &DeviceBackend,
    w: &Param<T>,
    dlogits: &[T],
    rows: usize,
    dx: &mut [T],
    threads: usize,
) -> Result<(), ModelError> {
    let (vocab, hidden) = (w.shape[0], w.shape[1]);
    check_len(&w.name, "logits gradient", rows * vocab, dlogits.len())?;
    check_len(&w.name, "head input gradient", rows * hidden, dx.len())?;
    be.matmul(
        MatMut::row_major(dx, rows, hidden, "dx")?,
        T::zero(),
        MatRef::row_major(dlogits, rows, vocab, "dlogits")?,
        MatRef::row_major(w.value.host(), vocab, hidden, "head")?,
        T::one(),
        threads,
    )?;
    Ok(())
}

/// W of the head: `grad += dlogitsᵀ·x`.
pub(crate) fn head_backward_weight<T: Real>(
    be: &DeviceBackend,
    w: &mut Param<T>,
    dlogits: &[T],
    x: &[T],
    rows: usize,
    threads: usize,
) -> Result<(), ModelError> {
    let (vocab, hidden) = (w.shape[0], w.shape[1]);
    check_len(&w.name, "logits gradient", rows * vocab, dlogits.len())?;
    check_len(&w.name, "head input", rows * hidden, x.len())?;
    be.matmul(
        MatMut::row_major(w.grad.host_mut(), vocab, hidden, "dW")?,
        T::one(),
        MatRef::row_major(dlogits, rows, vocab, "dlogits")?.t(),
        MatRef::row_major(x, rows, hidden, "x")?,
        T::one(),
        threads,
    )?;
    Ok(())
}

impl<T: Real> Model<T> {
    /// The model of `config` (validated), every weight drawn from
    /// Normal(0, `initializer_range`) by `(seed, name)`, norms at 1, selection biases at 0;
    /// `recompute` sets the blocks' and modules' recomputation of RMSNorms and MLA
    /// up-projections (bit-identical results, less memory).
    pub fn new(config: &ModelConfig, seed: u64, recompute: bool) -> Result<Self, ModelError> {
        config.validate()?;
        let rope = Mla::rope_table(config)?;
        let (vocab, hidden, std) = (config.vocab_size, config.hidden_size, config.initializer_range);
        let layers = (0..config.num_hidden_layers)
            .map(|i| Block::new(config, i, config.is_moe_layer(i), seed, recompute, rope.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let mtp = (1..=config.num_nextn_predict_layers)
            .map(|k| MtpModule::new(config, k, seed, recompute, rope.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Model {
            embed_tokens: Embedding::new("model.embed_tokens", vocab, hidden, std, seed),
            layers,
            norm: RmsNorm::new("model.norm", hidden, config.rms_norm_eps),
            lm_head: (!config.tie_word_embeddings).then(|| Linear::new("lm_head", hidden, vocab, std, seed)),
            mtp,
            config: config.clone(),
            precision: Precision::Fp32,
            backend: DeviceBackend::default(),
        })
    }

    /// [`Model::new`] with the linear layers' GEMMs in `precision` ([`crate::precision`]):
    /// every MLA projection, FFN and expert projection, and the MTP modules' `eh_proj`;
    /// the embedding, the output head, the MoE gates and the norms stay f32. Anything but
    /// [`Precision::Fp32`] needs `T = f32` (an f64 model is an error).
    pub fn new_with(
        config: &ModelConfig,
        seed: u64,
        recompute: bool,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        let mut model = Self::new(config, seed, recompute)?;
        model.set_precision(precision)?;
        Ok(model)
    }

    /// The precision of the linear layers.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Sets the precision of the linear layers that obey it (see [`Model::new_with`]);
    /// an error, changing nothing, for anything but [`Precision::Fp32`] on f64.
    pub fn set_precision(&mut self, precision: Precision) -> Result<(), ModelError> {
        check_precision::<T>(precision, "model")?;
        self.layers.iter_mut().for_each(|b| b.set_precision(precision));
        self.mtp.iter_mut().for_each(|m| m.set_precision(precision));
        self.precision = precision;
        Ok(())
    }

    /// The backend the model runs on (default the CPU's).
    pub fn backend(&self) -> DeviceBackend {
        self.backend
    }

    /// Runs every layer, the heads and the losses on `backend`
    /// ([`flotilla_kernels::backend::open`] opens one for a device).
    /// Every parameter moves to its device first, all or nothing: on an error (naming the
    /// parameter) nothing has changed. The layers' own `set_backend` set only the backend;
    /// this is where parameters are placed.
    pub fn set_backend(&mut self, backend: DeviceBackend) -> Result<(), ModelError> {
        crate::param::place_all(self.params_mut(), &backend)?;
        self.norm.backend = backend;
        if let Some(head) = &mut self.lm_head {
            head.backend = backend;
        }
        self.layers.iter_mut().for_each(|b| b.set_backend(backend));
        self.mtp.iter_mut().for_each(|m| m.set_backend(backend));
        self.backend = backend;
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// MTP depth `D`.
    pub fn mtp_depth(&self) -> usize {
        self.mtp.len()
    }

    /// Tokens per training window for sequences of `seq_len`: `seq_len + 1 + D`.
    pub fn window_len(&self, seq_len: usize) -> usize {
        seq_len + 1 + self.mtp_depth()
    }

    /// Sets recomputation on every block and MTP module.
    pub fn set_recompute(&mut self, recompute: bool) {
        self.layers.iter_mut().for_each(|b| b.set_recompute(recompute));
        self.mtp.iter_mut().for_each(|m| m.set_recompute(recompute));
    }

    /// The output head's weight: `lm_head.weight`, or the embedding when tied.
    pub fn head_weight(&self) -> &Param<T> {
        match &self.lm_head {
            Some(head) => &head.weight,
            None => &self.embed_tokens.weight,
        }
    }

    fn head_weight_mut(&mut self) -> &mut Param<T> {
        match &mut self.lm_head {
            Some(head) => &mut head.weight,
            None => &mut self.embed_tokens.weight,
        }
    }

    /// Every tensor, selection biases included, each once, in layer order:
    /// `model.embed_tokens`, `model.layers.{0..L}` ([`Block::params`]), the MTP modules'
    /// `model.layers.{L..L+D}` ([`MtpModule::params`]), `model.norm`, `lm_head` (absent
    /// when tied).
    pub fn params(&self) -> Vec<&Param<T>> {
        let mut out = vec![&self.embed_tokens.weight];
        for block in &self.layers {
            out.extend(block.params());
        }
        for module in &self.mtp {
            out.extend(module.params());
        }
        out.push(&self.norm.weight);
        if let Some(head) = &self.lm_head {
            out.push(&head.weight);
        }
        out
    }

    /// [`Model::params`], mutable, selection biases included: for loading checkpoints.
    /// Optimizers use [`Model::trainable_params_mut`].
    pub fn params_mut(&mut self) -> Vec<&mut Param<T>> {
        let mut out = vec![&mut self.embed_tokens.weight];
        for block in &mut self.layers {
            out.extend(block.params_mut());
        }
        for module in &mut self.mtp {
            out.extend(module.params_mut());
        }
        out.push(&mut self.norm.weight);
        if let Some(head) = &mut self.lm_head {
            out.push(&mut head.weight);
        }
        out
    }

    /// The parameters an optimizer updates: [`Model::params`]' order without the MoE
    /// selection biases (which only [`Model::update_bias`] changes).
    pub fn trainable_params_mut(&mut self) -> Vec<&mut Param<T>> {
        let mut out = vec![&mut self.embed_tokens.weight];
        for block in &mut self.layers {
            out.extend(block.trainable_params_mut());
        }
        for module in &mut self.mtp {
            out.extend(module.trainable_params_mut());
        }
        out.push(&mut self.norm.weight);
        if let Some(head) = &mut self.lm_head {
            out.push(&mut head.weight);
        }
        out
    }

    /// The tensors HF checkpoints store again under each MTP module's layer, with their
    /// names: `model.layers.{L+k−1}.embed_tokens.weight` (the embedding) and
    /// `model.layers.{L+k−1}.shared_head.head.weight` (the output head), as DeepSeek's
    /// released checkpoint does. They are the main model's tensors, not parameters of
    /// their own (see [`crate::mtp`]).
    pub fn mtp_shared_copies(&self) -> Vec<(String, &Param<T>)> {
        let mut out = Vec::with_capacity(2 * self.mtp.len());
        for module in &self.mtp {
            let layer = module.layer();
            out.push((format!("model.layers.{layer}.embed_tokens.weight"), &self.embed_tokens.weight));
            out.push((format!("model.layers.{layer}.shared_head.head.weight"), self.head_weight()));
        }
        out
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        self.params_mut().into_iter().for_each(Param::zero_grad);
    }

    /// The MoE layers, main blocks then MTP modules (the order of
    /// [`StepStats::expert_loads`]).
    pub fn moe_layers(&self) -> Vec<&MoeLayer<T>> {
        self.layers.iter().chain(self.mtp.iter().map(|m| &m.block)).filter_map(Block::moe).collect()
    }

    /// [`Model::moe_layers`], mutable (for the bias update).
    pub fn moe_layers_mut(&mut self) -> Vec<&mut MoeLayer<T>> {
        self.layers
            .iter_mut()
            .chain(self.mtp.iter_mut().map(|m| &mut m.block))
            .filter_map(Block::moe_mut)
            .collect()
    }

    /// The HF layer index of each of [`Model::moe_layers`].
    pub fn moe_layer_indices(&self) -> Vec<usize> {
        let main = self.layers.iter().enumerate().filter(|(_, b)| b.is_moe()).map(|(i, _)| i);
        let mtp = self.mtp.iter().filter(|m| m.block.is_moe()).map(|m| m.layer());
        main.chain(mtp).collect()
    }

    /// Auxiliary-loss-free balancing on every MoE layer: `loads[j]` is the global-batch
    /// expert count of [`Model::moe_layers_mut`]`[j]` (e.g. [`StepStats::expert_loads`]
    /// summed over micro-batches and ranks), `gamma` the bias update speed.
    pub fn update_bias(&mut self, loads: &[Vec<u64>], gamma: f64) -> Result<(), ModelError> {
        let mut layers = self.moe_layers_mut();
        if loads.len() != layers.len() {
            return Err(ModelError::Tensor {
                tensor: "expert loads".into(),
                detail: format!("{} layers of loads for {} MoE layers", loads.len(), layers.len()),
            });
        }
        for (layer, load) in layers.iter_mut().zip(loads) {
            layer.update_bias(load, gamma)?;
        }
        Ok(())
    }

    /// Checks the windows (at least one, each `seq_len + 1 + D` tokens, every token in the
    /// vocabulary) and returns the batch size.
    fn check_windows(&self, windows: &[Vec<u32>], seq_len: usize) -> Result<usize, ModelError> {
        let invalid = |tensor: String, detail: String| Err(ModelError::Tensor { tensor, detail });
        if windows.is_empty() {
            return invalid("windows".into(), "no windows: a batch needs at least one".into());
        }
        if seq_len == 0 {
            return invalid("windows".into(), "seq_len must be at least 1".into());
        }
        let len = self.window_len(seq_len);
        for (b, w) in windows.iter().enumerate() {
            if w.len() != len {
                return invalid(
                    format!("windows[{b}]"),
                    format!(
                        "has {} tokens, expected seq_len {seq_len} + 1 + MTP depth {} = {len}",
                        w.len(),
                        self.mtp_depth()
                    ),
                );
            }
            if let Err(ModelError::Tensor { detail, .. }) = self.embed_tokens.check_tokens(w) {
                return invalid(format!("windows[{b}]"), detail);
            }
        }
        Ok(windows.len())
    }

    /// Tokens `w[offset..offset + seq]` of every window, concatenated.
    fn gather_tokens(windows: &[Vec<u32>], offset: usize, seq: usize) -> Vec<u32> {
        windows.iter().flat_map(|w| w[offset..offset + seq].iter().copied()).collect()
    }

    /// The main model's blocks over `x` (the embeddings): returns `h^0` and, when
    /// `keep`, every block's input and cache.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn run_blocks(
        &self,
        mut x: Vec<T>,
        batch: usize,
        seq: usize,
        packing: Option<&Arc<Packing>>,
        alpha: f64,
        keep: bool,
        stats: &mut StepStats,
        threads: usize,
    ) -> Result<(Vec<T>, Vec<Vec<T>>, Vec<BlockCache<T>>), ModelError> {
        let (mut xs, mut caches) = (Vec::new(), Vec::new());
        for (i, block) in self.layers.iter().enumerate() {
            let mut y = zeros(x.len());
            let cache =
                block.forward_packed(&x, batch, seq, packing, alpha, &mut y, threads, &mut LocalExchange)?;
            record_moe(stats, i, &cache);
            if keep {
                xs.push(std::mem::replace(&mut x, y));
                caches.push(cache);
            } else {
                x = y;
            }
        }
        Ok((x, xs, caches))
    }

    #[allow(clippy::too_many_arguments)]
    fn head_pass(
        &self,
        norm: &RmsNorm<T>,
        h: &[T],
        rows: usize,
        targets: &[u32],
        weights: Option<&[T]>,
        scale: T,
        train: bool,
        threads: usize,
    ) -> Result<(T, HeadPass<T>), ModelError> {
        head_pass(&self.backend, self.head_weight(), norm, h, rows, targets, weights, scale, train, threads)
    }

    /// The forward pass over validated windows: statistics, and with `train` everything
    /// backward needs.
    fn forward(
        &self,
        windows: &[Vec<u32>],
        sft: Option<&Sft<'_>>,
        seq_len: usize,
        loss_cfg: &LossConfig,
        train: bool,
        threads: usize,
    ) -> Result<(StepStats, Option<Activations<T>>), ModelError> {
        loss_cfg.validate()?;
        let batch = self.check_windows(windows, seq_len)?;
        let packing = packing_of(sft, batch, seq_len, self.window_len(seq_len))?;
        let (seq, d) = (seq_len, self.mtp_depth());
        let rows = batch * seq;
        let hidden = self.config.hidden_size;
        let alpha = loss_cfg.balance_alpha;
        let mut stats = StepStats { tokens: rows, ..StepStats::default() };

        let inputs = Self::gather_tokens(windows, 0, seq);
        let mut x = zeros(rows * hidden);
        self.embed_tokens.forward(&inputs, &mut x)?;
        let (h0, mut xs, blocks) =
            self.run_blocks(x, batch, seq, packing.as_ref(), alpha, train, &mut stats, threads)?;

        let inv_rows = 1.0 / rows as f64;
        let mut heads = Vec::with_capacity(d + 1);
        let targets = Self::gather_tokens(windows, 1, seq);
        let weights = packed_weights::<T>(sft, seq, 1)?;
        // A packed batch's weights already hold the mean; pre-training's is `1/rows`.
        let main_scale = if sft.is_some() { 1.0 } else { inv_rows };
        let (main_ce, head) = self.head_pass(
            &self.norm,
            &h0,
            rows,
            &targets,
            weights.as_deref(),
            cast(main_scale, "loss scale")?,
            train,
            threads,
        )?;
        stats.main_ce = to_f64(main_ce);
        heads.push(head);

        let mtp_rows = if sft.is_some() { 1.0 } else { inv_rows };
        let mtp_scale: T =
            if d > 0 { cast(loss_cfg.mtp_lambda / d as f64 * mtp_rows, "loss scale")? } else { T::zero() };
        let mut passes: Vec<MtpPass<T>> = Vec::with_capacity(d);
        let mut last: Option<Vec<T>> = None;
        for module in &self.mtp {
            let k = module.depth();
            let tokens = Self::gather_tokens(windows, k, seq);
            let mut emb = zeros(rows * hidden);
            self.embed_tokens.forward(&tokens, &mut emb)?;
            let h_prev = match (&last, passes.last()) {
                (Some(h), _) => h,
                (None, Some(p)) => &p.h,
                (None, None) => &h0,
            };
            let mut h = zeros(rows * hidden);
            let cache = module.forward_packed(
                h_prev,
                &emb,
                batch,
                seq,
                packing.as_ref(),
                alpha,
                &mut h,
                threads,
                &mut LocalExchange,
            )?;
            record_moe(&mut stats, module.layer(), &cache.block);
            let targets = Self::gather_tokens(windows, k + 1, seq);
            let weights = packed_weights::<T>(sft, seq, k + 1)?;
            let (loss, head) = self.head_pass(
                &module.shared_head_norm,
                &h,
                rows,
                &targets,
                weights.as_deref(),
                mtp_scale,
                train,
                threads,
            )?;
            stats.mtp_ce.push(to_f64(loss));
            if train {
                heads.push(head);
                passes.push(MtpPass { tokens, emb, h, cache });
            } else {
                last = Some(h);
            }
        }

        let mtp_mean = if d > 0 { stats.mtp_ce.iter().sum::<f64>() / d as f64 } else { 0.0 };
        stats.loss = stats.main_ce + loss_cfg.mtp_lambda * mtp_mean + stats.balance_loss;
        let activations = train.then(|| {
            xs.push(h0);
            Activations { batch, seq, inputs, xs, blocks, heads, mtp: passes }
        });
        Ok((stats, activations))
    }

    /// The loss of `windows` (each `seq_len + 1 + D` tokens) without gradients: the same
    /// statistics, bit for bit, as [`Model::forward_backward`] reports.
    pub fn loss(
        &self,
        windows: &[Vec<u32>],
        seq_len: usize,
        loss_cfg: &LossConfig,
        threads: usize,
    ) -> Result<StepStats, ModelError> {
        Ok(self.forward(windows, None, seq_len, loss_cfg, false, threads)?.0)
    }

    /// The loss of a packed batch ([`crate::packing`]) without gradients: as
    /// [`Model::forward_backward_packed`] reports it.
    pub fn loss_packed(
        &self,
        windows: &[Vec<u32>],
        sft: &Sft<'_>,
        seq_len: usize,
        loss_cfg: &LossConfig,
        threads: usize,
    ) -> Result<StepStats, ModelError> {
        Ok(self.forward(windows, Some(sft), seq_len, loss_cfg, false, threads)?.0)
    }

    /// [`Model::forward_backward`] over a packed batch: attention stays inside each
    /// sample, RoPE positions restart per sample, and each head scores only the response
    /// tokens of a position's own sample, weighted as `sft.normalization` says
    /// ([`crate::packing`]). `CE_main` and `CE_k` are then those weighted means.
    pub fn forward_backward_packed(
        &mut self,
        windows: &[Vec<u32>],
        sft: &Sft<'_>,
        seq_len: usize,
        loss_cfg: &LossConfig,
        threads: usize,
    ) -> Result<StepStats, ModelError> {
        let (stats, activations) = self.forward(windows, Some(sft), seq_len, loss_cfg, true, threads)?;
        let act = activations.expect("a training forward keeps its activations");
        self.backward(act, threads)?;
        Ok(stats)
    }

    /// Forward, loss and full backward over `windows` (each `seq_len + 1 + D` tokens): every
    /// trainable parameter's gradient of the total loss is **added** to its
    /// [`Param::grad`]. Returns the pass's statistics.
    pub fn forward_backward(
        &mut self,
        windows: &[Vec<u32>],
        seq_len: usize,
        loss_cfg: &LossConfig,
        threads: usize,
    ) -> Result<StepStats, ModelError> {
        let (stats, activations) = self.forward(windows, None, seq_len, loss_cfg, true, threads)?;
        let act = activations.expect("a training forward keeps its activations");
        self.backward(act, threads)?;
        Ok(stats)
    }

    /// The bytes a training step over `windows` keeps from its forward for its backward
    /// (every layer's cache and input, the heads' normed inputs and logits gradients): the
    /// peak of cached activations, reached when the forward ends. Runs the forward only.
    pub fn activation_bytes(
        &self,
        windows: &[Vec<u32>],
        seq_len: usize,
        loss_cfg: &LossConfig,
        threads: usize,
    ) -> Result<CacheBytes, ModelError> {
        let (_, activations) = self.forward(windows, None, seq_len, loss_cfg, true, threads)?;
        Ok(activations.map_or(CacheBytes::default(), |a| a.bytes()))
    }

    /// B then W of every layer, last first.
    fn backward(&mut self, mut act: Activations<T>, threads: usize) -> Result<(), ModelError> {
        let (batch, seq) = (act.batch, act.seq);
        let rows = batch * seq;
        let n = rows * self.config.hidden_size;
        let one = T::one();
        let h0 = act.xs.pop().expect("the activations hold h^0");

        let be = self.backend;
        // MTP modules, deepest first. `d_next` is the gradient at h^k from module k + 1.
        let mut d_next: Option<Vec<T>> = None;
        while let Some(pass) = act.mtp.pop() {
            let head = act.heads.pop().expect("one head per MTP module");
            let m = act.mtp.len();
            let mut d_normed = zeros(n);
            head_backward_input(&be, self.head_weight(), &head.dlogits, rows, &mut d_normed, threads)?;
            head_backward_weight(&be, self.head_weight_mut(), &head.dlogits, &head.normed, rows, threads)?;
            drop(head.dlogits);
            let module = &mut self.mtp[m];
            let mut dh = d_next.take().unwrap_or_else(|| zeros(n));
            module.shared_head_norm.backward_input(&head.norm, &pass.h, &d_normed, &mut dh, true)?;
            module.shared_head_norm.backward_weight(&head.norm, &pass.h, &d_normed)?;
            let h_prev = act.mtp.last().map_or(&h0, |p| &p.h);
            let (mut d_prev, mut d_emb) = (zeros(n), zeros(n));
            let grads = module.backward_input(
                &pass.cache,
                h_prev,
                &pass.emb,
                &dh,
                one,
                &mut d_prev,
                &mut d_emb,
                threads,
                &mut LocalExchange,
            )?;
            module.backward_weight(&pass.cache, &grads, h_prev, &pass.emb, threads)?;
            self.embed_tokens.backward_weight(&pass.tokens, &d_emb)?;
            d_next = Some(d_prev);
        }

        // The main head and the final norm.
        let head = act.heads.pop().expect("the main head");
        let mut d_normed = zeros(n);
        head_backward_input(&be, self.head_weight(), &head.dlogits, rows, &mut d_normed, threads)?;
        head_backward_weight(&be, self.head_weight_mut(), &head.dlogits, &head.normed, rows, threads)?;
        drop(head.dlogits);
        let mut dy = d_next.take().unwrap_or_else(|| zeros(n));
        self.norm.backward_input(&head.norm, &h0, &d_normed, &mut dy, true)?;
        self.norm.backward_weight(&head.norm, &h0, &d_normed)?;
        drop(h0);

        // The blocks, last first, then the embedding.
        for block in self.layers.iter_mut().rev() {
            let cache = act.blocks.pop().expect("one cache per block");
            let x = act.xs.pop().expect("one input per block");
            let mut dx = zeros(n);
            let grads = block.backward_input(&cache, &x, &dy, one, &mut dx, threads, &mut LocalExchange)?;
            block.backward_weight(&cache, &grads, &x, threads)?;
            dy = dx;
        }
        self.embed_tokens.backward_weight(&act.inputs, &dy)?;
        Ok(())
    }

    /// The main head's logits for one sequence `tokens` (positions `0..len`),
    /// `[len, vocab]` row-major: row `i` scores the token after `tokens[i]`.
    pub fn logits(&self, tokens: &[u32], threads: usize) -> Result<Vec<T>, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Tensor { tensor: "tokens".into(), detail: "no tokens to score".into() });
        }
        let (rows, hidden, vocab) = (tokens.len(), self.config.hidden_size, self.config.vocab_size);
        let mut x = zeros(rows * hidden);
        self.embed_tokens.forward(tokens, &mut x)?;
        let mut stats = StepStats::default();
        let (h, _, _) = self.run_blocks(x, 1, rows, None, 0.0, false, &mut stats, threads)?;
        let mut normed = zeros(rows * hidden);
        self.norm.forward(&h, rows, &mut normed)?;
        let mut logits = zeros(rows * vocab);
        head_forward(&self.backend, self.head_weight(), &normed, rows, &mut logits, threads)?;
        Ok(logits)
    }

    /// Empty inference caches for `sequences` sequences ([`Model::forward_cached`]).
    pub fn kv_cache(&self, sequences: usize) -> KvCache<T> {
        let empty = || vec![MlaKvCache::default(); sequences];
        KvCache {
            main: self.layers.iter().map(|_| empty()).collect(),
            mtp: self.mtp.iter().map(|_| empty()).collect(),
            dims: Some(MlaDims::from_config(&self.config)),
        }
    }

    /// The bytes the main model's cache takes per token: `num_hidden_layers ·
    /// (kv_lora_rank + qk_rope_head_dim) · size_of::<T>()` (MLA's compressed cache).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.layers.len()
            * MlaDims::from_config(&self.config).cached_values_per_token()
            * std::mem::size_of::<T>()
    }

    /// Inference: the main model's last hidden state `h^0` (before `model.norm`), `[rows,
    /// hidden]`, for the new tokens of several sequences (`counts[s]` of sequence `s`, in
    /// order), each continuing its sequence in `cache` (which they are appended to).
    pub fn forward_cached(
        &self,
        tokens: &[u32],
        counts: &[usize],
        cache: &mut KvCache<T>,
        threads: usize,
    ) -> Result<Vec<T>, ModelError> {
        self.check_cached_call(tokens, counts, cache.main.first().map_or(0, Vec::len))?;
        let hidden = self.config.hidden_size;
        let mut x = zeros(tokens.len() * hidden);
        self.embed_tokens.forward(tokens, &mut x)?;
        for (block, caches) in self.layers.iter().zip(&mut cache.main) {
            let mut y = zeros(x.len());
            block.forward_cached(&x, counts, caches, &mut y, threads, &mut LocalExchange)?;
            x = y;
        }
        Ok(x)
    }

    /// Inference through the first MTP module: `h^1` for the new positions of several
    /// sequences, from the main model's `h^0` at those positions and the tokens that follow
    /// them (`next_tokens`), each continuing its sequence in `cache`'s module caches.
    pub fn mtp_forward_cached(
        &self,
        h0: &[T],
        next_tokens: &[u32],
        counts: &[usize],
        cache: &mut KvCache<T>,
        threads: usize,
    ) -> Result<Vec<T>, ModelError> {
        let (Some(module), Some(caches)) = (self.mtp.first(), cache.mtp.first_mut()) else {
            return Err(ModelError::Tensor {
                tensor: "mtp".into(),
                detail: "the model has no MTP module (num_nextn_predict_layers = 0)".into(),
            });
        };
        self.check_cached_call(next_tokens, counts, caches.len())?;
        let mut emb = zeros(h0.len());
        self.embed_tokens.forward(next_tokens, &mut emb)?;
        let mut h1 = zeros(h0.len());
        module.forward_cached(h0, &emb, counts, caches, &mut h1, threads, &mut LocalExchange)?;
        Ok(h1)
    }

    /// The logits `[rows, vocab]` of hidden states `h`: the main head's (`model.norm`), or
    /// with `mtp` the first MTP module's (`shared_head.norm`, the shared head).
    pub fn head_logits(&self, h: &[T], mtp: bool, threads: usize) -> Result<Vec<T>, ModelError> {
        let (hidden, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let norm = match (mtp, self.mtp.first()) {
            (false, _) => &self.norm,
            (true, Some(module)) => &module.shared_head_norm,
            (true, None) => {
                return Err(ModelError::Tensor {
                    tensor: "mtp".into(),
                    detail: "the model has no MTP module".into(),
                });
            }
        };
        let rows = h.len() / hidden;
        check_len(&norm.weight.name, "hidden states", rows * hidden, h.len())?;
        let mut normed = zeros(h.len());
        norm.forward(h, rows, &mut normed)?;
        let mut logits = zeros(rows * vocab);
        head_forward(&self.backend, self.head_weight(), &normed, rows, &mut logits, threads)?;
        Ok(logits)
    }

    /// Checks a cached call's tokens (in the vocabulary, `Σ counts` of them) and its
    /// sequence count against the cache's.
    fn check_cached_call(
        &self,
        tokens: &[u32],
        counts: &[usize],
        sequences: usize,
    ) -> Result<(), ModelError> {
        let invalid = |detail: String| Err(ModelError::Tensor { tensor: "tokens".into(), detail });
        if counts.len() != sequences {
            return invalid(format!("{} token counts for a cache of {sequences} sequences", counts.len()));
        }
        if counts.iter().sum::<usize>() != tokens.len() {
            return invalid(format!(
                "{} tokens for counts summing to {}",
                tokens.len(),
                counts.iter().sum::<usize>()
            ));
        }
        self.embed_tokens.check_tokens(tokens)
    }

    /// `log p(tokens[i + 1] | tokens[..=i])` under the main head for `i = 0..len − 1`
    /// (`len − 1` values; at least 2 tokens), from [`Model::logits`].
    pub fn next_token_log_probs(&self, tokens: &[u32], threads: usize) -> Result<Vec<f64>, ModelError> {
        if tokens.len() < 2 {
            return Err(ModelError::Tensor {
                tensor: "tokens".into(),
                detail: format!("scoring needs at least 2 tokens, got {}", tokens.len()),
            });
        }
        let vocab = self.config.vocab_size;
        let logits = self.logits(&tokens[..tokens.len() - 1], threads)?;
        logits
            .chunks_exact(vocab)
            .zip(&tokens[1..])
            .map(|(row, &next)| Ok(to_f64(self.backend.log_softmax_at(row, next)?)))
            .collect()
    }
}

/// The inference caches of a batch of sequences ([`Model::kv_cache`]): an [`MlaKvCache`]
/// per sequence for every main block and every MTP module's block.
#[derive(Clone, Debug, PartialEq)]
pub struct KvCache<T> {
    /// `[block][sequence]`.
    main: Vec<Vec<MlaKvCache<T>>>,
    /// `[module][sequence]`.
    mtp: Vec<Vec<MlaKvCache<T>>>,
    dims: Option<MlaDims>,
}

impl<T: Real> KvCache<T> {
    /// Positions the main model has cached for `sequence` (0 for an unknown one).
    pub fn len(&self, sequence: usize) -> usize {
        self.main.first().and_then(|l| l.get(sequence)).map_or(0, MlaKvCache::len)
    }

    /// The bytes the main model's caches hold, over every sequence.
    pub fn main_bytes(&self) -> usize {
        self.main.iter().flatten().map(MlaKvCache::bytes).sum()
    }

    /// Forgets `sequence`'s positions from `len` on in the main model (a rejected
    /// speculative token; the MTP modules' caches are fed only accepted positions).
    pub fn truncate_main(&mut self, sequence: usize, len: usize) {
        if let Some(dims) = self.dims {
            self.main.iter_mut().filter_map(|l| l.get_mut(sequence)).for_each(|c| c.truncate(len, &dims));
        }
    }
}

/// Adds a block's balance loss and expert loads to the statistics.
fn record_moe<T: Real>(stats: &mut StepStats, layer: usize, cache: &BlockCache<T>) {
    if let Some(moe) = cache.moe() {
        stats.balance_loss += to_f64(moe.balance_loss);
        stats.moe_layers.push(layer);
        stats.expert_loads.push(moe.expert_load.clone());
    }
}
