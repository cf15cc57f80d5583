//! The collective algorithms, written once against tagged point-to-point messages.
//!
//! # All-reduce: ring reduce-scatter then ring all-gather
//!
//! A buffer of `len` elements is split into `n = world_size` contiguous chunks by
//! [`chunk_range`] (the first `len % n` chunks hold one element more; chunks may be empty).
//! Rank `r` sends to `r + 1` and receives from `r − 1` (indices mod `n`); each rank sends
//! and receives `2·(n−1)/n · len` elements, the bandwidth lower bound.
//!
//! *Reduce-scatter*, steps `s = 0 … n−2`: rank `r` sends chunk `(r − 1 − s) mod n` and
//! receives chunk `(r − 2 − s) mod n`, adding its own values to what arrived. At step 0 it
//! sends its raw values of chunk `r − 1`, so **chunk `c` is accumulated starting from rank
//! `c + 1` and travels around the ring, ending complete on rank `c`**:
//!
//! ```text
//! sum_c[i] = (…((x[c+1][i] + x[c+2][i]) + x[c+3][i]) + …) + x[c+n][i]      (ranks mod n)
//! ```
//!
//! *All-gather*, steps `s = 0 … n−2`: rank `r` sends chunk `(r − s) mod n` (at step 0 the
//! chunk it completed; later, the bytes it just received, forwarded unchanged) and stores
//! chunk `(r − 1 − s) mod n`. Every rank ends with exactly the bits rank `c` computed for
//! chunk `c`.
//!
//! Chunks travel in segments of at most 1 MiB (each message prefixed with its chunk's
//! element count, so ranks whose buffers differ in length fail instead of hanging), which
//! pipelines the ring; segmentation does not touch the order of any addition.
//!
//! The order of every addition is therefore a function of `(n, len, c)` only, never of
//! message timing: the same layout gives bit-identical results on every rank and every
//! run. [`ring_reference_sum`] computes the same sums sequentially. Floating-point addition
//! is commutative bit for bit (NaN payloads aside), so only the association order matters,
//! and that is fixed above; the code still always adds as `received + local`, as the
//! reference does.
//!
//! # The other collectives
//!
//! - all-to-all-v, all-gather, broadcast: one direct message per pair that needs one
//!   (`Bytes` are reference-counted, so fanning a buffer out copies nothing before the
//!   socket). Broadcast is root-to-all, adequate for the small control payloads it carries.
//! - barrier: the dissemination barrier, `⌈log₂ n⌉` rounds in which rank `r` signals
//!   `r + 2ᵏ` and waits for `r − 2ᵏ`.
//!
//! Each step of each collective has its own tag ([`collective_tag`]), so a message can
//! never be taken by the wrong step even if a fast rank runs ahead into the next
//! collective.

use std::future::Future;
use std::ops::{Add, Range};

use bytes::Bytes;

use super::{CommError, collective_tag};

/// The tagged point-to-point layer the collectives run on. `post` queues without waiting
/// (the collectives rely on it: every rank posts before it waits, so no step deadlocks),
/// and messages with the same `(peer, tag)` arrive in the order they were posted (the
/// all-reduce sends a chunk's segments under one tag).
pub(crate) trait Transport: Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn post(&self, peer: usize, tag: u64, bytes: Bytes) -> Result<(), CommError>;
    fn fetch(&self, peer: usize, tag: u64) -> impl Future<Output = Result<Bytes, CommError>> + Send;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// An element type the ring all-reduce can sum: travels as little-endian bytes.
pub trait RingElement: sealed::Sealed + Copy + Default + Send + Sync + Add<Output = Self> + 'static {
    /// Bytes per element on the wire.
    const BYTES: usize;

    /// `out = src` as little-endian bytes (`out.len() == src.len() * BYTES`).
    #[doc(hidden)]
    fn encode_into(src: &[Self], out: &mut [u8]);

    /// `out = received + local`, element-wise, as little-endian bytes.
    #[doc(hidden)]
    fn add_encode_into(received: &[u8], local: &[Self], out: &mut [u8]);

    /// `local = received + local`, element-wise.
    #[doc(hidden)]
    fn add_into(received: &[u8], local: &mut [Self]);

    /// `local = received`, element-wise.
    #[doc(hidden)]
    fn decode_into(received: &[u8], local: &mut [Self]);
}

macro_rules! ring_element {
    ($t:ty, $n:literal) => {
        impl RingElement for $t {
            const BYTES: usize = $n;

            fn encode_into(src: &[Self], out: &mut [u8]) {
                let (words, _) = out.as_chunks_mut::<$n>();
                for (w, x) in words.iter_mut().zip(src) {
                    *w = x.to_le_bytes();
                }
            }

            fn add_encode_into(received: &[u8], local: &[Self], out: &mut [u8]) {
                let (words, _) = out.as_chunks_mut::<$n>();
                let (incoming, _) = received.as_chunks::<$n>();
                for ((w, r), x) in words.iter_mut().zip(incoming).zip(local) {
                    *w = (<$t>::from_le_bytes(*r) + *x).to_le_bytes();
                }
            }

            // `received + local`, spelled out in the same operand order as
            // `add_encode_into` and the reference, so that even NaN payloads agree.
            #[allow(clippy::assign_op_pattern)]
            fn add_into(received: &[u8], local: &mut [Self]) {
                let (incoming, _) = received.as_chunks::<$n>();
                for (x, r) in local.iter_mut().zip(incoming) {
                    *x = <$t>::from_le_bytes(*r) + *x;
                }
            }

            fn decode_into(received: &[u8], local: &mut [Self]) {
                let (incoming, _) = received.as_chunks::<$n>();
                for (x, r) in local.iter_mut().zip(incoming) {
                    *x = <$t>::from_le_bytes(*r);
                }
            }
        }
    };
}

ring_element!(f32, 4);
ring_element!(f64, 8);

/// The elements of chunk `chunk` when `len` elements are split among `world_size` ranks:
/// contiguous, in rank order, the first `len % world_size` chunks one element longer.
/// Empty for `chunk >= world_size` (and for `world_size == 0`).
pub fn chunk_range(len: usize, world_size: usize, chunk: usize) -> Range<usize> {
    if chunk >= world_size {
        return len..len;
    }
    let base = len / world_size;
    let rem = len % world_size;
    // chunk < world_size, so chunk·base ≤ len: no overflow.
    let start = chunk * base + chunk.min(rem);
    start..start + base + usize::from(chunk < rem)
}

/// The ring all-reduce's sums computed sequentially, in exactly the order the ring
/// performs them (module documentation): `inputs[r]` is rank `r`'s buffer. The result is
/// bit-identical to what every rank holds after [`super::Communicator::all_reduce_sum`].
pub fn ring_reference_sum<T: RingElement>(inputs: &[&[T]]) -> Result<Vec<T>, CommError> {
    let n = inputs.len();
    let Some(first) = inputs.first() else {
        return Ok(Vec::new());
    };
    let len = first.len();
    if let Some((rank, bad)) = inputs.iter().enumerate().find(|(_, b)| b.len() != len) {
        return Err(CommError::InvalidArgument {
            op: "ring_reference_sum",
            reason: format!("rank {rank} has {} elements, rank 0 has {len}", bad.len()),
        });
    }
    let mut out = vec![T::default(); len];
    for c in 0..n {
        for i in chunk_range(len, n, c) {
            let mut acc = inputs[(c + 1) % n][i];
            for k in 2..=n {
                acc = acc + inputs[(c + k) % n][i];
            }
            out[i] = acc;
        }
    }
    Ok(out)
}

fn step_tag(seq: u64, step: usize) -> u64 {
    // Steps are below 2·MAX_WORLD_SIZE, which fits the tag's step field.
    collective_tag(seq, u32::try_from(step).unwrap_or(u32::MAX))
}

fn expect_len(
    op: &'static str,
    peer: usize,
    tag: u64,
    got: &Bytes,
    expected: usize,
) -> Result<(), CommError> {
    if got.len() == expected {
        Ok(())
    } else {
        Err(CommError::SizeMismatch { op, peer, tag, expected, got: got.len() })
    }
}

/// Payload bytes per all-reduce message: chunks travel in segments this large, so that a
/// rank adds one segment while the next is on the wire, and message buffers stay small
/// enough for the allocator to recycle (multi-MiB buffers would be fresh mappings, paid
/// for in page faults on every message).
pub(crate) const SEGMENT_BYTES: usize = 1 << 20;
/// Segments a rank originates ahead of those it has received (see `all_reduce`).
const WINDOW: usize = 4;
/// Each all-reduce message starts with the element count of the chunk it belongs to.
const SEGMENT_PREFIX: usize = 8;

/// The segments of `range`, in order; an empty range still has one (empty) segment, so
/// that every chunk is announced and a length mismatch is always seen.
fn segments(range: Range<usize>, per: usize) -> impl Iterator<Item = Range<usize>> {
    let count = range.len().div_ceil(per).max(1);
    (0..count).map(move |k| {
        let start = range.start + k * per;
        start..(start + per).min(range.end)
    })
}

/// One all-reduce message: `chunk_len` (u64 LE), then `payload_bytes` filled by `fill`.
fn segment_message(chunk_len: usize, payload_bytes: usize, fill: impl FnOnce(&mut [u8])) -> Bytes {
    let mut out = vec![0u8; SEGMENT_PREFIX + payload_bytes];
    out[..SEGMENT_PREFIX].copy_from_slice(&(chunk_len as u64).to_le_bytes());
    fill(&mut out[SEGMENT_PREFIX..]);
    Bytes::from(out)
}

/// The payload of a received segment after checking that the sender's chunk has this
/// rank's length (buffers of different lengths across ranks are caught at the first
/// segment of the first chunk on which two neighbours disagree) and the segment its size.
fn segment_payload<T: RingElement>(
    peer: usize,
    tag: u64,
    message: &Bytes,
    chunk_len: usize,
    segment_len: usize,
) -> Result<&[u8], CommError> {
    let Some((prefix, payload)) = message.split_first_chunk::<SEGMENT_PREFIX>() else {
        return Err(CommError::SizeMismatch {
            op: "all_reduce_sum",
            peer,
            tag,
            expected: SEGMENT_PREFIX + segment_len * T::BYTES,
            got: message.len(),
        });
    };
    let theirs = u64::from_le_bytes(*prefix);
    if theirs != chunk_len as u64 {
        return Err(CommError::LengthMismatch {
            op: "all_reduce_sum",
            peer,
            tag,
            expected: chunk_len,
            got: theirs,
        });
    }
    if payload.len() != segment_len * T::BYTES {
        return Err(CommError::SizeMismatch {
            op: "all_reduce_sum",
            peer,
            tag,
            expected: SEGMENT_PREFIX + segment_len * T::BYTES,
            got: message.len(),
        });
    }
    Ok(payload)
}

/// Ring all-reduce (sum) of `data` in place; see the module documentation for the order.
///
/// Chunks travel as segments of [`SEGMENT_BYTES`] with the same tag per step (the transport
/// keeps same-tag messages in order), so the ring is pipelined: a segment received at step
/// s is added and posted for step s + 1 before the next segment is awaited. Segmentation
/// changes nothing about which values are added in which order.
pub(crate) async fn all_reduce<T: RingElement, C: Transport>(
    comm: &C,
    seq: u64,
    data: &mut [T],
) -> Result<(), CommError> {
    all_reduce_in_segments(comm, seq, data, (SEGMENT_BYTES / T::BYTES).max(1), true).await
}

/// The reduce-scatter half of [`all_reduce`]: afterwards this rank's chunk
/// `chunk_range(len, n, rank)` holds the sums, bit for bit what [`all_reduce`] leaves there;
/// the rest of `data` holds partial sums. Half the all-reduce's traffic.
pub(crate) async fn reduce_scatter<T: RingElement, C: Transport>(
    comm: &C,
    seq: u64,
    data: &mut [T],
) -> Result<(), CommError> {
    all_reduce_in_segments(comm, seq, data, (SEGMENT_BYTES / T::BYTES).max(1), false).await
}

/// [`all_reduce`] with `per` elements per segment (tests use tiny segments); without
/// `gather`, only its reduce-scatter.
async fn all_reduce_in_segments<T: RingElement, C: Transport>(
    comm: &C,
    seq: u64,
    data: &mut [T],
    per: usize,
    gather: bool,
) -> Result<(), CommError> {
    let n = comm.world_size();
    let r = comm.rank();
    if n <= 1 {
        return Ok(());
    }
    let len = data.len();
    let right = (r + 1) % n;
    let left = (r + n - 1) % n;
    let per = per.max(1);

    // The segments this rank originates in each phase (its raw chunk r−1, then its completed
    // chunk r) are encoded lazily, WINDOW ahead of the segments it receives: a whole chunk
    // encoded up front would be tens of MiB of fresh buffers per call, paid for in page
    // faults. No deadlock: a rank waiting for segment k has posted at least k + WINDOW.
    let originate = |data: &[T], chunk: &Range<usize>, seg: Range<usize>, tag: u64| {
        let message =
            segment_message(chunk.len(), seg.len() * T::BYTES, |out| T::encode_into(&data[seg], out));
        comm.post(right, tag, message)
    };

    // Reduce-scatter. Step 0 sends this rank's raw values of chunk r−1; the chunk received
    // at step s (r−2−s) is the one sent at step s+1, with this rank's values added. Chunk
    // r−1 is never written during the reduce-scatter, so it can be encoded late.
    let first = chunk_range(len, n, (r + n - 1) % n);
    let mut unsent = segments(first.clone(), per);
    for seg in unsent.by_ref().take(WINDOW) {
        originate(data, &first, seg, step_tag(seq, 0))?;
    }
    for s in 0..n - 1 {
        let tag = step_tag(seq, s);
        let chunk = chunk_range(len, n, (r + 2 * n - 2 - s) % n);
        for seg in segments(chunk.clone(), per) {
            if let Some(next) = unsent.next() {
                originate(data, &first, next, step_tag(seq, 0))?;
            }
            let incoming = comm.fetch(left, tag).await?;
            let payload = segment_payload::<T>(left, tag, &incoming, chunk.len(), seg.len())?;
            if s + 2 == n {
                // The last contribution: chunk r is complete here.
                T::add_into(payload, &mut data[seg]);
            } else {
                let local = &data[seg];
                let message = segment_message(chunk.len(), payload.len(), |out| {
                    T::add_encode_into(payload, local, out)
                });
                comm.post(right, step_tag(seq, s + 1), message)?;
            }
        }
        for next in unsent.by_ref() {
            originate(data, &first, next, step_tag(seq, 0))?;
        }
    }

    if !gather {
        return Ok(());
    }

    // All-gather: circulate the completed chunks; a received segment is forwarded as the
    // very same bytes, so every rank stores exactly the bits of the chunk's owner. Chunk r
    // is never written during the all-gather.
    let own = chunk_range(len, n, r);
    let mut unsent = segments(own.clone(), per);
    for seg in unsent.by_ref().take(WINDOW) {
        originate(data, &own, seg, step_tag(seq, n - 1))?;
    }
    for s in 0..n - 1 {
        let tag = step_tag(seq, n - 1 + s);
        let chunk = chunk_range(len, n, (r + n - 1 - s) % n);
        for seg in segments(chunk.clone(), per) {
            if let Some(next) = unsent.next() {
                originate(data, &own, next, step_tag(seq, n - 1))?;
            }
            let incoming = comm.fetch(left, tag).await?;
            T::decode_into(
                segment_payload::<T>(left, tag, &incoming, chunk.len(), seg.len())?,
                &mut data[seg],
            );
            if s + 2 < n {
                comm.post(right, step_tag(seq, n + s), incoming)?;
            }
        }
        for next in unsent.by_ref() {
            originate(data, &own, next, step_tag(seq, n - 1))?;
        }
    }
    Ok(())
}

/// `buffers[p]` goes to rank `p`; returns what each rank sent here, by source rank.
pub(crate) async fn all_to_all_v<C: Transport>(
    comm: &C,
    seq: u64,
    buffers: Vec<Bytes>,
) -> Result<Vec<Bytes>, CommError> {
    let n = comm.world_size();
    let r = comm.rank();
    if buffers.len() != n {
        return Err(CommError::InvalidArgument {
            op: "all_to_all_v",
            reason: format!("{} buffers for world size {n} (one per rank, own included)", buffers.len()),
        });
    }
    let tag = step_tag(seq, 0);
    let mut received = vec![Bytes::new(); n];
    for (peer, bytes) in buffers.into_iter().enumerate() {
        if peer == r {
            received[r] = bytes;
        } else {
            comm.post(peer, tag, bytes)?;
        }
    }
    for k in 1..n {
        let peer = (r + n - k) % n;
        received[peer] = comm.fetch(peer, tag).await?;
    }
    Ok(received)
}

/// Every rank's buffer, by rank.
pub(crate) async fn all_gather<C: Transport>(
    comm: &C,
    seq: u64,
    bytes: Bytes,
) -> Result<Vec<Bytes>, CommError> {
    let n = comm.world_size();
    let r = comm.rank();
    let tag = step_tag(seq, 0);
    for k in 1..n {
        comm.post((r + k) % n, tag, bytes.clone())?;
    }
    let mut gathered = vec![Bytes::new(); n];
    for k in 1..n {
        let peer = (r + n - k) % n;
        gathered[peer] = comm.fetch(peer, tag).await?;
    }
    gathered[r] = bytes;
    Ok(gathered)
}

/// `root`'s buffer on every rank.
pub(crate) async fn broadcast<C: Transport>(
    comm: &C,
    seq: u64,
    root: usize,
    bytes: Bytes,
) -> Result<Bytes, CommError> {
    let n = comm.world_size();
    let r = comm.rank();
    if root >= n {
        return Err(CommError::InvalidArgument {
            op: "broadcast",
            reason: format!("root {root} is out of range for world size {n}"),
        });
    }
    let tag = step_tag(seq, 0);
    if r == root {
        for k in 1..n {
            comm.post((r + k) % n, tag, bytes.clone())?;
        }
        Ok(bytes)
    } else {
        comm.fetch(root, tag).await
    }
}

/// Dissemination barrier: after round k, a rank has (transitively) heard from the 2^(k+1)
/// ranks before it, so after ⌈log₂ n⌉ rounds from everyone.
pub(crate) async fn barrier<C: Transport>(comm: &C, seq: u64) -> Result<(), CommError> {
    let n = comm.world_size();
    let r = comm.rank();
    let mut distance = 1;
    let mut round = 0;
    while distance < n {
        let tag = step_tag(seq, round);
        comm.post((r + distance) % n, tag, Bytes::new())?;
        let from = (r + n - distance) % n;
        let signal = comm.fetch(from, tag).await?;
        expect_len("barrier", from, tag, &signal, 0)?;
        distance *= 2;
        round += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashMap, VecDeque};
    use std::sync::{Arc, Mutex};

    /// An in-memory network: the algorithms checked apart from any socket.
    #[derive(Default)]
    struct Net {
        queues: Mutex<HashMap<(usize, usize, u64), VecDeque<Bytes>>>,
        arrived: tokio::sync::Notify,
    }

    struct Mem {
        rank: usize,
        world_size: usize,
        net: Arc<Net>,
    }

    impl Transport for Mem {
        fn rank(&self) -> usize {
            self.rank
        }

        fn world_size(&self) -> usize {
            self.world_size
        }

        fn post(&self, peer: usize, tag: u64, bytes: Bytes) -> Result<(), CommError> {
            self.net.queues.lock().unwrap().entry((self.rank, peer, tag)).or_default().push_back(bytes);
            self.net.arrived.notify_waiters();
            Ok(())
        }

        async fn fetch(&self, peer: usize, tag: u64) -> Result<Bytes, CommError> {
            loop {
                let arrived = self.net.arrived.notified();
                tokio::pin!(arrived);
                arrived.as_mut().enable();
                if let Some(bytes) = self
                    .net
                    .queues
                    .lock()
                    .unwrap()
                    .get_mut(&(peer, self.rank, tag))
                    .and_then(VecDeque::pop_front)
                {
                    return Ok(bytes);
                }
                arrived.await;
            }
        }
    }

    fn mem_group(n: usize) -> Vec<Mem> {
        let net = Arc::new(Net::default());
        (0..n).map(|rank| Mem { rank, world_size: n, net: net.clone() }).collect()
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    proptest! {
        #[test]
        fn ring_all_reduce_equals_the_reference(
            n in 1usize..=6,
            inputs in proptest::collection::vec(proptest::collection::vec(-1e6f32..1e6, 0..40), 6),
            len in 0usize..40,
            per in 1usize..8,
        ) {
            let data: Vec<Vec<f32>> =
                (0..n).map(|r| (0..len).map(|i| inputs[r].get(i).copied().unwrap_or(i as f32)).collect()).collect();
            let refs: Vec<&[f32]> = data.iter().map(Vec::as_slice).collect();
            let expected: Vec<u32> = ring_reference_sum(&refs).unwrap().iter().map(|x| x.to_bits()).collect();
            let group = mem_group(n);
            let mut buffers = data.clone();
            let results = run(futures::future::join_all(
                group.iter().zip(buffers.iter_mut()).map(|(m, buf)| all_reduce_in_segments(m, 3, buf.as_mut_slice(), per, true)),
            ));
            prop_assert!(results.iter().all(Result::is_ok));
            for buf in &buffers {
                prop_assert_eq!(buf.iter().map(|x| x.to_bits()).collect::<Vec<u32>>(), expected.clone());
            }
            // The reduce-scatter alone leaves each rank its own chunk of the same sums.
            let mut scattered = data.clone();
            let results = run(futures::future::join_all(
                group.iter().zip(scattered.iter_mut()).map(|(m, buf)| all_reduce_in_segments(m, 4, buf.as_mut_slice(), per, false)),
            ));
            prop_assert!(results.iter().all(Result::is_ok));
            for (r, buf) in scattered.iter().enumerate() {
                let own = chunk_range(len, n, r);
                prop_assert_eq!(buf[own.clone()].iter().map(|x| x.to_bits()).collect::<Vec<u32>>(), expected[own].to_vec());
            }
        }

        #[test]
        fn byte_collectives_deliver_everything(n in 1usize..=6, sizes in proptest::collection::vec(0usize..50, 36)) {
            let group = mem_group(n);
            let payload = |from: usize, to: usize| Bytes::from(vec![(from * 8 + to) as u8; sizes[from * 6 + to]]);
            let a2a = run(futures::future::join_all(
                group.iter().map(|m| all_to_all_v(m, 1, (0..n).map(|to| payload(m.rank, to)).collect())),
            ));
            for (to, got) in a2a.into_iter().enumerate() {
                let got = got.unwrap();
                for (from, bytes) in got.iter().enumerate() {
                    prop_assert_eq!(bytes, &payload(from, to));
                }
            }
            let gathered = run(futures::future::join_all(group.iter().map(|m| all_gather(m, 2, payload(m.rank, 0)))));
            for got in gathered {
                prop_assert_eq!(got.unwrap(), (0..n).map(|r| payload(r, 0)).collect::<Vec<_>>());
            }
            let root = sizes[0] % n;
            let cast = run(futures::future::join_all(group.iter().map(|m| broadcast(m, 3, root, payload(m.rank, 1)))));
            for got in cast {
                prop_assert_eq!(got.unwrap(), payload(root, 1));
            }
            let passed = run(futures::future::join_all(group.iter().map(|m| barrier(m, 4))));
            prop_assert!(passed.iter().all(Result::is_ok));
        }
    }

    #[test]
    fn chunks_cover_the_buffer_in_order() {
        for len in [0usize, 1, 2, 7, 100, 1001] {
            for n in 1..=9 {
                let mut next = 0;
                for c in 0..n {
                    let range = chunk_range(len, n, c);
                    assert_eq!(range.start, next, "len {len} n {n} chunk {c}");
                    assert!(range.len() == len / n || range.len() == len / n + 1);
                    next = range.end;
                }
                assert_eq!(next, len);
                assert!(chunk_range(len, n, n).is_empty());
            }
        }
    }

    #[test]
    fn reference_follows_the_documented_order() {
        // Three ranks, one element each per chunk: chunk c starts at rank c+1.
        let a = [1e8f32, 1.0, -1e8];
        let b = [1.0f32, -1e8, 1e8];
        let c = [-1e8f32, 1e8, 1.0];
        let sum = ring_reference_sum(&[&a[..], &b[..], &c[..]]).unwrap();
        assert_eq!(sum[0], (b[0] + c[0]) + a[0]);
        assert_eq!(sum[1], (c[1] + a[1]) + b[1]);
        assert_eq!(sum[2], (a[2] + b[2]) + c[2]);
    }

    #[test]
    fn reference_rejects_ragged_inputs() {
        let a = [1.0f64, 2.0];
        let b = [1.0f64];
        let err = ring_reference_sum(&[&a[..], &b[..]]).unwrap_err();
        assert!(err.to_string().contains("rank 1 has 1 elements"), "{err}");
    }

    #[test]
    fn codecs_round_trip() {
        let x = [1.5f32, -0.0, f32::MAX, f32::MIN_POSITIVE];
        let mut bytes = [0u8; 16];
        f32::encode_into(&x, &mut bytes);
        let mut y = [0f32; 4];
        f32::decode_into(&bytes, &mut y);
        assert_eq!(x.map(f32::to_bits), y.map(f32::to_bits));
        let mut sum = [0u8; 16];
        f32::add_encode_into(&bytes, &x, &mut sum);
        f32::add_into(&bytes, &mut y);
        let mut z = [0f32; 4];
        f32::decode_into(&sum, &mut z);
        assert_eq!(z.map(f32::to_bits), y.map(f32::to_bits));
    }

    #[test]
    fn segments_tile_the_range() {
        assert_eq!(segments(5..5, 4).collect::<Vec<_>>(), vec![5..5]);
        assert_eq!(segments(0..8, 4).collect::<Vec<_>>(), vec![0..4, 4..8]);
        assert_eq!(segments(3..12, 4).collect::<Vec<_>>(), vec![3..7, 7..11, 11..12]);
    }
}
