//! The per-step sampling job: a token for each sequence a step samples, from the logits the
//! forward pass brought to the host (each sequence's `SequenceSampler` on its own row, the
//! rows in parallel) or from the rows a backend sampled on the device (`device_rows` describes
//! them, `take_device` checks what came back).
//!
//! It holds what sampling needs per sequence across steps (the sampler with its generator and
//! penalty counts), so a sequence's parameters cross once, when it is added. A row that
//! cannot give a token (non-finite logits, an id outside the vocabulary) fails its own
//! sequence only; the others sample as usual.

use std::collections::HashMap;
use std::time::Duration;

use super::constraint::ConstraintError;
use super::host::{SamplingScratch, SequenceSampler};
use super::params::SampledToken;
use crate::kernels::cpu::ops::all_below_inf;
use crate::kernels::sampling::{SampleRow, SampledRow, SamplingBatch};

/// A sequence, as the engine numbers them.
pub type SeqKey = u64;

/// Why a sequence got no token this step.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SampleError {
    #[error("the model produced non-finite logits for this sequence")]
    NonFiniteLogits,
    #[error("sampled token {0} is outside the vocabulary")]
    OutsideVocabulary(u32),
    #[error("no sampler for sequence {0}")]
    NoSampler(SeqKey),
    #[error("the forward pass returned too few rows")]
    TooFewRows,
    #[error("the sampler did not run")]
    NotRun,
    #[error(transparent)]
    Constraint(#[from] ConstraintError),
}

/// Test-only corruption of a sequence's draw, which the engine's fault injection arms
/// (`engine::fault`); it fires at the sequence's draw after `after` draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    /// The row's logits become NaN.
    NanLogits,
    /// One logit of the row becomes +inf.
    InfLogit,
    /// The draw "returns" an id outside the vocabulary.
    TokenOutsideVocabulary,
    /// The draw panics (which fails the whole step).
    Panic,
    /// The draw sleeps this long, once (a wedged step).
    Stall(Duration),
}

/// Each sampled sequence's token or error, in the order they were asked for; a sequence
/// that verified a draft has several entries in a row (its tokens in order, the last maybe
/// an error).
pub type Sampled = Vec<(SeqKey, Result<SampledToken, SampleError>)>;

#[derive(Default)]
pub struct StepSampler {
    samplers: HashMap<SeqKey, SequenceSampler>,
    /// Scratch of the parallel host sampler, one per row in flight (reused across steps).
    scratches: Vec<SamplingScratch>,
    /// The sampled sequences' rows, when the device samples.
    rows: SamplingBatch,
    /// Test-only: per sequence, a corruption and the draws left before it fires (empty unless
    /// the engine honours fault markers).
    corruptions: HashMap<SeqKey, (Corruption, usize)>,
}

impl StepSampler {
    pub fn add_seq(&mut self, seq: SeqKey, sampler: SequenceSampler) {
        self.samplers.insert(seq, sampler);
    }

    pub fn remove_seq(&mut self, seq: SeqKey) {
        self.samplers.remove(&seq);
        self.corruptions.remove(&seq);
    }

    /// Test-only: `corruption` fires at the sequence's draw after `after` draws.
    pub fn corrupt(&mut self, seq: SeqKey, corruption: Corruption, after: usize) {
        self.corruptions.insert(seq, (corruption, after));
    }

    fn due_corruption(&mut self, seq: SeqKey) -> Option<Corruption> {
        if self.corruptions.is_empty() {
            return None;
        }
        let (corruption, left) = self.corruptions.get_mut(&seq)?;
        if *left > 0 {
            *left -= 1;
            return None;
        }
        let corruption = *corruption;
        // A stall fires once; the others end the sequence where they fire.
        if matches!(corruption, Corruption::Stall(_)) {
            self.corruptions.remove(&seq);
        }
        Some(corruption)
    }

    /// The device rows of `seqs`, in order: each sequence's parameters, penalty tokens and
    /// bias (`SequenceSampler::device_row`; `vocab`: the logits row's length).
    pub fn device_rows(
        &mut self,
        seqs: impl Iterator<Item = SeqKey>,
        vocab: usize,
    ) -> &SamplingBatch {
        self.rows.clear();
        for seq in seqs {
            match self.samplers.get_mut(&seq) {
                Some(sampler) => sampler.device_row(&mut self.rows, vocab),
                // A placeholder row keeps the others aligned; `take_device` fails this one.
                None => self.rows.push(SampleRow::default(), &[], &[]),
            }
        }
        &self.rows
    }

    /// Records the ids the device sampled for `seqs` (the rows of `device_rows`, in order).
    pub fn take_device(
        &mut self,
        seqs: impl Iterator<Item = SeqKey>,
        rows: Vec<SampledRow>,
        vocab: usize,
    ) -> Sampled {
        let mut rows = rows.into_iter();
        let mut sampled = Vec::new();
        for seq in seqs {
            let Some(row) = rows.next() else {
                sampled.push((seq, Err(SampleError::TooFewRows)));
                continue;
            };
            let mut token_id = row.token_id;
            if self.due_corruption(seq) == Some(Corruption::TokenOutsideVocabulary) {
                token_id = vocab as u32;
            }
            let result = match self.samplers.get_mut(&seq) {
                None => Err(SampleError::NoSampler(seq)),
                // A NaN or +inf logit makes the row's log-sum-exp, so its logprob, NaN.
                Some(_) if row.logprob.is_nan() => Err(SampleError::NonFiniteLogits),
                Some(_) if token_id as usize >= vocab => {
                    Err(SampleError::OutsideVocabulary(token_id))
                }
                Some(sampler) => sampler
                    .observe_drawn(token_id)
                    .map(|()| SampledToken {
                        token_id,
                        logprob: row.logprob,
                        top_logprobs: row.top_logprobs,
                    })
                    .map_err(SampleError::from),
            };
            sampled.push((seq, result));
        }
        sampled
    }

    /// Samples `seqs` on the host from `logits` (`[rows, vocab]`, in order). A sequence comes
    /// with its draft (empty unless it speculates) and owns `1 + draft.len()` rows: the
    /// target's logits after its last token and after each draft token. It draws at each row
    /// in turn and stops after the first draw that differs from the draft, so it gets one to
    /// `1 + draft.len()` tokens, each what decoding without speculation draws there (the
    /// draws are per position, the penalties and grammar see the accepted tokens only). Its
    /// tokens are consecutive entries of the result. The sequences are independent (each has
    /// its own sampler and generator), so they run through `parallel(n, job)`, which must
    /// call `job(i)` once for each `i < n`.
    pub fn sample_host<'d>(
        &mut self,
        seqs: impl Iterator<Item = (SeqKey, &'d [u32])>,
        mut logits: Vec<f32>,
        vocab: usize,
        parallel: impl FnOnce(usize, &(dyn Fn(usize) + Sync)),
    ) -> Sampled {
        let vocab_len = vocab.max(1);
        let mut rest = logits.as_mut_slice();
        let mut jobs = Vec::new();
        // Sequences that cannot be sampled, each before the job it preceded.
        let mut early = Vec::new();
        for (seq, draft) in seqs {
            let len = (1 + draft.len()) * vocab_len;
            if rest.len() < len {
                early.push((jobs.len(), seq, SampleError::TooFewRows));
                continue;
            }
            let (rows, tail) = std::mem::take(&mut rest).split_at_mut(len);
            rest = tail;
            let Some(sampler) = self.samplers.remove(&seq) else {
                early.push((jobs.len(), seq, SampleError::NoSampler(seq)));
                continue;
            };
            let corruption = self.due_corruption(seq);
            jobs.push(std::sync::Mutex::new(SampleJob {
                seq,
                sampler,
                rows,
                draft,
                scratch: self.scratches.pop().unwrap_or_default(),
                corruption,
                result: None,
                accepted: Vec::new(),
            }));
        }
        parallel(jobs.len(), &|i: usize| {
            let mut job = jobs[i].lock().unwrap_or_else(|e| e.into_inner());
            job.run(vocab);
        });
        let mut sampled = Vec::with_capacity(jobs.len() + early.len());
        let mut early = early.into_iter().peekable();
        for (i, job) in jobs.into_iter().enumerate() {
            while let Some((_, seq, why)) = early.next_if(|e| e.0 == i) {
                sampled.push((seq, Err(why)));
            }
            let job = job.into_inner().unwrap_or_else(|e| e.into_inner());
            let seq = job.seq;
            // Drafted tokens the target drew too, then its own draw after them.
            sampled.extend(job.accepted.into_iter().map(|t| (seq, Ok(t))));
            sampled.push((seq, job.result.unwrap_or(Err(SampleError::NotRun))));
            self.samplers.insert(seq, job.sampler);
            self.scratches.push(job.scratch);
        }
        sampled.extend(early.map(|(_, seq, why)| (seq, Err(why))));
        sampled
    }
}

/// One sequence's draws from its logits rows, run on any thread.
struct SampleJob<'a> {
    seq: SeqKey,
    sampler: SequenceSampler,
    /// `[1 + draft.len(), vocab]`
    rows: &'a mut [f32],
    draft: &'a [u32],
    scratch: SamplingScratch,
    corruption: Option<Corruption>,
    /// The last draw: one that differs from the draft, or the one after all of it.
    result: Option<Result<SampledToken, SampleError>>,
    /// Draws before it, each equal to its draft token.
    accepted: Vec<SampledToken>,
}

impl SampleJob<'_> {
    fn run(&mut self, vocab: usize) {
        let rows = std::mem::take(&mut self.rows);
        for (i, row) in rows.chunks_exact_mut(vocab.max(1)).enumerate() {
            let drawn = self.draw(row, vocab);
            match (drawn, self.draft.get(i)) {
                (Ok(t), Some(&d)) if t.token_id == d => self.accepted.push(t),
                (drawn, _) => {
                    self.result = Some(drawn);
                    return;
                }
            }
        }
    }

    fn draw(&mut self, row: &mut [f32], vocab: usize) -> Result<SampledToken, SampleError> {
        match self.corruption.take() {
            Some(Corruption::NanLogits) => row.fill(f32::NAN),
            Some(Corruption::InfLogit) => {
                if let Some(x) = row.first_mut() {
                    *x = f32::INFINITY;
                }
            }
            Some(Corruption::Panic) => panic!("injected fault: panic while sampling"),
            Some(Corruption::Stall(d)) => std::thread::sleep(d),
            Some(Corruption::TokenOutsideVocabulary) => {
                self.corruption = Some(Corruption::TokenOutsideVocabulary)
            }
            None => {}
        }
        // NaN or +inf poisons softmax for this row only; the others sample as usual.
        if !all_below_inf(row) {
            return Err(SampleError::NonFiniteLogits);
        }
        let mut t = self.sampler.sample(row, &mut self.scratch)?;
        if self.corruption == Some(Corruption::TokenOutsideVocabulary) {
            t.token_id = vocab as u32;
        }
        if (t.token_id as usize) < vocab {
            Ok(t)
        } else {
            Err(SampleError::OutsideVocabulary(t.token_id))
        }
    }
}
