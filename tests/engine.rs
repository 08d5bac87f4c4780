//! The engine with the real default model: batch invariance, chunked prefill, prefix caching
//! and preemption under KV-cache pressure, asserted through the engine's own counters.

use crate::common;

use sluice::engine::{self, EngineHandle, GenerateRequest, StreamEvent, Usage};

fn start(num_blocks: usize, max_num_batched_tokens: usize, prefix_cache: bool) -> EngineHandle {
    common::start_engine(num_blocks, max_num_batched_tokens, prefix_cache)
}

/// A prompt of `len` real tokens: the tokenized fixture text, repeated, offset by `salt` so
/// that prompts of one length differ.
fn prompt(len: usize, salt: usize) -> Vec<u32> {
    let text = common::teacher_forced_fixture().ids;
    (0..len)
        .map(|i| text[(i + salt * 7) % text.len()])
        .collect()
}

struct Outcome {
    tokens: Vec<u32>,
    usage: Usage,
}

fn request(ids: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        ignore_eos: true,
        ..GenerateRequest::greedy(ids, max_tokens)
    }
}

fn collect(mut stream: engine::RequestStream) -> Outcome {
    let mut tokens = Vec::new();
    loop {
        match stream.next_blocking() {
            Some(StreamEvent::Token { token_ids, .. }) => tokens.extend(token_ids),
            Some(StreamEvent::SeqFinished { .. } | StreamEvent::Embedding { .. }) => {}
            Some(StreamEvent::Done { usage, .. }) => return Outcome { tokens, usage },
            Some(StreamEvent::Error(e)) => panic!("request failed: {e}"),
            None => panic!("stream ended without a terminal event"),
        }
    }
}

fn run_alone(engine: &EngineHandle, ids: &[u32], max_tokens: usize) -> Vec<u32> {
    collect(engine.submit(request(ids.to_vec(), max_tokens)).unwrap()).tokens
}

fn run_together(engine: &EngineHandle, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| engine.submit(request(p.clone(), max_tokens)).unwrap())
        .collect();
    streams.into_iter().map(|s| collect(s).tokens).collect()
}

#[test]
fn batch_invariance_mixed_lengths() {
    let engine = start(1024, 2048, false);
    // Every tile edge of prefill and attention up to a long prompt (one at 1,000 is enough:
    // the prompts are run twice each, and prefill time grows with the square of the length).
    let lens = [1, 3, 7, 16, 17, 33, 64, 100, 128, 200, 333, 500, 1000];
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| prompt(l, i))
        .collect();
    let alone: Vec<Vec<u32>> = prompts.iter().map(|p| run_alone(&engine, p, 8)).collect();
    let together = run_together(&engine, &prompts, 8);
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(
            a,
            t,
            "prompt of {} tokens: alone vs in a batch of {}",
            lens[i],
            lens.len()
        );
    }
}

#[test]
fn chunked_prefill_equals_unchunked() {
    let p = prompt(600, 3);
    let whole = run_alone(&start(256, 2048, false), &p, 8);
    let chunked_engine = start(256, 64, false);
    let chunked = run_alone(&chunked_engine, &p, 8);
    assert_eq!(whole, chunked);
}

#[test]
fn shared_prefix_is_computed_once() {
    let engine = start(256, 2048, true);
    let prefix = prompt(1000, 5);
    let mut first = prefix.clone();
    first.extend(prompt(20, 1));
    let mut second = prefix.clone();
    second.extend(prompt(24, 2));
    collect(engine.submit(request(first.clone(), 2)).unwrap());
    let computed_before = common::engine_metric(&engine, "sluice:prompt_tokens_computed_total");
    let hits_before = common::engine_metric(&engine, "sluice:prefix_cache_hits_total");
    assert_eq!(computed_before, first.len() as f64);
    let out = collect(engine.submit(request(second.clone(), 2)).unwrap());
    let cached = 1000 / 16 * 16;
    assert_eq!(out.usage.cached_tokens, cached);
    let computed =
        common::engine_metric(&engine, "sluice:prompt_tokens_computed_total") - computed_before;
    assert_eq!(computed, (second.len() - cached) as f64);
    let hits = common::engine_metric(&engine, "sluice:prefix_cache_hits_total") - hits_before;
    assert_eq!(hits, cached as f64);
}

/// 12 sequences of 80 prompt and 80 generated tokens want 1,920 slots; the tight cache has
/// 512, so sequences are preempted and recomputed again and again (the suite runs this in
/// the release and the `checked` builds, so it is sized to take seconds, not minutes).
#[test]
fn preemption_under_pressure_keeps_greedy_tokens() {
    let prompts: Vec<Vec<u32>> = (0..12).map(|i| prompt(80, i)).collect();
    let roomy = start(1024, 2048, false);
    let expected = run_together(&roomy, &prompts, 80);
    drop(roomy);
    let tight = start(32, 2048, false);
    let got = run_together(&tight, &prompts, 80);
    for (i, (e, g)) in expected.iter().zip(&got).enumerate() {
        assert_eq!(e, g, "request {i} changed under KV-cache pressure");
    }
    assert!(common::engine_metric(&tight, "sluice:num_preemptions_total") > 0.0);
    common::assert_idle_without_leaks(&tight);
}

/// Seeded sampling on the host: a request draws the same tokens alone and in a batch with
/// other sampled and greedy requests (each sequence has its own generator from its seed), and
/// another seed draws other tokens (the seed is honoured at all).
#[test]
fn seeded_sampling_is_the_same_alone_and_in_a_batch() {
    use sluice::sampling::SamplingParams;
    let engine = start(512, 2048, false);
    let seeded = |salt: usize, seed: u64| GenerateRequest {
        sampling: SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            top_k: 50,
            repetition_penalty: 1.1,
            seed: Some(seed),
            ..SamplingParams::default()
        },
        ..request(prompt(24 + salt, salt), 24)
    };
    let alone = collect(engine.submit(seeded(0, 7)).unwrap()).tokens;
    assert_eq!(alone.len(), 24);
    let streams = vec![
        engine.submit(seeded(1, 8)).unwrap(),
        engine.submit(request(prompt(40, 2), 24)).unwrap(),
        engine.submit(seeded(0, 7)).unwrap(),
        engine.submit(seeded(3, 9)).unwrap(),
    ];
    let together: Vec<Vec<u32>> = streams.into_iter().map(|s| collect(s).tokens).collect();
    assert_eq!(together[2], alone, "a seeded request changed in a batch");
    // Another seed draws another sequence (the seed is honoured at all).
    let other = collect(engine.submit(seeded(0, 70)).unwrap()).tokens;
    assert_ne!(other, alone);
    common::assert_idle_without_leaks(&engine);
}
