// Prefill attention over the paged KV cache: a chunk of new tokens attends over the cached
// prefix and, causally, over the chunk itself (whose K and V were just written to the cache
// by `rope_store`). Flash-attention style: K/V tiles of `PREFILL_BK` keys are staged in
// shared memory as f32 and each query row keeps an online softmax (running max, sum and
// output), so memory is independent of the context length.
//
// Grid: x = tile (host-built list of (sequence, first query)), y = kv head × head group.
// A CTA computes `PREFILL_ROWS` (token, head) rows: `tokens_per_tile` tokens × up to
// `heads_per_cta` query heads of one KV head, so the K/V tile is shared by the group (GQA).
// Each warp owns `PREFILL_ROWS / 4` rows; lane j scores key j of the tile, lane l owns output
// dims l, l + 32, ... Row causal limit: key `k` is visible to query `q` (index within the
// sequence's new tokens) iff `k <= context_len - query_len + q`.
#include "common.cuh"

#define PREFILL_THREADS 128
#define PREFILL_ROWS 16
#define PREFILL_BK 32

struct PrefillParams {
    const float* q;
    const u16* k_cache;
    const u16* v_cache;
    const u32* query_start;
    const u32* query_len;
    const u32* context_len;
    const u32* block_tables;
    const u32* tiles;       // [num_tiles, 2]: (sequence, first query)
    float* out;
    float scale;
    int q_stride, heads, kv_heads, heads_per_cta, tokens_per_tile, block_size, bt_stride;
};

template <typename T, int D>
__device__ void prefill_attention(const PrefillParams& p) {
    constexpr int RPW = PREFILL_ROWS / (PREFILL_THREADS / 32);
    constexpr int DPL = D / 32;  // output dims per lane
    __shared__ float qs[PREFILL_ROWS][D];
    __shared__ float ks[PREFILL_BK][D + 1];
    __shared__ float vs[PREFILL_BK][D + 1];

    const int seq = p.tiles[2 * blockIdx.x], q_begin = p.tiles[2 * blockIdx.x + 1];
    const int group_size = p.heads / p.kv_heads;
    const int groups = (group_size + p.heads_per_cta - 1) / p.heads_per_cta;
    const int kvh = blockIdx.y / groups, grp = blockIdx.y % groups;
    const int head0 = kvh * group_size + grp * p.heads_per_cta;
    const int nh = min(p.heads_per_cta, group_size - grp * p.heads_per_cta);
    const int qlen = p.query_len[seq], ctx = p.context_len[seq];
    const int prefix = ctx - qlen;
    const int q_end = min(qlen, q_begin + p.tokens_per_tile);
    const int kv_end = prefix + q_end;
    const int qs0 = p.query_start[seq];
    const u32* bt = p.block_tables + (size_t)seq * p.bt_stride;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

    for (int i = tid; i < PREFILL_ROWS * D; i += PREFILL_THREADS) {
        const int r = i / D, d = i % D;
        const int tok = q_begin + r / p.heads_per_cta, hh = r % p.heads_per_cta;
        float v = 0.0f;
        if (r / p.heads_per_cta < p.tokens_per_tile && tok < q_end && hh < nh)
            v = p.q[(size_t)(qs0 + tok) * p.q_stride + (size_t)(head0 + hh) * D + d];
        qs[r][d] = v;
    }

    float m[RPW], l[RPW], acc[RPW][DPL];
#pragma unroll
    for (int r = 0; r < RPW; r++) {
        m[r] = NEG_INF;
        l[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[r][i] = 0.0f;
    }

    for (int k0 = 0; k0 < kv_end; k0 += PREFILL_BK) {
        __syncthreads();  // the previous tile (and the Q staging) is done with
        for (int v = tid; v < PREFILL_BK * (D / 8); v += PREFILL_THREADS) {
            const int j = v / (D / 8), part = v % (D / 8);
            const int t = k0 + j;
            float kf[8], vf[8];
            if (t < kv_end) {
                const size_t blk = bt[t / p.block_size];
                const size_t at =
                    ((blk * p.kv_heads + kvh) * p.block_size + t % p.block_size) * D + part * 8;
                unpack8<T>(*(const uint4*)(p.k_cache + at), kf);
                unpack8<T>(*(const uint4*)(p.v_cache + at), vf);
            } else {
#pragma unroll
                for (int e = 0; e < 8; e++) kf[e] = vf[e] = 0.0f;
            }
#pragma unroll
            for (int e = 0; e < 8; e++) {
                ks[j][part * 8 + e] = kf[e];
                vs[j][part * 8 + e] = vf[e];
            }
        }
        __syncthreads();

#pragma unroll
        for (int rr = 0; rr < RPW; rr++) {
            const int r = warp * RPW + rr;
            const int tok_in_tile = r / p.heads_per_cta, hh = r % p.heads_per_cta;
            const int tok = q_begin + tok_in_tile;
            // Warp-uniform: every lane of the warp has the same row.
            if (tok_in_tile >= p.tokens_per_tile || tok >= q_end || hh >= nh) continue;
            const int t = k0 + lane;
            const bool visible = t < kv_end && t <= prefix + tok;
            float s = 0.0f;
#pragma unroll 8
            for (int d = 0; d < D; d++) s += qs[r][d] * ks[lane][d];
            s = visible ? s * p.scale : NEG_INF;
            const float m_new = fmaxf(m[rr], warp_max(s));
            // m_new is finite: key 0 is visible to every row and lies in the first tile.
            const float pj = visible ? expf(s - m_new) : 0.0f;
            const float alpha = expf(m[rr] - m_new);
            l[rr] = l[rr] * alpha + warp_sum(pj);
#pragma unroll
            for (int i = 0; i < DPL; i++) acc[rr][i] *= alpha;
            for (int j = 0; j < PREFILL_BK; j++) {
                const float w = __shfl_sync(FULL_MASK, pj, j);
#pragma unroll
                for (int i = 0; i < DPL; i++) acc[rr][i] += w * vs[j][lane + 32 * i];
            }
            m[rr] = m_new;
        }
    }

#pragma unroll
    for (int rr = 0; rr < RPW; rr++) {
        const int r = warp * RPW + rr;
        const int tok_in_tile = r / p.heads_per_cta, hh = r % p.heads_per_cta;
        const int tok = q_begin + tok_in_tile;
        if (tok_in_tile >= p.tokens_per_tile || tok >= q_end || hh >= nh) continue;
        float* o = p.out + (size_t)(qs0 + tok) * p.heads * D + (size_t)(head0 + hh) * D;
#pragma unroll
        for (int i = 0; i < DPL; i++) o[lane + 32 * i] = acc[rr][i] / l[rr];
    }
}

#define PREFILL(name, T, D)                                                                   \
    extern "C" __global__ void __launch_bounds__(PREFILL_THREADS) name(PrefillParams p) {     \
        prefill_attention<T, D>(p);                                                           \
    }

PREFILL(paged_attention_prefill_f16_d64, F16, 64)
PREFILL(paged_attention_prefill_f16_d128, F16, 128)
PREFILL(paged_attention_prefill_bf16_d64, BF16, 64)
PREFILL(paged_attention_prefill_bf16_d128, BF16, 128)
