//! The layout: pipeline ranks, data parallelism and EP groups over the GPUs, checked
//! ([`geometry`]), and which GPUs and nodes make up the data-parallel groups.
//!
//! There is no tensor parallelism (DESIGN §1.4). `pp` is the pipeline-parallel degree in
//! pipeline ranks (devices), not in stages: the model is cut into `stages` = `pp`
//! contiguous layer groups, or 2·`pp` under DualPipeV, whose ranks host two stages each
//! (`flotilla schedule --pp` counts stages instead). The `gpus` = nodes × gpus-per-node
//! GPUs are numbered node by node, and GPU `g` belongs to pipeline rank `g / dp`, where
//! `dp = gpus / pp`: every GPU of a pipeline rank holds the same stages, so the non-expert
//! parameters of a rank are replicated `dp` times, and `dp` is the data-parallel degree.
//! Expert parallelism is carved out of that data parallelism: the `dp` GPUs of a rank form
//! `dp / ep` EP groups of `ep` consecutive GPUs, each group holding all routed experts of
//! the rank's MoE layers (`n_routed_experts / ep` per GPU per layer), so every expert has
//! `expert_dp = dp / ep` copies per rank. With the report's 2048 GPUs, PP 16 and EP 64:
//! dp 128, 4 experts per GPU per layer, expert_dp 2.
//!
//! Which ranks host which stage comes from the compiled schedule
//! ([`compile`](crate::schedule::compile)): DualPipe puts stages r and PP−1−r on rank r, so
//! each stage lives on two ranks and its parameters are held 2·dp times. Gradients of the
//! copies of a parameter are summed over all of them, so all copies form that parameter's
//! data-parallel group, whichever stages they belong to.
//!
//! Invariant: a [`Geometry`] exists only for a layout that passed every check of
//! [`geometry`]: pp, ep ≥ 1; ep divides the routed experts and fills whole nodes or fits in
//! one; pp × ep divides the GPUs; every stage has a layer; routing groups stay within nodes;
//! the global batch divides into micro-batches; at most [`MAX_CHUNKS`] chunks; the per-step
//! counts fit 64 bits. Later steps rely on these without checking again.

use super::error::PlanError;
use super::shape::ModelShape;
use super::spec::{ClusterSpec, TrainingShape};
use crate::schedule::ScheduleKind;
use serde::Serialize;

/// The most chunks (micro-batches × stages) a plan simulates: the schedule compiler's limit.
/// The simulator holds every chunk's state, and a real step has thousands, not millions.
pub const MAX_CHUNKS: u64 = crate::schedule::MAX_CHUNKS;

/// The parallel layout and the batch it runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ParallelLayout {
    /// GPUs in the cluster.
    pub gpus: u64,
    /// Pipeline-parallel degree in pipeline ranks (devices) per pipeline, not in stages.
    pub pp: u32,
    /// Pipeline stages (layer groups): pp, or 2·pp under DualPipeV.
    pub stages: u32,
    /// Expert-parallel degree: GPUs sharing one copy of a layer's routed experts.
    pub ep: u32,
    /// GPUs per pipeline rank: the data-parallel degree of a rank's non-expert parameters.
    pub dp: u64,
    /// Copies of each expert within one pipeline rank: dp / ep.
    pub expert_dp: u64,
    /// The pipeline schedule.
    pub schedule: ScheduleKind,
    /// Micro-batches each pipeline runs per step.
    pub micro_batches: u32,
    /// Sequences per micro-batch.
    pub micro_batch_size: u32,
    /// Tokens per sequence.
    pub seq_len: u32,
    /// Sequences per step over the cluster: dp × micro-batches × micro-batch size.
    pub global_batch: u64,
    /// Tokens per step over the cluster.
    pub tokens_per_step: u64,
}

/// A layout that passed the checks, with what the later steps derive from it.
pub(super) struct Geometry {
    pub(super) layout: ParallelLayout,
    /// Tokens of one micro-batch.
    pub(super) tokens: u64,
    /// Routed experts of each MoE layer on one GPU.
    pub(super) experts_per_gpu: u64,
    /// Nodes one EP group spans (1 when it fits inside a node).
    pub(super) ep_nodes: u64,
    /// GPUs of one EP group on each of its nodes.
    pub(super) ep_gpus_per_node: u64,
}

/// The layout checks: degrees, divisibility into ranks, stages and EP groups, node
/// alignment, routing groups, and the batch each pipeline runs.
pub(super) fn geometry(
    model: &ModelShape,
    cluster: &ClusterSpec,
    shape: &TrainingShape,
    pp: u32,
    ep: u32,
) -> Result<Geometry, PlanError> {
    for (name, value) in [("pp", pp), ("ep", ep)] {
        if value == 0 {
            return Err(PlanError::ZeroDegree { name });
        }
    }
    let experts = model.routed_experts;
    if (experts == 0 && ep > 1) || (experts > 0 && !experts.is_multiple_of(ep as usize)) {
        return Err(PlanError::ExpertsNotDivisible { ep, experts });
    }
    let gpus = cluster.gpus();
    let gpn = cluster.gpus_per_node as u64;
    let ep64 = ep as u64;
    if !(ep64.is_multiple_of(gpn) || gpn.is_multiple_of(ep64)) {
        return Err(PlanError::EpNotNodeAligned { ep, gpus_per_node: cluster.gpus_per_node });
    }
    // Both factors are u32, so the product fits.
    let product = pp as u64 * ep64;
    if !gpus.is_multiple_of(product) {
        return Err(PlanError::GpusNotDivisible { pp, ep, product, gpus });
    }
    let stages = shape.schedule.stages_for(pp);
    let layers = model.layers.len();
    if stages > layers as u64 {
        return Err(PlanError::TooManyStages { pp, stages, layers });
    }
    // At most the layer count, which a u32 pp exceeds otherwise.
    let stages = stages as u32;
    let experts_per_gpu = (experts as u64).checked_div(ep64).unwrap_or(0);
    let ep_nodes = (ep64 / gpn).max(1);
    let ep_gpus_per_node = ep64.min(gpn);
    let experts_per_node = experts_per_gpu * ep_gpus_per_node;
    let group_size = experts.checked_div(model.n_group).unwrap_or(0) as u64;
    if ep_nodes > 1 && group_size > 0 && !experts_per_node.is_multiple_of(group_size) {
        // Groups stay within nodes while a node's experts are whole groups.
        let max_ep = (1..=experts as u64)
            .filter(|e| (experts as u64).is_multiple_of(*e) && e.is_multiple_of(gpn))
            .filter(|e| (experts as u64 / e * gpn).is_multiple_of(group_size))
            .max()
            .unwrap_or(gpn);
        return Err(PlanError::GroupSpansNodes {
            ep,
            experts_per_node,
            group_size: group_size as usize,
            topk_group: model.topk_group,
            max_ep,
        });
    }
    let dp = gpus / pp as u64;
    let expert_dp = dp / ep64;
    let micro_batch_size = shape.micro_batch_size as u64;
    let micro_batches = match shape.micro_batches {
        Some(m) => m,
        None => {
            let global = shape.global_batch as u64;
            // A product past 64 bits exceeds the u32 global batch: not a divisor either.
            let divides =
                dp.checked_mul(micro_batch_size).is_some_and(|per_step| global.is_multiple_of(per_step));
            if !divides {
                return Err(PlanError::BatchNotDivisible {
                    global_batch: shape.global_batch,
                    dp,
                    micro_batch_size: shape.micro_batch_size,
                });
            }
            // At most the global batch, which is a u32.
            (global / (dp * micro_batch_size)) as u32
        }
    };
    let chunks = micro_batches as u64 * stages as u64;
    if chunks > MAX_CHUNKS {
        return Err(PlanError::TooManyChunks { chunks, limit: MAX_CHUNKS });
    }
    let global_batch =
        dp.checked_mul(micro_batches as u64).and_then(|n| n.checked_mul(micro_batch_size)).ok_or_else(|| {
            PlanError::Shape(format!(
                "the sequences per step, dp × micro-batches × micro-batch size = {dp} × {micro_batches} × {micro_batch_size}, do not fit in 64 bits"
            ))
        })?;
    let tokens_per_step = global_batch.checked_mul(shape.seq_len as u64).ok_or_else(|| {
        PlanError::Shape(format!(
            "the tokens per step, {global_batch} sequences × {} tokens, do not fit in 64 bits",
            shape.seq_len
        ))
    })?;
    Ok(Geometry {
        layout: ParallelLayout {
            gpus,
            pp,
            stages,
            ep,
            dp,
            expert_dp,
            schedule: shape.schedule,
            micro_batches,
            micro_batch_size: shape.micro_batch_size,
            seq_len: shape.seq_len,
            global_batch,
            tokens_per_step,
        },
        tokens: micro_batch_size * shape.seq_len as u64,
        experts_per_gpu,
        ep_nodes,
        ep_gpus_per_node,
    })
}

/// Ranks hosting each stage (the same for every stage under the compiled schedules).
pub(super) fn hosts_per_stage(hosts: &[Vec<u32>]) -> u64 {
    hosts.iter().map(Vec::len).max().unwrap_or(1) as u64
}

/// Which GPUs and nodes make up the data-parallel groups.
pub(super) struct GpuLayout {
    pub(super) dp: u64,
    pub(super) ep: u64,
    pub(super) gpus_per_node: u64,
}

impl GpuLayout {
    fn node(&self, gpu: u64) -> u64 {
        gpu / self.gpus_per_node
    }

    /// Whether GPUs from each rank's `first` to `last` GPU (its offsets within a rank) lie
    /// on more than one node; nodes number GPUs in order, so the extremes decide.
    fn spans(&self, ranks: &[u32], first: u64, last: u64) -> bool {
        let lowest = ranks.iter().map(|&r| self.node(r as u64 * self.dp + first)).min();
        let highest = ranks.iter().map(|&r| self.node(r as u64 * self.dp + last)).max();
        lowest != highest
    }

    /// Whether all GPUs of the hosting ranks span more than one node.
    pub(super) fn replicated_group_spans(&self, ranks: &[u32]) -> bool {
        self.spans(ranks, 0, self.dp - 1)
    }

    /// Whether the copies of one expert (EP rank 0 of every EP group of the hosting ranks)
    /// span more than one node.
    pub(super) fn expert_group_spans(&self, ranks: &[u32]) -> bool {
        self.spans(ranks, 0, (self.dp / self.ep - 1) * self.ep)
    }
}
