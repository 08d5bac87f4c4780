//! Background sequences (priority `i32::MAX`, batch and async jobs) yield to foreground
//! prefills: per step, who ran, and who was preempted. Block size 4.

use super::tests::{commit, ran, scheduler};
use super::*;

const BG: i32 = i32::MAX;

fn seq(seq_id: SeqId, first: u32, len: u32, priority: i32) -> NewSequence {
    NewSequence {
        seq_id,
        prompt_token_ids: (first..first + len).collect(),
        priority,
        prefix_cache: true,
    }
}

fn step(s: &mut Scheduler) -> StepPlan {
    let plan = s.schedule();
    commit(s, &plan);
    plan
}

#[test]
fn background_runs_alone_and_pauses_for_a_foreground_prefill() {
    let mut s = scheduler(20, 8);
    assert_eq!(s.add(seq(1, 0, 3, BG)), Ok(()));
    assert_eq!(ran(&step(&mut s)), [(1, 3)]);
    assert_eq!(ran(&step(&mut s)), [(1, 1)]);
    // An online prompt of 12 in chunks of 8: the background decode waits for both chunks,
    // then both decode together.
    assert_eq!(s.add(seq(2, 100, 12, 0)), Ok(()));
    assert_eq!(ran(&step(&mut s)), [(2, 8)]);
    assert_eq!(ran(&step(&mut s)), [(2, 4)]);
    assert_eq!(ran(&step(&mut s)), [(2, 1), (1, 1)]);
    assert_eq!(s.num_preemptions_total(), 0);
}

#[test]
fn a_foreground_decode_does_not_pause_background() {
    let mut s = scheduler(20, 8);
    let _ = s.add(seq(1, 0, 3, 0));
    let _ = s.add(seq(2, 100, 3, BG));
    // Both prefills in one step? No: the foreground prefill is pending, so the background
    // one waits for the next step.
    assert_eq!(ran(&step(&mut s)), [(1, 3)]);
    assert_eq!(ran(&step(&mut s)), [(1, 1), (2, 3)]);
    assert_eq!(ran(&step(&mut s)), [(1, 1), (2, 1)]);
}

#[test]
fn a_foreground_arrival_short_of_blocks_preempts_background() {
    // Four blocks: two background sequences of 8 tokens hold all of them.
    let mut s = scheduler(4, 32);
    let _ = s.add(seq(1, 0, 7, BG));
    let _ = s.add(seq(2, 100, 7, BG));
    assert_eq!(ran(&step(&mut s)), [(1, 7), (2, 7)]);
    assert_eq!(s.kv_cache().num_free_blocks(), 0);
    // An online prompt of 5 needs two blocks: the latest background sequence gives them up.
    let _ = s.add(seq(3, 200, 5, 0));
    let plan = step(&mut s);
    assert_eq!(ran(&plan), [(3, 5)]);
    assert_eq!(plan.preempted_seq_ids, [2]);
    // The other background sequence resumes as soon as no foreground prefill is pending.
    assert_eq!(ran(&step(&mut s)), [(3, 1), (1, 1)]);
}

#[test]
fn a_foreground_arrival_takes_a_background_seat() {
    let mut s = scheduler(40, 64);
    for id in 0..8 {
        let _ = s.add(seq(id, 10 * id as u32, 3, BG));
    }
    assert_eq!(step(&mut s).seqs.len(), 8);
    let _ = s.add(seq(9, 500, 3, 0));
    let plan = step(&mut s);
    assert_eq!(ran(&plan), [(9, 3)]);
    assert_eq!(plan.preempted_seq_ids, [7]);
}

#[test]
fn off_without_a_background_priority() {
    let mut s = Scheduler::new(
        SchedulerConfig {
            max_num_batched_tokens: 8,
            max_num_seqs: 8,
            background_priority: None,
            ..SchedulerConfig::default()
        },
        crate::kv_cache::CacheConfig {
            block_size: 4,
            num_blocks: 20,
            enable_prefix_caching: true,
            sliding_window: None,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let _ = s.add(seq(1, 0, 3, BG));
    step(&mut s);
    let _ = s.add(seq(2, 100, 12, 0));
    assert_eq!(ran(&step(&mut s)), [(1, 1), (2, 7)]);
}
