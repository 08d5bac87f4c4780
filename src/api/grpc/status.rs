//! The one place an API error becomes a gRPC status: the code follows what went wrong
//! (invalid argument, not found, resource exhausted with retry info, unavailable while
//! draining), the message is the API's own words.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::api::errors::ApiError;
use crate::engine::{RequestError, SubmitError};
use crate::registry::RegistryError;

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let message = e.object().message;
        let code = match &e {
            ApiError::InvalidRequest { .. }
            | ApiError::UnsupportedMediaType(_)
            | ApiError::PayloadTooLarge { .. } => Code::InvalidArgument,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => Code::NotFound,
            ApiError::Unauthorized(_) => Code::Unauthenticated,
            ApiError::MethodNotAllowed => Code::Unimplemented,
            ApiError::RequestTimeout(_) => Code::DeadlineExceeded,
            ApiError::Http { status, .. } if status.is_server_error() => Code::Internal,
            ApiError::Http { .. } => Code::InvalidArgument,
            ApiError::Overloaded(_) | ApiError::RateLimited(_) => Code::ResourceExhausted,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
            ApiError::Registry(r) => match r {
                RegistryError::UnknownModel(_)
                | RegistryError::NotLoaded(_)
                | RegistryError::VersionNotServing { .. } => Code::NotFound,
                RegistryError::LoadFailed { .. } | RegistryError::Conflict(_) => {
                    Code::FailedPrecondition
                }
                RegistryError::OverBudget { .. } => Code::ResourceExhausted,
                RegistryError::NoIdleModel { .. } | RegistryError::ShuttingDown => {
                    Code::Unavailable
                }
                RegistryError::Invalid(_) => Code::InvalidArgument,
            },
        };
        let mut status = Status::new(code, message);
        let retry_after_secs = match e {
            ApiError::Overloaded(SubmitError::Overloaded {
                retry_after_secs, ..
            }) => Some(retry_after_secs),
            ApiError::RateLimited(r) => Some(r.retry_after.as_secs().max(1)),
            _ => None,
        };
        if let Some(retry_after_secs) = retry_after_secs {
            // `retry-after` as over HTTP, and gRPC's own retry pushback (milliseconds).
            let md = status.metadata_mut();
            md.insert("retry-after", MetadataValue::from(retry_after_secs));
            md.insert(
                "grpc-retry-pushback-ms",
                MetadataValue::from(retry_after_secs.saturating_mul(1000)),
            );
        }
        status
    }
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Self {
        ApiError::from(e).into()
    }
}

/// The text of an error sent in-band on a stream (`ModelStreamInferResponse.error_message`):
/// the status code's name first, so a client can tell a refusal from a failure.
pub fn in_stream_message(e: ApiError) -> String {
    let status = Status::from(e);
    let mut m = format!("{:?}: {}", status.code(), status.message());
    if let Some(secs) = status
        .metadata()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
    {
        m.push_str(&format!(" (retry after {secs} s)"));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_is_resource_exhausted_with_retry_info() {
        let e = ApiError::from(SubmitError::Overloaded {
            waiting: 4,
            limit: 4,
            retry_after_secs: 3,
        });
        let s = Status::from(e);
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(s.metadata().get("retry-after").unwrap(), "3");
        assert_eq!(s.metadata().get("grpc-retry-pushback-ms").unwrap(), "3000");
        assert!(s.message().contains("at capacity"), "{}", s.message());
    }

    #[test]
    fn codes_follow_the_error() {
        let s = Status::from(ApiError::invalid("top_p", "top_p must be in (0, 1]"));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "top_p must be in (0, 1]");
        let s = Status::from(ApiError::ModelNotFound("x".into()));
        assert_eq!(s.code(), Code::NotFound);
        let s = Status::from(ApiError::Unavailable("the server is shutting down".into()));
        assert_eq!(s.code(), Code::Unavailable);
        let s = Status::from(RequestError::ShuttingDown);
        assert_eq!(s.code(), Code::Unavailable);
        let m = in_stream_message(ApiError::Unavailable("draining".into()));
        assert_eq!(m, "Unavailable: draining");
    }
}
