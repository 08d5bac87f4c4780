//! `commit()`: apply a finished step to the sequences.

use super::plan::StepPlan;
use super::{Scheduler, SchedulerError, SeqId};
use std::ops::Range;

use crate::kv_cache::hash::FastMap;

impl Scheduler {
    /// Records that `plan` ran: its positions are computed and `sampled` holds the tokens of
    /// every sequence the plan asked to sample: one, or for a sequence that verified a draft,
    /// its accepted draft tokens and then the target's own token (consecutive entries).
    /// Advances `num_computed_tokens`, appends the tokens, gives back the slots of rejected
    /// draft tokens (and any block they alone held), enters newly full blocks into the prefix
    /// cache and forks group members whose prompt is ready. Sequences finished or aborted since
    /// `schedule` are skipped.
    ///
    /// Checked first, so that an error changes nothing: the plan is the latest one, and the
    /// samples match its `sample` flags and drafts.
    pub fn commit(
        &mut self,
        plan: &StepPlan,
        sampled: &[(SeqId, u32)],
    ) -> Result<(), SchedulerError> {
        let samples = self.check_commit(plan, sampled)?;
        for entry in &plan.seqs {
            if let Some(n) = self.in_flight.get_mut(&entry.seq_id) {
                *n -= 1;
                if *n == 0 {
                    self.in_flight.remove(&entry.seq_id);
                }
            }
            let Some(seq) = self.seqs.get_mut(&entry.seq_id) else {
                continue;
            };
            if self.run_ahead && entry.sample {
                seq.num_pending_samples = seq.num_pending_samples.saturating_sub(1);
            }
            let num_prompt = entry
                .end
                .min(seq.num_prompt_tokens)
                .saturating_sub(entry.start);
            seq.stats.num_computed_prompt_tokens += num_prompt;
            self.counters.num_computed_prompt_tokens_total += num_prompt as u64;
            seq.num_computed_tokens = entry.end;
            seq.draft.clear();
            if let Some(range) = samples.get(&entry.seq_id) {
                let tokens = &sampled[range.clone()];
                // The accepted drafts' K/V stay; the rejected ones' slots are given back.
                seq.num_computed_tokens = entry.known_end() + tokens.len() - 1;
                seq.token_ids.extend(tokens.iter().map(|&(_, t)| t));
                self.counters.num_generated_tokens_total += tokens.len() as u64;
                if !entry.draft_token_ids.is_empty() {
                    self.kv.truncate(entry.seq_id, seq.num_computed_tokens);
                }
            }
            self.kv
                .cache_full_blocks(entry.seq_id, &seq.token_ids, seq.num_computed_tokens);
            if !seq.fork_children.is_empty() && seq.num_remaining() == 0 {
                self.fork_children(entry.seq_id);
            }
        }
        Ok(())
    }

    fn check_commit(
        &self,
        plan: &StepPlan,
        sampled: &[(SeqId, u32)],
    ) -> Result<FastMap<SeqId, Range<usize>>, SchedulerError> {
        // In flight, older plans come back after newer ones were scheduled; the per-sequence
        // checks below still catch a plan whose sequences moved on.
        let stale = if self.max_in_flight > 1 {
            plan.step_id > self.step_id
        } else {
            plan.step_id != self.step_id
        };
        if stale {
            return Err(SchedulerError::StalePlan {
                plan_step_id: plan.step_id,
                step_id: self.step_id,
            });
        }
        let to_sample: FastMap<SeqId, &[u32]> = plan
            .seqs
            .iter()
            .filter(|s| s.sample)
            .map(|s| (s.seq_id, s.draft_token_ids.as_slice()))
            .collect();
        // Each sampled sequence's run of entries in `sampled`.
        let mut samples: FastMap<SeqId, Range<usize>> =
            FastMap::with_capacity_and_hasher(sampled.len(), Default::default());
        let mut at = 0;
        while at < sampled.len() {
            let seq_id = sampled[at].0;
            let len = sampled[at..].iter().take_while(|s| s.0 == seq_id).count();
            let draft = to_sample.get(&seq_id);
            let fits = draft.is_some_and(|d| len <= 1 + d.len());
            if !fits || samples.insert(seq_id, at..at + len).is_some() {
                return Err(SchedulerError::UnexpectedSample(seq_id));
            }
            // Only tokens equal to the draft's can be accepted before the last.
            let accepted = sampled[at..at + len - 1].iter().map(|s| s.1);
            if draft.is_some_and(|d| !accepted.eq(d.iter().copied().take(len - 1))) {
                return Err(SchedulerError::DraftMismatch(seq_id));
            }
            at += len;
        }
        for entry in &plan.seqs {
            let Some(seq) = self.seqs.get(&entry.seq_id) else {
                continue;
            };
            // Running ahead, the sequence may be in a newer step too.
            let moved_on = match self.run_ahead {
                true => seq.last_scheduled_step < plan.step_id,
                false => seq.last_scheduled_step != plan.step_id,
            };
            let stale = moved_on
                || seq.num_computed_tokens != entry.start
                || entry.known_end() > seq.num_tokens()
                || entry.end < entry.start;
            if stale {
                return Err(SchedulerError::StalePlan {
                    plan_step_id: plan.step_id,
                    step_id: self.step_id,
                });
            }
            if entry.sample && !samples.contains_key(&entry.seq_id) {
                return Err(SchedulerError::MissingSample(entry.seq_id));
            }
        }
        Ok(samples)
    }
}
