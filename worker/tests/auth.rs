//! The real agent ([`run_worker`], dialing TCP) against the real coordinator on a loopback
//! port with mutual TLS and a token file, certificates made here with rcgen: a worker with
//! a worker token and a client certificate registers and runs a job to success; one with
//! a viewer token, or none, is refused for good; TLS files that do not load are option
//! errors naming the file.

mod common;

use std::path::Path;
use std::time::Duration;

use flotilla_coordinator::service::auth::{BearerToken, ClientAuth, ClientTls, ServerTls};
use flotilla_coordinator::service::{CoordinatorConfig, CoordinatorHandle, serve};
use flotilla_proto::v1::job_service_client::JobServiceClient;
use flotilla_proto::v1::{GetJobRequest, JobState, SubmitJobRequest};
use flotilla_worker::agent::{AgentError, CoordinatorTls, WorkerOptions, WorkerToken, run_worker};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Generous: the machine running the suite may be small and shared.
const LIMIT: Duration = Duration::from_secs(120);
const ADMIN: &str = "admin-0123456789abcdef";
const VIEWER: &str = "viewer-0123456789abcdef";
const WORKER: &str = "worker-0123456789abcdef";

/// A CA (`ca.pem`), a server certificate for 127.0.0.1 (`server.pem`, `server.key`) and a
/// client certificate (`client.pem`, `client.key`) it signed, in `dir`.
fn make_pki(dir: &Path) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.distinguished_name.push(DnType::CommonName, "flotilla test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, san, usage) in [
        ("server", "127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth),
        ("client", "worker", ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![san.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

async fn start(dir: &Path) -> CoordinatorHandle {
    make_pki(dir);
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, format!("admin {ADMIN}\nviewer {VIEWER}\nworker {WORKER}\n")).unwrap();
    let config = CoordinatorConfig {
        heartbeat_interval: Duration::from_millis(50),
        heartbeat_timeout: Duration::from_millis(500),
        tls: Some(ServerTls {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            client_ca: Some(dir.join("ca.pem")),
        }),
        token_file: Some(tokens),
        allowed_roots: vec![dir.to_path_buf()],
        ..CoordinatorConfig::new(dir.join("state"))
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve(config, listener).await.expect("the coordinator starts")
}

fn client_tls(dir: &Path) -> CoordinatorTls {
    CoordinatorTls {
        ca: dir.join("ca.pem"),
        identity: Some((dir.join("client.pem"), dir.join("client.key"))),
        domain: None,
    }
}

/// The agent's options for the coordinator at `url`, over TLS as `dir`'s client, with
/// `token`.
fn options(url: &str, dir: &Path, token: Option<&str>) -> WorkerOptions {
    let mut options = WorkerOptions::new(url);
    options.tls = Some(client_tls(dir));
    options.token = token.map(|t| WorkerToken::new(t).unwrap());
    options.worker_id = Some("w0".into());
    options.allowed_roots = vec![dir.to_path_buf()];
    options.threads = Some(1);
    options.initial_backoff = Duration::from_millis(20);
    options.max_backoff = Duration::from_millis(200);
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_registers_over_mutual_tls_with_its_token_and_a_job_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(dir.path()).await;
    let addr = coordinator.local_addr();
    // A bare host:port with TLS settings means https://.
    let shutdown = CancellationToken::new();
    let worker =
        tokio::spawn(run_worker(options(&addr.to_string(), dir.path(), Some(WORKER)), shutdown.clone()));

    let auth = ClientAuth {
        tls: Some(ClientTls {
            ca: dir.path().join("ca.pem"),
            identity: Some((dir.path().join("client.pem"), dir.path().join("client.key"))),
            domain: None,
        }),
        token: Some(BearerToken::new(ADMIN).unwrap()),
    };
    let channel = auth.endpoint(&format!("https://{addr}")).unwrap().connect().await.unwrap();
    let mut jobs = JobServiceClient::with_interceptor(channel, auth.interceptor());
    let out = dir.path().join("out");
    let job = jobs
        .submit_job(SubmitJobRequest {
            name: "tls".into(),
            config_toml: common::small_run(3),
            workers: 1,
            output_dir: out.display().to_string(),
            resume_from: String::new(),
        })
        .await
        .expect("an admin submits")
        .into_inner();
    let ended = timeout(LIMIT, async {
        loop {
            let now = jobs.get_job(GetJobRequest { job_id: job.job_id.clone() }).await.unwrap().into_inner();
            if now.state().is_terminal() {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the job ends within the limit");
    assert_eq!(ended.state(), JobState::Succeeded, "{}", ended.reason);
    assert_eq!(ended.steps_done, 3);
    assert!(out.join("metrics.jsonl").exists());

    shutdown.cancel();
    timeout(LIMIT, worker).await.expect("the worker stops").expect("no panic").expect("a clean exit");
    coordinator.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_a_worker_token_is_refused_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start(dir.path()).await;
    let url = format!("https://{}", coordinator.local_addr());
    for (token, why) in
        [(Some(VIEWER), "may not call"), (Some(ADMIN), "may not call"), (None, "send `authorization: Bearer")]
    {
        let run = run_worker(options(&url, dir.path(), token), CancellationToken::new());
        let refused = timeout(LIMIT, run).await.expect("the worker gives up").unwrap_err();
        let AgentError::Refused(reason) = &refused else { panic!("not a refusal: {refused:?}") };
        assert!(reason.contains("Register") && reason.contains(why), "{token:?}: {reason}");
        for secret in [VIEWER, ADMIN] {
            assert!(!reason.contains(secret), "{reason}");
        }
    }
    coordinator.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_options_that_do_not_load_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let shutdown = CancellationToken::new;
    let cases = [
        (
            "tls_ca",
            CoordinatorTls { ca: dir.path().join("absent.pem"), ..client_tls(dir.path()) },
            "absent.pem",
        ),
        (
            "tls_ca",
            CoordinatorTls { ca: dir.path().join("client.key"), ..client_tls(dir.path()) },
            "client.key",
        ),
        (
            "tls_key",
            CoordinatorTls {
                identity: Some((dir.path().join("client.pem"), dir.path().join("client.pem"))),
                ..client_tls(dir.path())
            },
            "client.pem",
        ),
    ];
    for (option, tls, file) in cases {
        let mut options = options("127.0.0.1:1", dir.path(), Some(WORKER));
        options.tls = Some(tls);
        let error = run_worker(options, shutdown()).await.unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, AgentError::InvalidOption { option: o, .. } if o == option), "{text}");
        assert!(text.contains(file), "{text}");
    }
    let mut plain_https = options("https://127.0.0.1:1", dir.path(), None);
    plain_https.tls = None;
    let error = run_worker(plain_https, shutdown()).await.unwrap_err().to_string();
    assert!(error.contains("tls_ca"), "{error}");
    assert!(WorkerToken::new("two words").is_err());
    assert_eq!(format!("{:?}", WorkerToken::new(WORKER).unwrap()), "WorkerToken(<redacted>)");
}
