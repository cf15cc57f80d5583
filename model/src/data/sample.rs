//! The sample order of indexed datasets and their blends: sample `index` of step `step`
//! is a function of `(seed, step, index)` alone, in O(1) memory in the datasets' size.
//!
//! A dataset's token stream is its sequences back to back, in file order, the
//! end-of-document tokens its writer put in included (`flotilla data prepare` and
//! `preprocess_data.py --append-eod` end each document with one). With `W = seq_len + 1 +
//! mtp_depth`, window `w` of a stream of `N` tokens is tokens `w·seq_len .. w·seq_len + W`
//! (consecutive windows share their last `1 + mtp_depth` tokens, as Megatron's GPT samples
//! share one), for `w < M = (N − W) / seq_len + 1`; windows cross document boundaries as
//! Megatron's do.
//!
//! Global sample `g = (step − 1)·batch_size + index` (steps count from 1). A dataset's
//! `k`-th sample is in epoch `k / M`, at position `k mod M` of that epoch's order: a
//! bijection of `0..M` keyed by `(seed, dataset, epoch)` — a 4-round Feistel network on the
//! smallest even number of bits covering `M`, cycle-walked back into range — so every
//! epoch visits each window once, in its own order, with no permutation stored.
//!
//! A blend (several datasets with weights) assigns global samples to datasets by
//! Megatron's `BlendedDataset` rule — sample `i` goes to the dataset with the largest
//! deficit `weight·(i + 1) − count so far` (the lowest on a tie) — computed over a period
//! of [`BLEND_PERIOD`] samples and repeated, so each dataset's share of every period is
//! within one sample of its weight and the table is 4096 entries whatever the data. One
//! dataset is a blend of one.

use super::indexed::IndexedDataset;
use super::{DataError, Window};
use crate::param::stable_hash;

/// Samples in one period of a blend's assignment.
pub const BLEND_PERIOD: usize = 4096;

/// `splitmix64`'s finalizer: a keyed round function with full avalanche.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A bijection of `0..n` keyed by `key` (`n ≥ 1`, `x < n`).
pub fn permute(key: u64, n: u64, x: u64) -> u64 {
    debug_assert!(x < n);
    if n <= 1 {
        return 0;
    }
    let bits = (64 - (n - 1).leading_zeros()).max(2);
    let half = bits.div_ceil(2);
    let mask = (1u64 << half) - 1;
    let mut y = x;
    loop {
        let (mut left, mut right) = (y >> half, y & mask);
        for round in 0..4u64 {
            let f = mix(key ^ mix(right ^ (round << 56))) & mask;
            (left, right) = (right, left ^ f);
        }
        y = (left << half) | right;
        // The network permutes 0..2^(2·half) ⊇ 0..n: walking the cycle from x stays a
        // bijection on 0..n and ends, since x's cycle returns to x < n.
        if y < n {
            return y;
        }
    }
}

struct Source {
    data: IndexedDataset,
    /// Windows per epoch (`M`).
    windows: u64,
}

/// Windows of indexed datasets, blended by weight.
pub struct IndexedSampler {
    sources: Vec<Source>,
    /// For each position of the period: the dataset and its samples earlier in the period.
    period: Vec<(u32, u32)>,
    /// Each dataset's samples per period.
    per_period: Vec<u64>,
    seed: u64,
    seq_len: usize,
    window: usize,
    batch_size: u64,
}

impl std::fmt::Debug for IndexedSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexedSampler")
            .field("datasets", &self.sources.iter().map(|s| s.data.prefix()).collect::<Vec<_>>())
            .field("per_period", &self.per_period)
            .field("window", &self.window)
            .finish()
    }
}

impl IndexedSampler {
    /// Windows of `seq_len + 1 + mtp_depth` tokens from `datasets` (weight, dataset),
    /// `batch_size` samples per step. Errors name the dataset that is too short for one
    /// window and a weight that is not positive or too small to get a sample per period.
    pub fn new(
        datasets: Vec<(f64, IndexedDataset)>,
        seed: u64,
        seq_len: usize,
        mtp_depth: usize,
        batch_size: usize,
    ) -> Result<Self, DataError> {
        let window = seq_len + 1 + mtp_depth;
        if datasets.is_empty() {
            return Err(DataError::Config("`data.path` names no dataset".into()));
        }
        if seq_len == 0 || batch_size == 0 {
            return Err(DataError::Config("seq_len and batch_size must be at least 1".into()));
        }
        let total: f64 = datasets.iter().map(|(w, _)| *w).sum();
        let mut sources = Vec::with_capacity(datasets.len());
        let mut weights = Vec::with_capacity(datasets.len());
        for (weight, data) in datasets {
            if !(weight.is_finite() && weight > 0.0) {
                return Err(DataError::Config(format!(
                    "the weight of {} must be positive and finite, got {weight}",
                    data.prefix().display()
                )));
            }
            let n = data.tokens();
            if n < window as u64 {
                return Err(DataError::Format {
                    path: super::indexed::bin_path(data.prefix()),
                    detail: format!(
                        "{n} tokens cannot give a window of seq_len {seq_len} + 1 + MTP depth {mtp_depth}"
                    ),
                });
            }
            let windows = (n - window as u64) / seq_len as u64 + 1;
            weights.push(weight / total);
            sources.push(Source { data, windows });
        }
        let mut counts = vec![0u64; sources.len()];
        let mut period = Vec::with_capacity(BLEND_PERIOD);
        for i in 0..BLEND_PERIOD {
            let deficit = |d: usize| weights[d] * (i + 1) as f64 - counts[d] as f64;
            let best =
                (1..sources.len()).fold(0, |best, d| if deficit(d) > deficit(best) { d } else { best });
            period.push((best as u32, counts[best] as u32));
            counts[best] += 1;
        }
        if let Some(d) = counts.iter().position(|&c| c == 0) {
            return Err(DataError::Config(format!(
                "the weight of {} ({:.3e} of the blend) is below one sample in {BLEND_PERIOD}",
                sources[d].data.prefix().display(),
                weights[d]
            )));
        }
        Ok(IndexedSampler {
            sources,
            period,
            per_period: counts,
            seed,
            seq_len,
            window,
            batch_size: batch_size as u64,
        })
    }

    /// The datasets, in blend order.
    pub fn datasets(&self) -> impl Iterator<Item = &IndexedDataset> {
        self.sources.iter().map(|s| &s.data)
    }

    /// Global sample `g`'s dataset and the stream position of its window's first token.
    pub fn locate(&self, g: u64) -> (usize, u64) {
        let (q, r) = (g / BLEND_PERIOD as u64, (g % BLEND_PERIOD as u64) as usize);
        let (d, earlier) = self.period[r];
        let d = d as usize;
        let k = q * self.per_period[d] + earlier as u64;
        let source = &self.sources[d];
        let (epoch, position) = (k / source.windows, k % source.windows);
        let key = self.seed ^ stable_hash(&format!("indexed dataset {d} epoch {epoch}"));
        (d, permute(key, source.windows, position) * self.seq_len as u64)
    }

    /// The `index`-th window of `step` (steps count from 1): a function of
    /// `(seed, step, index)` only.
    pub fn window(&self, step: u64, index: u64) -> Result<Window, DataError> {
        let g = step.saturating_sub(1) * self.batch_size + index;
        let (d, start) = self.locate(g);
        Ok(Window { tokens: self.sources[d].data.read(start, self.window)?, sft: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_is_a_bijection_for_every_size() {
        for n in [1u64, 2, 3, 5, 16, 17, 100, 1000, 4097] {
            let mut seen: Vec<u64> = (0..n).map(|x| permute(7, n, x)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n = {n}");
        }
        let a: Vec<u64> = (0..100).map(|x| permute(1, 100, x)).collect();
        let b: Vec<u64> = (0..100).map(|x| permute(2, 100, x)).collect();
        assert_ne!(a, b);
        assert_ne!(a, (0..100).collect::<Vec<_>>());
    }
}
