//! `POST /v1/chat/completions`: the conversation rendered with the model's chat template,
//! answered whole or as `chat.completion.chunk`s.
//!
//! Chunk order per request, as vLLM sends it: for each choice a first chunk with the role and
//! empty content; token chunks with `delta.content`; a last chunk per choice with
//! `finish_reason` and `stop_reason`; with `stream_options.include_usage`, one more chunk with
//! `choices: []` and `usage`. With tools offered, a forced call streams as call deltas and an
//! `auto` choice is held back to its end, then sent as content or calls (`tools/stream.rs`).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use super::errors::ApiError;
use super::generation::{
    choice_events, clamp_logprob, collect_choices, stop_reason_json, submit_all, token_text,
    traced, ChoiceAcc, ChoiceStream, ResponseMeta,
};
use super::openai_types::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatDelta, ChatLogprobEntry, ChatLogprobs, ChatTopLogprob,
    ToolCallDelta, UsageInfo,
};
use super::prompt;
use super::sse::{self, ChunkStream};
use super::structured::{self, RequestedConstraint};
use super::tools::{self, ChoiceOutput, ToolFormat, ToolRequest, ToolStream};
use super::validation::{self, ValidatedParams};
use super::{AppState, JsonBody};
use crate::engine::{StreamEvent, TokenLogprob};
use crate::telemetry::{Operation, RequestTrace};
use crate::tokenizer::{ChatTemplateOptions, Tokenizer};

/// A validated, submitted chat request.
pub struct PreparedChat {
    meta: ResponseMeta,
    params: ValidatedParams,
    prompt_token_ids: Vec<u32>,
    events: ChoiceStream,
    /// The tools offered, and how the model writes calls.
    tools: Option<(ToolRequest, ToolFormat)>,
}

impl PreparedChat {
    pub fn stream(&self) -> bool {
        self.params.stream
    }
}

pub async fn handler(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let prepared = prepare(&state, req).await?;
    if prepared.stream() {
        Ok(sse::respond(chunks(prepared)))
    } else {
        Ok(axum::Json(collect(prepared).await?).into_response())
    }
}

/// Validates, renders, tokenizes and submits. Every refusal happens here, before a stream
/// begins, so it gets its own status code.
pub async fn prepare(
    state: &AppState,
    req: ChatCompletionRequest,
) -> Result<PreparedChat, ApiError> {
    prepare_at(state, req, None).await
}

/// `prepare`, at `priority` instead of the request's own when given (batch and async jobs
/// run at the lowest: `api/run.rs`).
pub async fn prepare_at(
    state: &AppState,
    req: ChatCompletionRequest,
    priority: Option<i32>,
) -> Result<PreparedChat, ApiError> {
    traced(Operation::Chat, async move |trace| {
        prepare_traced(state, req, priority, trace).await
    })
    .await
}

/// `prepare_at`; `trace` is taken when the request is submitted.
async fn prepare_traced(
    state: &AppState,
    req: ChatCompletionRequest,
    priority: Option<i32>,
    trace: &mut Option<RequestTrace>,
) -> Result<PreparedChat, ApiError> {
    // The key's rate limits, before any work is spent on the request.
    super::keys::admit_current()?;
    let arrival = std::time::Instant::now();
    let served = state.route(req.common.model.as_deref()).await?;
    if let Some(t) = trace {
        t.model(&served.name, &served.version);
    }
    let info = &served.engine.info;
    let mut params = validation::validate_chat(&req, info)?;
    if let Some(p) = priority {
        params.priority = p;
    }
    let tool_request = params.tools.take();
    let tool_format = ToolFormat::for_template(served.tokenizer.chat_template());
    let mut messages = prompt::chat_messages(&req.messages)?;
    tools::render_history(&mut messages, tool_format);
    let mut chat_template_kwargs = req.chat_template_kwargs.clone().unwrap_or_default();
    if let Some(t) = &tool_request {
        t.offer(tool_format, &mut messages, &mut chat_template_kwargs);
    }
    if let Some(faults) = info.faults {
        messages.iter().for_each(|m| faults.in_handler(&m.content));
    }
    let opts = ChatTemplateOptions {
        add_generation_prompt: req
            .add_generation_prompt
            .unwrap_or(!req.continue_final_message),
        continue_final_message: req.continue_final_message,
        chat_template_kwargs,
    };
    // The template writes the special tokens itself (vLLM's default for chat).
    let add_special = req.common.add_special_tokens.unwrap_or(false);
    let prompt_token_ids = prompt::tokenize_chat(
        served.tokenizer.clone(),
        messages,
        opts,
        add_special,
        info.faults,
    )
    .await?;
    params.constraint =
        structured::compile(&served.constraints, params.constraint_request.as_ref()).await?;
    if let Some(t) = &tool_request {
        // Compiled for `auto` too, so a tool whose schema does not compile is refused
        // whatever the choice; only a forced call keeps it.
        let grammar = RequestedConstraint {
            spec: t.grammar(tool_format),
            param: "tools",
        };
        let compiled = structured::compile(&served.constraints, Some(&grammar)).await?;
        if t.is_forced() {
            params.constraint = compiled;
        }
    }
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let request = validation::build(
        &params,
        prompt_token_ids.clone(),
        "messages",
        None,
        info,
        id.clone(),
        arrival,
    )?;
    if let Some(t) = trace {
        t.request(&id, &request, 1);
    }
    let streams = submit_all(&served.engine, vec![request])?;
    let events = choice_events(streams, params.n, RequestTrace::taken(trace));
    Ok(PreparedChat {
        meta: ResponseMeta::new(id, served),
        params,
        prompt_token_ids,
        events,
        tools: tool_request.map(|t| (t, tool_format)),
    })
}

fn logprob_entries(tokenizer: &Tokenizer, logprobs: &[TokenLogprob]) -> Vec<ChatLogprobEntry> {
    logprobs
        .iter()
        .map(|lp| {
            let token = token_text(tokenizer, lp.token_id);
            ChatLogprobEntry {
                bytes: token.as_bytes().to_vec(),
                token,
                logprob: clamp_logprob(lp.logprob),
                top_logprobs: lp
                    .top
                    .iter()
                    .map(|&(id, logprob)| {
                        let token = token_text(tokenizer, id);
                        ChatTopLogprob {
                            bytes: token.as_bytes().to_vec(),
                            token,
                            logprob: clamp_logprob(logprob),
                        }
                    })
                    .collect(),
            }
        })
        .collect()
}

/// The request's chunks, as JSON values, for SSE or WebSocket.
pub fn chunks(p: PreparedChat) -> ChunkStream {
    let PreparedChat {
        meta,
        params,
        prompt_token_ids,
        mut events,
        tools,
    } = p;
    let mut tool_stream = tools.map(|(t, format)| ToolStream::new(t, format, params.n));
    let want_logprobs = params.sampling.logprobs.is_some();
    let chunk = move |choices: Vec<ChatChunkChoice>,
                      usage: Option<UsageInfo>,
                      prompt_ids: Option<Vec<u32>>| {
        serde_json::to_value(ChatCompletionChunk {
            id: meta.id.clone(),
            object: "chat.completion.chunk",
            created: meta.created,
            model: meta.model.clone(),
            choices,
            usage,
            prompt_token_ids: prompt_ids,
        })
        .map_err(|e| ApiError::Internal(format!("cannot serialize a chunk: {e}")))
    };
    let tokenizer = meta.tokenizer.clone();
    Box::pin(async_stream::stream! {
        for index in 0..params.n {
            let prompt_ids = (index == 0 && params.return_token_ids).then(|| prompt_token_ids.clone());
            yield chunk(
                vec![ChatChunkChoice {
                    index,
                    delta: ChatDelta { role: Some("assistant"), content: Some(String::new()), tool_calls: None },
                    logprobs: None,
                    finish_reason: None,
                    stop_reason: None,
                    token_ids: None,
                }],
                None,
                prompt_ids,
            );
        }
        while let Some(ev) = events.next().await {
            match ev {
                StreamEvent::Error(e) => {
                    yield Err(e.into());
                    return;
                }
                StreamEvent::Token { index: choice, text, token_ids, logprobs } => {
                    if let Some(ts) = tool_stream.as_mut() {
                        for deltas in ts.token(choice, &text, &token_ids, logprobs) {
                            yield chunk(vec![tool_call_choice(choice, deltas)], None, None);
                        }
                        continue;
                    }
                    // Text held back (a partial character or stop string) sends nothing,
                    // unless the client wants every token's ids or logprobs.
                    if text.is_empty() && !want_logprobs && !params.return_token_ids {
                        continue;
                    }
                    let logprobs = want_logprobs.then(|| ChatLogprobs {
                        content: logprob_entries(&tokenizer, &logprobs),
                    });
                    yield chunk(
                        vec![ChatChunkChoice {
                            index: choice,
                            delta: ChatDelta { role: None, content: Some(text), tool_calls: None },
                            logprobs,
                            finish_reason: None,
                            stop_reason: None,
                            token_ids: params.return_token_ids.then_some(token_ids),
                        }],
                        None,
                        None,
                    );
                }
                StreamEvent::Embedding { .. } => {}
                StreamEvent::SeqFinished { index: choice, reason, stop_reason } => {
                    let mut finish_reason = reason.as_str();
                    let mut last_content = Some(String::new());
                    if let Some(ts) = tool_stream.as_mut() {
                        let f = ts.finish(choice, finish_reason);
                        if f.content.is_some() || want_logprobs || params.return_token_ids {
                            let logprobs = want_logprobs.then(|| ChatLogprobs {
                                content: logprob_entries(&tokenizer, &f.logprobs),
                            });
                            yield chunk(
                                vec![ChatChunkChoice {
                                    index: choice,
                                    delta: ChatDelta { role: None, content: f.content, tool_calls: None },
                                    logprobs,
                                    finish_reason: None,
                                    stop_reason: None,
                                    token_ids: params.return_token_ids.then_some(f.token_ids),
                                }],
                                None,
                                None,
                            );
                        }
                        for deltas in f.deltas {
                            yield chunk(vec![tool_call_choice(choice, deltas)], None, None);
                        }
                        if f.called {
                            last_content = None;
                        }
                        finish_reason = f.finish_reason;
                    }
                    yield chunk(
                        vec![ChatChunkChoice {
                            index: choice,
                            delta: ChatDelta { role: None, content: last_content, tool_calls: None },
                            logprobs: None,
                            finish_reason: Some(finish_reason),
                            stop_reason: Some(stop_reason_json(&stop_reason)),
                            token_ids: None,
                        }],
                        None,
                        None,
                    );
                }
                StreamEvent::Done { usage: u, .. } => {
                    if params.include_usage {
                        let usage = UsageInfo::new(u.prompt_tokens, u.completion_tokens, u.cached_tokens);
                        yield chunk(Vec::new(), Some(usage), None);
                    }
                    return;
                }
            }
        }
    })
}

/// A chunk's choice carrying call deltas.
fn tool_call_choice(index: usize, deltas: Vec<ToolCallDelta>) -> ChatChunkChoice {
    ChatChunkChoice {
        index,
        delta: ChatDelta {
            role: None,
            content: None,
            tool_calls: Some(deltas),
        },
        logprobs: None,
        finish_reason: None,
        stop_reason: None,
        token_ids: None,
    }
}

/// The whole response, once every choice has finished.
pub async fn collect(p: PreparedChat) -> Result<ChatCompletionResponse, ApiError> {
    let PreparedChat {
        meta,
        params,
        prompt_token_ids,
        events,
        tools,
    } = p;
    let mut acc: Vec<ChoiceAcc<Vec<ChatLogprobEntry>>> =
        (0..params.n).map(|_| ChoiceAcc::default()).collect();
    let u = collect_choices(events, &mut acc, |out, logprobs| {
        out.extend(logprob_entries(&meta.tokenizer, logprobs))
    })
    .await?;
    let usage = UsageInfo::new(u.prompt_tokens, u.completion_tokens, u.cached_tokens);
    let want_logprobs = params.sampling.logprobs.is_some();
    Ok(ChatCompletionResponse {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        choices: acc
            .into_iter()
            .enumerate()
            .map(|(index, a)| {
                let out = match &tools {
                    Some((t, format)) => t.finish(*format, a.text, a.finish_reason),
                    None => ChoiceOutput {
                        content: Some(a.text),
                        tool_calls: Vec::new(),
                        finish_reason: a.finish_reason,
                    },
                };
                ChatChoice {
                    index,
                    message: AssistantMessage {
                        role: "assistant",
                        content: out.content,
                        tool_calls: out.tool_calls,
                    },
                    logprobs: want_logprobs.then_some(ChatLogprobs {
                        content: a.logprobs,
                    }),
                    finish_reason: out.finish_reason,
                    stop_reason: a.stop_reason,
                    token_ids: params.return_token_ids.then_some(a.token_ids),
                }
            })
            .collect(),
        usage,
        prompt_token_ids: params.return_token_ids.then_some(prompt_token_ids),
    })
}
