//! Drafts (speculative decoding): scheduled after the last token when blocks and budget
//! allow, never preempting; rejected tokens' slots and blocks given back at commit.

use super::tests::{commit, ran, scheduler};
use super::*;

fn admitted_decoding(s: &mut Scheduler, seq_id: SeqId, prompt_len: u32) {
    // Distinct prompts: no prefix-cache sharing between sequences.
    let first = seq_id as u32 * 100;
    let prompt: Vec<u32> = (first..first + prompt_len).collect();
    s.add(NewSequence {
        seq_id,
        prompt_token_ids: prompt,
        priority: 0,
        prefix_cache: true,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let plan = s.schedule();
    commit(s, &plan);
}

#[test]
fn a_draft_is_verified_and_its_rejected_slots_given_back() {
    // Block size 4. Prompt of 6 + 1 sampled token: 7 tokens, 6 computed (blocks 0, 1).
    let mut s = scheduler(10, 64);
    admitted_decoding(&mut s, 1, 6);
    s.set_draft(1, &[7, 8, 9, 10, 11]);
    let plan = s.schedule();
    assert_eq!(ran(&plan), vec![(1, 6)]);
    let e = &plan.seqs[0];
    assert_eq!((e.start, e.end, e.known_end()), (6, 12, 7));
    assert_eq!(e.token_ids, vec![1001]);
    assert_eq!(e.draft_token_ids, vec![7, 8, 9, 10, 11]);
    assert_eq!(e.block_table, vec![0, 1, 2]);
    // Two drafts accepted, then the target's own token: 3 tokens, 9 computed.
    s.commit(&plan, &[(1, 7), (1, 8), (1, 42)]).unwrap();
    s.check_invariants().unwrap();
    assert_eq!(s.token_ids(1).unwrap()[6..], [1001, 7, 8, 42]);
    // Positions 0..9 stay: blocks 0..2, nothing given back (block 2 holds position 8).
    assert_eq!(s.kv_cache().block_table(1).unwrap(), [0, 1, 2]);
    // A draft rejected at once gives back the block only it had touched.
    s.set_draft(1, &[5, 6, 7, 8]);
    let plan = s.schedule();
    assert_eq!(plan.seqs[0].block_table, vec![0, 1, 2, 3]);
    s.commit(&plan, &[(1, 50)]).unwrap();
    s.check_invariants().unwrap();
    assert_eq!(s.kv_cache().block_table(1).unwrap(), [0, 1, 2]);
    assert_eq!(s.kv_cache().num_free_blocks(), 7);
    // The next step decodes the new last token at position 10, as without a draft.
    let plan = s.schedule();
    assert_eq!((plan.seqs[0].start, plan.seqs[0].end), (10, 11));
    assert!(plan.seqs[0].draft_token_ids.is_empty());
}

#[test]
fn commit_refuses_tokens_the_draft_did_not_propose() {
    let mut s = scheduler(10, 64);
    admitted_decoding(&mut s, 1, 6);
    s.set_draft(1, &[7, 8]);
    let plan = s.schedule();
    // More tokens than the draft allows, or an "accepted" token that differs.
    let too_many = [(1, 7), (1, 8), (1, 9), (1, 10)];
    assert_eq!(
        s.commit(&plan, &too_many),
        Err(SchedulerError::UnexpectedSample(1))
    );
    assert_eq!(
        s.commit(&plan, &[(1, 7), (1, 9), (1, 3)]),
        Err(SchedulerError::DraftMismatch(1))
    );
    s.commit(&plan, &[(1, 7), (1, 8), (1, 3)]).unwrap();
    s.check_invariants().unwrap();
}

#[test]
fn a_draft_never_preempts_and_fits_the_budget() {
    // 4 blocks: two sequences of 7 tokens hold 2 blocks each, none free.
    let mut s = scheduler(4, 64);
    admitted_decoding(&mut s, 1, 6);
    admitted_decoding(&mut s, 2, 6);
    assert_eq!(s.kv_cache().num_free_blocks(), 0);
    s.set_draft(1, &[1, 2, 3]);
    let plan = s.schedule();
    // No block for the draft: the plain decode, nobody preempted.
    assert_eq!(ran(&plan), vec![(1, 1), (2, 1)]);
    assert!(plan.preempted_seq_ids.is_empty());
    commit(&mut s, &plan);
    // A budget of 3 tokens: the draft is cut to what is left after the other decode.
    let mut s = scheduler(10, 3);
    admitted_decoding(&mut s, 1, 2);
    admitted_decoding(&mut s, 2, 2);
    s.set_draft(2, &[1, 2, 3, 4]);
    let plan = s.schedule();
    assert_eq!(ran(&plan), vec![(1, 1), (2, 2)]);
    assert_eq!(plan.seqs[1].draft_token_ids, vec![1]);
}

#[test]
fn a_draft_set_before_the_prompt_is_computed_is_ignored() {
    let mut s = scheduler(10, 64);
    s.add(NewSequence {
        seq_id: 1,
        prompt_token_ids: (0..6).collect(),
        priority: 0,
        prefix_cache: true,
    })
    .unwrap();
    s.set_draft(1, &[1, 2]);
    let plan = s.schedule();
    assert_eq!(ran(&plan), vec![(1, 6)]);
    assert!(plan.seqs[0].draft_token_ids.is_empty());
    commit(&mut s, &plan);
}
