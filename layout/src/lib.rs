//! flotilla's one schedule-and-layout vocabulary, shared by the coordinator (which compiles
//! and places) and the worker (which obeys): the schedule kinds, the instructions of a
//! rank's stream and their wire codec, where a world rank sits in a layout, the typed
//! `[parallel]` table, and the rules that tie them together.
//!
//! - [`ScheduleKind`] (`kind`): the schedules by their config names (`dualpipe`,
//!   `dualpipev`, `1f1b`, `zb1p`), and as the proto enum `flotilla.v1.ScheduleKind`.
//! - [`Chunk`] and [`Instruction`] (`instruction`): one step of a rank's stream, and its
//!   proto form `ScheduledOp` (`From` one way, `TryFrom` the other, refusing with
//!   [`InvalidOp`]).
//! - [`Coordinates`] (`coordinates`): world rank `g` ↔ (pipeline rank, EP rank, DP replica).
//! - [`ParallelConfig`] (`parallel`): the `[parallel]` table, parsed once (serde, the same
//!   code wherever a run's TOML is read), checked with errors that name the key, and its
//!   proto form `Layout`.
//!
//! # The rules
//! - Pipeline ranks for `pp` stages: `pp`, except DualPipeV: `pp / 2`
//!   ([`ScheduleKind::ranks_for`]). DualPipe and DualPipeV need an even `pp ≥ 2`
//!   ([`ScheduleKind::check_stages`]).
//! - The pipeline ranks hosting stage `s` ([`ScheduleKind::hosts`]): DualPipe, ranks `s`
//!   and `PP−1−s`; DualPipeV, rank `min(s, PP−1−s)`; 1F1B and ZB1P, rank `s`. The stages a
//!   rank hosts ([`ScheduleKind::stages_of`]) are the inverse.
//! - World size: pipeline ranks × ep × dp ([`ParallelConfig::world_size`]).
//! - A step's global batch is split into ep × dp pipelines × micro-batches of equal size
//!   ([`ParallelConfig::check_batch`]).
//!
//! Invariant: pure. No I/O, no runtime, no tensors: plain data and functions over counts.
//! This is the only home of these rules; the coordinator and the worker call them.

mod coordinates;
mod instruction;
mod kind;
mod parallel;

pub use coordinates::{Coordinates, coordinates, world_rank};
pub use instruction::{Chunk, Instruction, InvalidOp};
pub use kind::{ScheduleKind, ScheduleKindError, StagesError};
pub use parallel::{ParallelConfig, ParallelError, RawParallel, RawValue};
