//! The DeepSeek-V3 model as flotilla trains it (DeepSeek-V3 report §2; DESIGN §1.1).
//!
//! - [`config`]: [`ModelConfig`], with HF `DeepseekV3Config`'s field names, presets
//!   ([`Preset`]), loading from HF `config.json` and flotilla TOML, validation.
//! - [`params`]: parameter accounting by component, total and activated per token, with
//!   and without MTP ([`ParameterCounts`]).
//!
//! API boundary: this crate describes and (in later steps) computes the model on plain
//! buffers through `flotilla-kernels`; it knows nothing of processes or networking, so the
//! coordinator can use its config and accounting for placement, and workers its layers.

pub mod config;
pub mod params;

pub use config::{ConfigError, HfConfig, ModelConfig, Preset};
pub use params::{Breakdown, ParameterCounts};
