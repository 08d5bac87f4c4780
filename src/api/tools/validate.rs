//! `tools`, `tool_choice` and `parallel_tool_calls` checked into a `ToolRequest`; each
//! refusal names its field.

use serde_json::{json, Map, Value};

use super::{Tool, ToolChoice, ToolRequest};
use crate::api::errors::ApiError;
use crate::api::openai_types::ChatCompletionRequest;

/// Most tools one request may offer.
pub const MAX_TOOLS: usize = 128;

fn tools_error(message: impl Into<String>) -> ApiError {
    ApiError::invalid("tools", message)
}

fn choice_error(message: impl Into<String>) -> ApiError {
    ApiError::invalid("tool_choice", message)
}

/// OpenAI's rule for function names: 1 to 64 of `a-z A-Z 0-9 _ -`.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn tool(i: usize, v: &Value) -> Result<Tool, ApiError> {
    let obj = v
        .as_object()
        .ok_or_else(|| tools_error(format!("tools[{i}] must be an object")))?;
    if obj.get("type").and_then(Value::as_str) != Some("function") {
        return Err(tools_error(format!(
            "tools[{i}].type must be \"function\" (the only kind of tool served)"
        )));
    }
    let function = obj
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| tools_error(format!("tools[{i}].function must be an object")))?;
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| valid_name(n))
        .ok_or_else(|| {
            tools_error(format!(
                "tools[{i}].function.name must be 1 to 64 letters, digits, _ or -"
            ))
        })?;
    let description = match function.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d.clone()),
        Some(_) => {
            return Err(tools_error(format!(
                "tools[{i}].function.description must be a string"
            )))
        }
    };
    let parameters = match function.get("parameters") {
        // OpenAI: no parameters means a function that takes none.
        None | Some(Value::Null) => {
            json!({"type": "object", "properties": {}, "additionalProperties": false})
        }
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(tools_error(format!(
                "tools[{i}].function.parameters must be a JSON schema (an object)"
            )))
        }
    };
    Ok(Tool {
        name: name.to_string(),
        description,
        parameters,
    })
}

fn tools(v: &Value) -> Result<Vec<Tool>, ApiError> {
    let list = v
        .as_array()
        .ok_or_else(|| tools_error("tools must be a list of tools"))?;
    if list.len() > MAX_TOOLS {
        return Err(tools_error(format!(
            "at most {MAX_TOOLS} tools, got {}",
            list.len()
        )));
    }
    let tools = list
        .iter()
        .enumerate()
        .map(|(i, t)| tool(i, t))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, t) in tools.iter().enumerate() {
        if tools[..i].iter().any(|u| u.name == t.name) {
            return Err(tools_error(format!(
                "tools[{i}]: the name `{}` is used twice",
                t.name
            )));
        }
    }
    Ok(tools)
}

fn choice(v: &Value) -> Result<ToolChoice, ApiError> {
    match v {
        Value::String(s) => match s.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            other => Err(choice_error(format!(
                "tool_choice must be none, auto, required or a function, got `{other}`"
            ))),
        },
        Value::Object(obj) => named(obj),
        _ => Err(choice_error(
            "tool_choice must be none, auto, required or {\"type\": \"function\", \
             \"function\": {\"name\": ..}}",
        )),
    }
}

fn named(obj: &Map<String, Value>) -> Result<ToolChoice, ApiError> {
    let name = (obj.get("type").and_then(Value::as_str) == Some("function"))
        .then(|| obj.get("function")?.get("name")?.as_str())
        .flatten();
    match name {
        Some(n) => Ok(ToolChoice::Named(n.to_string())),
        None => Err(choice_error(
            "tool_choice as an object must be {\"type\": \"function\", \"function\": \
             {\"name\": ..}}",
        )),
    }
}

/// The request's tools, or `None` when none are offered (no tools, or `tool_choice: none`).
pub fn validate(req: &ChatCompletionRequest) -> Result<Option<ToolRequest>, ApiError> {
    let tools = match &req.tools {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => tools(v)?,
    };
    let choice = match &req.tool_choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(v) => choice(v)?,
    };
    match &choice {
        ToolChoice::None => return Ok(None),
        ToolChoice::Auto if tools.is_empty() => return Ok(None),
        ToolChoice::Required if tools.is_empty() => {
            return Err(choice_error("tool_choice `required` needs tools"))
        }
        ToolChoice::Named(n) if !tools.iter().any(|t| &t.name == n) => {
            return Err(choice_error(format!(
                "tool_choice names `{n}`, which is not in tools"
            )))
        }
        _ => {}
    }
    Ok(Some(ToolRequest {
        tools,
        choice,
        parallel: req.parallel_tool_calls.unwrap_or(true),
    }))
}
