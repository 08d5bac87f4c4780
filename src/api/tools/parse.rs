//! The parser interface: one implementation per output format, each in its own file.

use serde_json::Value;

use crate::api::openai_types::ToolCall;

/// One call read from the model's output.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    /// A JSON object.
    pub arguments: Value,
}

/// A finished output split into what the user reads and the calls.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedOutput {
    /// Text around the calls, trimmed; `None` when there is none.
    pub content: Option<String>,
    pub calls: Vec<ParsedCall>,
}

/// Reads calls from a finished output, in one format.
pub trait ToolCallParser: Sync {
    /// The calls in `text` and the text around them; `None` when `text` holds no call or a
    /// malformed one (then it is plain content).
    fn parse(&self, text: &str) -> Option<ParsedOutput>;
}

/// One choice as the client gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceOutput {
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: Option<&'static str>,
}

/// `{"name": .., "arguments": {..}}` (Qwen's `parameters` accepted, and arguments given as a
/// string holding an object, as some models write them).
pub(super) fn call_from_value(v: &Value) -> Option<ParsedCall> {
    let obj = v.as_object()?;
    let name = obj.get("name")?.as_str()?.to_string();
    let arguments = match obj.get("arguments").or_else(|| obj.get("parameters")) {
        None => Value::Object(Default::default()),
        Some(Value::String(s)) => serde_json::from_str(s).ok()?,
        Some(v) => v.clone(),
    };
    arguments
        .is_object()
        .then_some(ParsedCall { name, arguments })
}

/// The first JSON value at the start of `text` and the length it took.
pub(super) fn json_prefix(text: &str) -> Option<(Value, usize)> {
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let v = values.next()?.ok()?;
    Some((v, values.byte_offset()))
}

/// Joins the text around calls into content (`None` when only whitespace).
pub(super) fn content_of(parts: &[&str]) -> Option<String> {
    let joined = parts
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    (!joined.is_empty()).then_some(joined)
}
