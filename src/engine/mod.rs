//! The engine: one thread that owns the scheduler, the KV-cache manager and the model runner,
//! and runs the serving loop.
//!
//! ```text
//! loop {
//!     intake: new requests, aborts (explicit, or a client whose stream was dropped)
//!     plan   = scheduler.schedule()            who runs, with how many tokens
//!     output = runner.execute(&plan)           one forward pass for all, then sampling
//!     scheduler.commit(&plan, &sampled)        append tokens, cache full blocks
//!     outputs: detokenize, stop checks, events to each request's stream
//! }
//! ```
//! The async world talks to it only through channels (`EngineHandle`). When the loop goes
//! idle it checks the KV-cache accounting: every block free again.
//!
//! The loop is `engine_loop.rs`; the requests and sequences it holds, `request_table.rs`; the
//! output stage (a decision per sampled token, applied by the loop), `output.rs` with
//! `stop_strings.rs`; the model side of a step, `runner.rs` (and `forward_worker.rs`).

mod draft_model;
mod engine_loop;
pub mod fault;
mod forward_worker;
pub mod handle;
pub mod metrics;
mod output;
pub mod pooling;
pub mod request;
mod request_error;
mod request_table;
mod runner;
mod speculate;
mod stop_strings;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize};
use std::sync::Arc;

pub use handle::{EngineHandle, EngineInfo, RequestStream, SubmitError};
pub use pooling::{Pooling, PoolingType};
pub use request::{
    FinishReason, GenerateRequest, RequestTimings, StopReason, StreamEvent, TokenLogprob, Usage,
};
pub use request_error::{EngineErrorKind, RequestError, StepError};

use crate::kernels::Backend;
use crate::kv_cache::CacheConfig;
use crate::model::rank_group::{ModelRanks, RankGroup};
use crate::model::ModelError;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::speculative::{SpeculativeConfig, SpeculativeMethod};
use crate::tokenizer::Tokenizer;
use draft_model::DraftModel;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    pub cache: CacheConfig,
    /// Longest prompt + generation, in tokens (at most the model's context).
    pub max_model_len: usize,
    /// Most requests waiting to start before new ones are refused (0: no limit).
    pub max_waiting: usize,
    /// Speculative decoding (`--speculative-config`); `None`: off. Only where the host
    /// samples and one step runs at a time (no overlap, no pipeline stages).
    pub speculative: Option<crate::speculative::SpeculativeConfig>,
    /// How this model's embeddings are pooled (`/v1/embeddings`; `--pooling-type`).
    pub pooling: PoolingType,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            cache: CacheConfig::default(),
            max_model_len: 8192,
            max_waiting: 0,
            speculative: None,
            pooling: PoolingType::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Scheduler(#[from] crate::scheduler::SchedulerError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error("{0}")]
    Spawn(String),
}

/// Whether the engine plans the next step while the device runs one (one pipeline stage).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StepOverlap {
    /// Plan, run and commit one step at a time (with pipeline stages: one per stage).
    #[default]
    Off,
    /// The overlapped loop, for a backend whose forward pass returns before it is done (a
    /// GPU's stream): the host's planning, commits and outputs hide behind the device.
    On,
    /// `On`, with the forward pass on a worker thread: the overlapped loop with real
    /// concurrency on the CPU (its test mode).
    OnWorkerThread,
}

/// How the engine runs its steps (beside `EngineConfig`'s sizes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineOptions {
    pub overlap: StepOverlap,
    /// Test-only: honour fault markers in prompts (`fault.rs`). `None` in every server a user
    /// starts.
    pub faults: Option<fault::FaultInjection>,
}

/// Starts the engine thread and returns its handle.
///
/// `model` is one `Llama` or the loaded ranks of a tensor/pipeline-parallel group.
pub fn spawn<B: Backend>(
    model: impl Into<ModelRanks<B>>,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
) -> Result<EngineHandle, EngineError> {
    spawn_with(model, tokenizer, config, EngineOptions::default())
}

/// `spawn` with options. Overlap needs one pipeline stage; with more it is off.
pub fn spawn_with<B: Backend>(
    model: impl Into<ModelRanks<B>>,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
    options: EngineOptions,
) -> Result<EngineHandle, EngineError> {
    let model = RankGroup::start(
        model.into(),
        config.cache.num_blocks,
        config.cache.block_size,
    )?;
    // Blocks before a sequence's window are given back when every layer has the window.
    let cache = CacheConfig {
        sliding_window: (model.lead().config.sliding_window.as_ref())
            .and_then(|w| w.on_every_layer()),
        ..config.cache.clone()
    };
    let kv_cache_tokens = cache.max_seq_tokens();
    let mut scheduler = Scheduler::new(config.scheduler.clone(), cache)?;
    // With pipeline stages, that many steps run at once on disjoint sequences.
    scheduler.set_max_in_flight(model.max_in_flight());
    let overlap = options.overlap != StepOverlap::Off && model.max_in_flight() == 1;
    if overlap {
        scheduler.set_run_ahead(true);
    } else if options.overlap != StepOverlap::Off {
        tracing::info!("step overlap is off: pipeline stages keep steps in flight instead");
    }
    let info = Arc::new(EngineInfo {
        max_model_len: config.max_model_len,
        vocab_size: model.lead().config.vocab_size,
        kv_cache_tokens,
        block_size: config.cache.block_size,
        prefix_caching: config.cache.enable_prefix_caching,
        max_num_seqs: config.scheduler.max_num_seqs,
        max_waiting: config.max_waiting,
        pooling: config.pooling,
        faults: options.faults,
    });
    let metrics = Arc::new(metrics::EngineMetrics::new(config.max_model_len));
    let shared = Arc::new(handle::Shared {
        next_id: AtomicU64::new(1),
        num_waiting: AtomicUsize::new(0),
        free_seq_slots: AtomicUsize::new(config.scheduler.max_num_seqs),
        drain_per_sec: AtomicU64::new(0),
        stopped: AtomicBool::new(false),
        last_progress_ms: AtomicU64::new(handle::now_millis()),
        failed_steps_in_a_row: AtomicU32::new(0),
    });
    // The command queue is bounded: a full queue answers `Overloaded` at once.
    let (tx, rx) = flume::bounded(4096);
    let speculative = config.speculative.clone().filter(|_| {
        let supported = !overlap && model.max_in_flight() == 1 && !model.samples_on_device();
        if !supported {
            tracing::warn!(
                "speculative decoding is off: it needs host sampling and one step at a time \
                 (no step overlap, no pipeline stages)"
            );
        }
        supported
    });
    // The draft model runs on a sibling of the lead's backend, its KV pool as large as the
    // target's (every sequence the target holds can draft).
    let draft_method = |s: &&SpeculativeConfig| s.method == SpeculativeMethod::DraftModel;
    let draft = match speculative
        .as_ref()
        .filter(draft_method)
        .map(|s| s.model.as_deref())
    {
        None => None,
        Some(None) => {
            let why = "speculative method draft_model needs \"model\" (or --speculative-model)";
            return Err(EngineError::Spawn(why.into()));
        }
        Some(Some(path)) => {
            let backend = (model.lead().backend().sibling()).map_err(ModelError::Kernel)?;
            let (num_blocks, block_size) = (config.cache.num_blocks, config.cache.block_size);
            let draft = DraftModel::load(path, backend, &tokenizer, num_blocks, block_size)?;
            Some(draft)
        }
    };
    let mut runner = match options.overlap {
        StepOverlap::OnWorkerThread if overlap => runner::ModelRunner::on_worker_thread(model)?,
        _ => runner::ModelRunner::new(model),
    };
    if let Some(draft) = draft {
        runner.set_draft_model(draft);
    }
    runner.set_speculator(speculative.map(crate::speculative::Speculator::new));
    let mut engine = engine_loop::EngineLoop::new(
        scheduler,
        runner,
        tokenizer,
        rx,
        shared.clone(),
        metrics.clone(),
        info.clone(),
    )
    .with_overlap(overlap);
    std::thread::Builder::new()
        .name("sluice-engine".into())
        .spawn(move || engine.run())
        .map_err(|e| EngineError::Spawn(e.to_string()))?;
    Ok(EngineHandle {
        commands: tx,
        shared,
        info,
        metrics,
    })
}
