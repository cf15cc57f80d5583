//! `flotilla train` and `flotilla score`: single-process training with a progress bar and
//! `metrics.jsonl`, and scoring text under a saved HF-layout checkpoint.

use anyhow::{Context, Result, bail};
use clap::Args;
use flotilla_model::ModelConfig;
use flotilla_model::checkpoint::{HfReader, MtpPolicy, WeightDtype, fill_from_reader};
use flotilla_model::data::Tokenizer;
use flotilla_model::model::Model;
use flotilla_model::train::{ShardSize, TrainConfig, Trainer, describe_init};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
pub struct TrainArgs {
    /// The run's TOML (see examples/tiny.toml).
    config: PathBuf,
    /// Override the number of steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Output directory for metrics.jsonl and the weights (default: `runs/<config name>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Storage type of the saved weights.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// Start from this HF-layout checkpoint's weights (config.json + safetensors, sharded
    /// or not, F32/BF16/F16/FP8) instead of the seeded initialization; overrides the
    /// config's `init_from`. Its config.json must describe the run's [model].
    #[arg(long, value_name = "HF_DIR")]
    init_from: Option<PathBuf>,
    /// The largest weights file written ("5GB", "500MB", "10KiB" or bytes; default: the
    /// config's `max_shard_size`, else transformers' 50GB); more is sharded with an index.
    #[arg(long, value_parser = parse_size)]
    max_shard_size: Option<u64>,
}

/// `--max-shard-size` as transformers parses it.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    flotilla_model::checkpoint::parse_shard_size(text)
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Dtype {
    F32,
    Bf16,
    /// DeepSeek's released form: E4M3 linear weights with a `weight_scale_inv` per 128×128
    /// block; the rest BF16.
    Fp8,
}

pub fn train(args: TrainArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let base = args.config.parent().map(PathBuf::from).unwrap_or_default();
    let (mut config, model_config) =
        TrainConfig::from_toml(&text, &base).with_context(|| format!("in {}", args.config.display()))?;
    if let Some(steps) = args.steps {
        anyhow::ensure!(steps > 0, "`--steps` must be at least 1");
        config.steps = steps;
    }
    if let Some(dir) = &args.init_from {
        config.init_from = Some(dir.clone());
    }
    if let Some(size) = args.max_shard_size {
        config.max_shard_size = Some(ShardSize(size));
    }
    let out = args.out.unwrap_or_else(|| {
        PathBuf::from("runs").join(args.config.file_stem().map(PathBuf::from).unwrap_or_else(|| "run".into()))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let metrics_path = out.join("metrics.jsonl");
    let mut metrics = std::io::BufWriter::new(
        std::fs::File::create(&metrics_path)
            .with_context(|| format!("creating {}", metrics_path.display()))?,
    );

    let steps = config.steps;
    let tokens_per_step = (config.batch_size * config.seq_len) as u64;
    let mut trainer = Trainer::new(config, &model_config)?;
    if let (Some(report), Some(dir)) = (&trainer.init, &trainer.config.init_from) {
        println!("{}", describe_init(dir, report, trainer.config.seed));
    }
    let bar = ProgressBar::new(steps).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps · {msg} · ETA {eta}")
            .expect("a valid progress template"),
    );
    let started = std::time::Instant::now();
    let mut last = Vec::new();
    for _ in 0..steps {
        let record = trainer.train_step()?;
        serde_json::to_writer(&mut metrics, &record)?;
        metrics.write_all(b"\n")?;
        bar.set_message(format!("loss {:.4} · {:.0} tok/s", record.loss, record.tokens_per_s));
        bar.inc(1);
        last.push(record.main_ce);
    }
    bar.finish_and_clear();
    metrics.flush()?;
    let dtype = match args.dtype {
        Dtype::F32 => WeightDtype::F32,
        Dtype::Bf16 => WeightDtype::Bf16,
        Dtype::Fp8 => WeightDtype::Fp8,
    };
    let files = trainer.save(&out, dtype)?;

    let elapsed = started.elapsed().as_secs_f64();
    let tail = &last[last.len().saturating_sub(10)..];
    let final_ce = tail.iter().sum::<f64>() / tail.len() as f64;
    // The unigram entropy of an in-memory stream; an indexed dataset is not read whole.
    let entropy = trainer
        .data()
        .stream()
        .map(|tokens| format!("; data unigram entropy: {:.4} nats/token", unigram_entropy(tokens)))
        .unwrap_or_default();
    println!(
        "trained {steps} steps in {elapsed:.1} s ({:.0} tokens/s)\n\
         main loss (mean of the last {} steps): {final_ce:.4} nats/token{entropy}\n\
         metrics: {}\nweights: {} ({} file{})",
        (steps * tokens_per_step) as f64 / elapsed,
        tail.len(),
        metrics_path.display(),
        out.display(),
        files.len(),
        if files.len() == 1 { "" } else { "s, with model.safetensors.index.json" },
    );
    Ok(())
}

/// Entropy of the token frequencies, in nats: the loss of the best model that ignores context.
fn unigram_entropy(tokens: &[u32]) -> f64 {
    let mut counts = std::collections::HashMap::new();
    for &t in tokens {
        *counts.entry(t).or_insert(0usize) += 1;
    }
    let n = tokens.len() as f64;
    counts.values().map(|&c| c as f64 / n).map(|p| -p * p.ln()).sum()
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("input").required(true))]
pub struct ScoreArgs {
    /// An HF-layout DeepSeek-V3 checkpoint directory (config.json + *.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Token ids, comma-separated.
    #[arg(long, group = "input", value_delimiter = ',')]
    tokens: Option<Vec<u32>>,
    /// A UTF-8 text file, byte-tokenized unless --tokenizer is given.
    #[arg(long, group = "input")]
    text: Option<PathBuf>,
    /// A Hugging Face tokenizer.json to encode --text with (default: bytes).
    #[arg(long, requires = "text")]
    tokenizer: Option<PathBuf>,
    /// Threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn score(args: ScoreArgs) -> Result<()> {
    let tokenizer = Tokenizer::load(args.tokenizer.as_deref(), None)?;
    let tokens = match (&args.tokens, &args.text) {
        (Some(tokens), _) => tokens.clone(),
        (None, Some(path)) => tokenizer
            .encode(&std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?)?,
        (None, None) => bail!("give --tokens or --text"),
    };
    anyhow::ensure!(tokens.len() >= 2, "scoring needs at least 2 tokens, got {}", tokens.len());
    let reader = HfReader::open(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let config = reader.config().clone();
    anyhow::ensure!(
        tokens.len() <= config.max_position_embeddings,
        "{} tokens exceed the model's max_position_embeddings = {}",
        tokens.len(),
        config.max_position_embeddings
    );
    if args.text.is_some() {
        tokenizer
            .check_vocab(config.vocab_size)
            .with_context(|| format!("scoring with {}", args.model.display()))?;
    }
    // Scoring reads the main model only: the MTP modules, which transformers does not
    // save, are neither needed nor read.
    let main = ModelConfig { num_nextn_predict_layers: 0, ..config };
    let mut model = Model::<f32>::new(&main, 0, false)?;
    fill_from_reader(&reader, &mut model.params_mut(), MtpPolicy::Require)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let threads =
        args.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let log_probs = model.next_token_log_probs(&tokens, threads)?;
    let nll: f64 = -log_probs.iter().sum::<f64>();
    if args.json {
        let report = serde_json::json!({
            "tokens": tokens,
            "log_probs": log_probs,
            "total_nll": nll,
            "mean_nll": nll / log_probs.len() as f64,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{:>6} {:>8} {:>8} {:>12}", "pos", "token", "next", "log p(next)");
        for (i, lp) in log_probs.iter().enumerate() {
            println!("{i:>6} {:>8} {:>8} {lp:>12.5}", tokens[i], tokens[i + 1]);
        }
        println!(
            "total NLL {nll:.5} nats over {} predictions (mean {:.5})",
            log_probs.len(),
            nll / log_probs.len() as f64
        );
    }
    Ok(())
}
