//! One decode step of the default model, at 1 and 16 sequences, each with a filled KV cache.
//!
//! `decode/<seqs>/ctx<len>`: one forward pass of `seqs` decode tokens, each sequence with `len`
//! tokens of context already cached; throughput is tokens per second, so the ratio of the
//! 16-sequence figure to the 1-sequence one is the batching speed-up the engine can reach at
//! best (the batching issue asks for 4× on this machine).
//!
//! Run: `cargo bench --bench forward` (set `SLUICE_NUM_THREADS` to pin the thread count).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice::kernels::cpu::pool::default_num_threads;
use sluice::kernels::cpu::CpuBackend;
use sluice::kernels::{BatchSeq, ForwardBatch};
use sluice::model::fetch::default_model_path;
use sluice::model::llama::Llama;
use sluice::model::loader::{self, LoadFormat, ModelSpec};

const BLOCK_SIZE: usize = 16;

/// A batch of `seqs` sequences, sequence `i` owning blocks `[i * per_seq, (i + 1) * per_seq)`,
/// running the tokens at positions `start..end` of each.
fn batch(seqs: usize, per_seq: usize, start: usize, end: usize) -> ForwardBatch {
    let mut b = ForwardBatch::default();
    for i in 0..seqs {
        let table: Vec<u32> = (0..per_seq).map(|j| (i * per_seq + j) as u32).collect();
        let query_start = b.token_ids.len();
        for p in start..end {
            // Any valid ids do: the speed does not depend on them.
            b.token_ids.push(((p * 31 + i * 7) % 40_000 + 100) as u32);
            b.positions.push(p as u32);
            b.slot_mapping
                .push(table[p / BLOCK_SIZE] * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32);
        }
        b.logits_rows.push((b.token_ids.len() - 1) as u32);
        b.seqs.push(BatchSeq {
            query_start,
            query_len: end - start,
            context_len: end,
            block_table: table,
        });
    }
    b
}

fn decode(c: &mut Criterion) {
    let spec = ModelSpec {
        path: default_model_path().expect("the default model (fetched on first use)"),
        load_format: LoadFormat::Gguf,
        dummy_dtype: sluice::kernels::dtype::WeightDType::F16,
        dummy_seed: 0,
    };
    let opened = loader::open(&spec).expect("open the default model");
    let backend = CpuBackend::new(default_num_threads());
    let mut model = Llama::load(opened.config, opened.weights.as_ref(), backend).expect("load");
    let mut group = c.benchmark_group("decode");
    group.sample_size(20);
    for ctx in [256usize] {
        let per_seq = (ctx + 1).div_ceil(BLOCK_SIZE);
        for seqs in [1usize, 16] {
            let mut kv = model
                .kv_cache(seqs * per_seq, BLOCK_SIZE)
                .expect("kv cache");
            // Fill the context once; the timed step re-runs the token at position `ctx`,
            // overwriting its own slot, so every iteration sees the same cache.
            model.forward(&batch(seqs, per_seq, 0, ctx), &mut kv);
            let step = batch(seqs, per_seq, ctx, ctx + 1);
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

criterion_group!(benches, decode);
criterion_main!(benches);
