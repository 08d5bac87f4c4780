//! The AVX-512 inner loops of CPU paged attention (see `kernels.rs`): the same float
//! operations in the same order as the portable path, on 16 keys or 16 dimensions per vector.

#![allow(clippy::needless_range_loop)] // the heads index several register arrays at once

use std::arch::x86_64::*;

use super::kernels::{KvBlock, KEY_CHUNK};

#[inline(always)]
fn lane_mask(w: usize) -> __mmask16 {
    if w >= 16 {
        0xffff
    } else {
        (1u16 << w) - 1
    }
}

/// The heads `0..H` of `q` (`[H][d]`) against the block's keys; see `block_scores`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
pub unsafe fn scores<const H: usize>(
    q: &[f32],
    d: usize,
    blk: KvBlock<'_>,
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    let bs = blk.block_size;
    let kt = blk.k.as_ptr() as *const i16;
    let mut c = 0;
    while c < blk.n {
        let mask = lane_mask(blk.n - c);
        let mut a0 = [_mm512_setzero_ps(); H];
        let mut a1 = [_mm512_setzero_ps(); H];
        let mut i = 0;
        while i + 1 < d {
            let k0 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, kt.add(i * bs + c)));
            let k1 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, kt.add((i + 1) * bs + c)));
            for h in 0..H {
                let qh = q.as_ptr().add(h * d + i);
                a0[h] = _mm512_fmadd_ps(_mm512_set1_ps(*qh), k0, a0[h]);
                a1[h] = _mm512_fmadd_ps(_mm512_set1_ps(*qh.add(1)), k1, a1[h]);
            }
            i += 2;
        }
        if i < d {
            let k0 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, kt.add(i * bs + c)));
            for h in 0..H {
                a0[h] = _mm512_fmadd_ps(_mm512_set1_ps(*q.as_ptr().add(h * d + i)), k0, a0[h]);
            }
        }
        let scale = _mm512_set1_ps(scale);
        for h in 0..H {
            let s = _mm512_mul_ps(_mm512_add_ps(a0[h], a1[h]), scale);
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(h * stride + c), mask, s);
        }
        c += KEY_CHUNK;
    }
}

/// [`scores`] for two blocks at once (see `block_pair_scores`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
pub unsafe fn scores2<const H: usize>(
    q: &[f32],
    d: usize,
    blks: [KvBlock<'_>; 2],
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    let bs = blks[0].block_size;
    let kt = blks.map(|b| b.k.as_ptr() as *const i16);
    let n = blks.map(|b| b.n);
    let mut c = 0;
    while c < n[0] {
        let mask = n.map(|n| lane_mask(n.saturating_sub(c)));
        let mut a0 = [[_mm512_setzero_ps(); H]; 2];
        let mut a1 = [[_mm512_setzero_ps(); H]; 2];
        let mut i = 0;
        while i + 1 < d {
            let k = |t: usize, i: usize| {
                _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask[t], kt[t].add(i * bs + c)))
            };
            let (k0, k1) = ([k(0, i), k(1, i)], [k(0, i + 1), k(1, i + 1)]);
            for h in 0..H {
                let qh = q.as_ptr().add(h * d + i);
                let (q0, q1) = (_mm512_set1_ps(*qh), _mm512_set1_ps(*qh.add(1)));
                for t in 0..2 {
                    a0[t][h] = _mm512_fmadd_ps(q0, k0[t], a0[t][h]);
                    a1[t][h] = _mm512_fmadd_ps(q1, k1[t], a1[t][h]);
                }
            }
            i += 2;
        }
        if i < d {
            for t in 0..2 {
                let k0 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask[t], kt[t].add(i * bs + c)));
                for h in 0..H {
                    let qh = _mm512_set1_ps(*q.as_ptr().add(h * d + i));
                    a0[t][h] = _mm512_fmadd_ps(qh, k0, a0[t][h]);
                }
            }
        }
        let scale = _mm512_set1_ps(scale);
        for t in 0..2 {
            for h in 0..H {
                let s = _mm512_mul_ps(_mm512_add_ps(a0[t][h], a1[t][h]), scale);
                let at = out.as_mut_ptr().add(h * stride + t * bs + c);
                _mm512_mask_storeu_ps(at, mask[t], s);
            }
        }
        c += KEY_CHUNK;
    }
}

/// `out_h += Σ_j p[h * stride + j] v_j` for heads `0..H`; `d` is a multiple of 16.
///
/// Up to four 16-wide slices of the head dimension run together, so `4·H` independent FMA
/// chains hide the FMA latency (one chain per slice was latency-bound); each element still
/// gets one FMA per key in key order.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
pub unsafe fn accumulate_v<const H: usize>(
    p: &[f32],
    stride: usize,
    blk: KvBlock<'_>,
    d: usize,
    out: &mut [f32],
) {
    let mut s = 0;
    while s + 64 <= d {
        accumulate_v_slices::<H, 4>(p, stride, blk, d, s, out);
        s += 64;
    }
    while s < d {
        accumulate_v_slices::<H, 1>(p, stride, blk, d, s, out);
        s += 16;
    }
}

/// Dimensions `s..s + 16·S` of [`accumulate_v`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
#[inline]
unsafe fn accumulate_v_slices<const H: usize, const S: usize>(
    p: &[f32],
    stride: usize,
    blk: KvBlock<'_>,
    d: usize,
    s: usize,
    out: &mut [f32],
) {
    let v = blk.v.as_ptr() as *const __m256i;
    let o = out.as_mut_ptr();
    let mut acc = [[_mm512_setzero_ps(); S]; H];
    for (h, a) in acc.iter_mut().enumerate() {
        for (c, a) in a.iter_mut().enumerate() {
            *a = _mm512_loadu_ps(o.add(h * d + s + 16 * c));
        }
    }
    for j in 0..blk.n {
        let row = v.byte_add((j * d + s) * 2);
        let vj: [__m512; S] =
            std::array::from_fn(|c| _mm512_cvtph_ps(_mm256_loadu_si256(row.add(c))));
        for (h, a) in acc.iter_mut().enumerate() {
            let pj = _mm512_set1_ps(*p.as_ptr().add(h * stride + j));
            for (a, vj) in a.iter_mut().zip(&vj) {
                *a = _mm512_fmadd_ps(pj, *vj, *a);
            }
        }
    }
    for (h, a) in acc.iter().enumerate() {
        for (c, a) in a.iter().enumerate() {
            _mm512_storeu_ps(o.add(h * d + s + 16 * c), *a);
        }
    }
}
