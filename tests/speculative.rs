//! Speculative decoding with the real default model: the output is the same with it on or
//! off, greedy (in both CPU numerics; in ggml's, llama.cpp's own tokens) and seeded, alone or
//! batched, under KV pressure and preemption, with stops and `max_tokens` landing inside a
//! draft; aborts free every block; unseeded sampling keeps its distribution. Each test checks
//! that drafts were verified and accepted, so none passes by never speculating.

use crate::common;

use std::collections::HashMap;
use std::sync::Arc;

use sluice::engine::{
    self, EngineConfig, EngineHandle, GenerateRequest, StreamEvent, TokenLogprob, Usage,
};
use sluice::kernels::cpu::CpuNumerics;
use sluice::kv_cache::CacheConfig;
use sluice::sampling::SamplingParams;
use sluice::scheduler::SchedulerConfig;
use sluice::speculative::SpeculativeConfig;
use sluice::tokenizer::Tokenizer;

fn start(numerics: CpuNumerics, num_blocks: usize, speculate: bool) -> EngineHandle {
    let config = r#"{"method":"ngram","num_speculative_tokens":5}"#;
    start_with(numerics, num_blocks, speculate.then_some(config))
}

fn start_with(numerics: CpuNumerics, num_blocks: usize, spec: Option<&str>) -> EngineHandle {
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_batched_tokens: 2048,
            max_num_seqs: 64,
            ..SchedulerConfig::default()
        },
        cache: CacheConfig {
            block_size: 16,
            num_blocks,
            // As `serve` under ggml numerics (a cached prefix may have chosen the other
            // attention kernel); the fast numerics' tests keep it on.
            enable_prefix_caching: numerics == CpuNumerics::Fast,
            sliding_window: None,
        },
        max_model_len: 8192,
        speculative: spec.map(|json| SpeculativeConfig::parse(json).unwrap()),
        ..EngineConfig::default()
    };
    let tokenizer = Arc::new(Tokenizer::from_gguf(&common::default_gguf()).unwrap());
    engine::spawn(common::default_model_with(numerics), tokenizer, config).unwrap()
}

/// Text that repeats itself (the fixture text's first `len` tokens, twice, then its start
/// again), so the model goes on repeating it and prompt-lookup drafts are accepted.
fn repetitive(len: usize, salt: usize) -> Vec<u32> {
    let text = common::teacher_forced_fixture().ids;
    let piece: Vec<u32> = (0..len)
        .map(|i| text[(i + salt * 13) % text.len()])
        .collect();
    let mut p = piece.clone();
    p.extend(&piece);
    p.extend(&piece[..len / 3]);
    p
}

/// Per choice: its tokens, text and logprobs; and the request's usage.
struct Outcome {
    choices: Vec<(Vec<u32>, String, Vec<TokenLogprob>)>,
    usage: Usage,
}

fn collect(mut stream: engine::RequestStream) -> Outcome {
    let mut choices: Vec<(Vec<u32>, String, Vec<TokenLogprob>)> = Vec::new();
    loop {
        match stream.next_blocking() {
            Some(StreamEvent::Token {
                index,
                token_ids,
                text,
                logprobs,
            }) => {
                if choices.len() <= index {
                    choices.resize(index + 1, Default::default());
                }
                choices[index].0.extend(token_ids);
                choices[index].1.push_str(&text);
                choices[index].2.extend(logprobs);
            }
            Some(StreamEvent::SeqFinished { .. } | StreamEvent::Embedding { .. }) => {}
            Some(StreamEvent::Done { usage, .. }) => return Outcome { choices, usage },
            Some(StreamEvent::Error(e)) => panic!("request failed: {e}"),
            None => panic!("stream ended without a terminal event"),
        }
    }
}

fn run_together(engine: &EngineHandle, requests: &[GenerateRequest]) -> Vec<Outcome> {
    let streams: Vec<_> = (requests.iter())
        .map(|r| engine.submit(r.clone()).unwrap())
        .collect();
    streams.into_iter().map(collect).collect()
}

fn accepted(engine: &EngineHandle) -> f64 {
    common::engine_metric(engine, "sluice:spec_decode_num_accepted_tokens_total")
}

/// [`accepted`] once the engine is idle: a stream ends before its last step's counts are
/// published, and the idle update comes after them.
fn accepted_when_idle(engine: &EngineHandle) -> f64 {
    common::assert_idle_without_leaks(engine);
    accepted(engine)
}

/// Same choices (tokens, text, logprobs) and token counts. Cached prompt tokens may differ:
/// they depend on what the prefix cache held when a request (or its recomputation) started.
fn assert_same(expected: &[Outcome], got: &[Outcome], what: &str) {
    for (i, (e, g)) in expected.iter().zip(got).enumerate() {
        assert_eq!(e.choices, g.choices, "{what}: request {i}'s choices");
        let counts = |u: &Usage| (u.prompt_tokens, u.completion_tokens);
        assert_eq!(
            counts(&e.usage),
            counts(&g.usage),
            "{what}: request {i}'s usage"
        );
    }
}

/// Under ggml numerics sluice's greedy tokens are llama.cpp's; with speculation too, alone
/// and batched, and on repetitive prompts where most drafts are accepted. Drafts are of fixed
/// length: where every row costs the same (ggml's kernels on a CPU without VNNI), the
/// measured step cost rightly stops drafting, and how soon depends on the machine's timing.
#[test]
fn ggml_numerics_greedy_tokens_are_llama_cpps_with_speculation() {
    let config = r#"{"method":"ngram","num_speculative_tokens":5,"fixed_draft_length":true}"#;
    let engine = start_with(CpuNumerics::Ggml, 512, Some(config));
    let mut fixtures = common::greedy_fixtures();
    fixtures.extend(common::greedy_long_fixtures());
    let requests: Vec<GenerateRequest> = (fixtures.iter())
        .map(|f| GenerateRequest::greedy(f.prompt_ids.clone(), f.greedy_ids.len()))
        .collect();
    let batched = run_together(&engine, &requests);
    for (f, got) in fixtures.iter().zip(&batched) {
        assert_eq!(got.choices[0].0, f.greedy_ids, "{}: batched", f.name);
    }
    for (f, r) in fixtures.iter().zip(&requests).take(1) {
        let alone = collect(engine.submit(r.clone()).unwrap());
        assert_eq!(alone.choices[0].0, f.greedy_ids, "{}: alone", f.name);
    }
    let plain = start(CpuNumerics::Ggml, 512, false);
    let repeat: Vec<GenerateRequest> = (0..3)
        .map(|i| GenerateRequest::greedy(repetitive(40, i), 40))
        .collect();
    assert_same(
        &run_together(&plain, &repeat),
        &run_together(&engine, &repeat),
        "ggml, repetitive prompts",
    );
    assert!(accepted(&engine) > 20.0, "drafts were hardly accepted");
    common::assert_idle_without_leaks(&engine);
}

/// Greedy and seeded requests (penalties, top-k/p, stop strings, `n` = 2, `max_tokens` of
/// 1 to 64), on repetitive prompts and the fixtures'.
fn mixed_requests() -> Vec<GenerateRequest> {
    let seeded = |prompt: Vec<u32>, seed: u64, max_tokens: usize| GenerateRequest {
        sampling: SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            top_k: 40,
            repetition_penalty: 1.05,
            frequency_penalty: 0.1,
            seed: Some(seed),
            logprobs: Some(2),
            ..SamplingParams::default()
        },
        ..GenerateRequest::greedy(prompt, max_tokens)
    };
    let mut requests = Vec::new();
    for (i, max_tokens) in [64, 1, 2, 7, 33].into_iter().enumerate() {
        requests.push(GenerateRequest::greedy(repetitive(30 + i, i), max_tokens));
        requests.push(seeded(repetitive(25 + i, i + 5), 11 + i as u64, max_tokens));
    }
    for f in common::greedy_fixtures().into_iter().take(4) {
        requests.push(GenerateRequest::greedy(f.prompt_ids, 32));
    }
    // A stop string inside repeated text (it ends a sequence in the middle of a draft).
    let tok = Tokenizer::from_gguf(&common::default_gguf()).unwrap();
    let p = repetitive(36, 2);
    let stop = tok.decode(&p[40..42], true).unwrap();
    requests.push(GenerateRequest {
        stop: vec![stop.trim().to_string()],
        ..GenerateRequest::greedy(p, 64)
    });
    requests.push(GenerateRequest {
        n: 2,
        ..seeded(repetitive(28, 9), 99, 40)
    });
    requests
}

/// The default numerics: a batch of mixed requests gives the same tokens, text and usage
/// with speculation on and off, and each request alone the same as batched.
#[test]
fn speculation_changes_no_token_greedy_or_seeded() {
    let requests = mixed_requests();
    let plain = start(CpuNumerics::Fast, 1024, false);
    let expected = run_together(&plain, &requests);
    drop(plain);
    let spec = start(CpuNumerics::Fast, 1024, true);
    assert_same(&expected, &run_together(&spec, &requests), "batched");
    let alone: Vec<Outcome> = (requests.iter())
        .map(|r| collect(spec.submit(r.clone()).unwrap()))
        .collect();
    assert_same(&expected, &alone, "alone");
    assert!(accepted(&spec) > 50.0, "drafts were hardly accepted");
    common::assert_idle_without_leaks(&spec);
}

/// A tight cache: sequences are preempted while drafts come and go, rejected drafts' slots
/// are given back, and the tokens are those of a roomy cache without speculation.
#[test]
fn rollback_under_kv_pressure_and_preemption() {
    let requests: Vec<GenerateRequest> = (0..10)
        .map(|i| GenerateRequest {
            ignore_eos: true,
            ..GenerateRequest::greedy(repetitive(30, i), 72)
        })
        .collect();
    let expected = run_together(&start(CpuNumerics::Fast, 1024, false), &requests);
    let tight = start(CpuNumerics::Fast, 30, true);
    assert_same(&expected, &run_together(&tight, &requests), "tight cache");
    assert!(common::engine_metric(&tight, "sluice:num_preemptions_total") > 0.0);
    assert!(accepted(&tight) > 20.0, "drafts were hardly accepted");
    common::assert_idle_without_leaks(&tight);
}

/// Clients that leave while their drafts are being verified: every block comes back.
#[test]
fn aborts_mid_verification_free_every_block() {
    let engine = start(CpuNumerics::Fast, 256, true);
    let streams: Vec<_> = (0..6)
        .map(|i| {
            let r = GenerateRequest {
                ignore_eos: true,
                ..GenerateRequest::greedy(repetitive(30, i), 200)
            };
            engine.submit(r).unwrap()
        })
        .collect();
    for (i, mut s) in streams.into_iter().enumerate() {
        // Leave after a few tokens each, at different points of their drafts.
        let mut seen = 0;
        while seen < 5 + 3 * i {
            match s.next_blocking() {
                Some(StreamEvent::Token { token_ids, .. }) => seen += token_ids.len(),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert!(common::engine_metric(&engine, "sluice:spec_decode_num_drafts_total") > 0.0);
    common::assert_idle_without_leaks(&engine);
}

/// Unseeded sampling: the target's own draw decides each token, so the distribution is the
/// target's. Over many requests, each output position's most frequent tokens occur as often
/// with speculation as without, within 5σ (binomial).
#[test]
fn unseeded_sampling_keeps_the_distribution() {
    const N: usize = 96;
    const LEN: usize = 6;
    let request = GenerateRequest {
        sampling: SamplingParams {
            temperature: 1.0,
            ..SamplingParams::default()
        },
        ignore_eos: true,
        ..GenerateRequest::greedy(repetitive(24, 3), LEN)
    };
    let counts = |engine: &EngineHandle| {
        let requests = vec![request.clone(); N];
        let mut per_pos = vec![HashMap::<u32, usize>::new(); LEN];
        for o in run_together(engine, &requests) {
            for (pos, t) in o.choices[0].0.iter().enumerate() {
                *per_pos[pos].entry(*t).or_default() += 1;
            }
        }
        per_pos
    };
    let plain = counts(&start(CpuNumerics::Fast, 512, false));
    let spec_engine = start(CpuNumerics::Fast, 512, true);
    let spec = counts(&spec_engine);
    for pos in 0..LEN {
        for (&token, &a) in &plain[pos] {
            let b = spec[pos].get(&token).copied().unwrap_or(0);
            let p = (a + b) as f64 / (2 * N) as f64;
            // The difference of two binomial counts: variance 2·N·p·(1 − p).
            let sigma = (2.0 * N as f64 * p * (1.0 - p)).sqrt().max(1.0);
            assert!(
                (a as f64 - b as f64).abs() <= 5.0 * sigma,
                "position {pos}, token {token}: {a} without speculation, {b} with"
            );
        }
    }
    assert!(accepted(&spec_engine) > 0.0, "no draft was accepted");
}

/// `suffix`: a request drafts from what an earlier, finished request said. Asked the same
/// question twice, the second answer is drafted from the first (where the sequence's own
/// tokens offer little); its tokens are those of plain decoding.
#[test]
fn suffix_drafts_from_an_earlier_request() {
    let f = &common::greedy_fixtures()[1];
    let request = GenerateRequest::greedy(f.prompt_ids.clone(), f.greedy_ids.len());
    let accepted_in_second = |spec: &str| {
        let engine = start_with(CpuNumerics::Fast, 256, Some(spec));
        let first = collect(engine.submit(request.clone()).unwrap());
        let before = accepted_when_idle(&engine);
        let second = collect(engine.submit(request.clone()).unwrap());
        assert_eq!(first.choices, second.choices);
        (first, accepted_when_idle(&engine) - before)
    };
    let (plain_out, ngram) = accepted_in_second(r#"{"method":"ngram"}"#);
    let (suffix_out, suffix) = accepted_in_second(r#"{"method":"suffix"}"#);
    assert_same(&[plain_out], &[suffix_out], "suffix");
    assert!(
        suffix > ngram + 5.0,
        "the second request accepted {suffix} draft tokens with suffix, {ngram} with ngram"
    );
}

/// `draft_model`, the default model drafting for itself: its greedy drafts are accepted
/// where the target is greedy and often rejected where it samples, so the draft's cache
/// rolls back; the tokens, text and logprobs are plain decoding's, batched and under a
/// tight cache that preempts; the draft's pool is empty once idle.
#[test]
fn draft_model_changes_no_token() {
    let model = sluice::assets::default_model_path().unwrap();
    let config = serde_json::json!({"method": "draft_model", "model": model,
        "num_speculative_tokens": 3, "fixed_draft_length": true});
    let requests = mixed_requests();
    let expected = run_together(&start(CpuNumerics::Fast, 1024, false), &requests);
    let spec = start_with(CpuNumerics::Fast, 1024, Some(&config.to_string()));
    assert_same(&expected, &run_together(&spec, &requests), "draft model");
    common::assert_idle_without_leaks(&spec);
    let drafted = common::engine_metric(&spec, "sluice:spec_decode_num_draft_tokens_total");
    let share = accepted(&spec) / drafted;
    assert!(
        (0.3..1.0).contains(&share),
        "{share} of {drafted} draft tokens accepted"
    );
    let tight = start_with(CpuNumerics::Fast, 30, Some(&config.to_string()));
    let long: Vec<GenerateRequest> = (0..8)
        .map(|i| GenerateRequest {
            ignore_eos: true,
            ..GenerateRequest::greedy(repetitive(30, i), 64)
        })
        .collect();
    let roomy = run_together(&start(CpuNumerics::Fast, 1024, false), &long);
    assert_same(
        &roomy,
        &run_together(&tight, &long),
        "draft model, tight cache",
    );
    assert!(common::engine_metric(&tight, "sluice:num_preemptions_total") > 0.0);
    common::assert_idle_without_leaks(&tight);
    // Greedy, and the draft computes the target's own logits (batch-invariant kernels):
    // every draft token is accepted, which a draft cache out of step would break.
    let drafted = common::engine_metric(&tight, "sluice:spec_decode_num_draft_tokens_total");
    assert!(drafted > 50.0, "{drafted} draft tokens");
    assert_eq!(accepted(&tight), drafted);
}
