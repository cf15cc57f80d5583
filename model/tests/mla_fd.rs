//! Multi-head Latent Attention and the RMSNorm layer: f64 finite-difference checks of B
//! (input gradient) and W (every weight), for low-rank and plain queries and under YaRN;
//! recomputation bit-identical to storing; causality; f32 against f64; thread-count
//! determinism; errors naming the tensor at fault.

mod common;

use common::{check_gradient, project, random};
use flotilla_model::config::RopeScaling;
use flotilla_model::mla::{Mla, MlaCache};
use flotilla_model::norm::RmsNorm;
use flotilla_model::precision::CachedActivation;
use flotilla_model::{ModelConfig, ModelError, Preset, Real};

/// The layer input as a caller keeps it: `x` itself (the layers here are fp32).
fn kept<T: Real>(x: &[T]) -> CachedActivation<T> {
    CachedActivation::Full(x.to_vec())
}

const PREFIX: &str = "model.layers.0.self_attn";

/// hidden 12, 2 heads, q_lora 6 (or plain), kv_lora 5, nope 4, rope 4, v 3.
fn tiny(q_lora_rank: Option<usize>) -> ModelConfig {
    ModelConfig {
        hidden_size: 12,
        num_attention_heads: 2,
        q_lora_rank,
        kv_lora_rank: 5,
        qk_nope_head_dim: 4,
        qk_rope_head_dim: 4,
        v_head_dim: 3,
        max_position_embeddings: 16,
        // Large weights keep every gradient far from the checks' absolute tolerance.
        initializer_range: 0.4,
        rope_theta: 100.0,
        ..Preset::Tiny.config()
    }
}

/// [`tiny`] with YaRN over an original context of 4 < 16 positions, so the table applies it.
fn tiny_yarn() -> ModelConfig {
    ModelConfig {
        rope_scaling: Some(RopeScaling {
            rope_type: "yarn".into(),
            factor: 8.0,
            original_max_position_embeddings: 4,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 1.0,
        }),
        ..tiny(Some(6))
    }
}

/// Wide enough that the GEMMs may split work and the attention core uses two query blocks.
fn medium() -> ModelConfig {
    ModelConfig {
        hidden_size: 128,
        num_attention_heads: 4,
        q_lora_rank: Some(48),
        kv_lora_rank: 32,
        qk_nope_head_dim: 16,
        qk_rope_head_dim: 8,
        v_head_dim: 16,
        max_position_embeddings: 128,
        initializer_range: 0.1,
        ..Preset::Tiny.config()
    }
}

fn cast<T: Real>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from(x).unwrap()).collect()
}

fn widen<T: Real>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64().unwrap()).collect()
}

fn bits<T: Real>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().unwrap().to_bits()).collect()
}

/// A layer whose norm weights are moved off 1, so their gradients are checked in general.
fn layer<T: Real>(config: &ModelConfig, recompute: bool) -> Mla<T> {
    let mut mla = Mla::<T>::new(config, PREFIX, 7, recompute).unwrap();
    for (i, p) in mla.params_mut().into_iter().enumerate() {
        if p.name.ends_with("layernorm.weight") {
            let r = random(p.len(), 100 + i as u64);
            p.set_value(&cast(&r.iter().map(|r| 1.0 + 0.3 * r).collect::<Vec<_>>())).unwrap();
        }
    }
    mla
}

/// Everything one forward + B + W produces.
struct Run<T> {
    y: Vec<T>,
    dx: Vec<T>,
    grads: Vec<Vec<T>>,
    cache: MlaCache<T>,
}

fn run<T: Real>(mla: &mut Mla<T>, x: &[T], r: &[T], batch: usize, seq: usize, threads: usize) -> Run<T> {
    let mut y = vec![T::zero(); x.len()];
    let cache = mla.forward(&kept(x), batch, seq, &mut y, threads).unwrap();
    let mut dx = vec![T::zero(); x.len()];
    let g = mla.backward_input(&cache, r, &mut dx, false, threads).unwrap();
    mla.backward_weight(&cache, &g, &kept(x), threads).unwrap();
    let grads = mla.params().iter().map(|p| p.grad.to_host_vec()).collect();
    Run { y, dx, grads, cache }
}

fn loss(mla: &Mla<f64>, x: &[f64], r: &[f64], batch: usize, seq: usize) -> f64 {
    let mut y = vec![0.0; x.len()];
    mla.forward(&kept(x), batch, seq, &mut y, 1).unwrap();
    project(&y, r)
}

/// FD checks of `dx` and of every weight's gradient (sampled), through B and W.
fn check_layer(config: &ModelConfig, recompute: bool) {
    let (batch, seq) = (2, 5);
    let mut mla = layer::<f64>(config, recompute);
    let n = batch * seq * config.hidden_size;
    let (x, r) = (random(n, 11), random(n, 12));
    let out = run(&mut mla, &x, &r, batch, seq, 1);
    assert_eq!(out.cache.normed.is_none(), recompute);
    assert_eq!(out.cache.heads.is_none(), recompute);

    let reference = mla.clone();
    check_gradient("mla dx", &x, &out.dx, 60, |x| loss(&reference, x, &r, batch, seq));
    for (i, p) in reference.params().iter().enumerate() {
        let mut probe = reference.clone();
        check_gradient(&p.name, p.value.host(), p.grad.host(), 40, |w| {
            probe.params_mut()[i].value.host_mut().copy_from_slice(w);
            loss(&probe, &x, &r, batch, seq)
        });
    }

    // W accumulates; B with `accumulate` adds to `dx`.
    let g = mla.backward_input(&out.cache, &r, &mut vec![0.0; n], false, 1).unwrap();
    mla.backward_weight(&out.cache, &g, &kept(&x), 1).unwrap();
    for (p, g1) in mla.params().iter().zip(&out.grads) {
        assert!(
            p.grad.host().iter().zip(g1).all(|(a, b)| (a - 2.0 * b).abs() <= 1e-12 * b.abs().max(1.0)),
            "{}",
            p.name
        );
    }
    let mut dx2 = out.dx.clone();
    mla.backward_input(&out.cache, &r, &mut dx2, true, 1).unwrap();
    assert!(dx2.iter().zip(&out.dx).all(|(a, b)| (a - 2.0 * b).abs() <= 1e-12 * b.abs().max(1.0)));
}

#[test]
fn low_rank_queries_match_finite_differences() {
    check_layer(&tiny(Some(6)), false);
    check_layer(&tiny(Some(6)), true);
}

#[test]
fn plain_queries_match_finite_differences() {
    check_layer(&tiny(None), false);
    check_layer(&tiny(None), true);
}

#[test]
fn yarn_matches_finite_differences_and_scales_the_softmax() {
    let config = tiny_yarn();
    let mla = Mla::<f64>::new(&config, PREFIX, 7, false).unwrap();
    assert!(mla.rope().yarn_applied());
    let mscale = 0.1 * 8f64.ln() + 1.0;
    let expected = 8f64.powf(-0.5) * mscale * mscale;
    assert!((mla.softmax_scale() - expected).abs() < 1e-15, "{} vs {expected}", mla.softmax_scale());
    // Without YaRN the scale is qk^-½ and the outputs differ.
    let plain = Mla::<f64>::new(&tiny(Some(6)), PREFIX, 7, false).unwrap();
    assert_eq!(plain.softmax_scale(), 8f64.powf(-0.5));
    assert!(!plain.rope().yarn_applied());
    let x = random(5 * 12, 3);
    let (mut y1, mut y2) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    mla.forward(&kept(&x), 1, 5, &mut y1, 1).unwrap();
    plain.forward(&kept(&x), 1, 5, &mut y2, 1).unwrap();
    assert_ne!(y1, y2);
    check_layer(&config, false);
}

#[test]
fn parameters_have_hf_names_and_shapes() {
    let mla = Mla::<f32>::new(&tiny(Some(6)), PREFIX, 1, false).unwrap();
    let got: Vec<(String, Vec<usize>)> =
        mla.params().iter().map(|p| (p.name.clone(), p.shape.clone())).collect();
    let want = [
        ("q_a_proj.weight", vec![6, 12]),
        ("q_a_layernorm.weight", vec![6]),
        ("q_b_proj.weight", vec![16, 6]),
        ("kv_a_proj_with_mqa.weight", vec![9, 12]),
        ("kv_a_layernorm.weight", vec![5]),
        ("kv_b_proj.weight", vec![14, 5]),
        ("o_proj.weight", vec![12, 6]),
    ]
    .map(|(n, s)| (format!("{PREFIX}.{n}"), s));
    assert_eq!(got, want);
    assert!(mla.params()[1].value.host().iter().all(|&v| v == 1.0));
    let plain = Mla::<f32>::new(&tiny(None), PREFIX, 1, false).unwrap();
    assert_eq!(plain.params()[0].name, format!("{PREFIX}.q_proj.weight"));
    assert_eq!(plain.params()[0].shape, vec![16, 12]);
    assert_eq!(plain.params().len(), 5);
    // A shared rope table gives the same layer.
    let table = Mla::<f32>::rope_table(&tiny(Some(6))).unwrap();
    let shared = Mla::<f32>::with_rope_table(&tiny(Some(6)), PREFIX, 1, false, table).unwrap();
    assert_eq!(shared.params(), mla.params());
}

fn assert_runs_identical<T: Real>(a: &Run<T>, b: &Run<T>, what: &str) {
    assert_eq!(bits(&a.y), bits(&b.y), "{what}: y");
    assert_eq!(bits(&a.dx), bits(&b.dx), "{what}: dx");
    for (i, (ga, gb)) in a.grads.iter().zip(&b.grads).enumerate() {
        assert_eq!(bits(ga), bits(gb), "{what}: grad of param {i}");
    }
}

fn recompute_is_bit_identical<T: Real>(config: &ModelConfig, batch: usize, seq: usize) {
    let n = batch * seq * config.hidden_size;
    let (x, r) = (cast::<T>(&random(n, 21)), cast::<T>(&random(n, 22)));
    let stored = run(&mut layer::<T>(config, false), &x, &r, batch, seq, 1);
    let recomputed = run(&mut layer::<T>(config, true), &x, &r, batch, seq, 1);
    assert!(stored.cache.normed.is_some() && stored.cache.heads.is_some());
    assert!(recomputed.cache.normed.is_none() && recomputed.cache.heads.is_none());
    assert_runs_identical(&stored, &recomputed, "recompute");
    // The cache without recompute holds strictly more.
    let size = |c: &MlaCache<T>| {
        let stored = c.normed.as_ref().map_or(0, |n| {
            n.kv.normed.len()
                + n.kv.norm.rstd.len()
                + n.q.as_ref().map_or(0, |q| q.normed.len() + q.norm.rstd.len())
        }) + c.heads.as_ref().map_or(0, |h| h.q.len() + h.k.len() + h.v.len());
        stored + c.q_input.len() + c.kv_latent.len() + c.k_rope.len() + c.o.len() + c.lse.len()
    };
    assert!(size(&recomputed.cache) < size(&stored.cache));
}

#[test]
fn recompute_gives_bit_identical_results() {
    recompute_is_bit_identical::<f64>(&tiny(Some(6)), 2, 5);
    recompute_is_bit_identical::<f64>(&tiny(None), 2, 5);
    recompute_is_bit_identical::<f32>(&tiny(Some(6)), 2, 5);
    recompute_is_bit_identical::<f32>(&tiny(None), 2, 5);
    recompute_is_bit_identical::<f32>(&tiny_yarn(), 2, 5);
    recompute_is_bit_identical::<f32>(&medium(), 2, 80);
}

#[test]
fn outputs_are_causal() {
    for q_lora in [Some(6), None] {
        let config = tiny(q_lora);
        let mla = layer::<f64>(&config, false);
        let (batch, seq, hidden) = (2, 5, 12);
        let x = random(batch * seq * hidden, 31);
        let mut y = vec![0.0; x.len()];
        mla.forward(&kept(&x), batch, seq, &mut y, 1).unwrap();
        for b in 0..batch {
            // Change token 3 of sequence b.
            let mut x2 = x.clone();
            let row = b * seq + 3;
            x2[row * hidden..(row + 1) * hidden].iter_mut().for_each(|v| *v += 0.5);
            let mut y2 = vec![0.0; x.len()];
            mla.forward(&kept(&x2), batch, seq, &mut y2, 1).unwrap();
            for other in 0..batch * seq {
                let (r0, r1) = (other * hidden, (other + 1) * hidden);
                let changes = other / seq == b && other % seq >= 3;
                if changes {
                    assert_ne!(y[r0..r1], y2[r0..r1], "row {other} should see token {row}");
                } else {
                    assert_eq!(bits(&y[r0..r1]), bits(&y2[r0..r1]), "row {other} saw token {row}");
                }
            }
        }
    }
}

/// Max |a − b| over max |b|.
fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0.0f64, |m, (a, b)| m.max((a - b).abs())) / scale
}

#[test]
fn f32_agrees_with_f64() {
    for config in [tiny(Some(6)), tiny(None), tiny_yarn(), medium()] {
        let (batch, seq) = if config.hidden_size > 12 { (2, 80) } else { (2, 5) };
        let n = batch * seq * config.hidden_size;
        let mut m32 = layer::<f32>(&config, false);
        let mut m64 = layer::<f64>(&config, false);
        for (p64, p32) in m64.params_mut().into_iter().zip(m32.params()) {
            p64.set_value(&widen(p32.value.host())).unwrap();
        }
        let (x, r) = (cast::<f32>(&random(n, 41)), cast::<f32>(&random(n, 42)));
        let a = run(&mut m32, &x, &r, batch, seq, 1);
        let b = run(&mut m64, &widen(&x), &widen(&r), batch, seq, 1);
        let what = format!("hidden {} q_lora {:?}", config.hidden_size, config.q_lora_rank);
        assert!(rel_diff(&widen(&a.y), &b.y) < 1e-5, "{what}: y");
        assert!(rel_diff(&widen(&a.dx), &b.dx) < 1e-4, "{what}: dx");
        for (i, (ga, gb)) in a.grads.iter().zip(&b.grads).enumerate() {
            assert!(rel_diff(&widen(ga), gb) < 1e-4, "{what}: grad {i}: {}", rel_diff(&widen(ga), gb));
        }
    }
}

#[test]
fn results_do_not_depend_on_threads() {
    let config = medium();
    let (batch, seq) = (2, 80);
    let n = batch * seq * config.hidden_size;
    let (x, r) = (cast::<f32>(&random(n, 51)), cast::<f32>(&random(n, 52)));
    let in_pool = |threads: usize, recompute: bool| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| run(&mut layer::<f32>(&config, recompute), &x, &r, batch, seq, threads))
    };
    let one = in_pool(1, false);
    assert_runs_identical(&one, &in_pool(2, false), "threads 1 vs 2");
    assert_runs_identical(&one, &in_pool(2, true), "threads 1 vs 2, recompute");
}

fn expect_error<V: std::fmt::Debug>(result: Result<V, ModelError>, names: &[&str]) {
    let message = result.expect_err("expected an error").to_string();
    for name in names {
        assert!(message.contains(name), "`{message}` does not name `{name}`");
    }
}

#[test]
fn bad_lengths_are_errors_naming_the_tensor() {
    let config = tiny(Some(6));
    let mut mla = layer::<f64>(&config, false);
    let (batch, seq, hidden) = (2, 5, 12);
    let n = batch * seq * hidden;
    let x = random(n, 61);
    let mut y = vec![0.0; n];
    expect_error(mla.forward(&kept(&x[1..]), batch, seq, &mut y, 1), &[PREFIX, "input"]);
    expect_error(mla.forward(&kept(&x), batch, seq, &mut y[1..], 1), &[PREFIX, "output"]);
    // 17 positions with max_position_embeddings = 16.
    let long = random(17 * hidden, 62);
    expect_error(
        mla.forward(&kept(&long), 1, 17, &mut vec![0.0; 17 * hidden], 1),
        &[PREFIX, "max_position_embeddings"],
    );
    let cache = mla.forward(&kept(&x), batch, seq, &mut y, 1).unwrap();
    let mut dx = vec![0.0; n];
    expect_error(mla.backward_input(&cache, &x[1..], &mut dx, false, 1), &[PREFIX, "output gradient"]);
    expect_error(mla.backward_input(&cache, &x, &mut dx[1..], false, 1), &[PREFIX, "input gradient"]);
    let g = mla.backward_input(&cache, &x, &mut dx, false, 1).unwrap();
    expect_error(mla.backward_weight(&cache, &g, &kept(&x[1..]), 1), &[PREFIX, "input"]);
    let mut short = g.clone();
    short.d_kv_b.pop();
    expect_error(mla.backward_weight(&cache, &short, &kept(&x), 1), &[&format!("{PREFIX}.kv_b_proj.weight")]);
    let mut wrong = cache.clone();
    wrong.seq = 4;
    expect_error(mla.backward_input(&wrong, &x, &mut dx, false, 1), &[PREFIX, "cached"]);
    // A rope table built for another config.
    let other = ModelConfig { max_position_embeddings: 32, ..config.clone() };
    let table = Mla::<f64>::rope_table(&other).unwrap();
    expect_error(Mla::with_rope_table(&config, PREFIX, 1, false, table), &[PREFIX, "rope table"]);
    // RMSNorm names its weight.
    let mut norm = RmsNorm::<f64>::new("model.norm", 4, 1e-6);
    let xs = random(8, 63);
    let mut ys = vec![0.0; 8];
    expect_error(norm.forward(&xs[1..], 2, &mut ys), &["model.norm.weight", "input"]);
    let nc = norm.forward(&xs, 2, &mut ys).unwrap();
    expect_error(norm.backward_weight(&nc, &xs, &ys[1..]), &["model.norm.weight", "output gradient"]);
}

#[test]
fn rms_norm_layer_matches_finite_differences() {
    let (rows, dim) = (3, 7);
    let mut norm = RmsNorm::<f64>::new("model.layers.0.input_layernorm", dim, 1e-6);
    assert_eq!(norm.weight.name, "model.layers.0.input_layernorm.weight");
    assert!(norm.weight.value.host().iter().all(|&w| w == 1.0));
    norm.weight.set_value(&random(dim, 70).iter().map(|r| 1.0 + 0.5 * r).collect::<Vec<_>>()).unwrap();
    let (x, r) = (random(rows * dim, 71), random(rows * dim, 72));
    let mut y = vec![0.0; x.len()];
    let cache = norm.forward(&x, rows, &mut y).unwrap();
    let mut dx = vec![0.0; x.len()];
    norm.backward_input(&cache, &x, &r, &mut dx, false).unwrap();
    norm.backward_weight(&cache, &x, &r).unwrap();
    let eval = |n: &RmsNorm<f64>, x: &[f64]| {
        let mut y = vec![0.0; x.len()];
        n.forward(x, rows, &mut y).unwrap();
        project(&y, &r)
    };
    let reference = norm.clone();
    check_gradient("norm dx", &x, &dx, 100, |x| eval(&reference, x));
    let mut probe = reference.clone();
    check_gradient("norm dW", reference.weight.value.host(), reference.weight.grad.host(), 100, |w| {
        probe.weight.value.host_mut().copy_from_slice(w);
        eval(&probe, &x)
    });
    let mut dx2 = dx.clone();
    norm.backward_input(&cache, &x, &r, &mut dx2, true).unwrap();
    assert!(dx2.iter().zip(&dx).all(|(a, b)| (a - 2.0 * b).abs() < 1e-12));
}
