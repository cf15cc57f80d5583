//! The `StateStore` conformance suite: the trait's contract, written once, generic over the
//! store, and rerun by every implementation (tests/store.rs on the file store,
//! tests/etcd_store.rs on a real etcd).
//!
//! Cases never assume the store's revisions are gap-free or start anywhere (etcd's are
//! cluster-wide): they compare against the revisions the store returned for their own
//! writes. Each case gets a fresh, empty store from `open` (a new directory, or a new etcd
//! prefix), and cases run one after another, so within a case no one else writes. Lease
//! cases use real time (TTLs of 2 s) and only ever wait, with a generous timeout, for the
//! event they expect; they never assert an upper bound on how long something took.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use flotilla_coordinator::store::{
    Compare, CompareOp, EventKind, LeaseId, Op, OpResponse, Revision, StateStore, StoreError, Txn, WatchEvent,
};
use futures::StreamExt;

/// How long a case waits for a watch event before it fails.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// What differs between backends: the size limit of one transaction, and the TTL of the
/// lease cases (etcd counts whole seconds, at least 2 with its default election timeout).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_txn_bytes: usize,
    pub ttl: Duration,
}

pub async fn next_event<W>(watch: &mut W) -> WatchEvent
where
    W: futures::Stream<Item = Result<WatchEvent, StoreError>> + Unpin,
{
    tokio::time::timeout(EVENT_TIMEOUT, watch.next())
        .await
        .expect("a watch event within the timeout")
        .expect("the watch stream is open")
        .expect("a watch event, not an error")
}

pub async fn events<W>(watch: &mut W, n: usize) -> Vec<WatchEvent>
where
    W: futures::Stream<Item = Result<WatchEvent, StoreError>> + Unpin,
{
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next_event(watch).await);
    }
    out
}

pub fn revisions(events: &[WatchEvent]) -> Vec<Revision> {
    events.iter().map(|e| e.revision).collect()
}

/// Runs every case, each on a fresh store from `open(case name)`.
pub async fn run_all<S, F, Fut>(limits: Limits, open: F)
where
    S: StateStore + Clone + 'static,
    F: Fn(&'static str) -> Fut,
    Fut: Future<Output = S>,
{
    macro_rules! case {
        ($name:ident $(, $arg:expr)*) => {{
            eprintln!("conformance case {}", stringify!($name));
            $name(open(stringify!($name)).await $(, $arg)*).await;
        }};
    }
    case!(revisions_increase_and_keys_carry_their_history);
    case!(txn_compare_and_swap);
    case!(invalid_transactions_are_refused_without_a_revision);
    case!(size_limits_name_the_key, limits.max_txn_bytes);
    case!(watch_replays_the_missing_events_then_follows_live);
    case!(a_transaction_is_one_revision_for_watchers);
    case!(a_watch_resumed_after_a_disconnect_has_no_gap_and_no_duplicate);
    case!(watches_registered_amid_writes_see_every_revision_once);
    case!(compaction_errors);
    case!(leases_expire_and_their_keys_vanish_in_one_revision, limits.ttl);
    case!(keep_alive_keeps_a_lease, limits.ttl);
    case!(revoke_deletes_the_lease_keys);
    case!(concurrent_writers_get_distinct_revisions);
    case!(exactly_one_campaigner_wins);
}

pub async fn revisions_increase_and_keys_carry_their_history<S: StateStore>(store: S) {
    let start = store.current_revision().await.unwrap();
    let r1 = store.put("jobs/b", b"1".to_vec(), None).await.unwrap();
    let r2 = store.put("jobs/a", b"2".to_vec(), None).await.unwrap();
    let r3 = store.put("workers/w0", b"up".to_vec(), None).await.unwrap();
    let r4 = store.put("jobs/b", b"3".to_vec(), None).await.unwrap();
    assert!(start < r1 && r1 < r2 && r2 < r3 && r3 < r4, "{start} {r1} {r2} {r3} {r4}");
    assert_eq!(store.current_revision().await.unwrap(), r4);

    let b = store.get("jobs/b").await.unwrap().unwrap();
    assert_eq!((b.key.as_str(), b.value.as_slice()), ("jobs/b", b"3".as_slice()));
    assert_eq!((b.create_revision, b.mod_revision, b.version, b.lease), (r1, r4, 2, None));
    assert_eq!(store.get("jobs/c").await.unwrap(), None);

    let jobs = store.range("jobs/").await.unwrap();
    assert_eq!(jobs.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(), ["jobs/a", "jobs/b"]);
    assert_eq!(store.range("").await.unwrap().len(), 3);
    assert!(store.range("nothing/").await.unwrap().is_empty());

    let r5 = store.delete("jobs/a").await.unwrap().unwrap();
    assert!(r5 > r4);
    assert_eq!(store.delete("jobs/a").await.unwrap(), None, "deleting an absent key writes nothing");
    assert_eq!(store.current_revision().await.unwrap(), r5);

    // A re-created key starts a new life: new create revision, version 1.
    let r6 = store.put("jobs/a", b"again".to_vec(), None).await.unwrap();
    let a = store.get("jobs/a").await.unwrap().unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (r6, r6, 1));
}

pub async fn txn_compare_and_swap<S: StateStore>(store: S) {
    let create = || {
        Txn::new()
            .when([Compare::absent("leader")])
            .and_then([Op::put("leader", b"c0".to_vec(), None)])
            .or_else([Op::get("leader")])
    };
    let first = store.txn(create()).await.unwrap();
    assert!(first.succeeded);
    assert_eq!(first.responses, [OpResponse::Put { prev: None }]);
    let second = store.txn(create()).await.unwrap();
    assert!(!second.succeeded);
    assert_eq!(second.revision, first.revision, "a failed compare writes nothing");
    match &second.responses[..] {
        [OpResponse::Get(Some(kv))] => {
            assert_eq!((kv.value.as_slice(), kv.mod_revision), (b"c0".as_slice(), first.revision))
        }
        other => panic!("unexpected responses {other:?}"),
    }

    // Swap on the mod revision one has read; a stale one fails.
    let rev = store.put("spec", b"v1".to_vec(), None).await.unwrap();
    let swap = |expected: Revision, value: &str| {
        Txn::new().when([Compare::mod_revision("spec", CompareOp::Equal, expected)]).and_then([Op::put(
            "spec",
            value.as_bytes().to_vec(),
            None,
        )])
    };
    let swapped = store.txn(swap(rev, "v2")).await.unwrap();
    assert!(swapped.succeeded);
    assert!(swapped.revision > rev);
    match &swapped.responses[..] {
        [OpResponse::Put { prev: Some(prev) }] => {
            assert_eq!((prev.value.as_slice(), prev.mod_revision), (b"v1".as_slice(), rev))
        }
        other => panic!("unexpected responses {other:?}"),
    }
    let stale = store.txn(swap(rev, "v3")).await.unwrap();
    assert!(!stale.succeeded);
    assert_eq!(store.get("spec").await.unwrap().unwrap().value, b"v2");
    assert_eq!(store.current_revision().await.unwrap(), swapped.revision);

    // Value and version compares; a value compare on an absent key is false (etcd's rule).
    let t = Txn::new().when([
        Compare::value("spec", CompareOp::Equal, b"v2".to_vec()),
        Compare::version("spec", CompareOp::Equal, 2),
    ]);
    assert!(store.txn(t).await.unwrap().succeeded);
    let t = Txn::new().when([Compare::value("missing", CompareOp::NotEqual, b"x".to_vec())]);
    assert!(!store.txn(t).await.unwrap().succeeded);
    let t = Txn::new().when([
        Compare::create_revision("spec", CompareOp::Less, rev + 1),
        Compare::create_revision("spec", CompareOp::Greater, rev - 1),
        Compare::exists("leader"),
        Compare::mod_revision("missing", CompareOp::Equal, 0),
    ]);
    assert!(store.txn(t).await.unwrap().succeeded);

    // All writes of a transaction share one revision; later ops see earlier ones.
    let t = Txn::new().and_then([
        Op::put("m/1", b"a".to_vec(), None),
        Op::put("m/2", b"b".to_vec(), None),
        Op::delete("spec"),
        Op::range("m/"),
    ]);
    let r = store.txn(t).await.unwrap();
    assert!(r.revision > swapped.revision);
    match &r.responses[..] {
        [_, _, OpResponse::Delete { deleted: 1 }, OpResponse::Range(kvs)] => {
            assert_eq!(kvs.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(), ["m/1", "m/2"]);
            assert!(kvs.iter().all(|kv| kv.mod_revision == r.revision));
        }
        other => panic!("unexpected responses {other:?}"),
    }
    let d = store.txn(Txn::new().and_then([Op::delete_prefix("m/")])).await.unwrap();
    assert_eq!(d.responses, [OpResponse::Delete { deleted: 2 }]);
    assert!(d.revision > r.revision);
    assert!(store.range("m/").await.unwrap().is_empty());
}

pub async fn invalid_transactions_are_refused_without_a_revision<S: StateStore>(store: S) {
    let rev = store.put("a", b"1".to_vec(), None).await.unwrap();

    let twice = Txn::new().and_then([Op::put("k", b"1".to_vec(), None), Op::put("k", b"2".to_vec(), None)]);
    assert!(matches!(store.txn(twice).await, Err(StoreError::DuplicateKey { key }) if key == "k"));
    let under_delete = Txn::new().or_else([Op::delete_prefix("d/"), Op::put("d/x", b"1".to_vec(), None)]);
    assert!(matches!(store.txn(under_delete).await, Err(StoreError::DuplicateKey { key }) if key == "d/x"));
    // A lease id no store has granted (etcd's are random 63-bit numbers).
    let unknown = LeaseId(0x0bad_cafe_0bad_cafe);
    let unknown_lease =
        Txn::new().and_then([Op::put("b", b"1".to_vec(), None), Op::put("c", b"1".to_vec(), Some(unknown))]);
    match store.txn(unknown_lease).await {
        Err(StoreError::LeaseNotFound { lease }) => assert_eq!(lease, unknown),
        other => panic!("expected LeaseNotFound, got {other:?}"),
    }
    assert!(matches!(store.put("", b"1".to_vec(), None).await, Err(StoreError::EmptyKey { .. })));
    let t = Txn::new().when([Compare::exists("")]);
    assert!(matches!(store.txn(t).await, Err(StoreError::EmptyKey { context: "compare" })));
    assert!(matches!(store.grant_lease(Duration::ZERO).await, Err(StoreError::InvalidTtl { .. })));
    assert!(
        matches!(store.keep_alive(unknown).await, Err(StoreError::LeaseNotFound { lease }) if lease == unknown)
    );
    assert!(
        matches!(store.revoke(unknown).await, Err(StoreError::LeaseNotFound { lease }) if lease == unknown)
    );

    assert_eq!(store.current_revision().await.unwrap(), rev);
    assert_eq!(store.get("b").await.unwrap(), None, "a refused transaction changes nothing");
}

pub async fn size_limits_name_the_key<S: StateStore>(store: S, limit: usize) {
    let rev = store.put("small", b"1".to_vec(), None).await.unwrap();
    match store.put("big", vec![7; limit + 1], None).await {
        Err(e @ StoreError::TooLarge { .. }) => {
            let StoreError::TooLarge { key, bytes, limit: reported } = &e else { unreachable!() };
            assert_eq!((key.as_str(), *reported), ("big", limit));
            assert!(*bytes > limit);
            assert!(e.to_string().contains("\"big\""), "{e}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // The limit counts the whole branch: many small values add up, and the error names the
    // largest.
    let many = Txn::new().and_then(
        (0..4).map(|i| Op::put(format!("part/{i}"), vec![1; limit / 4 + i * 16], None)).collect::<Vec<_>>(),
    );
    assert!(matches!(store.txn(many).await, Err(StoreError::TooLarge { key, .. }) if key == "part/3"));
    assert_eq!(store.current_revision().await.unwrap(), rev, "refused, nothing written");

    // A value just under the limit goes through whole.
    let fits = vec![9; limit - 4096];
    store.put("fits", fits.clone(), None).await.unwrap();
    assert_eq!(store.get("fits").await.unwrap().unwrap().value, fits);
}

pub async fn watch_replays_the_missing_events_then_follows_live<S: StateStore + Clone + 'static>(store: S) {
    let mut written = Vec::new();
    for i in 1..=5u8 {
        written.push(store.put(&format!("k/{i}"), vec![i], None).await.unwrap());
    }
    let mut watch = store.watch("k/", written[2]).await.unwrap();

    // Writers keep going while the watcher catches up.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 6..=30u8 {
                revs.push(store.put(&format!("k/{i}"), vec![i], None).await.unwrap());
            }
            revs
        })
    };
    let seen = events(&mut watch, 28).await;
    written.extend(writer.await.unwrap());
    assert_eq!(revisions(&seen), written[2..], "every write from the start revision, once, in order");
    for (e, i) in seen.iter().zip(3u8..) {
        assert_eq!(
            (e.kind, e.kv.key.clone(), e.kv.value.clone()),
            (EventKind::Put, format!("k/{i}"), vec![i])
        );
        assert_eq!((e.kv.mod_revision, e.kv.version), (e.revision, 1));
    }

    // Deletes are tombstones; other prefixes are filtered out.
    store.put("other", b"x".to_vec(), None).await.unwrap();
    let deleted = store.delete("k/1").await.unwrap().unwrap();
    let e = next_event(&mut watch).await;
    assert_eq!((e.revision, e.kind, e.kv.key.as_str()), (deleted, EventKind::Delete, "k/1"));
    assert_eq!((e.kv.value.len(), e.kv.version, e.kv.create_revision, e.kv.mod_revision), (0, 0, 0, deleted));

    // A future start revision waits for it.
    let now = store.current_revision().await.unwrap();
    let skipped = store.put("skipped", b"x".to_vec(), None).await.unwrap();
    let mut future = store.watch("", skipped + 1).await.unwrap();
    let seen_rev = store.put("seen", b"x".to_vec(), None).await.unwrap();
    assert!(now < skipped && skipped < seen_rev);
    let e = next_event(&mut future).await;
    assert_eq!((e.revision, e.kv.key.as_str()), (seen_rev, "seen"));
}

pub async fn a_transaction_is_one_revision_for_watchers<S: StateStore>(store: S) {
    let from = store.current_revision().await.unwrap() + 1;
    let mut watch = store.watch("", from).await.unwrap();
    let t = Txn::new().and_then([Op::put("a", b"1".to_vec(), None), Op::put("b", b"2".to_vec(), None)]);
    let r = store.txn(t).await.unwrap();
    let seen = events(&mut watch, 2).await;
    assert_eq!(revisions(&seen), [r.revision, r.revision]);
    assert_eq!(seen.iter().map(|e| e.kv.key.as_str()).collect::<Vec<_>>(), ["a", "b"]);
}

pub async fn a_watch_resumed_after_a_disconnect_has_no_gap_and_no_duplicate<
    S: StateStore + Clone + 'static,
>(
    store: S,
) {
    let from = store.current_revision().await.unwrap() + 1;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..60u32 {
                let t = Txn::new().and_then([
                    Op::put(format!("r/{}", i % 7), i.to_le_bytes().to_vec(), None),
                    Op::put(format!("r/x{}", i % 3), i.to_le_bytes().to_vec(), None),
                ]);
                revs.push(store.txn(t).await.unwrap().revision);
                if i % 10 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            revs
        })
    };
    // Disconnect three times mid-stream, resuming each time from the last revision seen + 1.
    let mut seen: Vec<WatchEvent> = Vec::new();
    let mut next = from;
    for round in 0..4 {
        let mut watch = store.watch("r/", next).await.unwrap();
        let take = if round < 3 { 31 } else { 120 - seen.len() };
        let mut batch = events(&mut watch, take).await;
        // A disconnect may cut between a transaction's two events: drop the partial
        // revision and take it again, whole, after resuming.
        if round < 3 {
            let last = batch.last().unwrap().revision;
            let whole = batch.iter().filter(|e| e.revision == last).count() == 2;
            if !whole {
                batch.retain(|e| e.revision != last);
            }
        }
        next = batch.last().unwrap().revision + 1;
        seen.extend(batch);
        drop(watch);
    }
    let written = writer.await.unwrap();
    let mut expected: Vec<Revision> = written.iter().flat_map(|&r| [r, r]).collect();
    expected.sort();
    assert_eq!(revisions(&seen), expected, "every revision of every write, twice (two keys each), once");
}

pub async fn watches_registered_amid_writes_see_every_revision_once<S: StateStore + Clone + 'static>(
    store: S,
) {
    let from = store.current_revision().await.unwrap() + 1;
    const N: usize = 80;
    let mut writers = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..N / 4 {
                revs.push(store.put(&format!("w{w}/{i}"), vec![1], None).await.unwrap());
            }
            revs
        }));
    }
    let mut watchers = Vec::new();
    for _ in 0..4 {
        let store = store.clone();
        watchers.push(tokio::spawn(async move {
            tokio::task::yield_now().await;
            let mut watch = store.watch("", from).await.unwrap();
            revisions(&events(&mut watch, N).await)
        }));
        tokio::task::yield_now().await;
    }
    let mut written = Vec::new();
    for w in writers {
        written.extend(w.await.unwrap());
    }
    written.sort();
    for w in watchers {
        assert_eq!(w.await.unwrap(), written);
    }
}

pub async fn compaction_errors<S: StateStore>(store: S) {
    let mut revs = Vec::new();
    for i in 1..=6u8 {
        revs.push(store.put("k", vec![i], None).await.unwrap());
    }
    store.compact(revs[3]).await.unwrap();

    match store.watch("k", revs[2]).await {
        Err(StoreError::Compacted { requested, compacted }) => {
            assert_eq!((requested, compacted), (revs[2], revs[3]))
        }
        Err(e) => panic!("expected Compacted, got {e:?}"),
        Ok(_) => panic!("expected Compacted, got a watch"),
    }
    // The compaction point itself is kept.
    let mut watch = store.watch("k", revs[3]).await.unwrap();
    assert_eq!(revisions(&events(&mut watch, 3).await), revs[3..]);

    match store.compact(revs[3]).await {
        Err(StoreError::Compacted { requested, compacted }) => {
            assert_eq!((requested, compacted), (revs[3], revs[3]))
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    match store.compact(revs[5] + 1).await {
        Err(StoreError::FutureRevision { requested, current }) => {
            assert_eq!((requested, current), (revs[5] + 1, revs[5]))
        }
        other => panic!("expected FutureRevision, got {other:?}"),
    }
    // Reads are unaffected by compaction.
    let kv = store.get("k").await.unwrap().unwrap();
    assert_eq!((kv.value, kv.version, kv.mod_revision), (vec![6], 6, revs[5]));
}

pub async fn leases_expire_and_their_keys_vanish_in_one_revision<S: StateStore>(store: S, ttl: Duration) {
    let lease = store.grant_lease(ttl).await.unwrap();
    let t = Txn::new().and_then([
        Op::put("workers/w0", b"up".to_vec(), Some(lease)),
        Op::put("workers/w1", b"up".to_vec(), Some(lease)),
        Op::put("workers/w2", b"up".to_vec(), Some(lease)),
    ]);
    store.txn(t).await.unwrap();
    assert_eq!(store.get("workers/w0").await.unwrap().unwrap().lease, Some(lease));
    // Re-putting without the lease detaches the key from it.
    let detached = store.put("workers/w2", b"kept".to_vec(), None).await.unwrap();
    assert_eq!(store.get("workers/w2").await.unwrap().unwrap().lease, None);

    let mut watch = store.watch("workers/", detached + 1).await.unwrap();
    let expired = events(&mut watch, 2).await;
    assert!(expired.iter().all(|e| e.kind == EventKind::Delete));
    assert_eq!(expired.iter().map(|e| e.kv.key.as_str()).collect::<Vec<_>>(), ["workers/w0", "workers/w1"]);
    assert_eq!(expired[0].revision, expired[1].revision, "one revision for the lease's keys");
    assert!(expired[0].revision > detached);

    assert_eq!(store.get("workers/w0").await.unwrap(), None);
    assert_eq!(store.get("workers/w2").await.unwrap().unwrap().value, b"kept");
    assert!(
        matches!(store.keep_alive(lease).await, Err(StoreError::LeaseNotFound { lease: l }) if l == lease)
    );
    assert!(matches!(
        store.put("workers/w3", b"x".to_vec(), Some(lease)).await,
        Err(StoreError::LeaseNotFound { lease: l }) if l == lease
    ));
}

pub async fn keep_alive_keeps_a_lease<S: StateStore>(store: S, ttl: Duration) {
    let lease = store.grant_lease(ttl).await.unwrap();
    let rev = store.put("w", b"up".to_vec(), Some(lease)).await.unwrap();
    let mut watch = store.watch("w", rev + 1).await.unwrap();
    // Keep it alive for two TTLs, renewing every quarter TTL.
    let start = tokio::time::Instant::now();
    while start.elapsed() < ttl * 2 {
        tokio::time::sleep(ttl / 4).await;
        assert_eq!(store.keep_alive(lease).await.unwrap(), ttl);
    }
    assert!(store.get("w").await.unwrap().is_some(), "two TTLs after the grant, kept alive");
    // Left alone, it expires.
    let e = next_event(&mut watch).await;
    assert_eq!((e.kind, e.kv.key.as_str()), (EventKind::Delete, "w"));
    assert_eq!(store.get("w").await.unwrap(), None);
}

pub async fn revoke_deletes_the_lease_keys<S: StateStore>(store: S) {
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    let empty = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    assert_ne!(lease, empty);
    let t = Txn::new()
        .and_then([Op::put("a", b"1".to_vec(), Some(lease)), Op::put("b", b"1".to_vec(), Some(lease))]);
    let written = store.txn(t).await.unwrap().revision;
    let mut watch = store.watch("", written + 1).await.unwrap();

    let revoked = store.revoke(lease).await.unwrap().unwrap();
    assert!(revoked > written);
    let seen = events(&mut watch, 2).await;
    assert_eq!(revisions(&seen), [revoked, revoked]);
    assert!(seen.iter().all(|e| e.kind == EventKind::Delete));
    assert!(store.range("").await.unwrap().is_empty());
    assert!(matches!(store.revoke(lease).await, Err(StoreError::LeaseNotFound { .. })));
    // A lease with no keys ends without a revision.
    assert_eq!(store.revoke(empty).await.unwrap(), None);
    assert_eq!(store.current_revision().await.unwrap(), revoked);
}

pub async fn concurrent_writers_get_distinct_revisions<S: StateStore + Clone + 'static>(store: S) {
    let mut tasks = Vec::new();
    for i in 0..32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move { store.put(&format!("w/{i}"), vec![1], None).await.unwrap() }));
    }
    let mut revs = Vec::new();
    for t in tasks {
        revs.push(t.await.unwrap());
    }
    revs.sort();
    revs.dedup();
    assert_eq!(revs.len(), 32, "every write got its own revision");
    let kvs = store.range("w/").await.unwrap();
    assert_eq!(kvs.len(), 32);
    let mut mods: Vec<Revision> = kvs.iter().map(|kv| kv.mod_revision).collect();
    mods.sort();
    assert_eq!(mods, revs);
}

/// A generic caller: the trait is enough to write a leader election.
async fn campaign<S: StateStore>(store: &S, me: &str, ttl: Duration) -> Result<bool, StoreError> {
    let lease = store.grant_lease(ttl).await?;
    let t = Txn::new().when([Compare::absent("leader")]).and_then([Op::put(
        "leader",
        me.as_bytes().to_vec(),
        Some(lease),
    )]);
    let won = store.txn(t).await?.succeeded;
    if !won {
        store.revoke(lease).await?;
    }
    Ok(won)
}

pub async fn exactly_one_campaigner_wins<S: StateStore + Clone + 'static>(store: S) {
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(
            async move { campaign(&store, &format!("c{i}"), Duration::from_secs(60)).await },
        ));
    }
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap().unwrap());
    }
    assert_eq!(winners, 1, "exactly one candidate wins");
    let leader = store.get("leader").await.unwrap().unwrap();
    assert!(leader.lease.is_some());
}
