//! Streaming over one WebSocket: several requests in flight, each tagged with the client's
//! `id`. The protocol is in `docs/websocket.md`.
//!
//! ```text
//! client → {"type": "chat.completions" | "completions", "id": ID, "request": {...}}
//!          {"type": "cancel", "id": ID}
//! server → {"type": "chunk", "id": ID, "data": {chunk, as the SSE data}}   (any number)
//!          then exactly one of {"type": "done", "id": ID}
//!                              {"type": "error", "id": ID, "error": {OpenAI error object}}
//! ```
//! Invariants: every accepted request gets exactly one `done` or `error`; a cancel or a
//! closed socket drops the request's chunk stream, which aborts it in the engine within a
//! step. One writer task owns the socket's sending half; request tasks reach it through a
//! bounded channel.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::errors::ApiError;
use super::openai_types::{ChatCompletionRequest, CompletionRequest};
use super::sse::ChunkStream;
use super::{chat, completions, from_value, AppState};

/// Outgoing messages buffered per socket before request tasks wait for the client.
const OUTGOING_BUFFER: usize = 256;

/// How often an idle socket checks whether the server is draining.
const DRAIN_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

pub async fn handler(State(state): State<AppState>, ws: WebSocketUpgrade) -> Response {
    // The session outlives this handler: it keeps the key its requests are limited by.
    let key = super::keys::current();
    ws.max_message_size(state.config.max_body_bytes)
        .on_upgrade(move |socket| super::keys::scope(key, run(socket, state)))
}

#[derive(Debug, Deserialize)]
struct ClientMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Value,
    #[serde(default)]
    request: Option<Value>,
}

fn error_message(id: &Value, e: &ApiError) -> Message {
    text(json!({"type": "error", "id": id, "error": e.object()}))
}

fn text(v: Value) -> Message {
    Message::Text(v.to_string().into())
}

/// Counts a session open for as long as it lives.
struct OpenSocket(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl OpenSocket {
    fn new(state: &AppState) -> Self {
        state.open_sockets.fetch_add(1, Ordering::AcqRel);
        Self(state.open_sockets.clone())
    }
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn run(socket: WebSocket, state: AppState) {
    let _open = OpenSocket::new(&state);
    let (mut sink, mut incoming) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Message>(OUTGOING_BUFFER);
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if sink.send(msg).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let mut tasks = JoinSet::new();
    let mut cancels: HashMap<String, oneshot::Sender<()>> = HashMap::new();
    // While the server drains, a socket with nothing in flight closes (new requests on it
    // are refused anyway), so shutdown need not wait for the client to hang up.
    let mut drain_check = tokio::time::interval(DRAIN_CHECK);
    loop {
        tokio::select! {
            _ = drain_check.tick() => {
                if tasks.is_empty() && state.shutting_down.load(Ordering::Acquire) {
                    break;
                }
            }
            msg = incoming.next() => {
                let body = match msg {
                    Some(Ok(Message::Text(t))) => t.as_str().to_string(),
                    Some(Ok(Message::Binary(b))) => String::from_utf8_lossy(&b).into_owned(),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    None | Some(Ok(Message::Close(_))) | Some(Err(_)) => break,
                };
                on_message(&state, &body, &tx, &mut tasks, &mut cancels).await;
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    // The client is gone: abort every request of this socket (their streams drop).
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    drop(tx);
    let _ = writer.await;
}

async fn on_message(
    state: &AppState,
    body: &str,
    tx: &mpsc::Sender<Message>,
    tasks: &mut JoinSet<()>,
    cancels: &mut HashMap<String, oneshot::Sender<()>>,
) {
    let msg: ClientMessage = match serde_json::from_str(body) {
        Ok(m) => m,
        Err(e) => {
            let e = ApiError::InvalidRequest {
                message: format!("invalid message: {e}"),
                param: None,
            };
            let _ = tx.send(error_message(&Value::Null, &e)).await;
            return;
        }
    };
    let key = msg.id.to_string();
    cancels.retain(|_, c| !c.is_closed());
    match msg.kind.as_str() {
        // A cancel of a request that already ended (or never was) is ignored: it races with
        // the natural end, and the client has its terminal message either way.
        "cancel" => {
            if let Some(c) = cancels.remove(&key) {
                let _ = c.send(());
            }
        }
        kind @ ("chat.completions" | "completions") => {
            let refuse = |message: &str, param: &str| ApiError::invalid(param, message);
            let err = if msg.id.is_null() {
                Some(refuse("every request needs an `id`", "id"))
            } else if cancels.contains_key(&key) {
                Some(refuse(
                    "a request with this `id` is already in flight",
                    "id",
                ))
            } else if msg.request.is_none() {
                Some(refuse("the message has no `request`", "request"))
            } else {
                state.check_accepting().err()
            };
            if let Some(e) = err {
                let _ = tx.send(error_message(&msg.id, &e)).await;
                return;
            }
            let (cancel_tx, cancel_rx) = oneshot::channel();
            cancels.insert(key, cancel_tx);
            let request = msg.request.unwrap_or(Value::Null);
            let is_chat = kind == "chat.completions";
            // Each request runs under the session's key (its rate limits).
            tasks.spawn(super::keys::scope(
                super::keys::current(),
                serve_request(
                    state.clone(),
                    msg.id,
                    is_chat,
                    request,
                    tx.clone(),
                    cancel_rx,
                ),
            ));
        }
        other => {
            let e = ApiError::invalid(
                "type",
                format!("unknown message type `{other}` (expected chat.completions, completions or cancel)"),
            );
            let _ = tx.send(error_message(&msg.id, &e)).await;
        }
    }
}

/// Validates and submits one request (always streaming), then pumps its chunks until the
/// end, an error, or a cancel.
async fn prepare(state: &AppState, is_chat: bool, request: Value) -> Result<ChunkStream, ApiError> {
    if is_chat {
        let mut req: ChatCompletionRequest = from_value(request)?;
        req.common.stream = true;
        Ok(chat::chunks(chat::prepare(state, req).await?))
    } else {
        let mut req: CompletionRequest = from_value(request)?;
        req.common.stream = true;
        Ok(completions::chunks(completions::prepare(state, req).await?))
    }
}

async fn serve_request(
    state: AppState,
    id: Value,
    is_chat: bool,
    request: Value,
    tx: mpsc::Sender<Message>,
    mut cancel: oneshot::Receiver<()>,
) {
    let mut chunks = tokio::select! {
        prepared = prepare(&state, is_chat, request) => match prepared {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(error_message(&id, &e)).await;
                return;
            }
        },
        _ = &mut cancel => {
            let _ = tx.send(text(json!({"type": "done", "id": id, "cancelled": true}))).await;
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut cancel => {
                drop(chunks);
                let _ = tx.send(text(json!({"type": "done", "id": id, "cancelled": true}))).await;
                return;
            }
            chunk = chunks.next() => {
                let msg = match chunk {
                    Some(Ok(data)) => text(json!({"type": "chunk", "id": id, "data": data})),
                    Some(Err(e)) => {
                        let _ = tx.send(error_message(&id, &e)).await;
                        return;
                    }
                    None => {
                        let _ = tx.send(text(json!({"type": "done", "id": id}))).await;
                        return;
                    }
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        }
    }
}
