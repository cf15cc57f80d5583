//! Reproductions of numerical findings of the DeepSeek-V3 report, run on the kernels of
//! this crate so that what they show is what training uses.
//!
//! [`fp8_accumulation`] reproduces §3.3.2 "Increasing accumulation precision": an FP8 GEMM
//! whose products are summed in the H800 tensor core's limited-precision accumulator, with
//! K = 4096, shows a maximum relative error near 2%; promoting the partial sums to FP32
//! every N_C = 128 elements of K removes it.
//!
//! The emulated accumulator is [`LimitedAccumulator`]: 13 explicit mantissa bits (FP22, as
//! SageAttention2 measured for FP8 MMA; "around 14 bits" in the report), truncation, and
//! a partial-sum depth `products_per_add` — how many exact products the hardware adds
//! before each rounded accumulator update. NVIDIA does not publish that depth for FP8 MMA;
//! 4 is the depth Fasi et al. (2021) measured for earlier tensor cores, and the depth
//! changes the figure (see the command's help), so it is a parameter.
//!
//! Two references are used: the f64 product of the original f32 inputs (total error, FP8
//! quantization included), and the f64 product of the dequantized FP8 inputs (the error
//! of accumulation alone, which is what the report's 2% measures).

use crate::KernelError;
use crate::gemm::{Accumulation, LimitedAccumulator, MatMut, MatRef, gemm_bf16, gemm_f32, gemm_fp8};
use crate::metrics::{RelativeError, calc_diff, relative_error};
use crate::quant::{Granularity, QuantConfig, quantize};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

/// The distribution the input matrices are drawn from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputDistribution {
    /// Uniform on [0, 1): no cancellation, so element-wise relative error is meaningful
    /// everywhere and the accumulator grows as it does in the report's test.
    Uniform,
    /// Standard normal: outputs near zero make element-wise relative error large; read
    /// `calc_diff` there.
    Normal,
}

/// What to run.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AccumulationConfig {
    /// Rows of the LHS and the output.
    pub m: usize,
    /// Columns of the output (rows of the NT-layout RHS).
    pub n: usize,
    /// The reduction length.
    pub k: usize,
    /// Seed of the input generator (ChaCha8).
    pub seed: u64,
    /// Input distribution.
    pub distribution: InputDistribution,
    /// The emulated tensor-core accumulator; its `promote_every` is used for the promoted
    /// row and ignored for the unpromoted one.
    pub accumulator: LimitedAccumulator,
    /// Threads for the GEMMs and references.
    pub threads: usize,
}

impl Default for AccumulationConfig {
    fn default() -> Self {
        Self {
            m: 256,
            n: 256,
            k: 4096,
            seed: 0,
            distribution: InputDistribution::Uniform,
            accumulator: LimitedAccumulator::default(),
            threads: rayon::current_num_threads(),
        }
    }
}

/// Errors of one GEMM against one reference.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ErrorSummary {
    /// Element-wise relative error (max and mean).
    pub relative: RelativeError,
    /// DeepGEMM's `calc_diff`.
    pub calc_diff: f64,
}

/// One GEMM variant and its errors.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AccumulationRow {
    /// Which GEMM.
    pub name: String,
    /// Against the f64 product of the original inputs.
    pub vs_exact_inputs: ErrorSummary,
    /// Against the f64 product of the dequantized FP8 inputs (FP8 rows only): the error
    /// that accumulation alone adds.
    pub vs_fp8_inputs: Option<ErrorSummary>,
}

/// The unpromoted and promoted errors (against the FP8 inputs' f64 product) for one
/// partial-sum depth of the emulated accumulator.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DepthSweepPoint {
    /// [`LimitedAccumulator::products_per_add`].
    pub products_per_add: usize,
    /// Without promotion.
    pub unpromoted: ErrorSummary,
    /// Promoted every N_C.
    pub promoted: ErrorSummary,
}

/// The experiment's result.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AccumulationReport {
    /// What was run.
    pub config: AccumulationConfig,
    /// One row per GEMM variant.
    pub rows: Vec<AccumulationRow>,
    /// The accumulator's unpublished parameter, swept: how the two limited rows move with
    /// the partial-sum depth ([`SWEPT_DEPTHS`] that divide N_C).
    pub depth_sweep: Vec<DepthSweepPoint>,
}

/// Partial-sum depths the report sweeps: from a 4-product adder to one FP8 `wgmma`'s K.
pub const SWEPT_DEPTHS: [usize; 4] = [4, 8, 16, 32];

fn positive(name: &'static str, v: usize) -> Result<(), KernelError> {
    if v == 0 {
        return Err(KernelError::InvalidParameter { name, detail: "must be at least 1".into() });
    }
    Ok(())
}

/// Runs the accumulation-precision experiment.
pub fn fp8_accumulation(config: &AccumulationConfig) -> Result<AccumulationReport, KernelError> {
    let AccumulationConfig { m, n, k, threads, .. } = *config;
    positive("m", m)?;
    positive("n", n)?;
    positive("k", k)?;
    positive("threads", threads)?;

    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let a = random_matrix(&mut rng, m * k, config.distribution);
    let b = random_matrix(&mut rng, n * k, config.distribution);

    let exact_reference = reference_nt(&a, &b, m, n, k);
    let qa = quantize(&a, m, k, Granularity::Tile1x128, &QuantConfig::default())?;
    let qb = quantize(&b, n, k, Granularity::Block128x128, &QuantConfig::default())?;
    let fp8_reference = reference_nt(&qa.dequantize(), &qb.dequantize(), m, n, k);

    let summarize = |c: &[f32], reference: &[f64]| -> Result<ErrorSummary, KernelError> {
        Ok(ErrorSummary { relative: relative_error(c, reference)?, calc_diff: calc_diff(c, reference)? })
    };

    let mut rows = Vec::new();

    let mut c = vec![0f32; m * n];
    gemm_f32(
        MatMut::row_major(&mut c, m, n, "c")?,
        0.0,
        MatRef::row_major(&a, m, k, "a")?,
        MatRef::row_major(&b, n, k, "b")?.t(),
        1.0,
        threads,
    )?;
    rows.push(AccumulationRow {
        name: "f32 inputs, f32 accumulation".into(),
        vs_exact_inputs: summarize(&c, &exact_reference)?,
        vs_fp8_inputs: None,
    });

    let a16: Vec<bf16> = a.iter().map(|&v| bf16::from_f32(v)).collect();
    let b16: Vec<bf16> = b.iter().map(|&v| bf16::from_f32(v)).collect();
    gemm_bf16(
        MatMut::row_major(&mut c, m, n, "c")?,
        0.0,
        MatRef::row_major(&a16, m, k, "a")?,
        MatRef::row_major(&b16, n, k, "b")?.t(),
        1.0,
        threads,
    )?;
    rows.push(AccumulationRow {
        name: "BF16 inputs, f32 accumulation".into(),
        vs_exact_inputs: summarize(&c, &exact_reference)?,
        vs_fp8_inputs: None,
    });

    let limited = config.accumulator;
    limited.validate()?;
    let promote_every = limited.promote_every.unwrap_or(crate::quant::TILE);
    let unpromoted = |products_per_add| {
        Accumulation::Limited(LimitedAccumulator { products_per_add, promote_every: None, ..limited })
    };
    let promoted = |products_per_add| {
        Accumulation::Limited(LimitedAccumulator {
            products_per_add,
            promote_every: Some(promote_every),
            ..limited
        })
    };
    let fp8_variants = [
        ("FP8, exact f32 accumulation".to_string(), Accumulation::F32),
        (
            format!("FP8, {}-bit accumulator, no promotion", limited.mantissa_bits + 1),
            unpromoted(limited.products_per_add),
        ),
        (
            format!("FP8, {}-bit accumulator, promoted every {promote_every}", limited.mantissa_bits + 1),
            promoted(limited.products_per_add),
        ),
    ];
    for (name, accumulation) in fp8_variants {
        gemm_fp8(&qa, &qb, accumulation, &mut c, threads)?;
        rows.push(AccumulationRow {
            name,
            vs_exact_inputs: summarize(&c, &exact_reference)?,
            vs_fp8_inputs: Some(summarize(&c, &fp8_reference)?),
        });
    }

    let mut depth_sweep = Vec::new();
    for depth in SWEPT_DEPTHS.into_iter().filter(|d| promote_every.is_multiple_of(*d)) {
        gemm_fp8(&qa, &qb, unpromoted(depth), &mut c, threads)?;
        let unpromoted = summarize(&c, &fp8_reference)?;
        gemm_fp8(&qa, &qb, promoted(depth), &mut c, threads)?;
        depth_sweep.push(DepthSweepPoint {
            products_per_add: depth,
            unpromoted,
            promoted: summarize(&c, &fp8_reference)?,
        });
    }

    Ok(AccumulationReport { config: config.clone(), rows, depth_sweep })
}

fn random_matrix(rng: &mut ChaCha8Rng, len: usize, distribution: InputDistribution) -> Vec<f32> {
    match distribution {
        InputDistribution::Uniform => (0..len).map(|_| rng.random::<f32>()).collect(),
        InputDistribution::Normal => (0..len).map(|_| StandardNormal.sample(rng)).collect(),
    }
}

/// `C[i, j] = Σ_k A[i, k]·B[j, k]` in f64, for NT-layout f32 inputs.
fn reference_nt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    let a: Vec<f64> = a.iter().map(|&v| v as f64).collect();
    let b: Vec<f64> = b.iter().map(|&v| v as f64).collect();
    let mut c = vec![0f64; m * n];
    c.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        let ai = &a[i * k..(i + 1) * k];
        for (j, out) in row.iter_mut().enumerate() {
            let bj = &b[j * k..(j + 1) * k];
            *out = ai.iter().zip(bj).map(|(x, y)| x * y).sum();
        }
    });
    c
}
