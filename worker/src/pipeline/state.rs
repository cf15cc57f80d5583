//! A rank's state: its checkpoint shard ([`PipelineTrainer::snapshot`],
//! [`PipelineTrainer::restore`]) and the whole model's weights assembled on rank 0
//! ([`PipelineTrainer::save`]).
//!
//! # Checkpoints
//! [`PipelineTrainer::snapshot`] copies what this rank alone knows plus its share of what
//! it knows with others: for every holder group, the values and the BF16 moments of its
//! ZeRO-1 part (the values are current on every member after the all-gather, so the part
//! is as good as any), cut at tensor boundaries into pieces named by the tensors' global
//! names and start elements; and the selection biases whole, by their first holder. Over
//! the job's ranks the pieces cover every element of the model once, so the shards
//! together are the whole state, in a form any layout can read
//! ([`flotilla_model::shard::CheckpointReader`] assembles whole tensors by name).
//! [`PipelineTrainer::restore`] reads every held tensor and this member's part of each
//! group's moments from such a checkpoint, whatever layout wrote it.

use std::collections::HashMap;
use std::ops::Range;

use bytes::Bytes;
use flotilla_model::config::ModelConfig;
use flotilla_model::pipeline::RankModel;
use flotilla_model::shard::{CheckpointReader, Piece, PieceData, PieceKind, ShardHeader, Snapshot};
use tokio::runtime::Handle;

use super::zero1::HolderKey;
use super::{PipelinePlan, PipelineTrainer, decode_f32};
use crate::comm::{Communicator, chunk_range};
use crate::tags::SAVE_TAG;

impl PipelineTrainer {
    /// This rank's shard of a checkpoint of the state after step [`PipelineTrainer::step`]
    /// (see *Checkpoints* in the module docs): for every holder group, the values and the
    /// AdamW moments of this member's ZeRO-1 part, cut at tensor boundaries into pieces
    /// named by the tensors' global names; and, whole, the untrainable tensors (selection
    /// biases) this rank is the first holder of. Across the job's ranks the pieces cover
    /// every element of the model exactly once. A copy: training may go on while it is
    /// written.
    pub fn snapshot(&self) -> Snapshot {
        let params = self.model.params();
        let rank = self.plan.rank;
        let mut pieces = Vec::new();
        for g in &self.groups {
            let index = g.members.iter().position(|&r| r == rank).expect("a member of its own groups");
            let part = chunk_range(g.len, g.members.len(), index);
            let mut offset = 0;
            for &i in &g.params {
                let p = params[self.trainable_at[i]];
                let range = offset..offset + p.len();
                offset = range.end;
                let Some((tensor, moments)) = overlap(&range, &part) else { continue };
                let piece = |kind, data| Piece {
                    name: p.name.clone(),
                    kind,
                    start: tensor.start,
                    shape: p.shape.clone(),
                    data,
                };
                pieces.push(piece(PieceKind::Value, PieceData::F32(p.value.host()[tensor.clone()].to_vec())));
                pieces.push(piece(PieceKind::ExpAvg, PieceData::Bf16(g.m[moments.clone()].to_vec())));
                pieces.push(piece(PieceKind::ExpAvgSq, PieceData::Bf16(g.v[moments].to_vec())));
            }
        }
        for &j in &self.untrainable_first {
            pieces.push(Piece::value_of(params[j]));
        }
        Snapshot {
            header: ShardHeader {
                step: self.step,
                rank: rank as u32,
                world: self.plan.coordinates.len() as u32,
                seed: self.config.seed,
                model: self.model.config().clone(),
            },
            pieces,
        }
    }

    /// Loads a checkpoint written by any layout (a pipeline job's ranks or single-process
    /// [`flotilla_model::train::Trainer::snapshot`]s): the model must be this one's and its
    /// seed the run's `seed`; then every held tensor's value and, for every holder group,
    /// this member's part of the AdamW moments, and the step. All or nothing: everything is
    /// read and checked before anything is assigned, so on an error the trainer is as it
    /// was.
    pub fn restore(&mut self, reader: &CheckpointReader) -> Result<(), String> {
        reader.check_model(self.model.config()).map_err(|e| e.to_string())?;
        if reader.seed() != self.config.seed {
            return Err(format!(
                "the checkpoint was trained with seed {}, the run's `seed` is {}",
                reader.seed(),
                self.config.seed
            ));
        }
        let biases: std::collections::HashSet<String> = self
            .model
            .moe_layers_mut()
            .into_iter()
            .map(|(_, moe)| moe.e_score_correction_bias.name.clone())
            .collect();
        let params = self.model.params();
        let mut values = Vec::with_capacity(params.len());
        let mut index_of = HashMap::with_capacity(params.len());
        for (j, p) in params.iter().enumerate() {
            if self.trainable_at.binary_search(&j).is_err() && !biases.contains(&p.name) {
                return Err(format!(
                    "{} is neither trained nor a selection bias: it cannot be restored",
                    p.name
                ));
            }
            if let Some(shape) = reader.shape(&p.name).filter(|&shape| shape != p.shape.as_slice()) {
                return Err(format!(
                    "tensor `{}` has shape {shape:?} in the checkpoint, this rank holds it as {:?}",
                    p.name, p.shape
                ));
            }
            values.push(reader.values(&p.name, p.len()).map_err(|e| e.to_string())?);
            index_of.insert(p.name.clone(), j);
        }
        let rank = self.plan.rank;
        let mut moments = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            let index = g.members.iter().position(|&r| r == rank).expect("a member of its own groups");
            let part = chunk_range(g.len, g.members.len(), index);
            let (mut m, mut v) = (Vec::with_capacity(part.len()), Vec::with_capacity(part.len()));
            let mut offset = 0;
            for &i in &g.params {
                let p = params[self.trainable_at[i]];
                let range = offset..offset + p.len();
                offset = range.end;
                let Some((tensor, _)) = overlap(&range, &part) else { continue };
                let (pm, pv) = reader.moments(&p.name, p.len()).map_err(|e| e.to_string())?;
                if pm.len() != p.len() || pv.len() != p.len() {
                    return Err(format!(
                        "{}: the checkpoint's moments have {} and {} elements, the tensor {}",
                        p.name,
                        pm.len(),
                        pv.len(),
                        p.len()
                    ));
                }
                m.extend_from_slice(&pm[tensor.clone()]);
                v.extend_from_slice(&pv[tensor]);
            }
            moments.push((m, v));
        }
        drop(params);

        // Everything read: assign.
        // Each of `values` has its tensor's length (the reader assembles exactly `p.len()`),
        // so no `set_value` fails and the restore stays all or nothing.
        for (i, p) in self.model.trainable_params_mut().into_iter().enumerate() {
            p.set_value(&values[self.trainable_at[i]]).map_err(|e| e.to_string())?;
        }
        for (_, moe) in self.model.moe_layers_mut() {
            let bias = &mut moe.e_score_correction_bias;
            if let Some(&j) = index_of.get(&bias.name) {
                bias.set_value(&values[j]).map_err(|e| e.to_string())?;
            }
        }
        for (g, (m, v)) in self.groups.iter_mut().zip(moments) {
            g.m = m;
            g.v = v;
        }
        self.step = reader.step();
        Ok(())
    }
}

/// Where the tensor at `range` of a holder group's flattened tensors meets the part
/// `part`: the overlap as a range of the tensor's elements and as a range of the part's.
fn overlap(range: &Range<usize>, part: &Range<usize>) -> Option<(Range<usize>, Range<usize>)> {
    let (lo, hi) = (range.start.max(part.start), range.end.min(part.end));
    (lo < hi).then(|| (lo - range.start..hi - range.start, lo - part.start..hi - part.start))
}

impl PipelineTrainer {
    /// Writes the whole model's weights to `dir` in the HF layout: every rank sends the
    /// tensors it is first to hold to world rank 0, which assembles and writes them. Every
    /// rank of the job must call it. Blocking, like [`PipelineTrainer::run_step`].
    pub fn save<C: Communicator>(
        &self,
        comm: &C,
        handle: &Handle,
        dir: &std::path::Path,
        dtype: flotilla_model::checkpoint::WeightDtype,
    ) -> Result<(), String> {
        let mine = self.first_held()?;
        if self.plan.rank != 0 {
            let mut bytes = Vec::new();
            for p in &mine {
                encode_tensor(&mut bytes, &p.name, p.value.host());
            }
            return handle
                .block_on(comm.send(0, SAVE_TAG, Bytes::from(bytes)))
                .map_err(|e| format!("sending this rank's tensors to rank 0: {e}"));
        }
        let mut values: HashMap<String, Vec<f32>> =
            mine.iter().map(|p| (p.name.clone(), p.value.to_host_vec())).collect();
        for from in 1..self.plan.coordinates.len() {
            let bytes = handle
                .block_on(comm.recv(from, SAVE_TAG))
                .map_err(|e| format!("receiving rank {from}'s tensors: {e}"))?;
            decode_tensors(&bytes, &mut values).map_err(|e| format!("rank {from}'s tensors: {e}"))?;
        }
        let mut model = flotilla_model::Model::<f32>::new(self.model.config(), self.config.seed, false)
            .map_err(|e| e.to_string())?;
        for p in model.params_mut() {
            let value = values.remove(&p.name).ok_or_else(|| format!("no rank sent {}", p.name))?;
            p.set_value(&value).map_err(|e| format!("rank 0 assembling the model: {e}"))?;
        }
        if let Some(extra) = values.keys().next() {
            return Err(format!("a rank sent {extra}, which the model does not have"));
        }
        flotilla_model::train::save_model(&model, dir, dtype, self.config.shard_size())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// The checkpoint's view of `model`'s tensors: `trainable_at[i]`, the index in
/// `RankModel::params` of trainable tensor `i`; and the indices of the untrainable tensors
/// (selection biases) this rank is the first holder of.
pub(super) fn checkpoint_indices(
    model: &mut RankModel<f32>,
    plan: &PipelinePlan,
    model_config: &ModelConfig,
) -> Result<(Vec<usize>, Vec<usize>), String> {
    // Both lists are in the model's order, the trainable one without selection biases.
    let trainable_at = {
        let names: Vec<String> = model.trainable_params_mut().iter().map(|p| p.name.clone()).collect();
        let all = model.params();
        let mut at = Vec::with_capacity(names.len());
        let mut next = 0;
        for name in &names {
            let j = (next..all.len())
                .find(|&j| all[j].name == *name)
                .ok_or_else(|| format!("the trainable tensor {name} is not among the held ones"))?;
            at.push(j);
            next = j + 1;
        }
        at
    };
    // The tensors no optimizer updates (selection biases) that this rank is the first
    // holder of: what it writes of them to a checkpoint.
    let untrainable_first = {
        let all = model.params();
        let mut out = Vec::new();
        for (j, p) in all.iter().enumerate() {
            if trainable_at.binary_search(&j).is_ok() {
                continue;
            }
            let members = HolderKey::of(&p.name, plan, model_config)?.members(plan, model_config);
            if members.first() == Some(&plan.rank) {
                out.push(j);
            }
        }
        out
    };
    Ok((trainable_at, untrainable_first))
}

/// `[name length u32][name][value count u64][f32 values]`, little-endian.
fn encode_tensor(out: &mut Vec<u8>, name: &str, values: &[f32]) {
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(values.len() as u64).to_le_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn decode_tensors(mut bytes: &[u8], into: &mut HashMap<String, Vec<f32>>) -> Result<(), String> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if bytes.len() < n {
            return Err(format!("truncated: {} bytes left where {n} were expected", bytes.len()));
        }
        let (head, tail) = bytes.split_at(n);
        *bytes = tail;
        Ok(head)
    }
    while !bytes.is_empty() {
        let len = u32::from_le_bytes(take(&mut bytes, 4)?.try_into().expect("4 bytes")) as usize;
        let name = std::str::from_utf8(take(&mut bytes, len)?)
            .map_err(|_| "a tensor name is not UTF-8".to_string())?;
        let count = u64::from_le_bytes(take(&mut bytes, 8)?.try_into().expect("8 bytes"));
        let size =
            usize::try_from(count).ok().and_then(|c| c.checked_mul(4)).ok_or("a tensor is too large")?;
        let values = decode_f32(take(&mut bytes, size)?).expect("a multiple of 4 bytes");
        if into.insert(name.to_string(), values).is_some() {
            return Err(format!("{name} was sent twice"));
        }
    }
    Ok(())
}
