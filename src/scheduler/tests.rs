//! Unit tests: block size 4, ten blocks; per step, who ran with how many tokens, exact blocks.

use super::*;

pub(super) fn scheduler(num_blocks: usize, budget: usize) -> Scheduler {
    let config = SchedulerConfig {
        max_num_batched_tokens: budget,
        max_num_seqs: 8,
        ..SchedulerConfig::default()
    };
    let cache = CacheConfig {
        block_size: 4,
        num_blocks,
        enable_prefix_caching: true,
        sliding_window: None,
    };
    Scheduler::new(config, cache).unwrap_or_else(|e| panic!("{e}"))
}

fn make_seq(seq_id: SeqId, tokens: &[u32]) -> NewSequence {
    NewSequence {
        seq_id,
        prompt_token_ids: tokens.to_vec(),
        priority: 0,
        prefix_cache: true,
    }
}

fn prompt(first: u32, len: u32) -> Vec<u32> {
    (first..first + len).collect()
}

/// Who ran this step, and with how many tokens.
pub(super) fn ran(plan: &StepPlan) -> Vec<(SeqId, usize)> {
    plan.seqs
        .iter()
        .map(|s| (s.seq_id, s.num_tokens()))
        .collect()
}

/// Commits `plan` as a fake runner would, sampling token `1000 + seq_id`.
pub(super) fn commit(s: &mut Scheduler, plan: &StepPlan) {
    let sampled: Vec<(SeqId, u32)> = plan
        .seqs
        .iter()
        .filter(|e| e.sample)
        .map(|e| (e.seq_id, 1000 + e.seq_id as u32))
        .collect();
    if let Err(e) = s.commit(plan, &sampled) {
        panic!("{e}");
    }
    if let Err(e) = s.check_invariants() {
        panic!("{e}");
    }
}

fn step(s: &mut Scheduler) -> StepPlan {
    let plan = s.schedule();
    commit(s, &plan);
    plan
}

fn table(plan: &StepPlan, seq_id: SeqId) -> Vec<u32> {
    plan.seqs
        .iter()
        .find(|e| e.seq_id == seq_id)
        .map(|e| e.block_table.clone())
        .unwrap_or_default()
}

#[test]
fn prefill_then_decode_with_exact_blocks() {
    let mut s = scheduler(10, 64);
    assert_eq!(s.add(make_seq(1, &prompt(0, 6))), Ok(()));
    let plan = step(&mut s);
    assert_eq!(ran(&plan), vec![(1, 6)]);
    assert_eq!(plan.seqs[0].start, 0);
    assert_eq!(plan.seqs[0].token_ids, prompt(0, 6));
    assert_eq!(plan.seqs[0].block_table, vec![0, 1]);
    assert!(plan.seqs[0].sample);
    let plan = step(&mut s);
    assert_eq!(ran(&plan), vec![(1, 1)]);
    assert_eq!((plan.seqs[0].start, plan.seqs[0].end), (6, 7));
    assert_eq!(plan.seqs[0].token_ids, vec![1001]);
    assert_eq!(s.token_ids(1), Some(&[0, 1, 2, 3, 4, 5, 1001, 1001][..]));
    assert_eq!(s.finish(1).map(|st| st.num_computed_prompt_tokens), Some(6));
    assert_eq!(s.kv_cache().num_free_blocks(), 10);
    assert_eq!(s.check_invariants(), Ok(()));
}

#[test]
fn chunked_prefill_never_stalls_a_decode() {
    let mut s = scheduler(10, 8);
    let _ = s.add(make_seq(1, &prompt(0, 3)));
    step(&mut s);
    let _ = s.add(make_seq(2, &prompt(100, 20)));
    // Seq 1 decodes every step; seq 2 gets the rest of the budget: 7 + 7 + 6.
    let chunks: Vec<_> = (0..4).map(|_| ran(&step(&mut s))).collect();
    assert_eq!(
        chunks,
        vec![
            vec![(1, 1), (2, 7)],
            vec![(1, 1), (2, 7)],
            vec![(1, 1), (2, 6)],
            vec![(1, 1), (2, 1)],
        ]
    );
}

#[test]
fn chunk_cap_splits_prefills_between_prompts() {
    let mut s = scheduler(10, 16);
    s.config.max_prefill_chunk_tokens = 5;
    let _ = s.add(make_seq(1, &prompt(0, 8)));
    let _ = s.add(make_seq(2, &prompt(50, 8)));
    assert_eq!(ran(&step(&mut s)), vec![(1, 5), (2, 5)]);
    let plan = step(&mut s);
    assert_eq!(ran(&plan), vec![(1, 3), (2, 3)]);
    assert!(plan.seqs.iter().all(|e| e.sample));
}

#[test]
fn without_chunking_a_prompt_waits_for_room() {
    let mut s = scheduler(10, 8);
    s.config.enable_chunked_prefill = false;
    let _ = s.add(make_seq(1, &prompt(0, 3)));
    step(&mut s);
    let _ = s.add(make_seq(2, &prompt(100, 8)));
    // 7 tokens left after the decode: the 8-token prompt waits, the 5-token one does not.
    let _ = s.add(make_seq(3, &prompt(200, 5)));
    assert_eq!(ran(&step(&mut s)), vec![(1, 1)]);
    assert_eq!(s.num_waiting(), 2);
    // A prompt larger than the whole budget is chunked anyway.
    let mut s = scheduler(10, 8);
    s.config.enable_chunked_prefill = false;
    let _ = s.add(make_seq(1, &prompt(0, 12)));
    assert_eq!(ran(&step(&mut s)), vec![(1, 8)]);
    assert_eq!(ran(&step(&mut s)), vec![(1, 4)]);
}

#[test]
fn prefix_hit_computes_only_the_rest() {
    let mut s = scheduler(10, 64);
    let _ = s.add(make_seq(1, &prompt(0, 10)));
    step(&mut s);
    let _ = s.add(make_seq(2, &prompt(0, 10)));
    let plan = step(&mut s);
    assert_eq!(ran(&plan), vec![(1, 1), (2, 2)]);
    assert_eq!(plan.seqs[1].start, 8);
    // Seq 1's third block (positions 8..12) still has room for its decode; seq 2 gets block 3.
    assert_eq!(table(&plan, 2), vec![0, 1, 3]);
    let stats = s.seq_stats(2).unwrap_or_default();
    assert_eq!(
        (stats.cached_tokens, stats.num_computed_prompt_tokens),
        (8, 2)
    );
    assert_eq!(s.prefix_cache_stats().num_hit_tokens, 8);
    // Freed and readmitted: still a hit, until evicted.
    s.finish(1);
    s.finish(2);
    let _ = s.add(make_seq(3, &prompt(0, 9)));
    assert_eq!(step(&mut s).seqs[0].start, 8);
}

#[test]
fn shared_thousand_token_prefix_is_computed_once() {
    let cache = CacheConfig {
        block_size: 16,
        num_blocks: 200,
        enable_prefix_caching: true,
        sliding_window: None,
    };
    let mut s = Scheduler::new(SchedulerConfig::default(), cache).unwrap_or_else(|e| panic!("{e}"));
    let prefix = prompt(0, 1000);
    let with_suffix = |x: u32| [prefix.clone(), vec![x; 10]].concat();
    let _ = s.add(make_seq(1, &with_suffix(1)));
    step(&mut s);
    for id in 2..=4 {
        let _ = s.add(make_seq(id, &with_suffix(id as u32)));
    }
    step(&mut s);
    // 1010 for the first; the others hit 62 blocks (992 tokens) and compute 18 each.
    assert_eq!(s.counters().num_computed_prompt_tokens_total, 1010 + 3 * 18);
    assert_eq!(s.seq_stats(4).map(|st| st.cached_tokens), Some(992));
}

#[test]
fn preemption_takes_lowest_priority_then_latest_arrival() {
    let mut s = scheduler(10, 64);
    let with_priority = |id, first, priority| NewSequence {
        priority,
        prefix_cache: true,
        ..make_seq(id, &prompt(first, 12))
    };
    let _ = s.add(with_priority(1, 0, 1));
    let _ = s.add(with_priority(2, 100, 0));
    let _ = s.add(with_priority(3, 200, 0));
    // Order: 2, 3 (priority 0, by arrival), then 1. Nine blocks used.
    assert_eq!(ran(&step(&mut s)), vec![(2, 12), (3, 12), (1, 12)]);
    // Each needs a fourth block, one is free: 2 takes it, 3 preempts 1, the lowest priority.
    let plan = step(&mut s);
    assert_eq!(ran(&plan), vec![(2, 1), (3, 1)]);
    assert_eq!(plan.preempted_seq_ids, vec![1]);
    assert_eq!(table(&plan, 2), vec![0, 1, 2, 9]);
    assert_eq!(table(&plan, 3), vec![3, 4, 5, 8]);
    assert_eq!(s.num_preemptions_total(), 1);
    assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
    // Among equal priorities the latest arrival goes: seq 3 gives way to seq 2.
    s.finish(2);
    let _ = s.add(with_priority(4, 300, 0));
    let _ = s.add(with_priority(5, 400, -1));
    // Six blocks free: 5 (priority -1) and then 4 are admitted; 1 (priority 1), first to
    // arrive, still waits.
    assert_eq!(ran(&step(&mut s)), vec![(3, 1), (5, 12), (4, 12)]);
    assert_eq!(s.num_waiting(), 1);
}

#[test]
fn preempted_sequence_recomputes_from_its_prefix_hits() {
    let mut s = scheduler(6, 64);
    let _ = s.add(make_seq(1, &prompt(0, 12)));
    let _ = s.add(make_seq(2, &prompt(100, 11)));
    assert_eq!(ran(&step(&mut s)), vec![(1, 12), (2, 11)]);
    // 1 needs a fourth block, none free: 2 is preempted.
    let plan = step(&mut s);
    assert_eq!(
        (ran(&plan), plan.preempted_seq_ids.clone()),
        (vec![(1, 1)], vec![2])
    );
    s.finish(1);
    // 2 comes back with 12 tokens; its two full blocks are still cached.
    let plan = step(&mut s);
    assert_eq!(ran(&plan), vec![(2, 4)]);
    assert_eq!(plan.seqs[0].start, 8);
    let stats = s.seq_stats(2).unwrap_or_default();
    assert_eq!((stats.cached_tokens, stats.num_preemptions), (0, 1));
}

#[test]
fn abort_frees_blocks_in_the_same_step() {
    let mut s = scheduler(4, 64);
    let _ = s.add(make_seq(1, &prompt(0, 16)));
    let _ = s.add(make_seq(2, &prompt(100, 8)));
    assert_eq!(ran(&step(&mut s)), vec![(1, 16)]);
    assert_eq!(s.abort(1).map(|st| st.num_computed_prompt_tokens), Some(16));
    assert_eq!(s.kv_cache().num_free_blocks(), 4);
    assert_eq!(ran(&step(&mut s)), vec![(2, 8)]);
    assert_eq!(s.abort(1), None);
}

#[test]
fn fork_shares_the_prompt_and_copies_on_write() {
    let mut s = scheduler(10, 64);
    assert_eq!(s.add_group(make_seq(1, &prompt(0, 6)), &[2, 3]), Ok(()));
    assert_eq!(s.num_waiting(), 3);
    // The prompt but its last token, computed once, nothing sampled.
    let plan = step(&mut s);
    assert_eq!(ran(&plan), vec![(1, 5)]);
    assert!(!plan.seqs[0].sample);
    assert_eq!(s.num_running(), 3);
    assert_eq!(s.kv_cache().pool().ref_cnt(1), 3);
    // Each writes position 5 in shared block 1: two copies, the last writes in place.
    let plan = step(&mut s);
    assert_eq!(ran(&plan), vec![(1, 1), (2, 1), (3, 1)]);
    assert!(plan.seqs.iter().all(|e| e.sample && e.start == 5));
    assert_eq!(plan.block_copies, vec![(1, 2), (1, 3)]);
    assert_eq!(table(&plan, 1), vec![0, 2]);
    assert_eq!(table(&plan, 2), vec![0, 3]);
    assert_eq!(table(&plan, 3), vec![0, 1]);
    assert_eq!(s.kv_cache().pool().ref_cnt(0), 3);
    assert_eq!(s.counters().num_computed_prompt_tokens_total, 8);
    for id in 1..=3 {
        s.finish(id);
    }
    assert_eq!(s.kv_cache().num_free_blocks(), 10);
}

#[test]
fn group_forks_at_admission_when_hits_reach_the_fork_point() {
    let mut s = scheduler(10, 64);
    let _ = s.add(make_seq(1, &prompt(0, 9)));
    step(&mut s);
    s.finish(1);
    // 9 tokens: hits cover 8 = the fork point. Forked on admission, run next step.
    let _ = s.add_group(make_seq(2, &prompt(0, 9)), &[3]);
    assert_eq!(ran(&step(&mut s)), vec![]);
    assert_eq!(s.num_running(), 2);
    assert_eq!(ran(&step(&mut s)), vec![(2, 1), (3, 1)]);
    assert_eq!(s.seq_stats(3).map(|st| st.cached_tokens), Some(8));
}

#[test]
fn aborting_a_group_leader_hands_the_group_over() {
    let mut s = scheduler(10, 4);
    let _ = s.add_group(make_seq(1, &prompt(0, 10)), &[2, 3]);
    assert_eq!(ran(&step(&mut s)), vec![(1, 4)]);
    s.abort(1);
    assert_eq!(s.abort(3), Some(SeqStats::default()));
    assert_eq!((s.num_running(), s.num_waiting()), (0, 1));
    // Seq 2 takes over and reuses the block seq 1 cached.
    let plan = step(&mut s);
    assert_eq!((ran(&plan), plan.seqs[0].start), (vec![(2, 4)], 4));
    assert_eq!(ran(&step(&mut s)), vec![(2, 2)]);
    assert_eq!(s.num_running(), 1);
}

#[test]
fn a_sequence_too_large_for_the_pool_is_reported() {
    let mut s = scheduler(10, 64);
    assert_eq!(
        s.add(make_seq(1, &prompt(0, 41))),
        Err(SchedulerError::TooLong {
            seq_id: 1,
            num_blocks_needed: 11,
            num_blocks: 10
        })
    );
    assert!(matches!(
        s.add_group(make_seq(1, &prompt(0, 37)), &[2, 3]),
        Err(SchedulerError::TooLong { .. })
    ));
    // 39 tokens fit; the 41st position does not: dropped, blocks back.
    let _ = s.add(make_seq(1, &prompt(0, 39)));
    step(&mut s);
    step(&mut s);
    let plan = step(&mut s);
    assert_eq!(
        (ran(&plan), plan.too_long_seq_ids.clone()),
        (vec![], vec![1])
    );
    assert!(!s.has_unfinished());
    assert_eq!(s.kv_cache().num_free_blocks(), 10);
}

#[test]
fn respects_max_num_seqs_and_rejects_bad_input() {
    let mut s = scheduler(10, 64);
    for id in 0..10 {
        let _ = s.add(make_seq(id, &[id as u32]));
    }
    assert_eq!(step(&mut s).seqs.len(), 8);
    assert_eq!(
        s.add(make_seq(3, &[1])),
        Err(SchedulerError::DuplicateSeqId(3))
    );
    assert_eq!(
        s.add(make_seq(20, &[])),
        Err(SchedulerError::EmptyPrompt(20))
    );
    assert_eq!(
        s.add_group(make_seq(20, &[1]), &[21, 20]),
        Err(SchedulerError::DuplicateSeqId(20))
    );
    assert!(matches!(
        s.add_group(make_seq(20, &[1]), &(21..30).collect::<Vec<_>>()),
        Err(SchedulerError::GroupTooLarge { .. })
    ));
}

#[test]
fn commit_rejects_stale_plans_and_wrong_samples() {
    let mut s = scheduler(10, 64);
    let _ = s.add(make_seq(1, &prompt(0, 3)));
    let plan = s.schedule();
    assert_eq!(s.commit(&plan, &[]), Err(SchedulerError::MissingSample(1)));
    assert_eq!(
        s.commit(&plan, &[(2, 5)]),
        Err(SchedulerError::UnexpectedSample(2))
    );
    assert_eq!(
        s.commit(&plan, &[(1, 5), (1, 6)]),
        Err(SchedulerError::UnexpectedSample(1))
    );
    // Nothing was applied; a new schedule makes this plan stale.
    let again = s.schedule();
    assert_eq!(ran(&again), vec![(1, 3)]);
    assert!(matches!(
        s.commit(&plan, &[(1, 5)]),
        Err(SchedulerError::StalePlan { .. })
    ));
    assert_eq!(s.commit(&again, &[(1, 5)]), Ok(()));
    assert_eq!(s.token_ids(1), Some(&[0, 1, 2, 5][..]));
    // Aborted between schedule and commit: skipped.
    let plan = s.schedule();
    s.abort(1);
    assert_eq!(s.commit(&plan, &[(1, 7)]), Ok(()));
    assert_eq!(s.check_invariants(), Ok(()));
}

#[test]
fn unforked_group_members_hold_their_seats() {
    let mut s = scheduler(20, 64);
    s.config.max_prefill_chunk_tokens = 4;
    let _ = s.add_group(make_seq(1, &prompt(0, 10)), &[2, 3, 4, 5, 6, 7]);
    let _ = s.add(make_seq(10, &prompt(100, 2)));
    let _ = s.add(make_seq(11, &prompt(200, 2)));
    // Seven seats for the group, one for seq 10; seq 11 waits although only 2 run.
    assert_eq!(ran(&step(&mut s)), vec![(1, 4), (10, 2)]);
    assert_eq!((s.num_running(), s.num_waiting()), (2, 7));
}

#[test]
fn without_chunking_a_started_prefill_keeps_going() {
    let mut s = scheduler(20, 8);
    s.config.enable_chunked_prefill = false;
    let _ = s.add(make_seq(1, &prompt(0, 3)));
    let _ = s.add(make_seq(2, &prompt(50, 3)));
    step(&mut s);
    // 14 tokens exceed the whole budget, so the prompt is split; once started it continues
    // in whatever the two decodes leave.
    let _ = s.add(make_seq(3, &prompt(100, 14)));
    assert_eq!(ran(&step(&mut s)), vec![(1, 1), (2, 1), (3, 6)]);
    assert_eq!(ran(&step(&mut s)), vec![(1, 1), (2, 1), (3, 6)]);
    assert_eq!(ran(&step(&mut s)), vec![(1, 1), (2, 1), (3, 2)]);
}

#[test]
fn commit_rejects_a_tampered_range() {
    let mut s = scheduler(10, 64);
    let _ = s.add(make_seq(1, &prompt(0, 3)));
    let mut plan = s.schedule();
    plan.seqs[0].end = 9;
    assert!(matches!(
        s.commit(&plan, &[(1, 5)]),
        Err(SchedulerError::StalePlan { .. })
    ));
    assert_eq!(s.check_invariants(), Ok(()));
}

/// With a window of 6 on every layer (blocks of 4), a 40-token prompt runs in a 3-block
/// pool: the first chunk fills the pool, later ones are cut to what the window leaves, and
/// the sequence never holds more than the pool.
#[test]
fn a_sliding_window_runs_a_prompt_longer_than_the_pool() {
    let config = SchedulerConfig {
        max_num_batched_tokens: 64,
        ..SchedulerConfig::default()
    };
    let cache = CacheConfig {
        block_size: 4,
        num_blocks: 3,
        enable_prefix_caching: true,
        sliding_window: Some(6),
    };
    let mut s = Scheduler::new(config, cache).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.add(make_seq(1, &prompt(0, 40))), Ok(()));
    let mut chunks = Vec::new();
    while chunks.iter().sum::<usize>() < 44 {
        let plan = step(&mut s);
        let Some(e) = plan.seqs.iter().find(|e| e.seq_id == 1) else {
            panic!("the sequence did not run: {:?}", ran(&plan));
        };
        assert_eq!(e.start, chunks.iter().sum::<usize>());
        let held = e.block_table.iter().filter(|&&b| b != u32::MAX).count();
        assert!(held <= 3, "holds {held} blocks at {}", e.start);
        chunks.push(e.num_tokens());
    }
    assert_eq!(chunks[..3], [12, 4, 4]);
    assert!(chunks[8..].iter().all(|&n| n == 1), "{chunks:?}");
}
