//! AVX2 kernels for the K-quants (Q3_K, Q4_K, Q5_K, Q6_K) against 8-bit activations in
//! blocks of 256 ([`Q8KActs`]); AVX-512 CPUs run them too.
//!
//! A tile unpacks each weight super-block once into 8 vectors of 32 unsigned quants `u` (in
//! value order; Q3_K's and Q6_K's signed quants offset by 4 and 32) and 8 vectors of 16-bit
//! sub-block scales, then for each activation row: `maddubs(u, x)` (at most 2·63·127, never
//! saturating), `madd` with the scales, summed in 8 i32 lanes over the super-block. The offset
//! and min terms (`Σ m·Σx` per sub-block) come from the activations' sums of 16, also in 8 i32
//! lanes. Each super-block adds its two integer sums to f32 lanes with its scales; lanes
//! reduce by one fixed tree, so a row's result never depends on the tile it ran in.

use std::arch::x86_64::*;

use super::avx2::{f16_at_ptr, hsum};
use super::quantize::{Q8KActs, Q8K_BLOCK};
use super::reference::{q3k_scale, q4k_scale_min};
use super::Chunk;
use crate::kernels::dtype::WeightDType;

/// Rows of activations per tile.
const R: usize = 4;
/// Output columns per tile.
const C: usize = 2;

/// One unpacked super-block of one weight row.
struct Unpacked {
    /// Unsigned quants, 32 values per vector, in value order.
    u: [__m256i; 8],
    /// Per vector, the i16 scale of each `maddubs` lane (a 16-value sub-block per half).
    scales: [__m256i; 8],
    /// Per 16-value sub-block, what multiplies the activations' sum of 16 in the offset/min
    /// term (Q4_K/Q5_K: the sub-block's min; Q3_K/Q6_K: its scale).
    mult: [__m256i; 2],
    /// The super-block's `d`, and the f32 factor of its offset/min term (subtracted).
    d: f32,
    dmin: f32,
}

pub(super) fn q8k_chunk(c: &Chunk, acts: &Q8KActs) {
    // SAFETY: `linear_with` runs this path only where `KernelPath::Avx2.is_supported()`
    // (every AVX-512 CPU it dispatches here also has AVX2).
    unsafe { q8k_chunk_impl(c, acts) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8k_chunk_impl(c: &Chunk, acts: &Q8KActs) {
    let mut j = c.c0;
    while j < c.c1 {
        let cols = if j + C <= c.c1 { C } else { 1 };
        let mut r = 0;
        while r < c.m {
            let rows = (c.m - r).min(R);
            match (rows, cols) {
                (4, 2) => q8k_tile::<4, 2>(c, acts, r, j),
                (3, 2) => q8k_tile::<3, 2>(c, acts, r, j),
                (2, 2) => q8k_tile::<2, 2>(c, acts, r, j),
                (1, 2) => q8k_tile::<1, 2>(c, acts, r, j),
                (4, _) => q8k_tile::<4, 1>(c, acts, r, j),
                (3, _) => q8k_tile::<3, 1>(c, acts, r, j),
                (2, _) => q8k_tile::<2, 1>(c, acts, r, j),
                _ => q8k_tile::<1, 1>(c, acts, r, j),
            }
            r += rows;
        }
        j += cols;
    }
}

/// 16 i32 multipliers as two vectors.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn mult16(m: &[i32; 16]) -> [__m256i; 2] {
    [
        _mm256_loadu_si256(m.as_ptr() as *const __m256i),
        _mm256_loadu_si256(m.as_ptr().add(8) as *const __m256i),
    ]
}

/// Bytes `(v >> shift) & mask` of `v`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bits(v: __m256i, shift: i32, mask: i8) -> __m256i {
    _mm256_and_si256(
        _mm256_srl_epi16(v, _mm_cvtsi32_si128(shift)),
        _mm256_set1_epi8(mask),
    )
}

/// Unpacks super-block `b` of the weight row at `w`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn unpack(dtype: WeightDType, w: *const u8, b: usize) -> Unpacked {
    let blk = w.add(b * dtype.block_bytes());
    let bytes = std::slice::from_raw_parts(blk, dtype.block_bytes());
    let load = |at: usize| _mm256_loadu_si256(blk.add(at) as *const __m256i);
    let zero = _mm256_setzero_si256();
    let mut u = [zero; 8];
    match dtype {
        WeightDType::Q4K | WeightDType::Q5K => {
            let q_at = if dtype == WeightDType::Q4K { 16 } else { 48 };
            for p in 0..4 {
                let q = load(q_at + 32 * p);
                u[2 * p] = bits(q, 0, 0x0F);
                u[2 * p + 1] = bits(q, 4, 0x0F);
            }
            if dtype == WeightDType::Q5K {
                let qh = load(16);
                for (i, u) in u.iter_mut().enumerate() {
                    *u = _mm256_or_si256(*u, _mm256_slli_epi16(bits(qh, i as i32, 1), 4));
                }
            }
            let (mut scales, mut mins) = ([zero; 8], [0i32; 16]);
            for i in 0..8 {
                let (sc, m) = q4k_scale_min(&bytes[4..16], i);
                scales[i] = _mm256_set1_epi16(i16::from(sc));
                mins[2 * i] = i32::from(m);
                mins[2 * i + 1] = i32::from(m);
            }
            Unpacked {
                u,
                scales,
                mult: mult16(&mins),
                d: f16_at_ptr(blk),
                dmin: f16_at_ptr(blk.add(2)),
            }
        }
        WeightDType::Q6K => {
            for half in 0..2 {
                let (ql0, ql1, qh) = (load(64 * half), load(64 * half + 32), load(128 + 32 * half));
                let hi = |run: i32| _mm256_slli_epi16(bits(qh, 2 * run, 3), 4);
                u[4 * half] = _mm256_or_si256(bits(ql0, 0, 0x0F), hi(0));
                u[4 * half + 1] = _mm256_or_si256(bits(ql1, 0, 0x0F), hi(1));
                u[4 * half + 2] = _mm256_or_si256(bits(ql0, 4, 0x0F), hi(2));
                u[4 * half + 3] = _mm256_or_si256(bits(ql1, 4, 0x0F), hi(3));
            }
            let sc: [i32; 16] = std::array::from_fn(|i| i32::from(bytes[192 + i] as i8));
            sixteen(u, &sc, f16_at_ptr(blk.add(208)), 32.0)
        }
        _ => {
            // Q3_K: u = lo | hi << 2, with w ∝ u − 4.
            let hm = load(0);
            for half in 0..2 {
                let q = load(32 + 32 * half);
                for run in 0..4 {
                    let hi = bits(hm, (4 * half + run) as i32, 1);
                    u[4 * half + run] =
                        _mm256_or_si256(bits(q, 2 * run as i32, 3), _mm256_slli_epi16(hi, 2));
                }
            }
            let sc: [i32; 16] = std::array::from_fn(|i| q3k_scale(&bytes[96..108], i));
            sixteen(u, &sc, f16_at_ptr(blk.add(108)), 4.0)
        }
    }
}

/// A super-block of 16 signed sub-block scales `sc` and `w = d·sc·(u − bias)` (Q3_K, Q6_K):
/// vector `v` gets sub-block `2v`'s scale in its low 8 lanes and `2v + 1`'s in its high 8.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn sixteen(u: [__m256i; 8], sc: &[i32; 16], d: f32, bias: f32) -> Unpacked {
    let scales = std::array::from_fn(|v| {
        _mm256_set_m128i(
            _mm_set1_epi16(sc[2 * v + 1] as i16),
            _mm_set1_epi16(sc[2 * v] as i16),
        )
    });
    Unpacked {
        u,
        scales,
        mult: mult16(sc),
        d,
        dmin: bias * d,
    }
}

/// Computes and stores rows `r0..r0+NR` × weight rows `j0..j0+NC`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q8k_tile<const NR: usize, const NC: usize>(
    c: &Chunk,
    acts: &Q8KActs,
    r0: usize,
    j0: usize,
) {
    let dtype = c.w.dtype;
    let nb = acts.k / Q8K_BLOCK;
    let w: [*const u8; NC] = std::array::from_fn(|cc| c.w.row(j0 + cc).as_ptr());
    let rows: [(&[i8], &[f32], &[i32]); NR] = std::array::from_fn(|r| acts.row(r0 + r));
    let mut acc = [[_mm256_setzero_ps(); NC]; NR];
    let mut macc = [[_mm256_setzero_ps(); NC]; NR];
    for b in 0..nb {
        for cc in 0..NC {
            let blk = unpack(dtype, w[cc], b);
            for (r, &(xq, xd, xbs)) in rows.iter().enumerate() {
                let x = xq.as_ptr().add(Q8K_BLOCK * b);
                let mut sum = _mm256_setzero_si256();
                for v in 0..8 {
                    let xv = _mm256_loadu_si256(x.add(32 * v) as *const __m256i);
                    let dot16 = _mm256_maddubs_epi16(blk.u[v], xv);
                    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(dot16, blk.scales[v]));
                }
                let bs = xbs.as_ptr().add(16 * b);
                let bs0 = _mm256_loadu_si256(bs as *const __m256i);
                let bs1 = _mm256_loadu_si256(bs.add(8) as *const __m256i);
                let msum = _mm256_add_epi32(
                    _mm256_mullo_epi32(bs0, blk.mult[0]),
                    _mm256_mullo_epi32(bs1, blk.mult[1]),
                );
                let dx = xd[b];
                acc[r][cc] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(sum),
                    _mm256_set1_ps(blk.d * dx),
                    acc[r][cc],
                );
                macc[r][cc] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(msum),
                    _mm256_set1_ps(blk.dmin * dx),
                    macc[r][cc],
                );
            }
        }
    }
    for r in 0..NR {
        for cc in 0..NC {
            // SAFETY: rows r0..r0+NR ≤ m and weight rows j0..j0+NC ≤ c1 are this task's.
            c.out
                .write(r0 + r, j0 + cc - c.c0, hsum(acc[r][cc]) - hsum(macc[r][cc]));
        }
    }
}
