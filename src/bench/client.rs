//! Request drivers and what they measure per request.
//!
//! A driver sends one pre-serialised body and returns one `RequestRecord`, always: a failure
//! (HTTP status, in-band error chunk, connection error, timeout, a stream that ends without
//! `[DONE]`, an unparsable chunk) is a record with an `error`, never a lost request.
//!
//! Timing: `ttft` is from just before the request is sent to the arrival of the first chunk
//! with non-empty content; each inter-token latency (ITL) is the gap between consecutive
//! content chunks (a chunk holding several tokens is one gap, as in vLLM's bench); `e2e` ends
//! at `[DONE]` (or at the failure). Timestamps are taken when the bytes are read off the
//! socket, before parsing.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::grpc::GrpcDriver;
use super::sse::{parse_chunk, ChunkInfo, SseEvent, SseLines, Usage};
use super::ws::WsDriver;
use super::BenchError;

/// Why a request failed; `label()` is its key in the report's error counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// the server answered with a non-2xx status
    Http(u16),
    /// the stream carried an `{"error": ..}` chunk
    InBand,
    /// connecting failed, or the connection broke mid-stream
    Connection,
    /// the request ran past `--timeout`
    Timeout,
    /// the stream ended cleanly but without `[DONE]`
    Incomplete,
    /// a chunk was not valid JSON of the expected shape
    BadChunk,
}

impl ErrorKind {
    pub fn label(&self) -> String {
        match self {
            ErrorKind::Http(status) => format!("http_{status}"),
            ErrorKind::InBand => "in_band".into(),
            ErrorKind::Connection => "connection".into(),
            ErrorKind::Timeout => "timeout".into(),
            ErrorKind::Incomplete => "incomplete".into(),
            ErrorKind::BadChunk => "bad_chunk".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestError {
    pub kind: ErrorKind,
    pub message: String,
}

impl RequestError {
    pub fn new(kind: ErrorKind, message: impl std::fmt::Display) -> Self {
        RequestError {
            kind,
            message: message.to_string(),
        }
    }
}

/// Where a record's `output_tokens` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CountSource {
    /// the server's final `usage.completion_tokens`
    Usage,
    /// the number of content chunks (the server sent no usage)
    Chunks,
}

/// One request's measurements. Times in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// when it was sent, from the start of measurement
    pub start_s: f64,
    /// time to first content chunk; `None` when none arrived
    pub ttft_s: Option<f64>,
    pub e2e_s: f64,
    /// gaps between consecutive content chunks
    pub itls_s: Vec<f64>,
    /// in tokens, from `usage`, else the workload's own count (random and prefix workloads)
    pub input_tokens: Option<u64>,
    /// in tokens
    pub output_tokens: u64,
    pub output_counted_by: CountSource,
    pub error: Option<RequestError>,
}

impl RequestRecord {
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }

    /// Time per output token after the first: (e2e − ttft) / (output_tokens − 1).
    pub fn tpot_s(&self) -> Option<f64> {
        let ttft = self.ttft_s?;
        (self.output_tokens > 1).then(|| (self.e2e_s - ttft) / (self.output_tokens - 1) as f64)
    }
}

/// Accumulates one stream's chunks into a `RequestRecord`; shared by the SSE and WS drivers.
#[derive(Debug)]
pub struct StreamTracker {
    sent_at: Instant,
    start_s: f64,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
    itls_s: Vec<f64>,
    content_chunks: u64,
    usage: Option<Usage>,
    done: bool,
}

impl StreamTracker {
    /// Starts the clock of a request sent now; `origin` is the start of measurement.
    pub fn start(origin: Instant) -> Self {
        let sent_at = Instant::now();
        StreamTracker {
            sent_at,
            start_s: sent_at.saturating_duration_since(origin).as_secs_f64(),
            first_at: None,
            last_at: None,
            itls_s: Vec::new(),
            content_chunks: 0,
            usage: None,
            done: false,
        }
    }

    /// Records a chunk read at `at`; an in-band error chunk ends the request with an error.
    pub fn on_chunk(&mut self, info: &ChunkInfo, at: Instant) -> Result<(), RequestError> {
        if let Some(message) = &info.error {
            return Err(RequestError::new(ErrorKind::InBand, message));
        }
        if info.has_content {
            if self.first_at.is_none() {
                self.first_at = Some(at);
            }
            if let Some(last) = self.last_at {
                self.itls_s
                    .push(at.saturating_duration_since(last).as_secs_f64());
            }
            self.last_at = Some(at);
            self.content_chunks += 1;
        }
        if info.usage.is_some() {
            self.usage = info.usage;
        }
        Ok(())
    }

    pub fn on_done(&mut self) {
        self.done = true;
    }

    /// The record of a stream that ended at `end` with `result`.
    pub fn finish(self, end: Instant, result: Result<(), RequestError>) -> RequestRecord {
        let error = match result {
            Err(e) => Some(e),
            Ok(()) if !self.done => Some(RequestError::new(
                ErrorKind::Incomplete,
                "stream ended without [DONE]",
            )),
            Ok(()) => None,
        };
        let (output_tokens, output_counted_by) = match self.usage {
            Some(u) => (u.completion_tokens, CountSource::Usage),
            None => (self.content_chunks, CountSource::Chunks),
        };
        RequestRecord {
            start_s: self.start_s,
            ttft_s: self
                .first_at
                .map(|t| t.saturating_duration_since(self.sent_at).as_secs_f64()),
            e2e_s: end.saturating_duration_since(self.sent_at).as_secs_f64(),
            itls_s: self.itls_s,
            input_tokens: self.usage.and_then(|u| u.prompt_tokens),
            output_tokens,
            output_counted_by,
            error,
        }
    }
}

/// A transport, chosen once per run.
pub enum Driver {
    Http(HttpDriver),
    Ws(WsDriver),
    Grpc(GrpcDriver),
}

impl Driver {
    /// Sends `body` and measures it; `origin` is the start of measurement.
    pub async fn send(&self, body: &str, origin: Instant) -> RequestRecord {
        match self {
            Driver::Http(d) => d.send(body, origin).await,
            Driver::Ws(d) => d.send(body, origin).await,
            Driver::Grpc(d) => d.send(body, origin).await,
        }
    }
}

/// SSE over HTTP with one shared keep-alive connection pool.
pub struct HttpDriver {
    client: reqwest::Client,
    url: String,
    api_key: Option<String>,
    timeout: Duration,
    /// streamed (SSE) requests, else whole responses
    stream: bool,
}

/// How much of an error response's body is kept as its message.
const MAX_ERROR_BODY: usize = 2048;

impl HttpDriver {
    /// `url` is the full endpoint URL; `pool_size` the most requests in flight at once.
    pub fn new(
        url: String,
        api_key: Option<String>,
        pool_size: usize,
        timeout: Duration,
    ) -> Result<Self, BenchError> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(pool_size.max(1))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .http1_only()
            .build()
            .map_err(|e| BenchError::Connect {
                url: url.clone(),
                message: e.to_string(),
            })?;
        Ok(HttpDriver {
            client,
            url,
            api_key,
            timeout,
            stream: true,
        })
    }

    /// Streamed requests (the default), or whole responses.
    pub fn streaming(mut self, stream: bool) -> Self {
        self.stream = stream;
        self
    }

    pub async fn send(&self, body: &str, origin: Instant) -> RequestRecord {
        let mut tracker = StreamTracker::start(origin);
        let result = if self.stream {
            within(self.timeout, "[DONE]", self.stream(body, &mut tracker)).await
        } else {
            within(self.timeout, "response", self.whole(body, &mut tracker)).await
        };
        tracker.finish(Instant::now(), result)
    }

    /// Sends `body`; the response when its status is 2xx.
    async fn post(&self, body: &str, accept: &str) -> Result<reqwest::Response, RequestError> {
        let mut req = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, accept)
            .body(body.to_owned());
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        let resp = req.send().await.map_err(transport_error)?;
        let status = resp.status();
        if !status.is_success() {
            let message = read_error_body(resp).await;
            return Err(RequestError::new(ErrorKind::Http(status.as_u16()), message));
        }
        Ok(resp)
    }

    /// A whole response: its arrival is both the first token and the end.
    async fn whole(&self, body: &str, tracker: &mut StreamTracker) -> Result<(), RequestError> {
        let resp = self.post(body, "application/json").await?;
        let bytes = resp.bytes().await.map_err(transport_error)?;
        let info = parse_chunk(&bytes).map_err(|e| bad_chunk(e, &bytes))?;
        tracker.on_chunk(&info, Instant::now())?;
        tracker.on_done();
        Ok(())
    }

    async fn stream(&self, body: &str, tracker: &mut StreamTracker) -> Result<(), RequestError> {
        let resp = self.post(body, "text/event-stream").await?;
        let mut bytes = resp.bytes_stream();
        let mut lines = SseLines::default();
        while let Some(item) = bytes.next().await {
            let at = Instant::now();
            lines.push(&item.map_err(transport_error)?);
            while let Some(event) = lines.next_event() {
                match event {
                    SseEvent::Done => {
                        tracker.on_done();
                        return Ok(());
                    }
                    SseEvent::Data(data) => {
                        let info = parse_chunk(data).map_err(|e| bad_chunk(e, data))?;
                        tracker.on_chunk(&info, at)?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn bad_chunk(e: String, data: &[u8]) -> RequestError {
    RequestError::new(
        ErrorKind::BadChunk,
        format!("{e}: {}", String::from_utf8_lossy(data)),
    )
}

fn transport_error(e: reqwest::Error) -> RequestError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Connection
    };
    // reqwest's Display hides the cause ("error decoding response body"); show the chain.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    RequestError::new(kind, message)
}

/// The start of an error response's body: its OpenAI `error.message` when it has one.
async fn read_error_body(resp: reqwest::Response) -> String {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() >= MAX_ERROR_BODY {
            body.truncate(MAX_ERROR_BODY);
            break;
        }
    }
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) if v.get("error").is_some() => super::sse::error_message(&v["error"]),
        _ => String::from_utf8_lossy(&body).into_owned(),
    }
}

/// `stream` bounded by `timeout`: past it, a timeout error saying what never came.
pub(super) async fn within(
    timeout: Duration,
    awaited: &str,
    stream: impl std::future::Future<Output = Result<(), RequestError>>,
) -> Result<(), RequestError> {
    tokio::time::timeout(timeout, stream)
        .await
        .unwrap_or_else(|_| {
            Err(RequestError::new(
                ErrorKind::Timeout,
                format!("no {awaited} after {timeout:?}"),
            ))
        })
}
