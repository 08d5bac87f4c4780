//! Speculative decoding behind the HTTP API, driven by the official `openai` package
//! (tests/python/speculative_checks.py): the per-request `speculative` switch changes no
//! text, logprob or count, greedy or seeded, whole or streamed; the counters are vLLM's.

use crate::api_support;

use api_support::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_sees_the_same_output_with_speculation_on_and_off() {
    let server = Server::start(&["--speculative-config", r#"{"method":"ngram"}"#]);
    let out = tokio::task::spawn_blocking({
        let url = server.url.clone();
        move || api_support::run_python("speculative_checks.py", &url, &[])
    })
    .await
    .expect("python task");
    assert!(out.contains("all checks passed"), "{out}");
    api_support::assert_idle_without_leaks(&server).await;
}
