//! The bench's figures, their statistics, and the table printed without `--json`.

#[derive(serde::Serialize, Default)]
pub(super) struct Report {
    /// `sim` (the stand-in of `sim_worker.rs`) or `agent` (real agents, `agent_worker.rs`).
    pub(super) worker_kind: String,
    pub(super) workers: u32,
    pub(super) heartbeat_interval_ms: u64,
    pub(super) heartbeat_timeout_ms: u64,
    pub(super) measure_seconds: f64,
    pub(super) machine_cores: usize,
    pub(super) coordinator: CoordinatorFigures,
    pub(super) clients: ClientFigures,
    pub(super) heartbeats: HeartbeatFigures,
    pub(super) client_rtt: ClientRtt,
    pub(super) detection: Detection,
    /// `--agent-job-steps`: a tiny data-parallel job over every agent, after the window.
    pub(super) job: Option<JobFigures>,
    pub(super) goals: Goals,
    /// Lines the coordinator wrote to stderr (warnings and errors) after it started.
    pub(super) coordinator_log_lines: u64,
    pub(super) coordinator_log_tail: Vec<String>,
}

#[derive(serde::Serialize, Default)]
pub(super) struct CoordinatorFigures {
    /// Threads of the coordinator process at the end of the window.
    pub(super) threads: u64,
    /// CPU time over the window ÷ its wall time.
    pub(super) cpu_cores: f64,
    pub(super) cpu_seconds: f64,
    pub(super) rss_idle_kib: u64,
    pub(super) rss_kib: u64,
    pub(super) hwm_kib: u64,
    /// (RSS with the workers − RSS idle) ÷ workers.
    pub(super) rss_per_worker_kib: f64,
}

#[derive(serde::Serialize, Default)]
pub(super) struct ClientFigures {
    pub(super) runtime_worker_threads: usize,
    pub(super) process_threads: u64,
    pub(super) cpu_cores: f64,
    /// Time to connect, register and open the session of every worker.
    pub(super) connect_all_s: f64,
}

#[derive(serde::Serialize, Default)]
pub(super) struct HeartbeatFigures {
    /// Heartbeats the coordinator handled during the window, per second.
    pub(super) handled_per_s: f64,
    pub(super) expected_per_s: f64,
    /// The coordinator's figures at the end of the window, over its last `window`
    /// heartbeats, which span `covers_s` seconds.
    pub(super) window: u32,
    pub(super) covers_s: f64,
    /// How many of those were handled before the measurement window opened (0: all of
    /// them are steady-state).
    pub(super) from_before_window: u64,
    pub(super) p50_us: u64,
    pub(super) p99_us: u64,
    pub(super) max_us: u64,
    /// Workers listed with an open session at the end of the window.
    pub(super) listed: usize,
    /// The longest `silent_ms` listed at the end of the window.
    pub(super) max_silent_ms: u64,
    /// Sessions that ended during the window though nothing killed them.
    pub(super) unexpected_session_ends: usize,
    /// Heartbeats the simulated workers sent per second; for real agents, their socket
    /// writes to the coordinator per second (heartbeats and the odd HTTP/2 frame).
    pub(super) sent_by_clients_per_s: f64,
}

#[derive(serde::Serialize, Default)]
pub(super) struct Rtt {
    pub(super) calls: usize,
    pub(super) p50_us: u64,
    pub(super) p99_us: u64,
    pub(super) max_us: u64,
}

/// Round trips of unary calls made from this process during the window: what a client
/// sees, including this process's own scheduling on the shared cores.
#[derive(serde::Serialize, Default)]
pub(super) struct ClientRtt {
    /// `ListJobs` (no jobs: a store read), every 100 ms.
    pub(super) list_jobs: Rtt,
    /// `ListWorkers` (every worker, through the cluster actor's mailbox), every
    /// `--list-workers-every-ms`, and at the window's ends.
    pub(super) list_workers: Rtt,
}

#[derive(serde::Serialize, Default)]
pub(super) struct Kills {
    /// From the kill to the first `ListWorkers` answer without the worker, per worker.
    pub(super) detect_ms: Vec<f64>,
    pub(super) median_ms: f64,
    pub(super) max_ms: f64,
    /// From the worker's last heartbeat to the same answer.
    pub(super) since_last_heartbeat_ms: Vec<f64>,
    /// The largest `since_last_heartbeat_ms` minus the heartbeat timeout: how late after
    /// its deadline a silent worker was seen gone (detection delay plus resolution).
    pub(super) max_past_deadline_ms: f64,
}

/// The job phase: the tiny model trained data-parallel over every agent (each its own
/// share of a batch of one sequence per agent), from `SubmitJob` to `Succeeded`.
#[derive(serde::Serialize, Default)]
pub(super) struct JobFigures {
    pub(super) steps: u64,
    /// From `SubmitJob` to the `Succeeded` event: rendezvous, every step, the final save.
    pub(super) seconds: f64,
    /// Between consecutive steps' `StepSummary` events, median.
    pub(super) step_ms_median: f64,
    /// The coordinator's CPU over the job ÷ its wall time.
    pub(super) coordinator_cpu_cores: f64,
    /// The coordinator's heartbeat handling latency at the job's end (over its window).
    pub(super) heartbeat_p99_us: u64,
    pub(super) heartbeat_max_us: u64,
    /// The longest silence of a worker listed when the job ended.
    pub(super) max_silent_ms: u64,
}

#[derive(serde::Serialize, Default)]
pub(super) struct Detection {
    pub(super) poll_ms: u64,
    /// A `ListWorkers` round trip while polling (adds to the resolution).
    pub(super) poll_rtt_p50_ms: f64,
    /// `poll_ms` plus the longest poll round trip: a worker may have been gone this long
    /// before a poll saw it.
    pub(super) resolution_ms: f64,
    pub(super) hung: Kills,
    pub(super) dropped: Kills,
    /// Workers no longer listed that were not killed.
    pub(super) false_losses: usize,
}

#[derive(serde::Serialize, Default)]
pub(super) struct Goals {
    pub(super) under_one_core: bool,
    pub(super) p99_under_10ms: bool,
    pub(super) detection_within_timeout: bool,
}

pub(super) fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub(super) fn rtt(mut samples: Vec<u64>) -> Rtt {
    samples.sort_unstable();
    Rtt {
        calls: samples.len(),
        p50_us: percentile(&samples, 0.5),
        p99_us: percentile(&samples, 0.99),
        max_us: samples.last().copied().unwrap_or(0),
    }
}

pub(super) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

pub(super) fn yes(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

pub(super) fn list_ms(values: &[f64]) -> String {
    values.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", ")
}

pub(super) fn print_report(r: &Report) {
    let c = &r.coordinator;
    let h = &r.heartbeats;
    println!(
        "control plane: {} {} workers, heartbeat every {} ms, timeout {} ms, {:.1} s window, {} cores shared by coordinator and clients",
        r.workers,
        r.worker_kind,
        r.heartbeat_interval_ms,
        r.heartbeat_timeout_ms,
        r.measure_seconds,
        r.machine_cores
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
        "  heartbeats handled         {:.0}/s (expected {:.0}/s; clients {} {:.0}/s)",
        h.handled_per_s,
        h.expected_per_s,
        if r.worker_kind == "agent" { "wrote to their sockets" } else { "sent" },
        h.sent_by_clients_per_s
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
    if let Some(job) = &r.job {
        println!(
            "job: tiny model, data-parallel over all {} agents, {} steps in {:.2} s (step {:.0} ms median); coordinator CPU {:.3} cores; heartbeat p99 {} µs, max {} µs; longest silence {} ms",
            r.workers,
            job.steps,
            job.seconds,
            job.step_ms_median,
            job.coordinator_cpu_cores,
            job.heartbeat_p99_us,
            job.heartbeat_max_us,
            job.max_silent_ms
        );
    }
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
