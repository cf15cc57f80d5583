//! Single-process training: the run configuration (flotilla's TOML), the optimizer state,
//! and the step loop — batch, forward and backward, gradient clipping, AdamW with BF16
//! moments, the auxiliary-loss-free bias update — with one metrics record per step.
//!
//! Determinism: the model is initialized from `(seed, parameter name)`, batches are drawn
//! from `(seed, step, index)`, and every reduction has a fixed order, so the same
//! configuration gives bit-identical losses on every run.

use crate::ModelError;
use crate::checkpoint::{
    CheckpointError, DEFAULT_MAX_SHARD_SIZE, FillReport, HfReader, MtpPolicy, NamedTensor, WeightDtype,
    fill_from_reader, parse_shard_size, save_hf_sharded,
};
use crate::config::{ConfigError, ModelConfig};
use crate::data::{
    BYTE_VOCAB, DataError, DataSampler, IndexedDataset, IndexedSampler, Sampler, SftSampler, Tokenizer,
    Window, synthetic_corpus,
};
use crate::model::{LossConfig, Model, StepStats};
use crate::packing::{BatchCounts, LossNormalization, SampleMask, Sft};
use crate::precision::Precision;
use crate::shard::{CheckpointReader, Piece, PieceData, PieceKind, ShardError, ShardHeader, Snapshot};
use flotilla_kernels::backend::Backend;
use flotilla_kernels::optim::{AdamWConfig, LrSchedule};
use half::bf16;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What to train on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum DataConfig {
    /// The built-in seeded corpus (no download).
    Synthetic {
        /// Bytes to generate.
        #[serde(default = "default_synthetic_tokens")]
        tokens: usize,
    },
    /// Any UTF-8 text file, one document, byte-tokenized unless `tokenizer` is given.
    Text {
        /// The file; relative paths are relative to the config file.
        path: PathBuf,
        /// A Hugging Face `tokenizer.json` (relative to the config file); absent: bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tokenizer: Option<PathBuf>,
    },
    /// Megatron-LM indexed datasets (`PREFIX.idx` + `PREFIX.bin`), memory-mapped, in the
    /// seeded per-epoch order of [`crate::data::sample`].
    Indexed {
        /// `"PREFIX"`, or a blend as Megatron's `--data-path`: `[0.3, "A", 0.7, "B"]`
        /// (weight, prefix pairs; weights are normalized) or `["A", "B"]` (equal
        /// weights). Relative prefixes are relative to the config file.
        path: DatasetPaths,
        /// The `tokenizer.json` the data was prepared with (relative to the config file),
        /// to check that the model's vocabulary covers it; absent: not checked before the
        /// first out-of-vocabulary token.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tokenizer: Option<PathBuf>,
    },
    /// Supervised fine-tuning: JSONL conversations (`messages`, or `prompt`/`response`)
    /// rendered with the default template, loss on the responses only, packed several to
    /// a window with attention kept inside each sample ([`crate::data::sft`],
    /// [`crate::packing`]).
    Sft {
        /// The JSONL file (relative to the config file).
        path: PathBuf,
        /// A Hugging Face `tokenizer.json` (relative to the config file); absent: bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tokenizer: Option<PathBuf>,
        /// `"token"` (default: every response token of a micro-batch weighs the same) or
        /// `"sample"` (every sample does).
        #[serde(default)]
        loss_normalization: LossNormalization,
    },
}

/// The `path` of `kind = "indexed"`: one prefix or a blend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DatasetPaths {
    /// One dataset.
    One(PathBuf),
    /// `[weight, prefix, weight, prefix, …]` or `[prefix, prefix, …]`.
    Blend(Vec<BlendItem>),
}

/// An element of a blend list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BlendItem {
    /// A weight.
    Weight(f64),
    /// A prefix.
    Prefix(PathBuf),
}

impl DatasetPaths {
    /// The (weight, prefix) pairs; the error says what is wrong with the list.
    pub fn datasets(&self) -> Result<Vec<(f64, PathBuf)>, String> {
        let items = match self {
            DatasetPaths::One(p) => return Ok(vec![(1.0, p.clone())]),
            DatasetPaths::Blend(items) => items,
        };
        if items.is_empty() {
            return Err("`data.path` is an empty list".into());
        }
        if items.iter().all(|i| matches!(i, BlendItem::Prefix(_))) {
            return Ok(items
                .iter()
                .map(|i| match i {
                    BlendItem::Prefix(p) => (1.0, p.clone()),
                    BlendItem::Weight(_) => unreachable!("all prefixes"),
                })
                .collect());
        }
        if !items.len().is_multiple_of(2) {
            return Err(format!("`data.path` has {} elements: a blend is weight, prefix pairs", items.len()));
        }
        items
            .chunks_exact(2)
            .enumerate()
            .map(|(k, pair)| match pair {
                [BlendItem::Weight(w), BlendItem::Prefix(p)] => Ok((*w, p.clone())),
                _ => Err(format!(
                    "`data.path` element {} and {}: a blend is weight, prefix pairs",
                    2 * k,
                    2 * k + 1
                )),
            })
            .collect()
    }

    fn resolve(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| resolve_relative(p, base);
        match self {
            DatasetPaths::One(p) => fix(p),
            DatasetPaths::Blend(items) => items.iter_mut().for_each(|i| {
                if let BlendItem::Prefix(p) = i {
                    fix(p)
                }
            }),
        }
    }
}

impl DataConfig {
    /// The sizes of the data table within bounds: a synthetic corpus is generated whole in
    /// memory, so its `tokens` is at most [`MAX_SYNTHETIC_TOKENS`]; a blend list parses.
    /// The error is the field and the reason (the coordinator checks this at submission,
    /// the workers again when they build the trainer).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        match self {
            DataConfig::Synthetic { tokens } if *tokens as u64 > MAX_SYNTHETIC_TOKENS => Err((
                "data.tokens",
                format!("{tokens} is above the limit of {MAX_SYNTHETIC_TOKENS} synthetic tokens"),
            )),
            DataConfig::Indexed { path, .. } => path.datasets().map(|_| ()).map_err(|e| ("data.path", e)),
            _ => Ok(()),
        }
    }

    /// Every file the data table names, with its field (`data.path`, `data.tokenizer`), in
    /// the order written (an indexed dataset's prefix gives its `.idx` and `.bin`): what
    /// path confinement checks.
    pub fn paths(&self) -> Vec<(&'static str, PathBuf)> {
        let (data, tokenizer): (Vec<PathBuf>, _) = match self {
            DataConfig::Synthetic { .. } => return Vec::new(),
            DataConfig::Text { path, tokenizer } | DataConfig::Sft { path, tokenizer, .. } => {
                (vec![path.clone()], tokenizer)
            }
            DataConfig::Indexed { path, tokenizer } => {
                let prefixes = match path {
                    DatasetPaths::One(p) => vec![p.clone()],
                    DatasetPaths::Blend(items) => items
                        .iter()
                        .filter_map(|i| match i {
                            BlendItem::Prefix(p) => Some(p.clone()),
                            BlendItem::Weight(_) => None,
                        })
                        .collect(),
                };
                let files = prefixes
                    .iter()
                    .flat_map(|p| {
                        ["idx", "bin"].map(|ext| {
                            let mut file = p.clone().into_os_string();
                            file.push(".");
                            file.push(ext);
                            PathBuf::from(file)
                        })
                    })
                    .collect();
                (files, tokenizer)
            }
        };
        let mut paths: Vec<_> = data.into_iter().map(|p| ("data.path", p)).collect();
        paths.extend(tokenizer.iter().map(|t| ("data.tokenizer", t.clone())));
        paths
    }
}

/// The most optimizer steps a run may ask for.
pub const MAX_STEPS: u64 = 1 << 40;
/// The most sequences per step.
pub const MAX_BATCH_SIZE: u64 = 1 << 20;
/// The most tokens per step (`batch_size × seq_len`; DeepSeek-V3's is 15,360 × 4,096 ≈ 2^26).
pub const MAX_TOKENS_PER_STEP: u64 = 1 << 30;
/// The largest synthetic corpus, in tokens (generated whole in memory, 4 bytes each).
pub const MAX_SYNTHETIC_TOKENS: u64 = 1 << 30;
/// The most compute threads a run may ask for.
pub const MAX_THREADS: u64 = 1 << 12;

/// A run's sizes, as its TOML gives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunSizes {
    pub steps: u64,
    pub batch_size: u64,
    pub seq_len: u64,
    pub threads: Option<u64>,
}

/// The one check of a run's sizes against their bounds and the model (`seq_len` at most
/// `max_position_embeddings`); the error is the field and the reason. The coordinator runs
/// it at submission and [`TrainConfig::from_toml`] on every worker.
pub fn validate_run_sizes(sizes: RunSizes, model: &ModelConfig) -> Result<(), (&'static str, String)> {
    let RunSizes { steps, batch_size, seq_len, threads } = sizes;
    for (field, value, limit) in [("steps", steps, MAX_STEPS), ("batch_size", batch_size, MAX_BATCH_SIZE)] {
        if value == 0 {
            return Err((field, "must be at least 1".into()));
        }
        if value > limit {
            return Err((field, format!("{value} is above the limit of {limit}")));
        }
    }
    let positions = model.max_position_embeddings as u64;
    if seq_len == 0 || seq_len > positions {
        return Err((
            "seq_len",
            format!("must be between 1 and max_position_embeddings = {positions}, got {seq_len}"),
        ));
    }
    let tokens = batch_size.saturating_mul(seq_len);
    if tokens > MAX_TOKENS_PER_STEP {
        return Err((
            "batch_size",
            format!(
                "batch_size × seq_len = {batch_size} × {seq_len} = {tokens} tokens per step is above the limit of {MAX_TOKENS_PER_STEP}"
            ),
        ));
    }
    match threads {
        Some(0) => Err(("threads", "must be at least 1".into())),
        Some(n) if n > MAX_THREADS => Err(("threads", format!("{n} is above the limit of {MAX_THREADS}"))),
        _ => Ok(()),
    }
}

/// A config's relative `path` made relative to the config file's directory `base`.
fn resolve_relative(path: &mut PathBuf, base: &Path) {
    if path.is_relative() {
        *path = base.join(&*path);
    }
}

fn default_synthetic_tokens() -> usize {
    1 << 20
}

/// The optimizer and its schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// AdamW's β₁, β₂, ε and weight decay.
    #[serde(flatten)]
    pub adamw: AdamWConfig,
    /// Learning-rate schedule (warm-up, constant, cosine decay).
    #[serde(flatten)]
    pub schedule: LrSchedule,
    /// Gradient clipping by global norm (≤ 0 disables).
    #[serde(default = "default_clip")]
    pub clip: f64,
}

fn default_clip() -> f64 {
    1.0
}

/// The balancing knobs of the report, beside the loss weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceConfig {
    /// γ of the auxiliary-loss-free bias update (0 disables).
    #[serde(default = "default_gamma")]
    pub bias_gamma: f64,
}

fn default_gamma() -> f64 {
    0.001
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self { bias_gamma: default_gamma() }
    }
}

/// A training run, as written in flotilla's TOML.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Seeds the model's initialization and the batches.
    #[serde(default)]
    pub seed: u64,
    /// Optimizer steps.
    pub steps: u64,
    /// Sequences per step.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Worker threads (default: all cores).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Recompute RMSNorm outputs and MLA up-projections in backward instead of storing them.
    #[serde(default)]
    pub recompute: bool,
    /// The linear layers' GEMM precision: `"fp32"` (default), `"bf16"` or `"fp8"`
    /// ([`crate::precision`]).
    #[serde(default)]
    pub precision: Precision,
    /// The model, as flotilla's model TOML (`preset = "tiny"` plus overrides).
    pub model: toml::Table,
    /// The data.
    pub data: DataConfig,
    /// AdamW and the schedule.
    pub optimizer: OptimizerConfig,
    /// MTP and balance-loss weights.
    #[serde(default)]
    pub loss: LossConfig,
    /// The bias update.
    #[serde(default)]
    pub balance: BalanceConfig,
    /// Pipeline and expert parallelism (`flotilla run` across workers); absent: plain data
    /// parallelism. Single-process training ignores it and computes the same step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<ParallelConfig>,
    /// When workers take checkpoints and how many are kept (`flotilla run`; single-process
    /// training ignores it).
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// What the coordinator does when a worker fails (`flotilla run`).
    #[serde(default)]
    pub recovery: RecoveryConfig,
    /// Start from the weights of this HF-layout checkpoint directory instead of the seeded
    /// initialization (fine-tuning); relative paths are relative to the config file. Its
    /// `config.json` must describe `[model]`. Every rank reads only the tensors it holds;
    /// the MTP modules are initialized from `seed` when the checkpoint has none (as
    /// transformers saves). The optimizer state starts fresh. A resumed run (`--resume`,
    /// or a recovery from a committed checkpoint) restores its checkpoint instead: that
    /// holds the fine-tuned state, so `init_from` is not read then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// The largest weights file of the final HF-layout save: bytes, or a size like
    /// `"5GB"`, `"500MB"`, `"10KiB"` (default: transformers' 50GB); larger models are
    /// written as `model-0000i-of-0000N.safetensors` shards with an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_shard_size: Option<ShardSize>,
}

/// A `max_shard_size`: bytes, from an integer or a size string ([`parse_shard_size`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "u64")]
pub struct ShardSize(pub u64);

impl From<ShardSize> for u64 {
    fn from(size: ShardSize) -> u64 {
        size.0
    }
}

impl<'de> Deserialize<'de> for ShardSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Bytes(0) => Err(serde::de::Error::custom("a shard size must be at least 1 byte")),
            Raw::Bytes(n) => Ok(ShardSize(n)),
            Raw::Text(text) => parse_shard_size(&text).map(ShardSize).map_err(serde::de::Error::custom),
        }
    }
}

impl TrainConfig {
    /// The final save's `max_shard_size` in bytes.
    pub fn shard_size(&self) -> u64 {
        self.max_shard_size.map_or(DEFAULT_MAX_SHARD_SIZE, |s| s.0)
    }
}

/// The `[checkpoint]` table: every `interval` steps each worker snapshots its state and
/// writes its shard in the background; the coordinator commits the checkpoint once every
/// shard is durable and keeps the newest `keep` committed ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Steps between checkpoints; 0 takes none (a recovery then restarts from the seeded
    /// initialization).
    #[serde(default)]
    pub interval: u64,
    /// Committed checkpoints kept; older ones are deleted once a newer one commits.
    #[serde(default = "default_keep")]
    pub keep: u32,
}

fn default_keep() -> u32 {
    3
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { interval: 0, keep: default_keep() }
    }
}

impl CheckpointConfig {
    /// Whether the state after `step` is checkpointed.
    pub fn due(&self, step: u64) -> bool {
        self.interval > 0 && step > 0 && step.is_multiple_of(self.interval)
    }
}

/// Checks the `[checkpoint]` and `[recovery]` tables; the error is the field at fault
/// (`checkpoint.keep`, …) and why. The coordinator, which enforces them, checks them with
/// this too.
pub fn validate_policy(
    checkpoint: &CheckpointConfig,
    recovery: &RecoveryConfig,
) -> Result<(), (&'static str, String)> {
    if checkpoint.keep == 0 {
        return Err(("checkpoint.keep", "must be at least 1".into()));
    }
    let timeout = recovery.step_timeout_s;
    if !(timeout.is_finite() && (0.0..=1e7).contains(&timeout)) {
        return Err(("recovery.step_timeout_s", format!("must be between 0 and 1e7 seconds, got {timeout}")));
    }
    let replace = recovery.replace_timeout_s;
    if !(replace.is_finite() && (0.0..=1e7).contains(&replace)) {
        return Err((
            "recovery.replace_timeout_s",
            format!("must be between 0 and 1e7 seconds, got {replace}"),
        ));
    }
    if recovery.backoff_ms > 3_600_000 {
        return Err((
            "recovery.backoff_ms",
            format!("must be at most one hour (3600000), got {}", recovery.backoff_ms),
        ));
    }
    Ok(())
}

/// The `[recovery]` table: how often and how patiently the coordinator restarts a job
/// whose worker failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryConfig {
    /// Recoveries allowed per job; the next failure fails the job.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// The wait before the first restart, in milliseconds; it doubles with each restart.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// A step that does not complete on every rank within this many seconds of the previous
    /// one (or of the start) is a failure, like a lost worker: it catches a worker hung in
    /// compute or in a collective while its heartbeats still flow. 0 disables.
    #[serde(default = "default_step_timeout_s")]
    pub step_timeout_s: f64,
    /// Data-parallel jobs (no `[parallel]` table): the fewest workers the job may continue
    /// on when a failed worker does not come back within `replace_timeout_s` (the world
    /// shrinks to the largest size at least this that divides `batch_size` and that the
    /// idle workers can fill; losses then equal the full run's to rounding, not bits).
    /// 0 (the default): never shrink.
    #[serde(default)]
    pub min_workers: u32,
    /// How long a recovering job waits for a replacement before shrinking, in seconds.
    #[serde(default = "default_replace_timeout_s")]
    pub replace_timeout_s: f64,
}

fn default_replace_timeout_s() -> f64 {
    60.0
}

fn default_max_restarts() -> u32 {
    3
}

fn default_backoff_ms() -> u64 {
    500
}

fn default_step_timeout_s() -> f64 {
    600.0
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            max_restarts: default_max_restarts(),
            backoff_ms: default_backoff_ms(),
            step_timeout_s: default_step_timeout_s(),
            min_workers: 0,
            replace_timeout_s: default_replace_timeout_s(),
        }
    }
}

/// The `[parallel]` table of a run: the layout of a pipeline/expert-parallel job, parsed
/// and checked by `flotilla-layout` (the one definition the coordinator and the workers
/// share). The coordinator checks it against the cluster and the model; workers obey the
/// assignment it derives from it.
pub use flotilla_layout::ParallelConfig;

/// Errors of a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The run configuration is invalid.
    #[error("invalid training config: {0}")]
    Config(String),
    /// The model configuration is invalid.
    #[error(transparent)]
    Model(#[from] ConfigError),
    /// The model refused its inputs.
    #[error(transparent)]
    Compute(#[from] ModelError),
    /// Reading data or writing outputs failed.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// Writing the weights failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A tokenizer or dataset failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Reading a checkpoint's shards failed, or they do not fit this model.
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// A checkpoint cannot resume this run.
    #[error("cannot restore the checkpoint: {0}")]
    Restore(String),
    /// The loss became NaN or infinite.
    #[error("the loss is not finite at step {step} ({loss})")]
    Diverged {
        /// The step.
        step: u64,
        /// The loss.
        loss: f64,
    },
}

impl TrainConfig {
    /// Parses the TOML text of a run; `base` is the directory relative paths start from.
    pub fn from_toml(text: &str, base: &Path) -> Result<(TrainConfig, ModelConfig), TrainError> {
        let mut config: TrainConfig = toml::from_str(text).map_err(|e| TrainError::Config(e.to_string()))?;
        let fix = |p: &mut PathBuf| resolve_relative(p, base);
        match &mut config.data {
            DataConfig::Synthetic { .. } => {}
            DataConfig::Text { path, tokenizer } | DataConfig::Sft { path, tokenizer, .. } => {
                fix(path);
                tokenizer.iter_mut().for_each(fix);
            }
            DataConfig::Indexed { path, tokenizer } => {
                path.resolve(base);
                tokenizer.iter_mut().for_each(fix);
            }
        }
        config.init_from.iter_mut().for_each(fix);
        let model = ModelConfig::from_toml(
            &toml::to_string(&config.model).map_err(|e| TrainError::Config(e.to_string()))?,
        )?;
        config.validate(&model)?;
        Ok((config, model))
    }

    fn validate(&self, model: &ModelConfig) -> Result<(), TrainError> {
        let bad = |field: &str, detail: String| Err(TrainError::Config(format!("`{field}` {detail}")));
        let sizes = RunSizes {
            steps: self.steps,
            batch_size: self.batch_size as u64,
            seq_len: self.seq_len as u64,
            threads: self.threads.map(|t| t as u64),
        };
        if let Err((field, reason)) = validate_run_sizes(sizes, model) {
            return bad(field, reason);
        }
        if let Err((field, reason)) = self.data.check() {
            return bad(field, reason);
        }
        let bytes = match &self.data {
            DataConfig::Synthetic { .. } => true,
            DataConfig::Text { tokenizer, .. } | DataConfig::Sft { tokenizer, .. } => tokenizer.is_none(),
            DataConfig::Indexed { .. } => false,
        };
        if bytes && model.vocab_size < BYTE_VOCAB {
            return bad(
                "model.vocab_size",
                format!("must be at least {BYTE_VOCAB} for the byte tokenizer, got {}", model.vocab_size),
            );
        }
        if !(self.balance.bias_gamma.is_finite() && self.balance.bias_gamma >= 0.0) {
            return bad(
                "balance.bias_gamma",
                format!("must be finite and ≥ 0, got {}", self.balance.bias_gamma),
            );
        }
        self.optimizer.adamw.validate().map_err(|e| TrainError::Config(e.to_string()))?;
        self.optimizer.schedule.validate().map_err(|e| TrainError::Config(e.to_string()))?;
        self.loss.validate().map_err(|e| TrainError::Config(e.to_string()))?;
        if let Err((field, reason)) = validate_policy(&self.checkpoint, &self.recovery) {
            return bad(field, reason);
        }
        Ok(())
    }

    /// The tokenizer of the data: the byte tokenizer unless `data.tokenizer` names one.
    pub fn tokenizer(&self) -> Result<Tokenizer, TrainError> {
        let path = match &self.data {
            DataConfig::Synthetic { .. } => None,
            DataConfig::Text { tokenizer, .. }
            | DataConfig::Indexed { tokenizer, .. }
            | DataConfig::Sft { tokenizer, .. } => tokenizer.as_deref(),
        };
        Ok(Tokenizer::load(path, None)?)
    }

    /// The token stream of a `synthetic` or `text` source (`indexed` data is not loaded
    /// whole: an error).
    pub fn load_tokens(&self) -> Result<Vec<u32>, TrainError> {
        match &self.data {
            DataConfig::Synthetic { tokens } => Ok(synthetic_corpus(self.seed, *tokens)),
            DataConfig::Text { path, .. } => {
                let text = std::fs::read_to_string(path)
                    .map_err(|error| TrainError::Io { path: path.clone(), error })?;
                Ok(self.tokenizer()?.encode(&text)?)
            }
            DataConfig::Indexed { .. } => Err(TrainError::Config(
                "`data.kind = \"indexed\"` is read memory-mapped, not as one stream".into(),
            )),
            DataConfig::Sft { .. } => Err(TrainError::Config(
                "`data.kind = \"sft\"` is read as packed conversations, not as one stream".into(),
            )),
        }
    }

    /// The run's window source for a model of `vocab_size` ids and MTP depth `mtp_depth`;
    /// errors if the model's vocabulary does not cover the tokenizer's.
    pub fn sampler(&self, vocab_size: usize, mtp_depth: usize) -> Result<DataSampler, TrainError> {
        self.tokenizer()?.check_vocab(vocab_size)?;
        match &self.data {
            DataConfig::Synthetic { .. } | DataConfig::Text { .. } => Ok(DataSampler::Stream(Sampler::new(
                self.load_tokens()?,
                self.seed,
                self.seq_len,
                mtp_depth,
            )?)),
            DataConfig::Indexed { path, .. } => {
                let datasets = path
                    .datasets()
                    .map_err(TrainError::Config)?
                    .into_iter()
                    .map(|(w, prefix)| Ok((w, IndexedDataset::open(&prefix)?)))
                    .collect::<Result<Vec<_>, DataError>>()?;
                Ok(DataSampler::Indexed(IndexedSampler::new(
                    datasets,
                    self.seed,
                    self.seq_len,
                    mtp_depth,
                    self.batch_size,
                )?))
            }
            DataConfig::Sft { path, .. } => Ok(DataSampler::Sft(SftSampler::open(
                path,
                &self.tokenizer()?,
                self.seed,
                self.seq_len,
                mtp_depth,
                self.batch_size,
            )?)),
        }
    }

    /// How a packed SFT batch's losses are averaged; `None` for pre-training data.
    pub fn sft_normalization(&self) -> Option<LossNormalization> {
        match &self.data {
            DataConfig::Sft { loss_normalization, .. } => Some(*loss_normalization),
            _ => None,
        }
    }
}

/// One step's record, as written to `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// 1-based step.
    pub step: u64,
    /// Total loss.
    pub loss: f64,
    /// Main next-token cross-entropy (nats).
    pub main_ce: f64,
    /// MTP cross-entropy per depth.
    pub mtp_ce: Vec<f64>,
    /// Sequence-wise balance loss (summed over MoE layers).
    pub balance_loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens per second of this step.
    pub tokens_per_s: f64,
    /// Largest max/mean expert load ratio over MoE layers.
    pub max_expert_load: f64,
    /// Mean over MoE layers of the max/mean expert load ratio.
    pub mean_expert_load: f64,
    /// Per MoE layer (by HF layer index, MTP modules included): tokens routed to each
    /// expert in this step.
    pub expert_loads: Vec<LayerLoad>,
}

/// One MoE layer's expert loads in a step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerLoad {
    /// HF layer index.
    pub layer: usize,
    /// Tokens per routed expert.
    pub tokens: Vec<u64>,
}

/// The optimizer's state: BF16 moments per trainable parameter.
struct AdamState {
    m: Vec<Vec<bf16>>,
    v: Vec<Vec<bf16>>,
}

/// A model being trained, with its optimizer and data.
pub struct Trainer {
    /// The run.
    pub config: TrainConfig,
    /// The model (f32).
    pub model: Model<f32>,
    sampler: DataSampler,
    state: AdamState,
    /// For each of `model.params()`, its index in `state` (the order of
    /// `model.trainable_params_mut()`), `None` for the selection biases.
    state_index: Vec<Option<usize>>,
    threads: usize,
    step: u64,
    /// What `init_from` loaded, when the run started from an HF checkpoint.
    pub init: Option<FillReport>,
}

/// The counts of step `step`'s whole batch (windows `0..batch_size`) for `heads` heads
/// (`1 + D`), for packed SFT data (`None` otherwise): what every micro-batch and rank
/// normalizes by ([`crate::packing::BatchCounts`]). Every rank computes it from the data,
/// as it draws its own windows.
pub fn batch_counts(
    sampler: &DataSampler,
    config: &TrainConfig,
    step: u64,
    heads: usize,
) -> Result<Option<BatchCounts>, DataError> {
    let (Some(normalization), DataSampler::Sft(sft)) = (config.sft_normalization(), sampler) else {
        return Ok(None);
    };
    let masks: Vec<SampleMask> =
        (0..config.batch_size as u64).filter_map(|i| sft.window(step, i).sft).collect();
    Ok(Some(BatchCounts::of(&masks, config.seq_len, heads, normalization)))
}

/// A batch's token windows and, for packed SFT data, their sample masks.
pub type SplitWindows = (Vec<Vec<u32>>, Option<Vec<SampleMask>>);

/// A batch's tokens and, for packed SFT windows, their masks (all or none: a batch that
/// mixes both is an error).
pub fn split_windows(windows: Vec<Window>) -> Result<SplitWindows, DataError> {
    let packed = windows.iter().filter(|w| w.sft.is_some()).count();
    if packed != 0 && packed != windows.len() {
        return Err(DataError::Config(format!(
            "a batch of {} windows mixes {packed} packed SFT windows with pre-training ones",
            windows.len()
        )));
    }
    let mut masks = Vec::with_capacity(packed);
    let tokens = windows
        .into_iter()
        .map(|w| {
            masks.extend(w.sft);
            w.tokens
        })
        .collect();
    Ok((tokens, (packed > 0).then_some(masks)))
}

/// Fills `params` (the tensors this process or rank holds) from the HF checkpoint `dir`
/// for `init_from`: its `config.json` must describe `model` (the error names the first
/// differing field), each tensor is decoded straight into its parameter, and the MTP
/// modules keep their seeded initialization when the checkpoint has none
/// ([`MtpPolicy::SeedIfAbsent`]). All or nothing.
pub fn init_from_checkpoint(
    dir: &Path,
    model: &ModelConfig,
    params: &mut [&mut crate::param::Param<f32>],
) -> Result<FillReport, TrainError> {
    let reader = HfReader::open(dir)?;
    reader.check_model(model)?;
    Ok(fill_from_reader(&reader, params, MtpPolicy::SeedIfAbsent)?)
}

/// The line the CLI prints after `init_from`: how many tensors came from `dir`, and which
/// MTP tensors were initialized from `seed` because the checkpoint has none.
pub fn describe_init(dir: &Path, report: &FillReport, seed: u64) -> String {
    let mut line = format!("init-from {}: {} tensors loaded", dir.display(), report.loaded);
    if !report.seeded.is_empty() {
        line += &format!(
            ", MTP module ({} tensors) initialized from seed {seed}: the checkpoint has none",
            report.seeded.len()
        );
    }
    line
}

impl Trainer {
    /// Builds the model and the data sampler.
    pub fn new(config: TrainConfig, model_config: &ModelConfig) -> Result<Trainer, TrainError> {
        let mut model = Model::new_with(model_config, config.seed, config.recompute, config.precision)?;
        let init = match &config.init_from {
            Some(dir) => Some(init_from_checkpoint(dir, model_config, &mut model.params_mut())?),
            None => None,
        };
        let sampler = config.sampler(model_config.vocab_size, model_config.num_nextn_predict_layers)?;
        let params = model.trainable_params_mut();
        let state = AdamState {
            m: params.iter().map(|p| vec![bf16::ZERO; p.len()]).collect(),
            v: params.iter().map(|p| vec![bf16::ZERO; p.len()]).collect(),
        };
        let trainable: Vec<String> = params.iter().map(|p| p.name.clone()).collect();
        let state_index =
            state_indices(&model.params().iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), &trainable)?;
        let threads = config
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        Ok(Trainer { config, model, sampler, state, state_index, threads, step: 0, init })
    }

    /// Where the windows come from.
    pub fn data(&self) -> &DataSampler {
        &self.sampler
    }

    /// Steps taken so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Runs one optimizer step on the whole batch.
    pub fn train_step(&mut self) -> Result<StepRecord, TrainError> {
        let start = Instant::now();
        let stats = self.forward_backward_shard(0, 1)?;
        self.apply_update(&stats, start)
    }

    /// The first half of a data-parallel step: zeroes the gradients and runs forward and
    /// backward over this rank's share of step `self.step() + 1`'s batch — windows
    /// `rank·B/size .. (rank+1)·B/size` of the `B = batch_size` windows the step draws — so
    /// that the gradients are those of the mean loss over the share. Ranks must see equal
    /// shares (`size` divides `batch_size`) for the mean of their gradients to be the
    /// whole batch's.
    pub fn forward_backward_shard(&mut self, rank: usize, size: usize) -> Result<StepStats, TrainError> {
        let batch = self.config.batch_size;
        if size == 0 || rank >= size || !batch.is_multiple_of(size) {
            return Err(TrainError::Config(format!(
                "batch_size {batch} cannot be split evenly over {size} data-parallel ranks (rank {rank})"
            )));
        }
        let step = self.step + 1;
        let share = (batch / size) as u64;
        let first = rank as u64 * share;
        let drawn = (first..first + share)
            .map(|i| self.sampler.window(step, i))
            .collect::<Result<Vec<Window>, DataError>>()?;
        let (windows, masks) = split_windows(drawn)?;
        let counts = batch_counts(&self.sampler, &self.config, step, 1 + self.model.mtp_depth())?;
        self.model.zero_grad();
        let (seq_len, loss) = (self.config.seq_len, &self.config.loss);
        let stats = match (self.config.sft_normalization(), &masks) {
            (Some(normalization), Some(masks)) => {
                let sft = Sft { masks, normalization, batch: counts.as_ref() };
                self.model.forward_backward_packed(&windows, &sft, seq_len, loss, self.threads)?
            }
            _ => self.model.forward_backward(&windows, seq_len, loss, self.threads)?,
        };
        if !stats.loss.is_finite() {
            return Err(TrainError::Diverged { step, loss: stats.loss });
        }
        Ok(stats)
    }

    /// The second half of a step: clipping, AdamW and the selection-bias update from the
    /// gradients now in the model and the whole batch's `stats` (after a data-parallel
    /// all-reduce, every rank passes the same gradients and stats, so every rank takes the
    /// same step). `start` is when the step began, for its tokens/s.
    pub fn apply_update(&mut self, stats: &StepStats, start: Instant) -> Result<StepRecord, TrainError> {
        let step = self.step + 1;
        if !stats.loss.is_finite() {
            return Err(TrainError::Diverged { step, loss: stats.loss });
        }
        // The optimizer runs on the model's backend.
        let be = self.model.backend();
        let mut params = self.model.trainable_params_mut();
        let grad_norm = be.global_grad_norm(&params.iter().map(|p| p.grad.host()).collect::<Vec<_>>());
        let scale = be.clip_scale(grad_norm, self.config.optimizer.clip);
        let lr = self.config.optimizer.schedule.lr_at(step);
        for ((p, m), v) in params.iter_mut().zip(&mut self.state.m).zip(&mut self.state.v) {
            if scale != 1.0 {
                p.grad.host_mut().iter_mut().for_each(|g| *g *= scale);
            }
            // Weight decay applies to matrices, not to RMSNorm weights (vectors).
            let decay = p.shape.len() >= 2;
            be.adamw_step(
                p.value.host_mut(),
                p.grad.host(),
                m,
                v,
                step,
                lr,
                &self.config.optimizer.adamw,
                decay,
            )
            .map_err(ModelError::from)?;
        }
        if self.config.balance.bias_gamma > 0.0 {
            self.model.update_bias(&stats.expert_loads, self.config.balance.bias_gamma)?;
        }
        self.step = step;

        let tokens = self.config.batch_size * self.config.seq_len;
        Ok(step_record(step, stats, lr, grad_norm, tokens, start.elapsed()))
    }

    /// This rank's share of the state after the last step, for a checkpoint shard: the
    /// tensors of `model.params()` (selection biases included) are dealt to the `world`
    /// ranks whole, each to the rank with the fewest bytes so far (the lowest such rank on a
    /// tie) in `params()` order — deterministic, so the ranks' shares are disjoint and cover
    /// the model — each with its AdamW moments if it is trainable. `rank ≥ world` (or
    /// `world = 0`) gets no tensor.
    pub fn snapshot(&self, rank: usize, world: usize) -> Snapshot {
        let mut loads = vec![0u64; world];
        let mut pieces = Vec::new();
        for (p, &slot) in self.model.params().into_iter().zip(&self.state_index) {
            let Some((owner, load)) = loads.iter_mut().enumerate().min_by_key(|(r, load)| (**load, *r))
            else {
                break;
            };
            let moments = slot.map(|i| (&self.state.m[i], &self.state.v[i]));
            *load += 4 * p.len() as u64 + moments.map_or(0, |_| 4 * p.len() as u64);
            if owner != rank {
                continue;
            }
            pieces.push(Piece::value_of(p));
            if let Some((m, v)) = moments {
                for (kind, data) in [(PieceKind::ExpAvg, m), (PieceKind::ExpAvgSq, v)] {
                    pieces.push(Piece {
                        name: p.name.clone(),
                        kind,
                        start: 0,
                        shape: p.shape.clone(),
                        data: PieceData::Bf16(data.clone()),
                    });
                }
            }
        }
        Snapshot {
            header: ShardHeader {
                step: self.step,
                rank: u32::try_from(rank).unwrap_or(u32::MAX),
                world: u32::try_from(world).unwrap_or(u32::MAX),
                seed: self.config.seed,
                model: self.model.config().clone(),
            },
            pieces,
        }
    }

    /// Restores the values (selection biases included), the AdamW moments and the step
    /// from a checkpoint, whatever layout wrote it. The checkpoint must come from this
    /// model (checked first, naming the first differing field) and this run's `seed` (the
    /// data position is the step: batches are a function of `(seed, step, index)`, and there
    /// is no other random state), and hold every tensor of the model and no other. All or
    /// nothing: on error the trainer is unchanged.
    pub fn restore(&mut self, reader: &CheckpointReader) -> Result<(), TrainError> {
        reader.check_model(self.model.config())?;
        if reader.seed() != self.config.seed {
            return Err(TrainError::Restore(format!(
                "it was written by a run with `seed` = {}, this run's `seed` is {} (initialization and batches depend on it)",
                reader.seed(),
                self.config.seed
            )));
        }
        let params = self.model.params();
        let names: std::collections::BTreeSet<&str> = params.iter().map(|p| p.name.as_str()).collect();
        if let Some(extra) = reader.value_names().into_iter().find(|n| !names.contains(n.as_str())) {
            return Err(TrainError::Restore(format!("tensor `{extra}` is not a parameter of this model")));
        }
        let mut values = Vec::with_capacity(params.len());
        let mut moments = Vec::with_capacity(self.state.m.len());
        for (p, slot) in params.iter().zip(&self.state_index) {
            if let Some(shape) = reader.shape(&p.name)
                && shape != p.shape.as_slice()
            {
                return Err(TrainError::Restore(format!(
                    "tensor `{}` has shape {shape:?} in the checkpoint, the model needs {:?}",
                    p.name, p.shape
                )));
            }
            values.push(reader.values(&p.name, p.len())?);
            if slot.is_some() {
                moments.push(reader.moments(&p.name, p.len())?);
            }
        }
        drop(params);
        // `values` has each parameter's length (the reader assembles exactly `p.len()`),
        // so no assignment fails and the restore stays all or nothing.
        for (p, value) in self.model.params_mut().into_iter().zip(values) {
            p.set_value(&value)?;
        }
        for ((m, v), (new_m, new_v)) in self.state.m.iter_mut().zip(&mut self.state.v).zip(moments) {
            *m = new_m;
            *v = new_v;
        }
        self.step = reader.step();
        Ok(())
    }

    /// Writes the weights in the HF DeepSeek-V3 layout (MTP layers repeat the embedding
    /// and head under their own names, as DeepSeek's checkpoints do).
    /// Shards of at most the config's `max_shard_size`; returns the weights files written.
    pub fn save(&self, dir: &Path, dtype: WeightDtype) -> Result<Vec<PathBuf>, TrainError> {
        save_model(&self.model, dir, dtype, self.config.shard_size())
    }
}

/// For each of `params` (names in `Model::params` order), its index among `trainable` (the
/// `Model::trainable_params_mut` order, a subsequence of it), or `None` when it is not
/// trainable.
fn state_indices(params: &[&str], trainable: &[String]) -> Result<Vec<Option<usize>>, TrainError> {
    let mut next = 0;
    let indices = params
        .iter()
        .map(|name| {
            let hit = trainable.get(next).is_some_and(|t| t == name);
            next += usize::from(hit);
            hit.then_some(next - 1)
        })
        .collect();
    match trainable.get(next) {
        None => Ok(indices),
        Some(name) => Err(TrainError::Compute(ModelError::Tensor {
            tensor: name.clone(),
            detail: "trainable but out of the parameters' order".into(),
        })),
    }
}

/// The record of optimizer step `step` from the whole batch's statistics: `lr` the rate
/// applied, `grad_norm` the global norm before clipping, `tokens` the positions of the
/// global batch and `elapsed` the step's wall time (for tokens/s).
pub fn step_record(
    step: u64,
    stats: &StepStats,
    lr: f32,
    grad_norm: f64,
    tokens: usize,
    elapsed: std::time::Duration,
) -> StepRecord {
    let ratios: Vec<f64> = stats.expert_loads.iter().map(|l| crate::moe::max_over_mean_load(l)).collect();
    StepRecord {
        step,
        loss: stats.loss,
        main_ce: stats.main_ce,
        mtp_ce: stats.mtp_ce.clone(),
        balance_loss: stats.balance_loss,
        lr: lr as f64,
        grad_norm,
        tokens_per_s: tokens as f64 / elapsed.as_secs_f64(),
        max_expert_load: ratios.iter().copied().fold(0.0, f64::max),
        mean_expert_load: if ratios.is_empty() {
            0.0
        } else {
            ratios.iter().sum::<f64>() / ratios.len() as f64
        },
        expert_loads: stats
            .moe_layers
            .iter()
            .zip(&stats.expert_loads)
            .map(|(&layer, tokens)| LayerLoad { layer, tokens: tokens.clone() })
            .collect(),
    }
}

/// Writes `model`'s weights in the HF DeepSeek-V3 layout (MTP layers repeat the embedding
/// and head under their own names, as DeepSeek's checkpoints do), in shards of at most
/// `max_shard_size` bytes ([`save_hf_sharded`]); returns the weights files written.
pub fn save_model(
    model: &Model<f32>,
    dir: &Path,
    dtype: WeightDtype,
    max_shard_size: u64,
) -> Result<Vec<PathBuf>, TrainError> {
    let params = model.params();
    let mut tensors: Vec<NamedTensor<'_>> =
        params.iter().map(|p| NamedTensor { name: &p.name, shape: &p.shape, data: p.value.host() }).collect();
    let copies = model.mtp_shared_copies();
    tensors.extend(copies.iter().map(|(name, p)| NamedTensor {
        name,
        shape: &p.shape,
        data: p.value.host(),
    }));
    Ok(save_hf_sharded(dir, model.config(), &tensors, dtype, max_shard_size)?)
}
