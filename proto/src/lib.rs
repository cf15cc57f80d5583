//! The `flotilla.v1` wire protocol: gRPC services and messages shared by the coordinator,
//! the workers and clients (dashboards, the CLI).
//!
//! Responsibility: the `.proto` files under `proto/` and the tonic/prost code generated
//! from them at build time with a pure-Rust parser (no system `protoc`).
//!
//! This crate holds no code yet: the services arrive with the control plane. It exists so
//! that the workspace has its final shape and dependents can name it.
