//! The model's shape: [`ModelConfig`], with the field names of Hugging Face's
//! `DeepseekV3Config`, loadable from an HF `config.json` and from flotilla's TOML, and
//! checked for consistency before anything is built from it.
//!
//! Sources of a config:
//! - a preset ([`Preset`]): the real `deepseek-v3-671b`, and `tiny` / `small`, which train
//!   on a CPU;
//! - an HF `config.json` ([`ModelConfig::from_hf_json`]) as transformers 4.x and 5.x and
//!   DeepSeek's released checkpoint write it, for `model_type` `deepseek_v3` and
//!   `deepseek_v2` (the same architecture when its gate is DeepSeek-V3's: sigmoid scores,
//!   `noaux_tc`): RoPE in `rope_scaling` or `rope_parameters`, spelled with `type`,
//!   `rope_type` or both; `null` for "the default" in `n_group`, `topk_group`,
//!   `moe_layer_freq`, `num_nextn_predict_layers`; the FP8 `quantization_config`. Keys
//!   flotilla does not model (`architectures`, `torch_dtype`, …) are returned to the
//!   caller as ignored, not rejected, since HF configs carry many generic ones; a key it
//!   models with a value it cannot honour (a softmax gate, another RoPE scaling, another
//!   FP8 block size) is an error naming the key and the value;
//! - flotilla's TOML ([`ModelConfig::from_toml`]): strict (an unknown key is an error);
//!   an optional `preset = "…"` key names the base the other keys override.
//!
//! Invariant: a `ModelConfig` returned by any loader has passed [`ModelConfig::validate`].

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What is wrong with a configuration.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ConfigError {
    /// A field's value is out of range or inconsistent with another field.
    #[error("invalid model config field `{field}`: {detail}")]
    InvalidField {
        /// The field, by its HF name.
        field: &'static str,
        /// What is allowed, with the values seen.
        detail: String,
    },
    /// The text does not parse, or has unknown or mistyped keys.
    #[error("cannot parse model config ({format}): {detail}")]
    Parse {
        /// "config.json" or "TOML".
        format: &'static str,
        /// The parser's message (it names the key and position).
        detail: String,
    },
    /// A preset name that does not exist.
    #[error("unknown model preset `{0}` (known: {known})", known = Preset::NAMES.join(", "))]
    UnknownPreset(String),
}

/// How expert affinities are computed. DeepSeek-V3 uses sigmoid; V2's softmax is not
/// modelled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoringFunc {
    /// `s = sigmoid(u·e)`.
    #[default]
    Sigmoid,
}

/// How experts are selected. `noaux_tc`: group-limited top-k on bias-corrected scores,
/// the bias being auxiliary-loss-free balancing's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopkMethod {
    /// DeepSeek-V3's method.
    #[default]
    NoauxTc,
}

/// The FFN activation. SwiGLU's gate uses SiLU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HiddenAct {
    /// `x·sigmoid(x)`.
    #[default]
    Silu,
}

/// YaRN context extension of RoPE, as HF's `rope_scaling` dict spells it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeScaling {
    /// Must be "yarn" (HF writes it as `type` or `rope_type`).
    #[serde(alias = "type")]
    pub rope_type: String,
    /// Context extension factor (DeepSeek-V3: 40).
    pub factor: f64,
    /// The context length the model was pre-trained with (4096).
    pub original_max_position_embeddings: usize,
    /// YaRN's β_fast (32).
    #[serde(default = "defaults::beta_fast")]
    pub beta_fast: f64,
    /// YaRN's β_slow (1).
    #[serde(default = "defaults::beta_slow")]
    pub beta_slow: f64,
    /// Attention temperature coefficient (1.0).
    #[serde(default = "defaults::one")]
    pub mscale: f64,
    /// Attention temperature coefficient over all dims (1.0).
    #[serde(default = "defaults::one")]
    pub mscale_all_dim: f64,
}

/// The architecture of a DeepSeek-V3-family model. Field names and meanings are those of
/// HF's `DeepseekV3Config`; defaults are its defaults where a key may be omitted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Model width d.
    pub hidden_size: usize,
    /// Inner width of the dense SwiGLU FFN (first layers).
    pub intermediate_size: usize,
    /// Inner width of each expert's SwiGLU FFN.
    pub moe_intermediate_size: usize,
    /// Transformer blocks of the main model (MTP modules not included).
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Must equal `num_attention_heads` (MLA has no grouped keys); HF configs carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Always-on experts per MoE layer.
    pub n_shared_experts: usize,
    /// Routed experts per MoE layer.
    pub n_routed_experts: usize,
    /// Routed experts each token is sent to (K_r).
    pub num_experts_per_tok: usize,
    /// Expert groups for group-limited routing.
    pub n_group: usize,
    /// Groups each token may route into.
    pub topk_group: usize,
    /// The first this-many layers use the dense FFN instead of MoE.
    pub first_k_dense_replace: usize,
    /// Every this-many layers after those is MoE (1 in DeepSeek-V3).
    #[serde(default = "defaults::one_usize")]
    pub moe_layer_freq: usize,
    /// Rank of the query compression; `None` (null) means a plain query projection.
    pub q_lora_rank: Option<usize>,
    /// Rank of the key/value compression (the cached latent).
    pub kv_lora_rank: usize,
    /// Decoupled RoPE dims per head (and of the shared rope key).
    pub qk_rope_head_dim: usize,
    /// Non-rotary query/key dims per head.
    pub qk_nope_head_dim: usize,
    /// Value dims per head.
    pub v_head_dim: usize,
    /// Scale applied to the normalized routing weights.
    pub routed_scaling_factor: f64,
    /// Whether the selected experts' weights are normalized to sum 1.
    pub norm_topk_prob: bool,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// YaRN scaling, if the model uses it.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Longest sequence the position tables cover.
    pub max_position_embeddings: usize,
    /// MTP depth D (modules after the main model).
    #[serde(default)]
    pub num_nextn_predict_layers: usize,
    /// Whether the output head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Std of the normal initialization of weights.
    #[serde(default = "defaults::initializer_range")]
    pub initializer_range: f64,
    /// Expert affinity function.
    #[serde(default)]
    pub scoring_func: ScoringFunc,
    /// Expert selection method.
    #[serde(default)]
    pub topk_method: TopkMethod,
    /// FFN activation.
    #[serde(default)]
    pub hidden_act: HiddenAct,
    /// Biases on the attention projections (DeepSeek-V3 has none; true is rejected).
    #[serde(default)]
    pub attention_bias: bool,
    /// Beginning-of-sequence token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<u32>,
}

mod defaults {
    pub fn one() -> f64 {
        1.0
    }
    pub fn one_usize() -> usize {
        1
    }
    pub fn beta_fast() -> f64 {
        32.0
    }
    pub fn beta_slow() -> f64 {
        1.0
    }
    pub fn initializer_range() -> f64 {
        0.02
    }
}

/// Built-in configurations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// DeepSeek-V3 as released: 671B parameters, 37B activated, one MTP module.
    DeepseekV3_671b,
    /// A model that trains on a CPU in seconds per step: width 128, 4 layers (1 dense),
    /// 16 routed experts top-4 in 4 groups (2 kept), MTP depth 1, byte vocabulary.
    Tiny,
    /// Twice `tiny`'s width, 6 layers: a CPU model for longer runs.
    Small,
}

impl Preset {
    /// Every preset's name, as `FromStr` accepts it.
    pub const NAMES: [&'static str; 3] = ["deepseek-v3-671b", "tiny", "small"];

    /// The name `FromStr` accepts.
    pub fn name(self) -> &'static str {
        match self {
            Preset::DeepseekV3_671b => Self::NAMES[0],
            Preset::Tiny => Self::NAMES[1],
            Preset::Small => Self::NAMES[2],
        }
    }

    /// The preset's configuration.
    pub fn config(self) -> ModelConfig {
        match self {
            Preset::DeepseekV3_671b => ModelConfig {
                vocab_size: 129_280,
                hidden_size: 7168,
                intermediate_size: 18_432,
                moe_intermediate_size: 2048,
                num_hidden_layers: 61,
                num_attention_heads: 128,
                num_key_value_heads: Some(128),
                n_shared_experts: 1,
                n_routed_experts: 256,
                num_experts_per_tok: 8,
                n_group: 8,
                topk_group: 4,
                first_k_dense_replace: 3,
                moe_layer_freq: 1,
                q_lora_rank: Some(1536),
                kv_lora_rank: 512,
                qk_rope_head_dim: 64,
                qk_nope_head_dim: 128,
                v_head_dim: 128,
                routed_scaling_factor: 2.5,
                norm_topk_prob: true,
                rms_norm_eps: 1e-6,
                rope_theta: 10_000.0,
                rope_scaling: Some(RopeScaling {
                    rope_type: "yarn".into(),
                    factor: 40.0,
                    original_max_position_embeddings: 4096,
                    beta_fast: 32.0,
                    beta_slow: 1.0,
                    mscale: 1.0,
                    mscale_all_dim: 1.0,
                }),
                max_position_embeddings: 163_840,
                num_nextn_predict_layers: 1,
                tie_word_embeddings: false,
                initializer_range: 0.02,
                scoring_func: ScoringFunc::Sigmoid,
                topk_method: TopkMethod::NoauxTc,
                hidden_act: HiddenAct::Silu,
                attention_bias: false,
                bos_token_id: Some(0),
                eos_token_id: Some(1),
            },
            Preset::Tiny => ModelConfig {
                vocab_size: 256,
                hidden_size: 128,
                intermediate_size: 384,
                moe_intermediate_size: 64,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                num_key_value_heads: None,
                n_shared_experts: 1,
                n_routed_experts: 16,
                num_experts_per_tok: 4,
                n_group: 4,
                topk_group: 2,
                first_k_dense_replace: 1,
                moe_layer_freq: 1,
                q_lora_rank: Some(64),
                kv_lora_rank: 32,
                qk_rope_head_dim: 16,
                qk_nope_head_dim: 32,
                v_head_dim: 32,
                routed_scaling_factor: 2.5,
                norm_topk_prob: true,
                rms_norm_eps: 1e-6,
                rope_theta: 10_000.0,
                rope_scaling: None,
                max_position_embeddings: 512,
                num_nextn_predict_layers: 1,
                tie_word_embeddings: false,
                initializer_range: 0.02,
                scoring_func: ScoringFunc::Sigmoid,
                topk_method: TopkMethod::NoauxTc,
                hidden_act: HiddenAct::Silu,
                attention_bias: false,
                bos_token_id: None,
                eos_token_id: None,
            },
            Preset::Small => ModelConfig {
                hidden_size: 256,
                intermediate_size: 768,
                moe_intermediate_size: 128,
                num_hidden_layers: 6,
                num_attention_heads: 8,
                q_lora_rank: Some(128),
                kv_lora_rank: 64,
                max_position_embeddings: 1024,
                ..Preset::Tiny.config()
            },
        }
    }
}

impl FromStr for Preset {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Preset::DeepseekV3_671b, Preset::Tiny, Preset::Small]
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| ConfigError::UnknownPreset(s.to_string()))
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The largest value of each size field a config may have (DeepSeek-V3 671B's value in
/// the comment). Far above any real model, low enough that no single field can ask for an
/// allocation beyond 64-bit counts; what a whole job needs is checked against the workers'
/// memory by the coordinator.
pub const SIZE_LIMITS: &[(&str, usize)] = &[
    ("vocab_size", 1 << 21),              // 129,280
    ("hidden_size", 1 << 16),             // 7,168
    ("intermediate_size", 1 << 18),       // 18,432
    ("moe_intermediate_size", 1 << 18),   // 2,048
    ("num_hidden_layers", 1 << 10),       // 61
    ("num_attention_heads", 1 << 10),     // 128
    ("n_shared_experts", 1 << 6),         // 1
    ("n_routed_experts", 1 << 14),        // 256
    ("num_experts_per_tok", 1 << 10),     // 8
    ("n_group", 1 << 14),                 // 8
    ("topk_group", 1 << 14),              // 4
    ("moe_layer_freq", 1 << 10),          // 1
    ("q_lora_rank", 1 << 16),             // 1,536
    ("kv_lora_rank", 1 << 16),            // 512
    ("qk_rope_head_dim", 1 << 12),        // 64
    ("qk_nope_head_dim", 1 << 12),        // 128
    ("v_head_dim", 1 << 12),              // 128
    ("max_position_embeddings", 1 << 22), // 163,840
    ("num_nextn_predict_layers", 1 << 4), // 1
];

/// The limit of `field` in [`SIZE_LIMITS`] (`usize::MAX` for a field without one).
pub fn size_limit(field: &str) -> usize {
    SIZE_LIMITS.iter().find(|(name, _)| *name == field).map_or(usize::MAX, |&(_, limit)| limit)
}

/// A config read from an HF `config.json`, with the keys flotilla did not use.
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    /// The validated configuration.
    pub config: ModelConfig,
    /// The checkpoint's `quantization_config`, when it declares DeepSeek's FP8 weights.
    pub quantization: Option<Fp8Quantization>,
    /// Keys present in the file that are not fields of [`ModelConfig`] (sorted).
    pub ignored_keys: Vec<String>,
}

/// DeepSeek's FP8 weight format, as `quantization_config` declares it: E4M3 weights with
/// one `weight_scale_inv` per block of `weight_block_size`, activations scaled on the fly.
/// The only form flotilla reads (and writes), so the block is always 128×128.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fp8Quantization {
    /// `weight_block_size`: rows × columns of one scale's block.
    pub weight_block_size: [usize; 2],
}

/// The `model_type`s whose configs describe flotilla's architecture.
const MODEL_TYPES: [&str; 2] = ["deepseek_v3", "deepseek_v2"];

impl ModelConfig {
    /// Reads an HF `config.json`. `model_type`, when present, must be `deepseek_v3`;
    /// keys that are not [`ModelConfig`] fields are ignored and listed in the result.
    pub fn from_hf_json(text: &str) -> Result<HfConfig, ConfigError> {
        let parse_error =
            |e: serde_json::Error| ConfigError::Parse { format: "config.json", detail: e.to_string() };
        let value: serde_json::Value = serde_json::from_str(text).map_err(parse_error)?;
        let serde_json::Value::Object(mut map) = value else {
            return Err(ConfigError::Parse {
                format: "config.json",
                detail: "the top level is not an object".into(),
            });
        };
        let model_type = match map.get("model_type") {
            None => "deepseek_v3",
            Some(value) => match value.as_str() {
                Some(t) if MODEL_TYPES.contains(&t) => t,
                _ => {
                    return Err(ConfigError::InvalidField {
                        field: "model_type",
                        detail: format!("must be one of {MODEL_TYPES:?}, got {value}"),
                    });
                }
            },
        };
        let model_type = model_type.to_string();
        normalize_rope_keys(&mut map)?;
        normalize_gate_keys(&mut map, &model_type)?;
        normalize_defaults(&mut map)?;
        let quantization = map.remove("quantization_config").map(|q| parse_quantization(&q)).transpose()?;
        let ignored_keys: Vec<String> =
            map.keys().filter(|k| !FIELD_NAMES.contains(&k.as_str())).cloned().collect();
        map.retain(|k, _| FIELD_NAMES.contains(&k.as_str()));
        let config: ModelConfig =
            serde_json::from_value(serde_json::Value::Object(map)).map_err(parse_error)?;
        config.validate()?;
        Ok(HfConfig { config, quantization, ignored_keys })
    }

    /// Writes the config as an HF `config.json` (with `model_type` and `architectures`).
    pub fn to_hf_json(&self) -> String {
        let mut value = serde_json::to_value(self).expect("a ModelConfig always serializes");
        if let serde_json::Value::Object(map) = &mut value {
            map.insert("model_type".into(), "deepseek_v3".into());
            map.insert("architectures".into(), serde_json::json!(["DeepseekV3ForCausalLM"]));
        }
        serde_json::to_string_pretty(&value).expect("a JSON value always serializes")
    }

    /// Reads flotilla's TOML form: the [`ModelConfig`] fields, strictly, optionally on top
    /// of a preset named by a `preset = "…"` key.
    pub fn from_toml(text: &str) -> Result<ModelConfig, ConfigError> {
        let parse_error = |detail: String| ConfigError::Parse { format: "TOML", detail };
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| parse_error(e.to_string()))?;
        let mut merged = match table.remove("preset") {
            None => toml::Table::new(),
            Some(toml::Value::String(name)) => {
                let base = name.parse::<Preset>()?.config();
                toml::Table::try_from(&base).map_err(|e| parse_error(e.to_string()))?
            }
            Some(other) => {
                return Err(ConfigError::InvalidField {
                    field: "preset",
                    detail: format!("must be a string naming a preset, got {other}"),
                });
            }
        };
        merged.extend(table);
        let config: ModelConfig =
            merged.try_into().map_err(|e: toml::de::Error| parse_error(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Query/key dims per head, nope + rope (DeepSeek-V3: 192).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Whether block `layer` (0-based, main model) has an MoE FFN rather than a dense one.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_routed_experts > 0
            && layer >= self.first_k_dense_replace
            && layer.is_multiple_of(self.moe_layer_freq)
    }

    /// Checks every field and the relations between them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, detail: String| Err(ConfigError::InvalidField { field, detail });
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
            ("moe_layer_freq", self.moe_layer_freq),
        ] {
            if value == 0 {
                return invalid(field, "must be at least 1".into());
            }
        }
        self.validate_bounds()?;
        if self.q_lora_rank == Some(0) {
            return invalid("q_lora_rank", "must be at least 1, or null for a plain query projection".into());
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return invalid(
                "qk_rope_head_dim",
                format!("RoPE rotates pairs of dims, so it must be even, got {}", self.qk_rope_head_dim),
            );
        }
        if let Some(kv_heads) = self.num_key_value_heads
            && kv_heads != self.num_attention_heads
        {
            return invalid(
                "num_key_value_heads",
                format!(
                    "MLA gives every head its own key and value, so it must equal num_attention_heads = {}, got {kv_heads}",
                    self.num_attention_heads
                ),
            );
        }
        if self.attention_bias {
            return invalid("attention_bias", "DeepSeek-V3's projections have no bias; must be false".into());
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            return invalid(
                "first_k_dense_replace",
                format!(
                    "cannot exceed num_hidden_layers = {}, got {}",
                    self.num_hidden_layers, self.first_k_dense_replace
                ),
            );
        }
        self.validate_moe()?;
        for (field, value) in [
            ("rms_norm_eps", self.rms_norm_eps),
            ("rope_theta", self.rope_theta),
            ("routed_scaling_factor", self.routed_scaling_factor),
            ("initializer_range", self.initializer_range),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return invalid(field, format!("must be finite and > 0, got {value}"));
            }
        }
        if let Some(s) = &self.rope_scaling {
            if s.rope_type != "yarn" {
                return invalid(
                    "rope_scaling",
                    format!("only \"yarn\" scaling is supported, got {:?}", s.rope_type),
                );
            }
            if !(s.factor.is_finite() && s.factor >= 1.0) {
                return invalid("rope_scaling", format!("factor must be finite and ≥ 1, got {}", s.factor));
            }
            if s.original_max_position_embeddings == 0 {
                return invalid("rope_scaling", "original_max_position_embeddings must be at least 1".into());
            }
            if !(s.beta_fast.is_finite()
                && s.beta_slow.is_finite()
                && s.beta_fast > s.beta_slow
                && s.beta_slow > 0.0)
            {
                return invalid(
                    "rope_scaling",
                    format!(
                        "needs 0 < beta_slow < beta_fast, got beta_slow {} and beta_fast {}",
                        s.beta_slow, s.beta_fast
                    ),
                );
            }
            if !(s.mscale.is_finite() && s.mscale_all_dim.is_finite()) {
                return invalid("rope_scaling", "mscale and mscale_all_dim must be finite".into());
            }
        }
        for (field, id) in [("bos_token_id", self.bos_token_id), ("eos_token_id", self.eos_token_id)] {
            if let Some(id) = id
                && id as usize >= self.vocab_size
            {
                return invalid(
                    field,
                    format!("token {id} is outside the vocabulary of {}", self.vocab_size),
                );
            }
        }
        Ok(())
    }

    /// Every size within [`SIZE_LIMITS`]: a config that passes cannot ask for a tensor
    /// whose element count overflows, or an allocation no machine has, by one field alone.
    fn validate_bounds(&self) -> Result<(), ConfigError> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("n_shared_experts", self.n_shared_experts),
            ("n_routed_experts", self.n_routed_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("n_group", self.n_group),
            ("topk_group", self.topk_group),
            ("moe_layer_freq", self.moe_layer_freq),
            ("q_lora_rank", self.q_lora_rank.unwrap_or(0)),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
            ("num_nextn_predict_layers", self.num_nextn_predict_layers),
        ];
        for (field, value) in sizes {
            let limit = size_limit(field);
            if value > limit {
                return Err(ConfigError::InvalidField {
                    field,
                    detail: format!("{value} is above the limit of {limit}"),
                });
            }
        }
        Ok(())
    }

    fn validate_moe(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, detail: String| Err(ConfigError::InvalidField { field, detail });
        let has_moe =
            (0..self.num_hidden_layers).any(|l| self.is_moe_layer(l)) || self.num_nextn_predict_layers > 0;
        if self.n_routed_experts == 0 {
            if self.first_k_dense_replace < self.num_hidden_layers {
                return invalid(
                    "n_routed_experts",
                    "is 0, but layers after first_k_dense_replace are MoE layers and need experts".into(),
                );
            }
            return Ok(());
        }
        if !has_moe {
            return Ok(());
        }
        if self.moe_intermediate_size == 0 {
            return invalid("moe_intermediate_size", "must be at least 1".into());
        }
        if self.n_group == 0 {
            return invalid("n_group", "must be at least 1".into());
        }
        if !self.n_routed_experts.is_multiple_of(self.n_group) {
            return invalid(
                "n_routed_experts",
                format!(
                    "{} experts cannot be split evenly into n_group = {} groups",
                    self.n_routed_experts, self.n_group
                ),
            );
        }
        let per_group = self.n_routed_experts / self.n_group;
        if self.n_group > 1 && per_group < 2 {
            return invalid(
                "n_group",
                format!(
                    "a group is scored by the sum of its top-2 experts, so it needs at least 2; \
                     {} experts in {} groups give {per_group}",
                    self.n_routed_experts, self.n_group
                ),
            );
        }
        if self.topk_group == 0 || self.topk_group > self.n_group {
            return invalid(
                "topk_group",
                format!("must be between 1 and n_group = {}, got {}", self.n_group, self.topk_group),
            );
        }
        let reachable = self.topk_group * per_group;
        if self.num_experts_per_tok == 0 || self.num_experts_per_tok > reachable {
            return invalid(
                "num_experts_per_tok",
                format!(
                    "must be between 1 and the {reachable} experts in the topk_group = {} kept groups \
                     ({per_group} per group), got {}",
                    self.topk_group, self.num_experts_per_tok
                ),
            );
        }
        Ok(())
    }
}

/// Brings the RoPE keys of any transformers version to the `rope_theta` / `rope_scaling`
/// form [`ModelConfig`] reads.
///
/// - transformers ≥ 5 writes `rope_parameters: {rope_type, rope_theta, factor, …}` instead
///   of top-level `rope_theta` and `rope_scaling`; a `rope_type` other than "default" is
///   the scaling.
/// - The kind is spelled `type` (DeepSeek's released config), `rope_type` (transformers),
///   or both (transformers 4 adds `rope_type` beside a `type` it loaded and saves both;
///   transformers 5 carries both into `rope_parameters`). Both must then agree.
/// - `rope_interleave: false` declares weights whose rope rows were permuted to the
///   half-split layout; flotilla computes DeepSeek's interleaved rotation on the weights as
///   released (what `rope_interleave: true`, the default, means), so it refuses those.
fn normalize_rope_keys(map: &mut serde_json::Map<String, serde_json::Value>) -> Result<(), ConfigError> {
    use serde_json::Value;
    if let Some(interleave) = map.remove("rope_interleave")
        && interleave != Value::Bool(true)
    {
        return Err(ConfigError::InvalidField {
            field: "rope_interleave",
            detail: format!(
                "only the interleaved RoPE layout of DeepSeek's released weights (true) is supported, got {interleave}"
            ),
        });
    }
    let scaling = match map.remove("rope_scaling") {
        None | Some(Value::Null) => None,
        Some(Value::Object(scaling)) => Some(("rope_scaling", scaling)),
        Some(other) => {
            return Err(ConfigError::InvalidField {
                field: "rope_scaling",
                detail: format!("must be an object or null, got {other}"),
            });
        }
    };
    let parameters = match map.remove("rope_parameters") {
        None | Some(Value::Null) => None,
        Some(Value::Object(mut parameters)) => {
            if let Some(theta) = parameters.remove("rope_theta") {
                map.entry("rope_theta").or_insert(theta);
            }
            Some(("rope_parameters", parameters))
        }
        Some(other) => {
            return Err(ConfigError::InvalidField {
                field: "rope_parameters",
                detail: format!("must be an object or null, got {other}"),
            });
        }
    };
    // transformers 5 reads `rope_scaling` into `rope_parameters`; a file with both is
    // read the same way: the scaling is the first one that scales.
    for (field, mut dict) in [scaling, parameters].into_iter().flatten() {
        let kind = rope_kind(field, &mut dict)?;
        match kind.as_deref() {
            None | Some("default") => {}
            Some("yarn") => {
                dict.insert("rope_type".into(), Value::String("yarn".into()));
                map.entry("rope_scaling").or_insert(Value::Object(dict));
            }
            Some(other) => {
                return Err(ConfigError::InvalidField {
                    field,
                    detail: format!(
                        "rope_type {other:?} is not supported: flotilla implements DeepSeek-V3's \"yarn\" \
                         scaling (or none, \"default\")"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Removes `type` and `rope_type` from a RoPE dict and returns the kind they name.
fn rope_kind(
    field: &'static str,
    dict: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<Option<String>, ConfigError> {
    let mut kind: Option<String> = None;
    for key in ["rope_type", "type"] {
        let Some(value) = dict.remove(key) else { continue };
        let Some(text) = value.as_str() else {
            return Err(ConfigError::InvalidField {
                field,
                detail: format!("`{key}` must be a string, got {value}"),
            });
        };
        match &kind {
            Some(seen) if seen != text => {
                return Err(ConfigError::InvalidField {
                    field,
                    detail: format!("`rope_type` {seen:?} and `type` {text:?} disagree"),
                });
            }
            _ => kind = Some(text.to_string()),
        }
    }
    Ok(kind)
}

/// Checks the gate's keys against what flotilla implements, before they are parsed, so the
/// error names the key and the value (not an enum's variants). A `deepseek_v2` config
/// without them means DeepSeek-V2's softmax gate with greedy top-k (transformers' and
/// DeepSeek's defaults for V2), which flotilla does not model; `deepseek_v3`'s defaults
/// are sigmoid and `noaux_tc`.
fn normalize_gate_keys(
    map: &mut serde_json::Map<String, serde_json::Value>,
    model_type: &str,
) -> Result<(), ConfigError> {
    let v2 = model_type == "deepseek_v2";
    let checks: [(&'static str, &'static str, &'static str, &'static str); 3] = [
        (
            "scoring_func",
            "sigmoid",
            if v2 { "softmax" } else { "sigmoid" },
            "DeepSeek-V3's sigmoid expert scores",
        ),
        (
            "topk_method",
            "noaux_tc",
            if v2 { "greedy" } else { "noaux_tc" },
            "DeepSeek-V3's group-limited top-k on bias-corrected scores (`noaux_tc`)",
        ),
        ("hidden_act", "silu", "silu", "SwiGLU with SiLU"),
    ];
    for (field, supported, default, what) in checks {
        let value = match map.get(field) {
            None | Some(serde_json::Value::Null) => default.to_string(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(ConfigError::InvalidField {
                    field,
                    detail: format!("must be a string, got {other}"),
                });
            }
        };
        if value != supported {
            let implied = if map.get(field).is_none_or(serde_json::Value::is_null) {
                format!(" (the default of a {model_type} config without the key)")
            } else {
                String::new()
            };
            return Err(ConfigError::InvalidField {
                field,
                detail: format!(
                    "{value:?}{implied} is not supported: flotilla implements {what}, {supported:?}"
                ),
            });
        }
        map.insert(field.into(), serde_json::Value::String(value));
    }
    Ok(())
}

/// `null` in HF configs means "the default" for these keys (transformers 5 writes
/// `n_group: null` for one group, transformers 4 omits `num_nextn_predict_layers`); an
/// `eos_token_id` list (transformers 5 allows several) keeps its first id, the one
/// flotilla appends to documents.
fn normalize_defaults(map: &mut serde_json::Map<String, serde_json::Value>) -> Result<(), ConfigError> {
    use serde_json::Value;
    for (key, default) in
        [("n_group", 1), ("topk_group", 1), ("moe_layer_freq", 1), ("num_nextn_predict_layers", 0)]
    {
        if map.get(key).is_some_and(Value::is_null) {
            map.insert(key.into(), Value::from(default));
        }
    }
    for key in ["bos_token_id", "eos_token_id"] {
        if let Some(Value::Array(ids)) = map.get(key) {
            let first = ids.first().cloned().unwrap_or(Value::Null);
            map.insert(key.into(), first);
        }
    }
    Ok(())
}

/// Reads `quantization_config`: only DeepSeek's FP8 form (E4M3, dynamic activation
/// scaling, 128×128 weight blocks) can be dequantized correctly, so anything else is an
/// error naming the key.
fn parse_quantization(value: &serde_json::Value) -> Result<Fp8Quantization, ConfigError> {
    let field = "quantization_config";
    let serde_json::Value::Object(q) = value else {
        return Err(ConfigError::InvalidField { field, detail: format!("must be an object, got {value}") });
    };
    let text = |key: &str| q.get(key).and_then(serde_json::Value::as_str);
    let expect = |key: &str, allowed: &[&str], required: bool| -> Result<(), ConfigError> {
        match (q.get(key), text(key)) {
            (None, _) if !required => Ok(()),
            (_, Some(v)) if allowed.contains(&v) => Ok(()),
            (got, _) => Err(ConfigError::InvalidField {
                field,
                detail: format!(
                    "`{key}` must be {allowed:?} (DeepSeek's FP8 weights), got {}",
                    got.map_or("nothing".to_string(), ToString::to_string)
                ),
            }),
        }
    };
    expect("quant_method", &["fp8"], true)?;
    expect("fmt", &["e4m3"], false)?;
    expect("activation_scheme", &["dynamic"], false)?;
    let block = match q.get("weight_block_size") {
        None => [128, 128],
        Some(b) => {
            let parsed: Option<Vec<u64>> =
                b.as_array().map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect());
            match parsed.as_deref() {
                Some([128, 128]) => [128, 128],
                _ => {
                    return Err(ConfigError::InvalidField {
                        field,
                        detail: format!(
                            "`weight_block_size` must be [128, 128] (one scale per 128×128 block), got {b}"
                        ),
                    });
                }
            }
        }
    };
    Ok(Fp8Quantization { weight_block_size: block })
}

/// Every field of [`ModelConfig`] by its serialized name (kept in step with the struct by
/// the `field_names_are_exactly_the_fields` test).
const FIELD_NAMES: [&str; 34] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "n_shared_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "first_k_dense_replace",
    "moe_layer_freq",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "routed_scaling_factor",
    "norm_topk_prob",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "num_nextn_predict_layers",
    "tie_word_embeddings",
    "initializer_range",
    "scoring_func",
    "topk_method",
    "hidden_act",
    "attention_bias",
    "bos_token_id",
    "eos_token_id",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_are_exactly_the_fields() {
        // The full preset has every optional field set, so it serializes every field.
        let serde_json::Value::Object(map) = serde_json::to_value(Preset::DeepseekV3_671b.config()).unwrap()
        else {
            panic!("not an object")
        };
        let mut serialized: Vec<&str> = map.keys().map(String::as_str).collect();
        let mut listed = FIELD_NAMES.to_vec();
        serialized.sort_unstable();
        listed.sort_unstable();
        assert_eq!(serialized, listed);
    }
}
