//! The matmul of `--cpu-numerics ggml`: the float operations of ggml's
//! `ggml_vec_dot_q4_1_q8_1` and `ggml_vec_dot_q8_0_q8_0` as llama.cpp's CPU build performs
//! them on an AVX-512 x86 machine (see `kernels/cpu/mod.rs`), for Q4_1 and Q8_0 weights.
//!
//! Activations are quantized per block of 32 with `d = max|x| / 127` stored as f16,
//! `q = round(x · 127 / max|x|)` and, for Q4_1, `s = f16(d · Σq)`. A block's integer dot is
//! kept as 8 partial sums of 4 products; each is accumulated in its own f32 lane as
//! `fma(dw · dx, sum, lane)`, the lanes are added with a fixed tree (`hsum_float_8`) and
//! Q4_1's min terms `Σ m · s` are summed apart and added last.
//!
//! `dot_q4_1` and `dot_q8_0` are the reference; the VNNI tiles (`ggml_vnni.rs`) give
//! their bits (tested). Each output depends only on its own row, so batch invariance holds.

use half::f16;

use crate::kernels::cpu::ops::simd_dispatch;
use crate::kernels::cpu::pool::{SyncPtr, ThreadPool};
use crate::kernels::dtype::WeightDType;
use crate::kernels::host::HostTensor;

#[cfg(target_arch = "x86_64")]
use super::ggml_tiles;
#[cfg(target_arch = "x86_64")]
use crate::kernels::cpu::ops::{simd_level, SimdLevel};

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
pub(super) fn hsum8(a: [f32; 8]) -> f32 {
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
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DotPath {
    /// AVX-512 VL + VNNI on 256-bit vectors, as llama.cpp's AVX2 code compiles there.
    Vnni,
    /// AVX2 + FMA + F16C, as llama.cpp's AVX2 code compiles without VNNI.
    Avx2,
    Portable,
}

/// Every path this CPU can run, fastest first.
fn dot_paths() -> Vec<DotPath> {
    let mut paths = Vec::new();
    #[cfg(target_arch = "x86_64")]
    if simd_level() != SimdLevel::Portable
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
        {
            paths.push(DotPath::Vnni);
        }
        paths.push(DotPath::Avx2);
    }
    paths.push(DotPath::Portable);
    paths
}

fn dot_path() -> DotPath {
    static PATH: std::sync::OnceLock<DotPath> = std::sync::OnceLock::new();
    *PATH.get_or_init(|| dot_paths()[0])
}

/// Computes columns `c0..c1` of one part for all `m` rows.
#[allow(clippy::too_many_arguments)]
fn columns(
    path: DotPath,
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
    match path {
        // SAFETY: the path is one of `dot_paths()`, chosen from this CPU's features.
        DotPath::Vnni => return unsafe { tiles::<true>(w, c0, c1, m, &row_of, &store) },
        DotPath::Avx2 => return unsafe { tiles::<false>(w, c0, c1, m, &row_of, &store) },
        DotPath::Portable => {}
    }
    for c in c0..c1 {
        for r in 0..m {
            let (qs, d, s) = row_of(r);
            store(r, c, &[dot(w.dtype, w.row(c), qs, d, s)]);
        }
    }
}

/// Columns `c0..c1` in tiles of 4 columns × 4 rows (1 at the edges): a weight block is
/// unpacked once for 4 rows, and 16 accumulator chains run side by side.
///
/// # Safety
/// AVX2, FMA and F16C, and with `VNNI` AVX-512 VL/VNNI; the weights are Q4_1 or Q8_0 and
/// every activation row holds their blocks.
#[cfg(target_arch = "x86_64")]
unsafe fn tiles<'a, const VNNI: bool>(
    w: &HostTensor,
    c0: usize,
    c1: usize,
    m: usize,
    row_of: &impl Fn(usize) -> (&'a [i8], &'a [f32], &'a [f32]),
    store: &impl Fn(usize, usize, &[f32]),
) {
    use ggml_tiles::tile;
    let (bytes, rb, dtype) = (&w.bytes[..], w.row_bytes(), w.dtype);
    let mut c = c0;
    while c < c1 {
        let n = if c + 4 <= c1 { 4 } else { 1 };
        let mut r = 0;
        while r < m {
            let rows = if r + 4 <= m { 4 } else { 1 };
            match (n, rows) {
                (4, 4) => tile::<4, 4, VNNI>(bytes, rb, dtype, c, r, row_of, store),
                (4, _) => tile::<4, 1, VNNI>(bytes, rb, dtype, c, r, row_of, store),
                (_, 4) => tile::<1, 4, VNNI>(bytes, rb, dtype, c, r, row_of, store),
                _ => tile::<1, 1, VNNI>(bytes, rb, dtype, c, r, row_of, store),
            }
            r += rows;
        }
        c += n;
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
    linear_with(dot_path(), pool, x, m, parts, out, acts)
}

fn linear_with(
    path: DotPath,
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
        columns(path, p, c0, c1, acts, m, &out, ld, col_off);
    });
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::matmul::quantize_weights::quantize_row as quantize_weights;
    use crate::kernels::host::WeightBytes;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// [`linear`] on every path this CPU has (VNNI and AVX2 tiles of 4 × 4, 4 × 1, 1 × 4 and
    /// 1 × 1, over two parts) gives the portable dot products' bits.
    #[test]
    fn linear_tiles_match_the_portable_dots() {
        for path in dot_paths() {
            tiles_match_the_portable_dots(path);
        }
    }

    fn tiles_match_the_portable_dots(path: DotPath) {
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
        linear_with(
            path,
            &ThreadPool::new(2),
            &x,
            m,
            &parts,
            &mut out,
            &mut acts,
        );
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
                    let at = format!("{path:?}, {:?} ({r}, {c})", p.dtype);
                    assert_eq!(got.to_bits(), want.to_bits(), "{at}");
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
