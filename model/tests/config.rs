//! Model configuration: presets, HF and TOML loading, validation errors, and parameter
//! accounting of the released DeepSeek-V3 configuration.

use flotilla_model::{ConfigError, ModelConfig, ParameterCounts, Preset};

/// DeepSeek-V3's released `config.json` (the fields that matter, plus the generic keys an
/// HF config carries), as published with the weights.
const DEEPSEEK_V3_CONFIG_JSON: &str = r#"{
  "architectures": ["DeepseekV3ForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
  "bos_token_id": 0,
  "eos_token_id": 1,
  "ep_size": 1,
  "first_k_dense_replace": 3,
  "hidden_act": "silu",
  "hidden_size": 7168,
  "initializer_range": 0.02,
  "intermediate_size": 18432,
  "kv_lora_rank": 512,
  "max_position_embeddings": 163840,
  "model_type": "deepseek_v3",
  "moe_intermediate_size": 2048,
  "moe_layer_freq": 1,
  "n_group": 8,
  "n_routed_experts": 256,
  "n_shared_experts": 1,
  "norm_topk_prob": true,
  "num_attention_heads": 128,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 61,
  "num_key_value_heads": 128,
  "num_nextn_predict_layers": 1,
  "q_lora_rank": 1536,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
  "rms_norm_eps": 1e-06,
  "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                   "original_max_position_embeddings": 4096, "type": "yarn"},
  "rope_theta": 10000,
  "routed_scaling_factor": 2.5,
  "scoring_func": "sigmoid",
  "tie_word_embeddings": false,
  "topk_group": 4,
  "topk_method": "noaux_tc",
  "torch_dtype": "bfloat16",
  "transformers_version": "4.46.3",
  "use_cache": true,
  "v_head_dim": 128,
  "vocab_size": 129280
}"#;

fn within(actual: u64, expected: f64, tolerance: f64) -> bool {
    ((actual as f64 - expected) / expected).abs() <= tolerance
}

#[test]
fn the_released_config_json_loads_as_the_preset() {
    let loaded = ModelConfig::from_hf_json(DEEPSEEK_V3_CONFIG_JSON).unwrap();
    assert_eq!(loaded.config, Preset::DeepseekV3_671b.config());
    let expected_ignored = [
        "architectures",
        "attention_dropout",
        "auto_map",
        "ep_size",
        "model_type",
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
        ModelConfig::from_hf_json(&DEEPSEEK_V3_CONFIG_JSON.replace("\"deepseek_v3\"", "\"llama\"")),
        Err(ConfigError::InvalidField { field: "model_type", .. })
    ));
    match ModelConfig::from_hf_json(&DEEPSEEK_V3_CONFIG_JSON.replace("\"noaux_tc\"", "\"greedy\"")) {
        Err(ConfigError::InvalidField { field: "topk_method", detail }) => {
            assert!(detail.contains("greedy"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
    match ModelConfig::from_hf_json(
        &DEEPSEEK_V3_CONFIG_JSON.replace("\"topk_group\": 4", "\"topk_group\": 9"),
    ) {
        Err(ConfigError::InvalidField { field: "topk_group", .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(ModelConfig::from_hf_json("[1, 2]"), Err(ConfigError::Parse { .. })));
    assert!(matches!(ModelConfig::from_hf_json("{\"vocab_size\": 3"), Err(ConfigError::Parse { .. })));
}

#[test]
fn transformers_5_rope_parameters_are_read() {
    let legacy = ModelConfig::from_hf_json(DEEPSEEK_V3_CONFIG_JSON).unwrap().config;
    let v5 = DEEPSEEK_V3_CONFIG_JSON.replace("\"rope_theta\": 10000,", "").replace(
        "\"rope_scaling\": {\"beta_fast\": 32, \"beta_slow\": 1, \"factor\": 40, \"mscale\": 1.0, \"mscale_all_dim\": 1.0,\n                   \"original_max_position_embeddings\": 4096, \"type\": \"yarn\"},",
        "\"rope_parameters\": {\"rope_type\": \"yarn\", \"rope_theta\": 10000, \"beta_fast\": 32, \"beta_slow\": 1, \"factor\": 40, \"mscale\": 1.0, \"mscale_all_dim\": 1.0, \"original_max_position_embeddings\": 4096},\n  \"rope_interleave\": true,",
    );
    assert!(v5.contains("rope_parameters") && !v5.contains("rope_scaling"), "the replacement applied");
    assert_eq!(ModelConfig::from_hf_json(&v5).unwrap().config, legacy);
    let plain = v5.replace("\"rope_type\": \"yarn\"", "\"rope_type\": \"default\"");
    assert_eq!(ModelConfig::from_hf_json(&plain).unwrap().config.rope_scaling, None);
    match ModelConfig::from_hf_json(&v5.replace("\"rope_interleave\": true", "\"rope_interleave\": false")) {
        Err(ConfigError::InvalidField { field: "rope_interleave", .. }) => {}
        other => panic!("{other:?}"),
    }
}
