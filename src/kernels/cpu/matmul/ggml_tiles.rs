//! The dots of [`super::ggml_dots`] on 256-bit vectors, in tiles of up to 4 columns × 4 rows:
//! a weight block is unpacked once for 4 rows, and 16 accumulator chains run side by side.
//! Two ways to the same integers: `vpdpbusd` (AVX-512 VL + VNNI, as llama.cpp's AVX2 code
//! compiles there) and AVX2's `vpmaddubsw` + `vpmaddwd` (as it compiles without VNNI). Every
//! output gets the float operations of the portable dots, so the bits are theirs (tested).

#![allow(clippy::incompatible_msrv)]
use std::arch::x86_64::*;

use crate::kernels::dtype::WeightDType;

#[inline(always)]
unsafe fn half(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[inline(always)]
unsafe fn hsum8(v: __m256) -> f32 {
    let mut a = [0.0f32; 8];
    _mm256_storeu_ps(a.as_mut_ptr(), v);
    super::ggml_dots::hsum8(a)
}

/// 32 products of unsigned `a` and signed `b` bytes, summed by 4 into 8 `i32` lanes. Without
/// VNNI, `vpmaddubsw` first sums pairs in `i16`; no pair saturates (`a` is a nibble or a
/// weight's magnitude, ≤ 128; `b` an activation code, |b| ≤ 127: |pair| ≤ 32,512), so both
/// give the same integers.
#[inline(always)]
unsafe fn dot4<const VNNI: bool>(a: __m256i, b: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
    } else {
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    }
}

type Row<'a> = (&'a [i8], &'a [f32], &'a [f32]);

/// Columns `c..c + N` of `w` for activation rows `r..r + R`, each output as
/// `ggml_dots::dot_q4_1` or `ggml_dots::dot_q8_0` computes it.
///
/// # Safety
/// AVX2, FMA and F16C, and with `VNNI` AVX-512 VL/VNNI; `w` is Q4_1 or Q8_0 with the
/// activations' width.
#[inline(always)]
pub(super) unsafe fn tile<'a, const N: usize, const R: usize, const VNNI: bool>(
    w: &[u8],
    row_bytes: usize,
    dtype: WeightDType,
    c: usize,
    r: usize,
    row_of: &impl Fn(usize) -> Row<'a>,
    store: &impl Fn(usize, usize, &[f32]),
) {
    let cols: [&[u8]; N] = std::array::from_fn(|i| &w[(c + i) * row_bytes..][..row_bytes]);
    let rows: [Row<'a>; R] = std::array::from_fn(|j| row_of(r + j));
    let out = match (dtype == WeightDType::Q4_1, VNNI) {
        (true, true) => q4_1_vnni(cols, rows),
        (true, false) => q4_1_avx2(cols, rows),
        (false, true) => q8_0_vnni(cols, rows),
        (false, false) => q8_0_avx2(cols, rows),
    };
    for (j, o) in out.iter().enumerate() {
        store(r + j, c, o);
    }
}

/// The four compiled dots: each kind under each CPU's features.
macro_rules! dots_with {
    ($name:ident, $body:ident, $vnni:literal, $features:literal) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<const N: usize, const R: usize>(
            w: [&[u8]; N],
            rows: [Row<'_>; R],
        ) -> [[f32; N]; R] {
            $body::<N, R, $vnni>(w, rows)
        }
    };
}
dots_with!(
    q4_1_vnni,
    dots_q4_1,
    true,
    "avx512f,avx512vl,avx512vnni,avx2,fma,f16c"
);
dots_with!(q4_1_avx2, dots_q4_1, false, "avx2,fma,f16c");
dots_with!(
    q8_0_vnni,
    dots_q8_0,
    true,
    "avx512f,avx512vl,avx512vnni,avx2,fma,f16c"
);
dots_with!(q8_0_avx2, dots_q8_0, false, "avx2,fma,f16c");

#[inline(always)]
unsafe fn dots_q4_1<const N: usize, const R: usize, const VNNI: bool>(
    w: [&[u8]; N],
    rows: [Row<'_>; R],
) -> [[f32; N]; R] {
    let nb = rows[0].1.len();
    assert!(w.iter().all(|w| w.len() >= nb * 20));
    assert!(rows
        .iter()
        .all(|(qs, d, s)| qs.len() >= nb * 32 && d.len() >= nb && s.len() >= nb));
    let low = _mm256_set1_epi8(0xF);
    let mut acc = [[_mm256_setzero_ps(); N]; R];
    let mut summs = [[0.0f32; N]; R];
    for b in 0..nb {
        let mut qx = [_mm256_setzero_si256(); N];
        let (mut dw, mut mw) = ([0.0f32; N], [0.0f32; N]);
        for i in 0..N {
            let p = w[i].as_ptr().add(b * 20);
            (dw[i], mw[i]) = (half(p), half(p.add(2)));
            let tmp = _mm_loadu_si128(p.add(4) as *const __m128i);
            qx[i] = _mm256_and_si256(low, _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp));
        }
        for j in 0..R {
            let (qs, d, s) = rows[j];
            let qy = _mm256_loadu_si256(qs.as_ptr().add(b * 32) as *const __m256i);
            for i in 0..N {
                summs[j][i] = mw[i].mul_add(s[b], summs[j][i]);
                let scale = _mm256_set1_ps(dw[i] * d[b]);
                let xy = _mm256_cvtepi32_ps(dot4::<VNNI>(qx[i], qy));
                acc[j][i] = _mm256_fmadd_ps(scale, xy, acc[j][i]);
            }
        }
    }
    std::array::from_fn(|j| std::array::from_fn(|i| hsum8(acc[j][i]) + summs[j][i]))
}

/// (`|x|` against `y` with `x`'s signs, as `mul_sum_i8_pairs_float`.)
#[inline(always)]
unsafe fn dots_q8_0<const N: usize, const R: usize, const VNNI: bool>(
    w: [&[u8]; N],
    rows: [Row<'_>; R],
) -> [[f32; N]; R] {
    let nb = rows[0].1.len();
    assert!(w.iter().all(|w| w.len() >= nb * 34));
    assert!(rows
        .iter()
        .all(|(qs, d, _)| qs.len() >= nb * 32 && d.len() >= nb));
    let mut acc = [[_mm256_setzero_ps(); N]; R];
    for b in 0..nb {
        let mut qx = [_mm256_setzero_si256(); N];
        let mut dw = [0.0f32; N];
        for i in 0..N {
            let p = w[i].as_ptr().add(b * 34);
            dw[i] = half(p);
            qx[i] = _mm256_loadu_si256(p.add(2) as *const __m256i);
        }
        for j in 0..R {
            let (qs, d, _) = rows[j];
            let qy = _mm256_loadu_si256(qs.as_ptr().add(b * 32) as *const __m256i);
            for i in 0..N {
                let scale = _mm256_set1_ps(dw[i] * d[b]);
                let (ax, sy) = (_mm256_sign_epi8(qx[i], qx[i]), _mm256_sign_epi8(qy, qx[i]));
                let xy = _mm256_cvtepi32_ps(dot4::<VNNI>(ax, sy));
                acc[j][i] = _mm256_fmadd_ps(scale, xy, acc[j][i]);
            }
        }
    }
    std::array::from_fn(|j| std::array::from_fn(|i| hsum8(acc[j][i])))
}
