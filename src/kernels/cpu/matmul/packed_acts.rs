//! Activations quantized for the packed kernels: per row, blocks of 32 values as i8 with an
//! f32 scale `d` (`x ≈ d·q`), `s = d·Σq` (carries Q4_1's min) and the integer `Σq` (cancels
//! the unsigned bias of Q4_0 and Q8_0 weights).
//!
//! Quantizing uses AVX-512 or AVX2, which give the same bytes (round to nearest even; the
//! block's maximum and its scale are exact or scalar); a row's result depends only on that
//! row, so it never breaks batch invariance. Buffers only grow: warm calls allocate nothing.

use super::quantize::{grow, run_rows};
use crate::kernels::cpu::pool::{SyncPtr, ThreadPool};

/// Quantized activations `[m, k]`; see the module docs.
#[derive(Default)]
pub(super) struct PackedActs {
    pub(super) k: usize,
    /// Blocks per row, `k / 32`.
    pub(super) nb: usize,
    /// [m, k]
    pub(super) qs: Vec<i8>,
    /// [m, nb] each.
    pub(super) d: Vec<f32>,
    pub(super) s: Vec<f32>,
    pub(super) bsum: Vec<i32>,
}

impl PackedActs {
    /// Quantizes `x` ([m, k] row-major, `k` a multiple of 32).
    ///
    /// Needs the AVX2 path (only called where packed weights exist, which implies it).
    pub(super) fn quantize(&mut self, pool: &ThreadPool, x: &[f32], m: usize, k: usize) {
        debug_assert!(k.is_multiple_of(32) && x.len() == m * k);
        let nb = k / 32;
        self.k = k;
        self.nb = nb;
        grow(&mut self.qs, m * k);
        grow(&mut self.d, m * nb);
        grow(&mut self.s, m * nb);
        grow(&mut self.bsum, m * nb);
        let (qs, d, s, bsum) = (
            SyncPtr::new(&mut self.qs),
            SyncPtr::new(&mut self.d),
            SyncPtr::new(&mut self.s),
            SyncPtr::new(&mut self.bsum),
        );
        let quantize_row = quantize_row_fn();
        run_rows(pool, m, |r| {
            // SAFETY: each row's ranges are disjoint and in bounds (grown above); rows are
            // handed out once each.
            let (qs, d, s, bsum) = unsafe {
                (
                    qs.slice(r * k, k),
                    d.slice(r * nb, nb),
                    s.slice(r * nb, nb),
                    bsum.slice(r * nb, nb),
                )
            };
            quantize_row(&x[r * k..(r + 1) * k], qs, d, s, bsum);
        });
    }
}

/// One row's quantizer.
type QuantizeRow = fn(&[f32], &mut [i8], &mut [f32], &mut [f32], &mut [i32]);

/// The row quantizer for this CPU, chosen once per call rather than per row.
#[cfg(target_arch = "x86_64")]
fn quantize_row_fn() -> QuantizeRow {
    use super::KernelPath;
    // SAFETY (both): packed weights, the only reason to quantize these, exist only where
    // `KernelPath::Avx2.is_supported()`; the AVX-512 variant is chosen only where that is.
    if KernelPath::Avx512.is_supported() {
        |x, qs, d, s, bsum| unsafe { avx512::quantize_row(x, qs, d, s, bsum) }
    } else {
        |x, qs, d, s, bsum| unsafe { avx2::quantize_row(x, qs, d, s, bsum) }
    }
}

/// Off x86 there are never packed weights; this keeps the code total.
#[cfg(not(target_arch = "x86_64"))]
fn quantize_row_fn() -> QuantizeRow {
    portable_quantize_row
}

/// The scalar definition the SIMD variants reproduce byte for byte (tests hold them to it).
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
pub(super) fn portable_quantize_row(
    x: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
    bsum: &mut [i32],
) {
    for (b, xb) in x.chunks_exact(32).enumerate() {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let db = amax / 127.0;
        let id = if db != 0.0 { 1.0 / db } else { 0.0 };
        let mut sum = 0;
        for (q, &v) in qs[32 * b..32 * b + 32].iter_mut().zip(xb) {
            *q = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
            sum += *q as i32;
        }
        d[b] = db;
        s[b] = db * sum as f32;
        bsum[b] = sum;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    #![allow(clippy::incompatible_msrv)]
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX-512 F/BW; slices as in [`super::PackedActs`] for one row.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn quantize_row(
        x: &[f32],
        qs: &mut [i8],
        d: &mut [f32],
        s: &mut [f32],
        bsum: &mut [i32],
    ) {
        let nb = x.len() / 32;
        assert!(qs.len() >= nb * 32 && d.len() >= nb && s.len() >= nb && bsum.len() >= nb);
        let abs_mask = _mm512_set1_epi32(0x7fff_ffff);
        for b in 0..nb {
            // SAFETY: 32 values of block b are in `x` and 32 bytes in `qs` (asserted).
            let (x0, x1) = (
                _mm512_loadu_ps(x.as_ptr().add(32 * b)),
                _mm512_loadu_ps(x.as_ptr().add(32 * b + 16)),
            );
            let a0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x0), abs_mask));
            let a1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x1), abs_mask));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
            let db = amax / 127.0;
            let id = _mm512_set1_ps(if db != 0.0 { 1.0 / db } else { 0.0 });
            // Round to nearest even (MXCSR default); |x·id| ≤ 127 up to rounding; the clamp
            // keeps `sum` equal to the stored quants whatever happens.
            let q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, id));
            let q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, id));
            let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
            let q0 = _mm512_min_epi32(_mm512_max_epi32(q0, lo), hi);
            let q1 = _mm512_min_epi32(_mm512_max_epi32(q1, lo), hi);
            let out = qs.as_mut_ptr().add(32 * b);
            _mm_storeu_si128(out as *mut __m128i, _mm512_cvtsepi32_epi8(q0));
            _mm_storeu_si128(out.add(16) as *mut __m128i, _mm512_cvtsepi32_epi8(q1));
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            d[b] = db;
            s[b] = db * sum as f32;
            bsum[b] = sum;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX2; slices as in [`super::PackedActs`] for one row.
    #[target_feature(enable = "avx2,fma")]
    pub(in super::super) unsafe fn quantize_row(
        x: &[f32],
        qs: &mut [i8],
        d: &mut [f32],
        s: &mut [f32],
        bsum: &mut [i32],
    ) {
        let nb = x.len() / 32;
        assert!(qs.len() >= nb * 32 && d.len() >= nb && s.len() >= nb && bsum.len() >= nb);
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        // `packs` interleaves its two sources per 128-bit lane; this puts the 4-byte groups
        // back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for b in 0..nb {
            // SAFETY: 32 values of block b are in `x` and 32 bytes in `qs` (asserted).
            let v: [__m256; 4] =
                std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(32 * b + 8 * i)));
            let a = v.map(|v| _mm256_and_ps(v, abs_mask));
            let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let db = amax / 127.0;
            let id = _mm256_set1_ps(if db != 0.0 { 1.0 / db } else { 0.0 });
            let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
            // Round to nearest even (MXCSR default), clamped as the AVX-512 variant does.
            let q = v.map(|v| {
                let q = _mm256_cvtps_epi32(_mm256_mul_ps(v, id));
                _mm256_min_epi32(_mm256_max_epi32(q, lo), hi)
            });
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let bytes = _mm256_permutevar8x32_epi32(bytes, order);
            _mm256_storeu_si256(qs.as_mut_ptr().add(32 * b) as *mut __m256i, bytes);
            let t = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let t = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t));
            let t = _mm_add_epi32(t, _mm_shuffle_epi32::<0b01_00_11_10>(t));
            let sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32::<0b10_11_00_01>(t)));
            d[b] = db;
            s[b] = db * sum as f32;
            bsum[b] = sum;
        }
    }
}
