//! The inner loops of CPU paged attention, for one query position and the query heads of one
//! KV head (a GQA group): the scores of a block's keys, the softmax exponent, and the sum of V
//! rows weighted by the probabilities.
//!
//! K is stored transposed within a block (`[head_dim][block_size]` per KV head), so one vector
//! FMA per dimension scores 16 keys at once and every query head of the group reuses each K
//! load; a V row (`[block_size][head_dim]`) is read once for all heads of the group. Both are
//! f16, which is the precision the cache always kept (values were rounded to it before).
//!
//! The AVX-512 and AVX2 paths (`kernels_avx512.rs`, `kernels_avx2.rs`) and the portable path
//! perform the same float operations in the same order (per key: two partial sums over even
//! and odd dimensions, then `(a + b) * scale`; per output element: one FMA per key in key
//! order), so their results are identical (tested), and a sequence's results never depend on
//! what else is in the batch.

use half::f16;
use half::slice::HalfFloatSliceExt;

#[cfg(target_arch = "x86_64")]
use super::kernels_avx2 as avx2;
#[cfg(target_arch = "x86_64")]
use super::kernels_avx512 as avx512;
use crate::kernels::cpu::ops::{exp, simd_dispatch, simd_level, SimdLevel};

/// Keys scored per vector.
pub(super) const KEY_CHUNK: usize = 16;
/// Query heads whose accumulators are kept in registers together (AVX-512, AVX2).
const HEAD_GROUP: usize = 4;
const HEAD_GROUP_AVX2: usize = 3;

/// The query heads of one GQA group at one position.
#[derive(Clone, Copy)]
pub struct GroupQuery<'a> {
    /// `[heads][head_dim]`, rounded to f16 precision.
    pub q: &'a [f32],
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// The heads as 16-bit codes with one scale per 32 dimensions (`kernels_q8::
    /// quantize_query`), `[heads][head_dim]` and `[heads][head_dim / 32]`, for the 8-bit
    /// cache's integer dot products; empty for the f16 cache.
    pub q16: &'a [i16],
    pub q16_scales: &'a [f32],
}

/// One block of one KV head: `k` is `[head_dim][block_size]`, `v` is `[block_size][head_dim]`;
/// the first `n` keys are part of the context.
#[derive(Clone, Copy)]
pub struct KvBlock<'a> {
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub block_size: usize,
    pub n: usize,
}

/// Reused conversion space of the portable path.
#[derive(Default)]
pub struct Scratch {
    block: Vec<f32>,
}

/// `scores[h * stride + j] = scale * q_h · k_j` for the block's `n` keys.
pub fn block_scores(
    gq: GroupQuery<'_>,
    blk: KvBlock<'_>,
    scores: &mut [f32],
    stride: usize,
    scratch: &mut Scratch,
) {
    let d = gq.head_dim;
    assert!(blk.k.len() >= d * blk.block_size && gq.q.len() >= gq.heads * d);
    assert!(scores.len() >= (gq.heads - 1) * stride + blk.n);
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx512 {
        let mut h0 = 0;
        while h0 < gq.heads {
            let hn = (gq.heads - h0).min(HEAD_GROUP);
            let q = &gq.q[h0 * d..];
            let out = &mut scores[h0 * stride..];
            // SAFETY: AVX-512 was detected; the asserts above bound every access.
            unsafe {
                match hn {
                    1 => avx512::scores::<1>(q, d, blk, gq.scale, out, stride),
                    2 => avx512::scores::<2>(q, d, blk, gq.scale, out, stride),
                    3 => avx512::scores::<3>(q, d, blk, gq.scale, out, stride),
                    _ => avx512::scores::<4>(q, d, blk, gq.scale, out, stride),
                }
            }
            h0 += hn;
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if simd_level() != SimdLevel::Portable && blk.block_size.is_multiple_of(KEY_CHUNK) {
        let mut h0 = 0;
        while h0 < gq.heads {
            let hn = (gq.heads - h0).min(HEAD_GROUP_AVX2);
            let (q, out) = (&gq.q[h0 * d..], &mut scores[h0 * stride..]);
            // SAFETY: AVX2, FMA and F16C were detected; the asserts above bound every access,
            // and a 16-key chunk stays in the block.
            unsafe {
                match hn {
                    1 => avx2::scores::<1>(q, d, blk, gq.scale, out, stride),
                    2 => avx2::scores::<2>(q, d, blk, gq.scale, out, stride),
                    _ => avx2::scores::<3>(q, d, blk, gq.scale, out, stride),
                }
            }
            h0 += hn;
        }
        return;
    }
    let kt = convert(&blk.k[..d * blk.block_size], scratch);
    scores_portable(gq, kt, blk.block_size, blk.n, scores, stride);
}

/// [`block_scores`] of two consecutive blocks of a sequence at once (`first` full): the
/// scores of `second` go `first.block_size` further along each row. Twice the independent FMA
/// chains of one block (one block's were latency-bound); every key's operations are
/// [`block_scores`]'s.
pub fn block_pair_scores(
    gq: GroupQuery<'_>,
    first: KvBlock<'_>,
    second: KvBlock<'_>,
    scores: &mut [f32],
    stride: usize,
    scratch: &mut Scratch,
) {
    let (d, bs) = (gq.head_dim, first.block_size);
    assert!(first.n == bs && second.block_size == bs);
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx512 {
        for blk in [first, second] {
            assert!(blk.k.len() >= d * bs);
        }
        assert!(gq.q.len() >= gq.heads * d);
        assert!(scores.len() >= (gq.heads - 1) * stride + bs + second.n);
        let mut h0 = 0;
        while h0 < gq.heads {
            let hn = (gq.heads - h0).min(HEAD_GROUP);
            let q = &gq.q[h0 * d..];
            let out = &mut scores[h0 * stride..];
            let blks = [first, second];
            // SAFETY: AVX-512 was detected; the asserts above bound every access.
            unsafe {
                match hn {
                    1 => avx512::scores2::<1>(q, d, blks, gq.scale, out, stride),
                    2 => avx512::scores2::<2>(q, d, blks, gq.scale, out, stride),
                    3 => avx512::scores2::<3>(q, d, blks, gq.scale, out, stride),
                    _ => avx512::scores2::<4>(q, d, blks, gq.scale, out, stride),
                }
            }
            h0 += hn;
        }
        return;
    }
    block_scores(gq, first, scores, stride, scratch);
    block_scores(gq, second, &mut scores[bs..], stride, scratch);
}

/// `out_h += Σ_j p[h * stride + j] * v_j` over the block's `n` keys, in key order;
/// `out` is `[heads][head_dim]`.
pub fn accumulate_v(
    heads: usize,
    p: &[f32],
    stride: usize,
    blk: KvBlock<'_>,
    d: usize,
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    assert!(blk.v.len() >= blk.n * d && out.len() >= heads * d);
    assert!(p.len() >= (heads - 1) * stride + blk.n);
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx512 && d.is_multiple_of(16) {
        let mut h0 = 0;
        while h0 < heads {
            let hn = (heads - h0).min(HEAD_GROUP);
            let (p, out) = (&p[h0 * stride..], &mut out[h0 * d..]);
            // SAFETY: AVX-512 was detected; the asserts above bound every access.
            unsafe {
                match hn {
                    1 => avx512::accumulate_v::<1>(p, stride, blk, d, out),
                    2 => avx512::accumulate_v::<2>(p, stride, blk, d, out),
                    3 => avx512::accumulate_v::<3>(p, stride, blk, d, out),
                    _ => avx512::accumulate_v::<4>(p, stride, blk, d, out),
                }
            }
            h0 += hn;
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if simd_level() != SimdLevel::Portable && d.is_multiple_of(8) {
        let mut h0 = 0;
        while h0 < heads {
            let hn = (heads - h0).min(HEAD_GROUP_AVX2);
            let (p, out) = (&p[h0 * stride..], &mut out[h0 * d..]);
            // SAFETY: AVX2, FMA and F16C were detected; the asserts above bound every access.
            unsafe {
                match hn {
                    1 => avx2::accumulate_v::<1>(p, stride, blk, d, out),
                    2 => avx2::accumulate_v::<2>(p, stride, blk, d, out),
                    _ => avx2::accumulate_v::<3>(p, stride, blk, d, out),
                }
            }
            h0 += hn;
        }
        return;
    }
    let v = convert(&blk.v[..blk.n * d], scratch);
    accumulate_v_portable(heads, p, stride, v, blk.n, d, out);
}

/// The block's f16 values as f32 in `scratch`, padded by one key chunk so that the portable
/// loops may read whole chunks past the end (those lanes are never stored).
fn convert<'s>(src: &[f16], scratch: &'s mut Scratch) -> &'s [f32] {
    scratch.block.resize(src.len() + KEY_CHUNK, 0.0);
    src.convert_to_f32_slice(&mut scratch.block[..src.len()]);
    &scratch.block
}

#[inline(always)]
fn scores_portable_body(
    gq: GroupQuery<'_>,
    kt: &[f32],
    bs: usize,
    n: usize,
    scores: &mut [f32],
    stride: usize,
) {
    let d = gq.head_dim;
    for h in 0..gq.heads {
        let q = &gq.q[h * d..][..d];
        let mut c = 0;
        while c < n {
            let (mut a0, mut a1) = ([0.0f32; KEY_CHUNK], [0.0f32; KEY_CHUNK]);
            let mut i = 0;
            while i + 1 < d {
                let (k0, k1) = (
                    &kt[i * bs + c..][..KEY_CHUNK],
                    &kt[(i + 1) * bs + c..][..KEY_CHUNK],
                );
                for l in 0..KEY_CHUNK {
                    a0[l] = q[i].mul_add(k0[l], a0[l]);
                    a1[l] = q[i + 1].mul_add(k1[l], a1[l]);
                }
                i += 2;
            }
            if i < d {
                let k0 = &kt[i * bs + c..][..KEY_CHUNK];
                for l in 0..KEY_CHUNK {
                    a0[l] = q[i].mul_add(k0[l], a0[l]);
                }
            }
            let w = (n - c).min(KEY_CHUNK);
            for l in 0..w {
                scores[h * stride + c + l] = (a0[l] + a1[l]) * gq.scale;
            }
            c += KEY_CHUNK;
        }
    }
}

simd_dispatch!(
    fn scores_portable(gq: GroupQuery<'_>, kt: &[f32], bs: usize, n: usize, scores: &mut [f32], stride: usize) => scores_portable_body
);

#[inline(always)]
fn accumulate_v_portable_body(
    heads: usize,
    p: &[f32],
    stride: usize,
    v: &[f32],
    n: usize,
    d: usize,
    out: &mut [f32],
) {
    for h in 0..heads {
        let o = &mut out[h * d..][..d];
        for j in 0..n {
            let pj = p[h * stride + j];
            for (o, x) in o.iter_mut().zip(&v[j * d..][..d]) {
                *o = pj.mul_add(*x, *o);
            }
        }
    }
}

simd_dispatch!(
    fn accumulate_v_portable(heads: usize, p: &[f32], stride: usize, v: &[f32], n: usize, d: usize, out: &mut [f32]) => accumulate_v_portable_body
);

#[inline(always)]
fn softmax_numerators_body(scores: &mut [f32]) -> f32 {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for s in scores.iter_mut() {
        *s = exp(*s - max);
    }
    // A fixed 16-lane tree, like `ops::dot`, so the sum vectorizes and never depends on
    // anything but the row.
    let mut acc = [0.0f32; KEY_CHUNK];
    let chunks = scores.chunks_exact(KEY_CHUNK);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..KEY_CHUNK {
            acc[l] += c[l];
        }
    }
    for (l, s) in tail.iter().enumerate() {
        acc[l] += s;
    }
    let mut w = KEY_CHUNK / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

simd_dispatch!(
    /// Replaces a row of scores by `exp(score - max)` and returns their sum.
    pub fn softmax_numerators(scores: &mut [f32]) -> f32 => softmax_numerators_body
);

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_f16(rng: &mut ChaCha8Rng, n: usize) -> Vec<f16> {
        (0..n)
            .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)))
            .collect()
    }

    /// Both paths against an f64 evaluation, and against each other bit for bit.
    #[test]
    fn paths_agree_with_each_other_and_with_f64() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for &(heads, d, bs, n) in &[
            (1, 64, 16, 16),
            (3, 64, 16, 7),
            (4, 128, 16, 16),
            (8, 128, 32, 29),
            (5, 48, 8, 8),
            (2, 64, 16, 1),
        ] {
            let q: Vec<f32> = random_f16(&mut rng, heads * d)
                .iter()
                .map(|x| x.to_f32())
                .collect();
            let k = random_f16(&mut rng, d * bs);
            let v = random_f16(&mut rng, bs * d);
            let blk = KvBlock {
                k: &k,
                v: &v,
                block_size: bs,
                n,
            };
            let gq = GroupQuery {
                q: &q,
                heads,
                head_dim: d,
                scale: 0.125,
                q16: &[],
                q16_scales: &[],
            };
            let stride = n + 3;
            let mut scratch = Scratch::default();
            let mut fast = vec![0.0f32; heads * stride];
            block_scores(gq, blk, &mut fast, stride, &mut scratch);
            let mut portable = vec![0.0f32; heads * stride];
            let kt = convert(&k, &mut scratch).to_vec();
            scores_portable(gq, &kt, bs, n, &mut portable, stride);
            assert_eq!(fast, portable, "scores heads {heads} d {d} bs {bs} n {n}");
            for h in 0..heads {
                for j in 0..n {
                    let exact: f64 = (0..d)
                        .map(|i| q[h * d + i] as f64 * k[i * bs + j].to_f64())
                        .sum::<f64>()
                        * 0.125;
                    assert!((fast[h * stride + j] as f64 - exact).abs() < 1e-5);
                }
            }
            // Two blocks at once: the same bits as one at a time.
            let second = KvBlock { n: n / 2, ..blk };
            let full = KvBlock { n: bs, ..blk };
            let pair_stride = 2 * bs + 1;
            let mut pair = vec![0.0f32; heads * pair_stride];
            block_pair_scores(gq, full, second, &mut pair, pair_stride, &mut scratch);
            let mut single = vec![0.0f32; heads * pair_stride];
            block_scores(gq, full, &mut single, pair_stride, &mut scratch);
            block_scores(gq, second, &mut single[bs..], pair_stride, &mut scratch);
            assert_eq!(pair, single, "pair heads {heads} d {d} bs {bs} n {n}");
            let mut out_fast = vec![0.5f32; heads * d];
            let mut out_portable = out_fast.clone();
            accumulate_v(heads, &fast, stride, blk, d, &mut out_fast, &mut scratch);
            let vf = convert(&v[..n * d], &mut scratch).to_vec();
            accumulate_v_portable(heads, &fast, stride, &vf, n, d, &mut out_portable);
            assert_eq!(
                out_fast, out_portable,
                "v heads {heads} d {d} bs {bs} n {n}"
            );
        }
    }
}
