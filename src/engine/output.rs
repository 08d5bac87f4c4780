//! The output stage: what one sampled token means for its sequence, decided without touching a
//! channel, the scheduler or a metric. [`SeqOutput::decide`] takes the sequence's output state
//! and the token and returns an [`OutputDecision`]: the events to send and whether (and why)
//! the sequence ended, or the error that ends its request. The engine loop applies it: it
//! sends, finishes the sequence in the request table, or fails the request.
//!
//! Per token, first match wins:
//! 1. a stop token, or an EOS unless `ignore_eos`, ends the sequence (`stop`); its own text is
//!    not emitted;
//! 2. an output-stage fault (test-only, `fault.rs`) fails the request;
//! 3. the detokenizer turns the id into a text delta and the stop-string matcher
//!    (`stop_strings.rs`) releases what cannot be part of a stop string; a completed stop
//!    string ends the sequence (`stop`), the text cut where it matched;
//! 4. `max_tokens` or `max_model_len` ends it (`length`).
//!
//! A sequence that ends any way but a stop string releases the text held back (bytes of a
//! character, the start of a possible stop string) in its last `Token` event. A detokenizer
//! error fails the request.
//!
//! Cost per token: the event owns its text and its one-id `token_ids` (and logprobs, when
//! asked for); without stop strings the text is the detokenizer's delta itself, not a copy.
//! The decision holds the token's event and, when the sequence ended, its `SeqFinished`: no
//! list of events is built.

use super::fault::ArmedFault;
use super::request::{FinishReason, GenerateRequest, StopReason, StreamEvent, TokenLogprob};
use super::stop_strings::StopMatcher;
use crate::sampling::SampledToken;
use crate::tokenizer::{IncrementalDetokenizer, Tokenizer};

/// What the output stage decided for one token; the engine loop applies it.
#[derive(Debug, PartialEq)]
pub(super) enum OutputDecision {
    /// Send `token` (a `StreamEvent::Token`); the sequence goes on.
    Continue { token: StreamEvent },
    /// Send `token`, then `finished` (the sequence's `SeqFinished`); the sequence has ended
    /// for `reason`.
    Finish {
        token: StreamEvent,
        finished: StreamEvent,
        reason: FinishReason,
    },
    /// End the request with an internal error: the detokenizer failed, or an injected fault.
    Fail { message: String },
}

/// Why a sequence ended.
struct SeqEnd {
    reason: FinishReason,
    stop_reason: Option<StopReason>,
}

/// One sequence's output state: its choice index, the tokens it has generated, its text.
pub(super) struct SeqOutput {
    /// The choice index (OpenAI `index`) within its request.
    index: usize,
    /// Tokens generated so far, the one being decided included.
    num_generated: usize,
    detok: IncrementalDetokenizer,
    stops: StopMatcher,
    /// Test-only: an output-stage fault for this sequence.
    fault: Option<ArmedFault>,
}

impl SeqOutput {
    /// The output state of choice `index` of `request`. `fault` is an output-stage fault
    /// (`Fault::is_runner` false) or `None`.
    pub fn new(
        tokenizer: &Tokenizer,
        request: &GenerateRequest,
        index: usize,
        fault: Option<ArmedFault>,
    ) -> Self {
        Self {
            index,
            num_generated: 0,
            detok: IncrementalDetokenizer::new(tokenizer, request.skip_special_tokens),
            stops: StopMatcher::new(request.stop.clone(), request.include_stop_str_in_output),
            fault,
        }
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// Tokens this choice has generated so far.
    pub fn num_generated(&self) -> usize {
        self.num_generated
    }

    /// The output stage for `token`, the next token of this sequence of `request`.
    pub fn decide(
        &mut self,
        tokenizer: &Tokenizer,
        request: &GenerateRequest,
        max_model_len: usize,
        token: SampledToken,
    ) -> OutputDecision {
        self.num_generated += 1;
        let id = token.token_id;
        let (text, end) = match self.text_and_end(tokenizer, request, max_model_len, id) {
            Ok(decided) => decided,
            Err(message) => return OutputDecision::Fail { message },
        };
        let logprobs = if request.sampling.logprobs.is_some() {
            vec![TokenLogprob {
                token_id: id,
                logprob: token.logprob,
                top: token.top_logprobs,
            }]
        } else {
            Vec::new()
        };
        let token = StreamEvent::Token {
            index: self.index,
            text,
            token_ids: vec![id],
            logprobs,
        };
        match end {
            None => OutputDecision::Continue { token },
            Some(SeqEnd {
                reason,
                stop_reason,
            }) => OutputDecision::Finish {
                token,
                finished: StreamEvent::SeqFinished {
                    index: self.index,
                    reason,
                    stop_reason,
                },
                reason,
            },
        }
    }

    /// The text `id` releases and, when it ends the sequence, why; or the error that fails
    /// the request.
    fn text_and_end(
        &mut self,
        tokenizer: &Tokenizer,
        request: &GenerateRequest,
        max_model_len: usize,
        id: u32,
    ) -> Result<(String, Option<SeqEnd>), String> {
        let is_stop_token = request.stop_token_ids.contains(&id);
        if is_stop_token || (!request.ignore_eos && tokenizer.is_eos(id)) {
            let end = SeqEnd {
                reason: FinishReason::Stop,
                stop_reason: is_stop_token.then_some(StopReason::Token(id)),
            };
            return Ok((self.release_held(tokenizer)?, Some(end)));
        }
        if let Some(message) = self.fault.and_then(|f| f.output_error(self.num_generated)) {
            return Err(message);
        }
        let delta = self.detok.push(tokenizer, id).map_err(detok_error)?;
        let (mut text, stop) = self.stops.push(delta);
        if let Some(stop) = stop {
            // The text ends where the stop string matched: nothing held back is released.
            let end = SeqEnd {
                reason: FinishReason::Stop,
                stop_reason: Some(StopReason::Text(stop)),
            };
            return Ok((text, Some(end)));
        }
        let at_limit = self.num_generated >= request.max_tokens
            || request.prompt_token_ids.len() + self.num_generated >= max_model_len;
        if !at_limit {
            return Ok((text, None));
        }
        text.push_str(&self.release_held(tokenizer)?);
        let end = SeqEnd {
            reason: FinishReason::Length,
            stop_reason: None,
        };
        Ok((text, Some(end)))
    }

    /// The text held back (bytes of a character, the start of a possible stop string), when
    /// the sequence ends without a stop string.
    fn release_held(&mut self, tokenizer: &Tokenizer) -> Result<String, String> {
        let rest = self.detok.flush(tokenizer).map_err(detok_error)?;
        let (mut out, _) = self.stops.push(rest);
        out.push_str(&self.stops.flush());
        Ok(out)
    }
}

fn detok_error(e: crate::tokenizer::TokenizerError) -> String {
    format!("detokenization failed: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fault::Fault;
    use crate::gguf::{GgufFile, GgufValue};

    /// Byte-level tokens: "h", "i", " h", "!", "E", "N", "D", the first and second byte of
    /// "é", and an EOS.
    const TOKENS: [&str; 10] = [
        "h",
        "i",
        "Ġh",
        "!",
        "E",
        "N",
        "D",
        "Ã",
        "©",
        "<|endoftext|>",
    ];
    const H: u32 = 0;
    const I: u32 = 1;
    const SPACE_H: u32 = 2;
    const E: u32 = 4;
    const N: u32 = 5;
    const D: u32 = 6;
    const E_ACUTE: [u32; 2] = [7, 8];
    const EOS: u32 = 9;

    fn tokenizer() -> Tokenizer {
        let mut header = b"GGUF".to_vec();
        header.extend(3u32.to_le_bytes());
        header.extend([0u8; 16]);
        let mut file = GgufFile::parse_bytes(&header).unwrap();
        let strings = |items: &[&str]| {
            GgufValue::Array(
                items
                    .iter()
                    .map(|s| GgufValue::String(s.to_string()))
                    .collect(),
            )
        };
        let mut types = vec![GgufValue::I32(1); TOKENS.len()];
        types[EOS as usize] = GgufValue::I32(3);
        let m = &mut file.metadata;
        m.insert(
            "tokenizer.ggml.model".into(),
            GgufValue::String("gpt2".into()),
        );
        m.insert(
            "tokenizer.ggml.pre".into(),
            GgufValue::String("gpt2".into()),
        );
        m.insert("tokenizer.ggml.tokens".into(), strings(&TOKENS));
        m.insert("tokenizer.ggml.token_type".into(), GgufValue::Array(types));
        m.insert("tokenizer.ggml.merges".into(), strings(&[]));
        m.insert("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(EOS));
        m.insert(
            "tokenizer.ggml.add_bos_token".into(),
            GgufValue::Bool(false),
        );
        Tokenizer::from_gguf(&file).unwrap()
    }

    fn sampled(token_id: u32) -> SampledToken {
        SampledToken {
            token_id,
            logprob: -0.5,
            top_logprobs: vec![(token_id, -0.5)],
        }
    }

    /// Feeds `ids` to the output stage of choice 1 of `request` (context 64); returns each
    /// token's text and the last decision.
    fn run(request: &GenerateRequest, ids: &[u32]) -> (Vec<String>, OutputDecision) {
        run_with(request, ids, 64, None)
    }

    fn run_with(
        request: &GenerateRequest,
        ids: &[u32],
        max_model_len: usize,
        fault: Option<ArmedFault>,
    ) -> (Vec<String>, OutputDecision) {
        let tok = tokenizer();
        let mut output = SeqOutput::new(&tok, request, 1, fault);
        let mut texts = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let decision = output.decide(&tok, request, max_model_len, sampled(id));
            match &decision {
                OutputDecision::Continue { token } | OutputDecision::Finish { token, .. } => {
                    let StreamEvent::Token {
                        index,
                        text,
                        token_ids,
                        ..
                    } = token
                    else {
                        panic!("not a token event: {token:?}");
                    };
                    assert_eq!((*index, token_ids.as_slice()), (1, &[id][..]));
                    texts.push(text.clone());
                }
                OutputDecision::Fail { .. } => {}
            }
            if i + 1 == ids.len() || !matches!(decision, OutputDecision::Continue { .. }) {
                return (texts, decision);
            }
        }
        unreachable!("no ids")
    }

    fn request(max_tokens: usize) -> GenerateRequest {
        GenerateRequest::greedy(vec![H, I], max_tokens)
    }

    /// The end a decision announced: its reason and stop reason.
    fn end(decision: &OutputDecision) -> Option<(FinishReason, Option<StopReason>)> {
        match decision {
            OutputDecision::Finish {
                finished:
                    StreamEvent::SeqFinished {
                        index: 1,
                        reason,
                        stop_reason,
                    },
                reason: r,
                ..
            } if r == reason => Some((*reason, stop_reason.clone())),
            OutputDecision::Finish { finished, .. } => panic!("bad SeqFinished: {finished:?}"),
            _ => None,
        }
    }

    #[test]
    fn eos_and_stop_tokens_end_with_stop_and_release_held_bytes() {
        let (texts, last) = run(&request(10), &[H, E_ACUTE[0], EOS]);
        assert_eq!(texts, ["h", "", "\u{FFFD}"]);
        assert_eq!(end(&last), Some((FinishReason::Stop, None)));

        let r = GenerateRequest {
            stop_token_ids: vec![I],
            ..request(10)
        };
        let (texts, last) = run(&r, &[H, I]);
        assert_eq!(texts, ["h", ""]);
        assert_eq!(
            end(&last),
            Some((FinishReason::Stop, Some(StopReason::Token(I))))
        );

        let r = GenerateRequest {
            ignore_eos: true,
            ..request(10)
        };
        let (_, last) = run(&r, &[EOS]);
        assert_eq!(end(&last), None);
    }

    #[test]
    fn a_stop_string_cuts_the_text_and_ends_with_stop() {
        let r = GenerateRequest {
            stop: vec!["END".into()],
            ..request(10)
        };
        let (texts, last) = run(&r, &[H, SPACE_H, E, N, D, I]);
        assert_eq!(texts.concat(), "h h");
        assert_eq!(texts[2..], ["", "", ""]);
        let stop = Some(StopReason::Text("END".into()));
        assert_eq!(end(&last), Some((FinishReason::Stop, stop)));
    }

    #[test]
    fn limits_end_with_length_and_release_held_text() {
        let r = GenerateRequest {
            stop: vec!["EX".into()],
            ..request(3)
        };
        let (texts, last) = run(&r, &[E_ACUTE[0], E_ACUTE[1], E]);
        assert_eq!(texts, ["", "é", "E"]);
        assert_eq!(end(&last), Some((FinishReason::Length, None)));

        // Two prompt tokens and a context of four: the second token ends the sequence.
        let (texts, last) = run_with(&request(10), &[H, I, H], 4, None);
        assert_eq!(texts, ["h", "i"]);
        assert_eq!(end(&last), Some((FinishReason::Length, None)));
    }

    #[test]
    fn logprobs_only_when_asked() {
        let logprobs_of = |r: &GenerateRequest| {
            let tok = tokenizer();
            let mut output = SeqOutput::new(&tok, r, 0, None);
            match output.decide(&tok, r, 64, sampled(H)) {
                OutputDecision::Continue {
                    token: StreamEvent::Token { logprobs, .. },
                } => logprobs,
                other => panic!("{other:?}"),
            }
        };
        assert!(logprobs_of(&request(10)).is_empty());
        let mut r = request(10);
        r.sampling.logprobs = Some(1);
        let want = TokenLogprob {
            token_id: H,
            logprob: -0.5,
            top: vec![(H, -0.5)],
        };
        assert_eq!(logprobs_of(&r), [want]);
    }

    #[test]
    fn an_output_fault_fails_the_request_after_its_tokens() {
        let fault = ArmedFault {
            fault: Fault::Detokenize,
            after_tokens: 2,
        };
        let (texts, last) = run_with(&request(10), &[H, I, H], 64, Some(fault));
        assert_eq!(texts, ["h", "i"]);
        let message = "detokenization failed: injected fault".to_string();
        assert_eq!(last, OutputDecision::Fail { message });
    }
}
