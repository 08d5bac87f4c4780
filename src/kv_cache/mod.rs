//! Paged KV-cache bookkeeping: block pool, block tables, prefix cache, copy-on-write.
//!
//! The K/V tensors live with the backend; this room only hands out block ids. A block holds
//! `block_size` token slots, and a token's slot is `block_id * block_size + offset`:
//!
//! ```text
//! block table [7, 2, 9], block_size 4, 10 tokens:
//!   positions 0..4  -> block 7 (slots 28..32)
//!   positions 4..8  -> block 2 (slots 8..12)
//!   positions 8..10 -> block 9 (slots 36..38), 2 of 4 slots used
//! ```
//!
//! Two layers, as in vLLM V1:
//! * [`BlockPool`] owns the blocks: reference counts, the LRU free queue (an index-linked list,
//!   O(1) removal from the middle) and the hash → block map of the prefix cache.
//! * [`KvCacheManager`] owns the per-sequence block tables and their hash chains and offers
//!   `computed_blocks` (prefix-cache lookup), `allocate_slots` (`None` when blocks run out, so
//!   the scheduler preempts; never an error), `fork` (copy-on-write sharing) and `free`.
//!
//! Invariants (checked by [`KvCacheManager::check_invariants`]):
//! * a block's reference count equals the number of block tables holding it;
//! * a block is in the free queue if and only if its reference count is zero;
//! * a block carries a content hash if and only if the prefix-cache map points at it; only full,
//!   computed blocks are hashed, so a hashed block is never written again;
//! * with no block tables left, every block is free.
//!
//! Where every layer attends through a sliding window (`CacheConfig::sliding_window`), a
//! sequence gives back the blocks that lie wholly before the window of its next query: its
//! table keeps their places as `manager::RELEASED`, which no kernel reads. Prefix hits before
//! the window are not taken at all. The scheduler then counts only the window's blocks
//! (`max_new_tokens`, `min_blocks_for`), so a sequence may be longer than the whole pool.

pub mod block_pool;
pub mod hash;
pub mod manager;

pub use block_pool::{BlockId, BlockPool};
pub use hash::BlockHash;
pub use manager::{ComputedBlocks, KvCacheManager, PrefixCacheStats};

/// Identifier of one sequence (one generated continuation of a request).
pub type SeqId = u64;

/// A block copy `(src_block_id, dst_block_id)` the runner performs before a step's forward
/// pass: copy-on-write when a sequence is about to write into a block it shares.
pub type BlockCopy = (BlockId, BlockId);

/// Errors of the KV-cache room. Running out of blocks is not one of them: that is `None`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvCacheError {
    #[error("invalid cache config: {0}")]
    InvalidConfig(String),
    #[error("sequence {0} has no block table")]
    UnknownSequence(SeqId),
    #[error("sequence {0} already has a block table")]
    SequenceExists(SeqId),
}

/// Shape of the paged KV cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Token slots per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Reuse full blocks across sequences by content hash (the CLI's `--no-prefix-cache` clears it).
    pub enable_prefix_caching: bool,
    /// Every layer of the model attends through a sliding window of this many positions, so
    /// a sequence gives back its blocks that lie wholly before its window. The engine sets it
    /// from its model, whatever it is given.
    pub sliding_window: Option<usize>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: 1024,
            enable_prefix_caching: true,
            sliding_window: None,
        }
    }
}

impl CacheConfig {
    /// How many blocks fit in `bytes` of device memory: each block holds K and V for
    /// `block_size` tokens in every layer, `2 * num_layers * num_kv_heads * head_dim * dtype_bytes
    /// * block_size` bytes. Returns 0 when any factor is 0.
    pub fn num_blocks_for_budget(
        bytes: usize,
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype_bytes: usize,
        block_size: usize,
    ) -> usize {
        let bytes_per_block = [num_layers, num_kv_heads, head_dim, dtype_bytes, block_size]
            .iter()
            .try_fold(2usize, |acc, &f| acc.checked_mul(f));
        match bytes_per_block {
            Some(b) if b > 0 => bytes / b,
            _ => 0,
        }
    }

    /// Checks the sizes are usable: non-zero, and block ids fit in `u32`.
    pub fn validate(&self) -> Result<(), KvCacheError> {
        if self.block_size == 0 {
            return Err(KvCacheError::InvalidConfig("block_size must be > 0".into()));
        }
        if self.sliding_window == Some(0) {
            return Err(KvCacheError::InvalidConfig(
                "sliding_window must be > 0".into(),
            ));
        }
        // `u32::MAX` is a released block's place in a table (`manager::RELEASED`).
        if self.num_blocks == 0 || self.num_blocks >= u32::MAX as usize {
            return Err(KvCacheError::InvalidConfig(format!(
                "num_blocks must be in 1..{}, got {}",
                u32::MAX,
                self.num_blocks
            )));
        }
        Ok(())
    }

    /// The first block a query at `pos` reads: the one holding the first key of its window.
    pub fn first_live_block(&self, pos: usize) -> usize {
        self.sliding_window
            .map_or(0, |w| (pos + 1).saturating_sub(w) / self.block_size)
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// The most new tokens from position `start` on whose blocks fit in the whole pool at
    /// once: with a sliding window, the blocks before the window of position `start − 1`
    /// are given back first (`allocate_slots`), so they do not count.
    pub fn max_new_tokens(&self, start: usize) -> usize {
        let first = self.first_live_block(start.saturating_sub(1));
        ((first + self.num_blocks) * self.block_size).saturating_sub(start)
    }

    /// The most blocks a sequence of `num_tokens` holds at once when its tokens are computed
    /// one per step: all of them, or with a sliding window of `w` at most `⌈w / block⌉ + 1`.
    pub fn min_blocks_for(&self, num_tokens: usize) -> usize {
        let all = self.blocks_for(num_tokens);
        self.sliding_window
            .map_or(all, |w| all.min(w.div_ceil(self.block_size) + 1))
    }

    /// Tokens one sequence can reach alone in the pool: the pool's, or, with a sliding window
    /// whose blocks fit in it, any number.
    pub fn max_seq_tokens(&self) -> usize {
        match self.sliding_window {
            Some(w) if self.num_blocks > w.div_ceil(self.block_size) => usize::MAX,
            _ => self.num_blocks * self.block_size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_sizing() {
        // SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, f16, block 16:
        // 2 * 30 * 3 * 64 * 2 * 16 = 368_640 bytes per block.
        let n = CacheConfig::num_blocks_for_budget(368_640 * 100 + 5, 30, 3, 64, 2, 16);
        assert_eq!(n, 100);
        assert_eq!(
            CacheConfig::num_blocks_for_budget(1 << 30, 0, 3, 64, 2, 16),
            0
        );
        assert_eq!(
            CacheConfig::num_blocks_for_budget(usize::MAX, usize::MAX, 3, 64, 2, 16),
            0
        );
    }

    #[test]
    fn a_sliding_window_counts_only_its_blocks() {
        let full = CacheConfig {
            block_size: 8,
            num_blocks: 2,
            ..CacheConfig::default()
        };
        assert_eq!(full.max_new_tokens(0), 16);
        assert_eq!(full.max_new_tokens(10), 6);
        assert_eq!(full.max_new_tokens(20), 0);
        assert_eq!(full.min_blocks_for(48), 6);
        assert_eq!(full.max_seq_tokens(), 16);
        let windowed = CacheConfig {
            sliding_window: Some(8),
            ..full
        };
        assert_eq!(windowed.max_new_tokens(0), 16);
        // Position 15's window starts at 8: block 0 is given back before computing 16.
        assert_eq!(windowed.max_new_tokens(16), 8);
        assert_eq!(windowed.min_blocks_for(48), 2);
        assert_eq!(windowed.min_blocks_for(5), 1);
        assert_eq!(windowed.max_seq_tokens(), usize::MAX);
        let too_wide = CacheConfig {
            sliding_window: Some(9),
            ..full
        };
        assert_eq!(
            too_wide.max_seq_tokens(),
            16,
            "the window's 3 blocks do not fit"
        );
        // Computed a token per step, a sequence never holds more than `min_blocks_for`, and
        // once it is a block past its window it does hold that many.
        for bs in [4, 8, 16] {
            for w in 1..40 {
                let c = CacheConfig {
                    block_size: bs,
                    num_blocks: 1000,
                    sliding_window: Some(w),
                    ..CacheConfig::default()
                };
                let held = |p: usize| c.blocks_for(p + 1) - c.first_live_block(p.saturating_sub(1));
                for n in 1..100 {
                    let most = (0..n).map(held).max().unwrap_or(0);
                    assert!(most <= c.min_blocks_for(n), "bs {bs} w {w} n {n}");
                    if n >= w + bs {
                        assert_eq!(most, c.min_blocks_for(n), "bs {bs} w {w} n {n}");
                    }
                }
            }
        }
    }

    #[test]
    fn validate_rejects_zero_sizes() {
        let mut c = CacheConfig::default();
        assert!(c.validate().is_ok());
        c.block_size = 0;
        assert!(c.validate().is_err());
        c.block_size = 4;
        c.num_blocks = 0;
        assert!(c.validate().is_err());
    }
}
