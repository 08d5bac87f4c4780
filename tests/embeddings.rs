//! Embeddings through the engine with the real default model: a pooled request's vector is
//! the model's final-norm hidden states, pooled (last token or mean), whatever the batch, the
//! chunking, the prefix cache or a preemption did to the computation of its prompt.

use crate::common;

use sluice::engine::{
    self, EngineHandle, GenerateRequest, Pooling, PoolingType, StreamEvent, Usage,
};
use sluice::kernels::cpu::matmul::{linear, MatmulScratch};
use sluice::kernels::cpu::pool::ThreadPool;

const LAST: Pooling = Pooling {
    kind: PoolingType::Last,
    normalize: true,
};
const MEAN: Pooling = Pooling {
    kind: PoolingType::Mean,
    normalize: true,
};

fn start(num_blocks: usize, max_num_batched_tokens: usize) -> EngineHandle {
    common::start_engine(num_blocks, max_num_batched_tokens, true)
}

/// `len` real tokens of the fixture text, offset by `salt`.
fn prompt(len: usize, salt: usize) -> Vec<u32> {
    let text = common::teacher_forced_fixture().ids;
    (0..len)
        .map(|i| text[(i + salt * 7) % text.len()])
        .collect()
}

/// The embedding and usage of a pooled request: one `Embedding`, its `SeqFinished` (stop),
/// `Done`, and no token.
fn embedding_of(mut stream: engine::RequestStream) -> (Vec<f32>, Usage) {
    let mut embedding = None;
    loop {
        match stream.next_blocking() {
            Some(StreamEvent::Embedding {
                index: 0,
                embedding: e,
            }) => embedding = Some(e),
            Some(StreamEvent::SeqFinished {
                index: 0, reason, ..
            }) => {
                assert_eq!(reason.as_str(), "stop");
                assert!(embedding.is_some(), "SeqFinished before the embedding");
            }
            Some(StreamEvent::Done { usage, .. }) => {
                return (embedding.expect("no embedding before Done"), usage)
            }
            Some(StreamEvent::Error(e)) => panic!("request failed: {e}"),
            other => panic!("unexpected event for a pooled request: {other:?}"),
        }
    }
}

fn generate(ids: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        ignore_eos: true,
        ..GenerateRequest::greedy(ids, max_tokens)
    }
}

/// Tokens of a generation request, read to its end.
fn tokens_of(mut stream: engine::RequestStream) -> Vec<u32> {
    let mut tokens = Vec::new();
    loop {
        match stream.next_blocking() {
            Some(StreamEvent::Token { token_ids, .. }) => tokens.extend(token_ids),
            Some(StreamEvent::Done { .. }) => return tokens,
            Some(StreamEvent::Error(e)) => panic!("request failed: {e}"),
            Some(_) => {}
            None => panic!("stream ended without a terminal event"),
        }
    }
}

/// Pooling done here, plainly, from every position's hidden state.
fn reference(hidden: &[Vec<f32>], pooling: Pooling) -> Vec<f32> {
    let width = hidden[0].len();
    let mut v: Vec<f64> = match pooling.kind {
        PoolingType::Last => hidden[hidden.len() - 1].iter().map(|&x| x as f64).collect(),
        PoolingType::Mean => (0..width)
            .map(|j| hidden.iter().map(|row| row[j] as f64).sum::<f64>() / hidden.len() as f64)
            .collect(),
    };
    if pooling.normalize {
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v.into_iter().map(|x| x as f32).collect()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-5 * w.abs().max(1.0);
        assert!((g - w).abs() <= tol, "{what}: [{i}] {g} vs {w}");
    }
}

/// Reference hidden states of each prompt, from a one-step prefill of the whole prompt.
fn hidden_states(prompts: &[Vec<u32>]) -> Vec<Vec<Vec<f32>>> {
    let mut model = common::default_model();
    prompts
        .iter()
        .map(|p| common::all_hidden(&mut model, p))
        .collect()
}

#[test]
fn pooled_embeddings_are_the_models_hidden_states_in_any_batch() {
    let prompts = vec![prompt(5, 1), prompt(63, 2), prompt(150, 3)];
    let hidden = hidden_states(&prompts);
    assert_eq!(hidden[2].len(), 150);
    // 64 tokens a step: the 150-token prompt is computed in chunks, beside decodes.
    let engine = start(1024, 64);
    let poolings = [
        LAST,
        MEAN,
        Pooling {
            normalize: false,
            ..LAST
        },
        Pooling {
            normalize: false,
            ..MEAN
        },
    ];
    let generations: Vec<_> = (0..3)
        .map(|i| engine.submit(generate(prompt(100, 10 + i), 24)).unwrap())
        .collect();
    let mut pooled = Vec::new();
    for (p, ids) in prompts.iter().enumerate() {
        for pooling in poolings {
            let req = GenerateRequest::embedding(ids.clone(), pooling);
            pooled.push((p, pooling, engine.submit(req).unwrap()));
        }
    }
    for (p, pooling, stream) in pooled {
        let (got, usage) = embedding_of(stream);
        let what = format!("prompt {p} ({} tokens), {pooling:?}", prompts[p].len());
        assert_close(&got, &reference(&hidden[p], pooling), &what);
        assert_eq!(usage.prompt_tokens, prompts[p].len(), "{what}");
        assert_eq!(usage.completion_tokens, 0, "{what}");
        if pooling.normalize {
            let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{what}: norm {norm}");
        }
    }
    for g in generations {
        assert_eq!(tokens_of(g).len(), 24);
    }
    common::assert_idle_without_leaks(&engine);
}

#[test]
fn last_pooling_starts_from_the_prefix_cache_mean_pooling_computes_every_position() {
    let ids = prompt(150, 4);
    let hidden = hidden_states(std::slice::from_ref(&ids));
    let engine = start(1024, 512);
    // A generation caches the prompt's full blocks.
    tokens_of(engine.submit(generate(ids.clone(), 4)).unwrap());
    let (last, usage) = embedding_of(
        engine
            .submit(GenerateRequest::embedding(ids.clone(), LAST))
            .unwrap(),
    );
    assert_eq!(
        usage.cached_tokens, 144,
        "last pooling reads the cached prefix"
    );
    assert_close(&last, &reference(&hidden[0], LAST), "last, from the cache");
    let (mean, usage) = embedding_of(
        engine
            .submit(GenerateRequest::embedding(ids, MEAN))
            .unwrap(),
    );
    assert_eq!(usage.cached_tokens, 0, "mean pooling needs every position");
    assert_close(
        &mean,
        &reference(&hidden[0], MEAN),
        "mean, with a warm cache",
    );
    common::assert_idle_without_leaks(&engine);
}

#[test]
fn a_preempted_embedding_pools_each_position_once() {
    let ids = prompt(150, 5);
    let hidden = hidden_states(std::slice::from_ref(&ids));
    // 24 blocks of 16. Four generations of 60-token prompts hold 16 blocks and need a fifth
    // each after 4 tokens, a sixth after 20, while the embedding (priority 1, so preempted
    // first) computes its prompt 28 tokens a step: it is preempted mid-prompt, and computed
    // again from position 0 in chunks cut elsewhere.
    let engine = start(24, 32);
    let generations: Vec<_> = (0..4)
        .map(|i| engine.submit(generate(prompt(60, 20 + i), 60)).unwrap())
        .collect();
    let mut streams = Vec::new();
    for pooling in [MEAN, LAST] {
        let req = GenerateRequest {
            priority: 1,
            ..GenerateRequest::embedding(ids.clone(), pooling)
        };
        streams.push((pooling, engine.submit(req).unwrap()));
    }
    for (pooling, s) in streams {
        let (got, _) = embedding_of(s);
        assert_close(
            &got,
            &reference(&hidden[0], pooling),
            &format!("{pooling:?}"),
        );
    }
    for g in generations {
        assert_eq!(tokens_of(g).len(), 60);
    }
    let preemptions = common::engine_metric(&engine, "sluice:num_preemptions_total");
    assert!(
        preemptions > 0.0,
        "the cache was large enough: no preemption"
    );
    common::assert_idle_without_leaks(&engine);
}

#[test]
fn the_lm_head_of_a_last_token_embedding_gives_the_greedy_token() {
    let f = common::default_gguf();
    let head = f
        .tensor("output.weight")
        .or_else(|_| f.tensor("token_embd.weight"))
        .unwrap();
    let engine = start(1024, 512);
    let raw = Pooling {
        normalize: false,
        ..LAST
    };
    let pool = ThreadPool::new(2);
    let mut scratch = MatmulScratch::new();
    for salt in 0..4 {
        let ids = prompt(20 + 17 * salt, 30 + salt);
        let greedy = tokens_of(engine.submit(generate(ids.clone(), 1)).unwrap());
        let (hidden, _) =
            embedding_of(engine.submit(GenerateRequest::embedding(ids, raw)).unwrap());
        let mut logits = vec![0.0; head.rows];
        linear(&pool, &hidden, 1, &[&head], &mut logits, &mut scratch);
        let argmax = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap() as u32;
        assert_eq!(argmax, greedy[0], "prompt {salt}");
    }
    common::assert_idle_without_leaks(&engine);
}

#[test]
fn an_embedding_dropped_mid_prompt_frees_its_blocks() {
    let engine = start(1024, 32);
    for pooling in [LAST, MEAN] {
        let stream = engine
            .submit(GenerateRequest::embedding(prompt(300, 6), pooling))
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
        drop(stream);
    }
    common::assert_idle_without_leaks(&engine);
    // The engine serves on.
    let (v, _) = embedding_of(
        engine
            .submit(GenerateRequest::embedding(prompt(10, 7), LAST))
            .unwrap(),
    );
    assert_eq!(v.len(), 576);
}
