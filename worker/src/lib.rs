//! The worker: its session with the coordinator, the model stages it hosts, the executor
//! of its pipeline instruction stream, and the data plane (point-to-point transfers,
//! all-to-all dispatch and combine, all-reduce) that glues compute in `flotilla-kernels` to
//! the other workers.
//!
//! Today it holds:
//!
//! - [`comm`], the data plane: the [`comm::Communicator`] trait and its TCP implementation.
//! - [`dp`], data-parallel training over a communicator: each rank trains the whole model
//!   on its share of the global batch; gradients are averaged and step statistics (losses,
//!   token counts, expert loads) merged with deterministic all-reduces, so every rank takes
//!   the same optimizer step, bit for bit.
//! - [`agent`], the worker actor: registers with the coordinator over gRPC (retrying with
//!   backoff), holds the session (heartbeats, commands, step reports), runs assigned jobs
//!   with [`dp`] or [`pipeline`], writes their checkpoint shards in the background and
//!   resumes jobs from committed checkpoints, and reconnects when the coordinator goes
//!   away.
//! - [`pipeline`], pipeline- and expert-parallel training on one rank (the stages it
//!   hosts, the executor of its instruction stream, ZeRO-1, its checkpoint shard), and
//!   [`expert_exchange`], the MoE all-to-all over the data plane.

pub mod agent;
pub mod comm;
pub mod dp;
pub mod expert_exchange;
pub mod pipeline;
mod tags;
