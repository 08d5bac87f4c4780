//! The CPU backend: SIMD quantized matmuls, paged attention and the small fused ops.

pub mod matmul;
pub mod pool;
