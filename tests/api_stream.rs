//! Streams and their ends: WebSocket requests interleaved and cancelled, a client that goes
//! away mid-stream (SSE or WebSocket) freeing its request at once, `/metrics` moving, and
//! shutdown on SIGTERM letting in-flight requests finish and ending the rest in-band.

use crate::api_support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use api_support::{metric, metrics, post, wait_for_metrics, Server, API_KEY};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How fast an abandoned request must be gone (one engine step is far less, even in debug).
const ABORT_WITHIN: Duration = Duration::from_secs(10);
/// Seconds in-flight requests get after SIGTERM.
const SHUTDOWN_TIMEOUT: u64 = 10;

async fn connect(server: &Server) -> Socket {
    let url = format!("{}/v1/ws", server.url.replacen("http://", "ws://", 1));
    let mut req = url.into_client_request().expect("a WebSocket request");
    let auth = format!("Bearer {API_KEY}").parse().expect("a header value");
    req.headers_mut().insert("authorization", auth);
    let (socket, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("WebSocket connect");
    socket
}

async fn send(socket: &mut Socket, v: Value) {
    socket
        .send(Message::text(v.to_string()))
        .await
        .expect("send");
}

async fn recv(socket: &mut Socket) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(120), socket.next())
            .await
            .expect("a message within 120 s")
            .expect("an open socket")
            .expect("a frame");
        if let Message::Text(t) = msg {
            return serde_json::from_str(t.as_str()).expect("JSON message");
        }
    }
}

fn no_requests_running(text: &str) -> bool {
    metric(text, "sluice:num_requests_running") == 0.0
        && metric(text, "sluice:kv_cache_usage_perc") == 0.0
}

async fn websocket_interleaves_and_cancels(server: &Server) {
    let mut ws = connect(server).await;
    // A bad request gets an error for its id; the socket stays usable.
    send(
        &mut ws,
        json!({"type": "completions", "id": "bad", "request": {"prompt": "x", "top_p": 2}}),
    )
    .await;
    let m = recv(&mut ws).await;
    assert_eq!(
        (m["type"].as_str(), m["id"].as_str()),
        (Some("error"), Some("bad")),
        "{m}"
    );
    assert_eq!(m["error"]["param"], "top_p", "{m}");

    let chat = json!({"messages": [{"role": "user", "content": "Hello! Who are you?"}],
                      "max_tokens": 6, "temperature": 0, "ignore_eos": true});
    let completion = json!({"prompt": "The capital of France is", "max_tokens": 6,
                            "temperature": 0, "ignore_eos": true});
    let endless = json!({"prompt": "Count: 1, 2, 3,", "max_tokens": 1000, "ignore_eos": true});
    send(
        &mut ws,
        json!({"type": "chat.completions", "id": "a", "request": chat}),
    )
    .await;
    send(
        &mut ws,
        json!({"type": "completions", "id": "b", "request": completion}),
    )
    .await;
    send(
        &mut ws,
        json!({"type": "completions", "id": "c", "request": endless}),
    )
    .await;
    let mut order = Vec::new();
    let mut texts: HashMap<String, String> = HashMap::new();
    let mut ended: HashMap<String, Value> = HashMap::new();
    let mut cancelled = false;
    while ended.len() < 3 {
        let m = recv(&mut ws).await;
        let id = m["id"].as_str().expect("an id").to_string();
        match m["type"].as_str() {
            Some("chunk") => {
                order.push(id.clone());
                let choice = &m["data"]["choices"][0];
                let delta = choice["delta"]["content"]
                    .as_str()
                    .or(choice["text"].as_str());
                texts
                    .entry(id.clone())
                    .or_default()
                    .push_str(delta.unwrap_or(""));
                if id == "c" && !cancelled {
                    send(&mut ws, json!({"type": "cancel", "id": "c"})).await;
                    cancelled = true;
                }
            }
            Some("done") | Some("error") => {
                assert!(ended.insert(id, m.clone()).is_none(), "two ends: {m}");
            }
            other => panic!("unexpected message type {other:?}: {m}"),
        }
    }
    assert_eq!(ended["a"]["type"], "done", "{:?}", ended);
    assert_eq!(ended["b"]["type"], "done", "{:?}", ended);
    assert_eq!(ended["c"]["type"], "done", "{:?}", ended);
    assert_eq!(ended["c"]["cancelled"], true, "{:?}", ended);
    // Both ran in the same steps: b's first chunk came before a's last.
    let first_b = order.iter().position(|id| id == "b").expect("chunks of b");
    let last_a = order.iter().rposition(|id| id == "a").expect("chunks of a");
    assert!(first_b < last_a, "not interleaved: {order:?}");
    assert!(texts["b"].starts_with(" Paris"), "{:?}", texts);
    // The cancelled request is gone from the engine.
    wait_for_metrics(server, ABORT_WITHIN, no_requests_running)
        .await
        .expect("cancelled request still running");

    // Closing the socket aborts what is in flight on it.
    send(
        &mut ws,
        json!({"type": "completions", "id": "d", "request": endless}),
    )
    .await;
    let m = recv(&mut ws).await;
    assert_eq!(m["type"], "chunk", "{m}");
    wait_for_metrics(server, ABORT_WITHIN, |t| {
        metric(t, "sluice:num_requests_running") == 1.0
    })
    .await
    .expect("request d running");
    drop(ws);
    let took = wait_for_metrics(server, ABORT_WITHIN, no_requests_running)
        .await
        .expect("request d still running after the socket closed");
    println!("websocket close: request freed after {took:?}");
}

async fn sse_disconnect_frees_the_request_and_metrics_move(server: &Server) {
    let before = metrics(server).await;
    let url = format!("{}/v1/completions", server.url);
    let body = json!({"prompt": "Count: 1, 2, 3,", "max_tokens": 1000, "ignore_eos": true,
                      "stream": true});
    let resp = post(&url, &body).send().await.expect("stream");
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut received = 0;
    while received < 2 {
        let chunk = tokio::time::timeout(Duration::from_secs(120), stream.next())
            .await
            .expect("chunks within 120 s")
            .expect("an open stream")
            .expect("bytes");
        received += String::from_utf8_lossy(&chunk).matches("data: ").count();
    }
    let during = metrics(server).await;
    assert_eq!(
        metric(&during, "sluice:num_requests_running"),
        1.0,
        "{during}"
    );
    assert!(
        metric(&during, "sluice:kv_cache_usage_perc") > 0.0,
        "{during}"
    );
    assert!(
        metric(&during, "sluice:generation_tokens_total")
            > metric(&before, "sluice:generation_tokens_total"),
        "generation_tokens_total did not move"
    );
    assert!(
        metric(&during, "sluice:prompt_tokens_total")
            > metric(&before, "sluice:prompt_tokens_total")
    );
    drop(stream);
    let took = wait_for_metrics(server, ABORT_WITHIN, no_requests_running)
        .await
        .expect("request still running after the client went away");
    println!("SSE disconnect: request freed after {took:?}");
    let after = metrics(server).await;
    let aborts = |t: &str| metric(t, "sluice:request_success_total{finished_reason=\"abort\"}");
    assert!(aborts(&after) > aborts(&before), "abort not counted");

    // A request that runs to its end moves the success counter and the histograms.
    let lengths = |t: &str| {
        metric(
            t,
            "sluice:request_success_total{finished_reason=\"length\"}",
        )
    };
    let body = json!({"prompt": "Hi", "max_tokens": 2, "ignore_eos": true});
    let resp = post(&url, &body).send().await.expect("completion");
    assert_eq!(resp.status(), 200);
    let done = metrics(server).await;
    assert!(lengths(&done) > lengths(&after), "length not counted");
    assert!(
        metric(&done, "sluice:e2e_request_latency_seconds_count")
            > metric(&after, "sluice:e2e_request_latency_seconds_count")
    );
    assert!(metric(&done, "sluice:time_to_first_token_seconds_count") > 0.0);
}

async fn shutdown_finishes_in_flight_and_ends_the_rest(server: &mut Server) {
    let url = format!("{}/v1/completions", server.url);
    // 8,000 tokens outlive the shutdown deadline (`SHUTDOWN_TIMEOUT`) at any speed this
    // machine reaches (it would need 800 tokens/s alone), while the short one (40 tokens)
    // finishes well within it even on a loaded machine (4 tokens/s), and runs long enough for
    // the metrics poll to see both running.
    let endless = json!({"prompt": "Count: 1, 2, 3,", "max_tokens": 8000, "ignore_eos": true,
                         "stream": true});
    let resp = post(&url, &endless).send().await.expect("stream");
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let short = tokio::spawn(
        post(
            &url,
            &json!({"prompt": "Hi", "max_tokens": 40, "ignore_eos": true}),
        )
        .send(),
    );
    wait_for_metrics(server, Duration::from_secs(60), |t| {
        metric(t, "sluice:num_requests_running") == 2.0
    })
    .await
    .expect("both requests running");
    let started = Instant::now();
    server.signal_term();
    // The short request finishes normally.
    let short = short.await.expect("short task").expect("short response");
    assert_eq!(short.status(), 200);
    // The endless one is ended by the deadline: an in-band error, then [DONE].
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("bytes")));
    }
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let error: Value = serde_json::from_str(events[events.len() - 2]).expect("an error event");
    assert!(error["error"]["message"].as_str().is_some(), "{error}");
    let status = tokio::task::block_in_place(|| {
        server.wait_exit(Duration::from_secs(SHUTDOWN_TIMEOUT + 20))
    });
    assert!(status.success(), "exit status {status}");
    println!("shutdown: exited {:?} after SIGTERM", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_cancel_disconnect_metrics_and_shutdown() {
    let mut server = Server::start(&[
        "--api-key",
        API_KEY,
        "--shutdown-timeout",
        &SHUTDOWN_TIMEOUT.to_string(),
        "--max-model-len",
        "8192",
        "--kv-cache-memory",
        "536870912",
    ]);
    websocket_interleaves_and_cancels(&server).await;
    sse_disconnect_frees_the_request_and_metrics_move(&server).await;
    shutdown_finishes_in_flight_and_ends_the_rest(&mut server).await;
}
