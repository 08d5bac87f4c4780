//! Paged attention against an f64 evaluation of softmax(q·k) v, and a timing probe.

use super::kernels_q8::{quantize_group, GROUP};
use super::kv_cache::KvStore;
use super::*;
use crate::kernels::dtype::KvCacheDtype;
use crate::kernels::{BatchSeq, ForwardBatch, KvCacheShape, Rope};
use half::f16;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One step over `(seq, start, end)` token ranges; sequence `s` uses `tables[s]`.
fn batch(ranges: &[(usize, usize, usize)], tables: &[Vec<u32>], bs: usize) -> ForwardBatch {
    let mut b = ForwardBatch::default();
    for &(s, start, end) in ranges {
        let query_start = b.token_ids.len();
        for p in start..end {
            b.token_ids.push(0);
            b.positions.push(p as u32);
            b.slot_mapping
                .push(tables[s][p / bs] * bs as u32 + (p % bs) as u32);
        }
        b.seqs.push(BatchSeq {
            query_start,
            query_len: end - start,
            context_len: end,
            block_table: tables[s].clone(),
            prompt_len: 0,
        });
    }
    b
}

/// What the cache holds of a K or V head row: f16-rounded, or quantized to q8_0 and back.
fn as_stored(x: &mut [f32], dtype: KvCacheDtype) {
    match dtype {
        KvCacheDtype::F16 => x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
        KvCacheDtype::Int8 => {
            for part in x.chunks_exact_mut(GROUP) {
                let mut codes = [0i8; GROUP];
                let d = quantize_group(part, &mut codes).to_f32();
                for (v, c) in part.iter_mut().zip(codes) {
                    *v = c as f32 * d;
                }
            }
        }
    }
}

/// Ragged prefill chunks over a cached prefix, then decode, against an f64 evaluation of
/// softmax(q·k) v over the same rotated, f16-rounded Q and the K and V the cache holds (f16,
/// or 8-bit codes and scales), for GQA ratios 1/3/4/8, head dims 64/128/48 (not 8-bit) and
/// block sizes 8/16/32; with full attention and with sliding windows that start inside a
/// block, on a block boundary, or see only the query's own key; and with scores soft-capped
/// (Gemma 2) at about their own size, so that the cap bends them.
#[test]
fn paged_attention_matches_f64_reference() {
    for dtype in [KvCacheDtype::F16, KvCacheDtype::Int8] {
        for window in [None, Some(1), Some(13), Some(32)] {
            paged_attention_matches_f64_reference_for(dtype, window, None);
        }
        paged_attention_matches_f64_reference_for(dtype, None, Some(0.3));
        paged_attention_matches_f64_reference_for(dtype, Some(13), Some(0.3));
    }
}

fn paged_attention_matches_f64_reference_for(
    dtype: KvCacheDtype,
    window: Option<usize>,
    softcap: Option<f32>,
) {
    let pool = ThreadPool::new(2);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for &(h, kvh, d, bs) in &[
        (3, 3, 64, 16),
        (9, 3, 64, 16),
        (8, 2, 128, 8),
        (8, 1, 64, 32),
        (4, 2, 48, 16),
        (7, 1, 96, 16),
    ] {
        if dtype == KvCacheDtype::Int8 && d % GROUP != 0 {
            continue;
        }
        let shape = AttentionShape {
            num_heads: h,
            num_kv_heads: kvh,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            window,
            softcap,
        };
        let lens = [37usize, 1, 70];
        let num_blocks = 16;
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        ids.shuffle(&mut rng);
        let mut tables = Vec::new();
        let mut next = 0;
        for len in lens {
            let n = (len + 1).div_ceil(bs);
            tables.push(ids[next..next + n].to_vec());
            next += n;
        }
        let shape_kv = KvCacheShape {
            num_layers: 1,
            num_blocks,
            block_size: bs,
            num_kv_heads: kvh,
            head_dim: d,
        };
        let mut kv = CpuKvCache::with_dtype(shape_kv, dtype).expect("a whole number of groups");
        let rope = Rope {
            inv_freqs: (0..d / 2)
                .map(|i| 10000f32.powf(-2.0 * i as f32 / d as f32))
                .collect(),
            interleaved: false,
            theta_base: 10_000.0,
            freq_factors: None,
        };
        // (seq, pos) -> rotated, rounded q | k | v of that token.
        let mut seen: Vec<Vec<Vec<f32>>> = lens.iter().map(|_| Vec::new()).collect();
        let cols = (h + 2 * kvh) * d;
        let steps = [
            vec![(0, 0, 20), (2, 0, 33)],
            vec![(0, 20, 37), (1, 0, 1), (2, 33, 70)],
            vec![(2, 70, 71), (0, 37, 38)],
        ];
        for ranges in steps {
            let fb = batch(&ranges, &tables, bs);
            let step = CpuStep::new(&fb, &rope, CpuNumerics::Fast);
            let mut qkv = CpuTensor::default();
            qkv.resize(fb.num_tokens(), cols);
            for x in qkv.data.iter_mut() {
                *x = rng.random_range(-1.0..1.0);
            }
            rope_and_store(&pool, &mut qkv, shape, 0, &mut kv, &step);
            let mut out = CpuTensor::default();
            attend(&pool, &qkv, shape, 0, &kv, &step, &mut out);
            // Either task shape gives the same bits.
            for heads_per_task in [1, kvh] {
                let mut other = CpuTensor::default();
                attend_tasks(
                    &pool,
                    &qkv,
                    shape,
                    0,
                    &kv,
                    &step,
                    &mut other,
                    heads_per_task,
                );
                assert_eq!(other.data, out.data, "{heads_per_task} KV heads per task");
            }
            let mut row = 0;
            for &(s, start, end) in &ranges {
                for _ in start..end {
                    let mut t = qkv.row(row).to_vec();
                    for x in t[h * d..].chunks_exact_mut(d) {
                        as_stored(x, dtype);
                    }
                    seen[s].push(t);
                    let ctx =
                        &seen[s][seen[s].len().saturating_sub(window.unwrap_or(usize::MAX))..];
                    let query = ctx.last().expect("just pushed");
                    for head in 0..h {
                        let g = head / (h / kvh);
                        let q = &query[head * d..][..d];
                        let scores: Vec<f64> = ctx
                            .iter()
                            .map(|t| {
                                let k = &t[(h + g) * d..][..d];
                                let s = q
                                    .iter()
                                    .zip(k)
                                    .map(|(a, b)| *a as f64 * *b as f64)
                                    .sum::<f64>()
                                    * shape.scale as f64;
                                softcap.map_or(s, |c| c as f64 * (s / c as f64).tanh())
                            })
                            .collect();
                        let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                        let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                        let sum: f64 = w.iter().sum();
                        for i in 0..d {
                            let exact: f64 = ctx
                                .iter()
                                .zip(&w)
                                .map(|(t, w)| w * t[(h + kvh + g) * d + i] as f64)
                                .sum::<f64>()
                                / sum;
                            let got = out.row(row)[head * d + i] as f64;
                            assert!(
                                (got - exact).abs() < 1e-5,
                                "{dtype} window {window:?} softcap {softcap:?}: h {h} kvh {kvh} d {d} bs {bs} seq {s} \
                                 row {row} head {head} dim {i}: {got} vs {exact}"
                            );
                        }
                    }
                    row += 1;
                }
            }
        }
    }
}

/// Decode attention over all 30 layers of a SmolLM2-135M-shaped cache (9 query heads, 3 KV
/// heads, head dim 64) whose blocks lie shuffled in a large pool, as in a long-running
/// server, timed for both task shapes interleaved in one run (this machine's speed drifts
/// between runs). `PROBE_SEQS` (16), `PROBE_CTX` (256), `PROBE_QUERIES` (1: decode; more for a
/// prefill chunk ending at the context's end), `PROBE_REPS` (30), `PROBE_KV` (the caches to
/// compare, interleaved: `f16`, `int8`, `f16,int8`):
/// `cargo test --release --lib attention_probe -- --ignored --nocapture`
#[test]
#[ignore = "a timing probe"]
fn attention_probe() {
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (seqs, ctx, reps) = (
        env("PROBE_SEQS", 16),
        env("PROBE_CTX", 256),
        env("PROBE_REPS", 30),
    );
    let (h, kvh, d, bs, layers, num_blocks) = (9, 3, 64, 16, 30, 8192);
    let shape = AttentionShape {
        num_heads: h,
        num_kv_heads: kvh,
        head_dim: d,
        scale: 0.125,
        window: None,
        softcap: None,
    };
    let kv_shape = KvCacheShape {
        num_layers: layers,
        num_blocks,
        block_size: bs,
        num_kv_heads: kvh,
        head_dim: d,
    };
    let dtypes = std::env::var("PROBE_KV").unwrap_or_else(|_| "f16".into());
    let caches: Vec<CpuKvCache> = dtypes
        .split(',')
        .map(|name| {
            let dtype = match name {
                "int8" => KvCacheDtype::Int8,
                _ => KvCacheDtype::F16,
            };
            probe_cache(kv_shape, dtype)
        })
        .collect();
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(&mut ChaCha8Rng::seed_from_u64(5));
    let queries = env("PROBE_QUERIES", 1).clamp(1, ctx + 1);
    let per_seq = (ctx + 1).div_ceil(bs);
    let tables: Vec<Vec<u32>> = ids
        .chunks(per_seq)
        .take(seqs)
        .map(<[u32]>::to_vec)
        .collect();
    let ranges: Vec<_> = (0..seqs).map(|s| (s, ctx + 1 - queries, ctx + 1)).collect();
    let rope = Rope {
        inv_freqs: vec![1.0; d / 2],
        interleaved: false,
        theta_base: 10_000.0,
        freq_factors: None,
    };
    let step = CpuStep::new(&batch(&ranges, &tables, bs), &rope, CpuNumerics::Fast);
    let mut qkv = CpuTensor::default();
    qkv.resize(seqs * queries, (h + 2 * kvh) * d);
    for (i, x) in qkv.data.iter_mut().enumerate() {
        *x = (i % 100) as f32 * 0.01 - 0.5;
    }
    let pool = ThreadPool::with_default_threads();
    let mut out = CpuTensor::default();
    // (cache, KV heads per task), interleaved in every repetition.
    let arms: Vec<(usize, usize)> = (0..caches.len()).flat_map(|c| [(c, 1), (c, kvh)]).collect();
    let mut times = vec![Vec::new(); arms.len()];
    for _ in 0..reps {
        for (t, &(c, heads_per_task)) in times.iter_mut().zip(&arms) {
            let start = std::time::Instant::now();
            for layer in 0..layers {
                attend_tasks(
                    &pool,
                    &qkv,
                    shape,
                    layer,
                    &caches[c],
                    &step,
                    &mut out,
                    heads_per_task,
                );
            }
            t.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    for (t, (c, heads_per_task)) in times.iter_mut().zip(arms) {
        t.sort_by(f64::total_cmp);
        println!(
            "probe attention {} {seqs} seqs × {queries} queries × ctx {ctx}, {heads_per_task} \
             KV heads per task: median {:.2} ms, fastest {:.2} ms",
            caches[c].dtype(),
            t[t.len() / 2],
            t[0]
        );
    }
}

/// A probe's cache of `dtype`, every value written (so that its pages are real memory).
fn probe_cache(shape: KvCacheShape, dtype: KvCacheDtype) -> CpuKvCache {
    let mut kv = CpuKvCache::with_dtype(shape, dtype).expect("head_dim 64");
    let value = |i: usize| (i % 1000) as f32 * 1e-3 - 0.5;
    match &mut kv.store {
        KvStore::F16 { k, v } => {
            for layer in k.iter_mut().chain(v.iter_mut()) {
                for (i, x) in layer.iter_mut().enumerate() {
                    *x = f16::from_f32(value(i));
                }
            }
        }
        KvStore::Int8 {
            k,
            k_scales,
            v,
            v_scales,
        } => {
            for layer in k.iter_mut().chain(v.iter_mut()) {
                for (i, x) in layer.iter_mut().enumerate() {
                    *x = (value(i) * 254.0) as i8;
                }
            }
            for layer in k_scales.iter_mut().chain(v_scales.iter_mut()) {
                layer.fill(f16::from_f32(1.0 / 127.0));
            }
        }
    }
    kv
}
