//! Generation over MLA's compressed KV cache (`flotilla_model::generate`), checked in f64
//! against the full forward ([`Model::logits`]) that training uses: cached prefill and
//! decode give the same logits, greedy generation equals greedy over recomputed logits,
//! MTP speculative decoding is lossless, batching changes nothing, and bad requests are
//! refused naming the setting or prompt.

use flotilla_model::config::ModelConfig;
use flotilla_model::generate::{
    FinishReason, GenerateConfig, GenerateError, Sampling, generate, greedy, nucleus,
};
use flotilla_model::mla::MlaDims;
use flotilla_model::{Model, Preset};

/// vocab 24, hidden 16, 3 layers (1 dense), 2 heads, low-rank queries, 8 routed experts,
/// MTP depth 1; weights large enough that logits are O(1) apart.
fn micro(q_lora_rank: Option<usize>) -> ModelConfig {
    let cfg = ModelConfig {
        vocab_size: 24,
        hidden_size: 16,
        intermediate_size: 24,
        moe_intermediate_size: 8,
        num_hidden_layers: 3,
        num_attention_heads: 2,
        n_shared_experts: 1,
        n_routed_experts: 8,
        num_experts_per_tok: 2,
        n_group: 4,
        topk_group: 2,
        first_k_dense_replace: 1,
        q_lora_rank,
        kv_lora_rank: 6,
        qk_nope_head_dim: 4,
        qk_rope_head_dim: 2,
        v_head_dim: 3,
        max_position_embeddings: 48,
        rope_theta: 100.0,
        num_nextn_predict_layers: 1,
        initializer_range: 0.5,
        ..Preset::Tiny.config()
    };
    cfg.validate().unwrap();
    cfg
}

fn model(q_lora_rank: Option<usize>) -> Model<f64> {
    Model::<f64>::new(&micro(q_lora_rank), 7, false).unwrap()
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn cached_prefill_and_decode_give_the_full_forwards_logits() {
    for q_lora in [Some(6), None] {
        let model = model(q_lora);
        let seqs: [Vec<u32>; 2] = [vec![3, 1, 4, 1, 5, 9, 2, 6], vec![2, 7, 1, 8, 2]];
        // Sequence 0 in chunks of 3, 1, 4; sequence 1 in 2, 0, 3: both in one cache.
        let chunks: [[usize; 2]; 3] = [[3, 2], [1, 0], [4, 3]];
        let mut cache = model.kv_cache(2);
        let mut got: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut at = [0usize; 2];
        for counts in chunks {
            let tokens: Vec<u32> = (0..2).flat_map(|s| seqs[s][at[s]..at[s] + counts[s]].to_vec()).collect();
            let h = model.forward_cached(&tokens, &counts, &mut cache, 2).unwrap();
            let logits = model.head_logits(&h, false, 2).unwrap();
            let vocab = 24;
            got[0].extend_from_slice(&logits[..counts[0] * vocab]);
            got[1].extend_from_slice(&logits[counts[0] * vocab..]);
            at = [at[0] + counts[0], at[1] + counts[1]];
        }
        for s in 0..2 {
            let full = model.logits(&seqs[s], 1).unwrap();
            let err = max_rel(&got[s], &full);
            assert!(err < 1e-12, "q_lora {q_lora:?}, sequence {s}: relative error {err:e}");
            assert_eq!(cache.len(s), seqs[s].len());
        }
        let per_token = 3 * (6 + 2) * std::mem::size_of::<f64>();
        assert_eq!(model.kv_bytes_per_token(), per_token);
        assert_eq!(cache.main_bytes(), (8 + 5) * per_token);
    }
}

#[test]
fn the_cache_per_token_is_mlas_compressed_form() {
    // DeepSeek-V3: kv_lora_rank 512 + qk_rope_head_dim 64 per layer, not 128 heads × (192 + 128).
    let dims = MlaDims::from_config(&Preset::DeepseekV3_671b.config());
    assert_eq!(dims.cached_values_per_token(), 576);
}

/// Greedy decoding by recomputing the full forward each step.
fn recomputed_greedy(model: &Model<f64>, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut tokens = prompt.to_vec();
    for _ in 0..n {
        let logits = model.logits(&tokens, 1).unwrap();
        tokens.push(greedy(&logits[logits.len() - 24..]));
    }
    tokens[prompt.len()..].to_vec()
}

fn greedy_config(max_new_tokens: usize, speculative_mtp: bool) -> GenerateConfig {
    GenerateConfig { max_new_tokens, speculative_mtp, ..GenerateConfig::default() }
}

#[test]
fn greedy_generation_batched_or_alone_equals_recomputed_greedy() {
    let model = model(Some(6));
    let prompts = vec![vec![5u32, 11, 2], vec![19u32], vec![1u32, 2, 3, 4, 5, 6]];
    let (batched, stats) = generate(&model, &prompts, greedy_config(12, false), 2).unwrap();
    for (prompt, out) in prompts.iter().zip(&batched) {
        assert_eq!(out.tokens, recomputed_greedy(&model, prompt, 12), "prompt {prompt:?}");
        assert_eq!(out.finish, FinishReason::Length);
        let (alone, _) = generate(&model, std::slice::from_ref(prompt), greedy_config(12, false), 1).unwrap();
        assert_eq!(alone[0], *out);
    }
    assert_eq!((stats.prefill_tokens, stats.decode_steps, stats.generated), (10, 11, 36));
}

#[test]
fn mtp_speculative_decoding_is_lossless_and_counts_its_drafts() {
    let model = model(Some(6));
    let prompts = vec![vec![5u32, 11, 2], vec![19u32, 4]];
    let (plain, _) = generate(&model, &prompts, greedy_config(20, false), 2).unwrap();
    let (spec, stats) = generate(&model, &prompts, greedy_config(20, true), 2).unwrap();
    assert_eq!(spec, plain);
    // Both outcomes of verification happen on this model.
    assert!(stats.accepted > 0 && stats.accepted < stats.drafts, "{stats:?}");
    assert_eq!(stats.generated, 40);
    // Alone, a sequence needs 19 tokens after the prefill's: each step yields one, and one
    // more per accepted draft (the last step's extra one may be cut by the limit).
    let (_, alone) = generate(&model, &prompts[..1], greedy_config(20, true), 1).unwrap();
    assert!((19..=20).contains(&(alone.decode_steps + alone.accepted)), "{alone:?}");
    let rate = stats.acceptance_rate().unwrap();
    assert!((rate - stats.accepted as f64 / stats.drafts as f64).abs() < 1e-15);
}

#[test]
fn a_stop_token_ends_its_sequence_and_is_kept() {
    let model = model(Some(6));
    let prompts = vec![vec![5u32, 11, 2], vec![19u32]];
    let (free, _) = generate(&model, &prompts, greedy_config(10, false), 1).unwrap();
    let stop = free[0].tokens[3];
    let first = free[0].tokens.iter().position(|&t| t == stop).unwrap();
    let config = GenerateConfig { stop_tokens: vec![stop], ..greedy_config(10, false) };
    let (stopped, _) = generate(&model, &prompts, config, 1).unwrap();
    assert_eq!(stopped[0].tokens, free[0].tokens[..=first].to_vec());
    assert_eq!(stopped[0].finish, FinishReason::Stop);
    let other = free[1].tokens.iter().position(|&t| t == stop).map_or(10, |i| i + 1);
    assert_eq!(stopped[1].tokens, free[1].tokens[..other].to_vec());
}

#[test]
fn sampling_is_seeded_per_sequence_and_the_nucleus_cuts_by_mass() {
    let model = model(Some(6));
    let prompts = vec![vec![5u32, 11, 2], vec![19u32]];
    let sampled = |seed: u64, top_p: f64| {
        let sampling = Sampling { temperature: 1.5, top_p, seed };
        generate(&model, &prompts, GenerateConfig { sampling, ..greedy_config(16, false) }, 1).unwrap().0
    };
    assert_eq!(sampled(3, 0.9), sampled(3, 0.9));
    assert_ne!(sampled(3, 0.9), sampled(4, 0.9));
    // A nucleus of mass 1e-9 is the single most likely token: greedy.
    let (greedy_out, _) = generate(&model, &prompts, greedy_config(16, false), 1).unwrap();
    assert_eq!(sampled(3, 1e-9), greedy_out);

    let ln = |p: f64| p.ln();
    let logits = [ln(1.0), ln(4.0), ln(2.0), ln(4.0)];
    let ids = |top_p: f64| nucleus(&logits, 1.0, top_p).iter().map(|&(t, _)| t).collect::<Vec<_>>();
    assert_eq!(ids(0.3), vec![1]); // 4/11 ≥ 0.3; of the two 4s the lower id first
    assert_eq!(ids(0.5), vec![1, 3]);
    assert_eq!(ids(0.8), vec![1, 3, 2]);
    assert_eq!(ids(1.0), vec![1, 3, 2, 0]);
    let p = nucleus(&logits, 1.0, 1.0);
    assert!((p[0].1 - 4.0 / 11.0).abs() < 1e-15 && (p[3].1 - 1.0 / 11.0).abs() < 1e-15);
}

#[test]
fn bad_requests_name_the_setting_or_prompt() {
    let model = model(Some(6));
    let field_of =
        |prompts: Vec<Vec<u32>>, config: GenerateConfig| match generate(&model, &prompts, config, 1) {
            Err(GenerateError::Invalid { field, .. }) => field,
            other => panic!("expected a refusal, got {other:?}"),
        };
    let ok = || vec![vec![1u32, 2]];
    let base = || greedy_config(4, false);
    assert_eq!(field_of(vec![vec![1], vec![]], base()), "prompts[1]");
    assert_eq!(field_of(vec![vec![1, 24]], base()), "prompts[0]");
    assert_eq!(field_of(vec![vec![1; 45]], base()), "prompts[0]"); // 45 + 4 > 48 positions
    assert_eq!(field_of(vec![], base()), "prompts");
    assert_eq!(field_of(ok(), greedy_config(0, false)), "max_new_tokens");
    let with = |temperature: f64, top_p: f64, speculative_mtp: bool| GenerateConfig {
        sampling: Sampling { temperature, top_p, seed: 0 },
        speculative_mtp,
        ..base()
    };
    assert_eq!(field_of(ok(), with(-1.0, 1.0, false)), "temperature");
    assert_eq!(field_of(ok(), with(f64::NAN, 1.0, false)), "temperature");
    assert_eq!(field_of(ok(), with(1.0, 0.0, false)), "top_p");
    assert_eq!(field_of(ok(), with(1.0, 1.5, false)), "top_p");
    assert_eq!(field_of(ok(), with(1.0, 1.0, true)), "speculative");
    assert_eq!(field_of(ok(), GenerateConfig { stop_tokens: vec![99], ..base() }), "stop_tokens");
    let no_mtp =
        Model::<f64>::new(&ModelConfig { num_nextn_predict_layers: 0, ..micro(Some(6)) }, 7, false).unwrap();
    match generate(&no_mtp, &ok(), greedy_config(4, true), 1) {
        Err(GenerateError::Invalid { field, .. }) => assert_eq!(field, "speculative"),
        other => panic!("{other:?}"),
    }
}
