//! ggml-compatible numerics for the CPU backend (`--cpu-numerics ggml`): every op performs the
//! float operations, in the order and at the precisions, that llama.cpp's CPU build performs
//! on an AVX-512 x86 machine (ggml at the commit of `tests/fixtures/`), so that the same
//! model file gives the same logits, bit for bit, and greedy runs never part at near-ties.
//!
//! What that takes, op by op (the ggml function each mirrors in brackets):
//! * **Matmul** (`ggml_vec_dot_q4_1_q8_1`, `ggml_vec_dot_q8_0_q8_0`): activations are quantized
//!   per block of 32 with `d = max|x| / 127` stored as f16, `q = round(x · 127 / max|x|)` and,
//!   for Q4_1, `s = f16(d · Σq)`. A block's integer dot is kept as 8 partial sums of 4
//!   products; each is accumulated in its own f32 lane as `fma(dw · dx, sum, lane)`, the lanes
//!   are added with a fixed tree (`hsum_float_8`) and Q4_1's min terms `Σ m · s` are summed
//!   apart and added last.
//! * **RMSNorm** (`ggml_compute_forward_rms_norm_f32`): squares summed in f64.
//! * **SiLU** (`ggml_v_silu`): ggml's vector `exp` approximation, then `x / (1 + e)`.
//! * **RoPE** (`ggml_rope_cache_init`): angles by repeated multiplication with
//!   `base^(-2/d)`, `cosf`/`sinf` of them.
//! * **Attention** (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`): one query at a time
//!   over its keys in order, f16 query against f16 keys (dot summed in a fixed tree), online
//!   softmax with `expf`, and V accumulated in an f16 vector rounded after every key.
//!
//! This is slower than the default numerics (no repacked weights, no AMX, f16 round trips in
//! attention), and less accurate in attention; it exists so that sluice can be held to
//! llama.cpp's outputs exactly. Each output still depends only on its own row and sequence,
//! so batch invariance holds here too.

use half::f16;

use super::ops::simd_dispatch;
use super::pool::{SyncPtr, ThreadPool};
use crate::kernels::dtype::WeightDType;
use crate::kernels::host::HostTensor;

/// Values per quantized block.
const QK: usize = 32;

/// The weight types whose ggml dot products are mirrored here.
pub fn supports(dtype: WeightDType) -> bool {
    matches!(dtype, WeightDType::Q4_1 | WeightDType::Q8_0)
}

/// Activations quantized as ggml's Q8_1 (which for Q8_0 weights is its Q8_0 plus `s`): per
/// block, 32 `i8` quants, `d` and `s` as the f32 values of their f16 encodings.
#[derive(Default)]
pub struct GgmlActs {
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

#[inline(always)]
fn quantize_row_body(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    for (b, xb) in x.chunks_exact(QK).enumerate() {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let db = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qs[QK * b..QK * (b + 1)].iter_mut().zip(xb) {
            // Round half to even, then the saturating packs of the AVX2 code.
            *q = (v * id).round_ties_even().clamp(-128.0, 127.0) as i8;
            sum += *q as i32;
        }
        d[b] = f16::from_f32(db).to_f32();
        s[b] = f16::from_f32(db * sum as f32).to_f32();
    }
}

simd_dispatch!(
    fn quantize_row(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) => quantize_row_body
);

impl GgmlActs {
    fn quantize(&mut self, x: &[f32], m: usize, k: usize) {
        let nb = k / QK;
        self.qs.resize(m * k, 0);
        self.d.resize(m * nb, 0.0);
        self.s.resize(m * nb, 0.0);
        for r in 0..m {
            quantize_row(
                &x[r * k..(r + 1) * k],
                &mut self.qs[r * k..(r + 1) * k],
                &mut self.d[r * nb..(r + 1) * nb],
                &mut self.s[r * nb..(r + 1) * nb],
            );
        }
    }
}

/// `hsum_float_8`: halves added pairwise, then the pairs, then the last two.
#[inline(always)]
fn hsum8(a: [f32; 8]) -> f32 {
    let r = [a[4] + a[0], a[5] + a[1], a[6] + a[2], a[7] + a[3]];
    let (r0, r1) = (r[0] + r[2], r[1] + r[3]);
    r0 + r1
}

#[inline(always)]
fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// One output of a Q4_1 weight row against a Q8_1 activation row.
#[inline(always)]
fn dot_q4_1(w: &[u8], qs: &[i8], d: &[f32], s: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut summs = 0.0f32;
    for (b, blk) in w.chunks_exact(20).enumerate() {
        let (dw, mw) = (half_at(blk, 0), half_at(blk, 2));
        summs = mw.mul_add(s[b], summs);
        let scale = dw * d[b];
        let (q, y) = (&blk[4..20], &qs[QK * b..QK * (b + 1)]);
        for (j, lane) in acc.iter_mut().enumerate() {
            let mut t = 0i32;
            for i in 4 * j..4 * j + 4 {
                let nib = if i < 16 { q[i] & 15 } else { q[i - 16] >> 4 };
                t += nib as i32 * y[i] as i32;
            }
            *lane = scale.mul_add(t as f32, *lane);
        }
    }
    hsum8(acc) + summs
}

/// One output of a Q8_0 weight row against a Q8_0 activation row.
#[inline(always)]
fn dot_q8_0(w: &[u8], qs: &[i8], d: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (b, blk) in w.chunks_exact(34).enumerate() {
        let scale = half_at(blk, 0) * d[b];
        let (q, y) = (&blk[2..34], &qs[QK * b..QK * (b + 1)]);
        for (j, lane) in acc.iter_mut().enumerate() {
            let mut t = 0i32;
            for i in 4 * j..4 * j + 4 {
                t += q[i] as i8 as i32 * y[i] as i32;
            }
            *lane = scale.mul_add(t as f32, *lane);
        }
    }
    hsum8(acc)
}

/// Which dot-product implementation runs (all give the same bits).
#[derive(Clone, Copy, PartialEq, Eq)]
enum DotPath {
    /// AVX-512 VL + VNNI on 256-bit vectors, as llama.cpp's AVX2 code compiles there.
    Vnni,
    Portable,
}

fn dot_path() -> DotPath {
    static PATH: std::sync::OnceLock<DotPath> = std::sync::OnceLock::new();
    *PATH.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::env::var("SLUICE_CPU_KERNEL").as_deref() != Ok("portable")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return DotPath::Vnni;
        }
        DotPath::Portable
    })
}

/// Computes columns `c0..c1` of one part for all `m` rows.
#[allow(clippy::too_many_arguments)]
fn columns(
    w: &HostTensor,
    c0: usize,
    c1: usize,
    acts: &GgmlActs,
    m: usize,
    out: &SyncPtr<f32>,
    ld: usize,
    col_off: usize,
) {
    let (k, nb) = (w.cols, w.cols / QK);
    let path = dot_path();
    let mut c = c0;
    while c < c1 {
        // Four columns at a time on the VNNI path: four independent accumulator chains.
        let n = if path == DotPath::Vnni && c + 4 <= c1 {
            4
        } else {
            1
        };
        for r in 0..m {
            let (qs, d, s) = (
                &acts.qs[r * k..(r + 1) * k],
                &acts.d[r * nb..(r + 1) * nb],
                &acts.s[r * nb..(r + 1) * nb],
            );
            let mut v = [0.0f32; 4];
            match (path, w.dtype) {
                #[cfg(target_arch = "x86_64")]
                (DotPath::Vnni, dtype) => {
                    let rows: [&[u8]; 4] = std::array::from_fn(|i| w.row(c + i.min(n - 1)));
                    // SAFETY: the path was chosen from this CPU's features; each row holds
                    // `nb` blocks and the activation slices `nb` blocks (the width is `k`).
                    v = unsafe {
                        match (dtype, n) {
                            (WeightDType::Q4_1, 4) => vnni::dots_q4_1::<4>(rows, qs, d, s),
                            (WeightDType::Q4_1, _) => {
                                let [x] = vnni::dots_q4_1::<1>([rows[0]], qs, d, s);
                                [x, 0.0, 0.0, 0.0]
                            }
                            (_, 4) => vnni::dots_q8_0::<4>(rows, qs, d),
                            _ => {
                                let [x] = vnni::dots_q8_0::<1>([rows[0]], qs, d);
                                [x, 0.0, 0.0, 0.0]
                            }
                        }
                    };
                }
                (_, WeightDType::Q4_1) => v[0] = dot_q4_1(w.row(c), qs, d, s),
                _ => v[0] = dot_q8_0(w.row(c), qs, d),
            }
            // SAFETY: each (row, column) is written by the one task that owns the column.
            let o = unsafe { out.slice(r * ld + col_off + c, n) };
            o.copy_from_slice(&v[..n]);
        }
        c += n;
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    #![allow(clippy::incompatible_msrv)]
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn half(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline(always)]
    unsafe fn hsum8(v: __m256) -> f32 {
        let mut a = [0.0f32; 8];
        _mm256_storeu_ps(a.as_mut_ptr(), v);
        super::hsum8(a)
    }

    /// [`super::dot_q4_1`] of `N` weight rows against one activation row, with `vpdpbusd`.
    ///
    /// # Safety
    /// AVX-512 VL/VNNI, AVX2, FMA and F16C; each of `w` holds `d.len()` Q4_1 blocks, `qs`
    /// as many × 32 values.
    #[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn dots_q4_1<const N: usize>(
        w: [&[u8]; N],
        qs: &[i8],
        d: &[f32],
        s: &[f32],
    ) -> [f32; N] {
        let nb = d.len();
        assert!(w.iter().all(|w| w.len() >= nb * 20) && qs.len() >= nb * 32 && s.len() >= nb);
        let low = _mm256_set1_epi8(0xF);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut summs = [0.0f32; N];
        for b in 0..nb {
            let qy = _mm256_loadu_si256(qs.as_ptr().add(b * 32) as *const __m256i);
            for i in 0..N {
                let p = w[i].as_ptr().add(b * 20);
                summs[i] = half(p.add(2)).mul_add(s[b], summs[i]);
                let scale = _mm256_set1_ps(half(p) * d[b]);
                let tmp = _mm_loadu_si128(p.add(4) as *const __m128i);
                let qx = _mm256_and_si256(low, _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp));
                let xy = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), qx, qy));
                acc[i] = _mm256_fmadd_ps(scale, xy, acc[i]);
            }
        }
        std::array::from_fn(|i| hsum8(acc[i]) + summs[i])
    }

    /// [`super::dot_q8_0`] of `N` weight rows, with `vpdpbusd` (|x| against y with x's signs).
    ///
    /// # Safety
    /// As [`dots_q4_1`], with Q8_0 blocks.
    #[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn dots_q8_0<const N: usize>(
        w: [&[u8]; N],
        qs: &[i8],
        d: &[f32],
    ) -> [f32; N] {
        let nb = d.len();
        assert!(w.iter().all(|w| w.len() >= nb * 34) && qs.len() >= nb * 32);
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, &db) in d.iter().enumerate() {
            let qy = _mm256_loadu_si256(qs.as_ptr().add(b * 32) as *const __m256i);
            for i in 0..N {
                let p = w[i].as_ptr().add(b * 34);
                let scale = _mm256_set1_ps(half(p) * db);
                let qx = _mm256_loadu_si256(p.add(2) as *const __m256i);
                let (ax, sy) = (_mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx));
                let xy = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy));
                acc[i] = _mm256_fmadd_ps(scale, xy, acc[i]);
            }
        }
        std::array::from_fn(|i| hsum8(acc[i]))
    }
}

/// Output columns per task.
const COLUMN_CHUNK: usize = 64;

/// `out[r, :] = x[r, :] · Wᵀ` over the parts of a linear layer (joined by columns), each a
/// Q4_1 or Q8_0 tensor ([`supports`]).
pub fn linear(
    pool: &ThreadPool,
    x: &[f32],
    m: usize,
    parts: &[HostTensor],
    out: &mut [f32],
    acts: &mut GgmlActs,
) {
    let k = parts[0].cols;
    acts.quantize(x, m, k);
    let ld: usize = parts.iter().map(|p| p.rows).sum();
    let out = SyncPtr::new(out);
    let acts = &*acts;
    let mut col_off = 0;
    for p in parts {
        pool.run(p.rows.div_ceil(COLUMN_CHUNK), |t| {
            let c0 = t * COLUMN_CHUNK;
            columns(
                p,
                c0,
                (c0 + COLUMN_CHUNK).min(p.rows),
                acts,
                m,
                &out,
                ld,
                col_off,
            );
        });
        col_off += p.rows;
    }
}

#[inline(always)]
fn rms_norm_row_body(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let mut sum = 0.0f64;
    for &v in x {
        sum += (v * v) as f64;
    }
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, x), w) in out.iter_mut().zip(x).zip(w) {
        *o = x * scale * w;
    }
}

simd_dispatch!(
    /// `out = x / rms(x) * w` as ggml computes it (squares summed in f64).
    pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) => rms_norm_row_body
);

/// ggml's vector `expf` (`ggml_v_expf`, AVX-512 form): a degree-5 polynomial on the reduced
/// argument, scaled by `2^n`.
#[inline(always)]
fn v_expf(x: f32) -> f32 {
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
    (j as f64 * 2f64.powi(n as i32)) as f32
}

#[inline(always)]
fn silu_mul_row_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + v_expf(0.0 - g)) * u;
    }
}

simd_dispatch!(
    /// `out = silu(gate) * up` as ggml's `ggml_vec_swiglu_f32` computes it.
    pub fn silu_mul_row(gate: &[f32], up: &[f32], out: &mut [f32]) => silu_mul_row_body
);

/// RoPE cosines and sines of one position, `[head_dim / 2]` each, as `ggml_rope_cache_init`
/// makes them: the angle of pair `i` is `p · s^i` with `s = base^(-2/d)`, by repeated f32
/// multiplication, divided by the pair's frequency factor.
pub fn rope_angles(
    pos: u32,
    base: f32,
    dims: usize,
    factors: Option<&[f32]>,
    cos: &mut Vec<f32>,
    sin: &mut Vec<f32>,
) {
    let theta_scale = base.powf(-2.0 / dims as f32);
    let mut theta = pos as f32;
    for i in 0..dims / 2 {
        let ff = factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0);
        let t = theta / ff;
        cos.push(t.cos());
        sin.push(t.sin());
        theta *= theta_scale;
    }
}

/// Rotates one head as ggml's `rotate_pairs` compiles on x86 with FMA: `x0·cos − x1·sin`
/// with the first product fused.
#[inline(always)]
pub fn rope_head(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0.mul_add(cos[i], -(x1 * sin[i]));
        x[b] = x0.mul_add(sin[i], x1 * cos[i]);
    }
}

/// Scratch space of [`attend_kv_head`], reused across calls.
#[derive(Default)]
pub struct AttnScratch {
    /// A block's K as f32, `[head_dim][block_size]`, and V, `[block_size][head_dim]`.
    kf: Vec<f32>,
    vf: Vec<f32>,
    /// The 4 × 16 lane sums of `ggml_vec_dot_f16` per key, `[64][block_size]`.
    lanes: Vec<f32>,
    scores: Vec<f32>,
    /// `VKQ16` of each query head, `[group][head_dim]`, as f32 values of f16 precision.
    acc: Vec<f32>,
    tmp: Vec<f16>,
}

/// One KV head's cached keys and values in the paged layout: K `[head_dim][block_size]` and
/// V `[block_size][head_dim]` per block, at `bases[b]` in `k` and `v` for the sequence's
/// `b`-th block.
pub struct KvHead<'a> {
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub bases: &'a [usize],
    pub block_size: usize,
}

/// Attention of the query heads `q` (`[group][head_dim]`, values of f16 precision) of one
/// KV head over its first `ctx` cached keys, as ggml's
/// `ggml_compute_forward_flash_attn_ext_f16_one_chunk` computes it; writes `out` (same shape).
#[allow(clippy::too_many_arguments)]
pub fn attend_kv_head(
    q: &[f32],
    kv: &KvHead<'_>,
    ctx: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
    scratch: &mut AttnScratch,
) {
    attend_kv_head_dispatch(q, kv, ctx, scale, head_dim, out, scratch)
}

#[inline(always)]
fn attend_kv_head_body(
    q: &[f32],
    kv: &KvHead<'_>,
    ctx: usize,
    scale: f32,
    d: usize,
    out: &mut [f32],
    scratch: &mut AttnScratch,
) {
    let (bs, group) = (kv.block_size, q.len() / d);
    let AttnScratch {
        kf,
        vf,
        lanes,
        scores,
        acc,
        tmp,
    } = scratch;
    kf.resize(d * bs, 0.0);
    vf.resize(d * bs, 0.0);
    lanes.resize(64 * bs, 0.0);
    scores.resize(bs, 0.0);
    acc.clear();
    acc.resize(group * d, 0.0);
    tmp.resize(d, f16::ZERO);
    let mut max = vec![f32::NEG_INFINITY; group];
    let mut sum = vec![0.0f32; group];
    let np = d & !63;
    for (b, &base) in kv.bases.iter().enumerate().take(ctx.div_ceil(bs)) {
        let n = bs.min(ctx - b * bs);
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(&kv.k[base..][..d * bs], kf);
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(&kv.v[base..][..d * bs], vf);
        for (hq, qh) in q.chunks_exact(d).enumerate() {
            // `ggml_vec_dot_f16` for every key of the block at once: lane (j, l) of a key
            // sums dimensions 64·step + 16·j + l.
            lanes.fill(0.0);
            for step in (0..np).step_by(64) {
                for jl in 0..64 {
                    let (x, row) = (qh[step + jl], &kf[(step + jl) * bs..][..bs]);
                    for (s, &k) in lanes[jl * bs..][..bs].iter_mut().zip(row) {
                        *s = k.mul_add(x, *s);
                    }
                }
            }
            let lane = |i: usize, key: usize| lanes[i * bs + key];
            for (key, score) in scores.iter_mut().enumerate().take(n) {
                let v: [f32; 16] = std::array::from_fn(|l| {
                    (lane(l, key) + lane(32 + l, key)) + (lane(16 + l, key) + lane(48 + l, key))
                });
                let t: [f32; 8] = std::array::from_fn(|i| v[i] + v[i + 8]);
                let u: [f32; 4] = std::array::from_fn(|i| t[i] + t[i + 4]);
                let mut s = ((u[0] + u[2]) + (u[1] + u[3])) as f64;
                for i in np..d {
                    s += (kf[i * bs + key] * qh[i]) as f64;
                }
                *score = s as f32 * scale;
            }
            let acc = &mut acc[hq * d..][..d];
            for (key, &score) in scores.iter().enumerate().take(n) {
                let (mut ms, mut vs) = (1.0f32, 1.0f32);
                if score > max[hq] {
                    ms = (max[hq] - score).exp();
                    max[hq] = score;
                    for a in acc.iter_mut() {
                        *a *= ms;
                    }
                    round_to_f16(acc, tmp);
                } else {
                    vs = (score - max[hq]).exp();
                }
                for (a, &v) in acc.iter_mut().zip(&vf[key * d..][..d]) {
                    *a = v.mul_add(vs, *a);
                }
                round_to_f16(acc, tmp);
                sum[hq] = sum[hq].mul_add(ms, vs);
            }
        }
    }
    for ((o, a), s) in out.chunks_exact_mut(d).zip(acc.chunks_exact(d)).zip(&sum) {
        let inv = if *s == 0.0 { 0.0 } else { 1.0 / s };
        for (o, a) in o.iter_mut().zip(a) {
            *o = a * inv;
        }
    }
}

simd_dispatch!(
    fn attend_kv_head_dispatch(q: &[f32], kv: &KvHead<'_>, ctx: usize, scale: f32, d: usize, out: &mut [f32], scratch: &mut AttnScratch) => attend_kv_head_body
);

/// Rounds every value to f16 precision (round half to even, as `vcvtps2ph`).
#[inline(always)]
fn round_to_f16(x: &mut [f32], tmp: &mut [f16]) {
    use half::slice::HalfFloatSliceExt;
    let tmp = &mut tmp[..x.len()];
    tmp.convert_from_f32_slice(x);
    tmp.convert_to_f32_slice(x);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::matmul::quantize_weights::quantize_row as quantize_weights;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The VNNI dot products give the portable ones' bits, one column or four at a time.
    #[test]
    fn vnni_and_portable_dots_agree() {
        if dot_path() != DotPath::Vnni {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let k = 256;
        let x: Vec<f32> = (0..k).map(|_| rng.random_range(-3.0..3.0)).collect();
        let mut acts = GgmlActs::default();
        acts.quantize(&x, 1, k);
        let (qs, d, s) = (&acts.qs[..], &acts.d[..], &acts.s[..]);
        for dtype in [WeightDType::Q4_1, WeightDType::Q8_0] {
            let rows: Vec<Vec<u8>> = (0..4)
                .map(|_| {
                    let w: Vec<f32> = (0..k).map(|_| rng.random_range(-1.0..1.0)).collect();
                    quantize_weights(dtype, &w)
                })
                .collect();
            let portable: Vec<f32> = rows
                .iter()
                .map(|w| match dtype {
                    WeightDType::Q4_1 => dot_q4_1(w, qs, d, s),
                    _ => dot_q8_0(w, qs, d),
                })
                .collect();
            let refs: [&[u8]; 4] = std::array::from_fn(|i| &rows[i][..]);
            // SAFETY: the path says the CPU has the features; sizes match `k`.
            let (four, one) = unsafe {
                match dtype {
                    WeightDType::Q4_1 => (
                        vnni::dots_q4_1::<4>(refs, qs, d, s),
                        vnni::dots_q4_1::<1>([refs[2]], qs, d, s)[0],
                    ),
                    _ => (
                        vnni::dots_q8_0::<4>(refs, qs, d),
                        vnni::dots_q8_0::<1>([refs[2]], qs, d)[0],
                    ),
                }
            };
            for i in 0..4 {
                assert_eq!(
                    four[i].to_bits(),
                    portable[i].to_bits(),
                    "{dtype:?} column {i}"
                );
            }
            assert_eq!(one.to_bits(), portable[2].to_bits(), "{dtype:?}");
        }
    }

    /// Activations as ggml's Q8_1: scale and block sum rounded to f16, quants by 127/max.
    #[test]
    fn activations_quantize_as_q8_1() {
        let mut x: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) * 0.37).collect();
        x[3] = -6.0;
        let mut acts = GgmlActs::default();
        acts.quantize(&x, 1, 32);
        assert_eq!(acts.qs[3], -127);
        assert_eq!(acts.d[0], f16::from_f32(6.0 / 127.0).to_f32());
        let sum: i32 = acts.qs.iter().map(|&q| q as i32).sum();
        assert_eq!(acts.s[0], f16::from_f32(6.0 / 127.0 * sum as f32).to_f32());
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

    #[test]
    fn hsum8_tree() {
        assert_eq!(hsum8([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]), 36.0);
        // (a4 + a0) + (a6 + a2) first: 1e8 cancels before the small terms are lost.
        let a = [1e8, 1.0, 0.0, 1.0, -1e8, 1.0, 0.5, 1.0];
        assert_eq!(hsum8(a), 4.5);
    }
}
