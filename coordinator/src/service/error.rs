//! The control plane's errors and their gRPC status codes.

use std::net::SocketAddr;

use tonic::{Code, Status};

use super::auth::AuthError;
use crate::store::{Revision, StoreError};

/// Errors of the control plane. Each maps to one gRPC status code (see the
/// `From<ServiceError> for Status` impl) and names what is at fault.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A request field is invalid (`INVALID_ARGUMENT`).
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// A worker speaks another protocol version (`FAILED_PRECONDITION`).
    #[error(
        "protocol version mismatch: the worker speaks flotilla.v1 protocol version {worker}, \
         this coordinator speaks version {coordinator}"
    )]
    ProtocolMismatch { worker: u32, coordinator: u32 },
    /// A live worker already holds the id, or a session is already open (`ALREADY_EXISTS`).
    #[error("{0}")]
    AlreadyExists(String),
    /// A session names no current registration (`UNAUTHENTICATED`).
    #[error("{0}")]
    Unauthenticated(String),
    /// `NOT_FOUND`.
    #[error("job {job_id:?} not found")]
    JobNotFound { job_id: String },
    /// Something else a request names does not exist (`NOT_FOUND`); the message names it.
    #[error("{0}")]
    NotFound(String),
    /// The request does not fit the job's state (`FAILED_PRECONDITION`).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A watch asked for history that is no longer retained (`OUT_OF_RANGE`).
    #[error(
        "the events of job {job_id} after revision {from_revision} are no longer retained (the \
         oldest from_revision still served is {earliest}); re-read the job with GetJob and watch \
         from its revision"
    )]
    Compacted { job_id: String, from_revision: Revision, earliest: Revision },
    /// A watch asked for a revision that does not exist yet (`OUT_OF_RANGE`).
    #[error("revision {from_revision} is in the future: the store is at revision {current}")]
    FutureRevision { from_revision: Revision, current: Revision },
    /// A watch fell behind the store and was ended (`ABORTED`); the client resumes.
    #[error("the watch of job {job_id} fell behind and was ended; resume with from_revision {resume_after}")]
    WatchLagged { job_id: String, resume_after: Revision },
    /// A session did not send `SessionOpen` in time (`DEADLINE_EXCEEDED`).
    #[error("{0}")]
    Timeout(String),
    /// An invalid coordinator setting.
    #[error("invalid coordinator setting {field}: {reason}")]
    Config { field: String, reason: String },
    /// Listening on a non-loopback address without TLS and a token file, and without
    /// `insecure`.
    #[error(
        "refusing to listen on {addr}: it is not a loopback address and the coordinator has {missing}; \
         give a TLS certificate and key and a token file, or accept an open control plane with --insecure"
    )]
    RemoteListenRefused { addr: SocketAddr, missing: &'static str },
    /// The TLS files or the token file (`INTERNAL`: only at start).
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    /// A stored record that does not decode (`DATA_LOSS`).
    #[error("stored key {key:?} is corrupt: {reason}")]
    CorruptRecord { key: String, reason: String },
    /// Another writer changed the job's record (`ABORTED`): this coordinator no longer owns it.
    #[error(
        "job {job_id} was changed by another writer (expected its record at revision {expected}); \
         this coordinator stops driving it"
    )]
    Fenced { job_id: String, expected: Revision },
    #[error("building the reflection service: {0}")]
    Reflection(String),
    #[error("the gRPC server failed: {0}")]
    Transport(String),
    /// `UNAVAILABLE`.
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// A bug (`INTERNAL`).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    /// The gRPC status code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            ServiceError::InvalidArgument { .. } => Code::InvalidArgument,
            ServiceError::ProtocolMismatch { .. } => Code::FailedPrecondition,
            ServiceError::AlreadyExists(_) => Code::AlreadyExists,
            ServiceError::Unauthenticated(_) => Code::Unauthenticated,
            ServiceError::JobNotFound { .. } | ServiceError::NotFound(_) => Code::NotFound,
            ServiceError::FailedPrecondition(_) => Code::FailedPrecondition,
            ServiceError::Compacted { .. } | ServiceError::FutureRevision { .. } => Code::OutOfRange,
            ServiceError::WatchLagged { .. } | ServiceError::Fenced { .. } => Code::Aborted,
            ServiceError::Timeout(_) => Code::DeadlineExceeded,
            ServiceError::CorruptRecord { .. } => Code::DataLoss,
            ServiceError::ShuttingDown => Code::Unavailable,
            ServiceError::Store(StoreError::Closed | StoreError::Unavailable { .. }) => Code::Unavailable,
            ServiceError::Config { .. }
            | ServiceError::RemoteListenRefused { .. }
            | ServiceError::Auth(_)
            | ServiceError::Bind { .. }
            | ServiceError::Store(_)
            | ServiceError::Reflection(_)
            | ServiceError::Transport(_)
            | ServiceError::Internal(_) => Code::Internal,
        }
    }
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Status {
        Status::new(error.code(), error.to_string())
    }
}
