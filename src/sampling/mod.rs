//! Sampling: what a sequence's next token is drawn from. Between the engine and the kernels
//! (`engine → sampling → kernels`):
//!
//! * `params`: `SamplingParams`, the one type the API validates a request's sampling fields
//!   into, the engine carries, and both samplers read (the device row is built from it by
//!   `SamplingParams::device_row`; no type mirrors its fields);
//! * `host`: the host sampler, one `SequenceSampler` per sequence (processors, cuts, the
//!   seeded draw, logprobs);
//! * `step`: the per-step sampling job, on the host (rows in parallel on the backend's
//!   threads) or checking what a device sampled;
//! * `constraint`: constrained decoding (JSON schemas, regexes, choices, Lark grammars) as a
//!   per-sequence llguidance matcher the host sampler consults, and the compiler the API
//!   builds one with (off the engine thread). `sampling → tokenizer` for its token trie.
//!
//! The device's side stays in `kernels`: the row layout (`kernels::sampling::SampleRow`, the
//! CUDA kernel's argument ABI) and its host reference (`kernels::sampling_reference`), which
//! `device_reference_tests.rs` here holds against the host sampler. Logits processors that
//! constrain or verify a draw (grammar masks, speculative verification) belong here, applied
//! to a row before `SequenceSampler::sample` or described in its device row.

pub mod constraint;
pub mod host;
pub mod params;
pub mod step;

#[cfg(test)]
mod device_reference_tests;

pub use constraint::{Constraint, ConstraintCompiler, ConstraintError, ConstraintSpec};
pub use host::{argmax, SamplingScratch, SequenceSampler};
pub use params::{SampledToken, SamplingParams};
pub use step::{Corruption, SampleError, StepSampler};
