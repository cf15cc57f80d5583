//! `flotilla data prepare`: text files to an indexed dataset, as Megatron-LM's
//! `tools/preprocess_data.py --append-eod` does for JSONL.
//!
//! Documents: a file ending in `.jsonl` or `.json` holds one JSON object per line whose
//! string field (`text` unless named) is a document, as `preprocess_data.py` reads it
//! (blank lines are skipped); any other file is plain UTF-8 text and one document. Each
//! document is encoded and its end-of-document token appended, then written as one
//! sequence; a document of empty text stays empty (a document without sequences), as
//! `preprocess_data.py` writes it. The dtype is the smallest
//! Megatron would choose for the vocabulary (`uint16` below 65,500 ids, else `int32`).
//!
//! Parallelism never changes the output: documents are read in order (files as given,
//! lines in order), encoded in batches on a pool of `workers` threads, and each batch is
//! written in its reading order, so any number of workers writes the same bytes.
//! Errors name the file, and the line for JSONL: a missing file, non-UTF-8 text, a line
//! that is not a JSON object or lacks the field as a string.

use super::indexed::{IndexedWriter, TokenDtype};
use super::{DataError, Tokenizer};
use rayon::prelude::*;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Bytes of text read before a batch is encoded.
const BATCH_BYTES: usize = 8 << 20;

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareSummary {
    /// The tokens' dtype.
    pub dtype: TokenDtype,
    /// Documents (= sequences).
    pub documents: usize,
    /// Tokens, end-of-document tokens included.
    pub tokens: u64,
}

/// One document's text and where it came from.
struct Unit {
    path: usize,
    line: Option<usize>,
    text: String,
    bytes: u64,
}

fn is_jsonl(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("jsonl" | "json"))
}

/// Tokenizes `inputs` into `PREFIX.bin`/`PREFIX.idx` at `out` on `workers` threads (0:
/// all cores), calling `progress(bytes)` as input bytes are done.
pub fn prepare(
    tokenizer: &Tokenizer,
    inputs: &[PathBuf],
    out: &Path,
    field: &str,
    workers: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<PrepareSummary, DataError> {
    if inputs.is_empty() {
        return Err(DataError::Config("no input files".into()));
    }
    for path in inputs {
        if !path.is_file() {
            return Err(DataError::Input { path: path.clone(), line: None, detail: "no such file".into() });
        }
    }
    let eod = tokenizer.eod()?;
    let dtype = TokenDtype::for_vocab(tokenizer.vocab_size());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .build()
        .map_err(|e| DataError::Config(format!("a pool of {workers} workers: {e}")))?;
    let mut writer = IndexedWriter::create(out, dtype)?;
    let mut batch: Vec<Unit> = Vec::new();
    let mut batch_bytes = 0usize;
    let flush = |batch: &mut Vec<Unit>, writer: &mut IndexedWriter| -> Result<(), DataError> {
        let encoded: Vec<Result<Vec<u32>, DataError>> = pool.install(|| {
            batch
                .par_iter()
                .map(|u| {
                    let mut ids = tokenizer.encode(&u.text).map_err(|e| DataError::Input {
                        path: inputs[u.path].clone(),
                        line: u.line,
                        detail: e.to_string(),
                    })?;
                    // As preprocess_data.py --append-eod: an empty document stays empty
                    // (no sequence), so the output is Megatron's byte for byte.
                    if !ids.is_empty() {
                        ids.push(eod);
                    }
                    progress(u.bytes);
                    Ok(ids)
                })
                .collect()
        });
        for ids in encoded {
            writer.add_document(&ids?)?;
        }
        batch.clear();
        Ok(())
    };
    for (p, path) in inputs.iter().enumerate() {
        let io = |error: std::io::Error| DataError::Io { path: path.clone(), error };
        let file = std::fs::File::open(path).map_err(io)?;
        if is_jsonl(path) {
            let mut reader = BufReader::with_capacity(1 << 20, file);
            let mut raw = Vec::new();
            let mut line = 0usize;
            loop {
                raw.clear();
                if reader.read_until(b'\n', &mut raw).map_err(io)? == 0 {
                    break;
                }
                line += 1;
                let bytes = raw.len() as u64;
                let text = document_of_line(&raw, field).map_err(|detail| DataError::Input {
                    path: path.clone(),
                    line: Some(line),
                    detail,
                })?;
                let Some(text) = text else {
                    progress(bytes);
                    continue;
                };
                batch_bytes += text.len();
                batch.push(Unit { path: p, line: Some(line), text, bytes });
                if batch_bytes >= BATCH_BYTES {
                    flush(&mut batch, &mut writer)?;
                    batch_bytes = 0;
                }
            }
        } else {
            let mut raw = Vec::new();
            BufReader::new(file).read_to_end(&mut raw).map_err(io)?;
            let bytes = raw.len() as u64;
            let text = String::from_utf8(raw).map_err(|e| {
                let at = e.utf8_error().valid_up_to();
                let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
                DataError::Input {
                    path: path.clone(),
                    line: Some(line),
                    detail: format!("not UTF-8 text (byte {at})"),
                }
            })?;
            batch_bytes += text.len();
            batch.push(Unit { path: p, line: None, text, bytes });
            if batch_bytes >= BATCH_BYTES {
                flush(&mut batch, &mut writer)?;
                batch_bytes = 0;
            }
        }
    }
    flush(&mut batch, &mut writer)?;
    let summary = PrepareSummary { dtype, documents: writer.documents(), tokens: writer.tokens() };
    writer.finish()?;
    Ok(summary)
}

/// The document of one JSONL line: `None` for a blank line, the error's detail otherwise.
fn document_of_line(raw: &[u8], field: &str) -> Result<Option<String>, String> {
    let text = std::str::from_utf8(raw).map_err(|e| format!("not UTF-8 text (byte {})", e.valid_up_to()))?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let object = value.as_object().ok_or_else(|| "not a JSON object".to_string())?;
    match object.get(field) {
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("field `{field}` is not a string: {other}")),
        None => Err(format!("no field `{field}`")),
    }
}
