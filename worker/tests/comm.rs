//! The TCP data plane end to end: every rank in this process on 127.0.0.1 (port 0), on a
//! multi-threaded runtime. Every wait is under `tokio::time::timeout`, so a hang fails the
//! test instead of stalling the suite.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use flotilla_worker::comm::handshake::{self, Hello};
use flotilla_worker::comm::{
    CommError, Communicator, DataPlaneSecret, MAX_USER_TAG, TcpCommunicator, TcpOptions, TcpRendezvous,
    loopback_group, ring_reference_sum,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

/// Generous: the machine running the suite may be small and shared.
const LIMIT: Duration = Duration::from_secs(60);

/// One secret for the whole file: ranks built apart must share it.
fn secret() -> DataPlaneSecret {
    static SECRET: std::sync::OnceLock<DataPlaneSecret> = std::sync::OnceLock::new();
    SECRET.get_or_init(DataPlaneSecret::random).clone()
}

fn options(session: u64) -> TcpOptions {
    TcpOptions::new(session, secret())
        .with_connect_timeout(Duration::from_secs(20))
        .with_shutdown_linger(Duration::from_secs(2))
}

async fn group(n: usize) -> Vec<Arc<TcpCommunicator>> {
    let comms =
        timeout(LIMIT, loopback_group(n, options(7))).await.expect("rendezvous hung").expect("rendezvous");
    comms.into_iter().map(Arc::new).collect()
}

/// Runs `f` for every rank on its own task and returns the results in rank order.
async fn on_all<T, F, Fut>(comms: &[Arc<TcpCommunicator>], f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(Arc<TcpCommunicator>) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    let handles: Vec<_> = comms.iter().map(|c| tokio::spawn(f(c.clone()))).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(timeout(LIMIT, h).await.expect("a rank hung").expect("a rank panicked"));
    }
    out
}

/// splitmix64: deterministic test data without a dependency.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Values spanning six decades with both signs, so that the summation order shows in the
/// low bits.
fn data(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let r = mix((rank as u64) << 40 | i as u64);
            let unit = (r >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let decade = 10f32.powi((r % 7) as i32 - 3);
            unit * decade
        })
        .collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2p_matches_by_peer_and_tag_in_any_order() {
    let comms = group(3).await;
    let results = on_all(&comms, |c| async move {
        let r = c.rank();
        match r {
            0 => {
                // Tags sent in one order, received by rank 1 in another; a repeated tag is
                // delivered in send order.
                for (tag, body) in [(5u64, "a"), (3, "b"), (9, "c"), (3, "d"), (3, "e")] {
                    c.send(1, tag, Bytes::from_static(body.as_bytes())).await.unwrap();
                }
                // A message to itself.
                c.send(0, 77, Bytes::from_static(b"self")).await.unwrap();
                assert_eq!(c.recv(0, 77).await.unwrap(), Bytes::from_static(b"self"));
                // Wait for rank 1's receive to be posted before the message exists.
                assert_eq!(c.recv(1, 1).await.unwrap(), Bytes::from_static(b"posted"));
                c.send(1, MAX_USER_TAG, Bytes::from_static(b"late")).await.unwrap();
                Vec::new()
            }
            1 => {
                let mut got = Vec::new();
                for tag in [9u64, 3, 5, 3, 3] {
                    got.push(c.recv(0, tag).await.unwrap());
                }
                // Same (peer, tag) from a different peer is a different message.
                got.push(c.recv(2, 3).await.unwrap());
                // Posted first, satisfied later.
                let c2 = c.clone();
                let pending = tokio::spawn(async move { c2.recv(0, MAX_USER_TAG).await });
                sleep(Duration::from_millis(50)).await;
                c.send(0, 1, Bytes::from_static(b"posted")).await.unwrap();
                got.push(pending.await.unwrap().unwrap());
                got
            }
            _ => {
                c.send(1, 3, Bytes::from_static(b"from 2")).await.unwrap();
                Vec::new()
            }
        }
    })
    .await;
    let got: Vec<&[u8]> = results[1].iter().map(|b| b.as_ref()).collect();
    assert_eq!(got, vec![&b"c"[..], b"b", b"a", b"d", b"e", b"from 2", b"late"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_recv_does_not_lose_its_message() {
    let comms = group(2).await;
    // A receive that gives up before its message arrives...
    assert!(timeout(Duration::from_millis(20), comms[1].recv(0, 4)).await.is_err());
    comms[0].send(1, 4, Bytes::from_static(b"kept")).await.unwrap();
    // ...does not swallow it.
    let got = timeout(LIMIT, comms[1].recv(0, 4)).await.unwrap().unwrap();
    assert_eq!(got, Bytes::from_static(b"kept"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_are_errors() {
    let comms = group(2).await;
    let c = &comms[0];
    assert!(matches!(c.send(1, MAX_USER_TAG + 1, Bytes::new()).await, Err(CommError::ReservedTag { .. })));
    assert!(matches!(c.recv(1, u64::MAX).await, Err(CommError::ReservedTag { .. })));
    assert!(matches!(
        c.send(2, 0, Bytes::new()).await,
        Err(CommError::InvalidPeer { peer: 2, world_size: 2 })
    ));
    assert!(matches!(c.recv(9, 0).await, Err(CommError::InvalidPeer { peer: 9, .. })));
    // A collective called wrongly fails on the caller, and the peer that waits in the same
    // collective fails instead of hanging.
    let results = on_all(&comms, |c| async move {
        if c.rank() == 0 {
            c.all_to_all_v(vec![Bytes::new()]).await
        } else {
            c.all_to_all_v(vec![Bytes::new(); 2]).await
        }
    })
    .await;
    let err = results[0].as_ref().unwrap_err();
    assert!(matches!(err, CommError::InvalidArgument { op: "all_to_all_v", .. }), "{err}");
    let err = results[1].as_ref().unwrap_err();
    assert_eq!(err.peer(), Some(0), "{err}");
    let err = timeout(LIMIT, comms[0].broadcast(5, Bytes::new())).await.unwrap().unwrap_err();
    assert!(
        matches!(err, CommError::Aborted { .. }),
        "the communicator was aborted by the failed collective: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_reduce_is_bit_equal_to_the_reference_order() {
    for n in 1..=4 {
        let comms = group(n).await;
        for len in [0usize, 1, 7, 1000, 100_003] {
            let inputs: Vec<Vec<f32>> = (0..n).map(|r| data(r, len)).collect();
            let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
            let expected = ring_reference_sum(&refs).unwrap();
            let outputs = on_all(&comms, |c| async move {
                let mut x = data(c.rank(), len);
                c.all_reduce_sum(&mut x).await.unwrap();
                x
            })
            .await;
            for (rank, out) in outputs.iter().enumerate() {
                assert_eq!(bits(out), bits(&expected), "n {n} len {len} rank {rank}");
            }
            for i in 0..len {
                let exact: f64 = inputs.iter().map(|x| f64::from(x[i])).sum();
                let magnitude: f64 = inputs.iter().map(|x| f64::from(x[i]).abs()).sum();
                let bound = magnitude * f64::from(f32::EPSILON) * n as f64 + f64::from(f32::MIN_POSITIVE);
                let err = (f64::from(expected[i]) - exact).abs();
                assert!(
                    err <= bound,
                    "n {n} len {len} element {i}: {} vs {exact} (bound {bound})",
                    expected[i]
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_reduce_spans_several_segments() {
    // Chunks of ~667k elements travel as three 1 MiB segments.
    let n = 3;
    let len = 2_000_003;
    let comms = group(n).await;
    let inputs: Vec<Vec<f32>> = (0..n).map(|r| data(r, len)).collect();
    let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
    let expected = bits(&ring_reference_sum(&refs).unwrap());
    let outputs = on_all(&comms, |c| async move {
        let mut x = data(c.rank(), len);
        c.all_reduce_sum(&mut x).await.unwrap();
        bits(&x)
    })
    .await;
    assert!(outputs.iter().all(|o| *o == expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_is_not_plain_rank_order() {
    // Guards the test above against a vacuous reference: with these inputs the documented
    // order (chunk c starts at rank c+1) and a rank-0-first order give different bits.
    let a = [1.0f32, 0.0];
    let b = [1e8f32, 0.0];
    let c = [-1e8f32, 0.0];
    let ring = ring_reference_sum(&[&a[..], &b[..], &c[..]]).unwrap();
    let rank_order = (a[0] + b[0]) + c[0];
    assert_eq!(ring[0], (b[0] + c[0]) + a[0]);
    assert_ne!(ring[0].to_bits(), rank_order.to_bits());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_reduce_repeats_bit_identically() {
    let len = 100_003;
    let mut runs = Vec::new();
    for _fresh_group in 0..2 {
        let comms = group(3).await;
        for _ in 0..3 {
            let outputs = on_all(&comms, |c| async move {
                let mut x = data(c.rank(), len);
                c.all_reduce_sum(&mut x).await.unwrap();
                bits(&x)
            })
            .await;
            assert!(outputs.iter().all(|o| *o == outputs[0]), "ranks disagree");
            runs.push(outputs.into_iter().next().unwrap());
        }
    }
    assert!(runs.iter().all(|r| *r == runs[0]), "runs disagree");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_reduce_f64_matches_the_reference() {
    let comms = group(4).await;
    let len = 10_001;
    let input = |rank: usize| -> Vec<f64> {
        data(rank, len).into_iter().map(|x| f64::from(x) * 1e-3 + 1.0).collect()
    };
    let inputs: Vec<Vec<f64>> = (0..4).map(input).collect();
    let refs: Vec<&[f64]> = inputs.iter().map(Vec::as_slice).collect();
    let expected: Vec<u64> = ring_reference_sum(&refs).unwrap().iter().map(|v| v.to_bits()).collect();
    let outputs = on_all(&comms, |c| async move {
        let mut x: Vec<f64> = data(c.rank(), len).into_iter().map(|x| f64::from(x) * 1e-3 + 1.0).collect();
        c.all_reduce_sum_f64(&mut x).await.unwrap();
        x.iter().map(|v| v.to_bits()).collect::<Vec<u64>>()
    })
    .await;
    assert!(outputs.iter().all(|o| *o == expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_reduce_with_mismatched_lengths_fails_everywhere() {
    let comms = group(3).await;
    let results = on_all(&comms, |c| async move {
        let mut x = vec![1.0f32; if c.rank() == 1 { 10 } else { 12 }];
        c.all_reduce_sum(&mut x).await
    })
    .await;
    assert!(results.iter().all(Result::is_err), "{results:?}");
    assert!(
        results.iter().any(|r| matches!(r, Err(CommError::LengthMismatch { .. }))),
        "some rank sees the length mismatch: {results:?}"
    );
}

/// What rank `from` sends rank `to` in the all-to-all test: uneven, some empty.
fn a2a_payload(from: usize, to: usize) -> Bytes {
    // Empty for (0→0), (2→1), (0→2), (2→3): an own buffer and off-diagonal ones.
    let len = (from + 2 * to) % 4 * 1000;
    Bytes::from((0..len).map(|i| (from * 16 + to + i) as u8).collect::<Vec<u8>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_to_all_v_delivers_uneven_buffers() {
    for n in [1, 2, 4] {
        let comms = group(n).await;
        let results = on_all(&comms, move |c| async move {
            let r = c.rank();
            c.all_to_all_v((0..n).map(|to| a2a_payload(r, to)).collect()).await.unwrap()
        })
        .await;
        let mut empty = 0;
        for (to, got) in results.iter().enumerate() {
            assert_eq!(got.len(), n);
            for (from, bytes) in got.iter().enumerate() {
                assert_eq!(*bytes, a2a_payload(from, to), "n {n}: {from} -> {to}");
                empty += usize::from(bytes.is_empty());
            }
        }
        if n == 4 {
            assert!(empty > 0, "the test covers empty buffers");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_gather_and_broadcast() {
    let comms = group(4).await;
    let gathered = on_all(&comms, |c| async move {
        let r = c.rank();
        c.all_gather(Bytes::from(vec![r as u8; r * 3])).await.unwrap()
    })
    .await;
    for got in &gathered {
        let sizes: Vec<usize> = got.iter().map(Bytes::len).collect();
        assert_eq!(sizes, vec![0, 3, 6, 9]);
        for (r, b) in got.iter().enumerate() {
            assert!(b.iter().all(|&x| x == r as u8));
        }
    }
    for root in 0..4 {
        let got = on_all(&comms, move |c| async move {
            let mine = if c.rank() == root { Bytes::from(format!("from root {root}")) } else { Bytes::new() };
            c.broadcast(root, mine).await.unwrap()
        })
        .await;
        let expected = format!("from root {root}");
        assert!(got.iter().all(|b| b.as_ref() == expected.as_bytes()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_waits_for_the_last_rank() {
    for n in [1, 3, 4] {
        let comms = group(n).await;
        let late_entered = Arc::new(AtomicBool::new(false));
        let passed_early = on_all(&comms, |c| {
            let late_entered = late_entered.clone();
            async move {
                if c.rank() == n - 1 {
                    sleep(Duration::from_millis(200)).await;
                    late_entered.store(true, Ordering::SeqCst);
                }
                c.barrier().await.unwrap();
                !late_entered.load(Ordering::SeqCst)
            }
        })
        .await;
        assert!(passed_early.iter().all(|early| !early), "n {n}: a rank left the barrier early");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_dropped_mid_collective_fails_the_others_naming_it() {
    let mut comms = group(4).await;
    let dead = 2;
    let victim = comms.remove(dead);
    // The survivors enter the all-reduce; rank 2 never does, and then dies.
    let survivors: Vec<_> = comms
        .iter()
        .map(|c| {
            let c = c.clone();
            tokio::spawn(async move {
                let mut x = data(c.rank(), 100_003);
                let started = Instant::now();
                let result = c.all_reduce_sum(&mut x).await;
                (c, result, started.elapsed())
            })
        })
        .collect();
    sleep(Duration::from_millis(200)).await;
    drop(victim);
    for handle in survivors {
        let (c, result, _) =
            timeout(Duration::from_secs(10), handle).await.expect("a survivor hung").unwrap();
        let err = result.expect_err("the collective cannot succeed");
        assert_eq!(err.culprit(), Some(dead), "rank {}: {err}", c.rank());
        assert!(err.to_string().contains(&format!("rank {dead}")), "rank {}: {err}", c.rank());
        // Later operations fail at once rather than hanging.
        let later =
            timeout(Duration::from_secs(5), c.barrier()).await.expect("barrier hung after the failure");
        assert!(later.is_err());
        let p2p =
            timeout(Duration::from_secs(5), c.recv(dead, 1)).await.expect("recv hung after the failure");
        assert!(p2p.is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_peer_fails_pending_receives_from_it_only() {
    let mut comms = group(3).await;
    let c0 = comms.remove(0);
    let c1 = comms.remove(0);
    let c2 = comms.remove(0);
    let c0b = c0.clone();
    let pending = tokio::spawn(async move { c0b.recv(1, 11).await });
    sleep(Duration::from_millis(50)).await;
    drop(c1);
    let err = timeout(Duration::from_secs(10), pending).await.expect("recv hung").unwrap().unwrap_err();
    assert!(matches!(err, CommError::PeerFailed { peer: 1, .. }), "{err}");
    assert!(err.to_string().contains("rank 1"), "{err}");
    // Point-to-point with a healthy peer still works.
    c2.send(0, 12, Bytes::from_static(b"still here")).await.unwrap();
    assert_eq!(timeout(LIMIT, c0.recv(2, 12)).await.unwrap().unwrap(), Bytes::from_static(b"still here"));
    assert!(c0.send(1, 1, Bytes::new()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_unblocks_pending_operations_promptly() {
    let comms = group(2).await;
    let handle = comms[0].abort_handle();
    let c = comms[0].clone();
    let pending_recv = tokio::spawn(async move { c.recv(1, 5).await });
    let c = comms[0].clone();
    let pending_collective = tokio::spawn(async move {
        let mut x = vec![1.0f32; 10];
        // Rank 1 never joins: this waits until the abort.
        c.all_reduce_sum(&mut x).await
    });
    let c = comms[1].clone();
    let peer_waiting = tokio::spawn(async move { c.recv(0, 6).await });
    sleep(Duration::from_millis(100)).await;
    let aborted_at = Instant::now();
    handle.abort("coordinator: rank 3 lost");
    let err = timeout(Duration::from_secs(2), pending_recv)
        .await
        .expect("recv not unblocked")
        .unwrap()
        .unwrap_err();
    assert!(matches!(&err, CommError::Aborted { reason } if reason.contains("rank 3 lost")), "{err}");
    let err = timeout(Duration::from_secs(2), pending_collective)
        .await
        .expect("collective hung")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, CommError::Aborted { .. }), "{err}");
    assert!(aborted_at.elapsed() < Duration::from_secs(2));
    // Later operations fail at once.
    assert!(matches!(comms[0].send(1, 1, Bytes::new()).await, Err(CommError::Aborted { .. })));
    assert!(matches!(comms[0].barrier().await, Err(CommError::Aborted { .. })));
    // The peer learns of it through the abort frame, with the reason.
    let err = timeout(Duration::from_secs(5), peer_waiting).await.expect("peer hung").unwrap().unwrap_err();
    assert!(
        matches!(&err, CommError::PeerAborted { peer: 0, reason, .. } if reason.contains("rank 3 lost")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_fail_the_link() {
    // Rank 1 accepts frames of at most 1 KiB; rank 0 (misconfigured) would send 1 MiB.
    let a = TcpRendezvous::bind("127.0.0.1:0").await.unwrap();
    let b = TcpRendezvous::bind("127.0.0.1:0").await.unwrap();
    let addrs = vec![a.local_addr(), b.local_addr()];
    let (ra, rb) = tokio::join!(
        a.connect(0, addrs.clone(), options(3).with_max_frame_bytes(1 << 20)),
        b.connect(1, addrs, options(3).with_max_frame_bytes(1024))
    );
    let (c0, c1) = (ra.unwrap(), rb.unwrap());
    // A rank refuses to send what its own limit forbids, without harming the link.
    let err = c1.send(0, 1, Bytes::from(vec![0u8; 1025])).await.unwrap_err();
    assert!(matches!(err, CommError::MessageTooLarge { peer: 0, tag: 1, len: 1025, max: 1024 }), "{err}");
    c0.send(1, 8, Bytes::from(vec![0u8; 1024])).await.unwrap();
    c0.send(1, 9, Bytes::from(vec![0u8; 1025])).await.unwrap();
    assert_eq!(timeout(LIMIT, c1.recv(0, 8)).await.unwrap().unwrap().len(), 1024);
    let err = timeout(LIMIT, c1.recv(0, 9)).await.unwrap().unwrap_err();
    assert!(matches!(err, CommError::FrameTooLarge { peer: 0, tag: 9, len: 1025, max: 1024 }), "{err}");
    // The sender sees the link fail too, with rank 1's reason.
    let err = timeout(LIMIT, c0.recv(1, 1)).await.expect("sender hung").unwrap_err();
    assert_eq!(err.peer(), Some(1), "{err}");
    assert!(err.to_string().contains("above the maximum"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_peer_of_another_session_is_refused_naming_the_peer_not_the_session() {
    // Both hold the secret (a misconfiguration, not a stranger): the rendezvous fails.
    let a = TcpRendezvous::bind("127.0.0.1:0").await.unwrap();
    let b = TcpRendezvous::bind("127.0.0.1:0").await.unwrap();
    let addrs = vec![a.local_addr(), b.local_addr()];
    let short = |s| options(s).with_connect_timeout(Duration::from_secs(5));
    let (ra, rb) =
        tokio::join!(a.connect(0, addrs.clone(), short(100)), b.connect(1, addrs.clone(), short(200)));
    let ea = ra.unwrap_err();
    let eb = rb.unwrap_err();
    assert!(matches!(ea, CommError::Handshake { peer: 1, .. }), "{ea}");
    assert!(matches!(eb, CommError::Handshake { peer: 0, .. }), "{eb}");
    for err in [ea, eb] {
        let text = err.to_string();
        assert!(text.contains("another session"), "{text}");
        assert!(!text.contains("100") && !text.contains("200"), "the session is not printed: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_rank_is_refused() {
    // Rank 2 of 3 waits for ranks 0 and 1; two authenticated connections both claim rank 0.
    let l = TcpRendezvous::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr();
    let unused = TcpRendezvous::bind("127.0.0.1:0").await.unwrap().local_addr();
    let waiting = tokio::spawn(l.connect(2, vec![unused, unused, addr], options(5)));
    let mut first = TcpStream::connect(addr).await.unwrap();
    let theirs = handshake::dial(&mut first, &Hello::new(0, 3, 5), &secret()).await.expect("authenticated");
    assert_eq!((theirs.rank, theirs.world_size, theirs.session), (2, 3, 5));
    let mut second = TcpStream::connect(addr).await.unwrap();
    let _ = handshake::dial(&mut second, &Hello::new(0, 3, 5), &secret()).await;
    let err = timeout(LIMIT, waiting).await.unwrap().unwrap().unwrap_err();
    assert!(matches!(err, CommError::Handshake { peer: 0, .. }), "{err}");
    assert!(err.to_string().contains("duplicate rank"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_ignored_and_silence_times_out() {
    let a = TcpRendezvous::bind("127.0.0.1:0").await.unwrap();
    let b = TcpRendezvous::bind("127.0.0.1:0").await.unwrap();
    let addrs = vec![a.local_addr(), b.local_addr()];
    // Something that is not a flotilla peer connects to rank 1 first.
    let mut stranger = TcpStream::connect(b.local_addr()).await.unwrap();
    stranger.write_all(b"GET / HTTP/1.1\r\nHost: flotilla\r\n\r\n").await.unwrap();
    let (ra, rb) = tokio::join!(a.connect(0, addrs.clone(), options(9)), b.connect(1, addrs, options(9)));
    let (ca, cb) = (ra.unwrap(), rb.unwrap());
    ca.send(1, 0, Bytes::from_static(b"ok")).await.unwrap();
    assert_eq!(timeout(LIMIT, cb.recv(0, 0)).await.unwrap().unwrap(), Bytes::from_static(b"ok"));

    // A rank whose peer never shows up gets a timeout naming it.
    let lonely = TcpRendezvous::bind("127.0.0.1:0").await.unwrap();
    let nobody = TcpRendezvous::bind("127.0.0.1:0").await.unwrap().local_addr(); // dropped: nothing listens
    let started = Instant::now();
    let err = lonely
        .connect(
            0,
            vec![lonely_addr_placeholder(), nobody],
            options(9).with_connect_timeout(Duration::from_millis(500)),
        )
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, CommError::RendezvousTimeout { rank: 0, .. }), "{err}");
    assert!(err.to_string().contains("rank 1"), "{err}");
}

/// Rank 0's own entry in the address list is not used.
fn lonely_addr_placeholder() -> std::net::SocketAddr {
    "127.0.0.1:9".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_flushes_and_says_goodbye() {
    let mut comms = timeout(LIMIT, loopback_group(3, options(11))).await.unwrap().unwrap();
    let c2 = comms.pop().unwrap();
    let c1 = comms.pop().unwrap();
    let c0 = comms.pop().unwrap();
    // Rank 0 queues a large message and shuts down at once: it still arrives whole.
    let big = Bytes::from(vec![7u8; 8 << 20]);
    c0.send(1, 1, big.clone()).await.unwrap();
    let (shut, got) = tokio::join!(c0.shutdown(), async {
        let got = c1.recv(0, 1).await;
        // After the goodbye, receives from rank 0 fail as "shut down", not as a failure.
        let after = c1.recv(0, 2).await;
        (got, after)
    });
    shut.unwrap();
    assert_eq!(got.0.unwrap(), big);
    assert!(matches!(got.1, Err(CommError::PeerClosed { peer: 0 })), "{:?}", got.1);
    // Ranks 1 and 2 are undisturbed by rank 0's departure.
    c2.send(1, 3, Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(timeout(LIMIT, c1.recv(2, 3)).await.unwrap().unwrap(), Bytes::from_static(b"x"));
    let (s1, s2) = tokio::join!(c1.shutdown(), c2.shutdown());
    s1.unwrap();
    s2.unwrap();
}
