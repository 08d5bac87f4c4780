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
use crate::registry::{Activation, VersionState};

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
        let prepared = completions::prepare(&self.state, request).await?;
        Ok(Submitted {
            stream,
            id,
            model: prepared.served().name.clone(),
            version: prepared.served().version.clone(),
            prepared,
        })
    }
}

/// A request in the engine.
struct Submitted {
    stream: bool,
    id: String,
    model: String,
    version: String,
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
        let Submitted { stream, model, version, prepared, .. } = match service.submit(req, true).await {
            Ok(p) => p,
            Err(e) => {
                yield stream_error(&id, e);
                return;
            }
        };
        // The lease keeps the version loaded for the stream's life.
        let (mut events, num_choices, _lease) = prepared.into_events();
        let mut texts = vec![String::new(); num_choices];
        let mut reasons = vec![""; num_choices];
        while let Some(ev) = events.next().await {
            match ev {
                StreamEvent::Token { index, text, .. } => {
                    if index >= num_choices || text.is_empty() {
                        continue;
                    }
                    if stream {
                        let mut resp = convert::text_response(&model, &version, &id, &[text]);
                        if num_choices > 1 {
                            resp.parameters.insert("index".into(), param(ParameterChoice::Int64Param(index as i64)));
                        }
                        resp.parameters.insert(FINAL_RESPONSE.into(), param(ParameterChoice::BoolParam(false)));
                        yield stream_ok(resp);
                    } else {
                        texts[index].push_str(&text);
                    }
                }
                StreamEvent::Embedding { .. } => {}
                StreamEvent::SeqFinished { index, reason, .. } => {
                    if let Some(r) = reasons.get_mut(index) {
                        *r = reason.as_str();
                    }
                }
                StreamEvent::Done { usage, .. } => {
                    // Streaming: the final response carries no text, only the summary.
                    let texts = if stream { vec![String::new(); num_choices] } else { std::mem::take(&mut texts) };
                    let mut resp = convert::text_response(&model, &version, &id, &texts);
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
            live: self.state.models.is_alive(),
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
        let r = request.get_ref();
        let wanted = if r.version.is_empty() {
            None
        } else {
            Some(r.version.as_str())
        };
        let model_ready = served(&self.state, &r.name).is_ok_and(|m| match wanted {
            None => m.state == VersionState::Ready,
            Some(v) => m
                .versions
                .iter()
                .any(|s| s.version == v && s.state == VersionState::Ready),
        });
        Ok(Response::new(ModelReadyResponse {
            ready: model_ready && ready(&self.state),
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
        let r = request.get_ref();
        let model = served(&self.state, &r.name)?;
        // A `version` asks about that one: it must be loaded.
        let versions: Vec<String> = model
            .versions
            .iter()
            .filter(|v| v.state == VersionState::Ready)
            .filter(|v| r.version.is_empty() || v.version == r.version)
            .map(|v| v.version.clone())
            .collect();
        if versions.is_empty() && !r.version.is_empty() {
            return Err(Status::not_found(format!(
                "`{}` has no loaded version `{}`",
                model.name, r.version
            )));
        }
        Ok(Response::new(ModelMetadataResponse {
            versions,
            name: model.name,
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
            version,
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
        let mut resp = convert::text_response(&model, &version, &id, &texts);
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
        let only_ready = request.get_ref().ready;
        let mut models = Vec::new();
        for m in self.state.models.status() {
            for v in &m.versions {
                let state = match v.state {
                    VersionState::Ready => "READY",
                    VersionState::Loading => "LOADING",
                    VersionState::Draining => "UNLOADING",
                    VersionState::Unloaded | VersionState::Failed => "UNAVAILABLE",
                };
                if only_ready && state != "READY" {
                    continue;
                }
                models.push(ModelIndex {
                    name: m.name.clone(),
                    version: v.version.clone(),
                    state: state.into(),
                    reason: v.reason.clone().unwrap_or_default(),
                });
            }
        }
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    /// Loads a model's live version (admin key). Triton's load also reloads a loaded model;
    /// here a loaded model stays as it is: versions are loaded through the admin API.
    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        let r = request.get_ref();
        refuse_repository_options(&r.repository_name, &r.parameters)?;
        let name = &r.model_name;
        let live = served(&self.state, name)?.live_version;
        self.state
            .models
            .load_version(name, &live, None, Activation::Keep)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    /// Unloads every version of a model (admin key); running requests finish first.
    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        let r = request.get_ref();
        refuse_repository_options(&r.repository_name, &r.parameters)?;
        self.state
            .models
            .unload_model(&r.model_name)
            .map_err(ApiError::from)?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }
}

/// Triton's repository options that sluice does not honour (a named repository, a config or
/// files sent with the load) are refused by name rather than ignored.
fn refuse_repository_options<V>(
    repository: &str,
    parameters: &std::collections::HashMap<String, V>,
) -> Result<(), Status> {
    if !repository.is_empty() {
        return Err(Status::invalid_argument(format!(
            "repository_name `{repository}`: sluice has one repository, its registry; send it empty"
        )));
    }
    // `unload_dependents` (tritonclient always sends it) has nothing to act on: a sluice
    // model has no dependents (no ensembles), so either value is honoured.
    if let Some(k) = parameters.keys().find(|k| *k != "unload_dependents") {
        return Err(Status::invalid_argument(format!(
            "parameters: `{k}` is not supported (versions and their sources are the admin API's, \
             docs/models.md)"
        )));
    }
    Ok(())
}
