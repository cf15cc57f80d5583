//! Admission over real gRPC on loopback: what a submission may name and ask for, and how
//! jobs that cannot run now wait. Paths must resolve under the coordinator's allowed roots
//! (`..`, absolute paths outside, symlinks leading out are refused, naming the field and
//! the path, with the same words whether or not the path exists); every size in a config
//! is bounded; a job's estimated memory per worker is refused above the configured cap and
//! kept off workers that report less; a job that cannot be placed now does not hold back
//! later jobs that can (backfill).
//!
//! The workers are minimal fakes (register, heartbeat, acknowledge assignments): these
//! tests are about what the coordinator accepts and where it places jobs, not training.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_coordinator::service::{CoordinatorConfig, CoordinatorHandle, bind_and_serve};
use flotilla_proto::PROTOCOL_VERSION;
use flotilla_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use flotilla_proto::v1::job_service_client::JobServiceClient;
use flotilla_proto::v1::{
    Ack, CoordinatorMessage, Device, GetJobRequest, Heartbeat, JobState, ListWorkersRequest, SessionOpen,
    SubmitJobRequest, WorkerInfo, WorkerMessage, coordinator_message, worker_message,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

const INTERVAL: Duration = Duration::from_millis(50);
/// The longest any test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(20);

fn config(state: &Path, roots: Vec<PathBuf>) -> CoordinatorConfig {
    CoordinatorConfig {
        heartbeat_interval: INTERVAL,
        heartbeat_timeout: Duration::from_secs(5),
        allowed_roots: roots,
        ..CoordinatorConfig::new(state)
    }
}

async fn start(config: CoordinatorConfig) -> CoordinatorHandle {
    bind_and_serve(config).await.expect("the coordinator starts")
}

async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connect")
}

async fn jobs(addr: SocketAddr) -> JobServiceClient<Channel> {
    JobServiceClient::new(channel(addr).await)
}

/// A data-parallel run of the tiny model; `extra` goes at the top level, `tables` after
/// the `[model]` table.
fn run(batch_size: u64, extra: &str, tables: &str) -> String {
    format!(
        "steps = 3\nbatch_size = {batch_size}\nseq_len = 16\n{extra}\n[model]\npreset = \"tiny\"\n{tables}"
    )
}

fn request(config_toml: String, workers: u32) -> SubmitJobRequest {
    SubmitJobRequest { name: "t".into(), config_toml, workers, ..SubmitJobRequest::default() }
}

/// Submits and expects `INVALID_ARGUMENT`; returns the message.
async fn refused(client: &mut JobServiceClient<Channel>, request: SubmitJobRequest) -> String {
    let status = client.submit_job(request).await.expect_err("the job is refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status.message().to_string()
}

async fn accepted(client: &mut JobServiceClient<Channel>, request: SubmitJobRequest) -> String {
    client.submit_job(request).await.expect("the job is accepted").into_inner().job_id
}

async fn job_state(client: &mut JobServiceClient<Channel>, job_id: &str) -> JobState {
    client.get_job(GetJobRequest { job_id: job_id.into() }).await.unwrap().into_inner().state()
}

async fn wait_for_state(client: &mut JobServiceClient<Channel>, job_id: &str, want: JobState) {
    let deadline = Instant::now() + PATIENCE;
    while job_state(client, job_id).await != want {
        assert!(Instant::now() < deadline, "job {job_id} never reached {want:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Fake workers

/// A registered worker with an open session that heartbeats and acknowledges every
/// assignment; the assignments' job ids arrive on `assigned`.
struct FakeWorker {
    assigned: mpsc::UnboundedReceiver<String>,
    task: JoinHandle<()>,
}

impl FakeWorker {
    /// Registers `id` reporting `memory` bytes of CPU memory (0: none reported).
    async fn start(addr: SocketAddr, id: &str, memory: u64) -> FakeWorker {
        let mut client = CoordinatorServiceClient::new(channel(addr).await);
        let info = WorkerInfo {
            worker_id: id.into(),
            host: "test-host".into(),
            cores: 1,
            devices: vec![Device { kind: "cpu".into(), index: 0, name: "cpu".into(), memory_bytes: memory }],
            data_plane_address: "127.0.0.1:40000".into(),
            protocol_version: PROTOCOL_VERSION,
            node_id: format!("node-{id}"),
            ..WorkerInfo::default()
        };
        let registration = client.register(info).await.expect("registration").into_inner();
        let (tx, rx) = mpsc::channel(64);
        let open = SessionOpen { worker_id: registration.worker_id, session_id: registration.session_id };
        tx.send(WorkerMessage { body: Some(worker_message::Body::Open(open)) }).await.unwrap();
        let inbound = client.session(ReceiverStream::new(rx)).await.expect("the session opens").into_inner();
        let (seen, assigned) = mpsc::unbounded_channel();
        let task = tokio::spawn(serve(client, tx, inbound, seen));
        FakeWorker { assigned, task }
    }

    async fn next_assignment(&mut self) -> String {
        tokio::time::timeout(PATIENCE, self.assigned.recv()).await.expect("an assignment in time").unwrap()
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    _client: CoordinatorServiceClient<Channel>,
    tx: mpsc::Sender<WorkerMessage>,
    mut inbound: tonic::Streaming<CoordinatorMessage>,
    seen: mpsc::UnboundedSender<String>,
) {
    let mut ticker = tokio::time::interval(INTERVAL);
    let mut sequence = 0;
    loop {
        let reply = tokio::select! {
            _ = ticker.tick() => {
                sequence += 1;
                worker_message::Body::Heartbeat(Heartbeat { sequence, sent_unix_ms: 0 })
            }
            command = inbound.message() => {
                let Ok(Some(command)) = command else { return };
                if let Some(coordinator_message::Body::Assignment(a)) = &command.body {
                    let _ = seen.send(a.job_id.clone());
                }
                worker_message::Body::Ack(Ack { command_id: command.command_id, ..Ack::default() })
            }
        };
        if tx.send(WorkerMessage { body: Some(reply) }).await.is_err() {
            return;
        }
    }
}

/// Which job each worker holds, by worker id (after every message sent before it).
async fn holders(addr: SocketAddr) -> Vec<(String, String)> {
    let mut client = jobs(addr).await;
    let listed = client.list_workers(ListWorkersRequest {}).await.unwrap().into_inner();
    listed.workers.into_iter().map(|w| (w.worker_id, w.job_id)).collect()
}

// ---------------------------------------------------------------------------------------
// Paths

#[tokio::test]
async fn paths_outside_the_allowed_roots_are_refused_naming_the_field_and_path() {
    let state = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
    let coordinator = start(config(state.path(), vec![root.path().to_path_buf()])).await;
    let mut client = jobs(coordinator.local_addr()).await;
    let inside = |p: &str| root.path().join(p).display().to_string();
    let out = |dir: String| SubmitJobRequest { output_dir: dir, ..request(run(4, "", ""), 1) };

    // `..`, even one that would come back inside.
    let message = refused(&mut client, out(format!("{}/sub/../x", root.path().display()))).await;
    assert!(message.starts_with("invalid output_dir: "), "{message}");
    assert!(message.contains("contains `..`") && message.contains("sub/../x"), "{message}");
    let message = refused(&mut client, out("../../elsewhere".into())).await;
    assert!(message.contains("`../../elsewhere` contains `..`"), "{message}");
    // Absolute outside, and a symlink inside the root that leads out.
    let message = refused(&mut client, out(outside.path().join("run").display().to_string())).await;
    assert!(message.starts_with("invalid output_dir: ") && message.contains("not under the allowed roots"));
    let message = refused(&mut client, out(inside("link/run"))).await;
    assert!(message.contains("link/run") && message.contains("not under the allowed roots"), "{message}");
    // A dangling symlink would be followed by creating the directory.
    std::os::unix::fs::symlink(outside.path().join("absent"), root.path().join("dangling")).unwrap();
    let message = refused(&mut client, out(inside("dangling"))).await;
    assert!(message.contains("not under the allowed roots"), "{message}");

    // The run's data, tokenizer and init_from.
    let passwd = run(4, "", "[data]\nkind = \"text\"\npath = \"/etc/passwd\"\n");
    let message = refused(&mut client, request(passwd, 1)).await;
    assert!(message.starts_with("invalid data.path: `/etc/passwd` is not under"), "{message}");
    let tokenizer = format!(
        "[data]\nkind = \"text\"\npath = \"{}\"\ntokenizer = \"{}/t.json\"\n",
        inside("corpus.txt"),
        outside.path().display()
    );
    let message = refused(&mut client, request(run(4, "", &tokenizer), 1)).await;
    assert!(message.starts_with("invalid data.tokenizer: "), "{message}");
    let indexed = format!("[data]\nkind = \"indexed\"\npath = [\"{}\"]\n", inside("link/ds"));
    let message = refused(&mut client, request(run(4, "", &indexed), 1)).await;
    assert!(message.starts_with("invalid data.path: ") && message.contains("link/ds.idx"), "{message}");
    let init = format!("init_from = \"{}\"", outside.path().display());
    let message = refused(&mut client, request(run(4, &init, ""), 1)).await;
    assert!(message.starts_with("invalid init_from: "), "{message}");

    // Inside the roots is accepted (the directory need not exist yet).
    accepted(&mut client, out(inside("runs/a"))).await;
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn resume_from_outside_the_roots_does_not_reveal_whether_it_exists() {
    let state = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir(outside.path().join("present")).unwrap();
    let coordinator = start(config(state.path(), vec![root.path().to_path_buf()])).await;
    let mut client = jobs(coordinator.local_addr()).await;
    let resume = |dir: &str| SubmitJobRequest {
        resume_from: outside.path().join(dir).display().to_string(),
        ..request(run(4, "", ""), 1)
    };
    let present = refused(&mut client, resume("present")).await;
    let absent = refused(&mut client, resume("absent")).await;
    assert!(present.starts_with("invalid resume_from: "), "{present}");
    assert_eq!(present.replace("present", "X"), absent.replace("absent", "X"));
    // Inside the roots, what is wrong with the checkpoint may be said.
    let inside =
        SubmitJobRequest { resume_from: root.path().display().to_string(), ..request(run(4, "", ""), 1) };
    let message = refused(&mut client, inside).await;
    assert!(message.starts_with("invalid resume_from: not a committed checkpoint"), "{message}");
    coordinator.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Limits

#[tokio::test]
async fn oversized_configs_are_refused_naming_the_field_and_the_bound() {
    let state = tempfile::tempdir().unwrap();
    let coordinator = start(config(state.path(), vec![state.path().to_path_buf()])).await;
    let mut client = jobs(coordinator.local_addr()).await;
    let cases = [
        (run(4, "", "hidden_size = 1000000000000\n"), 1, "hidden_size", "above the limit of 65536"),
        (run(100_000_000_000, "", ""), 1, "invalid batch_size: ", "above the limit of 1048576"),
        (run(4, "", "num_hidden_layers = 100000\n"), 1, "num_hidden_layers", "above the limit"),
        (run(4, "", "n_routed_experts = 1000000\n"), 1, "n_routed_experts", "above the limit"),
        (run(4, "", "vocab_size = 100000000\n"), 1, "vocab_size", "above the limit"),
        (run(4, "", "").replace("steps = 3\n", "steps = 10000000000000\n"), 1, "invalid steps: ", "limit"),
        (run(4096, "", "").replace("seq_len = 16", "seq_len = 1000000"), 1, "seq_len", "max_position"),
        (run(65_536, "", ""), 65_536, "invalid workers: ", "limit of 4096 workers per job"),
        (run(4, "", "[data]\nkind = \"synthetic\"\ntokens = 100000000000\n"), 1, "data.tokens", "limit"),
        (run(4, "threads = 100000000", ""), 1, "invalid threads: ", "above the limit"),
    ];
    for (config_toml, workers, field, bound) in cases {
        let message = refused(&mut client, request(config_toml.clone(), workers)).await;
        assert!(message.contains(field) && message.contains(bound), "{config_toml}: {message}");
    }
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_job_above_the_per_worker_memory_cap_is_refused_with_the_estimate() {
    let state = tempfile::tempdir().unwrap();
    let capped = CoordinatorConfig {
        max_worker_memory: Some(64 << 10),
        ..config(state.path(), vec![state.path().to_path_buf()])
    };
    let coordinator = start(capped).await;
    let mut client = jobs(coordinator.local_addr()).await;
    let message = refused(&mut client, request(run(4, "", ""), 1)).await;
    assert!(message.starts_with("invalid memory: the job needs "), "{message}");
    assert!(message.contains("per-worker cap of 64.0 KiB"), "{message}");
    coordinator.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Placement

#[tokio::test]
async fn workers_too_small_for_a_job_are_skipped() {
    let state = tempfile::tempdir().unwrap();
    let coordinator = start(config(state.path(), vec![state.path().to_path_buf()])).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let job = accepted(&mut client, request(run(4, "", ""), 1)).await;
    let _small = FakeWorker::start(addr, "w-a-small", 4 << 10).await;
    // Listing goes through the cluster actor after the session opened and scheduled.
    assert_eq!(holders(addr).await, vec![("w-a-small".into(), String::new())]);
    assert_eq!(job_state(&mut client, &job).await, JobState::Pending);
    let mut big = FakeWorker::start(addr, "w-b-big", 64 << 30).await;
    assert_eq!(big.next_assignment().await, job);
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_job_that_cannot_be_placed_does_not_block_later_ones() {
    let state = tempfile::tempdir().unwrap();
    let coordinator = start(config(state.path(), vec![state.path().to_path_buf()])).await;
    let addr = coordinator.local_addr();
    let mut client = jobs(addr).await;
    let mut worker = FakeWorker::start(addr, "w-a", 0).await;
    let big = accepted(&mut client, request(run(4, "", ""), 2)).await;
    let small = accepted(&mut client, request(run(4, "", ""), 1)).await;
    let later = accepted(&mut client, request(run(4, "", ""), 1)).await;
    assert_eq!(worker.next_assignment().await, small);
    wait_for_state(&mut client, &small, JobState::Running).await;
    assert_eq!(job_state(&mut client, &big).await, JobState::Pending);
    // Queue order among the jobs that fit: `later` waits for the worker `small` holds.
    assert_eq!(job_state(&mut client, &later).await, JobState::Pending);
    assert_eq!(holders(addr).await, vec![("w-a".into(), small.clone())]);
    // A second idle worker still cannot hold the big job (w-a is busy): `later` takes it.
    let mut second = FakeWorker::start(addr, "w-b", 0).await;
    assert_eq!(second.next_assignment().await, later);
    assert_eq!(job_state(&mut client, &big).await, JobState::Pending);
    coordinator.shutdown().await.unwrap();
}
