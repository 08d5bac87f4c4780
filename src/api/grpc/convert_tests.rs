use super::*;
use crate::api::grpc::proto::InferTensorContents;
use crate::api::openai_types::{PromptSpec, StopSpec};

fn bytes_input(name: &str, texts: &[&str]) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: "BYTES".into(),
        shape: vec![texts.len() as i64],
        parameters: Default::default(),
        contents: Some(InferTensorContents {
            bytes_contents: texts.iter().map(|t| t.as_bytes().to_vec()).collect(),
            ..Default::default()
        }),
    }
}

fn raw_input(name: &str, datatype: &str, shape: Vec<i64>) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape,
        parameters: Default::default(),
        contents: None,
    }
}

fn request(inputs: Vec<InferInputTensor>) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "smollm2".into(),
        id: "r1".into(),
        inputs,
        ..Default::default()
    }
}

#[test]
fn parameters_and_tensors_become_the_completions_request() {
    let mut req = request(vec![
        bytes_input(TEXT_INPUT, &["Hello"]),
        bytes_input("stop_words", &["\n", "."]),
        raw_input("max_tokens", "INT32", vec![1]),
    ]);
    req.raw_input_contents = vec![
        raw_bytes(&["Hello".into()]),
        raw_bytes(&["\n".into(), ".".into()]),
        7i32.to_le_bytes().to_vec(),
    ];
    req.parameters.insert(
        "temperature".into(),
        param(ParameterChoice::DoubleParam(0.5)),
    );
    req.parameters
        .insert("random_seed".into(), param(ParameterChoice::Uint64Param(3)));
    req.parameters
        .insert("stream".into(), param(ParameterChoice::BoolParam(true)));
    let got = infer_input(req).unwrap();
    assert!(got.stream);
    assert_eq!(got.id, "r1");
    let c = &got.request.common;
    assert_eq!(c.max_tokens, Some(7));
    assert_eq!(c.temperature, Some(0.5));
    assert_eq!(c.seed, Some(3));
    assert_eq!(c.model.as_deref(), Some("smollm2"));
    assert!(
        !c.stream,
        "streaming is the gRPC front's, not the completions request's"
    );
    assert!(matches!(&c.stop, Some(StopSpec::Many(v)) if v == &["\n", "."]));
    assert!(matches!(&got.request.prompt, PromptSpec::Texts(t) if t == &["Hello"]));
}

#[test]
fn sampling_parameters_json_is_merged() {
    let mut req = request(vec![bytes_input(TEXT_INPUT, &["a", "b"])]);
    req.parameters.insert(
        "sampling_parameters".into(),
        param(ParameterChoice::StringParam(
            r#"{"top_k": 5, "structured_outputs": "{\"choice\": [\"x\"]}"}"#.into(),
        )),
    );
    let got = infer_input(req).unwrap();
    assert_eq!(got.request.common.top_k, Some(5));
    assert!(got.request.common.structured_outputs.unwrap()["choice"].is_array());
}

#[test]
fn what_cannot_be_served_is_refused_by_name() {
    let refuse = |req: ModelInferRequest, name: &str| {
        let e = infer_input(req).unwrap_err();
        assert!(e.to_string().contains(name), "{e}");
        assert!(matches!(e, ApiError::InvalidRequest { .. }), "{e}");
    };
    let mut req = request(vec![bytes_input(TEXT_INPUT, &["x"])]);
    req.parameters
        .insert("beam_width".into(), param(ParameterChoice::Int64Param(2)));
    refuse(req, "beam_width");
    refuse(request(vec![]), TEXT_INPUT);
    let mut req = request(vec![bytes_input(TEXT_INPUT, &["x"])]);
    req.parameters.insert(
        "max_tokens".into(),
        param(ParameterChoice::StringParam("many".into())),
    );
    refuse(req, "max_tokens");
    // A version pins it, as `name@version` (the registry says whether it serves).
    let mut req = request(vec![bytes_input(TEXT_INPUT, &["x"])]);
    req.model_version = "7".into();
    let pinned = infer_input(req).unwrap().request;
    assert_eq!(pinned.common.model.as_deref(), Some("smollm2@7"));
    // A shape that does not match the data.
    let mut t = bytes_input(TEXT_INPUT, &["x"]);
    t.shape = vec![3];
    refuse(request(vec![t]), "shape");
    // Raw BYTES whose length prefix runs past the data.
    let mut req = request(vec![raw_input(TEXT_INPUT, "BYTES", vec![1])]);
    req.raw_input_contents = vec![vec![200, 0, 0, 0, b'a']];
    refuse(req, "longer than the data");
    let mut req = request(vec![raw_input(TEXT_INPUT, "BYTES", vec![1])]);
    req.raw_input_contents = vec![vec![1, 0, 0, 0, 0xff]];
    refuse(req, "UTF-8");
    let mut req = request(vec![raw_input(TEXT_INPUT, "BYTES", vec![i64::MAX, 4])]);
    req.raw_input_contents = vec![raw_bytes(&["x".into()])];
    refuse(req, "shape");
    let mut req = request(vec![raw_input(TEXT_INPUT, "BYTES", vec![-1])]);
    req.raw_input_contents = vec![raw_bytes(&["x".into()])];
    refuse(req, "shape");
}

#[test]
fn raw_values_decode_each_type() {
    let v = raw_values("FP32", &1.5f32.to_le_bytes()).unwrap();
    assert_eq!(v, vec![Value::from(1.5)]);
    let v = raw_values("BOOL", &[1, 0]).unwrap();
    assert_eq!(v, vec![Value::Bool(true), Value::Bool(false)]);
    assert!(raw_values("INT64", &[1, 2, 3]).is_err());
    let texts = vec!["héllo".to_string(), String::new()];
    let v = raw_values("BYTES", &raw_bytes(&texts)).unwrap();
    assert_eq!(v, vec![Value::from("héllo"), Value::from("")]);
}
