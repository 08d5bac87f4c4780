//! The bodies of the fuzz targets: plain functions over bytes, shared by the cargo-fuzz
//! targets in `fuzz_targets/` (nightly, unbounded) and by `tests/fuzz_regressions.rs`
//! (stable, `cargo test`: replays `fuzz/corpus/` plus a bounded number of mutations).
//!
//! Contract: each returns normally on any input. An error value is a fine answer; a panic, a
//! hang, a huge allocation or a broken invariant (asserted here) is the bug.
#![allow(dead_code)]

use std::sync::OnceLock;

use sluice::api::errors::MAX_MESSAGE_BYTES;
use sluice::api::openai_types::{ChatCompletionRequest, CompletionRequest};
use sluice::api::{parse_json, prompt, validation, ApiError};
use sluice::engine::EngineInfo;
use sluice::gguf::GgufFile;
use sluice::model::config::ModelConfig;
use sluice::tokenizer::{ChatMessage, ChatTemplateOptions, IncrementalDetokenizer, Tokenizer};

/// The default model's tokenizer, loaded once per process.
pub fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = sluice::assets::default_model_path().expect("the default model");
        let file = GgufFile::open(&path).expect("opening the default model");
        Tokenizer::from_gguf(&file).expect("its tokenizer")
    })
}

/// Whether `c` survives encode → decode on its own. A byte-level vocabulary trained without
/// some bytes cannot represent every character: SmolLM2 lacks the control bytes 0x04, 0x06,
/// 0x13, 0x14, 0x16, 0x1d (they vanish) and lead bytes of unassigned planes such as 0xF2
/// (U+9F389 comes back as three U+FFFD). Both found by this target; the same ids come out of
/// HF tokenizers, since the vocabulary simply has no token for those bytes.
fn round_trips_alone(c: char) -> bool {
    static CACHE: OnceLock<std::sync::Mutex<std::collections::HashMap<char, bool>>> =
        OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(&ok) = cache.lock().ok().and_then(|m| m.get(&c).copied()).as_ref() {
        return ok;
    }
    let tok = tokenizer();
    let s = c.to_string();
    let ids = tok.encode(&s, false).unwrap_or_default();
    let ok = tok.decode(&ids, false).unwrap_or_default() == s;
    if let Ok(mut m) = cache.lock() {
        m.insert(c, ok);
    }
    ok
}

/// The GGUF reader, then the config and tokenizer readers over what it accepted.
pub fn gguf(data: &[u8]) {
    let path = std::env::temp_dir().join(format!(
        "sluice-fuzz-{}-{:?}.gguf",
        std::process::id(),
        std::thread::current().id()
    ));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(file) = GgufFile::open(&path) {
        let _ = ModelConfig::from_gguf(&file);
        let _ = Tokenizer::from_gguf(&file);
        for name in ["token_embd.weight", "output.weight", "blk.0.attn_q.weight"] {
            let _ = file.tensor(name);
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Text → ids → text is the identity (byte-level BPE); arbitrary ids decode without a
/// panic, and incrementally to the same text as at once.
pub fn tokenizer_round_trip(data: &[u8]) {
    let tok = tokenizer();
    if let Ok(text) = std::str::from_utf8(data) {
        let ids = tok.encode(text, false).expect("any text encodes");
        let back = tok.decode(&ids, false).expect("encoded ids decode");
        // Exact whenever every character is representable (see `round_trips_alone`).
        if text.chars().all(round_trips_alone) {
            assert_eq!(back, text, "round trip");
        }
    }
    let vocab = tok.vocab_size() as u32;
    let ids: Vec<u32> = data
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32 % (vocab + 16))
        .collect();
    let whole = tok.decode(&ids, false);
    let mut detok = IncrementalDetokenizer::new(tok, false);
    let mut pieces = String::new();
    for &id in &ids {
        match detok.push(tok, id) {
            Ok(s) => pieces.push_str(&s),
            Err(_) => {
                assert!(id >= vocab, "in-vocabulary id {id} failed to detokenize");
                return;
            }
        }
    }
    if let Ok(rest) = detok.flush(tok) {
        pieces.push_str(&rest);
    }
    if let Ok(whole) = whole {
        if !whole.contains('\u{FFFD}') {
            assert_eq!(pieces, whole, "incremental vs whole decode of {ids:?}");
        }
    }
}

/// The model's chat template over arbitrary conversations: roles and contents from the
/// input, split at NUL bytes.
pub fn chat_template(data: &[u8]) {
    let tok = tokenizer();
    let flags = data.first().copied().unwrap_or(0);
    let text = String::from_utf8_lossy(data.get(1..).unwrap_or(&[]));
    let parts: Vec<&str> = text.split('\0').collect();
    let messages: Vec<ChatMessage> = parts
        .chunks(2)
        .map(|p| ChatMessage::new(p[0], *p.get(1).unwrap_or(&"")))
        .collect();
    let opts = ChatTemplateOptions {
        add_generation_prompt: flags & 1 != 0,
        continue_final_message: flags & 2 != 0,
        ..ChatTemplateOptions::default()
    };
    let _ = tok.apply_chat_template(&messages, &opts);
}

fn check_error(e: &ApiError) {
    let message = e.object().message;
    assert!(
        message.len() <= MAX_MESSAGE_BYTES + 32,
        "an error message of {} bytes",
        message.len()
    );
}

/// Request bodies through parsing and validation, as the handlers run them (minus the
/// engine): errors are 4xx and short.
pub fn request_json(data: &[u8]) {
    let info = EngineInfo {
        max_model_len: 1024,
        vocab_size: 49152,
        kv_cache_tokens: 4096,
        block_size: 16,
        prefix_caching: true,
        max_num_seqs: 8,
        max_waiting: 8,
        pooling: sluice::engine::PoolingType::Last,
        faults: None,
    };
    match parse_json::<ChatCompletionRequest>(data) {
        Ok(req) => {
            if let Err(e) = validation::validate_chat(&req, &info) {
                check_error(&e);
                assert!(e.status().is_client_error(), "{e}");
            }
            if let Err(e) = prompt::chat_messages(&req.messages) {
                check_error(&e);
            }
        }
        Err(e) => check_error(&e),
    }
    match parse_json::<CompletionRequest>(data) {
        Ok(req) => {
            if let Err(e) = validation::validate_completion(&req, &info) {
                check_error(&e);
                assert!(e.status().is_client_error(), "{e}");
            }
        }
        Err(e) => check_error(&e),
    }
}
