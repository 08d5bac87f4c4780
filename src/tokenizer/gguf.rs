//! Building a `tokenizers` tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Only `tokenizer.ggml.model == "gpt2"` (byte-level BPE) is supported. The pieces:
//! * `tokens` become the BPE vocabulary (id = index) and `merges` ("a b", rank = index) its
//!   merges; merges naming unknown tokens are dropped, as llama.cpp never forms them either.
//! * `token_type` 3 (control) becomes an added *special* token and 4 (user-defined) an added
//!   token, both matched in raw text before pre-tokenization, so `<|im_start|>` written in a
//!   prompt is one id, as llama.cpp's `parse_special` gives.
//! * `pre` names the pre-tokenizer: a sequence of regex splits (each keeps the matches and the
//!   text between them, as llama.cpp's `unicode_regex_split` does), then the byte-level
//!   mapping. The regexes follow llama.cpp's definitions for each name.
//! * BOS/EOS ids and `add_bos_token`/`add_eos_token` follow the metadata; the EOS set also
//!   holds `eot_token_id`/`eom_token_id` and the end-of-turn tokens llama.cpp recognises by
//!   their text (`<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`, ...).
//!
//! Bad metadata (missing key, wrong type, id out of range) is a [`TokenizerError`] naming the
//! key, never a panic.

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::pretokenize::SplitStyle;
use super::{TokenizerError, TokenizerParts};
use crate::gguf::{GgufFile, GgufValue};

const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// GPT-2's split: contractions, letters, digits, other symbols, trailing whitespace.
pub(crate) const GPT2: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3: case-insensitive contractions, letters with one leading non-letter, 1-3 digits.
pub(crate) const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2: Llama 3's split with single digits.
pub(crate) const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How one `tokenizer.ggml.pre` name tokenizes.
struct PreTokenizerSpec {
    regexes: &'static [&'static str],
    /// A word that is itself a token is taken whole, without merging (Llama 3).
    ignore_merges: bool,
    /// `add_bos` when the metadata does not say.
    add_bos_default: bool,
    /// The hand-written scanner giving the same pieces as `regexes`, if any.
    fast: Option<SplitStyle>,
}

fn pre_tokenizer_spec(name: &str) -> Option<PreTokenizerSpec> {
    let spec = |regexes, ignore_merges, add_bos_default, fast| PreTokenizerSpec {
        regexes,
        ignore_merges,
        add_bos_default,
        fast,
    };
    Some(match name {
        "default" => spec(
            &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
            false,
            false,
            None,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => {
            spec(&[LLAMA3], true, true, Some(SplitStyle::Llama3))
        }
        "dbrx" | "smaug-bpe" => spec(&[LLAMA3], false, false, Some(SplitStyle::Llama3)),
        "qwen2" | "qwen2.5" | "deepseek-r1-qwen" | "stablelm2" | "megrez" => {
            spec(&[QWEN2], false, false, Some(SplitStyle::Qwen2))
        }
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            spec(
                &[r"\p{N}", GPT2],
                false,
                false,
                Some(SplitStyle::DigitsThenGpt2),
            )
        }
        "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "exaone4" => {
            spec(&[GPT2], false, false, Some(SplitStyle::Gpt2))
        }
        _ => return None,
    })
}

/// Typed, optional reads of metadata that name the key in every error.
struct Meta<'a> {
    file: &'a GgufFile,
}

impl<'a> Meta<'a> {
    fn err(&self, key: &str, problem: impl Into<String>) -> TokenizerError {
        TokenizerError::Metadata {
            path: self.file.path.clone(),
            key: key.to_string(),
            problem: problem.into(),
        }
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>, TokenizerError> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(key, "expected a string")),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, TokenizerError> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, "expected a bool")),
        }
    }

    /// A token id, checked against the vocabulary size.
    fn id(&self, key: &str, vocab_size: usize) -> Result<Option<u32>, TokenizerError> {
        let Some(value) = self.file.get(key) else {
            return Ok(None);
        };
        let id = value
            .as_u64()
            .ok_or_else(|| self.err(key, "expected a non-negative integer"))?;
        if id >= vocab_size as u64 {
            return Err(self.err(
                key,
                format!("token id {id} is out of range (the vocabulary has {vocab_size} tokens)"),
            ));
        }
        Ok(Some(id as u32))
    }

    fn array(&self, key: &str) -> Result<Option<&'a [GgufValue]>, TokenizerError> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .map(Some)
                .ok_or_else(|| self.err(key, "expected an array")),
        }
    }

    fn str_array(&self, key: &str) -> Result<Option<Vec<&'a str>>, TokenizerError> {
        let Some(values) = self.array(key)? else {
            return Ok(None);
        };
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .ok_or_else(|| self.err(key, format!("element {i} is not a string")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

pub(crate) fn load(file: &GgufFile) -> Result<TokenizerParts, TokenizerError> {
    let meta = Meta { file };
    let model = meta
        .str("tokenizer.ggml.model")?
        .ok_or_else(|| meta.err("tokenizer.ggml.model", "missing"))?;
    if model != "gpt2" {
        return Err(TokenizerError::Unsupported {
            path: file.path.clone(),
            what: format!(
                "tokenizer.ggml.model = {model:?} (sluice reads GGUF tokenizers of type \"gpt2\", \
                 byte-level BPE; use the model's Hugging Face directory instead)"
            ),
        });
    }
    let pre_name = match meta.str("tokenizer.ggml.pre")? {
        Some(name) => name,
        None => {
            tracing::warn!(path = %file.path.display(), "no tokenizer.ggml.pre: using the \"default\" pre-tokenizer; tokenization may differ from the model's training");
            "default"
        }
    };
    let pre = pre_tokenizer_spec(pre_name).ok_or_else(|| TokenizerError::Unsupported {
        path: file.path.clone(),
        what: format!(
            "tokenizer.ggml.pre = {pre_name:?} (known: default, gpt2, llama-bpe, qwen2, smollm, \
             starcoder and their aliases)"
        ),
    })?;

    let tokens: Vec<String> = meta
        .str_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| meta.err("tokenizer.ggml.tokens", "missing"))?
        .into_iter()
        .map(str::to_owned)
        .collect();
    if tokens.is_empty() || tokens.len() > u32::MAX as usize {
        return Err(meta.err(
            "tokenizer.ggml.tokens",
            format!("{} tokens is not a usable vocabulary", tokens.len()),
        ));
    }
    let token_types = read_token_types(&meta, tokens.len())?;
    let merges = read_merges(&meta)?;

    let inner = build_tokenizer(&meta, &tokens, &token_types, merges, &pre)?;

    let vocab_size = tokens.len();
    let bos_token_id = meta.id("tokenizer.ggml.bos_token_id", vocab_size)?;
    let eos_token_id = meta.id("tokenizer.ggml.eos_token_id", vocab_size)?;
    let mut eos_token_ids: Vec<u32> = eos_token_id.into_iter().collect();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        eos_token_ids.extend(meta.id(key, vocab_size)?);
    }
    eos_token_ids.extend(end_of_turn_ids(&tokens));
    eos_token_ids.sort_unstable();
    eos_token_ids.dedup();

    let add_bos = meta
        .bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(pre.add_bos_default);
    let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    if add_bos && bos_token_id.is_none() {
        return Err(meta.err(
            "tokenizer.ggml.bos_token_id",
            "missing, but add_bos_token asks for BOS",
        ));
    }
    let chat_template = meta.str("tokenizer.chat_template")?.map(str::to_owned);

    Ok(TokenizerParts {
        source: file.path.clone(),
        inner,
        tokens,
        byte_level: true,
        split_style: pre.fast,
        bos_token_id,
        eos_token_id,
        eos_token_ids,
        add_bos,
        add_eos,
        chat_template,
    })
}

fn read_token_types(meta: &Meta, vocab_size: usize) -> Result<Vec<i64>, TokenizerError> {
    const KEY: &str = "tokenizer.ggml.token_type";
    let Some(values) = meta.array(KEY)? else {
        return Ok(vec![1; vocab_size]);
    };
    if values.len() != vocab_size {
        return Err(meta.err(
            KEY,
            format!("has {} entries for {vocab_size} tokens", values.len()),
        ));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_i64()
                .ok_or_else(|| meta.err(KEY, format!("element {i} is not an integer")))
        })
        .collect()
}

/// `"a b"` pairs, in rank order. The separator is the first space after the first byte, as
/// llama.cpp reads them (byte-level tokens never contain a space themselves).
fn read_merges(meta: &Meta) -> Result<Vec<(String, String)>, TokenizerError> {
    const KEY: &str = "tokenizer.ggml.merges";
    let merges = meta
        .str_array(KEY)?
        .ok_or_else(|| meta.err(KEY, "missing (a gpt2 tokenizer needs its BPE merges)"))?;
    merges
        .iter()
        .enumerate()
        .map(|(i, merge)| {
            let split = merge
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(at, _)| at);
            match split {
                Some(at) => Ok((merge[..at].to_string(), merge[at + 1..].to_string())),
                None => Err(meta.err(KEY, format!("merge {i} ({merge:?}) is not \"a b\""))),
            }
        })
        .collect()
}

fn build_tokenizer(
    meta: &Meta,
    tokens: &[String],
    token_types: &[i64],
    merges: Vec<(String, String)>,
    pre: &PreTokenizerSpec,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let invalid = |what: &str, e: tokenizers::Error| TokenizerError::Invalid {
        path: meta.file.path.clone(),
        problem: format!("{what}: {e}"),
    };
    // A duplicated token text maps to its last id, as in llama.cpp.
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    let num_merges = merges.len();
    let mut seen = std::collections::HashSet::with_capacity(num_merges);
    let merges: Vec<(String, String)> = merges
        .into_iter()
        .filter(|(a, b)| {
            vocab.contains_key(a)
                && vocab.contains_key(b)
                && vocab.contains_key(&format!("{a}{b}"))
                // The first (lowest) rank of a repeated pair wins.
                && seen.insert((a.clone(), b.clone()))
        })
        .collect();
    if merges.len() < num_merges {
        tracing::warn!(
            path = %meta.file.path.display(),
            "dropped {} of {num_merges} BPE merges that name tokens outside the vocabulary or repeat",
            num_merges - merges.len()
        );
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| invalid("cannot build the BPE model", e))?;

    let mut splits = Vec::with_capacity(pre.regexes.len() + 1);
    for regex in pre.regexes {
        let split = Split::new(
            SplitPattern::Regex((*regex).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| invalid("cannot compile the pre-tokenizer regex", e))?;
        splits.push(PreTokenizerWrapper::Split(split));
    }
    // The regexes above did the splitting; ByteLevel only maps bytes to its alphabet.
    splits.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, false, false,
    )));

    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(splits)));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    let added = |kind: i64| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(token_types)
            .filter(|(_, &t)| t == kind)
            .map(|(text, _)| {
                AddedToken::from(text.clone(), kind == TOKEN_TYPE_CONTROL).normalized(false)
            })
            .collect()
    };
    tokenizer.add_special_tokens(&added(TOKEN_TYPE_CONTROL));
    tokenizer.add_tokens(&added(TOKEN_TYPE_USER_DEFINED));
    Ok(tokenizer)
}

/// Tokens that end a turn, recognised by their text as llama.cpp does for models whose
/// metadata does not name them.
fn end_of_turn_ids(tokens: &[String]) -> impl Iterator<Item = u32> + '_ {
    const END_OF_TURN: &[&str] = &[
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "<end_of_utterance>",
    ];
    tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| END_OF_TURN.contains(&t.as_str()))
        .map(|(id, _)| id as u32)
}

#[cfg(test)]
mod tests;
