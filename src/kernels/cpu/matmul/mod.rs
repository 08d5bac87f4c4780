//! Matmuls of linear layers on the CPU: `out[r, :] = x[r, :] · Wᵀ`, with W stored as raw GGML
//! blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, Q3_K, Q4_K, Q5_K, Q6_K) or floats (F32, F16, BF16).
//!
//! How a call runs:
//! 1. Activations are quantized once per call per family the parts need ([`quantize`]):
//!    8-bit blocks of 32 for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, of 256 for the K-quants; float weights
//!    use `x`.
//!    The K-quants run `avx2_k` on AVX2 and AVX-512 CPUs alike.
//! 2. Output columns (weight rows) are cut into chunks, several per thread, each a multiple of
//!    16 columns so that threads share as few output cache lines as possible; a chunk computes
//!    its columns for all `m` rows, reading each weight block once per tile of rows.
//! 3. Per element the kernel sums integer dot products per block exactly and accumulates one
//!    f32 contribution per block in block order, then reduces its lanes with a fixed tree.
//!
//! **Batch invariance:** `out[r, j]` depends only on `x[r, :]` and weight row `j`: the
//! floating-point operation order per element is fixed by the code path and `k`, never by `m`,
//! the tile shape, the chunking or the thread. (Different code paths give different bits.)
//!
//! The code path (AVX-512 VNNI, AVX2, portable) is picked once per process from the CPU's
//! features; `SLUICE_CPU_KERNEL=portable|avx2|avx512` forces one (if the CPU supports it).
//!
//! Three entry points:
//! * [`linear_packed`] over a [`PackedLinear`], built once at load: on the AVX-512 and AVX2
//!   paths its Q4_0/Q4_1/Q8_0 parts are repacked 16 columns at a time ([`packed`]) and run
//!   the column-interleaved kernels ([`packed_avx512`], [`packed_avx2`]; the two give the same
//!   bits), and its float parts likewise ([`packed_float`], [`packed_float_avx2`]), which the
//!   CPU backend uses. Other parts, and the portable path, run the raw-block kernels below.
//!   `SLUICE_CPU_REPACK=0` turns repacking off.
//! * [`linear`] over raw [`HostTensor`]s (tests, benches, the baseline).
//! * [`ggml_dots::linear`] over Q4_1/Q8_0 [`HostTensor`]s, for `--cpu-numerics ggml`: ggml's
//!   own dot products, bit for bit, with their activation quantization.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_k;
#[cfg(target_arch = "x86_64")]
mod avx512;
/// Off x86 the SIMD paths are never supported (`linear_with` asserts so); these keep the
/// dispatch total.
#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    pub(super) fn q8_chunk(c: &super::Chunk, acts: &super::Q8Acts) {
        super::portable_q8_chunk(c, acts)
    }
    pub(super) fn float_chunk(c: &super::Chunk, x: &[f32], k: usize) {
        super::portable_float_chunk(c, x, k)
    }
}
#[cfg(not(target_arch = "x86_64"))]
mod avx2_k {
    pub(super) fn q8k_chunk(c: &super::Chunk, acts: &super::quantize::Q8KActs) {
        super::portable_q8k_chunk(c, acts)
    }
}
#[cfg(not(target_arch = "x86_64"))]
use avx2 as avx512;
pub mod ggml_dots;
#[cfg(target_arch = "x86_64")]
mod ggml_tiles;
mod packed;
mod packed_acts;
#[cfg(target_arch = "x86_64")]
mod packed_amx;
#[cfg(target_arch = "x86_64")]
mod packed_avx2;
#[cfg(target_arch = "x86_64")]
mod packed_avx512;
mod packed_float;
#[cfg(target_arch = "x86_64")]
mod packed_float_avx2;
mod packed_linear;
/// Off x86 nothing is ever packed ([`PackedLinear`] repacks only for the x86 SIMD paths).
#[cfg(not(target_arch = "x86_64"))]
mod packed_avx512 {
    pub(super) struct PackedChunk<'a> {
        pub(super) w: &'a super::packed::PackedWeights,
        pub(super) g0: usize,
        pub(super) g1: usize,
        pub(super) m: usize,
        pub(super) out: super::OutView,
    }
    pub(super) fn packed_chunk(_: &PackedChunk, _: &super::packed_acts::PackedActs) {
        unreachable!("packed weights exist only on x86-64")
    }
}
#[cfg(not(target_arch = "x86_64"))]
mod packed_amx {
    pub(super) fn available() -> bool {
        false
    }
    pub(super) fn runs_on_amx(_: &super::packed::PackedWeights, _: usize) -> bool {
        false
    }
    pub(super) use super::packed_avx512::packed_chunk;
}
#[cfg(not(target_arch = "x86_64"))]
use packed_amx as packed_avx2;
#[cfg(not(target_arch = "x86_64"))]
mod packed_float_avx2 {
    pub(super) struct FloatChunk<'a> {
        pub(super) w: &'a super::packed_float::PackedFloats,
        pub(super) g0: usize,
        pub(super) g1: usize,
        pub(super) m: usize,
        pub(super) x: &'a [f32],
        pub(super) out: super::OutView,
    }
    pub(super) fn float_chunk(_: &FloatChunk) {
        unreachable!("packed weights exist only on x86-64")
    }
}
#[cfg(test)]
mod packed_tests;
mod quantize;
pub mod quantize_weights;
mod reference;
#[cfg(test)]
mod tests;

use std::sync::OnceLock;

pub use packed::PackedLinear;
pub use packed_linear::{linear_packed, linear_packed_with};
pub use reference::dequantize_row;

use super::pool::{SyncPtr, ThreadPool};
use crate::kernels::dtype::WeightDType;
use crate::kernels::host::HostTensor;
use packed_acts::PackedActs;
use quantize::{Q8Acts, Q8KActs};

/// Which implementation of the kernels runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    /// AVX-512 F/BW/VL with VNNI and VBMI (`vpdpbusd` on 512-bit vectors).
    Avx512,
    /// AVX2 + FMA + F16C (`vpmaddubsw`).
    Avx2,
    /// Scalar Rust; runs everywhere.
    Portable,
}

impl KernelPath {
    /// Whether this CPU can run the path.
    pub fn is_supported(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => {
                Self::Avx2.is_supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512vbmi")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best path this CPU supports.
    pub fn detect() -> Self {
        [Self::Avx512, Self::Avx2]
            .into_iter()
            .find(|p| p.is_supported())
            .unwrap_or(Self::Portable)
    }

    /// Whether the path's kernels read Q4_0/Q4_1/Q8_0 weights repacked ([`PackedLinear`]).
    pub fn repacks(self) -> bool {
        matches!(self, Self::Avx512 | Self::Avx2)
    }

    /// The process-wide path: `SLUICE_CPU_KERNEL` if set to a supported path, else [`detect`].
    ///
    /// [`detect`]: Self::detect
    pub fn selected() -> Self {
        static SELECTED: OnceLock<KernelPath> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let forced = match std::env::var("SLUICE_CPU_KERNEL").as_deref() {
                Ok("portable") => Some(Self::Portable),
                Ok("avx2") => Some(Self::Avx2),
                Ok("avx512") => Some(Self::Avx512),
                _ => None,
            };
            forced
                .filter(|p| p.is_supported())
                .unwrap_or_else(Self::detect)
        })
    }
}

/// One chunk of output columns of one part.
#[derive(Clone, Copy, Debug)]
struct Task {
    part: usize,
    /// Weight rows `c0..c1` of the part.
    c0: usize,
    c1: usize,
    /// The output column of weight row `c0`.
    out_col: usize,
}

/// Reusable buffers (quantized activations, the task list); after warm-up a call allocates
/// nothing.
#[derive(Default)]
pub struct MatmulScratch {
    q8: Q8Acts,
    q8k: Q8KActs,
    packed: PackedActs,
    tasks: Vec<Task>,
    /// Runs the VNNI kernels even where AMX is available (tests compare the two).
    no_amx: bool,
}

impl MatmulScratch {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Where a kernel writes: element (r, j) of a chunk goes to `ptr[r·stride + col + j]`.
#[derive(Clone, Copy)]
pub(super) struct OutView {
    ptr: SyncPtr<f32>,
    stride: usize,
    col: usize,
}

impl OutView {
    /// # Safety
    /// `(r, j)` must be inside this task's chunk (no other task writes it) and inside `out`.
    #[inline(always)]
    pub(super) unsafe fn write(&self, r: usize, j: usize, v: f32) {
        *self.at(r, j) = v;
    }

    /// # Safety
    /// As [`write`](Self::write), for every element written through the pointer.
    #[inline(always)]
    pub(super) unsafe fn at(&self, r: usize, j: usize) -> *mut f32 {
        self.ptr.0.add(r * self.stride + self.col + j)
    }
}

/// Inputs of a chunk: a part's rows `c0..c1` against all `m` activation rows.
pub(super) struct Chunk<'a> {
    pub(super) w: &'a HostTensor,
    pub(super) c0: usize,
    pub(super) c1: usize,
    pub(super) m: usize,
    pub(super) out: OutView,
}

/// out[r, :] = x[r, :] · Wᵀ for a linear layer whose weight is the concatenation, along the
/// output dimension, of `parts` (e.g. Q, K and V, or gate and up, each possibly a different
/// dtype). x is [m, k] row-major f32, every part has `cols == k`; out is [m, n] row-major with
/// n = Σ part.rows, part i filling columns [Σ_{j<i} rows_j, +rows_i).
///
/// # Panics
/// On inconsistent shapes (a bug in the caller, which validates weights when loading them).
pub fn linear(
    pool: &ThreadPool,
    x: &[f32],
    m: usize,
    parts: &[&HostTensor],
    out: &mut [f32],
    scratch: &mut MatmulScratch,
) {
    linear_with(KernelPath::selected(), pool, x, m, parts, out, scratch);
}

/// [`linear`] on an explicit code path (tests and benches compare paths).
///
/// # Panics
/// As [`linear`], and when `path` is not supported by this CPU.
pub fn linear_with(
    path: KernelPath,
    pool: &ThreadPool,
    x: &[f32],
    m: usize,
    parts: &[&HostTensor],
    out: &mut [f32],
    scratch: &mut MatmulScratch,
) {
    assert!(
        path.is_supported(),
        "kernel path {path:?} is not supported by this CPU"
    );
    let k = parts.first().map_or(0, |p| p.cols);
    let n: usize = parts.iter().map(|p| p.rows).sum();
    assert!(
        parts.iter().all(|p| p.cols == k),
        "linear: parts disagree on k"
    );
    assert!(
        parts
            .iter()
            .all(|p| p.bytes.len() == p.rows * p.row_bytes() && p.cols % p.dtype.block_len() == 0),
        "linear: a part's bytes do not match its shape"
    );
    assert_eq!(x.len(), m * k, "linear: x is not [m, k]");
    assert_eq!(out.len(), m * n, "linear: out is not [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    let has = |f: fn(WeightDType) -> bool| parts.iter().any(|p| f(p.dtype));
    if has(WeightDType::takes_q8_blocks) {
        scratch.q8.quantize(path, pool, x, m, k);
    }
    if has(WeightDType::is_k_quant) {
        scratch.q8k.quantize(pool, x, m, k);
    }
    plan_tasks(&mut scratch.tasks, parts, n, m, pool.num_threads());
    let ptr = SyncPtr::new(out);
    let (tasks, q8, q8k) = (&scratch.tasks, &scratch.q8, &scratch.q8k);
    pool.run(tasks.len(), |t| {
        let task = tasks[t];
        let w = parts[task.part];
        let out = OutView {
            ptr,
            stride: n,
            col: task.out_col,
        };
        let chunk = Chunk {
            w,
            c0: task.c0,
            c1: task.c1,
            m,
            out,
        };
        raw_chunk(path, &chunk, q8, q8k, x, k);
    });
}

/// Runs one chunk of a part as loaded (raw GGML blocks or floats) on `path`.
fn raw_chunk(path: KernelPath, c: &Chunk, q8: &Q8Acts, q8k: &Q8KActs, x: &[f32], k: usize) {
    match c.w.dtype {
        WeightDType::Q4_0 | WeightDType::Q4_1 | WeightDType::Q8_0 => match path {
            KernelPath::Avx512 => avx512::q8_chunk(c, q8),
            KernelPath::Avx2 => avx2::q8_chunk(c, q8),
            KernelPath::Portable => portable_q8_chunk(c, q8),
        },
        // Every AVX-512 CPU runs AVX2; the activations' blocks are the same on both paths.
        WeightDType::Q5_0 | WeightDType::Q5_1 | WeightDType::IQ4NL => match path {
            KernelPath::Avx512 | KernelPath::Avx2 => avx2::q8_chunk(c, q8),
            KernelPath::Portable => portable_q8_chunk(c, q8),
        },
        WeightDType::Q3K | WeightDType::Q4K | WeightDType::Q5K | WeightDType::Q6K => match path {
            KernelPath::Avx512 | KernelPath::Avx2 => avx2_k::q8k_chunk(c, q8k),
            KernelPath::Portable => portable_q8k_chunk(c, q8k),
        },
        WeightDType::F32 | WeightDType::F16 | WeightDType::BF16 => match path {
            KernelPath::Avx512 => avx512::float_chunk(c, x, k),
            KernelPath::Avx2 => avx2::float_chunk(c, x, k),
            KernelPath::Portable => portable_float_chunk(c, x, k),
        },
    }
}

/// Cuts every part into chunks of output columns: a multiple of 16 columns (one cache line
/// of f32 outputs), about 8 chunks per thread in all so that uneven chunks balance.
fn plan_tasks(tasks: &mut Vec<Task>, parts: &[&HostTensor], n: usize, m: usize, threads: usize) {
    const LINE: usize = 16;
    let per_chunk = if threads <= 1 && m == 1 {
        n
    } else {
        n.div_ceil(threads * 8).next_multiple_of(LINE)
    };
    tasks.clear();
    let mut out_col = 0;
    for (part, p) in parts.iter().enumerate() {
        let mut c0 = 0;
        while c0 < p.rows {
            // Align chunk ends to output cache lines, not to the part's own start.
            let end_col = (out_col + c0 + per_chunk) / LINE * LINE;
            let c1 = end_col.saturating_sub(out_col).clamp(c0 + 1, p.rows);
            tasks.push(Task {
                part,
                c0,
                c1,
                out_col: out_col + c0,
            });
            c0 = c1;
        }
        out_col += p.rows;
    }
}

fn portable_q8_chunk(c: &Chunk, acts: &Q8Acts) {
    for j in c.c0..c.c1 {
        let w = c.w.row(j);
        for r in 0..c.m {
            let v = reference::dot_q8(c.w.dtype, w, acts, r);
            // SAFETY: (r, j − c0) is in this task's chunk.
            unsafe { c.out.write(r, j - c.c0, v) };
        }
    }
}

fn portable_q8k_chunk(c: &Chunk, acts: &Q8KActs) {
    for j in c.c0..c.c1 {
        let w = c.w.row(j);
        for r in 0..c.m {
            let v = reference::dot_q8k(c.w.dtype, w, acts, r);
            // SAFETY: (r, j − c0) is in this task's chunk.
            unsafe { c.out.write(r, j - c.c0, v) };
        }
    }
}

fn portable_float_chunk(c: &Chunk, x: &[f32], k: usize) {
    for j in c.c0..c.c1 {
        let w = c.w.row(j);
        for r in 0..c.m {
            let v = reference::dot_float(c.w.dtype, w, &x[r * k..(r + 1) * k]);
            // SAFETY: (r, j − c0) is in this task's chunk.
            unsafe { c.out.write(r, j - c.c0, v) };
        }
    }
}
