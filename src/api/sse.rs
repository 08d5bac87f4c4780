//! Server-sent events: each chunk as `data: {json}`, then `data: [DONE]`.
//!
//! Invariant: the event stream always ends with `[DONE]`; an error after the stream began
//! is sent as `data: {"error": {...}}` just before it. Dropping the response (the client went
//! away) drops the chunk stream and so aborts the request in the engine.

use std::convert::Infallible;
use std::pin::Pin;

use axum::http::{header, HeaderValue};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};

use super::errors::ApiError;

/// A request's chunk objects, as the SSE `data` and the WebSocket `data` carry them.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<serde_json::Value, ApiError>> + Send>>;

pub fn respond(mut chunks: ChunkStream) -> Response {
    let events = async_stream::stream! {
        while let Some(chunk) = chunks.next().await {
            match chunk {
                Ok(v) => yield Ok::<_, Infallible>(Event::default().data(v.to_string())),
                Err(e) => {
                    tracing::debug!("error in stream: {e}");
                    yield Ok(Event::default().data(e.in_stream_json().to_string()));
                    break;
                }
            }
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    let mut resp = Sse::new(events).into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies such as nginx must not buffer token streams.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}
