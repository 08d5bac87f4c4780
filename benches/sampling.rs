//! One sequence's draw from a 49,152-entry logits row (the default model's vocabulary), as
//! the engine samples each row of a step: greedy, temperature alone (what most clients send),
//! and nucleus. At 16 sequences a step samples 16 rows on the CPU's two threads.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sluice::sampling::{SamplingParams, SamplingScratch, SequenceSampler};

const VOCAB: usize = 49_152;

fn logits() -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // A model's row: most entries well below a few leading ones.
    (0..VOCAB)
        .map(|i| rng.random_range(-12.0f32..4.0) + if i % 997 == 0 { 9.0 } else { 0.0 })
        .collect()
}

fn bench(c: &mut Criterion) {
    let row = logits();
    let cases = [
        ("greedy", SamplingParams::greedy()),
        ("temperature_1", SamplingParams::default()),
        (
            "top_p_0.9",
            SamplingParams {
                top_p: 0.9,
                ..SamplingParams::default()
            },
        ),
    ];
    for (name, params) in cases {
        let mut sampler = SequenceSampler::new(params, &[1, 2, 3], 0);
        let mut scratch = SamplingScratch::default();
        let mut work = row.clone();
        c.bench_function(&format!("sample_row_{name}"), |b| {
            b.iter(|| {
                work.copy_from_slice(&row);
                black_box(sampler.sample(black_box(&mut work), &mut scratch))
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches, parts_group);
/// The passes a draw is made of, each over one row.
fn parts(c: &mut Criterion) {
    use sluice::kernels::cpu::ops;
    let row = logits();
    let mut w = row.clone();
    c.bench_function("row_max", |b| {
        b.iter(|| black_box(ops::max(black_box(&row))))
    });
    c.bench_function("row_argmax", |b| {
        b.iter(|| black_box(ops::argmax(black_box(&row))))
    });
    c.bench_function("row_all_below_inf", |b| {
        b.iter(|| black_box(ops::all_below_inf(black_box(&row))))
    });
    c.bench_function("row_softmax_weights", |b| {
        b.iter(|| {
            w.copy_from_slice(&row);
            ops::softmax_weights(&mut w, 13.0, 1.0);
            black_box(&w);
        })
    });
}

criterion_group!(parts_group, parts);
