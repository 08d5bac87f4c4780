//! AVX2 kernels over packed weights (layout in [`super::packed`]), for x86 CPUs without
//! AVX-512 VNNI: the same operations on every output lane as [`super::packed_avx512`], so the
//! two paths give the same bits.
//!
//! A 64-byte chunk of a group is two 256-bit halves of 8 columns each; lane `c` of a half is
//! one column. Without `vpdpbusd`, a block's exact integer sums come from `vpmaddubsw` (pairs
//! of u8·i8 products into i16) and one `vpmaddwd` by ones (pairs of i16 into the column's
//! i32 lane):
//! * Q4_0 / Q4_1: the 8 nibble vectors of a block add up in i16 before the widening, which
//!   cannot overflow: 8 · 2 · 15 · 127 = 30,480 < 2¹⁵.
//! * Q8_0: the packed bytes are `q + 128`, too large for `vpmaddubsw`'s i16 pairs, so each
//!   chunk is turned back into `q` (xor 0x80) and dotted with the sign trick (`|q|` against
//!   `x·sign(q)`, at most 2 · 128 · 127 per pair) and widened at once. The sum is `Σq·x`
//!   itself, which the AVX-512 kernel reaches as `Σ(q+128)·x − 128·Σx`: the same integer.
//!
//! Then per row and block, as on AVX-512: one int→float convert and one FMA (`d_w·d_x`),
//! plus one FMA (`m_w·s_x`) for Q4_1.
//!
//! * m = 1 (decode) runs one row over both halves of a group at once (two independent
//!   chains, the activation broadcasts shared) and prefetches weights ahead.
//! * m > 1 (prefill) runs tiles of 4 rows over one half (4 rows need 8 of the 16 registers
//!   for their sums; the half's unpacked nibbles are shared by the rows).

use std::arch::x86_64::*;

use super::packed::{PackedKind, GROUP};
use super::packed_acts::PackedActs;
use super::packed_avx512::PackedChunk;
use super::OutView;

/// Columns per 256-bit half of a group.
const HALF: usize = GROUP / 2;

/// How far ahead of the block being computed the m = 1 kernel prefetches weights, in bytes.
const PREFETCH_BYTES: usize = 8192;

pub(super) fn packed_chunk(c: &PackedChunk, acts: &PackedActs) {
    // SAFETY: packed weights run on the AVX2 path only where
    // `KernelPath::Avx2.is_supported()` (`linear_packed_with` asserts the path).
    unsafe { chunk_impl(c, acts) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn chunk_impl(c: &PackedChunk, acts: &PackedActs) {
    match c.w.kind {
        PackedKind::Q4_0 => chunk_kind::<0>(c, acts),
        PackedKind::Q4_1 => chunk_kind::<1>(c, acts),
        PackedKind::Q8_0 => chunk_kind::<2>(c, acts),
    }
}

/// One group's weights and where its outputs go.
struct Tile {
    /// The group's bytes.
    w: *const u8,
    nb: usize,
    out: OutView,
    /// Output column of the group's lane 0, relative to the view.
    col: usize,
    /// Real (unpadded) columns in the group.
    valid: usize,
}

/// `KIND`: 0 = Q4_0, 1 = Q4_1, 2 = Q8_0.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn chunk_kind<const KIND: u8>(c: &PackedChunk, acts: &PackedActs) {
    assert!(c.g1 <= c.w.groups.num_groups && acts.nb == c.w.nb && acts.qs.len() >= c.m * acts.k);
    for g in c.g0..c.g1 {
        let t = Tile {
            w: c.w.groups.group(g).as_ptr(),
            nb: c.w.nb,
            out: c.out,
            col: (g - c.g0) * GROUP,
            valid: (c.w.rows - g * GROUP).min(GROUP),
        };
        if c.m == 1 {
            tile::<KIND, 1, 2>(&t, acts, 0, 0);
            continue;
        }
        for h in (0..2).filter(|h| h * HALF < t.valid) {
            let mut r = 0;
            while r < c.m {
                r += match c.m - r {
                    4.. => tile::<KIND, 4, 1>(&t, acts, r, h),
                    3 => tile::<KIND, 3, 1>(&t, acts, r, h),
                    2 => tile::<KIND, 2, 1>(&t, acts, r, h),
                    _ => tile::<KIND, 1, 1>(&t, acts, r, h),
                };
            }
        }
    }
}

/// Broadcast of 4 activation bytes at `p`.
#[inline(always)]
unsafe fn bcast4(p: *const i8) -> __m256i {
    _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32))
}

/// Computes and stores rows `r0..r0+NR` × halves `h0..h0+NH` of the tile; returns `NR`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::needless_range_loop)] // `r` and `h` index several arrays and pointers at once
unsafe fn tile<const KIND: u8, const NR: usize, const NH: usize>(
    t: &Tile,
    a: &PackedActs,
    r0: usize,
    h0: usize,
) -> usize {
    let (k, nb) = (a.k, t.nb);
    let qb = if KIND == 2 { 32 * GROUP } else { 16 * GROUP };
    let sb = if KIND == 1 { 4 * GROUP } else { 2 * GROUP };
    let scales = t.w.add(nb * qb);
    // SAFETY (all pointer reads below): rows r0..r0+NR < m have k quants and nb scales
    // each (asserted by the caller), and the group has nb blocks of qb + sb bytes.
    let xq: [*const i8; NR] = std::array::from_fn(|r| a.qs.as_ptr().add((r0 + r) * k));
    let low4 = _mm256_set1_epi8(0x0F);
    let bias = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); NH]; NR];
    for b in 0..nb {
        let q = t.w.add(b * qb);
        if NR == 1 {
            // Decode streams weights from memory: ask for them well ahead, across the 4 KiB
            // page boundaries where the hardware prefetchers stop. Prefetches never fault,
            // so running past the buffer's end is harmless.
            for i in 0..qb / 64 {
                _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(PREFETCH_BYTES + 64 * i) as *const i8);
            }
            if KIND == 1 || b % 2 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(
                    scales.wrapping_add(PREFETCH_BYTES + b * sb) as *const i8
                );
            }
        }
        // Exact per-column integer sums of the block: i16 for 4-bit weights (bounded, see
        // the module docs), i32 for 8-bit ones.
        let mut isum = [[_mm256_setzero_si256(); NH]; NR];
        if KIND < 2 {
            for i in 0..4 {
                for h in 0..NH {
                    let v = _mm256_loadu_si256(q.add(64 * i + 32 * (h0 + h)) as *const __m256i);
                    let lo = _mm256_and_si256(v, low4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low4);
                    for r in 0..NR {
                        let x = xq[r].add(32 * b + 8 * i);
                        let s = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, bcast4(x)),
                            _mm256_maddubs_epi16(hi, bcast4(x.add(4))),
                        );
                        isum[r][h] = _mm256_add_epi16(isum[r][h], s);
                    }
                }
            }
            for row in isum.iter_mut() {
                for s in row.iter_mut() {
                    *s = _mm256_madd_epi16(*s, ones);
                }
            }
        } else {
            for i in 0..8 {
                for h in 0..NH {
                    let v = _mm256_loadu_si256(q.add(64 * i + 32 * (h0 + h)) as *const __m256i);
                    let signed = _mm256_xor_si256(v, bias);
                    let mag = _mm256_abs_epi8(signed);
                    for r in 0..NR {
                        let x = bcast4(xq[r].add(32 * b + 4 * i));
                        let p = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(x, signed));
                        isum[r][h] = _mm256_add_epi32(isum[r][h], _mm256_madd_epi16(p, ones));
                    }
                }
            }
        }
        for h in 0..NH {
            let (dw, mw) = block_scales::<KIND>(scales.add(b * sb), h0 + h);
            for r in 0..NR {
                add_block::<KIND>(&mut acc[r][h], isum[r][h], dw, mw, a, (r0 + r) * nb + b);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (h, &v) in row.iter().enumerate() {
            let first = (h0 + h) * HALF;
            // SAFETY: row r0+r < m and the group's valid lanes are this task's columns.
            let dst = t.out.at(r0 + r, t.col + first);
            match t.valid.saturating_sub(first) {
                0 => {}
                HALF.. => _mm256_storeu_ps(dst, v),
                n => {
                    let mut lanes = [0.0f32; HALF];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                    std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, n);
                }
            }
        }
    }
    NR
}

/// Half `h`'s 8 f16 scales `d` (and for Q4_1 the mins `m`) of the block whose scales start
/// at `s`, widened to f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block_scales<const KIND: u8>(s: *const u8, h: usize) -> (__m256, __m256) {
    let dw = _mm256_cvtph_ps(_mm_loadu_si128(s.add(2 * HALF * h) as *const __m128i));
    let mw = if KIND == 1 {
        _mm256_cvtph_ps(_mm_loadu_si128(
            s.add(2 * GROUP + 2 * HALF * h) as *const __m128i
        ))
    } else {
        _mm256_setzero_ps()
    };
    (dw, mw)
}

/// Adds one block's exact integer sums `is` of one activation row (block index `ab` of `a`)
/// to that row's 8 accumulators: `packed_avx512::add_block`'s operations, lane for lane.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn add_block<const KIND: u8>(
    acc: &mut __m256,
    mut is: __m256i,
    dw: __m256,
    mw: __m256,
    a: &PackedActs,
    ab: usize,
) {
    // Q4_0's unsigned nibbles are q + 8; Q8_0's sums are already of q (module docs).
    if KIND == 0 {
        is = _mm256_sub_epi32(is, _mm256_set1_epi32(8 * *a.bsum.get_unchecked(ab)));
    }
    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*a.d.get_unchecked(ab)));
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), scale, *acc);
    if KIND == 1 {
        *acc = _mm256_fmadd_ps(mw, _mm256_set1_ps(*a.s.get_unchecked(ab)), *acc);
    }
}
