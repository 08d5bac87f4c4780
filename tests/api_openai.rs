//! `sluice serve` driven by the official `openai` Python package (tests/python/), and the
//! server's greedy chat output held against `sluice generate`'s for the chat fixtures.

use crate::api_support;

use std::process::Command;

use api_support::{post, Server, API_KEY};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Fixture {
    name: String,
    chat: bool,
    #[serde(default)]
    messages: Vec<serde_json::Value>,
}

/// Tokens compared per fixture (the model is slow on the CPU in debug builds).
const GREEDY_TOKENS: usize = 8;

#[derive(Debug, Deserialize)]
struct GenerateOutput {
    ids: Vec<u32>,
    text: String,
}

fn generate(prompt: &str) -> GenerateOutput {
    generate_with(prompt, &[])
}

fn generate_with(prompt: &str, extra: &[&str]) -> GenerateOutput {
    let model = sluice::assets::default_model_path().expect("the default model");
    let out = Command::new(api_support::sluice_bin())
        .args(["generate", "--chat", "--json", "--threads", "2"])
        .args(["--max-tokens", &GREEDY_TOKENS.to_string()])
        .args(extra)
        .arg("--model")
        .arg(model)
        .args(["--prompt", prompt])
        .env("RUST_LOG", "warn")
        .output()
        .expect("running sluice generate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("generate --json output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_and_greedy_chat_match_generate() {
    let server = Server::start(&["--api-key", API_KEY]);
    let out = tokio::task::spawn_blocking({
        let url = server.url.clone();
        move || api_support::run_python("openai_checks.py", &url, &[])
    })
    .await
    .expect("python task");
    assert!(out.contains("all checks passed"), "{out}");

    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/greedy.jsonl");
    let fixtures: Vec<Fixture> = std::fs::read_to_string(path)
        .expect("greedy.jsonl")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a fixture"))
        .filter(|f: &Fixture| f.chat)
        .collect();
    assert!(fixtures.len() >= 5, "chat fixtures: {}", fixtures.len());
    // All requests at once: batched serving must give what one sequence alone gives.
    let url = format!("{}/v1/chat/completions", server.url);
    let requests = fixtures.iter().map(|f| {
        let body = serde_json::json!({
            "model": "smollm2", "messages": f.messages, "max_tokens": GREEDY_TOKENS,
            "temperature": 0, "return_token_ids": true,
        });
        let req = post(&url, &body);
        async move {
            let resp = req.send().await.expect("chat request");
            assert_eq!(resp.status(), 200);
            resp.json::<serde_json::Value>().await.expect("chat JSON")
        }
    });
    let responses = futures::future::join_all(requests).await;
    for (f, resp) in fixtures.iter().zip(responses) {
        let content = f.messages[0]["content"].as_str().expect("a user message");
        let expected = tokio::task::spawn_blocking({
            let content = content.to_string();
            move || generate(&content)
        })
        .await
        .expect("generate task");
        let choice = &resp["choices"][0];
        let ids: Vec<u32> = serde_json::from_value(choice["token_ids"].clone()).expect("token_ids");
        assert_eq!(ids, expected.ids, "{}: token ids", f.name);
        assert_eq!(
            choice["message"]["content"].as_str(),
            Some(expected.text.as_str()),
            "{}: text",
            f.name
        );
    }
}

#[derive(Debug, Deserialize)]
struct GreedyFixture {
    name: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
}

/// `serve --cpu-numerics ggml` gives llama.cpp's greedy tokens for every fixture, exactly,
/// with all requests sent at once (so they are batched, and the long prompts' prefills are
/// cut into chunks that share steps with the others).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ggml_numerics_serve_llama_cpp_greedy_tokens() {
    let server = Server::start(&["--cpu-numerics", "ggml", "--device", "cpu"]);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let fixtures: Vec<GreedyFixture> = ["greedy.jsonl", "greedy_long.jsonl"]
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(dir.join(f))
                .expect("a fixture file")
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(&l).expect("a fixture"))
        .collect();
    let url = format!("{}/v1/completions", server.url);
    let requests = fixtures.iter().map(|f| {
        let body = serde_json::json!({
            "model": "smollm2", "prompt": f.prompt_ids, "max_tokens": f.greedy_ids.len(),
            "temperature": 0, "return_token_ids": true,
        });
        let req = post(&url, &body);
        async move {
            let resp = req.send().await.expect("completion request");
            assert_eq!(resp.status(), 200);
            resp.json::<serde_json::Value>()
                .await
                .expect("completion JSON")
        }
    });
    let responses = futures::future::join_all(requests).await;
    for (f, resp) in fixtures.iter().zip(responses) {
        let choice = &resp["choices"][0];
        let ids: Vec<u32> = serde_json::from_value(choice["token_ids"].clone()).expect("token_ids");
        assert_eq!(ids, f.greedy_ids, "{}: token ids", f.name);
        // Both stop at the end-of-sequence token (id 2), or at the length asked for.
        let finish = if f.greedy_ids.last() == Some(&2) {
            "stop"
        } else {
            "length"
        };
        assert_eq!(choice["finish_reason"], finish, "{}", f.name);
    }
    // `serve` turns prefix caching off under ggml numerics: the longest prompt again (35 full
    // blocks, all of them cached under the default numerics) hits nothing.
    let longest = fixtures.iter().max_by_key(|f| f.prompt_ids.len()).unwrap();
    let body = serde_json::json!({"model": "smollm2", "prompt": longest.prompt_ids,
                                  "max_tokens": 1, "temperature": 0});
    let resp = api_support::post_json(&url, &body).await;
    let cached = &resp["usage"]["prompt_tokens_details"]["cached_tokens"];
    assert!(cached.is_null() || cached == 0, "{resp}");
    let text = api_support::metrics(&server).await;
    assert_eq!(
        api_support::metric(&text, "sluice:prefix_cache_hits_total"),
        0.0,
        "{text}"
    );
}

/// `sluice generate` runs through the engine: a stop string ends its text where it first
/// appears, without the stop string.
#[test]
fn generate_honours_stop_strings() {
    let prompt = "What is the capital of France?";
    let full = generate(prompt);
    // A stop string from inside the greedy text: its second word.
    let word = full
        .text
        .split_whitespace()
        .nth(1)
        .expect("at least two words")
        .to_string();
    let cut = full.text.find(&word).unwrap();
    let stopped = generate_with(prompt, &["--stop", &word]);
    assert_eq!(
        stopped.text,
        full.text[..cut],
        "stop {word:?} in {:?}",
        full.text
    );
    assert!(stopped.ids.len() < full.ids.len());
}
