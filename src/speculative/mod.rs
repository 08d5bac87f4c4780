//! Speculative decoding's drafting side: which tokens a sequence proposes to verify in its
//! next step, and how many (issue 25, `docs/speculative.md`).
//!
//! The engine asks the `Speculator` for each decoding sequence's draft after a step is
//! committed; the scheduler schedules the draft after the sequence's last token, the forward
//! pass returns logits for every row, and the sampler verifies the draft by drawing the
//! target's own token at each position (`sampling::StepSampler`): a draft token is accepted
//! only where it equals that draw, so the output is the one decoding without speculation
//! gives. This room only proposes: a pure function of a sequence's tokens and its record of
//! acceptance, holding no tensors.

mod config;
mod cost;
mod ngram;
mod policy;
mod suffix;

pub use config::{SpeculativeConfig, SpeculativeConfigError, SpeculativeMethod};
pub use policy::{DraftPolicy, Speculator};
