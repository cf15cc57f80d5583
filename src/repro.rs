//! `flotilla repro …`: runs an experiment from `flotilla_kernels::experiments` and prints
//! its report as a table or as JSON.

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use flotilla_kernels::experiments::{
    self, AccumulationConfig, AccumulationReport, ErrorSummary, InputDistribution,
};
use flotilla_kernels::gemm::{AccumulatorRounding, LimitedAccumulator};

#[derive(Subcommand)]
pub enum Experiment {
    /// FP8 GEMM accumulation precision (DeepSeek-V3 report §3.3.2).
    #[command(long_about = FP8_ACCUMULATION_HELP)]
    Fp8Accumulation(Fp8AccumulationArgs),
}

const FP8_ACCUMULATION_HELP: &str = "\
FP8 GEMM accumulation precision (DeepSeek-V3 report §3.3.2).

The report: on H800 the FP8 GEMM accumulator keeps only about 14 bits, so with K = 4096 a
GEMM of two random matrices has a maximum relative error near 2%; promoting the partial
sums to FP32 registers every N_C = 128 elements of K (4 WGMMAs) fixes it.

Setup. A [m, k] and B [n, k] are drawn (ChaCha8, --seed) uniform on [0, 1) (--dist uniform,
the default: no cancellation, so element-wise relative error means something everywhere)
or standard normal. A is quantized to E4M3 per 1×128 tile, B per 128×128 block (scale =
amax/448), as DeepSeek-V3 trains. C = A·Bᵀ is computed five ways:
  f32 GEMM; BF16 inputs with f32 accumulation; FP8 with exact f32 accumulation (scales
  applied per 128-wide K block); FP8 through an emulated tensor-core accumulator with no
  promotion (scaled products enter the accumulator, which isolates its precision); and the
  same accumulator promoted to f32 every N_C elements, DeepGEMM's fix.
The emulated accumulator keeps --mantissa-bits explicit bits (13: FP22, as SageAttention2
measured for FP8 MMA, i.e. 14 significant bits), truncates, and adds --products-per-add
exact products per rounded update. NVIDIA does not publish that depth for FP8 MMA; 4 is
what Fasi et al. (2021) measured on earlier tensor cores. The figure depends on it (at 32 it
is several times smaller), so read the depth as the model's free parameter.

Each row is compared with two f64 references: the product of the original inputs (total
error, FP8 quantization included) and, for FP8 rows, the product of the dequantized FP8
inputs: the error accumulation alone adds, which is what the report's 2% measures.";

#[derive(Args)]
pub struct Fp8AccumulationArgs {
    /// Reduction length K.
    #[arg(long, default_value_t = 4096)]
    k: usize,
    /// Rows of A and C.
    #[arg(long, default_value_t = 256)]
    m: usize,
    /// Columns of C (rows of B).
    #[arg(long, default_value_t = 256)]
    n: usize,
    /// Seed of the input generator.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Input distribution.
    #[arg(long, value_enum, default_value_t = Dist::Uniform)]
    dist: Dist,
    /// Explicit mantissa bits the emulated accumulator keeps.
    #[arg(long, default_value_t = LimitedAccumulator::default().mantissa_bits)]
    mantissa_bits: u32,
    /// Exact products summed before each rounded accumulator update.
    #[arg(long, default_value_t = LimitedAccumulator::default().products_per_add)]
    products_per_add: usize,
    /// Promotion interval N_C of the promoted row (must divide 128).
    #[arg(long, default_value_t = 128)]
    promote_every: usize,
    /// Round the accumulator to nearest-even instead of truncating.
    #[arg(long)]
    round_to_nearest: bool,
    /// Threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Dist {
    Uniform,
    Normal,
}

pub fn run(experiment: Experiment) -> Result<()> {
    match experiment {
        Experiment::Fp8Accumulation(args) => fp8_accumulation(args),
    }
}

fn fp8_accumulation(args: Fp8AccumulationArgs) -> Result<()> {
    let config = AccumulationConfig {
        m: args.m,
        n: args.n,
        k: args.k,
        seed: args.seed,
        distribution: match args.dist {
            Dist::Uniform => InputDistribution::Uniform,
            Dist::Normal => InputDistribution::Normal,
        },
        accumulator: LimitedAccumulator {
            mantissa_bits: args.mantissa_bits,
            products_per_add: args.products_per_add,
            rounding: if args.round_to_nearest {
                AccumulatorRounding::NearestEven
            } else {
                AccumulatorRounding::TowardZero
            },
            promote_every: Some(args.promote_every),
        },
        threads: args.threads.unwrap_or_else(available_threads),
    };
    let report = experiments::fp8_accumulation(&config).context("fp8-accumulation experiment")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", format_table(&report));
    }
    Ok(())
}

fn available_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn format_table(report: &AccumulationReport) -> String {
    let c = &report.config;
    let mut out = format!(
        "FP8 GEMM accumulation precision: C[{m}×{n}] = A[{m}×{k}]·B[{n}×{k}]ᵀ, inputs {dist:?}, seed {seed}\n\
         emulated accumulator: {bits} explicit mantissa bits, {rounding:?}, {depth} products per add\n\n",
        m = c.m,
        n = c.n,
        k = c.k,
        dist = c.distribution,
        seed = c.seed,
        bits = c.accumulator.mantissa_bits,
        rounding = c.accumulator.rounding,
        depth = c.accumulator.products_per_add,
    );
    let blank = || ["-".to_string(), "-".to_string(), "-".to_string()];
    let cells = |s: &ErrorSummary| {
        [
            format!("{:.4}%", 100.0 * s.relative.max),
            format!("{:.5}%", 100.0 * s.relative.mean),
            format!("{:.2e}", s.calc_diff),
        ]
    };
    out += &format!(
        "{:<44} | {:^33} | {:^33}\n{:<44} | {:>10} {:>11} {:>10} | {:>10} {:>11} {:>10}\n",
        "",
        "vs f64 product of the inputs",
        "vs f64 product of the FP8 inputs",
        "GEMM",
        "max rel",
        "mean rel",
        "calc_diff",
        "max rel",
        "mean rel",
        "calc_diff"
    );
    for row in &report.rows {
        let [a, b, d] = cells(&row.vs_exact_inputs);
        let [e, f, g] = row.vs_fp8_inputs.as_ref().map(cells).unwrap_or_else(blank);
        out += &format!("{:<44} | {a:>10} {b:>11} {d:>10} | {e:>10} {f:>11} {g:>10}\n", row.name);
    }
    out += "\nThe report: ~2% max relative error without promotion at K = 4096 on H800.\n";
    if !report.depth_sweep.is_empty() {
        out += "\nThe accumulator's partial-sum depth is not published; how the FP8-input error moves with it:\n";
        out += &format!("{:>16} | {:>14} | {:>14}\n", "products per add", "no promotion", "promoted");
        for p in &report.depth_sweep {
            out += &format!(
                "{:>16} | {:>13.4}% | {:>13.4}%\n",
                p.products_per_add,
                100.0 * p.unpromoted.relative.max,
                100.0 * p.promoted.relative.max
            );
        }
        out += "(max relative error)\n";
    }
    out
}
