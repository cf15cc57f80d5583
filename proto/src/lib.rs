//! The `flotilla.v1` wire protocol: gRPC services and messages shared by the coordinator,
//! the workers and clients (dashboards, the CLI).
//!
//! - `CoordinatorService` (worker-facing): `Register`, then one bidirectional `Session`
//!   stream per worker: heartbeats, acknowledgements, step reports and errors up; assignment
//!   (with the data-plane rendezvous), steps to run, abort and shutdown down.
//! - `JobService` (client-facing): submit, get, list, cancel and a resumable `WatchJob`
//!   whose events carry monotonically increasing revisions.
//!
//! The code is generated at build time from `proto/flotilla/v1/*.proto` by protox (pure
//! Rust) and tonic-prost-build: building needs no system `protoc`. Their codec is `codec`'s:
//! prost's, with a request that does not decode answered `INVALID_ARGUMENT`.

pub mod codec;
pub mod listen;

/// The generated messages, clients (`*_client`) and servers (`*_server`).
// An `Assignment` dwarfs the other commands, but there is one per job and rank: boxing it
// would buy nothing.
#[allow(clippy::large_enum_variant)]
pub mod v1 {
    tonic::include_proto!("flotilla.v1");
}

/// The protocol version a worker and the coordinator must share; bump it on any change that
/// an older peer would misread.
pub const PROTOCOL_VERSION: u32 = 4;

/// The encoded `FileDescriptorSet` of `flotilla.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/flotilla_descriptor.bin"));

impl v1::JobState {
    /// Whether a job in this state will change no more.
    pub fn is_terminal(self) -> bool {
        matches!(self, v1::JobState::Succeeded | v1::JobState::Failed | v1::JobState::Cancelled)
    }

    /// The state's short lower-case name (`succeeded`), as the CLI prints it and `/metrics`
    /// labels it.
    pub fn name(self) -> &'static str {
        match self {
            v1::JobState::Unspecified => "unspecified",
            v1::JobState::Pending => "pending",
            v1::JobState::Rendezvous => "rendezvous",
            v1::JobState::Running => "running",
            v1::JobState::Recovering => "recovering",
            v1::JobState::Succeeded => "succeeded",
            v1::JobState::Failed => "failed",
            v1::JobState::Cancelled => "cancelled",
        }
    }
}

/// By hand, so that the data-plane secret never reaches a log: every field but
/// `data_plane_secret`, which shows only its length.
impl std::fmt::Debug for v1::Assignment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v1::Assignment {
            job_id,
            dp_rank,
            dp_size,
            peers,
            config_toml,
            output_dir,
            data_plane_session,
            pipeline,
            checkpoint_root,
            resume,
            epoch,
            data_plane_secret,
        } = self;
        f.debug_struct("Assignment")
            .field("job_id", job_id)
            .field("dp_rank", dp_rank)
            .field("dp_size", dp_size)
            .field("peers", peers)
            .field("config_toml", config_toml)
            .field("output_dir", output_dir)
            .field("data_plane_session", data_plane_session)
            .field("pipeline", pipeline)
            .field("checkpoint_root", checkpoint_root)
            .field("resume", resume)
            .field("epoch", epoch)
            .field("data_plane_secret", &format_args!("<redacted, {} bytes>", data_plane_secret.len()))
            .finish()
    }
}
