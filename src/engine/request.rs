//! What crosses between the API and the engine: a validated request in, a stream of events
//! out.

use std::time::Instant;

use super::pooling::Pooling;
use super::request_error::RequestError;
use crate::sampling::{Constraint, SamplingParams};

/// A request the API has validated and tokenized: everything downstream trusts it.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// For logs and the OpenAI response id (`cmpl-…`, `chatcmpl-…`).
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    /// Sampling of every sequence; with a seed, sequence `i` uses stream `i` of it.
    pub sampling: SamplingParams,
    /// The grammar every sequence's output must match, compiled by the API (each sequence
    /// gets its own clone of it).
    pub constraint: Option<Constraint>,
    /// Sequences to generate (OpenAI `n`).
    pub n: usize,
    /// Most generated tokens per sequence.
    pub max_tokens: usize,
    /// End-of-sequence and stop tokens are suppressed until this many tokens exist.
    pub min_tokens: usize,
    pub ignore_eos: bool,
    /// Text that ends a sequence; not emitted unless `include_stop_str_in_output`.
    pub stop: Vec<String>,
    /// Tokens that end a sequence (besides EOS).
    pub stop_token_ids: Vec<u32>,
    pub include_stop_str_in_output: bool,
    pub skip_special_tokens: bool,
    /// Lower is served first and preempted last.
    pub priority: i32,
    /// May draft and verify tokens ahead when the engine speculates (the output is the same
    /// either way; a client may opt out, e.g. to measure plain decoding).
    pub speculative: bool,
    /// Make an embedding of the prompt instead of generating (`pooling.rs`): one sequence,
    /// which ends with a `StreamEvent::Embedding` once its prompt is computed.
    pub pooling: Option<Pooling>,
    /// When the API received it (queue time and TTFT are measured from here).
    pub arrival: Instant,
}

impl GenerateRequest {
    /// A greedy request with defaults, for tests and tools.
    pub fn greedy(prompt_token_ids: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            request_id: String::new(),
            prompt_token_ids,
            sampling: SamplingParams::greedy(),
            constraint: None,
            n: 1,
            max_tokens,
            min_tokens: 0,
            ignore_eos: false,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            include_stop_str_in_output: false,
            skip_special_tokens: true,
            priority: 0,
            speculative: true,
            pooling: None,
            arrival: Instant::now(),
        }
    }

    /// A request for the embedding of `prompt_token_ids`, for tests and tools.
    pub fn embedding(prompt_token_ids: Vec<u32>, pooling: Pooling) -> Self {
        Self {
            pooling: Some(pooling),
            speculative: false,
            ..Self::greedy(prompt_token_ids, 1)
        }
    }
}

/// Why a sequence ended (OpenAI `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    /// Aborted (shutdown, or an error in another part of the request).
    Abort,
}

impl FinishReason {
    /// The OpenAI spelling (`stop`, `length`, `abort`), also the metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
        }
    }
}

/// What stopped a sequence that ended with `Stop` (vLLM's `stop_reason`): `None` for EOS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    Token(u32),
    Text(String),
}

/// The log-probabilities of one generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// The most probable alternatives, best first.
    pub top: Vec<(u32, f32)>,
}

/// Token counts of a finished request (OpenAI `usage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Summed over the request's sequences.
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// When a finished request reached each stage, for its trace (`telemetry/`): queueing is
/// `queued..scheduled`, prefill `scheduled..first_token`, decode `first_token..finished`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTimings {
    /// When the API received it (`GenerateRequest::arrival`).
    pub arrival: Instant,
    /// When the engine took it into its queue.
    pub queued: Instant,
    /// When a step first ran it; `None` if it never ran.
    pub scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
    pub finished: Instant,
}

impl RequestTimings {
    /// The span of several engine requests behind one response (a completions request with
    /// several prompts): the earliest start of each stage, the last finish.
    pub fn merge(self, other: Self) -> Self {
        fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        Self {
            arrival: self.arrival.min(other.arrival),
            queued: self.queued.min(other.queued),
            scheduled: earliest(self.scheduled, other.scheduled),
            first_token: earliest(self.first_token, other.first_token),
            finished: self.finished.max(other.finished),
        }
    }
}

/// One event of a request's stream. Every stream ends with exactly one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// New output of sequence `index`: text (possibly empty while bytes of a character or a
    /// possible stop string are held back) and the tokens it came from.
    Token {
        index: usize,
        text: String,
        token_ids: Vec<u32>,
        /// One entry per token in `token_ids` when logprobs were asked for.
        logprobs: Vec<TokenLogprob>,
    },
    /// The embedding of sequence `index`'s prompt (a pooling request), just before its
    /// `SeqFinished`.
    Embedding { index: usize, embedding: Vec<f32> },
    /// Sequence `index` ended; more events may follow for other sequences.
    SeqFinished {
        index: usize,
        reason: FinishReason,
        stop_reason: Option<StopReason>,
    },
    /// The request is complete.
    Done {
        usage: Usage,
        timings: RequestTimings,
    },
    /// The request failed; nothing follows.
    Error(RequestError),
}

impl StreamEvent {
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Done { .. } | Self::Error(_))
    }
}
