//! Tool calls through a real `sluice serve` with the default model (its template takes no
//! tools, so the generic envelope): 400s naming the field, `required` and a named tool
//! forced by grammar (arguments valid against the schema), `auto` and `none` well-formed,
//! `n > 1`, streamed deltas reassembled into the non-streamed greedy call, history with
//! calls and tool results, and the official `openai` and `langchain-openai` packages
//! (`tests/python/tools_checks.py`, `tests/python/langchain_tools.py`).

use crate::api_support;

use serde_json::{json, Value};

use api_support::{post, post_json, Server, API_KEY};

/// The `langchain-openai` package the LangChain checks run against (its own venv).
const LANGCHAIN_OPENAI_VERSION: &str = "1.7.4";

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {"type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20},
                               "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time",
            "description": "The time now in a time zone",
            "parameters": {"type": "object",
                "properties": {"zone": {"enum": ["utc", "cet", "pst"]}},
                "required": ["zone"], "additionalProperties": false}}}
    ])
}

fn body(extra: Value) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "max_tokens": 60,
        "temperature": 0,
        "tools": tools(),
    });
    for (k, v) in extra.as_object().expect("an object") {
        body[k] = v.clone();
    }
    body
}

async fn chat(server: &Server, extra: Value) -> Value {
    post_json(&format!("{}/v1/chat/completions", server.url), &body(extra)).await
}

/// A call's name and its arguments, checked against the tool's schema by hand.
fn checked_call(call: &Value) -> (String, Value) {
    assert_eq!(call["type"], "function", "{call}");
    let id = call["id"].as_str().expect("an id");
    assert!(
        id.starts_with("call_") && id[5..].chars().all(|c| c.is_ascii_alphanumeric()),
        "{id}"
    );
    let name = call["function"]["name"].as_str().expect("a name");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().expect("args"))
        .expect("arguments are JSON");
    let obj = args.as_object().expect("arguments are an object");
    match name {
        "get_weather" => {
            assert_eq!(obj.len(), 2, "{args}");
            assert!(obj["city"]
                .as_str()
                .is_some_and(|c| c.chars().count() <= 20));
            assert!(["c", "f"].contains(&obj["unit"].as_str().unwrap_or("")));
        }
        "get_time" => {
            assert_eq!(obj.len(), 1, "{args}");
            assert!(["utc", "cet", "pst"].contains(&obj["zone"].as_str().unwrap_or("")));
        }
        other => panic!("a call of a tool not offered: {other}"),
    }
    (name.to_string(), args)
}

/// A choice that ended in calls: no content, `tool_calls`, every call valid.
fn calls_of(choice: &Value) -> Vec<(String, Value)> {
    assert_eq!(choice["finish_reason"], "tool_calls", "{choice}");
    assert!(choice["message"]["content"].is_null(), "{choice}");
    let calls = choice["message"]["tool_calls"].as_array().expect("calls");
    assert!(!calls.is_empty(), "{choice}");
    calls.iter().map(checked_call).collect()
}

async fn refusals(server: &Server) {
    let named = |n: &str| json!({"type": "function", "function": {"name": n}});
    let bad_schema = json!([{"type": "function", "function": {"name": "x",
        "parameters": {"type": "objekt"}}}]);
    let cases = [
        (json!({"tool_choice": "always"}), "tool_choice"),
        (json!({"tool_choice": named("get_news")}), "tool_choice"),
        (
            json!({"tools": null, "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"tools": bad_schema.clone(), "tool_choice": "required"}),
            "tools",
        ),
        (json!({"tools": bad_schema}), "tools"),
        (json!({"tools": [{"type": "function"}]}), "tools"),
        (
            json!({"tool_choice": "required", "response_format": {"type": "json_object"}}),
            "tool_choice",
        ),
        (json!({"functions": [{"name": "f"}]}), "functions"),
        (json!({"function_call": "auto"}), "function_call"),
    ];
    let url = format!("{}/v1/chat/completions", server.url);
    for (extra, param) in cases {
        let resp = post(&url, &body(extra.clone()))
            .send()
            .await
            .expect("a response");
        assert_eq!(resp.status(), 400, "{extra}");
        let err: Value = resp.json().await.expect("a JSON error");
        assert_eq!(err["error"]["param"], param, "{extra}: {err}");
        assert_eq!(err["error"]["type"], "invalid_request_error", "{err}");
    }
}

/// The SSE stream's tool-call deltas put together as the SDKs do: per index, the first
/// delta's id and name, then the arguments appended; with the finish reason, the number of
/// argument fragments and the content.
async fn streamed_calls(server: &Server, extra: Value) -> (Vec<Value>, String, usize, String) {
    let mut req = body(extra);
    req["stream"] = json!(true);
    let text = post(&format!("{}/v1/chat/completions", server.url), &req)
        .send()
        .await
        .expect("a response")
        .text()
        .await
        .expect("the stream");
    let mut calls: Vec<Value> = Vec::new();
    let mut finish = String::new();
    let mut fragments = 0;
    let mut content = String::new();
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).expect("a JSON chunk");
        let choice = &chunk["choices"][0];
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_string();
        }
        for d in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = d["index"].as_u64().expect("an index") as usize;
            if i == calls.len() {
                assert!(
                    d["id"].is_string() && d["function"]["name"].is_string(),
                    "{d}"
                );
                assert_eq!(d["function"]["arguments"], "", "the first delta of a call");
                calls.push(json!({"id": d["id"], "type": d["type"],
                    "function": {"name": d["function"]["name"], "arguments": ""}}));
            } else {
                assert!(d.get("id").is_none() && d["function"].get("name").is_none());
                fragments += 1;
                let args = &mut calls[i]["function"]["arguments"];
                *args = json!(format!(
                    "{}{}",
                    args.as_str().unwrap_or(""),
                    d["function"]["arguments"].as_str().expect("a fragment")
                ));
            }
        }
        content.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
    }
    assert!(
        calls.is_empty() || content.is_empty(),
        "no call text as content: {content}"
    );
    (calls, finish, fragments, content)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_through_the_server() {
    let server = Server::start(&["--api-key", API_KEY]);
    refusals(&server).await;

    // Required: a call, whichever tool; the grammar makes its arguments valid.
    let r = chat(&server, json!({"tool_choice": "required"})).await;
    let required = calls_of(&r["choices"][0]);

    // A named tool, one call only.
    let named = json!({"type": "function", "function": {"name": "get_time"}});
    let r = chat(
        &server,
        json!({"tool_choice": named, "parallel_tool_calls": false}),
    )
    .await;
    let calls = calls_of(&r["choices"][0]);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0, "get_time");

    // n > 1, sampled with a seed: each choice its own valid calls.
    let r = chat(
        &server,
        json!({"tool_choice": "required", "n": 2, "seed": 3, "temperature": 1.0,
            "parallel_tool_calls": false}),
    )
    .await;
    let choices = r["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2);
    choices.iter().for_each(|c| drop(calls_of(c)));

    // Auto: either calls or content, well-formed either way.
    let r = chat(&server, json!({"tool_choice": "auto"})).await;
    // Streamed, the same answer: held back to its end, then calls or content.
    let (auto_streamed, auto_finish, _, auto_content) =
        streamed_calls(&server, json!({"tool_choice": "auto"})).await;
    assert_eq!(auto_finish, r["choices"][0]["finish_reason"], "{r}");
    assert_eq!(auto_streamed.is_empty(), auto_finish != "tool_calls");
    if auto_streamed.is_empty() {
        assert_eq!(auto_content, r["choices"][0]["message"]["content"], "{r}");
    }
    let c = &r["choices"][0];
    if c["finish_reason"] == "tool_calls" {
        calls_of(c);
    } else {
        assert!(c["message"]["content"].is_string(), "{c}");
        assert!(c["message"].get("tool_calls").is_none(), "{c}");
    }

    // None: tools are not offered, the answer is text.
    let r = chat(&server, json!({"tool_choice": "none", "max_tokens": 8})).await;
    let c = &r["choices"][0];
    assert!(c["message"]["content"].is_string(), "{c}");
    assert!(c["message"].get("tool_calls").is_none(), "{c}");
    assert_ne!(c["finish_reason"], "tool_calls");

    // Streamed: the arguments come in fragments as they are generated, and the deltas add
    // up to the non-streamed greedy call.
    let (streamed, finish, fragments, _) =
        streamed_calls(&server, json!({"tool_choice": "required"})).await;
    assert_eq!(finish, "tool_calls");
    assert!(fragments > 3, "{fragments} argument fragments");
    let streamed: Vec<(String, Value)> = streamed.iter().map(checked_call).collect();
    assert_eq!(streamed, required);

    // History: the call and its result render, and the model answers.
    let history = json!({"messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_abc", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "18 C and sunny"}
    ], "tool_choice": "none", "max_tokens": 8});
    // As rendered (`/tokenize` renders as chat does): the call as the envelope in the
    // assistant's turn, the result as a user turn.
    let ids = post_json(
        &format!("{}/tokenize", server.url),
        &json!({"messages": history["messages"]}),
    )
    .await;
    let text = post_json(
        &format!("{}/detokenize", server.url),
        &json!({"tokens": ids["tokens"]}),
    )
    .await;
    let text = text["prompt"].as_str().expect("the rendered prompt");
    assert!(
        text.contains(
            "<|im_start|>assistant\n{\"tool_calls\": [{\"name\": \"get_weather\", \
             \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}]}<|im_end|>"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "<|im_start|>user\n{\"tool_result\": {\"tool_call_id\": \"call_abc\", \
             \"content\": \"18 C and sunny\"}}<|im_end|>"
        ),
        "{text}"
    );
    let r = chat(&server, history).await;
    let c = &r["choices"][0];
    assert!(
        c["message"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{r}"
    );

    api_support::assert_idle_without_leaks(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_with_the_openai_and_langchain_packages() {
    let server = Server::start(&["--api-key", API_KEY]);
    let url = server.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut out = api_support::run_python("tools_checks.py", &url, &[]);
        let venv = api_support::venv::pip_venv(
            "langchain-venv",
            &format!("langchain-openai=={LANGCHAIN_OPENAI_VERSION}"),
        );
        out += &api_support::run_python_with(
            &venv.join("bin").join("python"),
            "langchain_tools.py",
            &url,
            &[],
        );
        out
    })
    .await
    .expect("python task");
    println!("{out}");
    assert!(!out.contains("FAIL"), "{out}");
    api_support::assert_idle_without_leaks(&server).await;
}
