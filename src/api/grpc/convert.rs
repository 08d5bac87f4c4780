//! Triton's LLM conventions to and from sluice's one request type: a `ModelInferRequest`
//! becomes the `CompletionRequest` that `/v1/completions` validates and submits (so there is
//! one pipeline), and text becomes `text_output` tensors.
//!
//! Inputs: `text_input` (BYTES, one element per prompt). Every sampling option may come as a
//! request parameter or as a one-element input tensor, named as in `/v1/completions`
//! (`ALLOWED`); `stop` and `stop_token_ids` tensors may hold several elements. Triton's
//! spellings `random_seed`, `stop_words` and the vLLM backend's `sampling_parameters` (a JSON
//! object) are understood too. Anything else is refused by name: a client is never silently
//! served something other than what it asked for.

use serde_json::{Map, Value};

use super::proto::infer_parameter::ParameterChoice;
use super::proto::model_infer_request::InferInputTensor;
use super::proto::model_infer_response::InferOutputTensor;
use super::proto::{InferParameter, ModelInferRequest, ModelInferResponse};
use crate::api::errors::ApiError;
use crate::api::openai_types::CompletionRequest;

/// The input tensor holding the prompts.
pub const TEXT_INPUT: &str = "text_input";
/// The output tensor holding the generated text.
pub const TEXT_OUTPUT: &str = "text_output";
/// The response parameter that marks the last response of a request (Triton's).
pub const FINAL_RESPONSE: &str = "triton_final_response";

/// Options taken as parameters or input tensors, with the `/v1/completions` field each sets.
const ALLOWED: &[(&str, &str)] = &[
    ("max_tokens", "max_tokens"),
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("min_p", "min_p"),
    ("seed", "seed"),
    ("random_seed", "seed"),
    ("stop", "stop"),
    ("stop_words", "stop"),
    ("stop_token_ids", "stop_token_ids"),
    ("presence_penalty", "presence_penalty"),
    ("frequency_penalty", "frequency_penalty"),
    ("repetition_penalty", "repetition_penalty"),
    ("min_tokens", "min_tokens"),
    ("ignore_eos", "ignore_eos"),
    ("n", "n"),
    ("priority", "priority"),
    ("include_stop_str_in_output", "include_stop_str_in_output"),
    ("skip_special_tokens", "skip_special_tokens"),
    ("add_special_tokens", "add_special_tokens"),
    ("logit_bias", "logit_bias"),
    ("response_format", "response_format"),
    ("structured_outputs", "structured_outputs"),
];

/// Options whose value is a JSON object, sent as a string.
const JSON_VALUED: &[&str] = &["logit_bias", "response_format", "structured_outputs"];

/// Most elements an input tensor may declare.
const MAX_ELEMENTS: i64 = 1 << 20;

/// Options that may hold several values.
const LISTS: &[&str] = &["stop", "stop_token_ids"];

/// A gRPC request, read: the completions request to submit, and what only gRPC has.
#[derive(Debug)]
pub struct InferInput {
    pub request: CompletionRequest,
    /// Stream the tokens (`stream`; over `ModelStreamInfer` only).
    pub stream: bool,
    /// The client's request id, echoed in every response.
    pub id: String,
}

/// Reads a request: the prompts, the options, their types.
pub fn infer_input(req: ModelInferRequest) -> Result<InferInput, ApiError> {
    let ModelInferRequest {
        model_name,
        model_version,
        id,
        parameters,
        inputs,
        outputs,
        raw_input_contents,
    } = req;
    if let Some(o) = outputs.iter().find(|o| o.name != TEXT_OUTPUT) {
        return Err(ApiError::invalid(
            "outputs",
            format!("unknown output `{}`: the output is `{TEXT_OUTPUT}`", o.name),
        ));
    }
    if !raw_input_contents.is_empty() && raw_input_contents.len() != inputs.len() {
        return Err(ApiError::invalid(
            "raw_input_contents",
            format!(
                "raw_input_contents has {} entries for {} inputs",
                raw_input_contents.len(),
                inputs.len()
            ),
        ));
    }
    let mut fields = Map::new();
    let mut prompts = None;
    let mut stream = false;
    let mut raw = raw_input_contents.into_iter();
    for input in inputs {
        let values = tensor_values(&input, raw.next())?;
        if input.name == TEXT_INPUT {
            prompts = Some(prompt_texts(values)?);
        } else {
            let is_list = field_of(&input.name).is_some_and(|f| LISTS.contains(&f));
            let value = match values.len() {
                _ if is_list => Some(Value::Array(values)),
                1 => values.into_iter().next(),
                n => {
                    return Err(ApiError::invalid(
                        input.name.clone(),
                        format!("input `{}` must hold one element, got {n}", input.name),
                    ))
                }
            };
            if let Some(v) = value {
                option(&mut fields, &mut stream, &input.name, v)?;
            }
        }
    }
    for (name, p) in parameters {
        let v = parameter_value(&name, p)?;
        option(&mut fields, &mut stream, &name, v)?;
    }
    let prompts = prompts.ok_or_else(|| {
        ApiError::invalid(
            TEXT_INPUT,
            format!("the `{TEXT_INPUT}` input (BYTES) is required"),
        )
    })?;
    fields.insert("prompt".into(), Value::Array(prompts));
    // A version pins it, as `name@version` does over HTTP (the registry's routing).
    let model_name = match (model_name.is_empty(), model_version.is_empty()) {
        (_, true) => model_name,
        (true, false) => format!("@{model_version}"),
        (false, false) => format!("{model_name}@{model_version}"),
    };
    if !model_name.is_empty() {
        fields.insert("model".into(), Value::String(model_name));
    }
    let request = crate::api::from_value(Value::Object(fields))?;
    Ok(InferInput {
        request,
        stream,
        id,
    })
}

/// Sets one option, by its gRPC name.
fn option(
    fields: &mut Map<String, Value>,
    stream: &mut bool,
    name: &str,
    value: Value,
) -> Result<(), ApiError> {
    match name {
        "stream" => {
            *stream = value
                .as_bool()
                .ok_or_else(|| ApiError::invalid("stream", "stream must be a boolean"))?;
        }
        // tritonclient's own option: a final response is always sent.
        "triton_enable_empty_final_response" => {}
        "exclude_input_in_output" => {
            if value != Value::Bool(true) {
                return Err(ApiError::invalid(
                    name,
                    "only exclude_input_in_output = true is served: the output never repeats \
                     the prompt",
                ));
            }
        }
        "sampling_parameters" => {
            let Value::Object(map) = json_object(name, value)? else {
                return Err(ApiError::invalid(
                    name,
                    "sampling_parameters must be a JSON object",
                ));
            };
            for (k, v) in map {
                option(fields, stream, &k, v)?;
            }
        }
        _ => {
            let Some(field) = field_of(name) else {
                return Err(ApiError::invalid(
                    name,
                    format!("`{name}` is not an input or parameter this server takes"),
                ));
            };
            let value = if JSON_VALUED.contains(&field) {
                json_object(name, value)?
            } else {
                value
            };
            fields.insert(field.to_string(), value);
        }
    }
    Ok(())
}

/// The `/v1/completions` field a gRPC option name sets.
fn field_of(name: &str) -> Option<&'static str> {
    ALLOWED.iter().find(|(n, _)| *n == name).map(|&(_, f)| f)
}

/// A JSON object option, which gRPC carries as a string.
fn json_object(name: &str, value: Value) -> Result<Value, ApiError> {
    match value {
        Value::String(s) => serde_json::from_str(&s)
            .map_err(|e| ApiError::invalid(name, format!("{name} is not valid JSON: {e}"))),
        v => Ok(v),
    }
}

fn parameter_value(name: &str, p: InferParameter) -> Result<Value, ApiError> {
    Ok(match p.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => Value::Bool(b),
        Some(ParameterChoice::Int64Param(i)) => Value::from(i),
        Some(ParameterChoice::Uint64Param(u)) => Value::from(u),
        Some(ParameterChoice::DoubleParam(d)) => Value::from(d),
        Some(ParameterChoice::StringParam(s)) => Value::String(s),
        None => {
            return Err(ApiError::invalid(
                name,
                format!("parameter `{name}` has no value"),
            ))
        }
    })
}

/// The prompts: each element of `text_input`, which must be UTF-8 text.
fn prompt_texts(values: Vec<Value>) -> Result<Vec<Value>, ApiError> {
    if values.is_empty() {
        return Err(ApiError::invalid(TEXT_INPUT, "text_input holds no prompt"));
    }
    if values.iter().any(|v| !v.is_string()) {
        return Err(ApiError::invalid(TEXT_INPUT, "text_input must be BYTES"));
    }
    Ok(values)
}

/// A tensor's elements as JSON values, from its typed contents or its raw bytes.
fn tensor_values(t: &InferInputTensor, raw: Option<Vec<u8>>) -> Result<Vec<Value>, ApiError> {
    let name = t.name.as_str();
    let count = t
        .shape
        .iter()
        .try_fold(1i64, |n, &d| if d < 0 { None } else { n.checked_mul(d) })
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| {
            ApiError::invalid(
                name,
                format!("input `{name}` has an invalid shape {:?}", t.shape),
            )
        })?;
    let bad = |m: String| ApiError::invalid(name, format!("input `{name}`: {m}"));
    let values = match raw {
        Some(raw) => raw_values(&t.datatype, &raw).map_err(bad)?,
        None => {
            let c = t.contents.clone().unwrap_or_default();
            match t.datatype.as_str() {
                "BOOL" => c.bool_contents.into_iter().map(Value::Bool).collect(),
                "INT8" | "INT16" | "INT32" => c.int_contents.into_iter().map(Value::from).collect(),
                "INT64" => c.int64_contents.into_iter().map(Value::from).collect(),
                "UINT8" | "UINT16" | "UINT32" => {
                    c.uint_contents.into_iter().map(Value::from).collect()
                }
                "UINT64" => c.uint64_contents.into_iter().map(Value::from).collect(),
                "FP32" => c
                    .fp32_contents
                    .into_iter()
                    .map(|f| Value::from(f as f64))
                    .collect(),
                "FP64" => c.fp64_contents.into_iter().map(Value::from).collect(),
                "BYTES" => c
                    .bytes_contents
                    .into_iter()
                    .map(utf8)
                    .collect::<Result<_, _>>()
                    .map_err(bad)?,
                other => return Err(bad(format!("unsupported datatype `{other}`"))),
            }
        }
    };
    if values.len() as i64 != count {
        return Err(bad(format!(
            "shape {:?} says {count} elements, the data holds {}",
            t.shape,
            values.len()
        )));
    }
    Ok(values)
}

fn utf8(b: Vec<u8>) -> Result<Value, String> {
    String::from_utf8(b)
        .map(Value::String)
        .map_err(|_| "BYTES elements must be UTF-8 text".to_string())
}

/// Elements of a raw tensor: little-endian fixed-size values, or BYTES elements each after
/// its 4-byte little-endian length.
fn raw_values(datatype: &str, raw: &[u8]) -> Result<Vec<Value>, String> {
    fn fixed<const N: usize>(
        raw: &[u8],
        f: impl Fn([u8; N]) -> Value,
    ) -> Result<Vec<Value>, String> {
        if !raw.len().is_multiple_of(N) {
            return Err(format!(
                "{} raw bytes are not a whole number of {N}-byte elements",
                raw.len()
            ));
        }
        Ok(raw
            .chunks_exact(N)
            .map(|c| f(c.try_into().unwrap_or([0; N])))
            .collect())
    }
    match datatype {
        "BOOL" => fixed::<1>(raw, |b| Value::Bool(b[0] != 0)),
        "INT8" => fixed::<1>(raw, |b| Value::from(i8::from_le_bytes(b))),
        "UINT8" => fixed::<1>(raw, |b| Value::from(u8::from_le_bytes(b))),
        "INT16" => fixed::<2>(raw, |b| Value::from(i16::from_le_bytes(b))),
        "UINT16" => fixed::<2>(raw, |b| Value::from(u16::from_le_bytes(b))),
        "INT32" => fixed::<4>(raw, |b| Value::from(i32::from_le_bytes(b))),
        "UINT32" => fixed::<4>(raw, |b| Value::from(u32::from_le_bytes(b))),
        "INT64" => fixed::<8>(raw, |b| Value::from(i64::from_le_bytes(b))),
        "UINT64" => fixed::<8>(raw, |b| Value::from(u64::from_le_bytes(b))),
        "FP32" => fixed::<4>(raw, |b| Value::from(f32::from_le_bytes(b) as f64)),
        "FP64" => fixed::<8>(raw, |b| Value::from(f64::from_le_bytes(b))),
        "BYTES" => {
            let mut out = Vec::new();
            let mut rest = raw;
            while !rest.is_empty() {
                let (len, tail) = rest
                    .split_first_chunk::<4>()
                    .ok_or("a BYTES element's length is cut short")?;
                let len = u32::from_le_bytes(*len) as usize;
                if tail.len() < len {
                    return Err("a BYTES element is longer than the data".into());
                }
                out.push(utf8(tail[..len].to_vec())?);
                rest = &tail[len..];
            }
            Ok(out)
        }
        other => Err(format!("unsupported datatype `{other}`")),
    }
}

/// Texts as one BYTES tensor's raw contents (Triton's own encoding).
fn raw_bytes(texts: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(texts.iter().map(|t| t.len() + 4).sum());
    for t in texts {
        out.extend_from_slice(&(t.len() as u32).to_le_bytes());
        out.extend_from_slice(t.as_bytes());
    }
    out
}

/// A response parameter.
pub fn param(choice: ParameterChoice) -> InferParameter {
    InferParameter {
        parameter_choice: Some(choice),
    }
}

/// A response holding `texts` as `text_output` (shape `[texts.len()]`), in raw form as
/// Triton sends it.
pub fn text_response(model: &str, version: &str, id: &str, texts: &[String]) -> ModelInferResponse {
    ModelInferResponse {
        model_name: model.to_string(),
        model_version: version.to_string(),
        id: id.to_string(),
        parameters: Default::default(),
        outputs: vec![InferOutputTensor {
            name: TEXT_OUTPUT.into(),
            datatype: "BYTES".into(),
            shape: vec![texts.len() as i64],
            parameters: Default::default(),
            contents: None,
        }],
        raw_output_contents: vec![raw_bytes(texts)],
    }
}

#[cfg(test)]
#[path = "convert_tests.rs"]
mod tests;
