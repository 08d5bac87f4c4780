//! `schedule()`: the phases of one step (see the module docs of `scheduler`).

use super::plan::{ScheduledSeq, StepPlan};
use super::sequence::SeqKey;
use super::{Scheduler, SeqId};
use crate::kv_cache::{BlockCopy, ComputedBlocks};

/// Which running sequences a pass serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// One token left: decodes (and last prompt tokens).
    Decode,
    /// More than one token left: prefill chunks.
    Prefill,
}

/// Whether a prefill has started: one that has may always continue in chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefill {
    Fresh,
    Continued,
}

/// The step being built.
struct StepBuilder {
    step_id: u64,
    /// Tokens left in this step.
    budget: usize,
    /// `(seq_id, start, num_new)` in scheduling order.
    scheduled: Vec<(SeqId, usize, usize)>,
    block_copies: Vec<BlockCopy>,
    preempted_seq_ids: Vec<SeqId>,
    too_long_seq_ids: Vec<SeqId>,
    /// Background sequences get no tokens in this step (a foreground prefill is pending).
    background_yields: bool,
}

impl Scheduler {
    /// Decides the next step. Never fails: lack of blocks preempts or defers sequences.
    pub fn schedule(&mut self) -> StepPlan {
        self.step_id += 1;
        let mut step = StepBuilder {
            step_id: self.step_id,
            budget: self.config.max_num_batched_tokens,
            scheduled: Vec::new(),
            block_copies: Vec::new(),
            preempted_seq_ids: Vec::new(),
            too_long_seq_ids: Vec::new(),
            background_yields: self.foreground_prefill_pending(),
        };
        self.schedule_running(&mut step, Pass::Decode);
        self.schedule_running(&mut step, Pass::Prefill);
        // As vLLM: a step short of blocks admits nobody new.
        if step.preempted_seq_ids.is_empty() {
            self.schedule_waiting(&mut step);
        }
        self.build_plan(step)
    }

    fn schedule_running(&mut self, step: &mut StepBuilder, pass: Pass) {
        let mut i = 0;
        while i < self.running.len() && step.budget > 0 {
            let seq_id = self.running[i].1;
            let Some(seq) = self.seqs.get(&seq_id) else {
                i += 1;
                continue;
            };
            if step.background_yields && self.is_background(seq.key) {
                i += 1;
                continue;
            }
            if pass == Pass::Decode && self.can_run_ahead(seq_id, step.step_id) {
                self.schedule_run_ahead(step, seq_id);
                i += 1;
                continue;
            }
            let remaining = seq.num_remaining();
            let wanted = match pass {
                Pass::Decode => remaining == 1,
                Pass::Prefill => remaining > 1,
            };
            if !wanted
                || seq.last_scheduled_step == step.step_id
                || self.in_flight.contains_key(&seq_id)
            {
                i += 1;
                continue;
            }
            let (start, has_draft) = (seq.num_computed_tokens, !seq.draft.is_empty());
            if pass == Pass::Decode && has_draft && self.schedule_draft(step, seq_id) {
                i += 1;
                continue;
            }
            let Some(num_new) = self.num_new_tokens(remaining, step.budget, Prefill::Continued)
            else {
                i += 1;
                continue;
            };
            // A chunk is cut to what the pool can hold (with a window, the window's blocks);
            // nothing fits once the sequence has outgrown it.
            let num_new = num_new.min(self.kv.config().max_new_tokens(start));
            if num_new == 0 {
                self.drop_too_long(seq_id, step);
                continue;
            }
            loop {
                if let Some(copies) = self.kv.allocate_slots(seq_id, start, num_new, None) {
                    self.mark_scheduled(step, seq_id, start, num_new, copies);
                    i += 1;
                    break;
                }
                // Out of blocks. Decodes take from the end of the order (maybe themselves);
                // prefills only from sequences after them not scheduled yet, else they wait.
                let victim = match pass {
                    // `i` itself is never in flight, so a victim always exists.
                    Pass::Decode => self.last_preemptible(i),
                    Pass::Prefill => match self.last_unscheduled_after(i, step.step_id) {
                        Some(v) => v,
                        None => return,
                    },
                };
                self.preempt(victim, step);
                if victim == i {
                    break;
                }
            }
        }
    }

    /// In flight in exactly one step, which samples it (so its next token is on the way), and
    /// not scheduled yet in this one.
    fn can_run_ahead(&self, seq_id: SeqId, step_id: u64) -> bool {
        self.run_ahead
            && self.in_flight.get(&seq_id) == Some(&1)
            && self.seqs.get(&seq_id).is_some_and(|s| {
                s.num_pending_samples == 1
                    && s.fork_children.is_empty()
                    && s.last_scheduled_step != step_id
            })
    }

    /// One decode at the position of the token in flight, if its slot can be had without
    /// preempting anybody (else the sequence waits for the commit, as without running ahead).
    fn schedule_run_ahead(&mut self, step: &mut StepBuilder, seq_id: SeqId) {
        let Some(seq) = self.seqs.get(&seq_id) else {
            return;
        };
        let start = seq.num_tokens();
        if step.budget == 0 || self.kv.config().max_new_tokens(start) == 0 {
            return;
        }
        if let Some(copies) = self.kv.allocate_slots(seq_id, start, 1, None) {
            self.mark_scheduled(step, seq_id, start, 1, copies);
        }
    }

    /// A decode with the sequence's draft after its last token (speculative decoding), if
    /// the draft's slots can be had without preempting anybody; the draft is cut to the
    /// step's budget and the cache. Whether it was scheduled (else the plain decode follows).
    fn schedule_draft(&mut self, step: &mut StepBuilder, seq_id: SeqId) -> bool {
        let cache = self.kv.config();
        let Some(seq) = self.seqs.get_mut(&seq_id) else {
            return false;
        };
        let start = seq.num_computed_tokens;
        let room = cache.max_new_tokens(start).saturating_sub(1);
        let k = seq.draft.len().min(step.budget.saturating_sub(1)).min(room);
        seq.draft.truncate(k);
        if k == 0 {
            return false;
        }
        match self.kv.allocate_slots(seq_id, start, 1 + k, None) {
            Some(copies) => {
                self.mark_scheduled(step, seq_id, start, 1 + k, copies);
                true
            }
            None => {
                if let Some(seq) = self.seqs.get_mut(&seq_id) {
                    seq.draft.clear();
                }
                false
            }
        }
    }

    fn schedule_waiting(&mut self, step: &mut StepBuilder) {
        // Seats: running sequences plus the unforked members of running groups.
        let mut num_seats = self.running.len()
            + (self.running.iter())
                .filter_map(|(_, id)| self.seqs.get(id))
                .map(|s| s.fork_children.len())
                .sum::<usize>();
        while step.budget > 0 {
            let Some((&key, &seq_id)) = self.waiting.first_key_value() else {
                break;
            };
            let Some(seq) = self.seqs.get(&seq_id) else {
                self.waiting.remove(&key);
                continue;
            };
            let background = self.is_background(key);
            if step.background_yields && background {
                break;
            }
            let group_size = 1 + seq.fork_children.len();
            if num_seats + group_size > self.config.max_num_seqs {
                // A foreground sequence takes a background one's seat.
                if !background && self.preempt_background(step, &mut num_seats) {
                    continue;
                }
                break;
            }
            if seq.min_blocks_needed(self.kv.config()) > self.kv.num_blocks() {
                self.drop_too_long(seq_id, step);
                continue;
            }
            let hits = match seq.prefix_cache {
                true => self.kv.computed_blocks(&seq.token_ids),
                false => ComputedBlocks::default(),
            };
            let num_computed = hits.num_computed_tokens;
            let remaining = seq.target_tokens() - num_computed;
            let num_new = match remaining {
                0 => 0,
                _ => match self.num_new_tokens(remaining, step.budget, Prefill::Fresh) {
                    Some(n) => n.min(self.kv.config().max_new_tokens(num_computed)),
                    None => break,
                },
            };
            if self
                .kv
                .allocate_slots(seq_id, num_computed, num_new, Some(&hits))
                .is_none()
            {
                // Or its blocks (the prefix hits are looked up again with the blocks freed).
                if !background && self.preempt_background(step, &mut num_seats) {
                    continue;
                }
                break;
            }
            self.waiting.remove(&key);
            num_seats += group_size;
            self.admit(key, seq_id, num_computed);
            if num_new > 0 {
                self.mark_scheduled(step, seq_id, num_computed, num_new, Vec::new());
            } else {
                // Prefix hits reach the fork point: the group runs from the next step.
                self.fork_children(seq_id);
            }
        }
    }

    fn is_background(&self, key: SeqKey) -> bool {
        self.config
            .background_priority
            .is_some_and(|p| key.priority >= p)
    }

    /// Whether a foreground sequence has prompt tokens to compute: one waiting (the first
    /// waiting is the best), or a running prefill that no step in flight is computing.
    fn foreground_prefill_pending(&self) -> bool {
        if self.config.background_priority.is_none() {
            return false;
        }
        let waiting =
            (self.waiting.first_key_value()).is_some_and(|(k, _)| !self.is_background(*k));
        waiting
            || (self.running.iter())
                .take_while(|(k, _)| !self.is_background(*k))
                .any(|(_, id)| {
                    !self.in_flight.contains_key(id)
                        && self.seqs.get(id).is_some_and(|s| s.num_remaining() > 1)
                })
    }

    /// Preempts the last running background sequence that this step has not scheduled and
    /// no step in flight is writing; whether there was one. Its seats are given back.
    fn preempt_background(&mut self, step: &mut StepBuilder, num_seats: &mut usize) -> bool {
        let victim = (0..self.running.len()).rev().find(|&j| {
            let (key, seq_id) = self.running[j];
            self.is_background(key)
                && !self.in_flight.contains_key(&seq_id)
                && (self.seqs.get(&seq_id)).is_some_and(|s| s.last_scheduled_step != step.step_id)
        });
        let Some(j) = victim else {
            return false;
        };
        let seats = (self.seqs.get(&self.running[j].1)).map_or(1, |s| 1 + s.fork_children.len());
        self.preempt(j, step);
        *num_seats = num_seats.saturating_sub(seats);
        true
    }

    fn admit(&mut self, key: SeqKey, seq_id: SeqId, num_computed: usize) {
        if let Some(seq) = self.seqs.get_mut(&seq_id) {
            seq.num_computed_tokens = num_computed;
            if !seq.admitted {
                seq.admitted = true;
                seq.stats.cached_tokens = num_computed.min(seq.num_prompt_tokens);
            }
        }
        self.insert_running(key, seq_id);
    }

    /// Tokens a sequence with `remaining` tokens to compute gets from `budget`, or `None` when
    /// it must wait (chunking off and a fresh prefill does not fit).
    fn num_new_tokens(&self, remaining: usize, budget: usize, prefill: Prefill) -> Option<usize> {
        if remaining == 1 {
            return Some(1);
        }
        let n = if self.config.enable_chunked_prefill {
            remaining.min(self.config.max_prefill_chunk_tokens)
        } else if remaining <= budget
            || remaining > self.config.max_num_batched_tokens
            || prefill == Prefill::Continued
        {
            remaining
        } else {
            return None;
        };
        Some(n.min(budget))
    }

    fn mark_scheduled(
        &mut self,
        step: &mut StepBuilder,
        seq_id: SeqId,
        start: usize,
        num_new: usize,
        copies: Vec<BlockCopy>,
    ) {
        if let Some(seq) = self.seqs.get_mut(&seq_id) {
            seq.last_scheduled_step = step.step_id;
            // Sampled: the step ends at the last known token, or runs ahead of it.
            if self.run_ahead && start + num_new >= seq.num_tokens() {
                seq.num_pending_samples += 1;
            }
        }
        if self.max_in_flight > 1 {
            *self.in_flight.entry(seq_id).or_default() += 1;
        }
        step.budget -= num_new;
        step.scheduled.push((seq_id, start, num_new));
        step.block_copies.extend(copies);
    }

    /// Index of the last running sequence after `i` that this step has not scheduled (and
    /// that no step in flight is writing).
    fn last_unscheduled_after(&self, i: usize, step_id: u64) -> Option<usize> {
        (i + 1..self.running.len()).rev().find(|&j| {
            let seq_id = self.running[j].1;
            !self.in_flight.contains_key(&seq_id)
                && self
                    .seqs
                    .get(&seq_id)
                    .is_some_and(|s| s.last_scheduled_step != step_id)
        })
    }

    /// The last running sequence not in flight, at `i` or after it.
    fn last_preemptible(&self, i: usize) -> usize {
        (i..self.running.len())
            .rev()
            .find(|&j| !self.in_flight.contains_key(&self.running[j].1))
            .unwrap_or(i)
    }

    /// Takes back the blocks of `running[idx]`; it waits and recomputes from its prefix hits.
    fn preempt(&mut self, idx: usize, step: &mut StepBuilder) {
        let (key, seq_id) = self.running.remove(idx);
        self.kv.free(seq_id);
        if let Some(seq) = self.seqs.get_mut(&seq_id) {
            seq.num_computed_tokens = 0;
            seq.draft.clear();
            seq.stats.num_preemptions += 1;
        }
        self.waiting.insert(key, seq_id);
        self.counters.num_preemptions_total += 1;
        step.preempted_seq_ids.push(seq_id);
    }

    /// Drops a sequence (and its unforked group) that cannot fit in the whole cache.
    fn drop_too_long(&mut self, seq_id: SeqId, step: &mut StepBuilder) {
        if let Some(seq) = self.seqs.get_mut(&seq_id) {
            for (child_id, _) in std::mem::take(&mut seq.fork_children) {
                self.pending_children.remove(&child_id);
                step.too_long_seq_ids.push(child_id);
            }
        }
        self.remove(seq_id);
        step.too_long_seq_ids.push(seq_id);
    }

    fn build_plan(&self, step: StepBuilder) -> StepPlan {
        let mut plan = StepPlan {
            step_id: step.step_id,
            seqs: Vec::with_capacity(step.scheduled.len()),
            block_copies: step.block_copies,
            preempted_seq_ids: step.preempted_seq_ids,
            too_long_seq_ids: step.too_long_seq_ids,
            num_batched_tokens: 0,
        };
        for (seq_id, start, num_new) in step.scheduled {
            let (Some(seq), Some(table)) = (self.seqs.get(&seq_id), self.kv.block_table(seq_id))
            else {
                continue;
            };
            let end = start + num_new;
            plan.num_batched_tokens += num_new;
            let run_ahead = start >= seq.num_tokens();
            // Positions past the known tokens (not running ahead) are the draft's.
            let known_end = end.min(seq.num_tokens());
            let num_draft = match run_ahead {
                true => 0,
                false => (end - known_end).min(seq.draft.len()),
            };
            plan.seqs.push(ScheduledSeq {
                seq_id,
                start,
                end,
                token_ids: match run_ahead {
                    true => Vec::new(),
                    false => seq.token_ids[start..known_end].to_vec(),
                },
                draft_token_ids: seq.draft[..num_draft].to_vec(),
                block_table: table.to_vec(),
                sample: end >= seq.num_tokens(),
                run_ahead,
                num_prompt_tokens: seq.num_prompt_tokens,
            });
        }
        plan
    }
}
