//! Packed windows: several samples in one training window, for supervised fine-tuning.
//!
//! A packed window carries, beside its `seq_len + 1 + D` tokens, a [`SampleMask`]: per
//! token the sample (segment) it belongs to and whether it is a loss target (a response
//! token). Two rules follow from it, each with its one home here:
//!
//! - **Attention stays inside a sample.** [`Packing`] turns the segments of a batch's input
//!   positions into spans (row, start, end), and MLA runs its attention core once per span
//!   (the variable-length form of FlashAttention's `cu_seqlens`), forward and backward, so
//!   no query sees a key of another sample and no gradient crosses. RoPE positions restart
//!   at 0 in every span, so a packed sample sees exactly the positions it would see alone.
//!   We chose spans over a block-diagonal mask inside the kernel because the attention
//!   core (and the `Backend` seam) stay unchanged, the result is the unpacked sample's
//!   bit for bit, and no masked key block is ever computed.
//! - **A head scores a position only when its target is a response token of the same
//!   sample** ([`target_counts`]): position `t` of a window predicts token `t + 1 + k`
//!   for head `k` (0 the main head, `k ≥ 1` MTP depth `k`); it counts iff that token is a
//!   target and lies in `t`'s segment. So neither the main head nor an MTP head ever
//!   learns across a boundary, and a position whose MTP input (the embedding of token
//!   `t + k`) comes from the next sample is never scored (its target lies further still);
//!   the positions it reaches through the MTP module's attention come after it in the same
//!   sample, and are not scored either.
//!
//! ## Normalization ([`LossNormalization`])
//! Over the step's whole batch, whatever its split into micro-batches and ranks: `token`
//! weighs each scored position `1/N` (N scored positions of the head in the batch);
//! `sample` takes each sample's mean over its own scored positions, then the mean over the
//! batch's samples that have any. A micro-batch or rank holding `b` of the `B` windows
//! scales its weights by `B / b` ([`BatchCounts`], [`loss_weights`]), since the trainers
//! average the micro-batches' and ranks' gradients as pre-training's means; so the
//! weights of every head sum to 1 over the batch (or are all 0 when nothing counts), the
//! loss terms keep pre-training's scale, and every layout computes the same loss.
//!
//! ## Invariants
//! A mask covers its window token for token, and each segment's tokens are contiguous;
//! [`Packing::new`] checks both and names the window at fault.

use crate::ModelError;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// How a packed batch's per-token losses are averaged (`[data] loss_normalization`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossNormalization {
    /// Every response token of the micro-batch weighs the same.
    #[default]
    Token,
    /// Every sample of the micro-batch weighs the same, whatever its length.
    Sample,
}

/// One packed window's annotations, token for token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SampleMask {
    /// The sample each token belongs to, numbered within the window; padding is a segment
    /// of its own with no target.
    pub segments: Vec<u32>,
    /// Whether each token is a loss target (a response token).
    pub targets: Vec<bool>,
}

/// A packed batch as the layers see it: the windows' masks and the normalization.
#[derive(Clone, Copy, Debug)]
pub struct Sft<'a> {
    /// One mask per window.
    pub masks: &'a [SampleMask],
    /// How the losses are averaged.
    pub normalization: LossNormalization,
    /// The counts of the step's whole batch, when these windows are one micro-batch (or one
    /// rank's share) of it; `None`: the windows are the whole batch.
    pub batch: Option<&'a BatchCounts>,
}

/// What a step's whole batch counts, per head: scored positions (`token`) or samples with
/// any (`sample`), so that every micro-batch and rank weighs its units by the global
/// count and the mean of their losses is the whole batch's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchCounts {
    /// Windows in the batch.
    pub windows: usize,
    /// Units per head: the main head first, then MTP depth `1..=D`.
    pub units: Vec<usize>,
}

impl BatchCounts {
    /// The counts of `masks` (the whole batch) for `heads` heads (`1 + D`).
    pub fn of(masks: &[SampleMask], seq: usize, heads: usize, normalization: LossNormalization) -> Self {
        let units = (1..=heads)
            .map(|offset| samples(masks, seq, offset).iter().map(|s| unit_count(s, normalization)).sum())
            .collect();
        BatchCounts { windows: masks.len(), units }
    }
}

/// A sample's units: its scored positions under `token`, 1 under `sample`.
fn unit_count(positions: &[usize], normalization: LossNormalization) -> usize {
    match normalization {
        LossNormalization::Token => positions.len(),
        LossNormalization::Sample => 1,
    }
}

/// The scored positions (`b·seq + t`) of the head `offset` ahead, grouped by sample; only
/// samples with any.
fn samples(masks: &[SampleMask], seq: usize, offset: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<(usize, u32, Vec<usize>)> = Vec::new();
    for (b, mask) in masks.iter().enumerate() {
        for t in (0..seq).filter(|&t| scored(mask, t, offset)) {
            let seg = mask.segments[t];
            match out.last_mut() {
                Some((row, s, idx)) if *row == b && *s == seg => idx.push(b * seq + t),
                _ => out.push((b, seg, vec![b * seq + t])),
            }
        }
    }
    out.into_iter().map(|(_, _, idx)| idx).collect()
}

/// The attention spans of a packed batch's input positions, and their RoPE positions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packing {
    batch: usize,
    seq: usize,
    /// `(row, positions)` of every segment, in row then position order.
    spans: Vec<(usize, Range<usize>)>,
    /// The position of each input token inside its segment, `[batch·seq]`.
    positions: Vec<usize>,
}

impl Packing {
    /// The spans of the first `seq` tokens of each window; errors if a mask does not cover
    /// its window of `window_len` tokens or a segment is not contiguous.
    pub fn new(masks: &[SampleMask], seq: usize, window_len: usize) -> Result<Packing, ModelError> {
        let mut spans = Vec::new();
        let mut positions = Vec::with_capacity(masks.len() * seq);
        for (b, mask) in masks.iter().enumerate() {
            check_mask(mask, b, window_len)?;
            let segs = &mask.segments[..seq];
            let mut start = 0;
            for t in 1..=seq {
                if t == seq || segs[t] != segs[start] {
                    if spans
                        .iter()
                        .any(|(row, r): &(usize, Range<usize>)| *row == b && segs[r.start] == segs[start])
                    {
                        return Err(ModelError::Tensor {
                            tensor: format!("windows[{b}] segments"),
                            detail: format!("segment {} is not contiguous", segs[start]),
                        });
                    }
                    spans.push((b, start..t));
                    positions.extend(0..t - start);
                    start = t;
                }
            }
        }
        Ok(Packing { batch: masks.len(), seq, spans, positions })
    }

    /// Sequences of the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Input positions per sequence.
    pub fn seq(&self) -> usize {
        self.seq
    }

    /// `(row, positions)` of every sample, in order.
    pub fn spans(&self) -> &[(usize, Range<usize>)] {
        &self.spans
    }

    /// Each input token's position inside its sample (what RoPE rotates by).
    pub fn positions(&self) -> &[usize] {
        &self.positions
    }

    /// The longest span (its positions must fit the rope table).
    pub fn longest(&self) -> usize {
        self.spans.iter().map(|(_, r)| r.len()).max().unwrap_or(0)
    }
}

fn check_mask(mask: &SampleMask, b: usize, window_len: usize) -> Result<(), ModelError> {
    for (what, len) in [("segments", mask.segments.len()), ("targets", mask.targets.len())] {
        if len != window_len {
            return Err(ModelError::Tensor {
                tensor: format!("windows[{b}] {what}"),
                detail: format!("has {len} entries for a window of {window_len} tokens"),
            });
        }
    }
    Ok(())
}

/// Whether position `t` of `mask`'s window is scored by the head `offset` tokens ahead
/// (`offset = 1 + k` for MTP depth `k`, 1 for the main head): the target is a response token
/// of `t`'s sample. The one rule of what a packed head learns.
pub fn scored(mask: &SampleMask, t: usize, offset: usize) -> bool {
    let target = t + offset;
    target < mask.targets.len() && mask.targets[target] && mask.segments[target] == mask.segments[t]
}

/// The counted positions of the head `offset` tokens ahead, per window: `[batch·seq]`.
pub fn target_counts(masks: &[SampleMask], seq: usize, offset: usize) -> Vec<bool> {
    masks.iter().flat_map(|m| (0..seq).map(move |t| scored(m, t, offset))).collect()
}

/// The loss weight of every position `[batch·seq]` for the head `offset` tokens ahead,
/// normalized as the module doc says: over the whole batch, a position weighs
/// `(B / b) / N` (`token`; `N` scored positions in the batch of `B` windows, `b` of them
/// here) or `(B / b) / (S · n_s)` (`sample`; `S` samples with any, `n_s` of its own); so
/// the weights of the whole batch's micro-batches, averaged, sum to 1 (all 0 when nothing
/// counts).
pub fn loss_weights(sft: &Sft<'_>, seq: usize, offset: usize) -> Vec<f64> {
    let groups = samples(sft.masks, seq, offset);
    let local: usize = groups.iter().map(|g| unit_count(g, sft.normalization)).sum();
    let (share, units) = match sft.batch {
        Some(batch) => (
            batch.windows as f64 / sft.masks.len().max(1) as f64,
            batch.units.get(offset - 1).copied().unwrap_or(local),
        ),
        None => (1.0, local),
    };
    let mut weights = vec![0.0; sft.masks.len() * seq];
    if units == 0 {
        return weights;
    }
    for g in &groups {
        let w = match sft.normalization {
            LossNormalization::Token => share / units as f64,
            LossNormalization::Sample => share / (units as f64 * g.len() as f64),
        };
        g.iter().for_each(|&i| weights[i] = w);
    }
    weights
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(segments: &[u32], targets: &[u8]) -> SampleMask {
        SampleMask { segments: segments.to_vec(), targets: targets.iter().map(|&t| t == 1).collect() }
    }

    #[test]
    fn spans_positions_and_weights() {
        // Window of 8 tokens (seq 6, D 1): samples 0 (tokens 0..3), 1 (3..7), padding (7).
        let m = mask(&[0, 0, 0, 1, 1, 1, 1, 2], &[0, 1, 1, 0, 0, 1, 1, 0]);
        let p = Packing::new(std::slice::from_ref(&m), 6, 8).unwrap();
        assert_eq!(p.spans(), &[(0, 0..3), (0, 3..6)]);
        assert_eq!(p.positions(), &[0, 1, 2, 0, 1, 2]);
        // Main head: t predicts t+1: t=0→1 ✓, 1→2 ✓, 2→3 (other sample), 3→4 no, 4→5 ✓, 5→6 ✓.
        assert_eq!(target_counts(std::slice::from_ref(&m), 6, 1), [true, true, false, false, true, true]);
        // MTP depth 1: t predicts t+2: 0→2 ✓, 1→3 ✗, 3→5 ✓, 4→6 ✓, 5→7 padding ✗.
        assert_eq!(target_counts(std::slice::from_ref(&m), 6, 2), [true, false, false, true, true, false]);
        let tok = loss_weights(
            &Sft { masks: std::slice::from_ref(&m), normalization: LossNormalization::Token, batch: None },
            6,
            1,
        );
        assert_eq!(tok, [0.25, 0.25, 0.0, 0.0, 0.25, 0.25]);
        let m2 = mask(&[0, 0, 0, 1, 1, 1, 1, 2], &[0, 1, 1, 0, 1, 1, 1, 0]);
        let smp = loss_weights(
            &Sft { masks: std::slice::from_ref(&m2), normalization: LossNormalization::Sample, batch: None },
            6,
            1,
        );
        // Sample 0 counts t = 0, 1; sample 1 counts t = 3, 4, 5.
        assert_eq!(smp, [0.25, 0.25, 0.0, 1.0 / 6.0, 1.0 / 6.0, 1.0 / 6.0]);
    }

    #[test]
    fn bad_masks_are_refused() {
        let short = mask(&[0, 0], &[0, 1]);
        assert!(Packing::new(&[short], 2, 4).unwrap_err().to_string().contains("windows[0] segments"));
        let split = mask(&[0, 1, 0, 0], &[0, 0, 0, 0]);
        assert!(Packing::new(&[split], 3, 4).unwrap_err().to_string().contains("not contiguous"));
    }
}
