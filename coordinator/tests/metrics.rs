//! `GET /metrics` on a real coordinator on a loopback port, with jobs driven by fake
//! workers (tonic clients in this process that run steps the way `service.rs`'s do): the
//! values after a job, the per-rank series while a job runs and after it ends, a recovery
//! counted by its cause, the per-job series after retention removes the job, the exposition through `promtool check
//! metrics`, 401/403/200 by token role over TLS, the Grafana dashboard's expressions
//! against a scrape, and a real Prometheus scraping over TLS (HTTP/2 and HTTP/1.1) with a
//! viewer token.
//!
//! `promtool` and `prometheus` come from Debian's `prometheus` package (.ci/run installs
//! it). Under `CI=true` a missing binary fails the test; elsewhere the test says why it
//! skips.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_coordinator::service::auth::{AuthChannel, BearerToken, ClientAuth, ClientTls, ServerTls};
use flotilla_coordinator::service::{CoordinatorConfig, CoordinatorHandle, JobRetention, serve};
use flotilla_proto::PROTOCOL_VERSION;
use flotilla_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use flotilla_proto::v1::job_service_client::JobServiceClient;
use flotilla_proto::v1::{
    Ack, CancelJobRequest, CoordinatorMessage, GetJobRequest, Heartbeat, JobFinished, JobState, SessionOpen,
    StepReport, SubmitJobRequest, WorkerInfo, WorkerMessage, coordinator_message, worker_message,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

const ADMIN: &str = "admin-0123456789abcdef";
const VIEWER: &str = "viewer-0123456789abcdef";
const WORKER: &str = "worker-0123456789abcdef";

const INTERVAL: Duration = Duration::from_millis(50);
/// The longest a test waits for something that should happen (the metrics feed follows
/// the store asynchronously, so values are polled for).
const PATIENCE: Duration = Duration::from_secs(20);
/// A real Prometheus starts, scrapes every second and answers queries: generous.
const PROMETHEUS_PATIENCE: Duration = Duration::from_secs(90);

/// What each fake step reports: compute and communication seconds (their sum is the step
/// time), tokens, and the loss of step `s`.
const COMPUTE_SECONDS: f64 = 0.01;
const COMMUNICATION_SECONDS: f64 = 0.002;
const TOKENS: u64 = 128;
fn loss(step: u64) -> f64 {
    5.0 - 0.1 * step as f64
}

// ---------------------------------------------------------------------------------------
// Certificates (as auth.rs makes them)

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.distinguished_name.push(DnType::CommonName, "flotilla test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.path().join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server(&self) -> ServerTls {
        ServerTls { cert: self.path("server.pem"), key: self.path("server.key"), client_ca: None }
    }

    fn client(&self) -> ClientTls {
        ClientTls { ca: self.path("ca.pem"), identity: None, domain: None }
    }
}

// ---------------------------------------------------------------------------------------
// Coordinator and clients

fn config(dir: &Path) -> CoordinatorConfig {
    CoordinatorConfig {
        heartbeat_interval: INTERVAL,
        heartbeat_timeout: Duration::from_millis(500),
        allowed_roots: vec![std::env::temp_dir()],
        ..CoordinatorConfig::new(dir.join("state"))
    }
}

fn with_tls_and_tokens(config: CoordinatorConfig, dir: &Path, pki: &Pki) -> CoordinatorConfig {
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, format!("admin {ADMIN}\nviewer {VIEWER}\nworker {WORKER}\n")).unwrap();
    CoordinatorConfig { tls: Some(pki.server()), token_file: Some(tokens), ..config }
}

async fn start(config: CoordinatorConfig) -> CoordinatorHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve(config, listener).await.expect("the coordinator starts")
}

fn auth(tls: Option<ClientTls>, token: Option<&str>) -> ClientAuth {
    ClientAuth { tls, token: token.map(|t| BearerToken::new(t).unwrap()) }
}

async fn channel(addr: SocketAddr, auth: &ClientAuth) -> tonic::transport::Channel {
    let scheme = if auth.tls.is_some() { "https" } else { "http" };
    auth.endpoint(&format!("{scheme}://{addr}")).unwrap().connect().await.expect("connects")
}

async fn jobs(addr: SocketAddr, auth: &ClientAuth) -> JobServiceClient<AuthChannel> {
    JobServiceClient::with_interceptor(channel(addr, auth).await, auth.interceptor())
}

fn job_config(steps: u64, max_restarts: u32) -> String {
    format!(
        "seed = 0\nsteps = {steps}\nbatch_size = 12\nseq_len = 16\n\n[model]\npreset = \"tiny\"\n\n[recovery]\nmax_restarts = {max_restarts}\nbackoff_ms = 10\n"
    )
}

async fn submit(client: &mut JobServiceClient<AuthChannel>, workers: u32, steps: u64) -> String {
    submit_with(client, workers, steps, 0).await
}

async fn submit_with(
    client: &mut JobServiceClient<AuthChannel>,
    workers: u32,
    steps: u64,
    max_restarts: u32,
) -> String {
    let request = SubmitJobRequest {
        name: format!("metrics-{workers}x{steps}"),
        config_toml: job_config(steps, max_restarts),
        workers,
        output_dir: std::env::temp_dir().join("flotilla-metrics-test").display().to_string(),
        resume_from: String::new(),
    };
    client.submit_job(request).await.expect("the job is accepted").into_inner().job_id
}

async fn wait_for_state(client: &mut JobServiceClient<AuthChannel>, job_id: &str, state: JobState) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let job = client.get_job(GetJobRequest { job_id: job_id.into() }).await.unwrap().into_inner();
        if job.state() == state {
            return;
        }
        assert!(Instant::now() < deadline, "job {job_id} stayed {:?}, expected {state:?}", job.state());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Scraping

/// `GET /metrics` over the coordinator's HTTP/2 (h2c, or h2 over TLS with `tls`), with
/// `token` as the bearer token: the status, the content type and the body.
async fn scrape_h2(addr: SocketAddr, tls: Option<ClientTls>, token: Option<&str>) -> (u16, String, String) {
    use http_body_util::BodyExt;
    use tower::Service;
    let client = auth(tls, None);
    let scheme = if client.tls.is_some() { "https" } else { "http" };
    let mut request = http::Request::get(format!("{scheme}://{addr}/metrics"));
    if let Some(token) = token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request.body(tonic::body::Body::empty()).unwrap();
    let mut channel = channel(addr, &client).await;
    std::future::poll_fn(|cx| channel.poll_ready(cx)).await.expect("the channel is ready");
    let response = channel.call(request).await.expect("the scrape is answered");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = response.into_body().collect().await.expect("the body").to_bytes();
    (status, content_type, String::from_utf8(body.to_vec()).expect("UTF-8"))
}

/// One plain HTTP/1.1 request (`Connection: close`), as Prometheus makes them by default:
/// the raw response.
async fn http1_get(addr: SocketAddr, path: &str, token: Option<&str>) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connects");
    let authorization = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{authorization}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("answered in time")
        .unwrap();
    String::from_utf8(response).expect("UTF-8")
}

/// The value of the sample `series` (name and labels exactly as exposed), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        let value = rest.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// Scrapes until `ready` holds for the exposition (the feed follows the store
/// asynchronously), and returns it.
async fn scrape_until(addr: SocketAddr, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, _, text) = scrape_h2(addr, None, None).await;
        assert_eq!(status, 200, "{text}");
        if ready(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "the exposition never got there:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The metric families an exposition declares (`# TYPE` lines).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Whether `CI=true`, where a missing tool is a failure rather than a skip.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The path of `tool` on PATH; `None` (after saying why) outside CI when it is missing.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|dir| dir.join(name)).find(|path| path.is_file())
    });
    match found {
        Some(path) => Some(path),
        None if in_ci() => {
            panic!("{name} is not installed (Debian package `prometheus`; .ci/run installs it)")
        }
        None => {
            eprintln!("skipping the {name} part: {name} is not installed (apt-get install prometheus)");
            None
        }
    }
}

// ---------------------------------------------------------------------------------------
// Fake workers

/// A fake worker: registers, opens its session, heartbeats, acknowledges assignments and
/// aborts, and runs steps (one report every 5 ms) until the last, or, in its first run,
/// until `stall_at` (exclusive), where it goes quiet with heartbeats on, as if stuck in a
/// step; a later run (after a recovery) runs every step.
struct FakeWorker {
    task: JoinHandle<()>,
}

impl FakeWorker {
    async fn start(addr: SocketAddr, auth: &ClientAuth, id: &str, stall_at: Option<u64>) -> FakeWorker {
        let mut client =
            CoordinatorServiceClient::with_interceptor(channel(addr, auth).await, auth.interceptor());
        let info = WorkerInfo {
            worker_id: id.into(),
            host: "test-host".into(),
            cores: 2,
            data_plane_address: format!("127.0.0.1:{}", 41000 + id.len()),
            protocol_version: PROTOCOL_VERSION,
            node_id: format!("node-{id}"),
            ..Default::default()
        };
        let registration = client.register(info).await.expect("registration").into_inner();
        let (tx, rx) = mpsc::channel(256);
        let open =
            SessionOpen { worker_id: registration.worker_id.clone(), session_id: registration.session_id };
        tx.send(WorkerMessage { body: Some(worker_message::Body::Open(open)) }).await.unwrap();
        let inbound = client.session(ReceiverStream::new(rx)).await.expect("the session opens").into_inner();
        let task = tokio::spawn(run_worker(client, tx, inbound, stall_at));
        FakeWorker { task }
    }

    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

struct Run {
    job_id: String,
    next: u64,
    end: u64,
    epoch: u64,
    at: tokio::time::Instant,
}

async fn run_worker(
    _client: CoordinatorServiceClient<AuthChannel>,
    tx: mpsc::Sender<WorkerMessage>,
    mut inbound: tonic::Streaming<CoordinatorMessage>,
    mut stall_at: Option<u64>,
) {
    let send = |body| WorkerMessage { body: Some(body) };
    let ack = |command_id| send(worker_message::Body::Ack(Ack { command_id, ..Ack::default() }));
    let mut ticker = tokio::time::interval(INTERVAL);
    let mut sequence = 0;
    let mut epoch = 0;
    let mut run: Option<Run> = None;
    loop {
        let next_step = run.as_ref().map(|r| r.at);
        tokio::select! {
            _ = ticker.tick() => {
                sequence += 1;
                let beat = Heartbeat { sequence, sent_unix_ms: 0 };
                if tx.send(send(worker_message::Body::Heartbeat(beat))).await.is_err() {
                    return;
                }
            }
            command = inbound.message() => {
                let Ok(Some(command)) = command else { return };
                match command.body {
                    Some(coordinator_message::Body::Assignment(assignment)) => {
                        epoch = assignment.epoch;
                        let _ = tx.send(ack(command.command_id)).await;
                    }
                    Some(coordinator_message::Body::RunSteps(r)) => {
                        run = Some(Run {
                            job_id: r.job_id,
                            next: r.first_step,
                            end: r.first_step + r.count,
                            epoch,
                            at: tokio::time::Instant::now(),
                        });
                    }
                    Some(coordinator_message::Body::Abort(_)) => {
                        run = None;
                        let _ = tx.send(ack(command.command_id)).await;
                    }
                    _ => {}
                }
            }
            _ = tokio::time::sleep_until(next_step.unwrap_or_else(tokio::time::Instant::now)), if next_step.is_some() => {
                let Some(r) = run.as_mut() else { continue };
                let step = r.next;
                if stall_at.is_some_and(|n| step >= n) {
                    run = None;
                    stall_at = None;
                    continue;
                }
                let body = if step >= r.end {
                    let finished = JobFinished { job_id: r.job_id.clone(), steps: r.end, epoch: r.epoch };
                    run = None;
                    worker_message::Body::Finished(finished)
                } else {
                    r.next += 1;
                    r.at += Duration::from_millis(5);
                    worker_message::Body::StepReport(StepReport {
                        job_id: r.job_id.clone(),
                        step,
                        loss: loss(step),
                        main_ce: 4.5,
                        mtp_ce: vec![4.8],
                        tokens: TOKENS,
                        compute_seconds: COMPUTE_SECONDS,
                        communication_seconds: COMMUNICATION_SECONDS,
                        epoch: r.epoch,
                        ..StepReport::default()
                    })
                };
                if tx.send(send(body)).await.is_err() {
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Prometheus

/// A Prometheus server started by a test, killed by pid when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Prometheus {
    /// Starts `binary` scraping `target` every second over TLS with the CA `ca` and the
    /// bearer token in `token_file`, as two scrape jobs: `flotilla` over HTTP/2, and
    /// `flotilla-http1` over HTTP/1.1 (`enable_http2: false`, Prometheus' default, whose
    /// client sends no ALPN, so the coordinator's `h2`-only ALPN does not refuse it).
    fn start(binary: &Path, target: SocketAddr, ca: &Path, token_file: &Path) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: flotilla\n    scheme: https\n    enable_http2: true\n    \
             tls_config:\n      ca_file: {ca}\n    authorization:\n      type: Bearer\n      \
             credentials_file: {token}\n    static_configs:\n      - targets: ['{target}']\n  \
             - job_name: flotilla-http1\n    scheme: https\n    enable_http2: false\n    \
             tls_config:\n      ca_file: {ca}\n    authorization:\n      type: Bearer\n      \
             credentials_file: {token}\n    static_configs:\n      - targets: ['{target}']\n",
            ca = ca.display(),
            token = token_file.display(),
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        Prometheus { child, addr, _dir: dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Polls the instant query `query` until its single result's value is `expected`.
    async fn wait_for(&mut self, query: &str, expected: &str) {
        let deadline = Instant::now() + PROMETHEUS_PATIENCE;
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let wanted = format!("\"{expected}\"]");
        let mut last = String::new();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            if let Ok(stream) = tokio::net::TcpStream::connect(self.addr).await {
                drop(stream);
                last = http1_get(self.addr, &format!("/api/v1/query?query={encoded}"), None).await;
                // `"value":[<time>,"<value>"]` in the single result.
                if last.contains("\"status\":\"success\"") && last.contains(&wanted) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "prometheus never answered {query} = {expected}; last answer:\n{last}\nlog:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn a_finished_job_is_exposed_and_the_exposition_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let none = auth(None, None);
    let workers = [
        FakeWorker::start(addr, &none, "w-0", None).await,
        FakeWorker::start(addr, &none, "w-1", None).await,
    ];
    let mut client = jobs(addr, &none).await;
    const STEPS: u64 = 6;
    let job = submit(&mut client, 2, STEPS).await;
    wait_for_state(&mut client, &job, JobState::Succeeded).await;

    let steps = format!("flotilla_job_steps_completed{{job_id=\"{job}\"}}");
    let text =
        scrape_until(addr, |text| sample(text, "flotilla_jobs{state=\"succeeded\"}") == Some(1.0)).await;
    assert_eq!(sample(&text, &steps), Some(STEPS as f64), "{text}");
    assert_eq!(sample(&text, &format!("flotilla_job_total_steps{{job_id=\"{job}\"}}")), Some(STEPS as f64));
    assert_eq!(sample(&text, &format!("flotilla_job_loss{{job_id=\"{job}\"}}")), Some(loss(STEPS)));
    let step_seconds = COMPUTE_SECONDS + COMMUNICATION_SECONDS;
    let tokens_per_second =
        sample(&text, &format!("flotilla_job_tokens_per_second{{job_id=\"{job}\"}}")).unwrap();
    assert!((tokens_per_second - TOKENS as f64 / step_seconds).abs() < 1e-6, "{tokens_per_second}");
    let count = sample(&text, &format!("flotilla_job_step_duration_seconds_count{{job_id=\"{job}\"}}"));
    assert_eq!(count, Some(STEPS as f64), "{text}");
    let sum = sample(&text, &format!("flotilla_job_step_duration_seconds_sum{{job_id=\"{job}\"}}")).unwrap();
    assert!((sum - STEPS as f64 * step_seconds).abs() < 1e-9, "{sum}");
    for state in ["pending", "rendezvous", "running", "recovering", "failed", "cancelled"] {
        assert_eq!(sample(&text, &format!("flotilla_jobs{{state=\"{state}\"}}")), Some(0.0), "{state}");
    }
    assert_eq!(sample(&text, "flotilla_workers{state=\"idle\"}"), Some(2.0), "{text}");
    assert_eq!(sample(&text, "flotilla_workers{state=\"assigned\"}"), Some(0.0));
    assert_eq!(sample(&text, "flotilla_grpc_requests_total{method=\"SubmitJob\"}"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "flotilla_recoveries_total{cause=\"worker_lost\"}"), Some(0.0), "{text}");
    assert!(
        sample(&text, "flotilla_store_operation_duration_seconds_count{op=\"write\"}").unwrap()
            >= STEPS as f64
    );
    // The job has ended: none of its ranks' series are left.
    assert!(!text.contains("rank=\""), "{text}");

    // The same over HTTP/1.1, as Prometheus scrapes by default.
    let response = http1_get(addr, "/metrics", None).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{response}");
    assert!(response.contains(&steps), "{response}");

    // promtool's linter accepts the exposition.
    if let Some(promtool) = tool("promtool") {
        let mut check = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool runs");
        use std::io::Write;
        check.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let output = check.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "promtool check metrics: {}{}\n{text}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    for worker in workers {
        worker.stop().await;
    }
    coordinator.shutdown().await.unwrap();
}

/// Checks that every metric the Grafana dashboard (`deploy/grafana/flotilla.json`) queries
/// is declared in the exposition `text`.
fn check_dashboard(text: &str) {
    let dashboard = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/flotilla.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard).expect("the dashboard is there")).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&json, &mut exprs);
    assert!(exprs.len() >= 6, "the dashboard has {} queries", exprs.len());
    let declared = families(text);
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "the query {expr:?} names no flotilla metric");
        for name in names {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix).filter(|base| declared.contains(*base)))
                .unwrap_or(&name);
            assert!(declared.contains(family), "the dashboard queries {name}, which is not exported");
        }
    }
}

/// Every `expr` string in a Grafana dashboard.
fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|item| collect_exprs(item, out)),
        _ => {}
    }
}

/// The `flotilla_…` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("flotilla_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[tokio::test]
async fn per_rank_series_live_while_a_job_runs_and_go_when_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let none = auth(None, None);
    // Both report steps 1 and 2, then stall in step 3 (heartbeating on).
    let workers = [
        FakeWorker::start(addr, &none, "w-0", Some(3)).await,
        FakeWorker::start(addr, &none, "w-1", Some(3)).await,
    ];
    let mut client = jobs(addr, &none).await;
    let job = submit(&mut client, 2, 10).await;
    let rank = |r: u32| format!("flotilla_rank_last_step{{job_id=\"{job}\",rank=\"{r}\"}}");
    let age = |r: u32| format!("flotilla_rank_heartbeat_age_seconds{{job_id=\"{job}\",rank=\"{r}\"}}");
    let steps = format!("flotilla_job_steps_completed{{job_id=\"{job}\"}}");
    // The ranks' steps are set as their reports arrive, the job's step once its summary is
    // written (and the feed has seen it).
    let text = scrape_until(addr, |text| {
        sample(text, &rank(0)) == Some(2.0)
            && sample(text, &rank(1)) == Some(2.0)
            && sample(text, &steps) == Some(2.0)
    })
    .await;
    for r in 0..2 {
        let seconds =
            sample(&text, &age(r)).unwrap_or_else(|| panic!("no heartbeat age of rank {r}:\n{text}"));
        assert!(seconds >= 0.0);
    }
    assert_eq!(sample(&text, "flotilla_jobs{state=\"running\"}"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "flotilla_workers{state=\"assigned\"}"), Some(2.0), "{text}");
    // With a job running, every series the dashboard queries exists.
    check_dashboard(&text);

    client
        .cancel_job(CancelJobRequest { job_id: job.clone(), reason: "enough".into() })
        .await
        .expect("the job is cancelled");
    let text =
        scrape_until(addr, |text| sample(text, "flotilla_jobs{state=\"cancelled\"}") == Some(1.0)).await;
    assert!(!text.contains("rank=\""), "a cancelled job's ranks are still exposed:\n{text}");
    // Its per-job series stay until retention removes the job.
    assert_eq!(sample(&text, &format!("flotilla_job_steps_completed{{job_id=\"{job}\"}}")), Some(2.0));

    for worker in workers {
        worker.stop().await;
    }
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_recovery_is_counted_by_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(config(dir.path())).await;
    let addr = coordinator.local_addr();
    let none = auth(None, None);
    // Both stall in step 3 of their first run; the job is placed on them (the spare
    // registers after the job runs).
    let survivor = FakeWorker::start(addr, &none, "w-0", Some(3)).await;
    let doomed = FakeWorker::start(addr, &none, "w-1", Some(3)).await;
    let mut client = jobs(addr, &none).await;
    const STEPS: u64 = 6;
    let job = submit_with(&mut client, 2, STEPS, 1).await;
    let rank = |r: u32| format!("flotilla_rank_last_step{{job_id=\"{job}\",rank=\"{r}\"}}");
    scrape_until(addr, |text| sample(text, &rank(0)) == Some(2.0) && sample(text, &rank(1)) == Some(2.0))
        .await;
    let spare = FakeWorker::start(addr, &none, "w-2", None).await;
    // A crashed process: the stream breaks, the job recovers from the seeded start on the
    // survivor and the spare, and runs to the end.
    doomed.stop().await;
    wait_for_state(&mut client, &job, JobState::Succeeded).await;
    let text = scrape_until(addr, |text| {
        sample(text, "flotilla_recoveries_total{cause=\"worker_lost\"}") == Some(1.0)
    })
    .await;
    for cause in ["worker_error", "step_timeout", "coordinator_restarted", "checkpoint_unloadable"] {
        assert_eq!(
            sample(&text, &format!("flotilla_recoveries_total{{cause=\"{cause}\"}}")),
            Some(0.0),
            "{cause}"
        );
    }
    assert_eq!(sample(&text, &format!("flotilla_job_restarts{{job_id=\"{job}\"}}")), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, &format!("flotilla_job_steps_completed{{job_id=\"{job}\"}}")),
        Some(STEPS as f64)
    );
    assert!(!text.contains("rank=\""), "{text}");

    survivor.stop().await;
    spare.stop().await;
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn retention_removes_a_jobs_series() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(CoordinatorConfig {
        retention: JobRetention { max_jobs: Some(1), max_age: None },
        compaction_interval: Duration::from_millis(50),
        ..config(dir.path())
    })
    .await;
    let addr = coordinator.local_addr();
    let none = auth(None, None);
    let worker = FakeWorker::start(addr, &none, "w-0", None).await;
    let mut client = jobs(addr, &none).await;
    let first = submit(&mut client, 1, 3).await;
    wait_for_state(&mut client, &first, JobState::Succeeded).await;
    let first_steps = format!("flotilla_job_steps_completed{{job_id=\"{first}\"}}");
    scrape_until(addr, |text| sample(text, &first_steps) == Some(3.0)).await;

    let second = submit(&mut client, 1, 4).await;
    wait_for_state(&mut client, &second, JobState::Succeeded).await;
    let second_steps = format!("flotilla_job_steps_completed{{job_id=\"{second}\"}}");
    // Retention keeps the newest finished job only: the first one's series all go.
    let text = scrape_until(addr, |text| {
        sample(text, &second_steps) == Some(4.0) && !text.contains(&format!("job_id=\"{first}\""))
    })
    .await;
    assert_eq!(sample(&text, "flotilla_jobs{state=\"succeeded\"}"), Some(1.0), "{text}");
    assert!(
        text.contains(&format!("flotilla_job_step_duration_seconds_count{{job_id=\"{second}\"}} 4")),
        "{text}"
    );

    worker.stop().await;
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn metrics_needs_a_viewer_or_admin_token_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let coordinator = start(with_tls_and_tokens(config(dir.path()), dir.path(), &pki)).await;
    let addr = coordinator.local_addr();
    let tls = || Some(pki.client());

    let (status, _, body) = scrape_h2(addr, tls(), None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = scrape_h2(addr, tls(), Some("not-a-token-0123456789abc")).await;
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = scrape_h2(addr, tls(), Some(WORKER)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("viewer") && !body.contains(WORKER), "{body}");
    for token in [VIEWER, ADMIN] {
        let (status, content_type, text) = scrape_h2(addr, tls(), Some(token)).await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        assert!(text.contains("# TYPE flotilla_jobs gauge"), "{text}");
        assert!(!text.contains(token));
    }
    let (_, _, text) = scrape_h2(addr, tls(), Some(VIEWER)).await;
    let refused =
        |code: &str| format!("flotilla_grpc_refused_requests_total{{method=\"metrics\",code=\"{code}\"}}");
    assert_eq!(sample(&text, &refused("unauthenticated")), Some(2.0), "{text}");
    assert_eq!(sample(&text, &refused("permission_denied")), Some(1.0), "{text}");

    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_real_prometheus_scrapes_a_finished_job_over_tls() {
    let Some(prometheus) = tool("prometheus") else { return };
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let coordinator = start(with_tls_and_tokens(config(dir.path()), dir.path(), &pki)).await;
    let addr = coordinator.local_addr();
    let worker_auth = auth(Some(pki.client()), Some(WORKER));
    let workers = [
        FakeWorker::start(addr, &worker_auth, "w-0", None).await,
        FakeWorker::start(addr, &worker_auth, "w-1", None).await,
    ];
    let mut client = jobs(addr, &auth(Some(pki.client()), Some(ADMIN))).await;
    const STEPS: u64 = 5;
    let job = submit(&mut client, 2, STEPS).await;
    wait_for_state(&mut client, &job, JobState::Succeeded).await;

    let token_file = dir.path().join("prometheus-token");
    std::fs::write(&token_file, VIEWER).unwrap();
    let mut server = Prometheus::start(&prometheus, addr, &pki.path("ca.pem"), &token_file);
    server.wait_for(&format!("flotilla_job_steps_completed{{job_id=\"{job}\"}}"), &STEPS.to_string()).await;
    server.wait_for("flotilla_jobs{state=\"succeeded\"}", "1").await;
    server.wait_for("up{job=\"flotilla\"}", "1").await;
    // And over HTTP/1.1 on the same TLS port.
    server.wait_for("up{job=\"flotilla-http1\"}", "1").await;
    server
        .wait_for(
            &format!("flotilla_job_steps_completed{{job_id=\"{job}\",job=\"flotilla-http1\"}}"),
            &STEPS.to_string(),
        )
        .await;
    server.wait_for(&format!("flotilla_job_loss{{job_id=\"{job}\"}}"), &loss(STEPS).to_string()).await;
    drop(server);

    for worker in workers {
        worker.stop().await;
    }
    coordinator.shutdown().await.unwrap();
}
