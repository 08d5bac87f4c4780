//! Tensor parallelism on CPU ranks: the shared-memory collectives at SmolLM2-135M's hidden
//! size (576) for a few token counts, and one decode step of the default model on TP=2 ranks
//! against TP=1 with the same total threads (report the ratio of the two, measured in the
//! same run).
//!
//! `cargo bench --bench parallel`; `SLUICE_BENCH_THREADS` sets the total threads (default 2).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice::cli::cpu_ranks::load_cpu_ranks;
use sluice::gguf::GgufFile;
use sluice::kernels::{BatchSeq, ForwardBatch};
use sluice::model::config::ModelConfig;
use sluice::model::rank_group::RankGroup;
use sluice::parallel::shm::{self, ShmComm};
use sluice::parallel::{ParallelConfig, TpMode};

const HIDDEN: usize = 576;

/// Times `iters` collectives on rank 0 while a helper thread runs the same ones on rank 1.
fn timed_pair(
    iters: u64,
    len: usize,
    op: impl Fn(&mut ShmComm, &mut Vec<f32>, &mut Vec<f32>) + Sync,
) -> Duration {
    let mut comms = shm::group(2, 1);
    let mut peer = comms.pop().unwrap_or_else(|| unreachable!());
    let mut lead = comms.pop().unwrap_or_else(|| unreachable!());
    std::thread::scope(|s| {
        let op = &op;
        s.spawn(move || {
            let (mut x, mut out) = (vec![1.0f32; len], Vec::new());
            for _ in 0..iters {
                op(&mut peer, &mut x, &mut out);
            }
        });
        let (mut x, mut out) = (vec![1.0f32; len], Vec::new());
        let start = Instant::now();
        for _ in 0..iters {
            op(&mut lead, &mut x, &mut out);
        }
        start.elapsed()
    })
}

fn collectives(c: &mut Criterion) {
    let mut group = c.benchmark_group("shm_tp2");
    for tokens in [1usize, 16, 128, 512] {
        let len = tokens * HIDDEN;
        group.throughput(Throughput::Bytes((len * 4) as u64));
        group.bench_with_input(BenchmarkId::new("all_reduce", tokens), &len, |b, &len| {
            b.iter_custom(|iters| {
                timed_pair(iters, len, |c, x, _| {
                    // Resetting keeps the values finite over millions of rounds.
                    x.fill(1.0);
                    c.all_reduce_slice(x, tokens, HIDDEN)
                        .unwrap_or_else(|e| panic!("{e}"));
                })
            })
        });
        group.bench_with_input(
            BenchmarkId::new("all_gather_half", tokens),
            &(len / 2),
            |b, &len| {
                b.iter_custom(|iters| {
                    timed_pair(iters, len, |c, x, out| {
                        c.all_gather_cols_slice(x, tokens, HIDDEN / 2, out)
                            .unwrap_or_else(|e| panic!("{e}"));
                        black_box(&out);
                    })
                })
            },
        );
    }
    group.finish();
}

/// A decode step of `num_seqs` sequences, each with `context` tokens in the cache.
fn decode_batch(num_seqs: usize, context: usize, block_size: usize) -> ForwardBatch {
    let blocks = (context + 1).div_ceil(block_size);
    let mut b = ForwardBatch::default();
    for s in 0..num_seqs {
        let table: Vec<u32> = (0..blocks).map(|k| (s * blocks + k) as u32).collect();
        b.token_ids.push(100 + s as u32);
        b.positions.push(context as u32);
        b.slot_mapping
            .push(table[context / block_size] * block_size as u32 + (context % block_size) as u32);
        b.logits_rows.push(s as u32);
        b.seqs.push(BatchSeq {
            query_start: s,
            query_len: 1,
            context_len: context + 1,
            block_table: table,
            prompt_len: 0,
        });
    }
    b
}

fn tp_step(c: &mut Criterion) {
    let threads: usize = std::env::var("SLUICE_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let path = sluice::assets::default_model_path().unwrap_or_else(|e| panic!("{e}"));
    let f = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let config = ModelConfig::from_gguf(&f).unwrap_or_else(|e| panic!("{e}"));
    let (block_size, num_seqs, context) = (16, 8, 64);
    let batch = decode_batch(num_seqs, context, block_size);
    let num_blocks = num_seqs * (context + 1).div_ceil(block_size);
    let mut group = c.benchmark_group(format!("decode_step_{num_seqs}seqs_{threads}threads"));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));
    for (name, tp, mode) in [
        ("tp1", 1, TpMode::Gather),
        ("tp2_gather", 2, TpMode::Gather),
        ("tp2_all_reduce", 2, TpMode::AllReduce),
    ] {
        let cfg = ParallelConfig {
            tp_size: tp,
            pp_size: 1,
            tp_mode: mode,
        };
        let ranks =
            load_cpu_ranks(&config, &f, cfg, threads.max(tp)).unwrap_or_else(|e| panic!("{e}"));
        let mut g =
            RankGroup::start(ranks, num_blocks, block_size).unwrap_or_else(|e| panic!("{e}"));
        group.bench_function(name, |b| {
            b.iter(|| black_box(g.run(&batch, &[]).unwrap_or_else(|e| panic!("{e}"))))
        });
    }
    group.finish();
}

criterion_group!(benches, collectives, tp_step);
criterion_main!(benches);
