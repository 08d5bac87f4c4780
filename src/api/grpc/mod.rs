//! The gRPC front: the Open Inference Protocol (KServe v2, `inference.GRPCInferenceService`)
//! with Triton's streaming (`ModelStreamInfer`) and repository extensions, and
//! `grpc.health.v1.Health`. `docs/grpc.md` describes the tensors and parameters.
//!
//! ```text
//! proto/grpc_service.proto → proto (build.rs, tonic-prost-build, vendored protoc)
//! service.rs   the RPCs: ModelInfer / ModelStreamInfer build a `CompletionRequest`
//!              (convert.rs) and go through `/v1/completions`' own `prepare` and engine handle
//! health.rs    grpc.health.v1 (SERVING while `/health` would answer 200)
//! status.rs    ApiError → tonic::Status, the one mapping
//! ```
//! Served on the HTTP port (HTTP/2 cleartext; `api::router` sends `application/grpc` requests
//! here) and on `--grpc-port` if given. Invariants: the API key applies to the inference
//! service (`authorization: Bearer` metadata), not to health; a call's engine requests are
//! owned by its response stream, so a client that cancels or disconnects aborts them (their KV
//! blocks are freed at the engine's next intake); nothing a client sends can panic the
//! handler: every value is checked and refused with INVALID_ARGUMENT naming it.

pub mod convert;
mod health;
pub mod service;
mod status;

use std::sync::atomic::Ordering;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::Response;

use super::errors::ApiError;
use super::{validation, AppState};

/// The generated messages, server and client of `proto/grpc_service.proto`.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
    tonic::include_proto!("inference");
}

/// The inference service's full name.
pub const INFERENCE_SERVICE: &str = "inference.GRPCInferenceService";
/// Paths under this prefix are the health service's, never behind the API key.
const HEALTH_PATH: &str = "/grpc.health.v1.Health/";

/// A gRPC request (any `application/grpc` content type: `+proto`, `+json`, ...).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The served model a request names (an empty name is the served one): the one place this
/// front reads which model `AppState` serves.
fn served(state: &AppState, name: &str) -> Result<String, ApiError> {
    validation::check_model(Some(name), &state.model_name)?;
    Ok(state.model_name.clone())
}

/// Ready for requests: not draining, the engine making progress (what `/health` says).
fn ready(state: &AppState) -> bool {
    !state.shutting_down.load(Ordering::Acquire)
        && state.engine.is_healthy(state.config.health_max_silence)
}

/// The gRPC services as one router: unknown services and methods answer UNIMPLEMENTED.
pub fn router(state: AppState) -> axum::Router {
    let limit = state.config.max_body_bytes;
    let inference = proto::grpc_inference_service_server::GrpcInferenceServiceServer::new(
        service::Inference::new(state.clone()),
    )
    .max_decoding_message_size(limit);
    let health = tonic_health::pb::health_server::HealthServer::new(health::HealthService {
        state: state.clone(),
    });
    tonic::service::Routes::new(health)
        .add_service(inference)
        .prepare()
        .into_axum_router()
        .layer(middleware::from_fn_with_state(state, require_api_key))
}

/// The API key, as `authorization: Bearer <key>` metadata; UNAUTHENTICATED otherwise.
async fn require_api_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !request.uri().path().starts_with(HEALTH_PATH) {
        if let Err(e) = super::check_api_key(&state.config, request.headers()) {
            return tonic::Status::from(e).into_http();
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        h.insert(header::CONTENT_TYPE, "application/grpc".parse().unwrap());
        assert!(is_grpc(&h));
        h.insert(
            header::CONTENT_TYPE,
            "application/grpc+proto".parse().unwrap(),
        );
        assert!(is_grpc(&h));
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        assert!(!is_grpc(&h));
    }
}
