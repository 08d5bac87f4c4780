//! Tensor and pipeline parallelism: how a model is cut across ranks, and how ranks talk.
//!
//! * `partition`: which heads, intermediate columns, vocabulary rows and layers each rank
//!   holds (plain numbers, computed once at start-up; refuses sizes the model cannot take).
//! * `comm`: the [`Communicator`] interface the forward pass calls (all-reduce, all-gather of
//!   vocabulary-split logits, send/recv of hidden states between pipeline stages), generic over
//!   the backend's tensor type, with [`SoloComm`] for a single rank.
//! * `shm`: the shared-memory implementation for CPU ranks (one thread per rank).
//! * `nccl` (feature `cuda`): NCCL through cudarc, for one card per rank.
//!
//! Dependency rule: `parallel` knows `kernels` (backend tensors), never `model` or the engine;
//! the rank group that runs a `Llama` per rank lives in `model::rank_group`.
//!
//! Rank numbering: `rank = stage * tp_size + tp_rank`; rank 0 is stage 0's first TP rank.

pub mod comm;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod partition;
pub mod shm;

pub use comm::{Communicator, SoloComm};
pub use partition::{ParallelConfig, RankShard, TpMode};

/// Failures of a collective or a send/recv: a peer is gone (its thread ended or panicked),
/// or the transport (NCCL) reported an error. The group cannot continue after one.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommError {
    #[error("rank {rank}: a peer rank is gone (its thread ended or failed)")]
    PeerGone { rank: usize },
    #[error("rank {rank}: {op} has no peer in a group of one")]
    NoPeer { rank: usize, op: &'static str },
    #[error("rank {rank}: {msg}")]
    Transport { rank: usize, msg: String },
    #[error("rank {rank}: shape mismatch in {op}: {detail}")]
    Shape {
        rank: usize,
        op: &'static str,
        detail: String,
    },
}

/// A configuration the model or the machine cannot take, found at start-up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParallelError {
    #[error("{0}")]
    BadSize(String),
}
