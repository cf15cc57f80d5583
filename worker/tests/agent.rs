//! The worker actor against a scripted fake coordinator: a real tonic server on
//! 127.0.0.1 implementing `Register` and `Session`, which hands every registration and
//! every session's stream to the test, and lets the test send commands. The fake runs on
//! its own runtime on its own thread, so "killing" it drops every connection at once, as a
//! crashed coordinator would.
//!
//! The coordinator is a fake on purpose: these tests script what a real one never sends
//! (malformed and out-of-order commands, a coordinator of another protocol version, one
//! that crashes and comes back) and read the worker's every message. The real agent
//! against the real coordinator is in `tests/control_plane.rs`.
//!
//! Every wait is under a timeout, so a hang fails the test instead of stalling the suite.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flotilla_coordinator::placement::{Parallel, Placement};
use flotilla_coordinator::schedule::ScheduleKind;
use flotilla_model::train::{StepRecord, TrainConfig, Trainer};
use flotilla_proto::PROTOCOL_VERSION;
use flotilla_proto::v1::coordinator_message::Body as Command;
use flotilla_proto::v1::coordinator_service_server::{CoordinatorService, CoordinatorServiceServer};
use flotilla_proto::v1::worker_message::Body as Report;
use flotilla_proto::v1::{
    Abort, Ack, Assignment, CheckpointShard, CoordinatorMessage, FailureKind, Peer, Registration, ResumeFrom,
    RunSteps, ShardFile, Shutdown, StepReport, WorkerInfo, WorkerMessage,
};
use flotilla_worker::agent::{AgentError, WorkerOptions, run_worker};
use flotilla_worker::comm::handshake::{HELLO_LEN, Hello};
use flotilla_worker::comm::{Communicator, DataPlaneSecret, TcpOptions, TcpRendezvous};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// Generous: the machine running the suite may be small and shared.
const LIMIT: Duration = Duration::from_secs(120);
const HEARTBEAT_MS: u64 = 100;
/// The epoch of the test's assignments, which every job message must carry back.
const ASSIGNMENT_EPOCH: u64 = 7;

// ---------------------------------------------------------------------------------------
// The fake coordinator.

/// A session as the fake sees it: the worker's stream and a way to send it commands
/// (dropping `commands` ends the coordinator's side of the stream).
struct FakeSession {
    inbound: Streaming<WorkerMessage>,
    commands: mpsc::UnboundedSender<Result<CoordinatorMessage, Status>>,
    next_command: u64,
    /// Heartbeats seen while waiting for other messages.
    heartbeats: Vec<(u64, Instant)>,
}

struct Service {
    registrations: mpsc::UnboundedSender<WorkerInfo>,
    sessions: mpsc::UnboundedSender<FakeSession>,
    counter: AtomicU64,
    /// The protocol version the fake claims.
    version: u32,
}

#[tonic::async_trait]
impl CoordinatorService for Service {
    async fn register(&self, request: Request<WorkerInfo>) -> Result<Response<Registration>, Status> {
        let info = request.into_inner();
        let n = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        let worker_id = if info.worker_id.is_empty() { format!("w-{n}") } else { info.worker_id.clone() };
        let _ = self.registrations.send(info);
        Ok(Response::new(Registration {
            worker_id,
            session_id: format!("s-{n}"),
            protocol_version: self.version,
            heartbeat_interval_ms: HEARTBEAT_MS,
            heartbeat_timeout_ms: 10 * HEARTBEAT_MS,
        }))
    }

    type SessionStream = UnboundedReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let (commands, rx) = mpsc::unbounded_channel();
        let session =
            FakeSession { inbound: request.into_inner(), commands, next_command: 1, heartbeats: Vec::new() };
        let _ = self.sessions.send(session);
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

/// A running fake coordinator.
struct Fake {
    addr: SocketAddr,
    registrations: mpsc::UnboundedReceiver<WorkerInfo>,
    sessions: mpsc::UnboundedReceiver<FakeSession>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Fake {
    /// Serves on `addr` (port 0: any free port) on a runtime of its own.
    fn start(addr: SocketAddr, version: u32) -> Fake {
        let listener = std::net::TcpListener::bind(addr).expect("bind the fake coordinator");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let addr = listener.local_addr().expect("its address");
        let (reg_tx, registrations) = mpsc::unbounded_channel();
        let (sess_tx, sessions) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let service =
            Service { registrations: reg_tx, sessions: sess_tx, counter: AtomicU64::new(0), version };
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("the fake's runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                let server = tonic::transport::Server::builder()
                    .add_service(CoordinatorServiceServer::new(service))
                    .serve_with_incoming(TcpListenerStream::new(listener));
                tokio::select! {
                    _ = stopped => {}
                    _ = server => {}
                }
            });
            // Dropping the runtime drops every connection task: the coordinator "crashes".
            runtime.shutdown_timeout(Duration::from_secs(1));
        });
        Fake { addr, registrations, sessions, stop: Some(stop), thread: Some(thread) }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn registration(&mut self) -> WorkerInfo {
        timeout(LIMIT, self.registrations.recv()).await.expect("no registration came").expect("fake alive")
    }

    async fn session(&mut self) -> FakeSession {
        timeout(LIMIT, self.sessions.recv()).await.expect("no session came").expect("fake alive")
    }

    /// The next session, past its `SessionOpen` (checked to be the first message).
    async fn opened_session(&mut self) -> FakeSession {
        let mut session = self.session().await;
        match session.next_any().await {
            Report::Open(open) => assert!(!open.session_id.is_empty()),
            other => panic!("the first message must be SessionOpen, got {other:?}"),
        }
        session
    }

    /// Drops every connection at once, as a crash would.
    fn kill(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the fake's thread");
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl FakeSession {
    /// Sends a command and returns its id.
    fn command(&mut self, body: Command) -> u64 {
        let id = self.next_command;
        self.next_command += 1;
        self.commands
            .send(Ok(CoordinatorMessage { command_id: id, body: Some(body) }))
            .expect("session open");
        id
    }

    /// The worker's next message, heartbeats included.
    async fn next_any(&mut self) -> Report {
        let msg = timeout(LIMIT, self.inbound.message())
            .await
            .expect("the worker went silent")
            .expect("the stream broke")
            .expect("the worker closed the session");
        msg.body.expect("a message with a body")
    }

    /// The worker's next message that is not a heartbeat (those are recorded).
    async fn next(&mut self) -> Report {
        loop {
            match self.next_any().await {
                Report::Heartbeat(beat) => self.heartbeats.push((beat.sequence, Instant::now())),
                other => return other,
            }
        }
    }

    async fn ack(&mut self, id: u64) -> Ack {
        match self.next().await {
            Report::Ack(ack) => {
                assert_eq!(ack.command_id, id, "acknowledges command {id}: {ack:?}");
                ack
            }
            other => panic!("expected the Ack of command {id}, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helpers.

fn config(steps: u64) -> String {
    common::small_run(steps)
}

fn options(url: String) -> WorkerOptions {
    let mut options = WorkerOptions::new(url);
    // The scripted jobs write under temporary directories.
    options.allowed_roots = vec![std::env::temp_dir()];
    options.threads = Some(1);
    options.initial_backoff = Duration::from_millis(50);
    options.max_backoff = Duration::from_millis(200);
    options.rendezvous_timeout = Duration::from_secs(30);
    options
}

fn spawn_worker(options: WorkerOptions) -> (CancellationToken, JoinHandle<Result<(), AgentError>>) {
    let token = CancellationToken::new();
    let task = tokio::spawn(run_worker(options, token.clone()));
    (token, task)
}

async fn finished(task: JoinHandle<Result<(), AgentError>>) -> Result<(), AgentError> {
    timeout(LIMIT, task).await.expect("the worker did not stop").expect("the worker panicked")
}

fn assignment(job: &str, rank: u32, peers: &[&str], toml: String, output_dir: &str, session: u64) -> Command {
    Command::Assignment(Assignment {
        job_id: job.into(),
        dp_rank: rank,
        dp_size: peers.len() as u32,
        peers: peers
            .iter()
            .enumerate()
            .map(|(r, addr)| Peer {
                rank: r as u32,
                worker_id: format!("w{r}"),
                data_plane_address: addr.to_string(),
                node_id: "n".into(),
            })
            .collect(),
        config_toml: toml,
        output_dir: output_dir.into(),
        data_plane_session: session,
        pipeline: None,
        checkpoint_root: String::new(),
        resume: None,
        epoch: ASSIGNMENT_EPOCH,
        data_plane_secret: secret_bytes(session),
    })
}

/// The data-plane secret the fake coordinator hands out with `session` (any 32 bytes do:
/// the test's own ranks use the same).
fn secret_bytes(session: u64) -> Vec<u8> {
    (0..32u8).map(|i| i.wrapping_mul(31).wrapping_add(session as u8)).collect()
}

fn secret(session: u64) -> DataPlaneSecret {
    DataPlaneSecret::from_bytes(&secret_bytes(session)).expect("32 bytes")
}

fn run_steps(job: &str, first_step: u64, count: u64) -> Command {
    Command::RunSteps(RunSteps { job_id: job.into(), first_step, count })
}

/// Reads `count` step reports, then `JobFinished`; returns the reports.
async fn reports_then_finished(session: &mut FakeSession, job: &str, count: u64) -> Vec<StepReport> {
    let mut reports = Vec::new();
    for step in 1..=count {
        match session.next().await {
            Report::StepReport(report) => {
                assert_eq!((report.job_id.as_str(), report.step), (job, step));
                assert_eq!(report.epoch, ASSIGNMENT_EPOCH, "the report carries its assignment's epoch");
                reports.push(report);
            }
            other => panic!("expected step {step}'s report, got {other:?}"),
        }
    }
    match session.next().await {
        Report::Finished(done) => {
            assert_eq!((done.job_id.as_str(), done.steps, done.epoch), (job, count, ASSIGNMENT_EPOCH))
        }
        other => panic!("expected JobFinished, got {other:?}"),
    }
    reports
}

/// Single-process reference records.
fn single_process(steps: u64) -> Vec<StepRecord> {
    let (config, model) = TrainConfig::from_toml(&config(steps), Path::new(".")).expect("config");
    let mut trainer = Trainer::new(config, &model).expect("trainer");
    (0..steps).map(|_| trainer.train_step().expect("step")).collect()
}

// ---------------------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_opens_the_session_and_heartbeats_at_the_interval() {
    let mut fake = Fake::start("127.0.0.1:0".parse().unwrap(), PROTOCOL_VERSION);
    let mut opts = options(fake.url());
    opts.worker_id = Some("worker-a".into());
    opts.node_id = Some("node-7".into());
    opts.local_rank = 3;
    let (_token, task) = spawn_worker(opts);

    let info = fake.registration().await;
    assert_eq!(info.worker_id, "worker-a");
    assert_eq!(info.protocol_version, PROTOCOL_VERSION);
    assert_eq!(info.node_id, "node-7");
    assert_eq!(info.local_rank, 3);
    assert_eq!(info.pid, std::process::id());
    assert!(!info.host.is_empty());
    assert!(info.cores >= 1);
    assert_eq!(info.devices.len(), 1);
    assert_eq!(info.devices[0].kind, "cpu");
    let data_plane: SocketAddr = info.data_plane_address.parse().expect("host:port");
    assert!(data_plane.ip().is_loopback() && data_plane.port() != 0, "{data_plane}");
    // The listener is bound before registering: peers can reach it.
    tokio::net::TcpStream::connect(data_plane).await.expect("the data plane listens");

    let mut session = fake.session().await;
    match session.next_any().await {
        Report::Open(open) => {
            assert_eq!(open.worker_id, "worker-a");
            assert_eq!(open.session_id, "s-1");
        }
        other => panic!("the first message must be SessionOpen, got {other:?}"),
    }
    let mut beats = Vec::new();
    while beats.len() < 8 {
        match session.next_any().await {
            Report::Heartbeat(beat) => beats.push((beat.sequence, Instant::now())),
            other => panic!("expected heartbeats only, got {other:?}"),
        }
    }
    let sequences: Vec<u64> = beats.iter().map(|b| b.0).collect();
    assert_eq!(sequences, (1..=8).collect::<Vec<_>>());
    let span = beats[7].1 - beats[1].1;
    let mean = span / 6;
    println!("heartbeat interval: {HEARTBEAT_MS} ms asked, {mean:?} measured");
    assert!(span >= Duration::from_millis(6 * HEARTBEAT_MS * 8 / 10), "heartbeats too fast: {span:?} for 6");
    assert!(span <= Duration::from_millis(6 * HEARTBEAT_MS * 5), "heartbeats too slow: {span:?} for 6");

    let id = session.command(Command::Shutdown(Shutdown { reason: "test over".into() }));
    assert_eq!(session.ack(id).await.error, "");
    finished(task).await.expect("a clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_worker_job_runs_to_the_end_and_writes_its_outputs() {
    let mut fake = Fake::start("127.0.0.1:0".parse().unwrap(), PROTOCOL_VERSION);
    let (token, task) = spawn_worker(options(fake.url()));
    let info = fake.registration().await;
    let mut session = fake.opened_session().await;
    let out = tempfile::tempdir().expect("a temporary directory");
    let out_dir = out.path().join("run");

    let id = session.command(assignment(
        "job-1",
        0,
        &[&info.data_plane_address],
        config(3),
        out_dir.to_str().unwrap(),
        9,
    ));
    assert_eq!(session.ack(id).await.error, "", "the assignment is accepted");
    let id = session.command(run_steps("job-1", 1, 3));
    assert_eq!(session.ack(id).await.error, "");
    let reports = reports_then_finished(&mut session, "job-1", 3).await;

    let reference = single_process(3);
    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).expect("metrics.jsonl");
    let records: Vec<StepRecord> =
        metrics.lines().map(|line| serde_json::from_str(line).expect("a StepRecord per line")).collect();
    assert_eq!(records.len(), 3);
    for ((report, record), one) in reports.iter().zip(&records).zip(&reference) {
        assert_eq!(report.tokens, 4 * 32);
        assert!(report.compute_seconds > 0.0 && report.communication_seconds >= 0.0);
        // One rank is the single process, bit for bit (see tests/dp.rs).
        assert_eq!(report.loss.to_bits(), one.loss.to_bits(), "step {}", report.step);
        // serde_json's default float parsing may be off by an ulp: compare like with like.
        let one_read: StepRecord = serde_json::from_str(&serde_json::to_string(one).unwrap()).unwrap();
        assert_eq!(record.loss.to_bits(), one_read.loss.to_bits());
        assert_eq!(record.main_ce.to_bits(), one_read.main_ce.to_bits());
        assert_eq!(report.grad_norm.to_bits(), one.grad_norm.to_bits());
        assert_eq!(report.mtp_ce, one.mtp_ce);
        assert_eq!(record.expert_loads, one.expert_loads);
        let loads: Vec<(usize, Vec<u64>)> =
            report.expert_loads.iter().map(|l| (l.layer as usize, l.tokens.clone())).collect();
        let want: Vec<(usize, Vec<u64>)> =
            one.expert_loads.iter().map(|l| (l.layer, l.tokens.clone())).collect();
        assert_eq!(loads, want);
    }
    assert!(out_dir.join("config.json").exists(), "rank 0 saved the weights");
    assert!(
        std::fs::read_dir(&out_dir).unwrap().any(|e| e
            .unwrap()
            .path()
            .extension()
            .is_some_and(|x| x == "safetensors")),
        "a safetensors file"
    );

    // A second job on the same worker: the data-plane listener is bound again, at the
    // registered address.
    let id = session.command(assignment("job-2", 0, &[&info.data_plane_address], config(2), "", 10));
    assert_eq!(session.ack(id).await.error, "");
    let id = session.command(run_steps("job-2", 1, 1));
    assert_eq!(session.ack(id).await.error, "");
    match session.next().await {
        Report::StepReport(r) => assert_eq!((r.job_id.as_str(), r.step), ("job-2", 1)),
        other => panic!("expected a step report, got {other:?}"),
    }
    // Steps must come in order: step 1 again is refused, the job keeps going.
    let id = session.command(run_steps("job-2", 1, 1));
    let refused = session.ack(id).await.error;
    assert!(refused.contains("next step is 2"), "{refused}");
    let id = session.command(run_steps("job-2", 2, 1));
    assert_eq!(session.ack(id).await.error, "");
    match session.next().await {
        Report::StepReport(r) => assert_eq!(r.step, 2),
        other => panic!("expected a step report, got {other:?}"),
    }
    match session.next().await {
        Report::Finished(done) => assert_eq!(done.steps, 2),
        other => panic!("expected JobFinished, got {other:?}"),
    }

    token.cancel();
    finished(task).await.expect("a clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_assignments_and_commands_are_refused_with_the_reason() {
    let mut fake = Fake::start("127.0.0.1:0".parse().unwrap(), PROTOCOL_VERSION);
    let (token, task) = spawn_worker(options(fake.url()));
    let info = fake.registration().await;
    let mut session = fake.opened_session().await;
    let me = info.data_plane_address.as_str();

    let bad = config(3).replace("seq_len = 32", "seq_len = 0");
    let id = session.command(assignment("job-bad", 0, &[me], bad, "", 1));
    let refused = session.ack(id).await;
    let refusal = refused.error.clone();
    assert!(refusal.contains("seq_len"), "names the field: {refusal}");
    // The kind travels beside the text: the coordinator decides on it, not on the text.
    assert_eq!(refused.kind(), FailureKind::Assignment, "{refused:?}");
    assert!(refused.bad_checkpoint.is_empty(), "{refused:?}");
    match session.next().await {
        Report::Error(err) => {
            assert_eq!(err.job_id, "job-bad");
            assert_eq!(err.message, refusal);
            assert_eq!(err.kind(), FailureKind::Assignment);
        }
        other => panic!("expected a WorkerError, got {other:?}"),
    }

    let unknown = config(3).replace("threads = 1", "threads = 1\nbatch = 3");
    let id = session.command(assignment("job-bad-2", 0, &[me], unknown, "", 1));
    let refusal = session.ack(id).await.error;
    assert!(refusal.contains("batch"), "names the unknown field: {refusal}");
    assert!(matches!(session.next().await, Report::Error(_)));

    let uneven = assignment("job-3", 0, &[me, "127.0.0.1:1", "127.0.0.1:2"], config(3), "", 1);
    let id = session.command(uneven);
    let refusal = session.ack(id).await.error;
    assert!(refusal.contains("batch_size"), "{refusal}");
    assert!(matches!(session.next().await, Report::Error(_)));

    let mut out_of_range = assignment("job-4", 0, &[me], config(3), "", 1);
    if let Command::Assignment(a) = &mut out_of_range {
        a.dp_rank = 5;
    }
    let id = session.command(out_of_range);
    let refused = session.ack(id).await;
    assert!(refused.error.contains("dp_rank 5"), "{refused:?}");
    assert_eq!(refused.kind(), FailureKind::Assignment, "{refused:?}");
    assert!(matches!(session.next().await, Report::Error(e) if e.kind() == FailureKind::Assignment));

    // Commands that do not fit what the worker is doing are of another kind.
    let id = session.command(run_steps("nothing", 1, 1));
    let refused = session.ack(id).await;
    assert!(refused.error.contains("no job"), "{refused:?}");
    assert_eq!(refused.kind(), FailureKind::State, "{refused:?}");

    session.commands.send(Ok(CoordinatorMessage { command_id: 77, body: None })).unwrap();
    let refused = session.ack(77).await;
    assert!(refused.error.contains("no body"), "{refused:?}");
    assert_eq!(refused.kind(), FailureKind::State, "{refused:?}");

    // Still alive and heartbeating after all that.
    let before = session.heartbeats.len();
    while session.heartbeats.len() < before + 2 {
        if let Report::Heartbeat(beat) = session.next_any().await {
            session.heartbeats.push((beat.sequence, Instant::now()));
        }
    }
    token.cancel();
    finished(task).await.expect("a clean exit");
}

/// A job whose paths escape the worker's allowed roots is refused before anything is
/// opened or created, whatever the coordinator let through: `..`, an absolute path
/// outside, a symlink leading out, a data file outside, a resume shard that is not a plain
/// file name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignments_whose_paths_escape_the_roots_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
    let mut fake = Fake::start("127.0.0.1:0".parse().unwrap(), PROTOCOL_VERSION);
    let mut opts = options(fake.url());
    opts.allowed_roots = vec![root.path().to_path_buf()];
    let (token, task) = spawn_worker(opts);
    let info = fake.registration().await;
    let mut session = fake.opened_session().await;
    let me = info.data_plane_address.clone();
    let escaped = outside.path().join("run");
    let inside = |p: &str| root.path().join(p).display().to_string();
    let with = |job: &str, edit: &dyn Fn(&mut Assignment)| {
        let mut command = assignment(job, 0, &[me.as_str()], config(3), &inside("out"), 1);
        if let Command::Assignment(a) = &mut command {
            edit(a);
        }
        command
    };
    let cases: Vec<(Command, &str)> = vec![
        (with("job-dotdot", &|a| a.output_dir = inside("out/../../x")), "output_dir: "),
        (with("job-absolute", &|a| a.output_dir = escaped.display().to_string()), "output_dir: "),
        (with("job-symlink", &|a| a.checkpoint_root = inside("link/ckpt")), "checkpoint_root: "),
        (
            with("job-data", &|a| {
                a.config_toml = config(3).replace(
                    "kind = \"synthetic\"\ntokens = 65536",
                    "kind = \"text\"\npath = \"/etc/passwd\"",
                )
            }),
            "data.path: `/etc/passwd`",
        ),
        (
            with("job-shard", &|a| {
                a.resume = Some(ResumeFrom {
                    dir: inside("out/checkpoints/r/step-00000002"),
                    step: 2,
                    shards: vec![ShardFile { file: "../../x".into(), bytes: 1, crc32: 0 }],
                })
            }),
            "resume.shards.file: `../../x` is not a plain file name",
        ),
    ];
    for (command, reason) in cases {
        let id = session.command(command);
        let refused = session.ack(id).await;
        assert!(refused.error.contains(reason), "{reason}: {refused:?}");
        assert_eq!(refused.kind(), FailureKind::Assignment, "{refused:?}");
        assert!(matches!(session.next().await, Report::Error(e) if e.kind() == FailureKind::Assignment));
    }
    // Nothing was created, inside the roots or out.
    assert!(!escaped.exists());
    assert!(!outside.path().join("ckpt").exists());
    assert!(!root.path().join("out").exists());
    token.cancel();
    finished(task).await.expect("a clean exit");
}

/// A pipeline assignment is refused, with the reason, when the rank's state does not fit
/// the worker's memory or when its stream computes a stage the rank does not host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_assignments_beyond_capacity_or_off_layout_are_refused() {
    let mut fake = Fake::start("127.0.0.1:0".parse().unwrap(), PROTOCOL_VERSION);
    let mut small = options(fake.url());
    small.memory_bytes = Some(1 << 20);
    let (token, task) = spawn_worker(small);
    let info = fake.registration().await;
    let mut session = fake.opened_session().await;
    let me = info.data_plane_address.as_str();

    // One pipeline rank hosting the whole tiny model under 1F1B.
    let toml = format!("{}\n[parallel]\npp = 1\nschedule = \"1f1b\"\nmicro_batches = 2\n", config(2));
    let (_, model) = TrainConfig::from_toml(&toml, std::path::Path::new(".")).unwrap();
    let layout =
        Parallel { pp: 1, ep: 1, dp: 1, schedule: ScheduleKind::OneFOneB, micro_batches: 2, overlap: true };
    let placement = Placement::new(layout, &model, 32).unwrap();
    let mut command = assignment("job-big", 0, &[me], toml.clone(), "", 1);
    if let Command::Assignment(a) = &mut command {
        a.pipeline = Some(placement.assignment(0));
    }
    let id = session.command(command);
    let refused = session.ack(id).await;
    assert!(refused.error.contains("the worker's memory limit of 1.0 MiB"), "{refused:?}");
    assert_eq!(refused.kind(), FailureKind::Capacity, "{refused:?}");
    assert!(matches!(session.next().await, Report::Error(e) if e.kind() == FailureKind::Capacity));

    let mut command = assignment("job-off", 0, &[me], toml, "", 1);
    if let Command::Assignment(a) = &mut command {
        let mut pipeline = placement.assignment(0);
        pipeline.stream[0].stage = 3;
        a.pipeline = Some(pipeline);
    }
    let id = session.command(command);
    let refused = session.ack(id).await;
    assert!(refused.error.contains("pipeline.stream[0]") && refused.error.contains("stage 3"), "{refused:?}");
    // A layout the rank cannot run is the assignment's fault, not the checkpoint's.
    assert_eq!(refused.kind(), FailureKind::Assignment, "{refused:?}");
    assert!(refused.bad_checkpoint.is_empty(), "{refused:?}");
    assert!(matches!(session.next().await, Report::Error(e) if e.kind() == FailureKind::Assignment));
    token.cancel();
    finished(task).await.expect("a clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_unblocks_a_collective_waiting_on_a_peer() {
    let mut fake = Fake::start("127.0.0.1:0".parse().unwrap(), PROTOCOL_VERSION);
    let (token, task) = spawn_worker(options(fake.url()));
    let info = fake.registration().await;
    let mut session = fake.opened_session().await;

    // Rank 1 is this test: it rendezvouses, then never joins the all-reduce.
    let rank1 = TcpRendezvous::bind("127.0.0.1:0").await.unwrap();
    let rank1_addr = rank1.local_addr().to_string();
    let peers = vec![info.data_plane_address.parse().unwrap(), rank1.local_addr()];
    let connecting = tokio::spawn(rank1.connect(1, peers, TcpOptions::new(42, secret(42))));
    let id =
        session.command(assignment("job-a", 0, &[&info.data_plane_address, &rank1_addr], config(3), "", 42));
    assert_eq!(session.ack(id).await.error, "");
    let peer = timeout(LIMIT, connecting).await.unwrap().unwrap().expect("rank 1 joined");
    let id = session.command(run_steps("job-a", 1, 3));
    assert_eq!(session.ack(id).await.error, "");

    // Let rank 0 reach its gradient all-reduce, then abort.
    sleep(Duration::from_millis(500)).await;
    let id = session.command(Command::Abort(Abort { job_id: "job-a".into(), reason: "test".into() }));
    assert_eq!(session.ack(id).await.error, "", "the abort is acknowledged once the job stopped");
    // The worker's abort reached rank 1 over the data plane.
    let err = timeout(LIMIT, peer.recv(0, 1)).await.expect("rank 1 still waits").expect_err("rank 0 aborted");
    println!("rank 1 saw: {err}");

    // The worker takes a new job at the same data-plane address.
    let id = session.command(assignment("job-b", 0, &[&info.data_plane_address], config(1), "", 43));
    assert_eq!(session.ack(id).await.error, "");
    let id = session.command(run_steps("job-b", 1, 1));
    assert_eq!(session.ack(id).await.error, "");
    reports_then_finished(&mut session, "job-b", 1).await;

    token.cancel();
    finished(task).await.expect("a clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_train_together() {
    let mut fake = Fake::start("127.0.0.1:0".parse().unwrap(), PROTOCOL_VERSION);
    let spawn = |id: &str| {
        let mut opts = options(fake.url());
        opts.worker_id = Some(id.into());
        spawn_worker(opts)
    };
    let (token_a, task_a) = spawn("a");
    let (token_b, task_b) = spawn("b");
    let infos = [fake.registration().await, fake.registration().await];
    let mut sessions = [fake.session().await, fake.session().await];
    // Registrations and sessions arrive in any order: match them by worker id.
    let mut opened = Vec::new();
    for s in &mut sessions {
        match s.next_any().await {
            Report::Open(open) => opened.push(open.worker_id),
            other => panic!("expected SessionOpen, got {other:?}"),
        }
    }
    let address = |worker: &str| {
        infos.iter().find(|i| i.worker_id == worker).expect("registered").data_plane_address.clone()
    };
    let addrs = [address(&opened[0]), address(&opened[1])];
    let peers = [addrs[0].as_str(), addrs[1].as_str()];

    let mut acks = Vec::new();
    for (rank, s) in sessions.iter_mut().enumerate() {
        acks.push(s.command(assignment("job-dp", rank as u32, &peers, config(3), "", 5)));
    }
    for (s, id) in sessions.iter_mut().zip(acks) {
        assert_eq!(s.ack(id).await.error, "");
    }
    for s in &mut sessions {
        let id = s.command(run_steps("job-dp", 1, 3));
        assert_eq!(s.ack(id).await.error, "");
    }
    let a = reports_then_finished(&mut sessions[0], "job-dp", 3).await;
    let b = reports_then_finished(&mut sessions[1], "job-dp", 3).await;
    let reference = single_process(3);
    for ((x, y), one) in a.iter().zip(&b).zip(&reference) {
        assert_eq!(x.loss.to_bits(), y.loss.to_bits(), "both ranks report the same loss");
        assert_eq!(x.grad_norm.to_bits(), y.grad_norm.to_bits());
        assert_eq!(x.expert_loads, y.expert_loads);
        let rel = (x.loss - one.loss).abs() / one.loss;
        println!("step {}: 2 workers {} vs one process {} (relative {rel:.2e})", x.step, x.loss, one.loss);
        assert!(rel < 1e-5);
    }
    token_a.cancel();
    token_b.cancel();
    finished(task_a).await.expect("a clean exit");
    finished(task_b).await.expect("a clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hellos_planted_on_the_workers_data_plane_before_the_job_do_not_fail_it() {
    let mut fake = Fake::start("127.0.0.1:0".parse().unwrap(), PROTOCOL_VERSION);
    let spawn = |id: &str| {
        let mut opts = options(fake.url());
        opts.worker_id = Some(id.into());
        spawn_worker(opts)
    };
    let (token_a, task_a) = spawn("a");
    let (token_b, task_b) = spawn("b");
    let infos = [fake.registration().await, fake.registration().await];
    let mut sessions = [fake.session().await, fake.session().await];
    let mut opened = Vec::new();
    for s in &mut sessions {
        match s.next_any().await {
            Report::Open(open) => opened.push(open.worker_id),
            other => panic!("expected SessionOpen, got {other:?}"),
        }
    }
    let address = |worker: &str| {
        infos.iter().find(|i| i.worker_id == worker).expect("registered").data_plane_address.clone()
    };
    let addrs = [address(&opened[0]), address(&opened[1])];
    let peers = [addrs[0].as_str(), addrs[1].as_str()];
    // Before the job: well-formed hellos of another session, claiming rank 0, on both
    // workers' data-plane ports (issue 19: this used to fail the job outright), held open.
    let mut planted = Vec::new();
    for addr in &addrs {
        for session in [6, 666] {
            let mut s = tokio::net::TcpStream::connect(addr.as_str()).await.unwrap();
            s.write_all(&Hello::new(0, 2, session).encode()).await.unwrap();
            planted.push(s);
        }
    }
    let mut acks = Vec::new();
    for (rank, s) in sessions.iter_mut().enumerate() {
        acks.push(s.command(assignment("job-planted", rank as u32, &peers, config(1), "", 6)));
    }
    for (s, id) in sessions.iter_mut().zip(acks) {
        assert_eq!(s.ack(id).await.error, "", "the rendezvous succeeds");
    }
    for s in &mut sessions {
        let id = s.command(run_steps("job-planted", 1, 1));
        assert_eq!(s.ack(id).await.error, "");
    }
    let a = reports_then_finished(&mut sessions[0], "job-planted", 1).await;
    let b = reports_then_finished(&mut sessions[1], "job-planted", 1).await;
    assert_eq!(a[0].loss.to_bits(), b[0].loss.to_bits(), "the gradient all-reduce completed");
    // The strangers were answered at most with a hello, never a proof.
    for mut s in planted {
        let mut got = Vec::new();
        let _ = timeout(LIMIT, s.read_to_end(&mut got)).await.expect("the stranger was dropped");
        assert!(got.len() <= HELLO_LEN, "a stranger got {} bytes", got.len());
    }
    token_a.cancel();
    token_b.cancel();
    finished(task_a).await.expect("a clean exit");
    finished(task_b).await.expect("a clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rendezvous_reports_neither_the_session_nor_the_secret() {
    let mut fake = Fake::start("127.0.0.1:0".parse().unwrap(), PROTOCOL_VERSION);
    let (token, task) = spawn_worker(options(fake.url()));
    let info = fake.registration().await;
    let mut session = fake.opened_session().await;
    // The worker is rank 1 of session S; rank 0 (this test) holds the secret but speaks
    // of another session: an authenticated mismatch, which fails the rendezvous.
    let theirs: u64 = 0x5eed_1234_abcd_9876;
    let ours: u64 = 0x0bad_cafe_0123_4567;
    let rank0 = TcpRendezvous::bind("127.0.0.1:0").await.unwrap();
    let rank0_addr = rank0.local_addr().to_string();
    let peers = vec![rank0.local_addr(), info.data_plane_address.parse().unwrap()];
    let connecting = tokio::spawn(rank0.connect(0, peers, TcpOptions::new(ours, secret(theirs))));
    let id = session.command(assignment(
        "job-s",
        1,
        &[&rank0_addr, &info.data_plane_address],
        config(1),
        "",
        theirs,
    ));
    let refused = session.ack(id).await;
    let reason = refused.error.clone();
    assert!(reason.contains("another session"), "{reason}");
    let error = match session.next().await {
        Report::Error(e) => e.message,
        other => panic!("expected the WorkerError, got {other:?}"),
    };
    let rank0_err = timeout(LIMIT, connecting).await.unwrap().unwrap().unwrap_err().to_string();
    let bytes = secret_bytes(theirs);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    for text in [&reason, &error, &rank0_err] {
        for session in [theirs, ours] {
            assert!(!text.contains(&session.to_string()), "the session leaked: {text}");
            assert!(!text.contains(&format!("{session:x}")), "the session leaked: {text}");
        }
        assert!(!text.contains(&hex) && !text.contains(&format!("{bytes:?}")), "the secret leaked: {text}");
    }
    token.cancel();
    finished(task).await.expect("a clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_until_the_coordinator_appears_and_reconnects_after_it_restarts() {
    // A free port nobody listens on yet.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (token, task) = spawn_worker(options(format!("http://{addr}")));
    sleep(Duration::from_millis(700)).await;
    assert!(!task.is_finished(), "the worker keeps retrying");

    let mut fake = Fake::start(addr, PROTOCOL_VERSION);
    let first = fake.registration().await;
    let mut session = fake.session().await;
    match session.next_any().await {
        Report::Open(open) => assert_eq!(open.session_id, "s-1"),
        other => panic!("expected SessionOpen, got {other:?}"),
    }
    fake.kill();

    // Down for a while, then back on the same address.
    sleep(Duration::from_millis(300)).await;
    let mut fake = Fake::start(addr, PROTOCOL_VERSION);
    let second = fake.registration().await;
    assert_eq!(second.data_plane_address, first.data_plane_address, "the same data-plane address");
    let mut session = fake.session().await;
    match session.next_any().await {
        Report::Open(open) => assert_eq!(open.session_id, "s-1", "the new coordinator's first session"),
        other => panic!("expected SessionOpen, got {other:?}"),
    }
    assert!(matches!(session.next_any().await, Report::Heartbeat(_)));

    // A coordinator that ends the session (rather than crashing) is reconnected to as well.
    drop(session.commands);
    let _third = fake.registration().await;
    let mut session = fake.session().await;
    match session.next_any().await {
        Report::Open(open) => assert_eq!(open.session_id, "s-2"),
        other => panic!("expected SessionOpen, got {other:?}"),
    }
    token.cancel();
    finished(task).await.expect("a clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_of_another_protocol_version_is_refused() {
    let fake = Fake::start("127.0.0.1:0".parse().unwrap(), PROTOCOL_VERSION + 1);
    let (_token, task) = spawn_worker(options(fake.url()));
    let err = finished(task).await.expect_err("a version mismatch is fatal");
    assert!(matches!(err, AgentError::Refused(_)), "{err}");
    assert!(err.to_string().contains("protocol version"), "{err}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_current_thread_runtime_is_refused() {
    let err = run_worker(options("http://127.0.0.1:1".into()), CancellationToken::new())
        .await
        .expect_err("heartbeats would stall during steps");
    assert!(matches!(err, AgentError::Runtime), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_options_are_refused() {
    let mut opts = options("http://127.0.0.1:1".into());
    opts.initial_backoff = Duration::ZERO;
    let err = run_worker(opts, CancellationToken::new()).await.expect_err("zero backoff");
    assert!(err.to_string().contains("initial_backoff"), "{err}");
    let err = run_worker(options("http://[::1".into()), CancellationToken::new()).await.expect_err("bad URL");
    assert!(err.to_string().contains("coordinator"), "{err}");
}

// One worker thread: if the step's compute held it, nothing else would run until the step
// ended, so the heartbeats' regularity shows that the compute sits off the runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn heartbeats_keep_flowing_during_a_long_step() {
    let mut fake = Fake::start("127.0.0.1:0".parse().unwrap(), PROTOCOL_VERSION);
    let (token, task) = spawn_worker(options(fake.url()));
    let info = fake.registration().await;
    let mut session = fake.opened_session().await;
    // Some 40 times the tiny step's work, so that one step spans many heartbeat intervals.
    let big = config(1).replace("batch_size = 4", "batch_size = 32").replace("seq_len = 32", "seq_len = 128");
    let id = session.command(assignment("job-long", 0, &[&info.data_plane_address], big, "", 3));
    assert_eq!(session.ack(id).await.error, "");
    let id = session.command(run_steps("job-long", 1, 1));
    assert_eq!(session.ack(id).await.error, "");
    // The worker's own clock: the test's task shares the worker's runtime.
    let mut sent = Vec::new();
    let report = loop {
        match session.next_any().await {
            Report::Heartbeat(beat) => sent.push(beat.sent_unix_ms),
            Report::StepReport(report) => break report,
            other => panic!("expected heartbeats then the step report, got {other:?}"),
        }
    };
    let gap = sent.windows(2).map(|w| w[1].saturating_sub(w[0])).max().unwrap_or(0);
    println!(
        "a {:.2} s step: {} heartbeats during it, longest gap {gap} ms",
        report.compute_seconds,
        sent.len()
    );
    assert!(report.compute_seconds > 0.3, "the step must outlast several heartbeats to test anything");
    let expected = (report.compute_seconds * 1000.0 / HEARTBEAT_MS as f64 / 2.0) as usize;
    assert!(
        sent.len() >= expected,
        "{} heartbeats during a {:.2} s step",
        sent.len(),
        report.compute_seconds
    );
    assert!(gap < 5 * HEARTBEAT_MS, "heartbeats stalled for {gap} ms during the step");
    token.cancel();
    finished(task).await.expect("a clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_coordinator_aborts_the_running_job_and_the_worker_comes_back() {
    let mut fake = Fake::start("127.0.0.1:0".parse().unwrap(), PROTOCOL_VERSION);
    let addr = fake.addr;
    let (token, task) = spawn_worker(options(fake.url()));
    let info = fake.registration().await;
    let mut session = fake.opened_session().await;

    // Rank 1 is this test; it never joins the all-reduce, so rank 0 waits in it.
    let rank1 = TcpRendezvous::bind("127.0.0.1:0").await.unwrap();
    let rank1_addr = rank1.local_addr().to_string();
    let peers = vec![info.data_plane_address.parse().unwrap(), rank1.local_addr()];
    let connecting = tokio::spawn(rank1.connect(1, peers, TcpOptions::new(8, secret(8))));
    let id =
        session.command(assignment("job-x", 0, &[&info.data_plane_address, &rank1_addr], config(3), "", 8));
    assert_eq!(session.ack(id).await.error, "");
    let peer = timeout(LIMIT, connecting).await.unwrap().unwrap().expect("rank 1 joined");
    let id = session.command(run_steps("job-x", 1, 3));
    assert_eq!(session.ack(id).await.error, "");
    sleep(Duration::from_millis(300)).await;

    drop(session);
    fake.kill();
    // The worker aborted its job locally: rank 1's links fail.
    let err = timeout(LIMIT, peer.recv(0, 1)).await.expect("rank 1 still waits").expect_err("rank 0 aborted");
    println!("rank 1 saw: {err}");

    let mut fake = Fake::start(addr, PROTOCOL_VERSION);
    let again = fake.registration().await;
    assert_eq!(again.data_plane_address, info.data_plane_address);
    let mut session = fake.opened_session().await;
    let id = session.command(assignment("job-y", 0, &[&again.data_plane_address], config(1), "", 9));
    assert_eq!(session.ack(id).await.error, "");
    let id = session.command(run_steps("job-y", 1, 1));
    assert_eq!(session.ack(id).await.error, "");
    reports_then_finished(&mut session, "job-y", 1).await;
    token.cancel();
    finished(task).await.expect("a clean exit");
}

/// Messages up to and including `JobFinished` (heartbeats skipped).
async fn until_finished(session: &mut FakeSession) -> Vec<Report> {
    let mut got = Vec::new();
    loop {
        let report = session.next().await;
        let done = matches!(report, Report::Finished(_));
        got.push(report);
        if done {
            return got;
        }
    }
}

/// The step reports and checkpoint shards among `reports`, each shard after its step's
/// report, `JobFinished` last.
fn steps_and_shards(reports: &[Report]) -> (Vec<StepReport>, Vec<CheckpointShard>) {
    let (mut steps, mut shards) = (Vec::new(), Vec::new());
    for report in reports {
        match report {
            Report::StepReport(r) => steps.push(r.clone()),
            Report::CheckpointShard(c) => {
                assert!(steps.iter().any(|r| r.step == c.step), "shard of step {} before its report", c.step);
                shards.push(c.clone());
            }
            Report::Finished(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(matches!(reports.last(), Some(Report::Finished(_))), "JobFinished last");
    (steps, shards)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_checkpoints_in_the_background_and_resumes_from_its_shards() {
    let mut fake = Fake::start("127.0.0.1:0".parse().unwrap(), PROTOCOL_VERSION);
    let (token, task) = spawn_worker(options(fake.url()));
    let info = fake.registration().await;
    let mut session = fake.opened_session().await;
    let me = info.data_plane_address.as_str();
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let (out, root) = (tmp.path().join("run"), tmp.path().join("checkpoints"));
    let toml = format!("{}\n[checkpoint]\ninterval = 1\n", config(3));
    let with_checkpoints = |job: &str, session: u64, resume: Option<ResumeFrom>| {
        let mut command = assignment(job, 0, &[me], toml.clone(), out.to_str().unwrap(), session);
        if let Command::Assignment(a) = &mut command {
            a.checkpoint_root = root.to_str().unwrap().into();
            a.resume = resume;
        }
        command
    };

    // Three steps, a checkpoint after each, every shard reported after its step's report
    // and before JobFinished.
    let id = session.command(with_checkpoints("job-1", 1, None));
    assert_eq!(session.ack(id).await.error, "");
    let id = session.command(run_steps("job-1", 1, 3));
    assert_eq!(session.ack(id).await.error, "");
    let (first, shards) = steps_and_shards(&until_finished(&mut session).await);
    assert_eq!(first.len(), 3);
    assert_eq!(shards.iter().map(|c| c.step).collect::<Vec<_>>(), [1, 2, 3]);
    for c in &shards {
        assert_eq!((c.job_id.as_str(), c.error.as_str()), ("job-1", ""));
        assert!(c.snapshot_seconds >= 0.0 && c.write_seconds > 0.0, "{c:?}");
        let path = root.join(format!("step-{:08}", c.step)).join(&c.file);
        assert_eq!(std::fs::metadata(&path).expect("the shard is on disk").len(), c.bytes);
    }

    // A crash after step 3 left a torn line; the job resumes from the checkpoint of step 1.
    let metrics = out.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&metrics).expect("metrics.jsonl");
    assert_eq!(text.lines().count(), 3);
    text.push_str("{\"step\": 4, \"lo");
    std::fs::write(&metrics, text).unwrap();
    let checkpoint = |c: &CheckpointShard| ResumeFrom {
        dir: root.join(format!("step-{:08}", c.step)).to_str().unwrap().into(),
        step: c.step,
        shards: vec![ShardFile { file: c.file.clone(), bytes: c.bytes, crc32: c.crc32 }],
    };
    let id = session.command(with_checkpoints("job-2", 2, Some(checkpoint(&shards[0]))));
    assert_eq!(session.ack(id).await.error, "");
    let id = session.command(run_steps("job-2", 1, 2));
    assert!(session.ack(id).await.error.contains("next step is 2"), "steps go on after the checkpoint's");
    let id = session.command(run_steps("job-2", 2, 2));
    assert_eq!(session.ack(id).await.error, "");
    let (again, shards_again) = steps_and_shards(&until_finished(&mut session).await);
    assert_eq!(shards_again.iter().map(|c| c.step).collect::<Vec<_>>(), [2, 3]);
    for (r, s) in again.iter().zip(&first[1..]) {
        // One rank is one process, and the restore is exact: the same bits.
        assert_eq!(
            (r.step, r.loss.to_bits(), r.grad_norm.to_bits()),
            (s.step, s.loss.to_bits(), s.grad_norm.to_bits())
        );
    }
    let steps: Vec<u64> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<StepRecord>(line).expect("whole records only").step)
        .collect();
    assert_eq!(steps, [1, 2, 3], "the records of step 1 kept, 2 and 3 written again, the torn line gone");

    // (Job 2 wrote the checkpoints of steps 2 and 3 again: those are the current ones.)
    // A shard failing its checksum refuses the assignment, naming the checkpoint.
    let mut corrupt = checkpoint(&shards_again[0]);
    corrupt.shards[0].crc32 ^= 1;
    let dir = corrupt.dir.clone();
    let id = session.command(with_checkpoints("job-3", 3, Some(corrupt)));
    let refused = session.ack(id).await;
    assert_eq!(refused.bad_checkpoint, dir);
    assert_eq!(refused.kind(), FailureKind::Checkpoint, "{refused:?}");
    assert!(
        refused.error.contains(&dir) && refused.error.contains(&shards_again[0].file),
        "{}",
        refused.error
    );
    assert!(
        matches!(session.next().await, Report::Error(e) if e.job_id == "job-3" && e.kind() == FailureKind::Checkpoint)
    );

    // A checkpoint past the run's steps is refused, but is not a bad checkpoint.
    let mut beyond = checkpoint(&shards_again[1]);
    beyond.step = 4;
    let id = session.command(with_checkpoints("job-4", 4, Some(beyond)));
    let refused = session.ack(id).await;
    assert!(refused.error.contains("`steps` = 3") && refused.bad_checkpoint.is_empty(), "{refused:?}");
    assert_eq!(refused.kind(), FailureKind::Assignment, "{refused:?}");
    assert!(matches!(session.next().await, Report::Error(_)));

    // At the run's last step, only the save is left.
    let id = session.command(with_checkpoints("job-5", 5, Some(checkpoint(&shards_again[1]))));
    assert_eq!(session.ack(id).await.error, "");
    match session.next().await {
        Report::Finished(done) => assert_eq!((done.job_id.as_str(), done.steps), ("job-5", 3)),
        other => panic!("expected JobFinished, got {other:?}"),
    }

    token.cancel();
    finished(task).await.expect("a clean exit");
}
