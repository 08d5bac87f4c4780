//! `--log-format json` and the access log: every log line on stderr is one JSON object, every
//! response carries `x-request-id` (the client's, else a new one), and each request is
//! logged once with that id, its status and duration.

mod api_support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use api_support::{client, sluice_bin};
use serde_json::Value;

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
    let _ = std::fs::remove_file(log);
}
