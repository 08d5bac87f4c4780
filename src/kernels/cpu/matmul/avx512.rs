//! AVX-512 kernels: `vpdpbusd` (VNNI) integer dots over pairs of 32-value blocks.
//!
//! A pair of weight blocks is decoded once into 64 bytes in natural k order and dotted with
//! the matching 64 activation bytes of each row of a tile: the 16 i32 lanes hold 4-value
//! partial sums, lanes 0..8 of the first block, 8..16 of the second. Each lane is converted
//! to f32 and accumulated with its block's scale product (`dw·dx`), plus for Q4_0/Q4_1 the
//! min term, `Σ_b mw·s` over vectors of 16 blocks after the main loop. A lone last block fills the pair with zero bytes and zero
//! scales, which adds exactly +0. Lanes are reduced with one fixed tree at the end, so the
//! tile shape never changes an element's bits.
//!
//! * Q4_0/Q4_1: nibbles are unsigned (0..15) and activations signed, as `vpdpbusd` wants.
//! * Q8_0: weights are signed, so they go in biased (`w ^ 0x80 = w + 128`, unsigned) and the
//!   activation table `corr = −128·Σx` per lane, used as the accumulator's start, cancels it.
// The AVX-512 intrinsics are stable since Rust 1.89, the toolchain the project builds with;
// Cargo.toml's `rust-version` (1.85) predates them and should be raised.
#![allow(clippy::incompatible_msrv)]

use std::arch::x86_64::*;

use super::quantize::{Q8Acts, PAIR};
use super::Chunk;
use crate::kernels::dtype::WeightDType;

/// Rows of activations per tile (each decoded weight pair is reused this many times).
const R: usize = 4;
/// Output columns per tile.
const C: usize = 4;

/// Pointers into the activation tables for rows `r0..r0+n`.
#[derive(Clone, Copy)]
struct ActPtrs {
    qs: *const i8,
    dl: *const f32,
    /// Compact `s = d·Σq` per block, [2·npairs] per row.
    s: *const f32,
    corr: *const i32,
    npairs: usize,
}

impl ActPtrs {
    fn new(acts: &Q8Acts, r0: usize) -> Self {
        let np = acts.npairs;
        let (qs, _, s) = acts.row(r0);
        Self {
            qs: qs.as_ptr(),
            dl: acts.dl[r0 * np * 16..].as_ptr(),
            s: s.as_ptr(),
            corr: acts.corr[r0 * np * 16..].as_ptr(),
            npairs: np,
        }
    }
}

pub(super) fn q8_chunk(c: &Chunk, acts: &Q8Acts) {
    // SAFETY: `linear_with` runs this path only where `KernelPath::Avx512.is_supported()`.
    unsafe { q8_chunk_impl(c, acts) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
unsafe fn q8_chunk_impl(c: &Chunk, acts: &Q8Acts) {
    match c.w.dtype {
        WeightDType::Q4_0 => q8_chunk_kind::<0>(c, acts),
        WeightDType::Q4_1 => q8_chunk_kind::<1>(c, acts),
        _ => q8_chunk_kind::<2>(c, acts),
    }
}

/// Blocks rows so that a row block's activations stay in L2 while each column group's
/// weights stay in L1.
const ROW_BLOCK: usize = 32;

/// `KIND`: 0 = Q4_0, 1 = Q4_1, 2 = Q8_0.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
unsafe fn q8_chunk_kind<const KIND: u8>(c: &Chunk, acts: &Q8Acts) {
    let rb = c.w.row_bytes();
    let nb = acts.k / 32;
    for rb0 in (0..c.m).step_by(ROW_BLOCK) {
        let rb1 = (rb0 + ROW_BLOCK).min(c.m);
        let mut j = c.c0;
        while j < c.c1 {
            let wide = j + C <= c.c1;
            let w = c.w.row(j).as_ptr();
            let mut r = rb0;
            while r < rb1 {
                let tall = r + R <= rb1;
                match (tall, wide) {
                    (true, true) => run_tile::<KIND, R, C>(c, w, rb, nb, acts, r, j),
                    (true, false) => run_tile::<KIND, R, 1>(c, w, rb, nb, acts, r, j),
                    (false, true) => run_tile::<KIND, 1, C>(c, w, rb, nb, acts, r, j),
                    (false, false) => run_tile::<KIND, 1, 1>(c, w, rb, nb, acts, r, j),
                }
                r += if tall { R } else { 1 };
            }
            j += if wide { C } else { 1 };
        }
    }
}

/// Computes and stores the `NR` × `NC` outputs at rows `r..`, weight rows `j..`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn run_tile<const KIND: u8, const NR: usize, const NC: usize>(
    c: &Chunk,
    w: *const u8,
    rb: usize,
    nb: usize,
    acts: &Q8Acts,
    r: usize,
    j: usize,
) {
    let sums = tile::<KIND, NR, NC>(w, rb, nb, ActPtrs::new(acts, r));
    for (i, row) in sums.iter().enumerate() {
        for (jj, &v) in row.iter().enumerate() {
            // SAFETY: rows r..r+NR ≤ m and weight rows j..j+NC ≤ c1 belong to this task.
            c.out.write(r + i, j + jj - c.c0, v);
        }
    }
}

/// Byte gather for a pair of 4-bit blocks of `bb` bytes with quants at `qoff`: each block's
/// 16 quant bytes twice (low nibbles, then high ones after the shift).
const fn q4_index(bb: usize, qoff: usize) -> [u8; 64] {
    let mut idx = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        let block = i / 32;
        idx[i] = (block * bb + qoff + i % 16) as u8;
        i += 1;
    }
    idx
}

const Q4_0_INDEX: [u8; 64] = q4_index(18, 2);
const Q4_1_INDEX: [u8; 64] = q4_index(20, 4);

/// Word gather of a pair's f16 scales: [d0 ×8, d1 ×8, m0 ×8, m1 ×8] (`m` only for Q4_1).
const fn scale_index(bb: usize, moff: usize) -> [u16; 32] {
    let mut idx = [0u16; 32];
    let mut i = 0;
    while i < 32 {
        let block = (i / 8) % 2;
        let off = if i < 16 { 0 } else { moff };
        idx[i] = ((block * bb + off) / 2) as u16;
        i += 1;
    }
    idx
}

const Q4_0_SCALES: [u16; 32] = scale_index(18, 0);
const Q4_1_SCALES: [u16; 32] = scale_index(20, 2);
const Q8_0_SCALES: [u16; 32] = scale_index(34, 0);

/// Shift counts per 16-bit word: 0 for the low-nibble halves, 4 for the high ones.
const NIBBLE_SHIFTS: [u16; 32] = {
    let mut s = [0u16; 32];
    let mut i = 0;
    while i < 32 {
        s[i] = if (i / 8) % 2 == 1 { 4 } else { 0 };
        i += 1;
    }
    s
};

/// Dots `cols` (≤ C) weight rows starting at `w` (stride `rb` bytes) with `NR` activation
/// rows; returns the sums as [row][col].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
#[inline]
unsafe fn tile<const KIND: u8, const NR: usize, const NC: usize>(
    w: *const u8,
    rb: usize,
    nb: usize,
    a: ActPtrs,
) -> [[f32; NC]; NR] {
    let bb = match KIND {
        0 => 18,
        1 => 20,
        _ => 34,
    };
    let q_index = _mm512_loadu_si512(if KIND == 0 {
        Q4_0_INDEX.as_ptr()
    } else {
        Q4_1_INDEX.as_ptr()
    } as *const _);
    let s_index = _mm512_loadu_si512(match KIND {
        0 => Q4_0_SCALES.as_ptr(),
        1 => Q4_1_SCALES.as_ptr(),
        _ => Q8_0_SCALES.as_ptr(),
    } as *const _);
    let shifts = _mm512_loadu_si512(NIBBLE_SHIFTS.as_ptr() as *const _);
    let low4 = _mm512_set1_epi8(0x0F);
    let bias = _mm512_set1_epi8(-128);
    let mut acc = [[_mm512_setzero_ps(); NC]; NR];
    for p in 0..a.npairs {
        let two = 2 * p + 1 < nb;
        for c in 0..NC {
            let base = w.add(c * rb + 2 * p * bb);
            // The weights as 64 bytes in k order, and their f16 scales spread over lanes.
            let (wq, scales) = if KIND < 2 {
                let mask: __mmask64 = if two {
                    (1 << (2 * bb)) - 1
                } else {
                    (1 << bb) - 1
                };
                let v = _mm512_maskz_loadu_epi8(mask, base as *const i8);
                let q = _mm512_permutexvar_epi8(q_index, v);
                let q = _mm512_and_si512(_mm512_srlv_epi16(q, shifts), low4);
                (q, _mm512_permutexvar_epi16(s_index, v))
            } else {
                let lo = _mm256_loadu_si256(base.add(2) as *const __m256i);
                let hi =
                    _mm256_maskz_loadu_epi8(if two { !0 } else { 0 }, base.add(36) as *const i8);
                let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                let smask: __mmask64 = if two { (1 << 36) - 1 } else { 3 };
                let v = _mm512_maskz_loadu_epi8(smask, base as *const i8);
                (
                    _mm512_xor_si512(q, bias),
                    _mm512_permutexvar_epi16(s_index, v),
                )
            };
            let dw = _mm512_cvtph_ps(_mm512_castsi512_si256(scales));
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_loadu_si512(a.qs.add((r * a.npairs + p) * PAIR) as *const _);
                let lane = (r * a.npairs + p) * 16;
                let start = if KIND < 2 {
                    _mm512_setzero_si512()
                } else {
                    _mm512_loadu_si512(a.corr.add(lane) as *const _)
                };
                let dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, wq, x));
                let scale = _mm512_mul_ps(dw, _mm512_loadu_ps(a.dl.add(lane)));
                acc[c] = _mm512_fmadd_ps(dot, scale, acc[c]);
            }
        }
    }
    let mut sums = [[0.0f32; NC]; NR];
    for r in 0..NR {
        for c in 0..NC {
            sums[r][c] = hsum(acc[r][c]);
        }
    }
    if KIND < 2 {
        let mins = min_terms::<KIND, NR, NC>(w, rb, nb, a);
        for r in 0..NR {
            for c in 0..NC {
                sums[r][c] += mins[r][c];
            }
        }
    }
    sums
}

/// The Q4_0/Q4_1 min terms Σ_b mw[b]·s[b] (`mw = m`, or `−8·d` for Q4_0), 16 blocks per
/// vector: each column's mins are gathered once and reused by every row of the tile.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
#[inline]
unsafe fn min_terms<const KIND: u8, const NR: usize, const NC: usize>(
    w: *const u8,
    rb: usize,
    nb: usize,
    a: ActPtrs,
) -> [[f32; NC]; NR] {
    let bb: usize = if KIND == 0 { 18 } else { 20 };
    let offsets = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(bb as i32),
    );
    let rs = a.npairs * 2;
    let mut acc = [[_mm512_setzero_ps(); NC]; NR];
    for g in (0..nb).step_by(16) {
        let mask: __mmask16 = if nb - g >= 16 {
            !0
        } else {
            (1 << (nb - g)) - 1
        };
        for c in 0..NC {
            // Each 32-bit gather lane holds a block's (d, m) f16 pair.
            let base = w.add(c * rb + g * bb);
            let dm = _mm512_mask_i32gather_epi32::<1>(
                _mm512_setzero_si512(),
                mask,
                offsets,
                base as *const i32,
            );
            let half = if KIND == 0 {
                dm
            } else {
                _mm512_srli_epi32::<16>(dm)
            };
            let mut mv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(half));
            if KIND == 0 {
                mv = _mm512_mul_ps(mv, _mm512_set1_ps(-8.0));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let sv = _mm512_maskz_loadu_ps(mask, a.s.add(r * rs + g));
                acc[c] = _mm512_fmadd_ps(mv, sv, acc[c]);
            }
        }
    }
    let mut sums = [[0.0f32; NC]; NR];
    for r in 0..NR {
        for c in 0..NC {
            sums[r][c] = hsum(acc[r][c]);
        }
    }
    sums
}

/// Sum of the 16 lanes by one fixed tree: halves, quarters, pairs, neighbours.
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn hsum(v: __m512) -> f32 {
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    let a = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
    let b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
    let c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)))
}

/// Float weights: the AVX2 kernel (AVX-512 support implies AVX2's), memory-bound at m=1.
pub(super) fn float_chunk(c: &Chunk, x: &[f32], k: usize) {
    super::avx2::float_chunk(c, x, k)
}
