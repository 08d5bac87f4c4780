//! The scripted server of `bench_client.rs`: `max_tokens` chunks, the first after
//! `FIRST_MS`, then one every `GAP_MS`, then a usage chunk and `[DONE]`, over SSE and over the
//! WebSocket protocol; the prompt names a scenario that breaks the script (see the test file).

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{SinkExt, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;

pub const FIRST_MS: u64 = 200;
pub const GAP_MS: u64 = 20;

#[derive(Clone, Copy, PartialEq)]
enum Route {
    Completions,
    Chat,
}

fn scenario_of(body: &Value) -> (String, u64) {
    let prompt = body["prompt"]
        .as_str()
        .or_else(|| body["messages"][0]["content"].as_str())
        .unwrap_or("ok")
        .to_string();
    (prompt, body["max_tokens"].as_u64().unwrap_or(4))
}

fn content_chunk(route: Route, i: u64) -> Value {
    match route {
        Route::Completions => json!({"choices": [{"index": 0, "text": format!("t{i} ")}]}),
        Route::Chat => json!({"choices": [{"index": 0, "delta": {"content": format!("t{i} ")}}]}),
    }
}

/// Scripted events: `Ok(Some(chunk))`, `Ok(None)` for the end marker, `Err` to cut the line.
fn script(
    route: Route,
    scenario: String,
    n: u64,
) -> impl Stream<Item = Result<Option<Value>, std::io::Error>> {
    async_stream::stream! {
        let delay = |ms: u64| tokio::time::sleep(Duration::from_millis(if scenario == "fast" { 0 } else { ms }));
        if route == Route::Chat {
            // Like vLLM: a role chunk with empty content at once; it must not count as TTFT.
            yield Ok(Some(json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})));
        }
        if scenario == "slow" {
            delay(2000).await;
        }
        delay(FIRST_MS).await;
        for i in 0..n {
            if i > 0 {
                delay(GAP_MS).await;
            }
            if i == 2 && scenario == "inband" {
                yield Ok(Some(json!({"error": {"message": "scripted in-band error", "type": "x"}})));
                yield Ok(None);
                return;
            }
            if i == 2 && scenario == "drop" {
                yield Err(std::io::Error::other("scripted drop"));
                return;
            }
            yield Ok(Some(content_chunk(route, i)));
        }
        if scenario != "nousage" {
            yield Ok(Some(json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}})));
        }
        if scenario != "nodone" {
            yield Ok(None);
        }
    }
}

async fn sse(route: Route, body: Value) -> Response {
    let (scenario, n) = scenario_of(&body);
    if scenario == "http500" {
        let err = json!({"error": {"message": "scripted failure", "type": "server_error"}});
        return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, Json(err)).into_response();
    }
    if body["stream"] != json!(true) {
        return whole(route, scenario, n).await;
    }
    let lines = script(route, scenario, n).map(|ev| {
        ev.map(|c| match c {
            Some(chunk) => format!("data: {chunk}\n\n"),
            None => "data: [DONE]\n\n".to_string(),
        })
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(axum::body::Body::from_stream(lines))
        .unwrap()
}

/// A whole (not streamed) answer, sent when the script's last chunk would have been.
async fn whole(route: Route, scenario: String, n: u64) -> Response {
    let ms = if scenario == "fast" {
        0
    } else {
        FIRST_MS + GAP_MS * n.saturating_sub(1)
    };
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let text: String = (0..n).map(|i| format!("t{i} ")).collect();
    let choice = match route {
        Route::Completions => json!({"index": 0, "text": text}),
        Route::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text}}),
    };
    let usage = json!({"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n});
    Json(json!({"choices": [choice], "usage": usage})).into_response()
}

async fn ws_session(socket: WebSocket) {
    let (mut sink, mut incoming) = socket.split();
    // None: close the socket (the WS form of a dropped connection).
    let (tx, mut rx) = mpsc::channel::<Option<String>>(1024);
    tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            match frame {
                Some(text) => {
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                None => {
                    let _ = sink.send(Message::Close(None)).await;
                    return;
                }
            }
        }
    });
    while let Some(Ok(msg)) = incoming.next().await {
        let Message::Text(text) = msg else { continue };
        let v: Value = serde_json::from_str(text.as_str()).unwrap();
        let route = match v["type"].as_str() {
            Some("chat.completions") => Route::Chat,
            _ => Route::Completions,
        };
        let id = v["id"].clone();
        let (scenario, n) = scenario_of(&v["request"]);
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut events = Box::pin(script(route, scenario, n));
            while let Some(ev) = events.next().await {
                let frame = match ev {
                    Ok(Some(chunk)) if chunk.get("error").is_some() => {
                        json!({"type": "error", "id": id, "error": chunk["error"]})
                    }
                    Ok(Some(chunk)) => json!({"type": "chunk", "id": id, "data": chunk}),
                    Ok(None) => json!({"type": "done", "id": id}),
                    Err(_) => {
                        let _ = tx.send(None).await;
                        return;
                    }
                };
                let last = frame["type"] == "error";
                let _ = tx.send(Some(frame.to_string())).await;
                if last {
                    return;
                }
            }
        });
    }
}

pub async fn start_server() -> SocketAddr {
    let app = Router::new()
        .route(
            "/v1/completions",
            post(|Json(b): Json<Value>| sse(Route::Completions, b)),
        )
        .route(
            "/v1/chat/completions",
            post(|Json(b): Json<Value>| sse(Route::Chat, b)),
        )
        .route(
            "/v1/ws",
            get(|ws: WebSocketUpgrade| async { ws.on_upgrade(ws_session) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}
