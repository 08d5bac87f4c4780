//! Structured outputs with the real default model: greedy constrained output is batch
//! invariant and valid (the engine), and through a real `sluice serve`: 400s that name the
//! problem, every constraint kind on chat and completions, streamed, `n > 1` with seeds and
//! penalties, the official `openai` package's `parse`, and a property test over generated
//! schemas validated by Python's `jsonschema`.

use crate::api_support;

use std::sync::Arc;

use serde_json::{json, Value};
use sluice::engine::{self, EngineConfig, GenerateRequest, StreamEvent};
use sluice::gguf::GgufFile;
use sluice::kernels::cpu::CpuBackend;
use sluice::kv_cache::CacheConfig;
use sluice::model::config::ModelConfig;
use sluice::model::llama::Llama;
use sluice::sampling::{ConstraintCompiler, ConstraintSpec};
use sluice::scheduler::SchedulerConfig;
use sluice::tokenizer::Tokenizer;

use api_support::{post, post_json, Server};

fn person_schema() -> Value {
    // Bounded strings, numbers and arrays: every output completes within the token budget.
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 2}
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": false
    })
}

/// Checks `text` against `person_schema` by hand (the property test uses `jsonschema`).
fn assert_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    let obj = v.as_object().expect("an object");
    assert_eq!(obj.len(), 3, "{text}");
    assert!(
        obj["name"]
            .as_str()
            .is_some_and(|s| s.chars().count() <= 12),
        "{text}"
    );
    assert!(obj["age"].as_u64().is_some_and(|a| a <= 120), "{text}");
    let tags = obj["tags"].as_array().expect("tags");
    assert!(tags.len() <= 2, "{text}");
    assert!(tags
        .iter()
        .all(|t| ["red", "green", "blue"].contains(&t.as_str().unwrap_or(""))));
}

#[test]
fn greedy_constrained_output_is_batch_invariant_and_valid() {
    // (`tests/common` is not loaded here: `api_support` already loads its metrics module.)
    let path = sluice::assets::default_model_path().expect("the default model");
    let gguf = GgufFile::open(&path).expect("opening the default model");
    let tokenizer = Arc::new(Tokenizer::from_gguf(&gguf).expect("tokenizer"));
    let model_config = ModelConfig::from_gguf(&gguf).expect("model config");
    let model = Llama::load(model_config, &gguf, CpuBackend::new(2)).expect("the model");
    let config = EngineConfig {
        scheduler: SchedulerConfig::default(),
        cache: CacheConfig {
            block_size: 16,
            num_blocks: 256,
            enable_prefix_caching: false,
            sliding_window: None,
        },
        max_model_len: 2048,
        ..EngineConfig::default()
    };
    let engine = engine::spawn(model, tokenizer.clone(), config).expect("engine");
    let constraint = ConstraintCompiler::new(tokenizer.clone())
        .compile(&ConstraintSpec::JsonSchema(person_schema()))
        .expect("the schema compiles");
    let prompts: Vec<Vec<u32>> = [
        "Describe a painter as JSON:",
        "A person:",
        "Here is a record of a customer named Bo.",
        "{",
    ]
    .iter()
    .map(|p| tokenizer.encode(p, false).expect("encode"))
    .collect();
    let request = |ids: &Vec<u32>| GenerateRequest {
        constraint: Some(constraint.clone()),
        ..GenerateRequest::greedy(ids.clone(), 80)
    };
    let run = |streams: Vec<engine::RequestStream>| -> Vec<(Vec<u32>, String)> {
        streams
            .into_iter()
            .map(|mut s| {
                let (mut ids, mut text, mut reason) = (Vec::new(), String::new(), None);
                loop {
                    match s.next_blocking() {
                        Some(StreamEvent::Token {
                            token_ids, text: t, ..
                        }) => {
                            ids.extend(token_ids);
                            text.push_str(&t);
                        }
                        Some(StreamEvent::SeqFinished { reason: r, .. }) => reason = Some(r),
                        Some(StreamEvent::Done { .. }) => break,
                        other => panic!("unexpected event {other:?}"),
                    }
                }
                assert_eq!(reason.map(|r| r.as_str()), Some("stop"), "{text}");
                (ids, text)
            })
            .collect()
    };
    let alone: Vec<_> = prompts
        .iter()
        .flat_map(|p| run(vec![engine.submit(request(p)).expect("submit")]))
        .collect();
    let together = run(prompts
        .iter()
        .map(|p| engine.submit(request(p)).expect("submit"))
        .collect());
    for (a, t) in alone.iter().zip(&together) {
        assert_eq!(a.0, t.0, "alone vs in a batch: {:?} / {:?}", a.1, t.1);
        assert_person(&a.1);
    }
}

async fn chat(server: &Server, extra: Value) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": "Give me a person as JSON."}],
        "max_tokens": 80,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().expect("an object") {
        body[k] = v.clone();
    }
    post_json(&format!("{}/v1/chat/completions", server.url), &body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_outputs_through_the_server() {
    let server = Server::start(&[]);
    // Refusals: a 400 naming the field and the problem, before anything runs.
    let refused = [
        (
            json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "objekt"}}}}),
            "response_format",
        ),
        (
            json!({"structured_outputs": {"regex": "(unclosed"}}),
            "structured_outputs.regex",
        ),
        (
            json!({"structured_outputs": {"grammar": "start: nowhere"}}),
            "structured_outputs.grammar",
        ),
        (
            json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}),
            "structured_outputs",
        ),
        (
            json!({"response_format": {"type": "json_object"},
            "structured_outputs": {"choice": ["b"]}}),
            "structured_outputs",
        ),
    ];
    for (extra, param) in refused {
        let url = format!("{}/v1/chat/completions", server.url);
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
        for (k, v) in extra.as_object().expect("an object") {
            body[k] = v.clone();
        }
        let resp = post(&url, &body).send().await.expect("a response");
        assert_eq!(resp.status(), 400, "{extra}");
        let err: Value = resp.json().await.expect("a JSON error");
        assert_eq!(err["error"]["param"], param, "{err}");
        assert_eq!(err["error"]["type"], "invalid_request_error", "{err}");
        assert!(
            err["error"]["message"]
                .as_str()
                .is_some_and(|m| m.len() > 10),
            "{err}"
        );
    }
    // A pathological schema is refused by llguidance's limits, quickly, as a 400.
    let huge: Vec<String> = (0..100_000).map(|i| format!("value{i}")).collect();
    let started = std::time::Instant::now();
    let r = chat(
        &server,
        json!({"response_format": {"type": "json_schema",
        "json_schema": {"name": "huge", "schema": {"enum": huge}}}}),
    )
    .await;
    assert_eq!(r["error"]["param"], "response_format", "{r}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    // A schema, greedy: valid and finished with `stop`.
    let r = chat(
        &server,
        json!({"response_format": {"type": "json_schema",
        "json_schema": {"name": "person", "schema": person_schema(), "strict": true}}}),
    )
    .await;
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    assert_person(
        r["choices"][0]["message"]["content"]
            .as_str()
            .expect("content"),
    );
    // A choice, sampled with a seed and penalties, n = 3: each one of the choices.
    let r = chat(
        &server,
        json!({"structured_outputs": {"choice": ["alpha", "beta", "gamma"]},
        "n": 3, "seed": 7, "temperature": 1.0, "presence_penalty": 1.5,
        "frequency_penalty": 0.5, "repetition_penalty": 1.2}),
    )
    .await;
    for c in r["choices"].as_array().expect("choices") {
        let text = c["message"]["content"].as_str().expect("content");
        assert!(["alpha", "beta", "gamma"].contains(&text), "{r}");
        assert_eq!(c["finish_reason"], "stop", "{r}");
    }
    // Completions, streamed, n = 2, a regex; the stream's text matches it whole.
    let url = format!("{}/v1/completions", server.url);
    let body = json!({"prompt": "The year was", "max_tokens": 10, "stream": true, "n": 2,
        "seed": 3, "structured_outputs": {"regex": " (19|20)[0-9]{2}"}});
    let sse = post(&url, &body)
        .send()
        .await
        .expect("a response")
        .text()
        .await
        .expect("a body");
    let mut texts = [String::new(), String::new()];
    for line in sse.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(line).expect("a chunk");
        for c in chunk["choices"].as_array().expect("choices") {
            let i = c["index"].as_u64().expect("index") as usize;
            texts[i].push_str(c["text"].as_str().unwrap_or(""));
        }
    }
    for t in &texts {
        let digits = t.strip_prefix(' ').expect("a leading space");
        assert!(
            digits.len() == 4 && digits.chars().all(|c| c.is_ascii_digit()),
            "{t:?}"
        );
        assert!(
            digits.starts_with("19") || digits.starts_with("20"),
            "{t:?}"
        );
    }
    // json_object on completions: an object; the only cut is `length`.
    let r = post_json(
        &url,
        &json!({"prompt": "JSON:", "max_tokens": 60, "temperature": 0,
        "response_format": {"type": "json_object"}}),
    )
    .await;
    let c = &r["choices"][0];
    if c["finish_reason"] == "stop" {
        let v: Value = serde_json::from_str(c["text"].as_str().expect("text")).expect("JSON");
        assert!(v.is_object(), "{r}");
    } else {
        assert_eq!(c["finish_reason"], "length", "{r}");
    }

    // The official client: `parse` with a pydantic model, json_schema, json_object, a 400.
    let out = tokio::task::spawn_blocking({
        let url = server.url.clone();
        move || api_support::run_python("structured_checks.py", &url, &[])
    })
    .await
    .expect("python task");
    assert!(out.contains("all checks passed"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_schemas_always_give_valid_json() {
    let server = Server::start(&["--max-num-seqs", "16"]);
    let venv = api_support::venv::pip_venv("jsonschema-venv", "jsonschema==4.26.0");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/structured_props.py");
    let url = server.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(venv.join("bin").join("python"))
            .arg(script)
            .env("SLUICE_URL", url)
            .env("SLUICE_API_KEY", api_support::API_KEY)
            .output()
            .expect("running python")
    })
    .await
    .expect("python task");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("all outputs valid"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
