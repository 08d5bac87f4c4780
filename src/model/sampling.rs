//! Turning one row of logits into one token, per sequence: logit processors (repetition,
//! presence and frequency penalties, logit bias), then greedy or temperature sampling with
//! top-k, top-p and min-p, from a per-sequence seeded generator, so that a seed gives the same
//! tokens whatever else shares the batch. Logprobs are those of the model's own distribution
//! (log-softmax of the raw logits), as vLLM reports by default.
//!
//! On a backend that samples on the device, a sampler only describes its row
//! (`SequenceSampler::row`) and `observe`s the id that comes back; the draw is the device's
//! counter-based one (`kernels::sampling`).

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::kernels::cpu::ops::{self, softmax_weights};
use crate::kernels::sampling::{PenaltyToken, RowParams, SamplingBatch};

/// Below this temperature sampling is greedy.
const GREEDY_TEMPERATURE: f32 = 1e-5;
/// The top-p cut's buckets are a weight's bit pattern without its low bits (weights are in
/// `[0, 1]`, so the patterns order them): exponent and four mantissa bits, 16 buckets per
/// octave of weight.
const TOP_P_BUCKET_SHIFT: u32 = 19;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no top-p cut.
    pub top_p: f32,
    /// 0 means no min-p cut.
    pub min_p: f32,
    /// 1 means none; applies to prompt and generated tokens.
    pub repetition_penalty: f32,
    /// Applies to generated tokens.
    pub presence_penalty: f32,
    /// Applies to generated tokens, per occurrence.
    pub frequency_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
    /// Alternatives to report per token (`Some(0)`: only the chosen token's logprob).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE
    }

    /// The device sampler's flat parameters of one draw: these minus the lists, with the
    /// draw's seed and index (`counter`: tokens generated so far).
    pub fn row_params(&self, seed: u64, counter: u64) -> RowParams {
        RowParams {
            seed,
            counter,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            num_top_logprobs: self.logprobs.unwrap_or(0),
        }
    }
}

/// What sampling one position produced.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub token_id: u32,
    /// Log-probability of `token_id` under the model (raw logits).
    pub logprob: f32,
    /// The most probable tokens and their logprobs, best first, when asked for.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// A sequence's sampling state: its generator and the tokens its penalties look at.
pub struct SequenceSampler {
    pub params: SamplingParams,
    rng: ChaCha8Rng,
    /// The seed of the device's counter-based draw (`row`): the request's seed mixed with
    /// the stream, or a random one.
    device_seed: u64,
    prompt_tokens: HashSet<u32>,
    output_counts: HashMap<u32, u32>,
    num_generated: usize,
    /// Tokens that may not be sampled while fewer than `suppress_until` exist (EOS and stop
    /// tokens under `min_tokens`).
    suppressed: Vec<u32>,
    suppress_until: usize,
}

impl SequenceSampler {
    /// `stream` tells apart the sequences of one request that share a seed (`n > 1`).
    pub fn new(params: SamplingParams, prompt: &[u32], stream: u64) -> Self {
        let rng = match params.seed {
            Some(seed) => {
                let mut r = ChaCha8Rng::seed_from_u64(seed);
                r.set_stream(stream);
                r
            }
            None => ChaCha8Rng::from_os_rng(),
        };
        let device_seed = match params.seed {
            // Distinct per stream; the draw mixes it again with its counter.
            Some(seed) => seed.wrapping_add(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            None => rand::random(),
        };
        let prompt_tokens = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Self {
            params,
            rng,
            device_seed,
            prompt_tokens,
            output_counts: HashMap::new(),
            num_generated: 0,
            suppressed: Vec::new(),
            suppress_until: 0,
        }
    }

    /// Forbids `ids` until `min_tokens` tokens have been generated.
    pub fn suppress_until(&mut self, ids: Vec<u32>, min_tokens: usize) {
        self.suppressed = ids;
        self.suppress_until = min_tokens;
    }

    /// Records a generated token for the penalties.
    pub fn observe(&mut self, token: u32) {
        *self.output_counts.entry(token).or_default() += 1;
        self.num_generated += 1;
    }

    /// Appends this sequence's row to a device sampling batch (`Backend::sample`): its
    /// parameters, the draw's counter (tokens generated so far), each token a penalty looks
    /// at once, the logit bias and, under `min_tokens`, the suppressed ids as `-inf`. The
    /// device's draw is not this sampler's generator: a seed gives other tokens than on the
    /// host (the same distribution). Call `observe` with the sampled token.
    pub fn row(&self, out: &mut SamplingBatch) {
        let p = &self.params;
        let row = p.row_params(self.device_seed, self.num_generated as u64);
        let counts = &self.output_counts;
        // `prompt_tokens` is empty unless a repetition penalty is set; the output tokens
        // matter to every penalty.
        let any_penalty =
            p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        let outputs = counts
            .iter()
            .filter(|_| any_penalty)
            .map(|(&t, &n)| PenaltyToken {
                token_id: t,
                count: n,
                in_prompt: self.prompt_tokens.contains(&t),
            });
        let prompt_only = self
            .prompt_tokens
            .iter()
            .filter(|t| !counts.contains_key(t))
            .map(|&t| PenaltyToken {
                token_id: t,
                count: 0,
                in_prompt: true,
            });
        let suppressed = (self.num_generated < self.suppress_until)
            .then_some(self.suppressed.iter().map(|&t| (t, f32::NEG_INFINITY)))
            .into_iter()
            .flatten();
        let bias = p.logit_bias.iter().copied().chain(suppressed);
        out.push_row(&row, outputs.chain(prompt_only), bias);
    }

    /// Samples the next token from `logits` (one row, modified in place), and records it.
    pub fn sample(&mut self, logits: &mut [f32], scratch: &mut SamplingScratch) -> SampledToken {
        // Logprobs describe the model's own distribution, so take them before any processor.
        let logprobs = self.params.logprobs.map(|k| {
            let (lse, top) = top_logprobs(logits, k);
            scratch.raw.clear();
            scratch.raw.extend_from_slice(logits);
            (lse, top)
        });
        self.apply_processors(logits);
        let token_id = if self.params.is_greedy() {
            argmax(logits)
        } else {
            self.sample_random(logits, scratch)
        };
        let (logprob, top) = match logprobs {
            Some((lse, top)) => (scratch.raw[token_id as usize] - lse, top),
            None => (0.0, Vec::new()),
        };
        self.observe(token_id);
        SampledToken {
            token_id,
            logprob,
            top_logprobs: top,
        }
    }

    fn apply_processors(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let penalize = |l: &mut f32| {
                if *l > 0.0 {
                    *l /= p.repetition_penalty
                } else {
                    *l *= p.repetition_penalty
                }
            };
            for &t in self.prompt_tokens.iter().chain(self.output_counts.keys()) {
                if let Some(l) = logits.get_mut(t as usize) {
                    penalize(l);
                }
            }
            // A token in both the prompt and the output was penalized twice above; undo one.
            for &t in self.output_counts.keys() {
                if self.prompt_tokens.contains(&t) {
                    if let Some(l) = logits.get_mut(t as usize) {
                        if *l > 0.0 {
                            *l *= p.repetition_penalty
                        } else {
                            *l /= p.repetition_penalty
                        }
                    }
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if self.num_generated < self.suppress_until {
            for &t in &self.suppressed {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }

    /// A draw at the sequence's temperature and cuts; `logits` may be overwritten.
    ///
    /// Every pass is over the whole row, in place, without index lists but for top-k's
    /// selection and the top-p cut's edge bucket: the row becomes its weights
    /// `exp((logit - max) / T)`, and a cut sets the weights it drops to zero.
    fn sample_random(&mut self, logits: &mut [f32], s: &mut SamplingScratch) -> u32 {
        let p = &self.params;
        if p.top_k > 0 {
            keep_top_k(logits, p.top_k, s);
        }
        let max = ops::max(logits);
        if !max.is_finite() {
            // No finite logit (all banned), or an infinite one that takes all the mass.
            return argmax(logits);
        }
        // NaN and -inf logits (broken or banned entries) weigh nothing.
        let weights = logits;
        let inv_t = 1.0 / p.temperature;
        if p.min_p <= 0.0 && p.top_p >= 1.0 {
            // Temperature alone (what most clients send): each chunk's sum, for the walk to
            // skip whole chunks, is taken in the same pass while the chunk is in cache.
            ops::softmax_weights_chunked(weights, max, inv_t, WALK_CHUNK, &mut s.chunk_sums);
        } else {
            softmax_weights(weights, max, inv_t);
            if p.min_p > 0.0 {
                // Relative to the most probable token: p_i / p_max = weight(i).
                for w in weights.iter_mut() {
                    if *w < p.min_p {
                        *w = 0.0;
                    }
                }
            }
            if p.top_p < 1.0 {
                top_p_cut(weights, p.top_p, s);
            }
            s.chunk_sums.clear();
            s.chunk_sums
                .extend(weights.chunks(WALK_CHUNK).map(ops::sum));
        }
        let total: f32 = s.chunk_sums.iter().sum();
        let mut u = self.rng.random::<f32>() * total;
        for (c, (chunk, &cs)) in weights.chunks(WALK_CHUNK).zip(&s.chunk_sums).enumerate() {
            if u > cs {
                u -= cs;
                continue;
            }
            for (j, &w) in chunk.iter().enumerate() {
                if w > 0.0 {
                    u -= w;
                    if u <= 0.0 {
                        return (c * WALK_CHUNK + j) as u32;
                    }
                }
            }
        }
        // Rounding left `u` a hair above zero: the last token with any weight.
        let last = weights.iter().rposition(|&w| w > 0.0);
        last.unwrap_or(0) as u32
    }
}

/// Sets every logit but the `k` largest finite ones to -inf.
fn keep_top_k(logits: &mut [f32], k: usize, s: &mut SamplingScratch) {
    s.pairs.clear();
    s.pairs.extend(
        logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l)),
    );
    if k >= s.pairs.len() {
        return;
    }
    s.pairs
        .select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
    logits.fill(f32::NEG_INFINITY);
    for &(i, l) in &s.pairs[..k] {
        logits[i as usize] = l;
    }
}

/// Zeroes all weights but the fewest largest ones that hold `top_p` of their total, in linear
/// time (sorting a 49,152-entry nucleus cost a millisecond a row): one pass sums the weight per
/// bucket of values, the buckets are walked down to the one where the running mass reaches
/// the target, and only that bucket's entries are sorted. Weights are in `[0, 1]`, so their
/// bit patterns order them, and a bucket is a pattern without its low bits.
fn top_p_cut(weights: &mut [f32], top_p: f32, s: &mut SamplingScratch) {
    let bucket = |w: f32| (w.to_bits() >> TOP_P_BUCKET_SHIFT) as usize;
    s.buckets.clear();
    s.buckets.resize(1 << (31 - TOP_P_BUCKET_SHIFT), 0.0);
    let mut total = 0.0f32;
    for &w in weights.iter().filter(|&&w| w > 0.0) {
        s.buckets[bucket(w)] += w;
        total += w;
    }
    let target = top_p * total;
    let mut above = 0.0f32;
    let Some(edge) = (0..s.buckets.len()).rev().find(|&b| {
        let reached = above + s.buckets[b] >= target;
        if !reached {
            above += s.buckets[b];
        }
        reached
    }) else {
        // Rounding kept the target out of reach: every weight stays.
        return;
    };
    // Weights above the edge bucket all stay; the edge's are ordered to find the cut.
    s.pairs.clear();
    for (i, w) in weights.iter_mut().enumerate() {
        if *w > 0.0 {
            match bucket(*w).cmp(&edge) {
                Ordering::Greater => {}
                Ordering::Equal => s.pairs.push((i as u32, *w)),
                Ordering::Less => *w = 0.0,
            }
        }
    }
    s.pairs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    let mut mass = above;
    for &(i, w) in &s.pairs {
        if mass >= target {
            weights[i as usize] = 0.0;
        }
        mass += w;
    }
}

/// Weights per chunk of a draw's walk.
const WALK_CHUNK: usize = 256;

/// Reused buffers of the sampler (one per engine).
#[derive(Default)]
pub struct SamplingScratch {
    /// Top-k's finite entries, and the top-p cut's edge bucket, as (id, value).
    pairs: Vec<(u32, f32)>,
    /// The top-p cut's weight per bucket of values.
    buckets: Vec<f32>,
    /// The raw logits row, kept when logprobs are asked for.
    raw: Vec<f32>,
    /// Per-chunk weight sums of a draw.
    chunk_sums: Vec<f32>,
}

/// Log-sum-exp of the row and its `k` best tokens as `(id, logprob)`.
fn top_logprobs(logits: &[f32], k: usize) -> (f32, Vec<(u32, f32)>) {
    let max = ops::max(logits);
    let lse = max + ops::sum_exp_shifted(logits, max).ln() as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &l) in logits.iter().enumerate() {
        if top.len() < k || top.last().is_some_and(|&(_, m)| l > m) {
            let at = top.partition_point(|&(_, m)| m >= l);
            top.insert(at, (i as u32, l));
            top.truncate(k);
        }
    }
    for t in &mut top {
        t.1 -= lse;
    }
    (lse, top)
}

/// The index of the largest value; the lowest index among equals.
pub fn argmax(v: &[f32]) -> u32 {
    ops::argmax(v) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bucketed cut keeps a top-p nucleus: the highest logits only, holding the target
    /// mass, and none it could spare (checked in f64, up to the f32 sums' rounding), on flat,
    /// peaked, tied and negative rows.
    #[test]
    fn top_p_cut_keeps_the_nucleus() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let rows: Vec<Vec<f32>> = vec![
            (0..49_152)
                .map(|_| rng.random_range(-12.0f32..4.0))
                .collect(),
            (0..49_152)
                .map(|i| rng.random_range(-12.0f32..4.0) + if i % 997 == 0 { 9.0 } else { 0.0 })
                .collect(),
            (0..5_000).map(|i| (i % 7) as f32 - 30.0).collect(),
            (0..3).map(|i| i as f32).collect(),
        ];
        for (r, row) in rows.iter().enumerate() {
            let max = ops::max(row);
            let weights: Vec<f32> = row.iter().map(|&l| (l - max).exp()).collect();
            let total: f64 = weights.iter().map(|&w| w as f64).sum();
            for top_p in [0.05f32, 0.5, 0.9, 0.999] {
                let mut cut = weights.clone();
                top_p_cut(&mut cut, top_p, &mut SamplingScratch::default());
                let kept = |i: &usize| cut[*i] > 0.0;
                assert!(
                    cut.iter().zip(&weights).all(|(c, w)| *c == 0.0 || c == w),
                    "row {r} p {top_p}: a kept weight changed"
                );
                let lowest_kept = (0..row.len())
                    .filter(kept)
                    .map(|i| row[i])
                    .fold(f32::MAX, f32::min);
                let highest_dropped = (0..row.len())
                    .filter(|i| !kept(i))
                    .map(|i| row[i])
                    .fold(f32::MIN, f32::max);
                assert!(
                    lowest_kept >= highest_dropped,
                    "row {r} p {top_p}: not a prefix"
                );
                let mass: f64 = cut.iter().map(|&w| w as f64).sum();
                let spare = mass - (lowest_kept - max).exp() as f64;
                let target = top_p as f64 * total;
                assert!(
                    mass >= target * (1.0 - 1e-4),
                    "row {r} p {top_p}: {mass} < {target}"
                );
                assert!(
                    spare < target * (1.0 + 1e-4),
                    "row {r} p {top_p}: {spare} would do"
                );
            }
        }
    }

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, -1.0, 2.5]
    }

    #[test]
    fn greedy_takes_the_max_and_reports_logprobs() {
        let mut s = SequenceSampler::new(
            SamplingParams {
                logprobs: Some(2),
                ..SamplingParams::greedy()
            },
            &[],
            0,
        );
        let out = s.sample(&mut logits(), &mut SamplingScratch::default());
        assert_eq!(out.token_id, 1);
        assert_eq!(
            out.top_logprobs.iter().map(|t| t.0).collect::<Vec<_>>(),
            [1, 4]
        );
        let lse = logits().iter().map(|x| x.exp()).sum::<f32>().ln();
        assert!((out.logprob - (3.0 - lse)).abs() < 1e-5);
    }

    #[test]
    fn same_seed_same_tokens() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..SamplingParams::default()
        };
        let run = || {
            let mut s = SequenceSampler::new(params.clone(), &[], 0);
            let mut scratch = SamplingScratch::default();
            (0..50)
                .map(|_| s.sample(&mut logits(), &mut scratch).token_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
        assert!(run().iter().collect::<HashSet<_>>().len() > 1);
    }

    #[test]
    fn top_k_and_min_p_and_bias_restrict_the_choice() {
        let mut scratch = SamplingScratch::default();
        let mut s = SequenceSampler::new(
            SamplingParams {
                top_k: 2,
                seed: Some(1),
                ..SamplingParams::default()
            },
            &[],
            0,
        );
        for _ in 0..100 {
            let t = s.sample(&mut logits(), &mut scratch).token_id;
            assert!(t == 1 || t == 4);
        }
        let mut s = SequenceSampler::new(
            SamplingParams {
                top_p: 0.4,
                seed: Some(1),
                ..SamplingParams::default()
            },
            &[],
            0,
        );
        for _ in 0..100 {
            assert_eq!(s.sample(&mut logits(), &mut scratch).token_id, 1);
        }
        let mut s = SequenceSampler::new(
            SamplingParams {
                logit_bias: vec![(3, 100.0)],
                ..SamplingParams::greedy()
            },
            &[],
            0,
        );
        assert_eq!(s.sample(&mut logits(), &mut scratch).token_id, 3);
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let mut scratch = SamplingScratch::default();
        let mut s = SequenceSampler::new(
            SamplingParams {
                frequency_penalty: 2.0,
                ..SamplingParams::greedy()
            },
            &[],
            0,
        );
        assert_eq!(s.sample(&mut logits(), &mut scratch).token_id, 1);
        // 3.0 - 2.0 = 1.0 < 2.5: token 4 wins next.
        assert_eq!(s.sample(&mut logits(), &mut scratch).token_id, 4);
        let mut s = SequenceSampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..SamplingParams::greedy()
            },
            &[1],
            0,
        );
        // 3.0 / 2 = 1.5 < 2.5.
        assert_eq!(s.sample(&mut logits(), &mut scratch).token_id, 4);
    }

    #[test]
    fn a_device_row_describes_the_same_processors() {
        use crate::kernels::sampling_reference;
        // Greedy after every processor: the reference over `row` picks what `sample` picks,
        // with the same logprob.
        let raw: Vec<f32> = (0..64)
            .map(|i| ((i * 37) % 23) as f32 * 0.25 - 2.0)
            .collect();
        let params = SamplingParams {
            repetition_penalty: 1.7,
            presence_penalty: 0.3,
            frequency_penalty: 0.4,
            logit_bias: vec![(5, 0.7), (9, -0.2), (5, 0.1)],
            logprobs: Some(2),
            ..SamplingParams::greedy()
        };
        let mut host = SequenceSampler::new(params.clone(), &[1, 2, 3, 40, 3], 0);
        host.suppress_until(vec![11, 12], 4);
        let mut scratch = SamplingScratch::default();
        for step in 0..8 {
            let mut batch = SamplingBatch::default();
            host.row(&mut batch);
            assert_eq!(batch.rows[0].counter, step);
            let device = sampling_reference::sample_rows(&raw, raw.len(), &batch);
            let want = host.sample(&mut raw.clone(), &mut scratch);
            assert_eq!(device[0].token_id, want.token_id, "step {step}");
            assert!((device[0].logprob - want.logprob).abs() < 1e-5);
            assert_eq!(device[0].top_logprobs.len(), 2);
            let suppressed = batch.bias_ids.iter().filter(|&&t| t == 11).count();
            assert_eq!(suppressed, usize::from(step < 4), "step {step}");
        }
        // No penalty: no penalty list, whatever was generated.
        let mut plain = SequenceSampler::new(SamplingParams::greedy(), &[1, 2], 0);
        plain.observe(7);
        let mut batch = SamplingBatch::default();
        plain.row(&mut batch);
        assert!(batch.penalty_ids.is_empty());
    }

    #[test]
    fn device_seeds_replay_and_differ_per_stream() {
        let p = SamplingParams {
            seed: Some(3),
            ..SamplingParams::default()
        };
        let seed = |stream| {
            let mut b = SamplingBatch::default();
            SequenceSampler::new(p.clone(), &[], stream).row(&mut b);
            b.rows[0].seed
        };
        assert_eq!(seed(0), seed(0));
        assert_ne!(seed(0), seed(1));
    }
}
