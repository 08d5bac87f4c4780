//! The served model's tokenizer, for generating prompts of exact token lengths.
//!
//! ADAPTER — temporary. The tokenizer room (`crate::tokenizer::Tokenizer`, with `from_gguf`,
//! `from_hf_dir`, `encode`, `decode`, `vocab_size`) is being written in parallel. Until it
//! lands this file wraps the `tokenizers` crate directly: a `tokenizer.json` is loaded as is,
//! and a GGUF file's byte-level BPE vocabulary is rebuilt in memory (pre-tokenizers `gpt2` and
//! `smollm` only — enough for the default model). When the real one lands, replace the body of
//! `load_tokenizer` with it and implement `PromptTokenizer` for it; nothing else changes.
//! Likewise `default_tokenizer_path` becomes `crate::model::fetch::default_model_path()`.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::workload::PromptTokenizer;
use super::BenchError;
use crate::model::gguf::GgufFile;

/// The default model file, which carries its tokenizer.
pub fn default_tokenizer_path() -> PathBuf {
    dirs::cache_dir()
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("sluice/models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A GGUF file, a `tokenizer.json`, or a directory holding a `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<Box<dyn PromptTokenizer>, BenchError> {
    let tok = if path.is_dir() {
        from_json_file(&path.join("tokenizer.json"))?
    } else if path.extension().is_some_and(|e| e == "json") {
        from_json_file(path)?
    } else {
        from_gguf(path)?
    };
    // Computed once: `get_vocab_size(true)` builds the whole vocabulary map on every call.
    let vocab_size = tok.get_vocab_size(true);
    Ok(Box::new(HfTokenizer { tok, vocab_size }))
}

struct HfTokenizer {
    tok: tokenizers::Tokenizer,
    vocab_size: usize,
}

impl PromptTokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, BenchError> {
        let enc = self
            .tok
            .encode(text, false)
            .map_err(|e| BenchError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    fn decode(&self, ids: &[u32]) -> Result<String, BenchError> {
        self.tok
            .decode(ids, true)
            .map_err(|e| BenchError::Tokenizer(e.to_string()))
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

fn from_json_file(path: &Path) -> Result<tokenizers::Tokenizer, BenchError> {
    tokenizers::Tokenizer::from_file(path)
        .map_err(|e| BenchError::Tokenizer(format!("{}: {e}", path.display())))
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

fn from_gguf(path: &Path) -> Result<tokenizers::Tokenizer, BenchError> {
    let err = |m: String| BenchError::Tokenizer(format!("{}: {m}", path.display()));
    let gguf = GgufFile::open(path).map_err(|e| BenchError::Tokenizer(e.to_string()))?;
    let model = gguf
        .get_str("tokenizer.ggml.model")
        .map_err(|e| err(e.to_string()))?;
    if model != "gpt2" {
        return Err(err(format!(
            "tokenizer model {model:?} is not supported by the bench's interim GGUF reader; \
             pass --tokenizer with the model's tokenizer.json"
        )));
    }
    let pre = gguf.get_str("tokenizer.ggml.pre").unwrap_or("default");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre {
        "default" | "gpt2" => byte_level.clone(),
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level.clone()]}),
        other => {
            return Err(err(format!(
                "pre-tokenizer {other:?} is not supported by the bench's interim GGUF reader; \
                 pass --tokenizer with the model's tokenizer.json"
            )))
        }
    };
    let tokens = gguf
        .get_str_array("tokenizer.ggml.tokens")
        .map_err(|e| err(e.to_string()))?;
    let merges = gguf
        .get_str_array("tokenizer.ggml.merges")
        .map_err(|e| err(e.to_string()))?;
    let types: Vec<i64> = gguf
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().map(|v| v.as_i64().unwrap_or(1)).collect())
        .unwrap_or_default();
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.to_string(), json!(id)))
        .collect();
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter_map(|(id, t)| {
            let ty = types.get(id).copied()?;
            (ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED).then(|| {
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false,
                       "special": ty == TOKEN_TYPE_CONTROL})
            })
        })
        .collect();
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    let bytes = serde_json::to_vec(&spec).map_err(|e| err(e.to_string()))?;
    tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The interim GGUF tokenizer must agree with llama.cpp on the reference fixtures, or
    /// generated prompts would not have the lengths the server sees.
    #[test]
    fn gguf_tokenizer_matches_llama_cpp_fixtures() {
        let path = default_tokenizer_path();
        if !path.exists() {
            eprintln!("skipped: {} not present", path.display());
            return;
        }
        let tok = load_tokenizer(&path).unwrap();
        assert!(tok.vocab_size() > 40_000);
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenize.jsonl");
        let text = std::fs::read_to_string(fixtures).unwrap();
        let mut checked = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).unwrap();
            let want: Vec<u32> = serde_json::from_value(v["ids"].clone()).unwrap();
            let got = tok.encode(v["text"].as_str().unwrap()).unwrap();
            assert_eq!(got, want, "text {:?}", v["text"]);
            checked += 1;
        }
        assert!(checked > 5);
    }

    /// Random and prefix prompts re-encode to exactly the drawn length with the real tokenizer.
    #[test]
    fn random_prompts_with_the_real_tokenizer_have_exact_lengths() {
        use crate::bench::workload::{random_requests, Prompt, RandomSpec};
        let path = default_tokenizer_path();
        if !path.exists() {
            eprintln!("skipped: {} not present", path.display());
            return;
        }
        let tok = load_tokenizer(&path).unwrap();
        for prefix_len in [0, 200] {
            let spec = RandomSpec {
                input_len: 128,
                output_len: 8,
                range_ratio: 0.0,
                prefix_len,
                num_prompts: 50,
                seed: 11,
            };
            for r in random_requests(tok.as_ref(), &spec).unwrap() {
                let Prompt::Text(text) = &r.prompt else {
                    panic!("random prompts are text")
                };
                let n = tok.encode(text).unwrap().len();
                assert_eq!(n, prefix_len + 128);
                assert_eq!(r.input_len, Some(n));
            }
        }
    }
}
