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
use super::AppState;
use crate::registry::ModelStatus;

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

/// The model a request names, from the registry (an empty name is the default model; a
/// `name@version` is the model `name`).
fn served(state: &AppState, name: &str) -> Result<ModelStatus, ApiError> {
    let base = name.split_once('@').map_or(name, |(n, _)| n);
    let base = match base {
        "" => state.models.default_model().unwrap_or_default(),
        b => b.to_string(),
    };
    Ok(state.models.model_status(&base)?)
}

/// Ready for requests: not draining, the models loaded and their engines making progress
/// (what `/health` says).
fn ready(state: &AppState) -> bool {
    !state.shutting_down.load(Ordering::Acquire)
        && state.models.is_healthy(state.config.health_max_silence)
}

/// The repository's load and unload change what serves: they take the admin key
/// (`--admin-api-key`), as the HTTP admin API does, never the user key.
const ADMIN_PATHS: [&str; 2] = [
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
];

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
    let path = request.uri().path();
    let checked = if ADMIN_PATHS.contains(&path) {
        match &state.config.admin_api_key {
            Some(key) => super::check_bearer(request.headers(), key).map(|()| None),
            None => {
                return tonic::Status::permission_denied(
                    "the admin API is off: start the server with --admin-api-key",
                )
                .into_http()
            }
        }
    } else if path.starts_with(HEALTH_PATH) {
        Ok(None)
    } else {
        super::check_api_key(&state.config, request.headers())
    };
    match checked {
        Ok(key) => super::keys::scope(key, next.run(request)).await,
        Err(e) => tonic::Status::from(e).into_http(),
    }
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
