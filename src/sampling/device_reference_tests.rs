//! The device sampler's host reference (`kernels::sampling_reference`) held against the host
//! sampler (`sampling::host`): the same
//! token for greedy rows after penalties and bias, the same logprobs, and for filtered rows the
//! same kept set with the same probabilities (the two draw from different generators, so the
//! comparison is of distributions, over thousands of seeds).

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::kernels::sampling::{PenaltyToken, SampleRow, SamplingBatch};
use crate::kernels::sampling_reference::*;
use crate::sampling::{SamplingParams, SamplingScratch, SequenceSampler};

const VOCAB: usize = 500;

fn logits(seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..VOCAB).map(|_| rng.random_range(-6.0f32..6.0)).collect()
}

/// A prompt and generated tokens, and the sampler that has seen them.
struct History {
    prompt: Vec<u32>,
    generated: Vec<u32>,
}

impl History {
    fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x55);
        Self {
            prompt: (0..12).map(|_| rng.random_range(0..VOCAB as u32)).collect(),
            // A narrow range, so that some tokens repeat and some are also in the prompt.
            generated: (0..10).map(|_| rng.random_range(0..40)).collect(),
        }
    }

    fn sampler(&self, params: SamplingParams) -> SequenceSampler {
        let mut s = SequenceSampler::new(params, &self.prompt, 0);
        for &t in &self.generated {
            s.observe(t);
        }
        s
    }

    /// Each token the penalties look at, once.
    fn penalties(&self) -> Vec<PenaltyToken> {
        let mut m: HashMap<u32, (u32, bool)> = HashMap::new();
        for &t in &self.prompt {
            m.entry(t).or_default().1 = true;
        }
        for &t in &self.generated {
            m.entry(t).or_default().0 += 1;
        }
        let mut v: Vec<PenaltyToken> = m
            .into_iter()
            .map(|(token_id, (count, in_prompt))| PenaltyToken {
                token_id,
                count,
                in_prompt,
            })
            .collect();
        v.sort_by_key(|t| t.token_id);
        v
    }
}

fn batch_of(p: &SamplingParams, h: &History) -> SamplingBatch {
    let mut b = SamplingBatch::default();
    b.push(p.device_row(1, 0), &h.penalties(), &p.logit_bias);
    b
}

#[test]
fn splitmix64_is_the_standard_generator() {
    // The first output of splitmix64 seeded with 0 (Vigna's reference implementation).
    assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
    for c in 0..1000 {
        let u = uniform01(42, c);
        assert!((0.0..1.0).contains(&u), "{u}");
    }
    assert!(order_key(-1.0) < order_key(-0.5));
    assert!(order_key(-0.0) < order_key(0.0));
    assert!(order_key(0.5) < order_key(1.0));
    assert!(order_key(f32::NEG_INFINITY) < order_key(-1e30));
}

#[test]
fn greedy_rows_match_the_host_sampler() {
    let cases = [
        SamplingParams::greedy(),
        SamplingParams {
            repetition_penalty: 1.3,
            presence_penalty: 0.5,
            frequency_penalty: 0.4,
            logit_bias: vec![(3, 2.5), (7, -100.0), (3, 0.5)],
            logprobs: Some(5),
            ..SamplingParams::greedy()
        },
        SamplingParams {
            repetition_penalty: 0.7,
            logprobs: Some(0),
            logit_bias: vec![(11, 20.0)],
            ..SamplingParams::greedy()
        },
    ];
    let mut scratch = SamplingScratch::default();
    for seed in 0..20 {
        for (ci, p) in cases.iter().enumerate() {
            let h = History::new(seed);
            let raw = logits(seed);
            let want = h
                .sampler(p.clone())
                .sample(&mut raw.clone(), &mut scratch)
                .unwrap();
            let got = sample_row(&raw, &batch_of(p, &h), 0);
            let ctx = format!("seed {seed} case {ci}");
            assert_eq!(got.token_id, want.token_id, "{ctx}");
            if p.logprobs.is_some() {
                assert!((got.logprob - want.logprob).abs() < 1e-4, "{ctx}");
                assert_eq!(got.top_logprobs.len(), want.top_logprobs.len(), "{ctx}");
                for (g, w) in got.top_logprobs.iter().zip(&want.top_logprobs) {
                    assert_eq!(g.0, w.0, "{ctx}");
                    assert!((g.1 - w.1).abs() < 1e-4, "{ctx}: {g:?} vs {w:?}");
                }
            }
        }
    }
}

/// Draws `n` tokens from the host sampler (fresh seed each) and checks each lies in the
/// reference's kept set and that the frequencies fit the reference's probabilities.
fn check_distribution(p: &SamplingParams, seed: u64) {
    const N: usize = 4000;
    let h = History::new(seed);
    let raw = logits(seed);
    let batch = batch_of(p, &h);
    let probs = probabilities(&raw, &batch, 0);
    let kept = probs.iter().filter(|&&x| x > 0.0).count();
    assert!(kept > 1, "{p:?}: the case should keep several tokens");
    let mut scratch = SamplingScratch::default();
    let mut host = vec![0usize; VOCAB];
    let mut reference = vec![0usize; VOCAB];
    for i in 0..N as u64 {
        let params = SamplingParams {
            seed: Some(i),
            ..p.clone()
        };
        let t = h
            .sampler(params)
            .sample(&mut raw.clone(), &mut scratch)
            .unwrap()
            .token_id;
        assert!(probs[t as usize] > 0.0, "{p:?}: host drew {t}, cut here");
        host[t as usize] += 1;
        let mut b = SamplingBatch::default();
        b.push(p.device_row(7, i), &h.penalties(), &p.logit_bias);
        reference[sample_row(&raw, &b, 0).token_id as usize] += 1;
    }
    for (t, &pt) in probs.iter().enumerate() {
        // Five standard deviations of a binomial count, plus one draw.
        let bound = 5.0 * (pt * (1.0 - pt) / N as f64).sqrt() + 1.0 / N as f64;
        for (who, counts) in [("host", &host), ("reference", &reference)] {
            let f = counts[t] as f64 / N as f64;
            assert!(
                (f - pt).abs() <= bound,
                "{p:?}: {who} drew token {t} at {f}, reference probability {pt}"
            );
        }
    }
}

#[test]
fn filtered_rows_keep_the_host_samplers_set_and_probabilities() {
    let base = SamplingParams {
        temperature: 0.8,
        ..SamplingParams::default()
    };
    let cases = [
        SamplingParams {
            top_k: 20,
            ..base.clone()
        },
        SamplingParams {
            top_p: 0.8,
            ..base.clone()
        },
        SamplingParams {
            min_p: 0.05,
            ..base.clone()
        },
        SamplingParams {
            temperature: 1.5,
            top_k: 50,
            top_p: 0.9,
            min_p: 0.02,
            repetition_penalty: 1.2,
            presence_penalty: 0.3,
            frequency_penalty: 0.2,
            logit_bias: vec![(5, 3.0), (9, f32::NEG_INFINITY)],
            ..base.clone()
        },
    ];
    for (i, p) in cases.iter().enumerate() {
        check_distribution(p, 100 + i as u64);
    }
}

#[test]
fn the_draw_replays_by_seed_and_counter_and_suppression_holds() {
    let raw = logits(3);
    let mut b = SamplingBatch::default();
    let p = SampleRow {
        seed: 9,
        counter: 4,
        temperature: 1.0,
        ..SampleRow::default()
    };
    b.push(p, &[], &[]);
    b.push(p, &[], &[]);
    let best = sample_row(&raw, &b, 0).token_id;
    b.push(p, &[], &[(best, f32::NEG_INFINITY)]);
    let rows = sample_rows(&[raw.clone(), raw.clone(), raw].concat(), VOCAB, &b);
    assert_eq!(rows[0], rows[1]);
    assert_ne!(rows[2].token_id, best);
}
