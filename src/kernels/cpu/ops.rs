//! Vector primitives that the CPU ops and the host sampler share: the per-instruction-set
//! dispatch (`simd_dispatch!`), fixed-tree reductions, `exp` at three precisions (correctly
//! rounded, approximate, and ggml's `ggml_v_expf`), a sampler's softmax weights and argmax.
//!
//! Each result is computed by one fixed sequence of float operations whatever the batch, so a
//! sequence's results never depend on what else is in the batch (batch invariance).
//! The bodies are `#[inline(always)]` and instantiated once per instruction set by
//! `simd_dispatch!`, so LLVM vectorizes them for the machine's widest available set.

/// Chooses the widest instruction set available once per process, and calls the body compiled
/// for it.
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
                match $crate::kernels::cpu::ops::simd_level() {
                    // SAFETY: the level was detected on this machine.
                    $crate::kernels::cpu::ops::SimdLevel::Avx512 => unsafe { avx512($($arg),*) },
                    $crate::kernels::cpu::ops::SimdLevel::Avx2 => unsafe { avx2($($arg),*) },
                    $crate::kernels::cpu::ops::SimdLevel::Portable => $body($($arg),*),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            { $body($($arg),*) }
        }
    };
}
pub(crate) use simd_dispatch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimdLevel {
    Avx512,
    Avx2,
    Portable,
}

/// The instruction set the vectorized ops use, detected once (`SLUICE_CPU_KERNEL=portable` forces
/// the portable path).
pub fn simd_level() -> SimdLevel {
    static LEVEL: std::sync::OnceLock<SimdLevel> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        if std::env::var("SLUICE_CPU_KERNEL").as_deref() == Ok("portable") {
            return SimdLevel::Portable;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("fma")
            {
                return SimdLevel::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Portable
    })
}

/// Lanes of the fixed-shape reductions; 16 f32 fill one AVX-512 register or two AVX2 ones.
const LANES: usize = 16;

/// `Σ a[i] * b[i]` with a fixed reduction tree (16 partial sums, then pairwise).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0.0f32; LANES];
    let chunks = n / LANES;
    for c in 0..chunks {
        let (a, b) = (&a[c * LANES..][..LANES], &b[c * LANES..][..LANES]);
        for l in 0..LANES {
            acc[l] = a[l].mul_add(b[l], acc[l]);
        }
    }
    for i in chunks * LANES..n {
        acc[i % LANES] = a[i].mul_add(b[i], acc[i % LANES]);
    }
    reduce(acc)
}

#[inline(always)]
fn reduce(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

/// `y += a * x`
#[inline(always)]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = a.mul_add(*x, *y);
    }
}

/// `exp(x)` evaluated in f64 and rounded once, so it is the correctly rounded f32 result but
/// in the rarest cases (the values glibc's `expf` gives), written so that it vectorizes, unlike
/// a libm call. NaN stays NaN, so a broken row is still seen downstream; large `x` gives +inf.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp_wide(x) as f32
}

/// `tanh(x)` within an ulp, written so that it vectorizes: `(1 − e^(−2|x|)) / (1 + e^(−2|x|))`
/// from [`exp`]'s f64 core with the sign of `x`, and below 1e-3, where that subtraction
/// would cancel, `x − x³/3` (the next term is 1e-13 of it). NaN stays NaN.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let t = exp_wide(-2.0 * x.abs());
    let wide = x as f64;
    let y = if x.abs() < 1e-3 {
        wide * (1.0 - wide * wide / 3.0)
    } else {
        ((1.0 - t) / (1.0 + t)).copysign(wide)
    };
    y as f32
}

/// [`exp`] before its final rounding: `exp(x)` to about 1e-15 relative, as f64.
#[inline(always)]
fn exp_wide(x: f32) -> f64 {
    // Outside these, the f32 result is 0 or +inf whatever the exact value.
    const MIN_X: f64 = -110.0;
    const MAX_X: f64 = 89.0;
    // 1.5 · 2^52: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    let x = x as f64;
    // `clamp` keeps NaN.
    let x = x.clamp(MIN_X, MAX_X);
    let t = x * std::f64::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // |r| ≤ ln2 / 2; a degree-11 Taylor polynomial leaves a relative error under 1e-15.
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut y: f64 = 1.0 / 39_916_800.0;
    for c in [
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        y = y.mul_add(r, c);
    }
    let pow2n =
        f64::from_bits((t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(1023)) << 52);
    y * pow2n
}

/// `exp(x)` in f32 arithmetic, within 2 ulp of the exact value on [-87, 88.7] (tested), for
/// weights that only need to be close: 3–4× the throughput of [`exp`] (16 lanes and a short
/// polynomial). Below −104 it is 0; NaN stays NaN.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    // 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // `clamp` keeps NaN; below −104 the exact value is under half the least subnormal.
    let xc = x.clamp(-104.0, 89.0);
    let t = xc.mul_add(std::f32::consts::LOG2_E, ROUND);
    let n = t - ROUND;
    // |r| ≤ ln2 / 2: a degree-7 Taylor polynomial leaves a relative error under 1e-8.
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    let mut y: f32 = 1.0 / 5_040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        y = y.mul_add(r, c);
    }
    // 2^n in two normal halves, so that n from −150 to 128 scales without a special case
    // (each product by a power of two is exact until the result is subnormal).
    let n = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let (n1, n2) = (n >> 1, n - (n >> 1));
    let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let y = y * pow2(n1) * pow2(n2);
    if x < -104.0 {
        0.0
    } else {
        y
    }
}

/// ggml's vector `expf` (`ggml_v_expf`, AVX-512 form): a degree-5 polynomial on the reduced
/// argument, scaled by `2^n`.
#[inline(always)]
pub fn v_expf(x: f32) -> f32 {
    let r = f32::from_bits(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), r); // log2(e)
    let n = z - r;
    let b = (-n).mul_add(
        f32::from_bits(0x35bf_be8e),
        (-n).mul_add(f32::from_bits(0x3f31_7200), x),
    );
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    let u = b * b;
    let j = f32::from_bits(0x3c07_2010)
        .mul_add(b, f32::from_bits(0x3d2b_9f17))
        .mul_add(
            u,
            f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)),
        )
        .mul_add(u, f32::from_bits(0x3f7f_fff6).mul_add(b, 1.0));
    // `_mm512_scalef_ps(j, n)`: j · 2^n rounded once (exact in f64 for |n| ≤ 192).
    (j as f64 * f64::from_bits(((n as i64 + 1023) as u64) << 52)) as f32
}

#[inline(always)]
fn softmax_weights_body(x: &mut [f32], max: f32, inv_t: f32) {
    for v in x {
        let w = exp_approx((*v - max) * inv_t);
        *v = if w.is_finite() { w } else { 0.0 };
    }
}

simd_dispatch!(
    /// `x = exp((x - max) * inv_t)`: a sampler's unnormalized probabilities at temperature
    /// `1 / inv_t`, vectorized (a libm `expf` per vocabulary entry was the engine thread's
    /// largest cost at 16 sequences), with [`exp_approx`]: a draw needs weights close to
    /// exact, not correctly rounded. A non-finite weight (from a NaN logit) is 0: it can
    /// never be drawn.
    pub fn softmax_weights(x: &mut [f32], max: f32, inv_t: f32) => softmax_weights_body
);

#[inline(always)]
fn softmax_weights_chunked_body(
    x: &mut [f32],
    max: f32,
    inv_t: f32,
    chunk: usize,
    sums: &mut Vec<f32>,
) {
    sums.clear();
    for c in x.chunks_mut(chunk.max(1)) {
        softmax_weights_body(c, max, inv_t);
        sums.push(sum_body(c));
    }
}

simd_dispatch!(
    /// [`softmax_weights`], and the sum of each `chunk` consecutive weights into `sums` (taken
    /// while the chunk is in cache: a draw skips whole chunks by their sums).
    pub fn softmax_weights_chunked(x: &mut [f32], max: f32, inv_t: f32, chunk: usize, sums: &mut Vec<f32>) => softmax_weights_chunked_body
);

#[inline(always)]
fn sum_exp_shifted_body(x: &[f32], max: f32) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += exp_wide(c[l] - max);
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        acc[l] += exp_wide(v - max);
    }
    acc.iter().sum()
}

simd_dispatch!(
    /// `Σ exp(x - max)`, each term and the sum in f64 (a row's log-sum-exp for logprobs: an
    /// f32 sum of 49,152 terms drifts by 1e-4).
    pub fn sum_exp_shifted(x: &[f32], max: f32) -> f64 => sum_exp_shifted_body
);

/// Entries per block of [`argmax`]'s search for the maximum's first position.
const ARGMAX_BLOCK: usize = 256;

#[inline(always)]
fn argmax_body(x: &[f32]) -> usize {
    let m = max_body(x);
    // Blocks are tested whole (vectorized); only the first block that holds `m` is walked.
    for (b, block) in x.chunks(ARGMAX_BLOCK).enumerate() {
        if block.iter().fold(false, |hit, &v| hit | (v == m)) {
            return b * ARGMAX_BLOCK + block.iter().position(|&v| v == m).unwrap_or(0);
        }
    }
    0
}

simd_dispatch!(
    /// The first position of the largest value, NaNs ignored (0 for an empty or all-NaN
    /// row): greedy decoding's choice, vectorized (a scalar walk cost 57 µs on the default
    /// model's 49,152-entry row, more than a draw).
    pub fn argmax(x: &[f32]) -> usize => argmax_body
);

#[inline(always)]
fn all_below_inf_body(x: &[f32]) -> bool {
    // NaN < inf is false, so one comparison finds NaN and +inf; no early exit, so it
    // vectorizes.
    x.iter().fold(true, |ok, &v| ok & (v < f32::INFINITY))
}

simd_dispatch!(
    /// Whether every value is below +inf (no NaN, no +inf; −inf is allowed: a banned token).
    pub fn all_below_inf(x: &[f32]) -> bool => all_below_inf_body
);

#[inline(always)]
fn sum_body(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    for (l, v) in tail.iter().enumerate() {
        acc[l] += v;
    }
    reduce(acc)
}

simd_dispatch!(
    /// `Σ x` with a fixed 16-lane reduction tree.
    pub fn sum(x: &[f32]) -> f32 => sum_body
);

#[inline(always)]
fn max_body(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        acc[l] = if v > acc[l] { v } else { acc[l] };
    }
    acc.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

simd_dispatch!(
    /// The largest value (NaNs are skipped; `-inf` for an empty or all-NaN slice).
    pub fn max(x: &[f32]) -> f32 => max_body
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_correctly_rounded() {
        let mut x = 95.0f32;
        while x > -110.0 {
            let (ours, exact) = (exp(x), (x as f64).exp() as f32);
            assert_eq!(ours, exact, "exp({x})");
            x -= 0.000_37;
        }
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn exp_approx_is_within_2_ulp() {
        let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
        let mut x = 88.7f32;
        while x > -87.0 {
            let (ours, exact) = (exp_approx(x), (x as f64).exp() as f32);
            assert!(
                ulps(ours, exact) <= 2,
                "exp_approx({x}) = {ours}, want {exact}"
            );
            x -= 0.000_37;
        }
        // Subnormal results: close in absolute terms.
        for x in [-90.0f32, -100.0, -103.9] {
            let exact = (x as f64).exp();
            assert!(
                (exp_approx(x) as f64 - exact).abs() <= 2.0 * 1.4e-45,
                "exp_approx({x})"
            );
        }
        assert_eq!(exp_approx(-104.5), 0.0);
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(89.0), f32::INFINITY);
        assert!(exp_approx(f32::NAN).is_nan());
        assert_eq!(exp_approx(0.0), 1.0);
    }

    #[test]
    fn tanh_is_within_an_ulp_and_keeps_its_sign() {
        let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
        let mut x = 12.0f32;
        while x > -12.0 {
            let (ours, exact) = (tanh(x), (x as f64).tanh() as f32);
            assert!(ulps(ours, exact) <= 1, "tanh({x}) = {ours}, want {exact}");
            x -= 0.000_37;
        }
        for x in [1e-3f32, 1e-7, 1e-20, 0.0] {
            assert!(ulps(tanh(x), (x as f64).tanh() as f32) <= 1, "tanh({x})");
            assert!(ulps(tanh(-x), -(x as f64).tanh() as f32) <= 1, "tanh(-{x})");
        }
        assert_eq!(tanh(f32::INFINITY), 1.0);
        assert_eq!(tanh(f32::NEG_INFINITY), -1.0);
        assert!(tanh(f32::NAN).is_nan());
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_skips_nan() {
        let mut v: Vec<f32> = (0..1000).map(|i| (i % 97) as f32).collect();
        assert_eq!(argmax(&v), 96);
        v[700] = 500.0;
        v[900] = 500.0;
        assert_eq!(argmax(&v), 700);
        v[10] = f32::NAN;
        assert_eq!(argmax(&v), 700);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -1.0]), 1);
    }

    #[test]
    fn all_below_inf_finds_nan_and_inf() {
        let mut v = vec![1.0f32; 333];
        v[5] = f32::NEG_INFINITY;
        assert!(all_below_inf(&v));
        v[300] = f32::NAN;
        assert!(!all_below_inf(&v));
        v[300] = f32::INFINITY;
        assert!(!all_below_inf(&v));
    }

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..67).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..67).map(|i| 1.0 - i as f32 * 0.01).collect();
        let naive: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (*x as f64) * (*y as f64))
            .sum();
        assert!((dot(&a, &b) as f64 - naive).abs() < 1e-3);
    }

    #[test]
    fn v_expf_is_close_to_exp() {
        for i in -2000..2000 {
            let x = i as f32 * 0.043;
            let (got, want) = (v_expf(x), (x as f64).exp());
            assert!(
                ((got as f64 - want) / want).abs() < 4e-7,
                "{x}: {got} vs {want}"
            );
        }
        assert_eq!(v_expf(-200.0), 0.0);
        assert_eq!(v_expf(200.0), f32::INFINITY);
    }
}
