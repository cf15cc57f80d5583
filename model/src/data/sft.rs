//! Supervised fine-tuning data (`[data] kind = "sft"`): JSONL conversations rendered to
//! tokens with a loss mask, packed several to a window.
//!
//! ## Input
//! One JSON object per line (blank lines are skipped), either
//! `{"messages": [{"role": "system" | "user" | "assistant", "content": "…"}, …]}` (at
//! least one assistant message) or `{"prompt": "…", "response": "…"}` (a user turn and
//! an assistant turn). Other keys are ignored. Every error names `file:line` and the
//! field (`messages[2].role`, `response`, …).
//!
//! ## Rendering: flotilla's default template
//! Jinja chat templates (`tokenizer_config.json`'s `chat_template`) are not rendered
//! here; every conversation is rendered with this template, whatever the tokenizer:
//!
//! ```text
//! <|system|>\n{content}\n            system turn      (weight 0)
//! <|user|>\n{content}\n              user turn        (weight 0)
//! <|assistant|>\n                    assistant header (weight 0)
//! {content}<EOS>                     assistant reply  (weight 1; EOS = the tokenizer's
//!                                    end-of-document token, byte tokenizer: 0)
//! ```
//!
//! Each piece is tokenized on its own, so the mask's boundaries are exact; the loss is
//! taken on the assistant replies and their end token only.
//!
//! ## Packing
//! The samples are put in a seeded order (a function of the seed alone), then packed
//! greedily, in that order, into windows of `seq_len + 1 + D` tokens: a sample that does
//! not fit in what is left of the current window starts the next one, whose tail is
//! padding (the end token, a segment of its own, never a target). A sample longer than a
//! window is cut to one (counted in [`SftStats::truncated`]). The window of `(step, index)`
//! is window `(step − 1)·batch + index` of an endless sequence of epochs, each a seeded
//! affine permutation of the packed windows: a function of `(seed, step, index)` only.

use super::{DataError, Tokenizer, Window};
use crate::packing::SampleMask;
use crate::param::stable_hash;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::path::Path;

/// One rendered sample: its tokens and which are targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// The tokens.
    pub tokens: Vec<u32>,
    /// Whether each token is a loss target.
    pub targets: Vec<bool>,
}

/// A turn of a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Instructions.
    System,
    /// The user.
    User,
    /// The model: the turns the loss is taken on.
    Assistant,
}

impl Role {
    fn parse(name: &str) -> Option<Role> {
        match name {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }

    fn header(self) -> &'static str {
        match self {
            Role::System => "<|system|>\n",
            Role::User => "<|user|>\n",
            Role::Assistant => "<|assistant|>\n",
        }
    }
}

/// One line's conversation, checked; `path` and `line` name it in errors.
pub fn parse_line(text: &str, path: &Path, line: usize) -> Result<Vec<(Role, String)>, DataError> {
    let bad = |detail: String| DataError::Input { path: path.to_path_buf(), line: Some(line), detail };
    let value: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let object = value.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
    let string = |v: &Value, field: &str| -> Result<String, DataError> {
        let s = v.as_str().ok_or_else(|| bad(format!("`{field}` is not a string")))?;
        if s.is_empty() {
            return Err(bad(format!("`{field}` is empty")));
        }
        Ok(s.to_string())
    };
    match (object.get("messages"), object.get("prompt"), object.get("response")) {
        (Some(messages), None, None) => {
            let list = messages.as_array().ok_or_else(|| bad("`messages` is not a list".into()))?;
            if list.is_empty() {
                return Err(bad("`messages` is empty".into()));
            }
            let turns = list
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let role = m.get("role").ok_or_else(|| bad(format!("`messages[{i}].role` is missing")))?;
                    let role = role.as_str().ok_or_else(|| bad(format!("`messages[{i}].role` is not a string")))?;
                    let role = Role::parse(role).ok_or_else(|| {
                        bad(format!(
                            "`messages[{i}].role` is {role:?}: the roles are \"system\", \"user\" and \"assistant\""
                        ))
                    })?;
                    let content =
                        m.get("content").ok_or_else(|| bad(format!("`messages[{i}].content` is missing")))?;
                    Ok((role, string(content, &format!("messages[{i}].content"))?))
                })
                .collect::<Result<Vec<_>, DataError>>()?;
            if !turns.iter().any(|(r, _)| *r == Role::Assistant) {
                return Err(bad("`messages` has no assistant message: nothing to learn".into()));
            }
            Ok(turns)
        }
        (None, Some(prompt), Some(response)) => Ok(vec![
            (Role::User, string(prompt, "prompt")?),
            (Role::Assistant, string(response, "response")?),
        ]),
        (None, Some(_), None) => Err(bad("`response` is missing".into())),
        (None, None, Some(_)) => Err(bad("`prompt` is missing".into())),
        (None, None, None) => Err(bad("neither `messages` nor `prompt`/`response`".into())),
        (Some(_), _, _) => Err(bad("both `messages` and `prompt`/`response`: give one".into())),
    }
}

/// A conversation through the default template (module doc), tokenized piece by piece.
pub fn render(turns: &[(Role, String)], tokenizer: &Tokenizer) -> Result<Rendered, DataError> {
    let eod = tokenizer.eod()?;
    let mut out = Rendered { tokens: Vec::new(), targets: Vec::new() };
    let push = |out: &mut Rendered, ids: Vec<u32>, target: bool| {
        out.targets.extend(std::iter::repeat_n(target, ids.len()));
        out.tokens.extend(ids);
    };
    for (role, content) in turns {
        push(&mut out, tokenizer.encode(role.header())?, false);
        match role {
            Role::Assistant => {
                push(&mut out, tokenizer.encode(content)?, true);
                push(&mut out, vec![eod], true);
            }
            _ => push(&mut out, tokenizer.encode(&format!("{content}\n"))?, false),
        }
    }
    Ok(out)
}

/// The prompt a generation starts from for `turns` (a conversation ending with a user
/// turn): the default template up to and including the assistant header.
pub fn render_prompt(turns: &[(Role, String)], tokenizer: &Tokenizer) -> Result<Vec<u32>, DataError> {
    let mut text = String::new();
    for (role, content) in turns {
        text.push_str(role.header());
        text.push_str(content);
        text.push('\n');
    }
    text.push_str(Role::Assistant.header());
    tokenizer.encode(&text)
}

/// What loading an SFT file found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SftStats {
    /// Samples read.
    pub samples: usize,
    /// Samples longer than a window, cut to one.
    pub truncated: usize,
    /// Packed windows (one epoch).
    pub windows: usize,
    /// Target tokens over all samples.
    pub target_tokens: usize,
}

/// The packed windows of an SFT file, drawn by `(seed, step, index)`.
#[derive(Clone, Debug)]
pub struct SftSampler {
    windows: Vec<(Vec<u32>, SampleMask)>,
    seed: u64,
    batch_size: usize,
    stats: SftStats,
}

impl SftSampler {
    /// Reads, renders and packs `path` for windows of `seq_len + 1 + mtp_depth` tokens.
    pub fn open(
        path: &Path,
        tokenizer: &Tokenizer,
        seed: u64,
        seq_len: usize,
        mtp_depth: usize,
        batch_size: usize,
    ) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| DataError::Io { path: path.to_path_buf(), error })?;
        let mut samples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            samples.push(render(&parse_line(line, path, i + 1)?, tokenizer)?);
        }
        if samples.is_empty() {
            return Err(DataError::Input {
                path: path.to_path_buf(),
                line: None,
                detail: "no samples: the file has no non-blank line".into(),
            });
        }
        Self::from_samples(samples, tokenizer.eod()?, seed, seq_len + 1 + mtp_depth, batch_size, path)
    }

    /// Packs rendered `samples` into windows of `window` tokens (module doc), padding with
    /// `pad`; `path` names the source in errors.
    pub fn from_samples(
        mut samples: Vec<Rendered>,
        pad: u32,
        seed: u64,
        window: usize,
        batch_size: usize,
        path: &Path,
    ) -> Result<Self, DataError> {
        if window < 2 || batch_size == 0 {
            return Err(DataError::Config(format!(
                "{}: SFT windows of {window} tokens and batches of {batch_size} cannot be drawn",
                path.display()
            )));
        }
        let mut stats = SftStats { samples: samples.len(), ..SftStats::default() };
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ stable_hash("flotilla sft order"));
        samples.shuffle(&mut rng);
        let mut windows = Vec::new();
        let mut current = Packer::new(window);
        for mut s in samples {
            if s.tokens.len() > window {
                s.tokens.truncate(window);
                s.targets.truncate(window);
                stats.truncated += 1;
            }
            stats.target_tokens += s.targets.iter().filter(|&&t| t).count();
            if current.len() + s.tokens.len() > window {
                windows.push(std::mem::replace(&mut current, Packer::new(window)).finish(pad));
            }
            current.push(&s);
        }
        windows.push(current.finish(pad));
        stats.windows = windows.len();
        Ok(SftSampler { windows, seed, batch_size, stats })
    }

    /// What loading found.
    pub fn stats(&self) -> SftStats {
        self.stats
    }

    /// Every packed window of an epoch, in packing order.
    pub fn packed(&self) -> &[(Vec<u32>, SampleMask)] {
        &self.windows
    }

    /// The `index`-th window of `step` (1-based): a function of `(seed, step, index)` only.
    pub fn window(&self, step: u64, index: u64) -> Window {
        let n = self.windows.len() as u64;
        let global = step.saturating_sub(1).saturating_mul(self.batch_size as u64).saturating_add(index);
        let (epoch, within) = (global / n, global % n);
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ stable_hash(&format!("sft epoch {epoch}")));
        // An affine permutation x ↦ (a·x + c) mod n with gcd(a, n) = 1.
        let mut a = if n > 1 { rng.random_range(1..n) } else { 1 };
        while gcd(a, n) != 1 {
            a = a % (n - 1) + 1;
        }
        let c = rng.random_range(0..n);
        let k = ((a as u128 * within as u128 + c as u128) % n as u128) as usize;
        let (tokens, mask) = &self.windows[k];
        Window { tokens: tokens.clone(), sft: Some(mask.clone()) }
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// A window being filled.
struct Packer {
    tokens: Vec<u32>,
    mask: SampleMask,
    next: u32,
    window: usize,
}

impl Packer {
    fn new(window: usize) -> Self {
        Packer {
            tokens: Vec::with_capacity(window),
            mask: SampleMask { segments: Vec::with_capacity(window), targets: Vec::with_capacity(window) },
            next: 0,
            window,
        }
    }

    fn len(&self) -> usize {
        self.tokens.len()
    }

    fn push(&mut self, s: &Rendered) {
        self.tokens.extend_from_slice(&s.tokens);
        self.mask.targets.extend_from_slice(&s.targets);
        self.mask.segments.extend(std::iter::repeat_n(self.next, s.tokens.len()));
        self.next += 1;
    }

    fn finish(mut self, pad: u32) -> (Vec<u32>, SampleMask) {
        let rest = self.window - self.tokens.len();
        self.tokens.extend(std::iter::repeat_n(pad, rest));
        self.mask.targets.extend(std::iter::repeat_n(false, rest));
        self.mask.segments.extend(std::iter::repeat_n(self.next, rest));
        (self.tokens, self.mask)
    }
}
