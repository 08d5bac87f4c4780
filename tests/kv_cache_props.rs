//! Property tests of the KV-cache manager: after any sequence of admit / append / fork / free
//! (evictions happen inside allocation), the invariants hold, and a fake backend that writes
//! each token id into its slot always reads back every sequence's computed tokens, so
//! copy-on-write and prefix reuse never hand out wrong content. Once every sequence is freed,
//! every block is free.

use proptest::prelude::*;
use sluice::kv_cache::{CacheConfig, KvCacheManager, SeqId};

const BLOCK_SIZE: usize = 4;

#[derive(Debug, Clone)]
enum Op {
    /// A new sequence with this prompt (small alphabet, so prefixes repeat).
    Admit(Vec<u32>),
    /// The `i % live`-th sequence computes `n` more tokens.
    Append(usize, Vec<u32>),
    Fork(usize),
    Free(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let tokens = |max| prop::collection::vec(0u32..3, 1..max);
    prop_oneof![
        3 => tokens(20).prop_map(Op::Admit),
        4 => (any::<usize>(), tokens(7)).prop_map(|(i, t)| Op::Append(i, t)),
        1 => any::<usize>().prop_map(Op::Fork),
        2 => any::<usize>().prop_map(Op::Free),
    ]
}

struct Seq {
    id: SeqId,
    tokens: Vec<u32>,
}

/// A fake backend: the token id stored in each slot.
struct Backend {
    slots: Vec<Option<u32>>,
}

impl Backend {
    fn write(&mut self, table: &[u32], tokens: &[u32], from: usize) {
        for (p, &t) in tokens.iter().enumerate().skip(from) {
            self.slots[table[p / BLOCK_SIZE] as usize * BLOCK_SIZE + p % BLOCK_SIZE] = Some(t);
        }
    }
    fn copy(&mut self, copies: &[(u32, u32)]) {
        for &(src, dst) in copies {
            for o in 0..BLOCK_SIZE {
                self.slots[dst as usize * BLOCK_SIZE + o] =
                    self.slots[src as usize * BLOCK_SIZE + o];
            }
        }
    }
    fn check(&self, kv: &KvCacheManager, seq: &Seq) -> Result<(), TestCaseError> {
        let table = kv.block_table(seq.id).unwrap_or_default();
        for (p, &t) in seq.tokens.iter().enumerate() {
            let slot = table[p / BLOCK_SIZE] as usize * BLOCK_SIZE + p % BLOCK_SIZE;
            prop_assert_eq!(self.slots[slot], Some(t), "seq {} position {}", seq.id, p);
        }
        Ok(())
    }
}

fn run(ops: Vec<Op>, num_blocks: usize, caching: bool) -> Result<(), TestCaseError> {
    let config = CacheConfig {
        block_size: BLOCK_SIZE,
        num_blocks,
        enable_prefix_caching: caching,
        sliding_window: None,
    };
    let mut kv = KvCacheManager::new(config).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut backend = Backend {
        slots: vec![None; num_blocks * BLOCK_SIZE],
    };
    let mut live: Vec<Seq> = Vec::new();
    let mut next_id: SeqId = 0;
    for op in ops {
        match op {
            Op::Admit(tokens) => {
                let hits = kv.computed_blocks(&tokens);
                let n = hits.num_computed_tokens;
                prop_assert!(n < tokens.len());
                if kv
                    .allocate_slots(next_id, n, tokens.len() - n, Some(&hits))
                    .is_some()
                {
                    let seq = Seq {
                        id: next_id,
                        tokens,
                    };
                    // Hit blocks must already hold the prompt's first tokens.
                    let prefix = Seq {
                        id: seq.id,
                        tokens: seq.tokens[..n].to_vec(),
                    };
                    backend.check(&kv, &prefix)?;
                    backend.write(kv.block_table(seq.id).unwrap_or_default(), &seq.tokens, n);
                    kv.cache_full_blocks(seq.id, &seq.tokens, seq.tokens.len());
                    live.push(seq);
                } else {
                    prop_assert!(!kv.has_table(next_id));
                }
                next_id += 1;
            }
            Op::Append(i, new_tokens) if !live.is_empty() => {
                let num_live = live.len();
                let seq = &mut live[i % num_live];
                let from = seq.tokens.len();
                if let Some(copies) = kv.allocate_slots(seq.id, from, new_tokens.len(), None) {
                    backend.copy(&copies);
                    seq.tokens.extend(&new_tokens);
                    backend.write(
                        kv.block_table(seq.id).unwrap_or_default(),
                        &seq.tokens,
                        from,
                    );
                    kv.cache_full_blocks(seq.id, &seq.tokens, seq.tokens.len());
                }
            }
            Op::Fork(i) if !live.is_empty() => {
                let parent = &live[i % live.len()];
                prop_assert!(kv.fork(parent.id, next_id).is_ok());
                let child = Seq {
                    id: next_id,
                    tokens: parent.tokens.clone(),
                };
                live.push(child);
                next_id += 1;
            }
            Op::Free(i) if !live.is_empty() => {
                let seq = live.swap_remove(i % live.len());
                prop_assert!(kv.free(seq.id));
            }
            _ => {}
        }
        kv.check_invariants().map_err(TestCaseError::fail)?;
        for seq in &live {
            backend.check(&kv, seq)?;
        }
    }
    for seq in live.drain(..) {
        prop_assert!(kv.free(seq.id));
    }
    kv.check_invariants().map_err(TestCaseError::fail)?;
    prop_assert_eq!(kv.num_free_blocks(), num_blocks);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn invariants_and_content_hold_with_prefix_caching(ops in prop::collection::vec(op(), 1..80), num_blocks in 4usize..24) {
        run(ops, num_blocks, true)?;
    }

    #[test]
    fn invariants_and_content_hold_without_prefix_caching(ops in prop::collection::vec(op(), 1..80), num_blocks in 4usize..24) {
        run(ops, num_blocks, false)?;
    }
}
