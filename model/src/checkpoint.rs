//! Model weights in the Hugging Face DeepSeek-V3 layout: a directory with `config.json`
//! and the tensors under their HF names (`model.layers.3.mlp.experts.7.gate_proj.weight`,
//! …) in safetensors files, as `save_pretrained` writes them.
//!
//! # Reading ([`HfReader`])
//! The directory holds either `model.safetensors.index.json` (its `weight_map` names the
//! file of every tensor; only those files are opened) or, without an index, every
//! `*.safetensors` file in it (a single `model.safetensors`, usually). Each file is
//! memory-mapped and only its header is parsed on open; a tensor's bytes are read, and
//! decoded to f32, when it is asked for, straight into the caller's buffer. So a pipeline
//! stage or an expert shard that asks for the tensors it holds touches those bytes and no
//! others, whatever the checkpoint's size ([`HfReader::bytes_decoded`] counts them), and
//! once a tensor is decoded its mapped pages are released from the process, so its peak
//! memory is the values it holds plus one tensor's stored bytes.
//! Stored types: `F32`, `BF16`, `F16`, and DeepSeek's released FP8 form: an `F8_E4M3`
//! weight with a `{name}_scale_inv` F32 tensor of shape `[⌈rows/128⌉, ⌈cols/128⌉]`, one
//! scale per 128×128 block (the last row and column of blocks partial when a dimension is
//! not a multiple of 128), `w = code · scale_inv[row / 128, col / 128]`.
//!
//! Checked on open: every file's header (8-byte length, JSON, each tensor's byte range
//! inside the file and of the size its dtype and shape give: a truncated file is named with
//! the first tensor that runs past its end), the index (every file it names exists and
//! holds the tensors it maps to it), no tensor in two files. Checked when a tensor is
//! asked for: present, of the expected shape, of a readable dtype, FP8 scales present and
//! of the right type and shape. Every error names the file (or the index, or the
//! directory for a missing tensor) and the tensor.
//!
//! # Filling a model ([`fill_from_reader`])
//! The caller passes the parameters it holds (a whole model, or one rank's stages and
//! expert shard); each is checked, then decoded one at a time into its value, so memory
//! stays bounded by what the caller holds. The MTP modules (`model.layers.{L+k}.*`,
//! `L = num_hidden_layers`), which transformers drops on load and save, are governed by
//! [`MtpPolicy`]: required, or left at the model's seeded initialization when the
//! checkpoint has none of them. Invariant: all or nothing — on any error no parameter has
//! changed.
//!
//! # Writing ([`save_hf_sharded`], [`save_hf`])
//! f32, BF16, or DeepSeek's released FP8 form ([`WeightDtype::Fp8`]). Tensors are written
//! in name order, split into shards of at most `max_shard_size` bytes as transformers'
//! `save_pretrained` splits them (a tensor larger than the limit gets a shard of its own):
//! one shard is `model.safetensors`; several are `model-00001-of-0000N.safetensors` with
//! `model.safetensors.index.json` (`metadata.total_size`, the stored bytes of every tensor,
//! `metadata.total_parameters`, the values written, as transformers 5 adds, and
//! `weight_map`). Every file carries the safetensors metadata `format = pt`. Weights
//! files of an earlier save in the directory are removed first, so a directory never
//! mixes two saves.
//!
//! The FP8 form quantizes every 2-D linear weight except the embedding
//! (`model.embed_tokens.weight`), the output head (`lm_head.weight`), the MoE gates
//! (`….mlp.gate.weight`) and the MTP modules' copies of the embedding and head
//! (`model.layers.{L+k}.embed_tokens.weight`, `….shared_head.head.weight`)
//! ([`is_fp8_weight`]); those and every 1-D tensor (norms, selection biases) are BF16, and
//! `config.json` carries DeepSeek's `quantization_config`.

use crate::config::{ConfigError, ModelConfig};
use crate::param::Param;
use flotilla_kernels::fp8::E4M3_TO_F32;
use flotilla_kernels::quant::{Fp8Matrix, Granularity, QuantConfig, quantize};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// A safetensors file or the index is malformed.
    #[error("{path}: not a valid {what}: {detail}")]
    Format {
        /// The file.
        path: PathBuf,
        /// `safetensors file` or `index`.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A tensor is missing, mis-shaped, truncated, duplicated or of a type flotilla cannot
    /// read.
    #[error("{path}: tensor `{tensor}`: {detail}")]
    Tensor {
        /// The file holding it (or the index or directory that should).
        path: PathBuf,
        /// The tensor's HF name.
        tensor: String,
        /// What is wrong.
        detail: String,
    },
    /// The directory holds no safetensors file.
    #[error("{0}: no *.safetensors file")]
    NoWeights(PathBuf),
    /// The checkpoint describes another model than the one it is loaded into.
    #[error(
        "{path}: the checkpoint is a different model: `{field}` is {there} in its config.json, {here} in the run's [model]"
    )]
    ModelMismatch {
        /// The checkpoint's `config.json`.
        path: PathBuf,
        /// The first differing `ModelConfig` field.
        field: String,
        /// Its value in the checkpoint (JSON).
        there: String,
        /// Its value in the expected config (JSON).
        here: String,
    },
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

/// The file name of a checkpoint that fits one shard.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// transformers' default `max_shard_size` for `save_pretrained` ("50GB" in 5.x), in bytes.
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 50_000_000_000;

/// The name of shard `index` (0-based) of `count`, as transformers names it:
/// `model-00001-of-00003.safetensors`.
pub fn shard_file_name(index: usize, count: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", index + 1, count)
}

/// Parses a shard size as transformers does: a number of bytes (`"1000000"`), or a number
/// with a unit, decimal (`KB`, `MB`, `GB`, `TB`: powers of 1000) or binary (`KiB`, `MiB`,
/// `GiB`, `TiB`: powers of 1024), case-insensitive (`"5GB"`, `"500MB"`, `"10KiB"`). The
/// error says what is accepted.
pub fn parse_shard_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let upper = trimmed.to_ascii_uppercase();
    let units: [(&str, u64); 9] = [
        ("TIB", 1 << 40),
        ("GIB", 1 << 30),
        ("MIB", 1 << 20),
        ("KIB", 1 << 10),
        ("TB", 1_000_000_000_000),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("KB", 1_000),
        ("B", 1),
    ];
    let (number, factor) = units
        .iter()
        .find_map(|(unit, factor)| upper.strip_suffix(unit).map(|n| (n.trim(), *factor)))
        .unwrap_or((upper.as_str(), 1));
    let bad = || {
        format!(
            "{text:?} is not a size: give bytes (\"1000000\") or a number with KB, MB, GB, KiB, MiB or GiB"
        )
    };
    let value: f64 = number.parse().map_err(|_| bad())?;
    let bytes = value * factor as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("{text:?}: a shard size must be at least 1 byte"));
    }
    Ok(bytes as u64)
}

/// Writes `config.json` and the weights into `dir` (created if needed), in shards of at
/// most [`DEFAULT_MAX_SHARD_SIZE`] bytes ([`save_hf_sharded`]).
pub fn save_hf(
    dir: &Path,
    config: &ModelConfig,
    tensors: &[NamedTensor<'_>],
    dtype: WeightDtype,
) -> Result<(), CheckpointError> {
    save_hf_sharded(dir, config, tensors, dtype, DEFAULT_MAX_SHARD_SIZE).map(|_| ())
}

/// How one stored tensor is made from a [`NamedTensor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stored {
    F32,
    Bf16,
    Fp8Codes,
    Fp8Scales,
}

/// One tensor of the files to write: its stored name, dtype, shape, size and source.
struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: u64,
    source: usize,
    stored: Stored,
}

/// Writes `config.json` and the weights into `dir` (created if needed): one
/// `model.safetensors` when they fit `max_shard_size` bytes, else
/// `model-0000i-of-0000N.safetensors` shards and `model.safetensors.index.json`, split in
/// name order as `save_pretrained` splits. Under [`WeightDtype::Fp8`] the quantized weights
/// get their `{name}_scale_inv` tensors and `config.json` DeepSeek's
/// `quantization_config`. Returns the weights files written, in order. Memory beyond the
/// inputs: one shard's bytes.
pub fn save_hf_sharded(
    dir: &Path,
    config: &ModelConfig,
    tensors: &[NamedTensor<'_>],
    dtype: WeightDtype,
    max_shard_size: u64,
) -> Result<Vec<PathBuf>, CheckpointError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| CheckpointError::Io { path, error }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    for (source, t) in tensors.iter().enumerate() {
        let bad = |detail: String| CheckpointError::Tensor {
            path: dir.to_path_buf(),
            tensor: t.name.to_string(),
            detail,
        };
        let n = t.shape.iter().product::<usize>();
        if n != t.data.len() {
            return Err(bad(format!("shape {:?} does not match its {} values", t.shape, t.data.len())));
        }
        let entry = |name: String, dtype: Dtype, shape: Vec<usize>, bytes: usize, stored: Stored| Entry {
            name,
            dtype,
            shape,
            bytes: bytes as u64,
            source,
            stored,
        };
        let mut new = Vec::with_capacity(2);
        match dtype {
            WeightDtype::F32 => {
                new.push(entry(t.name.into(), Dtype::F32, t.shape.to_vec(), 4 * n, Stored::F32))
            }
            WeightDtype::Fp8 if is_fp8_weight(t.name, t.shape) => {
                let (sr, sc) = (t.shape[0].div_ceil(128), t.shape[1].div_ceil(128));
                new.push(entry(t.name.into(), Dtype::F8_E4M3, t.shape.to_vec(), n, Stored::Fp8Codes));
                new.push(entry(
                    format!("{}_scale_inv", t.name),
                    Dtype::F32,
                    vec![sr, sc],
                    4 * sr * sc,
                    Stored::Fp8Scales,
                ));
            }
            WeightDtype::Bf16 | WeightDtype::Fp8 => {
                new.push(entry(t.name.into(), Dtype::BF16, t.shape.to_vec(), 2 * n, Stored::Bf16))
            }
        }
        for e in new {
            if entries.contains_key(&e.name) {
                return Err(CheckpointError::Tensor {
                    path: dir.to_path_buf(),
                    tensor: e.name,
                    detail: "written twice".into(),
                });
            }
            entries.insert(e.name.clone(), e);
        }
    }
    // transformers' split: in order, a tensor starts a new shard when it would take the
    // current one past the limit; one larger than the limit gets a shard of its own.
    let mut shards: Vec<Vec<&Entry>> = Vec::new();
    let mut current: Vec<&Entry> = Vec::new();
    let mut current_size = 0u64;
    for e in entries.values() {
        if e.bytes > max_shard_size {
            shards.push(vec![e]);
            continue;
        }
        if current_size + e.bytes > max_shard_size && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(e);
        current_size += e.bytes;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }

    remove_earlier_weights(dir)?;
    let count = shards.len();
    let mut written = Vec::with_capacity(count);
    let mut weight_map = BTreeMap::new();
    let mut quantized: Option<(usize, Fp8Matrix)> = None;
    for (i, shard) in shards.iter().enumerate() {
        let file = if count == 1 { WEIGHTS_FILE.to_string() } else { shard_file_name(i, count) };
        let path = dir.join(&file);
        let mut raw: Vec<(&str, Dtype, &[usize], Vec<u8>)> = Vec::with_capacity(shard.len());
        for e in shard {
            let t = &tensors[e.source];
            let bytes = match e.stored {
                Stored::F32 => t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Stored::Bf16 => t.data.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
                Stored::Fp8Codes | Stored::Fp8Scales => {
                    if quantized.as_ref().is_none_or(|(s, _)| *s != e.source) {
                        let q = quantize(
                            t.data,
                            t.shape[0],
                            t.shape[1],
                            Granularity::Block128x128,
                            &QuantConfig::default(),
                        )
                        .map_err(|err| CheckpointError::Tensor {
                            path: path.clone(),
                            tensor: t.name.to_string(),
                            detail: format!("cannot be quantized to FP8: {err}"),
                        })?;
                        quantized = Some((e.source, q));
                    }
                    let (_, q) = quantized.as_ref().expect("just quantized");
                    if e.stored == Stored::Fp8Codes {
                        q.codes.clone()
                    } else {
                        q.scales.iter().flat_map(|s| s.to_le_bytes()).collect()
                    }
                }
            };
            raw.push((&e.name, e.dtype, &e.shape, bytes));
            weight_map.insert(e.name.clone(), file.clone());
        }
        let views: Vec<(&str, TensorView<'_>)> = raw
            .iter()
            .map(|(name, dt, shape, bytes)| {
                TensorView::new(*dt, shape.to_vec(), bytes).map(|v| (*name, v)).map_err(|err| {
                    CheckpointError::Tensor {
                        path: path.clone(),
                        tensor: name.to_string(),
                        detail: err.to_string(),
                    }
                })
            })
            .collect::<Result<_, _>>()?;
        let metadata = [("format".to_string(), "pt".to_string())].into_iter().collect();
        safetensors::serialize_to_file(views, Some(metadata), &path).map_err(|err| {
            CheckpointError::Format { path: path.clone(), what: "safetensors file", detail: err.to_string() }
        })?;
        written.push(path);
    }
    if count > 1 {
        let total_size: u64 = entries.values().map(|e| e.bytes).sum();
        let total_parameters: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
        let index = serde_json::json!({
            "metadata": { "total_parameters": total_parameters, "total_size": total_size },
            "weight_map": weight_map,
        });
        let path = dir.join(INDEX_FILE);
        let text = serde_json::to_string_pretty(&index).expect("a JSON value always serializes");
        std::fs::write(&path, text + "\n").map_err(io(&path))?;
    }

    let config_path = dir.join("config.json");
    let mut json = config.to_hf_json();
    if dtype == WeightDtype::Fp8 {
        let mut value: serde_json::Value = serde_json::from_str(&json).expect("to_hf_json writes JSON");
        if let serde_json::Value::Object(map) = &mut value {
            map.insert("quantization_config".into(), fp8_quantization_config());
        }
        json = serde_json::to_string_pretty(&value).expect("a JSON value always serializes");
    }
    std::fs::write(&config_path, json).map_err(io(&config_path))?;
    Ok(written)
}

/// Whether `name` is a weights file a save writes: `model.safetensors` or a shard
/// `model-0000i-of-0000N.safetensors` (which a later save replaces).
pub fn is_weights_file_name(name: &str) -> bool {
    name == WEIGHTS_FILE
        || name
            .strip_prefix("model-")
            .and_then(|n| n.strip_suffix(".safetensors"))
            .and_then(|n| n.split_once("-of-"))
            .is_some_and(|(i, n)| {
                [i, n].iter().all(|d| d.len() >= 5 && d.bytes().all(|b| b.is_ascii_digit()))
            })
}

/// Removes the weights files an earlier save left in `dir`: `model.safetensors`, its
/// shards `model-*-of-*.safetensors` and the index.
fn remove_earlier_weights(dir: &Path) -> Result<(), CheckpointError> {
    let entries =
        std::fs::read_dir(dir).map_err(|error| CheckpointError::Io { path: dir.to_path_buf(), error })?;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_weights_file_name(&name) || name == INDEX_FILE {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|error| CheckpointError::Io { path, error })?;
        }
    }
    Ok(())
}

/// One tensor of an opened checkpoint: where its bytes are and what they are.
#[derive(Clone, Debug)]
struct TensorInfo {
    /// Index into [`HfReader::files`].
    file: usize,
    /// The dtype as the header spells it (`F32`, `BF16`, `F8_E4M3`, …).
    dtype: String,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// One memory-mapped safetensors file.
struct MappedFile {
    path: PathBuf,
    map: Mmap,
}

/// Bytes per element of the dtypes safetensors knows (`None`: sub-byte or unknown).
fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// A checkpoint directory opened for reading tensors on demand (see the module docs):
/// `config.json` parsed, every weights file mapped and its header checked, nothing decoded.
pub struct HfReader {
    dir: PathBuf,
    config: ModelConfig,
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, TensorInfo>,
    decoded: AtomicU64,
}

impl std::fmt::Debug for HfReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfReader")
            .field("dir", &self.dir)
            .field("files", &self.files.iter().map(|m| &m.path).collect::<Vec<_>>())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl HfReader {
    /// Opens `dir`: its `config.json`, and its index and the files it names, or without an
    /// index every `*.safetensors` file in it.
    pub fn open(dir: &Path) -> Result<HfReader, CheckpointError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|error| CheckpointError::Io { path: config_path.clone(), error })?;
        let config = ModelConfig::from_hf_json(&text)
            .map_err(|error| CheckpointError::Config { path: config_path.clone(), error })?
            .config;
        let index_path = dir.join(INDEX_FILE);
        let index = if index_path.exists() { Some(read_index(&index_path)?) } else { None };
        let file_names: Vec<PathBuf> = match &index {
            Some(map) => {
                let mut names: Vec<&String> = map.values().collect();
                names.sort();
                names.dedup();
                names.into_iter().map(|n| dir.join(n)).collect()
            }
            None => {
                let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                    .map_err(|error| CheckpointError::Io { path: dir.to_path_buf(), error })?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                    .collect();
                files.sort();
                files
            }
        };
        if file_names.is_empty() {
            return Err(CheckpointError::NoWeights(dir.to_path_buf()));
        }
        let mut files = Vec::with_capacity(file_names.len());
        let mut tensors: BTreeMap<String, TensorInfo> = BTreeMap::new();
        for path in file_names {
            if index.is_some() && !path.is_file() {
                return Err(CheckpointError::Format {
                    path: index_path.clone(),
                    what: "index",
                    detail: format!("its weight_map names {}, which does not exist", path.display()),
                });
            }
            let file = std::fs::File::open(&path)
                .map_err(|error| CheckpointError::Io { path: path.clone(), error })?;
            // SAFETY: the map is read-only; like every reader of memory-mapped checkpoints
            // (safetensors' own), it relies on no one truncating or rewriting the file
            // while it is open.
            let map = unsafe { Mmap::map(&file) }
                .map_err(|error| CheckpointError::Io { path: path.clone(), error })?;
            let number = files.len();
            for (name, info) in parse_header(&path, &map, number)? {
                if let Some(other) = tensors.get(&name) {
                    return Err(CheckpointError::Tensor {
                        path,
                        tensor: name,
                        detail: format!(
                            "also in {}: a tensor must be in one file only",
                            files_path(&files, other.file).display()
                        ),
                    });
                }
                tensors.insert(name, info);
            }
            files.push(MappedFile { path, map });
        }
        if let Some(map) = &index {
            for (name, file) in map {
                let expected = dir.join(file);
                match tensors.get(name) {
                    None => {
                        return Err(CheckpointError::Tensor {
                            path: expected,
                            tensor: name.clone(),
                            detail: format!(
                                "{} maps it to this file, which does not hold it",
                                index_path.display()
                            ),
                        });
                    }
                    Some(info) if files[info.file].path != expected => {
                        return Err(CheckpointError::Tensor {
                            path: files[info.file].path.clone(),
                            tensor: name.clone(),
                            detail: format!(
                                "{} maps it to {file}, but it is in this file",
                                index_path.display()
                            ),
                        });
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(HfReader { dir: dir.to_path_buf(), config, files, tensors, decoded: AtomicU64::new(0) })
    }

    /// The model `config.json` describes.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The weights files opened, in order.
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }

    /// Every tensor's name (FP8 scales included), sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Whether the checkpoint has tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Tensor `name`'s shape, if the checkpoint has it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// The stored bytes of every tensor, as the index's `total_size` counts them.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|t| (t.end - t.start) as u64).sum()
    }

    /// Bytes of stored tensor data read by decoding so far (a weight's FP8 scales
    /// included): what the tensors asked for occupy in the files, nothing else.
    pub fn bytes_decoded(&self) -> u64 {
        self.decoded.load(Ordering::Relaxed)
    }

    /// Checks that tensor `name` can be decoded as `shape`: present, that shape, a readable
    /// dtype, and for FP8 its scales present, F32 and `[⌈rows/128⌉, ⌈cols/128⌉]`.
    pub fn check(&self, name: &str, shape: &[usize]) -> Result<(), CheckpointError> {
        self.plan(name, shape).map(|_| ())
    }

    /// Tensor `name`'s info and, for FP8, its scales' info, after [`HfReader::check`]'s checks.
    fn plan(
        &self,
        name: &str,
        shape: &[usize],
    ) -> Result<(&TensorInfo, Option<&TensorInfo>), CheckpointError> {
        let info = self.tensors.get(name).ok_or_else(|| CheckpointError::Tensor {
            path: self.dir.clone(),
            tensor: name.to_string(),
            detail: "missing from the checkpoint".into(),
        })?;
        let path = &self.files[info.file].path;
        let bad =
            |detail: String| CheckpointError::Tensor { path: path.clone(), tensor: name.to_string(), detail };
        if info.shape != shape {
            return Err(bad(format!(
                "has shape {:?} in the checkpoint, the model needs {shape:?}",
                info.shape
            )));
        }
        match info.dtype.as_str() {
            "F32" | "BF16" | "F16" => Ok((info, None)),
            "F8_E4M3" => {
                let scale_name = format!("{name}_scale_inv");
                let [rows, cols] = shape[..] else {
                    return Err(bad(format!("FP8 weights must be 2-D, got shape {shape:?}")));
                };
                let scales = self.tensors.get(&scale_name).ok_or_else(|| {
                    bad(format!("is F8_E4M3 but `{scale_name}` (its block scales) is missing"))
                })?;
                let expected = [rows.div_ceil(128), cols.div_ceil(128)];
                if scales.dtype != "F32" || scales.shape[..] != expected {
                    return Err(CheckpointError::Tensor {
                        path: self.files[scales.file].path.clone(),
                        tensor: scale_name,
                        detail: format!(
                            "must be F32 of shape {expected:?} (one scale per 128×128 block of `{name}` {shape:?}), got {} {:?}",
                            scales.dtype, scales.shape
                        ),
                    });
                }
                Ok((info, Some(scales)))
            }
            other => Err(bad(format!(
                "dtype {other} is not supported (F32, BF16, F16, or F8_E4M3 with `{name}_scale_inv`)"
            ))),
        }
    }

    /// Decodes tensor `name` of `shape` into `out` (`shape.product()` values), after the
    /// checks of [`HfReader::check`].
    pub fn decode_into(&self, name: &str, shape: &[usize], out: &mut [f32]) -> Result<(), CheckpointError> {
        let (info, scales) = self.plan(name, shape)?;
        let n: usize = shape.iter().product();
        if out.len() != n {
            return Err(CheckpointError::Tensor {
                path: self.files[info.file].path.clone(),
                tensor: name.to_string(),
                detail: format!("the buffer holds {} values, the tensor {n}", out.len()),
            });
        }
        let data = &self.files[info.file].map[info.start..info.end];
        match info.dtype.as_str() {
            "F32" => {
                for (o, b) in out.iter_mut().zip(data.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            "BF16" => {
                for (o, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            "F16" => {
                for (o, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                    *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            _ => {
                let scales = scales.expect("plan gives FP8 weights their scales");
                let raw = &self.files[scales.file].map[scales.start..scales.end];
                let scale: Vec<f32> =
                    raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                let cols = shape[1];
                let blocks = cols.div_ceil(128);
                for (r, (row, codes)) in out.chunks_exact_mut(cols).zip(data.chunks_exact(cols)).enumerate() {
                    let row_scales = &scale[(r / 128) * blocks..(r / 128 + 1) * blocks];
                    for (c, (o, &code)) in row.iter_mut().zip(codes).enumerate() {
                        *o = E4M3_TO_F32[code as usize] * row_scales[c / 128];
                    }
                }
                self.decoded.fetch_add((scales.end - scales.start) as u64, Ordering::Relaxed);
                self.release(scales);
            }
        }
        self.decoded.fetch_add((info.end - info.start) as u64, Ordering::Relaxed);
        self.release(info);
        Ok(())
    }

    /// Drops the mapped pages of a decoded tensor from this process (`MADV_DONTNEED` on
    /// the read-only shared map: a later read faults them in again from the page cache),
    /// so that they stop counting towards its resident memory. Advice only: a refusal
    /// changes nothing but the memory figure.
    fn release(&self, info: &TensorInfo) {
        #[cfg(unix)]
        {
            let map = &self.files[info.file].map;
            // SAFETY: no reference into the range outlives `decode_into`, and the map is a
            // read-only file-backed shared mapping, so dropping its pages loses nothing.
            let _ = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    info.start,
                    info.end - info.start,
                )
            };
        }
        #[cfg(not(unix))]
        let _ = info;
    }

    /// Tensor `name` decoded to f32, whatever its shape.
    pub fn tensor(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), CheckpointError> {
        let shape = self
            .shape(name)
            .ok_or_else(|| CheckpointError::Tensor {
                path: self.dir.clone(),
                tensor: name.to_string(),
                detail: "missing from the checkpoint".into(),
            })?
            .to_vec();
        let mut values = vec![0.0; shape.iter().product()];
        self.decode_into(name, &shape, &mut values)?;
        Ok((shape, values))
    }

    /// Checks that the checkpoint's `config.json` describes `expected` (the run's model);
    /// the error names the first differing field with both values.
    pub fn check_model(&self, expected: &ModelConfig) -> Result<(), CheckpointError> {
        if self.config == *expected {
            return Ok(());
        }
        let (field, there, here) = crate::shard::first_difference(&self.config, expected)
            .unwrap_or_else(|| ("(config)".into(), "different".into(), "different".into()));
        Err(CheckpointError::ModelMismatch { path: self.dir.join("config.json"), field, there, here })
    }
}

fn files_path(files: &[MappedFile], index: usize) -> &Path {
    &files[index].path
}

/// `model.safetensors.index.json`'s `weight_map`.
fn read_index(path: &Path) -> Result<BTreeMap<String, String>, CheckpointError> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| CheckpointError::Io { path: path.to_path_buf(), error })?;
    let bad = |detail: String| CheckpointError::Format { path: path.to_path_buf(), what: "index", detail };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    map.iter()
        .map(|(name, file)| match file.as_str() {
            Some(f) if !f.is_empty() && !f.contains('/') && !f.contains('\\') => {
                Ok((name.clone(), f.to_string()))
            }
            _ => Err(bad(format!("weight_map[{name:?}] is {file}, not a file name in the directory"))),
        })
        .collect()
}

/// Parses a safetensors header: `[u64 n][n bytes of JSON]`, then the data; every tensor's
/// `data_offsets` are relative to the data's start and must lie inside the file.
fn parse_header(
    path: &Path,
    bytes: &[u8],
    file: usize,
) -> Result<Vec<(String, TensorInfo)>, CheckpointError> {
    let bad = |detail: String| CheckpointError::Format {
        path: path.to_path_buf(),
        what: "safetensors file",
        detail,
    };
    let len = bytes.len();
    if len < 8 {
        return Err(bad(format!("{len} bytes: shorter than the 8-byte header length")));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let header_end =
        usize::try_from(n).ok().and_then(|n| n.checked_add(8)).filter(|&e| e <= len).ok_or_else(|| {
            bad(format!(
                "the header is {n} bytes long but the file has {len} bytes: truncated or not safetensors"
            ))
        })?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..header_end]).map_err(|e| bad(format!("header: {e}")))?;
    let mut out = Vec::with_capacity(header.len());
    for (name, entry) in header {
        if name == "__metadata__" {
            continue;
        }
        let tensor_bad = |detail: String| CheckpointError::Tensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            detail,
        };
        let dtype = entry
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| tensor_bad("no `dtype` in the header".into()))?;
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect())
            .ok_or_else(|| tensor_bad("no valid `shape` in the header".into()))?;
        let offsets: Vec<usize> = entry
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect())
            .filter(|o: &Vec<usize>| o.len() == 2 && o[0] <= o[1])
            .ok_or_else(|| tensor_bad("no valid `data_offsets` [begin, end] in the header".into()))?;
        let (start, end) = (header_end.saturating_add(offsets[0]), header_end.saturating_add(offsets[1]));
        if end > len {
            return Err(tensor_bad(format!(
                "its data ends at byte {end} but the file has {len} bytes: the file is truncated"
            )));
        }
        if let Some(size) = dtype_size(dtype) {
            let expected = shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d));
            if expected != Some(end - start) {
                return Err(tensor_bad(format!(
                    "{dtype} {shape:?} needs {} bytes, its data_offsets span {}",
                    expected.map_or_else(|| "too many".to_string(), |e| e.to_string()),
                    end - start
                )));
            }
        }
        out.push((name, TensorInfo { file, dtype: dtype.to_string(), shape, start, end }));
    }
    Ok(out)
}

/// A checkpoint directory's configuration and tensors, dequantized to f32.
#[derive(Clone, Debug, PartialEq)]
pub struct HfCheckpoint {
    /// The directory it was read from.
    pub dir: PathBuf,
    /// From `config.json`.
    pub config: ModelConfig,
    /// Every weight by HF name (FP8 scale tensors folded into their weights).
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

/// Reads `config.json` and every tensor of `dir` ([`HfReader::open`]), decoded to f32: the
/// whole checkpoint in memory. A caller that loads a model should use [`HfReader`] and
/// [`fill_from_reader`], which decode only what it holds.
pub fn load_hf(dir: &Path) -> Result<HfCheckpoint, CheckpointError> {
    let reader = HfReader::open(dir)?;
    let mut tensors = BTreeMap::new();
    for name in reader.names() {
        if name.ends_with("_scale_inv")
            && reader.tensors.get(name.trim_end_matches("_scale_inv")).is_some_and(|w| w.dtype == "F8_E4M3")
        {
            continue;
        }
        tensors.insert(name.to_string(), reader.tensor(name)?);
    }
    Ok(HfCheckpoint { dir: reader.dir.clone(), config: reader.config.clone(), tensors })
}

/// Copies the checkpoint's tensors into `params` by name, after checking that every one
/// exists with the parameter's shape (nothing is written otherwise).
pub fn fill_params(params: &mut [&mut Param<f32>], checkpoint: &HfCheckpoint) -> Result<(), CheckpointError> {
    let bad = |tensor: &str, detail: String| CheckpointError::Tensor {
        path: checkpoint.dir.clone(),
        tensor: tensor.to_string(),
        detail,
    };
    for p in params.iter() {
        let (shape, _) = checkpoint
            .tensors
            .get(&p.name)
            .ok_or_else(|| bad(&p.name, "missing from the checkpoint".into()))?;
        if *shape != p.shape {
            return Err(bad(
                &p.name,
                format!("has shape {shape:?} in the checkpoint, the model needs {:?}", p.shape),
            ));
        }
    }
    for p in params.iter_mut() {
        p.value.host_mut().copy_from_slice(&checkpoint.tensors[&p.name].1);
    }
    Ok(())
}

/// What [`fill_from_reader`] does with the MTP modules' tensors (`model.layers.{L+k}.*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtpPolicy {
    /// They must be in the checkpoint, like every other tensor.
    Require,
    /// Loaded when the checkpoint has them; left as the model initialized them (from the
    /// run's seed) when it has none of them (as transformers saves). Some but not all is an
    /// error: an MTP module is loaded whole or initialized whole.
    SeedIfAbsent,
}

/// What [`fill_from_reader`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FillReport {
    /// The parameters loaded from the checkpoint.
    pub loaded: usize,
    /// The parameters left at their initialization (the MTP modules' when the checkpoint
    /// has none), by name.
    pub seeded: Vec<String>,
}

/// The MTP layer index of tensor `name` (`model.layers.{i}.…` with `i ≥ num_hidden_layers`).
pub fn mtp_layer(name: &str, num_hidden_layers: usize) -> Option<usize> {
    let rest = name.strip_prefix("model.layers.")?;
    let layer: usize = rest.split('.').next()?.parse().ok()?;
    (layer >= num_hidden_layers).then_some(layer)
}

/// Fills `params` (the tensors the caller holds: a whole model or one rank's part) from
/// `reader` by name: every tensor is checked first (present, shape, dtype, scales), then
/// each is decoded straight into its parameter, one at a time. MTP tensors follow
/// `mtp`. All or nothing: on an error no parameter has changed.
pub fn fill_from_reader(
    reader: &HfReader,
    params: &mut [&mut Param<f32>],
    mtp: MtpPolicy,
) -> Result<FillReport, CheckpointError> {
    let layers = reader.config.num_hidden_layers;
    let is_mtp: Vec<bool> = params.iter().map(|p| mtp_layer(&p.name, layers).is_some()).collect();
    let mtp_total = is_mtp.iter().filter(|&&m| m).count();
    let mtp_present = params.iter().zip(&is_mtp).filter(|(p, m)| **m && reader.contains(&p.name)).count();
    let seed_mtp = match mtp {
        MtpPolicy::Require => false,
        MtpPolicy::SeedIfAbsent if mtp_present == 0 => true,
        MtpPolicy::SeedIfAbsent if mtp_present == mtp_total => false,
        MtpPolicy::SeedIfAbsent => {
            let missing = params
                .iter()
                .zip(&is_mtp)
                .find(|(p, m)| **m && !reader.contains(&p.name))
                .map(|(p, _)| p.name.clone())
                .expect("some MTP tensor is missing");
            return Err(CheckpointError::Tensor {
                path: reader.dir.clone(),
                tensor: missing,
                detail: format!(
                    "missing, while the checkpoint has {mtp_present} of the {mtp_total} MTP tensors asked for: an MTP module is loaded whole or initialized whole"
                ),
            });
        }
    };
    for (p, &m) in params.iter().zip(&is_mtp) {
        if !(m && seed_mtp) {
            reader.check(&p.name, &p.shape)?;
        }
    }
    let mut report = FillReport::default();
    for (p, &m) in params.iter_mut().zip(&is_mtp) {
        if m && seed_mtp {
            report.seeded.push(p.name.clone());
            continue;
        }
        let (name, shape) = (p.name.clone(), p.shape.clone());
        reader.decode_into(&name, &shape, p.value.host_mut())?;
        report.loaded += 1;
    }
    Ok(report)
}
