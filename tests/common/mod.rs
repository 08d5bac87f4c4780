//! Shared helpers of the integration tests: the default model and the fixtures.
#![allow(dead_code)]

pub mod debian;
pub mod device_sampling;
pub mod gguf_writer;

use std::path::PathBuf;
use std::time::{Duration, Instant};

// The metric helpers are `common/metrics.rs`, compiled once, as a module of `api_support`.
#[allow(unused_imports)]
pub use crate::api_support::{assert_no_leaks, idle, metric, IDLE_WITHIN};

use serde::Deserialize;
use sluice::gguf::GgufFile;
use sluice::kernels::cpu::CpuBackend;
use sluice::model::config::ModelConfig;
use sluice::model::llama::Llama;

/// The engine's metric `name` (see [`metric`]).
pub fn engine_metric(engine: &sluice::engine::EngineHandle, name: &str) -> f64 {
    metric(&engine.metrics.render(), name)
}

/// The leak check: waits (polling, up to [`IDLE_WITHIN`]) for the engine to go idle, then
/// requires every KV block free and no accounting error.
pub fn assert_idle_without_leaks(engine: &sluice::engine::EngineHandle) {
    let start = Instant::now();
    loop {
        let text = engine.metrics.render();
        if idle(&text) {
            break;
        }
        assert!(
            start.elapsed() < IDLE_WITHIN,
            "the engine did not go idle within {IDLE_WITHIN:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // A render reads one gauge after another while the engine may be publishing: taken
    // after one that saw idle, this one sees everything that idle update published.
    assert_no_leaks(&engine.metrics.render());
}

/// The default model's engine with blocks of 16 tokens, up to 64 sequences, and
/// `max_num_batched_tokens` a step.
pub fn start_engine(
    num_blocks: usize,
    max_num_batched_tokens: usize,
    prefix_cache: bool,
) -> sluice::engine::EngineHandle {
    use sluice::engine::EngineConfig;
    use sluice::kv_cache::CacheConfig;
    use sluice::scheduler::SchedulerConfig;
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_batched_tokens,
            max_num_seqs: 64,
            ..SchedulerConfig::default()
        },
        cache: CacheConfig {
            block_size: 16,
            num_blocks,
            enable_prefix_caching: prefix_cache,
            sliding_window: None,
        },
        max_model_len: 8192,
        ..EngineConfig::default()
    };
    let tokenizer =
        std::sync::Arc::new(sluice::tokenizer::Tokenizer::from_gguf(&default_gguf()).unwrap());
    sluice::engine::spawn(default_model(), tokenizer, config).unwrap()
}

/// The logits of every position of `ids`, prefilled as one sequence in one step.
pub fn all_logits(model: &mut Llama<CpuBackend>, ids: &[u32]) -> Vec<Vec<f32>> {
    let out = prefill_all(model, ids, true, false);
    rows(&out.logits, model.config.vocab_size)
}

/// The final-norm hidden state of every position of `ids` (what embeddings are pooled
/// from), prefilled as one sequence in one step.
pub fn all_hidden(model: &mut Llama<CpuBackend>, ids: &[u32]) -> Vec<Vec<f32>> {
    let out = prefill_all(model, ids, false, true);
    rows(&out.hidden, model.config.hidden_size)
}

fn rows(v: &[f32], width: usize) -> Vec<Vec<f32>> {
    v.chunks_exact(width).map(<[f32]>::to_vec).collect()
}

/// `ids` as one sequence in one step, asking for every row's logits and/or hidden state.
fn prefill_all(
    model: &mut Llama<CpuBackend>,
    ids: &[u32],
    logits: bool,
    hidden: bool,
) -> sluice::model::HostOutput {
    use sluice::kernels::{BatchSeq, ForwardBatch};
    const BLOCK_SIZE: usize = 16;
    let n = ids.len();
    let mut kv = model.kv_cache(n.div_ceil(BLOCK_SIZE), BLOCK_SIZE).unwrap();
    let every_row = |on: bool| {
        if on {
            (0..n as u32).collect()
        } else {
            Vec::new()
        }
    };
    let batch = ForwardBatch {
        token_ids: ids.to_vec(),
        positions: (0..n as u32).collect(),
        slot_mapping: (0..n as u32).collect(),
        seqs: vec![BatchSeq {
            query_start: 0,
            query_len: n,
            context_len: n,
            block_table: (0..n.div_ceil(BLOCK_SIZE) as u32).collect(),
            prompt_len: n,
        }],
        logits_rows: every_row(logits),
        hidden_rows: every_row(hidden),
    };
    model.forward_rank(&batch, &mut kv).unwrap()
}

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The default model's file, fetched into the cache on first use.
pub fn default_model_path() -> PathBuf {
    sluice::assets::default_model_path().expect("fetching the default model")
}

pub fn default_gguf() -> GgufFile {
    GgufFile::open(&default_model_path()).expect("opening the default model")
}

pub fn default_model() -> Llama<CpuBackend> {
    default_model_with(sluice::kernels::cpu::CpuNumerics::Fast)
}

/// The default model on a 2-thread CPU backend with the given numerics.
pub fn default_model_with(numerics: sluice::kernels::cpu::CpuNumerics) -> Llama<CpuBackend> {
    let f = default_gguf();
    let config = ModelConfig::from_gguf(&f).unwrap();
    Llama::load(config, &f, CpuBackend::with_numerics(2, numerics)).unwrap()
}

#[derive(Debug, Deserialize)]
pub struct GreedyFixture {
    pub name: String,
    pub chat: bool,
    #[serde(default)]
    pub messages: Vec<serde_json::Value>,
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    /// (Not in `greedy_long.jsonl`.)
    #[serde(default)]
    pub greedy_text: String,
}

pub fn greedy_fixtures() -> Vec<GreedyFixture> {
    read_greedy("greedy.jsonl")
}

/// Prompts of 64 tokens or more, which llama.cpp attends from with its tiled kernel
/// (`tests/fixtures/README.md`, made here).
pub fn greedy_long_fixtures() -> Vec<GreedyFixture> {
    read_greedy("greedy_long.jsonl")
}

fn read_greedy(file: &str) -> Vec<GreedyFixture> {
    std::fs::read_to_string(fixtures_dir().join(file))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[derive(Debug, Deserialize)]
pub struct TeacherForcedPosition {
    pub pos: usize,
    pub next_true: u32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Deserialize)]
pub struct TeacherForced {
    pub ids: Vec<u32>,
    pub positions: Vec<TeacherForcedPosition>,
}

pub fn teacher_forced_fixture() -> TeacherForced {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("teacher_forced.json")).unwrap(),
    )
    .unwrap()
}
