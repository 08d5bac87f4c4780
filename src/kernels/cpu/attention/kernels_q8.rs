//! The inner loops of CPU paged attention over an 8-bit cache (`--kv-cache-dtype int8`):
//! llama.cpp's q8_0 storage, each run of 32 values of one token's K or V head (along the head
//! dimension) as 32 signed codes and one f16 scale, `x ≈ scale · code`.
//!
//! Per (block, KV head), K codes are `[head_dim / 2][block_size][2]` (transposed in pairs of
//! dimensions, so one 16-bit multiply-add takes two dimensions of 8 keys) with scales
//! `[head_dim / 32][block_size]`; V codes are `[block_size][head_dim]` with scales
//! `[block_size][head_dim / 32]`.
//!
//! Dequantization is fused into the dot products. A key's score is integer arithmetic per
//! group of 32 dimensions: the query is quantized once per position to 16-bit codes with
//! one scale per group ([`quantize_query`]: a relative error of 2⁻¹⁶, far below the cache's
//! 2⁻⁸), the group's `Σ q16 · code` is exact in i32, and the groups are added in f32 as
//! `fma(sum, k_scale · q_scale, total)`. A value row is added as `(p · scale) · code` per
//! group, in f32. The AVX2 loops (`kernels_avx2.rs`) perform these float operations in this
//! order, so both paths give the same bits (tested).

use half::f16;

use super::kernels::GroupQuery;
#[cfg(target_arch = "x86_64")]
use super::kernels_avx2 as avx2;
use crate::kernels::cpu::ops::{simd_dispatch, simd_level, SimdLevel};

/// Values per quantization group (llama.cpp's `QK8_0`).
pub const GROUP: usize = 32;
/// Query heads whose accumulators the AVX2 loops keep in registers together.
const HEAD_GROUP: usize = 3;

/// One block of one KV head in the 8-bit cache (layouts in the module docs); the first `n`
/// keys are part of the context.
#[derive(Clone, Copy)]
pub struct KvBlockQ8<'a> {
    pub k: &'a [i8],
    pub k_scales: &'a [f16],
    pub v: &'a [i8],
    pub v_scales: &'a [f16],
    pub block_size: usize,
    pub n: usize,
}

/// Quantizes 32 values as llama.cpp's `quantize_row_q8_0` does: `d = max|x| / 127`, codes
/// `round(x / d)`, `d` stored as f16.
#[inline]
pub fn quantize_group(x: &[f32], codes: &mut [i8; GROUP]) -> f16 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = (v * id).round() as i8;
    }
    f16::from_f32(d)
}

/// Quantizes query heads (`[heads][head_dim]`) to 16-bit codes, one scale per 32 values:
/// `d = max|x| / 32767`, codes `round(x / d)`.
pub fn quantize_query(q: &[f32], codes: &mut Vec<i16>, scales: &mut Vec<f32>) {
    codes.clear();
    scales.clear();
    for part in q.chunks_exact(GROUP) {
        let amax = part.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let id = if amax > 0.0 { 32767.0 / amax } else { 0.0 };
        codes.extend(part.iter().map(|&v| (v * id).round() as i16));
        scales.push(amax / 32767.0);
    }
}

/// Where K's dimension `i` of key `j` sits in a (block, head) region.
#[inline(always)]
pub fn k_index(i: usize, j: usize, block_size: usize) -> usize {
    (i / 2 * block_size + j) * 2 + i % 2
}

/// `scores[h * stride + j] = scale * Σ_g (ks_gj · qs_hg) · Σ_{i∈g} q16_hi · c_ij` for the
/// block's `n` keys.
pub fn block_scores_q8(gq: GroupQuery<'_>, blk: KvBlockQ8<'_>, scores: &mut [f32], stride: usize) {
    let (d, bs) = (gq.head_dim, blk.block_size);
    assert!(d.is_multiple_of(GROUP) && gq.q16.len() >= gq.heads * d);
    assert!(gq.q16_scales.len() >= gq.heads * d / GROUP);
    assert!(blk.k.len() >= d * bs && blk.k_scales.len() >= d / GROUP * bs);
    assert!(scores.len() >= (gq.heads - 1) * stride + blk.n);
    #[cfg(target_arch = "x86_64")]
    if simd_level() != SimdLevel::Portable && bs.is_multiple_of(16) {
        let mut h0 = 0;
        while h0 < gq.heads {
            let hn = (gq.heads - h0).min(HEAD_GROUP);
            let q = (&gq.q16[h0 * d..], &gq.q16_scales[h0 * d / GROUP..]);
            let out = &mut scores[h0 * stride..];
            // SAFETY: AVX2, FMA and F16C were detected (every level but Portable has them);
            // the asserts above bound every access, and a 16-key chunk stays in the block.
            unsafe {
                match hn {
                    1 => avx2::scores_q8::<1>(q, d, blk, gq.scale, out, stride),
                    2 => avx2::scores_q8::<2>(q, d, blk, gq.scale, out, stride),
                    _ => avx2::scores_q8::<3>(q, d, blk, gq.scale, out, stride),
                }
            }
            h0 += hn;
        }
        return;
    }
    scores_q8_portable(gq, blk, scores, stride);
}

/// `out_h += Σ_j p[h * stride + j] · v_j` over the block's `n` keys, in key order, `v_j`
/// dequantized group by group; `out` is `[heads][head_dim]`.
pub fn accumulate_v_q8(
    heads: usize,
    p: &[f32],
    stride: usize,
    blk: KvBlockQ8<'_>,
    d: usize,
    out: &mut [f32],
) {
    assert!(d.is_multiple_of(GROUP) && out.len() >= heads * d);
    assert!(blk.v.len() >= blk.n * d && blk.v_scales.len() >= blk.n * d / GROUP);
    assert!(p.len() >= (heads - 1) * stride + blk.n);
    #[cfg(target_arch = "x86_64")]
    if simd_level() != SimdLevel::Portable {
        let mut h0 = 0;
        while h0 < heads {
            let hn = (heads - h0).min(HEAD_GROUP);
            let (p, out) = (&p[h0 * stride..], &mut out[h0 * d..]);
            // SAFETY: AVX2, FMA and F16C were detected; the asserts above bound every access.
            unsafe {
                match hn {
                    1 => avx2::accumulate_v_q8::<1>(p, stride, blk, d, out),
                    2 => avx2::accumulate_v_q8::<2>(p, stride, blk, d, out),
                    _ => avx2::accumulate_v_q8::<3>(p, stride, blk, d, out),
                }
            }
            h0 += hn;
        }
        return;
    }
    accumulate_v_q8_portable(heads, p, stride, blk, d, out);
}

#[inline(always)]
fn scores_q8_portable_body(
    gq: GroupQuery<'_>,
    blk: KvBlockQ8<'_>,
    scores: &mut [f32],
    stride: usize,
) {
    let (d, bs, groups) = (gq.head_dim, blk.block_size, gq.head_dim / GROUP);
    for h in 0..gq.heads {
        let q = &gq.q16[h * d..][..d];
        for j in 0..blk.n {
            let mut total = 0.0f32;
            for g in 0..groups {
                let sum: i32 = (g * GROUP..(g + 1) * GROUP)
                    .map(|i| q[i] as i32 * blk.k[k_index(i, j, bs)] as i32)
                    .sum();
                let w = blk.k_scales[g * bs + j].to_f32() * gq.q16_scales[h * groups + g];
                total = (sum as f32).mul_add(w, total);
            }
            scores[h * stride + j] = total * gq.scale;
        }
    }
}

simd_dispatch!(
    fn scores_q8_portable(gq: GroupQuery<'_>, blk: KvBlockQ8<'_>, scores: &mut [f32], stride: usize) => scores_q8_portable_body
);

#[inline(always)]
fn accumulate_v_q8_portable_body(
    heads: usize,
    p: &[f32],
    stride: usize,
    blk: KvBlockQ8<'_>,
    d: usize,
    out: &mut [f32],
) {
    let groups = d / GROUP;
    for h in 0..heads {
        let o = &mut out[h * d..][..d];
        for j in 0..blk.n {
            let pj = p[h * stride + j];
            for (g, o) in o.chunks_exact_mut(GROUP).enumerate() {
                let w = pj * blk.v_scales[j * groups + g].to_f32();
                let codes = &blk.v[j * d + g * GROUP..][..GROUP];
                for (o, &c) in o.iter_mut().zip(codes) {
                    *o = w.mul_add(c as f32, *o);
                }
            }
        }
    }
}

simd_dispatch!(
    fn accumulate_v_q8_portable(heads: usize, p: &[f32], stride: usize, blk: KvBlockQ8<'_>, d: usize, out: &mut [f32]) => accumulate_v_q8_portable_body
);

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn quantize_group_is_llama_cpp_q8_0() {
        let mut x = [0.0f32; GROUP];
        for (i, v) in x.iter_mut().enumerate() {
            *v = (i as f32 - 12.5) * 0.1;
        }
        let mut codes = [0i8; GROUP];
        let d = quantize_group(&x, &mut codes);
        // max |x| = 1.85 at i = 31: its code is 127 and d = 1.85 / 127.
        assert_eq!(d, f16::from_f32(1.85 / 127.0));
        assert_eq!(codes[31], 127);
        assert_eq!(codes[0], (-1.25f32 * 127.0 / 1.85).round() as i8);
        let mut zeros = [1i8; GROUP];
        assert_eq!(quantize_group(&[0.0; GROUP], &mut zeros), f16::ZERO);
        assert_eq!(zeros, [0; GROUP]);
    }

    /// Both paths against an f64 evaluation over the dequantized values, and against each
    /// other bit for bit (when AVX2 is there to compare).
    #[test]
    fn paths_agree_with_each_other_and_with_f64() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for &(heads, d, bs, n) in &[
            (1, 64, 16, 16),
            (3, 64, 16, 7),
            (4, 128, 16, 16),
            (7, 96, 32, 29),
            (3, 64, 8, 5),
            (2, 32, 64, 1),
        ] {
            let q: Vec<f32> = (0..heads * d)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let codes = |rng: &mut ChaCha8Rng, n| -> Vec<i8> {
                (0..n).map(|_| rng.random_range(-127..=127)).collect()
            };
            let scales = |rng: &mut ChaCha8Rng, n| -> Vec<f16> {
                (0..n)
                    .map(|_| f16::from_f32(rng.random_range(0.001..0.02)))
                    .collect()
            };
            let (k, v) = (codes(&mut rng, d * bs), codes(&mut rng, bs * d));
            let (ks, vs) = (
                scales(&mut rng, d / GROUP * bs),
                scales(&mut rng, bs * d / GROUP),
            );
            let blk = KvBlockQ8 {
                k: &k,
                k_scales: &ks,
                v: &v,
                v_scales: &vs,
                block_size: bs,
                n,
            };
            let (mut q16, mut q16_scales) = (Vec::new(), Vec::new());
            quantize_query(&q, &mut q16, &mut q16_scales);
            let gq = GroupQuery {
                q: &q,
                heads,
                head_dim: d,
                scale: 0.125,
                q16: &q16,
                q16_scales: &q16_scales,
            };
            let stride = n + 3;
            let mut fast = vec![0.0f32; heads * stride];
            block_scores_q8(gq, blk, &mut fast, stride);
            let mut portable = vec![0.0f32; heads * stride];
            scores_q8_portable_body(gq, blk, &mut portable, stride);
            assert_eq!(fast, portable, "scores heads {heads} d {d} bs {bs} n {n}");
            for h in 0..heads {
                for j in 0..n {
                    let exact: f64 = (0..d)
                        .map(|i| {
                            let kv = k[k_index(i, j, bs)] as f64 * ks[i / GROUP * bs + j].to_f64();
                            q[h * d + i] as f64 * kv
                        })
                        .sum::<f64>()
                        * 0.125;
                    let got = fast[h * stride + j] as f64;
                    // The query's 16-bit codes are within 2⁻¹⁶ of its largest value per group.
                    assert!((got - exact).abs() < 1e-4, "{got} vs {exact}");
                }
            }
            let mut out_fast = vec![0.5f32; heads * d];
            let mut out_portable = out_fast.clone();
            accumulate_v_q8(heads, &fast, stride, blk, d, &mut out_fast);
            accumulate_v_q8_portable_body(heads, &fast, stride, blk, d, &mut out_portable);
            assert_eq!(
                out_fast, out_portable,
                "v heads {heads} d {d} bs {bs} n {n}"
            );
            for h in 0..heads {
                for i in 0..d {
                    let exact: f64 = 0.5
                        + (0..n)
                            .map(|j| {
                                let vv =
                                    v[j * d + i] as f64 * vs[j * d / GROUP + i / GROUP].to_f64();
                                fast[h * stride + j] as f64 * vv
                            })
                            .sum::<f64>();
                    let got = out_fast[h * d + i] as f64;
                    assert!((got - exact).abs() < 1e-4, "{got} vs {exact}");
                }
            }
        }
    }
}
