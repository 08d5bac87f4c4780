//! Parsers, validation, the finished-choice decision, history rendering and the grammars
//! (compiled over the default model's tokenizer).

use std::sync::{Arc, OnceLock};

use serde_json::{json, Value};

use super::generic::GenericParser;
use super::hermes::HermesParser;
use super::*;
use crate::api::errors::ApiError;
use crate::api::openai_types::ChatCompletionRequest;
use crate::sampling::{ConstraintCompiler, ConstraintError};
use crate::tokenizer::{ChatMessage, Tokenizer};

fn call(name: &str, arguments: Value) -> ParsedCall {
    ParsedCall {
        name: name.into(),
        arguments,
    }
}

#[test]
fn generic_parser_reads_envelopes() {
    let p = GenericParser;
    let one = p
        .parse(r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}"#)
        .expect("a call");
    assert_eq!(one.content, None);
    assert_eq!(
        one.calls,
        vec![call("get_weather", json!({"city": "Paris"}))]
    );

    let two = p
        .parse(
            r#"{"tool_calls":[{"name":"a","arguments":{}},{"name":"b","arguments":"{\"x\": 1}"}]}"#,
        )
        .expect("two calls");
    assert_eq!(
        two.calls,
        vec![call("a", json!({})), call("b", json!({"x": 1}))]
    );

    let mixed = p
        .parse("Let me check.\n{ \"tool_calls\": [{\"name\": \"a\", \"arguments\": {}}]} ok")
        .expect("text and a call");
    assert_eq!(mixed.content.as_deref(), Some("Let me check.\nok"));
    assert_eq!(mixed.calls, vec![call("a", json!({}))]);
}

#[test]
fn generic_parser_leaves_malformed_output_as_text() {
    let p = GenericParser;
    for text in [
        "The weather is nice.",
        r#"{"tool_calls": [{"name": "a", "arguments": {"x": 1}}"#,
        r#"{"tool_calls": []}"#,
        r#"{"tool_calls": [{"arguments": {}}]}"#,
        r#"{"tool_calls": [{"name": "a", "arguments": [1]}]}"#,
        r#"{"tool_calls": {"name": "a"}}"#,
        r#"{"response": "hello"}"#,
    ] {
        assert_eq!(p.parse(text), None, "{text}");
    }
}

#[test]
fn hermes_parser_reads_tags() {
    let p = HermesParser;
    let text =
        "I'll look.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n</tool_call>\n\
                <tool_call>\n{\"name\": \"b\", \"parameters\": {}}\n</tool_call>";
    let out = p.parse(text).expect("two calls");
    assert_eq!(out.content.as_deref(), Some("I'll look."));
    assert_eq!(
        out.calls,
        vec![call("a", json!({"x": 1})), call("b", json!({}))]
    );
    // The model may end before the closing tag.
    let open = p
        .parse("<tool_call>\n{\"name\": \"a\", \"arguments\": {}}")
        .expect("an unclosed call");
    assert_eq!(open.calls, vec![call("a", json!({}))]);
    for bad in [
        "no call here",
        "<tool_call>\n{\"name\": \"a\", \"arguments\": {\n</tool_call>",
        "<tool_call>\n{\"arguments\": {}}\n</tool_call>",
        "<tool_call>\n{\"name\": \"a\"}\n</tool_call><tool_call>nonsense</tool_call>",
    ] {
        assert_eq!(p.parse(bad), None, "{bad}");
    }
}

fn request(extra: Value) -> ChatCompletionRequest {
    let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
    for (k, v) in extra.as_object().expect("an object") {
        body[k] = v.clone();
    }
    serde_json::from_value(body).expect("a chat request")
}

fn weather() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time"}}])
}

fn refused(extra: Value) -> String {
    match validate(&request(extra.clone())) {
        Err(ApiError::InvalidRequest { param, .. }) => param.unwrap_or_default(),
        other => panic!("{extra}: expected a 400, got {other:?}"),
    }
}

#[test]
fn validation_names_the_field() {
    assert_eq!(
        refused(json!({"tools": weather(), "tool_choice": "always"})),
        "tool_choice"
    );
    assert_eq!(
        refused(json!({"tools": weather(), "tool_choice": 3})),
        "tool_choice"
    );
    assert_eq!(
        refused(json!({"tools": weather(),
            "tool_choice": {"type": "function", "function": {"name": "get_news"}}})),
        "tool_choice"
    );
    assert_eq!(refused(json!({"tool_choice": "required"})), "tool_choice");
    assert_eq!(refused(json!({"tools": {"name": "x"}})), "tools");
    assert_eq!(
        refused(json!({"tools": [{"type": "retrieval", "function": {"name": "x"}}]})),
        "tools"
    );
    assert_eq!(
        refused(json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]})),
        "tools"
    );
    assert_eq!(
        refused(
            json!({"tools": [{"type": "function", "function": {"name": "x", "parameters": 1}}]})
        ),
        "tools"
    );
    let dup = json!([{"type": "function", "function": {"name": "x"}},
                     {"type": "function", "function": {"name": "x"}}]);
    assert_eq!(refused(json!({"tools": dup})), "tools");
}

#[test]
fn validation_builds_the_request() {
    let v = |extra| validate(&request(extra)).expect("valid");
    assert_eq!(v(json!({})), None);
    assert_eq!(v(json!({"tools": weather(), "tool_choice": "none"})), None);
    let auto = v(json!({"tools": weather()})).expect("tools offered");
    assert_eq!(auto.choice, ToolChoice::Auto);
    assert!(auto.parallel && !auto.is_forced());
    assert_eq!(auto.tools[1].parameters["properties"], json!({}));
    let named = v(json!({"tools": weather(), "parallel_tool_calls": false,
        "tool_choice": {"type": "function", "function": {"name": "get_time"}}}))
    .expect("tools offered");
    assert_eq!(named.choice, ToolChoice::Named("get_time".into()));
    assert!(named.is_forced() && !named.parallel);
}

#[test]
fn a_finished_choice_is_calls_only_when_they_name_offered_tools() {
    let t = validate(&request(json!({"tools": weather()})))
        .expect("valid")
        .expect("tools");
    let text = r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}"#;
    let out = t.finish(ToolFormat::Generic, text.into(), Some("stop"));
    assert_eq!(out.finish_reason, Some("tool_calls"));
    assert_eq!(out.content, None);
    let c = &out.tool_calls[0];
    assert!(c.id.starts_with("call_") && c.id.len() == 29, "{}", c.id);
    assert!(c.id[5..].chars().all(|ch| ch.is_ascii_alphanumeric()));
    assert_eq!(
        (c.kind, c.function.name.as_str()),
        ("function", "get_weather")
    );
    assert_eq!(c.function.arguments, r#"{"city":"Oslo"}"#);
    let other = t.finish(ToolFormat::Generic, text.into(), Some("stop"));
    assert_ne!(other.tool_calls[0].id, c.id, "ids are unique");

    let unknown = r#"{"tool_calls": [{"name": "get_news", "arguments": {}}]}"#;
    let out = t.finish(ToolFormat::Generic, unknown.into(), Some("stop"));
    assert_eq!(
        (out.content.as_deref(), out.finish_reason),
        (Some(unknown), Some("stop"))
    );
    assert!(out.tool_calls.is_empty());
}

#[test]
fn history_renders_calls_and_results_for_templates_without_tools() {
    let mut assistant = ChatMessage::new("assistant", "");
    assistant.extra.insert(
        "tool_calls".into(),
        json!([{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]),
    );
    let mut result = ChatMessage::new("tool", "12 C");
    result.extra.insert("tool_call_id".into(), json!("call_1"));
    let mut hermes = vec![assistant.clone(), result.clone()];
    render_history(&mut hermes, ToolFormat::Hermes);
    assert_eq!(
        hermes[0].extra["tool_calls"][0]["function"]["arguments"],
        json!({"city": "Oslo"})
    );
    assert_eq!(
        (hermes[1].role.as_str(), hermes[1].content.as_str()),
        ("tool", "12 C")
    );

    let mut generic = vec![assistant, result];
    render_history(&mut generic, ToolFormat::Generic);
    assert_eq!(
        generic[0].content,
        r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}"#
    );
    assert_eq!(generic[1].role, "user");
    assert_eq!(
        generic[1].content,
        r#"{"tool_result": {"tool_call_id": "call_1", "content": "12 C"}}"#
    );
}

fn compiler() -> &'static ConstraintCompiler {
    static COMPILER: OnceLock<ConstraintCompiler> = OnceLock::new();
    COMPILER.get_or_init(|| {
        let path = crate::assets::default_model_path().expect("fetching the default model");
        ConstraintCompiler::new(Arc::new(
            Tokenizer::from_path(&path).expect("the default model's tokenizer"),
        ))
    })
}

#[test]
fn forced_grammars_compile_in_both_formats_and_bad_schemas_do_not() {
    for choice in [
        json!("required"),
        json!({"type": "function", "function": {"name": "get_weather"}}),
    ] {
        for parallel in [true, false] {
            let t = validate(&request(json!({"tools": weather(), "tool_choice": choice,
                "parallel_tool_calls": parallel})))
            .expect("valid")
            .expect("tools");
            for format in [ToolFormat::Generic, ToolFormat::Hermes] {
                let spec = t.grammar(format);
                if let Err(e) = compiler().compile(&spec) {
                    panic!("{format:?} {choice} {parallel}: {e}\n{spec:?}");
                }
            }
        }
    }
    let bad = json!([{"type": "function", "function": {"name": "x",
        "parameters": {"type": "objekt"}}}]);
    let t = validate(&request(json!({"tools": bad, "tool_choice": "required"})))
        .expect("valid")
        .expect("tools");
    for format in [ToolFormat::Generic, ToolFormat::Hermes] {
        assert!(
            matches!(
                compiler().compile(&t.grammar(format)),
                Err(ConstraintError::Invalid(_))
            ),
            "{format:?}"
        );
    }
}

#[test]
fn the_format_follows_the_template() {
    assert_eq!(
        ToolFormat::for_template(crate::tokenizer::chat::CHATML_TEMPLATE),
        ToolFormat::Generic
    );
    assert_eq!(
        ToolFormat::for_template("{% if tools %}{{ tools | tojson }}{% endif %}"),
        ToolFormat::Hermes
    );
}

#[test]
fn forced_calls_stream_as_they_are_generated() {
    use super::incremental::{scan, CallStreamer, PartialCall};
    let text = r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Par is\"{", "unit": "c"}}, {"name": "get_time", "arguments": {"zone": "utc"}}]}"#;
    assert_eq!(
        scan(text, ToolFormat::Generic),
        vec![
            PartialCall {
                name: Some("get_weather".into()),
                arguments: r#"{"city":"Par is\"{","unit":"c"}"#.into()
            },
            PartialCall {
                name: Some("get_time".into()),
                arguments: r#"{"zone":"utc"}"#.into()
            },
        ]
    );
    let t = validate(&request(
        json!({"tools": weather(), "tool_choice": "required"}),
    ))
    .expect("valid")
    .expect("tools");
    for (format, text) in [
        (ToolFormat::Generic, text.to_string()),
        (
            ToolFormat::Hermes,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \
             \"unit\": \"f\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \
             \"arguments\": {\"zone\": \"cet\"}}\n</tool_call>"
                .to_string(),
        ),
    ] {
        // Fed a few characters at a time, as tokens come.
        let mut streamer = CallStreamer::default();
        let mut deltas = Vec::new();
        let chars: Vec<char> = text.chars().collect();
        for end in (3..=chars.len()).step_by(3).chain([chars.len()]) {
            let so_far: String = chars[..end].iter().collect();
            deltas.extend(streamer.advance(&so_far, format).into_iter().flatten());
        }
        let mut calls = t.finish(format, text.clone(), Some("stop")).tool_calls;
        deltas.extend(streamer.finish(&mut calls).into_iter().flatten());
        assert!(deltas.len() > 6, "arguments come in fragments: {deltas:?}");
        for (i, call) in calls.iter().enumerate() {
            let mine: Vec<_> = deltas.iter().filter(|d| d.index == i).collect();
            assert_eq!(mine[0].id.as_deref(), Some(call.id.as_str()), "{format:?}");
            assert_eq!(
                mine[0].function.name.as_deref(),
                Some(call.function.name.as_str())
            );
            assert!(mine[1..]
                .iter()
                .all(|d| d.id.is_none() && d.function.name.is_none()));
            let args: String = mine.iter().map(|d| d.function.arguments.as_str()).collect();
            assert_eq!(args, call.function.arguments, "{format:?}");
        }
    }
}
