//! The admin API: load, promote, roll back, split and unload model versions
//! (`registry/`). Behind its own key (`--admin-api-key`); off without one. The user API key
//! does not open it.
//!
//! ```text
//! GET    /admin/models                          every model, its versions and their states
//! GET    /admin/models/{name}
//! POST   /admin/models/{name}/versions          {"version", "path", "args", "activate"}
//! POST   /admin/models/{name}/promote           {"version"}
//! POST   /admin/models/{name}/rollback
//! PUT    /admin/models/{name}/traffic           {"weights": {"1": 90, "2": 10}}
//! DELETE /admin/models/{name}/versions/{version}
//! POST   /admin/models/{name}/load              the live version, from its source
//! POST   /admin/models/{name}/unload            every version (they drain)
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use axum::extract::{Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;

use super::{check_bearer, ApiError, AppState, JsonBody};
use crate::registry::{Activation, ModelSource, ModelStatus};

pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/models", get(list))
        .route("/models/{name}", get(show))
        .route("/models/{name}/versions", post(load_version))
        .route("/models/{name}/versions/{version}", delete(unload_version))
        .route("/models/{name}/promote", post(promote))
        .route("/models/{name}/rollback", post(rollback))
        .route("/models/{name}/traffic", put(traffic))
        .route("/models/{name}/load", post(load))
        .route("/models/{name}/unload", post(unload))
        .route_layer(middleware::from_fn_with_state(state, require_admin_key))
}

async fn require_admin_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(key) = &state.config.admin_api_key else {
        return Err(ApiError::Http {
            status: axum::http::StatusCode::FORBIDDEN,
            message: "the admin API is off: start the server with --admin-api-key".into(),
        });
    };
    check_bearer(request.headers(), key)?;
    Ok(next.run(request).await)
}

type Status = Result<Json<ModelStatus>, ApiError>;

async fn list(State(state): State<AppState>) -> Json<Vec<ModelStatus>> {
    Json(state.models.status())
}

async fn show(State(state): State<AppState>, Path(name): Path<String>) -> Status {
    Ok(Json(state.models.model_status(&name)?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadVersion {
    version: String,
    /// A GGUF file or Hugging Face directory on the server; none: the source the version
    /// already has (a reload).
    path: Option<PathBuf>,
    /// `serve` flags for this version (`--load-format dummy`, `--kv-cache-memory N`, ...).
    #[serde(default)]
    args: Vec<String>,
    /// Make it live once it loaded and answered its warm-up request (default true).
    #[serde(default = "yes")]
    activate: bool,
}

fn yes() -> bool {
    true
}

/// Loads a version (a new model too); waits until it loaded and warmed up, or failed (the
/// live version serving on, the reason in the error).
async fn load_version(
    State(state): State<AppState>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<LoadVersion>,
) -> Status {
    let source = (req.path.is_some() || !req.args.is_empty()).then_some(ModelSource {
        path: req.path,
        args: req.args,
    });
    let activation = if req.activate {
        Activation::Promote
    } else {
        Activation::Keep
    };
    let status = state
        .models
        .load_version(&name, &req.version, source, activation)
        .await?;
    Ok(Json(status))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Promote {
    version: String,
}

async fn promote(
    State(state): State<AppState>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<Promote>,
) -> Status {
    Ok(Json(state.models.promote(&name, &req.version)?))
}

async fn rollback(State(state): State<AppState>, Path(name): Path<String>) -> Status {
    Ok(Json(state.models.rollback(&name).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Traffic {
    weights: BTreeMap<String, u32>,
}

async fn traffic(
    State(state): State<AppState>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<Traffic>,
) -> Status {
    Ok(Json(state.models.set_traffic(&name, req.weights)?))
}

async fn unload_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Status {
    Ok(Json(state.models.unload_version(&name, &version)?))
}

async fn load(State(state): State<AppState>, Path(name): Path<String>) -> Status {
    let live = state.models.model_status(&name)?.live_version;
    let status = state
        .models
        .load_version(&name, &live, None, Activation::Keep)
        .await?;
    Ok(Json(status))
}

async fn unload(State(state): State<AppState>, Path(name): Path<String>) -> Status {
    Ok(Json(state.models.unload_model(&name)?))
}
