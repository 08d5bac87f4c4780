//! A forced call's arguments as they are generated. Under the grammar the output has one
//! shape, `{"name": "<name>", "arguments": <value>}` per call (inside the generic envelope's
//! list, or Hermes tags), written with one space after `,` and `:`, so a scan of the text so
//! far tells each call's name once its closing quote is out, and its arguments so far.
//! Arguments are sent without the whitespace between tokens (as the final parse writes
//! them), so what was streamed is a prefix of the finished call's `arguments`.

use super::ToolFormat;
use crate::api::openai_types::{FunctionDelta, ToolCall, ToolCallDelta};

/// One call as far as the text shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PartialCall {
    /// Set once the name's closing quote is out.
    pub name: Option<String>,
    /// The arguments so far, without whitespace outside strings.
    pub arguments: String,
}

const NAME: &str = "{\"name\": \"";
const ARGUMENTS: &str = ", \"arguments\": ";

/// `raw` without whitespace outside JSON strings (a prefix's result is a prefix of the
/// whole's).
fn compact(raw: &str) -> String {
    let (mut in_str, mut escaped) = (false, false);
    raw.chars()
        .filter(|&c| {
            if in_str {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => in_str = false,
                    _ => {}
                }
                true
            } else {
                in_str = c == '"';
                !c.is_whitespace()
            }
        })
        .collect()
}

fn partial(call: &str) -> PartialCall {
    let Some(rest) = call.strip_prefix(NAME) else {
        return PartialCall {
            name: None,
            arguments: String::new(),
        };
    };
    let Some(end) = rest.find('"') else {
        return PartialCall {
            name: None,
            arguments: String::new(),
        };
    };
    let arguments = rest[end + 1..]
        .strip_prefix(ARGUMENTS)
        .map(compact)
        .unwrap_or_default();
    PartialCall {
        name: Some(rest[..end].to_string()),
        arguments,
    }
}

/// The calls in `text` so far (a forced call's output in `format`).
pub fn scan(text: &str, format: ToolFormat) -> Vec<PartialCall> {
    // Nesting of a call object: inside `{"tool_calls": [` for the envelope, top level in tags.
    let call_depth = match format {
        ToolFormat::Generic => 3,
        ToolFormat::Hermes => 1,
    };
    let mut spans: Vec<(usize, Option<usize>)> = Vec::new();
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    for (at, b) in text.bytes().enumerate() {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                if depth == call_depth && b == b'{' {
                    spans.push((at, None));
                }
            }
            b'}' | b']' => {
                if depth == call_depth {
                    if let Some(last) = spans.last_mut() {
                        last.1 = Some(at);
                    }
                }
                depth = depth.saturating_sub(1);
            }
            _ => {}
        }
    }
    spans
        .into_iter()
        .map(|(start, end)| partial(&text[start..end.unwrap_or(text.len())]))
        .collect()
}

/// What one choice's stream has sent of its calls.
#[derive(Debug, Default)]
pub struct CallStreamer {
    /// Per call: its id and the arguments sent.
    sent: Vec<(String, String)>,
}

fn delta(index: usize, head: Option<(&str, &str)>, arguments: &str) -> Vec<ToolCallDelta> {
    vec![ToolCallDelta {
        index,
        id: head.map(|(id, _)| id.to_string()),
        kind: head.map(|_| "function"),
        function: FunctionDelta {
            name: head.map(|(_, name)| name.to_string()),
            arguments: arguments.to_string(),
        },
    }]
}

impl CallStreamer {
    /// Whether any call has been announced.
    pub fn started(&self) -> bool {
        !self.sent.is_empty()
    }

    /// The deltas that the text so far adds: a call's first (id, name, empty arguments)
    /// once its name is out, then its new argument text.
    pub fn advance(&mut self, text: &str, format: ToolFormat) -> Vec<Vec<ToolCallDelta>> {
        let mut out = Vec::new();
        for (index, call) in scan(text, format).into_iter().enumerate() {
            if index == self.sent.len() {
                let Some(name) = &call.name else { break };
                let id = super::new_call_id();
                out.push(delta(index, Some((&id, name)), ""));
                self.sent.push((id, String::new()));
            }
            let (_, sent) = &mut self.sent[index];
            if call.arguments.len() > sent.len() && call.arguments.starts_with(sent.as_str()) {
                out.push(delta(index, None, &call.arguments[sent.len()..]));
                *sent = call.arguments;
            }
        }
        out
    }

    /// The finished calls' remaining deltas; the calls take the ids already sent.
    pub fn finish(&mut self, calls: &mut [ToolCall]) -> Vec<Vec<ToolCallDelta>> {
        let mut out = Vec::new();
        for (index, call) in calls.iter_mut().enumerate() {
            match self.sent.get(index) {
                None => {
                    out.push(delta(index, Some((&call.id, &call.function.name)), ""));
                    out.push(delta(index, None, &call.function.arguments));
                }
                Some((id, sent)) => {
                    call.id = id.clone();
                    // Streamed from the text, the arguments match the parse unless it
                    // rewrote an escape or a number: what was sent stands (equal as JSON).
                    if let Some(rest) = call.function.arguments.strip_prefix(sent.as_str()) {
                        if !rest.is_empty() {
                            out.push(delta(index, None, rest));
                        }
                    }
                }
            }
        }
        out
    }
}
