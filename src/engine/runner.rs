//! The model runner: turns a `StepPlan` into one flat `ForwardBatch`, runs the forward pass,
//! and samples a token for each sequence the plan asks to sample.
//!
//! It keeps what it needs per sequence across steps (the sampler with its generator and
//! penalty counts), so a sequence's sampling parameters cross once, when it is added.
//!
//! Sampling happens where the backend wants it: a backend that samples on the device gets
//! one `SamplingBatch` row per sampled sequence and returns only ids and asked-for logprobs
//! (the logits never leave the device); otherwise the logits come to the host and each
//! sequence's `SequenceSampler` draws from its own generator (the CPU's tuned path).
//!
//! The model is a `RankGroup`: one rank is today's single-model path; with tensor or pipeline
//! parallelism the group broadcasts the batch to its ranks and returns the gathered logits.

use std::collections::HashMap;

use super::forward_worker::{ForwardWorker, Reply};
use crate::kernels::sampling::{RowParams, SampledRow, SamplingBatch};
use crate::kernels::{Backend, BatchSeq, ForwardBatch};
use crate::model::rank_group::RankGroup;
use crate::model::sampling::{SampledToken, SamplingScratch, SequenceSampler};
use crate::scheduler::{SeqId, StepPlan};

/// What a step's forward pass returned.
pub(crate) enum Collected {
    /// `[sampled rows, vocab]`, to sample on the host.
    Logits(Vec<f32>),
    /// Sampled on the device, one per sampled sequence in plan order.
    Sampled(Vec<SampledRow>),
}

impl From<Reply> for Collected {
    fn from(r: Reply) -> Self {
        match r {
            Reply::Logits(l) => Self::Logits(l),
            Reply::Sampled(s) => Self::Sampled(s),
        }
    }
}

/// What one step produced, per sampled sequence.
pub(crate) struct StepOutput {
    pub sampled: Vec<(SeqId, Result<SampledToken, String>)>,
}

/// Where the model runs: on the engine thread, or on a worker thread (the CPU's test mode of
/// the overlapped loop).
enum Model<B: Backend> {
    Inline(Box<RankGroup<B>>),
    Worker(ForwardWorker),
}

pub(crate) struct ModelRunner<B: Backend> {
    model: Model<B>,
    /// Each sequence's last sampled id: the input of its run-ahead decode (overlapped loop).
    last_sampled: HashMap<SeqId, u32>,
    samplers: HashMap<SeqId, SequenceSampler>,
    /// Scratch of the parallel host sampler, one per row in flight (reused across steps).
    scratches: Vec<SamplingScratch>,
    batch: ForwardBatch,
    /// The sampled sequences' rows, when the device samples.
    rows: SamplingBatch,
    /// Test-only: per sequence, a fault and the samples left before it fires (empty unless
    /// the engine honours fault markers).
    faults: HashMap<SeqId, (super::fault::Fault, usize)>,
}

impl<B: Backend> ModelRunner<B> {
    pub fn new(model: RankGroup<B>) -> Self {
        Self::with_model(Model::Inline(Box::new(model)))
    }

    /// The model runs on a worker thread: `submit` returns at once.
    pub fn on_worker_thread(model: RankGroup<B>) -> Result<Self, crate::model::ModelError> {
        Ok(Self::with_model(Model::Worker(ForwardWorker::start(
            model,
        )?)))
    }

    fn with_model(model: Model<B>) -> Self {
        Self {
            model,
            last_sampled: HashMap::new(),
            samplers: HashMap::new(),
            scratches: Vec::new(),
            batch: ForwardBatch::default(),
            rows: SamplingBatch::default(),
            faults: HashMap::new(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match &self.model {
            Model::Inline(m) => m.lead().config.vocab_size,
            Model::Worker(w) => w.vocab_size,
        }
    }

    pub fn add_seq(&mut self, seq_id: SeqId, sampler: SequenceSampler) {
        self.samplers.insert(seq_id, sampler);
    }

    pub fn remove_seq(&mut self, seq_id: SeqId) {
        self.samplers.remove(&seq_id);
        self.last_sampled.remove(&seq_id);
        self.faults.remove(&seq_id);
    }

    /// Test-only: `fault` fires at the sequence's sample after `after` samples.
    pub fn add_fault(&mut self, seq_id: SeqId, fault: super::fault::Fault, after: usize) {
        self.faults.insert(seq_id, (fault, after));
    }

    fn due_fault(&mut self, seq_id: SeqId) -> Option<super::fault::Fault> {
        if self.faults.is_empty() {
            return None;
        }
        let (fault, left) = self.faults.get_mut(&seq_id)?;
        if *left > 0 {
            *left -= 1;
            return None;
        }
        let fault = *fault;
        // A stall fires once; the other faults end the sequence where they fire.
        if fault == super::fault::Fault::Stall {
            self.faults.remove(&seq_id);
        }
        Some(fault)
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
            if s.run_ahead {
                // The token its previous step sampled. None only if that step failed for the
                // sequence, which then ends: this row's output is never used.
                let token = self
                    .last_sampled
                    .get(&s.seq_id)
                    .copied()
                    .unwrap_or_default();
                b.token_ids.push(token);
            } else {
                b.token_ids.extend_from_slice(&s.token_ids);
            }
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
                prompt_len: s.num_prompt_tokens,
            });
        }
    }

    /// Steps the model can hold in flight (its pipeline stages); the engine may `submit` that
    /// many plans before it `collect`s the first.
    pub fn max_in_flight(&self) -> usize {
        match &self.model {
            Model::Inline(m) => m.max_in_flight(),
            Model::Worker(_) => 1,
        }
    }

    /// Starts `plan` on every rank (with more than one stage, returns before it is done).
    pub fn submit(&mut self, plan: &StepPlan, block_size: usize) -> Result<(), String> {
        self.build_batch(plan, block_size);
        let submitted = match &mut self.model {
            Model::Inline(m) => m.submit(&self.batch, &plan.block_copies),
            Model::Worker(w) => w.submit(&self.batch, &plan.block_copies),
        };
        submitted.map_err(|e| format!("the forward pass failed: {e}"))
    }

    /// Waits for the oldest submitted step (`submitted` is what `submit` returned for it).
    /// Where the backend samples on the device, samples it there (one row per sequence `plan`
    /// samples) and returns the ids; otherwise returns the logits, `[sampled rows, vocab]`.
    pub fn collect(
        &mut self,
        plan: &StepPlan,
        submitted: Result<(), String>,
    ) -> Result<Collected, String> {
        submitted?;
        let failed = |e| format!("the forward pass failed: {e}");
        let on_device = match &self.model {
            Model::Inline(m) => m.samples_on_device(),
            Model::Worker(w) => w.samples_on_device,
        };
        if !on_device {
            return match &mut self.model {
                Model::Inline(m) => m.collect().map(Collected::Logits),
                Model::Worker(w) => w.collect(None).map(Collected::from),
            }
            .map_err(failed);
        }
        self.rows.clear();
        for s in plan.seqs.iter().filter(|s| s.sample) {
            match self.samplers.get(&s.seq_id) {
                Some(sampler) => sampler.row(&mut self.rows),
                // A placeholder row keeps the others aligned; `sample` fails this sequence.
                None => self.rows.push(&RowParams::default(), &[], &[]),
            }
        }
        match &mut self.model {
            Model::Inline(m) => m.collect_sampled(&self.rows).map(Collected::Sampled),
            Model::Worker(w) => w.collect(Some(&self.rows)).map(Collected::from),
        }
        .map_err(failed)
    }

    /// A token for each sequence `plan` asks to sample, from what its step returned (or
    /// fails them all with the step's error).
    pub fn sample(&mut self, plan: &StepPlan, collected: Result<Collected, String>) -> StepOutput {
        match collected {
            Ok(Collected::Logits(logits)) => self.sample_on_host(plan, logits),
            Ok(Collected::Sampled(rows)) => self.take_sampled(plan, rows),
            Err(msg) => {
                let sampled = plan.seqs.iter().filter(|s| s.sample);
                StepOutput {
                    sampled: sampled.map(|s| (s.seq_id, Err(msg.clone()))).collect(),
                }
            }
        }
    }

    /// Records the ids the device sampled with their sequences' samplers.
    fn take_sampled(&mut self, plan: &StepPlan, rows: Vec<SampledRow>) -> StepOutput {
        let vocab = self.vocab_size();
        let mut rows = rows.into_iter();
        let mut sampled = Vec::with_capacity(plan.seqs.len());
        for s in plan.seqs.iter().filter(|s| s.sample) {
            let Some(row) = rows.next() else {
                sampled.push((s.seq_id, Err("the device returned too few rows".into())));
                continue;
            };
            let mut token_id = row.token_id;
            if self.due_fault(s.seq_id) == Some(super::fault::Fault::BadToken) {
                token_id = vocab as u32;
            }
            let result = match self.samplers.get_mut(&s.seq_id) {
                None => Err(format!("no sampler for sequence {}", s.seq_id)),
                // A NaN or +inf logit makes the row's log-sum-exp, so its logprob, NaN.
                Some(_) if row.logprob.is_nan() => {
                    Err("the model produced non-finite logits for this sequence".into())
                }
                Some(_) if token_id as usize >= vocab => Err(format!(
                    "sampled token {token_id} is outside the vocabulary"
                )),
                Some(sampler) => {
                    sampler.observe(token_id);
                    Ok(SampledToken {
                        token_id,
                        logprob: row.logprob,
                        top_logprobs: row.top_logprobs,
                    })
                }
            };
            if let Ok(t) = &result {
                self.last_sampled.insert(s.seq_id, t.token_id);
            }
            sampled.push((s.seq_id, result));
        }
        StepOutput { sampled }
    }

    /// Samples on the host, per sequence, from the step's logits. The rows are independent
    /// (each sequence has its own sampler and generator), so they run in parallel on the
    /// backend's host threads: the CPU's pool is otherwise idle while the engine samples.
    fn sample_on_host(&mut self, plan: &StepPlan, mut logits: Vec<f32>) -> StepOutput {
        let vocab = self.vocab_size();
        let mut rows = logits.chunks_exact_mut(vocab.max(1));
        let mut jobs = Vec::with_capacity(plan.seqs.len());
        let mut early = Vec::new();
        for s in plan.seqs.iter().filter(|s| s.sample) {
            let Some(row) = rows.next() else {
                early.push((
                    jobs.len(),
                    s.seq_id,
                    "the forward pass returned too few rows",
                ));
                continue;
            };
            let Some(sampler) = self.samplers.remove(&s.seq_id) else {
                early.push((jobs.len(), s.seq_id, "no sampler for this sequence"));
                continue;
            };
            jobs.push(std::sync::Mutex::new(SampleJob {
                seq_id: s.seq_id,
                sampler,
                row,
                scratch: self.scratches.pop().unwrap_or_default(),
                fault: self.due_fault(s.seq_id),
                result: None,
            }));
        }
        let run = |i: usize| {
            let mut job = jobs[i].lock().unwrap_or_else(|e| e.into_inner());
            job.run(vocab);
        };
        match &self.model {
            Model::Inline(m) => m.lead().backend().host_parallel(jobs.len(), &run),
            Model::Worker(_) => (0..jobs.len()).for_each(run),
        }
        let mut sampled = Vec::with_capacity(jobs.len() + early.len());
        for job in jobs {
            let job = job.into_inner().unwrap_or_else(|e| e.into_inner());
            let result = job
                .result
                .unwrap_or_else(|| Err("the sampler did not run".into()));
            if let Ok(t) = &result {
                self.last_sampled.insert(job.seq_id, t.token_id);
            }
            self.samplers.insert(job.seq_id, job.sampler);
            self.scratches.push(job.scratch);
            sampled.push((job.seq_id, result));
        }
        // Sequences that could not be sampled keep their place in plan order.
        for (at, seq_id, why) in early.into_iter().rev() {
            sampled.insert(at, (seq_id, Err(why.into())));
        }
        StepOutput { sampled }
    }
}

/// One sequence's draw from its logits row, run on any thread.
struct SampleJob<'a> {
    seq_id: SeqId,
    sampler: SequenceSampler,
    row: &'a mut [f32],
    scratch: SamplingScratch,
    fault: Option<super::fault::Fault>,
    result: Option<Result<SampledToken, String>>,
}

impl SampleJob<'_> {
    fn run(&mut self, vocab: usize) {
        if let Some(f) = self.fault {
            super::fault::corrupt_row(f, self.row);
        }
        // NaN or +inf poisons softmax for this row only; the others sample as usual.
        if !crate::kernels::cpu::ops::all_below_inf(self.row) {
            self.result = Some(Err(
                "the model produced non-finite logits for this sequence".into(),
            ));
            return;
        }
        let mut t = self.sampler.sample(self.row, &mut self.scratch);
        if self.fault == Some(super::fault::Fault::BadToken) {
            t.token_id = vocab as u32;
        }
        self.result = Some(if (t.token_id as usize) < vocab {
            Ok(t)
        } else {
            Err(format!(
                "sampled token {} is outside the vocabulary",
                t.token_id
            ))
        });
    }
}
