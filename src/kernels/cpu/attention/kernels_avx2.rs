//! The AVX2 inner loops of CPU paged attention, for the f16 cache (`kernels.rs`) and the
//! 8-bit one (`kernels_q8.rs`): the same float operations in the same order as their portable
//! paths, on 16 keys (two vectors) or 8 dimensions per vector. Keys go 16 at a time, so a
//! block's size must be a multiple of 16 (the callers check); a partial last chunk reads the
//! block's unused slots and stores only the keys in the context.

#![allow(clippy::needless_range_loop)] // the heads index several register arrays at once

use std::arch::x86_64::*;

use super::kernels::{KvBlock, KEY_CHUNK};
use super::kernels_q8::{KvBlockQ8, GROUP};

/// 8 f16 at `p` as f32.
#[inline(always)]
unsafe fn f16x8(p: *const half::f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// 8 i8 at `p` as f32.
#[inline(always)]
unsafe fn i8x8(p: *const i8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
}

/// One f16 as f32 (exact, as `f16::to_f32`).
#[inline(always)]
unsafe fn f16x1(x: half::f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(x.to_bits() as i32)))
}

/// Stores `s` (16 scores) at `out`, only the first `w` when fewer remain.
#[inline(always)]
unsafe fn store16(s: [__m256; 2], out: *mut f32, w: usize) {
    if w >= KEY_CHUNK {
        _mm256_storeu_ps(out, s[0]);
        _mm256_storeu_ps(out.add(8), s[1]);
    } else {
        let mut tmp = [0.0f32; KEY_CHUNK];
        _mm256_storeu_ps(tmp.as_mut_ptr(), s[0]);
        _mm256_storeu_ps(tmp.as_mut_ptr().add(8), s[1]);
        std::ptr::copy_nonoverlapping(tmp.as_ptr(), out, w);
    }
}

/// The heads `0..H` of `q` (`[H][d]`) against an f16 block's keys; see `block_scores`.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `q` holds `H * d` values, the block `d *
/// block_size` keys with `block_size` a multiple of 16, and `out` `(H - 1) * stride + n`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn scores<const H: usize>(
    q: &[f32],
    d: usize,
    blk: KvBlock<'_>,
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    let (bs, kt, q) = (blk.block_size, blk.k.as_ptr(), q.as_ptr());
    let mut c = 0;
    while c < blk.n {
        let mut a0 = [[_mm256_setzero_ps(); 2]; H];
        let mut a1 = [[_mm256_setzero_ps(); 2]; H];
        let key = |i: usize, x: usize| f16x8(kt.add(i * bs + c + 8 * x));
        let mut i = 0;
        while i < d {
            let k0 = [key(i, 0), key(i, 1)];
            for h in 0..H {
                let qh = _mm256_set1_ps(*q.add(h * d + i));
                a0[h][0] = _mm256_fmadd_ps(qh, k0[0], a0[h][0]);
                a0[h][1] = _mm256_fmadd_ps(qh, k0[1], a0[h][1]);
            }
            if i + 1 < d {
                let k1 = [key(i + 1, 0), key(i + 1, 1)];
                for h in 0..H {
                    let qh = _mm256_set1_ps(*q.add(h * d + i + 1));
                    a1[h][0] = _mm256_fmadd_ps(qh, k1[0], a1[h][0]);
                    a1[h][1] = _mm256_fmadd_ps(qh, k1[1], a1[h][1]);
                }
            }
            i += 2;
        }
        let scale = _mm256_set1_ps(scale);
        for h in 0..H {
            let s = [0, 1].map(|x| _mm256_mul_ps(_mm256_add_ps(a0[h][x], a1[h][x]), scale));
            store16(s, out.as_mut_ptr().add(h * stride + c), blk.n - c);
        }
        c += KEY_CHUNK;
    }
}

/// `out_h += Σ_j p[h * stride + j] v_j` for heads `0..H` of an f16 block.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `d` is a multiple of 8, the block holds `n * d`
/// values, `p` `(H - 1) * stride + n` and `out` `H * d`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn accumulate_v<const H: usize>(
    p: &[f32],
    stride: usize,
    blk: KvBlock<'_>,
    d: usize,
    out: &mut [f32],
) {
    // Two slices of 8 dimensions a pass: with three heads, four slices' 12 accumulators, 4
    // V vectors and the weight spilled to the stack, and a 4,090-token prefill ran 10% slower
    // (decode steps measured the same).
    let mut s = 0;
    while s + 16 <= d {
        accumulate_v_slices::<H, 2>(p, stride, blk, d, s, out);
        s += 16;
    }
    while s < d {
        accumulate_v_slices::<H, 1>(p, stride, blk, d, s, out);
        s += 8;
    }
}

/// Dimensions `s..s + 8·S` of [`accumulate_v`]: `S·H` independent FMA chains, one FMA per
/// key in key order for every element.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn accumulate_v_slices<const H: usize, const S: usize>(
    p: &[f32],
    stride: usize,
    blk: KvBlock<'_>,
    d: usize,
    s: usize,
    out: &mut [f32],
) {
    let (v, o) = (blk.v.as_ptr(), out.as_mut_ptr());
    let mut acc = [[_mm256_setzero_ps(); S]; H];
    for h in 0..H {
        for c in 0..S {
            acc[h][c] = _mm256_loadu_ps(o.add(h * d + s + 8 * c));
        }
    }
    for j in 0..blk.n {
        let vj: [__m256; S] = std::array::from_fn(|c| f16x8(v.add(j * d + s + 8 * c)));
        for h in 0..H {
            let pj = _mm256_set1_ps(*p.as_ptr().add(h * stride + j));
            for c in 0..S {
                acc[h][c] = _mm256_fmadd_ps(pj, vj[c], acc[h][c]);
            }
        }
    }
    for h in 0..H {
        for c in 0..S {
            _mm256_storeu_ps(o.add(h * d + s + 8 * c), acc[h][c]);
        }
    }
}

/// The heads `0..H` of the 16-bit query (codes `[H][d]`, scales `[H][d / 32]`) against an
/// 8-bit block's keys; see `block_scores_q8`. Per group, `vpmaddwd` multiplies two
/// dimensions of 8 keys (K's pairs of dimensions sign-extended to 16 bits) by the query's
/// pair and adds them in i32: exact, as the portable path's integer sum.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `d` is a multiple of 32, `block_size` of 16, the
/// block holds `d * block_size` codes and `d / 32 * block_size` scales, `q` `H * d` codes
/// and `H * d / 32` scales, and `out` `(H - 1) * stride + n` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn scores_q8<const H: usize>(
    q: (&[i16], &[f32]),
    d: usize,
    blk: KvBlockQ8<'_>,
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    let (bs, kt, ks, groups) = (
        blk.block_size,
        blk.k.as_ptr(),
        blk.k_scales.as_ptr(),
        d / GROUP,
    );
    let (q16, qs) = (q.0.as_ptr(), q.1.as_ptr());
    let mut c = 0;
    while c < blk.n {
        let mut total = [[_mm256_setzero_ps(); 2]; H];
        for g in 0..groups {
            let mut acc = [[_mm256_setzero_si256(); 2]; H];
            for pair in g * GROUP / 2..(g + 1) * GROUP / 2 {
                // Dimensions (2·pair, 2·pair + 1) of keys c..c + 8 and c + 8..c + 16.
                let at = kt.add((pair * bs + c) * 2) as *const __m128i;
                let k = [at, at.add(1)].map(|p| _mm256_cvtepi8_epi16(_mm_loadu_si128(p)));
                for h in 0..H {
                    let qp = _mm256_set1_epi32(
                        (q16.add(h * d + 2 * pair) as *const i32).read_unaligned(),
                    );
                    for x in 0..2 {
                        acc[h][x] = _mm256_add_epi32(acc[h][x], _mm256_madd_epi16(k[x], qp));
                    }
                }
            }
            let sg = [0, 1].map(|x| f16x8(ks.add(g * bs + c + 8 * x)));
            for h in 0..H {
                let qsg = _mm256_set1_ps(*qs.add(h * groups + g));
                for x in 0..2 {
                    let w = _mm256_mul_ps(sg[x], qsg);
                    total[h][x] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[h][x]), w, total[h][x]);
                }
            }
        }
        let scale = _mm256_set1_ps(scale);
        for h in 0..H {
            let s = [0, 1].map(|x| _mm256_mul_ps(total[h][x], scale));
            store16(s, out.as_mut_ptr().add(h * stride + c), blk.n - c);
        }
        c += KEY_CHUNK;
    }
}

/// `out_h += Σ_j p[h * stride + j] · scale_jg · code_j` for heads `0..H` of an 8-bit block,
/// one 32-dimension group (four vectors per head) at a time.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `d` is a multiple of 32, the block holds `n * d`
/// codes and `n * d / 32` scales, `p` `(H - 1) * stride + n` values and `out` `H * d`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn accumulate_v_q8<const H: usize>(
    p: &[f32],
    stride: usize,
    blk: KvBlockQ8<'_>,
    d: usize,
    out: &mut [f32],
) {
    let (v, vs, o, groups) = (blk.v.as_ptr(), blk.v_scales, out.as_mut_ptr(), d / GROUP);
    for g in 0..groups {
        let s = g * GROUP;
        let mut acc = [[_mm256_setzero_ps(); 4]; H];
        for h in 0..H {
            for c in 0..4 {
                acc[h][c] = _mm256_loadu_ps(o.add(h * d + s + 8 * c));
            }
        }
        for j in 0..blk.n {
            let vj: [__m256; 4] = std::array::from_fn(|c| i8x8(v.add(j * d + s + 8 * c)));
            let sj = f16x1(*vs.get_unchecked(j * groups + g));
            for h in 0..H {
                let w = _mm256_set1_ps(*p.as_ptr().add(h * stride + j) * sj);
                for c in 0..4 {
                    acc[h][c] = _mm256_fmadd_ps(w, vj[c], acc[h][c]);
                }
            }
        }
        for h in 0..H {
            for c in 0..4 {
                _mm256_storeu_ps(o.add(h * d + s + 8 * c), acc[h][c]);
            }
        }
    }
}
