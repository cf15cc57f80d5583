//! Stage assignment: the model's layers cut into contiguous stages ([`split_layers`]), and
//! what each stage holds and costs ([`StagePlan`]).
//!
//! Layers are assigned in order, minimizing the largest stage's forward FLOPs per token
//! (dense and MoE layers differ; the attention core's FLOPs grow with the sequence). The
//! embedding goes on stage 0; the final norm, the output head and the MTP modules (whose
//! block, projection and second pass through the shared head all run after the main model)
//! on the last stage. Under DualPipe rank 0 hosts stages 0 and PP−1, so the first and last
//! ranks each hold the embedding, the head and the MTP modules, and the MTP module's
//! embedding lookup is local (DESIGN §1.4: MTP, head and embedding on the same PP rank).
//! Under schedules whose last stage's rank does not host stage 0 (1F1B, ZB1P), that rank
//! holds a copy of the embedding when the last stage uses it: for the MTP modules' lookup,
//! or as the head's weight when `tie_word_embeddings` is set. That copy and stage 0's are
//! copies of one parameter: one ZeRO-1 group, one gradient sum.
//!
//! Invariant: the stages are contiguous, non-empty and in layer order, and cover every
//! main-model layer once; the embedding is on stage 0, the head and the MTP modules on the
//! last stage.

use super::error::PlanError;
use super::layout::Geometry;
use super::shape::{ModelShape, Part};
use super::time::ChunkTime;
use flotilla_model::ModelConfig;
use serde::{Deserialize, Serialize};

/// One pipeline stage.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StagePlan {
    /// Stage index, in forward order.
    pub stage: u32,
    /// Its first main-model layer (0-based).
    pub first_layer: u32,
    /// Main-model layers it runs (`first_layer..first_layer + layers`); at least one.
    pub layers: u32,
    /// Of those, dense-FFN layers.
    pub dense_layers: u32,
    /// Of those, MoE layers.
    pub moe_layers: u32,
    /// Whether it holds the token embedding.
    pub embedding: bool,
    /// Whether it holds the final norm and the output head.
    pub head: bool,
    /// MTP modules it holds.
    pub mtp_modules: u32,
    /// Pipeline ranks that host it.
    pub ranks: Vec<u32>,
    /// Forward FLOPs per token.
    pub forward_flops_per_token: f64,
    /// Non-expert parameters, held whole by each GPU of a hosting rank.
    pub replicated_parameters: u64,
    /// Routed-expert parameters each GPU holds (its EP shard).
    pub expert_parameters_per_gpu: u64,
    /// Activation bytes one micro-batch leaves cached per GPU until its backward.
    pub activation_bytes: u64,
    /// Forward compute time of one micro-batch, seconds.
    pub forward_compute_seconds: f64,
    /// Forward all-to-all time of one micro-batch, seconds.
    pub forward_all_to_all_seconds: f64,
}

/// A pipeline stage's main-model layers: `first_layer..first_layer + layers`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRange {
    /// The stage's first main-model layer (0-based).
    pub first_layer: u32,
    /// Main-model layers it runs; at least one.
    pub layers: u32,
}

/// Cuts the model's main layers into `stages` contiguous stages of at least one layer each,
/// the way [`plan`](super::plan()) does (see the module docs): the largest stage's forward
/// FLOPs per token at `seq_len` tokens per sequence is minimized, with the embedding counted on stage 0 and
/// the final norm, the head and the MTP modules on the last stage. `stages` counts stages
/// (layer groups), not pipeline ranks.
pub fn split_layers(config: &ModelConfig, seq_len: u32, stages: u32) -> Result<Vec<LayerRange>, PlanError> {
    config.validate()?;
    if stages == 0 {
        return Err(PlanError::ZeroDegree { name: "pp" });
    }
    if seq_len == 0 {
        return Err(PlanError::Shape("the sequence length must be at least 1 token".into()));
    }
    let layers = config.num_hidden_layers;
    if stages as usize > layers {
        return Err(PlanError::TooManyStages { pp: stages, stages: u64::from(stages), layers });
    }
    let split = split(&ModelShape::new(config, seq_len), stages);
    Ok(split
        .starts
        .windows(2)
        .map(|w| LayerRange {
            first_layer: u32::try_from(w[0]).unwrap_or(u32::MAX),
            layers: u32::try_from(w[1] - w[0]).unwrap_or(u32::MAX),
        })
        .collect())
}

/// The stages in forward order: where each starts in the layer list (then the number of
/// layers), and what each holds.
pub(super) struct StageSplit {
    pub(super) starts: Vec<usize>,
    pub(super) parts: Vec<Part>,
}

/// The stage partition: contiguous layers balanced by forward FLOPs, the embedding on
/// the first stage, the head and the MTP modules on the last.
pub(super) fn split(model: &ModelShape, stages: u32) -> StageSplit {
    let costs: Vec<f64> = model.layers.iter().map(|l| l.flops).collect();
    let mut last_extra = model.head;
    for _ in 0..model.mtp_modules {
        last_extra += model.mtp;
    }
    let starts = partition(&costs, stages as usize, model.embedding.flops, last_extra.flops);
    let stages = stages as usize;
    let parts = (0..stages)
        .map(|s| {
            let mut part = Part::default();
            if s == 0 {
                part += model.embedding;
            }
            for layer in &model.layers[starts[s]..starts[s + 1]] {
                part += *layer;
            }
            if s + 1 == stages {
                part += last_extra;
            }
            part
        })
        .collect();
    StageSplit { starts, parts }
}

/// Splits `costs` into `stages` contiguous non-empty runs minimizing the largest run's
/// cost, the first run carrying `first` and the last `last`. Returns each run's start, then
/// `costs.len()`. Needs 1 ≤ `stages` ≤ `costs.len()`.
pub(super) fn partition(costs: &[f64], stages: usize, first: f64, last: f64) -> Vec<usize> {
    let n = costs.len();
    let mut prefix = vec![0.0; n + 1];
    for (i, c) in costs.iter().enumerate() {
        prefix[i + 1] = prefix[i] + c;
    }
    if stages == 1 {
        return vec![0, n];
    }
    // best[s][j]: the least possible largest cost of stages 0..=s holding layers 0..j;
    // from[s][j]: where stage s starts in that split.
    let mut best = vec![vec![f64::INFINITY; n + 1]; stages - 1];
    let mut from = vec![vec![0usize; n + 1]; stages - 1];
    for j in 1..=n {
        best[0][j] = prefix[j] + first;
    }
    for s in 1..stages - 1 {
        for j in s + 1..=n {
            for i in s..j {
                let cost = best[s - 1][i].max(prefix[j] - prefix[i]);
                if cost < best[s][j] {
                    best[s][j] = cost;
                    from[s][j] = i;
                }
            }
        }
    }
    let (mut start, mut least) = (stages - 1, f64::INFINITY);
    for i in stages - 1..n {
        let cost = best[stages - 2][i].max(prefix[n] - prefix[i] + last);
        if cost < least {
            least = cost;
            start = i;
        }
    }
    let mut starts = vec![0; stages + 1];
    starts[stages] = n;
    starts[stages - 1] = start;
    for s in (1..stages - 1).rev() {
        starts[s] = from[s][starts[s + 1]];
    }
    starts
}

pub(super) fn stage_plans(
    model: &ModelShape,
    g: &Geometry,
    split: &StageSplit,
    hosts: &[Vec<u32>],
    times: &[ChunkTime],
) -> Vec<StagePlan> {
    let stages = split.parts.len();
    (0..stages)
        .map(|s| {
            let span = split.starts[s]..split.starts[s + 1];
            let moe_layers = model.moe[span.clone()].iter().filter(|m| **m).count() as u32;
            let part = &split.parts[s];
            let last = s + 1 == stages;
            StagePlan {
                stage: s as u32,
                first_layer: span.start as u32,
                layers: span.len() as u32,
                dense_layers: span.len() as u32 - moe_layers,
                moe_layers,
                embedding: s == 0,
                head: last,
                mtp_modules: if last { model.mtp_modules } else { 0 },
                ranks: hosts[s].clone(),
                forward_flops_per_token: part.flops,
                replicated_parameters: part.replicated,
                expert_parameters_per_gpu: part.routed / g.layout.ep as u64,
                activation_bytes: part.activations * g.tokens,
                forward_compute_seconds: times[s].compute,
                forward_all_to_all_seconds: times[s].all_to_all,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_balances_and_keeps_order() {
        let starts = partition(&[1.0; 8], 4, 0.0, 0.0);
        assert_eq!(starts, vec![0, 2, 4, 6, 8]);
        // A heavy last stage takes fewer layers.
        let starts = partition(&[1.0; 8], 3, 0.0, 2.0);
        assert_eq!(starts[3], 8);
        assert!(starts[3] - starts[2] < starts[1] - starts[0], "{starts:?}");
    }

    #[test]
    fn split_layers_covers_the_model_in_order() {
        let config = flotilla_model::Preset::DeepseekV3_671b.config();
        let stages = split_layers(&config, 4096, 16).unwrap();
        assert_eq!(stages.len(), 16);
        let mut next = 0;
        for s in &stages {
            assert_eq!(s.first_layer, next);
            assert!(s.layers >= 1);
            next += s.layers;
        }
        assert_eq!(next as usize, config.num_hidden_layers);
        // The first stage's 3 dense layers are cheap: it takes more layers than the last,
        // which carries the head and the MTP module.
        assert!(stages[0].layers > stages[15].layers, "{stages:?}");
        assert_eq!(split_layers(&config, 4096, 0), Err(PlanError::ZeroDegree { name: "pp" }));
        assert!(matches!(split_layers(&config, 4096, 62), Err(PlanError::TooManyStages { .. })));
        assert_eq!(split_layers(&config, 4096, 61).unwrap().iter().map(|s| s.layers).max(), Some(1));
    }
}
