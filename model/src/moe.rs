//! The DeepSeekMoE feed-forward layer (DeepSeek-V3 report §2.1.2; DESIGN §1.1): one fused
//! shared expert that every token passes through, plus `n_routed_experts` SwiGLU experts
//! of which each token uses `num_experts_per_tok`, chosen by a sigmoid gate with
//! group-limited top-k on bias-corrected scores (HF `topk_method = "noaux_tc"`).
//!
//! ## Forward
//! For tokens `x: [tokens, hidden]`:
//! 1. logits `u = x·Gᵀ` (`G` = `{prefix}.gate.weight`, `[n_routed, hidden]`, always in the
//!    layer's float type, never FP8), scores `s = sigmoid(u)`;
//! 2. selection scores `s + b` (`b` = `{prefix}.gate.e_score_correction_bias`); [`route`]
//!    keeps the `topk_group` best of `n_group` groups (a group scored by the sum of its two
//!    best selection scores), then the `num_experts_per_tok` best experts inside them;
//! 3. routing weights are the **unbiased** scores `s` of the chosen experts, divided by
//!    their sum (plus 1e-20) when `norm_topk_prob`, times `routed_scaling_factor`;
//! 4. `y = shared(x) + Σ_chosen w_e·expert_e(x)`. No token is dropped; there is no
//!    capacity. Routed experts run on a grouped layout: the dispatch layout is a counting
//!    sort of the `tokens·top_k` routed rows by expert, tokens in index order within an
//!    expert ([`MoeCache::expert_offsets`], `expert_tokens`, `expert_slots`); each expert's
//!    FFN runs once on its block of rows, and the weighted rows are added into `y` in the
//!    layout's order: experts in index order, then tokens in order.
//!
//! The gate reads `x` in the layer's float type; the experts read it as the caller keeps
//! it for W ([`MoeLayer::cache_input`]): under fp8 one 1×128-tiled FP8 copy of all tokens,
//! whose rows are the dispatch payload. Each expert keeps the rows it ran on for its Wgrad
//! ([`MoeCache::expert_inputs`], FP8 under fp8: `top_k` times the input's size), since under
//! expert parallelism they are not on the rank that holds the tokens. Under fp8 the
//! experts also keep their SwiGLU inputs in FP8 ([`SwiGluFfn::fp8_swiglu_inputs`]).
//!
//! ## Expert parallelism: dispatch → experts → combine
//! The routed experts are split over an expert-parallel (EP) group of `n` ranks
//! ([`ExpertShard`]): EP rank `p` holds experts `p·N/n .. (p+1)·N/n` (`n` must divide
//! `N = n_routed_experts`; [`MoeLayer::expert_range`]); the gate, the bias and the shared
//! experts are on every rank, and each rank routes its own tokens (their *home* rank).
//! Messages are bytes handed to an [`ExpertExchange`] ([`LocalExchange`]: the group of
//! one, [`ExpertShard::FULL`]), keyed by the HF layer index and the [`ExchangePhase`]:
//!
//! 1. Home: gate, routing, balance loss and `expert_load` (all `N` experts, this rank's
//!    tokens) as above; the dispatch layout; the shared experts.
//! 2. **Dispatch**: to each group rank `p`, the home's rows for `p`'s experts, a contiguous
//!    range of the layout (expert by expert, tokens in order), from the experts' input as
//!    kept.
//! 3. Owner: each local expert concatenates what arrived for it, source ranks in order,
//!    each source's rows in the order sent, runs its FFN once on that block and keeps the
//!    block's input and its FFN cache ([`MoeCache::received_rows`] records the counts).
//! 4. **Combine**: each owner returns to each source that source's rows of unweighted
//!    expert outputs, in the order received; concatenated by owner they are exactly the
//!    home's dispatch layout. The home keeps them ([`MoeCache::expert_outputs`], for
//!    `dL/dw`) and adds `w·out` into `y` in the layout's order, as a single process does.
//!
//! B ([`MoeLayer::backward_input`]): the home forms `w·dy` for every routed row and the
//! `dL/dw` dots; **BackwardDispatch** sends the rows to the owners in the dispatch layout
//! (each owner checks the counts against what its forward received); each local expert
//! runs its B on its block (keeping what its W needs); **BackwardCombine** returns the
//! input gradients in the order received, and the home adds them into `dx` in the layout's
//! order (after the shared experts' `dx`, before `du·G`). W ([`MoeLayer::backward_weight`])
//! exchanges nothing: the gate from `du` and `x` on the home, each local expert from the
//! rows it kept and their gradients.
//!
//! Every rank of the group makes the four exchanges of every call of the layer (two in
//! forward, two in B) in that order, even with nothing to send: a message with no rows is
//! the empty buffer. A message that does not parse, has the wrong length, counts that do
//! not match, or another format than expected is a [`ModelError`] naming the layer, the
//! phase and the source rank.
//!
//! ### Message formats
//! The framing (a format tag, rows per expert, the rows) is [`crate::expert_parallel`]'s.
//!
//! | exchange | fp32 | bf16 | fp8 |
//! | --- | --- | --- | --- |
//! | Dispatch | f32 (`T`) | BF16 | E4M3 codes + 1×128 f32 scales as kept, 1 + 4/128 bytes an element |
//! | Combine, BackwardDispatch, BackwardCombine | f32 | BF16 | BF16 |
//!
//! In a group of one every exchange but Dispatch stays f32, so the single-process layer
//! rounds nothing. The dispatch is lossless in every precision: the FP8 codes and scales
//! are what the experts' Fprop reads, and the BF16 GEMMs round their inputs to BF16 anyway
//! (Fprop, and Wgrad again in W). Under bf16 the combine is lossless too (`down_proj`'s
//! outputs are BF16 already), and so is BackwardDispatch (Dgrad and Wgrad round `dy` to
//! BF16); BackwardCombine rounds the experts' input gradients, each the f32 sum of two
//! BF16 Dgrads. Under fp8 with EP all three round, as DeepSeek's BF16 combine does: the
//! expert outputs, the experts' output gradients (before their FP8 quantization, whose
//! rounding is thereby drawn anew) and their input gradients; single-process fp8 does not.
//!
//! ### What equals what
//! With [`LocalExchange`] the results are those of the layer before expert parallelism,
//! bit for bit: the same blocks, the same order of every sum. Under EP in fp32 every sum
//! on the home (into `y` and `dx`, `du`, `dG`) runs in the single-process order, and an
//! expert's rows come back from a block holding every source's rows; so EP equals each
//! rank's single-process run bit for bit as far as the GEMMs' per-row results do not
//! depend on the block's other rows. The FP8 GEMM's do not; the `gemm` crate's f32 kernels
//! are chosen by shape (a product with `rows·cols ≤ 256` sums along K in SIMD lanes, one
//! row is a GEMV), so a rank's block of 1–4 rows of an expert may differ from the owner's
//! in the last bits. An expert's weight gradient is one Wgrad GEMM over all sources' rows,
//! equal to the sum of per-rank gradients to summation order.
//!
//! ## Ties and determinism
//! Groups and experts are ranked by score, descending; **equal scores rank the lower
//! index first**. Ranking uses IEEE total order on the score plus zero (so `-0.0` ties
//! `+0.0`; a NaN score ranks deterministically but meaninglessly). Every sum (group
//! scores, routing weights, scatter-adds, input gradients) runs in a fixed order, and
//! the GEMMs are deterministic across thread counts, so results are bit-identical for
//! every `threads`.
//!
//! Experts outside the kept groups can never be chosen: they are masked with `-inf`, as in
//! DeepSeek's inference code and transformers ≥ 5 (older transformers masked with 0.0,
//! which differs only when the biased scores of kept experts are negative).
//!
//! ## Backward (B/W split)
//! [`MoeLayer::backward_input`] (B) returns `dx` and a [`MoeWeightGradInputs`]: the
//! shared and per-expert FFN gradients and the gate-logit gradient `du`.
//! [`MoeLayer::backward_weight`] (W) accumulates every weight gradient from them. The
//! routing weights get `dL/dw_e = ⟨dy_t, expert_e(x_t)⟩` (the unweighted expert outputs are
//! cached), which flows through the normalization and the sigmoid into `du`; then
//! `dx += du·G` (B) and `dG += duᵀ·x` (W). The top-k choice is piecewise constant: no
//! gradient flows through it, and none reaches the bias, whose `grad` stays zero.
//!
//! ## Sequence-wise balance loss (report eqs. 17–20)
//! With `tokens = batch·seq_len`, for each sequence of `T = seq_len` tokens:
//! `f_i = N_r/(K_r·T)·#{t : t chose i}`, `P_i = (1/T)·Σ_t s_{t,i}/Σ_j s_{t,j}`,
//! `L_b = α·Σ_i f_i·P_i`; the layer reports `L_bal = (1/batch)·Σ_b L_b`, the **mean** over
//! the sequences of the call (as DeepSeek's HF code averages its sequence-level auxiliary
//! loss over the batch). Its gradient treats `f` as constant and reaches `u` through `s`.
//! With `α = 0` nothing of it is computed and it is reported as 0.
//!
//! ## Auxiliary-loss-free balancing
//! [`MoeLayer::update_bias`] applies the report's rule to expert loads summed over the
//! whole global batch (every micro-batch and data-parallel rank), so every rank updates
//! its copy of the bias identically.

use crate::config::ModelConfig;
use crate::expert_parallel::{Encoder, Link, Message, Wire, concat_rows, concat_values, kept_wire};
use crate::ffn::{FfnCache, FfnWeightGradInputs, SwiGluFfn};
use crate::param::{Init, Param};
use crate::precision::{CacheBytes, CachedActivation, Precision};
use crate::{ConfigError, ModelError, Real, check_len};
use flotilla_kernels::backend::{Backend, DeviceBackend};
use flotilla_kernels::gemm::{MatMut, MatRef};
use flotilla_kernels::quant::ScaleRounding;
use std::borrow::Cow;
use std::cmp::Ordering;
use std::ops::Range;

pub use crate::expert_parallel::{ExchangeKey, ExchangePhase, ExpertExchange, ExpertShard, LocalExchange};

/// Added to the sum of the chosen scores before normalizing, as HF does.
const NORM_EPS: f64 = 1e-20;

fn cast<T: Real>(v: f64) -> T {
    T::from(v).expect("f64 converts to the float type")
}

/// The routing hyper-parameters of an MoE layer, with `DeepseekV3Config`'s names.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingConfig {
    /// Routed experts `N_r`.
    pub n_routed_experts: usize,
    /// Experts per token `K_r`.
    pub num_experts_per_tok: usize,
    /// Expert groups.
    pub n_group: usize,
    /// Groups each token may use.
    pub topk_group: usize,
    /// Whether the chosen weights are normalized to sum 1 (before scaling).
    pub norm_topk_prob: bool,
    /// Factor applied to the routing weights.
    pub routed_scaling_factor: f64,
}

impl RoutingConfig {
    /// Checks the relations routing relies on (the same ones [`ModelConfig::validate`]
    /// checks for configs with MoE layers).
    pub fn new(
        n_routed_experts: usize,
        num_experts_per_tok: usize,
        n_group: usize,
        topk_group: usize,
        norm_topk_prob: bool,
        routed_scaling_factor: f64,
    ) -> Result<Self, ModelError> {
        let invalid = |field: &'static str, detail: String| {
            Err(ModelError::Config(ConfigError::InvalidField { field, detail }))
        };
        if n_routed_experts == 0 {
            return invalid("n_routed_experts", "an MoE layer needs at least 1 routed expert".into());
        }
        if n_group == 0 || !n_routed_experts.is_multiple_of(n_group) {
            return invalid(
                "n_group",
                format!("must be ≥ 1 and divide n_routed_experts = {n_routed_experts}, got {n_group}"),
            );
        }
        let per_group = n_routed_experts / n_group;
        if n_group > 1 && per_group < 2 {
            return invalid(
                "n_group",
                format!("groups are scored by their top-2 experts, so need ≥ 2 each, got {per_group}"),
            );
        }
        if topk_group == 0 || topk_group > n_group {
            return invalid("topk_group", format!("must be in 1..={n_group}, got {topk_group}"));
        }
        if num_experts_per_tok == 0 || num_experts_per_tok > topk_group * per_group {
            return invalid(
                "num_experts_per_tok",
                format!("must be in 1..={}, got {num_experts_per_tok}", topk_group * per_group),
            );
        }
        if !(routed_scaling_factor.is_finite() && routed_scaling_factor > 0.0) {
            return invalid(
                "routed_scaling_factor",
                format!("must be finite and > 0, got {routed_scaling_factor}"),
            );
        }
        Ok(RoutingConfig {
            n_routed_experts,
            num_experts_per_tok,
            n_group,
            topk_group,
            norm_topk_prob,
            routed_scaling_factor,
        })
    }

    /// The routing fields of a model config.
    pub fn from_model(cfg: &ModelConfig) -> Result<Self, ModelError> {
        Self::new(
            cfg.n_routed_experts,
            cfg.num_experts_per_tok,
            cfg.n_group,
            cfg.topk_group,
            cfg.norm_topk_prob,
            cfg.routed_scaling_factor,
        )
    }

    /// Experts per group.
    pub fn experts_per_group(&self) -> usize {
        self.n_routed_experts / self.n_group
    }
}

/// The experts chosen for each token and their weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing<T> {
    /// Tokens routed.
    pub tokens: usize,
    /// Experts per token (`K_r`).
    pub top_k: usize,
    /// `[tokens, top_k]` expert indices, each token's in rank order (best selection score
    /// first; ties: lower index first).
    pub experts: Vec<usize>,
    /// `[tokens, top_k]` routing weights, aligned with `experts`.
    pub weights: Vec<T>,
}

/// Ranks `a` before `b` when its score is larger, or equal with a lower index.
fn rank<T: Real>(a: (T, usize), b: (T, usize)) -> Ordering {
    let key = |v: T| (v + T::zero()).to_f64().expect("a float converts to f64");
    key(b.0).total_cmp(&key(a.0)).then(a.1.cmp(&b.1))
}

/// Keeps the `k` best of `candidates` (by `score`, see [`rank`]) in rank order.
fn top_k<T: Real>(candidates: &mut Vec<usize>, k: usize, score: impl Fn(usize) -> T) {
    let cmp = |a: &usize, b: &usize| rank((score(*a), *a), (score(*b), *b));
    if k < candidates.len() {
        candidates.select_nth_unstable_by(k, cmp);
        candidates.truncate(k);
    }
    candidates.sort_unstable_by(cmp);
}

/// The sum of the two best of `v` (`v.len() ≥ 2`), the better one first.
fn top2_sum<T: Real>(v: &[T]) -> T {
    let (mut best, mut second) = ((v[0], 0), (v[1], 1));
    if rank(second, best).is_lt() {
        std::mem::swap(&mut best, &mut second);
    }
    for (i, &x) in v.iter().enumerate().skip(2) {
        if rank((x, i), best).is_lt() {
            second = best;
            best = (x, i);
        } else if rank((x, i), second).is_lt() {
            second = (x, i);
        }
    }
    best.0 + second.0
}

/// Group-limited top-k routing (noaux_tc) of `tokens` rows of sigmoid `scores`
/// (`[tokens, n_routed]`) with selection bias `bias` (`[n_routed]`). See the module docs
/// for the rule, the weights and the tie-breaking.
pub fn route<T: Real>(
    cfg: &RoutingConfig,
    scores: &[T],
    bias: &[T],
    tokens: usize,
) -> Result<Routing<T>, ModelError> {
    let n = cfg.n_routed_experts;
    check_len("e_score_correction_bias", "bias", n, bias.len())?;
    check_len("routing scores", "scores", tokens * n, scores.len())?;
    let (k, per_group) = (cfg.num_experts_per_tok, cfg.experts_per_group());
    let group_limited = cfg.n_group > 1 && cfg.topk_group < cfg.n_group;
    let scale: T = cast(cfg.routed_scaling_factor);
    let mut routing = Routing {
        tokens,
        top_k: k,
        experts: Vec::with_capacity(tokens * k),
        weights: Vec::with_capacity(tokens * k),
    };
    let mut select = vec![T::zero(); n];
    let mut group_score = vec![T::zero(); cfg.n_group];
    let mut groups = Vec::with_capacity(cfg.n_group);
    let mut candidates = Vec::with_capacity(n);
    for s in scores.chunks_exact(n) {
        for ((sel, &s), &b) in select.iter_mut().zip(s).zip(bias) {
            *sel = s + b;
        }
        candidates.clear();
        if group_limited {
            for (g, gs) in group_score.iter_mut().enumerate() {
                *gs = top2_sum(&select[g * per_group..(g + 1) * per_group]);
            }
            groups.clear();
            groups.extend(0..cfg.n_group);
            top_k(&mut groups, cfg.topk_group, |g| group_score[g]);
            groups.sort_unstable();
            candidates.extend(groups.iter().flat_map(|&g| g * per_group..(g + 1) * per_group));
        } else {
            candidates.extend(0..n);
        }
        top_k(&mut candidates, k, |e| select[e]);
        let start = routing.weights.len();
        routing.experts.extend_from_slice(&candidates);
        routing.weights.extend(candidates.iter().map(|&e| s[e]));
        let w = &mut routing.weights[start..];
        if cfg.norm_topk_prob {
            let denom = w.iter().fold(T::zero(), |acc, &v| acc + v) + cast(NORM_EPS);
            w.iter_mut().for_each(|v| *v = *v / denom);
        }
        w.iter_mut().for_each(|v| *v = *v * scale);
    }
    Ok(routing)
}

/// `max / mean` of per-expert token counts: 1 is perfect balance, `n_routed` is every
/// token on one expert. 1 when no token was counted.
pub fn max_over_mean_load(counts: &[u64]) -> f64 {
    let total: u128 = counts.iter().map(|&c| c as u128).sum();
    if total == 0 {
        return 1.0;
    }
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    max * counts.len() as f64 / total as f64
}

/// One DeepSeekMoE layer: gate, shared expert(s), and the routed experts of one expert
/// shard (all of them in a group of one).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeLayer<T> {
    /// The HF name prefix, e.g. `model.layers.3.mlp`.
    pub prefix: String,
    /// Model width.
    pub hidden: usize,
    /// Routing hyper-parameters.
    pub routing: RoutingConfig,
    /// `{prefix}.gate.weight`, `[n_routed, hidden]`.
    pub gate: Param<T>,
    /// `{prefix}.gate.e_score_correction_bias`, `[n_routed]`, starts at 0. Changed only by
    /// [`MoeLayer::update_bias`]; its `grad` stays zero, and [`MoeLayer::params_mut`]
    /// leaves it out so that no optimizer (nor weight decay) touches it.
    pub e_score_correction_bias: Param<T>,
    /// `{prefix}.shared_experts.*`: the `n_shared_experts` shared experts fused into one
    /// FFN of width `n_shared·moe_intermediate_size`, as HF stores them; `None` when
    /// `n_shared_experts = 0`.
    pub shared_experts: Option<SwiGluFfn<T>>,
    /// The local routed experts, `{prefix}.experts.{e}.*` for `e` in
    /// [`MoeLayer::expert_range`] in order (`experts[j]` is expert `expert_range().start + j`),
    /// one FFN of width `moe_intermediate_size` each.
    pub experts: Vec<SwiGluFfn<T>>,
    /// The HF layer index (from the prefix), which keys the layer's exchanges.
    layer: usize,
    /// Which routed experts this layer holds.
    shard: ExpertShard,
    /// The backend the gate runs on; [`MoeLayer::set_backend`] sets it and the experts'.
    backend: DeviceBackend,
}

/// What [`MoeLayer::forward`] keeps for backward, and what it reports. The first part is
/// the home rank's (its tokens: routing, the dispatch layout, the combined outputs), the
/// last four fields the owner's (the rows its local experts received and ran).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeCache<T> {
    /// Sequences in the call.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sigmoid scores `s`, `[tokens, n_routed]` (the logits are not kept: `s' = s(1−s)`).
    pub scores: Vec<T>,
    /// Chosen experts and routing weights.
    pub routing: Routing<T>,
    /// Dispatch layout: expert `e`'s rows are `expert_offsets[e]..expert_offsets[e + 1]`
    /// (`[n_routed + 1]`) of `expert_tokens` / `expert_slots` / `expert_outputs`.
    pub expert_offsets: Vec<usize>,
    /// The token of each dispatched row, increasing within an expert.
    pub expert_tokens: Vec<usize>,
    /// The position (0..top_k) of each dispatched row in its token's [`Routing`] entry.
    pub expert_slots: Vec<usize>,
    /// Each dispatched row's unweighted expert output as Combine returned it,
    /// `[tokens·top_k, hidden]` in the dispatch layout (for `dL/dw = ⟨dy, expert(x)⟩`).
    pub expert_outputs: Vec<T>,
    /// The shared expert's FFN cache.
    pub shared: Option<FfnCache<T>>,
    /// The balance-loss weight α of the call.
    pub balance_alpha: f64,
    /// `f_i` per sequence, `[batch, n_routed]`; empty when α = 0 (or no tokens).
    pub seq_load: Vec<T>,
    /// `L_bal`, the mean over sequences (0 when α = 0).
    pub balance_loss: T,
    /// Tokens of this call routed to each expert (all `n_routed`, local or not).
    pub expert_load: Vec<u64>,
    /// The EP degree of the call.
    pub group_size: usize,
    /// Rows each local expert received from each group rank, `[local experts, group_size]`:
    /// local expert `j` ran on source 0's rows, then source 1's, …, each in the order sent.
    pub received_rows: Vec<usize>,
    /// Each local expert's received input as kept (FP8 codes and scales under fp8), read
    /// by its Wgrad; `None` for experts that got no row.
    pub expert_inputs: Vec<Option<CachedActivation<T>>>,
    /// Each local expert's FFN cache; `None` for experts that got no row.
    pub expert_caches: Vec<Option<FfnCache<T>>>,
}

impl<T: Real> MoeCache<T> {
    /// Tokens of the call.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq_len
    }

    /// The bytes held.
    pub fn bytes(&self) -> CacheBytes {
        let indices = self.routing.experts.len()
            + self.expert_offsets.len()
            + self.expert_tokens.len()
            + self.expert_slots.len()
            + self.received_rows.len();
        let floats =
            self.scores.len() + self.routing.weights.len() + self.expert_outputs.len() + self.seq_load.len();
        let ffns: CacheBytes =
            self.expert_caches.iter().chain([&self.shared]).flatten().map(FfnCache::bytes).sum();
        let inputs: CacheBytes = self.expert_inputs.iter().flatten().map(CachedActivation::bytes).sum();
        CacheBytes::of::<T>(floats)
            + CacheBytes::of::<usize>(indices)
            + CacheBytes::of::<u64>(self.expert_load.len())
            + ffns
            + inputs
    }
}

/// What B hands to W.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeWeightGradInputs<T> {
    /// The shared expert's.
    pub shared: Option<FfnWeightGradInputs<T>>,
    /// Each local routed expert's (its `dy` is the weighted gradient of the rows it
    /// received); `None` for experts that got no row.
    pub experts: Vec<Option<FfnWeightGradInputs<T>>>,
    /// Gradient at the gate logits `u`, `[tokens, n_routed]` (routing-weight and
    /// balance-loss terms).
    pub du: Vec<T>,
}

/// The layer index `i` of a prefix `model.layers.{i}.…`.
fn layer_of(prefix: &str) -> Result<usize, ModelError> {
    let index = prefix.strip_prefix("model.layers.").and_then(|rest| rest.split('.').next());
    index.and_then(|i| i.parse().ok()).ok_or_else(|| ModelError::Tensor {
        tensor: prefix.to_string(),
        detail: "an MoE layer's prefix must be `model.layers.{i}.…` (its index keys the exchanges)".into(),
    })
}

impl<T: Real> MoeLayer<T> {
    /// The MoE layer `{prefix}` (e.g. `model.layers.3.mlp`) of `cfg` with every routed
    /// expert: [`MoeLayer::new_sharded`] with [`ExpertShard::FULL`].
    pub fn new(cfg: &ModelConfig, prefix: &str, seed: u64) -> Result<Self, ModelError> {
        Self::new_sharded(cfg, prefix, seed, ExpertShard::FULL)
    }

    /// The MoE layer `{prefix}` (`model.layers.{i}.…`) of `cfg` holding the routed experts
    /// of `shard` (EP rank `p` of `n` holds experts `p·N/n .. (p+1)·N/n`; `n` must divide
    /// `N = n_routed_experts`), and the whole gate, bias and shared experts. Weights are
    /// drawn from Normal(0, `initializer_range`) by `(seed, name)`, so shard `p`'s expert
    /// `e` equals the full layer's; bias 0.
    pub fn new_sharded(
        cfg: &ModelConfig,
        prefix: &str,
        seed: u64,
        shard: ExpertShard,
    ) -> Result<Self, ModelError> {
        let routing = RoutingConfig::from_model(cfg)?;
        if cfg.hidden_size == 0 || cfg.moe_intermediate_size == 0 {
            return Err(ModelError::Config(ConfigError::InvalidField {
                field: "moe_intermediate_size",
                detail: format!(
                    "an MoE layer needs hidden_size and moe_intermediate_size ≥ 1, got {} and {}",
                    cfg.hidden_size, cfg.moe_intermediate_size
                ),
            }));
        }
        let (hidden, inter, std) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.initializer_range);
        let n = routing.n_routed_experts;
        let local = shard.experts(n)?;
        let layer = layer_of(prefix)?;
        let gate = Param::new(format!("{prefix}.gate.weight"), &[n, hidden], Init::Normal { std }, seed);
        let e_score_correction_bias =
            Param::new(format!("{prefix}.gate.e_score_correction_bias"), &[n], Init::Constant(0.0), seed);
        let shared_experts = (cfg.n_shared_experts > 0).then(|| {
            SwiGluFfn::new(
                &format!("{prefix}.shared_experts"),
                hidden,
                cfg.n_shared_experts * inter,
                std,
                seed,
            )
        });
        let experts = local
            .map(|e| SwiGluFfn::new(&format!("{prefix}.experts.{e}"), hidden, inter, std, seed))
            .collect();
        Ok(MoeLayer {
            prefix: prefix.to_string(),
            hidden,
            routing,
            gate,
            e_score_correction_bias,
            shared_experts,
            experts,
            layer,
            shard,
            backend: DeviceBackend::default(),
        })
    }

    /// The routed experts this layer holds (all of them for [`ExpertShard::FULL`]).
    pub fn expert_range(&self) -> Range<usize> {
        let per = self.experts_per_rank();
        self.shard.rank * per..(self.shard.rank + 1) * per
    }

    /// The expert shard this layer holds.
    pub fn shard(&self) -> ExpertShard {
        self.shard
    }

    /// The HF layer index, `i` of `model.layers.{i}.mlp` (the [`ExchangeKey`]'s layer).
    pub fn layer(&self) -> usize {
        self.layer
    }

    fn experts_per_rank(&self) -> usize {
        self.n_routed() / self.shard.size
    }

    /// Sets the precision of the shared and routed experts ([`crate::precision`]), and under
    /// fp8 their keeping the SwiGLU inputs in FP8; the gate always computes in the layer's
    /// float type.
    pub fn set_precision(&mut self, precision: Precision) {
        for ffn in self.shared_experts.iter_mut().chain(&mut self.experts) {
            ffn.set_precision(precision);
            ffn.fp8_swiglu_inputs = precision == Precision::Fp8;
        }
    }

    /// Runs the gate and every expert on `backend`.
    pub fn set_backend(&mut self, backend: DeviceBackend) {
        for ffn in self.shared_experts.iter_mut().chain(&mut self.experts) {
            ffn.set_backend(backend);
        }
        self.backend = backend;
    }

    /// The experts' precision.
    fn precision(&self) -> Precision {
        let experts = self.shared_experts.iter().chain(&self.experts);
        experts.map(|e| e.gate_proj.precision).next().unwrap_or_default()
    }

    /// `x: [tokens, hidden]` as the shared and routed experts keep their input
    /// ([`crate::linear::Linear::cache_input`]); a borrowed `x` is copied only when kept
    /// as it is.
    pub fn cache_input<'a>(
        &self,
        x: impl Into<Cow<'a, [T]>>,
        tokens: usize,
    ) -> Result<CachedActivation<T>, ModelError> {
        let what = format!("{}.experts input", self.prefix);
        CachedActivation::new(
            &self.backend,
            self.precision(),
            x,
            tokens,
            self.hidden,
            ScaleRounding::Exact,
            &what,
        )
    }

    /// Routed experts.
    pub fn n_routed(&self) -> usize {
        self.routing.n_routed_experts
    }

    fn gate_view(&self) -> Result<MatRef<'_, T>, ModelError> {
        Ok(MatRef::row_major(self.gate.value.host(), self.n_routed(), self.hidden, "gate")?)
    }

    /// Sigmoid gate scores `s = sigmoid(x·Gᵀ)`, `[tokens, n_routed]`.
    pub fn scores(&self, x: &[T], tokens: usize, threads: usize) -> Result<Vec<T>, ModelError> {
        check_len(&self.gate.name, "input", tokens * self.hidden, x.len())?;
        let mut s = vec![T::zero(); tokens * self.n_routed()];
        self.backend.matmul(
            MatMut::row_major(&mut s, tokens, self.n_routed(), "logits")?,
            T::zero(),
            MatRef::row_major(x, tokens, self.hidden, "x")?,
            self.gate_view()?.t(),
            T::one(),
            threads,
        )?;
        self.backend.sigmoid_in_place(&mut s);
        Ok(s)
    }

    /// The format of dispatched rows kept in full: BF16 under bf16 (lossless: the BF16
    /// GEMMs round their inputs to BF16 anyway), `T` itself otherwise. FP8-kept rows go as
    /// they are ([`kept_wire`]).
    fn dispatch_wire(&self) -> Wire {
        if self.precision() == Precision::Bf16 { Wire::Bf16 } else { Wire::native::<T>() }
    }

    /// The format of Combine and of both backward exchanges: BF16 under bf16 and fp8 in a
    /// group of more than one (as DeepSeek), `T` itself under fp32 and in a group of one.
    fn reply_wire(&self) -> Wire {
        if self.shard.size > 1 && self.precision() != Precision::Fp32 {
            Wire::Bf16
        } else {
            Wire::native::<T>()
        }
    }

    fn link(&self, phase: ExchangePhase, peer: usize, received: bool) -> Link<'_> {
        Link { tensor: &self.prefix, phase, peer, received }
    }

    /// Checks that `exchange` is this layer's EP group seen from this layer's rank.
    fn check_exchange(&self, exchange: &dyn ExpertExchange) -> Result<(), ModelError> {
        let (rank, size) = (exchange.group_rank(), exchange.group_size());
        if (rank, size) != (self.shard.rank, self.shard.size) {
            return Err(ModelError::Tensor {
                tensor: self.prefix.clone(),
                detail: format!(
                    "the expert exchange is EP rank {rank} of {size}, the layer holds expert shard {} of {}",
                    self.shard.rank, self.shard.size
                ),
            });
        }
        Ok(())
    }

    /// One exchange of this layer: `outgoing[p]` to group rank `p`; what every rank sent
    /// here, by source.
    fn exchange_with(
        &self,
        exchange: &mut dyn ExpertExchange,
        phase: ExchangePhase,
        outgoing: Vec<Vec<u8>>,
    ) -> Result<Vec<Vec<u8>>, ModelError> {
        let incoming = exchange.exchange(ExchangeKey { layer: self.layer, phase }, outgoing)?;
        if incoming.len() != self.shard.size {
            return Err(ModelError::Tensor {
                tensor: self.prefix.clone(),
                detail: format!(
                    "{phase:?}: {} messages came back from a group of {}",
                    incoming.len(),
                    self.shard.size
                ),
            });
        }
        Ok(incoming)
    }

    /// Home → owners: to each group rank `p`, the rows of `p`'s experts in the dispatch
    /// layout `offsets` (expert by expert, tokens in order), written by
    /// `push(message, rows of the layout)`.
    fn messages_to_owners(
        &self,
        phase: ExchangePhase,
        offsets: &[usize],
        wire: Wire,
        mut push: impl FnMut(&mut Encoder<'_>, Range<usize>) -> Result<(), ModelError>,
    ) -> Result<Vec<Vec<u8>>, ModelError> {
        let per = self.experts_per_rank();
        (0..self.shard.size)
            .map(|p| {
                let experts = p * per..(p + 1) * per;
                let counts: Vec<usize> = experts.clone().map(|e| offsets[e + 1] - offsets[e]).collect();
                let mut message = Encoder::new(self.link(phase, p, false), wire, &counts, self.hidden)?;
                push(&mut message, offsets[experts.start]..offsets[experts.end])?;
                message.finish()
            })
            .collect()
    }

    /// Owners → home: every owner's returned rows, concatenated by owner (so in the
    /// dispatch layout `offsets`), `[rows, hidden]`; each message must hold the rows this
    /// rank sent its owner.
    fn rows_from_owners(
        &self,
        phase: ExchangePhase,
        offsets: &[usize],
        incoming: &[Vec<u8>],
        wire: Wire,
    ) -> Result<Vec<T>, ModelError> {
        let per = self.experts_per_rank();
        let mut out = Vec::with_capacity(offsets[self.n_routed()] * self.hidden);
        for (p, bytes) in incoming.iter().enumerate() {
            let link = self.link(phase, p, true);
            let sent: Vec<usize> = (p * per..(p + 1) * per).map(|e| offsets[e + 1] - offsets[e]).collect();
            let message = Message::parse(link, bytes, per, self.hidden, Some(wire))?;
            message.expect_counts(link, &sent)?;
            for j in 0..per {
                message.append_values(link, j, &mut out)?;
            }
        }
        Ok(out)
    }

    /// Owner: every source's message, checked; with `expected` (`[local experts,
    /// group_size]`, what forward received) each must hold those rows.
    fn messages_from_homes<'a>(
        &self,
        phase: ExchangePhase,
        incoming: &'a [Vec<u8>],
        wire: Option<Wire>,
        expected: Option<&[usize]>,
    ) -> Result<Vec<Message<'a>>, ModelError> {
        let (per, g) = (self.experts.len(), self.shard.size);
        let messages = incoming.iter().enumerate().map(|(s, bytes)| {
            let link = self.link(phase, s, true);
            let message = Message::parse(link, bytes, per, self.hidden, wire)?;
            if let Some(rows) = expected {
                let sent: Vec<usize> = (0..per).map(|j| rows[j * g + s]).collect();
                message.expect_counts(link, &sent)?;
            }
            Ok(message)
        });
        messages.collect()
    }

    /// Owner → homes: to each source, its rows of every local expert, in the order they
    /// were received; `rows[j]` is local expert `j`'s `[received rows, hidden]` (sources in
    /// order) and `received` is [`MoeCache::received_rows`].
    fn messages_to_homes(
        &self,
        phase: ExchangePhase,
        received: &[usize],
        rows: &[Vec<T>],
        wire: Wire,
    ) -> Result<Vec<Vec<u8>>, ModelError> {
        let (per, g, h) = (self.experts.len(), self.shard.size, self.hidden);
        for (j, r) in rows.iter().enumerate() {
            let expected: usize = received[j * g..(j + 1) * g].iter().sum();
            check_len(&self.prefix, &format!("{phase:?} rows of local expert {j}"), expected * h, r.len())?;
        }
        let mut next = vec![0usize; per];
        (0..g)
            .map(|s| {
                let counts: Vec<usize> = (0..per).map(|j| received[j * g + s]).collect();
                let mut message = Encoder::new(self.link(phase, s, false), wire, &counts, h)?;
                for (j, (&c, r)) in counts.iter().zip(rows).enumerate() {
                    message.push_values(&r[next[j] * h..(next[j] + c) * h])?;
                    next[j] += c;
                }
                message.finish()
            })
            .collect()
    }

    /// `y = shared(x) + Σ_chosen w_e·expert_e(x)` for `x, y: [batch·seq_len, hidden]` (`y`
    /// overwritten), with the sequence-wise balance loss of weight `balance_alpha`
    /// (0: not computed); `experts_input` is `x` as [`MoeLayer::cache_input`] keeps it.
    /// Routed rows travel through `exchange` (Dispatch, then Combine) to the ranks that
    /// own their experts, which are this layer's EP group ([`LocalExchange`] for a layer
    /// with every expert). The cache carries the balance loss and the per-expert load.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &[T],
        experts_input: &CachedActivation<T>,
        batch: usize,
        seq_len: usize,
        balance_alpha: f64,
        y: &mut [T],
        threads: usize,
        exchange: &mut dyn ExpertExchange,
    ) -> Result<MoeCache<T>, ModelError> {
        let (tokens, h, n) = (batch * seq_len, self.hidden, self.n_routed());
        check_len(&self.gate.name, "input", tokens * h, x.len())?;
        check_len(&self.gate.name, "experts' input", tokens * h, experts_input.len())?;
        check_len(&self.gate.name, "output", tokens * h, y.len())?;
        if !(balance_alpha.is_finite() && balance_alpha >= 0.0) {
            return Err(ModelError::Tensor {
                tensor: self.gate.name.clone(),
                detail: format!("balance-loss weight α must be finite and ≥ 0, got {balance_alpha}"),
            });
        }
        self.check_exchange(exchange)?;
        let scores = self.scores(x, tokens, threads)?;
        let routing = route(&self.routing, &scores, self.e_score_correction_bias.value.host(), tokens)?;
        let k = routing.top_k;

        // Dispatch layout (a counting sort: experts in index order, tokens in order).
        let mut expert_offsets = vec![0usize; n + 1];
        for &e in &routing.experts {
            expert_offsets[e + 1] += 1;
        }
        for e in 0..n {
            expert_offsets[e + 1] += expert_offsets[e];
        }
        let rows = tokens * k;
        let (mut expert_tokens, mut expert_slots) = (vec![0usize; rows], vec![0usize; rows]);
        let mut next = expert_offsets[..n].to_vec();
        for (i, &e) in routing.experts.iter().enumerate() {
            expert_tokens[next[e]] = i / k;
            expert_slots[next[e]] = i % k;
            next[e] += 1;
        }
        let expert_load = (0..n).map(|e| (expert_offsets[e + 1] - expert_offsets[e]) as u64).collect();

        let shared = match &self.shared_experts {
            Some(ffn) => Some(ffn.forward(experts_input, tokens, y, threads)?),
            None => {
                y.fill(T::zero());
                None
            }
        };

        // Dispatch (home): each owner gets the rows of its experts, as kept.
        let wire = kept_wire(experts_input, self.dispatch_wire());
        let outgoing =
            self.messages_to_owners(ExchangePhase::Dispatch, &expert_offsets, wire, |message, rows| {
                message.push_gathered(experts_input, &expert_tokens[rows])
            })?;
        let incoming = self.exchange_with(exchange, ExchangePhase::Dispatch, outgoing)?;

        // Experts (owner): each local expert on what arrived for it, sources in order.
        let messages = self.messages_from_homes(ExchangePhase::Dispatch, &incoming, None, None)?;
        let (per, g) = (self.experts.len(), self.shard.size);
        let mut received_rows = vec![0usize; per * g];
        for (s, message) in messages.iter().enumerate() {
            for (j, &c) in message.counts.iter().enumerate() {
                received_rows[j * g + s] = c;
            }
        }
        let (mut expert_inputs, mut expert_caches, mut outputs) =
            (Vec::with_capacity(per), Vec::with_capacity(per), Vec::with_capacity(per));
        for (j, ffn) in self.experts.iter().enumerate() {
            let received: usize = received_rows[j * g..(j + 1) * g].iter().sum();
            if received == 0 {
                expert_inputs.push(None);
                expert_caches.push(None);
                outputs.push(Vec::new());
                continue;
            }
            let input = concat_rows(&messages, j, h, |s| self.link(ExchangePhase::Dispatch, s, true))?;
            let mut out = vec![T::zero(); received * h];
            expert_caches.push(Some(ffn.forward(&input, received, &mut out, threads)?));
            expert_inputs.push(Some(input));
            outputs.push(out);
        }
        drop(messages);
        drop(incoming);

        // Combine: the unweighted outputs go home, where w·out is added to y, experts in
        // index order, tokens in order.
        let wire = self.reply_wire();
        let replies = self.messages_to_homes(ExchangePhase::Combine, &received_rows, &outputs, wire)?;
        drop(outputs);
        let returned = self.exchange_with(exchange, ExchangePhase::Combine, replies)?;
        let expert_outputs =
            self.rows_from_owners(ExchangePhase::Combine, &expert_offsets, &returned, wire)?;
        drop(returned);
        for (r, out) in expert_outputs.chunks_exact(h).enumerate() {
            let (t, w) = (expert_tokens[r], routing.weights[expert_tokens[r] * k + expert_slots[r]]);
            for (yv, &ov) in y[t * h..(t + 1) * h].iter_mut().zip(out) {
                *yv = *yv + w * ov;
            }
        }

        let (seq_load, balance_loss) = if balance_alpha > 0.0 && tokens > 0 {
            self.balance_loss(&scores, &routing, batch, seq_len, balance_alpha)
        } else {
            (Vec::new(), T::zero())
        };
        Ok(MoeCache {
            batch,
            seq_len,
            scores,
            routing,
            expert_offsets,
            expert_tokens,
            expert_slots,
            expert_outputs,
            shared,
            balance_alpha,
            seq_load,
            balance_loss,
            expert_load,
            group_size: g,
            received_rows,
            expert_inputs,
            expert_caches,
        })
    }

    /// `(f [batch, n_routed], L_bal)`.
    fn balance_loss(
        &self,
        scores: &[T],
        routing: &Routing<T>,
        batch: usize,
        seq_len: usize,
        alpha: f64,
    ) -> (Vec<T>, T) {
        let (n, k) = (self.n_routed(), routing.top_k);
        let f_scale: T = cast(n as f64 / (k as f64 * seq_len as f64));
        let inv_t: T = cast(1.0 / seq_len as f64);
        let mut seq_load = vec![T::zero(); batch * n];
        let mut total = T::zero();
        let mut p = vec![T::zero(); n];
        for b in 0..batch {
            let f = &mut seq_load[b * n..(b + 1) * n];
            p.fill(T::zero());
            for t in b * seq_len..(b + 1) * seq_len {
                for &e in &routing.experts[t * k..(t + 1) * k] {
                    f[e] = f[e] + T::one();
                }
                let s = &scores[t * n..(t + 1) * n];
                let z = s.iter().fold(T::zero(), |acc, &v| acc + v);
                for (pi, &si) in p.iter_mut().zip(s) {
                    *pi = *pi + si / z;
                }
            }
            let mut l = T::zero();
            for (fi, &pi) in f.iter_mut().zip(&p) {
                *fi = *fi * f_scale;
                l = l + *fi * (pi * inv_t);
            }
            total = total + l;
        }
        (seq_load, total * cast(alpha / batch as f64))
    }

    /// Checks that `cache` came from this layer's forward in this EP group.
    fn check_cache(&self, cache: &MoeCache<T>) -> Result<(), ModelError> {
        let (tokens, n, k) = (cache.tokens(), self.n_routed(), cache.routing.top_k);
        let (per, g, rows) = (self.experts.len(), self.shard.size, tokens * k);
        let name = &self.gate.name;
        check_len(name, "cached scores", tokens * n, cache.scores.len())?;
        check_len(name, "cached routing weights", rows, cache.routing.weights.len())?;
        check_len(name, "cached expert offsets", n + 1, cache.expert_offsets.len())?;
        check_len(name, "cached dispatched rows", rows, cache.expert_offsets[n])?;
        check_len(name, "cached dispatched tokens", rows, cache.expert_tokens.len())?;
        check_len(name, "cached dispatched slots", rows, cache.expert_slots.len())?;
        check_len(name, "cached expert outputs", rows * self.hidden, cache.expert_outputs.len())?;
        check_len(name, "cached EP degree", g, cache.group_size)?;
        check_len(name, "cached received rows", per * g, cache.received_rows.len())?;
        check_len(name, "cached expert inputs", per, cache.expert_inputs.len())?;
        check_len(name, "cached expert caches", per, cache.expert_caches.len())?;
        Ok(())
    }

    /// B: `dx` (overwritten, or accumulated with `accumulate`) from the output gradient
    /// `dy` and `balance_grad`, the gradient of the total loss with respect to the
    /// balance loss the forward reported (normally 1; ignored when its α was 0). The
    /// routed rows' gradients travel through `exchange` (BackwardDispatch, then
    /// BackwardCombine), the same group as the forward's.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_input(
        &self,
        cache: &MoeCache<T>,
        dy: &[T],
        balance_grad: T,
        dx: &mut [T],
        accumulate: bool,
        threads: usize,
        exchange: &mut dyn ExpertExchange,
    ) -> Result<MoeWeightGradInputs<T>, ModelError> {
        let (tokens, h, n) = (cache.tokens(), self.hidden, self.n_routed());
        let k = cache.routing.top_k;
        check_len(&self.gate.name, "output gradient", tokens * h, dy.len())?;
        check_len(&self.gate.name, "input gradient", tokens * h, dx.len())?;
        self.check_cache(cache)?;
        self.check_exchange(exchange)?;

        let shared = match (&self.shared_experts, &cache.shared) {
            (Some(ffn), Some(c)) => Some(ffn.backward_input(c, dy, dx, accumulate, threads)?),
            (None, None) => {
                if !accumulate {
                    dx.fill(T::zero());
                }
                None
            }
            _ => {
                return Err(ModelError::Tensor {
                    tensor: format!("{}.shared_experts", self.prefix),
                    detail: "the cache does not match the layer's shared experts".into(),
                });
            }
        };

        // Home: the weighted gradient w·dy of every dispatched row, and
        // dL/dw = ⟨dy_t, expert_e(x_t)⟩ per (token, slot).
        let mut dw = vec![T::zero(); tokens * k];
        let mut dye = vec![T::zero(); tokens * k * h];
        for (r, d) in dye.chunks_exact_mut(h).enumerate() {
            let (t, slot) = (cache.expert_tokens[r], cache.expert_slots[r]);
            let w = cache.routing.weights[t * k + slot];
            let dyt = &dy[t * h..(t + 1) * h];
            let out = &cache.expert_outputs[r * h..(r + 1) * h];
            let mut dot = T::zero();
            for ((dv, &g), &o) in d.iter_mut().zip(dyt).zip(out) {
                *dv = w * g;
                dot = dot + g * o;
            }
            dw[t * k + slot] = dot;
        }
        let wire = self.reply_wire();
        let phase = ExchangePhase::BackwardDispatch;
        let outgoing = self.messages_to_owners(phase, &cache.expert_offsets, wire, |m, rows| {
            m.push_values(&dye[rows.start * h..rows.end * h])
        })?;
        drop(dye);
        let incoming = self.exchange_with(exchange, phase, outgoing)?;

        // Owner: each local expert's B on the gradients of the rows it ran.
        let messages = self.messages_from_homes(phase, &incoming, Some(wire), Some(&cache.received_rows))?;
        let (mut experts, mut dxs) = (Vec::with_capacity(self.experts.len()), Vec::new());
        for (j, ffn) in self.experts.iter().enumerate() {
            let Some(c) = &cache.expert_caches[j] else {
                experts.push(None);
                dxs.push(Vec::new());
                continue;
            };
            let dye = concat_values(&messages, j, h, |s| self.link(phase, s, true))?;
            let mut dxe = vec![T::zero(); c.rows * h];
            experts.push(Some(ffn.backward_input(c, &dye, &mut dxe, false, threads)?));
            dxs.push(dxe);
        }
        drop(messages);
        drop(incoming);

        // BackwardCombine: the input gradients go home and are added to dx, experts in
        // index order, tokens in order.
        let replies =
            self.messages_to_homes(ExchangePhase::BackwardCombine, &cache.received_rows, &dxs, wire)?;
        drop(dxs);
        let returned = self.exchange_with(exchange, ExchangePhase::BackwardCombine, replies)?;
        let dxe =
            self.rows_from_owners(ExchangePhase::BackwardCombine, &cache.expert_offsets, &returned, wire)?;
        drop(returned);
        for (r, d) in dxe.chunks_exact(h).enumerate() {
            let t = cache.expert_tokens[r];
            for (xv, &dv) in dx[t * h..(t + 1) * h].iter_mut().zip(d) {
                *xv = *xv + dv;
            }
        }

        // dL/ds: routing weights, then the balance loss; then through the sigmoid.
        let mut du = vec![T::zero(); tokens * n];
        let scale: T = cast(self.routing.routed_scaling_factor);
        let eps: T = cast(NORM_EPS);
        for t in 0..tokens {
            let s = &cache.scores[t * n..(t + 1) * n];
            let ds = &mut du[t * n..(t + 1) * n];
            let chosen = &cache.routing.experts[t * k..(t + 1) * k];
            let g = &dw[t * k..(t + 1) * k];
            if self.routing.norm_topk_prob {
                // w_e = r·s_e/S, S = Σ_c s_c + ε: dL/ds_e = r·(g_e − Σ_c g_c·s_c/S)/S.
                let sum = chosen.iter().fold(T::zero(), |acc, &e| acc + s[e]) + eps;
                let gs = chosen.iter().zip(g).fold(T::zero(), |acc, (&e, &g)| acc + g * s[e]) / sum;
                for (&e, &g) in chosen.iter().zip(g) {
                    ds[e] = scale * (g - gs) / sum;
                }
            } else {
                for (&e, &g) in chosen.iter().zip(g) {
                    ds[e] = scale * g;
                }
            }
        }
        if cache.balance_alpha > 0.0 && tokens > 0 {
            check_len(&self.gate.name, "cached sequence loads", cache.batch * n, cache.seq_load.len())?;
            // dL_bal/ds_{t,j} = α/(B·T·Z_t)·(f_j − Σ_i f_i·s_{t,i}/Z_t).
            let c: T = balance_grad * cast(cache.balance_alpha / (cache.batch * cache.seq_len) as f64);
            for t in 0..tokens {
                let f = &cache.seq_load[(t / cache.seq_len) * n..(t / cache.seq_len + 1) * n];
                let s = &cache.scores[t * n..(t + 1) * n];
                let z = s.iter().fold(T::zero(), |acc, &v| acc + v);
                let fs = f.iter().zip(s).fold(T::zero(), |acc, (&f, &s)| acc + f * s) / z;
                for (d, &fj) in du[t * n..(t + 1) * n].iter_mut().zip(f) {
                    *d = *d + c * (fj - fs) / z;
                }
            }
        }
        for (d, &s) in du.iter_mut().zip(&cache.scores) {
            *d = *d * (s * (T::one() - s));
        }

        // dx += du·G.
        self.backend.matmul(
            MatMut::row_major(dx, tokens, h, "dx")?,
            T::one(),
            MatRef::row_major(&du, tokens, n, "du")?,
            self.gate_view()?,
            T::one(),
            threads,
        )?;
        Ok(MoeWeightGradInputs { shared, experts, du })
    }

    /// W: accumulates the gradients of the gate weight (`duᵀ·x`, `x` the forward's), of the
    /// shared experts (from `experts_input`, the forward's) and of every local expert that
    /// got rows (from the rows it received, kept in the cache). No exchange; the bias gets
    /// no gradient.
    pub fn backward_weight(
        &mut self,
        cache: &MoeCache<T>,
        grads: &MoeWeightGradInputs<T>,
        x: &[T],
        experts_input: &CachedActivation<T>,
        threads: usize,
    ) -> Result<(), ModelError> {
        let (tokens, h, n) = (cache.tokens(), self.hidden, self.n_routed());
        check_len(&self.gate.name, "input", tokens * h, x.len())?;
        check_len(&self.gate.name, "experts' input", tokens * h, experts_input.len())?;
        check_len(&self.gate.name, "logit gradient", tokens * n, grads.du.len())?;
        self.check_cache(cache)?;
        if let (Some(ffn), Some(c), Some(g)) = (&mut self.shared_experts, &cache.shared, &grads.shared) {
            ffn.backward_weight(c, g, experts_input, threads)?;
        }
        for (j, ffn) in self.experts.iter_mut().enumerate() {
            let kept = (&cache.expert_caches[j], &cache.expert_inputs[j], grads.experts.get(j));
            if let (Some(c), Some(input), Some(Some(g))) = kept {
                ffn.backward_weight(c, g, input, threads)?;
            }
        }
        self.backend.matmul(
            MatMut::row_major(self.gate.grad.host_mut(), n, h, "dG")?,
            T::one(),
            MatRef::row_major(&grads.du, tokens, n, "du")?.t(),
            MatRef::row_major(x, tokens, h, "x")?,
            T::one(),
            threads,
        )?;
        Ok(())
    }

    /// Auxiliary-loss-free balancing (report §2.1.2): with `global_counts` the tokens each
    /// expert received over the whole global batch, `b_i −= γ` if `count_i` is above the
    /// mean count, `b_i += γ` if below, unchanged if equal (compared exactly, in integers).
    pub fn update_bias(&mut self, global_counts: &[u64], gamma: f64) -> Result<(), ModelError> {
        let bias = &mut self.e_score_correction_bias;
        check_len(&bias.name, "global expert counts", bias.len(), global_counts.len())?;
        if !(gamma.is_finite() && gamma >= 0.0) {
            return Err(ModelError::Tensor {
                tensor: bias.name.clone(),
                detail: format!("bias update speed γ must be finite and ≥ 0, got {gamma}"),
            });
        }
        let total: u128 = global_counts.iter().map(|&c| c as u128).sum();
        let n = global_counts.len() as u128;
        let step: T = cast(gamma);
        for (b, &c) in bias.value.host_mut().iter_mut().zip(global_counts) {
            match (c as u128 * n).cmp(&total) {
                Ordering::Greater => *b = *b - step,
                Ordering::Less => *b = *b + step,
                Ordering::Equal => {}
            }
        }
        Ok(())
    }

    /// The parameters an optimizer updates: gate weight, shared experts, local routed
    /// experts (not the selection bias).
    pub fn params_mut(&mut self) -> Vec<&mut Param<T>> {
        let mut out = vec![&mut self.gate];
        if let Some(ffn) = &mut self.shared_experts {
            out.extend(ffn.params_mut());
        }
        for ffn in &mut self.experts {
            out.extend(ffn.params_mut());
        }
        out
    }

    /// Every parameter a checkpoint holds, the selection bias included; of the routed
    /// experts, the local ones.
    pub fn params(&self) -> Vec<&Param<T>> {
        let mut out = vec![&self.gate, &self.e_score_correction_bias];
        for ffn in self.shared_experts.iter().chain(&self.experts) {
            out.extend([&ffn.gate_proj.weight, &ffn.up_proj.weight, &ffn.down_proj.weight]);
        }
        out
    }
}
