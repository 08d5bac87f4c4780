//! Workloads: the requests a run sends, generated before the clock starts.
//!
//! * `random`: like vLLM's random dataset — random token ids of the served model's tokenizer,
//!   decoded, re-encoded and trimmed or padded until the prompt re-encodes to exactly the
//!   drawn length, so the server sees the intended number of tokens.
//! * `prefix`: one shared random prefix of `prefix_len` tokens, then a random part per request;
//!   the whole prompt re-encodes to `prefix_len + input_len` tokens.
//! * `jsonl`: a user's file of `{"prompt": ..}` or `{"messages": [..]}` lines with optional
//!   `max_tokens`.
//!
//! Every request body is serialised here, once, so the hot path only copies bytes.

use std::io::BufRead;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

use super::{BenchError, Endpoint};

/// The few tokenizer calls the bench needs; implemented by the adapter in `bench::tokenizer`
/// for the real model and by a toy tokenizer in tests.
pub trait PromptTokenizer: Send + Sync {
    /// Ids of `text`, without added special tokens.
    fn encode(&self, text: &str) -> Result<Vec<u32>, BenchError>;
    /// Text of `ids`, skipping special tokens.
    fn decode(&self, ids: &[u32]) -> Result<String, BenchError>;
    fn vocab_size(&self) -> usize;
}

/// What a request asks the model.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    /// OpenAI chat messages, passed through unchanged.
    Messages(Vec<Value>),
}

/// One request of a workload.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRequest {
    pub prompt: Prompt,
    /// in tokens, when the workload knows it (random, prefix)
    pub input_len: Option<usize>,
    /// in tokens
    pub max_tokens: usize,
}

/// Lengths for the random and prefix workloads.
#[derive(Debug, Clone)]
pub struct RandomSpec {
    /// mean prompt length, in tokens (after any prefix)
    pub input_len: usize,
    /// mean output length, in tokens
    pub output_len: usize,
    /// lengths are drawn uniformly from [len·(1−r), len·(1+r)]
    pub range_ratio: f64,
    /// shared prefix, in tokens (0: none)
    pub prefix_len: usize,
    pub num_prompts: usize,
    pub seed: u64,
}

/// How many decode/re-encode rounds to try before accepting a near miss.
const MAX_FIT_ROUNDS: usize = 32;

/// Random (and, with `prefix_len > 0`, shared-prefix) requests.
pub fn random_requests(
    tok: &dyn PromptTokenizer,
    spec: &RandomSpec,
) -> Result<Vec<BenchRequest>, BenchError> {
    if !(0.0..1.0).contains(&spec.range_ratio) {
        return Err(BenchError::Args(format!(
            "--range-ratio must be in [0, 1), got {}",
            spec.range_ratio
        )));
    }
    if tok.vocab_size() == 0 {
        return Err(BenchError::Tokenizer("empty vocabulary".into()));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let prefix = if spec.prefix_len > 0 {
        fit_text(tok, "", spec.prefix_len, &mut rng)?.0
    } else {
        String::new()
    };
    let mut out = Vec::with_capacity(spec.num_prompts);
    for _ in 0..spec.num_prompts {
        let input_len = draw_len(spec.input_len, spec.range_ratio, &mut rng).max(1);
        let max_tokens = draw_len(spec.output_len, spec.range_ratio, &mut rng).max(1);
        let (text, n) = fit_text(tok, &prefix, spec.prefix_len + input_len, &mut rng)?;
        out.push(BenchRequest {
            prompt: Prompt::Text(text),
            input_len: Some(n),
            max_tokens,
        });
    }
    Ok(out)
}

fn draw_len(mean: usize, ratio: f64, rng: &mut ChaCha8Rng) -> usize {
    let lo = (mean as f64 * (1.0 - ratio)).floor() as usize;
    let hi = (mean as f64 * (1.0 + ratio)).ceil() as usize;
    if hi <= lo {
        mean
    } else {
        rng.random_range(lo..=hi)
    }
}

/// `prefix` followed by random tokens such that the whole re-encodes to `target` tokens
/// (returned with the length it really has; a near miss only after `MAX_FIT_ROUNDS`).
fn fit_text(
    tok: &dyn PromptTokenizer,
    prefix: &str,
    target: usize,
    rng: &mut ChaCha8Rng,
) -> Result<(String, usize), BenchError> {
    let vocab = tok.vocab_size() as u32;
    let prefix_len = if prefix.is_empty() {
        0
    } else {
        tok.encode(prefix)?.len()
    };
    let mut ids: Vec<u32> = (0..target.saturating_sub(prefix_len))
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let mut best = (String::new(), usize::MAX);
    for _ in 0..MAX_FIT_ROUNDS {
        let text = format!("{prefix}{}", tok.decode(&ids)?);
        let n = tok.encode(&text)?.len();
        if n == target {
            return Ok((text, n));
        }
        if n.abs_diff(target) < best.1.abs_diff(target) {
            best = (text.clone(), n);
        }
        if n > target {
            // Decoding can merge ids or expand invalid bytes; re-normalise, then trim.
            let mut suffix = tok.encode(&text[prefix.len()..])?;
            let excess = n - target;
            suffix.truncate(suffix.len().saturating_sub(excess.max(1)));
            ids = suffix;
        } else {
            ids.extend((0..target - n).map(|_| rng.random_range(0..vocab)));
        }
    }
    Ok(best)
}

/// Requests from a JSONL file: each line `{"prompt": str}` or `{"messages": [..]}`, with an
/// optional `"max_tokens"` (default `default_max_tokens`). Blank lines are skipped.
pub fn jsonl_requests(
    path: &Path,
    default_max_tokens: usize,
    limit: Option<usize>,
) -> Result<Vec<BenchRequest>, BenchError> {
    let file = std::fs::File::open(path).map_err(|e| BenchError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
        let bad = |message: String| BenchError::Dataset {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let line = line.map_err(|e| bad(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(parse_jsonl_line(&line, default_max_tokens).map_err(bad)?);
    }
    if out.is_empty() {
        return Err(BenchError::File {
            path: path.to_path_buf(),
            message: "no requests in dataset".into(),
        });
    }
    Ok(out)
}

fn parse_jsonl_line(line: &str, default_max_tokens: usize) -> Result<BenchRequest, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let prompt = match (v.get("prompt"), v.get("messages")) {
        (Some(Value::String(s)), None) => Prompt::Text(s.clone()),
        (None, Some(Value::Array(m))) => Prompt::Messages(m.clone()),
        _ => {
            return Err(
                "expected exactly one of \"prompt\" (a string) or \"messages\" (an array)".into(),
            )
        }
    };
    let max_tokens = match v.get("max_tokens") {
        None | Some(Value::Null) => default_max_tokens,
        Some(m) => m
            .as_u64()
            .filter(|&m| m > 0)
            .ok_or("\"max_tokens\" must be a positive integer")? as usize,
    };
    Ok(BenchRequest {
        prompt,
        input_len: None,
        max_tokens,
    })
}

/// What every request body carries besides its prompt.
#[derive(Debug, Clone)]
pub struct BodyOptions {
    pub model: String,
    pub endpoint: Endpoint,
    /// send `ignore_eos` and `min_tokens` so the output length is exactly `max_tokens`
    pub exact_output_len: bool,
    /// ask for a stream (with usage in its final chunk), else one whole response
    pub stream: bool,
    /// merged last, so it may override anything
    pub extra: Map<String, Value>,
}

/// A request ready to send: its serialised body and, when known, its prompt length.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedRequest {
    pub body: String,
    /// in tokens; used when the server reports no `usage`
    pub input_len: Option<usize>,
}

/// Serialises every request of a workload.
pub fn prepare(
    reqs: &[BenchRequest],
    opts: &BodyOptions,
) -> Result<Vec<PreparedRequest>, BenchError> {
    reqs.iter()
        .map(|r| {
            Ok(PreparedRequest {
                body: request_body(r, opts)?,
                input_len: r.input_len,
            })
        })
        .collect()
}

/// The JSON body of `req` for `opts.endpoint`; a stream has usage in its final chunk.
pub fn request_body(req: &BenchRequest, opts: &BodyOptions) -> Result<String, BenchError> {
    let mut body = Map::new();
    body.insert("model".into(), json!(opts.model));
    match (&req.prompt, opts.endpoint) {
        (Prompt::Text(t), Endpoint::Completions) => {
            body.insert("prompt".into(), json!(t));
        }
        (Prompt::Text(t), Endpoint::Chat) => {
            body.insert("messages".into(), json!([{"role": "user", "content": t}]));
        }
        (Prompt::Messages(m), Endpoint::Chat) => {
            body.insert("messages".into(), json!(m));
        }
        (Prompt::Messages(_), Endpoint::Completions) => {
            return Err(BenchError::Args(
                "dataset has chat \"messages\"; use --endpoint chat".into(),
            ))
        }
    }
    body.insert("max_tokens".into(), json!(req.max_tokens));
    if opts.exact_output_len {
        body.insert("ignore_eos".into(), json!(true));
        body.insert("min_tokens".into(), json!(req.max_tokens));
    }
    if opts.stream {
        body.insert("stream".into(), json!(true));
        body.insert("stream_options".into(), json!({"include_usage": true}));
    }
    for (k, v) in &opts.extra {
        body.insert(k.clone(), v.clone());
    }
    serde_json::to_string(&Value::Object(body)).map_err(|e| BenchError::Runtime(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per character of a 26-letter alphabet plus space: lengths are easy to check.
    struct Letters;
    impl PromptTokenizer for Letters {
        fn encode(&self, text: &str) -> Result<Vec<u32>, BenchError> {
            Ok(text
                .bytes()
                .filter_map(|b| match b {
                    b'a'..=b'z' => Some((b - b'a') as u32),
                    b' ' => Some(26),
                    _ => None,
                })
                .collect())
        }
        fn decode(&self, ids: &[u32]) -> Result<String, BenchError> {
            Ok(ids
                .iter()
                .map(|&i| {
                    if i < 26 {
                        (b'a' + i as u8) as char
                    } else {
                        ' '
                    }
                })
                .collect())
        }
        fn vocab_size(&self) -> usize {
            27
        }
    }

    fn spec(prefix_len: usize, range_ratio: f64) -> RandomSpec {
        RandomSpec {
            input_len: 40,
            output_len: 10,
            range_ratio,
            prefix_len,
            num_prompts: 20,
            seed: 7,
        }
    }

    #[test]
    fn random_prompts_have_exact_lengths() {
        let reqs = random_requests(&Letters, &spec(0, 0.0)).unwrap();
        assert_eq!(reqs.len(), 20);
        for r in &reqs {
            let Prompt::Text(t) = &r.prompt else { panic!() };
            assert_eq!(Letters.encode(t).unwrap().len(), 40);
            assert_eq!(r.input_len, Some(40));
            assert_eq!(r.max_tokens, 10);
        }
        assert_ne!(reqs[0].prompt, reqs[1].prompt);
    }

    #[test]
    fn range_ratio_spreads_lengths_within_bounds() {
        let reqs = random_requests(&Letters, &spec(0, 0.5)).unwrap();
        let lens: Vec<usize> = reqs.iter().map(|r| r.input_len.unwrap()).collect();
        assert!(lens.iter().all(|&n| (20..=60).contains(&n)), "{lens:?}");
        assert!(lens.iter().any(|&n| n != lens[0]));
    }

    #[test]
    fn prefix_workload_shares_its_prefix() {
        let reqs = random_requests(&Letters, &spec(30, 0.0)).unwrap();
        let texts: Vec<&str> = reqs
            .iter()
            .map(|r| match &r.prompt {
                Prompt::Text(t) => t.as_str(),
                Prompt::Messages(_) => panic!(),
            })
            .collect();
        for t in &texts {
            assert_eq!(&t[..30], &texts[0][..30]);
            assert_eq!(Letters.encode(t).unwrap().len(), 70);
        }
        assert_ne!(texts[0][30..], texts[1][30..]);
    }

    #[test]
    fn same_seed_same_workload() {
        let a = random_requests(&Letters, &spec(0, 0.3)).unwrap();
        let b = random_requests(&Letters, &spec(0, 0.3)).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn jsonl_lines_parse_and_reject_clearly() {
        let r = parse_jsonl_line(r#"{"prompt": "hi", "max_tokens": 5}"#, 9).unwrap();
        assert_eq!(r.prompt, Prompt::Text("hi".into()));
        assert_eq!(r.max_tokens, 5);
        let r = parse_jsonl_line(r#"{"messages": [{"role":"user","content":"x"}]}"#, 9).unwrap();
        assert!(matches!(r.prompt, Prompt::Messages(ref m) if m.len() == 1));
        assert_eq!(r.max_tokens, 9);
        assert!(parse_jsonl_line(r#"{"text": "hi"}"#, 9).is_err());
        assert!(parse_jsonl_line(r#"{"prompt": "hi", "max_tokens": -1}"#, 9).is_err());
        assert!(parse_jsonl_line("not json", 9).is_err());
    }

    #[test]
    fn body_asks_for_exact_length_and_usage() {
        let req = BenchRequest {
            prompt: Prompt::Text("hi".into()),
            input_len: Some(1),
            max_tokens: 7,
        };
        let mut extra = Map::new();
        extra.insert("temperature".into(), json!(0));
        let opts = BodyOptions {
            model: "m".into(),
            endpoint: Endpoint::Chat,
            exact_output_len: true,
            stream: true,
            extra,
        };
        let body: Value = serde_json::from_str(&request_body(&req, &opts).unwrap()).unwrap();
        assert_eq!(body["messages"][0]["content"], "hi");
        assert_eq!(body["max_tokens"], 7);
        assert_eq!(body["min_tokens"], 7);
        assert_eq!(body["ignore_eos"], true);
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["temperature"], 0);
    }
}
