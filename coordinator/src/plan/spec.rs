//! What the planner is given besides the model: the cluster ([`ClusterSpec`]: its GPUs,
//! their memory, links and sustained FLOP/s) and the batch shape of a step
//! ([`TrainingShape`], with the schedule).
//!
//! Invariant: `check` accepts exactly the values every later step can compute with (no
//! zero counts, finite positive rates, a sequence the model's positions allow); the planner
//! checks both before it looks at a layout.

use super::error::PlanError;
use crate::schedule::ScheduleKind;
use flotilla_model::ModelConfig;
use serde::{Deserialize, Serialize};

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

    pub(super) fn check(&self) -> Result<(), PlanError> {
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
    pub(super) fn check(&self, config: &ModelConfig) -> Result<(), PlanError> {
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
