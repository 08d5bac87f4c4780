//! The host sampler's tests.
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
    let out = s
        .sample(&mut logits(), &mut SamplingScratch::default())
        .unwrap();
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
            .map(|_| s.sample(&mut logits(), &mut scratch).unwrap().token_id)
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
        let t = s.sample(&mut logits(), &mut scratch).unwrap().token_id;
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
        assert_eq!(s.sample(&mut logits(), &mut scratch).unwrap().token_id, 1);
    }
    let mut s = SequenceSampler::new(
        SamplingParams {
            logit_bias: vec![(3, 100.0)],
            ..SamplingParams::greedy()
        },
        &[],
        0,
    );
    assert_eq!(s.sample(&mut logits(), &mut scratch).unwrap().token_id, 3);
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
    assert_eq!(s.sample(&mut logits(), &mut scratch).unwrap().token_id, 1);
    // 3.0 - 2.0 = 1.0 < 2.5: token 4 wins next.
    assert_eq!(s.sample(&mut logits(), &mut scratch).unwrap().token_id, 4);
    let mut s = SequenceSampler::new(
        SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        },
        &[1],
        0,
    );
    // 3.0 / 2 = 1.5 < 2.5.
    assert_eq!(s.sample(&mut logits(), &mut scratch).unwrap().token_id, 4);
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
        host.device_row(&mut batch, 0);
        assert_eq!(batch.rows[0].counter, step);
        let device = sampling_reference::sample_rows(&raw, raw.len(), &batch);
        let want = host.sample(&mut raw.clone(), &mut scratch).unwrap();
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
    plain.device_row(&mut batch, 0);
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
        SequenceSampler::new(p.clone(), &[], stream).device_row(&mut b, 0);
        b.rows[0].seed
    };
    assert_eq!(seed(0), seed(0));
    assert_ne!(seed(0), seed(1));
}
