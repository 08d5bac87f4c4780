//! Attention as llama.cpp's CPU build computes it (`--cpu-numerics ggml`; see
//! `kernels/cpu/mod.rs`), with whichever of ggml's two flash-attention kernels llama.cpp's
//! server would run for the token ([`attends_tiled`]): one query at a time
//! (`ggml_one_query.rs`: f16 query against f16 keys, dot summed in a fixed tree, online
//! softmax with `expf`, V accumulated in an f16 vector rounded after every key), or tiled for
//! prompt tokens it batches 64 or more at a time (`ggml_tiled.rs`: f32 query, a softmax per
//! tile of 64 keys with the vector `exp`, V accumulated in f32). Here: that choice, a KV
//! head's view of the cache, the kernels' scratch and the task loop. Each output depends only
//! on its own query and sequence, so batch invariance holds here too.

use std::cell::RefCell;

use half::f16;

use super::ggml_one_query::attend_kv_head_one_query;
use super::ggml_tiled::attend_kv_head_tiled;
use super::kv_cache::CpuKvCache;
use super::step::CpuStep;
use crate::kernels::cpu::backend::CpuTensor;
use crate::kernels::cpu::pool::{SyncPtr, ThreadPool};
use crate::kernels::AttentionShape;

/// Scratch space of [`attend_kv_head`], reused across calls.
#[derive(Default)]
pub struct AttnScratch {
    /// A block's K as f32, `[head_dim][block_size]`, and V, `[block_size][head_dim]`.
    pub(super) kf: Vec<f32>,
    pub(super) vf: Vec<f32>,
    /// The 4 × 16 lane sums of `ggml_vec_dot_f16` per key, `[64][block_size]`.
    pub(super) lanes: Vec<f32>,
    pub(super) scores: Vec<f32>,
    /// `VKQ16` (`VKQ32` when tiled) of each query head, `[group][head_dim]`.
    pub(super) acc: Vec<f32>,
    pub(super) tmp: Vec<f16>,
    /// The query heads as the kernel meets the keys (f16 precision for one query at a time).
    pub(super) query: Vec<f32>,
    /// The tiled kernel's keys as f32, `[head_dim][tiled_cap]`, and values, `[key][head_dim]`:
    /// converted once per task, the first `tiled_keys` so far.
    pub(super) kt: Vec<f32>,
    pub(super) vt: Vec<f32>,
    pub(super) tiled_cap: usize,
    pub(super) tiled_keys: usize,
    /// The one-query kernel's running maximum and sum per query head (`M`, `S`).
    pub(super) max: Vec<f32>,
    pub(super) sum: Vec<f32>,
}

impl AttnScratch {
    /// Starts a task (one KV head, queries in order) whose last query sees `max_ctx` keys.
    pub fn begin_task(&mut self, max_ctx: usize) {
        self.tiled_cap = max_ctx;
        self.tiled_keys = 0;
    }
}

/// One KV head's cached keys and values in the paged layout: per block, K `[head_dim]
/// [block_size]` and V `[block_size][head_dim]`, the head's region of block `block_table[b]`
/// for the sequence's `b`-th block.
pub struct KvHead<'a> {
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub block_table: &'a [u32],
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head: usize,
    pub head_dim: usize,
}

impl KvHead<'_> {
    /// Where the sequence's `b`-th block of this head starts in `k` and `v`.
    #[inline(always)]
    pub(super) fn base(&self, b: usize) -> usize {
        (self.block_table[b] as usize * self.num_kv_heads + self.head)
            * self.block_size
            * self.head_dim
    }
}

/// Query positions llama.cpp's server processes together with position `pos` of a prompt of
/// `prompt_len` tokens: it decodes a prompt in micro-batches of 512.
fn llama_ubatch_len(prompt_len: usize, pos: usize) -> usize {
    const UBATCH: usize = 512;
    (prompt_len - pos / UBATCH * UBATCH).min(UBATCH)
}

/// Whether llama.cpp attends from position `pos` with its tiled kernel (prompt tokens it
/// processes 64 or more at a time, `GGML_FA_TILE_Q`) rather than one query at a time.
pub fn attends_tiled(prompt_len: usize, pos: usize) -> bool {
    pos < prompt_len && llama_ubatch_len(prompt_len, pos) >= 64
}

/// Attention of the query heads `q` (`[group][head_dim]`, f32) of one KV head over its first
/// `ctx` cached keys, as ggml computes it: with `ggml_compute_forward_flash_attn_ext_tiled`
/// when `tiled`, else `ggml_compute_forward_flash_attn_ext_f16_one_chunk`. Writes `out` (same
/// shape as `q`).
#[allow(clippy::too_many_arguments)]
pub fn attend_kv_head(
    q: &[f32],
    kv: &KvHead<'_>,
    ctx: usize,
    scale: f32,
    tiled: bool,
    out: &mut [f32],
    scratch: &mut AttnScratch,
) {
    if tiled {
        attend_kv_head_tiled(q, kv, ctx, scale, out, scratch)
    } else {
        attend_kv_head_one_query(q, kv, ctx, scale, out, scratch)
    }
}

/// [`super::attend`] as ggml's CPU flash attention computes it, with whichever of its two
/// kernels llama.cpp would run for each query ([`attends_tiled`]). Tasks are (query chunk, KV
/// head).
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
    let group = h / kvh;
    let bs = kv.shape.block_size;
    out.resize(qkv.rows, h * d);
    let out_ptr = SyncPtr::new(&mut out.data);
    let Some((k, v)) = kv.f16_layer(layer) else {
        unreachable!("the ggml numerics refuse an 8-bit cache when it is made (`CpuBackend`)");
    };
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
                let tiled = attends_tiled(seq.prompt_len, ctx - 1);
                attend_kv_head(query, &head, ctx, shape.scale, tiled, o, scratch);
            }
        });
    });
}

thread_local! {
    static GGML_SCRATCH: RefCell<AttnScratch> = RefCell::new(AttnScratch::default());
}
