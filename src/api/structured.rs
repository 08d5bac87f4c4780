//! Structured outputs: OpenAI's `response_format` and vLLM's `structured_outputs` read into a
//! `ConstraintSpec` (with the field to blame), and compiled on the blocking pool under a time
//! limit. Whatever does not parse or compile is a 400 naming the field and the problem,
//! before anything is queued: never a 200 with free text.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::errors::ApiError;
use super::openai_types::CommonParams;
use crate::sampling::{Constraint, ConstraintCompiler, ConstraintSpec};

/// What a request constrains its output to, and the field it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestedConstraint {
    pub spec: ConstraintSpec,
    pub param: &'static str,
}

/// vLLM's `StructuredOutputsParams` fields that choose the constraint (exactly one).
const CHOOSERS: [&str; 6] = [
    "json",
    "regex",
    "choice",
    "grammar",
    "json_object",
    "structural_tag",
];

/// The constraint `response_format` or `structured_outputs` asks for; both at once is a 400.
pub fn requested(c: &CommonParams) -> Result<Option<RequestedConstraint>, ApiError> {
    let from_format = c
        .response_format
        .as_ref()
        .map(response_format)
        .transpose()?;
    let from_outputs = c
        .structured_outputs
        .as_ref()
        .map(structured_outputs)
        .transpose()?;
    match (from_format.flatten(), from_outputs) {
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "structured_outputs",
            "structured_outputs and response_format cannot both constrain the output",
        )),
        (a, b) => Ok(a.or(b)),
    }
}

fn object<'a>(param: &str, v: &'a Value) -> Result<&'a Map<String, Value>, ApiError> {
    v.as_object()
        .ok_or_else(|| ApiError::invalid(param, format!("{param} must be an object")))
}

/// A JSON schema: an object or a boolean, or (vLLM accepts it) a string holding one.
fn schema(param: &'static str, v: &Value) -> Result<ConstraintSpec, ApiError> {
    let parsed;
    let v = match v {
        Value::String(s) => {
            parsed = serde_json::from_str::<Value>(s)
                .map_err(|e| ApiError::invalid(param, format!("{param} is not valid JSON: {e}")))?;
            &parsed
        }
        v => v,
    };
    match v {
        Value::Object(_) | Value::Bool(_) => Ok(ConstraintSpec::JsonSchema(v.clone())),
        _ => Err(ApiError::invalid(
            param,
            format!("{param} must be a JSON schema (an object)"),
        )),
    }
}

/// `response_format`: `text` (no constraint), `json_object`, or `json_schema` with
/// `{name, schema, strict, description}` (`strict` accepted: the schema is always enforced).
fn response_format(v: &Value) -> Result<Option<RequestedConstraint>, ApiError> {
    let obj = object("response_format", v)?;
    let kind = obj.get("type").and_then(Value::as_str);
    let spec = match kind {
        Some("text") => return Ok(None),
        Some("json_object") => ConstraintSpec::JsonObject,
        Some("json_schema") => {
            let Some(js) = obj.get("json_schema") else {
                return Err(ApiError::invalid(
                    "response_format.json_schema",
                    "response_format.json_schema is required when type is json_schema",
                ));
            };
            let js = object("response_format.json_schema", js)?;
            match js.get("schema") {
                Some(s) => schema("response_format.json_schema.schema", s)?,
                // OpenAI's SDKs always send one; without it any JSON value would do.
                None => ConstraintSpec::JsonSchema(Value::Bool(true)),
            }
        }
        other => {
            return Err(ApiError::invalid(
                "response_format.type",
                format!(
                    "response_format.type must be text, json_object or json_schema, got {}",
                    other.map_or("nothing".to_string(), |t| format!("`{t}`"))
                ),
            ))
        }
    };
    Ok(Some(RequestedConstraint {
        spec,
        param: "response_format",
    }))
}

/// `structured_outputs`: exactly one of `json`, `regex`, `choice`, `grammar`, `json_object`.
/// vLLM's other options are refused by name, except `disable_any_whitespace: true`, which is
/// what sluice always does (JSON is written compactly).
fn structured_outputs(v: &Value) -> Result<RequestedConstraint, ApiError> {
    const PARAM: &str = "structured_outputs";
    let obj = object(PARAM, v)?;
    let honoured = |k: &str, v: &Value| {
        CHOOSERS.contains(&k) || (k == "disable_any_whitespace" && *v == Value::Bool(true))
    };
    if let Some((k, _)) = obj.iter().find(|(k, v)| !honoured(k, v)) {
        let field = format!("{PARAM}.{k}");
        let message = format!("{field} is not supported by this server (with this value)");
        return Err(ApiError::invalid(field, message));
    }
    let set: Vec<&str> = CHOOSERS
        .into_iter()
        .filter(|k| {
            obj.get(*k)
                .is_some_and(|v| !v.is_null() && *v != Value::Bool(false))
        })
        .collect();
    let [key] = set.as_slice() else {
        return Err(ApiError::invalid(
            PARAM,
            format!(
                "structured_outputs must set exactly one of json, regex, choice, grammar, \
                 json_object; got {}",
                if set.is_empty() {
                    "none".to_string()
                } else {
                    set.join(", ")
                }
            ),
        ));
    };
    let value = &obj[*key];
    let string = |param: &'static str| {
        value
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| ApiError::invalid(param, format!("{param} must be a string")))
    };
    let spec = match *key {
        "json" => schema("structured_outputs.json", value)?,
        "regex" => ConstraintSpec::Regex(string("structured_outputs.regex")?),
        "grammar" => ConstraintSpec::Grammar(string("structured_outputs.grammar")?),
        "json_object" => ConstraintSpec::JsonObject,
        "choice" => {
            let choices = value.as_array().and_then(|a| {
                a.iter()
                    .map(|c| c.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
            });
            match choices {
                Some(c) if !c.is_empty() => ConstraintSpec::Choice(c),
                _ => {
                    return Err(ApiError::invalid(
                        "structured_outputs.choice",
                        "structured_outputs.choice must be a non-empty list of strings",
                    ))
                }
            }
        }
        _ => {
            return Err(ApiError::invalid(
                "structured_outputs.structural_tag",
                "structured_outputs.structural_tag is not supported",
            ))
        }
    };
    Ok(RequestedConstraint {
        spec,
        param: match *key {
            "json" => "structured_outputs.json",
            "regex" => "structured_outputs.regex",
            "choice" => "structured_outputs.choice",
            "grammar" => "structured_outputs.grammar",
            _ => PARAM,
        },
    })
}

/// Compiles the requested constraint on the blocking pool, refusing it after
/// `COMPILE_TIMEOUT` (the blocking task then ends under llguidance's own limits).
pub async fn compile(
    compiler: &Arc<ConstraintCompiler>,
    requested: Option<&RequestedConstraint>,
) -> Result<Option<Constraint>, ApiError> {
    let Some(r) = requested else {
        return Ok(None);
    };
    let (compiler, spec, param) = (compiler.clone(), r.spec.clone(), r.param);
    let task = tokio::task::spawn_blocking(move || compiler.compile(&spec));
    let limit = crate::sampling::constraint::COMPILE_TIMEOUT;
    match tokio::time::timeout(limit, task).await {
        Ok(Ok(Ok(c))) => Ok(Some(c)),
        Ok(Ok(Err(e))) => Err(ApiError::invalid(param, format!("{param}: {e}"))),
        Ok(Err(e)) => Err(ApiError::Internal(format!("compiling {param} failed: {e}"))),
        Err(_) => Err(ApiError::invalid(
            param,
            format!(
                "{param}: compiling took longer than {} s; simplify the schema or grammar",
                limit.as_secs()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: Value) -> CommonParams {
        serde_json::from_value(v).expect("common params")
    }

    fn param_of(e: ApiError) -> Option<String> {
        match e {
            ApiError::InvalidRequest { param, .. } => param,
            _ => None,
        }
    }

    #[test]
    fn formats_and_structured_outputs_become_specs() {
        let r = |v| requested(&params(v)).expect("valid");
        assert_eq!(r(json!({"response_format": {"type": "text"}})), None);
        let schema = json!({"type": "object"});
        let got = r(json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": schema, "strict": true}}}));
        assert_eq!(
            got.map(|g| g.spec),
            Some(ConstraintSpec::JsonSchema(schema))
        );
        let got = r(json!({"structured_outputs": {"choice": ["a", "b"]}}));
        assert_eq!(
            got.map(|g| g.spec),
            Some(ConstraintSpec::Choice(vec!["a".into(), "b".into()]))
        );
        let got = r(json!({"structured_outputs": {"regex": "[0-9]+", "json_object": false}}));
        assert_eq!(
            got.map(|g| g.spec),
            Some(ConstraintSpec::Regex("[0-9]+".into()))
        );
    }

    #[test]
    fn conflicting_or_malformed_requests_name_the_field() {
        let fails = |v: Value, want: &str| {
            let e = requested(&params(v.clone())).expect_err("refused");
            assert_eq!(param_of(e).as_deref(), Some(want), "{v}");
        };
        fails(
            json!({"response_format": {"type": "json_object"},
                   "structured_outputs": {"regex": "a"}}),
            "structured_outputs",
        );
        fails(
            json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}),
            "structured_outputs",
        );
        fails(json!({"structured_outputs": {}}), "structured_outputs");
        // Options sluice does not honour are refused by name, never ignored.
        fails(
            json!({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}),
            "structured_outputs.whitespace_pattern",
        );
        fails(
            json!({"structured_outputs": {"regex": "a", "disable_any_whitespace": false}}),
            "structured_outputs.disable_any_whitespace",
        );
        let compact = json!({"structured_outputs": {"regex": "a", "disable_any_whitespace": true}});
        assert!(requested(&params(compact)).is_ok());
        fails(
            json!({"structured_outputs": {"choice": []}}),
            "structured_outputs.choice",
        );
        fails(
            json!({"response_format": {"type": "yaml"}}),
            "response_format.type",
        );
        fails(
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}),
            "response_format.json_schema.schema",
        );
    }
}
