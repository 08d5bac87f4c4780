//! Paged attention on the CPU: RoPE, the K/V write into cache slots, and causal attention of
//! each query over its sequence's cached context, read through the block table.
//!
//! KV layout per layer (f16; the 8-bit cache's is in `kernels_q8.rs`): K is `[num_blocks,
//! num_kv_heads, head_dim, block_size]` (transposed within a block, so a vector FMA scores 16
//! keys) and V is `[num_blocks, num_kv_heads, block_size, head_dim]`. Work is split into tasks
//! of (sequence, up to `QUERY_CHUNK` queries, all KV heads or one; see [`attend`]); a task
//! handles every query head of its KV heads (GQA), so each K and V load serves all of them.
//! No task splits a query's keys, so each output is computed the same way whatever else is in
//! the batch, how a prompt was chunked or how heads were grouped into tasks.
//!
//! Files: `kv_cache.rs` (the cache and the K/V write), `step.rs` (per-step RoPE angles and the
//! task split), `layer.rs` (a layer of either storage type, as the task loop reads it),
//! `kernels.rs`, `kernels_avx512.rs`, `kernels_avx2.rs` (the f16 inner loops) and
//! `kernels_q8.rs` (the 8-bit ones, with `kernels_avx2.rs`), and ggml's two
//! kernels for `--cpu-numerics ggml`: `ggml.rs` (which one runs, and its task loop),
//! `ggml_one_query.rs`, `ggml_tiled.rs`. Tests against an f64 reference: `tests.rs`.

mod ggml;
mod ggml_one_query;
mod ggml_tiled;
mod kernels;
#[cfg(target_arch = "x86_64")]
mod kernels_avx2;
#[cfg(target_arch = "x86_64")]
mod kernels_avx512;
mod kernels_q8;
mod kv_cache;
mod layer;
mod step;
#[cfg(test)]
mod tests;

use std::cell::RefCell;

pub use kv_cache::{rope_and_store, CpuKvCache};
pub use step::{AttentionTask, CpuStep};

use super::backend::{CpuNumerics, CpuTensor};
use super::pool::{SyncPtr, ThreadPool};
use super::rows;
use crate::kernels::AttentionShape;
use kernels::{softmax_numerators, GroupQuery, Scratch};
use kernels_q8::GROUP as GROUP_Q8;
use layer::{KvLayer, LayerFn, Part};

thread_local! {
    /// Per worker: scores `[group heads][context]`, each head's 1 / softmax sum, conversion space.
    static SCORES: RefCell<(Vec<f32>, Vec<f32>, Scratch)> =
        RefCell::new((Vec::new(), Vec::new(), Scratch::default()));
    /// Per worker: the task's query heads as 16-bit codes and their scales (8-bit caches).
    static QUERY16: RefCell<(Vec<i16>, Vec<f32>)> =
        const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Causal attention of every query over its sequence's cache (its last `shape.window` keys
/// where the layer has a sliding window); `out` is `[tokens, heads * d]`.
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
        return ggml::attend(pool, qkv, shape, layer, kv, step, out);
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
    let work = AttendTasks {
        pool,
        qkv,
        shape,
        step,
        out,
        heads_per_task,
    };
    kv.with_layer(layer, work);
}

/// [`attend_tasks`]' loop, over a layer of any storage type.
struct AttendTasks<'a> {
    pool: &'a ThreadPool,
    qkv: &'a CpuTensor,
    shape: AttentionShape,
    step: &'a CpuStep,
    out: &'a mut CpuTensor,
    heads_per_task: usize,
}

impl LayerFn for AttendTasks<'_> {
    type Output = ();

    fn call<L: KvLayer>(self, kv: L) {
        let Self {
            pool,
            qkv,
            shape,
            step,
            out,
            heads_per_task,
        } = self;
        let (h, kvh, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        let group = h / kvh;
        let bs = kv.block_size();
        out.resize(qkv.rows, h * d);
        let out_ptr = SyncPtr::new(&mut out.data);
        let parts = kvh / heads_per_task;
        pool.run(step.tasks.len() * parts, |i| {
            let task = step.tasks[i / parts];
            let g0 = i % parts * heads_per_task;
            let seq = &step.batch.seqs[task.seq];
            let (mut scores, mut query16) = (SCORES.take(), QUERY16.take());
            {
                let (scores, inv_sums, scratch) = &mut scores;
                let (q16, q16_scales) = &mut query16;
                for q in task.q_begin..task.q_end {
                    let row = seq.query_start + q;
                    let ctx = seq.context_len - seq.query_len + q + 1;
                    let task_q = &qkv.data[row * qkv.cols + g0 * group * d..];
                    if L::QUANTIZED_QUERY {
                        let task_q = &task_q[..heads_per_task * group * d];
                        kernels_q8::quantize_query(task_q, q16, q16_scales);
                    }
                    let gq = |g: usize| {
                        let at = (g - g0) * group * d;
                        GroupQuery {
                            q: &task_q[at..][..group * d],
                            heads: group,
                            head_dim: d,
                            scale: shape.scale,
                            q16: q16.get(at..).unwrap_or_default(),
                            q16_scales: q16_scales.get(at / GROUP_Q8..).unwrap_or_default(),
                        }
                    };
                    let block = |b: usize, g: usize| {
                        kv.block(seq.block_table[b] as usize, g, bs.min(ctx - b * bs))
                    };
                    let blocks = ctx.div_ceil(bs);
                    // A sliding window sees the last `window` keys: the blocks from the one
                    // holding the first of them. Scores rows start at that block.
                    let start = shape.window.map_or(0, |w| ctx.saturating_sub(w));
                    let first = start / bs;
                    let span = ctx - first * bs;
                    // Scores are `[KV head of the task][query head of its group][span]`.
                    let per_head = group * span;
                    scores.resize(heads_per_task * per_head, 0.0);
                    // Blocks lie anywhere in the pool, so the hardware cannot guess the next
                    // one: ask for its K (then its V) this many blocks ahead. Measured
                    // (`attention_probe`, one thread, 16 × 1,024): 8-bit 10% and f16 3% faster.
                    const AHEAD: usize = 4;
                    let prefetch = |b: usize, part: Part| {
                        if b < blocks {
                            for g in g0..g0 + heads_per_task {
                                L::prefetch(kv.block(seq.block_table[b] as usize, g, 0), part);
                            }
                        }
                    };
                    (first..first + AHEAD).for_each(|b| prefetch(b, Part::K));
                    for b in (first..blocks).step_by(2) {
                        prefetch(b + AHEAD, Part::K);
                        prefetch(b + 1 + AHEAD, Part::K);
                        for j in 0..heads_per_task {
                            let at = j * per_head + (b - first) * bs;
                            let (g, out) = (g0 + j, &mut scores[at..]);
                            if b + 1 < blocks {
                                L::pair_scores(
                                    gq(g),
                                    block(b, g),
                                    block(b + 1, g),
                                    out,
                                    span,
                                    scratch,
                                );
                            } else {
                                L::scores(gq(g), block(b, g), out, span, scratch);
                            }
                        }
                    }
                    (first..first + AHEAD).for_each(|b| prefetch(b, Part::V));
                    inv_sums.clear();
                    inv_sums.extend(scores.chunks_exact_mut(span).map(|row| {
                        if let Some(cap) = shape.softcap {
                            rows::softcap_row(row, cap);
                        }
                        // Keys of the first block before the window weigh nothing.
                        row[..start - first * bs].fill(f32::NEG_INFINITY);
                        1.0 / softmax_numerators(row)
                    }));
                    // SAFETY: (row, KV heads) ranges are disjoint across tasks, and the query heads
                    // of consecutive KV heads are contiguous in the output row.
                    let o = unsafe {
                        out_ptr.slice(row * h * d + g0 * group * d, heads_per_task * group * d)
                    };
                    o.fill(0.0);
                    for b in first..blocks {
                        prefetch(b + AHEAD, Part::V);
                        for (j, o) in o.chunks_exact_mut(group * d).enumerate() {
                            let p = &scores[j * per_head + (b - first) * bs..];
                            L::accumulate_v(group, p, span, block(b, g0 + j), d, o, scratch);
                        }
                    }
                    for (o, inv) in o.chunks_exact_mut(d).zip(inv_sums.iter()) {
                        for x in o {
                            *x *= inv;
                        }
                    }
                }
            }
            SCORES.set(scores);
            QUERY16.set(query16);
        });
    }
}
