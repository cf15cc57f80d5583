//! The coordinator's settings and the validation of submitted jobs.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use flotilla_proto::v1::SubmitJobRequest;

use super::ServiceError;

/// How a coordinator runs.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// Where [`bind_and_serve`](super::bind_and_serve) listens; loopback by default.
    pub listen: SocketAddr,
    /// The file store's directory: jobs and their events live here across restarts.
    pub state_dir: PathBuf,
    /// How often workers heartbeat (told to them at registration).
    pub heartbeat_interval: Duration,
    /// A worker not heard from for this long is lost; also the time a registered worker
    /// has to open its session, and a session to send its `SessionOpen`.
    pub heartbeat_timeout: Duration,
    /// Allows listening on a non-loopback address. Off by default: the control plane has
    /// no authentication yet, so exposing it must be a decision.
    pub allow_remote: bool,
    /// The largest gRPC message decoded or encoded, in bytes; larger ones fail with
    /// `OUT_OF_RANGE` (tonic's code for it) and the coordinator carries on.
    pub max_message_bytes: usize,
    /// How many revisions of history the store keeps for resuming watches; older history
    /// is compacted every `compaction_interval` (0 keeps it all). A watcher further behind
    /// gets `OUT_OF_RANGE` and re-reads the job.
    pub history_retention: u64,
    pub compaction_interval: Duration,
}

impl CoordinatorConfig {
    /// The defaults with the given state directory.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        CoordinatorConfig { state_dir: state_dir.into(), ..CoordinatorConfig::default() }
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
            state_dir: PathBuf::from("flotilla-state"),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            allow_remote: false,
            max_message_bytes: 16 << 20,
            history_retention: 100_000,
            compaction_interval: Duration::from_secs(60),
        }
    }
}

/// The largest job configuration accepted, in bytes. It travels inside every worker's
/// assignment, so it must stay well below the message limit.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// The most workers one job may ask for.
pub const MAX_JOB_WORKERS: u32 = 1 << 16;

/// The longest job name and output directory accepted.
const MAX_NAME_BYTES: usize = 256;
const MAX_PATH_BYTES: usize = 4096;

/// A job as submitted, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSpec {
    pub name: String,
    pub config_toml: String,
    pub workers: u32,
    pub output_dir: String,
    /// The config's `steps`.
    pub steps: u64,
}

/// Validates a submit request: the worker count, the sizes of the strings, and the config,
/// which must parse as TOML and have `steps` > 0 and a `batch_size` that the data-parallel
/// workers split evenly. The error names the field (`workers`, `steps`, `batch_size`, …).
///
/// The model's full configuration is checked by the workers when they build the trainer;
/// this is what the coordinator itself needs to plan the job.
pub fn validate_submit(request: &SubmitJobRequest) -> Result<JobSpec, ServiceError> {
    let bad =
        |field: &str, reason: String| Err(ServiceError::InvalidArgument { field: field.into(), reason });
    if request.workers == 0 {
        return bad("workers", "must be at least 1".into());
    }
    if request.workers > MAX_JOB_WORKERS {
        return bad("workers", format!("{} is above the limit of {MAX_JOB_WORKERS}", request.workers));
    }
    if request.name.len() > MAX_NAME_BYTES {
        return bad("name", format!("{} bytes is above the limit of {MAX_NAME_BYTES}", request.name.len()));
    }
    if request.output_dir.len() > MAX_PATH_BYTES {
        return bad(
            "output_dir",
            format!("{} bytes is above the limit of {MAX_PATH_BYTES}", request.output_dir.len()),
        );
    }
    if request.config_toml.len() > MAX_CONFIG_BYTES {
        return bad(
            "config_toml",
            format!("{} bytes is above the limit of {MAX_CONFIG_BYTES}", request.config_toml.len()),
        );
    }
    let table: toml::Table = match request.config_toml.parse() {
        Ok(table) => table,
        Err(e) => return bad("config_toml", format!("not valid TOML: {}", e.to_string().trim_end())),
    };
    let positive = |field: &str| -> Result<u64, ServiceError> {
        match table.get(field) {
            None => Err(ServiceError::InvalidArgument { field: field.into(), reason: "is missing".into() }),
            Some(toml::Value::Integer(n)) if *n > 0 => Ok(*n as u64),
            Some(toml::Value::Integer(n)) => Err(ServiceError::InvalidArgument {
                field: field.into(),
                reason: format!("must be at least 1, got {n}"),
            }),
            Some(other) => Err(ServiceError::InvalidArgument {
                field: field.into(),
                reason: format!("must be a positive integer, got a {}", other.type_str()),
            }),
        }
    };
    let steps = positive("steps")?;
    let batch_size = positive("batch_size")?;
    if !batch_size.is_multiple_of(u64::from(request.workers)) {
        return bad(
            "batch_size",
            format!("{batch_size} cannot be split evenly over {} data-parallel workers", request.workers),
        );
    }
    Ok(JobSpec {
        name: request.name.clone(),
        config_toml: request.config_toml.clone(),
        workers: request.workers,
        output_dir: request.output_dir.clone(),
        steps,
    })
}
