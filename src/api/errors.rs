//! `ApiError`: every way a request can fail at the API, mapped once to an HTTP status and the
//! OpenAI error body `{"error": {"message", "type", "param", "code"}}`.
//!
//! Invariant: a 5xx is only ever the engine's or the server's own failure (`Internal`,
//! `Unavailable`); everything a client sent that cannot be served is a 4xx naming the field.
//! An error after a stream began is sent in-band with the same object (`in_stream_json`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::{EngineErrorKind, RequestError, SubmitError};
use crate::registry::RegistryError;
use crate::tokenizer::TokenizerError;

/// Longest error message sent, in bytes: messages quote client input (serde quotes a wrong
/// value whole), and an error response stays small whatever was sent.
pub const MAX_MESSAGE_BYTES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A value the client sent is invalid; `param` names the field.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("unsupported content type `{0}`: send `application/json`")]
    UnsupportedMediaType(String),
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the request body did not arrive within {0:?}")]
    RequestTimeout(std::time::Duration),
    /// A rejection the HTTP framework made itself, with its status and reason.
    #[error("{message}")]
    Http { status: StatusCode, message: String },
    #[error(transparent)]
    Overloaded(SubmitError),
    /// The API key's own requests or tokens per minute (`api/keys/`).
    #[error(transparent)]
    RateLimited(super::keys::RateLimited),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// The model registry's refusals (`registry/error.rs`), and the admin API's.
    #[error(transparent)]
    Registry(RegistryError),
}

/// The OpenAI error object.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorObject {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Debug, Serialize)]
struct ErrorBody {
    error: ErrorObject,
}

impl ApiError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::ModelNotFound(_) | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Http { status, .. } => *status,
            Self::Overloaded(_) | Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Registry(e) => match e {
                RegistryError::UnknownModel(_)
                | RegistryError::NotLoaded(_)
                | RegistryError::VersionNotServing { .. } => StatusCode::NOT_FOUND,
                RegistryError::LoadFailed { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                RegistryError::OverBudget { .. } => StatusCode::INSUFFICIENT_STORAGE,
                RegistryError::NoIdleModel { .. } | RegistryError::ShuttingDown => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                RegistryError::Conflict(_) => StatusCode::CONFLICT,
                RegistryError::Invalid(_) => StatusCode::BAD_REQUEST,
            },
        }
    }

    pub fn object(&self) -> ErrorObject {
        let (kind, code, param) = match self {
            Self::InvalidRequest { param, .. } => ("invalid_request_error", None, param.clone()),
            Self::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model_not_found"),
                Some("model".to_string()),
            ),
            Self::Unauthorized(_) => ("invalid_request_error", Some("invalid_api_key"), None),
            Self::PayloadTooLarge { .. } => {
                ("invalid_request_error", Some("request_too_large"), None)
            }
            Self::UnsupportedMediaType(_) => (
                "invalid_request_error",
                Some("unsupported_media_type"),
                None,
            ),
            Self::NotFound(_) => ("invalid_request_error", Some("not_found"), None),
            Self::MethodNotAllowed => ("invalid_request_error", Some("method_not_allowed"), None),
            Self::RequestTimeout(_) => ("invalid_request_error", Some("request_timeout"), None),
            Self::Http { status, .. } if status.is_server_error() => {
                ("server_error", Some("internal_error"), None)
            }
            Self::Http { .. } => ("invalid_request_error", None, None),
            Self::Overloaded(_) => ("rate_limit_error", Some("rate_limit_exceeded"), None),
            // OpenAI's own: the type names the limit.
            Self::RateLimited(r) => (r.kind.as_str(), Some("rate_limit_exceeded"), None),
            Self::Unavailable(_) => ("service_unavailable", Some("service_unavailable"), None),
            Self::Internal(_) => ("server_error", Some("internal_error"), None),
            Self::Registry(e) => match e {
                RegistryError::UnknownModel(_) | RegistryError::VersionNotServing { .. } => (
                    "invalid_request_error",
                    Some("model_not_found"),
                    Some("model".to_string()),
                ),
                RegistryError::NotLoaded(_) => (
                    "invalid_request_error",
                    Some("model_not_loaded"),
                    Some("model".to_string()),
                ),
                RegistryError::NoIdleModel { .. } | RegistryError::ShuttingDown => {
                    ("service_unavailable", Some(e.kind()), None)
                }
                RegistryError::LoadFailed { .. } | RegistryError::OverBudget { .. } => {
                    ("server_error", Some(e.kind()), None)
                }
                _ => ("invalid_request_error", Some(e.kind()), None),
            },
        };
        ErrorObject {
            message: truncate(self.to_string()),
            kind,
            param,
            code,
        }
    }

    /// The `{"error": {...}}` value sent in-band once a stream has begun.
    pub fn in_stream_json(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.object() })
    }
}

/// A job store failure is the server's own (the disk, the database).
impl From<super::keys::RateLimited> for ApiError {
    fn from(e: super::keys::RateLimited) -> Self {
        Self::RateLimited(e)
    }
}

impl From<crate::jobs::JobError> for ApiError {
    fn from(e: crate::jobs::JobError) -> Self {
        Self::Internal(e.to_string())
    }
}

/// The one place an engine error becomes an OpenAI error: its kind decides the status and
/// type, its own words the message.
impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        let message = e.to_string();
        match e.kind() {
            EngineErrorKind::InvalidRequest => Self::InvalidRequest {
                message,
                param: None,
            },
            EngineErrorKind::Unavailable => Self::Unavailable(message),
            EngineErrorKind::Internal => Self::Internal(message),
        }
    }
}

/// Cuts a message to `MAX_MESSAGE_BYTES` at a character boundary.
fn truncate(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("… (truncated)");
    }
    message
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::UnknownModel(m) => Self::ModelNotFound(m),
            e => Self::Registry(e),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Overloaded { .. } => Self::Overloaded(e),
            SubmitError::Stopped => Self::Unavailable(e.to_string()),
        }
    }
}

impl From<TokenizerError> for ApiError {
    fn from(e: TokenizerError) -> Self {
        match e {
            // A template that refuses the conversation (`raise_exception`) is the client's.
            TokenizerError::Template(message) => Self::InvalidRequest {
                message,
                param: Some("messages".into()),
            },
            TokenizerError::IdOutOfRange { .. } => Self::InvalidRequest {
                message: e.to_string(),
                param: None,
            },
            TokenizerError::Encode(_) | TokenizerError::Decode(_) => Self::InvalidRequest {
                message: e.to_string(),
                param: None,
            },
            other => Self::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), "request failed: {self}");
        }
        let body = ErrorBody {
            error: self.object(),
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if let Self::Overloaded(SubmitError::Overloaded {
            retry_after_secs, ..
        }) = self
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        if let Self::RateLimited(r) = &self {
            // Whole seconds for HTTP's header, milliseconds for the OpenAI SDKs' own.
            let ms = r.retry_after.as_millis().max(1) as u64;
            let h = resp.headers_mut();
            h.insert(header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
            h.insert("retry-after-ms", HeaderValue::from(ms));
        }
        if let Self::Registry(RegistryError::NoIdleModel { .. }) = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(1));
        }
        if matches!(self, Self::Unauthorized(_)) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overloaded_is_429_with_retry_after() {
        let e: ApiError = SubmitError::Overloaded {
            waiting: 3,
            limit: 3,
            retry_after_secs: 7,
        }
        .into();
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "7");
    }

    #[test]
    fn invalid_names_the_param() {
        let e = ApiError::invalid("top_p", "top_p must be in (0, 1], got 2");
        let obj = e.object();
        assert_eq!(obj.param.as_deref(), Some("top_p"));
        assert_eq!(obj.kind, "invalid_request_error");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn long_messages_are_cut() {
        let e = ApiError::invalid("prompt", "é".repeat(100_000));
        let m = e.object().message;
        assert!(m.len() <= MAX_MESSAGE_BYTES + 20, "{}", m.len());
        assert!(m.ends_with("(truncated)"));
    }

    #[test]
    fn engine_invalid_request_is_a_400_not_a_500() {
        let e = ApiError::from(RequestError::OutgrewCache {
            kv_cache_tokens: 64,
        });
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let v = e.in_stream_json();
        let want = "the request needs more KV cache than the server has (64 tokens)";
        assert_eq!(v["error"]["message"], want);
    }

    #[test]
    fn engine_errors_keep_their_cause_to_the_edge() {
        use crate::engine::StepError;
        use crate::model::ModelError;
        use crate::parallel::CommError;
        let peer_gone = ModelError::from(CommError::PeerGone { rank: 1 });
        let e = ApiError::from(RequestError::Step(StepError::from(peer_gone)));
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let m = e.object().message;
        assert!(
            m.contains("forward pass failed") && m.contains("rank 1"),
            "{m}"
        );
        let e = ApiError::from(RequestError::ShuttingDown);
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
