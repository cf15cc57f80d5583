//! Golden check of the DualPipe and DualPipeV generators against DeepSeek's reference
//! (deepseek-ai/DualPipe, `dualpipe.py` and `dualpipev.py`): on every rank, the compute ops
//! of our stream, in order, are the ones the reference's `step()` runs.
//!
//! The fixture `fixtures/dualpipe_reference.json` is written by `tools/dualpipe_reference.py`,
//! which runs the reference's real `step()` per rank with its compute and communication
//! primitives replaced by recorders (see the script for how to rerun it; the committed
//! fixture comes from the reference at commit 3da1bbea53606543d7f5f232338fc58096db30e3).
//! It holds, per case, the reference's rank count N, micro-batch count C and, per rank, the
//! ops in flotilla's numbering: F, B (input gradient, W deferred), BW (full backward), W
//! (the deferred weight gradient popped from the reference's FIFO), F&B (forward and full
//! backward overlapped). Our `pp` counts stages: N for DualPipe, 2N for DualPipeV.

use flotilla_coordinator::schedule::{Chunk, Instruction, ScheduleKind, ScheduleSpec, compile};
use serde::Deserialize;
use std::fmt;

const FIXTURE: &str = include_str!("fixtures/dualpipe_reference.json");

/// One micro-batch through one stage, as the fixture spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefChunk {
    mb: u32,
    stage: u32,
}

impl From<Chunk> for RefChunk {
    fn from(c: Chunk) -> Self {
        RefChunk { mb: c.micro_batch, stage: c.stage }
    }
}

impl fmt::Display for RefChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "(mb {}, stage {})", self.mb, self.stage)
    }
}

/// A compute op, as the fixture spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "op")]
enum RefOp {
    F {
        #[serde(flatten)]
        chunk: RefChunk,
    },
    B {
        #[serde(flatten)]
        chunk: RefChunk,
    },
    BW {
        #[serde(flatten)]
        chunk: RefChunk,
    },
    W {
        #[serde(flatten)]
        chunk: RefChunk,
    },
    #[serde(rename = "F&B")]
    FB { forward: RefChunk, backward: RefChunk },
}

impl RefOp {
    /// Our instruction in the fixture's form; `None` for a transfer.
    fn of(instruction: &Instruction) -> Option<RefOp> {
        Some(match *instruction {
            Instruction::Forward { chunk } => RefOp::F { chunk: chunk.into() },
            Instruction::BackwardInput { chunk } => RefOp::B { chunk: chunk.into() },
            Instruction::Backward { chunk } => RefOp::BW { chunk: chunk.into() },
            Instruction::BackwardWeight { chunk } => RefOp::W { chunk: chunk.into() },
            Instruction::OverlappedForwardBackward { forward, backward } => {
                RefOp::FB { forward: forward.into(), backward: backward.into() }
            }
            Instruction::SendActivation { .. }
            | Instruction::RecvActivation { .. }
            | Instruction::SendGrad { .. }
            | Instruction::RecvGrad { .. } => return None,
        })
    }
}

impl fmt::Display for RefOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefOp::F { chunk } => write!(f, "F {chunk}"),
            RefOp::B { chunk } => write!(f, "B {chunk}"),
            RefOp::BW { chunk } => write!(f, "BW {chunk}"),
            RefOp::W { chunk } => write!(f, "W {chunk}"),
            RefOp::FB { forward, backward } => write!(f, "F&B: F {forward} & BW {backward}"),
        }
    }
}

/// One schedule as the reference runs it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    kind: ScheduleKind,
    /// The reference's `num_ranks`.
    ranks: u32,
    micro_batches: u32,
    /// Per rank, its compute ops in order.
    streams: Vec<Vec<RefOp>>,
}

impl Case {
    fn name(&self) -> String {
        format!("{} with {} ranks, {} micro-batches", self.kind, self.ranks, self.micro_batches)
    }

    /// Our spec for the same schedule: `pp` counts stages.
    fn spec(&self) -> ScheduleSpec {
        let pp = match self.kind {
            ScheduleKind::DualPipe => self.ranks,
            ScheduleKind::DualPipeV => 2 * self.ranks,
            kind => panic!("the fixture has a {kind} case; it should only hold dualpipe and dualpipev"),
        };
        ScheduleSpec { kind: self.kind, pp, micro_batches: self.micro_batches }
    }
}

fn cases() -> Vec<Case> {
    serde_json::from_str(FIXTURE).expect("fixtures/dualpipe_reference.json does not parse")
}

/// `ops` around `index`, one per line, `>` marking `index`.
fn window(ops: &[RefOp], index: usize) -> String {
    let lo = index.saturating_sub(4);
    let hi = (index + 5).min(ops.len());
    let mut out = String::new();
    for (i, op) in ops.iter().enumerate().take(hi).skip(lo) {
        out += &format!("    {} {i:>3}: {op}\n", if i == index { '>' } else { ' ' });
    }
    if index >= ops.len() {
        out += &format!("    > {index:>3}: (end of stream, {} ops)\n", ops.len());
    }
    out
}

/// Where `ours` first differs from `reference`, with both around it; `None` if equal.
fn first_difference(ours: &[RefOp], reference: &[RefOp]) -> Option<String> {
    if ours == reference {
        return None;
    }
    let index = ours.iter().zip(reference).take_while(|(a, b)| a == b).count();
    Some(format!(
        "first difference at compute op {index} (ours has {} ops, the reference {})\n  ours:\n{}  reference:\n{}",
        ours.len(),
        reference.len(),
        window(ours, index),
        window(reference, index),
    ))
}

#[test]
fn the_fixture_covers_the_planned_cases() {
    let got: Vec<(ScheduleKind, u32, u32)> =
        cases().iter().map(|c| (c.kind, c.ranks, c.micro_batches)).collect();
    let mut want = Vec::new();
    for n in [2, 4, 6, 8] {
        want.extend([(ScheduleKind::DualPipe, n, 2 * n), (ScheduleKind::DualPipe, n, 2 * n + 4)]);
    }
    for n in [1, 2, 3, 4] {
        want.extend([(ScheduleKind::DualPipeV, n, 2 * n), (ScheduleKind::DualPipeV, n, 2 * n + 3)]);
    }
    assert_eq!(got, want);
    for case in cases() {
        assert_eq!(case.streams.len(), case.ranks as usize, "{}: one stream per rank", case.name());
        assert!(case.streams.iter().all(|s| !s.is_empty()), "{}: an empty stream", case.name());
    }
}

#[test]
fn compute_order_equals_the_reference_on_every_rank() {
    let mut failures = Vec::new();
    let mut compared = 0;
    for case in cases() {
        let schedule = compile(&case.spec()).unwrap_or_else(|e| panic!("{}: {e}", case.name()));
        if schedule.num_ranks() != case.ranks {
            failures.push(format!(
                "{}: we compile {} ranks, the reference runs {}",
                case.name(),
                schedule.num_ranks(),
                case.ranks
            ));
            continue;
        }
        for (rank, (stream, reference)) in schedule.ranks.iter().zip(&case.streams).enumerate() {
            let ours: Vec<RefOp> =
                stream.iter().filter(|i| i.is_compute()).map(|i| RefOp::of(i).unwrap()).collect();
            if let Some(diff) = first_difference(&ours, reference) {
                failures.push(format!("{}, rank {rank}: {diff}", case.name()));
            }
            compared += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {compared} rank streams differ from DeepSeek's reference:\n\n{}",
        failures.len(),
        failures.join("\n")
    );
}
