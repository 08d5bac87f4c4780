//! Request validation's tests.
use super::*;

fn info() -> EngineInfo {
    EngineInfo {
        max_model_len: 100,
        vocab_size: 1000,
        kv_cache_tokens: 10_000,
        block_size: 16,
        prefix_caching: true,
        max_num_seqs: 8,
        max_waiting: 0,
        pooling: crate::engine::PoolingType::Last,
        faults: None,
    }
}

fn params(json: serde_json::Value) -> Result<ValidatedParams, ApiError> {
    let c: CommonParams = serde_json::from_value(json).unwrap();
    let max = c.max_tokens.map(|m| ("max_tokens", m));
    validate_params(&c, max, None, &info())
}

fn param_of(e: ApiError) -> Option<String> {
    e.object().param
}

#[test]
fn out_of_range_values_name_their_field() {
    let cases = [
        (serde_json::json!({"temperature": -0.5}), "temperature"),
        (serde_json::json!({"top_p": 0.0}), "top_p"),
        (serde_json::json!({"top_p": 1.5}), "top_p"),
        (serde_json::json!({"n": 0}), "n"),
        (serde_json::json!({"n": 9}), "n"),
        (serde_json::json!({"max_tokens": 0}), "max_tokens"),
        (
            serde_json::json!({"presence_penalty": 3}),
            "presence_penalty",
        ),
        (serde_json::json!({"top_k": -2}), "top_k"),
        (serde_json::json!({"logit_bias": {"abc": 1}}), "logit_bias"),
        (serde_json::json!({"logit_bias": {"5000": 1}}), "logit_bias"),
        (serde_json::json!({"logit_bias": {"5": 101}}), "logit_bias"),
        (
            serde_json::json!({"stop_token_ids": [1000]}),
            "stop_token_ids",
        ),
        (
            serde_json::json!({"min_tokens": 5, "max_tokens": 2}),
            "min_tokens",
        ),
    ];
    for (json, field) in cases {
        let e = params(json.clone()).expect_err(&json.to_string());
        assert_eq!(param_of(e).as_deref(), Some(field), "{json}");
    }
}

#[test]
fn defaults_and_conversions() {
    let p = params(serde_json::json!({
        "temperature": 0, "top_k": -1, "seed": -1, "logit_bias": {"7": -100},
        "stop": "x", "stream": true, "stream_options": {"include_usage": true}
    }))
    .unwrap();
    assert!(p.sampling.is_greedy());
    assert_eq!(p.sampling.top_k, 0);
    assert_eq!(p.sampling.seed, Some(u64::MAX));
    assert_eq!(p.sampling.logit_bias, vec![(7, -100.0)]);
    assert_eq!(p.stop, vec!["x".to_string()]);
    assert!(p.stream && p.include_usage);
    assert_eq!(p.n, 1);
}

#[test]
fn context_limits() {
    let p = params(serde_json::json!({"max_tokens": 50})).unwrap();
    let b = |ids: Vec<u32>, p: &ValidatedParams, d| {
        build(p, ids, "prompt", d, &info(), String::new(), Instant::now())
    };
    assert_eq!(b(vec![1; 50], &p, None).unwrap().max_tokens, 50);
    let e = b(vec![1; 51], &p, None).unwrap_err();
    assert_eq!(param_of(e).as_deref(), Some("max_tokens"));
    let e = b(vec![1; 100], &p, None).unwrap_err();
    assert_eq!(param_of(e).as_deref(), Some("prompt"));
    let e = b(vec![], &p, None).unwrap_err();
    assert_eq!(param_of(e).as_deref(), Some("prompt"));
    let open = params(serde_json::json!({})).unwrap();
    assert_eq!(b(vec![1; 10], &open, None).unwrap().max_tokens, 90);
    assert_eq!(b(vec![1; 10], &open, Some(16)).unwrap().max_tokens, 16);
    assert_eq!(b(vec![1; 95], &open, Some(16)).unwrap().max_tokens, 5);
}

#[test]
fn the_kv_cache_limit_is_named() {
    let p = params(serde_json::json!({"max_tokens": 50})).unwrap();
    let small = EngineInfo {
        kv_cache_tokens: 60,
        ..info()
    };
    let e = build(
        &p,
        vec![1; 20],
        "prompt",
        None,
        &small,
        String::new(),
        Instant::now(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("KV cache holds 60 tokens"), "{e}");
    assert_eq!(param_of(e).as_deref(), Some("max_tokens"));
}

#[test]
fn chat_checks() {
    let req: ChatCompletionRequest =
        serde_json::from_value(serde_json::json!({"messages": []})).unwrap();
    assert_eq!(
        param_of(validate_chat(&req, &info()).unwrap_err()).as_deref(),
        Some("messages")
    );
    let req: ChatCompletionRequest = serde_json::from_value(serde_json::json!({
        "messages": [{"role": "user", "content": "hi"}],
        "logprobs": true, "top_logprobs": 21
    }))
    .unwrap();
    assert_eq!(
        param_of(validate_chat(&req, &info()).unwrap_err()).as_deref(),
        Some("top_logprobs")
    );
    let req: ChatCompletionRequest = serde_json::from_value(serde_json::json!({
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                  {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 3, "max_tokens": 9
    }))
    .unwrap();
    let p = validate_chat(&req, &info()).unwrap();
    assert_eq!(p.max_tokens, Some(3));
    let msgs = super::super::prompt::chat_messages(&req.messages).unwrap();
    assert_eq!(msgs[0].content, "a\nb");
}

#[test]
fn fields_not_honoured_are_refused_by_name() {
    let chat = |extra: serde_json::Value| {
        let mut v = serde_json::json!({"messages": [{"role": "user", "content": "hi"}]});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let req: ChatCompletionRequest = serde_json::from_value(v).unwrap();
        validate_chat(&req, &info()).err().and_then(param_of)
    };
    // `tools` and `tool_choice` are served, and `true` is not a valid value of either.
    for field in [
        "echo",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "best_of",
        "modalities",
    ] {
        let got = chat(serde_json::json!({ field: true }));
        assert_eq!(got.as_deref(), Some(field), "{field}");
    }
    // Fields of the shared parameters are not "unknown" (the flattened struct takes them).
    assert_eq!(chat(serde_json::json!({"top_k": 5, "user": "u"})), None);
    // OpenAI's informational fields stay accepted.
    assert_eq!(
        chat(serde_json::json!({"metadata": {"a": "b"}, "store": false})),
        None
    );

    let completion = |extra: serde_json::Value| {
        let mut v = serde_json::json!({"prompt": "hi"});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let req: CompletionRequest = serde_json::from_value(v).unwrap();
        validate_completion(&req, &info()).err().and_then(param_of)
    };
    assert_eq!(completion(serde_json::json!({"best_of": 1})), None);
    assert_eq!(completion(serde_json::json!({"best_of": 2, "n": 2})), None);
    let got = completion(serde_json::json!({"best_of": 3, "n": 1}));
    assert_eq!(got.as_deref(), Some("best_of"));
    let got = completion(serde_json::json!({"prompt_logprobs": 1}));
    assert_eq!(got.as_deref(), Some("prompt_logprobs"));
}
