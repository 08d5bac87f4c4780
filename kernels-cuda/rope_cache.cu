// RoPE on Q and K, fused with the write of K and V into their KV-cache slots.
//
// `qkv` is `[tokens, (heads + 2 kv_heads) * head_dim]` f32; Q is rotated in place (the
// attention kernels read it from there), K is rotated and stored, V stored, both rounded to
// the cache type. Cache layout per layer: `[num_blocks, kv_heads, block_size, head_dim]`;
// a token's slot is `block_id * block_size + offset`. One block per token.
#include "common.cuh"

template <typename T>
__device__ void rope_store(float* __restrict__ qkv, const u32* __restrict__ positions,
                           const u32* __restrict__ slots, const float* __restrict__ inv_freqs,
                           int interleaved, int heads, int kv_heads, int head_dim,
                           int block_size, u16* __restrict__ k_cache,
                           u16* __restrict__ v_cache) {
    const int t = blockIdx.x;
    const int half = head_dim / 2;
    const int cols = (heads + 2 * kv_heads) * head_dim;
    float* row = qkv + (size_t)t * cols;
    const float pos = (float)positions[t];
    const u32 slot = slots[t];
    const size_t block = slot / block_size, offset = slot % block_size;

    // Rotate every (head, pair) of Q and K; pairs are (2i, 2i+1) or (i, i + half).
    const int num_pairs = (heads + kv_heads) * half;
    for (int p = threadIdx.x; p < num_pairs; p += blockDim.x) {
        const int head = p / half, i = p % half;
        float s, c;
        sincosf(pos * inv_freqs[i], &s, &c);
        float* x = row + head * head_dim;
        const int ia = interleaved ? 2 * i : i;
        const int ib = interleaved ? 2 * i + 1 : i + half;
        const float a = x[ia], b = x[ib];
        const float ra = a * c - b * s, rb = a * s + b * c;
        if (head < heads) {
            x[ia] = ra;
            x[ib] = rb;
        } else {
            const int g = head - heads;
            u16* dst = k_cache + ((block * kv_heads + g) * block_size + offset) * head_dim;
            dst[ia] = T::from_f32(ra);
            dst[ib] = T::from_f32(rb);
        }
    }
    const float* v = row + (heads + kv_heads) * head_dim;
    for (int i = threadIdx.x; i < kv_heads * head_dim; i += blockDim.x) {
        const int g = i / head_dim, d = i % head_dim;
        v_cache[((block * kv_heads + g) * block_size + offset) * head_dim + d] = T::from_f32(v[i]);
    }
}

#define ROPE_STORE(name, T)                                                                   \
    extern "C" __global__ void name(float* qkv, const u32* positions, const u32* slots,      \
                                    const float* inv_freqs, int interleaved, int heads,       \
                                    int kv_heads, int head_dim, int block_size, u16* k_cache, \
                                    u16* v_cache) {                                           \
        rope_store<T>(qkv, positions, slots, inv_freqs, interleaved, heads, kv_heads,         \
                      head_dim, block_size, k_cache, v_cache);                                \
    }

ROPE_STORE(rope_store_f16, F16)
ROPE_STORE(rope_store_bf16, BF16)
