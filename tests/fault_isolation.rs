//! Fault isolation in the engine, with the real default model: a fault injected into one
//! request (markers honoured by an engine handed `FaultInjection`) ends that request with an
//! error, and the requests sharing its steps produce exactly their clean greedy tokens. A
//! panic inside a step fails that step's requests only; the loop goes on, blocks are freed.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use sluice::engine::fault::FaultInjection;
use sluice::engine::{
    self, EngineConfig, EngineErrorKind, EngineHandle, EngineOptions, GenerateRequest, StreamEvent,
};
use sluice::kv_cache::CacheConfig;
use sluice::scheduler::SchedulerConfig;
use sluice::tokenizer::Tokenizer;

const MAX_TOKENS: usize = 8;

fn start() -> (EngineHandle, Arc<Tokenizer>) {
    let faults = FaultInjection::enable().expect("the test build has fault injection");
    start_with(Some(faults))
}

fn start_with(faults: Option<FaultInjection>) -> (EngineHandle, Arc<Tokenizer>) {
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
            sliding_window: None,
        },
        max_model_len: 2048,
        ..EngineConfig::default()
    };
    let options = EngineOptions {
        faults,
        ..EngineOptions::default()
    };
    let engine =
        engine::spawn_with(common::default_model(), tokenizer.clone(), config, options).unwrap();
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
            Some(StreamEvent::SeqFinished { .. } | StreamEvent::Embedding { .. }) => {}
            Some(StreamEvent::Done { .. }) => {
                return Outcome {
                    tokens,
                    error: None,
                }
            }
            Some(StreamEvent::Error(e)) => {
                return Outcome {
                    tokens,
                    error: Some((e.kind(), e.to_string())),
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
    common::assert_idle_without_leaks(&engine);
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
    common::assert_idle_without_leaks(&engine);
    assert!(engine.is_healthy(Duration::from_secs(5)));
    // The loop goes on, and produces the same tokens as before the panic.
    let again = run_together(&engine, &tok, &CLEAN);
    for (a, c) in again.iter().zip(&clean) {
        assert!(a.error.is_none(), "{a:?}");
        assert_eq!(a.tokens, c.tokens);
    }
    common::assert_idle_without_leaks(&engine);
}

/// Without `FaultInjection` (every server a user starts) a marker is just text: every kind
/// of fault, in a prompt, changes nothing.
#[test]
fn markers_do_nothing_without_fault_injection() {
    let (engine, tok) = start_with(None);
    for kind in ["nan", "inf", "token", "panic", "detok", "stop"] {
        let text = format!("Tell me a story. sluice-fault:{kind}@0");
        let out = run_together(&engine, &tok, &[&text]);
        assert!(out[0].error.is_none(), "{kind}: {:?}", out[0]);
        assert_eq!(out[0].tokens.len(), MAX_TOKENS, "{kind}");
    }
    common::assert_idle_without_leaks(&engine);
    assert!(engine.is_healthy(Duration::from_secs(5)));
}

/// Three steps in a row that panic mark the engine unhealthy (`/health` turns 503); one that
/// completes makes it healthy again.
#[test]
fn three_panicking_steps_in_a_row_mark_the_engine_unhealthy() {
    let (engine, tok) = start();
    for i in 0..3 {
        assert!(
            engine.is_healthy(Duration::from_secs(60)),
            "before panic {i}"
        );
        let out = run_together(&engine, &tok, &["Hello sluice-fault:panic@0"]);
        assert!(out[0].error.is_some(), "{:?}", out[0]);
    }
    assert!(!engine.is_healthy(Duration::from_secs(60)));
    let out = run_together(&engine, &tok, &[CLEAN[0]]);
    assert!(out[0].error.is_none(), "{:?}", out[0]);
    assert!(engine.is_healthy(Duration::from_secs(60)));
    common::assert_idle_without_leaks(&engine);
}
