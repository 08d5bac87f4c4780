//! The output stage of a sequence: incremental detokenization and stop strings
//! (`stop_strings.rs`).

use super::stop_strings::StopMatcher;
use crate::tokenizer::{IncrementalDetokenizer, Tokenizer, TokenizerError};

/// One sequence's text state.
pub(crate) struct SeqOutput {
    detok: IncrementalDetokenizer,
    stops: StopMatcher,
}

impl SeqOutput {
    pub fn new(
        tokenizer: &Tokenizer,
        skip_special_tokens: bool,
        stops: Vec<String>,
        include_stop: bool,
    ) -> Self {
        Self {
            detok: IncrementalDetokenizer::new(tokenizer, skip_special_tokens),
            stops: StopMatcher::new(stops, include_stop),
        }
    }

    /// The text a new token releases, and the stop string it completed, if any.
    pub fn push(
        &mut self,
        tokenizer: &Tokenizer,
        token: u32,
    ) -> Result<(String, Option<String>), TokenizerError> {
        let delta = self.detok.push(tokenizer, token)?;
        Ok(self.stops.push(&delta))
    }

    /// The rest of the text when the sequence ends without a stop string.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, TokenizerError> {
        let rest = self.detok.flush(tokenizer)?;
        let (mut out, _) = self.stops.push(&rest);
        out.push_str(&self.stops.flush());
        Ok(out)
    }
}
