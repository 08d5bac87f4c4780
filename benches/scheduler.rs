//! One scheduler step with 256 running decoding sequences (16-token blocks, 128-token
//! prompts): `schedule()` alone, and `schedule()` + `commit()`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use sluice::kv_cache::CacheConfig;
use sluice::scheduler::{NewSequence, Scheduler, SchedulerConfig, SeqId, StepPlan};

const NUM_SEQS: u64 = 256;

fn samples(plan: &StepPlan) -> Vec<(SeqId, u32)> {
    plan.seqs
        .iter()
        .filter(|e| e.sample)
        .map(|e| (e.seq_id, 7))
        .collect()
}

/// 256 sequences, prefilled and decoding.
fn decoding_scheduler() -> Scheduler {
    let cache = CacheConfig {
        block_size: 16,
        num_blocks: 8192,
        enable_prefix_caching: true,
        sliding_window: None,
    };
    let mut s = Scheduler::new(SchedulerConfig::default(), cache).unwrap_or_else(|e| panic!("{e}"));
    for id in 0..NUM_SEQS {
        let prompt: Vec<u32> = (0..128).map(|i| (id as u32) * 1000 + i).collect();
        let seq = NewSequence {
            seq_id: id,
            prompt_token_ids: prompt,
            priority: 0,
            prefix_cache: true,
        };
        s.add(seq).unwrap_or_else(|e| panic!("{e}"));
    }
    // Prefill everyone; stop once a step is one decode token per sequence.
    loop {
        let plan = s.schedule();
        if plan.seqs.len() == NUM_SEQS as usize && plan.num_batched_tokens == NUM_SEQS as usize {
            return s;
        }
        s.commit(&plan, &samples(&plan))
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

fn bench(c: &mut Criterion) {
    let mut s = decoding_scheduler();
    let plan = s.schedule();
    assert_eq!(plan.seqs.len(), NUM_SEQS as usize);
    assert_eq!(plan.num_batched_tokens, NUM_SEQS as usize);

    // Without commit the state does not move, so every call plans the same decode step.
    c.bench_function("schedule_256_decoding", |b| {
        b.iter(|| black_box(s.schedule()))
    });

    let mut base = decoding_scheduler();
    base.schedule();
    c.bench_function("schedule_commit_256_decoding", |b| {
        b.iter_batched_ref(
            || base.clone(),
            |s| {
                let plan = s.schedule();
                let sampled = samples(&plan);
                s.commit(&plan, &sampled).unwrap_or_else(|e| panic!("{e}"));
            },
            BatchSize::LargeInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
