//! The OpenAI-compatible HTTP server: routes, shared state, body extraction and the API key.
//!
//! ```text
//! POST /v1/chat/completions, /v1/completions   JSON or SSE          (chat.rs, completions.rs)
//! GET  /v1/ws                                  WebSocket streaming  (websocket.rs)
//! GET  /v1/models, POST /tokenize, /detokenize                      (misc.rs)
//! /v1/files[/{id}[/content]], /v1/batches[/{id}[/cancel]],
//! /v1/async/{chat/completions,completions,jobs/{id}[/cancel]}  with `--data-dir`
//!                                              (files.rs, batches.rs; the work in jobs/,
//!                                              run through run.rs as the handlers run it)
//! GET  /health, /health/live, /health/ready,
//!      /metrics, /openapi.json                 never behind the API key
//! content-type application/grpc (HTTP/2)       inference.GRPCInferenceService,
//!                                              grpc.health.v1.Health          (grpc/)
//! ```
//! Invariants: every request ends in a response or an OpenAI-shaped error (unknown routes and
//! methods, the framework's own rejections and handler panics included), whose message is at
//! most `errors::MAX_MESSAGE_BYTES`; a request is validated and submitted before any byte of a
//! stream is sent, so refusals get their status code; a slow client is bounded by the
//! header-read and body-read timeouts (`server.rs`); the API holds no serving state, only the
//! `EngineHandle`.

pub mod access_log;
pub mod admin;
pub mod batches;
pub mod chat;
pub mod completions;
pub mod embeddings;
pub mod errors;
pub mod files;
pub mod generation;
pub mod grpc;
pub mod keys;
pub mod metrics;
pub mod misc;
pub mod openai_types;
pub mod openapi;
mod openapi_jobs;
pub mod prompt;
pub mod run;
pub mod server;
pub mod sse;
pub mod structured;
pub mod tools;
pub mod validation;
pub mod websocket;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tower::ServiceExt;
use tower_http::catch_panic::CatchPanicLayer;

pub use errors::ApiError;

use crate::registry::{Lease, ModelRegistry};

/// How the server behaves, from `sluice serve`'s flags.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Accepted as `Authorization: Bearer <key>` on everything but the probes and `/metrics`
    /// (`--api-key`, `--api-keys-file`), with their rate limits; none: the API is open.
    pub keys: Arc<keys::ApiKeys>,
    /// Required on `/admin/*` (which is off without it); the user key does not open it.
    pub admin_api_key: Option<String>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// `/health` answers 503 when the engine loop made no progress for this long.
    pub health_max_silence: Duration,
    /// Header-read (and idle keep-alive) and body-read bounds.
    pub timeouts: server::HttpTimeouts,
    /// The names `/metrics` shows (`metrics.rs`).
    pub metric_names: metrics::MetricNames,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            keys: Arc::default(),
            admin_api_key: None,
            max_body_bytes: 4 << 20,
            health_max_silence: Duration::from_secs(60),
            timeouts: server::HttpTimeouts::default(),
            metric_names: metrics::MetricNames::default(),
        }
    }
}

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Every served model and version; requests take a `Lease` on the one they run on.
    pub models: Arc<ModelRegistry>,
    /// Unix seconds when the server started.
    pub created: u64,
    pub config: Arc<ServerConfig>,
    /// Set when shutdown began: new generation requests get 503, `/health` too.
    pub shutting_down: Arc<AtomicBool>,
    /// Open WebSocket sessions: upgraded connections are no longer hyper's, so shutdown
    /// waits for this to reach zero.
    pub open_sockets: Arc<AtomicUsize>,
    /// Files, batches and async jobs (`--data-dir`); `None`: those endpoints answer 404.
    pub jobs: Option<Arc<crate::jobs::JobService>>,
}

impl AppState {
    pub fn new(models: Arc<ModelRegistry>, config: ServerConfig) -> Self {
        Self {
            models,
            created: generation::unix_now(),
            config: Arc::new(config),
            shutting_down: Arc::new(AtomicBool::new(false)),
            open_sockets: Arc::new(AtomicUsize::new(0)),
            jobs: None,
        }
    }

    /// Serves the Files, Batch and async APIs from `jobs`.
    pub fn with_jobs(mut self, jobs: Option<Arc<crate::jobs::JobService>>) -> Self {
        self.jobs = jobs;
        self
    }

    /// The version a request for `model` runs on (`name`, `name@version`, none: the default
    /// model), held until the lease drops.
    pub async fn route(&self, model: Option<&str>) -> Result<Lease, ApiError> {
        Ok(self.models.route(model).await?)
    }

    /// Refuses new work while draining.
    pub fn check_accepting(&self) -> Result<(), ApiError> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(ApiError::Unavailable("the server is shutting down".into()));
        }
        Ok(())
    }
}

/// The whole API: gRPC requests (`application/grpc`, HTTP/2) go to `grpc::router`, the
/// rest to the HTTP routes. Either runs under the caller's trace context (`traceparent`),
/// which the request's span takes as its parent (`telemetry/`).
pub fn router(state: AppState) -> Router {
    use opentelemetry::context::FutureExt as _;
    let grpc = grpc::router(state.clone());
    let http = http_router(state);
    Router::new().fallback_service(tower::service_fn(move |req: Request| {
        let routes = if grpc::is_grpc(req.headers()) {
            grpc.clone()
        } else {
            http.clone()
        };
        let parent = crate::telemetry::extract_context(req.headers());
        routes.oneshot(req).with_context(parent)
    }))
}

/// The OpenAI-compatible HTTP routes.
fn http_router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/v1/chat/completions", post(chat::handler))
        .route("/v1/completions", post(completions::handler))
        .route("/v1/embeddings", post(embeddings::handler))
        .route("/v1/models", get(misc::models))
        .route("/v1/models/{*id}", get(misc::model))
        .route("/tokenize", post(misc::tokenize))
        .route("/detokenize", post(misc::detokenize))
        .route("/v1/ws", get(websocket::handler))
        .route(
            "/v1/files",
            // The upload's own limit is `--max-file-bytes` (files.rs).
            post(files::create)
                .get(files::list)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/files/{id}", get(files::retrieve).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/v1/batches", post(batches::create).get(batches::list))
        .route("/v1/batches/{id}", get(batches::retrieve))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
        .route("/v1/async/chat/completions", post(batches::async_chat))
        .route("/v1/async/completions", post(batches::async_completions))
        .route("/v1/async/jobs/{id}", get(batches::job))
        .route("/v1/async/jobs/{id}/cancel", post(batches::cancel_job))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .route("/health", get(misc::health))
        .route("/health/ready", get(misc::health))
        .route("/health/live", get(misc::live))
        .route("/metrics", get(misc::metrics))
        .route("/openapi.json", get(openapi::handler))
        .merge(protected)
        .nest("/admin", admin::router(state.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(middleware::map_response(openai_shaped))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn(access_log::request_id_and_access_log))
}

/// A handler that panicked answers 500 (the connection and the server go on).
fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::Internal("internal error: the request handler failed".into()).into_response()
}

/// Rejections the framework makes itself (a WebSocket upgrade without its headers, a
/// timeout) come as plain text: they become the OpenAI error object, with their status.
async fn openai_shaped(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json);
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    // Framework messages are short; a bound keeps a surprise from echoing megabytes.
    let text = axum::body::to_bytes(body, errors::MAX_MESSAGE_BYTES)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut out = ApiError::Http { status, message }.into_response();
    for name in [header::RETRY_AFTER, header::WWW_AUTHENTICATE, header::ALLOW] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_string())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Compares in time independent of where the strings differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The key check, and the key's rate-limit headers on every answer (refusals included);
/// generation requests under it are admitted and charged by `keys::admit_current` and
/// `generation::choice_events`.
async fn require_api_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let key = match check_api_key(&state.config, request.headers()) {
        Ok(key) => key,
        Err(e) => return e.into_response(),
    };
    let mut response = keys::scope(key.clone(), next.run(request)).await;
    if let Some(k) = key {
        k.write_headers(response.headers_mut());
    }
    response
}

/// The key a request was made with, when the server has keys: `Authorization: Bearer <key>`
/// (gRPC metadata too).
pub(crate) fn check_api_key(
    config: &ServerConfig,
    headers: &HeaderMap,
) -> Result<Option<Arc<keys::ApiKey>>, ApiError> {
    if config.keys.is_open() {
        return Ok(None);
    }
    match bearer(headers) {
        Some(given) => config
            .keys
            .find(given)
            .map(Some)
            .ok_or_else(|| ApiError::Unauthorized("Incorrect API key provided.".into())),
        None => Err(missing_key()),
    }
}

fn missing_key() -> ApiError {
    ApiError::Unauthorized("Missing API key: send `Authorization: Bearer <key>`.".into())
}

/// `Authorization: Bearer <key>` with exactly `key` (compared in constant time).
fn check_bearer(headers: &HeaderMap, key: &str) -> Result<(), ApiError> {
    match bearer(headers) {
        Some(given) if constant_time_eq(given.as_bytes(), key.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::Unauthorized("Incorrect API key provided.".into())),
        None => Err(missing_key()),
    }
}

/// A JSON body: content type checked (415), size bounded (413), malformed JSON and wrong
/// types refused with a 400 that names the field.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        state.check_accepting()?;
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("").to_string();
            if !is_json(&ct) {
                return Err(ApiError::UnsupportedMediaType(ct));
            }
        }
        let limit = state.config.max_body_bytes;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit as u64) {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        let deadline = state.config.timeouts.body_read;
        let bytes = tokio::time::timeout(deadline, read_body(req, limit))
            .await
            .map_err(|_| ApiError::RequestTimeout(deadline))??;
        parse_json(&bytes).map(JsonBody)
    }
}

/// The whole body, at most `limit` bytes.
async fn read_body(req: Request, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut body = req.into_body().into_data_stream();
    let mut bytes = Vec::new();
    while let Some(frame) = body.next().await {
        let frame = frame.map_err(|e| ApiError::InvalidRequest {
            message: format!("cannot read the request body: {e}"),
            param: None,
        })?;
        if bytes.len() + frame.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        bytes.extend_from_slice(&frame);
    }
    Ok(bytes)
}

/// `application/json`, with parameters, or any `+json` type.
fn is_json(content_type: &str) -> bool {
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Parses a body, naming the field whose value has the wrong type.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ApiError::InvalidRequest {
            message: format!("malformed JSON: {e}"),
            param: None,
        })?;
    from_value(value)
}

/// Deserializes a request, naming the field whose value has the wrong type.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    match serde_path_to_error::deserialize::<_, T>(&value) {
        Ok(v) => Ok(v),
        Err(e) => {
            let err = path_error(e);
            // serde loses the path inside `#[serde(flatten)]` fields: the shared sampling
            // fields are tried alone to find which one it was.
            if err.object().param.is_none() {
                if let Err(e) =
                    serde_path_to_error::deserialize::<_, openai_types::CommonParams>(&value)
                {
                    let named = path_error(e);
                    if named.object().param.is_some() {
                        return Err(named);
                    }
                }
            }
            Err(err)
        }
    }
}

fn path_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let param = (!path.is_empty() && path != "." && path != "?").then_some(path);
    let message = match &param {
        Some(p) => format!("invalid value for `{p}`: {inner}"),
        None => format!("invalid request: {inner}"),
    };
    ApiError::InvalidRequest { message, param }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/vnd.api+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json("application/x-www-form-urlencoded"));
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e = parse_json::<openai_types::ChatCompletionRequest>(
            br#"{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#,
        )
        .unwrap_err();
        assert_eq!(e.object().param.as_deref(), Some("temperature"), "{e}");
        let e =
            parse_json::<openai_types::ChatCompletionRequest>(br#"{"messages": 5}"#).unwrap_err();
        assert_eq!(e.object().param.as_deref(), Some("messages"), "{e}");
        let e =
            parse_json::<openai_types::ChatCompletionRequest>(br#"{"messages": [}"#).unwrap_err();
        assert!(e.to_string().starts_with("malformed JSON"), "{e}");
        let e = parse_json::<openai_types::CompletionRequest>(br#"{"max_tokens": 3}"#).unwrap_err();
        assert!(e.to_string().contains("prompt"), "{e}");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let r = parse_json::<openai_types::CompletionRequest>(
            br#"{"prompt": "x", "no_such_field": {"a": 1}, "best_of": 1}"#,
        );
        assert!(r.is_ok());
    }

    #[test]
    fn bearer_tokens() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
