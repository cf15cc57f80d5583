//! Generation: prefill, then decode, over MLA's compressed KV cache ([`crate::mla`]'s
//! inference section), with greedy, temperature and top-p sampling, stop tokens, batches
//! of prompts, and lossless speculative decoding with the MTP module.
//!
//! ## Steps
//! [`Generator::prefill`] runs every prompt through the model at once (each sequence's
//! rows after the previous one's, [`Model::forward_cached`]) and samples each sequence's
//! first token from its last row; every [`Generator::step`] feeds each unfinished
//! sequence its newest token (one row per sequence) and samples the next. A sequence
//! finishes when it samples a stop token (kept in its output, as transformers keeps
//! `eos`) or has `max_new_tokens` tokens.
//!
//! ## Sampling
//! `temperature = 0` is greedy: the highest logit, the lowest token id among equals (as
//! `argmax` in PyTorch). Otherwise the logits are divided by the temperature and
//! softmaxed in f64, the tokens ordered by probability (ties by id), cut to the smallest
//! prefix whose mass reaches `top_p`, and one drawn from the renormalized prefix with
//! sequence `s`'s own ChaCha8 stream (`seed`, stream `s`): the same prompts, config and
//! seed give the same tokens, whatever the batch's other sequences do.
//!
//! ## Speculative decoding with MTP (greedy only)
//! DeepSeek-V3's MTP module (depth 1) predicts the token after next from the main model's
//! last hidden state `h⁰ᵢ` and the embedding of the token `tᵢ₊₁` (report §2.2, §5.4.3).
//! After the main model has produced `t` (the newest token), the module proposes a draft
//! `d` for the token after it; the next step feeds the main model both `t` and `d` (two
//! rows): if the main model's greedy choice after `t` is `d`, the draft is accepted and the
//! step yields two tokens (`d` and the choice after `d`); otherwise the step yields the
//! main model's choice after `t`, and `d`'s position is dropped from the main cache
//! ([`KvCache::truncate_main`]). Every token emitted is the main model's own greedy choice
//! at its position, so the output is plain greedy decoding's (lossless) up to the rounding
//! of computing two rows at once. The module's own cache is fed exactly once per accepted
//! position, with the true next token, as in training.

use crate::model::{KvCache, Model};
use crate::{ModelError, Real};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// An invalid request, or a model error on the way.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A setting or prompt is invalid.
    #[error("`{field}`: {detail}")]
    Invalid {
        /// The setting (`max_new_tokens`, `top_p`, ...) or prompt (`prompts[2]`).
        field: String,
        /// What is wrong.
        detail: String,
    },
    /// The model refused a call.
    #[error(transparent)]
    Model(#[from] ModelError),
}

fn invalid<T>(field: impl Into<String>, detail: impl Into<String>) -> Result<T, GenerateError> {
    Err(GenerateError::Invalid { field: field.into(), detail: detail.into() })
}

/// How the next token is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 = greedy; otherwise the logits' divisor.
    pub temperature: f64,
    /// The nucleus: the smallest set of most likely tokens with at least this mass, in
    /// `(0, 1]` (1 = no cut).
    pub top_p: f64,
    /// Seeds each sequence's stream.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { temperature: 0.0, top_p: 1.0, seed: 0 }
    }
}

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateConfig {
    /// Tokens to generate per prompt, at most (≥ 1).
    pub max_new_tokens: usize,
    /// Tokens that end a sequence (kept in its output).
    pub stop_tokens: Vec<u32>,
    /// The sampling rule.
    pub sampling: Sampling,
    /// Speculative decoding with the first MTP module (greedy only).
    pub speculative_mtp: bool,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        GenerateConfig {
            max_new_tokens: 32,
            stop_tokens: Vec::new(),
            sampling: Sampling::default(),
            speculative_mtp: false,
        }
    }
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// It sampled a stop token.
    Stop,
    /// It reached `max_new_tokens`.
    Length,
}

/// One prompt's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// The generated tokens (without the prompt).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish: FinishReason,
}

/// Counts over a generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenerateStats {
    /// Prompt tokens run by the prefill.
    pub prefill_tokens: usize,
    /// Main-model calls after the prefill.
    pub decode_steps: usize,
    /// Tokens generated, over all sequences.
    pub generated: usize,
    /// MTP drafts verified by the main model.
    pub drafts: usize,
    /// Drafts the main model accepted.
    pub accepted: usize,
}

impl GenerateStats {
    /// Accepted drafts over verified drafts (`None` before any draft).
    pub fn acceptance_rate(&self) -> Option<f64> {
        (self.drafts > 0).then(|| self.accepted as f64 / self.drafts as f64)
    }
}

struct Sequence {
    prompt: Vec<u32>,
    generated: Vec<u32>,
    finish: Option<FinishReason>,
    rng: ChaCha8Rng,
    /// The MTP draft for the token after the newest one (speculative decoding).
    draft: Option<u32>,
}

/// A batch of prompts being generated: owns their caches.
pub struct Generator<'m, T> {
    model: &'m Model<T>,
    config: GenerateConfig,
    threads: usize,
    cache: KvCache<T>,
    sequences: Vec<Sequence>,
    stats: GenerateStats,
}

impl<'m, T: Real> Generator<'m, T> {
    /// A generator of `prompts` (each ≥ 1 token in the vocabulary, with room for
    /// `max_new_tokens` more, plus the draft under speculation, within
    /// `max_position_embeddings`) under `config`.
    pub fn new(
        model: &'m Model<T>,
        prompts: &[Vec<u32>],
        config: GenerateConfig,
        threads: usize,
    ) -> Result<Self, GenerateError> {
        Self::validate(model, prompts, &config)?;
        let sequences = prompts
            .iter()
            .enumerate()
            .map(|(s, prompt)| {
                let mut rng = ChaCha8Rng::seed_from_u64(config.sampling.seed);
                rng.set_stream(s as u64);
                Sequence { prompt: prompt.clone(), generated: Vec::new(), finish: None, rng, draft: None }
            })
            .collect();
        Ok(Generator {
            model,
            config,
            threads,
            cache: model.kv_cache(prompts.len()),
            sequences,
            stats: GenerateStats::default(),
        })
    }

    fn validate(
        model: &Model<T>,
        prompts: &[Vec<u32>],
        config: &GenerateConfig,
    ) -> Result<(), GenerateError> {
        let model_config = model.config();
        let (vocab, max_positions) = (model_config.vocab_size, model_config.max_position_embeddings);
        let s = &config.sampling;
        if config.max_new_tokens == 0 {
            return invalid("max_new_tokens", "must be at least 1");
        }
        if !(s.temperature.is_finite() && s.temperature >= 0.0) {
            return invalid("temperature", format!("{} is not a finite value ≥ 0", s.temperature));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return invalid("top_p", format!("{} is not in (0, 1]", s.top_p));
        }
        if config.speculative_mtp && s.temperature != 0.0 {
            return invalid(
                "speculative",
                "MTP speculative decoding is lossless for greedy decoding only: set temperature = 0",
            );
        }
        if config.speculative_mtp && model.mtp_depth() == 0 {
            return invalid("speculative", "the model has no MTP module (num_nextn_predict_layers = 0)");
        }
        if let Some(&t) = config.stop_tokens.iter().find(|&&t| t as usize >= vocab) {
            return invalid("stop_tokens", format!("token {t} is outside the vocabulary of {vocab}"));
        }
        if prompts.is_empty() {
            return invalid("prompts", "no prompts to generate from");
        }
        let room = config.max_new_tokens + usize::from(config.speculative_mtp);
        for (i, prompt) in prompts.iter().enumerate() {
            let field = format!("prompts[{i}]");
            if prompt.is_empty() {
                return invalid(field, "is empty: a prompt needs at least one token");
            }
            if let Some((at, &t)) = prompt.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
                return invalid(
                    field,
                    format!("token {t} at position {at} is outside the vocabulary of {vocab}"),
                );
            }
            if prompt.len() + room > max_positions {
                return invalid(
                    field,
                    format!(
                        "{} tokens + {room} to generate pass max_position_embeddings = {max_positions}",
                        prompt.len()
                    ),
                );
            }
        }
        Ok(())
    }

    /// Runs every prompt and samples each sequence's first token (and under speculation
    /// its first draft).
    pub fn prefill(&mut self) -> Result<(), GenerateError> {
        let counts: Vec<usize> = self.sequences.iter().map(|s| s.prompt.len()).collect();
        let tokens: Vec<u32> = self.sequences.iter().flat_map(|s| s.prompt.iter().copied()).collect();
        self.stats.prefill_tokens = tokens.len();
        let h = self.model.forward_cached(&tokens, &counts, &mut self.cache, self.threads)?;
        let hidden = self.model.config().hidden_size;
        let mut last_rows = Vec::with_capacity(counts.len() * hidden);
        let mut end = 0;
        for &n in &counts {
            end += n;
            last_rows.extend_from_slice(&h[(end - 1) * hidden..end * hidden]);
        }
        let logits = self.model.head_logits(&last_rows, false, self.threads)?;
        let vocab = self.model.config().vocab_size;
        for (s, row) in logits.chunks_exact(vocab).enumerate() {
            let token = self.sample(s, row);
            self.emit(s, token);
        }
        if self.config.speculative_mtp {
            // The module sees every prompt position with the token that follows it.
            let next: Vec<u32> = self
                .sequences
                .iter()
                .flat_map(|s| s.prompt[1..].iter().copied().chain(s.generated.first().copied()))
                .collect();
            let all: Vec<usize> = (0..self.sequences.len()).collect();
            self.draft(&h, &next, &counts, &all)?;
        }
        Ok(())
    }

    /// One decode step for every unfinished sequence; returns whether any is left.
    pub fn step(&mut self) -> Result<bool, GenerateError> {
        if self.is_done() {
            return Ok(false);
        }
        self.stats.decode_steps += 1;
        if self.config.speculative_mtp {
            self.speculative_step()?
        } else {
            self.plain_step()?
        }
        Ok(!self.is_done())
    }

    fn plain_step(&mut self) -> Result<(), GenerateError> {
        let active = self.active();
        let counts: Vec<usize> = self.sequences.iter().map(|s| usize::from(s.finish.is_none())).collect();
        let tokens: Vec<u32> = active.iter().map(|&s| self.newest(s)).collect();
        let h = self.model.forward_cached(&tokens, &counts, &mut self.cache, self.threads)?;
        let logits = self.model.head_logits(&h, false, self.threads)?;
        let vocab = self.model.config().vocab_size;
        for (&s, row) in active.iter().zip(logits.chunks_exact(vocab)) {
            let token = self.sample(s, row);
            self.emit(s, token);
        }
        Ok(())
    }

    /// Feeds each active sequence `[newest, draft]`, keeps what the main model confirms,
    /// then drafts again from the accepted positions.
    fn speculative_step(&mut self) -> Result<(), GenerateError> {
        let active = self.active();
        let mut tokens = Vec::with_capacity(2 * active.len());
        for &s in &active {
            let draft = self.sequences[s].draft.ok_or_else(|| GenerateError::Invalid {
                field: format!("prompts[{s}]"),
                detail: "no MTP draft: prefill first".into(),
            })?;
            tokens.extend([self.newest(s), draft]);
        }
        let counts: Vec<usize> = self.sequences.iter().map(|s| 2 * usize::from(s.finish.is_none())).collect();
        let starts: Vec<usize> = active.iter().map(|&s| self.cache.len(s)).collect();
        let h = self.model.forward_cached(&tokens, &counts, &mut self.cache, self.threads)?;
        let logits = self.model.head_logits(&h, false, self.threads)?;
        let (vocab, hidden) = (self.model.config().vocab_size, self.model.config().hidden_size);

        let (mut mtp_h, mut mtp_next, mut mtp_counts) =
            (Vec::new(), Vec::new(), vec![0; self.sequences.len()]);
        for (i, &s) in active.iter().enumerate() {
            let rows = &logits[2 * i * vocab..(2 * i + 2) * vocab];
            let choice = self.sample(s, &rows[..vocab]);
            let draft = tokens[2 * i + 1];
            self.stats.drafts += 1;
            let confirmed = if choice == draft {
                self.stats.accepted += 1;
                vec![draft, self.sample(s, &rows[vocab..])]
            } else {
                self.cache.truncate_main(s, starts[i] + 1);
                vec![choice]
            };
            // The module's positions are those the main model keeps, each with its successor.
            mtp_h.extend_from_slice(&h[2 * i * hidden..(2 * i + confirmed.len()) * hidden]);
            mtp_next.extend_from_slice(&confirmed);
            mtp_counts[s] = confirmed.len();
            for token in confirmed {
                self.emit(s, token);
            }
        }
        self.draft(&mtp_h, &mtp_next, &mtp_counts, &active)
    }

    /// Runs the MTP module over new positions (`h0`, `next`, per-sequence `counts`) and
    /// stores the draft from each of `sequences`' last rows.
    fn draft(
        &mut self,
        h0: &[T],
        next: &[u32],
        counts: &[usize],
        sequences: &[usize],
    ) -> Result<(), GenerateError> {
        let h1 = self.model.mtp_forward_cached(h0, next, counts, &mut self.cache, self.threads)?;
        let hidden = self.model.config().hidden_size;
        let mut last_rows = Vec::with_capacity(sequences.len() * hidden);
        let mut end = 0;
        for &s in sequences {
            end += counts[s];
            last_rows.extend_from_slice(&h1[(end - 1) * hidden..end * hidden]);
        }
        let logits = self.model.head_logits(&last_rows, true, self.threads)?;
        let vocab = self.model.config().vocab_size;
        for (&s, row) in sequences.iter().zip(logits.chunks_exact(vocab)) {
            self.sequences[s].draft = Some(greedy(row));
        }
        Ok(())
    }

    /// Appends `token` to sequence `s` unless it has finished; finishes it on a stop token
    /// or at the length limit.
    fn emit(&mut self, s: usize, token: u32) {
        let max = self.config.max_new_tokens;
        let stop = self.config.stop_tokens.contains(&token);
        let seq = &mut self.sequences[s];
        if seq.finish.is_some() {
            return;
        }
        seq.generated.push(token);
        self.stats.generated += 1;
        if stop {
            seq.finish = Some(FinishReason::Stop);
        } else if seq.generated.len() >= max {
            seq.finish = Some(FinishReason::Length);
        }
    }

    fn sample(&mut self, s: usize, logits: &[T]) -> u32 {
        let sampling = self.config.sampling;
        sample(logits, &sampling, &mut self.sequences[s].rng)
    }

    fn newest(&self, s: usize) -> u32 {
        let seq = &self.sequences[s];
        *seq.generated.last().or(seq.prompt.last()).expect("prompts are not empty")
    }

    fn active(&self) -> Vec<usize> {
        (0..self.sequences.len()).filter(|&s| self.sequences[s].finish.is_none()).collect()
    }

    /// Whether every sequence has finished.
    pub fn is_done(&self) -> bool {
        self.sequences.iter().all(|s| s.finish.is_some())
    }

    /// The counts so far.
    pub fn stats(&self) -> GenerateStats {
        self.stats
    }

    /// The bytes the main model's KV cache holds now.
    pub fn cache_bytes(&self) -> usize {
        self.cache.main_bytes()
    }

    /// Each prompt's tokens so far; an unfinished one reports [`FinishReason::Length`].
    pub fn outputs(&self) -> Vec<Generation> {
        self.sequences
            .iter()
            .map(|s| Generation {
                tokens: s.generated.clone(),
                finish: s.finish.unwrap_or(FinishReason::Length),
            })
            .collect()
    }
}

/// Generates from `prompts` to the end: [`Generator::prefill`], then [`Generator::step`]
/// until every sequence has finished.
pub fn generate<T: Real>(
    model: &Model<T>,
    prompts: &[Vec<u32>],
    config: GenerateConfig,
    threads: usize,
) -> Result<(Vec<Generation>, GenerateStats), GenerateError> {
    let mut generator = Generator::new(model, prompts, config, threads)?;
    generator.prefill()?;
    while generator.step()? {}
    Ok((generator.outputs(), generator.stats()))
}

/// The highest logit's token, the lowest id among equals.
pub fn greedy<T: Real>(logits: &[T]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The next token under `sampling` (module doc), drawing from `rng` unless greedy.
pub fn sample<T: Real>(logits: &[T], sampling: &Sampling, rng: &mut impl Rng) -> u32 {
    if sampling.temperature == 0.0 {
        return greedy(logits);
    }
    let nucleus = nucleus(logits, sampling.temperature, sampling.top_p);
    let total: f64 = nucleus.iter().map(|&(_, p)| p).sum();
    let mut u = rng.random::<f64>() * total;
    for &(token, p) in &nucleus {
        if u < p {
            return token;
        }
        u -= p;
    }
    nucleus.last().map_or(0, |&(token, _)| token)
}

/// The tokens of the nucleus with their (unnormalized within it) probabilities, most
/// likely first, ties by id: softmax of `logits / temperature`, cut to the smallest prefix
/// with mass ≥ `top_p`.
pub fn nucleus<T: Real>(logits: &[T], temperature: f64, top_p: f64) -> Vec<(u32, f64)> {
    let scaled: Vec<f64> =
        logits.iter().map(|v| v.to_f64().unwrap_or(f64::NEG_INFINITY) / temperature).collect();
    let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scaled.iter().map(|v| (v - max).exp()).collect();
    let sum: f64 = weights.iter().sum();
    let mut order: Vec<(u32, f64)> = weights.iter().enumerate().map(|(i, &w)| (i as u32, w / sum)).collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut mass = 0.0;
    let mut keep = 0;
    for &(_, p) in &order {
        keep += 1;
        mass += p;
        if mass >= top_p {
            break;
        }
    }
    order.truncate(keep);
    order
}
