//! The DeepSeekMoE layer: f64 finite-difference checks of B and W (balance loss
//! included), routing against a brute-force reference, the layer against a naive
//! per-token computation, auxiliary-loss-free balancing, and determinism across thread
//! counts.

mod common;

use common::{check_gradient, project, random};
use flotilla_model::ModelConfig;
use flotilla_model::Preset;
use flotilla_model::moe::{LocalExchange, MoeCache, MoeLayer, RoutingConfig, max_over_mean_load, route};
use flotilla_model::precision::CachedActivation;
use flotilla_model::{ModelError, Real};
use std::collections::BTreeSet;

const PREFIX: &str = "model.layers.3.mlp";

/// The experts' input as the layer's callers keep it: `x` itself (the layers here are
/// fp32).
fn kept<T: Real>(x: &[T]) -> CachedActivation<T> {
    CachedActivation::Full(x.to_vec())
}

/// [`MoeLayer::forward`] with the gate and the experts reading the same `x`.
fn forward<T: Real>(
    layer: &MoeLayer<T>,
    x: &[T],
    batch: usize,
    seq_len: usize,
    alpha: f64,
    y: &mut [T],
    threads: usize,
) -> Result<MoeCache<T>, ModelError> {
    layer.forward(x, &kept(x), batch, seq_len, alpha, y, threads, &mut LocalExchange)
}

/// hidden 8, moe_inter 6, 8 routed experts in 4 groups (2 kept), `top_k`, 1 shared.
fn small_config(top_k: usize, norm: bool) -> ModelConfig {
    let mut cfg = Preset::Tiny.config();
    cfg.hidden_size = 8;
    cfg.moe_intermediate_size = 6;
    cfg.n_routed_experts = 8;
    cfg.n_group = 4;
    cfg.topk_group = 2;
    cfg.num_experts_per_tok = top_k;
    cfg.n_shared_experts = 1;
    cfg.norm_topk_prob = norm;
    cfg.routed_scaling_factor = 2.5;
    // Larger than HF's 0.02 so that outputs, scores and their margins are O(1).
    cfg.initializer_range = 0.5;
    cfg.validate().unwrap();
    cfg
}

fn all_combinations(n: usize, k: usize) -> Vec<Vec<usize>> {
    fn rec(start: usize, n: usize, k: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if cur.len() == k {
            out.push(cur.clone());
            return;
        }
        for i in start..n {
            cur.push(i);
            rec(i + 1, n, k, cur, out);
            cur.pop();
        }
    }
    let mut out = Vec::new();
    rec(0, n, k, &mut Vec::new(), &mut out);
    out
}

/// The chosen expert set of one token by enumeration: a group's score is its best pair's
/// sum; the kept groups are the subset of `topk_group` groups with the largest total; the
/// chosen experts are the `k`-subset of the kept groups' experts with the largest total.
/// Also returns the smallest margin by which any of these maxima beat the runner-up.
fn brute_route(cfg: &RoutingConfig, s: &[f64], bias: &[f64]) -> (BTreeSet<usize>, f64) {
    let n = cfg.n_routed_experts;
    let per = n / cfg.n_group;
    let sel: Vec<f64> = s.iter().zip(bias).map(|(a, b)| a + b).collect();
    let best = |sets: Vec<Vec<usize>>, value: &dyn Fn(&[usize]) -> f64| {
        let mut scored: Vec<(f64, Vec<usize>)> = sets.into_iter().map(|c| (value(&c), c)).collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        let margin = if scored.len() > 1 { scored[0].0 - scored[1].0 } else { f64::INFINITY };
        (scored.swap_remove(0).1, margin)
    };
    let mut margin = f64::INFINITY;
    let candidates: Vec<usize> = if cfg.n_group > 1 {
        let group_scores: Vec<f64> = (0..cfg.n_group)
            .map(|g| {
                all_combinations(per, 2)
                    .iter()
                    .map(|p| sel[g * per + p[0]] + sel[g * per + p[1]])
                    .fold(f64::NEG_INFINITY, f64::max)
            })
            .collect();
        let (groups, m) = best(all_combinations(cfg.n_group, cfg.topk_group), &|c| {
            c.iter().map(|&g| group_scores[g]).sum()
        });
        margin = margin.min(m);
        groups.iter().flat_map(|&g| g * per..(g + 1) * per).collect()
    } else {
        (0..n).collect()
    };
    let (chosen, m) = best(all_combinations(candidates.len(), cfg.num_experts_per_tok), &|c| {
        c.iter().map(|&i| sel[candidates[i]]).sum()
    });
    (chosen.iter().map(|&i| candidates[i]).collect(), margin.min(m))
}

fn chosen_sets(cache: &MoeCache<f64>) -> Vec<BTreeSet<usize>> {
    let k = cache.routing.top_k;
    cache.routing.experts.chunks(k).map(|c| c.iter().copied().collect()).collect()
}

/// FD check of dx, the gate weight, the busiest routed expert and the shared expert, the
/// loss being `⟨y, r⟩ + c·L_bal`.
///
/// The top-k choice is piecewise constant, so finite differences are only meaningful if
/// no choice flips between x ± h. The shared helper perturbs by h = 1e-5; a perturbation
/// moves a logit by at most ~|G|·h and a sigmoid score by a quarter of that (< 1e-5),
/// so the test first asserts that every routing decision (kept groups and chosen
/// experts) wins by a margin ≥ 1e-3, two orders above, and then, at every probe, that
/// the selection equals the unperturbed one.
fn fd_check(top_k: usize, norm: bool, alpha: f64, seed: u64) {
    let cfg = small_config(top_k, norm);
    let (batch, seq_len, h) = (2, 5, cfg.hidden_size);
    let tokens = batch * seq_len;
    let mut layer = MoeLayer::<f64>::new(&cfg, PREFIX, seed).unwrap();
    layer
        .e_score_correction_bias
        .set_value(&random(8, seed + 1).iter().map(|v| 0.1 * v).collect::<Vec<_>>())
        .unwrap();
    let x = random(tokens * h, seed + 2);
    let r = random(tokens * h, seed + 3);
    let c = 0.7; // upstream gradient of the total loss w.r.t. L_bal

    let mut y = vec![0.0; tokens * h];
    let cache = forward(&layer, &x, batch, seq_len, alpha, &mut y, 1).unwrap();
    let selection = chosen_sets(&cache);
    let mut min_margin = f64::INFINITY;
    for (t, (s, chosen)) in cache.scores.chunks(8).zip(&selection).enumerate() {
        let (set, margin) = brute_route(&layer.routing, s, layer.e_score_correction_bias.value.host());
        assert_eq!(&set, chosen, "token {t}");
        min_margin = min_margin.min(margin);
    }
    assert!(min_margin >= 1e-3, "seed {seed}: smallest routing margin {min_margin} too close to a flip");
    if alpha > 0.0 {
        assert!(cache.balance_loss > 0.0);
    } else {
        assert_eq!(cache.balance_loss, 0.0);
        assert!(cache.seq_load.is_empty());
    }

    let mut dx = vec![0.0; tokens * h];
    let grads = layer.backward_input(&cache, &r, c, &mut dx, false, 1, &mut LocalExchange).unwrap();
    layer.backward_weight(&cache, &grads, &x, &kept(&x), 1).unwrap();
    assert!(layer.e_score_correction_bias.grad.host().iter().all(|&g| g == 0.0), "the bias gets no gradient");

    let reference = layer.clone();
    let loss = |l: &MoeLayer<f64>, x: &[f64]| {
        let mut y = vec![0.0; tokens * h];
        let cache = forward(l, x, batch, seq_len, alpha, &mut y, 1).unwrap();
        assert_eq!(chosen_sets(&cache), selection, "a routing decision flipped under the perturbation");
        project(&y, &r) + c * cache.balance_loss
    };
    check_gradient("moe dx", &x, &dx, 200, |x| loss(&reference, x));

    let mut probe = reference.clone();
    check_gradient("moe gate", reference.gate.value.host(), reference.gate.grad.host(), 200, |w| {
        probe.gate.value.host_mut().copy_from_slice(w);
        loss(&probe, &x)
    });

    let busiest = (0..8).max_by_key(|&e| (cache.expert_load[e], std::cmp::Reverse(e))).unwrap();
    assert!(cache.expert_load[busiest] >= 3);
    for which in 0..3 {
        let mut probe = reference.clone();
        let p = &reference.experts[busiest].params_ref()[which];
        check_gradient(&format!("moe expert {busiest} weight {which}"), &p.0, &p.1, 60, |w| {
            probe.experts[busiest].params_mut()[which].value.host_mut().copy_from_slice(w);
            loss(&probe, &x)
        });
        let mut probe = reference.clone();
        let p = &reference.shared_experts.as_ref().unwrap().params_ref()[which];
        check_gradient(&format!("moe shared weight {which}"), &p.0, &p.1, 60, |w| {
            probe.shared_experts.as_mut().unwrap().params_mut()[which].value.host_mut().copy_from_slice(w);
            loss(&probe, &x)
        });
    }
    // An expert no token chose gets a zero gradient.
    for (e, ffn) in reference.experts.iter().enumerate() {
        if cache.expert_load[e] == 0 {
            assert!(ffn.gate_proj.weight.grad.host().iter().all(|&g| g == 0.0));
        }
    }
}

trait ParamsRef {
    fn params_ref(&self) -> [(Vec<f64>, Vec<f64>); 3];
}

impl ParamsRef for flotilla_model::ffn::SwiGluFfn<f64> {
    fn params_ref(&self) -> [(Vec<f64>, Vec<f64>); 3] {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
            .map(|l| (l.weight.value.to_host_vec(), l.weight.grad.to_host_vec()))
    }
}

#[test]
fn backward_matches_finite_differences_with_balance_loss() {
    fd_check(3, true, 0.5, 11);
}

#[test]
fn backward_matches_finite_differences_unnormalized_without_balance_loss() {
    fd_check(2, false, 0.0, 11);
}

#[test]
fn routing_matches_brute_force() {
    // (experts, groups, kept groups, top-k, norm)
    for (case, &(n, g, kg, k, norm)) in [
        (8, 4, 2, 3, true),
        (8, 4, 2, 2, false),
        (16, 4, 2, 4, true),
        (12, 3, 1, 2, true),
        (8, 1, 1, 3, true),
        (8, 4, 4, 2, true),
        (16, 8, 3, 5, false),
    ]
    .iter()
    .enumerate()
    {
        let cfg = RoutingConfig::new(n, k, g, kg, norm, 2.5).unwrap();
        let tokens = 200;
        let scores: Vec<f64> = random(tokens * n, 100 + case as u64).iter().map(|v| 0.5 + 0.5 * v).collect();
        let bias: Vec<f64> = random(n, 200 + case as u64).iter().map(|v| 0.3 * v).collect();
        let routing = route(&cfg, &scores, &bias, tokens).unwrap();
        assert_eq!((routing.experts.len(), routing.weights.len()), (tokens * k, tokens * k));
        for t in 0..tokens {
            let s = &scores[t * n..(t + 1) * n];
            let chosen = &routing.experts[t * k..(t + 1) * k];
            let (expected, _) = brute_route(&cfg, s, &bias);
            assert_eq!(chosen.iter().copied().collect::<BTreeSet<_>>(), expected, "case {case} token {t}");
            // Rank order: best selection score first.
            assert!(chosen.windows(2).all(|p| s[p[0]] + bias[p[0]] >= s[p[1]] + bias[p[1]]));
            // Weights: the unbiased scores, normalized when asked, times the factor.
            let sum: f64 = chosen.iter().map(|&e| s[e]).sum();
            for (&e, &w) in chosen.iter().zip(&routing.weights[t * k..(t + 1) * k]) {
                let expected = if norm { s[e] / (sum + 1e-20) * 2.5 } else { s[e] * 2.5 };
                assert!((w - expected).abs() < 1e-15, "case {case} token {t} expert {e}");
            }
            if norm {
                let total: f64 = routing.weights[t * k..(t + 1) * k].iter().sum();
                assert!((total - 2.5).abs() < 1e-12, "weights sum to routed_scaling_factor");
            }
        }
    }
}

#[test]
fn ties_rank_the_lower_index_first() {
    let cfg = RoutingConfig::new(8, 3, 4, 2, true, 1.0).unwrap();
    let routing = route(&cfg, &[0.5; 8], &[0.0; 8], 1).unwrap();
    assert_eq!(routing.experts, vec![0, 1, 2]);
    // Groups 1 and 3 tie at the top; expert 6 ties expert 7 within group 3.
    let s = [0.1, 0.1, 0.9, 0.2, 0.1, 0.1, 0.9, 0.9];
    let routing = route(&cfg, &s, &[0.0, 0.0, 0.0, 0.7, 0.0, 0.0, 0.0, 0.0], 1).unwrap();
    assert_eq!(routing.experts, vec![2, 6, 7]);
    // -0.0 ties +0.0.
    let routing =
        route(&RoutingConfig::new(2, 1, 1, 1, true, 1.0).unwrap(), &[0.0, 0.0], &[0.0, -0.0], 1).unwrap();
    assert_eq!(routing.experts, vec![0]);
}

#[test]
fn bias_changes_selection_but_not_weights() {
    let cfg = RoutingConfig::new(8, 2, 4, 2, true, 2.5).unwrap();
    let tokens = 50;
    let scores: Vec<f64> = random(tokens * 8, 7).iter().map(|v| 0.5 + 0.4 * v).collect();
    let plain = route(&cfg, &scores, &[0.0; 8], tokens).unwrap();
    let mut bias = [0.0; 8];
    bias[7] = 10.0;
    let biased = route(&cfg, &scores, &bias, tokens).unwrap();
    assert_ne!(plain.experts, biased.experts);
    for t in 0..tokens {
        let s = &scores[t * 8..(t + 1) * 8];
        let chosen = &biased.experts[t * 2..(t + 1) * 2];
        assert_eq!(chosen[0], 7, "the biased expert always wins");
        let sum = s[chosen[0]] + s[chosen[1]];
        for (&e, &w) in chosen.iter().zip(&biased.weights[t * 2..(t + 1) * 2]) {
            assert!((w - s[e] / (sum + 1e-20) * 2.5).abs() < 1e-15, "weights use the unbiased scores");
        }
    }
    // Same through the layer: a bias moves tokens, and the weights stay the unbiased ones.
    let mut layer = MoeLayer::<f64>::new(&small_config(2, true), PREFIX, 3).unwrap();
    let x = random(tokens * 8, 8);
    let mut y = vec![0.0; tokens * 8];
    let before = forward(&layer, &x, 5, 10, 0.0, &mut y, 1).unwrap();
    layer.e_score_correction_bias.value.host_mut()[7] = 10.0;
    let after = forward(&layer, &x, 5, 10, 0.0, &mut y, 1).unwrap();
    assert_eq!(after.expert_load[7], tokens as u64);
    assert_ne!(before.routing.experts, after.routing.experts);
    assert_eq!(before.scores, after.scores);
}

/// The layer against a per-token loop over each token's chosen experts (brute-force
/// routing, single-row FFN calls), and the balance loss against its formula.
#[test]
fn layer_matches_naive_per_token_computation() {
    let mut cfg = small_config(3, true);
    cfg.n_shared_experts = 2;
    let (batch, seq_len, h, n, k) = (3, 4, 8, 8, 3);
    let tokens = batch * seq_len;
    let mut layer = MoeLayer::<f64>::new(&cfg, PREFIX, 5).unwrap();
    layer
        .e_score_correction_bias
        .set_value(&random(n, 6).iter().map(|v| 0.2 * v).collect::<Vec<_>>())
        .unwrap();
    let x = random(tokens * h, 9);
    let mut y = vec![0.0; tokens * h];
    let alpha = 0.3;
    let cache = forward(&layer, &x, batch, seq_len, alpha, &mut y, 2).unwrap();

    let shared = layer.shared_experts.as_ref().unwrap();
    assert_eq!(shared.gate_proj.out_features, 12, "2 shared experts fused");
    let mut total_load = [0u64; 8];
    let mut balance = 0.0;
    for b in 0..batch {
        let (mut counts, mut p) = ([0.0; 8], [0.0; 8]);
        for t in b * seq_len..(b + 1) * seq_len {
            let xt = &x[t * h..(t + 1) * h];
            let s: Vec<f64> = (0..n)
                .map(|e| {
                    let u: f64 =
                        xt.iter().zip(&layer.gate.value.host()[e * h..(e + 1) * h]).map(|(a, b)| a * b).sum();
                    1.0 / (1.0 + (-u).exp())
                })
                .collect();
            let (chosen, _) = brute_route(&layer.routing, &s, layer.e_score_correction_bias.value.host());
            let sum: f64 = chosen.iter().map(|&e| s[e]).sum();
            let mut expected = vec![0.0; h];
            shared.forward(&kept(xt), 1, &mut expected, 1).unwrap();
            for &e in &chosen {
                let mut out = vec![0.0; h];
                layer.experts[e].forward(&kept(xt), 1, &mut out, 1).unwrap();
                for (a, o) in expected.iter_mut().zip(&out) {
                    *a += s[e] / sum * 2.5 * o;
                }
                counts[e] += 1.0;
                total_load[e] += 1;
            }
            let z: f64 = s.iter().sum();
            for e in 0..n {
                p[e] += s[e] / z / seq_len as f64;
            }
            for (j, (a, b)) in expected.iter().zip(&y[t * h..(t + 1) * h]).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-12 * (1.0 + a.abs()),
                    "token {t} dim {j}: naive {a} vs layer {b}"
                );
            }
        }
        let f: Vec<f64> = counts.iter().map(|c| n as f64 / (k as f64 * seq_len as f64) * c).collect();
        balance += alpha * f.iter().zip(&p).map(|(f, p)| f * p).sum::<f64>() / batch as f64;
    }
    assert_eq!(cache.expert_load, total_load);
    assert_eq!(cache.expert_load.iter().sum::<u64>(), (tokens * k) as u64);
    assert!((cache.balance_loss - balance).abs() < 1e-14, "{} vs {balance}", cache.balance_loss);
}

#[test]
fn update_bias_follows_the_rule() {
    let mut layer = MoeLayer::<f64>::new(&small_config(2, true), PREFIX, 1).unwrap();
    layer.update_bias(&[5, 1, 2, 2, 3, 1, 2, 0], 0.01).unwrap(); // mean 2
    assert_eq!(
        layer.e_score_correction_bias.value.host(),
        vec![-0.01, 0.01, 0.0, 0.0, -0.01, 0.01, 0.0, 0.01]
    );
    assert!(layer.e_score_correction_bias.grad.host().iter().all(|&g| g == 0.0));
    assert_eq!(max_over_mean_load(&[5, 1, 2, 2, 3, 1, 2, 0]), 2.5);
    assert_eq!(max_over_mean_load(&[0; 4]), 1.0);
    let err = layer.update_bias(&[1, 2], 0.01).unwrap_err().to_string();
    assert!(err.contains("model.layers.3.mlp.gate.e_score_correction_bias"), "{err}");
    assert!(layer.update_bias(&[1; 8], f64::NAN).is_err());
}

/// A gate pushed off balance (every token shares a direction that four experts' gate rows
/// favour): repeated forward + `update_bias` on the counts brings max/mean load down.
#[test]
fn update_bias_restores_balance() {
    let mut cfg = small_config(2, true);
    cfg.hidden_size = 16;
    cfg.n_routed_experts = 16;
    cfg.num_experts_per_tok = 4;
    cfg.initializer_range = 0.3;
    cfg.validate().unwrap();
    let (batch, seq_len, h) = (4, 32, 16);
    let tokens = batch * seq_len;
    let mut layer = MoeLayer::<f32>::new(&cfg, PREFIX, 2).unwrap();
    let offset: Vec<f32> = (0..h).map(|j| if j % 2 == 0 { 0.5 } else { -0.5 }).collect();
    for e in [1, 2, 5, 6] {
        for (w, o) in layer.gate.value.host_mut()[e * h..(e + 1) * h].iter_mut().zip(&offset) {
            *w += 0.8 * o;
        }
    }
    let x: Vec<f32> =
        random(tokens * h, 4).iter().enumerate().map(|(i, v)| 0.5 * *v as f32 + offset[i % h]).collect();
    let mut y = vec![0.0f32; tokens * h];
    let mut history = Vec::new();
    for _ in 0..150 {
        let cache = forward(&layer, &x, batch, seq_len, 0.0, &mut y, 1).unwrap();
        history.push(max_over_mean_load(&cache.expert_load));
        layer.update_bias(&cache.expert_load, 0.01).unwrap();
    }
    let (first, last) = (history[0], history[history.len() - 10..].iter().cloned().fold(0.0, f64::max));
    assert!(first > 3.0, "the gate starts off balance: {first}");
    // It settles at 1.4–1.6 (the bias steps by ±γ around balance, so loads oscillate).
    assert!(last < 1.75, "max/mean load went from {first} to {last}");
    for e in [1, 2, 5, 6] {
        assert!(layer.e_score_correction_bias.value.host()[e] < -0.1, "favoured experts get a negative bias");
    }
}

/// f32, threads 1 vs 2: forward, B and W bit-identical.
#[test]
fn results_do_not_depend_on_threads() {
    let mut cfg = small_config(4, true);
    cfg.hidden_size = 64;
    cfg.moe_intermediate_size = 32;
    cfg.n_routed_experts = 16;
    cfg.initializer_range = 0.1;
    cfg.validate().unwrap();
    let (batch, seq_len, h) = (4, 32, 64);
    let tokens = batch * seq_len;
    let x: Vec<f32> = random(tokens * h, 1).iter().map(|&v| v as f32).collect();
    let dy: Vec<f32> = random(tokens * h, 2).iter().map(|&v| v as f32).collect();
    let run = |threads: usize| {
        let mut layer = MoeLayer::<f32>::new(&cfg, PREFIX, 9).unwrap();
        let mut y = vec![0.0f32; tokens * h];
        let cache = forward(&layer, &x, batch, seq_len, 0.1, &mut y, threads).unwrap();
        let mut dx = vec![0.0f32; tokens * h];
        let grads =
            layer.backward_input(&cache, &dy, 1.0, &mut dx, false, threads, &mut LocalExchange).unwrap();
        layer.backward_weight(&cache, &grads, &x, &kept(&x), threads).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        let grads: Vec<Vec<u32>> = layer.params().iter().map(|p| bits(p.grad.host())).collect();
        (bits(&y), bits(&dx), cache.balance_loss.to_bits(), cache.expert_load, grads)
    };
    assert_eq!(run(1), run(2));
}

#[test]
fn names_shapes_and_errors() {
    let mut cfg = small_config(2, true);
    let layer = MoeLayer::<f64>::new(&cfg, PREFIX, 1).unwrap();
    let params = layer.params();
    assert_eq!(params.len(), 2 + 3 + 8 * 3);
    assert_eq!(
        (params[0].name.as_str(), params[0].shape.as_slice()),
        ("model.layers.3.mlp.gate.weight", &[8, 8][..])
    );
    assert_eq!(params[1].name, "model.layers.3.mlp.gate.e_score_correction_bias");
    assert_eq!(params[1].shape, vec![8]);
    assert!(params[1].value.host().iter().all(|&b| b == 0.0));
    assert_eq!(params[2].name, "model.layers.3.mlp.shared_experts.gate_proj.weight");
    assert_eq!(params[4].shape, vec![8, 6]);
    assert_eq!(params[5].name, "model.layers.3.mlp.experts.0.gate_proj.weight");
    assert_eq!(params[28].name, "model.layers.3.mlp.experts.7.down_proj.weight");
    let mut l = layer.clone();
    assert_eq!(l.params_mut().len(), 1 + 3 + 8 * 3, "the bias is not an optimizer parameter");

    let mut y = vec![0.0; 80];
    let err = forward(&layer, &[0.0; 79], 2, 5, 0.0, &mut y, 1).unwrap_err().to_string();
    assert!(err.contains("model.layers.3.mlp.gate.weight") && err.contains("input"), "{err}");
    let cache = forward(&layer, &[0.1; 80], 2, 5, 0.0, &mut y, 1).unwrap();
    let err = layer
        .backward_input(&cache, &[0.0; 8], 1.0, &mut y, false, 1, &mut LocalExchange)
        .unwrap_err()
        .to_string();
    assert!(err.contains("output gradient"), "{err}");

    cfg.n_shared_experts = 0;
    let layer = MoeLayer::<f64>::new(&cfg, PREFIX, 1).unwrap();
    assert!(layer.shared_experts.is_none());
    let x = random(80, 3);
    let cache = forward(&layer, &x, 2, 5, 0.0, &mut y, 1).unwrap();
    let mut dx = vec![f64::NAN; 80];
    layer.backward_input(&cache, &x, 1.0, &mut dx, false, 1, &mut LocalExchange).unwrap();
    assert!(dx.iter().all(|v| v.is_finite()));

    cfg.num_experts_per_tok = 5; // only 2 groups × 2 experts reachable
    assert!(MoeLayer::<f64>::new(&cfg, PREFIX, 1).is_err());
    assert!(RoutingConfig::new(8, 2, 3, 1, true, 1.0).is_err());
}
