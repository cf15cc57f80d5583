//! `flotilla bench hf-load`: the peak memory of loading an HF-layout checkpoint, one rank's
//! part against the whole model.
//!
//! The bench writes a multi-shard checkpoint of a model sized by its arguments (seeded
//! init, f32, `--max-shard-size` shards with an index), then loads it in fresh child
//! processes of this binary, one at a time: each rank of a 4-rank layout (2 pipeline stages
//! of one stage per rank, as 1F1B/ZB1P place them, × 2 expert shards: what a worker builds
//! with `init_from`) and the whole model (what `flotilla score` builds). Each child reports
//! its peak RSS (`VmHWM` of /proc/self/status) before and after building its model and
//! filling it with [`fill_from_reader`], the bytes its parameters hold, and the bytes the
//! reader decoded. The figures are what the kernel counts: the parameters the child
//! initialized, plus the file pages of the tensors it read (mapped, so counted while the
//! file is open), plus the process's baseline.

use anyhow::{Context, Result, ensure};
use clap::Args;
use flotilla_model::checkpoint::{HfReader, MtpPolicy, fill_from_reader};
use flotilla_model::config::ModelConfig;
use flotilla_model::model::Model;
use flotilla_model::moe::ExpertShard;
use flotilla_model::pipeline::{RankModel, StageLayout};
use flotilla_model::{Precision, Preset};
use std::path::PathBuf;
use std::process::Command;

#[derive(Args)]
pub struct HfLoadArgs {
    /// Main-model layers (split evenly over the 2 pipeline stages).
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 512)]
    hidden: usize,
    /// Routed experts per MoE layer (split over the 2 expert shards).
    #[arg(long, default_value_t = 64)]
    experts: usize,
    /// Each routed expert's intermediate size.
    #[arg(long, default_value_t = 256)]
    moe_intermediate: usize,
    /// The checkpoint's largest file.
    #[arg(long, default_value = "50MB", value_parser = crate::train::parse_size)]
    max_shard_size: u64,
    /// Where the checkpoint is written (removed afterwards).
    #[arg(long, default_value = "runs/bench-hf-load")]
    dir: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Internal: load as this part (`whole`, or `rank:STAGE:EP_RANK`) and report.
    #[arg(long, hide = true)]
    child: Option<String>,
}

/// What one child measured.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
struct Load {
    part: String,
    /// Peak RSS before building the model (the binary and its runtime).
    baseline_kib: u64,
    /// Peak RSS after the load.
    peak_kib: u64,
    /// f32 bytes of the parameters held.
    held_bytes: u64,
    /// Stored bytes the reader decoded.
    decoded_bytes: u64,
    tensors: usize,
}

#[derive(serde::Serialize)]
struct HfLoadBench {
    checkpoint_bytes: u64,
    files: usize,
    parameters: u64,
    ranks: Vec<Load>,
    whole: Load,
    /// The largest rank's peak over the whole model's.
    max_rank_over_whole: f64,
}

fn config(args: &HfLoadArgs) -> Result<ModelConfig> {
    let mut c = Preset::Tiny.config();
    c.num_hidden_layers = args.layers;
    c.hidden_size = args.hidden;
    c.n_routed_experts = args.experts;
    c.moe_intermediate_size = args.moe_intermediate;
    c.validate().context("the bench's model")?;
    ensure!(args.layers >= 2 && args.layers.is_multiple_of(2), "--layers must be even (2 stages)");
    ensure!(args.experts.is_multiple_of(2), "--experts must be even (2 expert shards)");
    Ok(c)
}

fn hwm_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let value =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:")).context("/proc/self/status has no VmHWM")?;
    value.split_whitespace().next().unwrap_or_default().parse().context("parsing VmHWM")
}

fn child(args: &HfLoadArgs, part: &str) -> Result<()> {
    let config = config(args)?;
    let baseline_kib = hwm_kib()?;
    let reader = HfReader::open(&args.dir)?;
    reader.check_model(&config)?;
    let (held_bytes, tensors) = if part == "whole" {
        let mut model = Model::<f32>::new(&config, 0, false)?;
        let report = fill_from_reader(&reader, &mut model.params_mut(), MtpPolicy::Require)?;
        (model.params().iter().map(|p| 4 * p.len() as u64).sum(), report.loaded)
    } else {
        let mut fields = part.split(':').skip(1).map(str::parse::<usize>);
        let (Some(Ok(stage)), Some(Ok(ep_rank))) = (fields.next(), fields.next()) else {
            anyhow::bail!("--child {part:?}: expected whole or rank:STAGE:EP_RANK");
        };
        let half = config.num_hidden_layers / 2;
        let layout = StageLayout::new(&config, &[half, half])?;
        let shard = ExpertShard { rank: ep_rank, size: 2 };
        let mut model = RankModel::<f32>::new(&config, layout, &[stage], shard, 0, false, Precision::Fp32)?;
        let report = fill_from_reader(&reader, &mut model.params_mut(), MtpPolicy::Require)?;
        (model.params().iter().map(|p| 4 * p.len() as u64).sum(), report.loaded)
    };
    let load = Load {
        part: part.to_string(),
        baseline_kib,
        peak_kib: hwm_kib()?,
        held_bytes,
        decoded_bytes: reader.bytes_decoded(),
        tensors,
    };
    println!("{}", serde_json::to_string(&load)?);
    Ok(())
}

pub fn run(args: HfLoadArgs) -> Result<()> {
    if let Some(part) = &args.child {
        return child(&args, part);
    }
    let config = config(&args)?;
    let (files, checkpoint_bytes, parameters) = {
        let model = Model::<f32>::new(&config, 0, false)?;
        let parameters: u64 = model.params().iter().map(|p| p.len() as u64).sum();
        let files = flotilla_model::train::save_model(
            &model,
            &args.dir,
            flotilla_model::checkpoint::WeightDtype::F32,
            args.max_shard_size,
        )?;
        let bytes =
            files.iter().map(|f| std::fs::metadata(f).map(|m| m.len())).sum::<std::io::Result<u64>>()?;
        (files.len(), bytes, parameters)
    };
    let exe = std::env::current_exe().context("locating the flotilla binary")?;
    let measure = |part: &str| -> Result<Load> {
        let mut command = Command::new(&exe);
        command.args(["bench", "hf-load", "--child", part, "--dir"]).arg(&args.dir);
        for (flag, value) in [
            ("--layers", args.layers),
            ("--hidden", args.hidden),
            ("--experts", args.experts),
            ("--moe-intermediate", args.moe_intermediate),
        ] {
            command.args([flag, &value.to_string()]);
        }
        let out = command.output().context("starting a loading child")?;
        ensure!(out.status.success(), "the {part} load failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).context("reading the child's report")
    };
    let mut ranks = Vec::new();
    for stage in 0..2 {
        for ep_rank in 0..2 {
            ranks.push(measure(&format!("rank:{stage}:{ep_rank}"))?);
        }
    }
    let whole = measure("whole")?;
    std::fs::remove_dir_all(&args.dir).with_context(|| format!("removing {}", args.dir.display()))?;
    let max_rank = ranks.iter().map(|r| r.peak_kib).max().unwrap_or(0);
    let report = HfLoadBench {
        checkpoint_bytes,
        files,
        parameters,
        max_rank_over_whole: max_rank as f64 / whole.peak_kib as f64,
        ranks,
        whole,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mb = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    println!(
        "checkpoint: {:.1} MiB in {} files, {} parameters (f32)",
        mb(report.checkpoint_bytes),
        report.files,
        report.parameters
    );
    println!(
        "{:<12} {:>10} {:>12} {:>12} {:>12} {:>14}",
        "part", "tensors", "held MiB", "decoded MiB", "peak MiB", "peak − base"
    );
    for l in report.ranks.iter().chain(std::iter::once(&report.whole)) {
        println!(
            "{:<12} {:>10} {:>12.1} {:>12.1} {:>12.1} {:>14.1}",
            l.part,
            l.tensors,
            mb(l.held_bytes),
            mb(l.decoded_bytes),
            mib(l.peak_kib),
            mib(l.peak_kib - l.baseline_kib)
        );
    }
    println!("largest rank's peak / whole model's peak: {:.3}", report.max_rank_over_whole);
    Ok(())
}
