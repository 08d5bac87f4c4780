// Quantized matmuls: a dequantizing GEMV for decode-sized batches, and a dequantize kernel
// for prefill (its f16 output feeds a cuBLAS GEMM).
//
// GEMV: `y[r, n_offset + n] = sum_k x[r, k] * W[n, k]` for `r < m <= GEMV_MAX_ROWS`, W one
// GGML row per output feature. Two kernels:
//
// * `gemv16_*` (Q8_0, Q4_0, Q4_1, Q4_K; `row_bytes` is the device row stride, padded by the
//   host to a multiple of 16 bytes, so the last vector of a row may hold padding): decode is
//   a pure stream of weights, so the kernel is built around 16-byte loads and bytes in flight.
//   A warp owns `GEMV16_ROWS` output features. It walks its rows in chunks of 32 items (1,024
//   values, `Q::CHUNK_BYTES`, a multiple of 16): each lane loads 16-byte vectors of every
//   row's chunk (coalesced: the warp reads one contiguous run per row), parks them in its
//   warp's shared-memory stage, and issues the next chunk's loads before decoding this one
//   (register prefetch), so about 1-2 KiB per warp stay in flight. Lane `l` then decodes item
//   `l` of each row from shared memory and multiplies it with the activations' 32 values,
//   loaded once per activation row and used for every row of the warp (activations are small
//   and stay in L1/L2). Partial sums meet in a warp reduction.
// * `gemv_*` (every block type): one warp per output feature, lane `l` takes items
//   `l, l + 32, ...` read straight from global memory: the fallback for Q6_K and odd rows.
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

#define GEMV16_WARPS 4
#define GEMV16_ROWS 2

template <typename Q>
__device__ void gemv16(const u8* __restrict__ w, const float* __restrict__ x,
                       float* __restrict__ y, int m, int n, int k, int ldy, int n_offset,
                       u64 row_bytes) {
    constexpr int CB = Q::CHUNK_BYTES;
    constexpr int NV = (CB / 16 + 31) / 32;  // 16-byte vectors per lane per row and chunk
    __shared__ uint4 stage[GEMV16_WARPS][GEMV16_ROWS][NV * 32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row0 = (blockIdx.x * GEMV16_WARPS + warp) * GEMV16_ROWS;
    if (row0 >= n) return;  // whole warps leave; only __syncwarp is used below
    const int items = k / 32;
    const int chunks = (items + 31) / 32;
    float acc[GEMV16_ROWS][GEMV_MAX_ROWS];
#pragma unroll
    for (int rr = 0; rr < GEMV16_ROWS; rr++)
#pragma unroll
        for (int r = 0; r < GEMV_MAX_ROWS; r++) acc[rr][r] = 0.0f;

    uint4 pre[GEMV16_ROWS][NV];
    // Loads chunk `c` of the warp's rows into `pre` (vectors past the row's end are skipped).
#define GEMV16_LOAD(c)                                                                        \
    {                                                                                         \
        const u64 at = (u64)(c) * CB;                                                         \
        const int nvec = (int)(min((u64)CB, row_bytes - at) / 16);                            \
        _Pragma("unroll") for (int rr = 0; rr < GEMV16_ROWS; rr++) {                          \
            const int row = min(row0 + rr, n - 1);                                            \
            const uint4* src = (const uint4*)(w + (size_t)row * row_bytes + at);              \
            _Pragma("unroll") for (int j = 0; j < NV; j++) {                                  \
                const int v = lane + 32 * j;                                                  \
                if (v < nvec) pre[rr][j] = src[v];                                            \
            }                                                                                 \
        }                                                                                     \
    }
    GEMV16_LOAD(0)
    for (int c = 0; c < chunks; c++) {
#pragma unroll
        for (int rr = 0; rr < GEMV16_ROWS; rr++)
#pragma unroll
            for (int j = 0; j < NV; j++) stage[warp][rr][lane + 32 * j] = pre[rr][j];
        __syncwarp();
        if (c + 1 < chunks) GEMV16_LOAD(c + 1)
        const int item = c * 32 + lane;
        if (item < items) {
            float wv[GEMV16_ROWS][32];
#pragma unroll
            for (int rr = 0; rr < GEMV16_ROWS; rr++)
                Q::dequant32((const u8*)stage[warp][rr], lane, wv[rr]);
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; r++) {
                if (r < m) {
                    const float4* xr = (const float4*)(x + (size_t)r * k + (size_t)item * 32);
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        const float4 v = xr[j];
#pragma unroll
                        for (int rr = 0; rr < GEMV16_ROWS; rr++)
                            acc[rr][r] += wv[rr][4 * j] * v.x + wv[rr][4 * j + 1] * v.y +
                                          wv[rr][4 * j + 2] * v.z + wv[rr][4 * j + 3] * v.w;
                    }
                }
            }
        }
        __syncwarp();  // the stage is rewritten next round
    }
#undef GEMV16_LOAD
#pragma unroll
    for (int rr = 0; rr < GEMV16_ROWS; rr++) {
        const int out = row0 + rr;
#pragma unroll
        for (int r = 0; r < GEMV_MAX_ROWS; r++) {
            if (r < m) {
                const float s = warp_sum(acc[rr][r]);
                if (lane == 0 && out < n) y[(size_t)r * ldy + n_offset + out] = s;
            }
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
#define GEMV16(name, Q)                                                                       \
    extern "C" __global__ void __launch_bounds__(GEMV16_WARPS * 32)                           \
        name(const u8* w, const float* x, float* y, int m, int n, int k, int ldy,             \
             int n_offset, u64 row_bytes) {                                                   \
        gemv16<Q>(w, x, y, m, n, k, ldy, n_offset, row_bytes);                                \
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
GEMV16(gemv16_q8_0, Q8_0)
GEMV16(gemv16_q4_0, Q4_0)
GEMV16(gemv16_q4_1, Q4_1)
GEMV16(gemv16_q4_k, Q4_K)
DEQUANT(dequantize_q8_0_f16, Q8_0, F16)
DEQUANT(dequantize_q4_0_f16, Q4_0, F16)
DEQUANT(dequantize_q4_1_f16, Q4_1, F16)
DEQUANT(dequantize_q4_k_f16, Q4_K, F16)
DEQUANT(dequantize_q6_k_f16, Q6_K, F16)
