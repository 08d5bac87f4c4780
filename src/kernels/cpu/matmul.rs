//! Quantized matmul (placeholder; see kernels helper).
pub use super::naive::{dequantize_row, linear, MatmulScratch};
