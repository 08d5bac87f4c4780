//! The CPU backend: SIMD quantized matmuls, paged attention and the small fused ops.
//!
//! Laid out by op family, each family holding its variants beside one another:
//! * `matmul/`: the quantized matmuls (repacked AVX-512/AMX, raw-block AVX-512/AVX2/portable,
//!   the reference dequantizer) and ggml's dot products (`ggml_dots.rs`, `ggml_tiles.rs`);
//! * `attention/`: the paged KV cache, the step's task split, the fast kernels, and ggml's
//!   two flash-attention kernels;
//! * `rows/`: RMSNorm, SiLU·mul and RoPE, and their ggml variants (`rows/ggml.rs`);
//! * `ops.rs`: the vector primitives they and the host sampler share; `pool.rs`: the thread
//!   pool; `backend.rs`: [`CpuBackend`], which picks each op's variant by [`CpuNumerics`].
//!
//! # The ggml numerics
//!
//! `--cpu-numerics ggml` runs every op's `ggml` variant, which performs the float operations,
//! in the order and at the precisions, that llama.cpp's CPU build performs on an AVX-512 x86
//! machine (ggml at the commit of `tests/fixtures/`), so that the same model file gives the
//! same logits, bit for bit, and greedy runs never part at near-ties. What that takes, op by
//! op (the ggml function each mirrors in brackets):
//! * **Matmul** (`ggml_vec_dot_q4_1_q8_1`, `ggml_vec_dot_q8_0_q8_0`; `matmul/ggml_dots.rs`):
//!   activations are quantized per block of 32 with `d = max|x| / 127` stored as f16,
//!   `q = round(x · 127 / max|x|)` and, for Q4_1, `s = f16(d · Σq)`. A block's integer dot is
//!   kept as 8 partial sums of 4 products; each is accumulated in its own f32 lane as
//!   `fma(dw · dx, sum, lane)`, the lanes are added with a fixed tree (`hsum_float_8`) and
//!   Q4_1's min terms `Σ m · s` are summed apart and added last.
//! * **RMSNorm** (`ggml_compute_forward_rms_norm_f32`; `rows/ggml.rs`): squares summed in f64.
//! * **SiLU** (`ggml_v_silu`; `rows/ggml.rs`): ggml's vector `exp` approximation, then
//!   `x / (1 + e)`.
//! * **RoPE** (`ggml_rope_cache_init`; `rows/ggml.rs`): angles by repeated multiplication
//!   with `base^(-2/d)`, `cosf`/`sinf` of them.
//! * **Attention** (`attention/ggml.rs`), with whichever of ggml's two kernels llama.cpp's
//!   server would run for the token: one query at a time (`..._f16_one_chunk`,
//!   `attention/ggml_one_query.rs`: f16 query against f16 keys, dot summed in a fixed tree,
//!   online softmax with `expf`, V accumulated in an f16 vector rounded after every key), or
//!   tiled for prompt tokens it batches 64 or more at a time (`..._tiled`,
//!   `attention/ggml_tiled.rs`: f32 query, a softmax per tile of 64 keys with the vector
//!   `exp`, V accumulated in f32).
//!
//! This is slower than the default numerics (no repacked weights, no AMX, f16 round trips in
//! attention), and less accurate in attention; it exists so that sluice can be held to
//! llama.cpp's outputs exactly. Each output still depends only on its own row and sequence,
//! so batch invariance holds here too.

pub mod attention;
pub mod backend;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod rows;

pub use backend::{CpuBackend, CpuNumerics, CpuTensor};
