//! `--speculative-config`, a JSON object in the spirit of vLLM's.

use serde::Deserialize;

/// How drafts are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpeculativeMethod {
    /// Prompt lookup: the tokens that followed the latest earlier occurrence of the
    /// sequence's last n-gram, in its own prompt and output.
    Ngram,
    /// Prompt lookup, and the same lookup in recent finished requests' prompts and outputs
    /// (`suffix.rs`); the longer match wins.
    Suffix,
    /// A smaller model sharing the target's tokenizer (`model`) drafts greedily
    /// (`engine/draft_model.rs`).
    DraftModel,
}

/// `--speculative-config '{"method": "ngram", "num_speculative_tokens": 4, ...}'`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeculativeConfig {
    pub method: SpeculativeMethod,
    /// `draft_model`: the draft's GGUF file or Hugging Face directory (vLLM's key).
    #[serde(default)]
    pub model: Option<std::path::PathBuf>,
    /// Most draft tokens verified per sequence and step.
    #[serde(default = "default_num_speculative_tokens")]
    pub num_speculative_tokens: usize,
    /// Shortest n-gram that may match (vLLM's name).
    #[serde(default = "default_prompt_lookup_min")]
    pub prompt_lookup_min: usize,
    /// Longest n-gram tried; the longest match wins, the latest among equals.
    #[serde(default = "default_prompt_lookup_max")]
    pub prompt_lookup_max: usize,
    /// No drafts in a step while this many sequences or more are decoding (vLLM's name; 0:
    /// no such limit). Without it the measured step cost decides: past the batch size
    /// where a step turns compute-bound, no draft pays for its rows.
    #[serde(default = "default_disable_by_batch_size")]
    pub disable_by_batch_size: usize,
    /// Always draft up to `num_speculative_tokens` (vLLM's behaviour) instead of the length
    /// the measured step cost favours: reproducible drafts whatever the machine's timing.
    #[serde(default)]
    pub fixed_draft_length: bool,
    /// A sequence whose draft tokens are accepted at a lower rate than this (recent
    /// verifications, decayed) pauses drafting, for twice as many tokens each time it fails
    /// again.
    #[serde(default = "default_min_acceptance")]
    pub min_acceptance: f64,
    /// `suffix`: finished requests kept in the index (their first 8,192 tokens each).
    #[serde(default = "default_suffix_max_cached_requests")]
    pub suffix_max_cached_requests: usize,
}

fn default_num_speculative_tokens() -> usize {
    4
}
fn default_prompt_lookup_min() -> usize {
    2
}
fn default_prompt_lookup_max() -> usize {
    4
}
fn default_disable_by_batch_size() -> usize {
    0
}
fn default_suffix_max_cached_requests() -> usize {
    256
}
fn default_min_acceptance() -> f64 {
    0.35
}

#[derive(Debug, thiserror::Error)]
pub enum SpeculativeConfigError {
    #[error("--speculative-config: {0}")]
    Json(#[from] serde_json::Error),
    #[error("--speculative-config: {0}")]
    Invalid(String),
}

impl SpeculativeConfig {
    /// Parses and checks the flag's JSON. Unknown keys and methods are errors naming them.
    pub fn parse(json: &str) -> Result<Self, SpeculativeConfigError> {
        let config: Self = serde_json::from_str(json)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), SpeculativeConfigError> {
        let invalid = |m: &str| Err(SpeculativeConfigError::Invalid(m.into()));
        if !(1..=16).contains(&self.num_speculative_tokens) {
            return invalid("num_speculative_tokens must be in 1..=16");
        }
        if self.prompt_lookup_min == 0 || self.prompt_lookup_min > self.prompt_lookup_max {
            return invalid("need 1 <= prompt_lookup_min <= prompt_lookup_max");
        }
        if self.prompt_lookup_max > 32 {
            return invalid("prompt_lookup_max must be at most 32");
        }
        if !(0.0..=1.0).contains(&self.min_acceptance) {
            return invalid("min_acceptance must be in [0, 1]");
        }
        // `draft_model` without `model` may get it from `--speculative-model`; the engine
        // refuses it if not.
        if self.method != SpeculativeMethod::DraftModel && self.model.is_some() {
            return invalid("\"model\" is for method draft_model");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors_name_what_is_wrong() {
        let c = SpeculativeConfig::parse(r#"{"method":"ngram"}"#).unwrap();
        assert_eq!(c.num_speculative_tokens, 4);
        assert_eq!((c.prompt_lookup_min, c.prompt_lookup_max), (2, 4));
        let e = SpeculativeConfig::parse(r#"{"method":"ngram","model":"x.gguf"}"#).unwrap_err();
        assert!(e.to_string().contains("draft_model"), "{e}");
        let e = SpeculativeConfig::parse(r#"{"method":"eagle"}"#).unwrap_err();
        assert!(e.to_string().contains("eagle"), "{e}");
        let c = SpeculativeConfig::parse(r#"{"method":"draft_model","model":"d.gguf"}"#).unwrap();
        assert_eq!(c.model.as_deref(), Some(std::path::Path::new("d.gguf")));
        let e = SpeculativeConfig::parse(r#"{"method":"ngram","draft_tensor_parallel_size":1}"#)
            .unwrap_err();
        assert!(e.to_string().contains("draft_tensor_parallel_size"), "{e}");
        let e = SpeculativeConfig::parse(r#"{"method":"ngram","num_speculative_tokens":0}"#)
            .unwrap_err();
        assert!(e.to_string().contains("num_speculative_tokens"), "{e}");
    }
}
