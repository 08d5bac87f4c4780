//! The error table of `sluice serve`, status by status: every refusal is an OpenAI-shaped
//! error `{"error": {"message", "type", "param", "code"}}` with the right status and `param`.
//! Beside it, the small endpoints that need no generation: `/tokenize`, `/detokenize`.

use crate::api_support;

use std::time::Duration;

use api_support::{client, post, Server, API_KEY};
use serde_json::{json, Value};

/// Sends `req` and checks the status, the error shape and `param`.
async fn expect_error(
    req: reqwest::RequestBuilder,
    status: u16,
    param: Option<&str>,
    what: &str,
) -> Value {
    let resp = req.send().await.expect(what);
    assert_eq!(resp.status().as_u16(), status, "{what}");
    let body: Value = resp
        .json()
        .await
        .unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
    let err = &body["error"];
    for key in ["message", "type", "param", "code"] {
        assert!(err.get(key).is_some(), "{what}: no `{key}` in {body}");
    }
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
    assert_eq!(err["param"].as_str(), param, "{what}: {body}");
    body
}

fn chat_body(extra: Value) -> Value {
    let mut body = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1,
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_an_openai_error_with_its_status() {
    let server = Server::start(&[
        "--api-key",
        API_KEY,
        "--max-num-seqs",
        "1",
        "--max-waiting",
        "1",
        "--max-body-bytes",
        "65536",
    ]);
    let chat = format!("{}/v1/chat/completions", server.url);
    let completions = format!("{}/v1/completions", server.url);

    // 400: malformed JSON, wrong types, values out of range, each naming its field.
    let malformed = client()
        .post(&chat)
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body(r#"{"messages": ["#);
    let body = expect_error(malformed, 400, None, "malformed JSON").await;
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let cases: Vec<(Value, &str)> = vec![
        (json!({"temperature": "hot"}), "temperature"),
        (json!({"messages": "hello"}), "messages"),
        (json!({"messages": []}), "messages"),
        (json!({"temperature": -1}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"n": 0}), "n"),
        // The server runs one sequence at a time.
        (json!({"n": 2}), "n"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (
            json!({"logprobs": true, "top_logprobs": 50}),
            "top_logprobs",
        ),
        (json!({"logit_bias": {"999999": 1}}), "logit_bias"),
        (json!({"stop_token_ids": [-1]}), "stop_token_ids"),
        // A field sluice does not honour is refused by name, never ignored.
        (json!({"echo": true}), "echo"),
        (json!({"functions": [{"name": "f"}]}), "functions"),
        (json!({"tool_choice": "always"}), "tool_choice"),
        (json!({"no_such_field": 1}), "no_such_field"),
    ];
    for (extra, param) in cases {
        let what = format!("chat with {extra}");
        expect_error(post(&chat, &chat_body(extra)), 400, Some(param), &what).await;
    }
    // The context is 1024 tokens: a longer prompt, then prompt + max_tokens over it.
    let long = json!({"model": "smollm2", "prompt": vec![504; 1100], "max_tokens": 1});
    expect_error(
        post(&completions, &long),
        400,
        Some("prompt"),
        "prompt too long",
    )
    .await;
    let over = json!({"model": "smollm2", "prompt": vec![504; 1000], "max_tokens": 100});
    expect_error(
        post(&completions, &over),
        400,
        Some("max_tokens"),
        "over the context",
    )
    .await;

    let best_of = json!({"prompt": "Hi", "max_tokens": 1, "best_of": 2});
    expect_error(
        post(&completions, &best_of),
        400,
        Some("best_of"),
        "best_of > n",
    )
    .await;

    // 404: unknown model, unknown route.
    let body = expect_error(
        post(&chat, &chat_body(json!({"model": "gpt-17"}))),
        404,
        Some("model"),
        "unknown model",
    )
    .await;
    assert_eq!(body["error"]["code"], "model_not_found");
    let body = expect_error(
        client()
            .get(format!("{}/v1/models/gpt-17", server.url))
            .bearer_auth(API_KEY),
        404,
        Some("model"),
        "unknown model card",
    )
    .await;
    assert_eq!(body["error"]["code"], "model_not_found");
    let card: Value = client()
        .get(format!("{}/v1/models/smollm2", server.url))
        .bearer_auth(API_KEY)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .expect("the served model's card")
        .json()
        .await
        .expect("a JSON card");
    assert_eq!(
        (card["id"].as_str(), card["object"].as_str()),
        (Some("smollm2"), Some("model"))
    );
    expect_error(
        client().get(format!("{}/v1/nothing", server.url)),
        404,
        None,
        "unknown route",
    )
    .await;

    // 401: no key, wrong key; /health and /metrics stay open.
    let no_key = client()
        .post(&chat)
        .header("content-type", "application/json")
        .body(chat_body(json!({})).to_string());
    expect_error(no_key, 401, None, "no API key").await;
    let wrong_key = client()
        .get(format!("{}/v1/models", server.url))
        .bearer_auth("nope");
    expect_error(wrong_key, 401, None, "wrong API key").await;
    for path in ["/health", "/metrics"] {
        let resp = client()
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .expect(path);
        assert_eq!(resp.status(), 200, "{path} without a key");
    }

    // 413: a body over --max-body-bytes; 415: not JSON.
    let big = chat_body(json!({"user": "x".repeat(70_000)}));
    expect_error(post(&chat, &big), 413, None, "body too large").await;
    let form = client()
        .post(&chat)
        .bearer_auth(API_KEY)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("messages=hi");
    expect_error(form, 415, None, "form body").await;

    // /tokenize and /detokenize, vLLM's shapes; the ids are llama.cpp's (tests/fixtures).
    let tokenize = format!("{}/tokenize", server.url);
    let resp = post(&tokenize, &json!({"prompt": "The capital of France is"}))
        .send()
        .await
        .expect("tokenize");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("tokenize JSON");
    assert_eq!(body["tokens"], json!([504, 3575, 282, 4649, 314]), "{body}");
    assert_eq!(body["count"], 5);
    assert_eq!(body["max_model_len"], 1024);
    let chat_ids = json!({"messages": [{"role": "user", "content": "Hello! Who are you?"}]});
    let body: Value = post(&tokenize, &chat_ids)
        .send()
        .await
        .expect("tokenize chat")
        .json()
        .await
        .expect("tokenize chat JSON");
    // The chat fixture's prompt: system prompt, user turn, assistant header.
    assert_eq!(body["count"], 36, "{body}");
    let detok = post(
        &format!("{}/detokenize", server.url),
        &json!({"tokens": [504, 3575, 282, 4649, 314]}),
    );
    let body: Value = detok
        .send()
        .await
        .expect("detokenize")
        .json()
        .await
        .expect("JSON");
    assert_eq!(body["prompt"], "The capital of France is");
    let bad = post(
        &format!("{}/detokenize", server.url),
        &json!({"tokens": [1 << 30]}),
    );
    expect_error(bad, 400, Some("tokens"), "detokenize out of range").await;

    // 429 with Retry-After: one request runs (--max-num-seqs 1), one waits
    // (--max-waiting 1), the next is refused at once.
    let long_stream = |content: &str| {
        chat_body(json!({
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 200, "ignore_eos": true, "stream": true,
        }))
    };
    let running = post(&chat, &long_stream("one"))
        .send()
        .await
        .expect("first");
    assert_eq!(running.status(), 200);
    let running = running.bytes_stream();
    // Once the engine counts it as running, it no longer takes the waiting seat.
    api_support::wait_for_metrics(&server, Duration::from_secs(120), |t| {
        api_support::metric(t, "sluice:num_requests_running") == 1.0
    })
    .await
    .expect("the first request running");
    let waiting = post(&chat, &long_stream("two"))
        .send()
        .await
        .expect("second");
    assert_eq!(waiting.status(), 200);
    let refused = post(&chat, &long_stream("three"))
        .send()
        .await
        .expect("third");
    assert_eq!(refused.status(), 429);
    let retry_after = refused.headers().get("retry-after").cloned();
    assert!(retry_after.is_some(), "429 without Retry-After");
    let body: Value = refused.json().await.expect("429 body");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    drop(running);
    drop(waiting);
}
