//! `sluice bench mock-server`: an OpenAI-compatible server that generates nothing, streaming
//! `max_tokens` chunks at a fixed pace (first after `ttft_ms`, then every `itl_ms`) over SSE
//! and the WebSocket protocol of `bench::ws`. Its use is measuring the bench itself: run it in
//! another process and the client's figures show the client's own overhead and ceiling.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{SinkExt, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::BenchError;

/// Arguments of `sluice bench mock-server`.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct MockArgs {
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub addr: SocketAddr,
    /// Delay before the first token, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub ttft_ms: u64,
    /// Delay between tokens, in milliseconds.
    #[arg(long, default_value_t = 10)]
    pub itl_ms: u64,
}

/// Tokens streamed when a request names no `max_tokens`.
const DEFAULT_MAX_TOKENS: u64 = 16;

pub fn mock_server(args: MockArgs) -> Result<(), BenchError> {
    let runtime = tokio::runtime::Runtime::new().map_err(|e| BenchError::Runtime(e.to_string()))?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .map_err(|e| BenchError::Runtime(format!("bind {}: {e}", args.addr)))?;
        eprintln!("mock server on http://{}", args.addr);
        axum::serve(listener, router(args))
            .await
            .map_err(|e| BenchError::Runtime(e.to_string()))
    })
}

pub fn router(args: MockArgs) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/ws", get(ws))
        .with_state(args)
}

fn tokens(args: MockArgs, chat: bool, body: &Value) -> impl Stream<Item = String> {
    let n = body["max_tokens"].as_u64().unwrap_or(DEFAULT_MAX_TOKENS);
    async_stream::stream! {
        tokio::time::sleep(Duration::from_millis(args.ttft_ms)).await;
        for i in 0..n {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(args.itl_ms)).await;
            }
            yield if chat {
                json!({"object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {"content": " tok"}}]})
            } else {
                json!({"object": "text_completion", "choices": [{"index": 0, "text": " tok"}]})
            }
            .to_string();
        }
        // No prompt_tokens: the mock has no tokenizer, so the bench uses its own count.
        yield json!({"choices": [], "usage": {"completion_tokens": n}}).to_string();
    }
}

fn sse(stream: impl Stream<Item = String> + Send + 'static) -> Response {
    let lines = stream
        .map(|chunk| format!("data: {chunk}\n\n"))
        .chain(futures::stream::once(async {
            "data: [DONE]\n\n".to_string()
        }))
        .map(Ok::<_, std::convert::Infallible>);
    let mut resp = Response::new(axum::body::Body::from_stream(lines));
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/event-stream"),
    );
    resp
}

async fn completions(State(args): State<MockArgs>, Json(body): Json<Value>) -> Response {
    sse(tokens(args, false, &body))
}

async fn chat(State(args): State<MockArgs>, Json(body): Json<Value>) -> Response {
    sse(tokens(args, true, &body))
}

async fn ws(State(args): State<MockArgs>, upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(move |socket| ws_session(args, socket))
}

async fn ws_session(args: MockArgs, socket: WebSocket) {
    let (mut sink, mut incoming) = socket.split();
    let (tx, mut rx) = mpsc::channel::<String>(1024);
    let writer = tokio::spawn(async move {
        while let Some(text) = rx.recv().await {
            if sink.send(Message::Text(text.into())).await.is_err() {
                return;
            }
        }
    });
    while let Some(Ok(msg)) = incoming.next().await {
        let Message::Text(text) = msg else { continue };
        let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
            continue;
        };
        let id = v["id"].clone();
        let chat = v["type"] == "chat.completions";
        let stream = tokens(args, chat, &v["request"]);
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(chunk) = stream.next().await {
                let frame = format!(r#"{{"type":"chunk","id":{id},"data":{chunk}}}"#);
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(json!({"type": "done", "id": id}).to_string()).await;
        });
    }
    writer.abort();
}
