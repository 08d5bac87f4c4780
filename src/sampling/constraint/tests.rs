//! The constraint over the default model's real tokenizer: its trie, masks, the sampler's
//! check-then-mask path.

use std::sync::{Arc, OnceLock};

use serde_json::json;

use super::tok_env::SluiceTokEnv;
use super::*;
use crate::sampling::{SamplingParams, SamplingScratch, SequenceSampler};
use crate::tokenizer::Tokenizer;

fn tokenizer() -> Arc<Tokenizer> {
    static TOKENIZER: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    TOKENIZER
        .get_or_init(|| {
            let path = crate::assets::default_model_path().expect("fetching the default model");
            Arc::new(Tokenizer::from_path(&path).expect("the default model's tokenizer"))
        })
        .clone()
}

fn compiler() -> &'static ConstraintCompiler {
    static COMPILER: OnceLock<ConstraintCompiler> = OnceLock::new();
    COMPILER.get_or_init(|| ConstraintCompiler::new(tokenizer()))
}

fn ids(text: &str) -> Vec<u32> {
    tokenizer().encode(text, false).expect("encoding")
}

#[test]
fn the_trie_spells_every_token_as_the_tokenizer_decodes_it() {
    let tok = tokenizer();
    let env = SluiceTokEnv::build(tok.clone()).expect("a token env");
    let trie = env.tok_trie();
    assert_eq!(trie.vocab_size(), tok.vocab_size());
    assert_eq!(trie.eos_tokens(), tok.eos_token_ids());
    let mut num_special = 0;
    for id in 0..tok.vocab_size() as u32 {
        let bytes = trie.token(id);
        if tok.is_special(id) {
            assert_eq!(bytes.first(), Some(&0xFF), "special token {id}");
            num_special += 1;
        } else {
            let text = tok.decode(&[id], false).expect("decoding");
            // Tokens that are pieces of a UTF-8 character decode lossily; the rest exactly.
            if !text.contains('\u{FFFD}') {
                assert_eq!(bytes, text.as_bytes(), "token {id}");
            }
        }
    }
    assert!(num_special > 0);
    // Text through our encoder, and back through the trie's bytes.
    let text = "{\"name\": \"Ada\", \"age\": 36}";
    let toks = env.tokenize(text);
    assert_eq!(toks, ids(text));
    assert_eq!(trie.decode(&toks), text.as_bytes());
}

#[test]
fn a_schema_constraint_accepts_its_language_and_masks_the_rest() {
    let schema = json!({
        "type": "object",
        "properties": {"age": {"type": "integer"}},
        "required": ["age"],
        "additionalProperties": false
    });
    let mut c = compiler()
        .compile(&ConstraintSpec::JsonSchema(schema))
        .expect("compiles");
    // Any token that does not start `{` is refused, and leaves the matcher as it was.
    assert!(!c.try_commit(ids("hello")[0]).expect("no error"));
    // The forced prefix `{"age": ` is allowed in its canonical tokenization only.
    let text = ids("{\"age\": 36}");
    let mask = c.mask().expect("a mask");
    assert!(mask.is_allowed(text[0]));
    assert!(!mask.is_allowed(ids("hello")[0]));
    assert!(!mask.is_allowed(c.eos_token_id()));
    for t in text {
        assert!(c.try_commit(t).expect("no error"), "token {t}");
    }
    // Nothing can follow `}`: the grammar is complete and only EOS is allowed.
    assert!(c.is_complete());
    let mask = c.mask().expect("a mask");
    assert!(mask.is_allowed(c.eos_token_id()));
    assert_eq!(mask.num_set(), tokenizer().eos_token_ids().len());
}

#[test]
fn any_json_is_written_compactly_too() {
    let mut c = compiler()
        .compile(&ConstraintSpec::JsonSchema(json!(true)))
        .expect("compiles");
    // `[` then a newline would be free whitespace: refused.
    assert!(c.try_commit(ids("[")[0]).expect("no error"));
    assert!(!c.try_commit(ids("\n")[0]).expect("no error"));
}

#[test]
fn specs_that_do_not_compile_name_the_problem() {
    let bad = [
        ConstraintSpec::JsonSchema(json!({"type": "objekt"})),
        ConstraintSpec::Regex("(unclosed".into()),
        ConstraintSpec::Grammar("start: missing_rule".into()),
        ConstraintSpec::Choice(vec![]),
    ];
    for spec in bad {
        match compiler().compile(&spec) {
            Err(ConstraintError::Invalid(why)) => assert!(!why.is_empty(), "{spec:?}"),
            other => panic!("{spec:?}: {other:?}"),
        }
    }
}

#[test]
fn the_sampler_redraws_a_rejected_token_and_forces_eos_at_the_end() {
    let tok = tokenizer();
    let vocab = tok.vocab_size();
    let spec = ConstraintSpec::Choice(vec!["yes".into(), "no".into()]);
    let mut sampler = SequenceSampler::new(SamplingParams::greedy(), &[], 0);
    sampler.constrain(compiler().compile(&spec).expect("compiles"));
    let mut scratch = SamplingScratch::default();
    // The model "wants" token `hello` most, `no` second: the grammar refuses the first.
    let (hello, no) = (ids("hello")[0], ids("no")[0]);
    let mut row = vec![0.0f32; vocab];
    row[hello as usize] = 10.0;
    row[no as usize] = 5.0;
    let t = sampler
        .sample(&mut row.clone(), &mut scratch)
        .expect("a token");
    assert_eq!(t.token_id, no);
    // Logprobs (when asked) are the raw row's; here the draw is what matters. Then only EOS.
    let eos = sampler
        .sample(&mut row.clone(), &mut scratch)
        .expect("a token");
    assert!(tok.is_eos(eos.token_id));
    let again = sampler.sample(&mut row, &mut scratch).expect("a token");
    assert!(tok.is_eos(again.token_id));
}

#[test]
fn seeded_constrained_draws_replay_and_stay_in_the_language() {
    let tok = tokenizer();
    let vocab = tok.vocab_size();
    let spec = ConstraintSpec::Regex("[0-9]{3}".into());
    let run = || {
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(11),
            ..SamplingParams::default()
        };
        let mut sampler = SequenceSampler::new(params, &[], 0);
        sampler.constrain(compiler().compile(&spec).expect("compiles"));
        let mut scratch = SamplingScratch::default();
        let mut out = Vec::new();
        for step in 0..6 {
            // A flat row: nearly every draw is rejected first.
            let mut row: Vec<f32> = (0..vocab).map(|i| ((i * 7 + step) % 13) as f32).collect();
            let t = sampler.sample(&mut row, &mut scratch).expect("a token");
            if tok.is_eos(t.token_id) {
                break;
            }
            out.push(t.token_id);
        }
        out
    };
    let first = run();
    assert_eq!(first, run());
    let text = tok.decode(&first, true).expect("decoding");
    assert_eq!(text.len(), 3, "{text:?}");
    assert!(text.chars().all(|c| c.is_ascii_digit()), "{text:?}");
}

#[test]
fn a_device_row_carries_the_mask_and_the_drawn_token_advances_the_grammar() {
    use crate::kernels::sampling::SamplingBatch;
    use crate::kernels::sampling_reference;
    let tok = tokenizer();
    let vocab = tok.vocab_size();
    let spec = ConstraintSpec::Choice(vec!["yes".into(), "no".into()]);
    let mut sampler = SequenceSampler::new(SamplingParams::greedy(), &[], 0);
    sampler.constrain(compiler().compile(&spec).expect("compiles"));
    let (hello, no) = (ids("hello")[0], ids("no")[0]);
    let mut raw = vec![0.0f32; vocab];
    raw[hello as usize] = 10.0;
    raw[no as usize] = 5.0;
    let draw = |sampler: &mut SequenceSampler| {
        let mut batch = SamplingBatch::default();
        sampler.device_row(&mut batch, vocab);
        let token = sampling_reference::sample_rows(&raw, vocab, &batch)[0].token_id;
        sampler.observe_drawn(token).expect("the grammar allows it");
        token
    };
    assert_eq!(draw(&mut sampler), no);
    assert!(tok.is_eos(draw(&mut sampler)));
    // A token the mask did not allow fails the sequence rather than corrupting the grammar.
    let mut other = SequenceSampler::new(SamplingParams::greedy(), &[], 0);
    other.constrain(compiler().compile(&spec).expect("compiles"));
    assert!(other.observe_drawn(hello).is_err());
}
