//! Activation quantization: each `linear` call turns its f32 input rows into 8-bit blocks
//! once, and every weight block of every output column is then dotted against them with
//! integer arithmetic.
//!
//! * [`Q8Acts`] (for Q4_0, Q4_1, Q8_0 weights): blocks of 32 values with an f32 scale `d`
//!   (`x ≈ d·q`, `q ∈ [−127, 127]`) and `s = d·Σq` (llama.cpp's Q8_1 idea; `s` carries the
//!   Q4_1 min and the Q4_0 offset). For the AVX-512 kernel it also holds, per pair of blocks,
//!   the scales spread over the 16 lanes a 64-byte dot product produces (see `lanes`).
//! * [`Q8KActs`] (for the K-quants): blocks of 256 with an f32 scale and the sums of each run of
//!   16 quants (llama.cpp's Q8_K idea).
//!
//! A row's quantized form depends only on that row, so quantization never breaks batch
//! invariance. Buffers only grow: after warm-up quantizing allocates nothing.

use super::KernelPath;
use crate::kernels::cpu::pool::{SyncPtr, ThreadPool};

/// Values per AVX-512 step: two blocks of 32.
pub(super) const PAIR: usize = 64;
/// Values per K-quant super-block.
pub(super) const Q8K_BLOCK: usize = 256;
/// Rows below this are quantized on the calling thread (waking the pool costs more).
const PARALLEL_ROWS: usize = 16;

/// 8-bit activations in blocks of 32; see the module docs.
#[derive(Default)]
pub(super) struct Q8Acts {
    pub(super) m: usize,
    pub(super) k: usize,
    /// Pairs of blocks per row (the last one may hold one block and zeros).
    pub(super) npairs: usize,
    /// [m, npairs·64] quants, zero-padded.
    qs: Vec<i8>,
    /// [m, 2·npairs] scales `d` and `s = d·Σq`.
    d: Vec<f32>,
    s: Vec<f32>,
    /// AVX-512 only, [m, npairs, 16] each: `d` of the lane's block, and `−128·Σ` of the
    /// lane's 4 quants (cancels the +128 bias of Q8_0 weights fed to `vpdpbusd` unsigned).
    pub(super) dl: Vec<f32>,
    pub(super) corr: Vec<i32>,
}

impl Q8Acts {
    /// Quantizes `x` ([m, k] row-major) for the kernels of `path`.
    pub(super) fn quantize(
        &mut self,
        path: KernelPath,
        pool: &ThreadPool,
        x: &[f32],
        m: usize,
        k: usize,
    ) {
        debug_assert!(k.is_multiple_of(32) && x.len() == m * k);
        self.m = m;
        self.k = k;
        self.npairs = k.div_ceil(PAIR);
        let (rq, rs) = (self.npairs * PAIR, self.npairs * 2);
        grow(&mut self.qs, m * rq);
        grow(&mut self.d, m * rs);
        grow(&mut self.s, m * rs);
        let lanes = path == KernelPath::Avx512;
        if lanes {
            grow(&mut self.dl, m * self.npairs * 16);
            grow(&mut self.corr, m * self.npairs * 16);
        }
        let (qs, d, s) = (
            SyncPtr::new(&mut self.qs),
            SyncPtr::new(&mut self.d),
            SyncPtr::new(&mut self.s),
        );
        let (dl, corr) = (SyncPtr::new(&mut self.dl), SyncPtr::new(&mut self.corr));
        let npairs = self.npairs;
        let one_row = |r: usize| {
            // SAFETY: each row's ranges are disjoint from every other row's and in bounds
            // (grown above); rows are handed out once each.
            let (qs, d, s) = unsafe {
                (
                    qs.slice(r * rq, rq),
                    d.slice(r * rs, rs),
                    s.slice(r * rs, rs),
                )
            };
            quantize_row_q8(&x[r * k..(r + 1) * k], qs, d, s);
            if lanes {
                let n = npairs * 16;
                // SAFETY: as above.
                let (dl, corr) = unsafe { (dl.slice(r * n, n), corr.slice(r * n, n)) };
                spread_lanes(qs, d, dl, corr);
            }
        };
        run_rows(pool, m, one_row);
    }

    /// Row `r`'s quants (padded to whole pairs), scales and scaled sums.
    pub(super) fn row(&self, r: usize) -> (&[i8], &[f32], &[f32]) {
        let (rq, rs) = (self.npairs * PAIR, self.npairs * 2);
        (
            &self.qs[r * rq..(r + 1) * rq],
            &self.d[r * rs..(r + 1) * rs],
            &self.s[r * rs..(r + 1) * rs],
        )
    }
}

/// Quantizes one row into blocks of 32; pads the tail of `qs`, `d`, `s` with zeros.
fn quantize_row_q8(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    let nb = x.len() / 32;
    for b in 0..nb {
        let xb = &x[32 * b..32 * b + 32];
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let db = amax / 127.0;
        let id = if db != 0.0 { 1.0 / db } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qs[32 * b..32 * b + 32].iter_mut().zip(xb) {
            let qi = (v * id).round().clamp(-127.0, 127.0) as i32;
            sum += qi;
            *q = qi as i8;
        }
        d[b] = db;
        s[b] = db * sum as f32;
    }
    qs[32 * nb..].fill(0);
    d[nb..].fill(0.0);
    s[nb..].fill(0.0);
}

/// Fills the AVX-512 lane tables of one row (see [`Q8Acts`]).
fn spread_lanes(qs: &[i8], d: &[f32], dl: &mut [f32], corr: &mut [i32]) {
    for (lane, (dl, c)) in dl.iter_mut().zip(corr.iter_mut()).enumerate() {
        *dl = d[lane / 8];
        let q = &qs[4 * lane..4 * lane + 4];
        *c = -128 * q.iter().map(|&v| v as i32).sum::<i32>();
    }
}

/// 8-bit activations in super-blocks of 256; see the module docs.
#[derive(Default)]
pub(super) struct Q8KActs {
    pub(super) k: usize,
    /// [m, k] quants.
    qs: Vec<i8>,
    /// [m, k/256] scales.
    d: Vec<f32>,
    /// [m, k/256, 16] sums of each run of 16 quants.
    bsums: Vec<i32>,
}

impl Q8KActs {
    pub(super) fn quantize(&mut self, pool: &ThreadPool, x: &[f32], m: usize, k: usize) {
        debug_assert!(k.is_multiple_of(Q8K_BLOCK) && x.len() == m * k);
        self.k = k;
        let nb = k / Q8K_BLOCK;
        grow(&mut self.qs, m * k);
        grow(&mut self.d, m * nb);
        grow(&mut self.bsums, m * nb * 16);
        let (qs, d, bsums) = (
            SyncPtr::new(&mut self.qs),
            SyncPtr::new(&mut self.d),
            SyncPtr::new(&mut self.bsums),
        );
        run_rows(pool, m, |r| {
            // SAFETY: disjoint per-row ranges, in bounds (grown above), one task per row.
            let (qs, d, bsums) = unsafe {
                (
                    qs.slice(r * k, k),
                    d.slice(r * nb, nb),
                    bsums.slice(r * nb * 16, nb * 16),
                )
            };
            for b in 0..nb {
                let xb = &x[r * k + Q8K_BLOCK * b..][..Q8K_BLOCK];
                let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let db = amax / 127.0;
                let id = if db != 0.0 { 1.0 / db } else { 0.0 };
                let q = &mut qs[Q8K_BLOCK * b..][..Q8K_BLOCK];
                for (q, &v) in q.iter_mut().zip(xb) {
                    *q = (v * id).round().clamp(-127.0, 127.0) as i8;
                }
                for (j, bs) in bsums[16 * b..16 * b + 16].iter_mut().enumerate() {
                    *bs = q[16 * j..16 * j + 16].iter().map(|&v| v as i32).sum();
                }
                d[b] = db;
            }
        });
    }

    /// Row `r`'s quants, super-block scales and 16-value sums.
    pub(super) fn row(&self, r: usize) -> (&[i8], &[f32], &[i32]) {
        let nb = self.k / Q8K_BLOCK;
        (
            &self.qs[r * self.k..(r + 1) * self.k],
            &self.d[r * nb..(r + 1) * nb],
            &self.bsums[r * nb * 16..(r + 1) * nb * 16],
        )
    }
}

/// Runs `f` for each row, on the pool when there are enough rows to pay for waking it.
pub(super) fn run_rows<F: Fn(usize) + Sync>(pool: &ThreadPool, m: usize, f: F) {
    if m < PARALLEL_ROWS {
        (0..m).for_each(f);
    } else {
        const ROWS_PER_TASK: usize = 8;
        pool.run(m.div_ceil(ROWS_PER_TASK), |t| {
            (t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(m)).for_each(&f)
        });
    }
}

/// Grows `v` to at least `len` elements (never shrinks, so warm calls allocate nothing).
pub(super) fn grow<T: Default + Clone>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::default());
    }
}
