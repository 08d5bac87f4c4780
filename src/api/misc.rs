//! The small endpoints: `/v1/models`, `/tokenize`, `/detokenize` (vLLM's shapes), `/health`
//! and `/metrics`.

use std::sync::atomic::Ordering;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::errors::ApiError;
use super::generation::token_text;
use super::openai_types::{
    DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
};
use super::prompt;
use super::tools::{self, ToolFormat};
use super::{AppState, JsonBody};
use crate::registry::ModelStatus;
use crate::tokenizer::ChatTemplateOptions;

fn model_card(m: ModelStatus) -> ModelCard {
    ModelCard {
        id: m.name.clone(),
        object: "model",
        created: m.created,
        owned_by: "sluice",
        root: m.name,
        parent: None,
        max_model_len: m.max_model_len,
        state: m.state,
        live_version: m.live_version,
        versions: m.versions,
    }
}

/// `GET /v1/models`: every model, with its versions and their states.
pub async fn models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: state.models.status().into_iter().map(model_card).collect(),
    })
}

/// `GET /v1/models/{id}`: a model's card (`id` may pin a version: `name@version`), or
/// OpenAI's `model_not_found` 404.
pub async fn model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    let name = id.split_once('@').map_or(id.as_str(), |(n, _)| n);
    let status = state.models.model_status(name)?;
    if let Some((_, v)) = id.split_once('@') {
        if !status.versions.iter().any(|s| s.version == v) {
            return Err(ApiError::ModelNotFound(id));
        }
    }
    Ok(Json(model_card(status)))
}

pub async fn tokenize(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let served = state.route(req.model.as_deref()).await?;
    let tokenizer = served.tokenizer.clone();
    let tokens = match (req.prompt, req.messages) {
        (Some(prompt), None) => {
            let add_special = req.add_special_tokens.unwrap_or(true);
            let tok = tokenizer.clone();
            prompt::blocking(move || Ok(tok.encode(&prompt, add_special)?)).await?
        }
        (None, Some(messages)) => {
            let mut messages = prompt::chat_messages(&messages)?;
            // Earlier calls and tool results render as in chat.
            let format = ToolFormat::for_template(tokenizer.chat_template());
            tools::render_history(&mut messages, format);
            let opts = ChatTemplateOptions {
                add_generation_prompt: req
                    .add_generation_prompt
                    .unwrap_or(!req.continue_final_message),
                continue_final_message: req.continue_final_message,
                chat_template_kwargs: req.chat_template_kwargs.unwrap_or_default(),
            };
            let add_special = req.add_special_tokens.unwrap_or(false);
            prompt::tokenize_chat(tokenizer.clone(), messages, opts, add_special, None).await?
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "send exactly one of `prompt` and `messages`",
            ))
        }
    };
    let token_strs = req.return_token_strs.then(|| {
        tokens
            .iter()
            .map(|&id| token_text(&tokenizer, id))
            .collect()
    });
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: served.engine.info.max_model_len,
        tokens,
        token_strs,
    }))
}

pub async fn detokenize(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let served = state.route(req.model.as_deref()).await?;
    let vocab_size = served.tokenizer.vocab_size();
    let ids = req
        .tokens
        .iter()
        .map(|&id| {
            u32::try_from(id)
                .ok()
                .filter(|&id| (id as usize) < vocab_size)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "tokens",
                        format!(
                            "tokens: token id {id} is out of range (the vocabulary has {vocab_size} tokens)"
                        ),
                    )
                })
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let tokenizer = served.tokenizer.clone();
    let prompt = prompt::blocking(move || Ok(tokenizer.decode(&ids, false)?)).await?;
    Ok(Json(DetokenizeResponse { prompt }))
}

/// 200 while the engine loop is alive and the server is not draining, 503 otherwise.
/// `/health` and `/health/ready`: 200 while the server takes work (the model is loaded, as
/// it is before the server listens; not draining; the engine made progress within
/// `--health-max-silence` and its steps are not all failing), else 503.
pub async fn health(State(state): State<AppState>) -> Response {
    if state.shutting_down.load(Ordering::Acquire) {
        return ApiError::Unavailable("the server is shutting down".into()).into_response();
    }
    if state.models.is_healthy(state.config.health_max_silence) {
        StatusCode::OK.into_response()
    } else {
        let why = "no model serves, or an engine is not making progress (stopped, wedged or \
                   failing every step)";
        ApiError::Unavailable(why.into()).into_response()
    }
}

/// `/health/live`: 200 while the process serves and its engine thread runs (even wedged or
/// draining: a restart would not help a drain, and readiness already takes the server out of
/// rotation); 503 once the engine thread has ended, when only a restart helps.
pub async fn live(State(state): State<AppState>) -> Response {
    if state.models.is_alive() {
        StatusCode::OK.into_response()
    } else {
        ApiError::Unavailable("an engine thread has stopped".into()).into_response()
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    let engines = state.models.engines();
    let samplers: Vec<_> = engines
        .iter()
        .filter_map(|m| m.sample_gauges.clone())
        .collect();
    if !samplers.is_empty() {
        // NVML calls block for a moment: off the async workers.
        let _ = tokio::task::spawn_blocking(move || samplers.iter().for_each(|s| s())).await;
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        super::metrics::exposition(
            &engines,
            state.config.metric_names,
            state.config.health_max_silence,
        ),
    )
        .into_response()
}
