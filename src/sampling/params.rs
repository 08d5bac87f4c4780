//! What a sequence's next token is drawn with: the parameters a request is validated into
//! (the API builds them, the engine carries them, the host sampler and the device row read
//! them), and what a draw produced.

use crate::kernels::sampling::{SampleRow, GREEDY_TEMPERATURE, MAX_TOP_LOGPROBS};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no top-p cut.
    pub top_p: f32,
    /// 0 means no min-p cut.
    pub min_p: f32,
    /// 1 means none; applies to prompt and generated tokens.
    pub repetition_penalty: f32,
    /// Applies to generated tokens.
    pub presence_penalty: f32,
    /// Applies to generated tokens, per occurrence.
    pub frequency_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
    /// Alternatives to report per token (`Some(0)`: only the chosen token's logprob).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE
    }

    /// The device row of one draw (`Backend::sample`'s layout, `SampleRow`): these
    /// parameters without the lists, with the draw's seed and index (`counter`: tokens
    /// generated so far). `SamplingBatch::push_row` fills in the list ranges.
    pub fn device_row(&self, seed: u64, counter: u64) -> SampleRow {
        SampleRow {
            seed,
            counter,
            temperature: self.temperature,
            top_k: self.top_k.min(i32::MAX as usize) as i32,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            num_top_logprobs: self.logprobs.unwrap_or(0).min(MAX_TOP_LOGPROBS) as i32,
            ..SampleRow::default()
        }
    }
}

/// What sampling one position produced.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub token_id: u32,
    /// Log-probability of `token_id` under the model (raw logits).
    pub logprob: f32,
    /// The most probable tokens and their logprobs, best first, when asked for.
    pub top_logprobs: Vec<(u32, f32)>,
}
