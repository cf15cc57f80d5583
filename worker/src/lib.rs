//! The worker: its session with the coordinator, the model stages it hosts, the executor
//! of its pipeline instruction stream, and the data plane (point-to-point transfers,
//! all-to-all dispatch and combine, all-reduce) that glues compute in `flotilla-kernels` to
//! the other workers.
//!
//! This crate holds no code yet: it arrives with the model and the control plane.
