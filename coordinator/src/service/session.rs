//! The session actor: one per connected worker, owning its `Session` stream.
//!
//! It reads the worker's messages and forwards heartbeats to the cluster actor (the
//! failure detector) and everything job-related to its owner, the job actor the worker is
//! assigned to; it writes the commands it is given to the worker. It reports every way the
//! stream can end (the worker closed it, it broke, the worker stopped reading) to the
//! cluster actor at once, which declares the worker lost: a broken stream does not wait for
//! the heartbeat timeout.

use flotilla_proto::v1::{CoordinatorMessage, WorkerMessage, worker_message};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use super::messages::{
    ClusterMsg, ConnId, JobRoute, OUTBOUND_QUEUE, Outbound, SessionHandle, SessionMsg, WorkerReport,
};

/// One worker's session; see the module docs.
pub(crate) struct SessionActor {
    worker_id: String,
    conn: ConnId,
    inbound: Streaming<WorkerMessage>,
    outbound: Outbound,
    mailbox: mpsc::UnboundedReceiver<SessionMsg>,
    cluster: mpsc::Sender<ClusterMsg>,
    owner: Option<JobRoute>,
    cancel: CancellationToken,
}

impl SessionActor {
    pub fn new(
        worker_id: String,
        conn: ConnId,
        inbound: Streaming<WorkerMessage>,
        outbound: Outbound,
        cluster: mpsc::Sender<ClusterMsg>,
        cancel: CancellationToken,
    ) -> (SessionHandle, SessionActor) {
        let (handle, mailbox) = SessionHandle::channel(conn);
        let actor =
            SessionActor { worker_id, conn, inbound, outbound, mailbox, cluster, owner: None, cancel };
        (handle, actor)
    }

    pub async fn run(mut self) {
        let cause = loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => {
                    let _ = self.outbound.try_send(Err(Status::unavailable("the coordinator is shutting down")));
                    return;
                }
                message = self.mailbox.recv() => match message {
                    Some(SessionMsg::Command(command)) => {
                        if let Err(cause) = self.send(*command) {
                            break cause;
                        }
                    }
                    Some(SessionMsg::SetOwner(owner)) => self.owner = owner,
                    Some(SessionMsg::Close(status)) => {
                        let _ = self.outbound.try_send(Err(status));
                        return;
                    }
                    // The cluster actor dropped the handle: it is stopping.
                    None => return,
                },
                _ = self.outbound.closed() => break "the worker closed its end of the session".to_string(),
                message = self.inbound.next() => match message {
                    Some(Ok(message)) => {
                        if let Err(cause) = self.on_message(message).await {
                            break cause;
                        }
                    }
                    Some(Err(status)) => break format!("the session stream broke ({})", describe(&status)),
                    None => break "the worker ended its session stream".to_string(),
                },
            }
        };
        tracing::debug!(worker = %self.worker_id, conn = self.conn, %cause, "session ended");
        // Awaited: the cluster actor always drains its mailbox, and must hear of this.
        let _ = self
            .cluster
            .send(ClusterMsg::SessionClosed { worker_id: self.worker_id, conn: self.conn, cause })
            .await;
    }

    fn send(&self, command: CoordinatorMessage) -> Result<(), String> {
        match self.outbound.try_send(Ok(command)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                Err(format!("the worker did not read its commands ({OUTBOUND_QUEUE} queued)"))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err("the worker closed its end of the session".into())
            }
        }
    }

    /// Handles one message; an error ends the session with that cause.
    async fn on_message(&mut self, message: WorkerMessage) -> Result<(), String> {
        use worker_message::Body;
        let body = match message.body {
            Some(body) => body,
            None => {
                // A message kind added by a newer worker: ignoring it keeps older
                // coordinators working with newer workers of the same protocol version.
                tracing::debug!(worker = %self.worker_id, "ignoring a worker message of an unknown kind");
                return Ok(());
            }
        };
        match body {
            Body::Open(_) => {
                let status =
                    Status::invalid_argument("SessionOpen may only be the first message of a session");
                let _ = self.outbound.try_send(Err(status));
                Err("the worker sent SessionOpen twice".into())
            }
            Body::Heartbeat(_) => {
                let heartbeat = ClusterMsg::Heartbeat {
                    worker_id: self.worker_id.clone(),
                    conn: self.conn,
                    received: tokio::time::Instant::now(),
                };
                self.cluster.send(heartbeat).await.map_err(|_| "the coordinator is shutting down".to_string())
            }
            body @ (Body::Ack(_)
            | Body::StepReport(_)
            | Body::Error(_)
            | Body::Finished(_)
            | Body::CheckpointShard(_)) => {
                let Some(owner) = &self.owner else {
                    if matches!(body, Body::Ack(_)) {
                        // The answer to a command outside any job: `Shutdown` at the end
                        // of a run, or an `Abort` of a job that no longer runs there. An
                        // ack changes nothing, so there is nothing to refuse.
                        tracing::debug!(worker = %self.worker_id, conn = self.conn, "an ack outside any job");
                        return Ok(());
                    }
                    // A worker with no job has nothing to report: late (its job ended), or
                    // lying. Refused, and nothing changes.
                    tracing::warn!(worker = %self.worker_id, conn = self.conn, "refused a job message: the worker holds no rank of any job");
                    return Ok(());
                };
                let report = WorkerReport { worker_id: self.worker_id.clone(), conn: self.conn, body };
                // Awaited on a bounded mailbox: a worker flooding reports is slowed down
                // to the pace of its job actor, not buffered without limit.
                if owner.reports.send(report).await.is_err() {
                    // The job ended; the cluster actor will clear the owner.
                    self.owner = None;
                }
                Ok(())
            }
        }
    }
}

/// A status's code and message, for a loss reason.
fn describe(status: &Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}
