//! The one place where an OpenAI request becomes the engine's `GenerateRequest`: every value
//! range-checked (each message names the field and the limit), the prompt (tokenized off the
//! async runtime by `prompt.rs`) checked against the context. Nothing downstream re-checks
//! what a client sent.

use std::time::Instant;

use super::errors::ApiError;
use super::openai_types::{ChatCompletionRequest, CommonParams, CompletionRequest};
use super::structured::{self, RequestedConstraint};
use super::tools::{self, ToolRequest};
use crate::engine::{EngineInfo, GenerateRequest};
use crate::sampling::{Constraint, SamplingParams};

/// Most alternatives per token (vLLM's `max_logprobs`).
pub const MAX_LOGPROBS: i64 = 20;
/// Most sequences one request may ask for.
pub const MAX_N: i64 = 128;
/// Most stop strings and stop token ids.
pub const MAX_STOPS: usize = 64;
/// Default `max_tokens` of `/v1/completions` (OpenAI's and vLLM's).
pub const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

/// The request's parameters, checked; the prompt is added per prompt by `build`.
#[derive(Debug, Clone)]
pub struct ValidatedParams {
    pub sampling: SamplingParams,
    pub n: usize,
    /// `None`: the endpoint's default.
    pub max_tokens: Option<usize>,
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub include_stop_str_in_output: bool,
    pub skip_special_tokens: bool,
    pub priority: i32,
    /// May speculate (`speculative`, default true).
    pub speculative: bool,
    pub stream: bool,
    pub include_usage: bool,
    pub return_token_ids: bool,
    /// What the output must match (`response_format`, `structured_outputs`).
    pub constraint_request: Option<RequestedConstraint>,
    /// The request's constraint once compiled (`structured::compile`, in the handler).
    pub constraint: Option<Constraint>,
    /// The tools offered (chat only; `None` for `tool_choice: none`).
    pub tools: Option<ToolRequest>,
}

fn finite(param: &str, v: f64) -> Result<f64, ApiError> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(ApiError::invalid(
            param,
            format!("{param} must be a finite number"),
        ))
    }
}

fn in_range(param: &str, v: Option<f64>, lo: f64, hi: f64, default: f64) -> Result<f64, ApiError> {
    let Some(v) = v else { return Ok(default) };
    let v = finite(param, v)?;
    if v < lo || v > hi {
        return Err(ApiError::invalid(
            param,
            format!("{param} must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(v)
}

pub(crate) fn token_id(param: &str, id: i64, vocab_size: usize) -> Result<u32, ApiError> {
    if id < 0 || id as u64 >= vocab_size as u64 {
        return Err(ApiError::invalid(
            param,
            format!(
                "{param}: token id {id} is out of range (the vocabulary has {vocab_size} tokens)"
            ),
        ));
    }
    Ok(id as u32)
}

/// Checks the fields chat and completions share. `max_tokens` is the endpoint's own field
/// (`max_completion_tokens` wins over `max_tokens` in chat); `logprobs` the number of
/// alternatives when logprobs were asked for.
pub fn validate_params(
    c: &CommonParams,
    max_tokens: Option<(&str, i64)>,
    logprobs: Option<usize>,
    info: &EngineInfo,
) -> Result<ValidatedParams, ApiError> {
    let n = c.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("n must be between 1 and {MAX_N}, got {n}"),
        ));
    }
    if n as usize > info.max_num_seqs {
        return Err(ApiError::invalid(
            "n",
            format!(
                "n must be at most the server's --max-num-seqs ({}), got {n}",
                info.max_num_seqs
            ),
        ));
    }
    let max_tokens = match max_tokens {
        None => None,
        Some((param, m)) if m < 1 => {
            return Err(ApiError::invalid(
                param,
                format!("{param} must be at least 1, got {m}"),
            ))
        }
        Some((_, m)) => Some(m as usize),
    };
    let temperature = match c.temperature {
        None => 1.0,
        Some(t) => {
            let t = finite("temperature", t)?;
            if t < 0.0 {
                return Err(ApiError::invalid(
                    "temperature",
                    format!("temperature must be at least 0, got {t}"),
                ));
            }
            t
        }
    };
    let top_p = match c.top_p {
        None => 1.0,
        Some(p) => {
            let p = finite("top_p", p)?;
            if p <= 0.0 || p > 1.0 {
                return Err(ApiError::invalid(
                    "top_p",
                    format!("top_p must be in (0, 1], got {p}"),
                ));
            }
            p
        }
    };
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k must be -1 (no limit) or at least 1, got {k}"),
            ))
        }
    };
    let min_p = in_range("min_p", c.min_p, 0.0, 1.0, 0.0)?;
    let presence_penalty = in_range("presence_penalty", c.presence_penalty, -2.0, 2.0, 0.0)?;
    let frequency_penalty = in_range("frequency_penalty", c.frequency_penalty, -2.0, 2.0, 0.0)?;
    let repetition_penalty = match c.repetition_penalty {
        None => 1.0,
        Some(r) => {
            let r = finite("repetition_penalty", r)?;
            if r <= 0.0 || r > 10.0 {
                return Err(ApiError::invalid(
                    "repetition_penalty",
                    format!("repetition_penalty must be in (0, 10], got {r}"),
                ));
            }
            r
        }
    };
    let mut logit_bias = Vec::new();
    for (key, value) in c.logit_bias.iter().flatten() {
        let id: i64 = key.parse().map_err(|_| {
            ApiError::invalid(
                "logit_bias",
                format!("logit_bias keys must be token ids, got `{key}`"),
            )
        })?;
        let id = token_id("logit_bias", id, info.vocab_size)?;
        let bias = value.as_f64().filter(|b| (-100.0..=100.0).contains(b));
        let Some(bias) = bias else {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("logit_bias values must be numbers between -100 and 100, got {value}"),
            ));
        };
        logit_bias.push((id, bias as f32));
    }
    let stop = c.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOPS} stop strings, got {}", stop.len()),
        ));
    }
    let stop_token_ids = c
        .stop_token_ids
        .iter()
        .flatten()
        .map(|&id| token_id("stop_token_ids", id, info.vocab_size))
        .collect::<Result<Vec<_>, _>>()?;
    if stop_token_ids.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            "stop_token_ids",
            format!(
                "at most {MAX_STOPS} stop token ids, got {}",
                stop_token_ids.len()
            ),
        ));
    }
    let min_tokens = match c.min_tokens {
        None => 0,
        Some(m) if m < 0 => {
            return Err(ApiError::invalid(
                "min_tokens",
                format!("min_tokens must be at least 0, got {m}"),
            ))
        }
        Some(m) => m as usize,
    };
    if let Some(max) = max_tokens {
        if min_tokens > max {
            return Err(ApiError::invalid(
                "min_tokens",
                format!("min_tokens ({min_tokens}) must be at most max_tokens ({max})"),
            ));
        }
    }
    let priority = match c.priority {
        None => 0,
        Some(p) => i32::try_from(p).map_err(|_| {
            ApiError::invalid("priority", format!("priority must fit in 32 bits, got {p}"))
        })?,
    };
    Ok(ValidatedParams {
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_k,
            top_p: top_p as f32,
            min_p: min_p as f32,
            repetition_penalty: repetition_penalty as f32,
            presence_penalty: presence_penalty as f32,
            frequency_penalty: frequency_penalty as f32,
            logit_bias,
            // OpenAI's seed is a signed 64-bit integer; its bits seed the generator.
            seed: c.seed.map(|s| s as u64),
            logprobs,
        },
        n: n as usize,
        max_tokens,
        min_tokens,
        ignore_eos: c.ignore_eos,
        stop,
        stop_token_ids,
        include_stop_str_in_output: c.include_stop_str_in_output,
        skip_special_tokens: c.skip_special_tokens.unwrap_or(true),
        priority,
        speculative: c.speculative.unwrap_or(true),
        stream: c.stream,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        return_token_ids: c.return_token_ids,
        constraint_request: structured::requested(c)?,
        constraint: None,
        tools: None,
    })
}

fn logprobs_count(param: &str, v: i64) -> Result<usize, ApiError> {
    if !(0..=MAX_LOGPROBS).contains(&v) {
        return Err(ApiError::invalid(
            param,
            format!("{param} must be between 0 and {MAX_LOGPROBS}, got {v}"),
        ));
    }
    Ok(v as usize)
}

/// OpenAI's fields that only describe a request (for the caller's own records): accepted,
/// and nothing to honour.
const INFORMATIONAL: [&str; 2] = ["metadata", "store"];

/// A request field sluice does not take is a 400 naming it, never silently ignored.
pub fn refuse_unknown(
    unknown: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), ApiError> {
    match unknown
        .keys()
        .find(|k| !INFORMATIONAL.contains(&k.as_str()))
    {
        Some(field) => Err(ApiError::invalid(
            field,
            format!("{field} is not supported by this server"),
        )),
        None => Ok(()),
    }
}

pub fn validate_completion(
    req: &CompletionRequest,
    info: &EngineInfo,
) -> Result<ValidatedParams, ApiError> {
    refuse_unknown(&req.unknown)?;
    let n = req.common.n.unwrap_or(1);
    if req.best_of.is_some_and(|b| b != n) {
        return Err(ApiError::invalid(
            "best_of",
            format!("best_of must equal n ({n}): drawing extra candidates is not supported"),
        ));
    }
    let logprobs = req
        .logprobs
        .map(|v| logprobs_count("logprobs", v))
        .transpose()?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "suffix is not supported"));
    }
    let max_tokens = req.common.max_tokens.map(|m| ("max_tokens", m));
    validate_params(&req.common, max_tokens, logprobs, info)
}

pub fn validate_chat(
    req: &ChatCompletionRequest,
    info: &EngineInfo,
) -> Result<ValidatedParams, ApiError> {
    refuse_unknown(&req.unknown)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages must contain at least one message",
        ));
    }
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (true, top) => Some(logprobs_count("top_logprobs", top.unwrap_or(0))?),
        (false, Some(t)) if t > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs to be true",
            ))
        }
        (false, _) => None,
    };
    let max_tokens = match (req.max_completion_tokens, req.common.max_tokens) {
        (Some(m), _) => Some(("max_completion_tokens", m)),
        (None, Some(m)) => Some(("max_tokens", m)),
        (None, None) => None,
    };
    if req.continue_final_message && req.add_generation_prompt == Some(true) {
        return Err(ApiError::invalid(
            "continue_final_message",
            "continue_final_message and add_generation_prompt cannot both be true",
        ));
    }
    let mut params = validate_params(&req.common, max_tokens, logprobs, info)?;
    params.tools = tools::validate(req)?;
    if params.tools.as_ref().is_some_and(ToolRequest::is_forced)
        && params.constraint_request.is_some()
    {
        return Err(ApiError::invalid(
            "tool_choice",
            "a forced tool call cannot be combined with response_format or structured_outputs",
        ));
    }
    Ok(params)
}

/// One engine request for one prompt: length checks against the context and the KV cache.
/// `default_max_tokens`: `None` means "up to the context" (chat), else the given number,
/// capped by what the context leaves.
pub fn build(
    params: &ValidatedParams,
    prompt_token_ids: Vec<u32>,
    prompt_param: &str,
    default_max_tokens: Option<usize>,
    info: &EngineInfo,
    request_id: String,
    arrival: Instant,
) -> Result<GenerateRequest, ApiError> {
    let num_prompt = prompt_token_ids.len();
    if num_prompt == 0 {
        return Err(ApiError::invalid(
            prompt_param,
            format!("{prompt_param} is empty after tokenization"),
        ));
    }
    // A sequence longer than the whole KV cache could never run: refused here, at once.
    let limit = info.max_model_len.min(info.kv_cache_tokens);
    let what = if info.kv_cache_tokens < info.max_model_len {
        "the server's KV cache holds"
    } else {
        "This model's maximum context length is"
    };
    if num_prompt >= limit {
        return Err(ApiError::invalid(
            prompt_param,
            format!(
                "{what} {limit} tokens. However, your prompt \
                 has {num_prompt} tokens, which leaves no room for a completion. Please reduce \
                 the length of the {prompt_param}."
            ),
        ));
    }
    let room = limit - num_prompt;
    let max_tokens = match params.max_tokens {
        Some(m) if m > room => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "{what} {limit} tokens. However, you \
                     requested {} tokens ({num_prompt} in the {prompt_param}, {m} in the \
                     completion). Please reduce the length of the {prompt_param} or completion.",
                    num_prompt + m
                ),
            ))
        }
        Some(m) => m,
        None => default_max_tokens.map_or(room, |d| d.min(room)),
    };
    Ok(GenerateRequest {
        request_id,
        prompt_token_ids,
        sampling: params.sampling.clone(),
        constraint: params.constraint.clone(),
        n: params.n,
        max_tokens,
        min_tokens: params.min_tokens.min(max_tokens),
        ignore_eos: params.ignore_eos,
        stop: params.stop.clone(),
        stop_token_ids: params.stop_token_ids.clone(),
        include_stop_str_in_output: params.include_stop_str_in_output,
        skip_special_tokens: params.skip_special_tokens,
        priority: params.priority,
        speculative: params.speculative,
        pooling: None,
        arrival,
    })
}

#[cfg(test)]
#[path = "validation_tests.rs"]
mod tests;
