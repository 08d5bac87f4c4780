//! [`linear_packed`]: the entry point over a [`PackedLinear`]. Packed parts run the
//! column-interleaved kernels (AVX-512: [`super::packed_avx512`] or AMX; AVX2:
//! [`super::packed_avx2`]) and packed floats the FMA kernel ([`super::packed_float_avx2`]);
//! other parts (K-quants, Q5, IQ4_NL, or any part on the portable path) run the raw-block
//! kernels of [`super::linear`], each writing its own columns of the same output.

use super::packed::{self, PackedLinear, Repacked};
use super::packed_amx;
use super::packed_avx2;
use super::packed_avx512::{self, PackedChunk};
use super::packed_float_avx2::{self, FloatChunk};
use super::{raw_chunk, Chunk, KernelPath, MatmulScratch, OutView, Task};
use crate::kernels::cpu::pool::{SyncPtr, ThreadPool};

/// [`super::linear`] over prepared weights: packed parts run the packed kernels ([`packed`]),
/// the others the kernels of [`super::linear`]. Same shapes and output as [`super::linear`].
///
/// # Panics
/// On inconsistent shapes (`x` not `[m, w.cols()]`, `out` not `[m, w.rows()]`).
pub fn linear_packed(
    pool: &ThreadPool,
    x: &[f32],
    m: usize,
    w: &PackedLinear,
    out: &mut [f32],
    scratch: &mut MatmulScratch,
) {
    linear_packed_with(KernelPath::selected(), pool, x, m, w, out, scratch);
}

/// [`linear_packed`] on an explicit code path; packed copies are used on
/// [`KernelPath::Avx512`] and [`KernelPath::Avx2`] (the same bits), the portable path reads
/// the parts as loaded.
///
/// # Panics
/// As [`linear_packed`], and when `path` is not supported by this CPU.
pub fn linear_packed_with(
    path: KernelPath,
    pool: &ThreadPool,
    x: &[f32],
    m: usize,
    w: &PackedLinear,
    out: &mut [f32],
    scratch: &mut MatmulScratch,
) {
    assert!(
        path.is_supported(),
        "kernel path {path:?} is not supported by this CPU"
    );
    let (k, n) = (w.cols(), w.rows());
    assert_eq!(x.len(), m * k, "linear: x is not [m, k]");
    assert_eq!(out.len(), m * n, "linear: out is not [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    fn used(path: KernelPath, p: &packed::PackedPart) -> Option<&Repacked> {
        p.packed.as_ref().filter(|_| path.repacks())
    }
    let packed = |p| used(path, p);
    let mut need = (false, false, false);
    for p in &w.parts {
        match (packed(p), p.raw.dtype) {
            (Some(Repacked::Blocks(_)), _) => need.0 = true,
            (Some(Repacked::Floats(_)), _) => {}
            (None, d) if d.takes_q8_blocks() => need.1 = true,
            (None, d) if d.is_k_quant() => need.2 = true,
            _ => {}
        }
    }
    if need.0 {
        scratch.packed.quantize(pool, x, m, k);
    }
    if need.1 {
        scratch.q8.quantize(path, pool, x, m, k);
    }
    if need.2 {
        scratch.q8k.quantize(pool, x, m, k);
    }
    plan_packed_tasks(&mut scratch.tasks, w, n, m, pool.num_threads());
    let ptr = SyncPtr::new(out);
    let (tasks, q8, q8k, pa) = (&scratch.tasks, &scratch.q8, &scratch.q8k, &scratch.packed);
    let no_amx = scratch.no_amx;
    pool.run(tasks.len(), |t| {
        let task = tasks[t];
        let part = &w.parts[task.part];
        let out = OutView {
            ptr,
            stride: n,
            col: task.out_col,
        };
        if let Some(Repacked::Floats(floats)) = packed(part) {
            let chunk = FloatChunk {
                w: floats,
                g0: task.c0 / packed::GROUP,
                g1: task.c1.div_ceil(packed::GROUP),
                m,
                x,
                out,
            };
            packed_float_avx2::float_chunk(&chunk);
        } else if let Some(Repacked::Blocks(pw)) = packed(part) {
            let chunk = PackedChunk {
                w: pw,
                g0: task.c0 / packed::GROUP,
                g1: task.c1.div_ceil(packed::GROUP),
                m,
                out,
            };
            if path == KernelPath::Avx2 {
                packed_avx2::packed_chunk(&chunk, pa);
            } else if !no_amx && packed_amx::runs_on_amx(pw, m) {
                packed_amx::packed_chunk(&chunk, pa);
            } else {
                packed_avx512::packed_chunk(&chunk, pa);
            }
        } else {
            let chunk = Chunk {
                w: &part.raw,
                c0: task.c0,
                c1: task.c1,
                m,
                out,
            };
            raw_chunk(path, &chunk, q8, q8k, x, k);
        }
    });
}

/// Cuts every part of a prepared linear into chunks of whole groups of output columns
/// (chunk starts are multiples of [`packed::GROUP`] within the part). At m = 1 a chunk is a
/// weight stream whose first bytes come unprefetched, so chunks are few: two per thread (one
/// per part for a single thread). Otherwise each chunk is a `1 / (2 · threads)` share of the
/// columns not yet planned, at least one group: the job starts on large chunks and ends on
/// one-group ones, so the threads finish together (2–4% faster 16-row decode steps than
/// even chunks of 1/8 per thread, whose last one left the other thread waiting).
fn plan_packed_tasks(tasks: &mut Vec<Task>, w: &PackedLinear, n: usize, m: usize, threads: usize) {
    let mut left = n;
    let chunk_cols = |left: usize| match (m, threads) {
        (1, 0 | 1) => n,
        (1, t) => n.div_ceil(t * 2).next_multiple_of(packed::GROUP),
        (_, t) => (left / (2 * t))
            .next_multiple_of(packed::GROUP)
            .max(packed::GROUP),
    };
    tasks.clear();
    let mut out_col = 0;
    for (part, p) in w.parts.iter().enumerate() {
        let rows = p.raw.rows;
        let mut c0 = 0;
        while c0 < rows {
            let c1 = (c0 + chunk_cols(left)).min(rows);
            tasks.push(Task {
                part,
                c0,
                c1,
                out_col: out_col + c0,
            });
            left -= c1 - c0;
            c0 = c1;
        }
        out_col += rows;
    }
}
