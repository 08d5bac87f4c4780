//! OpenAI's Batch API (`POST /v1/batches`, `GET /v1/batches[/{id}]`,
//! `POST /v1/batches/{id}/cancel`) and sluice's async single requests
//! (`POST /v1/async/chat/completions`, `/v1/async/completions` → 202 and a job;
//! `GET /v1/async/jobs/{id}`, `POST /v1/async/jobs/{id}/cancel`). The work is `jobs/`'s.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::errors::ApiError;
use super::files::{file_row, jobs, limit, refuse_unknown_query};
use super::{run, validation, AppState, JsonBody};
use crate::jobs::async_job::{check_webhook, job_json};
use crate::jobs::batch::{batch_json, parse_window};
use crate::jobs::{Endpoint, JobService};

#[derive(Debug, Deserialize)]
pub struct CreateBatch {
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(flatten)]
    pub unknown: serde_json::Map<String, Value>,
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError::Http {
        status: StatusCode::NOT_FOUND,
        message: format!("No such {what}: {id}"),
    }
}

async fn batch_value(jobs: &JobService, id: &str) -> Result<Value, ApiError> {
    let b = jobs
        .store
        .batch(id.to_string())
        .await?
        .ok_or_else(|| not_found("batch", id))?;
    let counts = jobs.store.counts(b.id.clone()).await?;
    Ok(batch_json(&b, counts))
}

pub async fn create(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<CreateBatch>,
) -> Result<Json<Value>, ApiError> {
    validation::refuse_unknown(&req.unknown)?;
    let jobs = jobs(&state)?;
    let endpoint = Endpoint::from_url(&req.endpoint).ok_or_else(|| {
        ApiError::invalid(
            "endpoint",
            format!(
                "endpoint must be one of {}, got `{}`",
                Endpoint::urls(),
                req.endpoint
            ),
        )
    })?;
    let window = parse_window(&req.completion_window).ok_or_else(|| {
        ApiError::invalid(
            "completion_window",
            format!(
                "completion_window must be like `24h` (or `<n>h`, `<n>m`, `<n>s`), got `{}`",
                req.completion_window
            ),
        )
    })?;
    if req.metadata.as_ref().is_some_and(|m| !m.is_object()) {
        return Err(ApiError::invalid("metadata", "metadata must be an object"));
    }
    let file = file_row(jobs, &req.input_file_id).await.map_err(|_| {
        ApiError::invalid(
            "input_file_id",
            format!("no such file: {}", req.input_file_id),
        )
    })?;
    if file.purpose != "batch" {
        return Err(ApiError::invalid(
            "input_file_id",
            format!(
                "the input file's purpose must be `batch`, not `{}`",
                file.purpose
            ),
        ));
    }
    let b = jobs
        .create_batch(
            file.id,
            endpoint,
            req.completion_window,
            window,
            req.metadata,
        )
        .await?;
    Ok(Json(batch_json(&b, (0, 0, 0))))
}

pub async fn retrieve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(batch_value(jobs(&state)?, &id).await?))
}

/// Newest first; `after` is the last id of the previous page.
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    refuse_unknown_query(&q, &["after", "limit"])?;
    let limit = limit(&q, 20, 100)?;
    let jobs = jobs(&state)?;
    let after = q.get("after").cloned();
    let mut rows = jobs
        .store
        .batches(after.clone(), limit)
        .await?
        .ok_or_else(|| {
            ApiError::invalid(
                "after",
                format!(
                    "after must be the id of a stored batch, got `{}`",
                    after.unwrap_or_default()
                ),
            )
        })?;
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    let mut data = Vec::with_capacity(rows.len());
    for b in &rows {
        data.push(batch_json(b, jobs.store.counts(b.id.clone()).await?));
    }
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "first_id": rows.first().map(|b| b.id.clone()),
        "last_id": rows.last().map(|b| b.id.clone()),
        "has_more": has_more,
    })))
}

pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let jobs = jobs(&state)?;
    jobs.cancel_batch(&id)
        .await?
        .ok_or_else(|| not_found("batch", &id))?;
    Ok(Json(batch_value(jobs, &id).await?))
}

async fn submit(
    state: AppState,
    endpoint: Endpoint,
    mut body: Value,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let jobs = jobs(&state)?;
    let webhook = match body.as_object_mut().and_then(|o| o.remove("webhook_url")) {
        None | Some(Value::Null) => None,
        Some(Value::String(url)) => {
            check_webhook(&url, &jobs.config.webhook_allowed_hosts)
                .map_err(|e| ApiError::invalid("webhook_url", e))?;
            Some(url)
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "webhook_url",
                "webhook_url must be a string",
            ))
        }
    };
    run::check_body(endpoint, &body)?;
    let job = jobs.submit_job(endpoint, body, webhook).await?;
    Ok((StatusCode::ACCEPTED, Json(job_json(&job))))
}

pub async fn async_chat(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Value>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    submit(state, Endpoint::Chat, body).await
}

pub async fn async_completions(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Value>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    submit(state, Endpoint::Completions, body).await
}

pub async fn job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let jobs = jobs(&state)?;
    let j = jobs
        .store
        .job(id.clone())
        .await?
        .ok_or_else(|| not_found("job", &id))?;
    Ok(Json(job_json(&j)))
}

pub async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let jobs = jobs(&state)?;
    let j = jobs
        .cancel_job(&id)
        .await?
        .ok_or_else(|| not_found("job", &id))?;
    Ok(Json(job_json(&j)))
}
