//! Quantized matmul (placeholder; see kernels helper).
