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
//!    capacity. Routed experts run on the grouped layout the distributed version
//!    dispatches: the rows routed to expert `e` are gathered into one `[n_e, hidden]`
//!    block (tokens in index order), the expert's FFN runs on the block, and the weighted
//!    rows are scatter-added into `y`, experts in index order.
//!
//! The gate reads `x` in the layer's float type; the experts read it as the caller keeps
//! it for W ([`MoeLayer::cache_input`]): under fp8 one 1×128-tiled FP8 copy of all tokens,
//! whose rows each expert gathers (the dispatch payload), and W gathers them again. Under
//! fp8 the experts also keep their SwiGLU inputs in FP8 ([`SwiGluFfn::fp8_swiglu_inputs`]).
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
use crate::ffn::{FfnCache, FfnWeightGradInputs, SwiGluFfn};
use crate::param::{Init, Param};
use crate::precision::{CacheBytes, CachedActivation, Precision};
use crate::{ConfigError, ModelError, Real, check_len};
use flotilla_kernels::activation::sigmoid;
use flotilla_kernels::gemm::{MatMut, MatRef, matmul};
use flotilla_kernels::quant::ScaleRounding;
use std::borrow::Cow;
use std::cmp::Ordering;

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

/// One DeepSeekMoE layer: gate, shared expert(s), routed experts.
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
    /// `{prefix}.experts.{e}.*`, one FFN of width `moe_intermediate_size` each.
    pub experts: Vec<SwiGluFfn<T>>,
}

/// What [`MoeLayer::forward`] keeps for backward, and what it reports.
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
    /// Each dispatched row's unweighted expert output, `[tokens·top_k, hidden]` (for
    /// `dL/dw = ⟨dy, expert(x)⟩`).
    pub expert_outputs: Vec<T>,
    /// Each routed expert's FFN cache; `None` for experts that got no token.
    pub expert_caches: Vec<Option<FfnCache<T>>>,
    /// The shared expert's FFN cache.
    pub shared: Option<FfnCache<T>>,
    /// The balance-loss weight α of the call.
    pub balance_alpha: f64,
    /// `f_i` per sequence, `[batch, n_routed]`; empty when α = 0 (or no tokens).
    pub seq_load: Vec<T>,
    /// `L_bal`, the mean over sequences (0 when α = 0).
    pub balance_loss: T,
    /// Tokens routed to each expert in this call, `[n_routed]`.
    pub expert_load: Vec<u64>,
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
            + self.expert_slots.len();
        let floats =
            self.scores.len() + self.routing.weights.len() + self.expert_outputs.len() + self.seq_load.len();
        let ffns: CacheBytes =
            self.expert_caches.iter().chain([&self.shared]).flatten().map(FfnCache::bytes).sum();
        CacheBytes::of::<T>(floats)
            + CacheBytes::of::<usize>(indices)
            + CacheBytes::of::<u64>(self.expert_load.len())
            + ffns
    }
}

/// What B hands to W.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeWeightGradInputs<T> {
    /// The shared expert's.
    pub shared: Option<FfnWeightGradInputs<T>>,
    /// Each routed expert's (its `dy` is the weighted gradient of its gathered rows);
    /// `None` for experts that got no token.
    pub experts: Vec<Option<FfnWeightGradInputs<T>>>,
    /// Gradient at the gate logits `u`, `[tokens, n_routed]` (routing-weight and
    /// balance-loss terms).
    pub du: Vec<T>,
}

impl<T: Real> MoeLayer<T> {
    /// The MoE layer `{prefix}` (e.g. `model.layers.3.mlp`) of `cfg`, weights drawn from
    /// Normal(0, `initializer_range`) by `(seed, name)`, bias 0.
    pub fn new(cfg: &ModelConfig, prefix: &str, seed: u64) -> Result<Self, ModelError> {
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
        let experts = (0..n)
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
        })
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

    /// `x: [tokens, hidden]` as the shared and routed experts keep their input
    /// ([`crate::linear::Linear::cache_input`]); a borrowed `x` is copied only when kept
    /// as it is.
    pub fn cache_input<'a>(
        &self,
        x: impl Into<Cow<'a, [T]>>,
        tokens: usize,
    ) -> Result<CachedActivation<T>, ModelError> {
        let experts = self.shared_experts.iter().chain(&self.experts);
        let precision = experts.map(|e| e.gate_proj.precision).next().unwrap_or_default();
        let what = format!("{}.experts input", self.prefix);
        CachedActivation::new(precision, x, tokens, self.hidden, ScaleRounding::Exact, &what)
    }

    /// Routed experts.
    pub fn n_routed(&self) -> usize {
        self.routing.n_routed_experts
    }

    fn gate_view(&self) -> Result<MatRef<'_, T>, ModelError> {
        Ok(MatRef::row_major(&self.gate.value, self.n_routed(), self.hidden, "gate")?)
    }

    /// Sigmoid gate scores `s = sigmoid(x·Gᵀ)`, `[tokens, n_routed]`.
    pub fn scores(&self, x: &[T], tokens: usize, threads: usize) -> Result<Vec<T>, ModelError> {
        check_len(&self.gate.name, "input", tokens * self.hidden, x.len())?;
        let mut s = vec![T::zero(); tokens * self.n_routed()];
        matmul(
            MatMut::row_major(&mut s, tokens, self.n_routed(), "logits")?,
            T::zero(),
            MatRef::row_major(x, tokens, self.hidden, "x")?,
            self.gate_view()?.t(),
            T::one(),
            threads,
        )?;
        s.iter_mut().for_each(|v| *v = sigmoid(*v));
        Ok(s)
    }

    /// `y = shared(x) + Σ_chosen w_e·expert_e(x)` for `x, y: [batch·seq_len, hidden]` (`y`
    /// overwritten), with the sequence-wise balance loss of weight `balance_alpha`
    /// (0: not computed); `experts_input` is `x` as [`MoeLayer::cache_input`] keeps it.
    /// The cache carries the balance loss and the per-expert load.
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
        let scores = self.scores(x, tokens, threads)?;
        let routing = route(&self.routing, &scores, &self.e_score_correction_bias.value, tokens)?;
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
        let mut expert_outputs = vec![T::zero(); rows * h];
        let mut expert_caches = Vec::with_capacity(n);
        for (e, ffn) in self.experts.iter().enumerate() {
            let (start, end) = (expert_offsets[e], expert_offsets[e + 1]);
            if start == end {
                expert_caches.push(None);
                continue;
            }
            let xe = experts_input.gather_rows(&expert_tokens[start..end], h)?;
            let out = &mut expert_outputs[start * h..end * h];
            expert_caches.push(Some(ffn.forward(&xe, end - start, out, threads)?));
            for (r, o) in (start..end).zip(out.chunks_exact(h)) {
                let (t, w) = (expert_tokens[r], routing.weights[expert_tokens[r] * k + expert_slots[r]]);
                for (yv, &ov) in y[t * h..(t + 1) * h].iter_mut().zip(o) {
                    *yv = *yv + w * ov;
                }
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
            expert_caches,
            shared,
            balance_alpha,
            seq_load,
            balance_loss,
            expert_load,
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

    /// B: `dx` (overwritten, or accumulated with `accumulate`) from the output gradient
    /// `dy` and `balance_grad`, the gradient of the total loss with respect to the
    /// balance loss the forward reported (normally 1; ignored when its α was 0).
    pub fn backward_input(
        &self,
        cache: &MoeCache<T>,
        dy: &[T],
        balance_grad: T,
        dx: &mut [T],
        accumulate: bool,
        threads: usize,
    ) -> Result<MoeWeightGradInputs<T>, ModelError> {
        let (tokens, h, n) = (cache.tokens(), self.hidden, self.n_routed());
        let k = cache.routing.top_k;
        check_len(&self.gate.name, "output gradient", tokens * h, dy.len())?;
        check_len(&self.gate.name, "input gradient", tokens * h, dx.len())?;
        check_len(&self.gate.name, "cached scores", tokens * n, cache.scores.len())?;
        check_len(&self.gate.name, "cached expert outputs", tokens * k * h, cache.expert_outputs.len())?;

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

        // Routed experts: weighted dy per gathered row, dx scattered back; and
        // dL/dw = ⟨dy_t, expert_e(x_t)⟩ per (token, slot).
        let mut dw = vec![T::zero(); tokens * k];
        let mut experts = Vec::with_capacity(n);
        for (e, ffn) in self.experts.iter().enumerate() {
            let (start, end) = (cache.expert_offsets[e], cache.expert_offsets[e + 1]);
            let Some(c) = &cache.expert_caches[e] else {
                experts.push(None);
                continue;
            };
            let mut dye = vec![T::zero(); (end - start) * h];
            for (r, d) in (start..end).zip(dye.chunks_exact_mut(h)) {
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
            let mut dxe = vec![T::zero(); (end - start) * h];
            experts.push(Some(ffn.backward_input(c, &dye, &mut dxe, false, threads)?));
            for (r, d) in (start..end).zip(dxe.chunks_exact(h)) {
                let t = cache.expert_tokens[r];
                for (xv, &dv) in dx[t * h..(t + 1) * h].iter_mut().zip(d) {
                    *xv = *xv + dv;
                }
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
        matmul(
            MatMut::row_major(dx, tokens, h, "dx")?,
            T::one(),
            MatRef::row_major(&du, tokens, n, "du")?,
            self.gate_view()?,
            T::one(),
            threads,
        )?;
        Ok(MoeWeightGradInputs { shared, experts, du })
    }

    /// W: accumulates the gradients of the gate weight (`duᵀ·x`) and of every expert that
    /// got tokens; `x` and `experts_input` are the forward's (each expert's rows are
    /// gathered from `experts_input` again). The bias gets none.
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
        if let (Some(ffn), Some(c), Some(g)) = (&mut self.shared_experts, &cache.shared, &grads.shared) {
            ffn.backward_weight(c, g, experts_input, threads)?;
        }
        for (e, ffn) in self.experts.iter_mut().enumerate() {
            if let (Some(c), Some(Some(g))) = (&cache.expert_caches[e], grads.experts.get(e)) {
                let rows = &cache.expert_tokens[cache.expert_offsets[e]..cache.expert_offsets[e + 1]];
                ffn.backward_weight(c, g, &experts_input.gather_rows(rows, h)?, threads)?;
            }
        }
        matmul(
            MatMut::row_major(&mut self.gate.grad, n, h, "dG")?,
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
        for (b, &c) in bias.value.iter_mut().zip(global_counts) {
            match (c as u128 * n).cmp(&total) {
                Ordering::Greater => *b = *b - step,
                Ordering::Less => *b = *b + step,
                Ordering::Equal => {}
            }
        }
        Ok(())
    }

    /// The parameters an optimizer updates: gate weight, shared experts, routed experts
    /// (not the selection bias).
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

    /// Every parameter a checkpoint holds, the selection bias included.
    pub fn params(&self) -> Vec<&Param<T>> {
        let mut out = vec![&self.gate, &self.e_score_correction_bias];
        for ffn in self.shared_experts.iter().chain(&self.experts) {
            out.extend([&ffn.gate_proj.weight, &ffn.up_proj.weight, &ffn.down_proj.weight]);
        }
        out
    }
}
