//! One loaded version of a model: its engine (loop, scheduler, KV pool), tokenizer and
//! grammar compiler, and the lease a request holds while it uses them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{EngineHandle, GenerateRequest, StreamEvent};
use crate::sampling::ConstraintCompiler;
use crate::tokenizer::Tokenizer;

use super::ModelSource;

/// A blocking call that refreshes gauges read rather than kept (a GPU's utilisation, memory
/// and power), run by `/metrics` before it renders.
pub type GaugeSampler = Arc<dyn Fn() + Send + Sync>;

/// Memory a loaded version holds, charged against `--memory-budget`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryCharge {
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
}

impl MemoryCharge {
    pub fn total(&self) -> u64 {
        self.weights_bytes + self.kv_cache_bytes
    }
}

/// The memory budget a load sees: what is left of it, and who holds the rest (for the
/// refusal's message).
#[derive(Debug, Clone)]
pub struct Budget {
    pub total: u64,
    pub left: u64,
    pub charged: String,
}

impl Budget {
    /// `OverBudget` when `charge` does not fit.
    pub fn check(
        &self,
        model: &str,
        version: &str,
        charge: MemoryCharge,
    ) -> Result<(), super::RegistryError> {
        if charge.total() <= self.left {
            return Ok(());
        }
        Err(super::RegistryError::OverBudget {
            model: model.to_string(),
            version: version.to_string(),
            needed_mib: charge.total().div_ceil(1 << 20),
            weights_mib: charge.weights_bytes.div_ceil(1 << 20),
            kv_mib: charge.kv_cache_bytes.div_ceil(1 << 20),
            left_mib: self.left >> 20,
            budget_mib: self.total >> 20,
            charged: self.charged.clone(),
        })
    }
}

/// A version as the loader hands it over: running, not yet warmed up or routed to.
pub struct ServedModel {
    pub name: String,
    pub version: String,
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    /// Compiles structured-output constraints for this model's vocabulary.
    pub constraints: Arc<ConstraintCompiler>,
    /// Unix seconds when it loaded (`/v1/models`' `created`).
    pub created: u64,
    pub source: ModelSource,
    pub memory: MemoryCharge,
    pub sample_gauges: Option<GaugeSampler>,
    /// Requests holding a `Lease` on it.
    in_flight: AtomicUsize,
}

impl ServedModel {
    pub fn new(
        name: String,
        version: String,
        engine: EngineHandle,
        tokenizer: Arc<Tokenizer>,
        source: ModelSource,
        memory: MemoryCharge,
    ) -> Self {
        Self {
            name,
            version,
            engine,
            constraints: Arc::new(ConstraintCompiler::new(tokenizer.clone())),
            tokenizer,
            created: crate::engine::handle::now_millis() / 1000,
            source,
            memory,
            sample_gauges: None,
            in_flight: AtomicUsize::new(0),
        }
    }

    pub fn with_gauge_sampler(mut self, sample: Option<GaugeSampler>) -> Self {
        self.sample_gauges = sample;
        self
    }

    /// `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// One short greedy request through the whole engine: a version goes live only after
    /// it answered one. Blocking.
    pub fn warm_up(&self, timeout: Duration) -> Result<(), String> {
        let ids = self
            .tokenizer
            .encode("Hello", true)
            .map_err(|e| format!("warm-up: tokenizing: {e}"))?;
        let mut request = GenerateRequest::greedy(ids, 2);
        request.request_id = format!("warmup-{}", self.id());
        let mut stream = self
            .engine
            .submit(request)
            .map_err(|e| format!("warm-up: {e}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match stream.next_timeout(left) {
                Some(StreamEvent::Done { .. }) => return Ok(()),
                Some(StreamEvent::Error(e)) => return Err(format!("warm-up request failed: {e}")),
                Some(_) => {}
                None => return Err(format!("warm-up request did not finish within {timeout:?}")),
            }
        }
    }
}

impl Drop for ServedModel {
    /// The last holder let go (the registry unloaded it and its requests ended): the engine
    /// stops and its weights and KV pool are freed.
    fn drop(&mut self) {
        self.engine.shutdown(Instant::now());
    }
}

/// A request's hold on the version routed to: the version stays loaded, and counts the
/// request in flight, until every lease on it is dropped.
pub struct Lease(Arc<ServedModel>);

impl Lease {
    pub(super) fn new(model: Arc<ServedModel>) -> Self {
        model.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(model)
    }
}

impl Clone for Lease {
    fn clone(&self) -> Self {
        Self::new(self.0.clone())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::ops::Deref for Lease {
    type Target = ServedModel;
    fn deref(&self) -> &ServedModel {
        &self.0
    }
}
