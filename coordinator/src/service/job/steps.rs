//! Steps: the ranks' step reports, one summary per step once every rank reported it, and
//! the job's end when every rank has finished.
//!
//! Every step report of a pipeline job must list exactly its rank's compiled stream as
//! executed, op by op (kind, chunks, peer); the first difference, a missing tail or extra
//! ops fail the job with a reason naming the world rank, the worker, the step, the
//! instruction and both ops. What each rank executed is kept for `GetStepTimeline`
//! (`crate::service::timeline`), and each step's summary carries the bubble measured from
//! the reported spans. A data-parallel job ignores `executed`.
//!
//! Steps are numbered from 1, as the trainer and `metrics.jsonl` number them: a job of
//! `steps = S` runs steps 1..=S, and `steps_done = s` means steps 1..=s are summarized.
//!
//! Invariants: every step is published once on `WatchJob` (a step redone after a recovery
//! is only compared with its first run's loss); a step is summarized only when every rank
//! of the attempt reported it, in step order; a rank may run at most `MAX_STEPS_AHEAD`
//! steps ahead of the oldest step not every rank reported.

use std::collections::BTreeMap;

use flotilla_proto::v1::{JobFinished, JobState, StepReport, StepSummary, job_event};
use tokio::time::Instant;

use super::JobActor;
use crate::schedule::{RankSpan, bubble_fraction, predicted_bubble_fraction, rank_span};
use crate::service::error::ServiceError;
use crate::service::records::JobRecord;
use crate::store::StateStore;

/// How many steps a rank may report ahead of the oldest step not every rank reported.
/// Data-parallel ranks move in lockstep (they all-reduce every step), so honest workers
/// are at most a step apart; this only bounds what a misbehaving worker can make the
/// coordinator buffer.
const MAX_STEPS_AHEAD: u64 = 1024;

impl<S: StateStore + Clone + 'static> JobActor<S> {
    /// Takes a rank's report of a step. A pipeline job's rank must have executed exactly
    /// its compiled stream (op by op: kind, chunks, peer); any difference fails the job.
    /// What it executed is kept for `GetStepTimeline`, a deviating stream included.
    pub(super) async fn on_step(&mut self, rank: usize, mut report: StepReport) -> Result<(), ServiceError> {
        if self.record.state != JobState::Running || !self.is_ours(&report.job_id, false) {
            return Ok(());
        }
        let step = report.step;
        // Taken out of every report: a data-parallel job ignores it, a pipeline job keeps it
        // in its timelines rather than in the pending reports.
        let executed = std::mem::take(&mut report.executed);
        let (deviation, span) = match &self.placement {
            Ok(Some(placement)) => {
                (placement.check_executed(rank as u32, &executed).err(), rank_span(&executed))
            }
            _ => (None, None),
        };
        let reported_bubble = report.bubble_fraction;
        if let Err(violation) = self.steps.accept(rank, report, span) {
            let worker = &self.crew[rank].worker_id;
            return self.fail(format!("worker {worker} sent an invalid step report: {violation}")).await;
        }
        self.env.metrics.rank_step(&self.record.id, rank as u32, step);
        if let Some(timelines) = &mut self.timelines {
            timelines.record(step, rank, executed, reported_bubble);
        }
        if let Some(deviation) = deviation {
            let worker = &self.crew[rank].worker_id;
            let reason = format!("rank {rank} (worker {worker}) step {step}: {deviation}");
            tracing::error!(job = %self.record.id, %reason, "pipeline stream deviation");
            return self.fail(reason).await;
        }
        while let Some(mut summary) = self.steps.pop() {
            if let (Ok(Some(placement)), Some(timelines)) = (&self.placement, &self.timelines)
                && let Ok(timeline) = timelines.step(summary.step)
            {
                summary.predicted_bubble_fraction =
                    predicted_bubble_fraction(placement.schedule(), &timeline).unwrap_or(0.0);
            }
            let step = summary.step;
            if step <= self.record.steps_done {
                // Redone after a recovery: published before, and it must reproduce the loss.
                if let Some(&bits) = self.losses.get(&step)
                    && bits != summary.loss.to_bits()
                {
                    tracing::warn!(job = %self.record.id, step, before = f64::from_bits(bits), now = summary.loss, "a redone step's loss differs");
                    if let Some(recovery) = &mut self.recovery {
                        recovery.mismatches += 1;
                    }
                }
            } else {
                let before = (self.record.steps_done, self.record.last_loss);
                self.record.steps_done = step;
                self.record.last_loss = summary.loss;
                let loss = summary.loss.to_bits();
                if let Err(e) = self.append(job_event::Event::Step(summary)).await {
                    // Memory follows the store: the step was not recorded.
                    (self.record.steps_done, self.record.last_loss) = before;
                    return Err(e);
                }
                self.losses.insert(step, loss);
            }
            self.finish_recovery(step).await?;
        }
        Ok(())
    }

    pub(super) async fn on_finished(
        &mut self,
        rank: usize,
        finished: JobFinished,
    ) -> Result<(), ServiceError> {
        if self.record.state != JobState::Running || !self.is_ours(&finished.job_id, false) {
            return Ok(());
        }
        self.crew[rank].finished = true;
        if !self.crew.iter().all(|r| r.finished) {
            return Ok(());
        }
        let n = self.crew.len();
        let (done, total) = (self.record.steps_done, self.record.total_steps);
        if done == total {
            // A recovery that resumed from the last step's checkpoint ran no step: it ends
            // here.
            self.finish_recovery(total).await?;
            self.transition(JobState::Succeeded, format!("all {n} workers finished {total} steps")).await
        } else {
            self.fail(format!(
                "all {n} workers reported the job finished, but only {done} of {total} steps were reported by every rank"
            ))
            .await
        }
    }
}

/// A rank's report of a step (a pipeline job's executed ops taken out) and their span.
type Reported = (StepReport, Option<RankSpan>);

/// Collects the ranks' step reports and releases one summary per step, in step order, once
/// every rank has reported it.
pub(super) struct StepTracker {
    /// The first step of the run.
    first: u64,
    /// The next step to summarize.
    pub(super) next: u64,
    /// One past the last step of the job.
    pub(super) end: u64,
    ranks: usize,
    /// Whether the job is a pipeline job (its steps have a bubble).
    pipeline: bool,
    pending: BTreeMap<u64, Vec<Option<Reported>>>,
    /// When the previous step was summarized (or the steps started): the fallback for the
    /// step time when workers report none.
    pub(super) last: Instant,
}

impl StepTracker {
    /// The steps of `record`'s job from `next` on, for `ranks` ranks.
    pub(super) fn new(record: &JobRecord, next: u64, ranks: usize, pipeline: bool) -> StepTracker {
        let end = record.total_steps.saturating_add(1).max(next);
        StepTracker {
            first: next,
            next,
            end,
            ranks,
            pipeline,
            pending: BTreeMap::new(),
            last: Instant::now(),
        }
    }

    /// Takes a report; an error describes a protocol violation.
    fn accept(&mut self, rank: usize, report: StepReport, span: Option<RankSpan>) -> Result<(), String> {
        let step = report.step;
        if step >= self.end {
            return Err(format!("step {step} is past the job's last step {}", self.end.saturating_sub(1)));
        }
        if step < self.first {
            return Err(format!("step {step} is before the run's first step {}", self.first));
        }
        if step < self.next {
            // Already summarized: a duplicate, harmless.
            return Ok(());
        }
        if step - self.next >= MAX_STEPS_AHEAD {
            return Err(format!(
                "step {step} is more than {MAX_STEPS_AHEAD} steps ahead of step {}, which not every rank has reported",
                self.next
            ));
        }
        let slots = self.pending.entry(step).or_insert_with(|| vec![None; self.ranks]);
        if let Some(slot) = slots.get_mut(rank)
            && slot.is_none()
        {
            *slot = Some((report, span));
        }
        Ok(())
    }

    /// The ranks that have not reported `step`.
    pub(super) fn missing(&self, step: u64) -> Vec<usize> {
        match self.pending.get(&step) {
            Some(slots) => {
                slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(rank, _)| rank).collect()
            }
            None => (0..self.ranks).collect(),
        }
    }

    /// The next step every rank has reported, summarized.
    fn pop(&mut self) -> Option<StepSummary> {
        let slots = self.pending.get(&self.next)?;
        if slots.iter().any(Option::is_none) {
            return None;
        }
        let (reports, spans): (Vec<StepReport>, Vec<Option<RankSpan>>) =
            self.pending.remove(&self.next)?.into_iter().flatten().unzip();
        let now = Instant::now();
        let observed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.next += 1;
        let mut summary = summarize(&reports, observed);
        if self.pipeline {
            summary.bubble_fraction = measured_bubble(&reports, &spans);
        }
        Some(summary)
    }
}

/// A pipeline step's bubble: from the ranks' spans ([`bubble_fraction`]: the largest over
/// ranks of 1 − busy / makespan), or, when the spans measure no time, the largest fraction
/// the ranks reported (each clamped to [0, 1]; a non-finite one counts as 0).
fn measured_bubble(reports: &[StepReport], spans: &[Option<RankSpan>]) -> f64 {
    bubble_fraction(spans.iter().flatten().copied()).unwrap_or_else(|| {
        reports
            .iter()
            .map(|r| if r.bubble_fraction.is_finite() { r.bubble_fraction.clamp(0.0, 1.0) } else { 0.0 })
            .fold(0.0, f64::max)
    })
}

/// One step of the job from every rank's report. Losses, tokens and expert loads are of
/// the global batch (all-reduced on the data plane), the same on every rank, so rank 0's
/// are taken; the step took as long as its slowest rank (compute + communication as the
/// workers measured it, or, if they measured nothing, the time the coordinator saw pass).
/// The summary has the largest and the mean of the per-(layer, expert) token counts.
fn summarize(reports: &[StepReport], observed_seconds: f64) -> StepSummary {
    let Some(first) = reports.first() else { return StepSummary::default() };
    let tokens = first.tokens;
    let reported = reports.iter().map(|r| r.compute_seconds + r.communication_seconds).fold(0.0, f64::max);
    let seconds = if reported > 0.0 { reported } else { observed_seconds };
    let tokens_per_second = if seconds > 0.0 { tokens as f64 / seconds } else { 0.0 };

    let counts = first.expert_loads.iter().flat_map(|layer| layer.tokens.iter().copied());
    let (n, sum, max) =
        counts.fold((0u64, 0f64, 0u64), |(n, sum, max), c| (n + 1, sum + c as f64, max.max(c)));
    let max_expert_load = max as f64;
    let mean_expert_load = if n == 0 { 0.0 } else { sum / n as f64 };

    StepSummary {
        step: first.step,
        loss: first.loss,
        main_ce: first.main_ce,
        mtp_ce: first.mtp_ce.clone(),
        balance_loss: first.balance_loss,
        lr: first.lr,
        grad_norm: first.grad_norm,
        tokens,
        tokens_per_second,
        max_expert_load,
        mean_expert_load,
        bubble_fraction: 0.0,
        predicted_bubble_fraction: 0.0,
        exchange_bytes: reports.iter().map(|r| r.exchange_bytes).fold(0, u64::saturating_add),
        cross_node_bytes: reports.iter().map(|r| r.cross_node_bytes).fold(0, u64::saturating_add),
        cross_node_bytes_flat: reports.iter().map(|r| r.cross_node_bytes_flat).fold(0, u64::saturating_add),
        exchange_seconds: reports.iter().map(|r| r.exchange_seconds).fold(0.0, f64::max),
        step_seconds: seconds,
    }
}
