//! Earlier calls and their results in the conversation. Assistant messages' `tool_calls`
//! get their `arguments` as objects (templates write them with `tojson`, as vLLM passes
//! them); for templates that take no tools, a call is rendered as the generic envelope in
//! the assistant's text and a `tool` message as a user turn holding the result, which every
//! template accepts.

use serde::Serialize;
use serde_json::{json, Value};

use super::ToolFormat;
use crate::tokenizer::ChatMessage;

/// JSON with one space after `,` and `:`, as the grammar writes it.
pub(super) fn styled_json(v: &Value) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Spaced);
    // Writing a `Value` into memory cannot fail.
    let _ = v.serialize(&mut ser);
    String::from_utf8(out).unwrap_or_default()
}

struct Spaced;

impl serde_json::ser::Formatter for Spaced {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.begin_array_value(w, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// `function.arguments` as an object when it is a string holding one.
fn arguments_as_objects(calls: &mut Value) {
    for call in calls.as_array_mut().into_iter().flatten() {
        if let Some(args) = call
            .get_mut("function")
            .and_then(|f| f.get_mut("arguments"))
        {
            if let Some(parsed) = args
                .as_str()
                .and_then(|s| serde_json::from_str::<Value>(s).ok())
            {
                *args = parsed;
            }
        }
    }
}

/// The generic envelope of an assistant message's calls.
fn envelope(calls: &Value) -> String {
    let listed: Vec<Value> = calls
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let f = c.get("function").cloned().unwrap_or_default();
            json!({"name": f.get("name").cloned().unwrap_or_default(),
                   "arguments": f.get("arguments").cloned().unwrap_or_else(|| json!({}))})
        })
        .collect();
    styled_json(&json!({ "tool_calls": listed }))
}

/// Prepares earlier calls and tool results for the template (see the module's doc).
pub fn render_history(messages: &mut [ChatMessage], format: ToolFormat) {
    for m in messages.iter_mut() {
        if let Some(calls) = m.extra.get_mut("tool_calls") {
            arguments_as_objects(calls);
            if format == ToolFormat::Generic {
                let text = envelope(calls);
                m.content = match m.content.trim() {
                    "" => text,
                    before => format!("{before}\n{text}"),
                };
            }
        }
        if format == ToolFormat::Generic && m.role == "tool" {
            let id = m.extra.get("tool_call_id").cloned().unwrap_or_default();
            m.role = "user".into();
            m.content = styled_json(&json!({
                "tool_result": {"tool_call_id": id, "content": m.content}
            }));
        }
    }
}
