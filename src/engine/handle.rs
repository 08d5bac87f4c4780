//! The handle the async world holds: submit a validated request, receive its events.
//!
//! The engine thread owns all serving state; the handle only sends it messages over a bounded
//! flume channel. Dropping a `RequestStream` before its terminal event aborts the request, so
//! its KV blocks are freed within one step (the engine also notices a dropped receiver).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use super::metrics::EngineMetrics;
use super::request::{GenerateRequest, StreamEvent};
use super::request_error::RequestError;

pub type RequestId = u64;

pub(crate) enum EngineCommand {
    Add {
        id: RequestId,
        request: Box<GenerateRequest>,
        events: flume::Sender<StreamEvent>,
    },
    Abort(RequestId),
    /// Stop taking requests; the loop exits once the running ones have finished or `deadline`
    /// passes (then they end with an error).
    Shutdown {
        deadline: std::time::Instant,
    },
}

/// Facts about the served model that the API validates against.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// Longest prompt + generation, in tokens.
    pub max_model_len: usize,
    pub vocab_size: usize,
    /// Tokens one sequence can reach in the KV cache (`CacheConfig::max_seq_tokens`: the
    /// whole cache's, or unbounded with a sliding window on every layer); a sequence longer
    /// than this can never run.
    pub kv_cache_tokens: usize,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    pub prefix_caching: bool,
    pub max_num_seqs: usize,
    /// Most requests waiting to start before new ones are refused (0: no limit).
    pub max_waiting: usize,
    /// How embeddings are pooled (`EngineConfig::pooling`).
    pub pooling: super::pooling::PoolingType,
    /// Test-only: fault markers are honoured (the API's template faults read it too).
    pub faults: Option<super::fault::FaultInjection>,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SubmitError {
    #[error(
        "the server is at capacity: {waiting} requests are waiting (limit {limit}); retry later"
    )]
    Overloaded {
        waiting: usize,
        limit: usize,
        /// When a retry is likely to be admitted, from the queue's drain rate.
        retry_after_secs: u64,
    },
    #[error("the engine is not running")]
    Stopped,
}

pub(crate) struct Shared {
    pub next_id: AtomicU64,
    /// Requests submitted and not yet scheduled for the first time (admission control).
    pub num_waiting: AtomicUsize,
    /// Sequences the running batch can still take (`max_num_seqs` less those running): that
    /// many waiting requests start at the next step, so they do not count against
    /// `max_waiting`. Lowered as requests start (before `num_waiting` is), set exactly after
    /// each step.
    pub free_seq_slots: AtomicUsize,
    /// Requests the engine starts per second, recently (`f64` bits): the queue's drain rate,
    /// from which a refusal's `Retry-After` is derived.
    pub drain_per_sec: AtomicU64,
    /// Set once the engine loop has exited.
    pub stopped: AtomicBool,
    /// Unix millis of the last completed step or idle wake-up (liveness).
    pub last_progress_ms: AtomicU64,
    /// Steps that panicked since the last one that completed.
    pub failed_steps_in_a_row: AtomicU32,
}

/// Steps panicking in a row past which the engine counts as unable to make progress.
pub(crate) const MAX_FAILED_STEPS_IN_A_ROW: u32 = 3;

/// Cheap to clone; every clone talks to the same engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    pub(crate) commands: flume::Sender<EngineCommand>,
    pub(crate) shared: Arc<Shared>,
    pub info: Arc<EngineInfo>,
    pub metrics: Arc<EngineMetrics>,
}

impl EngineHandle {
    /// Queues a request and returns its event stream. Refused at once when `max_waiting`
    /// requests already wait beyond what the running batch takes at its next step (the
    /// count is reserved atomically, so a burst against an idle engine admits exactly the
    /// free sequence slots plus the limit).
    pub fn submit(&self, request: GenerateRequest) -> Result<RequestStream, SubmitError> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(SubmitError::Stopped);
        }
        let limit = self.info.max_waiting;
        let reserved =
            self.shared
                .num_waiting
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                    let free = self.shared.free_seq_slots.load(Ordering::Acquire);
                    (limit == 0 || w < limit + free).then_some(w + 1)
                });
        if let Err(waiting) = reserved {
            self.metrics.requests_rejected.inc();
            return Err(self.overloaded(waiting));
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        // Events of one request are bounded by its tokens: a token and a finish per generated
        // position, plus the terminal event.
        let capacity = request.n * (request.max_tokens + 2) + 2;
        let (tx, rx) = flume::bounded(capacity);
        let cmd = EngineCommand::Add {
            id,
            request: Box::new(request),
            events: tx,
        };
        if self.commands.try_send(cmd).is_err() {
            self.shared.num_waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(if self.commands.is_disconnected() {
                SubmitError::Stopped
            } else {
                self.overloaded(self.shared.num_waiting.load(Ordering::Acquire))
            });
        }
        Ok(RequestStream {
            id,
            events: rx,
            commands: self.commands.clone(),
            finished: false,
        })
    }

    /// Tells the engine to stop taking requests and finish the running ones by `deadline`.
    pub fn shutdown(&self, deadline: std::time::Instant) {
        let _ = self.commands.try_send(EngineCommand::Shutdown { deadline });
    }

    /// The refusal of a request that found `waiting` ahead of it: retry once the queue has
    /// drained that far at its recent rate (1 to 60 s; 1 s before any rate is known).
    fn overloaded(&self, waiting: usize) -> SubmitError {
        let free = self.shared.free_seq_slots.load(Ordering::Acquire);
        let ahead = (waiting + 1).saturating_sub(free) as f64;
        let rate = f64::from_bits(self.shared.drain_per_sec.load(Ordering::Acquire));
        let secs = if rate > 0.0 { ahead / rate } else { 1.0 };
        SubmitError::Overloaded {
            waiting,
            limit: self.info.max_waiting,
            retry_after_secs: secs.ceil().clamp(1.0, 60.0) as u64,
        }
    }

    /// Whether the engine thread still runs its loop (it may be wedged: see `is_healthy`).
    pub fn is_alive(&self) -> bool {
        !self.shared.stopped.load(Ordering::Acquire) && !self.commands.is_disconnected()
    }

    /// Whether the loop is alive and made progress within `max_silence`: it completed a step
    /// or woke idle recently, and its steps are not all panicking.
    pub fn is_healthy(&self, max_silence: std::time::Duration) -> bool {
        if !self.is_alive() {
            return false;
        }
        if self.shared.failed_steps_in_a_row.load(Ordering::Acquire) >= MAX_FAILED_STEPS_IN_A_ROW {
            return false;
        }
        let last = self.shared.last_progress_ms.load(Ordering::Acquire);
        now_millis().saturating_sub(last) <= max_silence.as_millis() as u64
    }

    /// Requests submitted and not yet started.
    pub fn num_waiting(&self) -> usize {
        self.shared.num_waiting.load(Ordering::Acquire)
    }
}

pub(crate) fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A request's events. Dropping it before the terminal event aborts the request.
pub struct RequestStream {
    id: RequestId,
    events: flume::Receiver<StreamEvent>,
    commands: flume::Sender<EngineCommand>,
    finished: bool,
}

impl RequestStream {
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// The next event; after the terminal event, `None`. A stream whose engine went away
    /// without a terminal event yields one `Error` instead of hanging.
    pub async fn next(&mut self) -> Option<StreamEvent> {
        if self.finished {
            return None;
        }
        let ev = self.events.recv_async().await;
        self.on_event(ev)
    }

    /// Blocking variant of `next`, for threads outside the async runtime.
    pub fn next_blocking(&mut self) -> Option<StreamEvent> {
        if self.finished {
            return None;
        }
        let ev = self.events.recv();
        self.on_event(ev)
    }

    /// `next_blocking` bounded by `timeout`: `None` when nothing came in time (the request
    /// goes on until the stream is dropped) or the stream had ended.
    pub fn next_timeout(&mut self, timeout: std::time::Duration) -> Option<StreamEvent> {
        if self.finished {
            return None;
        }
        match self.events.recv_timeout(timeout) {
            Ok(ev) => self.on_event(Ok(ev)),
            Err(flume::RecvTimeoutError::Timeout) => None,
            Err(flume::RecvTimeoutError::Disconnected) => {
                self.on_event(Err(flume::RecvError::Disconnected))
            }
        }
    }

    fn on_event(&mut self, ev: Result<StreamEvent, flume::RecvError>) -> Option<StreamEvent> {
        let ev = ev.unwrap_or(StreamEvent::Error(RequestError::EngineStopped));
        if ev.is_terminal() {
            self.finished = true;
        }
        Some(ev)
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.finished {
            // Best effort: if the command queue is full the engine still sees the dropped
            // receiver at its next step.
            let _ = self.commands.try_send(EngineCommand::Abort(self.id));
        }
    }
}
