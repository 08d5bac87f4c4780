//! Paged attention on the CPU: RoPE, the K/V write into cache slots, and causal attention of
//! each query over its sequence's cached context, read through the block table.
//!
//! KV layout per layer, f16: K is `[num_blocks, num_kv_heads, head_dim, block_size]` (transposed
//! within a block, so a vector FMA scores 16 keys) and V is `[num_blocks, num_kv_heads,
//! block_size, head_dim]`. Work is split into tasks of (sequence, up to `QUERY_CHUNK` queries,
//! all KV heads or one; see [`attend`]); a task handles every query head of its KV heads (GQA),
//! so each K and V load serves all of them. No task splits a query's keys, so each output is
//! computed the same way whatever else is in the batch, how a prompt was chunked or how heads
//! were grouped into tasks.
//!
//! Files: `kv_cache.rs` (the cache and the K/V write), `step.rs` (per-step RoPE angles and the
//! task split), `kernels.rs` and `kernels_avx512.rs` (the inner loops), and ggml's two
//! kernels for `--cpu-numerics ggml`: `ggml.rs` (which one runs, and its task loop),
//! `ggml_one_query.rs`, `ggml_tiled.rs`. Tests against an f64 reference: `tests.rs`.

mod ggml;
mod ggml_one_query;
mod ggml_tiled;
mod kernels;
#[cfg(target_arch = "x86_64")]
mod kernels_avx512;
mod kv_cache;
mod step;
#[cfg(test)]
mod tests;

use std::cell::RefCell;

pub use kv_cache::{rope_and_store, CpuKvCache};
pub use step::{AttentionTask, CpuStep};

use super::backend::{CpuNumerics, CpuTensor};
use super::pool::{SyncPtr, ThreadPool};
use crate::kernels::AttentionShape;
use kernels::{
    accumulate_v, block_pair_scores, block_scores, softmax_numerators, GroupQuery, KvBlock, Scratch,
};

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
