//! The linear layers' BF16 and FP8 precisions against the f32 reference: closeness of
//! outputs and gradients, the exact operands (granularities, shared weight quantization,
//! 128×1 re-tiling) of the FP8 GEMMs, which layers obey the precision, f64 refusal,
//! and short training runs of the tiny model (decreasing loss, FP8 determinism).

use flotilla_kernels::gemm::{MatMut, MatRef, gemm_f32, gemm_fp8};
use flotilla_kernels::metrics::calc_diff;
use flotilla_kernels::quant::{Granularity, TILE, quantize};
use flotilla_model::linear::Linear;
use flotilla_model::model::Model;
use flotilla_model::precision::{self, FP8_ACCUMULATION, FP8_QUANT, Precision};
use flotilla_model::train::{StepRecord, TrainConfig, Trainer};
use flotilla_model::{ModelConfig, Preset};
use half::bf16;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::path::Path;

fn normal(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let d = Normal::new(0.0, std).unwrap();
    (0..n).map(|_| d.sample(&mut rng)).collect()
}

fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Outputs and gradients of one layer for one input.
struct Pass {
    y: Vec<f32>,
    dx: Vec<f32>,
    dw: Vec<f32>,
}

/// Ragged on every dimension: rows (tokens) 300, in 200, out 150.
const ROWS: usize = 300;
const IN: usize = 200;
const OUT: usize = 150;

fn layer(precision: Precision) -> Linear<f32> {
    let mut l = Linear::<f32>::new("test.proj", IN, OUT, 0.02, 7);
    l.precision = precision;
    l
}

/// Activations and output gradients at the magnitudes training sees (gradients ~1e-5,
/// far below the inference quantizer's 1e-4 amax floor), with per-token spread.
fn inputs() -> (Vec<f32>, Vec<f32>) {
    let mut x = normal(ROWS * IN, 1.0, 1);
    let mut dy = normal(ROWS * OUT, 1e-5, 2);
    for (r, (xr, dr)) in x.chunks_mut(IN).zip(dy.chunks_mut(OUT)).enumerate() {
        let s = 1.0 + (r % 7) as f32;
        xr.iter_mut().for_each(|v| *v *= s);
        dr.iter_mut().for_each(|v| *v /= s);
    }
    (x, dy)
}

fn run(l: &mut Linear<f32>, x: &[f32], dy: &[f32], threads: usize) -> Pass {
    let mut y = vec![f32::NAN; ROWS * OUT];
    l.forward(x, ROWS, &mut y, threads).unwrap();
    let mut dx = vec![f32::NAN; ROWS * IN];
    l.backward_input(dy, ROWS, &mut dx, false, threads).unwrap();
    l.weight.zero_grad();
    l.backward_weight(dy, x, ROWS, threads).unwrap();
    Pass { y, dx, dw: l.weight.grad.clone() }
}

#[test]
fn bf16_and_fp8_layers_are_close_to_fp32() {
    let (x, dy) = inputs();
    let reference = run(&mut layer(Precision::Fp32), &x, &dy, 2);
    for (precision, bound) in [(Precision::Bf16, 3e-5), (Precision::Fp8, 1e-3)] {
        let got = run(&mut layer(precision), &x, &dy, 2);
        for (what, a, b) in
            [("y", &got.y, &reference.y), ("dx", &got.dx, &reference.dx), ("dW", &got.dw, &reference.dw)]
        {
            let diff = calc_diff(a, b).unwrap();
            eprintln!("{precision} {what}: calc_diff {diff:e}");
            assert!(diff < bound, "{precision} {what}: calc_diff {diff:e} ≥ {bound:e}");
            assert!(diff > 0.0, "{precision} {what}: identical to fp32, so not actually lowered");
        }
    }
}

fn round(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

/// `C = A·B` (row-major, optionally transposed views) in f32.
fn f32_gemm(m: usize, n: usize, a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    gemm_f32(MatMut::row_major(&mut c, m, n, "c").unwrap(), 0.0, a, b, 1.0, 1).unwrap();
    c
}

#[test]
fn bf16_is_rounded_operands_on_the_f32_gemm() {
    let (x, dy) = inputs();
    let mut l = layer(Precision::Bf16);
    let got = run(&mut l, &x, &dy, 2);
    let (xr, dyr, wr) = (round(&x), round(&dy), round(&l.weight.value));
    fn view(v: &[f32], r: usize, c: usize) -> MatRef<'_, f32> {
        MatRef::row_major(v, r, c, "m").unwrap()
    }
    let y = round(&f32_gemm(ROWS, OUT, view(&xr, ROWS, IN), view(&wr, OUT, IN).t()));
    let dx = round(&f32_gemm(ROWS, IN, view(&dyr, ROWS, OUT), view(&wr, OUT, IN)));
    let dw = f32_gemm(OUT, IN, view(&dyr, ROWS, OUT).t(), view(&xr, ROWS, IN));
    assert!(bits_equal(&got.y, &y), "Fprop");
    assert!(bits_equal(&got.dx, &dx), "Dgrad");
    assert!(bits_equal(&got.dw, &dw), "Wgrad (f32, not rounded)");
    assert!(got.y.iter().chain(&got.dx).all(|&v| bf16::from_f32(v).to_f32() == v), "BF16 outputs");
}

/// Each FP8 GEMM equals `gemm_fp8` on operands quantized here by hand with the recipe's
/// granularities.
#[test]
fn fp8_gemms_use_the_recipe_granularities() {
    let (x, dy) = inputs();
    let mut l = layer(Precision::Fp8);
    let got = run(&mut l, &x, &dy, 2);
    let w = &l.weight.value;

    // Fprop: x in 1×128 tiles along `in`, W in 128×128 blocks.
    let qx = quantize(&x, ROWS, IN, Granularity::Tile1x128, &FP8_QUANT).unwrap();
    let qw = quantize(w, OUT, IN, Granularity::Block128x128, &FP8_QUANT).unwrap();
    assert_eq!(qx.scales.len(), ROWS * IN.div_ceil(TILE));
    assert_eq!(qw.scales.len(), OUT.div_ceil(TILE) * IN.div_ceil(TILE));
    let mut y = vec![0f32; ROWS * OUT];
    gemm_fp8(&qx, &qw, FP8_ACCUMULATION, &mut y, 1).unwrap();
    assert!(bits_equal(&got.y, &y), "Fprop");

    // Dgrad: dy in 1×128 tiles along `out`; Wᵀ is the forward's W blocks transposed,
    // which is what quantizing Wᵀ in blocks would give as well.
    let qdy = quantize(&dy, ROWS, OUT, Granularity::Tile1x128, &FP8_QUANT).unwrap();
    let qwt = qw.transposed();
    assert_eq!((qwt.rows, qwt.cols, qwt.granularity), (IN, OUT, Granularity::Block128x128));
    let mut wt = vec![0f32; IN * OUT];
    for o in 0..OUT {
        for i in 0..IN {
            wt[i * OUT + o] = w[o * IN + i];
        }
    }
    assert_eq!(qwt, quantize(&wt, IN, OUT, Granularity::Block128x128, &FP8_QUANT).unwrap());
    let mut dx = vec![0f32; ROWS * IN];
    gemm_fp8(&qdy, &qwt, FP8_ACCUMULATION, &mut dx, 1).unwrap();
    assert!(bits_equal(&got.dx, &dx), "Dgrad");

    // Wgrad: K is tokens. dyᵀ = dy in 128×1 tiles, transposed; xᵀ = x in 128×1 tiles
    // (from the f32 activation), transposed.
    let qdyt = quantize(&dy, ROWS, OUT, Granularity::Tile128x1, &FP8_QUANT).unwrap().transposed();
    let qxt = quantize(&x, ROWS, IN, Granularity::Tile128x1, &FP8_QUANT).unwrap().transposed();
    assert_eq!((qdyt.rows, qdyt.cols, qdyt.granularity), (OUT, ROWS, Granularity::Tile1x128));
    assert_eq!((qxt.rows, qxt.cols, qxt.granularity), (IN, ROWS, Granularity::Tile1x128));
    assert_eq!(qxt.scales.len(), IN * ROWS.div_ceil(TILE), "one scale per channel per 128 tokens");
    assert_eq!(qdyt.scales.len(), OUT * ROWS.div_ceil(TILE), "one scale per channel per 128 tokens");
    let mut dw = vec![0f32; OUT * IN];
    gemm_fp8(&qdyt, &qxt, FP8_ACCUMULATION, &mut dw, 1).unwrap();
    assert!(bits_equal(&got.dw, &dw), "Wgrad");
    assert_eq!(qxt, precision::fp8_columns(&x, ROWS, IN).unwrap());

    // The paper's re-tiling of the forward's 1×128 FP8 x (two roundings) is a different
    // operand, and gives a different Wgrad.
    assert_ne!(precision::fp8_retile_for_wgrad(&qx).unwrap(), qxt);
    let mut dw_retiled = vec![0f32; OUT * IN];
    gemm_fp8(&qdyt, &precision::fp8_retile_for_wgrad(&qx).unwrap(), FP8_ACCUMULATION, &mut dw_retiled, 1)
        .unwrap();
    assert!(!bits_equal(&dw_retiled, &dw));
}

#[test]
fn accumulating_backward_input_adds_the_product() {
    let (x, dy) = inputs();
    for precision in [Precision::Bf16, Precision::Fp8] {
        let mut l = layer(precision);
        let base = run(&mut l, &x, &dy, 1);
        let start = normal(ROWS * IN, 1e-5, 3);
        let mut dx = start.clone();
        l.backward_input(&dy, ROWS, &mut dx, true, 1).unwrap();
        let want: Vec<f32> = start.iter().zip(&base.dx).map(|(a, b)| a + b).collect();
        assert!(bits_equal(&dx, &want), "{precision}");
        // Wgrad accumulates into the gradient too.
        l.backward_weight(&dy, &x, ROWS, 1).unwrap();
        let twice: Vec<f32> = base.dw.iter().map(|g| g + g).collect();
        assert!(bits_equal(&l.weight.grad, &twice), "{precision} Wgrad accumulation");
    }
}

#[test]
fn low_precision_results_do_not_depend_on_threads() {
    let (x, dy) = inputs();
    for precision in [Precision::Bf16, Precision::Fp8] {
        let a = run(&mut layer(precision), &x, &dy, 1);
        let b = run(&mut layer(precision), &x, &dy, 3);
        assert!(
            bits_equal(&a.y, &b.y) && bits_equal(&a.dx, &b.dx) && bits_equal(&a.dw, &b.dw),
            "{precision}"
        );
    }
}

#[test]
fn f64_needs_fp32() {
    let config = Preset::Tiny.config();
    for precision in [Precision::Bf16, Precision::Fp8] {
        let err = Model::<f64>::new_with(&config, 0, false, precision).unwrap_err().to_string();
        assert!(err.contains("f32"), "{err}");
        let mut l = Linear::<f64>::new("p", 4, 3, 0.02, 0);
        l.precision = precision;
        let err = l.forward(&[0.0; 8], 2, &mut [0.0; 6], 1).unwrap_err().to_string();
        assert!(err.contains("`p.weight`") && err.contains("fp32"), "{err}");
        assert!(l.backward_input(&[0.0; 6], 2, &mut [0.0; 8], false, 1).is_err());
        assert!(l.backward_weight(&[0.0; 6], &[0.0; 8], 2, 1).is_err());
    }
    let model = Model::<f64>::new_with(&config, 0, false, Precision::Fp32).unwrap();
    assert_eq!(model.precision(), Precision::Fp32);
}

#[test]
fn precision_reaches_exactly_the_recipe_layers() {
    let config = Preset::Tiny.config();
    let model = Model::<f32>::new_with(&config, 0, false, Precision::Fp8).unwrap();
    assert_eq!(model.precision(), Precision::Fp8);
    assert_eq!(model.lm_head.as_ref().unwrap().precision, Precision::Fp32, "output head stays f32");
    let mut linears = 0;
    let mut check = |l: &Linear<f32>| {
        assert_eq!(l.precision, Precision::Fp8, "{}", l.weight.name);
        linears += 1;
    };
    for block in model.layers.iter().chain(model.mtp.iter().map(|m| &m.block)) {
        let attn = &block.self_attn;
        match &attn.query {
            flotilla_model::mla::QueryProjection::LowRank { q_a_proj, q_b_proj, .. } => {
                check(q_a_proj);
                check(q_b_proj);
            }
            flotilla_model::mla::QueryProjection::Plain { q_proj } => check(q_proj),
        }
        check(&attn.kv_a_proj_with_mqa);
        check(&attn.kv_b_proj);
        check(&attn.o_proj);
        let ffns: Vec<_> = match &block.mlp {
            flotilla_model::block::Mlp::Dense(f) => vec![f],
            flotilla_model::block::Mlp::Moe(m) => m.shared_experts.iter().chain(&m.experts).collect(),
        };
        for f in ffns {
            check(&f.gate_proj);
            check(&f.up_proj);
            check(&f.down_proj);
        }
    }
    for m in &model.mtp {
        check(&m.eh_proj);
    }
    // 5 blocks (4 + MTP): 5 MLA projections each; 1 dense FFN, 4 MoE layers of 17 FFNs; eh_proj.
    assert_eq!(linears, 5 * 5 + 3 * (1 + 4 * 17) + 1);

    // The default and Model::new are fp32 throughout.
    let plain = Model::<f32>::new(&config, 0, false).unwrap();
    assert_eq!(plain.precision(), Precision::Fp32);
    assert!(plain.layers.iter().all(|b| b.self_attn.o_proj.precision == Precision::Fp32));
}

fn train_config(precision: &str, steps: u64, threads: usize) -> (TrainConfig, ModelConfig) {
    let text = format!(
        r#"
seed = 3
steps = {steps}
batch_size = 4
seq_len = 32
threads = {threads}
precision = "{precision}"

[model]
preset = "tiny"

[data]
kind = "synthetic"
tokens = 65536

[optimizer]
peak_lr = 3e-3
warmup_steps = 5
constant_steps = 100
decay_steps = 0
final_lr = 3e-3
"#
    );
    TrainConfig::from_toml(&text, Path::new(".")).unwrap()
}

fn train(precision: &str, steps: u64, threads: usize) -> (Vec<StepRecord>, Trainer) {
    let (config, model) = train_config(precision, steps, threads);
    let mut trainer = Trainer::new(config, &model).unwrap();
    let records = (0..steps).map(|_| trainer.train_step().unwrap()).collect();
    (records, trainer)
}

#[test]
fn config_parses_precision() {
    assert_eq!(train_config("fp8", 1, 1).0.precision, Precision::Fp8);
    let (config, model) = train_config("bf16", 1, 1);
    assert_eq!(config.precision, Precision::Bf16);
    assert_eq!(Trainer::new(config, &model).unwrap().model.precision(), Precision::Bf16);
    let default = "steps = 1\nbatch_size = 1\nseq_len = 8\n[model]\npreset = \"tiny\"\n[data]\nkind = \"synthetic\"\n\
                   [optimizer]\npeak_lr = 1e-3\nwarmup_steps = 0\nconstant_steps = 1\ndecay_steps = 0\nfinal_lr = 1e-3\n";
    assert_eq!(TrainConfig::from_toml(default, Path::new(".")).unwrap().0.precision, Precision::Fp32);
    let bad = default.replacen("steps = 1\n", "steps = 1\nprecision = \"fp16\"\n", 1);
    let err = TrainConfig::from_toml(&bad, Path::new(".")).unwrap_err().to_string();
    assert!(err.contains("fp16"), "{err}");
}

#[test]
fn tiny_model_trains_under_every_precision() {
    let mut finals = Vec::new();
    for precision in ["fp32", "bf16", "fp8"] {
        let (records, _) = train(precision, 20, 2);
        let ce: Vec<f64> = records.iter().map(|r| r.main_ce).collect();
        let head = ce[..5].iter().sum::<f64>() / 5.0;
        let tail = ce[15..].iter().sum::<f64>() / 5.0;
        eprintln!("{precision}: main CE first 5 steps {head:.4}, last 5 {tail:.4}");
        assert!(ce.iter().all(|c| c.is_finite()));
        assert!(tail < head - 0.5, "{precision}: loss did not decrease ({head} → {tail})");
        finals.push(tail);
    }
    // Low precision tracks the reference closely this early.
    for (name, f) in [("bf16", finals[1]), ("fp8", finals[2])] {
        let rel = (f - finals[0]).abs() / finals[0];
        assert!(rel < 0.02, "{name}: last-5 CE {f} vs fp32 {} ({rel:e})", finals[0]);
    }
}

#[test]
fn fp8_training_is_deterministic() {
    let (a, ta) = train("fp8", 4, 2);
    let (b, tb) = train("fp8", 4, 2);
    let (c, tc) = train("fp8", 4, 1);
    let losses =
        |r: &[StepRecord]| r.iter().map(|r| (r.loss.to_bits(), r.grad_norm.to_bits())).collect::<Vec<_>>();
    assert_eq!(losses(&a), losses(&b), "two runs");
    assert_eq!(losses(&a), losses(&c), "1 vs 2 threads");
    for ((p, q), r) in ta.model.params().iter().zip(tb.model.params()).zip(tc.model.params()) {
        assert!(bits_equal(&p.value, &q.value) && bits_equal(&p.value, &r.value), "{}", p.name);
    }
    // And it is not the fp32 run.
    let (d, _) = train("fp32", 4, 2);
    assert_ne!(losses(&a), losses(&d));
}
