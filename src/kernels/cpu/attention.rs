//! Paged attention on the CPU: RoPE, the K/V write into cache slots, and causal attention of
//! each query over its sequence's cached context, read through the block table.
//!
//! KV layout per layer (K and V alike): `[num_blocks, num_kv_heads, block_size, head_dim]` f32.
//! Work is split into tasks of (sequence, KV head, up to `QUERY_CHUNK` queries); a task
//! handles every query head of its KV head (GQA), so a block of keys read for one query head
//! is still in cache for the next. No task splits a query's keys, so each output is computed
//! the same way whatever else is in the batch or how a prompt was chunked.

use std::cell::RefCell;

use super::backend::CpuTensor;
use super::ops::{axpy, dot, rope_head, simd_dispatch};
use super::pool::{SyncPtr, ThreadPool};
use crate::kernels::{AttentionShape, ForwardBatch, KvCacheShape};

/// Queries per attention task.
const QUERY_CHUNK: usize = 16;
/// Tokens per RoPE/store task.
const ROPE_CHUNK: usize = 32;

/// K and V of every layer.
pub struct CpuKvCache {
    pub shape: KvCacheShape,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl CpuKvCache {
    pub fn new(shape: KvCacheShape) -> Self {
        let per_layer = shape.num_blocks * shape.num_kv_heads * shape.block_size * shape.head_dim;
        Self {
            shape,
            k: (0..shape.num_layers)
                .map(|_| vec![0.0; per_layer])
                .collect(),
            v: (0..shape.num_layers)
                .map(|_| vec![0.0; per_layer])
                .collect(),
        }
    }

    /// Offset of (block, kv head, offset in block) in a layer's buffer.
    fn index(&self, block: usize, head: usize, offset: usize) -> usize {
        let s = &self.shape;
        ((block * s.num_kv_heads + head) * s.block_size + offset) * s.head_dim
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
}

impl CpuStep {
    pub fn new(batch: &ForwardBatch, rope: &crate::kernels::Rope) -> Self {
        let half = rope.inv_freqs.len();
        let n = batch.num_tokens();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for &p in &batch.positions {
            for &f in &rope.inv_freqs {
                let (s, c) = (p as f32 * f).sin_cos();
                cos.push(c);
                sin.push(s);
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
        }
    }
}

/// Rounds values to f16 precision. The cache holds K and V at the precision of an f16 cache
/// (llama.cpp's default, and what a GPU cache holds), and queries meet keys at that precision
/// too, so results agree with those engines to near-ties rather than drifting apart.
#[inline]
fn round_to_f16(x: &mut [f32]) {
    for v in x {
        *v = half::f16::from_f32(*v).to_f32();
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
    let index: Vec<usize> = step
        .batch
        .slot_mapping
        .iter()
        .map(|&slot| kv.index(slot as usize / bs, 0, slot as usize % bs))
        .collect();
    let head_stride = bs * d;
    let k_ptr = SyncPtr::new(&mut kv.k[layer]);
    let v_ptr = SyncPtr::new(&mut kv.v[layer]);
    pool.run(n.div_ceil(ROPE_CHUNK), |task| {
        let first = task * ROPE_CHUNK;
        let last = ((task + 1) * ROPE_CHUNK).min(n);
        for (t, &slot_index) in index.iter().enumerate().take(last).skip(first) {
            // SAFETY: each token row, and each token's cache slot, belongs to one task.
            let row = unsafe { qkv_ptr.slice(t * cols, cols) };
            let (cos, sin) = (&step.cos[t * half..][..half], &step.sin[t * half..][..half]);
            for head in row[..(h + kvh) * d].chunks_exact_mut(d) {
                rope_head(head, cos, sin, step.interleaved);
                round_to_f16(head);
            }
            round_to_f16(&mut row[(h + kvh) * d..(h + 2 * kvh) * d]);
            for g in 0..kvh {
                let at = slot_index + g * head_stride;
                // SAFETY: slots are distinct per token; see above.
                unsafe {
                    k_ptr
                        .slice(at, d)
                        .copy_from_slice(&row[(h + g) * d..(h + g + 1) * d]);
                    v_ptr
                        .slice(at, d)
                        .copy_from_slice(&row[(h + kvh + g) * d..(h + kvh + g + 1) * d]);
                }
            }
        }
    });
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
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
    let (h, kvh, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    out.resize(qkv.rows, h * d);
    let out_ptr = SyncPtr::new(&mut out.data);
    let (k, v) = (&kv.k[layer][..], &kv.v[layer][..]);
    let num_tasks = step.tasks.len() * kvh;
    pool.run(num_tasks, |i| {
        let task = step.tasks[i / kvh];
        let g = i % kvh;
        let seq = &step.batch.seqs[task.seq];
        SCORES.with(|scores| {
            let mut scores = scores.borrow_mut();
            for q in task.q_begin..task.q_end {
                let row = seq.query_start + q;
                let ctx = seq.context_len - seq.query_len + q + 1;
                for head in g * (h / kvh)..(g + 1) * (h / kvh) {
                    let query = &qkv.data[row * qkv.cols + head * d..][..d];
                    // SAFETY: (row, head) pairs are disjoint across tasks.
                    let o = unsafe { out_ptr.slice(row * h * d + head * d, d) };
                    attend_one(
                        AttendOne {
                            query,
                            k,
                            v,
                            block_table: &seq.block_table,
                            ctx,
                            kv_head: g,
                            shape: &kv.shape,
                            scale: shape.scale,
                        },
                        &mut scores,
                        o,
                    );
                }
            }
        });
    });
}

struct AttendOne<'a> {
    query: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    block_table: &'a [u32],
    ctx: usize,
    kv_head: usize,
    shape: &'a KvCacheShape,
    scale: f32,
}

#[inline(always)]
fn attend_one_body(a: AttendOne<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    let d = a.shape.head_dim;
    let bs = a.shape.block_size;
    let block_base =
        |b: usize| ((a.block_table[b] as usize * a.shape.num_kv_heads + a.kv_head) * bs) * d;
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for b in 0..a.ctx.div_ceil(bs) {
        let base = block_base(b);
        let n = bs.min(a.ctx - b * bs);
        for j in 0..n {
            let s = dot(a.query, &a.k[base + j * d..][..d]) * a.scale;
            max = max.max(s);
            scores.push(s);
        }
    }
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    for b in 0..a.ctx.div_ceil(bs) {
        let base = block_base(b);
        let n = bs.min(a.ctx - b * bs);
        for j in 0..n {
            axpy(scores[b * bs + j], &a.v[base + j * d..][..d], out);
        }
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

simd_dispatch!(
    fn attend_one(a: AttendOne<'_>, scores: &mut Vec<f32>, out: &mut [f32]) => attend_one_body
);
