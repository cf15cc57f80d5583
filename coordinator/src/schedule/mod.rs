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
//! The vocabulary ([`ScheduleKind`], [`Chunk`], [`Instruction`] and its wire codec to the
//! proto `ScheduledOp`, [`InvalidOp`]) is `flotilla_layout`'s, which the workers share;
//! it is re-exported here. What workers report they executed is measured (`measured`:
//! [`rank_span`], [`bubble_fraction`]) and drawn ([`executed_chrome_trace`]) with the
//! simulator's names and colors.
//!
//! Invariant: every [`Schedule`] returned by a generator passes [`validate`].

mod draw;
mod engine;
mod generate;
mod measured;

pub use draw::{Comparison, Outcome, Simulated, chrome_trace, compare, number, svg};
pub use engine::{Costs, Report, Span, Timeline, simulate, simulate_with, validate};
pub use flotilla_layout::{Chunk, Instruction, InvalidOp, ScheduleKind, StagesError};
pub use generate::compile;
pub use measured::{RankSpan, bubble_fraction, executed_chrome_trace, predicted_bubble_fraction, rank_span};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The most stages a schedule may have: far beyond any real pipeline (DeepSeek-V3 uses 16),
/// small enough that every index fits in `u32` arithmetic.
pub const MAX_STAGES: u32 = 4096;

/// The most (micro-batch, stage) chunks a schedule may have, so that compiling, validating
/// or drawing one stays within memory and seconds: PP 16 with 65,536 micro-batches.
pub const MAX_CHUNKS: u64 = 1 << 20;

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

/// The report's Table 2 for a [`ScheduleKind`] (a trait, since the kind is
/// `flotilla_layout`'s and the costs are the simulator's).
pub trait PaperTable {
    /// The report's Table 2 row for this schedule with `pp` stages: 1F1B (PP−1)(F+B);
    /// ZB1P (PP−1)(F+B−2W); DualPipe and DualPipeV (PP/2−1)(F&B+B−3W); activations PP, PP,
    /// PP+1; parameters 1×, 1×, 2×.
    ///
    /// The simulator equals these formulas wherever [`Costs::matches_table_2`] holds; for
    /// other costs the DualPipe formula is an estimate (it can even be negative) and the
    /// simulator gives the bubble of the actual op order. 1F1B's and ZB1P's hold for any
    /// costs without latency.
    fn paper_figures(self, pp: u32, costs: &Costs) -> PaperFigures;
}

impl PaperTable for ScheduleKind {
    fn paper_figures(self, pp: u32, costs: &Costs) -> PaperFigures {
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

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::v1::ScheduledOp;

    #[test]
    fn compiled_streams_round_trip_through_the_wire_form() {
        for kind in ScheduleKind::ALL {
            let schedule = compile(&ScheduleSpec { kind, pp: 4, micro_batches: 8 }).unwrap();
            for stream in &schedule.ranks {
                for &instruction in stream {
                    let op = ScheduledOp::from(instruction);
                    assert_eq!(Instruction::try_from(op), Ok(instruction), "{kind}: {instruction}");
                }
            }
        }
    }
}
