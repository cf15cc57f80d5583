//! The end of a step: holder groups (the ranks holding the same tensors), the gradients'
//! reduce-scatter within each group, one world all-reduce of the statistics, and ZeRO-1:
//! AdamW on this member's part of each group, then the group's all-gather.
//!
//! # Steps 3 to 5 of [`PipelineTrainer::run_step`]
//! 3. Gradients: each trainable tensor belongs to a *holder group*: the ranks that hold
//!    it (the hosts of its stage in every pipeline; for routed experts, only the pipelines
//!    of the owning EP rank). Each group's gradients are flattened and reduce-scattered over
//!    its members (member `i` ends with the sums of the `i`-th equal part, the same bits an
//!    all-reduce would give it) and divided by the number of micro-batches in the global
//!    batch; the other parts are zeroed.
//! 4. One world all-reduce in f64 carries the gradients' sum of squares (each element
//!    counted by the member whose part holds it), the token-weighted losses and the expert
//!    loads; every rank then knows the global norm, the step's losses and the global
//!    loads, so the clipping factor and the selection-bias updates agree everywhere.
//! 5. ZeRO-1: within each holder group, member `i` keeps the AdamW moments of the `i`-th
//!    equal part of the group's flattened tensors only, updates that part, and the group
//!    all-gathers the updated values. Element-wise AdamW makes this bit-identical to every
//!    member updating everything.

use std::collections::BTreeMap;

use flotilla_kernels::backend::Backend;
use flotilla_layout::Coordinates;
use flotilla_model::config::ModelConfig;
use flotilla_model::pipeline::RankModel;
use tokio::runtime::Handle;

use super::executor::Tally;
use super::{PipelineError, PipelinePlan, PipelineTrainer, decode_f32, encode_f32};
use crate::comm::{Communicator, Group, GroupTransport, chunk_range};

/// A group of tensors with the same holders: what one all-reduce and one ZeRO-1 shard
/// cover.
pub(super) struct HolderGroup {
    /// The group id on the data plane (the same on every member).
    pub(super) id: u32,
    /// World ranks holding the tensors, ascending.
    pub(super) members: Vec<usize>,
    /// Indices into `RankModel::trainable_params_mut`.
    pub(super) params: Vec<usize>,
    /// Total elements.
    pub(super) len: usize,
    /// AdamW moments of this rank's part of the flattened tensors.
    pub(super) m: Vec<half::bf16>,
    pub(super) v: Vec<half::bf16>,
}

/// Which ranks hold a tensor (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum HolderKey {
    /// `model.embed_tokens`: the hosts of stage 0, and of the last stage when MTP modules
    /// or a tied head read it.
    Embedding,
    /// A stage's tensors other than routed experts.
    Stage(usize),
    /// The routed experts of `stage` owned by `ep_rank`.
    Experts { stage: usize, ep_rank: u32 },
}

/// The most holder groups a layout may need: group ids share the data plane's 14-bit
/// group field with the world communicator (id 0).
const MAX_GROUP_ID: u32 = (1 << 14) - 1;

impl HolderKey {
    /// The key of the tensor named `name` (HF names, see `flotilla_model::model`).
    pub(super) fn of(name: &str, plan: &PipelinePlan, config: &ModelConfig) -> Result<HolderKey, String> {
        let last = plan.parallel.pp as usize - 1;
        match name {
            "model.embed_tokens.weight" => return Ok(HolderKey::Embedding),
            "model.norm.weight" | "lm_head.weight" => return Ok(HolderKey::Stage(last)),
            _ => {}
        }
        let rest = name.strip_prefix("model.layers.").ok_or_else(|| format!("unexpected tensor {name}"))?;
        let (layer, rest) = rest.split_once('.').ok_or_else(|| format!("unexpected tensor {name}"))?;
        let layer: usize = layer.parse().map_err(|_| format!("unexpected tensor {name}"))?;
        let stage = if layer >= config.num_hidden_layers {
            last
        } else {
            let mut first = 0;
            plan.stage_layers
                .iter()
                .position(|&n| {
                    first += n;
                    layer < first
                })
                .ok_or_else(|| format!("layer {layer} of {name} is in no stage"))?
        };
        if let Some(expert) = rest.strip_prefix("mlp.experts.") {
            let e: usize = expert
                .split_once('.')
                .and_then(|(e, _)| e.parse().ok())
                .ok_or_else(|| format!("unexpected tensor {name}"))?;
            let per_rank = config.n_routed_experts / plan.parallel.ep as usize;
            return Ok(HolderKey::Experts { stage, ep_rank: (e / per_rank) as u32 });
        }
        Ok(HolderKey::Stage(stage))
    }

    /// The group id every member derives alike.
    fn id(self, plan: &PipelinePlan) -> Result<u32, String> {
        let id = match self {
            HolderKey::Embedding => 1,
            HolderKey::Stage(s) => 2 + s as u64,
            HolderKey::Experts { stage, ep_rank } => {
                2 + u64::from(plan.parallel.pp)
                    + stage as u64 * u64::from(plan.parallel.ep)
                    + u64::from(ep_rank)
            }
        };
        u32::try_from(id).ok().filter(|&id| id <= MAX_GROUP_ID).ok_or_else(|| {
            format!("the layout needs {id} gradient groups, above the data plane's {MAX_GROUP_ID}")
        })
    }

    /// World ranks holding the tensors, ascending.
    pub(super) fn members(self, plan: &PipelinePlan, config: &ModelConfig) -> Vec<usize> {
        let last = plan.parallel.pp as usize - 1;
        let (pipeline_ranks, ep_ranks): (Vec<u32>, Vec<u32>) = match self {
            HolderKey::Embedding => {
                let mut ranks = plan.hosts(0);
                if config.num_nextn_predict_layers > 0 || config.tie_word_embeddings {
                    ranks.extend(plan.hosts(last));
                }
                (ranks, (0..plan.parallel.ep).collect())
            }
            HolderKey::Stage(s) => (plan.hosts(s), (0..plan.parallel.ep).collect()),
            HolderKey::Experts { stage, ep_rank } => (plan.hosts(stage), vec![ep_rank]),
        };
        let mut members: Vec<usize> = pipeline_ranks
            .iter()
            .flat_map(|&pipeline_rank| {
                ep_ranks.iter().flat_map(move |&ep_rank| {
                    (0..plan.parallel.dp).map(move |dp_replica| Coordinates {
                        pipeline_rank,
                        ep_rank,
                        dp_replica,
                    })
                })
            })
            .map(|c| plan.world_rank(c))
            .collect();
        members.sort_unstable();
        members.dedup();
        members
    }
}

/// The holder groups of the tensors `model` holds, by id: the same on every member.
pub(super) fn holder_groups(
    model: &mut RankModel<f32>,
    plan: &PipelinePlan,
    model_config: &ModelConfig,
) -> Result<Vec<HolderGroup>, String> {
    let mut by_key: BTreeMap<HolderKey, Vec<usize>> = BTreeMap::new();
    let mut lens = Vec::new();
    for (i, p) in model.trainable_params_mut().into_iter().enumerate() {
        by_key.entry(HolderKey::of(&p.name, plan, model_config)?).or_default().push(i);
        lens.push(p.len());
    }
    let mut groups = Vec::with_capacity(by_key.len());
    for (key, params) in by_key {
        let members = key.members(plan, model_config);
        if !members.contains(&plan.rank) {
            return Err(format!("this rank holds {key:?} but is not among its holders {members:?}"));
        }
        let len: usize = params.iter().map(|&i| lens[i]).sum();
        let index = members.iter().position(|&r| r == plan.rank).expect("checked above");
        let part = chunk_range(len, members.len(), index).len();
        groups.push(HolderGroup {
            id: key.id(plan)?,
            members,
            params,
            len,
            m: vec![half::bf16::ZERO; part],
            v: vec![half::bf16::ZERO; part],
        });
    }
    groups.sort_by_key(|g| g.id);
    Ok(groups)
}

impl PipelineTrainer {
    /// Sums each holder group's gradients over its members and divides by the global
    /// micro-batch count; then one world all-reduce of the squared norm, the losses and the
    /// loads. Returns the global squared gradient norm and the step's statistics.
    pub(super) fn reduce<C: GroupTransport>(
        &mut self,
        step: u64,
        groups: &[Option<Group<&C>>],
        comm: &C,
        handle: &Handle,
        tally: Tally,
    ) -> Result<(f64, flotilla_model::StepStats), PipelineError> {
        let divisor = self.global_micro_batches() as f32;
        let rank = self.plan.rank;
        let mut sumsq = 0.0f64;
        for (g, group) in self.groups.iter().zip(groups) {
            let mut params = self.model.trainable_params_mut();
            let mut flat = Vec::with_capacity(g.len);
            for &i in &g.params {
                flat.extend_from_slice(params[i].grad.host());
            }
            // ZeRO-1 needs only this member's part of the summed gradients.
            if let Some(group) = group {
                handle.block_on(group.reduce_scatter_sum(&mut flat)).map_err(|source| {
                    PipelineError::Comm {
                        step,
                        what: format!(
                            "reduce-scatter of gradient group {} over world ranks {:?}",
                            g.id, g.members
                        ),
                        source,
                    }
                })?;
            }
            let index = g.members.iter().position(|&r| r == rank).expect("a member of its own groups");
            let part = chunk_range(g.len, g.members.len(), index);
            // This member's part, divided; the rest (other members' parts, unreduced here)
            // zeroed, so no tensor holds a gradient that is not the step's.
            let mut offset = 0;
            for &i in &g.params {
                for (j, dst) in params[i].grad.host_mut().iter_mut().enumerate() {
                    *dst = if part.contains(&(offset + j)) { flat[offset + j] / divisor } else { 0.0 };
                }
                offset += params[i].grad.len();
            }
            // Each element of the group is counted by the one member whose part holds it.
            sumsq += flat[part].iter().map(|&x| f64::from(x / divisor).powi(2)).sum::<f64>();
        }

        // [sumsq, tokens, main_ce·t, balance·t, mtp_ce·t.., loads..]
        let depth = self.model.config().num_nextn_predict_layers;
        let mut packed = vec![sumsq, tally.tokens, tally.main_ce, tally.balance];
        packed.extend((0..depth).map(|k| tally.mtp_ce.get(k).copied().unwrap_or(0.0)));
        for layer in &tally.loads {
            packed.extend(layer.iter().map(|&n| n as f64));
        }
        handle.block_on(comm.all_reduce_sum_f64(&mut packed)).map_err(|source| PipelineError::Comm {
            step,
            what: "all-reduce of the step statistics".into(),
            source,
        })?;
        let tokens = packed[1];
        if tokens.is_nan() || tokens <= 0.0 {
            return Err(PipelineError::Step {
                step,
                detail: format!("the ranks scored {tokens} positions in all"),
            });
        }
        let mean = |x: f64| x / tokens;
        let mtp_ce: Vec<f64> = packed[4..4 + depth].iter().map(|&x| mean(x)).collect();
        let main_ce = mean(packed[2]);
        let balance_loss = mean(packed[3]);
        let mtp_mean = if depth > 0 { mtp_ce.iter().sum::<f64>() / depth as f64 } else { 0.0 };
        let n = self.model.config().n_routed_experts;
        let expert_loads = packed[4 + depth..]
            .chunks(n.max(1))
            .map(|c| c.iter().map(|&x| x as u64).collect())
            .take(self.moe_layers.len())
            .collect();
        let stats = flotilla_model::StepStats {
            loss: main_ce + self.config.loss.mtp_lambda * mtp_mean + balance_loss,
            main_ce,
            mtp_ce,
            balance_loss,
            tokens: tokens as usize,
            moe_layers: self.moe_layers.clone(),
            expert_loads,
        };
        Ok((packed[0], stats))
    }

    /// ZeRO-1: each member of a holder group clips and updates its part of the group's
    /// flattened tensors with AdamW, then the group all-gathers the updated values.
    pub(super) fn update<C: GroupTransport>(
        &mut self,
        step: u64,
        groups: &[Option<Group<&C>>],
        handle: &Handle,
        lr: f32,
        scale: f32,
    ) -> Result<(), PipelineError> {
        let rank = self.plan.rank;
        let (adamw, be) = (self.config.optimizer.adamw, self.model.backend());
        for (g, group) in self.groups.iter_mut().zip(groups) {
            let mut params = self.model.trainable_params_mut();
            let index = g.members.iter().position(|&r| r == rank).expect("a member of its own groups");
            let part = chunk_range(g.len, g.members.len(), index);
            // Walk the tensors, updating where they overlap this rank's part.
            let mut offset = 0;
            let mut updated = Vec::with_capacity(part.len());
            for &i in &g.params {
                let p = &mut params[i];
                let range = offset..offset + p.len();
                offset = range.end;
                let (lo, hi) = (range.start.max(part.start), range.end.min(part.end));
                if lo >= hi {
                    continue;
                }
                let (a, b) = (lo - range.start, hi - range.start);
                let (ma, mb) = (lo - part.start, hi - part.start);
                if scale != 1.0 {
                    p.grad.host_mut()[a..b].iter_mut().for_each(|x| *x *= scale);
                }
                let decay = p.shape.len() >= 2;
                be.adamw_step(
                    &mut p.value.host_mut()[a..b],
                    &p.grad.host()[a..b],
                    &mut g.m[ma..mb],
                    &mut g.v[ma..mb],
                    step,
                    lr,
                    &adamw,
                    decay,
                )
                .map_err(|e| PipelineError::Step { step, detail: format!("AdamW on {}: {e}", p.name) })?;
                updated.extend_from_slice(&p.value.host()[a..b]);
            }
            let Some(group) = group else { continue };
            let parts = handle.block_on(group.all_gather(encode_f32(&updated))).map_err(|source| {
                PipelineError::Comm { step, what: format!("all-gather of parameter group {}", g.id), source }
            })?;
            let mut flat = Vec::with_capacity(g.len);
            for (member, bytes) in parts.iter().enumerate() {
                let values = decode_f32(bytes)
                    .filter(|v| v.len() == chunk_range(g.len, g.members.len(), member).len());
                let values = values.ok_or_else(|| PipelineError::Step {
                    step,
                    detail: format!(
                        "world rank {} sent a part of parameter group {} of the wrong size ({} bytes)",
                        g.members[member],
                        g.id,
                        bytes.len()
                    ),
                })?;
                flat.extend(values);
            }
            let mut rest = flat.as_slice();
            for &i in &g.params {
                let p = &mut params[i];
                let (mine, tail) = rest.split_at(p.len());
                p.value.host_mut().copy_from_slice(mine);
                rest = tail;
            }
        }
        Ok(())
    }

    /// Every held tensor (selection biases included) that this rank is the first holder
    /// of: together, the ranks' lists name each tensor of the model once.
    pub(super) fn first_held(&self) -> Result<Vec<&flotilla_model::param::Param<f32>>, String> {
        let config = self.model.config();
        let mut out = Vec::new();
        for p in self.model.params() {
            let members = HolderKey::of(&p.name, &self.plan, config)?.members(&self.plan, config);
            if members.first() == Some(&self.plan.rank) {
                out.push(p);
            }
        }
        Ok(out)
    }
}
