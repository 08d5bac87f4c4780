//! `POST /v1/completions`: raw prompts (text, texts, token ids), answered whole or as
//! `text_completion` chunks.
//!
//! Several prompts are several engine requests; choice `i` of prompt `p` has index
//! `p * n + i`. With `echo` the prompt text comes first in each choice (and its tokens, with
//! null logprobs, in `logprobs`: the engine does not compute prompt logprobs).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Map, Value};

use super::errors::ApiError;
use super::generation::{
    choice_events, clamp_logprob, collect_choices, stop_reason_json, submit_all, token_text,
    traced, ChoiceAcc, ChoiceStream, ResponseMeta,
};
use super::openai_types::{
    CompletionChoice, CompletionChunk, CompletionChunkChoice, CompletionLogprobs,
    CompletionRequest, CompletionResponse, UsageInfo,
};
use super::prompt;
use super::sse::{self, ChunkStream};
use super::structured;
use super::validation::{self, ValidatedParams, COMPLETIONS_DEFAULT_MAX_TOKENS};
use super::{AppState, JsonBody};
use crate::engine::{StreamEvent, TokenLogprob};
use crate::telemetry::{Operation, RequestTrace};
use crate::tokenizer::Tokenizer;

/// A validated, submitted completions request.
pub struct PreparedCompletion {
    meta: ResponseMeta,
    params: ValidatedParams,
    echo: bool,
    /// Token ids of each prompt.
    prompts: Vec<Vec<u32>>,
    events: ChoiceStream,
}

impl PreparedCompletion {
    pub fn stream(&self) -> bool {
        self.params.stream
    }

    fn num_choices(&self) -> usize {
        self.prompts.len() * self.params.n
    }

    /// The choices' events and how many choices there are, for a front that shapes its own
    /// responses (gRPC, which refuses `echo` and `logprobs` before `prepare`).
    /// The stream of events, the number of choices, and the lease that keeps the version
    /// loaded until the caller drops it.
    pub fn into_events(self) -> (ChoiceStream, usize, crate::registry::Lease) {
        let num_choices = self.num_choices();
        (self.events, num_choices, self.meta.served)
    }

    /// The model version the request runs on.
    pub fn served(&self) -> &crate::registry::Lease {
        &self.meta.served
    }
}

pub async fn handler(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    let prepared = prepare(&state, req).await?;
    if prepared.stream() {
        Ok(sse::respond(chunks(prepared)))
    } else {
        Ok(axum::Json(collect(prepared).await?).into_response())
    }
}

pub async fn prepare(
    state: &AppState,
    req: CompletionRequest,
) -> Result<PreparedCompletion, ApiError> {
    prepare_at(state, req, None).await
}

/// `prepare`, at `priority` instead of the request's own when given (batch and async jobs
/// run at the lowest: `api/run.rs`).
pub async fn prepare_at(
    state: &AppState,
    req: CompletionRequest,
    priority: Option<i32>,
) -> Result<PreparedCompletion, ApiError> {
    traced(Operation::TextCompletion, async move |trace| {
        prepare_traced(state, req, priority, trace).await
    })
    .await
}

/// `prepare_at`; `trace` is taken when the request is submitted.
async fn prepare_traced(
    state: &AppState,
    req: CompletionRequest,
    priority: Option<i32>,
    trace: &mut Option<RequestTrace>,
) -> Result<PreparedCompletion, ApiError> {
    // The key's rate limits, before any work is spent on the request.
    super::keys::admit_current()?;
    let arrival = std::time::Instant::now();
    let served = state.route(req.common.model.as_deref()).await?;
    if let Some(t) = trace {
        t.model(&served.name, &served.version);
    }
    let info = &served.engine.info;
    let mut params = validation::validate_completion(&req, info)?;
    if let Some(p) = priority {
        params.priority = p;
    }
    let add_special = req.common.add_special_tokens.unwrap_or(true);
    let prompts =
        prompt::tokenize_prompts(served.tokenizer.clone(), "prompt", req.prompt, add_special)
            .await?;
    if prompts.is_empty() {
        return Err(ApiError::invalid(
            "prompt",
            "prompt must not be an empty list",
        ));
    }
    if prompts.len() * params.n > validation::MAX_N as usize {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "prompts x n must be at most {}, got {}",
                validation::MAX_N,
                prompts.len() * params.n
            ),
        ));
    }
    params.constraint =
        structured::compile(&served.constraints, params.constraint_request.as_ref()).await?;
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let requests = prompts
        .iter()
        .enumerate()
        .map(|(i, ids)| {
            validation::build(
                &params,
                ids.clone(),
                "prompt",
                Some(COMPLETIONS_DEFAULT_MAX_TOKENS),
                info,
                format!("{id}-{i}"),
                arrival,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let (Some(t), Some(first)) = (&trace, requests.first()) {
        t.request(&id, first, requests.len());
    }
    let streams = submit_all(&served.engine, requests)?;
    let events = choice_events(streams, params.n, RequestTrace::taken(trace));
    Ok(PreparedCompletion {
        meta: ResponseMeta::new(id, served),
        params,
        echo: req.echo,
        prompts,
        events,
    })
}

/// Builds the legacy logprobs lists, keeping each choice's running text offset.
fn append_logprobs(
    tokenizer: &Tokenizer,
    out: &mut CompletionLogprobs,
    offset: &mut usize,
    logprobs: &[TokenLogprob],
) {
    for lp in logprobs {
        let token = token_text(tokenizer, lp.token_id);
        let mut top = Map::new();
        top.insert(token.clone(), Value::from(clamp_logprob(lp.logprob)));
        for &(id, logprob) in &lp.top {
            top.entry(token_text(tokenizer, id))
                .or_insert_with(|| Value::from(clamp_logprob(logprob)));
        }
        out.text_offset.push(*offset);
        *offset += token.chars().count();
        out.tokens.push(token);
        out.token_logprobs.push(Some(clamp_logprob(lp.logprob)));
        out.top_logprobs.push(Some(top));
    }
}

/// The prompt's tokens in `logprobs` (echo): their logprobs are not computed, so null.
fn append_prompt_tokens(
    tokenizer: &Tokenizer,
    out: &mut CompletionLogprobs,
    offset: &mut usize,
    ids: &[u32],
) {
    for &id in ids {
        let token = token_text(tokenizer, id);
        out.text_offset.push(*offset);
        *offset += token.chars().count();
        out.tokens.push(token);
        out.token_logprobs.push(None);
        out.top_logprobs.push(None);
    }
}

fn prompt_text(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String, ApiError> {
    Ok(tokenizer.decode(ids, false)?)
}

pub fn chunks(p: PreparedCompletion) -> ChunkStream {
    let num_choices = p.num_choices();
    let PreparedCompletion {
        meta,
        params,
        echo,
        prompts,
        mut events,
    } = p;
    let n = params.n;
    let want_logprobs = params.sampling.logprobs.is_some();
    let tokenizer = meta.tokenizer.clone();
    let (id, created, model) = (meta.id, meta.created, meta.model);
    let chunk = move |choices: Vec<CompletionChunkChoice>, usage: Option<UsageInfo>| {
        serde_json::to_value(CompletionChunk {
            id: id.clone(),
            object: "text_completion",
            created,
            model: model.clone(),
            choices,
            usage,
        })
        .map_err(|e| ApiError::Internal(format!("cannot serialize a chunk: {e}")))
    };
    Box::pin(async_stream::stream! {
        let mut offsets = vec![0usize; num_choices];
        let mut sent_first = vec![false; num_choices];
        if echo {
            for choice in 0..num_choices {
                let ids = &prompts[choice / n];
                let text = match prompt_text(&tokenizer, ids) {
                    Ok(t) => t,
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                };
                let logprobs = want_logprobs.then(|| {
                    let mut lp = CompletionLogprobs::default();
                    append_prompt_tokens(&tokenizer, &mut lp, &mut offsets[choice], ids);
                    lp
                });
                sent_first[choice] = true;
                yield chunk(vec![CompletionChunkChoice {
                    index: choice,
                    text,
                    logprobs,
                    finish_reason: None,
                    stop_reason: None,
                    token_ids: None,
                    prompt_token_ids: params.return_token_ids.then(|| ids.clone()),
                }], None);
            }
        }
        while let Some(ev) = events.next().await {
            match ev {
                StreamEvent::Error(e) => {
                    yield Err(e.into());
                    return;
                }
                StreamEvent::Token { index: choice, text, token_ids, logprobs } => {
                    if choice >= num_choices {
                        continue;
                    }
                    if text.is_empty() && !want_logprobs && !params.return_token_ids {
                        continue;
                    }
                    let lp = want_logprobs.then(|| {
                        let mut lp = CompletionLogprobs::default();
                        append_logprobs(&tokenizer, &mut lp, &mut offsets[choice], &logprobs);
                        lp
                    });
                    let first = !std::mem::replace(&mut sent_first[choice], true);
                    yield chunk(vec![CompletionChunkChoice {
                        index: choice,
                        text,
                        logprobs: lp,
                        finish_reason: None,
                        stop_reason: None,
                        token_ids: params.return_token_ids.then_some(token_ids),
                        prompt_token_ids: (first && params.return_token_ids)
                            .then(|| prompts[choice / n].clone()),
                    }], None);
                }
                StreamEvent::Embedding { .. } => {}
                StreamEvent::SeqFinished { index: choice, reason, stop_reason } => {
                    yield chunk(vec![CompletionChunkChoice {
                        index: choice,
                        text: String::new(),
                        logprobs: None,
                        finish_reason: Some(reason.as_str()),
                        stop_reason: Some(stop_reason_json(&stop_reason)),
                        token_ids: None,
                        prompt_token_ids: None,
                    }], None);
                }
                StreamEvent::Done { usage: u, .. } => {
                    if params.include_usage {
                        yield chunk(Vec::new(), Some(UsageInfo::new(u.prompt_tokens, u.completion_tokens, u.cached_tokens)));
                    }
                    return;
                }
            }
        }
    })
}

pub async fn collect(p: PreparedCompletion) -> Result<CompletionResponse, ApiError> {
    let num_choices = p.num_choices();
    let PreparedCompletion {
        meta,
        params,
        echo,
        prompts,
        events,
    } = p;
    let n = params.n;
    let tok = &meta.tokenizer;
    let mut acc = Vec::with_capacity(num_choices);
    for choice in 0..num_choices {
        let ids = &prompts[choice / n];
        let mut a = ChoiceAcc::<(CompletionLogprobs, usize)>::default();
        if echo {
            a.text = prompt_text(tok, ids)?;
            let (out, offset) = &mut a.logprobs;
            append_prompt_tokens(tok, out, offset, ids);
        }
        acc.push(a);
    }
    let u = collect_choices(events, &mut acc, |(out, offset), logprobs| {
        append_logprobs(tok, out, offset, logprobs)
    })
    .await?;
    let usage = UsageInfo::new(u.prompt_tokens, u.completion_tokens, u.cached_tokens);
    let want_logprobs = params.sampling.logprobs.is_some();
    Ok(CompletionResponse {
        id: meta.id,
        object: "text_completion",
        created: meta.created,
        model: meta.model,
        choices: acc
            .into_iter()
            .enumerate()
            .map(|(index, a)| CompletionChoice {
                index,
                text: a.text,
                logprobs: want_logprobs.then_some(a.logprobs.0),
                finish_reason: a.finish_reason,
                stop_reason: a.stop_reason,
                token_ids: params.return_token_ids.then_some(a.token_ids),
                prompt_token_ids: params.return_token_ids.then(|| prompts[index / n].clone()),
            })
            .collect(),
        usage,
    })
}
