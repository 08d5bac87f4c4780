//! Reading a Hugging Face model directory's tokenizer.
//!
//! * `tokenizer.json` (required): the tokenizer itself. Its truncation and padding are turned
//!   off (the engine decides lengths), and its post-processor is not used: BOS/EOS are added by
//!   [`super::Tokenizer::encode`] from `add_bos`/`add_eos`.
//! * `tokenizer_config.json` (optional): `chat_template` (a string, or a list of named
//!   templates of which `default` is taken), `bos_token`/`eos_token` (a string or an
//!   `{"content": ..}` object), `add_bos_token`/`add_eos_token`. When `add_bos_token` is absent,
//!   `add_bos` is whether `tokenizer.json`'s post-processor puts BOS in front of a text.
//! * `chat_template.jinja` (optional): the template, preferred to the config's.
//! * `generation_config.json` (optional): `eos_token_id`, an id or a list of ids, all of which
//!   stop generation.

use std::path::Path;

use serde_json::Value;
use tokenizers::DecoderWrapper;

use super::{TokenizerError, TokenizerParts};

fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Invalid {
            path: path.to_path_buf(),
            problem: format!("not valid JSON: {e}"),
        })
}

/// `"<s>"` or `{"content": "<s>", ...}`.
fn token_text(value: Option<&Value>) -> Option<&str> {
    match value? {
        Value::String(s) => Some(s),
        Value::Object(map) => map.get("content")?.as_str(),
        _ => None,
    }
}

fn chat_template_of(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| named.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

pub(crate) fn load(dir: &Path) -> Result<TokenizerParts, TokenizerError> {
    let tokenizer_path = dir.join("tokenizer.json");
    let mut inner = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| {
        if !tokenizer_path.exists() {
            TokenizerError::Io {
                path: tokenizer_path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            }
        } else {
            TokenizerError::Invalid {
                path: tokenizer_path.clone(),
                problem: format!("not a tokenizers file: {e}"),
            }
        }
    })?;
    inner
        .with_truncation(None)
        .map_err(|e| TokenizerError::Invalid {
            path: tokenizer_path.clone(),
            problem: format!("cannot turn truncation off: {e}"),
        })?;
    inner.with_padding(None);

    let config_path = dir.join("tokenizer_config.json");
    let config = read_json(&config_path)?.unwrap_or(Value::Null);
    let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);

    // Every id gets a text, holes (rare) an empty one.
    let added = inner.get_added_tokens_decoder();
    let vocab_size =
        (inner.get_vocab_size(true)).max(added.keys().max().map_or(0, |&m| m as usize + 1));
    let tokens: Vec<String> = (0..vocab_size as u32)
        .map(|id| inner.id_to_token(id).unwrap_or_default())
        .collect();

    let lookup = |key: &str| -> Result<Option<u32>, TokenizerError> {
        match token_text(config.get(key)) {
            None => Ok(None),
            Some(text) => {
                inner
                    .token_to_id(text)
                    .map(Some)
                    .ok_or_else(|| TokenizerError::Metadata {
                        path: config_path.clone(),
                        key: key.to_string(),
                        problem: format!("token {text:?} is not in the vocabulary"),
                    })
            }
        }
    };
    let bos_token_id = lookup("bos_token")?;
    let eos_token_id = lookup("eos_token")?;

    let mut eos_token_ids: Vec<u32> = eos_token_id.into_iter().collect();
    let generation_eos = match generation.get("eos_token_id") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(ids)) => ids
            .iter()
            .map(Value::as_u64)
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default(),
        Some(v) => v.as_u64().into_iter().collect(),
    };
    for id in generation_eos {
        if id >= vocab_size as u64 {
            return Err(TokenizerError::Metadata {
                path: dir.join("generation_config.json"),
                key: "eos_token_id".into(),
                problem: format!(
                    "token id {id} is out of range (the vocabulary has {vocab_size} tokens)"
                ),
            });
        }
        eos_token_ids.push(id as u32);
    }
    eos_token_ids.sort_unstable();
    eos_token_ids.dedup();

    // Without an explicit flag, ask the post-processor what it adds around a text.
    let probe = inner
        .encode_fast("", true)
        .map(|e| e.get_ids().to_vec())
        .unwrap_or_default();
    let add_bos = match config.get("add_bos_token").and_then(Value::as_bool) {
        Some(flag) => flag,
        None => bos_token_id.is_some() && probe.first() == bos_token_id.as_ref(),
    };
    let add_eos = match config.get("add_eos_token").and_then(Value::as_bool) {
        Some(flag) => flag,
        None => eos_token_id.is_some() && probe.last() == eos_token_id.as_ref(),
    };

    let chat_template = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
        Ok(text) => Some(text),
        Err(_) => chat_template_of(&config),
    };
    let byte_level = matches!(inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));

    Ok(TokenizerParts {
        source: dir.to_path_buf(),
        inner,
        tokens,
        byte_level,
        split_style: None,
        bos_token_id,
        eos_token_id,
        eos_token_ids,
        add_bos: add_bos && bos_token_id.is_some(),
        add_eos: add_eos && eos_token_id.is_some(),
        chat_template,
    })
}

#[cfg(test)]
mod tests;
