//! Layout-free checkpoint shards: the training state a worker writes so that a job can
//! resume — under the same parallel layout or another one.
//!
//! Each worker of a job writes one **shard** of a checkpoint: the FP32 master values of
//! the parameters it owns (the MoE selection biases `…e_score_correction_bias` included,
//! though no optimizer updates them) and, for the trainable ones, AdamW's BF16 moments
//! (`exp_avg` = m, `exp_avg_sq` = v). Tensors are named by their global Hugging Face names,
//! never by rank, stage or expert slot, so a checkpoint written under one layout can be
//! read under any other. Under ZeRO-1 a rank owns only a contiguous element range of a
//! tensor, so a shard holds **pieces**: (tensor name, [`PieceKind`], start element, data)
//! of the row-major flattened tensor.
//!
//! ## File format (`flotilla-shard/1`)
//!
//! One safetensors file per rank, `shard-{rank:05}-of-{world:05}.safetensors`, in the
//! checkpoint's step directory (`step-{step:08}`, [`step_dir`]):
//!
//! | piece | key | dtype | shape |
//! | --- | --- | --- | --- |
//! | whole tensor, value | `{name}` | F32 | the tensor's |
//! | whole tensor, moments | `{name}.exp_avg`, `{name}.exp_avg_sq` | BF16 | the tensor's |
//! | elements `start..start+n` | `{name}@{start}`, `{name}.exp_avg@{start}`, `{name}.exp_avg_sq@{start}` | as above | `[n]` |
//!
//! The safetensors `__metadata__` holds `format` = [`SHARD_FORMAT`], `step`, `rank`,
//! `world`, `seed` (decimal strings), `model` (the [`ModelConfig`] as JSON) and `shapes`: a
//! JSON object from every tensor with a piece in the file to its whole shape, so a partial
//! piece knows the tensor it belongs to.
//!
//! The file's length and CRC-32 (IEEE, `crc32fast`) are returned by [`write_shard`] as a
//! [`ShardFile`]; whoever commits the checkpoint records them in its manifest, and
//! [`CheckpointReader::open`] refuses a file whose length or checksum differ.
//!
//! ## Invariants
//!
//! - [`write_shard`] writes nothing unless the snapshot is valid (every piece inside its
//!   tensor, its data type that of its kind, no (name, kind, start) twice, one shape per
//!   tensor), and a file appears under its final name only complete and fsynced
//!   (written to `{file}.tmp`, fsynced, renamed, the directory fsynced).
//! - [`CheckpointReader::open`] accepts only files whose size and checksum match, which
//!   parse, carry this format and agree on step, world, seed and model.
//! - [`CheckpointReader::values`] and [`CheckpointReader::moments`] return a tensor only
//!   when its pieces, across all shards, cover every element exactly once; otherwise the
//!   error names the tensor and the element range at fault.
//! - Every error names the file and/or the tensor at fault.

use crate::config::{ConfigError, ModelConfig};
use half::bf16;
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The `format` metadata value of a shard file.
pub const SHARD_FORMAT: &str = "flotilla-shard/1";

/// What a piece holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PieceKind {
    /// The FP32 master value.
    Value,
    /// AdamW's first moment m (BF16).
    ExpAvg,
    /// AdamW's second moment v (BF16).
    ExpAvgSq,
}

impl PieceKind {
    /// What a piece of this kind adds to its tensor's name in a shard's keys.
    pub fn suffix(self) -> &'static str {
        match self {
            PieceKind::Value => "",
            PieceKind::ExpAvg => ".exp_avg",
            PieceKind::ExpAvgSq => ".exp_avg_sq",
        }
    }

    fn dtype(self) -> Dtype {
        match self {
            PieceKind::Value => Dtype::F32,
            PieceKind::ExpAvg | PieceKind::ExpAvgSq => Dtype::BF16,
        }
    }
}

impl fmt::Display for PieceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PieceKind::Value => "value",
            PieceKind::ExpAvg => "exp_avg",
            PieceKind::ExpAvgSq => "exp_avg_sq",
        })
    }
}

/// A piece's elements: f32 for values, BF16 for the moments.
#[derive(Clone, Debug, PartialEq)]
pub enum PieceData {
    /// Values.
    F32(Vec<f32>),
    /// Moments.
    Bf16(Vec<bf16>),
}

impl PieceData {
    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            PieceData::F32(v) => v.len(),
            PieceData::Bf16(v) => v.len(),
        }
    }

    /// Whether the piece holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn dtype(&self) -> Dtype {
        match self {
            PieceData::F32(_) => Dtype::F32,
            PieceData::Bf16(_) => Dtype::BF16,
        }
    }

    fn f32s(&self) -> Option<&[f32]> {
        match self {
            PieceData::F32(v) => Some(v),
            PieceData::Bf16(_) => None,
        }
    }

    fn bf16s(&self) -> Option<&[bf16]> {
        match self {
            PieceData::Bf16(v) => Some(v),
            PieceData::F32(_) => None,
        }
    }
}

/// Elements `start..start + data.len()` of the flattened tensor `name`.
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    /// The tensor's HF name.
    pub name: String,
    /// Value or moment.
    pub kind: PieceKind,
    /// The first element, in the row-major flattened tensor.
    pub start: usize,
    /// The whole tensor's shape.
    pub shape: Vec<usize>,
    /// The elements.
    pub data: PieceData,
}

impl Piece {
    /// The whole f32 value of `param`, as one piece.
    pub fn value_of(param: &crate::param::Param<f32>) -> Piece {
        Piece {
            name: param.name.clone(),
            kind: PieceKind::Value,
            start: 0,
            shape: param.shape.clone(),
            data: PieceData::F32(param.value.to_host_vec()),
        }
    }
}

/// What every shard of a checkpoint records about the run.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardHeader {
    /// Optimizer steps taken when the state was captured.
    pub step: u64,
    /// The rank that wrote the shard.
    pub rank: u32,
    /// Ranks writing shards of this checkpoint.
    pub world: u32,
    /// The run's seed (initialization and data).
    pub seed: u64,
    /// The model.
    pub model: ModelConfig,
}

/// One rank's state, ready to be written as a shard.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The run and the rank.
    pub header: ShardHeader,
    /// The pieces this rank owns.
    pub pieces: Vec<Piece>,
}

/// A written shard as a manifest records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardFile {
    /// The file name inside the step directory.
    pub file: String,
    /// Its length.
    pub bytes: u64,
    /// CRC-32 (IEEE, `crc32fast`) of the whole file.
    pub crc32: u32,
}

/// What can go wrong writing or reading checkpoint shards.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// A file or directory could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A shard's length differs from its manifest's.
    #[error(
        "{file} in {}: the file has {actual} bytes, the manifest says {expected} (truncated or overwritten)",
        dir.display()
    )]
    Size {
        /// The shard file.
        file: String,
        /// The checkpoint directory.
        dir: PathBuf,
        /// From the manifest.
        expected: u64,
        /// On disk.
        actual: u64,
    },
    /// A shard's CRC-32 differs from its manifest's.
    #[error(
        "{file} in {}: checksum mismatch: the manifest says {expected:#010x}, the file has {actual:#010x}",
        dir.display()
    )]
    Checksum {
        /// The shard file.
        file: String,
        /// The checkpoint directory.
        dir: PathBuf,
        /// From the manifest.
        expected: u32,
        /// Of the bytes on disk.
        actual: u32,
    },
    /// A shard does not parse or is not a `flotilla-shard/1` file.
    #[error("{file} in {}: not a valid {SHARD_FORMAT} checkpoint shard: {detail}", dir.display())]
    Format {
        /// The shard file.
        file: String,
        /// The checkpoint directory.
        dir: PathBuf,
        /// What is wrong, naming the tensor or metadata key.
        detail: String,
    },
    /// Two shards of one checkpoint disagree about the run.
    #[error("the shards disagree on `{field}`: {first} says {first_value}, {second} says {second_value}")]
    Disagree {
        /// `step`, `world`, `seed`, `model`, `rank` or a tensor's shape.
        field: String,
        /// One file.
        first: String,
        /// Its value.
        first_value: String,
        /// The other file.
        second: String,
        /// Its value.
        second_value: String,
    },
    /// A snapshot's piece is inconsistent (nothing was written).
    #[error("tensor `{tensor}`: {detail}")]
    Piece {
        /// The tensor.
        tensor: String,
        /// What is wrong.
        detail: String,
    },
    /// A snapshot's header is inconsistent, or cannot be encoded (nothing was written).
    #[error("invalid shard header: {0}")]
    Header(String),
    /// No shard has a piece of the tensor.
    #[error("tensor `{tensor}` is not in the checkpoint")]
    NotInCheckpoint {
        /// The tensor.
        tensor: String,
    },
    /// A tensor's pieces do not cover it exactly once.
    #[error("tensor `{tensor}` ({kind}): {detail}")]
    Coverage {
        /// The tensor.
        tensor: String,
        /// Which of its pieces.
        kind: PieceKind,
        /// The element range at fault, and the files involved.
        detail: String,
    },
    /// The checkpoint was written for another model.
    #[error("the checkpoint was saved from a different model: `{field}` is {there} there, {here} here")]
    ModelMismatch {
        /// The first differing `ModelConfig` field.
        field: String,
        /// Its value in the checkpoint (JSON).
        there: String,
        /// Its value in the expected config (JSON).
        here: String,
    },
    /// `open` was given no file.
    #[error("a checkpoint needs at least one shard")]
    NoShards,
}

/// The directory of the checkpoint taken after `step`: `root/step-{step:08}`.
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// The file name of `rank`'s shard among `world`: `shard-00003-of-00004.safetensors`.
pub fn shard_file_name(rank: u32, world: u32) -> String {
    format!("shard-{rank:05}-of-{world:05}.safetensors")
}

/// Where a snapshot's pieces go in its file.
struct Layout<'a> {
    /// Per piece, its key and safetensors shape.
    keys: Vec<(String, Vec<usize>)>,
    /// The `shapes` metadata: every tensor's whole shape.
    shapes: BTreeMap<&'a str, &'a [usize]>,
}

/// Checks `snapshot` and lays out its pieces.
fn layout(snapshot: &Snapshot) -> Result<Layout<'_>, ShardError> {
    let mut shapes: BTreeMap<&str, &[usize]> = BTreeMap::new();
    let mut seen: HashSet<(&str, PieceKind, usize)> = HashSet::new();
    let mut used: HashSet<String> = HashSet::new();
    let mut keys = Vec::with_capacity(snapshot.pieces.len());
    for piece in &snapshot.pieces {
        let bad = |detail: String| ShardError::Piece { tensor: piece.name.clone(), detail };
        if piece.name.is_empty() || piece.name.contains('@') {
            return Err(bad("a tensor name must be non-empty and must not contain `@`".into()));
        }
        if piece.data.dtype() != piece.kind.dtype() {
            return Err(bad(format!(
                "a {} piece must hold {:?} data, got {:?}",
                piece.kind,
                piece.kind.dtype(),
                piece.data.dtype()
            )));
        }
        let elements = piece
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {:?} has too many elements", piece.shape)))?;
        let len = piece.data.len();
        let end = piece.start.checked_add(len).filter(|&end| end <= elements).ok_or_else(|| {
            bad(format!(
                "the {} piece of elements {}..{} lies outside the tensor's {elements} elements (shape {:?})",
                piece.kind,
                piece.start,
                piece.start.saturating_add(len),
                piece.shape
            ))
        })?;
        match shapes.get(piece.name.as_str()) {
            Some(&shape) if shape != piece.shape.as_slice() => {
                return Err(bad(format!("pieces give two shapes, {shape:?} and {:?}", piece.shape)));
            }
            Some(_) => {}
            None => {
                shapes.insert(&piece.name, &piece.shape);
            }
        }
        if !seen.insert((&piece.name, piece.kind, piece.start)) {
            return Err(bad(format!("two {} pieces start at element {}", piece.kind, piece.start)));
        }
        let whole = piece.start == 0 && end == elements;
        let (key, shape) = if whole {
            (format!("{}{}", piece.name, piece.kind.suffix()), piece.shape.clone())
        } else {
            (format!("{}{}@{}", piece.name, piece.kind.suffix(), piece.start), vec![len])
        };
        if !used.insert(key.clone()) {
            return Err(bad(format!("its {} piece's key `{key}` is another piece's", piece.kind)));
        }
        keys.push((key, shape));
    }
    Ok(Layout { keys, shapes })
}

/// The safetensors header of `snapshot`'s file, and the order its pieces' data follows it:
/// tensors in key order, data laid out in that order. serde_json's maps are ordered, so
/// the same snapshot gives the same bytes (a step written again matches its checksum).
fn header(snapshot: &Snapshot) -> Result<(Vec<u8>, Vec<usize>), ShardError> {
    let Layout { keys, shapes } = layout(snapshot)?;
    let h = &snapshot.header;
    let json = |what: &str, r: serde_json::Result<String>| {
        r.map_err(|e| ShardError::Header(format!("cannot encode the {what}: {e}")))
    };
    let mut metadata = serde_json::Map::new();
    for (key, value) in [
        ("format", SHARD_FORMAT.to_string()),
        ("step", h.step.to_string()),
        ("rank", h.rank.to_string()),
        ("world", h.world.to_string()),
        ("seed", h.seed.to_string()),
        ("model", json("model config", serde_json::to_string(&h.model))?),
        ("shapes", json("shapes", serde_json::to_string(&shapes))?),
    ] {
        metadata.insert(key.into(), serde_json::Value::String(value));
    }
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by(|&a, &b| keys[a].0.cmp(&keys[b].0));
    let mut entries = serde_json::Map::new();
    entries.insert("__metadata__".into(), serde_json::Value::Object(metadata));
    let mut offset = 0usize;
    for &i in &order {
        let piece = &snapshot.pieces[i];
        let (dtype, width) = match piece.data {
            PieceData::F32(_) => ("F32", 4),
            PieceData::Bf16(_) => ("BF16", 2),
        };
        let end = offset + piece.data.len() * width;
        let entry = serde_json::json!({ "dtype": dtype, "shape": keys[i].1, "data_offsets": [offset, end] });
        entries.insert(keys[i].0.clone(), entry);
        offset = end;
    }
    let mut bytes = serde_json::to_vec(&serde_json::Value::Object(entries))
        .map_err(|e| ShardError::Header(format!("cannot encode the header: {e}")))?;
    // The data starts 8-byte aligned, as safetensors' own writer arranges.
    while !bytes.len().is_multiple_of(8) {
        bytes.push(b' ');
    }
    Ok((bytes, order))
}

/// Writes a safetensors file for `snapshot` to `out`, streaming each piece's data through a
/// reusable buffer (one copy, no whole-file image in memory); returns the bytes written and
/// their CRC-32.
fn stream(snapshot: &Snapshot, out: &mut impl Write) -> Result<(u64, u32), std::io::Error> {
    const CHUNK: usize = 1 << 20;
    let (header, order) = header(snapshot).map_err(std::io::Error::other)?;
    let mut crc = crc32fast::Hasher::new();
    let mut written = 0u64;
    let mut emit = |bytes: &[u8], out: &mut dyn Write| -> std::io::Result<()> {
        crc.update(bytes);
        written += bytes.len() as u64;
        out.write_all(bytes)
    };
    emit(&(header.len() as u64).to_le_bytes(), out)?;
    emit(&header, out)?;
    let mut buffer = vec![0u8; 4 * CHUNK];
    for i in order {
        // Fixed-width copies into a sized buffer (the compiler turns them into plain
        // moves); an iterator of byte arrays would not be.
        match &snapshot.pieces[i].data {
            PieceData::F32(values) => {
                for chunk in values.chunks(CHUNK) {
                    let bytes = &mut buffer[..4 * chunk.len()];
                    for (dst, x) in bytes.chunks_exact_mut(4).zip(chunk) {
                        dst.copy_from_slice(&x.to_le_bytes());
                    }
                    emit(bytes, out)?;
                }
            }
            PieceData::Bf16(values) => {
                for chunk in values.chunks(CHUNK) {
                    let bytes = &mut buffer[..2 * chunk.len()];
                    for (dst, x) in bytes.chunks_exact_mut(2).zip(chunk) {
                        dst.copy_from_slice(&x.to_le_bytes());
                    }
                    emit(bytes, out)?;
                }
            }
        }
    }
    Ok((written, crc.finalize()))
}

/// Writes `snapshot` as `dir/shard-{rank}-of-{world}.safetensors` (creating `dir`):
/// validated, streamed to `{file}.tmp` (checksummed on the way), fsynced, renamed, and the
/// directory fsynced. Returns the file's name, length and CRC-32 for the manifest. The
/// bytes are a function of the snapshot.
pub fn write_shard(dir: &Path, snapshot: &Snapshot) -> Result<ShardFile, ShardError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| ShardError::Io { path, error }
    };
    if snapshot.header.world == 0 || snapshot.header.rank >= snapshot.header.world {
        return Err(ShardError::Header(format!(
            "rank {} is not below world {}",
            snapshot.header.rank, snapshot.header.world
        )));
    }
    // Refuse an invalid snapshot before touching the disk.
    layout(snapshot)?;
    let file = shard_file_name(snapshot.header.rank, snapshot.header.world);
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!("{file}.tmp"));
    let target = dir.join(&file);
    let written = (|| {
        // Unbuffered: `stream` already hands over megabyte chunks.
        let mut f = std::fs::File::create(&tmp)?;
        let (bytes, crc32) = stream(snapshot, &mut f)?;
        f.sync_all()?;
        Ok((bytes, crc32))
    })();
    let (bytes, crc32) = match written {
        Ok(done) => done,
        Err(error) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(ShardError::Io { path: tmp, error });
        }
    };
    if let Err(error) = std::fs::rename(&tmp, &target) {
        let _ = std::fs::remove_file(&tmp);
        return Err(ShardError::Io { path: target, error });
    }
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    Ok(ShardFile { file, bytes, crc32 })
}

/// One piece as read: where it starts, its elements and the file it came from.
#[derive(Clone, Debug)]
struct StoredPiece {
    start: usize,
    data: PieceData,
    file: String,
}

/// A tensor's pieces across all shards.
#[derive(Clone, Debug)]
struct StoredTensor {
    shape: Vec<usize>,
    /// The file that first gave the shape.
    shape_file: String,
    pieces: BTreeMap<PieceKind, Vec<StoredPiece>>,
}

/// One shard's header as read, with the model's JSON text as written.
struct ReadHeader {
    step: u64,
    rank: u32,
    world: u32,
    seed: u64,
    model: ModelConfig,
    model_json: String,
}

/// A committed checkpoint, every shard read, verified and decoded into memory.
#[derive(Clone, Debug)]
pub struct CheckpointReader {
    dir: PathBuf,
    step: u64,
    world: u32,
    seed: u64,
    model: ModelConfig,
    /// The model exactly as the first shard wrote it (compared as text before as values, so
    /// a float that JSON does not round-trip bit for bit never makes two configs differ).
    model_json: String,
    tensors: BTreeMap<String, StoredTensor>,
}

impl CheckpointReader {
    /// Reads, verifies and decodes every shard of the checkpoint in `dir`, as listed by its
    /// manifest: each file's length and CRC-32 must be the manifest's, it must parse as a
    /// [`SHARD_FORMAT`] file, and all shards must agree on step, world, seed and model (and
    /// a tensor's shape). Distinct files must come from distinct ranks.
    pub fn open(dir: &Path, files: &[ShardFile]) -> Result<CheckpointReader, ShardError> {
        let Some(first) = files.first() else {
            return Err(ShardError::NoShards);
        };
        let mut reader: Option<CheckpointReader> = None;
        let mut ranks: BTreeMap<u32, &str> = BTreeMap::new();
        for shard in files {
            let invalid = |detail: String| ShardError::Format {
                file: shard.file.clone(),
                dir: dir.to_path_buf(),
                detail,
            };
            if shard.file.is_empty()
                || shard.file == "."
                || shard.file == ".."
                || shard.file.contains(['/', '\\'])
            {
                return Err(invalid("a shard's file name must be a plain name inside the directory".into()));
            }
            let path = dir.join(&shard.file);
            let bytes = std::fs::read(&path).map_err(|error| ShardError::Io { path: path.clone(), error })?;
            if bytes.len() as u64 != shard.bytes {
                return Err(ShardError::Size {
                    file: shard.file.clone(),
                    dir: dir.to_path_buf(),
                    expected: shard.bytes,
                    actual: bytes.len() as u64,
                });
            }
            let crc = crc32fast::hash(&bytes);
            if crc != shard.crc32 {
                return Err(ShardError::Checksum {
                    file: shard.file.clone(),
                    dir: dir.to_path_buf(),
                    expected: shard.crc32,
                    actual: crc,
                });
            }
            let DecodedShard { header, shapes, pieces } = decode_shard(&bytes).map_err(invalid)?;
            if let Some(other) = ranks.insert(header.rank, &shard.file) {
                return Err(invalid(if other == shard.file {
                    "the manifest lists it twice".to_string()
                } else {
                    format!("it was written by rank {}, as was {other} (one shard per rank)", header.rank)
                }));
            }
            let reader = match &mut reader {
                Some(r) => {
                    r.agree(&first.file, &header, &shard.file)?;
                    r
                }
                None => reader.insert(CheckpointReader {
                    dir: dir.to_path_buf(),
                    step: header.step,
                    world: header.world,
                    seed: header.seed,
                    model: header.model,
                    model_json: header.model_json,
                    tensors: BTreeMap::new(),
                }),
            };
            for (name, shape) in shapes {
                match reader.tensors.get(&name) {
                    Some(t) if t.shape != shape => {
                        return Err(disagree(
                            &format!("shape of {name}"),
                            &t.shape_file,
                            format!("{:?}", t.shape),
                            &shard.file,
                            format!("{shape:?}"),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        reader.tensors.insert(
                            name,
                            StoredTensor { shape, shape_file: shard.file.clone(), pieces: BTreeMap::new() },
                        );
                    }
                }
            }
            for (name, kind, start, data) in pieces {
                let Some(tensor) = reader.tensors.get_mut(&name) else {
                    return Err(ShardError::Format {
                        file: shard.file.clone(),
                        dir: dir.to_path_buf(),
                        detail: format!("tensor `{name}` has a piece but no entry in `shapes`"),
                    });
                };
                tensor.pieces.entry(kind).or_default().push(StoredPiece {
                    start,
                    data,
                    file: shard.file.clone(),
                });
            }
        }
        reader.ok_or(ShardError::NoShards)
    }

    /// Checks that a later shard's header agrees with the first one's.
    fn agree(&self, first: &str, header: &ReadHeader, file: &str) -> Result<(), ShardError> {
        if header.step != self.step {
            return Err(disagree("step", first, self.step, file, header.step));
        }
        if header.world != self.world {
            return Err(disagree("world", first, self.world, file, header.world));
        }
        if header.seed != self.seed {
            return Err(disagree("seed", first, self.seed, file, header.seed));
        }
        if header.model_json != self.model_json && header.model != self.model {
            return Err(match first_difference(&self.model, &header.model) {
                Some((field, a, b)) => disagree(&format!("model.{field}"), first, a, file, b),
                None => disagree("model", first, "one config", file, "another"),
            });
        }
        Ok(())
    }

    /// The directory the shards were read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Optimizer steps taken when the checkpoint was captured.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The ranks that wrote the checkpoint.
    pub fn world(&self) -> u32 {
        self.world
    }

    /// The run's seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The model the checkpoint was saved from.
    pub fn model(&self) -> &ModelConfig {
        &self.model
    }

    /// Checks that the checkpoint was saved from `expected`; otherwise names the first
    /// differing field (in the JSON form's key order) with both values.
    pub fn check_model(&self, expected: &ModelConfig) -> Result<(), ShardError> {
        if serde_json::to_string(expected).is_ok_and(|json| json == self.model_json)
            || *expected == self.model
        {
            return Ok(());
        }
        let (field, there, here) = first_difference(&self.model, expected)
            .unwrap_or_else(|| ("(config)".into(), "different".into(), "different".into()));
        Err(ShardError::ModelMismatch { field, there, here })
    }

    /// The `len` f32 values of tensor `name`, assembled from its pieces in every shard.
    pub fn values(&self, name: &str, len: usize) -> Result<Vec<f32>, ShardError> {
        self.assemble(name, PieceKind::Value, len, PieceData::f32s)
    }

    /// AdamW's BF16 moments (m, v) of tensor `name`, `len` elements each.
    pub fn moments(&self, name: &str, len: usize) -> Result<(Vec<bf16>, Vec<bf16>), ShardError> {
        Ok((
            self.assemble(name, PieceKind::ExpAvg, len, PieceData::bf16s)?,
            self.assemble(name, PieceKind::ExpAvgSq, len, PieceData::bf16s)?,
        ))
    }

    /// Every tensor with value pieces, sorted by name.
    pub fn value_names(&self) -> Vec<String> {
        self.tensors
            .iter()
            .filter(|(_, t)| t.pieces.contains_key(&PieceKind::Value))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// A tensor's whole shape, if some shard has a piece of it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// Assembles the pieces of kind `kind` of `name` into `len` elements; they must cover
    /// `0..len` exactly once.
    fn assemble<T: Copy + Default>(
        &self,
        name: &str,
        kind: PieceKind,
        len: usize,
        elements: fn(&PieceData) -> Option<&[T]>,
    ) -> Result<Vec<T>, ShardError> {
        let not_found = || ShardError::NotInCheckpoint { tensor: name.to_string() };
        let tensor = self.tensors.get(name).ok_or_else(not_found)?;
        let coverage = |detail: String| ShardError::Coverage { tensor: name.to_string(), kind, detail };
        let pieces = match tensor.pieces.get(&kind) {
            Some(p) if !p.is_empty() => p,
            _ if kind == PieceKind::Value => return Err(not_found()),
            _ => return Err(coverage(format!("no piece in any shard (elements 0..{len} are missing)"))),
        };
        let whole: usize = tensor.shape.iter().product();
        if whole != len {
            return Err(coverage(format!(
                "the checkpoint has it with shape {:?} ({whole} elements), {len} elements were expected",
                tensor.shape
            )));
        }
        let mut order: Vec<&StoredPiece> = pieces.iter().filter(|p| !p.data.is_empty()).collect();
        order.sort_by_key(|p| p.start);
        let mut out = vec![T::default(); len];
        let mut cursor = 0usize;
        let mut previous: Option<&StoredPiece> = None;
        for piece in order {
            let data = elements(&piece.data).ok_or_else(|| {
                coverage(format!(
                    "the piece at element {} in {} has the wrong data type",
                    piece.start, piece.file
                ))
            })?;
            let end = piece.start.saturating_add(data.len());
            if piece.start > cursor {
                return Err(coverage(format!(
                    "elements {cursor}..{} are in no shard (a gap before the piece in {})",
                    piece.start, piece.file
                )));
            }
            if piece.start < cursor {
                let other = previous.map_or("another piece", |p| p.file.as_str());
                return Err(coverage(format!(
                    "elements {}..{} are in two pieces (in {other} and {})",
                    piece.start,
                    cursor.min(end),
                    piece.file
                )));
            }
            if end > len {
                return Err(coverage(format!(
                    "the piece of elements {}..{end} in {} runs past the tensor's {len} elements",
                    piece.start, piece.file
                )));
            }
            out[piece.start..end].copy_from_slice(data);
            cursor = end;
            previous = Some(piece);
        }
        if cursor < len {
            return Err(coverage(format!("elements {cursor}..{len} are in no shard")));
        }
        Ok(out)
    }
}

fn disagree(
    field: &str,
    first: &str,
    first_value: impl fmt::Display,
    second: &str,
    second_value: impl fmt::Display,
) -> ShardError {
    ShardError::Disagree {
        field: field.to_string(),
        first: first.to_string(),
        first_value: first_value.to_string(),
        second: second.to_string(),
        second_value: second_value.to_string(),
    }
}

/// The first field (in the JSON form's key order) whose value differs between `there` and
/// `here`, with both values as JSON (`absent` when a side lacks the key).
pub(crate) fn first_difference(there: &ModelConfig, here: &ModelConfig) -> Option<(String, String, String)> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(there), serde_json::to_value(here))
    else {
        return None;
    };
    let show = |v: Option<&serde_json::Value>| v.map_or_else(|| "absent".to_string(), |v| v.to_string());
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter().find(|k| a.get(*k) != b.get(*k)).map(|k| (k.clone(), show(a.get(k)), show(b.get(k))))
}

/// One shard file, parsed and checked.
struct DecodedShard {
    header: ReadHeader,
    /// The `shapes` metadata.
    shapes: BTreeMap<String, Vec<usize>>,
    /// (tensor, kind, start, elements) of every piece.
    pieces: Vec<(String, PieceKind, usize, PieceData)>,
}

/// Parses one shard's bytes: its header, the `shapes` of its tensors and its pieces, every
/// piece checked against its tensor's shape. Errors are details for [`ShardError::Format`].
fn decode_shard(bytes: &[u8]) -> Result<DecodedShard, String> {
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let meta = metadata.metadata().as_ref().ok_or("the file has no __metadata__")?;
    let get = |key: &str| meta.get(key).ok_or_else(|| format!("metadata key `{key}` is missing"));
    let number = |key: &str| -> Result<u64, String> {
        let text = get(key)?;
        text.parse::<u64>().map_err(|_| format!("metadata `{key}` = {text:?} is not an unsigned integer"))
    };
    let written_format = get("format")?;
    if written_format != SHARD_FORMAT {
        return Err(format!("metadata `format` is {written_format:?}, expected {SHARD_FORMAT:?}"));
    }
    let small = |key: &str| -> Result<u32, String> {
        u32::try_from(number(key)?).map_err(|_| format!("metadata `{key}` is out of range"))
    };
    let (step, rank, world, seed) = (number("step")?, small("rank")?, small("world")?, number("seed")?);
    if world == 0 || rank >= world {
        return Err(format!("metadata `rank` = {rank} is not below `world` = {world}"));
    }
    let model_json = get("model")?.clone();
    let model: ModelConfig = serde_json::from_str(&model_json)
        .map_err(|e| format!("metadata `model` is not a model config: {e}"))?;
    model.validate().map_err(|e: ConfigError| format!("metadata `model`: {e}"))?;
    let shapes: BTreeMap<String, Vec<usize>> = serde_json::from_str(get("shapes")?)
        .map_err(|e| format!("metadata `shapes` is not an object of shapes: {e}"))?;
    let mut pieces = Vec::new();
    let mut seen: HashSet<(String, PieceKind, usize)> = HashSet::new();
    for (key, view) in st.tensors() {
        let (base, start) = match key.rsplit_once('@') {
            Some((base, start)) => {
                let start = start
                    .parse::<usize>()
                    .map_err(|_| format!("key `{key}`: `{start}` is not an element index"))?;
                (base, Some(start))
            }
            None => (key.as_str(), None),
        };
        let moment = |suffix: &str| base.strip_suffix(suffix).filter(|name| shapes.contains_key(*name));
        let (name, kind) = match view.dtype() {
            Dtype::F32 => (base, PieceKind::Value),
            Dtype::BF16 => match (moment(PieceKind::ExpAvgSq.suffix()), moment(PieceKind::ExpAvg.suffix())) {
                (Some(name), _) => (name, PieceKind::ExpAvgSq),
                (None, Some(name)) => (name, PieceKind::ExpAvg),
                (None, None) => {
                    return Err(format!("key `{key}`: a BF16 tensor that is no tensor's exp_avg(_sq)"));
                }
            },
            other => return Err(format!("key `{key}`: dtype {other:?} (values are F32, moments BF16)")),
        };
        let shape = shapes
            .get(name)
            .ok_or_else(|| format!("tensor `{name}` (key `{key}`) has no entry in `shapes`"))?;
        let elements = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("tensor `{name}`: shape {shape:?} has too many elements"))?;
        let start = match start {
            None if view.shape() == shape.as_slice() => 0,
            None => {
                return Err(format!(
                    "key `{key}`: a whole {kind} of tensor `{name}` has shape {:?}, `shapes` says {shape:?}",
                    view.shape()
                ));
            }
            Some(start) if view.shape().len() == 1 => start,
            Some(_) => {
                return Err(format!(
                    "key `{key}`: a partial piece must be 1-D, got shape {:?}",
                    view.shape()
                ));
            }
        };
        let raw = view.data();
        let data = match kind {
            PieceKind::Value => PieceData::F32(
                raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            ),
            PieceKind::ExpAvg | PieceKind::ExpAvgSq => {
                PieceData::Bf16(raw.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect())
            }
        };
        if start.checked_add(data.len()).is_none_or(|end| end > elements) {
            return Err(format!(
                "key `{key}`: elements {start}..{} lie outside tensor `{name}`'s {elements} elements",
                start.saturating_add(data.len())
            ));
        }
        if !seen.insert((name.to_string(), kind, start)) {
            return Err(format!("tensor `{name}` has two {kind} pieces starting at element {start}"));
        }
        pieces.push((name.to_string(), kind, start, data));
    }
    Ok(DecodedShard { header: ReadHeader { step, rank, world, seed, model, model_json }, shapes, pieces })
}
