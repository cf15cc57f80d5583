//! The worker actor: a worker process's life with the coordinator.
//!
//! [`run_worker`] (the CLI's entry) dials the coordinator's URL over TCP and runs its jobs
//! on the TCP data plane; [`run_worker_with`] takes the coordinator connection as a
//! [`Connector`] instead (any tonic `Channel` maker: an in-process duplex stream, a
//! simulated network) and the jobs' data plane as a [`DataPlane`] ([`TcpDataPlane`], or
//! another communicator's), so tests and benchmarks drive this very agent against a real
//! coordinator without a socket, and a new transport runs the same agent.
//!
//! The agent's parts, one file each: `connect` (the [`Connector`], registration and its
//! backoff, what the worker says about itself), `data_plane` (the [`DataPlane`] trait and
//! [`TcpDataPlane`], the listener kept between jobs and the address registered for it), `session` (the session actor: heartbeats and
//! commands), `plan` (an assignment checked into a job plan), `job` (the job task:
//! trainer, rendezvous, steps), `checkpoint` (restoring a resume and writing shards in the
//! background), `report` (the messages sent: acknowledgements, step reports, errors, and
//! rank 0's `metrics.jsonl`), `error` ([`JobError`]: every failure reported, typed by the
//! proto's `FailureKind`).
//!
//! [`run_worker`] binds the data-plane listener (so its address can be registered; a
//! non-loopback one only as [`check_data_plane_listen`] allows), then loops until shut
//! down:
//!
//! 1. **Dial and register.** Connect to the coordinator and call `Register` with this
//!    worker's host, cores, devices, data-plane address, protocol version, node, local rank
//!    and pid. Connection failures and transient refusals (the coordinator not up yet, an
//!    id still held by this worker's previous session) are retried with exponential
//!    backoff and jitter, capped at [`WorkerOptions::max_backoff`]; a protocol version
//!    mismatch or an invalid request is fatal ([`AgentError::Refused`]).
//! 2. **Hold the session.** Open the bidirectional `Session` stream, `SessionOpen` first,
//!    then heartbeat at the interval the `Registration` gave while executing commands:
//!    - `Assignment`: parse and check the run TOML (a bad one is refused at once with an
//!      `Ack` naming the field, plus a `WorkerError`, both of kind `FAILURE_KIND_ASSIGNMENT`;
//!      so is a `resume` past the run's `steps`), then start the job on its own task, which builds the trainer, restores
//!      the checkpoint in `resume` if there is one (below), rendezvouses the data plane
//!      with the peers' addresses under the assignment's `data_plane_session` and
//!      `data_plane_secret` (which every connection proves it holds; the secret is never
//!      logged), with the job's frame bounds (`DataPlaneLimits::for_job`), and only then
//!      acknowledges.
//!    - **Resume.** `Assignment.resume` names a committed checkpoint: its directory, its
//!      step and every shard with its size and CRC-32. The job opens them all
//!      ([`flotilla_model::shard::CheckpointReader`], which checks sizes and checksums
//!      and assembles tensors by their global names, so any layout reads what any other
//!      wrote), checks the model and the seed, and loads what this rank holds
//!      (`Trainer::restore`, [`PipelineTrainer::restore`]); the steps then continue at
//!      `resume.step + 1` (at `resume.step = steps` only the final save is left). A
//!      checkpoint that cannot be loaded refuses the assignment: the `Ack`'s `error`
//!      names the directory and the shard or tensor, its `kind` is
//!      `FAILURE_KIND_CHECKPOINT` and `bad_checkpoint` the directory (the coordinator then
//!      falls back to the checkpoint before it), plus a `WorkerError` of the same kind. Rank 0 keeps the records of steps up to `resume.step` in
//!      `metrics.jsonl` (a torn last line and the lost steps' records are dropped) and
//!      appends after them.
//!    - `RunSteps`: handed to the job, which acknowledges, runs the steps with
//!      [`crate::dp::data_parallel_step_timed`] (or [`PipelineTrainer::run_step`]) and
//!      reports each in a `StepReport`; rank 0 appends each step's record to
//!      `output_dir/metrics.jsonl` (the format of `flotilla train`) and, after the run's
//!      last step, saves the weights there; then every rank sends `JobFinished`.
//!    - **Checkpoints.** With `Assignment.checkpoint_root` set, after every step `s` that
//!      the run's `[checkpoint]` table makes due, the job copies this rank's shard of the
//!      state (`Trainer::snapshot(rank, world)`, [`PipelineTrainer::snapshot`]: the
//!      ZeRO-1 parts' values and moments, named by global tensor names) on its blocking
//!      section, and hands the copy to a `checkpoint-writer` thread, which writes it to
//!      `checkpoint_root/step-{s:08}/` (temporary file, fsync, rename, fsync of the
//!      directory) and reports a `CheckpointShard` with the file's name, size and CRC-32
//!      and the seconds of the copy and of the write. Training goes on meanwhile: only
//!      the copy is on the step's critical path. At most one write is in flight per job;
//!      a step whose checkpoint is due first waits for the previous write (normally done
//!      long before; the wait is then part of that step). A failed write is reported in
//!      the `CheckpointShard`'s `error` and does not fail the job (the coordinator just
//!      does not commit that checkpoint).
//!    - `Abort`: aborts the job's communicator at once (so a collective waiting on this
//!      rank, here or at a peer, returns), stops the job, and acknowledges once it stopped.
//!    - `Shutdown`: acknowledges, stops any job, closes the session and returns `Ok`.
//! 3. **Lose the session** (the stream breaks or ends, the coordinator stops reading): any
//!    running job is aborted locally (the coordinator resumes it from its last committed
//!    checkpoint, with a new assignment) and the worker goes back to step 1 and registers
//!    again, with the same data-plane address.
//!
//! # Invariants
//!
//! - **Actors, not locks.** The session loop owns the session's state (the job handle,
//!   pending acknowledgements, the heartbeat counter); the job task owns the trainer and
//!   the communicator. They talk through channels; no lock is held across an await.
//! - **Every task is owned.** The job task's handle lives in the session; every path out
//!   of a session (shutdown, loss, abort) cancels the job, aborts its communicator and
//!   awaits the task before going on. The gRPC connection's own tasks end with the channel.
//!   The job task owns its checkpoint writer thread and joins it on every way out of the
//!   job (finished, aborted, failed), so a rank's last `CheckpointShard` always precedes
//!   its `JobFinished` or `WorkerError`, and no write outlives its job.
//! - **A checkpoint shard is reported once durable,** never before: the coordinator may
//!   commit the checkpoint on it. A resume restores all of a rank's state or none of it.
//! - **Heartbeats keep flowing during a step.** Training runs on the job task, whose compute
//!   sits in `block_in_place` (see [`crate::dp`]), so the session loop stays responsive.
//!   That needs tokio's multi-threaded runtime; `run_worker` refuses the current-thread one.
//! - **Nothing the coordinator sends can panic the worker.** Malformed commands (no body,
//!   ranks out of range, an unparsable config, steps out of order) are refused with an
//!   `Ack` carrying the reason.
//! - **Every failure reported has a kind.** A refusing `Ack` and every `WorkerError` carry
//!   the [`JobError`]'s `FailureKind` beside its text; an accepting `Ack` has none.
//! - **One job at a time.** A second assignment while a job runs is refused; abort first.
//! - **The data-plane address is stable** for the worker's life when the listener can be
//!   bound again on the same port after a job (it can, unless another process took the
//!   port; then the worker binds a fresh port and registers again).
//!
//! Steps are 1-based as in `metrics.jsonl`: `RunSteps { first_step, count }` runs steps
//! `first_step .. first_step + count`, and `first_step` must be the trainer's next step
//! (after a resume, `resume.step + 1`).

mod checkpoint;
mod connect;
mod data_plane;
mod error;
mod job;
mod plan;
mod report;
mod session;

use std::path::PathBuf;
use std::time::Duration;

use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use connect::{Connector, CoordinatorTls, InProcessIncoming, WorkerToken};
pub use data_plane::{AbortFn, DataPlane, Rendezvous, TcpDataPlane};
pub use error::JobError;

use std::sync::Arc;

use crate::comm::CommError;
use connect::{Backoff, RegisterError, endpoint, register};
use data_plane::Listening;
use flotilla_proto::listen::Listen;
use session::{Session, SessionEnd};

/// How a worker finds the coordinator and presents itself.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The coordinator's URL (`http://host:port` or `https://host:port`; a bare
    /// `host:port` means `https://` with `tls`, `http://` without).
    pub coordinator: String,
    /// TLS to the coordinator (used by [`run_worker`]'s endpoint; a [`Connector`] passed
    /// to [`run_worker_with`] brings its own transport); `None`: plaintext.
    pub tls: Option<CoordinatorTls>,
    /// The `worker` token sent with every call, whatever the connector.
    pub token: Option<WorkerToken>,
    /// The id to ask for; `None` lets the coordinator choose one at every registration.
    pub worker_id: Option<String>,
    /// The node this worker runs on; `None` means the host name.
    pub node_id: Option<String>,
    /// This worker's index on its node.
    pub local_rank: u32,
    /// Where the data plane listens (`127.0.0.1:0` by default: loopback, any free port).
    pub data_plane_listen: String,
    /// Accept a data plane listening beyond loopback although the connection to the
    /// coordinator, over which the data-plane secret arrives, is plaintext (`--insecure`;
    /// warned about at every start). See [`check_data_plane_listen`].
    pub insecure: bool,
    /// The data-plane address to register when it differs from the bound one (a listener
    /// on `0.0.0.0` is reached through a routable address); `None` registers the bound one.
    pub data_plane_advertise: Option<String>,
    /// Compute threads, overriding the run config's `threads`; `None` keeps the config's.
    pub threads: Option<usize>,
    /// The first delay between attempts to reach the coordinator.
    pub initial_backoff: Duration,
    /// The largest delay between attempts; the delay doubles up to it.
    pub max_backoff: Duration,
    /// How long one TCP connection attempt to the coordinator may take.
    pub connect_timeout: Duration,
    /// How long the data-plane rendezvous of an assignment may take.
    pub rendezvous_timeout: Duration,
    /// Where relative paths in run configs (text data) start.
    pub config_base: PathBuf,
    /// The memory this worker's model state may take (weights, gradients, optimizer
    /// shard); `None`: the machine's available memory. An assignment that needs more is
    /// refused. Reported at registration as the CPU device's memory (else the machine's
    /// total), which the coordinator places jobs by.
    pub memory_bytes: Option<u64>,
    /// The directories an assignment's paths must lie under (relative ones are relative to
    /// the working directory, the default); an assignment naming a path outside them is
    /// refused before anything is opened.
    pub allowed_roots: Vec<PathBuf>,
}

impl WorkerOptions {
    /// Defaults for everything but the coordinator: loopback data plane on a free port,
    /// backoff from 100 ms to 5 s, 5 s connection timeout, 60 s rendezvous.
    pub fn new(coordinator: impl Into<String>) -> Self {
        WorkerOptions {
            coordinator: coordinator.into(),
            tls: None,
            token: None,
            worker_id: None,
            node_id: None,
            local_rank: 0,
            data_plane_listen: "127.0.0.1:0".into(),
            insecure: false,
            data_plane_advertise: None,
            threads: None,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            rendezvous_timeout: Duration::from_secs(60),
            config_base: PathBuf::from("."),
            memory_bytes: None,
            allowed_roots: vec![PathBuf::from(".")],
        }
    }
}

/// Why [`run_worker`] gave up. Everything else (an unreachable coordinator, a broken
/// session, a failed job) is retried or reported to the coordinator instead.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The options cannot work.
    #[error("invalid worker option `{option}`: {reason}")]
    InvalidOption {
        /// The option's name.
        option: &'static str,
        /// Why.
        reason: String,
    },
    /// The data-plane listener could not be bound.
    #[error("data plane: {0}")]
    DataPlane(#[from] CommError),
    /// The listening rule refused the data-plane address ([`check_data_plane_listen`]).
    #[error(
        "refusing to listen for the data plane on {addr} (`data_plane_listen`, --data-plane-listen): it is \
         not a loopback address and {missing}, over which this job's data-plane secret would travel in \
         clear; reach the coordinator over TLS (--tls-ca), listen on loopback, or accept this with --insecure"
    )]
    DataPlaneListenRefused { addr: std::net::SocketAddr, missing: &'static str },
    /// The coordinator refused this worker for a reason retrying cannot fix.
    #[error("the coordinator refused this worker: {0}")]
    Refused(String),
    /// Called outside tokio's multi-threaded runtime.
    #[error(
        "run_worker needs tokio's multi-threaded runtime: training blocks its thread while \
         heartbeats must keep flowing"
    )]
    Runtime,
}

/// Room in the queue of messages to the coordinator. A full queue means the coordinator
/// stopped reading this stream: the session is treated as lost.
const OUTBOUND_CAPACITY: usize = 1024;
/// Queued `RunSteps` per job beyond which more are refused.
const JOB_COMMAND_CAPACITY: usize = 64;
/// Heartbeat interval when the registration gives none.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
/// The shortest heartbeat interval obeyed, whatever the registration says.
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);
/// HTTP/2 pings notice a coordinator that vanished without closing the connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `Register` and opening the session may take before the attempt is retried.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a worker that was told to shut down waits for the coordinator to close the
/// stream, so that its last acknowledgement is delivered rather than reset.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Runs a worker until `shutdown` is cancelled or the coordinator sends `Shutdown` (see the
/// module documentation). Returns an error only for what retrying cannot fix.
pub async fn run_worker(options: WorkerOptions, shutdown: CancellationToken) -> Result<(), AgentError> {
    check_runtime()?;
    let coordinator = Connector::endpoint(endpoint(&options)?);
    run_worker_with(options, coordinator, TcpDataPlane, shutdown).await
}

/// [`run_worker`] with the coordinator reached through `coordinator` rather than by dialing
/// `options.coordinator` (which then only names the coordinator in logs), and every job's
/// data plane made by `data_plane` ([`TcpDataPlane`] is `run_worker`'s). Every
/// registration attempt asks the connector for a new channel, so a connector that fails
/// or whose channel breaks is retried with the same backoff as an unreachable URL.
pub async fn run_worker_with<D: DataPlane>(
    options: WorkerOptions,
    coordinator: Connector,
    data_plane: D,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    check_runtime()?;
    if options.initial_backoff.is_zero() || options.initial_backoff > options.max_backoff {
        return Err(AgentError::InvalidOption {
            option: "initial_backoff",
            reason: format!(
                "must be positive and at most max_backoff ({:?}), got {:?}",
                options.max_backoff, options.initial_backoff
            ),
        });
    }
    if options.threads == Some(0) {
        return Err(AgentError::InvalidOption { option: "threads", reason: "must be at least 1".into() });
    }
    let mut plane = Listening::bind(Arc::new(data_plane), &options).await?;
    check_data_plane_listen(&plane.bound, coordinator.is_confidential(), options.insecure)?;
    let mut backoff = Backoff::new(options.initial_backoff, options.max_backoff);
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            attempt = register(&coordinator, &options, &mut plane) => attempt,
        };
        match attempt {
            Ok((client, registration)) => {
                backoff.reset();
                info!(
                    worker_id = %registration.worker_id,
                    coordinator = %options.coordinator,
                    data_plane = %plane.advertised,
                    "registered"
                );
                let session = Session::new(&options, registration, &mut plane, shutdown.clone());
                match session.run(client).await {
                    SessionEnd::Shutdown => return Ok(()),
                    SessionEnd::Lost(reason) => warn!(%reason, "session lost; registering again"),
                }
            }
            Err(RegisterError::Fatal(reason)) => return Err(AgentError::Refused(reason)),
            Err(RegisterError::Retry(reason)) => debug!(%reason, "coordinator not reachable yet"),
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = sleep(delay) => {}
        }
    }
}

/// The data plane's listening rule (the one of `flotilla_proto::listen`, which the
/// coordinator's port obeys too). Every data-plane connection must prove it holds the
/// rendezvous's secret, so a listener beyond loopback admits nobody else, provided the
/// secret cannot be read on its way here: a non-loopback `bound` address needs a
/// confidential connection to the coordinator (TLS, or in process), unless `insecure`,
/// which is warned about. An address that is not an IP socket address (another
/// [`DataPlane`]'s form) is the data plane's own business.
pub fn check_data_plane_listen(bound: &str, confidential: bool, insecure: bool) -> Result<(), AgentError> {
    let Ok(addr) = bound.parse::<std::net::SocketAddr>() else { return Ok(()) };
    let missing = (!confidential).then_some("the connection to the coordinator is plaintext");
    match flotilla_proto::listen::check_listen(addr, missing, insecure) {
        Listen::Allowed => Ok(()),
        Listen::Insecure { missing } => {
            warn!(
                %addr,
                "--insecure: the data plane listens while {missing}; whoever reads that connection \
                 can join this worker's jobs on the data plane"
            );
            Ok(())
        }
        Listen::Refused { missing } => Err(AgentError::DataPlaneListenRefused { addr, missing }),
    }
}

/// Training blocks its thread while heartbeats must keep flowing: only tokio's
/// multi-threaded runtime can do both.
fn check_runtime() -> Result<(), AgentError> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => Ok(()),
        _ => Err(AgentError::Runtime),
    }
}
