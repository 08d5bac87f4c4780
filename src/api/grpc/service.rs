//! `inference.GRPCInferenceService`: health and metadata from the served model, inference
//! through `/v1/completions`' own `prepare` (validation, tokenization, constraints,
//! submission) with the request `convert.rs` reads.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::stream::{BoxStream, SelectAll};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::convert::{self, param, InferInput, FINAL_RESPONSE};
use super::proto::grpc_inference_service_server::GrpcInferenceService;
use super::proto::infer_parameter::ParameterChoice;
use super::proto::model_metadata_response::TensorMetadata;
use super::proto::repository_index_response::ModelIndex;
use super::proto::*;
use super::status::in_stream_message;
use super::{ready, served};
use crate::api::completions;
use crate::api::errors::ApiError;
use crate::api::AppState;
use crate::engine::StreamEvent;

/// How often an idle `ModelStreamInfer` call checks whether the server is draining.
const DRAIN_CHECK: Duration = Duration::from_millis(100);

/// The service; cheap to clone.
#[derive(Clone)]
pub struct Inference {
    state: AppState,
}

impl Inference {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    /// Reads, validates and submits one request; `may_stream` tells whether the call can
    /// answer more than once.
    async fn submit(
        &self,
        req: ModelInferRequest,
        may_stream: bool,
    ) -> Result<Submitted, ApiError> {
        self.state.check_accepting()?;
        let InferInput {
            request,
            stream,
            id,
        } = convert::infer_input(req)?;
        if stream && !may_stream {
            return Err(ApiError::invalid(
                "stream",
                "stream = true needs ModelStreamInfer: ModelInfer answers once",
            ));
        }
        let model = served(&self.state, request.common.model.as_deref().unwrap_or(""))?;
        let prepared = completions::prepare(&self.state, request).await?;
        Ok(Submitted {
            stream,
            id,
            model,
            prepared,
        })
    }
}

/// A request in the engine.
struct Submitted {
    stream: bool,
    id: String,
    model: String,
    prepared: completions::PreparedCompletion,
}

fn tensor(name: &str, datatype: &str, shape: &[i64]) -> TensorMetadata {
    TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
    }
}

/// Usage and finish reasons as response parameters.
fn final_parameters(
    resp: &mut ModelInferResponse,
    finish_reasons: &[&str],
    prompt_tokens: usize,
    completion_tokens: usize,
) {
    let p = &mut resp.parameters;
    p.insert(
        "finish_reason".into(),
        param(ParameterChoice::StringParam(finish_reasons.join(","))),
    );
    p.insert(
        "prompt_tokens".into(),
        param(ParameterChoice::Int64Param(prompt_tokens as i64)),
    );
    p.insert(
        "completion_tokens".into(),
        param(ParameterChoice::Int64Param(completion_tokens as i64)),
    );
    p.insert(
        FINAL_RESPONSE.into(),
        param(ParameterChoice::BoolParam(true)),
    );
}

fn stream_error(id: &str, e: ApiError) -> ModelStreamInferResponse {
    ModelStreamInferResponse {
        error_message: in_stream_message(e),
        infer_response: Some(ModelInferResponse {
            id: id.to_string(),
            ..Default::default()
        }),
    }
}

fn stream_ok(resp: ModelInferResponse) -> ModelStreamInferResponse {
    ModelStreamInferResponse {
        error_message: String::new(),
        infer_response: Some(resp),
    }
}

/// One request of a `ModelStreamInfer` call: its responses, the last one final (or an error).
/// Dropping the stream drops the engine requests, which aborts them.
fn one_request(
    service: Inference,
    req: ModelInferRequest,
) -> BoxStream<'static, ModelStreamInferResponse> {
    let id = req.id.clone();
    Box::pin(async_stream::stream! {
        let Submitted { stream, model, prepared, .. } = match service.submit(req, true).await {
            Ok(p) => p,
            Err(e) => {
                yield stream_error(&id, e);
                return;
            }
        };
        let (mut events, num_choices) = prepared.into_events();
        let mut texts = vec![String::new(); num_choices];
        let mut reasons = vec![""; num_choices];
        while let Some(ev) = events.next().await {
            match ev {
                StreamEvent::Token { index, text, .. } => {
                    if index >= num_choices || text.is_empty() {
                        continue;
                    }
                    if stream {
                        let mut resp = convert::text_response(&model, &id, &[text]);
                        if num_choices > 1 {
                            resp.parameters.insert("index".into(), param(ParameterChoice::Int64Param(index as i64)));
                        }
                        resp.parameters.insert(FINAL_RESPONSE.into(), param(ParameterChoice::BoolParam(false)));
                        yield stream_ok(resp);
                    } else {
                        texts[index].push_str(&text);
                    }
                }
                StreamEvent::SeqFinished { index, reason, .. } => {
                    if let Some(r) = reasons.get_mut(index) {
                        *r = reason.as_str();
                    }
                }
                StreamEvent::Done { usage } => {
                    // Streaming: the final response carries no text, only the summary.
                    let texts = if stream { vec![String::new(); num_choices] } else { std::mem::take(&mut texts) };
                    let mut resp = convert::text_response(&model, &id, &texts);
                    final_parameters(&mut resp, &reasons, usage.prompt_tokens, usage.completion_tokens);
                    yield stream_ok(resp);
                    return;
                }
                StreamEvent::Error(e) => {
                    yield stream_error(&id, e.into());
                    return;
                }
            }
        }
    })
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GrpcInferenceService for Inference {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse {
            live: self.state.engine.is_alive(),
        }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: ready(&self.state),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let known = served(&self.state, &request.get_ref().name).is_ok();
        Ok(Response::new(ModelReadyResponse {
            ready: known && ready(&self.state),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "sluice".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec!["parameters".into(), "model_repository".into()],
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let name = served(&self.state, &request.get_ref().name)?;
        Ok(Response::new(ModelMetadataResponse {
            name,
            versions: vec!["1".into()],
            platform: "sluice".into(),
            inputs: vec![
                tensor(convert::TEXT_INPUT, "BYTES", &[-1]),
                tensor("max_tokens", "INT32", &[1]),
                tensor("stream", "BOOL", &[1]),
                tensor("temperature", "FP32", &[1]),
                tensor("top_p", "FP32", &[1]),
                tensor("top_k", "INT32", &[1]),
                tensor("seed", "INT64", &[1]),
                tensor("stop", "BYTES", &[-1]),
            ],
            outputs: vec![tensor(convert::TEXT_OUTPUT, "BYTES", &[-1])],
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let Submitted {
            id,
            model,
            prepared,
            ..
        } = self.submit(request.into_inner(), false).await?;
        let done = completions::collect(prepared).await?;
        let texts: Vec<String> = done.choices.iter().map(|c| c.text.clone()).collect();
        let reasons: Vec<&str> = done
            .choices
            .iter()
            .map(|c| c.finish_reason.unwrap_or(""))
            .collect();
        let mut resp = convert::text_response(&model, &id, &texts);
        final_parameters(
            &mut resp,
            &reasons,
            done.usage.prompt_tokens,
            done.usage.completion_tokens,
        );
        Ok(Response::new(resp))
    }

    type ModelStreamInferStream = ResponseStream;

    /// Requests are served concurrently as they arrive; their responses interleave, each
    /// carrying its request's `id`. Everything is owned by the response stream: when the
    /// client cancels or goes away, tonic drops it and every request still running aborts.
    /// While the server drains, the call ends once its requests have (as SSE streams do).
    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let mut inbound = request.into_inner();
        let service = self.clone();
        let out = async_stream::stream! {
            let mut active: SelectAll<BoxStream<'static, ModelStreamInferResponse>> = SelectAll::new();
            let mut inbound_open = true;
            let mut drain_check = tokio::time::interval(DRAIN_CHECK);
            loop {
                // The client closed its side and every request has been answered.
                if !inbound_open && active.is_empty() {
                    return;
                }
                tokio::select! {
                    // Draining: once its requests have ended, the call ends (new ones were
                    // refused with UNAVAILABLE), so the connection can close.
                    _ = drain_check.tick(), if active.is_empty() => {
                        if service.state.shutting_down.load(Ordering::Acquire) {
                            return;
                        }
                    }
                    msg = inbound.next(), if inbound_open => match msg {
                        Some(Ok(req)) => active.push(one_request(service.clone(), req)),
                        Some(Err(status)) => {
                            yield Err(status);
                            return;
                        }
                        None => inbound_open = false,
                    },
                    // `None`: the last request's responses ended; the loop goes round
                    // (a pattern here would leave this select waiting on the others).
                    resp = active.next(), if !active.is_empty() => {
                        if let Some(resp) = resp {
                            yield Ok(resp);
                        }
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(out)))
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let is_ready = ready(&self.state);
        let models = if request.get_ref().ready && !is_ready {
            Vec::new()
        } else {
            vec![ModelIndex {
                name: served(&self.state, "")?,
                version: "1".into(),
                state: if is_ready { "READY" } else { "UNAVAILABLE" }.into(),
                reason: String::new(),
            }]
        };
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        Err(Status::failed_precondition(format!(
            "cannot load `{}`: this server serves one model, loaded at start \
             (`sluice serve --model`); loading at run time is not available yet",
            request.get_ref().model_name
        )))
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        Err(Status::failed_precondition(format!(
            "cannot unload `{}`: this server serves one model, loaded at start; \
             unloading at run time is not available yet",
            request.get_ref().model_name
        )))
    }
}
