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
    /// Sequences of this priority or lower (numerically at least this) are *background*
    /// (batch and async jobs run at `i32::MAX`): in a step where a foreground sequence has
    /// prompt tokens to compute (waiting, or a prefill under way), background sequences get no
    /// tokens, and a foreground sequence that cannot be admitted for lack of blocks or seats
    /// preempts background ones. So an arriving online request's prefill runs in a step with
    /// only foreground work; background work goes on in the steps between. `None`: off.
    pub background_priority: Option<i32>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            enable_chunked_prefill: true,
            max_prefill_chunk_tokens: 2048,
            background_priority: Some(i32::MAX),
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
