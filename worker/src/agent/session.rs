//! The session actor: one registration's bidirectional stream, from `SessionOpen` to its
//! end. It heartbeats at the registration's interval, executes the coordinator's commands
//! (an assignment starts a job task, `RunSteps` go to it, `Abort` stops it, `Shutdown`
//! ends the worker), and forwards what the job task reports.
//!
//! Invariants: the session owns its job task and awaits it on every way out; heartbeats
//! go before commands, so a flood of commands cannot starve them; a full or closed
//! outbound queue ends the session (the coordinator stopped reading).

use std::time::Duration;

use flotilla_proto::v1::coordinator_message::Body as Command;
use flotilla_proto::v1::worker_message::Body as Report;
use flotilla_proto::v1::{
    Abort, Assignment, CoordinatorMessage, Heartbeat, Registration, RunSteps, SessionOpen, WorkerMessage,
};
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinHandle};
use tokio::time::{Instant, MissedTickBehavior, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use tracing::{info, warn};

use super::connect::CoordinatorClient;
use super::data_plane::{AbortFn, DataPlane, Listening};
use super::error::JobError;
use super::job::Job;
use super::plan::JobPlan;
use super::report::{ack, message, refuse, unix_ms, worker_error};
use super::{
    CLOSE_LINGER, DEFAULT_HEARTBEAT, JOB_COMMAND_CAPACITY, MIN_HEARTBEAT, OUTBOUND_CAPACITY, RPC_TIMEOUT,
    WorkerOptions,
};

/// How a session ended.
pub(super) enum SessionEnd {
    /// Told to stop (by the coordinator or the caller).
    Shutdown,
    /// The stream broke or ended; register again.
    Lost(String),
}

/// What a job task tells its session.
pub(super) enum JobEvent {
    /// Forward to the coordinator.
    Send(WorkerMessage),
    /// The data plane is up; the session aborts it on `Abort` or when the session ends.
    DataPlane(AbortFn),
}

/// The session's handle on its job task.
struct RunningJob {
    job_id: String,
    /// Its assignment's epoch, for the reports the session sends for it.
    epoch: u64,
    commands: mpsc::Sender<(u64, RunSteps)>,
    cancel: CancellationToken,
    abort: Option<AbortFn>,
    /// The job sent its last word (`JobFinished`, or the `WorkerError` of a failed job):
    /// its task is ending and owns nothing more.
    finished: bool,
    task: JoinHandle<()>,
}

impl RunningJob {
    /// Makes the job stop as soon as it can: its communicator fails every pending and
    /// later collective at once (here and, through the abort frames, at the peers).
    fn stop(&self, reason: &str) {
        self.cancel.cancel();
        if let Some(abort) = &self.abort {
            abort(reason);
        }
    }
}

/// One registration's session: the actor that owns the stream, the heartbeat and the job.
pub(super) struct Session<'a, D: DataPlane> {
    options: &'a WorkerOptions,
    registration: Registration,
    plane: &'a mut Listening<D>,
    shutdown: CancellationToken,
    outbound: Option<mpsc::Sender<WorkerMessage>>,
    events_tx: mpsc::UnboundedSender<JobEvent>,
    events: mpsc::UnboundedReceiver<JobEvent>,
    job: Option<RunningJob>,
    /// `Abort` commands to acknowledge once the job has stopped.
    abort_acks: Vec<u64>,
    heartbeats: u64,
}

/// What the session loop does after a command.
enum Flow {
    Continue,
    End(SessionEnd),
}

impl<'a, D: DataPlane> Session<'a, D> {
    pub(super) fn new(
        options: &'a WorkerOptions,
        registration: Registration,
        plane: &'a mut Listening<D>,
        shutdown: CancellationToken,
    ) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        Session {
            options,
            registration,
            plane,
            shutdown,
            outbound: None,
            events_tx,
            events,
            job: None,
            abort_acks: Vec::new(),
            heartbeats: 0,
        }
    }

    pub(super) async fn run(mut self, mut client: CoordinatorClient) -> SessionEnd {
        let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        let open = SessionOpen {
            worker_id: self.registration.worker_id.clone(),
            session_id: self.registration.session_id.clone(),
        };
        // The queue is new and empty: the first message always fits.
        if tx.try_send(message(Report::Open(open))).is_err() {
            return SessionEnd::Lost("the session queue refused its first message".into());
        }
        self.outbound = Some(tx);
        let opened = tokio::select! {
            _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
            opened = timeout(RPC_TIMEOUT, client.session(ReceiverStream::new(rx))) => opened,
        };
        let mut inbound = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                return SessionEnd::Lost(format!("opening the session: {}", describe(&status)));
            }
            Err(_) => return SessionEnd::Lost(format!("opening the session took over {RPC_TIMEOUT:?}")),
        };
        let end = self.serve(&mut inbound).await;
        self.stop_job("the worker's session ended").await;
        if matches!(end, SessionEnd::Shutdown) {
            // Half-close our side and give the coordinator a moment to close its own, so
            // that the last acknowledgement is delivered rather than reset.
            self.outbound = None;
            let _ = timeout(CLOSE_LINGER, async { while let Ok(Some(_)) = inbound.message().await {} }).await;
        }
        end
    }

    async fn serve(&mut self, inbound: &mut Streaming<CoordinatorMessage>) -> SessionEnd {
        let period = match self.registration.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => Duration::from_millis(ms).max(MIN_HEARTBEAT),
        };
        let mut heartbeat = tokio::time::interval_at(Instant::now(), period);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let flow = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => Flow::End(SessionEnd::Shutdown),
                Some(event) = self.events.recv() => self.on_event(event),
                done = join(&mut self.job) => self.on_job_done(done).await,
                // Before commands, so that a flood of them cannot starve the heartbeat.
                _ = heartbeat.tick() => self.heartbeat(),
                command = inbound.message() => match command {
                    Ok(Some(command)) => self.on_command(command).await,
                    Ok(None) => Flow::End(SessionEnd::Lost("the coordinator closed the session".into())),
                    Err(status) => Flow::End(SessionEnd::Lost(describe(&status))),
                },
            };
            if let Flow::End(end) = flow {
                return end;
            }
        }
    }

    /// Queues a message for the coordinator; a closed or full queue ends the session.
    fn send(&self, msg: WorkerMessage) -> Flow {
        let Some(outbound) = &self.outbound else {
            return Flow::End(SessionEnd::Lost("the session is closed".into()));
        };
        match outbound.try_send(msg) {
            Ok(()) => Flow::Continue,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Flow::End(SessionEnd::Lost("the session stream closed".into()))
            }
            Err(mpsc::error::TrySendError::Full(_)) => Flow::End(SessionEnd::Lost(format!(
                "the coordinator stopped reading ({OUTBOUND_CAPACITY} messages queued)"
            ))),
        }
    }

    fn heartbeat(&mut self) -> Flow {
        self.heartbeats += 1;
        let beat = Heartbeat { sequence: self.heartbeats, sent_unix_ms: unix_ms() };
        self.send(message(Report::Heartbeat(beat)))
    }

    fn on_event(&mut self, event: JobEvent) -> Flow {
        match event {
            JobEvent::Send(msg) => {
                if let (Some(Report::Finished(_) | Report::Error(_)), Some(job)) = (&msg.body, &mut self.job)
                {
                    job.finished = true;
                }
                self.send(msg)
            }
            JobEvent::DataPlane(handle) => {
                if let Some(job) = &mut self.job {
                    // An abort that raced the rendezvous reaches the new communicator too.
                    if job.cancel.is_cancelled() {
                        handle("job aborted");
                    }
                    job.abort = Some(handle);
                }
                Flow::Continue
            }
        }
    }

    async fn on_job_done(&mut self, done: Result<(), JoinError>) -> Flow {
        let finished = self.job.take();
        // Events the task sent before ending come before what its end means.
        while let Ok(event) = self.events.try_recv() {
            if let Flow::End(end) = self.on_event(event) {
                return Flow::End(end);
            }
        }
        if let (Err(err), Some(job)) = (done, &finished)
            && let Flow::End(end) = self.send(worker_error(
                &job.job_id,
                job.epoch,
                0,
                &JobError::Internal(format!("the job task failed: {err}")),
            ))
        {
            return Flow::End(end);
        }
        for id in std::mem::take(&mut self.abort_acks) {
            if let Flow::End(end) = self.send(ack(id)) {
                return Flow::End(end);
            }
        }
        match self.plane.rebind().await {
            Ok(()) => Flow::Continue,
            // Peers know this worker by its registered address: register a new one.
            Err(err) => {
                Flow::End(SessionEnd::Lost(format!("the data-plane address cannot be bound again: {err}")))
            }
        }
    }

    async fn on_command(&mut self, command: CoordinatorMessage) -> Flow {
        let id = command.command_id;
        match command.body {
            None => self.send(refuse(id, &JobError::State("the command has no body".into()))),
            Some(Command::Assignment(assignment)) => self.on_assignment(id, assignment).await,
            Some(Command::RunSteps(run)) => self.on_run_steps(id, run),
            Some(Command::Abort(abort)) => self.on_abort(id, abort),
            Some(Command::Shutdown(shutdown)) => {
                info!(reason = %shutdown.reason, "the coordinator asked this worker to shut down");
                if let Flow::End(end) = self.send(ack(id)) {
                    return Flow::End(end);
                }
                Flow::End(SessionEnd::Shutdown)
            }
        }
    }

    async fn on_assignment(&mut self, id: u64, assignment: Assignment) -> Flow {
        // A finished job's task has nothing left but to return: wait for it rather than
        // refuse a coordinator that assigns the next job at once.
        if self.job.as_ref().is_some_and(|job| job.finished) {
            let done = join(&mut self.job).await;
            if let Flow::End(end) = self.on_job_done(done).await {
                return Flow::End(end);
            }
        }
        if let Some(job) = &self.job {
            let busy = if job.cancel.is_cancelled() {
                format!("job {} is still stopping; assign again once its Abort is acknowledged", job.job_id)
            } else {
                format!("this worker is running job {}; abort it first", job.job_id)
            };
            return self.send(refuse(id, &JobError::State(busy)));
        }
        let plan = match JobPlan::from_assignment(&assignment, self.options) {
            Ok(plan) => plan,
            Err(reason) => {
                warn!(job = %assignment.job_id, %reason, "assignment refused");
                if let Flow::End(end) = self.send(refuse(id, &reason)) {
                    return Flow::End(end);
                }
                return self.send(worker_error(&assignment.job_id, assignment.epoch, 0, &reason));
            }
        };
        let Some(listener) = self.plane.listener.take() else {
            // Rebinding happens when the previous job ends; its failure ends the session.
            return self
                .send(refuse(id, &JobError::Communication("the data-plane listener is not bound".into())));
        };
        let (commands, commands_rx) = mpsc::channel(JOB_COMMAND_CAPACITY);
        let cancel = CancellationToken::new();
        let job = Job {
            plan,
            ack_id: id,
            data_plane: self.plane.plane.clone(),
            listener: Some(listener),
            commands: commands_rx,
            cancel: cancel.clone(),
            events: self.events_tx.clone(),
            rendezvous_timeout: self.options.rendezvous_timeout,
            memory_bytes: self.options.memory_bytes,
            writer: None,
        };
        info!(job = %assignment.job_id, rank = assignment.dp_rank, world = assignment.dp_size, "assignment accepted");
        let task = tokio::spawn(job.run());
        self.job = Some(RunningJob {
            job_id: assignment.job_id,
            epoch: assignment.epoch,
            commands,
            cancel,
            abort: None,
            finished: false,
            task,
        });
        Flow::Continue
    }

    fn on_run_steps(&mut self, id: u64, run: RunSteps) -> Flow {
        let refusal = match &self.job {
            None => format!("no job is running here (asked to run steps of job {})", run.job_id),
            Some(job) if job.job_id != run.job_id => {
                format!("this worker runs job {}, not {}", job.job_id, run.job_id)
            }
            Some(job) if job.cancel.is_cancelled() => format!("job {} is being aborted", job.job_id),
            // The job acknowledges once it has checked the step range.
            Some(job) => match job.commands.try_send((id, run)) {
                Ok(()) => return Flow::Continue,
                Err(_) => format!("job {} has too many queued RunSteps commands", job.job_id),
            },
        };
        self.send(refuse(id, &JobError::State(refusal)))
    }

    fn on_abort(&mut self, id: u64, abort: Abort) -> Flow {
        match &self.job {
            Some(job) if abort.job_id.is_empty() || abort.job_id == job.job_id => {
                info!(job = %job.job_id, reason = %abort.reason, "aborting the job");
                job.stop(&format!("job aborted by the coordinator: {}", abort.reason));
                self.abort_acks.push(id);
                Flow::Continue
            }
            // Nothing of that job runs here: it is as aborted as it can be.
            _ => self.send(ack(id)),
        }
    }

    /// Stops the job, if any, and waits for its task (the communicator is aborted first,
    /// so a collective in flight returns at once; a step's compute runs to its end).
    async fn stop_job(&mut self, reason: &str) {
        if let Some(job) = self.job.take() {
            job.stop(reason);
            if let Err(err) = job.task.await {
                warn!(job = %job.job_id, %err, "the job task failed");
            }
        }
    }
}

/// Resolves when the job task ends; never while there is none.
async fn join(job: &mut Option<RunningJob>) -> Result<(), JoinError> {
    match job {
        Some(job) => (&mut job.task).await,
        None => std::future::pending().await,
    }
}

fn describe(status: &Status) -> String {
    format!("{}: {}", status.code(), status.message())
}
