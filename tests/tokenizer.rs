//! The tokenizer room against llama.cpp's fixtures for the default model
//! (SmolLM2-135M-Instruct Q4_1): encoding, chat templates, incremental detokenization,
//! malformed metadata, and (ignored by default) timings.
//!
//! The model file is `$SLUICE_MODEL` when set, else the default model, fetched into the
//! cache on first use.

use std::path::PathBuf;
use std::sync::OnceLock;

use proptest::prelude::*;
use serde::Deserialize;
use sluice::gguf::GgufFile;
use sluice::tokenizer::{
    ChatMessage, ChatTemplateOptions, IncrementalDetokenizer, Tokenizer, TokenizerError,
};

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn model_path() -> PathBuf {
    if let Some(path) = std::env::var_os("SLUICE_MODEL") {
        return PathBuf::from(path);
    }
    sluice::assets::default_model_path().expect("fetching the default model")
}

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = model_path();
        let file = GgufFile::open(&path).unwrap_or_else(|e| {
            panic!(
                "the default model is needed at {} ({e}); see DESIGN.md to fetch it",
                path.display()
            )
        });
        Tokenizer::from_gguf(&file).expect("building the default model's tokenizer")
    })
}

#[derive(Deserialize)]
struct TokenizeFixture {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct GreedyFixture {
    name: String,
    chat: bool,
    #[serde(default)]
    messages: Vec<ChatMessage>,
    prompt: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    greedy_text: String,
}

fn read_jsonl<T: for<'de> Deserialize<'de>>(name: &str) -> Vec<T> {
    std::fs::read_to_string(fixtures_dir().join(name))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn encodes_every_tokenize_fixture_like_llama_cpp() {
    let tok = tokenizer();
    let fixtures: Vec<TokenizeFixture> = read_jsonl("tokenize.jsonl");
    assert!(fixtures.len() >= 30);
    let mut failures = Vec::new();
    for f in &fixtures {
        let ids = tok.encode(&f.text, false).unwrap();
        if ids != f.ids {
            failures.push(format!("{:?}: got {ids:?}, want {:?}", f.text, f.ids));
        }
        // Nothing is lost on the way back (these texts hold no U+FFFD).
        assert_eq!(tok.decode(&ids, false).unwrap(), f.text);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn encodes_every_greedy_prompt_like_llama_cpp() {
    let tok = tokenizer();
    for f in read_jsonl::<GreedyFixture>("greedy.jsonl") {
        assert_eq!(
            tok.encode(&f.prompt, true).unwrap(),
            f.prompt_ids,
            "{}",
            f.name
        );
    }
}

#[test]
fn renders_every_chat_fixture_like_llama_cpp() {
    let tok = tokenizer();
    let opts = ChatTemplateOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    let chats: Vec<GreedyFixture> = read_jsonl::<GreedyFixture>("greedy.jsonl")
        .into_iter()
        .filter(|f| f.chat)
        .collect();
    assert!(!chats.is_empty());
    for f in chats {
        let prompt = tok.apply_chat_template(&f.messages, &opts).unwrap();
        assert_eq!(prompt, f.prompt, "{}", f.name);
    }
}

#[test]
fn metadata_gives_bos_eos_and_special_tokens() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_token_id(), Some(1));
    assert!(!tok.add_bos());
    // EOS is <|im_end|>; <|endoftext|> also ends a turn, as in llama.cpp.
    assert_eq!(tok.eos_token_ids(), &[0, 2]);
    assert!(tok.is_eos(2) && !tok.is_eos(1));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.id_to_token(2), Some("<|im_end|>"));
    assert_eq!(tok.id_to_token(49152), None);
    assert!(tok.is_special(1) && !tok.is_special(198) && !tok.is_special(u32::MAX));
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi");
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        "<|im_start|>user\nHi<|im_end|>"
    );
    assert!(matches!(
        tok.decode(&[49152], false),
        Err(TokenizerError::IdOutOfRange { id: 49152, .. })
    ));
}

/// Feeds `ids` one by one; returns the deltas.
fn detokenize(tok: &Tokenizer, ids: &[u32], skip_special_tokens: bool) -> Vec<String> {
    let mut detok = IncrementalDetokenizer::new(tok, skip_special_tokens);
    let mut deltas: Vec<String> = ids.iter().map(|&id| detok.push(tok, id).unwrap()).collect();
    deltas.push(detok.flush(tok).unwrap());
    deltas
}

#[test]
fn detokenizes_fixture_texts_and_generations_incrementally() {
    let tok = tokenizer();
    for f in read_jsonl::<TokenizeFixture>("tokenize.jsonl") {
        for skip in [false, true] {
            let deltas = detokenize(tok, &f.ids, skip);
            assert_eq!(
                deltas.concat(),
                tok.decode(&f.ids, skip).unwrap(),
                "{:?}",
                f.text
            );
            assert!(
                deltas.iter().all(|d| !d.contains('\u{FFFD}')),
                "{:?}",
                f.text
            );
        }
    }
    for f in read_jsonl::<GreedyFixture>("greedy.jsonl") {
        let deltas = detokenize(tok, &f.greedy_ids, true);
        assert_eq!(deltas.concat(), f.greedy_text, "{}", f.name);
    }
}

#[test]
fn multi_byte_characters_split_across_tokens_are_held_back() {
    let tok = tokenizer();
    for text in [
        "emoji 😀🚀👍🏽 done",
        "日本語のテキスト",
        "中文测试句子",
        "ZWJ 👨‍👩‍👧",
    ] {
        let ids = tok.encode(text, false).unwrap();
        let deltas = detokenize(tok, &ids, false);
        // Some token carries only part of a character: it must give an empty delta.
        assert!(deltas[..ids.len()].iter().any(String::is_empty), "{text}");
        for d in &deltas {
            assert!(!d.contains('\u{FFFD}'), "{text}: broken delta {d:?}");
        }
        assert_eq!(deltas.concat(), text);
    }
    // A sequence cut inside a character flushes as one U+FFFD, as decode does.
    let ids = tok.encode("😀", false).unwrap();
    assert!(ids.len() > 1);
    let cut = &ids[..ids.len() - 1];
    assert_eq!(
        detokenize(tok, cut, false).concat(),
        tok.decode(cut, false).unwrap()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn detokenizer_deltas_concatenate_to_decode(
        ids in proptest::collection::vec(
            // Mostly real tokens, with a bias to the byte tokens (ids < 512 hold most of the
            // lone continuation and lead bytes) and the special ones.
            prop_oneof![0u32..49152, 0u32..512, 0u32..17],
            0..64,
        ),
        skip in any::<bool>(),
    ) {
        let tok = tokenizer();
        let deltas = detokenize(tok, &ids, skip);
        prop_assert_eq!(deltas.concat(), tok.decode(&ids, skip).unwrap());
    }

    /// The fast path (hand-written pre-tokenizer) gives what the `tokenizers` pipeline gives.
    #[test]
    fn encode_matches_the_tokenizers_pipeline(
        parts in proptest::collection::vec(
            prop_oneof![
                4 => "[ a-zA-Z0-9'\\n\\t.,!?-]{0,12}",
                1 => "\\PC{0,6}",
                1 => Just("<|im_start|>".to_string()),
                1 => Just("<|im_end|>".to_string()),
            ],
            0..12,
        ),
    ) {
        let tok = tokenizer();
        let text = parts.concat();
        let want = tok.hf_tokenizer().encode_fast(text.as_str(), false).unwrap();
        prop_assert_eq!(tok.encode(&text, false).unwrap(), want.get_ids());
    }

    #[test]
    fn encode_decode_round_trips_arbitrary_text(text in "\\PC{0,40}") {
        let tok = tokenizer();
        let ids = tok.encode(&text, false).unwrap();
        prop_assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
}

#[test]
fn hf_directory_export_of_the_default_tokenizer_encodes_the_same() {
    let tok = tokenizer();
    let dir = std::env::temp_dir().join(format!("sluice-hf-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    tok.hf_tokenizer()
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
    let config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "add_bos_token": false,
        "chat_template": tok.chat_template(),
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    let hf = Tokenizer::from_hf_dir(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let hf = hf.unwrap();
    assert_eq!(hf.vocab_size(), tok.vocab_size());
    assert_eq!(hf.eos_token_ids(), &[2]);
    for f in read_jsonl::<TokenizeFixture>("tokenize.jsonl") {
        assert_eq!(hf.encode(&f.text, true).unwrap(), f.ids, "{:?}", f.text);
        assert_eq!(
            hf.decode(&f.ids, false).unwrap(),
            tok.decode(&f.ids, false).unwrap()
        );
    }
    let opts = ChatTemplateOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    for f in read_jsonl::<GreedyFixture>("greedy.jsonl")
        .into_iter()
        .filter(|f| f.chat)
    {
        assert_eq!(
            hf.apply_chat_template(&f.messages, &opts).unwrap(),
            f.prompt
        );
    }
}

/// A prompt of at least `num_tokens` tokens made of the fixture texts.
fn long_prompt(tok: &Tokenizer, num_tokens: usize) -> String {
    let pieces: Vec<String> = read_jsonl::<TokenizeFixture>("tokenize.jsonl")
        .into_iter()
        .map(|f| f.text)
        .chain(
            read_jsonl::<GreedyFixture>("greedy.jsonl")
                .into_iter()
                .map(|f| f.prompt),
        )
        .collect();
    let mut text = String::new();
    for piece in pieces.iter().cycle() {
        text.push_str(piece);
        text.push('\n');
        if text.len() > num_tokens && tok.encode(&text, false).unwrap().len() >= num_tokens {
            return text;
        }
    }
    unreachable!()
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Timings: `cargo test --release --test integration -- --ignored --nocapture tokenizer::timings`.
#[test]
#[ignore = "timing; run explicitly"]
fn timings() {
    use std::time::Instant;
    let tok = tokenizer();
    let text = long_prompt(tok, 1500);
    let ids = tok.encode(&text, false).unwrap();
    for _ in 0..5 {
        tok.encode(&text, false).unwrap();
    }
    let encode_ms = median(
        (0..101)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(tok.encode(&text, false).unwrap());
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    let push_us = median(
        (0..101)
            .map(|_| {
                let mut detok = IncrementalDetokenizer::new(tok, true);
                let t = Instant::now();
                for &id in &ids {
                    std::hint::black_box(detok.push(tok, id).unwrap());
                }
                t.elapsed().as_secs_f64() * 1e6 / ids.len() as f64
            })
            .collect(),
    );
    let decode_us = median(
        (0..101)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(tok.decode(&ids, true).unwrap());
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect(),
    );
    // With the BPE cache emptied first: every word is merged afresh, as in a first prompt.
    let cold_ms = median(
        (0..21)
            .map(|_| {
                if let tokenizers::ModelWrapper::BPE(bpe) = tok.hf_tokenizer().get_model() {
                    bpe.clear_cache();
                }
                let t = Instant::now();
                std::hint::black_box(tok.encode(&text, false).unwrap());
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    let file = GgufFile::open(&model_path()).unwrap();
    let load_ms = median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(Tokenizer::from_gguf(&file).unwrap());
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    println!(
        "{} tokens ({} bytes): encode median {encode_ms:.3} ms (cold cache {:.3} ms); \
         detokenizer push median {push_us:.3} us/token; full decode median {decode_us:.1} us; \
         from_gguf median {:.1} ms",
        ids.len(),
        text.len(),
        cold_ms,
        load_ms,
    );
}
