//! `sluice serve --kv-cache-dtype int8` end to end: the pool it sizes, and requests answered
//! (the attention itself is held against the f16 cache in `tests/kv_cache_int8.rs`).

use crate::api_support;

/// `sluice serve --kv-cache-dtype int8` sizes its pool by the 8-bit cache's real bytes (68
/// per head of 64 values against f16's 128: 1.88× the blocks in the same memory, as
/// `vllm:cache_config_info` reports) and answers requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_sizes_the_int8_pool_by_its_bytes_and_answers() {
    const BUDGET: u64 = 64 << 20;
    let budget = BUDGET.to_string();
    let mut blocks = Vec::new();
    for dtype in ["f16", "int8"] {
        let args = ["--kv-cache-dtype", dtype, "--kv-cache-memory", &budget];
        let server = api_support::Server::start(&args);
        let body = serde_json::json!({
            "model": server.model,
            "messages": [{"role": "user", "content": "Name three colours."}],
            "max_tokens": 24,
            "temperature": 0,
        });
        let url = format!("{}/v1/chat/completions", server.url);
        let resp = api_support::post(&url, &body)
            .send()
            .await
            .expect("a completion");
        assert_eq!(resp.status(), 200, "{dtype}");
        let v: serde_json::Value = resp.json().await.expect("json");
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default();
        assert!(!text.trim().is_empty(), "{dtype}: {v}");
        let metrics = api_support::metrics(&server).await;
        let line = metrics
            .lines()
            .find(|l| l.starts_with("vllm:cache_config_info{"))
            .expect("cache_config_info");
        let n: u64 = line
            .split("num_gpu_blocks=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .and_then(|n| n.parse().ok())
            .expect("num_gpu_blocks");
        blocks.push(n);
    }
    // SmolLM2-135M: 30 layers × 3 KV heads × (K and V) × 16 tokens a block.
    let per_block = |head_bytes: u64| 30 * 3 * 2 * 16 * head_bytes;
    assert_eq!(blocks, [BUDGET / per_block(128), BUDGET / per_block(68)]);
}
