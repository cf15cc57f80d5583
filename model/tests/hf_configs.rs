//! `config.json` files as the ecosystem writes them (fixtures made by
//! `tools/hf_config_fixtures.py` with transformers 4.57 and 5.24, and DeepSeek's released
//! config): every form of the DeepSeek-V3 architecture loads to the same configuration,
//! a value flotilla cannot honour is an error naming its key and value, and what flotilla
//! writes is the file transformers 4 and 5 were checked to load.

use flotilla_model::{ConfigError, ModelConfig, Preset};
use std::path::PathBuf;

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_configs").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load(name: &str) -> Result<flotilla_model::HfConfig, ConfigError> {
    ModelConfig::from_hf_json(&fixture(name))
}

fn invalid_field(name: &str) -> (&'static str, String) {
    match load(name) {
        Err(ConfigError::InvalidField { field, detail }) => (field, detail),
        other => panic!("{name}: expected an invalid field, got {other:?}"),
    }
}

#[test]
fn the_released_config_loads_as_the_preset_in_every_form() {
    // As published (`type: yarn`), through transformers 4 (`type` and `rope_type` in
    // `rope_scaling`) and transformers 5 (both in `rope_parameters`, with `rope_theta`).
    for name in ["released.json", "released.t4.json", "released.t5.json"] {
        let loaded = load(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(loaded.config, Preset::DeepseekV3_671b.config(), "{name}");
        assert_eq!(loaded.quantization.map(|q| q.weight_block_size), Some([128, 128]), "{name}");
        assert!(
            !loaded.ignored_keys.iter().any(|k| k.starts_with("rope")),
            "{name}: {:?}",
            loaded.ignored_keys
        );
    }
}

#[test]
fn a_small_v3_saved_by_transformers_4_and_5_loads_the_same() {
    let t4 = load("tiny_v3.t4.json").unwrap().config;
    let t5 = load("tiny_v3.t5.json").unwrap().config;
    // transformers 4.57 omits `num_nextn_predict_layers` (not a field of its config);
    // transformers 5 writes 1, its default.
    assert_eq!(t4.num_nextn_predict_layers, 0);
    assert_eq!(t5.num_nextn_predict_layers, 1);
    assert_eq!(ModelConfig { num_nextn_predict_layers: 1, ..t4 }, t5);
    assert_eq!(
        (t5.hidden_size, t5.num_hidden_layers, t5.n_routed_experts, t5.n_group, t5.topk_group),
        (64, 3, 8, 2, 1)
    );
    assert_eq!((t5.q_lora_rank, t5.rope_theta, t5.rope_scaling.clone()), (Some(32), 10_000.0, None));
}

#[test]
fn deepseek_v2_with_v3s_gate_and_no_query_compression_loads() {
    for name in ["v2_sigmoid.t4.json", "v2_sigmoid.t5.json"] {
        let config = load(name).unwrap_or_else(|e| panic!("{name}: {e}")).config;
        assert_eq!(config.q_lora_rank, None, "{name}");
        assert_eq!((config.n_group, config.topk_group, config.moe_layer_freq), (2, 1, 1), "{name}");
    }
}

#[test]
fn deepseek_v2_lite_is_refused_naming_its_softmax_gate() {
    for name in ["v2_lite.t4.json", "v2_lite.t5.json"] {
        let (field, detail) = invalid_field(name);
        assert_eq!(field, "scoring_func", "{name}");
        assert!(detail.contains("\"softmax\"") && detail.contains("deepseek_v2"), "{name}: {detail}");
    }
}

/// The released config with one key changed (a JSON pointer-ish path into it).
fn released_with(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let mut value: serde_json::Value = serde_json::from_str(&fixture("released.t5.json")).unwrap();
    edit(value.as_object_mut().unwrap());
    value.to_string()
}

#[test]
fn values_flotilla_cannot_honour_name_the_key_and_value() {
    use serde_json::json;
    let cases: Vec<(String, &str, &str)> = vec![
        (
            released_with(|m| drop(m.insert("scoring_func".into(), json!("softmax")))),
            "scoring_func",
            "\"softmax\"",
        ),
        (
            released_with(|m| drop(m.insert("topk_method".into(), json!("greedy")))),
            "topk_method",
            "\"greedy\"",
        ),
        (released_with(|m| drop(m.insert("hidden_act".into(), json!("gelu")))), "hidden_act", "\"gelu\""),
        (released_with(|m| drop(m.insert("model_type".into(), json!("llama")))), "model_type", "\"llama\""),
        (
            released_with(|m| {
                m["rope_parameters"]["rope_type"] = json!("linear");
                m["rope_parameters"]["type"] = json!("linear");
            }),
            "rope_parameters",
            "\"linear\"",
        ),
        (released_with(|m| m["rope_parameters"]["type"] = json!("dynamic")), "rope_parameters", "disagree"),
        (
            released_with(|m| m["quantization_config"]["weight_block_size"] = json!([64, 64])),
            "quantization_config",
            "[64,64]",
        ),
        (
            released_with(|m| m["quantization_config"]["fmt"] = json!("e5m2")),
            "quantization_config",
            "\"e5m2\"",
        ),
        (
            released_with(|m| drop(m.insert("rope_interleave".into(), json!(false)))),
            "rope_interleave",
            "false",
        ),
    ];
    for (text, expected_field, expected_value) in cases {
        match ModelConfig::from_hf_json(&text) {
            Err(ConfigError::InvalidField { field, detail }) => {
                assert_eq!(field, expected_field, "{detail}");
                assert!(detail.contains(expected_value), "{field}: {detail} should name {expected_value}");
            }
            other => panic!("expected `{expected_field}` refused, got {other:?}"),
        }
    }
}

#[test]
fn unknown_keys_are_ignored_and_listed() {
    let text = released_with(|m| drop(m.insert("some_future_key".into(), serde_json::json!({"a": 1}))));
    let loaded = ModelConfig::from_hf_json(&text).unwrap();
    assert_eq!(loaded.config, Preset::DeepseekV3_671b.config());
    assert!(loaded.ignored_keys.contains(&"some_future_key".to_string()));
}

/// `flotilla_written.json` is exactly what flotilla writes for `tiny`, and
/// `tools/hf_config_fixtures.py` loaded that file with transformers 4 and 5 and recorded
/// what they read: the same shape.
#[test]
fn what_flotilla_writes_is_what_transformers_4_and_5_loaded() {
    let tiny = Preset::Tiny.config();
    assert_eq!(
        tiny.to_hf_json(),
        fixture("flotilla_written.json").trim_end(),
        "flotilla's config.json changed: re-run tools/hf_config_fixtures.py under both transformers"
    );
    for check in ["flotilla_written.check.t4.json", "flotilla_written.check.t5.json"] {
        let loaded: serde_json::Value = serde_json::from_str(&fixture(check)).unwrap();
        assert_eq!(loaded["loaded"], "DeepseekV3Config", "{check}");
        assert_eq!(loaded["hidden_size"], tiny.hidden_size, "{check}");
        assert_eq!(loaded["num_hidden_layers"], tiny.num_hidden_layers, "{check}");
        assert_eq!(loaded["n_routed_experts"], tiny.n_routed_experts, "{check}");
        assert_eq!(loaded["q_lora_rank"], tiny.q_lora_rank.unwrap(), "{check}");
        assert_eq!(loaded["rope_theta"], tiny.rope_theta, "{check}");
        // 4.57 keeps it as an extra attribute, 5 as a field.
        assert_eq!(loaded["num_nextn_predict_layers"], tiny.num_nextn_predict_layers, "{check}");
    }
    // Both keep `num_nextn_predict_layers` (4.57 as an extra attribute).
    let t5: serde_json::Value = serde_json::from_str(&fixture("flotilla_written.check.t5.json")).unwrap();
    assert_eq!(t5["num_nextn_predict_layers"], tiny.num_nextn_predict_layers);
}
