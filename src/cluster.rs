//! The control plane from the command line: `flotilla coordinator`, `worker`, `submit`,
//! `jobs`, `watch`, `workers`, `cancel`, and `run`, the all-in-one that starts a coordinator in this process,
//! spawns worker processes of this binary, submits the run and follows it to the end.
//! The work is in `flotilla_coordinator::service` and `flotilla_worker::agent`, and the
//! worker processes of `run` are supervised by `flotilla_supervisor`; this file parses
//! flags, dials, prints, and says what `run` starts.

use anyhow::{Context, Result, bail};
use clap::Args;
use flotilla_coordinator::schedule::executed_chrome_trace;
use flotilla_coordinator::service::auth::{
    AuthChannel, BearerToken, ClientAuth, ClientTls, RateLimit, RateLimits, Role, ServerTls, first_token,
};
use flotilla_coordinator::service::{
    CoordinatorConfig, DEFAULT_MAX_JOB_WORKERS, JobRetention, MAX_JOB_WORKERS, bind_and_serve,
};
use flotilla_coordinator::store::StoreConfig;
use flotilla_model::ModelConfig;
use flotilla_model::train::{ParallelConfig, TrainConfig};
use flotilla_proto::v1::job_event::Event;
use flotilla_proto::v1::job_service_client::JobServiceClient;
use flotilla_proto::v1::{
    CancelJobRequest, GetJobRequest, GetStepTimelineRequest, Job, JobEvent, JobState, ListJobsRequest,
    ListWorkersRequest, SubmitJobRequest, WatchJobRequest, WorkerStatus,
};
use flotilla_supervisor::{Event as ProcessEvent, ProcessId, ProcessSpec, RestartPolicy, Supervisor};
use flotilla_worker::agent::{CoordinatorTls, WorkerOptions, WorkerToken, run_worker};
use indicatif::{ProgressBar, ProgressStyle};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The coordinator address the client commands dial when `--coordinator` is not given.
/// A bare host:port: `http://`, or `https://` with --tls-ca.
const DEFAULT_COORDINATOR: &str = "127.0.0.1:7070";

/// How a client reaches the coordinator: TLS and a bearer token (the coordinator's
/// `--token-file` has it with a role).
#[derive(Args, Clone, Default)]
pub struct ClientFlags {
    /// The CA certificate (PEM) the coordinator's certificate chains to; turns on TLS (a bare
    /// host:port means https://).
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM), for a coordinator that verifies clients (mutual TLS).
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The key (PEM) of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The name the coordinator's certificate carries, when it is not the URL's host.
    #[arg(long, requires = "tls_ca")]
    tls_domain: Option<String>,
    /// The bearer token sent with every call (better in FLOTILLA_TOKEN: a flag shows in `ps`).
    #[arg(long, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl ClientFlags {
    fn auth(&self) -> Result<ClientAuth> {
        let tls = self.tls_ca.as_ref().map(|ca| ClientTls {
            ca: ca.clone(),
            identity: self.tls_cert.clone().zip(self.tls_key.clone()),
            domain: self.tls_domain.clone(),
        });
        let token = self.token.as_deref().map(BearerToken::new).transpose().context("--token")?;
        Ok(ClientAuth { tls, token })
    }
}

#[derive(Args)]
pub struct CoordinatorArgs {
    /// Where to listen. Loopback by default; another interface needs --tls-cert, --tls-key
    /// and --token-file (or --insecure).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Where jobs and their events are kept across restarts: the file store's directory.
    #[arg(long, default_value = "flotilla-state", conflicts_with = "store")]
    state_dir: PathBuf,
    /// The state store instead of --state-dir: a directory (or file://DIR), or an etcd
    /// cluster, etcd://HOST:PORT[,HOST:PORT…][?prefix=/flotilla/&ca=PEM&cert=PEM&key=PEM
    /// &user=NAME&password-file=FILE&timeout-ms=5000] (needs a build with `--features etcd`).
    #[arg(long, value_name = "URL")]
    store: Option<StoreConfig>,
    /// Serve TLS with this certificate chain (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The key (PEM) of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates chaining to this CA (PEM): mutual TLS.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Bearer tokens with roles, one `ROLE TOKEN` per line (admin, viewer, worker); reloaded
    /// when the file changes. Without it every RPC is open.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Listen beyond loopback without TLS or a token file (warned about at every start).
    #[arg(long)]
    insecure: bool,
    /// How often workers heartbeat, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    heartbeat_interval_ms: u64,
    /// A worker silent for this long is lost, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    heartbeat_timeout_ms: u64,
    /// Job submissions per second each caller (a token, or an address without
    /// --token-file) may make, on average; more get RESOURCE_EXHAUSTED.
    #[arg(long, value_name = "PER_SECOND", default_value_t = 10.0)]
    submit_rate: f64,
    /// Job submissions each caller may make at once.
    #[arg(long, value_name = "CALLS", default_value_t = 100)]
    submit_burst: u32,
    /// Worker registrations per second each caller may make, on average (a cluster's
    /// workers usually share one token, hence one limit).
    #[arg(long, value_name = "PER_SECOND", default_value_t = 1000.0)]
    register_rate: f64,
    /// Worker registrations each caller may make at once.
    #[arg(long, value_name = "CALLS", default_value_t = 10_000)]
    register_burst: u32,
    /// Keep this many finished jobs (the most recently ended) in the state store; older
    /// ones are deleted (records and events, not their run directories).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    retain_jobs: usize,
    /// Also delete finished jobs that ended longer ago than this (`90s`, `30m`, `12h`, `7d`).
    #[arg(long, value_name = "DURATION", value_parser = parse_age)]
    retain_age: Option<Duration>,
    /// A directory jobs' output, checkpoint, resume and data paths must lie under
    /// (repeatable; default: the working directory). `..`, paths outside every root and
    /// symlinks leading out are refused at submission.
    #[arg(long = "allowed-root", value_name = "DIR")]
    allowed_roots: Vec<PathBuf>,
    /// Refuse jobs asking for more workers than this: they could never be placed.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_JOB_WORKERS,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_JOB_WORKERS)))]
    max_job_workers: u32,
    /// Refuse jobs whose estimated memory per worker exceeds this (e.g. 64GiB); without
    /// it, a job is only kept off workers that report less memory than it needs.
    #[arg(long, value_name = "SIZE", value_parser = crate::plan::parse_bytes)]
    max_worker_memory: Option<u64>,
}

/// A duration for --retain-age: a positive whole number with a unit, `s`, `m`, `h` or `d`.
fn parse_age(text: &str) -> Result<Duration, String> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?} needs a unit: s, m, h or d")),
    };
    match n.checked_mul(seconds) {
        Some(0) => Err("the age must be positive".into()),
        Some(total) => Ok(Duration::from_secs(total)),
        None => Err(format!("{text:?} is too long")),
    }
}

#[derive(Args)]
pub struct WorkerArgs {
    /// The coordinator's URL.
    #[arg(long, default_value = DEFAULT_COORDINATOR)]
    coordinator: String,
    /// TLS and the worker's token.
    #[command(flatten)]
    client: ClientFlags,
    /// The id to register with (default: the coordinator chooses).
    #[arg(long)]
    worker_id: Option<String>,
    /// The node this worker runs on (default: the host name); workers with the same node id
    /// count as one machine for hierarchical communication.
    #[arg(long)]
    node_id: Option<String>,
    /// This worker's index on its node.
    #[arg(long, default_value_t = 0)]
    local_rank: u32,
    /// Where the data plane listens. Beyond loopback it needs TLS to the coordinator
    /// (--tls-ca), over which each job's data-plane secret arrives, or --insecure.
    #[arg(long, default_value = "127.0.0.1:0")]
    data_plane_listen: String,
    /// Let the data plane listen beyond loopback over a plaintext coordinator connection
    /// (warned about at every start).
    #[arg(long)]
    insecure: bool,
    /// Compute threads (default: the run config's `threads`, else all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where relative paths in run configs start (text data files).
    #[arg(long, default_value = ".")]
    config_base: PathBuf,
    /// A directory an assignment's paths (output, checkpoints, data, init-from) must lie
    /// under (repeatable; default: the working directory); the worker refuses a job
    /// naming any other path, and never follows a symlink out of the roots.
    #[arg(long = "allowed-root", value_name = "DIR")]
    allowed_roots: Vec<PathBuf>,
    /// The memory this worker's model state may take (e.g. 16GiB), reported to the
    /// coordinator for placement (default: the machine's memory).
    #[arg(long, value_name = "SIZE", value_parser = crate::plan::parse_bytes)]
    memory_limit: Option<u64>,
    /// Stop when standard input closes: `flotilla run` holds its workers' stdin, so they
    /// stop with it however it ends (even killed).
    #[arg(long, hide = true)]
    exit_with_stdin: bool,
}

#[derive(Args)]
pub struct SubmitArgs {
    /// The run's TOML.
    config: PathBuf,
    /// The coordinator's URL.
    #[arg(long, default_value = DEFAULT_COORDINATOR)]
    coordinator: String,
    /// TLS and the token.
    #[command(flatten)]
    client: ClientFlags,
    /// Workers. Default: as many as the config's `[parallel]` layout needs, else 1.
    #[arg(long)]
    workers: Option<u32>,
    /// The job's name (default: the config's file name).
    #[arg(long)]
    name: Option<String>,
    /// Where rank 0 writes metrics.jsonl and the weights, and the workers their checkpoints
    /// (empty: nowhere).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Start from this committed checkpoint (a directory holding a manifest.json).
    #[arg(long, value_name = "CHECKPOINT")]
    resume: Option<PathBuf>,
}

#[derive(Args)]
pub struct JobsArgs {
    /// The coordinator's URL.
    #[arg(long, default_value = DEFAULT_COORDINATOR)]
    coordinator: String,
    /// TLS and the token.
    #[command(flatten)]
    client: ClientFlags,
    /// One JSON object per job.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct WorkersArgs {
    /// The coordinator's URL.
    #[arg(long, default_value = DEFAULT_COORDINATOR)]
    coordinator: String,
    /// TLS and the token.
    #[command(flatten)]
    client: ClientFlags,
    /// One JSON object per worker, then one with the heartbeat figures.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct WatchArgs {
    /// The job (default: the most recently created).
    job: Option<String>,
    /// The coordinator's URL.
    #[arg(long, default_value = DEFAULT_COORDINATOR)]
    coordinator: String,
    /// TLS and the token.
    #[command(flatten)]
    client: ClientFlags,
    /// Resume after this revision (0: from the job's first event).
    #[arg(long, default_value_t = 0)]
    from_revision: u64,
    /// One JSON object per event, for scripts and dashboards.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct CancelArgs {
    /// The job to cancel.
    job: String,
    /// The coordinator's URL.
    #[arg(long, default_value = DEFAULT_COORDINATOR)]
    coordinator: String,
    /// TLS and the (admin) token.
    #[command(flatten)]
    client: ClientFlags,
    /// Why, recorded with the job.
    #[arg(long, default_value = "cancelled from the command line")]
    reason: String,
}

#[derive(Args)]
pub struct RunArgs {
    /// The run's TOML (see examples/tiny.toml).
    config: PathBuf,
    /// Worker processes. Default: as many as the config's `[parallel]` layout needs, else
    /// 2 data-parallel workers (the config's `batch_size` must divide evenly over them).
    #[arg(long)]
    workers: Option<u32>,
    /// Spread the workers over this many simulated nodes (consecutive workers share a
    /// node id), so that node-aware communication runs on one machine.
    #[arg(long, default_value_t = 1)]
    nodes: u32,
    /// Override the number of steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Write the last step's executed timeline, every rank's instructions as the workers
    /// ran them, to this file as a Chrome trace (open in Perfetto or chrome://tracing).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Output directory for metrics.jsonl, the weights, the checkpoints and the
    /// coordinator's state (default: `runs/<config name>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Start from a committed checkpoint: its directory, or, with no value, the newest one
    /// under the output directory's `checkpoints/`. The steps continue after its step, with
    /// the losses of a run that never stopped (the layout may differ from the saving run's).
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "CHECKPOINT")]
    resume: Option<String>,
    /// Start from this HF-layout checkpoint's weights instead of the seeded initialization
    /// (overrides the config's `init_from`); each worker reads only the tensors its rank
    /// holds. Ignored by `--resume`, whose checkpoint already holds the trained state.
    #[arg(long, value_name = "HF_DIR")]
    init_from: Option<PathBuf>,
    /// The largest file of the final weights ("5GB", "500MB", "10KiB" or bytes; default:
    /// the config's `max_shard_size`, else transformers' 50GB); more is sharded.
    #[arg(long, value_parser = crate::train::parse_size)]
    max_shard_size: Option<u64>,
    /// Serve the run's coordinator with TLS, with this certificate chain (PEM); the launcher
    /// and its workers check it against --tls-ca.
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The key (PEM) of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA (PEM) the launcher and its workers check the coordinator's certificate against.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// The name the certificate carries, when it does not cover 127.0.0.1.
    #[arg(long, requires = "tls_cert")]
    tls_domain: Option<String>,
    /// The coordinator checks these tokens (`ROLE TOKEN` lines); the launcher calls with the
    /// file's first admin token, its workers with its first worker token.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

/// What `flotilla run` tells its coordinator, uses itself, and hands its workers: TLS and
/// the tokens of `--token-file`.
struct RunSecurity {
    coordinator_tls: Option<ServerTls>,
    launcher: ClientAuth,
    worker_token: Option<String>,
}

impl RunSecurity {
    fn of(args: &RunArgs) -> Result<RunSecurity> {
        let coordinator_tls = args.tls_cert.clone().zip(args.tls_key.clone()).map(|(cert, key)| ServerTls {
            cert,
            key,
            client_ca: None,
        });
        let client_tls =
            args.tls_ca.clone().map(|ca| ClientTls { ca, identity: None, domain: args.tls_domain.clone() });
        let (admin, worker_token) = match &args.token_file {
            None => (None, None),
            Some(path) => {
                let admin = first_token(path, Role::Admin)?.with_context(|| {
                    format!("--token-file {}: the launcher needs an admin token", path.display())
                })?;
                let worker = first_token(path, Role::Worker)?.with_context(|| {
                    format!("--token-file {}: the workers need a worker token", path.display())
                })?;
                (Some(BearerToken::new(&admin)?), Some(worker))
            }
        };
        Ok(RunSecurity {
            coordinator_tls,
            launcher: ClientAuth { tls: client_tls, token: admin },
            worker_token,
        })
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

type JobsClient = JobServiceClient<AuthChannel>;

async fn jobs_client(coordinator: &str, auth: &ClientAuth) -> Result<JobsClient> {
    let endpoint = auth.endpoint(coordinator)?;
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("--coordinator: cannot reach {}", endpoint.uri()))?;
    Ok(JobServiceClient::with_interceptor(channel, auth.interceptor()))
}

pub fn coordinator(args: CoordinatorArgs) -> Result<()> {
    runtime()?.block_on(async {
        let tls = args.tls_cert.zip(args.tls_key).map(|(cert, key)| ServerTls {
            cert,
            key,
            client_ca: args.tls_ca,
        });
        let config = CoordinatorConfig {
            listen: args.listen,
            store: args.store.unwrap_or(StoreConfig::File(args.state_dir)),
            tls,
            token_file: args.token_file,
            insecure: args.insecure,
            heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms),
            heartbeat_timeout: Duration::from_millis(args.heartbeat_timeout_ms),
            rate_limits: RateLimits {
                submit: Some(RateLimit { rate: args.submit_rate, burst: args.submit_burst }),
                register: Some(RateLimit { rate: args.register_rate, burst: args.register_burst }),
            },
            retention: JobRetention { max_jobs: Some(args.retain_jobs), max_age: args.retain_age },
            allowed_roots: roots_or_cwd(args.allowed_roots),
            max_job_workers: args.max_job_workers,
            max_worker_memory: args.max_worker_memory,
            ..CoordinatorConfig::default()
        };
        let handle = bind_and_serve(config).await?;
        eprintln!("flotilla coordinator listening on {} (Ctrl-C stops it)", handle.local_addr());
        tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
        handle.shutdown().await?;
        Ok(())
    })
}

pub fn worker(args: WorkerArgs) -> Result<()> {
    let runtime = runtime()?;
    let result = runtime.block_on(async {
        let mut options = WorkerOptions::new(args.coordinator);
        options.tls = args.client.tls_ca.map(|ca| CoordinatorTls {
            ca,
            identity: args.client.tls_cert.zip(args.client.tls_key),
            domain: args.client.tls_domain,
        });
        options.token = args.client.token.as_deref().map(WorkerToken::new).transpose()?;
        options.worker_id = args.worker_id;
        options.node_id = args.node_id;
        options.local_rank = args.local_rank;
        options.data_plane_listen = args.data_plane_listen;
        options.insecure = args.insecure;
        options.threads = args.threads;
        options.config_base = args.config_base;
        options.allowed_roots = roots_or_cwd(args.allowed_roots);
        options.memory_bytes = args.memory_limit;
        let shutdown = CancellationToken::new();
        let on_signal = shutdown.clone();
        let watch_stdin = args.exit_with_stdin;
        let signals = tokio::spawn(async move {
            let stdin_closed = async {
                if !watch_stdin {
                    return std::future::pending().await;
                }
                let mut sink = tokio::io::sink();
                let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut sink).await;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = stdin_closed => {}
            }
            on_signal.cancel();
        });
        let result = run_worker(options, shutdown).await;
        signals.abort();
        Ok(result?)
    });
    // A blocking read of stdin (--exit-with-stdin) cannot be interrupted: do not wait for it.
    runtime.shutdown_background();
    result
}

/// The `--allowed-root` flags, or the working directory without any.
fn roots_or_cwd(roots: Vec<PathBuf>) -> Vec<PathBuf> {
    if roots.is_empty() { vec![PathBuf::from(".")] } else { roots }
}

/// The roots `flotilla run` gives its coordinator and workers: the working directory, the
/// output directory, the config's directory, and each file or directory the config names
/// that exists (the local launcher runs the user's own config, so what it names is
/// allowed; nothing else is).
fn run_roots(out: &Path, config_base: &Path, config: &TrainConfig) -> Vec<PathBuf> {
    let mut roots = vec![PathBuf::from("."), out.to_path_buf(), config_base.to_path_buf()];
    let named = config.data.paths().into_iter().map(|(_, p)| p).chain(config.init_from.clone());
    roots.extend(named.filter(|p| p.exists()));
    roots
}

/// Reads and checks a run config the way the workers will, so that a bad field is
/// reported here, before anything starts; `steps` overrides the config's.
fn read_config(path: &Path, steps: Option<u64>) -> Result<(String, TrainConfig)> {
    let (text, config, _) = read_config_with(path, steps, Vec::new())?;
    Ok((text, config))
}

/// The config file's text with `overrides` (top-level keys: `--steps`, `--init-from`, …)
/// written into it, as the workers will parse it, the parsed config and its model.
fn read_config_with(
    path: &Path,
    steps: Option<u64>,
    mut overrides: Vec<(&str, toml::Value)>,
) -> Result<(String, TrainConfig, ModelConfig)> {
    let mut text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if let Some(steps) = steps {
        anyhow::ensure!(steps > 0, "`--steps` must be at least 1");
        overrides
            .push(("steps", toml::Value::Integer(i64::try_from(steps).context("--steps is too large")?)));
    }
    if !overrides.is_empty() {
        let mut table: toml::Table = text.parse().with_context(|| format!("in {}", path.display()))?;
        for (key, value) in overrides {
            table.insert(key.into(), value);
        }
        text = toml::to_string(&table).context("writing the config back")?;
    }
    let base = path.parent().map(PathBuf::from).unwrap_or_default();
    let (config, model) =
        TrainConfig::from_toml(&text, &base).with_context(|| format!("in {}", path.display()))?;
    Ok((text, config, model))
}

/// The directory a config's relative paths are resolved against: its parent, which for a
/// bare file name (`run v.toml`) is the empty path, meaning the working directory.
fn config_dir(config: &Path) -> &Path {
    match config.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

fn job_name(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into())
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

pub fn submit(args: SubmitArgs) -> Result<()> {
    let (text, config) = read_config(&args.config, None)?;
    let workers = match (args.workers, config.parallel.as_ref().map(ParallelConfig::world_size)) {
        (Some(n), _) => n,
        (None, Some(needed)) => u32::try_from(needed).unwrap_or(u32::MAX),
        (None, None) => 1,
    };
    runtime()?.block_on(async {
        let mut client = jobs_client(&args.coordinator, &args.client.auth()?).await?;
        let output_dir = match &args.out {
            Some(out) => absolute(out)?.display().to_string(),
            None => String::new(),
        };
        let job = client
            .submit_job(SubmitJobRequest {
                name: args.name.unwrap_or_else(|| job_name(&args.config)),
                config_toml: text,
                workers,
                output_dir,
                resume_from: match &args.resume {
                    Some(dir) => absolute(dir)?.display().to_string(),
                    None => String::new(),
                },
            })
            .await
            .map_err(status)?
            .into_inner();
        println!("{}", job.job_id);
        Ok(())
    })
}

pub fn jobs(args: JobsArgs) -> Result<()> {
    runtime()?.block_on(async {
        let mut client = jobs_client(&args.coordinator, &args.client.auth()?).await?;
        let jobs = client.list_jobs(ListJobsRequest {}).await.map_err(status)?.into_inner().jobs;
        for job in &jobs {
            if args.json {
                println!("{}", serde_json::to_string(&job_json(job))?);
            } else {
                println!(
                    "{:<24} {:<16} {:<10} step {}/{} workers {}{}",
                    job.job_id,
                    job.name,
                    job.state().name(),
                    job.steps_done,
                    job.total_steps,
                    job.workers,
                    if job.reason.is_empty() { String::new() } else { format!(" ({})", job.reason) }
                );
            }
        }
        Ok(())
    })
}

pub fn workers(args: WorkersArgs) -> Result<()> {
    runtime()?.block_on(async {
        let mut client = jobs_client(&args.coordinator, &args.client.auth()?).await?;
        let listed = client.list_workers(ListWorkersRequest {}).await.map_err(status)?.into_inner();
        let beats = listed.heartbeats.unwrap_or_default();
        if args.json {
            for worker in &listed.workers {
                println!("{}", serde_json::to_string(&worker_json(worker))?);
            }
            let stats = serde_json::json!({
                "heartbeats_handled": beats.handled,
                "window": beats.window,
                "p50_us": beats.p50_us,
                "p99_us": beats.p99_us,
                "max_us": beats.max_us,
            });
            println!("{stats}");
            return Ok(());
        }
        for w in &listed.workers {
            let job = if w.job_id.is_empty() { "idle" } else { w.job_id.as_str() };
            let session = if w.session_open { "" } else { " (no session yet)" };
            println!(
                "{:<24} {:<16} node {}/{} pid {:<8} {:<16} heard {} ms ago{session}",
                w.worker_id, w.host, w.node_id, w.local_rank, w.pid, job, w.silent_ms
            );
        }
        println!(
            "{} workers; heartbeat handling over the last {}: p50 {} µs, p99 {} µs, max {} µs ({} handled)",
            listed.workers.len(),
            beats.window,
            beats.p50_us,
            beats.p99_us,
            beats.max_us,
            beats.handled
        );
        Ok(())
    })
}

fn worker_json(w: &WorkerStatus) -> serde_json::Value {
    serde_json::json!({
        "worker_id": w.worker_id,
        "host": w.host,
        "node_id": w.node_id,
        "local_rank": w.local_rank,
        "pid": w.pid,
        "data_plane_address": w.data_plane_address,
        "session_open": w.session_open,
        "job_id": w.job_id,
        "heartbeats": w.heartbeats,
        "silent_ms": w.silent_ms,
    })
}

pub fn watch(args: WatchArgs) -> Result<()> {
    runtime()?.block_on(async {
        let mut client = jobs_client(&args.coordinator, &args.client.auth()?).await?;
        let job_id = match args.job {
            Some(job) => job,
            None => {
                let jobs = client.list_jobs(ListJobsRequest {}).await.map_err(status)?.into_inner().jobs;
                let latest = jobs.into_iter().max_by_key(|j| (j.created_unix_ms, j.job_id.clone()));
                latest.map(|j| j.job_id).context("the coordinator has no jobs to watch")?
            }
        };
        let mut events = client
            .watch_job(WatchJobRequest { job_id: job_id.clone(), from_revision: args.from_revision })
            .await
            .map_err(status)?
            .into_inner();
        while let Some(event) = events.message().await.map_err(status)? {
            if args.json {
                println!("{}", serde_json::to_string(&event_json(&event))?);
            } else {
                println!("{}", describe(&event));
            }
        }
        Ok(())
    })
}

pub fn cancel(args: CancelArgs) -> Result<()> {
    runtime()?.block_on(async {
        let mut client = jobs_client(&args.coordinator, &args.client.auth()?).await?;
        let job = client
            .cancel_job(CancelJobRequest { job_id: args.job, reason: args.reason })
            .await
            .map_err(status)?
            .into_inner();
        println!("{} {}", job.job_id, job.state().name());
        Ok(())
    })
}

/// A gRPC status as an error that reads well: its message, and its code when that adds
/// something.
fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}

fn job_json(job: &Job) -> serde_json::Value {
    serde_json::json!({
        "job_id": job.job_id,
        "name": job.name,
        "state": job.state().name(),
        "reason": job.reason,
        "workers": job.workers,
        "steps_done": job.steps_done,
        "total_steps": job.total_steps,
        "last_loss": job.last_loss,
        "revision": job.revision,
        "created_unix_ms": job.created_unix_ms,
        "updated_unix_ms": job.updated_unix_ms,
        "output_dir": job.output_dir,
        "checkpoint_step": job.checkpoint_step,
        "checkpoint_dir": job.checkpoint_dir,
        "restarts": job.restarts,
    })
}

fn event_json(event: &JobEvent) -> serde_json::Value {
    let body = match &event.event {
        Some(Event::StateChanged(s)) => serde_json::json!({
            "type": "state_changed",
            "from": s.from().name(),
            "to": s.to().name(),
            "reason": s.reason,
        }),
        Some(Event::Step(s)) => serde_json::json!({
            "type": "step",
            "step": s.step,
            "loss": s.loss,
            "main_ce": s.main_ce,
            "mtp_ce": s.mtp_ce,
            "balance_loss": s.balance_loss,
            "lr": s.lr,
            "grad_norm": s.grad_norm,
            "tokens": s.tokens,
            "tokens_per_second": s.tokens_per_second,
            "max_expert_load": s.max_expert_load,
            "mean_expert_load": s.mean_expert_load,
        }),
        Some(Event::WorkerJoined(w)) => serde_json::json!({
            "type": "worker_joined", "worker_id": w.worker_id, "rank": w.rank, "host": w.host,
        }),
        Some(Event::CheckpointCommitted(c)) => serde_json::json!({
            "type": "checkpoint_committed", "step": c.step, "dir": c.dir, "shards": c.shards, "bytes": c.bytes,
            "snapshot_seconds": c.snapshot_seconds, "write_seconds": c.write_seconds, "deleted_steps": c.deleted_steps,
        }),
        Some(Event::Recovery(r)) => serde_json::json!({
            "type": "recovery", "cause": r.cause, "restart": r.restart, "from_step": r.from_step,
            "steps_redone": r.steps_redone, "detected_unix_ms": r.detected_unix_ms,
            "restart_seconds": r.restart_seconds, "abort_seconds": r.abort_seconds,
            "replace_seconds": r.replace_seconds, "reload_seconds": r.reload_seconds,
            "recompute_seconds": r.recompute_seconds,
            "skipped_checkpoints": r.skipped_checkpoints, "replay_mismatches": r.replay_mismatches,
        }),
        Some(Event::WorkerLost(w)) => serde_json::json!({
            "type": "worker_lost", "worker_id": w.worker_id, "reason": w.reason,
        }),
        None => serde_json::json!({ "type": "unknown" }),
    };
    serde_json::json!({
        "revision": event.revision,
        "job_id": event.job_id,
        "unix_ms": event.unix_ms,
        "event": body,
    })
}

fn describe(event: &JobEvent) -> String {
    let what = match &event.event {
        Some(Event::StateChanged(s)) => {
            let reason = if s.reason.is_empty() { String::new() } else { format!(": {}", s.reason) };
            format!("{} → {}{reason}", s.from().name(), s.to().name())
        }
        Some(Event::Step(s)) => {
            format!(
                "step {} loss {:.4} · {:.0} tok/s · grad norm {:.3}",
                s.step, s.loss, s.tokens_per_second, s.grad_norm
            )
        }
        Some(Event::WorkerJoined(w)) => {
            format!("worker {} joined as rank {} ({})", w.worker_id, w.rank, w.host)
        }
        Some(Event::WorkerLost(w)) => format!("worker {} lost: {}", w.worker_id, w.reason),
        Some(Event::CheckpointCommitted(c)) => format!(
            "checkpoint at step {} committed: {} shards, {:.1} MiB ({}); snapshot {:.1} ms, write {:.1} ms",
            c.step,
            c.shards,
            c.bytes as f64 / (1 << 20) as f64,
            c.dir,
            1e3 * c.snapshot_seconds,
            1e3 * c.write_seconds
        ),
        Some(Event::Recovery(r)) => {
            let skipped = if r.skipped_checkpoints.is_empty() {
                String::new()
            } else {
                format!("; skipped unloadable checkpoints {}", r.skipped_checkpoints.join(", "))
            };
            let replay = if r.replay_mismatches == 0 {
                "the redone steps' losses equal the first run's".to_string()
            } else {
                format!("{} redone steps' losses DIFFER from the first run's", r.replay_mismatches)
            };
            format!(
                "recovered (restart {}) from: {}; resumed from step {}, {} steps redone; restart {:.2} s (abort {:.2}, replace {:.2}, reload {:.2}), recompute {:.2} s; {replay}{skipped}",
                r.restart,
                r.cause,
                r.from_step,
                r.steps_redone,
                r.restart_seconds,
                r.abort_seconds,
                r.replace_seconds,
                r.reload_seconds,
                r.recompute_seconds
            )
        }
        None => "an event this client does not know".into(),
    };
    format!("#{} {what}", event.revision)
}

/// How `flotilla run` starts its worker processes: what each is told.
struct WorkerSpawn {
    exe: PathBuf,
    coordinator: SocketAddr,
    /// How the workers check the coordinator's certificate; `None`: plaintext.
    tls: Option<ClientTls>,
    /// The workers' token, handed over in their environment (not their arguments, which
    /// any local user can read).
    token: Option<String>,
    config_base: PathBuf,
    allowed_roots: Vec<PathBuf>,
    threads: usize,
    count: u32,
    nodes: u32,
}

impl WorkerSpawn {
    /// Worker `rank`'s process (`count / nodes` consecutive workers per node id): this
    /// binary's `worker`, on a lifeline so that it stops with the run however the run ends.
    fn spec(&self, rank: u32, restart: RestartPolicy) -> ProcessSpec {
        let per_node = (self.count / self.nodes.max(1)).max(1);
        let mut spec = ProcessSpec::new(format!("worker {rank}"), &self.exe)
            .arg("worker")
            .args([
                "--coordinator",
                &format!("{}://{}", if self.tls.is_some() { "https" } else { "http" }, self.coordinator),
            ])
            .args(["--worker-id", &worker_id(rank)])
            .args(["--local-rank", &(rank % per_node).to_string()]);
        if self.nodes > 1 {
            spec = spec.args(["--node-id", &format!("node-{}", rank / per_node)]);
        }
        if let Some(tls) = &self.tls {
            spec = spec.arg("--tls-ca").arg(&tls.ca);
            if let Some(domain) = &tls.domain {
                spec = spec.args(["--tls-domain", domain]);
            }
        }
        if let Some(token) = &self.token {
            spec = spec.env("FLOTILLA_TOKEN", token);
        }
        spec =
            spec.args(["--threads", &self.threads.to_string()]).arg("--config-base").arg(&self.config_base);
        for root in &self.allowed_roots {
            spec = spec.arg("--allowed-root").arg(root);
        }
        spec = spec.arg("--exit-with-stdin");
        spec.lifeline = true;
        spec.restart = restart;
        spec
    }
}

/// The id `flotilla run` gives its worker `rank`.
fn worker_id(rank: u32) -> String {
    format!("worker-{rank}")
}

/// The local launcher: the worker processes, one per rank, under a [`Supervisor`] that
/// starts them again when they die while the job runs (the coordinator then recovers the
/// job onto them) and kills them when dropped, so that no process outlives the run.
struct Workers {
    supervisor: Supervisor,
    /// Each rank's process.
    ranks: Vec<ProcessId>,
}

/// What the launcher saw happen to its processes.
enum LauncherEvent {
    /// A worker process ended; it will be started again after `after`.
    Exited {
        rank: u32,
        pid: u32,
        how: String,
        after: Duration,
    },
    /// A worker process ended with no restarts left.
    GaveUp {
        rank: u32,
        pid: u32,
        how: String,
    },
    Restarted {
        rank: u32,
        pid: u32,
    },
}

impl Workers {
    /// Starts every rank's worker. Each may be restarted `max_restarts` times (the job's
    /// `recovery.max_restarts`), after `backoff` doubling per restart of the same worker.
    fn spawn(spawn: &WorkerSpawn, max_restarts: u32, backoff: Duration) -> Result<Workers> {
        let restart = RestartPolicy { max_restarts, backoff };
        let mut supervisor = Supervisor::new();
        let ranks = (0..spawn.count)
            .map(|rank| supervisor.start(spawn.spec(rank, restart)))
            .collect::<Result<_, _>>()?;
        Ok(Workers { supervisor, ranks })
    }

    fn alive(&self) -> usize {
        self.supervisor.alive()
    }

    fn rank(&self, id: ProcessId) -> u32 {
        self.ranks.iter().position(|&r| r == id).unwrap_or(id.index()) as u32
    }

    /// Notices exits, and starts again the workers whose backoff has passed.
    fn supervise(&mut self) -> Result<Vec<LauncherEvent>> {
        let events = self.supervisor.poll()?;
        Ok(events
            .into_iter()
            .map(|event| match event {
                ProcessEvent::Exited { id, pid, exit, restart_in } => LauncherEvent::Exited {
                    rank: self.rank(id),
                    pid,
                    how: exit.to_string(),
                    after: restart_in,
                },
                ProcessEvent::GaveUp { id, pid, exit } => {
                    LauncherEvent::GaveUp { rank: self.rank(id), pid, how: exit.to_string() }
                }
                ProcessEvent::Restarted { id, pid } => LauncherEvent::Restarted { rank: self.rank(id), pid },
            })
            .collect())
    }

    /// Kills worker `worker_id`'s process if it still runs: the coordinator declared it
    /// lost (silent, or hung: a stopped process does not exit by itself), so it is replaced.
    fn kill_lost(&mut self, worker_id: &str) -> Option<u32> {
        let rank = (0..self.ranks.len() as u32).find(|&r| self::worker_id(r) == worker_id)?;
        self.supervisor.kill(self.ranks[rank as usize])
    }

    /// Stops every worker: each has `grace` to exit on its own (the coordinator has asked
    /// them to shut down, and their stdin closes now), then it is killed. All are reaped.
    async fn stop(self, grace: Duration) {
        self.supervisor.shutdown(grace).await;
    }
}

pub fn run(args: RunArgs) -> Result<()> {
    let mut overrides = Vec::new();
    if let Some(dir) = &args.init_from {
        overrides.push(("init_from", toml::Value::String(absolute(dir)?.display().to_string())));
    }
    if let Some(size) = args.max_shard_size {
        overrides.push((
            "max_shard_size",
            toml::Value::Integer(i64::try_from(size).context("--max-shard-size is too large")?),
        ));
    }
    let (text, config, model) = read_config_with(&args.config, args.steps, overrides)?;
    if let Some(dir) = &config.init_from
        && args.resume.is_none()
    {
        // Checked here, before any worker starts: the model, and whether the MTP modules
        // come from the checkpoint or from the seed. The workers read the tensors.
        let reader = flotilla_model::checkpoint::HfReader::open(dir)
            .with_context(|| format!("init-from {}", dir.display()))?;
        reader.check_model(&model).with_context(|| format!("init-from {}", dir.display()))?;
        let layers = model.num_hidden_layers;
        let has_mtp = reader.names().any(|n| flotilla_model::checkpoint::mtp_layer(n, layers).is_some());
        let mtp = if model.num_nextn_predict_layers == 0 || has_mtp {
            String::new()
        } else {
            format!(
                "; MTP module (model.layers.{layers}.*) initialized from seed {}: the checkpoint has none",
                config.seed
            )
        };
        println!(
            "init-from {}: {} tensors in {} file(s), each worker loads those its rank holds{mtp}",
            dir.display(),
            reader.names().filter(|n| !n.ends_with("_scale_inv")).count(),
            reader.files().len(),
        );
    }
    anyhow::ensure!(
        args.trace.is_none() || config.parallel.is_some(),
        "--trace records pipeline instructions: the config needs a [parallel] layout"
    );
    let workers = match (args.workers, config.parallel.as_ref().map(ParallelConfig::world_size)) {
        (Some(n), Some(needed)) if u64::from(n) != needed => bail!(
            "--workers {n}: the config's [parallel] layout needs {needed} workers (pipeline ranks × ep × dp)"
        ),
        (Some(n), _) => n,
        (None, Some(needed)) => u32::try_from(needed).unwrap_or(u32::MAX),
        (None, None) => 2,
    };
    anyhow::ensure!(
        (1..=MAX_JOB_WORKERS).contains(&workers),
        "--workers must be between 1 and {MAX_JOB_WORKERS}"
    );
    anyhow::ensure!(
        args.nodes >= 1 && workers.is_multiple_of(args.nodes),
        "--nodes {}: the {workers} workers must split evenly over the nodes",
        args.nodes
    );
    if config.parallel.is_none() {
        anyhow::ensure!(
            config.batch_size.is_multiple_of(workers as usize),
            "--workers {workers}: the config's batch_size {} must divide evenly over the workers",
            config.batch_size
        );
    }
    let out =
        absolute(&args.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(job_name(&args.config))))?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let config_base = absolute(config_dir(&args.config))?;
    let resume_from = match &args.resume {
        None => String::new(),
        Some(which) => resume_source(&out, which)?.display().to_string(),
    };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = (cores / workers as usize).max(1);

    runtime()?.block_on(async {
        // A fresh state directory per run: this coordinator serves this run only.
        let state_dir = out.join("coordinator-state");
        if state_dir.exists() {
            std::fs::remove_dir_all(&state_dir)
                .with_context(|| format!("clearing {}", state_dir.display()))?;
        }
        let security = RunSecurity::of(&args)?;
        let roots = run_roots(&out, &config_base, &config);
        let coordinator_config = CoordinatorConfig {
            tls: security.coordinator_tls.clone(),
            token_file: args.token_file.clone(),
            allowed_roots: roots.clone(),
            ..CoordinatorConfig::new(&state_dir)
        };
        let coordinator = bind_and_serve(coordinator_config).await?;
        let addr = coordinator.local_addr();
        let spawn = WorkerSpawn {
            exe: std::env::current_exe().context("locating the flotilla binary to start workers")?,
            coordinator: addr,
            tls: security.launcher.tls.clone(),
            token: security.worker_token.clone(),
            config_base,
            allowed_roots: roots,
            threads,
            count: workers,
            nodes: args.nodes,
        };
        let backoff = Duration::from_millis(config.recovery.backoff_ms);
        let mut children = Workers::spawn(&spawn, config.recovery.max_restarts, backoff)?;
        let outcome = follow(
            &args,
            workers,
            &text,
            &config,
            &out,
            &resume_from,
            addr,
            &security.launcher,
            &mut children,
        )
        .await;
        if let Err(e) = coordinator.shutdown_workers("the run is over").await {
            tracing::warn!(error = %e, "asking the workers to shut down");
        }
        children.stop(WORKER_EXIT_GRACE).await;
        coordinator.shutdown().await?;
        outcome
    })
}

/// How long workers have to exit after the run before they are killed.
const WORKER_EXIT_GRACE: Duration = Duration::from_secs(5);

/// The checkpoint `--resume` names: the newest committed one under `out/checkpoints` for
/// `latest`, else the directory given.
fn resume_source(out: &Path, which: &str) -> Result<PathBuf> {
    if which != "latest" {
        return absolute(Path::new(which));
    }
    use flotilla_coordinator::checkpoint::{find_committed, verify};
    let committed = find_committed(out)
        .with_context(|| format!("--resume: looking for checkpoints under {}", out.display()))?;
    anyhow::ensure!(
        !committed.is_empty(),
        "--resume: no committed checkpoint under {}",
        out.join("checkpoints").display()
    );
    // Newest first; one whose shards fail their checksums is skipped for the one before.
    for candidate in committed.iter().rev() {
        let dir = &candidate.dir;
        let problems: Vec<String> = match verify(dir) {
            Ok(checks) => {
                checks.into_iter().filter(|c| !c.ok).map(|c| format!("{}: {}", c.file, c.detail)).collect()
            }
            Err(e) => vec![e.to_string()],
        };
        if problems.is_empty() {
            return Ok(dir.clone());
        }
        eprintln!("--resume: skipping the checkpoint {}: {}", dir.display(), problems.join("; "));
    }
    bail!("--resume: none of the {} committed checkpoints under {} verifies", committed.len(), out.display())
}

/// Submits the run and follows its events until it ends or Ctrl-C, supervising the worker
/// processes meanwhile: one that dies is started again after a backoff (the coordinator
/// recovers the job onto it from the last committed checkpoint), one the coordinator
/// declares lost while its process still runs (stopped, hung) is killed and started again.
/// A worker out of restarts cancels the job.
#[allow(clippy::too_many_arguments)]
async fn follow(
    args: &RunArgs,
    worker_count: u32,
    text: &str,
    config: &TrainConfig,
    out: &Path,
    resume_from: &str,
    coordinator: SocketAddr,
    auth: &ClientAuth,
    workers: &mut Workers,
) -> Result<()> {
    let mut client = jobs_client(&coordinator.to_string(), auth).await?;
    let job = client
        .submit_job(SubmitJobRequest {
            name: job_name(&args.config),
            config_toml: text.to_string(),
            workers: worker_count,
            output_dir: out.display().to_string(),
            resume_from: resume_from.to_string(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut events = client
        .watch_job(WatchJobRequest { job_id: job.job_id.clone(), from_revision: 0 })
        .await
        .map_err(status)?
        .into_inner();

    let bar = ProgressBar::new(config.steps).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps · {msg} · ETA {eta}")
            .expect("a valid progress template"),
    );
    bar.set_message(format!("waiting for {worker_count} workers"));
    let started = std::time::Instant::now();
    let mut logs = RunLogs::create(out, config.parallel.is_some())?;
    let mut last_loss = f64::NAN;
    let mut last_bubble = (0.0, 0.0);
    let mut check = tokio::time::interval(Duration::from_millis(200));
    // Why the launcher cancelled the job: a worker out of restarts (unless the job may go
    // on with fewer workers).
    let mut gave_up: Option<String> = None;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let end = loop {
        tokio::select! {
            event = events.message() => {
                let Some(event) = event.map_err(status)? else {
                    // The stream ends when the job does; read its final state.
                    break client.get_job(GetJobRequest { job_id: job.job_id.clone() }).await.map_err(status)?.into_inner();
                };
                logs.event(&event)?;
                match &event.event {
                    Some(Event::Step(s)) => {
                        last_loss = s.loss;
                        last_bubble = (s.bubble_fraction, s.predicted_bubble_fraction);
                        logs.step(s)?;
                        let alive = workers.alive();
                        let bubble = if config.parallel.is_some() { format!(" · bubble {:.0}%", 100.0 * s.bubble_fraction) } else { String::new() };
                        bar.set_message(format!("loss {:.4} · {:.0} tok/s{bubble} · {alive}/{worker_count} workers", s.loss, s.tokens_per_second));
                        bar.set_position(s.step);
                    }
                    Some(Event::WorkerLost(lost)) => {
                        bar.println(describe(&event));
                        if let Some(pid) = workers.kill_lost(&lost.worker_id) {
                            bar.println(format!("killed {} (pid {pid}), which the coordinator declared lost, to start it again", lost.worker_id));
                        }
                    }
                    Some(Event::StateChanged(_) | Event::Recovery(_) | Event::CheckpointCommitted(_)) => bar.println(describe(&event)),
                    _ => {}
                }
            }
            _ = check.tick() => {
                for happened in workers.supervise()? {
                    let (line, cancel) = launcher_decision(happened, config, worker_count);
                    bar.println(line);
                    if let Some(why) = cancel {
                        let request = CancelJobRequest { job_id: job.job_id.clone(), reason: why.clone() };
                        if let Err(e) = client.cancel_job(request).await {
                            tracing::warn!(error = %e.message(), "cancelling the job");
                        }
                        gave_up.get_or_insert(why);
                    }
                }
            }
            _ = &mut ctrl_c => {
                bar.abandon();
                let _ = client.cancel_job(CancelJobRequest { job_id: job.job_id.clone(), reason: "Ctrl-C".into() }).await;
                bail!("cancelled by Ctrl-C");
            }
        }
    };
    bar.finish_and_clear();
    match end.state() {
        JobState::Succeeded => {
            let summary = Finished { elapsed_s: started.elapsed().as_secs_f64(), last_loss, last_bubble };
            print_success(&mut client, args, config, out, worker_count, &end, summary).await
        }
        state => {
            let cause = gave_up.map(|why| format!("{why}; ")).unwrap_or_default();
            bail!("{cause}job {} ended {}: {}", end.job_id, state.name(), end.reason)
        }
    }
}

/// What the launcher does about a worker process's exit or restart: the line it prints,
/// and the reason to cancel the job if it must. A worker with no restarts left ends the
/// job, unless the job is elastic data parallelism (`recovery.min_workers` below its
/// size), which goes on without it.
fn launcher_decision(
    happened: LauncherEvent,
    config: &TrainConfig,
    worker_count: u32,
) -> (String, Option<String>) {
    let min_workers = config.recovery.min_workers;
    let elastic = config.parallel.is_none() && min_workers > 0 && min_workers < worker_count;
    match happened {
        LauncherEvent::Exited { rank, pid, how, after } => {
            (format!("worker {rank} (pid {pid}) exited: {how}; starting it again in {after:?}"), None)
        }
        LauncherEvent::Restarted { rank, pid } => (format!("worker {rank} started again (pid {pid})"), None),
        LauncherEvent::GaveUp { rank, pid, how } if elastic => (
            format!(
                "worker {rank} (pid {pid}) exited: {how}, with no restarts left; the job goes on without it \
                 (down to recovery.min_workers = {min_workers}) once recovery.replace_timeout_s passes"
            ),
            None,
        ),
        LauncherEvent::GaveUp { rank, pid, how } => {
            let why = format!(
                "worker {rank} (pid {pid}) exited: {how}, with no restarts left (recovery.max_restarts = {})",
                config.recovery.max_restarts
            );
            (format!("{why}; cancelling the job"), Some(why))
        }
    }
}

/// The files a run writes from its event stream, for scripts (the coordinator lives only as
/// long as the run): `events.jsonl`, every job event as one JSON line (`flotilla watch
/// --json`'s format), and for pipeline jobs `pipeline.jsonl`, each step's summary as the
/// coordinator measured it (the bench scripts read it). Each line is flushed as written.
struct RunLogs {
    events_path: PathBuf,
    events: std::io::BufWriter<std::fs::File>,
    pipeline: Option<std::io::BufWriter<std::fs::File>>,
}

impl RunLogs {
    fn create(out: &Path, pipeline: bool) -> Result<Self> {
        let create = |path: PathBuf| -> Result<std::io::BufWriter<std::fs::File>> {
            let file =
                std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            Ok(std::io::BufWriter::new(file))
        };
        let pipeline = if pipeline { Some(create(out.join("pipeline.jsonl"))?) } else { None };
        let events_path = out.join("events.jsonl");
        Ok(RunLogs { events: create(events_path.clone())?, events_path, pipeline })
    }

    fn event(&mut self, event: &JobEvent) -> Result<()> {
        use std::io::Write;
        writeln!(self.events, "{}", event_json(event))
            .and_then(|()| self.events.flush())
            .with_context(|| format!("writing {}", self.events_path.display()))
    }

    fn step(&mut self, summary: &flotilla_proto::v1::StepSummary) -> Result<()> {
        use std::io::Write;
        match self.pipeline.as_mut() {
            Some(log) => writeln!(log, "{}", pipeline_json(summary))
                .and_then(|()| log.flush())
                .context("writing pipeline.jsonl"),
            None => Ok(()),
        }
    }
}

/// The figures of a finished run that only its event stream told.
struct Finished {
    elapsed_s: f64,
    last_loss: f64,
    /// The last step's bubble fraction: measured, and simulated for the measured costs.
    last_bubble: (f64, f64),
}

/// What a run that succeeded prints: its steps and loss, recoveries, last checkpoint,
/// bubble, where its metrics and weights are, and its trace when `--trace` asked for one.
async fn print_success(
    client: &mut JobsClient,
    args: &RunArgs,
    config: &TrainConfig,
    out: &Path,
    worker_count: u32,
    end: &Job,
    summary: Finished,
) -> Result<()> {
    let Finished { elapsed_s: elapsed, last_loss, last_bubble } = summary;
    println!(
        "trained {} steps on {worker_count} workers in {elapsed:.1} s; final loss {last_loss:.4}",
        end.steps_done
    );
    if end.restarts > 0 {
        println!("recovered from {} failure(s) on the way", end.restarts);
    }
    if end.checkpoint_step > 0 {
        println!("last checkpoint: step {} ({})", end.checkpoint_step, end.checkpoint_dir);
    }
    if config.parallel.is_some() {
        println!(
            "pipeline bubble at the last step: {:.1}% measured, {:.1}% simulated for the measured costs",
            100.0 * last_bubble.0,
            100.0 * last_bubble.1
        );
    }
    println!("metrics: {}", out.join("metrics.jsonl").display());
    println!("weights: {}", out.display());
    if let Some(path) = &args.trace {
        let timeline = client
            .get_step_timeline(GetStepTimelineRequest { job_id: end.job_id.clone(), step: end.steps_done })
            .await
            .map_err(status)?
            .into_inner();
        let trace = executed_chrome_trace(&timeline);
        std::fs::write(path, serde_json::to_vec(&trace)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("trace of step {}: {}", end.steps_done, path.display());
    }
    Ok(())
}

/// One pipeline step's summary as the coordinator measured it: a line of pipeline.jsonl.
fn pipeline_json(s: &flotilla_proto::v1::StepSummary) -> serde_json::Value {
    serde_json::json!({
        "step": s.step,
        "step_seconds": if s.tokens_per_second > 0.0 { s.tokens as f64 / s.tokens_per_second } else { 0.0 },
        "bubble_fraction": s.bubble_fraction,
        "predicted_bubble_fraction": s.predicted_bubble_fraction,
        "exchange_bytes": s.exchange_bytes,
        "cross_node_bytes": s.cross_node_bytes,
        "cross_node_bytes_flat": s.cross_node_bytes_flat,
        "exchange_seconds": s.exchange_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(recovery: &str) -> TrainConfig {
        let text = format!("{}\n{recovery}", include_str!("../examples/tiny.toml"));
        TrainConfig::from_toml(&text, Path::new(".")).expect("a valid config").0
    }

    #[test]
    fn retain_age_takes_a_number_and_a_unit() {
        assert_eq!(parse_age("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_age("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_age("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(604_800)));
        for bad in ["", "7", "d", "1.5h", "-1s", "0s", "3w", "99999999999999999999d"] {
            assert!(parse_age(bad).is_err(), "{bad}");
        }
    }

    fn gave_up() -> LauncherEvent {
        LauncherEvent::GaveUp { rank: 1, pid: 4242, how: "killed by signal 9".into() }
    }

    #[test]
    fn a_worker_out_of_restarts_cancels_the_job_naming_it_unless_the_job_is_elastic() {
        let strict = config("[recovery]\nmax_restarts = 2\n");
        let (line, cancel) = launcher_decision(gave_up(), &strict, 2);
        let why = cancel.expect("a job that needs every worker is cancelled");
        assert!(why.contains("worker 1 (pid 4242)") && why.contains("recovery.max_restarts = 2"), "{why}");
        assert!(line.ends_with("; cancelling the job"), "{line}");

        let elastic = config("[recovery]\nmax_restarts = 2\nmin_workers = 1\n");
        let (line, cancel) = launcher_decision(gave_up(), &elastic, 2);
        assert_eq!(cancel, None, "elastic data parallelism goes on without the worker");
        assert!(line.contains("recovery.min_workers = 1"), "{line}");
        // min_workers equal to the job's size leaves no room to shrink.
        assert!(launcher_decision(gave_up(), &elastic, 1).1.is_some());

        let exited = LauncherEvent::Exited {
            rank: 0,
            pid: 7,
            how: "exit status 1".into(),
            after: Duration::from_millis(500),
        };
        let (line, cancel) = launcher_decision(exited, &strict, 2);
        assert_eq!(cancel, None);
        assert!(line.contains("starting it again in 500ms"), "{line}");
    }
}
