//! Reliability at the HTTP edge, against the real `sluice serve`: injected faults end one
//! request with the right status or an in-band error, slow clients are cut off by the
//! header-read, keep-alive and body-read timeouts, every framework rejection is OpenAI-shaped
//! and small, a burst over the waiting cap admits exactly the cap, and SIGTERM with open SSE
//! and WebSocket streams ends them in-band and exits within the timeout plus one second.

use crate::api_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use api_support::{client, metric, post, wait_for_metrics, Server, API_KEY};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Largest error body accepted, whatever the input.
const MAX_ERROR_BODY: usize = 4096;

fn addr(server: &Server) -> String {
    server.url.trim_start_matches("http://").to_string()
}

/// Sends `head` raw, then waits for the server to close the connection; returns how long
/// that took and what it sent.
fn until_closed(server: &Server, head: &[u8], within: Duration) -> (Duration, String) {
    let mut s = TcpStream::connect(addr(server)).expect("connect");
    s.set_read_timeout(Some(within)).expect("read timeout");
    let start = Instant::now();
    s.write_all(head).expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "the connection was still open after {within:?} ({e}); got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    (start.elapsed(), String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_rejections_are_openai_json() {
    let server = Server::start(&[
        "--header-read-timeout",
        "1",
        "--body-read-timeout",
        "1",
        "--max-body-bytes",
        "65536",
    ]);
    // A connection that never sends a byte (before hyper's own header timer exists).
    let (took, text) =
        tokio::task::block_in_place(|| until_closed(&server, b"", Duration::from_secs(5)));
    assert!(
        took < Duration::from_secs(3) && text.is_empty(),
        "silent: {took:?} {text}"
    );
    // A half-sent request head.
    let (took, _) = tokio::task::block_in_place(|| {
        until_closed(
            &server,
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",
            Duration::from_secs(5),
        )
    });
    assert!(took < Duration::from_secs(3), "half-sent head: {took:?}");
    // An idle keep-alive connection, after one answered request.
    let (took, text) = tokio::task::block_in_place(|| {
        until_closed(
            &server,
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
            Duration::from_secs(5),
        )
    });
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(took < Duration::from_secs(3), "idle keep-alive: {took:?}");
    // A body that trickles: 408, OpenAI-shaped, then the connection closes.
    let (took, text) = tokio::task::block_in_place(|| {
        let mut s = TcpStream::connect(addr(&server)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let start = Instant::now();
        s.write_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"prompt\"",
        )
        .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        for _ in 0..50 {
            // One byte every 100 ms: each read is quick, the whole body never arrives.
            if s.write_all(b" ").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            s.set_nonblocking(true).unwrap();
            let r = s.read(&mut buf);
            s.set_nonblocking(false).unwrap();
            match r {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
            if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}}") {
                break;
            }
        }
        (start.elapsed(), String::from_utf8_lossy(&got).into_owned())
    });
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"request_timeout\""), "{text}");
    assert!(took < Duration::from_secs(3), "trickling body: {took:?}");

    // Framework rejections are JSON error objects, and small whatever was sent.
    let url = &server.url;
    let huge = "A".repeat(60_000);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (client().get(format!("{url}/v1/nope")), 404, "unknown route"),
        (
            client().get(format!("{url}/v1/{}", "x".repeat(8000))),
            404,
            "long unknown route",
        ),
        (
            client().get(format!("{url}/v1/completions")),
            405,
            "wrong method",
        ),
        (
            client().get(format!("{url}/v1/ws")),
            400,
            "ws without upgrade",
        ),
        (
            client()
                .post(format!("{url}/v1/completions"))
                .header("content-type", "text/plain")
                .body("hi"),
            415,
            "wrong content type",
        ),
        (
            post(
                &format!("{url}/v1/completions"),
                &json!({"prompt": "x", "max_tokens": huge}),
            ),
            400,
            "huge wrong-typed value",
        ),
        (
            client()
                .post(format!("{url}/v1/completions"))
                .header("content-type", "application/json")
                .body(format!("{{\"prompt\": \"{huge}")),
            400,
            "huge malformed JSON",
        ),
        (
            post(
                &format!("{url}/v1/completions"),
                &json!({"prompt": "x".repeat(70_000)}),
            ),
            413,
            "body too large",
        ),
    ];
    for (req, status, what) in cases {
        let resp = req.send().await.expect(what);
        assert_eq!(resp.status().as_u16(), status, "{what}");
        let ct = resp.headers().get("content-type").cloned();
        let body = resp.bytes().await.expect(what);
        assert!(body.len() <= MAX_ERROR_BODY, "{what}: {} bytes", body.len());
        let v: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {ct:?}"));
        assert!(v["error"]["message"].is_string(), "{what}: {v}");
        assert!(v["error"]["type"].is_string(), "{what}: {v}");
    }
}

/// A completion's SSE events (the `data:` payloads).
fn sse_events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: ").map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_end_one_request_and_the_server_stays_healthy() {
    let server = Server::start(&["--enable-fault-injection"]);
    let url = format!("{}/v1/completions", server.url);
    let chat = format!("{}/v1/chat/completions", server.url);
    let clean = json!({"prompt": "The capital of France is", "max_tokens": 6,
                       "temperature": 0, "ignore_eos": true});
    let reference: Value = post(&url, &clean)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let reference = reference["choices"][0]["text"].clone();

    // Not streaming: the faulty request is a 500; a clean one beside it is untouched.
    for kind in ["nan", "inf", "token", "detok", "stop", "panic"] {
        let faulty = json!({"prompt": format!("Hi sluice-fault:{kind}@1"), "max_tokens": 6,
                            "temperature": 0, "ignore_eos": true});
        let bad = tokio::spawn(post(&url, &faulty).send());
        let resp = post(&url, &clean).send().await.unwrap();
        let bad = bad.await.unwrap().unwrap();
        assert_eq!(bad.status(), 500, "{kind}");
        let body: Value = bad.json().await.unwrap();
        assert_eq!(body["error"]["type"], "server_error", "{kind}: {body}");
        if kind != "panic" {
            // (A panic may fail the clean request too when they share the step.)
            assert_eq!(resp.status(), 200, "{kind}");
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["choices"][0]["text"], reference, "{kind}");
        }
    }
    // Streaming: tokens, then an in-band error event, then [DONE].
    let faulty = json!({"prompt": "Hi sluice-fault:nan@2", "max_tokens": 6, "stream": true,
                        "ignore_eos": true});
    let resp = post(&url, &faulty).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let events = sse_events(&resp.text().await.unwrap());
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(err["error"]["type"], "server_error", "{err}");
    // Template faults: a failing template is the client's 400, a panicking one a 500; a
    // handler that panics (outside any task: the catch-panic layer's case) is an OpenAI-shaped
    // 500 too.
    for (kind, status) in [
        ("template", 400),
        ("template-panic", 500),
        ("handler-panic", 500),
    ] {
        let body = json!({"messages": [{"role": "user", "content": format!("sluice-fault:{kind}")}],
                          "max_tokens": 2});
        let resp = post(&chat, &body).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{kind}");
        let v: Value = resp.json().await.unwrap();
        assert!(v["error"]["message"].is_string(), "{kind}: {v}");
    }
    // The server goes on: healthy, the clean request still the same, no block leaked.
    let health = client()
        .get(format!("{}/health", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let v: Value = post(&url, &clean)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["text"], reference);
    api_support::assert_idle_without_leaks(&server).await;
}

/// The binary `cargo test` builds is the one users run (`target/release/sluice`): started
/// without `--enable-fault-injection`, it treats every marker as plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_without_the_flag_ignores_fault_markers() {
    let server = Server::start(&[]);
    let url = format!("{}/v1/completions", server.url);
    let chat = format!("{}/v1/chat/completions", server.url);
    for kind in ["nan", "inf", "token", "panic", "detok", "stop"] {
        let body = json!({"prompt": format!("Hi sluice-fault:{kind}@0"), "max_tokens": 4,
                          "ignore_eos": true});
        let resp = post(&url, &body).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{kind}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 4, "{kind}: {v}");
    }
    for kind in ["template", "template-panic", "handler-panic"] {
        let body = json!({"messages": [{"role": "user", "content": format!("sluice-fault:{kind}")}],
                          "max_tokens": 2});
        let resp = post(&chat, &body).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{kind}");
    }
    assert_eq!(api_support::health_status(&server).await, 200);
    let text = api_support::metrics(&server).await;
    assert_eq!(metric(&text, "sluice:request_errors_total"), 0.0, "{text}");
    api_support::assert_idle_without_leaks(&server).await;
}

/// `/health` (and `/health/ready`) turns 503 after three steps in a row panic (and back to
/// 200 after one that completes), and while the engine is silent for longer than
/// `--health-max-silence` (a step that stalls); `/health/live` stays 200 throughout, since
/// the engine thread runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_a_panicking_or_silent_engine() {
    let server = Server::start(&["--enable-fault-injection", "--health-max-silence", "1"]);
    let url = format!("{}/v1/completions", server.url);
    let health = || api_support::health_status(&server);
    let ask = |prompt: &str| post(&url, &json!({"prompt": prompt, "max_tokens": 3})).send();
    for i in 0..3 {
        assert_eq!(health().await, 200, "before panic {i}");
        assert_eq!(ask("Hi sluice-fault:panic@0").await.unwrap().status(), 500);
    }
    assert_eq!(health().await, 503, "after three panicking steps");
    let probe = |path| api_support::probe_status(&server, path);
    assert_eq!(
        probe("/health/ready").await,
        503,
        "ready after three panics"
    );
    assert_eq!(probe("/health/live").await, 200, "live after three panics");
    assert_eq!(ask("Hello").await.unwrap().status(), 200);
    assert_eq!(health().await, 200, "after a step that completed");
    // A step that stalls for 5 s: the engine is silent past the 1 s limit meanwhile.
    let stalled = tokio::spawn(ask("Hi sluice-fault:stall@0"));
    let mut saw_503 = false;
    while !stalled.is_finished() {
        saw_503 |= health().await == 503;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(saw_503, "a stalled engine must not look healthy");
    assert_eq!(stalled.await.unwrap().unwrap().status(), 200);
    assert_eq!(health().await, 200, "after the stall");
    assert_eq!(probe("/health/ready").await, 200, "ready after the stall");
    api_support::assert_idle_without_leaks(&server).await;
}

/// `--max-waiting` counts only requests that cannot start at the next step: a burst that
/// the running batch takes whole is admitted whole, however small the waiting cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_that_fits_the_running_batch_is_admitted_whole() {
    let server = Server::start(&["--max-num-seqs", "16", "--max-waiting", "4"]);
    let url = format!("{}/v1/completions", server.url);
    let burst = (0..16).map(|i| {
        let req = post(
            &url,
            &json!({"prompt": [504, 3575, 282, i], "max_tokens": 2}),
        );
        tokio::spawn(async move { req.send().await.expect("burst request").status() })
    });
    let statuses = futures::future::join_all(burst).await;
    let admitted = statuses
        .iter()
        .filter(|s| s.as_ref().unwrap().as_u16() == 200);
    assert_eq!(admitted.count(), 16, "{statuses:?}");
    api_support::assert_idle_without_leaks(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_ten_times_the_cap_admits_exactly_the_cap() {
    const CAP: usize = 4;
    let server = Server::start(&["--max-num-seqs", "1", "--max-waiting", &CAP.to_string()]);
    let url = format!("{}/v1/completions", server.url);
    let long = |i: usize| {
        json!({"prompt": [504, 3575, 282, 4649, 314, i], "max_tokens": 1000,
               "ignore_eos": true, "stream": true})
    };
    // One request runs (--max-num-seqs 1), so the burst only waits.
    let running = post(&url, &long(0)).send().await.unwrap();
    assert_eq!(running.status(), 200);
    wait_for_metrics(&server, Duration::from_secs(60), |t| {
        metric(t, "sluice:num_requests_running") == 1.0
    })
    .await
    .expect("one request running");
    let burst = (1..=10 * CAP).map(|i| {
        let req = post(&url, &long(i));
        tokio::spawn(async move {
            let start = Instant::now();
            let resp = req.send().await.expect("burst request");
            (resp, start.elapsed())
        })
    });
    let results = futures::future::join_all(burst).await;
    let mut admitted = Vec::new();
    let mut refusal_times = Vec::new();
    for r in results {
        let (resp, took) = r.unwrap();
        match resp.status().as_u16() {
            200 => admitted.push(resp),
            429 => {
                let retry = resp.headers().get("retry-after").map(|v| v.to_str());
                let secs: u64 = retry
                    .and_then(|v| v.ok()?.parse().ok())
                    .expect("a Retry-After in seconds");
                assert!((1..=60).contains(&secs), "Retry-After {secs}");
                refusal_times.push(took);
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(admitted.len(), CAP, "admitted");
    assert_eq!(refusal_times.len(), 9 * CAP);
    refusal_times.sort();
    println!(
        "429s: median {:?}, slowest {:?}",
        refusal_times[refusal_times.len() / 2],
        refusal_times[refusal_times.len() - 1]
    );
    // Refused at once, not after waiting for room: every 429 came back while the running
    // request (1,000 tokens) still held the engine's one sequence.
    let text = api_support::metrics(&server).await;
    assert_eq!(metric(&text, "sluice:num_requests_running"), 1.0, "{text}");
    drop(admitted);
    drop(running);
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(server: &Server) -> Socket {
    let url = format!("{}/v1/ws", server.url.replacen("http://", "ws://", 1));
    let mut req = url.into_client_request().unwrap();
    let auth = format!("Bearer {API_KEY}").parse().unwrap();
    req.headers_mut().insert("authorization", auth);
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_open_sse_and_websocket_streams() {
    const TIMEOUT: f64 = 2.0;
    let mut server = Server::start(&[
        "--api-key",
        API_KEY,
        "--shutdown-timeout",
        &TIMEOUT.to_string(),
    ]);
    let url = format!("{}/v1/completions", server.url);
    let endless = json!({"prompt": "Count: 1, 2, 3,", "max_tokens": 1000, "ignore_eos": true,
                         "stream": true});
    let sse = post(&url, &endless).send().await.unwrap();
    assert_eq!(sse.status(), 200);
    let mut ws = ws_connect(&server).await;
    let msg = json!({"type": "completions", "id": 7, "request": endless});
    ws.send(Message::text(msg.to_string())).await.unwrap();
    wait_for_metrics(&server, Duration::from_secs(60), |t| {
        metric(t, "sluice:num_requests_running") == 2.0
    })
    .await
    .expect("both streams running");
    let sigterm = Instant::now();
    server.signal_term();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New requests are refused (503 while the listener drains, or no connection at all).
    match post(&url, &json!({"prompt": "Hi", "max_tokens": 1}))
        .send()
        .await
    {
        Ok(resp) => assert_eq!(resp.status(), 503),
        Err(e) => assert!(e.is_connect() || e.is_request(), "{e}"),
    }
    let sse_task = tokio::spawn(async move { sse.text().await.unwrap() });
    // The WebSocket request ends with an error message for its id, then the socket closes.
    let mut ws_error = None;
    while let Some(m) = ws.next().await {
        println!("ws: {m:?} after {:?}", sigterm.elapsed());
        let Ok(m) = m else { break };
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["type"] == "error" {
                ws_error = Some(v);
            }
        }
    }
    let ws_error = ws_error.expect("an error message on the WebSocket");
    assert_eq!(ws_error["id"], 7, "{ws_error}");
    let events = sse_events(&sse_task.await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(err["error"]["message"].is_string(), "{err}");
    // The timeout, the grace for the last events, and room for a loaded machine (the error
    // events above show that the deadline, not the streams' own end, closed them).
    let limit = Duration::from_secs_f64(TIMEOUT + 4.0);
    let status = tokio::task::block_in_place(|| server.wait_exit(limit + Duration::from_secs(5)));
    let took = sigterm.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took <= limit,
        "exited {took:?} after SIGTERM (limit {limit:?})"
    );
}
