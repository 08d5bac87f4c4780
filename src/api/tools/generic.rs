//! The generic envelope, for templates that take no tools (as llama.cpp's generic format):
//! the model answers `{"tool_calls": [{"name": .., "arguments": {..}}, ..]}` to call, or
//! plain text.

use super::parse::{call_from_value, content_of, json_prefix, ParsedOutput, ToolCallParser};

pub struct GenericParser;

/// Where an envelope may start: `{` then optional whitespace then the key.
fn envelope_starts(text: &str) -> impl Iterator<Item = usize> + '_ {
    text.match_indices('{')
        .map(|(at, _)| at)
        .filter(move |&at| text[at + 1..].trim_start().starts_with("\"tool_calls\""))
}

impl ToolCallParser for GenericParser {
    fn parse(&self, text: &str) -> Option<ParsedOutput> {
        let at = envelope_starts(text).next()?;
        let (value, len) = json_prefix(&text[at..])?;
        let calls = value
            .get("tool_calls")?
            .as_array()?
            .iter()
            .map(call_from_value)
            .collect::<Option<Vec<_>>>()?;
        if calls.is_empty() {
            return None;
        }
        Some(ParsedOutput {
            content: content_of(&[&text[..at], &text[at + len..]]),
            calls,
        })
    }
}
