//! Memory per GPU: each pipeline rank's parameters, FP8 weight cache, gradients, ZeRO-1
//! optimizer shard and peak activations ([`RankPlan`], [`MemoryBreakdown`]), and its
//! ZeRO-1 synchronization time.
//!
//! The parameters are grouped into sets whose copies are summed together: per stage its
//! non-expert parameters (held whole by every GPU of each hosting rank: `dp` copies per
//! rank) and its routed experts (a GPU holds the `1/ep` shard of its EP rank: `expert_dp`
//! copies per rank), and the embedding (on stage 0's ranks, and on the last stage's when it
//! uses it). A set of `P` parameters held by `h` pipeline ranks has `g = h·dp` copies
//! (experts: `g = h·expert_dp`), and each holding GPU keeps:
//! - parameters: BF16 working weights, 2·P bytes;
//! - FP8 weight cache: the weights of the FP8 GEMMs (attention projections, FFNs, experts,
//!   MTP projection; not embedding, head, gates, norms) quantized once per step in
//!   128×128 blocks, 1 byte each plus one FP32 scale per 16384, reused by every
//!   micro-batch's Fprop and, read transposed (a block's scale is the same for Wᵀ), Dgrad;
//! - gradients: FP32, 4·P bytes, whole on every copy (ZeRO-1 shards only the optimizer);
//! - optimizer states: FP32 master weights and two BF16 AdamW moments (DESIGN §1.2),
//!   ⌈8·P / g⌉ bytes: ZeRO-1 shards them over all `g` copies. Under DualPipe (h = 2) a
//!   stage's non-expert parameters take ⌈8·P / (2·dp)⌉ and its experts ⌈8·P / (2·expert_dp)⌉;
//! - activations: the peak, over the rank's instruction stream, of the bytes held by
//!   chunks between their forward and their backward (or deferred W) — the same accounting
//!   as the schedule validator's, which gives PP+1 chunks for DualPipe (DESIGN §1.3).
//!
//! Activations cached per token (d = hidden size, `fp8(n)` = n bytes plus an FP32 scale per
//! 1×128 tile; RMSNorm outputs and MLA's up-projections are recomputed in backward, the
//! SwiGLU output too, DESIGN §1.2 and §1.4):
//! - MLA: the layer input (BF16, d), the q latent (BF16, q_lora_rank) and the kv latent with
//!   the rope key (BF16, kv_lora_rank + rope dim), the attention output that feeds o_proj
//!   (`fp8(heads × v_head_dim)`), the softmax log-sum-exp (FP32 per head);
//! - dense FFN: the post-attention residual (BF16, d) and the SwiGLU input
//!   (`fp8(2 × intermediate)`);
//! - MoE: the post-attention residual (BF16, d), the routing (index, weight and score per
//!   chosen expert, 12 bytes), the dispatched expert inputs (`num_experts_per_tok × fp8(d)`,
//!   kept on the expert's GPU since recomputing them would repeat the dispatch), and the
//!   SwiGLU inputs of the routed and shared experts (`fp8(2 × moe_intermediate)` each). The
//!   gate weights' gradient is formed on the expert side from the recomputed SwiGLU output,
//!   so expert outputs are not kept;
//! - head: its input (BF16, d); the cross-entropy is fused with the head and chunked, its
//!   gradient formed in the forward, so logits are never held;
//! - MTP module: the main hidden state and the next token's embedding (BF16, d each), the
//!   projection input (`fp8(2d)`), one block as above, its head input (BF16, d), token ids;
//! - embedding: the token ids (4 bytes).
//!
//! Not modelled: the CUDA context, communication buffers, temporary workspaces and allocator
//! fragmentation; a plan that fits with little headroom may not fit in practice.
//!
//! Invariant: byte counts saturate instead of overflowing, and a layout whose activations
//! could exceed 64 bits is refused first ([`rank_uses`]); the activation accounting is the
//! schedule validator's, so the peak is the one the compiled stream really reaches.

use super::error::PlanError;
use super::layout::{Geometry, GpuLayout};
use super::shape::{ModelShape, Part, fp8_weight_bytes};
use super::spec::ClusterSpec;
use super::stages::StageSplit;
use crate::schedule::{Instruction, Schedule};
use serde::Serialize;

/// Memory of one GPU, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemoryBreakdown {
    /// BF16 working weights of the stages held.
    pub parameters: u64,
    /// FP8 copies of the FP8-GEMM weights, with their block scales.
    pub fp8_weight_cache: u64,
    /// FP32 weight gradients.
    pub gradients: u64,
    /// This GPU's ZeRO-1 shard of FP32 master weights and BF16 AdamW moments.
    pub optimizer_states: u64,
    /// Peak cached activations of the in-flight micro-batches.
    pub activations: u64,
    /// The sum of the above.
    pub total: u64,
    /// The GPU's memory.
    pub capacity: u64,
}

impl MemoryBreakdown {
    /// `(name, bytes)` per component, in a fixed order.
    pub fn components(&self) -> [(&'static str, u64); 5] {
        [
            ("parameters", self.parameters),
            ("FP8 weight cache", self.fp8_weight_cache),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer_states),
            ("activations", self.activations),
        ]
    }

    /// The largest component.
    pub fn largest(&self) -> (&'static str, u64) {
        self.components().into_iter().fold(("parameters", 0), |best, c| if c.1 > best.1 { c } else { best })
    }

    /// Whether the total fits the capacity.
    pub fn fits(&self) -> bool {
        self.total <= self.capacity
    }
}

/// One pipeline rank's GPUs (all alike).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RankPlan {
    /// Pipeline rank.
    pub rank: u32,
    /// Stages it hosts.
    pub stages: Vec<u32>,
    /// Whether it holds a copy of the embedding for the last stage (the MTP modules'
    /// lookup, or a tied head) without hosting stage 0. The copy is in the embedding's
    /// ZeRO-1 group.
    pub embedding_copy: bool,
    /// Most chunks (micro-batch × stage) whose activations it holds at once.
    pub peak_in_flight: u32,
    /// Memory per GPU.
    pub memory: MemoryBreakdown,
    /// Time of its ZeRO-1 synchronization at the end of a step, seconds.
    pub data_parallel_sync_seconds: f64,
    /// Time it computes or waits on its own all-to-alls over the step's pipeline, seconds.
    pub busy_seconds: f64,
}

/// Bytes per parameter: BF16 weights, FP32 gradients, FP32 master + two BF16 moments.
const WEIGHT_BYTES: u64 = 2;
const GRADIENT_BYTES: u64 = 4;
const OPTIMIZER_BYTES: u64 = 4 + 2 + 2;

/// Parameters whose copies are summed together: one ZeRO-1 data-parallel group.
struct ParameterSet {
    /// Parameters each holding GPU keeps.
    parameters: u64,
    /// Of those, the weights of FP8 GEMMs.
    fp8: u64,
    /// The pipeline ranks holding it, ascending.
    ranks: Vec<u32>,
    /// A routed-expert shard (`expert_dp` copies per rank) rather than replicated
    /// parameters (`dp` copies per rank).
    expert: bool,
}

/// Each rank's stages and peak activations, from its instruction stream.
pub(super) fn rank_uses(
    g: &Geometry,
    schedule: &Schedule,
    split: &StageSplit,
) -> Result<Vec<RankUse>, PlanError> {
    // Every chunk's activations at once bound what a rank can hold, so counting in u64
    // is safe once their sum is.
    let chunks = g.layout.micro_batches as u64 * g.layout.stages as u64;
    let heaviest = split.parts.iter().map(|p| p.activations).max().unwrap_or(0);
    if heaviest.checked_mul(g.tokens).and_then(|b| b.checked_mul(chunks)).is_none() {
        return Err(PlanError::Shape(format!(
            "{} micro-batches of {} tokens would cache more activation bytes than 64 bits count",
            g.layout.micro_batches, g.tokens
        )));
    }
    Ok(stream_uses(schedule, &split.parts, g.tokens))
}

/// The ZeRO-1 groups: each stage's replicated parameters and expert shards on the ranks
/// hosting it, and the embedding on every rank that holds a copy.
fn parameter_sets(
    model: &ModelShape,
    g: &Geometry,
    split: &StageSplit,
    hosts: &[Vec<u32>],
) -> Vec<ParameterSet> {
    let mut sets = Vec::with_capacity(2 * split.parts.len() + 1);
    for (s, (part, ranks)) in split.parts.iter().zip(hosts).enumerate() {
        let embedding = if s == 0 { model.embedding.replicated } else { 0 };
        sets.push(ParameterSet {
            parameters: part.replicated - embedding,
            fp8: part.replicated_fp8,
            ranks: ranks.clone(),
            expert: false,
        });
        let shard = part.routed / g.layout.ep as u64;
        sets.push(ParameterSet { parameters: shard, fp8: shard, ranks: ranks.clone(), expert: true });
    }
    let mut embedding_ranks = hosts.first().cloned().unwrap_or_default();
    if model.last_stage_uses_embedding() {
        embedding_ranks.extend(hosts.last().into_iter().flatten());
        embedding_ranks.sort_unstable();
        embedding_ranks.dedup();
    }
    sets.push(ParameterSet {
        parameters: model.embedding.replicated,
        fp8: 0,
        ranks: embedding_ranks,
        expert: false,
    });
    sets.retain(|set| set.parameters > 0 && !set.ranks.is_empty());
    sets
}

/// Memory per GPU and data-parallel sync time of every rank.
pub(super) fn rank_plans(
    model: &ModelShape,
    cluster: &ClusterSpec,
    g: &Geometry,
    split: &StageSplit,
    uses: &[RankUse],
    hosts: &[Vec<u32>],
) -> Vec<RankPlan> {
    let l = &g.layout;
    let sets = parameter_sets(model, g, split, hosts);
    let gpus = GpuLayout { dp: l.dp, ep: l.ep as u64, gpus_per_node: cluster.gpus_per_node as u64 };
    let last = l.stages - 1;
    uses.iter()
        .enumerate()
        .map(|(rank, used)| {
            let rank = rank as u32;
            let (mut held, mut fp8, mut optimizer, mut sync) = (0u64, 0u64, 0u64, 0.0f64);
            for set in sets.iter().filter(|set| set.ranks.contains(&rank)) {
                let (copies, spans) = if set.expert {
                    (l.expert_dp, gpus.expert_group_spans(&set.ranks))
                } else {
                    (l.dp, gpus.replicated_group_spans(&set.ranks))
                };
                let group = (set.ranks.len() as u64).saturating_mul(copies).max(1);
                held = held.saturating_add(set.parameters);
                fp8 = fp8.saturating_add(set.fp8);
                optimizer =
                    optimizer.saturating_add(OPTIMIZER_BYTES.saturating_mul(set.parameters).div_ceil(group));
                let bandwidth =
                    if spans { cluster.inter_node_bandwidth } else { cluster.intra_node_bandwidth };
                // Ring reduce-scatter of the gradients and all-gather of the weights.
                sync += (WEIGHT_BYTES + GRADIENT_BYTES) as f64 * set.parameters as f64 * (group - 1) as f64
                    / group as f64
                    / bandwidth;
            }
            let mut memory = MemoryBreakdown {
                parameters: WEIGHT_BYTES.saturating_mul(held),
                fp8_weight_cache: fp8_weight_bytes(fp8),
                gradients: GRADIENT_BYTES.saturating_mul(held),
                optimizer_states: optimizer,
                activations: used.peak_bytes,
                total: 0,
                capacity: cluster.gpu_memory_bytes,
            };
            memory.total = memory.components().iter().fold(0u64, |sum, c| sum.saturating_add(c.1));
            RankPlan {
                rank,
                stages: used.stages.clone(),
                embedding_copy: model.last_stage_uses_embedding()
                    && used.stages.contains(&last)
                    && !used.stages.contains(&0),
                peak_in_flight: used.peak_chunks,
                memory,
                data_parallel_sync_seconds: sync,
                busy_seconds: 0.0,
            }
        })
        .collect()
}

/// The rank whose GPUs need the most memory (ties: the lowest), or why it does not fit.
pub(super) fn fullest(ranks: &[RankPlan]) -> Result<(u32, MemoryBreakdown), PlanError> {
    let (rank, memory) = ranks
        .iter()
        .max_by(|a, b| a.memory.total.cmp(&b.memory.total).then(b.rank.cmp(&a.rank)))
        .map(|r| (r.rank, r.memory))
        .unwrap_or_default();
    if !memory.fits() {
        let (component, component_bytes) = memory.largest();
        return Err(PlanError::OutOfMemory {
            rank,
            needed: memory.total,
            capacity: memory.capacity,
            component,
            component_bytes,
        });
    }
    Ok((rank, memory))
}

/// What one pipeline rank holds, from its instruction stream.
pub(super) struct RankUse {
    pub(super) stages: Vec<u32>,
    pub(super) peak_bytes: u64,
    pub(super) peak_chunks: u32,
}

/// Walks each rank's stream as the validator does: a chunk's activations are held from its
/// forward until its full backward or its deferred W.
fn stream_uses(schedule: &Schedule, parts: &[Part], tokens: u64) -> Vec<RankUse> {
    let bytes = |stage: u32| parts[stage as usize].activations * tokens;
    schedule
        .ranks
        .iter()
        .map(|stream| {
            let (mut live, mut chunks) = (0u64, 0u32);
            let mut used = RankUse { stages: Vec::new(), peak_bytes: 0, peak_chunks: 0 };
            let take = |stage: u32, live: &mut u64, chunks: &mut u32, used: &mut RankUse| {
                *live += bytes(stage);
                *chunks += 1;
                used.peak_bytes = used.peak_bytes.max(*live);
                used.peak_chunks = used.peak_chunks.max(*chunks);
                if !used.stages.contains(&stage) {
                    used.stages.push(stage);
                }
            };
            for instruction in stream {
                match *instruction {
                    Instruction::Forward { chunk } => take(chunk.stage, &mut live, &mut chunks, &mut used),
                    Instruction::OverlappedForwardBackward { forward, backward } => {
                        take(forward.stage, &mut live, &mut chunks, &mut used);
                        live -= bytes(backward.stage);
                        chunks -= 1;
                    }
                    Instruction::Backward { chunk } | Instruction::BackwardWeight { chunk } => {
                        live -= bytes(chunk.stage);
                        chunks -= 1;
                    }
                    _ => {}
                }
            }
            used.stages.sort_unstable();
            used
        })
        .collect()
}
