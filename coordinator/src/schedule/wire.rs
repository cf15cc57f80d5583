//! The wire form of instruction streams: [`Instruction`] to the proto `ScheduledOp`
//! (`From`) and back (`TryFrom`, which reads only the fields the op's kind uses and refuses
//! an unknown or unspecified kind), so `Instruction → ScheduledOp → Instruction` is the
//! identity. A transfer's `peer` is a pipeline rank, as in the [`Schedule`](super::Schedule).

use flotilla_proto::v1::{ExecutedOp, ScheduledOp, scheduled_op};
use thiserror::Error;

use super::{Chunk, Instruction};

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

impl TryFrom<&ExecutedOp> for Instruction {
    type Error = InvalidOp;

    fn try_from(executed: &ExecutedOp) -> Result<Instruction, InvalidOp> {
        executed.op.ok_or(InvalidOp::Missing).and_then(Instruction::try_from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{ScheduleKind, ScheduleSpec, compile};

    #[test]
    fn instructions_round_trip_through_the_wire_form() {
        for kind in ScheduleKind::ALL {
            let schedule = compile(&ScheduleSpec { kind, pp: 4, micro_batches: 8 }).unwrap();
            for stream in &schedule.ranks {
                for &instruction in stream {
                    let op = ScheduledOp::from(instruction);
                    assert_eq!(Instruction::try_from(op), Ok(instruction), "{kind}: {instruction}");
                    let back = ScheduledOp::from(Instruction::try_from(op).unwrap());
                    assert_eq!(back, op);
                }
            }
        }
        let fb =
            Instruction::OverlappedForwardBackward { forward: Chunk::new(3, 1), backward: Chunk::new(1, 2) };
        let op = ScheduledOp::from(fb);
        assert_eq!((op.micro_batch, op.stage, op.backward_micro_batch, op.backward_stage), (3, 1, 1, 2));
        let send = ScheduledOp::from(Instruction::SendGrad { chunk: Chunk::new(2, 1), peer: 7 });
        assert_eq!(send.kind(), scheduled_op::Kind::SendGrad);
        assert_eq!(send.peer, 7);
        // Fields the kind does not use are ignored.
        let noisy = ScheduledOp {
            peer: 9,
            backward_stage: 4,
            ..ScheduledOp::from(Instruction::Forward { chunk: Chunk::new(1, 0) })
        };
        assert_eq!(Instruction::try_from(noisy), Ok(Instruction::Forward { chunk: Chunk::new(1, 0) }));
        assert_eq!(Instruction::try_from(ScheduledOp { kind: 42, ..noisy }), Err(InvalidOp::UnknownKind(42)));
        assert_eq!(Instruction::try_from(ScheduledOp::default()), Err(InvalidOp::Unspecified));
        assert_eq!(Instruction::try_from(&ExecutedOp::default()), Err(InvalidOp::Missing));
    }
}
