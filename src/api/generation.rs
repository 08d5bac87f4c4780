//! Submitting validated requests and reading their events as one stream of choices.
//!
//! A completions request with several prompts becomes one engine request per prompt; their
//! events are merged here and tagged with the choice index OpenAI expects
//! (`prompt_index * n + sequence_index`). Invariants: the merged stream ends after every
//! engine request's `Done` (usage summed) or at the first `Error`; dropping it drops every
//! `RequestStream`, which aborts whatever is still running in the engine.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};

use super::errors::ApiError;
use crate::engine::{
    EngineHandle, GenerateRequest, RequestError, RequestStream, RequestTimings, StopReason,
    StreamEvent, TokenLogprob, Usage,
};
use crate::telemetry::{Operation, RequestTrace};
use crate::tokenizer::Tokenizer;

/// The engine's events of every request behind one response, as one stream: a token or
/// finish event's `index` is the OpenAI choice index, `Done` carries the summed usage and
/// comes once, after every request's; an `Error` ends it.
pub type ChoiceStream = Pin<Box<dyn Stream<Item = StreamEvent> + Send>>;

/// One choice of a non-streaming response, built up from its events. `L` is the endpoint's
/// logprobs shape (chat's entries, or completions' legacy lists with their text offset).
#[derive(Debug, Default)]
pub struct ChoiceAcc<L> {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: L,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: serde_json::Value,
}

/// Reads `events` to the end into `acc` (one entry per choice, possibly pre-filled, e.g. with
/// an echoed prompt); `add_logprobs` appends a token event's logprobs to a choice's.
pub async fn collect_choices<L>(
    mut events: ChoiceStream,
    acc: &mut [ChoiceAcc<L>],
    mut add_logprobs: impl FnMut(&mut L, &[TokenLogprob]),
) -> Result<Usage, ApiError> {
    while let Some(ev) = events.next().await {
        match ev {
            StreamEvent::Token {
                index: choice,
                text,
                token_ids,
                logprobs,
            } => {
                if let Some(a) = acc.get_mut(choice) {
                    a.text.push_str(&text);
                    a.token_ids.extend_from_slice(&token_ids);
                    add_logprobs(&mut a.logprobs, &logprobs);
                }
            }
            StreamEvent::SeqFinished {
                index: choice,
                reason,
                stop_reason,
            } => {
                if let Some(a) = acc.get_mut(choice) {
                    a.finish_reason = Some(reason.as_str());
                    a.stop_reason = stop_reason_json(&stop_reason);
                }
            }
            // Pooling requests are read by the embeddings endpoint, not as choices.
            StreamEvent::Embedding { .. } => {}
            StreamEvent::Done { usage, .. } => return Ok(usage),
            StreamEvent::Error(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Internal("the request ended without usage".into()))
}

/// Submits every request, or none: when one is refused, the ones already queued are dropped
/// (and so aborted) and the refusal is the answer.
pub fn submit_all(
    engine: &EngineHandle,
    requests: Vec<GenerateRequest>,
) -> Result<Vec<RequestStream>, ApiError> {
    requests
        .into_iter()
        .map(|r| engine.submit(r).map_err(ApiError::from))
        .collect()
}

/// Merges the requests' events into one stream, each event moved, not copied: only its
/// index is rewritten to the choice index. `trace` sees every event and ends with it.
pub fn choice_events(
    streams: Vec<RequestStream>,
    n: usize,
    mut trace: RequestTrace,
) -> ChoiceStream {
    let num_requests = streams.len();
    let tagged = streams.into_iter().enumerate().map(|(prompt_index, rs)| {
        futures::stream::unfold(rs, |mut rs| async move {
            let ev = rs.next().await?;
            Some((ev, rs))
        })
        .map(move |ev| (prompt_index, ev))
        .boxed()
    });
    let mut merged = futures::stream::select_all(tagged);
    // Read now: the stream is polled after the handler (and its key's scope) returned.
    let key = super::keys::current();
    Box::pin(async_stream::stream! {
        let mut usage = Usage::default();
        let mut timings: Option<RequestTimings> = None;
        let mut num_done = 0;
        while let Some((prompt_index, mut ev)) = merged.next().await {
            let base = prompt_index * n;
            match ev {
                StreamEvent::Token { ref mut index, .. } => {
                    *index += base;
                    yield ev;
                }
                StreamEvent::Embedding { ref mut index, .. } => {
                    *index += base;
                    yield ev;
                }
                StreamEvent::SeqFinished { ref mut index, reason, .. } => {
                    *index += base;
                    trace.seq_finished(reason);
                    yield ev;
                }
                StreamEvent::Done { usage: u, timings: t } => {
                    usage.prompt_tokens += u.prompt_tokens;
                    usage.completion_tokens += u.completion_tokens;
                    usage.cached_tokens += u.cached_tokens;
                    trace.engine_request_done(t);
                    let t = timings.map_or(t, |m| m.merge(t));
                    timings = Some(t);
                    num_done += 1;
                    if num_done == num_requests {
                        if let Some(k) = &key {
                            k.charge(usage.prompt_tokens + usage.completion_tokens);
                        }
                        trace.finish(&usage, t);
                        yield StreamEvent::Done { usage, timings: t };
                        return;
                    }
                }
                StreamEvent::Error(e) => {
                    trace_failure(trace, &ApiError::from(e.clone()));
                    yield StreamEvent::Error(e);
                    return;
                }
            }
        }
        // Every engine stream ends with a terminal event, so this is not reached; if it were,
        // the client still gets an error rather than a silent end.
        yield StreamEvent::Error(RequestError::NoResult);
    })
}

/// Ends `trace` with `e`: its status code as `error.type`, its message as the status.
fn trace_failure(trace: RequestTrace, e: &ApiError) {
    trace.fail(e.status().as_str(), &e.to_string());
}

/// Prepares a generation request under a new trace: `prepare` takes the trace out of its
/// slot when it submits; a refusal before then ends the trace with that error.
pub async fn traced<T>(
    operation: Operation,
    prepare: impl AsyncFnOnce(&mut Option<RequestTrace>) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let mut trace = Some(RequestTrace::start(operation));
    let prepared = prepare(&mut trace).await;
    if let (Err(e), Some(t)) = (&prepared, trace) {
        trace_failure(t, e);
    }
    prepared
}

/// vLLM's `stop_reason`: the stop token id, the stop string, or null.
pub fn stop_reason_json(stop: &Option<StopReason>) -> serde_json::Value {
    match stop {
        None => serde_json::Value::Null,
        Some(StopReason::Token(id)) => serde_json::Value::from(*id),
        Some(StopReason::Text(s)) => serde_json::Value::from(s.clone()),
    }
}

/// A token's text as logprobs show it (special tokens included, broken UTF-8 replaced).
pub fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

/// JSON has no -inf: clamp as vLLM does.
pub fn clamp_logprob(lp: f32) -> f32 {
    if lp.is_finite() {
        lp
    } else {
        -9999.0
    }
}

/// Unix seconds, for `created`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What every response of one request shares.
#[derive(Clone)]
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    /// The model's name, as `/v1/models` lists it.
    pub model: String,
    pub tokenizer: Arc<Tokenizer>,
    /// The version the request runs on, kept loaded until the response has ended.
    pub served: crate::registry::Lease,
}

impl ResponseMeta {
    pub fn new(id: String, served: crate::registry::Lease) -> Self {
        Self {
            id,
            created: unix_now(),
            model: served.name.clone(),
            tokenizer: served.tokenizer.clone(),
            served,
        }
    }
}
