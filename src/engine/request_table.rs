//! The request table: the requests and sequences the engine holds, and the gauges it publishes.
//!
//! A request's sequences live in three places: here (`seqs`: its request and output state),
//! in the scheduler (its blocks) and in the runner (its sampler). [`RequestTable::add`] puts
//! them in all three; every way out takes them out of all three, so no block outlives its
//! request:
//! * `finish_seq`: a sequence ended; the last one of its request sends `Done`;
//! * `fail`: the request ends with `Error` (a step that panicked, a failed sequence, a shutdown
//!   past its deadline);
//! * `abort`: the client dropped its stream (or asked to abort): nothing is left to send to.
//!
//! So every stream ends with exactly one `Done` or `Error`, or is gone. `Shared::num_waiting`
//! (admission control, reserved by `EngineHandle::submit`) counts a request until it is first
//! scheduled (`mark_started`) or leaves, whichever comes first.
//!
//! Gauges: [`RequestTable::update_gauges`] publishes running and waiting requests, KV usage
//! and the scheduler's counters. On an idle engine it first checks the KV-cache accounting
//! (every block free again), so whoever sees an idle engine's zero running and waiting also
//! sees that check's verdict in `sluice:kv_accounting_errors_total`; the leak tests rely on
//! that order.

mod gauges;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::fault::FaultInjection;
use super::handle::{RequestId, Shared};
use super::metrics::EngineMetrics;
use super::output::SeqOutput;
use super::pooling::PoolingType;
use super::request::{FinishReason, GenerateRequest, RequestTimings, StreamEvent, Usage};
use super::request_error::RequestError;
use super::runner::ModelRunner;
use crate::kernels::Backend;
use crate::sampling::SequenceSampler;
use crate::scheduler::{NewSequence, Scheduler, SeqId, StepPlan};
use crate::tokenizer::Tokenizer;

pub(super) struct RequestState {
    pub request: Box<GenerateRequest>,
    pub events: flume::Sender<StreamEvent>,
    /// Choice index → sequence id.
    seq_ids: Vec<SeqId>,
    live_seqs: usize,
    /// Scheduled at least once (no longer counted as waiting).
    started: bool,
    /// When the engine took it in.
    queued_at: Instant,
    /// When the first step that ran it was planned.
    started_at: Option<Instant>,
    first_token_at: Option<Instant>,
    /// The most tokens one of its finished choices generated.
    max_choice_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
}

pub(super) struct SeqState {
    pub request: RequestId,
    /// The output stage's state: choice index, tokens generated, text (`output.rs`).
    pub output: SeqOutput,
    last_token_at: Option<Instant>,
}

pub(super) struct RequestTable {
    requests: HashMap<RequestId, RequestState>,
    seqs: HashMap<SeqId, SeqState>,
    next_seq_id: SeqId,
    tokenizer: Arc<Tokenizer>,
    shared: Arc<Shared>,
    metrics: Arc<EngineMetrics>,
    /// Test-only: honour fault markers in prompts (`fault.rs`).
    faults: Option<FaultInjection>,
    /// Prefix-cache counters already exported to metrics.
    exported_prefix: (u64, u64),
    /// The queue's drain rate: requests started since `drain_window.0`, and when it began.
    drain_window: (Instant, u64),
    exported_counters: (u64, u64),
    /// The accounting was checked since the engine last went idle.
    idle_checked: bool,
}

impl RequestTable {
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        shared: Arc<Shared>,
        metrics: Arc<EngineMetrics>,
        faults: Option<FaultInjection>,
    ) -> Self {
        Self {
            requests: HashMap::new(),
            seqs: HashMap::new(),
            next_seq_id: 1,
            tokenizer,
            shared,
            metrics,
            faults,
            exported_prefix: (0, 0),
            drain_window: (Instant::now(), 0),
            exported_counters: (0, 0),
            idle_checked: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Whether the engine still holds `seq_id` (a finished or failed sequence is gone).
    pub fn holds(&self, seq_id: SeqId) -> bool {
        self.seqs.contains_key(&seq_id)
    }

    /// The request of a sequence the engine holds.
    pub fn request_of(&self, seq_id: SeqId) -> Option<RequestId> {
        self.seqs.get(&seq_id).map(|s| s.request)
    }

    /// Appends the requests with a sequence in `plan` (one entry per sequence).
    pub fn extend_request_ids(&self, plan: &StepPlan, out: &mut Vec<RequestId>) {
        out.extend(plan.seqs.iter().filter_map(|s| self.request_of(s.seq_id)));
    }

    /// Ends a request that never entered the table (the engine is shutting down, or the
    /// scheduler refused it) with `Error`.
    pub fn refuse(&self, events: &flume::Sender<StreamEvent>, error: RequestError) {
        self.shared.num_waiting.fetch_sub(1, Ordering::AcqRel);
        let _ = events.try_send(StreamEvent::Error(error));
    }

    /// Takes in a request: its `n` sequences join the scheduler (as one group), the runner
    /// and the table. A request the scheduler refuses ends with `Error` at once.
    pub fn add<B: Backend>(
        &mut self,
        scheduler: &mut Scheduler,
        runner: &mut ModelRunner<B>,
        id: RequestId,
        request: Box<GenerateRequest>,
        events: flume::Sender<StreamEvent>,
    ) {
        self.idle_checked = false;
        let n = request.n.max(1) as u64;
        let seq_ids: Vec<SeqId> = (self.next_seq_id..self.next_seq_id + n).collect();
        self.next_seq_id += n;
        let added = scheduler.add_group(
            NewSequence {
                seq_id: seq_ids[0],
                prompt_token_ids: request.prompt_token_ids.clone(),
                priority: request.priority,
                prefix_cache: !matches!(request.pooling, Some(p) if p.kind == PoolingType::Mean),
            },
            &seq_ids[1..],
        );
        if let Err(e) = added {
            let error = RequestError::Refused(e);
            self.metrics
                .request_errors_total
                .with_label_values(&[error.kind().as_str()])
                .inc();
            self.refuse(&events, error);
            return;
        }
        self.add_seqs(runner, id, &request, &seq_ids);
        let m = &self.metrics;
        m.prompt_tokens_total
            .inc_by(request.prompt_token_ids.len() as u64);
        m.request_params_n.observe(seq_ids.len() as f64);
        m.request_params_max_tokens
            .observe(request.max_tokens as f64);
        self.requests.insert(
            id,
            RequestState {
                request,
                events,
                live_seqs: seq_ids.len(),
                seq_ids,
                started: false,
                queued_at: Instant::now(),
                started_at: None,
                first_token_at: None,
                max_choice_tokens: 0,
                completion_tokens: 0,
                cached_tokens: 0,
            },
        );
    }

    /// Each sequence's sampler (and runner fault) in the runner, its output state here.
    fn add_seqs<B: Backend>(
        &mut self,
        runner: &mut ModelRunner<B>,
        id: RequestId,
        request: &GenerateRequest,
        seq_ids: &[SeqId],
    ) {
        let mut stop_ids: Vec<u32> = request.stop_token_ids.clone();
        if !request.ignore_eos {
            stop_ids.extend_from_slice(self.tokenizer.eos_token_ids());
        }
        let fault = self
            .faults
            .and_then(|f| f.find_in_prompt(&self.tokenizer, &request.prompt_token_ids));
        for (index, &seq_id) in seq_ids.iter().enumerate() {
            if let Some((c, f)) = fault.and_then(|f| Some((f.fault.corruption()?, f))) {
                runner.corrupt(seq_id, c, f.after_tokens);
            }
            let mut sampler = SequenceSampler::new(
                request.sampling.clone(),
                &request.prompt_token_ids,
                index as u64,
            );
            if request.min_tokens > 0 {
                sampler.suppress_until(stop_ids.clone(), request.min_tokens);
            }
            if let Some(constraint) = &request.constraint {
                sampler.constrain(constraint.clone());
            }
            runner.add_seq(seq_id, sampler);
            if let Some(pooling) = request.pooling {
                runner.add_pooled(seq_id, pooling, request.prompt_token_ids.len());
            }
            let output_fault = fault.filter(|f| !f.fault.is_runner());
            self.seqs.insert(
                seq_id,
                SeqState {
                    request: id,
                    output: SeqOutput::new(&self.tokenizer, request, index, output_fault),
                    last_token_at: None,
                },
            );
        }
    }

    /// Marks the requests of `plan` as started: no longer waiting; their queue time observed.
    pub fn mark_started(&mut self, plan: &StepPlan) {
        for s in &plan.seqs {
            let Some(seq) = self.seqs.get(&s.seq_id) else {
                continue;
            };
            if let Some(r) = self.requests.get_mut(&seq.request) {
                if !r.started {
                    r.started = true;
                    r.started_at = Some(Instant::now());
                    self.drain_window.1 += 1;
                    // Slots first: admission never sees the request gone from the queue
                    // while its slot still looks free.
                    let n = r.seq_ids.len();
                    let _ = self.shared.free_seq_slots.fetch_update(
                        Ordering::AcqRel,
                        Ordering::Acquire,
                        |f| Some(f.saturating_sub(n)),
                    );
                    self.shared.num_waiting.fetch_sub(1, Ordering::AcqRel);
                    self.metrics
                        .request_queue_time_seconds
                        .observe(r.request.arrival.elapsed().as_secs_f64());
                }
            }
        }
    }

    /// Most draft tokens the sequence may verify in its next step, now `len` tokens long:
    /// what its `max_tokens` and the context leave after the token that step samples anyway.
    /// `None` when its request opted out of speculation or the sequence is gone.
    pub fn draft_room(&self, seq_id: SeqId, len: usize, max_model_len: usize) -> Option<usize> {
        let seq = self.seqs.get(&seq_id)?;
        let r = &self.requests.get(&seq.request)?.request;
        let left = (r.max_tokens.saturating_sub(seq.output.num_generated()))
            .min(max_model_len.saturating_sub(len));
        r.speculative.then(|| left.saturating_sub(1))
    }

    /// Counts a token sampled for `seq_id` at `now` (completion tokens, time to first token,
    /// inter-token latency) and returns the sequence and its request, for the output stage;
    /// `None` when the engine no longer holds the sequence.
    pub fn count_token(
        &mut self,
        seq_id: SeqId,
        now: Instant,
    ) -> Option<(&mut SeqState, &RequestState)> {
        let seq = self.seqs.get_mut(&seq_id)?;
        let req = self.requests.get_mut(&seq.request)?;
        req.completion_tokens += 1;
        let m = &self.metrics;
        m.generation_tokens_total.inc();
        match seq.last_token_at {
            Some(t) => m
                .inter_token_latency_seconds
                .observe((now - t).as_secs_f64()),
            None if req.first_token_at.is_none() => {
                req.first_token_at = Some(now);
                m.time_to_first_token_seconds
                    .observe((now - req.request.arrival).as_secs_f64());
            }
            None => {}
        }
        seq.last_token_at = Some(now);
        Some((seq, req))
    }

    /// Sends a pooled sequence's embedding (the token its last step sampled is not sent),
    /// then its `SeqFinished`; the caller finishes it. `false` if the table does not hold it.
    pub fn send_embedding(&self, seq_id: SeqId, embedding: Vec<f32>) -> bool {
        let Some(seq) = self.seqs.get(&seq_id) else {
            return false;
        };
        let Some(req) = self.requests.get(&seq.request) else {
            return false;
        };
        let index = seq.output.index();
        // A client that is gone is aborted at the next intake.
        if req
            .events
            .try_send(StreamEvent::Embedding { index, embedding })
            .is_ok()
        {
            let _ = req.events.try_send(StreamEvent::SeqFinished {
                index,
                reason: FinishReason::Stop,
                stop_reason: None,
            });
        }
        true
    }

    /// Drops a request and frees its blocks now.
    pub fn abort<B: Backend>(
        &mut self,
        scheduler: &mut Scheduler,
        runner: &mut ModelRunner<B>,
        id: RequestId,
    ) {
        if let Some(r) = self.requests.remove(&id) {
            self.release(scheduler, runner, &r);
            self.metrics
                .request_success_total
                .with_label_values(&["abort"])
                .inc();
        }
    }

    /// Aborts the requests whose client dropped its stream without a word.
    pub fn abort_disconnected<B: Backend>(
        &mut self,
        scheduler: &mut Scheduler,
        runner: &mut ModelRunner<B>,
    ) {
        // Collecting nothing allocates nothing: the common case costs a scan.
        let gone: Vec<RequestId> = (self.requests.iter())
            .filter(|(_, r)| r.events.is_disconnected())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.abort(scheduler, runner, id);
        }
    }

    /// Frees every sequence of a request that has left `requests`.
    fn release<B: Backend>(
        &mut self,
        scheduler: &mut Scheduler,
        runner: &mut ModelRunner<B>,
        r: &RequestState,
    ) {
        if !r.started {
            self.shared.num_waiting.fetch_sub(1, Ordering::AcqRel);
        }
        for seq_id in &r.seq_ids {
            if self.seqs.remove(seq_id).is_some() {
                scheduler.abort(*seq_id);
                runner.remove_seq(*seq_id);
            }
        }
    }

    /// Ends a request with `Error` and frees its blocks.
    pub fn fail<B: Backend>(
        &mut self,
        scheduler: &mut Scheduler,
        runner: &mut ModelRunner<B>,
        id: RequestId,
        error: RequestError,
    ) {
        if let Some(r) = self.requests.remove(&id) {
            self.release(scheduler, runner, &r);
            self.metrics
                .request_errors_total
                .with_label_values(&[error.kind().as_str()])
                .inc();
            let _ = r.events.try_send(StreamEvent::Error(error));
        }
    }

    /// Ends every request with `Error`.
    pub fn fail_all<B: Backend>(
        &mut self,
        scheduler: &mut Scheduler,
        runner: &mut ModelRunner<B>,
        error: RequestError,
    ) {
        let ids: Vec<RequestId> = self.requests.keys().copied().collect();
        for id in ids {
            self.fail(scheduler, runner, id, error.clone());
        }
    }

    /// A sequence ended (its `SeqFinished` sent): frees it; the last one of its request
    /// sends `Done` with the request's usage.
    pub fn finish_seq<B: Backend>(
        &mut self,
        scheduler: &mut Scheduler,
        runner: &mut ModelRunner<B>,
        seq_id: SeqId,
    ) {
        let Some(seq) = self.seqs.remove(&seq_id) else {
            return;
        };
        // Speculation by suffix drafts from what finished requests said.
        if let (Some(s), Some(tokens)) = (runner.speculator_mut(), scheduler.token_ids(seq_id)) {
            s.remember(tokens);
        }
        let stats = scheduler.finish(seq_id);
        runner.remove_seq(seq_id);
        let Some(req) = self.requests.get_mut(&seq.request) else {
            return;
        };
        if seq.output.index() == 0 {
            req.cached_tokens = stats.map_or(0, |s| s.cached_tokens);
        }
        req.max_choice_tokens = req.max_choice_tokens.max(seq.output.num_generated());
        req.live_seqs -= 1;
        if req.live_seqs > 0 {
            return;
        }
        let Some(req) = self.requests.remove(&seq.request) else {
            return;
        };
        let usage = Usage {
            prompt_tokens: req.request.prompt_token_ids.len(),
            completion_tokens: req.completion_tokens,
            cached_tokens: req.cached_tokens,
        };
        let m = &self.metrics;
        let now = Instant::now();
        m.e2e_request_latency_seconds
            .observe((now - req.request.arrival).as_secs_f64());
        m.request_prompt_tokens.observe(usage.prompt_tokens as f64);
        m.request_generation_tokens
            .observe(usage.completion_tokens as f64);
        m.request_max_num_generation_tokens
            .observe(req.max_choice_tokens as f64);
        if let Some(started) = req.started_at {
            m.request_inference_time_seconds
                .observe((now - started).as_secs_f64());
            let first = req.first_token_at.unwrap_or(now);
            m.request_prefill_time_seconds
                .observe(first.saturating_duration_since(started).as_secs_f64());
            m.request_decode_time_seconds
                .observe((now - first).as_secs_f64());
        }
        let timings = RequestTimings {
            arrival: req.request.arrival,
            queued: req.queued_at,
            scheduled: req.started_at,
            first_token: req.first_token_at,
            finished: now,
        };
        let _ = req.events.try_send(StreamEvent::Done { usage, timings });
    }
}
