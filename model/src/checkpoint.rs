//! Model weights in the Hugging Face DeepSeek-V3 layout: a directory with `config.json`
//! and one or more `*.safetensors` files whose tensors carry HF names
//! (`model.layers.3.mlp.experts.7.gate_proj.weight`, …).
//!
//! Writing stores f32, BF16, or DeepSeek's released FP8 form ([`WeightDtype::Fp8`]).
//! Reading accepts all three: an `F8_E4M3` weight with a `{name}_scale_inv` f32 tensor
//! holding one scale per 128×128 block (`w = code · scale_inv[row / 128, col / 128]`) is
//! dequantized on load.
//!
//! The FP8 form quantizes every 2-D linear weight except the embedding
//! (`model.embed_tokens.weight`), the output head (`lm_head.weight`), the MoE gates
//! (`….mlp.gate.weight`) and the MTP modules' copies of the embedding and head
//! (`model.layers.{L+k}.embed_tokens.weight`, `….shared_head.head.weight`)
//! ([`is_fp8_weight`]); those and every 1-D tensor (norms, selection biases) are BF16, and
//! `config.json` carries DeepSeek's `quantization_config`.
//!
//! Invariant: [`fill_params`] either fills every parameter it is given or changes none
//! and names the first tensor that is missing, mis-shaped or of an unsupported type.

use crate::config::{ConfigError, ModelConfig};
use crate::param::Param;
use flotilla_kernels::fp8::E4M3_TO_F32;
use flotilla_kernels::quant::{Granularity, QuantConfig, quantize};
use half::bf16;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What can go wrong reading or writing a checkpoint directory.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// `config.json` is invalid.
    #[error("{path}: {error}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        error: ConfigError,
    },
    /// A safetensors file is malformed.
    #[error("{path}: not a valid safetensors file: {detail}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        detail: String,
    },
    /// A tensor is missing, mis-shaped, duplicated or of a type flotilla cannot read.
    #[error("tensor `{tensor}`: {detail}")]
    Tensor {
        /// The tensor's HF name.
        tensor: String,
        /// What is wrong.
        detail: String,
    },
    /// The directory holds no safetensors file.
    #[error("{0}: no *.safetensors file")]
    NoWeights(PathBuf),
}

/// How weights are stored when writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// 4 bytes per value, exact.
    F32,
    /// 2 bytes per value, rounded to nearest even.
    Bf16,
    /// DeepSeek's released form: the linear weights of [`is_fp8_weight`] as `F8_E4M3` codes
    /// with a `{name}_scale_inv` F32 tensor `[⌈rows/128⌉, ⌈cols/128⌉]` (one dequantization
    /// scale per 128×128 block, `w ≈ code · scale_inv`), everything else BF16.
    Fp8,
}

/// Whether [`WeightDtype::Fp8`] stores the tensor `name` of `shape` in FP8: every 2-D
/// weight except the embedding, the output head, the MoE gates and the MTP modules' copies
/// of the embedding and head (as DeepSeek's released checkpoint).
pub fn is_fp8_weight(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2
        && name.ends_with(".weight")
        && name != "model.embed_tokens.weight"
        && name != "lm_head.weight"
        && !name.ends_with(".mlp.gate.weight")
        && !name.ends_with(".embed_tokens.weight")
        && !name.ends_with(".shared_head.head.weight")
}

/// DeepSeek-V3's `quantization_config`, as its released `config.json` has it.
fn fp8_quantization_config() -> serde_json::Value {
    serde_json::json!({
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    })
}

/// A tensor to write: its HF name, shape and f32 values.
#[derive(Clone, Copy, Debug)]
pub struct NamedTensor<'a> {
    /// HF name.
    pub name: &'a str,
    /// Row-major shape.
    pub shape: &'a [usize],
    /// Values, `shape.product()` of them.
    pub data: &'a [f32],
}

/// The file name flotilla writes weights to.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Writes `config.json` and `model.safetensors` into `dir` (created if needed). Under
/// [`WeightDtype::Fp8`] the quantized weights get their `{name}_scale_inv` tensors and
/// `config.json` DeepSeek's `quantization_config`.
pub fn save_hf(
    dir: &Path,
    config: &ModelConfig,
    tensors: &[NamedTensor<'_>],
    dtype: WeightDtype,
) -> Result<(), CheckpointError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| CheckpointError::Io { path, error }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut bytes: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for t in tensors {
        let bad = |detail: String| CheckpointError::Tensor { tensor: t.name.to_string(), detail };
        if t.shape.iter().product::<usize>() != t.data.len() {
            return Err(bad(format!("shape {:?} does not match its {} values", t.shape, t.data.len())));
        }
        let bf16_bytes = || t.data.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect();
        let mut entries = Vec::with_capacity(2);
        match dtype {
            WeightDtype::F32 => entries.push((
                t.name.to_string(),
                (Dtype::F32, t.shape.to_vec(), t.data.iter().flat_map(|v| v.to_le_bytes()).collect()),
            )),
            WeightDtype::Bf16 => {
                entries.push((t.name.to_string(), (Dtype::BF16, t.shape.to_vec(), bf16_bytes())))
            }
            WeightDtype::Fp8 if is_fp8_weight(t.name, t.shape) => {
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let q = quantize(t.data, rows, cols, Granularity::Block128x128, &QuantConfig::default())
                    .map_err(|e| bad(format!("cannot be quantized to FP8: {e}")))?;
                let (sr, sc) = q.scale_shape();
                let scales = q.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
                entries.push((t.name.to_string(), (Dtype::F8_E4M3, t.shape.to_vec(), q.codes)));
                entries.push((format!("{}_scale_inv", t.name), (Dtype::F32, vec![sr, sc], scales)));
            }
            WeightDtype::Fp8 => {
                entries.push((t.name.to_string(), (Dtype::BF16, t.shape.to_vec(), bf16_bytes())))
            }
        }
        for (name, entry) in entries {
            if bytes.insert(name.clone(), entry).is_some() {
                return Err(CheckpointError::Tensor { tensor: name, detail: "written twice".into() });
            }
        }
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    let views: Vec<(&str, TensorView<'_>)> = bytes
        .iter()
        .map(|(name, (dt, shape, raw))| {
            TensorView::new(*dt, shape.clone(), raw)
                .map(|v| (name.as_str(), v))
                .map_err(|e| CheckpointError::Tensor { tensor: name.to_string(), detail: e.to_string() })
        })
        .collect::<Result<_, _>>()?;
    let metadata = [("format".to_string(), "pt".to_string())].into_iter().collect();
    safetensors::serialize_to_file(views, Some(metadata), &weights_path)
        .map_err(|e| CheckpointError::Format { path: weights_path.clone(), detail: e.to_string() })?;
    let config_path = dir.join("config.json");
    let mut json = config.to_hf_json();
    if dtype == WeightDtype::Fp8 {
        let mut value: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| CheckpointError::Format {
                path: config_path.clone(),
                detail: format!("cannot re-read the generated config: {e}"),
            })?;
        if let serde_json::Value::Object(map) = &mut value {
            map.insert("quantization_config".into(), fp8_quantization_config());
        }
        json = serde_json::to_string_pretty(&value).map_err(|e| CheckpointError::Format {
            path: config_path.clone(),
            detail: format!("cannot write the config: {e}"),
        })?;
    }
    std::fs::write(&config_path, json).map_err(io(&config_path))?;
    Ok(())
}

/// A checkpoint directory's configuration and tensors, dequantized to f32.
#[derive(Clone, Debug, PartialEq)]
pub struct HfCheckpoint {
    /// From `config.json`.
    pub config: ModelConfig,
    /// Every weight by HF name (FP8 scale tensors folded into their weights).
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

/// Reads `config.json` and every `*.safetensors` file of `dir` (in name order).
pub fn load_hf(dir: &Path) -> Result<HfCheckpoint, CheckpointError> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|error| CheckpointError::Io { path: config_path.clone(), error })?;
    let config = ModelConfig::from_hf_json(&text)
        .map_err(|error| CheckpointError::Config { path: config_path.clone(), error })?
        .config;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|error| CheckpointError::Io { path: dir.to_path_buf(), error })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(CheckpointError::NoWeights(dir.to_path_buf()));
    }
    let mut raw: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for path in &files {
        let bytes = std::fs::read(path).map_err(|error| CheckpointError::Io { path: path.clone(), error })?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| CheckpointError::Format { path: path.clone(), detail: e.to_string() })?;
        for (name, view) in st.tensors() {
            let entry = (view.dtype(), view.shape().to_vec(), view.data().to_vec());
            if raw.insert(name.clone(), entry).is_some() {
                return Err(CheckpointError::Tensor {
                    tensor: name,
                    detail: "appears in more than one file".into(),
                });
            }
        }
    }
    let mut tensors = BTreeMap::new();
    for (name, (dtype, shape, data)) in &raw {
        if name.ends_with("_scale_inv") {
            continue;
        }
        let values = decode(name, *dtype, shape, data, &raw)?;
        tensors.insert(name.clone(), (shape.clone(), values));
    }
    Ok(HfCheckpoint { config, tensors })
}

fn decode(
    name: &str,
    dtype: Dtype,
    shape: &[usize],
    data: &[u8],
    all: &BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
) -> Result<Vec<f32>, CheckpointError> {
    let bad = |detail: String| CheckpointError::Tensor { tensor: name.to_string(), detail };
    match dtype {
        Dtype::F32 => {
            Ok(data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        }
        Dtype::BF16 => Ok(data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()),
        Dtype::F8_E4M3 => {
            let scale_name = format!("{name}_scale_inv");
            let (scale_dtype, scale_shape, scale_data) =
                all.get(&scale_name).ok_or_else(|| bad(format!("is FP8 but `{scale_name}` is missing")))?;
            let [rows, cols] = shape[..] else {
                return Err(bad(format!("FP8 weights must be 2-D, got shape {shape:?}")));
            };
            let expected = [rows.div_ceil(128), cols.div_ceil(128)];
            if *scale_dtype != Dtype::F32 || scale_shape[..] != expected {
                return Err(bad(format!(
                    "`{scale_name}` must be F32 of shape {expected:?} (one scale per 128×128 block), got {scale_dtype:?} {scale_shape:?}"
                )));
            }
            let scales: Vec<f32> =
                scale_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            Ok(data
                .iter()
                .enumerate()
                .map(|(i, &code)| {
                    let (r, c) = (i / cols, i % cols);
                    E4M3_TO_F32[code as usize] * scales[(r / 128) * expected[1] + c / 128]
                })
                .collect())
        }
        other => Err(bad(format!("dtype {other:?} is not supported (F32, BF16, or F8_E4M3 with scales)"))),
    }
}

/// Copies the checkpoint's tensors into `params` by name, after checking that every one
/// exists with the parameter's shape (nothing is written otherwise).
pub fn fill_params(params: &mut [&mut Param<f32>], checkpoint: &HfCheckpoint) -> Result<(), CheckpointError> {
    for p in params.iter() {
        let (shape, _) = checkpoint.tensors.get(&p.name).ok_or_else(|| CheckpointError::Tensor {
            tensor: p.name.clone(),
            detail: "missing from the checkpoint".into(),
        })?;
        if *shape != p.shape {
            return Err(CheckpointError::Tensor {
                tensor: p.name.clone(),
                detail: format!("has shape {shape:?} in the checkpoint, the model needs {:?}", p.shape),
            });
        }
    }
    for p in params.iter_mut() {
        p.value.copy_from_slice(&checkpoint.tensors[&p.name].1);
    }
    Ok(())
}
