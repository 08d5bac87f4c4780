//! Constrained decoding: a sequence's grammar (a JSON schema, a regex, a choice, a Lark
//! grammar) as an llguidance `Matcher` that its sampler consults and advances.
//!
//! * `compile`: what a request asks for (`ConstraintSpec`) into a ready `Constraint`, through
//!   one `ConstraintCompiler` per model (the token trie and llguidance's `ParserFactory`,
//!   built once). Compiling is the API's job, on the blocking pool with limits, so the engine
//!   thread never compiles; a spec that does not compile is the client's error (a 400).
//! * `tok_env`: llguidance's tokenizer interface over our tokenizer.
//!
//! A `Constraint` is advanced by accepted tokens only (`SequenceSampler` commits the token it
//! returns), so a token the engine drops (the overlapped loop's run-ahead token of a sequence
//! that ended) never reaches it: the sequence and its sampler are gone first. Preemption keeps
//! a sequence's sampler and generated tokens, so the matcher stays valid across it.

mod compile;
mod tok_env;

pub use compile::{ConstraintCompiler, ConstraintSpec, COMPILE_TIMEOUT};

use llguidance::toktrie::SimpleVob;
use llguidance::Matcher;

/// Why a constraint could not be built or could not go on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConstraintError {
    /// The schema, regex or grammar does not compile (the client's error).
    #[error("{0}")]
    Invalid(String),
    /// What the model or this server cannot do.
    #[error("{0} is not supported")]
    Unsupported(String),
    /// Compiling took longer than the limit.
    #[error("compiling took longer than {0} s")]
    TooSlow(u64),
    /// The matcher failed while generating (it rejects every token, or errs).
    #[error("the output constraint failed: {0}")]
    Matcher(String),
}

/// One sequence's grammar state. Cloning gives an independent matcher at the same point (the
/// sequences of an `n > 1` request each clone the freshly compiled one).
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    /// The id forced once the grammar is complete (the model's first EOS).
    eos_token_id: u32,
    /// Ids the grammar knows (the tokenizer's vocabulary); a logits row may be longer.
    vocab_size: usize,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .field("eos_token_id", &self.eos_token_id)
            .finish()
    }
}

impl Constraint {
    fn failed(&self) -> ConstraintError {
        let why = self.matcher.get_error();
        ConstraintError::Matcher(why.unwrap_or_else(|| "the matcher stopped".into()))
    }

    /// The grammar is complete (it consumed EOS, or nothing can follow): only EOS may come.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped() && !self.matcher.is_error()
    }

    /// The id to end a complete grammar with.
    pub fn eos_token_id(&self) -> u32 {
        self.eos_token_id
    }

    /// Consumes `token_id` if the grammar allows it next; `false` (nothing consumed) if not.
    pub fn try_commit(&mut self, token_id: u32) -> Result<bool, ConstraintError> {
        if token_id as usize >= self.vocab_size {
            return Ok(false);
        }
        match self.matcher.try_consume_tokens(&[token_id]) {
            Ok(n) => Ok(n == 1),
            Err(_) => Err(self.failed()),
        }
    }

    /// Consumes `token_id`, which the grammar must allow.
    pub fn commit(&mut self, token_id: u32) -> Result<(), ConstraintError> {
        match self.try_commit(token_id)? {
            true => Ok(()),
            false => Err(ConstraintError::Matcher(format!(
                "token {token_id} is not allowed here"
            ))),
        }
    }

    /// The ids allowed next (a bitset over the vocabulary).
    pub fn mask(&mut self) -> Result<SimpleVob, ConstraintError> {
        self.matcher
            .compute_mask_or_eos()
            .map_err(|_| self.failed())
    }

    /// Sets every logit the grammar forbids next to -inf (ids past the grammar's vocabulary
    /// too). Returns the first allowed id, for a row whose allowed logits are all -inf.
    pub fn mask_row(&mut self, row: &mut [f32]) -> Result<u32, ConstraintError> {
        let mask = self.mask()?;
        let Some(first) = mask.first_bit_set() else {
            return Err(ConstraintError::Matcher(
                "the grammar allows no token".into(),
            ));
        };
        for (id, l) in row.iter_mut().enumerate() {
            if id >= self.vocab_size || !mask.is_allowed(id as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(first as u32)
    }

    /// The ids the grammar forbids next, for a device row's bias (`-inf` each).
    pub fn forbidden(&mut self, row_len: usize) -> Result<Vec<u32>, ConstraintError> {
        let mask = self.mask()?;
        Ok((0..row_len as u32)
            .filter(|&id| id as usize >= self.vocab_size || !mask.is_allowed(id))
            .collect())
    }
}

#[cfg(test)]
mod tests;
