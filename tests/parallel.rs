//! Tensor and pipeline parallelism on CPU ranks against one rank, with the default model and
//! the fixture prompts: in the default (gather) mode the same greedy tokens and the same
//! logits bit for bit, as `docs/parallelism.md` claims; the all-reduce mode within its
//! documented bound.
//!
//! All prompts run as one batch (prefill, then one decode token per sequence per step);
//! batch invariance makes that the same as running them one by one.

use crate::common;

use sluice::cli::cpu_ranks::load_cpu_ranks;
use sluice::kernels::cpu::CpuBackend;
use sluice::kernels::{BatchSeq, ForwardBatch};
use sluice::model::config::ModelConfig;
use sluice::model::rank_group::{RankGroup, StepInput};
use sluice::parallel::{ParallelConfig, TpMode};

const BLOCK_SIZE: usize = 16;
const NEW_TOKENS: usize = 20;
/// The all-reduce mode's documented bound on |Δlogit| against one rank, on the same context
/// (`docs/parallelism.md`; measured 2.03 over the 20 steps of the 12 fixture prompts).
const ALL_REDUCE_MAX_DIFF: f32 = 2.5;
/// Where its greedy tokens part from one rank's, one rank's top two were within this (a
/// near-tie; measured at most 0.25).
const ALL_REDUCE_PART_MARGIN: f32 = 0.3;
/// Sequences of the 12 fixture prompts whose 20 greedy tokens the all-reduce mode keeps
/// (measured 6 of 12 under the raw AVX2 matmuls, 5 under the packed ones that AVX2 and
/// AVX-512 CPUs now share; past a near-tie the count is chance, the two bounds above are not).
const ALL_REDUCE_MIN_SAME: usize = 4;

fn group(tp: usize, pp: usize, threads: usize, mode: TpMode) -> RankGroup<CpuBackend> {
    let f = common::default_gguf();
    let config = ModelConfig::from_gguf(&f).unwrap();
    let cfg = ParallelConfig {
        tp_size: tp,
        pp_size: pp,
        tp_mode: mode,
    };
    let ranks = load_cpu_ranks(&config, &f, cfg, threads).unwrap();
    let prompts = common::greedy_fixtures();
    let longest = prompts.iter().map(|p| p.prompt_ids.len()).max().unwrap();
    let blocks_per_seq = (longest + NEW_TOKENS).div_ceil(BLOCK_SIZE);
    RankGroup::start(ranks, blocks_per_seq * prompts.len(), BLOCK_SIZE).unwrap()
}

/// The sequences' state between steps.
struct Seqs {
    blocks_per_seq: usize,
    /// Tokens in the cache per sequence.
    done: Vec<usize>,
    pending: Vec<Vec<u32>>,
    out: Vec<Vec<u32>>,
}

impl Seqs {
    fn new(prompts: Vec<Vec<u32>>) -> Self {
        let longest = prompts.iter().map(Vec::len).max().unwrap();
        Self {
            blocks_per_seq: (longest + NEW_TOKENS).div_ceil(BLOCK_SIZE),
            done: vec![0; prompts.len()],
            out: vec![Vec::new(); prompts.len()],
            pending: prompts,
        }
    }

    /// The batch of sequences `which`, each with its pending tokens.
    fn batch(&self, which: &[usize]) -> ForwardBatch {
        let mut b = ForwardBatch::default();
        for &i in which {
            let (done, n) = (self.done[i], self.pending[i].len());
            let table: Vec<u32> = (0..self.blocks_per_seq)
                .map(|k| (i * self.blocks_per_seq + k) as u32)
                .collect();
            let query_start = b.token_ids.len();
            b.token_ids.extend_from_slice(&self.pending[i]);
            for p in done..done + n {
                b.positions.push(p as u32);
                b.slot_mapping
                    .push(table[p / BLOCK_SIZE] * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32);
            }
            b.logits_rows.push((b.token_ids.len() - 1) as u32);
            b.seqs.push(BatchSeq {
                query_start,
                query_len: n,
                context_len: done + n,
                block_table: table,
                prompt_len: 0,
            });
        }
        b
    }

    /// Takes the greedy token of each sequence in `which` from its row of `logits`.
    fn advance(&mut self, which: &[usize], logits: &[f32], vocab: usize) {
        assert_eq!(logits.len(), which.len() * vocab);
        for (&i, row) in which.iter().zip(logits.chunks_exact(vocab)) {
            let next = argmax(row);
            self.done[i] += self.pending[i].len();
            self.pending[i] = vec![next];
            self.out[i].push(next);
        }
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn prompts() -> Vec<Vec<u32>> {
    common::greedy_fixtures()
        .into_iter()
        .map(|f| f.prompt_ids)
        .collect()
}

/// Greedy decoding of every prompt at once; returns the tokens and each step's logits.
fn greedy_all(g: &mut RankGroup<CpuBackend>) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
    let vocab = g.lead().config.vocab_size;
    let mut seqs = Seqs::new(prompts());
    let all: Vec<usize> = (0..seqs.pending.len()).collect();
    let mut steps = Vec::new();
    for _ in 0..NEW_TOKENS {
        let logits = g.run(&seqs.batch(&all), &[]).unwrap();
        seqs.advance(&all, &logits, vocab);
        steps.push(logits);
    }
    (seqs.out, steps)
}

/// Logit values whose bits differ between two runs of every step.
fn bits_differing(a: &[Vec<f32>], b: &[Vec<f32>]) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter()
                .zip(y)
                .filter(|(p, q)| p.to_bits() != q.to_bits())
                .count()
        })
        .sum()
}

#[test]
fn tp_pp_and_both_match_one_rank_bit_for_bit() {
    let (ref_tokens, ref_logits) = greedy_all(&mut group(1, 1, 2, TpMode::Gather));
    let mut report = String::new();
    let mut failed = false;
    for (tp, pp) in [(2, 1), (3, 1), (1, 2), (2, 2)] {
        let (tokens, logits) = greedy_all(&mut group(tp, pp, tp * pp, TpMode::Gather));
        let differing = bits_differing(&ref_logits, &logits);
        let same = tokens == ref_tokens;
        report += &format!("TP={tp} PP={pp}: same tokens {same}, logits differing {differing}\n");
        failed |= !same || differing > 0;
    }
    eprintln!("{report}");
    assert!(!failed, "{report}");
}

/// The all-reduce mode is not bit-exact: its partial sums round differently, and the 8-bit
/// activation quantization of the next matmul amplifies that (a last-bit change that moves a
/// value across a rounding boundary changes its 8-bit code by one). Held to what the docs
/// state: on the same context (every step until a sequence's tokens part) its logits are
/// within `ALL_REDUCE_MAX_DIFF` of one rank's, tokens part only at one rank's near-ties
/// (`ALL_REDUCE_PART_MARGIN`), and at least `ALL_REDUCE_MIN_SAME` of the 12 sequences keep
/// all 20 tokens.
#[test]
fn all_reduce_mode_stays_within_its_documented_bound() {
    let (ref_tokens, ref_logits) = greedy_all(&mut group(1, 1, 2, TpMode::Gather));
    let (tokens, logits) = greedy_all(&mut group(2, 1, 2, TpMode::AllReduce));
    let vocab = ref_logits[0].len() / ref_tokens.len();
    let mut worst = 0.0f32;
    let mut report = String::new();
    for (i, (ours, theirs)) in tokens.iter().zip(&ref_tokens).enumerate() {
        // Steps 0..=part ran on the same context (the token sampled at `part` differs).
        let part = ours
            .iter()
            .zip(theirs)
            .position(|(a, b)| a != b)
            .unwrap_or(NEW_TOKENS - 1);
        for step in 0..=part {
            let row = |l: &[Vec<f32>]| l[step][i * vocab..(i + 1) * vocab].to_vec();
            let (a, b) = (row(&logits), row(&ref_logits));
            let diff = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            worst = worst.max(diff);
            if step == part && ours != theirs {
                let mut sorted = b.clone();
                sorted.sort_by(|x, y| y.total_cmp(x));
                let margin = sorted[0] - sorted[1];
                report +=
                    &format!("seq {i}: parts at token {part}, one rank's margin {margin:.3}\n");
                assert!(
                    margin < ALL_REDUCE_PART_MARGIN,
                    "seq {i} parts at token {part} where one rank's margin is {margin}"
                );
            }
        }
    }
    let same = tokens
        .iter()
        .zip(&ref_tokens)
        .filter(|(a, b)| a == b)
        .count();
    eprintln!(
        "all-reduce TP=2: max |Δlogit| on the same context {worst:.3}; {same}/{} sequences \
         with the same {NEW_TOKENS} greedy tokens\n{report}",
        tokens.len()
    );
    assert!(
        worst <= ALL_REDUCE_MAX_DIFF,
        "logits differ by {worst} on the same context"
    );
    assert!(same >= ALL_REDUCE_MIN_SAME, "only {same} sequences agree");
}

#[test]
fn pipeline_keeps_two_micro_batches_in_flight() {
    let vocab;
    let reference = {
        let mut g = group(1, 1, 2, TpMode::Gather);
        vocab = g.lead().config.vocab_size;
        let mut seqs = Seqs::new(prompts());
        let all: Vec<usize> = (0..seqs.pending.len()).collect();
        for _ in 0..4 {
            let logits = g.run(&seqs.batch(&all), &[]).unwrap();
            seqs.advance(&all, &logits, vocab);
        }
        seqs.out
    };
    let mut g = group(1, 2, 2, TpMode::Gather);
    assert_eq!(g.max_in_flight(), 2);
    let mut seqs = Seqs::new(prompts());
    let n = seqs.pending.len();
    let (a, b): (Vec<usize>, Vec<usize>) = (0..n).partition(|i| i % 2 == 0);
    for _ in 0..4 {
        // Both micro-batches are submitted before either is collected.
        g.submit(&StepInput::shared(seqs.batch(&a), vec![]))
            .unwrap();
        g.submit(&StepInput::shared(seqs.batch(&b), vec![]))
            .unwrap();
        assert_eq!(g.num_in_flight(), 2);
        assert!(
            g.submit(&StepInput::shared(seqs.batch(&a), vec![]))
                .is_err(),
            "a third is refused"
        );
        let la = g.collect().unwrap().logits;
        seqs.advance(&a, &la, vocab);
        let lb = g.collect().unwrap().logits;
        seqs.advance(&b, &lb, vocab);
    }
    assert_eq!(seqs.out, reference);
}

#[test]
fn bad_sizes_are_clear_errors_at_start_up() {
    let f = common::default_gguf();
    let config = ModelConfig::from_gguf(&f).unwrap();
    let err = |tp, pp, threads| {
        let cfg = ParallelConfig {
            tp_size: tp,
            pp_size: pp,
            tp_mode: TpMode::Gather,
        };
        match load_cpu_ranks(&config, &f, cfg, threads) {
            Ok(_) => panic!("TP={tp} PP={pp} threads={threads} was accepted"),
            Err(e) => e.to_string(),
        }
    };
    let e = err(4, 1, 8);
    assert!(e.contains("valid sizes: 1, 2, 3, 9"), "{e}");
    let e = err(1, 31, 64);
    assert!(e.contains("valid sizes: 1 to 30"), "{e}");
    let e = err(2, 2, 3);
    assert!(e.contains("need at least one thread each"), "{e}");
}

/// The engine with two pipeline stages keeps two steps in flight on disjoint sequences and
/// commits them as they come back: concurrent greedy requests (mixed lengths, some finishing
/// early) give exactly the tokens of a one-rank engine.
#[test]
fn engine_with_pipeline_stages_matches_one_rank() {
    use sluice::engine::{self, EngineConfig, GenerateRequest, StreamEvent};
    use sluice::kv_cache::CacheConfig;
    use sluice::scheduler::SchedulerConfig;
    use sluice::tokenizer::Tokenizer;
    use std::sync::Arc;

    let f = common::default_gguf();
    let tokenizer = Arc::new(Tokenizer::from_gguf(&f).unwrap());
    let config = || EngineConfig {
        scheduler: SchedulerConfig {
            max_num_batched_tokens: 64,
            max_num_seqs: 16,
            ..SchedulerConfig::default()
        },
        cache: CacheConfig {
            block_size: BLOCK_SIZE,
            num_blocks: 256,
            enable_prefix_caching: true,
            sliding_window: None,
        },
        max_model_len: 4096,
        ..EngineConfig::default()
    };
    let run = |engine: &engine::EngineHandle| -> Vec<Vec<u32>> {
        let streams: Vec<_> = common::greedy_fixtures()
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let request = GenerateRequest {
                    ignore_eos: true,
                    ..GenerateRequest::greedy(p.prompt_ids.clone(), 4 + 3 * i)
                };
                engine.submit(request).unwrap()
            })
            .collect();
        streams
            .into_iter()
            .map(|mut s| {
                let mut tokens = Vec::new();
                loop {
                    match s.next_blocking() {
                        Some(StreamEvent::Token { token_ids, .. }) => tokens.extend(token_ids),
                        Some(StreamEvent::SeqFinished { .. } | StreamEvent::Embedding { .. }) => {}
                        Some(StreamEvent::Done { .. }) => return tokens,
                        other => panic!("unexpected end of stream: {other:?}"),
                    }
                }
            })
            .collect()
    };
    let one = engine::spawn(common::default_model(), tokenizer.clone(), config()).unwrap();
    let expected = run(&one);
    drop(one);
    let config_model = ModelConfig::from_gguf(&f).unwrap();
    let cfg = ParallelConfig {
        tp_size: 1,
        pp_size: 2,
        tp_mode: TpMode::Gather,
    };
    let ranks = load_cpu_ranks(&config_model, &f, cfg, 2).unwrap();
    let staged = engine::spawn(ranks, tokenizer, config()).unwrap();
    assert_eq!(run(&staged), expected);
}
