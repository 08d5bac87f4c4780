//! `/metrics` as an operator's tools read it: scraped by Prometheus's own text parser
//! (`prometheus_client` in a venv) and held against vLLM's names, types and buckets, every
//! series labelled with the served `model_name` (tests/python/metrics_checks.py). Beside it,
//! `--metrics-names` choosing one set.

use crate::api_support;

use std::process::Command;

use api_support::{post, venv, Server};
use serde_json::json;

const PROMETHEUS_CLIENT: &str = "prometheus-client==0.21.1";
const MAX_MODEL_LEN: &str = "1024";

async fn some_requests(server: &Server) {
    let url = format!("{}/v1/completions", server.url);
    for n in [1, 2] {
        let body = json!({"prompt": "The capital of France is", "max_tokens": 4, "n": n});
        let resp = post(&url, &body).send().await.expect("a completion");
        assert_eq!(resp.status(), 200);
    }
}

async fn scrape(server: &Server) -> String {
    let text = api_support::metrics(server).await;
    assert!(!text.is_empty());
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_vllms_names_types_buckets_and_the_model_name() {
    let server = Server::start(&["--max-model-len", MAX_MODEL_LEN]);
    some_requests(&server).await;
    api_support::assert_idle_without_leaks(&server).await;
    let python = venv::pip_venv("test-venv-prom", PROMETHEUS_CLIENT)
        .join("bin")
        .join("python");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/metrics_checks.py"
    );
    let out = Command::new(python)
        .arg(script)
        .env("SLUICE_URL", &server.url)
        .env("SLUICE_MODEL", &server.model)
        .env("MAX_MODEL_LEN", MAX_MODEL_LEN)
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "metrics_checks.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_names_chooses_one_set() {
    for (names, has_sluice, has_vllm) in [("sluice", true, false), ("vllm", false, true)] {
        let server = Server::start(&["--metrics-names", names]);
        some_requests(&server).await;
        let text = scrape(&server).await;
        assert_eq!(
            text.contains("\nsluice:generation_tokens_total{"),
            has_sluice,
            "{names}"
        );
        assert_eq!(
            text.contains("\nvllm:generation_tokens_total{"),
            has_vllm,
            "{names}"
        );
        assert_eq!(
            text.contains("vllm:cache_config_info{"),
            has_vllm,
            "{names}"
        );
    }
}
