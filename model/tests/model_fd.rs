//! The whole model: f64 finite-difference checks of the total loss (main CE + λ·MTP CE +
//! balance losses) with respect to every parameter tensor, untied and tied; the loss
//! against a reference forward assembled here from the layers (which pins the MTP layout:
//! embedding first in the concatenation, `h^0` before `model.norm`, shifted targets);
//! its decomposition; gradient accumulation; `loss` = `forward_backward`'s loss; f32
//! determinism across thread counts and with recomputation; scoring; naming; errors.

mod common;

use common::{check_gradient, random};
use flotilla_model::norm::RmsNorm;
use flotilla_model::{LocalExchange, LossConfig, Model, ModelConfig, ModelError, Preset, StepStats};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// vocab 11, hidden 8, 3 layers (1 dense), 2 heads, q_lora 6, kv_lora 4, nope 4, rope 2,
/// v 3, 8 experts in 4 groups (2 kept), top-2, 1 shared, moe_inter 4, dense inter 12,
/// MTP depth 1.
fn micro(tied: bool) -> ModelConfig {
    let cfg = ModelConfig {
        vocab_size: 11,
        hidden_size: 8,
        intermediate_size: 12,
        moe_intermediate_size: 4,
        num_hidden_layers: 3,
        num_attention_heads: 2,
        n_shared_experts: 1,
        n_routed_experts: 8,
        num_experts_per_tok: 2,
        n_group: 4,
        topk_group: 2,
        first_k_dense_replace: 1,
        q_lora_rank: Some(6),
        kv_lora_rank: 4,
        qk_nope_head_dim: 4,
        qk_rope_head_dim: 2,
        v_head_dim: 3,
        max_position_embeddings: 16,
        rope_theta: 100.0,
        num_nextn_predict_layers: 1,
        tie_word_embeddings: tied,
        // Larger than HF's 0.02 so that activations, gradients and routing margins are O(1).
        initializer_range: 0.5,
        ..Preset::Tiny.config()
    };
    cfg.validate().unwrap();
    cfg
}

const SEQ: usize = 5;
/// λ = 0.3 and α = 0.1: every term of the loss matters to the gradient.
const LOSS: LossConfig = LossConfig { mtp_lambda: 0.3, balance_alpha: 0.1 };

/// `count` windows of `len` tokens below `vocab`, from `seed`.
fn windows(count: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count).map(|_| (0..len).map(|_| rng.random_range(0..vocab as u32)).collect()).collect()
}

/// The micro model with nonzero selection biases (so that they matter to routing).
fn micro_model(tied: bool, seed: u64) -> Model<f64> {
    let mut model = Model::<f64>::new(&micro(tied), seed, false).unwrap();
    for (i, moe) in model.moe_layers_mut().into_iter().enumerate() {
        moe.e_score_correction_bias
            .set_value(&random(8, seed + 100 + i as u64).iter().map(|v| 0.1 * v).collect::<Vec<_>>())
            .unwrap();
    }
    model
}

/// What the reference forward computes.
struct Reference {
    loss: f64,
    main_ce: f64,
    mtp_ce: Vec<f64>,
    balance: f64,
    /// The chosen experts of every MoE layer, `[layer][token·top_k]`.
    selections: Vec<Vec<usize>>,
}

/// Mean CE of `targets` under `head(norm(h))`, the head applied by a naive loop.
fn naive_ce(
    h: &[f64],
    norm: &RmsNorm<f64>,
    head: &[f64],
    targets: &[u32],
    hidden: usize,
    vocab: usize,
) -> f64 {
    let rows = targets.len();
    let mut normed = vec![0.0; h.len()];
    norm.forward(h, rows, &mut normed).unwrap();
    let mut total = 0.0;
    for (x, &t) in normed.chunks(hidden).zip(targets) {
        let logits: Vec<f64> =
            (0..vocab).map(|v| (0..hidden).map(|j| x[j] * head[v * hidden + j]).sum()).collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
        total += lse - logits[t as usize];
    }
    total / rows as f64
}

/// The loss assembled from the public layers: the embedding, the blocks, `model.norm` and
/// the head; for each MTP depth k, `eh_proj([enorm(Emb(t_{i+k})) | hnorm(h^{k−1}_i)])`
/// (computed here by a naive loop), the module's block, `shared_head.norm` and the shared
/// head scoring `t_{i+k+1}`, with `h^0` the last block's output before `model.norm`.
fn reference(model: &Model<f64>, windows: &[Vec<u32>], seq: usize, cfg: &LossConfig) -> Reference {
    let c = model.config();
    let (batch, hidden, vocab) = (windows.len(), c.hidden_size, c.vocab_size);
    let rows = batch * seq;
    let gather =
        |off: usize| -> Vec<u32> { windows.iter().flat_map(|w| w[off..off + seq].to_vec()).collect() };
    let embed = |tokens: &[u32]| {
        let mut e = vec![0.0; rows * hidden];
        model.embed_tokens.forward(tokens, &mut e).unwrap();
        e
    };
    let head = model.head_weight().value.host();
    let (mut selections, mut balance) = (Vec::new(), 0.0);
    let mut record = |cache: &flotilla_model::block::BlockCache<f64>| {
        if let Some(m) = cache.moe() {
            selections.push(m.routing.experts.clone());
            balance += m.balance_loss;
        }
    };

    let mut x = embed(&gather(0));
    for block in &model.layers {
        let mut y = vec![0.0; x.len()];
        record(&block.forward(&x, batch, seq, cfg.balance_alpha, &mut y, 1, &mut LocalExchange).unwrap());
        x = y;
    }
    let main_ce = naive_ce(&x, &model.norm, head, &gather(1), hidden, vocab);

    let mut mtp_ce = Vec::new();
    let mut h_prev = x;
    for (m, module) in model.mtp.iter().enumerate() {
        let k = m + 1;
        let emb = embed(&gather(k));
        let (mut e_n, mut h_n) = (vec![0.0; rows * hidden], vec![0.0; rows * hidden]);
        module.enorm.forward(&emb, rows, &mut e_n).unwrap();
        module.hnorm.forward(&h_prev, rows, &mut h_n).unwrap();
        let w = module.eh_proj.weight.value.host();
        assert_eq!(module.eh_proj.weight.shape, vec![hidden, 2 * hidden]);
        let mut x = vec![0.0; rows * hidden];
        for r in 0..rows {
            let concat: Vec<f64> = e_n[r * hidden..(r + 1) * hidden]
                .iter()
                .chain(&h_n[r * hidden..(r + 1) * hidden])
                .copied()
                .collect();
            for o in 0..hidden {
                x[r * hidden + o] = (0..2 * hidden).map(|i| w[o * 2 * hidden + i] * concat[i]).sum();
            }
        }
        let mut out = vec![0.0; rows * hidden];
        record(
            &module
                .block
                .forward(&x, batch, seq, cfg.balance_alpha, &mut out, 1, &mut LocalExchange)
                .unwrap(),
        );
        mtp_ce.push(naive_ce(&out, &module.shared_head_norm, head, &gather(k + 1), hidden, vocab));
        h_prev = out;
    }
    let d = mtp_ce.len();
    let mtp_mean = if d > 0 { mtp_ce.iter().sum::<f64>() / d as f64 } else { 0.0 };
    Reference { loss: main_ce + cfg.mtp_lambda * mtp_mean + balance, main_ce, mtp_ce, balance, selections }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()) + 1e-14
}

/// Checks the total loss's gradient with respect to up to `per_tensor` entries of every
/// tensor of `model` (selection biases included: their gradient is 0, and so is the
/// loss's change, as long as no routing decision flips).
///
/// Routing (top-k on biased scores) is piecewise constant, so a central difference is
/// only meaningful if no choice flips between θ ± h. With h = 1e-5 a probe moves a gate
/// score by O(1e-5), far below the typical gaps between scores with weights of std 0.5;
/// rather than rely on that, every probe recomputes the reference forward and asserts
/// that every token's chosen experts, in every MoE layer, equal the unperturbed ones.
fn fd_check_all(model: &Model<f64>, windows: &[Vec<u32>], per_tensor: usize) -> usize {
    let mut trained = model.clone();
    trained.zero_grad();
    let stats = trained.forward_backward(windows, SEQ, &LOSS, 1).unwrap();
    let base = reference(model, windows, SEQ, &LOSS);
    assert!(close(stats.loss, base.loss, 1e-12), "model {} vs reference {}", stats.loss, base.loss);

    let mut checked = 0;
    for p in trained.params() {
        let mut probe = model.clone();
        let name = p.name.clone();
        check_gradient(&name, p.value.host(), p.grad.host(), per_tensor, |v| {
            let target = probe.params_mut().into_iter().find(|q| q.name == name).unwrap();
            target.value.host_mut().copy_from_slice(v);
            let r = reference(&probe, windows, SEQ, &LOSS);
            assert!(
                r.selections == base.selections,
                "{name}: a routing decision flipped under the perturbation"
            );
            probe.loss(windows, SEQ, &LOSS, 1).unwrap().loss
        });
        if name.ends_with("e_score_correction_bias") {
            assert!(p.grad.host().iter().all(|&g| g == 0.0), "{name} gets no gradient");
        }
        checked += 1;
    }
    checked
}

#[test]
fn total_loss_gradient_matches_finite_differences() {
    let model = micro_model(false, 3);
    let w = windows(2, SEQ + 2, 11, 4);
    let checked = fd_check_all(&model, &w, 8);
    // embed + 3 blocks (9 attention/norm tensors each; 3 dense FFN, 2 × 29 MoE tensors)
    // + MTP (enorm, hnorm, eh_proj, 9 + 29 block tensors, shared_head.norm) + norm + head.
    assert_eq!(checked, 1 + (9 + 3) + 2 * (9 + 29) + (3 + 9 + 29 + 1) + 2);
}

#[test]
fn tied_embedding_gradient_matches_finite_differences() {
    let model = micro_model(true, 5);
    assert!(model.lm_head.is_none());
    assert!(model.params().iter().all(|p| p.name != "lm_head.weight"));
    assert_eq!(model.head_weight().name, "model.embed_tokens.weight");
    let w = windows(2, SEQ + 2, 11, 6);
    // The embedding's gradient sums the lookup's (inputs and MTP shifted tokens) and the
    // head's: check all of it.
    let mut trained = model.clone();
    let _ = trained.forward_backward(&w, SEQ, &LOSS, 1).unwrap();
    let e = &trained.embed_tokens.weight;
    let mut probe = model.clone();
    check_gradient("tied embedding", e.value.host(), e.grad.host(), e.len(), |v| {
        probe.embed_tokens.weight.value.host_mut().copy_from_slice(v);
        probe.loss(&w, SEQ, &LOSS, 1).unwrap().loss
    });
    fd_check_all(&model, &w, 3);
}

#[test]
fn loss_matches_reference_and_decomposes() {
    let model = micro_model(false, 7);
    let w = windows(2, SEQ + 2, 11, 8);
    let stats = model.loss(&w, SEQ, &LOSS, 1).unwrap();
    let r = reference(&model, &w, SEQ, &LOSS);
    assert!(close(stats.main_ce, r.main_ce, 1e-12), "{} vs {}", stats.main_ce, r.main_ce);
    assert_eq!(stats.mtp_ce.len(), 1);
    assert!(close(stats.mtp_ce[0], r.mtp_ce[0], 1e-12));
    assert!(close(stats.balance_loss, r.balance, 1e-12));
    assert!(close(stats.loss, stats.main_ce + 0.3 * stats.mtp_ce[0] + stats.balance_loss, 1e-15));
    // Every term is present and of a sensible size (11-way CE ≈ ln 11 at random).
    assert!(stats.main_ce > 1.0 && stats.mtp_ce[0] > 1.0);
    assert!(stats.balance_loss > 0.01);
    assert_eq!(stats.tokens, 2 * SEQ);
    // MoE layers: blocks 1 and 2, and the MTP module's block, stored as layer 3.
    assert_eq!(stats.moe_layers, vec![1, 2, 3]);
    assert_eq!(model.moe_layer_indices(), vec![1, 2, 3]);
    for load in &stats.expert_loads {
        assert_eq!(load.len(), 8);
        assert_eq!(load.iter().sum::<u64>(), (2 * SEQ * 2) as u64);
    }
    // Without MTP weight and balance loss the total is the main CE.
    let plain = LossConfig { mtp_lambda: 0.0, balance_alpha: 0.0 };
    let s = model.loss(&w, SEQ, &plain, 1).unwrap();
    assert_eq!(s.loss, s.main_ce);
    assert_eq!(s.main_ce, stats.main_ce, "α does not change the forward");
    assert_eq!(s.balance_loss, 0.0);
    assert_eq!(LossConfig::default(), LossConfig { mtp_lambda: 0.3, balance_alpha: 1e-4 });
    let parsed: LossConfig = serde_json::from_str(r#"{"mtp_lambda": 0.1}"#).unwrap();
    assert_eq!(parsed, LossConfig { mtp_lambda: 0.1, balance_alpha: 1e-4 });
    assert!(model.loss(&w, SEQ, &LossConfig { mtp_lambda: -1.0, balance_alpha: 0.0 }, 1).is_err());
}

#[test]
fn gradients_accumulate_and_loss_equals_forward_backward() {
    let mut model = micro_model(false, 9);
    let w = windows(2, SEQ + 2, 11, 10);
    let eval = model.loss(&w, SEQ, &LOSS, 1).unwrap();
    let first = model.forward_backward(&w, SEQ, &LOSS, 1).unwrap();
    assert_eq!(eval, first, "loss and forward_backward report the same statistics, bit for bit");
    let once: Vec<Vec<f64>> = model.params().iter().map(|p| p.grad.to_host_vec()).collect();
    assert!(once.iter().flatten().any(|&g| g != 0.0));
    let second = model.forward_backward(&w, SEQ, &LOSS, 1).unwrap();
    assert_eq!(first, second, "gradients do not change the forward");
    for (p, g1) in model.params().iter().zip(&once) {
        for (&g2, &g1) in p.grad.host().iter().zip(g1) {
            assert!(
                (g2 - 2.0 * g1).abs() <= 1e-12 * g1.abs().max(1e-300) + 1e-15,
                "{}: {g2} vs 2·{g1}",
                p.name
            );
        }
    }
    model.zero_grad();
    assert!(model.params().iter().all(|p| p.grad.host().iter().all(|&g| g == 0.0)));
}

/// Tiny in f32: bit-identical statistics and gradients for 1 and 2 threads, and with and
/// without recomputation.
#[test]
fn f32_is_deterministic_across_threads_and_recompute() {
    let cfg = Preset::Tiny.config();
    let seq = 24;
    let w = windows(2, seq + 2, cfg.vocab_size, 12);
    let run = |threads: usize, recompute: bool| {
        let mut model = Model::<f32>::new(&cfg, 1, recompute).unwrap();
        let stats = model.forward_backward(&w, seq, &LossConfig::default(), threads).unwrap();
        let grads: Vec<Vec<u32>> =
            model.params().iter().map(|p| p.grad.host().iter().map(|g| g.to_bits()).collect()).collect();
        (stats, grads)
    };
    let (s1, g1) = run(1, false);
    let (s2, g2) = run(2, false);
    let (s3, g3) = run(2, true);
    assert!(s1.loss.is_finite() && s1.loss > 4.0, "tiny at init: CE ≈ ln 256, got {}", s1.loss);
    assert_eq!(s1, s2);
    assert!(g1 == g2, "gradients differ between 1 and 2 threads");
    assert_eq!(s1, s3);
    assert!(g1 == g3, "gradients differ with recomputation");
}

#[test]
fn logits_score_the_main_head() {
    let model = micro_model(false, 13);
    let w = windows(1, SEQ + 2, 11, 14);
    let logits = model.logits(&w[0][..SEQ], 1).unwrap();
    assert_eq!(logits.len(), SEQ * 11);
    let log_probs = model.next_token_log_probs(&w[0][..SEQ + 1], 1).unwrap();
    assert_eq!(log_probs.len(), SEQ);
    let stats = model.loss(&w, SEQ, &LOSS, 1).unwrap();
    let nll = -log_probs.iter().sum::<f64>() / SEQ as f64;
    assert!(close(nll, stats.main_ce, 1e-12), "{nll} vs {}", stats.main_ce);
    assert!(model.next_token_log_probs(&w[0][..1], 1).is_err());
    assert!(model.logits(&[], 1).is_err());
    let err = model.logits(&[1, 2, 11], 1).unwrap_err().to_string();
    assert!(err.contains("position 2"), "{err}");
}

#[test]
fn parameters_are_named_as_hf_and_mtp_shares_embedding_and_head() {
    let mut model = micro_model(false, 15);
    let names: Vec<String> = model.params().iter().map(|p| p.name.clone()).collect();
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "every tensor once");
    assert_eq!(names[0], "model.embed_tokens.weight");
    assert_eq!(names[names.len() - 2], "model.norm.weight");
    assert_eq!(names[names.len() - 1], "lm_head.weight");
    for expected in [
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.2.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.3.enorm.weight",
        "model.layers.3.hnorm.weight",
        "model.layers.3.eh_proj.weight",
        "model.layers.3.input_layernorm.weight",
        "model.layers.3.self_attn.q_a_proj.weight",
        "model.layers.3.post_attention_layernorm.weight",
        "model.layers.3.mlp.experts.7.down_proj.weight",
        "model.layers.3.mlp.shared_experts.up_proj.weight",
        "model.layers.3.shared_head.norm.weight",
    ] {
        assert!(names.iter().any(|n| n == expected), "missing {expected}");
    }
    assert!(!names.iter().any(|n| n.contains("layers.3.embed_tokens") || n.contains("shared_head.head")));
    let copies: Vec<String> = model.mtp_shared_copies().into_iter().map(|(n, _)| n).collect();
    assert_eq!(copies, ["model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight"]);
    assert_eq!(model.mtp[0].layer(), 3);
    assert_eq!(model.mtp[0].depth(), 1);

    let trainable: Vec<String> = model.trainable_params_mut().iter().map(|p| p.name.clone()).collect();
    let without_bias: Vec<String> =
        names.iter().filter(|n| !n.ends_with("e_score_correction_bias")).cloned().collect();
    assert_eq!(trainable, without_bias);
    assert_eq!(model.params_mut().len(), names.len());

    // The bias update reaches every MoE layer, main then MTP.
    let loads = vec![vec![5, 0, 0, 0, 0, 0, 0, 0]; 3];
    let before: Vec<Vec<f64>> =
        model.moe_layers().iter().map(|m| m.e_score_correction_bias.value.to_host_vec()).collect();
    model.update_bias(&loads, 0.01).unwrap();
    for (moe, b) in model.moe_layers().iter().zip(&before) {
        assert!((moe.e_score_correction_bias.value.host()[0] - (b[0] - 0.01)).abs() < 1e-15);
        assert!((moe.e_score_correction_bias.value.host()[1] - (b[1] + 0.01)).abs() < 1e-15);
    }
    assert!(model.update_bias(&loads[..2], 0.01).is_err());
}

#[test]
fn bad_windows_and_tokens_are_errors_naming_them() {
    let mut model = micro_model(false, 17);
    let good = windows(2, SEQ + 2, 11, 18);
    let msg = |e: ModelError| e.to_string();

    let mut bad = good.clone();
    bad[1][3] = 11;
    let e = msg(model.forward_backward(&bad, SEQ, &LOSS, 1).unwrap_err());
    assert!(e.contains("windows[1]") && e.contains("position 3") && e.contains("11"), "{e}");
    let e = msg(model.loss(&bad, SEQ, &LOSS, 1).unwrap_err());
    assert!(e.contains("windows[1]"), "{e}");

    let mut short = good.clone();
    short[0].pop();
    let e = msg(model.loss(&short, SEQ, &LOSS, 1).unwrap_err());
    assert!(e.contains("windows[0]") && e.contains("expected"), "{e}");
    // Windows without the MTP token are too short.
    let e = msg(model.loss(&windows(2, SEQ + 1, 11, 1), SEQ, &LOSS, 1).unwrap_err());
    assert!(e.contains("MTP depth 1"), "{e}");
    assert!(model.loss(&[], SEQ, &LOSS, 1).is_err());
    assert!(model.loss(&windows(1, 2, 11, 1), 0, &LOSS, 1).is_err());
    // Past max_position_embeddings (16): an error naming the attention.
    let e = msg(model.loss(&windows(1, 19, 11, 1), 17, &LOSS, 1).unwrap_err());
    assert!(e.contains("self_attn"), "{e}");
    // Nothing was accumulated by the failed calls.
    assert!(model.params().iter().all(|p| p.grad.host().iter().all(|&g| g == 0.0)));
}

#[test]
fn a_model_without_mtp_uses_windows_of_seq_plus_one() {
    let cfg = ModelConfig { num_nextn_predict_layers: 0, ..micro(false) };
    let mut model = Model::<f64>::new(&cfg, 1, true).unwrap();
    assert_eq!(model.window_len(SEQ), SEQ + 1);
    let w = windows(2, SEQ + 1, 11, 2);
    let stats = model.forward_backward(&w, SEQ, &LOSS, 1).unwrap();
    assert!(stats.mtp_ce.is_empty());
    assert_eq!(stats.moe_layers, vec![1, 2]);
    assert!(close(stats.loss, stats.main_ce + stats.balance_loss, 1e-15));
}

#[test]
fn step_stats_merge_weights_by_tokens() {
    let a = StepStats {
        loss: 1.0,
        main_ce: 2.0,
        mtp_ce: vec![3.0],
        balance_loss: 0.5,
        tokens: 10,
        moe_layers: vec![1],
        expert_loads: vec![vec![1, 2]],
    };
    let b =
        StepStats { loss: 4.0, main_ce: 5.0, mtp_ce: vec![6.0], balance_loss: 0.0, tokens: 30, ..a.clone() };
    let mut m = StepStats::default();
    m.merge(&a).unwrap();
    assert_eq!(m, a);
    m.merge(&b).unwrap();
    assert_eq!(m.tokens, 40);
    assert!((m.loss - 3.25).abs() < 1e-15 && (m.main_ce - 4.25).abs() < 1e-15);
    assert!((m.mtp_ce[0] - 5.25).abs() < 1e-15 && (m.balance_loss - 0.125).abs() < 1e-15);
    assert_eq!(m.expert_loads, vec![vec![2, 4]]);
    let other = StepStats { moe_layers: vec![2], ..a.clone() };
    assert!(m.merge(&other).is_err());
}
