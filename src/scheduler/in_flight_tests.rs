//! Steps in flight (pipeline parallelism): disjoint micro-batches, out-of-order commits, and
//! no preemption of a sequence whose step has not come back.

use super::tests::{commit, ran};
use super::*;

fn scheduler(num_blocks: usize, budget: usize) -> Scheduler {
    let mut s = super::tests::scheduler(num_blocks, budget);
    s.set_max_in_flight(2);
    s
}

fn add(s: &mut Scheduler, seq_id: SeqId, first: u32, len: u32) {
    let seq = NewSequence {
        seq_id,
        prompt_token_ids: (first..first + len).collect(),
        priority: 0,
        prefix_cache: true,
    };
    s.add(seq).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn micro_batches_in_flight_are_disjoint_and_commit_in_any_order() {
    let mut s = scheduler(10, 2);
    for id in 1..=4 {
        add(&mut s, id, 100 * id as u32, 1);
    }
    // Budget 2: the first step takes 1 and 2; the next, planned before the first is
    // committed, skips them and takes 3 and 4.
    let a = s.schedule();
    assert_eq!(ran(&a), vec![(1, 1), (2, 1)]);
    assert!(s.is_in_flight(1) && s.is_in_flight(2));
    let b = s.schedule();
    assert_eq!(ran(&b), vec![(3, 1), (4, 1)]);
    // Everybody is in flight: the next plan is empty.
    assert!(s.schedule().seqs.is_empty());
    commit(&mut s, &a);
    assert!(!s.is_in_flight(1));
    let c = s.schedule();
    assert_eq!(ran(&c), vec![(1, 1), (2, 1)]);
    commit(&mut s, &b);
    commit(&mut s, &c);
    assert_eq!(ran(&s.schedule()), vec![(1, 1), (2, 1)]);
}

#[test]
fn a_sequence_in_flight_is_never_preempted() {
    // Four blocks of 4 tokens.
    let mut s = scheduler(4, 64);
    add(&mut s, 1, 0, 7);
    let p = s.schedule();
    commit(&mut s, &p);
    // Step A: seq 1 decodes position 7 (its second block has room); not committed yet.
    let a = s.schedule();
    assert_eq!(ran(&a), vec![(1, 1)]);
    // Seq 2, first in priority order, arrives and takes the two free blocks in step B.
    let seq = NewSequence {
        seq_id: 2,
        prompt_token_ids: (100..108).collect(),
        priority: -1,
        prefix_cache: true,
    };
    s.add(seq).unwrap_or_else(|e| panic!("{e}"));
    let b = s.schedule();
    assert_eq!(ran(&b), vec![(2, 8)]);
    commit(&mut s, &b);
    // Step C: seq 2's decode needs a fifth block. The last in order, seq 1, would be the
    // victim, but its step A is still in flight: seq 2 gives way itself.
    let c = s.schedule();
    assert!(c.seqs.is_empty());
    assert_eq!(c.preempted_seq_ids, vec![2]);
    assert!(s.is_in_flight(1));
    commit(&mut s, &a);
    assert_eq!(s.num_running(), 1);
}

#[test]
fn aborting_a_sequence_in_flight_forgets_it() {
    let mut s = scheduler(10, 8);
    add(&mut s, 1, 0, 2);
    let a = s.schedule();
    assert!(s.is_in_flight(1));
    s.abort(1);
    assert!(!s.is_in_flight(1));
    // Its plan comes back after the abort: the sequence is skipped.
    commit(&mut s, &a);
}
