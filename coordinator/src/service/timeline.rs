//! The executed timelines of pipeline jobs, for `GetStepTimeline`.
//!
//! A pipeline job's actor keeps, per step, what each rank reported it executed (the
//! instructions and their spans). It keeps the last [`TIMELINE_STEPS`] steps, and fewer
//! when they hold more than [`TIMELINE_OPS`] instructions in all (the newest step is kept
//! whatever its size): a kept instruction takes about 48 bytes, so a job's timelines stay
//! under about 50 MB. When the job ends, its timelines go to the cluster actor, which keeps
//! those of the last [`ENDED_JOBS`] ended pipeline jobs, within [`ENDED_OPS`] instructions
//! in all (oldest jobs dropped first), so a failed job can still be inspected. Timelines
//! are memory only: a coordinator restart forgets them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use flotilla_proto::v1::{ExecutedOp, Layout, RankTimeline, StepTimeline};

use super::error::ServiceError;
use crate::placement::Coordinates;

/// Steps of one job kept.
pub(crate) const TIMELINE_STEPS: usize = 64;
/// Executed instructions of one job kept, over all its kept steps.
pub(crate) const TIMELINE_OPS: usize = 1 << 20;
/// Ended pipeline jobs whose timelines the cluster actor keeps.
pub(crate) const ENDED_JOBS: usize = 8;
/// Executed instructions kept for ended jobs, over all of them.
pub(crate) const ENDED_OPS: usize = 1 << 21;

/// A world rank of the job.
#[derive(Clone, Debug)]
pub(crate) struct RankInfo {
    pub worker_id: String,
    pub coordinates: Coordinates,
}

#[derive(Clone, Debug)]
struct RankStep {
    ops: Vec<ExecutedOp>,
    bubble_fraction: f64,
}

/// One job's kept timelines.
#[derive(Clone, Debug)]
pub(crate) struct JobTimelines {
    job_id: String,
    layout: Layout,
    ranks: Vec<RankInfo>,
    /// By step, then by world rank.
    steps: BTreeMap<u64, Vec<Option<RankStep>>>,
    ops: usize,
}

impl JobTimelines {
    pub fn new(job_id: String, layout: Layout, ranks: Vec<RankInfo>) -> Self {
        JobTimelines { job_id, layout, ranks, steps: BTreeMap::new(), ops: 0 }
    }

    /// Keeps what `rank` executed in `step`; a rank's first report of a step is the one
    /// kept. A step older than every kept one, once the window is full, is not kept.
    pub fn record(&mut self, step: u64, rank: usize, ops: Vec<ExecutedOp>, bubble_fraction: f64) {
        if rank >= self.ranks.len() {
            return;
        }
        if !self.steps.contains_key(&step)
            && self.steps.len() >= TIMELINE_STEPS
            && self.steps.first_key_value().is_some_and(|(&oldest, _)| step < oldest)
        {
            return;
        }
        let n = self.ranks.len();
        let slots = self.steps.entry(step).or_insert_with(|| vec![None; n]);
        if slots[rank].is_some() {
            return;
        }
        self.ops += ops.len();
        slots[rank] = Some(RankStep { ops, bubble_fraction });
        self.trim(TIMELINE_STEPS, TIMELINE_OPS);
    }

    /// Drops the oldest steps until at most `steps` steps and `ops` instructions are kept,
    /// except the newest step, which stays.
    pub fn trim(&mut self, steps: usize, ops: usize) {
        while self.steps.len() > 1 && (self.steps.len() > steps || self.ops > ops) {
            if let Some((_, slots)) = self.steps.pop_first() {
                self.ops -= slots.iter().flatten().map(|r| r.ops.len()).sum::<usize>();
            }
        }
        if steps == 0 {
            self.steps.clear();
            self.ops = 0;
        }
    }

    /// Executed instructions kept.
    pub fn op_count(&self) -> usize {
        self.ops
    }

    /// `step` as the ranks executed it; a rank that has not reported it has no ops.
    /// `NOT_FOUND` names the step and the steps kept.
    pub fn step(&self, step: u64) -> Result<StepTimeline, ServiceError> {
        let Some(slots) = self.steps.get(&step) else {
            let kept = match (self.steps.first_key_value(), self.steps.last_key_value()) {
                (Some((first, _)), Some((last, _))) => format!("steps {first} to {last} are kept"),
                _ => "no step is kept (none was reported yet, or the job's timelines were dropped)".into(),
            };
            return Err(ServiceError::NotFound(format!(
                "job {} has no timeline of step {step}: {kept}",
                self.job_id
            )));
        };
        let ranks = self
            .ranks
            .iter()
            .zip(slots)
            .enumerate()
            .map(|(g, (info, slot))| RankTimeline {
                // At most the world size, a u32.
                rank: g as u32,
                worker_id: info.worker_id.clone(),
                pipeline_rank: info.coordinates.pipeline_rank,
                ep_rank: info.coordinates.ep_rank,
                dp_replica: info.coordinates.dp_replica,
                ops: slot.as_ref().map(|s| s.ops.clone()).unwrap_or_default(),
                bubble_fraction: slot.as_ref().map_or(0.0, |s| s.bubble_fraction),
            })
            .collect();
        Ok(StepTimeline { job_id: self.job_id.clone(), step, ranks, layout: Some(self.layout) })
    }
}

/// The timelines of recently ended pipeline jobs, held by the cluster actor.
#[derive(Default)]
pub(crate) struct EndedTimelines {
    jobs: VecDeque<Arc<JobTimelines>>,
    ops: usize,
}

impl EndedTimelines {
    /// Keeps `timelines`, dropping the oldest jobs beyond the limits (and, if it alone is
    /// over the instruction limit, its own oldest steps).
    pub fn keep(&mut self, mut timelines: JobTimelines) {
        timelines.trim(TIMELINE_STEPS, ENDED_OPS);
        self.jobs.retain(|t| t.job_id != timelines.job_id);
        self.ops = self.jobs.iter().map(|t| t.op_count()).sum();
        self.ops += timelines.op_count();
        self.jobs.push_back(Arc::new(timelines));
        while self.jobs.len() > 1 && (self.jobs.len() > ENDED_JOBS || self.ops > ENDED_OPS) {
            if let Some(dropped) = self.jobs.pop_front() {
                self.ops -= dropped.op_count();
            }
        }
    }

    pub fn get(&self, job_id: &str) -> Option<Arc<JobTimelines>> {
        self.jobs.iter().find(|t| t.job_id == job_id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timelines(job_id: &str, ranks: usize) -> JobTimelines {
        let info = (0..ranks)
            .map(|g| RankInfo {
                worker_id: format!("w-{g}"),
                coordinates: Coordinates { pipeline_rank: g as u32, ep_rank: 0, dp_replica: 0 },
            })
            .collect();
        JobTimelines::new(job_id.into(), Layout::default(), info)
    }

    fn ops(n: usize) -> Vec<ExecutedOp> {
        vec![ExecutedOp::default(); n]
    }

    #[test]
    fn keeps_the_last_steps_within_the_limits() {
        let mut t = timelines("job-1", 2);
        for step in 1..=100 {
            t.record(step, 0, ops(3), 0.1);
            t.record(step, 1, ops(3), 0.2);
        }
        assert_eq!(t.steps.len(), TIMELINE_STEPS);
        assert_eq!(t.op_count(), TIMELINE_STEPS * 6);
        let step = t.step(100).unwrap();
        assert_eq!(step.ranks.len(), 2);
        assert_eq!(step.ranks[1].worker_id, "w-1");
        assert_eq!(step.ranks[1].ops.len(), 3);
        let err = t.step(3).unwrap_err();
        assert!(
            matches!(&err, ServiceError::NotFound(m) if m.contains("job-1") && m.contains("step 3") && m.contains("steps 37 to 100")),
            "{err}"
        );
        // Too old once the window is full; a rank's first report wins.
        t.record(2, 0, ops(1), 0.0);
        assert!(t.step(2).is_err());
        t.record(100, 0, ops(9), 0.0);
        assert_eq!(t.step(100).unwrap().ranks[0].ops.len(), 3);
    }

    #[test]
    fn a_step_alone_over_the_op_limit_is_still_kept() {
        let mut t = timelines("job-1", 1);
        t.record(1, 0, ops(10), 0.0);
        t.record(2, 0, ops(TIMELINE_OPS + 1), 0.0);
        assert!(t.step(1).is_err());
        assert_eq!(t.step(2).unwrap().ranks[0].ops.len(), TIMELINE_OPS + 1);
        // A partial step: the missing rank has no ops.
        let mut t = timelines("job-2", 2);
        t.record(5, 1, ops(2), 0.0);
        let step = t.step(5).unwrap();
        assert!(step.ranks[0].ops.is_empty() && step.ranks[1].ops.len() == 2);
    }

    #[test]
    fn ended_jobs_are_kept_oldest_out_first() {
        let mut ended = EndedTimelines::default();
        for j in 0..ENDED_JOBS + 2 {
            let mut t = timelines(&format!("job-{j}"), 1);
            t.record(1, 0, ops(1), 0.0);
            ended.keep(t);
        }
        assert!(ended.get("job-0").is_none() && ended.get("job-1").is_none());
        assert!(ended.get(&format!("job-{}", ENDED_JOBS + 1)).is_some());
        assert_eq!(ended.ops, ENDED_JOBS);
    }
}
