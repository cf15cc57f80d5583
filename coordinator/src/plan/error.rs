//! Why the planner refuses a layout ([`PlanError`]), and the byte counts its messages
//! print ([`format_bytes`]).
//!
//! Invariant: every refusal names the value at fault and, where there is one, the limit it
//! broke, so that a user can fix the layout from the message alone.

use crate::schedule::{ScheduleError, ScheduleKind};
use flotilla_model::ConfigError;
use thiserror::Error;

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

/// [`format_bytes`] of a whole number of bytes.
fn size(bytes: u64) -> String {
    format_bytes(bytes as f64)
}

/// How far `needed` bytes exceed `capacity` (0 when they fit).
pub(super) fn overshoot(needed: u64, capacity: u64) -> u64 {
    needed.saturating_sub(capacity)
}
