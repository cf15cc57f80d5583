//! The pipeline schedule compiler: DualPipe, DualPipeV, 1F1B and ZB1P compiled into one
//! instruction stream per pipeline rank, checked against each other, simulated and drawn.
//!
//! A [`Schedule`] is plain data: for each rank an ordered list of [`Instruction`]s that the
//! rank's worker executes in order. Compute instructions name a [`Chunk`] (one micro-batch
//! through one stage); transfers name the chunk that produced the tensor and the peer rank.
//!
//! Model of execution (the one the validator proves and the simulator times):
//! - a rank runs its instructions strictly in order;
//! - sends never block (the data plane buffers them); a receive blocks until the matching
//!   send has been issued. Messages are matched by (kind, micro-batch, producing stage), not
//!   by arrival order, so a link may carry them in any order;
//! - `Forward(m, s)` needs the activation of `(m, s−1)`: produced earlier on the same rank,
//!   or received from the rank that produced it; `BackwardInput`/`Backward(m, s)` need
//!   `Forward(m, s)` on this rank and the gradient of `(m, s+1)` the same way (the last
//!   stage starts from its loss); `BackwardWeight(m, s)` needs `BackwardInput(m, s)`.
//!
//! Stages are the layer groups of the model, numbered in forward order `0..num_stages`.
//! A rank may host several stages: DualPipe puts stages `r` and `PP−1−r` on rank `r` (the
//! two directions), DualPipeV stages `r` and `2N−1−r` on rank `r` of `N`.
//!
//! Streams travel to workers as proto `ScheduledOp`s (`wire`: `From<Instruction>` and
//! `TryFrom<ScheduledOp>`); what workers report they executed is measured (`measured`:
//! [`rank_span`], [`bubble_fraction`]) and drawn ([`executed_chrome_trace`]) with the
//! simulator's names and colors.
//!
//! Invariant: every [`Schedule`] returned by a generator passes [`validate`].

mod draw;
mod engine;
mod generate;
mod measured;
mod wire;

pub use draw::{Comparison, Outcome, Simulated, chrome_trace, compare, number, svg};
pub use engine::{Costs, Report, Span, Timeline, simulate, simulate_with, validate};
pub use generate::compile;
pub use measured::{RankSpan, bubble_fraction, executed_chrome_trace, predicted_bubble_fraction, rank_span};
pub use wire::InvalidOp;

use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// The most stages a schedule may have: far beyond any real pipeline (DeepSeek-V3 uses 16),
/// small enough that every index fits in `u32` arithmetic.
pub const MAX_STAGES: u32 = 4096;

/// The most (micro-batch, stage) chunks a schedule may have, so that compiling, validating
/// or drawing one stays within memory and seconds: PP 16 with 65,536 micro-batches.
pub const MAX_CHUNKS: u64 = 1 << 20;

/// The schedules flotilla compiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// One-forward-one-backward (PipeDream-flush / Megatron), fused backward.
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// Zero-bubble ZB-H1 (Qi et al. 2023): backward split into B and W, W deferred into the
    /// cool-down bubble, the same activation memory as 1F1B.
    Zb1p,
    /// DeepSeek-V3's bidirectional DualPipe: micro-batches enter from both ends, rank r
    /// hosts stages r and PP−1−r, forward and backward chunks overlap in pairs.
    DualPipe,
    /// DualPipe cut in half ("V" shape): PP stages on PP/2 ranks, rank r hosting stages r
    /// and PP−1−r; every micro-batch enters at rank 0 and ends there.
    DualPipeV,
}

impl ScheduleKind {
    /// All kinds, in the order tables print them.
    pub const ALL: [ScheduleKind; 4] =
        [ScheduleKind::OneFOneB, ScheduleKind::Zb1p, ScheduleKind::DualPipe, ScheduleKind::DualPipeV];

    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::OneFOneB => "1f1b",
            ScheduleKind::Zb1p => "zb1p",
            ScheduleKind::DualPipe => "dualpipe",
            ScheduleKind::DualPipeV => "dualpipev",
        }
    }

    /// The name people write: `1F1B`, `ZB1P`, `DualPipe`, `DualPipeV`.
    pub fn title(self) -> &'static str {
        match self {
            ScheduleKind::OneFOneB => "1F1B",
            ScheduleKind::Zb1p => "ZB1P",
            ScheduleKind::DualPipe => "DualPipe",
            ScheduleKind::DualPipeV => "DualPipeV",
        }
    }

    /// Pipeline ranks (devices) that run `pp` stages: PP/2 for DualPipeV, PP otherwise.
    pub fn ranks_for(self, pp: u32) -> u32 {
        match self {
            ScheduleKind::DualPipeV => pp / 2,
            _ => pp,
        }
    }
}

/// Table 2 of the DeepSeek-V3 report for one schedule: the bubble, the activation memory
/// and the parameter copies per rank it predicts.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PaperFigures {
    /// The bubble formula evaluated at the costs.
    pub bubble: f64,
    /// Peak activations per rank, in micro-batch × stage units.
    pub activations: u32,
    /// Parameters per rank, in stages' worth.
    pub parameter_copies: u32,
}

impl ScheduleKind {
    /// The report's Table 2 row for this schedule with `pp` stages: 1F1B (PP−1)(F+B);
    /// ZB1P (PP−1)(F+B−2W); DualPipe and DualPipeV (PP/2−1)(F&B+B−3W); activations PP, PP,
    /// PP+1; parameters 1×, 1×, 2×.
    ///
    /// The simulator equals these formulas wherever [`Costs::matches_table_2`] holds; for
    /// other costs the DualPipe formula is an estimate (it can even be negative) and the
    /// simulator gives the bubble of the actual op order. 1F1B's and ZB1P's hold for any
    /// costs without latency.
    pub fn paper_figures(self, pp: u32, costs: &Costs) -> PaperFigures {
        let p = pp as f64;
        let (f, b, w, fb) = (costs.forward, costs.backward, costs.weight, costs.overlapped);
        match self {
            ScheduleKind::OneFOneB => {
                PaperFigures { bubble: (p - 1.0) * (f + b), activations: pp, parameter_copies: 1 }
            }
            ScheduleKind::Zb1p => {
                PaperFigures { bubble: (p - 1.0) * (f + b - 2.0 * w), activations: pp, parameter_copies: 1 }
            }
            ScheduleKind::DualPipe | ScheduleKind::DualPipeV => PaperFigures {
                bubble: (p / 2.0 - 1.0) * (fb + b - 3.0 * w),
                activations: pp + 1,
                parameter_copies: 2,
            },
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ScheduleKind {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ScheduleKind::ALL.into_iter().find(|k| k.name() == s.to_ascii_lowercase()).ok_or_else(|| {
            ScheduleError::Spec(format!(
                "unknown schedule kind {s:?}: expected 1f1b, zb1p, dualpipe or dualpipev"
            ))
        })
    }
}

/// What to compile: the kind, the number of pipeline stages and of micro-batches per step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleSpec {
    /// The schedule.
    pub kind: ScheduleKind,
    /// Pipeline stages (layer groups). Ranks = stages, except DualPipeV: stages / 2.
    pub pp: u32,
    /// Micro-batches per training step.
    pub micro_batches: u32,
}

/// One micro-batch through one stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Chunk {
    /// Micro-batch index, `0..micro_batches`.
    pub micro_batch: u32,
    /// Stage index, `0..num_stages`, in forward order.
    pub stage: u32,
}

impl Chunk {
    /// The chunk `(micro_batch, stage)`.
    pub fn new(micro_batch: u32, stage: u32) -> Self {
        Chunk { micro_batch, stage }
    }
}

impl fmt::Display for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "(mb {}, stage {})", self.micro_batch, self.stage)
    }
}

/// One step of a rank's instruction stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Instruction {
    /// F: the forward pass of a chunk (the last stage's forward includes its loss).
    Forward { chunk: Chunk },
    /// B: the input gradient of a chunk; its weight gradient is deferred to a later
    /// `BackwardWeight`.
    BackwardInput { chunk: Chunk },
    /// W: the deferred weight gradient of a chunk whose `BackwardInput` ran earlier.
    BackwardWeight { chunk: Chunk },
    /// B+W fused: the full backward pass of a chunk.
    Backward { chunk: Chunk },
    /// A forward chunk and a full backward chunk run together so that one's communication
    /// hides behind the other's compute (DualPipe's F&B).
    OverlappedForwardBackward { forward: Chunk, backward: Chunk },
    /// Send the output activation of `chunk` to `peer` (which runs the next stage).
    SendActivation { chunk: Chunk, peer: u32 },
    /// Receive the output activation of `chunk` (the previous stage) from `peer`.
    RecvActivation { chunk: Chunk, peer: u32 },
    /// Send the input gradient computed by `chunk`'s backward to `peer` (the previous stage).
    SendGrad { chunk: Chunk, peer: u32 },
    /// Receive the input gradient computed by `chunk`'s backward (the next stage) from `peer`.
    RecvGrad { chunk: Chunk, peer: u32 },
}

impl Instruction {
    /// Whether the instruction computes (as opposed to moving a tensor).
    pub fn is_compute(&self) -> bool {
        !matches!(
            self,
            Instruction::SendActivation { .. }
                | Instruction::RecvActivation { .. }
                | Instruction::SendGrad { .. }
                | Instruction::RecvGrad { .. }
        )
    }

    /// A short label: `F`, `B`, `W`, `BW`, `F&B`, `sendA`, `recvA`, `sendG`, `recvG`.
    pub fn label(&self) -> &'static str {
        match self {
            Instruction::Forward { .. } => "F",
            Instruction::BackwardInput { .. } => "B",
            Instruction::BackwardWeight { .. } => "W",
            Instruction::Backward { .. } => "BW",
            Instruction::OverlappedForwardBackward { .. } => "F&B",
            Instruction::SendActivation { .. } => "sendA",
            Instruction::RecvActivation { .. } => "recvA",
            Instruction::SendGrad { .. } => "sendG",
            Instruction::RecvGrad { .. } => "recvG",
        }
    }
}

impl fmt::Display for Instruction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Instruction::Forward { chunk }
            | Instruction::BackwardInput { chunk }
            | Instruction::BackwardWeight { chunk }
            | Instruction::Backward { chunk } => write!(f, "{} {chunk}", self.label()),
            Instruction::OverlappedForwardBackward { forward, backward } => {
                write!(f, "F {forward} & BW {backward}")
            }
            Instruction::SendActivation { chunk, peer } | Instruction::SendGrad { chunk, peer } => {
                write!(f, "{} {chunk} to rank {peer}", self.label())
            }
            Instruction::RecvActivation { chunk, peer } | Instruction::RecvGrad { chunk, peer } => {
                write!(f, "{} {chunk} from rank {peer}", self.label())
            }
        }
    }
}

/// A compiled schedule: one instruction stream per pipeline rank.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// The generator that produced it (hand-made streams may name any kind).
    pub kind: ScheduleKind,
    /// Pipeline stages.
    pub num_stages: u32,
    /// Micro-batches per step.
    pub num_micro_batches: u32,
    /// `ranks[r]` is rank r's stream.
    pub ranks: Vec<Vec<Instruction>>,
}

impl Schedule {
    /// Pipeline ranks.
    pub fn num_ranks(&self) -> u32 {
        self.ranks.len() as u32
    }

    /// The direction a micro-batch travels in: 0 enters at rank 0 (every micro-batch of
    /// 1F1B, ZB1P and DualPipeV), 1 enters at the last rank (DualPipe's second half).
    pub fn direction(&self, micro_batch: u32) -> u32 {
        match self.kind {
            ScheduleKind::DualPipe if micro_batch >= self.num_micro_batches / 2 => 1,
            _ => 0,
        }
    }
}

/// Why a schedule could not be compiled, or why a stream is invalid.
#[derive(Debug, Error, PartialEq)]
pub enum ScheduleError {
    /// The requested kind, stage count or micro-batch count is not allowed.
    #[error("{0}")]
    Spec(String),
    /// An instruction breaks a rule of the execution model.
    #[error("rank {rank}, instruction {index} ({instruction}): {reason}")]
    Invalid { rank: u32, index: usize, instruction: String, reason: String },
    /// No rank can make progress.
    #[error("deadlock: every unfinished rank waits on a receive that no rank will send: {}", .blocked.join("; "))]
    Deadlock { blocked: Vec<String> },
    /// All streams ran to the end but work is missing.
    #[error("incomplete schedule: {0}")]
    Incomplete(String),
    /// Simulation costs that make no sense.
    #[error("invalid costs: {0}")]
    Costs(String),
}
