//! The backend ops the model is written against, and the backends that supply them.

pub mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod dtype;
pub mod host;

pub use backend::{AttentionShape, Backend, BatchSeq, ForwardBatch, KvCacheShape, Rope};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{0}")]
    Unsupported(String),
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    #[error("{0}")]
    Invalid(String),
}
