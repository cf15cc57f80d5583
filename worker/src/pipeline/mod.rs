//! Pipeline- and expert-parallel training on one rank: the coordinator's plan (layout,
//! stages, this rank's compiled instruction stream), the executor that runs the stream in
//! order, the MoE all-to-all over the data plane, and the end-of-step gradient reduction
//! and ZeRO-1 optimizer step (DESIGN §1.3–1.4).
//!
//! The vocabulary (schedule kinds, chunks, instructions and their wire codec, coordinates,
//! which ranks host which stages) is `flotilla_layout`'s, shared with the coordinator.
//!
//! - `plan`: [`PipelinePlan`], the assignment checked against the model (*Layout*).
//! - `executor`: running the stream, the tensors in flight between instructions, the
//!   transfers (*One step*, 1–2).
//! - `zero1`: holder groups, the gradients' reduce-scatter, the statistics' all-reduce,
//!   AdamW on this member's part and the all-gather (*One step*, 3–5).
//! - `state`: the checkpoint shard (snapshot, restore) and saving the whole model's
//!   weights (*Checkpoints*).
//!
//! # One step ([`PipelineTrainer::run_step`])
//! The stream runs in order (`executor`); then each holder group's gradients are
//! reduce-scattered, one world all-reduce carries the norm, losses and expert loads, and
//! each member updates its ZeRO-1 part and all-gathers the group (`zero1`); then the
//! selection biases move by the global loads.
//!
//! # Determinism
//! Every sum runs in an order fixed by the layout (the ring all-reduce over a group sums
//! in the group's rank order; the MoE combine adds experts in index order), so a layout
//! repeats its losses and weights bit for bit. Against single-process training the
//! results differ by rounding only (micro-batches' gradients are summed in another order).

mod executor;
mod plan;
mod state;
mod zero1;

use std::time::Instant;

use bytes::Bytes;
use flotilla_kernels::backend::Backend;
use flotilla_model::ModelError;
use flotilla_model::config::ModelConfig;
use flotilla_model::data::{DataError, DataSampler};
use flotilla_model::moe::ExpertShard;
use flotilla_model::packing::SampleMask;
use flotilla_model::pipeline::{RankModel, StageLayout};
use flotilla_model::train::{StepRecord, TrainConfig, split_windows, step_record};
use flotilla_proto::v1::ExecutedOp;
use tokio::runtime::Handle;

use crate::comm::{CommError, Group, GroupTransport};
use crate::expert_exchange::ExchangeStats;
pub use flotilla_layout::{Chunk, Coordinates, Instruction, ScheduleKind};
pub use plan::PipelinePlan;

use executor::StreamRun;

/// One micro-batch's windows: their tokens and, for packed SFT data, their sample masks.
pub(crate) struct MicroBatch {
    tokens: Vec<Vec<u32>>,
    masks: Option<Vec<SampleMask>>,
}
use zero1::HolderGroup;

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

impl PipelineTrainer {
    /// The rank's model (its stages and expert shard), optimizer shards and data sampler.
    pub fn new(config: TrainConfig, model_config: &ModelConfig, plan: PipelinePlan) -> Result<Self, String> {
        plan.parallel.check_batch(config.batch_size as u64).map_err(|e| e.to_string())?;
        if model_config.num_hidden_layers + model_config.num_nextn_predict_layers > 0xFFF {
            return Err("the data plane's tags address at most 4,095 layers".into());
        }
        let layout = StageLayout::new(model_config, &plan.stage_layers).map_err(|e| e.to_string())?;
        let me = plan.me();
        let stages = plan.stages_of(me.pipeline_rank);
        let shard = ExpertShard { rank: me.ep_rank as usize, size: plan.parallel.ep as usize };
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

        let groups = zero1::holder_groups(&mut model, &plan, model_config)?;
        let (trainable_at, untrainable_first) = state::checkpoint_indices(&mut model, &plan, model_config)?;

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
        self.plan.parallel.global_micro_batches()
    }

    /// The windows of micro-batch `m` of this rank's pipeline for `step`, with their
    /// sample masks when the data is packed SFT (every stage draws both, as it draws the
    /// tokens: the masks travel with the batch to every stage).
    fn windows(&self, step: u64, m: u32) -> Result<MicroBatch, PipelineError> {
        let per = self.config.batch_size as u64 / self.global_micro_batches();
        let first =
            (self.plan.pipeline_index() * u64::from(self.plan.parallel.micro_batches) + u64::from(m)) * per;
        let read = |e: DataError| PipelineError::Step { step, detail: format!("reading the data: {e}") };
        let drawn = (first..first + per)
            .map(|i| self.sampler.window(step, i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(read)?;
        let (tokens, masks) = split_windows(drawn).map_err(read)?;
        Ok(MicroBatch { tokens, masks })
    }

    /// Runs one training step (see the module docs). Blocking: call it from a blocking
    /// thread (`block_in_place`, `spawn_blocking` or a plain thread); it waits on the data
    /// plane through `handle`. Every rank of the job must call it for the same step. Any
    /// communicator that groups can be carved from runs it (the TCP one, an NCCL one).
    pub fn run_step<C: GroupTransport>(
        &mut self,
        comm: &C,
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

    /// Bytes of this rank's model state: f32 weights and gradients of every held tensor,
    /// and the BF16 AdamW moments of its ZeRO-1 parts.
    pub fn state_bytes(&self) -> u64 {
        let weights: u64 = self.model.params().iter().map(|p| p.len() as u64).sum();
        let moments: u64 = self.groups.iter().map(|g| g.m.len() as u64 * 2).sum();
        weights * 8 + moments * 2
    }
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
