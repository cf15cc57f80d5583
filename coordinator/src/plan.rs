//! The cluster planner: given a model, a cluster and a batch shape, lays the model out over
//! the GPUs — pipeline stages, expert shards, data parallelism — and estimates what the
//! layout costs in memory, communication and time; or, given no layout, proposes the one
//! with the shortest estimated step among those that fit.
//!
//! The planner deals in counts and bytes only (parameter counts come from
//! [`ParameterCounts`]); it never sees a tensor.
//!
//! # Layout
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
//! Which ranks host which stage comes from the compiled schedule ([`compile`]): DualPipe
//! puts stages r and PP−1−r on rank r, so each stage lives on two ranks and its parameters
//! are held 2·dp times. Gradients of the copies of a parameter are summed over all of them,
//! so all copies form that parameter's data-parallel group, whichever stages they belong to.
//!
//! # Stage assignment
//!
//! Layers are assigned in order, minimizing the largest stage's forward FLOPs per token
//! (dense and MoE layers differ; the attention core's FLOPs grow with the sequence). The
//! embedding goes on stage 0; the final norm, the output head and the MTP modules (whose
//! block, projection and second pass through the shared head all run after the main model)
//! on the last stage. Under DualPipe rank 0 hosts stages 0 and PP−1, so the first and last
//! ranks each hold the embedding, the head and the MTP modules, and the MTP module's
//! embedding lookup is local (DESIGN §1.4: MTP, head and embedding on the same PP rank).
//! Under schedules whose last stage's rank does not host stage 0 (1F1B, ZB1P), that rank
//! holds a copy of the embedding when the last stage uses it: for the MTP modules' lookup,
//! or as the head's weight when `tie_word_embeddings` is set. That copy and stage 0's are
//! copies of one parameter: one ZeRO-1 group, one gradient sum.
//!
//! # Experts and node-limited routing
//!
//! An EP group must fill whole nodes or fit inside one, and each routing group of
//! `n_routed_experts / n_group` consecutive experts must live in one node. Then choosing
//! `topk_group` groups is choosing at most `topk_group` nodes: group-limited routing is the
//! report's node-limited routing (DESIGN §1.1: 8 groups, 4 kept, one group per node at
//! EP 64).
//!
//! # Memory per GPU
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
//! # All-to-all
//!
//! Per MoE layer and micro-batch, each GPU's tokens are dispatched as FP8 with their 1×128
//! scales plus, per chosen expert, an index and a weight (4 bytes each), and combined back
//! as BF16 (DESIGN §1.2); backward moves the same volumes (FP8 gradients into the experts,
//! BF16 back). A token crosses IB once per remote node it reaches, to the GPU with the same
//! in-node index, which forwards it over NVLink to the GPUs of that node hosting its
//! experts (DESIGN §1.4). Expected counts assume uniform routing: `topk_group` of the
//! `n_group` groups chosen at random, then `num_experts_per_tok` experts at random among
//! theirs, and the token's own GPU uniformly placed in the EP group.
//!
//! # Time
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

use crate::schedule::{
    Chunk, Costs, Instruction, Schedule, ScheduleError, ScheduleKind, ScheduleSpec, compile, simulate_with,
};
use flotilla_model::{ConfigError, ModelConfig, ParameterCounts};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The GPUs and links of a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterSpec {
    /// Nodes.
    pub nodes: u32,
    /// GPUs per node.
    pub gpus_per_node: u32,
    /// Memory of one GPU, in bytes.
    pub gpu_memory_bytes: u64,
    /// NVLink bandwidth a GPU achieves to the others of its node, bytes/s.
    pub intra_node_bandwidth: f64,
    /// InfiniBand bandwidth of one GPU's NIC, bytes/s.
    pub inter_node_bandwidth: f64,
    /// FLOP/s one GPU sustains on the model's work.
    pub gpu_flops: f64,
}

impl ClusterSpec {
    /// The report's NVLink bandwidth within an H800 node (DESIGN §1.4): 160 GB/s.
    pub const NVLINK_BANDWIDTH: f64 = 160e9;
    /// The report's InfiniBand bandwidth between nodes (DESIGN §1.4): 50 GB/s.
    pub const IB_BANDWIDTH: f64 = 50e9;
    /// The H800 SXM's dense FP8 tensor-core peak, 1979 TFLOP/s (NVIDIA's H100 SXM data
    /// sheet; the H800 has the same tensor cores).
    pub const H800_DENSE_FP8_FLOPS: f64 = 1979e12;
    /// The default sustained rate: half the dense FP8 peak (equal to the dense BF16 peak).
    /// At this rate the report's layout spends about as long computing a chunk as moving
    /// its all-to-all, the ≈ 1:1 ratio the report states; the report's 180K H800
    /// GPU-hours per trillion tokens imply a lower sustained rate, so estimated step times
    /// are optimistic, while comparisons between layouts depend mostly on ratios.
    pub const DEFAULT_GPU_FLOPS: f64 = Self::H800_DENSE_FP8_FLOPS / 2.0;

    /// A cluster with the report's bandwidths and the default sustained FLOP/s.
    pub fn new(nodes: u32, gpus_per_node: u32, gpu_memory_bytes: u64) -> Self {
        ClusterSpec {
            nodes,
            gpus_per_node,
            gpu_memory_bytes,
            intra_node_bandwidth: Self::NVLINK_BANDWIDTH,
            inter_node_bandwidth: Self::IB_BANDWIDTH,
            gpu_flops: Self::DEFAULT_GPU_FLOPS,
        }
    }

    /// GPUs in the cluster.
    pub fn gpus(&self) -> u64 {
        self.nodes as u64 * self.gpus_per_node as u64
    }

    fn check(&self) -> Result<(), PlanError> {
        let bad = |why: String| Err(PlanError::Cluster(why));
        if self.nodes == 0 || self.gpus_per_node == 0 {
            return bad(format!(
                "needs at least one node and one GPU per node, got {} × {}",
                self.nodes, self.gpus_per_node
            ));
        }
        if self.gpu_memory_bytes == 0 {
            return bad("GPU memory must be more than 0 bytes".into());
        }
        for (name, value) in [
            ("intra-node bandwidth", self.intra_node_bandwidth),
            ("inter-node bandwidth", self.inter_node_bandwidth),
            ("GPU FLOP/s", self.gpu_flops),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return bad(format!("{name} must be finite and > 0, got {value}"));
            }
        }
        Ok(())
    }
}

/// DeepSeek-V3's global batch at the end of its ramp, in sequences (DESIGN §1.1).
pub const DEEPSEEK_V3_GLOBAL_BATCH: u32 = 15_360;

/// DeepSeek-V3's pre-training sequence length (DESIGN §1.1).
pub const DEEPSEEK_V3_SEQ_LEN: u32 = 4096;

/// What one training step processes and with which pipeline schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainingShape {
    /// Sequences per step over the whole cluster; sets the micro-batches per step to
    /// `global_batch / (dp × micro_batch_size)` when `micro_batches` is `None`, and is
    /// ignored otherwise.
    pub global_batch: u32,
    /// Micro-batches each pipeline runs per step, if fixed.
    pub micro_batches: Option<u32>,
    /// Sequences in one micro-batch.
    pub micro_batch_size: u32,
    /// Tokens in one sequence.
    pub seq_len: u32,
    /// The pipeline schedule.
    pub schedule: ScheduleKind,
}

impl Default for TrainingShape {
    /// The report's setting: 15360 sequences of 4096 tokens per step under DualPipe, one
    /// sequence per micro-batch. One sequence is the most whose PP+1 in-flight micro-batches
    /// leave room in 80 GiB at PP 16 (see the module docs); with dp 128 it gives 120
    /// micro-batches per step, above DualPipe's minimum of 2·PP.
    fn default() -> Self {
        TrainingShape {
            global_batch: DEEPSEEK_V3_GLOBAL_BATCH,
            micro_batches: None,
            micro_batch_size: 1,
            seq_len: DEEPSEEK_V3_SEQ_LEN,
            schedule: ScheduleKind::DualPipe,
        }
    }
}

impl TrainingShape {
    /// The longest sequence `config` allows, capped at DeepSeek-V3's pre-training length:
    /// the sequence length to use when none is given.
    pub fn default_seq_len(config: &ModelConfig) -> u32 {
        u32::try_from(config.max_position_embeddings)
            .map_or(DEEPSEEK_V3_SEQ_LEN, |m| m.min(DEEPSEEK_V3_SEQ_LEN))
    }

    /// Each value on its own first, then the relations between them and the model.
    fn check(&self, config: &ModelConfig) -> Result<(), PlanError> {
        let bad = |why: String| Err(PlanError::Shape(why));
        if self.micro_batch_size == 0 {
            return bad("the micro-batch size must be at least 1 sequence".into());
        }
        if self.seq_len == 0 {
            return bad("the sequence length must be at least 1 token".into());
        }
        match self.micro_batches {
            Some(0) => return bad("micro-batches must be at least 1".into()),
            None if self.global_batch == 0 => {
                return bad("the global batch must be at least 1 sequence".into());
            }
            _ => {}
        }
        if self.seq_len as usize > config.max_position_embeddings {
            return bad(format!(
                "sequence length {} exceeds the model's max_position_embeddings = {}",
                self.seq_len, config.max_position_embeddings
            ));
        }
        Ok(())
    }
}

/// Why a layout is refused.
#[derive(Debug, Error, PartialEq)]
pub enum PlanError {
    /// The model configuration is invalid.
    #[error(transparent)]
    Model(#[from] ConfigError),
    /// The cluster description makes no sense.
    #[error("invalid cluster: {0}")]
    Cluster(String),
    /// The batch shape makes no sense.
    #[error("invalid training shape: {0}")]
    Shape(String),
    /// A parallel degree of zero.
    #[error("{name} must be at least 1")]
    ZeroDegree {
        /// "pp" or "ep".
        name: &'static str,
    },
    /// More stages than layers.
    #[error(
        "pp = {pp} cuts the model into {stages} stages, but it has only {layers} layers: every stage needs at least one"
    )]
    TooManyStages {
        /// Pipeline ranks asked for.
        pp: u32,
        /// Stages they make under the schedule.
        stages: u64,
        /// Main-model layers.
        layers: usize,
    },
    /// The GPUs do not split into pipeline ranks and EP groups.
    #[error(
        "pp × ep = {pp} × {ep} = {product} does not divide the {gpus} GPUs: each pipeline rank needs the same number of GPUs, in whole EP groups"
    )]
    GpusNotDivisible {
        /// Pipeline ranks.
        pp: u32,
        /// EP group size.
        ep: u32,
        /// pp × ep.
        product: u64,
        /// GPUs in the cluster.
        gpus: u64,
    },
    /// The experts do not split evenly over the EP group.
    #[error("ep = {ep} does not divide the {experts} routed experts: every EP rank must host as many")]
    ExpertsNotDivisible {
        /// EP group size.
        ep: u32,
        /// Routed experts per MoE layer.
        experts: usize,
    },
    /// An EP group that straddles node boundaries.
    #[error(
        "an EP group of {ep} GPUs neither fills whole nodes of {gpus_per_node} GPUs nor fits inside one, so tokens could not cross IB once per node"
    )]
    EpNotNodeAligned {
        /// EP group size.
        ep: u32,
        /// GPUs per node.
        gpus_per_node: u32,
    },
    /// A routing group split over nodes.
    #[error(
        "with ep = {ep} a node hosts {experts_per_node} experts of a layer but a routing group has {group_size}: groups would span nodes and topk_group = {topk_group} would no longer limit the nodes a token reaches (use ep ≤ {max_ep})"
    )]
    GroupSpansNodes {
        /// EP group size.
        ep: u32,
        /// Experts of one layer on one node.
        experts_per_node: u64,
        /// Experts per routing group.
        group_size: usize,
        /// Groups a token may use.
        topk_group: usize,
        /// The largest EP size that keeps groups within nodes.
        max_ep: u64,
    },
    /// The global batch does not split into micro-batches.
    #[error(
        "the global batch of {global_batch} sequences is not a multiple of dp × micro-batch size = {dp} × {micro_batch_size}"
    )]
    BatchNotDivisible {
        /// Sequences per step.
        global_batch: u32,
        /// Data-parallel degree.
        dp: u64,
        /// Sequences per micro-batch.
        micro_batch_size: u32,
    },
    /// The schedule would be too large to simulate.
    #[error("{chunks} chunks (micro-batches × stages) per step is more than the planner simulates ({limit})")]
    TooManyChunks {
        /// Micro-batches × stages.
        chunks: u64,
        /// The most the planner simulates.
        limit: u64,
    },
    /// The schedule cannot be compiled with these stages and micro-batches.
    #[error("pipeline schedule: {0}")]
    Schedule(#[from] ScheduleError),
    /// The layout does not fit in GPU memory.
    #[error(
        "does not fit: pipeline rank {rank} needs {} per GPU but a GPU has {}, {} too much; its largest component is {component} ({})",
        size(*.needed), size(*.capacity), size(overshoot(*.needed, *.capacity)), size(*.component_bytes)
    )]
    OutOfMemory {
        /// The fullest pipeline rank.
        rank: u32,
        /// Bytes it needs per GPU.
        needed: u64,
        /// Bytes a GPU has.
        capacity: u64,
        /// Its largest memory component.
        component: &'static str,
        /// That component's bytes.
        component_bytes: u64,
    },
    /// Auto mode has no pipeline degree to try under the schedule.
    #[error(
        "{schedule} needs an even pp ≥ 2 pipeline ranks, {why}; 1f1b, zb1p and dualpipev run with any pp"
    )]
    NoPipelineDegree {
        /// The schedule asked for.
        schedule: ScheduleKind,
        /// Why no even pp works.
        why: String,
    },
    /// Auto mode found nothing that fits.
    #[error("no layout of the {gpus} GPUs fits ({tried} tried); the closest, pp = {pp}, ep = {ep}: {reason}")]
    NoLayoutFits {
        /// GPUs in the cluster.
        gpus: u64,
        /// Layouts tried.
        tried: usize,
        /// The closest layout's pp.
        pp: u32,
        /// The closest layout's ep.
        ep: u32,
        /// Why it was refused.
        reason: String,
    },
}

/// A byte count for people: GiB with two decimals, or MiB or KiB with one, or bytes, so
/// that small amounts do not print as "0.00 GiB".
pub fn format_bytes(bytes: f64) -> String {
    const KIB: f64 = 1024.0;
    match bytes {
        b if b >= KIB * KIB * KIB => format!("{:.2} GiB", b / (KIB * KIB * KIB)),
        b if b >= KIB * KIB => format!("{:.1} MiB", b / (KIB * KIB)),
        b if b >= KIB => format!("{:.1} KiB", b / KIB),
        b => format!("{b:.0} B"),
    }
}

fn size(bytes: u64) -> String {
    format_bytes(bytes as f64)
}

fn overshoot(needed: u64, capacity: u64) -> u64 {
    needed.saturating_sub(capacity)
}

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

/// One pipeline stage.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StagePlan {
    /// Stage index, in forward order.
    pub stage: u32,
    /// Its first main-model layer (0-based).
    pub first_layer: u32,
    /// Main-model layers it runs (`first_layer..first_layer + layers`); at least one.
    pub layers: u32,
    /// Of those, dense-FFN layers.
    pub dense_layers: u32,
    /// Of those, MoE layers.
    pub moe_layers: u32,
    /// Whether it holds the token embedding.
    pub embedding: bool,
    /// Whether it holds the final norm and the output head.
    pub head: bool,
    /// MTP modules it holds.
    pub mtp_modules: u32,
    /// Pipeline ranks that host it.
    pub ranks: Vec<u32>,
    /// Forward FLOPs per token.
    pub forward_flops_per_token: f64,
    /// Non-expert parameters, held whole by each GPU of a hosting rank.
    pub replicated_parameters: u64,
    /// Routed-expert parameters each GPU holds (its EP shard).
    pub expert_parameters_per_gpu: u64,
    /// Activation bytes one micro-batch leaves cached per GPU until its backward.
    pub activation_bytes: u64,
    /// Forward compute time of one micro-batch, seconds.
    pub forward_compute_seconds: f64,
    /// Forward all-to-all time of one micro-batch, seconds.
    pub forward_all_to_all_seconds: f64,
}

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

/// The experts of one layer on one node of an EP group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct NodeExperts {
    /// Node within the EP group.
    pub node: u32,
    /// First routed expert it hosts.
    pub first_expert: u32,
    /// Last routed expert it hosts.
    pub last_expert: u32,
    /// First routing group it hosts.
    pub first_group: u32,
    /// Last routing group it hosts.
    pub last_group: u32,
}

/// Where the routed experts live and what node-limited routing makes of it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExpertPlacement {
    /// Routed experts per MoE layer.
    pub routed_experts: u32,
    /// Routed experts of each MoE layer on one GPU; GPU i of an EP group hosts experts
    /// `i·e .. (i+1)·e`.
    pub experts_per_gpu: u32,
    /// Nodes one EP group spans (1 when it fits inside a node).
    pub ep_nodes: u32,
    /// GPUs of one EP group on each of its nodes.
    pub ep_gpus_per_node: u32,
    /// Routing groups (n_group).
    pub routing_groups: u32,
    /// Routing groups whose experts one node hosts.
    pub groups_per_node: u32,
    /// Groups a token may route into (topk_group).
    pub topk_group: u32,
    /// Copies of each expert in the cluster: hosting ranks × expert_dp.
    pub expert_replicas: u64,
    /// Most nodes a token's experts can be on.
    pub max_nodes_per_token: u32,
    /// Expected nodes a token's experts are on, under uniform routing.
    pub expected_nodes_per_token: f64,
    /// Expected GPUs a token's experts are on, under uniform routing.
    pub expected_gpus_per_token: f64,
    /// The nodes of one EP group and the experts of a layer on each.
    pub nodes: Vec<NodeExperts>,
}

/// Bytes one GPU sends per micro-batch, split by link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Volume {
    /// FP8 dispatch over NVLink.
    pub dispatch_intra_node: f64,
    /// FP8 dispatch over IB.
    pub dispatch_inter_node: f64,
    /// BF16 combine over NVLink.
    pub combine_intra_node: f64,
    /// BF16 combine over IB.
    pub combine_inter_node: f64,
}

impl Volume {
    fn scaled(self, by: f64) -> Volume {
        Volume {
            dispatch_intra_node: self.dispatch_intra_node * by,
            dispatch_inter_node: self.dispatch_inter_node * by,
            combine_intra_node: self.combine_intra_node * by,
            combine_inter_node: self.combine_inter_node * by,
        }
    }

    /// Seconds the transfers take: dispatch then combine, each as slow as its slower link.
    fn seconds(&self, cluster: &ClusterSpec) -> f64 {
        let (nvlink, ib) = (cluster.intra_node_bandwidth, cluster.inter_node_bandwidth);
        (self.dispatch_intra_node / nvlink).max(self.dispatch_inter_node / ib)
            + (self.combine_intra_node / nvlink).max(self.combine_inter_node / ib)
    }
}

/// Expert-parallel all-to-all traffic of one GPU.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AllToAll {
    /// Tokens of one micro-batch on one GPU.
    pub tokens_per_micro_batch: u64,
    /// Bytes a token's dispatch carries: FP8 hidden state, its 1×128 scales, expert indices
    /// and weights.
    pub dispatch_bytes_per_token: u64,
    /// Bytes a token's combine carries: the BF16 hidden state.
    pub combine_bytes_per_token: u64,
    /// Expected IB transfers per token (remote nodes reached).
    pub inter_node_copies_per_token: f64,
    /// Expected NVLink transfers per token (expert GPUs other than the sender or IB relay).
    pub intra_node_copies_per_token: f64,
    /// Per MoE layer and micro-batch, forward (backward moves the same).
    pub per_moe_layer: Volume,
    /// The MoE blocks of the slowest stage.
    pub moe_blocks_per_chunk: u32,
    /// Per chunk of the slowest stage, forward (backward moves the same).
    pub per_chunk: Volume,
    /// Seconds per MoE layer and micro-batch, forward.
    pub seconds_per_moe_layer: f64,
}

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

/// The most chunks (micro-batches × stages) a plan simulates: the schedule compiler's limit.
/// The simulator holds every chunk's state, and a real step has thousands, not millions.
pub const MAX_CHUNKS: u64 = crate::schedule::MAX_CHUNKS;

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
    let even_only = shape.schedule == ScheduleKind::DualPipe;
    let pps: Vec<u32> = match pp {
        Some(p) => vec![p],
        None => {
            let most = u32::try_from(config.num_hidden_layers).unwrap_or(u32::MAX);
            let pps: Vec<u32> = (1..=most)
                .filter(|&p| per_rank(p).is_some())
                .filter(|&p| !even_only || p.is_multiple_of(2))
                .collect();
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

/// A pipeline stage's main-model layers: `first_layer..first_layer + layers`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRange {
    /// The stage's first main-model layer (0-based).
    pub first_layer: u32,
    /// Main-model layers it runs; at least one.
    pub layers: u32,
}

/// Cuts the model's main layers into `stages` contiguous stages of at least one layer each,
/// the way [`plan`] does (see the module docs): the largest stage's forward FLOPs per token
/// at `seq_len` tokens per sequence is minimized, with the embedding counted on stage 0 and
/// the final norm, the head and the MTP modules on the last stage. `stages` counts stages
/// (layer groups), not pipeline ranks.
pub fn split_layers(config: &ModelConfig, seq_len: u32, stages: u32) -> Result<Vec<LayerRange>, PlanError> {
    config.validate()?;
    if stages == 0 {
        return Err(PlanError::ZeroDegree { name: "pp" });
    }
    if seq_len == 0 {
        return Err(PlanError::Shape("the sequence length must be at least 1 token".into()));
    }
    let layers = config.num_hidden_layers;
    if stages as usize > layers {
        return Err(PlanError::TooManyStages { pp: stages, stages: u64::from(stages), layers });
    }
    let split = ModelShape::new(config, seq_len).split(stages);
    Ok(split
        .starts
        .windows(2)
        .map(|w| LayerRange {
            first_layer: u32::try_from(w[0]).unwrap_or(u32::MAX),
            layers: u32::try_from(w[1] - w[0]).unwrap_or(u32::MAX),
        })
        .collect())
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

/// Bytes of `n` values in BF16.
fn bf16_bytes(n: u64) -> u64 {
    2 * n
}

/// Bytes of `n` activation values in FP8 with one FP32 scale per 1×128 tile.
fn fp8_bytes(n: u64) -> u64 {
    n + 4 * n.div_ceil(128)
}

/// Bytes of `n` weights in FP8 with one FP32 scale per 128×128 block.
fn fp8_weight_bytes(n: u64) -> u64 {
    n + 4 * n.div_ceil(128 * 128)
}

/// Bytes per parameter: BF16 weights, FP32 gradients, FP32 master + two BF16 moments.
const WEIGHT_BYTES: u64 = 2;
const GRADIENT_BYTES: u64 = 4;
const OPTIMIZER_BYTES: u64 = 4 + 2 + 2;

/// A piece of the model as the planner sees it.
#[derive(Clone, Copy, Debug, Default)]
struct Part {
    /// Parameters every GPU of a hosting rank holds whole.
    replicated: u64,
    /// Of those, the weights of FP8 GEMMs.
    replicated_fp8: u64,
    /// Routed-expert parameters (all experts; a GPU holds 1/ep of them).
    routed: u64,
    /// Forward FLOPs per token.
    flops: f64,
    /// Activation bytes cached per token until backward.
    activations: u64,
    /// MoE blocks (each one all-to-all dispatch and combine).
    moe_blocks: u32,
}

impl std::ops::AddAssign for Part {
    fn add_assign(&mut self, other: Part) {
        self.replicated += other.replicated;
        self.replicated_fp8 += other.replicated_fp8;
        self.routed += other.routed;
        self.flops += other.flops;
        self.activations += other.activations;
        self.moe_blocks += other.moe_blocks;
    }
}

/// The model reduced to the parts a layout places.
struct ModelShape {
    layers: Vec<Part>,
    moe: Vec<bool>,
    embedding: Part,
    /// Final norm and output head.
    head: Part,
    /// One MTP module, with its pass through the shared head.
    mtp: Part,
    mtp_modules: u32,
    /// Whether the head's weight is the embedding matrix.
    tied_embedding: bool,
    hidden: u64,
    routed_experts: usize,
    experts_per_token: usize,
    n_group: usize,
    topk_group: usize,
}

impl ModelShape {
    /// Per-layer figures are the model's totals ([`ParameterCounts`]) divided by the
    /// layers of each kind, which are identical.
    fn new(config: &ModelConfig, seq_len: u32) -> Self {
        let counts = ParameterCounts::of(config);
        let (main, mtp) = (counts.main, counts.mtp);
        let d = config.hidden_size as u64;
        let layers = config.num_hidden_layers;
        let moe: Vec<bool> = (0..layers).map(|l| config.is_moe_layer(l)).collect();
        let moe_layers = moe.iter().filter(|m| **m).count() as u64;
        let dense_layers = layers as u64 - moe_layers;
        let per = |total: u64, count: u64| total.checked_div(count).unwrap_or(0);

        let attention = per(main.attention, layers as u64);
        // Every norm but the final one belongs to a layer.
        let norms = per(main.norms - d, layers as u64);
        let dense_ffn = per(main.dense_ffn, dense_layers);
        let shared = per(main.shared_experts, moe_layers);
        let gates = per(main.gates, moe_layers);
        let routed = per(main.routed_experts, moe_layers);
        let k = config.num_experts_per_tok as u64;
        let expert = per(routed, config.n_routed_experts as u64);

        let heads = config.num_attention_heads as u64;
        let causal_keys = (seq_len as f64 + 1.0) / 2.0;
        let attention_core =
            2.0 * heads as f64 * (config.qk_head_dim() + config.v_head_dim) as f64 * causal_keys;
        let attention_activations = bf16_bytes(d)
            + config.q_lora_rank.map_or(0, |r| bf16_bytes(r as u64))
            + bf16_bytes((config.kv_lora_rank + config.qk_rope_head_dim) as u64)
            + fp8_bytes(heads * config.v_head_dim as u64)
            + 4 * heads;
        let dense = Part {
            replicated: attention + norms + dense_ffn,
            replicated_fp8: attention + dense_ffn,
            routed: 0,
            flops: 2.0 * (attention + dense_ffn) as f64 + attention_core,
            activations: attention_activations
                + bf16_bytes(d)
                + fp8_bytes(2 * config.intermediate_size as u64),
            moe_blocks: 0,
        };
        let shared_count = config.n_shared_experts as u64;
        let moe_layer = Part {
            replicated: attention + norms + shared + gates,
            replicated_fp8: attention + shared,
            routed,
            flops: 2.0 * (attention + shared + gates + k * expert) as f64 + attention_core,
            activations: attention_activations
                + bf16_bytes(d)
                + k * 12
                + k * fp8_bytes(d)
                + (k + shared_count) * fp8_bytes(2 * config.moe_intermediate_size as u64),
            moe_blocks: 1,
        };
        let vocab = config.vocab_size as u64;
        let head = Part {
            replicated: main.head + d,
            replicated_fp8: 0,
            routed: 0,
            flops: 2.0 * (vocab * d) as f64,
            activations: bf16_bytes(d),
            moe_blocks: 0,
        };
        let embedding = Part { replicated: main.embedding, activations: 4, ..Part::default() };

        let modules = config.num_nextn_predict_layers as u64;
        let mtp_block = if config.n_routed_experts > 0 { moe_layer } else { dense };
        let mtp_routed = per(mtp.routed_experts, modules);
        let projection = per(mtp.mtp_projection, modules);
        let mtp_part = Part {
            replicated: per(mtp.total(), modules) - mtp_routed,
            replicated_fp8: per(
                mtp.attention + mtp.dense_ffn + mtp.shared_experts + mtp.mtp_projection,
                modules,
            ),
            routed: mtp_routed,
            flops: mtp_block.flops + 2.0 * projection as f64 + head.flops,
            activations: mtp_block.activations + 2 * bf16_bytes(d) + fp8_bytes(2 * d) + bf16_bytes(d) + 4,
            moe_blocks: mtp_block.moe_blocks,
        };

        ModelShape {
            layers: moe.iter().map(|&m| if m { moe_layer } else { dense }).collect(),
            moe,
            embedding,
            head,
            mtp: mtp_part,
            mtp_modules: modules as u32,
            tied_embedding: config.tie_word_embeddings,
            hidden: d,
            routed_experts: config.n_routed_experts,
            experts_per_token: config.num_experts_per_tok,
            n_group: config.n_group,
            topk_group: config.topk_group,
        }
    }

    /// The stage partition: contiguous layers balanced by forward FLOPs, the embedding on
    /// the first stage, the head and the MTP modules on the last.
    fn split(&self, stages: u32) -> StageSplit {
        let model = self;
        let costs: Vec<f64> = model.layers.iter().map(|l| l.flops).collect();
        let mut last_extra = model.head;
        for _ in 0..model.mtp_modules {
            last_extra += model.mtp;
        }
        let starts = partition(&costs, stages as usize, model.embedding.flops, last_extra.flops);
        let stages = stages as usize;
        let parts = (0..stages)
            .map(|s| {
                let mut part = Part::default();
                if s == 0 {
                    part += model.embedding;
                }
                for layer in &model.layers[starts[s]..starts[s + 1]] {
                    part += *layer;
                }
                if s + 1 == stages {
                    part += last_extra;
                }
                part
            })
            .collect();
        StageSplit { starts, parts }
    }

    /// Whether the last stage reads the embedding matrix: for the MTP modules' lookup of the
    /// next tokens, or as a tied head.
    fn last_stage_uses_embedding(&self) -> bool {
        self.mtp_modules > 0 || self.tied_embedding
    }
}

/// Splits `costs` into `stages` contiguous non-empty runs minimizing the largest run's
/// cost, the first run carrying `first` and the last `last`. Returns each run's start, then
/// `costs.len()`. Needs 1 ≤ `stages` ≤ `costs.len()`.
fn partition(costs: &[f64], stages: usize, first: f64, last: f64) -> Vec<usize> {
    let n = costs.len();
    let mut prefix = vec![0.0; n + 1];
    for (i, c) in costs.iter().enumerate() {
        prefix[i + 1] = prefix[i] + c;
    }
    if stages == 1 {
        return vec![0, n];
    }
    // best[s][j]: the least possible largest cost of stages 0..=s holding layers 0..j;
    // from[s][j]: where stage s starts in that split.
    let mut best = vec![vec![f64::INFINITY; n + 1]; stages - 1];
    let mut from = vec![vec![0usize; n + 1]; stages - 1];
    for j in 1..=n {
        best[0][j] = prefix[j] + first;
    }
    for s in 1..stages - 1 {
        for j in s + 1..=n {
            for i in s..j {
                let cost = best[s - 1][i].max(prefix[j] - prefix[i]);
                if cost < best[s][j] {
                    best[s][j] = cost;
                    from[s][j] = i;
                }
            }
        }
    }
    let (mut start, mut least) = (stages - 1, f64::INFINITY);
    for i in stages - 1..n {
        let cost = best[stages - 2][i].max(prefix[n] - prefix[i] + last);
        if cost < least {
            least = cost;
            start = i;
        }
    }
    let mut starts = vec![0; stages + 1];
    starts[stages] = n;
    starts[stages - 1] = start;
    for s in (1..stages - 1).rev() {
        starts[s] = from[s][starts[s + 1]];
    }
    starts
}

/// `ln C(n, k)`, 0 ≤ k ≤ n.
fn ln_choose(n: u64, k: u64) -> f64 {
    let k = k.min(n - k);
    (0..k).map(|i| ((n - i) as f64 / (i + 1) as f64).ln()).sum()
}

/// Routing of one token under the uniform model: `chosen` of `groups` routing groups of
/// `group_size` experts, then `picks` experts among the chosen groups' experts.
struct Routing {
    groups: u64,
    group_size: u64,
    chosen: u64,
    picks: u64,
}

impl Routing {
    /// The probability that at least one of a token's experts is among experts
    /// `first..first + count`.
    fn hit(&self, first: u64, count: u64) -> f64 {
        let Routing { groups, group_size, chosen, picks } = *self;
        let (mut whole, mut partial) = (0u64, Vec::new());
        for g in first / group_size..=(first + count - 1) / group_size {
            let overlap = (first + count).min((g + 1) * group_size) - first.max(g * group_size);
            if overlap == group_size {
                whole += 1;
            } else {
                partial.push(overlap);
            }
        }
        let touched = whole + partial.len() as u64;
        let pool = chosen * group_size;
        let ln_all = ln_choose(groups, chosen);
        let mut probability = 0.0;
        for j in 0..=whole {
            for subset in 0..1u32 << partial.len() {
                let mine: u64 = j + subset.count_ones() as u64;
                if mine > chosen || chosen - mine > groups - touched {
                    continue;
                }
                // These exact groups of ours are chosen, the rest from the other groups.
                let ways = (ln_choose(whole, j) + ln_choose(groups - touched, chosen - mine) - ln_all).exp();
                let eligible = j * group_size
                    + partial
                        .iter()
                        .enumerate()
                        .filter(|(b, _)| subset & (1 << b) != 0)
                        .map(|(_, o)| o)
                        .sum::<u64>();
                // P(none of the picks among our eligible experts) = C(pool − eligible, picks) / C(pool, picks).
                let miss = if pool - eligible < picks {
                    0.0
                } else {
                    (0..picks).map(|i| (pool - eligible - i) as f64 / (pool - i) as f64).product()
                };
                probability += ways * (1.0 - miss);
            }
        }
        probability
    }
}

struct Planner<'a> {
    model: &'a ModelShape,
    cluster: &'a ClusterSpec,
    shape: &'a TrainingShape,
}

/// A layout that passed the checks, with what the later steps derive from it.
struct Geometry {
    layout: ParallelLayout,
    /// Tokens of one micro-batch.
    tokens: u64,
    /// Routed experts of each MoE layer on one GPU.
    experts_per_gpu: u64,
    /// Nodes one EP group spans (1 when it fits inside a node).
    ep_nodes: u64,
    /// GPUs of one EP group on each of its nodes.
    ep_gpus_per_node: u64,
}

/// The stages in forward order: where each starts in the layer list (then the number of
/// layers), and what each holds.
struct StageSplit {
    starts: Vec<usize>,
    parts: Vec<Part>,
}

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

/// One chunk of a stage, forward, seconds.
#[derive(Clone, Copy, Debug, Default)]
struct ChunkTime {
    compute: f64,
    all_to_all: f64,
}

impl ChunkTime {
    /// F + B when run alone, the order of "slowest".
    fn alone(&self) -> f64 {
        3.0 * self.compute + 2.0 * self.all_to_all
    }
}

impl Planner<'_> {
    fn plan(&self, pp: u32, ep: u32) -> Result<Plan, PlanError> {
        let geometry = self.layout(pp, ep)?;
        let l = &geometry.layout;
        let schedule =
            compile(&ScheduleSpec { kind: l.schedule, pp: l.stages, micro_batches: l.micro_batches })?;
        let split = self.split(l.stages);
        let uses = self.rank_uses(&geometry, &schedule, &split)?;
        let mut hosts = vec![Vec::new(); l.stages as usize];
        for (rank, used) in uses.iter().enumerate() {
            for &s in &used.stages {
                hosts[s as usize].push(rank as u32);
            }
        }
        let mut ranks = self.memory(&geometry, &split, &uses, &hosts);
        let (fullest_rank, memory) = fullest(&ranks)?;

        let experts = self.experts(&geometry, hosts_per_stage(&hosts) * l.expert_dp);
        let mut all_to_all = self.all_to_all(&geometry, &experts);
        let times: Vec<ChunkTime> = split
            .parts
            .iter()
            .map(|p| ChunkTime {
                compute: p.flops * geometry.tokens as f64 / self.cluster.gpu_flops,
                all_to_all: p.moe_blocks as f64 * all_to_all.seconds_per_moe_layer,
            })
            .collect();
        let slowest = (0..times.len())
            .max_by(|&a, &b| times[a].alone().total_cmp(&times[b].alone()).then(b.cmp(&a)))
            .unwrap_or(0);
        all_to_all.moe_blocks_per_chunk = split.parts[slowest].moe_blocks;
        all_to_all.per_chunk = all_to_all.per_moe_layer.scaled(all_to_all.moe_blocks_per_chunk as f64);
        let step = self.step(&geometry, &schedule, &times, slowest, &mut ranks)?;

        Ok(Plan {
            cluster: *self.cluster,
            stages: self.stage_plans(&geometry, &split, &hosts, &times),
            layout: geometry.layout,
            ranks,
            experts,
            fullest_rank,
            memory,
            all_to_all,
            step,
        })
    }

    /// The layout checks: degrees, divisibility into ranks, stages and EP groups, node
    /// alignment, routing groups, and the batch each pipeline runs.
    fn layout(&self, pp: u32, ep: u32) -> Result<Geometry, PlanError> {
        let (model, cluster, shape) = (self.model, self.cluster, self.shape);
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
        let stages = match shape.schedule {
            ScheduleKind::DualPipeV => 2 * pp as u64,
            _ => pp as u64,
        };
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

    /// The stage partition ([`ModelShape::split`]).
    fn split(&self, stages: u32) -> StageSplit {
        self.model.split(stages)
    }

    /// Each rank's stages and peak activations, from its instruction stream.
    fn rank_uses(
        &self,
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
        Ok(rank_uses(schedule, &split.parts, g.tokens))
    }

    /// The ZeRO-1 groups: each stage's replicated parameters and expert shards on the ranks
    /// hosting it, and the embedding on every rank that holds a copy.
    fn parameter_sets(&self, g: &Geometry, split: &StageSplit, hosts: &[Vec<u32>]) -> Vec<ParameterSet> {
        let model = self.model;
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
    fn memory(
        &self,
        g: &Geometry,
        split: &StageSplit,
        uses: &[RankUse],
        hosts: &[Vec<u32>],
    ) -> Vec<RankPlan> {
        let (l, cluster) = (&g.layout, self.cluster);
        let sets = self.parameter_sets(g, split, hosts);
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
                    optimizer = optimizer
                        .saturating_add(OPTIMIZER_BYTES.saturating_mul(set.parameters).div_ceil(group));
                    let bandwidth =
                        if spans { cluster.inter_node_bandwidth } else { cluster.intra_node_bandwidth };
                    // Ring reduce-scatter of the gradients and all-gather of the weights.
                    sync +=
                        (WEIGHT_BYTES + GRADIENT_BYTES) as f64 * set.parameters as f64 * (group - 1) as f64
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
                    embedding_copy: self.model.last_stage_uses_embedding()
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

    /// The expert-parallel all-to-all volumes of one GPU; the per-chunk figures are left
    /// for the step estimate, which knows the slowest stage.
    fn all_to_all(&self, g: &Geometry, experts: &ExpertPlacement) -> AllToAll {
        let d = self.model.hidden;
        let k = self.model.experts_per_token as u64;
        let dispatch_bytes = fp8_bytes(d) + k * 8;
        let combine_bytes = bf16_bytes(d);
        let (ep_nodes, ep_gpus) = (g.ep_nodes as f64, g.ep_gpus_per_node as f64);
        let inter_copies = experts.expected_nodes_per_token * (ep_nodes - 1.0) / ep_nodes;
        let intra_copies = experts.expected_gpus_per_token * (ep_gpus - 1.0) / ep_gpus;
        let t = g.tokens as f64;
        let per_layer = Volume {
            dispatch_intra_node: t * intra_copies * dispatch_bytes as f64,
            dispatch_inter_node: t * inter_copies * dispatch_bytes as f64,
            combine_intra_node: t * intra_copies * combine_bytes as f64,
            combine_inter_node: t * inter_copies * combine_bytes as f64,
        };
        AllToAll {
            tokens_per_micro_batch: g.tokens,
            dispatch_bytes_per_token: dispatch_bytes,
            combine_bytes_per_token: combine_bytes,
            inter_node_copies_per_token: inter_copies,
            intra_node_copies_per_token: intra_copies,
            per_moe_layer: per_layer,
            moe_blocks_per_chunk: 0,
            per_chunk: Volume::default(),
            seconds_per_moe_layer: per_layer.seconds(self.cluster),
        }
    }

    /// Simulates the schedule with every instruction at its own stages' costs and reads the
    /// step off the bottleneck rank; records each rank's busy time.
    fn step(
        &self,
        g: &Geometry,
        schedule: &Schedule,
        times: &[ChunkTime],
        slowest: usize,
        ranks: &mut [RankPlan],
    ) -> Result<StepEstimate, PlanError> {
        let (l, cluster) = (&g.layout, self.cluster);
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
        let latency = g.tokens as f64 * bf16_bytes(self.model.hidden) as f64 / p2p_bandwidth;
        let timeline = simulate_with(schedule, duration, latency)?;
        for (rank, busy) in ranks.iter_mut().zip(&timeline.busy) {
            rank.busy_seconds = *busy;
        }
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
        let data_parallel_sync = ranks.iter().map(|r| r.data_parallel_sync_seconds).fold(0.0, f64::max);
        let step_seconds = timeline.makespan + data_parallel_sync;
        Ok(StepEstimate {
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
        })
    }

    fn stage_plans(
        &self,
        g: &Geometry,
        split: &StageSplit,
        hosts: &[Vec<u32>],
        times: &[ChunkTime],
    ) -> Vec<StagePlan> {
        let model = self.model;
        let stages = split.parts.len();
        (0..stages)
            .map(|s| {
                let span = split.starts[s]..split.starts[s + 1];
                let moe_layers = model.moe[span.clone()].iter().filter(|m| **m).count() as u32;
                let part = &split.parts[s];
                let last = s + 1 == stages;
                StagePlan {
                    stage: s as u32,
                    first_layer: span.start as u32,
                    layers: span.len() as u32,
                    dense_layers: span.len() as u32 - moe_layers,
                    moe_layers,
                    embedding: s == 0,
                    head: last,
                    mtp_modules: if last { model.mtp_modules } else { 0 },
                    ranks: hosts[s].clone(),
                    forward_flops_per_token: part.flops,
                    replicated_parameters: part.replicated,
                    expert_parameters_per_gpu: part.routed / g.layout.ep as u64,
                    activation_bytes: part.activations * g.tokens,
                    forward_compute_seconds: times[s].compute,
                    forward_all_to_all_seconds: times[s].all_to_all,
                }
            })
            .collect()
    }

    fn experts(&self, g: &Geometry, expert_replicas: u64) -> ExpertPlacement {
        let (ep, experts_per_gpu, ep_nodes, ep_gpus_per_node) =
            (g.layout.ep as u64, g.experts_per_gpu, g.ep_nodes, g.ep_gpus_per_node);
        let model = self.model;
        let experts = model.routed_experts as u64;
        let per_node = experts_per_gpu * ep_gpus_per_node;
        let groups = model.n_group.max(1) as u64;
        let group_size = (experts / groups).max(1);
        let (expected_nodes, expected_gpus) = if experts == 0 {
            (0.0, 0.0)
        } else {
            let routing = Routing {
                groups,
                group_size,
                chosen: model.topk_group as u64,
                picks: model.experts_per_token as u64,
            };
            (
                (0..ep_nodes).map(|n| routing.hit(n * per_node, per_node)).sum(),
                (0..ep).map(|g| routing.hit(g * experts_per_gpu, experts_per_gpu)).sum(),
            )
        };
        let nodes = (0..ep_nodes)
            .filter(|_| experts > 0)
            .map(|n| {
                let (first, last) = (n * per_node, (n + 1) * per_node - 1);
                NodeExperts {
                    node: n as u32,
                    first_expert: first as u32,
                    last_expert: last as u32,
                    first_group: (first / group_size) as u32,
                    last_group: (last / group_size) as u32,
                }
            })
            .collect();
        ExpertPlacement {
            routed_experts: experts as u32,
            experts_per_gpu: experts_per_gpu as u32,
            ep_nodes: ep_nodes as u32,
            ep_gpus_per_node: ep_gpus_per_node as u32,
            routing_groups: model.n_group as u32,
            groups_per_node: (per_node / group_size).max(1) as u32,
            topk_group: model.topk_group as u32,
            expert_replicas,
            max_nodes_per_token: (model.topk_group as u64).min(ep_nodes) as u32,
            expected_nodes_per_token: expected_nodes,
            expected_gpus_per_token: expected_gpus,
            nodes,
        }
    }
}

/// The rank whose GPUs need the most memory (ties: the lowest), or why it does not fit.
fn fullest(ranks: &[RankPlan]) -> Result<(u32, MemoryBreakdown), PlanError> {
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

/// Ranks hosting each stage (the same for every stage under the compiled schedules).
fn hosts_per_stage(hosts: &[Vec<u32>]) -> u64 {
    hosts.iter().map(Vec::len).max().unwrap_or(1) as u64
}

/// Which GPUs and nodes make up the data-parallel groups.
struct GpuLayout {
    dp: u64,
    ep: u64,
    gpus_per_node: u64,
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
    fn replicated_group_spans(&self, ranks: &[u32]) -> bool {
        self.spans(ranks, 0, self.dp - 1)
    }

    /// Whether the copies of one expert (EP rank 0 of every EP group of the hosting ranks)
    /// span more than one node.
    fn expert_group_spans(&self, ranks: &[u32]) -> bool {
        self.spans(ranks, 0, (self.dp / self.ep - 1) * self.ep)
    }
}

/// What one pipeline rank holds, from its instruction stream.
struct RankUse {
    stages: Vec<u32>,
    peak_bytes: u64,
    peak_chunks: u32,
}

/// Walks each rank's stream as the validator does: a chunk's activations are held from its
/// forward until its full backward or its deferred W.
fn rank_uses(schedule: &Schedule, parts: &[Part], tokens: u64) -> Vec<RankUse> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_balances_and_keeps_order() {
        let starts = partition(&[1.0; 8], 4, 0.0, 0.0);
        assert_eq!(starts, vec![0, 2, 4, 6, 8]);
        // A heavy last stage takes fewer layers.
        let starts = partition(&[1.0; 8], 3, 0.0, 2.0);
        assert_eq!(starts[3], 8);
        assert!(starts[3] - starts[2] < starts[1] - starts[0], "{starts:?}");
    }

    #[test]
    fn split_layers_covers_the_model_in_order() {
        let config = flotilla_model::Preset::DeepseekV3_671b.config();
        let stages = split_layers(&config, 4096, 16).unwrap();
        assert_eq!(stages.len(), 16);
        let mut next = 0;
        for s in &stages {
            assert_eq!(s.first_layer, next);
            assert!(s.layers >= 1);
            next += s.layers;
        }
        assert_eq!(next as usize, config.num_hidden_layers);
        // The first stage's 3 dense layers are cheap: it takes more layers than the last,
        // which carries the head and the MTP module.
        assert!(stages[0].layers > stages[15].layers, "{stages:?}");
        assert_eq!(split_layers(&config, 4096, 0), Err(PlanError::ZeroDegree { name: "pp" }));
        assert!(matches!(split_layers(&config, 4096, 62), Err(PlanError::TooManyStages { .. })));
        assert_eq!(split_layers(&config, 4096, 61).unwrap().iter().map(|s| s.layers).max(), Some(1));
    }

    #[test]
    fn uniform_routing_probabilities_add_up() {
        // One group per node, 4 of 8 groups chosen, 8 of their 128 experts.
        let routing = Routing { groups: 8, group_size: 32, chosen: 4, picks: 8 };
        let nodes: f64 = (0..8).map(|n| routing.hit(n * 32, 32)).sum();
        assert!(nodes > 3.0 && nodes < 4.0, "{nodes}");
        // A unit holding every expert is always hit; expected experts sum to K.
        assert!((routing.hit(0, 256) - 1.0).abs() < 1e-12);
        let one: f64 = (0..256).map(|e| routing.hit(e, 1)).sum();
        assert!((one - 8.0).abs() < 1e-9, "{one}");
        // Units straddling group boundaries.
        let straddling: f64 = (0..256 / 3).map(|u| routing.hit(u * 3, 3)).sum::<f64>() + routing.hit(255, 1);
        assert!(straddling <= 8.0 && straddling > 1.0, "{straddling}");
    }
}
