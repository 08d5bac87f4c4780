//! The batch JSONL formats: an input line (`custom_id`, `method`, `url`, `body`), and the
//! output record every input line gets, in the output file (a response) or the error file
//! (a request that failed, or a line that could not be read, with its line number). The
//! offline `sluice batch run` writes the same records (vLLM's `run-batch` format is OpenAI's).

use serde::Deserialize;
use serde_json::{json, Value};

/// The endpoints a line may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

impl Endpoint {
    pub const ALL: [Endpoint; 3] = [Endpoint::Chat, Endpoint::Completions, Endpoint::Embeddings];

    pub fn url(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }

    /// Every endpoint's url, for error messages.
    pub fn urls() -> String {
        let urls: Vec<&str> = Self::ALL.iter().map(|e| e.url()).collect();
        urls.join(", ")
    }

    pub fn from_url(url: &str) -> Option<Endpoint> {
        Self::ALL.into_iter().find(|e| e.url() == url)
    }
}

/// A line that can run.
#[derive(Debug, Clone)]
pub struct InputLine {
    pub custom_id: String,
    pub endpoint: Endpoint,
    pub body: Value,
}

/// Why a line cannot run; `custom_id` when it could be read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("line {line_no}: {message}")]
pub struct LineError {
    pub line_no: usize,
    pub custom_id: Option<String>,
    pub code: &'static str,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLine {
    custom_id: String,
    #[serde(default)]
    method: Option<String>,
    url: String,
    body: Value,
}

/// Reads line `line_no` (1-based). `batch_endpoint`, when the batch names one, is the only
/// url allowed.
/// Every non-blank line of an input file with its number: parsed, or why it cannot run (not
/// UTF-8, malformed, a `custom_id` an earlier line used). Shared by batches and
/// `sluice batch run`.
pub fn parse_file(
    bytes: &[u8],
    batch_endpoint: Option<Endpoint>,
) -> Vec<(usize, Result<InputLine, LineError>)> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&c| c == b'\n').enumerate() {
        let line_no = i + 1;
        let parsed = match std::str::from_utf8(raw) {
            Ok(t) if t.trim().is_empty() => continue,
            Ok(t) => parse_line(line_no, t, batch_endpoint),
            Err(e) => Err(LineError {
                line_no,
                custom_id: None,
                code: "invalid_json_line",
                message: format!("not UTF-8: {e}"),
            }),
        };
        let parsed = parsed.and_then(|l| {
            if seen.insert(l.custom_id.clone()) {
                Ok(l)
            } else {
                Err(LineError {
                    line_no,
                    custom_id: Some(l.custom_id.clone()),
                    code: "duplicate_custom_id",
                    message: format!("custom_id `{}` was used by an earlier line", l.custom_id),
                })
            }
        });
        out.push((line_no, parsed));
    }
    out
}

pub fn parse_line(
    line_no: usize,
    text: &str,
    batch_endpoint: Option<Endpoint>,
) -> Result<InputLine, LineError> {
    let fail = |custom_id: Option<String>, code, message: String| LineError {
        line_no,
        custom_id,
        code,
        message,
    };
    let value: Value = serde_json::from_str(text)
        .map_err(|e| fail(None, "invalid_json_line", format!("not valid JSON: {e}")))?;
    let custom_id = value
        .get("custom_id")
        .and_then(Value::as_str)
        .map(str::to_string);
    let raw: RawLine = serde_json::from_value(value).map_err(|e| {
        fail(
            custom_id.clone(),
            "invalid_request_line",
            format!("not a batch request line: {e}"),
        )
    })?;
    let id = Some(raw.custom_id.clone());
    if let Some(m) = raw.method.as_deref() {
        if !m.eq_ignore_ascii_case("POST") {
            return Err(fail(
                id,
                "invalid_method",
                format!("method must be POST, got `{m}`"),
            ));
        }
    }
    let endpoint = Endpoint::from_url(&raw.url).ok_or_else(|| {
        fail(
            id.clone(),
            "invalid_url",
            format!("unknown url `{}`: one of {}", raw.url, Endpoint::urls()),
        )
    })?;
    if batch_endpoint.is_some_and(|e| e != endpoint) {
        return Err(fail(
            id,
            "mismatched_url",
            format!("url `{}` differs from the batch's endpoint", raw.url),
        ));
    }
    if !raw.body.is_object() {
        return Err(fail(
            id,
            "invalid_body",
            "body must be a JSON object".into(),
        ));
    }
    Ok(InputLine {
        custom_id: raw.custom_id,
        endpoint,
        body: raw.body,
    })
}

fn request_id() -> String {
    format!("batch_req_{}", uuid::Uuid::new_v4().simple())
}

/// A line answered: `{"id", "custom_id", "response": {"status_code": 200, ...}, "error": null}`.
pub fn success_record(custom_id: &str, body: Value) -> Value {
    let rid = request_id();
    json!({
        "id": rid,
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": rid, "body": body},
        "error": null,
    })
}

/// A request that the endpoint refused or that failed: its status and OpenAI error body.
pub fn failure_record(custom_id: &str, status: u16, error_body: Value) -> Value {
    let rid = request_id();
    json!({
        "id": rid,
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": rid, "body": error_body},
        "error": null,
    })
}

/// A line that never ran: unreadable, or cut off by a cancel or the window's end.
pub fn line_error_record(
    custom_id: Option<&str>,
    line_no: usize,
    code: &str,
    message: &str,
) -> Value {
    json!({
        "id": request_id(),
        "custom_id": custom_id,
        "response": null,
        "error": {"code": code, "message": message, "line": line_no},
    })
}

impl LineError {
    pub fn record(&self) -> Value {
        line_error_record(
            self.custom_id.as_deref(),
            self.line_no,
            self.code,
            &self.to_string(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let ok =
            r#"{"custom_id":"a","method":"POST","url":"/v1/completions","body":{"prompt":"x"}}"#;
        let l = parse_line(1, ok, None).unwrap();
        assert_eq!(
            (l.custom_id.as_str(), l.endpoint),
            ("a", Endpoint::Completions)
        );
        let e = parse_line(2, "{not json", None).unwrap_err();
        assert_eq!(
            (e.line_no, e.code, e.custom_id),
            (2, "invalid_json_line", None)
        );
        let e = parse_line(
            3,
            r#"{"custom_id":"b","url":"/v1/moderations","body":{}}"#,
            None,
        )
        .unwrap_err();
        assert_eq!((e.code, e.custom_id.as_deref()), ("invalid_url", Some("b")));
        assert!(e.to_string().starts_with("line 3: unknown url"), "{e}");
        let e = parse_line(4, ok, Some(Endpoint::Chat)).unwrap_err();
        assert_eq!(e.code, "mismatched_url");
        let e = parse_line(
            5,
            r#"{"custom_id":"c","url":"/v1/completions","body":{},"x":1}"#,
            None,
        )
        .unwrap_err();
        assert_eq!(e.code, "invalid_request_line");
        let r = e.record();
        assert_eq!(r["error"]["line"], 5);
        assert_eq!(r["custom_id"], "c");
    }
}
