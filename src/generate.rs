//! `flotilla generate`: prompts in (text, a JSONL file or token ids), generated tokens out,
//! with prefill and decode speeds, the KV cache's bytes per token and, under `--speculative
//! mtp`, the MTP drafts' acceptance rate. Thin: generation is
//! `flotilla_model::generate`'s, loading an HF-layout directory is
//! `flotilla_model::checkpoint`'s and a committed checkpoint [`crate::checkpoint`]'s.

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, ValueEnum};
use flotilla_model::checkpoint::{HfReader, MtpPolicy, fill_from_reader, mtp_layer};
use flotilla_model::data::Tokenizer;
use flotilla_model::generate::{
    FinishReason, GenerateConfig, GenerateStats, Generation, Generator, Sampling,
};
use flotilla_model::{Model, ModelConfig};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Args)]
#[command(group = clap::ArgGroup::new("input").required(true))]
pub struct GenerateArgs {
    /// The model: an HF-layout directory (config.json + *.safetensors, as `flotilla train`
    /// and transformers write it; its MTP module is loaded when it has one), a committed
    /// checkpoint's directory (holding manifest.json), or a run directory without final
    /// weights (its latest committed checkpoint).
    #[arg(long)]
    model: PathBuf,
    /// One prompt as text, encoded with the tokenizer (see --tokenizer).
    #[arg(long, group = "input")]
    prompt: Option<String>,
    /// Prompts, one JSON object per line: `{"prompt": "text"}` or `{"tokens": [ids]}`.
    #[arg(long, group = "input", value_name = "FILE.jsonl")]
    prompts: Option<PathBuf>,
    /// One prompt as token ids, comma-separated.
    #[arg(long, group = "input", value_delimiter = ',', value_name = "ID,ID,...")]
    tokens: Option<Vec<u32>>,
    /// A Hugging Face tokenizer.json for text prompts and for decoding (default: the
    /// model directory's tokenizer.json if it has one, else bytes).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Tokens to generate per prompt, at most.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy; otherwise the logits' divisor before sampling.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f64,
    /// Sample from the smallest set of most likely tokens with at least this mass, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Seeds each prompt's sampling stream (prompt i: stream i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A token id that ends a sequence (kept in its output); repeatable.
    #[arg(long = "stop", value_name = "ID")]
    stop: Vec<u32>,
    /// Speculative decoding: `mtp` drafts the token after next with the model's MTP module
    /// and verifies it in the next step (greedy only; the output is plain greedy's).
    #[arg(long, value_enum)]
    speculative: Option<Speculative>,
    /// Prompts generated together (default: all of them in one batch).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// One JSON object per prompt (tokens, text when decodable, finish reason, the run's
    /// stats), one per line.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Speculative {
    /// The first MTP module proposes one draft token per step.
    Mtp,
}

/// Where the model came from, for the report.
struct Loaded {
    model: Model<f32>,
    source: String,
}

/// Loads `dir`: an HF-layout directory when it has a config.json (a run directory's final
/// weights win over its checkpoints), else a committed checkpoint or run directory through
/// [`crate::checkpoint::load_committed`]. An HF directory without MTP tensors (as
/// transformers saves) is loaded as a model without MTP: a seeded module's drafts would be
/// noise.
fn load_model(dir: &Path) -> Result<Loaded> {
    if !dir.join("config.json").is_file() && crate::checkpoint::is_checkpoint_or_run_dir(dir) {
        let loaded = crate::checkpoint::load_committed(dir)?;
        let source =
            format!("step {} of {} ({})", loaded.manifest.step, loaded.manifest.run_id, loaded.dir.display());
        return Ok(Loaded { model: loaded.model, source });
    }
    let reader = HfReader::open(dir).with_context(|| format!("loading {}", dir.display()))?;
    let mut config: ModelConfig = reader.config().clone();
    let layers = config.num_hidden_layers;
    let has_mtp = reader.names().any(|n| mtp_layer(n, layers).is_some());
    if !has_mtp {
        config.num_nextn_predict_layers = 0;
    }
    let mut model = Model::<f32>::new(&config, 0, false)?;
    fill_from_reader(&reader, &mut model.params_mut(), MtpPolicy::Require)
        .with_context(|| format!("loading {}", dir.display()))?;
    Ok(Loaded { model, source: dir.display().to_string() })
}

/// The tokenizer: `--tokenizer`, else the model directory's tokenizer.json, else bytes.
fn tokenizer(args: &GenerateArgs) -> Result<Tokenizer> {
    let beside = args.model.join("tokenizer.json");
    let path = args.tokenizer.clone().or_else(|| beside.is_file().then_some(beside));
    Ok(Tokenizer::load(path.as_deref(), None)?)
}

/// The prompts of `--prompts FILE`: one JSON object per non-blank line with `prompt` (a
/// string) or `tokens` (an array of ids), errors naming `file:line`.
fn read_prompts_file(path: &Path) -> Result<Vec<(String, PromptLine)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let prompt = parse_prompt_line(line).with_context(|| at.clone())?;
        prompts.push((at, prompt));
    }
    ensure!(!prompts.is_empty(), "{}: no prompts (one JSON object per line)", path.display());
    Ok(prompts)
}

/// One prompt: a line of a prompts file, `--prompt` or `--tokens`.
#[derive(Debug, PartialEq)]
enum PromptLine {
    /// `{"prompt": "..."}`.
    Text(String),
    /// `{"tokens": [...]}`.
    Tokens(Vec<u32>),
}

fn parse_prompt_line(line: &str) -> Result<PromptLine> {
    let value: serde_json::Value = serde_json::from_str(line).context("not valid JSON")?;
    let serde_json::Value::Object(object) = value else {
        bail!("expected a JSON object with `prompt` or `tokens`");
    };
    if let Some(key) = object.keys().find(|k| *k != "prompt" && *k != "tokens") {
        bail!("unknown field `{key}` (expected `prompt` or `tokens`)");
    }
    match (object.get("prompt"), object.get("tokens")) {
        (Some(_), Some(_)) => bail!("give `prompt` or `tokens`, not both"),
        (None, None) => bail!("expected a field `prompt` (text) or `tokens` (ids)"),
        (Some(prompt), None) => match prompt.as_str() {
            Some(text) => Ok(PromptLine::Text(text.to_owned())),
            None => bail!("`prompt` must be a string"),
        },
        (None, Some(tokens)) => {
            let Some(items) = tokens.as_array() else { bail!("`tokens` must be an array of token ids") };
            items
                .iter()
                .enumerate()
                .map(|(j, v)| {
                    v.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| {
                        anyhow::anyhow!("`tokens[{j}]` = {v} is not a token id (an integer in 0..2^32)")
                    })
                })
                .collect::<Result<Vec<u32>>>()
                .map(PromptLine::Tokens)
        }
    }
}

/// Timings and counts over every batch.
#[derive(Default)]
struct Totals {
    stats: GenerateStats,
    prefill: Duration,
    decode: Duration,
    /// Tokens sampled by decode steps (each sequence's first comes from the prefill).
    decode_tokens: usize,
    /// The most bytes the main model's KV cache held at once.
    peak_cache_bytes: usize,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    ensure!(args.max_new_tokens >= 1, "`--max-new-tokens` must be at least 1");
    ensure!(args.batch_size != Some(0), "`--batch-size` must be at least 1");
    let loaded = load_model(&args.model)?;
    let model = &loaded.model;
    let vocab = model.config().vocab_size;
    let tokenizer = tokenizer(&args)?;
    // Bytes decode text only for a byte-vocabulary model; a tokenizer.json always does.
    let decodes = tokenizer.check_vocab(vocab).is_ok();
    let encode = |text: &str, what: &str| -> Result<Vec<u32>> {
        tokenizer.check_vocab(vocab).with_context(|| {
            format!(
                "{what} is text but the model's vocabulary does not cover {} (give --tokenizer, or token ids)",
                tokenizer.describe()
            )
        })?;
        Ok(tokenizer.encode(text)?)
    };

    // Each prompt with what names it in errors: its flag or `file:line`.
    let named: Vec<(String, PromptLine)> = match (&args.prompt, &args.tokens, &args.prompts) {
        (Some(text), _, _) => vec![("--prompt".into(), PromptLine::Text(text.clone()))],
        (None, Some(tokens), _) => vec![("--tokens".into(), PromptLine::Tokens(tokens.clone()))],
        (None, None, Some(path)) => read_prompts_file(path)?,
        (None, None, None) => bail!("give --prompt, --prompts or --tokens"),
    };
    let mut prompts = Vec::with_capacity(named.len());
    for (at, prompt) in &named {
        prompts.push(match prompt {
            PromptLine::Text(text) => encode(text, at)?,
            PromptLine::Tokens(tokens) => tokens.clone(),
        });
    }

    let config = GenerateConfig {
        max_new_tokens: args.max_new_tokens,
        stop_tokens: args.stop.clone(),
        sampling: Sampling { temperature: args.temperature, top_p: args.top_p, seed: args.seed },
        speculative_mtp: args.speculative.is_some(),
    };
    if config.speculative_mtp && model.mtp_depth() == 0 {
        bail!(
            "`--speculative mtp`: {} has no MTP module (no `model.layers.{}.*` tensors, or num_nextn_predict_layers = 0)",
            args.model.display(),
            model.config().num_hidden_layers
        );
    }
    let threads =
        args.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    ensure!(threads >= 1, "`--threads` must be at least 1");
    let batch = args.batch_size.unwrap_or(prompts.len()).max(1);

    let mut outputs: Vec<Generation> = Vec::with_capacity(prompts.len());
    let mut totals = Totals::default();
    for (b, chunk) in prompts.chunks(batch).enumerate() {
        // Prompt fields in errors name the input line, not the position in the batch.
        let mut generator = Generator::new(model, chunk, config.clone(), threads)
            .map_err(|e| name_prompt(e, &named[b * batch..]))?;
        let started = Instant::now();
        generator.prefill()?;
        totals.prefill += started.elapsed();
        let started = Instant::now();
        let first = generator.stats().generated;
        totals.peak_cache_bytes = totals.peak_cache_bytes.max(generator.cache_bytes());
        while generator.step()? {
            totals.peak_cache_bytes = totals.peak_cache_bytes.max(generator.cache_bytes());
        }
        totals.peak_cache_bytes = totals.peak_cache_bytes.max(generator.cache_bytes());
        totals.decode += started.elapsed();
        let stats = generator.stats();
        totals.decode_tokens += stats.generated - first;
        let t = &mut totals.stats;
        t.prefill_tokens += stats.prefill_tokens;
        t.decode_steps += stats.decode_steps;
        t.generated += stats.generated;
        t.drafts += stats.drafts;
        t.accepted += stats.accepted;
        outputs.extend(generator.outputs());
    }

    let per_token = model.kv_bytes_per_token();
    let c = model.config();
    let formula = format!(
        "{} layers × (kv_lora_rank {} + qk_rope_head_dim {}) × 4 B",
        c.num_hidden_layers, c.kv_lora_rank, c.qk_rope_head_dim
    );
    let rate = |n: usize, d: Duration| {
        let s = d.as_secs_f64();
        if s > 0.0 { n as f64 / s } else { f64::INFINITY }
    };
    let prefill_tps = rate(totals.stats.prefill_tokens, totals.prefill);
    let decode_tps = rate(totals.decode_tokens, totals.decode);
    let stats_json = serde_json::json!({
        "prompts": prompts.len(),
        "batch_size": batch,
        "threads": threads,
        "prefill_tokens": totals.stats.prefill_tokens,
        "prefill_s": totals.prefill.as_secs_f64(),
        "prefill_tokens_per_s": prefill_tps,
        "decode_tokens": totals.decode_tokens,
        "decode_steps": totals.stats.decode_steps,
        "decode_s": totals.decode.as_secs_f64(),
        "decode_tokens_per_s": decode_tps,
        "generated": totals.stats.generated,
        "kv_cache_bytes_per_token": per_token,
        "kv_cache_peak_bytes": totals.peak_cache_bytes,
        "speculative": args.speculative.map(|_| "mtp"),
        "drafts": totals.stats.drafts,
        "accepted": totals.stats.accepted,
        "acceptance_rate": totals.stats.acceptance_rate(),
    });

    for (i, (out, prompt)) in outputs.iter().zip(&prompts).enumerate() {
        let text = if decodes { Some(tokenizer.decode(&out.tokens)?) } else { None };
        let finish = match out.finish {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        };
        if args.json {
            let line = serde_json::json!({
                "index": i,
                "prompt_tokens": prompt,
                "tokens": out.tokens,
                "text": text,
                "finish": finish,
                "stats": stats_json,
            });
            println!("{line}");
        } else {
            let shown = match &text {
                Some(t) => format!("{t:?}"),
                None => out.tokens.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
            };
            println!("[{i}] {} new tokens ({finish}): {shown}", out.tokens.len());
        }
    }
    if !args.json {
        println!("model: {}", loaded.source);
        println!(
            "prefill: {} tokens in {:.3} s ({prefill_tps:.1} tokens/s); decode: {} tokens in {} steps, {:.3} s ({decode_tps:.1} tokens/s); {threads} threads, batches of {batch}",
            totals.stats.prefill_tokens,
            totals.prefill.as_secs_f64(),
            totals.decode_tokens,
            totals.stats.decode_steps,
            totals.decode.as_secs_f64(),
        );
        println!(
            "KV cache: {per_token} B per token ({formula}, MLA's compressed c_kv and rope key); peak {} B",
            totals.peak_cache_bytes
        );
        if let Some(rate) = totals.stats.acceptance_rate() {
            println!(
                "speculative (mtp): {} of {} drafts accepted ({:.1}%), {:.2} tokens per decode step",
                totals.stats.accepted,
                totals.stats.drafts,
                100.0 * rate,
                totals.decode_tokens as f64 / totals.stats.decode_steps.max(1) as f64
            );
        }
    }
    Ok(())
}

/// A prompt error of the library (`prompts[i]`, its index in the batch) renamed after its
/// input: `--tokens`, `--prompt`, or `FILE:LINE`.
fn name_prompt(e: flotilla_model::generate::GenerateError, named: &[(String, PromptLine)]) -> anyhow::Error {
    use flotilla_model::generate::GenerateError;
    if let GenerateError::Invalid { field, detail } = &e {
        let index = field.strip_prefix("prompts[").and_then(|r| r.strip_suffix(']'));
        if let Some((at, _)) = index.and_then(|i| i.parse::<usize>().ok()).and_then(|i| named.get(i)) {
            return anyhow::anyhow!("{at}: prompt {detail}");
        }
        let flag = match field.as_str() {
            "max_new_tokens" => "--max-new-tokens",
            "temperature" => "--temperature",
            "top_p" => "--top-p",
            "stop_tokens" => "--stop",
            "speculative" => "--speculative",
            other => return anyhow::anyhow!("`{other}`: {detail}"),
        };
        return anyhow::anyhow!("`{flag}`: {detail}");
    }
    e.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_lines_parse_or_name_the_problem() {
        assert_eq!(parse_prompt_line(r#"{"prompt": "hi"}"#).unwrap(), PromptLine::Text("hi".into()));
        assert_eq!(parse_prompt_line(r#"{"tokens": [1, 2, 3]}"#).unwrap(), PromptLine::Tokens(vec![1, 2, 3]));
        let err = |line: &str| format!("{:#}", parse_prompt_line(line).unwrap_err());
        assert!(err("[1, 2]").contains("JSON object"), "{}", err("[1, 2]"));
        assert!(err("{").contains("not valid JSON"));
        assert!(err(r#"{"prompt": "a", "tokens": [1]}"#).contains("not both"));
        assert!(err(r#"{"text": "a"}"#).contains("unknown field `text`"));
        assert!(err(r#"{"prompt": 3}"#).contains("`prompt` must be a string"));
        assert!(err(r#"{"tokens": [1, -2]}"#).contains("`tokens[1]`"));
        assert!(err(r#"{"tokens": [1.5]}"#).contains("`tokens[0]`"));
        assert!(err(r#"{"tokens": "1,2"}"#).contains("array"));
        assert!(err("{}").contains("`prompt`"));
    }
}
