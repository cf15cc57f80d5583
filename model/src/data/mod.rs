//! Training data: tokenizers, the corpora, and batches drawn deterministically from
//! `(seed, step, index)`.
//!
//! A batch depends only on the data, the seed, the step and its index in the step, never
//! on what was drawn before, so a run resumed at step N sees exactly the batches of the
//! run that never stopped, whatever its layout.
//!
//! The synthetic corpus needs no download: a seeded "language" of a few hundred invented
//! words, drawn with Zipf-like frequencies into sentences. Its byte-unigram entropy is
//! around 4 bits, and a model that learns its words and their frequencies goes well below.
//!
//! Two kinds of source: a token stream in memory ([`Sampler`]: the synthetic corpus, a
//! text file), whose windows start at a seeded uniform position; and Megatron-LM indexed
//! datasets ([`indexed`], memory-mapped) and their blends, whose windows follow a seeded
//! per-epoch order ([`sample`]); and SFT conversations packed several to a window with a
//! loss mask ([`sft`]). [`DataSampler`] is any of them. [`tokenizer`] holds the byte
//! and Hugging Face tokenizers, [`prepare`] turns text into an indexed dataset.

pub mod indexed;
pub mod prepare;
pub mod sample;
pub mod sft;
pub mod tokenizer;

pub use indexed::{IndexedDataset, IndexedWriter, TokenDtype};
pub use sample::IndexedSampler;
pub use sft::SftSampler;
pub use tokenizer::Tokenizer;

use crate::ModelError;
use crate::param::stable_hash;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;

/// Errors of tokenizers, datasets and their inputs; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read or written.
    #[error("{path}: {error}", path = path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// An indexed dataset's file is corrupt, truncated or not one.
    #[error("{path}: {detail}", path = path.display())]
    Format {
        /// The `.idx` or `.bin` file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A tokenizer could not be loaded or used.
    #[error("tokenizer {path}: {detail}", path = path.display())]
    Tokenizer {
        /// The `tokenizer.json` (or its `tokenizer_config.json`).
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// An input document is malformed.
    #[error("{path}{line}: {detail}", path = path.display(), line = line.map(|l| format!(":{l}")).unwrap_or_default())]
    Input {
        /// The input file.
        path: PathBuf,
        /// Its 1-based line, where it has lines.
        line: Option<usize>,
        /// What is wrong.
        detail: String,
    },
    /// The data configuration is invalid.
    #[error("{0}")]
    Config(String),
}

/// Vocabulary of the byte tokenizer.
pub const BYTE_VOCAB: usize = 256;

/// Text to tokens, one per byte (any UTF-8 text, any language).
pub fn encode_bytes(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// Tokens back to text; tokens ≥ 256 and invalid UTF-8 become U+FFFD.
pub fn decode_bytes(tokens: &[u32]) -> String {
    let bytes: Vec<u8> = tokens.iter().map(|&t| u8::try_from(t).unwrap_or(b'?')).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The built-in corpus: `len` bytes of seeded invented text.
pub fn synthetic_corpus(seed: u64, len: usize) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ stable_hash("flotilla synthetic corpus"));
    let letters = b"etaoinshrdlucmfwypvbgkqjxz";
    let words: Vec<Vec<u8>> = (0..400)
        .map(|_| {
            let n = rng.random_range(2..9);
            // Skewed letter choice, so letters have unequal frequencies as in real text.
            (0..n).map(|_| letters[(rng.random::<f64>().powi(2) * letters.len() as f64) as usize]).collect()
        })
        .collect();
    // Zipf-like: word k drawn with weight 1/(k+1).
    let cumulative: Vec<f64> = words
        .iter()
        .enumerate()
        .scan(0.0, |acc, (k, _)| {
            *acc += 1.0 / (k as f64 + 1.0);
            Some(*acc)
        })
        .collect();
    let total = *cumulative.last().expect("the language has words");
    let mut text = Vec::with_capacity(len + 16);
    let mut sentence_len = 0;
    while text.len() < len {
        let u = rng.random::<f64>() * total;
        let k = cumulative.partition_point(|&c| c < u).min(words.len() - 1);
        let word = &words[k];
        if sentence_len == 0 {
            text.push(word[0].to_ascii_uppercase());
            text.extend_from_slice(&word[1..]);
        } else {
            text.extend_from_slice(word);
        }
        sentence_len += 1;
        if sentence_len >= 4 && rng.random_ratio(1, 6) {
            text.extend_from_slice(b". ");
            sentence_len = 0;
        } else {
            text.push(b' ');
        }
    }
    text.truncate(len);
    text.into_iter().map(u32::from).collect()
}

/// One sequence of a batch: `tokens[0..seq_len]` are inputs; position `t` predicts
/// `tokens[t + 1]` and, for MTP depth `k`, `tokens[t + 1 + k]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// `seq_len + 1 + mtp_depth` consecutive tokens.
    pub tokens: Vec<u32>,
    /// A packed SFT window's samples and loss targets ([`crate::packing`]); `None`:
    /// pre-training, one stream, every position scored.
    pub sft: Option<crate::packing::SampleMask>,
}

/// Draws windows from a token stream.
#[derive(Clone, Debug)]
pub struct Sampler {
    data: Vec<u32>,
    seed: u64,
    window: usize,
}

impl Sampler {
    /// Windows of `seq_len + 1 + mtp_depth` tokens from `data`; errors if the data is
    /// shorter than one window.
    pub fn new(data: Vec<u32>, seed: u64, seq_len: usize, mtp_depth: usize) -> Result<Self, ModelError> {
        let window = seq_len + 1 + mtp_depth;
        if seq_len == 0 || data.len() < window {
            return Err(ModelError::Tensor {
                tensor: "dataset".into(),
                detail: format!(
                    "{} tokens cannot give a window of seq_len {seq_len} + 1 + MTP depth {mtp_depth}",
                    data.len()
                ),
            });
        }
        Ok(Sampler { data, seed, window })
    }

    /// Tokens in the stream.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the stream is empty (never, once constructed).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The `index`-th window of `step`: a function of `(seed, step, index)` only.
    pub fn window(&self, step: u64, index: u64) -> Window {
        let key = self.seed ^ stable_hash(&format!("batch {step} {index}"));
        let mut rng = ChaCha8Rng::seed_from_u64(key);
        let start = rng.random_range(0..=self.data.len() - self.window);
        Window { tokens: self.data[start..start + self.window].to_vec(), sft: None }
    }
}

/// Where a run's windows come from.
#[derive(Debug)]
pub enum DataSampler {
    /// A token stream in memory (synthetic corpus, text file).
    Stream(Sampler),
    /// Indexed datasets, memory-mapped, possibly blended.
    Indexed(IndexedSampler),
    /// Packed SFT conversations ([`sft`]).
    Sft(SftSampler),
}

impl DataSampler {
    /// The `index`-th window of `step`: a function of `(seed, step, index)` only.
    pub fn window(&self, step: u64, index: u64) -> Result<Window, DataError> {
        match self {
            DataSampler::Stream(s) => Ok(s.window(step, index)),
            DataSampler::Indexed(s) => s.window(step, index),
            DataSampler::Sft(s) => Ok(s.window(step, index)),
        }
    }

    /// The whole stream, for a stream source.
    pub fn stream(&self) -> Option<&[u32]> {
        match self {
            DataSampler::Stream(s) => Some(&s.data),
            DataSampler::Indexed(_) | DataSampler::Sft(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        let text = "Mixture of Experts — 混合专家";
        assert_eq!(decode_bytes(&encode_bytes(text)), text);
    }

    #[test]
    fn synthetic_corpus_is_deterministic_and_structured() {
        let a = synthetic_corpus(1, 20_000);
        assert_eq!(a, synthetic_corpus(1, 20_000));
        assert_ne!(a, synthetic_corpus(2, 20_000));
        assert_eq!(a.len(), 20_000);
        let mut counts = [0usize; 256];
        for &t in &a {
            counts[t as usize] += 1;
        }
        let entropy: f64 = counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / a.len() as f64;
                -p * p.log2()
            })
            .sum();
        assert!((3.0..5.0).contains(&entropy), "unigram entropy {entropy} bits");
    }

    #[test]
    fn windows_depend_only_on_seed_step_and_index() {
        let s = Sampler::new(synthetic_corpus(3, 5000), 9, 32, 1).unwrap();
        let w = s.window(17, 2);
        assert_eq!(w.tokens.len(), 34);
        assert_eq!(w, s.window(17, 2));
        assert_ne!(w, s.window(18, 2));
        assert!(Sampler::new(vec![1, 2, 3], 0, 32, 1).is_err());
    }
}
