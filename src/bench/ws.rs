//! The WebSocket driver: requests multiplexed over a few sockets to sluice's `/v1/ws`.
//!
//! Protocol: the client sends `{"type": "completions" | "chat.completions", "id": ..,
//! "request": {same body as HTTP}}`; the server answers, per id, `{"type": "chunk", "id": ..,
//! "data": {chunk}}` frames, then `{"type": "done", "id": ..}`, or `{"type": "error", "id": ..,
//! "error": {..}}`.
//!
//! Each socket is owned by one task that writes outgoing requests and routes incoming frames
//! to the waiting request through a bounded per-request channel, stamping each frame with the
//! time it was read so routing delay does not count against the server. When a socket breaks,
//! every request pending on it ends with a `connection` error.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::client::{ErrorKind, RequestError, RequestRecord, StreamTracker};
use super::sse::{error_message, ChunkInfo, RawChunk};
use super::{BenchError, Endpoint};

/// Frames buffered per request before the socket task waits for the request to catch up.
const EVENTS_PER_REQUEST: usize = 256;
/// Requests queued per socket before senders wait.
const OUTGOING_PER_SOCKET: usize = 64;

enum WsEvent {
    Chunk(ChunkInfo, Instant),
    Done(Instant),
    Error(RequestError, Instant),
}

struct Outgoing {
    id: String,
    text: String,
    events: mpsc::Sender<WsEvent>,
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(default, borrow)]
    data: Option<RawChunk<'a>>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

pub struct WsDriver {
    sockets: Vec<mpsc::Sender<Outgoing>>,
    next_socket: AtomicUsize,
    next_id: AtomicU64,
    request_type: &'static str,
    timeout: Duration,
}

impl WsDriver {
    /// Opens `num_sockets` sockets to `url` (`ws://host/v1/ws`); fails if any cannot open.
    pub async fn connect(
        url: &str,
        api_key: Option<&str>,
        num_sockets: usize,
        endpoint: Endpoint,
        timeout: Duration,
    ) -> Result<Self, BenchError> {
        let connect_error = |message: String| BenchError::Connect {
            url: url.to_string(),
            message,
        };
        let mut sockets = Vec::new();
        for _ in 0..num_sockets.max(1) {
            let mut request = url
                .into_client_request()
                .map_err(|e| connect_error(e.to_string()))?;
            if let Some(key) = api_key {
                let value = format!("Bearer {key}")
                    .parse()
                    .map_err(|_| connect_error("API key is not a valid header value".into()))?;
                request.headers_mut().insert("authorization", value);
            }
            let (stream, _) = tokio_tungstenite::connect_async(request)
                .await
                .map_err(|e| connect_error(e.to_string()))?;
            let (tx, rx) = mpsc::channel(OUTGOING_PER_SOCKET);
            tokio::spawn(socket_task(stream, rx));
            sockets.push(tx);
        }
        Ok(WsDriver {
            sockets,
            next_socket: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            request_type: match endpoint {
                Endpoint::Chat => "chat.completions",
                Endpoint::Completions => "completions",
            },
            timeout,
        })
    }

    pub fn num_sockets(&self) -> usize {
        self.sockets.len()
    }

    pub async fn send(&self, body: &str, origin: Instant) -> RequestRecord {
        let id = format!("r{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let text = format!(
            r#"{{"type":"{}","id":"{id}","request":{body}}}"#,
            self.request_type
        );
        let socket =
            &self.sockets[self.next_socket.fetch_add(1, Ordering::Relaxed) % self.sockets.len()];
        let (tx, mut rx) = mpsc::channel(EVENTS_PER_REQUEST);
        let mut tracker = StreamTracker::start(origin);
        if socket
            .send(Outgoing {
                id,
                text,
                events: tx,
            })
            .await
            .is_err()
        {
            let e = RequestError::new(ErrorKind::Connection, "WebSocket closed");
            return tracker.finish(Instant::now(), Err(e));
        }
        let mut end = None;
        let result =
            match tokio::time::timeout(self.timeout, pump(&mut rx, &mut tracker, &mut end)).await {
                Ok(r) => r,
                Err(_) => Err(RequestError::new(
                    ErrorKind::Timeout,
                    format!("no done frame after {:?}", self.timeout),
                )),
            };
        tracker.finish(end.unwrap_or_else(Instant::now), result)
    }
}

/// Feeds one request's events into its tracker until `done`, an error, or a closed socket.
async fn pump(
    rx: &mut mpsc::Receiver<WsEvent>,
    tracker: &mut StreamTracker,
    end: &mut Option<Instant>,
) -> Result<(), RequestError> {
    while let Some(event) = rx.recv().await {
        match event {
            WsEvent::Chunk(info, at) => {
                *end = Some(at);
                tracker.on_chunk(&info, at)?;
            }
            WsEvent::Done(at) => {
                *end = Some(at);
                tracker.on_done();
                return Ok(());
            }
            WsEvent::Error(e, at) => {
                *end = Some(at);
                return Err(e);
            }
        }
    }
    Err(RequestError::new(
        ErrorKind::Connection,
        "WebSocket closed mid-stream",
    ))
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn socket_task(socket: Socket, mut outgoing: mpsc::Receiver<Outgoing>) {
    let (mut sink, mut stream) = socket.split();
    let mut pending: HashMap<String, mpsc::Sender<WsEvent>> = HashMap::new();
    let failure = loop {
        tokio::select! {
            out = outgoing.recv() => {
                // The driver is gone: nothing waits for answers any more.
                let Some(out) = out else { return };
                match sink.send(Message::text(out.text)).await {
                    Ok(()) => {
                        pending.insert(out.id, out.events);
                    }
                    Err(e) => {
                        let e = RequestError::new(ErrorKind::Connection, e);
                        let _ = out.events.send(WsEvent::Error(e.clone(), Instant::now())).await;
                        break e;
                    }
                }
            }
            msg = stream.next() => {
                let at = Instant::now();
                match msg {
                    Some(Ok(Message::Text(text))) => route(text.as_str(), at, &mut pending).await,
                    Some(Ok(Message::Close(frame))) => {
                        break RequestError::new(
                            ErrorKind::Connection,
                            format!("WebSocket closed by server: {frame:?}"),
                        );
                    }
                    Some(Ok(_)) => {} // ping/pong are answered by tungstenite
                    Some(Err(e)) => break RequestError::new(ErrorKind::Connection, e),
                    None => break RequestError::new(ErrorKind::Connection, "WebSocket closed"),
                }
            }
        }
    };
    for (_, events) in pending.drain() {
        let _ = events
            .send(WsEvent::Error(failure.clone(), Instant::now()))
            .await;
    }
}

/// Hands one incoming frame to the request it names.
async fn route(text: &str, at: Instant, pending: &mut HashMap<String, mpsc::Sender<WsEvent>>) {
    let frame: Frame<'_> = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("unroutable WebSocket frame ({e}): {text:.200}");
            return;
        }
    };
    let (event, last) = match (frame.kind.as_ref(), frame.data) {
        ("chunk", Some(chunk)) => (WsEvent::Chunk(chunk.info(), at), false),
        ("chunk", None) => (
            WsEvent::Error(
                RequestError::new(ErrorKind::BadChunk, "chunk frame without data"),
                at,
            ),
            true,
        ),
        ("done", _) => (WsEvent::Done(at), true),
        ("error", _) => {
            let message = frame
                .error
                .as_ref()
                .map(error_message)
                .unwrap_or_else(|| "error frame without error".into());
            (
                WsEvent::Error(RequestError::new(ErrorKind::InBand, message), at),
                true,
            )
        }
        (other, _) => {
            tracing::warn!("unknown WebSocket frame type {other:?}");
            return;
        }
    };
    let id = frame.id.as_ref();
    let Some(events) = pending.get(id) else {
        return; // a request that already timed out
    };
    if events.send(event).await.is_err() || last {
        pending.remove(id);
    }
}
