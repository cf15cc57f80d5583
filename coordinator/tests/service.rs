//! The control plane over real gRPC on loopback: registration and sessions, a job driven
//! by fake workers from submission to its end, resumable watches, failure detection, a
//! restart with the same state directory, health, reflection, and bad input.
//!
//! The fake workers are tonic clients in this process that answer commands the way real
//! workers do: an assignment with an ack, `RunSteps` with one report per step and then
//! `JobFinished`, an abort with an ack once stopped (which a test can hold back).
//!
//! They stay fakes on purpose: these tests are about the coordinator's answers to what a
//! real worker cannot be made to do on cue (stall in a step, stop heartbeating, hold its
//! abort, report step 0, lie about the stream it executed, fail at step `n`, refuse a
//! checkpoint with a chosen kind), in milliseconds per step and without a model. The real
//! agent against the real coordinator, in process through `Connector::in_process`, is in
//! `worker/tests/control_plane.rs` (this crate does not depend on the worker).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use flotilla_coordinator::service::{
    CoordinatorConfig, CoordinatorHandle, ServiceError, bind_and_serve, serve_with_incoming,
};
use flotilla_coordinator::store::{FileStore, LeaseId, Revision, StateStore, StoreError, Txn, TxnResponse};
use flotilla_proto::PROTOCOL_VERSION;
use flotilla_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use flotilla_proto::v1::job_service_client::JobServiceClient;
use flotilla_proto::v1::{
    Ack, CancelJobRequest, CheckpointShard, CoordinatorMessage, ExecutedOp, FailureKind, GetJobRequest,
    GetStepTimelineRequest, Heartbeat, Job, JobEvent, JobFinished, JobState, LayerLoad, ListJobsRequest,
    ListWorkersRequest, ListWorkersResponse, Registration, ScheduledOp, SessionOpen, StepReport,
    SubmitJobRequest, WatchJobRequest, WorkerError, WorkerInfo, WorkerMessage, coordinator_message,
    job_event, worker_message,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Streaming};

const INTERVAL: Duration = Duration::from_millis(50);
const TIMEOUT: Duration = Duration::from_millis(300);
/// The longest any test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Coordinator and clients

fn config(dir: &Path) -> CoordinatorConfig {
    CoordinatorConfig {
        heartbeat_interval: INTERVAL,
        heartbeat_timeout: TIMEOUT,
        // Jobs write under the system's temporary directory (`/tmp/out`, temp dirs).
        allowed_roots: vec![std::env::temp_dir()],
        ..CoordinatorConfig::new(dir)
    }
}

async fn start(config: CoordinatorConfig) -> CoordinatorHandle {
    bind_and_serve(config).await.expect("the coordinator starts")
}

async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the coordinator")
}

async fn jobs(addr: SocketAddr) -> JobServiceClient<Channel> {
    JobServiceClient::new(channel(addr).await)
}

async fn workers(addr: SocketAddr) -> CoordinatorServiceClient<Channel> {
    CoordinatorServiceClient::new(channel(addr).await)
}

fn info(worker_id: &str) -> WorkerInfo {
    WorkerInfo {
        worker_id: worker_id.into(),
        host: "test-host".into(),
        cores: 2,
        data_plane_address: format!("127.0.0.1:{}", 40000 + worker_id.len()),
        protocol_version: PROTOCOL_VERSION,
        node_id: format!("node-{worker_id}"),
        ..Default::default()
    }
}

/// A data-parallel job that fails at its first failure (`max_restarts = 0`); the recovery
/// tests set their own policy.
fn job_config(steps: u64) -> String {
    format!(
        "seed = 0\nsteps = {steps}\nbatch_size = 12\nseq_len = 16\n\n[model]\npreset = \"tiny\"\n\n[recovery]\nmax_restarts = 0\n"
    )
}

async fn submit(client: &mut JobServiceClient<Channel>, workers: u32, steps: u64) -> Job {
    client
        .submit_job(SubmitJobRequest {
            name: format!("test-{workers}x{steps}"),
            config_toml: job_config(steps),
            workers,
            output_dir: "/tmp/out".into(),
            resume_from: String::new(),
        })
        .await
        .expect("the job is accepted")
        .into_inner()
}

async fn list(client: &mut JobServiceClient<Channel>) -> ListWorkersResponse {
    client.list_workers(ListWorkersRequest {}).await.expect("the workers are listed").into_inner()
}

async fn get(client: &mut JobServiceClient<Channel>, job_id: &str) -> Job {
    client.get_job(GetJobRequest { job_id: job_id.into() }).await.expect("the job exists").into_inner()
}

async fn watch(
    client: &mut JobServiceClient<Channel>,
    job_id: &str,
    from_revision: u64,
) -> Streaming<JobEvent> {
    client
        .watch_job(WatchJobRequest { job_id: job_id.into(), from_revision })
        .await
        .expect("the watch starts")
        .into_inner()
}

async fn next_event(stream: &mut Streaming<JobEvent>) -> Option<JobEvent> {
    tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("an event in time")
        .expect("the watch does not fail")
}

/// Every event until the stream ends (it ends after the job's terminal event).
async fn rest(stream: &mut Streaming<JobEvent>) -> Vec<JobEvent> {
    let mut events = Vec::new();
    while let Some(event) = next_event(stream).await {
        events.push(event);
    }
    events
}

/// Reads events until one matches, returning all read.
async fn until(stream: &mut Streaming<JobEvent>, done: impl Fn(&JobEvent) -> bool) -> Vec<JobEvent> {
    let mut events = Vec::new();
    loop {
        let event = next_event(stream).await.expect("the watch ended before the awaited event");
        let found = done(&event);
        events.push(event);
        if found {
            return events;
        }
    }
}

fn state_change(event: &JobEvent) -> Option<(JobState, JobState, &str)> {
    match &event.event {
        Some(job_event::Event::StateChanged(c)) => {
            Some((JobState::try_from(c.from).unwrap(), JobState::try_from(c.to).unwrap(), c.reason.as_str()))
        }
        _ => None,
    }
}

fn entered(state: JobState) -> impl Fn(&JobEvent) -> bool {
    move |event| state_change(event).is_some_and(|(_, to, _)| to == state)
}

fn states(events: &[JobEvent]) -> Vec<JobState> {
    events.iter().filter_map(state_change).map(|(_, to, _)| to).collect()
}

fn revisions(events: &[JobEvent]) -> Vec<u64> {
    events.iter().map(|e| e.revision).collect()
}

fn assert_strictly_increasing(events: &[JobEvent]) {
    let revs = revisions(events);
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "revisions not strictly increasing: {revs:?}");
}

fn lost_workers(events: &[JobEvent]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(job_event::Event::WorkerLost(l)) => Some((l.worker_id.clone(), l.reason.clone())),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Fake workers

#[derive(Clone, Copy, Debug)]
enum Behavior {
    /// Runs every step (one report per `step_time`), then reports the job finished.
    Complete { step_time: Duration },
    /// Reports steps below `n`, then goes quiet (heartbeating on), as if stuck in a step.
    StallAfter(u64),
    /// Reports steps below `n`, then fails at step `n`.
    FailAt(u64),
    /// Reports step 0, which does not exist (steps count from 1).
    StepZero,
    /// Runs every step, but at step `n` reports its stream with two compute instructions
    /// swapped.
    SwapAt(u64),
    /// Runs a fresh assignment as `Complete` (5 ms steps), but refuses one that resumes
    /// from a checkpoint: the `Ack` names the checkpoint in `bad_checkpoint`, with `kind`.
    RefuseResume(FailureKind),
}

struct FakeWorker {
    heartbeats: Arc<AtomicBool>,
    /// Whether aborts are acknowledged (held ones go out when this is set again).
    abort_acks: Arc<AtomicBool>,
    /// Every command the worker received.
    commands: mpsc::UnboundedReceiver<CoordinatorMessage>,
    task: JoinHandle<()>,
}

impl FakeWorker {
    async fn start(addr: SocketAddr, id: &str, behavior: Behavior) -> FakeWorker {
        FakeWorker::start_with(addr, info(id), behavior).await
    }

    async fn start_with(addr: SocketAddr, info: WorkerInfo, behavior: Behavior) -> FakeWorker {
        let mut client = workers(addr).await;
        let registration = client.register(info).await.expect("registration").into_inner();
        let (tx, inbound) = open_session(&mut client, &registration).await.expect("the session opens");
        let heartbeats = Arc::new(AtomicBool::new(true));
        let abort_acks = Arc::new(AtomicBool::new(true));
        let (seen, commands) = mpsc::unbounded_channel();
        let flags = Flags { heartbeats: heartbeats.clone(), abort_acks: abort_acks.clone() };
        let task = tokio::spawn(run_worker(client, tx, inbound, behavior, flags, seen));
        FakeWorker { heartbeats, abort_acks, commands, task }
    }

    fn stop_heartbeats(&self) {
        self.heartbeats.store(false, Ordering::SeqCst);
    }

    /// From now on the worker does not confirm aborts, as if its job would not stop.
    fn hold_abort_acks(&self) {
        self.abort_acks.store(false, Ordering::SeqCst);
    }

    /// Confirms the held aborts (at its next heartbeat tick) and later ones at once.
    fn release_abort_acks(&self) {
        self.abort_acks.store(true, Ordering::SeqCst);
    }

    /// Drops the stream and the connection at once, as a crashed process would.
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Waits for a command matching `pick`.
    async fn expect_command<T>(&mut self, pick: impl Fn(&coordinator_message::Body) -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let command = tokio::time::timeout(remaining, self.commands.recv())
                .await
                .expect("the command in time")
                .expect("the worker is running");
            if let Some(found) = command.body.as_ref().and_then(&pick) {
                return found;
            }
        }
    }
}

fn open_message(registration: &Registration) -> WorkerMessage {
    WorkerMessage {
        body: Some(worker_message::Body::Open(SessionOpen {
            worker_id: registration.worker_id.clone(),
            session_id: registration.session_id.clone(),
        })),
    }
}

async fn open_session(
    client: &mut CoordinatorServiceClient<Channel>,
    registration: &Registration,
) -> Result<(mpsc::Sender<WorkerMessage>, Streaming<CoordinatorMessage>), tonic::Status> {
    let (tx, rx) = mpsc::channel(256);
    tx.send(open_message(registration)).await.unwrap();
    let inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, inbound))
}

fn heartbeat(sequence: u64) -> WorkerMessage {
    WorkerMessage { body: Some(worker_message::Body::Heartbeat(Heartbeat { sequence, sent_unix_ms: 0 })) }
}

/// What a test switches in a running fake worker.
struct Flags {
    heartbeats: Arc<AtomicBool>,
    abort_acks: Arc<AtomicBool>,
}

fn ack(command_id: u64) -> WorkerMessage {
    WorkerMessage { body: Some(worker_message::Body::Ack(Ack { command_id, ..Ack::default() })) }
}

struct Run {
    job_id: String,
    next: u64,
    end: u64,
    at: tokio::time::Instant,
    /// A pipeline job's compiled stream, which the worker reports it executed.
    stream: Vec<ScheduledOp>,
    /// Where the assignment said checkpoints go, and this worker's rank: a fake shard is
    /// written and reported after every [`FAKE_CHECKPOINT_INTERVAL`]th step.
    checkpoint_root: Option<std::path::PathBuf>,
    rank: u32,
    /// The epoch of its assignment, carried back in every job message.
    epoch: u64,
}

/// How often fake workers with a checkpoint root write a shard.
const FAKE_CHECKPOINT_INTERVAL: u64 = 2;

/// Writes rank `rank`'s (fake, 64-byte) shard of step `step`'s checkpoint and says so.
fn write_fake_shard(root: &Path, job_id: &str, epoch: u64, rank: u32, step: u64) -> WorkerMessage {
    let dir = root.join(format!("step-{step:08}"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = format!("shard-{rank:05}.safetensors");
    let bytes = vec![rank as u8 ^ step as u8; 64];
    std::fs::write(dir.join(&file), &bytes).unwrap();
    let shard = CheckpointShard {
        job_id: job_id.to_string(),
        step,
        file,
        bytes: bytes.len() as u64,
        crc32: crc32fast::hash(&bytes),
        snapshot_seconds: 0.001,
        write_seconds: 0.002,
        error: String::new(),
        epoch,
    };
    WorkerMessage { body: Some(worker_message::Body::CheckpointShard(shard)) }
}

async fn run_worker(
    // Kept so the connection lives as long as the worker.
    _client: CoordinatorServiceClient<Channel>,
    tx: mpsc::Sender<WorkerMessage>,
    mut inbound: Streaming<CoordinatorMessage>,
    behavior: Behavior,
    flags: Flags,
    seen: mpsc::UnboundedSender<CoordinatorMessage>,
) {
    let mut ticker = tokio::time::interval(INTERVAL);
    let mut sequence = 0;
    let mut run: Option<Run> = None;
    let mut held_aborts = Vec::new();
    let mut stream = Vec::new();
    let mut checkpoint_root = None;
    let mut rank = 0;
    let mut epoch = 0;
    loop {
        let next_step = run.as_ref().map(|r| r.at);
        tokio::select! {
            _ = ticker.tick() => {
                if flags.heartbeats.load(Ordering::SeqCst) {
                    sequence += 1;
                    if tx.send(heartbeat(sequence)).await.is_err() {
                        return;
                    }
                }
                if flags.abort_acks.load(Ordering::SeqCst) {
                    for id in std::mem::take(&mut held_aborts) {
                        if tx.send(ack(id)).await.is_err() {
                            return;
                        }
                    }
                }
            }
            command = inbound.message() => {
                let Ok(Some(command)) = command else { return };
                let _ = seen.send(command.clone());
                match command.body {
                    Some(coordinator_message::Body::Assignment(assignment)) => {
                        stream = assignment.pipeline.map(|p| p.stream).unwrap_or_default();
                        checkpoint_root = (!assignment.checkpoint_root.is_empty())
                            .then(|| std::path::PathBuf::from(&assignment.checkpoint_root));
                        rank = assignment.dp_rank;
                        epoch = assignment.epoch;
                        if let (Behavior::RefuseResume(kind), Some(resume)) = (behavior, &assignment.resume) {
                            let refusal = Ack {
                                command_id: command.command_id,
                                error: format!("restoring checkpoint {}: shard rank-0 fails its checksum", resume.dir),
                                bad_checkpoint: resume.dir.clone(),
                                kind: kind.into(),
                            };
                            let _ = tx.send(WorkerMessage { body: Some(worker_message::Body::Ack(refusal)) }).await;
                            continue;
                        }
                        let _ = tx.send(ack(command.command_id)).await;
                    }
                    Some(coordinator_message::Body::RunSteps(r)) => {
                        run = Some(Run {
                            job_id: r.job_id,
                            next: r.first_step,
                            end: r.first_step + r.count,
                            at: tokio::time::Instant::now(),
                            stream: stream.clone(),
                            checkpoint_root: checkpoint_root.clone(),
                            rank,
                            epoch,
                        });
                    }
                    Some(coordinator_message::Body::Abort(_)) => {
                        run = None;
                        if flags.abort_acks.load(Ordering::SeqCst) {
                            let _ = tx.send(ack(command.command_id)).await;
                        } else {
                            held_aborts.push(command.command_id);
                        }
                    }
                    _ => {}
                }
            }
            _ = tokio::time::sleep_until(next_step.unwrap_or_else(tokio::time::Instant::now)), if next_step.is_some() => {
                let Some(r) = run.as_mut() else { continue };
                let (body, stop) = match step_message(behavior, r) {
                    Next::Send(body) => (Some(body), false),
                    Next::SendAndStop(body) => (Some(body), true),
                    Next::Stop => (None, true),
                };
                if stop {
                    run = None;
                }
                let reported = match &body {
                    Some(worker_message::Body::StepReport(report)) => Some(report.step),
                    _ => None,
                };
                if let Some(body) = body
                    && tx.send(WorkerMessage { body: Some(body) }).await.is_err()
                {
                    return;
                }
                if let (Some(step), Some(r)) = (reported, run.as_ref())
                    && let Some(root) = &r.checkpoint_root
                    && step % FAKE_CHECKPOINT_INTERVAL == 0
                    && tx.send(write_fake_shard(root, &r.job_id, r.epoch, r.rank, step)).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

/// What a running worker does next.
enum Next {
    Send(worker_message::Body),
    SendAndStop(worker_message::Body),
    Stop,
}

fn step_message(behavior: Behavior, run: &mut Run) -> Next {
    let step = run.next;
    let (step_time, stop) = match behavior {
        Behavior::Complete { step_time } => (step_time, None),
        Behavior::StallAfter(n) => (Duration::from_millis(5), Some((n, false))),
        Behavior::FailAt(n) => (Duration::from_millis(5), Some((n, true))),
        Behavior::StepZero | Behavior::SwapAt(_) | Behavior::RefuseResume(_) => {
            (Duration::from_millis(5), None)
        }
    };
    let step = if let Behavior::StepZero = behavior { 0 } else { step };
    match stop {
        Some((n, false)) if step >= n => return Next::Stop,
        Some((n, true)) if step >= n => {
            let message = "boom: NaN in the gradients".to_string();
            return Next::SendAndStop(worker_message::Body::Error(WorkerError {
                job_id: run.job_id.clone(),
                step,
                message,
                kind: FailureKind::Compute.into(),
                epoch: run.epoch,
            }));
        }
        _ => {}
    }
    if step >= run.end {
        let finished = JobFinished { job_id: run.job_id.clone(), steps: run.end, epoch: run.epoch };
        return Next::SendAndStop(worker_message::Body::Finished(finished));
    }
    run.next += 1;
    run.at += step_time;
    let swap = matches!(behavior, Behavior::SwapAt(n) if n == step);
    let executed = executed(&run.stream, step, swap);
    Next::Send(worker_message::Body::StepReport(StepReport {
        job_id: run.job_id.clone(),
        step,
        loss: 5.0 - 0.1 * step as f64,
        main_ce: 4.5,
        mtp_ce: vec![4.8],
        balance_loss: 0.01,
        lr: 1e-3,
        grad_norm: 1.0,
        tokens: 128,
        compute_seconds: 0.01,
        communication_seconds: 0.002,
        expert_loads: vec![LayerLoad { layer: 1, tokens: vec![5, 3] }],
        executed,
        bubble_fraction: 0.25,
        exchange_bytes: 1_000,
        cross_node_bytes: 400,
        cross_node_bytes_flat: 700,
        exchange_seconds: 0.003,
        epoch: run.epoch,
    }))
}

/// Whether a wire op computes (as opposed to moving a tensor).
fn is_compute(op: &ScheduledOp) -> bool {
    use flotilla_proto::v1::scheduled_op::Kind;
    matches!(
        op.kind(),
        Kind::Forward | Kind::BackwardInput | Kind::BackwardWeight | Kind::Backward | Kind::Overlapped
    )
}

/// The first compute instruction of `stream` and the next one that differs from it.
fn swap_pair(stream: &[ScheduledOp]) -> (usize, usize) {
    let i = stream.iter().position(is_compute).expect("a compute instruction");
    let j =
        (i + 1..stream.len()).find(|&j| is_compute(&stream[j]) && stream[j] != stream[i]).expect("another");
    (i, j)
}

/// `stream` as executed in `step`: each op 100 µs, compute ops back to back and each
/// transfer followed by 50 µs of waiting; with `swap`, the pair of [`swap_pair`] swapped.
fn executed(stream: &[ScheduledOp], step: u64, swap: bool) -> Vec<ExecutedOp> {
    let mut ops = stream.to_vec();
    if swap {
        let (i, j) = swap_pair(&ops);
        ops.swap(i, j);
    }
    let mut t = 1_700_000_000_000_000 + step * 1_000_000;
    ops.into_iter()
        .map(|op| {
            let start = t;
            t += if is_compute(&op) { 100 } else { 150 };
            ExecutedOp { op: Some(op), start_unix_us: start, end_unix_us: start + 100 }
        })
        .collect()
}

async fn wait_for_state(client: &mut JobServiceClient<Channel>, job_id: &str, state: JobState) -> Job {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let job = get(client, job_id).await;
        if job.state() == state {
            return job;
        }
        assert!(Instant::now() < deadline, "job {job_id} stayed {:?}, expected {state:?}", job.state());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Registration and sessions

#[tokio::test]
async fn register_returns_ids_and_heartbeat_settings() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let mut client = workers(coordinator.local_addr()).await;

    let named = client.register(info("w-a")).await.unwrap().into_inner();
    assert_eq!(named.worker_id, "w-a");
    assert_eq!(named.protocol_version, PROTOCOL_VERSION);
    assert_eq!(named.heartbeat_interval_ms, 50);
    assert_eq!(named.heartbeat_timeout_ms, 300);
    assert_eq!(named.session_id.len(), 32);

    // An empty id lets the coordinator choose one; session ids differ.
    let chosen = client.register(info("")).await.unwrap().into_inner();
    assert!(chosen.worker_id.starts_with("worker-"), "{}", chosen.worker_id);
    assert_ne!(chosen.session_id, named.session_id);

    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn register_refuses_a_protocol_mismatch_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let mut client = workers(coordinator.local_addr()).await;

    let old = WorkerInfo { protocol_version: PROTOCOL_VERSION + 41, ..info("w-a") };
    let status = client.register(old).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status
            .message()
            .contains(&format!("worker speaks flotilla.v1 protocol version {}", PROTOCOL_VERSION + 41))
    );
    assert!(status.message().contains(&format!("coordinator speaks version {PROTOCOL_VERSION}")));
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn register_refuses_a_second_live_worker_with_the_same_id() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();

    let mut first = FakeWorker::start(addr, "w-a", Behavior::StallAfter(0)).await;
    let mut client = workers(addr).await;
    let status = client.register(info("w-a")).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert!(status.message().contains("\"w-a\""), "{}", status.message());

    // Once the first is lost, the id is free again, and the old session is closed.
    first.stop_heartbeats();
    let deadline = Instant::now() + PATIENCE;
    loop {
        match client.register(info("w-a")).await {
            Ok(registration) => {
                assert_eq!(registration.into_inner().worker_id, "w-a");
                break;
            }
            Err(status) => assert_eq!(status.code(), Code::AlreadyExists, "{status:?}"),
        }
        assert!(Instant::now() < deadline, "the id was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The first worker's task ends when the coordinator closes its stream.
    tokio::time::timeout(PATIENCE, &mut first.task)
        .await
        .expect("the lost worker's stream is closed")
        .unwrap();
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn register_refuses_invalid_fields() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let mut client = workers(coordinator.local_addr()).await;

    let status = client.register(info("w/../a")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("worker_id"), "{}", status.message());

    let status =
        client.register(WorkerInfo { data_plane_address: String::new(), ..info("w-a") }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("data_plane_address"), "{}", status.message());
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn session_must_open_with_a_valid_session_id() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let mut client = workers(coordinator.local_addr()).await;
    let registration = client.register(info("w-a")).await.unwrap().into_inner();

    // A heartbeat first.
    let (tx, rx) = mpsc::channel(4);
    tx.send(heartbeat(1)).await.unwrap();
    let status = client.session(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("SessionOpen"), "{}", status.message());

    // A wrong session id, an unknown worker, an empty session id.
    let wrong = Registration { session_id: "0".repeat(32), ..registration.clone() };
    let status = open_session(&mut client, &wrong).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let unknown = Registration { worker_id: "w-z".into(), ..registration.clone() };
    let status = open_session(&mut client, &unknown).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let empty = Registration { session_id: String::new(), ..registration.clone() };
    let status = open_session(&mut client, &empty).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("session_id"), "{}", status.message());

    // The right one opens; a second session for the same registration does not.
    let (_tx, _inbound) = open_session(&mut client, &registration).await.expect("the session opens");
    let status = open_session(&mut client, &registration).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    coordinator.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Jobs

#[tokio::test]
async fn two_worker_job_runs_to_success_with_step_summaries() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;

    // Submitted before any worker exists: it waits, then starts as they arrive.
    let job = submit(&mut client, 2, 3).await;
    assert_eq!(job.state(), JobState::Pending);
    assert_eq!(job.total_steps, 3);
    assert!(job.revision > 0);
    let mut events = watch(&mut client, &job.job_id, 0).await;

    let complete = Behavior::Complete { step_time: Duration::from_millis(5) };
    // Registered in reverse order: ranks still follow the ids.
    let mut b = FakeWorker::start(addr, "w-b", complete).await;
    let mut a = FakeWorker::start(addr, "w-a", complete).await;

    let events = rest(&mut events).await;
    assert_strictly_increasing(&events);
    assert_eq!(events[0].revision, job.revision, "the first event is the submission");
    assert_eq!(
        states(&events),
        [JobState::Pending, JobState::Rendezvous, JobState::Running, JobState::Succeeded]
    );
    let joined: Vec<(String, u32)> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(job_event::Event::WorkerJoined(j)) => Some((j.worker_id.clone(), j.rank)),
            _ => None,
        })
        .collect();
    assert_eq!(joined, [("w-a".to_string(), 0), ("w-b".to_string(), 1)]);
    let steps: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(job_event::Event::Step(s)) => Some(s.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(steps.iter().map(|s| s.step).collect::<Vec<_>>(), [1, 2, 3]);
    for s in &steps {
        assert_eq!(s.tokens, 128);
        assert!((s.tokens_per_second - 128.0 / 0.012).abs() < 1e-6, "{}", s.tokens_per_second);
        assert_eq!(s.loss, 5.0 - 0.1 * s.step as f64);
        assert_eq!(s.mtp_ce, [4.8]);
        assert_eq!((s.max_expert_load, s.mean_expert_load), (5.0, 4.0));
    }

    // Each worker got its rank, the peers' data-plane addresses and the same session.
    let pick = |body: &coordinator_message::Body| match body {
        coordinator_message::Body::Assignment(a) => Some(a.clone()),
        _ => None,
    };
    let (assign_a, assign_b) = (a.expect_command(pick).await, b.expect_command(pick).await);
    assert_eq!((assign_a.dp_rank, assign_b.dp_rank), (0, 1));
    assert_eq!((assign_a.dp_size, assign_b.dp_size), (2, 2));
    assert_eq!(assign_a.peers, assign_b.peers);
    assert_eq!(assign_a.peers[1].data_plane_address, info("w-b").data_plane_address);
    assert_eq!(assign_a.peers[0].node_id, "node-w-a");
    assert_eq!(assign_a.data_plane_session, assign_b.data_plane_session);
    // And the same data-plane secret, 32 random bytes, which no event shows.
    assert_eq!(assign_a.data_plane_secret.len(), 32);
    assert_eq!(assign_a.data_plane_secret, assign_b.data_plane_secret);
    assert!(assign_a.data_plane_secret.iter().any(|&b| b != 0));
    let secret_hex: String = assign_a.data_plane_secret.iter().map(|b| format!("{b:02x}")).collect();
    let secret_list = format!("{:?}", assign_a.data_plane_secret);
    let shown = format!("{events:?} {assign_a:?}");
    assert!(!shown.contains(&secret_hex) && !shown.contains(&secret_list), "the secret leaked");
    assert_eq!(assign_a.config_toml, job_config(3));
    assert_eq!(assign_a.output_dir, "/tmp/out");
    let run = a
        .expect_command(|body| match body {
            coordinator_message::Body::RunSteps(run) => Some((run.first_step, run.count)),
            _ => None,
        })
        .await;
    assert_eq!(run, (1, 3), "steps count from 1");

    let done = get(&mut client, &job.job_id).await;
    assert_eq!(done.state(), JobState::Succeeded);
    assert_eq!(done.steps_done, 3);
    assert_eq!(done.last_loss, 5.0 - 0.1 * 3.0);
    assert_eq!(done.revision, events.last().unwrap().revision);
    assert!(done.reason.contains("all 2 workers finished 3 steps"), "{}", done.reason);

    // The workers are free again: a second job runs on them.
    let second = submit(&mut client, 2, 2).await;
    let mut events = watch(&mut client, &second.job_id, 0).await;
    assert_eq!(states(&rest(&mut events).await).last(), Some(&JobState::Succeeded));
    coordinator.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Pipeline jobs

/// A DualPipe job on pp 2 × ep 2 = 4 workers, 4 micro-batches of 4 sequences per step.
fn pipeline_config(steps: u64) -> String {
    format!(
        "seed = 0\nsteps = {steps}\nbatch_size = 16\nseq_len = 16\n\n[parallel]\npp = 2\nep = 2\nmicro_batches = 4\n\n[model]\npreset = \"tiny\"\n\n[recovery]\nmax_restarts = 0\n"
    )
}

async fn submit_pipeline(client: &mut JobServiceClient<Channel>, steps: u64) -> Job {
    let request = SubmitJobRequest {
        name: "pipeline".into(),
        config_toml: pipeline_config(steps),
        workers: 4,
        output_dir: String::new(),
        resume_from: String::new(),
    };
    client.submit_job(request).await.expect("the pipeline job is accepted").into_inner()
}

/// Pipeline rank `p`'s compiled stream in wire form.
fn compiled_stream(p: usize) -> Vec<ScheduledOp> {
    use flotilla_coordinator::schedule::{ScheduleKind, ScheduleSpec, compile};
    let schedule = compile(&ScheduleSpec { kind: ScheduleKind::DualPipe, pp: 2, micro_batches: 4 }).unwrap();
    schedule.ranks[p].iter().map(|&i| ScheduledOp::from(i)).collect()
}

fn describe(op: ScheduledOp) -> String {
    flotilla_coordinator::schedule::Instruction::try_from(op).unwrap().to_string()
}

async fn step_timeline(
    client: &mut JobServiceClient<Channel>,
    job_id: &str,
    step: u64,
) -> Result<flotilla_proto::v1::StepTimeline, tonic::Status> {
    client
        .get_step_timeline(GetStepTimelineRequest { job_id: job_id.into(), step })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn pipeline_job_ships_streams_holds_workers_to_them_and_keeps_timelines() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let job = submit_pipeline(&mut client, 3).await;
    let mut events = watch(&mut client, &job.job_id, 0).await;

    // World ranks follow (node, local rank, worker id), not the ids alone.
    let complete = Behavior::Complete { step_time: Duration::from_millis(5) };
    let placed = [("w-1", "n-b", 0), ("w-2", "n-a", 1), ("w-3", "n-a", 0), ("w-4", "n-b", 1)];
    let mut fakes = Vec::new();
    for (id, node, local_rank) in placed {
        let info = WorkerInfo { node_id: node.into(), local_rank, ..info(id) };
        fakes.push(FakeWorker::start_with(addr, info, complete).await);
    }
    let world: [(&str, usize); 4] = [("w-3", 2), ("w-2", 1), ("w-1", 0), ("w-4", 3)];

    let events = rest(&mut events).await;
    assert_eq!(states(&events).last(), Some(&JobState::Succeeded), "{events:?}");
    let joined: Vec<(String, u32)> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(job_event::Event::WorkerJoined(j)) => Some((j.worker_id.clone(), j.rank)),
            _ => None,
        })
        .collect();
    let expected: Vec<(String, u32)> =
        world.iter().enumerate().map(|(g, (id, _))| (id.to_string(), g as u32)).collect();
    assert_eq!(joined, expected);

    // Each worker got its world rank, the layout, every rank's coordinates, every stage and
    // its pipeline rank's compiled stream.
    for (g, (id, fake)) in world.iter().enumerate() {
        let assignment = fakes[*fake]
            .expect_command(|body| match body {
                coordinator_message::Body::Assignment(a) => Some(a.clone()),
                _ => None,
            })
            .await;
        assert_eq!((assignment.dp_rank, assignment.dp_size), (g as u32, 4), "{id}");
        assert_eq!(assignment.peers[g].worker_id, *id);
        let pipeline = assignment.pipeline.expect("a pipeline assignment");
        let layout = pipeline.layout.unwrap();
        assert_eq!((layout.pp, layout.ep, layout.dp, layout.micro_batches), (2, 2, 1, 4));
        assert_eq!(layout.schedule_kind(), flotilla_proto::v1::ScheduleKind::DualPipe);
        let coordinates: Vec<(u32, u32, u32)> =
            pipeline.coordinates.iter().map(|c| (c.pipeline_rank, c.ep_rank, c.dp_replica)).collect();
        assert_eq!(coordinates, [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]);
        assert_eq!(pipeline.stages.len(), 2);
        assert_eq!(pipeline.stages.iter().map(|s| s.layers).sum::<u32>(), 4, "tiny has 4 layers");
        assert_eq!(pipeline.stream, compiled_stream(g / 2), "{id}");
    }

    // Every step summary has the measured bubble: the idlest rank's share of the makespan.
    let steps: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(job_event::Event::Step(s)) => Some(s.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(steps.len(), 3);
    use flotilla_coordinator::schedule::{bubble_fraction, rank_span};
    for s in &steps {
        let spans = (0..4).map(|g| rank_span(&executed(&compiled_stream(g / 2), s.step, false)).unwrap());
        let expected = bubble_fraction(spans).unwrap();
        assert!(expected > 0.0 && expected < 1.0);
        assert!(
            (s.bubble_fraction - expected).abs() < 1e-12,
            "step {}: {} vs {expected}",
            s.step,
            s.bubble_fraction
        );
        // The simulator's bubble for the measured costs, and the traffic summed over ranks.
        assert!((0.0..1.0).contains(&s.predicted_bubble_fraction), "{}", s.predicted_bubble_fraction);
        assert_eq!((s.exchange_bytes, s.cross_node_bytes, s.cross_node_bytes_flat), (4_000, 1_600, 2_800));
        assert_eq!(s.exchange_seconds, 0.003);
    }

    // The ended job's timelines are still served.
    let timeline = step_timeline(&mut client, &job.job_id, 2).await.expect("step 2 is kept");
    assert_eq!((timeline.job_id.as_str(), timeline.step), (job.job_id.as_str(), 2));
    assert_eq!(timeline.ranks.len(), 4);
    for (g, rank) in timeline.ranks.iter().enumerate() {
        assert_eq!(rank.rank, g as u32);
        assert_eq!(rank.worker_id, world[g].0);
        assert_eq!((rank.pipeline_rank, rank.ep_rank, rank.dp_replica), (g as u32 / 2, g as u32 % 2, 0));
        assert_eq!(rank.ops, executed(&compiled_stream(g / 2), 2, false));
        assert_eq!(rank.bubble_fraction, 0.25);
    }
    let trace = flotilla_coordinator::schedule::executed_chrome_trace(&timeline);
    let events = trace["traceEvents"].as_array().unwrap();
    assert_eq!(events.iter().filter(|e| e["name"] == "process_name").count(), 4);
    let ops: usize = timeline.ranks.iter().map(|r| r.ops.len()).sum();
    assert_eq!(events.iter().filter(|e| e["ph"] == "X").count(), ops);

    let status = step_timeline(&mut client, &job.job_id, 9).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().contains("step 9") && status.message().contains("steps 1 to 3"),
        "{}",
        status.message()
    );
    let status = step_timeline(&mut client, "job-999999", 1).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("job-999999"), "{}", status.message());

    // A data-parallel job has none; it runs on the same workers with no pipeline.
    let plain = submit(&mut client, 4, 1).await;
    let mut plain_events = watch(&mut client, &plain.job_id, 0).await;
    assert_eq!(states(&rest(&mut plain_events).await).last(), Some(&JobState::Succeeded));
    let status = step_timeline(&mut client, &plain.job_id, 1).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("data-parallel"), "{}", status.message());
    let assignment = fakes[0]
        .expect_command(|body| match body {
            coordinator_message::Body::Assignment(a) if a.job_id == plain.job_id => Some(a.clone()),
            _ => None,
        })
        .await;
    assert!(assignment.pipeline.is_none());
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stream_that_deviates_from_the_compiled_one_fails_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let complete = Behavior::Complete { step_time: Duration::from_millis(5) };
    let mut a = FakeWorker::start(addr, "w-1", complete).await;
    let _b = FakeWorker::start(addr, "w-2", complete).await;
    let _c = FakeWorker::start(addr, "w-3", complete).await;
    // World rank 3, pipeline rank 1: swaps two instructions at step 2.
    let _d = FakeWorker::start(addr, "w-4", Behavior::SwapAt(2)).await;
    let job = submit_pipeline(&mut client, 5).await;
    let mut events = watch(&mut client, &job.job_id, 0).await;
    let events = rest(&mut events).await;

    let stream = compiled_stream(1);
    let (i, j) = swap_pair(&stream);
    let expected = format!(
        "rank 3 (worker w-4) step 2: executed stream deviates from the compiled DualPipe stream at instruction {i}: compiled {}, executed {}",
        describe(stream[i]),
        describe(stream[j])
    );
    let (from, to, reason) = state_change(events.last().unwrap()).unwrap();
    assert_eq!((from, to), (JobState::Running, JobState::Failed));
    assert_eq!(reason, expected);
    assert!(reason.contains("compiled F (mb "), "{reason}");
    // Step 2 was never summarized.
    assert!(!events.iter().any(|e| matches!(&e.event, Some(job_event::Event::Step(s)) if s.step >= 2)));
    assert_eq!(get(&mut client, &job.job_id).await.reason, expected);
    let abort = a
        .expect_command(|body| match body {
            coordinator_message::Body::Abort(abort) => Some(abort.clone()),
            _ => None,
        })
        .await;
    assert_eq!(abort.reason, expected);
    // What the rank did execute is kept for inspection.
    let timeline = step_timeline(&mut client, &job.job_id, 2).await.expect("step 2 is kept");
    assert_eq!(timeline.ranks[3].ops, executed(&stream, 2, true));
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_pending_pipeline_job_is_placed_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let mut client = jobs(coordinator.local_addr()).await;
    let job = submit_pipeline(&mut client, 2).await;
    drop(client);
    coordinator.shutdown().await.unwrap();

    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let complete = Behavior::Complete { step_time: Duration::from_millis(2) };
    let mut fakes = Vec::new();
    for id in ["w-1", "w-2", "w-3", "w-4"] {
        fakes.push(FakeWorker::start(addr, id, complete).await);
    }
    wait_for_state(&mut client, &job.job_id, JobState::Succeeded).await;
    let assignment = fakes[3]
        .expect_command(|body| match body {
            coordinator_message::Body::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    assert_eq!(assignment.pipeline.expect("a pipeline assignment").stream, compiled_stream(1));
    assert_eq!(step_timeline(&mut client, &job.job_id, 2).await.unwrap().ranks.len(), 4);
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn worker_error_fails_the_job_and_aborts_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let mut a = FakeWorker::start(addr, "w-a", Behavior::StallAfter(100)).await;
    let _b = FakeWorker::start(addr, "w-b", Behavior::FailAt(1)).await;
    let job = submit(&mut client, 2, 10).await;

    let mut events = watch(&mut client, &job.job_id, 0).await;
    let events = rest(&mut events).await;
    let (from, to, reason) = state_change(events.last().unwrap()).unwrap();
    // Detected (Recovering), then failed: the job allows no restart.
    assert_eq!((from, to), (JobState::Recovering, JobState::Failed));
    assert_eq!(reason, "worker w-b failed at step 1: boom: NaN in the gradients");
    let abort = a
        .expect_command(|body| match body {
            coordinator_message::Body::Abort(abort) => Some(abort.clone()),
            _ => None,
        })
        .await;
    assert_eq!(abort.job_id, job.job_id);
    assert_eq!(abort.reason, reason);
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn invalid_step_report_fails_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let _a = FakeWorker::start(addr, "w-a", Behavior::StepZero).await;
    let job = submit(&mut client, 1, 5).await;
    let mut events = watch(&mut client, &job.job_id, 0).await;
    let events = rest(&mut events).await;
    let (_, to, reason) = state_change(events.last().unwrap()).unwrap();
    assert_eq!(to, JobState::Failed);
    assert_eq!(reason, "worker w-a sent an invalid step report: step 0 is before the run's first step 1");
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn cancel_aborts_the_workers_and_ends_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let mut a = FakeWorker::start(addr, "w-a", Behavior::StallAfter(2)).await;
    let job = submit(&mut client, 1, 10).await;
    wait_for_state(&mut client, &job.job_id, JobState::Running).await;

    let cancelled = client
        .cancel_job(CancelJobRequest { job_id: job.job_id.clone(), reason: "operator says stop".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state(), JobState::Cancelled);
    assert_eq!(cancelled.reason, "operator says stop");
    let abort = a
        .expect_command(|body| match body {
            coordinator_message::Body::Abort(abort) => Some(abort.reason.clone()),
            _ => None,
        })
        .await;
    assert_eq!(abort, "operator says stop");

    // Cancelling again answers the cancelled job; a pending job cancels too.
    let again =
        client.cancel_job(CancelJobRequest { job_id: job.job_id.clone(), reason: String::new() }).await;
    assert_eq!(again.unwrap().into_inner().state(), JobState::Cancelled);
    let pending = submit(&mut client, 3, 10).await;
    let cancelled = client
        .cancel_job(CancelJobRequest { job_id: pending.job_id.clone(), reason: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (cancelled.state(), cancelled.reason.as_str()),
        (JobState::Cancelled, "cancelled by a client")
    );

    // The worker is free again; a finished job cannot be cancelled.
    a.kill().await;
    // Sorted before w-a: picked even if w-a's loss were not noticed yet.
    let _b = FakeWorker::start(addr, "w-0", Behavior::Complete { step_time: Duration::ZERO }).await;
    let short = submit(&mut client, 1, 1).await;
    wait_for_state(&mut client, &short.job_id, JobState::Succeeded).await;
    let status = client
        .cancel_job(CancelJobRequest { job_id: short.job_id.clone(), reason: String::new() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("JOB_STATE_SUCCEEDED"), "{}", status.message());
    coordinator.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Watches

#[tokio::test]
async fn watch_resumes_without_gap_or_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let job = submit(&mut client, 2, 30).await;
    let slow = Behavior::Complete { step_time: Duration::from_millis(10) };
    let _a = FakeWorker::start(addr, "w-a", slow).await;
    let _b = FakeWorker::start(addr, "w-b", slow).await;

    // Read a few events of the live job, disconnect, resume from the last one, while the
    // job keeps going.
    let mut first = watch(&mut client, &job.job_id, 0).await;
    let mut seen = until(&mut first, entered(JobState::Running)).await;
    seen.push(next_event(&mut first).await.unwrap());
    drop(first);
    assert!(!states(&seen).contains(&JobState::Succeeded));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let last = seen.last().unwrap().revision;
    let mut resumed = watch(&mut client, &job.job_id, last).await;
    seen.extend(rest(&mut resumed).await);

    // Exactly the events of a watch from the start, once each.
    assert_strictly_increasing(&seen);
    let mut whole = watch(&mut client, &job.job_id, 0).await;
    let whole = rest(&mut whole).await;
    assert_eq!(seen, whole);
    assert_eq!(whole.iter().filter(|e| matches!(e.event, Some(job_event::Event::Step(_)))).count(), 30);
    assert_eq!(states(&whole).last(), Some(&JobState::Succeeded));

    // From the job's latest revision of an ended job: nothing more, at once.
    let done = get(&mut client, &job.job_id).await;
    let mut after = watch(&mut client, &job.job_id, done.revision).await;
    assert!(next_event(&mut after).await.is_none());

    // A revision that does not exist yet.
    let future =
        client.watch_job(WatchJobRequest { job_id: job.job_id.clone(), from_revision: u64::MAX }).await;
    let status = future.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn watch_from_a_compacted_revision_is_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;

    // A job waiting for workers that will not come.
    let job = submit(&mut client, 4, 10).await;
    let other = submit(&mut client, 4, 10).await;
    assert!(other.revision > job.revision);
    let current = coordinator.store().current_revision().await.unwrap();
    coordinator.compact_history(current).await.unwrap();

    let status =
        client.watch_job(WatchJobRequest { job_id: job.job_id.clone(), from_revision: 0 }).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("re-read the job with GetJob"), "{}", status.message());

    // The recipe in the message works: re-read, watch from the job's revision.
    let reread = get(&mut client, &job.job_id).await;
    let mut events = watch(&mut client, &job.job_id, reread.revision).await;
    client.cancel_job(CancelJobRequest { job_id: job.job_id.clone(), reason: String::new() }).await.unwrap();
    let events = rest(&mut events).await;
    assert_eq!(states(&events), [JobState::Cancelled]);
    assert!(events[0].revision > current);
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn old_history_is_compacted_automatically() {
    let dir = tempfile::tempdir().unwrap();
    let config = CoordinatorConfig {
        history_retention: 3,
        compaction_interval: Duration::from_millis(20),
        ..config(dir.path())
    };
    let coordinator = start(config).await;
    let mut client = jobs(coordinator.local_addr()).await;
    let mut submitted = Vec::new();
    for _ in 0..6 {
        submitted.push(submit(&mut client, 4, 10).await);
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let request = WatchJobRequest { job_id: submitted[0].job_id.clone(), from_revision: 0 };
        match client.watch_job(request).await {
            Err(status) => {
                assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
                break;
            }
            Ok(_) => assert!(Instant::now() < deadline, "the history was never compacted"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The records are all there; recent history still resumes.
    assert_eq!(client.list_jobs(ListJobsRequest {}).await.unwrap().into_inner().jobs.len(), 6);
    let last = &submitted[5];
    let mut events = watch(&mut client, &last.job_id, last.revision - 1).await;
    assert_eq!(next_event(&mut events).await.unwrap().revision, last.revision);
    coordinator.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Failure detection

#[tokio::test]
async fn silent_worker_is_lost_within_the_heartbeat_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let mut a = FakeWorker::start(addr, "w-a", Behavior::StallAfter(2)).await;
    let b = FakeWorker::start(addr, "w-b", Behavior::StallAfter(2)).await;
    let job = submit(&mut client, 2, 100).await;
    let mut events = watch(&mut client, &job.job_id, 0).await;
    until(&mut events, |e| matches!(&e.event, Some(job_event::Event::Step(s)) if s.step == 1)).await;

    b.stop_heartbeats();
    let silent_since = Instant::now();
    let seen = until(&mut events, |e| !lost_workers(std::slice::from_ref(e)).is_empty()).await;
    let detected = silent_since.elapsed();
    // Its last heartbeat was at most one interval before it fell silent.
    assert!(detected >= TIMEOUT - INTERVAL - Duration::from_millis(20), "lost after only {detected:?}");
    assert!(detected < TIMEOUT + Duration::from_secs(1), "lost only after {detected:?}");
    let lost = lost_workers(&seen);
    assert_eq!(lost, [("w-b".to_string(), "no heartbeat for 300 ms".to_string())]);

    let tail = rest(&mut events).await;
    let changes: Vec<_> = tail.iter().filter_map(state_change).collect();
    let reason = "worker w-b lost: no heartbeat for 300 ms";
    assert_eq!(
        changes,
        [(JobState::Running, JobState::Recovering, reason), (JobState::Recovering, JobState::Failed, reason)]
    );
    // The survivor's step was aborted.
    let abort = a
        .expect_command(|body| match body {
            coordinator_message::Body::Abort(abort) => Some(abort.reason.clone()),
            _ => None,
        })
        .await;
    assert_eq!(abort, reason);
    let failed = get(&mut client, &job.job_id).await;
    assert_eq!((failed.state(), failed.reason.as_str()), (JobState::Failed, reason));
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn broken_stream_is_noticed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // A long timeout: only the broken stream can explain a quick detection.
    let config = CoordinatorConfig {
        heartbeat_interval: Duration::from_secs(2),
        heartbeat_timeout: Duration::from_secs(30),
        ..config(dir.path())
    };
    let coordinator = start(config).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let _a = FakeWorker::start(addr, "w-a", Behavior::StallAfter(2)).await;
    let b = FakeWorker::start(addr, "w-b", Behavior::StallAfter(2)).await;
    let job = submit(&mut client, 2, 100).await;
    let mut events = watch(&mut client, &job.job_id, 0).await;
    until(&mut events, |e| matches!(&e.event, Some(job_event::Event::Step(s)) if s.step == 1)).await;

    let killed_at = Instant::now();
    b.kill().await;
    let seen = until(&mut events, |e| !lost_workers(std::slice::from_ref(e)).is_empty()).await;
    let detected = killed_at.elapsed();
    assert!(detected < Duration::from_secs(3), "lost only after {detected:?}");
    let lost = lost_workers(&seen);
    assert_eq!(lost[0].0, "w-b");
    assert!(lost[0].1.contains("stream") || lost[0].1.contains("session"), "{}", lost[0].1);

    let tail = rest(&mut events).await;
    assert_eq!(states(&tail), [JobState::Recovering, JobState::Failed]);
    let failed = get(&mut client, &job.job_id).await;
    assert!(failed.reason.starts_with("worker w-b lost: "), "{}", failed.reason);
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn aborted_workers_are_held_until_they_confirm_they_stopped() {
    let dir = tempfile::tempdir().unwrap();
    // A long timeout, so the held worker is not declared lost while the test looks.
    let config = CoordinatorConfig { heartbeat_timeout: Duration::from_secs(10), ..config(dir.path()) };
    let coordinator = start(config).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let step_time = Duration::from_millis(10);
    let mut a = FakeWorker::start(addr, "w-a", Behavior::Complete { step_time }).await;
    let _b = FakeWorker::start(addr, "w-b", Behavior::Complete { step_time }).await;
    let first = submit(&mut client, 2, 100_000).await;
    let second = submit(&mut client, 2, 3).await;
    wait_for_state(&mut client, &first.job_id, JobState::Running).await;

    a.hold_abort_acks();
    client
        .cancel_job(CancelJobRequest { job_id: first.job_id.clone(), reason: String::new() })
        .await
        .unwrap();
    a.expect_command(|body| matches!(body, coordinator_message::Body::Abort(_)).then_some(())).await;
    // w-b confirmed, w-a did not: the cancelled job keeps both, the next one waits.
    tokio::time::sleep(INTERVAL * 4).await;
    let listed = list(&mut client).await;
    let held: Vec<(&str, &str)> =
        listed.workers.iter().map(|w| (w.worker_id.as_str(), w.job_id.as_str())).collect();
    assert_eq!(held, [("w-a", first.job_id.as_str()), ("w-b", first.job_id.as_str())]);
    assert_eq!(get(&mut client, &second.job_id).await.state(), JobState::Pending);

    a.release_abort_acks();
    wait_for_state(&mut client, &second.job_id, JobState::Succeeded).await;
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_worker_that_does_not_confirm_its_abort_is_declared_lost() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let step_time = Duration::from_millis(10);
    let a = FakeWorker::start(addr, "w-a", Behavior::Complete { step_time }).await;
    let _b = FakeWorker::start(addr, "w-b", Behavior::Complete { step_time }).await;
    let job = submit(&mut client, 2, 100_000).await;
    wait_for_state(&mut client, &job.job_id, JobState::Running).await;

    a.hold_abort_acks();
    let cancelled_at = Instant::now();
    client.cancel_job(CancelJobRequest { job_id: job.job_id.clone(), reason: String::new() }).await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    let remaining = loop {
        let listed = list(&mut client).await;
        if listed.workers.iter().all(|w| w.worker_id != "w-a") {
            break listed;
        }
        assert!(Instant::now() < deadline, "w-a is still counted alive: {listed:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(cancelled_at.elapsed() >= TIMEOUT, "w-a lost after only {:?}", cancelled_at.elapsed());
    // The worker that stopped is free for the next job.
    assert_eq!(remaining.workers.len(), 1);
    assert_eq!((remaining.workers[0].worker_id.as_str(), remaining.workers[0].job_id.as_str()), ("w-b", ""));
    // Its session was closed: the fake worker's loop ends.
    let ended = tokio::time::timeout(PATIENCE, a.task).await.expect("the session is closed");
    assert!(ended.is_ok(), "the fake worker panicked");
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn list_workers_shows_sessions_jobs_and_heartbeat_handling() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let _a = FakeWorker::start(addr, "w-a", Behavior::StallAfter(1)).await;
    let _b = FakeWorker::start(addr, "w-b", Behavior::StallAfter(1)).await;
    // Registered, no session yet.
    let mut registrar = workers(addr).await;
    registrar.register(info("w-c")).await.unwrap();
    let job = submit(&mut client, 1, 10).await;
    wait_for_state(&mut client, &job.job_id, JobState::Running).await;
    tokio::time::sleep(INTERVAL * 3).await;

    let listed = list(&mut client).await;
    let rows: Vec<(&str, bool, &str)> =
        listed.workers.iter().map(|w| (w.worker_id.as_str(), w.session_open, w.job_id.as_str())).collect();
    assert_eq!(rows, [("w-a", true, job.job_id.as_str()), ("w-b", true, ""), ("w-c", false, "")]);
    for worker in &listed.workers[..2] {
        assert!(worker.heartbeats >= 2, "{worker:?}");
        assert!(worker.silent_ms < TIMEOUT.as_millis() as u64, "{worker:?}");
        assert_eq!(worker.node_id, format!("node-{}", worker.worker_id));
    }
    assert_eq!(listed.workers[2].heartbeats, 0);
    let stats = listed.heartbeats.expect("heartbeat figures");
    let beats: u64 = listed.workers.iter().map(|w| w.heartbeats).sum();
    assert_eq!(stats.handled, beats, "every heartbeat handled came from a listed worker");
    assert_eq!(u64::from(stats.window), beats);
    assert!(stats.p50_us <= stats.p99_us && stats.p99_us <= stats.max_us, "{stats:?}");
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_workers_sends_shutdown_on_every_open_session() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut a = FakeWorker::start(addr, "w-a", Behavior::StallAfter(1)).await;
    let mut b = FakeWorker::start(addr, "w-b", Behavior::StallAfter(1)).await;
    // Registered without a session: nothing to send it on.
    workers(addr).await.register(info("w-c")).await.unwrap();

    assert_eq!(coordinator.shutdown_workers("the run is over").await.unwrap(), 2);
    for worker in [&mut a, &mut b] {
        let reason = worker
            .expect_command(|body| match body {
                coordinator_message::Body::Shutdown(shutdown) => Some(shutdown.reason.clone()),
                _ => None,
            })
            .await;
        assert_eq!(reason, "the run is over");
    }
    coordinator.shutdown().await.unwrap();
}

/// The file store, except that it refuses one conditional transaction (a job actor's
/// write) on demand, as etcd refuses a request that is too large, while staying usable.
#[derive(Clone)]
struct RefusingStore {
    inner: FileStore,
    refuse_next_write: Arc<AtomicBool>,
}

impl StateStore for RefusingStore {
    type Watch = <FileStore as StateStore>::Watch;

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        if !txn.compares.is_empty() && self.refuse_next_write.swap(false, Ordering::SeqCst) {
            return Err(StoreError::TooLarge { key: "jobs/injected".into(), bytes: 2 << 20, limit: 1 << 20 });
        }
        self.inner.txn(txn).await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke(&self, lease: LeaseId) -> Result<Option<Revision>, StoreError> {
        self.inner.revoke(lease).await
    }
    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<Self::Watch, StoreError> {
        self.inner.watch(prefix, from_revision).await
    }
    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.inner.compact(revision).await
    }
    async fn current_revision(&self) -> Result<Revision, StoreError> {
        self.inner.current_revision().await
    }
}

#[tokio::test]
async fn a_refused_write_fails_the_job_instead_of_leaving_it_running() {
    let dir = tempfile::tempdir().unwrap();
    let store = RefusingStore {
        inner: FileStore::open(dir.path()).await.unwrap(),
        refuse_next_write: Arc::new(AtomicBool::new(false)),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let coordinator = serve_with_incoming(config(dir.path()), store.clone(), incoming, addr).await.unwrap();
    let mut client = jobs(addr).await;
    let step_time = Duration::from_millis(20);
    let mut a = FakeWorker::start(addr, "w-a", Behavior::Complete { step_time }).await;
    let job = submit(&mut client, 1, 100_000).await;
    let mut events = watch(&mut client, &job.job_id, 0).await;
    until(&mut events, |e| matches!(&e.event, Some(job_event::Event::Step(s)) if s.step == 2)).await;

    // The next write is a step's: it is refused; the job must end, not hang in Running.
    store.refuse_next_write.store(true, Ordering::SeqCst);
    let tail = rest(&mut events).await;
    let (from, to, reason) = state_change(tail.last().unwrap()).unwrap();
    assert_eq!((from, to), (JobState::Running, JobState::Failed));
    assert!(reason.starts_with("the coordinator cannot record the job's state: "), "{reason}");
    assert!(reason.contains("jobs/injected"), "{reason}");
    // The refused step is not in the record either; the steps recorded are consecutive.
    let steps: Vec<u64> = tail
        .iter()
        .filter_map(|e| match &e.event {
            Some(job_event::Event::Step(s)) => Some(s.step),
            _ => None,
        })
        .collect();
    assert!(steps.iter().zip(3..).all(|(&s, want)| s == want), "{steps:?}");
    let failed = get(&mut client, &job.job_id).await;
    assert_eq!(failed.steps_done, steps.last().copied().unwrap_or(2));
    a.expect_command(|body| matches!(body, coordinator_message::Body::Abort(_)).then_some(())).await;
    coordinator.shutdown().await.unwrap();
    store.inner.close().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Restart

#[tokio::test]
async fn restart_keeps_jobs_and_their_states() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;

    let complete = Behavior::Complete { step_time: Duration::ZERO };
    let w = FakeWorker::start(addr, "w-a", complete).await;
    let done = submit(&mut client, 1, 2).await;
    let done = wait_for_state(&mut client, &done.job_id, JobState::Succeeded).await;
    w.kill().await;
    let _x = FakeWorker::start(addr, "w-x", Behavior::StallAfter(2)).await;
    let _y = FakeWorker::start(addr, "w-y", Behavior::StallAfter(2)).await;
    let running = submit(&mut client, 2, 5).await;
    let mut events = watch(&mut client, &running.job_id, 0).await;
    until(&mut events, |e| matches!(e.event, Some(job_event::Event::Step(_)))).await;
    drop(events);
    // Every worker is busy: this one waits.
    let pending = submit(&mut client, 3, 2).await;
    let running = get(&mut client, &running.job_id).await;
    assert_eq!(running.state(), JobState::Running);
    let pending_before = get(&mut client, &pending.job_id).await;
    drop(client);
    coordinator.shutdown().await.unwrap();

    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let listed = client.list_jobs(ListJobsRequest {}).await.unwrap().into_inner().jobs;
    let summary: Vec<(String, JobState)> = listed.iter().map(|j| (j.job_id.clone(), j.state())).collect();
    assert_eq!(
        summary,
        [
            (done.job_id.clone(), JobState::Succeeded),
            (running.job_id.clone(), JobState::Failed),
            (pending.job_id.clone(), JobState::Pending),
        ]
    );
    assert_eq!(listed[0], done, "an ended job is kept as it was");
    assert_eq!(listed[2], pending_before, "a pending job is kept as it was");
    assert_eq!(listed[1].reason, "coordinator restarted");
    assert_eq!(listed[1].steps_done, running.steps_done);

    // The interrupted job went through Recovering; its history resumes where it was.
    let mut events = watch(&mut client, &running.job_id, running.revision).await;
    let changes: Vec<_> = rest(&mut events)
        .await
        .iter()
        .filter_map(state_change)
        .map(|(f, t, r)| (f, t, r.to_string()))
        .collect();
    let restarted = "coordinator restarted".to_string();
    assert_eq!(
        changes,
        [
            (JobState::Running, JobState::Recovering, restarted.clone()),
            (JobState::Recovering, JobState::Failed, restarted)
        ]
    );

    // New jobs get new ids, and the pending job still runs once workers come.
    let new = submit(&mut client, 1, 1).await;
    assert!(!listed.iter().any(|j| j.job_id == new.job_id), "{} reused", new.job_id);
    let mut workers = Vec::new();
    for id in ["w-1", "w-2", "w-3"] {
        workers.push(FakeWorker::start(addr, id, complete).await);
    }
    wait_for_state(&mut client, &pending.job_id, JobState::Succeeded).await;
    wait_for_state(&mut client, &new.job_id, JobState::Succeeded).await;
    coordinator.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Standard services

#[tokio::test]
async fn health_reports_serving() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let mut health = HealthClient::new(channel(coordinator.local_addr()).await);
    for service in ["", "flotilla.v1.CoordinatorService", "flotilla.v1.JobService"] {
        let response =
            health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "{service:?}");
    }
    let status = health.check(HealthCheckRequest { service: "no.such.Service".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    coordinator.shutdown().await.unwrap();
}

/// A reflection client test for one version of `grpc.reflection` (v1 and v1alpha have the
/// same messages in different packages): it lists the services, then resolves every
/// `flotilla.v1` method's request and response types to the file that defines them, as
/// grpcurl, Postman or grpcio-reflection do before they can call a method.
macro_rules! reflection_client_test {
    ($name:ident, $version:ident, $reflection_service:literal) => {
        #[tokio::test]
        async fn $name() {
            use prost::Message;
            use tonic_reflection::pb::$version::ServerReflectionRequest;
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;

            let dir = tempfile::tempdir().unwrap();
            let coordinator = start(config(dir.path())).await;
            let mut client = ServerReflectionClient::new(channel(coordinator.local_addr()).await);
            // One request at a time on the stream, as the clients do.
            let mut ask_for = async |request: MessageRequest| -> Result<MessageResponse, tonic::Status> {
                let request = ServerReflectionRequest { host: String::new(), message_request: Some(request) };
                let mut responses =
                    client.server_reflection_info(futures::stream::iter([request])).await?.into_inner();
                Ok(responses.message().await?.expect("a response").message_response.expect("a message"))
            };
            let mut ask = async |request| ask_for(request).await.unwrap();
            let MessageResponse::ListServicesResponse(listed) =
                ask(MessageRequest::ListServices(String::new())).await
            else {
                panic!("expected a service list");
            };
            let mut names: Vec<String> = listed.service.into_iter().map(|s| s.name).collect();
            names.sort();
            let mut expected = vec![
                "flotilla.v1.CoordinatorService",
                "flotilla.v1.JobService",
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ];
            expected.sort();
            assert_eq!(names, expected);
            assert!(names.iter().any(|n| n == $reflection_service));

            let mut methods = 0;
            for service in ["flotilla.v1.CoordinatorService", "flotilla.v1.JobService"] {
                let MessageResponse::FileDescriptorResponse(files) =
                    ask(MessageRequest::FileContainingSymbol(service.into())).await
                else {
                    panic!("expected the file of {service}");
                };
                let files: Vec<prost_types::FileDescriptorProto> = files
                    .file_descriptor_proto
                    .iter()
                    .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap())
                    .collect();
                let short = service.rsplit('.').next().unwrap();
                let descriptor = files
                    .iter()
                    .flat_map(|f| f.service.iter())
                    .find(|s| s.name() == short)
                    .unwrap_or_else(|| panic!("{service} is not in the files served for it"));
                assert!(!descriptor.method.is_empty(), "{service} has no methods");
                for method in &descriptor.method {
                    for type_name in [method.input_type(), method.output_type()] {
                        let symbol = type_name.trim_start_matches('.');
                        let MessageResponse::FileDescriptorResponse(defining) =
                            ask(MessageRequest::FileContainingSymbol(symbol.into())).await
                        else {
                            panic!("{service}/{}: no file for {symbol}", method.name());
                        };
                        let (package, message) = symbol.rsplit_once('.').unwrap();
                        let defined = defining.file_descriptor_proto.iter().any(|bytes| {
                            let file = prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap();
                            file.package() == package && file.message_type.iter().any(|m| m.name() == message)
                        });
                        assert!(
                            defined,
                            "{service}/{}: {symbol} is not defined by the files served",
                            method.name()
                        );
                    }
                    methods += 1;
                }
            }
            assert!(methods >= 6, "only {methods} methods resolved");

            let unknown =
                ask_for(MessageRequest::FileContainingSymbol("flotilla.v1.NoSuchService".into())).await;
            assert_eq!(unknown.unwrap_err().code(), Code::NotFound);
            coordinator.shutdown().await.unwrap();
        }
    };
}

reflection_client_test!(reflection_v1_resolves_every_method, v1, "grpc.reflection.v1.ServerReflection");
reflection_client_test!(
    reflection_v1alpha_resolves_every_method,
    v1alpha,
    "grpc.reflection.v1alpha.ServerReflection"
);

// ---------------------------------------------------------------------------------------
// Bad input

#[tokio::test]
async fn invalid_submit_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let mut client = jobs(coordinator.local_addr()).await;
    let cases = [
        (0, job_config(3), "invalid workers: must be at least 1"),
        (2, "steps = [".to_string(), "invalid config_toml: not valid TOML"),
        (2, "steps = 0\nbatch_size = 8\nseq_len = 16\nmodel = { preset = \"tiny\" }\n".to_string(), "invalid steps: must be at least 1, got 0"),
        (
            2,
            "steps = \"ten\"\nbatch_size = 8\nseq_len = 16\nmodel = { preset = \"tiny\" }\n".to_string(),
            "invalid steps: must be a positive integer, got a string",
        ),
        (2, "steps = 10\n".to_string(), "invalid batch_size: is missing"),
        (
            3,
            "steps = 10\nbatch_size = 8\nseq_len = 16\nmodel = { preset = \"tiny\" }\n".to_string(),
            "invalid batch_size: 8 cannot be split evenly over 3",
        ),
        (2, format!("steps = 1\nbatch_size = 2\n#{}\n", "x".repeat(2 << 20)), "invalid config_toml: "),
        (
            2,
            "steps = 10\nbatch_size = 8\nseq_len = 16\nmodel = { preset = \"tiny\" }\n[checkpoint]\nkeep = 0\n".to_string(),
            "invalid checkpoint.keep: must be at least 1",
        ),
        (
            2,
            "steps = 10\nbatch_size = 8\nseq_len = 16\nmodel = { preset = \"tiny\" }\n[recovery]\nstep_timeout_s = -1.0\n".to_string(),
            "invalid recovery.step_timeout_s: must be between 0 and 1e7 seconds, got -1",
        ),
        (
            2,
            "steps = 10\nbatch_size = 8\nseq_len = 16\nmodel = { preset = \"tiny\" }\n[recovery]\nretries = 3\n".to_string(),
            "invalid recovery: invalid [recovery] table: unknown field `retries`",
        ),
        (
            4,
            format!(
                "{}[recovery]\nmin_workers = 2\n",
                pipeline_config(3).replace("[recovery]\nmax_restarts = 0\n", "")
            ),
            "invalid recovery.min_workers: applies to data-parallel jobs only",
        ),
    ];
    let not_a_checkpoint = tempfile::tempdir().unwrap();
    let resume = SubmitJobRequest {
        name: "bad".into(),
        config_toml: job_config(3),
        workers: 2,
        resume_from: not_a_checkpoint.path().display().to_string(),
        ..Default::default()
    };
    let status = client.submit_job(resume).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("invalid resume_from: not a committed checkpoint: "),
        "{}",
        status.message()
    );
    for (workers, config_toml, expected) in cases {
        let request = SubmitJobRequest { name: "bad".into(), config_toml, workers, ..Default::default() };
        let status = client.submit_job(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(expected),
            "{:?} does not start with {expected:?}",
            status.message()
        );
    }
    assert!(client.list_jobs(ListJobsRequest {}).await.unwrap().into_inner().jobs.is_empty());
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn oversized_messages_are_refused_and_the_coordinator_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let mut client = jobs(coordinator.local_addr()).await;
    let huge = SubmitJobRequest { config_toml: "#".repeat(17 << 20), workers: 1, ..Default::default() };
    let status = client.submit_job(huge).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{}", status.message());
    let job = submit(&mut client, 1, 1).await;
    assert_eq!(get(&mut client, &job.job_id).await.state(), JobState::Pending);
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_job_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let mut client = jobs(coordinator.local_addr()).await;
    let missing = "job-999999".to_string();

    let status = client.get_job(GetJobRequest { job_id: missing.clone() }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("job-999999"));
    let status = client
        .cancel_job(CancelJobRequest { job_id: missing.clone(), reason: String::new() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = client.watch_job(WatchJobRequest { job_id: missing, from_revision: 0 }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = client.get_job(GetJobRequest { job_id: "../jobs/x".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = client.get_job(GetJobRequest { job_id: String::new() }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("job_id"));
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn listening_beyond_loopback_needs_insecure_without_tls_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let open = CoordinatorConfig { listen: "0.0.0.0:0".parse().unwrap(), ..config(dir.path()) };
    let refused = bind_and_serve(open.clone()).await.unwrap_err();
    assert!(matches!(refused, ServiceError::RemoteListenRefused { .. }), "{refused:?}");
    assert!(refused.to_string().contains("0.0.0.0:0"), "{refused}");

    let coordinator = start(CoordinatorConfig { insecure: true, ..open }).await;
    assert!(coordinator.local_addr().ip().is_unspecified());
    coordinator.shutdown().await.unwrap();

    let bad = CoordinatorConfig { heartbeat_timeout: INTERVAL, ..config(dir.path()) };
    let refused = bind_and_serve(bad).await.unwrap_err();
    assert!(refused.to_string().contains("heartbeat_timeout"), "{refused}");
}

// ---------------------------------------------------------------------------------------
// Recovery

/// A data-parallel job that checkpoints every `interval` steps (0: never; the fake workers
/// write every [`FAKE_CHECKPOINT_INTERVAL`]th) and restarts up to `max_restarts` times.
fn recovering_config(steps: u64, interval: u64, max_restarts: u32, extra: &str) -> String {
    format!(
        "seed = 0\nsteps = {steps}\nbatch_size = 12\nseq_len = 16\n\n[model]\npreset = \"tiny\"\n\n\
         [checkpoint]\ninterval = {interval}\nkeep = 2\n\n\
         [recovery]\nmax_restarts = {max_restarts}\nbackoff_ms = 10\n{extra}"
    )
}

async fn submit_config(
    client: &mut JobServiceClient<Channel>,
    workers: u32,
    config_toml: String,
    out: &Path,
) -> Job {
    let request = SubmitJobRequest {
        name: "recovering".into(),
        config_toml,
        workers,
        output_dir: out.display().to_string(),
        resume_from: String::new(),
    };
    client.submit_job(request).await.expect("the job is accepted").into_inner()
}

fn committed_steps(events: &[JobEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(job_event::Event::CheckpointCommitted(c)) => Some(c.step),
            _ => None,
        })
        .collect()
}

fn summarized_steps(events: &[JobEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(job_event::Event::Step(s)) => Some(s.step),
            _ => None,
        })
        .collect()
}

fn recoveries(events: &[JobEvent]) -> Vec<flotilla_proto::v1::Recovery> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(job_event::Event::Recovery(r)) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_lost_worker_is_replaced_and_the_job_resumes_from_its_newest_committed_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let complete = Behavior::Complete { step_time: Duration::from_millis(10) };
    let mut a = FakeWorker::start(addr, "w-a", complete).await;
    let b = FakeWorker::start(addr, "w-b", complete).await;
    let job =
        submit_config(&mut client, 2, recovering_config(30, FAKE_CHECKPOINT_INTERVAL, 2, ""), out.path())
            .await;
    let mut stream = watch(&mut client, &job.job_id, 0).await;
    let mut events =
        until(&mut stream, |e| matches!(&e.event, Some(job_event::Event::Step(s)) if s.step == 9)).await;

    b.kill().await;
    events.extend(until(&mut stream, |e| !lost_workers(std::slice::from_ref(e)).is_empty()).await);
    // The replacement registers under the same id, as a restarted process does.
    let _b = FakeWorker::start(addr, "w-b", complete).await;
    events.extend(rest(&mut stream).await);

    let recovering = events
        .iter()
        .position(|e| state_change(e).is_some_and(|(_, to, _)| to == JobState::Recovering))
        .unwrap();
    let before =
        *committed_steps(&events[..recovering]).last().expect("a checkpoint committed before the loss");
    assert!(before >= 4, "step 9 was summarized, so step 8's or an earlier checkpoint: {before}");
    assert_eq!(
        states(&events[recovering..]),
        [JobState::Recovering, JobState::Rendezvous, JobState::Running, JobState::Succeeded]
    );
    let (_, _, cause) = state_change(&events[recovering]).unwrap();
    assert!(cause.starts_with("worker w-b lost: "), "{cause}");
    let (_, _, rendezvous) = events[recovering..]
        .iter()
        .filter_map(state_change)
        .find(|(_, to, _)| *to == JobState::Rendezvous)
        .unwrap();
    assert!(rendezvous.contains(&format!("resuming from the checkpoint at step {before}")), "{rendezvous}");

    // The survivor was aborted, then assigned the checkpoint and the steps after it.
    a.expect_command(|body| matches!(body, coordinator_message::Body::Abort(_)).then_some(())).await;
    let resume = a
        .expect_command(|body| match body {
            coordinator_message::Body::Assignment(assignment) => assignment.resume.clone(),
            _ => None,
        })
        .await;
    assert_eq!(resume.step, before);
    assert!(resume.dir.ends_with(&format!("step-{before:08}")), "{}", resume.dir);
    assert_eq!(resume.shards.len(), 2);
    let run = a
        .expect_command(|body| match body {
            coordinator_message::Body::RunSteps(run) => Some(run.clone()),
            _ => None,
        })
        .await;
    assert_eq!((run.first_step, run.first_step + run.count), (before + 1, 31));

    // Every step is published once; the redone ones reproduced their losses.
    assert_eq!(summarized_steps(&events), (1..=30).collect::<Vec<u64>>());
    let recovery = recoveries(&events);
    assert_eq!(recovery.len(), 1, "{recovery:?}");
    let r = &recovery[0];
    assert_eq!((r.restart, r.from_step, r.replay_mismatches), (1, before, 0));
    assert!(r.steps_redone >= 9 - before, "{r:?}");
    assert!(r.cause.starts_with("worker w-b lost: "), "{r:?}");
    assert!(r.restart_seconds > 0.0 && r.recompute_seconds >= 0.0, "{r:?}");

    // The newest two committed checkpoints are kept; the job's record names the newest.
    let kept = flotilla_coordinator::checkpoint::find_committed(out.path()).unwrap();
    let kept: Vec<u64> = kept.iter().map(|c| c.manifest.step).collect();
    assert_eq!(kept, [28, 30]);
    let done = get(&mut client, &job.job_id).await;
    assert_eq!((done.checkpoint_step, done.restarts, done.steps_done), (30, 1, 30));
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_step_that_hangs_is_a_failure_and_restarts_run_out() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let _a = FakeWorker::start(addr, "w-a", Behavior::Complete { step_time: Duration::from_millis(5) }).await;
    // Heartbeats flow, but its steps stop at step 3, every time.
    let _b = FakeWorker::start(addr, "w-b", Behavior::StallAfter(3)).await;
    let config_toml = recovering_config(20, 0, 1, "step_timeout_s = 0.3\n");
    let job = submit_config(&mut client, 2, config_toml, out.path()).await;
    let mut stream = watch(&mut client, &job.job_id, 0).await;
    let events = rest(&mut stream).await;

    let hang = "step 3 did not complete within 0.3 s (recovery.step_timeout_s); not reported by rank 1 (w-b)";
    let changes: Vec<(JobState, JobState, String)> =
        events.iter().filter_map(state_change).map(|(f, t, r)| (f, t, r.to_string())).skip(3).collect();
    assert_eq!(
        changes.iter().map(|(f, t, _)| (*f, *t)).collect::<Vec<_>>(),
        [
            (JobState::Running, JobState::Recovering),
            (JobState::Recovering, JobState::Rendezvous),
            (JobState::Rendezvous, JobState::Running),
            (JobState::Running, JobState::Recovering),
            (JobState::Recovering, JobState::Failed),
        ]
    );
    assert_eq!(changes[0].2, hang);
    assert!(changes[1].2.ends_with("restarting from the seeded initialization"), "{}", changes[1].2);
    assert_eq!(changes[4].2, format!("{hang}; giving up after 1 restarts (recovery.max_restarts)"));
    let failed = get(&mut client, &job.job_id).await;
    assert_eq!((failed.state(), failed.restarts), (JobState::Failed, 1));
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_restarted_coordinator_resumes_a_running_job_from_its_newest_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let complete = Behavior::Complete { step_time: Duration::from_millis(10) };
    let a = FakeWorker::start(addr, "w-a", complete).await;
    let b = FakeWorker::start(addr, "w-b", complete).await;
    let job =
        submit_config(&mut client, 2, recovering_config(20, FAKE_CHECKPOINT_INTERVAL, 2, ""), out.path())
            .await;
    let mut stream = watch(&mut client, &job.job_id, 0).await;
    let events =
        until(&mut stream, |e| matches!(&e.event, Some(job_event::Event::Step(s)) if s.step == 7)).await;
    let before = *committed_steps(&events).last().expect("a committed checkpoint");
    drop(stream);
    drop(client);
    coordinator.shutdown().await.unwrap();
    a.kill().await;
    b.kill().await;

    // The same state directory; the workers come back (as real ones re-register).
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let mut a = FakeWorker::start(addr, "w-a", complete).await;
    let _b = FakeWorker::start(addr, "w-b", complete).await;
    let done = wait_for_state(&mut client, &job.job_id, JobState::Succeeded).await;
    assert_eq!(done.restarts, 1);
    let resume = a
        .expect_command(|body| match body {
            coordinator_message::Body::Assignment(assignment) => assignment.resume.clone(),
            _ => None,
        })
        .await;
    assert!(resume.step >= before, "resumed from {} with step {before} committed", resume.step);
    let mut stream = watch(&mut client, &job.job_id, 0).await;
    let events = rest(&mut stream).await;
    let recovery = recoveries(&events);
    assert_eq!(recovery.len(), 1, "{recovery:?}");
    assert_eq!((recovery[0].cause.as_str(), recovery[0].from_step), ("coordinator restarted", resume.step));
    assert_eq!(summarized_steps(&events), (1..=20).collect::<Vec<u64>>());
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_data_parallel_job_whose_worker_does_not_come_back_continues_on_fewer() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let complete = Behavior::Complete { step_time: Duration::from_millis(10) };
    let mut a = FakeWorker::start(addr, "w-a", complete).await;
    let _b = FakeWorker::start(addr, "w-b", complete).await;
    let c = FakeWorker::start(addr, "w-c", complete).await;
    // batch_size 12: 3 workers, or 2 (4 does not divide it, 1 is below min_workers).
    let config_toml =
        recovering_config(20, FAKE_CHECKPOINT_INTERVAL, 2, "min_workers = 2\nreplace_timeout_s = 0.2\n");
    let job = submit_config(&mut client, 3, config_toml, out.path()).await;
    let mut stream = watch(&mut client, &job.job_id, 0).await;
    until(&mut stream, |e| matches!(&e.event, Some(job_event::Event::Step(s)) if s.step == 6)).await;
    c.kill().await;
    let events = rest(&mut stream).await;

    let rendezvous: Vec<String> = events
        .iter()
        .filter_map(state_change)
        .filter(|(_, to, _)| *to == JobState::Rendezvous)
        .map(|(_, _, reason)| reason.to_string())
        .collect();
    assert_eq!(rendezvous.len(), 1, "{rendezvous:?}");
    assert!(
        rendezvous[0].starts_with("2 workers assigned; resuming from the checkpoint at step "),
        "{}",
        rendezvous[0]
    );
    assert!(rendezvous[0].ends_with("1 fewer than before (recovery.min_workers = 2)"), "{}", rendezvous[0]);
    let assignment = a
        .expect_command(|body| match body {
            coordinator_message::Body::Assignment(assignment) if assignment.resume.is_some() => {
                Some(assignment.clone())
            }
            _ => None,
        })
        .await;
    assert_eq!((assignment.dp_rank, assignment.dp_size), (0, 2));
    assert_eq!(summarized_steps(&events).last(), Some(&20));
    let done = get(&mut client, &job.job_id).await;
    assert_eq!((done.state(), done.workers, done.restarts), (JobState::Succeeded, 2, 1));
    coordinator.shutdown().await.unwrap();
}

/// The coordinator decides on a refused assignment's kind, never on its text nor on
/// `bad_checkpoint` alone: a worker that cannot load the checkpoint a job was submitted to
/// resume from says so with `FAILURE_KIND_CHECKPOINT`, and the job fails as unable to
/// resume; the same refusal of another kind fails it as a refused assignment. (That the
/// real worker reports the kind, and that the coordinator then falls back to the
/// checkpoint before, runs end to end in `worker/tests/control_plane.rs`.)
#[tokio::test]
async fn a_refused_checkpoint_is_decided_on_by_the_kind_of_the_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let first = FakeWorker::start(addr, "w-a", Behavior::RefuseResume(FailureKind::Checkpoint)).await;
    let toml = recovering_config(4, FAKE_CHECKPOINT_INTERVAL, 0, "");
    let job = submit_config(&mut client, 1, toml.clone(), out.path()).await;
    let done = wait_for_state(&mut client, &job.job_id, JobState::Succeeded).await;
    assert!(!done.checkpoint_dir.is_empty(), "a committed checkpoint: {done:?}");

    let resume = |client: &mut JobServiceClient<Channel>| {
        let request = SubmitJobRequest {
            name: "resumed".into(),
            config_toml: toml.clone(),
            workers: 1,
            output_dir: out.path().display().to_string(),
            resume_from: done.checkpoint_dir.clone(),
        };
        let mut client = client.clone();
        async move { client.submit_job(request).await.expect("the job is accepted").into_inner() }
    };
    let job = resume(&mut client).await;
    let failed = wait_for_state(&mut client, &job.job_id, JobState::Failed).await;
    assert!(failed.reason.contains("cannot load the checkpoint to resume from"), "{}", failed.reason);
    first.kill().await;

    let _second = FakeWorker::start(addr, "w-b", Behavior::RefuseResume(FailureKind::Unspecified)).await;
    let job = resume(&mut client).await;
    let failed = wait_for_state(&mut client, &job.job_id, JobState::Failed).await;
    assert!(failed.reason.contains("refused its assignment"), "{}", failed.reason);
    assert!(!failed.reason.contains("cannot load the checkpoint"), "{}", failed.reason);
}
