//! The OpenAPI description of the Files, Batch and async APIs (`files.rs`, `batches.rs`),
//! merged into `/openapi.json` by `openapi.rs`. The handlers build their answers as JSON
//! values in `jobs/`; the types below only describe those shapes (and the multipart upload)
//! for the document, so they are never constructed.
#![allow(dead_code)]

use utoipa::{OpenApi, ToSchema};

use super::openai_types::{ChatCompletionRequest, CompletionRequest};

/// `POST /v1/files`'s multipart form.
#[derive(ToSchema)]
pub struct FileUpload {
    /// Only `batch`.
    purpose: String,
    /// The JSONL input, at most `--max-file-bytes`.
    #[schema(format = Binary, value_type = String)]
    file: Vec<u8>,
}

/// A stored file.
#[derive(ToSchema)]
pub struct FileObject {
    id: String,
    /// `file`
    object: String,
    /// in bytes
    bytes: u64,
    /// Unix seconds
    created_at: i64,
    filename: String,
    /// `batch` (uploads) or `batch_output` (output and error files)
    purpose: String,
    /// `processed`
    status: String,
}

/// A cursor page of files.
#[derive(ToSchema)]
pub struct FileList {
    /// `list`
    object: String,
    data: Vec<FileObject>,
    first_id: Option<String>,
    last_id: Option<String>,
    has_more: bool,
}

#[derive(ToSchema)]
pub struct DeletedFile {
    id: String,
    object: String,
    deleted: bool,
}

/// `POST /v1/batches`'s body; any other field is a 400.
#[derive(ToSchema)]
pub struct CreateBatchRequest {
    /// A file of purpose `batch`.
    input_file_id: String,
    /// `/v1/chat/completions` or `/v1/completions`
    endpoint: String,
    /// `24h`, `<n>h`, `<n>m` or `<n>s`
    completion_window: String,
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(ToSchema)]
pub struct RequestCounts {
    total: u64,
    completed: u64,
    failed: u64,
}

/// A batch (OpenAI's `Batch` object). Timestamps are Unix seconds, `null` until reached.
#[derive(ToSchema)]
pub struct Batch {
    id: String,
    /// `batch`
    object: String,
    endpoint: String,
    input_file_id: String,
    completion_window: String,
    /// `validating`, `in_progress`, `finalizing`, `completed`, `failed`, `expired`,
    /// `cancelling` or `cancelled`
    status: String,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    errors: Option<serde_json::Value>,
    request_counts: RequestCounts,
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    created_at: i64,
    expires_at: i64,
    in_progress_at: Option<i64>,
    finalizing_at: Option<i64>,
    completed_at: Option<i64>,
    failed_at: Option<i64>,
    expired_at: Option<i64>,
    cancelling_at: Option<i64>,
    cancelled_at: Option<i64>,
}

/// A cursor page of batches, newest first.
#[derive(ToSchema)]
pub struct BatchList {
    object: String,
    data: Vec<Batch>,
    first_id: Option<String>,
    last_id: Option<String>,
    has_more: bool,
}

/// A chat request to run later; `webhook_url` is taken out before the body is checked.
#[derive(ToSchema)]
pub struct AsyncChatRequest {
    #[serde(flatten)]
    request: ChatCompletionRequest,
    /// POSTed the finished job; its host must be in `--webhook-allowed-hosts`.
    webhook_url: Option<String>,
}

/// A completion request to run later.
#[derive(ToSchema)]
pub struct AsyncCompletionRequest {
    #[serde(flatten)]
    request: CompletionRequest,
    webhook_url: Option<String>,
}

/// An async job. `result` is the endpoint's answer once `completed`; `error` the OpenAI
/// error object once `failed`.
#[derive(ToSchema)]
pub struct AsyncJob {
    id: String,
    /// `async_job`
    object: String,
    endpoint: String,
    /// `queued`, `in_progress`, `completed`, `failed` or `cancelled`
    status: String,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    webhook_url: Option<String>,
    result: Option<serde_json::Value>,
    error: Option<serde_json::Value>,
}

const OFF: &str = "Not found, or the jobs APIs are off (no `--data-dir`)";

#[utoipa::path(post, path = "/v1/files",
    request_body(content = FileUpload, content_type = "multipart/form-data"),
    responses((status = 200, body = FileObject),
              (status = 400, description = "Invalid form (names the field)"),
              (status = 404, description = OFF),
              (status = 413, description = "Over --max-file-bytes")))]
fn create_file() {}

#[utoipa::path(get, path = "/v1/files",
    params(("after" = Option<String>, Query, description = "The last id of the previous page"),
           ("limit" = Option<u32>, Query, description = "1 to 10000, default 10000"),
           ("order" = Option<String>, Query, description = "`desc` (default) or `asc`"),
           ("purpose" = Option<String>, Query, description = "Only files of this purpose")),
    responses((status = 200, body = FileList),
              (status = 400, description = "A bad or unknown query parameter (named)"),
              (status = 404, description = OFF)))]
fn list_files() {}

#[utoipa::path(get, path = "/v1/files/{id}", params(("id" = String, Path)),
    responses((status = 200, body = FileObject), (status = 404, description = OFF)))]
fn retrieve_file() {}

#[utoipa::path(delete, path = "/v1/files/{id}", params(("id" = String, Path)),
    responses((status = 200, body = DeletedFile), (status = 404, description = OFF)))]
fn delete_file() {}

#[utoipa::path(get, path = "/v1/files/{id}/content", params(("id" = String, Path)),
    responses((status = 200, description = "The file's bytes (JSONL)", content_type = "application/octet-stream"),
              (status = 404, description = OFF)))]
fn file_content() {}

#[utoipa::path(post, path = "/v1/batches", request_body = CreateBatchRequest,
    responses((status = 200, body = Batch),
              (status = 400, description = "Invalid request (names the field)"),
              (status = 404, description = OFF)))]
fn create_batch() {}

#[utoipa::path(get, path = "/v1/batches",
    params(("after" = Option<String>, Query, description = "The last id of the previous page"),
           ("limit" = Option<u32>, Query, description = "1 to 100, default 20")),
    responses((status = 200, body = BatchList),
              (status = 400, description = "A bad or unknown query parameter (named)"),
              (status = 404, description = OFF)))]
fn list_batches() {}

#[utoipa::path(get, path = "/v1/batches/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Batch), (status = 404, description = OFF)))]
fn retrieve_batch() {}

#[utoipa::path(post, path = "/v1/batches/{id}/cancel", params(("id" = String, Path)),
    responses((status = 200, body = Batch), (status = 404, description = OFF)))]
fn cancel_batch() {}

#[utoipa::path(post, path = "/v1/async/chat/completions", request_body = AsyncChatRequest,
    responses((status = 202, body = AsyncJob),
              (status = 400, description = "Invalid request (names the field)"),
              (status = 404, description = OFF)))]
fn async_chat() {}

#[utoipa::path(post, path = "/v1/async/completions", request_body = AsyncCompletionRequest,
    responses((status = 202, body = AsyncJob),
              (status = 400, description = "Invalid request (names the field)"),
              (status = 404, description = OFF)))]
fn async_completions() {}

#[utoipa::path(get, path = "/v1/async/jobs/{id}", params(("id" = String, Path)),
    responses((status = 200, body = AsyncJob), (status = 404, description = OFF)))]
fn async_job() {}

#[utoipa::path(post, path = "/v1/async/jobs/{id}/cancel", params(("id" = String, Path)),
    responses((status = 200, body = AsyncJob), (status = 404, description = OFF)))]
fn cancel_async_job() {}

#[derive(OpenApi)]
#[openapi(
    paths(
        create_file,
        list_files,
        retrieve_file,
        delete_file,
        file_content,
        create_batch,
        list_batches,
        retrieve_batch,
        cancel_batch,
        async_chat,
        async_completions,
        async_job,
        cancel_async_job
    ),
    components(schemas(
        FileUpload,
        FileObject,
        FileList,
        DeletedFile,
        CreateBatchRequest,
        RequestCounts,
        Batch,
        BatchList,
        AsyncChatRequest,
        AsyncCompletionRequest,
        AsyncJob
    ))
)]
pub struct JobsDoc;
