//! The control plane over gRPC: the `flotilla.v1` `CoordinatorService` (workers) and
//! `JobService` (clients), the standard `grpc.health.v1.Health` service and server
//! reflection, served by tonic on top of a set of tokio actors and the [`StateStore`].
//!
//! # Actors
//!
//! Every long-lived thing is a tokio task that owns its state and is driven through a
//! mailbox; nothing is shared behind a lock, so no lock is ever held across an await.
//!
//! - The **cluster actor** (`cluster`) is membership, failure detector, scheduler and
//!   supervisor in one: it owns the table of registered workers with their heartbeat
//!   deadlines, the FIFO queue of pending jobs, and the tasks of every session and job
//!   actor (two `JoinSet`s). It is the single authority on liveness: a worker is alive
//!   exactly while it has a table entry, and it loses it when its deadline passes (it
//!   registered but opened no session, or stopped heartbeating) or its stream breaks.
//! - A **session actor** (`session`) per connected worker owns that worker's
//!   `Session` stream: it forwards heartbeats to the cluster actor, acknowledgements and
//!   reports to the job that owns the worker, and commands from that job to the worker. It
//!   reports a broken or closed stream to the cluster actor at once.
//! - A **job actor** (`job`) per active job owns the job's state machine and is the only
//!   writer of its durable record and events; it decides what a failure means (today: abort
//!   the step on the survivors and fail the job; with checkpoints: re-rendezvous and
//!   resume).
//!   A pipeline job holds each rank to its compiled instruction stream and keeps what the
//!   ranks executed for `GetStepTimeline` (`timeline`).
//! - The **history compactor** (`history`) keeps the store's watch history to the last
//!   `history_retention` revisions, so the store's memory and log stay bounded.
//! - The **metrics feed** (`metrics`) follows the store (a list, then a watch of every
//!   key) into the Prometheus registry that `GET /metrics` serves on the same port; the
//!   job actors, the store wrapper and the auth layer add to it directly.
//! - The **job retainer** (`retention`) deletes the finished jobs the retention policy
//!   does not keep (the newest `max_jobs`, those younger than `max_age`), records and
//!   events, which the compactor then compacts out.
//!
//! The messages the actors send each other and the handles that send them live apart from
//! the actors, in `messages`: `cluster` spawns the `session` and `job` actors, and those
//! reach the cluster actor and each other only through the types there, so the modules
//! depend on each other without a cycle (`cluster → job, session → messages`).
//!
//! Before any handler, [`auth`] has checked the caller: TLS on the port (optionally
//! mutual), then a tower layer in front of every service that looks the call's bearer
//! token up in the token file and its RPC in the one role table, and takes a `SubmitJob`
//! or `Register` from its caller's rate limit, so a refused call reaches no handler and
//! changes nothing. A request that does not decode is `INVALID_ARGUMENT` (the proto
//! crate's codec).
//!
//! The gRPC handlers (`grpc`) are thin: they validate input, ask an actor through its
//! mailbox and await a oneshot reply, or read the store directly (job reads and watches,
//! which the store serves consistently without the actors).
//!
//! ## Mailboxes and why they cannot deadlock
//!
//! Input that comes from the network (gRPC handlers, worker messages forwarded by
//! sessions) enters through **bounded** mailboxes and is awaited, so a flood pushes back on
//! the sender's stream instead of growing memory. Messages the coordinator generates itself
//! and sends "downwards" (cluster → job, cluster → session, job → session) go through
//! **unbounded** mailboxes and are never awaited. The cluster actor therefore never waits
//! on anyone, and every chain of awaited sends ends at it or at the store, both of which
//! always make progress: there is no cycle of tasks waiting on each other.
//!
//! ## Shutdown
//!
//! [`CoordinatorHandle::shutdown`] cancels one `CancellationToken` that every task
//! watches: the server stops accepting and drains, sessions and watches end their streams
//! with `UNAVAILABLE`, job actors stop *without writing anything* (so the store looks
//! exactly as after a crash, and a restart exercises the same recovery), the cluster actor
//! joins all its children, and the store is closed.
//!
//! # Durable job state
//!
//! A job is the key `jobs/<id>` (a JSON record, whose `mod_revision` is the job's
//! revision) and one key per event, `events/<id>/<seq>` (an encoded `JobEvent`).
//! Every event is one transaction writing the event and the updated record together, so an
//! event's revision is the store's revision of that write: revisions are strictly
//! increasing, one per event, and survive restarts. `WatchJob` is a store watch on
//! `events/<id>/`, so resuming from a revision has the store's exactly-once guarantee, and
//! a revision below the store's compaction point is `OUT_OF_RANGE` (Kubernetes' 410 Gone).
//! Each write is guarded by a compare-and-swap on the record's revision, so a job actor
//! that is no longer the record's only writer (two coordinators on one etcd) stops instead
//! of overwriting.
//!
//! On start the coordinator reads every job: pending jobs wait for workers again; a job
//! that was in Rendezvous, Running or Recovering lost its workers' sessions with the old
//! process and recovers with the cause "coordinator restarted": once enough workers have
//! registered again (workers re-register by themselves when their session breaks), it
//! resumes from its newest committed checkpoint (see `job`). With no restarts left it
//! fails with that reason.
//!
//! # Invariants
//!
//! - A job's state changes only along [`may_transition`]'s edges, and only its job
//!   actor writes it.
//! - A worker belongs to at most one job, and only while it is alive.
//! - A job message (step report, acknowledgement, error, checkpoint shard, finish) changes
//!   a job only if it comes from the session that holds its worker's rank and names the
//!   job's current assignment epoch (`job`'s `reporter`); anything else is refused and
//!   logged.
//! - Bad input from the network gets a gRPC status naming the field at fault; it never
//!   panics the coordinator or stops it serving others.

pub mod auth;
mod cluster;
mod config;
mod error;
mod grpc;
mod history;
mod ids;
mod job;
mod messages;
pub mod metrics;
mod records;
mod retention;
mod session;
mod timeline;
mod watch;

pub use config::{
    Admission, CoordinatorConfig, DEFAULT_MAX_JOB_WORKERS, JobPolicy, JobSpec, MAX_CONFIG_BYTES,
    MAX_JOB_CHUNKS, MAX_JOB_WORKERS, job_policy, placement_of, validate_submit,
};
pub use error::ServiceError;
pub use job::may_transition;
pub use metrics::Metrics;
pub use retention::JobRetention;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::listen::Listen;
use flotilla_proto::v1::coordinator_service_server::CoordinatorServiceServer;
use flotilla_proto::v1::job_service_server::JobServiceServer;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::{Connected, TcpIncoming};

use crate::store::{AnyStore, Revision, StateStore, StoreError};

use self::auth::{AuthError, AuthLayer, RateLimiter, TokenStore};
use self::grpc::{CoordinatorApi, JobApi};
use self::metrics::TimedStore;

/// How long [`CoordinatorHandle::shutdown`] lets the server drain its connections before
/// it drops them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

type StoreCloser = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// An error with its sources, on one line (tonic's transport errors say little at the top).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

pub use flotilla_proto::listen::is_loopback;

/// The listening rule (`flotilla_proto::listen`, shared with the workers' data plane): a
/// non-loopback address needs TLS and a token file, unless the operator said `insecure`,
/// which is then warned about at every start.
fn check_listen(addr: SocketAddr, config: &CoordinatorConfig) -> Result<(), ServiceError> {
    let missing = match (config.tls.is_some(), config.token_file.is_some()) {
        (true, true) => None,
        (false, false) => Some("neither TLS nor a token file"),
        (false, true) => Some("no TLS"),
        (true, false) => Some("no token file"),
    };
    match flotilla_proto::listen::check_listen(addr, missing, config.insecure) {
        Listen::Allowed => Ok(()),
        Listen::Insecure { missing } => {
            tracing::warn!(
                %addr,
                "--insecure: serving with {missing}; whoever reaches this port can drive the cluster \
                 and read what it is sent"
            );
            Ok(())
        }
        Listen::Refused { missing } => Err(ServiceError::RemoteListenRefused { addr, missing }),
    }
}

/// Binds `config.listen` and serves on it: the usual entry point. Refuses a non-loopback
/// address without TLS and a token file unless `config.insecure` is set.
pub async fn bind_and_serve(config: CoordinatorConfig) -> Result<CoordinatorHandle, ServiceError> {
    config.validate()?;
    check_listen(config.listen, &config)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServiceError::Bind { addr: config.listen, source })?;
    serve(config, listener).await
}

/// Serves on a bound listener, with the store `config.store` names (a file store or etcd),
/// which the returned handle closes on shutdown. Refuses a listener on a non-loopback address
/// without TLS and a token file unless `config.insecure` is set (`config.listen` is not
/// used).
pub async fn serve(
    config: CoordinatorConfig,
    listener: TcpListener,
) -> Result<CoordinatorHandle, ServiceError> {
    config.validate()?;
    let local_addr =
        listener.local_addr().map_err(|source| ServiceError::Bind { addr: config.listen, source })?;
    check_listen(local_addr, &config)?;
    let store = AnyStore::open(&config.store).await?;
    // Heartbeats and commands are small messages: do not let Nagle hold them back.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let closer = {
        let store = store.clone();
        Box::pin(async move { store.close().await }) as StoreCloser
    };
    match start(config, store.clone(), incoming, local_addr, Some(closer)).await {
        Ok(handle) => Ok(handle),
        Err(e) => {
            if let Err(close) = store.close().await {
                tracing::warn!(error = %close, "closing the state store after a failed start");
            }
            Err(e)
        }
    }
}

/// Serves on any stream of connections (e.g. turmoil's simulated TCP, wrapped in a type
/// implementing [`Connected`]), with a store the caller owns and closes. `local_addr` is
/// only reported by [`CoordinatorHandle::local_addr`]; the loopback policy is the
/// caller's, since the transport is. TLS and tokens apply as configured.
pub async fn serve_with_incoming<S, I, IO, IE>(
    config: CoordinatorConfig,
    store: S,
    incoming: I,
    local_addr: SocketAddr,
) -> Result<CoordinatorHandle<S>, ServiceError>
where
    S: StateStore + Clone + 'static,
    I: Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    config.validate()?;
    start(config, store, incoming, local_addr, None).await
}

async fn start<S, I, IO, IE>(
    config: CoordinatorConfig,
    store: S,
    incoming: I,
    local_addr: SocketAddr,
    closer: Option<StoreCloser>,
) -> Result<CoordinatorHandle<S>, ServiceError>
where
    S: StateStore + Clone + 'static,
    I: Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    // The TLS files and the token file are read before anything starts, so a bad one is
    // an error naming it and nothing was served.
    let tls = config.tls.as_ref().map(|tls| tls.load().map(|loaded| (tls.clone(), loaded))).transpose()?;
    let tokens = match &config.token_file {
        Some(path) => {
            let store = TokenStore::open(path)?;
            tracing::info!(path = %path.display(), tokens = ?store.current(), "token file loaded");
            Some(Arc::new(store))
        }
        None => None,
    };
    let mut builder = Server::builder();
    if let Some((files, loaded)) = tls {
        builder = builder.tls_config(loaded).map_err(|e| AuthError::Tls {
            cert: files.cert,
            key: files.key,
            reason: error_chain(&e),
        })?;
    }
    let admission = Arc::new(Admission::new(&config)?);
    let config = Arc::new(config);
    let cancel = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    // The service's own store handle: every operation timed. The handle keeps the plain one.
    let timed = TimedStore::new(store.clone(), metrics.clone());
    // Jobs interrupted by the previous process are settled before the first request is
    // served, so no client ever sees a state nobody is driving.
    let (cluster, cluster_task) =
        cluster::start(config.clone(), timed.clone(), metrics.clone(), cancel.clone()).await?;

    let coordinator =
        CoordinatorServiceServer::new(CoordinatorApi::new(cluster.clone(), config.clone(), cancel.clone()))
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes);
    let jobs = JobServiceServer::new(JobApi::new(cluster.clone(), timed.clone(), admission, cancel.clone()))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServiceServer<CoordinatorApi>>().await;
    health.set_serving::<JobServiceServer<JobApi<TimedStore<S>>>>().await;
    // Both reflection versions: `grpc.reflection.v1` for current grpcurl, and `v1alpha`,
    // which older grpcurl, Postman, Evans, BloomRPC and grpcio-reflection clients call.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(flotilla_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Each version lists both, as both are served.
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
    };
    let reflection_error = |e: tonic_reflection::server::Error| {
        cancel.cancel();
        ServiceError::Reflection(e.to_string())
    };
    let reflection = reflection_builder().build_v1().map_err(reflection_error)?;
    let reflection_v1alpha = reflection_builder().build_v1alpha().map_err(reflection_error)?;

    let mut routes = Routes::builder();
    routes
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(coordinator)
        .add_service(jobs);
    // `GET /metrics` beside the gRPC services, on the same port.
    let routes =
        Routes::from(metrics::route(routes.routes().into_axum_router(), metrics.clone(), cluster.clone()));
    let server = builder
        // Keepalive pings find a dead TCP peer even between heartbeats.
        .http2_keepalive_interval(Some(config.heartbeat_interval.max(Duration::from_secs(1))))
        .http2_keepalive_timeout(Some(config.heartbeat_timeout.max(Duration::from_secs(1))))
        // HTTP/1.1 too, for Prometheus (which scrapes over HTTP/1.1 unless told otherwise);
        // gRPC clients speak HTTP/2 and are told apart by the connection preface.
        .accept_http1(true)
        // In front of every route: a refused call reaches no handler.
        .layer(AuthLayer::new(
            tokens,
            Arc::new(RateLimiter::new(config.rate_limits.clone())),
            metrics.clone(),
        ))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, cancel.clone().cancelled_owned());
    // Until the feed has listed the jobs (a moment after start), the job series are empty.
    let feeder = tokio::spawn(metrics::feeder(timed.clone(), metrics.clone(), cancel.clone()));
    let server_task = tokio::spawn(server);
    let compactor = (config.history_retention > 0).then(|| {
        tokio::spawn(history::compactor(
            timed.clone(),
            config.history_retention,
            config.compaction_interval,
            cancel.clone(),
        ))
    });
    let retainer = tokio::spawn(retention::retainer(
        timed.clone(),
        config.retention.clone(),
        config.compaction_interval,
        cancel.clone(),
    ));
    tracing::info!(
        %local_addr,
        store = %config.store,
        tls = config.tls.is_some(),
        mutual_tls = config.tls.as_ref().is_some_and(|tls| tls.client_ca.is_some()),
        tokens = config.token_file.is_some(),
        "coordinator serving"
    );

    Ok(CoordinatorHandle {
        local_addr,
        store,
        cancel,
        health,
        cluster,
        server: Some(server_task),
        cluster_task: Some(cluster_task),
        compactor,
        retainer: Some(retainer),
        feeder: Some(feeder),
        metrics,
        closer,
    })
}

/// A running coordinator. Dropping it stops the coordinator without waiting;
/// [`CoordinatorHandle::shutdown`] stops it and waits for every task to end.
pub struct CoordinatorHandle<S: StateStore + Clone + 'static = AnyStore> {
    local_addr: SocketAddr,
    store: S,
    cancel: CancellationToken,
    health: tonic_health::server::HealthReporter,
    cluster: messages::ClusterHandle,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    cluster_task: Option<JoinHandle<()>>,
    compactor: Option<JoinHandle<()>>,
    retainer: Option<JoinHandle<()>>,
    feeder: Option<JoinHandle<()>>,
    metrics: Arc<Metrics>,
    closer: Option<StoreCloser>,
}

impl<S: StateStore + Clone + 'static> CoordinatorHandle<S> {
    /// The address the coordinator serves on (for a TCP listener bound to port 0, the port
    /// the system chose).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The coordinator's state store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The coordinator's metrics, as `GET /metrics` serves them (without the series read
    /// from the worker table at scrape time).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Asks every connected worker to shut down (the `Shutdown` command): the end of an
    /// all-in-one run, or an operator draining the cluster. Returns how many were asked;
    /// each ends its session and exits on its own time.
    pub async fn shutdown_workers(&self, reason: &str) -> Result<usize, ServiceError> {
        let reason = reason.to_string();
        self.cluster.request(|reply| messages::ClusterMsg::ShutdownWorkers { reason, reply }).await
    }

    /// Discards the store's history before `revision`: watches resuming from an older
    /// revision get `OUT_OF_RANGE` afterwards. Operators (and tests) call it; job records
    /// and event keys are kept.
    pub async fn compact_history(&self, revision: Revision) -> Result<(), ServiceError> {
        Ok(self.store.compact(revision).await?)
    }

    /// Stops the coordinator: health turns NOT_SERVING, the server stops accepting and
    /// drains (dropping connections still open after a grace period), every actor ends,
    /// and the store is closed if `serve` opened it. Jobs keep the state they had, exactly
    /// as after a crash.
    pub async fn shutdown(mut self) -> Result<(), ServiceError> {
        self.health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        self.cancel.cancel();
        let mut result = Ok(());
        if let Some(mut server) = self.server.take() {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => result = Err(ServiceError::Transport(e.to_string())),
                Ok(Err(e)) => result = Err(ServiceError::Internal(format!("the server task failed: {e}"))),
                Err(_) => {
                    tracing::warn!("connections still open after the shutdown grace period; dropping them");
                    server.abort();
                    let _ = server.await;
                }
            }
        }
        if let Some(cluster) = self.cluster_task.take()
            && let Err(e) = cluster.await
        {
            result = result.and(Err(ServiceError::Internal(format!("the cluster actor failed: {e}"))));
        }
        if let Some(compactor) = self.compactor.take()
            && let Err(e) = compactor.await
        {
            result = result.and(Err(ServiceError::Internal(format!("the history compactor failed: {e}"))));
        }
        if let Some(retainer) = self.retainer.take()
            && let Err(e) = retainer.await
        {
            result = result.and(Err(ServiceError::Internal(format!("the job retainer failed: {e}"))));
        }
        if let Some(feeder) = self.feeder.take()
            && let Err(e) = feeder.await
        {
            result = result.and(Err(ServiceError::Internal(format!("the metrics feed failed: {e}"))));
        }
        if let Some(closer) = self.closer.take() {
            result = result.and(closer.await.map_err(ServiceError::from));
        }
        result
    }
}

impl<S: StateStore + Clone + 'static> Drop for CoordinatorHandle<S> {
    fn drop(&mut self) {
        // Without `shutdown`, at least stop every task; the store's own task ends when its
        // last handle is dropped.
        self.cancel.cancel();
    }
}

impl<S: StateStore + Clone + 'static> std::fmt::Debug for CoordinatorHandle<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorHandle").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}
