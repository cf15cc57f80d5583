//! Model configuration: presets, HF and TOML loading, validation errors, and parameter
//! accounting of the released DeepSeek-V3 configuration.

use flotilla_model::{ConfigError, ModelConfig, ParameterCounts, Preset};

/// DeepSeek-V3's released `config.json`, as published with the weights (the fixture that
/// tests/hf_configs.rs also reads).
fn released_config() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hf_configs/released.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The released config with `edit` applied, as JSON text.
fn released_with(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let mut config = released_config();
    edit(config.as_object_mut().unwrap());
    config.to_string()
}

fn within(actual: u64, expected: f64, tolerance: f64) -> bool {
    ((actual as f64 - expected) / expected).abs() <= tolerance
}

#[test]
fn the_released_config_json_loads_as_the_preset() {
    let loaded = ModelConfig::from_hf_json(&released_config().to_string()).unwrap();
    assert_eq!(loaded.config, Preset::DeepseekV3_671b.config());
    let expected_ignored = [
        "architectures",
        "attention_dropout",
        "auto_map",
        "aux_loss_alpha",
        "ep_size",
        "model_type",
        "pretraining_tp",
        "seq_aux",
        "torch_dtype",
        "transformers_version",
        "use_cache",
    ];
    assert_eq!(loaded.ignored_keys, expected_ignored);
    assert_eq!(loaded.quantization.map(|q| q.weight_block_size), Some([128, 128]));
}

#[test]
fn hf_json_round_trips() {
    for preset in [Preset::DeepseekV3_671b, Preset::Tiny, Preset::Small] {
        let json = preset.config().to_hf_json();
        let back = ModelConfig::from_hf_json(&json).unwrap();
        assert_eq!(back.config, preset.config(), "{preset}");
        assert_eq!(back.ignored_keys, ["architectures", "model_type"]);
    }
}

#[test]
fn deepseek_v3_has_671b_parameters_and_37b_activated() {
    let counts = ParameterCounts::of(&Preset::DeepseekV3_671b.config());
    // Per-component counts derived by hand from the checkpoint's tensor shapes:
    // MLA projections per layer 7168·1536 + 1536·128·192 + 7168·576 + 512·128·256 +
    // 128·128·7168 = 187,105,280, times 61 layers; one expert 3·7168·2048 = 44,040,192.
    assert_eq!(counts.main.embedding, 129_280 * 7168);
    assert_eq!(counts.main.attention, 187_105_280 * 61);
    // MLA with its two latent norms and the block's two norms, over 61 layers.
    assert_eq!(counts.main.attention + counts.main.norms - 7168, 11_414_421_504);
    assert_eq!(counts.main.dense_ffn, 3 * 3 * 7168 * 18_432);
    assert_eq!(counts.main.routed_experts, 58 * 256 * 44_040_192);
    assert_eq!(counts.main.shared_experts, 58 * 44_040_192);
    assert_eq!(counts.main.gates, 58 * (256 * 7168 + 256));
    assert_eq!(counts.main.norms, 61 * (2 * 7168 + 1536 + 512) + 7168);
    assert_eq!(counts.main.head, 129_280 * 7168);
    assert_eq!(counts.main.total(), 671_026_419_200);
    assert!(within(counts.main.total(), 671e9, 0.005));

    // With the MTP module: ~11.6B of its own, and 685B as the checkpoint stores it.
    assert!(within(counts.mtp.total(), 11.6e9, 0.005), "{}", counts.mtp.total());
    assert!(within(counts.total_as_stored(), 685e9, 0.005), "{}", counts.total_as_stored());

    // Activated per token: 37.55B counting the embedding whole, 36.63B counting the row a
    // token reads; the report's "37B" lies between.
    let full = counts.activated_full_embedding.total();
    let read = counts.activated.total();
    assert_eq!(full - read, 129_280 * 7168 - 7168);
    assert!(within(full, 37.55e9, 0.002), "{full}");
    assert!(within(read, 36.63e9, 0.002), "{read}");
    assert!(read < 37_000_000_000 && 37_000_000_000 < full);
    // The activated count is the total minus the routed experts a token does not use.
    assert_eq!(counts.main.total() - full, 58 * (256 - 8) * 44_040_192);
}

#[test]
fn tiny_preset_fits_the_issue_and_counts_consistently() {
    let c = Preset::Tiny.config();
    c.validate().unwrap();
    assert!((128..=256).contains(&c.hidden_size));
    assert!((4..=6).contains(&c.num_hidden_layers) && c.first_k_dense_replace == 1);
    assert!(
        (8..=16).contains(&c.n_routed_experts) && [2, 4].contains(&c.num_experts_per_tok) && c.n_group == 4
    );
    assert_eq!((c.num_nextn_predict_layers, c.vocab_size), (1, 256));
    let counts = ParameterCounts::of(&c);
    // Tied embeddings drop the head and make a token read the whole matrix.
    let tied = ParameterCounts::of(&ModelConfig { tie_word_embeddings: true, ..c.clone() });
    assert_eq!(counts.main.total() - tied.main.total(), 256 * 128);
    assert_eq!(tied.activated.head, 256 * 128);
    // A plain query projection instead of the compressed one.
    let plain_q = ParameterCounts::of(&ModelConfig { q_lora_rank: None, ..c.clone() });
    let layers = c.num_hidden_layers as u64 + 1; // MTP block included below
    assert_eq!(
        plain_q.main.attention + plain_q.mtp.attention,
        counts.main.attention + counts.mtp.attention - layers * (128 * 64 + 64 * 4 * 48)
            + layers * 128 * 4 * 48
    );
}

#[test]
fn toml_applies_overrides_on_a_preset_and_is_strict() {
    let c = ModelConfig::from_toml("preset = \"tiny\"\nhidden_size = 192\nnum_hidden_layers = 5\n").unwrap();
    assert_eq!(c, ModelConfig { hidden_size: 192, num_hidden_layers: 5, ..Preset::Tiny.config() });
    let full = toml::to_string(&Preset::DeepseekV3_671b.config()).unwrap();
    assert_eq!(ModelConfig::from_toml(&full).unwrap(), Preset::DeepseekV3_671b.config());
    match ModelConfig::from_toml("preset = \"tiny\"\nhiden_size = 3\n") {
        Err(ConfigError::Parse { detail, .. }) => assert!(detail.contains("hiden_size"), "{detail}"),
        other => panic!("expected a parse error naming the key, got {other:?}"),
    }
    assert!(matches!(ModelConfig::from_toml("preset = \"huge\""), Err(ConfigError::UnknownPreset(_))));
    assert!(matches!(
        ModelConfig::from_toml("preset = 3"),
        Err(ConfigError::InvalidField { field: "preset", .. })
    ));
}

fn invalid_field(config: ModelConfig) -> &'static str {
    match config.validate() {
        Err(ConfigError::InvalidField { field, .. }) => field,
        other => panic!("expected InvalidField, got {other:?}"),
    }
}

#[test]
fn inconsistent_configs_name_the_field() {
    let tiny = Preset::Tiny.config();
    let cases: Vec<(ModelConfig, &str)> = vec![
        (ModelConfig { topk_group: 5, ..tiny.clone() }, "topk_group"),
        (ModelConfig { topk_group: 0, ..tiny.clone() }, "topk_group"),
        (ModelConfig { n_routed_experts: 15, ..tiny.clone() }, "n_routed_experts"),
        (ModelConfig { n_routed_experts: 4, num_experts_per_tok: 2, ..tiny.clone() }, "n_group"),
        (ModelConfig { num_experts_per_tok: 9, ..tiny.clone() }, "num_experts_per_tok"),
        (ModelConfig { num_experts_per_tok: 0, ..tiny.clone() }, "num_experts_per_tok"),
        (ModelConfig { num_key_value_heads: Some(2), ..tiny.clone() }, "num_key_value_heads"),
        (ModelConfig { qk_rope_head_dim: 15, ..tiny.clone() }, "qk_rope_head_dim"),
        (ModelConfig { hidden_size: 0, ..tiny.clone() }, "hidden_size"),
        (ModelConfig { q_lora_rank: Some(0), ..tiny.clone() }, "q_lora_rank"),
        (ModelConfig { first_k_dense_replace: 9, ..tiny.clone() }, "first_k_dense_replace"),
        (ModelConfig { rms_norm_eps: 0.0, ..tiny.clone() }, "rms_norm_eps"),
        (ModelConfig { routed_scaling_factor: f64::NAN, ..tiny.clone() }, "routed_scaling_factor"),
        (ModelConfig { attention_bias: true, ..tiny.clone() }, "attention_bias"),
        (ModelConfig { eos_token_id: Some(256), ..tiny.clone() }, "eos_token_id"),
        (ModelConfig { n_routed_experts: 0, ..tiny.clone() }, "n_routed_experts"),
        (
            ModelConfig {
                rope_scaling: Preset::DeepseekV3_671b.config().rope_scaling.map(|mut s| {
                    s.beta_fast = 0.5;
                    s
                }),
                ..tiny.clone()
            },
            "rope_scaling",
        ),
    ];
    for (config, field) in cases {
        assert_eq!(invalid_field(config), field);
    }
    // The 671B configuration's own relation holds: 8 experts within 4 of 8 groups of 32.
    Preset::DeepseekV3_671b.config().validate().unwrap();
}

#[test]
fn hf_json_errors_are_clear() {
    assert!(matches!(
        ModelConfig::from_hf_json(&released_with(|c| {
            c.insert("model_type".into(), "llama".into());
        })),
        Err(ConfigError::InvalidField { field: "model_type", .. })
    ));
    match ModelConfig::from_hf_json(&released_with(|c| {
        c.insert("topk_method".into(), "greedy".into());
    })) {
        Err(ConfigError::InvalidField { field: "topk_method", detail }) => {
            assert!(detail.contains("greedy"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
    match ModelConfig::from_hf_json(&released_with(|c| {
        c.insert("topk_group".into(), 9.into());
    })) {
        Err(ConfigError::InvalidField { field: "topk_group", .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(ModelConfig::from_hf_json("[1, 2]"), Err(ConfigError::Parse { .. })));
    assert!(matches!(ModelConfig::from_hf_json("{\"vocab_size\": 3"), Err(ConfigError::Parse { .. })));
}

#[test]
fn transformers_5_rope_parameters_are_read() {
    let legacy = ModelConfig::from_hf_json(&released_config().to_string()).unwrap().config;
    // transformers 5 moves rope_theta and rope_scaling into rope_parameters and adds
    // rope_interleave.
    let to_v5 = |c: &mut serde_json::Map<String, serde_json::Value>| {
        let theta = c.remove("rope_theta").unwrap();
        let mut rope = c.remove("rope_scaling").unwrap().as_object().unwrap().clone();
        rope.remove("type");
        rope.insert("rope_type".into(), "yarn".into());
        rope.insert("rope_theta".into(), theta);
        c.insert("rope_parameters".into(), rope.into());
        c.insert("rope_interleave".into(), true.into());
    };
    assert_eq!(ModelConfig::from_hf_json(&released_with(to_v5)).unwrap().config, legacy);
    let plain = released_with(|c| {
        to_v5(c);
        c["rope_parameters"]["rope_type"] = "default".into();
    });
    assert_eq!(ModelConfig::from_hf_json(&plain).unwrap().config.rope_scaling, None);
    let not_interleaved = released_with(|c| {
        to_v5(c);
        c["rope_interleave"] = false.into();
    });
    match ModelConfig::from_hf_json(&not_interleaved) {
        Err(ConfigError::InvalidField { field: "rope_interleave", .. }) => {}
        other => panic!("{other:?}"),
    }
}
