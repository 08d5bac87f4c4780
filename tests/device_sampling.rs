//! The engine's device-sampling path (a backend that samples where its logits are; only ids
//! and asked-for logprobs come back), run on the CPU with `DeviceSampling`: greedy tokens and
//! logprobs equal the host sampler's, and seeded draws replay whatever shares the batch.

use crate::common;
use crate::common::device_sampling;

use std::sync::Arc;

use device_sampling::DeviceSampling;
use sluice::engine::{self, EngineConfig, EngineHandle, GenerateRequest, StreamEvent};
use sluice::kernels::cpu::CpuBackend;
use sluice::kernels::Backend;
use sluice::kv_cache::CacheConfig;
use sluice::model::config::ModelConfig;
use sluice::model::llama::Llama;
use sluice::sampling::SamplingParams;
use sluice::scheduler::SchedulerConfig;
use sluice::tokenizer::Tokenizer;

fn config() -> EngineConfig {
    EngineConfig {
        scheduler: SchedulerConfig {
            max_num_batched_tokens: 512,
            max_num_seqs: 16,
            ..SchedulerConfig::default()
        },
        cache: CacheConfig {
            block_size: 16,
            num_blocks: 256,
            enable_prefix_caching: false,
            sliding_window: None,
        },
        max_model_len: 2048,
        ..EngineConfig::default()
    }
}

fn start<B: Backend>(backend: B) -> EngineHandle {
    let f = common::default_gguf();
    let model_config = ModelConfig::from_gguf(&f).unwrap();
    let model = Llama::load(model_config, &f, backend).unwrap();
    let tokenizer = Arc::new(Tokenizer::from_gguf(&f).unwrap());
    engine::spawn(model, tokenizer, config()).unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    common::greedy_fixtures()
        .into_iter()
        .take(6)
        .map(|f| f.prompt_ids)
        .collect()
}

/// Tokens and their (logprob, top logprobs) per choice of one request.
type Choice = Vec<(u32, f32, Vec<(u32, f32)>)>;

fn collect(mut stream: engine::RequestStream) -> Vec<Choice> {
    let mut choices: Vec<Choice> = Vec::new();
    loop {
        match stream.next_blocking() {
            Some(StreamEvent::Token {
                index,
                token_ids,
                logprobs,
                ..
            }) => {
                if choices.len() <= index {
                    choices.resize(index + 1, Vec::new());
                }
                for (i, id) in token_ids.into_iter().enumerate() {
                    let (lp, top) = logprobs
                        .get(i)
                        .map_or((0.0, Vec::new()), |l| (l.logprob, l.top.clone()));
                    choices[index].push((id, lp, top));
                }
            }
            Some(StreamEvent::SeqFinished { .. } | StreamEvent::Embedding { .. }) => {}
            Some(StreamEvent::Done { .. }) => return choices,
            Some(StreamEvent::Error(e)) => panic!("request failed: {e}"),
            None => panic!("stream ended without a terminal event"),
        }
    }
}

fn run_together(engine: &EngineHandle, requests: Vec<GenerateRequest>) -> Vec<Vec<Choice>> {
    let streams: Vec<_> = requests
        .into_iter()
        .map(|r| engine.submit(r).unwrap())
        .collect();
    streams.into_iter().map(collect).collect()
}

fn greedy(ids: Vec<u32>, logprobs: Option<usize>) -> GenerateRequest {
    let mut r = GenerateRequest::greedy(ids, 12);
    r.ignore_eos = true;
    r.sampling.logprobs = logprobs;
    r
}

fn seeded(ids: Vec<u32>, seed: u64, n: usize) -> GenerateRequest {
    let mut r = GenerateRequest::greedy(ids, 12);
    r.ignore_eos = true;
    r.n = n;
    r.sampling = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 40,
        repetition_penalty: 1.1,
        seed: Some(seed),
        ..SamplingParams::default()
    };
    r
}

#[test]
fn greedy_tokens_and_logprobs_match_the_host_sampler() {
    let host = start(CpuBackend::new(2));
    let device = start(DeviceSampling(CpuBackend::new(2)));
    let reqs = || prompts().into_iter().map(|p| greedy(p, Some(3))).collect();
    let want = run_together(&host, reqs());
    let got = run_together(&device, reqs());
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        let (w, g) = (&w[0], &g[0]);
        let ids = |c: &Choice| c.iter().map(|t| t.0).collect::<Vec<_>>();
        assert_eq!(ids(w), ids(g), "prompt {i}: greedy ids");
        for (a, b) in w.iter().zip(g) {
            assert!(
                (a.1 - b.1).abs() < 1e-4,
                "prompt {i}: logprob {} vs {}",
                a.1,
                b.1
            );
            assert_eq!(a.2.len(), 3);
            assert_eq!(
                a.2.iter().map(|t| t.0).collect::<Vec<_>>(),
                b.2.iter().map(|t| t.0).collect::<Vec<_>>(),
                "prompt {i}: top logprob ids"
            );
        }
    }
}

#[test]
fn seeded_draws_replay_alone_and_in_a_batch() {
    let device = start(DeviceSampling(CpuBackend::new(2)));
    let p = prompts();
    let alone = run_together(&device, vec![seeded(p[0].clone(), 7, 2)]);
    let mut batch: Vec<GenerateRequest> = p[1..]
        .iter()
        .enumerate()
        .map(|(i, q)| seeded(q.clone(), i as u64, 1))
        .collect();
    batch.insert(2, seeded(p[0].clone(), 7, 2));
    let together = run_together(&device, batch);
    let ids = |c: &Choice| c.iter().map(|t| t.0).collect::<Vec<_>>();
    assert_eq!(ids(&alone[0][0]), ids(&together[2][0]));
    assert_eq!(ids(&alone[0][1]), ids(&together[2][1]));
    // The two choices of one seed are different streams.
    assert_ne!(ids(&alone[0][0]), ids(&alone[0][1]));
    assert_eq!(alone[0][0].len(), 12);
}

/// On the device-sampling path too, non-finite logits end their own request alone: a request
/// whose raw logits the test backend poisons (NaN, or one +inf) fails with an error, and the
/// requests sharing its steps produce exactly their tokens from a run without it.
#[test]
fn non_finite_logits_end_only_their_request() {
    let device = start(DeviceSampling(CpuBackend::new(2)));
    let p = prompts();
    let clean = run_together(
        &device,
        vec![greedy(p[0].clone(), None), greedy(p[2].clone(), None)],
    );
    for poison in [device_sampling::POISON_NAN, device_sampling::POISON_INF] {
        let mut bad = greedy(p[1].clone(), None);
        bad.sampling.logit_bias = vec![(poison, 0.0)];
        let streams = vec![
            device.submit(greedy(p[0].clone(), None)).unwrap(),
            device.submit(bad).unwrap(),
            device.submit(greedy(p[2].clone(), None)).unwrap(),
        ];
        let mut streams = streams.into_iter();
        let first = collect(streams.next().unwrap());
        let mut bad_stream = streams.next().unwrap();
        let failed = loop {
            match bad_stream.next_blocking() {
                Some(StreamEvent::Error(e)) => break e.to_string(),
                Some(StreamEvent::Done { .. }) | None => {
                    panic!("{poison}: the request did not fail")
                }
                Some(_) => {}
            }
        };
        assert!(failed.contains("non-finite"), "{poison}: {failed}");
        let third = collect(streams.next().unwrap());
        assert_eq!(first, clean[0], "{poison}: the first clean request changed");
        assert_eq!(
            third, clean[1],
            "{poison}: the second clean request changed"
        );
    }
    common::assert_idle_without_leaks(&device);
}
