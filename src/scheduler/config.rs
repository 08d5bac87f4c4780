//! Scheduler limits.

/// Limits of one step. The cache's shape is [`crate::kv_cache::CacheConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Token budget of one step (prefill, chunk and decode tokens together).
    pub max_num_batched_tokens: usize,
    /// Most sequences running at once (and so scheduled in one step).
    pub max_num_seqs: usize,
    /// Split a prompt into chunks when it does not fit the step's remaining budget. When off, a
    /// prefill waits for a step with room for all of it, unless it alone exceeds
    /// `max_num_batched_tokens` (then it is chunked anyway, or it could never run).
    pub enable_chunked_prefill: bool,
    /// Largest prefill chunk of one sequence in one step, in tokens, so that several prompts
    /// can share a step. Decodes are scheduled before any prefill in any case.
    pub max_prefill_chunk_tokens: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            enable_chunked_prefill: true,
            max_prefill_chunk_tokens: 2048,
        }
    }
}

impl SchedulerConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.max_num_batched_tokens == 0 || self.max_num_seqs == 0 {
            return Err("max_num_batched_tokens and max_num_seqs must be > 0".into());
        }
        if self.max_prefill_chunk_tokens == 0 {
            return Err("max_prefill_chunk_tokens must be > 0".into());
        }
        Ok(())
    }
}
