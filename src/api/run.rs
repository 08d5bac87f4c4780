//! One request body run to its whole JSON response, exactly as `POST /v1/chat/completions`,
//! `/v1/completions` or `/v1/embeddings` runs it (the same `prepare` and `collect`: validation, unknown fields
//! refused, chat template, tools, structured outputs), at a given priority. The batch and
//! async runners (`jobs/`) and the offline `sluice batch run` call it through `Executor`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;

use serde_json::Value;

use super::embeddings::{self, EmbeddingRequest};
use super::errors::ApiError;
use super::openai_types::{ChatCompletionRequest, CompletionRequest};
use super::{chat, completions, from_value, AppState};
use crate::jobs::{Endpoint, Executor, Failure, Outcome};

/// Runs `body` as `endpoint` would, non-streaming, at `priority`.
pub async fn run(
    state: &AppState,
    endpoint: Endpoint,
    body: Value,
    priority: i32,
) -> Result<Value, ApiError> {
    state.check_accepting()?;
    let response = match endpoint {
        Endpoint::Chat => {
            let req: ChatCompletionRequest = from_value(body)?;
            refuse_stream(req.common.stream)?;
            let prepared = chat::prepare_at(state, req, Some(priority)).await?;
            serde_json::to_value(chat::collect(prepared).await?)
        }
        Endpoint::Completions => {
            let req: CompletionRequest = from_value(body)?;
            refuse_stream(req.common.stream)?;
            let prepared = completions::prepare_at(state, req, Some(priority)).await?;
            serde_json::to_value(completions::collect(prepared).await?)
        }
        Endpoint::Embeddings => {
            let req: EmbeddingRequest = from_value(body)?;
            serde_json::to_value(embeddings::embed_at(state, req, Some(priority)).await?)
        }
    };
    response.map_err(|e| ApiError::Internal(format!("cannot serialize the response: {e}")))
}

/// Parses `body` as `endpoint`'s request (wrong types are a 400 naming the field) and
/// refuses `stream`: what an async job is checked with when it is submitted.
pub fn check_body(endpoint: Endpoint, body: &Value) -> Result<(), ApiError> {
    let stream = match endpoint {
        Endpoint::Chat => {
            from_value::<ChatCompletionRequest>(body.clone())?
                .common
                .stream
        }
        Endpoint::Completions => from_value::<CompletionRequest>(body.clone())?.common.stream,
        Endpoint::Embeddings => from_value::<EmbeddingRequest>(body.clone()).map(|_| false)?,
    };
    refuse_stream(stream)
}

fn refuse_stream(stream: bool) -> Result<(), ApiError> {
    if stream {
        return Err(ApiError::invalid(
            "stream",
            "stream is not supported for batch and async requests: their response is stored whole",
        ));
    }
    Ok(())
}

/// A request's error as a batch line or job records it.
pub fn failure(e: &ApiError) -> Failure {
    Failure {
        status: e.status().as_u16(),
        body: serde_json::json!({ "error": e.object() }),
        retry: matches!(e, ApiError::Overloaded(_) | ApiError::Unavailable(_)),
    }
}

/// The jobs' way into the API.
pub struct ApiExecutor(pub AppState);

impl Executor for ApiExecutor {
    fn execute(
        &self,
        endpoint: Endpoint,
        body: Value,
        priority: i32,
    ) -> Pin<Box<dyn Future<Output = Outcome> + Send>> {
        let state = self.0.clone();
        Box::pin(async move {
            run(&state, endpoint, body, priority)
                .await
                .map_err(|e| failure(&e))
        })
    }

    fn shutting_down(&self) -> bool {
        self.0.shutting_down.load(Ordering::Acquire)
    }

    fn requests_in_engine(&self) -> usize {
        let engines = self.0.models.engines();
        let n: i64 = engines
            .iter()
            .map(|m| {
                let x = &m.engine.metrics;
                x.num_requests_running.get() + x.num_requests_waiting.get()
            })
            .sum();
        usize::try_from(n).unwrap_or(0)
    }
}
