//! Capacity planning (`sluice plan`): before deployment, what a model needs and what it will
//! deliver on a device for a workload.
//!
//! The room is a chain of small steps, each a plain value:
//!
//! ```text
//! model path ──footprint──► Footprint (shape, weights bytes, KV bytes per token)
//! device     ──device / probe──► StepCost (seconds per step: fixed + per row + per context token)
//! workload   ──estimate──► Plan (what fits in sluice's block pool, decode tok/s, TTFT, flags)
//! ```
//!
//! Everything in `estimate` is a pure function of those values (unit-tested with made-up
//! costs); the only measurements are in `probe`, which times real decode and prefill steps of
//! the model with sluice's own CPU forward pass. "Fits" means fits in the block pool that
//! `sluice serve` builds from `--kv-cache-memory` (`cli::engine_args`): whole blocks of
//! `block_size` tokens, every sequence rounded up to whole blocks.

pub mod device;
pub mod estimate;
pub mod footprint;
pub mod probe;
pub mod report;

pub use device::{GpuSpec, GPUS};
pub use estimate::{plan, Plan, Workload};
pub use footprint::Footprint;
pub use probe::StepCost;

/// Errors of planning: a model it cannot read, a device it does not know, a workload that
/// makes no sense. Each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error("{path}: {message}")]
    File {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("unknown device {name:?} (known: cpu, {known})")]
    UnknownDevice { name: String, known: String },
    #[error("invalid workload: {0}")]
    Workload(String),
    #[error("the CPU probe failed: {0}")]
    Probe(String),
}
