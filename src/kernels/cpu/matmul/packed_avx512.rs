//! AVX-512 VNNI kernels over packed weights (layout in [`super::packed`]).
//!
//! A tile is `NR` activation rows × one group of 16 output columns; each lane of a register
//! is one column. Per block: each 64-byte chunk of quants is loaded (and, for 4-bit weights,
//! split into its two nibble halves) once and `vpdpbusd`-ed with a 4-byte broadcast of every
//! row's activations, giving exact per-column integer sums; then per row one int→float
//! convert and one FMA (`d_w·d_x`), plus one FMA (`m_w·s_x`) for Q4_1.
//!
//! * m = 1 (decode) runs `NR = 1` over the groups in order: one sequential stream of
//!   weights, bound by memory bandwidth; two integer chains per block shorten the
//!   dependency chain (the integer sum is exact, so the split changes no bit).
//! * m > 1 (prefill) runs tiles of 8 rows (then 4, 2, 1 for the rest) per group: the
//!   group's weights stay in L1 while the tiles walk the rows.
#![allow(clippy::incompatible_msrv)]

use std::arch::x86_64::*;

use super::packed::{PackedKind, PackedWeights, GROUP};
use super::packed_acts::PackedActs;
use super::OutView;

/// Groups `g0..g1` of a packed part against all `m` activation rows; output column 0 of the
/// view is the first column of group `g0`.
pub(super) struct PackedChunk<'a> {
    pub(super) w: &'a PackedWeights,
    pub(super) g0: usize,
    pub(super) g1: usize,
    pub(super) m: usize,
    pub(super) out: OutView,
}

pub(super) fn packed_chunk(c: &PackedChunk, acts: &PackedActs) {
    packed_chunk_rows(c, acts, 0);
}

/// [`packed_chunk`] for activation rows `first..c.m` only.
pub(super) fn packed_chunk_rows(c: &PackedChunk, acts: &PackedActs, first: usize) {
    // SAFETY: packed weights exist only where `KernelPath::Avx512.is_supported()`.
    unsafe { chunk_impl(c, acts, first) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn chunk_impl(c: &PackedChunk, acts: &PackedActs, first: usize) {
    match c.w.kind {
        PackedKind::Q4_0 => chunk_kind::<0>(c, acts, first),
        PackedKind::Q4_1 => chunk_kind::<1>(c, acts, first),
        PackedKind::Q8_0 => chunk_kind::<2>(c, acts, first),
    }
}

/// `KIND`: 0 = Q4_0, 1 = Q4_1, 2 = Q8_0.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn chunk_kind<const KIND: u8>(c: &PackedChunk, acts: &PackedActs, first: usize) {
    assert!(c.g1 <= c.w.groups.num_groups && acts.nb == c.w.nb && acts.qs.len() >= c.m * acts.k);
    for g in c.g0..c.g1 {
        let t = Tile {
            w: c.w.groups.group(g).as_ptr(),
            nb: c.w.nb,
            out: c.out,
            col: (g - c.g0) * GROUP,
            mask: lane_mask(c.w.rows - g * GROUP),
        };
        let mut r = first;
        while r < c.m {
            r += match c.m - r {
                8.. => tile::<KIND, 8>(&t, acts, r),
                4..=7 => tile::<KIND, 4>(&t, acts, r),
                2 | 3 => tile::<KIND, 2>(&t, acts, r),
                _ => tile::<KIND, 1>(&t, acts, r),
            };
        }
    }
}

/// The lanes of a group that hold real columns.
fn lane_mask(valid: usize) -> __mmask16 {
    if valid >= GROUP {
        !0
    } else {
        (1 << valid) - 1
    }
}

/// One group's weights and where its outputs go.
struct Tile {
    /// The group's bytes (64-byte aligned).
    w: *const u8,
    nb: usize,
    out: OutView,
    /// Output column of lane 0, relative to the view.
    col: usize,
    mask: __mmask16,
}

/// How far ahead of the block being computed the m = 1 kernel prefetches weights, in bytes
/// (measured: 4–32 KiB all beat the hardware prefetchers alone by 1.3–1.6× on this Xeon).
const PREFETCH_BYTES: usize = 8192;

/// Broadcast of 4 activation bytes at `p`.
#[inline(always)]
unsafe fn bcast4(p: *const i8) -> __m512i {
    _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32))
}

/// Computes and stores rows `r0..r0+NR` of the tile; returns `NR`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn tile<const KIND: u8, const NR: usize>(t: &Tile, a: &PackedActs, r0: usize) -> usize {
    let (k, nb) = (a.k, t.nb);
    let qb = if KIND == 2 { 32 * GROUP } else { 16 * GROUP };
    let sb = if KIND == 1 { 4 * GROUP } else { 2 * GROUP };
    let scales = t.w.add(nb * qb);
    // SAFETY (all pointer reads below): rows r0..r0+NR < m have k quants and nb scales
    // each (asserted by the caller), and the group has nb blocks of qb + sb bytes.
    let xq: [*const i8; NR] = std::array::from_fn(|r| a.qs.as_ptr().add((r0 + r) * k));
    let row_at = |r: usize| (r0 + r) * nb;
    let low4 = _mm512_set1_epi8(0x0F);
    // m = 1 splits each block's integer chain in two (exact, so bit-identical).
    let split = NR == 1;
    let mut acc = [_mm512_setzero_ps(); NR];
    for b in 0..nb {
        let q = t.w.add(b * qb);
        if split {
            // Decode streams weights from memory: ask for them well ahead, across the 4 KiB
            // page boundaries where the hardware prefetchers stop. Prefetches never fault,
            // so running past the buffer's end is harmless.
            let dist = PREFETCH_BYTES;
            for i in 0..qb / 64 {
                _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(dist + 64 * i) as *const i8);
            }
            if KIND == 1 || b % 2 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(scales.wrapping_add(dist + b * sb) as *const i8);
            }
        }
        let mut isum = [_mm512_setzero_si512(); NR];
        let mut isum2 = [_mm512_setzero_si512(); NR];
        if KIND < 2 {
            for i in 0..4 {
                let v = _mm512_loadu_si512(q.add(64 * i) as *const _);
                let lo = _mm512_and_si512(v, low4);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low4);
                for r in 0..NR {
                    let x = xq[r].add(32 * b + 8 * i);
                    isum[r] = _mm512_dpbusd_epi32(isum[r], lo, bcast4(x));
                    if split {
                        isum2[r] = _mm512_dpbusd_epi32(isum2[r], hi, bcast4(x.add(4)));
                    } else {
                        isum[r] = _mm512_dpbusd_epi32(isum[r], hi, bcast4(x.add(4)));
                    }
                }
            }
        } else {
            for i in 0..8 {
                let v = _mm512_loadu_si512(q.add(64 * i) as *const _);
                for r in 0..NR {
                    let x = bcast4(xq[r].add(32 * b + 4 * i));
                    if split && i % 2 == 1 {
                        isum2[r] = _mm512_dpbusd_epi32(isum2[r], v, x);
                    } else {
                        isum[r] = _mm512_dpbusd_epi32(isum[r], v, x);
                    }
                }
            }
        }
        let (dw, mw) = block_scales::<KIND>(scales, b);
        for r in 0..NR {
            let is = if split {
                _mm512_add_epi32(isum[r], isum2[r])
            } else {
                isum[r]
            };
            add_block::<KIND>(&mut acc[r], is, dw, mw, a, row_at(r) + b);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: row r0+r < m and the group's valid lanes are this task's columns.
        _mm512_mask_storeu_ps(t.out.at(r0 + r, t.col), t.mask, *acc);
    }
    NR
}

/// The 16 columns' f16 scales `d` (and for Q4_1 the mins `m`) of block `b` of a group whose
/// scales start at `scales`, widened to f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn block_scales<const KIND: u8>(scales: *const u8, b: usize) -> (__m512, __m512) {
    let sb = if KIND == 1 { 4 * GROUP } else { 2 * GROUP };
    let s = scales.add(b * sb);
    let dw = _mm512_cvtph_ps(_mm256_loadu_si256(s as *const __m256i));
    let mw = if KIND == 1 {
        _mm512_cvtph_ps(_mm256_loadu_si256(s.add(32) as *const __m256i))
    } else {
        _mm512_setzero_ps()
    };
    (dw, mw)
}

/// Adds one block's exact integer sums `is` of one activation row (block index `ab` of `a`)
/// to that row's 16 accumulators. Every packed kernel (VNNI and AMX) ends a block here, which
/// is what makes them agree bit for bit.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn add_block<const KIND: u8>(
    acc: &mut __m512,
    mut is: __m512i,
    dw: __m512,
    mw: __m512,
    a: &PackedActs,
    ab: usize,
) {
    // Unsigned weights: Q4_0's q−8 and Q8_0's bias of +128 cancel against Σx.
    if KIND != 1 {
        let bias = if KIND == 0 { 8 } else { 128 };
        is = _mm512_sub_epi32(is, _mm512_set1_epi32(bias * *a.bsum.get_unchecked(ab)));
    }
    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*a.d.get_unchecked(ab)));
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), scale, *acc);
    if KIND == 1 {
        *acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(*a.s.get_unchecked(ab)), *acc);
    }
}
