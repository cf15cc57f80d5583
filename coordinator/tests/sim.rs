//! A deterministic simulation of the control plane under faults, with turmoil.
//!
//! # The harness
//!
//! Each run is one seeded [`Scenario`]: one coordinator host (the real coordinator, served
//! by [`serve_with_incoming`] over turmoil's simulated TCP, with a [`FileStore`] in a
//! temporary directory), one `monitor` host (the test's client: it submits and cancels
//! jobs, polls `ListWorkers`, and checks the invariants; its link is never faulted) and 6
//! to 16 simulated worker hosts. Everything runs in simulated time (tokio's paused clock,
//! advanced by turmoil one tick at a time), so a run of tens of simulated seconds takes a
//! fraction of a second, and the same seed replays the same run.
//!
//! A simulated worker ([`worker_host`]) behaves like `flotilla-worker`'s agent as the
//! coordinator sees it: it registers under a fixed worker id with a fresh `pid` token per
//! registration (so `ListWorkers` tells which *incarnation* the coordinator counts alive),
//! opens its session, heartbeats every `heartbeat_interval_ms`, acknowledges an assignment
//! after a short rendezvous and `RunSteps` at once, reports one `StepReport` per step (every
//! rank the same loss for a step, a function of job and step) and `JobFinished` at the end.
//! It refuses an assignment while it runs or is still stopping a job, and acknowledges an
//! `Abort` only after a random stopping delay, as the real worker does. On any loss of its
//! session or a failed registration (`ALREADY_EXISTS` while the coordinator still holds its
//! previous registration, `UNAVAILABLE`, a timeout) it redials with jittered exponential
//! backoff, forgetting its job, and HTTP/2 keepalive pings find a dead connection.
//!
//! The workers stay simulated, not the real agent (`run_worker_with`, which
//! `worker/tests/control_plane.rs` drives against the real coordinator in real time),
//! because real training does not run in simulated time: its compute blocks an OS thread
//! for real seconds (`block_in_place`, which turmoil's current-thread host runtimes refuse)
//! and its data plane is tokio TCP, outside turmoil's simulated network.
//!
//! # The fault model
//!
//! During the chaos window ([`CHAOS_START`]..[`CHAOS_END`]) each worker host gets a random
//! sequence of non-overlapping faults: its link to the coordinator is partitioned (messages
//! in both directions dropped, as turmoil does; TCP streams across it stall for good) and
//! repaired later; its latency to the coordinator spikes (up to [`SPIKE_LATENCY`], below
//! what loses a worker); or the host crashes (every task and socket dropped) and is
//! restarted later as a new process. Base links have 1–5 ms of latency with jitter. At
//! `CHAOS_END` everything is repaired; the run then settles.
//!
//! The coordinator host is never crashed (not yet written). It would be sound with the
//! [`FileStore`]: turmoil crashes a host by dropping its tokio runtime, which waits for the
//! blocking pool, so a log write in flight finishes before the restarted coordinator reopens
//! the directory (a process crash, not a power loss: the page cache survives). It needs the
//! monitor to tolerate the downtime and every running job to fail "coordinator restarted".
//!
//! # The invariants
//!
//! 1. **Liveness.** The coordinator answers every `ListWorkers`, `ListJobs`, `SubmitJob`,
//!    `CancelJob`, `GetJob` and `WatchJob` of the monitor within [`RPC_DEADLINE`] of
//!    simulated time. After the settle phase every job is terminal, every worker host is
//!    registered under its *current* incarnation with its session open, and a final job on
//!    all workers runs to `SUCCEEDED`.
//! 2. **No worker alive past its timeout.** The monitor polls `ListWorkers` every
//!    [`POLL_INTERVAL`]. An incarnation whose host crashed at `t`, or whose host has been
//!    partitioned from the coordinator since `t` until the snapshot came back, must not be
//!    in a snapshot requested after `t + heartbeat_timeout + ALIVE_SLACK`, where the slack is
//!    the largest one-way latency (a heartbeat sent just before the fault arrives that late)
//!    plus 10 ms for ticks and the actors' turns. No listed worker may have been silent for
//!    longer than the timeout plus [`SILENT_SLACK`].
//! 3. **Consistent job state.** For every job, the events read by `WatchJob` from revision 0
//!    are a path of [`may_transition`] edges from `Unspecified → Pending`, with strictly
//!    increasing revisions; `WorkerJoined` events only in Rendezvous, one per worker; `Step`
//!    events only while Running, consecutive from 1, with the loss the workers reported; the
//!    record's state, `steps_done` and revision are those of the last events; a Succeeded
//!    job did all its steps; a job the monitor cancelled successfully is Cancelled. A job
//!    may fail only because a worker was lost, and only a worker whose host was faulted: a
//!    job failing because a worker refused an assignment (e.g. it was still stopping its
//!    previous job) is a coordinator bug.
//!
//! # Running it
//!
//! `cargo test -p flotilla-coordinator --release --test sim`. `FLOTILLA_SIM_SEEDS=n` sets
//! how many seeds the main test runs (default [`DEFAULT_SEEDS`]), `FLOTILLA_SIM_SEED=s` runs
//! only seed `s` (the failure message names it), `FLOTILLA_SIM_VERBOSE=1` prints each
//! seed's wall time and outcome. Seeds run on all cores, one simulation per thread.
//!
//! # Determinism
//!
//! Scenarios (sizes, jobs, faults, every worker's random delays) are functions of the seed,
//! and turmoil's network is seeded. Runs are *nearly* but not exactly reproducible: in a
//! probe of 20 seeds run twice, 17 replayed bit for bit (every event and revision), one more
//! differed only in how two jobs' writes interleaved in the store's revisions, two diverged
//! further. Real time leaks in through tokio's `select!` fairness (randomly seeded unless
//! built with `--cfg tokio_unstable`, in tonic, hyper and h2), the wake-up order of the
//! store's `spawn_blocking` writes, and `RandomState` hash maps in the coordinator.
//! Simulated time stays exact (tokio does not auto-advance a paused clock while a blocking
//! task runs), and every invariant is checked on the run's own history, so this costs
//! reproducibility, not soundness: a failing seed usually, not always, fails again.
//! `a_seed_replays_identically` checks full replay and is ignored until then.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use flotilla_coordinator::service::{CoordinatorConfig, may_transition, serve_with_incoming};
use flotilla_coordinator::store::FileStore;
use flotilla_proto::PROTOCOL_VERSION;
use flotilla_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use flotilla_proto::v1::job_service_client::JobServiceClient;
use flotilla_proto::v1::{
    Ack, CancelJobRequest, CoordinatorMessage, GetJobRequest, Heartbeat, Job, JobEvent, JobFinished,
    JobState, ListJobsRequest, ListWorkersRequest, SessionOpen, StepReport, SubmitJobRequest,
    WatchJobRequest, WorkerInfo, WorkerMessage, WorkerStatus, coordinator_message, job_event, worker_message,
};
use hyper_util::rt::TokioIo;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Streaming};

// ---------------------------------------------------------------------------------------
// Parameters

/// Seeds the main test runs unless `FLOTILLA_SIM_SEEDS` says otherwise.
const DEFAULT_SEEDS: u64 = 300;

const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(500);
const PORT: u16 = 7000;

/// Simulated time per step of the simulation: every host runs this long, then messages
/// move. Latencies below it round up to it.
const TICK: Duration = Duration::from_millis(1);

/// Every link's latency outside spikes: uniform jitter between these.
const MIN_LATENCY: Duration = Duration::from_millis(1);
const MAX_LATENCY: Duration = Duration::from_millis(5);
/// The largest latency a spike gives a worker's link to the coordinator. With the worker's
/// keepalive (every 300 ms, 400 ms to answer) and heartbeats every 100 ms against a 500 ms
/// timeout, a spike alone never loses a worker.
const SPIKE_LATENCY: Duration = Duration::from_millis(120);

/// When faults may start, and when everything is repaired.
const CHAOS_START: Duration = Duration::from_millis(800);
const CHAOS_END: Duration = Duration::from_millis(6_000);
/// Jobs are submitted in this window (the final all-worker job comes after settling).
const SUBMIT_END: Duration = Duration::from_millis(6_500);
/// How long after `CHAOS_END` every job must be terminal and every worker back.
const SETTLE_LIMIT: Duration = Duration::from_secs(20);
/// The whole simulation may not run longer (turmoil fails the run then).
const SIM_LIMIT: Duration = Duration::from_secs(60);

const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// The monitor's deadline for any call to the coordinator.
const RPC_DEADLINE: Duration = Duration::from_secs(2);
/// See invariant 2 in the module docs.
const ALIVE_SLACK: Duration = Duration::from_millis(SPIKE_LATENCY.as_millis() as u64 + 10);
const SILENT_SLACK: Duration = Duration::from_millis(20);

/// The workers' redial backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(800);
/// The workers' deadline for connecting, registering and opening the session.
const DIAL_DEADLINE: Duration = Duration::from_millis(1_000);

const COORDINATOR: &str = "coordinator";
const MONITOR: &str = "monitor";

fn worker_name(index: usize) -> String {
    format!("w{index:02}")
}

// ---------------------------------------------------------------------------------------
// Scenario: everything a seed decides up front

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultKind {
    Partition,
    Spike,
    Crash,
}

/// One fault on one worker host, from `start` until `end`.
#[derive(Clone, Copy, Debug)]
struct Fault {
    host: usize,
    kind: FaultKind,
    start: Duration,
    end: Duration,
}

/// One job the monitor submits.
#[derive(Clone, Debug)]
struct PlannedJob {
    at: Duration,
    workers: u32,
    steps: u64,
    /// Cancel this long after submission.
    cancel_after: Option<Duration>,
}

#[derive(Clone, Debug)]
struct Scenario {
    seed: u64,
    workers: usize,
    /// Per worker host: its step time.
    step_times: Vec<Duration>,
    jobs: Vec<PlannedJob>,
    faults: Vec<Fault>,
}

fn millis(rng: &mut ChaCha8Rng, range: std::ops::RangeInclusive<u64>) -> Duration {
    Duration::from_millis(rng.random_range(range))
}

impl Scenario {
    fn generate(seed: u64) -> Scenario {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let workers = rng.random_range(6..=16);
        let step_times = (0..workers).map(|_| millis(&mut rng, 5..=30)).collect();
        let mut jobs = Vec::new();
        let mut at = Duration::from_millis(200);
        while at < SUBMIT_END {
            let size = rng.random_range(1..=(workers as u32 / 2).max(1));
            let cancel_after = rng.random_bool(0.15).then(|| millis(&mut rng, 0..=600));
            jobs.push(PlannedJob { at, workers: size, steps: rng.random_range(1..=25), cancel_after });
            at += millis(&mut rng, 50..=400);
        }
        let mut faults = Vec::new();
        for host in 0..workers {
            let mut t = CHAOS_START + millis(&mut rng, 0..=1_500);
            while t < CHAOS_END {
                let kind = match rng.random_range(0..10) {
                    0..=3 => FaultKind::Partition,
                    4..=5 => FaultKind::Spike,
                    _ => FaultKind::Crash,
                };
                // Short partitions (below the timeout) and long ones both matter.
                let length = match kind {
                    FaultKind::Partition if rng.random_bool(0.4) => millis(&mut rng, 20..=400),
                    _ => millis(&mut rng, 100..=1_500),
                };
                let end = (t + length).min(CHAOS_END);
                faults.push(Fault { host, kind, start: t, end });
                t = end + millis(&mut rng, 200..=2_500);
            }
        }
        Scenario { seed, workers, step_times, jobs, faults }
    }

    /// The driver's actions in time order: (when, fault, begins).
    fn actions(&self) -> Vec<(Duration, Fault, bool)> {
        let mut actions: Vec<_> =
            self.faults.iter().flat_map(|f| [(f.start, *f, true), (f.end, *f, false)]).collect();
        // Stable: ends sort before starts at the same instant only by time, never by chance.
        actions.sort_by_key(|(at, fault, begins)| (*at, *begins, fault.host));
        actions
    }
}

// ---------------------------------------------------------------------------------------
// Ledger: what the driver did and what the hosts saw, shared by all of them

/// One registration of a worker host, told apart by the `pid` token it registered with.
#[derive(Clone, Debug)]
struct Incarnation {
    host: usize,
    /// When its host crashed (it can never be heard from again).
    died: Option<Duration>,
}

#[derive(Default)]
struct Ledger {
    seed: u64,
    incarnations: BTreeMap<u32, Incarnation>,
    next_token: u32,
    /// Per worker host: the token of its most recently opened session.
    current: Vec<Option<u32>>,
    /// Per worker host: how many times it booted.
    boots: Vec<u64>,
    /// Per worker host: its partitions from the coordinator, `(start, end)`.
    partitions: Vec<Vec<(Duration, Option<Duration>)>>,
    /// Per worker host: when a partition or crash began.
    faulted_at: Vec<Vec<Duration>>,
    /// The first broken invariant.
    violation: Option<String>,
    /// What the run did, compared across runs of one seed.
    trace: Vec<String>,
    /// How many `ListWorkers` snapshots the monitor checked.
    snapshots: u64,
}

type Shared = Arc<Mutex<Ledger>>;

fn lock(ledger: &Shared) -> MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Ledger {
    fn new(scenario: &Scenario) -> Ledger {
        Ledger {
            seed: scenario.seed,
            next_token: 1,
            current: vec![None; scenario.workers],
            boots: vec![0; scenario.workers],
            partitions: vec![Vec::new(); scenario.workers],
            faulted_at: vec![Vec::new(); scenario.workers],
            ..Ledger::default()
        }
    }

    fn violate(&mut self, message: String) {
        if self.violation.is_none() {
            self.violation = Some(message);
        }
    }

    fn new_token(&mut self, host: usize) -> u32 {
        let token = self.next_token;
        self.next_token += 1;
        self.incarnations.insert(token, Incarnation { host, died: None });
        token
    }

    fn crashed(&mut self, host: usize, at: Duration) {
        for incarnation in self.incarnations.values_mut() {
            if incarnation.host == host && incarnation.died.is_none() {
                incarnation.died = Some(at);
            }
        }
        self.current[host] = None;
        self.faulted_at[host].push(at);
    }

    /// Invariant 1's other half: a worker keeps its session unless a fault hit its host
    /// while it was open (crashes never get here: the process is gone).
    fn session_ended(&mut self, host: usize, token: u32, opened: Duration, cause: &str) {
        let ended = now();
        let faulted = self.partitions[host]
            .iter()
            .any(|&(start, end)| start <= ended && end.is_none_or(|e| e >= opened));
        if !faulted {
            self.violate(format!(
                "worker {} (pid {token}) lost its session at {ended:?} (opened at {opened:?}) without any fault on its \
                 host: {cause}",
                worker_name(host)
            ));
        }
    }

    /// Invariant 2 on one `ListWorkers` snapshot requested at `sent`, answered at `received`.
    fn check_snapshot(
        &self,
        workers: &[WorkerStatus],
        sent: Duration,
        received: Duration,
    ) -> Result<(), String> {
        let bound = HEARTBEAT_TIMEOUT + ALIVE_SLACK;
        for w in workers {
            if Duration::from_millis(w.silent_ms) > HEARTBEAT_TIMEOUT + SILENT_SLACK {
                return Err(format!(
                    "worker {} is listed alive after {} ms of silence (timeout {} ms) in the snapshot requested at {sent:?}",
                    w.worker_id,
                    w.silent_ms,
                    HEARTBEAT_TIMEOUT.as_millis()
                ));
            }
            let Some(incarnation) = self.incarnations.get(&w.pid) else {
                return Err(format!(
                    "worker {} is listed with pid {}, which no worker registered",
                    w.worker_id, w.pid
                ));
            };
            let host = worker_name(incarnation.host);
            if w.worker_id != host {
                return Err(format!("pid {} of host {host} is listed as worker {}", w.pid, w.worker_id));
            }
            if let Some(died) = incarnation.died
                && died + bound <= sent
            {
                return Err(format!(
                    "worker {host} (pid {}) crashed at {died:?} but is listed alive (session open: {}, silent {} ms) \
                     in the snapshot requested at {sent:?}, more than timeout {:?} + slack {:?} later",
                    w.pid, w.session_open, w.silent_ms, HEARTBEAT_TIMEOUT, ALIVE_SLACK
                ));
            }
            for &(start, end) in &self.partitions[incarnation.host] {
                if start + bound <= sent && end.is_none_or(|end| end >= received) {
                    return Err(format!(
                        "worker {host} (pid {}) has been partitioned from the coordinator since {start:?} but is \
                         listed alive (session open: {}, silent {} ms) in the snapshot requested at {sent:?}, more \
                         than timeout {:?} + slack {:?} later",
                        w.pid, w.session_open, w.silent_ms, HEARTBEAT_TIMEOUT, ALIVE_SLACK
                    ));
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Transport: turmoil's TCP for tonic

/// A simulated TCP connection the coordinator's server accepts.
struct SimConn(turmoil::net::TcpStream);

impl Connected for SimConn {
    type ConnectInfo = ();

    fn connect_info(&self) {}
}

impl AsyncRead for SimConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A channel to the coordinator over simulated TCP, with keepalive pings so that a
/// connection stalled by a partition is found dead.
async fn dial() -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_static("http://coordinator:7000")
        .http2_keep_alive_interval(Duration::from_millis(300))
        .keep_alive_timeout(Duration::from_millis(400))
        .keep_alive_while_idle(true)
        .connect_with_connector(tower::service_fn(|_: Uri| async {
            let stream =
                tokio::time::timeout(DIAL_DEADLINE, turmoil::net::TcpStream::connect((COORDINATOR, PORT)))
                    .await
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }))
        .await
}

fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// The coordinator host

fn coordinator_config(dir: PathBuf) -> CoordinatorConfig {
    CoordinatorConfig {
        heartbeat_interval: HEARTBEAT_INTERVAL,
        heartbeat_timeout: HEARTBEAT_TIMEOUT,
        // The simulated jobs' `/sim/out` is never written: every path is allowed.
        allowed_roots: vec![PathBuf::from("/")],
        ..CoordinatorConfig::new(dir)
    }
}

async fn coordinator_host(dir: PathBuf) -> turmoil::Result {
    let store = FileStore::open(&dir).await?;
    let listener = turmoil::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)).await?;
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| SimConn(stream));
        Some((accepted, listener))
    });
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT));
    let _handle = serve_with_incoming(coordinator_config(dir), store, incoming, addr).await?;
    std::future::pending::<()>().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The simulated worker

/// The loss every rank reports for a step of a job: the same on all ranks, as after the
/// data-parallel all-reduce.
fn expected_loss(job_id: &str, step: u64) -> f64 {
    let salt = job_id.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    10.0 / step as f64 + (salt % 97) as f64 / 1000.0
}

/// What a simulated worker is doing about its job.
#[derive(Debug)]
enum Task {
    Idle,
    /// Joining its peers; acknowledges the assignment at `at`.
    Rendezvous {
        job_id: String,
        ack: u64,
        at: tokio::time::Instant,
    },
    /// Waiting for `RunSteps`.
    Ready {
        job_id: String,
    },
    Running {
        job_id: String,
        next: u64,
        end: u64,
        at: tokio::time::Instant,
    },
    /// Stopping after an abort; acknowledges the aborts at `at`.
    Stopping {
        job_id: String,
        acks: Vec<u64>,
        at: tokio::time::Instant,
    },
}

impl Task {
    fn job_id(&self) -> Option<&str> {
        match self {
            Task::Idle => None,
            Task::Rendezvous { job_id, .. }
            | Task::Ready { job_id }
            | Task::Running { job_id, .. }
            | Task::Stopping { job_id, .. } => Some(job_id),
        }
    }

    fn due(&self) -> Option<tokio::time::Instant> {
        match self {
            Task::Rendezvous { at, .. } | Task::Running { at, .. } | Task::Stopping { at, .. } => Some(*at),
            Task::Idle | Task::Ready { .. } => None,
        }
    }
}

fn body(body: worker_message::Body) -> WorkerMessage {
    WorkerMessage { body: Some(body) }
}

fn ack(command_id: u64, error: impl Into<String>) -> WorkerMessage {
    body(worker_message::Body::Ack(Ack { command_id, error: error.into(), ..Ack::default() }))
}

struct SimWorker {
    host: usize,
    ledger: Shared,
    rng: ChaCha8Rng,
    step_time: Duration,
    /// The epoch of the assignment it runs, carried back in its job messages.
    epoch: u64,
}

/// Why an incarnation ended.
type Ended = String;

impl SimWorker {
    fn info(&self, token: u32) -> WorkerInfo {
        let name = worker_name(self.host);
        WorkerInfo {
            worker_id: name.clone(),
            host: name.clone(),
            cores: 2,
            data_plane_address: format!("{name}:9000"),
            protocol_version: PROTOCOL_VERSION,
            node_id: name,
            pid: token,
            ..Default::default()
        }
    }

    /// One registration and its session, until the session is lost.
    async fn incarnation(&mut self) -> Ended {
        let channel = match dial().await {
            Ok(channel) => channel,
            Err(e) => return format!("connect: {e}"),
        };
        let mut client = CoordinatorServiceClient::new(channel);
        let token = lock(&self.ledger).new_token(self.host);
        let registration = match tokio::time::timeout(DIAL_DEADLINE, client.register(self.info(token))).await
        {
            Err(_) => return "register timed out".into(),
            Ok(Err(status)) => return format!("register: {:?} {}", status.code(), status.message()),
            Ok(Ok(registration)) => registration.into_inner(),
        };
        let (tx, rx) = mpsc::channel(256);
        let open =
            SessionOpen { worker_id: registration.worker_id.clone(), session_id: registration.session_id };
        let _ = tx.try_send(body(worker_message::Body::Open(open)));
        let inbound = match tokio::time::timeout(DIAL_DEADLINE, client.session(ReceiverStream::new(rx))).await
        {
            Err(_) => return "session timed out".into(),
            Ok(Err(status)) => return format!("session: {:?} {}", status.code(), status.message()),
            Ok(Ok(inbound)) => inbound.into_inner(),
        };
        let opened = now();
        lock(&self.ledger).current[self.host] = Some(token);
        let interval = Duration::from_millis(registration.heartbeat_interval_ms.max(1));
        let ended = self.session(tx, inbound, interval).await;
        lock(&self.ledger).session_ended(self.host, token, opened, &ended);
        ended
    }

    async fn session(
        &mut self,
        tx: mpsc::Sender<WorkerMessage>,
        mut inbound: Streaming<CoordinatorMessage>,
        interval: Duration,
    ) -> Ended {
        let mut ticker = tokio::time::interval(interval);
        let mut task = Task::Idle;
        let mut sequence = 0;
        loop {
            let due = task.due();
            let out = tokio::select! {
                biased;
                command = inbound.message() => match command {
                    Ok(Some(command)) => self.on_command(&mut task, command),
                    Ok(None) => return "the coordinator ended the session".into(),
                    Err(status) => return format!("session lost: {:?} {}", status.code(), status.message()),
                },
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                    self.on_due(&mut task)
                }
                _ = ticker.tick() => {
                    sequence += 1;
                    vec![body(worker_message::Body::Heartbeat(Heartbeat { sequence, sent_unix_ms: 0 }))]
                }
            };
            for message in out {
                if tx.send(message).await.is_err() {
                    return "the session's request stream closed".into();
                }
            }
        }
    }

    fn on_command(&mut self, task: &mut Task, command: CoordinatorMessage) -> Vec<WorkerMessage> {
        use coordinator_message::Body;
        let id = command.command_id;
        let now = tokio::time::Instant::now();
        match command.body {
            Some(Body::Assignment(assignment)) => match task {
                Task::Idle => {
                    self.epoch = assignment.epoch;
                    let at = now + Duration::from_millis(self.rng.random_range(0..=20));
                    *task = Task::Rendezvous { job_id: assignment.job_id, ack: id, at };
                    vec![]
                }
                Task::Stopping { job_id, .. } => vec![ack(
                    id,
                    format!("job {job_id} is still stopping; assign again once its Abort is acknowledged"),
                )],
                other => {
                    let job_id = other.job_id().unwrap_or_default();
                    vec![ack(id, format!("this worker is running job {job_id}; abort it first"))]
                }
            },
            Some(Body::RunSteps(run)) => match task {
                Task::Ready { job_id } if *job_id == run.job_id => {
                    let (job_id, first) = (run.job_id, run.first_step);
                    if run.count == 0 {
                        let finished =
                            JobFinished { job_id, steps: first.saturating_sub(1), epoch: self.epoch };
                        *task = Task::Idle;
                        return vec![ack(id, ""), body(worker_message::Body::Finished(finished))];
                    }
                    *task = Task::Running {
                        job_id,
                        next: first,
                        end: first + run.count,
                        at: now + self.step_time,
                    };
                    vec![ack(id, "")]
                }
                other => vec![ack(id, format!("cannot run steps of job {} in state {other:?}", run.job_id))],
            },
            Some(Body::Abort(abort)) => {
                let ours = task.job_id().is_some_and(|job| abort.job_id.is_empty() || abort.job_id == job);
                if !ours {
                    return vec![ack(id, "")];
                }
                match task {
                    Task::Stopping { acks, .. } => acks.push(id),
                    other => {
                        let job_id = other.job_id().unwrap_or_default().to_string();
                        let at = now + Duration::from_millis(self.rng.random_range(5..=80));
                        *other = Task::Stopping { job_id, acks: vec![id], at };
                    }
                }
                vec![]
            }
            Some(Body::Shutdown(_)) | None => vec![ack(id, "")],
        }
    }

    fn on_due(&mut self, task: &mut Task) -> Vec<WorkerMessage> {
        match std::mem::replace(task, Task::Idle) {
            Task::Rendezvous { job_id, ack: command, .. } => {
                *task = Task::Ready { job_id };
                vec![ack(command, "")]
            }
            Task::Running { job_id, next, end, at } => {
                let report = StepReport {
                    job_id: job_id.clone(),
                    step: next,
                    loss: expected_loss(&job_id, next),
                    tokens: 64,
                    compute_seconds: self.step_time.as_secs_f64(),
                    epoch: self.epoch,
                    ..Default::default()
                };
                let mut out = vec![body(worker_message::Body::StepReport(report))];
                if next + 1 == end {
                    out.push(body(worker_message::Body::Finished(JobFinished {
                        job_id,
                        steps: next,
                        epoch: self.epoch,
                    })));
                } else {
                    *task = Task::Running { job_id, next: next + 1, end, at: at + self.step_time };
                }
                out
            }
            Task::Stopping { acks, .. } => acks.into_iter().map(|command| ack(command, "")).collect(),
            idle @ (Task::Idle | Task::Ready { .. }) => {
                *task = idle;
                vec![]
            }
        }
    }
}

async fn worker_host(host: usize, step_time: Duration, ledger: Shared) -> turmoil::Result {
    let rng = {
        let mut ledger = lock(&ledger);
        ledger.boots[host] += 1;
        let seed = ledger.seed ^ ((host as u64) << 40) ^ (ledger.boots[host] << 56);
        ChaCha8Rng::seed_from_u64(seed)
    };
    let mut worker = SimWorker { host, ledger, rng, step_time, epoch: 0 };
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = tokio::time::Instant::now();
        let _ended = worker.incarnation().await;
        // A session that lived a while resets the backoff.
        if started.elapsed() > Duration::from_secs(2) {
            backoff = BACKOFF_MIN;
        }
        let jitter = worker.rng.random_range(0..=backoff.as_millis() as u64 / 2);
        tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

// ---------------------------------------------------------------------------------------
// The monitor: workload and invariants

type Jobs = JobServiceClient<Channel>;

/// Runs a call with the monitor's deadline; a miss is a liveness violation.
async fn call<T>(
    what: &str,
    future: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<Result<T, tonic::Status>, String> {
    let sent = now();
    match tokio::time::timeout(RPC_DEADLINE, future).await {
        Ok(result) => Ok(result.map(tonic::Response::into_inner)),
        Err(_) => {
            Err(format!("the coordinator did not answer {what} (sent at {sent:?}) within {RPC_DEADLINE:?}"))
        }
    }
}

/// A call that must succeed.
async fn must<T>(
    what: &str,
    future: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    call(what, future)
        .await?
        .map_err(|status| format!("{what} failed: {:?} {}", status.code(), status.message()))
}

fn job_config(workers: u32, steps: u64) -> String {
    format!(
        "seed = 0\nsteps = {steps}\nbatch_size = {}\nseq_len = 16\n\n[model]\npreset = \"tiny\"\n\n[recovery]\nmax_restarts = 0\n",
        workers * 4
    )
}

async fn submit(jobs: &mut Jobs, workers: u32, steps: u64) -> Result<Job, String> {
    let request = SubmitJobRequest {
        name: format!("sim-{workers}x{steps}"),
        config_toml: job_config(workers, steps),
        workers,
        output_dir: "/sim/out".into(),
        resume_from: String::new(),
    };
    must("SubmitJob", jobs.submit_job(request)).await
}

/// Polls `ListWorkers` every `POLL_INTERVAL` for the whole run, checking invariant 2.
async fn poll_workers(mut jobs: Jobs, ledger: Shared) {
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    loop {
        ticker.tick().await;
        let sent = now();
        let checked = match call("ListWorkers", jobs.list_workers(ListWorkersRequest {})).await {
            Err(e) => Err(e),
            Ok(Err(status)) => Err(format!("ListWorkers failed: {:?} {}", status.code(), status.message())),
            Ok(Ok(response)) => {
                let mut ledger = lock(&ledger);
                ledger.snapshots += 1;
                ledger.check_snapshot(&response.workers, sent, now())
            }
        };
        if let Err(e) = checked {
            lock(&ledger).violate(e);
            return;
        }
    }
}

/// Sleeps until simulated time `at`, failing early if the poller found a violation.
async fn sleep_until_sim(at: Duration, ledger: &Shared) -> Result<(), String> {
    loop {
        if let Some(v) = lock(ledger).violation.clone() {
            return Err(v);
        }
        let left = at.saturating_sub(now());
        if left.is_zero() {
            return Ok(());
        }
        tokio::time::sleep(left.min(POLL_INTERVAL)).await;
    }
}

async fn monitor(scenario: Scenario, ledger: Shared) -> turmoil::Result {
    let result = drive(&scenario, &ledger).await;
    let violation = lock(&ledger).violation.clone();
    match (result, violation) {
        (_, Some(v)) | (Err(v), None) => Err(v.into()),
        (Ok(()), None) => Ok(()),
    }
}

/// The monitor's whole run: the workload, then the settle phase and the final checks.
async fn drive(scenario: &Scenario, ledger: &Shared) -> Result<(), String> {
    let channel = loop {
        match dial().await {
            Ok(channel) => break channel,
            Err(_) if now() < Duration::from_secs(1) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => return Err(format!("the monitor cannot reach the coordinator: {e}")),
        }
    };
    let mut jobs = JobServiceClient::new(channel);
    tokio::spawn(poll_workers(jobs.clone(), ledger.clone()));

    let submitted = run_workload(scenario, &mut jobs, ledger).await?;
    sleep_until_sim(CHAOS_END, ledger).await?;
    let records = wait_all_terminal(&mut jobs, ledger, &submitted).await?;
    wait_all_workers_back(&mut jobs, scenario, ledger).await?;

    let last = submit(&mut jobs, scenario.workers as u32, 5).await?;
    let final_job = wait_terminal(&mut jobs, ledger, &last.job_id, now() + SETTLE_LIMIT).await?;
    if final_job.state() != JobState::Succeeded {
        return Err(format!(
            "the final job {} on all {} workers ended {:?}: {}",
            final_job.job_id,
            scenario.workers,
            final_job.state(),
            final_job.reason
        ));
    }

    let mut all: BTreeMap<String, (Job, bool)> = records;
    all.insert(final_job.job_id.clone(), (final_job, false));
    let listed = must("ListJobs", jobs.list_jobs(ListJobsRequest {})).await?.jobs;
    let listed: BTreeSet<&str> = listed.iter().map(|j| j.job_id.as_str()).collect();
    let ours: BTreeSet<&str> = all.keys().map(String::as_str).collect();
    if listed != ours {
        return Err(format!("ListJobs lists {listed:?}, the monitor submitted {ours:?}"));
    }
    for (job_id, (_, cancelled)) in &all {
        // Re-read: the record must be the one the events lead to.
        let job = must("GetJob", jobs.get_job(GetJobRequest { job_id: job_id.clone() })).await?;
        let events = read_events(&mut jobs, job_id).await?;
        check_job(&job, &events, *cancelled, ledger).map_err(|e| format!("job {job_id}: {e}"))?;
        lock(ledger).trace.push(trace_job(&job, &events));
    }
    Ok(())
}

/// Submits the planned jobs on time, and cancels those planned to be. Returns the job ids
/// and whether a cancel succeeded.
async fn run_workload(
    scenario: &Scenario,
    jobs: &mut Jobs,
    ledger: &Shared,
) -> Result<BTreeMap<String, (Job, bool)>, String> {
    let mut submitted = BTreeMap::new();
    // (when, job id) of the cancels still to send.
    let mut cancels: Vec<(Duration, String)> = Vec::new();
    for planned in &scenario.jobs {
        send_due_cancels(jobs, &mut cancels, &mut submitted, planned.at, ledger).await?;
        sleep_until_sim(planned.at, ledger).await?;
        let job = submit(jobs, planned.workers, planned.steps).await?;
        if let Some(after) = planned.cancel_after {
            cancels.push((now() + after, job.job_id.clone()));
        }
        submitted.insert(job.job_id.clone(), (job, false));
    }
    send_due_cancels(jobs, &mut cancels, &mut submitted, Duration::MAX, ledger).await?;
    Ok(submitted)
}

async fn send_due_cancels(
    jobs: &mut Jobs,
    cancels: &mut Vec<(Duration, String)>,
    submitted: &mut BTreeMap<String, (Job, bool)>,
    until: Duration,
    ledger: &Shared,
) -> Result<(), String> {
    cancels.sort();
    while let Some((at, _)) = cancels.first()
        && *at <= until
    {
        let (at, job_id) = cancels.remove(0);
        sleep_until_sim(at, ledger).await?;
        let request = CancelJobRequest { job_id: job_id.clone(), reason: "the simulation cancels it".into() };
        let cancelled = match call("CancelJob", jobs.cancel_job(request)).await? {
            Ok(job) if job.state() == JobState::Cancelled => true,
            Ok(job) => {
                return Err(format!("CancelJob of {job_id} answered a job in state {:?}", job.state()));
            }
            Err(status) if status.code() == Code::FailedPrecondition => false,
            Err(status) => {
                return Err(format!(
                    "CancelJob of {job_id} failed: {:?} {}",
                    status.code(),
                    status.message()
                ));
            }
        };
        if let Some(entry) = submitted.get_mut(&job_id) {
            entry.1 = cancelled;
        }
    }
    Ok(())
}

/// Polls until the job is terminal.
async fn wait_terminal(
    jobs: &mut Jobs,
    ledger: &Shared,
    job_id: &str,
    deadline: Duration,
) -> Result<Job, String> {
    loop {
        let job = must("GetJob", jobs.get_job(GetJobRequest { job_id: job_id.into() })).await?;
        if job.state().is_terminal() {
            return Ok(job);
        }
        if now() > deadline {
            return Err(format!(
                "job {job_id} is still {:?} ({}) at {:?}, long after the faults were repaired",
                job.state(),
                job.reason,
                now()
            ));
        }
        sleep_until_sim(now() + Duration::from_millis(100), ledger).await?;
    }
}

async fn wait_all_terminal(
    jobs: &mut Jobs,
    ledger: &Shared,
    submitted: &BTreeMap<String, (Job, bool)>,
) -> Result<BTreeMap<String, (Job, bool)>, String> {
    let deadline = CHAOS_END + SETTLE_LIMIT;
    let mut records = BTreeMap::new();
    for (job_id, (_, cancelled)) in submitted {
        let job = wait_terminal(jobs, ledger, job_id, deadline).await?;
        records.insert(job_id.clone(), (job, *cancelled));
    }
    Ok(records)
}

/// Waits until every worker host is listed under its current incarnation with its session
/// open (invariant 1).
async fn wait_all_workers_back(jobs: &mut Jobs, scenario: &Scenario, ledger: &Shared) -> Result<(), String> {
    let deadline = now() + SETTLE_LIMIT;
    loop {
        let listed = must("ListWorkers", jobs.list_workers(ListWorkersRequest {})).await?.workers;
        let missing: Vec<String> = {
            let ledger = lock(ledger);
            (0..scenario.workers)
                .filter(|&host| {
                    let current = ledger.current[host];
                    !listed
                        .iter()
                        .any(|w| w.worker_id == worker_name(host) && w.session_open && Some(w.pid) == current)
                })
                .map(|host| format!("{} (current pid {:?})", worker_name(host), ledger.current[host]))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        if now() > deadline {
            let listed: Vec<String> = listed
                .iter()
                .map(|w| format!("{} pid {} open {}", w.worker_id, w.pid, w.session_open))
                .collect();
            return Err(format!(
                "at {:?}, long after the faults were repaired, these workers are not back: {missing:?}; the \
                 coordinator lists {listed:?}",
                now()
            ));
        }
        sleep_until_sim(now() + Duration::from_millis(100), ledger).await?;
    }
}

/// Every event of the job from revision 0, until the watch ends after the terminal one.
async fn read_events(jobs: &mut Jobs, job_id: &str) -> Result<Vec<JobEvent>, String> {
    let request = WatchJobRequest { job_id: job_id.into(), from_revision: 0 };
    let mut stream = must("WatchJob", jobs.watch_job(request)).await?;
    let mut events = Vec::new();
    loop {
        match tokio::time::timeout(RPC_DEADLINE, stream.message()).await {
            Err(_) => {
                return Err(format!(
                    "the watch of terminal job {job_id} did not end ({} events)",
                    events.len()
                ));
            }
            Ok(Err(status)) => return Err(format!("the watch of {job_id} failed: {status}")),
            Ok(Ok(None)) => return Ok(events),
            Ok(Ok(Some(event))) => events.push(event),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Invariant 3: one job's events and record

fn state(value: i32) -> JobState {
    JobState::try_from(value).unwrap_or(JobState::Unspecified)
}

fn check_job(job: &Job, events: &[JobEvent], cancelled: bool, ledger: &Shared) -> Result<(), String> {
    let mut current = JobState::Unspecified;
    let mut last_revision = 0;
    let mut steps_done = 0;
    let mut joined = 0;
    let mut lost = Vec::new();
    for event in events {
        if event.revision <= last_revision {
            return Err(format!("revision {} follows {last_revision}", event.revision));
        }
        last_revision = event.revision;
        match &event.event {
            Some(job_event::Event::StateChanged(change)) => {
                let (from, to) = (state(change.from), state(change.to));
                if from != current {
                    return Err(format!("a transition from {from:?} while the job was {current:?}"));
                }
                if !may_transition(from, to) {
                    return Err(format!("an illegal transition {from:?} → {to:?} ({})", change.reason));
                }
                current = to;
            }
            Some(job_event::Event::WorkerJoined(w)) => {
                if current != JobState::Rendezvous {
                    return Err(format!("worker {} joined while the job was {current:?}", w.worker_id));
                }
                joined += 1;
            }
            Some(job_event::Event::Step(step)) => {
                if current != JobState::Running {
                    return Err(format!("step {} summarized while the job was {current:?}", step.step));
                }
                if step.step != steps_done + 1 {
                    return Err(format!("step {} follows step {steps_done}", step.step));
                }
                if step.loss != expected_loss(&job.job_id, step.step) {
                    return Err(format!(
                        "step {} has loss {}, the workers reported another",
                        step.step, step.loss
                    ));
                }
                steps_done = step.step;
            }
            Some(job_event::Event::WorkerLost(l)) => lost.push(l.worker_id.clone()),
            // These jobs take no checkpoints and do not restart.
            Some(job_event::Event::CheckpointCommitted(_) | job_event::Event::Recovery(_)) => {
                return Err(format!(
                    "an unexpected checkpoint or recovery event at revision {}",
                    event.revision
                ));
            }
            None => return Err(format!("an empty event at revision {}", event.revision)),
        }
    }
    if events
        .first()
        .and_then(|e| e.event.as_ref())
        .is_none_or(|e| !matches!(e, job_event::Event::StateChanged(c) if state(c.to) == JobState::Pending))
    {
        return Err("the first event is not the creation (→ Pending)".into());
    }
    if job.state() != current {
        return Err(format!("the record is {:?}, its events end in {current:?}", job.state()));
    }
    if !current.is_terminal() {
        return Err(format!("it is still {current:?} at the end"));
    }
    if job.revision != last_revision {
        return Err(format!(
            "the record's revision {} is not its last event's {last_revision}",
            job.revision
        ));
    }
    if job.steps_done != steps_done {
        return Err(format!("steps_done is {}, the step events end at {steps_done}", job.steps_done));
    }
    if joined != 0 && joined != job.workers {
        return Err(format!("{joined} workers joined a job of {}", job.workers));
    }
    match current {
        JobState::Succeeded if steps_done != job.total_steps => {
            Err(format!("succeeded after {steps_done} of {} steps", job.total_steps))
        }
        JobState::Cancelled if !cancelled => {
            Err(format!("cancelled, but not by the monitor: {}", job.reason))
        }
        _ if cancelled && current != JobState::Cancelled => {
            Err(format!("the monitor's cancel succeeded, yet the job ended {current:?}"))
        }
        JobState::Failed => explained_failure(job, &lost, ledger),
        _ => Ok(()),
    }
}

/// A job may fail only because a worker was lost, and only one whose host was faulted.
fn explained_failure(job: &Job, lost: &[String], ledger: &Shared) -> Result<(), String> {
    if !job.reason.contains(" lost: ") || lost.is_empty() {
        return Err(format!("failed for a reason no injected fault explains: {}", job.reason));
    }
    let ledger = lock(ledger);
    for worker in lost {
        let host = (0..ledger.faulted_at.len()).find(|&h| worker_name(h) == *worker);
        if host.is_none_or(|h| ledger.faulted_at[h].is_empty()) {
            return Err(format!(
                "lost worker {worker}, whose host was never crashed or partitioned: {}",
                job.reason
            ));
        }
    }
    Ok(())
}

/// The job as the determinism check compares it: every event but its wall-clock time.
fn trace_job(job: &Job, events: &[JobEvent]) -> String {
    let events: Vec<String> = events
        .iter()
        .map(|e| match &e.event {
            Some(job_event::Event::StateChanged(c)) => {
                format!("{}:{:?}->{:?}({})", e.revision, state(c.from), state(c.to), c.reason)
            }
            Some(job_event::Event::WorkerJoined(w)) => {
                format!("{}:joined {} rank {}", e.revision, w.worker_id, w.rank)
            }
            Some(job_event::Event::Step(s)) => format!("{}:step {} loss {}", e.revision, s.step, s.loss),
            Some(job_event::Event::WorkerLost(l)) => {
                format!("{}:lost {} ({})", e.revision, l.worker_id, l.reason)
            }
            Some(job_event::Event::CheckpointCommitted(c)) => format!("{}:checkpoint {}", e.revision, c.step),
            Some(job_event::Event::Recovery(r)) => format!("{}:recovered ({})", e.revision, r.cause),
            None => format!("{}:empty", e.revision),
        })
        .collect();
    format!("{} {:?} {}/{} [{}]", job.job_id, job.state(), job.steps_done, job.total_steps, events.join(", "))
}

// ---------------------------------------------------------------------------------------
// The driver

/// The state directories live in memory where possible: the store fsyncs every write.
fn state_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::tempdir_in(shm)
    {
        return dir;
    }
    tempfile::tempdir().expect("a temporary directory")
}

/// What a successful run leaves to compare across runs of one seed.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    trace: Vec<String>,
    elapsed: Duration,
    snapshots: u64,
}

/// Runs one seed; the error says what went wrong.
fn run_seed(seed: u64) -> Result<Outcome, String> {
    let scenario = Scenario::generate(seed);
    let dir = state_dir();
    let ledger: Shared = Arc::new(Mutex::new(Ledger::new(&scenario)));
    let mut sim = turmoil::Builder::new()
        .simulation_duration(SIM_LIMIT)
        .tick_duration(TICK)
        .min_message_latency(MIN_LATENCY)
        .max_message_latency(MAX_LATENCY)
        .rng_seed(seed)
        .build();

    let path = dir.path().to_path_buf();
    sim.host(COORDINATOR, move || coordinator_host(path.clone()));
    for host in 0..scenario.workers {
        let (ledger, step_time) = (ledger.clone(), scenario.step_times[host]);
        sim.host(worker_name(host), move || worker_host(host, step_time, ledger.clone()));
    }
    sim.client(MONITOR, monitor(scenario.clone(), ledger.clone()));

    let describe = |e: String| {
        format!(
            "seed {seed} ({} workers, {} jobs, {} faults): {e}",
            scenario.workers,
            scenario.jobs.len(),
            scenario.faults.len()
        )
    };
    let mut actions = scenario.actions().into_iter().peekable();
    loop {
        while let Some((at, fault, begins)) = actions.next_if(|(at, _, _)| *at <= sim.elapsed()) {
            apply(&mut sim, &ledger, fault, begins, at);
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(describe(e.to_string())),
        }
    }
    let ledger = lock(&ledger);
    if let Some(v) = &ledger.violation {
        return Err(describe(v.clone()));
    }
    Ok(Outcome { trace: ledger.trace.clone(), elapsed: sim.elapsed(), snapshots: ledger.snapshots })
}

fn apply(sim: &mut turmoil::Sim<'_>, ledger: &Shared, fault: Fault, begins: bool, at: Duration) {
    let host = worker_name(fault.host);
    match (fault.kind, begins) {
        (FaultKind::Partition, true) => {
            sim.partition(host.as_str(), COORDINATOR);
            let mut ledger = lock(ledger);
            ledger.partitions[fault.host].push((at, None));
            ledger.faulted_at[fault.host].push(at);
        }
        (FaultKind::Partition, false) => {
            sim.repair(host.as_str(), COORDINATOR);
            if let Some(open) = lock(ledger).partitions[fault.host].last_mut() {
                open.1 = Some(at);
            }
        }
        (FaultKind::Spike, true) => {
            sim.set_link_max_message_latency(host.as_str(), COORDINATOR, SPIKE_LATENCY)
        }
        (FaultKind::Spike, false) => {
            sim.set_link_max_message_latency(host.as_str(), COORDINATOR, MAX_LATENCY)
        }
        (FaultKind::Crash, true) => {
            sim.crash(host.as_str());
            lock(ledger).crashed(fault.host, at);
        }
        (FaultKind::Crash, false) => sim.bounce(host.as_str()),
    }
}

/// Runs one seed, turning a panic inside the simulation into an error naming the seed.
fn run_seed_caught(seed: u64) -> Result<Outcome, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| run_seed(seed))) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("seed {seed}: panicked: {message}"))
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(value.trim().parse().unwrap_or_else(|_| panic!("{name}={value:?} is not a number")))
}

/// Runs the seeds on all cores; returns the failures in seed order.
fn run_seeds(seeds: Vec<u64>) -> Vec<String> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(seeds.len().max(1));
    let next = AtomicU64::new(0);
    let failures = Mutex::new(BTreeMap::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(&seed) = seeds.get(i) else { break };
                    let started = std::time::Instant::now();
                    let result = run_seed_caught(seed);
                    if std::env::var_os("FLOTILLA_SIM_VERBOSE").is_some() {
                        let summary = result.as_ref().map(|o| (o.elapsed, o.snapshots, o.trace.len()));
                        eprintln!("seed {seed}: {:?} wall, {summary:?}", started.elapsed());
                    }
                    if let Err(e) = result {
                        failures.lock().unwrap().insert(seed, e);
                    }
                }
            });
        }
    });
    failures.into_inner().unwrap().into_values().collect()
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn control_plane_survives_partitions_crashes_and_latency() {
    let seeds: Vec<u64> = match env_u64("FLOTILLA_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("FLOTILLA_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS)).collect(),
    };
    let count = seeds.len();
    let failures = run_seeds(seeds);
    assert!(
        failures.is_empty(),
        "{} of {count} seeds failed (rerun one with FLOTILLA_SIM_SEED=<seed>):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The same seed replays the same run: the same events with the same revisions for every
/// job, the same number of snapshots, the same end time. Not yet true for every seed (see
/// "Determinism" in the module docs).
#[test]
#[ignore = "runs are not yet bit-for-bit reproducible; see the module docs"]
fn a_seed_replays_identically() {
    for seed in 0..30 {
        let first = run_seed_caught(seed).unwrap_or_else(|e| panic!("{e}"));
        let second = run_seed_caught(seed).unwrap_or_else(|e| panic!("{e}"));
        if first != second {
            let diverged = first.trace.iter().zip(&second.trace).find(|(a, b)| a != b);
            panic!(
                "seed {seed} ran differently twice: ended at {:?} vs {:?}, {} vs {} snapshots; first differing \
                 job:\n{diverged:#?}",
                first.elapsed, second.elapsed, first.snapshots, second.snapshots
            );
        }
    }
}

/// The checker of invariant 2 rejects a worker listed alive after its crash, and only once
/// the timeout and the slack have passed.
#[test]
fn the_liveness_checker_rejects_a_dead_worker() {
    let scenario = Scenario::generate(1);
    let mut ledger = Ledger::new(&scenario);
    let token = ledger.new_token(0);
    ledger.crashed(0, Duration::from_secs(1));
    let status = WorkerStatus {
        worker_id: worker_name(0),
        pid: token,
        session_open: true,
        silent_ms: 100,
        ..Default::default()
    };
    let early = Duration::from_secs(1) + HEARTBEAT_TIMEOUT;
    assert!(ledger.check_snapshot(std::slice::from_ref(&status), early, early).is_ok());
    let late = Duration::from_secs(1) + HEARTBEAT_TIMEOUT + ALIVE_SLACK;
    let err = ledger.check_snapshot(std::slice::from_ref(&status), late, late).unwrap_err();
    assert!(err.contains("crashed at 1s"), "{err}");
}
