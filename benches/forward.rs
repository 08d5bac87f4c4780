//! One decode step of the default model, at 1 and 16 sequences, each with a filled KV cache.
//!
//! `decode/<seqs>/ctx<len>`: one forward pass of `seqs` decode tokens, each sequence with `len`
//! tokens of context already cached; throughput is tokens per second, so the ratio of the
//! 16-sequence figure to the 1-sequence one is the batching speed-up the engine can reach at
//! best (the batching issue asks for 4× on this machine).
//!
//! Run: `cargo bench --bench forward` (set `SLUICE_NUM_THREADS` to pin the thread count).
//! Probes: `SLUICE_FORWARD_PROBE=N` (timed steps instead of criterion), `SLUICE_FORWARD_CTX`
//! (256), `SLUICE_FORWARD_SEQS` (a list, e.g. `16`; also skips the verification shapes),
//! `SLUICE_FORWARD_KV` (`f16`, `int8`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice::assets::default_model_path;
use sluice::kernels::cpu::pool::default_num_threads;
use sluice::kernels::cpu::CpuBackend;
use sluice::kernels::dtype::KvCacheDtype;
use sluice::kernels::ForwardBatch;
use sluice::model::llama::Llama;
use sluice::model::loader::{self, LoadFormat, ModelSpec};

const BLOCK_SIZE: usize = 16;

fn batch(seqs: usize, per_seq: usize, start: usize, end: usize) -> ForwardBatch {
    ForwardBatch::synthetic(seqs, per_seq, BLOCK_SIZE, start, end)
}

fn decode(c: &mut Criterion) {
    let spec = ModelSpec {
        path: default_model_path().expect("the default model (fetched on first use)"),
        load_format: LoadFormat::Gguf,
        dummy_dtype: sluice::kernels::dtype::WeightDType::F16,
        dummy_seed: 0,
        quantization: None,
    };
    let opened = loader::open(&spec).expect("open the default model");
    let kv_dtype = match std::env::var("SLUICE_FORWARD_KV").as_deref() {
        Ok("int8") => KvCacheDtype::Int8,
        _ => KvCacheDtype::F16,
    };
    let backend = CpuBackend::new(default_num_threads()).with_kv_cache_dtype(kv_dtype);
    let mut model = Llama::load(opened.config, opened.weights.as_ref(), backend).expect("load");
    let mut group = c.benchmark_group("decode");
    group.sample_size(20);
    let ctx_env = std::env::var("SLUICE_FORWARD_CTX")
        .ok()
        .and_then(|v| v.parse().ok());
    for ctx in [ctx_env.unwrap_or(256usize)] {
        let per_seq = (ctx + 1).div_ceil(BLOCK_SIZE);
        let sizes: Vec<usize> = match (probe_reps(), std::env::var("SLUICE_FORWARD_SEQS")) {
            (_, Ok(list)) => list.split(',').filter_map(|s| s.parse().ok()).collect(),
            (Some(_), _) => vec![1, 2, 4, 8, 16],
            (None, _) => vec![1, 16],
        };
        for seqs in sizes {
            let mut kv = model
                .kv_cache(seqs * per_seq, BLOCK_SIZE)
                .expect("kv cache");
            // Fill the context once; the timed step re-runs the token at position `ctx`,
            // overwriting its own slot, so every iteration sees the same cache.
            let fill = std::time::Instant::now();
            model.forward(&batch(seqs, per_seq, 0, ctx), &mut kv);
            if probe_reps().is_some() {
                println!(
                    "probe prefill {seqs}×{ctx} tokens: {:.1} ms",
                    fill.elapsed().as_secs_f64() * 1e3
                );
            }
            if let (Some(reps), Err(_)) = (probe_reps(), std::env::var("SLUICE_FORWARD_SEQS")) {
                // Speculative verification: each sequence computes its last token and `k`
                // draft tokens, with logits for all of them (`verify/<seqs>/k<k>`).
                for k in [2usize, 4] {
                    let mut step = batch(seqs, per_seq, ctx - k, ctx + 1);
                    step.logits_rows = (0..step.num_tokens() as u32).collect();
                    let name = format!("verify/{seqs}/k{k}");
                    probe(&name, ctx, reps, || {
                        model.forward(&step, &mut kv);
                    });
                }
            }
            let step = batch(seqs, per_seq, ctx, ctx + 1);
            if let Some(reps) = probe_reps() {
                probe(&format!("decode/{kv_dtype}/{seqs}"), ctx, reps, || {
                    model.forward(&step, &mut kv);
                });
                continue;
            }
            group.throughput(Throughput::Elements(seqs as u64));
            group.bench_with_input(
                BenchmarkId::new(seqs.to_string(), format!("ctx{ctx}")),
                &step,
                |b, step| b.iter(|| model.forward(step, &mut kv)),
            );
        }
    }
    group.finish();
}

/// `SLUICE_FORWARD_PROBE=N`: instead of criterion's estimates, time `N` steps of each shape
/// and print the median and the fastest (the fastest is the figure least moved by other work
/// on a shared machine).
fn probe_reps() -> Option<usize> {
    std::env::var("SLUICE_FORWARD_PROBE").ok()?.parse().ok()
}

fn probe(name: &str, ctx: usize, reps: usize, mut step: impl FnMut()) {
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t = std::time::Instant::now();
            step();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    println!(
        "probe {name}/ctx{ctx}: median {:.2} ms, fastest {:.2} ms ({} steps)",
        times[times.len() / 2],
        times[0],
        times.len()
    );
}

criterion_group!(benches, decode);
criterion_main!(benches);
