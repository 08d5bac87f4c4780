//! Streaming with tools offered. A forced call (`required`, a named tool) streams as it is
//! generated (`incremental.rs`): per call, a delta with its `index`, `id`, `type`,
//! `function.name` and empty `arguments` once the name is out, then argument fragments. With
//! `auto`, a choice's text is held back until it ends, when its parse decides whether the
//! client gets content or calls (a call's text must not reach the client as content).

use super::incremental::CallStreamer;
use super::{ToolFormat, ToolRequest};
use crate::api::openai_types::ToolCallDelta;
use crate::engine::TokenLogprob;

/// What a choice generated so far.
#[derive(Debug, Default)]
struct Held {
    text: String,
    token_ids: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
}

/// A finished choice, as the stream's last chunks carry it.
#[derive(Debug)]
pub struct Finished {
    /// Text to send as content (`None`: none).
    pub content: Option<String>,
    /// Held token ids and logprobs, sent with the content chunk.
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    /// One list per chunk.
    pub deltas: Vec<Vec<ToolCallDelta>>,
    /// Whether the choice sent calls (then the last chunk has no content).
    pub called: bool,
    pub finish_reason: &'static str,
}

/// Every choice's held output and streamed calls.
pub struct ToolStream {
    request: ToolRequest,
    format: ToolFormat,
    held: Vec<Held>,
    calls: Vec<CallStreamer>,
}

impl ToolStream {
    pub fn new(request: ToolRequest, format: ToolFormat, n: usize) -> Self {
        Self {
            request,
            format,
            held: (0..n).map(|_| Held::default()).collect(),
            calls: (0..n).map(|_| CallStreamer::default()).collect(),
        }
    }

    /// Holds a token's output; returns the call deltas it completes (forced calls only).
    pub fn token(
        &mut self,
        index: usize,
        text: &str,
        token_ids: &[u32],
        logprobs: Vec<TokenLogprob>,
    ) -> Vec<Vec<ToolCallDelta>> {
        let (Some(h), Some(calls)) = (self.held.get_mut(index), self.calls.get_mut(index)) else {
            return Vec::new();
        };
        h.text.push_str(text);
        h.token_ids.extend_from_slice(token_ids);
        h.logprobs.extend(logprobs);
        if self.request.is_forced() && !text.is_empty() {
            calls.advance(&h.text, self.format)
        } else {
            Vec::new()
        }
    }

    /// The choice's end: its parse, and what is left to send.
    pub fn finish(&mut self, index: usize, reason: &'static str) -> Finished {
        let h = self
            .held
            .get_mut(index)
            .map(std::mem::take)
            .unwrap_or_default();
        let mut out = self.request.finish(self.format, h.text, Some(reason));
        let calls = self.calls.get_mut(index);
        let started = calls.as_ref().is_some_and(|c| c.started());
        let deltas = match calls {
            Some(c) => c.finish(&mut out.tool_calls),
            None => Vec::new(),
        };
        let called = started || !out.tool_calls.is_empty();
        Finished {
            // Calls already streamed are not repeated as content, even when the whole did
            // not parse (cut by `length`).
            content: if called && out.tool_calls.is_empty() {
                None
            } else {
                out.content
            },
            token_ids: h.token_ids,
            logprobs: h.logprobs,
            deltas,
            called,
            finish_reason: out.finish_reason.unwrap_or(reason),
        }
    }
}
