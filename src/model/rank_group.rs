//! A model split over ranks, run as one: the engine's runner hands it one `ForwardBatch` per
//! step and gets the gathered logits back.
//!
//! Rank 0 (first stage, first TP rank) runs on the caller's thread; every other rank owns its
//! `Llama` shard and KV cache on a thread of its own and receives each step's batch (plain
//! data, shared by `Arc`) on a channel. The block manager and scheduler stay single: every
//! rank applies the same block copies and writes the same slots, so block ids mean the same
//! on every rank; each rank's cache holds only its layers and KV heads.
//!
//! With one stage `submit` returns once the step is done. With `pp` stages rank 0 hands its
//! hidden states to stage 1 and returns at once, so the caller can submit the next
//! micro-batch while later stages work: up to `pp` steps are in flight, and `collect` returns
//! their logits in submission order (from the last stage's first TP rank, over a channel).
//!
//! A group of one rank spawns nothing: the same code as a plain `Llama`. If its backend
//! samples on the device, a step's logits stay there and `collect_sampled` returns only the
//! sampled ids (and requested logprobs); otherwise `collect` returns the logits.
//! After any failure the group is broken (its communicators are aborted so no rank waits
//! forever) and every later call returns an error.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::config::ModelConfig;
use super::llama::Llama;
use super::{HostOutput, ModelError};
use crate::kernels::sampling::{SampledRow, SamplingBatch};
use crate::kernels::{Backend, ForwardBatch};

/// Loaded ranks, in rank order (`stage * tp_size + tp_rank`), before they start.
pub struct ModelRanks<B: Backend> {
    /// The whole model's config (every rank holds a copy).
    pub config: ModelConfig,
    pub ranks: Vec<Llama<B>>,
}

impl<B: Backend> From<Llama<B>> for ModelRanks<B> {
    fn from(model: Llama<B>) -> Self {
        Self {
            config: model.config.clone(),
            ranks: vec![model],
        }
    }
}

/// One step as every rank sees it: the runner builds it once from the plan, and the rank
/// threads (and the forward worker) share it by `Arc`; nobody copies it.
#[derive(Debug, Default, Clone)]
pub struct StepInput {
    pub batch: ForwardBatch,
    /// Copy block `src` to block `dst` (all layers, K and V) before the forward pass.
    pub block_copies: Vec<(u32, u32)>,
}

impl StepInput {
    pub fn shared(batch: ForwardBatch, block_copies: Vec<(u32, u32)>) -> Arc<Self> {
        Arc::new(Self {
            batch,
            block_copies,
        })
    }
}

struct Worker {
    tx: Option<flume::Sender<Arc<StepInput>>>,
    handle: Option<JoinHandle<()>>,
}

type OutputResult = Result<HostOutput, ModelError>;

/// A step the lead ran itself (one stage): its output on the host, or its logits left on the
/// device in the lead's buffers (a group of one rank whose backend samples: see
/// `samples_on_device`) with its hidden rows on the host.
enum Ready {
    Host(HostOutput),
    OnDevice(Vec<f32>),
}

pub struct RankGroup<B: Backend> {
    lead: Llama<B>,
    lead_kv: B::KvCache,
    workers: Vec<Worker>,
    /// Logits from the last stage's first TP rank (more than one stage).
    outputs_rx: Option<flume::Receiver<OutputResult>>,
    /// Logits the lead computed itself (one stage), oldest first.
    ready: VecDeque<Ready>,
    in_flight: usize,
    pp_size: usize,
    broken: bool,
}

fn broken_error() -> ModelError {
    ModelError::Parallel("the rank group failed in an earlier step".into())
}

impl<B: Backend> RankGroup<B> {
    /// Gives every rank a KV cache of `num_blocks` blocks of `block_size` tokens and starts
    /// the rank threads.
    pub fn start(
        ranks: ModelRanks<B>,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, ModelError> {
        let mut ranks = ranks.ranks.into_iter();
        let lead = ranks
            .next()
            .ok_or_else(|| ModelError::Invalid("a rank group needs at least one rank".into()))?;
        let (tp_size, pp_size) = (lead.shard().tp_size, lead.shard().pp_size);
        let lead_kv = lead.kv_cache(num_blocks, block_size)?;
        let (outputs_tx, outputs_rx) = if pp_size > 1 {
            let (tx, rx) = flume::bounded(pp_size + 1);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let mut workers = Vec::new();
        for model in ranks {
            let kv = model.kv_cache(num_blocks, block_size)?;
            let shard = model.shard().clone();
            let reports = shard.is_last_stage() && shard.tp_rank == 0 && pp_size > 1;
            let tx_outputs = if reports { outputs_tx.clone() } else { None };
            let (tx, rx) = flume::bounded::<Arc<StepInput>>(pp_size + 1);
            let handle = std::thread::Builder::new()
                .name(format!("sluice-rank{}", shard.rank))
                .spawn(move || rank_loop(model, kv, rx, tx_outputs))
                .map_err(|e| ModelError::Parallel(format!("spawning rank {}: {e}", shard.rank)))?;
            workers.push(Worker {
                tx: Some(tx),
                handle: Some(handle),
            });
        }
        debug_assert_eq!(workers.len() + 1, tp_size * pp_size);
        Ok(Self {
            lead,
            lead_kv,
            workers,
            outputs_rx,
            ready: VecDeque::new(),
            in_flight: 0,
            pp_size,
            broken: false,
        })
    }

    /// The lead rank's model (config, backend description).
    pub fn lead(&self) -> &Llama<B> {
        &self.lead
    }

    /// Steps that may be in flight at once: the number of pipeline stages.
    pub fn max_in_flight(&self) -> usize {
        self.pp_size
    }

    pub fn num_in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether steps keep their logits on the device and `collect_sampled` samples them
    /// there: one rank, one stage, a backend that samples. Otherwise `collect` returns the
    /// logits on the host.
    pub fn samples_on_device(&self) -> bool {
        self.workers.is_empty() && self.pp_size == 1 && self.lead.backend().samples_on_device()
    }

    fn fail(&mut self, e: ModelError) -> ModelError {
        self.broken = true;
        self.lead.abort();
        e
    }

    /// Starts one step on every rank: copies its KV blocks first, then runs its batch.
    pub fn submit(&mut self, step: &Arc<StepInput>) -> Result<(), ModelError> {
        if self.broken {
            return Err(broken_error());
        }
        if self.in_flight >= self.pp_size {
            return Err(ModelError::Parallel(format!(
                "{} steps already in flight (the pipeline has {} stages)",
                self.in_flight, self.pp_size
            )));
        }
        if !self.workers.is_empty() {
            for w in &self.workers {
                let sent =
                    w.tx.as_ref()
                        .is_some_and(|tx| tx.send(step.clone()).is_ok());
                if !sent {
                    let e = ModelError::Parallel("a rank thread has stopped".into());
                    return Err(self.fail(e));
                }
            }
        }
        // Marked broken until the lead's part is done: if it panics, the group stays broken.
        self.broken = true;
        let batch = &step.batch;
        self.lead.copy_blocks(&mut self.lead_kv, &step.block_copies);
        let ran = if self.samples_on_device() {
            let ran = self.lead.forward_logits(batch, &mut self.lead_kv);
            ran.map(|()| Some(Ready::OnDevice(self.lead.take_hidden())))
        } else {
            let ran = self.lead.forward_rank(batch, &mut self.lead_kv);
            ran.map(|out| (self.pp_size == 1).then_some(Ready::Host(out)))
        };
        match ran {
            Ok(ready) => {
                if let Some(r) = ready {
                    self.ready.push_back(r);
                }
                self.broken = false;
                self.in_flight += 1;
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// The logits (`[logits rows, vocab]`) and hidden rows of the oldest step in flight.
    pub fn collect(&mut self) -> Result<HostOutput, ModelError> {
        if self.in_flight == 0 {
            return Err(ModelError::Parallel("no step in flight".into()));
        }
        self.in_flight -= 1;
        let got = match &self.outputs_rx {
            None => match self.ready.pop_front() {
                Some(Ready::Host(out)) => Ok(out),
                Some(Ready::OnDevice(hidden)) => {
                    let be = self.lead.backend();
                    let logits = self.lead.logits().map_or_else(Vec::new, |t| be.to_host(t));
                    Ok(HostOutput { logits, hidden })
                }
                None => Err(broken_error()),
            },
            Some(rx) => match rx.recv() {
                Ok(Ok(out)) => Ok(out),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(ModelError::Parallel(
                    "the last pipeline stage has stopped".into(),
                )),
            },
        };
        got.map_err(|e| self.fail(e))
    }

    /// Samples the oldest step in flight where its logits are (`samples_on_device`), one
    /// row per `rows` row; only the ids and the asked-for logprobs cross to the host, beside
    /// the step's hidden rows.
    pub fn collect_sampled(
        &mut self,
        rows: &SamplingBatch,
    ) -> Result<(Vec<SampledRow>, Vec<f32>), ModelError> {
        if self.in_flight == 0 {
            return Err(ModelError::Parallel("no step in flight".into()));
        }
        self.in_flight -= 1;
        let got = match self.ready.pop_front() {
            Some(Ready::OnDevice(hidden)) if rows.is_empty() => Ok((Vec::new(), hidden)),
            Some(Ready::OnDevice(hidden)) => match self.lead.logits() {
                Some(t) => (self.lead.backend().sample(t, rows))
                    .map(|sampled| (sampled, hidden))
                    .map_err(ModelError::Kernel),
                None => Err(ModelError::Invalid(format!(
                    "{} sampling rows, but the step produced no logits",
                    rows.len()
                ))),
            },
            Some(Ready::Host(_)) => Err(ModelError::Invalid(
                "collect_sampled: this step's logits are on the host".into(),
            )),
            None => Err(broken_error()),
        };
        got.map_err(|e| self.fail(e))
    }

    /// `submit` then `collect`: one whole step (tests and benches; the runner shares its
    /// `StepInput` instead of copying a batch into one).
    pub fn run(
        &mut self,
        batch: &ForwardBatch,
        block_copies: &[(u32, u32)],
    ) -> Result<Vec<f32>, ModelError> {
        self.submit(&StepInput::shared(batch.clone(), block_copies.to_vec()))?;
        self.collect().map(|out| out.logits)
    }
}

fn rank_loop<B: Backend>(
    mut model: Llama<B>,
    mut kv: B::KvCache,
    rx: flume::Receiver<Arc<StepInput>>,
    outputs_tx: Option<flume::Sender<OutputResult>>,
) {
    while let Ok(input) = rx.recv() {
        model.copy_blocks(&mut kv, &input.block_copies);
        match model.forward_rank(&input.batch, &mut kv) {
            Ok(out) => {
                if let Some(tx) = &outputs_tx {
                    if tx.send(Ok(out)).is_err() {
                        break;
                    }
                }
            }
            Err(e) => {
                tracing::error!("rank {}: {e}", model.shard().rank);
                if let Some(tx) = &outputs_tx {
                    let _ = tx.send(Err(e));
                }
                model.abort();
                break;
            }
        }
    }
}

impl<B: Backend> Drop for RankGroup<B> {
    fn drop(&mut self) {
        // Closing the step channels ends idle ranks; aborting the lead's communicator
        // releases any rank waiting for it in a collective.
        for w in &mut self.workers {
            w.tx = None;
        }
        self.outputs_rx = None;
        self.lead.abort();
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
#[path = "rank_group_tests.rs"]
pub(crate) mod tests;
