//! Request ids and the access log: every response carries `x-request-id` (the client's, when
//! it sent a usable one, else a new one), and every request is logged once, with that id,
//! under the target `sluice::access` (probes and scrapes at debug level, so they do not
//! drown the rest). With `--log-format json` each line is one JSON object a log pipeline reads
//! without parsing text.

use std::time::Instant;

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A client's id is kept when it is short printable ASCII (it goes into logs and headers).
fn usable(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

pub async fn request_id_and_access_log(mut request: Request, next: Next) -> Response {
    let start = Instant::now();
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| usable(v))
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_string);
    let value = HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("invalid"));
    // Handlers downstream see the id the response will carry.
    request.headers_mut().insert(REQUEST_ID, value.clone());
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    // Generation handlers put the id on their summary line (`telemetry::RequestTrace`).
    let mut response = crate::telemetry::REQUEST_ID
        .scope(id.clone(), next.run(request))
        .await;
    response.headers_mut().insert(REQUEST_ID, value);
    let status = response.status().as_u16();
    // Time to the response's head: a stream's own length is in the latency metrics.
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if path.starts_with("/health") || path == "/metrics" {
        tracing::debug!(target: "sluice::access", request_id = %id, %method, %path, status, duration_ms = ms, "request");
    } else {
        tracing::info!(target: "sluice::access", request_id = %id, %method, %path, status, duration_ms = ms, "request");
    }
    response
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_short_printable_ids_are_kept() {
        assert!(super::usable("req-123_abc"));
        assert!(!super::usable(""));
        assert!(!super::usable("has space"));
        assert!(!super::usable(&"x".repeat(129)));
    }
}
