//! Greedy generation against transformers' `generate`: `tests/fixtures/hf_generate/greedy.json`,
//! written by `tools/hf_generate_fixture.py` (transformers 5.24.0, torch 2.15.0, float64;
//! not run by CI), holds `DeepseekV3ForCausalLM.generate(do_sample=False)`'s new tokens
//! for three prompts on the committed checkpoint `hf_checkpoints/sharded_bf16` (8 bf16
//! shards, no MTP tensors), stopping at the config's `eos_token_id` (kept) or after
//! `max_new_tokens`. flotilla, loading the same files into its f32 model, must give the
//! same tokens, one batch of all prompts and each prompt alone.
//!
//! Ties: flotilla computes in f32, the fixture in f64; its logits are within `1e-5 ·
//! max |logit|` (≈ 4e-5 here) of transformers' (`hf_checkpoints.rs`), so a step whose
//! top-2 logit gap is under [`TIE_TOL`] could flip either way and would make the
//! comparison meaningless from there on. The fixture script keeps only prompts whose
//! every step (and every routing decision) clears its minimum; this test checks that each
//! recorded margin clears `TIE_TOL` and fails, naming the step, if a regenerated fixture
//! ever has one that does not, rather than comparing past it.

use flotilla_model::Model;
use flotilla_model::checkpoint::{HfReader, MtpPolicy, fill_from_reader};
use flotilla_model::generate::{FinishReason, GenerateConfig, generate};
use std::path::{Path, PathBuf};

/// The smallest top-2 logit gap at which f32 and f64 are sure to agree (see the module doc).
const TIE_TOL: f64 = 5e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Case {
    input_ids: Vec<u32>,
    generated: Vec<u32>,
}

struct Fixture {
    checkpoint: PathBuf,
    max_new_tokens: usize,
    eos: u32,
    cases: Vec<Case>,
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| u32::try_from(x.as_u64().unwrap()).unwrap()).collect()
}

fn fixture() -> Fixture {
    let text = std::fs::read_to_string(fixtures().join("hf_generate/greedy.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut cases = Vec::new();
    for (p, prompt) in json["prompts"].as_array().unwrap().iter().enumerate() {
        let generated = ids(&prompt["generated"]);
        let margins: Vec<f64> =
            prompt["margins"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect();
        assert_eq!(margins.len(), generated.len(), "prompt {p}: a margin per generated token");
        for (step, &m) in margins.iter().enumerate() {
            assert!(
                m >= TIE_TOL,
                "prompt {p} step {step}: transformers' top-2 logit gap {m:e} is under {TIE_TOL:e}, a near tie \
                 that f32 rounding may flip; regenerate the fixture with prompts clear of ties"
            );
        }
        cases.push(Case { input_ids: ids(&prompt["input_ids"]), generated });
    }
    Fixture {
        checkpoint: fixtures().join(json["checkpoint"].as_str().unwrap()),
        max_new_tokens: json["max_new_tokens"].as_u64().unwrap() as usize,
        eos: json["eos_token_id"].as_u64().unwrap() as u32,
        cases,
    }
}

/// The checkpoint as `flotilla generate` loads one without MTP tensors: the main model only.
fn model(dir: &Path) -> Model<f32> {
    let reader = HfReader::open(dir).unwrap();
    let config = flotilla_model::ModelConfig { num_nextn_predict_layers: 0, ..reader.config().clone() };
    let mut model = Model::<f32>::new(&config, 0, false).unwrap();
    let report = fill_from_reader(&reader, &mut model.params_mut(), MtpPolicy::Require).unwrap();
    assert!(report.seeded.is_empty());
    model
}

#[test]
fn greedy_generation_equals_transformers_token_for_token() {
    let fx = fixture();
    assert_eq!(fx.cases.len(), 3);
    // The fixture exercises both ends: a prompt that runs to the length limit and one that
    // stops at eos.
    assert!(
        fx.cases.iter().any(|c| c.generated.len() == fx.max_new_tokens && !c.generated.contains(&fx.eos))
    );
    assert!(fx.cases.iter().any(|c| c.generated.last() == Some(&fx.eos)));
    let model = model(&fx.checkpoint);
    let config =
        GenerateConfig { max_new_tokens: fx.max_new_tokens, stop_tokens: vec![fx.eos], ..Default::default() };
    let prompts: Vec<Vec<u32>> = fx.cases.iter().map(|c| c.input_ids.clone()).collect();

    let (batched, stats) = generate(&model, &prompts, config.clone(), 2).unwrap();
    for (p, (case, out)) in fx.cases.iter().zip(&batched).enumerate() {
        assert_eq!(out.tokens, case.generated, "prompt {p} {:?}, in a batch of 3", case.input_ids);
        let stopped = case.generated.last() == Some(&fx.eos);
        assert_eq!(out.finish, if stopped { FinishReason::Stop } else { FinishReason::Length }, "prompt {p}");
    }
    assert_eq!(stats.generated, fx.cases.iter().map(|c| c.generated.len()).sum::<usize>());
    for (p, case) in fx.cases.iter().enumerate() {
        let (alone, _) = generate(&model, std::slice::from_ref(&case.input_ids), config.clone(), 1).unwrap();
        assert_eq!(alone[0].tokens, case.generated, "prompt {p} alone");
    }
}
