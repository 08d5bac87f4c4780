//! The plan of one step, and what the scheduler reports about sequences.

use crate::kv_cache::{BlockCopy, BlockId, SeqId};

/// What runs in one step: plain data, so a scripted fake can stand in for the runner and the
/// plan can be sent unchanged to other ranks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Increases by one per `schedule()`; `commit` accepts only the latest plan.
    pub step_id: u64,
    /// Scheduled sequences: running ones first, then newly admitted ones.
    pub seqs: Vec<ScheduledSeq>,
    /// Copy block `src` to block `dst` (all layers, K and V) before the forward pass.
    pub block_copies: Vec<BlockCopy>,
    /// Sequences preempted this step: their blocks are gone, they recompute later. The runner
    /// drops any state it keeps for them.
    pub preempted_seq_ids: Vec<SeqId>,
    /// Sequences removed this step because they cannot fit in the whole KV cache; the engine
    /// ends their requests with an error or a "length" finish.
    pub too_long_seq_ids: Vec<SeqId>,
    /// Sum of `end - start` over `seqs`, in tokens.
    pub num_batched_tokens: usize,
}

/// One sequence's part of a step.
///
/// ```text
/// tokens     [p p p p p p p p p p g g]      p: prompt, g: generated
/// computed   [x x x x x x)                  start = num_computed_tokens = 6
/// this step              [x x x x)          end = 10, token_ids = tokens[6..10]
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub seq_id: SeqId,
    /// First position computed this step (positions before it have K/V in the cache).
    pub start: usize,
    /// One past the last position computed this step.
    pub end: usize,
    /// Known tokens at positions `start..`; empty for a run-ahead decode.
    pub token_ids: Vec<u32>,
    /// Draft tokens verified after them, at the last positions before `end` (speculative
    /// decoding): the step samples after the last known token and after each draft token.
    pub draft_token_ids: Vec<u32>,
    /// The sequence's block table, covering positions `0..end`; the slot of position `p` is
    /// `block_table[p / block_size] * block_size + p % block_size`.
    pub block_table: Vec<BlockId>,
    /// The step ends at the last known token: sample one token for this sequence.
    pub sample: bool,
    /// A decode of the token that the step in flight samples for this sequence (one token at
    /// `start`, the sequence's length once that token is appended): its id is not known when
    /// the plan is made, and the runner takes it from that step's output.
    pub run_ahead: bool,
    /// Length of the sequence's prompt.
    pub num_prompt_tokens: usize,
}

impl ScheduledSeq {
    pub fn num_tokens(&self) -> usize {
        self.end - self.start
    }

    /// One past the last known token's position (the drafts follow it).
    pub fn known_end(&self) -> usize {
        self.end - self.draft_token_ids.len()
    }
}

/// Per-sequence accounting, for OpenAI usage and engine counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqStats {
    /// Prompt tokens found in the prefix cache at first admission (OpenAI `cached_tokens`).
    pub cached_tokens: usize,
    /// Prompt positions this sequence computed itself, recomputation included.
    pub num_computed_prompt_tokens: usize,
    /// Times it was preempted.
    pub num_preemptions: u32,
}
