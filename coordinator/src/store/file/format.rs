//! The file store's on-disk format and the blocking I/O around it: log frames, snapshots,
//! the directory's generations, recovery on open, and the atomic switch to a new
//! generation on compaction.
//!
//! # Directory
//!
//! A store directory holds one generation `g`: `snap-g` (absent for generation 0, whose
//! snapshot is the empty store) and `wal-g`, the log of everything written since `snap-g`.
//! Compaction writes generation `g + 1` — first `wal-(g+1)`, then `snap-(g+1)`, each to a
//! temporary file that is synced and renamed, then the directory is synced — and only then
//! deletes generation `g`. On open the newest snapshot chooses the generation, so a crash at
//! any point of a compaction leaves either the old generation or the new one complete;
//! leftovers of the other are removed.
//!
//! # Log
//!
//! `wal-g` starts with a 16-byte header (`FLOTWAL1` and `g` little-endian), followed by
//! frames: `len: u32 LE | crc: u32 LE | payload (len bytes)`, where `crc` is the CRC-32 of
//! the length bytes and the payload, and the payload is a count and that many entries. A
//! frame is what one write-and-`sync_data` puts on disk (the store's group commit), so a
//! crash can only tear the last frame, in any way (short, garbage, zeros, reordered pages).
//! On open a bad frame with no valid frame after it is such a torn tail: it was never
//! acknowledged, and the log is truncated before it with a warning. A bad frame followed by
//! a valid one is corruption of acknowledged data: opening fails, naming the file and the
//! frame's byte offset. A frame whose checksum holds but whose content does not decode is
//! always an error (it was written that way).
//!
//! # Snapshot
//!
//! `snap-g` is `FLOTSNP1`, the body (the key-value state at the compaction point, the lease
//! table, the next lease id) and a trailing CRC-32 of everything before it. It is only ever
//! installed whole (temporary file, sync, rename, directory sync), so any defect is an error.
//!
//! All integers are little-endian; strings and byte strings are a `u32` length and bytes.
//! Decoding never trusts a length or count beyond the bytes actually present.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::store::{EventKind, KeyValue, LeaseId, Revision, StoreError};

const WAL_MAGIC: &[u8; 8] = b"FLOTWAL1";
const SNAP_MAGIC: &[u8; 8] = b"FLOTSNP1";
const WAL_HEADER_LEN: usize = 16;
const FRAME_HEADER_LEN: usize = 8;
/// The group-commit batch is flushed once its encoded entries reach this size.
pub(super) const FLUSH_BYTES: usize = 32 << 20;

const TAG_WRITE: u8 = 1;
const TAG_GRANT: u8 = 2;
const TAG_REVOKE: u8 = 3;
const KIND_PUT: u8 = 1;
const KIND_DELETE: u8 = 2;

/// One change to one key. Key-values are shared (`Arc`) between the current state, the
/// compaction base, the history and the watchers, so history costs no copies.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Event {
    pub kind: EventKind,
    pub kv: Arc<KeyValue>,
}

/// The changes of one revision.
#[derive(Debug, PartialEq)]
pub(super) struct Commit {
    pub revision: Revision,
    pub events: Vec<Event>,
}

/// One logged state change.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Entry {
    /// A write transaction that changed something.
    Write(Arc<Commit>),
    /// A lease grant (leases live outside the revision sequence, as in etcd).
    Grant { lease: LeaseId, ttl_ms: u64 },
    /// The end of a lease (revoked or expired) together with the deletion of its keys in one
    /// revision, when it had keys.
    Revoke { lease: LeaseId, commit: Option<Arc<Commit>> },
}

/// The state a snapshot holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Snapshot {
    /// The revision the key-value state reflects (the compaction point minus one).
    pub revision: Revision,
    /// The earliest revision a watch may start from.
    pub compacted: Revision,
    pub next_lease: u64,
    /// Each lease and its TTL in milliseconds.
    pub leases: Vec<(LeaseId, u64)>,
    pub kvs: Vec<KeyValue>,
}

// ---------------------------------------------------------------------------------------
// Encoding

struct Enc<'a>(&'a mut Vec<u8>);

impl Enc<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Lengths are bounded by `MAX_TXN_BYTES` before anything is encoded.
    fn bytes(&mut self, b: &[u8]) {
        self.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(b);
    }
    fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    fn kv(&mut self, kv: &KeyValue) {
        self.bytes(kv.key.as_bytes());
        self.bytes(&kv.value);
        self.u64(kv.create_revision);
        self.u64(kv.mod_revision);
        self.u64(kv.version);
        self.u64(kv.lease.map_or(0, |l| l.0));
    }
    fn events(&mut self, events: &[Event]) {
        self.count(events.len());
        for event in events {
            self.u8(match event.kind {
                EventKind::Put => KIND_PUT,
                EventKind::Delete => KIND_DELETE,
            });
            self.kv(&event.kv);
        }
    }
    fn entry(&mut self, entry: &Entry) {
        match entry {
            Entry::Write(commit) => {
                self.u8(TAG_WRITE);
                self.u64(commit.revision);
                self.events(&commit.events);
            }
            Entry::Grant { lease, ttl_ms } => {
                self.u8(TAG_GRANT);
                self.u64(lease.0);
                self.u64(*ttl_ms);
            }
            Entry::Revoke { lease, commit } => {
                self.u8(TAG_REVOKE);
                self.u64(lease.0);
                match commit {
                    Some(commit) => {
                        self.u64(commit.revision);
                        self.events(&commit.events);
                    }
                    None => {
                        self.u64(0);
                        self.count(0);
                    }
                }
            }
        }
    }
}

/// Appends one frame holding `entries` to `out`. A frame's length field is 32 bits: a frame
/// of 4 GiB or more (only a single revision deleting that much, since batches are flushed
/// at [`FLUSH_BYTES`]) is refused rather than written wrong.
pub(super) fn encode_frame(entries: &[Entry], out: &mut Vec<u8>) -> Result<(), String> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    let mut enc = Enc(out);
    enc.count(entries.len());
    for entry in entries {
        enc.entry(entry);
    }
    let len = out.len() - start - FRAME_HEADER_LEN;
    let Ok(len) = u32::try_from(len) else {
        out.truncate(start);
        return Err(format!("a log record of {len} bytes exceeds the 4 GiB limit of the log format"));
    };
    let len_bytes = len.to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len_bytes);
    crc.update(&out[start + FRAME_HEADER_LEN..]);
    out[start..start + 4].copy_from_slice(&len_bytes);
    out[start + 4..start + 8].copy_from_slice(&crc.finalize().to_le_bytes());
    Ok(())
}

/// An estimate of an entry's encoded size, for the flush threshold.
pub(super) fn entry_size(entry: &Entry) -> usize {
    let commit = |commit: &Commit| -> usize {
        12 + commit.events.iter().map(|e| 1 + 8 + e.kv.key.len() + e.kv.value.len() + 32).sum::<usize>()
    };
    match entry {
        Entry::Write(c) => 1 + commit(c),
        Entry::Grant { .. } => 17,
        Entry::Revoke { commit: c, .. } => 9 + c.as_deref().map_or(12, commit),
    }
}

fn wal_header(generation: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(WAL_HEADER_LEN);
    out.extend_from_slice(WAL_MAGIC);
    out.extend_from_slice(&generation.to_le_bytes());
    out
}

/// The bytes of a whole log file: the header and one frame per entry.
pub(super) fn encode_log(generation: u64, entries: &[Entry]) -> Result<Vec<u8>, String> {
    let mut out = wal_header(generation);
    for entry in entries {
        encode_frame(std::slice::from_ref(entry), &mut out)?;
    }
    Ok(out)
}

/// The bytes of a snapshot file; `kvs` is the key-value state (borrowed, as the store
/// shares it with its history).
pub(super) fn encode_snapshot<'a>(
    header: &Snapshot,
    kvs: impl ExactSizeIterator<Item = &'a KeyValue>,
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(SNAP_MAGIC);
    let mut enc = Enc(&mut out);
    enc.u64(header.revision);
    enc.u64(header.compacted);
    enc.u64(header.next_lease);
    enc.count(header.leases.len());
    for (lease, ttl_ms) in &header.leases {
        enc.u64(lease.0);
        enc.u64(*ttl_ms);
    }
    enc.u64(kvs.len() as u64);
    for kv in kvs {
        enc.kv(kv);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

// ---------------------------------------------------------------------------------------
// Decoding

struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        match self.buf.get(self.pos..).and_then(|rest| rest.get(..n)) {
            Some(bytes) => {
                self.pos += n;
                Ok(bytes)
            }
            None => Err(format!("{what} runs past the end of its record ({n} bytes wanted)")),
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.take(8, what)?;
        let mut a = [0; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self, what: &str) -> Result<&'a [u8], String> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    fn kv(&mut self) -> Result<KeyValue, String> {
        let key =
            std::str::from_utf8(self.bytes("key")?).map_err(|_| "key is not UTF-8".to_string())?.to_string();
        let value = self.bytes("value")?.to_vec();
        let create_revision = self.u64("create revision")?;
        let mod_revision = self.u64("mod revision")?;
        let version = self.u64("version")?;
        let lease = match self.u64("lease")? {
            0 => None,
            id => Some(LeaseId(id)),
        };
        Ok(KeyValue { key, value, create_revision, mod_revision, version, lease })
    }
    fn commit(&mut self, revision: Revision) -> Result<Commit, String> {
        let n = self.u32("event count")?;
        // No capacity from an untrusted count: each event consumes bytes, so a bad count
        // ends in an error at the end of the buffer instead of a huge allocation.
        let mut events = Vec::new();
        for _ in 0..n {
            let kind = match self.u8("event kind")? {
                KIND_PUT => EventKind::Put,
                KIND_DELETE => EventKind::Delete,
                other => return Err(format!("unknown event kind {other}")),
            };
            events.push(Event { kind, kv: Arc::new(self.kv()?) });
        }
        Ok(Commit { revision, events })
    }
    fn entry(&mut self) -> Result<Entry, String> {
        match self.u8("entry tag")? {
            TAG_WRITE => {
                let revision = self.u64("revision")?;
                Ok(Entry::Write(Arc::new(self.commit(revision)?)))
            }
            TAG_GRANT => Ok(Entry::Grant { lease: LeaseId(self.u64("lease")?), ttl_ms: self.u64("ttl")? }),
            TAG_REVOKE => {
                let lease = LeaseId(self.u64("lease")?);
                let revision = self.u64("revision")?;
                let commit = self.commit(revision)?;
                let commit = if commit.events.is_empty() {
                    if revision != 0 {
                        return Err(format!("lease end with no deletions names revision {revision}"));
                    }
                    None
                } else {
                    Some(Arc::new(commit))
                };
                Ok(Entry::Revoke { lease, commit })
            }
            other => Err(format!("unknown entry tag {other}")),
        }
    }
    fn finish(&self) -> Result<(), String> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(format!("{} unexpected trailing bytes", self.buf.len() - self.pos))
        }
    }
}

fn decode_payload(payload: &[u8]) -> Result<Vec<Entry>, String> {
    let mut dec = Dec { buf: payload, pos: 0 };
    let n = dec.u32("entry count")?;
    let mut entries = Vec::new();
    for _ in 0..n {
        entries.push(dec.entry()?);
    }
    dec.finish()?;
    Ok(entries)
}

pub(super) fn decode_snapshot(path: &Path, bytes: &[u8]) -> Result<Snapshot, StoreError> {
    let corrupt = |offset: usize, reason: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason: format!("snapshot: {reason}"),
    };
    if bytes.len() < SNAP_MAGIC.len() + 4 || &bytes[..SNAP_MAGIC.len()] != SNAP_MAGIC {
        return Err(corrupt(0, "missing FLOTSNP1 header".into()));
    }
    let (body, trailer) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    if crc32fast::hash(body) != stored {
        return Err(corrupt(body.len(), "checksum mismatch".into()));
    }
    let mut dec = Dec { buf: body, pos: SNAP_MAGIC.len() };
    let parse = |dec: &mut Dec| -> Result<Snapshot, String> {
        let revision = dec.u64("revision")?;
        let compacted = dec.u64("compacted revision")?;
        let next_lease = dec.u64("next lease")?;
        let mut leases = Vec::new();
        for _ in 0..dec.u32("lease count")? {
            leases.push((LeaseId(dec.u64("lease")?), dec.u64("ttl")?));
        }
        let mut kvs = Vec::new();
        for _ in 0..dec.u64("key count")? {
            kvs.push(dec.kv()?);
        }
        dec.finish()?;
        Ok(Snapshot { revision, compacted, next_lease, leases, kvs })
    };
    parse(&mut dec).map_err(|reason| corrupt(dec.pos, reason))
}

/// What a frame at some offset turned out to be.
enum FrameAt {
    /// A valid frame and the offset just past it.
    Valid(Vec<Entry>, usize),
    /// Short, oversized or failing its checksum: what a torn write leaves.
    Bad(String),
    /// The checksum holds but the content does not decode.
    Undecodable(String),
}

fn frame_at(bytes: &[u8], offset: usize) -> FrameAt {
    let rest = &bytes[offset.min(bytes.len())..];
    if rest.len() < FRAME_HEADER_LEN {
        return FrameAt::Bad(format!("incomplete frame header ({} of 8 bytes)", rest.len()));
    }
    let len_bytes = [rest[0], rest[1], rest[2], rest[3]];
    let len = u32::from_le_bytes(len_bytes) as usize;
    let stored = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if len == 0 {
        // The encoder never writes an empty frame (it holds at least the entry count).
        return FrameAt::Bad("zero frame length".into());
    }
    let Some(payload) = rest.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
        return FrameAt::Bad(format!(
            "incomplete frame ({} of {len} payload bytes)",
            rest.len() - FRAME_HEADER_LEN
        ));
    };
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len_bytes);
    crc.update(payload);
    if crc.finalize() != stored {
        return FrameAt::Bad("checksum mismatch".into());
    }
    match decode_payload(payload) {
        Ok(entries) => FrameAt::Valid(entries, offset + FRAME_HEADER_LEN + len),
        Err(reason) => FrameAt::Undecodable(reason),
    }
}

/// A log file read back.
pub(super) struct LogScan {
    /// Each valid frame's byte offset and entries, in order.
    pub frames: Vec<(u64, Vec<Entry>)>,
    /// The length of the valid prefix; shorter than the file when the tail was torn.
    pub valid_len: u64,
    /// The torn tail's offset and defect, when there was one.
    pub torn: Option<(u64, String)>,
}

pub(super) fn scan_log(path: &Path, bytes: &[u8], generation: u64) -> Result<LogScan, StoreError> {
    let corrupt = |offset: usize, reason: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    if bytes.len() < WAL_HEADER_LEN || &bytes[..8] != WAL_MAGIC {
        return Err(corrupt(0, "missing FLOTWAL1 header".into()));
    }
    let mut g = [0; 8];
    g.copy_from_slice(&bytes[8..16]);
    if u64::from_le_bytes(g) != generation {
        return Err(corrupt(
            8,
            format!("header names generation {}, not {generation}", u64::from_le_bytes(g)),
        ));
    }
    let mut frames = Vec::new();
    let mut offset = WAL_HEADER_LEN;
    while offset < bytes.len() {
        match frame_at(bytes, offset) {
            FrameAt::Valid(entries, end) => {
                frames.push((offset as u64, entries));
                offset = end;
            }
            FrameAt::Undecodable(reason) => {
                return Err(corrupt(offset, format!("undecodable frame: {reason}")));
            }
            FrameAt::Bad(reason) => {
                // Torn only if nothing acknowledged follows: a valid frame at any later byte
                // means this one was followed by later writes, so it was once complete.
                if let Some(later) =
                    (offset + 1..bytes.len()).find(|&p| matches!(frame_at(bytes, p), FrameAt::Valid(..)))
                {
                    return Err(corrupt(
                        offset,
                        format!("{reason}, followed by a valid frame at offset {later}"),
                    ));
                }
                return Ok(LogScan { frames, valid_len: offset as u64, torn: Some((offset as u64, reason)) });
            }
        }
    }
    Ok(LogScan { frames, valid_len: bytes.len() as u64, torn: None })
}

// ---------------------------------------------------------------------------------------
// Files

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

pub(super) fn snap_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("snap-{generation}"))
}

pub(super) fn wal_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("wal-{generation}"))
}

/// Makes renames and removals in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Writes `bytes` to `path` so that after a crash the file is either absent/old or whole:
/// temporary file, `sync_data`, rename, directory sync.
fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(bytes).map_err(io_err(&tmp))?;
    file.sync_data().map_err(io_err(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_dir(dir)
}

/// The log being appended to.
pub(super) struct LogWriter {
    file: File,
    path: PathBuf,
}

impl LogWriter {
    fn open_append(path: PathBuf) -> Result<Self, StoreError> {
        let file = OpenOptions::new().append(true).open(&path).map_err(io_err(&path))?;
        Ok(LogWriter { file, path })
    }

    /// Appends frames and returns once they are durable.
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.file.write_all(bytes).map_err(io_err(&self.path))?;
        self.file.sync_data().map_err(io_err(&self.path))
    }
}

/// What [`recover`] found in a directory.
pub(super) struct Recovered {
    pub generation: u64,
    pub snapshot: Snapshot,
    /// The log's frames (offset, entries), for replay.
    pub frames: Vec<(u64, Vec<Entry>)>,
    pub wal_path: PathBuf,
    pub writer: LogWriter,
}

/// `snap-<g>` or `wal-<g>` (exactly as this module names them) to its kind and generation.
fn parse_name(name: &str) -> Option<(&str, u64)> {
    let (kind, generation) = name.split_once('-')?;
    let generation: u64 = generation.parse().ok()?;
    (matches!(kind, "snap" | "wal") && name == format!("{kind}-{generation}")).then_some((kind, generation))
}

/// Opens (creating if needed) a store directory: chooses the generation, removes what an
/// interrupted compaction left, reads the snapshot and the log, truncates a torn tail.
pub(super) fn recover(dir: &Path) -> Result<Recovered, StoreError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut snaps = Vec::new();
    let mut wals = Vec::new();
    let mut tmps = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(".tmp") {
            if parse_name(stem).is_some() {
                tmps.push(entry.path());
            }
            continue;
        }
        match parse_name(name) {
            Some(("snap", g)) => snaps.push(g),
            Some((_, g)) => wals.push(g),
            None => {}
        }
    }
    let generation = snaps.iter().copied().max().unwrap_or(0);
    let wal = wal_path(dir, generation);

    // Check everything before removing anything, so that a directory damaged from outside
    // is reported as found.
    if !wals.contains(&generation) && (generation != 0 || !wals.is_empty()) {
        // Compaction installs the log before the snapshot, so this is outside damage.
        return Err(StoreError::BadLayout {
            path: wal,
            reason: format!("missing: the log of snapshot generation {generation}"),
        });
    }
    if let Some(&g) = wals.iter().find(|&&g| g > generation + 1) {
        return Err(StoreError::BadLayout {
            path: wal_path(dir, g),
            reason: format!("a log of generation {g}, but the newest snapshot is of generation {generation}"),
        });
    }

    // An atomic write that never reached its rename.
    for path in tmps {
        fs::remove_file(&path).map_err(io_err(&path))?;
    }
    // Older generations: superseded by the newer snapshot (a compaction that crashed before
    // removing them); the next generation's log: a compaction that crashed before
    // installing its snapshot.
    for path in snaps
        .iter()
        .filter(|&&g| g < generation)
        .map(|&g| snap_path(dir, g))
        .chain(wals.iter().filter(|&&g| g != generation).map(|&g| wal_path(dir, g)))
    {
        tracing::warn!(path = %path.display(), "removing a file left by an interrupted compaction");
        fs::remove_file(&path).map_err(io_err(&path))?;
    }

    let snapshot = if generation == 0 {
        Snapshot::default()
    } else {
        let path = snap_path(dir, generation);
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        decode_snapshot(&path, &bytes)?
    };

    if !wals.contains(&generation) {
        write_atomically(dir, &wal, &wal_header(0))?;
    }
    let bytes = fs::read(&wal).map_err(io_err(&wal))?;
    let scan = scan_log(&wal, &bytes, generation)?;
    if let Some((offset, reason)) = &scan.torn {
        tracing::warn!(
            path = %wal.display(),
            offset,
            dropped_bytes = bytes.len() as u64 - offset,
            reason = reason.as_str(),
            "truncating a torn write at the end of the log (it was never acknowledged)"
        );
        let file = OpenOptions::new().write(true).open(&wal).map_err(io_err(&wal))?;
        file.set_len(scan.valid_len).map_err(io_err(&wal))?;
        file.sync_all().map_err(io_err(&wal))?;
    }
    let writer = LogWriter::open_append(wal.clone())?;
    Ok(Recovered { generation, snapshot, frames: scan.frames, wal_path: wal, writer })
}

/// Installs generation `generation` (its log, then its snapshot), removes the previous
/// one, and returns the writer of the new log. On error the store must stop writing: the
/// directory holds a complete generation, but which one is not known.
pub(super) fn install_generation(
    dir: &Path,
    generation: u64,
    log: &[u8],
    snapshot: &[u8],
) -> Result<LogWriter, StoreError> {
    let wal = wal_path(dir, generation);
    write_atomically(dir, &wal, log)?;
    write_atomically(dir, &snap_path(dir, generation), snapshot)?;
    let writer = LogWriter::open_append(wal)?;
    if let Some(previous) = generation.checked_sub(1) {
        for path in [snap_path(dir, previous), wal_path(dir, previous)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        sync_dir(dir)?;
    }
    Ok(writer)
}
