//! A sequence as the scheduler tracks it.

use super::plan::SeqStats;
use crate::kv_cache::{CacheConfig, SeqId};

/// Scheduling order: lower `priority` first, then earlier arrival. Unique per sequence, since
/// every sequence (group members included) gets its own arrival number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct SeqKey {
    pub priority: i32,
    pub arrival: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Sequence {
    pub seq_id: SeqId,
    pub key: SeqKey,
    /// Prompt, then generated tokens.
    pub token_ids: Vec<u32>,
    pub num_prompt_tokens: usize,
    /// Positions `0..num_computed_tokens` have K/V in the cache (0 while waiting).
    pub num_computed_tokens: usize,
    /// Group members not forked yet, with their arrival numbers (see `Scheduler::add_group`).
    pub fork_children: Vec<(SeqId, u64)>,
    pub stats: SeqStats,
    /// Admitted at least once (so `stats.cached_tokens` is final).
    pub admitted: bool,
    /// The last step that scheduled it (steps count from 1).
    pub last_scheduled_step: u64,
    /// Steps in flight that sample it (`run_ahead` only).
    pub num_pending_samples: u32,
    /// Draft tokens to verify after the last token in its next decode (speculative
    /// decoding); consumed by the step that schedules them.
    pub draft: Vec<u32>,
    /// Starts from prefix-cache hits (see `NewSequence::prefix_cache`).
    pub prefix_cache: bool,
}

impl Sequence {
    pub fn new(seq_id: SeqId, key: SeqKey, token_ids: Vec<u32>) -> Self {
        Self {
            seq_id,
            key,
            num_prompt_tokens: token_ids.len(),
            token_ids,
            num_computed_tokens: 0,
            fork_children: Vec::new(),
            stats: SeqStats::default(),
            admitted: false,
            last_scheduled_step: 0,
            num_pending_samples: 0,
            draft: Vec::new(),
            prefix_cache: true,
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Where computing stops for now: just before the last prompt token while group members
    /// wait to be forked (each member computes that token itself and samples its own first
    /// token), otherwise every known token.
    pub fn target_tokens(&self) -> usize {
        if self.fork_children.is_empty() {
            self.num_tokens()
        } else {
            self.num_prompt_tokens - 1
        }
    }

    pub fn num_remaining(&self) -> usize {
        self.target_tokens()
            .saturating_sub(self.num_computed_tokens)
    }

    /// Blocks the sequence and its unforked group members need at the least, alone in the
    /// pool: shared blocks up to the last token (with a sliding window, those of the window
    /// only), plus one block each for the rest.
    pub fn min_blocks_needed(&self, cache: &CacheConfig) -> usize {
        cache.min_blocks_for(self.num_tokens().max(1)) + self.fork_children.len()
    }
}
