//! The data plane against what an attacker on the network can send, with raw sockets
//! against real communicators on loopback: strangers (a planted hello of another session
//! or secret, garbage, silence, a close half-way through the handshake, a hundred at once)
//! are dropped and the real peers still connect; a replayed proof is refused; a frame
//! announcing more than the bound fails the peer before anything is allocated, and one
//! announced but never sent costs at most a chunk (a counting allocator watches); frames
//! on a tag nobody receives fail the peer past the buffer bound; and the secret shows in
//! no `Debug`, `Display` or error.
//!
//! Every wait is bounded by a timeout, so a hang fails the test instead of stalling.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use flotilla_worker::comm::handshake::{self, Direction, HELLO_LEN, Hello, PROOF_LEN};
use flotilla_worker::comm::{
    CommError, Communicator, DataPlaneSecret, TcpCommunicator, TcpOptions, TcpRendezvous,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::timeout;

/// Generous: the machine running the suite may be small and shared.
const LIMIT: Duration = Duration::from_secs(60);

/// Counts the bytes allocated now and the most allocated at once since the last reset.
struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is to the system allocator.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is to the system allocator.
        unsafe { System.dealloc(ptr, layout) };
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn options(session: u64, secret: &DataPlaneSecret) -> TcpOptions {
    TcpOptions::new(session, secret.clone()).with_connect_timeout(Duration::from_secs(30))
}

/// Binds `n` listeners on loopback.
async fn listeners(n: usize) -> (Vec<TcpRendezvous>, Vec<SocketAddr>) {
    let mut ls = Vec::new();
    for _ in 0..n {
        ls.push(TcpRendezvous::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs = ls.iter().map(TcpRendezvous::local_addr).collect();
    (ls, addrs)
}

/// Rendezvouses the bound listeners as one world.
async fn connect_all(ls: Vec<TcpRendezvous>, addrs: &[SocketAddr], opts: TcpOptions) -> Vec<TcpCommunicator> {
    let joined = futures::future::try_join_all(
        ls.into_iter().enumerate().map(|(rank, l)| l.connect(rank, addrs.to_vec(), opts.clone())),
    );
    timeout(LIMIT, joined).await.expect("the rendezvous hung").expect("the rendezvous succeeds")
}

/// Sums `rank + 1` over the world: the collective every rank must complete.
async fn all_reduce_works(comms: &[TcpCommunicator]) {
    let n = comms.len();
    let sums = futures::future::join_all(comms.iter().enumerate().map(|(rank, c)| async move {
        let mut data = vec![rank as f32 + 1.0; 5];
        c.all_reduce_sum(&mut data).await.map(|()| data)
    }));
    let expected = (n * (n + 1) / 2) as f32;
    for sum in timeout(LIMIT, sums).await.expect("the all-reduce hung") {
        assert_eq!(sum.expect("the all-reduce succeeds"), vec![expected; 5]);
    }
}

/// Reads until the other end closes; true if it sent nothing (no proof, no hello).
async fn closed_without_a_word(stream: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    // A reset counts as a close; only a hang within the limit does not.
    timeout(LIMIT, stream.read_to_end(&mut rest)).await.is_ok() && rest.is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hellos_planted_before_the_job_do_not_fail_the_rendezvous() {
    let secret = DataPlaneSecret::random();
    let (ls, addrs) = listeners(3).await;
    let mut planted = JoinSet::new();
    for &addr in &addrs[1..] {
        // Connected before the job's rendezvous starts, so they wait in the backlog ahead
        // of the real peers. Whether the acceptor gets to answer them before its real
        // peers arrive is timing; what is not: a stranger never gets a proof.
        // A well-formed hello of another session claiming rank 0, then a made-up proof:
        // the attack of issue 19, which used to fail the job outright.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&Hello::new(0, 3, 666).encode()).await.unwrap();
        planted.spawn(async move {
            let mut theirs = [0u8; HELLO_LEN];
            if s.read_exact(&mut theirs).await.is_ok() {
                let _ = s.write_all(&[0x5a; PROOF_LEN]).await;
                assert!(closed_without_a_word(&mut s).await, "a stranger gets no proof");
            }
        });
        // The right session and rank, but another secret.
        let mut s = TcpStream::connect(addr).await.unwrap();
        planted.spawn(async move {
            let got = handshake::dial(&mut s, &Hello::new(0, 3, 7), &DataPlaneSecret::random()).await;
            assert!(got.is_err(), "a wrong secret is refused: {got:?}");
        });
    }
    let comms = connect_all(ls, &addrs, options(7, &secret)).await;
    all_reduce_works(&comms).await;
    while let Some(done) = timeout(LIMIT, planted.join_next()).await.expect("a stranger hung") {
        done.expect("the stranger saw what it should");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_silence_half_handshakes_and_a_hundred_strangers_are_dropped() {
    let secret = DataPlaneSecret::random();
    let (ls, addrs) = listeners(2).await;
    let target = addrs[1];
    // Held open for the whole test: silent ones would otherwise hold their handshake slot
    // for the full timeout; past the bound, newer connections evict the oldest.
    let mut held = Vec::new();
    for i in 0..100 {
        let mut s = TcpStream::connect(target).await.unwrap();
        match i % 4 {
            0 => s.write_all(b"GET / HTTP/1.1\r\nHost: flotilla\r\n\r\n").await.unwrap(),
            1 => {}                                                               // silent
            2 => s.write_all(&Hello::new(0, 2, 1).encode()[..20]).await.unwrap(), // half a hello
            _ => s.write_all(&Hello::new(0, 2, 1).encode()).await.unwrap(),       // a hello, then silence
        }
        held.push(s);
    }
    // A few that close half-way through the handshake, once the acceptor answered.
    let mut closers = JoinSet::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(target).await.unwrap();
        s.write_all(&Hello::new(0, 2, 1).encode()).await.unwrap();
        closers.spawn(async move {
            let mut theirs = [0u8; HELLO_LEN];
            let _ = s.read_exact(&mut theirs).await;
        });
    }
    let comms = connect_all(ls, &addrs, options(1, &secret)).await;
    closers.abort_all();
    comms[0].send(1, 3, Bytes::from_static(b"through")).await.unwrap();
    let got = timeout(LIMIT, comms[1].recv(0, 3)).await.expect("recv hung").expect("recv");
    assert_eq!(got, Bytes::from_static(b"through"));
    all_reduce_works(&comms).await;
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_replayed_from_another_handshake_is_refused() {
    let secret = DataPlaneSecret::random();
    // Capture: the real rank 0 dials a listener the attacker controls, which answers like
    // rank 1 would, and hands over its (genuine) proof for that connection.
    let fake = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (ls, mut addrs) = listeners(1).await;
    let rank1 = ls.into_iter().next().unwrap();
    addrs.push(fake.local_addr().unwrap());
    let mut fooled = tokio::spawn(TcpRendezvous::bind("127.0.0.1:0").await.unwrap().connect(
        0,
        addrs.clone(),
        options(9, &secret).with_connect_timeout(Duration::from_secs(20)),
    ));
    let (mut s, _) = timeout(LIMIT, fake.accept()).await.unwrap().unwrap();
    let mut hello_d = [0u8; HELLO_LEN];
    s.read_exact(&mut hello_d).await.unwrap();
    let hello_a = Hello::new(1, 2, 9).encode();
    s.write_all(&hello_a).await.unwrap();
    let mut proof = [0u8; PROOF_LEN];
    s.read_exact(&mut proof).await.unwrap();
    assert!(secret.verify(Direction::DialerToAcceptor, &hello_d, &hello_a, &proof), "a genuine proof");
    drop(s);
    fooled.abort();
    let _ = (&mut fooled).await;

    // Replay: the same hello and proof against the real rank 1, which draws a new nonce.
    let rank1_addr = rank1.local_addr();
    let waiting = tokio::spawn(rank1.connect(1, vec![addrs[0], rank1_addr], options(9, &secret)));
    let mut r = TcpStream::connect(rank1_addr).await.unwrap();
    r.write_all(&hello_d).await.unwrap();
    let mut fresh = [0u8; HELLO_LEN];
    r.read_exact(&mut fresh).await.unwrap();
    assert_ne!(fresh[28..], hello_a[28..], "the acceptor's nonce is fresh");
    r.write_all(&proof).await.unwrap();
    assert!(closed_without_a_word(&mut r).await, "the replayed proof is refused");

    // The real rank 0 still gets in.
    let rank0 = TcpRendezvous::bind("127.0.0.1:0").await.unwrap();
    let c0 = rank0.connect(0, vec![addrs[0], rank1_addr], options(9, &secret));
    let (c0, c1) = tokio::join!(c0, async { timeout(LIMIT, waiting).await.unwrap().unwrap() });
    let comms = vec![c0.expect("rank 0"), c1.expect("rank 1")];
    all_reduce_works(&comms).await;
}

/// The test as rank 0 of a world of two: a real rank 1 with `opts`, and the test's socket,
/// authenticated with the real handshake.
async fn authenticated_rank0(secret: &DataPlaneSecret, opts: TcpOptions) -> (TcpStream, TcpCommunicator) {
    let rank1 = TcpRendezvous::bind("127.0.0.1:0").await.unwrap();
    let addr = rank1.local_addr();
    let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let waiting = tokio::spawn(rank1.connect(1, vec![unused, addr], opts));
    let mut s = TcpStream::connect(addr).await.unwrap();
    let session = 5;
    handshake::dial(&mut s, &Hello::new(0, 2, session), secret).await.expect("authenticated");
    let comm = timeout(LIMIT, waiting).await.unwrap().unwrap().expect("rank 1 connected");
    (s, comm)
}

async fn write_frame(s: &mut TcpStream, tag: u64, len: u64, payload: &[u8]) {
    s.write_all(&tag.to_le_bytes()).await.unwrap();
    s.write_all(&len.to_le_bytes()).await.unwrap();
    s.write_all(payload).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_above_the_bound_fails_the_peer_and_an_unsent_one_costs_nothing() {
    let secret = DataPlaneSecret::random();
    let max = 1u64 << 30;
    let (mut s, comm) = authenticated_rank0(&secret, options(5, &secret).with_max_frame_bytes(max)).await;
    // Announced within the bound, 16 bytes sent, then the connection closes: the reader
    // held at most a chunk for it, never the 768 MiB announced.
    PEAK.store(ALLOCATED.load(Ordering::Relaxed), Ordering::Relaxed);
    let before = ALLOCATED.load(Ordering::Relaxed);
    write_frame(&mut s, 4, 768 << 20, &[1; 16]).await;
    drop(s);
    let err = timeout(LIMIT, comm.recv(0, 4)).await.expect("recv hung").unwrap_err();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert!(matches!(&err, CommError::PeerFailed { peer: 0, reason } if reason.contains("16 of")), "{err}");
    assert!(peak < 64 << 20, "an announced frame allocated {peak} bytes before it arrived");

    // Above the bound: refused on the header, naming the peer and the tag.
    let (mut s, comm) = authenticated_rank0(&secret, options(5, &secret).with_max_frame_bytes(max)).await;
    write_frame(&mut s, 6, 1 << 40, &[]).await;
    let err = timeout(LIMIT, comm.recv(0, 6)).await.expect("recv hung").unwrap_err();
    assert!(
        matches!(err, CommError::FrameTooLarge { peer: 0, tag: 6, len, max: m } if len == 1 << 40 && m == max),
        "{err}"
    );
    assert!(err.to_string().contains("rank 0") && err.to_string().contains("0x6"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_nobody_receives_fail_the_peer_past_the_buffer_bound() {
    let secret = DataPlaneSecret::random();
    let opts = options(5, &secret).with_max_buffered_bytes(4096);
    let (mut s, comm) = authenticated_rank0(&secret, opts).await;
    // What is received frees its room: 3 rounds of 4000 bytes buffered then taken.
    for round in 0..3u8 {
        for _ in 0..4 {
            write_frame(&mut s, 9, 1000, &[round; 1000]).await;
        }
        for _ in 0..4 {
            let got = timeout(LIMIT, comm.recv(0, 9)).await.expect("recv hung").expect("buffered");
            assert_eq!(got, Bytes::from(vec![round; 1000]));
        }
    }
    // Five never received: the fifth is past 4096 bytes.
    for _ in 0..5 {
        write_frame(&mut s, 9, 1000, &[7; 1000]).await;
    }
    let err = timeout(LIMIT, comm.recv(0, 10)).await.expect("recv hung").unwrap_err();
    assert!(
        matches!(err, CommError::BufferOverflow { peer: 0, tag: 9, len: 1000, buffered: 4000, max: 4096 }),
        "{err}"
    );
    assert!(err.to_string().contains("rank 0"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secret_shows_in_no_debug_display_or_error() {
    let bytes = [0xab_u8; 32];
    let secret = DataPlaneSecret::from_bytes(&bytes).unwrap();
    let forms = [
        "ab".repeat(32),
        "AB".repeat(32),
        format!("{bytes:?}"),
        String::from_utf8_lossy(&bytes).into_owned(),
        "171, 171, 171".into(),
    ];
    let check = |text: &str| {
        for form in &forms {
            assert!(!text.contains(form.as_str()), "the secret leaked into: {text}");
        }
    };
    check(&format!("{secret:?}"));
    let opts = options(5, &secret).with_connect_timeout(Duration::from_millis(800));
    check(&format!("{opts:?}"));
    let assignment =
        flotilla_proto::v1::Assignment { data_plane_secret: bytes.to_vec(), ..Default::default() };
    let shown = format!("{assignment:?}");
    assert!(shown.contains("data_plane_secret: <redacted, 32 bytes>"), "{shown}");
    check(&shown);
    // A rendezvous that fails (rank 1 sees only a stranger) says so without the secret.
    let (ls, addrs) = listeners(2).await;
    let mut ls = ls.into_iter();
    let (l0, l1) = (ls.next().unwrap(), ls.next().unwrap());
    let other = options(5, &DataPlaneSecret::random()).with_connect_timeout(Duration::from_millis(800));
    let (e0, e1) = tokio::join!(l0.connect(0, addrs.clone(), other), l1.connect(1, addrs.clone(), opts));
    for err in [e0.unwrap_err(), e1.unwrap_err()] {
        assert!(matches!(err, CommError::RendezvousTimeout { .. }), "{err}");
        check(&err.to_string());
        check(&format!("{err:?}"));
    }
    let err = DataPlaneSecret::from_bytes(&bytes[..31]).unwrap_err();
    check(&err.to_string());
}
