//! Executed steps, as pipeline ranks report them: the measured bubble and a Chrome trace of
//! a step's timeline, drawn with the simulator's names and colors ([`chrome_trace`]) so a
//! measured step and its simulation read alike.
//!
//! [`chrome_trace`]: super::chrome_trace

use flotilla_proto::v1::{ExecutedOp, StepTimeline};
use serde_json::{Value, json};

use super::draw::{Part, parts};
use super::{Chunk, Instruction, Schedule, ScheduleKind};

/// One rank's executed step reduced to what the bubble needs, in microseconds since the
/// Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankSpan {
    /// When its first instruction started (the earliest start).
    pub start_us: u64,
    /// When its last instruction ended (the latest end).
    pub end_us: u64,
    /// Time in compute instructions (F, B, W, BW, F&B); transfers, receives' waits
    /// included, are not busy, as in the simulator.
    pub busy_us: u64,
}

/// `ops`' span; `None` for a rank that executed nothing.
pub fn rank_span(ops: &[ExecutedOp]) -> Option<RankSpan> {
    let start_us = ops.iter().map(|o| o.start_unix_us).min()?;
    let end_us = ops.iter().map(|o| o.end_unix_us.max(o.start_unix_us)).max()?;
    let busy_us = ops
        .iter()
        .filter(|o| Instruction::try_from(*o).is_ok_and(|i| i.is_compute()))
        .map(|o| o.end_unix_us.saturating_sub(o.start_unix_us))
        .fold(0u64, u64::saturating_add);
    Some(RankSpan { start_us, end_us, busy_us })
}

/// The measured bubble of a step: the largest, over ranks, of 1 − busy / makespan, where
/// the makespan runs from the earliest start of any rank to the latest end of any rank
/// (the simulator's bubble, makespan − busy, as a fraction of the makespan). `None` when
/// there are no spans or they measure no time. Each fraction is clamped to [0, 1].
///
/// The ranks' clocks are compared directly: on one host they are the same clock; across
/// hosts their skew (NTP keeps it to around a millisecond) adds to the bubble.
pub fn bubble_fraction(spans: impl IntoIterator<Item = RankSpan>) -> Option<f64> {
    let spans: Vec<RankSpan> = spans.into_iter().collect();
    let start = spans.iter().map(|s| s.start_us).min()?;
    let end = spans.iter().map(|s| s.end_us).max()?;
    let makespan = end.saturating_sub(start);
    if makespan == 0 {
        return None;
    }
    spans.iter().map(|s| (1.0 - s.busy_us as f64 / makespan as f64).clamp(0.0, 1.0)).reduce(f64::max)
}

/// The direction a micro-batch travels in, from the layout's schedule name and
/// micro-batch count (0 when the layout is missing or names no schedule).
fn direction_of(timeline: &StepTimeline) -> impl Fn(u32) -> u32 {
    let (kind, micro_batches) = match &timeline.layout {
        Some(layout) => (ScheduleKind::try_from(layout.schedule_kind).ok(), layout.micro_batches),
        None => (None, 0),
    };
    move |micro_batch| match kind {
        Some(ScheduleKind::DualPipe) if micro_batch >= micro_batches / 2 => 1,
        _ => 0,
    }
}

fn chunk_args(direction: &impl Fn(u32) -> u32, chunk: Chunk) -> Value {
    json!({
        "micro_batch": chunk.micro_batch,
        "stage": chunk.stage,
        "direction": direction(chunk.micro_batch),
    })
}

/// `object` with `key` set to `value`.
fn with(mut object: Value, key: &str, value: Value) -> Value {
    if let Value::Object(fields) = &mut object {
        fields.insert(key.into(), value);
    }
    object
}

/// `timeline` (one step of a pipeline job, as `GetStepTimeline` returns it) as a Chrome
/// trace (the JSON object format), to open in Perfetto (ui.perfetto.dev) or
/// `chrome://tracing`.
///
/// Each world rank is a process (`pid` = world rank) named "rank g (pp r, ep e, dp d)",
/// sorted by rank, with one thread named after its worker. Each executed instruction is
/// one complete event (`"ph": "X"`) at its measured span, `ts` and `dur` in microseconds
/// from the step's earliest start over all ranks. Compute instructions are named and
/// colored as in the simulator's trace and SVG: "F mb 3 stage 1", "F&B mb 4 stage 0 & mb 1
/// stage 1", `cat` the kind's label (F, B, W, BW, F&B), `args` the micro-batch, stage and
/// direction (an F&B its `forward` and `backward`), its position in the stream as `index`,
/// the SVG's fill as `color` and the nearest named trace color as `cname` (an F&B takes its
/// forward half's). Transfers are boxes of their own: "sendA mb 3 stage 1 to pp 2",
/// "recvG mb 3 stage 2 from pp 2" (peers are pipeline ranks), `cat` their label, `cname`
/// "generic_work". An op that names no instruction is "invalid op" (`cname` "terrible").
pub fn executed_chrome_trace(timeline: &StepTimeline) -> Value {
    let direction = direction_of(timeline);
    let origin = timeline.ranks.iter().flat_map(|r| r.ops.iter().map(|o| o.start_unix_us)).min().unwrap_or(0);
    let mut events = Vec::new();
    for rank in &timeline.ranks {
        let g = rank.rank;
        let name =
            format!("rank {g} (pp {}, ep {}, dp {})", rank.pipeline_rank, rank.ep_rank, rank.dp_replica);
        events
            .push(json!({ "ph": "M", "pid": g, "tid": 0, "name": "process_name", "args": { "name": name } }));
        events.push(
            json!({ "ph": "M", "pid": g, "tid": 0, "name": "process_sort_index", "args": { "sort_index": g } }),
        );
        events.push(json!({
            "ph": "M", "pid": g, "tid": 0, "name": "thread_name",
            "args": { "name": format!("worker {}", rank.worker_id) },
        }));
    }
    for rank in &timeline.ranks {
        for (index, op) in rank.ops.iter().enumerate() {
            let mut event = match Instruction::try_from(op) {
                Err(invalid) => json!({
                    "name": "invalid op",
                    "cat": "invalid",
                    "cname": "terrible",
                    "args": { "error": invalid.to_string() },
                }),
                Ok(instruction) => {
                    match instruction {
                        Instruction::Forward { chunk }
                        | Instruction::BackwardInput { chunk }
                        | Instruction::BackwardWeight { chunk }
                        | Instruction::Backward { chunk } => {
                            let part = parts(&instruction).map_or(Part::Forward, |p| p[0].0);
                            let d = direction(chunk.micro_batch);
                            json!({
                                "name": format!("{} mb {} stage {}", instruction.label(), chunk.micro_batch, chunk.stage),
                                "cat": instruction.label(),
                                "cname": part.cname(d),
                                "args": with(chunk_args(&direction, chunk), "color", json!(part.color(d))),
                            })
                        }
                        Instruction::OverlappedForwardBackward { forward, backward } => {
                            let d = direction(forward.micro_batch);
                            json!({
                                "name": format!(
                                    "F&B mb {} stage {} & mb {} stage {}",
                                    forward.micro_batch, forward.stage, backward.micro_batch, backward.stage
                                ),
                                "cat": instruction.label(),
                                "cname": Part::Forward.cname(d),
                                "args": {
                                    "forward": chunk_args(&direction, forward),
                                    "backward": chunk_args(&direction, backward),
                                    "color": [Part::Forward.color(d), Part::Backward.color(direction(backward.micro_batch))],
                                },
                            })
                        }
                        Instruction::SendActivation { chunk, peer }
                        | Instruction::SendGrad { chunk, peer } => json!({
                            "name": format!("{} mb {} stage {} to pp {peer}", instruction.label(), chunk.micro_batch, chunk.stage),
                            "cat": instruction.label(),
                            "cname": "generic_work",
                            "args": with(chunk_args(&direction, chunk), "peer_pipeline_rank", json!(peer)),
                        }),
                        Instruction::RecvActivation { chunk, peer }
                        | Instruction::RecvGrad { chunk, peer } => json!({
                            "name": format!("{} mb {} stage {} from pp {peer}", instruction.label(), chunk.micro_batch, chunk.stage),
                            "cat": instruction.label(),
                            "cname": "generic_work",
                            "args": with(chunk_args(&direction, chunk), "peer_pipeline_rank", json!(peer)),
                        }),
                    }
                }
            };
            let Value::Object(fields) = &mut event else { continue };
            fields.insert("ph".into(), json!("X"));
            fields.insert("pid".into(), json!(rank.rank));
            fields.insert("tid".into(), json!(0));
            fields.insert("ts".into(), json!(op.start_unix_us.saturating_sub(origin)));
            fields.insert("dur".into(), json!(op.end_unix_us.saturating_sub(op.start_unix_us)));
            if let Some(Value::Object(args)) = fields.get_mut("args") {
                args.insert("index".into(), json!(index));
            }
            events.push(event);
        }
    }
    let layout = timeline.layout.unwrap_or_default();
    json!({
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "job_id": timeline.job_id,
            "step": timeline.step,
            "schedule": ScheduleKind::try_from(layout.schedule_kind).map_or("", ScheduleKind::name),
            "pp": layout.pp,
            "ep": layout.ep,
            "dp": layout.dp,
            "micro_batches": layout.micro_batches,
            "time_unit": "µs since the step's earliest start",
            "origin_unix_us": origin,
        },
    })
}

/// The bubble the simulator predicts for `schedule` when every instruction takes what it
/// took in `timeline`: each compute instruction is given the mean measured duration of its
/// kind and stage(s) over all ranks (F, B, W, BW by stage; F&B by both stages), transfers
/// take no rank time, and the prediction is the simulated bubble as a fraction of the
/// simulated makespan, largest over ranks, the measured [`bubble_fraction`]'s definition.
/// `None` when the timeline lacks an instruction kind the schedule needs, or measured no
/// time.
pub fn predicted_bubble_fraction(schedule: &Schedule, timeline: &StepTimeline) -> Option<f64> {
    use std::collections::HashMap;
    type Key = (&'static str, u32, u32);
    let key = |i: &Instruction| -> Option<Key> {
        match *i {
            Instruction::Forward { chunk }
            | Instruction::BackwardInput { chunk }
            | Instruction::BackwardWeight { chunk }
            | Instruction::Backward { chunk } => Some((i.label(), chunk.stage, 0)),
            Instruction::OverlappedForwardBackward { forward, backward } => {
                Some((i.label(), forward.stage, backward.stage))
            }
            _ => None,
        }
    };
    let mut sums: HashMap<Key, (f64, u64)> = HashMap::new();
    for rank in &timeline.ranks {
        for op in &rank.ops {
            let Ok(instruction) = Instruction::try_from(op) else { continue };
            if let Some(k) = key(&instruction) {
                let entry = sums.entry(k).or_default();
                entry.0 += op.end_unix_us.saturating_sub(op.start_unix_us) as f64;
                entry.1 += 1;
            }
        }
    }
    let means: HashMap<Key, f64> = sums.into_iter().map(|(k, (sum, n))| (k, sum / n as f64)).collect();
    let missing = schedule.ranks.iter().flatten().filter_map(key).any(|k| !means.contains_key(&k));
    if missing {
        return None;
    }
    let simulated = super::simulate_with(schedule, |i| key(i).map_or(0.0, |k| means[&k]), 0.0).ok()?;
    if simulated.makespan <= 0.0 {
        return None;
    }
    simulated.idle.iter().map(|idle| (idle / simulated.makespan).clamp(0.0, 1.0)).reduce(f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::coordinates;
    use crate::schedule::{ScheduleSpec, compile};
    use flotilla_proto::v1::{Layout, RankTimeline, ScheduledOp};
    use std::collections::BTreeSet;

    fn op(instruction: Instruction, start: u64, end: u64) -> ExecutedOp {
        ExecutedOp { op: Some(instruction.into()), start_unix_us: start, end_unix_us: end }
    }

    /// A DualPipe step on pp 2 × ep 2: every op 10 µs, back to back, each rank starting
    /// 5 µs after the previous one.
    fn timeline() -> StepTimeline {
        let schedule =
            compile(&ScheduleSpec { kind: ScheduleKind::DualPipe, pp: 2, micro_batches: 4 }).unwrap();
        let ranks = (0..4u32)
            .map(|g| {
                let c = coordinates(g, 2, 1);
                let t0 = 1_700_000_000_000_000 + 5 * u64::from(g);
                let ops = schedule.ranks[c.pipeline_rank as usize]
                    .iter()
                    .enumerate()
                    .map(|(i, &instruction)| op(instruction, t0 + 10 * i as u64, t0 + 10 * i as u64 + 10))
                    .collect();
                RankTimeline {
                    rank: g,
                    worker_id: format!("w-{g}"),
                    pipeline_rank: c.pipeline_rank,
                    ep_rank: c.ep_rank,
                    dp_replica: c.dp_replica,
                    ops,
                    bubble_fraction: 0.0,
                }
            })
            .collect();
        let layout = Layout {
            pp: 2,
            ep: 2,
            dp: 1,
            schedule_kind: flotilla_proto::v1::ScheduleKind::DualPipe as i32,
            micro_batches: 4,
            overlap: true,
        };
        StepTimeline { job_id: "job-7".into(), step: 3, ranks, layout: Some(layout) }
    }

    #[test]
    fn bubble_is_the_idlest_ranks_share_of_the_makespan() {
        let ops = [
            op(Instruction::Forward { chunk: Chunk::new(0, 0) }, 100, 140),
            op(Instruction::SendActivation { chunk: Chunk::new(0, 0), peer: 1 }, 140, 150),
            op(Instruction::BackwardInput { chunk: Chunk::new(0, 0) }, 180, 200),
        ];
        let a = rank_span(&ops).unwrap();
        assert_eq!(a, RankSpan { start_us: 100, end_us: 200, busy_us: 60 });
        let b = RankSpan { start_us: 120, end_us: 300, busy_us: 150 };
        // Makespan 200: rank a idles 140 of it, rank b 50.
        assert!((bubble_fraction([a, b]).unwrap() - 0.7).abs() < 1e-12);
        assert_eq!(bubble_fraction([]), None);
        assert_eq!(bubble_fraction([RankSpan { start_us: 5, end_us: 5, busy_us: 0 }]), None);
        assert_eq!(rank_span(&[]), None);
        // Inconsistent reports cannot leave [0, 1].
        assert_eq!(bubble_fraction([RankSpan { start_us: 0, end_us: 10, busy_us: 50 }]), Some(0.0));
    }

    #[test]
    fn trace_has_one_track_per_rank_and_one_box_per_op() {
        let timeline = timeline();
        let trace = executed_chrome_trace(&timeline);
        // Valid JSON, in and out.
        let text = serde_json::to_string(&trace).unwrap();
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, trace);
        let events = trace["traceEvents"].as_array().unwrap();
        let names: Vec<&str> = events
            .iter()
            .filter(|e| e["name"] == "process_name")
            .map(|e| e["args"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "rank 0 (pp 0, ep 0, dp 0)",
                "rank 1 (pp 0, ep 1, dp 0)",
                "rank 2 (pp 1, ep 0, dp 0)",
                "rank 3 (pp 1, ep 1, dp 0)"
            ]
        );
        let boxes: Vec<&Value> = events.iter().filter(|e| e["ph"] == "X").collect();
        let total: usize = timeline.ranks.iter().map(|r| r.ops.len()).sum();
        assert_eq!(boxes.len(), total);
        for rank in &timeline.ranks {
            let mine = boxes.iter().filter(|e| e["pid"] == rank.rank).count();
            assert_eq!(mine, rank.ops.len());
        }
        let pids: BTreeSet<u64> = boxes.iter().map(|e| e["pid"].as_u64().unwrap()).collect();
        assert_eq!(pids, (0..4).collect());
        // Times in µs from the earliest start; durations as measured.
        assert_eq!(boxes.iter().map(|e| e["ts"].as_u64().unwrap()).min(), Some(0));
        assert!(boxes.iter().all(|e| e["dur"] == 10));
        assert_eq!(boxes.iter().filter(|e| e["pid"] == 1).map(|e| e["ts"].as_u64().unwrap()).min(), Some(5));
        // Transfers are boxes of their own; compute boxes are named and colored as the
        // simulator's, by direction.
        let transfers = timeline
            .ranks
            .iter()
            .flat_map(|r| &r.ops)
            .filter(|o| !Instruction::try_from(*o).unwrap().is_compute())
            .count();
        assert!(transfers > 0);
        assert_eq!(boxes.iter().filter(|e| e["cname"] == "generic_work").count(), transfers);
        let f0 = boxes.iter().find(|e| e["name"] == "F mb 0 stage 0").unwrap();
        assert_eq!((f0["cat"].as_str(), f0["cname"].as_str()), (Some("F"), Some("rail_idle")));
        assert_eq!(f0["args"]["color"], Part::Forward.color(0));
        let f2 = boxes.iter().find(|e| e["name"] == "F mb 2 stage 0").unwrap();
        assert_eq!(
            (f2["args"]["direction"].as_u64(), f2["cname"].as_str()),
            (Some(1), Some("cq_build_failed"))
        );
        assert!(boxes.iter().any(|e| e["name"].as_str().unwrap().starts_with("sendA mb 0 stage 0 to pp 1")));
        assert_eq!(trace["otherData"]["step"], 3);
        assert_eq!(trace["otherData"]["schedule"], "dualpipe");
    }

    #[test]
    fn trace_marks_invalid_ops_and_survives_an_empty_step() {
        let mut timeline = timeline();
        timeline.ranks[0].ops[0].op = Some(ScheduledOp { kind: 99, ..ScheduledOp::default() });
        timeline.ranks[3].ops.clear();
        let trace = executed_chrome_trace(&timeline);
        let events = trace["traceEvents"].as_array().unwrap();
        assert_eq!(events.iter().filter(|e| e["cat"] == "invalid").count(), 1);
        assert_eq!(events.iter().filter(|e| e["name"] == "process_name").count(), 4);
        let empty = StepTimeline::default();
        assert_eq!(executed_chrome_trace(&empty)["traceEvents"].as_array().unwrap().len(), 0);
    }

    /// Spans taken from a simulation under some costs give back that simulation's bubble:
    /// the prediction reads the costs off the spans and simulates the same streams.
    #[test]
    fn the_prediction_of_simulated_spans_is_the_simulated_bubble() {
        use crate::schedule::{Costs, simulate};
        for (kind, pp, micro_batches) in
            [(ScheduleKind::OneFOneB, 4, 8), (ScheduleKind::DualPipe, 4, 8), (ScheduleKind::Zb1p, 4, 8)]
        {
            let schedule = compile(&ScheduleSpec { kind, pp, micro_batches }).unwrap();
            let costs =
                Costs { forward: 100.0, backward: 220.0, weight: 90.0, overlapped: 290.0, latency: 0.0 };
            let simulated = simulate(&schedule, &costs).unwrap();
            let mut ranks = vec![RankTimeline::default(); pp as usize];
            for span in simulated.spans.iter().filter(|s| s.instruction.is_compute()) {
                ranks[span.rank as usize].ops.push(op(span.instruction, span.start as u64, span.end as u64));
            }
            let timeline = StepTimeline { ranks, ..StepTimeline::default() };
            let want = simulated.idle.iter().map(|i| i / simulated.makespan).fold(0.0, f64::max);
            let got = predicted_bubble_fraction(&schedule, &timeline).unwrap();
            assert!((got - want).abs() < 1e-9, "{kind}: predicted {got}, simulated {want}");
            assert!(got > 0.0);
        }
        // A timeline missing an instruction kind the schedule needs predicts nothing.
        let schedule =
            compile(&ScheduleSpec { kind: ScheduleKind::OneFOneB, pp: 2, micro_batches: 2 }).unwrap();
        assert_eq!(predicted_bubble_fraction(&schedule, &StepTimeline::default()), None);
    }
}
