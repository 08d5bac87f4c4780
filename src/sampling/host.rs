//! The host sampler: one row of logits into one token, per sequence. Logit processors
//! (repetition, presence and frequency penalties, logit bias), then greedy or temperature
//! sampling with top-k, top-p and min-p, from a per-sequence seeded generator, so that a seed
//! gives the same tokens whatever else shares the batch. Logprobs are those of the model's own
//! distribution (log-softmax of the raw logits), as vLLM reports by default.
//!
//! On a backend that samples on the device, a sampler only describes its row
//! (`SequenceSampler::device_row`) and `observe`s the id that comes back; the draw is the
//! device's counter-based one (`kernels::sampling`).
//!
//! A sequence under a grammar (`Constraint`) checks the draw first: the unconstrained token
//! is kept when the grammar allows it (most tokens inside a string or a number), and only on
//! a rejection is the grammar's mask computed, the row masked (-inf) and drawn again, from
//! the same generator (so a seed still replays). llama.cpp and mistral.rs do the same; a
//! mask per token measured slower (`docs/benchmarks.md`). A complete grammar forces EOS.
//! Logprobs stay those of the raw logits (before the mask), as vLLM's default reports them.
//! On the device, the row carries the grammar's forbidden ids as `-inf` bias instead (a mask
//! every step: the device's draw cannot be checked and redrawn).

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::constraint::{Constraint, ConstraintError};
use super::params::{SampledToken, SamplingParams};
use crate::kernels::cpu::ops::{self, softmax_weights};
use crate::kernels::sampling::{PenaltyToken, SamplingBatch};

/// The top-p cut's buckets are a weight's bit pattern without its low bits (weights are in
/// `[0, 1]`, so the patterns order them): exponent and four mantissa bits, 16 buckets per
/// octave of weight.
const TOP_P_BUCKET_SHIFT: u32 = 19;

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
    /// The grammar the output must match, if any.
    constraint: Option<Constraint>,
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
            constraint: None,
        }
    }

    /// Constrains every token drawn from now on to `constraint`'s grammar.
    pub fn constrain(&mut self, constraint: Constraint) {
        self.constraint = Some(constraint);
    }

    /// Records a token the device drew (`device_row`'s mask allowed it): the penalties see
    /// it, the grammar consumes it.
    pub fn observe_drawn(&mut self, token: u32) -> Result<(), ConstraintError> {
        if let Some(c) = &mut self.constraint {
            if !c.is_complete() {
                c.commit(token)?;
            }
        }
        self.observe(token);
        Ok(())
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
    /// Under a grammar, the ids it forbids next (of `row_len`) are `-inf` bias too.
    pub fn device_row(&mut self, out: &mut SamplingBatch, row_len: usize) {
        // A failed mask leaves the row free; `observe_drawn` then fails the sequence.
        let forbidden = match &mut self.constraint {
            Some(c) => c.forbidden(row_len).unwrap_or_default(),
            None => Vec::new(),
        };
        let p = &self.params;
        let row = p.device_row(self.device_seed, self.num_generated as u64);
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
        let masked = forbidden.into_iter().map(|t| (t, f32::NEG_INFINITY));
        let bias = p.logit_bias.iter().copied().chain(suppressed).chain(masked);
        out.push_row(row, outputs.chain(prompt_only), bias);
    }

    /// Samples the next token from `logits` (one row, modified in place), and records it.
    /// Fails only when the sequence's grammar does.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        scratch: &mut SamplingScratch,
    ) -> Result<SampledToken, ConstraintError> {
        // Logprobs describe the model's own distribution, so take them before any processor.
        let logprobs = self.params.logprobs.map(|k| {
            let (lse, top) = top_logprobs(logits, k);
            scratch.raw.clear();
            scratch.raw.extend_from_slice(logits);
            (lse, top)
        });
        self.apply_processors(logits);
        let token_id = match self.constraint.take() {
            None => self.draw(logits, scratch),
            Some(mut c) => {
                let drawn = self.draw_constrained(&mut c, logits, scratch);
                self.constraint = Some(c);
                drawn?
            }
        };
        let (logprob, top) = match logprobs {
            Some((lse, top)) => (scratch.raw[token_id as usize] - lse, top),
            None => (0.0, Vec::new()),
        };
        self.observe(token_id);
        Ok(SampledToken {
            token_id,
            logprob,
            top_logprobs: top,
        })
    }

    fn draw(&mut self, logits: &mut [f32], scratch: &mut SamplingScratch) -> u32 {
        if self.params.is_greedy() {
            argmax(logits)
        } else {
            self.sample_random(logits, scratch)
        }
    }

    /// The draw under a grammar: check first, mask and redraw on a rejection, and commit the
    /// token to the grammar. Where the processors left no allowed token a finite logit (EOS
    /// under `min_tokens`, say), the grammar wins: its first allowed id.
    fn draw_constrained(
        &mut self,
        c: &mut Constraint,
        logits: &mut [f32],
        s: &mut SamplingScratch,
    ) -> Result<u32, ConstraintError> {
        if c.is_complete() {
            return Ok(c.eos_token_id());
        }
        // A random draw overwrites the row with weights: keep the processed logits to redraw.
        let greedy = self.params.is_greedy();
        if !greedy {
            s.processed.clear();
            s.processed.extend_from_slice(logits);
        }
        let first = self.draw(logits, s);
        if c.try_commit(first)? {
            return Ok(first);
        }
        if !greedy {
            logits.copy_from_slice(&s.processed);
        }
        let fallback = c.mask_row(logits)?;
        let token_id = if ops::max(logits) == f32::NEG_INFINITY {
            fallback
        } else {
            self.draw(logits, s)
        };
        c.commit(token_id)?;
        Ok(token_id)
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
    /// The processed row of a constrained draw, to redraw from after a rejection.
    processed: Vec<f32>,
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
#[path = "host_tests.rs"]
mod tests;
