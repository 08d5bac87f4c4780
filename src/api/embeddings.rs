//! `POST /v1/embeddings`: OpenAI's embeddings API over a decoder model, as vLLM's embedding
//! mode for decoder LLMs serves it. Each input is one engine request that computes its prompt
//! in the same steps as generation and ends with the vector pooled from the model's final
//! hidden states (`engine/pooling.rs`; the model's `--pooling-type`, last token by default),
//! L2-normalised unless `normalize` is false. Vectors come back as floats, or as base64 of
//! their little-endian f32 bytes (what the `openai` SDKs ask for by default).

use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::errors::ApiError;
use super::generation::{choice_events, submit_all, traced, unix_now};
use super::openai_types::PromptSpec;
use super::prompt;
use super::validation::refuse_unknown;
use super::{AppState, JsonBody};
use crate::engine::{GenerateRequest, Pooling, StreamEvent};
use crate::telemetry::{Operation, RequestTrace};

/// Most inputs in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    /// Text, texts, token ids, or lists of token ids; each one vector.
    pub input: PromptSpec,
    /// `float` (default) or `base64`.
    pub encoding_format: Option<String>,
    /// Refused: a decoder's hidden states have one size, and cutting them is only meaningful
    /// for models trained for it (Matryoshka).
    pub dimensions: Option<i64>,
    pub user: Option<String>,
    /// sluice and vLLM: L2-normalise the vector (default true).
    pub normalize: Option<bool>,
    /// sluice and vLLM: add the tokenizer's special tokens (BOS) to text inputs (default
    /// true).
    pub add_special_tokens: Option<bool>,
    /// sluice and vLLM: lower runs first and is preempted last.
    pub priority: Option<i64>,
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: Map<String, Value>,
}

#[derive(Debug, Serialize)]
pub struct EmbeddingResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub data: Vec<EmbeddingData>,
    pub usage: EmbeddingUsage,
}

#[derive(Debug, Serialize)]
pub struct EmbeddingData {
    pub object: &'static str,
    pub index: usize,
    pub embedding: EmbeddingVector,
}

/// A vector as the request's `encoding_format` asks.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
pub struct EmbeddingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Float,
    Base64,
}

impl Encoding {
    fn parse(format: Option<&str>) -> Result<Self, ApiError> {
        match format {
            None | Some("float") => Ok(Self::Float),
            Some("base64") => Ok(Self::Base64),
            Some(other) => Err(ApiError::invalid(
                "encoding_format",
                format!("encoding_format must be `float` or `base64`, got `{other}`"),
            )),
        }
    }

    fn encode(self, v: Vec<f32>) -> EmbeddingVector {
        match self {
            Self::Float => EmbeddingVector::Float(v),
            Self::Base64 => {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
        }
    }
}

pub async fn handler(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<EmbeddingRequest>,
) -> Result<Json<EmbeddingResponse>, ApiError> {
    embed_at(&state, req, None).await.map(Json)
}

/// The embeddings of `req`, at `priority` instead of the request's own when given (batch
/// lines run at the lowest: `api/run.rs`).
pub async fn embed_at(
    state: &AppState,
    req: EmbeddingRequest,
    priority: Option<i32>,
) -> Result<EmbeddingResponse, ApiError> {
    traced(Operation::Embeddings, async move |trace| {
        embed(state, req, priority, trace).await
    })
    .await
}

/// Embeds every input of `req`, at `priority` instead of the request's own when given.
async fn embed(
    state: &AppState,
    req: EmbeddingRequest,
    priority: Option<i32>,
    trace: &mut Option<RequestTrace>,
) -> Result<EmbeddingResponse, ApiError> {
    super::keys::admit_current()?;
    let arrival = std::time::Instant::now();
    refuse_unknown(&req.unknown)?;
    if req.dimensions.is_some() {
        return Err(ApiError::invalid(
            "dimensions",
            "dimensions is not supported: this model's embeddings have one size",
        ));
    }
    let encoding = Encoding::parse(req.encoding_format.as_deref())?;
    let priority = match (priority, req.priority) {
        (Some(p), _) => p,
        (None, p) => i32::try_from(p.unwrap_or(0)).map_err(|_| {
            ApiError::invalid("priority", "priority must fit in 32 bits".to_string())
        })?,
    };
    if matches!(&req.input, PromptSpec::Text(t) if t.is_empty())
        || matches!(&req.input, PromptSpec::Texts(ts) if ts.iter().any(String::is_empty))
    {
        return Err(ApiError::invalid(
            "input",
            "input must not be an empty string",
        ));
    }
    // Counted before any is tokenized.
    let count = match &req.input {
        PromptSpec::Text(_) | PromptSpec::Ids(_) => 1,
        PromptSpec::Texts(v) => v.len(),
        PromptSpec::IdLists(v) => v.len(),
    };
    if count == 0 || count > MAX_INPUTS {
        return Err(ApiError::invalid(
            "input",
            format!("input must hold 1 to {MAX_INPUTS} items, got {count}"),
        ));
    }
    let served = state.route(req.model.as_deref()).await?;
    if let Some(t) = trace {
        t.model(&served.name, &served.version);
    }
    let info = &served.engine.info;
    let add_special = req.add_special_tokens.unwrap_or(true);
    let inputs =
        prompt::tokenize_prompts(served.tokenizer.clone(), "input", req.input, add_special).await?;
    // The pooled step samples one token after the input (unused), as generation would.
    let limit = info.max_model_len.min(info.kv_cache_tokens);
    let pooling = Pooling {
        kind: info.pooling,
        normalize: req.normalize.unwrap_or(true),
    };
    let id = format!("embd-{}", uuid::Uuid::new_v4().simple());
    let mut requests = Vec::with_capacity(inputs.len());
    for (i, ids) in inputs.into_iter().enumerate() {
        let len = ids.len();
        if len == 0 || len >= limit {
            return Err(ApiError::invalid(
                "input",
                format!(
                    "input {i} has {len} tokens; this model takes 1 to {} tokens per input",
                    limit - 1
                ),
            ));
        }
        requests.push(GenerateRequest {
            request_id: format!("{id}-{i}"),
            priority,
            arrival,
            ..GenerateRequest::embedding(ids, pooling)
        });
    }
    let num_inputs = requests.len();
    let streams = submit_all(&served.engine, requests)?;
    let mut events = choice_events(streams, 1, RequestTrace::taken(trace));
    let mut vectors: Vec<Option<Vec<f32>>> = vec![None; num_inputs];
    let usage = loop {
        match events.next().await {
            Some(StreamEvent::Embedding { index, embedding }) => {
                if let Some(slot) = vectors.get_mut(index) {
                    *slot = Some(embedding);
                }
            }
            Some(StreamEvent::Done { usage, .. }) => break usage,
            Some(StreamEvent::Error(e)) => return Err(e.into()),
            Some(_) => {}
            None => return Err(ApiError::Internal("the request ended without usage".into())),
        }
    };
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| {
            let v =
                v.ok_or_else(|| ApiError::Internal(format!("no embedding for input {index}")))?;
            Ok(EmbeddingData {
                object: "embedding",
                index,
                embedding: encoding.encode(v),
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(EmbeddingResponse {
        id,
        object: "list",
        created: unix_now(),
        model: served.name.clone(),
        data,
        usage: EmbeddingUsage {
            prompt_tokens: usage.prompt_tokens,
            total_tokens: usage.prompt_tokens,
        },
    })
}
