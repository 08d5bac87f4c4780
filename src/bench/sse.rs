//! Incremental SSE framing and OpenAI chunk parsing.
//!
//! `SseLines` keeps one growing buffer per stream and hands out each complete line as a slice
//! into it, so parsing a chunk costs no allocation beyond the buffer itself (and the few fields
//! serde must unescape). Only `data:` lines matter: OpenAI-compatible servers put one JSON
//! chunk on one line, then `data: [DONE]`; comments, `event:` and `id:` lines are skipped.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// Token counts from a chunk's `usage` (the final chunk, with `include_usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct Usage {
    /// absent from some servers' (and the mock's) usage
    #[serde(default)]
    pub prompt_tokens: Option<u64>,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// What the bench needs from one chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkInfo {
    /// the chunk carries generated text (non-empty `delta.content` or `text`)
    pub has_content: bool,
    pub usage: Option<Usage>,
    /// an in-band `{"error": ..}` chunk, with its message
    pub error: Option<String>,
}

/// One line of the stream, classified.
#[derive(Debug, PartialEq)]
pub enum SseEvent<'a> {
    /// the JSON after `data:`
    Data(&'a [u8]),
    /// `data: [DONE]`
    Done,
}

/// A chunk as it arrives, borrowing from the line; `info()` keeps what matters.
#[derive(Deserialize)]
pub struct RawChunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    /// completions
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    /// chat completions
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    /// a whole chat completion (not streamed): the same fields as a delta
    #[serde(default, borrow)]
    message: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    /// reasoning models stream their thinking here first; it is output all the same
    #[serde(default, borrow)]
    reasoning_content: Option<Cow<'a, str>>,
}

fn non_empty(s: &Option<Cow<'_, str>>) -> bool {
    s.as_deref().is_some_and(|s| !s.is_empty())
}

/// Parses one chunk object (the payload of a `data:` line or of a WebSocket `chunk` frame).
pub fn parse_chunk(json: &[u8]) -> Result<ChunkInfo, String> {
    let chunk: RawChunk<'_> = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    Ok(chunk.info())
}

impl RawChunk<'_> {
    pub fn info(self) -> ChunkInfo {
        let chunk = self;
        let has_content = chunk.choices.iter().any(|c| {
            non_empty(&c.text)
                || [&c.delta, &c.message].into_iter().any(|d| {
                    d.as_ref()
                        .is_some_and(|d| non_empty(&d.content) || non_empty(&d.reasoning_content))
                })
        });
        ChunkInfo {
            has_content,
            usage: chunk.usage,
            error: chunk.error.map(|e| error_message(&e)),
        }
    }
}

/// The message of an OpenAI-shaped error (`{"message": ..}`), else the whole value.
pub fn error_message(e: &serde_json::Value) -> String {
    match e.get("message").and_then(|m| m.as_str()) {
        Some(m) => m.to_string(),
        None => e.to_string(),
    }
}

/// Splits a byte stream into lines across arbitrary chunk boundaries.
#[derive(Debug, Default)]
pub struct SseLines {
    buf: Vec<u8>,
    /// start of the first unconsumed byte in `buf`
    pos: usize,
}

impl SseLines {
    pub fn push(&mut self, bytes: &[u8]) {
        // Compact only when what was consumed outweighs what is left, so a long stream does not
        // shift its buffer on every chunk.
        if self.pos > 0 && self.pos >= self.buf.len() - self.pos {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line's event, or `None` when no complete data line is buffered.
    pub fn next_event(&mut self) -> Option<SseEvent<'_>> {
        loop {
            let rest = &self.buf[self.pos..];
            let nl = rest.iter().position(|&b| b == b'\n')?;
            let start = self.pos;
            self.pos += nl + 1;
            let mut line = &self.buf[start..start + nl];
            if let [head @ .., b'\r'] = line {
                line = head;
            }
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let data = data.strip_prefix(b" ").unwrap_or(data);
            if data.trim_ascii() == b"[DONE]" {
                return Some(SseEvent::Done);
            }
            return Some(SseEvent::Data(data));
        }
    }

    /// Bytes received after the last newline (a truncated final line).
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_chunks_and_skip_non_data() {
        let mut s = SseLines::default();
        s.push(b": ping\n\nevent: x\ndata: {\"a\"");
        assert_eq!(s.next_event(), None);
        s.push(b":1}\r\n\ndata: [DONE]\n");
        assert_eq!(s.next_event(), Some(SseEvent::Data(b"{\"a\":1}")));
        assert_eq!(s.next_event(), Some(SseEvent::Done));
        assert_eq!(s.next_event(), None);
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn chunks_of_both_endpoints_and_usage_and_errors() {
        let c = parse_chunk(br#"{"choices":[{"index":0,"delta":{"content":"hi"}}]}"#).unwrap();
        assert!(c.has_content);
        let c =
            parse_chunk(br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#)
                .unwrap();
        assert!(!c.has_content);
        let c = parse_chunk(br#"{"choices":[{"index":0,"text":"a\nb"}]}"#).unwrap();
        assert!(c.has_content);
        let c = parse_chunk(
            br#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}"#,
        )
        .unwrap();
        assert_eq!(
            c.usage,
            Some(Usage {
                prompt_tokens: Some(5),
                completion_tokens: 3
            })
        );
        let c = parse_chunk(br#"{"error":{"message":"boom","type":"x"}}"#).unwrap();
        assert_eq!(c.error.as_deref(), Some("boom"));
        assert!(parse_chunk(b"{oops").is_err());
    }
}
