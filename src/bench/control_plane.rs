//! `flotilla bench control-plane`: one coordinator against many simulated workers.
//!
//! The coordinator is a child process of this binary (`flotilla coordinator`), so that the
//! CPU time and memory read from `/proc/<pid>` are its own. The workers are tasks in this
//! process, each with its own tonic `Channel` (its own TCP connection and HTTP/2 session,
//! as real workers have), speaking the worker protocol: `Register`, then the `Session`
//! stream with `SessionOpen` first and a `Heartbeat` every interval, acknowledging any
//! command. Their heartbeats are spread evenly over one interval, as in a cluster whose
//! workers started at different times.
//!
//! Phases: start the coordinator; connect every worker; let heartbeats settle for two
//! intervals; measure for `--measure-seconds` (the coordinator's CPU, its heartbeat
//! handling latency as it reports it in `ListWorkers`, the latency of unary calls seen from
//! a client, memory); then kill workers two ways and time how long the coordinator takes to
//! stop listing them: hung workers (heartbeats stop, the connection stays open) and
//! dropped ones (the TCP connection is shut down under the worker, as when its process is
//! SIGKILLed and the kernel closes its sockets).
//!
//! Linux only: it reads `/proc`.

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Args;
use flotilla_proto::PROTOCOL_VERSION;
use flotilla_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use flotilla_proto::v1::job_service_client::JobServiceClient;
use flotilla_proto::v1::{
    Ack, CoordinatorMessage, Heartbeat, ListJobsRequest, ListWorkersRequest, ListWorkersResponse,
    SessionOpen, WorkerInfo, WorkerMessage, worker_message,
};
use hyper_util::rt::TokioIo;
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::codegen::Service;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Args)]
pub struct ControlPlaneArgs {
    /// Simulated workers, each with its own connection to the coordinator.
    #[arg(long, default_value_t = 2048)]
    workers: u32,
    /// How often workers heartbeat (the coordinator's --heartbeat-interval-ms).
    #[arg(long, default_value_t = 1000)]
    heartbeat_interval_ms: u64,
    /// A worker silent this long is lost (the coordinator's --heartbeat-timeout-ms).
    #[arg(long, default_value_t = 5000)]
    heartbeat_timeout_ms: u64,
    /// Length of the steady-state measurement window.
    #[arg(long, default_value_t = 30)]
    measure_seconds: u64,
    /// Workers killed of each kind (hung, dropped) after the window.
    #[arg(long, default_value_t = 5)]
    kills: u32,
    /// How often `ListWorkers` is polled while waiting for a killed worker to be dropped
    /// (the resolution of the detection times).
    #[arg(long, default_value_t = 25)]
    poll_ms: u64,
    /// How often the window's client-side probe calls `ListWorkers` (0: only at the
    /// window's ends). Each call walks every worker inside the cluster actor.
    #[arg(long, default_value_t = 1000)]
    list_workers_every_ms: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Connections being set up at once; more would overflow the listener's accept backlog
/// and wait for SYN retransmissions.
const CONNECT_CONCURRENCY: usize = 128;
/// How long the coordinator may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Open files this process needs besides the workers' sockets (runtime, probes, stdio).
const FD_MARGIN: u64 = 128;
/// Unary calls made during the window by the client-side probe.
const PROBE_PERIOD: Duration = Duration::from_millis(100);
/// Linux's USER_HZ, the unit of utime and stime in /proc/<pid>/stat: 100 on every
/// architecture Linux exposes to user space through /proc.
const TICKS_PER_SECOND: f64 = 100.0;
/// Heartbeat intervals between the last worker connecting and the window opening.
const SETTLE_INTERVALS: u32 = 5;

pub fn run(args: ControlPlaneArgs) -> Result<()> {
    validate(&args)?;
    check_open_files(args.workers)?;
    let client_threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(client_threads)
        .enable_all()
        .build()
        .context("starting the clients' async runtime")?;
    let coordinator = CoordinatorProcess::start(&args)?;
    let result = runtime.block_on(bench(&args, &coordinator, client_threads));
    // The coordinator first, so that it spends nothing on the clients going away; then the
    // clients, without waiting for 2,048 tasks to notice.
    let log = coordinator.stop();
    runtime.shutdown_background();
    let mut report = result?;
    report.coordinator_log_lines = log.lines;
    report.coordinator_log_tail = log.tail;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("writing the report as JSON")?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn validate(args: &ControlPlaneArgs) -> Result<()> {
    ensure!(args.workers >= 1, "--workers must be at least 1");
    ensure!(args.heartbeat_interval_ms >= 1, "--heartbeat-interval-ms must be at least 1");
    ensure!(args.measure_seconds >= 1, "--measure-seconds must be at least 1");
    ensure!(args.poll_ms >= 1, "--poll-ms must be at least 1");
    ensure!(
        u64::from(args.kills) * 2 < u64::from(args.workers),
        "--workers {} must exceed twice --kills {} (a hung and a dropped worker each, and one left)",
        args.workers,
        args.kills
    );
    // The heartbeat timeout against the interval is the coordinator's to check: it refuses
    // to start with a bad pair, and its message is passed on.
    Ok(())
}

/// Each worker holds two descriptors here (its socket and the duplicate that kills it); the
/// coordinator, which inherits the limit, holds one per worker.
fn check_open_files(workers: u32) -> Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    let soft = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .context("no `Max open files` in /proc/self/limits")?;
    let Ok(soft) = soft.parse::<u64>() else {
        return Ok(()); // "unlimited"
    };
    let needed = 2 * u64::from(workers) + FD_MARGIN;
    ensure!(
        soft >= needed,
        "the open-file limit (`ulimit -n`) is {soft}, but --workers {workers} needs {needed} here \
         (two per worker: its socket and the duplicate that kills it) and {} in the coordinator; \
         raise it with `ulimit -n {needed}`",
        u64::from(workers) + FD_MARGIN
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The coordinator process

/// What the coordinator wrote to stderr after it started listening.
#[derive(Default)]
struct Log {
    lines: u64,
    tail: Vec<String>,
}

const LOG_TAIL: usize = 20;

/// The coordinator child, killed and reaped when dropped, whatever way the bench ends.
struct CoordinatorProcess {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    // Dropped after the child is reaped (fields drop after `drop`).
    _state_dir: tempfile::TempDir,
}

impl CoordinatorProcess {
    /// Starts `flotilla coordinator` on an ephemeral loopback port and waits for the line
    /// that says where it listens. Port 0 lets the kernel choose a free port atomically;
    /// choosing one here and passing it on would race other processes for it.
    fn start(args: &ControlPlaneArgs) -> Result<CoordinatorProcess> {
        let exe = std::env::current_exe().context("locating the flotilla binary to start the coordinator")?;
        let state_dir =
            tempfile::tempdir().context("creating a temporary state directory for the coordinator")?;
        let mut child = Command::new(&exe)
            .arg("coordinator")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--state-dir")
            .arg(state_dir.path())
            .args(["--heartbeat-interval-ms", &args.heartbeat_interval_ms.to_string()])
            .args(["--heartbeat-timeout-ms", &args.heartbeat_timeout_ms.to_string()])
            // Warnings only, whatever the caller's RUST_LOG: logging per worker would be
            // measured as the coordinator's CPU.
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the coordinator ({} coordinator)", exe.display()))?;
        let stderr = child.stderr.take();
        let log = Arc::new(Mutex::new(Log::default()));
        // From here on, every way out kills and reaps the child.
        let mut process = CoordinatorProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log: log.clone(),
            _state_dir: state_dir,
        };
        let stderr = stderr.context("the coordinator's stderr was not captured")?;
        let (found, listening) = std::sync::mpsc::channel::<std::result::Result<SocketAddr, String>>();
        std::thread::Builder::new()
            .name("coordinator-stderr".into())
            .spawn(move || read_stderr(stderr, found, log))
            .context("starting the thread that reads the coordinator's stderr")?;
        match listening.recv_timeout(START_TIMEOUT) {
            Ok(Ok(addr)) => {
                process.addr = addr;
                Ok(process)
            }
            Ok(Err(output)) => {
                let status = process.child.wait().context("waiting for the coordinator")?;
                bail!("the coordinator did not start ({status}): {}", output.trim())
            }
            Err(_) => {
                bail!("the coordinator did not say where it listens within {} s", START_TIMEOUT.as_secs())
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills and reaps the child; returns what it logged.
    fn stop(mut self) -> Log {
        self.kill();
        self.log.lock().map(|mut log| std::mem::take(&mut *log)).unwrap_or_default()
    }

    fn kill(&mut self) {
        // Fails harmlessly when the child already exited; waiting reaps it either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads the coordinator's stderr: until the "listening on ADDR" line, everything is kept
/// for an error message; after it, lines are counted and the last few kept.
fn read_stderr(
    stderr: std::process::ChildStderr,
    found: std::sync::mpsc::Sender<std::result::Result<SocketAddr, String>>,
    log: Arc<Mutex<Log>>,
) {
    let mut before = String::new();
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let Ok(line) = line else { break };
        let addr = line
            .split_once("listening on ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|addr| addr.parse::<SocketAddr>().ok());
        if let Some(addr) = addr {
            let _ = found.send(Ok(addr));
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if let Ok(mut log) = log.lock() {
                    log.lines += 1;
                    if log.tail.len() == LOG_TAIL {
                        log.tail.remove(0);
                    }
                    log.tail.push(line);
                }
            }
            return;
        }
        before.push_str(&line);
        before.push('\n');
    }
    let _ = found.send(Err(before));
}

/// CPU time (user + system) and memory of a process, from /proc.
struct ProcSample {
    at: Instant,
    cpu_seconds: f64,
}

fn cpu_sample(pid: &str) -> Result<ProcSample> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let at = Instant::now();
    // The command name (field 2) may hold spaces; the fields after its ')' are fixed.
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest).context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let ticks = |field: usize| -> Result<f64> {
        let value = fields.get(field - 3).with_context(|| format!("{path}: no field {field}"))?;
        Ok(value.parse::<u64>().with_context(|| format!("{path}: field {field} is {value:?}"))? as f64)
    };
    Ok(ProcSample { at, cpu_seconds: (ticks(14)? + ticks(15)?) / TICKS_PER_SECOND })
}

fn cores_between(start: &ProcSample, end: &ProcSample) -> f64 {
    let wall = end.at.duration_since(start.at).as_secs_f64();
    if wall > 0.0 { (end.cpu_seconds - start.cpu_seconds) / wall } else { 0.0 }
}

/// A field of /proc/<pid>/status: a number, in kB for the memory ones.
fn status_field(pid: &str, name: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let value = status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .with_context(|| format!("{path}: no {name}"))?;
    let number = value.split_whitespace().next().unwrap_or_default();
    number.parse().with_context(|| format!("{path}: {name} is {value:?}"))
}

// ---------------------------------------------------------------------------------------
// Simulated workers

/// A connector that keeps a duplicate of the connection's socket, so that the bench can
/// shut the connection down under the worker, as the kernel does when a process dies.
#[derive(Clone)]
struct KillableConnector {
    addr: SocketAddr,
    socket: Arc<Mutex<Option<std::net::TcpStream>>>,
}

type ConnectFuture = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<tokio::net::TcpStream>>> + Send>>;

impl Service<Uri> for KillableConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let addr = self.addr;
        let slot = self.socket.clone();
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            // As real workers: heartbeats are small and must not wait for Nagle.
            stream.set_nodelay(true)?;
            let twin = std::net::TcpStream::from(stream.as_fd().try_clone_to_owned()?);
            if let Ok(mut slot) = slot.lock() {
                *slot = Some(twin);
            }
            Ok(TokioIo::new(stream))
        })
    }
}

/// What the bench can do to a running worker, and what the worker tells it.
struct WorkerControl {
    /// Stop heartbeating, keep the connection and keep reading (a hung process).
    hang: AtomicBool,
    /// When the last heartbeat was queued, in nanoseconds since the bench's epoch.
    last_heartbeat_ns: AtomicU64,
    heartbeats: AtomicU64,
    socket: Arc<Mutex<Option<std::net::TcpStream>>>,
}

struct SimWorker {
    id: String,
    control: Arc<WorkerControl>,
    task: JoinHandle<()>,
}

impl SimWorker {
    /// Shuts the connection down (both directions, as the kernel does for a dead process)
    /// and stops the task.
    fn drop_connection(&self) -> Result<()> {
        let socket = self.control.socket.lock().map_err(|_| anyhow!("a worker's socket lock is poisoned"))?;
        let socket = socket.as_ref().with_context(|| format!("worker {} has no socket", self.id))?;
        socket
            .shutdown(Shutdown::Both)
            .with_context(|| format!("shutting down worker {}'s socket", self.id))?;
        self.task.abort();
        Ok(())
    }
}

struct Shared {
    addr: SocketAddr,
    interval: Duration,
    workers: u32,
    /// Heartbeat phases are offsets from this instant.
    epoch: Instant,
    /// Sessions that ended while the bench did not end them: (worker, why).
    ended: mpsc::UnboundedSender<(String, String)>,
}

fn worker_id(index: u32) -> String {
    format!("bench-{index:05}")
}

fn worker_info(index: u32) -> WorkerInfo {
    WorkerInfo {
        worker_id: worker_id(index),
        host: "bench-host".into(),
        cores: 1,
        // Never dialed: no job runs. Unique, as real ones are.
        data_plane_address: format!("127.0.0.1:{}", 10_000 + index % 50_000),
        protocol_version: PROTOCOL_VERSION,
        node_id: format!("bench-node-{}", index / 8),
        local_rank: index % 8,
        pid: std::process::id(),
        ..Default::default()
    }
}

/// Connects, registers and opens the session; returns what the heartbeat loop needs.
async fn connect_worker(
    shared: &Shared,
    index: u32,
    socket: Arc<Mutex<Option<std::net::TcpStream>>>,
) -> Result<(CoordinatorServiceClient<Channel>, mpsc::Sender<WorkerMessage>, Streaming<CoordinatorMessage>)> {
    let id = worker_id(index);
    let endpoint = Endpoint::from_shared(format!("http://{}", shared.addr))
        .context("the coordinator's URL")?
        .connect_timeout(Duration::from_secs(10))
        // As real workers (flotilla_worker::agent): pings notice a vanished coordinator.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect_with_connector(KillableConnector { addr: shared.addr, socket })
        .await
        .with_context(|| format!("worker {id}: connecting to {}", shared.addr))?;
    let mut client = CoordinatorServiceClient::new(channel);
    let registration = client
        .register(worker_info(index))
        .await
        .map_err(|s| anyhow!("worker {id}: Register failed: {} ({:?})", s.message(), s.code()))?
        .into_inner();
    let (tx, rx) = mpsc::channel(64);
    let open = WorkerMessage {
        body: Some(worker_message::Body::Open(SessionOpen {
            worker_id: registration.worker_id.clone(),
            session_id: registration.session_id.clone(),
        })),
    };
    tx.send(open).await.map_err(|_| anyhow!("worker {id}: the session's request stream closed"))?;
    let inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|s| anyhow!("worker {id}: Session failed: {} ({:?})", s.message(), s.code()))?
        .into_inner();
    Ok((client, tx, inbound))
}

/// Heartbeats at the worker's phase of the interval and acknowledges commands, until the
/// session ends or the task is aborted.
async fn heartbeat_loop(
    shared: Arc<Shared>,
    index: u32,
    control: Arc<WorkerControl>,
    // Kept so that the connection lives as long as the worker.
    _client: CoordinatorServiceClient<Channel>,
    tx: mpsc::Sender<WorkerMessage>,
    mut inbound: Streaming<CoordinatorMessage>,
) {
    let id = worker_id(index);
    let interval = shared.interval;
    // Worker i's heartbeats fall at epoch + i/n of the interval + k intervals.
    let phase = interval.mul_f64(f64::from(index) / f64::from(shared.workers));
    let now = Instant::now();
    let mut first = shared.epoch + phase;
    while first < now {
        first += interval;
    }
    let mut ticker = tokio::time::interval_at(first.into(), interval);
    // As real workers: a late tick delays the next ones rather than bursting.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sequence = 0;
    let why = loop {
        tokio::select! {
            _ = ticker.tick() => {
                if control.hang.load(Ordering::SeqCst) {
                    continue;
                }
                sequence += 1;
                let beat = Heartbeat { sequence, sent_unix_ms: unix_ms() };
                control.last_heartbeat_ns.store(nanos_since(shared.epoch), Ordering::SeqCst);
                control.heartbeats.fetch_add(1, Ordering::Relaxed);
                let message = WorkerMessage { body: Some(worker_message::Body::Heartbeat(beat)) };
                if tx.try_send(message).is_err() {
                    break "the request stream is full or closed".to_string();
                }
            }
            command = inbound.message() => match command {
                Ok(Some(command)) => {
                    let ack = Ack { command_id: command.command_id, ..Ack::default() };
                    if tx.try_send(WorkerMessage { body: Some(worker_message::Body::Ack(ack)) }).is_err() {
                        break "the request stream is full or closed".to_string();
                    }
                }
                Ok(None) => break "the coordinator closed the session".to_string(),
                Err(status) => break format!("{:?}: {}", status.code(), status.message()),
            },
        }
    };
    let _ = shared.ended.send((id, why));
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn nanos_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Starts every worker, at most [`CONNECT_CONCURRENCY`] connecting at once; returns when
/// all have their session open.
async fn start_workers(shared: &Arc<Shared>) -> Result<Vec<SimWorker>> {
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let (ready_tx, mut ready) = mpsc::unbounded_channel::<Result<()>>();
    let mut workers = Vec::with_capacity(shared.workers as usize);
    for index in 0..shared.workers {
        let control = Arc::new(WorkerControl {
            hang: AtomicBool::new(false),
            last_heartbeat_ns: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            socket: Arc::new(Mutex::new(None)),
        });
        let task = tokio::spawn({
            let shared = shared.clone();
            let control = control.clone();
            let gate = gate.clone();
            let ready = ready_tx.clone();
            async move {
                let connected = {
                    let Ok(_permit) = gate.acquire().await else { return };
                    connect_worker(&shared, index, control.socket.clone()).await
                };
                match connected {
                    Ok((client, tx, inbound)) => {
                        let _ = ready.send(Ok(()));
                        heartbeat_loop(shared, index, control, client, tx, inbound).await;
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            }
        });
        workers.push(SimWorker { id: worker_id(index), control, task });
    }
    drop(ready_tx);
    let mut failure = None;
    for _ in 0..shared.workers {
        match ready.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                failure = Some(e);
                break;
            }
            None => {
                failure = Some(anyhow!("a worker task ended before connecting"));
                break;
            }
        }
    }
    if let Some(e) = failure {
        for worker in &workers {
            worker.task.abort();
        }
        return Err(e.context("starting the simulated workers"));
    }
    Ok(workers)
}

// ---------------------------------------------------------------------------------------
// The measurement

#[derive(serde::Serialize, Default)]
struct Report {
    workers: u32,
    heartbeat_interval_ms: u64,
    heartbeat_timeout_ms: u64,
    measure_seconds: f64,
    machine_cores: usize,
    coordinator: CoordinatorFigures,
    clients: ClientFigures,
    heartbeats: HeartbeatFigures,
    client_rtt: ClientRtt,
    detection: Detection,
    goals: Goals,
    /// Lines the coordinator wrote to stderr (warnings and errors) after it started.
    coordinator_log_lines: u64,
    coordinator_log_tail: Vec<String>,
}

#[derive(serde::Serialize, Default)]
struct CoordinatorFigures {
    /// Threads of the coordinator process at the end of the window.
    threads: u64,
    /// CPU time over the window ÷ its wall time.
    cpu_cores: f64,
    cpu_seconds: f64,
    rss_idle_kib: u64,
    rss_kib: u64,
    hwm_kib: u64,
    /// (RSS with the workers − RSS idle) ÷ workers.
    rss_per_worker_kib: f64,
}

#[derive(serde::Serialize, Default)]
struct ClientFigures {
    runtime_worker_threads: usize,
    process_threads: u64,
    cpu_cores: f64,
    /// Time to connect, register and open the session of every worker.
    connect_all_s: f64,
}

#[derive(serde::Serialize, Default)]
struct HeartbeatFigures {
    /// Heartbeats the coordinator handled during the window, per second.
    handled_per_s: f64,
    expected_per_s: f64,
    /// The coordinator's figures at the end of the window, over its last `window`
    /// heartbeats, which span `covers_s` seconds.
    window: u32,
    covers_s: f64,
    /// How many of those were handled before the measurement window opened (0: all of
    /// them are steady-state).
    from_before_window: u64,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
    /// Workers listed with an open session at the end of the window.
    listed: usize,
    /// The longest `silent_ms` listed at the end of the window.
    max_silent_ms: u64,
    /// Sessions that ended during the window though nothing killed them.
    unexpected_session_ends: usize,
    sent_by_clients_per_s: f64,
}

#[derive(serde::Serialize, Default)]
struct Rtt {
    calls: usize,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
}

/// Round trips of unary calls made from this process during the window: what a client
/// sees, including this process's own scheduling on the shared cores.
#[derive(serde::Serialize, Default)]
struct ClientRtt {
    /// `ListJobs` (no jobs: a store read), every 100 ms.
    list_jobs: Rtt,
    /// `ListWorkers` (every worker, through the cluster actor's mailbox), every
    /// `--list-workers-every-ms`, and at the window's ends.
    list_workers: Rtt,
}

#[derive(serde::Serialize, Default)]
struct Kills {
    /// From the kill to the first `ListWorkers` answer without the worker, per worker.
    detect_ms: Vec<f64>,
    median_ms: f64,
    max_ms: f64,
    /// From the worker's last heartbeat to the same answer.
    since_last_heartbeat_ms: Vec<f64>,
    /// The largest `since_last_heartbeat_ms` minus the heartbeat timeout: how late after
    /// its deadline a silent worker was seen gone (detection delay plus resolution).
    max_past_deadline_ms: f64,
}

#[derive(serde::Serialize, Default)]
struct Detection {
    poll_ms: u64,
    /// A `ListWorkers` round trip while polling (adds to the resolution).
    poll_rtt_p50_ms: f64,
    /// `poll_ms` plus the longest poll round trip: a worker may have been gone this long
    /// before a poll saw it.
    resolution_ms: f64,
    hung: Kills,
    dropped: Kills,
    /// Workers no longer listed that were not killed.
    false_losses: usize,
}

#[derive(serde::Serialize, Default)]
struct Goals {
    under_one_core: bool,
    p99_under_10ms: bool,
    detection_within_timeout: bool,
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn rtt(mut samples: Vec<u64>) -> Rtt {
    samples.sort_unstable();
    Rtt {
        calls: samples.len(),
        p50_us: percentile(&samples, 0.5),
        p99_us: percentile(&samples, 0.99),
        max_us: samples.last().copied().unwrap_or(0),
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn status_error(what: &str) -> impl FnOnce(tonic::Status) -> anyhow::Error + '_ {
    move |s| anyhow!("{what}: {} ({:?})", s.message(), s.code())
}

async fn list_workers(client: &mut JobServiceClient<Channel>) -> Result<(ListWorkersResponse, u64)> {
    let start = Instant::now();
    let response =
        client.list_workers(ListWorkersRequest {}).await.map_err(status_error("ListWorkers"))?.into_inner();
    Ok((response, duration_us(start.elapsed())))
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

async fn bench(
    args: &ControlPlaneArgs,
    coordinator: &CoordinatorProcess,
    client_threads: usize,
) -> Result<Report> {
    let pid = coordinator.pid().to_string();
    let self_pid = std::process::id().to_string();
    let interval = Duration::from_millis(args.heartbeat_interval_ms);
    let timeout = Duration::from_millis(args.heartbeat_timeout_ms);
    let mut report = Report {
        workers: args.workers,
        heartbeat_interval_ms: args.heartbeat_interval_ms,
        heartbeat_timeout_ms: args.heartbeat_timeout_ms,
        machine_cores: client_threads,
        ..Report::default()
    };
    report.clients.runtime_worker_threads = client_threads;

    let probe_channel = Endpoint::from_shared(format!("http://{}", coordinator.addr))
        .context("the coordinator's URL")?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to the coordinator at {}", coordinator.addr))?;
    let mut jobs = JobServiceClient::new(probe_channel.clone());
    // Responses list every worker: allow more than tonic's default 4 MiB.
    let mut list = JobServiceClient::new(probe_channel).max_decoding_message_size(64 << 20);
    report.coordinator.rss_idle_kib = status_field(&pid, "VmRSS")?;

    let (ended_tx, mut ended) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        addr: coordinator.addr,
        interval,
        workers: args.workers,
        epoch: Instant::now(),
        ended: ended_tx,
    });
    let connecting = Instant::now();
    let workers = start_workers(&shared).await?;
    report.clients.connect_all_s = connecting.elapsed().as_secs_f64();
    // Heartbeats settle at their phases before the window opens, and the coordinator's
    // latency window (its last 65,536 heartbeats, 32 s at 2,048/s) has moved past the
    // connection burst by the window's end; `from_before_window` says if it has not.
    tokio::time::sleep(SETTLE_INTERVALS * interval).await;
    let (start_list, _) = list_workers(&mut list).await?;
    ensure!(
        start_list.workers.len() == args.workers as usize,
        "the coordinator lists {} workers before the window, not {}",
        start_list.workers.len(),
        args.workers
    );
    let start_stats = start_list.heartbeats.unwrap_or_default();
    drop(start_list);

    // The window: CPU at both ends, one ListWorkers per second, one ListJobs per 100 ms.
    let sent_start: u64 = workers.iter().map(|w| w.control.heartbeats.load(Ordering::Relaxed)).sum();
    let cpu_start = cpu_sample(&pid)?;
    let self_start = cpu_sample(&self_pid)?;
    let window = Duration::from_secs(args.measure_seconds);
    let window_end = tokio::time::Instant::now() + window;
    let list_every = match args.list_workers_every_ms {
        0 => window * 2,
        ms => Duration::from_millis(ms),
    };
    let mut list_ticker = tokio::time::interval_at(tokio::time::Instant::now() + list_every, list_every);
    list_ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut probe_ticker = tokio::time::interval(PROBE_PERIOD);
    probe_ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut list_rtts = Vec::new();
    let mut jobs_rtts = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(window_end) => break,
            _ = list_ticker.tick() => {
                let (response, us) = list_workers(&mut list).await?;
                list_rtts.push(us);
                drop(response);
            }
            _ = probe_ticker.tick() => {
                let start = Instant::now();
                jobs.list_jobs(ListJobsRequest {}).await.map_err(status_error("ListJobs"))?;
                jobs_rtts.push(duration_us(start.elapsed()));
            }
        }
    }
    let cpu_end = cpu_sample(&pid)?;
    let self_end = cpu_sample(&self_pid)?;
    let sent_end: u64 = workers.iter().map(|w| w.control.heartbeats.load(Ordering::Relaxed)).sum();
    let (end_list, us) = list_workers(&mut list).await?;
    list_rtts.push(us);
    let end_stats = end_list.heartbeats.unwrap_or_default();
    let wall = cpu_end.at.duration_since(cpu_start.at).as_secs_f64();
    report.measure_seconds = wall;

    report.coordinator.cpu_cores = cores_between(&cpu_start, &cpu_end);
    report.coordinator.cpu_seconds = cpu_end.cpu_seconds - cpu_start.cpu_seconds;
    report.coordinator.rss_kib = status_field(&pid, "VmRSS")?;
    report.coordinator.hwm_kib = status_field(&pid, "VmHWM")?;
    report.coordinator.threads = status_field(&pid, "Threads")?;
    report.coordinator.rss_per_worker_kib = (report.coordinator.rss_kib as f64
        - report.coordinator.rss_idle_kib as f64)
        / f64::from(args.workers);
    report.clients.cpu_cores = cores_between(&self_start, &self_end);
    report.clients.process_threads = status_field(&self_pid, "Threads")?;

    let h = &mut report.heartbeats;
    h.handled_per_s = end_stats.handled.saturating_sub(start_stats.handled) as f64 / wall;
    h.expected_per_s = f64::from(args.workers) / interval.as_secs_f64();
    h.sent_by_clients_per_s = sent_end.saturating_sub(sent_start) as f64 / wall;
    h.window = end_stats.window;
    h.p50_us = end_stats.p50_us;
    h.p99_us = end_stats.p99_us;
    h.max_us = end_stats.max_us;
    h.covers_s = f64::from(end_stats.window) / h.handled_per_s.max(1.0);
    // The window holds the last `window` heartbeats handled: those numbered from
    // handled − window; the measurement window's first was numbered start.handled.
    h.from_before_window =
        start_stats.handled.saturating_sub(end_stats.handled.saturating_sub(u64::from(end_stats.window)));
    h.listed = end_list.workers.iter().filter(|w| w.session_open).count();
    h.max_silent_ms = end_list.workers.iter().map(|w| w.silent_ms).max().unwrap_or(0);
    let mut unexpected = Vec::new();
    while let Ok(end) = ended.try_recv() {
        unexpected.push(end);
    }
    h.unexpected_session_ends = unexpected.len();
    report.client_rtt = ClientRtt { list_jobs: rtt(jobs_rtts), list_workers: rtt(list_rtts) };

    report.detection = detect(args, &shared, &workers, &mut list).await?;
    report.goals = Goals {
        under_one_core: report.coordinator.cpu_cores < 1.0,
        p99_under_10ms: report.heartbeats.p99_us < 10_000,
        // A silent worker is lost when the timeout after its last heartbeat runs out; a
        // hang just after a heartbeat is the worst case, so "within the timeout" is judged
        // from the last heartbeat, allowing the measurement's resolution.
        detection_within_timeout: report.detection.false_losses == 0
            && !report.detection.hung.detect_ms.is_empty()
            && report.detection.hung.max_past_deadline_ms <= report.detection.resolution_ms
            && report.detection.dropped.max_ms <= timeout.as_secs_f64() * 1e3,
    };
    for worker in &workers {
        worker.task.abort();
    }
    Ok(report)
}

/// Workers to kill: spread over the id range, `kills` to hang then `kills` to drop.
fn victims(workers: u32, kills: u32) -> Vec<u32> {
    let n = 2 * kills;
    (0..n).map(|k| ((u64::from(k) * 2 + 1) * u64::from(workers) / (2 * u64::from(n))) as u32).collect()
}

/// Hangs `kills` workers at moments spread over one interval, then drops the connections
/// of `kills` others one at a time, and times how long each stays listed.
async fn detect(
    args: &ControlPlaneArgs,
    shared: &Shared,
    workers: &[SimWorker],
    list: &mut JobServiceClient<Channel>,
) -> Result<Detection> {
    let mut detection = Detection { poll_ms: args.poll_ms, ..Detection::default() };
    if args.kills == 0 {
        return Ok(detection);
    }
    let interval = shared.interval;
    let give_up = Duration::from_millis(args.heartbeat_timeout_ms) * 3 + Duration::from_secs(5);
    let poll = Duration::from_millis(args.poll_ms);
    let chosen = victims(args.workers, args.kills);
    let (hung, dropped) = chosen.split_at(args.kills as usize);
    let mut poll_rtts = Vec::new();

    // Hung: spread over one interval so the kills fall at different heartbeat phases.
    let mut killed_at: BTreeMap<String, (Instant, usize)> = BTreeMap::new();
    let hang_start = tokio::time::Instant::now();
    let mut next_hang = 0;
    let mut found: BTreeMap<String, Instant> = BTreeMap::new();
    let deadline = Instant::now() + give_up + interval;
    while found.len() < hung.len() {
        ensure!(Instant::now() < deadline, "hung workers still listed after {} s", give_up.as_secs());
        while next_hang < hung.len() {
            let at = hang_start + interval.mul_f64(next_hang as f64 / hung.len() as f64);
            if tokio::time::Instant::now() < at {
                break;
            }
            let worker = &workers[hung[next_hang] as usize];
            worker.control.hang.store(true, Ordering::SeqCst);
            killed_at.insert(worker.id.clone(), (Instant::now(), hung[next_hang] as usize));
            next_hang += 1;
        }
        let (response, us) = list_workers(list).await?;
        let answered = Instant::now();
        poll_rtts.push(us);
        let listed: HashSet<&str> = response.workers.iter().map(|w| w.worker_id.as_str()).collect();
        for id in killed_at.keys() {
            if !listed.contains(id.as_str()) {
                found.entry(id.clone()).or_insert(answered);
            }
        }
        tokio::time::sleep(poll).await;
    }
    let timeout_ms = args.heartbeat_timeout_ms as f64;
    detection.hung = kills_from(&killed_at, &found, workers, shared.epoch, timeout_ms);

    // Dropped: one at a time, each polled until it is gone.
    let mut dropped_at = BTreeMap::new();
    let mut dropped_found = BTreeMap::new();
    for &index in dropped {
        let worker = &workers[index as usize];
        let at = Instant::now();
        worker.drop_connection()?;
        dropped_at.insert(worker.id.clone(), (at, index as usize));
        let deadline = at + give_up;
        loop {
            ensure!(
                Instant::now() < deadline,
                "worker {} still listed after {} s",
                worker.id,
                give_up.as_secs()
            );
            let (response, us) = list_workers(list).await?;
            let answered = Instant::now();
            poll_rtts.push(us);
            if !response.workers.iter().any(|w| w.worker_id == worker.id) {
                dropped_found.insert(worker.id.clone(), answered);
                break;
            }
            tokio::time::sleep(poll).await;
        }
    }
    detection.dropped = kills_from(&dropped_at, &dropped_found, workers, shared.epoch, timeout_ms);

    let (response, us) = list_workers(list).await?;
    poll_rtts.push(us);
    let killed: HashSet<&str> = chosen.iter().map(|&i| workers[i as usize].id.as_str()).collect();
    let listed = response.workers.iter().filter(|w| !killed.contains(w.worker_id.as_str())).count();
    detection.false_losses = (args.workers as usize - chosen.len()).saturating_sub(listed);
    poll_rtts.sort_unstable();
    detection.poll_rtt_p50_ms = percentile(&poll_rtts, 0.5) as f64 / 1e3;
    detection.resolution_ms = args.poll_ms as f64 + poll_rtts.last().copied().unwrap_or(0) as f64 / 1e3;
    Ok(detection)
}

fn kills_from(
    killed: &BTreeMap<String, (Instant, usize)>,
    found: &BTreeMap<String, Instant>,
    workers: &[SimWorker],
    epoch: Instant,
    timeout_ms: f64,
) -> Kills {
    let mut kills = Kills::default();
    for (id, &(at, index)) in killed {
        let Some(&gone) = found.get(id) else { continue };
        kills.detect_ms.push(gone.duration_since(at).as_secs_f64() * 1e3);
        let last =
            epoch + Duration::from_nanos(workers[index].control.last_heartbeat_ns.load(Ordering::SeqCst));
        kills.since_last_heartbeat_ms.push(gone.duration_since(last).as_secs_f64() * 1e3);
    }
    kills.median_ms = median(&kills.detect_ms);
    kills.max_ms = kills.detect_ms.iter().copied().fold(f64::NAN, f64::max);
    kills.max_past_deadline_ms =
        kills.since_last_heartbeat_ms.iter().copied().fold(f64::NAN, f64::max) - timeout_ms;
    kills
}

// ---------------------------------------------------------------------------------------
// Printing

fn yes(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn list_ms(values: &[f64]) -> String {
    values.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", ")
}

fn print_report(r: &Report) {
    let c = &r.coordinator;
    let h = &r.heartbeats;
    println!(
        "control plane: {} workers, heartbeat every {} ms, timeout {} ms, {:.1} s window, {} cores shared by coordinator and clients",
        r.workers, r.heartbeat_interval_ms, r.heartbeat_timeout_ms, r.measure_seconds, r.machine_cores
    );
    println!("  connect + register + open session, all workers: {:.2} s", r.clients.connect_all_s);
    println!("coordinator (child process, {} threads)", c.threads);
    println!(
        "  CPU                        {:.3} cores ({:.2} s over the window)",
        c.cpu_cores, c.cpu_seconds
    );
    println!(
        "  memory                     RSS {:.1} MiB (idle {:.1} MiB, {:.1} KiB per worker), peak {:.1} MiB",
        c.rss_kib as f64 / 1024.0,
        c.rss_idle_kib as f64 / 1024.0,
        c.rss_per_worker_kib,
        c.hwm_kib as f64 / 1024.0
    );
    println!(
        "  heartbeats handled         {:.0}/s (expected {:.0}/s; clients sent {:.0}/s)",
        h.handled_per_s, h.expected_per_s, h.sent_by_clients_per_s
    );
    println!(
        "  handling latency           p50 {} µs, p99 {} µs, max {} µs (the last {} heartbeats, {:.1} s; {} of them before the window)",
        h.p50_us, h.p99_us, h.max_us, h.window, h.covers_s, h.from_before_window
    );
    println!(
        "  listed at the end          {} with open sessions, longest silence {} ms, {} sessions ended unexpectedly",
        h.listed, h.max_silent_ms, h.unexpected_session_ends
    );
    println!(
        "clients (this process, {} runtime threads, {} threads in all): CPU {:.3} cores",
        r.clients.runtime_worker_threads, r.clients.process_threads, r.clients.cpu_cores
    );
    let j = &r.client_rtt.list_jobs;
    let w = &r.client_rtt.list_workers;
    println!(
        "  unary round trip seen by a client: ListJobs p50 {} µs, p99 {} µs, max {} µs ({} calls); ListWorkers p50 {} µs, max {} µs ({} calls)",
        j.p50_us, j.p99_us, j.max_us, j.calls, w.p50_us, w.max_us, w.calls
    );
    let d = &r.detection;
    println!(
        "detection (ListWorkers polled every {} ms, a poll takes {:.1} ms: resolution {:.0} ms)",
        d.poll_ms, d.poll_rtt_p50_ms, d.resolution_ms
    );
    println!(
        "  hung (no heartbeats, connection open): median {:.0} ms, max {:.0} ms from the hang [{}]; from the last heartbeat [{}], at most {:.0} ms past the deadline",
        d.hung.median_ms,
        d.hung.max_ms,
        list_ms(&d.hung.detect_ms),
        list_ms(&d.hung.since_last_heartbeat_ms),
        d.hung.max_past_deadline_ms
    );
    println!(
        "  dropped (connection shut down):        median {:.0} ms, max {:.0} ms [{}]",
        d.dropped.median_ms,
        d.dropped.max_ms,
        list_ms(&d.dropped.detect_ms)
    );
    println!("  workers lost that were not killed: {}", d.false_losses);
    println!(
        "goals: under one core {}; p99 under 10 ms {}; detection within the timeout {}",
        yes(r.goals.under_one_core),
        yes(r.goals.p99_under_10ms),
        yes(r.goals.detection_within_timeout)
    );
    if r.coordinator_log_lines > 0 {
        println!("the coordinator logged {} lines; the last:", r.coordinator_log_lines);
        for line in &r.coordinator_log_tail {
            println!("  {line}");
        }
    }
}
