//! Tokenizer, chat templates and incremental detokenization.
//!
//! A [`Tokenizer`] wraps a `tokenizers` tokenizer built either from a GGUF file's
//! `tokenizer.ggml.*` metadata ([`Tokenizer::from_gguf`]) or from a Hugging Face directory
//! ([`Tokenizer::from_hf_dir`]), plus what serving needs beside it: BOS/EOS policy, the set of
//! ids that end generation, which ids are special, the chat template, and a per-id byte table
//! for byte-level vocabularies.
//!
//! Invariants:
//! * ids are `0..vocab_size()`; every API that takes an id checks it and answers
//!   [`TokenizerError::IdOutOfRange`], never panics.
//! * `encode` always parses special tokens written in the text (`<|im_start|>` becomes one id),
//!   as llama.cpp does with `parse_special`; BOS is prepended iff `add_special_tokens` and the
//!   model asks for it (`add_bos`).
//! * For byte-level vocabularies (every GGUF `gpt2` model, and HF tokenizers whose decoder is
//!   `ByteLevel`), `decode(ids)` is the lossy UTF-8 reading of the concatenated token bytes;
//!   the [`IncrementalDetokenizer`] reads the same bytes, so its deltas concatenate to exactly
//!   `decode(all ids)`.
//!
//! A `Tokenizer` is immutable after construction, `Send + Sync`, and meant to be shared in an
//! `Arc` by the API (encoding prompts) and the engine (detokenizing).

mod bytes;
pub mod chat;
pub mod detokenize;
mod encode;
mod gguf;
mod hf_dir;
mod pretokenize;
pub(crate) mod strftime;

use std::path::{Path, PathBuf};

pub use chat::{ChatMessage, ChatTemplateOptions};
pub use detokenize::IncrementalDetokenizer;

use crate::gguf::GgufFile;
use bytes::TokenBytes;
use chat::ChatTemplate;
use encode::{AddedMatcher, FastEncoder};
use pretokenize::SplitStyle;

/// Everything that can go wrong in the tokenizer room. Messages name the file, key or id.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: tokenizer metadata {key}: {problem}")]
    Metadata {
        path: PathBuf,
        key: String,
        problem: String,
    },
    #[error("{path}: {what} is not supported")]
    Unsupported { path: PathBuf, what: String },
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error("token id {id} is out of range (the vocabulary has {vocab_size} tokens)")]
    IdOutOfRange { id: u32, vocab_size: usize },
    #[error("cannot encode text: {0}")]
    Encode(String),
    #[error("cannot decode ids: {0}")]
    Decode(String),
    /// A chat template failed to render (or to compile); the message is the template's own
    /// (`raise_exception("...")` gives exactly "..."). The API answers it with a 400.
    #[error("chat template: {0}")]
    Template(String),
}

/// What a loader (GGUF or HF directory) hands to [`Tokenizer::from_parts`].
pub(crate) struct TokenizerParts {
    pub source: PathBuf,
    pub inner: tokenizers::Tokenizer,
    /// The text of every id, `tokens[id]` (byte-level form for byte-level vocabularies).
    pub tokens: Vec<String>,
    /// Whether ids decode to bytes through the GPT-2 byte-to-char table.
    pub byte_level: bool,
    /// Set when the pre-tokenizer has a hand-written scanner (byte-level BPE only).
    pub split_style: Option<SplitStyle>,
    pub bos_token_id: Option<u32>,
    /// The primary EOS (appended by `add_eos`, shown to templates as `eos_token`).
    pub eos_token_id: Option<u32>,
    /// Every id that ends generation (EOS, end-of-turn, end-of-message).
    pub eos_token_ids: Vec<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub chat_template: Option<String>,
}

/// A model's tokenizer. Cheap to share: wrap it in an `Arc`.
pub struct Tokenizer {
    source: PathBuf,
    inner: tokenizers::Tokenizer,
    tokens: Vec<String>,
    /// `special[id]`: a control token, skipped by `skip_special_tokens`.
    special: Vec<bool>,
    /// Present for byte-level vocabularies; drives `decode` and the detokenizer.
    token_bytes: Option<TokenBytes>,
    /// The fast encode path, when the pre-tokenizer has one (GGUF vocabularies).
    fast: Option<FastEncoder>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    chat: ChatTemplate,
}

// The API and the engine share one tokenizer across threads.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
};

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.tokens.len())
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("add_bos", &self.add_bos)
            .field("byte_level", &self.token_bytes.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata
    /// (`gpt2` byte-level BPE with the pre-tokenizer named by `tokenizer.ggml.pre`).
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TokenizerError> {
        Self::from_parts(gguf::load(file)?)
    }

    /// A tokenizer from a GGUF file's metadata, a Hugging Face directory, or the
    /// `tokenizer.json` inside one.
    pub fn from_path(path: &Path) -> Result<Self, TokenizerError> {
        let dir = match path.extension() {
            Some(e) if e == "json" => path.parent().unwrap_or(Path::new(".")),
            _ => path,
        };
        if dir.is_dir() {
            return Self::from_hf_dir(dir);
        }
        let file = GgufFile::open(path).map_err(|e| TokenizerError::Invalid {
            path: path.to_path_buf(),
            problem: e.to_string(),
        })?;
        Self::from_gguf(&file)
    }

    /// Builds the tokenizer of a Hugging Face model directory: `tokenizer.json`, and when
    /// present `tokenizer_config.json` (chat template, BOS/EOS, `add_bos_token`),
    /// `chat_template.jinja` and `generation_config.json` (`eos_token_id`).
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TokenizerError> {
        Self::from_parts(hf_dir::load(dir)?)
    }

    fn from_parts(parts: TokenizerParts) -> Result<Self, TokenizerError> {
        let vocab_size = parts.tokens.len();
        let mut special = vec![false; vocab_size];
        for (id, token) in parts.inner.get_added_tokens_decoder() {
            if token.special {
                if let Some(flag) = special.get_mut(id as usize) {
                    *flag = true;
                }
            }
        }
        let fast = parts.split_style.map(|style| {
            let added = parts.inner.get_added_tokens_decoder();
            FastEncoder::new(
                style,
                AddedMatcher::new(added.into_iter().map(|(id, t)| (t.content, id))),
            )
        });
        let token_bytes = parts
            .byte_level
            .then(|| TokenBytes::byte_level(&parts.tokens));
        let token_text = |id: Option<u32>| {
            id.and_then(|id| parts.tokens.get(id as usize))
                .map(String::as_str)
                .unwrap_or("")
        };
        let chat = ChatTemplate::new(
            parts.chat_template.as_deref(),
            token_text(parts.bos_token_id),
            token_text(parts.eos_token_id),
        );
        if let Some(err) = chat.compile_error() {
            tracing::warn!(source = %parts.source.display(), "chat template does not compile: {err}");
        }
        Ok(Self {
            source: parts.source,
            inner: parts.inner,
            tokens: parts.tokens,
            special,
            token_bytes,
            fast,
            bos_token_id: parts.bos_token_id,
            eos_token_id: parts.eos_token_id,
            eos_token_ids: parts.eos_token_ids,
            add_bos: parts.add_bos,
            add_eos: parts.add_eos,
            chat,
        })
    }

    /// Text to ids. Special tokens written in `text` are parsed as special tokens; BOS (and
    /// EOS, for the rare model that asks) is added iff `add_special_tokens` and the model's
    /// metadata says so.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special_tokens && self.add_bos {
            out.extend(self.bos_token_id);
        }
        match &self.fast {
            Some(fast) => fast.encode(self.inner.get_model(), text, &mut out)?,
            None => {
                let encoding = self
                    .inner
                    .encode_fast(text, false)
                    .map_err(|e| TokenizerError::Encode(e.to_string()))?;
                out.extend_from_slice(encoding.get_ids());
            }
        }
        if add_special_tokens && self.add_eos {
            out.extend(self.eos_token_id);
        }
        Ok(out)
    }

    /// Ids to text. Bytes that are not valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        match &self.token_bytes {
            Some(table) => {
                let mut buf = Vec::with_capacity(ids.len() * 4);
                for &id in ids {
                    if let Some(bytes) = self.token_bytes_of(table, id, skip_special_tokens)? {
                        buf.extend_from_slice(bytes);
                    }
                }
                Ok(String::from_utf8_lossy(&buf).into_owned())
            }
            None => {
                for &id in ids {
                    self.check_id(id)?;
                }
                self.inner
                    .decode(ids, skip_special_tokens)
                    .map_err(|e| TokenizerError::Decode(e.to_string()))
            }
        }
    }

    /// The bytes `id` contributes to a decode (`None` when skipped as special).
    fn token_bytes_of<'a>(
        &self,
        table: &'a TokenBytes,
        id: u32,
        skip_special_tokens: bool,
    ) -> Result<Option<&'a [u8]>, TokenizerError> {
        self.check_id(id)?;
        if skip_special_tokens && self.special[id as usize] {
            return Ok(None);
        }
        Ok(Some(table.get(id)))
    }

    fn check_id(&self, id: u32) -> Result<(), TokenizerError> {
        if (id as usize) < self.tokens.len() {
            Ok(())
        } else {
            Err(TokenizerError::IdOutOfRange {
                id,
                vocab_size: self.tokens.len(),
            })
        }
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of a token written in the vocabulary's own form (byte-level `Ġthe`, `<|im_end|>`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary's text for `id` (byte-level form for byte-level vocabularies).
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// The ids that stop generation: EOS, and end-of-turn tokens such as `<|im_end|>` or
    /// `<|eot_id|>` when the model names or has them. Sorted, without duplicates.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Whether `eos_token_ids()` contains `id`.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.binary_search(&id).is_ok()
    }

    /// Whether `id` is a control token (skipped when decoding with `skip_special_tokens`).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// Whether the model asks for BOS in front of an encoded prompt.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The file or directory this tokenizer was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The model's chat template source (ChatML when the model has none).
    pub fn chat_template(&self) -> &str {
        self.chat.source()
    }

    /// Renders `messages` with the model's chat template (see [`chat`] for the context a
    /// template sees and the ChatML fallback).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        opts: &ChatTemplateOptions,
    ) -> Result<String, TokenizerError> {
        self.chat.apply(messages, opts)
    }

    /// The underlying `tokenizers` tokenizer (offsets, export to `tokenizer.json`). Its
    /// post-processor is not what `encode` uses for BOS/EOS.
    pub fn hf_tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The bytes `id` adds to generated text, as a grammar matcher reads them (`None` for a
    /// control token, which is not text). Byte-level vocabularies read the byte table;
    /// SentencePiece-style ones spell a space `▁` and a raw byte `<0xAB>` (byte fallback).
    pub fn text_bytes(&self, id: u32) -> Option<Vec<u8>> {
        if self.is_special(id) {
            return None;
        }
        if let Some(table) = &self.token_bytes {
            return Some(table.get(id).to_vec());
        }
        let token = self.tokens.get(id as usize)?;
        let byte = token
            .strip_prefix("<0x")
            .and_then(|t| t.strip_suffix('>'))
            .filter(|hex| hex.len() == 2)
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        Some(match byte {
            Some(b) => vec![b],
            None => token.replace('\u{2581}', " ").into_bytes(),
        })
    }

    /// The per-id byte table, for byte-level vocabularies.
    pub(crate) fn byte_table(&self) -> Option<&TokenBytes> {
        self.token_bytes.as_ref()
    }
}
