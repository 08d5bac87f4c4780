//! Why the engine ended a request with an error, typed from where it happened (the
//! scheduler, the forward pass with its kernels and communicators, the sampler, the output
//! stage) up to the API. The engine reads only its `kind` (the metrics label); the API
//! decides the HTTP status and the OpenAI error from it in one place (`api::errors`).

use std::sync::Arc;

use crate::model::ModelError;
use crate::sampling::SampleError;
use crate::scheduler::SchedulerError;

/// The kind of an error that ends a request, for the API's status code and metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineErrorKind {
    /// The request cannot be served as asked (too long for the KV cache, ...): a 400.
    InvalidRequest,
    /// The engine is shutting down or stopped.
    Unavailable,
    /// Something failed inside the engine: a 500, never caused by the client.
    Internal,
}

impl EngineErrorKind {
    /// The `request_errors_total` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

/// Why one sequence got no token from a step.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StepError {
    /// The forward pass failed (every sequence of the step gets this): a kernel, a
    /// communicator or the rank group, as its own `ModelError` variant.
    #[error("the forward pass failed: {0}")]
    Forward(Arc<ModelError>),
    #[error(transparent)]
    Sample(#[from] SampleError),
    /// An embedding could not be pooled from the step's hidden rows (a bookkeeping bug).
    #[error("pooling the embedding failed: {0}")]
    Pooling(String),
}

/// Two forward failures are equal when they report the same (model errors hold I/O errors,
/// which have no equality); events and output decisions compare in tests.
impl PartialEq for StepError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Forward(a), Self::Forward(b)) => a.to_string() == b.to_string(),
            (Self::Sample(a), Self::Sample(b)) => a == b,
            (Self::Pooling(a), Self::Pooling(b)) => a == b,
            _ => false,
        }
    }
}

impl From<ModelError> for StepError {
    fn from(e: ModelError) -> Self {
        Self::Forward(Arc::new(e))
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// The scheduler refused the request when it arrived (e.g. longer than the KV cache).
    #[error(transparent)]
    Refused(SchedulerError),
    /// The request grew past what the whole KV cache holds.
    #[error("the request needs more KV cache than the server has ({kv_cache_tokens} tokens)")]
    OutgrewCache { kv_cache_tokens: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the engine stopped before the request finished")]
    EngineStopped,
    /// The step that was to give the request its next token failed.
    #[error(transparent)]
    Step(#[from] StepError),
    /// A panic inside a step the request was part of (its message).
    #[error("internal error: the engine step failed ({0})")]
    StepPanicked(String),
    /// The scheduler refused a step's results: a bookkeeping bug, not the client's doing.
    #[error("internal error: {0}")]
    Commit(SchedulerError),
    /// The output stage could not turn a token into text (or an injected fault).
    #[error("{0}")]
    Output(String),
    /// A stream ended without its terminal event (never expected).
    #[error("internal error: the request ended without a result")]
    NoResult,
}

impl RequestError {
    pub fn kind(&self) -> EngineErrorKind {
        match self {
            Self::Refused(_) | Self::OutgrewCache { .. } => EngineErrorKind::InvalidRequest,
            Self::ShuttingDown | Self::EngineStopped => EngineErrorKind::Unavailable,
            Self::Step(_)
            | Self::StepPanicked(_)
            | Self::Commit(_)
            | Self::Output(_)
            | Self::NoResult => EngineErrorKind::Internal,
        }
    }
}
