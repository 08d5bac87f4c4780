//! Chat templates: the model's Jinja template rendered with `minijinja`, set up to behave like
//! the `transformers` renderer that templates are written for.
//!
//! The environment: `trim_blocks` and `lstrip_blocks` on (as in `transformers`), Python string
//! and dict methods (`.strip()`, `.items()`, ... from `minijinja-contrib`'s pycompat),
//! `raise_exception(msg)`, `strftime_now(fmt)`, and the `tojson` of `transformers`: Python's
//! `json.dumps` (`{"a": 1, "b": [1, 2]}`, non-ASCII kept, no HTML escaping), with its
//! `indent`, `separators`, `sort_keys` and `ensure_ascii` options.
//!
//! The context: `messages` (each message's `role`, `content` and its `extra` fields),
//! `add_generation_prompt`, `bos_token`, `eos_token`, `tools` and `documents` (none unless given),
//! and every key of `chat_template_kwargs` (which may not replace `messages` or
//! `add_generation_prompt`).
//!
//! A model without a template gets ChatML (`<|im_start|>role\ncontent<|im_end|>\n`, then
//! `<|im_start|>assistant\n` for a generation prompt), the format most small chat models use.

use std::collections::BTreeMap;

use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use super::TokenizerError;

/// The template used when a model has none.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat_template";

/// One message of a conversation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// Further fields templates may read (`name`, `tool_calls`, `tool_call_id`, ...).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            extra: serde_json::Map::new(),
        }
    }
}

/// How to render a conversation.
#[derive(Debug, Clone, Default)]
pub struct ChatTemplateOptions {
    /// End with the header of an assistant turn, so the model writes the reply.
    pub add_generation_prompt: bool,
    /// Leave the final message open (cut the text right after its content) so the model
    /// continues it. Excludes `add_generation_prompt`.
    pub continue_final_message: bool,
    /// Extra variables for the template (`enable_thinking`, `tools`, ...).
    pub chat_template_kwargs: serde_json::Map<String, serde_json::Value>,
}

/// A compiled template and the token texts it may use.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// Set when the template does not compile; every render then fails with it.
    compile_error: Option<String>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source` (ChatML when `None`). A template that does not compile is kept as
    /// an error for `apply`, so the model still serves completions.
    pub fn new(source: Option<&str>, bos_token: &str, eos_token: &str) -> Self {
        let source = source.unwrap_or(CHATML_TEMPLATE).to_string();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", super::strftime::strftime_now);
        env.add_filter("tojson", tojson::tojson);
        let compile_error = env
            .add_template_owned(TEMPLATE_NAME, source.clone())
            .err()
            .map(|e| describe(&e));
        Self {
            env,
            source,
            compile_error,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn compile_error(&self) -> Option<&str> {
        self.compile_error.as_deref()
    }

    pub fn apply(
        &self,
        messages: &[ChatMessage],
        opts: &ChatTemplateOptions,
    ) -> Result<String, TokenizerError> {
        if let Some(err) = &self.compile_error {
            return Err(TokenizerError::Template(err.clone()));
        }
        if opts.continue_final_message && opts.add_generation_prompt {
            return Err(TokenizerError::Template(
                "continue_final_message and add_generation_prompt cannot both be set".into(),
            ));
        }
        let final_content = match (opts.continue_final_message, messages.last()) {
            (true, None) => {
                return Err(TokenizerError::Template(
                    "continue_final_message needs at least one message".into(),
                ))
            }
            (true, Some(last)) => Some(last.content.as_str()),
            (false, _) => None,
        };

        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        ctx.insert("bos_token".into(), Value::from(self.bos_token.as_str()));
        ctx.insert("eos_token".into(), Value::from(self.eos_token.as_str()));
        for (key, value) in &opts.chat_template_kwargs {
            ctx.insert(key.clone(), Value::from_serialize(value));
        }
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(opts.add_generation_prompt),
        );

        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TokenizerError::Template(describe(&e)))?;
        let rendered = template
            .render(ctx)
            .map_err(|e| TokenizerError::Template(describe(&e)))?;
        match final_content {
            Some(content) => cut_after_final_message(rendered, content),
            None => Ok(rendered),
        }
    }
}

/// Keeps the text up to the end of the last occurrence of the final message's content (as
/// `transformers` does; the stripped content is tried when templates trim it).
fn cut_after_final_message(mut rendered: String, content: &str) -> Result<String, TokenizerError> {
    let end = rendered
        .rfind(content)
        .map(|at| at + content.len())
        .or_else(|| {
            let trimmed = content.trim();
            rendered.rfind(trimmed).map(|at| at + trimmed.len())
        })
        .ok_or_else(|| {
            TokenizerError::Template(
                "continue_final_message is set but the final message does not appear in the \
                 rendered chat"
                    .into(),
            )
        })?;
    rendered.truncate(end);
    Ok(rendered)
}

/// The template's own message for `raise_exception`, minijinja's description otherwise.
fn describe(err: &Error) -> String {
    match err.detail().and_then(|d| d.strip_prefix(RAISED)) {
        Some(message) => message.to_string(),
        None => err.to_string(),
    }
}

/// Marks messages coming from `raise_exception`, so `describe` returns them verbatim.
const RAISED: &str = "\u{0}raised:";

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{message}"),
    ))
}

mod tojson;

#[cfg(test)]
mod tests;
