//! OpenAI's Files API, for batch input and output (`purpose: batch`, `batch_output`):
//! `POST /v1/files` (multipart, as the SDK's `client.files.create` sends it), `GET /v1/files` (a cursor page),
//! `GET|DELETE /v1/files/{id}`, `GET /v1/files/{id}/content`. A file over
//! `--max-file-bytes` is a 413; bytes are stored durably (`jobs/files.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::errors::ApiError;
use super::AppState;
use crate::jobs::store::{FileOrder, FileRow};
use crate::jobs::{files::valid_id, unix_now, JobService};

/// The job service, or a 404 saying how to turn it on.
pub fn jobs(state: &AppState) -> Result<&Arc<JobService>, ApiError> {
    state.jobs.as_ref().ok_or_else(|| ApiError::Http {
        status: axum::http::StatusCode::NOT_FOUND,
        message: "the Files, Batch and async APIs are off: start the server with `--data-dir`"
            .into(),
    })
}

/// Refuses query parameters the endpoint does not know.
pub fn refuse_unknown_query(q: &HashMap<String, String>, known: &[&str]) -> Result<(), ApiError> {
    match q.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(ApiError::invalid(
            k,
            format!("{k} is not supported by this server"),
        )),
        None => Ok(()),
    }
}

/// `limit` from the query: 1 to `max`, `default` when absent.
pub fn limit(q: &HashMap<String, String>, default: usize, max: usize) -> Result<usize, ApiError> {
    match q.get("limit") {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                ApiError::invalid("limit", format!("limit must be 1 to {max}, got `{v}`"))
            }),
    }
}

/// `order` from the query: `asc` or `desc` (the default).
fn order(q: &HashMap<String, String>) -> Result<FileOrder, ApiError> {
    match q.get("order").map(String::as_str) {
        None | Some("desc") => Ok(FileOrder::Desc),
        Some("asc") => Ok(FileOrder::Asc),
        Some(v) => Err(ApiError::invalid(
            "order",
            format!("order must be `asc` or `desc`, got `{v}`"),
        )),
    }
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError::Http {
        status: axum::http::StatusCode::NOT_FOUND,
        message: format!("No such {what}: {id}"),
    }
}

/// A stored file's row, or 404.
pub async fn file_row(jobs: &JobService, id: &str) -> Result<FileRow, ApiError> {
    if !valid_id(id) {
        return Err(not_found("File", id));
    }
    jobs.store
        .file(id.to_string())
        .await?
        .ok_or_else(|| not_found("File", id))
}

pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    mut form: Multipart,
) -> Result<Json<FileRow>, ApiError> {
    state.check_accepting()?;
    let jobs = jobs(&state)?;
    let limit = jobs.config.max_file_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // The form's own headers are small: a body past the limit plus 64 KiB is too large.
    if declared.is_some_and(|len| len > limit as u64 + 65536) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let bad = |e: axum::extract::multipart::MultipartError| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::invalid("file", format!("cannot read the multipart form: {e}"))
        }
    };
    let (mut purpose, mut file) = (None, None);
    while let Some(mut field) = form.next_field().await.map_err(bad)? {
        match field.name().unwrap_or("") {
            "purpose" => purpose = Some(field.text().await.map_err(bad)?),
            "file" => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                let mut bytes = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(bad)? {
                    if bytes.len() + chunk.len() > limit {
                        return Err(ApiError::PayloadTooLarge { limit });
                    }
                    bytes.extend_from_slice(&chunk);
                }
                file = Some((name, bytes));
            }
            other => {
                let other = other.to_string();
                return Err(ApiError::invalid(
                    &other,
                    format!("{other} is not supported by this server"),
                ));
            }
        }
    }
    let purpose = purpose.ok_or_else(|| ApiError::invalid("purpose", "purpose is required"))?;
    if purpose != "batch" {
        return Err(ApiError::invalid(
            "purpose",
            format!("purpose must be `batch`, got `{purpose}`"),
        ));
    }
    let (filename, bytes) = file.ok_or_else(|| ApiError::invalid("file", "file is required"))?;
    let row = FileRow {
        id: format!("file-{}", uuid::Uuid::new_v4().simple()),
        object: "file",
        status: "processed",
        bytes: bytes.len() as u64,
        created_at: unix_now(),
        filename,
        purpose,
    };
    jobs.files.write(&row.id, bytes).await?;
    jobs.store.insert_file(row.clone()).await?;
    Ok(Json(row))
}

/// OpenAI's cursor page: `after` is the last id of the previous page (as the SDK's
/// `SyncCursorPage` sends it), `limit` 1 to 10,000 (default 10,000), `order` by creation.
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    refuse_unknown_query(&q, &["after", "limit", "order", "purpose"])?;
    let limit = limit(&q, 10_000, 10_000)?;
    let order = order(&q)?;
    let after = q.get("after").cloned();
    let mut rows = jobs(&state)?
        .store
        .files(q.get("purpose").cloned(), after.clone(), order, limit)
        .await?
        .ok_or_else(|| {
            ApiError::invalid(
                "after",
                format!(
                    "after must be the id of a stored file, got `{}`",
                    after.unwrap_or_default()
                ),
            )
        })?;
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    Ok(Json(json!({
        "object": "list",
        "data": rows,
        "first_id": rows.first().map(|f| f.id.clone()),
        "last_id": rows.last().map(|f| f.id.clone()),
        "has_more": has_more,
    })))
}

pub async fn retrieve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<FileRow>, ApiError> {
    Ok(Json(file_row(jobs(&state)?, &id).await?))
}

pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let jobs = jobs(&state)?;
    file_row(jobs, &id).await?;
    jobs.store.delete_file(id.clone()).await?;
    jobs.files.remove(&id).await?;
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}

pub async fn content(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let jobs = jobs(&state)?;
    file_row(jobs, &id).await?;
    let bytes = jobs
        .files
        .read(&id)
        .await?
        .ok_or_else(|| not_found("File", &id))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}
