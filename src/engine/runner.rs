//! The model runner: turns a `StepPlan` into one flat `ForwardBatch`, runs the forward pass,
//! and samples a token for each sequence the plan asks to sample.
//!
//! Sampling happens where the backend wants it (`sampling::StepSampler` holds each sequence's
//! sampler across steps): a backend that samples on the device gets one `SamplingBatch` row
//! per sampled sequence and returns only ids and asked-for logprobs (the logits never leave
//! the device); otherwise the logits come to the host and each sequence's `SequenceSampler`
//! draws from its own generator, the rows in parallel on the backend's threads (the CPU's
//! tuned path).
//!
//! The model is a `RankGroup`: one rank is today's single-model path; with tensor or pipeline
//! parallelism the group broadcasts the batch to its ranks and returns the gathered logits.

use std::collections::HashMap;
use std::sync::Arc;

use super::draft_model::DraftModel;
use super::forward_worker::{ForwardWorker, Reply};
use super::pooling::{PoolState, Pooling};
use super::request_error::StepError;
use crate::kernels::sampling::SampledRow;
use crate::kernels::{Backend, BatchSeq};
use crate::model::rank_group::{RankGroup, StepInput};
use crate::model::HostOutput;
use crate::sampling::{Corruption, SampledToken, SequenceSampler, StepSampler};
use crate::scheduler::{SeqId, StepPlan};
use crate::speculative::Speculator;

/// What a step's forward pass returned.
pub(crate) enum Collected {
    /// `[sampled rows, vocab]` to sample on the host, and the hidden rows.
    Logits(HostOutput),
    /// Sampled on the device, one per sampled sequence in plan order; the hidden rows.
    Sampled(Vec<SampledRow>, Vec<f32>),
}

impl From<Reply> for Collected {
    fn from(r: Reply) -> Self {
        match r {
            Reply::Logits(out) => Self::Logits(out),
            Reply::Sampled(s, hidden) => Self::Sampled(s, hidden),
        }
    }
}

/// What one step produced, per sampled sequence.
pub(crate) struct StepOutput {
    pub sampled: Vec<(SeqId, Result<SampledToken, StepError>)>,
    /// The embeddings of the pooled sequences whose prompt this step finished (each also
    /// has its entry in `sampled`, which the engine does not send).
    pub pooled: Vec<(SeqId, Result<Vec<f32>, StepError>)>,
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
    sampling: StepSampler,
    /// Speculative decoding's drafter and each sequence's drafting record, if on.
    speculator: Option<Speculator>,
    /// The draft model, when the speculative method is `draft_model`.
    draft_model: Option<DraftModel<B>>,
    /// The embedding each pooled sequence is making.
    pooling: HashMap<SeqId, PoolState>,
    /// The model's hidden size (the width of a hidden row).
    hidden_size: usize,
    /// The step being built; its buffers are reused once every rank has let go of the last.
    step: Arc<StepInput>,
}

impl<B: Backend> ModelRunner<B> {
    pub fn new(model: RankGroup<B>) -> Self {
        let hidden_size = model.lead().config.hidden_size;
        Self::with_model(Model::Inline(Box::new(model)), hidden_size)
    }

    /// The model runs on a worker thread: `submit` returns at once.
    pub fn on_worker_thread(model: RankGroup<B>) -> Result<Self, crate::model::ModelError> {
        let hidden_size = model.lead().config.hidden_size;
        let worker = ForwardWorker::start(model)?;
        Ok(Self::with_model(Model::Worker(worker), hidden_size))
    }

    fn with_model(model: Model<B>, hidden_size: usize) -> Self {
        Self {
            model,
            last_sampled: HashMap::new(),
            sampling: StepSampler::default(),
            speculator: None,
            draft_model: None,
            pooling: HashMap::new(),
            hidden_size,
            step: Arc::default(),
        }
    }

    pub fn set_speculator(&mut self, speculator: Option<Speculator>) {
        self.speculator = speculator;
    }

    pub fn speculator_mut(&mut self) -> Option<&mut Speculator> {
        self.speculator.as_mut()
    }

    pub fn set_draft_model(&mut self, draft: DraftModel<B>) {
        self.draft_model = Some(draft);
    }

    /// KV blocks held in the draft model's pool (0 without one).
    pub fn draft_blocks_in_use(&self) -> usize {
        self.draft_model
            .as_ref()
            .map_or(0, DraftModel::blocks_in_use)
    }

    /// The speculator and the draft model together (the draft model drafts what the
    /// speculator's policy asks).
    pub fn drafting_mut(&mut self) -> (Option<&mut Speculator>, Option<&mut DraftModel<B>>) {
        (self.speculator.as_mut(), self.draft_model.as_mut())
    }

    pub fn vocab_size(&self) -> usize {
        match &self.model {
            Model::Inline(m) => m.lead().config.vocab_size,
            Model::Worker(w) => w.vocab_size,
        }
    }

    pub fn add_seq(&mut self, seq_id: SeqId, sampler: SequenceSampler) {
        self.sampling.add_seq(seq_id, sampler);
    }

    /// The sequence makes an embedding of its prompt (`pooling.rs`).
    pub fn add_pooled(&mut self, seq_id: SeqId, pooling: Pooling, prompt_len: usize) {
        self.pooling
            .insert(seq_id, PoolState::new(pooling, prompt_len));
    }

    pub fn remove_seq(&mut self, seq_id: SeqId) {
        self.sampling.remove_seq(seq_id);
        if let Some(s) = &mut self.speculator {
            s.remove(seq_id);
        }
        if let Some(d) = &mut self.draft_model {
            d.remove(seq_id);
        }
        self.last_sampled.remove(&seq_id);
        self.pooling.remove(&seq_id);
    }

    /// Test-only: `corruption` fires at the sequence's draw after `after` draws.
    pub fn corrupt(&mut self, seq_id: SeqId, corruption: Corruption, after: usize) {
        self.sampling.corrupt(seq_id, corruption, after);
    }

    /// Builds the step's input from `plan`, taking its block tables and block copies (the
    /// plan keeps what `commit` reads): the scheduler built them, and they are not copied.
    fn build_step(&mut self, plan: &mut StepPlan, block_size: usize) {
        if Arc::strong_count(&self.step) > 1 {
            // A rank still holds the last step (a pipeline in flight): start a fresh one.
            self.step = Arc::default();
        }
        // One owner: no copy.
        let step = Arc::make_mut(&mut self.step);
        step.block_copies.clear();
        step.block_copies.append(&mut plan.block_copies);
        let b = &mut step.batch;
        b.token_ids.clear();
        b.positions.clear();
        b.slot_mapping.clear();
        b.logits_rows.clear();
        b.hidden_rows.clear();
        b.seqs.clear();
        for s in &mut plan.seqs {
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
                b.token_ids.extend_from_slice(&s.draft_token_ids);
            }
            for p in s.start..s.end {
                b.positions.push(p as u32);
                let block = s.block_table[p / block_size];
                b.slot_mapping
                    .push(block * block_size as u32 + (p % block_size) as u32);
            }
            let pooled = (!self.pooling.is_empty() && !s.run_ahead)
                .then(|| self.pooling.get(&s.seq_id))
                .flatten();
            if let Some(pool) = pooled {
                let rows = pool.wanted(s.start, s.end);
                let first = (query_start + rows.start - s.start) as u32;
                b.hidden_rows.extend(first..first + rows.len() as u32);
            }
            if s.sample {
                // The last known token's row, then each draft token's (verification).
                let last = b.token_ids.len() as u32;
                let first = last - 1 - s.draft_token_ids.len() as u32;
                b.logits_rows.extend(first..last);
            }
            b.seqs.push(BatchSeq {
                query_start,
                query_len: s.end - s.start,
                context_len: s.end,
                block_table: std::mem::take(&mut s.block_table),
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
    pub fn submit(&mut self, plan: &mut StepPlan, block_size: usize) -> Result<(), StepError> {
        self.build_step(plan, block_size);
        let submitted = match &mut self.model {
            Model::Inline(m) => m.submit(&self.step),
            Model::Worker(w) => w.submit(&self.step),
        };
        submitted.map_err(StepError::from)
    }

    /// Waits for the oldest submitted step (`submitted` is what `submit` returned for it).
    /// Where the backend samples on the device, samples it there (one row per sequence `plan`
    /// samples) and returns the ids; otherwise returns the logits, `[sampled rows, vocab]`.
    pub fn collect(
        &mut self,
        plan: &StepPlan,
        submitted: Result<(), StepError>,
    ) -> Result<Collected, StepError> {
        submitted?;
        let on_device = match &self.model {
            Model::Inline(m) => m.samples_on_device(),
            Model::Worker(w) => w.samples_on_device,
        };
        if !on_device {
            return match &mut self.model {
                Model::Inline(m) => m.collect().map(Collected::Logits),
                Model::Worker(w) => w.collect(None).map(Collected::from),
            }
            .map_err(StepError::from);
        }
        let vocab = self.vocab_size();
        let rows = self.sampling.device_rows(sampled_seqs(plan), vocab);
        match &mut self.model {
            Model::Inline(m) => (m.collect_sampled(rows)).map(|(s, h)| Collected::Sampled(s, h)),
            Model::Worker(w) => w.collect(Some(rows)).map(Collected::from),
        }
        .map_err(StepError::from)
    }

    /// A token for each sequence `plan` asks to sample, from what its step returned (or
    /// fails them all with the step's error).
    pub fn sample(
        &mut self,
        plan: &StepPlan,
        collected: Result<Collected, StepError>,
    ) -> StepOutput {
        let vocab = self.vocab_size();
        let hidden: &[f32] = match &collected {
            Ok(Collected::Logits(out)) => &out.hidden,
            Ok(Collected::Sampled(_, hidden)) => hidden,
            Err(_) => &[],
        };
        let pooled = self.pool(plan, hidden);
        let sampled = match collected {
            Ok(Collected::Logits(HostOutput { logits, .. })) => match &self.model {
                Model::Inline(m) => {
                    let backend = m.lead().backend();
                    self.sampling
                        .sample_host(drafts(plan), logits, vocab, |n, job| {
                            backend.host_parallel(n, job)
                        })
                }
                Model::Worker(_) => {
                    self.sampling
                        .sample_host(drafts(plan), logits, vocab, |n, job| (0..n).for_each(job))
                }
            },
            Ok(Collected::Sampled(rows, _)) => {
                self.sampling.take_device(sampled_seqs(plan), rows, vocab)
            }
            Err(e) => {
                let sampled = sampled_seqs(plan).map(|s| (s, Err(e.clone())));
                return StepOutput {
                    sampled: sampled.collect(),
                    pooled,
                };
            }
        };
        for (seq, result) in &sampled {
            if let Ok(t) = result {
                self.last_sampled.insert(*seq, t.token_id);
            }
        }
        StepOutput {
            sampled: sampled
                .into_iter()
                .map(|(seq, r)| (seq, r.map_err(StepError::from)))
                .collect(),
            pooled,
        }
    }

    /// Adds the step's hidden rows to the pooled sequences of `plan` (the rows `build_step`
    /// asked for, in plan order), and returns the embeddings of those whose prompt it ended.
    fn pool(
        &mut self,
        plan: &StepPlan,
        hidden: &[f32],
    ) -> Vec<(SeqId, Result<Vec<f32>, StepError>)> {
        let mut pooled = Vec::new();
        if self.pooling.is_empty() {
            return pooled;
        }
        let width = self.hidden_size;
        let mut at = 0;
        for s in plan.seqs.iter().filter(|s| !s.run_ahead) {
            let Some(pool) = self.pooling.get_mut(&s.seq_id) else {
                continue;
            };
            let positions = pool.wanted(s.start, s.end);
            let rows = hidden.get(at * width..(at + positions.len()) * width);
            at += positions.len();
            match rows {
                Some(rows) => pool.add(positions, rows, width),
                None => {
                    let e = format!("the step returned {} hidden rows", hidden.len() / width);
                    pooled.push((s.seq_id, Err(StepError::Pooling(e))));
                    continue;
                }
            }
            if s.sample {
                let embedding = pool.finish().map_err(StepError::Pooling);
                pooled.push((s.seq_id, embedding));
            }
        }
        pooled
    }
}

/// The sequences `plan` samples with their drafts, in plan order (the order of its logits
/// rows: one per sequence, plus one per draft token).
fn drafts(plan: &StepPlan) -> impl Iterator<Item = (SeqId, &[u32])> + '_ {
    (plan.seqs.iter())
        .filter(|s| s.sample)
        .map(|s| (s.seq_id, s.draft_token_ids.as_slice()))
}

/// The sequences `plan` samples, in plan order (the order of its logits rows).
fn sampled_seqs(plan: &StepPlan) -> impl Iterator<Item = SeqId> + '_ {
    plan.seqs.iter().filter(|s| s.sample).map(|s| s.seq_id)
}
