//! Job retention: finished jobs (Succeeded, Failed, Cancelled) are kept by a policy, the
//! newest [`JobRetention::max_jobs`] and those younger than [`JobRetention::max_age`], and
//! the others are deleted from the store, their record and every event, in one transaction
//! each. The history compactor (`history`) then compacts the deletions out, so the store's
//! keys, memory and log stay bounded however many jobs a coordinator runs. A job's run and
//! checkpoint directories on disk are the operator's and are never touched.
//!
//! Invariants: a job that has not ended is never removed; the order is deterministic: jobs
//! are ranked by the revision of their last write (the one that ended them), so two
//! coordinators on one store, or one before and after a restart, agree on which go; a
//! deletion is conditional on that revision, so a record that changed meanwhile stays.

use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::error::ServiceError;
use super::records::{JobRecord, events_prefix, job_key, list_jobs, unix_ms};
use crate::store::{Compare, CompareOp, Op, Revision, StateStore, StoreError, Txn};

/// Which finished jobs the store keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRetention {
    /// Keep at most this many finished jobs (the most recently ended); `None`: all.
    pub max_jobs: Option<usize>,
    /// Remove finished jobs that ended this long ago; `None`: never by age.
    pub max_age: Option<Duration>,
}

impl Default for JobRetention {
    /// The newest 10,000 finished jobs, whatever their age.
    fn default() -> Self {
        JobRetention { max_jobs: Some(10_000), max_age: None }
    }
}

impl JobRetention {
    /// Checks the policy; the error names the setting.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.max_age.is_some_and(|age| age.is_zero()) {
            return Err((
                "retention.max_age".into(),
                "must be positive (leave it unset to keep jobs of any age)".into(),
            ));
        }
        Ok(())
    }

    fn enabled(&self) -> bool {
        self.max_jobs.is_some() || self.max_age.is_some()
    }
}

/// The finished jobs `policy` removes from `jobs` at `now_ms` (Unix milliseconds), by id
/// with the revision each was read at, least recently ended first.
pub(crate) fn expired(
    jobs: &[(JobRecord, Revision)],
    policy: &JobRetention,
    now_ms: u64,
) -> Vec<(String, Revision)> {
    let mut finished: Vec<&(JobRecord, Revision)> =
        jobs.iter().filter(|(record, _)| record.state.is_terminal()).collect();
    finished.sort_by_key(|(_, revision)| *revision);
    let over = policy.max_jobs.map_or(0, |keep| finished.len().saturating_sub(keep));
    let age_ms = policy.max_age.map(|age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
    finished
        .into_iter()
        .enumerate()
        .filter(|(i, (record, _))| {
            *i < over || age_ms.is_some_and(|age| record.updated_unix_ms.saturating_add(age) <= now_ms)
        })
        .map(|(_, (record, revision))| (record.id.clone(), *revision))
        .collect()
}

/// Deletes the finished jobs `policy` does not keep at `now_ms`; returns their ids.
pub(crate) async fn prune<S: StateStore>(
    store: &S,
    policy: &JobRetention,
    now_ms: u64,
) -> Result<Vec<String>, ServiceError> {
    let jobs = list_jobs(store).await?;
    let mut removed = Vec::new();
    for (job_id, revision) in expired(&jobs, policy, now_ms) {
        let key = job_key(&job_id);
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, revision)])
            .and_then([Op::delete(key), Op::delete_prefix(events_prefix(&job_id))]);
        if store.txn(txn).await?.succeeded {
            removed.push(job_id);
        }
    }
    Ok(removed)
}

/// Every `interval`, removes the finished jobs `policy` does not keep.
pub(crate) async fn retainer<S: StateStore>(
    store: S,
    policy: JobRetention,
    interval: Duration,
    cancel: CancellationToken,
) {
    if !policy.enabled() {
        return;
    }
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match prune(&store, &policy, unix_ms()).await {
            Ok(removed) if removed.is_empty() => {}
            Ok(removed) => {
                tracing::info!(jobs = removed.len(), first = %removed[0], "finished jobs removed by the retention policy")
            }
            Err(ServiceError::Store(StoreError::Closed)) => return,
            Err(e) => tracing::warn!(error = %e, "job retention"),
        }
    }
}

#[cfg(test)]
mod tests {
    use flotilla_proto::v1::JobState;

    use super::*;

    fn job(id: &str, state: JobState, updated_unix_ms: u64) -> JobRecord {
        JobRecord {
            id: id.into(),
            name: String::new(),
            state,
            reason: String::new(),
            config_toml: String::new(),
            workers: 1,
            steps_done: 0,
            total_steps: 1,
            created_unix_ms: 0,
            updated_unix_ms,
            last_loss: 0.0,
            output_dir: String::new(),
            next_event: 0,
            resume_from: String::new(),
            checkpoint_step: 0,
            checkpoint_dir: String::new(),
            restarts: 0,
        }
    }

    fn jobs() -> Vec<(JobRecord, Revision)> {
        vec![
            (job("c", JobState::Succeeded, 3_000), 30),
            (job("running", JobState::Running, 0), 5),
            (job("a", JobState::Failed, 1_000), 10),
            (job("pending", JobState::Pending, 0), 1),
            (job("b", JobState::Cancelled, 2_000), 20),
        ]
    }

    fn ids(expired: Vec<(String, Revision)>) -> Vec<String> {
        expired.into_iter().map(|(id, _)| id).collect()
    }

    #[test]
    fn keeps_the_newest_finished_jobs_and_every_unfinished_one() {
        let keep = |n| JobRetention { max_jobs: Some(n), max_age: None };
        assert_eq!(ids(expired(&jobs(), &keep(1), 0)), ["a", "b"]);
        assert_eq!(ids(expired(&jobs(), &keep(0), 0)), ["a", "b", "c"]);
        assert!(expired(&jobs(), &keep(3), 0).is_empty());
        assert!(expired(&jobs(), &JobRetention { max_jobs: None, max_age: None }, u64::MAX).is_empty());
    }

    #[test]
    fn removes_finished_jobs_by_age() {
        let policy = JobRetention { max_jobs: None, max_age: Some(Duration::from_secs(1)) };
        assert_eq!(ids(expired(&jobs(), &policy, 2_500)), ["a"]);
        assert_eq!(ids(expired(&jobs(), &policy, 3_000)), ["a", "b"]);
        assert_eq!(ids(expired(&jobs(), &policy, u64::MAX)), ["a", "b", "c"]);
        // Both: whichever removes more.
        let both = JobRetention { max_jobs: Some(2), max_age: Some(Duration::from_secs(1)) };
        assert_eq!(ids(expired(&jobs(), &both, 2_500)), ["a"]);
        assert_eq!(ids(expired(&jobs(), &both, 3_500)), ["a", "b"]);
    }

    #[test]
    fn a_zero_age_is_refused() {
        let policy = JobRetention { max_jobs: None, max_age: Some(Duration::ZERO) };
        assert_eq!(policy.validate().unwrap_err().0, "retention.max_age");
        JobRetention::default().validate().unwrap();
    }
}
