//! Streaming with tools offered: a choice's text is held back until it finishes, when its
//! parse decides whether the client gets content or calls (an `auto` answer may be either,
//! and a call's text must not reach the client as content). The calls then go out as
//! OpenAI's deltas: per call, one with its `index`, `id`, `type`, `function.name` and empty
//! `arguments`, then its arguments.

use crate::api::openai_types::{FunctionDelta, ToolCall, ToolCallDelta};
use crate::engine::TokenLogprob;

/// What a choice generated so far.
#[derive(Debug, Default)]
pub struct Held {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
}

/// Every choice's held output.
#[derive(Debug, Default)]
pub struct HeldChoices {
    held: Vec<Held>,
}

impl HeldChoices {
    pub fn new(n: usize) -> Self {
        Self {
            held: (0..n).map(|_| Held::default()).collect(),
        }
    }

    pub fn hold(
        &mut self,
        index: usize,
        text: &str,
        token_ids: &[u32],
        logprobs: Vec<TokenLogprob>,
    ) {
        if let Some(h) = self.held.get_mut(index) {
            h.text.push_str(text);
            h.token_ids.extend_from_slice(token_ids);
            h.logprobs.extend(logprobs);
        }
    }

    /// The choice's output, leaving nothing held.
    pub fn take(&mut self, index: usize) -> Held {
        self.held
            .get_mut(index)
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

/// The deltas of a choice's calls, one list per chunk.
pub fn call_deltas(calls: &[ToolCall]) -> Vec<Vec<ToolCallDelta>> {
    calls
        .iter()
        .enumerate()
        .flat_map(|(index, call)| {
            let head = ToolCallDelta {
                index,
                id: Some(call.id.clone()),
                kind: Some("function"),
                function: FunctionDelta {
                    name: Some(call.function.name.clone()),
                    arguments: String::new(),
                },
            };
            let args = ToolCallDelta {
                index,
                id: None,
                kind: None,
                function: FunctionDelta {
                    name: None,
                    arguments: call.function.arguments.clone(),
                },
            };
            [vec![head], vec![args]]
        })
        .collect()
}
