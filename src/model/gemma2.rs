//! What Gemma 2 changes in the Llama block, read from its Hugging Face config as `transformers`'
//! `Gemma2ForCausalLM` applies it:
//! - the embeddings are multiplied by √hidden (rounded to the table's storage type);
//! - each sublayer's output is normalized before it joins the residual ("sandwich" norms:
//!   `post_attention_layernorm`, `post_feedforward_layernorm`), and the feed-forward input
//!   has its own norm (`pre_feedforward_layernorm`); every norm's gain is `1 + weight`;
//! - the gate's activation is GELU with the tanh approximation;
//! - queries are scaled by `query_pre_attn_scalar^-½`, not `head_dim^-½`;
//! - attention scores (before the mask) and the final logits are soft-capped:
//!   `cap · tanh(x / cap)`;
//! - even layers attend through the sliding window, odd ones to the whole context (unless
//!   `layer_types` says otherwise).

use super::ModelError;

/// Gemma 2's settings beyond the Llama block (`ModelConfig::gemma2`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemma2 {
    /// Queries are scaled by this to the power −½.
    pub query_pre_attn_scalar: f32,
    /// Attention scores become `cap · tanh(score / cap)` before the mask.
    pub attn_logit_softcap: Option<f32>,
    /// The logits become `cap · tanh(logit / cap)`.
    pub final_logit_softcap: Option<f32>,
}

/// The activation `transformers`' Gemma 2 applies (it reads `hidden_activation`, never
/// `hidden_act`).
const GELU_TANH: &str = "gelu_pytorch_tanh";

impl Gemma2 {
    /// Gemma 2's settings from its `config.json` (parsed), with `transformers`' defaults where
    /// a key is absent (a null cap is no cap); keys that change the math away from what
    /// sluice implements are refused.
    pub(super) fn from_hf(config: &serde_json::Value, source: &str) -> Result<Self, ModelError> {
        let refuse = |what: String| {
            Err(ModelError::Unsupported(format!(
                "{source}: {what} is not supported"
            )))
        };
        let act = config
            .get("hidden_activation")
            .unwrap_or(&serde_json::Value::Null);
        if !(act.is_null() || act.as_str() == Some(GELU_TANH)) {
            return refuse(format!(
                "hidden_activation {act} (supported: {GELU_TANH:?})"
            ));
        }
        if config.get("use_bidirectional_attention") == Some(&serde_json::Value::Bool(true)) {
            return refuse("use_bidirectional_attention true".into());
        }
        // A positive number, the default when the key is absent, none when it is null.
        let number = |key: &str, default: Option<f32>| match config.get(key) {
            None => Ok(default),
            Some(serde_json::Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x as f32)),
                _ => Err(ModelError::Invalid(format!(
                    "{source}: {key} {v} is not a positive number"
                ))),
            },
        };
        Ok(Self {
            query_pre_attn_scalar: number("query_pre_attn_scalar", Some(256.0))?.ok_or_else(
                || ModelError::Invalid(format!("{source}: query_pre_attn_scalar is null")),
            )?,
            attn_logit_softcap: number("attn_logit_softcapping", Some(50.0))?,
            final_logit_softcap: number("final_logit_softcapping", Some(30.0))?,
        })
    }
}

/// Gemma 2's layers alternate: even ones attend through the window (transformers'
/// `layer_types` default).
pub fn default_windowed_layers(num_layers: usize) -> Vec<bool> {
    (0..num_layers).map(|l| l % 2 == 0).collect()
}
