//! The control plane: jobs and their state machine, worker membership and failure
//! detection, placement of pipeline stages and expert shards, the pipeline schedule
//! compiler (DualPipe, DualPipeV, 1F1B, ZB1P), checkpoint commits, recovery, and the state
//! store.
//!
//! API boundary: the coordinator never looks inside tensors; it deals in shapes, layouts,
//! schedules and reports.
//!
//! What exists today: [`schedule`], the schedule compiler, validator and simulator; and
//! [`plan`], the cluster planner that lays a model out over GPUs (stages, expert shards,
//! data parallelism) and estimates its memory, all-to-all traffic and step time; and
//! [`store`], the durable state store (revisioned keys, compare-and-swap, leases, resumable
//! watches) with its embedded crash-safe file-backed implementation; and [`service`], the
//! control plane over gRPC: the worker-facing `CoordinatorService` and client-facing
//! `JobService` (with health and reflection), on job, session and membership actors that
//! keep the jobs and their events in the store; and [`placement`], which lays a
//! pipeline/expert-parallel job out on its workers (world ranks, stages, the compiled
//! stream each rank is shipped and held to).

pub mod checkpoint;
pub mod eplb;
pub mod placement;
pub mod plan;
pub mod schedule;
pub mod service;
pub mod store;
