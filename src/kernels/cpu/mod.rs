//! The CPU backend: SIMD quantized matmuls, paged attention and the small fused ops.

pub mod attention;
mod attention_kernels;
pub mod backend;
pub mod ggml_compat;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod rows;

pub use backend::{CpuBackend, CpuNumerics, CpuTensor};
