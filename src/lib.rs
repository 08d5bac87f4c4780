//! sluice: an LLM serving engine.
//!
//! The rooms follow `docs/ARCHITECTURE.md`: `api` (HTTP, SSE, WebSocket) talks to `engine`
//! (the loop that owns all serving state) through channels; the engine drives `scheduler` and
//! `kv_cache` (plain bookkeeping, no tensors) and `model` (the forward pass over a
//! `ForwardBatch`), which runs on `kernels` (the backend ops); `sampling` draws each
//! sequence's next token from the logits. `tokenizer` turns text into ids and back; `bench`
//! is the load generator. Two leaf rooms serve several others: `gguf` (the GGUF reader, for
//! the tokenizer and the model) and `assets` (the cache directory and the default model's
//! fetch, for the CLI, the bench and the NVRTC cache).

/// `assert!` in debug builds and with `--features checked` (CI's engine, scheduler and
/// KV-cache tests at release speed); nothing in a plain release build. For the serving
/// invariants whose breach the release build reports and survives instead.
#[macro_export]
macro_rules! checked_assert {
    ($($arg:tt)*) => {
        if cfg!(any(debug_assertions, feature = "checked")) {
            assert!($($arg)*);
        }
    };
}

pub mod api;
pub mod assets;
pub mod bench;
pub mod cli;
pub mod engine;
pub mod gguf;
pub mod jobs;
pub mod kernels;
pub mod kv_cache;
pub mod model;
pub mod parallel;
pub mod plan;
pub mod registry;
pub mod sampling;
pub mod scheduler;
pub mod speculative;
pub mod telemetry;
pub mod tokenizer;
