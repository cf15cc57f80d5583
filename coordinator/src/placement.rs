//! Placement of a pipeline/expert-parallel job on its workers: which world rank sits where
//! in the layout, which layers each stage runs, and the instruction stream each rank is
//! shipped and must execute. Pure functions over counts and schedules; no tensors.
//!
//! # World ranks
//!
//! A job's workers are ordered by (node, local rank, worker id) ([`world_order`]; the node
//! is the worker's `node_id`, or its host when it gave none) and world rank `g` is the
//! index in that order. A layout of `pp` stages, `ep`-way expert parallelism and `dp`
//! replicas of each expert shard has `ranks_for(pp)` pipeline ranks (pp, or pp / 2 under
//! DualPipeV) and world size `ranks × ep × dp`. World rank `g` has the coordinates
//! (`flotilla_layout`'s [`coordinates`], the one definition the workers share)
//!
//! ```text
//! ep_rank       = g mod ep
//! dp_replica    = (g / ep) mod dp
//! pipeline_rank = g / (ep · dp)
//! ```
//!
//! so the `ep` ranks of an EP group (one pipeline rank, one DP replica, every EP rank) are
//! consecutive, and so are the `ep · dp` ranks of one pipeline rank. Since ranks follow
//! nodes, an EP group lies inside one node when the node has at least `ep` workers (and
//! `ep` divides the node's worker count), or else spans `ep / workers-per-node` whole
//! nodes. EP rank `e` holds routed experts `e·n/ep .. (e+1)·n/ep` of every MoE layer
//! (`n` = `n_routed_experts`), so each node of an EP group holds one contiguous range of
//! experts: when the model's `n_group` equals the number of nodes the EP group spans,
//! each routing group is exactly one node's experts, and group-limited routing
//! (`topk_group` groups per token) is the report's node-limited routing (DESIGN §1.4).
//! Nothing here requires that relation; the planner (`plan`) checks it for real clusters.
//!
//! # Stages and streams
//!
//! The model's main layers are cut into `pp` contiguous stages of at least one layer by
//! the planner's cost model ([`crate::plan::split_layers`]: forward FLOPs per token, the
//! embedding on stage 0, the final norm, head and MTP modules on the last stage). The
//! schedule is compiled once ([`compile`]); every world rank is shipped its pipeline
//! rank's stream, which also says which stages the rank hosts (DualPipe: stages r and
//! PP−1−r on pipeline rank r). A transfer's `peer` is a pipeline rank: the world rank it
//! talks to has the same EP rank and DP replica ([`Placement::peer_world_rank`]).
//!
//! # Wire form
//!
//! Streams travel as proto `ScheduledOp`s (the conversions are `flotilla_layout`'s), and
//! the layout as the proto `Layout` ([`Parallel::layout`]), every key of the `[parallel]`
//! table typed.
//! [`Placement::check_executed`] compares what a rank reports it executed with its
//! compiled stream op by op (kind, chunks, peer; spans ignored).

use std::fmt;

use flotilla_model::ModelConfig;
use flotilla_proto::v1::{ExecutedOp, PipelineAssignment, ScheduledOp, StageLayers};
use thiserror::Error;

use crate::plan::{LayerRange, PlanError, split_layers};
use crate::schedule::{Instruction, InvalidOp, Schedule, ScheduleError, ScheduleKind, ScheduleSpec, compile};
pub use flotilla_layout::{Coordinates, coordinates, world_rank};

/// A job's parallel layout: its `[parallel]` table, typed and checked
/// (`flotilla_layout::ParallelConfig`, the type the run TOML and the workers use).
pub use flotilla_layout::ParallelConfig as Parallel;

/// What the schedule compiler is asked for to place `parallel`.
pub fn spec_of(parallel: &Parallel) -> ScheduleSpec {
    ScheduleSpec { kind: parallel.schedule, pp: parallel.pp, micro_batches: parallel.micro_batches }
}

/// What orders a job's workers into world ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct WorkerKey<'a> {
    /// The worker's node (`node_id`, or its host when it gave none).
    pub node_id: &'a str,
    /// Its index on the node.
    pub local_rank: u32,
    pub worker_id: &'a str,
}

/// The world order of `workers`: `order[g]` is the index in `workers` of world rank `g`,
/// sorted by (node, local rank, worker id), so that ranks of one node are consecutive.
pub fn world_order(workers: &[WorkerKey<'_>]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..workers.len()).collect();
    order.sort_by(|&a, &b| workers[a].cmp(&workers[b]));
    order
}

/// Why a layout cannot be placed.
#[derive(Debug, Error, PartialEq)]
pub enum PlacementError {
    /// The model cannot be cut into the stages.
    #[error(transparent)]
    Stages(#[from] PlanError),
    /// The schedule does not compile.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// More world ranks than 32 bits count.
    #[error("the layout needs {0} world ranks, more than 2^32")]
    TooLarge(u64),
}

/// A job's placement: its layout, its stages and the compiled schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    parallel: Parallel,
    world_size: u32,
    stages: Vec<LayerRange>,
    schedule: Schedule,
}

impl Placement {
    /// Cuts `model` into `parallel.pp` stages (layer costs at `seq_len` tokens per
    /// sequence) and compiles the schedule.
    pub fn new(parallel: Parallel, model: &ModelConfig, seq_len: u32) -> Result<Placement, PlacementError> {
        let world = parallel.world_size();
        let world_size = u32::try_from(world).map_err(|_| PlacementError::TooLarge(world))?;
        let schedule = compile(&spec_of(&parallel))?;
        let stages = split_layers(model, seq_len, parallel.pp)?;
        Ok(Placement { parallel, world_size, stages, schedule })
    }

    pub fn parallel(&self) -> &Parallel {
        &self.parallel
    }

    /// The compiled schedule: `schedule().ranks[p]` is pipeline rank p's stream.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Every stage's layers, in forward order.
    pub fn stages(&self) -> &[LayerRange] {
        &self.stages
    }

    /// World ranks.
    pub fn world_size(&self) -> u32 {
        self.world_size
    }

    /// `world_rank`'s coordinates.
    pub fn coordinates(&self, world_rank: u32) -> Coordinates {
        coordinates(world_rank, self.parallel.ep, self.parallel.dp)
    }

    /// The stream `world_rank` executes every step: its pipeline rank's (empty past the
    /// world).
    pub fn stream(&self, world_rank: u32) -> &[Instruction] {
        let pipeline_rank = self.coordinates(world_rank).pipeline_rank as usize;
        self.schedule.ranks.get(pipeline_rank).map(Vec::as_slice).unwrap_or_default()
    }

    /// The world rank that `world_rank` exchanges tensors with when its stream names
    /// pipeline rank `peer`: same EP rank and DP replica.
    pub fn peer_world_rank(&self, world_rank: u32, peer: u32) -> Option<u32> {
        let me = self.coordinates(world_rank);
        world_rank_of(Coordinates { pipeline_rank: peer, ..me }, &self.parallel)
    }

    /// What `world_rank`'s assignment carries: the layout, every rank's coordinates, every
    /// stage, and its own stream.
    pub fn assignment(&self, world_rank: u32) -> PipelineAssignment {
        PipelineAssignment {
            layout: Some(self.parallel.layout()),
            coordinates: (0..self.world_size).map(|g| self.coordinates(g).into()).collect(),
            stages: self
                .stages
                .iter()
                .enumerate()
                .map(|(stage, range)| StageLayers {
                    // At most pp, a u32.
                    stage: stage as u32,
                    first_layer: range.first_layer,
                    layers: range.layers,
                })
                .collect(),
            stream: self.stream(world_rank).iter().map(|&i| ScheduledOp::from(i)).collect(),
        }
    }

    /// Every world rank's [`Placement::assignment`], in world-rank order, sharing the work
    /// of converting each pipeline rank's stream once.
    pub fn assignments(&self) -> Vec<PipelineAssignment> {
        let mut template = self.assignment(0);
        template.stream.clear();
        let streams: Vec<Vec<ScheduledOp>> = self
            .schedule
            .ranks
            .iter()
            .map(|stream| stream.iter().map(|&i| ScheduledOp::from(i)).collect())
            .collect();
        (0..self.world_size)
            .map(|g| {
                let pipeline_rank = self.coordinates(g).pipeline_rank as usize;
                PipelineAssignment {
                    stream: streams.get(pipeline_rank).cloned().unwrap_or_default(),
                    ..template.clone()
                }
            })
            .collect()
    }

    /// Whether `executed` is `world_rank`'s compiled stream, op by op (kind, chunks, peer;
    /// the spans are not compared). The first difference is returned.
    pub fn check_executed(&self, world_rank: u32, executed: &[ExecutedOp]) -> Result<(), Deviation> {
        check_stream(self.parallel.schedule, self.stream(world_rank), executed)
    }
}

fn world_rank_of(c: Coordinates, parallel: &Parallel) -> Option<u32> {
    (c.pipeline_rank < parallel.pipeline_ranks()).then(|| world_rank(c, parallel.ep, parallel.dp)).flatten()
}

/// The first difference between a compiled stream and what a rank executed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deviation {
    /// The schedule the stream was compiled from.
    pub schedule: ScheduleKind,
    /// The position in the stream of the first difference.
    pub index: usize,
    /// The compiled stream's length.
    pub compiled_len: usize,
    /// The executed stream's length.
    pub executed_len: usize,
    /// The compiled instruction there (`None`: the executed stream is longer).
    pub compiled: Option<Instruction>,
    /// What was executed there (`None`: the executed stream ended).
    pub executed: Option<Result<Instruction, InvalidOp>>,
}

impl fmt::Display for Deviation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let title = self.schedule.title();
        let executed = |e: &Result<Instruction, InvalidOp>| match e {
            Ok(instruction) => instruction.to_string(),
            Err(invalid) => format!("an invalid op ({invalid})"),
        };
        match (&self.compiled, &self.executed) {
            (Some(compiled), Some(done)) => write!(
                f,
                "executed stream deviates from the compiled {title} stream at instruction {}: compiled {compiled}, executed {}",
                self.index,
                executed(done)
            ),
            (Some(compiled), None) => write!(
                f,
                "executed stream ends after {} of the compiled {title} stream's {} instructions: the missing tail starts at instruction {} ({compiled})",
                self.executed_len, self.compiled_len, self.index
            ),
            (None, Some(extra)) => {
                let more = self.executed_len - self.compiled_len;
                write!(
                    f,
                    "executed stream has {more} {} beyond the compiled {title} stream's {}: the first, instruction {}, is {}",
                    if more == 1 { "instruction" } else { "instructions" },
                    self.compiled_len,
                    self.index,
                    executed(extra)
                )
            }
            (None, None) => write!(f, "executed stream matches the compiled {title} stream"),
        }
    }
}

/// Compares `executed` with `compiled` op by op; see [`Placement::check_executed`].
pub fn check_stream(
    schedule: ScheduleKind,
    compiled: &[Instruction],
    executed: &[ExecutedOp],
) -> Result<(), Deviation> {
    let deviation =
        |index: usize, compiled_op: Option<Instruction>, done: Option<Result<Instruction, InvalidOp>>| {
            Deviation {
                schedule,
                index,
                compiled_len: compiled.len(),
                executed_len: executed.len(),
                compiled: compiled_op,
                executed: done,
            }
        };
    for (index, (want, got)) in compiled.iter().zip(executed).enumerate() {
        let got = Instruction::try_from(got);
        if got.as_ref() != Ok(want) {
            return Err(deviation(index, Some(*want), Some(got)));
        }
    }
    match compiled.len().cmp(&executed.len()) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Greater => {
            let index = executed.len();
            Err(deviation(index, Some(compiled[index]), None))
        }
        std::cmp::Ordering::Less => {
            let index = compiled.len();
            Err(deviation(index, None, Some(Instruction::try_from(&executed[index]))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_model::Preset;

    fn parallel(schedule: ScheduleKind, pp: u32, ep: u32, dp: u32, micro_batches: u32) -> Parallel {
        Parallel { pp, ep, dp, schedule, micro_batches, overlap: true }
    }

    fn executed(stream: &[Instruction]) -> Vec<ExecutedOp> {
        stream
            .iter()
            .enumerate()
            .map(|(i, &instruction)| ExecutedOp {
                op: Some(instruction.into()),
                start_unix_us: 10 * i as u64,
                end_unix_us: 10 * i as u64 + 5,
            })
            .collect()
    }

    #[test]
    fn world_order_sorts_by_node_then_local_rank_then_id() {
        let keys = [
            WorkerKey { node_id: "b", local_rank: 0, worker_id: "w-1" },
            WorkerKey { node_id: "a", local_rank: 1, worker_id: "w-2" },
            WorkerKey { node_id: "a", local_rank: 0, worker_id: "w-9" },
            WorkerKey { node_id: "a", local_rank: 0, worker_id: "w-3" },
        ];
        assert_eq!(world_order(&keys), vec![3, 2, 1, 0]);
        assert!(world_order(&[]).is_empty());
    }

    #[test]
    fn placement_ships_each_rank_its_pipeline_ranks_stream() {
        let model = Preset::Tiny.config();
        let layers = model.num_hidden_layers as u32;
        let p = parallel(ScheduleKind::DualPipe, 2, 2, 1, 4);
        let placement = Placement::new(p, &model, 16).unwrap();
        assert_eq!(placement.world_size(), 4);
        let stages = placement.stages();
        assert_eq!(stages.len(), 2);
        assert_eq!(stages[0].first_layer, 0);
        assert_eq!(stages.iter().map(|s| s.layers).sum::<u32>(), layers);
        assert!(stages.iter().all(|s| s.layers >= 1));
        for g in 0..4 {
            let a = placement.assignment(g);
            let pipeline_rank = g / 2;
            let want: Vec<ScheduledOp> =
                placement.schedule().ranks[pipeline_rank as usize].iter().map(|&i| i.into()).collect();
            assert_eq!(a.stream, want);
            assert_eq!(a.coordinates.len(), 4);
            assert_eq!(a.coordinates[g as usize].pipeline_rank, pipeline_rank);
            assert_eq!(a.coordinates[g as usize].ep_rank, g % 2);
            assert_eq!(a.stages.len(), 2);
            assert_eq!(
                a.layout.as_ref().unwrap().schedule_kind(),
                flotilla_proto::v1::ScheduleKind::DualPipe
            );
            assert!(a.layout.as_ref().unwrap().overlap);
        }
        // DualPipe: pipeline rank r hosts stages r and PP−1−r.
        let hosted: std::collections::BTreeSet<u32> = placement.schedule().ranks[0]
            .iter()
            .filter_map(|i| match i {
                Instruction::Forward { chunk } => Some(chunk.stage),
                _ => None,
            })
            .collect();
        assert_eq!(hosted, [0, 1].into());
        let all = placement.assignments();
        assert_eq!(all.len(), 4);
        for (g, a) in all.iter().enumerate() {
            assert_eq!(*a, placement.assignment(g as u32));
        }
        assert_eq!(placement.peer_world_rank(1, 1), Some(3));
        assert_eq!(placement.peer_world_rank(3, 0), Some(1));
        assert_eq!(placement.peer_world_rank(3, 2), None);
    }

    #[test]
    fn dualpipev_halves_the_pipeline_ranks() {
        let model = Preset::Tiny.config();
        let p = parallel(ScheduleKind::DualPipeV, 2, 1, 3, 4);
        assert_eq!(p.pipeline_ranks(), 1);
        let placement = Placement::new(p, &model, 16).unwrap();
        assert_eq!(placement.world_size(), 3);
        assert_eq!(placement.stages().len(), 2);
        assert_eq!(placement.stream(2), placement.schedule().ranks[0].as_slice());
    }

    #[test]
    fn placement_refuses_what_cannot_be_laid_out() {
        let model = Preset::Tiny.config();
        let layers = model.num_hidden_layers as u32;
        let too_many = parallel(ScheduleKind::OneFOneB, layers + 1, 1, 1, 4);
        assert!(matches!(Placement::new(too_many, &model, 16), Err(PlacementError::Stages(_))));
        let odd = parallel(ScheduleKind::DualPipe, 2, 1, 1, 3);
        let err = Placement::new(odd, &model, 16).unwrap_err();
        assert!(err.to_string().contains("even number of micro-batches"), "{err}");
    }

    #[test]
    fn check_executed_names_the_first_difference() {
        let model = Preset::Tiny.config();
        let placement = Placement::new(parallel(ScheduleKind::DualPipe, 2, 1, 1, 4), &model, 16).unwrap();
        let stream = placement.stream(1).to_vec();
        let exact = executed(&stream);
        assert_eq!(placement.check_executed(1, &exact), Ok(()));
        // Spans do not matter.
        let mut shifted = exact.clone();
        shifted.iter_mut().for_each(|e| e.start_unix_us += 1000);
        assert_eq!(placement.check_executed(1, &shifted), Ok(()));

        let i = stream.iter().position(|i| i.is_compute()).unwrap();
        let j = i + 1 + stream[i + 1..].iter().position(|x| x.is_compute() && *x != stream[i]).unwrap();
        let mut swapped = exact.clone();
        swapped.swap(i, j);
        let deviation = placement.check_executed(1, &swapped).unwrap_err();
        assert_eq!(deviation.index, i);
        assert_eq!(
            deviation.to_string(),
            format!(
                "executed stream deviates from the compiled DualPipe stream at instruction {i}: compiled {}, executed {}",
                stream[i], stream[j]
            )
        );

        let short = &exact[..exact.len() - 2];
        let message = placement.check_executed(1, short).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!(
                "executed stream ends after {} of the compiled DualPipe stream's {} instructions: the missing tail starts at instruction {} ({})",
                stream.len() - 2,
                stream.len(),
                stream.len() - 2,
                stream[stream.len() - 2]
            )),
            "{message}"
        );

        let mut long = exact.clone();
        long.push(exact[0]);
        let message = placement.check_executed(1, &long).unwrap_err().to_string();
        assert!(message.contains("has 1 instruction beyond the compiled DualPipe stream's"), "{message}");

        let mut invalid = exact.clone();
        invalid[0].op = Some(ScheduledOp { kind: 77, ..ScheduledOp::default() });
        let message = placement.check_executed(1, &invalid).unwrap_err().to_string();
        assert!(
            message.contains("at instruction 0") && message.contains("an invalid op (kind 77"),
            "{message}"
        );
    }
}
