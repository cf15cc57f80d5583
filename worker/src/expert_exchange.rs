//! The MoE all-to-all of a pipeline chunk over the data plane (DESIGN §1.4): what the
//! model's [`ExpertExchange`] asks for — send buffer `p` to EP rank `p`, return what every
//! EP rank sent here — as point-to-point messages tagged with the chunk, the layer and the
//! phase, so that two chunks' exchanges (DualPipe's overlapped pairs, on two threads) can
//! be in flight at once without mixing.
//!
//! # Flat and two-hop
//! Inside one node (no node ids, or one node id for the whole EP group) every exchange is
//! *flat*: buffer `p` goes straight to EP rank `p` (tag kind 3, [`tags::expert`]).
//!
//! When the EP group spans several nodes ([`EpTopology`], from the plan's node ids), the
//! **Dispatch** goes in two hops, as DeepSeek-V3's does (a token crosses InfiniBand to each
//! target node once, to the GPU with the same in-node index, and NVLink takes it on):
//!
//! 1. Buffers for ranks on this rank's own node go straight, as flat.
//! 2. For each other node `N`, this rank packs its buffers for all of `N`'s members into
//!    one *node message* ([`encode_node_message`]) and sends it to its *gateway* on `N`:
//!    the member of the group on `N` whose index among `N`'s members is this rank's index
//!    among its own node's members, modulo `N`'s member count (tag kind 5,
//!    [`tags::expert_node`]).
//! 3. A gateway unpacks each node message it receives ([`decode_node_message`]) and
//!    forwards every member of its node its buffer (tag kind 6, [`tags::expert_forward`],
//!    which names the EP rank whose buffer it is), keeping its own.
//!
//! A node message **deduplicates rows by content**: the model's dispatch sends a token's
//! row once per chosen expert, so a token routed to several experts of node `N` (on one
//! rank or several) would cross as often; in the node message each distinct row (its
//! bytes: values, or FP8 codes and scales) is stored once, and each destination's buffer is
//! its header counts plus indices into those rows. The gateway rebuilds every buffer byte
//! for byte ([`flotilla_model::expert_parallel::join_payload`]), so a destination receives
//! exactly what the flat exchange would have delivered and training is bit-identical to
//! flat. A buffer that does not split into rows (malformed, or in another format than the
//! node message's rows) travels raw, unchanged, and the receiving layer judges it as
//! always.
//!
//! ```text
//! node message (little-endian):
//! | row tag: u8 (0xFF: no rows) | experts E: u32 | unique rows U: u32 | destinations D: u32 |
//! | D × entry | U × row (payload_row_bytes(row tag, hidden) bytes each) |
//! entry: | EP rank: u32 | kind: u8 | ...
//!   kind 0 (empty buffer)  nothing more
//!   kind 1 (rows)          counts: u32 × E | row indices: u32 × Σ counts
//!   kind 2 (raw)           length: u32 | the buffer
//! ```
//!
//! Destinations are the gateway node's members in EP order; a gateway checks every field
//! against what it expects (its node's members, `E`, indices below `U`, lengths) and a
//! malformed node message is an error naming the sending EP and world rank, the layer and
//! the phase, never a panic.
//!
//! Combine, BackwardDispatch and BackwardCombine stay flat. Combine carries the owners'
//! per-expert outputs, which the home rank needs un-reduced (the routing weights' gradient
//! `dL/dw = ⟨dy, expert(x)⟩` takes each on its own), so a gateway could not sum them, and
//! rows of different experts never repeat. BackwardDispatch rows are `w·dy` per (token,
//! expert), different for every expert of a token; BackwardCombine rows are per-expert input
//! gradients that the home sums in a fixed order (summing them on the way would change
//! bits). With nothing to deduplicate, a second hop would only add an NVLink transfer.
//!
//! Each exchange counts what it moved and how long it waited ([`ExchangeStats`]),
//! including what a flat exchange would have sent across nodes, so a step shows the
//! dispatch's saving.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use flotilla_model::ModelError;
use flotilla_model::expert_parallel::{PayloadRows, join_payload, payload_row_bytes, split_payload};
use flotilla_model::moe::{ExchangeKey, ExchangePhase, ExpertExchange};
use tokio::runtime::Handle;

use crate::comm::Communicator;
use crate::tags::{self, Chunk};

/// What the MoE exchanges of a step moved and waited.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ExchangeStats {
    /// Exchanges run (one per MoE layer and phase of each chunk).
    pub exchanges: u64,
    /// Bytes sent to other ranks: buffers, node messages and forwarded buffers.
    pub bytes_sent: u64,
    /// Of those, bytes that left this rank's node.
    pub cross_node_bytes: u64,
    /// Bytes a flat exchange would have sent across nodes for the same exchanges (this
    /// rank's buffers for EP ranks on other nodes); `cross_node_bytes` over this is what
    /// the two-hop dispatch leaves of the cross-node traffic.
    pub cross_node_bytes_flat: u64,
    /// Seconds from the first send of an exchange until its last receive completed, summed.
    pub wait_seconds: f64,
}

impl ExchangeStats {
    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &ExchangeStats) {
        self.exchanges += other.exchanges;
        self.bytes_sent += other.bytes_sent;
        self.cross_node_bytes += other.cross_node_bytes;
        self.cross_node_bytes_flat += other.cross_node_bytes_flat;
        self.wait_seconds += other.wait_seconds;
    }

    /// Counts `bytes` sent to another rank, `remote` when it is on another node.
    fn sent(&mut self, bytes: usize, remote: bool) {
        self.bytes_sent += bytes as u64;
        if remote {
            self.cross_node_bytes += bytes as u64;
        }
    }
}

/// Where the members of an EP group sit: the node of each EP rank, the members of each
/// node, and the shape of the group's MoE messages (for splitting them into rows).
#[derive(Clone, Debug)]
pub(crate) struct EpTopology {
    /// The node (an index into `members`) of each EP rank.
    node_of: Vec<usize>,
    /// The EP ranks on each node, in EP order; nodes in the order of their first member.
    members: Vec<Vec<usize>>,
    /// Each EP rank's index among its node's members.
    index_in_node: Vec<usize>,
    /// Owner-local experts per message (`n_routed_experts / EP`).
    experts: usize,
    /// Row width (`hidden_size`).
    hidden: usize,
}

impl EpTopology {
    /// The topology of an EP group whose EP rank `p` is on node `nodes[p]` (one node when
    /// all ids are equal, as when the plan has none), with messages of `experts` experts
    /// and `hidden`-wide rows.
    pub(crate) fn new<'a>(nodes: impl IntoIterator<Item = &'a str>, experts: usize, hidden: usize) -> Self {
        let mut ids: Vec<&str> = Vec::new();
        let mut members: Vec<Vec<usize>> = Vec::new();
        let (mut node_of, mut index_in_node) = (Vec::new(), Vec::new());
        for (p, id) in nodes.into_iter().enumerate() {
            let n = ids.iter().position(|&i| i == id).unwrap_or_else(|| {
                ids.push(id);
                members.push(Vec::new());
                ids.len() - 1
            });
            node_of.push(n);
            index_in_node.push(members[n].len());
            members[n].push(p);
        }
        EpTopology { node_of, members, index_in_node, experts, hidden }
    }

    /// Whether EP ranks `a` and `b` are on different nodes.
    fn remote(&self, a: usize, b: usize) -> bool {
        self.node_of.get(a) != self.node_of.get(b)
    }

    /// Whether the dispatch goes in two hops: the group spans nodes, its messages have
    /// rows, and every EP rank fits a forwarded message's tag.
    fn two_hop(&self) -> bool {
        self.members.len() > 1 && self.hidden > 0 && self.node_of.len() <= tags::MAX_FORWARD_SOURCES
    }

    /// The gateway on node `n` of EP rank `s`'s messages: the member of `n` with `s`'s
    /// index in its own node, modulo `n`'s size.
    fn gateway(&self, s: usize, n: usize) -> usize {
        let m = &self.members[n];
        m[self.index_in_node[s] % m.len()]
    }
}

/// The MoE exchange of one chunk over the data plane: point-to-point messages to the EP
/// group's ranks, tagged with the chunk, the layer and the phase; the dispatch in two hops
/// when the group spans nodes (module docs). Runs on a blocking thread and waits on the
/// data plane through the runtime's handle.
pub(crate) struct DataPlaneExchange<'a, C: Communicator> {
    pub(crate) comm: &'a C,
    pub(crate) handle: &'a Handle,
    /// World ranks of the EP group, in EP-rank order.
    pub(crate) group: &'a [usize],
    /// This rank's index in `group`.
    pub(crate) me: usize,
    /// Where the members of `group` sit.
    pub(crate) topology: &'a EpTopology,
    pub(crate) chunk: Chunk,
    /// What this exchange object has moved so far.
    pub(crate) stats: ExchangeStats,
}

impl<C: Communicator> ExpertExchange for DataPlaneExchange<'_, C> {
    fn group_size(&self) -> usize {
        self.group.len()
    }

    fn group_rank(&self) -> usize {
        self.me
    }

    fn exchange(&mut self, key: ExchangeKey, outgoing: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, ModelError> {
        let n = self.group.len();
        let micro_batch = self.chunk.micro_batch;
        let fail = move |what: String| ModelError::Tensor {
            tensor: format!("MoE layer {} {:?} exchange of micro-batch {micro_batch}", key.layer, key.phase),
            detail: what,
        };
        if outgoing.len() != n {
            return Err(fail(format!("{} buffers for an EP group of {n}", outgoing.len())));
        }
        let started = Instant::now();
        let mut tally = ExchangeStats { exchanges: 1, ..ExchangeStats::default() };
        for (p, buffer) in outgoing.iter().enumerate() {
            if p != self.me && self.topology.remote(self.me, p) {
                tally.cross_node_bytes_flat += buffer.len() as u64;
            }
        }
        let result = if key.phase == ExchangePhase::Dispatch && self.topology.two_hop() {
            self.two_hop(key, outgoing, &mut tally, &fail)
        } else {
            self.flat(key, outgoing, &mut tally, &fail)
        };
        tally.wait_seconds = started.elapsed().as_secs_f64();
        self.stats.add(&tally);
        result
    }
}

impl<C: Communicator> DataPlaneExchange<'_, C> {
    /// Every buffer straight to its EP rank.
    fn flat(
        &self,
        key: ExchangeKey,
        outgoing: Vec<Vec<u8>>,
        tally: &mut ExchangeStats,
        fail: &dyn Fn(String) -> ModelError,
    ) -> Result<Vec<Vec<u8>>, ModelError> {
        let tag = tags::expert(self.chunk, key);
        let (comm, group, me, topology) = (self.comm, self.group, self.me, self.topology);
        for (p, buffer) in outgoing.iter().enumerate() {
            if p != me {
                tally.sent(buffer.len(), topology.remote(me, p));
            }
        }
        let mut own = None;
        self.handle.block_on(async {
            for (p, buffer) in outgoing.into_iter().enumerate() {
                if p == me {
                    own = Some(buffer);
                } else {
                    comm.send(group[p], tag, Bytes::from(buffer)).await.map_err(|e| {
                        fail(format!("sending to EP rank {p} (world rank {}): {e}", group[p]))
                    })?;
                }
            }
            let mut incoming = Vec::with_capacity(group.len());
            for (p, &world) in group.iter().enumerate() {
                if p == me {
                    incoming.push(own.take().unwrap_or_default());
                } else {
                    let bytes = comm
                        .recv(world, tag)
                        .await
                        .map_err(|e| fail(format!("receiving from EP rank {p} (world rank {world}): {e}")))?;
                    incoming.push(bytes.to_vec());
                }
            }
            Ok(incoming)
        })
    }

    /// Same-node buffers straight, other nodes' through their gateways (module docs).
    fn two_hop(
        &self,
        key: ExchangeKey,
        outgoing: Vec<Vec<u8>>,
        tally: &mut ExchangeStats,
        fail: &dyn Fn(String) -> ModelError,
    ) -> Result<Vec<Vec<u8>>, ModelError> {
        let (comm, group, me, top, chunk) = (self.comm, self.group, self.me, self.topology, self.chunk);
        let home = top.node_of[me];
        let (direct, hop) = (tags::expert(chunk, key), tags::expert_node(chunk, key));
        let mut outgoing: Vec<Option<Vec<u8>>> = outgoing.into_iter().map(Some).collect();
        // Pack the node messages before any waiting.
        let mut node_messages = Vec::with_capacity(top.members.len() - 1);
        for (n, members) in top.members.iter().enumerate() {
            if n == home {
                continue;
            }
            let buffers: Vec<(usize, Vec<u8>)> =
                members.iter().map(|&d| (d, outgoing[d].take().unwrap_or_default())).collect();
            let message = encode_node_message(&buffers, top.experts, top.hidden)
                .map_err(|e| fail(format!("packing the node message for EP ranks {members:?}: {e}")))?;
            let gateway = top.gateway(me, n);
            tally.sent(message.len(), true);
            node_messages.push((gateway, message));
        }
        for &p in &top.members[home] {
            if p != me {
                tally.sent(outgoing[p].as_ref().map_or(0, Vec::len), false);
            }
        }
        self.handle.block_on(async {
            let mut incoming: Vec<Option<Vec<u8>>> = vec![None; group.len()];
            incoming[me] = Some(outgoing[me].take().unwrap_or_default());
            for &p in &top.members[home] {
                if p != me {
                    let buffer = outgoing[p].take().unwrap_or_default();
                    comm.send(group[p], direct, Bytes::from(buffer)).await.map_err(|e| {
                        fail(format!("sending to EP rank {p} (world rank {}): {e}", group[p]))
                    })?;
                }
            }
            for (gateway, message) in node_messages {
                let world = group[gateway];
                comm.send(world, hop, Bytes::from(message)).await.map_err(|e| {
                    fail(format!(
                        "sending the node message to gateway EP rank {gateway} (world rank {world}): {e}"
                    ))
                })?;
            }
            // Gateway: unpack the node messages meant for this node and forward them.
            for s in 0..group.len() {
                if top.node_of[s] == home || top.gateway(s, home) != me {
                    continue;
                }
                let world = group[s];
                let message = comm.recv(world, hop).await.map_err(|e| {
                    fail(format!("receiving the node message from EP rank {s} (world rank {world}): {e}"))
                })?;
                let buffers = decode_node_message(&message, &top.members[home], top.experts, top.hidden)
                    .map_err(|e| fail(format!("node message from EP rank {s} (world rank {world}): {e}")))?;
                let forward = tags::expert_forward(chunk, key, s);
                for (&d, buffer) in top.members[home].iter().zip(buffers) {
                    if d == me {
                        incoming[s] = Some(buffer);
                    } else {
                        tally.sent(buffer.len(), false);
                        comm.send(group[d], forward, Bytes::from(buffer)).await.map_err(|e| {
                            fail(format!(
                                "forwarding EP rank {s}'s buffer to EP rank {d} (world rank {}): {e}",
                                group[d]
                            ))
                        })?;
                    }
                }
            }
            // Everything else: same-node buffers, and other nodes' from this node's gateways.
            for (s, slot) in incoming.iter_mut().enumerate() {
                if slot.is_some() {
                    continue;
                }
                let (from, tag) = if top.node_of[s] == home {
                    (s, direct)
                } else {
                    (top.gateway(s, home), tags::expert_forward(chunk, key, s))
                };
                let bytes = comm.recv(group[from], tag).await.map_err(|e| {
                    let via =
                        if from == s { String::new() } else { format!(" through gateway EP rank {from}") };
                    fail(format!("receiving from EP rank {s}{via} (world rank {}): {e}", group[from]))
                })?;
                *slot = Some(bytes.to_vec());
            }
            Ok(incoming.into_iter().map(Option::unwrap_or_default).collect())
        })
    }
}

/// The row format byte of a node message without rows.
const NO_ROWS: u8 = 0xFF;
/// Entry kinds of a node message.
const ENTRY_EMPTY: u8 = 0;
const ENTRY_ROWS: u8 = 1;
const ENTRY_RAW: u8 = 2;

fn put_u32(out: &mut Vec<u8>, v: usize, what: &str) -> Result<(), String> {
    let v = u32::try_from(v).map_err(|_| format!("{what} {v} exceeds u32"))?;
    out.extend_from_slice(&v.to_le_bytes());
    Ok(())
}

/// Packs the buffers `(EP rank, buffer)` of one node's members (messages of `experts`
/// experts and `hidden`-wide rows) into one node message, each distinct row once (module
/// docs). Buffers that do not split into rows, or whose format differs from the first
/// split one's, travel raw.
pub(crate) fn encode_node_message(
    buffers: &[(usize, Vec<u8>)],
    experts: usize,
    hidden: usize,
) -> Result<Vec<u8>, String> {
    let mut tag = None;
    let split: Vec<Option<PayloadRows>> = buffers
        .iter()
        .map(|(_, b)| match split_payload(b, experts, hidden) {
            Ok(Some(rows)) if tag.is_none_or(|t| t == rows.tag) => {
                tag = Some(rows.tag);
                Some(rows)
            }
            _ => None,
        })
        .collect();
    let mut unique: HashMap<&[u8], u32> = HashMap::new();
    let mut table: Vec<&[u8]> = Vec::new();
    let mut entries = Vec::new();
    for ((d, buffer), rows) in buffers.iter().zip(&split) {
        put_u32(&mut entries, *d, "EP rank")?;
        match rows {
            _ if buffer.is_empty() => entries.push(ENTRY_EMPTY),
            Some(rows) => {
                entries.push(ENTRY_ROWS);
                rows.counts.iter().for_each(|c| entries.extend_from_slice(&c.to_le_bytes()));
                for row in rows.iter_rows() {
                    let i = match unique.get(row) {
                        Some(&i) => i,
                        None => {
                            let i =
                                u32::try_from(table.len()).map_err(|_| "more than u32::MAX distinct rows")?;
                            unique.insert(row, i);
                            table.push(row);
                            i
                        }
                    };
                    entries.extend_from_slice(&i.to_le_bytes());
                }
            }
            None => {
                entries.push(ENTRY_RAW);
                put_u32(&mut entries, buffer.len(), "a raw buffer of")?;
                entries.extend_from_slice(buffer);
            }
        }
    }
    let row_bytes = table.first().map_or(0, |r| r.len());
    let mut out = Vec::with_capacity(13 + entries.len() + table.len() * row_bytes);
    out.push(tag.unwrap_or(NO_ROWS));
    put_u32(&mut out, experts, "experts")?;
    put_u32(&mut out, table.len(), "rows")?;
    put_u32(&mut out, buffers.len(), "destinations")?;
    out.append(&mut entries);
    table.iter().for_each(|r| out.extend_from_slice(r));
    Ok(out)
}

/// Reads a node message front to back; every read checks the length left.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let left = self.bytes.len() - self.at;
        if n > left {
            return Err(format!(
                "truncated: {what} needs {n} bytes at offset {}, {left} are left of {}",
                self.at,
                self.bytes.len()
            ));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<usize, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
}

fn u32s(bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// Unpacks a node message for the EP ranks `members` (the gateway's node, in EP order)
/// of messages of `experts` experts and `hidden`-wide rows: every member's buffer, byte
/// for byte as its sender made it. The error says what is malformed.
pub(crate) fn decode_node_message(
    bytes: &[u8],
    members: &[usize],
    experts: usize,
    hidden: usize,
) -> Result<Vec<Vec<u8>>, String> {
    enum Entry<'a> {
        Empty,
        Rows { counts: Vec<u32>, indices: &'a [u8] },
        Raw(&'a [u8]),
    }
    let mut r = Reader { bytes, at: 0 };
    let tag = r.u8("the row format")?;
    let row_bytes = match tag {
        NO_ROWS => 0,
        _ => payload_row_bytes(tag, hidden)
            .filter(|&b| b > 0)
            .ok_or_else(|| format!("unknown row format tag {tag} (rows of {hidden})"))?,
    };
    let e = r.u32("the expert count")?;
    if e != experts {
        return Err(format!("messages of {e} experts, expected {experts}"));
    }
    let unique = r.u32("the row count")?;
    if tag == NO_ROWS && unique > 0 {
        return Err(format!("{unique} rows without a row format"));
    }
    let destinations = r.u32("the destination count")?;
    if destinations != members.len() {
        return Err(format!("{destinations} destinations for a node of {} EP ranks", members.len()));
    }
    let mut entries = Vec::with_capacity(members.len());
    for &d in members {
        let got = r.u32("an entry's EP rank")?;
        if got != d {
            return Err(format!("an entry for EP rank {got} where EP rank {d} was expected"));
        }
        entries.push(match r.u8("an entry's kind")? {
            ENTRY_EMPTY => Entry::Empty,
            ENTRY_ROWS => {
                if tag == NO_ROWS {
                    return Err(format!("rows for EP rank {d} without a row format"));
                }
                let counts: Vec<u32> =
                    u32s(r.take(4 * experts, "an entry's counts")?).map(|c| c as u32).collect();
                let rows = counts
                    .iter()
                    .try_fold(0usize, |a, &c| a.checked_add(c as usize))
                    .and_then(|rows| rows.checked_mul(4))
                    .ok_or_else(|| format!("EP rank {d}'s row counts overflow"))?;
                Entry::Rows { counts, indices: r.take(rows, "an entry's row indices")? }
            }
            ENTRY_RAW => {
                let len = r.u32("a raw entry's length")?;
                Entry::Raw(r.take(len, "a raw entry")?)
            }
            kind => return Err(format!("entry kind {kind} for EP rank {d}")),
        });
    }
    let table = &bytes[r.at..];
    if Some(table.len()) != unique.checked_mul(row_bytes) {
        return Err(format!("{} bytes of rows, expected {unique} rows of {row_bytes} bytes", table.len()));
    }
    members
        .iter()
        .zip(entries)
        .map(|(&d, entry)| match entry {
            Entry::Empty => Ok(Vec::new()),
            Entry::Raw(b) => Ok(b.to_vec()),
            Entry::Rows { counts, indices } => {
                if let Some(i) = u32s(indices).find(|&i| i >= unique) {
                    return Err(format!("EP rank {d}'s row index {i} is past the {unique} rows"));
                }
                let rows = u32s(indices).map(|i| &table[i * row_bytes..(i + 1) * row_bytes]);
                join_payload(tag, &counts, hidden, rows).map_err(|e| format!("EP rank {d}'s buffer: {e}"))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_model::expert_parallel::join_payload;

    const HIDDEN: usize = 4;

    /// A row of `HIDDEN` f32s, distinct per `seed`.
    fn f32_row(seed: u8) -> Vec<u8> {
        (0..HIDDEN).flat_map(|i| (f32::from(seed) + i as f32 * 0.25).to_le_bytes()).collect()
    }

    fn f32_buffer(counts: &[u32], seeds: &[u8]) -> Vec<u8> {
        let rows: Vec<Vec<u8>> = seeds.iter().map(|&s| f32_row(s)).collect();
        join_payload(0, counts, HIDDEN, rows.iter().map(Vec::as_slice)).unwrap()
    }

    fn round_trip(buffers: &[(usize, Vec<u8>)], experts: usize, hidden: usize) -> Vec<u8> {
        let message = encode_node_message(buffers, experts, hidden).unwrap();
        let members: Vec<usize> = buffers.iter().map(|(d, _)| *d).collect();
        let decoded = decode_node_message(&message, &members, experts, hidden).unwrap();
        let sent: Vec<Vec<u8>> = buffers.iter().map(|(_, b)| b.clone()).collect();
        assert_eq!(decoded, sent, "buffers come back byte for byte");
        message
    }

    #[test]
    fn a_node_message_stores_each_row_once() {
        // Token rows 1 and 2 go to several experts of the node, on both ranks.
        let buffers = vec![(2, f32_buffer(&[2, 1], &[1, 2, 1])), (3, f32_buffer(&[1, 2], &[2, 1, 3]))];
        let message = round_trip(&buffers, 2, HIDDEN);
        let flat: usize = buffers.iter().map(|(_, b)| b.len()).sum();
        // 3 distinct rows of 16 bytes where flat sends 6.
        assert_eq!(message[5..9], 3u32.to_le_bytes());
        assert!(message.len() < flat, "{} bytes vs {flat} flat", message.len());
    }

    #[test]
    fn empty_buffers_and_messages_round_trip() {
        let message = round_trip(&[(0, Vec::new()), (1, Vec::new())], 4, HIDDEN);
        assert_eq!(message[0], NO_ROWS);
        round_trip(&[], 4, HIDDEN);
        // A header with zero counts is not the empty buffer and comes back as sent.
        round_trip(&[(5, f32_buffer(&[0, 0], &[])), (6, Vec::new())], 2, HIDDEN);
    }

    #[test]
    fn fp8_rows_deduplicate_by_codes_and_scales() {
        // 130 columns: two scale tiles; a row is 130 codes then 2 f32 scales.
        let hidden = 130;
        let row = |code: u8, scale: f32| -> Vec<u8> {
            let mut r = vec![code; hidden];
            r.extend_from_slice(&scale.to_le_bytes());
            r.extend_from_slice(&(scale * 2.0).to_le_bytes());
            r
        };
        let (a, b, c) = (row(0x10, 0.5), row(0x10, 0.25), row(0x22, 0.5));
        let fp8 = |counts: &[u32], rows: &[&Vec<u8>]| {
            join_payload(3, counts, hidden, rows.iter().map(|r| r.as_slice())).unwrap()
        };
        let buffers = vec![(0, fp8(&[1, 2], &[&a, &b, &a])), (1, Vec::new()), (2, fp8(&[2, 0], &[&c, &a]))];
        let message = round_trip(&buffers, 2, hidden);
        // a, b (same codes, other scales) and c: three distinct rows.
        assert_eq!(message[5..9], 3u32.to_le_bytes());
    }

    #[test]
    fn buffers_that_do_not_split_travel_raw() {
        let good = f32_buffer(&[1], &[7]);
        let truncated = good[..good.len() - 3].to_vec();
        let bf16 = join_payload(2, &[1], HIDDEN, [&[1u8; 2 * HIDDEN][..]]).unwrap();
        let message = round_trip(&[(0, good.clone()), (1, truncated), (2, bf16), (3, good)], 1, HIDDEN);
        assert_eq!(message[0], 0, "the f32 rows set the format");
        assert_eq!(message[5..9], 1u32.to_le_bytes());
    }

    #[test]
    fn malformed_node_messages_are_errors() {
        let buffers = vec![(2, f32_buffer(&[2, 1], &[1, 2, 1])), (3, Vec::new()), (4, vec![9, 9])];
        let message = encode_node_message(&buffers, 2, HIDDEN).unwrap();
        let decode = |m: &[u8]| decode_node_message(m, &[2, 3, 4], 2, HIDDEN);
        decode(&message).unwrap();
        for cut in 0..message.len() {
            let err = decode(&message[..cut]).expect_err("a truncated message is refused");
            assert!(err.contains("truncated") || err.contains("bytes of rows"), "cut at {cut}: {err}");
        }
        assert!(decode_node_message(&message, &[2, 3], 2, HIDDEN).unwrap_err().contains("3 destinations"));
        assert!(
            decode_node_message(&message, &[2, 3, 5], 2, HIDDEN).unwrap_err().contains("EP rank 4 where")
        );
        assert!(decode_node_message(&message, &[2, 3, 4], 3, HIDDEN).unwrap_err().contains("2 experts"));
        let mut bad = message.clone();
        bad[0] = 9;
        assert!(decode(&bad).unwrap_err().contains("tag 9"));
        // The first entry's first row index (after the header, rank, kind and counts).
        let mut bad = message.clone();
        bad[13 + 5 + 8..13 + 5 + 12].copy_from_slice(&7u32.to_le_bytes());
        assert!(decode(&bad).unwrap_err().contains("row index 7"));
        let mut bad = message.clone();
        bad[13 + 4] = 5;
        assert!(decode(&bad).unwrap_err().contains("entry kind 5"));
        let mut longer = message;
        longer.push(0);
        assert!(decode(&longer).unwrap_err().contains("bytes of rows"));
    }

    #[test]
    fn gateways_pair_ranks_by_index_in_node() {
        // EP ranks 0, 3 on node a; 1, 2, 4 on node b; 5 on node c.
        let top = EpTopology::new(["a", "b", "b", "a", "b", "c"], 1, HIDDEN);
        assert_eq!(top.members, vec![vec![0, 3], vec![1, 2, 4], vec![5]]);
        assert!(top.two_hop() && top.remote(0, 1) && !top.remote(0, 3));
        assert_eq!([top.gateway(0, 1), top.gateway(3, 1), top.gateway(0, 2)], [1, 2, 5]);
        assert_eq!([top.gateway(4, 0), top.gateway(2, 0), top.gateway(5, 1)], [0, 3, 1]);
        assert!(!EpTopology::new(["x", "x"], 1, HIDDEN).two_hop());
        assert!(!EpTopology::new(["", "", ""], 1, HIDDEN).two_hop());
    }

    #[test]
    fn exchange_tags_do_not_collide() {
        use flotilla_model::moe::ExchangePhase;
        let c = Chunk { micro_batch: 3, stage: 1 };
        let key = ExchangeKey { layer: 2, phase: ExchangePhase::Dispatch };
        let mut all =
            vec![tags::activation(c), tags::gradient(c), tags::expert(c, key), tags::expert_node(c, key)];
        all.extend((0..tags::MAX_FORWARD_SOURCES).map(|s| tags::expert_forward(c, key, s)));
        all.push(4 << 60);
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
        assert!(all.iter().all(|&t| t <= crate::comm::MAX_USER_TAG));
    }
}
