//! The expert-parallel all-to-all: the bytes one GPU dispatches and combines per MoE layer
//! and micro-batch, by link ([`AllToAll`], [`Volume`]), and how long they take.
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
//! Invariant: the volumes are one GPU's, per MoE layer and micro-batch, forward; backward
//! moves the same volumes.

use super::experts::ExpertPlacement;
use super::layout::Geometry;
use super::shape::{ModelShape, bf16_bytes, fp8_bytes};
use super::spec::ClusterSpec;
use serde::Serialize;

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
    pub(super) fn scaled(self, by: f64) -> Volume {
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

/// The expert-parallel all-to-all volumes of one GPU; the per-chunk figures are left
/// for the step estimate, which knows the slowest stage.
pub(super) fn all_to_all(
    model: &ModelShape,
    cluster: &ClusterSpec,
    g: &Geometry,
    experts: &ExpertPlacement,
) -> AllToAll {
    let d = model.hidden;
    let k = model.experts_per_token as u64;
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
        seconds_per_moe_layer: per_layer.seconds(cluster),
    }
}
