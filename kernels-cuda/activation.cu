// Element-wise ops on f32 activations: SiLU·mul of a fused gate/up, bias add, row gather, and
// the casts to 16-bit types that feed cuBLAS.
#include "common.cuh"

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i]
extern "C" __global__ void silu_mul_f32(const float* __restrict__ gate_up, int rows, int inter,
                                        float* __restrict__ out) {
    size_t n = (size_t)rows * inter;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / inter, c = i % inter;
        const float* row = gate_up + r * 2 * inter;
        out[i] = silu(row[c]) * row[inter + c];
    }
}

// x[r, c] += bias[c]
extern "C" __global__ void add_bias_f32(float* __restrict__ x, const float* __restrict__ bias,
                                        int rows, int cols) {
    size_t n = (size_t)rows * cols;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        x[i] += bias[i % cols];
    }
}

// out[i, :] = x[rows[i], :]; one block per output row.
extern "C" __global__ void gather_rows_f32(const float* __restrict__ x,
                                           const u32* __restrict__ rows, int cols,
                                           float* __restrict__ out) {
    const float* src = x + (size_t)rows[blockIdx.x] * cols;
    float* dst = out + (size_t)blockIdx.x * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) dst[i] = src[i];
}

template <typename T>
__device__ __forceinline__ void cast_from_f32(const float* __restrict__ x, size_t n,
                                              u16* __restrict__ out) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        out[i] = T::from_f32(x[i]);
    }
}

extern "C" __global__ void cast_f32_to_f16(const float* __restrict__ x, u64 n,
                                           u16* __restrict__ out) {
    cast_from_f32<F16>(x, (size_t)n, out);
}

extern "C" __global__ void cast_f32_to_bf16(const float* __restrict__ x, u64 n,
                                            u16* __restrict__ out) {
    cast_from_f32<BF16>(x, (size_t)n, out);
}
