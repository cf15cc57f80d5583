//! Sub-group communicators ([`Group`]) end to end: every rank in this process on
//! 127.0.0.1, on a multi-threaded runtime. Every wait is under `tokio::time::timeout`, so a
//! hang fails the test instead of stalling the suite.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use flotilla_worker::comm::{
    CommError, Communicator, DataPlaneSecret, Group, MAX_GROUP_ID, MAX_USER_TAG, TcpCommunicator, TcpOptions,
    loopback_group, ring_reference_sum,
};
use futures::FutureExt;
use tokio::time::{sleep, timeout};

/// Generous: the machine running the suite may be small and shared.
const LIMIT: Duration = Duration::from_secs(60);
/// How long a failure may take to reach every member before the test calls it a hang.
const HANG_GUARD: Duration = Duration::from_secs(30);

fn options() -> TcpOptions {
    TcpOptions::new(21, DataPlaneSecret::random())
        .with_connect_timeout(Duration::from_secs(20))
        .with_shutdown_linger(Duration::from_secs(2))
}

async fn world(n: usize) -> Vec<Arc<TcpCommunicator>> {
    let comms =
        timeout(LIMIT, loopback_group(n, options())).await.expect("rendezvous hung").expect("rendezvous");
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

/// A group that tasks can own.
type ArcGroup = Group<Arc<TcpCommunicator>>;

/// `comm`'s view of group `id` over `members`, if `comm`'s rank is a member.
fn group_view(comm: &Arc<TcpCommunicator>, id: u32, members: &[usize]) -> Option<ArcGroup> {
    members
        .contains(&comm.rank())
        .then(|| Group::new(comm.clone(), members.to_vec(), id).expect("a valid group"))
}

/// splitmix64: deterministic test data without a dependency.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Values spanning six decades with both signs, so that the summation order shows in the
/// low bits; `seed` names the buffer (round, collective, world rank).
fn data(seed: u64, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let r = mix(mix(seed) ^ i as u64);
            let unit = (r >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let decade = 10f32.powi((r % 7) as i32 - 3);
            unit * decade
        })
        .collect()
}

fn seed(round: u64, what: u64, world_rank: usize) -> u64 {
    round << 48 | what << 32 | world_rank as u64
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// The ring's result over `members`' buffers (world ranks, in group-rank order).
fn reference(members: &[usize], input: impl Fn(usize) -> Vec<f32>) -> Vec<u32> {
    let inputs: Vec<Vec<f32>> = members.iter().map(|&w| input(w)).collect();
    let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
    bits(&ring_reference_sum(&refs).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disjoint_groups_run_beside_world_collectives() {
    const EVEN: [usize; 3] = [0, 2, 4];
    const ODD: [usize; 3] = [1, 3, 5];
    // Group chunks of ~333k elements travel as two 1 MiB segments.
    const GROUP_LEN: usize = 1_000_003;
    const WORLD_LEN: usize = 100_003;
    const ROUNDS: u64 = 3;
    let comms = world(6).await;
    let outputs = on_all(&comms, |c| async move {
        let r = c.rank();
        let (group, id) =
            if r % 2 == 0 { (group_view(&c, 1, &EVEN), 1) } else { (group_view(&c, 2, &ODD), 2) };
        let group = group.unwrap();
        assert_eq!((group.rank(), group.world_size(), group.group_id()), (r / 2, 3, id));
        let mut results = Vec::new();
        for round in 0..ROUNDS {
            let mut w = data(seed(round, 0, r), WORLD_LEN);
            let mut g = data(seed(round, u64::from(id), r), GROUP_LEN);
            let (wp, gp) = (gather_payload("world", round, r), gather_payload("group", round, r));
            // All in flight at once, issued in different orders on different ranks. The
            // world's and the group's collectives have the same sequence numbers (two a
            // round each), and the all-gathers send on every link, the group's rings' too:
            // only the group id keeps their messages apart.
            let (rw, rg, ww, gg) = if (r + round as usize).is_multiple_of(3) {
                let gf = group.all_reduce_sum(&mut g);
                let gg = group.all_gather(gp);
                let wf = c.all_reduce_sum(&mut w);
                let wg = c.all_gather(wp);
                tokio::join!(wf, gf, wg, gg)
            } else {
                tokio::join!(
                    c.all_reduce_sum(&mut w),
                    group.all_reduce_sum(&mut g),
                    c.all_gather(wp),
                    group.all_gather(gp)
                )
            };
            rw.unwrap();
            rg.unwrap();
            results.push((bits(&w), bits(&g), ww.unwrap(), gg.unwrap()));
        }
        // Groups may run collectives the world does not: their numbering is their own.
        group.barrier().await.unwrap();
        c.barrier().await.unwrap();
        results
    })
    .await;
    let all: Vec<usize> = (0..6).collect();
    for round in 0..ROUNDS {
        let world_expected = reference(&all, |w| data(seed(round, 0, w), WORLD_LEN));
        let even_expected = reference(&EVEN, |w| data(seed(round, 1, w), GROUP_LEN));
        let odd_expected = reference(&ODD, |w| data(seed(round, 2, w), GROUP_LEN));
        let world_gathered: Vec<Bytes> = all.iter().map(|&w| gather_payload("world", round, w)).collect();
        for (rank, results) in outputs.iter().enumerate() {
            let (w, g, ww, gg) = &results[round as usize];
            assert!(*w == world_expected, "round {round}: rank {rank}'s world all-reduce");
            assert!(*ww == world_gathered, "round {round}: rank {rank}'s world all-gather");
            let (expected, members) =
                if rank % 2 == 0 { (&even_expected, EVEN) } else { (&odd_expected, ODD) };
            assert!(g == expected, "round {round}: rank {rank}'s group all-reduce");
            let group_gathered: Vec<Bytes> =
                members.iter().map(|&w| gather_payload("group", round, w)).collect();
            assert!(*gg == group_gathered, "round {round}: rank {rank}'s group all-gather");
        }
    }
}

/// What world rank `world_rank` contributes to an all-gather in the disjoint-groups test.
fn gather_payload(what: &str, round: u64, world_rank: usize) -> Bytes {
    Bytes::from(format!("{what} round {round} from world rank {world_rank}"))
}

/// What a collective of the overlapping-groups test returned.
#[derive(Debug)]
enum Out {
    Reduced,
    Gathered(Vec<Bytes>),
    Cast(Bytes),
    Passed,
}

type Pending<'a> = Pin<Box<dyn Future<Output = Result<Out, CommError>> + Send + 'a>>;

/// The collectives of the overlapping-groups test: group A = {0, 1, 2} runs `ReduceA1`,
/// `GatherA`, `ReduceA2` in this order, group B = {1, 2, 3} `ReduceB`, `CastB`, `BarrierB`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    ReduceA1,
    GatherA,
    ReduceA2,
    ReduceB,
    CastB,
    BarrierB,
}

const GROUP_A: [usize; 3] = [0, 1, 2];
const GROUP_B: [usize; 3] = [1, 2, 3];
const OVERLAP_LEN: usize = 30_011;

fn overlap_input(op: Op, world_rank: usize) -> Vec<f32> {
    data(seed(7, op as u64, world_rank), OVERLAP_LEN)
}

fn overlap_payload(world_rank: usize) -> Bytes {
    Bytes::from(vec![world_rank as u8; 100 * world_rank])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_groups_issue_in_any_relative_order() {
    use Op::*;
    let comms = world(4).await;
    let outputs = on_all(&comms, |c| async move {
        let r = c.rank();
        let a = group_view(&c, 10, &GROUP_A);
        let b = group_view(&c, 11, &GROUP_B);
        // Same order within each group on every member; across the groups, ranks 1 and 2
        // interleave differently.
        let order: &[Op] = match r {
            0 => &[ReduceA1, GatherA, ReduceA2],
            1 => &[ReduceA1, ReduceB, GatherA, CastB, ReduceA2, BarrierB],
            2 => &[ReduceB, CastB, ReduceA1, BarrierB, GatherA, ReduceA2],
            _ => &[ReduceB, CastB, BarrierB],
        };
        let mut a1 = overlap_input(ReduceA1, r);
        let mut a2 = overlap_input(ReduceA2, r);
        let mut b1 = overlap_input(ReduceB, r);
        let (mut a1_slot, mut a2_slot, mut b1_slot) = (Some(&mut a1), Some(&mut a2), Some(&mut b1));
        let reduced = |r: Result<(), CommError>| r.map(|()| Out::Reduced);
        // Each collective is called (and numbered) here, in `order`; all complete together.
        let mut pending: Vec<Pending<'_>> = Vec::new();
        for &op in order {
            let (a, b) = (a.as_ref(), b.as_ref());
            pending.push(match op {
                ReduceA1 => Box::pin(a.unwrap().all_reduce_sum(a1_slot.take().unwrap()).map(reduced)),
                GatherA => Box::pin(a.unwrap().all_gather(overlap_payload(r)).map(|g| g.map(Out::Gathered))),
                ReduceA2 => Box::pin(a.unwrap().all_reduce_sum(a2_slot.take().unwrap()).map(reduced)),
                ReduceB => Box::pin(b.unwrap().all_reduce_sum(b1_slot.take().unwrap()).map(reduced)),
                CastB => {
                    let mine = Bytes::from(format!("from world rank {r}"));
                    Box::pin(b.unwrap().broadcast(1, mine).map(|g| g.map(Out::Cast)))
                }
                BarrierB => Box::pin(b.unwrap().barrier().map(|g| g.map(|()| Out::Passed))),
            });
        }
        let outs = futures::future::join_all(pending).await;
        let outs: Vec<(Op, Out)> = order.iter().copied().zip(outs.into_iter().map(Result::unwrap)).collect();
        (outs, bits(&a1), bits(&a2), bits(&b1))
    })
    .await;
    let a1 = reference(&GROUP_A, |w| overlap_input(ReduceA1, w));
    let a2 = reference(&GROUP_A, |w| overlap_input(ReduceA2, w));
    let b1 = reference(&GROUP_B, |w| overlap_input(ReduceB, w));
    for (rank, (outs, got_a1, got_a2, got_b1)) in outputs.into_iter().enumerate() {
        if GROUP_A.contains(&rank) {
            assert!(got_a1 == a1 && got_a2 == a2, "rank {rank}: group A's all-reduces");
        }
        if GROUP_B.contains(&rank) {
            assert!(got_b1 == b1, "rank {rank}: group B's all-reduce");
        }
        for (op, out) in outs {
            match out {
                Out::Gathered(got) => {
                    assert_eq!(op, GatherA);
                    assert_eq!(got, GROUP_A.map(overlap_payload).to_vec(), "rank {rank}");
                }
                // Group B's rank 1 is world rank 2.
                Out::Cast(got) => assert_eq!(got, Bytes::from_static(b"from world rank 2"), "rank {rank}"),
                Out::Reduced | Out::Passed => {}
            }
        }
    }
}

/// What world rank `from` sends world rank `to` in the all-to-all test: uneven, some empty.
fn a2a_payload(from: usize, to: usize) -> Bytes {
    let len = (from + 2 * to) % 4 * 500;
    Bytes::from((0..len).map(|i| (from * 16 + to + i) as u8).collect::<Vec<u8>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn byte_collectives_and_barrier_on_a_group() {
    const MEMBERS: [usize; 3] = [1, 3, 4];
    let comms = world(5).await;
    let late_entered = Arc::new(AtomicBool::new(false));
    let outputs = on_all(&comms, |c| {
        let late_entered = late_entered.clone();
        async move {
            let r = c.rank();
            // A group of one: everything is local.
            let alone = Group::new(c.clone(), vec![r], 100 + r as u32).unwrap();
            assert_eq!((alone.rank(), alone.world_size()), (0, 1));
            assert_eq!(alone.all_to_all_v(vec![Bytes::from_static(b"me")]).await.unwrap(), vec![&b"me"[..]]);
            assert_eq!(alone.all_gather(Bytes::from_static(b"me")).await.unwrap(), vec![&b"me"[..]]);
            assert_eq!(alone.broadcast(0, Bytes::from_static(b"me")).await.unwrap(), &b"me"[..]);
            alone.barrier().await.unwrap();
            let mut x = [1.5f32, -2.0];
            alone.all_reduce_sum(&mut x).await.unwrap();
            assert_eq!(x, [1.5, -2.0]);

            let g = group_view(&c, 5, &MEMBERS)?;
            let to_all: Vec<Bytes> = MEMBERS.iter().map(|&to| a2a_payload(r, to)).collect();
            let exchanged = g.all_to_all_v(to_all).await.unwrap();
            let gathered = g.all_gather(Bytes::from(vec![r as u8; r * 3])).await.unwrap();
            let mut cast = Vec::new();
            for root in 0..MEMBERS.len() {
                let mine = Bytes::from(format!("from group root {root}, world rank {r}"));
                cast.push(g.broadcast(root, mine).await.unwrap());
            }
            let mut x: Vec<f64> = data(seed(0, 9, r), 1001).into_iter().map(f64::from).collect();
            g.all_reduce_sum_f64(&mut x).await.unwrap();
            // The barrier waits for its last member.
            if r == 4 {
                sleep(Duration::from_millis(200)).await;
                late_entered.store(true, Ordering::SeqCst);
            }
            g.barrier().await.unwrap();
            let left_early = !late_entered.load(Ordering::SeqCst);
            Some((exchanged, gathered, cast, x, left_early))
        }
    })
    .await;
    let inputs: Vec<Vec<f64>> =
        MEMBERS.iter().map(|&w| data(seed(0, 9, w), 1001).into_iter().map(f64::from).collect()).collect();
    let refs: Vec<&[f64]> = inputs.iter().map(Vec::as_slice).collect();
    let reduced: Vec<u64> = ring_reference_sum(&refs).unwrap().iter().map(|v| v.to_bits()).collect();
    for (world_rank, out) in outputs.into_iter().enumerate() {
        let Some((exchanged, gathered, cast, x, left_early)) = out else {
            assert!(!MEMBERS.contains(&world_rank));
            continue;
        };
        let sent_here: Vec<Bytes> = MEMBERS.iter().map(|&from| a2a_payload(from, world_rank)).collect();
        assert_eq!(exchanged, sent_here, "all-to-all-v at world rank {world_rank}");
        let all: Vec<Bytes> = MEMBERS.iter().map(|&m| Bytes::from(vec![m as u8; m * 3])).collect();
        assert_eq!(gathered, all, "all-gather at world rank {world_rank}");
        for (root, got) in cast.iter().enumerate() {
            let expected = format!("from group root {root}, world rank {}", MEMBERS[root]);
            assert_eq!(got, expected.as_bytes(), "broadcast at world rank {world_rank}");
        }
        assert_eq!(x.iter().map(|v| v.to_bits()).collect::<Vec<u64>>(), reduced);
        assert!(!left_early, "world rank {world_rank} left the barrier before the last member entered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn point_to_point_through_a_group_maps_ranks() {
    const MEMBERS: [usize; 3] = [1, 3, 4];
    let comms = world(5).await;
    let groups: Vec<Option<ArcGroup>> = comms.iter().map(|c| group_view(c, 3, &MEMBERS)).collect();
    let g = |world_rank: usize| groups[world_rank].as_ref().unwrap();
    assert_eq!(g(3).members(), MEMBERS);
    assert_eq!((g(3).world_rank(2), g(3).world_rank(3)), (Some(4), None));
    assert_eq!((g(3).group_rank(4), g(3).group_rank(2)), (Some(2), None));

    // Group rank 0 (world 1) to group rank 2 (world 4).
    g(1).send(2, 42, Bytes::from_static(b"to group rank 2")).await.unwrap();
    let got = timeout(LIMIT, g(4).recv(0, 42)).await.unwrap().unwrap();
    assert_eq!(got, &b"to group rank 2"[..]);
    // User tags pass through unchanged: group and world share the messages.
    g(3).send(0, 7, Bytes::from_static(b"group to world")).await.unwrap();
    assert_eq!(timeout(LIMIT, comms[1].recv(3, 7)).await.unwrap().unwrap(), &b"group to world"[..]);
    comms[1].send(4, MAX_USER_TAG, Bytes::from_static(b"world to group")).await.unwrap();
    assert_eq!(timeout(LIMIT, g(4).recv(0, MAX_USER_TAG)).await.unwrap().unwrap(), &b"world to group"[..]);
    // To oneself.
    g(3).send(1, 8, Bytes::from_static(b"self")).await.unwrap();
    assert_eq!(timeout(LIMIT, g(3).recv(1, 8)).await.unwrap().unwrap(), &b"self"[..]);
    // A receive posted before its message.
    let pending = g(4).recv(1, 5);
    let (got, sent) = tokio::join!(timeout(LIMIT, pending), async {
        sleep(Duration::from_millis(50)).await;
        g(3).send(2, 5, Bytes::from_static(b"later")).await
    });
    sent.unwrap();
    assert_eq!(got.unwrap().unwrap(), &b"later"[..]);

    // Peers are group ranks: world rank 3 exists, group rank 3 does not.
    let err = g(1).send(3, 1, Bytes::new()).await.unwrap_err();
    assert!(matches!(err, CommError::InvalidPeer { peer: 3, world_size: 3 }), "{err}");
    let err = g(1).recv(5, 1).await.unwrap_err();
    assert!(matches!(err, CommError::InvalidPeer { peer: 5, world_size: 3 }), "{err}");
    let err = g(1).send(1, MAX_USER_TAG + 1, Bytes::new()).await.unwrap_err();
    assert!(matches!(err, CommError::ReservedTag { .. }), "{err}");
    let err = g(1).recv(1, u64::MAX).await.unwrap_err();
    assert!(matches!(err, CommError::ReservedTag { .. }), "{err}");
    // None of that broke anything.
    assert!(comms.iter().all(|c| !c.is_aborted()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_groups_are_refused() {
    let comms = world(3).await;
    let c = &comms[1];
    let refused = |id: u32, members: Vec<usize>| match Group::new(c.clone(), members, id) {
        Err(CommError::InvalidArgument { op: "Group::new", reason }) => reason,
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    assert!(refused(1, vec![]).contains("no members"));
    assert!(refused(1, vec![2, 1]).contains("ascending"));
    assert!(refused(1, vec![1, 1]).contains("rank 1 is listed twice"));
    assert!(refused(1, vec![1, 3]).contains("member 3 is out of range for world size 3"));
    assert!(refused(1, vec![0, 2]).contains("this rank (1) is not among its members [0, 2]"));
    assert!(refused(0, vec![0, 1]).contains("world communicator"));
    assert!(refused(MAX_GROUP_ID + 1, vec![0, 1]).contains(&format!("1..={MAX_GROUP_ID}")));
    assert!(refused(u32::MAX, vec![0, 1]).contains(&format!("1..={MAX_GROUP_ID}")));

    // One live group per id per communicator; the id is free again once it is dropped.
    let held = Group::new(c.clone(), vec![0, 1], MAX_GROUP_ID).unwrap();
    assert!(refused(MAX_GROUP_ID, vec![1, 2]).contains("already held by a live group on rank 1"));
    assert!(refused(MAX_GROUP_ID, vec![0, 1]).contains("already held"));
    // Another rank's communicator has ids of its own.
    let elsewhere = Group::new(comms[0].clone(), vec![0, 1], MAX_GROUP_ID).unwrap();
    drop(held);
    let again = Group::new(c.clone(), vec![1, 2], MAX_GROUP_ID).unwrap();
    assert_eq!((again.rank(), again.members()), (0, &[1, 2][..]));
    drop((elsewhere, again));
    assert!(comms.iter().all(|c| !c.is_aborted()), "refusing a group is not a failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aborting_member_fails_the_others_naming_its_world_rank() {
    const MEMBERS: [usize; 3] = [1, 3, 4];
    let aborter = 3;
    let comms = world(5).await;
    let groups: Vec<Option<Arc<ArcGroup>>> =
        comms.iter().map(|c| group_view(c, 12, &MEMBERS).map(Arc::new)).collect();
    // The other members enter an all-reduce that world rank 3 never joins.
    let survivors: Vec<_> = [1, 4]
        .into_iter()
        .map(|w| {
            let g = groups[w].clone().unwrap();
            tokio::spawn(async move {
                let mut x = data(seed(0, 12, w), 100_003);
                g.all_reduce_sum(&mut x).await
            })
        })
        .collect();
    sleep(Duration::from_millis(200)).await;
    groups[aborter].as_ref().unwrap().abort("world rank 3 gives up");
    assert!(comms[aborter].is_aborted(), "a group's abort aborts its communicator");
    for (handle, w) in survivors.into_iter().zip([1, 4]) {
        let result = timeout(HANG_GUARD, handle).await.expect("a member hung").unwrap();
        let err = result.expect_err("the collective cannot succeed");
        assert_eq!(err.culprit(), Some(aborter), "world rank {w}: {err}");
        assert!(err.to_string().contains("rank 3"), "world rank {w}: {err}");
        // The failed collective aborted the member's communicator...
        assert!(comms[w].is_aborted(), "world rank {w}");
        // ...so its later group and world operations fail at once.
        let g = groups[w].as_ref().unwrap();
        let later = timeout(HANG_GUARD, g.barrier()).await.expect("group barrier hung");
        assert!(matches!(later, Err(CommError::Aborted { .. })), "world rank {w}: {later:?}");
        assert!(timeout(HANG_GUARD, comms[w].barrier()).await.expect("world barrier hung").is_err());
    }
    // A rank outside the group cannot run world collectives either (a collective needs
    // everyone), and learns who is at fault.
    let err = timeout(HANG_GUARD, comms[0].barrier()).await.expect("non-member hung").unwrap_err();
    assert!(
        [Some(1), Some(3), Some(4)].contains(&err.culprit()),
        "the non-member blames one of the ranks that aborted: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_errors_name_world_ranks() {
    const MEMBERS: [usize; 3] = [1, 3, 4];
    let comms = world(5).await;
    // World rank 4 (group rank 2) reduces a shorter buffer. Every member fails; whoever
    // notices names the left neighbour it received from by world rank (group ranks 0, 1, 2
    // are world ranks 1, 3, 4: a group rank would not match).
    let results = on_all(&comms, |c| async move {
        let g = group_view(&c, 4, &MEMBERS)?;
        let mut x = vec![1.0f32; if c.rank() == 4 { 10 } else { 12 }];
        Some(timeout(HANG_GUARD, g.all_reduce_sum(&mut x)).await.expect("a member hung"))
    })
    .await;
    let left_neighbour = |w: usize| match w {
        1 => 4,
        3 => 1,
        _ => 3,
    };
    let mut noticed = 0;
    for (w, result) in results.into_iter().enumerate() {
        let Some(result) = result else { continue };
        let err = result.expect_err("lengths differ");
        if let CommError::LengthMismatch { peer, .. } | CommError::SizeMismatch { peer, .. } = &err {
            assert_eq!(*peer, left_neighbour(w), "world rank {w}: {err}");
            noticed += 1;
        }
        let culprit = err.culprit().unwrap_or(usize::MAX);
        assert!(MEMBERS.contains(&culprit), "world rank {w} blames a member by world rank: {err}");
        assert!(comms[w].is_aborted(), "world rank {w}");
    }
    assert!(noticed > 0, "some member sees the mismatch itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn groups_rebuilt_every_step_stay_in_step() {
    // As a training step does: build each group for the step over a borrowed
    // communicator, run its collectives, drop it; the next step builds it again, counting
    // from collective 0 again.
    const A: [usize; 3] = [0, 1, 3];
    const B: [usize; 2] = [1, 2];
    const LEN: usize = 5_003;
    const STEPS: u64 = 4;
    let comms = world(4).await;
    let outputs = on_all(&comms, |c| async move {
        let r = c.rank();
        let mut out = Vec::new();
        for step in 0..STEPS {
            let comm: &TcpCommunicator = &c;
            if A.contains(&r) {
                let a = Group::new(comm, A.to_vec(), 1).unwrap();
                let mut x = data(seed(step, 1, r), LEN);
                a.all_reduce_sum(&mut x).await.unwrap();
                let gathered = a.all_gather(Bytes::from(format!("{step}:{r}"))).await.unwrap();
                out.push((bits(&x), gathered));
            }
            if B.contains(&r) {
                // A rank in both groups uses them one after the other; B's other member
                // only ever builds B.
                let b = Group::new(comm, B.to_vec(), 2).unwrap();
                let mut x = data(seed(step, 2, r), LEN);
                b.all_reduce_sum(&mut x).await.unwrap();
                out.push((bits(&x), b.all_gather(Bytes::new()).await.unwrap()));
            }
            // Only the world's collectives bracket the steps.
            c.barrier().await.unwrap();
        }
        out
    })
    .await;
    for step in 0..STEPS {
        let a = reference(&A, |w| data(seed(step, 1, w), LEN));
        let b = reference(&B, |w| data(seed(step, 2, w), LEN));
        let gathered: Vec<Bytes> = A.iter().map(|w| Bytes::from(format!("{step}:{w}"))).collect();
        for (rank, out) in outputs.iter().enumerate() {
            let mut mine = out
                .iter()
                .skip(step as usize * (usize::from(A.contains(&rank)) + usize::from(B.contains(&rank))));
            if A.contains(&rank) {
                let (x, g) = mine.next().unwrap();
                assert!(*x == a && *g == gathered, "step {step}: rank {rank} in group A");
            }
            if B.contains(&rank) {
                let (x, g) = mine.next().unwrap();
                assert!(*x == b && g.len() == 2, "step {step}: rank {rank} in group B");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_abandoned_group_collective_aborts_instead_of_stranding_its_peers() {
    const MEMBERS: [usize; 3] = [0, 1, 2];
    let comms = world(3).await;
    let groups: Vec<Arc<ArcGroup>> =
        comms.iter().map(|c| Arc::new(group_view(c, 8, &MEMBERS).unwrap())).collect();
    // Rank 0 enters an all-reduce; rank 2 calls it (spending its number) and gives up on
    // it before rank 1 has come (so rank 2 cannot have added to any chunk); then rank 1
    // enters.
    let enter = |g: &Arc<ArcGroup>| {
        let g = g.clone();
        tokio::spawn(async move { g.all_reduce_sum(&mut [1.0f32; 30]).await })
    };
    let first = enter(&groups[0]);
    let mut x = [1.0f32; 30];
    let gave_up = timeout(Duration::from_millis(100), groups[2].all_reduce_sum(&mut x)).await;
    assert!(gave_up.is_err(), "rank 1 is missing");
    let waiting = [first, enter(&groups[1])];
    assert!(comms[2].is_aborted(), "dropping an unfinished group collective aborts the communicator");
    for (w, handle) in waiting.into_iter().enumerate() {
        let err = timeout(HANG_GUARD, handle).await.expect("a member hung").unwrap().unwrap_err();
        assert_eq!(err.culprit(), Some(2), "world rank {w}: {err}");
        assert!(err.to_string().contains("dropped before it completed"), "world rank {w}: {err}");
    }
    // A group collective that was never polled counts as abandoned too (its peers would
    // wait for it), but completed and failed ones do not abort anything.
    let comms = world(2).await;
    let g: Vec<ArcGroup> = comms.iter().map(|c| group_view(c, 9, &[0, 1]).unwrap()).collect();
    let (a, b) = tokio::join!(g[0].barrier(), g[1].barrier());
    a.unwrap();
    b.unwrap();
    assert!(comms.iter().all(|c| !c.is_aborted()));
    drop(g[0].barrier());
    assert!(comms[0].is_aborted());
}
