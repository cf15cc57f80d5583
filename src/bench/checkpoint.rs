//! `flotilla bench checkpoint`: what a checkpoint costs, measured side by side on this
//! machine.
//!
//! - **Write throughput against `dd`.** One rank's shard of the model (its whole state: f32
//!   values, BF16 moments) is written with `shard::write_shard` (serialize, checksum,
//!   write, fsync, rename, directory fsync), interleaved with `dd if=/dev/zero bs=1M
//!   conv=fsync` of the same size into the same directory: the ratio of their throughputs
//!   (medians) is the figure, as both see the same disk and the same noise.
//! - **Training stall.** A single-process trainer of the model takes steps in three phases,
//!   interleaved round by round: no checkpoint; a snapshot after the step (what the step
//!   pays before the background write starts); and the step after a snapshot, which runs
//!   while the `checkpoint-writer` thread writes. Medians of each against the plain step.

use anyhow::{Context, Result, ensure};
use clap::Args;
use flotilla_model::shard::{Snapshot, step_dir, write_shard};
use flotilla_model::train::{TrainConfig, Trainer};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(Args)]
pub struct CheckpointArgs {
    /// The model preset (`tiny`, `small`).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Sequences per step and tokens per sequence of the training steps.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// Compute threads of the trainer.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Rounds (each: one write, one `dd`, and one step of each phase).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Where to write (the disk under test); a fresh subdirectory is used and removed.
    #[arg(long, default_value = "runs/bench-checkpoint")]
    dir: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct CheckpointBench {
    preset: String,
    threads: usize,
    shard_bytes: u64,
    write_median_s: f64,
    dd_median_s: f64,
    /// flotilla's write throughput over dd's.
    throughput_ratio: f64,
    step_median_s: f64,
    /// The snapshot alone (the copy into host memory).
    snapshot_median_s: f64,
    snapshot_step_median_s: f64,
    overlapped_step_median_s: f64,
    /// (step + snapshot) / step − 1.
    snapshot_stall: f64,
    /// The step during the background write / step − 1.
    overlapped_stall: f64,
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn run_config(args: &CheckpointArgs) -> String {
    format!(
        "seed = 0\nsteps = 1000000\nbatch_size = {}\nseq_len = {}\nthreads = {}\n\n[model]\npreset = \"{}\"\n\n\
         [data]\nkind = \"synthetic\"\ntokens = 262144\n\n[optimizer]\npeak_lr = 1e-3\nwarmup_steps = 10\n\
         constant_steps = 1000000\ndecay_steps = 0\nfinal_lr = 1e-3\n",
        args.batch_size, args.seq_len, args.threads, args.preset
    )
}

/// `dd` of `bytes` zeros into `path`, fsynced; its wall time.
fn dd(path: &Path, bytes: u64) -> Result<f64> {
    let mib = bytes.div_ceil(1 << 20);
    let started = Instant::now();
    let status = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", path.display()))
        .args(["bs=1M", &format!("count={mib}"), "conv=fsync", "status=none"])
        .status()
        .context("running dd")?;
    let seconds = started.elapsed().as_secs_f64();
    ensure!(status.success(), "dd failed: {status}");
    // dd wrote whole MiB: scale to the shard's size.
    Ok(seconds * bytes as f64 / (mib << 20) as f64)
}

pub fn run(args: CheckpointArgs) -> Result<()> {
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let (config, model) = TrainConfig::from_toml(&run_config(&args), Path::new("."))?;
    let mut trainer = Trainer::new(config, &model)?;
    trainer.train_step()?;
    let scratch = args.dir.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let result = measure(&args, &mut trainer, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    let bench = result?;
    if args.json {
        println!("{}", serde_json::to_string(&bench)?);
        return Ok(());
    }
    println!(
        "{} model, {} compute thread(s), shard {:.1} MiB, {} rounds (medians)",
        bench.preset,
        bench.threads,
        bench.shard_bytes as f64 / (1 << 20) as f64,
        args.rounds
    );
    println!(
        "write: flotilla {:.1} ms, dd {:.1} ms: throughput {:.2} of dd's",
        1e3 * bench.write_median_s,
        1e3 * bench.dd_median_s,
        bench.throughput_ratio
    );
    println!(
        "step {:.1} ms; the snapshot alone {:.1} ms ({:.1}% of a step); with the snapshot {:.1} ms (+{:.1}%); during the background write {:.1} ms (+{:.1}%)",
        1e3 * bench.step_median_s,
        1e3 * bench.snapshot_median_s,
        100.0 * bench.snapshot_median_s / bench.step_median_s,
        1e3 * bench.snapshot_step_median_s,
        100.0 * bench.snapshot_stall,
        1e3 * bench.overlapped_step_median_s,
        100.0 * bench.overlapped_stall
    );
    Ok(())
}

fn measure(args: &CheckpointArgs, trainer: &mut Trainer, scratch: &Path) -> Result<CheckpointBench> {
    let (mut writes, mut dds, mut plain, mut snapshotted, mut overlapped, mut copies) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut shard_bytes = 0;
    for round in 0..args.rounds {
        // Throughput: the same bytes through both writers.
        let snapshot = trainer.snapshot(0, 1);
        let started = Instant::now();
        let written = write_shard(&step_dir(scratch, round as u64), &snapshot)?;
        writes.push(started.elapsed().as_secs_f64());
        shard_bytes = written.bytes;
        dds.push(dd(&scratch.join("dd.bin"), written.bytes)?);

        // Stall: a plain step; a step and its snapshot; the next step beside the writer.
        let started = Instant::now();
        trainer.train_step()?;
        plain.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        trainer.train_step()?;
        let copy = Instant::now();
        let snapshot: Snapshot = trainer.snapshot(0, 1);
        copies.push(copy.elapsed().as_secs_f64());
        snapshotted.push(started.elapsed().as_secs_f64());
        let dir = step_dir(&scratch.join("background"), round as u64);
        let writer = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || write_shard(&dir, &snapshot))
            .context("starting the writer thread")?;
        let started = Instant::now();
        trainer.train_step()?;
        overlapped.push(started.elapsed().as_secs_f64());
        writer.join().map_err(|_| anyhow::anyhow!("the writer thread panicked"))??;
    }
    let (write, dd) = (median(writes), median(dds));
    let (step, with_snapshot, during_write) = (median(plain), median(snapshotted), median(overlapped));
    Ok(CheckpointBench {
        preset: args.preset.clone(),
        threads: args.threads,
        shard_bytes,
        write_median_s: write,
        dd_median_s: dd,
        throughput_ratio: dd / write,
        step_median_s: step,
        snapshot_median_s: median(copies),
        snapshot_step_median_s: with_snapshot,
        overlapped_step_median_s: during_write,
        snapshot_stall: with_snapshot / step - 1.0,
        overlapped_stall: during_write / step - 1.0,
    })
}
