//! Running ahead (`set_run_ahead`): a decode of the token the step in flight samples, planned
//! before that step is committed; finishing at the older step drops it without a leak.

use super::*;

fn scheduler(num_blocks: usize, budget: usize) -> Scheduler {
    let mut s = super::tests::scheduler(num_blocks, budget);
    s.set_run_ahead(true);
    s
}

fn add(s: &mut Scheduler, seq_id: SeqId, len: u32) {
    let seq = NewSequence {
        seq_id,
        prompt_token_ids: (100 * seq_id as u32..100 * seq_id as u32 + len).collect(),
        priority: 0,
        prefix_cache: true,
    };
    s.add(seq).unwrap_or_else(|e| panic!("{e}"));
}

/// `(seq_id, start, end, run_ahead)` per entry.
fn ran(plan: &StepPlan) -> Vec<(SeqId, usize, usize, bool)> {
    plan.seqs
        .iter()
        .map(|e| (e.seq_id, e.start, e.end, e.run_ahead))
        .collect()
}

/// Commits with token `t` for every sampled sequence still known.
fn commit(s: &mut Scheduler, plan: &StepPlan, t: u32) {
    let sampled: Vec<(SeqId, u32)> = plan
        .seqs
        .iter()
        .filter(|e| e.sample && s.token_ids(e.seq_id).is_some())
        .map(|e| (e.seq_id, t))
        .collect();
    s.commit(plan, &sampled).unwrap_or_else(|e| panic!("{e}"));
    s.check_invariants().unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_sampled_sequence_decodes_one_step_ahead() {
    let mut s = scheduler(10, 64);
    add(&mut s, 1, 6);
    let a = s.schedule();
    assert_eq!(ran(&a), vec![(1, 0, 6, false)]);
    // A is in flight and samples position 6's token: B decodes it, id unknown.
    let b = s.schedule();
    assert_eq!(ran(&b), vec![(1, 6, 7, true)]);
    assert!(b.seqs[0].token_ids.is_empty() && b.seqs[0].sample);
    assert_eq!(b.seqs[0].block_table.len(), 2);
    // Only one step ahead: nothing more while both are uncommitted.
    assert!(s.schedule().seqs.is_empty());
    commit(&mut s, &a, 7);
    commit(&mut s, &b, 8);
    assert_eq!(s.token_ids(1).map(<[u32]>::len), Some(8));
    assert_eq!(s.token_ids(1).map(|t| t[6..].to_vec()), Some(vec![7, 8]));
    // Nothing in flight: the next decode is an ordinary one, with its token known.
    let c = s.schedule();
    assert_eq!(ran(&c), vec![(1, 7, 8, false)]);
    assert_eq!(c.seqs[0].token_ids, vec![8]);
}

#[test]
fn finishing_at_the_older_step_drops_the_run_ahead_token_and_its_blocks() {
    let mut s = scheduler(10, 64);
    add(&mut s, 1, 8);
    add(&mut s, 2, 3);
    let a = s.schedule();
    let b = s.schedule();
    // Seq 1's run-ahead token opens its third block.
    assert_eq!(ran(&b), vec![(1, 8, 9, true), (2, 3, 4, true)]);
    assert_eq!(s.kv_cache().num_free_blocks(), 10 - 3 - 1);
    commit(&mut s, &a, 7);
    // The engine sees a stop in seq 1's token from A and finishes it.
    s.finish(1);
    commit(&mut s, &b, 9);
    assert!(s.token_ids(1).is_none());
    assert_eq!(s.token_ids(2).map(<[u32]>::len), Some(5));
    s.finish(2);
    assert_eq!(s.kv_cache().num_free_blocks(), 10);
    s.check_invariants().unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_run_ahead_never_preempts_and_a_chunk_in_flight_is_not_run_ahead() {
    // Two blocks: seq 1 fills both with 8 prompt tokens; its run-ahead needs a third.
    let mut s = scheduler(3, 64);
    add(&mut s, 1, 8);
    add(&mut s, 2, 4);
    let a = s.schedule();
    assert_eq!(s.kv_cache().num_free_blocks(), 0);
    let b = s.schedule();
    assert!(b.seqs.is_empty() && b.preempted_seq_ids.is_empty());
    commit(&mut s, &a, 7);
    s.finish(2);
    commit(&mut s, &b, 0);
    // A prompt chunk in flight (budget 4 of 9 tokens) samples nothing: no run-ahead.
    let mut s = scheduler(10, 4);
    add(&mut s, 3, 9);
    let a = s.schedule();
    assert_eq!(ran(&a), vec![(3, 0, 4, false)]);
    assert!(s.schedule().seqs.is_empty());
    commit(&mut s, &a, 0);
    assert_eq!(ran(&s.schedule()), vec![(3, 4, 8, false)]);
}
