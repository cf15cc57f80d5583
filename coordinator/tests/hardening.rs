//! Admission and input hardening of the coordinator, over real gRPC on loopback: per-caller
//! rate limits on `SubmitJob` and `Register`, the retention of finished jobs (and its
//! agreement across a restart), job messages accepted only from the session holding the
//! rank in the current assignment epoch, and `INVALID_ARGUMENT` for bytes that are not
//! protobuf, sent raw through a tonic client with a codec that encodes nothing.
//!
//! The workers here are driven by hand, message by message: the tests are about what a
//! worker that is not honest sends, which a real worker cannot be made to do.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use flotilla_coordinator::service::auth::{BearerToken, ClientAuth, RateLimit, RateLimits};
use flotilla_coordinator::service::{CoordinatorConfig, CoordinatorHandle, JobRetention, serve};
use flotilla_coordinator::store::StateStore;
use flotilla_proto::PROTOCOL_VERSION;
use flotilla_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use flotilla_proto::v1::job_service_client::JobServiceClient;
use flotilla_proto::v1::{
    Ack, CancelJobRequest, CoordinatorMessage, FailureKind, GetJobRequest, Job, JobFinished, JobState,
    ListJobsRequest, ListWorkersRequest, SessionOpen, StepReport, SubmitJobRequest, WorkerError, WorkerInfo,
    WorkerMessage, coordinator_message, worker_message,
};
use prost::bytes::{Buf, BufMut};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

/// The longest any test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(20);

/// Nothing here refills within a test: one call per million seconds.
const NO_REFILL: f64 = 1e-6;

// ---------------------------------------------------------------------------------------
// Coordinator and clients

/// Long heartbeat timeouts: the hand-driven workers do not heartbeat, and no test runs
/// for as long as the timeout.
fn config(state: &Path) -> CoordinatorConfig {
    CoordinatorConfig {
        heartbeat_interval: Duration::from_secs(1),
        heartbeat_timeout: Duration::from_secs(60),
        ..CoordinatorConfig::new(state)
    }
}

async fn start(config: CoordinatorConfig) -> CoordinatorHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve(config, listener).await.expect("the coordinator starts")
}

async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connects")
}

async fn jobs(addr: SocketAddr) -> JobServiceClient<Channel> {
    JobServiceClient::new(channel(addr).await)
}

fn info(worker_id: &str) -> WorkerInfo {
    WorkerInfo {
        worker_id: worker_id.into(),
        host: "test-host".into(),
        cores: 2,
        data_plane_address: "127.0.0.1:40000".into(),
        protocol_version: PROTOCOL_VERSION,
        ..Default::default()
    }
}

fn job_request(name: &str, config_toml: &str) -> SubmitJobRequest {
    SubmitJobRequest {
        name: name.into(),
        config_toml: config_toml.into(),
        workers: 1,
        output_dir: String::new(),
        resume_from: String::new(),
    }
}

/// A one-worker data-parallel job of `steps` steps that restarts once.
fn one_worker_job(steps: u64) -> String {
    format!(
        "seed = 0\nsteps = {steps}\nbatch_size = 4\nseq_len = 8\n\n[model]\npreset = \"tiny\"\n\n\
         [recovery]\nmax_restarts = 1\nbackoff_ms = 10\n"
    )
}

async fn get(client: &mut JobServiceClient<Channel>, job_id: &str) -> Job {
    client.get_job(GetJobRequest { job_id: job_id.into() }).await.expect("the job exists").into_inner()
}

async fn listed(client: &mut JobServiceClient<Channel>) -> Vec<String> {
    let jobs = client.list_jobs(ListJobsRequest {}).await.expect("the jobs are listed").into_inner().jobs;
    jobs.into_iter().map(|job| job.job_id).collect()
}

async fn wait_for_state(client: &mut JobServiceClient<Channel>, job_id: &str, state: JobState) -> Job {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let job = get(client, job_id).await;
        if job.state() == state {
            return job;
        }
        assert!(tokio::time::Instant::now() < deadline, "job {job_id} never reached {state:?}: {job:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------
// A worker driven by hand

struct HandWorker {
    tx: mpsc::Sender<WorkerMessage>,
    inbound: Streaming<CoordinatorMessage>,
    // Keeps the connection open as long as the worker.
    _client: CoordinatorServiceClient<Channel>,
}

impl HandWorker {
    async fn start(addr: SocketAddr, worker_id: &str) -> HandWorker {
        let mut client = CoordinatorServiceClient::new(channel(addr).await);
        let registration = client.register(info(worker_id)).await.expect("registration").into_inner();
        let (tx, rx) = mpsc::channel(64);
        let open = SessionOpen { worker_id: registration.worker_id, session_id: registration.session_id };
        tx.send(WorkerMessage { body: Some(worker_message::Body::Open(open)) }).await.unwrap();
        let inbound = client.session(ReceiverStream::new(rx)).await.expect("the session opens").into_inner();
        HandWorker { tx, inbound, _client: client }
    }

    async fn send(&self, body: worker_message::Body) {
        self.tx.send(WorkerMessage { body: Some(body) }).await.expect("the session is open");
    }

    async fn ack(&self, command_id: u64) {
        self.send(worker_message::Body::Ack(Ack { command_id, ..Ack::default() })).await;
    }

    /// Waits for a command matching `pick`; returns its id and what `pick` took.
    async fn expect<T>(&mut self, pick: impl Fn(coordinator_message::Body) -> Option<T>) -> (u64, T) {
        loop {
            let command = tokio::time::timeout(PATIENCE, self.inbound.message())
                .await
                .expect("a command in time")
                .expect("the session is open")
                .expect("the session is open");
            if let Some(found) = command.body.and_then(&pick) {
                return (command.command_id, found);
            }
        }
    }

    /// Waits for an assignment and accepts it, then for `RunSteps`; returns the
    /// assignment's epoch and the first step to run.
    async fn accept_and_run(&mut self) -> (u64, u64) {
        let (id, epoch) = self
            .expect(|body| match body {
                coordinator_message::Body::Assignment(a) => Some(a.epoch),
                _ => None,
            })
            .await;
        self.ack(id).await;
        let (_, first) = self
            .expect(|body| match body {
                coordinator_message::Body::RunSteps(run) => Some(run.first_step),
                _ => None,
            })
            .await;
        (epoch, first)
    }

    async fn report(&self, job_id: &str, epoch: u64, step: u64) {
        let report =
            StepReport { job_id: job_id.into(), epoch, step, loss: 3.0, tokens: 32, ..StepReport::default() };
        self.send(worker_message::Body::StepReport(report)).await;
    }

    async fn finish(&self, job_id: &str, epoch: u64, steps: u64) {
        self.send(worker_message::Body::Finished(JobFinished { job_id: job_id.into(), steps, epoch })).await;
    }
}

/// Lets the coordinator handle what was sent before (the messages of one session are
/// handled in order, and an answer to a later request comes after them).
async fn settle(client: &mut JobServiceClient<Channel>, job_id: &str) -> Job {
    tokio::time::sleep(Duration::from_millis(100)).await;
    get(client, job_id).await
}

// ---------------------------------------------------------------------------------------
// Rate limits

#[tokio::test]
async fn submissions_and_registrations_over_the_rate_limit_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let limits = RateLimits {
        submit: Some(RateLimit { rate: NO_REFILL, burst: 2 }),
        register: Some(RateLimit { rate: NO_REFILL, burst: 1 }),
    };
    let coordinator = start(CoordinatorConfig { rate_limits: limits, ..config(dir.path()) }).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let job = one_worker_job(2);
    for name in ["first", "second"] {
        client.submit_job(job_request(name, &job)).await.expect("within the burst");
    }
    let refused = client.submit_job(job_request("third", &job)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("SubmitJob refused: peer 127.0.0.1"), "{}", refused.message());
    assert!(refused.message().contains("retry in"), "{}", refused.message());
    assert_eq!(listed(&mut client).await.len(), 2, "the refused submission created no job");
    // Other RPCs are not limited.
    client.list_jobs(ListJobsRequest {}).await.expect("not limited");

    let mut workers = CoordinatorServiceClient::new(channel(addr).await);
    workers.register(info("w-1")).await.expect("within the burst");
    let refused = workers.register(info("w-2")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().starts_with("Register refused"), "{}", refused.message());
    let members = client.list_workers(ListWorkersRequest {}).await.unwrap().into_inner().workers;
    assert_eq!(members.iter().map(|w| w.worker_id.as_str()).collect::<Vec<_>>(), ["w-1"]);
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn with_tokens_each_token_has_its_own_limit() {
    const FIRST: &str = "admin-one-0123456789abcdef";
    const SECOND: &str = "admin-two-0123456789abcdef";
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("admin {FIRST}\nadmin {SECOND}\n")).unwrap();
    let limits = RateLimits { submit: Some(RateLimit { rate: NO_REFILL, burst: 1 }), register: None };
    let coordinator = start(CoordinatorConfig {
        rate_limits: limits,
        token_file: Some(tokens),
        ..config(&dir.path().join("state"))
    })
    .await;
    let addr = coordinator.local_addr();
    let as_admin = |token: &str| ClientAuth { tls: None, token: Some(BearerToken::new(token).unwrap()) };
    let (first, second) = (as_admin(FIRST), as_admin(SECOND));
    let connect = |auth: ClientAuth| async move {
        let channel = auth.endpoint(&format!("http://{addr}")).unwrap().connect().await.unwrap();
        JobServiceClient::with_interceptor(channel, auth.interceptor())
    };
    let mut one = connect(first).await;
    let mut two = connect(second).await;
    let job = one_worker_job(2);
    one.submit_job(job_request("one", &job)).await.expect("the first token's burst");
    let refused = one.submit_job(job_request("one-again", &job)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("this admin token"), "{}", refused.message());
    assert!(!refused.message().contains(FIRST), "the message never shows the token");
    two.submit_job(job_request("two", &job)).await.expect("the second token has its own bucket");
    let jobs = one.list_jobs(ListJobsRequest {}).await.unwrap().into_inner().jobs;
    assert_eq!(jobs.iter().map(|j| j.name.as_str()).collect::<Vec<_>>(), ["one", "two"]);
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn rate_limit_settings_are_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let limits = RateLimits { submit: Some(RateLimit { rate: 0.0, burst: 1 }), register: None };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused =
        serve(CoordinatorConfig { rate_limits: limits, ..config(dir.path()) }, listener).await.unwrap_err();
    assert!(refused.to_string().contains("rate_limits.submit"), "{refused}");
}

// ---------------------------------------------------------------------------------------
// Retention

async fn submit_and_cancel(client: &mut JobServiceClient<Channel>, name: &str) -> String {
    let job = client.submit_job(job_request(name, &one_worker_job(2))).await.unwrap().into_inner();
    let cancel = CancelJobRequest { job_id: job.job_id.clone(), reason: String::new() };
    client.cancel_job(cancel).await.expect("a pending job cancels");
    job.job_id
}

async fn wait_for_listed(client: &mut JobServiceClient<Channel>, expected: &[String]) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = listed(client).await;
        if now == expected {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "ListJobs shows {now:?}, not {expected:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn keys<S: StateStore>(store: &S) -> usize {
    store.range("jobs/").await.unwrap().len() + store.range("events/").await.unwrap().len()
}

#[tokio::test]
async fn finished_jobs_beyond_the_retention_are_removed_and_a_restart_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let retained = || CoordinatorConfig {
        retention: JobRetention { max_jobs: Some(2), max_age: None },
        compaction_interval: Duration::from_millis(20),
        history_retention: 16,
        ..config(dir.path())
    };
    let coordinator = start(retained()).await;
    let mut client = jobs(coordinator.local_addr()).await;
    // The oldest job never ends (no workers): it is never removed.
    let pending = client.submit_job(job_request("waits", &one_worker_job(2))).await.unwrap().into_inner();
    let mut ended = Vec::new();
    for i in 0..5 {
        ended.push(submit_and_cancel(&mut client, &format!("ended-{i}")).await);
    }
    let expected = vec![pending.job_id.clone(), ended[3].clone(), ended[4].clone()];
    wait_for_listed(&mut client, &expected).await;
    let bound = keys(coordinator.store()).await;
    let removed = client.get_job(GetJobRequest { job_id: ended[0].clone() }).await.unwrap_err();
    assert_eq!(removed.code(), Code::NotFound);
    assert_eq!(get(&mut client, &pending.job_id).await.state(), JobState::Pending);

    // Many more: the store stays at the same size.
    for i in 5..25 {
        ended.push(submit_and_cancel(&mut client, &format!("ended-{i}")).await);
    }
    let expected = vec![pending.job_id.clone(), ended[23].clone(), ended[24].clone()];
    wait_for_listed(&mut client, &expected).await;
    assert_eq!(keys(coordinator.store()).await, bound, "the records and events of three jobs");
    coordinator.shutdown().await.unwrap();

    // A coordinator on the same store sees the same jobs.
    let coordinator = start(retained()).await;
    let mut client = jobs(coordinator.local_addr()).await;
    assert_eq!(listed(&mut client).await, expected);
    coordinator.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Job messages: only the rank's session, only the current epoch

#[tokio::test]
async fn a_worker_outside_the_job_cannot_report_its_steps() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    // Ranks go to the smallest ids: "a" runs the job, "z" is registered and idle.
    let mut holder = HandWorker::start(addr, "a").await;
    let intruder = HandWorker::start(addr, "z").await;
    let job = client.submit_job(job_request("one", &one_worker_job(2))).await.unwrap().into_inner();
    let (epoch, first) = holder.accept_and_run().await;
    assert_eq!(first, 1);

    for step in 1..=2 {
        intruder.report(&job.job_id, epoch, step).await;
    }
    intruder.finish(&job.job_id, epoch, 2).await;
    let job_now = settle(&mut client, &job.job_id).await;
    assert_eq!((job_now.state(), job_now.steps_done), (JobState::Running, 0), "{job_now:?}");

    // The rank's own worker is heard.
    holder.report(&job.job_id, epoch, 1).await;
    holder.report(&job.job_id, epoch, 2).await;
    holder.finish(&job.job_id, epoch, 2).await;
    let done = wait_for_state(&mut client, &job.job_id, JobState::Succeeded).await;
    assert_eq!(done.steps_done, 2);
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn reports_of_an_earlier_assignment_epoch_are_refused_after_a_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let mut worker = HandWorker::start(addr, "a").await;
    let job = client.submit_job(job_request("recovers", &one_worker_job(3))).await.unwrap().into_inner();
    let (old, _) = worker.accept_and_run().await;
    worker.report(&job.job_id, old, 1).await;
    // The step fails: the job recovers and assigns the worker again, with a new epoch.
    let error = WorkerError {
        job_id: job.job_id.clone(),
        step: 2,
        message: "boom".into(),
        kind: FailureKind::Compute.into(),
        epoch: old,
    };
    worker.send(worker_message::Body::Error(error)).await;
    let (abort, ()) =
        worker.expect(|body| matches!(body, coordinator_message::Body::Abort(_)).then_some(())).await;
    worker.ack(abort).await;
    let (new, first) = worker.accept_and_run().await;
    assert!(new > old, "epochs increase: {old} then {new}");
    assert_eq!(first, 1, "no checkpoint: the attempt starts over");

    // A whole run's reports of the earlier epoch: none is taken.
    for step in 1..=3 {
        worker.report(&job.job_id, old, step).await;
    }
    worker.finish(&job.job_id, old, 3).await;
    let stale_error = WorkerError {
        job_id: job.job_id.clone(),
        step: 3,
        message: "stale".into(),
        kind: FailureKind::Compute.into(),
        epoch: old,
    };
    worker.send(worker_message::Body::Error(stale_error)).await;
    let job_now = settle(&mut client, &job.job_id).await;
    assert_eq!(job_now.state(), JobState::Running, "{job_now:?}");
    assert_eq!((job_now.steps_done, job_now.restarts), (1, 1), "{job_now:?}");

    for step in 1..=3 {
        worker.report(&job.job_id, new, step).await;
    }
    worker.finish(&job.job_id, new, 3).await;
    let done = wait_for_state(&mut client, &job.job_id, JobState::Succeeded).await;
    assert_eq!(done.steps_done, 3);
    coordinator.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Malformed protobuf

/// Sends its bytes as they are, and takes the answer's bytes as they are.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawBytes;

impl Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }

    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

/// Not protobuf: field 1 announced with 5 bytes, 1 given; a truncated varint; a string
/// field that is not UTF-8.
const GARBAGE: [&[u8]; 3] = [&[0x0a, 0x05, 0x01], &[0x08, 0xff], &[0x0a, 0x02, 0xff, 0xfe]];

async fn raw_unary(addr: SocketAddr, path: &'static str, bytes: &[u8]) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel(addr).await);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(path);
    grpc.unary(tonic::Request::new(bytes.to_vec()), path, RawCodec).await.expect_err("garbage is refused")
}

#[tokio::test]
async fn bytes_that_are_not_protobuf_are_invalid_argument_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    for bytes in GARBAGE {
        for (path, message) in [
            ("/flotilla.v1.JobService/SubmitJob", "SubmitJobRequest"),
            ("/flotilla.v1.CoordinatorService/Register", "WorkerInfo"),
            ("/flotilla.v1.JobService/GetJob", "GetJobRequest"),
        ] {
            let status = raw_unary(addr, path, bytes).await;
            assert_eq!(status.code(), Code::InvalidArgument, "{path} {bytes:?}: {status:?}");
            assert!(status.message().contains(message), "{path}: {}", status.message());
        }
        // The session's first message.
        let mut grpc = tonic::client::Grpc::new(channel(addr).await);
        grpc.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static("/flotilla.v1.CoordinatorService/Session");
        let first = tokio_stream::iter([bytes.to_vec()]);
        let status = grpc.streaming(tonic::Request::new(first), path, RawCodec).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "Session {bytes:?}: {status:?}");
        assert!(status.message().contains("WorkerMessage"), "{}", status.message());
    }
    // Nothing was created, and the coordinator serves on.
    let mut client = jobs(addr).await;
    assert!(listed(&mut client).await.is_empty());
    assert!(client.list_workers(ListWorkersRequest {}).await.unwrap().into_inner().workers.is_empty());
    coordinator.shutdown().await.unwrap();
}
