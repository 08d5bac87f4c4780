//! CPU matmul benches at SmolLM2-135M's shapes.
//!
//! * `shape/<dtype> k→n/<path>/m`: one linear; at m=1 throughput is weight bytes per second,
//!   otherwise multiply-adds ×2 per second (GOP/s shown as Gelem/s).
//! * `model/<path>/m`: the matmuls of one whole forward step of m tokens (30 layers of
//!   q,k,v | o | gate,up | down, then the Q8_0 LM head); throughput is tokens per second.
//!
//! `Packed` is `linear_packed` over weights repacked at load (what the CPU backend runs);
//! the raw-block paths run beside it as the baseline (the portable one only at small m).
//! Run: `cargo bench --bench matmul` (filters: `-- model`, `-- shape/Q4_1`).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sluice::kernels::cpu::matmul::{
    linear_packed_with, linear_with, KernelPath, MatmulScratch, PackedLinear,
};
use sluice::kernels::cpu::pool::ThreadPool;
use sluice::kernels::dtype::WeightDType;
use sluice::kernels::host::{HostTensor, WeightBytes};

/// Random quants with small valid f16 scales (values do not change the speed).
fn random_weight(rng: &mut ChaCha8Rng, dtype: WeightDType, rows: usize, cols: usize) -> HostTensor {
    if dtype.block_len() == 1 {
        // Float weights: normal numbers of a model's size (random bits would hold NaNs and
        // subnormals).
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-0.05..0.05))
            .collect();
        let bytes = sluice::kernels::cpu::matmul::quantize_weights::quantize_row(dtype, &values);
        return HostTensor {
            dtype,
            rows,
            cols,
            bytes: WeightBytes::Owned(Arc::new(bytes)),
        };
    }
    let bb = dtype.block_bytes();
    let mut bytes = vec![0u8; rows * cols / dtype.block_len() * bb];
    rng.fill(&mut bytes[..]);
    let small = half::f16::from_f32(0.01).to_le_bytes();
    for blk in bytes.chunks_exact_mut(bb) {
        blk[..2].copy_from_slice(&small);
        if dtype == WeightDType::Q4_1 {
            blk[2..4].copy_from_slice(&small);
        }
    }
    HostTensor {
        dtype,
        rows,
        cols,
        bytes: WeightBytes::Owned(Arc::new(bytes)),
    }
}

fn activations(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn paths(m: usize) -> Vec<KernelPath> {
    let mut p = vec![KernelPath::detect()];
    if m <= 16 && p[0] != KernelPath::Portable {
        p.push(KernelPath::Portable);
    }
    p
}

fn shapes(c: &mut Criterion) {
    let pool = ThreadPool::with_default_threads();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let cases = [
        (WeightDType::Q4_1, 576, 576),
        (WeightDType::Q4_1, 576, 192),
        (WeightDType::Q4_1, 576, 1536),
        (WeightDType::Q4_1, 1536, 576),
        // The K-quants, where llama-quantize puts them in this model (ffn_down).
        (WeightDType::Q3K, 1536, 576),
        (WeightDType::Q4K, 1536, 576),
        (WeightDType::Q5K, 1536, 576),
        (WeightDType::Q6K, 1536, 576),
        (WeightDType::Q8_0, 576, 576),
        (WeightDType::Q8_0, 576, 49152),
        // Float weights, repacked for the FMA kernel ("Packed") against the per-row dots.
        (WeightDType::BF16, 576, 1536),
        (WeightDType::BF16, 1536, 576),
        (WeightDType::BF16, 576, 49152),
        (WeightDType::F16, 576, 1536),
        (WeightDType::F32, 576, 1536),
    ];
    for (dtype, k, n) in cases {
        let w = random_weight(&mut rng, dtype, n, k);
        let wp = packed(KernelPath::detect(), vec![w.clone()]);
        let mut group = c.benchmark_group(format!("shape/{dtype} {k}→{n}"));
        group.sample_size(10);
        for m in [1, 16, 64, 512] {
            let x = activations(&mut rng, m * k);
            let mut out = vec![0.0; m * n];
            let mut scratch = MatmulScratch::new();
            group.throughput(if m == 1 {
                Throughput::Bytes(w.bytes.len() as u64)
            } else {
                Throughput::Elements((2 * m * n * k) as u64)
            });
            let path = KernelPath::detect();
            group.bench_function(BenchmarkId::new("Packed", m), |b| {
                b.iter(|| linear_packed_with(path, &pool, &x, m, &wp, &mut out, &mut scratch))
            });
            for path in paths(m) {
                group.bench_function(BenchmarkId::new(format!("{path:?}"), m), |b| {
                    b.iter(|| linear_with(path, &pool, &x, m, &[&w], &mut out, &mut scratch))
                });
            }
        }
        group.finish();
    }
}

fn packed(path: KernelPath, parts: Vec<HostTensor>) -> PackedLinear {
    match PackedLinear::with_path(path, parts) {
        Ok(w) => w,
        Err(e) => panic!("bench weights rejected: {e}"),
    }
}

/// One layer's weights prepared for `linear_packed`.
struct PackedLayer {
    qkv: PackedLinear,
    o: PackedLinear,
    gate_up: PackedLinear,
    down: PackedLinear,
}

struct Layer {
    qkv: [HostTensor; 3],
    o: HostTensor,
    gate_up: [HostTensor; 2],
    down: HostTensor,
}

fn model(c: &mut Criterion) {
    let pool = ThreadPool::with_default_threads();
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (h, kv, ff, vocab) = (576, 192, 1536, 49152);
    let q41 = WeightDType::Q4_1;
    let layers: Vec<Layer> = (0..30)
        .map(|_| Layer {
            qkv: [
                random_weight(&mut rng, q41, h, h),
                random_weight(&mut rng, q41, kv, h),
                random_weight(&mut rng, q41, kv, h),
            ],
            o: random_weight(&mut rng, q41, h, h),
            gate_up: [
                random_weight(&mut rng, q41, ff, h),
                random_weight(&mut rng, q41, ff, h),
            ],
            down: random_weight(&mut rng, q41, h, ff),
        })
        .collect();
    let head = random_weight(&mut rng, WeightDType::Q8_0, vocab, h);
    let path = KernelPath::detect();
    let player: Vec<PackedLayer> = layers
        .iter()
        .map(|l| PackedLayer {
            qkv: packed(path, l.qkv.to_vec()),
            o: packed(path, vec![l.o.clone()]),
            gate_up: packed(path, l.gate_up.to_vec()),
            down: packed(path, vec![l.down.clone()]),
        })
        .collect();
    let phead = packed(path, vec![head.clone()]);
    let mut group = c.benchmark_group("model");
    group.sample_size(10);
    for m in [1, 16, 64, 512] {
        let x = activations(&mut rng, m * ff);
        let mut out = vec![0.0; m * vocab];
        let mut scratch = MatmulScratch::new();
        group.throughput(Throughput::Elements(m as u64));
        group.bench_function(BenchmarkId::new("Packed", m), |b| {
            b.iter(|| {
                let xh = &x[..m * h];
                let mut run = |x: &[f32], w: &PackedLinear| {
                    let out = &mut out[..m * w.rows()];
                    linear_packed_with(path, &pool, x, m, w, out, &mut scratch)
                };
                for l in &player {
                    run(xh, &l.qkv);
                    run(xh, &l.o);
                    run(xh, &l.gate_up);
                    run(&x[..m * ff], &l.down);
                }
                run(xh, &phead);
            })
        });
        for path in paths(m) {
            group.bench_function(BenchmarkId::new(format!("{path:?}"), m), |b| {
                b.iter(|| {
                    let xh = &x[..m * h];
                    for l in &layers {
                        let [q, k, v] = &l.qkv;
                        linear_with(
                            path,
                            &pool,
                            xh,
                            m,
                            &[q, k, v],
                            &mut out[..m * (h + 2 * kv)],
                            &mut scratch,
                        );
                        linear_with(path, &pool, xh, m, &[&l.o], &mut out[..m * h], &mut scratch);
                        let [g, u] = &l.gate_up;
                        linear_with(
                            path,
                            &pool,
                            xh,
                            m,
                            &[g, u],
                            &mut out[..m * 2 * ff],
                            &mut scratch,
                        );
                        linear_with(
                            path,
                            &pool,
                            &x[..m * ff],
                            m,
                            &[&l.down],
                            &mut out[..m * h],
                            &mut scratch,
                        );
                    }
                    linear_with(
                        path,
                        &pool,
                        xh,
                        m,
                        &[&head],
                        &mut out[..m * vocab],
                        &mut scratch,
                    );
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, shapes, model);
criterion_main!(benches);
