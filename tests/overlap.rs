//! The overlapped engine loop (`StepOverlap::OnWorkerThread`: the forward pass on a worker
//! thread, the next step planned while one runs, decodes one step ahead) gives the same
//! tokens as the plain loop: in batches, under stop strings, stop ids and `max_tokens`,
//! under KV-cache pressure (preemption), and with aborts, after which every block is free.

use crate::common;
use crate::common::device_sampling;

use std::sync::Arc;

use sluice::engine::{
    self, EngineConfig, EngineHandle, EngineOptions, GenerateRequest, StepOverlap, StreamEvent,
};
use sluice::kernels::cpu::CpuBackend;
use sluice::kernels::Backend;
use sluice::kv_cache::CacheConfig;
use sluice::model::config::ModelConfig;
use sluice::model::llama::Llama;
use sluice::scheduler::SchedulerConfig;
use sluice::tokenizer::Tokenizer;

fn start<B: Backend>(backend: B, num_blocks: usize, overlap: StepOverlap) -> EngineHandle {
    let f = common::default_gguf();
    let model = Llama::load(ModelConfig::from_gguf(&f).unwrap(), &f, backend).unwrap();
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_batched_tokens: 256,
            max_num_seqs: 32,
            ..SchedulerConfig::default()
        },
        cache: CacheConfig {
            block_size: 16,
            num_blocks,
            enable_prefix_caching: true,
            sliding_window: None,
        },
        max_model_len: 2048,
        ..EngineConfig::default()
    };
    let tokenizer = Arc::new(Tokenizer::from_gguf(&f).unwrap());
    engine::spawn_with(
        model,
        tokenizer,
        config,
        EngineOptions {
            overlap,
            ..EngineOptions::default()
        },
    )
    .unwrap()
}

fn cpu(num_blocks: usize, overlap: StepOverlap) -> EngineHandle {
    start(CpuBackend::new(2), num_blocks, overlap)
}

fn prompt(len: usize, salt: usize) -> Vec<u32> {
    let text = common::teacher_forced_fixture().ids;
    (0..len)
        .map(|i| text[(i + salt * 7) % text.len()])
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    ids: Vec<u32>,
    text: String,
    completion_tokens: usize,
}

fn collect(mut stream: engine::RequestStream) -> Outcome {
    let (mut ids, mut text) = (Vec::new(), String::new());
    loop {
        match stream.next_blocking() {
            Some(StreamEvent::Token {
                token_ids, text: t, ..
            }) => {
                ids.extend(token_ids);
                text.push_str(&t);
            }
            Some(StreamEvent::SeqFinished { .. } | StreamEvent::Embedding { .. }) => {}
            Some(StreamEvent::Done { usage, .. }) => {
                return Outcome {
                    ids,
                    text,
                    completion_tokens: usage.completion_tokens,
                }
            }
            Some(StreamEvent::Error(e)) => panic!("request failed: {e}"),
            None => panic!("stream ended without a terminal event"),
        }
    }
}

fn run(engine: &EngineHandle, requests: &[GenerateRequest]) -> Vec<Outcome> {
    let streams: Vec<_> = requests
        .iter()
        .map(|r| engine.submit(r.clone()).unwrap())
        .collect();
    streams.into_iter().map(collect).collect()
}

fn greedy(ids: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        ignore_eos: true,
        ..GenerateRequest::greedy(ids, max_tokens)
    }
}

#[test]
fn batches_stops_and_lengths_match_the_plain_loop() {
    let lens = [1, 5, 17, 33, 64, 100, 150, 300];
    let mut requests: Vec<GenerateRequest> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| greedy(prompt(l, i), 4 + 3 * i))
        .collect();
    let plain = cpu(512, StepOverlap::Off);
    let want = run(&plain, &requests);
    // Stops taken from the plain loop's own outputs: a stop id at the third token, and a
    // stop string from the middle of a text.
    let mut stop_id = requests[5].clone();
    stop_id.stop_token_ids = vec![want[5].ids[2]];
    let mut stop_text = greedy(prompt(60, 11), 20);
    let base = run(&plain, std::slice::from_ref(&stop_text));
    let chars: Vec<char> = base[0].text.chars().collect();
    stop_text.stop = vec![chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect()];
    requests.push(stop_id);
    requests.push(stop_text);
    let want = run(&plain, &requests);
    common::assert_idle_without_leaks(&plain);
    drop(plain);
    let overlapped = cpu(512, StepOverlap::OnWorkerThread);
    let got = run(&overlapped, &requests);
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w, g, "request {i}");
    }
    assert!(want[8].ids.len() <= 3 && want[9].completion_tokens < 20);
    // The same requests alone give the same tokens (batch invariance with the overlap).
    for (i, r) in requests.iter().enumerate().step_by(3) {
        assert_eq!(
            run(&overlapped, std::slice::from_ref(r))[0],
            want[i],
            "{i} alone"
        );
    }
    common::assert_idle_without_leaks(&overlapped);
}

#[test]
fn preemption_and_aborts_under_the_overlap() {
    // 12 x 112 slots wanted, 384 in the tight cache.
    let prompts: Vec<GenerateRequest> = (0..12).map(|i| greedy(prompt(64, i), 48)).collect();
    let want = run(&cpu(1024, StepOverlap::Off), &prompts);
    let tight = cpu(24, StepOverlap::OnWorkerThread);
    let got = run(&tight, &prompts);
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w, g, "request {i} changed under KV-cache pressure");
    }
    assert!(common::engine_metric(&tight, "sluice:num_preemptions_total") > 0.0);
    // Aborts while steps are in flight: half the streams dropped after their first token.
    let mut streams: Vec<_> = prompts
        .iter()
        .map(|r| tight.submit(r.clone()).unwrap())
        .collect();
    for s in streams.iter_mut().step_by(2) {
        while !matches!(s.next_blocking(), Some(StreamEvent::Token { .. }) | None) {}
    }
    let kept: Vec<_> = streams
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(i, s)| (i, collect(s)))
        .collect();
    for (i, o) in kept {
        assert_eq!(o, want[i], "request {i} next to aborted ones");
    }
    common::assert_idle_without_leaks(&tight);
}

#[test]
fn device_sampling_under_the_overlap_matches_the_plain_loop() {
    use device_sampling::DeviceSampling;
    let mut requests: Vec<GenerateRequest> = (0..6).map(|i| greedy(prompt(30, i), 10)).collect();
    for (i, r) in requests.iter_mut().enumerate().skip(3) {
        r.sampling.temperature = 0.8;
        r.sampling.seed = Some(i as u64);
        r.sampling.presence_penalty = 0.5;
        r.min_tokens = 4;
    }
    let want = run(
        &start(DeviceSampling(CpuBackend::new(2)), 256, StepOverlap::Off),
        &requests,
    );
    let overlapped = start(
        DeviceSampling(CpuBackend::new(2)),
        256,
        StepOverlap::OnWorkerThread,
    );
    assert_eq!(run(&overlapped, &requests), want);
    common::assert_idle_without_leaks(&overlapped);
}

/// Each sequence's (ids, text) of a request, by index (an `n > 1` request's sequences
/// interleave differently when preemption pauses one of them).
fn run_by_seq(engine: &EngineHandle, requests: &[GenerateRequest]) -> Vec<Vec<(Vec<u32>, String)>> {
    let streams: Vec<_> = requests
        .iter()
        .map(|r| (r.n, engine.submit(r.clone()).unwrap()))
        .collect();
    streams
        .into_iter()
        .map(|(n, mut stream)| {
            let mut seqs = vec![(Vec::new(), String::new()); n];
            loop {
                match stream.next_blocking() {
                    Some(StreamEvent::Token {
                        index,
                        token_ids,
                        text,
                        ..
                    }) => {
                        seqs[index].0.extend(token_ids);
                        seqs[index].1.push_str(&text);
                    }
                    Some(StreamEvent::SeqFinished { .. } | StreamEvent::Embedding { .. }) => {}
                    Some(StreamEvent::Done { .. }) => return seqs,
                    other => panic!("unexpected event {other:?}"),
                }
            }
        })
        .collect()
}

/// Constrained sequences finish a step early (the grammar forces EOS): their run-ahead token
/// is dropped without reaching the matcher, and preemption keeps the matcher with the
/// generated tokens. Host and device sampling, each against its own plain loop.
#[test]
fn constrained_outputs_under_the_overlap_and_preemption_match_the_plain_loop() {
    use device_sampling::DeviceSampling;
    use sluice::sampling::{ConstraintCompiler, ConstraintSpec};
    let f = common::default_gguf();
    let tokenizer = Arc::new(Tokenizer::from_gguf(&f).unwrap());
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "word": {"type": "string", "maxLength": 8},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
            "ok": {"type": "boolean"}
        },
        "required": ["word", "n", "ok"],
        "additionalProperties": false
    });
    let constraint = ConstraintCompiler::new(tokenizer)
        .compile(&ConstraintSpec::JsonSchema(schema))
        .unwrap();
    // Outputs are at most ~25 tokens (the schema's bounds); 9 sequences of 140 tokens need
    // twice the 40 blocks of the tight engine.
    let requests: Vec<GenerateRequest> = (0..6)
        .map(|i| {
            let mut r = GenerateRequest::greedy(prompt(100, i), 40);
            r.constraint = Some(constraint.clone());
            if i % 2 == 1 {
                r.n = 2;
                r.sampling.temperature = 0.9;
                r.sampling.seed = Some(i as u64);
                r.sampling.frequency_penalty = 0.5;
            }
            r
        })
        .collect();
    let check = |outcomes: &[Vec<(Vec<u32>, String)>]| {
        for (_, text) in outcomes.iter().flatten() {
            let v: serde_json::Value =
                serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
            assert!(v["ok"].is_boolean() && v["n"].as_u64().is_some_and(|n| n <= 99));
        }
    };
    let want = run_by_seq(&cpu(1024, StepOverlap::Off), &requests);
    check(&want);
    let tight = cpu(40, StepOverlap::OnWorkerThread);
    assert_eq!(run_by_seq(&tight, &requests), want);
    assert!(common::engine_metric(&tight, "sluice:num_preemptions_total") > 0.0);
    common::assert_idle_without_leaks(&tight);
    let device = |overlap| start(DeviceSampling(CpuBackend::new(2)), 256, overlap);
    let want = run_by_seq(&device(StepOverlap::Off), &requests);
    check(&want);
    assert_eq!(
        run_by_seq(&device(StepOverlap::OnWorkerThread), &requests),
        want
    );
}
