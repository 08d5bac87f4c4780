//! ggml's one-query flash-attention kernel (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`),
//! which llama.cpp runs for every token it does not attend from tiled (see `ggml.rs`).

use half::f16;

use super::ggml::{AttnScratch, KvHead};
use crate::kernels::cpu::ops::simd_dispatch;

/// The one-query kernel: the query rounded to f16, per key `ggml_vec_dot_f16`'s 4 × 16 lanes
/// summed in a fixed tree, an online softmax with `expf`, and V accumulated into an f16 vector
/// rounded after every key.
#[inline(always)]
fn attend_kv_head_one_query_body(
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
    pub(super) fn attend_kv_head_one_query(q: &[f32], kv: &KvHead<'_>, ctx: usize, scale: f32, out: &mut [f32], scratch: &mut AttnScratch) => attend_kv_head_one_query_body
);

/// Rounds every value to f16 precision (round half to even, as `vcvtps2ph`).
#[inline(always)]
fn round_to_f16(x: &mut [f32], tmp: &mut [f16]) {
    use half::slice::HalfFloatSliceExt;
    let tmp = &mut tmp[..x.len()];
    tmp.convert_from_f32_slice(x);
    tmp.convert_to_f32_slice(x);
}
