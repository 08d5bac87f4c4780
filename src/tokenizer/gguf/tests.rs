//! Synthetic GGUF metadata: every named pre-tokenizer, and malformed metadata.

use super::*;
use crate::tokenizer::bytes::byte_to_char;
use crate::tokenizer::Tokenizer;

fn empty_gguf() -> GgufFile {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    GgufFile::parse_bytes(&b).unwrap()
}

fn strings(items: &[String]) -> GgufValue {
    GgufValue::Array(items.iter().map(|s| GgufValue::String(s.clone())).collect())
}

/// The 256 byte tokens, digit merges that tell the pre-tokenizers apart, and two control
/// tokens. Returns the file and the token list.
fn synthetic(pre: Option<&str>) -> (GgufFile, Vec<String>) {
    let mut tokens: Vec<String> = byte_to_char().iter().map(|c| c.to_string()).collect();
    let merges: Vec<String> = ["1 2", "3 4", "12 3", "4 5", "Ġ t", "h e", "Ġt he"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for m in &merges {
        tokens.push(m.replace(' ', ""));
    }
    tokens.push("<|begin_of_text|>".into());
    tokens.push("<|eot_id|>".into());
    let mut types = vec![GgufValue::I32(1); tokens.len()];
    let n = types.len();
    types[n - 2] = GgufValue::I32(3);
    types[n - 1] = GgufValue::I32(3);

    let mut file = empty_gguf();
    let m = &mut file.metadata;
    m.insert(
        "tokenizer.ggml.model".into(),
        GgufValue::String("gpt2".into()),
    );
    if let Some(pre) = pre {
        m.insert("tokenizer.ggml.pre".into(), GgufValue::String(pre.into()));
    }
    m.insert("tokenizer.ggml.tokens".into(), strings(&tokens));
    m.insert("tokenizer.ggml.token_type".into(), GgufValue::Array(types));
    m.insert("tokenizer.ggml.merges".into(), strings(&merges));
    m.insert(
        "tokenizer.ggml.bos_token_id".into(),
        GgufValue::U32(n as u32 - 2),
    );
    m.insert("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(0));
    (file, tokens)
}

fn ids_of(tokens: &[String], pieces: &[&str]) -> Vec<u32> {
    pieces
        .iter()
        .map(|p| tokens.iter().position(|t| t == p).unwrap() as u32)
        .collect()
}

#[test]
fn each_pre_tokenizer_splits_digits_its_own_way() {
    // "12345": GPT-2 keeps the digits together, Llama 3 cuts after three, Qwen2 and SmolLM
    // isolate each one, and "default" cuts groups of three.
    let cases: &[(&str, &[&str])] = &[
        ("gpt2", &["12", "34", "5"]),
        ("llama-bpe", &["123", "45"]),
        ("qwen2", &["1", "2", "3", "4", "5"]),
        ("smollm", &["1", "2", "3", "4", "5"]),
        ("default", &["123", "45"]),
    ];
    for (pre, want) in cases {
        let (file, tokens) = synthetic(Some(pre));
        let tok = Tokenizer::from_gguf(&file).unwrap();
        let got = tok.encode("12345", false).unwrap();
        assert_eq!(got, ids_of(&tokens, want), "{pre}");
        let got = tok.encode(" the<|eot_id|>", false).unwrap();
        assert_eq!(got, ids_of(&tokens, &["Ġthe", "<|eot_id|>"]), "{pre}");
        assert_eq!(tok.decode(&got, true).unwrap(), " the");
    }
}

#[test]
fn llama3_adds_bos_by_default_and_stops_on_eot() {
    let (file, tokens) = synthetic(Some("llama-bpe"));
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let bos = ids_of(&tokens, &["<|begin_of_text|>"])[0];
    let eot = ids_of(&tokens, &["<|eot_id|>"])[0];
    assert!(tok.add_bos());
    assert_eq!(
        tok.encode("1", true).unwrap(),
        vec![bos, ids_of(&tokens, &["1"])[0]]
    );
    assert_eq!(tok.encode("1", false).unwrap().len(), 1);
    assert_eq!(tok.eos_token_ids(), &[0, eot]);

    let (mut file, _) = synthetic(Some("llama-bpe"));
    file.metadata.insert(
        "tokenizer.ggml.add_bos_token".into(),
        GgufValue::Bool(false),
    );
    assert!(!Tokenizer::from_gguf(&file).unwrap().add_bos());
}

#[test]
fn missing_pre_falls_back_to_default() {
    let (file, tokens) = synthetic(None);
    let tok = Tokenizer::from_gguf(&file).unwrap();
    assert_eq!(
        tok.encode("12345", false).unwrap(),
        ids_of(&tokens, &["123", "45"])
    );
}

fn load_err(edit: impl FnOnce(&mut GgufFile)) -> String {
    let (mut file, _) = synthetic(Some("gpt2"));
    edit(&mut file);
    match Tokenizer::from_gguf(&file) {
        Ok(_) => panic!("bad metadata was accepted"),
        Err(e) => e.to_string(),
    }
}

type Edit = Box<dyn FnOnce(&mut GgufFile)>;

#[test]
fn bad_metadata_is_a_clear_error() {
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|f| {
                f.metadata.remove("tokenizer.ggml.model");
            }),
            "tokenizer.ggml.model: missing",
        ),
        (
            Box::new(|f| {
                f.metadata.insert(
                    "tokenizer.ggml.model".into(),
                    GgufValue::String("llama".into()),
                );
            }),
            "\"llama\"",
        ),
        (
            Box::new(|f| {
                f.metadata.insert(
                    "tokenizer.ggml.pre".into(),
                    GgufValue::String("klingon".into()),
                );
            }),
            "\"klingon\"",
        ),
        (
            Box::new(|f| {
                f.metadata.remove("tokenizer.ggml.merges");
            }),
            "tokenizer.ggml.merges: missing",
        ),
        (
            Box::new(|f| {
                f.metadata
                    .insert("tokenizer.ggml.merges".into(), GgufValue::U32(1));
            }),
            "merges: expected an array",
        ),
        (
            Box::new(|f| {
                f.metadata
                    .insert("tokenizer.ggml.merges".into(), strings(&["ab".into()]));
            }),
            "merge 0",
        ),
        (
            Box::new(|f| {
                f.metadata.remove("tokenizer.ggml.tokens");
            }),
            "tokenizer.ggml.tokens: missing",
        ),
        (
            Box::new(|f| {
                f.metadata.insert(
                    "tokenizer.ggml.tokens".into(),
                    GgufValue::Array(vec![GgufValue::U8(1)]),
                );
            }),
            "element 0 is not a string",
        ),
        (
            Box::new(|f| {
                f.metadata
                    .insert("tokenizer.ggml.tokens".into(), GgufValue::Array(vec![]));
            }),
            "0 tokens",
        ),
        (
            Box::new(|f| {
                f.metadata.insert(
                    "tokenizer.ggml.token_type".into(),
                    GgufValue::Array(vec![GgufValue::I32(1)]),
                );
            }),
            "has 1 entries",
        ),
        (
            Box::new(|f| {
                f.metadata.insert(
                    "tokenizer.ggml.eos_token_id".into(),
                    GgufValue::U32(1_000_000),
                );
            }),
            "eos_token_id: token id 1000000 is out of range",
        ),
        (
            Box::new(|f| {
                f.metadata
                    .insert("tokenizer.ggml.bos_token_id".into(), GgufValue::I32(-1));
            }),
            "bos_token_id: expected a non-negative integer",
        ),
        (
            Box::new(|f| {
                f.metadata
                    .insert("tokenizer.ggml.add_bos_token".into(), GgufValue::U8(1));
            }),
            "add_bos_token: expected a bool",
        ),
        (
            Box::new(|f| {
                f.metadata
                    .insert("tokenizer.chat_template".into(), GgufValue::U8(1));
            }),
            "chat_template: expected a string",
        ),
        (
            Box::new(|f| {
                f.metadata.remove("tokenizer.ggml.bos_token_id");
                f.metadata
                    .insert("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(true));
            }),
            "bos_token_id: missing",
        ),
    ];
    for (edit, want) in cases {
        let err = load_err(edit);
        assert!(err.contains(want), "{err:?} does not mention {want:?}");
    }
}

#[test]
fn merges_outside_the_vocabulary_are_dropped_not_fatal() {
    let (mut file, tokens) = synthetic(Some("gpt2"));
    let mut merges: Vec<String> = vec!["x y".into(), "1 2".into()];
    merges.extend(["3 4", "12 3", "4 5", "Ġ t", "h e", "Ġt he"].map(String::from));
    file.metadata
        .insert("tokenizer.ggml.merges".into(), strings(&merges));
    let tok = Tokenizer::from_gguf(&file).unwrap();
    assert_eq!(
        tok.encode("12345", false).unwrap(),
        ids_of(&tokens, &["12", "34", "5"])
    );
}
