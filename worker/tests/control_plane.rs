//! The real agent against the real coordinator, in one process: the coordinator
//! (`serve_with_incoming`, with a `FileStore` in a temporary directory) accepts the
//! connections of [`Connector::in_process`], and every worker is [`run_worker_with`] over
//! it, so neither end is a stand-in: the protocol, the failure kinds and the recovery are
//! the ones that run in production. The data plane is loopback TCP, passed in as
//! [`TcpDataPlane`] (or wrapped, to watch the agent use the data plane it was given).
//!
//! What the scripted fakes of `tests/agent.rs` and the coordinator's `tests/service.rs`
//! cannot show is shown here: a committed checkpoint corrupted on disk is refused by the
//! real worker with `FAILURE_KIND_CHECKPOINT`, and the real coordinator falls back, on that
//! kind, to the checkpoint before it; the steps redone report the losses of the first time
//! bit for bit; and a job runs through the data plane passed to [`run_worker_with`],
//! reporting the losses of the same ranks stepped over loopback TCP directly, bit for bit.
//!
//! Every wait is under a timeout, so a hang fails the test instead of stalling the suite.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flotilla_coordinator::checkpoint::{list_committed, read_manifest};
use flotilla_coordinator::service::{CoordinatorConfig, CoordinatorHandle, serve_with_incoming};
use flotilla_coordinator::store::FileStore;
use flotilla_model::train::Trainer;
use flotilla_proto::v1::job_service_client::JobServiceClient;
use flotilla_proto::v1::{
    GetJobRequest, Job, JobEvent, JobState, SubmitJobRequest, WatchJobRequest, job_event,
};
use flotilla_worker::agent::{
    AbortFn, AgentError, Connector, DataPlane, Rendezvous, TcpDataPlane, WorkerOptions, run_worker_with,
};
use flotilla_worker::comm::{
    CommError, DataPlaneSecret, TcpCommunicator, TcpOptions, TcpRendezvous, loopback_group,
};
use flotilla_worker::dp::data_parallel_step;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::Channel;

/// Generous: the machine running the suite may be small and shared.
const LIMIT: Duration = Duration::from_secs(120);
/// Bytes buffered each way in one in-process connection.
const LINK_BUFFER: usize = 1 << 20;

/// A real coordinator and the connector its workers and clients reach it through.
struct Cluster {
    coordinator: CoordinatorHandle<FileStore>,
    connector: Connector,
    jobs: JobServiceClient<Channel>,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let state = dir.path().join("state");
        let store = FileStore::open(&state).await.expect("the store opens");
        let config = CoordinatorConfig {
            heartbeat_interval: Duration::from_millis(50),
            heartbeat_timeout: Duration::from_millis(500),
            allowed_roots: vec![dir.path().to_path_buf()],
            ..CoordinatorConfig::new(&state)
        };
        let (connector, incoming) = Connector::in_process(LINK_BUFFER);
        let addr = "127.0.0.1:0".parse().expect("an address");
        let coordinator =
            serve_with_incoming(config, store, incoming, addr).await.expect("the coordinator starts");
        let channel = connector.connect().await.expect("a client channel");
        Cluster { coordinator, connector, jobs: JobServiceClient::new(channel), dir }
    }

    /// Starts the real agent as `worker_id`, connected in process, on the TCP data plane.
    fn worker(&self, worker_id: &str) -> Worker {
        self.worker_on(worker_id, TcpDataPlane)
    }

    /// Starts the real agent as `worker_id`, connected in process, on `data_plane`.
    fn worker_on(&self, worker_id: &str, data_plane: impl DataPlane) -> Worker {
        let mut options = WorkerOptions::new("in-process");
        options.worker_id = Some(worker_id.into());
        options.allowed_roots = vec![self.dir.path().to_path_buf()];
        options.threads = Some(1);
        options.initial_backoff = Duration::from_millis(20);
        options.max_backoff = Duration::from_millis(200);
        options.rendezvous_timeout = Duration::from_secs(30);
        let token = CancellationToken::new();
        let task = tokio::spawn(run_worker_with(options, self.connector.clone(), data_plane, token.clone()));
        Worker { token, task }
    }

    async fn job(&mut self, job_id: &str) -> Job {
        let request = GetJobRequest { job_id: job_id.into() };
        self.jobs.get_job(request).await.expect("GetJob").into_inner()
    }
}

struct Worker {
    token: CancellationToken,
    task: JoinHandle<Result<(), AgentError>>,
}

impl Worker {
    /// Stops the worker as a process exit would: its session and job end.
    async fn stop(self) {
        self.token.cancel();
        let ended = timeout(LIMIT, self.task).await.expect("the worker stops").expect("no panic");
        ended.expect("a clean exit");
    }
}

async fn next_event(events: &mut Streaming<JobEvent>) -> Option<JobEvent> {
    timeout(LIMIT, events.message()).await.expect("an event within the limit").expect("the watch stream")
}

/// Records a step's loss (1-based steps) from a `Step` event; a step run again after a
/// recovery must report the very bits it reported before.
fn note_loss(event: &JobEvent, losses: &mut [Option<f64>]) {
    if let Some(job_event::Event::Step(s)) = &event.event {
        let slot = &mut losses[(s.step - 1) as usize];
        if let Some(before) = slot {
            assert_eq!(
                before.to_bits(),
                s.loss.to_bits(),
                "step {} redone: {before} then {}",
                s.step,
                s.loss
            );
        }
        *slot = Some(s.loss);
    }
}

/// Flips one byte in the middle of the first shard of the checkpoint in `dir`.
fn corrupt(dir: &Path) {
    let manifest = read_manifest(dir).expect("a committed checkpoint");
    let shard = dir.join(&manifest.shards[0].file);
    let mut bytes = std::fs::read(&shard).expect("the shard");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&shard, bytes).expect("the shard rewritten");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_checkpoint_is_refused_by_kind_and_the_one_before_resumes() {
    const STEPS: u64 = 60;
    let mut cluster = Cluster::start().await;
    let w0 = cluster.worker("w0");
    let w1 = cluster.worker("w1");
    let config_toml = format!(
        "{}\n[checkpoint]\ninterval = 2\nkeep = 4\n\n[recovery]\nmax_restarts = 2\nbackoff_ms = 10\n",
        common::small_run(STEPS)
    );
    let out = cluster.dir.path().join("out");
    let request = SubmitJobRequest {
        name: "fallback".into(),
        config_toml,
        workers: 2,
        output_dir: out.display().to_string(),
        ..SubmitJobRequest::default()
    };
    let job_id = cluster.jobs.submit_job(request).await.expect("SubmitJob").into_inner().job_id;
    let watch = WatchJobRequest { job_id: job_id.clone(), from_revision: 0 };
    let mut events = cluster.jobs.watch_job(watch).await.expect("WatchJob").into_inner();
    // Every step's loss as last reported: a redone step replaces the one before the failure.
    let mut losses = vec![None; STEPS as usize];

    // Once two checkpoints are committed, w1's process ends: the job recovers, and waits
    // for a second worker.
    loop {
        let event = next_event(&mut events).await.expect("the job runs");
        note_loss(&event, &mut losses);
        if let Some(job_event::Event::CheckpointCommitted(c)) = &event.event
            && c.step >= 4
        {
            break;
        }
    }
    w1.stop().await;
    loop {
        let event = next_event(&mut events).await.expect("the job recovers");
        note_loss(&event, &mut losses);
        if let Some(job_event::Event::StateChanged(s)) = &event.event {
            assert_ne!(s.to(), JobState::Failed, "{}", s.reason);
            if s.to() == JobState::Recovering {
                break;
            }
        }
    }
    // No checkpoint commits while recovering: the newest committed one is the one the job
    // would resume from. Its shard goes bad before the replacement joins.
    let job = cluster.job(&job_id).await;
    let root = Path::new(&job.checkpoint_dir).parent().expect("the run's checkpoint root").to_path_buf();
    let committed = list_committed(&root).expect("the committed checkpoints");
    let newest = committed.last().expect("a committed checkpoint");
    assert!(committed.len() >= 2, "one to fall back to: {committed:?}");
    corrupt(&newest.dir);
    let corrupted = newest.dir.display().to_string();
    let before = committed[committed.len() - 2].manifest.step;
    let w1 = cluster.worker("w1");

    let mut recovery = None;
    let end = loop {
        let Some(event) = next_event(&mut events).await else { panic!("the watch ended before the job") };
        note_loss(&event, &mut losses);
        match event.event {
            Some(job_event::Event::Recovery(r)) => recovery = Some(r),
            Some(job_event::Event::StateChanged(s)) if s.to() >= JobState::Succeeded => break s,
            _ => {}
        }
    };
    assert_eq!(end.to(), JobState::Succeeded, "{}", end.reason);
    let recovery = recovery.expect("a Recovery event");
    // Skipped because the worker reported the kind, then resumed from the one before.
    assert_eq!(recovery.skipped_checkpoints, [corrupted], "{recovery:?}");
    assert_eq!(recovery.from_step, before, "{recovery:?}");
    assert_eq!(recovery.replay_mismatches, 0, "{recovery:?}");

    // The redone steps replayed the trajectory bit for bit (`note_loss`), and every step
    // of the run was reported.
    let missing: Vec<usize> = (1..=losses.len()).filter(|&step| losses[step - 1].is_none()).collect();
    assert!(missing.is_empty(), "steps without a loss: {missing:?}");

    w0.stop().await;
    w1.stop().await;
    cluster.coordinator.shutdown().await.expect("the coordinator stops");
}

/// What a [`CountingPlane`] was asked to do.
#[derive(Default, Debug)]
struct Counts {
    binds: AtomicUsize,
    connects: AtomicUsize,
    shutdowns: AtomicUsize,
}

/// The TCP data plane, counting what the agent asks of it: proof that the agent's jobs
/// go through the data plane passed in, not one of its own.
struct CountingPlane(Arc<Counts>);

impl DataPlane for CountingPlane {
    type Listener = TcpRendezvous;
    type Comm = TcpCommunicator;

    async fn bind(&self, addr: &str) -> Result<TcpRendezvous, CommError> {
        self.0.binds.fetch_add(1, Ordering::SeqCst);
        TcpDataPlane.bind(addr).await
    }

    fn local_addr(&self, listener: &TcpRendezvous) -> String {
        TcpDataPlane.local_addr(listener)
    }

    async fn connect(
        &self,
        listener: TcpRendezvous,
        rendezvous: Rendezvous<'_>,
    ) -> Result<TcpCommunicator, CommError> {
        self.0.connects.fetch_add(1, Ordering::SeqCst);
        TcpDataPlane.connect(listener, rendezvous).await
    }

    fn abort_handle(&self, comm: &TcpCommunicator) -> AbortFn {
        TcpDataPlane.abort_handle(comm)
    }

    async fn shutdown(&self, comm: TcpCommunicator) -> Result<(), CommError> {
        self.0.shutdowns.fetch_add(1, Ordering::SeqCst);
        TcpDataPlane.shutdown(comm).await
    }
}

/// The losses of `steps` data-parallel steps of `toml` on `world` ranks over loopback TCP,
/// stepped directly (no agent), as rank 0 computed them.
async fn direct_losses(toml: &str, world: usize, steps: u64) -> Vec<u64> {
    let (config, model) = common::parse(toml);
    let comms = timeout(LIMIT, loopback_group(world, TcpOptions::new(77, DataPlaneSecret::random())))
        .await
        .expect("rendezvous within the limit")
        .expect("rendezvous");
    let tasks: Vec<_> = comms
        .into_iter()
        .map(|comm| {
            let (config, model) = (config.clone(), model.clone());
            tokio::spawn(async move {
                let mut trainer = Trainer::new(config, &model).expect("a trainer");
                let mut losses = Vec::new();
                for _ in 0..steps {
                    let record = data_parallel_step(&mut trainer, &comm).await.expect("a step");
                    losses.push(record.loss.to_bits());
                }
                comm.shutdown().await.expect("a clean shutdown");
                losses
            })
        })
        .collect();
    let mut per_rank = Vec::new();
    for task in tasks {
        per_rank.push(timeout(LIMIT, task).await.expect("the ranks step").expect("no panic"));
    }
    per_rank.swap_remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_through_the_data_plane_passed_in() {
    const STEPS: u64 = 3;
    let toml = common::small_run(STEPS);
    let mut cluster = Cluster::start().await;
    let counts: Vec<Arc<Counts>> = (0..2).map(|_| Arc::new(Counts::default())).collect();
    let workers: Vec<Worker> = counts
        .iter()
        .enumerate()
        .map(|(i, c)| cluster.worker_on(&format!("w{i}"), CountingPlane(c.clone())))
        .collect();
    let request = SubmitJobRequest {
        name: "passed-in".into(),
        config_toml: toml.clone(),
        workers: 2,
        ..SubmitJobRequest::default()
    };
    let job_id = cluster.jobs.submit_job(request).await.expect("SubmitJob").into_inner().job_id;
    let watch = WatchJobRequest { job_id: job_id.clone(), from_revision: 0 };
    let mut events = cluster.jobs.watch_job(watch).await.expect("WatchJob").into_inner();
    let mut losses = vec![None; STEPS as usize];
    let end = loop {
        let Some(event) = next_event(&mut events).await else { panic!("the watch ended before the job") };
        note_loss(&event, &mut losses);
        if let Some(job_event::Event::StateChanged(s)) = &event.event
            && s.to() >= JobState::Succeeded
        {
            break s.clone();
        }
    };
    assert_eq!(end.to(), JobState::Succeeded, "{}", end.reason);
    let reported: Vec<u64> = losses.iter().map(|l| l.expect("every step reported").to_bits()).collect();
    assert_eq!(reported, direct_losses(&toml, 2, STEPS).await, "the agent's losses are the direct ranks'");

    for worker in workers {
        worker.stop().await;
    }
    for (i, c) in counts.iter().enumerate() {
        // One rendezvous and one graceful shutdown for the one job; a bind before
        // registering, and possibly one more after the job spent the listener.
        assert_eq!(c.connects.load(Ordering::SeqCst), 1, "w{i}: {c:?}");
        assert_eq!(c.shutdowns.load(Ordering::SeqCst), 1, "w{i}: {c:?}");
        assert!((1..=2).contains(&c.binds.load(Ordering::SeqCst)), "w{i}: {c:?}");
    }
    cluster.coordinator.shutdown().await.expect("the coordinator stops");
}
