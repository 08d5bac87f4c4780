//! Fault isolation in the engine, with the real default model: a fault injected into one
//! request (feature `fault-injection`, on for this crate's tests) ends that request with an
//! error, and the requests sharing its steps produce exactly their clean greedy tokens. A
//! panic inside a step fails that step's requests only; the loop goes on, blocks are freed.

mod common;

use std::sync::Arc;
use std::time::Duration;

use sluice::engine::{
    self, EngineConfig, EngineErrorKind, EngineHandle, GenerateRequest, StreamEvent,
};
use sluice::kv_cache::CacheConfig;
use sluice::scheduler::SchedulerConfig;
use sluice::tokenizer::Tokenizer;

const MAX_TOKENS: usize = 8;

fn start() -> (EngineHandle, Arc<Tokenizer>) {
    let tokenizer = Arc::new(Tokenizer::from_gguf(&common::default_gguf()).unwrap());
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_seqs: 16,
            ..SchedulerConfig::default()
        },
        cache: CacheConfig {
            block_size: 16,
            num_blocks: 128,
            enable_prefix_caching: false,
        },
        max_model_len: 2048,
        max_waiting: 0,
    };
    let engine = engine::spawn(common::default_model(), tokenizer.clone(), config).unwrap();
    (engine, tokenizer)
}

/// What a request's stream produced: its tokens and, when it failed, the error.
#[derive(Debug)]
struct Outcome {
    tokens: Vec<u32>,
    error: Option<(EngineErrorKind, String)>,
}

fn collect(mut stream: engine::RequestStream) -> Outcome {
    let mut tokens = Vec::new();
    loop {
        match stream.next_blocking() {
            Some(StreamEvent::Token { token_ids, .. }) => tokens.extend(token_ids),
            Some(StreamEvent::SeqFinished { .. }) => {}
            Some(StreamEvent::Done { .. }) => {
                return Outcome {
                    tokens,
                    error: None,
                }
            }
            Some(StreamEvent::Error { kind, message }) => {
                return Outcome {
                    tokens,
                    error: Some((kind, message)),
                }
            }
            None => panic!("stream ended without a terminal event"),
        }
    }
}

/// Submits all prompts back to back (so they share their steps), then collects them.
fn run_together(engine: &EngineHandle, tok: &Tokenizer, texts: &[&str]) -> Vec<Outcome> {
    let streams: Vec<_> = texts
        .iter()
        .map(|t| {
            let ids = tok.encode(t, true).unwrap();
            let req = GenerateRequest {
                ignore_eos: true,
                ..GenerateRequest::greedy(ids, MAX_TOKENS)
            };
            engine.submit(req).unwrap()
        })
        .collect();
    streams.into_iter().map(collect).collect()
}

fn counter(engine: &EngineHandle, name: &str) -> f64 {
    let text = engine.metrics.render();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits for the engine to go idle (it then checks the KV accounting) and asserts that every
/// block is free and no accounting error was counted.
fn assert_no_leak(engine: &EngineHandle) {
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(counter(engine, "sluice:kv_accounting_errors_total"), 0.0);
    assert_eq!(counter(engine, "sluice:kv_cache_usage_perc"), 0.0);
    assert_eq!(counter(engine, "sluice:num_requests_running"), 0.0);
}

const CLEAN: [&str; 2] = [
    "The capital of France is",
    "Write a short poem about the sea and the wind.",
];

#[test]
fn a_fault_in_one_request_leaves_the_others_exact() {
    let (engine, tok) = start();
    let vocab = tok.vocab_size() as u32;
    let clean: Vec<Vec<u32>> = run_together(&engine, &tok, &CLEAN)
        .into_iter()
        .map(|o| {
            assert!(o.error.is_none(), "{o:?}");
            o.tokens
        })
        .collect();
    assert!(clean.iter().all(|t| t.len() == MAX_TOKENS));

    for kind in ["nan", "inf", "token", "detok", "stop"] {
        let faulty = format!("Tell me a story. sluice-fault:{kind}");
        let out = run_together(&engine, &tok, &[CLEAN[0], &faulty, CLEAN[1]]);
        assert_eq!(out[0].tokens, clean[0], "{kind}: first clean request");
        assert_eq!(out[2].tokens, clean[1], "{kind}: second clean request");
        assert!(out[0].error.is_none() && out[2].error.is_none(), "{kind}");
        let (err_kind, message) = out[1]
            .error
            .clone()
            .unwrap_or_else(|| panic!("{kind}: the faulty request did not fail: {:?}", out[1]));
        assert_eq!(err_kind, EngineErrorKind::Internal, "{kind}: {message}");
        // The fault fires at the third token: two were delivered, none after.
        assert_eq!(out[1].tokens.len(), 2, "{kind}: {message}");
        for o in &out {
            assert!(
                o.tokens.iter().all(|&t| t < vocab),
                "{kind}: id out of vocab"
            );
        }
    }
    assert_no_leak(&engine);
    assert!(engine.is_healthy(Duration::from_secs(5)));
}

#[test]
fn a_panic_in_a_step_fails_that_step_and_the_loop_goes_on() {
    let (engine, tok) = start();
    let clean = run_together(&engine, &tok, &CLEAN);
    let out = run_together(
        &engine,
        &tok,
        &[CLEAN[0], "Tell me a story. sluice-fault:panic", CLEAN[1]],
    );
    // The panicking request ends with an internal error, and so does every request that
    // shared the step (their KV state of that step is suspect).
    for o in &out {
        let (kind, message) = o.error.clone().expect("the step's requests fail");
        assert_eq!(kind, EngineErrorKind::Internal, "{message}");
        assert!(message.contains("injected fault"), "{message}");
    }
    assert_eq!(out[1].tokens.len(), 2);
    assert_no_leak(&engine);
    assert!(engine.is_healthy(Duration::from_secs(5)));
    // The loop goes on, and produces the same tokens as before the panic.
    let again = run_together(&engine, &tok, &CLEAN);
    for (a, c) in again.iter().zip(&clean) {
        assert!(a.error.is_none(), "{a:?}");
        assert_eq!(a.tokens, c.tokens);
    }
    assert_no_leak(&engine);
}
