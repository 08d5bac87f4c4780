// Paged decode attention: one query token per sequence attends over its cached context,
// read through the sequence's block table.
//
// Grid: x = kv head × head group, y = sequence, z = split (partition of the context).
// A CTA serves up to `DECODE_MAX_GROUP` query heads of one KV head (GQA): each key and value
// vector is loaded once, as 16-byte vectors (8 values; `head_dim / 8` lanes per key), and
// used by every query head of the group. Scores of a partition live in shared memory
// (`heads_per_cta * partition_size` floats), so the softmax is exact within a partition.
//
// Split-KV (flash-decoding): with `num_splits > 1` each CTA writes its partition's
// normalized output, max and sum to `tmp_*` and `paged_attention_reduce` merges them; the
// host picks small partitions when few sequences would leave SMs idle. With one split the CTA
// writes `out` directly. Sequences whose `query_len != 1` are left to the prefill kernel.
#include "common.cuh"

#define DECODE_THREADS 128
#define DECODE_MAX_GROUP 8

struct DecodeParams {
    const float* q;         // qkv rows, Q rotated; row stride q_stride
    const u16* k_cache;     // [num_blocks, kv_heads, block_size, D] of this layer
    const u16* v_cache;
    const u32* query_start; // [num_seqs]
    const u32* query_len;
    const u32* context_len;
    const u32* block_tables; // [num_seqs, bt_stride]
    float* out;              // [tokens, heads * D]
    float* tmp_out;          // [num_seqs, heads, num_splits, D]
    float* tmp_max;          // [num_seqs, heads, num_splits]
    float* tmp_sum;
    float scale;
    int q_stride, heads, kv_heads, heads_per_cta, block_size, bt_stride, partition_size;
    int num_splits;
};

template <typename T, int D>
__device__ void decode_attention(const DecodeParams& p) {
    constexpr int VEC = D / 8;            // lanes per key vector
    constexpr int KPW = 32 / VEC;         // keys per warp pass
    constexpr int NW = DECODE_THREADS / 32;
    constexpr int NKG = DECODE_THREADS / VEC;  // key groups in the value pass
    extern __shared__ float logits[];     // [heads_per_cta][partition_size]
    __shared__ float part[NKG * D];
    __shared__ float scratch[32];
    __shared__ float head_max[DECODE_MAX_GROUP], head_sum[DECODE_MAX_GROUP];

    const int seq = blockIdx.y, split = blockIdx.z;
    if (p.query_len[seq] != 1) return;
    const int group_size = p.heads / p.kv_heads;
    const int groups = (group_size + p.heads_per_cta - 1) / p.heads_per_cta;
    const int kvh = blockIdx.x / groups, grp = blockIdx.x % groups;
    const int head0 = kvh * group_size + grp * p.heads_per_cta;
    const int nh = min(p.heads_per_cta, group_size - grp * p.heads_per_cta);
    const int ctx = p.context_len[seq];
    const int start = split * p.partition_size;
    if (start >= ctx) return;
    const int end = min(ctx, start + p.partition_size);
    const int len = end - start;
    const int row = p.query_start[seq];
    const u32* bt = p.block_tables + (size_t)seq * p.bt_stride;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int vl = lane % VEC, sub = lane / VEC;

    // Each lane keeps its 8 dims of every query head of the group.
    float q[DECODE_MAX_GROUP][8];
#pragma unroll
    for (int g = 0; g < DECODE_MAX_GROUP; g++) {
        if (g < nh) {
            const float4* q4 = (const float4*)(p.q + (size_t)row * p.q_stride +
                                               (size_t)(head0 + g) * D + vl * 8);
            const float4 a = q4[0], b = q4[1];
            q[g][0] = a.x; q[g][1] = a.y; q[g][2] = a.z; q[g][3] = a.w;
            q[g][4] = b.x; q[g][5] = b.y; q[g][6] = b.z; q[g][7] = b.w;
        }
    }

    // Scores: lanes [sub * VEC, (sub + 1) * VEC) share key `base + sub`.
    for (int base = start + warp * KPW; base < end; base += NW * KPW) {
        const int t = base + sub;
        const bool valid = t < end;
        float k[8];
        if (valid) {
            const size_t blk = bt[t / p.block_size];
            const uint4* kp = (const uint4*)(p.k_cache +
                ((blk * p.kv_heads + kvh) * p.block_size + t % p.block_size) * D + vl * 8);
            unpack8<T>(*kp, k);
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++) k[e] = 0.0f;
        }
#pragma unroll
        for (int g = 0; g < DECODE_MAX_GROUP; g++) {
            if (g < nh) {
                float s = 0.0f;
#pragma unroll
                for (int e = 0; e < 8; e++) s += q[g][e] * k[e];
#pragma unroll
                for (int o = VEC / 2; o > 0; o >>= 1) s += __shfl_xor_sync(FULL_MASK, s, o);
                if (valid && vl == 0) logits[g * p.partition_size + (t - start)] = s * p.scale;
            }
        }
    }
    __syncthreads();

    // Softmax within the partition, per head.
    for (int g = 0; g < nh; g++) {
        float* l = logits + g * p.partition_size;
        float m = NEG_INF;
        for (int i = tid; i < len; i += DECODE_THREADS) m = fmaxf(m, l[i]);
        m = block_max(m, scratch);
        float s = 0.0f;
        for (int i = tid; i < len; i += DECODE_THREADS) {
            const float e = expf(l[i] - m);
            l[i] = e;
            s += e;
        }
        s = block_sum(s, scratch);
        if (tid == 0) {
            head_max[g] = m;
            head_sum[g] = s;
        }
    }
    __syncthreads();

    // Values: key group `kg` takes keys start + kg, start + kg + NKG, ...
    const int kg = tid / VEC, vv = tid % VEC;
    float acc[DECODE_MAX_GROUP][8];
#pragma unroll
    for (int g = 0; g < DECODE_MAX_GROUP; g++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[g][e] = 0.0f;
    for (int t = start + kg; t < end; t += NKG) {
        const size_t blk = bt[t / p.block_size];
        const uint4* vp = (const uint4*)(p.v_cache +
            ((blk * p.kv_heads + kvh) * p.block_size + t % p.block_size) * D + vv * 8);
        float v[8];
        unpack8<T>(*vp, v);
#pragma unroll
        for (int g = 0; g < DECODE_MAX_GROUP; g++) {
            if (g < nh) {
                const float w = logits[g * p.partition_size + (t - start)];
#pragma unroll
                for (int e = 0; e < 8; e++) acc[g][e] += w * v[e];
            }
        }
    }

    // Merge the key groups, one head at a time.
#pragma unroll
    for (int g = 0; g < DECODE_MAX_GROUP; g++) {
        if (g < nh) {
#pragma unroll
            for (int e = 0; e < 8; e++) part[kg * D + vv * 8 + e] = acc[g][e];
            __syncthreads();
            const int head = head0 + g;
            for (int d = tid; d < D; d += DECODE_THREADS) {
                float s = 0.0f;
                for (int i = 0; i < NKG; i++) s += part[i * D + d];
                s /= head_sum[g];
                if (p.num_splits == 1) {
                    p.out[(size_t)row * p.heads * D + (size_t)head * D + d] = s;
                } else {
                    const size_t at = ((size_t)seq * p.heads + head) * p.num_splits + split;
                    p.tmp_out[at * D + d] = s;
                    if (d == 0) {
                        p.tmp_max[at] = head_max[g];
                        p.tmp_sum[at] = head_sum[g];
                    }
                }
            }
            __syncthreads();
        }
    }
}

// Merges the partitions of each (sequence, head): weights `sum_i * exp(max_i - max)`.
template <int D>
__device__ void decode_reduce(const DecodeParams& p) {
    const int head = blockIdx.x, seq = blockIdx.y;
    if (p.query_len[seq] != 1) return;
    const int ns = (p.context_len[seq] + p.partition_size - 1) / p.partition_size;
    const size_t at0 = ((size_t)seq * p.heads + head) * p.num_splits;
    float m = NEG_INF;
    for (int i = 0; i < ns; i++) m = fmaxf(m, p.tmp_max[at0 + i]);
    float total = 0.0f;
    for (int i = 0; i < ns; i++) total += p.tmp_sum[at0 + i] * expf(p.tmp_max[at0 + i] - m);
    const int row = p.query_start[seq];
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float s = 0.0f;
        for (int i = 0; i < ns; i++)
            s += p.tmp_sum[at0 + i] * expf(p.tmp_max[at0 + i] - m) * p.tmp_out[(at0 + i) * D + d];
        p.out[(size_t)row * p.heads * D + (size_t)head * D + d] = s / total;
    }
}

#define DECODE(name, T, D)                                                                    \
    extern "C" __global__ void __launch_bounds__(DECODE_THREADS) name(DecodeParams p) {       \
        decode_attention<T, D>(p);                                                            \
    }
#define REDUCE(name, D)                                                                       \
    extern "C" __global__ void name(DecodeParams p) { decode_reduce<D>(p); }

DECODE(paged_attention_decode_f16_d64, F16, 64)
DECODE(paged_attention_decode_f16_d128, F16, 128)
DECODE(paged_attention_decode_bf16_d64, BF16, 64)
DECODE(paged_attention_decode_bf16_d128, BF16, 128)
REDUCE(paged_attention_reduce_d64, 64)
REDUCE(paged_attention_reduce_d128, 128)
