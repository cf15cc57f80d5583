//! Megatron-LM's indexed dataset (`PREFIX.idx` + `PREFIX.bin`), read memory-mapped and
//! written byte for byte as Megatron-LM's `megatron/core/datasets/indexed_dataset.py`
//! (`_IndexWriter`, `_IndexReader`, `IndexedDatasetBuilder`) does, so either side reads
//! what the other wrote, `tools/preprocess_data.py`'s output included.
//!
//! # `PREFIX.bin`
//!
//! The tokens of every sequence, back to back, in the dtype the index names, little-endian,
//! with no header and no padding. Nothing else.
//!
//! # `PREFIX.idx`, all integers little-endian, no padding
//!
//! | offset | bytes | field |
//! | --- | --- | --- |
//! | 0 | 9 | magic `MMIDIDX\x00\x00` |
//! | 9 | 8 | `u64` version, always 1 |
//! | 17 | 1 | `u8` dtype code of the tokens in `.bin`: 1 `uint8`, 2 `int8`, 3 `int16`, 4 `int32`, 5 `int64`, 6 `float64`, 7 `float32`, 8 `uint16` |
//! | 18 | 8 | `u64` sequence count `S` |
//! | 26 | 8 | `u64` document-index count `D` (documents + 1) |
//! | 34 | 4·S | `i32` length of each sequence, in tokens |
//! | 34 + 4S | 8·S | `i64` byte offset of each sequence in `.bin` (the first 0, each the previous plus its length × the dtype's size) |
//! | 34 + 12S | 8·D | `i64` document index: document `d` is sequences `index[d] .. index[d+1]`; starts at 0, non-decreasing, ends at `S` |
//!
//! Megatron's multimodal variant appends an `i8` mode per sequence after the document
//! index (the file says nothing else about it); flotilla recognises that size and refuses
//! it, as it does any other trailing bytes. A document of `preprocess_data.py` without
//! `--split-sentences` is one sequence; with it, one sequence per sentence. Either reads
//! the same here: the token stream is the sequences in order.
//!
//! Opening checks everything the header and the index claim against the two files (the
//! error names the file and the field): the magic, the version, the dtype code (float
//! dtypes hold no token ids and are refused), counts that need more bytes than the `.idx`
//! has, lengths below zero, pointers past the end of `.bin` or not back to back, a `.bin`
//! shorter or longer than the sequences, and a document index that does not start at 0,
//! goes down, or does not end at `S`. It reads the index once (time linear in the
//! sequences) and keeps nothing but the two maps: memory stays O(1) in the dataset's
//! size. Token values are checked when read (negative or past `u32` is an error naming
//! the token's position).

use super::DataError;
use memmap2::Mmap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The header's magic bytes.
pub const MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";
/// The only version Megatron-LM writes.
pub const VERSION: u64 = 1;
/// Bytes before the sequence lengths.
pub const HEADER_LEN: usize = 34;

/// The storage type of the tokens in `.bin`, by Megatron's `DType` code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenDtype {
    /// Code 1.
    U8,
    /// Code 2.
    I8,
    /// Code 3.
    I16,
    /// Code 4.
    I32,
    /// Code 5.
    I64,
    /// Code 8.
    U16,
}

impl TokenDtype {
    /// Megatron's code.
    pub fn code(self) -> u8 {
        match self {
            TokenDtype::U8 => 1,
            TokenDtype::I8 => 2,
            TokenDtype::I16 => 3,
            TokenDtype::I32 => 4,
            TokenDtype::I64 => 5,
            TokenDtype::U16 => 8,
        }
    }

    /// The dtype of a code; `Err` is why the code is refused.
    pub fn from_code(code: u8) -> Result<Self, String> {
        Ok(match code {
            1 => TokenDtype::U8,
            2 => TokenDtype::I8,
            3 => TokenDtype::I16,
            4 => TokenDtype::I32,
            5 => TokenDtype::I64,
            8 => TokenDtype::U16,
            6 => return Err("dtype code 6 (float64) holds no token ids".into()),
            7 => return Err("dtype code 7 (float32) holds no token ids".into()),
            other => return Err(format!("unknown dtype code {other} (Megatron's codes are 1 to 8)")),
        })
    }

    /// Bytes per token.
    pub fn size(self) -> usize {
        match self {
            TokenDtype::U8 | TokenDtype::I8 => 1,
            TokenDtype::I16 | TokenDtype::U16 => 2,
            TokenDtype::I32 => 4,
            TokenDtype::I64 => 8,
        }
    }

    /// NumPy's name.
    pub fn name(self) -> &'static str {
        match self {
            TokenDtype::U8 => "uint8",
            TokenDtype::I8 => "int8",
            TokenDtype::I16 => "int16",
            TokenDtype::I32 => "int32",
            TokenDtype::I64 => "int64",
            TokenDtype::U16 => "uint16",
        }
    }

    /// Megatron's `DType.optimal_dtype`: `uint16` for a vocabulary below 65,500, else
    /// `int32`.
    pub fn for_vocab(vocab: usize) -> Self {
        if vocab < 65_500 { TokenDtype::U16 } else { TokenDtype::I32 }
    }

    /// The largest token id this dtype stores.
    pub fn max_token(self) -> u64 {
        match self {
            TokenDtype::U8 => u8::MAX as u64,
            TokenDtype::I8 => i8::MAX as u64,
            TokenDtype::I16 => i16::MAX as u64,
            TokenDtype::U16 => u16::MAX as u64,
            TokenDtype::I32 => i32::MAX as u64,
            TokenDtype::I64 => u32::MAX as u64,
        }
    }

    fn read(self, bytes: &[u8]) -> i64 {
        match self {
            TokenDtype::U8 => bytes[0] as i64,
            TokenDtype::I8 => bytes[0] as i8 as i64,
            TokenDtype::I16 => i16::from_le_bytes([bytes[0], bytes[1]]) as i64,
            TokenDtype::U16 => u16::from_le_bytes([bytes[0], bytes[1]]) as i64,
            TokenDtype::I32 => i32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as i64,
            TokenDtype::I64 => i64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")),
        }
    }

    fn write(self, token: u32, out: &mut Vec<u8>) {
        match self {
            TokenDtype::U8 | TokenDtype::I8 => out.push(token as u8),
            TokenDtype::I16 | TokenDtype::U16 => out.extend_from_slice(&(token as u16).to_le_bytes()),
            TokenDtype::I32 => out.extend_from_slice(&(token as i32).to_le_bytes()),
            TokenDtype::I64 => out.extend_from_slice(&(token as i64).to_le_bytes()),
        }
    }
}

/// `PREFIX.idx`.
pub fn idx_path(prefix: &Path) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".idx");
    PathBuf::from(s)
}

/// `PREFIX.bin`.
pub fn bin_path(prefix: &Path) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".bin");
    PathBuf::from(s)
}

fn map(path: &Path) -> Result<Mmap, DataError> {
    let file = File::open(path).map_err(|error| DataError::Io { path: path.to_path_buf(), error })?;
    // SAFETY: the map is read-only; a file truncated by another process while mapped is
    // outside what any reader of these datasets (Megatron's included) can defend against.
    unsafe { Mmap::map(&file) }.map_err(|error| DataError::Io { path: path.to_path_buf(), error })
}

/// An opened, checked indexed dataset.
pub struct IndexedDataset {
    prefix: PathBuf,
    idx: Mmap,
    bin: Mmap,
    dtype: TokenDtype,
    sequences: usize,
    index_entries: usize,
}

impl std::fmt::Debug for IndexedDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexedDataset")
            .field("prefix", &self.prefix)
            .field("dtype", &self.dtype)
            .field("sequences", &self.sequences)
            .field("documents", &self.documents())
            .finish()
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl IndexedDataset {
    /// Maps and checks `PREFIX.idx` and `PREFIX.bin` (see the module docs for what is
    /// checked).
    pub fn open(prefix: &Path) -> Result<Self, DataError> {
        let idx_file = idx_path(prefix);
        let bin_file = bin_path(prefix);
        let idx = map(&idx_file)?;
        let bin = map(&bin_file)?;
        let bad = |detail: String| DataError::Format { path: idx_file.clone(), detail };
        if idx.len() < HEADER_LEN {
            return Err(bad(format!("truncated: {} bytes, the header alone needs {HEADER_LEN}", idx.len())));
        }
        if &idx[..9] != MAGIC {
            return Err(bad(format!(
                "bad magic {:?}, an indexed dataset's index starts with \"MMIDIDX\\x00\\x00\"",
                String::from_utf8_lossy(&idx[..9])
            )));
        }
        let version = u64_at(&idx, 9);
        if version != VERSION {
            return Err(bad(format!("version {version}, only version {VERSION} exists")));
        }
        let dtype = TokenDtype::from_code(idx[17]).map_err(&bad)?;
        let sequences = u64_at(&idx, 18);
        let entries = u64_at(&idx, 26);
        let need = HEADER_LEN as u128 + 12 * sequences as u128 + 8 * entries as u128;
        let have = idx.len() as u128;
        if need > have {
            return Err(bad(format!(
                "truncated or corrupt: its counts ({sequences} sequences, {entries} document-index entries) need {need} bytes, the file has {have}"
            )));
        }
        if have == need + sequences as u128 && sequences > 0 {
            return Err(bad(format!(
                "holds a mode per sequence after the document index ({sequences} bytes): a multimodal dataset, which flotilla does not read"
            )));
        }
        if have > need {
            return Err(bad(format!(
                "{} bytes after the document index, which should end the file",
                have - need
            )));
        }
        let (sequences, entries) = (sequences as usize, entries as usize);
        if entries == 0 {
            return Err(bad("the document index is empty: it holds at least the leading 0".into()));
        }
        let dataset = IndexedDataset {
            prefix: prefix.to_path_buf(),
            idx,
            bin,
            dtype,
            sequences,
            index_entries: entries,
        };
        dataset.check(&idx_file, &bin_file)?;
        Ok(dataset)
    }

    fn check(&self, idx_file: &Path, bin_file: &Path) -> Result<(), DataError> {
        let bad = |detail: String| DataError::Format { path: idx_file.to_path_buf(), detail };
        let size = self.dtype.size() as u64;
        let bin_len = self.bin.len() as u64;
        let mut expected = 0u64;
        for i in 0..self.sequences {
            let len = self.raw_length(i);
            if len < 0 {
                return Err(bad(format!("sequence {i} has length {len}")));
            }
            let pointer = self.raw_pointer(i);
            if pointer < 0 || pointer as u64 > bin_len {
                return Err(bad(format!(
                    "the pointer of sequence {i} ({pointer}) is past the end of {} ({bin_len} bytes)",
                    bin_file.display()
                )));
            }
            if pointer as u64 != expected {
                return Err(bad(format!(
                    "the pointer of sequence {i} is {pointer}, expected {expected}: sequences are not stored back to back"
                )));
            }
            expected += len as u64 * size;
        }
        if expected != bin_len {
            return Err(DataError::Format {
                path: bin_file.to_path_buf(),
                detail: if expected > bin_len {
                    format!("truncated: {bin_len} bytes, the index's sequences need {expected}")
                } else {
                    format!(
                        "{bin_len} bytes, the index's sequences take {expected}: it does not belong to this index"
                    )
                },
            });
        }
        let mut previous = 0i64;
        for d in 0..self.index_entries {
            let at = self.raw_document(d);
            if d == 0 && at != 0 {
                return Err(bad(format!("the document index starts at {at}, not 0")));
            }
            if at < previous {
                return Err(bad(format!(
                    "the document index is not monotonic: entry {d} is {at}, after {previous}"
                )));
            }
            previous = at;
        }
        if previous as u64 != self.sequences as u64 {
            return Err(bad(format!(
                "the document index ends at {previous}, not at the sequence count {}",
                self.sequences
            )));
        }
        Ok(())
    }

    fn raw_length(&self, i: usize) -> i32 {
        let at = HEADER_LEN + 4 * i;
        i32::from_le_bytes(self.idx[at..at + 4].try_into().expect("4 bytes"))
    }

    fn raw_pointer(&self, i: usize) -> i64 {
        let at = HEADER_LEN + 4 * self.sequences + 8 * i;
        i64::from_le_bytes(self.idx[at..at + 8].try_into().expect("8 bytes"))
    }

    fn raw_document(&self, d: usize) -> i64 {
        let at = HEADER_LEN + 12 * self.sequences + 8 * d;
        i64::from_le_bytes(self.idx[at..at + 8].try_into().expect("8 bytes"))
    }

    /// The prefix it was opened from.
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// The tokens' storage type.
    pub fn dtype(&self) -> TokenDtype {
        self.dtype
    }

    /// Sequences (`S`).
    pub fn sequences(&self) -> usize {
        self.sequences
    }

    /// Documents (`D − 1`).
    pub fn documents(&self) -> usize {
        self.index_entries - 1
    }

    /// Tokens in all sequences.
    pub fn tokens(&self) -> u64 {
        (self.bin.len() / self.dtype.size()) as u64
    }

    /// Sequence `i`'s length in tokens (`i < sequences()`).
    pub fn sequence_len(&self, i: usize) -> usize {
        self.raw_length(i) as usize
    }

    /// Document `d`'s sequences (`d < documents()`).
    pub fn document_sequences(&self, d: usize) -> std::ops::Range<usize> {
        self.raw_document(d) as usize..self.raw_document(d + 1) as usize
    }

    /// The document index (`D` entries).
    pub fn document_index(&self) -> Vec<u64> {
        (0..self.index_entries).map(|d| self.raw_document(d) as u64).collect()
    }

    /// Token `start`'s position in the stream of every sequence in order, as a range of
    /// stream positions.
    fn token_range(&self, sequences: std::ops::Range<usize>) -> std::ops::Range<u64> {
        let size = self.dtype.size() as u64;
        let start = if sequences.start < self.sequences {
            self.raw_pointer(sequences.start) as u64 / size
        } else {
            self.tokens()
        };
        let end = if sequences.end < self.sequences {
            self.raw_pointer(sequences.end) as u64 / size
        } else {
            self.tokens()
        };
        start..end
    }

    /// Document `d`'s tokens; errors if `d` is out of range or a token is not a `u32`.
    pub fn document(&self, d: usize) -> Result<Vec<u32>, DataError> {
        if d >= self.documents() {
            return Err(DataError::Format {
                path: idx_path(&self.prefix),
                detail: format!("no document {d}: the dataset has {}", self.documents()),
            });
        }
        let range = self.token_range(self.document_sequences(d));
        self.read(range.start, (range.end - range.start) as usize)
    }

    /// Sequence `i`'s tokens.
    pub fn sequence(&self, i: usize) -> Result<Vec<u32>, DataError> {
        let range = self.token_range(i..i + 1);
        self.read(range.start, (range.end - range.start) as usize)
    }

    /// `count` tokens of the stream (all sequences back to back) from position `start`.
    pub fn read(&self, start: u64, count: usize) -> Result<Vec<u32>, DataError> {
        let size = self.dtype.size();
        let end = start.checked_add(count as u64).filter(|&e| e <= self.tokens()).ok_or_else(|| {
            DataError::Format {
                path: bin_path(&self.prefix),
                detail: format!("tokens {start}..{start}+{count} are past its {} tokens", self.tokens()),
            }
        })?;
        let bytes = &self.bin[start as usize * size..end as usize * size];
        bytes
            .chunks_exact(size)
            .enumerate()
            .map(|(k, b)| {
                let v = self.dtype.read(b);
                u32::try_from(v).map_err(|_| DataError::Format {
                    path: bin_path(&self.prefix),
                    detail: format!("token {} is {v}, not a token id", start + k as u64),
                })
            })
            .collect()
    }
}

/// Writes an indexed dataset as Megatron's `IndexedDatasetBuilder` with one
/// `add_document(tokens, [len(tokens)])` per document and `finalize`: `.bin` as documents
/// come, `.idx` at [`IndexedWriter::finish`]. A document with no tokens is a document of
/// no sequences (`add_document(tokens, [])`). Both are written as `PREFIX.bin.tmp` and
/// `PREFIX.idx.tmp` and renamed by `finish`, so a failed or abandoned write leaves an
/// existing dataset at `PREFIX` as it was (dropping the writer unfinished removes the
/// temporary files).
pub struct IndexedWriter {
    prefix: PathBuf,
    finished: bool,
    bin: BufWriter<File>,
    dtype: TokenDtype,
    lengths: Vec<i32>,
    document_index: Vec<i64>,
    tokens: u64,
    buffer: Vec<u8>,
}

impl IndexedWriter {
    /// Creates (truncates) `PREFIX.bin`; `PREFIX.idx` is written by `finish`.
    pub fn create(prefix: &Path, dtype: TokenDtype) -> Result<Self, DataError> {
        let path = tmp(&bin_path(prefix));
        let file = File::create(&path).map_err(|error| DataError::Io { path, error })?;
        Ok(IndexedWriter {
            prefix: prefix.to_path_buf(),
            finished: false,
            bin: BufWriter::with_capacity(1 << 20, file),
            dtype,
            lengths: Vec::new(),
            document_index: vec![0],
            tokens: 0,
            buffer: Vec::new(),
        })
    }

    /// Appends one document of one sequence (none if `tokens` is empty); errors if a token
    /// does not fit the dtype or the document exceeds `i32::MAX` tokens.
    pub fn add_document(&mut self, tokens: &[u32]) -> Result<(), DataError> {
        let bin = bin_path(&self.prefix);
        if let Some(&t) = tokens.iter().find(|&&t| t as u64 > self.dtype.max_token()) {
            return Err(DataError::Format {
                path: bin,
                detail: format!("token {t} does not fit dtype {}", self.dtype.name()),
            });
        }
        let len = i32::try_from(tokens.len()).map_err(|_| DataError::Format {
            path: bin.clone(),
            detail: format!("a document of {} tokens exceeds an i32 sequence length", tokens.len()),
        })?;
        if len > 0 {
            self.buffer.clear();
            for &t in tokens {
                self.dtype.write(t, &mut self.buffer);
            }
            self.bin.write_all(&self.buffer).map_err(|error| DataError::Io { path: bin, error })?;
            self.lengths.push(len);
            self.tokens += tokens.len() as u64;
        }
        self.document_index.push(self.lengths.len() as i64);
        Ok(())
    }

    /// Documents so far.
    pub fn documents(&self) -> usize {
        self.document_index.len() - 1
    }

    /// Tokens so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Flushes `.bin`, writes `.idx`, and renames both into place.
    pub fn finish(mut self) -> Result<(), DataError> {
        let bin = tmp(&bin_path(&self.prefix));
        self.bin.flush().map_err(|error| DataError::Io { path: bin.clone(), error })?;
        self.bin.get_ref().sync_all().map_err(|error| DataError::Io { path: bin.clone(), error })?;
        let mut out =
            Vec::with_capacity(HEADER_LEN + 12 * self.lengths.len() + 8 * self.document_index.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(self.dtype.code());
        out.extend_from_slice(&(self.lengths.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.document_index.len() as u64).to_le_bytes());
        for len in &self.lengths {
            out.extend_from_slice(&len.to_le_bytes());
        }
        let size = self.dtype.size() as i64;
        let mut pointer = 0i64;
        for &len in &self.lengths {
            out.extend_from_slice(&pointer.to_le_bytes());
            pointer += len as i64 * size;
        }
        for d in &self.document_index {
            out.extend_from_slice(&d.to_le_bytes());
        }
        let idx = tmp(&idx_path(&self.prefix));
        std::fs::write(&idx, out).map_err(|error| DataError::Io { path: idx.clone(), error })?;
        for (from, to) in [(bin, bin_path(&self.prefix)), (idx, idx_path(&self.prefix))] {
            std::fs::rename(&from, &to).map_err(|error| DataError::Io { path: to, error })?;
        }
        self.finished = true;
        Ok(())
    }
}

impl Drop for IndexedWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(tmp(&bin_path(&self.prefix)));
            let _ = std::fs::remove_file(tmp(&idx_path(&self.prefix)));
        }
    }
}

fn tmp(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}
