//! Helpers of `tests/batch_api.rs`: a server with `--data-dir`, uploads, batch polling,
//! reading a batch's records, a webhook receiver.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::api_support::{client, post_json, Server, API_KEY};

pub fn data_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-batch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

pub fn start(dir: &Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "--api-key",
        API_KEY,
        "--data-dir",
        dir.to_str().expect("a UTF-8 path"),
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// A greedy chat line asking about `topic`.
pub fn chat_body(topic: &str, max_tokens: u32) -> Value {
    json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": format!("Tell me about {topic}.")}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

pub fn line(custom_id: &str, body: &Value) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})
        .to_string()
}

/// `POST /v1/files` as a multipart form (purpose `batch`); the response and its status.
pub async fn upload(url: &str, bytes: &[u8]) -> (u16, Value) {
    let boundary = "sluiceboundary7f3a";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let resp = client()
        .post(format!("{url}/v1/files"))
        .bearer_auth(API_KEY)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .expect("POST /v1/files");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("a JSON body"))
}

pub async fn get(url: &str) -> Value {
    client()
        .get(url)
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("a GET")
        .json()
        .await
        .expect("a JSON body")
}

pub async fn get_text(url: &str) -> String {
    client()
        .get(url)
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("a GET")
        .text()
        .await
        .expect("a body")
}

/// Uploads `lines` and starts a chat batch of them; the batch id.
pub async fn create_batch(url: &str, lines: &[String]) -> String {
    let (status, file) = upload(url, lines.join("\n").as_bytes()).await;
    assert_eq!(status, 200, "{file}");
    let batch = post_json(
        &format!("{url}/v1/batches"),
        &json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                "completion_window": "24h", "metadata": {"test": "yes"}}),
    )
    .await;
    assert_eq!(batch["status"], "validating", "{batch}");
    batch["id"].as_str().expect("a batch id").to_string()
}

/// Polls the batch until `pred` holds (60 s at most).
pub async fn wait_batch(url: &str, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let b = get(&format!("{url}/v1/batches/{id}")).await;
        if pred(&b) {
            return b;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "batch stuck: {b}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn is_final(b: &Value) -> bool {
    matches!(
        b["status"].as_str(),
        Some("completed" | "failed" | "cancelled" | "expired")
    )
}

/// The records of a batch's output and error files, by `custom_id` (each must be unique).
pub async fn records(url: &str, b: &Value) -> (HashMap<String, Value>, HashMap<String, Value>) {
    let mut maps = (HashMap::new(), HashMap::new());
    for (key, map) in [
        ("output_file_id", &mut maps.0),
        ("error_file_id", &mut maps.1),
    ] {
        let Some(id) = b[key].as_str() else { continue };
        for l in get_text(&format!("{url}/v1/files/{id}/content"))
            .await
            .lines()
        {
            let r: Value = serde_json::from_str(l).expect("a JSON record");
            let cid = r["custom_id"]
                .as_str()
                .map_or_else(|| format!("line {}", r["error"]["line"]), str::to_string);
            assert!(map.insert(cid.clone(), r).is_none(), "{cid} answered twice");
        }
    }
    maps
}

/// The online answer to `body`.
pub async fn online(url: &str, body: &Value) -> String {
    let r = post_json(&format!("{url}/v1/chat/completions"), body).await;
    r["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

pub fn content(record: &Value) -> &str {
    record["response"]["body"]["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {record}"))
}

/// Takes two webhook deliveries: answers the first with a 500, the second with a 200; their
/// JSON bodies.
pub fn webhook_receiver(listener: std::net::TcpListener) -> Vec<Value> {
    let attempts = webhook_server(listener, 1);
    (0..2)
        .map(|_| attempts.recv().expect("a webhook delivery").0)
        .collect()
}

/// Answers webhook deliveries on its own thread, for as long as the test runs: the first
/// `refuse` with a 500, the rest with a 200. Each delivery's JSON body and the status it got.
pub fn webhook_server(
    listener: std::net::TcpListener,
    refuse: usize,
) -> std::sync::mpsc::Receiver<(Value, u16)> {
    use std::io::Write;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (i, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { return };
            let Some(body) = read_request_body(&mut conn) else {
                continue;
            };
            let status = if i < refuse { 500 } else { 200 };
            let _ = write!(
                conn,
                "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
            let body = serde_json::from_slice(&body).expect("a JSON webhook body");
            if tx.send((body, status)).is_err() {
                return;
            }
        }
    });
    rx
}

/// One HTTP request's body (by its content-length); `None` when the connection closed early.
fn read_request_body(conn: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("a content length");
        if buf.len() >= end + 4 + len {
            return Some(buf[end + 4..end + 4 + len].to_vec());
        }
    }
}

/// Greedy lines long enough that a batch run one at a time takes a few seconds.
pub fn slow_lines(n: usize) -> Vec<(String, Value)> {
    (0..n)
        .map(|i| {
            (
                format!("req-{i}"),
                chat_body(&format!("the number {i}"), 24),
            )
        })
        .collect()
}
