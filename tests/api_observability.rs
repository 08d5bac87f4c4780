//! What an operator's tools read. Logs: with `--log-format json` every log line on stderr is
//! one JSON object, every response carries `x-request-id` (the client's, else a new one), and
//! each request is logged once with that id, its status and duration. Traces: every request's
//! span, with its `gen_ai.*` attributes and its queue, prefill and decode children, reaches a
//! real OTLP receiver, under the caller's `traceparent`.

use crate::api_support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use api_support::{client, post, sluice_bin, Server};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_and_request_ids() {
    let model = sluice::assets::default_model_path().expect("the default model");
    let log = std::env::temp_dir().join(format!("sluice-logs-{}.jsonl", uuid::Uuid::new_v4()));
    let mut child = Command::new(sluice_bin())
        .args([
            "--log-format",
            "json",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ])
        .args(["--kv-cache-memory", "33554432", "--max-model-len", "512"])
        .arg("--model")
        .arg(&model)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("sluice serve");
    let stdout = child.stdout.take().unwrap();
    let line = BufReader::new(stdout).lines().next().unwrap().unwrap();
    let url = line
        .strip_prefix("sluice listening on ")
        .unwrap()
        .to_string();

    let c = client();
    let body = r#"{"model":"smollm2","prompt":"Hi","max_tokens":2}"#;
    let ours = c
        .post(format!("{url}/v1/completions"))
        .header("content-type", "application/json")
        .header("x-request-id", "client-id-42")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(ours.status(), 200);
    assert_eq!(ours.headers()["x-request-id"], "client-id-42");
    let theirs = c
        .get(format!("{url}/v1/models/nope"))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    assert_eq!(theirs.status(), 404);
    let generated = theirs.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(generated.len(), 32, "{generated}");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let access = |id: &str| {
        lines
            .iter()
            .find(|l| l["target"] == "sluice::access" && l["request_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no access log line for {id} in\n{text}"))
    };
    let a = access("client-id-42");
    assert_eq!(a["status"], 200);
    assert_eq!(a["method"], "POST");
    assert_eq!(a["path"], "/v1/completions");
    assert!(a["duration_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(access(&generated)["status"], 404);
    // The generation's own summary line: the same id, its model, tokens and latencies.
    let done = lines
        .iter()
        .find(|l| l["target"] == "sluice::request" && l["request_id"] == "client-id-42")
        .unwrap_or_else(|| panic!("no summary line for client-id-42 in\n{text}"));
    assert_eq!(done["message"], "request finished");
    assert_eq!(done["operation"], "text_completion");
    assert!(
        done["model"].as_str().unwrap().starts_with("smollm2@"),
        "{done}"
    );
    assert_eq!(done["completion_tokens"], 2);
    assert!(done["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(done["finish_reasons"], "length");
    assert!(done["ttft_ms"].as_f64().unwrap() > 0.0);
    assert!(done["e2e_ms"].as_f64().unwrap() >= done["ttft_ms"].as_f64().unwrap());
    let _ = std::fs::remove_file(log);
}

/// The collector's trace service, from the official protobufs (`tests/python/otlp_receiver.py`).
const OTLP_RECEIVER: &str = "opentelemetry-proto==1.39.1 grpcio==1.76.0";

/// A receiver on an ephemeral port; its spans, one JSON object each, arrive on the channel.
fn start_receiver() -> (std::process::Child, u16, std::sync::mpsc::Receiver<Value>) {
    let python = api_support::venv::pip_venv("test-venv-otlp", OTLP_RECEIVER).join("bin/python");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/otlp_receiver.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the OTLP receiver");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("the receiver's first line").unwrap();
    let port = first
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected receiver line: {first}"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                break;
            }
        }
    });
    (child, port, rx)
}

/// Spans received until `done` holds of them, or 30 s.
fn spans_until(
    rx: &std::sync::mpsc::Receiver<Value>,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut spans = Vec::new();
    while !done(&spans) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(span) => spans.push(span),
            Err(_) => panic!("spans still missing after 30 s; received: {spans:#?}"),
        }
    }
    spans
}

fn named<'a>(spans: &'a [Value], name: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["name"] == name).collect()
}

fn children<'a>(spans: &'a [Value], parent: &Value) -> Vec<&'a Value> {
    spans
        .iter()
        .filter(|s| s["parent_span_id"] == parent["span_id"])
        .collect()
}

/// A child lies inside its parent, and queue, prefill and decode follow each other.
fn assert_stages(spans: &[Value], parent: &Value, engine_requests: usize) {
    let kids = children(spans, parent);
    assert_eq!(kids.len(), 3 * engine_requests, "{kids:#?}");
    let t = |s: &Value, k: &str| s[k].as_u64().unwrap();
    for k in &kids {
        assert!(
            t(k, "start") >= t(parent, "start") && t(k, "end") <= t(parent, "end"),
            "{k} outside {parent}"
        );
        assert!(t(k, "start") <= t(k, "end"));
    }
    let stage = |name: &str| {
        kids.iter()
            .find(|k| k["name"] == name)
            .copied()
            .unwrap_or_else(|| panic!("no {name} span"))
    };
    let (queue, prefill, decode) = (stage("queue"), stage("prefill"), stage("decode"));
    assert!(t(queue, "end") <= t(prefill, "start") + 1_000);
    assert!(t(prefill, "end") <= t(decode, "start") + 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_reach_an_otlp_receiver() {
    let (mut receiver, port, rx) = start_receiver();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut server = Server::start(&["--otlp-traces-endpoint", &endpoint]);
    let url = &server.url;

    // A chat request under the caller's trace.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let chat: Value = post(
        &format!("{url}/v1/chat/completions"),
        &json!({
            "model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8, "temperature": 0, "seed": 7, "stop": ["never said"],
        }),
    )
    .header("traceparent", format!("00-{trace_id}-{parent_id}-01"))
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    // A streamed completion of two prompts, no caller trace: a root span, two engine requests.
    let streamed = post(
        &format!("{url}/v1/completions"),
        &json!({
            "model": "smollm2", "prompt": ["One", "Two"], "max_tokens": 4, "stream": true,
        }),
    )
    .send()
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert!(streamed.contains("[DONE]"), "{streamed}");
    // Refused before the engine: a span with the error.
    let refused = post(
        &format!("{url}/v1/completions"),
        &json!({
            "model": "smollm2", "prompt": "x", "max_tokens": 100000,
        }),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(refused.status(), 400);

    // SIGTERM: the exporter flushes what is pending as the server exits.
    server.signal_term();
    assert!(server.wait_exit(Duration::from_secs(30)).success());
    let spans = spans_until(&rx, |s| {
        named(s, "chat smollm2").len() == 1 && named(s, "text_completion smollm2").len() == 2
    });
    let _ = receiver.kill();

    let chat_span = named(&spans, "chat smollm2")[0];
    assert_eq!(chat_span["service"], "sluice");
    assert_eq!(chat_span["trace_id"], trace_id);
    assert_eq!(chat_span["parent_span_id"], parent_id);
    assert_eq!(chat_span["kind"], 2, "SPAN_KIND_SERVER");
    let a = &chat_span["attributes"];
    assert_eq!(a["gen_ai.operation.name"], "chat");
    assert_eq!(a["gen_ai.request.model"], "smollm2");
    assert_eq!(a["gen_ai.request.max_tokens"], 8);
    assert_eq!(a["gen_ai.request.temperature"], 0.0);
    assert_eq!(a["gen_ai.request.seed"], 7);
    assert_eq!(a["gen_ai.request.stop_sequences"], json!(["never said"]));
    assert_eq!(a["gen_ai.response.id"], chat["id"]);
    assert_eq!(
        a["gen_ai.usage.input_tokens"],
        chat["usage"]["prompt_tokens"]
    );
    assert_eq!(
        a["gen_ai.usage.output_tokens"],
        chat["usage"]["completion_tokens"]
    );
    assert_eq!(
        a["gen_ai.response.finish_reasons"],
        json!([chat["choices"][0]["finish_reason"]])
    );
    let ttft = a["gen_ai.latency.time_to_first_token"].as_f64().unwrap();
    assert!(
        ttft > 0.0 && ttft <= a["gen_ai.latency.e2e"].as_f64().unwrap(),
        "{a}"
    );
    assert_stages(&spans, chat_span, 1);

    let completions = named(&spans, "text_completion smollm2");
    let ok = completions
        .iter()
        .find(|s| s["attributes"]["error.type"].is_null())
        .expect("the streamed completion's span");
    assert_eq!(ok["parent_span_id"], "", "no traceparent: a root span");
    assert_eq!(ok["attributes"]["gen_ai.request.choice.count"], 2);
    assert_eq!(ok["attributes"]["gen_ai.usage.output_tokens"], 8);
    assert_eq!(
        ok["attributes"]["gen_ai.response.finish_reasons"],
        json!(["length", "length"])
    );
    assert_stages(&spans, ok, 2);
    let failed = completions
        .iter()
        .find(|s| s["attributes"]["error.type"] == "400")
        .expect("the refused request's span");
    assert_eq!(failed["status"], 2, "STATUS_CODE_ERROR");
    assert!(children(&spans, failed).is_empty());
}
