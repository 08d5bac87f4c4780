//! The engine loop: intake, schedule, execute, commit, outputs — on its own thread, owning all
//! serving state. With pipeline stages (`ModelRunner::max_in_flight() > 1`) it keeps that
//! many steps in flight, each on sequences the others do not hold, so every stage works on a
//! different micro-batch at once; a step's outputs are committed when it comes back, oldest
//! first. With one stage a step is scheduled, run and committed before the next — or, with
//! `StepOverlap` on, the next step is planned while one runs and submitted as soon as its
//! ids are back (`step_overlapped`; `docs/ARCHITECTURE.md`, "The engine loop").
//!
//! Fault isolation: a failure attributable to one sequence (non-finite logits, a sampled id
//! outside the vocabulary, a detokenizer error) ends that request alone; the others in the
//! step commit their tokens as if it had not been there. A panic anywhere inside a step is
//! caught here: the requests of that step end with an internal error, their blocks are freed,
//! and the loop goes on. Only steps that keep panicking (`MAX_FAILED_STEPS_IN_A_ROW`) mark the
//! engine unhealthy.

use std::collections::{HashMap, VecDeque};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::handle::{now_millis, EngineCommand, EngineInfo, RequestId, Shared};
use super::metrics::EngineMetrics;
use super::output::{OutputDecision, SeqOutput};
use super::request::{EngineErrorKind, GenerateRequest, StreamEvent, Usage};
use super::runner::ModelRunner;
use crate::kernels::Backend;
use crate::model::sampling::{SampledToken, SequenceSampler};
use crate::scheduler::{NewSequence, Scheduler, SeqId, StepPlan};
use crate::tokenizer::Tokenizer;

/// How often an idle engine wakes to report that it is alive.
const IDLE_HEARTBEAT: Duration = Duration::from_millis(500);

struct RequestState {
    request: Box<GenerateRequest>,
    events: flume::Sender<StreamEvent>,
    /// Choice index → sequence id.
    seq_ids: Vec<SeqId>,
    live_seqs: usize,
    /// Scheduled at least once (no longer counted as waiting).
    started: bool,
    first_token_at: Option<Instant>,
    completion_tokens: usize,
    cached_tokens: usize,
}

struct SeqState {
    request: RequestId,
    /// The output stage's state: choice index, tokens generated, text (`output.rs`).
    output: SeqOutput,
    last_token_at: Option<Instant>,
}

pub(crate) struct EngineLoop<B: Backend> {
    scheduler: Scheduler,
    runner: ModelRunner<B>,
    tokenizer: Arc<Tokenizer>,
    commands: flume::Receiver<EngineCommand>,
    shared: Arc<Shared>,
    metrics: Arc<EngineMetrics>,
    info: Arc<EngineInfo>,
    requests: HashMap<RequestId, RequestState>,
    seqs: HashMap<SeqId, SeqState>,
    next_seq_id: SeqId,
    shutdown_deadline: Option<Instant>,
    /// Prefix-cache counters already exported to metrics.
    exported_prefix: (u64, u64),
    exported_counters: (u64, u64),
    /// The requests of the step being run, failed together if it panics.
    step_request_ids: Vec<RequestId>,
    /// Steps submitted to the runner and not collected yet, oldest first.
    in_flight: VecDeque<InFlightStep>,
    /// The overlapped loop: the next step is planned while one runs (see `step_overlapped`).
    overlap: bool,
    /// The accounting was checked since the engine last went idle.
    idle_checked: bool,
}

/// A step whose forward pass is running (or done) in the runner's ranks.
struct InFlightStep {
    plan: StepPlan,
    submitted: Result<(), String>,
    scheduled_at: Instant,
    submitted_at: Instant,
}

impl<B: Backend> EngineLoop<B> {
    pub fn new(
        scheduler: Scheduler,
        runner: ModelRunner<B>,
        tokenizer: Arc<Tokenizer>,
        commands: flume::Receiver<EngineCommand>,
        shared: Arc<Shared>,
        metrics: Arc<EngineMetrics>,
        info: Arc<EngineInfo>,
    ) -> Self {
        Self {
            overlap: false,
            scheduler,
            runner,
            tokenizer,
            commands,
            shared,
            metrics,
            info,
            requests: HashMap::new(),
            seqs: HashMap::new(),
            next_seq_id: 1,
            shutdown_deadline: None,
            exported_prefix: (0, 0),
            exported_counters: (0, 0),
            step_request_ids: Vec::new(),
            in_flight: VecDeque::new(),
            idle_checked: false,
        }
    }

    /// Runs the overlapped loop (`step_overlapped`); the scheduler must run ahead.
    pub fn with_overlap(mut self, overlap: bool) -> Self {
        self.overlap = overlap;
        self
    }

    /// Nothing to run and nothing running.
    fn is_idle(&self) -> bool {
        self.requests.is_empty() && self.in_flight.is_empty()
    }

    pub fn run(&mut self) {
        loop {
            if !self.intake() {
                break;
            }
            if let Some(deadline) = self.shutdown_deadline {
                if self.requests.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    self.fail_all("the server is shutting down", EngineErrorKind::Unavailable);
                    break;
                }
            }
            if self.is_idle() {
                continue;
            }
            if self.guarded_step() {
                self.shared
                    .last_progress_ms
                    .store(now_millis(), Ordering::Release);
            }
        }
        self.shared.stopped.store(true, Ordering::Release);
    }

    /// Takes new commands; blocks while there is nothing to run. Returns false when the
    /// loop must end (every handle dropped).
    fn intake(&mut self) -> bool {
        if self.is_idle() {
            self.update_gauges();
            loop {
                match self.commands.recv_timeout(IDLE_HEARTBEAT) {
                    Ok(cmd) => {
                        self.handle(cmd);
                        break;
                    }
                    Err(flume::RecvTimeoutError::Timeout) => {
                        self.shared
                            .last_progress_ms
                            .store(now_millis(), Ordering::Release);
                        if self.shutdown_deadline.is_some() {
                            return true;
                        }
                    }
                    Err(flume::RecvTimeoutError::Disconnected) => return false,
                }
            }
        }
        while let Ok(cmd) = self.commands.try_recv() {
            self.handle(cmd);
        }
        // Clients whose stream was dropped without a word.
        let gone: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.events.is_disconnected())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.abort(id);
        }
        true
    }

    /// The accounting check whenever the engine goes idle: every block must be free. Run from
    /// `update_gauges` before it publishes an idle engine's zero running and waiting counts,
    /// so whoever sees those zeros also sees this check's verdict in the error counter.
    fn check_idle_accounting(&mut self) {
        if let Err(e) = self.scheduler.check_invariants() {
            self.metrics.kv_accounting_errors_total.inc();
            tracing::error!("KV-cache accounting is wrong while idle: {e}");
            debug_assert!(false, "KV-cache accounting is wrong while idle: {e}");
        }
        let kv = self.scheduler.kv_cache();
        if kv.num_free_blocks() != kv.num_blocks() {
            self.metrics.kv_accounting_errors_total.inc();
            let msg = format!(
                "{} of {} KV blocks are not free while idle",
                kv.num_blocks() - kv.num_free_blocks(),
                kv.num_blocks()
            );
            tracing::error!("{msg}");
            debug_assert!(false, "{msg}");
        }
    }

    fn handle(&mut self, cmd: EngineCommand) {
        match cmd {
            EngineCommand::Add {
                id,
                request,
                events,
            } => self.add(id, request, events),
            EngineCommand::Abort(id) => self.abort(id),
            EngineCommand::Shutdown { deadline } => {
                self.shutdown_deadline = Some(deadline);
            }
        }
    }

    fn add(
        &mut self,
        id: RequestId,
        request: Box<GenerateRequest>,
        events: flume::Sender<StreamEvent>,
    ) {
        let fail = |events: &flume::Sender<StreamEvent>, kind, message: String| {
            let _ = events.try_send(StreamEvent::Error { kind, message });
        };
        if self.shutdown_deadline.is_some() {
            self.shared.num_waiting.fetch_sub(1, Ordering::AcqRel);
            fail(
                &events,
                EngineErrorKind::Unavailable,
                "the server is shutting down".into(),
            );
            return;
        }
        self.idle_checked = false;
        let n = request.n.max(1);
        let seq_ids: Vec<SeqId> = (0..n as u64).map(|i| self.next_seq_id + i).collect();
        self.next_seq_id += n as u64;
        let added = self.scheduler.add_group(
            NewSequence {
                seq_id: seq_ids[0],
                prompt_token_ids: request.prompt_token_ids.clone(),
                priority: request.priority,
            },
            &seq_ids[1..],
        );
        if let Err(e) = added {
            self.shared.num_waiting.fetch_sub(1, Ordering::AcqRel);
            self.metrics
                .request_errors_total
                .with_label_values(&["invalid_request"])
                .inc();
            fail(&events, EngineErrorKind::InvalidRequest, e.to_string());
            return;
        }
        let mut stop_ids: Vec<u32> = request.stop_token_ids.clone();
        if !request.ignore_eos {
            stop_ids.extend_from_slice(self.tokenizer.eos_token_ids());
        }
        let fault = self
            .info
            .faults
            .and_then(|f| f.find_in_prompt(&self.tokenizer, &request.prompt_token_ids));
        for (index, &seq_id) in seq_ids.iter().enumerate() {
            if let Some(f) = fault.filter(|f| f.fault.is_runner()) {
                self.runner.add_fault(seq_id, f.fault, f.after_tokens);
            }
            let mut sampler = SequenceSampler::new(
                request.sampling.clone(),
                &request.prompt_token_ids,
                index as u64,
            );
            if request.min_tokens > 0 {
                sampler.suppress_until(stop_ids.clone(), request.min_tokens);
            }
            self.runner.add_seq(seq_id, sampler);
            self.seqs.insert(
                seq_id,
                SeqState {
                    request: id,
                    output: SeqOutput::new(
                        &self.tokenizer,
                        &request,
                        index,
                        fault.filter(|f| !f.fault.is_runner()),
                    ),
                    last_token_at: None,
                },
            );
        }
        self.metrics
            .prompt_tokens_total
            .inc_by(request.prompt_token_ids.len() as u64);
        self.requests.insert(
            id,
            RequestState {
                request,
                events,
                live_seqs: seq_ids.len(),
                seq_ids,
                started: false,
                first_token_at: None,
                completion_tokens: 0,
                cached_tokens: 0,
            },
        );
    }

    /// Drops a request and frees its blocks now.
    fn abort(&mut self, id: RequestId) {
        if let Some(r) = self.requests.remove(&id) {
            self.release(&r);
            self.metrics
                .request_success_total
                .with_label_values(&["abort"])
                .inc();
        }
    }

    /// Frees every sequence of a request that has left `requests`.
    fn release(&mut self, r: &RequestState) {
        if !r.started {
            self.shared.num_waiting.fetch_sub(1, Ordering::AcqRel);
        }
        for seq_id in &r.seq_ids {
            if self.seqs.remove(seq_id).is_some() {
                self.scheduler.abort(*seq_id);
                self.runner.remove_seq(*seq_id);
            }
        }
    }

    fn fail_request(&mut self, id: RequestId, kind: EngineErrorKind, message: String) {
        if let Some(r) = self.requests.remove(&id) {
            self.release(&r);
            let label = match kind {
                EngineErrorKind::InvalidRequest => "invalid_request",
                EngineErrorKind::Unavailable => "unavailable",
                EngineErrorKind::Internal => "internal",
            };
            self.metrics
                .request_errors_total
                .with_label_values(&[label])
                .inc();
            let _ = r.events.try_send(StreamEvent::Error { kind, message });
        }
    }

    fn fail_all(&mut self, message: &str, kind: EngineErrorKind) {
        let ids: Vec<RequestId> = self.requests.keys().copied().collect();
        for id in ids {
            self.fail_request(id, kind, message.to_string());
        }
    }

    /// Runs one step, catching a panic inside it. Returns whether the step completed.
    fn guarded_step(&mut self) -> bool {
        self.step_request_ids.clear();
        // The state a panic leaves behind is repaired by failing the step's requests: that
        // frees their sequences in the scheduler (and so their blocks) and in the runner.
        let result = panic::catch_unwind(AssertUnwindSafe(|| self.step()));
        match result {
            Ok(()) => {
                self.shared
                    .failed_steps_in_a_row
                    .store(0, Ordering::Release);
                true
            }
            Err(payload) => {
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!("an engine step panicked: {what}");
                self.shared
                    .failed_steps_in_a_row
                    .fetch_add(1, Ordering::AcqRel);
                let mut ids = std::mem::take(&mut self.step_request_ids);
                // Steps still in flight cannot be trusted after a panic in the runner: their
                // requests end too, and the ranks are drained of them.
                while let Some(f) = self.in_flight.pop_front() {
                    ids.extend(self.plan_request_ids(&f.plan));
                    let _ = panic::catch_unwind(AssertUnwindSafe(|| {
                        self.runner.collect(&f.plan, f.submitted)
                    }));
                }
                ids.sort_unstable();
                ids.dedup();
                if ids.is_empty() {
                    // The panic came before the plan named its requests (in the scheduler):
                    // nothing tells which request caused it, so all of them end.
                    ids = self.requests.keys().copied().collect();
                }
                for id in ids {
                    self.fail_request(
                        id,
                        EngineErrorKind::Internal,
                        format!("internal error: the engine step failed ({what})"),
                    );
                }
                self.update_gauges();
                false
            }
        }
    }

    /// The requests with a sequence in `plan`.
    fn plan_request_ids(&self, plan: &StepPlan) -> Vec<RequestId> {
        let mut ids: Vec<RequestId> = plan
            .seqs
            .iter()
            .filter_map(|s| self.seqs.get(&s.seq_id).map(|s| s.request))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Schedules and submits steps until the pipeline is full or nothing more can run.
    fn fill_pipeline(&mut self) {
        while self.in_flight.len() < self.runner.max_in_flight() {
            match self.plan_step() {
                Some((plan, scheduled_at)) => self.submit_step(plan, scheduled_at),
                None => break,
            }
        }
    }

    /// Schedules one step; `None` when nothing can run.
    fn plan_step(&mut self) -> Option<(StepPlan, Instant)> {
        let scheduled_at = Instant::now();
        let plan = self.scheduler.schedule();
        let ids = self.plan_request_ids(&plan);
        self.step_request_ids.extend(ids);
        for &seq_id in &plan.too_long_seq_ids {
            if let Some(s) = self.seqs.get(&seq_id) {
                let id = s.request;
                self.fail_request(
                    id,
                    EngineErrorKind::InvalidRequest,
                    format!(
                        "the request needs more KV cache than the server has ({} tokens)",
                        self.info.kv_cache_tokens
                    ),
                );
            }
        }
        if plan.seqs.is_empty() {
            return None;
        }
        self.mark_started(&plan);
        Some((plan, scheduled_at))
    }

    fn submit_step(&mut self, plan: StepPlan, scheduled_at: Instant) {
        let block_size = self.scheduler.kv_cache().block_size();
        let submitted_at = Instant::now();
        let submitted = self.runner.submit(&plan, block_size);
        self.in_flight.push_back(InFlightStep {
            plan,
            submitted,
            scheduled_at,
            submitted_at,
        });
    }

    fn step(&mut self) {
        if self.overlap {
            return self.step_overlapped();
        }
        self.fill_pipeline();
        let Some(f) = self.in_flight.pop_front() else {
            self.idle_step();
            return;
        };
        let (plan, output, step_start) = self.collect_step(f);
        self.commit_step(&plan, output, step_start);
    }

    /// Nothing could run (e.g. all waiting on blocks held by nobody): avoid spinning.
    fn idle_step(&mut self) {
        self.update_gauges();
        std::thread::sleep(Duration::from_millis(1));
    }

    /// The overlapped loop (one stage): while step N runs, plan N+1 (its decodes of the
    /// tokens N samples run ahead: `Scheduler::set_run_ahead`); wait for N's ids (the one
    /// sync); submit N+1 (the runner puts N's ids into its run-ahead rows); then commit N and
    /// send its outputs while N+1 runs. A sequence that stops at N has also run in N+1: it is
    /// gone when N+1 comes back, so that token is dropped (never emitted, its blocks freed
    /// with the sequence). Steps run in submission order on the device, so a block freed
    /// while N+1 runs is reused only by later steps.
    fn step_overlapped(&mut self) {
        self.fill_pipeline();
        if self.in_flight.is_empty() {
            self.idle_step();
            return;
        }
        let next = self.plan_step();
        let Some(f) = self.in_flight.pop_front() else {
            return;
        };
        let (plan, output, step_start) = self.collect_step(f);
        if let Some((next_plan, scheduled_at)) = next {
            self.submit_step(next_plan, scheduled_at);
        }
        self.commit_step(&plan, output, step_start);
    }

    /// Waits for a step in flight and samples it.
    fn collect_step(&mut self, f: InFlightStep) -> (StepPlan, super::runner::StepOutput, Instant) {
        let ids = self.plan_request_ids(&f.plan);
        self.step_request_ids.extend(ids);
        let InFlightStep {
            plan,
            submitted,
            scheduled_at: step_start,
            submitted_at: forward_start,
        } = f;
        let collected = self.runner.collect(&plan, submitted);
        // The forward pass alone (with pipeline stages, from submission to return): the rest
        // of the step is the engine's own overhead.
        self.metrics
            .forward_seconds
            .observe(forward_start.elapsed().as_secs_f64());
        let output = self.runner.sample(&plan, collected);
        (plan, output, step_start)
    }

    /// Commits a collected step and sends its outputs.
    fn commit_step(
        &mut self,
        plan: &StepPlan,
        output: super::runner::StepOutput,
        step_start: Instant,
    ) {
        let mut good = Vec::with_capacity(output.sampled.len());
        for (seq_id, result) in output.sampled {
            match result {
                Ok(t) => good.push((seq_id, t)),
                Err(message) => {
                    if let Some(s) = self.seqs.get(&seq_id) {
                        let id = s.request;
                        self.fail_request(id, EngineErrorKind::Internal, message);
                    }
                }
            }
        }
        good.retain(|(seq_id, _)| self.seqs.contains_key(seq_id));
        let ids: Vec<(SeqId, u32)> = good.iter().map(|(s, t)| (*s, t.token_id)).collect();
        if let Err(e) = self.scheduler.commit(plan, &ids) {
            // A bookkeeping bug, not a client's doing: fail the step's requests, keep serving.
            tracing::error!("commit failed: {e}");
            let reqs: Vec<RequestId> = plan
                .seqs
                .iter()
                .filter_map(|s| self.seqs.get(&s.seq_id).map(|s| s.request))
                .collect();
            for id in reqs {
                self.fail_request(
                    id,
                    EngineErrorKind::Internal,
                    format!("internal error: {e}"),
                );
            }
            return;
        }
        let now = Instant::now();
        for (seq_id, token) in good {
            self.on_token(seq_id, token, now);
        }
        self.update_gauges();
        self.metrics
            .step_seconds
            .observe(step_start.elapsed().as_secs_f64());
    }

    fn mark_started(&mut self, plan: &StepPlan) {
        for s in &plan.seqs {
            let Some(seq) = self.seqs.get(&s.seq_id) else {
                continue;
            };
            if let Some(r) = self.requests.get_mut(&seq.request) {
                if !r.started {
                    r.started = true;
                    self.shared.num_waiting.fetch_sub(1, Ordering::AcqRel);
                    self.metrics
                        .request_queue_time_seconds
                        .observe(r.request.arrival.elapsed().as_secs_f64());
                }
            }
        }
    }

    /// Counts a sampled token, runs the output stage on it and applies its decision.
    fn on_token(&mut self, seq_id: SeqId, token: SampledToken, now: Instant) {
        let Some(seq) = self.seqs.get_mut(&seq_id) else {
            return;
        };
        let Some(req) = self.requests.get_mut(&seq.request) else {
            return;
        };
        let request_id = seq.request;
        req.completion_tokens += 1;
        self.metrics.generation_tokens_total.inc();
        match seq.last_token_at {
            Some(t) => self
                .metrics
                .inter_token_latency_seconds
                .observe((now - t).as_secs_f64()),
            None if req.first_token_at.is_none() => {
                req.first_token_at = Some(now);
                self.metrics
                    .time_to_first_token_seconds
                    .observe((now - req.request.arrival).as_secs_f64());
            }
            None => {}
        }
        seq.last_token_at = Some(now);
        let decision = seq.output.decide(
            &self.tokenizer,
            &req.request,
            self.info.max_model_len,
            token,
        );
        match decision {
            OutputDecision::Continue { token } => {
                // A client that is gone is aborted at the next intake.
                let _ = req.events.try_send(token);
            }
            OutputDecision::Finish {
                token,
                finished,
                reason,
            } => {
                self.metrics
                    .request_success_total
                    .with_label_values(&[reason.as_str()])
                    .inc();
                if req.events.try_send(token).is_ok() {
                    let _ = req.events.try_send(finished);
                }
                self.finish_seq(seq_id);
            }
            OutputDecision::Fail { message } => {
                self.fail_request(request_id, EngineErrorKind::Internal, message);
            }
        }
    }

    fn finish_seq(&mut self, seq_id: SeqId) {
        let Some(seq) = self.seqs.remove(&seq_id) else {
            return;
        };
        let stats = self.scheduler.finish(seq_id);
        self.runner.remove_seq(seq_id);
        let Some(req) = self.requests.get_mut(&seq.request) else {
            return;
        };
        if seq.output.index() == 0 {
            req.cached_tokens = stats.map_or(0, |s| s.cached_tokens);
        }
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
        m.e2e_request_latency_seconds
            .observe(req.request.arrival.elapsed().as_secs_f64());
        m.request_prompt_tokens.observe(usage.prompt_tokens as f64);
        m.request_generation_tokens
            .observe(usage.completion_tokens as f64);
        let _ = req.events.try_send(StreamEvent::Done { usage });
    }

    fn update_gauges(&mut self) {
        if self.is_idle() && !self.idle_checked {
            self.idle_checked = true;
            self.check_idle_accounting();
        }
        let m = &self.metrics;
        let running = self.requests.values().filter(|r| r.started).count();
        m.num_requests_running.set(running as i64);
        m.num_requests_waiting
            .set(self.shared.num_waiting.load(Ordering::Acquire) as i64);
        m.kv_cache_usage_perc.set(self.scheduler.kv_usage());
        let prefix = self.scheduler.prefix_cache_stats();
        let (q, h) = (prefix.num_query_tokens, prefix.num_hit_tokens);
        m.prefix_cache_queries_total
            .inc_by(q.saturating_sub(self.exported_prefix.0));
        m.prefix_cache_hits_total
            .inc_by(h.saturating_sub(self.exported_prefix.1));
        self.exported_prefix = (q, h);
        let c = self.scheduler.counters();
        m.num_preemptions_total.inc_by(
            c.num_preemptions_total
                .saturating_sub(self.exported_counters.0),
        );
        m.prompt_tokens_computed_total.inc_by(
            c.num_computed_prompt_tokens_total
                .saturating_sub(self.exported_counters.1),
        );
        self.exported_counters = (c.num_preemptions_total, c.num_computed_prompt_tokens_total);
    }
}
