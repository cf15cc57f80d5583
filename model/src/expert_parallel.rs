//! Expert parallelism's seam (DeepSeek-V3 report §3.2.2, §3.4; DESIGN §1.4): the routed
//! experts of an MoE layer are split over the ranks of an expert-parallel (EP) group, and
//! tokens travel to the ranks that own their experts (dispatch) and back (combine).
//!
//! This crate knows nothing of networking: [`crate::moe::MoeLayer`] hands its messages, as
//! bytes, to an [`ExpertExchange`], which the worker implements over its data plane;
//! [`LocalExchange`] is the group of one (the whole model in one process). What the MoE
//! layer sends, and in which order, is documented in [`crate::moe`]; this module holds the
//! trait, the keys, the shard layout ([`ExpertShard`]) and the byte framing of a message.
//!
//! ## Message framing (every phase)
//! Every message passes between a home rank (whose tokens they are) and an owner (whose
//! experts run them), either way, and carries rows for the owner's `E = N / EP degree`
//! local experts, expert by expert, each expert's rows in the order the home rank's
//! dispatch layout gives them. Combine and BackwardCombine answer Dispatch and
//! BackwardDispatch with the same counts.
//!
//! ```text
//! (empty)                                 no rows at all: a zero-length buffer
//! | tag: u8 | counts: u32 LE × E | body | rows per local expert, then the rows
//! ```
//!
//! The body holds `R = Σ counts` rows of `hidden` elements, by tag:
//!
//! | tag | format | body |
//! | --- | --- | --- |
//! | 0 | f32 | `R·hidden` little-endian f32 |
//! | 1 | f64 | `R·hidden` little-endian f64 (f64 models: gradient checks) |
//! | 2 | BF16 | `R·hidden` little-endian BF16 bit patterns |
//! | 3 | FP8, exact scales | `R·hidden` E4M3 codes, then `R·⌈hidden/128⌉` little-endian f32 scales (1×128 tiles, a row's tiles in order) |
//! | 4 | FP8, power-of-two scales | as tag 3; the scales are UE8M0 powers of two |
//!
//! A receiver checks everything before using it: the tag, the header's length, the body's
//! length against the counts, counts against what it expects where it knows them, FP8
//! scales finite and positive and codes not NaN; a fault is a [`ModelError`] naming the
//! layer, the phase and the source rank, never a panic.
//!
//! A transport that moves rows rather than messages (the worker's node-aware dispatch,
//! which sends a token once per node however many of the node's experts chose it) cuts a
//! message into its header and whole rows with [`split_payload`] (an FP8 row: its codes,
//! then its scales) and rebuilds it byte for byte with [`join_payload`].

use crate::config::ConfigError;
use crate::precision::CachedActivation;
use crate::{ModelError, Real};
use flotilla_kernels::quant::{Fp8Matrix, Granularity, ScaleRounding, TILE};
use half::bf16;
use std::ops::Range;

/// Moves MoE tokens between the ranks of an expert-parallel group. Implemented by the
/// worker over its data plane; [`LocalExchange`] is the group of one.
///
/// Every rank of the group calls [`ExpertExchange::exchange`] with the same keys in the
/// same order within a chunk; the worker adds (micro-batch, stage) to the key when it
/// builds its tags, so the exchanges of two chunks may be in flight at once on different
/// threads.
pub trait ExpertExchange {
    /// The EP degree.
    fn group_size(&self) -> usize;
    /// This rank's index in the group.
    fn group_rank(&self) -> usize;
    /// Sends `outgoing[p]` to group rank `p` (own index included, may be empty) and returns
    /// what every rank sent to this one, indexed by source.
    fn exchange(&mut self, key: ExchangeKey, outgoing: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, ModelError>;
}

/// Which exchange of which layer a message belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExchangeKey {
    /// The HF layer index of the MoE layer (`model.layers.{layer}.mlp`).
    pub layer: usize,
    /// Which of the layer's four exchanges.
    pub phase: ExchangePhase,
}

/// The four exchanges of an MoE layer, in the order a training step makes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExchangePhase {
    /// Forward: the experts' input rows, home rank → owner.
    Dispatch,
    /// Forward: the unweighted expert outputs, owner → home rank.
    Combine,
    /// Backward B: the weighted output gradients `w·dy`, home rank → owner.
    BackwardDispatch,
    /// Backward B: the experts' input gradients, owner → home rank.
    BackwardCombine,
}

/// The group of one: every routed expert is local, and `exchange` returns `outgoing`
/// unchanged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalExchange;

impl ExpertExchange for LocalExchange {
    fn group_size(&self) -> usize {
        1
    }

    fn group_rank(&self) -> usize {
        0
    }

    fn exchange(&mut self, key: ExchangeKey, outgoing: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, ModelError> {
        if outgoing.len() != 1 {
            return Err(ModelError::Tensor {
                tensor: format!("model.layers.{}.mlp", key.layer),
                detail: format!(
                    "{:?}: {} messages for a local exchange (group of 1)",
                    key.phase,
                    outgoing.len()
                ),
            });
        }
        Ok(outgoing)
    }
}

/// Which routed experts a rank holds: EP rank `rank` of `size` holds experts
/// `rank·N/size .. (rank+1)·N/size` of `N = n_routed_experts` (`size` must divide `N`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExpertShard {
    /// This rank's index in the EP group.
    pub rank: usize,
    /// The EP degree.
    pub size: usize,
}

impl Default for ExpertShard {
    fn default() -> Self {
        ExpertShard::FULL
    }
}

impl ExpertShard {
    /// Every expert: shard 0 of 1.
    pub const FULL: ExpertShard = ExpertShard { rank: 0, size: 1 };

    /// Checks the shard against `n_routed` experts: `size ≥ 1` divides `n_routed` (an error
    /// naming `n_routed_experts` otherwise) and `rank < size`.
    pub fn check(self, n_routed: usize) -> Result<(), ModelError> {
        if self.size == 0 || !n_routed.is_multiple_of(self.size) {
            return Err(ModelError::Config(ConfigError::InvalidField {
                field: "n_routed_experts",
                detail: format!(
                    "expert parallelism needs the EP degree to divide n_routed_experts = {n_routed}, got EP degree {}",
                    self.size
                ),
            }));
        }
        if self.rank >= self.size {
            return Err(ModelError::Tensor {
                tensor: "expert shard".into(),
                detail: format!("EP rank {} is outside a group of {}", self.rank, self.size),
            });
        }
        Ok(())
    }

    /// Experts per rank, `n_routed / size` (the shard checked).
    pub fn experts_per_rank(self, n_routed: usize) -> Result<usize, ModelError> {
        self.check(n_routed)?;
        Ok(n_routed / self.size)
    }

    /// The experts this shard holds (the shard checked).
    pub fn experts(self, n_routed: usize) -> Result<Range<usize>, ModelError> {
        let per = self.experts_per_rank(n_routed)?;
        Ok(self.rank * per..(self.rank + 1) * per)
    }
}

/// The element format of a message body (see the module docs for the tags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wire {
    F32,
    F64,
    Bf16,
    Fp8(ScaleRounding),
}

impl Wire {
    /// `T`'s own values, lossless.
    pub(crate) fn native<T: Real>() -> Wire {
        if T::as_f32_slice(&[]).is_some() { Wire::F32 } else { Wire::F64 }
    }

    fn tag(self) -> u8 {
        match self {
            Wire::F32 => 0,
            Wire::F64 => 1,
            Wire::Bf16 => 2,
            Wire::Fp8(ScaleRounding::Exact) => 3,
            Wire::Fp8(ScaleRounding::PowerOfTwo) => 4,
        }
    }

    fn from_tag(tag: u8) -> Option<Wire> {
        Some(match tag {
            0 => Wire::F32,
            1 => Wire::F64,
            2 => Wire::Bf16,
            3 => Wire::Fp8(ScaleRounding::Exact),
            4 => Wire::Fp8(ScaleRounding::PowerOfTwo),
            _ => return None,
        })
    }

    /// Bytes of one row of `cols` elements.
    fn row_bytes(self, cols: usize) -> usize {
        match self {
            Wire::F32 => 4 * cols,
            Wire::F64 => 8 * cols,
            Wire::Bf16 => 2 * cols,
            Wire::Fp8(_) => cols + 4 * cols.div_ceil(TILE),
        }
    }

    /// A short name for errors.
    fn name(self) -> &'static str {
        match self {
            Wire::F32 => "f32",
            Wire::F64 => "f64",
            Wire::Bf16 => "BF16",
            Wire::Fp8(_) => "FP8",
        }
    }
}

fn header_bytes(experts: usize) -> usize {
    1 + 4 * experts
}

/// Bytes of one row of `hidden` elements in the format `tag` (module docs): `4·hidden`
/// (f32), `8·hidden` (f64), `2·hidden` (BF16), or `hidden + 4·⌈hidden/128⌉` (FP8: codes
/// and the row's scales). `None` for an unknown tag or a size that overflows.
pub fn payload_row_bytes(tag: u8, hidden: usize) -> Option<usize> {
    match Wire::from_tag(tag)? {
        Wire::F32 => hidden.checked_mul(4),
        Wire::F64 => hidden.checked_mul(8),
        Wire::Bf16 => hidden.checked_mul(2),
        Wire::Fp8(_) => hidden.checked_add(hidden.div_ceil(TILE).checked_mul(4)?),
    }
}

/// A non-empty message cut into its header and whole rows by [`split_payload`]: what a
/// transport needs to move rows one by one (to deduplicate them, say) and rebuild the
/// message byte for byte with [`join_payload`]. Only the framing is checked, not the
/// values (FP8 codes and scales are the receiving layer's to check).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayloadRows {
    /// The format tag (module docs).
    pub tag: u8,
    /// Rows per owner-local expert, as the header gives them.
    pub counts: Vec<u32>,
    /// Bytes of one row ([`payload_row_bytes`]), at least 1.
    pub row_bytes: usize,
    /// The rows in message order, `row_bytes` each; an FP8 row is its `hidden` codes
    /// followed by its `⌈hidden/128⌉` little-endian f32 scales (in the message the codes
    /// of all rows come first, then all scales).
    pub rows: Vec<u8>,
}

impl PayloadRows {
    /// Rows held (`Σ counts`).
    pub fn len(&self) -> usize {
        self.rows.len() / self.row_bytes
    }

    /// Whether no row is held (a header with zero counts).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows in message order.
    pub fn iter_rows(&self) -> std::slice::ChunksExact<'_, u8> {
        self.rows.chunks_exact(self.row_bytes)
    }
}

/// The FP8 part sizes of a row of `hidden` elements: (code bytes, scale bytes), or `None`
/// when `tag` is not FP8.
fn fp8_parts(tag: u8, hidden: usize) -> Option<(usize, usize)> {
    match Wire::from_tag(tag)? {
        Wire::Fp8(_) => Some((hidden, 4 * hidden.div_ceil(TILE))),
        _ => None,
    }
}

/// Cuts a message of `experts` owner-local experts and `hidden`-wide rows into its header
/// and whole rows; `None` for the empty message. The error says what is wrong with the
/// framing (unknown tag, a header or body of the wrong length), for the caller to place.
pub fn split_payload(bytes: &[u8], experts: usize, hidden: usize) -> Result<Option<PayloadRows>, String> {
    if bytes.is_empty() {
        return Ok(None);
    }
    if hidden == 0 {
        return Err("rows of width 0".into());
    }
    let header = experts.checked_mul(4).and_then(|b| b.checked_add(1)).ok_or("the header size overflows")?;
    if bytes.len() < header {
        return Err(format!("{} bytes, shorter than its {header}-byte header", bytes.len()));
    }
    let tag = bytes[0];
    let row_bytes = payload_row_bytes(tag, hidden).ok_or_else(|| format!("unknown format tag {tag}"))?;
    let counts: Vec<u32> =
        bytes[1..header].chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let rows =
        counts.iter().try_fold(0usize, |a, &c| a.checked_add(c as usize)).ok_or("row counts overflow")?;
    let body = &bytes[header..];
    if Some(body.len()) != rows.checked_mul(row_bytes) {
        return Err(format!("{} body bytes for {rows} rows of {row_bytes} bytes", body.len()));
    }
    let rows = match fp8_parts(tag, hidden) {
        None => body.to_vec(),
        Some((code_bytes, scale_bytes)) => {
            let (codes, scales) = body.split_at(rows * code_bytes);
            let mut out = Vec::with_capacity(body.len());
            for (c, s) in codes.chunks_exact(code_bytes).zip(scales.chunks_exact(scale_bytes)) {
                out.extend_from_slice(c);
                out.extend_from_slice(s);
            }
            out
        }
    };
    Ok(Some(PayloadRows { tag, counts, row_bytes, rows }))
}

/// Builds the message with format `tag`, header `counts` and `rows` (each a whole row of
/// [`payload_row_bytes`] bytes, in message order, `Σ counts` of them): the inverse of
/// [`split_payload`], byte for byte. The header is always written (the empty message is
/// the caller's to make). The error says which row or count is wrong.
pub fn join_payload<'r>(
    tag: u8,
    counts: &[u32],
    hidden: usize,
    rows: impl IntoIterator<Item = &'r [u8]>,
) -> Result<Vec<u8>, String> {
    if hidden == 0 {
        return Err("rows of width 0".into());
    }
    let row_bytes = payload_row_bytes(tag, hidden).ok_or_else(|| format!("unknown format tag {tag}"))?;
    let want =
        counts.iter().try_fold(0usize, |a, &c| a.checked_add(c as usize)).ok_or("row counts overflow")?;
    let size = want
        .checked_mul(row_bytes)
        .and_then(|b| b.checked_add(header_bytes(counts.len())))
        .ok_or("the message size overflows")?;
    let mut out = Vec::with_capacity(size);
    out.push(tag);
    counts.iter().for_each(|c| out.extend_from_slice(&c.to_le_bytes()));
    let fp8 = fp8_parts(tag, hidden);
    let mut scales = Vec::with_capacity(fp8.map_or(0, |(_, s)| want * s));
    let mut got = 0usize;
    for row in rows {
        if row.len() != row_bytes {
            return Err(format!("row {got} has {} bytes, not {row_bytes}", row.len()));
        }
        if got == want {
            return Err(format!("more rows than the {want} the counts announce"));
        }
        match fp8 {
            None => out.extend_from_slice(row),
            Some((code_bytes, _)) => {
                out.extend_from_slice(&row[..code_bytes]);
                scales.extend_from_slice(&row[code_bytes..]);
            }
        }
        got += 1;
    }
    if got != want {
        return Err(format!("{got} rows where the counts announce {want}"));
    }
    out.append(&mut scales);
    Ok(out)
}

/// One message's place, for errors: the layer's tensor name, the phase, and the peer
/// (the source of a received message, the destination of a sent one).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Link<'a> {
    pub(crate) tensor: &'a str,
    pub(crate) phase: ExchangePhase,
    pub(crate) peer: usize,
    pub(crate) received: bool,
}

impl Link<'_> {
    pub(crate) fn error(&self, detail: impl std::fmt::Display) -> ModelError {
        let dir = if self.received { "from" } else { "to" };
        ModelError::Tensor {
            tensor: self.tensor.to_string(),
            detail: format!("{:?} message {dir} EP group rank {}: {detail}", self.phase, self.peer),
        }
    }
}

/// Builds one message: the header from `counts` (rows per expert), then rows pushed in
/// order. A message with no rows is the empty buffer.
pub(crate) struct Encoder<'a> {
    link: Link<'a>,
    wire: Wire,
    cols: usize,
    rows: usize,
    pushed: usize,
    buf: Vec<u8>,
    /// FP8 scales, appended after the codes by [`Encoder::finish`].
    scales: Vec<u8>,
}

impl<'a> Encoder<'a> {
    pub(crate) fn new(link: Link<'a>, wire: Wire, counts: &[usize], cols: usize) -> Result<Self, ModelError> {
        let rows: usize = counts.iter().sum();
        let mut buf = Vec::new();
        if rows > 0 {
            let body = rows
                .checked_mul(wire.row_bytes(cols))
                .ok_or_else(|| link.error("its size overflows usize"))?;
            buf.reserve_exact(header_bytes(counts.len()) + body);
            buf.push(wire.tag());
            for &c in counts {
                let c =
                    u32::try_from(c).map_err(|_| link.error(format!("{c} rows of one expert exceed u32")))?;
                buf.extend_from_slice(&c.to_le_bytes());
            }
        }
        Ok(Encoder { link, wire, cols, rows, pushed: 0, buf, scales: Vec::new() })
    }

    /// Appends rows of values (`[_, cols]`).
    pub(crate) fn push_values<T: Real>(&mut self, v: &[T]) -> Result<(), ModelError> {
        self.pushed += v.len().checked_div(self.cols).unwrap_or(0);
        let start = self.buf.len();
        match (self.wire, T::as_f32_slice(v)) {
            (Wire::F32, Some(v)) => {
                self.buf.resize(start + 4 * v.len(), 0);
                let out = self.buf[start..].chunks_exact_mut(4);
                out.zip(v).for_each(|(b, x)| b.copy_from_slice(&x.to_le_bytes()));
            }
            (Wire::Bf16, Some(v)) => {
                self.buf.resize(start + 2 * v.len(), 0);
                let out = self.buf[start..].chunks_exact_mut(2);
                out.zip(v).for_each(|(b, &x)| b.copy_from_slice(&bf16::from_f32(x).to_bits().to_le_bytes()));
            }
            (Wire::F64, None) => {
                self.buf.resize(start + 8 * v.len(), 0);
                let out = self.buf[start..].chunks_exact_mut(8);
                out.zip(v)
                    .for_each(|(b, x)| b.copy_from_slice(&x.to_f64().expect("f64 converts").to_le_bytes()));
            }
            (wire, _) => {
                let size = std::mem::size_of::<T>();
                return Err(self.link.error(format!("cannot send {size}-byte floats as {}", wire.name())));
            }
        }
        Ok(())
    }

    /// Appends rows `rows` of an activation as kept: an FP8 one's codes and scales as they
    /// are (the message must be FP8, [`kept_wire`]), a full one's values in the message's
    /// format. Every index must be a row of `x`.
    pub(crate) fn push_gathered<T: Real>(
        &mut self,
        x: &CachedActivation<T>,
        rows: &[usize],
    ) -> Result<(), ModelError> {
        let cols = self.cols;
        match x {
            CachedActivation::Full(v) => {
                for &r in rows {
                    self.push_values(&v[r * cols..(r + 1) * cols])?;
                }
            }
            CachedActivation::Fp8 { matrix, .. } => {
                if !matches!(self.wire, Wire::Fp8(_)) || matrix.cols != cols {
                    return Err(self.link.error(format!(
                        "FP8 rows of width {} in a {} message of width {cols}",
                        matrix.cols,
                        self.wire.name()
                    )));
                }
                let tiles = cols.div_ceil(TILE);
                for &r in rows {
                    self.buf.extend_from_slice(&matrix.codes[r * cols..(r + 1) * cols]);
                    for s in &matrix.scales[r * tiles..(r + 1) * tiles] {
                        self.scales.extend_from_slice(&s.to_le_bytes());
                    }
                }
                self.pushed += rows.len();
            }
        }
        Ok(())
    }

    /// The message; every row announced in the header must have been pushed.
    pub(crate) fn finish(mut self) -> Result<Vec<u8>, ModelError> {
        if self.pushed != self.rows {
            return Err(self.link.error(format!("{} rows written, {} announced", self.pushed, self.rows)));
        }
        self.buf.append(&mut self.scales);
        Ok(self.buf)
    }
}

/// The format an activation is sent in as kept: FP8 codes and scales as they are, a full
/// one as `full`.
pub(crate) fn kept_wire<T: Real>(x: &CachedActivation<T>, full: Wire) -> Wire {
    match x {
        CachedActivation::Full(_) => full,
        CachedActivation::Fp8 { rounding, .. } => Wire::Fp8(*rounding),
    }
}

/// A received message, checked: its format, its rows per expert, and its body.
pub(crate) struct Message<'a> {
    /// `None` for an empty message (no rows).
    pub(crate) wire: Option<Wire>,
    /// Rows per expert.
    pub(crate) counts: Vec<usize>,
    /// Where each expert's rows start in the body (`[experts + 1]`).
    starts: Vec<usize>,
    body: &'a [u8],
    cols: usize,
}

impl<'a> Message<'a> {
    /// Parses and checks `bytes`, a message of `cols`-wide rows for `experts` experts, in
    /// the format `expected` when given.
    pub(crate) fn parse(
        link: Link<'_>,
        bytes: &'a [u8],
        experts: usize,
        cols: usize,
        expected: Option<Wire>,
    ) -> Result<Self, ModelError> {
        if bytes.is_empty() {
            let (counts, starts) = (vec![0; experts], vec![0; experts + 1]);
            return Ok(Message { wire: None, counts, starts, body: bytes, cols });
        }
        let header = header_bytes(experts);
        if bytes.len() < header {
            return Err(link.error(format!("{} bytes, shorter than its {header}-byte header", bytes.len())));
        }
        let wire =
            Wire::from_tag(bytes[0]).ok_or_else(|| link.error(format!("unknown format tag {}", bytes[0])))?;
        if let Some(e) = expected.filter(|&e| e != wire) {
            return Err(link.error(format!("{} rows, expected {}", wire.name(), e.name())));
        }
        let counts: Vec<usize> = bytes[1..header]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
            .collect();
        let mut starts = vec![0usize];
        for &c in &counts {
            let next =
                starts[starts.len() - 1].checked_add(c).ok_or_else(|| link.error("row counts overflow"))?;
            starts.push(next);
        }
        let rows = starts[experts];
        let body = &bytes[header..];
        let expected =
            rows.checked_mul(wire.row_bytes(cols)).ok_or_else(|| link.error("row counts overflow"))?;
        if body.len() != expected {
            return Err(link.error(format!(
                "{} body bytes, expected {expected} for {rows} {} rows of {cols} (rows per expert {counts:?})",
                body.len(),
                wire.name()
            )));
        }
        if let Wire::Fp8(_) = wire {
            let (codes, scales) = body.split_at(rows * cols);
            if let Some(i) = codes.iter().position(|&c| c & 0x7F == 0x7F) {
                return Err(link.error(format!("FP8 code {i} is NaN")));
            }
            for (i, s) in scales.chunks_exact(4).enumerate() {
                let s = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                if !(s.is_finite() && s > 0.0) {
                    return Err(link.error(format!("FP8 scale {i} is {s}, not finite and positive")));
                }
            }
        }
        Ok(Message { wire: Some(wire), counts, starts, body, cols })
    }

    /// Checks that the message holds `expected` rows per expert (what this rank sent, or
    /// received in the matching earlier phase).
    pub(crate) fn expect_counts(&self, link: Link<'_>, expected: &[usize]) -> Result<(), ModelError> {
        if self.counts != expected {
            return Err(link.error(format!("rows per expert {:?}, expected {expected:?}", self.counts)));
        }
        Ok(())
    }

    /// All rows.
    fn rows(&self) -> usize {
        self.starts[self.starts.len() - 1]
    }

    /// Appends expert `j`'s rows as values of `T` (the message not FP8).
    pub(crate) fn append_values<T: Real>(
        &self,
        link: Link<'_>,
        j: usize,
        out: &mut Vec<T>,
    ) -> Result<(), ModelError> {
        let Some(wire) = self.wire else { return Ok(()) };
        let row_bytes = wire.row_bytes(self.cols);
        let (r0, r1) = (self.starts[j], self.starts[j + 1]);
        let bytes = &self.body[r0 * row_bytes..r1 * row_bytes];
        let start = out.len();
        out.resize(start + (r1 - r0) * self.cols, T::zero());
        let target = &mut out[start..];
        match (wire, T::as_f32_slice_mut(target)) {
            (Wire::F32, Some(t)) => {
                for (v, b) in t.iter_mut().zip(bytes.chunks_exact(4)) {
                    *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            (Wire::Bf16, Some(t)) => {
                for (v, b) in t.iter_mut().zip(bytes.chunks_exact(2)) {
                    *v = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
            (Wire::F64, None) => {
                for (v, b) in target.iter_mut().zip(bytes.chunks_exact(8)) {
                    let x = f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                    *v = T::from(x).expect("f64 converts to the float type");
                }
            }
            (wire, _) => {
                out.truncate(start);
                let size = std::mem::size_of::<T>();
                return Err(link.error(format!("{} rows cannot be read as {size}-byte floats", wire.name())));
            }
        }
        Ok(())
    }

    /// Appends expert `j`'s codes and scales (the message FP8).
    fn append_fp8(&self, j: usize, codes: &mut Vec<u8>, scales: &mut Vec<f32>) {
        let (r0, r1) = (self.starts[j], self.starts[j + 1]);
        let tiles = self.cols.div_ceil(TILE);
        codes.extend_from_slice(&self.body[r0 * self.cols..r1 * self.cols]);
        let scale_bytes = &self.body[self.rows() * self.cols..][r0 * tiles * 4..r1 * tiles * 4];
        scales.extend(scale_bytes.chunks_exact(4).map(|s| f32::from_le_bytes([s[0], s[1], s[2], s[3]])));
    }
}

/// Expert `j`'s rows from every source (`messages`, by source rank) concatenated in source
/// order, as an activation: FP8 codes and scales when the sources sent FP8, values
/// otherwise. All non-empty messages must share one format; `link(s)` names source `s`.
pub(crate) fn concat_rows<'l, T: Real>(
    messages: &[Message<'_>],
    j: usize,
    cols: usize,
    link: impl Fn(usize) -> Link<'l>,
) -> Result<CachedActivation<T>, ModelError> {
    let rows: usize = messages.iter().map(|m| m.counts[j]).sum();
    let mut first: Option<(Wire, usize)> = None;
    for (s, m) in messages.iter().enumerate() {
        match (first, m.wire) {
            (None, Some(w)) => first = Some((w, s)),
            (Some((w, f)), Some(v)) if w != v => {
                return Err(link(s).error(format!(
                    "{} rows where group rank {f} sent {} rows",
                    v.name(),
                    w.name()
                )));
            }
            _ => {}
        }
    }
    match first {
        Some((Wire::Fp8(rounding), _)) => {
            let tiles = cols.div_ceil(TILE);
            let (mut codes, mut scales) = (Vec::with_capacity(rows * cols), Vec::with_capacity(rows * tiles));
            for m in messages {
                m.append_fp8(j, &mut codes, &mut scales);
            }
            let matrix = Fp8Matrix::from_parts(rows, cols, codes, scales, Granularity::Tile1x128)?;
            Ok(CachedActivation::Fp8 { matrix, rounding })
        }
        _ => Ok(CachedActivation::Full(concat_values(messages, j, cols, link)?)),
    }
}

/// Expert `j`'s rows from every source as values, concatenated in source order (the
/// messages not FP8).
pub(crate) fn concat_values<'l, T: Real>(
    messages: &[Message<'_>],
    j: usize,
    cols: usize,
    link: impl Fn(usize) -> Link<'l>,
) -> Result<Vec<T>, ModelError> {
    let rows: usize = messages.iter().map(|m| m.counts[j]).sum();
    let mut out = Vec::with_capacity(rows * cols);
    for (s, m) in messages.iter().enumerate() {
        m.append_values(link(s), j, &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Precision;

    const LINK: Link<'static> =
        Link { tensor: "model.layers.1.mlp", phase: ExchangePhase::Dispatch, peer: 1, received: false };

    fn values(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect()
    }

    #[test]
    fn f32_and_bf16_messages_split_into_rows_and_join_back() {
        let cols = 5;
        let x = values(4, cols);
        for wire in [Wire::F32, Wire::Bf16] {
            let counts = [2, 0, 3];
            let mut e = Encoder::new(LINK, wire, &counts, cols).unwrap();
            for r in [3, 1, 0, 0, 2] {
                e.push_values(&x[r * cols..(r + 1) * cols]).unwrap();
            }
            let message = e.finish().unwrap();
            let split = split_payload(&message, 3, cols).unwrap().expect("rows");
            assert_eq!((split.tag, split.counts.clone(), split.len()), (wire.tag(), vec![2, 0, 3], 5));
            assert_eq!(split.row_bytes, payload_row_bytes(wire.tag(), cols).unwrap());
            let rows: Vec<&[u8]> = split.iter_rows().collect();
            assert_eq!(rows[2], rows[3], "row 0 pushed twice");
            assert_eq!(join_payload(split.tag, &split.counts, cols, rows).unwrap(), message);
        }
    }

    #[test]
    fn fp8_rows_carry_their_codes_and_scales() {
        // 200 columns: two 1×128 tiles, the second partial.
        let (n, cols) = (3, 200);
        let be = flotilla_kernels::backend::DeviceBackend::default();
        let x =
            CachedActivation::new(&be, Precision::Fp8, values(n, cols), n, cols, ScaleRounding::Exact, "x")
                .unwrap();
        let CachedActivation::Fp8 { matrix, .. } = &x else { panic!("fp8 keeps FP8") };
        let order = [2, 0, 2, 1];
        let mut e = Encoder::new(LINK, kept_wire(&x, Wire::F32), &[1, 3], cols).unwrap();
        e.push_gathered(&x, &order).unwrap();
        let message = e.finish().unwrap();
        let split = split_payload(&message, 2, cols).unwrap().expect("rows");
        assert_eq!((split.tag, split.row_bytes), (3, cols + 8));
        for (row, &r) in split.iter_rows().zip(&order) {
            assert_eq!(&row[..cols], &matrix.codes[r * cols..(r + 1) * cols]);
            let scales: Vec<f32> =
                row[cols..].chunks_exact(4).map(|s| f32::from_le_bytes([s[0], s[1], s[2], s[3]])).collect();
            assert_eq!(scales, matrix.scales[r * 2..(r + 1) * 2]);
        }
        assert_eq!(join_payload(3, &split.counts, cols, split.iter_rows()).unwrap(), message);
    }

    #[test]
    fn empty_and_header_only_messages_round_trip() {
        assert_eq!(split_payload(&[], 4, 8).unwrap(), None);
        let header_only = [0u8, 0, 0, 0, 0, 0, 0, 0, 0];
        let split = split_payload(&header_only, 2, 8).unwrap().expect("a header");
        assert!(split.is_empty() && split.counts == [0, 0]);
        assert_eq!(join_payload(0, &split.counts, 8, split.iter_rows()).unwrap(), header_only);
    }

    #[test]
    fn malformed_framing_is_an_error() {
        let mut e = Encoder::new(LINK, Wire::F32, &[1, 1], 2).unwrap();
        e.push_values(&[1.0f32, 2.0, 3.0, 4.0]).unwrap();
        let message = e.finish().unwrap();
        let err = |r: Result<Option<PayloadRows>, String>| r.expect_err("refused");
        assert!(err(split_payload(&message[..message.len() - 1], 2, 2)).contains("body bytes"));
        assert!(err(split_payload(&message[..5], 2, 2)).contains("header"));
        let mut bad = message.clone();
        bad[0] = 9;
        assert!(err(split_payload(&bad, 2, 2)).contains("tag 9"));
        assert!(err(split_payload(&message, 2, 0)).contains("width 0"));
        let row = [0u8; 8];
        assert!(join_payload(0, &[1, 1], 2, [&row[..]]).unwrap_err().contains("1 rows where"));
        assert!(join_payload(0, &[1], 2, [&row[..], &row[..]]).unwrap_err().contains("more rows"));
        assert!(join_payload(0, &[1], 2, [&row[..7]]).unwrap_err().contains("7 bytes"));
        assert!(join_payload(7, &[1], 2, [&row[..]]).unwrap_err().contains("tag 7"));
    }
}
