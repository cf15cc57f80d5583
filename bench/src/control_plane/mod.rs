//! `flotilla-bench control-plane`: one coordinator against many simulated workers.
//!
//! The coordinator is a child process of this binary (`flotilla-bench coordinator`, which
//! serves `flotilla_coordinator::service` as `flotilla coordinator` does), so that the CPU
//! time and memory read from `/proc/<pid>` are its own (`coordinator.rs`). The workers are
//! tasks in this process, each with its own tonic `Channel` (its own TCP connection and
//! HTTP/2 session, as real workers have), speaking the worker protocol: `Register`, then
//! the `Session` stream with `SessionOpen` first and a `Heartbeat` every interval,
//! acknowledging any command (`sim_worker.rs`, a stand-in for the real worker). Their
//! heartbeats are spread evenly over one interval, as in a cluster whose workers started at
//! different times. With `--worker-kind agent` the workers are the real agent instead
//! (`agent_worker.rs`: `flotilla_worker::agent::run_worker_with` over TCP, started spread
//! over one interval), optionally training the tiny model over all of them after the
//! window (`--agent-job-steps`); the stand-in stays the default for its exact heartbeat
//! accounting.
//!
//! Phases: start the coordinator; connect every worker; let heartbeats settle for
//! [`SETTLE_INTERVALS`] intervals; measure for `--measure-seconds` (the coordinator's CPU,
//! its heartbeat handling latency as it reports it in `ListWorkers`, the latency of unary
//! calls seen from a client, memory); then kill workers two ways and time how long the
//! coordinator takes to stop listing them: hung workers (heartbeats stop, the connection
//! stays open) and dropped ones (the TCP connection is shut down under the worker, as when
//! its process is SIGKILLed and the kernel closes its sockets). The figures and their table
//! are in `report.rs`.
//!
//! Linux only: it reads `/proc`.

mod agent_worker;
mod coordinator;
mod report;
mod sim_worker;

use agent_worker::start_agents;
use anyhow::{Context, Result, anyhow, ensure};
use clap::{Args, ValueEnum};
use coordinator::{CoordinatorProcess, ProcSample, cores_between, cpu_sample, status_field};
use flotilla_proto::v1::job_service_client::JobServiceClient;
use flotilla_proto::v1::{
    HeartbeatStats, JobState, ListJobsRequest, ListWorkersRequest, ListWorkersResponse, SubmitJobRequest,
    WatchJobRequest, job_event,
};
use report::{ClientRtt, Detection, Goals, JobFigures, Kills, Report, median, percentile, print_report, rtt};
use sim_worker::{Shared, SimWorker, start_workers};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tonic::transport::{Channel, Endpoint};

/// What plays the workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WorkerKind {
    /// The protocol stand-in (`sim_worker.rs`): cheap enough for thousands.
    Sim,
    /// The real agent (`flotilla_worker::agent`), idle between heartbeats.
    Agent,
}

impl WorkerKind {
    fn name(self) -> &'static str {
        match self {
            WorkerKind::Sim => "sim",
            WorkerKind::Agent => "agent",
        }
    }
}

#[derive(Args)]
pub struct ControlPlaneArgs {
    /// Workers, each with its own connection to the coordinator.
    #[arg(long, default_value_t = 2048)]
    pub(super) workers: u32,
    /// What plays them: the protocol stand-in, or the real agent.
    #[arg(long, value_enum, default_value_t = WorkerKind::Sim)]
    pub(super) worker_kind: WorkerKind,
    /// How often workers heartbeat (the coordinator's --heartbeat-interval-ms).
    #[arg(long, default_value_t = 1000)]
    pub(super) heartbeat_interval_ms: u64,
    /// A worker silent this long is lost (the coordinator's --heartbeat-timeout-ms).
    #[arg(long, default_value_t = 5000)]
    pub(super) heartbeat_timeout_ms: u64,
    /// Length of the steady-state measurement window.
    #[arg(long, default_value_t = 30)]
    pub(super) measure_seconds: u64,
    /// Workers killed of each kind (hung, dropped) after the window.
    #[arg(long, default_value_t = 5)]
    pub(super) kills: u32,
    /// How often `ListWorkers` is polled while waiting for a killed worker to be dropped
    /// (the resolution of the detection times).
    #[arg(long, default_value_t = 25)]
    pub(super) poll_ms: u64,
    /// How often the window's client-side probe calls `ListWorkers` (0: only at the
    /// window's ends). Each call walks every worker inside the cluster actor.
    #[arg(long, default_value_t = 1000)]
    pub(super) list_workers_every_ms: u64,
    /// With `--worker-kind agent`: after the window, train the tiny model data-parallel
    /// over every agent for this many steps (0: no job) and time it.
    #[arg(long, default_value_t = 0)]
    pub(super) agent_job_steps: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub(super) json: bool,
}

/// Open files this process needs besides the workers' sockets (runtime, probes, stdio).
const FD_MARGIN: u64 = 128;
/// Unary calls made during the window by the client-side probe.
const PROBE_PERIOD: Duration = Duration::from_millis(100);
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
        args.agent_job_steps == 0 || args.worker_kind == WorkerKind::Agent,
        "--agent-job-steps needs --worker-kind agent (simulated workers train nothing)"
    );
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

/// The bench after the coordinator has started: the workers connect, the window is
/// measured, workers are killed; the report lacks only the coordinator's log.
async fn bench(
    args: &ControlPlaneArgs,
    coordinator: &CoordinatorProcess,
    client_threads: usize,
) -> Result<Report> {
    let pid = coordinator.pid().to_string();
    let interval = Duration::from_millis(args.heartbeat_interval_ms);
    let timeout = Duration::from_millis(args.heartbeat_timeout_ms);
    let mut report = Report {
        worker_kind: args.worker_kind.name().into(),
        workers: args.workers,
        heartbeat_interval_ms: args.heartbeat_interval_ms,
        heartbeat_timeout_ms: args.heartbeat_timeout_ms,
        machine_cores: client_threads,
        ..Report::default()
    };
    report.clients.runtime_worker_threads = client_threads;

    let (mut jobs, mut list) = probes(coordinator).await?;
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
    let workers = match args.worker_kind {
        WorkerKind::Sim => start_workers(&shared).await?,
        WorkerKind::Agent => {
            let agents = start_agents(&shared)?;
            if let Err(e) = wait_listed(args, interval, &mut list).await {
                for agent in &agents {
                    agent.task.abort();
                }
                return Err(e);
            }
            agents
        }
    };
    report.clients.connect_all_s = connecting.elapsed().as_secs_f64();
    let start_stats = settle(args, interval, &mut list).await?;

    let window = measure(args, &pid, &workers, &mut jobs, &mut list).await?;
    record_window(&mut report, args, &pid, &start_stats, window)?;
    let mut unexpected = Vec::new();
    while let Ok(end) = ended.try_recv() {
        unexpected.push(end);
    }
    report.heartbeats.unexpected_session_ends = unexpected.len();
    if args.agent_job_steps > 0 {
        report.job = Some(agent_job(args, &pid, &mut jobs, &mut list).await?);
    }

    report.detection = detect(args, &shared, &workers, &mut list).await?;
    report.goals = goals(&report, timeout);
    for worker in &workers {
        worker.task.abort();
    }
    Ok(report)
}

/// The tiny model's run for `steps` steps over `workers` agents: one sequence of 16 tokens
/// per agent and step, one compute thread each.
fn tiny_job(workers: u32, steps: u64) -> String {
    format!(
        r#"seed = 1
steps = {steps}
batch_size = {workers}
seq_len = 16
threads = 1

[model]
preset = "tiny"

[data]
kind = "synthetic"
tokens = 65536

[optimizer]
peak_lr = 3e-3
warmup_steps = 2
constant_steps = 10
decay_steps = 0
final_lr = 3e-3
"#
    )
}

/// Trains the tiny model data-parallel over every agent and times it from `SubmitJob` to
/// `Succeeded`, with the coordinator's CPU over that time.
async fn agent_job(
    args: &ControlPlaneArgs,
    pid: &str,
    jobs: &mut JobServiceClient<Channel>,
    list: &mut JobServiceClient<Channel>,
) -> Result<JobFigures> {
    let give_up = Duration::from_secs(600);
    let cpu_start = cpu_sample(pid)?;
    let start = Instant::now();
    let request = SubmitJobRequest {
        name: "bench-agents".into(),
        config_toml: tiny_job(args.workers, args.agent_job_steps),
        workers: args.workers,
        ..SubmitJobRequest::default()
    };
    let job_id = jobs.submit_job(request).await.map_err(status_error("SubmitJob"))?.into_inner().job_id;
    let watch = WatchJobRequest { job_id: job_id.clone(), from_revision: 0 };
    let mut events = jobs.watch_job(watch).await.map_err(status_error("WatchJob"))?.into_inner();
    let mut step_times = Vec::new();
    loop {
        let event = tokio::time::timeout_at((start + give_up).into(), events.message())
            .await
            .map_err(|_| anyhow!("job {job_id} did not end within {} s", give_up.as_secs()))?
            .map_err(status_error("the job's event stream"))?
            .with_context(|| format!("job {job_id}'s event stream ended before the job"))?;
        match event.event {
            Some(job_event::Event::Step(_)) => step_times.push(Instant::now()),
            Some(job_event::Event::StateChanged(s)) if s.to() >= JobState::Succeeded => {
                ensure!(s.to() == JobState::Succeeded, "job {job_id} ended {:?}: {}", s.to(), s.reason);
                break;
            }
            _ => {}
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu_end = cpu_sample(pid)?;
    let (listed, _) = list_workers(list).await?;
    let stats = listed.heartbeats.unwrap_or_default();
    let gaps: Vec<f64> =
        step_times.windows(2).map(|w| w[1].duration_since(w[0]).as_secs_f64() * 1e3).collect();
    Ok(JobFigures {
        steps: step_times.len() as u64,
        seconds,
        step_ms_median: median(&gaps),
        coordinator_cpu_cores: cores_between(&cpu_start, &cpu_end),
        heartbeat_p99_us: stats.p99_us,
        heartbeat_max_us: stats.max_us,
        max_silent_ms: listed.workers.iter().map(|w| w.silent_ms).max().unwrap_or(0),
    })
}

/// Waits until the coordinator lists every agent with its session open (they start spread
/// over one interval, then register with the agent's own backoff).
async fn wait_listed(
    args: &ControlPlaneArgs,
    interval: Duration,
    list: &mut JobServiceClient<Channel>,
) -> Result<()> {
    let give_up = Instant::now() + interval + Duration::from_secs(60);
    loop {
        let (response, _) = list_workers(list).await?;
        let open = response.workers.iter().filter(|w| w.session_open).count();
        if open == args.workers as usize {
            return Ok(());
        }
        ensure!(
            Instant::now() < give_up,
            "only {open} of {} agents hold a session after {:.0} s",
            args.workers,
            give_up.duration_since(Instant::now()).as_secs_f64()
        );
        tokio::time::sleep(Duration::from_millis(args.poll_ms)).await;
    }
}

/// The client-side probe's two clients, on one connection: `ListJobs`, and `ListWorkers`
/// with room for a response listing every worker.
async fn probes(
    coordinator: &CoordinatorProcess,
) -> Result<(JobServiceClient<Channel>, JobServiceClient<Channel>)> {
    let probe_channel = Endpoint::from_shared(format!("http://{}", coordinator.addr))
        .context("the coordinator's URL")?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to the coordinator at {}", coordinator.addr))?;
    let jobs = JobServiceClient::new(probe_channel.clone());
    // Responses list every worker: allow more than tonic's default 4 MiB.
    let list = JobServiceClient::new(probe_channel).max_decoding_message_size(64 << 20);
    Ok((jobs, list))
}

/// Waits [`SETTLE_INTERVALS`] intervals, checks that every worker is listed, and returns
/// the coordinator's heartbeat figures as the window opens.
async fn settle(
    args: &ControlPlaneArgs,
    interval: Duration,
    list: &mut JobServiceClient<Channel>,
) -> Result<HeartbeatStats> {
    // Heartbeats settle at their phases before the window opens, and the coordinator's
    // latency window (its last 65,536 heartbeats, 32 s at 2,048/s) has moved past the
    // connection burst by the window's end; `from_before_window` says if it has not.
    tokio::time::sleep(SETTLE_INTERVALS * interval).await;
    let (start_list, _) = list_workers(list).await?;
    ensure!(
        start_list.workers.len() == args.workers as usize,
        "the coordinator lists {} workers before the window, not {}",
        start_list.workers.len(),
        args.workers
    );
    Ok(start_list.heartbeats.unwrap_or_default())
}

/// What the measurement window saw: both processes' CPU at its ends, the heartbeats the
/// clients sent, the probe's round trips, and the `ListWorkers` answer at its end.
struct Window {
    cpu_start: ProcSample,
    cpu_end: ProcSample,
    self_start: ProcSample,
    self_end: ProcSample,
    sent_start: u64,
    sent_end: u64,
    list_rtts: Vec<u64>,
    jobs_rtts: Vec<u64>,
    end_list: ListWorkersResponse,
}

/// The window: CPU at both ends, one ListWorkers per `--list-workers-every-ms`, one
/// ListJobs per [`PROBE_PERIOD`].
async fn measure(
    args: &ControlPlaneArgs,
    pid: &str,
    workers: &[SimWorker],
    jobs: &mut JobServiceClient<Channel>,
    list: &mut JobServiceClient<Channel>,
) -> Result<Window> {
    let self_pid = std::process::id().to_string();
    let sent = || -> u64 { workers.iter().map(|w| w.control.heartbeats.load(Ordering::Relaxed)).sum() };
    let sent_start = sent();
    let cpu_start = cpu_sample(pid)?;
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
                let (response, us) = list_workers(list).await?;
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
    let cpu_end = cpu_sample(pid)?;
    let self_end = cpu_sample(&self_pid)?;
    let sent_end = sent();
    let (end_list, us) = list_workers(list).await?;
    list_rtts.push(us);
    Ok(Window {
        cpu_start,
        cpu_end,
        self_start,
        self_end,
        sent_start,
        sent_end,
        list_rtts,
        jobs_rtts,
        end_list,
    })
}

/// The window's figures into the report: the coordinator's CPU and memory (read now, at
/// the window's end), the clients', the heartbeats, the round trips.
fn record_window(
    report: &mut Report,
    args: &ControlPlaneArgs,
    pid: &str,
    start_stats: &HeartbeatStats,
    window: Window,
) -> Result<()> {
    let Window {
        cpu_start,
        cpu_end,
        self_start,
        self_end,
        sent_start,
        sent_end,
        list_rtts,
        jobs_rtts,
        end_list,
    } = window;
    let self_pid = std::process::id().to_string();
    let interval = Duration::from_millis(args.heartbeat_interval_ms);
    let end_stats = end_list.heartbeats.unwrap_or_default();
    let wall = cpu_end.at.duration_since(cpu_start.at).as_secs_f64();
    report.measure_seconds = wall;

    report.coordinator.cpu_cores = cores_between(&cpu_start, &cpu_end);
    report.coordinator.cpu_seconds = cpu_end.cpu_seconds - cpu_start.cpu_seconds;
    report.coordinator.rss_kib = status_field(pid, "VmRSS")?;
    report.coordinator.hwm_kib = status_field(pid, "VmHWM")?;
    report.coordinator.threads = status_field(pid, "Threads")?;
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
    report.client_rtt = ClientRtt { list_jobs: rtt(jobs_rtts), list_workers: rtt(list_rtts) };
    Ok(())
}

/// Whether the figures meet the control plane's goals.
fn goals(report: &Report, timeout: Duration) -> Goals {
    Goals {
        under_one_core: report.coordinator.cpu_cores < 1.0,
        p99_under_10ms: report.heartbeats.p99_us < 10_000,
        // A silent worker is lost when the timeout after its last heartbeat runs out; a
        // hang just after a heartbeat is the worst case, so "within the timeout" is judged
        // from the last heartbeat, allowing the measurement's resolution.
        detection_within_timeout: report.detection.false_losses == 0
            && !report.detection.hung.detect_ms.is_empty()
            && report.detection.hung.max_past_deadline_ms <= report.detection.resolution_ms
            && report.detection.dropped.max_ms <= timeout.as_secs_f64() * 1e3,
    }
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
