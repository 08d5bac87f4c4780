//! Per-sequence block tables over the [`BlockPool`]: prefix reuse, slot allocation, forks.
//!
//! A sequence's table covers its computed tokens plus the tokens scheduled this step:
//!
//! ```text
//! block_size 4, 6 computed, 3 new:   [b0: c c c c][b1: c c n n][b2: n . . .]
//!                                      full, hashed   written    fresh
//! ```
//!
//! * The table's first `block_hashes.len()` blocks are full and computed; their hash chain is
//!   kept per sequence so caching a newly full block costs one block hash.
//! * A sequence only ever writes at positions `>= num_computed_tokens`, so the one block it may
//!   write into while sharing it (after `fork`) is the partial block holding position
//!   `num_computed_tokens`. `allocate_slots` swaps that block for a fresh copy first
//!   (copy-on-write) and reports `(src, dst)` for the runner.
//! * Prefix-cache hits never cover a prompt's last token, so the model always computes at least
//!   one token and produces logits.

use super::block_pool::{BlockId, BlockPool};
use super::hash::{hash_block, BlockHash, FastMap};
use super::{BlockCopy, CacheConfig, KvCacheError, SeqId};

/// A table's place for a block given back because it lies wholly before the sequence's
/// sliding window; never a pool block (`CacheConfig::validate`).
pub const RELEASED: BlockId = BlockId::MAX;

/// The blocks of `ids` the sequence still holds.
fn held(ids: &[BlockId]) -> impl DoubleEndedIterator<Item = BlockId> + '_ {
    ids.iter().copied().filter(|&id| id != RELEASED)
}

/// Prefix-cache hits of one token sequence, from [`KvCacheManager::computed_blocks`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComputedBlocks {
    /// Cached blocks holding the sequence's first tokens, in order.
    pub block_ids: Vec<BlockId>,
    /// Their hash chain.
    pub block_hashes: Vec<BlockHash>,
    /// Tokens they cover (`block_ids.len() * block_size`).
    pub num_computed_tokens: usize,
    /// Tokens the lookup was asked about (the sequence's length), for hit-rate metrics.
    pub num_query_tokens: usize,
}

/// Prefix-cache counters since start, in tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Tokens of admitted sequences that were looked up.
    pub num_query_tokens: u64,
    /// Of those, tokens found cached (not computed again).
    pub num_hit_tokens: u64,
}

#[derive(Debug, Clone, Default)]
struct SeqBlocks {
    block_ids: Vec<BlockId>,
    /// Hash chain of the first full, computed blocks (all of them when caching is on).
    block_hashes: Vec<BlockHash>,
}

/// Owns the block tables of all sequences holding KV cache.
#[derive(Debug, Clone)]
pub struct KvCacheManager {
    config: CacheConfig,
    pool: BlockPool,
    tables: FastMap<SeqId, SeqBlocks>,
    stats: PrefixCacheStats,
}

impl KvCacheManager {
    pub fn new(config: CacheConfig) -> Result<Self, KvCacheError> {
        config.validate()?;
        Ok(Self {
            pool: BlockPool::new(config.num_blocks as u32),
            config,
            tables: FastMap::default(),
            stats: PrefixCacheStats::default(),
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    pub fn block_size(&self) -> usize {
        self.config.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free_blocks()
    }

    /// Fraction of blocks in use (held by some sequence), in `[0, 1]`.
    pub fn usage(&self) -> f64 {
        1.0 - self.pool.num_free_blocks() as f64 / self.pool.num_blocks() as f64
    }

    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.stats
    }

    /// Read access to the pool (ref counts, free order), for metrics and tests.
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn block_table(&self, seq_id: SeqId) -> Option<&[BlockId]> {
        self.tables.get(&seq_id).map(|t| t.block_ids.as_slice())
    }

    pub fn has_table(&self, seq_id: SeqId) -> bool {
        self.tables.contains_key(&seq_id)
    }

    /// The longest run of cached full blocks that starts `token_ids`, leaving at least the
    /// last token uncovered. Pure lookup: nothing is taken until `allocate_slots`.
    pub fn computed_blocks(&self, token_ids: &[u32]) -> ComputedBlocks {
        let mut hits = ComputedBlocks {
            num_query_tokens: token_ids.len(),
            ..ComputedBlocks::default()
        };
        if !self.config.enable_prefix_caching || token_ids.is_empty() {
            return hits;
        }
        let bs = self.config.block_size;
        let mut parent = BlockHash::ROOT;
        for block in token_ids[..token_ids.len() - 1].chunks_exact(bs) {
            let h = hash_block(parent, block);
            let Some(id) = self.pool.lookup(h) else { break };
            hits.block_ids.push(id);
            hits.block_hashes.push(h);
            parent = h;
        }
        hits.num_computed_tokens = hits.block_ids.len() * bs;
        hits
    }

    /// Makes the table of `seq_id` cover `num_computed_tokens + num_new_tokens` tokens.
    ///
    /// A sequence without a table is admitted: `computed` (its prefix hits from
    /// `computed_blocks`, taken now) must cover exactly `num_computed_tokens`. For a sequence
    /// with a table, `computed` is ignored. Returns the block copies the runner must perform
    /// first, or `None`, with nothing changed, when the pool has too few free blocks.
    pub fn allocate_slots(
        &mut self,
        seq_id: SeqId,
        num_computed_tokens: usize,
        num_new_tokens: usize,
        computed: Option<&ComputedBlocks>,
    ) -> Option<Vec<BlockCopy>> {
        let bs = self.config.block_size;
        let num_required = (num_computed_tokens + num_new_tokens).div_ceil(bs);
        self.release_before_window(seq_id, num_computed_tokens);
        let first_live = (self.config).first_live_block(num_computed_tokens.saturating_sub(1));
        let (num_held, num_touched_free, cow_idx) = match self.tables.get(&seq_id) {
            Some(table) => (
                table.block_ids.len(),
                0,
                self.cow_index(table, num_computed_tokens, num_new_tokens),
            ),
            None => {
                let ids = computed.map_or(&[][..], |c| c.block_ids.as_slice());
                crate::checked_assert!(ids.len() * bs == num_computed_tokens);
                let live = &ids[first_live.min(ids.len())..];
                let free = live
                    .iter()
                    .filter(|&&id| self.pool.ref_cnt(id) == 0)
                    .count();
                (ids.len(), free, None)
            }
        };
        let num_fresh = num_required.saturating_sub(num_held) + usize::from(cow_idx.is_some());
        if num_fresh + num_touched_free > self.pool.num_free_blocks() {
            return None;
        }

        if !self.tables.contains_key(&seq_id) {
            let mut table = SeqBlocks::default();
            if let Some(c) = computed {
                // Touch before allocating, so allocation cannot evict the hits. Hits wholly
                // before the window are never read: they stay in the cache, untaken.
                let first = first_live.min(c.block_ids.len());
                self.pool.touch(&c.block_ids[first..]);
                table.block_ids.clone_from(&c.block_ids);
                table.block_ids[..first].fill(RELEASED);
                table.block_hashes.clone_from(&c.block_hashes);
                self.stats.num_query_tokens += c.num_query_tokens as u64;
                self.stats.num_hit_tokens += c.num_computed_tokens as u64;
            }
            self.tables.insert(seq_id, table);
        }
        let fresh = self.pool.allocate(num_fresh)?;
        let table = self.tables.get_mut(&seq_id)?;
        let mut fresh = fresh.into_iter();
        let mut copies = Vec::new();
        if let Some(idx) = cow_idx {
            let dst = fresh.next()?;
            let src = std::mem::replace(&mut table.block_ids[idx], dst);
            self.pool.free([src]);
            copies.push((src, dst));
        }
        table.block_ids.extend(fresh);
        Some(copies)
    }

    /// Gives back the sequence's blocks that lie wholly before the window of a query at
    /// `pos - 1` (a step still in flight may be computing it when the next is scheduled from
    /// `pos`): no later query reads them. Hashed ones stay in the prefix cache.
    fn release_before_window(&mut self, seq_id: SeqId, pos: usize) {
        let first = self.config.first_live_block(pos.saturating_sub(1));
        if first == 0 {
            return;
        }
        if let Some(table) = self.tables.get_mut(&seq_id) {
            let end = first.min(table.block_ids.len());
            // Released places are a prefix of the table: walk back to the last one given
            // back, so a long sequence does not rescan its whole past every step.
            for id in table.block_ids[..end].iter_mut().rev() {
                if *id == RELEASED {
                    break;
                }
                self.pool.free([std::mem::replace(id, RELEASED)]);
            }
        }
    }

    /// Index of the shared, partial block that writing at `num_computed_tokens` would touch.
    fn cow_index(
        &self,
        table: &SeqBlocks,
        num_computed_tokens: usize,
        num_new_tokens: usize,
    ) -> Option<usize> {
        let bs = self.config.block_size;
        let idx = num_computed_tokens / bs;
        let shared = |id: BlockId| self.pool.ref_cnt(id) > 1;
        (num_new_tokens > 0 && !num_computed_tokens.is_multiple_of(bs))
            .then_some(idx)
            .filter(|&i| table.block_ids.get(i).is_some_and(|&id| shared(id)))
    }

    /// Gives `child_id` the same blocks as `parent_id`, shared (reference counts up).
    pub fn fork(&mut self, parent_id: SeqId, child_id: SeqId) -> Result<(), KvCacheError> {
        if self.tables.contains_key(&child_id) {
            return Err(KvCacheError::SequenceExists(child_id));
        }
        let table = self
            .tables
            .get(&parent_id)
            .ok_or(KvCacheError::UnknownSequence(parent_id))?
            .clone();
        let ids: Vec<BlockId> = held(&table.block_ids).collect();
        self.pool.touch(&ids);
        self.tables.insert(child_id, table);
        Ok(())
    }

    /// Enters the sequence's newly full, computed blocks into the prefix cache.
    /// `token_ids` are the sequence's tokens; the first `num_computed_tokens` have K/V written.
    pub fn cache_full_blocks(
        &mut self,
        seq_id: SeqId,
        token_ids: &[u32],
        num_computed_tokens: usize,
    ) {
        if !self.config.enable_prefix_caching {
            return;
        }
        let bs = self.config.block_size;
        let Some(table) = self.tables.get_mut(&seq_id) else {
            return;
        };
        let num_full = (num_computed_tokens.min(token_ids.len()) / bs).min(table.block_ids.len());
        for i in table.block_hashes.len()..num_full {
            let parent = table
                .block_hashes
                .last()
                .copied()
                .unwrap_or(BlockHash::ROOT);
            let h = hash_block(parent, &token_ids[i * bs..(i + 1) * bs]);
            table.block_hashes.push(h);
            if table.block_ids[i] != RELEASED {
                self.pool.cache(table.block_ids[i], h);
            }
        }
    }

    /// Gives back the sequence's blocks past those holding positions `0..num_tokens` (the
    /// slots of rejected draft tokens), tail first. Its full, hashed blocks are all kept:
    /// only computed tokens are ever hashed.
    pub fn truncate(&mut self, seq_id: SeqId, num_tokens: usize) {
        let keep = num_tokens.div_ceil(self.config.block_size);
        if let Some(table) = self.tables.get_mut(&seq_id) {
            if table.block_ids.len() > keep {
                let tail = table.block_ids.split_off(keep);
                self.pool.free(held(&tail).rev());
            }
        }
    }

    /// Drops the sequence's table, tail block first so tails are evicted before heads.
    /// Returns false when it had none.
    pub fn free(&mut self, seq_id: SeqId) -> bool {
        match self.tables.remove(&seq_id) {
            Some(table) => {
                self.pool.free(held(&table.block_ids).rev());
                true
            }
            None => false,
        }
    }

    /// Checks every invariant in the module docs, plus: no table holds a block twice.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut refs = vec![0u32; self.pool.num_blocks()];
        for (seq_id, table) in &self.tables {
            let mut seen = std::collections::HashSet::new();
            for id in held(&table.block_ids) {
                let slot = refs
                    .get_mut(id as usize)
                    .ok_or(format!("seq {seq_id} holds unknown block {id}"))?;
                *slot += 1;
                if !seen.insert(id) {
                    return Err(format!("seq {seq_id} holds block {id} twice"));
                }
            }
            if table.block_hashes.len() > table.block_ids.len() {
                return Err(format!("seq {seq_id} has more hashes than blocks"));
            }
        }
        self.pool.check_invariants(&refs)?;
        if self.tables.is_empty() && self.pool.num_free_blocks() != self.pool.num_blocks() {
            return Err("no sequences left, but some blocks are not free".into());
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "manager_tests.rs"]
mod tests;
