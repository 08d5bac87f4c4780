//! Prompts into token ids: chat messages rendered with the model's template, completions
//! prompts (text, texts, ids) encoded. Rendering and encoding take milliseconds for long
//! prompts, so they run on the blocking pool, never on the async runtime's workers.

use std::sync::Arc;

use super::errors::ApiError;
use super::openai_types::{MessageContent, PromptSpec, RequestMessage};
use super::validation::token_id;
use crate::engine::fault::FaultInjection;
use crate::tokenizer::{ChatMessage, ChatTemplateOptions, Tokenizer};

/// Chat messages as the template sees them: text parts joined, other parts refused.
pub fn chat_messages(messages: &[RequestMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut texts = Vec::with_capacity(parts.len());
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => texts.push(t.as_str()),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    format!("messages[{i}].content"),
                                    format!(
                                    "content parts of type `{kind}` are not supported (text only)"
                                ),
                                ))
                            }
                        }
                    }
                    texts.join("\n")
                }
            };
            Ok(ChatMessage {
                role: m.role.clone(),
                content,
                extra: m.extra.clone(),
            })
        })
        .collect()
}

/// Renders and tokenizes a conversation on the blocking pool (templates and long prompts
/// take milliseconds).
pub async fn tokenize_chat(
    tokenizer: Arc<Tokenizer>,
    messages: Vec<ChatMessage>,
    opts: ChatTemplateOptions,
    add_special_tokens: bool,
    faults: Option<FaultInjection>,
) -> Result<Vec<u32>, ApiError> {
    blocking(move || {
        let text = tokenizer.apply_chat_template(&messages, &opts)?;
        if faults.is_some() {
            inject_template_fault(&text)?;
        }
        Ok(tokenizer.encode(&text, add_special_tokens)?)
    })
    .await
}

/// Test-only: a marked conversation makes the template fail, or its renderer panic.
fn inject_template_fault(text: &str) -> Result<(), ApiError> {
    use crate::engine::fault::{parse, Fault};
    match parse(text).map(|f| f.fault) {
        Some(Fault::Template) => Err(crate::tokenizer::TokenizerError::Template(
            "injected fault: the chat template failed".into(),
        )
        .into()),
        Some(Fault::TemplatePanic) => panic!("injected fault: the chat template panicked"),
        _ => Ok(()),
    }
}

/// The token ids of each prompt of a completions request (or each input of an embeddings
/// request: `param` names the field in errors).
pub async fn tokenize_prompts(
    tokenizer: Arc<Tokenizer>,
    param: &'static str,
    prompt: PromptSpec,
    add_special_tokens: bool,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let vocab_size = tokenizer.vocab_size();
    let ids = |list: Vec<i64>| -> Result<Vec<u32>, ApiError> {
        list.into_iter()
            .map(|id| token_id(param, id, vocab_size))
            .collect()
    };
    match prompt {
        PromptSpec::Ids(list) => Ok(vec![ids(list)?]),
        PromptSpec::IdLists(lists) => lists.into_iter().map(ids).collect(),
        PromptSpec::Text(text) => {
            blocking(move || Ok(vec![tokenizer.encode(&text, add_special_tokens)?])).await
        }
        PromptSpec::Texts(texts) => {
            blocking(move || {
                texts
                    .iter()
                    .map(|t| Ok(tokenizer.encode(t, add_special_tokens)?))
                    .collect()
            })
            .await
        }
    }
}

pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("tokenization task failed: {e}")))?
}
