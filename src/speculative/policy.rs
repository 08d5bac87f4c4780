//! How much each sequence drafts: its draft length follows its acceptance, and a sequence
//! whose drafts keep failing pauses drafting (free text rarely repeats itself, and a rejected
//! draft token costs a row of compute).

use std::collections::HashMap;

use super::config::{SpeculativeConfig, SpeculativeMethod};
use super::cost::{best_draft_len, StepTimeFit};
use super::ngram::propose_ngram;
use super::suffix::SuffixIndex;

/// Tokens a sequence waits after its first failed stretch before drafting again; doubled on
/// each failure in a row, up to `MAX_PAUSE`.
const FIRST_PAUSE: usize = 8;
const MAX_PAUSE: usize = 256;
/// Weight kept by a sequence's past verifications at each new one.
const DECAY: f64 = 0.7;
/// The acceptance a sequence is assumed to have before its first verification, worth this
/// many draft tokens of evidence.
const PRIOR_ALPHA: f64 = 0.6;
const PRIOR_WEIGHT: f64 = 2.0;

/// One sequence's drafting record.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftPolicy {
    /// Recent accepted draft tokens and rejections (a verification that stopped short of
    /// its draft's end), decayed: a draft token's acceptance is their ratio.
    accepted: f64,
    rejected: f64,
    /// No drafts until the sequence has this many tokens.
    resume_at: usize,
    /// The next pause's length.
    pause: usize,
}

impl DraftPolicy {
    fn new() -> Self {
        Self {
            accepted: 0.0,
            rejected: 0.0,
            resume_at: 0,
            pause: FIRST_PAUSE,
        }
    }

    /// The probability that a draft token is accepted, given the one before it was.
    pub fn acceptance(&self) -> f64 {
        (self.accepted + PRIOR_ALPHA * PRIOR_WEIGHT)
            / (self.accepted + self.rejected + PRIOR_WEIGHT)
    }

    /// Records a verification: `accepted` of `drafted` tokens matched the target's draws,
    /// with the sequence `len` tokens long afterwards.
    fn record(&mut self, drafted: usize, accepted: usize, len: usize, c: &SpeculativeConfig) {
        if drafted == 0 {
            return;
        }
        self.accepted = DECAY * self.accepted + accepted as f64;
        self.rejected = DECAY * self.rejected + f64::from(u8::from(accepted < drafted));
        if self.acceptance() < c.min_acceptance {
            self.resume_at = len + self.pause;
            self.pause = (self.pause * 2).min(MAX_PAUSE);
            // After the pause, an even start.
            (self.accepted, self.rejected) = (0.0, 0.0);
        } else if accepted > 0 {
            self.pause = FIRST_PAUSE;
        }
    }
}

/// Proposes drafts for the engine's sequences and keeps their records and the step cost.
/// Keys are the engine's sequence ids.
#[derive(Debug)]
pub struct Speculator {
    config: SpeculativeConfig,
    seqs: HashMap<u64, DraftPolicy>,
    cost: StepTimeFit,
    /// The last proposal (a copy, so the caller may hand it on while the tokens it came from
    /// change).
    draft: Vec<u32>,
    /// A draft model's forward pass, in seconds (a decayed mean; 0 for the lookup methods,
    /// whose drafts cost nothing measurable).
    draft_pass: f64,
    /// `suffix`: recent finished sequences.
    index: Option<SuffixIndex>,
}

impl Speculator {
    pub fn new(config: SpeculativeConfig) -> Self {
        let index = (config.method == SpeculativeMethod::Suffix)
            .then(|| SuffixIndex::new(config.prompt_lookup_min, config.suffix_max_cached_requests));
        Self {
            index,
            config,
            seqs: HashMap::new(),
            cost: StepTimeFit::default(),
            draft: Vec::new(),
            draft_pass: 0.0,
        }
    }

    /// Records a step's forward pass: `rows` tokens computed in `seconds`.
    pub fn observe_step(&mut self, rows: usize, seconds: f64) {
        self.cost.observe(rows, seconds);
    }

    /// Whether a step with `num_decoding` sequences decoding may carry drafts at all
    /// (`disable_by_batch_size`; the step cost decides the rest).
    pub fn enabled_at(&self, num_decoding: usize) -> bool {
        let limit = self.config.disable_by_batch_size;
        limit == 0 || num_decoding < limit
    }

    /// Records a draft model's forward pass of `seconds`.
    pub fn observe_draft_pass(&mut self, seconds: f64) {
        self.draft_pass = if self.draft_pass == 0.0 {
            seconds
        } else {
            DECAY * self.draft_pass + (1.0 - DECAY) * seconds
        };
    }

    /// How many tokens the sequence, `len` tokens long, should draft, at most `room` (what
    /// its `max_tokens` and the context leave after the next one), in a step shared by
    /// `decodes` decoding sequences: as many as pay for their rows (and a draft model's
    /// passes) at the sequence's acceptance and the measured step cost, the most allowed
    /// until steps of two sizes have been timed; 0 while the sequence pauses.
    pub fn draft_len(&mut self, seq: u64, len: usize, room: usize, decodes: usize) -> usize {
        let c = &self.config;
        let policy = self.seqs.entry(seq).or_insert_with(DraftPolicy::new);
        if len < policy.resume_at {
            return 0;
        }
        let max_len = c.num_speculative_tokens.min(room);
        match self.cost.fit().filter(|_| !c.fixed_draft_length) {
            Some(cost) => {
                best_draft_len(max_len, policy.acceptance(), decodes, cost, self.draft_pass)
            }
            None => max_len,
        }
    }

    /// The lookup draft for the sequence whose tokens (prompt and output) are `tokens`, of
    /// [`draft_len`](Self::draft_len) tokens at most, and empty when nothing matches.
    pub fn propose(&mut self, seq: u64, tokens: &[u32], room: usize, decodes: usize) -> &[u32] {
        self.draft.clear();
        let k = self.draft_len(seq, tokens.len(), room, decodes);
        if k == 0 {
            return &self.draft;
        }
        let c = &self.config;
        let own = propose_ngram(tokens, c.prompt_lookup_min, c.prompt_lookup_max, k);
        let recent = (self.index.as_ref()).and_then(|ix| ix.lookup(tokens, c.prompt_lookup_max, k));
        // The longer match; the sequence's own on a tie.
        let draft = match (own, recent) {
            (Some(o), Some(r)) if r.0 > o.0 => r.1,
            (Some(o), _) => o.1,
            (None, Some(r)) => r.1,
            (None, None) => &[],
        };
        self.draft.extend_from_slice(draft);
        &self.draft
    }

    /// Records that `accepted` of the sequence's `drafted` tokens were accepted; it is `len`
    /// tokens long now.
    pub fn record(&mut self, seq: u64, drafted: usize, accepted: usize, len: usize) {
        if let Some(p) = self.seqs.get_mut(&seq) {
            p.record(drafted, accepted, len, &self.config);
        }
    }

    /// A sequence finished with these tokens (prompt and output): `suffix` indexes them.
    pub fn remember(&mut self, tokens: &[u32]) {
        if let Some(ix) = &mut self.index {
            ix.add(tokens);
        }
    }

    pub fn remove(&mut self, seq: u64) {
        self.seqs.remove(&seq);
    }

    /// The sequence's record, for tests.
    pub fn policy(&self, seq: u64) -> Option<&DraftPolicy> {
        self.seqs.get(&seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn speculator() -> Speculator {
        Speculator::new(SpeculativeConfig::parse(r#"{"method":"ngram"}"#).unwrap())
    }

    const T: [u32; 9] = [1, 2, 3, 4, 5, 6, 7, 1, 2];

    #[test]
    fn draft_length_follows_the_step_cost_and_acceptance() {
        let mut s = speculator();
        // No cost measured yet: the most allowed, capped by the room.
        assert_eq!(s.propose(0, &T, 8, 1), &[3, 4, 5, 6]);
        assert_eq!(s.propose(0, &T, 1, 1), &[3]);
        // Rows cost half a step: at the prior's acceptance a short draft pays.
        for rows in [1, 2, 8, 1, 64] {
            s.observe_step(rows, 0.005 + 0.005 * rows as f64);
        }
        let short = s.propose(0, &T, 8, 1).len();
        assert!((1..4).contains(&short), "{short}");
        // Full acceptance raises it; sixteen decodes on such rows stop it.
        s.record(0, short, short, 12);
        s.record(0, 4, 4, 16);
        assert!(s.propose(0, &T, 8, 1).len() > short);
        assert!(s.propose(0, &T, 8, 16).is_empty());
    }

    #[test]
    fn fixed_draft_length_ignores_the_step_cost() {
        let config = r#"{"method":"ngram","fixed_draft_length":true}"#;
        let mut s = Speculator::new(SpeculativeConfig::parse(config).unwrap());
        // Every row costs a whole step: no draft would pay, and sixteen decodes share it.
        for rows in [1, 2, 8, 1, 64] {
            s.observe_step(rows, 0.01 * rows as f64);
        }
        assert_eq!(s.propose(0, &T, 8, 16), &[3, 4, 5, 6]);
        assert_eq!(s.propose(0, &T, 2, 16), &[3, 4]);
    }

    #[test]
    fn failing_drafts_pause_for_longer_each_time() {
        let mut s = speculator();
        s.propose(0, &T, 8, 1);
        s.record(0, 4, 0, 9);
        // (0 + 1.2) / (1 + 2) = 0.4 >= 0.35: still drafting; a second miss pauses 8 tokens.
        assert!(!s.propose(0, &T, 8, 1).is_empty());
        s.record(0, 4, 0, 9);
        assert!(s.propose(0, &T, 8, 1).is_empty());
        let cycle = |n| T.iter().copied().cycle().take(n).collect::<Vec<u32>>();
        assert!(!s.propose(0, &cycle(17), 8, 1).is_empty());
        s.record(0, 4, 0, 17);
        s.record(0, 4, 0, 17);
        assert!(
            s.propose(0, &cycle(25), 8, 1).is_empty(),
            "second pause: 16"
        );
        assert!(!s.propose(0, &cycle(33), 8, 1).is_empty());
        s.remove(0);
        assert!(s.policy(0).is_none());
    }

    #[test]
    fn suffix_drafts_from_a_finished_request() {
        let mut s = Speculator::new(SpeculativeConfig::parse(r#"{"method":"suffix"}"#).unwrap());
        assert!(s.propose(0, &[7, 8, 9], 8, 1).is_empty());
        s.remember(&[5, 7, 8, 9, 10, 11, 12]);
        assert_eq!(s.propose(0, &[7, 8, 9], 8, 1), &[10, 11, 12]);
        // The sequence's own earlier match wins when it is as long.
        assert_eq!(s.propose(0, &[7, 8, 9, 1, 7, 8, 9], 8, 1), &[1, 7, 8, 9]);
        // A plain `ngram` speculator indexes nothing.
        let mut plain = speculator();
        plain.remember(&[5, 7, 8, 9, 10]);
        assert!(plain.propose(0, &[7, 8, 9], 8, 1).is_empty());
    }

    #[test]
    fn batch_size_limit() {
        let s = Speculator::new(
            SpeculativeConfig::parse(r#"{"method":"ngram","disable_by_batch_size":8}"#).unwrap(),
        );
        assert!(s.enabled_at(7));
        assert!(!s.enabled_at(8));
    }
}
