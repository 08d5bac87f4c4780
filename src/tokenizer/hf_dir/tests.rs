//! A hand-written SentencePiece-style `tokenizer.json` (byte fallback, a decoder that strips
//! the leading space): loading, BOS policy, and the window-mode detokenizer.

use std::path::PathBuf;

use serde_json::json;

use crate::tokenizer::{IncrementalDetokenizer, Tokenizer, TokenizerError};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sluice-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn write(&self, name: &str, value: &serde_json::Value) {
        std::fs::write(self.0.join(name), value.to_string()).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn special(id: u32, content: &str) -> serde_json::Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
           "rstrip": false, "normalized": false, "special": true})
}

fn sentencepiece_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    for b in 0..=255u32 {
        vocab.insert(format!("<0x{b:02X}>"), json!(3 + b));
    }
    let pieces = [
        "▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "el", "lo", "▁w", "or",
    ];
    for (i, p) in pieces.iter().enumerate() {
        vocab.insert(p.to_string(), json!(259 + i));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
        ]},
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab,
                  "merges": ["▁ h", "e l", "l o", "▁ w", "o r"]}
    })
}

fn load(name: &str, config: Option<serde_json::Value>) -> (Tokenizer, TempDir) {
    let dir = TempDir::new(name);
    dir.write("tokenizer.json", &sentencepiece_json());
    if let Some(config) = config {
        dir.write("tokenizer_config.json", &config);
    }
    dir.write("generation_config.json", &json!({"eos_token_id": [2, 0]}));
    (Tokenizer::from_hf_dir(&dir.0).unwrap(), dir)
}

#[test]
fn reads_bos_eos_and_infers_add_bos_from_the_post_processor() {
    let config = json!({"bos_token": "<s>", "eos_token": {"content": "</s>"},
                        "chat_template": [{"name": "default", "template": "{{ bos_token }}x"}]});
    let (tok, _dir) = load("hf-infer", Some(config));
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_ids(), &[0, 2]);
    assert!(tok.add_bos());
    let ids = tok.encode("hello world", true).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(tok.encode("hello world", false).unwrap(), ids[1..]);
    assert_eq!(tok.decode(&ids, true).unwrap(), "hello world");
    let rendered = tok.apply_chat_template(&[], &Default::default()).unwrap();
    assert_eq!(rendered, "<s>x");
}

#[test]
fn an_explicit_add_bos_token_wins() {
    let config = json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": false});
    let (tok, _dir) = load("hf-explicit", Some(config));
    assert!(!tok.add_bos());
    assert_ne!(tok.encode("hello", true).unwrap()[0], 1);
}

#[test]
fn window_detokenizer_matches_decode_with_byte_fallback_and_stripping() {
    let (tok, _dir) = load("hf-window", None);
    for text in ["hello world", "héllo wörld 😀 ok", "😀", " lead"] {
        let ids = tok.encode(text, false).unwrap();
        for skip in [false, true] {
            let mut detok = IncrementalDetokenizer::new(&tok, skip);
            let mut deltas: Vec<String> = ids
                .iter()
                .map(|&id| detok.push(&tok, id).unwrap())
                .collect();
            deltas.push(detok.flush(&tok).unwrap());
            assert_eq!(deltas.concat(), tok.decode(&ids, skip).unwrap(), "{text}");
            assert!(
                deltas.iter().all(|d| !d.contains('\u{FFFD}')),
                "{text}: {deltas:?}"
            );
        }
    }
}

#[test]
fn missing_or_broken_files_are_clear_errors() {
    let dir = TempDir::new("hf-missing");
    let err = Tokenizer::from_hf_dir(&dir.0).unwrap_err();
    assert!(matches!(err, TokenizerError::Io { .. }), "{err}");
    std::fs::write(dir.0.join("tokenizer.json"), "{not json").unwrap();
    let err = Tokenizer::from_hf_dir(&dir.0).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    dir.write("tokenizer.json", &sentencepiece_json());
    std::fs::write(dir.0.join("tokenizer_config.json"), "[").unwrap();
    let err = Tokenizer::from_hf_dir(&dir.0).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    dir.write("tokenizer_config.json", &json!({"eos_token": "<nope>"}));
    let err = Tokenizer::from_hf_dir(&dir.0).unwrap_err();
    assert!(err.to_string().contains("<nope>"), "{err}");
    dir.write("tokenizer_config.json", &json!({}));
    dir.write("generation_config.json", &json!({"eos_token_id": 99999}));
    let err = Tokenizer::from_hf_dir(&dir.0).unwrap_err();
    assert!(err.to_string().contains("99999"), "{err}");
}
