//! Checkpoint manifests: how the coordinator commits, finds, verifies and retires the
//! checkpoints its workers write. Pure file I/O: the coordinator never reads tensor
//! contents, only file names, sizes and checksums.
//!
//! # On-disk layout
//!
//! ```text
//! RUN_DIR/checkpoints/<run_id>/            one run: run_id = "{job_id}-{created_unix_ms}" (run_root)
//!     step-00000100/                      one checkpoint, named step-{step:08}
//!         shard-*.safetensors             one file per rank, written by the workers
//!         manifest.json                   written by the coordinator: the commit
//!     step-00000200/
//!         ...
//! ```
//!
//! # The commit protocol
//!
//! 1. Every rank writes its shard file into `step-{step:08}/`, makes it durable (fsync of
//!    the file and of the directory) and reports (file name, bytes, crc32) for it.
//! 2. Once every rank of the job has reported, the coordinator calls [`commit`]: it checks
//!    the [`Manifest`] (format, step against the directory's name, each rank 0..workers
//!    exactly once, plain unique file names, total bytes) and that every listed shard is
//!    there with exactly its reported size, then writes `manifest.json.tmp`, fsyncs it,
//!    renames it to `manifest.json` and fsyncs the directory.
//!
//! Invariants:
//!
//! - A `manifest.json` exists only when every shard it names was durable before it was
//!   written; its appearance (an atomic rename) is the commit. A `step-*` directory without
//!   one is uncommitted, whatever it holds, and is never used: [`list_committed`] and
//!   [`find_committed`] skip it and [`retain`] removes it once a newer checkpoint is
//!   committed.
//! - A committed manifest is never rewritten: [`commit`] of a different manifest into a
//!   committed directory is refused (the same one again is a no-op).
//! - Deleting a checkpoint removes its `manifest.json` first (and syncs the directory), so a
//!   crash while deleting leaves an uncommitted directory, never a manifest naming missing
//!   shards.
//! - A manifest that does not parse or validate was never written by [`commit`]; such a
//!   directory is skipped with a warning and left alone.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// The commit record's file name inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The value of [`Manifest::format`] this version writes and reads.
pub const MANIFEST_FORMAT: &str = "flotilla-checkpoint/1";
/// Where [`commit`] writes the manifest before renaming it into place.
const MANIFEST_TMP: &str = "manifest.json.tmp";
/// The directory under a run directory that holds every run's checkpoints.
const CHECKPOINTS_DIR: &str = "checkpoints";

/// The commit record of one checkpoint: what the job was, and every rank's shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    pub job_id: String,
    /// `{job_id}-{created_unix_ms}`: the run the checkpoint belongs to.
    pub run_id: String,
    /// The optimizer steps completed when the checkpoint was taken.
    pub step: u64,
    /// When the run (not this checkpoint) was created, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The job's world size: `shards` has one entry per rank 0..workers.
    pub workers: u32,
    /// How the model was laid out over the ranks (e.g. "dp=2" or "pp=2 ep=2 dp=1").
    pub layout: String,
    /// The run's configuration, as submitted.
    pub config_toml: String,
    pub shards: Vec<ShardEntry>,
    /// The sum of the shards' bytes.
    pub bytes: u64,
}

/// One rank's shard file, as the rank reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub rank: u32,
    /// A plain file name inside the checkpoint directory.
    pub file: String,
    pub bytes: u64,
    /// crc32 (IEEE, as `crc32fast`) of the whole file.
    pub crc32: u32,
}

/// A committed checkpoint: its directory and its manifest.
#[derive(Clone, Debug)]
pub struct Committed {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// What went wrong, always naming the path (and the shard file where one is at fault).
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: not a valid checkpoint manifest: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: `{field}` {reason}", path.display())]
    Invalid { path: PathBuf, field: String, reason: String },
    #[error("{}: shard `{file}` of rank {rank} is missing", dir.display())]
    MissingShard { dir: PathBuf, rank: u32, file: String },
    #[error("{}: shard `{file}` of rank {rank} is not a regular file", dir.display())]
    NotAFile { dir: PathBuf, rank: u32, file: String },
    #[error("{}: shard `{file}` of rank {rank} has {actual} bytes, the manifest says {expected}", dir.display())]
    ShardSize { dir: PathBuf, rank: u32, file: String, expected: u64, actual: u64 },
    #[error("{}: already committed with a different manifest (a commit is never rewritten)", path.display())]
    AlreadyCommitted { path: PathBuf },
    #[error("{}: retain must keep at least 1 checkpoint, got {keep}", root.display())]
    KeepZero { root: PathBuf, keep: usize },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CheckpointError {
    let path = path.to_path_buf();
    move |source| CheckpointError::Io { op, path, source }
}

/// Where one run's checkpoints live: `run_dir/checkpoints/run_id`.
pub fn run_root(run_dir: &Path, run_id: &str) -> PathBuf {
    run_dir.join(CHECKPOINTS_DIR).join(run_id)
}

/// The directory name of step `step`'s checkpoint: `step-{step:08}`.
fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step a directory named `step-{step:08}` holds, if the name is exactly that.
fn parse_step_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let step: u64 = digits.parse().ok()?;
    (step_dir_name(step) == name).then_some(step)
}

/// Why `file` is not a plain file name inside the checkpoint directory, if it is not: the
/// plain-name rule is `flotilla_model::paths::check_file_name`'s (no separators, not `.`
/// or `..`, not empty, no NUL), and a shard may not take the manifest's names. The job
/// actor applies it to every shard a worker reports, before the name reaches a manifest.
pub fn bad_file_name(file: &str) -> Option<&'static str> {
    if flotilla_model::paths::check_file_name("file", file).is_err() {
        Some("must be a plain file name (not empty, no `/`, `\\`, NUL, and not `.` or `..`)")
    } else if file.contains("..") {
        Some("must be a plain file name (no `..`)")
    } else if file == MANIFEST_FILE || file == MANIFEST_TMP {
        Some("is the manifest's own name")
    } else {
        None
    }
}

/// Checks everything a manifest says about itself; errors name `path` and the field.
fn validate(path: &Path, m: &Manifest) -> Result<(), CheckpointError> {
    let invalid =
        |field: String, reason: String| CheckpointError::Invalid { path: path.to_path_buf(), field, reason };
    if m.format != MANIFEST_FORMAT {
        return Err(invalid("format".into(), format!("is {:?}, expected {MANIFEST_FORMAT:?}", m.format)));
    }
    if m.run_id.is_empty() {
        return Err(invalid("run_id".into(), "is empty".into()));
    }
    if m.workers == 0 {
        return Err(invalid("workers".into(), "must be at least 1".into()));
    }
    if m.shards.is_empty() {
        return Err(invalid("shards".into(), "is empty".into()));
    }
    if m.shards.len() != m.workers as usize {
        return Err(invalid(
            "shards".into(),
            format!("lists {} shards, expected one per rank of {} workers", m.shards.len(), m.workers),
        ));
    }
    let mut ranks = vec![false; m.workers as usize];
    let mut files = HashSet::new();
    let mut total: u64 = 0;
    for (i, s) in m.shards.iter().enumerate() {
        if s.rank >= m.workers {
            return Err(invalid(
                format!("shards[{i}].rank"),
                format!("is {}, outside 0..{} (workers)", s.rank, m.workers),
            ));
        }
        if std::mem::replace(&mut ranks[s.rank as usize], true) {
            return Err(invalid(format!("shards[{i}].rank"), format!("repeats rank {}", s.rank)));
        }
        if let Some(reason) = bad_file_name(&s.file) {
            return Err(invalid(format!("shards[{i}].file"), format!("{:?} {reason}", s.file)));
        }
        if !files.insert(s.file.as_str()) {
            return Err(invalid(format!("shards[{i}].file"), format!("{:?} is listed twice", s.file)));
        }
        total = total
            .checked_add(s.bytes)
            .ok_or_else(|| invalid(format!("shards[{i}].bytes"), "overflows the total".into()))?;
    }
    if m.bytes != total {
        return Err(invalid("bytes".into(), format!("is {}, but the shards add up to {total}", m.bytes)));
    }
    Ok(())
}

/// Stats every shard `m` lists in `dir`: present, a regular file, exactly its size.
fn check_shards_present(dir: &Path, m: &Manifest) -> Result<(), CheckpointError> {
    for s in &m.shards {
        let path = dir.join(&s.file);
        let meta = match fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(CheckpointError::MissingShard {
                    dir: dir.to_path_buf(),
                    rank: s.rank,
                    file: s.file.clone(),
                });
            }
            Err(e) => return Err(io_err("reading the metadata of", &path)(e)),
        };
        if !meta.is_file() {
            return Err(CheckpointError::NotAFile {
                dir: dir.to_path_buf(),
                rank: s.rank,
                file: s.file.clone(),
            });
        }
        if meta.len() != s.bytes {
            return Err(CheckpointError::ShardSize {
                dir: dir.to_path_buf(),
                rank: s.rank,
                file: s.file.clone(),
                expected: s.bytes,
                actual: meta.len(),
            });
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("syncing the directory", dir))
}

/// Commits the checkpoint in `dir` (named `step-{manifest.step:08}`) by writing `manifest`
/// into it atomically, after checking the manifest and that every shard it lists is in `dir`
/// with exactly its listed size. The caller guarantees the shards are durable (each worker
/// fsyncs its file and the directory before reporting it). Committing the same manifest
/// again is a no-op; a different one into a committed directory is refused.
pub fn commit(dir: &Path, manifest: &Manifest) -> Result<(), CheckpointError> {
    let path = dir.join(MANIFEST_FILE);
    validate(&path, manifest)?;
    let expected = step_dir_name(manifest.step);
    if dir.file_name().and_then(|n| n.to_str()) != Some(expected.as_str()) {
        return Err(CheckpointError::Invalid {
            path,
            field: "step".into(),
            reason: format!("is {}, but the checkpoint directory is not named {expected}", manifest.step),
        });
    }
    check_shards_present(dir, manifest)?;
    match fs::metadata(&path) {
        Ok(_) => {
            // Already committed (e.g. a coordinator restarted after committing): the same
            // record is fine, another one would rewrite history.
            return match read_manifest(dir) {
                Ok(existing) if existing == *manifest => Ok(()),
                _ => Err(CheckpointError::AlreadyCommitted { path }),
            };
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("reading the metadata of", &path)(e)),
    }
    let mut json = serde_json::to_vec_pretty(manifest).expect("a manifest serializes");
    json.push(b'\n');
    let tmp = dir.join(MANIFEST_TMP);
    let mut file = File::create(&tmp).map_err(io_err("creating", &tmp))?;
    file.write_all(&json).map_err(io_err("writing", &tmp))?;
    file.sync_all().map_err(io_err("syncing", &tmp))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io_err("renaming into place", &path))?;
    sync_dir(dir)
}

/// Reads and validates `dir/manifest.json` (format, ranks, file names, total bytes); errors
/// name the path and the field. Does not look at the shards (see [`verify`]).
pub fn read_manifest(dir: &Path) -> Result<Manifest, CheckpointError> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = fs::read(&path).map_err(io_err("reading", &path))?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|source| CheckpointError::Parse { path: path.clone(), source })?;
    validate(&path, &manifest)?;
    Ok(manifest)
}

/// A `step-*` directory of one run, as [`scan`] found it.
enum StepDir {
    Committed(Committed),
    /// No `manifest.json`: shards being written, or left by a crash.
    Uncommitted {
        step: u64,
        dir: PathBuf,
    },
    /// A manifest that is not a valid commit of this directory (logged, left alone).
    Corrupt,
}

/// Every `step-{step:08}` directory under `root`, by step ascending; a missing root is empty.
fn scan(root: &Path) -> Result<Vec<StepDir>, CheckpointError> {
    let entries = match fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("listing", root)(e)),
    };
    let mut steps = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("listing", root))?;
        let Some(step) = entry.file_name().to_str().and_then(parse_step_dir_name) else { continue };
        let dir = entry.path();
        if !entry.file_type().map_err(io_err("reading the type of", &dir))?.is_dir() {
            continue;
        }
        steps.push((step, dir));
    }
    steps.sort_by_key(|(step, _)| *step);
    let mut out = Vec::with_capacity(steps.len());
    for (step, dir) in steps {
        let path = dir.join(MANIFEST_FILE);
        match fs::symlink_metadata(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                out.push(StepDir::Uncommitted { step, dir });
                continue;
            }
            Err(e) => return Err(io_err("reading the metadata of", &path)(e)),
        }
        match read_manifest(&dir) {
            Ok(manifest) if manifest.step == step => {
                out.push(StepDir::Committed(Committed { dir, manifest }))
            }
            Ok(manifest) => {
                tracing::warn!(
                    path = %path.display(),
                    "skipping a checkpoint whose manifest says step {} in the directory of step {step}",
                    manifest.step
                );
                out.push(StepDir::Corrupt);
            }
            Err(e @ (CheckpointError::Parse { .. } | CheckpointError::Invalid { .. })) => {
                tracing::warn!("skipping a checkpoint with a corrupt manifest (never a valid commit): {e}");
                out.push(StepDir::Corrupt);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// One run's committed checkpoints under `root` (see [`run_root`]), by step ascending.
/// Directories without a manifest are uncommitted and skipped; one with a corrupt manifest
/// (or one whose step is not its directory's) is skipped with a warning. A missing root
/// has none.
pub fn list_committed(root: &Path) -> Result<Vec<Committed>, CheckpointError> {
    Ok(scan(root)?
        .into_iter()
        .filter_map(|s| match s {
            StepDir::Committed(c) => Some(c),
            _ => None,
        })
        .collect())
}

/// Every run's committed checkpoints under `run_dir/checkpoints`, by (created_unix_ms, step)
/// ascending (then run id): the last is the latest. None if the directory does not exist.
pub fn find_committed(run_dir: &Path) -> Result<Vec<Committed>, CheckpointError> {
    let base = run_dir.join(CHECKPOINTS_DIR);
    let entries = match fs::read_dir(&base) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("listing", &base)(e)),
    };
    let mut all = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("listing", &base))?;
        let path = entry.path();
        if entry.file_type().map_err(io_err("reading the type of", &path))?.is_dir() {
            all.extend(list_committed(&path)?);
        }
    }
    all.sort_by(|a, b| {
        let key = |c: &Committed| (c.manifest.created_unix_ms, c.manifest.step);
        key(a).cmp(&key(b)).then_with(|| a.manifest.run_id.cmp(&b.manifest.run_id))
    });
    Ok(all)
}

/// Keeps the newest `keep` (≥ 1) committed checkpoints under `root` and deletes the older
/// ones, each by removing its manifest first (then syncing the directory) and then the
/// directory. Also removes uncommitted `step-*` directories below the newest committed step
/// (writes interrupted by a crash); those above it may be being written and are kept, and
/// so are directories with a corrupt manifest and anything not named `step-*`. Returns the
/// steps whose directories were removed, committed or not, ascending.
pub fn retain(root: &Path, keep: usize) -> Result<Vec<u64>, CheckpointError> {
    if keep == 0 {
        return Err(CheckpointError::KeepZero { root: root.to_path_buf(), keep });
    }
    let dirs = scan(root)?;
    let committed: Vec<&Committed> = dirs
        .iter()
        .filter_map(|s| match s {
            StepDir::Committed(c) => Some(c),
            _ => None,
        })
        .collect();
    let Some(newest) = committed.last().map(|c| c.manifest.step) else { return Ok(Vec::new()) };
    let old: HashSet<u64> =
        committed[..committed.len().saturating_sub(keep)].iter().map(|c| c.manifest.step).collect();
    let mut deleted = Vec::new();
    for s in &dirs {
        match s {
            StepDir::Committed(c) if old.contains(&c.manifest.step) => {
                let manifest = c.dir.join(MANIFEST_FILE);
                fs::remove_file(&manifest).map_err(io_err("removing", &manifest))?;
                sync_dir(&c.dir)?;
                fs::remove_dir_all(&c.dir).map_err(io_err("removing", &c.dir))?;
                deleted.push(c.manifest.step);
            }
            StepDir::Uncommitted { step, dir } if *step < newest => {
                fs::remove_dir_all(dir).map_err(io_err("removing", dir))?;
                deleted.push(*step);
            }
            _ => {}
        }
    }
    if !deleted.is_empty() {
        sync_dir(root)?;
    }
    Ok(deleted)
}

/// How one shard of a checkpoint checked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardCheck {
    pub file: String,
    pub ok: bool,
    /// For a good shard its size and checksum; otherwise what is wrong (missing, size, or
    /// checksum mismatch with both values in hex).
    pub detail: String,
}

/// crc32 of a whole file and its length, read in chunks.
fn file_crc32(path: &Path) -> io::Result<(u64, u32)> {
    let mut file = File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, hasher.finalize()))
}

/// Reads the manifest of the checkpoint in `dir`, then every shard it lists in full: one
/// [`ShardCheck`] per shard, in the manifest's order, saying whether it is there with its
/// listed size and crc32. Errors only when the manifest cannot be read.
pub fn verify(dir: &Path) -> Result<Vec<ShardCheck>, CheckpointError> {
    let manifest = read_manifest(dir)?;
    let checks = manifest
        .shards
        .iter()
        .map(|s| {
            let path = dir.join(&s.file);
            let (ok, detail) = match fs::metadata(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => (false, format!("rank {}: missing", s.rank)),
                Err(e) => (false, format!("rank {}: cannot read {}: {e}", s.rank, path.display())),
                Ok(meta) if !meta.is_file() => (false, format!("rank {}: not a regular file", s.rank)),
                Ok(meta) if meta.len() != s.bytes => (
                    false,
                    format!(
                        "rank {}: size mismatch: {} bytes, the manifest says {}",
                        s.rank,
                        meta.len(),
                        s.bytes
                    ),
                ),
                Ok(_) => match file_crc32(&path) {
                    Err(e) => (false, format!("rank {}: cannot read {}: {e}", s.rank, path.display())),
                    Ok((len, _)) if len != s.bytes => (
                        false,
                        format!(
                            "rank {}: size mismatch: read {len} bytes, the manifest says {}",
                            s.rank, s.bytes
                        ),
                    ),
                    Ok((_, crc)) if crc != s.crc32 => (
                        false,
                        format!(
                            "rank {}: checksum mismatch: crc32 {crc:#010x}, the manifest says {:#010x}",
                            s.rank, s.crc32
                        ),
                    ),
                    Ok((len, crc)) => (true, format!("rank {}: {len} bytes, crc32 {crc:#010x}", s.rank)),
                },
            };
            ShardCheck { file: s.file.clone(), ok, detail }
        })
        .collect();
    Ok(checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_dir_names_round_trip_and_only_canonical_ones_parse() {
        for step in [0, 7, 12_345_678, 123_456_789, u64::MAX] {
            assert_eq!(parse_step_dir_name(&step_dir_name(step)), Some(step));
        }
        for bad in
            ["step-", "step-1", "step-0000001", "step-0000000x", "step-+0000001", "step-000000001", "x"]
        {
            assert_eq!(parse_step_dir_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn file_names_must_be_plain() {
        assert_eq!(bad_file_name("shard-00000.safetensors"), None);
        for bad in ["", "../x", "a/b", "a\\b", "..", ".", "x..y", MANIFEST_FILE, MANIFEST_TMP, "a\0b"] {
            assert!(bad_file_name(bad).is_some(), "{bad:?}");
        }
    }
}
