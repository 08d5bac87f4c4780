// Embedding gather: `out[t, :] = table[token_ids[t], :]` as f32, from a float or GGML-block
// table. One block per token; threads take 32-value items of the row. Ids past the table's
// end are clamped (the CPU backend does the same; validation keeps them in range).
#include "quant.cuh"

template <typename Q>
__device__ void embed(const u8* __restrict__ table, const u32* __restrict__ token_ids,
                      int vocab, int cols, u64 row_bytes, float* __restrict__ out) {
    u32 id = token_ids[blockIdx.x];
    if (id >= (u32)vocab) id = vocab - 1;
    const u8* row = table + (size_t)id * row_bytes;
    float* dst = out + (size_t)blockIdx.x * cols;
    for (int item = threadIdx.x; item < cols / 32; item += blockDim.x) {
        float wv[32];
        Q::dequant32(row, item, wv);
        float4* d4 = (float4*)(dst + item * 32);
#pragma unroll
        for (int j = 0; j < 8; j++)
            d4[j] = make_float4(wv[4 * j], wv[4 * j + 1], wv[4 * j + 2], wv[4 * j + 3]);
    }
}

#define EMBED(name, Q)                                                                        \
    extern "C" __global__ void name(const u8* table, const u32* token_ids, int vocab,         \
                                    int cols, u64 row_bytes, float* out) {                    \
        embed<Q>(table, token_ids, vocab, cols, row_bytes, out);                              \
    }

EMBED(embed_f32, F32W)
EMBED(embed_f16, F16W)
EMBED(embed_bf16, BF16W)
EMBED(embed_q8_0, Q8_0)
EMBED(embed_q4_0, Q4_0)
EMBED(embed_q4_1, Q4_1)
EMBED(embed_q4_k, Q4_K)
EMBED(embed_q6_k, Q6_K)
