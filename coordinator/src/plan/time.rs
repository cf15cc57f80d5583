//! Time: the step estimate ([`StepEstimate`]) from simulating the compiled schedule with
//! every instruction at its own stage's costs.
//!
//! A chunk (one micro-batch through one stage `s`) computes its forward FLOPs at the
//! cluster's sustained [`ClusterSpec::gpu_flops`] (`f_s`); its backward computes twice
//! that, of which the weight gradients are half. Its all-to-alls (`a_s`, forward and
//! backward alike) take the slower of their IB and NVLink transfers at the given
//! bandwidths. A chunk that runs alone exposes its all-to-all: F = f_s + a_s,
//! B = 2·f_s + a_s, W = f_s, and a ZB1P input gradient B − W = f_s + a_s. DualPipe's
//! overlapped pair of a forward chunk of stage s and a backward chunk of stage t runs
//! computation and communication at once (20 of 132 SMs communicate, DESIGN §1.4), taking
//! max(f_s + 2·f_t, a_s + a_t). The pipeline neighbours exchange BF16 hidden states (IB
//! unless the cluster is one node). The compiled schedule is simulated with every
//! instruction at its own stage's costs ([`simulate_with`]), so the stage that really
//! limits each rank sets its pace. The step's parts are read on the bottleneck rank, the
//! one busiest over the step, and the step adds the ZeRO-1 data-parallel synchronization at
//! its end (per parameter set, a ring reduce-scatter of FP32 gradients and all-gather of
//! BF16 weights over its `g` copies, not overlapped): step = compute + exposed all-to-all +
//! bubble + data-parallel sync. The default [`ClusterSpec::gpu_flops`] is half the H800's
//! dense FP8 peak; at that rate the report's layout computes about as long as it
//! communicates, the report's ≈ 1:1 ratio.
//!
//! Invariant: the estimate is deterministic: one simulation of the compiled schedule, ties
//! between ranks and stages broken towards the lowest.

use super::error::PlanError;
use super::layout::Geometry;
use super::shape::{ModelShape, bf16_bytes};
use super::spec::ClusterSpec;
use crate::schedule::{Chunk, Costs, Instruction, PaperTable, Schedule, simulate_with};
use serde::Serialize;

/// The estimated training step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepEstimate {
    /// The stage whose chunk costs the most run alone (F + B).
    pub slowest_stage: u32,
    /// Forward compute of one chunk of it, seconds.
    pub chunk_compute_seconds: f64,
    /// Forward all-to-all of one chunk of it, seconds.
    pub chunk_all_to_all_seconds: f64,
    /// Compute over all-to-all time of a chunk of it (none without all-to-all).
    pub compute_to_communication: Option<f64>,
    /// A chunk of the slowest stage (seconds): F, B, W, F&B overlapped with itself, and the
    /// point-to-point latency. The Table 2 formula is evaluated at these; the simulation
    /// gives every instruction the costs of its own stages.
    pub costs: Costs,
    /// The pipeline's simulated makespan, seconds.
    pub pipeline_seconds: f64,
    /// The bottleneck: the rank busiest over the step (ties: the lowest).
    pub bottleneck_rank: u32,
    /// Of the makespan on the bottleneck rank: computing.
    pub compute_seconds: f64,
    /// Of it: all-to-all not hidden behind computation.
    pub exposed_all_to_all_seconds: f64,
    /// Of it: idle (the pipeline bubble).
    pub bubble_seconds: f64,
    /// The most any rank idles: the bubble plus the load imbalance between ranks, seconds.
    pub largest_idle_seconds: f64,
    /// The report's bubble formula at the slowest stage's costs (Table 2), for comparison.
    pub formula_bubble_seconds: f64,
    /// ZeRO-1 gradient reduce-scatter and weight all-gather, seconds (slowest rank).
    pub data_parallel_sync_seconds: f64,
    /// Pipeline makespan + data-parallel sync.
    pub step_seconds: f64,
    /// Tokens per second over the cluster.
    pub tokens_per_second: f64,
}

/// One chunk of a stage, forward, seconds.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct ChunkTime {
    pub(super) compute: f64,
    pub(super) all_to_all: f64,
}

impl ChunkTime {
    /// F + B when run alone, the order of "slowest".
    pub(super) fn alone(&self) -> f64 {
        3.0 * self.compute + 2.0 * self.all_to_all
    }
}

/// Simulates the schedule with every instruction at its own stages' costs and reads the
/// step off the bottleneck rank, adding `data_parallel_sync` seconds (the slowest rank's
/// ZeRO-1 synchronization); returns it with each rank's busy time.
pub(super) fn step(
    model: &ModelShape,
    cluster: &ClusterSpec,
    g: &Geometry,
    schedule: &Schedule,
    times: &[ChunkTime],
    slowest: usize,
    data_parallel_sync: f64,
) -> Result<(StepEstimate, Vec<f64>), PlanError> {
    let l = &g.layout;
    let time = |c: Chunk| times.get(c.stage as usize).copied().unwrap_or_default();
    let duration = |i: &Instruction| match *i {
        Instruction::Forward { chunk } | Instruction::BackwardInput { chunk } => {
            time(chunk).compute + time(chunk).all_to_all
        }
        Instruction::BackwardWeight { chunk } => time(chunk).compute,
        Instruction::Backward { chunk } => 2.0 * time(chunk).compute + time(chunk).all_to_all,
        Instruction::OverlappedForwardBackward { forward, backward } => {
            let (f, b) = (time(forward), time(backward));
            (f.compute + 2.0 * b.compute).max(f.all_to_all + b.all_to_all)
        }
        _ => 0.0,
    };
    // The computing part of each instruction; the rest of its time is exposed all-to-all.
    let compute = |i: &Instruction| match *i {
        Instruction::Forward { chunk }
        | Instruction::BackwardInput { chunk }
        | Instruction::BackwardWeight { chunk } => time(chunk).compute,
        Instruction::Backward { chunk } => 2.0 * time(chunk).compute,
        Instruction::OverlappedForwardBackward { forward, backward } => {
            time(forward).compute + 2.0 * time(backward).compute
        }
        _ => 0.0,
    };
    let p2p_bandwidth =
        if cluster.nodes > 1 { cluster.inter_node_bandwidth } else { cluster.intra_node_bandwidth };
    let latency = g.tokens as f64 * bf16_bytes(model.hidden) as f64 / p2p_bandwidth;
    let timeline = simulate_with(schedule, duration, latency)?;
    let bottleneck = (0..timeline.busy.len())
        .max_by(|&a, &b| timeline.busy[a].total_cmp(&timeline.busy[b]).then(b.cmp(&a)))
        .unwrap_or(0);
    let rank_compute: f64 = schedule.ranks.get(bottleneck).into_iter().flatten().map(compute).sum();
    let rank_busy = timeline.busy.get(bottleneck).copied().unwrap_or(0.0);
    let s = times.get(slowest).copied().unwrap_or_default();
    let costs = Costs {
        forward: s.compute + s.all_to_all,
        backward: 2.0 * s.compute + s.all_to_all,
        weight: s.compute,
        overlapped: (3.0 * s.compute).max(2.0 * s.all_to_all),
        latency,
    };
    let step_seconds = timeline.makespan + data_parallel_sync;
    let estimate = StepEstimate {
        slowest_stage: slowest as u32,
        chunk_compute_seconds: s.compute,
        chunk_all_to_all_seconds: s.all_to_all,
        compute_to_communication: (s.all_to_all > 0.0).then(|| s.compute / s.all_to_all),
        costs,
        pipeline_seconds: timeline.makespan,
        bottleneck_rank: bottleneck as u32,
        compute_seconds: rank_compute,
        // Busy time is a sum of the same terms in another order: clamp the rounding.
        exposed_all_to_all_seconds: (rank_busy - rank_compute).max(0.0),
        bubble_seconds: timeline.idle.get(bottleneck).copied().unwrap_or(0.0),
        largest_idle_seconds: timeline.bubble,
        formula_bubble_seconds: l.schedule.paper_figures(l.stages, &costs).bubble,
        data_parallel_sync_seconds: data_parallel_sync,
        step_seconds,
        tokens_per_second: l.tokens_per_step as f64 / step_seconds,
    };
    Ok((estimate, timeline.busy))
}
