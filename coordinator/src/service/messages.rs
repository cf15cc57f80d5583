//! The messages the service's actors send each other, and the handles that send them: one
//! section per actor (cluster, session, job), each with its mailbox type and its handle.
//!
//! They live apart from the actors so that the actors depend on each other's mailboxes,
//! never on each other: `cluster` spawns `session` and `job` actors, and `session` and `job`
//! reach the cluster actor and each other only through the types here. The module graph is
//! acyclic: this module depends on no actor.
//!
//! Invariants (see `service`'s module docs): mailboxes fed from the network (the cluster
//! actor's, a job's reports) are bounded and awaited; mailboxes the coordinator feeds
//! "downwards" (cluster → job control, cluster/job → session) are unbounded and never
//! awaited, so no cycle of tasks waits on each other. A send to an actor that has ended is
//! ignored: its end reaches the cluster actor by its own message.

use std::sync::Arc;

use flotilla_proto::v1::{
    CoordinatorMessage, HeartbeatStats, Job, ListWorkersResponse, Registration, SessionOpen, StepTimeline,
    WorkerInfo, WorkerMessage, WorkerStatus, worker_message,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::config::JobSpec;
use super::error::ServiceError;
use super::timeline::JobTimelines;

// -------------------------------------------------------------------------------------
// The cluster actor

/// The response stream of a session.
pub(crate) type SessionStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

/// Where the cluster actor sends a request's answer.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, ServiceError>>;

/// The cluster actor's mailbox.
pub(crate) enum ClusterMsg {
    Register {
        info: WorkerInfo,
        reply: Reply<Registration>,
    },
    OpenSession {
        open: SessionOpen,
        inbound: Streaming<WorkerMessage>,
        reply: Reply<SessionStream>,
    },
    Heartbeat {
        worker_id: String,
        conn: ConnId,
        /// When the session read it off the stream, for the handling latency.
        received: Instant,
    },
    SessionClosed {
        worker_id: String,
        conn: ConnId,
        cause: String,
    },
    Submit {
        spec: JobSpec,
        reply: Reply<Job>,
    },
    /// Answered by the job actor, or with `JobNotFound` when no actor drives the job (it
    /// ended, or never existed): the store then has the answer.
    Cancel {
        job_id: String,
        reason: String,
        reply: Reply<Job>,
    },
    /// The job is written and waits for workers.
    JobPending {
        job_id: String,
    },
    /// The job actor has ended; its workers are free, except those in `stuck`, which
    /// did not confirm that they stopped the job and are declared lost.
    JobEnded {
        job_id: String,
        stuck: Vec<(String, String)>,
        /// A pipeline job's executed timelines, kept a while for `GetStepTimeline`.
        timelines: Option<JobTimelines>,
    },
    /// A recovering job gives its workers back (declaring the `stuck` ones lost: they did
    /// not confirm that they stopped its step) and asks for a crew again, ahead of every
    /// queued job.
    JobRecovering {
        job_id: String,
        stuck: Vec<(String, String)>,
    },
    /// A recovering data-parallel job whose replacement did not come in time accepts any
    /// of these smaller world sizes (largest first) the idle workers can fill.
    JobShrink {
        job_id: String,
        sizes: Vec<u32>,
    },
    /// A step timeline: from the job actor while the job runs, from the ended jobs'
    /// timelines afterwards, `JobNotFound` when neither has it.
    StepTimeline {
        job_id: String,
        step: u64,
        reply: Reply<TimelineAnswer>,
    },
    ListWorkers {
        reply: Reply<WorkersSnapshot>,
    },
    /// Asks every worker with an open session to shut down; answers how many were asked.
    ShutdownWorkers {
        reason: String,
        reply: Reply<usize>,
    },
}

/// A cheap handle for sending requests to the cluster actor.
#[derive(Clone, Debug)]
pub(crate) struct ClusterHandle {
    tx: mpsc::Sender<ClusterMsg>,
}

impl ClusterHandle {
    /// A handle sending into the cluster actor's (bounded) mailbox.
    pub fn new(tx: mpsc::Sender<ClusterMsg>) -> ClusterHandle {
        ClusterHandle { tx }
    }

    /// Sends a request and awaits its reply.
    pub async fn request<T>(&self, make: impl FnOnce(Reply<T>) -> ClusterMsg) -> Result<T, ServiceError> {
        let (reply, response) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| ServiceError::ShuttingDown)?;
        response.await.map_err(|_| ServiceError::ShuttingDown)?
    }
}

/// The membership as `ListWorkers` reports it, with the raw latency window: the
/// percentiles are computed by the caller, so that the cluster actor, which every heartbeat
/// waits for, only copies.
pub(crate) struct WorkersSnapshot {
    pub workers: Vec<WorkerStatus>,
    pub handled: u64,
    pub latencies_us: Vec<u32>,
}

impl WorkersSnapshot {
    /// The response, with nearest-rank percentiles of the latency window.
    pub fn into_response(mut self) -> ListWorkersResponse {
        self.latencies_us.sort_unstable();
        let sorted = &self.latencies_us;
        let rank = |q: f64| -> u64 {
            if sorted.is_empty() {
                return 0;
            }
            let index = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
            u64::from(sorted[index])
        };
        let heartbeats = HeartbeatStats {
            handled: self.handled,
            window: u32::try_from(sorted.len()).unwrap_or(u32::MAX),
            p50_us: rank(0.50),
            p99_us: rank(0.99),
            max_us: sorted.last().copied().map_or(0, u64::from),
        };
        ListWorkersResponse { workers: self.workers, heartbeats: Some(heartbeats) }
    }
}

// -------------------------------------------------------------------------------------
// Session actors

/// Identifies one session stream of one worker, so that messages of a replaced or closed
/// stream are told apart from the current one's.
pub(crate) type ConnId = u64;

/// Commands queued for a worker that has not read them yet. Commands are few (assignment,
/// run, abort); a worker this far behind is not reading its stream and is dropped.
pub(crate) const OUTBOUND_QUEUE: usize = 64;

/// What the session's gRPC response stream carries.
pub(crate) type Outbound = mpsc::Sender<Result<CoordinatorMessage, Status>>;

/// The session actor's mailbox. Unbounded: only the coordinator itself sends to it (the
/// cluster and job actors), a handful of messages per job, and they must never wait on a
/// session (see the module docs of `service`).
pub(crate) enum SessionMsg {
    /// Send this command to the worker (boxed: an assignment is large, the other
    /// messages small).
    Command(Box<CoordinatorMessage>),
    /// Forward job messages to this job from now on (`None`: to nobody).
    SetOwner(Option<JobRoute>),
    /// End the stream with this status; the cluster actor already forgot the worker.
    Close(Status),
}

/// A cheap handle to a session actor.
#[derive(Clone, Debug)]
pub(crate) struct SessionHandle {
    pub conn: ConnId,
    tx: mpsc::UnboundedSender<SessionMsg>,
}

impl SessionHandle {
    /// A session actor's mailbox for connection `conn`: the handle and the actor's end.
    pub fn channel(conn: ConnId) -> (SessionHandle, mpsc::UnboundedReceiver<SessionMsg>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (SessionHandle { conn, tx }, rx)
    }

    /// Queues a command. A session that has ended ignores it: the cluster actor learns of
    /// the end through its own message and declares the worker lost.
    pub fn send(&self, command: CoordinatorMessage) {
        let _ = self.tx.send(SessionMsg::Command(Box::new(command)));
    }

    pub fn set_owner(&self, owner: Option<JobRoute>) {
        let _ = self.tx.send(SessionMsg::SetOwner(owner));
    }

    pub fn close(&self, status: Status) {
        let _ = self.tx.send(SessionMsg::Close(status));
    }
}

// -------------------------------------------------------------------------------------
// Job actors

/// Where a session forwards the job messages of a worker assigned to a job.
#[derive(Clone, Debug)]
pub(crate) struct JobRoute {
    pub reports: mpsc::Sender<WorkerReport>,
}

/// A job message of one worker, forwarded by its session, which says which session it
/// is: the job accepts it only from the session that holds the worker's rank.
#[derive(Debug)]
pub(crate) struct WorkerReport {
    pub worker_id: String,
    pub conn: ConnId,
    pub body: worker_message::Body,
}

/// A worker given to a job by the cluster actor.
#[derive(Debug)]
pub(crate) struct Member {
    pub worker_id: String,
    pub info: WorkerInfo,
    pub session: SessionHandle,
}

/// The job actor's control mailbox, fed by the cluster actor (never awaited, hence
/// unbounded; see `service`'s module docs).
pub(crate) enum JobControl {
    /// The job's workers, in rank order.
    Start(Vec<Member>),
    WorkerLost {
        worker_id: String,
        cause: String,
    },
    Cancel {
        reason: String,
        reply: oneshot::Sender<Result<Job, ServiceError>>,
    },
    /// A step's executed timeline (pipeline jobs).
    Timeline {
        step: u64,
        reply: oneshot::Sender<Result<TimelineAnswer, ServiceError>>,
    },
}

/// Where a step timeline comes from: the job actor of a running job builds it; the cluster
/// actor hands over an ended job's timelines for the gRPC handler to read.
pub(crate) enum TimelineAnswer {
    Step(StepTimeline),
    Ended(Arc<JobTimelines>),
}

/// The cluster actor's handle to a job actor.
#[derive(Clone, Debug)]
pub(crate) struct JobHandle {
    control: mpsc::UnboundedSender<JobControl>,
    reports: mpsc::Sender<WorkerReport>,
}

impl JobHandle {
    /// A job actor's two mailboxes: the unbounded control mailbox and the report mailbox,
    /// bounded at `reports` (sessions wait when it is full). Returns the handle and the
    /// actor's ends.
    pub fn channel(
        reports: usize,
    ) -> (JobHandle, mpsc::UnboundedReceiver<JobControl>, mpsc::Receiver<WorkerReport>) {
        let (control_tx, control) = mpsc::unbounded_channel();
        let (reports_tx, reports_rx) = mpsc::channel(reports);
        (JobHandle { control: control_tx, reports: reports_tx }, control, reports_rx)
    }

    /// Sends a control message; a job actor that has ended ignores it (its end is on its
    /// way to the cluster actor).
    pub fn send(&self, message: JobControl) {
        let _ = self.control.send(message);
    }

    pub fn route(&self) -> JobRoute {
        JobRoute { reports: self.reports.clone() }
    }
}
