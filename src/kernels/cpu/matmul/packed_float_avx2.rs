//! The FMA kernel over packed float weights ([`super::packed_float`]), on the AVX2 and the
//! AVX-512 paths alike (an AVX-512 variant would give the same bits: each lane's chain is
//! the same).
//!
//! A tile is `NR` activation rows × `G` groups of 16 columns: per input index, one load per
//! group (widened to two 8-lane f32 vectors) and one broadcast per row feed `NR · 2G` FMAs,
//! each into its own accumulator.
//! * Few rows (decode, m ≤ 2) take two groups at once, for 4 independent chains per row.
//! * More rows take one group and up to 6 rows: 12 accumulators, 2 weight vectors and a
//!   broadcast fill 15 of the 16 registers, and the FMAs, not the loads, set the pace.
//! * Every tile prefetches the weight stream ahead (the first over a group reads it from
//!   memory).
//!
//! Rows go in blocks of [`ROW_BLOCK`] so that a block's activations stay in L2 while the
//! chunk's groups pass over them.

use std::arch::x86_64::*;

use super::packed::GROUP;
use super::packed_float::PackedFloats;
use super::OutView;
use crate::kernels::dtype::WeightDType;

/// Columns per 256-bit vector.
const HALF: usize = GROUP / 2;

/// Activation rows per pass over a chunk's groups: 48 rows of k = 1,536 are 288 KiB.
const ROW_BLOCK: usize = 48;

/// How far ahead of the index being computed decode tiles prefetch weights, in bytes.
const PREFETCH_BYTES: usize = 4096;

/// A chunk of groups `g0..g1` of one part against all `m` rows of `x` (`[m, k]`).
pub(super) struct FloatChunk<'a> {
    pub(super) w: &'a PackedFloats,
    pub(super) g0: usize,
    pub(super) g1: usize,
    pub(super) m: usize,
    pub(super) x: &'a [f32],
    pub(super) out: OutView,
}

const F32: u8 = 0;
const F16: u8 = 1;
const BF16: u8 = 2;

pub(super) fn float_chunk(c: &FloatChunk) {
    // SAFETY: float parts are packed only for the AVX2 and AVX-512 paths, which
    // `linear_packed_with` runs only where the CPU supports them (both imply AVX2, FMA and
    // F16C).
    unsafe { chunk_impl(c) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn chunk_impl(c: &FloatChunk) {
    match c.w.dtype {
        WeightDType::F32 => chunk_kind::<F32>(c),
        WeightDType::F16 => chunk_kind::<F16>(c),
        _ => chunk_kind::<BF16>(c),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn chunk_kind<const KIND: u8>(c: &FloatChunk) {
    assert!(c.g1 <= c.w.groups.num_groups && c.x.len() >= c.m * c.w.k);
    for rb in (0..c.m).step_by(ROW_BLOCK) {
        let rows = (c.m - rb).min(ROW_BLOCK);
        let mut g = c.g0;
        while g < c.g1 {
            if rows <= 2 && g + 1 < c.g1 {
                match rows {
                    1 => tile::<KIND, 1, 2>(c, rb, g),
                    _ => tile::<KIND, 2, 2>(c, rb, g),
                };
                g += 2;
                continue;
            }
            let mut r = rb;
            while r < rb + rows {
                r += match rb + rows - r {
                    6.. => tile::<KIND, 6, 1>(c, r, g),
                    5 => tile::<KIND, 5, 1>(c, r, g),
                    4 => tile::<KIND, 4, 1>(c, r, g),
                    3 => tile::<KIND, 3, 1>(c, r, g),
                    2 => tile::<KIND, 2, 1>(c, r, g),
                    _ => tile::<KIND, 1, 1>(c, r, g),
                };
            }
            g += 1;
        }
    }
}

/// Bytes of one input index of a group.
const fn step<const KIND: u8>() -> usize {
    if KIND == F32 {
        4 * GROUP
    } else {
        2 * GROUP
    }
}

/// The 16 columns' weights at `p` (one input index of a group) as two f32 vectors,
/// columns 0–7 and 8–15.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load16<const KIND: u8>(p: *const u8) -> [__m256; 2] {
    match KIND {
        F32 => [
            _mm256_loadu_ps(p as *const f32),
            _mm256_loadu_ps(p.add(32) as *const f32),
        ],
        F16 => [
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i)),
        ],
        _ => {
            // A bf16 is the top half of its f32: interleave zeros below it.
            let v = _mm256_loadu_si256(p as *const __m256i);
            let z = _mm256_setzero_si256();
            [
                _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v)),
                _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v)),
            ]
        }
    }
}

/// Computes and stores rows `r0..r0+NR` × groups `g0..g0+G` of the chunk; returns `NR`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::needless_range_loop)] // `r` and `g` index several arrays at once
unsafe fn tile<const KIND: u8, const NR: usize, const G: usize>(
    c: &FloatChunk,
    r0: usize,
    g0: usize,
) -> usize {
    let k = c.w.k;
    let mut w = [std::ptr::null::<u8>(); G];
    for g in 0..G {
        w[g] = c.w.groups.group(g0 + g).as_ptr();
    }
    // SAFETY (all pointer reads below): rows r0..r0+NR < m have k values each (asserted by
    // the caller), and a group holds k indices of step::<KIND>() bytes.
    let x = c.x.as_ptr().add(r0 * k);
    let mut acc = [[[_mm256_setzero_ps(); 2]; G]; NR];
    for i in 0..k {
        let mut wv = [[_mm256_setzero_ps(); 2]; G];
        for g in 0..G {
            let p = w[g].add(i * step::<KIND>());
            // The first tile over a group streams it from memory: ask for it ahead, across
            // the page boundaries where the hardware prefetchers stop. A prefetch never
            // faults, and later tiles find the lines cached.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES) as *const i8);
            wv[g] = load16::<KIND>(p);
        }
        for r in 0..NR {
            let xb = _mm256_broadcast_ss(&*x.add(r * k + i));
            for g in 0..G {
                for h in 0..2 {
                    acc[r][g][h] = _mm256_fmadd_ps(wv[g][h], xb, acc[r][g][h]);
                }
            }
        }
    }
    for r in 0..NR {
        for g in 0..G {
            let group = g0 + g;
            let valid = (c.w.rows - group * GROUP).min(GROUP);
            for h in 0..2 {
                let first = (group - c.g0) * GROUP + h * HALF;
                // SAFETY: row r0+r < m and the group's valid lanes are this task's columns.
                let dst = c.out.at(r0 + r, first);
                match valid.saturating_sub(h * HALF) {
                    0 => {}
                    HALF.. => _mm256_storeu_ps(dst, acc[r][g][h]),
                    n => {
                        let mut lanes = [0.0f32; HALF];
                        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][g][h]);
                        std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, n);
                    }
                }
            }
        }
    }
    NR
}
