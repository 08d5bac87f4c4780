// Shared helpers of sluice's kernels. NVRTC compiles these with no host or CUDA headers, so
// the fixed-width types and the f16/bf16 conversions are written here by hand (PTX cvt for
// f16, bit shifts for bf16). The Rust side inlines `#include "x.cuh"` before compiling.
#pragma once

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu
#define NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float(((u32)h) << 16);
}

// Round to nearest even, NaN kept quiet (what `half::bf16::from_f32` does).
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

// The 16-bit storage types, as traits: kernels are templates over these and the entry
// points are named `<op>_f16` / `<op>_bf16`.
struct F16 {
    static __device__ __forceinline__ float to_f32(u16 h) { return f16_to_f32(h); }
    static __device__ __forceinline__ u16 from_f32(float f) { return f32_to_f16(f); }
};
struct BF16 {
    static __device__ __forceinline__ float to_f32(u16 h) { return bf16_to_f32(h); }
    static __device__ __forceinline__ u16 from_f32(float f) { return f32_to_bf16(f); }
};

// Eight 16-bit values from one 16-byte vector, as f32.
template <typename T>
__device__ __forceinline__ void unpack8(uint4 v, float* out) {
    u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = T::to_f32((u16)(w[i] & 0xffffu));
        out[2 * i + 1] = T::to_f32((u16)(w[i] >> 16));
    }
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float* in) {
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        w[i] = (u32)T::from_f32(in[2 * i]) | ((u32)T::from_f32(in[2 * i + 1]) << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds >= 32 floats and
// may be reused once this returns.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int num_warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < num_warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int num_warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < num_warps ? scratch[lane] : NEG_INF;
    return warp_max(v);
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }
