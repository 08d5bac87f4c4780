//! The gRPC driver: each request is one `ModelStreamInfer` call (Triton's streaming
//! extension, as served by sluice's `api/grpc/`), the calls multiplexed as HTTP/2 streams over
//! a few connections. The completions body becomes `text_input` plus one parameter per
//! scalar field; `text_output` responses are the chunks, the `triton_final_response` one ends
//! the request with its usage.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use super::client::{ErrorKind, RequestError, RequestRecord, StreamTracker};
use super::sse::{ChunkInfo, Usage};
use super::BenchError;
use crate::api::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use crate::api::grpc::proto::infer_parameter::ParameterChoice;
use crate::api::grpc::proto::model_infer_request::InferInputTensor;
use crate::api::grpc::proto::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelStreamInferResponse,
};

pub struct GrpcDriver {
    channels: Vec<GrpcInferenceServiceClient<Channel>>,
    next: AtomicUsize,
    authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
    timeout: Duration,
}

impl GrpcDriver {
    /// Opens `num_connections` HTTP/2 connections to `root` (`http://host:port`).
    pub async fn connect(
        root: &str,
        api_key: Option<&str>,
        num_connections: usize,
        timeout: Duration,
    ) -> Result<Self, BenchError> {
        let connect_error = |message: String| BenchError::Connect {
            url: root.to_string(),
            message,
        };
        let endpoint = Endpoint::from_shared(root.to_string())
            .map_err(|e| connect_error(e.to_string()))?
            .tcp_nodelay(true);
        let mut channels = Vec::new();
        for _ in 0..num_connections.max(1) {
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| connect_error(format!("{e:?}")))?;
            channels
                .push(GrpcInferenceServiceClient::new(channel).max_decoding_message_size(64 << 20));
        }
        let authorization = api_key
            .map(|k| format!("Bearer {k}").parse())
            .transpose()
            .map_err(|_| connect_error("the API key is not a valid metadata value".into()))?;
        Ok(GrpcDriver {
            channels,
            next: AtomicUsize::new(0),
            authorization,
            timeout,
        })
    }

    pub fn num_connections(&self) -> usize {
        self.channels.len()
    }

    pub async fn send(&self, body: &str, origin: Instant) -> RequestRecord {
        let mut tracker = StreamTracker::start(origin);
        let result = super::client::within(
            self.timeout,
            "final response",
            self.stream(body, &mut tracker),
        )
        .await;
        tracker.finish(Instant::now(), result)
    }

    async fn stream(&self, body: &str, tracker: &mut StreamTracker) -> Result<(), RequestError> {
        let req = infer_request(body).map_err(|m| RequestError::new(ErrorKind::BadChunk, m))?;
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        let mut client = self.channels[i].clone();
        let mut call = tonic::Request::new(futures::stream::iter([req]));
        if let Some(auth) = &self.authorization {
            call.metadata_mut().insert("authorization", auth.clone());
        }
        let mut responses = client
            .model_stream_infer(call)
            .await
            .map_err(status_error)?
            .into_inner();
        while let Some(msg) = responses.next().await {
            let msg = msg.map_err(status_error)?;
            let at = Instant::now();
            let (info, last) = chunk_info(&msg);
            tracker.on_chunk(&info, at)?;
            if last {
                tracker.on_done();
                return Ok(());
            }
        }
        Err(RequestError::new(
            ErrorKind::Incomplete,
            "the call ended without a final response",
        ))
    }
}

fn status_error(s: tonic::Status) -> RequestError {
    let kind = match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
            ErrorKind::Connection
        }
        _ => ErrorKind::InBand,
    };
    RequestError::new(kind, format!("{:?}: {}", s.code(), s.message()))
}

/// What one response carries: text (non-empty `text_output`), usage, an error; and whether it
/// is the request's last.
fn chunk_info(msg: &ModelStreamInferResponse) -> (ChunkInfo, bool) {
    if !msg.error_message.is_empty() {
        let info = ChunkInfo {
            has_content: false,
            usage: None,
            error: Some(msg.error_message.clone()),
        };
        return (info, true);
    }
    let Some(resp) = &msg.infer_response else {
        let empty = ChunkInfo {
            has_content: false,
            usage: None,
            error: None,
        };
        return (empty, false);
    };
    let int = |name: &str| match resp
        .parameters
        .get(name)
        .and_then(|p| p.parameter_choice.as_ref())
    {
        Some(ParameterChoice::Int64Param(v)) => Some(*v as u64),
        _ => None,
    };
    let last = matches!(
        resp.parameters
            .get("triton_final_response")
            .and_then(|p| p.parameter_choice.as_ref()),
        Some(ParameterChoice::BoolParam(true))
    );
    // A BYTES element is its 4-byte length and the text: more than 4 bytes means text.
    let has_content = resp.raw_output_contents.iter().any(|raw| raw.len() > 4);
    let usage = last.then(|| Usage {
        prompt_tokens: int("prompt_tokens"),
        completion_tokens: int("completion_tokens").unwrap_or(0),
    });
    let info = ChunkInfo {
        has_content,
        usage,
        error: None,
    };
    (info, last)
}

/// A completions body as a streaming `ModelInferRequest`: `prompt` is `text_input`, `model`
/// the model name, every other scalar field a parameter of the same name.
pub fn infer_request(body: &str) -> Result<ModelInferRequest, String> {
    let Value::Object(fields) = serde_json::from_str(body).map_err(|e| e.to_string())? else {
        return Err("the request body is not a JSON object".into());
    };
    let mut req = ModelInferRequest::default();
    for (name, value) in fields {
        let choice = match (name.as_str(), value) {
            ("model", Value::String(m)) => {
                req.model_name = m;
                continue;
            }
            ("prompt", Value::String(p)) => {
                req.inputs.push(InferInputTensor {
                    name: "text_input".into(),
                    datatype: "BYTES".into(),
                    shape: vec![1],
                    parameters: Default::default(),
                    contents: Some(InferTensorContents {
                        bytes_contents: vec![p.into_bytes()],
                        ..Default::default()
                    }),
                });
                continue;
            }
            // The final response always carries usage.
            ("stream_options", _) => continue,
            (_, Value::Bool(b)) => ParameterChoice::BoolParam(b),
            (_, Value::String(s)) => ParameterChoice::StringParam(s),
            (_, Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => ParameterChoice::Int64Param(i),
                (None, Some(f)) => ParameterChoice::DoubleParam(f),
                _ => return Err(format!("`{name}`: {n} does not fit a parameter")),
            },
            (name, _) => {
                return Err(format!(
                    "`{name}` has no gRPC form here (--transport grpc takes --endpoint \
                     completions with a text prompt and scalar options)"
                ))
            }
        };
        req.parameters.insert(
            name,
            InferParameter {
                parameter_choice: Some(choice),
            },
        );
    }
    if req.inputs.is_empty() {
        return Err("--transport grpc needs a text `prompt` (--endpoint completions)".into());
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_bodies_become_stream_requests() {
        let body = r#"{"model": "m", "prompt": "hi", "max_tokens": 4, "temperature": 0.5,
                       "ignore_eos": true, "stream": true,
                       "stream_options": {"include_usage": true}}"#;
        let req = infer_request(body).unwrap();
        assert_eq!(req.model_name, "m");
        assert_eq!(req.inputs[0].name, "text_input");
        let p = |n: &str| req.parameters[n].parameter_choice.clone().unwrap();
        assert_eq!(p("max_tokens"), ParameterChoice::Int64Param(4));
        assert_eq!(p("temperature"), ParameterChoice::DoubleParam(0.5));
        assert_eq!(p("stream"), ParameterChoice::BoolParam(true));
        assert!(!req.parameters.contains_key("stream_options"));
        let chat = r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}]}"#;
        assert!(infer_request(chat).unwrap_err().contains("messages"));
    }
}
