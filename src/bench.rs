//! `flotilla bench …`: quick timings of the kernels on this machine, for checking a node and
//! for `tools/bench_openblas.py`, which interleaves them with OpenBLAS so that both sides
//! see the same machine noise; what a checkpoint costs; and the memory of loading an HF
//! checkpoint. The criterion suite (`cargo bench`) is the thorough version; the control
//! plane under load is `flotilla-bench control-plane` (the `bench/` crate).

use anyhow::{Context, Result, ensure};
use clap::{Args, Subcommand, ValueEnum};
use flotilla_kernels::gemm::{Accumulation, MatMut, MatRef, gemm_bf16, gemm_f32, gemm_fp8};
use flotilla_kernels::quant::{Granularity, QuantConfig, quantize};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

mod checkpoint;
mod hf_load;

#[derive(Subcommand)]
pub enum Bench {
    /// Time one GEMM shape: C[m, n] = A[m, k]·B[k, n] (FP8: B given as [n, k], NT).
    Gemm(GemmArgs),
    /// A checkpoint's cost: shard write throughput against `dd` on the same disk, and the
    /// training step's stall from the snapshot and the background write.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Peak RSS of loading an HF-layout checkpoint of several shards: each rank of a
    /// 4-rank pipeline × expert layout loading its part, against the whole model.
    HfLoad(hf_load::HfLoadArgs),
}

#[derive(Args)]
pub struct GemmArgs {
    /// Which GEMM.
    #[arg(long, value_enum, default_value_t = Kind::F32)]
    kind: Kind,
    #[arg(long, default_value_t = 1024)]
    m: usize,
    #[arg(long, default_value_t = 1024)]
    n: usize,
    #[arg(long, default_value_t = 1024)]
    k: usize,
    /// Threads (a rayon pool of exactly this size runs the GEMM).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Timed repetitions after one warm-up.
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    /// f32 inputs and accumulation.
    F32,
    /// BF16 inputs, f32 accumulation.
    Bf16,
    /// Block-scaled FP8 (1×128 / 128×128 scales), exact f32 accumulation.
    Fp8,
}

#[derive(serde::Serialize)]
struct GemmTiming {
    kind: Kind,
    m: usize,
    n: usize,
    k: usize,
    threads: usize,
    median_s: f64,
    gflops: f64,
    samples_s: Vec<f64>,
}

pub fn run(bench: Bench) -> Result<()> {
    match bench {
        Bench::Gemm(args) => gemm(args),
        Bench::Checkpoint(args) => checkpoint::run(args),
        Bench::HfLoad(args) => hf_load::run(args),
    }
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

fn gemm(args: GemmArgs) -> Result<()> {
    let GemmArgs { kind, m, n, k, threads, reps, json } = args;
    ensure!(reps >= 1, "`reps` must be at least 1");
    ensure!(threads >= 1, "`threads` must be at least 1");
    let pool =
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("building the thread pool")?;
    let a = random(m * k, 1);
    let b = random(k * n, 2);
    let mut c = vec![0f32; m * n];
    let mut step: Box<dyn FnMut() -> Result<()> + Send> = match kind {
        Kind::F32 => Box::new(|| {
            gemm_f32(
                MatMut::row_major(&mut c, m, n, "c")?,
                0.0,
                MatRef::row_major(&a, m, k, "a")?,
                MatRef::row_major(&b, k, n, "b")?,
                1.0,
                threads,
            )?;
            Ok(())
        }),
        Kind::Bf16 => {
            let a: Vec<bf16> = a.iter().map(|&v| bf16::from_f32(v)).collect();
            let b: Vec<bf16> = b.iter().map(|&v| bf16::from_f32(v)).collect();
            Box::new(move || {
                gemm_bf16(
                    MatMut::row_major(&mut c, m, n, "c")?,
                    0.0,
                    MatRef::row_major(&a, m, k, "a")?,
                    MatRef::row_major(&b, k, n, "b")?,
                    1.0,
                    threads,
                )?;
                Ok(())
            })
        }
        Kind::Fp8 => {
            let qa = quantize(&a, m, k, Granularity::Tile1x128, &QuantConfig::default())?;
            let qb = quantize(&b, n, k, Granularity::Block128x128, &QuantConfig::default())?;
            Box::new(move || Ok(gemm_fp8(&qa, &qb, Accumulation::F32, &mut c, threads)?))
        }
    };
    let mut samples = pool.install(|| -> Result<Vec<f64>> {
        step()?;
        (0..reps)
            .map(|_| {
                let start = Instant::now();
                step()?;
                Ok(start.elapsed().as_secs_f64())
            })
            .collect()
    })?;
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let median =
        if reps % 2 == 1 { sorted[reps / 2] } else { (sorted[reps / 2 - 1] + sorted[reps / 2]) / 2.0 };
    let timing = GemmTiming {
        kind,
        m,
        n,
        k,
        threads,
        median_s: median,
        gflops: 2.0 * (m * n * k) as f64 / median / 1e9,
        samples_s: std::mem::take(&mut samples),
    };
    if json {
        println!("{}", serde_json::to_string(&timing)?);
    } else {
        println!(
            "{:?} {m}x{n}x{k} t{threads}: {:.1} GFLOP/s (median of {reps}: {:.3} ms)",
            timing.kind,
            timing.gflops,
            timing.median_s * 1e3
        );
    }
    Ok(())
}
