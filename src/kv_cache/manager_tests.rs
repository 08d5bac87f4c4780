//! Unit tests of `KvCacheManager`: block size 4, ten blocks, exact block ids.

use super::*;

fn manager(num_blocks: usize, caching: bool) -> KvCacheManager {
    let config = CacheConfig {
        block_size: 4,
        num_blocks,
        enable_prefix_caching: caching,
        sliding_window: None,
    };
    KvCacheManager::new(config).unwrap_or_else(|e| panic!("{e}"))
}

/// Admits `seq_id` with its prefix hits and all its tokens, as the scheduler would, then marks
/// every token computed.
fn admit_all(kv: &mut KvCacheManager, seq_id: SeqId, tokens: &[u32]) -> Option<ComputedBlocks> {
    let hits = kv.computed_blocks(tokens);
    let n = hits.num_computed_tokens;
    kv.allocate_slots(seq_id, n, tokens.len() - n, Some(&hits))?;
    kv.cache_full_blocks(seq_id, tokens, tokens.len());
    Some(hits)
}

fn ok(kv: &KvCacheManager) {
    if let Err(e) = kv.check_invariants() {
        panic!("{e}");
    }
}

#[test]
fn allocates_block_ids_in_order_and_frees_all() {
    let mut kv = manager(10, false);
    assert_eq!(kv.allocate_slots(1, 0, 9, None), Some(vec![]));
    assert_eq!(kv.block_table(1), Some(&[0, 1, 2][..]));
    // 9 computed + 3 new = 12 tokens: still three blocks.
    assert_eq!(kv.allocate_slots(1, 9, 3, None), Some(vec![]));
    assert_eq!(kv.block_table(1), Some(&[0, 1, 2][..]));
    assert_eq!(kv.allocate_slots(1, 12, 1, None), Some(vec![]));
    assert_eq!(kv.block_table(1), Some(&[0, 1, 2, 3][..]));
    assert_eq!(kv.num_free_blocks(), 6);
    ok(&kv);
    assert!(kv.free(1));
    assert!(!kv.free(1));
    assert_eq!(kv.num_free_blocks(), 10);
    // Tail first: block 3 is now the most likely to be evicted among the freed ones.
    assert_eq!(
        kv.pool().free_block_ids(),
        vec![4, 5, 6, 7, 8, 9, 3, 2, 1, 0]
    );
    ok(&kv);
}

#[test]
fn none_when_blocks_run_out_and_nothing_changes() {
    let mut kv = manager(3, false);
    assert!(kv.allocate_slots(1, 0, 8, None).is_some());
    assert_eq!(kv.allocate_slots(2, 0, 5, None), None);
    assert!(!kv.has_table(2));
    assert_eq!(kv.allocate_slots(1, 8, 5, None), None);
    assert_eq!(kv.block_table(1), Some(&[0, 1][..]));
    assert_eq!(kv.num_free_blocks(), 1);
    ok(&kv);
}

#[test]
fn prefix_hit_reuses_full_blocks_but_not_the_last_token() {
    let mut kv = manager(10, true);
    let prompt: Vec<u32> = (100..110).collect(); // 10 tokens: 2 full blocks + 2
    admit_all(&mut kv, 1, &prompt);
    assert_eq!(kv.block_table(1), Some(&[0, 1, 2][..]));

    // Same 10 tokens: both full blocks hit.
    let hits = kv.computed_blocks(&prompt);
    assert_eq!(hits.block_ids, vec![0, 1]);
    assert_eq!(hits.num_computed_tokens, 8);

    // Exactly 8 tokens: only the first block, so the last token is computed.
    let hits = kv.computed_blocks(&prompt[..8]);
    assert_eq!(hits.block_ids, vec![0]);

    // A different second block: one hit.
    let mut other = prompt.clone();
    other[5] = 7;
    assert_eq!(kv.computed_blocks(&other).block_ids, vec![0]);

    let hits = admit_all(&mut kv, 2, &prompt).unwrap_or_default();
    assert_eq!(hits.num_computed_tokens, 8);
    assert_eq!(kv.block_table(2), Some(&[0, 1, 3][..]));
    assert_eq!(kv.pool().ref_cnt(0), 2);
    assert_eq!(kv.pool().ref_cnt(1), 2);
    assert_eq!(
        kv.prefix_cache_stats(),
        PrefixCacheStats {
            num_query_tokens: 20,
            num_hit_tokens: 8
        }
    );
    ok(&kv);
}

#[test]
fn freed_cached_blocks_are_reused_until_evicted_tail_first() {
    let mut kv = manager(4, true);
    let prompt: Vec<u32> = (0..13).collect(); // blocks 0,1,2 full, block 3 partial
    admit_all(&mut kv, 1, &prompt);
    kv.free(1);
    assert_eq!(kv.pool().free_block_ids(), vec![3, 2, 1, 0]);
    assert_eq!(kv.computed_blocks(&prompt).block_ids, vec![0, 1, 2]);

    // A newcomer needing two blocks evicts block 3 (unhashed) and block 2 (the prefix tail).
    assert!(kv.allocate_slots(2, 0, 8, None).is_some());
    assert_eq!(kv.block_table(2), Some(&[3, 2][..]));
    assert_eq!(kv.computed_blocks(&prompt).block_ids, vec![0, 1]);
    assert_eq!(kv.pool().num_evictions(), 1);
    ok(&kv);
}

#[test]
fn admission_counts_free_cached_hits_against_the_pool() {
    let mut kv = manager(4, true);
    let prompt: Vec<u32> = (0..9).collect();
    admit_all(&mut kv, 1, &prompt);
    kv.free(1);
    // Hits are blocks 0 and 1 (free, cached); 9 tokens need one more block: 3 of 4 free.
    let hits = kv.computed_blocks(&prompt);
    assert_eq!(hits.block_ids, vec![0, 1]);
    assert!(kv.allocate_slots(2, 8, 1, Some(&hits)).is_some());
    // Free queue was [3, 2, 1, 0]; 0 and 1 are taken back, the new block comes from the head.
    assert_eq!(kv.block_table(2), Some(&[0, 1, 3][..]));
    // Another 9-token prompt with no hits needs 3 blocks, only 1 is free.
    let other: Vec<u32> = (50..59).collect();
    let hits = kv.computed_blocks(&other);
    assert!(hits.block_ids.is_empty());
    assert_eq!(kv.allocate_slots(3, 0, 9, Some(&hits)), None);
    ok(&kv);
}

#[test]
fn fork_shares_blocks_and_copies_the_partial_one_on_write() {
    let mut kv = manager(10, true);
    let prompt: Vec<u32> = (0..6).collect(); // block 0 full, block 1 holds 2 tokens
    admit_all(&mut kv, 1, &prompt);
    assert_eq!(kv.fork(1, 2), Ok(()));
    assert_eq!(kv.fork(1, 2), Err(KvCacheError::SequenceExists(2)));
    assert_eq!(kv.fork(9, 3), Err(KvCacheError::UnknownSequence(9)));
    assert_eq!(kv.block_table(2), Some(&[0, 1][..]));
    assert_eq!(kv.pool().ref_cnt(1), 2);

    // The child writes position 6, inside shared block 1: it gets block 2 and a copy 1 -> 2.
    assert_eq!(kv.allocate_slots(2, 6, 1, None), Some(vec![(1, 2)]));
    assert_eq!(kv.block_table(2), Some(&[0, 2][..]));
    assert_eq!(kv.pool().ref_cnt(1), 1);
    assert_eq!(kv.pool().ref_cnt(0), 2);
    // The parent is now the only holder of block 1 and writes in place.
    assert_eq!(kv.allocate_slots(1, 6, 1, None), Some(vec![]));
    assert_eq!(kv.block_table(1), Some(&[0, 1][..]));
    ok(&kv);
    kv.free(1);
    kv.free(2);
    assert_eq!(kv.num_free_blocks(), 10);
    ok(&kv);
}

#[test]
fn cow_needs_a_free_block() {
    let mut kv = manager(2, false);
    assert!(kv.allocate_slots(1, 0, 6, None).is_some());
    let _ = kv.fork(1, 2);
    assert_eq!(kv.allocate_slots(2, 6, 1, None), None);
    assert_eq!(kv.block_table(2), Some(&[0, 1][..]));
    ok(&kv);
}

#[test]
fn no_cow_at_a_block_boundary() {
    let mut kv = manager(10, false);
    assert!(kv.allocate_slots(1, 0, 8, None).is_some());
    let _ = kv.fork(1, 2);
    assert_eq!(kv.allocate_slots(2, 8, 1, None), Some(vec![]));
    assert_eq!(kv.block_table(2), Some(&[0, 1, 2][..]));
    ok(&kv);
}

#[test]
fn disabled_prefix_caching_finds_nothing() {
    let mut kv = manager(10, false);
    let prompt: Vec<u32> = (0..9).collect();
    admit_all(&mut kv, 1, &prompt);
    assert_eq!(kv.computed_blocks(&prompt).num_computed_tokens, 0);
    assert_eq!(kv.pool().block_hash(0), None);
}

#[test]
fn duplicate_prefix_computed_twice_is_not_cached_twice() {
    let mut kv = manager(10, true);
    let prompt: Vec<u32> = (0..5).collect();
    // Both admitted before either computed anything: no hits for the second.
    assert!(kv.allocate_slots(1, 0, 5, None).is_some());
    assert!(kv.allocate_slots(2, 0, 5, None).is_some());
    kv.cache_full_blocks(1, &prompt, 5);
    kv.cache_full_blocks(2, &prompt, 5);
    assert_eq!(kv.computed_blocks(&prompt).block_ids, vec![0]);
    assert_eq!(kv.pool().block_hash(2), None);
    ok(&kv);
    kv.free(1);
    kv.free(2);
    ok(&kv);
}

/// Block size 4, window 6: a query at `p` reads keys `p - 5..=p`. Scheduling from `pos` gives
/// back the blocks wholly before the window of `pos - 1` (a step in flight may compute it);
/// fork, truncate and free skip their places, and the hashed ones stay in the prefix cache.
#[test]
fn a_sliding_window_gives_back_the_blocks_before_it() {
    let config = CacheConfig {
        block_size: 4,
        num_blocks: 10,
        enable_prefix_caching: true,
        sliding_window: Some(6),
    };
    let mut kv = KvCacheManager::new(config).unwrap();
    let tokens: Vec<u32> = (100..120).collect();
    assert!(kv.allocate_slots(1, 0, 10, None).is_some());
    kv.cache_full_blocks(1, &tokens, 10);
    assert_eq!(kv.block_table(1), Some(&[0, 1, 2][..]));
    // Position 9 reads keys 4..=9: block 0 (positions 0..4) is no longer needed.
    assert!(kv.allocate_slots(1, 10, 1, None).is_some());
    assert_eq!(kv.block_table(1), Some(&[RELEASED, 1, 2][..]));
    assert_eq!(kv.num_free_blocks(), 8);
    ok(&kv);
    kv.cache_full_blocks(1, &tokens, 16);
    // Position 15 reads keys 10..=15, from block 2 on.
    assert!(kv.allocate_slots(1, 16, 1, None).is_some());
    assert_eq!(kv.block_table(1), Some(&[RELEASED, RELEASED, 2, 3, 4][..]));
    assert_eq!(kv.num_free_blocks(), 7);
    ok(&kv);
    assert_eq!(kv.computed_blocks(&tokens[..9]).block_ids, vec![0, 1]);
    kv.fork(1, 2).unwrap();
    kv.truncate(2, 13);
    assert_eq!(kv.block_table(2), Some(&[RELEASED, RELEASED, 2, 3][..]));
    ok(&kv);
    assert!(kv.free(1) && kv.free(2));
    assert_eq!(kv.num_free_blocks(), 10);
    ok(&kv);
}
