//! TLS and role tokens on the coordinator's port, over real gRPC on loopback with real
//! certificates made here (rcgen) and real tonic clients: TLS and mutual TLS, every RPC of
//! the role table for every role, no token, a token file changed under a running
//! coordinator, the listening rule beyond loopback, and files that do not load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_coordinator::service::auth::{
    Access, BearerToken, ClientAuth, ClientTls, RPCS, Role, ServerTls,
};
use flotilla_coordinator::service::{
    CoordinatorConfig, CoordinatorHandle, ServiceError, bind_and_serve, serve,
};
use flotilla_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use flotilla_proto::v1::job_service_client::JobServiceClient;
use flotilla_proto::v1::{
    CancelJobRequest, GetJobRequest, GetStepTimelineRequest, JobState, ListJobsRequest, ListWorkersRequest,
    SubmitJobRequest, WatchJobRequest, WorkerInfo, WorkerMessage,
};
use prost::Message;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const ADMIN: &str = "admin-0123456789abcdef";
const VIEWER: &str = "viewer-0123456789abcdef";
const WORKER: &str = "worker-0123456789abcdef";

// ---------------------------------------------------------------------------------------
// Certificates

/// A CA and what it signed, as PEM files in a directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA (`ca.pem`), a server certificate for `localhost` and 127.0.0.1 (`server.pem`,
    /// `server.key`) and a client certificate (`client.pem`, `client.key`), all signed by
    /// the CA; `prefix` names the files so that two CAs can share nothing.
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.distinguished_name.push(DnType::CommonName, "flotilla test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        for (name, sans, usage) in [
            (
                "server",
                vec!["localhost".to_string(), "127.0.0.1".to_string()],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            ("client", vec!["worker-1".to_string()], ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &ca).unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server(&self, mutual: bool) -> ServerTls {
        ServerTls {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client_ca: mutual.then(|| self.path("ca.pem")),
        }
    }

    fn client(&self, with_cert: bool) -> ClientTls {
        ClientTls {
            ca: self.path("ca.pem"),
            identity: with_cert.then(|| (self.path("client.pem"), self.path("client.key"))),
            domain: None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Coordinator and clients

fn config(dir: &Path) -> CoordinatorConfig {
    CoordinatorConfig {
        heartbeat_interval: Duration::from_millis(50),
        heartbeat_timeout: Duration::from_millis(300),
        ..CoordinatorConfig::new(dir.join("state"))
    }
}

async fn start(config: CoordinatorConfig) -> CoordinatorHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve(config, listener).await.expect("the coordinator starts")
}

fn token_file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("tokens");
    std::fs::write(&path, text).unwrap();
    path
}

fn all_tokens() -> String {
    format!("# test tokens\nadmin {ADMIN}\nviewer {VIEWER}\nworker {WORKER}\n")
}

fn auth(tls: Option<ClientTls>, token: Option<&str>) -> ClientAuth {
    ClientAuth { tls, token: token.map(|t| BearerToken::new(t).unwrap()) }
}

fn url(addr: SocketAddr, tls: bool) -> String {
    format!("{}://{addr}", if tls { "https" } else { "http" })
}

async fn channel(addr: SocketAddr, auth: &ClientAuth) -> Result<tonic::transport::Channel, String> {
    let endpoint = auth.endpoint(&url(addr, auth.tls.is_some())).map_err(|e| e.to_string())?;
    endpoint.connect().await.map_err(|e| format!("{e:?}"))
}

async fn jobs(
    addr: SocketAddr,
    auth: &ClientAuth,
) -> JobServiceClient<flotilla_coordinator::service::auth::AuthChannel> {
    JobServiceClient::with_interceptor(channel(addr, auth).await.expect("connects"), auth.interceptor())
}

async fn workers(
    addr: SocketAddr,
    auth: &ClientAuth,
) -> CoordinatorServiceClient<flotilla_coordinator::service::auth::AuthChannel> {
    CoordinatorServiceClient::with_interceptor(
        channel(addr, auth).await.expect("connects"),
        auth.interceptor(),
    )
}

fn pending_job() -> SubmitJobRequest {
    SubmitJobRequest {
        name: "auth-test".into(),
        config_toml: "seed = 0\nsteps = 2\nbatch_size = 4\nseq_len = 8\n\n[model]\npreset = \"tiny\"\n"
            .into(),
        workers: 1,
        output_dir: String::new(),
        resume_from: String::new(),
    }
}

/// Calls the RPC at `path` as `auth` with a request that changes nothing when refused and
/// little when allowed (empty ids, an empty worker description): its status code, `Ok`
/// as [`Code::Ok`].
async fn call(path: &str, addr: SocketAddr, auth: &ClientAuth) -> Code {
    let code = |result: Result<(), tonic::Status>| result.map_or_else(|s| s.code(), |()| Code::Ok);
    let mut jobs = jobs(addr, auth).await;
    match path.rsplit('/').next().unwrap() {
        "Register" => code(workers(addr, auth).await.register(WorkerInfo::default()).await.map(drop)),
        "Session" => {
            // A first message that is not SessionOpen: refused by the handler, if reached.
            let first = tokio_stream::iter([WorkerMessage { body: None }]);
            code(workers(addr, auth).await.session(first).await.map(drop))
        }
        "SubmitJob" => {
            let mut empty = pending_job();
            empty.config_toml.clear();
            code(jobs.submit_job(empty).await.map(drop))
        }
        "CancelJob" => code(jobs.cancel_job(CancelJobRequest::default()).await.map(drop)),
        "GetJob" => code(jobs.get_job(GetJobRequest::default()).await.map(drop)),
        "ListJobs" => code(jobs.list_jobs(ListJobsRequest {}).await.map(drop)),
        "WatchJob" => code(jobs.watch_job(WatchJobRequest::default()).await.map(drop)),
        "ListWorkers" => code(jobs.list_workers(ListWorkersRequest {}).await.map(drop)),
        "GetStepTimeline" => code(jobs.get_step_timeline(GetStepTimelineRequest::default()).await.map(drop)),
        other => panic!("the test has no call for the RPC {other}: add one"),
    }
}

// ---------------------------------------------------------------------------------------
// TLS

#[tokio::test]
async fn tls_serves_and_plaintext_to_the_tls_port_fails() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let coordinator = start(CoordinatorConfig { tls: Some(pki.server(false)), ..config(dir.path()) }).await;
    let addr = coordinator.local_addr();

    let mut client = jobs(addr, &auth(Some(pki.client(false)), None)).await;
    assert!(client.list_jobs(ListJobsRequest {}).await.unwrap().into_inner().jobs.is_empty());
    let job = client.submit_job(pending_job()).await.unwrap().into_inner();
    assert_eq!(job.state(), JobState::Pending);

    // Plaintext HTTP/2 to the TLS port: the handshake is garbage to the server.
    let plain = auth(None, None);
    let refused = match channel(addr, &plain).await {
        Err(_) => true,
        Ok(channel) => JobServiceClient::new(channel).list_jobs(ListJobsRequest {}).await.is_err(),
    };
    assert!(refused, "a plaintext client was served on the TLS port");

    // A client that trusts another CA refuses the coordinator's certificate.
    let stranger = Pki::new();
    let other_ca = auth(Some(stranger.client(false)), None);
    let refused = match channel(addr, &other_ca).await {
        Err(_) => true,
        Ok(channel) => JobServiceClient::new(channel).list_jobs(ListJobsRequest {}).await.is_err(),
    };
    assert!(refused, "a client trusting another CA accepted the coordinator");

    // The name the certificate carries is checked: it has no `example.com`.
    let wrong_name = ClientTls { domain: Some("example.com".into()), ..pki.client(false) };
    let refused = match channel(addr, &auth(Some(wrong_name), None)).await {
        Err(_) => true,
        Ok(channel) => JobServiceClient::new(channel).list_jobs(ListJobsRequest {}).await.is_err(),
    };
    assert!(refused, "a certificate for another name was accepted");
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn mutual_tls_refuses_a_client_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let coordinator = start(CoordinatorConfig { tls: Some(pki.server(true)), ..config(dir.path()) }).await;
    let addr = coordinator.local_addr();

    let mut client = jobs(addr, &auth(Some(pki.client(true)), None)).await;
    client.list_jobs(ListJobsRequest {}).await.expect("a client with a certificate is served");

    let stranger = Pki::new();
    let foreign = ClientTls {
        identity: Some((stranger.path("client.pem"), stranger.path("client.key"))),
        ..pki.client(false)
    };
    for (what, tls) in
        [("no client certificate", pki.client(false)), ("a certificate of another CA", foreign)]
    {
        // The files load: the refusal is the server's, in the handshake or the first call.
        let endpoint = auth(Some(tls), None).endpoint(&url(addr, true)).expect("the client's files load");
        let refused = match endpoint.connect().await {
            Err(_) => true,
            Ok(channel) => JobServiceClient::new(channel).list_jobs(ListJobsRequest {}).await.is_err(),
        };
        assert!(refused, "a client with {what} was served");
    }
    coordinator.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Tokens and roles

#[tokio::test]
async fn every_rpc_checks_its_role_and_a_refused_call_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let tokens = token_file(dir.path(), &all_tokens());
    let coordinator = start(CoordinatorConfig {
        tls: Some(pki.server(false)),
        token_file: Some(tokens),
        ..config(dir.path())
    })
    .await;
    let addr = coordinator.local_addr();
    let tls = || Some(pki.client(false));

    // The table covers every RPC the coordinator serves.
    let descriptors = prost_types::FileDescriptorSet::decode(flotilla_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptors decode");
    let mut served = Vec::new();
    for file in &descriptors.file {
        for service in &file.service {
            for method in &service.method {
                served.push(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
            }
        }
    }
    served.sort();
    let mut table: Vec<String> = RPCS.iter().map(|(path, _)| path.to_string()).collect();
    table.sort();
    assert_eq!(table, served, "the role table and the served RPCs differ");

    for (path, access) in RPCS {
        for (role, token) in [(Role::Admin, ADMIN), (Role::Viewer, VIEWER), (Role::Worker, WORKER)] {
            let code = call(path, addr, &auth(tls(), Some(token))).await;
            if access.allows(role) {
                assert!(
                    !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                    "{role} was refused {path}: {code:?}"
                );
            } else {
                assert_eq!(code, Code::PermissionDenied, "{role} calling {path}");
            }
        }
        assert_eq!(
            call(path, addr, &auth(tls(), None)).await,
            Code::Unauthenticated,
            "no token calling {path}"
        );
        let unknown = "not-a-token-0123456789abc";
        assert_eq!(
            call(path, addr, &auth(tls(), Some(unknown))).await,
            Code::Unauthenticated,
            "an unknown token calling {path}"
        );
    }
    assert_eq!(RPCS.iter().filter(|(_, access)| *access == Access::Admin).count(), 2);

    // Refused calls change nothing: the job an admin submitted stays as it was.
    let mut admin = jobs(addr, &auth(tls(), Some(ADMIN))).await;
    let job = admin.submit_job(pending_job()).await.unwrap().into_inner();
    for token in [VIEWER, WORKER] {
        let mut client = jobs(addr, &auth(tls(), Some(token))).await;
        let status = client
            .cancel_job(CancelJobRequest { job_id: job.job_id.clone(), reason: "not allowed".into() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(!status.message().contains(token), "{}", status.message());
        let status = client.submit_job(pending_job()).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    let listed = admin.list_jobs(ListJobsRequest {}).await.unwrap().into_inner().jobs;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state(), JobState::Pending);
    assert_eq!(listed[0].revision, job.revision, "a refused call wrote to the job");

    // Health stays open to probes, with and without a token.
    let mut health = HealthClient::new(channel(addr, &auth(tls(), None)).await.unwrap());
    let answer = health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(answer.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn reflection_stays_open_with_tokens() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_response::MessageResponse};

    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path(), &all_tokens());
    let coordinator = start(CoordinatorConfig { token_file: Some(tokens), ..config(dir.path()) }).await;
    let addr = coordinator.local_addr();
    let mut reflection = ServerReflectionClient::new(channel(addr, &auth(None, None)).await.unwrap());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers =
        reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().expect("an answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}")
    };
    assert!(list.service.iter().any(|s| s.name == "flotilla.v1.JobService"), "{list:?}");
    // Without TLS here, the token still decides.
    assert_eq!(
        call("/flotilla.v1.JobService/ListJobs", addr, &auth(None, None)).await,
        Code::Unauthenticated
    );
    assert_eq!(call("/flotilla.v1.JobService/ListJobs", addr, &auth(None, Some(VIEWER))).await, Code::Ok);
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_changed_token_file_takes_effect_at_the_next_call() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path(), &format!("admin {ADMIN}\n"));
    let coordinator =
        start(CoordinatorConfig { token_file: Some(tokens.clone()), ..config(dir.path()) }).await;
    let addr = coordinator.local_addr();
    let list = "/flotilla.v1.JobService/ListJobs";
    assert_eq!(call(list, addr, &auth(None, Some(ADMIN))).await, Code::Ok);
    assert_eq!(call(list, addr, &auth(None, Some(VIEWER))).await, Code::Unauthenticated);

    // Edited in place: a viewer token added.
    std::fs::write(&tokens, format!("admin {ADMIN}\nviewer {VIEWER}\n")).unwrap();
    assert_eq!(call(list, addr, &auth(None, Some(VIEWER))).await, Code::Ok);

    // Replaced by rename: the admin token revoked, the viewer's role changed.
    let next = dir.path().join("tokens.new");
    std::fs::write(&next, format!("worker {VIEWER}\nadmin {WORKER}\n")).unwrap();
    std::fs::rename(&next, &tokens).unwrap();
    assert_eq!(call(list, addr, &auth(None, Some(ADMIN))).await, Code::Unauthenticated);
    assert_eq!(call(list, addr, &auth(None, Some(VIEWER))).await, Code::PermissionDenied);
    assert_eq!(call(list, addr, &auth(None, Some(WORKER))).await, Code::Ok);

    // A version that does not parse leaves the last good one in force.
    std::fs::write(&tokens, "admin\n").unwrap();
    assert_eq!(call(list, addr, &auth(None, Some(WORKER))).await, Code::Ok);
    assert_eq!(call(list, addr, &auth(None, Some(ADMIN))).await, Code::Unauthenticated);
    coordinator.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// The listening rule and bad files

#[tokio::test]
async fn beyond_loopback_needs_tls_and_tokens_or_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let tokens = token_file(dir.path(), &all_tokens());
    let open = CoordinatorConfig { listen: "0.0.0.0:0".parse().unwrap(), ..config(dir.path()) };
    for (config, missing) in [
        (open.clone(), "neither TLS nor a token file"),
        (CoordinatorConfig { tls: Some(pki.server(false)), ..open.clone() }, "no token file"),
        (CoordinatorConfig { token_file: Some(tokens.clone()), ..open.clone() }, "no TLS"),
    ] {
        let refused = bind_and_serve(config).await.unwrap_err();
        assert!(matches!(refused, ServiceError::RemoteListenRefused { .. }), "{refused:?}");
        let text = refused.to_string();
        assert!(
            text.contains("0.0.0.0:0") && text.contains(missing) && text.contains("--insecure"),
            "{text}"
        );
    }

    let secured =
        CoordinatorConfig { tls: Some(pki.server(false)), token_file: Some(tokens), ..open.clone() };
    let coordinator = bind_and_serve(secured).await.expect("TLS and tokens may listen anywhere");
    assert!(coordinator.local_addr().ip().is_unspecified());
    coordinator.shutdown().await.unwrap();

    let coordinator = bind_and_serve(CoordinatorConfig { insecure: true, ..open }).await.expect("--insecure");
    assert!(coordinator.local_addr().ip().is_unspecified());
    coordinator.shutdown().await.unwrap();

    // Loopback needs neither.
    let coordinator = bind_and_serve(config(dir.path())).await.unwrap();
    assert!(coordinator.local_addr().ip().is_loopback());
    coordinator.shutdown().await.unwrap();
}

#[tokio::test]
async fn files_that_do_not_load_are_errors_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let start_error = |config: CoordinatorConfig| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        serve(config, listener).await.expect_err("the coordinator refuses to start").to_string()
    };

    let bad = token_file(dir.path(), &format!("# tokens\nadmin {ADMIN}\nroot {VIEWER}\n"));
    let error = start_error(CoordinatorConfig { token_file: Some(bad.clone()), ..config(dir.path()) }).await;
    assert!(error.contains(&format!("{}:3:", bad.display())) && error.contains("not a role"), "{error}");
    assert!(!error.contains(VIEWER), "{error}");

    let missing = dir.path().join("absent-tokens");
    let error =
        start_error(CoordinatorConfig { token_file: Some(missing.clone()), ..config(dir.path()) }).await;
    assert!(error.contains(&missing.display().to_string()), "{error}");

    let absent_cert = ServerTls { cert: dir.path().join("absent.pem"), ..pki.server(false) };
    let error = start_error(CoordinatorConfig { tls: Some(absent_cert), ..config(dir.path()) }).await;
    assert!(error.contains("TLS certificate") && error.contains("absent.pem"), "{error}");

    let cert_as_key = ServerTls { key: pki.path("server.pem"), ..pki.server(false) };
    let error = start_error(CoordinatorConfig { tls: Some(cert_as_key), ..config(dir.path()) }).await;
    assert!(
        error.contains("TLS key") && error.contains("server.pem") && error.contains("PRIVATE KEY"),
        "{error}"
    );

    let key_as_ca = ServerTls { client_ca: Some(pki.path("client.key")), ..pki.server(false) };
    let error = start_error(CoordinatorConfig { tls: Some(key_as_ca), ..config(dir.path()) }).await;
    assert!(error.contains("client CA") && error.contains("client.key"), "{error}");

    let other_key = ServerTls { key: pki.path("client.key"), ..pki.server(false) };
    let error = start_error(CoordinatorConfig { tls: Some(other_key), ..config(dir.path()) }).await;
    assert!(error.contains("server.pem") && error.contains("client.key"), "{error}");

    // The clients' side: a URL and TLS settings that disagree, and a bad CA file.
    let error = auth(None, None).endpoint("https://127.0.0.1:1").unwrap_err().to_string();
    assert!(error.contains("--tls-ca"), "{error}");
    let error = auth(Some(pki.client(false)), None).endpoint("http://127.0.0.1:1").unwrap_err().to_string();
    assert!(error.contains("https://"), "{error}");
    let bad_ca = ClientTls { ca: pki.path("server.key"), ..pki.client(false) };
    let error = auth(Some(bad_ca), None).endpoint("127.0.0.1:1").unwrap_err().to_string();
    assert!(error.contains("server.key") && error.contains("CERTIFICATE"), "{error}");
    assert!(BearerToken::new("has space").is_err() && BearerToken::new("").is_err());
    assert_eq!(format!("{:?}", BearerToken::new(ADMIN).unwrap()), "BearerToken(<redacted>)");
}
