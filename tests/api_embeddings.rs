//! `/v1/embeddings` behind the HTTP API, driven by the official `openai` package
//! (tests/python/embeddings_checks.py: formats, inputs, errors, concurrency, the Batch API)
//! and `langchain-openai`'s `OpenAIEmbeddings` (tests/python/langchain_embeddings.py);
//! `--pooling-type mean` reaches the engine.

use crate::api_support;

use serde_json::json;

use api_support::{post_json, Server};

/// The `langchain-openai` package of the LangChain checks (the venv `tests/tools.rs` uses).
const LANGCHAIN_OPENAI_VERSION: &str = "1.7.4";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_and_langchain_get_embeddings() {
    let dir = std::env::temp_dir().join(format!("sluice-embeddings-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data_dir = dir.to_string_lossy().into_owned();
    let server = Server::start(&["--data-dir", &data_dir]);
    let url = server.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut out =
            api_support::run_python("embeddings_checks.py", &url, &[("EMBED_BATCH", "1")]);
        let venv = api_support::venv::pip_venv(
            "langchain-venv",
            &format!("langchain-openai=={LANGCHAIN_OPENAI_VERSION}"),
        );
        let python = venv.join("bin").join("python");
        out += &api_support::run_python_with(&python, "langchain_embeddings.py", &url, &[]);
        out
    })
    .await
    .expect("python task");
    println!("{out}");
    assert!(out.contains("all checks passed"), "{out}");
    assert!(
        out.contains("all langchain embedding checks passed"),
        "{out}"
    );
    api_support::assert_idle_without_leaks(&server).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooling_type_mean_reaches_the_engine() {
    let body = json!({"input": "A short text to embed, twice over.", "encoding_format": "float"});
    let mut vectors = Vec::new();
    for pooling in ["last", "mean"] {
        let server = Server::start(&["--pooling-type", pooling]);
        let r = post_json(&format!("{}/v1/embeddings", server.url), &body).await;
        let v: Vec<f64> = serde_json::from_value(r["data"][0]["embedding"].clone())
            .unwrap_or_else(|e| panic!("{pooling}: {e}: {r}"));
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{pooling}: norm {norm}");
        vectors.push(v);
        api_support::assert_idle_without_leaks(&server).await;
    }
    let cos: f64 = vectors[0].iter().zip(&vectors[1]).map(|(a, b)| a * b).sum();
    assert!(
        cos < 0.999,
        "last and mean pooling gave the same vector (cosine {cos})"
    );
}
