//! The cluster actor: membership, failure detection, scheduling, and the supervisor of
//! every session and job actor.
//!
//! # Membership and failure detection
//!
//! A worker is alive exactly while it has an entry in the table, and every entry has a
//! deadline: registration gives it `heartbeat_timeout` to open its session, and each
//! heartbeat moves it to `heartbeat_timeout` from now. The actor sleeps until the earliest
//! deadline (they are kept ordered), so a silent worker is declared lost within the
//! timeout plus scheduling delay, not at the next sweep. A session whose stream ends or
//! breaks reports it at once and its worker is lost at once. Losing a worker removes it,
//! closes its session and tells its job; the worker must register again.
//!
//! # Scheduling
//!
//! Jobs wait in one queue, in submission order (a recovering job goes to its front). Each
//! scheduling pass walks the queue in order, and every job that can be placed now starts:
//! it takes the idle workers (session open, no job) with the smallest ids among those
//! with enough memory for it (the planner's estimate per worker, against the memory the
//! worker reported; a worker that reports none is taken), exactly its world size (a
//! pipeline job's layout was checked against its worker count at submission). A job that
//! cannot be placed now waits without holding back the jobs behind it that can
//! (backfill), so the order among jobs that fit is the queue's, and a pass is a function
//! of the queue and the idle workers only. Jobs that could never be placed (more workers
//! than `max_job_workers`, more memory than `max_worker_memory`) were refused at
//! submission. Ranks follow the worker ids, so a given set of workers always gets the
//! same layout (a pipeline job reorders them by node, local rank and id, see `job`).
//!
//! # Step timelines
//!
//! `GetStepTimeline` is forwarded to the job actor of a running job; an ended pipeline
//! job's actor hands its timelines over with `JobEnded`, and the last few are answered
//! from here (`super::timeline`).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flotilla_proto::PROTOCOL_VERSION;
use flotilla_proto::v1::{
    Abort, CoordinatorMessage, Job, Registration, SessionOpen, Shutdown, WorkerInfo, WorkerMessage,
    WorkerStatus, coordinator_message,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use super::config::{CoordinatorConfig, JobSpec, memory_of, placement_of};
use super::error::ServiceError;
use super::ids::session_id;
use super::job::{JobActor, JobEnv, JobPlacement, Launch};
use super::messages::{
    ClusterHandle, ClusterMsg, ConnId, JobControl, JobHandle, Member, OUTBOUND_QUEUE, SessionHandle,
    SessionStream, TimelineAnswer, WorkersSnapshot,
};
use super::metrics::Metrics;
use super::records::{self, is_valid_id};
use super::session::SessionActor;
use super::timeline::EndedTimelines;
use crate::store::StateStore;

/// Requests waiting for the cluster actor; senders (gRPC handlers, sessions, jobs) wait
/// when it is full.
const MAILBOX: usize = 4096;

struct Worker {
    info: WorkerInfo,
    session_id: String,
    /// When the worker was last heard from; it is lost a heartbeat timeout later (its
    /// entry in `Cluster::deadlines`).
    last_heard: Instant,
    heartbeats: u64,
    session: Option<SessionHandle>,
    job: Option<String>,
}

/// How many recent heartbeats the handling latency is computed over.
const LATENCY_WINDOW: usize = 1 << 16;

/// The heartbeat handling latencies of the last [`LATENCY_WINDOW`] heartbeats, in
/// microseconds, for `ListWorkers`.
struct HeartbeatLatency {
    samples: Vec<u32>,
    next: usize,
    handled: u64,
}

impl HeartbeatLatency {
    fn new() -> Self {
        HeartbeatLatency { samples: Vec::new(), next: 0, handled: 0 }
    }

    fn record(&mut self, latency: std::time::Duration) {
        let micros = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        if self.samples.len() < LATENCY_WINDOW {
            self.samples.push(micros);
        } else {
            self.samples[self.next] = micros;
        }
        self.next = (self.next + 1) % LATENCY_WINDOW;
        self.handled += 1;
    }
}

struct ActiveJob {
    handle: JobHandle,
    workers: u32,
    /// Smaller world sizes a recovering data-parallel job accepts when the idle workers
    /// cannot fill `workers` (largest first); empty: exactly `workers`.
    shrink_to: Vec<u32>,
    /// The planner's estimate of the memory each worker needs (0: unknown, any worker).
    memory_per_worker: u64,
}

struct Cluster<S> {
    config: Arc<CoordinatorConfig>,
    store: S,
    metrics: Arc<Metrics>,
    mailbox: mpsc::Receiver<ClusterMsg>,
    /// Given to children; keeping it also keeps the mailbox open until shutdown.
    me: mpsc::Sender<ClusterMsg>,
    cancel: CancellationToken,
    workers: BTreeMap<String, Worker>,
    deadlines: BTreeSet<(Instant, String)>,
    jobs: HashMap<String, ActiveJob>,
    queue: VecDeque<String>,
    job_tasks: JoinSet<()>,
    task_jobs: HashMap<tokio::task::Id, String>,
    sessions: JoinSet<()>,
    next_conn: ConnId,
    next_job: u64,
    next_worker: u64,
    commands: Arc<AtomicU64>,
    latency: HeartbeatLatency,
    ended_timelines: EndedTimelines,
}

/// Reads the jobs in the store, settles the ones the previous process was running (see
/// `JobActor::settle_after_restart`), and starts the cluster actor with the pending ones.
pub(crate) async fn start<S: StateStore + Clone + 'static>(
    config: Arc<CoordinatorConfig>,
    store: S,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Result<(ClusterHandle, JoinHandle<()>), ServiceError> {
    let (me, mailbox) = mpsc::channel(MAILBOX);
    let mut cluster = Cluster {
        config,
        store: store.clone(),
        metrics,
        mailbox,
        me: me.clone(),
        cancel,
        workers: BTreeMap::new(),
        deadlines: BTreeSet::new(),
        jobs: HashMap::new(),
        queue: VecDeque::new(),
        job_tasks: JoinSet::new(),
        task_jobs: HashMap::new(),
        sessions: JoinSet::new(),
        next_conn: 1,
        next_job: 1,
        next_worker: 1,
        commands: Arc::new(AtomicU64::new(1)),
        latency: HeartbeatLatency::new(),
        ended_timelines: EndedTimelines::default(),
    };
    for (record, revision) in records::list_jobs(&store).await? {
        if let Some(n) = record.id.strip_prefix("job-").and_then(|n| n.parse::<u64>().ok()) {
            cluster.next_job = cluster.next_job.max(n.saturating_add(1));
        }
        if record.state.is_terminal() {
            continue;
        }
        // Pending jobs start, and running ones recover (see `settle_after_restart`). The
        // layout is placed again from the config (placement is not stored), under this
        // coordinator's rules.
        let placement: JobPlacement = placement_of(&record.config_toml, record.workers)
            .map(|p| p.map(Arc::new))
            .map_err(|e| e.to_string());
        let memory = memory_of(&record.config_toml, record.workers);
        let (handle, mut actor) =
            JobActor::new(store.clone(), record, revision, cluster.job_env(), placement);
        actor.settle_after_restart().await?;
        if !actor.state().is_terminal() {
            cluster.spawn_job(handle, actor, Launch::Resume, memory);
        }
    }
    let task = tokio::spawn(cluster.run());
    Ok((ClusterHandle::new(me), task))
}

impl<S: StateStore + Clone + 'static> Cluster<S> {
    fn job_env(&self) -> JobEnv {
        JobEnv {
            cluster: self.me.clone(),
            cancel: self.cancel.clone(),
            commands: self.commands.clone(),
            stop_timeout: self.config.heartbeat_timeout,
            metrics: self.metrics.clone(),
        }
    }

    async fn run(mut self) {
        loop {
            self.expire();
            let next_deadline = self.deadlines.first().map(|(deadline, _)| *deadline);
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                Some(message) = self.mailbox.recv() => self.handle(message),
                Some(done) = self.job_tasks.join_next_with_id() => self.job_task_done(done),
                Some(done) = self.sessions.join_next() => {
                    if let Err(e) = done && e.is_panic() {
                        tracing::error!(error = %e, "a session actor panicked");
                    }
                }
                _ = tokio::time::sleep_until(next_deadline.unwrap_or_else(Instant::now)), if next_deadline.is_some() => {}
            }
        }
        // Every child watches the same token; wait for them so that nothing outlives the
        // coordinator. A child blocked sending to the full mailbox gets an error instead.
        self.mailbox.close();
        while self.job_tasks.join_next().await.is_some() {}
        while self.sessions.join_next().await.is_some() {}
    }

    fn handle(&mut self, message: ClusterMsg) {
        match message {
            ClusterMsg::Register { info, reply } => {
                let _ = reply.send(self.register(info));
            }
            ClusterMsg::OpenSession { open, inbound, reply } => {
                let _ = reply.send(self.open_session(open, inbound));
            }
            ClusterMsg::Heartbeat { worker_id, conn, received } => self.heartbeat(&worker_id, conn, received),
            ClusterMsg::SessionClosed { worker_id, conn, cause } => {
                let current = self.workers.get(&worker_id).and_then(|w| w.session.as_ref()).map(|s| s.conn);
                if current == Some(conn) {
                    self.lose(&worker_id, cause);
                }
            }
            ClusterMsg::Submit { spec, reply } => self.submit(spec, reply),
            ClusterMsg::Cancel { job_id, reason, reply } => match self.jobs.get(&job_id) {
                Some(job) => job.handle.send(JobControl::Cancel { reason, reply }),
                None => {
                    let _ = reply.send(Err(ServiceError::JobNotFound { job_id }));
                }
            },
            ClusterMsg::JobPending { job_id } => {
                if self.jobs.contains_key(&job_id) && !self.queue.contains(&job_id) {
                    self.queue.push_back(job_id);
                    self.schedule();
                }
            }
            ClusterMsg::JobEnded { job_id, stuck, timelines } => {
                if let Some(timelines) = timelines {
                    self.ended_timelines.keep(timelines);
                }
                for (worker_id, cause) in stuck {
                    if self.workers.get(&worker_id).is_some_and(|w| w.job.as_deref() == Some(job_id.as_str()))
                    {
                        self.lose(&worker_id, cause);
                    }
                }
                self.job_ended(&job_id);
            }
            ClusterMsg::JobRecovering { job_id, stuck } => {
                for (worker_id, cause) in stuck {
                    if self.workers.get(&worker_id).is_some_and(|w| w.job.as_deref() == Some(job_id.as_str()))
                    {
                        self.lose(&worker_id, cause);
                    }
                }
                self.release_workers(&job_id);
                if self.jobs.contains_key(&job_id) && !self.queue.contains(&job_id) {
                    self.queue.push_front(job_id);
                }
                self.schedule();
            }
            ClusterMsg::JobShrink { job_id, sizes } => {
                if let Some(job) = self.jobs.get_mut(&job_id) {
                    job.shrink_to = sizes;
                    self.schedule();
                }
            }
            ClusterMsg::StepTimeline { job_id, step, reply } => match self.jobs.get(&job_id) {
                Some(job) => job.handle.send(JobControl::Timeline { step, reply }),
                None => {
                    let answer = match self.ended_timelines.get(&job_id) {
                        Some(timelines) => Ok(TimelineAnswer::Ended(timelines)),
                        None => Err(ServiceError::JobNotFound { job_id }),
                    };
                    let _ = reply.send(answer);
                }
            },
            ClusterMsg::ListWorkers { reply } => {
                let _ = reply.send(Ok(self.list_workers()));
            }
            ClusterMsg::ShutdownWorkers { reason, reply } => {
                let _ = reply.send(Ok(self.shutdown_workers(&reason)));
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // Membership

    /// The worker was heard from now: its deadline moves a heartbeat timeout ahead.
    fn heard_from(&mut self, worker_id: &str) {
        let timeout = self.config.heartbeat_timeout;
        let now = Instant::now();
        if let Some(worker) = self.workers.get_mut(worker_id) {
            self.deadlines.remove(&(worker.last_heard + timeout, worker_id.to_string()));
            worker.last_heard = now;
            self.deadlines.insert((now + timeout, worker_id.to_string()));
        }
    }

    fn register(&mut self, info: WorkerInfo) -> Result<Registration, ServiceError> {
        let worker_id = if info.worker_id.is_empty() {
            loop {
                let id = format!("worker-{:04}", self.next_worker);
                self.next_worker += 1;
                if !self.workers.contains_key(&id) {
                    break id;
                }
            }
        } else {
            info.worker_id.clone()
        };
        if let Some(existing) = self.workers.get(&worker_id) {
            let state =
                if existing.session.is_some() { "its session is open" } else { "it registered recently" };
            return Err(ServiceError::AlreadyExists(format!(
                "worker id {worker_id:?} is held by a live worker on host {:?} ({state}); \
                 a second worker may not claim it until that one is lost",
                existing.info.host
            )));
        }
        let session_id = session_id();
        let now = Instant::now();
        tracing::info!(worker = %worker_id, host = %info.host, data_plane = %info.data_plane_address, "worker registered");
        self.workers.insert(
            worker_id.clone(),
            Worker {
                info,
                session_id: session_id.clone(),
                last_heard: now,
                heartbeats: 0,
                session: None,
                job: None,
            },
        );
        self.deadlines.insert((now + self.config.heartbeat_timeout, worker_id.clone()));
        Ok(Registration {
            worker_id,
            session_id,
            protocol_version: PROTOCOL_VERSION,
            heartbeat_interval_ms: millis(self.config.heartbeat_interval),
            heartbeat_timeout_ms: millis(self.config.heartbeat_timeout),
        })
    }

    fn open_session(
        &mut self,
        open: SessionOpen,
        inbound: Streaming<WorkerMessage>,
    ) -> Result<SessionStream, ServiceError> {
        let worker_id = open.worker_id;
        let Some(worker) = self.workers.get_mut(&worker_id) else {
            return Err(ServiceError::Unauthenticated(format!(
                "worker {worker_id:?} is not registered (it never was, or it was declared lost); register again"
            )));
        };
        if worker.session_id != open.session_id {
            return Err(ServiceError::Unauthenticated(format!(
                "the session id does not match worker {worker_id:?}'s registration; register again"
            )));
        }
        if worker.session.is_some() {
            return Err(ServiceError::AlreadyExists(format!(
                "a session is already open for worker {worker_id:?}"
            )));
        }
        let conn = self.next_conn;
        self.next_conn += 1;
        let (outbound, response) = mpsc::channel(OUTBOUND_QUEUE);
        let (handle, actor) = SessionActor::new(
            worker_id.clone(),
            conn,
            inbound,
            outbound,
            self.me.clone(),
            self.cancel.clone(),
        );
        worker.session = Some(handle);
        self.sessions.spawn(actor.run());
        tracing::info!(worker = %worker_id, conn, "session opened");
        self.heard_from(&worker_id);
        self.schedule();
        Ok(ReceiverStream::new(response))
    }

    fn heartbeat(&mut self, worker_id: &str, conn: ConnId, received: Instant) {
        let Some(worker) = self.workers.get_mut(worker_id) else { return };
        if worker.session.as_ref().map(|s| s.conn) != Some(conn) {
            return;
        }
        worker.heartbeats += 1;
        self.heard_from(worker_id);
        self.latency.record(received.elapsed());
    }

    /// Sends `Shutdown` on every open session. A worker with a job stops it first; the job
    /// then loses the worker when its session ends.
    fn shutdown_workers(&mut self, reason: &str) -> usize {
        let mut asked = 0;
        for (worker_id, worker) in &self.workers {
            let Some(session) = &worker.session else { continue };
            tracing::info!(worker = %worker_id, %reason, "asking the worker to shut down");
            let command_id = self.commands.fetch_add(1, Ordering::Relaxed);
            let shutdown = Shutdown { reason: reason.to_string() };
            session.send(CoordinatorMessage {
                command_id,
                body: Some(coordinator_message::Body::Shutdown(shutdown)),
            });
            asked += 1;
        }
        asked
    }

    fn list_workers(&self) -> WorkersSnapshot {
        let now = Instant::now();
        let workers = self
            .workers
            .iter()
            .map(|(worker_id, worker)| WorkerStatus {
                worker_id: worker_id.clone(),
                host: worker.info.host.clone(),
                node_id: worker.info.node_id.clone(),
                local_rank: worker.info.local_rank,
                pid: worker.info.pid,
                data_plane_address: worker.info.data_plane_address.clone(),
                session_open: worker.session.is_some(),
                job_id: worker.job.clone().unwrap_or_default(),
                heartbeats: worker.heartbeats,
                silent_ms: millis(now.saturating_duration_since(worker.last_heard)),
            })
            .collect();
        WorkersSnapshot { workers, handled: self.latency.handled, latencies_us: self.latency.samples.clone() }
    }

    /// Declares lost every worker whose deadline has passed.
    fn expire(&mut self) {
        let now = Instant::now();
        while let Some((deadline, worker_id)) = self.deadlines.first().cloned()
            && deadline <= now
        {
            let timeout = millis(self.config.heartbeat_timeout);
            let cause = match self.workers.get(&worker_id) {
                Some(worker) if worker.session.is_none() => {
                    format!("registered but opened no session within {timeout} ms")
                }
                _ => format!("no heartbeat for {timeout} ms"),
            };
            self.lose(&worker_id, cause);
        }
    }

    /// Forgets a worker, ends its session and tells its job.
    fn lose(&mut self, worker_id: &str, cause: String) {
        let Some(worker) = self.workers.remove(worker_id) else { return };
        self.deadlines.remove(&(worker.last_heard + self.config.heartbeat_timeout, worker_id.to_string()));
        // An idle worker leaving is routine (scale-down, the end of `flotilla run`); one
        // holding a job is a failure its job reports.
        match &worker.job {
            Some(job) => tracing::warn!(worker = %worker_id, %job, %cause, "worker lost"),
            None => tracing::info!(worker = %worker_id, %cause, "idle worker left"),
        }
        if let Some(session) = &worker.session {
            session.close(Status::aborted(format!(
                "worker {worker_id} was declared lost: {cause}; register again"
            )));
        }
        if let Some(job_id) = &worker.job
            && let Some(job) = self.jobs.get(job_id)
        {
            job.handle.send(JobControl::WorkerLost { worker_id: worker_id.to_string(), cause });
        }
    }

    // ---------------------------------------------------------------------------------
    // Jobs

    fn spawn_job(&mut self, handle: JobHandle, actor: JobActor<S>, launch: Launch, memory_per_worker: u64) {
        let job_id = actor.job_id().to_string();
        let workers = actor.workers_needed();
        let task = self.job_tasks.spawn(actor.run(launch));
        self.task_jobs.insert(task.id(), job_id.clone());
        self.jobs.insert(job_id, ActiveJob { handle, workers, shrink_to: Vec::new(), memory_per_worker });
    }

    fn submit(&mut self, spec: JobSpec, reply: oneshot::Sender<Result<Job, ServiceError>>) {
        let job_id = format!("job-{:06}", self.next_job);
        self.next_job += 1;
        let record = JobActor::<S>::new_record(job_id, &spec);
        let placement = Ok(spec.placement.clone());
        let (handle, actor) = JobActor::new(self.store.clone(), record, 0, self.job_env(), placement);
        self.spawn_job(handle, actor, Launch::Create { reply }, spec.memory_per_worker);
    }

    /// Starts, in queue order, every queued job that enough idle workers can hold; the
    /// others keep their places (see the module docs).
    fn schedule(&mut self) {
        let mut position = 0;
        while position < self.queue.len() {
            let job_id = self.queue[position].clone();
            let Some(job) = self.jobs.get(&job_id) else {
                self.queue.remove(position);
                continue;
            };
            let idle = self.idle_fitting(job.memory_per_worker);
            let needed = if idle.len() >= job.workers as usize {
                job.workers as usize
            } else {
                match job.shrink_to.iter().find(|&&size| size as usize <= idle.len()) {
                    Some(&size) => size as usize,
                    None => {
                        position += 1;
                        continue;
                    }
                }
            };
            self.queue.remove(position);
            self.start_job(&job_id, idle.into_iter().take(needed).collect());
        }
    }

    /// The idle workers (session open, no job) that report at least `memory` bytes, or
    /// report none, by id.
    fn idle_fitting(&self, memory: u64) -> Vec<String> {
        self.workers
            .iter()
            .filter(|(_, w)| w.session.is_some() && w.job.is_none())
            .filter(|(_, w)| {
                let reported = w.info.devices.iter().fold(0u64, |sum, d| sum.saturating_add(d.memory_bytes));
                reported == 0 || reported >= memory
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Gives `workers` (idle, in rank order) to the job.
    fn start_job(&mut self, job_id: &str, workers: Vec<String>) {
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        job.workers = workers.len() as u32;
        job.shrink_to.clear();
        let route = job.handle.route();
        let handle = job.handle.clone();
        let mut members = Vec::with_capacity(workers.len());
        for worker_id in workers {
            let Some(worker) = self.workers.get_mut(&worker_id) else { continue };
            let Some(session) = worker.session.clone() else { continue };
            worker.job = Some(job_id.to_string());
            // Before the job can send anything: the owner is set ahead of the
            // assignment in the session's mailbox, so the worker's ack finds it.
            session.set_owner(Some(route.clone()));
            members.push(Member { worker_id, info: worker.info.clone(), session });
        }
        tracing::info!(job = %job_id, workers = members.len(), "job scheduled");
        handle.send(JobControl::Start(members));
    }

    /// Releases the job's workers (the job aborted them if it had to) and schedules.
    fn job_ended(&mut self, job_id: &str) {
        if self.jobs.remove(job_id).is_none() {
            return;
        }
        self.queue.retain(|queued| queued != job_id);
        self.release_workers(job_id);
        self.schedule();
    }

    /// Frees the job's workers for scheduling.
    fn release_workers(&mut self, job_id: &str) {
        for worker in self.workers.values_mut() {
            if worker.job.as_deref() == Some(job_id) {
                worker.job = None;
                if let Some(session) = &worker.session {
                    session.set_owner(None);
                }
            }
        }
    }

    fn job_task_done(&mut self, done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let id = match &done {
            Ok((id, ())) => *id,
            Err(e) => e.id(),
        };
        let Some(job_id) = self.task_jobs.remove(&id) else { return };
        if let Err(e) = done {
            tracing::error!(job = %job_id, error = %e, "a job actor failed");
        }
        if self.jobs.contains_key(&job_id) {
            // The actor ended without saying so (it panicked): its workers may still be
            // running its steps.
            for worker in self.workers.values() {
                if worker.job.as_deref() == Some(job_id.as_str())
                    && let Some(session) = &worker.session
                {
                    let abort =
                        Abort { job_id: job_id.clone(), reason: "the coordinator's job actor failed".into() };
                    let command_id = self.commands.fetch_add(1, Ordering::Relaxed);
                    session.send(CoordinatorMessage {
                        command_id,
                        body: Some(coordinator_message::Body::Abort(abort)),
                    });
                }
            }
            self.job_ended(&job_id);
        }
    }
}

fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Checks a registration request: the protocol version first (a worker of another
/// version may not even mean the same thing by the other fields), then each field.
pub(crate) fn validate_worker_info(info: &WorkerInfo) -> Result<(), ServiceError> {
    if info.protocol_version != PROTOCOL_VERSION {
        return Err(ServiceError::ProtocolMismatch {
            worker: info.protocol_version,
            coordinator: PROTOCOL_VERSION,
        });
    }
    let bad =
        |field: &str, reason: String| Err(ServiceError::InvalidArgument { field: field.into(), reason });
    if !info.worker_id.is_empty() && !is_valid_id(&info.worker_id) {
        return bad(
            "worker_id",
            format!("{:?} must be 1 to 128 characters out of A-Z a-z 0-9 . _ : -", truncate(&info.worker_id)),
        );
    }
    if info.data_plane_address.is_empty() {
        return bad("data_plane_address", "is empty; peers need it to reach the worker".into());
    }
    for (field, value) in
        [("host", &info.host), ("data_plane_address", &info.data_plane_address), ("node_id", &info.node_id)]
    {
        if value.len() > 256 {
            return bad(field, format!("{} bytes is above the limit of 256", value.len()));
        }
    }
    if info.devices.len() > 1024 {
        return bad("devices", format!("{} devices is above the limit of 1024", info.devices.len()));
    }
    Ok(())
}

/// At most 64 characters of an untrusted string, for an error message.
fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}
