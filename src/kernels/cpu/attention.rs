//! Paged attention on the CPU: RoPE, the K/V write into cache slots, and causal attention of
//! each query over its sequence's cached context, read through the block table.
//!
//! KV layout per layer, f16: K is `[num_blocks, num_kv_heads, head_dim, block_size]` (transposed
//! within a block, so a vector FMA scores 16 keys) and V is `[num_blocks, num_kv_heads,
//! block_size, head_dim]`. Work is split into tasks of (sequence, up to `QUERY_CHUNK` queries,
//! all KV heads or one; see [`attend`]); a task handles every query head of its KV heads (GQA),
//! so each K and V load serves all of them. No task splits a query's keys, so each output is
//! computed the same way whatever else is in the batch, how a prompt was chunked or how heads
//! were grouped into tasks. The inner loops are `attention_kernels`.

use std::cell::RefCell;

use half::{f16, slice::HalfFloatSliceExt};

use super::attention_kernels::{
    accumulate_v, block_pair_scores, block_scores, softmax_numerators, GroupQuery, KvBlock, Scratch,
};
use super::backend::{CpuNumerics, CpuTensor};
use super::ggml_compat::{self, AttnScratch, KvHead};
use super::pool::{SyncPtr, ThreadPool};
use super::rows;
use crate::kernels::{AttentionShape, ForwardBatch, KvCacheShape};

/// Queries per attention task.
const QUERY_CHUNK: usize = 16;
/// Most tokens per RoPE/store task.
const ROPE_CHUNK: usize = 32;

/// K and V of every layer, f16 (the precision of llama.cpp's default cache and of a GPU one).
pub struct CpuKvCache {
    pub shape: KvCacheShape,
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
}

impl CpuKvCache {
    pub fn new(shape: KvCacheShape) -> Self {
        let per_layer = shape.num_blocks * shape.num_kv_heads * shape.block_size * shape.head_dim;
        let zeros = || -> Vec<Vec<f16>> {
            (0..shape.num_layers)
                .map(|_| vec![f16::ZERO; per_layer])
                .collect()
        };
        Self {
            shape,
            k: zeros(),
            v: zeros(),
        }
    }

    /// Offset of (block, KV head) in a layer's K or V buffer; the region is
    /// `block_size * head_dim` long in both.
    fn head_base(&self, block: usize, head: usize) -> usize {
        let s = &self.shape;
        (block * s.num_kv_heads + head) * s.block_size * s.head_dim
    }

    pub fn copy_blocks(&mut self, copies: &[(u32, u32)]) {
        let block_len = self.shape.num_kv_heads * self.shape.block_size * self.shape.head_dim;
        for layer in self.k.iter_mut().chain(self.v.iter_mut()) {
            for &(src, dst) in copies {
                let (src, dst) = (src as usize * block_len, dst as usize * block_len);
                layer.copy_within(src..src + block_len, dst);
            }
        }
    }
}

/// A unit of attention work.
#[derive(Debug, Clone, Copy)]
pub struct AttentionTask {
    pub seq: usize,
    /// Query range within the sequence's new tokens.
    pub q_begin: usize,
    pub q_end: usize,
}

/// Per-step data for the CPU ops, prepared once per forward pass.
pub struct CpuStep {
    pub batch: ForwardBatch,
    /// `[tokens, head_dim / 2]` cosines and sines of each token's rotation angles.
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub interleaved: bool,
    pub tasks: Vec<AttentionTask>,
    pub numerics: CpuNumerics,
}

impl CpuStep {
    pub fn new(batch: &ForwardBatch, rope: &crate::kernels::Rope, numerics: CpuNumerics) -> Self {
        let half = rope.inv_freqs.len();
        let n = batch.num_tokens();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for &p in &batch.positions {
            match numerics {
                CpuNumerics::Fast => rows::rope_angles(p, &rope.inv_freqs, &mut cos, &mut sin),
                CpuNumerics::Ggml => rows::ggml::rope_angles(
                    p,
                    rope.theta_base,
                    2 * half,
                    rope.freq_factors.as_deref(),
                    &mut cos,
                    &mut sin,
                ),
            }
        }
        let mut tasks = Vec::new();
        for (seq, s) in batch.seqs.iter().enumerate() {
            let mut q = 0;
            while q < s.query_len {
                let end = (q + QUERY_CHUNK).min(s.query_len);
                tasks.push(AttentionTask {
                    seq,
                    q_begin: q,
                    q_end: end,
                });
                q = end;
            }
        }
        Self {
            batch: batch.clone(),
            cos,
            sin,
            interleaved: rope.interleaved,
            tasks,
            numerics,
        }
    }
}

/// Rounds values to f16 precision. Queries meet the f16 keys at that precision too, so
/// results agree with engines that attend in f16 to near-ties rather than drifting apart.
#[inline]
fn round_to_f16(x: &mut [f32], tmp: &mut [f16]) {
    let n = tmp.len();
    for x in x.chunks_mut(n) {
        let tmp = &mut tmp[..x.len()];
        // The slice conversions use F16C vectors where the CPU has them.
        tmp.convert_from_f32_slice(x);
        tmp.convert_to_f32_slice(x);
    }
}

/// Rotates Q and K in `qkv` and writes K and V into their cache slots.
pub fn rope_and_store(
    pool: &ThreadPool,
    qkv: &mut CpuTensor,
    shape: AttentionShape,
    layer: usize,
    kv: &mut CpuKvCache,
    step: &CpuStep,
) {
    let (h, kvh, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    let half = d / 2;
    let cols = qkv.cols;
    let n = qkv.rows;
    let bs = kv.shape.block_size;
    let qkv_ptr = SyncPtr::new(&mut qkv.data);
    // (region of KV head 0 of the slot's block, offset in the block) per token.
    let slots: Vec<(usize, usize)> = step
        .batch
        .slot_mapping
        .iter()
        .map(|&slot| (kv.head_base(slot as usize / bs, 0), slot as usize % bs))
        .collect();
    let head_stride = bs * d;
    let k_ptr = SyncPtr::new(&mut kv.k[layer]);
    let v_ptr = SyncPtr::new(&mut kv.v[layer]);
    // A decode step's few tokens are still split over the threads.
    let chunk = n.div_ceil(pool.num_threads()).clamp(1, ROPE_CHUNK);
    pool.run(n.div_ceil(chunk), |task| {
        let first = task * chunk;
        let last = ((task + 1) * chunk).min(n);
        for (t, &(base, offset)) in slots.iter().enumerate().take(last).skip(first) {
            // SAFETY: each token row, and each token's cache slot, belongs to one task.
            let row = unsafe { qkv_ptr.slice(t * cols, cols) };
            let (cos, sin) = (&step.cos[t * half..][..half], &step.sin[t * half..][..half]);
            for head in row[..(h + kvh) * d].chunks_exact_mut(d) {
                match step.numerics {
                    CpuNumerics::Fast => rows::rope_head(head, cos, sin, step.interleaved),
                    CpuNumerics::Ggml => rows::ggml::rope_head(head, cos, sin, step.interleaved),
                }
            }
            let mut tmp = [f16::ZERO; 256];
            // (The ggml numerics round queries where llama.cpp does, in attention.)
            if step.numerics == CpuNumerics::Fast {
                round_to_f16(&mut row[..h * d], &mut tmp);
            }
            for g in 0..kvh {
                let at = base + g * head_stride;
                let (k_row, v_row) = (&row[(h + g) * d..][..d], &row[(h + kvh + g) * d..][..d]);
                // SAFETY: slots are distinct per token; see above. K's dimension `i` of this
                // token sits at `i * bs + offset` of its block region (transposed).
                unsafe {
                    let k = k_ptr.slice(at, head_stride);
                    for (c, k_part) in k_row.chunks(tmp.len()).enumerate() {
                        let kh = &mut tmp[..k_part.len()];
                        kh.convert_from_f32_slice(k_part);
                        for (i, &x) in kh.iter().enumerate() {
                            k[(c * 256 + i) * bs + offset] = x;
                        }
                    }
                    let v = v_ptr.slice(at + offset * d, d);
                    v.convert_from_f32_slice(v_row);
                }
            }
        }
    });
}

thread_local! {
    /// Per worker: scores `[group heads][context]`, each head's 1 / softmax sum, conversion space.
    static SCORES: RefCell<(Vec<f32>, Vec<f32>, Scratch)> =
        RefCell::new((Vec::new(), Vec::new(), Scratch::default()));
}

/// Causal attention of every query over its sequence's cache; `out` is `[tokens, heads * d]`.
pub fn attend(
    pool: &ThreadPool,
    qkv: &CpuTensor,
    shape: AttentionShape,
    layer: usize,
    kv: &CpuKvCache,
    step: &CpuStep,
    out: &mut CpuTensor,
) {
    if step.numerics == CpuNumerics::Ggml {
        return attend_ggml(pool, qkv, shape, layer, kv, step, out);
    }
    // With a query chunk per thread or more, a task takes all KV heads of its chunk, so each
    // block's K (then V) of every head is read as one contiguous run: 12–23% faster at 2–16
    // decoding sequences (`attention_probe`; the cache comes from memory, not compute). With
    // fewer, a task takes one KV head, so that a single sequence still uses every thread.
    let heads_per_task = if step.tasks.len() >= pool.num_threads() {
        shape.num_kv_heads
    } else {
        1
    };
    attend_tasks(pool, qkv, shape, layer, kv, step, out, heads_per_task);
}

/// [`attend`] with tasks of `heads_per_task` KV heads (a divisor of their number); every
/// output is computed the same way whatever the task shape.
#[allow(clippy::too_many_arguments)]
fn attend_tasks(
    pool: &ThreadPool,
    qkv: &CpuTensor,
    shape: AttentionShape,
    layer: usize,
    kv: &CpuKvCache,
    step: &CpuStep,
    out: &mut CpuTensor,
    heads_per_task: usize,
) {
    let (h, kvh, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    let group = h / kvh;
    let bs = kv.shape.block_size;
    out.resize(qkv.rows, h * d);
    let out_ptr = SyncPtr::new(&mut out.data);
    let (k, v) = (&kv.k[layer][..], &kv.v[layer][..]);
    let parts = kvh / heads_per_task;
    pool.run(step.tasks.len() * parts, |i| {
        let task = step.tasks[i / parts];
        let g0 = i % parts * heads_per_task;
        let seq = &step.batch.seqs[task.seq];
        SCORES.with(|cell| {
            let (scores, inv_sums, scratch) = &mut *cell.borrow_mut();
            for q in task.q_begin..task.q_end {
                let row = seq.query_start + q;
                let ctx = seq.context_len - seq.query_len + q + 1;
                let gq = |g: usize| GroupQuery {
                    q: &qkv.data[row * qkv.cols + g * group * d..][..group * d],
                    heads: group,
                    head_dim: d,
                    scale: shape.scale,
                };
                let block = |b: usize, g: usize| {
                    let base = kv.head_base(seq.block_table[b] as usize, g);
                    KvBlock {
                        k: &k[base..][..bs * d],
                        v: &v[base..][..bs * d],
                        block_size: bs,
                        n: bs.min(ctx - b * bs),
                    }
                };
                let blocks = ctx.div_ceil(bs);
                // Scores are `[KV head of the task][query head of its group][context]`.
                let per_head = group * ctx;
                scores.resize(heads_per_task * per_head, 0.0);
                for b in (0..blocks).step_by(2) {
                    for j in 0..heads_per_task {
                        let (g, out) = (g0 + j, &mut scores[j * per_head + b * bs..]);
                        if b + 1 < blocks {
                            block_pair_scores(
                                gq(g),
                                block(b, g),
                                block(b + 1, g),
                                out,
                                ctx,
                                scratch,
                            );
                        } else {
                            block_scores(gq(g), block(b, g), out, ctx, scratch);
                        }
                    }
                }
                inv_sums.clear();
                inv_sums.extend(
                    scores
                        .chunks_exact_mut(ctx)
                        .map(|row| 1.0 / softmax_numerators(row)),
                );
                // SAFETY: (row, KV heads) ranges are disjoint across tasks, and the query heads
                // of consecutive KV heads are contiguous in the output row.
                let o = unsafe {
                    out_ptr.slice(row * h * d + g0 * group * d, heads_per_task * group * d)
                };
                o.fill(0.0);
                for b in 0..blocks {
                    for (j, o) in o.chunks_exact_mut(group * d).enumerate() {
                        let p = &scores[j * per_head + b * bs..];
                        accumulate_v(group, p, ctx, block(b, g0 + j), d, o, scratch);
                    }
                }
                for (o, inv) in o.chunks_exact_mut(d).zip(inv_sums.iter()) {
                    for x in o {
                        *x *= inv;
                    }
                }
            }
        });
    });
}

/// [`attend`] as ggml's CPU flash attention computes it, with whichever of its two kernels
/// llama.cpp would run for each query ([`ggml_compat::attends_tiled`]). Tasks are (query
/// chunk, KV head).
fn attend_ggml(
    pool: &ThreadPool,
    qkv: &CpuTensor,
    shape: AttentionShape,
    layer: usize,
    kv: &CpuKvCache,
    step: &CpuStep,
    out: &mut CpuTensor,
) {
    let (h, kvh, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    let group = h / kvh;
    let bs = kv.shape.block_size;
    out.resize(qkv.rows, h * d);
    let out_ptr = SyncPtr::new(&mut out.data);
    let (k, v) = (&kv.k[layer][..], &kv.v[layer][..]);
    pool.run(step.tasks.len() * kvh, |i| {
        let (task, g) = (step.tasks[i / kvh], i % kvh);
        let seq = &step.batch.seqs[task.seq];
        let head = KvHead {
            k,
            v,
            block_table: &seq.block_table,
            block_size: bs,
            num_kv_heads: kvh,
            head: g,
            head_dim: d,
        };
        GGML_SCRATCH.with(|cell| {
            let scratch = &mut *cell.borrow_mut();
            scratch.begin_task(seq.context_len - seq.query_len + task.q_end);
            for q in task.q_begin..task.q_end {
                let row = seq.query_start + q;
                let ctx = seq.context_len - seq.query_len + q + 1;
                let query = &qkv.data[row * qkv.cols + g * group * d..][..group * d];
                // SAFETY: each (row, KV head) is written by the one task that owns it, and a
                // KV head's query heads are contiguous in the output row.
                let o = unsafe { out_ptr.slice(row * h * d + g * group * d, group * d) };
                let tiled = ggml_compat::attends_tiled(seq.prompt_len, ctx - 1);
                ggml_compat::attend_kv_head(query, &head, ctx, shape.scale, tiled, o, scratch);
            }
        });
    });
}

thread_local! {
    static GGML_SCRATCH: RefCell<AttnScratch> = RefCell::new(AttnScratch::default());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{BatchSeq, Rope};
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

    /// Ragged prefill chunks over a cached prefix, then decode, against an f64 evaluation of
    /// softmax(q·k) v over the same rotated, f16-rounded Q, K and V, for GQA ratios 1/3/4/8,
    /// head dims 64/128/48 and block sizes 8/16/32.
    #[test]
    fn paged_attention_matches_f64_reference() {
        let pool = ThreadPool::new(2);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for &(h, kvh, d, bs) in &[
            (3, 3, 64, 16),
            (9, 3, 64, 16),
            (8, 2, 128, 8),
            (8, 1, 64, 32),
            (4, 2, 48, 16),
        ] {
            let shape = AttentionShape {
                num_heads: h,
                num_kv_heads: kvh,
                head_dim: d,
                scale: 1.0 / (d as f32).sqrt(),
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
            let mut kv = CpuKvCache::new(KvCacheShape {
                num_layers: 1,
                num_blocks,
                block_size: bs,
                num_kv_heads: kvh,
                head_dim: d,
            });
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
                        for x in &mut t[h * d..] {
                            *x = f16::from_f32(*x).to_f32();
                        }
                        seen[s].push(t);
                        let ctx = &seen[s];
                        let query = ctx.last().expect("just pushed");
                        for head in 0..h {
                            let g = head / (h / kvh);
                            let q = &query[head * d..][..d];
                            let scores: Vec<f64> = ctx
                                .iter()
                                .map(|t| {
                                    let k = &t[(h + g) * d..][..d];
                                    q.iter()
                                        .zip(k)
                                        .map(|(a, b)| *a as f64 * *b as f64)
                                        .sum::<f64>()
                                        * shape.scale as f64
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
                                    "h {h} kvh {kvh} d {d} bs {bs} seq {s} row {row} head {head} \
                                     dim {i}: {got} vs {exact}"
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
    /// prefill chunk ending at the context's end), `PROBE_REPS` (30):
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
        };
        let mut kv = CpuKvCache::new(KvCacheShape {
            num_layers: layers,
            num_blocks,
            block_size: bs,
            num_kv_heads: kvh,
            head_dim: d,
        });
        for layer in kv.k.iter_mut().chain(kv.v.iter_mut()) {
            for (i, x) in layer.iter_mut().enumerate() {
                *x = f16::from_f32((i % 1000) as f32 * 1e-3 - 0.5);
            }
        }
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
        let shapes = [1, kvh];
        let mut times = vec![Vec::new(); shapes.len()];
        for _ in 0..reps {
            for (t, &heads_per_task) in times.iter_mut().zip(&shapes) {
                let start = std::time::Instant::now();
                for layer in 0..layers {
                    attend_tasks(
                        &pool,
                        &qkv,
                        shape,
                        layer,
                        &kv,
                        &step,
                        &mut out,
                        heads_per_task,
                    );
                }
                t.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        for (t, heads_per_task) in times.iter_mut().zip(shapes) {
            t.sort_by(f64::total_cmp);
            println!(
                "probe attention {seqs} seqs × {queries} queries × ctx {ctx}, {heads_per_task} KV \
                 heads per task: median {:.2} ms, fastest {:.2} ms",
                t[t.len() / 2],
                t[0]
            );
        }
    }
}
