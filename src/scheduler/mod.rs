//! The iteration-level scheduler: who runs in the next step, with how many tokens.
//!
//! **Tokens, not phases.** Every sequence has `token_ids` (prompt, then generated) and
//! `num_computed_tokens`. A step gives each chosen sequence `num_new` tokens, positions
//! `[num_computed, num_computed + num_new)`, under one token budget
//! (`max_num_batched_tokens`) and `max_num_seqs`. A whole prefill, a prefill chunk, a decode and
//! a prefix-cache hit (which starts `num_computed` above zero) are only different counts. A
//! sequence whose step ends at its last known token gets one token sampled; `commit` appends it.
//!
//! One step (`schedule`), in phases:
//! 1. running decodes (one token left), in priority order; when blocks run out, the lowest
//!    priority, latest-arrived running sequence is preempted (blocks freed, `num_computed`
//!    reset to 0, back to waiting; prefix hits make its recomputation cheap);
//! 2. running prefills (chunks of prompts already admitted), so a long prompt never holds up
//!    decodes; they only preempt sequences later in order that were not scheduled yet;
//! 3. if nobody was preempted, waiting sequences in priority order, each admitted only if its
//!    blocks (after prefix hits) can be allocated; prompts that do not fit the remaining budget
//!    are chunked. The first one that cannot be admitted stops admission (no overtaking, so a
//!    large high-priority prompt is not starved by small ones).
//!
//! Invariants:
//! * every sequence is either waiting (no block table, `num_computed == 0`) or running (a block
//!   table covering at least its computed tokens); `running` is sorted by (priority, arrival);
//! * `running.len()` plus the unforked members of running groups is at most `max_num_seqs`;
//!   a step's tokens sum to at most `max_num_batched_tokens`;
//! * a sequence that could not fit even in an empty pool is refused by `add` or, if it grows
//!   that long, reported in `StepPlan::too_long_seq_ids` and dropped: nothing waits forever.
//!
//! **Background** (`SchedulerConfig::background_priority`, by default `i32::MAX`, the
//! priority of batch and async jobs): while a foreground sequence has prompt tokens to
//! compute, background sequences get no tokens (so an online prefill shares its step with
//! foreground work only), and a foreground sequence short of blocks or seats preempts the
//! latest background one. Background work runs in the steps between, so it finishes while
//! the foreground load leaves steps without prefills; under a continuous stream of arrivals
//! it waits.
//!
//! **Steps in flight** (pipeline parallelism, `set_max_in_flight(m)` with `m > 1`): the engine
//! may schedule the next step before committing the previous ones. A sequence in a step not
//! committed yet is *in flight*: later steps skip it, and it is never a preemption victim
//! (its blocks are being written), so the micro-batches in flight are disjoint. Plans may
//! then be committed in any order after their step; with `m == 1` (the default) a plan must be
//! committed before the next `schedule`, as always.
//!
//! **Running ahead** (`set_run_ahead`, the overlapped engine loop on one device): while one
//! step is in flight, the next may give each sequence that step samples one more decode
//! token, whose id is not known yet (`ScheduledSeq::run_ahead`: the runner takes it from the
//! step in flight's output). Plans still commit oldest first. If the sequence finishes at
//! the older step, it is removed and the run-ahead entry is skipped at commit: its token is
//! never appended, and its slot goes back with the sequence's blocks. A run-ahead decode
//! never preempts (it waits for the commit instead) and a sequence in flight is never a
//! victim.
//!
//! **Drafts** (`set_draft`, speculative decoding): a decoding sequence's draft tokens are
//! scheduled after its last token in the decode pass when the budget and free blocks allow
//! (a draft never preempts; without room the plain decode is scheduled), and the step
//! samples after each. `commit` takes the accepted drafts and the target's next token,
//! leaves `num_computed_tokens` after the last accepted draft and truncates the block table
//! to it, so a rejected token's slot is rewritten by the next step and a block only it
//! touched goes back to the pool at once.
//!
//! **n > 1** (`add_group`): the first sequence computes the prompt up to its last token; then
//! the others are forked from it (blocks shared copy-on-write), and each computes the last
//! prompt token itself and samples its own first token. The prompt is computed once, plus
//! one token per member.

#[cfg(test)]
mod background_tests;
mod commit;
pub mod config;
#[cfg(test)]
mod draft_tests;
#[cfg(test)]
mod in_flight_tests;
pub mod plan;
#[cfg(test)]
mod run_ahead_tests;
mod schedule;
mod sequence;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

pub use self::config::SchedulerConfig;
pub use self::plan::{ScheduledSeq, SeqStats, StepPlan};
use self::sequence::{SeqKey, Sequence};
use crate::kv_cache::hash::FastMap;
pub use crate::kv_cache::SeqId;
use crate::kv_cache::{CacheConfig, KvCacheError, KvCacheManager, PrefixCacheStats};

/// Errors of the scheduler: bad input from the engine, never "out of blocks".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    #[error("invalid scheduler config: {0}")]
    InvalidConfig(String),
    #[error(transparent)]
    KvCache(#[from] KvCacheError),
    #[error("sequence id {0} is already in use")]
    DuplicateSeqId(SeqId),
    #[error("sequence {0} has an empty prompt")]
    EmptyPrompt(SeqId),
    #[error(
        "sequence {seq_id} needs {num_blocks_needed} KV-cache blocks, the cache has {num_blocks}"
    )]
    TooLong {
        seq_id: SeqId,
        num_blocks_needed: usize,
        num_blocks: usize,
    },
    #[error("a group of {num_seqs} sequences exceeds max_num_seqs {max_num_seqs}")]
    GroupTooLarge {
        num_seqs: usize,
        max_num_seqs: usize,
    },
    #[error("plan of step {plan_step_id} is stale (current step {step_id})")]
    StalePlan { plan_step_id: u64, step_id: u64 },
    #[error("no sampled token for sequence {0}, which the plan asked to sample")]
    MissingSample(SeqId),
    #[error("sampled token for sequence {0}, which the plan did not ask to sample")]
    UnexpectedSample(SeqId),
    #[error("sequence {0} accepted a token its draft did not propose")]
    DraftMismatch(SeqId),
}

/// A sequence to add: its id (unique among live sequences), prompt and priority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSequence {
    pub seq_id: SeqId,
    pub prompt_token_ids: Vec<u32>,
    /// Lower runs first and is preempted last; ties go by arrival.
    pub priority: i32,
    /// Starts from the prefix cache's hits (false: computes every prompt position, as a
    /// mean-pooled embedding needs; its full blocks are still cached for others).
    pub prefix_cache: bool,
}

/// Engine-wide counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerCounters {
    pub num_preemptions_total: u64,
    /// Prompt positions computed by the model (recomputation after preemption included).
    pub num_computed_prompt_tokens_total: u64,
    pub num_generated_tokens_total: u64,
}

/// The scheduler and the KV-cache manager it allocates from. Owned by the engine loop.
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedulerConfig,
    kv: KvCacheManager,
    seqs: FastMap<SeqId, Sequence>,
    waiting: BTreeMap<SeqKey, SeqId>,
    /// Sorted by key: iteration order is priority order, the last entry is preempted first.
    running: Vec<(SeqKey, SeqId)>,
    /// Group members not forked yet → their group's computing sequence.
    pending_children: FastMap<SeqId, SeqId>,
    next_arrival: u64,
    step_id: u64,
    counters: SchedulerCounters,
    /// Steps that may be scheduled before their predecessors are committed.
    max_in_flight: usize,
    /// Sequences in scheduled, uncommitted steps, with how many such steps hold each (only
    /// tracked when `max_in_flight > 1`; more than one only with `run_ahead`).
    in_flight: FastMap<SeqId, u32>,
    /// Decodes run one step ahead (see the module docs).
    run_ahead: bool,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, cache: CacheConfig) -> Result<Self, SchedulerError> {
        config.validate().map_err(SchedulerError::InvalidConfig)?;
        Ok(Self {
            config,
            kv: KvCacheManager::new(cache)?,
            seqs: FastMap::default(),
            waiting: BTreeMap::new(),
            running: Vec::new(),
            pending_children: FastMap::default(),
            next_arrival: 0,
            step_id: 0,
            counters: SchedulerCounters::default(),
            max_in_flight: 1,
            in_flight: FastMap::default(),
            run_ahead: false,
        })
    }

    /// Queues one sequence. Refused when its prompt could not fit even in an empty cache.
    pub fn add(&mut self, seq: NewSequence) -> Result<(), SchedulerError> {
        self.add_group(seq, &[])
    }

    /// Queues a group of `1 + fork_seq_ids.len()` sequences sharing `seq`'s prompt (n > 1):
    /// `seq` computes the prompt but its last token, then the others are forked from it.
    pub fn add_group(
        &mut self,
        seq: NewSequence,
        fork_seq_ids: &[SeqId],
    ) -> Result<(), SchedulerError> {
        let num_seqs = 1 + fork_seq_ids.len();
        if num_seqs > self.config.max_num_seqs {
            return Err(SchedulerError::GroupTooLarge {
                num_seqs,
                max_num_seqs: self.config.max_num_seqs,
            });
        }
        if seq.prompt_token_ids.is_empty() {
            return Err(SchedulerError::EmptyPrompt(seq.seq_id));
        }
        let mut ids: Vec<SeqId> = Vec::with_capacity(num_seqs);
        for &id in std::iter::once(&seq.seq_id).chain(fork_seq_ids) {
            if self.is_known(id) || ids.contains(&id) {
                return Err(SchedulerError::DuplicateSeqId(id));
            }
            ids.push(id);
        }
        let key = SeqKey {
            priority: seq.priority,
            arrival: self.next_arrival,
        };
        let mut s = Sequence::new(seq.seq_id, key, seq.prompt_token_ids);
        s.prefix_cache = seq.prefix_cache;
        s.fork_children = fork_seq_ids
            .iter()
            .zip(key.arrival + 1..)
            .map(|(&id, arrival)| (id, arrival))
            .collect();
        let num_blocks_needed = s.min_blocks_needed(self.kv.config());
        if num_blocks_needed > self.kv.num_blocks() {
            return Err(SchedulerError::TooLong {
                seq_id: seq.seq_id,
                num_blocks_needed,
                num_blocks: self.kv.num_blocks(),
            });
        }
        self.next_arrival += num_seqs as u64;
        for &child_id in fork_seq_ids {
            self.pending_children.insert(child_id, seq.seq_id);
        }
        self.waiting.insert(key, seq.seq_id);
        self.seqs.insert(seq.seq_id, s);
        Ok(())
    }

    /// The engine decided the sequence is done: frees its blocks now. Returns its stats, or
    /// `None` for an unknown id.
    pub fn finish(&mut self, seq_id: SeqId) -> Option<SeqStats> {
        self.remove(seq_id)
    }

    /// The client went away: frees the sequence's blocks now, so this step can use them.
    pub fn abort(&mut self, seq_id: SeqId) -> Option<SeqStats> {
        self.remove(seq_id)
    }

    /// Lets up to `n` steps be scheduled before they are committed (pipeline stages).
    pub fn set_max_in_flight(&mut self, n: usize) {
        self.max_in_flight = n.max(1);
    }

    /// Whether `seq_id` is in a step scheduled but not committed yet.
    pub fn is_in_flight(&self, seq_id: SeqId) -> bool {
        self.in_flight.contains_key(&seq_id)
    }

    /// Runs decodes one step ahead: a sequence that the one step in flight samples may be
    /// scheduled again before that step is committed, for one token whose id is the one the
    /// step in flight samples (`ScheduledSeq::run_ahead`). At most one step is in flight when
    /// `schedule` is called; its plan is committed before the run-ahead one.
    pub fn set_run_ahead(&mut self, on: bool) {
        self.run_ahead = on;
        if on {
            self.max_in_flight = self.max_in_flight.max(2);
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn kv_cache(&self) -> &KvCacheManager {
        &self.kv
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Waiting sequences, group members not forked yet included.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len() + self.pending_children.len()
    }

    pub fn has_unfinished(&self) -> bool {
        !self.seqs.is_empty()
    }

    /// Fraction of KV-cache blocks in use, in `[0, 1]`.
    pub fn kv_usage(&self) -> f64 {
        self.kv.usage()
    }

    pub fn num_preemptions_total(&self) -> u64 {
        self.counters.num_preemptions_total
    }

    pub fn counters(&self) -> SchedulerCounters {
        self.counters
    }

    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.kv.prefix_cache_stats()
    }

    /// Stats of a live sequence (a group member not forked yet has none so far).
    pub fn seq_stats(&self, seq_id: SeqId) -> Option<SeqStats> {
        match self.seqs.get(&seq_id) {
            Some(seq) => Some(seq.stats),
            None => self
                .pending_children
                .get(&seq_id)
                .map(|_| SeqStats::default()),
        }
    }

    /// Draft tokens for the sequence's next decode to verify after its last token
    /// (speculative decoding; see the module docs). Ignored unless it is running with one
    /// token left to compute, and when steps run ahead or in flight (their plans are made
    /// before the tokens they would verify are known).
    pub fn set_draft(&mut self, seq_id: SeqId, draft: &[u32]) {
        if self.run_ahead || self.max_in_flight > 1 {
            return;
        }
        if let Some(seq) = self.seqs.get_mut(&seq_id) {
            seq.draft.clear();
            if seq.num_computed_tokens > 0 && seq.num_remaining() == 1 {
                seq.draft.extend_from_slice(draft);
            }
        }
    }

    /// Tokens of a live sequence, prompt then generated.
    pub fn token_ids(&self, seq_id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&seq_id).map(|s| s.token_ids.as_slice())
    }

    fn is_known(&self, seq_id: SeqId) -> bool {
        self.seqs.contains_key(&seq_id) || self.pending_children.contains_key(&seq_id)
    }

    fn insert_running(&mut self, key: SeqKey, seq_id: SeqId) {
        let idx = self.running.partition_point(|(k, _)| *k < key);
        self.running.insert(idx, (key, seq_id));
    }

    /// Takes a sequence out of the queues and frees its blocks. An unforked group's computing
    /// sequence hands the group over to its first waiting member, which starts from the prompt.
    fn remove(&mut self, seq_id: SeqId) -> Option<SeqStats> {
        if let Some(parent_id) = self.pending_children.remove(&seq_id) {
            if let Some(parent) = self.seqs.get_mut(&parent_id) {
                parent.fork_children.retain(|&(id, _)| id != seq_id);
            }
            return Some(SeqStats::default());
        }
        self.in_flight.remove(&seq_id);
        let seq = self.seqs.remove(&seq_id)?;
        if let Ok(idx) = self.running.binary_search_by(|(k, _)| k.cmp(&seq.key)) {
            self.running.remove(idx);
        }
        self.waiting.remove(&seq.key);
        self.kv.free(seq_id);
        let mut children = seq.fork_children.into_iter();
        if let Some((heir_id, arrival)) = children.next() {
            let key = SeqKey {
                priority: seq.key.priority,
                arrival,
            };
            let prompt = seq.token_ids[..seq.num_prompt_tokens].to_vec();
            let mut heir = Sequence::new(heir_id, key, prompt);
            heir.fork_children = children.collect();
            self.pending_children.remove(&heir_id);
            for &(id, _) in &heir.fork_children {
                self.pending_children.insert(id, heir_id);
            }
            self.waiting.insert(key, heir_id);
            self.seqs.insert(heir_id, heir);
        }
        Some(seq.stats)
    }

    /// Forks the waiting group members of `parent_id` into running sequences sharing its blocks.
    fn fork_children(&mut self, parent_id: SeqId) {
        let Some(parent) = self.seqs.get_mut(&parent_id) else {
            return;
        };
        let children = std::mem::take(&mut parent.fork_children);
        let parent = parent.clone();
        for (child_id, arrival) in children {
            self.pending_children.remove(&child_id);
            let key = SeqKey {
                priority: parent.key.priority,
                arrival,
            };
            let mut child = Sequence::new(child_id, key, parent.token_ids.clone());
            child.stats.cached_tokens = parent.stats.cached_tokens;
            child.admitted = true;
            if self.kv.fork(parent_id, child_id).is_ok() {
                child.num_computed_tokens = parent.num_computed_tokens;
                self.insert_running(key, child_id);
            } else {
                // Cannot happen while ids are unique; recomputing is still correct.
                self.waiting.insert(key, child_id);
            }
            self.seqs.insert(child_id, child);
        }
    }

    /// Checks the invariants in the module docs and the KV manager's. The engine calls it when
    /// it goes idle; an error is a bug.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.kv.check_invariants()?;
        let num_reserved: usize = (self.running.iter())
            .filter_map(|(_, id)| self.seqs.get(id))
            .map(|s| s.fork_children.len())
            .sum();
        if self.running.len() + num_reserved > self.config.max_num_seqs {
            return Err(format!(
                "{} running + {num_reserved} reserved > max_num_seqs",
                self.running.len()
            ));
        }
        if self.seqs.len() != self.running.len() + self.waiting.len() {
            return Err("a sequence is in no queue or in both".into());
        }
        if self.running.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err("running is not sorted by key".into());
        }
        let bs = self.kv.block_size();
        for &(key, seq_id) in &self.running {
            let seq = self
                .seqs
                .get(&seq_id)
                .ok_or(format!("running {seq_id} unknown"))?;
            let table = self
                .kv
                .block_table(seq_id)
                .ok_or(format!("running {seq_id} has no table"))?;
            if seq.seq_id != seq_id
                || seq.key != key
                || table.len() < seq.num_computed_tokens.div_ceil(bs)
            {
                return Err(format!("running {seq_id}: wrong key or short block table"));
            }
            if seq.num_computed_tokens > seq.num_tokens() {
                return Err(format!("running {seq_id}: computed beyond its tokens"));
            }
        }
        for (&key, &seq_id) in &self.waiting {
            let seq = self
                .seqs
                .get(&seq_id)
                .ok_or(format!("waiting {seq_id} unknown"))?;
            if seq.seq_id != seq_id
                || seq.key != key
                || seq.num_computed_tokens != 0
                || self.kv.has_table(seq_id)
            {
                return Err(format!(
                    "waiting {seq_id}: wrong key, computed tokens or a table"
                ));
            }
        }
        for (&child_id, parent_id) in &self.pending_children {
            let listed = self
                .seqs
                .get(parent_id)
                .is_some_and(|p| p.fork_children.iter().any(|&(id, _)| id == child_id));
            if !listed {
                return Err(format!("group member {child_id} lost its parent"));
            }
        }
        Ok(())
    }
}
