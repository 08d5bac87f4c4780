//! Tool calls: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` (`docs/tools.md`).
//!
//! Request side (`validate.rs`, `prompt.rs`, `grammar.rs`): the tools are checked into a
//! `ToolRequest`, offered to the model (through the chat template when it takes `tools`,
//! else as a system instruction asking for the generic JSON envelope), and for `required` or
//! a named tool turned into a grammar that the existing constraint path compiles and
//! enforces, so a forced call always parses and its arguments match the tool's schema.
//!
//! Response side (`parse.rs` and one file per format: `generic.rs`, `hermes.rs`): a choice's
//! finished text is split into content and calls by the format's parser. This is text work
//! on the API's side, like the engine's stop strings are on its side, because it needs the
//! whole answer and the request's tool names, and changes only what the client is sent.
//!
//! Which format: the template's source mentions `tools` → Hermes `<tool_call>` tags (what
//! Qwen2.5 and Hermes templates ask for); otherwise the generic envelope
//! `{"tool_calls": [{"name": .., "arguments": {..}}]}` (SmolLM2's template takes no tools).

mod generic;
mod grammar;
mod hermes;
mod history;
mod incremental;
mod parse;
mod prompt;
mod stream;
mod validate;

pub use history::render_history;
pub use parse::{ChoiceOutput, ParsedCall, ParsedOutput, ToolCallParser};
pub use stream::{Finished, ToolStream};
pub use validate::validate;

use serde_json::Value;

use super::openai_types::{FunctionCall, ToolCall};

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// The JSON schema of the arguments (an object with no properties when absent).
    pub parameters: Value,
}

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// The model must not call: tools are not offered.
    None,
    /// The model chooses; calls are parsed from what it writes.
    Auto,
    /// At least one call, enforced by grammar.
    Required,
    /// Exactly one call of this tool, enforced by grammar.
    Named(String),
}

/// How tool calls are written in the model's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `{"tool_calls": [{"name": .., "arguments": {..}}]}`, asked for by a system instruction.
    Generic,
    /// `<tool_call>\n{"name": .., "arguments": {..}}\n</tool_call>`, offered by the template.
    Hermes,
}

impl ToolFormat {
    /// The format a chat template implies: a template that reads `tools` renders them itself
    /// and (for the families sluice knows) asks for Hermes tags.
    pub fn for_template(source: &str) -> Self {
        if source.contains("tools") {
            Self::Hermes
        } else {
            Self::Generic
        }
    }

    pub fn parser(self) -> &'static dyn ToolCallParser {
        match self {
            Self::Generic => &generic::GenericParser,
            Self::Hermes => &hermes::HermesParser,
        }
    }
}

/// A request's tools, checked. Only built when tools are offered (not for `tool_choice:
/// none`, nor without tools).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolRequest {
    pub tools: Vec<Tool>,
    /// `Auto`, `Required` or `Named` (never `None`).
    pub choice: ToolChoice,
    /// Whether one answer may hold several calls.
    pub parallel: bool,
}

impl ToolRequest {
    /// Whether a grammar forces a call.
    pub fn is_forced(&self) -> bool {
        matches!(self.choice, ToolChoice::Required | ToolChoice::Named(_))
    }

    /// A finished choice's text as the client gets it: calls (each with a fresh id) and
    /// `finish_reason: "tool_calls"` when the text holds well-formed calls of offered tools,
    /// else the text as content with the engine's finish reason.
    pub fn finish(
        &self,
        format: ToolFormat,
        text: String,
        finish_reason: Option<&'static str>,
    ) -> ChoiceOutput {
        let parsed = format.parser().parse(&text).filter(|p| {
            !p.calls.is_empty()
                && p.calls
                    .iter()
                    .all(|c| self.tools.iter().any(|t| t.name == c.name))
        });
        match parsed {
            Some(p) => ChoiceOutput {
                content: p.content,
                tool_calls: p
                    .calls
                    .into_iter()
                    .map(ParsedCall::into_tool_call)
                    .collect(),
                finish_reason: Some("tool_calls"),
            },
            None => ChoiceOutput {
                content: Some(text),
                tool_calls: Vec::new(),
                finish_reason,
            },
        }
    }
}

impl ParsedCall {
    /// The call as OpenAI sends it: an id `call_` + 24 alphanumerics, arguments as a string.
    pub fn into_tool_call(self) -> ToolCall {
        ToolCall {
            id: new_call_id(),
            kind: "function",
            function: FunctionCall {
                name: self.name,
                arguments: self.arguments.to_string(),
            },
        }
    }
}

/// A fresh call id: `call_` + 24 alphanumerics, as OpenAI's.
pub fn new_call_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("call_{}", &id[..24])
}

#[cfg(test)]
mod tests;
