//! ggml's tiled flash-attention kernel (`ggml_compute_forward_flash_attn_ext_tiled`), which
//! llama.cpp runs for prompt tokens it processes 64 or more at a time (see `ggml.rs`).

use super::ggml::{AttnScratch, KvHead};
use crate::kernels::cpu::ops::{simd_dispatch, v_expf};

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
    pub(super) fn attend_kv_head_tiled(q: &[f32], kv: &KvHead<'_>, ctx: usize, scale: f32, out: &mut [f32], scratch: &mut AttnScratch) => attend_kv_head_tiled_body
);
