//! How the tools reach the model: the template's `tools` variable when it takes one, else a
//! system instruction describing the generic envelope.

use serde_json::{json, Map, Value};

use super::history::styled_json;
use super::{ToolChoice, ToolFormat, ToolRequest};
use crate::tokenizer::ChatMessage;

impl ToolRequest {
    /// The tools as OpenAI sends them (and as `transformers` passes them to templates).
    fn as_openai(&self) -> Vec<Value> {
        self.tools
            .iter()
            .map(|t| {
                let mut function = json!({"name": t.name, "parameters": t.parameters});
                if let Some(d) = &t.description {
                    function["description"] = json!(d);
                }
                json!({"type": "function", "function": function})
            })
            .collect()
    }

    /// The generic format's instruction: the tools and the envelope to answer with.
    pub fn instruction(&self) -> String {
        let listed: Vec<Value> = self
            .tools
            .iter()
            .map(|t| {
                json!({"name": t.name, "description": t.description.clone().unwrap_or_default(),
                       "parameters": t.parameters})
            })
            .collect();
        let when = match &self.choice {
            ToolChoice::Named(n) => format!("You must call the tool `{n}`."),
            ToolChoice::Required => "You must call at least one tool.".to_string(),
            _ => "If no tool is needed, answer the user in plain text.".to_string(),
        };
        format!(
            "You can call these tools:\n{}\nTo call tools, answer with only this JSON: \
             {{\"tool_calls\": [{{\"name\": \"<tool name>\", \"arguments\": {{<arguments \
             matching its parameters>}}}}]}}\n{when}",
            styled_json(&Value::Array(listed)),
        )
    }

    /// Offers the tools: through the template (`Hermes`), or by adding the instruction to
    /// the system message (a new first message when there is none).
    pub fn offer(
        &self,
        format: ToolFormat,
        messages: &mut Vec<ChatMessage>,
        template_kwargs: &mut Map<String, Value>,
    ) {
        match format {
            ToolFormat::Hermes => {
                template_kwargs.insert("tools".into(), Value::Array(self.as_openai()));
            }
            ToolFormat::Generic => {
                let instruction = self.instruction();
                match messages.first_mut() {
                    Some(m) if m.role == "system" => {
                        m.content = format!("{}\n\n{instruction}", m.content);
                    }
                    _ => messages.insert(0, ChatMessage::new("system", instruction)),
                }
            }
        }
    }
}
