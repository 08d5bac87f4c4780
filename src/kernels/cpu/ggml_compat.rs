//! ggml-compatible numerics for the CPU backend (`--cpu-numerics ggml`): every op performs the
//! float operations, in the order and at the precisions, that llama.cpp's CPU build performs
//! on an AVX-512 x86 machine (ggml at the commit of `tests/fixtures/`), so that the same
//! model file gives the same logits, bit for bit, and greedy runs never part at near-ties.
//!
//! What that takes, op by op (the ggml function each mirrors in brackets):
//! * **Matmul** (`ggml_vec_dot_q4_1_q8_1`, `ggml_vec_dot_q8_0_q8_0`): activations are quantized
//!   per block of 32 with `d = max|x| / 127` stored as f16, `q = round(x · 127 / max|x|)` and,
//!   for Q4_1, `s = f16(d · Σq)`. A block's integer dot is kept as 8 partial sums of 4
//!   products; each is accumulated in its own f32 lane as `fma(dw · dx, sum, lane)`, the lanes
//!   are added with a fixed tree (`hsum_float_8`) and Q4_1's min terms `Σ m · s` are summed
//!   apart and added last.
//! * **RMSNorm** (`ggml_compute_forward_rms_norm_f32`): squares summed in f64.
//! * **SiLU** (`ggml_v_silu`): ggml's vector `exp` approximation, then `x / (1 + e)`.
//! * **RoPE** (`ggml_rope_cache_init`): angles by repeated multiplication with
//!   `base^(-2/d)`, `cosf`/`sinf` of them.
//! * **Attention**, with whichever of ggml's two kernels llama.cpp's server would run for the
//!   token ([`attends_tiled`]): one query at a time (`..._f16_one_chunk`: f16 query against
//!   f16 keys, dot summed in a fixed tree, online softmax with `expf`, V accumulated in an f16
//!   vector rounded after every key), or tiled for prompt tokens it batches 64 or more at a
//!   time (`..._tiled`: f32 query, a softmax per tile of 64 keys with the vector `exp`, V
//!   accumulated in f32).
//!
//! This is slower than the default numerics (no repacked weights, no AMX, f16 round trips in
//! attention), and less accurate in attention; it exists so that sluice can be held to
//! llama.cpp's outputs exactly. Each output still depends only on its own row and sequence,
//! so batch invariance holds here too.

use half::f16;

use super::ops::{simd_dispatch, v_expf};

/// Scratch space of [`attend_kv_head`], reused across calls.
#[derive(Default)]
pub struct AttnScratch {
    /// A block's K as f32, `[head_dim][block_size]`, and V, `[block_size][head_dim]`.
    kf: Vec<f32>,
    vf: Vec<f32>,
    /// The 4 × 16 lane sums of `ggml_vec_dot_f16` per key, `[64][block_size]`.
    lanes: Vec<f32>,
    scores: Vec<f32>,
    /// `VKQ16` (`VKQ32` when tiled) of each query head, `[group][head_dim]`.
    acc: Vec<f32>,
    tmp: Vec<f16>,
    /// The query heads as the kernel meets the keys (f16 precision for one query at a time).
    query: Vec<f32>,
    /// The tiled kernel's keys as f32, `[head_dim][tiled_cap]`, and values, `[key][head_dim]`:
    /// converted once per task, the first `tiled_keys` so far.
    kt: Vec<f32>,
    vt: Vec<f32>,
    tiled_cap: usize,
    tiled_keys: usize,
    /// The one-query kernel's running maximum and sum per query head (`M`, `S`).
    max: Vec<f32>,
    sum: Vec<f32>,
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
    fn base(&self, b: usize) -> usize {
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
        attend_kv_head_dispatch(q, kv, ctx, scale, out, scratch)
    }
}

/// Keys per tile of ggml's tiled kernel (`GGML_FA_TILE_KV`).
const KV_TILE: usize = 64;

/// The tiled kernel for one query: f32 query and keys, scores as an FMA chain over the head
/// dimensions, per tile of 64 keys a max, a rescale when it rises, `ggml_v_expf` weights
/// summed per 16 in f64, and V accumulated in f32 key by key.
#[inline(always)]
fn attend_kv_head_tiled_body(
    q: &[f32],
    kv: &KvHead<'_>,
    ctx: usize,
    scale: f32,
    out: &mut [f32],
    scratch: &mut AttnScratch,
) {
    let d = kv.head_dim;
    let bs = kv.block_size;
    let AttnScratch {
        kt,
        vt,
        tiled_cap,
        tiled_keys,
        scores,
        acc,
        ..
    } = scratch;
    let cap = *tiled_cap;
    assert!(ctx <= cap, "a query past its task's keys");
    kt.resize(d * cap, 0.0);
    vt.resize(cap * d, 0.0);
    // The keys this query sees beyond the task's earlier queries: K as `[dim][key]` (so a
    // vector FMA scores consecutive keys) and V as `[key][dim]`, f32.
    for t in *tiled_keys..ctx {
        let base = kv.base(t / bs);
        let slot = t % bs;
        for i in 0..d {
            kt[i * cap + t] = kv.k[base + i * bs + slot].to_f32();
        }
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(
            &kv.v[base + slot * d..][..d],
            &mut vt[t * d..][..d],
        );
    }
    *tiled_keys = (*tiled_keys).max(ctx);
    scores.resize(KV_TILE, 0.0);
    acc.clear();
    acc.resize(d, 0.0);
    for (qh, o) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        acc.fill(0.0);
        let (mut max, mut sum) = (f32::NEG_INFINITY, 0.0f32);
        for t0 in (0..ctx).step_by(KV_TILE) {
            let n = KV_TILE.min(ctx - t0);
            // Per key an FMA chain over the dimensions in order, 64 keys side by side.
            scores.fill(0.0);
            for (i, &x) in qh.iter().enumerate() {
                let row = &kt[i * cap + t0..][..n];
                for (s, &k) in scores.iter_mut().zip(row) {
                    *s = k.mul_add(x, *s);
                }
            }
            for (j, s) in scores.iter_mut().enumerate() {
                *s = if j < n { *s * scale } else { f32::NEG_INFINITY };
            }
            let tile_max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let new_max = max.max(tile_max);
            if new_max > max {
                let ms = (max - new_max).exp();
                for a in acc.iter_mut() {
                    *a *= ms;
                }
                sum *= ms;
            }
            max = new_max;
            // `ggml_vec_soft_max_f32`: weights in place, summed 16 at a time (16 → 8 → 4 → 2
            // → 1) into an f64.
            let mut total = 0.0f64;
            for chunk in scores.chunks_exact_mut(16) {
                for s in chunk.iter_mut() {
                    *s = v_expf(*s - max);
                }
                let t: [f32; 8] = std::array::from_fn(|i| chunk[i] + chunk[i + 8]);
                let u: [f32; 4] = std::array::from_fn(|i| t[i] + t[i + 4]);
                total += ((u[0] + u[2]) + (u[1] + u[3])) as f64;
            }
            sum = (sum as f64 + total) as f32;
            for (j, &p) in scores.iter().enumerate().take(n) {
                for (a, &v) in acc.iter_mut().zip(&vt[(t0 + j) * d..][..d]) {
                    *a = v.mul_add(p, *a);
                }
            }
        }
        let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
        for (o, a) in o.iter_mut().zip(acc.iter()) {
            *o = a * inv;
        }
    }
}

simd_dispatch!(
    fn attend_kv_head_tiled(q: &[f32], kv: &KvHead<'_>, ctx: usize, scale: f32, out: &mut [f32], scratch: &mut AttnScratch) => attend_kv_head_tiled_body
);

#[inline(always)]
fn attend_kv_head_body(
    q: &[f32],
    kv: &KvHead<'_>,
    ctx: usize,
    scale: f32,
    out: &mut [f32],
    scratch: &mut AttnScratch,
) {
    let d = kv.head_dim;
    let (bs, group) = (kv.block_size, q.len() / d);
    let AttnScratch {
        kf,
        vf,
        lanes,
        scores,
        acc,
        tmp,
        query,
        max,
        sum,
        ..
    } = scratch;
    // The query meets the f16 keys as f16 (`q_to_vec_dot`).
    query.clear();
    query.extend_from_slice(q);
    tmp.resize(d, f16::ZERO);
    for h in query.chunks_exact_mut(d) {
        round_to_f16(h, tmp);
    }
    let q = &query[..];
    kf.resize(d * bs, 0.0);
    vf.resize(d * bs, 0.0);
    lanes.resize(64 * bs, 0.0);
    scores.resize(bs, 0.0);
    acc.clear();
    acc.resize(group * d, 0.0);
    tmp.resize(d, f16::ZERO);
    max.clear();
    max.resize(group, f32::NEG_INFINITY);
    sum.clear();
    sum.resize(group, 0.0);
    let np = d & !63;
    for b in 0..ctx.div_ceil(bs) {
        let base = kv.base(b);
        let n = bs.min(ctx - b * bs);
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(&kv.k[base..][..d * bs], kf);
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(&kv.v[base..][..d * bs], vf);
        for (hq, qh) in q.chunks_exact(d).enumerate() {
            // `ggml_vec_dot_f16` for every key of the block at once: lane (j, l) of a key
            // sums dimensions 64·step + 16·j + l.
            lanes.fill(0.0);
            for step in (0..np).step_by(64) {
                for jl in 0..64 {
                    let (x, row) = (qh[step + jl], &kf[(step + jl) * bs..][..bs]);
                    for (s, &k) in lanes[jl * bs..][..bs].iter_mut().zip(row) {
                        *s = k.mul_add(x, *s);
                    }
                }
            }
            let lane = |i: usize, key: usize| lanes[i * bs + key];
            for (key, score) in scores.iter_mut().enumerate().take(n) {
                let v: [f32; 16] = std::array::from_fn(|l| {
                    (lane(l, key) + lane(32 + l, key)) + (lane(16 + l, key) + lane(48 + l, key))
                });
                let t: [f32; 8] = std::array::from_fn(|i| v[i] + v[i + 8]);
                let u: [f32; 4] = std::array::from_fn(|i| t[i] + t[i + 4]);
                let mut s = ((u[0] + u[2]) + (u[1] + u[3])) as f64;
                for i in np..d {
                    s += (kf[i * bs + key] * qh[i]) as f64;
                }
                *score = s as f32 * scale;
            }
            let acc = &mut acc[hq * d..][..d];
            for (key, &score) in scores.iter().enumerate().take(n) {
                let (mut ms, mut vs) = (1.0f32, 1.0f32);
                if score > max[hq] {
                    ms = (max[hq] - score).exp();
                    max[hq] = score;
                    for a in acc.iter_mut() {
                        *a *= ms;
                    }
                    round_to_f16(acc, tmp);
                } else {
                    vs = (score - max[hq]).exp();
                }
                for (a, &v) in acc.iter_mut().zip(&vf[key * d..][..d]) {
                    *a = v.mul_add(vs, *a);
                }
                round_to_f16(acc, tmp);
                sum[hq] = sum[hq].mul_add(ms, vs);
            }
        }
    }
    for ((o, a), s) in out
        .chunks_exact_mut(d)
        .zip(acc.chunks_exact(d))
        .zip(sum.iter())
    {
        let inv = if *s == 0.0 { 0.0 } else { 1.0 / s };
        for (o, a) in o.iter_mut().zip(a) {
            *o = a * inv;
        }
    }
}

simd_dispatch!(
    fn attend_kv_head_dispatch(q: &[f32], kv: &KvHead<'_>, ctx: usize, scale: f32, out: &mut [f32], scratch: &mut AttnScratch) => attend_kv_head_body
);

/// Rounds every value to f16 precision (round half to even, as `vcvtps2ph`).
#[inline(always)]
fn round_to_f16(x: &mut [f32], tmp: &mut [f16]) {
    use half::slice::HalfFloatSliceExt;
    let tmp = &mut tmp[..x.len()];
    tmp.convert_from_f32_slice(x);
    tmp.convert_to_f32_slice(x);
}
