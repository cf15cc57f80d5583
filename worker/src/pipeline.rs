//! Pipeline- and expert-parallel training on one rank: the coordinator's plan (layout,
//! stages, this rank's compiled instruction stream), the executor that runs the stream in
//! order, the MoE all-to-all over the data plane, and the end-of-step gradient reduction
//! and ZeRO-1 optimizer step (DESIGN §1.3–1.4).
//!
//! # Layout
//! World rank `g` sits at `(pipeline rank, EP rank, DP replica)` as the coordinator's
//! assignment says. Ranks with the same EP rank and DP replica form one pipeline; ranks
//! with the same pipeline and DP coordinates form an EP group, which exchanges MoE tokens;
//! the `ep × dp` pipelines are data-parallel replicas for everything but the routed
//! experts, which are replicated `dp` times. Pipeline `p = ep_rank + ep·dp_replica` runs
//! windows `(p·M + m)·b .. (p·M + m + 1)·b` of each step's global batch as its micro-batch
//! `m` (`M` micro-batches of `b` windows each), so the union over pipelines is the global
//! batch single-process training draws.
//!
//! Which pipeline ranks host stage `s` follows from the schedule: DualPipe, ranks `s` and
//! `PP−1−s`; DualPipeV, rank `min(s, PP−1−s)`; 1F1B and ZB1P, rank `s`. A rank refuses a
//! stream that computes a stage it does not host.
//!
//! # One step ([`PipelineTrainer::run_step`])
//! 1. The stream runs in order. `F`, `B`, `W`, `BW` and the overlapped `F&B` call the
//!    [`RankModel`] chunk functions; transfers move `[rows, hidden]` f32 tensors with
//!    tags that encode (kind, micro-batch, producing stage), so a message can only be
//!    taken by the receive it is meant for. Sends never wait (the data plane queues them
//!    and its writer tasks send while this rank computes); a receive waits. In `F&B` the
//!    forward chunk and the backward chunk's B run on two threads at once, each with its
//!    own MoE exchanges, so one's all-to-all waits while the other computes; the W part
//!    follows once both are done (W is the only part that writes the weights). Each
//!    instruction's start and end are recorded and reported; the coordinator compares
//!    the executed stream with the compiled one.
//! 2. MoE dispatch and combine go point to point to the EP group's ranks with tags that
//!    add (layer, phase) to the chunk's, so two chunks' exchanges can be in flight at once.
//! 3. Gradients: each trainable tensor belongs to a *holder group*: the ranks that hold
//!    it (the hosts of its stage in every pipeline; for routed experts, only the pipelines
//!    of the owning EP rank). Each group's gradients are flattened and reduce-scattered over
//!    its members (member `i` ends with the sums of the `i`-th equal part, the same bits an
//!    all-reduce would give it) and divided by the number of micro-batches in the global
//!    batch; the other parts are zeroed.
//! 4. One world all-reduce in f64 carries the gradients' sum of squares (each element
//!    counted by the member whose part holds it), the token-weighted losses and the expert
//!    loads; every rank then knows the global norm, the step's losses and the global
//!    loads, so the clipping factor and the selection-bias updates agree everywhere.
//! 5. ZeRO-1: within each holder group, member `i` keeps the AdamW moments of the `i`-th
//!    equal part of the group's flattened tensors only, updates that part, and the group
//!    all-gathers the updated values. Element-wise AdamW makes this bit-identical to every
//!    member updating everything.
//!
//! # Checkpoints
//! [`PipelineTrainer::snapshot`] copies what this rank alone knows plus its share of what
//! it knows with others: for every holder group, the values and the BF16 moments of its
//! ZeRO-1 part (the values are current on every member after the all-gather, so the part
//! is as good as any), cut at tensor boundaries into pieces named by the tensors' global
//! names and start elements; and the selection biases whole, by their first holder. Over
//! the job's ranks the pieces cover every element of the model once, so the shards
//! together are the whole state, in a form any layout can read
//! ([`flotilla_model::shard::CheckpointReader`] assembles whole tensors by name).
//! [`PipelineTrainer::restore`] reads every held tensor and this member's part of each
//! group's moments from such a checkpoint, whatever layout wrote it.
//!
//! # Determinism
//! Every sum runs in an order fixed by the layout (the ring all-reduce over a group sums
//! in the group's rank order; the MoE combine adds experts in index order), so a layout
//! repeats its losses and weights bit for bit. Against single-process training the
//! results differ by rounding only (micro-batches' gradients are summed in another order).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flotilla_kernels::backend::Backend;
use flotilla_model::ModelError;
use flotilla_model::config::ModelConfig;
use flotilla_model::data::DataSampler;
use flotilla_model::moe::ExpertShard;
use flotilla_model::pipeline::{ChunkCache, ChunkStats, ChunkWeightGrads, RankModel, StageLayout};
use flotilla_model::shard::{CheckpointReader, Piece, PieceData, PieceKind, ShardHeader, Snapshot};
use flotilla_model::train::{StepRecord, TrainConfig, step_record};
use flotilla_proto::v1::{ExecutedOp, PipelineAssignment, ScheduledOp, scheduled_op::Kind as OpKind};
use tokio::runtime::Handle;

use crate::comm::{CommError, Communicator, Group, TcpCommunicator, chunk_range};
use crate::expert_exchange::{DataPlaneExchange, EpTopology, ExchangeStats};
pub use crate::tags::Chunk;
use crate::tags::{self, SAVE_TAG};

/// A schedule kind, as the assignment names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    DualPipe,
    DualPipeV,
    OneFOneB,
    Zb1p,
}

impl ScheduleKind {
    fn parse(name: &str) -> Result<Self, String> {
        match name.to_ascii_lowercase().as_str() {
            "dualpipe" => Ok(ScheduleKind::DualPipe),
            "dualpipev" => Ok(ScheduleKind::DualPipeV),
            "1f1b" => Ok(ScheduleKind::OneFOneB),
            "zb1p" => Ok(ScheduleKind::Zb1p),
            other => Err(format!("unknown schedule {other:?}: expected dualpipe, dualpipev, 1f1b or zb1p")),
        }
    }
}

/// One instruction of a rank's stream (the coordinator's `schedule::Instruction`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Forward(Chunk),
    BackwardInput(Chunk),
    BackwardWeight(Chunk),
    Backward(Chunk),
    Overlapped { forward: Chunk, backward: Chunk },
    SendActivation { chunk: Chunk, peer: u32 },
    RecvActivation { chunk: Chunk, peer: u32 },
    SendGrad { chunk: Chunk, peer: u32 },
    RecvGrad { chunk: Chunk, peer: u32 },
}

impl Op {
    /// The instruction as the wire carries it.
    pub fn to_proto(self) -> ScheduledOp {
        let chunk_op = |kind: OpKind, c: Chunk| ScheduledOp {
            kind: kind as i32,
            micro_batch: c.micro_batch,
            stage: c.stage,
            ..ScheduledOp::default()
        };
        let transfer = |kind: OpKind, c: Chunk, peer: u32| ScheduledOp { peer, ..chunk_op(kind, c) };
        match self {
            Op::Forward(c) => chunk_op(OpKind::Forward, c),
            Op::BackwardInput(c) => chunk_op(OpKind::BackwardInput, c),
            Op::BackwardWeight(c) => chunk_op(OpKind::BackwardWeight, c),
            Op::Backward(c) => chunk_op(OpKind::Backward, c),
            Op::Overlapped { forward, backward } => ScheduledOp {
                backward_micro_batch: backward.micro_batch,
                backward_stage: backward.stage,
                ..chunk_op(OpKind::Overlapped, forward)
            },
            Op::SendActivation { chunk, peer } => transfer(OpKind::SendActivation, chunk, peer),
            Op::RecvActivation { chunk, peer } => transfer(OpKind::RecvActivation, chunk, peer),
            Op::SendGrad { chunk, peer } => transfer(OpKind::SendGrad, chunk, peer),
            Op::RecvGrad { chunk, peer } => transfer(OpKind::RecvGrad, chunk, peer),
        }
    }

    /// The instruction a wire op describes.
    pub fn from_proto(op: &ScheduledOp) -> Result<Op, String> {
        let chunk = Chunk { micro_batch: op.micro_batch, stage: op.stage };
        let kind = OpKind::try_from(op.kind).map_err(|_| format!("unknown instruction kind {}", op.kind))?;
        Ok(match kind {
            OpKind::Unspecified => return Err("instruction kind is unspecified".into()),
            OpKind::Forward => Op::Forward(chunk),
            OpKind::BackwardInput => Op::BackwardInput(chunk),
            OpKind::BackwardWeight => Op::BackwardWeight(chunk),
            OpKind::Backward => Op::Backward(chunk),
            OpKind::Overlapped => Op::Overlapped {
                forward: chunk,
                backward: Chunk { micro_batch: op.backward_micro_batch, stage: op.backward_stage },
            },
            OpKind::SendActivation => Op::SendActivation { chunk, peer: op.peer },
            OpKind::RecvActivation => Op::RecvActivation { chunk, peer: op.peer },
            OpKind::SendGrad => Op::SendGrad { chunk, peer: op.peer },
            OpKind::RecvGrad => Op::RecvGrad { chunk, peer: op.peer },
        })
    }

    /// The chunks the instruction computes.
    fn computed(&self) -> Vec<Chunk> {
        match *self {
            Op::Forward(c) | Op::BackwardInput(c) | Op::BackwardWeight(c) | Op::Backward(c) => vec![c],
            Op::Overlapped { forward, backward } => vec![forward, backward],
            _ => Vec::new(),
        }
    }

    fn is_compute(&self) -> bool {
        !self.computed().is_empty()
    }
}

/// Where a world rank sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Coordinates {
    pub pipeline_rank: u32,
    pub ep_rank: u32,
    pub dp_replica: u32,
}

/// A rank's part of a pipeline job, validated from the assignment.
#[derive(Clone, Debug)]
pub struct PipelinePlan {
    /// Pipeline stages.
    pub pp: u32,
    /// Ranks per pipeline.
    pub pipeline_ranks: u32,
    pub ep: u32,
    pub dp: u32,
    pub schedule: ScheduleKind,
    pub micro_batches: u32,
    /// Layers per stage.
    pub stage_layers: Vec<usize>,
    /// `coordinates[g]`: where world rank `g` sits.
    pub coordinates: Vec<Coordinates>,
    /// This rank.
    pub rank: usize,
    /// This rank's instruction stream for one step.
    pub stream: Vec<Op>,
    /// The node of each world rank (empty: all on one node); see [`PipelinePlan::with_nodes`].
    pub nodes: Vec<String>,
    world_of: HashMap<Coordinates, usize>,
}

impl PipelinePlan {
    /// Checks an assignment for world rank `rank` of `world` against the model: every
    /// field named in the error.
    pub fn from_assignment(
        a: &PipelineAssignment,
        rank: usize,
        world: usize,
        model: &ModelConfig,
    ) -> Result<PipelinePlan, String> {
        let layout = a.layout.as_ref().ok_or("pipeline.layout is missing")?;
        let schedule =
            ScheduleKind::parse(&layout.schedule).map_err(|e| format!("pipeline.layout.schedule: {e}"))?;
        let (pp, ep, dp) = (layout.pp, layout.ep, layout.dp);
        if pp == 0 || ep == 0 || dp == 0 || layout.micro_batches == 0 {
            return Err(format!(
                "pipeline.layout: pp, ep, dp and micro_batches must be at least 1, got {pp}, {ep}, {dp}, {}",
                layout.micro_batches
            ));
        }
        let pipeline_ranks = match schedule {
            ScheduleKind::DualPipeV => {
                if !pp.is_multiple_of(2) {
                    return Err(format!(
                        "pipeline.layout.pp: DualPipeV needs an even number of stages, got {pp}"
                    ));
                }
                pp / 2
            }
            _ => pp,
        };
        let needed = u64::from(pipeline_ranks) * u64::from(ep) * u64::from(dp);
        if needed != world as u64 {
            return Err(format!(
                "pipeline.layout: {pipeline_ranks} pipeline ranks × ep {ep} × dp {dp} = {needed} ranks, but the job has {world}"
            ));
        }
        if a.coordinates.len() != world {
            return Err(format!(
                "pipeline.coordinates lists {} ranks for a world of {world}",
                a.coordinates.len()
            ));
        }
        let mut world_of = HashMap::with_capacity(world);
        let mut coordinates = Vec::with_capacity(world);
        for (g, c) in a.coordinates.iter().enumerate() {
            let c =
                Coordinates { pipeline_rank: c.pipeline_rank, ep_rank: c.ep_rank, dp_replica: c.dp_replica };
            if c.pipeline_rank >= pipeline_ranks || c.ep_rank >= ep || c.dp_replica >= dp {
                return Err(format!("pipeline.coordinates[{g}] = {c:?} is outside the layout"));
            }
            if world_of.insert(c, g).is_some() {
                return Err(format!("pipeline.coordinates[{g}] = {c:?} is given to two ranks"));
            }
            coordinates.push(c);
        }
        if a.stages.len() != pp as usize {
            return Err(format!("pipeline.stages lists {} stages, the layout has pp = {pp}", a.stages.len()));
        }
        let mut next_layer = 0u32;
        let mut stage_layers = Vec::with_capacity(a.stages.len());
        for (s, st) in a.stages.iter().enumerate() {
            if st.stage as usize != s || st.first_layer != next_layer || st.layers == 0 {
                return Err(format!(
                    "pipeline.stages[{s}] = (stage {}, layers {}..{}) does not continue the stages before it",
                    st.stage,
                    st.first_layer,
                    st.first_layer.saturating_add(st.layers)
                ));
            }
            next_layer += st.layers;
            stage_layers.push(st.layers as usize);
        }
        if next_layer as usize != model.num_hidden_layers {
            return Err(format!(
                "pipeline.stages cover {next_layer} layers, the model has num_hidden_layers = {}",
                model.num_hidden_layers
            ));
        }
        if model.n_routed_experts > 0 && !model.n_routed_experts.is_multiple_of(ep as usize) {
            return Err(format!(
                "pipeline.layout.ep = {ep} does not divide the model's n_routed_experts = {}",
                model.n_routed_experts
            ));
        }
        let stream = a
            .stream
            .iter()
            .map(Op::from_proto)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("pipeline.stream: {e}"))?;
        let mut plan = PipelinePlan {
            pp,
            pipeline_ranks,
            ep,
            dp,
            schedule,
            micro_batches: layout.micro_batches,
            stage_layers,
            coordinates,
            rank,
            stream,
            nodes: Vec::new(),
            world_of,
        };
        let me = plan.coordinates[rank];
        let hosted = plan.stages_of(me.pipeline_rank);
        for (i, op) in plan.stream.iter().enumerate() {
            for c in op.computed() {
                if c.micro_batch >= plan.micro_batches || !hosted.contains(&(c.stage as usize)) {
                    return Err(format!(
                        "pipeline.stream[{i}] ({op:?}) names micro-batch {} of {} and stage {}, but pipeline rank {} hosts stages {hosted:?}",
                        c.micro_batch, plan.micro_batches, c.stage, me.pipeline_rank
                    ));
                }
            }
            if let Op::SendActivation { peer, chunk }
            | Op::RecvActivation { peer, chunk }
            | Op::SendGrad { peer, chunk }
            | Op::RecvGrad { peer, chunk } = *op
                && (peer >= pipeline_ranks || chunk.stage >= pp || chunk.micro_batch >= plan.micro_batches)
            {
                return Err(format!("pipeline.stream[{i}] ({op:?}) is outside the layout"));
            }
        }
        plan.stream.shrink_to_fit();
        Ok(plan)
    }

    /// Sets the node of every world rank (the assignment's peers' node ids), which decides
    /// which MoE traffic crosses nodes.
    pub fn with_nodes(mut self, nodes: Vec<String>) -> Result<Self, String> {
        if nodes.len() != self.coordinates.len() {
            return Err(format!("{} node ids for {} ranks", nodes.len(), self.coordinates.len()));
        }
        self.nodes = nodes;
        Ok(self)
    }

    /// Whether world ranks `a` and `b` are on one node (all are, when no nodes were set).
    pub fn same_node(&self, a: usize, b: usize) -> bool {
        self.nodes.is_empty() || self.nodes[a] == self.nodes[b]
    }

    /// This rank's coordinates.
    pub fn me(&self) -> Coordinates {
        self.coordinates[self.rank]
    }

    /// The world rank at `c`.
    pub fn world_rank(&self, c: Coordinates) -> usize {
        self.world_of[&c]
    }

    /// The pipeline ranks hosting `stage` (see the module docs).
    pub fn hosts(&self, stage: usize) -> Vec<u32> {
        let s = stage as u32;
        let mut hosts = match self.schedule {
            ScheduleKind::DualPipe => vec![s, self.pp - 1 - s],
            ScheduleKind::DualPipeV => vec![s.min(self.pp - 1 - s)],
            ScheduleKind::OneFOneB | ScheduleKind::Zb1p => vec![s],
        };
        hosts.sort_unstable();
        hosts.dedup();
        hosts
    }

    /// The stages pipeline rank `r` hosts.
    pub fn stages_of(&self, r: u32) -> Vec<usize> {
        (0..self.pp as usize).filter(|&s| self.hosts(s).contains(&r)).collect()
    }

    /// The EP group of this rank: world ranks in EP-rank order.
    fn ep_group(&self) -> Vec<usize> {
        let me = self.me();
        (0..self.ep).map(|e| self.world_rank(Coordinates { ep_rank: e, ..me })).collect()
    }

    /// The pipeline index of this rank's replica, `ep_rank + ep·dp_replica`.
    fn pipeline_index(&self) -> u64 {
        let me = self.me();
        u64::from(me.ep_rank) + u64::from(self.ep) * u64::from(me.dp_replica)
    }
}

/// Why a pipeline step failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The model refused (bad shapes, a malformed MoE payload, a non-finite loss).
    #[error("step {step}, instruction {index} ({op}): {source}")]
    Model {
        step: u64,
        index: usize,
        op: String,
        #[source]
        source: ModelError,
    },
    /// A transfer or collective failed.
    #[error("step {step}: {what}: {source}")]
    Comm {
        step: u64,
        what: String,
        #[source]
        source: CommError,
    },
    /// The stream cannot run as given (a tensor it needs was never produced).
    #[error("step {step}, instruction {index} ({op}): {detail}")]
    Stream { step: u64, index: usize, op: String, detail: String },
    /// The run diverged or the ranks disagree.
    #[error("step {step}: {detail}")]
    Step { step: u64, detail: String },
}

/// One step's outcome on this rank.
#[derive(Clone, Debug)]
pub struct PipelineStep {
    /// The step's record (identical on every rank but for `tokens_per_s`).
    pub record: StepRecord,
    /// The instructions executed, with their spans.
    pub executed: Vec<ExecutedOp>,
    /// Busy time (compute instructions) over the stream's wall time, subtracted from 1.
    pub bubble_fraction: f64,
    /// Seconds in compute instructions.
    pub compute_seconds: f64,
    /// The rest of the step: transfers, waits, the gradient reduction and the update.
    pub communication_seconds: f64,
    /// What the MoE all-to-alls moved, and how long compute waited on them.
    pub exchange: ExchangeStats,
}

/// What executing the stream produced.
struct StreamRun {
    executed: Vec<ExecutedOp>,
    tally: Tally,
    /// Seconds in compute instructions.
    busy: f64,
    /// Seconds from the first instruction to the end of the last.
    seconds: f64,
    exchange: ExchangeStats,
}

/// A group of tensors with the same holders: what one all-reduce and one ZeRO-1 shard
/// cover.
struct HolderGroup {
    /// The group id on the data plane (the same on every member).
    id: u32,
    /// World ranks holding the tensors, ascending.
    members: Vec<usize>,
    /// Indices into `RankModel::trainable_params_mut`.
    params: Vec<usize>,
    /// Total elements.
    len: usize,
    /// AdamW moments of this rank's part of the flattened tensors.
    m: Vec<half::bf16>,
    v: Vec<half::bf16>,
}

/// A rank's model, optimizer shard and data for a pipeline job.
pub struct PipelineTrainer {
    pub config: TrainConfig,
    pub model: RankModel<f32>,
    pub plan: PipelinePlan,
    sampler: DataSampler,
    groups: Vec<HolderGroup>,
    /// `trainable_at[i]`: the index in `RankModel::params` of trainable tensor `i`
    /// (`RankModel::trainable_params_mut` order).
    trainable_at: Vec<usize>,
    /// Indices in `RankModel::params` of the untrainable tensors (selection biases) this
    /// rank is the first holder of.
    untrainable_first: Vec<usize>,
    /// `(HF layer, n_routed)` of every MoE layer of the model, in the statistics' order.
    moe_layers: Vec<usize>,
    threads: usize,
    step: u64,
    /// What `init_from` loaded into this rank, when the run started from an HF checkpoint.
    pub init: Option<flotilla_model::checkpoint::FillReport>,
}

/// Which ranks hold a tensor (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum HolderKey {
    /// `model.embed_tokens`: the hosts of stage 0, and of the last stage when MTP modules
    /// or a tied head read it.
    Embedding,
    /// A stage's tensors other than routed experts.
    Stage(usize),
    /// The routed experts of `stage` owned by `ep_rank`.
    Experts { stage: usize, ep_rank: u32 },
}

/// The most holder groups a layout may need: group ids share the data plane's 14-bit
/// group field with the world communicator (id 0).
const MAX_GROUP_ID: u32 = (1 << 14) - 1;

impl HolderKey {
    /// The key of the tensor named `name` (HF names, see `flotilla_model::model`).
    fn of(name: &str, plan: &PipelinePlan, config: &ModelConfig) -> Result<HolderKey, String> {
        let last = plan.pp as usize - 1;
        match name {
            "model.embed_tokens.weight" => return Ok(HolderKey::Embedding),
            "model.norm.weight" | "lm_head.weight" => return Ok(HolderKey::Stage(last)),
            _ => {}
        }
        let rest = name.strip_prefix("model.layers.").ok_or_else(|| format!("unexpected tensor {name}"))?;
        let (layer, rest) = rest.split_once('.').ok_or_else(|| format!("unexpected tensor {name}"))?;
        let layer: usize = layer.parse().map_err(|_| format!("unexpected tensor {name}"))?;
        let stage = if layer >= config.num_hidden_layers {
            last
        } else {
            let mut first = 0;
            plan.stage_layers
                .iter()
                .position(|&n| {
                    first += n;
                    layer < first
                })
                .ok_or_else(|| format!("layer {layer} of {name} is in no stage"))?
        };
        if let Some(expert) = rest.strip_prefix("mlp.experts.") {
            let e: usize = expert
                .split_once('.')
                .and_then(|(e, _)| e.parse().ok())
                .ok_or_else(|| format!("unexpected tensor {name}"))?;
            let per_rank = config.n_routed_experts / plan.ep as usize;
            return Ok(HolderKey::Experts { stage, ep_rank: (e / per_rank) as u32 });
        }
        Ok(HolderKey::Stage(stage))
    }

    /// The group id every member derives alike.
    fn id(self, plan: &PipelinePlan) -> Result<u32, String> {
        let id = match self {
            HolderKey::Embedding => 1,
            HolderKey::Stage(s) => 2 + s as u64,
            HolderKey::Experts { stage, ep_rank } => {
                2 + u64::from(plan.pp) + stage as u64 * u64::from(plan.ep) + u64::from(ep_rank)
            }
        };
        u32::try_from(id).ok().filter(|&id| id <= MAX_GROUP_ID).ok_or_else(|| {
            format!("the layout needs {id} gradient groups, above the data plane's {MAX_GROUP_ID}")
        })
    }

    /// World ranks holding the tensors, ascending.
    fn members(self, plan: &PipelinePlan, config: &ModelConfig) -> Vec<usize> {
        let last = plan.pp as usize - 1;
        let (pipeline_ranks, ep_ranks): (Vec<u32>, Vec<u32>) = match self {
            HolderKey::Embedding => {
                let mut ranks = plan.hosts(0);
                if config.num_nextn_predict_layers > 0 || config.tie_word_embeddings {
                    ranks.extend(plan.hosts(last));
                }
                (ranks, (0..plan.ep).collect())
            }
            HolderKey::Stage(s) => (plan.hosts(s), (0..plan.ep).collect()),
            HolderKey::Experts { stage, ep_rank } => (plan.hosts(stage), vec![ep_rank]),
        };
        let mut members: Vec<usize> = pipeline_ranks
            .iter()
            .flat_map(|&pipeline_rank| {
                ep_ranks.iter().flat_map(move |&ep_rank| {
                    (0..plan.dp).map(move |dp_replica| Coordinates { pipeline_rank, ep_rank, dp_replica })
                })
            })
            .map(|c| plan.world_rank(c))
            .collect();
        members.sort_unstable();
        members.dedup();
        members
    }
}

fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn encode_f32(values: &[f32]) -> Bytes {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Bytes::from(out)
}

fn decode_f32(bytes: &[u8]) -> Option<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// The step's statistics as this rank saw them, summed over its chunks.
#[derive(Default)]
struct Tally {
    /// Positions scored by the last stage's chunks here.
    tokens: f64,
    main_ce: f64,
    mtp_ce: Vec<f64>,
    balance: f64,
    /// `[MoE layer][expert]`, in `PipelineTrainer::moe_layers` order.
    loads: Vec<Vec<u64>>,
}

impl Tally {
    fn add(&mut self, stats: &ChunkStats, moe_layers: &[usize]) -> Result<(), String> {
        let t = stats.tokens as f64;
        if let Some(ce) = stats.main_ce {
            self.tokens += t;
            self.main_ce += ce * t;
            if self.mtp_ce.len() < stats.mtp_ce.len() {
                self.mtp_ce.resize(stats.mtp_ce.len(), 0.0);
            }
            for (sum, ce) in self.mtp_ce.iter_mut().zip(&stats.mtp_ce) {
                *sum += ce * t;
            }
        }
        self.balance += stats.balance_loss * t;
        for (layer, loads) in stats.moe_layers.iter().zip(&stats.expert_loads) {
            let j = moe_layers
                .iter()
                .position(|l| l == layer)
                .ok_or_else(|| format!("MoE layer {layer} is unknown"))?;
            for (sum, &n) in self.loads[j].iter_mut().zip(loads) {
                *sum += n;
            }
        }
        Ok(())
    }
}

/// The tensors a step keeps between instructions.
#[derive(Default)]
struct Inflight {
    /// Activations by the chunk that produced them (computed here or received).
    activations: HashMap<Chunk, Vec<f32>>,
    /// Input gradients by the chunk whose B computed them (here or received).
    gradients: HashMap<Chunk, Vec<f32>>,
    /// Forwards waiting for their B.
    caches: HashMap<Chunk, ChunkCache<f32>>,
    /// B done, W deferred.
    deferred: BTreeMap<Chunk, (ChunkCache<f32>, ChunkWeightGrads<f32>)>,
}

impl PipelineTrainer {
    /// The rank's model (its stages and expert shard), optimizer shards and data sampler.
    pub fn new(config: TrainConfig, model_config: &ModelConfig, plan: PipelinePlan) -> Result<Self, String> {
        let replicas = u64::from(plan.ep) * u64::from(plan.dp) * u64::from(plan.micro_batches);
        if !(config.batch_size as u64).is_multiple_of(replicas) {
            return Err(format!(
                "batch_size {} cannot be split into ep {} × dp {} pipelines × {} micro-batches of equal size",
                config.batch_size, plan.ep, plan.dp, plan.micro_batches
            ));
        }
        if model_config.num_hidden_layers + model_config.num_nextn_predict_layers > 0xFFF {
            return Err("the data plane's tags address at most 4,095 layers".into());
        }
        let layout = StageLayout::new(model_config, &plan.stage_layers).map_err(|e| e.to_string())?;
        let me = plan.me();
        let stages = plan.stages_of(me.pipeline_rank);
        let shard = ExpertShard { rank: me.ep_rank as usize, size: plan.ep as usize };
        let mut model = RankModel::new(
            model_config,
            layout,
            &stages,
            shard,
            config.seed,
            config.recompute,
            config.precision,
        )
        .map_err(|e| e.to_string())?;
        // `init_from`: this rank reads the tensors it holds, nothing else.
        let init = match &config.init_from {
            Some(dir) => Some(
                flotilla_model::train::init_from_checkpoint(dir, model_config, &mut model.params_mut())
                    .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        let sampler = config
            .sampler(model_config.vocab_size, model_config.num_nextn_predict_layers)
            .map_err(|e| e.to_string())?;

        // Holder groups, by id: the same on every member.
        let mut by_key: BTreeMap<HolderKey, Vec<usize>> = BTreeMap::new();
        let mut lens = Vec::new();
        for (i, p) in model.trainable_params_mut().into_iter().enumerate() {
            by_key.entry(HolderKey::of(&p.name, &plan, model_config)?).or_default().push(i);
            lens.push(p.len());
        }
        let mut groups = Vec::with_capacity(by_key.len());
        for (key, params) in by_key {
            let members = key.members(&plan, model_config);
            if !members.contains(&plan.rank) {
                return Err(format!("this rank holds {key:?} but is not among its holders {members:?}"));
            }
            let len: usize = params.iter().map(|&i| lens[i]).sum();
            let index = members.iter().position(|&r| r == plan.rank).expect("checked above");
            let part = chunk_range(len, members.len(), index).len();
            groups.push(HolderGroup {
                id: key.id(&plan)?,
                members,
                params,
                len,
                m: vec![half::bf16::ZERO; part],
                v: vec![half::bf16::ZERO; part],
            });
        }
        groups.sort_by_key(|g| g.id);
        // Both lists are in the model's order, the trainable one without selection biases.
        let trainable_at = {
            let names: Vec<String> = model.trainable_params_mut().iter().map(|p| p.name.clone()).collect();
            let all = model.params();
            let mut at = Vec::with_capacity(names.len());
            let mut next = 0;
            for name in &names {
                let j = (next..all.len())
                    .find(|&j| all[j].name == *name)
                    .ok_or_else(|| format!("the trainable tensor {name} is not among the held ones"))?;
                at.push(j);
                next = j + 1;
            }
            at
        };
        // The tensors no optimizer updates (selection biases) that this rank is the first
        // holder of: what it writes of them to a checkpoint.
        let untrainable_first = {
            let all = model.params();
            let mut out = Vec::new();
            for (j, p) in all.iter().enumerate() {
                if trainable_at.binary_search(&j).is_ok() {
                    continue;
                }
                let members = HolderKey::of(&p.name, &plan, model_config)?.members(&plan, model_config);
                if members.first() == Some(&plan.rank) {
                    out.push(j);
                }
            }
            out
        };

        let mut moe_layers: Vec<usize> =
            (0..model_config.num_hidden_layers).filter(|&l| model_config.is_moe_layer(l)).collect();
        if model_config.n_routed_experts > 0 {
            let l = model_config.num_hidden_layers;
            moe_layers.extend(l..l + model_config.num_nextn_predict_layers);
        }
        let threads = config
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        Ok(PipelineTrainer {
            config,
            model,
            plan,
            sampler,
            groups,
            trainable_at,
            untrainable_first,
            moe_layers,
            threads,
            step: 0,
            init,
        })
    }

    /// Steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Micro-batches in the global batch.
    fn global_micro_batches(&self) -> u64 {
        u64::from(self.plan.ep) * u64::from(self.plan.dp) * u64::from(self.plan.micro_batches)
    }

    /// The windows of micro-batch `m` of this rank's pipeline for `step`.
    fn windows(&self, step: u64, m: u32) -> Result<Vec<Vec<u32>>, PipelineError> {
        let per = self.config.batch_size as u64 / self.global_micro_batches();
        let first = (self.plan.pipeline_index() * u64::from(self.plan.micro_batches) + u64::from(m)) * per;
        (first..first + per)
            .map(|i| {
                self.sampler
                    .window(step, i)
                    .map(|w| w.tokens)
                    .map_err(|e| PipelineError::Step { step, detail: format!("reading the data: {e}") })
            })
            .collect()
    }

    /// Runs one training step (see the module docs). Blocking: call it from a blocking
    /// thread (`block_in_place`, `spawn_blocking` or a plain thread); it waits on the data
    /// plane through `handle`. Every rank of the job must call it for the same step.
    pub fn run_step(
        &mut self,
        comm: &TcpCommunicator,
        handle: &Handle,
    ) -> Result<PipelineStep, PipelineError> {
        let step = self.step + 1;
        let start = Instant::now();
        self.model.zero_grad();
        let StreamRun { executed, tally, busy, seconds: stream_seconds, exchange } =
            self.run_stream(step, comm, handle)?;
        // One data-plane group per holder group for the whole step, so its all-reduce and
        // its all-gather are collectives #0 and #1 of the group.
        let groups = self
            .groups
            .iter()
            .map(|g| {
                (g.members.len() > 1).then(|| Group::new(comm, g.members.clone(), g.id)).transpose().map_err(
                    |source| PipelineError::Comm { step, what: format!("gradient group {}", g.id), source },
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (sumsq, stats) = self.reduce(step, &groups, comm, handle, tally)?;
        if !stats.loss.is_finite() {
            return Err(PipelineError::Step { step, detail: format!("diverged: loss {}", stats.loss) });
        }
        let grad_norm = sumsq.sqrt();
        let lr = self.config.optimizer.schedule.lr_at(step);
        let scale = self.model.backend().clip_scale(grad_norm, self.config.optimizer.clip);
        self.update(step, &groups, handle, lr, scale)?;
        if self.config.balance.bias_gamma > 0.0 {
            for (layer, moe) in self.model.moe_layers_mut() {
                let j = self.moe_layers.iter().position(|&l| l == layer).expect("every MoE layer is listed");
                moe.update_bias(&stats.expert_loads[j], self.config.balance.bias_gamma).map_err(|e| {
                    PipelineError::Step { step, detail: format!("bias update of MoE layer {layer}: {e}") }
                })?;
            }
        }
        self.step = step;
        let tokens = self.config.batch_size * self.config.seq_len;
        let record = step_record(step, &stats, lr, grad_norm, tokens, start.elapsed());
        let compute_seconds = busy;
        let communication_seconds = (start.elapsed().as_secs_f64() - busy).max(0.0);
        let bubble_fraction = if stream_seconds > 0.0 { (1.0 - busy / stream_seconds).max(0.0) } else { 0.0 };
        Ok(PipelineStep {
            record,
            executed,
            bubble_fraction,
            compute_seconds,
            communication_seconds,
            exchange,
        })
    }

    /// Executes the stream; returns the executed instructions, the statistics, and the busy
    /// and total seconds.
    fn run_stream(
        &mut self,
        step: u64,
        comm: &TcpCommunicator,
        handle: &Handle,
    ) -> Result<StreamRun, PipelineError> {
        let plan = &self.plan;
        let me = plan.me();
        let ep_group = plan.ep_group();
        let ep_topology = EpTopology::new(
            ep_group.iter().map(|&g| plan.nodes.get(g).map_or("", String::as_str)),
            self.model.config().n_routed_experts / ep_group.len(),
            self.model.config().hidden_size,
        );
        let overlap = self.config.parallel.as_ref().is_none_or(|p| p.overlap);
        let mut xstats = ExchangeStats::default();
        let last = plan.pp - 1;
        let seq = self.config.seq_len;
        let loss = self.config.loss;
        let threads = self.threads;
        let windows: Vec<Vec<Vec<u32>>> =
            (0..plan.micro_batches).map(|m| self.windows(step, m)).collect::<Result<_, _>>()?;
        let mut tally = Tally {
            loads: vec![vec![0; self.model.config().n_routed_experts]; self.moe_layers.len()],
            ..Tally::default()
        };
        let mut inflight = Inflight::default();
        let mut executed = Vec::with_capacity(plan.stream.len());
        let (mut busy, stream_start) = (0.0f64, Instant::now());
        let stream = plan.stream.clone();
        for (index, op) in stream.iter().enumerate() {
            let started = (unix_micros(), Instant::now());
            let op_name = format!("{op:?}");
            let model_err =
                |source: ModelError| PipelineError::Model { step, index, op: op_name.clone(), source };
            let stream_err =
                |detail: String| PipelineError::Stream { step, index, op: op_name.clone(), detail };
            let exchange = |chunk: Chunk| DataPlaneExchange {
                comm,
                handle,
                group: &ep_group,
                me: me.ep_rank as usize,
                topology: &ep_topology,
                chunk,
                stats: ExchangeStats::default(),
            };
            let peer_rank = |peer: u32| self.plan.world_rank(Coordinates { pipeline_rank: peer, ..me });
            match *op {
                Op::Forward(c) => {
                    let input = Self::forward_input(&mut inflight, c).map_err(stream_err)?;
                    let mut ex = exchange(c);
                    let out = self
                        .model
                        .forward(
                            c.stage as usize,
                            &windows[c.micro_batch as usize],
                            seq,
                            input,
                            &loss,
                            threads,
                            &mut ex,
                        )
                        .map_err(model_err)?;
                    xstats.add(&ex.stats);
                    self.finish_forward(&mut inflight, &mut tally, c, out).map_err(stream_err)?;
                }
                Op::BackwardInput(c) | Op::Backward(c) => {
                    let (cache, dy) = Self::backward_inputs(&mut inflight, c, last).map_err(stream_err)?;
                    let mut ex = exchange(c);
                    let b = self.model.backward_input(&cache, dy, threads, &mut ex).map_err(model_err)?;
                    xstats.add(&ex.stats);
                    if let Some(g) = b.input_grad {
                        inflight.gradients.insert(c, g);
                    }
                    if matches!(op, Op::Backward(_)) {
                        self.model.backward_weight(cache, b.weight, threads).map_err(model_err)?;
                    } else {
                        inflight.deferred.insert(c, (cache, b.weight));
                    }
                }
                Op::BackwardWeight(c) => {
                    let (cache, grads) = inflight
                        .deferred
                        .remove(&c)
                        .ok_or_else(|| stream_err(format!("no B of {c:?} ran before its W")))?;
                    self.model.backward_weight(cache, grads, threads).map_err(model_err)?;
                }
                Op::Overlapped { forward, backward } => {
                    let input = Self::forward_input(&mut inflight, forward).map_err(stream_err)?;
                    let (cache, dy) =
                        Self::backward_inputs(&mut inflight, backward, last).map_err(stream_err)?;
                    let model = &self.model;
                    let fwd_windows = &windows[forward.micro_batch as usize];
                    let (mut fx, mut bx) = (exchange(forward), exchange(backward));
                    let run_forward = |fx: &mut DataPlaneExchange<'_>| {
                        model.forward(forward.stage as usize, fwd_windows, seq, input, &loss, threads, fx)
                    };
                    let (fwd, bwd) = if overlap {
                        // The two chunks on two threads: one's all-to-all waits while the
                        // other computes.
                        std::thread::scope(|scope| {
                            let f = scope.spawn(|| run_forward(&mut fx));
                            let b = model.backward_input(&cache, dy, threads, &mut bx);
                            let f = f.join().unwrap_or_else(|_| {
                                Err(ModelError::Tensor {
                                    tensor: format!("{forward:?}"),
                                    detail: "the forward thread panicked".into(),
                                })
                            });
                            (f, b)
                        })
                    } else {
                        let f = run_forward(&mut fx);
                        (f, model.backward_input(&cache, dy, threads, &mut bx))
                    };
                    xstats.add(&fx.stats);
                    xstats.add(&bx.stats);
                    let (fwd, bwd) = (fwd.map_err(model_err)?, bwd.map_err(model_err)?);
                    self.finish_forward(&mut inflight, &mut tally, forward, fwd).map_err(stream_err)?;
                    if let Some(g) = bwd.input_grad {
                        inflight.gradients.insert(backward, g);
                    }
                    self.model.backward_weight(cache, bwd.weight, threads).map_err(model_err)?;
                }
                Op::SendActivation { chunk, peer } => {
                    let tensor = inflight.activations.remove(&chunk).ok_or_else(|| {
                        stream_err(format!("the activation of {chunk:?} was not computed here"))
                    })?;
                    let to = peer_rank(peer);
                    handle.block_on(comm.send(to, tags::activation(chunk), encode_f32(&tensor))).map_err(
                        |source| PipelineError::Comm {
                            step,
                            what: format!("{op_name} to world rank {to}"),
                            source,
                        },
                    )?;
                }
                Op::SendGrad { chunk, peer } => {
                    let tensor = inflight.gradients.remove(&chunk).ok_or_else(|| {
                        stream_err(format!("the input gradient of {chunk:?} was not computed here"))
                    })?;
                    let to = peer_rank(peer);
                    handle.block_on(comm.send(to, tags::gradient(chunk), encode_f32(&tensor))).map_err(
                        |source| PipelineError::Comm {
                            step,
                            what: format!("{op_name} to world rank {to}"),
                            source,
                        },
                    )?;
                }
                Op::RecvActivation { chunk, peer } | Op::RecvGrad { chunk, peer } => {
                    let from = peer_rank(peer);
                    let (tag, map) = match op {
                        Op::RecvActivation { .. } => (tags::activation(chunk), &mut inflight.activations),
                        _ => (tags::gradient(chunk), &mut inflight.gradients),
                    };
                    let bytes =
                        handle.block_on(comm.recv(from, tag)).map_err(|source| PipelineError::Comm {
                            step,
                            what: format!("{op_name} from world rank {from}"),
                            source,
                        })?;
                    let tensor = decode_f32(&bytes).ok_or_else(|| {
                        stream_err(format!("world rank {from} sent {} bytes, not f32s", bytes.len()))
                    })?;
                    map.insert(chunk, tensor);
                }
            }
            let elapsed = started.1.elapsed();
            if op.is_compute() {
                busy += elapsed.as_secs_f64();
            }
            executed.push(ExecutedOp {
                op: Some(op.to_proto()),
                start_unix_us: started.0,
                end_unix_us: started.0 + elapsed.as_micros() as u64,
            });
        }
        let leftover = [
            ("activations", inflight.activations.len()),
            ("input gradients", inflight.gradients.len()),
            ("forwards without backward", inflight.caches.len()),
            ("deferred weight gradients", inflight.deferred.len()),
        ];
        if let Some((what, n)) = leftover.iter().find(|(_, n)| *n > 0) {
            return Err(PipelineError::Step {
                step,
                detail: format!("the stream ended with {n} {what} left over"),
            });
        }
        Ok(StreamRun {
            executed,
            tally,
            busy,
            seconds: stream_start.elapsed().as_secs_f64(),
            exchange: xstats,
        })
    }

    /// The input of a forward chunk: none for stage 0, else the previous stage's output.
    fn forward_input(inflight: &mut Inflight, c: Chunk) -> Result<Option<Vec<f32>>, String> {
        if c.stage == 0 {
            return Ok(None);
        }
        let prev = Chunk { stage: c.stage - 1, ..c };
        inflight
            .activations
            .remove(&prev)
            .map(Some)
            .ok_or_else(|| format!("the activation of {prev:?} was neither computed here nor received"))
    }

    fn finish_forward(
        &self,
        inflight: &mut Inflight,
        tally: &mut Tally,
        c: Chunk,
        out: flotilla_model::pipeline::ChunkForward<f32>,
    ) -> Result<(), String> {
        tally.add(&out.stats, &self.moe_layers)?;
        if let Some(output) = out.output {
            inflight.activations.insert(c, output);
        }
        if inflight.caches.insert(c, out.cache).is_some() {
            return Err(format!("{c:?} ran its forward twice"));
        }
        Ok(())
    }

    /// The cache and output gradient a backward chunk needs.
    fn backward_inputs(
        inflight: &mut Inflight,
        c: Chunk,
        last: u32,
    ) -> Result<(ChunkCache<f32>, Option<Vec<f32>>), String> {
        let cache =
            inflight.caches.remove(&c).ok_or_else(|| format!("{c:?} has no forward to go back through"))?;
        if c.stage == last {
            return Ok((cache, None));
        }
        let next = Chunk { stage: c.stage + 1, ..c };
        let dy = inflight
            .gradients
            .remove(&next)
            .ok_or_else(|| format!("the gradient of {next:?} was neither computed here nor received"))?;
        Ok((cache, Some(dy)))
    }
}

impl PipelineTrainer {
    /// Sums each holder group's gradients over its members and divides by the global
    /// micro-batch count; then one world all-reduce of the squared norm, the losses and the
    /// loads. Returns the global squared gradient norm and the step's statistics.
    fn reduce(
        &mut self,
        step: u64,
        groups: &[Option<Group<&TcpCommunicator>>],
        comm: &TcpCommunicator,
        handle: &Handle,
        tally: Tally,
    ) -> Result<(f64, flotilla_model::StepStats), PipelineError> {
        let divisor = self.global_micro_batches() as f32;
        let rank = self.plan.rank;
        let mut sumsq = 0.0f64;
        for (g, group) in self.groups.iter().zip(groups) {
            let mut params = self.model.trainable_params_mut();
            let mut flat = Vec::with_capacity(g.len);
            for &i in &g.params {
                flat.extend_from_slice(&params[i].grad);
            }
            // ZeRO-1 needs only this member's part of the summed gradients.
            if let Some(group) = group {
                handle.block_on(group.reduce_scatter_sum(&mut flat)).map_err(|source| {
                    PipelineError::Comm {
                        step,
                        what: format!(
                            "reduce-scatter of gradient group {} over world ranks {:?}",
                            g.id, g.members
                        ),
                        source,
                    }
                })?;
            }
            let index = g.members.iter().position(|&r| r == rank).expect("a member of its own groups");
            let part = chunk_range(g.len, g.members.len(), index);
            // This member's part, divided; the rest (other members' parts, unreduced here)
            // zeroed, so no tensor holds a gradient that is not the step's.
            let mut offset = 0;
            for &i in &g.params {
                for (j, dst) in params[i].grad.iter_mut().enumerate() {
                    *dst = if part.contains(&(offset + j)) { flat[offset + j] / divisor } else { 0.0 };
                }
                offset += params[i].grad.len();
            }
            // Each element of the group is counted by the one member whose part holds it.
            sumsq += flat[part].iter().map(|&x| f64::from(x / divisor).powi(2)).sum::<f64>();
        }

        // [sumsq, tokens, main_ce·t, balance·t, mtp_ce·t.., loads..]
        let depth = self.model.config().num_nextn_predict_layers;
        let mut packed = vec![sumsq, tally.tokens, tally.main_ce, tally.balance];
        packed.extend((0..depth).map(|k| tally.mtp_ce.get(k).copied().unwrap_or(0.0)));
        for layer in &tally.loads {
            packed.extend(layer.iter().map(|&n| n as f64));
        }
        handle.block_on(comm.all_reduce_sum_f64(&mut packed)).map_err(|source| PipelineError::Comm {
            step,
            what: "all-reduce of the step statistics".into(),
            source,
        })?;
        let tokens = packed[1];
        if tokens.is_nan() || tokens <= 0.0 {
            return Err(PipelineError::Step {
                step,
                detail: format!("the ranks scored {tokens} positions in all"),
            });
        }
        let mean = |x: f64| x / tokens;
        let mtp_ce: Vec<f64> = packed[4..4 + depth].iter().map(|&x| mean(x)).collect();
        let main_ce = mean(packed[2]);
        let balance_loss = mean(packed[3]);
        let mtp_mean = if depth > 0 { mtp_ce.iter().sum::<f64>() / depth as f64 } else { 0.0 };
        let n = self.model.config().n_routed_experts;
        let expert_loads = packed[4 + depth..]
            .chunks(n.max(1))
            .map(|c| c.iter().map(|&x| x as u64).collect())
            .take(self.moe_layers.len())
            .collect();
        let stats = flotilla_model::StepStats {
            loss: main_ce + self.config.loss.mtp_lambda * mtp_mean + balance_loss,
            main_ce,
            mtp_ce,
            balance_loss,
            tokens: tokens as usize,
            moe_layers: self.moe_layers.clone(),
            expert_loads,
        };
        Ok((packed[0], stats))
    }

    /// ZeRO-1: each member of a holder group clips and updates its part of the group's
    /// flattened tensors with AdamW, then the group all-gathers the updated values.
    fn update(
        &mut self,
        step: u64,
        groups: &[Option<Group<&TcpCommunicator>>],
        handle: &Handle,
        lr: f32,
        scale: f32,
    ) -> Result<(), PipelineError> {
        let rank = self.plan.rank;
        let (adamw, be) = (self.config.optimizer.adamw, self.model.backend());
        for (g, group) in self.groups.iter_mut().zip(groups) {
            let mut params = self.model.trainable_params_mut();
            let index = g.members.iter().position(|&r| r == rank).expect("a member of its own groups");
            let part = chunk_range(g.len, g.members.len(), index);
            // Walk the tensors, updating where they overlap this rank's part.
            let mut offset = 0;
            let mut updated = Vec::with_capacity(part.len());
            for &i in &g.params {
                let p = &mut params[i];
                let range = offset..offset + p.len();
                offset = range.end;
                let (lo, hi) = (range.start.max(part.start), range.end.min(part.end));
                if lo >= hi {
                    continue;
                }
                let (a, b) = (lo - range.start, hi - range.start);
                let (ma, mb) = (lo - part.start, hi - part.start);
                if scale != 1.0 {
                    p.grad[a..b].iter_mut().for_each(|x| *x *= scale);
                }
                let decay = p.shape.len() >= 2;
                be.adamw_step(
                    &mut p.value[a..b],
                    &p.grad[a..b],
                    &mut g.m[ma..mb],
                    &mut g.v[ma..mb],
                    step,
                    lr,
                    &adamw,
                    decay,
                )
                .map_err(|e| PipelineError::Step { step, detail: format!("AdamW on {}: {e}", p.name) })?;
                updated.extend_from_slice(&p.value[a..b]);
            }
            let Some(group) = group else { continue };
            let parts = handle.block_on(group.all_gather(encode_f32(&updated))).map_err(|source| {
                PipelineError::Comm { step, what: format!("all-gather of parameter group {}", g.id), source }
            })?;
            let mut flat = Vec::with_capacity(g.len);
            for (member, bytes) in parts.iter().enumerate() {
                let values = decode_f32(bytes)
                    .filter(|v| v.len() == chunk_range(g.len, g.members.len(), member).len());
                let values = values.ok_or_else(|| PipelineError::Step {
                    step,
                    detail: format!(
                        "world rank {} sent a part of parameter group {} of the wrong size ({} bytes)",
                        g.members[member],
                        g.id,
                        bytes.len()
                    ),
                })?;
                flat.extend(values);
            }
            let mut rest = flat.as_slice();
            for &i in &g.params {
                let p = &mut params[i];
                let (mine, tail) = rest.split_at(p.len());
                p.value.copy_from_slice(mine);
                rest = tail;
            }
        }
        Ok(())
    }
}

impl PipelineTrainer {
    /// This rank's shard of a checkpoint of the state after step [`PipelineTrainer::step`]
    /// (see *Checkpoints* in the module docs): for every holder group, the values and the
    /// AdamW moments of this member's ZeRO-1 part, cut at tensor boundaries into pieces
    /// named by the tensors' global names; and, whole, the untrainable tensors (selection
    /// biases) this rank is the first holder of. Across the job's ranks the pieces cover
    /// every element of the model exactly once. A copy: training may go on while it is
    /// written.
    pub fn snapshot(&self) -> Snapshot {
        let params = self.model.params();
        let rank = self.plan.rank;
        let mut pieces = Vec::new();
        for g in &self.groups {
            let index = g.members.iter().position(|&r| r == rank).expect("a member of its own groups");
            let part = chunk_range(g.len, g.members.len(), index);
            let mut offset = 0;
            for &i in &g.params {
                let p = params[self.trainable_at[i]];
                let range = offset..offset + p.len();
                offset = range.end;
                let Some((tensor, moments)) = overlap(&range, &part) else { continue };
                let piece = |kind, data| Piece {
                    name: p.name.clone(),
                    kind,
                    start: tensor.start,
                    shape: p.shape.clone(),
                    data,
                };
                pieces.push(piece(PieceKind::Value, PieceData::F32(p.value[tensor.clone()].to_vec())));
                pieces.push(piece(PieceKind::ExpAvg, PieceData::Bf16(g.m[moments.clone()].to_vec())));
                pieces.push(piece(PieceKind::ExpAvgSq, PieceData::Bf16(g.v[moments].to_vec())));
            }
        }
        for &j in &self.untrainable_first {
            pieces.push(Piece::value_of(params[j]));
        }
        Snapshot {
            header: ShardHeader {
                step: self.step,
                rank: rank as u32,
                world: self.plan.coordinates.len() as u32,
                seed: self.config.seed,
                model: self.model.config().clone(),
            },
            pieces,
        }
    }

    /// Loads a checkpoint written by any layout (a pipeline job's ranks or single-process
    /// [`flotilla_model::train::Trainer::snapshot`]s): the model must be this one's and its
    /// seed the run's `seed`; then every held tensor's value and, for every holder group,
    /// this member's part of the AdamW moments, and the step. All or nothing: everything is
    /// read and checked before anything is assigned, so on an error the trainer is as it
    /// was.
    pub fn restore(&mut self, reader: &CheckpointReader) -> Result<(), String> {
        reader.check_model(self.model.config()).map_err(|e| e.to_string())?;
        if reader.seed() != self.config.seed {
            return Err(format!(
                "the checkpoint was trained with seed {}, the run's `seed` is {}",
                reader.seed(),
                self.config.seed
            ));
        }
        let biases: std::collections::HashSet<String> = self
            .model
            .moe_layers_mut()
            .into_iter()
            .map(|(_, moe)| moe.e_score_correction_bias.name.clone())
            .collect();
        let params = self.model.params();
        let mut values = Vec::with_capacity(params.len());
        let mut index_of = HashMap::with_capacity(params.len());
        for (j, p) in params.iter().enumerate() {
            if self.trainable_at.binary_search(&j).is_err() && !biases.contains(&p.name) {
                return Err(format!(
                    "{} is neither trained nor a selection bias: it cannot be restored",
                    p.name
                ));
            }
            if let Some(shape) = reader.shape(&p.name).filter(|&shape| shape != p.shape.as_slice()) {
                return Err(format!(
                    "tensor `{}` has shape {shape:?} in the checkpoint, this rank holds it as {:?}",
                    p.name, p.shape
                ));
            }
            values.push(reader.values(&p.name, p.len()).map_err(|e| e.to_string())?);
            index_of.insert(p.name.clone(), j);
        }
        let rank = self.plan.rank;
        let mut moments = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            let index = g.members.iter().position(|&r| r == rank).expect("a member of its own groups");
            let part = chunk_range(g.len, g.members.len(), index);
            let (mut m, mut v) = (Vec::with_capacity(part.len()), Vec::with_capacity(part.len()));
            let mut offset = 0;
            for &i in &g.params {
                let p = params[self.trainable_at[i]];
                let range = offset..offset + p.len();
                offset = range.end;
                let Some((tensor, _)) = overlap(&range, &part) else { continue };
                let (pm, pv) = reader.moments(&p.name, p.len()).map_err(|e| e.to_string())?;
                if pm.len() != p.len() || pv.len() != p.len() {
                    return Err(format!(
                        "{}: the checkpoint's moments have {} and {} elements, the tensor {}",
                        p.name,
                        pm.len(),
                        pv.len(),
                        p.len()
                    ));
                }
                m.extend_from_slice(&pm[tensor.clone()]);
                v.extend_from_slice(&pv[tensor]);
            }
            moments.push((m, v));
        }
        drop(params);

        // Everything read: assign.
        for (i, p) in self.model.trainable_params_mut().into_iter().enumerate() {
            p.value = std::mem::take(&mut values[self.trainable_at[i]]);
        }
        for (_, moe) in self.model.moe_layers_mut() {
            let bias = &mut moe.e_score_correction_bias;
            if let Some(&j) = index_of.get(&bias.name) {
                bias.value = std::mem::take(&mut values[j]);
            }
        }
        for (g, (m, v)) in self.groups.iter_mut().zip(moments) {
            g.m = m;
            g.v = v;
        }
        self.step = reader.step();
        Ok(())
    }
}

/// Where the tensor at `range` of a holder group's flattened tensors meets the part
/// `part`: the overlap as a range of the tensor's elements and as a range of the part's.
fn overlap(range: &Range<usize>, part: &Range<usize>) -> Option<(Range<usize>, Range<usize>)> {
    let (lo, hi) = (range.start.max(part.start), range.end.min(part.end));
    (lo < hi).then(|| (lo - range.start..hi - range.start, lo - part.start..hi - part.start))
}

impl PipelineTrainer {
    /// Bytes of this rank's model state: f32 weights and gradients of every held tensor,
    /// and the BF16 AdamW moments of its ZeRO-1 parts.
    pub fn state_bytes(&self) -> u64 {
        let weights: u64 = self.model.params().iter().map(|p| p.len() as u64).sum();
        let moments: u64 = self.groups.iter().map(|g| g.m.len() as u64 * 2).sum();
        weights * 8 + moments * 2
    }

    /// Every held tensor (selection biases included) that this rank is the first holder
    /// of: together, the ranks' lists name each tensor of the model once.
    fn first_held(&self) -> Result<Vec<&flotilla_model::param::Param<f32>>, String> {
        let config = self.model.config();
        let mut out = Vec::new();
        for p in self.model.params() {
            let members = HolderKey::of(&p.name, &self.plan, config)?.members(&self.plan, config);
            if members.first() == Some(&self.plan.rank) {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Writes the whole model's weights to `dir` in the HF layout: every rank sends the
    /// tensors it is first to hold to world rank 0, which assembles and writes them. Every
    /// rank of the job must call it. Blocking, like [`PipelineTrainer::run_step`].
    pub fn save(
        &self,
        comm: &TcpCommunicator,
        handle: &Handle,
        dir: &std::path::Path,
        dtype: flotilla_model::checkpoint::WeightDtype,
    ) -> Result<(), String> {
        let mine = self.first_held()?;
        if self.plan.rank != 0 {
            let mut bytes = Vec::new();
            for p in &mine {
                encode_tensor(&mut bytes, &p.name, &p.value);
            }
            return handle
                .block_on(comm.send(0, SAVE_TAG, Bytes::from(bytes)))
                .map_err(|e| format!("sending this rank's tensors to rank 0: {e}"));
        }
        let mut values: HashMap<String, Vec<f32>> =
            mine.iter().map(|p| (p.name.clone(), p.value.clone())).collect();
        for from in 1..self.plan.coordinates.len() {
            let bytes = handle
                .block_on(comm.recv(from, SAVE_TAG))
                .map_err(|e| format!("receiving rank {from}'s tensors: {e}"))?;
            decode_tensors(&bytes, &mut values).map_err(|e| format!("rank {from}'s tensors: {e}"))?;
        }
        let mut model = flotilla_model::Model::<f32>::new(self.model.config(), self.config.seed, false)
            .map_err(|e| e.to_string())?;
        for p in model.params_mut() {
            let value = values.remove(&p.name).ok_or_else(|| format!("no rank sent {}", p.name))?;
            if value.len() != p.len() {
                return Err(format!("{} has {} values, expected {}", p.name, value.len(), p.len()));
            }
            p.value = value;
        }
        if let Some(extra) = values.keys().next() {
            return Err(format!("a rank sent {extra}, which the model does not have"));
        }
        flotilla_model::train::save_model(&model, dir, dtype, self.config.shard_size())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// `[name length u32][name][value count u64][f32 values]`, little-endian.
fn encode_tensor(out: &mut Vec<u8>, name: &str, values: &[f32]) {
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(values.len() as u64).to_le_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn decode_tensors(mut bytes: &[u8], into: &mut HashMap<String, Vec<f32>>) -> Result<(), String> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if bytes.len() < n {
            return Err(format!("truncated: {} bytes left where {n} were expected", bytes.len()));
        }
        let (head, tail) = bytes.split_at(n);
        *bytes = tail;
        Ok(head)
    }
    while !bytes.is_empty() {
        let len = u32::from_le_bytes(take(&mut bytes, 4)?.try_into().expect("4 bytes")) as usize;
        let name = std::str::from_utf8(take(&mut bytes, len)?)
            .map_err(|_| "a tensor name is not UTF-8".to_string())?;
        let count = u64::from_le_bytes(take(&mut bytes, 8)?.try_into().expect("8 bytes"));
        let size =
            usize::try_from(count).ok().and_then(|c| c.checked_mul(4)).ok_or("a tensor is too large")?;
        let values = decode_f32(take(&mut bytes, size)?).expect("a multiple of 4 bytes");
        if into.insert(name.to_string(), values).is_some() {
            return Err(format!("{name} was sent twice"));
        }
    }
    Ok(())
}
