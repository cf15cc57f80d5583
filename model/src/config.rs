//! The model's shape: [`ModelConfig`], with the field names of Hugging Face's
//! `DeepseekV3Config`, loadable from an HF `config.json` and from flotilla's TOML, and
//! checked for consistency before anything is built from it.
//!
//! Sources of a config:
//! - a preset ([`Preset`]): the real `deepseek-v3-671b`, and `tiny` / `small`, which train
//!   on a CPU;
//! - an HF `config.json` ([`ModelConfig::from_hf_json`]): keys flotilla does not model
//!   (`architectures`, `torch_dtype`, `quantization_config`, …) are returned to the caller
//!   as ignored, not rejected, since HF configs carry many generic ones;
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

/// A config read from an HF `config.json`, with the keys flotilla did not use.
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    /// The validated configuration.
    pub config: ModelConfig,
    /// Keys present in the file that are not fields of [`ModelConfig`] (sorted).
    pub ignored_keys: Vec<String>,
}

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
        if let Some(model_type) = map.get("model_type")
            && model_type.as_str() != Some("deepseek_v3")
        {
            return Err(ConfigError::InvalidField {
                field: "model_type",
                detail: format!("must be \"deepseek_v3\", got {model_type}"),
            });
        }
        normalize_rope_keys(&mut map)?;
        let ignored_keys: Vec<String> =
            map.keys().filter(|k| !FIELD_NAMES.contains(&k.as_str())).cloned().collect();
        map.retain(|k, _| FIELD_NAMES.contains(&k.as_str()));
        let config: ModelConfig =
            serde_json::from_value(serde_json::Value::Object(map)).map_err(parse_error)?;
        config.validate()?;
        Ok(HfConfig { config, ignored_keys })
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
    let Some(parameters) = map.remove("rope_parameters") else {
        return Ok(());
    };
    let Value::Object(mut parameters) = parameters else {
        return Err(ConfigError::InvalidField {
            field: "rope_parameters",
            detail: "must be an object".into(),
        });
    };
    if let Some(theta) = parameters.remove("rope_theta") {
        map.entry("rope_theta").or_insert(theta);
    }
    let rope_type = parameters.remove("rope_type").or_else(|| parameters.remove("type"));
    match rope_type.as_ref().and_then(Value::as_str) {
        None | Some("default") => {}
        Some(kind) => {
            parameters.insert("rope_type".into(), Value::String(kind.to_string()));
            map.entry("rope_scaling").or_insert(Value::Object(parameters));
        }
    }
    Ok(())
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
