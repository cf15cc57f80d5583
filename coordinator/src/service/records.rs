//! How jobs and their events are laid out in the [`StateStore`].
//!
//! - `jobs/<id>`: the job's record, JSON (readable with any etcd or file-store tool). Its
//!   `mod_revision` is the job's revision: every event rewrites it in the same transaction.
//! - `events/<id>/<seq>`: the job's events, `seq` counting from 0, zero-padded so that key
//!   order is event order; the value is an encoded `JobEvent` whose `revision` is left 0,
//!   since the write's revision is only known after it: readers take it from the store.

use flotilla_proto::v1::{Job, JobEvent, JobState};
use prost::Message;
use serde::{Deserialize, Serialize};

use super::error::ServiceError;
use crate::store::{Revision, StateStore, WatchEvent};

/// The prefix of every job record.
pub(crate) const JOBS_PREFIX: &str = "jobs/";

pub(crate) fn job_key(job_id: &str) -> String {
    format!("{JOBS_PREFIX}{job_id}")
}

/// The prefix of a job's events; the trailing slash keeps `job-1` from matching `job-10`.
pub(crate) fn events_prefix(job_id: &str) -> String {
    format!("events/{job_id}/")
}

pub(crate) fn event_key(job_id: &str, seq: u64) -> String {
    format!("events/{job_id}/{seq:020}")
}

/// Whether `id` can name a job or worker: 1 to 128 characters out of `[A-Za-z0-9._:-]`, so
/// ids are safe inside store keys, paths and logs.
pub(crate) fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A job as stored: the public `Job` less its revision (the key's `mod_revision`), plus
/// the number of events written so far.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct JobRecord {
    pub id: String,
    pub name: String,
    #[serde(with = "state_name")]
    pub state: JobState,
    pub reason: String,
    pub config_toml: String,
    pub workers: u32,
    pub steps_done: u64,
    pub total_steps: u64,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    #[serde(with = "lossy_f64")]
    pub last_loss: f64,
    pub output_dir: String,
    /// The `seq` of the next event.
    pub next_event: u64,
    /// The committed checkpoint the job was submitted to start from (empty: none).
    #[serde(default)]
    pub resume_from: String,
    /// The newest committed checkpoint of this job: its step (0: none) and directory.
    #[serde(default)]
    pub checkpoint_step: u64,
    #[serde(default)]
    pub checkpoint_dir: String,
    /// Recoveries so far.
    #[serde(default)]
    pub restarts: u32,
}

impl JobRecord {
    pub fn to_proto(&self, revision: Revision) -> Job {
        Job {
            job_id: self.id.clone(),
            name: self.name.clone(),
            state: self.state as i32,
            reason: self.reason.clone(),
            config_toml: self.config_toml.clone(),
            workers: self.workers,
            steps_done: self.steps_done,
            total_steps: self.total_steps,
            created_unix_ms: self.created_unix_ms,
            updated_unix_ms: self.updated_unix_ms,
            revision,
            last_loss: self.last_loss,
            output_dir: self.output_dir.clone(),
            checkpoint_step: self.checkpoint_step,
            checkpoint_dir: self.checkpoint_dir.clone(),
            restarts: self.restarts,
        }
    }

    /// Names this run's checkpoints apart from other runs' in the same output directory
    /// (job ids repeat across coordinators with fresh state).
    pub fn run_id(&self) -> String {
        format!("{}-{}", self.id, self.created_unix_ms)
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain strings and numbers cannot fail; a NaN loss becomes `null`
        // and decodes as NaN again through `lossy_f64`.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(key: &str, bytes: &[u8]) -> Result<JobRecord, ServiceError> {
        serde_json::from_slice(bytes)
            .map_err(|e| ServiceError::CorruptRecord { key: key.to_string(), reason: e.to_string() })
    }
}

/// Stores a [`JobState`] by its proto name (`JOB_STATE_RUNNING`), readable and stable.
mod state_name {
    use flotilla_proto::v1::JobState;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(state: &JobState, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(state.as_str_name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<JobState, D::Error> {
        let name = String::deserialize(deserializer)?;
        JobState::from_str_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown job state {name:?}")))
    }
}

/// JSON has no NaN: serde_json writes a non-finite float as `null`; read it back as NaN
/// (a diverged loss is a fact worth keeping, not a corrupt record).
mod lossy_f64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(*value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
    }
}

/// Encodes an event for `events/<id>/<seq>` (its revision is the write's).
pub(crate) fn encode_event(event: &JobEvent) -> Vec<u8> {
    event.encode_to_vec()
}

/// Decodes an event from a watch, with the write's revision.
pub(crate) fn decode_event(event: &WatchEvent) -> Result<JobEvent, ServiceError> {
    let mut decoded = JobEvent::decode(event.kv.value.as_slice())
        .map_err(|e| ServiceError::CorruptRecord { key: event.kv.key.clone(), reason: e.to_string() })?;
    decoded.revision = event.revision;
    Ok(decoded)
}

/// The job's record and revision, if it exists.
pub(crate) async fn read_job<S: StateStore>(
    store: &S,
    job_id: &str,
) -> Result<Option<(JobRecord, Revision)>, ServiceError> {
    let key = job_key(job_id);
    match store.get(&key).await? {
        None => Ok(None),
        Some(kv) => Ok(Some((JobRecord::decode(&key, &kv.value)?, kv.mod_revision))),
    }
}

/// Every job's record and revision, oldest first.
pub(crate) async fn list_jobs<S: StateStore>(store: &S) -> Result<Vec<(JobRecord, Revision)>, ServiceError> {
    let mut jobs = Vec::new();
    for kv in store.range(JOBS_PREFIX).await? {
        jobs.push((JobRecord::decode(&kv.key, &kv.value)?, kv.mod_revision));
    }
    // Ids are zero-padded, but a long-lived coordinator outgrows the padding: order by
    // creation, then id.
    jobs.sort_by(|(a, _), (b, _)| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
    Ok(jobs)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
