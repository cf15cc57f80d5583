//! `flotilla data prepare|inspect`: text to a Megatron-LM indexed dataset, and what one
//! holds. Thin: the format, the tokenizers and the preparation live in
//! `flotilla_model::data`.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use flotilla_model::data::prepare::prepare;
use flotilla_model::data::{IndexedDataset, Tokenizer};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Tokenize text files (plain text: one document per file; .jsonl/.json: one per line)
    /// into PREFIX.bin + PREFIX.idx, Megatron-LM's indexed dataset, an end-of-document
    /// token after each document.
    Prepare(PrepareArgs),
    /// Print an indexed dataset's dtype and counts, or one document.
    Inspect(InspectArgs),
}

#[derive(Args)]
pub struct PrepareArgs {
    /// A Hugging Face tokenizer.json (default: the byte tokenizer, end-of-document byte 0).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The end-of-document token, as an id or a token string (default: the tokenizer's
    /// eos_token in a tokenizer_config.json beside it, else its end-of-text special token).
    #[arg(long)]
    eod: Option<String>,
    /// Input files, in order.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// The output prefix: writes PREFIX.bin and PREFIX.idx.
    #[arg(long)]
    out: PathBuf,
    /// The JSONL field holding each document's text.
    #[arg(long, default_value = "text")]
    field: String,
    /// Tokenizer threads (default: all cores); the output is the same for any number.
    #[arg(long, default_value_t = 0)]
    workers: usize,
}

#[derive(Args)]
pub struct InspectArgs {
    /// The dataset's prefix (PREFIX.idx, PREFIX.bin).
    prefix: PathBuf,
    /// Print document N's token ids.
    #[arg(long)]
    doc: Option<usize>,
    /// A tokenizer.json to decode --doc with.
    #[arg(long, requires = "doc")]
    tokenizer: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Prepare(args) => prepare_command(args),
        DataCommand::Inspect(args) => inspect(args),
    }
}

fn prepare_command(args: PrepareArgs) -> Result<()> {
    let tokenizer = Tokenizer::load(args.tokenizer.as_deref(), args.eod.as_deref())?;
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let total: u64 = args.input.iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum();
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} · {bytes_per_sec} · ETA {eta}")
            .expect("a valid progress template"),
    );
    let started = std::time::Instant::now();
    let summary = prepare(&tokenizer, &args.input, &args.out, &args.field, args.workers, &|n| bar.inc(n))?;
    bar.finish_and_clear();
    println!(
        "{} documents, {} tokens ({}) from {} files in {:.1} s with {}\nwrote {}.bin and {}.idx",
        summary.documents,
        summary.tokens,
        summary.dtype.name(),
        args.input.len(),
        started.elapsed().as_secs_f64(),
        tokenizer.describe(),
        args.out.display(),
        args.out.display(),
    );
    Ok(())
}

fn inspect(args: InspectArgs) -> Result<()> {
    let data = IndexedDataset::open(&args.prefix)?;
    let document = match args.doc {
        None => None,
        Some(d) => {
            let tokens = data.document(d)?;
            let text = match &args.tokenizer {
                None => None,
                Some(path) => Some(Tokenizer::from_file(path, None)?.decode(&tokens)?),
            };
            Some((d, tokens, text))
        }
    };
    if args.json {
        let mut report = serde_json::json!({
            "prefix": args.prefix.display().to_string(),
            "dtype": data.dtype().name(),
            "dtype_code": data.dtype().code(),
            "sequences": data.sequences(),
            "documents": data.documents(),
            "tokens": data.tokens(),
        });
        if let Some((d, tokens, text)) = &document {
            report["document"] = serde_json::json!({ "index": d, "tokens": tokens, "text": text });
        }
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{}: dtype {} (code {}), {} sequences, {} documents, {} tokens",
            args.prefix.display(),
            data.dtype().name(),
            data.dtype().code(),
            data.sequences(),
            data.documents(),
            data.tokens()
        );
        if let Some((d, tokens, text)) = document {
            println!(
                "document {d}: {} tokens\n{}",
                tokens.len(),
                tokens.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
            );
            if let Some(text) = text {
                println!("{text}");
            }
        }
    }
    Ok(())
}
