//! The model cut into pipeline stages, as one rank holds and runs them (DeepSeek-V3
//! report §3.2; DESIGN §1.3): the unit of work is a **chunk**, one micro-batch through one
//! stage, with its forward, its input gradient (B) and its weight gradient (W) as three
//! separate calls, so that a schedule can order them (and defer W) as DualPipe does.
//!
//! ## Stages
//! A [`StageLayout`] splits the main model's layers into contiguous groups, one per stage,
//! in forward order. Stage 0 also embeds the tokens; the last stage also applies
//! `model.norm`, the output head and the MTP modules, and scores the losses. The MTP
//! modules read the embedding of later tokens, so a rank holding the last stage holds the
//! embedding too: the same tensor as its stage 0 when it hosts both (DualPipe's rank 0
//! and rank PP−1), otherwise a copy whose gradients the caller sums with stage 0's holders
//! (every copy then takes the same optimizer step, so copies never drift).
//!
//! ## What a rank holds
//! [`RankModel`] holds the stages a rank hosts (DualPipe: stages r and PP−1−r) and, of
//! every MoE layer, the routed experts of its expert-parallel shard ([`ExpertShard`]).
//! Every tensor is initialized from `(seed, name)` exactly as [`crate::Model::new`] does,
//! so the union of all ranks' tensors is the single-process model, tensor for tensor.
//!
//! ## A chunk
//! - [`RankModel::forward`]: stage 0 starts from the windows' tokens, later stages from the
//!   previous stage's output `[rows, hidden]`; the last stage ends in the losses (the
//!   logits gradients are computed in the forward, llm.c style, and kept for B and W).
//!   Returns the output to send (none for the last stage), the chunk's statistics, and
//!   the [`ChunkCache`] its backward reads.
//! - [`RankModel::backward_input`] (B): from the gradient of the chunk's output (none for
//!   the last stage: it starts from its losses) to the gradient of its input, which is
//!   sent to the previous stage (stage 0 has none: its input gradient is the embedding's
//!   and stays for W). Returns what W needs.
//! - [`RankModel::backward_weight`] (W): accumulates every weight gradient of the chunk
//!   into [`Param::grad`]. Only W mutates the model, so a rank may run one chunk's forward
//!   and another's B at the same time (DualPipe's overlapped pairs) on shared borrows.
//!
//! Every loss is the micro-batch's mean (as [`crate::Model::forward_backward`] computes it
//! for its windows), so the caller divides the summed gradients by the number of
//! micro-batches in the global batch. MoE layers move tokens to the ranks owning their
//! experts through the [`ExpertExchange`] the caller passes; with [`LocalExchange`](crate::moe::LocalExchange) and
//! every stage on one rank, a chunk computes what `Model::forward_backward` computes for
//! its windows.

use std::ops::Range;

use crate::block::{Block, BlockCache, BlockWeightGradInputs};
use crate::config::ModelConfig;
use crate::embedding::Embedding;
use crate::linear::Linear;
use crate::mla::Mla;
use crate::model::{
    HeadPass, LossConfig, head_backward_input, head_backward_weight, head_pass, packed_weights, packing_of,
};
use crate::moe::{ExpertExchange, ExpertShard, MoeLayer};
use crate::mtp::{MtpCache, MtpModule, MtpWeightGradInputs};
use crate::norm::RmsNorm;
use crate::packing::Sft;
use crate::param::Param;
use crate::precision::{Precision, check_precision};
use crate::{ModelError, Real};
use flotilla_kernels::backend::DeviceBackend;

/// Contiguous main-model layers per stage, in forward order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageLayout {
    stages: Vec<Range<usize>>,
}

impl StageLayout {
    /// Stages of `layers[s]` layers each, which must cover the model's `num_hidden_layers`
    /// with at least one layer per stage.
    pub fn new(config: &ModelConfig, layers: &[usize]) -> Result<Self, ModelError> {
        let invalid = |detail: String| Err(ModelError::Tensor { tensor: "pipeline stages".into(), detail });
        if layers.is_empty() {
            return invalid("a pipeline needs at least one stage".into());
        }
        if let Some(s) = layers.iter().position(|&n| n == 0) {
            return invalid(format!("stage {s} has no layers; every stage needs at least one"));
        }
        let total: usize = layers.iter().sum();
        if total != config.num_hidden_layers {
            return invalid(format!(
                "the stages hold {total} layers but the model has num_hidden_layers = {}",
                config.num_hidden_layers
            ));
        }
        let mut first = 0;
        let stages = layers
            .iter()
            .map(|&n| {
                first += n;
                first - n..first
            })
            .collect();
        Ok(StageLayout { stages })
    }

    /// Stages.
    pub fn num_stages(&self) -> usize {
        self.stages.len()
    }

    /// The main-model layers of `stage`.
    pub fn layers(&self, stage: usize) -> Range<usize> {
        self.stages[stage].clone()
    }

    /// The last stage's index.
    pub fn last(&self) -> usize {
        self.stages.len() - 1
    }
}

/// A chunk's statistics: its losses (last stage only) and its MoE layers' loads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChunkStats {
    /// Positions scored, `windows · seq_len`.
    pub tokens: usize,
    /// `CE_main`, the micro-batch's mean next-token cross-entropy (last stage only).
    pub main_ce: Option<f64>,
    /// `CE_k` for each MTP depth (last stage only).
    pub mtp_ce: Vec<f64>,
    /// The balance losses of the chunk's MoE layers, summed (α included).
    pub balance_loss: f64,
    /// The HF layer index of each entry of `expert_loads`.
    pub moe_layers: Vec<usize>,
    /// Tokens of this micro-batch routed to each expert, per MoE layer.
    pub expert_loads: Vec<Vec<u64>>,
}

/// One MTP module's forward.
struct MtpPass<T> {
    tokens: Vec<u32>,
    emb: Vec<T>,
    h: Vec<T>,
    cache: MtpCache<T>,
}

/// What the last stage keeps beyond its blocks.
struct LastStage<T> {
    /// `h^0`, the main model's last hidden state.
    h0: Vec<T>,
    /// The main head first, then MTP depth 1..=D.
    heads: Vec<HeadPass<T>>,
    mtp: Vec<MtpPass<T>>,
}

/// Everything a chunk's forward keeps for its backward.
pub struct ChunkCache<T> {
    stage: usize,
    batch: usize,
    seq: usize,
    /// Stage 0: the input tokens (the embedding's W reads them).
    inputs: Option<Vec<u32>>,
    /// Each block's input.
    xs: Vec<Vec<T>>,
    blocks: Vec<BlockCache<T>>,
    last: Option<LastStage<T>>,
}

impl<T> ChunkCache<T> {
    /// The chunk's stage.
    pub fn stage(&self) -> usize {
        self.stage
    }
}

/// A chunk's forward: the output for the next stage, statistics, and the cache.
pub struct ChunkForward<T> {
    /// `[rows, hidden]` for the next stage; `None` from the last stage.
    pub output: Option<Vec<T>>,
    pub stats: ChunkStats,
    pub cache: ChunkCache<T>,
}

/// What B leaves for W besides the cache.
pub struct ChunkWeightGrads<T> {
    blocks: Vec<BlockWeightGradInputs<T>>,
    /// Stage 0: the gradient at the embedding's output.
    d_embedding: Option<Vec<T>>,
    /// Last stage: per head (main first), the gradient at its norm's output.
    d_normed: Vec<Vec<T>>,
    /// Last stage: per MTP module, its weight-gradient inputs and its embedding gradient.
    mtp: Vec<(MtpWeightGradInputs<T>, Vec<T>)>,
}

/// A chunk's B: the gradient for the previous stage and what W needs.
pub struct ChunkBackward<T> {
    /// `[rows, hidden]`, the gradient at the chunk's input; `None` for stage 0.
    pub input_grad: Option<Vec<T>>,
    pub weight: ChunkWeightGrads<T>,
}

fn zeros<T: Real>(n: usize) -> Vec<T> {
    vec![T::zero(); n]
}

fn cast<T: Real>(v: f64, what: &str) -> Result<T, ModelError> {
    T::from(v).ok_or_else(|| ModelError::Tensor {
        tensor: what.into(),
        detail: format!("{v} does not convert to the element type"),
    })
}

fn to_f64<T: Real>(v: T) -> f64 {
    v.to_f64().unwrap_or(f64::NAN)
}

/// The stages one rank hosts, with their tensors (see the module docs).
#[derive(Debug)]
pub struct RankModel<T> {
    config: ModelConfig,
    layout: StageLayout,
    /// Hosted stages, ascending.
    stages: Vec<usize>,
    shard: ExpertShard,
    precision: Precision,
    /// The backend the hosted layers, the heads and the losses run on
    /// ([`RankModel::set_backend`]).
    backend: DeviceBackend,
    /// `model.embed_tokens`: held with stage 0, and with the last stage when MTP modules or
    /// a tied head read it.
    pub embed_tokens: Option<Embedding<T>>,
    /// The hosted stages' blocks, by ascending layer index.
    pub blocks: Vec<Block<T>>,
    /// The HF layer index of each of `blocks`.
    block_layers: Vec<usize>,
    /// `model.norm` (last stage).
    pub norm: Option<RmsNorm<T>>,
    /// `lm_head` (last stage, untied heads).
    pub lm_head: Option<Linear<T>>,
    /// The MTP modules (last stage).
    pub mtp: Vec<MtpModule<T>>,
}

impl<T: Real> RankModel<T> {
    /// The tensors of `stages` (indices into `layout`) with the routed experts of `shard`,
    /// initialized from `seed` as [`crate::Model::new`] does; `recompute` and `precision` as
    /// there.
    pub fn new(
        config: &ModelConfig,
        layout: StageLayout,
        stages: &[usize],
        shard: ExpertShard,
        seed: u64,
        recompute: bool,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        check_precision::<T>(precision, "pipeline stages")?;
        let mut hosted = stages.to_vec();
        hosted.sort_unstable();
        hosted.dedup();
        if hosted.is_empty() {
            return Err(ModelError::Tensor {
                tensor: "pipeline stages".into(),
                detail: "a rank must host at least one stage".into(),
            });
        }
        if let Some(&s) = hosted.iter().find(|&&s| s >= layout.num_stages()) {
            return Err(ModelError::Tensor {
                tensor: "pipeline stages".into(),
                detail: format!("stage {s} is outside the layout's {} stages", layout.num_stages()),
            });
        }
        let rope = Mla::rope_table(config)?;
        let (vocab, hidden, std) = (config.vocab_size, config.hidden_size, config.initializer_range);
        let has_first = hosted[0] == 0;
        let has_last = *hosted.last().expect("not empty") == layout.last();
        let (mut blocks, mut block_layers) = (Vec::new(), Vec::new());
        for &s in &hosted {
            for layer in layout.layers(s) {
                block_layers.push(layer);
                blocks.push(Block::new_sharded(
                    config,
                    layer,
                    config.is_moe_layer(layer),
                    seed,
                    recompute,
                    rope.clone(),
                    shard,
                )?);
            }
        }
        let mtp = if has_last {
            (1..=config.num_nextn_predict_layers)
                .map(|k| MtpModule::new_sharded(config, k, seed, recompute, rope.clone(), shard))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            Vec::new()
        };
        let needs_embedding =
            has_first || (has_last && (config.num_nextn_predict_layers > 0 || config.tie_word_embeddings));
        let mut model = RankModel {
            config: config.clone(),
            layout,
            stages: hosted,
            shard,
            precision: Precision::Fp32,
            backend: DeviceBackend::default(),
            embed_tokens: needs_embedding
                .then(|| Embedding::new("model.embed_tokens", vocab, hidden, std, seed)),
            blocks,
            block_layers,
            norm: has_last.then(|| RmsNorm::new("model.norm", hidden, config.rms_norm_eps)),
            lm_head: (has_last && !config.tie_word_embeddings)
                .then(|| Linear::new("lm_head", hidden, vocab, std, seed)),
            mtp,
        };
        model.blocks.iter_mut().for_each(|b| b.set_precision(precision));
        model.mtp.iter_mut().for_each(|m| m.set_precision(precision));
        model.precision = precision;
        Ok(model)
    }

    /// The backend the rank runs on (default the CPU's).
    pub fn backend(&self) -> DeviceBackend {
        self.backend
    }

    /// Runs the hosted layers, the heads and the losses on `backend`
    /// ([`flotilla_kernels::backend::open`] opens one for a device).
    /// Every parameter moves to its device first, all or nothing: on an error (naming the
    /// parameter) nothing has changed. The layers' own `set_backend` set only the backend;
    /// this is where parameters are placed.
    pub fn set_backend(&mut self, backend: DeviceBackend) -> Result<(), ModelError> {
        crate::param::place_all(self.params_mut(), &backend)?;
        if let Some(norm) = &mut self.norm {
            norm.backend = backend;
        }
        if let Some(head) = &mut self.lm_head {
            head.backend = backend;
        }
        self.blocks.iter_mut().for_each(|b| b.set_backend(backend));
        self.mtp.iter_mut().for_each(|m| m.set_backend(backend));
        self.backend = backend;
        Ok(())
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The stage layout.
    pub fn layout(&self) -> &StageLayout {
        &self.layout
    }

    /// The hosted stages, ascending.
    pub fn stages(&self) -> &[usize] {
        &self.stages
    }

    /// The expert shard held.
    pub fn shard(&self) -> ExpertShard {
        self.shard
    }

    /// The precision of the linear layers.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Whether this rank hosts `stage`.
    pub fn hosts(&self, stage: usize) -> bool {
        self.stages.binary_search(&stage).is_ok()
    }

    /// Tokens per training window: `seq_len + 1 + D`.
    pub fn window_len(&self, seq_len: usize) -> usize {
        seq_len + 1 + self.config.num_nextn_predict_layers
    }

    fn head_weight(&self) -> Result<&Param<T>, ModelError> {
        match (&self.lm_head, &self.embed_tokens) {
            (Some(head), _) => Ok(&head.weight),
            (None, Some(embedding)) if self.config.tie_word_embeddings => Ok(&embedding.weight),
            _ => Err(self.missing("lm_head")),
        }
    }

    fn head_weight_mut(&mut self) -> Result<&mut Param<T>, ModelError> {
        let tied = self.config.tie_word_embeddings;
        match (&mut self.lm_head, &mut self.embed_tokens) {
            (Some(head), _) => Ok(&mut head.weight),
            (None, Some(embedding)) if tied => Ok(&mut embedding.weight),
            _ => Err(ModelError::Tensor {
                tensor: "lm_head".into(),
                detail: "this rank does not host the last stage".into(),
            }),
        }
    }

    fn missing(&self, tensor: &str) -> ModelError {
        ModelError::Tensor {
            tensor: tensor.into(),
            detail: format!("not held by this rank (it hosts stages {:?})", self.stages),
        }
    }

    fn embedding(&self) -> Result<&Embedding<T>, ModelError> {
        self.embed_tokens.as_ref().ok_or_else(|| self.missing("model.embed_tokens"))
    }

    fn embedding_mut(&mut self) -> Result<&mut Embedding<T>, ModelError> {
        match &mut self.embed_tokens {
            Some(e) => Ok(e),
            None => Err(ModelError::Tensor {
                tensor: "model.embed_tokens".into(),
                detail: "not held by this rank".into(),
            }),
        }
    }

    /// The blocks of `stage`, as a range of [`RankModel::blocks`].
    fn stage_blocks(&self, stage: usize) -> Result<Range<usize>, ModelError> {
        if !self.hosts(stage) {
            return Err(ModelError::Tensor {
                tensor: format!("pipeline stage {stage}"),
                detail: format!("not hosted by this rank (it hosts stages {:?})", self.stages),
            });
        }
        let before: usize =
            self.stages.iter().take_while(|&&s| s < stage).map(|&s| self.layout.layers(s).len()).sum();
        Ok(before..before + self.layout.layers(stage).len())
    }

    /// Every tensor held, selection biases included, in [`crate::Model::params`]' order.
    pub fn params(&self) -> Vec<&Param<T>> {
        let mut out = Vec::new();
        out.extend(self.embed_tokens.iter().map(|e| &e.weight));
        for block in &self.blocks {
            out.extend(block.params());
        }
        for module in &self.mtp {
            out.extend(module.params());
        }
        out.extend(self.norm.iter().map(|n| &n.weight));
        out.extend(self.lm_head.iter().map(|h| &h.weight));
        out
    }

    /// [`RankModel::params`], mutable, selection biases included: for loading checkpoints.
    pub fn params_mut(&mut self) -> Vec<&mut Param<T>> {
        let mut out = Vec::new();
        out.extend(self.embed_tokens.iter_mut().map(|e| &mut e.weight));
        for block in &mut self.blocks {
            out.extend(block.params_mut());
        }
        for module in &mut self.mtp {
            out.extend(module.params_mut());
        }
        out.extend(self.norm.iter_mut().map(|n| &mut n.weight));
        out.extend(self.lm_head.iter_mut().map(|h| &mut h.weight));
        out
    }

    /// The tensors an optimizer updates (no selection biases), in [`RankModel::params`]'
    /// order.
    pub fn trainable_params_mut(&mut self) -> Vec<&mut Param<T>> {
        let mut out = Vec::new();
        out.extend(self.embed_tokens.iter_mut().map(|e| &mut e.weight));
        for block in &mut self.blocks {
            out.extend(block.trainable_params_mut());
        }
        for module in &mut self.mtp {
            out.extend(module.trainable_params_mut());
        }
        out.extend(self.norm.iter_mut().map(|n| &mut n.weight));
        out.extend(self.lm_head.iter_mut().map(|h| &mut h.weight));
        out
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        for p in self.trainable_params_mut() {
            p.zero_grad();
        }
    }

    /// The MoE layers held, with their HF layer index: main blocks, then MTP modules.
    pub fn moe_layers_mut(&mut self) -> Vec<(usize, &mut MoeLayer<T>)> {
        let main = self
            .blocks
            .iter_mut()
            .zip(&self.block_layers)
            .filter_map(|(b, &layer)| b.moe_mut().map(|m| (layer, m)));
        let mtp = self.mtp.iter_mut().filter_map(|m| {
            let layer = m.layer();
            m.block.moe_mut().map(|moe| (layer, moe))
        });
        main.chain(mtp).collect()
    }

    /// Checks the windows (each `seq_len + 1 + D` tokens in the vocabulary) and returns
    /// their number.
    fn check_windows(&self, windows: &[Vec<u32>], seq_len: usize) -> Result<usize, ModelError> {
        let invalid = |tensor: String, detail: String| Err(ModelError::Tensor { tensor, detail });
        if windows.is_empty() || seq_len == 0 {
            return invalid("windows".into(), "a chunk needs at least one window of at least 1 token".into());
        }
        let len = self.window_len(seq_len);
        for (b, w) in windows.iter().enumerate() {
            if w.len() != len {
                return invalid(format!("windows[{b}]"), format!("has {} tokens, expected {len}", w.len()));
            }
            if let Some(&t) = w.iter().find(|&&t| t as usize >= self.config.vocab_size) {
                return invalid(
                    format!("windows[{b}]"),
                    format!("token {t} is outside the vocabulary of {}", self.config.vocab_size),
                );
            }
        }
        Ok(windows.len())
    }

    fn gather_tokens(windows: &[Vec<u32>], offset: usize, seq: usize) -> Vec<u32> {
        windows.iter().flat_map(|w| w[offset..offset + seq].iter().copied()).collect()
    }

    /// Norm, head and fused cross-entropy of `h` against `targets`, the logits turned
    /// into their gradient scaled by `scale`. Returns the mean CE.
    #[allow(clippy::too_many_arguments)]
    fn head_pass(
        &self,
        norm: &RmsNorm<T>,
        h: &[T],
        rows: usize,
        targets: &[u32],
        weights: Option<&[T]>,
        scale: T,
        threads: usize,
    ) -> Result<(T, HeadPass<T>), ModelError> {
        head_pass(&self.backend, self.head_weight()?, norm, h, rows, targets, weights, scale, true, threads)
    }

    /// The forward of chunk (micro-batch of `windows`, `stage`): `input` is the previous
    /// stage's output (`None` for stage 0, which embeds the windows' tokens). See the
    /// module docs.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        stage: usize,
        windows: &[Vec<u32>],
        seq_len: usize,
        input: Option<Vec<T>>,
        loss: &LossConfig,
        threads: usize,
        exchange: &mut dyn ExpertExchange,
    ) -> Result<ChunkForward<T>, ModelError> {
        self.forward_packed(stage, windows, None, seq_len, input, loss, threads, exchange)
    }

    /// [`RankModel::forward`] over a packed batch: every stage receives the windows' masks
    /// (as it receives their tokens), keeps attention inside each sample, and the last
    /// stage weighs its heads as [`crate::Model::forward_backward_packed`] does.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_packed(
        &self,
        stage: usize,
        windows: &[Vec<u32>],
        sft: Option<&Sft<'_>>,
        seq_len: usize,
        input: Option<Vec<T>>,
        loss: &LossConfig,
        threads: usize,
        exchange: &mut dyn ExpertExchange,
    ) -> Result<ChunkForward<T>, ModelError> {
        loss.validate()?;
        let range = self.stage_blocks(stage)?;
        let batch = self.check_windows(windows, seq_len)?;
        let packing = packing_of(sft, batch, seq_len, self.window_len(seq_len))?;
        let (seq, hidden) = (seq_len, self.config.hidden_size);
        let rows = batch * seq;
        let n = rows * hidden;
        let alpha = loss.balance_alpha;
        let mut stats = ChunkStats { tokens: rows, ..ChunkStats::default() };

        let (mut x, inputs) = match (stage, input) {
            (0, None) => {
                let tokens = Self::gather_tokens(windows, 0, seq);
                let mut x = zeros(n);
                self.embedding()?.forward(&tokens, &mut x)?;
                (x, Some(tokens))
            }
            (0, Some(_)) => {
                return Err(ModelError::Tensor {
                    tensor: "pipeline stage 0".into(),
                    detail: "the first stage starts from tokens, not from an activation".into(),
                });
            }
            (s, None) => {
                return Err(ModelError::Tensor {
                    tensor: format!("pipeline stage {s}"),
                    detail: "needs the previous stage's activation".into(),
                });
            }
            (s, Some(x)) => {
                if x.len() != n {
                    return Err(ModelError::Tensor {
                        tensor: format!("activation into stage {s}"),
                        detail: format!("has {} elements, expected {rows} rows × {hidden} = {n}", x.len()),
                    });
                }
                (x, None)
            }
        };

        let (mut xs, mut caches) = (Vec::new(), Vec::new());
        for (block, &layer) in self.blocks[range.clone()].iter().zip(&self.block_layers[range]) {
            let mut y = zeros(n);
            let cache =
                block.forward_packed(&x, batch, seq, packing.as_ref(), alpha, &mut y, threads, exchange)?;
            record_moe(&mut stats, layer, &cache);
            xs.push(std::mem::replace(&mut x, y));
            caches.push(cache);
        }

        let mut cache = ChunkCache { stage, batch, seq, inputs, xs, blocks: caches, last: None };
        if stage != self.layout.last() {
            return Ok(ChunkForward { output: Some(x), stats, cache });
        }

        // The last stage: the main head, then the MTP modules chained from h^0.
        let h0 = x;
        let d = self.mtp.len();
        let inv_rows = 1.0 / rows as f64;
        let norm = self.norm.as_ref().ok_or_else(|| self.missing("model.norm"))?;
        let targets = Self::gather_tokens(windows, 1, seq);
        let weights = packed_weights::<T>(sft, seq, 1)?;
        // A packed batch's weights already hold the mean; pre-training's is `1/rows`.
        let per_row = if sft.is_some() { 1.0 } else { inv_rows };
        let (main_ce, head) = self.head_pass(
            norm,
            &h0,
            rows,
            &targets,
            weights.as_deref(),
            cast(per_row, "loss scale")?,
            threads,
        )?;
        stats.main_ce = Some(to_f64(main_ce));
        let mut heads = vec![head];
        let mtp_scale: T =
            if d > 0 { cast(loss.mtp_lambda / d as f64 * per_row, "loss scale")? } else { T::zero() };
        let mut passes: Vec<MtpPass<T>> = Vec::with_capacity(d);
        for module in &self.mtp {
            let k = module.depth();
            let tokens = Self::gather_tokens(windows, k, seq);
            let mut emb = zeros(n);
            self.embedding()?.forward(&tokens, &mut emb)?;
            let h_prev = passes.last().map_or(&h0, |p| &p.h);
            let mut h = zeros(n);
            let mtp_cache = module.forward_packed(
                h_prev,
                &emb,
                batch,
                seq,
                packing.as_ref(),
                alpha,
                &mut h,
                threads,
                exchange,
            )?;
            record_moe(&mut stats, module.layer(), &mtp_cache.block);
            let targets = Self::gather_tokens(windows, k + 1, seq);
            let weights = packed_weights::<T>(sft, seq, k + 1)?;
            let (ce, head) = self.head_pass(
                &module.shared_head_norm,
                &h,
                rows,
                &targets,
                weights.as_deref(),
                mtp_scale,
                threads,
            )?;
            stats.mtp_ce.push(to_f64(ce));
            heads.push(head);
            passes.push(MtpPass { tokens, emb, h, cache: mtp_cache });
        }
        cache.last = Some(LastStage { h0, heads, mtp: passes });
        Ok(ChunkForward { output: None, stats, cache })
    }

    /// B of a chunk: `output_grad` is the gradient at the chunk's output (from the next
    /// stage; `None` for the last stage, which starts from its losses).
    pub fn backward_input(
        &self,
        cache: &ChunkCache<T>,
        output_grad: Option<Vec<T>>,
        threads: usize,
        exchange: &mut dyn ExpertExchange,
    ) -> Result<ChunkBackward<T>, ModelError> {
        let stage = cache.stage;
        let range = self.stage_blocks(stage)?;
        let rows = cache.batch * cache.seq;
        let n = rows * self.config.hidden_size;
        let one = T::one();
        let mut weight =
            ChunkWeightGrads { blocks: Vec::new(), d_embedding: None, d_normed: Vec::new(), mtp: Vec::new() };

        let mut dy = match (&cache.last, output_grad) {
            (Some(last), None) => {
                self.last_stage_backward_input(last, rows, n, threads, exchange, &mut weight)?
            }
            (None, Some(dy)) => {
                if dy.len() != n {
                    return Err(ModelError::Tensor {
                        tensor: format!("gradient into stage {stage}"),
                        detail: format!("has {} elements, expected {n}", dy.len()),
                    });
                }
                dy
            }
            (Some(_), Some(_)) => {
                return Err(ModelError::Tensor {
                    tensor: format!("pipeline stage {stage}"),
                    detail: "the last stage starts its backward from its losses, not from a gradient".into(),
                });
            }
            (None, None) => {
                return Err(ModelError::Tensor {
                    tensor: format!("pipeline stage {stage}"),
                    detail: "needs the next stage's gradient".into(),
                });
            }
        };

        let blocks = &self.blocks[range];
        let mut grads = Vec::with_capacity(blocks.len());
        for ((block, block_cache), x) in blocks.iter().zip(&cache.blocks).zip(&cache.xs).rev() {
            let mut dx = zeros(n);
            grads.push(block.backward_input(block_cache, x, &dy, one, &mut dx, threads, exchange)?);
            dy = dx;
        }
        grads.reverse();
        weight.blocks = grads;
        if stage == 0 {
            weight.d_embedding = Some(dy);
            Ok(ChunkBackward { input_grad: None, weight })
        } else {
            Ok(ChunkBackward { input_grad: Some(dy), weight })
        }
    }

    /// B of the heads and MTP modules (deepest first, as `Model`'s backward): returns the
    /// gradient at `h^0`.
    fn last_stage_backward_input(
        &self,
        last: &LastStage<T>,
        rows: usize,
        n: usize,
        threads: usize,
        exchange: &mut dyn ExpertExchange,
        weight: &mut ChunkWeightGrads<T>,
    ) -> Result<Vec<T>, ModelError> {
        let mut d_normed_all = vec![Vec::new(); last.heads.len()];
        let mut mtp_grads = Vec::with_capacity(last.mtp.len());
        let mut d_next: Option<Vec<T>> = None;
        for (m, pass) in last.mtp.iter().enumerate().rev() {
            let head = &last.heads[m + 1];
            let module = &self.mtp[m];
            let mut d_normed = zeros(n);
            head_backward_input(
                &self.backend,
                self.head_weight()?,
                &head.dlogits,
                rows,
                &mut d_normed,
                threads,
            )?;
            let mut dh = d_next.take().unwrap_or_else(|| zeros(n));
            module.shared_head_norm.backward_input(&head.norm, &pass.h, &d_normed, &mut dh, true)?;
            let h_prev = if m == 0 { &last.h0 } else { &last.mtp[m - 1].h };
            let (mut d_prev, mut d_emb) = (zeros(n), zeros(n));
            let grads = module.backward_input(
                &pass.cache,
                h_prev,
                &pass.emb,
                &dh,
                T::one(),
                &mut d_prev,
                &mut d_emb,
                threads,
                exchange,
            )?;
            mtp_grads.push((grads, d_emb));
            d_normed_all[m + 1] = d_normed;
            d_next = Some(d_prev);
        }
        mtp_grads.reverse();

        let head = &last.heads[0];
        let norm = self.norm.as_ref().ok_or_else(|| self.missing("model.norm"))?;
        let mut d_normed = zeros(n);
        head_backward_input(&self.backend, self.head_weight()?, &head.dlogits, rows, &mut d_normed, threads)?;
        let mut dy = d_next.unwrap_or_else(|| zeros(n));
        norm.backward_input(&head.norm, &last.h0, &d_normed, &mut dy, true)?;
        d_normed_all[0] = d_normed;
        weight.d_normed = d_normed_all;
        weight.mtp = mtp_grads;
        Ok(dy)
    }

    /// W of a chunk: accumulates every weight gradient, in the order `Model`'s backward
    /// does within one pass (MTP modules deepest first, the main head and norm, the blocks
    /// last first, the embedding).
    pub fn backward_weight(
        &mut self,
        cache: ChunkCache<T>,
        grads: ChunkWeightGrads<T>,
        threads: usize,
    ) -> Result<(), ModelError> {
        let range = self.stage_blocks(cache.stage)?;
        let rows = cache.batch * cache.seq;
        let be = self.backend;
        if let Some(last) = &cache.last {
            if grads.d_normed.len() != last.heads.len() || grads.mtp.len() != last.mtp.len() {
                return Err(ModelError::Tensor {
                    tensor: format!("pipeline stage {}", cache.stage),
                    detail: "the weight-gradient inputs do not match the chunk's heads".into(),
                });
            }
            for (m, (pass, (mtp_grads, d_emb))) in last.mtp.iter().zip(&grads.mtp).enumerate().rev() {
                let head = &last.heads[m + 1];
                head_backward_weight(
                    &be,
                    self.head_weight_mut()?,
                    &head.dlogits,
                    &head.normed,
                    rows,
                    threads,
                )?;
                let h_prev = if m == 0 { &last.h0 } else { &last.mtp[m - 1].h };
                let module = &mut self.mtp[m];
                module.shared_head_norm.backward_weight(&head.norm, &pass.h, &grads.d_normed[m + 1])?;
                module.backward_weight(&pass.cache, mtp_grads, h_prev, &pass.emb, threads)?;
                self.embedding_mut()?.backward_weight(&pass.tokens, d_emb)?;
            }
            let head = &last.heads[0];
            head_backward_weight(&be, self.head_weight_mut()?, &head.dlogits, &head.normed, rows, threads)?;
            let norm = match &mut self.norm {
                Some(norm) => norm,
                None => {
                    return Err(ModelError::Tensor {
                        tensor: "model.norm".into(),
                        detail: "not held".into(),
                    });
                }
            };
            norm.backward_weight(&head.norm, &last.h0, &grads.d_normed[0])?;
        }
        if grads.blocks.len() != range.len() {
            return Err(ModelError::Tensor {
                tensor: format!("pipeline stage {}", cache.stage),
                detail: format!(
                    "{} blocks' weight-gradient inputs for {} blocks",
                    grads.blocks.len(),
                    range.len()
                ),
            });
        }
        let blocks = &mut self.blocks[range];
        for (((block, block_cache), block_grads), x) in
            blocks.iter_mut().zip(&cache.blocks).zip(&grads.blocks).zip(&cache.xs).rev()
        {
            block.backward_weight(block_cache, block_grads, x, threads)?;
        }
        if let (Some(tokens), Some(d)) = (&cache.inputs, &grads.d_embedding) {
            self.embedding_mut()?.backward_weight(tokens, d)?;
        }
        Ok(())
    }
}

/// Adds a block's balance loss and expert loads to the chunk's statistics.
fn record_moe<T: Real>(stats: &mut ChunkStats, layer: usize, cache: &BlockCache<T>) {
    if let Some(moe) = cache.moe() {
        stats.balance_loss += to_f64(moe.balance_loss);
        stats.moe_layers.push(layer);
        stats.expert_loads.push(moe.expert_load.clone());
    }
}
