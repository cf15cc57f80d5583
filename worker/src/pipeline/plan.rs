//! [`PipelinePlan`]: a rank's part of a pipeline job, validated from the coordinator's
//! assignment against the model. The layout's rules (the schedule kind and its pipeline
//! ranks, which ranks host a stage, coordinates, the instruction codec) are
//! `flotilla_layout`'s, the ones the coordinator placed the job by.
//!
//! # Layout
//! World rank `g` sits at `(pipeline rank, EP rank, DP replica)` as the coordinator's
//! assignment says. Ranks with the same EP rank and DP replica form one pipeline; ranks
//! with the same pipeline and DP coordinates form an EP group, which exchanges MoE tokens;
//! the `ep × dp` pipelines are data-parallel replicas for everything but the routed
//! experts, which are replicated `dp` times. Pipeline `p = ep_rank + ep·dp_replica` runs
//! windows `(p·M + m)·b .. (p·M + m + 1)·b` of each step's global batch as its micro-batch
//! `m` (`M` micro-batches of `b` windows each), so the union over pipelines is the global
//! batch single-process training draws.
//!
//! Which pipeline ranks host stage `s` follows from the schedule
//! ([`flotilla_layout::ScheduleKind::hosts`]): DualPipe, ranks `s` and `PP−1−s`; DualPipeV,
//! rank `min(s, PP−1−s)`; 1F1B and ZB1P, rank `s`. A rank refuses a stream that computes a
//! stage it does not host.

use std::collections::HashMap;

use flotilla_layout::{Coordinates, Instruction, ParallelConfig};
use flotilla_model::config::ModelConfig;
use flotilla_proto::v1::PipelineAssignment;

/// A rank's part of a pipeline job, validated from the assignment.
#[derive(Clone, Debug)]
pub struct PipelinePlan {
    /// The layout: the job's `[parallel]` table as the assignment carries it.
    pub parallel: ParallelConfig,
    /// Layers per stage.
    pub stage_layers: Vec<usize>,
    /// `coordinates[g]`: where world rank `g` sits.
    pub coordinates: Vec<Coordinates>,
    /// This rank.
    pub rank: usize,
    /// This rank's instruction stream for one step.
    pub stream: Vec<Instruction>,
    /// The node of each world rank (empty: all on one node); see [`PipelinePlan::with_nodes`].
    pub nodes: Vec<String>,
    world_of: HashMap<Coordinates, usize>,
}

impl PipelinePlan {
    /// Checks an assignment for world rank `rank` of `world` against the model: every
    /// field named in the error.
    pub fn from_assignment(
        a: &PipelineAssignment,
        rank: usize,
        world: usize,
        model: &ModelConfig,
    ) -> Result<PipelinePlan, String> {
        let layout = a.layout.as_ref().ok_or("pipeline.layout is missing")?;
        let parallel = ParallelConfig::from_layout(layout).map_err(|e| format!("pipeline.{e}"))?;
        let ParallelConfig { pp, ep, dp, micro_batches, .. } = parallel;
        let pipeline_ranks = parallel.pipeline_ranks();
        let needed = parallel.world_size();
        if needed != world as u64 {
            return Err(format!(
                "pipeline.layout: {pipeline_ranks} pipeline ranks × ep {ep} × dp {dp} = {needed} ranks, but the job has {world}"
            ));
        }
        if a.coordinates.len() != world {
            return Err(format!(
                "pipeline.coordinates lists {} ranks for a world of {world}",
                a.coordinates.len()
            ));
        }
        if rank >= world {
            return Err(format!("rank {rank} is outside the job's world of {world}"));
        }
        let mut world_of = HashMap::with_capacity(world);
        let mut coordinates = Vec::with_capacity(world);
        for (g, c) in a.coordinates.iter().enumerate() {
            let c = Coordinates::from(c);
            if c.pipeline_rank >= pipeline_ranks || c.ep_rank >= ep || c.dp_replica >= dp {
                return Err(format!("pipeline.coordinates[{g}] = {c:?} is outside the layout"));
            }
            if world_of.insert(c, g).is_some() {
                return Err(format!("pipeline.coordinates[{g}] = {c:?} is given to two ranks"));
            }
            coordinates.push(c);
        }
        if a.stages.len() != pp as usize {
            return Err(format!("pipeline.stages lists {} stages, the layout has pp = {pp}", a.stages.len()));
        }
        let mut next_layer = 0u32;
        let mut stage_layers = Vec::with_capacity(a.stages.len());
        for (s, st) in a.stages.iter().enumerate() {
            if st.stage as usize != s || st.first_layer != next_layer || st.layers == 0 {
                return Err(format!(
                    "pipeline.stages[{s}] = (stage {}, layers {}..{}) does not continue the stages before it",
                    st.stage,
                    st.first_layer,
                    st.first_layer.saturating_add(st.layers)
                ));
            }
            next_layer += st.layers;
            stage_layers.push(st.layers as usize);
        }
        if next_layer as usize != model.num_hidden_layers {
            return Err(format!(
                "pipeline.stages cover {next_layer} layers, the model has num_hidden_layers = {}",
                model.num_hidden_layers
            ));
        }
        if model.n_routed_experts > 0 && !model.n_routed_experts.is_multiple_of(ep as usize) {
            return Err(format!(
                "pipeline.layout.ep = {ep} does not divide the model's n_routed_experts = {}",
                model.n_routed_experts
            ));
        }
        let stream = a
            .stream
            .iter()
            .enumerate()
            .map(|(i, op)| Instruction::try_from(op).map_err(|e| format!("pipeline.stream[{i}]: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut plan =
            PipelinePlan { parallel, stage_layers, coordinates, rank, stream, nodes: Vec::new(), world_of };
        let me = plan.coordinates[rank];
        let hosted = plan.stages_of(me.pipeline_rank);
        for (i, op) in plan.stream.iter().enumerate() {
            for c in op.computed() {
                if c.micro_batch >= micro_batches || !hosted.contains(&(c.stage as usize)) {
                    return Err(format!(
                        "pipeline.stream[{i}] ({op}) names micro-batch {} of {micro_batches} and stage {}, but pipeline rank {} hosts stages {hosted:?}",
                        c.micro_batch, c.stage, me.pipeline_rank
                    ));
                }
            }
            if let Some((chunk, peer)) = op.transfer()
                && (peer >= pipeline_ranks || chunk.stage >= pp || chunk.micro_batch >= micro_batches)
            {
                return Err(format!("pipeline.stream[{i}] ({op}) is outside the layout"));
            }
        }
        plan.stream.shrink_to_fit();
        Ok(plan)
    }

    /// Sets the node of every world rank (the assignment's peers' node ids), which decides
    /// which MoE traffic crosses nodes.
    pub fn with_nodes(mut self, nodes: Vec<String>) -> Result<Self, String> {
        if nodes.len() != self.coordinates.len() {
            return Err(format!("{} node ids for {} ranks", nodes.len(), self.coordinates.len()));
        }
        self.nodes = nodes;
        Ok(self)
    }

    /// Whether world ranks `a` and `b` are on one node (all are, when no nodes were set).
    pub fn same_node(&self, a: usize, b: usize) -> bool {
        self.nodes.is_empty() || self.nodes[a] == self.nodes[b]
    }

    /// This rank's coordinates.
    pub fn me(&self) -> Coordinates {
        self.coordinates[self.rank]
    }

    /// The world rank at `c`.
    pub fn world_rank(&self, c: Coordinates) -> usize {
        self.world_of[&c]
    }

    /// The pipeline ranks hosting `stage` (see the module docs).
    pub fn hosts(&self, stage: usize) -> Vec<u32> {
        u32::try_from(stage)
            .map_or_else(|_| Vec::new(), |s| self.parallel.schedule.hosts(self.parallel.pp, s))
    }

    /// The stages pipeline rank `r` hosts.
    pub fn stages_of(&self, r: u32) -> Vec<usize> {
        self.parallel.schedule.stages_of(self.parallel.pp, r).into_iter().map(|s| s as usize).collect()
    }

    /// The EP group of this rank: world ranks in EP-rank order.
    pub(super) fn ep_group(&self) -> Vec<usize> {
        let me = self.me();
        (0..self.parallel.ep).map(|e| self.world_rank(Coordinates { ep_rank: e, ..me })).collect()
    }

    /// The pipeline index of this rank's replica, `ep_rank + ep·dp_replica`.
    pub(super) fn pipeline_index(&self) -> u64 {
        self.me().pipeline_index(self.parallel.ep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_layout::{Chunk, ScheduleKind, coordinates};
    use flotilla_model::Preset;
    use flotilla_proto::v1::{Layout, RankCoordinates, ScheduledOp, StageLayers};

    /// A DualPipe pp 2 assignment for world rank 0 of 2 on `model`, with an empty stream.
    fn assignment(model: &ModelConfig) -> PipelineAssignment {
        let parallel = ParallelConfig {
            pp: 2,
            ep: 1,
            dp: 1,
            schedule: ScheduleKind::DualPipe,
            micro_batches: 4,
            overlap: false,
        };
        let layers = model.num_hidden_layers as u32;
        PipelineAssignment {
            layout: Some(parallel.layout()),
            coordinates: (0..2).map(|g| RankCoordinates::from(coordinates(g, 1, 1))).collect(),
            stages: vec![
                StageLayers { stage: 0, first_layer: 0, layers: layers / 2 },
                StageLayers { stage: 1, first_layer: layers / 2, layers: layers - layers / 2 },
            ],
            stream: Vec::new(),
        }
    }

    #[test]
    fn the_plan_takes_the_layout_and_its_rules_from_the_assignment() {
        let model = Preset::Tiny.config();
        let mut a = assignment(&model);
        a.stream = vec![
            ScheduledOp::from(Instruction::Forward { chunk: Chunk::new(0, 1) }),
            ScheduledOp::from(Instruction::SendActivation { chunk: Chunk::new(0, 1), peer: 1 }),
        ];
        let plan = PipelinePlan::from_assignment(&a, 0, 2, &model).unwrap();
        assert_eq!(plan.parallel.schedule, ScheduleKind::DualPipe);
        assert!(!plan.parallel.overlap, "overlap travels in the layout");
        // DualPipe: rank 0 hosts stages 0 and 1, each stage has both ranks.
        assert_eq!(plan.stages_of(0), vec![0, 1]);
        assert_eq!(plan.hosts(1), vec![0, 1]);
        assert_eq!(plan.stream.len(), 2);
    }

    #[test]
    fn the_plan_refuses_a_layout_the_rules_refuse() {
        let model = Preset::Tiny.config();
        let refusal = |edit: &dyn Fn(&mut Layout)| {
            let mut a = assignment(&model);
            edit(a.layout.as_mut().unwrap());
            PipelinePlan::from_assignment(&a, 0, 2, &model).unwrap_err()
        };
        let err = refusal(&|l| l.schedule_kind = 0);
        assert_eq!(err, "pipeline.layout.schedule_kind: the schedule kind is unspecified");
        let err = refusal(&|l| l.schedule_kind = 9);
        assert!(err.contains("pipeline.layout.schedule_kind") && err.contains("9"), "{err}");
        let err = refusal(&|l| {
            l.schedule_kind = flotilla_proto::v1::ScheduleKind::DualPipeV as i32;
            l.pp = 3;
        });
        assert!(err.starts_with("pipeline.layout.pp: DualPipeV needs an even pp"), "{err}");
        // DualPipeV runs pp 2 on one pipeline rank, not the job's two.
        let err = refusal(&|l| l.schedule_kind = flotilla_proto::v1::ScheduleKind::DualPipeV as i32);
        assert!(err.contains("1 pipeline ranks × ep 1 × dp 1 = 1 ranks, but the job has 2"), "{err}");

        let mut a = assignment(&model);
        a.stream = vec![ScheduledOp { kind: 42, ..ScheduledOp::default() }];
        let err = PipelinePlan::from_assignment(&a, 0, 2, &model).unwrap_err();
        assert_eq!(err, "pipeline.stream[0]: kind 42 is not an instruction kind");
        a.stream = vec![ScheduledOp::from(Instruction::RecvGrad { chunk: Chunk::new(0, 1), peer: 2 })];
        let err = PipelinePlan::from_assignment(&a, 0, 2, &model).unwrap_err();
        assert!(err.contains("is outside the layout"), "{err}");
        assert!(PipelinePlan::from_assignment(&assignment(&model), 2, 2, &model).is_err());
    }
}
