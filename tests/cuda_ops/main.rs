//! Every `Backend` op of `CudaBackend` against the CPU backend (or an exact host reference) on
//! the same seeded inputs, GPU sampling against its host reference, and the forward pass end
//! to end on dummy weights at the default model's shape.
//!
//! Each test opens its own GPU. Where the machine has no CUDA driver or no device it prints
//! "skipped: no GPU (which of the two)" and passes, so the binary runs anywhere (CI runs it)
//! and can be carried to a GPU machine: `cargo test --release --test cuda_ops --no-run`. On a machine with a device, every other failure to open it (cuBLAS or NVRTC
//! missing, a kernel that does not compile or load, the step arena out of memory) fails the
//! test; `scripts/bench_gpu.sh test` also fails on any "skipped" line when a card is present. Tolerances are stated
//! beside each comparison, with the reason for their size.
#![cfg(feature = "cuda")]

mod attention;
mod e2e;
mod graphs;
mod ops;
mod sampling;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sluice::kernels::cpu::{CpuBackend, CpuTensor};
use sluice::kernels::cuda::{CudaBackend, CudaError, CudaOptions, CudaTensor, KvDType};
use sluice::kernels::Backend;

/// The GPU backend (decode graphs on, the default), or `None` after printing why no GPU can
/// be used here.
pub fn gpu(kv: KvDType) -> Option<CudaBackend> {
    gpu_with(CudaOptions::new(kv))
}

/// The GPU backend with graphs off: for tests that call the ops themselves (a padded decode
/// step would give them padded rows) and for eager references.
pub fn gpu_eager(kv: KvDType) -> Option<CudaBackend> {
    gpu_with(CudaOptions {
        cuda_graphs: false,
        ..CudaOptions::new(kv)
    })
}

pub fn gpu_with(options: CudaOptions) -> Option<CudaBackend> {
    match sluice::kernels::cuda::probe() {
        Err(CudaError::NoDriver) => {
            eprintln!("skipped: no GPU (no CUDA driver: libcuda.so.1 does not load)");
            return None;
        }
        Ok(0) => {
            eprintln!("skipped: no GPU (the CUDA driver finds no device)");
            return None;
        }
        Err(e) => panic!("the CUDA driver is present but failing: {e}"),
        Ok(_) => {}
    }
    match CudaBackend::with_options(0, options) {
        Ok(b) => Some(b),
        Err(e) => panic!("a GPU is present but the CUDA backend failed to open on it: {e}"),
    }
}

/// Opens the GPU, or returns from the test (passing) with the printed reason.
#[macro_export]
macro_rules! gpu_or_skip {
    ($kv:expr) => {
        match $crate::gpu($kv) {
            Some(b) => b,
            None => return,
        }
    };
}

pub fn cpu() -> CpuBackend {
    CpuBackend::new(std::thread::available_parallelism().map_or(4, |n| n.get().min(16)))
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn uniform(rng: &mut ChaCha8Rng, len: usize, scale: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-scale..scale)).collect()
}

pub fn cpu_tensor(rows: usize, cols: usize, values: &[f32]) -> CpuTensor {
    CpuTensor {
        data: values.to_vec(),
        rows,
        cols,
    }
}

pub fn gpu_tensor(g: &CudaBackend, rows: usize, cols: usize, values: &[f32]) -> CudaTensor {
    g.upload_tensor(rows, cols, values)
        .unwrap_or_else(|e| panic!("uploading [{rows}, {cols}]: {e}"))
}

/// Both tensors' values on the host, after checking their shapes agree.
pub fn host_pair(
    g: &CudaBackend,
    gt: &CudaTensor,
    c: &CpuBackend,
    ct: &CpuTensor,
) -> (Vec<f32>, Vec<f32>) {
    assert_eq!((gt.rows, gt.cols), (ct.rows, ct.cols), "shapes differ");
    (g.to_host(gt), c.to_host(ct))
}

/// Asserts `|got - want| <= atol + rtol * |want|` elementwise, naming the worst element.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst = (0usize, 0.0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let excess = match (g.is_nan(), w.is_nan()) {
            (true, true) => 0.0,
            (false, false) => (g - w).abs() - (atol + rtol * w.abs()),
            _ => f32::INFINITY,
        };
        if excess > worst.1 || (excess.is_nan() && worst.1.is_finite()) {
            worst = (
                i,
                if excess.is_nan() {
                    f32::INFINITY
                } else {
                    excess
                },
            );
        }
    }
    let i = worst.0;
    assert!(
        worst.1 <= 0.0,
        "{what}: element {i} is {} vs {} (atol {atol}, rtol {rtol})",
        got[i],
        want[i]
    );
}
