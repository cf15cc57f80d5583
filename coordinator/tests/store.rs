//! The file store: the conformance suite (store_conformance/, the trait's contract), and
//! what only the file store promises: gap-free revisions from 1, crash safety (reopen,
//! torn tails, corruption, interrupted compaction), exact TTLs under paused time.

mod store_conformance;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_coordinator::store::{
    Compare, CompareOp, EventKind, FileStore, FileStoreOptions, KeyValue, Op, OpResponse, Revision,
    StateStore, StoreError, Txn, WatchEvent,
};
use futures::StreamExt;
use proptest::prelude::*;

fn wal(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("wal-{generation}"))
}

fn len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

async fn next_event<S: StateStore>(watch: &mut S::Watch) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("a watch event within 10 s")
        .expect("the watch stream is open")
        .expect("a watch event, not an error")
}

async fn events<S: StateStore>(watch: &mut S::Watch, n: usize) -> Vec<WatchEvent> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(next_event::<S>(watch).await);
    }
    out
}

fn revisions(events: &[WatchEvent]) -> Vec<Revision> {
    events.iter().map(|e| e.revision).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_store_passes_the_conformance_suite() {
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().to_path_buf();
    let limits = store_conformance::Limits {
        max_txn_bytes: flotilla_coordinator::store::MAX_TXN_BYTES,
        ttl: Duration::from_secs(1),
    };
    store_conformance::run_all(limits, |case| {
        let dir = root.join(case);
        async move { FileStore::open(dir).await.unwrap() }
    })
    .await;
}

#[tokio::test]
async fn reopen_keeps_every_committed_key_and_the_revision() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let store = FileStore::open(dir.path()).await.unwrap();
        for i in 0..20u8 {
            store.put(&format!("k/{:02}", i % 7), vec![i], None).await.unwrap();
        }
        store.delete("k/03").await.unwrap();
        let t = Txn::new().when([Compare::absent("x")]).and_then([Op::put("x", b"y".to_vec(), None)]);
        store.txn(t).await.unwrap();
        let before = store.range("").await.unwrap();
        // Dropping the only handle ends the store's task.
        drop(store);
        before
    };
    let store = FileStore::open(dir.path()).await.unwrap();
    assert_eq!(store.range("").await.unwrap(), before);
    assert_eq!(store.current_revision().await.unwrap(), 22);
    assert_eq!(store.put("after", b"1".to_vec(), None).await.unwrap(), 23);
    // The history since the compaction point survives too.
    let mut watch = store.watch("", 1).await.unwrap();
    assert_eq!(revisions(&events::<FileStore>(&mut watch, 23).await), (1..=23).collect::<Vec<_>>());
    store.close().await.unwrap();
}

#[tokio::test]
async fn concurrent_writers_get_distinct_durable_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move { store.put(&format!("w/{i}"), vec![1], None).await.unwrap() }));
    }
    let mut revs = Vec::new();
    for t in tasks {
        revs.push(t.await.unwrap());
    }
    revs.sort();
    assert_eq!(revs, (1..=64).collect::<Vec<_>>());
    store.close().await.unwrap();
    let store = FileStore::open(dir.path()).await.unwrap();
    assert_eq!(store.range("w/").await.unwrap().len(), 64);
    store.close().await.unwrap();
}

#[tokio::test]
async fn compaction_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (before, lease) = {
        let store = FileStore::open(dir.path()).await.unwrap();
        let lease = store.grant_lease(Duration::from_secs(600)).await.unwrap();
        for i in 1..=10u8 {
            store.put(&format!("k/{}", i % 3), vec![i], None).await.unwrap();
        }
        store.put("leased", b"x".to_vec(), Some(lease)).await.unwrap();
        store.delete("k/0").await.unwrap();
        store.compact(8).await.unwrap();
        store.put("k/after", b"x".to_vec(), None).await.unwrap();
        let before = store.range("").await.unwrap();
        store.close().await.unwrap();
        (before, lease)
    };
    let mut names: Vec<String> =
        fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["snap-1", "wal-1"], "the old generation is gone");

    let store = FileStore::open(dir.path()).await.unwrap();
    assert_eq!(store.range("").await.unwrap(), before);
    assert_eq!(store.current_revision().await.unwrap(), 13);
    assert_eq!(store.compacted_revision().await.unwrap(), 8);
    assert!(matches!(store.watch("", 7).await, Err(StoreError::Compacted { requested: 7, compacted: 8 })));
    let mut watch = store.watch("", 8).await.unwrap();
    assert_eq!(revisions(&events::<FileStore>(&mut watch, 6).await), [8, 9, 10, 11, 12, 13]);
    // The lease survived in the snapshot and still owns its key.
    assert_eq!(store.revoke(lease).await.unwrap(), Some(14));
    assert_eq!(store.get("leased").await.unwrap(), None);
    // A second compaction moves on to generation 2.
    store.compact(14).await.unwrap();
    store.close().await.unwrap();
    let store = FileStore::open(dir.path()).await.unwrap();
    assert_eq!(store.current_revision().await.unwrap(), 14);
    assert_eq!(store.range("").await.unwrap().len(), before.len() - 1);
    store.close().await.unwrap();
}

#[tokio::test]
async fn an_interrupted_compaction_leaves_a_consistent_store() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStore::open(dir.path()).await.unwrap();
        for i in 1..=5u8 {
            store.put("k", vec![i], None).await.unwrap();
        }
        store.close().await.unwrap();
    }
    // A crash after the next generation's log was installed but before its snapshot, and
    // another in the middle of writing that snapshot.
    fs::write(wal(dir.path(), 1), b"FLOTWAL1\x01\0\0\0\0\0\0\0").unwrap();
    fs::write(dir.path().join("snap-1.tmp"), b"FLOTSNP1 partial").unwrap();
    let store = FileStore::open(dir.path()).await.unwrap();
    assert_eq!(store.current_revision().await.unwrap(), 5);
    assert_eq!(store.get("k").await.unwrap().unwrap().value, [5]);
    store.close().await.unwrap();
    assert!(!wal(dir.path(), 1).exists());
    assert!(!dir.path().join("snap-1.tmp").exists());

    // A log two generations ahead of every snapshot is outside damage: refused.
    fs::write(wal(dir.path(), 2), b"").unwrap();
    match FileStore::open(dir.path()).await {
        Err(StoreError::BadLayout { path, .. }) => assert_eq!(path, wal(dir.path(), 2)),
        other => panic!("expected BadLayout, got {other:?}"),
    }
}

#[tokio::test]
async fn a_torn_tail_is_truncated_and_earlier_records_survive() {
    let dir = tempfile::tempdir().unwrap();
    let log = wal(dir.path(), 0);
    let (intact_len, full_len) = {
        let store = FileStore::open(dir.path()).await.unwrap();
        for i in 1..=5u8 {
            store.put(&format!("k/{i}"), vec![i; 40], None).await.unwrap();
        }
        let intact_len = len(&log);
        store.put("k/6", vec![6; 40], None).await.unwrap();
        store.close().await.unwrap();
        (intact_len, len(&log))
    };

    // Garbage after the last record (a write that reached the disk half-formed).
    OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(&[0xde, 0xad, 0xbe, 0xef, 7, 0, 0])
        .unwrap();
    {
        let store = FileStore::open(dir.path()).await.unwrap();
        assert_eq!(store.current_revision().await.unwrap(), 6);
        assert_eq!(store.range("k/").await.unwrap().len(), 6);
        store.close().await.unwrap();
        assert_eq!(len(&log), full_len, "the garbage was truncated");
    }

    // The last record cut short (a crash mid-write): it is dropped, the earlier ones stay.
    OpenOptions::new().write(true).open(&log).unwrap().set_len(full_len - 5).unwrap();
    let store = FileStore::open(dir.path()).await.unwrap();
    assert_eq!(store.current_revision().await.unwrap(), 5);
    let keys: Vec<KeyValue> = store.range("k/").await.unwrap();
    assert_eq!(keys.len(), 5);
    assert!(keys.iter().all(|kv| kv.value.len() == 40));
    assert_eq!(len(&log), intact_len);
    // The store carries on from the last intact revision.
    assert_eq!(store.put("k/6", b"again".to_vec(), None).await.unwrap(), 6);
    store.close().await.unwrap();

    // A zero-filled tail (the file grew but the data never landed) is torn too.
    OpenOptions::new().append(true).open(&log).unwrap().write_all(&[0; 4096]).unwrap();
    let store = FileStore::open(dir.path()).await.unwrap();
    assert_eq!(store.current_revision().await.unwrap(), 6);
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_corrupted_middle_record_is_an_error_naming_the_offset() {
    let dir = tempfile::tempdir().unwrap();
    let log = wal(dir.path(), 0);
    let second_record = {
        let store = FileStore::open(dir.path()).await.unwrap();
        store.put("a", vec![1; 32], None).await.unwrap();
        let second_record = len(&log);
        store.put("b", vec![2; 32], None).await.unwrap();
        store.put("c", vec![3; 32], None).await.unwrap();
        store.close().await.unwrap();
        second_record
    };
    let mut bytes = fs::read(&log).unwrap();
    bytes[second_record as usize + 20] ^= 0x40;
    fs::write(&log, &bytes).unwrap();

    match FileStore::open(dir.path()).await {
        Err(e @ StoreError::Corrupt { .. }) => {
            let StoreError::Corrupt { path, offset, .. } = &e else { unreachable!() };
            assert_eq!(path, &log);
            assert_eq!(*offset, second_record);
            let message = e.to_string();
            assert!(message.contains("wal-0") && message.contains(&second_record.to_string()), "{message}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(fs::read(&log).unwrap(), bytes, "a refused log is left untouched");

    // A damaged snapshot is an error too.
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStore::open(dir.path()).await.unwrap();
        store.put("a", b"1".to_vec(), None).await.unwrap();
        store.put("b", b"1".to_vec(), None).await.unwrap();
        store.compact(2).await.unwrap();
        store.close().await.unwrap();
    }
    let snap = dir.path().join("snap-1");
    let mut bytes = fs::read(&snap).unwrap();
    bytes[10] ^= 1;
    fs::write(&snap, &bytes).unwrap();
    assert!(
        matches!(FileStore::open(dir.path()).await, Err(StoreError::Corrupt { path, .. }) if path == snap)
    );
}

#[tokio::test(start_paused = true)]
async fn lease_expiry_deletes_its_keys_in_one_revision_seen_by_watchers() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).await.unwrap();
    let lease = store.grant_lease(Duration::from_secs(10)).await.unwrap();
    store.put("workers/w0", b"up".to_vec(), Some(lease)).await.unwrap();
    store.put("workers/w1", b"up".to_vec(), Some(lease)).await.unwrap();
    store.put("jobs/j", b"x".to_vec(), None).await.unwrap();
    // Re-putting without the lease detaches the key from it.
    store.put("workers/w1", b"kept".to_vec(), None).await.unwrap();
    assert_eq!(store.get("workers/w0").await.unwrap().unwrap().lease, Some(lease));

    let mut watch = store.watch("workers/", 5).await.unwrap();
    tokio::time::advance(Duration::from_secs(9)).await;
    assert!(store.get("workers/w0").await.unwrap().is_some());
    tokio::time::advance(Duration::from_secs(2)).await;
    let e = next_event::<FileStore>(&mut watch).await;
    assert_eq!((e.revision, e.kind, e.kv.key.as_str()), (5, EventKind::Delete, "workers/w0"));
    assert_eq!(store.get("workers/w0").await.unwrap(), None);
    assert_eq!(store.get("workers/w1").await.unwrap().unwrap().value, b"kept");
    assert_eq!(store.current_revision().await.unwrap(), 5);
    assert!(matches!(store.keep_alive(lease).await, Err(StoreError::LeaseNotFound { .. })));
    assert!(matches!(
        store.put("workers/w2", b"x".to_vec(), Some(lease)).await,
        Err(StoreError::LeaseNotFound { .. })
    ));
    store.close().await.unwrap();

    // The expiry was logged: it holds after a restart.
    let store = FileStore::open(dir.path()).await.unwrap();
    assert_eq!(store.get("workers/w0").await.unwrap(), None);
    assert_eq!(store.current_revision().await.unwrap(), 5);
    store.close().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn keep_alive_extends_a_lease() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).await.unwrap();
    let lease = store.grant_lease(Duration::from_secs(10)).await.unwrap();
    store.put("w", b"up".to_vec(), Some(lease)).await.unwrap();
    for _ in 0..5 {
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(store.keep_alive(lease).await.unwrap(), Duration::from_secs(10));
    }
    assert!(store.get("w").await.unwrap().is_some(), "30 s after the grant, kept alive");
    tokio::time::advance(Duration::from_secs(9)).await;
    assert!(store.get("w").await.unwrap().is_some());
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(store.get("w").await.unwrap(), None);
    assert!(
        matches!(store.keep_alive(lease).await, Err(StoreError::LeaseNotFound { lease: l }) if l == lease)
    );
    store.close().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn leases_survive_reopen_with_their_ttl_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let lease = {
        let store = FileStore::open(dir.path()).await.unwrap();
        let lease = store.grant_lease(Duration::from_secs(10)).await.unwrap();
        store.put("w", b"up".to_vec(), Some(lease)).await.unwrap();
        store.close().await.unwrap();
        lease
    };
    tokio::time::advance(Duration::from_secs(8)).await;
    let store = FileStore::open(dir.path()).await.unwrap();
    tokio::time::advance(Duration::from_secs(8)).await;
    assert!(store.get("w").await.unwrap().is_some(), "the TTL restarted at open");
    assert_eq!(store.keep_alive(lease).await.unwrap(), Duration::from_secs(10));
    // A new lease gets a new id, never a reused one.
    let other = store.grant_lease(Duration::from_secs(1)).await.unwrap();
    assert!(other.0 > lease.0);
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(store.get("w").await.unwrap(), None);
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_slow_watcher_is_ended_with_an_error_and_can_resume() {
    let dir = tempfile::tempdir().unwrap();
    let options = FileStoreOptions { watch_buffer: 4, ..FileStoreOptions::default() };
    let store = FileStore::open_with(dir.path(), options).await.unwrap();
    let mut slow = store.watch("", 1).await.unwrap();
    for i in 0..20u8 {
        // Writers are not held back by the watcher that does not read.
        store.put("k", vec![i], None).await.unwrap();
    }
    let mut seen = Vec::new();
    let resume_from = loop {
        match slow.next().await {
            Some(Ok(e)) => seen.push(e.revision),
            Some(Err(StoreError::WatchLagged { resume_from, .. })) => break resume_from,
            other => panic!("expected events then WatchLagged, got {other:?}"),
        }
    };
    assert!(slow.next().await.is_none(), "the stream ends after the error");
    assert_eq!(resume_from, seen.last().map_or(1, |r| r + 1));
    // Nothing is lost: the history lets it resume exactly where it stopped.
    let mut resumed = store.watch("", resume_from).await.unwrap();
    let rest = events::<FileStore>(&mut resumed, (21 - resume_from) as usize).await;
    seen.extend(revisions(&rest));
    assert_eq!(seen, (1..=20).collect::<Vec<_>>());
    store.close().await.unwrap();
}

#[tokio::test]
async fn close_and_drop_end_the_task_and_the_watches() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).await.unwrap();
    let other_handle = store.clone();
    store.put("a", b"1".to_vec(), None).await.unwrap();
    let mut watch = store.watch("", 1).await.unwrap();
    store.close().await.unwrap();
    assert_eq!(next_event::<FileStore>(&mut watch).await.revision, 1, "what was durable is delivered");
    assert!(matches!(watch.next().await, Some(Err(StoreError::Closed))));
    assert!(watch.next().await.is_none());
    assert!(matches!(other_handle.get("a").await, Err(StoreError::Closed)));
    other_handle.close().await.unwrap();

    let store = FileStore::open(dir.path()).await.unwrap();
    let mut watch = store.watch("", 2).await.unwrap();
    drop(store);
    let end = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.unwrap();
    assert!(matches!(end, Some(Err(StoreError::Closed))), "dropping the last handle ends the task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_registered_amid_writes_see_every_revision_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).await.unwrap();
    const N: u64 = 200;
    let mut writers = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..N / 4 {
                store.put(&format!("w{w}/{i}"), vec![1], None).await.unwrap();
            }
        }));
    }
    // Watches land in the same group-commit batches as writes: replay and live feed must
    // still meet exactly.
    let mut watchers = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        watchers.push(tokio::spawn(async move {
            tokio::task::yield_now().await;
            let mut watch = store.watch("", 1).await.unwrap();
            revisions(&events::<FileStore>(&mut watch, N as usize).await)
        }));
        tokio::task::yield_now().await;
    }
    for w in writers {
        w.await.unwrap();
    }
    for w in watchers {
        assert_eq!(w.await.unwrap(), (1..=N).collect::<Vec<_>>());
    }
    store.close().await.unwrap();
}

#[tokio::test]
async fn an_io_failure_stops_the_store() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("store");
    let store = FileStore::open(&dir).await.unwrap();
    store.put("a", b"1".to_vec(), None).await.unwrap();
    let mut watch = store.watch("", 1).await.unwrap();
    // Compaction cannot write its files into a directory that is gone.
    fs::remove_dir_all(&dir).unwrap();
    match store.compact(1).await {
        Err(StoreError::Failed { reason }) => assert!(reason.contains("store"), "{reason}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    assert!(matches!(store.get("a").await, Err(StoreError::Failed { .. })));
    assert!(matches!(store.put("b", b"1".to_vec(), None).await, Err(StoreError::Failed { .. })));
    assert_eq!(next_event::<FileStore>(&mut watch).await.revision, 1);
    assert!(matches!(watch.next().await, Some(Err(StoreError::Closed))));
    store.close().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Property: a random history applied to the store, with restarts and compactions, leaves
// the state an in-memory model predicts.

#[derive(Clone, Debug)]
enum Action {
    Put(usize, u8),
    Delete(usize),
    /// Compare-and-swap on the key's mod revision, stale or current.
    Swap(usize, bool, u8),
    CreateIfAbsent(usize, u8),
    DeletePrefix,
    Compact(u8),
    Reopen,
}

const KEYS: [&str; 5] = ["a", "b", "d/x", "d/y", "e"];

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (0..KEYS.len(), any::<u8>()).prop_map(|(k, v)| Action::Put(k, v)),
        2 => (0..KEYS.len()).prop_map(Action::Delete),
        2 => (0..KEYS.len(), any::<bool>(), any::<u8>()).prop_map(|(k, s, v)| Action::Swap(k, s, v)),
        2 => (0..KEYS.len(), any::<u8>()).prop_map(|(k, v)| Action::CreateIfAbsent(k, v)),
        1 => Just(Action::DeletePrefix),
        1 => any::<u8>().prop_map(Action::Compact),
        1 => Just(Action::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    kvs: BTreeMap<String, KeyValue>,
    revision: Revision,
    compacted: Revision,
}

impl Model {
    fn put(&mut self, key: &str, value: u8) {
        self.revision += 1;
        let prev = self.kvs.get(key);
        let kv = KeyValue {
            key: key.into(),
            value: vec![value],
            create_revision: prev.map_or(self.revision, |p| p.create_revision),
            mod_revision: self.revision,
            version: prev.map_or(1, |p| p.version + 1),
            lease: None,
        };
        self.kvs.insert(key.into(), kv);
    }
}

async fn run_actions(dir: &Path, actions: Vec<Action>) {
    let mut store = FileStore::open(dir).await.unwrap();
    let mut model = Model::default();
    for action in actions {
        match action {
            Action::Put(k, v) => {
                let rev = store.put(KEYS[k], vec![v], None).await.unwrap();
                model.put(KEYS[k], v);
                assert_eq!(rev, model.revision);
            }
            Action::Delete(k) => {
                let rev = store.delete(KEYS[k]).await.unwrap();
                if model.kvs.remove(KEYS[k]).is_some() {
                    model.revision += 1;
                    assert_eq!(rev, Some(model.revision));
                } else {
                    assert_eq!(rev, None);
                }
            }
            Action::Swap(k, stale, v) => {
                let current = model.kvs.get(KEYS[k]).map_or(0, |kv| kv.mod_revision);
                let expected = if stale { current.wrapping_sub(1) } else { current };
                let t = Txn::new()
                    .when([Compare::mod_revision(KEYS[k], CompareOp::Equal, expected)])
                    .and_then([Op::put(KEYS[k], vec![v], None)]);
                let r = store.txn(t).await.unwrap();
                assert_eq!(r.succeeded, !stale);
                if !stale {
                    model.put(KEYS[k], v);
                }
                assert_eq!(r.revision, model.revision);
            }
            Action::CreateIfAbsent(k, v) => {
                let t =
                    Txn::new().when([Compare::absent(KEYS[k])]).and_then([Op::put(KEYS[k], vec![v], None)]);
                let r = store.txn(t).await.unwrap();
                assert_eq!(r.succeeded, !model.kvs.contains_key(KEYS[k]));
                if r.succeeded {
                    model.put(KEYS[k], v);
                }
            }
            Action::DeletePrefix => {
                let r = store.txn(Txn::new().and_then([Op::delete_prefix("d/")])).await.unwrap();
                let before = model.kvs.len();
                model.kvs.retain(|k, _| !k.starts_with("d/"));
                if model.kvs.len() < before {
                    model.revision += 1;
                }
                assert_eq!(r.responses, [OpResponse::Delete { deleted: (before - model.kvs.len()) as u64 }]);
                assert_eq!(r.revision, model.revision);
            }
            Action::Compact(x) => {
                let target = model.compacted + 1 + u64::from(x) % (model.revision + 1);
                let r = store.compact(target).await;
                if target <= model.revision {
                    r.unwrap();
                    model.compacted = target;
                } else {
                    assert!(matches!(r, Err(StoreError::FutureRevision { .. })), "{r:?}");
                }
            }
            Action::Reopen => {
                store.close().await.unwrap();
                store = FileStore::open(dir).await.unwrap();
            }
        }
        assert_eq!(store.range("").await.unwrap(), model.kvs.values().cloned().collect::<Vec<_>>());
    }
    store.close().await.unwrap();
    let store = FileStore::open(dir).await.unwrap();
    assert_eq!(store.range("").await.unwrap(), model.kvs.values().cloned().collect::<Vec<_>>());
    assert_eq!(store.current_revision().await.unwrap(), model.revision);
    assert_eq!(store.compacted_revision().await.unwrap(), model.compacted);
    // The retained history replays to the same state from the compaction point on.
    // The retained history holds every revision from the compaction point on, in order.
    if model.revision > 0 {
        let mut watch = store.watch("", model.compacted).await.unwrap();
        let mut seen: Vec<Revision> = Vec::new();
        while seen.last() != Some(&model.revision) {
            let e = next_event::<FileStore>(&mut watch).await;
            assert!(seen.last().is_none_or(|&last| e.revision >= last));
            if seen.last() != Some(&e.revision) {
                seen.push(e.revision);
            }
        }
        assert_eq!(seen, (model.compacted.max(1)..=model.revision).collect::<Vec<_>>());
    }
    store.close().await.unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn random_histories_survive_reopen_like_a_model(actions in prop::collection::vec(action(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run_actions(dir.path(), actions));
    }
}
