//! The cluster planner: given a model, a cluster and a batch shape, lays the model out over
//! the GPUs — pipeline stages, expert shards, data parallelism — and estimates what the
//! layout costs in memory, communication and time; or, given no layout, proposes the one
//! with the shortest estimated step among those that fit.
//!
//! The planner deals in counts and bytes only (parameter counts come from
//! [`ParameterCounts`](flotilla_model::ParameterCounts)); it never sees a tensor.
//!
//! The rest of these docs are the planner's model, one submodule per part, read in this
//! order: `layout` (pipeline ranks, data parallelism and EP groups over the GPUs), `stages`
//! (stage assignment), `experts` (experts and node-limited routing), `memory` (memory per
//! GPU), `all_to_all` (the expert-parallel all-to-all) and `time` (the step estimate).
//! `spec` holds the inputs ([`ClusterSpec`], [`TrainingShape`]), `error` the refusals
//! ([`PlanError`]), `shape` the model reduced to what a layout places. This module runs
//! the steps in order ([`plan`]) and searches layouts ([`propose`]).
//!
//! Module graph (acyclic; `a → b`: a uses b): `spec → error`; `layout → error, shape, spec`;
//! `time → error, layout, shape, spec`; `stages → error, layout, shape, time`;
//! `experts → layout, shape`; `memory → error, layout, shape, spec, stages`;
//! `all_to_all → experts, layout, shape, spec`; this module uses them all.

mod all_to_all;
mod error;
mod experts;
mod layout;
mod memory;
mod shape;
mod spec;
mod stages;
mod time;

pub use all_to_all::{AllToAll, Volume};
pub use error::{PlanError, format_bytes};
pub use experts::{ExpertPlacement, NodeExperts};
pub use layout::{MAX_CHUNKS, ParallelLayout};
pub use memory::{MemoryBreakdown, RankPlan};
pub use spec::{ClusterSpec, DEEPSEEK_V3_GLOBAL_BATCH, DEEPSEEK_V3_SEQ_LEN, TrainingShape};
pub use stages::{LayerRange, StagePlan, split_layers};
pub use time::StepEstimate;

use self::error::overshoot;
use self::shape::ModelShape;
use self::time::ChunkTime;
use crate::schedule::{ScheduleSpec, compile};
use flotilla_model::ModelConfig;
use serde::Serialize;

/// A layout with its placement and estimates.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    /// The cluster planned for.
    pub cluster: ClusterSpec,
    /// The layout and batch.
    pub layout: ParallelLayout,
    /// Pipeline stages in forward order.
    pub stages: Vec<StagePlan>,
    /// Pipeline ranks.
    pub ranks: Vec<RankPlan>,
    /// Routed experts.
    pub experts: ExpertPlacement,
    /// The rank whose GPUs need the most memory.
    pub fullest_rank: u32,
    /// Its memory per GPU.
    pub memory: MemoryBreakdown,
    /// All-to-all volumes.
    pub all_to_all: AllToAll,
    /// The step estimate.
    pub step: StepEstimate,
}

/// A layout auto mode considered and kept.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Candidate {
    /// Pipeline ranks.
    pub pp: u32,
    /// Pipeline stages they run.
    pub stages: u32,
    /// EP group size.
    pub ep: u32,
    /// Data-parallel degree.
    pub dp: u64,
    /// Micro-batches per step.
    pub micro_batches: u32,
    /// Sequences per step.
    pub global_batch: u64,
    /// Memory of the fullest GPU.
    pub memory_bytes: u64,
    /// Estimated pipeline bubble on the bottleneck rank, seconds.
    pub bubble_seconds: f64,
    /// Estimated step, seconds.
    pub step_seconds: f64,
    /// Estimated tokens per second.
    pub tokens_per_second: f64,
}

impl Candidate {
    fn of(plan: &Plan) -> Candidate {
        let l = &plan.layout;
        Candidate {
            pp: l.pp,
            stages: l.stages,
            ep: l.ep,
            dp: l.dp,
            micro_batches: l.micro_batches,
            global_batch: l.global_batch,
            memory_bytes: plan.memory.total,
            bubble_seconds: plan.step.bubble_seconds,
            step_seconds: plan.step.step_seconds,
            tokens_per_second: plan.step.tokens_per_second,
        }
    }
}

/// A layout auto mode refused, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rejected {
    /// Pipeline ranks.
    pub pp: u32,
    /// EP group size.
    pub ep: u32,
    /// The refusal.
    pub reason: String,
}

/// Auto mode's answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Proposal {
    /// The fastest layout that fits.
    pub chosen: Plan,
    /// Every layout that fits, fastest first (the chosen one first).
    pub candidates: Vec<Candidate>,
    /// Layouts refused.
    pub rejected: Vec<Rejected>,
}

/// Lays the model out with `pp` pipeline ranks (not stages: DualPipeV runs 2·`pp` stages
/// on them) and EP groups of `ep` GPUs, or says why that layout cannot work.
pub fn plan(
    config: &ModelConfig,
    cluster: &ClusterSpec,
    shape: &TrainingShape,
    pp: u32,
    ep: u32,
) -> Result<Plan, PlanError> {
    config.validate()?;
    cluster.check()?;
    shape.check(config)?;
    let model = ModelShape::new(config, shape.seq_len);
    Planner { model: &model, cluster, shape }.plan(pp, ep)
}

/// The memory one worker of a submitted job needs, by this planner's model: the fullest
/// rank's [`MemoryBreakdown`] (its `capacity` is `u64::MAX`: the caller compares `total`
/// with what the workers have). `layout` is the job's `[parallel]` table; `None` is a
/// plain data-parallel job, every worker holding the whole model (one stage, one
/// micro-batch of `batch_size / workers` sequences). The cluster is one node of `workers`
/// GPUs: bandwidths do not enter memory.
///
/// The model is the GPU's (BF16 weights, DESIGN §1.2); a CPU worker keeps FP32 weights
/// and needs more, so this is a lower bound there: a job refused by it cannot run.
pub fn job_memory(
    config: &ModelConfig,
    workers: u32,
    batch_size: u64,
    seq_len: u32,
    layout: Option<&crate::placement::Parallel>,
) -> Result<MemoryBreakdown, PlanError> {
    let (pp, ep, schedule, micro_batches) = match layout {
        Some(l) => (l.pipeline_ranks(), l.ep, l.schedule, l.micro_batches),
        None => (1, 1, crate::schedule::ScheduleKind::OneFOneB, 1),
    };
    // The planner's data parallelism counts every GPU of a pipeline rank (ep × dp).
    let dp = u64::from(workers / pp.max(1)).max(1);
    let per_micro_batch = batch_size / (dp * u64::from(micro_batches.max(1)));
    let shape = TrainingShape {
        global_batch: u32::try_from(batch_size).unwrap_or(u32::MAX),
        micro_batches: Some(micro_batches),
        micro_batch_size: u32::try_from(per_micro_batch.max(1)).unwrap_or(u32::MAX),
        seq_len,
        schedule,
    };
    let cluster = ClusterSpec::new(1, workers, u64::MAX);
    Ok(plan(config, &cluster, &shape, pp, ep)?.memory)
}

/// Proposes the layout with the shortest estimated time per token among those that fit
/// (with the default global batch every layout runs the same tokens, so this is the
/// shortest step), optionally with pp (pipeline ranks) or ep fixed.
pub fn propose(
    config: &ModelConfig,
    cluster: &ClusterSpec,
    shape: &TrainingShape,
    pp: Option<u32>,
    ep: Option<u32>,
) -> Result<Proposal, PlanError> {
    config.validate()?;
    cluster.check()?;
    shape.check(config)?;
    for (name, value) in [("pp", pp), ("ep", ep)] {
        if value == Some(0) {
            return Err(PlanError::ZeroDegree { name });
        }
    }
    let model = ModelShape::new(config, shape.seq_len);
    let planner = Planner { model: &model, cluster, shape };
    let gpus = cluster.gpus();
    let per_rank = |p: u32| gpus.is_multiple_of(p as u64).then(|| gpus / p as u64);
    // pp counts pipeline ranks here; the layout's rule is on the stages they run.
    let runs = |p: u32| {
        u32::try_from(shape.schedule.stages_for(p))
            .is_ok_and(|stages| shape.schedule.check_stages(stages).is_ok())
    };
    let pps: Vec<u32> = match pp {
        Some(p) => vec![p],
        None => {
            let most = u32::try_from(config.num_hidden_layers).unwrap_or(u32::MAX);
            let pps: Vec<u32> = (1..=most).filter(|&p| per_rank(p).is_some()).filter(|&p| runs(p)).collect();
            if pps.is_empty() {
                let why = if gpus.is_multiple_of(2) {
                    format!(
                        "and the model's {} cannot fill two stages",
                        plural(most as u64, "layer", "layers")
                    )
                } else {
                    format!("and no even number divides the {}", plural(gpus, "GPU", "GPUs"))
                };
                return Err(PlanError::NoPipelineDegree { schedule: shape.schedule, why });
            }
            pps
        }
    };
    let experts = config.n_routed_experts.max(1);
    let mut plans = Vec::new();
    let mut rejected = Vec::new();
    for p in pps {
        let eps: Vec<u32> = match (ep, per_rank(p)) {
            (Some(e), _) => vec![e],
            (None, None) => vec![1],
            (None, Some(dp)) => (1..=experts)
                .filter(|e| experts.is_multiple_of(*e) && dp.is_multiple_of(*e as u64))
                .filter_map(|e| u32::try_from(e).ok())
                .collect(),
        };
        for e in eps {
            match planner.plan(p, e) {
                Ok(plan) => plans.push(plan),
                Err(error) => rejected.push((p, e, error)),
            }
        }
    }
    plans.sort_by(preference);
    let candidates: Vec<Candidate> = plans.iter().map(Candidate::of).collect();
    let Some(chosen) = plans.into_iter().next() else {
        let tried = rejected.len();
        // The closest miss: the smallest memory overshoot, else the first refusal.
        let closest = rejected
            .iter()
            .filter_map(|(p, e, error)| match error {
                PlanError::OutOfMemory { needed, capacity, .. } => {
                    Some((overshoot(*needed, *capacity), p, e, error))
                }
                _ => None,
            })
            .min_by_key(|m| m.0)
            .map(|(_, p, e, error)| (*p, *e, error))
            .or_else(|| rejected.first().map(|(p, e, error)| (*p, *e, error)));
        let (pp, ep, reason) = match closest {
            Some((pp, ep, error)) => (pp, ep, error.to_string()),
            // Every pp tried has at least one ep (1 divides all), so some layout was refused.
            None => (pp.unwrap_or(0), ep.unwrap_or(0), "no layout was tried".into()),
        };
        return Err(PlanError::NoLayoutFits { gpus, tried, pp, ep, reason });
    };
    let rejected =
        rejected.into_iter().map(|(pp, ep, error)| Rejected { pp, ep, reason: error.to_string() }).collect();
    Ok(Proposal { chosen, candidates, rejected })
}

/// Auto mode's order, best first: more tokens per second, then less memory, then the
/// smaller (pp, ep) so that the order is total.
fn preference(a: &Plan, b: &Plan) -> std::cmp::Ordering {
    b.step
        .tokens_per_second
        .total_cmp(&a.step.tokens_per_second)
        .then(a.memory.total.cmp(&b.memory.total))
        .then((a.layout.pp, a.layout.ep).cmp(&(b.layout.pp, b.layout.ep)))
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The model, cluster and batch shape that every layout of one [`plan`] or [`propose`]
/// call is planned for.
struct Planner<'a> {
    model: &'a ModelShape,
    cluster: &'a ClusterSpec,
    shape: &'a TrainingShape,
}

impl Planner<'_> {
    /// The layout checked, its schedule compiled, then each part of the model above in
    /// order: stages, memory, experts, all-to-all, time.
    fn plan(&self, pp: u32, ep: u32) -> Result<Plan, PlanError> {
        let (model, cluster) = (self.model, self.cluster);
        let geometry = layout::geometry(model, cluster, self.shape, pp, ep)?;
        let l = &geometry.layout;
        let schedule =
            compile(&ScheduleSpec { kind: l.schedule, pp: l.stages, micro_batches: l.micro_batches })?;
        let split = stages::split(model, l.stages);
        let uses = memory::rank_uses(&geometry, &schedule, &split)?;
        let mut hosts = vec![Vec::new(); l.stages as usize];
        for (rank, used) in uses.iter().enumerate() {
            for &s in &used.stages {
                hosts[s as usize].push(rank as u32);
            }
        }
        let mut ranks = memory::rank_plans(model, cluster, &geometry, &split, &uses, &hosts);
        let (fullest_rank, memory) = memory::fullest(&ranks)?;

        let experts = experts::experts(model, &geometry, layout::hosts_per_stage(&hosts) * l.expert_dp);
        let mut all_to_all = all_to_all::all_to_all(model, cluster, &geometry, &experts);
        let times: Vec<ChunkTime> = split
            .parts
            .iter()
            .map(|p| ChunkTime {
                compute: p.flops * geometry.tokens as f64 / cluster.gpu_flops,
                all_to_all: p.moe_blocks as f64 * all_to_all.seconds_per_moe_layer,
            })
            .collect();
        let slowest = (0..times.len())
            .max_by(|&a, &b| times[a].alone().total_cmp(&times[b].alone()).then(b.cmp(&a)))
            .unwrap_or(0);
        all_to_all.moe_blocks_per_chunk = split.parts[slowest].moe_blocks;
        all_to_all.per_chunk = all_to_all.per_moe_layer.scaled(all_to_all.moe_blocks_per_chunk as f64);
        let data_parallel_sync = ranks.iter().map(|r| r.data_parallel_sync_seconds).fold(0.0, f64::max);
        let (step, busy) =
            time::step(model, cluster, &geometry, &schedule, &times, slowest, data_parallel_sync)?;
        for (rank, busy) in ranks.iter_mut().zip(busy) {
            rank.busy_seconds = busy;
        }

        Ok(Plan {
            cluster: *cluster,
            stages: stages::stage_plans(model, &geometry, &split, &hosts, &times),
            layout: geometry.layout,
            ranks,
            experts,
            fullest_rank,
            memory,
            all_to_all,
            step,
        })
    }
}
