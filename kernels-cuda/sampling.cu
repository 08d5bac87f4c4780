// Logits processing and sampling on the GPU, one CTA per logits row, so that only the sampled
// ids and the requested logprobs cross to the host.
//
// Order (as the host sampler, model/sampling.rs): logprobs of the raw row (log-softmax);
// repetition, presence and frequency penalties and logit bias (bias -inf suppresses a token);
// then greedy argmax (lowest id among equals) or: temperature, min-p (relative to the best
// token), top-k and top-p as value thresholds found by bisection over the order-preserving
// integer image of the logits (32 block-wide counts each; ties at a threshold are kept), and a
// draw from a counter-based generator (splitmix64 of seed and step), so a seed gives the same
// tokens whatever else is in the batch. `SAMPLE_THREADS` threads walk contiguous chunks of
// the row when drawing, so the draw is deterministic.
#include "common.cuh"

#define SAMPLE_THREADS 1024
#define MAX_TOP_LOGPROBS 20
#define GREEDY_TEMPERATURE 1e-5f

struct SamplingRow {
    u64 seed;
    u64 counter;            // the draw's index in its sequence (tokens generated so far)
    float temperature, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty;
    int top_k;              // 0: no cut
    int num_top_logprobs;   // alternatives to report, <= MAX_TOP_LOGPROBS
    u32 penalty_begin, penalty_end;  // into penalty_ids / penalty_info
    u32 bias_begin, bias_end;        // into bias_ids / bias_values
};

struct SamplingParams {
    const float* logits;      // [rows, vocab]
    float* work;              // [rows, vocab] scratch
    const SamplingRow* rows;
    const u32* penalty_ids;   // distinct tokens per row
    const u32* penalty_info;  // generated count | (in prompt << 31)
    const u32* bias_ids;
    const float* bias_values;
    u32* out_ids;             // [rows]
    float* out_logprobs;      // [rows]
    u32* out_top_ids;         // [rows, MAX_TOP_LOGPROBS]
    float* out_top_logprobs;
    int vocab;
};

__device__ __forceinline__ u64 splitmix64(u64 z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Uniform in [0, 1) with 24 bits.
__device__ __forceinline__ float uniform01(u64 seed, u64 counter) {
    const u64 z = splitmix64(seed ^ splitmix64(counter));
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}

// Order-preserving map of floats to unsigned integers.
__device__ __forceinline__ u32 order_key(float f) {
    const u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Index of the largest finite-or-not value, lowest index among equals; NaN counts as -inf.
__device__ int block_argmax(const float* x, int n, const u32* exclude, int num_exclude,
                            float* sval, int* sidx) {
    float best = NEG_INF;
    int idx = n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        bool skip = false;
        for (int e = 0; e < num_exclude; e++) skip |= exclude[e] == (u32)i;
        float v = x[i];
        if (v != v) v = NEG_INF;
        if (!skip && (idx == n || v > best)) {
            best = v;
            idx = i;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, best, o);
        const int oi = __shfl_xor_sync(FULL_MASK, idx, o);
        if (ov > best || (ov == best && oi < idx)) {
            best = ov;
            idx = oi;
        }
    }
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();
    if (lane == 0) {
        sval[warp] = best;
        sidx[warp] = idx;
    }
    __syncthreads();
    if (warp == 0) {
        best = lane < (int)(blockDim.x / 32) ? sval[lane] : NEG_INF;
        idx = lane < (int)(blockDim.x / 32) ? sidx[lane] : n;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(FULL_MASK, best, o);
            const int oi = __shfl_xor_sync(FULL_MASK, idx, o);
            if (ov > best || (ov == best && oi < idx)) {
                best = ov;
                idx = oi;
            }
        }
        if (lane == 0) sidx[0] = idx;
    }
    __syncthreads();
    const int r = sidx[0];
    __syncthreads();
    return r < n ? r : 0;
}

struct Kept {
    float max, inv_t, min_p;
    u32 k_key, p_key;
    __device__ __forceinline__ float weight(float v) const {
        if (!(v > NEG_INF) || v != v) return 0.0f;
        const float w = expf((v - max) * inv_t);
        if (w < min_p) return 0.0f;
        const u32 key = order_key(v);
        return (key >= k_key && key >= p_key) ? w : 0.0f;
    }
};

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_rows(SamplingParams p) {
    __shared__ float scratch[32];
    __shared__ float sval[32];
    __shared__ int sidx[32];
    __shared__ float chunk_sum[SAMPLE_THREADS];
    __shared__ u32 chosen[MAX_TOP_LOGPROBS];
    __shared__ int pick_chunk;
    __shared__ float pick_rest;
    __shared__ int picked;

    const SamplingRow row = p.rows[blockIdx.x];
    const int n = p.vocab, tid = threadIdx.x;
    const float* raw = p.logits + (size_t)blockIdx.x * n;
    float* work = p.work + (size_t)blockIdx.x * n;

    // Log-sum-exp of the raw row.
    float m = NEG_INF;
    for (int i = tid; i < n; i += SAMPLE_THREADS) m = fmaxf(m, raw[i]);
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int i = tid; i < n; i += SAMPLE_THREADS) s += expf(raw[i] - m);
    s = block_sum(s, scratch);
    const float lse = m + logf(s);

    for (int i = tid; i < n; i += SAMPLE_THREADS) work[i] = raw[i];
    __syncthreads();
    for (u32 e = row.penalty_begin + tid; e < row.penalty_end; e += SAMPLE_THREADS) {
        const u32 t = p.penalty_ids[e], info = p.penalty_info[e];
        if (t >= (u32)n) continue;
        const u32 count = info & 0x7fffffffu;
        float v = work[t];
        if (row.repetition_penalty != 1.0f) v = v > 0.0f ? v / row.repetition_penalty : v * row.repetition_penalty;
        if (count > 0) v -= row.presence_penalty + row.frequency_penalty * (float)count;
        work[t] = v;
    }
    __syncthreads();
    if (tid == 0) {
        // Sequential: a token may appear twice in the bias list.
        for (u32 e = row.bias_begin; e < row.bias_end; e++)
            if (p.bias_ids[e] < (u32)n) work[p.bias_ids[e]] += p.bias_values[e];
    }
    __syncthreads();

    const int best = block_argmax(work, n, chosen, 0, sval, sidx);
    int token = best;
    if (row.temperature >= GREEDY_TEMPERATURE) {
        Kept kept;
        kept.max = work[best];
        kept.inv_t = 1.0f / row.temperature;
        kept.min_p = row.min_p;
        kept.k_key = 0;
        kept.p_key = 0;
        if (row.top_k > 0 && row.top_k < n) {
            u32 key = 0;
            for (int bit = 31; bit >= 0; bit--) {
                const u32 cand = key | (1u << bit);
                float c = 0.0f;
                for (int i = tid; i < n; i += SAMPLE_THREADS)
                    c += (kept.weight(work[i]) > 0.0f && order_key(work[i]) >= cand) ? 1.0f : 0.0f;
                if (block_sum(c, scratch) >= (float)row.top_k) key = cand;
            }
            kept.k_key = key;
        }
        if (row.top_p < 1.0f) {
            float total = 0.0f;
            for (int i = tid; i < n; i += SAMPLE_THREADS) total += kept.weight(work[i]);
            total = block_sum(total, scratch);
            u32 key = 0;
            for (int bit = 31; bit >= 0; bit--) {
                const u32 cand = key | (1u << bit);
                float mass = 0.0f;
                for (int i = tid; i < n; i += SAMPLE_THREADS)
                    mass += order_key(work[i]) >= cand ? kept.weight(work[i]) : 0.0f;
                if (block_sum(mass, scratch) >= row.top_p * total) key = cand;
            }
            kept.p_key = key;
        }
        // Draw: contiguous chunks per thread, walked in order.
        const int chunk = (n + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
        const int c0 = tid * chunk, c1 = min(n, c0 + chunk);
        float local = 0.0f;
        for (int i = c0; i < c1; i++) local += kept.weight(work[i]);
        chunk_sum[tid] = local;
        __syncthreads();
        if (tid == 0) {
            float total = 0.0f;
            for (int i = 0; i < SAMPLE_THREADS; i++) total += chunk_sum[i];
            float u = uniform01(row.seed, row.counter) * total;
            int c = -1, last = -1;
            for (int i = 0; i < SAMPLE_THREADS; i++) {
                if (chunk_sum[i] > 0.0f) last = i;
                if (c < 0 && chunk_sum[i] > 0.0f && u < chunk_sum[i]) c = i;
                if (c < 0) u -= chunk_sum[i];
            }
            if (c < 0) {  // rounding left u past the end: the last kept chunk's last token
                c = last;
                u = c >= 0 ? chunk_sum[c] : 0.0f;
            }
            pick_chunk = c;
            pick_rest = u;
            picked = best;
        }
        __syncthreads();
        if (tid == pick_chunk) {
            float u = pick_rest;
            int t = -1;
            for (int i = c0; i < c1; i++) {
                const float w = kept.weight(work[i]);
                if (w > 0.0f) {
                    t = i;
                    if (u < w) break;
                    u -= w;
                }
            }
            if (t >= 0) picked = t;
        }
        __syncthreads();
        token = picked;
    }

    if (tid == 0) {
        p.out_ids[blockIdx.x] = (u32)token;
        p.out_logprobs[blockIdx.x] = raw[token] - lse;
    }
    const int num_top = min(row.num_top_logprobs, MAX_TOP_LOGPROBS);
    for (int k = 0; k < num_top; k++) {
        const int t = block_argmax(raw, n, chosen, k, sval, sidx);
        if (tid == 0) {
            chosen[k] = (u32)t;
            p.out_top_ids[(size_t)blockIdx.x * MAX_TOP_LOGPROBS + k] = (u32)t;
            p.out_top_logprobs[(size_t)blockIdx.x * MAX_TOP_LOGPROBS + k] = raw[t] - lse;
        }
        __syncthreads();
    }
}
