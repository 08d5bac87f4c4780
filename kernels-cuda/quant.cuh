// GGML block formats, decoded 32 values at a time: the unit of work of the GEMV, the
// dequantize and the embedding kernels. "Item" `j` of a row is values `32 j .. 32 j + 32`.
// Byte layouts (see src/kernels/dtype.rs):
//   Q8_0 34 B / 32 values, Q4_0 18 B / 32, Q4_1 20 B / 32, Q4_K 144 B / 256, Q6_K 210 B / 256.
#pragma once
#include "common.cuh"

__device__ __forceinline__ float ld_f16(const u8* p) {
    return f16_to_f32((u16)p[0] | ((u16)p[1] << 8));
}

struct Q8_0 {
    // Bytes of 32 items (1,024 values): the GEMV's staging unit, a multiple of 16.
    static constexpr int CHUNK_BYTES = 1088;
    static __device__ __forceinline__ void dequant32(const u8* row, int item, float* w) {
        const u8* b = row + (size_t)item * 34;
        const float d = ld_f16(b);
#pragma unroll
        for (int j = 0; j < 32; j++) w[j] = d * (float)(i8)b[2 + j];
    }
};

struct Q4_0 {
    // Bytes of 32 items (1,024 values): the GEMV's staging unit, a multiple of 16.
    static constexpr int CHUNK_BYTES = 576;
    static __device__ __forceinline__ void dequant32(const u8* row, int item, float* w) {
        const u8* b = row + (size_t)item * 18;
        const float d = ld_f16(b);
#pragma unroll
        for (int j = 0; j < 16; j++) {
            const u8 q = b[2 + j];
            w[j] = d * ((float)(q & 0xF) - 8.0f);
            w[j + 16] = d * ((float)(q >> 4) - 8.0f);
        }
    }
};

struct Q4_1 {
    // Bytes of 32 items (1,024 values): the GEMV's staging unit, a multiple of 16.
    static constexpr int CHUNK_BYTES = 640;
    static __device__ __forceinline__ void dequant32(const u8* row, int item, float* w) {
        const u8* b = row + (size_t)item * 20;
        const float d = ld_f16(b), m = ld_f16(b + 2);
#pragma unroll
        for (int j = 0; j < 16; j++) {
            const u8 q = b[4 + j];
            w[j] = d * (float)(q & 0xF) + m;
            w[j + 16] = d * (float)(q >> 4) + m;
        }
    }
};

struct Q4_K {
    // Bytes of 32 items (1,024 values): the GEMV's staging unit, a multiple of 16.
    static constexpr int CHUNK_BYTES = 576;
    static __device__ __forceinline__ void dequant32(const u8* row, int item, float* w) {
        const u8* b = row + (size_t)(item / 8) * 144;
        const int i = item % 8;
        const float d = ld_f16(b), dmin = ld_f16(b + 2);
        const u8* s = b + 4;
        int sc, m;
        if (i < 4) {
            sc = s[i] & 63;
            m = s[i + 4] & 63;
        } else {
            sc = (s[i + 4] & 0xF) | ((s[i - 4] >> 6) << 4);
            m = (s[i + 4] >> 4) | ((s[i] >> 6) << 4);
        }
        const u8* q = b + 16 + 32 * (i / 2);
        const int shift = 4 * (i % 2);
        const float ds = d * (float)sc, dm = dmin * (float)m;
#pragma unroll
        for (int j = 0; j < 32; j++) w[j] = ds * (float)((q[j] >> shift) & 0xF) - dm;
    }
};

struct Q6_K {
    static __device__ __forceinline__ void dequant32(const u8* row, int item, float* w) {
        const u8* b = row + (size_t)(item / 8) * 210;
        const int i = item % 8;  // values 32 i .. 32 i + 32 of the block
        const int half = i / 4, run = i % 4;
        const float d = ld_f16(b + 208);
        const float s0 = d * (float)(i8)b[192 + 2 * i];
        const float s1 = d * (float)(i8)b[192 + 2 * i + 1];
        const u8* ql = b + 64 * half + 32 * (run % 2);
        const u8* qh = b + 128 + 32 * half;
#pragma unroll
        for (int l = 0; l < 32; l++) {
            const int lo = run < 2 ? (ql[l] & 0xF) : (ql[l] >> 4);
            const int hi = (qh[l] >> (2 * run)) & 3;
            w[l] = (l < 16 ? s0 : s1) * (float)((lo | (hi << 4)) - 32);
        }
    }
};

// Float tables (embeddings), read through the same interface.
struct F32W {
    static __device__ __forceinline__ void dequant32(const u8* row, int item, float* w) {
        const float* p = (const float*)row + (size_t)item * 32;
#pragma unroll
        for (int j = 0; j < 32; j++) w[j] = p[j];
    }
};
struct F16W {
    static __device__ __forceinline__ void dequant32(const u8* row, int item, float* w) {
        const uint4* p = (const uint4*)(row + (size_t)item * 64);
#pragma unroll
        for (int j = 0; j < 4; j++) unpack8<F16>(p[j], w + 8 * j);
    }
};
struct BF16W {
    static __device__ __forceinline__ void dequant32(const u8* row, int item, float* w) {
        const uint4* p = (const uint4*)(row + (size_t)item * 64);
#pragma unroll
        for (int j = 0; j < 4; j++) unpack8<BF16>(p[j], w + 8 * j);
    }
};
