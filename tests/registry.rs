//! The model registry against a real server (issue 19): several models at once, pinned
//! versions, a swap under load from `sluice bench` with no failed request, rollback, a
//! corrupt load that leaves the live version serving, the canary split, the admin key,
//! `--models-max` with `--autoload`, the memory budget, and the live version surviving a
//! restart.

use crate::api_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use api_support::{bench_serve, client, metric, metrics, sluice_bin, Server};
use serde_json::{json, Value};

const ADMIN_KEY: &str = "admin-key-456";

fn default_model() -> String {
    sluice::assets::default_model_path()
        .expect("the default model")
        .to_string_lossy()
        .into_owned()
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-registry-{tag}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tiny Llama config: dummy weights on the default model's vocabulary, so it uses that
/// tokenizer.
fn tiny_config(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.json");
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 49152, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": true
    });
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

async fn admin(server: &Server, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    admin_with_key(server, method, path, body, Some(ADMIN_KEY)).await
}

async fn admin_with_key(
    server: &Server,
    method: &str,
    path: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (u16, Value) {
    let url = format!("{}/admin{path}", server.url);
    let mut req = client().request(method.parse().unwrap(), url);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.expect("an admin response");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A greedy completion on `model`: its status and text.
async fn complete(server: &Server, model: &str, max_tokens: u32) -> (u16, String) {
    let resp = client()
        .post(format!("{}/v1/completions", server.url))
        .header("content-type", "application/json")
        .body(
            json!({"model": model, "prompt": "The capital of France is", "max_tokens": max_tokens,
                   "temperature": 0})
            .to_string(),
        )
        .send()
        .await
        .expect("a response");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("JSON");
    let text = body["choices"][0]["text"].as_str().unwrap_or_default();
    (
        status,
        if status == 200 {
            text.to_string()
        } else {
            body.to_string()
        },
    )
}

async fn models(server: &Server) -> Vec<Value> {
    let v: Value = client()
        .get(format!("{}/v1/models", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["data"].as_array().cloned().unwrap_or_default()
}

fn version_state(models: &[Value], name: &str, version: &str) -> String {
    models
        .iter()
        .find(|m| m["id"] == name)
        .and_then(|m| m["versions"].as_array())
        .and_then(|vs| vs.iter().find(|v| v["version"] == version))
        .map_or("absent".into(), |v| {
            v["state"].as_str().unwrap_or("").to_string()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_models_at_once_route_by_name_and_version() {
    let dir = temp_dir("several");
    let m = default_model();
    let file = dir.join("models.toml");
    let tiny = tiny_config(&dir);
    std::fs::write(
        &file,
        format!(
            "[[models]]\nname = \"tiny\"\nargs = [\"--load-format\", \"dummy\", \"--tokenizer\", {m:?}, \
             \"--kv-cache-memory\", \"4000000\", \"--max-model-len\", \"512\"]\n\
             versions = [{{ version = \"a\", path = {tiny:?} }}]\n"
        ),
    )
    .unwrap();
    let a = format!("smollm2={m}");
    let b = format!("alias={m}");
    let server = Server::start(&[
        "--model",
        &a,
        "--model",
        &b,
        "--models",
        file.to_str().unwrap(),
    ]);
    let listed = models(&server).await;
    let names: Vec<&str> = listed.iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(names, ["smollm2", "alias", "tiny"]);
    assert!(listed.iter().all(|m| m["state"] == "ready"), "{listed:?}");
    // The default model under two names: two engines, the same greedy text.
    let (s1, t1) = complete(&server, "smollm2", 8).await;
    let (s2, t2) = complete(&server, "alias@1", 8).await;
    assert_eq!((s1, s2), (200, 200), "{t1} {t2}");
    assert_eq!(t1, t2);
    let (s3, _) = complete(&server, "tiny", 4).await;
    assert_eq!(s3, 200);
    for (model, code) in [("tiny@b", "model_not_found"), ("nope", "model_not_found")] {
        let (status, body) = complete(&server, model, 1).await;
        assert_eq!(status, 404, "{body}");
        assert!(body.contains(code), "{body}");
    }
    let text = metrics(&server).await;
    for (name, version) in [("smollm2", "1"), ("alias", "1"), ("tiny", "a")] {
        let sel =
            format!("sluice:request_success_total{{model_name=\"{name}\",version=\"{version}\"}}");
        // The warm-up request and the test's own.
        assert!(metric(&text, &sel) >= 2.0, "{sel}\n{text}");
    }
    // One header per family, however many engines.
    assert_eq!(
        text.matches("# TYPE sluice:request_success_total ").count(),
        1
    );
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_has_its_own_key() {
    let server = Server::start(&["--api-key", "user-key", "--admin-api-key", ADMIN_KEY]);
    for key in [None, Some("user-key"), Some("wrong")] {
        let (status, body) = admin_with_key(&server, "GET", "/models", None, key).await;
        assert_eq!(status, 401, "{key:?}: {body}");
    }
    let (status, body) = admin(&server, "GET", "/models", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body[0]["name"], "smollm2");
    // Without --admin-api-key the admin API is off.
    let plain = Server::start(&[]);
    let (status, _) = admin_with_key(&plain, "GET", "/models", None, None).await;
    assert_eq!(status, 403);
}

/// Swap under load, rollback, a corrupt load, the canary split, and the state after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_under_load_rollback_canary_and_restart() {
    let dir = temp_dir("swap");
    let state = dir.join("models.json");
    let state_arg = state.to_str().unwrap().to_string();
    let m = default_model();
    let flags = [
        "--admin-api-key",
        ADMIN_KEY,
        "--registry-state",
        &state_arg,
        "--kv-cache-memory",
        "67108864",
    ];
    let mut server = Server::start(&flags);
    let (_, before) = complete(&server, "smollm2", 16).await;

    // Continuous load while version 2 loads, goes live, and is rolled back.
    let bench_out = dir.join("bench.json");
    let mut bench = bench_serve(&server.url, "smollm2", &bench_out)
        .args(["--concurrency", "4", "--duration", "8", "--input-len", "16"])
        .args(["--output-len", "16", "--tokenizer", &m])
        .spawn()
        .expect("sluice bench serve");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, body) = admin(
        &server,
        "POST",
        "/models/smollm2/versions",
        Some(json!({"version": "2", "path": m, "args": ["--max-num-seqs", "8"]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["live_version"], "2");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A corrupt file fails cleanly; version 2 serves on.
    let bad = dir.join("corrupt.gguf");
    std::fs::write(&bad, b"GGUF but not really a model file").unwrap();
    let (status, body) = admin(
        &server,
        "POST",
        "/models/smollm2/versions",
        Some(json!({"version": "3", "path": bad})),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("corrupt.gguf"),
        "{body}"
    );
    let listed = models(&server).await;
    assert_eq!(version_state(&listed, "smollm2", "3"), "failed");
    assert_eq!(listed[0]["live_version"], "2");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, body) = admin(&server, "POST", "/models/smollm2/rollback", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["live_version"], "1");
    let bench_status = bench.wait().expect("bench ran");
    assert!(bench_status.success());
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&bench_out).unwrap()).unwrap();
    let summary = &report["summary"];
    assert_eq!(summary["num_failed"], 0, "{summary}");
    assert!(summary["num_completed"].as_u64().unwrap() > 10, "{summary}");
    let (_, after) = complete(&server, "smollm2", 16).await;
    assert_eq!(after, before, "greedy text after the rollback");

    // The canary: 90/10 over 1,000 requests (both versions stay loaded).
    let (status, body) = admin(
        &server,
        "PUT",
        "/models/smollm2/traffic",
        Some(json!({"weights": {"1": 90, "2": 10}})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let sel =
        |v: &str| format!("sluice:request_success_total{{model_name=\"smollm2\",version=\"{v}\"}}");
    let base = metrics(&server).await;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let url = server.url.clone();
            tokio::spawn(async move {
                let c = client();
                for _ in 0..125 {
                    let r = c
                        .post(format!("{url}/v1/completions"))
                        .header("content-type", "application/json")
                        .body(r#"{"model":"smollm2","prompt":"Hi","max_tokens":1}"#)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let text = metrics(&server).await;
    let canary = metric(&text, &sel("2")) - metric(&base, &sel("2"));
    let stable = metric(&text, &sel("1")) - metric(&base, &sel("1"));
    assert_eq!(canary + stable, 1000.0);
    assert!(
        (canary / 1000.0 - 0.10).abs() <= 0.05 * 0.10 + 1e-9,
        "canary {canary}"
    );

    // Promote 2, then restart: it is still live, and 1 still the rollback target.
    let (status, body) = admin(
        &server,
        "POST",
        "/models/smollm2/promote",
        Some(json!({"version": "2"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    server.signal_term();
    server.wait_exit(Duration::from_secs(30));
    let server = Server::start(&flags);
    let listed = models(&server).await;
    assert_eq!(listed[0]["live_version"], "2", "{listed:?}");
    assert_eq!(version_state(&listed, "smollm2", "2"), "ready");
    let (status, body) = admin(&server, "POST", "/models/smollm2/rollback", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["live_version"], "1");
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_max_unloads_the_least_recently_used_and_the_budget_refuses() {
    let m = default_model();
    let (a, b) = (format!("a={m}"), format!("b={m}"));
    let server = Server::start(&[
        "--model",
        &a,
        "--model",
        &b,
        "--models-max",
        "1",
        "--autoload",
        "--admin-api-key",
        ADMIN_KEY,
        "--kv-cache-memory",
        "33554432",
        "--max-model-len",
        "512",
    ]);
    let listed = models(&server).await;
    assert_eq!(version_state(&listed, "a", "1"), "ready");
    assert_eq!(version_state(&listed, "b", "1"), "unloaded");
    // `b` autoloads; `a`, idle and least recently used, unloads.
    let (status, body) = complete(&server, "b", 2).await;
    assert_eq!(status, 200, "{body}");
    let listed = models(&server).await;
    assert_eq!(version_state(&listed, "b", "1"), "ready");
    assert_eq!(version_state(&listed, "a", "1"), "unloaded");

    // Without --autoload an unloaded model is a 404 that says so.
    let no_auto = Server::start(&["--model", &a, "--model", &b, "--models-max", "1"]);
    let (status, body) = complete(&no_auto, "b", 2).await;
    assert_eq!(status, 404);
    assert!(body.contains("model_not_loaded"), "{body}");

    // A budget that holds one model refuses a second version, with the numbers.
    let small = Server::start(&[
        "--admin-api-key",
        ADMIN_KEY,
        "--memory-budget",
        "160000000",
        "--kv-cache-memory",
        "33554432",
    ]);
    let (status, body) = admin(
        &small,
        "POST",
        "/models/smollm2/versions",
        Some(json!({"version": "2", "path": m})),
    )
    .await;
    assert_eq!(status, 507, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("MiB") && msg.contains("budget"), "{msg}");
    assert_eq!(complete(&small, "smollm2", 2).await.0, 200);
}

/// The socket is bound before the models load: `/health/live` answers 200 and
/// `/health/ready` 503 meanwhile, and a request that arrives then waits for its model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_while_the_models_load() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let m = default_model();
    let specs: Vec<String> = (0..4).map(|i| format!("m{i}={m}")).collect();
    let mut cmd = Command::new(sluice_bin());
    cmd.args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--kv-cache-memory", "33554432", "--max-model-len", "512"])
        .stdout(std::process::Stdio::null())
        .env("RUST_LOG", "warn");
    for s in &specs {
        cmd.args(["--model", s]);
    }
    let mut child = cmd.spawn().expect("sluice serve");
    let url = format!("http://127.0.0.1:{port}");
    let status = |path: &'static str| {
        let url = url.clone();
        async move {
            match client().get(format!("{url}{path}")).send().await {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            }
        }
    };
    let start = std::time::Instant::now();
    let mut saw_loading = false;
    let mut waited_request = None;
    loop {
        assert!(start.elapsed() < Duration::from_secs(120), "never ready");
        let (live, ready) = (status("/health/live").await, status("/health/ready").await);
        if live == 200 && ready == 503 && !saw_loading {
            saw_loading = true;
            // The last model loads last: this request waits for it.
            let url = url.clone();
            waited_request = Some(tokio::spawn(async move {
                client()
                    .post(format!("{url}/v1/completions"))
                    .header("content-type", "application/json")
                    .body(r#"{"model":"m3","prompt":"Hi","max_tokens":2}"#)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            }));
        }
        if ready == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        saw_loading,
        "never saw live 200 with ready 503 during the load"
    );
    let waited = waited_request.unwrap().await.unwrap().expect("a response");
    assert_eq!(waited, 200);
    let _ = child.kill();
    let _ = child.wait();
}
