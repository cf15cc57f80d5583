//! `EtcdStore` against real etcd processes (Debian's `etcd-server`, binary `etcd`, or the
//! one `FLOTILLA_ETCD` names), started on free loopback ports with temp data dirs and
//! killed by pid: the conformance suite, prefix isolation, errors naming the endpoint, and
//! a three-member cluster losing its leader while a writer and a watcher carry on.
//!
//! Outside CI a missing `etcd` skips these tests with a printed reason; under `CI=true` it
//! fails them.

mod store_conformance;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flotilla_coordinator::store::{
    Compare, ETCD_MAX_TXN_BYTES, EtcdConfig, EtcdStore, EventKind, Op, Revision, StateStore, StoreError, Txn,
};

/// The `etcd` binary, or `None` (with the reason printed) when the test should skip.
fn etcd_binary() -> Option<PathBuf> {
    let found = std::env::var_os("FLOTILLA_ETCD").map(PathBuf::from).or_else(|| {
        std::env::var_os("PATH")
            .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join("etcd")).find(|p| p.is_file()))
    });
    match found {
        Some(path) => Some(path),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true and no etcd binary (install etcd-server, or set FLOTILLA_ETCD)")
        }
        None => {
            eprintln!("skipping: no etcd binary on PATH (apt-get install etcd-server, or set FLOTILLA_ETCD)");
            None
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One etcd member, killed by pid on drop.
struct Member {
    name: String,
    client: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Member {
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster of etcd members on loopback, in one temp dir.
struct Cluster {
    members: Vec<Member>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` members and waits (bounded) until the cluster has a leader and every
    /// member answers.
    async fn start(n: usize) -> Option<Cluster> {
        let binary = etcd_binary()?;
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}")).collect();
        let token = format!("flotilla-test-{}", std::process::id());
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("m{i}");
            let log = dir.path().join(format!("{name}.log"));
            let out = std::fs::File::create(&log).unwrap();
            let child = Command::new(&binary)
                .args(["--name", &name])
                .arg("--data-dir")
                .arg(dir.path().join(&name))
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-token", &token, "--initial-cluster-state", "new"])
                .args(["--logger", "zap", "--log-level", "warn"])
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
            members.push(Member { name, client: format!("127.0.0.1:{client}"), child: Some(child), log });
        }
        let cluster = Cluster { members, _dir: dir };
        for member in &cluster.members {
            cluster.wait_ready(member).await;
        }
        Some(cluster)
    }

    async fn wait_ready(&self, member: &Member) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut config = EtcdConfig::new([member.client.clone()]);
            config.timeout = Duration::from_secs(1);
            if let Ok(store) = EtcdStore::connect(config).await
                && store.current_revision().await.is_ok()
            {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "etcd member {} did not answer within 60 s; its log:\n{}",
                    member.name,
                    member.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.clone()).collect()
    }

    async fn store(&self, prefix: &str) -> EtcdStore {
        let mut config = EtcdConfig::new(self.endpoints());
        config.prefix = prefix.to_string();
        config.timeout = Duration::from_secs(2);
        EtcdStore::connect(config).await.unwrap()
    }

    /// The index of the member that is the raft leader, as the members report it
    /// (waiting, bounded, while an election is under way).
    async fn leader(&self) -> usize {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(leader) = self.find_leader().await {
                return leader;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no member reported itself the leader within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn find_leader(&self) -> Option<usize> {
        for member in self.members.iter().filter(|m| m.child.is_some()) {
            let Ok(mut client) =
                etcd_client::Client::connect([format!("http://{}", member.client)], None).await
            else {
                continue;
            };
            let Ok(status) = client.status().await else { continue };
            let me = status.header().map(|h| h.member_id());
            if me == Some(status.leader()) {
                return self.members.iter().position(|m| m.client == member.client);
            }
        }
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_store_passes_the_conformance_suite() {
    let Some(cluster) = Cluster::start(1).await else { return };
    let limits = store_conformance::Limits { max_txn_bytes: ETCD_MAX_TXN_BYTES, ttl: Duration::from_secs(2) };
    let cluster = &cluster;
    store_conformance::run_all(limits, |case| async move {
        cluster.store(&format!("/conformance/{case}/")).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_prefixes_share_one_etcd_without_seeing_each_other() {
    let Some(cluster) = Cluster::start(1).await else { return };
    let a = cluster.store("/cluster-a/").await;
    let b = cluster.store("/cluster-b/").await;
    let from = a.current_revision().await.unwrap() + 1;
    let mut watch_b = b.watch("", from).await.unwrap();
    a.put("jobs/1", b"a".to_vec(), None).await.unwrap();
    a.put("jobs/2", b"a".to_vec(), None).await.unwrap();
    let rb = b.put("jobs/1", b"b".to_vec(), None).await.unwrap();

    assert_eq!(a.range("").await.unwrap().len(), 2);
    let in_b = b.range("").await.unwrap();
    assert_eq!((in_b.len(), in_b[0].key.as_str(), in_b[0].value.as_slice()), (1, "jobs/1", b"b".as_slice()));
    let e = store_conformance::next_event(&mut watch_b).await;
    assert_eq!((e.revision, e.kv.key.as_str()), (rb, "jobs/1"), "b's watch sees only b's write");
    // A compare in one prefix does not see the other's key.
    let t = Txn::new().when([Compare::absent("jobs/2")]);
    assert!(b.txn(t).await.unwrap().succeeded);
    // Deleting everything in one prefix leaves the other alone.
    b.txn(Txn::new().and_then([Op::delete_prefix("")])).await.unwrap();
    assert_eq!(a.range("").await.unwrap().len(), 2);
}

#[tokio::test]
async fn an_unreachable_etcd_is_unavailable_naming_the_endpoint() {
    let port = free_port();
    let mut config = EtcdConfig::new([format!("127.0.0.1:{port}")]);
    config.timeout = Duration::from_millis(500);
    match EtcdStore::connect(config).await {
        Err(e @ StoreError::Unavailable { .. }) => {
            assert!(e.is_retryable());
            assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
        }
        Err(e) => panic!("expected Unavailable, got {e:?}"),
        Ok(_) => panic!("connected to a port nobody listens on"),
    }
}

#[tokio::test]
async fn unreadable_tls_files_are_errors_naming_them() {
    let mut config = EtcdConfig::new(["127.0.0.1:2379"]);
    config.tls = Some(flotilla_coordinator::store::EtcdTls {
        ca: Path::new("/nonexistent/ca.pem").into(),
        identity: None,
    });
    match EtcdStore::connect(config).await {
        Err(StoreError::Config { field, reason }) => {
            assert_eq!(field, "ca");
            assert!(reason.contains("/nonexistent/ca.pem"), "{reason}");
        }
        Err(e) => panic!("expected Config, got {e:?}"),
        Ok(_) => panic!("connected without a CA file"),
    }
}

/// Writes key `k/{i}` once, retrying while the cluster is unavailable; a retry after an
/// unknown outcome finds out whether the first try was committed, so each key is written
/// exactly once. Returns the write's revision.
async fn write_once(store: &EtcdStore, i: usize) -> Revision {
    let key = format!("k/{i:04}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let t = Txn::new()
            .when([Compare::absent(key.as_str())])
            .and_then([Op::put(key.as_str(), i.to_le_bytes().to_vec(), None)])
            .or_else([Op::get(key.as_str())]);
        match store.txn(t).await {
            Ok(r) if r.succeeded => return r.revision,
            Ok(_) => return store.get(&key).await.unwrap().unwrap().mod_revision,
            Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("writing {key}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_cluster_loses_its_leader_and_writes_and_the_watch_go_on() {
    let Some(mut cluster) = Cluster::start(3).await else { return };
    let store = cluster.store("/three/").await;
    const N: usize = 120;
    let from = store.current_revision().await.unwrap() + 1;
    let mut watch = store.watch("k/", from).await.unwrap();

    let (killed_tx, killed_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut revisions = Vec::new();
            let mut killed = Some(killed_rx);
            for i in 0..N {
                if i == N / 3 {
                    // Hold the writes until the leader is dead, so the rest are written
                    // through the surviving majority.
                    killed.take().unwrap().await.unwrap();
                }
                revisions.push(write_once(&store, i).await);
            }
            revisions
        })
    };

    let mut seen = Vec::new();
    while seen.len() < N / 3 {
        seen.push(store_conformance::next_event(&mut watch).await);
    }
    let leader = cluster.leader().await;
    eprintln!("killing the leader, member {}", cluster.members[leader].name);
    cluster.members[leader].kill();
    killed_tx.send(()).unwrap();

    while seen.len() < N {
        seen.push(store_conformance::next_event(&mut watch).await);
    }
    let written = writer.await.unwrap();
    assert!(seen.iter().all(|e| e.kind == EventKind::Put));
    assert_eq!(
        store_conformance::revisions(&seen),
        written,
        "the watch saw every write once, in order, across the leader's death"
    );
    let keys: Vec<String> = seen.iter().map(|e| e.kv.key.clone()).collect();
    assert_eq!(keys, (0..N).map(|i| format!("k/{i:04}")).collect::<Vec<_>>());
    assert_eq!(store.range("k/").await.unwrap().len(), N);
    // The survivors elected a new leader.
    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_on_three_etcd_members_loses_one_and_keeps_its_jobs_across_a_restart() {
    use flotilla_coordinator::service::{CoordinatorConfig, bind_and_serve};
    use flotilla_coordinator::store::StoreConfig;
    use flotilla_proto::v1::job_service_client::JobServiceClient;
    use flotilla_proto::v1::{GetJobRequest, Job, SubmitJobRequest};
    use tonic::transport::Channel;

    let Some(mut cluster) = Cluster::start(3).await else { return };
    let out = tempfile::tempdir().unwrap();
    let url = format!("etcd://{}?prefix=/coordinator/&timeout-ms=2000", cluster.endpoints().join(","));
    let config = || CoordinatorConfig {
        allowed_roots: vec![out.path().to_path_buf()],
        ..CoordinatorConfig::with_store(StoreConfig::parse(&url).unwrap())
    };
    let client = |addr: std::net::SocketAddr| async move {
        JobServiceClient::connect(format!("http://{addr}")).await.expect("connect to the coordinator")
    };
    // Submits, retrying while the store is UNAVAILABLE (a member just died), bounded.
    let submit = |mut client: JobServiceClient<Channel>, name: &'static str| {
        let output_dir = out.path().join(name).display().to_string();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let request = SubmitJobRequest {
                    name: name.into(),
                    config_toml:
                        "seed = 0\nsteps = 2\nbatch_size = 4\nseq_len = 8\n\n[model]\npreset = \"tiny\"\n"
                            .into(),
                    workers: 1,
                    output_dir: output_dir.clone(),
                    resume_from: String::new(),
                };
                match client.submit_job(request).await {
                    Ok(job) => return job.into_inner(),
                    Err(status)
                        if status.code() == tonic::Code::Unavailable
                            && tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(status) => panic!("submitting {name}: {status}"),
                }
            }
        }
    };

    let coordinator = bind_and_serve(config()).await.expect("the coordinator starts on etcd");
    let first: Job = submit(client(coordinator.local_addr()).await, "before").await;
    // The etcd leader dies under the running coordinator; it goes on writing through the
    // surviving majority.
    let leader = cluster.leader().await;
    cluster.members[leader].kill();
    let second: Job = submit(client(coordinator.local_addr()).await, "after").await;
    coordinator.shutdown().await.unwrap();
    let keys = cluster.store("/coordinator/").await.range("").await.unwrap();
    for job in [&first, &second] {
        assert!(keys.iter().any(|kv| kv.key.contains(&job.job_id)), "{} is in etcd: {keys:?}", job.job_id);
    }

    // A new coordinator on the same prefix, on the two members left, finds both jobs.
    let coordinator = bind_and_serve(config()).await.expect("the coordinator restarts on etcd");
    let mut jobs = client(coordinator.local_addr()).await;
    for (job, name) in [(&first, "before"), (&second, "after")] {
        let found = jobs
            .get_job(GetJobRequest { job_id: job.job_id.clone() })
            .await
            .expect("the job survived the restart")
            .into_inner();
        assert_eq!(found.name, name);
    }
    coordinator.shutdown().await.unwrap();
}
