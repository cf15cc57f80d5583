//! The coordinator's settings and the validation of submitted jobs, their `[parallel]`
//! layout included.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_model::ModelConfig;
use flotilla_model::paths::AllowedRoots;
use flotilla_model::train::{
    CheckpointConfig, DataConfig, RecoveryConfig, RunSizes, validate_policy, validate_run_sizes,
};
use flotilla_proto::v1::SubmitJobRequest;

use super::auth::{RateLimits, ServerTls};
use super::error::ServiceError;
use super::retention::JobRetention;
use crate::placement::{Parallel, Placement, PlacementError};
use crate::schedule::ScheduleError;
use crate::store::StoreConfig;
use flotilla_layout::{ParallelError, RawParallel};

/// How a coordinator runs.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// Where [`bind_and_serve`](super::bind_and_serve) listens; loopback by default.
    pub listen: SocketAddr,
    /// The state store [`serve`](super::serve) opens: jobs and their events live there
    /// across restarts (a file store's directory, or an etcd cluster).
    pub store: StoreConfig,
    /// How often workers heartbeat (told to them at registration).
    pub heartbeat_interval: Duration,
    /// A worker not heard from for this long is lost; also the time a registered worker
    /// has to open its session, and a session to send its `SessionOpen`.
    pub heartbeat_timeout: Duration,
    /// TLS on the port: the certificate, its key and optionally a CA for client
    /// certificates (mutual TLS); `None` serves plaintext.
    pub tls: Option<ServerTls>,
    /// The token file (`ROLE TOKEN` lines, reloaded when it changes); `None` leaves every
    /// RPC open to whoever reaches the port.
    pub token_file: Option<PathBuf>,
    /// Allows listening on a non-loopback address without TLS and a token file (with a
    /// warning at every start). Off by default: exposing an open control plane must be a
    /// decision.
    pub insecure: bool,
    /// The largest gRPC message decoded or encoded, in bytes; larger ones fail with
    /// `OUT_OF_RANGE` (tonic's code for it) and the coordinator carries on.
    pub max_message_bytes: usize,
    /// How many revisions of history the store keeps for resuming watches; older history
    /// is compacted every `compaction_interval` (0 keeps it all). A watcher further behind
    /// gets `OUT_OF_RANGE` and re-reads the job.
    pub history_retention: u64,
    pub compaction_interval: Duration,
    /// Per-caller rate limits on `SubmitJob` and `Register` (see `auth`'s `limits`).
    pub rate_limits: RateLimits,
    /// Which finished jobs the store keeps, applied every `compaction_interval` (see
    /// `retention`).
    pub retention: JobRetention,
    /// The directories a job's output, checkpoint, `resume_from` and data paths must lie
    /// under (relative ones are relative to the working directory, which is the default);
    /// see `flotilla_model::paths`.
    pub allowed_roots: Vec<PathBuf>,
    /// The most workers one job may ask for (at most [`MAX_JOB_WORKERS`]); larger jobs
    /// are refused at submission, since they could never be placed.
    pub max_job_workers: u32,
    /// The most memory a job may need per worker, by the planner's estimate; `None`: no
    /// cap (a job is still placed only on workers that report enough memory).
    pub max_worker_memory: Option<u64>,
}

impl CoordinatorConfig {
    /// The defaults with a file store in the given state directory.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        CoordinatorConfig { store: StoreConfig::File(state_dir.into()), ..CoordinatorConfig::default() }
    }

    /// The defaults with the given store.
    pub fn with_store(store: StoreConfig) -> Self {
        CoordinatorConfig { store, ..CoordinatorConfig::default() }
    }

    /// Checks the settings; the error names the field.
    pub fn validate(&self) -> Result<(), ServiceError> {
        let bad = |field: &str, reason: String| Err(ServiceError::Config { field: field.into(), reason });
        if self.heartbeat_interval.is_zero() {
            return bad("heartbeat_interval", "must be positive".into());
        }
        // Deadlines are `Instant::now() + timeout`: an absurd timeout must be an error here,
        // not an overflow in the cluster actor.
        if self.heartbeat_timeout > MAX_HEARTBEAT_TIMEOUT {
            return bad(
                "heartbeat_timeout",
                format!("{:?} exceeds the maximum of one day", self.heartbeat_timeout),
            );
        }
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return bad(
                "heartbeat_timeout",
                format!(
                    "{:?} must exceed heartbeat_interval ({:?}), or every worker times out",
                    self.heartbeat_timeout, self.heartbeat_interval
                ),
            );
        }
        if self.history_retention > 0 && self.compaction_interval.is_zero() {
            return bad("compaction_interval", "must be positive when history_retention is set".into());
        }
        let named = |(field, reason): (String, String)| ServiceError::Config { field, reason };
        self.rate_limits.validate().map_err(named)?;
        self.retention.validate().map_err(named)?;
        let retains = self.retention.max_jobs.is_some() || self.retention.max_age.is_some();
        if retains && self.compaction_interval.is_zero() {
            return bad("compaction_interval", "must be positive when a retention policy is set".into());
        }
        if self.max_job_workers == 0 || self.max_job_workers > MAX_JOB_WORKERS {
            return bad(
                "max_job_workers",
                format!("must be between 1 and {MAX_JOB_WORKERS}, got {}", self.max_job_workers),
            );
        }
        if self.allowed_roots.is_empty() {
            return bad("allowed_roots", "must name at least one directory".into());
        }
        if self.max_message_bytes < MIN_MESSAGE_BYTES {
            return bad(
                "max_message_bytes",
                format!("{} is below the minimum of {MIN_MESSAGE_BYTES}", self.max_message_bytes),
            );
        }
        Ok(())
    }
}

/// The longest heartbeat timeout accepted.
const MAX_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The smallest message limit accepted: a job's TOML must fit in an assignment.
const MIN_MESSAGE_BYTES: usize = 2 * MAX_CONFIG_BYTES;

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            store: StoreConfig::File(PathBuf::from("flotilla-state")),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            tls: None,
            token_file: None,
            insecure: false,
            max_message_bytes: 16 << 20,
            history_retention: 100_000,
            compaction_interval: Duration::from_secs(60),
            rate_limits: RateLimits::default(),
            retention: JobRetention::default(),
            allowed_roots: vec![PathBuf::from(".")],
            max_job_workers: DEFAULT_MAX_JOB_WORKERS,
            max_worker_memory: None,
        }
    }
}

/// The largest job configuration accepted, in bytes. It travels inside every worker's
/// assignment, so it must stay well below the message limit.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// The most workers any coordinator lets one job ask for (`max_job_workers` is at most
/// this).
pub const MAX_JOB_WORKERS: u32 = 1 << 16;

/// The default of `max_job_workers`.
pub const DEFAULT_MAX_JOB_WORKERS: u32 = 4096;

/// What a submission is checked against: the coordinator's allowed roots, resolved once
/// when it starts, and its limits.
#[derive(Clone, Debug)]
pub struct Admission {
    roots: AllowedRoots,
    max_job_workers: u32,
    max_worker_memory: Option<u64>,
}

impl Admission {
    /// The admission rules of `config`; a root that cannot be resolved is an error naming it.
    pub fn new(config: &CoordinatorConfig) -> Result<Admission, ServiceError> {
        let roots = AllowedRoots::new(&config.allowed_roots, std::path::Path::new("."))
            .map_err(|e| ServiceError::Config { field: "allowed_roots".into(), reason: e.to_string() })?;
        Ok(Admission {
            roots,
            max_job_workers: config.max_job_workers,
            max_worker_memory: config.max_worker_memory,
        })
    }

    /// `path` of the request (named by `field`), resolved under the roots, else the
    /// refusal naming the field and the path.
    fn confine(&self, field: &str, path: &str) -> Result<String, ServiceError> {
        self.roots
            .confine(field, std::path::Path::new(path))
            .map(|p| p.display().to_string())
            .map_err(|e| ServiceError::InvalidArgument { field: field.into(), reason: e.detail })
    }
}

/// The longest job name and output directory accepted.
const MAX_NAME_BYTES: usize = 256;
const MAX_PATH_BYTES: usize = 4096;

/// The most chunks (stages × micro-batches) one step of a pipeline job may have: far
/// beyond a real step (DeepSeek-V3's is 16 × 120 = 1,920), small enough that the compiled
/// streams fit in an assignment and the kept timelines stay small.
pub const MAX_JOB_CHUNKS: u64 = 1 << 16;

/// A job as submitted, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSpec {
    pub name: String,
    pub config_toml: String,
    pub workers: u32,
    pub output_dir: String,
    /// The config's `steps`.
    pub steps: u64,
    /// A pipeline/expert-parallel job's placement (from its `[parallel]` table); `None`
    /// for a plain data-parallel job.
    pub placement: Option<Arc<Placement>>,
    /// A committed checkpoint's directory to start from (empty: none).
    pub resume_from: String,
    /// The planner's estimate of the memory each worker needs, in bytes: the job is placed
    /// only on workers that report at least this much (or report none).
    pub memory_per_worker: u64,
}

/// What a job does about checkpoints and failures: its config's `[checkpoint]` and
/// `[recovery]` tables (defaults where absent).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobPolicy {
    pub checkpoint: CheckpointConfig,
    pub recovery: RecoveryConfig,
}

/// The `[checkpoint]` and `[recovery]` tables of a run's TOML, checked; the error names the
/// field (`checkpoint.keep`, `recovery.step_timeout_s`, …).
pub fn job_policy(config_toml: &str) -> Result<JobPolicy, ServiceError> {
    let table: toml::Table = match config_toml.parse() {
        Ok(table) => table,
        Err(e) => return invalid("config_toml", format!("not valid TOML: {}", e.to_string().trim_end())),
    };
    policy_in(&table)
}

fn policy_in(table: &toml::Table) -> Result<JobPolicy, ServiceError> {
    fn section<T: serde::de::DeserializeOwned + Default>(
        table: &toml::Table,
        key: &str,
    ) -> Result<T, ServiceError> {
        match table.get(key) {
            None => Ok(T::default()),
            Some(value) => value.clone().try_into().or_else(|e: toml::de::Error| {
                invalid(key, format!("invalid [{key}] table: {}", e.message().trim_end()))
            }),
        }
    }
    let policy =
        JobPolicy { checkpoint: section(table, "checkpoint")?, recovery: section(table, "recovery")? };
    validate_policy(&policy.checkpoint, &policy.recovery)
        .or_else(|(field, reason)| invalid(field, reason))?;
    Ok(policy)
}

fn invalid<T>(field: &str, reason: String) -> Result<T, ServiceError> {
    Err(ServiceError::InvalidArgument { field: field.into(), reason })
}

/// `table[key]` as an integer of at least 1 that fits in `T`; `field` names it in errors.
fn positive<T: TryFrom<i64>>(table: &toml::Table, key: &str, field: &str) -> Result<Option<T>, ServiceError> {
    match table.get(key) {
        None => Ok(None),
        Some(toml::Value::Integer(n)) if *n > 0 => match T::try_from(*n) {
            Ok(n) => Ok(Some(n)),
            Err(_) => invalid(field, format!("{n} is too large")),
        },
        Some(toml::Value::Integer(n)) => invalid(field, format!("must be at least 1, got {n}")),
        Some(other) => invalid(field, format!("must be a positive integer, got a {}", other.type_str())),
    }
}

fn required<T>(value: Option<T>, field: &str) -> Result<T, ServiceError> {
    match value {
        Some(value) => Ok(value),
        None => invalid(field, "is missing".into()),
    }
}

/// Validates a submit request against `admission`: the worker count, the sizes of the
/// strings, the paths, and the config, which must parse as TOML, load its `[model]` (every
/// size within the model's bounds) and have `steps`, `batch_size` and `seq_len` within the
/// run's bounds (`flotilla_model::train::validate_run_sizes`, the rule the workers apply
/// too). The error names the field (`workers`, `steps`, `hidden_size`, `data.path`,
/// `parallel.pp`, `memory`, …).
///
/// Without a `[parallel]` table the job is plain data parallel, and `batch_size` must
/// split evenly over the workers. With one, see [`placement_of`].
///
/// Paths (`output_dir`, `resume_from`, the `[data]` files and `init_from`) must lie under
/// the allowed roots (`flotilla_model::paths`); a refusal names the field and the path and
/// says the same whether or not the path exists. The job's memory per worker is estimated
/// by the planner (`crate::plan::job_memory`) and refused above `max_worker_memory`.
pub fn validate_submit(request: &SubmitJobRequest, admission: &Admission) -> Result<JobSpec, ServiceError> {
    check_request(request, admission)?;
    let table: toml::Table = match request.config_toml.parse() {
        Ok(table) => table,
        Err(e) => return invalid("config_toml", format!("not valid TOML: {}", e.to_string().trim_end())),
    };
    let (steps, batch_size) = check_run(&table, admission)?;
    let placement = placement_in(&table, request.workers)?;
    let policy = policy_in(&table)?;
    if placement.is_some() && policy.recovery.min_workers > 0 {
        return invalid(
            "recovery.min_workers",
            "applies to data-parallel jobs only: a [parallel] layout needs exactly its workers".into(),
        );
    }
    if !request.output_dir.is_empty() {
        admission.confine("output_dir", &request.output_dir)?;
    }
    if !request.resume_from.is_empty() {
        let dir = admission.confine("resume_from", &request.resume_from)?;
        let manifest = crate::checkpoint::read_manifest(std::path::Path::new(&dir))
            .or_else(|e| invalid("resume_from", format!("not a committed checkpoint: {e}")))?;
        if manifest.step > steps {
            return invalid(
                "resume_from",
                format!("the checkpoint is at step {}, past the run's {steps} steps", manifest.step),
            );
        }
    }
    if placement.is_none() && !batch_size.is_multiple_of(u64::from(request.workers)) {
        return invalid(
            "batch_size",
            format!("{batch_size} cannot be split evenly over {} data-parallel workers", request.workers),
        );
    }
    let memory_per_worker = memory_in(&table, request.workers, placement.as_ref())?;
    if let Some(cap) = admission.max_worker_memory
        && memory_per_worker > cap
    {
        return invalid(
            "memory",
            format!(
                "the job needs {} per worker by the planner's estimate, above this coordinator's per-worker cap of {} (max_worker_memory)",
                crate::plan::format_bytes(memory_per_worker as f64),
                crate::plan::format_bytes(cap as f64)
            ),
        );
    }
    Ok(JobSpec {
        name: request.name.clone(),
        config_toml: request.config_toml.clone(),
        workers: request.workers,
        output_dir: request.output_dir.clone(),
        steps,
        placement: placement.map(Arc::new),
        resume_from: request.resume_from.clone(),
        memory_per_worker,
    })
}

/// The request's own fields: the worker count and the sizes of its strings.
fn check_request(request: &SubmitJobRequest, admission: &Admission) -> Result<(), ServiceError> {
    if request.workers == 0 {
        return invalid("workers", "must be at least 1".into());
    }
    if request.workers > admission.max_job_workers {
        return invalid(
            "workers",
            format!(
                "{} is above this coordinator's limit of {} workers per job (max_job_workers): the job could never be placed",
                request.workers, admission.max_job_workers
            ),
        );
    }
    for (field, value, limit) in [
        ("name", &request.name, MAX_NAME_BYTES),
        ("output_dir", &request.output_dir, MAX_PATH_BYTES),
        ("resume_from", &request.resume_from, MAX_PATH_BYTES),
        ("config_toml", &request.config_toml, MAX_CONFIG_BYTES),
    ] {
        if value.len() > limit {
            return invalid(field, format!("{} bytes is above the limit of {limit}", value.len()));
        }
    }
    Ok(())
}

/// The run's sizes, model, data and `init_from` checked; returns `steps` and `batch_size`.
fn check_run(table: &toml::Table, admission: &Admission) -> Result<(u64, u64), ServiceError> {
    let steps: u64 = required(positive(table, "steps", "steps")?, "steps")?;
    let batch_size: u64 = required(positive(table, "batch_size", "batch_size")?, "batch_size")?;
    let seq_len: u64 = required(positive(table, "seq_len", "seq_len")?, "seq_len")?;
    let threads: Option<u64> = positive(table, "threads", "threads")?;
    let model = model_of(table)?;
    validate_run_sizes(RunSizes { steps, batch_size, seq_len, threads }, &model)
        .or_else(|(field, reason)| invalid(field, reason))?;
    if let Some(data) = table.get("data") {
        let data: DataConfig = data.clone().try_into().or_else(|e: toml::de::Error| {
            invalid("data", format!("invalid [data] table: {}", e.message().trim_end()))
        })?;
        data.check().or_else(|(field, reason)| invalid(field, reason))?;
        for (field, path) in data.paths() {
            admission.confine(field, &path.display().to_string())?;
        }
    }
    match table.get("init_from") {
        None => {}
        Some(toml::Value::String(dir)) => {
            admission.confine("init_from", dir)?;
        }
        Some(other) => return invalid("init_from", format!("must be a path, got a {}", other.type_str())),
    }
    Ok((steps, batch_size))
}

/// The planner's estimate of the memory each of `workers` workers needs for the job.
fn memory_in(table: &toml::Table, workers: u32, placement: Option<&Placement>) -> Result<u64, ServiceError> {
    let model = model_of(table)?;
    let batch_size: u64 = required(positive(table, "batch_size", "batch_size")?, "batch_size")?;
    let seq_len: u32 = required(positive(table, "seq_len", "seq_len")?, "seq_len")?;
    crate::plan::job_memory(&model, workers, batch_size, seq_len, placement.map(Placement::parallel))
        .map(|memory| memory.total)
        .or_else(|e| invalid("memory", format!("the planner cannot estimate the job's memory: {e}")))
}

/// The memory per worker of a stored job's config (0 when it cannot be estimated: a job
/// accepted by an older coordinator is then placed on any workers).
pub(crate) fn memory_of(config_toml: &str, workers: u32) -> u64 {
    let Ok(table) = config_toml.parse::<toml::Table>() else { return 0 };
    let placement = placement_in(&table, workers).ok().flatten();
    memory_in(&table, workers, placement.as_ref()).unwrap_or(0)
}

/// The placement of a job's run TOML on `workers` workers: `None` without a `[parallel]`
/// table, else the layout validated, its stages cut and its schedule compiled. The error
/// names the field at fault.
///
/// The `[parallel]` table is `flotilla_layout::ParallelConfig`, parsed and checked by its
/// rules (the keys, their types and defaults, DualPipe's even pp) with errors naming the
/// key (`parallel.pp`, …). Then, in the order they are checked:
/// - the `[model]` table loads (preset and overrides, validated) and `seq_len` ≥ 1;
/// - `pp` ≤ the model's `num_hidden_layers` (each stage runs at least one layer);
/// - `ep` divides `n_routed_experts` (1 for a model without routed experts);
/// - `pp × micro_batches` ≤ [`MAX_JOB_CHUNKS`];
/// - pipeline ranks × ep × dp = `workers`, where pipeline ranks are pp (pp / 2 under
///   DualPipeV);
/// - `batch_size` divisible by ep × dp × micro_batches: each of the ep × dp pipelines
///   runs the same number of sequences in every micro-batch;
/// - the schedule compiles (DualPipe: an even number of micro-batches ≥ 2·pp;
///   DualPipeV: micro-batches ≥ pp; 1F1B and ZB1P: any).
pub fn placement_of(config_toml: &str, workers: u32) -> Result<Option<Placement>, ServiceError> {
    let table: toml::Table = match config_toml.parse() {
        Ok(table) => table,
        Err(e) => return invalid("config_toml", format!("not valid TOML: {}", e.to_string().trim_end())),
    };
    placement_in(&table, workers)
}

fn placement_in(table: &toml::Table, workers: u32) -> Result<Option<Placement>, ServiceError> {
    let parallel = match table.get("parallel") {
        None => return Ok(None),
        Some(toml::Value::Table(parallel)) => parallel,
        Some(other) => return invalid("parallel", format!("must be a table, got a {}", other.type_str())),
    };
    // Any table reads as a raw one; its keys and values are checked by the layout's rules.
    let raw: RawParallel =
        toml::Value::Table(parallel.clone()).try_into().or_else(|e: toml::de::Error| {
            invalid("parallel", format!("cannot be read: {}", e.message().trim_end()))
        })?;
    let parallel = Parallel::from_raw(&raw).or_else(|ParallelError { key, reason }| invalid(&key, reason))?;
    let Parallel { pp, ep, dp, schedule, micro_batches, .. } = parallel;

    let model = model_of(table)?;
    let seq_len: u32 = required(positive(table, "seq_len", "seq_len")?, "seq_len")?;
    let layers = model.num_hidden_layers;
    if pp as usize > layers {
        return invalid(
            "parallel.pp",
            format!(
                "{pp} stages need at least {pp} layers, but the model has {layers} (each stage runs one or more)"
            ),
        );
    }
    let experts = model.n_routed_experts;
    if experts == 0 && ep > 1 {
        return invalid("parallel.ep", format!("{ep} needs routed experts to split, but the model has none"));
    }
    if experts > 0 && !experts.is_multiple_of(ep as usize) {
        return invalid(
            "parallel.ep",
            format!(
                "{ep} does not divide the model's {experts} routed experts: every EP rank must hold as many"
            ),
        );
    }
    let chunks = u64::from(pp) * u64::from(micro_batches);
    if chunks > MAX_JOB_CHUNKS {
        return invalid(
            "parallel.micro_batches",
            format!(
                "pp × micro_batches = {pp} × {micro_batches} = {chunks} is above the limit of {MAX_JOB_CHUNKS} chunks per step"
            ),
        );
    }
    let ranks = parallel.pipeline_ranks();
    let world = parallel.world_size();
    if world != u64::from(workers) {
        return invalid(
            "workers",
            format!(
                "{workers} workers, but [parallel] lays the job out on {ranks} pipeline ranks ({schedule} with pp = {pp}) × ep {ep} × dp {dp} = {world}"
            ),
        );
    }
    let batch_size: u64 = required(positive(table, "batch_size", "batch_size")?, "batch_size")?;
    parallel.check_batch(batch_size).or_else(|ParallelError { key, reason }| invalid(&key, reason))?;
    match Placement::new(parallel, &model, seq_len) {
        Ok(placement) => Ok(Some(placement)),
        // pp was checked above, so what the compiler refuses is the micro-batch count.
        Err(PlacementError::Schedule(ScheduleError::Spec(why))) => invalid("parallel.micro_batches", why),
        Err(PlacementError::TooLarge(_)) => invalid("workers", format!("{workers} workers is too many")),
        Err(e) => invalid("parallel", e.to_string()),
    }
}

/// The run's `[model]` table, loaded as the workers load it (a preset and overrides,
/// validated).
fn model_of(table: &toml::Table) -> Result<ModelConfig, ServiceError> {
    let model = match table.get("model") {
        None => {
            return invalid(
                "model",
                "is missing: a pipeline job's stages are cut from the model's layers".into(),
            );
        }
        Some(toml::Value::Table(model)) => model,
        Some(other) => return invalid("model", format!("must be a table, got a {}", other.type_str())),
    };
    let text = toml::to_string(model).map_err(|e| ServiceError::InvalidArgument {
        field: "model".into(),
        reason: format!("cannot be re-read: {e}"),
    })?;
    ModelConfig::from_toml(&text)
        .map_err(|e| ServiceError::InvalidArgument { field: "model".into(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(workers: u32, batch_size: u64, parallel: &str) -> SubmitJobRequest {
        SubmitJobRequest {
            name: "t".into(),
            config_toml: format!(
                "steps = 2\nbatch_size = {batch_size}\nseq_len = 16\n{parallel}\n[model]\npreset = \"tiny\"\n"
            ),
            workers,
            ..SubmitJobRequest::default()
        }
    }

    fn admission() -> Admission {
        Admission::new(&CoordinatorConfig::default()).unwrap()
    }

    /// The field and reason of a refused request.
    fn refused(request: &SubmitJobRequest) -> (String, String) {
        match validate_submit(request, &admission()) {
            Err(ServiceError::InvalidArgument { field, reason }) => (field, reason),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn without_parallel_the_job_is_data_parallel() {
        let spec = validate_submit(&request(4, 8, ""), &admission()).unwrap();
        assert_eq!(spec.placement, None);
        assert_eq!(refused(&request(3, 8, "")).0, "batch_size");
    }

    #[test]
    fn a_parallel_table_is_placed() {
        let parallel = "[parallel]\npp = 2\nep = 2\ndp = 2\nmicro_batches = 4\n";
        let spec = validate_submit(&request(8, 16, parallel), &admission()).unwrap();
        let placement = spec.placement.expect("a pipeline job");
        assert_eq!(placement.world_size(), 8);
        assert_eq!(placement.parallel().schedule, flotilla_layout::ScheduleKind::DualPipe);
        assert!(placement.parallel().overlap);
        // Every key of the table travels typed in the assignment, `overlap` included.
        let off = "[parallel]\npp = 2\nmicro_batches = 4\noverlap = false\n";
        let layout = validate_submit(&request(2, 4, off), &admission())
            .unwrap()
            .placement
            .unwrap()
            .assignment(1)
            .layout
            .unwrap();
        assert!(!layout.overlap);
        assert_eq!(layout.schedule_kind(), flotilla_proto::v1::ScheduleKind::DualPipe);
        assert_eq!(placement.stages().len(), 2);
        // Data-parallel divisibility over the workers does not apply: 16 % 8 would, 20 % 8
        // does not, but 20 is not a multiple of ep·dp·micro_batches = 16 either.
        assert_eq!(refused(&request(8, 20, parallel)).0, "batch_size");
        let v = "[parallel]\npp = 4\nschedule = \"dualpipev\"\nmicro_batches = 4\n";
        assert_eq!(
            validate_submit(&request(2, 4, v), &admission()).unwrap().placement.unwrap().world_size(),
            2
        );
        let zb = "[parallel]\npp = 3\nschedule = \"zb1p\"\nmicro_batches = 3\n";
        assert_eq!(
            validate_submit(&request(3, 3, zb), &admission()).unwrap().placement.unwrap().stages().len(),
            3
        );
    }

    #[test]
    fn parallel_errors_name_the_field() {
        let cases: &[(u32, u64, &str, &str, &str)] = &[
            (2, 4, "parallel = 3", "parallel", "must be a table"),
            (2, 4, "[parallel]\npp = 2\nmicro_batches = 4\ntp = 2", "parallel.tp", "not a [parallel] key"),
            (2, 4, "[parallel]\nmicro_batches = 4", "parallel.pp", "is missing"),
            (2, 4, "[parallel]\npp = \"auto\"\nmicro_batches = 4", "parallel.pp", "flotilla plan"),
            (2, 4, "[parallel]\npp = 0\nmicro_batches = 4", "parallel.pp", "at least 1"),
            (2, 4, "[parallel]\npp = 2\nep = -1\nmicro_batches = 4", "parallel.ep", "at least 1"),
            (2, 4, "[parallel]\npp = 2\ndp = 1.5\nmicro_batches = 4", "parallel.dp", "positive integer"),
            (2, 4, "[parallel]\npp = 2", "parallel.micro_batches", "is missing"),
            (
                2,
                4,
                "[parallel]\npp = 2\nmicro_batches = 4\nschedule = \"gpipe\"",
                "parallel.schedule",
                "unknown schedule",
            ),
            (3, 6, "[parallel]\npp = 3\nmicro_batches = 6", "parallel.pp", "DualPipe needs an even pp"),
            (2, 6, "[parallel]\npp = 2\nmicro_batches = 3", "parallel.micro_batches", "≥ 2·pp"),
            (
                6,
                8,
                "[parallel]\npp = 6\nschedule = \"1f1b\"\nmicro_batches = 8",
                "parallel.pp",
                "model has 4",
            ),
            (6, 8, "[parallel]\npp = 2\nep = 3\nmicro_batches = 4", "parallel.ep", "16 routed experts"),
            (4, 8, "[parallel]\npp = 2\nmicro_batches = 4", "workers", "= 2"),
            (2, 6, "[parallel]\npp = 2\nmicro_batches = 4", "batch_size", "equal micro-batches"),
            (2, 4, "[parallel]\npp = 2\nmicro_batches = 40000", "parallel.micro_batches", "limit"),
        ];
        for &(workers, batch, parallel, field, reason) in cases {
            let (f, r) = refused(&request(workers, batch, parallel));
            assert_eq!(f, field, "{parallel}: {r}");
            assert!(r.contains(reason), "{parallel}: {r:?} lacks {reason:?}");
        }
        // The model must load.
        let mut bad_model = request(2, 4, "[parallel]\npp = 2\nmicro_batches = 4");
        bad_model.config_toml = bad_model.config_toml.replace("preset = \"tiny\"", "preset = \"huge\"");
        assert_eq!(refused(&bad_model).0, "model");
        let mut no_model = request(2, 4, "[parallel]\npp = 2\nmicro_batches = 4");
        no_model.config_toml = no_model.config_toml.replace("[model]\npreset = \"tiny\"\n", "");
        assert_eq!(refused(&no_model).0, "model");
    }
}
