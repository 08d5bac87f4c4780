//! Model configs, weight loading and the Llama-family forward pass.

pub mod config;
pub mod gemma2;
mod layer;
pub mod llama;
pub mod loader;
pub mod quantize;
pub mod rank_group;
pub mod safetensors_dir;
pub mod shard;
pub mod sliding_window;
pub mod weights;

use crate::gguf::GgufError;
use crate::kernels::KernelError;
use crate::parallel::CommError;

/// What a forward pass brings back to the host: the logits of its batch's `logits_rows`
/// (`[rows, vocab]`) and the final-norm hidden states of its `hidden_rows` (`[rows, hidden]`,
/// what embeddings are pooled from).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostOutput {
    pub logits: Vec<f32>,
    pub hidden: Vec<f32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unsupported(String),
    /// A rank's communicator failed (a peer is gone, or the transport broke).
    #[error("tensor/pipeline parallel group: {0}")]
    Comm(#[from] CommError),
    /// A kernel refused its work (a device out of memory, a shape it cannot take).
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The rank group or the forward worker cannot run the step (a thread stopped, an
    /// earlier step broke the group, a call out of order).
    #[error("tensor/pipeline parallel group: {0}")]
    Parallel(String),
}
