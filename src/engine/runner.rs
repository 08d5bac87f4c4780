//! The model runner: turns a `StepPlan` into one flat `ForwardBatch`, runs the forward pass,
//! and samples a token for each sequence the plan asks to sample.
//!
//! It keeps what it needs per sequence across steps (the sampler with its generator and
//! penalty counts), so a sequence's sampling parameters cross once, when it is added.
//!
//! The model is a `RankGroup`: one rank is today's single-model path; with tensor or pipeline
//! parallelism the group broadcasts the batch to its ranks and returns the gathered logits.

use std::collections::HashMap;

use crate::kernels::{Backend, BatchSeq, ForwardBatch};
use crate::model::rank_group::RankGroup;
use crate::model::sampling::{SampledToken, SamplingScratch, SequenceSampler};
use crate::scheduler::{SeqId, StepPlan};

/// What one step produced, per sampled sequence.
pub(crate) struct StepOutput {
    pub sampled: Vec<(SeqId, Result<SampledToken, String>)>,
}

pub(crate) struct ModelRunner<B: Backend> {
    model: RankGroup<B>,
    samplers: HashMap<SeqId, SequenceSampler>,
    scratch: SamplingScratch,
    batch: ForwardBatch,
    /// Test-only: per sequence, a fault and the samples left before it fires.
    #[cfg(feature = "fault-injection")]
    faults: HashMap<SeqId, (super::fault::Fault, usize)>,
}

impl<B: Backend> ModelRunner<B> {
    pub fn new(model: RankGroup<B>) -> Self {
        Self {
            model,
            samplers: HashMap::new(),
            scratch: SamplingScratch::default(),
            batch: ForwardBatch::default(),
            #[cfg(feature = "fault-injection")]
            faults: HashMap::new(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.model.lead().config.vocab_size
    }

    pub fn add_seq(&mut self, seq_id: SeqId, sampler: SequenceSampler) {
        self.samplers.insert(seq_id, sampler);
    }

    pub fn remove_seq(&mut self, seq_id: SeqId) {
        self.samplers.remove(&seq_id);
        #[cfg(feature = "fault-injection")]
        self.faults.remove(&seq_id);
    }

    /// Test-only: `fault` fires at the sequence's sample after `after` samples.
    #[cfg(feature = "fault-injection")]
    pub fn add_fault(&mut self, seq_id: SeqId, fault: super::fault::Fault, after: usize) {
        self.faults.insert(seq_id, (fault, after));
    }

    #[cfg(feature = "fault-injection")]
    fn due_fault(&mut self, seq_id: SeqId) -> Option<super::fault::Fault> {
        let (fault, left) = self.faults.get_mut(&seq_id)?;
        if *left > 0 {
            *left -= 1;
            return None;
        }
        Some(*fault)
    }

    fn build_batch(&mut self, plan: &StepPlan, block_size: usize) {
        let b = &mut self.batch;
        b.token_ids.clear();
        b.positions.clear();
        b.slot_mapping.clear();
        b.logits_rows.clear();
        b.seqs.clear();
        for s in &plan.seqs {
            let query_start = b.token_ids.len();
            b.token_ids.extend_from_slice(&s.token_ids);
            for p in s.start..s.end {
                b.positions.push(p as u32);
                let block = s.block_table[p / block_size];
                b.slot_mapping
                    .push(block * block_size as u32 + (p % block_size) as u32);
            }
            if s.sample {
                b.logits_rows.push((b.token_ids.len() - 1) as u32);
            }
            b.seqs.push(BatchSeq {
                query_start,
                query_len: s.end - s.start,
                context_len: s.end,
                block_table: s.block_table.clone(),
            });
        }
    }

    /// Steps the model can hold in flight (its pipeline stages); the engine may `submit` that
    /// many plans before it `collect`s the first.
    pub fn max_in_flight(&self) -> usize {
        self.model.max_in_flight()
    }

    /// Starts `plan` on every rank (with more than one stage, returns before it is done).
    pub fn submit(&mut self, plan: &StepPlan, block_size: usize) -> Result<(), String> {
        self.build_batch(plan, block_size);
        self.model
            .submit(&self.batch, &plan.block_copies)
            .map_err(|e| format!("the forward pass failed: {e}"))
    }

    /// Waits for the oldest submitted step (`submitted` is what `submit` returned for it) and
    /// returns its logits, `[sampled rows, vocab]`.
    pub fn collect_logits(&mut self, submitted: Result<(), String>) -> Result<Vec<f32>, String> {
        submitted.and_then(|()| {
            self.model
                .collect()
                .map_err(|e| format!("the forward pass failed: {e}"))
        })
    }

    /// Samples a token for each sequence `plan` asks to sample, from the logits its step
    /// returned (or fails them all with the step's error).
    pub fn sample(&mut self, plan: &StepPlan, logits: Result<Vec<f32>, String>) -> StepOutput {
        let logits = match logits {
            Ok(logits) => logits,
            Err(msg) => {
                let sampled = plan.seqs.iter().filter(|s| s.sample);
                return StepOutput {
                    sampled: sampled.map(|s| (s.seq_id, Err(msg.clone()))).collect(),
                };
            }
        };
        let vocab = self.vocab_size();
        let mut sampled = Vec::with_capacity(plan.seqs.len());
        let mut rows = logits.chunks_exact(vocab);
        let mut row_buf = Vec::new();
        for s in plan.seqs.iter().filter(|s| s.sample) {
            let Some(row) = rows.next() else {
                sampled.push((
                    s.seq_id,
                    Err("the forward pass returned too few rows".into()),
                ));
                continue;
            };
            #[cfg(feature = "fault-injection")]
            let fault = self.due_fault(s.seq_id);
            row_buf.clear();
            row_buf.extend_from_slice(row);
            #[cfg(feature = "fault-injection")]
            if let Some(f) = fault {
                super::fault::corrupt_row(f, &mut row_buf);
            }
            let result = match self.samplers.get_mut(&s.seq_id) {
                None => Err(format!("no sampler for sequence {}", s.seq_id)),
                // NaN or +inf poisons softmax for this row only; the others sample as usual.
                Some(_) if row_buf.iter().any(|x| x.is_nan() || *x == f32::INFINITY) => {
                    Err("the model produced non-finite logits for this sequence".into())
                }
                Some(sampler) => {
                    #[allow(unused_mut)]
                    let mut t = sampler.sample(&mut row_buf, &mut self.scratch);
                    #[cfg(feature = "fault-injection")]
                    if fault == Some(super::fault::Fault::BadToken) {
                        t.token_id = vocab as u32;
                    }
                    if (t.token_id as usize) < vocab {
                        Ok(t)
                    } else {
                        Err(format!(
                            "sampled token {} is outside the vocabulary",
                            t.token_id
                        ))
                    }
                }
            };
            sampled.push((s.seq_id, result));
        }
        StepOutput { sampled }
    }
}
