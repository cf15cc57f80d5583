//! Property tests over what the data plane reads from the network: the hello decoder fed
//! arbitrary bytes and valid hellos mutated; a real acceptor fed arbitrary bytes by a
//! stranger before its real peer connects; and a real communicator fed arbitrary frames by
//! an authenticated peer. None may panic or hang; a stranger never stops the rendezvous,
//! and a bad frame fails the link with an error naming the peer. Case counts are small:
//! the whole file runs in seconds.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use flotilla_worker::comm::handshake::{self, BadHello, DATA_PLANE_VERSION, HELLO_LEN, Hello};
use flotilla_worker::comm::{CommError, Communicator, DataPlaneSecret, TcpOptions, TcpRendezvous};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::time::timeout;

/// Generous: the machine running the suite may be small and shared.
const LIMIT: Duration = Duration::from_secs(60);

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    })
}

/// `valid` with each `(position, byte)` written over it (positions wrap), cut to `keep`
/// of its length when `keep` is below 1.
fn mutate(valid: &[u8], edits: &[(usize, u8)], keep: f64) -> Vec<u8> {
    let mut bytes = valid.to_vec();
    if !bytes.is_empty() {
        for &(at, byte) in edits {
            let at = at % bytes.len();
            bytes[at] = byte;
        }
    }
    let len = ((bytes.len() as f64) * keep.clamp(0.0, 1.0)) as usize;
    bytes.truncate(len.max(if keep >= 1.0 { bytes.len() } else { 0 }));
    bytes
}

fn edits() -> impl Strategy<Value = (Vec<(usize, u8)>, f64)> {
    (prop::collection::vec((any::<usize>(), any::<u8>()), 0..8), prop_oneof![Just(1.0), 0.0..1.0f64])
}

/// Encoded frames `tag | len | payload`, the length as announced (not necessarily true).
fn frames(list: &[(u64, u64, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (tag, len, payload) in list {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(payload);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_hello_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..80), (edits, keep) in edits()) {
        let valid = Hello::new(1, 4, 99).encode();
        for bytes in [bytes, mutate(&valid, &edits, keep)] {
            match Hello::decode(&bytes) {
                Ok(hello) => {
                    prop_assert_eq!(bytes.len(), HELLO_LEN);
                    prop_assert_eq!(hello.version, DATA_PLANE_VERSION);
                    prop_assert_eq!(&hello.encode()[..], &bytes[..]);
                }
                Err(BadHello::Magic) => prop_assert!(bytes.len() < 8 || bytes[..8] != *b"FLOTILLA"),
                Err(BadHello::Version(v)) => prop_assert_ne!(v, DATA_PLANE_VERSION),
                Err(BadHello::Length(n)) => prop_assert_ne!(n, HELLO_LEN),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn a_stranger_sending_anything_never_stops_the_rendezvous(
        bytes in prop::collection::vec(any::<u8>(), 0..200),
        (edits, keep) in edits(),
    ) {
        let garbage = [bytes, mutate(&Hello::new(0, 2, 3).encode(), &edits, keep)].concat();
        runtime().block_on(async {
            let secret = DataPlaneSecret::random();
            let opts = TcpOptions::new(3, secret).with_connect_timeout(Duration::from_secs(30));
            let (l0, l1) = (bind().await, bind().await);
            let addrs = vec![l0.local_addr(), l1.local_addr()];
            let mut stranger = TcpStream::connect(addrs[1]).await.unwrap();
            let _ = stranger.write_all(&garbage).await;
            let _ = stranger.shutdown().await;
            let (c0, c1) = tokio::join!(l0.connect(0, addrs.clone(), opts.clone()), l1.connect(1, addrs, opts));
            let (c0, c1) = (c0.expect("rank 0 connects"), c1.expect("rank 1 connects"));
            c0.send(1, 1, bytes::Bytes::from_static(b"x")).await.unwrap();
            let got = timeout(LIMIT, c1.recv(0, 1)).await.expect("recv hung").expect("recv");
            assert_eq!(&got[..], b"x");
        });
    }

    #[test]
    fn frames_from_an_authenticated_peer_never_panic_and_fail_only_its_link(
        list in prop::collection::vec(
            (prop_oneof![0..4u64, Just(u64::MAX), Just(u64::MAX - 1), any::<u64>()],
             prop_oneof![0..64u64, Just(1 << 20), any::<u64>()],
             prop::collection::vec(any::<u8>(), 0..64)),
            0..6),
        (edits, keep) in edits(),
    ) {
        let bytes = mutate(&frames(&list), &edits, keep);
        runtime().block_on(async {
            let secret = DataPlaneSecret::random();
            let opts = TcpOptions::new(5, secret.clone())
                .with_connect_timeout(Duration::from_secs(30))
                .with_max_frame_bytes(1 << 16)
                .with_max_buffered_bytes(1 << 12);
            let rank1 = bind().await;
            let addr = rank1.local_addr();
            let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
            let waiting = tokio::spawn(rank1.connect(1, vec![unused, addr], opts));
            let mut s = TcpStream::connect(addr).await.unwrap();
            handshake::dial(&mut s, &Hello::new(0, 2, 5), &secret).await.expect("authenticated");
            let comm = timeout(LIMIT, waiting).await.unwrap().unwrap().expect("rank 1 connected");
            let _ = s.write_all(&bytes).await;
            drop(s);
            // Every receive resolves: with a message that arrived, or with the link's end,
            // which names rank 0.
            for tag in 0..4u64 {
                loop {
                    match timeout(LIMIT, comm.recv(0, tag)).await.expect("recv hung") {
                        Ok(_) => continue,
                        Err(err) => {
                            assert!(
                                err.peer() == Some(0) || matches!(err, CommError::Aborted { .. }),
                                "{err}"
                            );
                            break;
                        }
                    }
                }
            }
        });
    }
}

async fn bind() -> TcpRendezvous {
    TcpRendezvous::bind("127.0.0.1:0").await.unwrap()
}
