//! The engine loop: intake, plan, submit, collect, commit, on its own thread, owning all
//! serving state. With pipeline stages (`ModelRunner::max_in_flight() > 1`) it keeps that
//! many steps in flight, each on sequences the others do not hold, so every stage works on a
//! different micro-batch at once; a step's outputs are committed when it comes back, oldest
//! first. With one stage a step is scheduled, run and committed before the next, or, with
//! `StepOverlap` on, the next step is planned while one runs and submitted as soon as its
//! ids are back (`step_overlapped`; `docs/ARCHITECTURE.md`, "The engine loop").
//!
//! Its parts: the requests and sequences it holds, and the gauges, are the request table's
//! (`request_table.rs`); what a sampled token means for its sequence is the output stage's
//! decision (`output.rs`), which `on_token` applies: it sends the events, finishes the
//! sequence or fails the request. Every stream ends with exactly one `Done` or `Error`.
//!
//! Fault isolation: a failure attributable to one sequence (non-finite logits, a sampled id
//! outside the vocabulary, a detokenizer error) ends that request alone; the others in the
//! step commit their tokens as if it had not been there. A panic anywhere inside a step is
//! caught here: the requests of that step (and of the steps still in flight) end with an
//! internal error, their blocks are freed, and the loop goes on. Only steps that keep
//! panicking (`MAX_FAILED_STEPS_IN_A_ROW`) mark the engine unhealthy.

use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::handle::{now_millis, EngineCommand, EngineInfo, RequestId, Shared};
use super::metrics::EngineMetrics;
use super::output::OutputDecision;
use super::request::FinishReason;
use super::request_error::{RequestError, StepError};
use super::request_table::RequestTable;
use super::runner::{ModelRunner, StepOutput};
use crate::kernels::Backend;
use crate::sampling::SampledToken;
use crate::scheduler::{Scheduler, SeqId, StepPlan};
use crate::tokenizer::Tokenizer;

/// How often an idle engine wakes to report that it is alive.
const IDLE_HEARTBEAT: Duration = Duration::from_millis(500);

pub(crate) struct EngineLoop<B: Backend> {
    scheduler: Scheduler,
    runner: ModelRunner<B>,
    /// The requests and sequences the engine holds (`request_table.rs`).
    table: RequestTable,
    tokenizer: Arc<Tokenizer>,
    commands: flume::Receiver<EngineCommand>,
    shared: Arc<Shared>,
    metrics: Arc<EngineMetrics>,
    info: Arc<EngineInfo>,
    shutdown_deadline: Option<Instant>,
    /// The requests of the step being run (one entry per sequence), failed together if it
    /// panics.
    step_request_ids: Vec<RequestId>,
    /// Steps submitted to the runner and not collected yet, oldest first.
    in_flight: VecDeque<InFlightStep>,
    /// The overlapped loop: the next step is planned while one runs (see `step_overlapped`).
    overlap: bool,
    /// A collected step's good tokens and their ids, reused from step to step.
    sampled: Vec<(SeqId, SampledToken)>,
    sampled_ids: Vec<(SeqId, u32)>,
}

/// A step whose forward pass is running (or done) in the runner's ranks.
struct InFlightStep {
    plan: StepPlan,
    submitted: Result<(), super::request_error::StepError>,
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
        let table = RequestTable::new(
            tokenizer.clone(),
            shared.clone(),
            metrics.clone(),
            info.faults,
        );
        Self {
            scheduler,
            runner,
            table,
            tokenizer,
            commands,
            shared,
            metrics,
            info,
            shutdown_deadline: None,
            step_request_ids: Vec::new(),
            in_flight: VecDeque::new(),
            overlap: false,
            sampled: Vec::new(),
            sampled_ids: Vec::new(),
        }
    }

    /// Runs the overlapped loop (`step_overlapped`); the scheduler must run ahead.
    pub fn with_overlap(mut self, overlap: bool) -> Self {
        self.overlap = overlap;
        self
    }

    /// Nothing to run and nothing running.
    fn is_idle(&self) -> bool {
        self.table.is_empty() && self.in_flight.is_empty()
    }

    pub fn run(&mut self) {
        loop {
            if !self.intake() {
                break;
            }
            if let Some(deadline) = self.shutdown_deadline {
                if self.table.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    let (scheduler, runner) = (&mut self.scheduler, &mut self.runner);
                    self.table
                        .fail_all(scheduler, runner, RequestError::ShuttingDown);
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
            // Waiting for work is progress: an engine back here after a failed step (whose
            // panic message may take a while to print) is not silent.
            self.shared
                .last_progress_ms
                .store(now_millis(), Ordering::Release);
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
        let (scheduler, runner) = (&mut self.scheduler, &mut self.runner);
        self.table.abort_disconnected(scheduler, runner);
        true
    }

    fn handle(&mut self, cmd: EngineCommand) {
        let (scheduler, runner) = (&mut self.scheduler, &mut self.runner);
        match cmd {
            EngineCommand::Add { events, .. } if self.shutdown_deadline.is_some() => {
                self.table.refuse(&events, RequestError::ShuttingDown);
            }
            EngineCommand::Add {
                id,
                request,
                events,
            } => self.table.add(scheduler, runner, id, request, events),
            EngineCommand::Abort(id) => self.table.abort(scheduler, runner, id),
            EngineCommand::Shutdown { deadline } => {
                self.shutdown_deadline = Some(deadline);
            }
        }
    }

    /// Ends a request with an error and frees its blocks.
    fn fail_request(&mut self, id: RequestId, error: RequestError) {
        let (scheduler, runner) = (&mut self.scheduler, &mut self.runner);
        self.table.fail(scheduler, runner, id, error);
    }

    fn update_gauges(&mut self) {
        // Before the request counts, as the table's KV usage: a reader who sees zero
        // requests sees the draft pool of that moment too.
        let draft_blocks = self.runner.draft_blocks_in_use();
        (self.metrics.spec_decode_draft_kv_blocks).set(draft_blocks as i64);
        let idle = self.is_idle();
        self.table.update_gauges(&self.scheduler, idle);
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
                self.fail_panicked_step(&what);
                self.update_gauges();
                false
            }
        }
    }

    /// After a panic: ends the requests of the step (and of the steps still in flight) with
    /// an internal error.
    fn fail_panicked_step(&mut self, what: &str) {
        let error = RequestError::StepPanicked(what.to_string());
        let mut ids = std::mem::take(&mut self.step_request_ids);
        // Steps still in flight cannot be trusted after a panic in the runner: their
        // requests end too, and the ranks are drained of them.
        while let Some(f) = self.in_flight.pop_front() {
            self.table.extend_request_ids(&f.plan, &mut ids);
            let _ = panic::catch_unwind(AssertUnwindSafe(|| {
                self.runner.collect(&f.plan, f.submitted)
            }));
        }
        ids.sort_unstable();
        ids.dedup();
        let (scheduler, runner) = (&mut self.scheduler, &mut self.runner);
        if ids.is_empty() {
            // The panic came before the plan named its requests (in the scheduler): nothing
            // tells which request caused it, so all of them end.
            self.table.fail_all(scheduler, runner, error.clone());
        }
        for &id in &ids {
            self.table.fail(scheduler, runner, id, error.clone());
        }
        ids.clear();
        self.step_request_ids = ids;
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
        self.table
            .extend_request_ids(&plan, &mut self.step_request_ids);
        for &seq_id in &plan.too_long_seq_ids {
            if let Some(id) = self.table.request_of(seq_id) {
                let kv_cache_tokens = self.info.kv_cache_tokens;
                self.fail_request(id, RequestError::OutgrewCache { kv_cache_tokens });
            }
        }
        if plan.seqs.is_empty() {
            return None;
        }
        self.table.mark_started(&plan);
        Some((plan, scheduled_at))
    }

    fn submit_step(&mut self, mut plan: StepPlan, scheduled_at: Instant) {
        let block_size = self.scheduler.kv_cache().block_size();
        let submitted_at = Instant::now();
        let submitted = self.runner.submit(&mut plan, block_size);
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
    fn collect_step(&mut self, f: InFlightStep) -> (StepPlan, StepOutput, Instant) {
        self.table
            .extend_request_ids(&f.plan, &mut self.step_request_ids);
        let InFlightStep {
            plan,
            submitted,
            scheduled_at: step_start,
            submitted_at: forward_start,
        } = f;
        let collected = self.runner.collect(&plan, submitted);
        // The forward pass alone (with pipeline stages, from submission to return): the rest
        // of the step is the engine's own overhead.
        let forward = forward_start.elapsed().as_secs_f64();
        self.metrics.forward_seconds.observe(forward);
        if let Some(s) = self.runner.speculator_mut() {
            s.observe_step(plan.num_batched_tokens, forward);
        }
        let output = self.runner.sample(&plan, collected);
        (plan, output, step_start)
    }

    /// Commits a collected step and sends its outputs. A sequence the engine no longer holds
    /// (finished at the step before, in the overlapped loop; aborted; failed) is skipped: its
    /// token is dropped.
    fn commit_step(&mut self, plan: &StepPlan, output: StepOutput, step_start: Instant) {
        let mut sampled = std::mem::take(&mut self.sampled);
        let StepOutput {
            sampled: results,
            mut pooled,
        } = output;
        for (seq_id, result) in results {
            match result {
                Ok(t) => sampled.push((seq_id, t)),
                Err(e) => {
                    if let Some(id) = self.table.request_of(seq_id) {
                        self.fail_request(id, RequestError::Step(e));
                    }
                }
            }
        }
        sampled.retain(|(seq_id, _)| self.table.holds(*seq_id));
        self.sampled_ids.clear();
        self.sampled_ids
            .extend(sampled.iter().map(|(s, t)| (*s, t.token_id)));
        if let Err(e) = self.scheduler.commit(plan, &self.sampled_ids) {
            // A bookkeeping bug, not a client's doing: fail the step's requests, keep serving.
            tracing::error!("commit failed: {e}");
            let mut ids = Vec::new();
            self.table.extend_request_ids(plan, &mut ids);
            for id in ids {
                self.fail_request(id, RequestError::Commit(e.clone()));
            }
            sampled.clear();
        } else {
            let now = Instant::now();
            for (seq_id, token) in sampled.drain(..) {
                match pooled.iter().position(|(s, _)| *s == seq_id) {
                    Some(i) => self.on_pooled(seq_id, pooled.swap_remove(i).1),
                    None => self.on_token(seq_id, token, now),
                }
            }
            super::speculate::after_commit(
                plan,
                &self.sampled_ids,
                &mut self.scheduler,
                &mut self.runner,
                &self.table,
                &self.metrics,
                self.info.max_model_len,
            );
            self.update_gauges();
            self.metrics
                .step_seconds
                .observe(step_start.elapsed().as_secs_f64());
            self.metrics
                .iteration_tokens_total
                .observe(plan.num_batched_tokens as f64);
        }
        self.sampled = sampled;
    }

    /// A pooled sequence's prompt is computed: sends its embedding and ends it.
    fn on_pooled(&mut self, seq_id: SeqId, embedding: Result<Vec<f32>, StepError>) {
        let sent = match embedding {
            Ok(e) => self.table.send_embedding(seq_id, e),
            Err(e) => {
                if let Some(id) = self.table.request_of(seq_id) {
                    self.fail_request(id, RequestError::Step(e));
                }
                return;
            }
        };
        if sent {
            self.metrics
                .request_success_total
                .with_label_values(&[FinishReason::Stop.as_str()])
                .inc();
            let (scheduler, runner) = (&mut self.scheduler, &mut self.runner);
            self.table.finish_seq(scheduler, runner, seq_id);
        }
    }

    /// Counts a sampled token (request table), runs the output stage on it (`output.rs`) and
    /// applies its decision: sends the events, finishes the sequence or fails the request.
    fn on_token(&mut self, seq_id: SeqId, token: SampledToken, now: Instant) {
        let Some((seq, req)) = self.table.count_token(seq_id, now) else {
            return;
        };
        let request_id = seq.request;
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
                let (scheduler, runner) = (&mut self.scheduler, &mut self.runner);
                self.table.finish_seq(scheduler, runner, seq_id);
            }
            OutputDecision::Fail { message } => {
                self.fail_request(request_id, RequestError::Output(message));
            }
        }
    }
}
