//! Prometheus metrics: `GET /metrics` on the coordinator's own port, in the Prometheus
//! text format (0.0.4), from one [`Metrics`] registry the service owns.
//!
//! What feeds it:
//!
//! - the **store watch** (`feed`): one task lists the job records, then watches every key
//!   from the listing's revision on. Job records give the jobs by state and each job's
//!   step, loss, restarts and newest checkpoint; events give tokens/s, step time, bubble,
//!   checkpoints committed and recoveries by cause. It is the only writer of those series.
//! - the **job actors**: each accepted step report sets its rank's last step
//!   ([`Metrics::rank_step`]).
//! - the **store wrapper** (`timed`): every store operation's latency.
//! - the **auth layer**: requests by RPC and refusals by RPC and code.
//! - at **scrape time**, the cluster actor's worker table (one `ListWorkers` request): the
//!   workers by state, each rank's heartbeat age, the heartbeat handling latency.
//!
//! Invariants:
//!
//! - Every label value comes from a closed set (job states, recovery causes, store
//!   operations, RPC paths in the role table, status codes) or is a job id or rank; no
//!   free text is ever a label.
//! - A job's per-rank series are removed when the job reaches a terminal state, and all
//!   its per-job series when its record is deleted (retention), so the series count is
//!   bounded by the retained jobs and the ranks of the running ones.
//! - The families are updated by synchronous calls (atomics and short internal locks);
//!   nothing here holds a lock across an await.

mod feed;
mod timed;

pub(crate) use feed::feeder;
pub(crate) use timed::TimedStore;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use flotilla_proto::v1::{JobState, ListWorkersResponse, RecoveryCause};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::auth::RPCS;
use super::messages::{ClusterHandle, ClusterMsg};

/// The path Prometheus scrapes; in the role table (`auth::policy`) as a viewer's.
pub const METRICS_PATH: &str = "/metrics";

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Adds `GET /metrics` to the server's routes: the registry, and the worker table asked of
/// the cluster actor at each scrape.
pub(crate) fn route(router: axum::Router, metrics: Arc<Metrics>, cluster: ClusterHandle) -> axum::Router {
    router.route(METRICS_PATH, axum::routing::get(move || scrape(metrics.clone(), cluster.clone())))
}

async fn scrape(metrics: Arc<Metrics>, cluster: ClusterHandle) -> axum::response::Response {
    use axum::response::IntoResponse;
    let workers = match cluster.request(|reply| ClusterMsg::ListWorkers { reply }).await {
        // Sorting the latency window takes a few milliseconds: not on a runtime thread.
        Ok(snapshot) => tokio::task::spawn_blocking(move || snapshot.into_response()).await.ok(),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: no worker table for this scrape");
            None
        }
    };
    let text = metrics.render(workers.as_ref());
    ([(http::header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

type FloatGauge = Gauge<f64, AtomicU64>;
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    job_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RankLabels {
    job_id: String,
    rank: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    method: &'static str,
    code: &'static str,
}

/// Every job state, for the `flotilla_jobs` gauge (each state is always exported, 0
/// included, so a query for one is never empty).
pub(crate) const JOB_STATES: [JobState; 7] = [
    JobState::Pending,
    JobState::Rendezvous,
    JobState::Running,
    JobState::Recovering,
    JobState::Succeeded,
    JobState::Failed,
    JobState::Cancelled,
];

/// Every recovery cause a recovery can have (`Unspecified` only in old records).
const RECOVERY_CAUSES: [RecoveryCause; 5] = [
    RecoveryCause::WorkerLost,
    RecoveryCause::WorkerError,
    RecoveryCause::StepTimeout,
    RecoveryCause::CoordinatorRestarted,
    RecoveryCause::CheckpointUnloadable,
];

/// A recovery's cause as a label value.
pub(crate) fn cause_label(cause: RecoveryCause) -> &'static str {
    match cause {
        RecoveryCause::Unspecified => "unspecified",
        RecoveryCause::WorkerLost => "worker_lost",
        RecoveryCause::WorkerError => "worker_error",
        RecoveryCause::StepTimeout => "step_timeout",
        RecoveryCause::CoordinatorRestarted => "coordinator_restarted",
        RecoveryCause::CheckpointUnloadable => "checkpoint_unloadable",
    }
}

/// The method label of a request path: the RPC's name for a path in the role table,
/// `metrics` for the scrape, `other` for anything else (health, reflection, unknown
/// paths), so the label set is closed.
fn method_label(path: &str) -> &'static str {
    if path == METRICS_PATH {
        return "metrics";
    }
    RPCS.iter().find(|(rpc, _)| *rpc == path).and_then(|(rpc, _)| rpc.rsplit('/').next()).unwrap_or("other")
}

/// A gRPC code as a label value.
fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

fn step_buckets() -> Histogram {
    // 1 ms to about 9 min.
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

fn store_buckets() -> Histogram {
    // 10 µs to about 5 s.
    Histogram::new(exponential_buckets(0.000_01, 2.0, 20))
}

fn checkpoint_buckets() -> Histogram {
    // 1 ms to about 17 min.
    Histogram::new(exponential_buckets(0.001, 2.0, 21))
}

/// Which worker holds each rank of each job, as its `WorkerJoined` events said; read at
/// scrape time for the ranks' heartbeat ages.
type Crews = HashMap<String, BTreeMap<u32, String>>;

/// The coordinator's metrics. One per coordinator, shared by `Arc`.
pub struct Metrics {
    registry: Registry,
    jobs: Family<StateLabels, Gauge>,
    job_steps: Family<JobLabels, Gauge>,
    job_total_steps: Family<JobLabels, Gauge>,
    job_loss: Family<JobLabels, FloatGauge>,
    job_tokens_per_second: Family<JobLabels, FloatGauge>,
    job_step_seconds: Histograms<JobLabels>,
    job_bubble: Family<JobLabels, FloatGauge>,
    job_restarts: Family<JobLabels, Gauge>,
    job_checkpoint_step: Family<JobLabels, Gauge>,
    rank_step: Family<RankLabels, Gauge>,
    checkpoints: Counter,
    checkpoint_bytes: Counter,
    checkpoint_write_seconds: Histogram,
    recoveries: Family<CauseLabels, Counter>,
    store_seconds: Histograms<OpLabels>,
    requests: Family<MethodLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    crews: Mutex<Crews>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("flotilla");
        let jobs = Family::<StateLabels, Gauge>::default();
        registry.register("jobs", "Jobs the coordinator keeps, by state.", jobs.clone());
        let job_steps = Family::<JobLabels, Gauge>::default();
        registry.register(
            "job_steps_completed",
            "Steps the job has completed (its steps_done).",
            job_steps.clone(),
        );
        let job_total_steps = Family::<JobLabels, Gauge>::default();
        registry.register("job_total_steps", "Steps the job runs in all.", job_total_steps.clone());
        let job_loss = Family::<JobLabels, FloatGauge>::default();
        registry.register("job_loss", "The loss of the job's latest completed step.", job_loss.clone());
        let job_tokens_per_second = Family::<JobLabels, FloatGauge>::default();
        registry.register(
            "job_tokens_per_second",
            "Training throughput of the job's latest step, in tokens per second.",
            job_tokens_per_second.clone(),
        );
        let job_step_seconds = Histograms::<JobLabels>::new_with_constructor(step_buckets);
        registry.register(
            "job_step_duration_seconds",
            "Step time: the slowest rank's compute and communication time, per step since the coordinator started.",
            job_step_seconds.clone(),
        );
        let job_bubble = Family::<JobLabels, FloatGauge>::default();
        registry.register(
            "job_pipeline_bubble_ratio",
            "Measured pipeline bubble of the job's latest step (0 for data-parallel jobs).",
            job_bubble.clone(),
        );
        let job_restarts = Family::<JobLabels, Gauge>::default();
        registry.register("job_restarts", "Recoveries the job has started.", job_restarts.clone());
        let job_checkpoint_step = Family::<JobLabels, Gauge>::default();
        registry.register(
            "job_last_checkpoint_step",
            "The step of the job's newest committed checkpoint (0: none).",
            job_checkpoint_step.clone(),
        );
        let rank_step = Family::<RankLabels, Gauge>::default();
        registry.register(
            "rank_last_step",
            "The last step each rank of a running job reported.",
            rank_step.clone(),
        );
        let checkpoints = Counter::default();
        registry.register("checkpoints_committed", "Checkpoints committed, all jobs.", checkpoints.clone());
        let checkpoint_bytes = Counter::default();
        registry.register(
            "checkpoint_written_bytes",
            "Bytes of committed checkpoints' shards, all jobs.",
            checkpoint_bytes.clone(),
        );
        let checkpoint_write_seconds = checkpoint_buckets();
        registry.register(
            "checkpoint_write_duration_seconds",
            "The slowest rank's background write of each committed checkpoint.",
            checkpoint_write_seconds.clone(),
        );
        let recoveries = Family::<CauseLabels, Counter>::default();
        registry.register("recoveries", "Recoveries completed, by what failed.", recoveries.clone());
        let store_seconds = Histograms::<OpLabels>::new_with_constructor(store_buckets);
        registry.register(
            "store_operation_duration_seconds",
            "State store operation latency (a write returns once durable), by operation.",
            store_seconds.clone(),
        );
        let requests = Family::<MethodLabels, Counter>::default();
        registry.register(
            "grpc_requests",
            "Requests received, by RPC (`metrics` for scrapes, `other` for health, reflection and unknown paths).",
            requests.clone(),
        );
        let refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "grpc_refused_requests",
            "Requests refused before any handler (tokens, roles, rate limits), by RPC and code.",
            refused.clone(),
        );
        // Every known label value from the start, so that a query (or `rate`) of one is
        // never empty.
        for state in JOB_STATES {
            jobs.get_or_create(&StateLabels { state: state.name() }).set(0);
        }
        for cause in RECOVERY_CAUSES {
            recoveries.get_or_create(&CauseLabels { cause: cause_label(cause) }).inc_by(0);
        }
        Metrics {
            registry,
            jobs,
            job_steps,
            job_total_steps,
            job_loss,
            job_tokens_per_second,
            job_step_seconds,
            job_bubble,
            job_restarts,
            job_checkpoint_step,
            rank_step,
            checkpoints,
            checkpoint_bytes,
            checkpoint_write_seconds,
            recoveries,
            store_seconds,
            requests,
            refused,
            crews: Mutex::new(HashMap::new()),
        }
    }

    /// A job actor accepted `rank`'s report of `step`.
    pub(crate) fn rank_step(&self, job: &str, rank: u32, step: u64) {
        self.rank_step.get_or_create(&RankLabels { job_id: job.to_string(), rank }).set(gauge_value(step));
    }

    /// A request reached the auth layer.
    pub(crate) fn request(&self, path: &str) {
        self.requests.get_or_create(&MethodLabels { method: method_label(path) }).inc();
    }

    /// The auth layer refused a request.
    pub(crate) fn refused(&self, path: &str, code: tonic::Code) {
        self.refused
            .get_or_create(&RefusedLabels { method: method_label(path), code: code_label(code) })
            .inc();
    }

    /// A store operation took `seconds`.
    pub(crate) fn store_op(&self, op: &'static str, seconds: f64) {
        self.store_seconds.get_or_create(&OpLabels { op }).observe(seconds);
    }

    fn crews(&self) -> std::sync::MutexGuard<'_, Crews> {
        // A panic elsewhere while holding it leaves a map that is still a valid map.
        self.crews.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The exposition: the registry, then what the worker table says now.
    pub fn render(&self, workers: Option<&ListWorkersResponse>) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut text, &self.registry);
        if let Some(workers) = workers {
            let _ = prometheus_text::encode(&mut text, &self.scrape_registry(workers));
        }
        text
    }

    /// The series computed at scrape time from the worker table.
    fn scrape_registry(&self, response: &ListWorkersResponse) -> Registry {
        let mut registry = Registry::with_prefix("flotilla");
        let by_state = Family::<StateLabels, Gauge>::default();
        for state in ["registering", "idle", "assigned"] {
            by_state.get_or_create(&StateLabels { state }).set(0);
        }
        let mut silent = HashMap::new();
        for worker in &response.workers {
            let state = match (worker.session_open, worker.job_id.is_empty()) {
                (false, _) => "registering",
                (true, true) => "idle",
                (true, false) => "assigned",
            };
            by_state.get_or_create(&StateLabels { state }).inc();
            silent.insert(worker.worker_id.as_str(), worker.silent_ms);
        }
        registry.register(
            "workers",
            "Workers the failure detector counts alive, by state (registering: no session yet).",
            by_state,
        );
        let age = Family::<RankLabels, FloatGauge>::default();
        for (job, crew) in self.crews().iter() {
            for (rank, worker) in crew {
                if let Some(&ms) = silent.get(worker.as_str()) {
                    age.get_or_create(&RankLabels { job_id: job.clone(), rank: *rank }).set(ms as f64 / 1e3);
                }
            }
        }
        registry.register(
            "rank_heartbeat_age_seconds",
            "Seconds since the worker holding each rank of an active job was last heard from.",
            age,
        );
        let (handled_total, p50_us, p99_us, max_us) =
            response.heartbeats.as_ref().map_or((0, 0, 0, 0), |s| (s.handled, s.p50_us, s.p99_us, s.max_us));
        let handled = Gauge::<i64>::default();
        handled.set(gauge_value(handled_total));
        registry.register(
            "heartbeats_handled",
            "Heartbeats the failure detector handled since the coordinator started.",
            handled,
        );
        // Percentiles the coordinator computes over its window (as `ListWorkers` reports
        // them), so gauges: a `quantile` label is a summary's, which this is not.
        for (name, what, us) in
            [("p50", "median", p50_us), ("p99", "99th percentile", p99_us), ("max", "largest", max_us)]
        {
            let latency = FloatGauge::default();
            latency.set(us as f64 / 1e6);
            registry.register(
                format!("heartbeat_handling_{name}_seconds"),
                format!("Heartbeat handling latency (session to failure detector), the {what} over the recent window."),
                latency,
            );
        }
        registry
    }

    // What the store feed sees (feed.rs calls these; it is their only caller).

    fn set_job_states(&self, counts: &HashMap<JobState, i64>) {
        for state in JOB_STATES {
            let n = counts.get(&state).copied().unwrap_or(0);
            self.jobs.get_or_create(&StateLabels { state: state.name() }).set(n);
        }
    }

    fn job_record(&self, record: &super::records::JobRecord) {
        let job = JobLabels { job_id: record.id.clone() };
        self.job_steps.get_or_create(&job).set(gauge_value(record.steps_done));
        self.job_total_steps.get_or_create(&job).set(gauge_value(record.total_steps));
        self.job_restarts.get_or_create(&job).set(i64::from(record.restarts));
        self.job_checkpoint_step.get_or_create(&job).set(gauge_value(record.checkpoint_step));
        if record.steps_done > 0 {
            self.job_loss.get_or_create(&job).set(record.last_loss);
        }
    }

    fn step(&self, job: &str, summary: &flotilla_proto::v1::StepSummary) {
        let job = JobLabels { job_id: job.to_string() };
        self.job_tokens_per_second.get_or_create(&job).set(summary.tokens_per_second);
        self.job_bubble.get_or_create(&job).set(summary.bubble_fraction);
        if summary.step_seconds > 0.0 {
            self.job_step_seconds.get_or_create(&job).observe(summary.step_seconds);
        }
    }

    fn checkpoint(&self, committed: &flotilla_proto::v1::CheckpointCommitted) {
        self.checkpoints.inc();
        self.checkpoint_bytes.inc_by(committed.bytes);
        self.checkpoint_write_seconds.observe(committed.write_seconds);
    }

    fn recovery(&self, recovery: &flotilla_proto::v1::Recovery) {
        self.recoveries.get_or_create(&CauseLabels { cause: cause_label(recovery.cause_kind()) }).inc();
    }

    fn worker_joined(&self, job: &str, rank: u32, worker: &str) {
        self.crews().entry(job.to_string()).or_default().insert(rank, worker.to_string());
    }

    /// The job reached a terminal state: its ranks' series go.
    fn job_ended(&self, job: &str, workers: u32) {
        let crew = self.crews().remove(job).unwrap_or_default();
        for rank in crew.keys().copied().chain(0..workers) {
            self.rank_step.remove(&RankLabels { job_id: job.to_string(), rank });
        }
    }

    /// The job's record was deleted: every series of it goes.
    fn job_removed(&self, job: &str, workers: u32) {
        self.job_ended(job, workers);
        let labels = JobLabels { job_id: job.to_string() };
        self.job_steps.remove(&labels);
        self.job_total_steps.remove(&labels);
        self.job_loss.remove(&labels);
        self.job_tokens_per_second.remove(&labels);
        self.job_step_seconds.remove(&labels);
        self.job_bubble.remove(&labels);
        self.job_restarts.remove(&labels);
        self.job_checkpoint_step.remove(&labels);
    }
}

/// A count as a gauge's `i64`, saturating.
fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::records::JobRecord;

    fn record(id: &str, state: JobState, steps_done: u64) -> JobRecord {
        JobRecord {
            id: id.into(),
            name: "t".into(),
            state,
            reason: String::new(),
            config_toml: String::new(),
            workers: 2,
            steps_done,
            total_steps: 5,
            created_unix_ms: 0,
            updated_unix_ms: 0,
            last_loss: 4.5,
            output_dir: String::new(),
            next_event: 0,
            resume_from: String::new(),
            checkpoint_step: 0,
            checkpoint_dir: String::new(),
            restarts: 0,
        }
    }

    #[test]
    fn labels_are_closed_sets() {
        assert_eq!(method_label("/flotilla.v1.JobService/SubmitJob"), "SubmitJob");
        assert_eq!(method_label("/metrics"), "metrics");
        assert_eq!(method_label("/grpc.health.v1.Health/Check"), "other");
        assert_eq!(method_label("/flotilla.v1.JobService/Evil\"}"), "other");
        assert_eq!(JobState::Succeeded.name(), "succeeded");
        assert_eq!(cause_label(RecoveryCause::StepTimeout), "step_timeout");
    }

    #[test]
    fn per_rank_series_go_at_the_end_and_per_job_series_at_removal() {
        let metrics = Metrics::new();
        metrics.job_record(&record("job-1", JobState::Running, 3));
        metrics.worker_joined("job-1", 0, "w0");
        metrics.worker_joined("job-1", 1, "w1");
        metrics.rank_step("job-1", 0, 3);
        metrics.rank_step("job-1", 1, 3);
        let text = metrics.render(None);
        assert!(text.contains("flotilla_rank_last_step{job_id=\"job-1\",rank=\"1\"} 3"), "{text}");
        assert!(text.contains("flotilla_job_steps_completed{job_id=\"job-1\"} 3"), "{text}");

        metrics.job_ended("job-1", 2);
        let text = metrics.render(None);
        assert!(!text.contains("rank=\""), "{text}");
        assert!(text.contains("flotilla_job_steps_completed{job_id=\"job-1\"} 3"), "{text}");
        assert!(metrics.crews().is_empty());

        metrics.job_removed("job-1", 2);
        let text = metrics.render(None);
        assert!(!text.contains("job-1"), "{text}");
    }
}
