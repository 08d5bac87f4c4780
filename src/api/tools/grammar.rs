//! The grammar of a forced call: the format's structure around one JSON object per call,
//! `{"name": <a tool's name>, "arguments": <that tool's parameters schema>}`, compiled by the
//! structured-output path (`ConstraintSpec`), so a call always parses and its arguments
//! always validate.

use serde_json::{json, Value};

use super::hermes::{CLOSE, OPEN};
use super::{ToolChoice, ToolFormat, ToolRequest};
use crate::sampling::ConstraintSpec;

/// JSON written as the structured-output path writes it (one space after `,` and `:`).
fn json_style() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

impl ToolRequest {
    /// The tools a call may name (`Named`: that one only).
    fn callable(&self) -> impl Iterator<Item = &super::Tool> {
        self.tools.iter().filter(|t| match &self.choice {
            ToolChoice::Named(n) => &t.name == n,
            _ => true,
        })
    }

    /// At most one call: a named tool, or `parallel_tool_calls: false`.
    fn single(&self) -> bool {
        matches!(self.choice, ToolChoice::Named(_)) || !self.parallel
    }

    /// One call's schema: an `anyOf` over the callable tools.
    fn call_schema(&self) -> Value {
        let mut calls: Vec<Value> = self
            .callable()
            .map(|t| {
                json!({
                    "type": "object",
                    "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": false
                })
            })
            .collect();
        if calls.len() == 1 {
            calls.pop().unwrap_or_default()
        } else {
            json!({"anyOf": calls})
        }
    }

    /// The constraint that forces a call in `format` (for `auto` too, only to check that
    /// every tool's schema compiles).
    pub fn grammar(&self, format: ToolFormat) -> ConstraintSpec {
        match format {
            ToolFormat::Generic => {
                let mut list = json!({"type": "array", "items": self.call_schema(), "minItems": 1});
                if self.single() {
                    list["maxItems"] = json!(1);
                }
                ConstraintSpec::JsonSchema(json!({
                    "type": "object",
                    "properties": {"tool_calls": list},
                    "required": ["tool_calls"],
                    "additionalProperties": false
                }))
            }
            ToolFormat::Hermes => {
                let mut call = self.call_schema();
                call["x-guidance"] = json_style();
                let literal = |s: &str| serde_json::to_string(s).unwrap_or_default();
                let start = if self.single() {
                    "start: call"
                } else {
                    "start: call (\"\\n\" call)*"
                };
                ConstraintSpec::Grammar(format!(
                    "{start}\ncall: {} %json {call} {}\n",
                    literal(&format!("{OPEN}\n")),
                    literal(&format!("\n{CLOSE}")),
                ))
            }
        }
    }
}
