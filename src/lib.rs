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

/// `assert!` in debug builds, and in a release build run with `SLUICE_CHECKED=1` (CI's second
/// pass over the engine, scheduler and KV-cache tests, same binaries); otherwise nothing. For
/// the serving invariants whose breach a production server reports and survives instead.
#[macro_export]
macro_rules! checked_assert {
    ($($arg:tt)*) => {
        if $crate::invariants_checked() {
            assert!($($arg)*);
        }
    };
}

/// Whether `checked_assert!` asserts: always in debug builds, else when the environment sets
/// `SLUICE_CHECKED` to anything but `0`. Read once; afterwards a load and a branch.
pub fn invariants_checked() -> bool {
    static CHECKED: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
        cfg!(debug_assertions) || std::env::var_os("SLUICE_CHECKED").is_some_and(|v| v != "0")
    });
    *CHECKED
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
