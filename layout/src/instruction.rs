//! One step of a rank's instruction stream, and its wire form: [`Instruction`] to the proto
//! `ScheduledOp` (`From`) and back (`TryFrom`, which reads only the fields the op's kind
//! uses and refuses an unknown or unspecified kind), so `Instruction → ScheduledOp →
//! Instruction` is the identity. A transfer's `peer` is a pipeline rank.

use std::fmt;

use flotilla_proto::v1::{ExecutedOp, ScheduledOp, scheduled_op};
use serde::{Deserialize, Serialize};
use thiserror::Error;

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
        self.transfer().is_none()
    }

    /// The chunks the instruction computes: one, two for `F&B`, none for a transfer.
    pub fn computed(&self) -> impl Iterator<Item = Chunk> {
        let (a, b) = match *self {
            Instruction::Forward { chunk }
            | Instruction::BackwardInput { chunk }
            | Instruction::BackwardWeight { chunk }
            | Instruction::Backward { chunk } => (Some(chunk), None),
            Instruction::OverlappedForwardBackward { forward, backward } => (Some(forward), Some(backward)),
            _ => (None, None),
        };
        a.into_iter().chain(b)
    }

    /// A transfer's chunk and peer (`None` for compute).
    pub fn transfer(&self) -> Option<(Chunk, u32)> {
        match *self {
            Instruction::SendActivation { chunk, peer }
            | Instruction::RecvActivation { chunk, peer }
            | Instruction::SendGrad { chunk, peer }
            | Instruction::RecvGrad { chunk, peer } => Some((chunk, peer)),
            _ => None,
        }
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

/// A `ScheduledOp` that names no [`Instruction`].
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum InvalidOp {
    #[error("kind {0} is not an instruction kind")]
    UnknownKind(i32),
    #[error("the kind is unspecified")]
    Unspecified,
    #[error("it names no op")]
    Missing,
}

impl From<Instruction> for ScheduledOp {
    fn from(instruction: Instruction) -> ScheduledOp {
        use scheduled_op::Kind;
        let op = |kind: Kind, chunk: Chunk| ScheduledOp {
            kind: kind as i32,
            micro_batch: chunk.micro_batch,
            stage: chunk.stage,
            ..ScheduledOp::default()
        };
        let transfer = |kind: Kind, chunk: Chunk, peer: u32| ScheduledOp { peer, ..op(kind, chunk) };
        match instruction {
            Instruction::Forward { chunk } => op(Kind::Forward, chunk),
            Instruction::BackwardInput { chunk } => op(Kind::BackwardInput, chunk),
            Instruction::BackwardWeight { chunk } => op(Kind::BackwardWeight, chunk),
            Instruction::Backward { chunk } => op(Kind::Backward, chunk),
            Instruction::OverlappedForwardBackward { forward, backward } => ScheduledOp {
                backward_micro_batch: backward.micro_batch,
                backward_stage: backward.stage,
                ..op(Kind::Overlapped, forward)
            },
            Instruction::SendActivation { chunk, peer } => transfer(Kind::SendActivation, chunk, peer),
            Instruction::RecvActivation { chunk, peer } => transfer(Kind::RecvActivation, chunk, peer),
            Instruction::SendGrad { chunk, peer } => transfer(Kind::SendGrad, chunk, peer),
            Instruction::RecvGrad { chunk, peer } => transfer(Kind::RecvGrad, chunk, peer),
        }
    }
}

impl TryFrom<ScheduledOp> for Instruction {
    type Error = InvalidOp;

    /// Reads the fields the op's kind uses and ignores the others.
    fn try_from(op: ScheduledOp) -> Result<Instruction, InvalidOp> {
        use scheduled_op::Kind;
        let kind = Kind::try_from(op.kind).map_err(|_| InvalidOp::UnknownKind(op.kind))?;
        let chunk = Chunk::new(op.micro_batch, op.stage);
        let peer = op.peer;
        Ok(match kind {
            Kind::Unspecified => return Err(InvalidOp::Unspecified),
            Kind::Forward => Instruction::Forward { chunk },
            Kind::BackwardInput => Instruction::BackwardInput { chunk },
            Kind::BackwardWeight => Instruction::BackwardWeight { chunk },
            Kind::Backward => Instruction::Backward { chunk },
            Kind::Overlapped => Instruction::OverlappedForwardBackward {
                forward: chunk,
                backward: Chunk::new(op.backward_micro_batch, op.backward_stage),
            },
            Kind::SendActivation => Instruction::SendActivation { chunk, peer },
            Kind::RecvActivation => Instruction::RecvActivation { chunk, peer },
            Kind::SendGrad => Instruction::SendGrad { chunk, peer },
            Kind::RecvGrad => Instruction::RecvGrad { chunk, peer },
        })
    }
}

impl TryFrom<&ScheduledOp> for Instruction {
    type Error = InvalidOp;

    fn try_from(op: &ScheduledOp) -> Result<Instruction, InvalidOp> {
        Instruction::try_from(*op)
    }
}

impl TryFrom<&ExecutedOp> for Instruction {
    type Error = InvalidOp;

    fn try_from(executed: &ExecutedOp) -> Result<Instruction, InvalidOp> {
        executed.op.ok_or(InvalidOp::Missing).and_then(Instruction::try_from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_kind() -> Vec<Instruction> {
        let (c, d) = (Chunk::new(3, 1), Chunk::new(1, 2));
        vec![
            Instruction::Forward { chunk: c },
            Instruction::BackwardInput { chunk: c },
            Instruction::BackwardWeight { chunk: c },
            Instruction::Backward { chunk: c },
            Instruction::OverlappedForwardBackward { forward: c, backward: d },
            Instruction::SendActivation { chunk: c, peer: 2 },
            Instruction::RecvActivation { chunk: c, peer: 0 },
            Instruction::SendGrad { chunk: d, peer: 7 },
            Instruction::RecvGrad { chunk: d, peer: 1 },
        ]
    }

    #[test]
    fn instructions_round_trip_through_the_wire_form() {
        for instruction in every_kind() {
            let op = ScheduledOp::from(instruction);
            assert_eq!(Instruction::try_from(op), Ok(instruction), "{instruction}");
            assert_eq!(Instruction::try_from(&op), Ok(instruction), "{instruction}");
            assert_eq!(ScheduledOp::from(Instruction::try_from(op).unwrap()), op);
        }
        let fb =
            Instruction::OverlappedForwardBackward { forward: Chunk::new(3, 1), backward: Chunk::new(1, 2) };
        let op = ScheduledOp::from(fb);
        assert_eq!((op.micro_batch, op.stage, op.backward_micro_batch, op.backward_stage), (3, 1, 1, 2));
        let send = ScheduledOp::from(Instruction::SendGrad { chunk: Chunk::new(2, 1), peer: 7 });
        assert_eq!(send.kind(), scheduled_op::Kind::SendGrad);
        assert_eq!(send.peer, 7);
    }

    #[test]
    fn the_codec_ignores_unused_fields_and_refuses_unknown_kinds() {
        let noisy = ScheduledOp {
            peer: 9,
            backward_stage: 4,
            ..ScheduledOp::from(Instruction::Forward { chunk: Chunk::new(1, 0) })
        };
        assert_eq!(Instruction::try_from(noisy), Ok(Instruction::Forward { chunk: Chunk::new(1, 0) }));
        assert_eq!(Instruction::try_from(ScheduledOp { kind: 42, ..noisy }), Err(InvalidOp::UnknownKind(42)));
        assert_eq!(Instruction::try_from(ScheduledOp::default()), Err(InvalidOp::Unspecified));
        assert_eq!(Instruction::try_from(&ExecutedOp::default()), Err(InvalidOp::Missing));
        assert_eq!(InvalidOp::UnknownKind(42).to_string(), "kind 42 is not an instruction kind");
    }

    #[test]
    fn computed_chunks_and_transfers_split_the_kinds() {
        for instruction in every_kind() {
            let computed: Vec<Chunk> = instruction.computed().collect();
            assert_eq!(instruction.is_compute(), !computed.is_empty(), "{instruction}");
            assert_eq!(instruction.transfer().is_some(), computed.is_empty(), "{instruction}");
        }
        let fb =
            Instruction::OverlappedForwardBackward { forward: Chunk::new(3, 1), backward: Chunk::new(1, 2) };
        assert_eq!(fb.computed().collect::<Vec<_>>(), vec![Chunk::new(3, 1), Chunk::new(1, 2)]);
        assert_eq!(fb.to_string(), "F (mb 3, stage 1) & BW (mb 1, stage 2)");
        let send = Instruction::SendActivation { chunk: Chunk::new(0, 0), peer: 1 };
        assert_eq!(send.transfer(), Some((Chunk::new(0, 0), 1)));
        assert_eq!(send.to_string(), "sendA (mb 0, stage 0) to rank 1");
    }
}
