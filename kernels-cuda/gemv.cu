// Quantized matmuls: a dequantizing GEMV for decode-sized batches, and a dequantize kernel
// for prefill (its f16 output feeds a cuBLAS GEMM).
//
// GEMV: `y[r, n_offset + n] = sum_k x[r, k] * W[n, k]` for `r < m <= GEMV_MAX_ROWS`, W one
// GGML row per output feature. One warp per output feature; lane `l` takes the row's 32-value
// items `l, l + 32, ...`, so a warp reads consecutive blocks of its row (coalesced), and each
// weight is decoded once for all `m` activation rows. Partial sums meet in a warp reduction.
#include "quant.cuh"

#define GEMV_MAX_ROWS 8
#define GEMV_WARPS 4

template <typename Q>
__device__ void gemv(const u8* __restrict__ w, const float* __restrict__ x,
                     float* __restrict__ y, int m, int n, int k, int ldy, int n_offset,
                     u64 row_bytes) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int out = blockIdx.x * GEMV_WARPS + warp;
    if (out >= n) return;
    const u8* row = w + (size_t)out * row_bytes;
    float acc[GEMV_MAX_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; r++) acc[r] = 0.0f;
    const int items = k / 32;
    for (int item = lane; item < items; item += 32) {
        float wv[32];
        Q::dequant32(row, item, wv);
#pragma unroll
        for (int r = 0; r < GEMV_MAX_ROWS; r++) {
            if (r < m) {
                const float4* xr = (const float4*)(x + (size_t)r * k + (size_t)item * 32);
                float s = 0.0f;
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    const float4 v = xr[j];
                    s += wv[4 * j] * v.x + wv[4 * j + 1] * v.y + wv[4 * j + 2] * v.z +
                         wv[4 * j + 3] * v.w;
                }
                acc[r] += s;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; r++) {
        if (r < m) {
            const float s = warp_sum(acc[r]);
            if (lane == 0) y[(size_t)r * ldy + n_offset + out] = s;
        }
    }
}

// Writes W as 16-bit floats, `[n, k]` row-major: one thread per 32-value item.
template <typename Q, typename T>
__device__ void dequantize(const u8* __restrict__ w, u16* __restrict__ out, int n, int k,
                           u64 row_bytes) {
    const size_t items = (size_t)n * (k / 32);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < items;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / (k / 32);
        const int item = (int)(i % (k / 32));
        float wv[32];
        Q::dequant32(w + r * row_bytes, item, wv);
        uint4* dst = (uint4*)(out + r * k + (size_t)item * 32);
#pragma unroll
        for (int j = 0; j < 4; j++) dst[j] = pack8<T>(wv + 8 * j);
    }
}

#define GEMV(name, Q)                                                                         \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                             \
        name(const u8* w, const float* x, float* y, int m, int n, int k, int ldy,             \
             int n_offset, u64 row_bytes) {                                                   \
        gemv<Q>(w, x, y, m, n, k, ldy, n_offset, row_bytes);                                  \
    }
#define DEQUANT(name, Q, T)                                                                   \
    extern "C" __global__ void name(const u8* w, u16* out, int n, int k, u64 row_bytes) {     \
        dequantize<Q, T>(w, out, n, k, row_bytes);                                            \
    }

GEMV(gemv_q8_0, Q8_0)
GEMV(gemv_q4_0, Q4_0)
GEMV(gemv_q4_1, Q4_1)
GEMV(gemv_q4_k, Q4_K)
GEMV(gemv_q6_k, Q6_K)
DEQUANT(dequantize_q8_0_f16, Q8_0, F16)
DEQUANT(dequantize_q4_0_f16, Q4_0, F16)
DEQUANT(dequantize_q4_1_f16, Q4_1, F16)
DEQUANT(dequantize_q4_k_f16, Q4_K, F16)
DEQUANT(dequantize_q6_k_f16, Q6_K, F16)
