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
//! * **Attention**, with whichever of ggml's two kernels llama.cpp's server would run for the
//!   token ([`attends_tiled`]): one query at a time (`..._f16_one_chunk`: f16 query against
//!   f16 keys, dot summed in a fixed tree, online softmax with `expf`, V accumulated in an f16
//!   vector rounded after every key), or tiled for prompt tokens it batches 64 or more at a
//!   time (`..._tiled`: f32 query, a softmax per tile of 64 keys with the vector `exp`, V
//!   accumulated in f32).
//!
//! This is slower than the default numerics (no repacked weights, no AMX, f16 round trips in
//! attention), and less accurate in attention; it exists so that sluice can be held to
//! llama.cpp's outputs exactly. Each output still depends only on its own row and sequence,
//! so batch invariance holds here too.

use half::f16;

use super::ops::{simd_dispatch, v_expf};
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
    fn quantize(&mut self, pool: &ThreadPool, x: &[f32], m: usize, k: usize) {
        let nb = k / QK;
        self.qs.resize(m * k, 0);
        self.d.resize(m * nb, 0.0);
        self.s.resize(m * nb, 0.0);
        let (qs, d, s) = (
            SyncPtr::new(&mut self.qs),
            SyncPtr::new(&mut self.d),
            SyncPtr::new(&mut self.s),
        );
        const ROWS: usize = 16;
        let quantize_rows = |t: usize| {
            for r in t * ROWS..((t + 1) * ROWS).min(m) {
                // SAFETY: each row's ranges are in bounds (resized above) and written by the
                // one task that owns the row.
                unsafe {
                    quantize_row(
                        &x[r * k..(r + 1) * k],
                        qs.slice(r * k, k),
                        d.slice(r * nb, nb),
                        s.slice(r * nb, nb),
                    )
                };
            }
        };
        // A decode step's few rows are not worth waking the pool for.
        if m <= ROWS {
            quantize_rows(0);
        } else {
            pool.run(m.div_ceil(ROWS), quantize_rows);
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
        if super::ops::simd_level() != super::ops::SimdLevel::Portable
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
    let row_of = |r: usize| {
        (
            &acts.qs[r * k..(r + 1) * k],
            &acts.d[r * nb..(r + 1) * nb],
            &acts.s[r * nb..(r + 1) * nb],
        )
    };
    // SAFETY (both writes): each (row, column) is written by the one task that owns the column.
    let store = |r: usize, c: usize, v: &[f32]| unsafe {
        out.slice(r * ld + col_off + c, v.len()).copy_from_slice(v)
    };
    #[cfg(target_arch = "x86_64")]
    if dot_path() == DotPath::Vnni {
        let (bytes, rb) = (&w.bytes[..], w.row_bytes());
        // Tiles of 4 columns × 4 rows: a weight block is unpacked once for 4 rows, and 16
        // accumulator chains run side by side.
        let mut c = c0;
        while c < c1 {
            let n = if c + 4 <= c1 { 4 } else { 1 };
            let mut r = 0;
            while r < m {
                let rows = if r + 4 <= m { 4 } else { 1 };
                // SAFETY: the path was chosen from this CPU's features; every weight row and
                // activation row holds `nb` blocks.
                unsafe {
                    match (n, rows) {
                        (4, 4) => vnni::tile::<4, 4>(bytes, rb, w.dtype, c, r, &row_of, &store),
                        (4, _) => vnni::tile::<4, 1>(bytes, rb, w.dtype, c, r, &row_of, &store),
                        (_, 4) => vnni::tile::<1, 4>(bytes, rb, w.dtype, c, r, &row_of, &store),
                        _ => vnni::tile::<1, 1>(bytes, rb, w.dtype, c, r, &row_of, &store),
                    }
                }
                r += rows;
            }
            c += n;
        }
        return;
    }
    for c in c0..c1 {
        for r in 0..m {
            let (qs, d, s) = row_of(r);
            store(r, c, &[dot(w.dtype, w.row(c), qs, d, s)]);
        }
    }
}

#[inline(always)]
fn dot_body(dtype: WeightDType, w: &[u8], qs: &[i8], d: &[f32], s: &[f32]) -> f32 {
    match dtype {
        WeightDType::Q4_1 => dot_q4_1(w, qs, d, s),
        _ => dot_q8_0(w, qs, d),
    }
}

simd_dispatch!(
    /// [`dot_q4_1`] or [`dot_q8_0`], with native FMA where the CPU has it.
    fn dot(dtype: WeightDType, w: &[u8], qs: &[i8], d: &[f32], s: &[f32]) -> f32 => dot_body
);

#[cfg(target_arch = "x86_64")]
mod vnni {
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
        super::hsum8(a)
    }

    type Row<'a> = (&'a [i8], &'a [f32], &'a [f32]);

    /// Columns `c..c + N` of `w` for activation rows `r..r + R`, each output as
    /// [`super::dot_q4_1`] or [`super::dot_q8_0`] computes it, with `vpdpbusd`.
    ///
    /// # Safety
    /// AVX-512 VL/VNNI, AVX2, FMA and F16C; `w` is Q4_1 or Q8_0 with the activations' width.
    #[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn tile<'a, const N: usize, const R: usize>(
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
        let out = if dtype == WeightDType::Q4_1 {
            dots_q4_1(cols, rows)
        } else {
            dots_q8_0(cols, rows)
        };
        for (j, o) in out.iter().enumerate() {
            store(r + j, c, o);
        }
    }

    #[inline(always)]
    unsafe fn dots_q4_1<const N: usize, const R: usize>(
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
                    let xy =
                        _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), qx[i], qy));
                    acc[j][i] = _mm256_fmadd_ps(scale, xy, acc[j][i]);
                }
            }
        }
        std::array::from_fn(|j| std::array::from_fn(|i| hsum8(acc[j][i]) + summs[j][i]))
    }

    /// (`|x|` against `y` with `x`'s signs, as `mul_sum_i8_pairs_float`.)
    #[inline(always)]
    unsafe fn dots_q8_0<const N: usize, const R: usize>(
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
                    let xy =
                        _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy));
                    acc[j][i] = _mm256_fmadd_ps(scale, xy, acc[j][i]);
                }
            }
        }
        std::array::from_fn(|j| std::array::from_fn(|i| hsum8(acc[j][i])))
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
    acts.quantize(pool, x, m, k);
    let ld: usize = parts.iter().map(|p| p.rows).sum();
    let out = SyncPtr::new(out);
    let acts = &*acts;
    // One job for all parts: (part, first column, its offset in the output row) per task.
    let mut tasks = Vec::new();
    let mut col_off = 0;
    for (i, p) in parts.iter().enumerate() {
        tasks.extend((0..p.rows).step_by(COLUMN_CHUNK).map(|c0| (i, c0, col_off)));
        col_off += p.rows;
    }
    pool.run(tasks.len(), |t| {
        let (i, c0, col_off) = tasks[t];
        let p = &parts[i];
        let c1 = (c0 + COLUMN_CHUNK).min(p.rows);
        columns(p, c0, c1, acts, m, &out, ld, col_off);
    });
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
    /// `VKQ16` (`VKQ32` when tiled) of each query head, `[group][head_dim]`.
    acc: Vec<f32>,
    tmp: Vec<f16>,
    /// The query heads as the kernel meets the keys (f16 precision for one query at a time).
    query: Vec<f32>,
    /// The tiled kernel's keys as f32, `[head_dim][tiled_cap]`, and values, `[key][head_dim]`:
    /// converted once per task, the first `tiled_keys` so far.
    kt: Vec<f32>,
    vt: Vec<f32>,
    tiled_cap: usize,
    tiled_keys: usize,
    /// The one-query kernel's running maximum and sum per query head (`M`, `S`).
    max: Vec<f32>,
    sum: Vec<f32>,
}

impl AttnScratch {
    /// Starts a task (one KV head, queries in order) whose last query sees `max_ctx` keys.
    pub fn begin_task(&mut self, max_ctx: usize) {
        self.tiled_cap = max_ctx;
        self.tiled_keys = 0;
    }
}

/// One KV head's cached keys and values in the paged layout: per block, K `[head_dim]
/// [block_size]` and V `[block_size][head_dim]`, the head's region of block `block_table[b]`
/// for the sequence's `b`-th block.
pub struct KvHead<'a> {
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub block_table: &'a [u32],
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head: usize,
    pub head_dim: usize,
}

impl KvHead<'_> {
    /// Where the sequence's `b`-th block of this head starts in `k` and `v`.
    #[inline(always)]
    fn base(&self, b: usize) -> usize {
        (self.block_table[b] as usize * self.num_kv_heads + self.head)
            * self.block_size
            * self.head_dim
    }
}

/// Query positions llama.cpp's server processes together with position `pos` of a prompt of
/// `prompt_len` tokens: it decodes a prompt in micro-batches of 512.
fn llama_ubatch_len(prompt_len: usize, pos: usize) -> usize {
    const UBATCH: usize = 512;
    (prompt_len - pos / UBATCH * UBATCH).min(UBATCH)
}

/// Whether llama.cpp attends from position `pos` with its tiled kernel (prompt tokens it
/// processes 64 or more at a time, `GGML_FA_TILE_Q`) rather than one query at a time.
pub fn attends_tiled(prompt_len: usize, pos: usize) -> bool {
    pos < prompt_len && llama_ubatch_len(prompt_len, pos) >= 64
}

/// Attention of the query heads `q` (`[group][head_dim]`, f32) of one KV head over its first
/// `ctx` cached keys, as ggml computes it: with `ggml_compute_forward_flash_attn_ext_tiled`
/// when `tiled`, else `ggml_compute_forward_flash_attn_ext_f16_one_chunk`. Writes `out` (same
/// shape as `q`).
#[allow(clippy::too_many_arguments)]
pub fn attend_kv_head(
    q: &[f32],
    kv: &KvHead<'_>,
    ctx: usize,
    scale: f32,
    tiled: bool,
    out: &mut [f32],
    scratch: &mut AttnScratch,
) {
    if tiled {
        attend_kv_head_tiled(q, kv, ctx, scale, out, scratch)
    } else {
        attend_kv_head_dispatch(q, kv, ctx, scale, out, scratch)
    }
}

/// Keys per tile of ggml's tiled kernel (`GGML_FA_TILE_KV`).
const KV_TILE: usize = 64;

/// The tiled kernel for one query: f32 query and keys, scores as an FMA chain over the head
/// dimensions, per tile of 64 keys a max, a rescale when it rises, `ggml_v_expf` weights
/// summed per 16 in f64, and V accumulated in f32 key by key.
#[inline(always)]
fn attend_kv_head_tiled_body(
    q: &[f32],
    kv: &KvHead<'_>,
    ctx: usize,
    scale: f32,
    out: &mut [f32],
    scratch: &mut AttnScratch,
) {
    let d = kv.head_dim;
    let bs = kv.block_size;
    let AttnScratch {
        kt,
        vt,
        tiled_cap,
        tiled_keys,
        scores,
        acc,
        ..
    } = scratch;
    let cap = *tiled_cap;
    assert!(ctx <= cap, "a query past its task's keys");
    kt.resize(d * cap, 0.0);
    vt.resize(cap * d, 0.0);
    // The keys this query sees beyond the task's earlier queries: K as `[dim][key]` (so a
    // vector FMA scores consecutive keys) and V as `[key][dim]`, f32.
    for t in *tiled_keys..ctx {
        let base = kv.base(t / bs);
        let slot = t % bs;
        for i in 0..d {
            kt[i * cap + t] = kv.k[base + i * bs + slot].to_f32();
        }
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(
            &kv.v[base + slot * d..][..d],
            &mut vt[t * d..][..d],
        );
    }
    *tiled_keys = (*tiled_keys).max(ctx);
    scores.resize(KV_TILE, 0.0);
    acc.clear();
    acc.resize(d, 0.0);
    for (qh, o) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        acc.fill(0.0);
        let (mut max, mut sum) = (f32::NEG_INFINITY, 0.0f32);
        for t0 in (0..ctx).step_by(KV_TILE) {
            let n = KV_TILE.min(ctx - t0);
            // Per key an FMA chain over the dimensions in order, 64 keys side by side.
            scores.fill(0.0);
            for (i, &x) in qh.iter().enumerate() {
                let row = &kt[i * cap + t0..][..n];
                for (s, &k) in scores.iter_mut().zip(row) {
                    *s = k.mul_add(x, *s);
                }
            }
            for (j, s) in scores.iter_mut().enumerate() {
                *s = if j < n { *s * scale } else { f32::NEG_INFINITY };
            }
            let tile_max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let new_max = max.max(tile_max);
            if new_max > max {
                let ms = (max - new_max).exp();
                for a in acc.iter_mut() {
                    *a *= ms;
                }
                sum *= ms;
            }
            max = new_max;
            // `ggml_vec_soft_max_f32`: weights in place, summed 16 at a time (16 → 8 → 4 → 2
            // → 1) into an f64.
            let mut total = 0.0f64;
            for chunk in scores.chunks_exact_mut(16) {
                for s in chunk.iter_mut() {
                    *s = v_expf(*s - max);
                }
                let t: [f32; 8] = std::array::from_fn(|i| chunk[i] + chunk[i + 8]);
                let u: [f32; 4] = std::array::from_fn(|i| t[i] + t[i + 4]);
                total += ((u[0] + u[2]) + (u[1] + u[3])) as f64;
            }
            sum = (sum as f64 + total) as f32;
            for (j, &p) in scores.iter().enumerate().take(n) {
                for (a, &v) in acc.iter_mut().zip(&vt[(t0 + j) * d..][..d]) {
                    *a = v.mul_add(p, *a);
                }
            }
        }
        let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
        for (o, a) in o.iter_mut().zip(acc.iter()) {
            *o = a * inv;
        }
    }
}

simd_dispatch!(
    fn attend_kv_head_tiled(q: &[f32], kv: &KvHead<'_>, ctx: usize, scale: f32, out: &mut [f32], scratch: &mut AttnScratch) => attend_kv_head_tiled_body
);

#[inline(always)]
fn attend_kv_head_body(
    q: &[f32],
    kv: &KvHead<'_>,
    ctx: usize,
    scale: f32,
    out: &mut [f32],
    scratch: &mut AttnScratch,
) {
    let d = kv.head_dim;
    let (bs, group) = (kv.block_size, q.len() / d);
    let AttnScratch {
        kf,
        vf,
        lanes,
        scores,
        acc,
        tmp,
        query,
        max,
        sum,
        ..
    } = scratch;
    // The query meets the f16 keys as f16 (`q_to_vec_dot`).
    query.clear();
    query.extend_from_slice(q);
    tmp.resize(d, f16::ZERO);
    for h in query.chunks_exact_mut(d) {
        round_to_f16(h, tmp);
    }
    let q = &query[..];
    kf.resize(d * bs, 0.0);
    vf.resize(d * bs, 0.0);
    lanes.resize(64 * bs, 0.0);
    scores.resize(bs, 0.0);
    acc.clear();
    acc.resize(group * d, 0.0);
    tmp.resize(d, f16::ZERO);
    max.clear();
    max.resize(group, f32::NEG_INFINITY);
    sum.clear();
    sum.resize(group, 0.0);
    let np = d & !63;
    for b in 0..ctx.div_ceil(bs) {
        let base = kv.base(b);
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
    for ((o, a), s) in out
        .chunks_exact_mut(d)
        .zip(acc.chunks_exact(d))
        .zip(sum.iter())
    {
        let inv = if *s == 0.0 { 0.0 } else { 1.0 / s };
        for (o, a) in o.iter_mut().zip(a) {
            *o = a * inv;
        }
    }
}

simd_dispatch!(
    fn attend_kv_head_dispatch(q: &[f32], kv: &KvHead<'_>, ctx: usize, scale: f32, out: &mut [f32], scratch: &mut AttnScratch) => attend_kv_head_body
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
    use crate::kernels::host::WeightBytes;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// [`linear`] (VNNI tiles of 4 × 4, 4 × 1, 1 × 4 and 1 × 1 where the CPU has them, over
    /// two parts) gives the portable dot products' bits.
    #[test]
    fn linear_tiles_match_the_portable_dots() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (k, m) = (256, 5);
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0)).collect();
        let parts: Vec<HostTensor> = [(WeightDType::Q4_1, 6), (WeightDType::Q8_0, 5)]
            .into_iter()
            .map(|(dtype, rows)| {
                let w: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-1.0..1.0)).collect();
                HostTensor {
                    dtype,
                    rows,
                    cols: k,
                    bytes: WeightBytes::Owned(std::sync::Arc::new(quantize_weights(dtype, &w))),
                }
            })
            .collect();
        let mut out = vec![0.0f32; m * 11];
        let mut acts = GgmlActs::default();
        linear(&ThreadPool::new(2), &x, m, &parts, &mut out, &mut acts);
        let (nb, mut col) = (k / QK, 0);
        for p in &parts {
            for c in 0..p.rows {
                for r in 0..m {
                    let (qs, d, s) = (
                        &acts.qs[r * k..][..k],
                        &acts.d[r * nb..][..nb],
                        &acts.s[r * nb..][..nb],
                    );
                    let want = match p.dtype {
                        WeightDType::Q4_1 => dot_q4_1(p.row(c), qs, d, s),
                        _ => dot_q8_0(p.row(c), qs, d),
                    };
                    let got = out[r * 11 + col + c];
                    assert_eq!(got.to_bits(), want.to_bits(), "{:?} ({r}, {c})", p.dtype);
                }
            }
            col += p.rows;
        }
    }

    /// Activations as ggml's Q8_1: scale and block sum rounded to f16, quants by 127/max.
    #[test]
    fn activations_quantize_as_q8_1() {
        let mut x: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) * 0.37).collect();
        x[3] = -6.0;
        let mut acts = GgmlActs::default();
        acts.quantize(&ThreadPool::new(1), &x, 1, 32);
        assert_eq!(acts.qs[3], -127);
        assert_eq!(acts.d[0], f16::from_f32(6.0 / 127.0).to_f32());
        let sum: i32 = acts.qs.iter().map(|&q| q as i32).sum();
        assert_eq!(acts.s[0], f16::from_f32(6.0 / 127.0 * sum as f32).to_f32());
    }

    #[test]
    fn hsum8_tree() {
        assert_eq!(hsum8([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]), 36.0);
        // (a4 + a0) + (a6 + a2) first: 1e8 cancels before the small terms are lost.
        let a = [1e8, 1.0, 0.0, 1.0, -1e8, 1.0, 0.5, 1.0];
        assert_eq!(hsum8(a), 4.5);
    }
}
