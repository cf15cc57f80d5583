//! `flotilla checkpoint ls|verify|export`: the committed checkpoints of a run directory
//! (`RUN_DIR/checkpoints/<run_id>/step-N/`, see `flotilla_coordinator::checkpoint`), their
//! shards' checksums, and a checkpoint written out as an HF-layout model.
//! Listing and verifying are `flotilla_coordinator::checkpoint`'s; reading the shards is
//! `flotilla_model::shard`'s; this file resolves paths and prints.

use crate::experts::{self, StepWindow};
use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Subcommand, ValueEnum};
use flotilla_coordinator::checkpoint::{
    Committed, MANIFEST_FILE, Manifest, find_committed, read_manifest, verify as verify_shards,
};
use flotilla_coordinator::eplb::Cluster;
use flotilla_model::Model;
use flotilla_model::checkpoint::{DEFAULT_MAX_SHARD_SIZE, INDEX_FILE, WeightDtype, is_weights_file_name};
use flotilla_model::shard::{CheckpointReader, ShardFile};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum CheckpointCommand {
    /// List every committed checkpoint under RUN_DIR/checkpoints, oldest run first (the last
    /// line is the latest checkpoint).
    Ls(LsArgs),
    /// Check every shard of every committed checkpoint (or of the one given) against the
    /// sizes and CRC-32s in its manifest; exits non-zero if any is bad.
    Verify(VerifyArgs),
    /// Write a committed checkpoint's weights as an HF-layout model (config.json and
    /// model.safetensors), e.g. for `flotilla score`.
    Export(ExportArgs),
}

#[derive(Args)]
pub struct LsArgs {
    /// The run directory (the one holding `checkpoints/`).
    run_dir: PathBuf,
    /// One JSON object per checkpoint.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// A run directory (every committed checkpoint under its `checkpoints/`), or one
    /// checkpoint's directory (the one holding manifest.json).
    path: PathBuf,
}

#[derive(Args)]
pub struct ExportArgs {
    /// A checkpoint's directory (the one holding manifest.json), or a run directory: its
    /// latest committed checkpoint.
    path: PathBuf,
    /// Where to write config.json and model.safetensors (created if needed).
    #[arg(long)]
    out: PathBuf,
    /// Storage type of the written weights: f32 (exact), bf16, or fp8 (DeepSeek's released
    /// form: E4M3 weights with a `weight_scale_inv` per 128×128 block, the rest BF16).
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    dtype: Dtype,
    /// The largest weights file ("5GB", "500MB", "10KiB" or bytes; default: transformers'
    /// 50GB): a larger model is written as model-0000i-of-0000N.safetensors shards with
    /// model.safetensors.index.json, as `save_pretrained` writes it.
    #[arg(long, value_parser = crate::train::parse_size)]
    max_shard_size: Option<u64>,
    /// Also write eplb.json: a redundant-expert placement for serving on this many physical
    /// experts per layer (as `flotilla experts plan --replicas`), from the loads the run
    /// recorded up to the checkpoint's step.
    #[arg(long, value_name = "R")]
    eplb_replicas: Option<usize>,
    /// Nodes of the serving cluster (with --eplb-replicas).
    #[arg(long, value_name = "N", default_value_t = 1, requires = "eplb_replicas")]
    eplb_nodes: usize,
    /// GPUs per node of the serving cluster (with --eplb-replicas).
    #[arg(long, value_name = "G", default_value_t = 8, requires = "eplb_replicas")]
    eplb_gpus_per_node: usize,
    /// The loads to place (with --eplb-replicas): a JSON array of per-layer loads or a
    /// metrics.jsonl (default: the run's metrics.jsonl, steps up to the checkpoint's).
    #[arg(long, value_name = "FILE", requires = "eplb_replicas")]
    eplb_loads: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    Bf16,
    Fp8,
}

impl Dtype {
    fn weight_dtype(self) -> WeightDtype {
        match self {
            Dtype::F32 => WeightDtype::F32,
            Dtype::Bf16 => WeightDtype::Bf16,
            Dtype::Fp8 => WeightDtype::Fp8,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::Fp8 => "fp8",
        }
    }
}

pub fn run(command: CheckpointCommand) -> Result<()> {
    match command {
        CheckpointCommand::Ls(args) => ls(args),
        CheckpointCommand::Verify(args) => verify(args),
        CheckpointCommand::Export(args) => export(args),
    }
}

fn committed_under(run_dir: &Path) -> Result<Vec<Committed>> {
    find_committed(run_dir)
        .with_context(|| format!("listing the checkpoints under {}", run_dir.join("checkpoints").display()))
}

fn ls(args: LsArgs) -> Result<()> {
    let all = committed_under(&args.run_dir)?;
    if all.is_empty() {
        println!("no committed checkpoints under {}", args.run_dir.join("checkpoints").display());
        return Ok(());
    }
    for c in &all {
        let m = &c.manifest;
        let committed_unix_ms = committed_unix_ms(&c.dir);
        if args.json {
            let row = serde_json::json!({
                "step": m.step,
                "run_id": m.run_id,
                "job_id": m.job_id,
                "workers": m.workers,
                "shards": m.shards.len(),
                "bytes": m.bytes,
                "layout": m.layout,
                "created_unix_ms": m.created_unix_ms,
                "created": rfc3339(m.created_unix_ms),
                "committed_unix_ms": committed_unix_ms,
                "dir": c.dir.display().to_string(),
            });
            println!("{row}");
        } else {
            let committed =
                committed_unix_ms.map(|ms| format!(" · committed {}", rfc3339(ms))).unwrap_or_default();
            println!(
                "step {:>8}  {}  {} · {} · {} · run created {}{committed}  {}",
                m.step,
                m.run_id,
                plural(m.shards.len() as u64, "shard", "shards"),
                human_bytes(m.bytes),
                if m.layout.is_empty() { "(no layout)" } else { &m.layout },
                rfc3339(m.created_unix_ms),
                c.dir.display()
            );
        }
    }
    Ok(())
}

/// When the manifest was written (its modification time), if the file system says.
fn committed_unix_ms(dir: &Path) -> Option<u64> {
    let modified = std::fs::metadata(dir.join(MANIFEST_FILE)).ok()?.modified().ok()?;
    Some(modified.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64)
}

fn is_checkpoint_dir(path: &Path) -> bool {
    path.join(MANIFEST_FILE).is_file()
}

/// A `step-*` directory given without a manifest: named as such rather than searched as a
/// run directory.
fn refuse_uncommitted(path: &Path) -> Result<()> {
    let is_step = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-"));
    if is_step && path.is_dir() {
        bail!("{}: not a committed checkpoint (no {MANIFEST_FILE}; it was never committed)", path.display());
    }
    Ok(())
}

fn verify(args: VerifyArgs) -> Result<()> {
    let dirs: Vec<PathBuf> = if is_checkpoint_dir(&args.path) {
        vec![args.path.clone()]
    } else {
        refuse_uncommitted(&args.path)?;
        let all = committed_under(&args.path)?;
        if all.is_empty() {
            bail!(
                "no committed checkpoints under {} (and {} holds no {MANIFEST_FILE})",
                args.path.join("checkpoints").display(),
                args.path.display()
            );
        }
        all.into_iter().map(|c| c.dir).collect()
    };
    let mut bad = 0;
    for dir in &dirs {
        let (manifest, checks) = match read_manifest(dir).and_then(|m| Ok((m, verify_shards(dir)?))) {
            Ok(result) => result,
            Err(e) => {
                bad += 1;
                println!("BAD  {}: {e}", dir.display());
                continue;
            }
        };
        let failed: Vec<_> = checks.iter().filter(|c| !c.ok).collect();
        let what = format!(
            "step {} of {} ({}, {})",
            manifest.step,
            manifest.run_id,
            plural(checks.len() as u64, "shard", "shards"),
            human_bytes(manifest.bytes)
        );
        if failed.is_empty() {
            println!("OK   {what}  {}", dir.display());
        } else {
            bad += 1;
            println!("BAD  {what}  {}", dir.display());
            for c in failed {
                println!("     {}: {}", c.file, c.detail);
            }
        }
    }
    ensure!(bad == 0, "{bad} of {} checkpoints failed verification", dirs.len());
    Ok(())
}

/// The checkpoint `path` names: itself if it holds a manifest, else the latest committed
/// one under it as a run directory.
fn resolve_checkpoint(path: &Path) -> Result<(PathBuf, Manifest)> {
    if is_checkpoint_dir(path) {
        let manifest =
            read_manifest(path).with_context(|| format!("reading the checkpoint {}", path.display()))?;
        return Ok((path.to_path_buf(), manifest));
    }
    refuse_uncommitted(path)?;
    let latest = committed_under(path)?.pop().with_context(|| {
        format!(
            "{}: neither a checkpoint (no {MANIFEST_FILE}) nor a run directory with committed checkpoints under {}",
            path.display(),
            path.join("checkpoints").display()
        )
    })?;
    Ok((latest.dir, latest.manifest))
}

/// A committed checkpoint's weights, loaded into a model.
pub struct LoadedCheckpoint {
    /// The checkpoint's directory (the one holding manifest.json).
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The model with every parameter from the shards.
    pub model: Model<f32>,
    /// Tensors read.
    pub tensors: usize,
    /// Values read.
    pub values: usize,
}

/// Loads the checkpoint `path` names (itself if it holds a manifest, else the latest
/// committed one under it as a run directory) into a model; every parameter must be in the
/// shards with its shape; tensors the model lacks are named in a warning on stderr.
/// `checkpoint export` and `generate` both load through here.
pub fn load_committed(path: &Path) -> Result<LoadedCheckpoint> {
    let (dir, manifest) = resolve_checkpoint(path)?;
    let mut shards = manifest.shards.clone();
    shards.sort_by_key(|s| s.rank);
    let files: Vec<ShardFile> =
        shards.iter().map(|s| ShardFile { file: s.file.clone(), bytes: s.bytes, crc32: s.crc32 }).collect();
    let reader = CheckpointReader::open(&dir, &files)
        .with_context(|| format!("reading the shards of {}", dir.display()))?;
    ensure!(
        reader.step() == manifest.step && reader.world() == manifest.workers,
        "{}: the shards are of step {} by {} ranks, the manifest says step {} by {} workers",
        dir.display(),
        reader.step(),
        reader.world(),
        manifest.step,
        manifest.workers
    );
    let mut model = Model::<f32>::new(reader.model(), reader.seed(), false)
        .with_context(|| format!("building the model of {}", dir.display()))?;
    let mut missing = Vec::new();
    let mut used = HashSet::new();
    let mut values = 0usize;
    for p in model.params_mut() {
        let Some(shape) = reader.shape(&p.name) else {
            missing.push(p.name.clone());
            continue;
        };
        ensure!(
            shape == p.shape.as_slice(),
            "{}: tensor `{}` has shape {shape:?} in the checkpoint, the model's is {:?}",
            dir.display(),
            p.name,
            p.shape
        );
        let value = reader
            .values(&p.name, p.len())
            .with_context(|| format!("{}: reading tensor `{}`", dir.display(), p.name))?;
        p.set_value(&value).with_context(|| format!("{}: tensor `{}`", dir.display(), p.name))?;
        values += p.len();
        used.insert(p.name.clone());
    }
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(8).map(String::as_str).collect();
        let more = if missing.len() > shown.len() {
            format!(" and {} more", missing.len() - shown.len())
        } else {
            String::new()
        };
        bail!(
            "{}: the checkpoint lacks {} of the model: `{}`{more}",
            dir.display(),
            plural(missing.len() as u64, "tensor", "tensors"),
            shown.join("`, `")
        );
    }
    let extra: Vec<String> = reader.value_names().into_iter().filter(|n| !used.contains(n)).collect();
    if !extra.is_empty() {
        eprintln!(
            "warning: ignoring {} the model does not have: {}",
            plural(extra.len() as u64, "tensor", "tensors"),
            extra.join(", ")
        );
    }
    Ok(LoadedCheckpoint { dir, manifest, model, tensors: used.len(), values })
}

/// Whether `path` names a committed checkpoint or a run directory (rather than, say, an
/// HF-layout model directory).
pub fn is_checkpoint_or_run_dir(path: &Path) -> bool {
    is_checkpoint_dir(path) || path.join("checkpoints").is_dir()
}

fn export(args: ExportArgs) -> Result<()> {
    let LoadedCheckpoint { dir, manifest, model, tensors, values } = load_committed(&args.path)?;
    // Placed before anything is written, so that bad loads leave no half-export behind.
    let placement = match args.eplb_replicas {
        Some(replicas) => Some(place_experts(&args, replicas, &dir, &manifest, &model)?),
        None => None,
    };
    if let Ok(entries) = std::fs::read_dir(&args.out) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            // The HF loader reads every *.safetensors file of the directory.
            if name.ends_with(".safetensors") && !is_weights_file_name(&name) {
                bail!(
                    "{}: already holds {name}, which would be loaded with the exported weights; use an empty directory",
                    args.out.display()
                );
            }
        }
    }
    let files = flotilla_model::train::save_model(
        &model,
        &args.out,
        args.dtype.weight_dtype(),
        args.max_shard_size.unwrap_or(DEFAULT_MAX_SHARD_SIZE),
    )
    .with_context(|| format!("writing the model to {}", args.out.display()))?;
    let bytes: u64 = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
    let size = human_bytes(bytes);
    let weights = match &files[..] {
        [one] => one.display().to_string(),
        many => format!("{} shards with {}", many.len(), args.out.join(INDEX_FILE).display()),
    };
    println!(
        "exported step {} of {} ({}, {} values) from {}",
        manifest.step,
        manifest.run_id,
        plural(tensors as u64, "tensor", "tensors"),
        values,
        dir.display()
    );
    println!(
        "wrote {} and {} ({size}, {})",
        args.out.join("config.json").display(),
        weights,
        args.dtype.name()
    );
    if let Some(placement) = placement {
        println!("wrote {}", placement.write(&args.out)?);
    }
    Ok(())
}

/// The file `checkpoint export --eplb-replicas` writes beside the model.
pub const PLACEMENT_FILE: &str = "eplb.json";

/// An expert placement to write beside an exported model.
struct ExpertPlacement {
    json: serde_json::Value,
    summary: String,
}

impl ExpertPlacement {
    /// Writes [`PLACEMENT_FILE`] into `out`; returns a line saying what was written.
    fn write(&self, out: &Path) -> Result<String> {
        let path = out.join(PLACEMENT_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&self.json)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(format!("{} ({})", path.display(), self.summary))
    }
}

/// The placement of the loads the run recorded up to the checkpoint's step (or
/// `--eplb-loads`), over the model's expert groups.
fn place_experts(
    args: &ExportArgs,
    replicas: usize,
    checkpoint: &Path,
    manifest: &Manifest,
    model: &Model<f32>,
) -> Result<ExpertPlacement> {
    let (loads, window) = match &args.eplb_loads {
        Some(file) => (file.clone(), StepWindow::default()),
        None => (run_metrics(checkpoint)?, StepWindow { until: Some(manifest.step), last: None }),
    };
    let recorded = experts::read_loads(&loads, window)?;
    let cluster = Cluster {
        replicas,
        groups: model.config().n_group.max(1),
        nodes: args.eplb_nodes,
        gpus_per_node: args.eplb_gpus_per_node,
    };
    let placement = experts::place(&recorded, cluster, &loads)?;
    let worst = placement.balance.iter().map(|b| b.after_ratio).fold(0.0, f64::max);
    let summary = format!(
        "{:?} placement of {} layers on {} nodes × {} GPUs, {replicas} physical experts per layer, worst max/mean load per GPU {worst:.3}, from {}",
        placement.policy,
        placement.phy2log.len(),
        cluster.nodes,
        cluster.gpus_per_node,
        loads.display()
    );
    Ok(ExpertPlacement { json: experts::placement_json(&recorded, cluster, &placement), summary })
}

/// The metrics.jsonl of the run a checkpoint belongs to
/// (`RUN_DIR/checkpoints/<run_id>/step-N` → `RUN_DIR/metrics.jsonl`).
fn run_metrics(checkpoint: &Path) -> Result<PathBuf> {
    let run_dir = checkpoint
        .ancestors()
        .nth(3)
        .filter(|_| checkpoint.ancestors().nth(2).and_then(Path::file_name) == Some("checkpoints".as_ref()))
        .with_context(|| {
            format!(
                "{}: not under a run's checkpoints/, so give the loads with --eplb-loads",
                checkpoint.display()
            )
        })?;
    let metrics = run_dir.join("metrics.jsonl");
    ensure!(
        metrics.is_file(),
        "{}: no metrics.jsonl in the run directory {}, so give the loads with --eplb-loads",
        checkpoint.display(),
        run_dir.display()
    );
    Ok(metrics)
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Bytes in binary units: 512 B, 1.50 KiB, 3.25 GiB.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

/// Milliseconds since the Unix epoch as RFC 3339 in UTC: 2024-05-01T12:34:56.789Z.
fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (non-negative here).
    let z = days as i64 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(5 << 30), "5.00 GiB");
    }
}
