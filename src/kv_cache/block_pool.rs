//! The block pool: reference counts, the LRU free queue and the prefix-cache map.
//!
//! Every block is always in exactly one of two states:
//! * **used**: `ref_cnt > 0`, held by that many block tables, not in the free queue;
//! * **free**: `ref_cnt == 0`, in the free queue. A free block may still carry a content hash
//!   (it is *cached*): a new sequence with the same prefix can take it back (`touch`) until the
//!   pool hands it out for new content (`allocate`), which evicts its hash.
//!
//! The free queue is a doubly linked list threaded through the blocks by index, like vLLM's
//! `FreeKVCacheBlockQueue`: `allocate` pops the head (least recently freed), `free` appends at
//! the tail, `touch` unlinks a cached block from anywhere in O(1). Callers free a sequence's
//! blocks tail first, so the tail of a prefix is evicted before its head.
//!
//! Costs: `allocate`, `free`, `touch` and `lookup` are O(1) per block.

use super::hash::{BlockHash, FastMap};

/// Index of a block in the pool; the backend's K/V tensors are indexed by it.
pub type BlockId = u32;

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    ref_cnt: u32,
    hash: Option<BlockHash>,
    /// Free-queue links, meaningful only while `ref_cnt == 0`.
    prev_free: Option<BlockId>,
    next_free: Option<BlockId>,
}

/// The pool of `num_blocks` blocks. Knows no sequences; see [`super::KvCacheManager`].
#[derive(Debug, Clone)]
pub struct BlockPool {
    blocks: Vec<BlockMeta>,
    free_head: Option<BlockId>,
    free_tail: Option<BlockId>,
    num_free: usize,
    cached: FastMap<BlockHash, BlockId>,
    num_evictions: u64,
}

impl BlockPool {
    /// A pool whose blocks are all free, in id order (block 0 is handed out first).
    pub fn new(num_blocks: u32) -> Self {
        let mut pool = Self {
            blocks: vec![BlockMeta::default(); num_blocks as usize],
            free_head: None,
            free_tail: None,
            num_free: 0,
            cached: FastMap::default(),
            num_evictions: 0,
        };
        for id in 0..num_blocks {
            pool.push_free(id);
        }
        pool
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Free blocks, cached ones included (they can be evicted on demand).
    pub fn num_free_blocks(&self) -> usize {
        self.num_free
    }

    /// Blocks whose hash was dropped to make room for new content, since start.
    pub fn num_evictions(&self) -> u64 {
        self.num_evictions
    }

    pub fn ref_cnt(&self, id: BlockId) -> u32 {
        self.blocks[id as usize].ref_cnt
    }

    pub fn block_hash(&self, id: BlockId) -> Option<BlockHash> {
        self.blocks[id as usize].hash
    }

    /// The block caching `hash`, used or free.
    pub fn lookup(&self, hash: BlockHash) -> Option<BlockId> {
        self.cached.get(&hash).copied()
    }

    /// Takes `n` blocks from the head of the free queue (evicting their hashes), each with
    /// one reference; `None`, and nothing taken, when fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.num_free {
            return None;
        }
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            let id = self.free_head?;
            self.unlink_free(id);
            self.evict(id);
            self.blocks[id as usize].ref_cnt = 1;
            ids.push(id);
        }
        Some(ids)
    }

    /// Adds one reference to each block, taking free (cached) blocks out of the free queue.
    pub fn touch(&mut self, ids: &[BlockId]) {
        for &id in ids {
            if self.blocks[id as usize].ref_cnt == 0 {
                self.unlink_free(id);
            }
            self.blocks[id as usize].ref_cnt += 1;
        }
    }

    /// Drops one reference from each block, in the given order; a block reaching zero goes to
    /// the tail of the free queue (its hash kept, so it stays reusable until evicted).
    pub fn free(&mut self, ids: impl IntoIterator<Item = BlockId>) {
        for id in ids {
            let meta = &mut self.blocks[id as usize];
            crate::checked_assert!(meta.ref_cnt > 0, "double free of block {id}");
            if meta.ref_cnt == 0 {
                continue;
            }
            meta.ref_cnt -= 1;
            if meta.ref_cnt == 0 {
                self.push_free(id);
            }
        }
    }

    /// Records that used block `id` holds the full content `hash`. Returns false, and leaves
    /// the block unhashed, when another block already caches that hash (two sequences computed
    /// the same prefix at once); the duplicate is then an ordinary block.
    pub fn cache(&mut self, id: BlockId, hash: BlockHash) -> bool {
        if self.blocks[id as usize].hash.is_some() {
            return self.blocks[id as usize].hash == Some(hash);
        }
        if self.cached.contains_key(&hash) {
            return false;
        }
        self.cached.insert(hash, id);
        self.blocks[id as usize].hash = Some(hash);
        true
    }

    /// Free block ids from head (next evicted) to tail. For tests and debugging.
    pub fn free_block_ids(&self) -> Vec<BlockId> {
        let mut ids = Vec::with_capacity(self.num_free);
        let mut cur = self.free_head;
        while let Some(id) = cur {
            ids.push(id);
            cur = self.blocks[id as usize].next_free;
        }
        ids
    }

    /// Checks the pool's own invariants and that `ref_cnt` matches `expected_refs` (how many
    /// block tables hold each block, computed by the caller).
    pub fn check_invariants(&self, expected_refs: &[u32]) -> Result<(), String> {
        if expected_refs.len() != self.blocks.len() {
            return Err("expected_refs has the wrong length".into());
        }
        let mut in_queue = vec![false; self.blocks.len()];
        let mut prev = None;
        let mut cur = self.free_head;
        let mut n = 0;
        while let Some(id) = cur {
            let meta = self
                .blocks
                .get(id as usize)
                .ok_or(format!("free queue holds unknown block {id}"))?;
            if std::mem::replace(&mut in_queue[id as usize], true) {
                return Err(format!("block {id} is twice in the free queue"));
            }
            if meta.prev_free != prev {
                return Err(format!("block {id} has a broken prev link"));
            }
            n += 1;
            prev = cur;
            cur = meta.next_free;
        }
        if self.free_tail != prev || n != self.num_free {
            return Err(format!("free queue: {n} linked, {} counted", self.num_free));
        }
        for (id, meta) in self.blocks.iter().enumerate() {
            if meta.ref_cnt != expected_refs[id] {
                return Err(format!(
                    "block {id}: ref_cnt {} but {} table entries",
                    meta.ref_cnt, expected_refs[id]
                ));
            }
            if (meta.ref_cnt == 0) != in_queue[id] {
                return Err(format!(
                    "block {id}: ref_cnt {} but in free queue: {}",
                    meta.ref_cnt, in_queue[id]
                ));
            }
            if let Some(h) = meta.hash {
                if self.cached.get(&h) != Some(&(id as BlockId)) {
                    return Err(format!("block {id} has a hash the cache map lacks"));
                }
            }
        }
        for (h, &id) in &self.cached {
            if self.blocks.get(id as usize).and_then(|m| m.hash) != Some(*h) {
                return Err(format!(
                    "cache map points at block {id}, which lacks the hash"
                ));
            }
        }
        Ok(())
    }

    fn evict(&mut self, id: BlockId) {
        if let Some(h) = self.blocks[id as usize].hash.take() {
            self.cached.remove(&h);
            self.num_evictions += 1;
        }
    }

    fn push_free(&mut self, id: BlockId) {
        let meta = &mut self.blocks[id as usize];
        meta.prev_free = self.free_tail;
        meta.next_free = None;
        match self.free_tail {
            Some(tail) => self.blocks[tail as usize].next_free = Some(id),
            None => self.free_head = Some(id),
        }
        self.free_tail = Some(id);
        self.num_free += 1;
    }

    fn unlink_free(&mut self, id: BlockId) {
        let (prev, next) = {
            let meta = &mut self.blocks[id as usize];
            (meta.prev_free.take(), meta.next_free.take())
        };
        match prev {
            Some(p) => self.blocks[p as usize].next_free = next,
            None => self.free_head = next,
        }
        match next {
            Some(n) => self.blocks[n as usize].prev_free = prev,
            None => self.free_tail = prev,
        }
        self.num_free -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: u128) -> BlockHash {
        BlockHash(x)
    }

    /// The double-free check panics where invariants are checked (debug builds, and CI's
    /// `SLUICE_CHECKED=1` pass); a production release build skips the block instead.
    #[test]
    fn a_double_free_is_caught_where_checked() {
        let mut pool = BlockPool::new(2);
        let ids = pool.allocate(1).unwrap();
        pool.free(ids.clone());
        let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.free(ids)));
        if crate::invariants_checked() {
            let panic = again.expect_err("a double free must panic where checked");
            let message = panic.downcast_ref::<String>().map(String::as_str);
            assert_eq!(message, Some("double free of block 0"));
        } else {
            assert!(again.is_ok());
            assert_eq!(pool.num_free_blocks(), 2);
        }
    }

    #[test]
    fn allocates_in_id_order_and_frees_to_the_tail() {
        let mut pool = BlockPool::new(10);
        assert_eq!(pool.allocate(3), Some(vec![0, 1, 2]));
        assert_eq!(pool.num_free_blocks(), 7);
        pool.free([2, 0]);
        assert_eq!(pool.free_block_ids(), vec![3, 4, 5, 6, 7, 8, 9, 2, 0]);
        assert_eq!(pool.allocate(8), Some(vec![3, 4, 5, 6, 7, 8, 9, 2]));
        assert_eq!(pool.allocate(2), None);
        assert_eq!(pool.num_free_blocks(), 1);
    }

    #[test]
    fn touch_takes_a_cached_block_from_the_middle() {
        let mut pool = BlockPool::new(4);
        let ids = pool.allocate(2).unwrap_or_default();
        assert!(pool.cache(ids[0], h(7)));
        pool.free([1, 0]);
        assert_eq!(pool.free_block_ids(), vec![2, 3, 1, 0]);
        assert_eq!(pool.lookup(h(7)), Some(0));
        pool.touch(&[0]);
        assert_eq!(pool.ref_cnt(0), 1);
        assert_eq!(pool.free_block_ids(), vec![2, 3, 1]);
        pool.touch(&[0]);
        assert_eq!(pool.ref_cnt(0), 2);
        pool.free([0, 0]);
        assert_eq!(pool.free_block_ids(), vec![2, 3, 1, 0]);
        assert!(pool.check_invariants(&[0; 4]).is_ok());
    }

    #[test]
    fn allocation_evicts_lru_cached_blocks_first() {
        let mut pool = BlockPool::new(3);
        let ids = pool.allocate(3).unwrap_or_default();
        for (i, &id) in ids.iter().enumerate() {
            assert!(pool.cache(id, h(100 + i as u128)));
        }
        // Freed tail first: 2 is evicted first, 0 last.
        pool.free([2, 1, 0]);
        assert_eq!(pool.allocate(1), Some(vec![2]));
        assert_eq!(pool.lookup(h(102)), None);
        assert_eq!(pool.lookup(h(100)), Some(0));
        assert_eq!(pool.num_evictions(), 1);
        assert!(pool.check_invariants(&[0, 0, 1]).is_ok());
    }

    #[test]
    fn duplicate_hash_stays_unhashed() {
        let mut pool = BlockPool::new(2);
        let _ = pool.allocate(2);
        assert!(pool.cache(0, h(5)));
        assert!(!pool.cache(1, h(5)));
        assert_eq!(pool.block_hash(1), None);
        assert!(pool.cache(0, h(5)));
        assert!(pool.check_invariants(&[1, 1]).is_ok());
    }

    #[test]
    fn invariant_check_catches_wrong_refs() {
        let mut pool = BlockPool::new(2);
        let _ = pool.allocate(1);
        assert!(pool.check_invariants(&[1, 0]).is_ok());
        assert!(pool.check_invariants(&[2, 0]).is_err());
        assert!(pool.check_invariants(&[0, 0]).is_err());
    }
}
