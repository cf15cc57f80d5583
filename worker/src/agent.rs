//! The worker actor: a worker process's life with the coordinator.
//!
//! [`run_worker`] binds the data-plane listener (so its address can be registered), then
//! loops until shut down:
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
//!      `Ack` naming the field, plus a `WorkerError`; so is a `resume` past the run's
//!      `steps`), then start the job on its own task, which builds the trainer, restores
//!      the checkpoint in `resume` if there is one (below), rendezvouses the data plane
//!      with the peers' addresses under the assignment's `data_plane_session`, and only
//!      then acknowledges.
//!    - **Resume.** `Assignment.resume` names a committed checkpoint: its directory, its
//!      step and every shard with its size and CRC-32. The job opens them all
//!      ([`flotilla_model::shard::CheckpointReader`], which checks sizes and checksums
//!      and assembles tensors by their global names, so any layout reads what any other
//!      wrote), checks the model and the seed, and loads what this rank holds
//!      (`Trainer::restore`, [`PipelineTrainer::restore`]); the steps then continue at
//!      `resume.step + 1` (at `resume.step = steps` only the final save is left). A
//!      checkpoint that cannot be loaded refuses the assignment: the `Ack`'s `error`
//!      names the directory and the shard or tensor, and `bad_checkpoint` the directory
//!      (the coordinator then falls back to the checkpoint before it), plus a
//!      `WorkerError`. Rank 0 keeps the records of steps up to `resume.step` in
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
//! - **One job at a time.** A second assignment while a job runs is refused; abort first.
//! - **The data-plane address is stable** for the worker's life when the listener can be
//!   bound again on the same port after a job (it can, unless another process took the
//!   port; then the worker binds a fresh port and registers again).
//!
//! Steps are 1-based as in `metrics.jsonl`: `RunSteps { first_step, count }` runs steps
//! `first_step .. first_step + count`, and `first_step` must be the trainer's next step
//! (after a resume, `resume.step + 1`).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_model::checkpoint::WeightDtype;
use flotilla_model::config::ModelConfig;
use flotilla_model::shard::{self, CheckpointReader, Snapshot, step_dir, write_shard};
use flotilla_model::train::{StepRecord, TrainConfig, Trainer};
use flotilla_proto::PROTOCOL_VERSION;
use flotilla_proto::v1::coordinator_message::Body as Command;
use flotilla_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use flotilla_proto::v1::worker_message::Body as Report;
use flotilla_proto::v1::{
    Abort, Ack, Assignment, CheckpointShard, CoordinatorMessage, Device, Heartbeat, JobFinished, LayerLoad,
    Registration, ResumeFrom, RunSteps, SessionOpen, StepReport, WorkerError as WorkerErrorMsg, WorkerInfo,
    WorkerMessage,
};
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinHandle};
use tokio::time::{Instant, MissedTickBehavior, sleep, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};
use tracing::{debug, info, warn};

use crate::comm::{AbortHandle, CommError, Communicator, TcpCommunicator, TcpOptions, TcpRendezvous};
use crate::dp::{self, TimedStep};
use crate::pipeline::{PipelinePlan, PipelineStep, PipelineTrainer};

/// The file whose presence in a checkpoint's directory is its commit (the coordinator's
/// `checkpoint::MANIFEST_FILE`; the worker does not depend on the coordinator crate).
const COMMITTED_MANIFEST: &str = "manifest.json";

/// How a worker finds the coordinator and presents itself.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The coordinator's URL (`http://host:port`; a bare `host:port` means `http://`).
    pub coordinator: String,
    /// The id to ask for; `None` lets the coordinator choose one at every registration.
    pub worker_id: Option<String>,
    /// The node this worker runs on; `None` means the host name.
    pub node_id: Option<String>,
    /// This worker's index on its node.
    pub local_rank: u32,
    /// Where the data plane listens (`127.0.0.1:0` by default: loopback, any free port).
    pub data_plane_listen: String,
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
    /// refused.
    pub memory_bytes: Option<u64>,
}

impl WorkerOptions {
    /// Defaults for everything but the coordinator: loopback data plane on a free port,
    /// backoff from 100 ms to 5 s, 5 s connection timeout, 60 s rendezvous.
    pub fn new(coordinator: impl Into<String>) -> Self {
        WorkerOptions {
            coordinator: coordinator.into(),
            worker_id: None,
            node_id: None,
            local_rank: 0,
            data_plane_listen: "127.0.0.1:0".into(),
            data_plane_advertise: None,
            threads: None,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            rendezvous_timeout: Duration::from_secs(60),
            config_base: PathBuf::from("."),
            memory_bytes: None,
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
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {}
        _ => return Err(AgentError::Runtime),
    }
    let endpoint = endpoint(&options)?;
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
    let mut plane = DataPlane::bind(&options).await?;
    let mut backoff = Backoff::new(options.initial_backoff, options.max_backoff);
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            attempt = register(&endpoint, &options, &mut plane) => attempt,
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

fn endpoint(options: &WorkerOptions) -> Result<Endpoint, AgentError> {
    let url = if options.coordinator.contains("://") {
        options.coordinator.clone()
    } else {
        format!("http://{}", options.coordinator)
    };
    let endpoint = Endpoint::from_shared(url)
        .map_err(|e| AgentError::InvalidOption { option: "coordinator", reason: e.to_string() })?;
    Ok(endpoint
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// Exponential backoff with "equal jitter": each delay is drawn from `[d/2, d]` where `d`
/// doubles from `initial` up to `max`, so that many workers restarted together do not dial
/// in lockstep.
struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    hasher: RandomState,
    draws: u64,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max, current: initial, hasher: RandomState::new(), draws: 0 }
    }

    fn reset(&mut self) {
        self.current = self.initial;
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (d * 2).min(self.max);
        // Randomness without a dependency: std's randomly keyed hasher over a counter.
        self.draws += 1;
        let mut h = self.hasher.build_hasher();
        h.write_u64(self.draws);
        let unit = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
        d / 2 + d.mul_f64(unit / 2.0)
    }
}

/// The data-plane listener between jobs, and the address registered for it.
struct DataPlane {
    listener: Option<TcpRendezvous>,
    bound: SocketAddr,
    advertised: String,
}

impl DataPlane {
    async fn bind(options: &WorkerOptions) -> Result<Self, CommError> {
        let listener = TcpCommunicator::bind(options.data_plane_listen.as_str()).await?;
        let bound = listener.local_addr();
        let advertised = options.data_plane_advertise.clone().unwrap_or_else(|| bound.to_string());
        Ok(DataPlane { listener: Some(listener), bound, advertised })
    }

    /// Binds the registered address again if a job consumed the listener.
    async fn rebind(&mut self) -> Result<(), CommError> {
        if self.listener.is_none() {
            self.listener = Some(TcpCommunicator::bind(self.bound).await?);
        }
        Ok(())
    }

    /// Before registering: the same address if possible, otherwise a fresh one (which is
    /// then what gets registered).
    async fn ensure(&mut self, options: &WorkerOptions) -> Result<(), CommError> {
        if let Err(err) = self.rebind().await {
            warn!(address = %self.bound, %err, "data-plane address lost; binding a new one");
            *self = DataPlane::bind(options).await?;
        }
        Ok(())
    }
}

enum RegisterError {
    /// Retrying cannot help.
    Fatal(String),
    /// Try again after the backoff.
    Retry(String),
}

async fn register(
    endpoint: &Endpoint,
    options: &WorkerOptions,
    plane: &mut DataPlane,
) -> Result<(CoordinatorServiceClient<Channel>, Registration), RegisterError> {
    plane.ensure(options).await.map_err(|e| RegisterError::Retry(format!("data plane: {e}")))?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| RegisterError::Retry(format!("connecting to {}: {e}", options.coordinator)))?;
    let mut client = CoordinatorServiceClient::new(channel);
    let info = worker_info(options, &plane.advertised);
    let registered = timeout(RPC_TIMEOUT, client.register(info))
        .await
        .map_err(|_| RegisterError::Retry(format!("Register took over {RPC_TIMEOUT:?}")))?;
    let registration = match registered {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let reason = format!("Register: {}: {}", status.code(), status.message());
            return Err(match status.code() {
                Code::FailedPrecondition
                | Code::InvalidArgument
                | Code::PermissionDenied
                | Code::Unauthenticated => RegisterError::Fatal(reason),
                _ => RegisterError::Retry(reason),
            });
        }
    };
    if registration.protocol_version != PROTOCOL_VERSION {
        return Err(RegisterError::Fatal(format!(
            "the coordinator speaks protocol version {}, this worker {PROTOCOL_VERSION}",
            registration.protocol_version
        )));
    }
    if registration.session_id.is_empty() || registration.worker_id.is_empty() {
        return Err(RegisterError::Retry("the registration has no worker or session id".into()));
    }
    Ok((client, registration))
}

fn worker_info(options: &WorkerOptions, data_plane_address: &str) -> WorkerInfo {
    let host = host_name();
    WorkerInfo {
        worker_id: options.worker_id.clone().unwrap_or_default(),
        node_id: options.node_id.clone().unwrap_or_else(|| host.clone()),
        host,
        cores: std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX)),
        devices: vec![Device {
            kind: "cpu".into(),
            index: 0,
            name: "cpu".into(),
            memory_bytes: memory_bytes(),
        }],
        data_plane_address: data_plane_address.to_string(),
        protocol_version: PROTOCOL_VERSION,
        local_rank: options.local_rank,
        pid: std::process::id(),
    }
}

/// The kernel's host name, else `$HOSTNAME`, else "localhost".
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".into())
}

/// Physical memory from `/proc/meminfo` (0 where unknown).
fn memory_bytes() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else { return 0 };
    text.lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib.saturating_mul(1024))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn message(body: Report) -> WorkerMessage {
    WorkerMessage { body: Some(body) }
}

fn ack(command_id: u64, error: impl Into<String>) -> WorkerMessage {
    message(Report::Ack(Ack { command_id, error: error.into(), bad_checkpoint: String::new() }))
}

/// Refuses an assignment because the checkpoint in `dir` cannot be loaded.
fn ack_bad_checkpoint(command_id: u64, error: impl Into<String>, dir: impl Into<String>) -> WorkerMessage {
    message(Report::Ack(Ack { command_id, error: error.into(), bad_checkpoint: dir.into() }))
}

fn worker_error(job_id: &str, step: u64, text: impl Into<String>) -> WorkerMessage {
    message(Report::Error(WorkerErrorMsg { job_id: job_id.to_string(), step, message: text.into() }))
}

/// How a session ended.
enum SessionEnd {
    /// Told to stop (by the coordinator or the caller).
    Shutdown,
    /// The stream broke or ended; register again.
    Lost(String),
}

/// What a job task tells its session.
enum JobEvent {
    /// Forward to the coordinator.
    Send(WorkerMessage),
    /// The data plane is up; the session aborts it on `Abort` or when the session ends.
    DataPlane(AbortHandle),
}

/// The session's handle on its job task.
struct RunningJob {
    job_id: String,
    commands: mpsc::Sender<(u64, RunSteps)>,
    cancel: CancellationToken,
    abort: Option<AbortHandle>,
    /// The job sent its last word (`JobFinished`, or the `WorkerError` of a failed job):
    /// its task is ending and owns nothing more.
    finished: bool,
    task: JoinHandle<()>,
}

impl RunningJob {
    /// Makes the job stop as soon as it can: its communicator fails every pending and
    /// later collective at once (here and, through the abort frames, at the peers).
    fn stop(&self, reason: &str) {
        self.cancel.cancel();
        if let Some(abort) = &self.abort {
            abort.abort(reason);
        }
    }
}

/// One registration's session: the actor that owns the stream, the heartbeat and the job.
struct Session<'a> {
    options: &'a WorkerOptions,
    registration: Registration,
    plane: &'a mut DataPlane,
    shutdown: CancellationToken,
    outbound: Option<mpsc::Sender<WorkerMessage>>,
    events_tx: mpsc::UnboundedSender<JobEvent>,
    events: mpsc::UnboundedReceiver<JobEvent>,
    job: Option<RunningJob>,
    /// `Abort` commands to acknowledge once the job has stopped.
    abort_acks: Vec<u64>,
    heartbeats: u64,
}

/// What the session loop does after a command.
enum Flow {
    Continue,
    End(SessionEnd),
}

impl<'a> Session<'a> {
    fn new(
        options: &'a WorkerOptions,
        registration: Registration,
        plane: &'a mut DataPlane,
        shutdown: CancellationToken,
    ) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        Session {
            options,
            registration,
            plane,
            shutdown,
            outbound: None,
            events_tx,
            events,
            job: None,
            abort_acks: Vec::new(),
            heartbeats: 0,
        }
    }

    async fn run(mut self, mut client: CoordinatorServiceClient<Channel>) -> SessionEnd {
        let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        let open = SessionOpen {
            worker_id: self.registration.worker_id.clone(),
            session_id: self.registration.session_id.clone(),
        };
        // The queue is new and empty: the first message always fits.
        if tx.try_send(message(Report::Open(open))).is_err() {
            return SessionEnd::Lost("the session queue refused its first message".into());
        }
        self.outbound = Some(tx);
        let opened = tokio::select! {
            _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
            opened = timeout(RPC_TIMEOUT, client.session(ReceiverStream::new(rx))) => opened,
        };
        let mut inbound = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                return SessionEnd::Lost(format!("opening the session: {}", describe(&status)));
            }
            Err(_) => return SessionEnd::Lost(format!("opening the session took over {RPC_TIMEOUT:?}")),
        };
        let end = self.serve(&mut inbound).await;
        self.stop_job("the worker's session ended").await;
        if matches!(end, SessionEnd::Shutdown) {
            // Half-close our side and give the coordinator a moment to close its own, so
            // that the last acknowledgement is delivered rather than reset.
            self.outbound = None;
            let _ = timeout(CLOSE_LINGER, async { while let Ok(Some(_)) = inbound.message().await {} }).await;
        }
        end
    }

    async fn serve(&mut self, inbound: &mut Streaming<CoordinatorMessage>) -> SessionEnd {
        let period = match self.registration.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => Duration::from_millis(ms).max(MIN_HEARTBEAT),
        };
        let mut heartbeat = tokio::time::interval_at(Instant::now(), period);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let flow = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => Flow::End(SessionEnd::Shutdown),
                Some(event) = self.events.recv() => self.on_event(event),
                done = join(&mut self.job) => self.on_job_done(done).await,
                // Before commands, so that a flood of them cannot starve the heartbeat.
                _ = heartbeat.tick() => self.heartbeat(),
                command = inbound.message() => match command {
                    Ok(Some(command)) => self.on_command(command).await,
                    Ok(None) => Flow::End(SessionEnd::Lost("the coordinator closed the session".into())),
                    Err(status) => Flow::End(SessionEnd::Lost(describe(&status))),
                },
            };
            if let Flow::End(end) = flow {
                return end;
            }
        }
    }

    /// Queues a message for the coordinator; a closed or full queue ends the session.
    fn send(&self, msg: WorkerMessage) -> Flow {
        let Some(outbound) = &self.outbound else {
            return Flow::End(SessionEnd::Lost("the session is closed".into()));
        };
        match outbound.try_send(msg) {
            Ok(()) => Flow::Continue,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Flow::End(SessionEnd::Lost("the session stream closed".into()))
            }
            Err(mpsc::error::TrySendError::Full(_)) => Flow::End(SessionEnd::Lost(format!(
                "the coordinator stopped reading ({OUTBOUND_CAPACITY} messages queued)"
            ))),
        }
    }

    fn heartbeat(&mut self) -> Flow {
        self.heartbeats += 1;
        let beat = Heartbeat { sequence: self.heartbeats, sent_unix_ms: unix_ms() };
        self.send(message(Report::Heartbeat(beat)))
    }

    fn on_event(&mut self, event: JobEvent) -> Flow {
        match event {
            JobEvent::Send(msg) => {
                if let (Some(Report::Finished(_) | Report::Error(_)), Some(job)) = (&msg.body, &mut self.job)
                {
                    job.finished = true;
                }
                self.send(msg)
            }
            JobEvent::DataPlane(handle) => {
                if let Some(job) = &mut self.job {
                    // An abort that raced the rendezvous reaches the new communicator too.
                    if job.cancel.is_cancelled() {
                        handle.abort("job aborted");
                    }
                    job.abort = Some(handle);
                }
                Flow::Continue
            }
        }
    }

    async fn on_job_done(&mut self, done: Result<(), JoinError>) -> Flow {
        let finished = self.job.take();
        // Events the task sent before ending come before what its end means.
        while let Ok(event) = self.events.try_recv() {
            if let Flow::End(end) = self.on_event(event) {
                return Flow::End(end);
            }
        }
        if let (Err(err), Some(job)) = (done, &finished)
            && let Flow::End(end) =
                self.send(worker_error(&job.job_id, 0, format!("the job task failed: {err}")))
        {
            return Flow::End(end);
        }
        for id in std::mem::take(&mut self.abort_acks) {
            if let Flow::End(end) = self.send(ack(id, "")) {
                return Flow::End(end);
            }
        }
        match self.plane.rebind().await {
            Ok(()) => Flow::Continue,
            // Peers know this worker by its registered address: register a new one.
            Err(err) => {
                Flow::End(SessionEnd::Lost(format!("the data-plane address cannot be bound again: {err}")))
            }
        }
    }

    async fn on_command(&mut self, command: CoordinatorMessage) -> Flow {
        let id = command.command_id;
        match command.body {
            None => self.send(ack(id, "the command has no body")),
            Some(Command::Assignment(assignment)) => self.on_assignment(id, assignment).await,
            Some(Command::RunSteps(run)) => self.on_run_steps(id, run),
            Some(Command::Abort(abort)) => self.on_abort(id, abort),
            Some(Command::Shutdown(shutdown)) => {
                info!(reason = %shutdown.reason, "the coordinator asked this worker to shut down");
                if let Flow::End(end) = self.send(ack(id, "")) {
                    return Flow::End(end);
                }
                Flow::End(SessionEnd::Shutdown)
            }
        }
    }

    async fn on_assignment(&mut self, id: u64, assignment: Assignment) -> Flow {
        // A finished job's task has nothing left but to return: wait for it rather than
        // refuse a coordinator that assigns the next job at once.
        if self.job.as_ref().is_some_and(|job| job.finished) {
            let done = join(&mut self.job).await;
            if let Flow::End(end) = self.on_job_done(done).await {
                return Flow::End(end);
            }
        }
        if let Some(job) = &self.job {
            let busy = if job.cancel.is_cancelled() {
                format!("job {} is still stopping; assign again once its Abort is acknowledged", job.job_id)
            } else {
                format!("this worker is running job {}; abort it first", job.job_id)
            };
            return self.send(ack(id, busy));
        }
        let plan = match JobPlan::from_assignment(&assignment, self.options) {
            Ok(plan) => plan,
            Err(reason) => {
                warn!(job = %assignment.job_id, %reason, "assignment refused");
                if let Flow::End(end) = self.send(ack(id, reason.clone())) {
                    return Flow::End(end);
                }
                return self.send(worker_error(&assignment.job_id, 0, reason));
            }
        };
        let Some(listener) = self.plane.listener.take() else {
            // Rebinding happens when the previous job ends; its failure ends the session.
            return self.send(ack(id, "the data-plane listener is not bound"));
        };
        let (commands, commands_rx) = mpsc::channel(JOB_COMMAND_CAPACITY);
        let cancel = CancellationToken::new();
        let job = Job {
            plan,
            ack_id: id,
            listener: Some(listener),
            commands: commands_rx,
            cancel: cancel.clone(),
            events: self.events_tx.clone(),
            rendezvous_timeout: self.options.rendezvous_timeout,
            memory_bytes: self.options.memory_bytes,
            writer: None,
        };
        info!(job = %assignment.job_id, rank = assignment.dp_rank, world = assignment.dp_size, "assignment accepted");
        let task = tokio::spawn(job.run());
        self.job = Some(RunningJob {
            job_id: assignment.job_id,
            commands,
            cancel,
            abort: None,
            finished: false,
            task,
        });
        Flow::Continue
    }

    fn on_run_steps(&mut self, id: u64, run: RunSteps) -> Flow {
        let refusal = match &self.job {
            None => format!("no job is running here (asked to run steps of job {})", run.job_id),
            Some(job) if job.job_id != run.job_id => {
                format!("this worker runs job {}, not {}", job.job_id, run.job_id)
            }
            Some(job) if job.cancel.is_cancelled() => format!("job {} is being aborted", job.job_id),
            // The job acknowledges once it has checked the step range.
            Some(job) => match job.commands.try_send((id, run)) {
                Ok(()) => return Flow::Continue,
                Err(_) => format!("job {} has too many queued RunSteps commands", job.job_id),
            },
        };
        self.send(ack(id, refusal))
    }

    fn on_abort(&mut self, id: u64, abort: Abort) -> Flow {
        match &self.job {
            Some(job) if abort.job_id.is_empty() || abort.job_id == job.job_id => {
                info!(job = %job.job_id, reason = %abort.reason, "aborting the job");
                job.stop(&format!("job aborted by the coordinator: {}", abort.reason));
                self.abort_acks.push(id);
                Flow::Continue
            }
            // Nothing of that job runs here: it is as aborted as it can be.
            _ => self.send(ack(id, "")),
        }
    }

    /// Stops the job, if any, and waits for its task (the communicator is aborted first,
    /// so a collective in flight returns at once; a step's compute runs to its end).
    async fn stop_job(&mut self, reason: &str) {
        if let Some(job) = self.job.take() {
            job.stop(reason);
            if let Err(err) = job.task.await {
                warn!(job = %job.job_id, %err, "the job task failed");
            }
        }
    }
}

/// Resolves when the job task ends; never while there is none.
async fn join(job: &mut Option<RunningJob>) -> Result<(), JoinError> {
    match job {
        Some(job) => (&mut job.task).await,
        None => std::future::pending().await,
    }
}

fn describe(status: &Status) -> String {
    format!("{}: {}", status.code(), status.message())
}

/// An assignment, checked: everything a job task needs before it touches the network.
struct JobPlan {
    job_id: String,
    rank: usize,
    world: usize,
    /// Rank `p`'s data-plane address as the coordinator gave it (this rank's is unused).
    peers: Vec<String>,
    session: u64,
    config: TrainConfig,
    model: ModelConfig,
    output_dir: Option<PathBuf>,
    /// Pipeline/expert-parallel jobs: this rank's stages, shard and instruction stream.
    pipeline: Option<PipelinePlan>,
    /// Where this rank writes its checkpoint shards (`step-{s:08}/` below it); `None`:
    /// the job takes no checkpoints.
    checkpoint_root: Option<PathBuf>,
    /// The committed checkpoint to restore before acknowledging.
    resume: Option<ResumeFrom>,
}

impl JobPlan {
    fn from_assignment(a: &Assignment, options: &WorkerOptions) -> Result<JobPlan, String> {
        if a.job_id.is_empty() {
            return Err("the assignment has no job id".into());
        }
        let world = a.dp_size as usize;
        let rank = a.dp_rank as usize;
        if world == 0 || rank >= world {
            return Err(format!("dp_rank {rank} is not below dp_size {world}"));
        }
        // Every other rank must be listed, so a huge dp_size cannot make us allocate much.
        if world > a.peers.len() + 1 {
            return Err(format!("dp_size is {world} but only {} peers are listed", a.peers.len()));
        }
        let mut peers: Vec<Option<String>> = vec![None; world];
        for peer in &a.peers {
            let slot = peers.get_mut(peer.rank as usize).ok_or_else(|| {
                format!("peer {} has rank {}, not below dp_size {world}", peer.worker_id, peer.rank)
            })?;
            if slot.replace(peer.data_plane_address.clone()).is_some() {
                return Err(format!("rank {} is listed twice among the peers", peer.rank));
            }
        }
        let peers = peers
            .into_iter()
            .enumerate()
            .map(|(p, addr)| match addr {
                Some(addr) => Ok(addr),
                None if p == rank => Ok(String::new()),
                None => Err(format!("rank {p} is missing from the peers")),
            })
            .collect::<Result<Vec<_>, _>>()?;

        let (mut config, model) =
            TrainConfig::from_toml(&a.config_toml, &options.config_base).map_err(|e| e.to_string())?;
        if let Some(threads) = options.threads {
            config.threads = Some(threads);
        }
        let pipeline = match &a.pipeline {
            Some(p) => {
                // Every rank's node (this one's as it registered), for node-aware MoE traffic.
                let mut nodes = vec![String::new(); world];
                for peer in &a.peers {
                    if let Some(slot) = nodes.get_mut(peer.rank as usize) {
                        slot.clone_from(&peer.node_id);
                    }
                }
                if nodes[rank].is_empty() {
                    nodes[rank] = options.node_id.clone().unwrap_or_else(host_name);
                }
                Some(PipelinePlan::from_assignment(p, rank, world, &model)?.with_nodes(nodes)?)
            }
            None => {
                if !config.batch_size.is_multiple_of(world) {
                    return Err(format!(
                        "`batch_size` {} cannot be split evenly over {world} data-parallel ranks",
                        config.batch_size
                    ));
                }
                None
            }
        };
        let output_dir = (!a.output_dir.is_empty()).then(|| PathBuf::from(&a.output_dir));
        let checkpoint_root = (!a.checkpoint_root.is_empty()).then(|| PathBuf::from(&a.checkpoint_root));
        if let Some(resume) = &a.resume {
            if resume.dir.is_empty() {
                return Err("resume.dir is empty: the checkpoint to resume from has no directory".into());
            }
            if resume.shards.is_empty() {
                return Err(format!("resume.shards is empty: checkpoint {} lists no shard", resume.dir));
            }
            // At `steps` exactly, nothing is left to run but saving and finishing.
            if resume.step > config.steps {
                return Err(format!(
                    "cannot resume from checkpoint {} at step {}: the run has only `steps` = {}",
                    resume.dir, resume.step, config.steps
                ));
            }
        }
        Ok(JobPlan {
            job_id: a.job_id.clone(),
            rank,
            world,
            peers,
            session: a.data_plane_session,
            config,
            model,
            output_dir,
            pipeline,
            checkpoint_root,
            resume: a.resume.clone(),
        })
    }
}

/// A job task: owns the trainer and the communicator from assignment to end.
struct Job {
    plan: JobPlan,
    /// The assignment's command id, acknowledged once the data plane is up.
    ack_id: u64,
    /// Spent by the rendezvous; the session binds the same address again when the task ends.
    listener: Option<TcpRendezvous>,
    commands: mpsc::Receiver<(u64, RunSteps)>,
    cancel: CancellationToken,
    events: mpsc::UnboundedSender<JobEvent>,
    rendezvous_timeout: Duration,
    memory_bytes: Option<u64>,
    /// The checkpoint write in flight, if any: at most one per job, joined before the next
    /// starts and on every way out of the job.
    writer: Option<Writer>,
}

/// A background write of this rank's checkpoint shard.
struct Writer {
    step: u64,
    thread: std::thread::JoinHandle<()>,
}

/// What a job trains with: the whole model data-parallel, or this rank's pipeline stages.
enum Training {
    DataParallel(Box<Trainer>),
    Pipeline(Box<PipelineTrainer>),
}

impl Training {
    fn step(&self) -> u64 {
        match self {
            Training::DataParallel(t) => t.step(),
            Training::Pipeline(t) => t.step(),
        }
    }

    fn config(&self) -> &TrainConfig {
        match self {
            Training::DataParallel(t) => &t.config,
            Training::Pipeline(t) => &t.config,
        }
    }

    fn steps(&self) -> u64 {
        self.config().steps
    }

    /// This rank's shard of a checkpoint of the current state (a copy).
    fn snapshot(&self, rank: usize, world: usize) -> Snapshot {
        match self {
            Training::DataParallel(t) => t.snapshot(rank, world),
            Training::Pipeline(t) => t.snapshot(),
        }
    }

    /// Loads the committed checkpoint `resume`: every shard's size and checksum checked,
    /// the model and seed checked, then the state this rank holds (all or nothing).
    /// Blocking. The error names the checkpoint's directory, and the shard or the tensor.
    fn restore(&mut self, resume: &ResumeFrom) -> Result<(), String> {
        let shards: Vec<shard::ShardFile> = resume
            .shards
            .iter()
            .map(|s| shard::ShardFile { file: s.file.clone(), bytes: s.bytes, crc32: s.crc32 })
            .collect();
        let restored = (|| {
            let reader =
                CheckpointReader::open(Path::new(&resume.dir), &shards).map_err(|e| e.to_string())?;
            if reader.step() != resume.step {
                return Err(format!("its shards hold step {}, not step {}", reader.step(), resume.step));
            }
            match self {
                Training::DataParallel(t) => t.restore(&reader).map_err(|e| e.to_string()),
                Training::Pipeline(t) => t.restore(&reader),
            }
        })();
        restored.map_err(|e| format!("restoring checkpoint {} (step {}): {e}", resume.dir, resume.step))
    }
}

/// Why a job task stopped early.
enum Stop {
    /// Aborted by the coordinator or by the session's end: nothing more to report.
    Aborted,
    /// Failed: reported as a `WorkerError` at this step.
    Failed { step: u64, reason: String },
    /// The checkpoint to resume from cannot be loaded: the assignment is refused with an
    /// `Ack` naming the checkpoint's directory in `bad_checkpoint` (and a `WorkerError`).
    BadCheckpoint { dir: String, reason: String },
}

impl Job {
    fn send(&self, msg: WorkerMessage) {
        // The session outlives its job tasks; if it is gone, so is the stream.
        let _ = self.events.send(JobEvent::Send(msg));
    }

    async fn run(mut self) {
        let job_id = self.plan.job_id.clone();
        let ack_id = self.ack_id;
        let (mut trainer, comm, metrics) = match self.start().await {
            Ok(started) => started,
            Err(Stop::Aborted) => {
                self.send(ack(ack_id, "aborted before the job started"));
                return;
            }
            Err(Stop::Failed { reason, .. }) => {
                self.send(ack(ack_id, reason.clone()));
                self.send(worker_error(&job_id, 0, reason));
                return;
            }
            Err(Stop::BadCheckpoint { dir, reason }) => {
                warn!(job = %job_id, checkpoint = %dir, %reason, "assignment refused: bad checkpoint");
                self.send(ack_bad_checkpoint(ack_id, reason.clone(), dir));
                self.send(worker_error(&job_id, 0, reason));
                return;
            }
        };
        self.send(ack(ack_id, ""));
        let mut metrics = metrics;
        let served = self.serve(&mut trainer, &comm, &mut metrics).await;
        if let Err(Stop::Failed { reason, .. }) = &served {
            // Peers learn of the failure before this rank waits for its checkpoint write.
            comm.abort(&format!("rank {} failed: {reason}", self.plan.rank));
        }
        // Every way out joins the checkpoint writer, so that its report comes before the
        // job's last word (`JobFinished` or `WorkerError`) and nothing outlives the task.
        self.join_writer();
        match served {
            Ok(()) => {
                // Flush and say goodbye first, so that the task ends right after
                // `JobFinished` and the next assignment finds the worker free; unless told
                // to stop meanwhile (then dropping the communicator cuts the links).
                tokio::select! {
                    _ = self.cancel.cancelled() => {}
                    result = comm.shutdown() => if let Err(err) = result {
                        debug!(job = %job_id, %err, "data-plane shutdown");
                    },
                }
                let steps = trainer.step();
                self.send(message(Report::Finished(JobFinished { job_id: job_id.clone(), steps })));
                info!(job = %job_id, steps, "job finished");
            }
            Err(Stop::Aborted) => info!(job = %job_id, "job aborted"),
            Err(Stop::Failed { step, reason }) => {
                warn!(job = %job_id, step, %reason, "job failed");
                self.send(worker_error(&job_id, step, reason));
            }
            // Only `start` refuses a checkpoint.
            Err(Stop::BadCheckpoint { reason, .. }) => {
                comm.abort(&format!("rank {} failed: {reason}", self.plan.rank));
                self.send(worker_error(&job_id, 0, reason));
            }
        }
    }

    /// After step `step`: if a checkpoint is due, waits for the previous write (if still
    /// running: that wait is part of this step), copies this rank's shard of the state on
    /// this thread (the step's only checkpoint cost, `snapshot_seconds`) and hands it to a
    /// `checkpoint-writer` thread, which writes it under `step_dir(root, step)` and reports
    /// a `CheckpointShard` (with `error` set if the write failed: the job goes on, and the
    /// coordinator does not commit that checkpoint).
    fn checkpoint(&mut self, trainer: &Training, step: u64) {
        let Some(root) = self.plan.checkpoint_root.clone() else { return };
        if !trainer.config().checkpoint.due(step) {
            return;
        }
        // Committed already (this run passes the step again after resuming from an older
        // checkpoint): training is deterministic, so it holds exactly this state, and
        // rewriting its shards under its manifest would only risk it.
        if flotilla_model::shard::step_dir(&root, step).join(COMMITTED_MANIFEST).exists() {
            return;
        }
        let waited = self.join_writer();
        if waited > Duration::from_millis(10) {
            info!(
                job = %self.plan.job_id,
                step,
                waited_s = waited.as_secs_f64(),
                "waited for the previous checkpoint write"
            );
        }
        let started = std::time::Instant::now();
        let (rank, world) = (self.plan.rank, self.plan.world);
        let snapshot = dp::run_blocking(|| trainer.snapshot(rank, world));
        let snapshot_seconds = started.elapsed().as_secs_f64();
        let events = self.events.clone();
        let job_id = self.plan.job_id.clone();
        let spawned = std::thread::Builder::new().name("checkpoint-writer".into()).spawn(move || {
            let started = std::time::Instant::now();
            let written = write_checkpoint(&root, step, &snapshot);
            drop(snapshot);
            let mut report = CheckpointShard {
                job_id,
                step,
                snapshot_seconds,
                write_seconds: started.elapsed().as_secs_f64(),
                ..CheckpointShard::default()
            };
            match written {
                Ok(file) => {
                    report.file = file.file;
                    report.bytes = file.bytes;
                    report.crc32 = file.crc32;
                }
                Err(error) => {
                    warn!(job = %report.job_id, step, %error, "checkpoint shard not written");
                    report.error = error;
                }
            }
            // The session outlives its job tasks; if it is gone, so is the stream.
            let _ = events.send(JobEvent::Send(message(Report::CheckpointShard(report))));
        });
        match spawned {
            Ok(thread) => self.writer = Some(Writer { step, thread }),
            Err(err) => self.send(message(Report::CheckpointShard(CheckpointShard {
                job_id: self.plan.job_id.clone(),
                step,
                snapshot_seconds,
                error: format!("starting the checkpoint writer: {err}"),
                ..CheckpointShard::default()
            }))),
        }
    }

    /// Waits for the checkpoint write in flight, if any; returns how long it waited. A
    /// writer that panicked has not reported: its failure is reported for it.
    fn join_writer(&mut self) -> Duration {
        let Some(writer) = self.writer.take() else { return Duration::ZERO };
        let started = std::time::Instant::now();
        if dp::run_blocking(|| writer.thread.join()).is_err() {
            self.send(message(Report::CheckpointShard(CheckpointShard {
                job_id: self.plan.job_id.clone(),
                step: writer.step,
                error: "the checkpoint writer panicked".into(),
                ..CheckpointShard::default()
            })));
        }
        started.elapsed()
    }

    /// Builds the trainer, rendezvouses the data plane and opens the metrics file.
    async fn start(&mut self) -> Result<(Training, TcpCommunicator, Option<Metrics>), Stop> {
        let failed = |reason: String| Stop::Failed { step: 0, reason };
        // A resumed run restores its checkpoint, which holds the state `init_from` started
        // from and every step since: the HF checkpoint is not read then.
        let mut config = self.plan.config.clone();
        if self.plan.resume.is_some() {
            config.init_from = None;
        }
        // Not raced against the abort: the build cannot be interrupted, and a task left
        // to finish it would be nobody's.
        let trainer = match &self.plan.pipeline {
            None => dp::run_blocking(|| Trainer::new(config.clone(), &self.plan.model))
                .map(|t| Training::DataParallel(Box::new(t)))
                .map_err(|e| failed(format!("building the trainer: {e}")))?,
            Some(plan) => {
                let trainer =
                    dp::run_blocking(|| PipelineTrainer::new(config.clone(), &self.plan.model, plan.clone()))
                        .map_err(|e| failed(format!("building this rank's pipeline stages: {e}")))?;
                check_capacity(&trainer, self.memory_bytes).map_err(failed)?;
                Training::Pipeline(Box::new(trainer))
            }
        };
        let mut trainer = trainer;
        let init = match &trainer {
            Training::DataParallel(t) => t.init.as_ref(),
            Training::Pipeline(t) => t.init.as_ref(),
        };
        if let (Some(report), Some(dir)) = (init, &config.init_from) {
            info!(
                job = %self.plan.job_id,
                checkpoint = %dir.display(),
                loaded = report.loaded,
                seeded = report.seeded.len(),
                "weights loaded from the HF checkpoint (init_from)"
            );
        }
        if let Some(resume) = &self.plan.resume {
            dp::run_blocking(|| trainer.restore(resume))
                .map_err(|reason| Stop::BadCheckpoint { dir: resume.dir.clone(), reason })?;
            info!(job = %self.plan.job_id, checkpoint = %resume.dir, step = resume.step, "checkpoint restored");
        }
        if self.cancel.is_cancelled() {
            return Err(Stop::Aborted);
        }
        let listener =
            self.listener.take().ok_or_else(|| failed("the data-plane listener was spent".into()))?;
        let mut addrs = Vec::with_capacity(self.plan.world);
        for (p, addr) in self.plan.peers.iter().enumerate() {
            if p == self.plan.rank {
                // Not dialed: the rendezvous only needs the list to be complete.
                addrs.push(listener.local_addr());
                continue;
            }
            let resolved = tokio::select! {
                _ = self.cancel.cancelled() => return Err(Stop::Aborted),
                resolved = resolve(addr) => resolved,
            };
            addrs.push(resolved.map_err(|e| failed(format!("rank {p}'s data-plane address {addr:?}: {e}")))?);
        }
        let options = TcpOptions::new(self.plan.session).with_connect_timeout(self.rendezvous_timeout);
        let comm = tokio::select! {
            _ = self.cancel.cancelled() => return Err(Stop::Aborted),
            comm = listener.connect(self.plan.rank, addrs, options) => {
                comm.map_err(|e| failed(format!("data-plane rendezvous: {e}")))?
            }
        };
        let _ = self.events.send(JobEvent::DataPlane(comm.abort_handle()));
        let metrics = match (&self.plan.output_dir, self.plan.rank) {
            (Some(dir), 0) => Some(
                match &self.plan.resume {
                    Some(resume) => Metrics::resume(dir, resume.step),
                    None => Metrics::create(dir),
                }
                .map_err(failed)?,
            ),
            _ => None,
        };
        Ok((trainer, comm, metrics))
    }

    /// Runs `RunSteps` commands until the run's last step (`Ok`) or a stop.
    async fn serve(
        &mut self,
        trainer: &mut Training,
        comm: &TcpCommunicator,
        metrics: &mut Option<Metrics>,
    ) -> Result<(), Stop> {
        let total = trainer.steps();
        while trainer.step() < total {
            let (id, run) = tokio::select! {
                _ = self.cancel.cancelled() => return Err(Stop::Aborted),
                command = self.commands.recv() => command.ok_or(Stop::Aborted)?,
            };
            let next = trainer.step() + 1;
            let last = run.first_step.checked_add(run.count).and_then(|end| end.checked_sub(1));
            if run.first_step != next || last.is_none_or(|last| last > total) {
                let refusal = format!(
                    "cannot run steps {}..{} (count {}): the next step is {next} and the run has {total}",
                    run.first_step,
                    run.first_step.saturating_add(run.count),
                    run.count
                );
                self.send(ack(id, refusal));
                continue;
            }
            self.send(ack(id, ""));
            for _ in 0..run.count {
                let step = trainer.step() + 1;
                let report = match trainer {
                    Training::DataParallel(trainer) => {
                        let timed = tokio::select! {
                            biased;
                            _ = self.cancel.cancelled() => return Err(Stop::Aborted),
                            timed = dp::data_parallel_step_timed(trainer, comm) => timed,
                        };
                        match timed {
                            Ok(timed) => dp_step_report(&self.plan, trainer, &timed),
                            // An abort shows up here as the communicator's error.
                            Err(_) if self.cancel.is_cancelled() => return Err(Stop::Aborted),
                            Err(err) => return Err(Stop::Failed { step, reason: err.to_string() }),
                        }
                    }
                    Training::Pipeline(trainer) => {
                        // The whole step blocks this thread (the data plane's tasks and
                        // the session run elsewhere); an abort fails its next transfer.
                        let handle = tokio::runtime::Handle::current();
                        match dp::run_blocking(|| trainer.run_step(comm, &handle)) {
                            Ok(done) => pipeline_step_report(&self.plan, trainer, done),
                            Err(_) if self.cancel.is_cancelled() => return Err(Stop::Aborted),
                            Err(err) => return Err(Stop::Failed { step, reason: err.to_string() }),
                        }
                    }
                };
                if let Some(m) = metrics.as_mut() {
                    m.append(&report.0).map_err(|reason| Stop::Failed { step, reason })?;
                }
                self.send(report.1);
                self.checkpoint(trainer, step);
            }
        }
        let step = trainer.step();
        match (trainer, &self.plan.output_dir) {
            (Training::DataParallel(trainer), Some(dir)) if self.plan.rank == 0 => {
                dp::run_blocking(|| trainer.save(dir, WeightDtype::F32))
                    .map_err(|e| Stop::Failed { step, reason: format!("saving the weights: {e}") })?;
            }
            (Training::Pipeline(trainer), Some(dir)) => {
                // Every rank sends the tensors it is first to hold; rank 0 writes them.
                let handle = tokio::runtime::Handle::current();
                dp::run_blocking(|| trainer.save(comm, &handle, dir, WeightDtype::F32))
                    .map_err(|e| Stop::Failed { step, reason: format!("saving the weights: {e}") })?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Writes `snapshot` as this rank's shard of the checkpoint at `step` under `root`.
fn write_checkpoint(root: &Path, step: u64, snapshot: &Snapshot) -> Result<shard::ShardFile, String> {
    let dir = step_dir(root, step);
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    write_shard(&dir, snapshot).map_err(|e| format!("writing a shard to {}: {e}", dir.display()))
}

async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    let mut found = tokio::net::lookup_host(addr).await.map_err(|e| e.to_string())?;
    found.next().ok_or_else(|| "resolves to no address".to_string())
}

fn dp_step_report(plan: &JobPlan, trainer: &Trainer, timed: &TimedStep) -> (StepRecord, WorkerMessage) {
    let tokens = (trainer.config.batch_size * trainer.config.seq_len) as u64;
    let report = step_report(plan, &timed.record, tokens, timed.compute, timed.communication);
    (timed.record.clone(), message(Report::StepReport(report)))
}

fn pipeline_step_report(
    plan: &JobPlan,
    trainer: &PipelineTrainer,
    done: PipelineStep,
) -> (StepRecord, WorkerMessage) {
    let tokens = (trainer.config.batch_size * trainer.config.seq_len) as u64;
    let mut report = step_report(
        plan,
        &done.record,
        tokens,
        Duration::from_secs_f64(done.compute_seconds),
        Duration::from_secs_f64(done.communication_seconds),
    );
    report.executed = done.executed;
    report.bubble_fraction = done.bubble_fraction;
    report.exchange_bytes = done.exchange.bytes_sent;
    report.cross_node_bytes = done.exchange.cross_node_bytes;
    report.cross_node_bytes_flat = done.exchange.cross_node_bytes_flat;
    report.exchange_seconds = done.exchange.wait_seconds;
    (done.record, message(Report::StepReport(report)))
}

/// Refuses an assignment whose stages and optimizer shard do not fit in `memory_bytes`
/// (the machine's available memory when `None`).
fn check_capacity(trainer: &PipelineTrainer, memory_bytes: Option<u64>) -> Result<(), String> {
    let needed = trainer.state_bytes();
    let (limit, what) = match memory_bytes {
        Some(limit) => (limit, "the worker's memory limit"),
        None => match available_memory() {
            Some(limit) => (limit, "the machine's available memory"),
            None => return Ok(()),
        },
    };
    if needed > limit {
        return Err(format!(
            "this rank's stages {:?} need {:.1} MiB for weights, gradients and optimizer shard, above {what} of {:.1} MiB",
            trainer.model.stages(),
            needed as f64 / (1 << 20) as f64,
            limit as f64 / (1 << 20) as f64
        ));
    }
    Ok(())
}

/// `MemAvailable` from `/proc/meminfo` (Linux), in bytes.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn step_report(
    plan: &JobPlan,
    r: &StepRecord,
    tokens: u64,
    compute: Duration,
    communication: Duration,
) -> StepReport {
    StepReport {
        job_id: plan.job_id.clone(),
        step: r.step,
        loss: r.loss,
        main_ce: r.main_ce,
        mtp_ce: r.mtp_ce.clone(),
        balance_loss: r.balance_loss,
        lr: r.lr,
        grad_norm: r.grad_norm,
        tokens,
        compute_seconds: compute.as_secs_f64(),
        communication_seconds: communication.as_secs_f64(),
        expert_loads: r
            .expert_loads
            .iter()
            .map(|l| LayerLoad {
                layer: u32::try_from(l.layer).unwrap_or(u32::MAX),
                tokens: l.tokens.clone(),
            })
            .collect(),
        ..StepReport::default()
    }
}

/// Rank 0's `metrics.jsonl`: one `StepRecord` per line, as `flotilla train` writes it,
/// flushed per step so that a crash leaves whole lines.
struct Metrics {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl Metrics {
    fn create(dir: &Path) -> Result<Metrics, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let path = dir.join("metrics.jsonl");
        let file = std::fs::File::create(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        Ok(Metrics { path, file: std::io::BufWriter::new(file) })
    }

    /// Continues a resumed run's file: keeps the records of steps up to `step` (the
    /// checkpoint's), drops later ones (the lost steps, run again) and any line that is
    /// not a whole record (a torn last line), and appends after them. The kept lines go to
    /// a temporary file renamed over the old one, so a crash leaves one or the other.
    fn resume(dir: &Path, step: u64) -> Result<Metrics, String> {
        use std::io::Write;
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let path = dir.join("metrics.jsonl");
        let old = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        let mut kept = Vec::with_capacity(old.len());
        for line in old.split(|&b| b == b'\n') {
            if serde_json::from_slice::<StepRecord>(line).is_ok_and(|r| r.step <= step) {
                kept.extend_from_slice(line);
                kept.push(b'\n');
            }
        }
        let tmp = dir.join("metrics.jsonl.tmp");
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&kept).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        written.map_err(|e| format!("rewriting {}: {e}", path.display()))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        Ok(Metrics { path, file: std::io::BufWriter::new(file) })
    }

    fn append(&mut self, record: &StepRecord) -> Result<(), String> {
        use std::io::Write;
        let written = serde_json::to_writer(&mut self.file, record)
            .map_err(std::io::Error::from)
            .and_then(|()| self.file.write_all(b"\n"))
            .and_then(|()| self.file.flush());
        written.map_err(|e| format!("writing {}: {e}", self.path.display()))
    }
}
