// RMSNorm, alone and fused with the residual add. One block per row, f32 activations read as
// float4 when the row allows it. `out = x / sqrt(mean(x^2) + eps) * w`.
#include "common.cuh"

__device__ __forceinline__ float row_sum_squares(const float* x, int cols, float* scratch) {
    float ss = 0.0f;
    if ((cols & 3) == 0) {
        const float4* x4 = (const float4*)x;
        for (int i = threadIdx.x; i < cols / 4; i += blockDim.x) {
            float4 v = x4[i];
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
        for (int i = threadIdx.x; i < cols; i += blockDim.x) ss += x[i] * x[i];
    }
    return block_sum(ss, scratch);
}

__device__ __forceinline__ void scale_row(const float* x, const float* w, float scale, int cols,
                                          float* out) {
    for (int i = threadIdx.x; i < cols; i += blockDim.x) out[i] = x[i] * scale * w[i];
}

extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                        float eps, int cols, float* __restrict__ out) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * cols;
    float ss = row_sum_squares(xr, cols, scratch);
    float scale = rsqrtf(ss / (float)cols + eps);
    scale_row(xr, w, scale, cols, out + (size_t)blockIdx.x * cols);
}

// residual += delta; out = rms_norm(residual) * w.
extern "C" __global__ void add_rms_norm_f32(float* __restrict__ residual,
                                            const float* __restrict__ delta,
                                            const float* __restrict__ w, float eps, int cols,
                                            float* __restrict__ out) {
    __shared__ float scratch[32];
    float* r = residual + (size_t)blockIdx.x * cols;
    const float* d = delta + (size_t)blockIdx.x * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) r[i] += d[i];
    // Each thread re-reads only what it wrote when cols % 4 != 0; the float4 path reads other
    // threads' writes, hence the barrier.
    __syncthreads();
    float ss = row_sum_squares(r, cols, scratch);
    float scale = rsqrtf(ss / (float)cols + eps);
    scale_row(r, w, scale, cols, out + (size_t)blockIdx.x * cols);
}
