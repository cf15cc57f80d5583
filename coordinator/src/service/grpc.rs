//! The tonic services: thin adapters that validate requests, then ask the cluster actor or
//! read the store, and turn [`ServiceError`]s into statuses.

use std::sync::Arc;

use flotilla_proto::v1::coordinator_service_server::CoordinatorService;
use flotilla_proto::v1::job_service_server::JobService;
use flotilla_proto::v1::{
    CancelJobRequest, GetJobRequest, GetStepTimelineRequest, Job, JobState, ListJobsRequest,
    ListJobsResponse, ListWorkersRequest, ListWorkersResponse, Registration, StepTimeline, SubmitJobRequest,
    WatchJobRequest, WorkerInfo, WorkerMessage, worker_message,
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::cluster::validate_worker_info;
use super::config::{Admission, CoordinatorConfig, validate_submit};
use super::error::ServiceError;
use super::messages::{ClusterHandle, ClusterMsg, SessionStream, TimelineAnswer};
use super::records::{is_valid_id, list_jobs, read_job};
use super::watch::{EventStream, watch_job};
use crate::store::StateStore;

/// `flotilla.v1.CoordinatorService`, the workers' side.
pub(crate) struct CoordinatorApi {
    cluster: ClusterHandle,
    config: Arc<CoordinatorConfig>,
    cancel: CancellationToken,
}

impl CoordinatorApi {
    pub fn new(cluster: ClusterHandle, config: Arc<CoordinatorConfig>, cancel: CancellationToken) -> Self {
        CoordinatorApi { cluster, config, cancel }
    }
}

/// The name of a worker message's kind, for errors.
fn kind(message: &WorkerMessage) -> &'static str {
    match &message.body {
        None => "an empty message",
        Some(worker_message::Body::Open(_)) => "open",
        Some(worker_message::Body::Heartbeat(_)) => "heartbeat",
        Some(worker_message::Body::Ack(_)) => "ack",
        Some(worker_message::Body::StepReport(_)) => "step_report",
        Some(worker_message::Body::Error(_)) => "error",
        Some(worker_message::Body::Finished(_)) => "finished",
        Some(worker_message::Body::CheckpointShard(_)) => "checkpoint_shard",
    }
}

#[tonic::async_trait]
impl CoordinatorService for CoordinatorApi {
    async fn register(&self, request: Request<WorkerInfo>) -> Result<Response<Registration>, Status> {
        let info = request.into_inner();
        validate_worker_info(&info)?;
        let registration = self.cluster.request(|reply| ClusterMsg::Register { info, reply }).await?;
        Ok(Response::new(registration))
    }

    type SessionStream = SessionStream;

    /// Reads the first message (which must be `SessionOpen`) before answering, so a bad
    /// session fails the call itself with a status the worker can act on.
    async fn session(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let timeout = self.config.heartbeat_timeout;
        let first = tokio::select! {
            _ = self.cancel.cancelled() => return Err(ServiceError::ShuttingDown.into()),
            first = tokio::time::timeout(timeout, inbound.next()) => first,
        };
        let open = match first {
            Err(_) => {
                let message =
                    format!("no SessionOpen within the heartbeat timeout ({} ms)", timeout.as_millis());
                return Err(ServiceError::Timeout(message).into());
            }
            Ok(None) => {
                return Err(Status::invalid_argument("the session stream ended before its SessionOpen"));
            }
            Ok(Some(Err(status))) => return Err(status),
            Ok(Some(Ok(WorkerMessage { body: Some(worker_message::Body::Open(open)) }))) => open,
            Ok(Some(Ok(other))) => {
                return Err(Status::invalid_argument(format!(
                    "the first message of a session must be SessionOpen, not {}",
                    kind(&other)
                )));
            }
        };
        if open.worker_id.is_empty() {
            return Err(invalid("worker_id", "is empty in SessionOpen"));
        }
        if open.session_id.is_empty() {
            return Err(invalid("session_id", "is empty in SessionOpen; use the one Register returned"));
        }
        let stream = self.cluster.request(|reply| ClusterMsg::OpenSession { open, inbound, reply }).await?;
        Ok(Response::new(stream))
    }
}

fn invalid(field: &str, reason: &str) -> Status {
    ServiceError::InvalidArgument { field: field.into(), reason: reason.into() }.into()
}

/// Checks a job id from a request: empty is a missing field; anything that could not be a
/// job id names no job.
fn check_job_id(job_id: &str) -> Result<(), ServiceError> {
    if job_id.is_empty() {
        Err(ServiceError::InvalidArgument { field: "job_id".into(), reason: "is empty".into() })
    } else if is_valid_id(job_id) {
        Ok(())
    } else {
        Err(ServiceError::JobNotFound { job_id: job_id.chars().take(128).collect() })
    }
}

/// `flotilla.v1.JobService`, the clients' side.
pub(crate) struct JobApi<S> {
    cluster: ClusterHandle,
    store: S,
    admission: Arc<Admission>,
    cancel: CancellationToken,
}

impl<S> JobApi<S> {
    pub fn new(
        cluster: ClusterHandle,
        store: S,
        admission: Arc<Admission>,
        cancel: CancellationToken,
    ) -> Self {
        JobApi { cluster, store, admission, cancel }
    }
}

#[tonic::async_trait]
impl<S: StateStore + Clone + 'static> JobService for JobApi<S> {
    async fn submit_job(&self, request: Request<SubmitJobRequest>) -> Result<Response<Job>, Status> {
        let spec = validate_submit(request.get_ref(), &self.admission)?;
        let job = self.cluster.request(|reply| ClusterMsg::Submit { spec, reply }).await?;
        Ok(Response::new(job))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let job_id = request.into_inner().job_id;
        check_job_id(&job_id)?;
        match read_job(&self.store, &job_id).await? {
            Some((record, revision)) => Ok(Response::new(record.to_proto(revision))),
            None => Err(ServiceError::JobNotFound { job_id }.into()),
        }
    }

    async fn list_jobs(
        &self,
        _request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let jobs = list_jobs(&self.store).await?;
        let jobs = jobs.into_iter().map(|(record, revision)| record.to_proto(revision)).collect();
        Ok(Response::new(ListJobsResponse { jobs }))
    }

    /// Cancels through the job actor; a job no actor drives has ended (or never existed),
    /// and the store says which.
    async fn cancel_job(&self, request: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        let CancelJobRequest { job_id, reason } = request.into_inner();
        check_job_id(&job_id)?;
        if reason.len() > 1024 {
            return Err(invalid("reason", "is longer than 1024 bytes"));
        }
        let id = job_id.clone();
        match self.cluster.request(|reply| ClusterMsg::Cancel { job_id: id, reason, reply }).await {
            Ok(job) => return Ok(Response::new(job)),
            Err(ServiceError::JobNotFound { .. }) => {}
            // The job actor ended between the request and its turn: read the outcome.
            Err(ServiceError::ShuttingDown) if !self.cancel.is_cancelled() => {}
            Err(e) => return Err(e.into()),
        }
        let Some((record, revision)) = read_job(&self.store, &job_id).await? else {
            return Err(ServiceError::JobNotFound { job_id }.into());
        };
        match record.state {
            JobState::Cancelled => Ok(Response::new(record.to_proto(revision))),
            state if state.is_terminal() => Err(ServiceError::FailedPrecondition(format!(
                "job {job_id} has already ended ({}): it cannot be cancelled",
                state.as_str_name()
            ))
            .into()),
            _ => Err(ServiceError::Internal(format!("job {job_id} is active but has no actor")).into()),
        }
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        request: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let WatchJobRequest { job_id, from_revision } = request.into_inner();
        check_job_id(&job_id)?;
        let stream = watch_job(&self.store, &job_id, from_revision, self.cancel.clone()).await?;
        Ok(Response::new(stream))
    }

    /// Asks the cluster actor, which forwards to the job actor of a running job or answers
    /// from the timelines of ended jobs; for a job it knows nothing about, the store says
    /// whether the job exists.
    async fn get_step_timeline(
        &self,
        request: Request<GetStepTimelineRequest>,
    ) -> Result<Response<StepTimeline>, Status> {
        let GetStepTimelineRequest { job_id, step } = request.into_inner();
        check_job_id(&job_id)?;
        let mut attempts = 0;
        let answer = loop {
            let id = job_id.clone();
            match self.cluster.request(|reply| ClusterMsg::StepTimeline { job_id: id, step, reply }).await {
                // The job actor ended between the request and its turn: its timelines are on
                // their way to the cluster actor.
                Err(ServiceError::ShuttingDown) if !self.cancel.is_cancelled() && attempts < 3 => {
                    attempts += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                other => break other,
            }
        };
        let timeline = match answer {
            Ok(TimelineAnswer::Step(timeline)) => timeline,
            Ok(TimelineAnswer::Ended(timelines)) => timelines.step(step)?,
            Err(ServiceError::JobNotFound { .. }) => {
                let Some((record, _)) = read_job(&self.store, &job_id).await? else {
                    return Err(ServiceError::JobNotFound { job_id }.into());
                };
                let pipeline = record
                    .config_toml
                    .parse::<toml::Table>()
                    .is_ok_and(|table| table.contains_key("parallel"));
                let why = if pipeline {
                    "its timelines are no longer kept (only those of the last few ended jobs are, \
                     and none across a coordinator restart)"
                } else {
                    "it is a data-parallel job (its config has no [parallel] table)"
                };
                return Err(ServiceError::NotFound(format!(
                    "job {job_id} has no timeline of step {step}: {why}"
                ))
                .into());
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Response::new(timeline))
    }

    async fn list_workers(
        &self,
        _request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        let snapshot = self.cluster.request(|reply| ClusterMsg::ListWorkers { reply }).await?;
        // Sorting the latency window takes a few milliseconds: not on a runtime thread.
        let response = tokio::task::spawn_blocking(move || snapshot.into_response())
            .await
            .map_err(|e| ServiceError::Internal(format!("summarizing the heartbeat latencies: {e}")))?;
        Ok(Response::new(response))
    }
}
