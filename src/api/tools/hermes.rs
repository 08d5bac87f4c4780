//! Hermes-style tags (Hermes 2 Pro, Qwen2.5): each call is
//! `<tool_call>\n{"name": .., "arguments": {..}}\n</tool_call>`; a last one may lack its
//! closing tag (the model ended there).

use super::parse::{call_from_value, content_of, ParsedOutput, ToolCallParser};

pub struct HermesParser;

pub const OPEN: &str = "<tool_call>";
pub const CLOSE: &str = "</tool_call>";

impl ToolCallParser for HermesParser {
    fn parse(&self, text: &str) -> Option<ParsedOutput> {
        let mut calls = Vec::new();
        let mut outside = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find(OPEN) {
            outside.push(&rest[..open]);
            let body_and_more = &rest[open + OPEN.len()..];
            let (body, after) = match body_and_more.find(CLOSE) {
                Some(close) => (
                    &body_and_more[..close],
                    &body_and_more[close + CLOSE.len()..],
                ),
                None => (body_and_more, ""),
            };
            let value: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
            calls.push(call_from_value(&value)?);
            rest = after;
        }
        outside.push(rest);
        if calls.is_empty() {
            return None;
        }
        Some(ParsedOutput {
            content: content_of(&outside),
            calls,
        })
    }
}
