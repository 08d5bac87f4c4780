//! AVX2 kernels (`vpmaddubsw`), for x86 CPUs without AVX-512 VNNI.
//!
//! One 32-value block per 256-bit step: 4- and 5-bit quants are unsigned and go straight
//! into `maddubs` against the signed activations; Q8_0 uses the sign trick (`|w|` against
//! `x·sign(w)`), which cannot saturate since activations stay within ±127. The 8 i32 lanes
//! are converted and accumulated with the block's `dw·dx`; the Q4/Q5 min term goes to a
//! scalar sum in block order. Lanes reduce by one fixed tree, so tiles never change bits.
//! Float weights accumulate 8 f32 lanes over k in order, then reduce the same way.

use std::arch::x86_64::*;

use super::quantize::{Q8Acts, PAIR};
use super::Chunk;
use crate::kernels::dtype::{WeightDType, IQ4_NL_VALUES};

/// Rows of activations per tile.
const R: usize = 4;
/// Output columns per tile.
const C: usize = 2;

pub(super) fn q8_chunk(c: &Chunk, acts: &Q8Acts) {
    // SAFETY: `linear_with` runs this path only where `KernelPath::Avx2.is_supported()`.
    unsafe { q8_chunk_impl(c, acts) }
}

pub(super) fn float_chunk(c: &Chunk, x: &[f32], k: usize) {
    // SAFETY: as above.
    unsafe { float_chunk_impl(c, x, k) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_chunk_impl(c: &Chunk, acts: &Q8Acts) {
    let mut j = c.c0;
    while j < c.c1 {
        let wide = j + C <= c.c1;
        let mut r = 0;
        while r < c.m {
            // Up to 8 rows in one tile (a verification step's 5 rows, a small batch): each
            // weight block is unpacked once per tile, and that, not the dot, is most of a
            // tile's work at few rows. Past 4 rows a tile takes one column (registers).
            let rows = (c.m - r).min(2 * R);
            let cols = if wide { C } else { 1 };
            match (rows, cols) {
                (R, C) => q8_tile::<R, C>(c, acts, r, j),
                (3, C) => q8_tile::<3, C>(c, acts, r, j),
                (2, C) => q8_tile::<2, C>(c, acts, r, j),
                (1, C) => q8_tile::<1, C>(c, acts, r, j),
                _ => {
                    for jj in j..j + cols {
                        match rows {
                            8 => q8_tile::<8, 1>(c, acts, r, jj),
                            7 => q8_tile::<7, 1>(c, acts, r, jj),
                            6 => q8_tile::<6, 1>(c, acts, r, jj),
                            5 => q8_tile::<5, 1>(c, acts, r, jj),
                            4 => q8_tile::<4, 1>(c, acts, r, jj),
                            3 => q8_tile::<3, 1>(c, acts, r, jj),
                            2 => q8_tile::<2, 1>(c, acts, r, jj),
                            _ => q8_tile::<1, 1>(c, acts, r, jj),
                        }
                    }
                }
            }
            r += rows;
        }
        j += if wide { C } else { 1 };
    }
}

/// The little-endian f16 at `p`, with F16C (the `half` crate's conversion checks the CPU
/// at every call, which was a large share of a one-row tile's time).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn f16_at_ptr(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

/// IQ4_NL's levels in both 128-bit lanes, for `vpshufb`.
static IQ4_NL_TWICE: [i8; 32] = {
    let mut t = [0i8; 32];
    let mut i = 0;
    while i < 32 {
        t[i] = IQ4_NL_VALUES[i % 16];
        i += 1;
    }
    t
};

/// `0x10` in byte `j` where bit `j` of `qh` is set, else 0: byte `j` takes byte `j / 8` of
/// `qh`, every bit of it but bit `j % 8` is set by the mask, and it is all ones only if that
/// bit was set too.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn fifth_bits(qh: u32) -> __m256i {
    let pick = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), pick);
    let others = _mm256_set1_epi64x(0x7FBF_DFEF_F7FB_FDFEu64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_or_si256(bytes, others), _mm256_set1_epi8(-1));
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// Computes and stores rows `r0..r0+NR` × weight rows `j0..j0+NC`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q8_tile<const NR: usize, const NC: usize>(
    c: &Chunk,
    acts: &Q8Acts,
    r0: usize,
    j0: usize,
) {
    let dtype = c.w.dtype;
    let nb = acts.k / 32;
    let bb = dtype.block_bytes();
    let stride = acts.npairs * PAIR;
    let (xq0, xd0, xs0) = acts.row(r0);
    let (xq, xd, xs) = (xq0.as_ptr(), xd0.as_ptr(), xs0.as_ptr());
    let rs = acts.npairs * 2;
    let w: [*const u8; NC] = std::array::from_fn(|cc| c.w.row(j0 + cc).as_ptr());
    let low4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); NC]; NR];
    let mut mins = [[0.0f32; NC]; NR];
    // Signed weights (Q8_0, IQ4_NL's levels) take the sign trick and have no min term.
    let signed = matches!(dtype, WeightDType::Q8_0 | WeightDType::IQ4NL);
    for b in 0..nb {
        for cc in 0..NC {
            let blk = w[cc].add(b * bb);
            let dw = f16_at_ptr(blk);
            // Unsigned quants (Q8_0's signed), and the block's min `m` of `w = d·q + m`.
            let (wq, mw) = match dtype {
                WeightDType::Q8_0 => (_mm256_loadu_si256(blk.add(2) as *const __m256i), 0.0),
                WeightDType::IQ4NL => {
                    // The nibbles index the table: signed levels, dotted as Q8_0's.
                    let q = _mm_loadu_si128(blk.add(2) as *const __m128i);
                    let both = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
                    let levels = _mm256_loadu_si256(IQ4_NL_TWICE.as_ptr() as *const __m256i);
                    (
                        _mm256_shuffle_epi8(levels, _mm256_and_si256(both, low4)),
                        0.0,
                    )
                }
                _ => {
                    let (off, mw) = match dtype {
                        WeightDType::Q4_0 => (2, -8.0 * dw),
                        WeightDType::Q4_1 => (4, f16_at_ptr(blk.add(2))),
                        WeightDType::Q5_0 => (6, -16.0 * dw),
                        _ => (8, f16_at_ptr(blk.add(2))),
                    };
                    let q = _mm_loadu_si128(blk.add(off) as *const __m128i);
                    let both = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
                    let low = _mm256_and_si256(both, low4);
                    if off >= 6 {
                        // Q5: the fifth bits sit in the 4 bytes before the quants.
                        let qh = (blk.add(off - 4) as *const u32).read_unaligned();
                        (_mm256_or_si256(low, fifth_bits(qh)), mw)
                    } else {
                        (low, mw)
                    }
                }
            };
            for r in 0..NR {
                let x = _mm256_loadu_si256(xq.add(r * stride + 32 * b) as *const __m256i);
                let dot16 = if signed {
                    _mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(x, wq))
                } else {
                    _mm256_maddubs_epi16(wq, x)
                };
                let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(dot16, ones));
                let scale = _mm256_set1_ps(dw * *xd.add(r * rs + b));
                acc[r][cc] = _mm256_fmadd_ps(dot, scale, acc[r][cc]);
                if !signed {
                    mins[r][cc] += mw * *xs.add(r * rs + b);
                }
            }
        }
    }
    for r in 0..NR {
        for cc in 0..NC {
            // SAFETY: rows r0..r0+NR ≤ m and weight rows j0..j0+NC ≤ c1 are this task's.
            c.out
                .write(r0 + r, j0 + cc - c.c0, hsum(acc[r][cc]) + mins[r][cc]);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float_chunk_impl(c: &Chunk, x: &[f32], k: usize) {
    let mut j = c.c0;
    while j < c.c1 {
        let wide = j + C <= c.c1;
        let mut r = 0;
        while r < c.m {
            let tall = r + R <= c.m;
            match (tall, wide) {
                (true, true) => float_tile::<R, C>(c, x, k, r, j),
                (true, false) => float_tile::<R, 1>(c, x, k, r, j),
                (false, true) => float_tile::<1, C>(c, x, k, r, j),
                (false, false) => float_tile::<1, 1>(c, x, k, r, j),
            }
            r += if tall { R } else { 1 };
        }
        j += if wide { C } else { 1 };
    }
}

/// 8 weights from `p` (element `i` onwards) as f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8(dtype: WeightDType, p: *const u8, i: usize) -> __m256 {
    match dtype {
        WeightDType::F32 => _mm256_loadu_ps(p.add(4 * i) as *const f32),
        WeightDType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i) as *const __m128i)),
        _ => {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(2 * i) as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32(h, 16))
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn float_tile<const NR: usize, const NC: usize>(
    c: &Chunk,
    x: &[f32],
    k: usize,
    r0: usize,
    j0: usize,
) {
    let dtype = c.w.dtype;
    let w: [&[u8]; NC] = std::array::from_fn(|cc| c.w.row(j0 + cc));
    let xr: [&[f32]; NR] = std::array::from_fn(|r| &x[(r0 + r) * k..(r0 + r + 1) * k]);
    let mut acc = [[_mm256_setzero_ps(); NC]; NR];
    let main = k / 8 * 8;
    for i in (0..main).step_by(8) {
        // A loop, not `array::from_fn`: its closure would not inherit this function's target
        // features, so `load8` would be a call per step.
        let mut wv = [_mm256_setzero_ps(); NC];
        for cc in 0..NC {
            wv[cc] = load8(dtype, w[cc].as_ptr(), i);
        }
        for r in 0..NR {
            let xv = _mm256_loadu_ps(xr[r].as_ptr().add(i));
            for cc in 0..NC {
                acc[r][cc] = _mm256_fmadd_ps(wv[cc], xv, acc[r][cc]);
            }
        }
    }
    // The tail (k mod 8) goes through zero-padded copies, the same lanes every time.
    if main < k {
        let mut wt = [[0.0f32; 8]; NC];
        let mut wbuf = [0.0f32; 8];
        for (cc, wt) in wt.iter_mut().enumerate() {
            let bytes = &w[cc][main * dtype.block_bytes()..];
            super::dequantize_row(dtype, bytes, &mut wbuf[..k - main]);
            wt[..k - main].copy_from_slice(&wbuf[..k - main]);
        }
        for r in 0..NR {
            let mut xt = [0.0f32; 8];
            xt[..k - main].copy_from_slice(&xr[r][main..]);
            let xv = _mm256_loadu_ps(xt.as_ptr());
            for cc in 0..NC {
                acc[r][cc] = _mm256_fmadd_ps(_mm256_loadu_ps(wt[cc].as_ptr()), xv, acc[r][cc]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (cc, &v) in row.iter().enumerate() {
            // SAFETY: rows r0..r0+NR ≤ m and weight rows j0..j0+NC ≤ c1 are this task's.
            c.out.write(r0 + r, j0 + cc - c.c0, hsum(v));
        }
    }
}

/// Sum of 8 lanes by one fixed tree: halves, pairs, neighbours.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let b = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)))
}
