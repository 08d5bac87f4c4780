//! Host reference of `sample_rows` (`kernels-cuda/sampling.cu`): the same steps in the same
//! order, for the GPU-vs-host test, for reading the kernel's math in Rust, and for tests
//! that run the engine's device-sampling path on the CPU. Device-neutral: it needs no GPU.
//!
//! Steps per row: log-sum-exp of the raw row; penalties (each listed token once), then logit
//! bias in list order; greedy argmax (lowest id among equals, NaN as -inf), or weights
//! `exp((v - max) / T)` cut by min-p (relative to the best token), top-k and top-p as value
//! thresholds (ties at a threshold are kept), and a draw of `uniform01(seed, counter)` times the
//! total weight, walked over `SAMPLE_THREADS` contiguous chunks in order, summed as the kernel
//! sums them. The draw and the chunk walk are replayed exactly; only `expf` and the order of
//! the kernel's block-wide sums for the thresholds differ, so a GPU row can differ from this
//! one only when a threshold or the draw falls within rounding of a token's boundary.

use super::sampling::{SampleRow, SampledRow, SamplingBatch, GREEDY_TEMPERATURE, SAMPLE_THREADS};

/// splitmix64's output function of `z` advanced once (as the kernel's `splitmix64`).
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The kernel's uniform draw in `[0, 1)` with 24 bits for (seed, counter).
pub fn uniform01(seed: u64, counter: u64) -> f32 {
    let z = splitmix64(seed ^ splitmix64(counter));
    (z >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// Order-preserving map of floats to unsigned integers (the kernel's `order_key`).
pub fn order_key(f: f32) -> u32 {
    let b = f.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Index of the largest value, lowest among equals, NaN as -inf, skipping `exclude`.
fn argmax_excluding(x: &[f32], exclude: &[u32]) -> usize {
    let mut best = f32::NEG_INFINITY;
    let mut idx = None;
    for (i, &v) in x.iter().enumerate() {
        if exclude.contains(&(i as u32)) {
            continue;
        }
        let v = if v.is_nan() { f32::NEG_INFINITY } else { v };
        if idx.is_none() || v > best {
            best = v;
            idx = Some(i);
        }
    }
    idx.unwrap_or(0)
}

/// The row after penalties and bias (the kernel's `work` row).
pub fn processed_row(raw: &[f32], batch: &SamplingBatch, row: &SampleRow) -> Vec<f32> {
    let mut work = raw.to_vec();
    let n = work.len();
    for e in row.penalty_begin as usize..row.penalty_end as usize {
        let (t, info) = (batch.penalty_ids[e] as usize, batch.penalty_info[e]);
        if t >= n {
            continue;
        }
        let count = info & 0x7fff_ffff;
        let mut v = work[t];
        if row.repetition_penalty != 1.0 {
            v = if v > 0.0 {
                v / row.repetition_penalty
            } else {
                v * row.repetition_penalty
            };
        }
        if count > 0 {
            v -= row.presence_penalty + row.frequency_penalty * count as f32;
        }
        work[t] = v;
    }
    for e in row.bias_begin as usize..row.bias_end as usize {
        if let Some(w) = work.get_mut(batch.bias_ids[e] as usize) {
            *w += batch.bias_values[e];
        }
    }
    work
}

/// The thresholds a non-greedy row keeps tokens by (the kernel's `Kept`).
#[derive(Debug, Clone, Copy)]
pub struct Kept {
    pub max: f32,
    pub inv_t: f32,
    pub min_p: f32,
    pub k_key: u32,
    pub p_key: u32,
}

impl Kept {
    /// The unnormalized probability of a token with processed logit `v`; 0 when cut.
    pub fn weight(&self, v: f32) -> f32 {
        if v.is_nan() || v <= f32::NEG_INFINITY {
            return 0.0;
        }
        let w = ((v - self.max) * self.inv_t).exp();
        if w < self.min_p {
            return 0.0;
        }
        let key = order_key(v);
        if key >= self.k_key && key >= self.p_key {
            w
        } else {
            0.0
        }
    }

    /// The thresholds of `row` over the processed row `work` whose argmax is `best`.
    pub fn new(work: &[f32], best: usize, row: &SampleRow) -> Self {
        let mut kept = Self {
            max: work[best],
            inv_t: 1.0 / row.temperature,
            min_p: row.min_p,
            k_key: 0,
            p_key: 0,
        };
        let n = work.len();
        if row.top_k > 0 && (row.top_k as usize) < n {
            // The largest key with at least top_k kept tokens at or above it: the key of the
            // k-th largest kept value.
            let mut keys: Vec<u32> = work
                .iter()
                .filter(|&&v| kept.weight(v) > 0.0)
                .map(|&v| order_key(v))
                .collect();
            if keys.len() >= row.top_k as usize {
                keys.sort_unstable_by_key(|&k| std::cmp::Reverse(k));
                kept.k_key = keys[row.top_k as usize - 1];
            }
        }
        if row.top_p < 1.0 {
            let total: f32 = work.iter().map(|&v| kept.weight(v)).sum();
            // The largest key whose mass at or above it reaches top_p of the total.
            let mut by_key: Vec<(u32, f32)> = work
                .iter()
                .map(|&v| (order_key(v), kept.weight(v)))
                .filter(|&(_, w)| w > 0.0)
                .collect();
            by_key.sort_unstable_by_key(|&(k, _)| std::cmp::Reverse(k));
            let mut mass = 0.0f32;
            let mut key = 0;
            let mut i = 0;
            while i < by_key.len() {
                let k = by_key[i].0;
                while i < by_key.len() && by_key[i].0 == k {
                    mass += by_key[i].1;
                    i += 1;
                }
                if mass >= row.top_p * total {
                    key = k;
                    break;
                }
            }
            kept.p_key = key;
        }
        kept
    }
}

/// Samples row `r` of `logits` (`[batch.len(), vocab]`) exactly as `sample_rows` does.
pub fn sample_row(raw: &[f32], batch: &SamplingBatch, r: usize) -> SampledRow {
    let row = &batch.rows[r];
    let n = raw.len();
    let m = raw.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    // Summed in f64: the kernel's tree of f32 partial sums is close to exact, a sequential
    // f32 sum of a vocabulary's terms is not (1e-4 off at 49,152).
    let s: f64 = raw.iter().map(|&v| (v - m).exp() as f64).sum();
    let lse = m + s.ln() as f32;
    let work = processed_row(raw, batch, row);
    let best = argmax_excluding(&work, &[]);
    let mut token = best;
    if row.temperature >= GREEDY_TEMPERATURE {
        let kept = Kept::new(&work, best, row);
        let chunk = n.div_ceil(SAMPLE_THREADS);
        let chunk_sum: Vec<f32> = (0..SAMPLE_THREADS)
            .map(|t| {
                let (c0, c1) = ((t * chunk).min(n), ((t + 1) * chunk).min(n));
                work[c0..c1].iter().fold(0.0f32, |a, &v| a + kept.weight(v))
            })
            .collect();
        let total = chunk_sum.iter().fold(0.0f32, |a, &v| a + v);
        let mut u = uniform01(row.seed, row.counter) * total;
        let (mut c, mut last) = (None, None);
        for (i, &cs) in chunk_sum.iter().enumerate() {
            if cs > 0.0 {
                last = Some(i);
            }
            if c.is_none() && cs > 0.0 && u < cs {
                c = Some(i);
            }
            if c.is_none() {
                u -= cs;
            }
        }
        if c.is_none() {
            c = last;
            u = last.map(|l| chunk_sum[l]).unwrap_or(0.0);
        }
        if let Some(c) = c {
            let (c0, c1) = ((c * chunk).min(n), ((c + 1) * chunk).min(n));
            for (i, &v) in work.iter().enumerate().take(c1).skip(c0) {
                let w = kept.weight(v);
                if w > 0.0 {
                    token = i;
                    if u < w {
                        break;
                    }
                    u -= w;
                }
            }
        }
    }
    let mut chosen = Vec::new();
    for _ in 0..row.num_top_logprobs.max(0) {
        chosen.push(argmax_excluding(raw, &chosen) as u32);
    }
    SampledRow {
        token_id: token as u32,
        logprob: raw[token] - lse,
        top_logprobs: chosen.iter().map(|&t| (t, raw[t as usize] - lse)).collect(),
    }
}

/// `sample_row` for every row of `logits`.
pub fn sample_rows(logits: &[f32], vocab: usize, batch: &SamplingBatch) -> Vec<SampledRow> {
    (0..batch.len())
        .map(|r| sample_row(&logits[r * vocab..(r + 1) * vocab], batch, r))
        .collect()
}

/// The probability each token has of being drawn (weights normalized), 0 for cut tokens;
/// a one-hot of the argmax for greedy rows.
pub fn probabilities(raw: &[f32], batch: &SamplingBatch, r: usize) -> Vec<f64> {
    let row = &batch.rows[r];
    let work = processed_row(raw, batch, row);
    let best = argmax_excluding(&work, &[]);
    if row.temperature < GREEDY_TEMPERATURE {
        let mut p = vec![0.0; raw.len()];
        p[best] = 1.0;
        return p;
    }
    let kept = Kept::new(&work, best, row);
    let w: Vec<f64> = work.iter().map(|&v| kept.weight(v) as f64).collect();
    let total: f64 = w.iter().sum();
    w.iter().map(|x| x / total.max(f64::MIN_POSITIVE)).collect()
}

// Its tests hold it against the host sampler: `sampling/device_reference_tests.rs`.
