//! Model configuration: the shape of a Llama-family decoder and the few ways its members
//! differ (tied embeddings, QKV bias, RoPE base and scaling, RoPE pairing, sliding windows,
//! Gemma 2's block), read from GGUF metadata or a Hugging Face `config.json`.

use std::path::Path;

use serde::Deserialize;

use super::gemma2::Gemma2;
use super::sliding_window::SlidingWindow;
use super::ModelError;
use crate::gguf::GgufFile;

/// Which dimensions RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: llama.cpp's "normal" mode; GGUF Llama files store Q/K permuted for it.
    Interleaved,
    /// Pairs `(i, i + d/2)`: Hugging Face's `rotate_half` (and GGUF Qwen2, "neox" mode).
    Halves,
}

/// Llama 3's frequency-dependent RoPE scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `llama`, `mistral`, `qwen2`, ...
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// The context length the model was trained for, in tokens.
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub tie_word_embeddings: bool,
    /// Q, K and V projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// The layers that attend through a sliding window, if any.
    pub sliding_window: Option<SlidingWindow>,
    /// Gemma 2's changes to the block, for that architecture.
    pub gemma2: Option<Gemma2>,
}

/// Architectures read from a Hugging Face directory, and from GGUF files. llama.cpp's Phi-3
/// files fuse Q, K, V (and gate, up) under its own names, and its Gemma 2 files choose the
/// query scale by model size; only their safetensors layouts are read.
const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2", "phi3", "gemma2"];
const SUPPORTED_GGUF: &[&str] = &["llama", "mistral", "qwen2"];

fn unsupported(arch: &str, source: &str, supported: &[&str]) -> ModelError {
    ModelError::Unsupported(format!(
        "{source}: architecture {arch:?} is not supported (supported: {})",
        supported.join(", ")
    ))
}

impl ModelConfig {
    pub fn from_gguf(f: &GgufFile) -> Result<Self, ModelError> {
        let arch = f.get_str("general.architecture")?.to_string();
        if !SUPPORTED_GGUF.contains(&arch.as_str()) {
            let source = f.path.display().to_string();
            return Err(unsupported(&arch, &source, SUPPORTED_GGUF));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let usize_key = |k: &str| f.get_u64(&key(k)).map(|v| v as usize);
        let hidden_size = usize_key("embedding_length")?;
        let num_heads = usize_key("attention.head_count")?;
        let num_kv_heads = usize_key("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = usize_key("attention.key_length")
            .or_else(|_| usize_key("rope.dimension_count"))
            .unwrap_or(hidden_size / num_heads.max(1));
        // Keys that change the math away from what sluice implements.
        let source = f.path.display().to_string();
        if let Ok(ty) = f.get_str(&key("rope.scaling.type")) {
            if ty != "none" {
                return Err(ModelError::Unsupported(format!(
                    "{source}: {arch}.rope.scaling.type {ty:?} is not supported"
                )));
            }
        }
        if let Ok(n) = usize_key("expert_count") {
            if n > 0 {
                return Err(ModelError::Unsupported(format!(
                    "{source}: a mixture of {n} experts is not supported"
                )));
            }
        }
        let vocab_size = match usize_key("vocab_size") {
            Ok(v) => v,
            Err(_) => f.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        let num_layers = usize_key("block_count")?;
        let max_position_embeddings = usize_key("context_length").unwrap_or(4096);
        let cfg = Self {
            hidden_size,
            intermediate_size: usize_key("feed_forward_length")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            max_position_embeddings,
            rms_norm_eps: f
                .get_f64(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5) as f32,
            rope_theta: f.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0) as f32,
            // llama.cpp's converter permutes Llama/Mistral Q and K for pairwise rotation;
            // Qwen2 keeps Hugging Face's layout ("neox" mode).
            rope_style: if arch == "qwen2" {
                RopeStyle::Halves
            } else {
                RopeStyle::Interleaved
            },
            // GGUF carries Llama 3 scaling as a `rope_freqs.weight` tensor, read by the loader.
            rope_scaling: None,
            tie_word_embeddings: !f.has_tensor("output.weight"),
            attention_bias: f.has_tensor("blk.0.attn_q.bias"),
            sliding_window: usize_key("attention.sliding_window")
                .ok()
                .and_then(|w| SlidingWindow::every_layer(w, num_layers, max_position_embeddings)),
            gemma2: None,
            architecture: arch,
        };
        cfg.validate(&source)?;
        Ok(cfg)
    }

    pub fn from_hf_config(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ModelError::Io(format!("{}: {e}", path.display())))?;
        let invalid =
            |e: serde_json::Error| ModelError::Invalid(format!("{}: {e}", path.display()));
        let json: serde_json::Value = serde_json::from_str(&text).map_err(invalid)?;
        let raw = HfConfig::deserialize(&json).map_err(invalid)?;
        let source = path.display().to_string();
        let arch = raw
            .model_type
            .clone()
            .unwrap_or_else(|| "llama".to_string());
        if !SUPPORTED.contains(&arch.as_str()) {
            return Err(unsupported(&arch, &source, SUPPORTED));
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        refuse_unimplemented(&raw, &arch, &source)?;
        let gemma2 = (arch == "gemma2")
            .then(|| Gemma2::from_hf(&json, &source))
            .transpose()?;
        let (rope_theta, rope_scaling) = hf_rope(&raw, &source)?;
        let max_position_embeddings = raw.max_position_embeddings.unwrap_or(4096);
        let sliding_window = SlidingWindow::from_hf(
            &arch,
            raw.applied_sliding_window(&arch),
            raw.layer_types.as_deref(),
            raw.max_window_layers,
            raw.num_hidden_layers,
            max_position_embeddings,
            &source,
        )?;
        let cfg = Self {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            vocab_size: raw.vocab_size,
            max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-5),
            rope_theta,
            rope_style: RopeStyle::Halves,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(arch == "qwen2"),
            sliding_window,
            gemma2,
            architecture: arch,
        };
        cfg.validate(&source)?;
        Ok(cfg)
    }

    fn validate(&self, source: &str) -> Result<(), ModelError> {
        let bad = |what: String| Err(ModelError::Invalid(format!("{source}: {what}")));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.head_dim == 0 {
            return bad("zero heads or head dimension".into());
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} query heads do not divide into {} KV heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dimension {} is odd", self.head_dim));
        }
        if self.hidden_size == 0 || self.num_layers == 0 || self.vocab_size == 0 {
            return bad("zero hidden size, layers or vocabulary".into());
        }
        if self.hidden_size > 1 << 16 || self.num_layers > 1024 || self.vocab_size > 1 << 24 {
            return bad("implausibly large dimensions".into());
        }
        Ok(())
    }

    /// RoPE inverse frequencies, one per rotated pair, with Llama 3 scaling applied when
    /// configured. `freq_factors` (GGUF `rope_freqs.weight`) divide them when present.
    pub fn rope_inv_freqs(&self, freq_factors: Option<&[f32]>) -> Vec<f32> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let mut f = 1.0 / self.rope_theta.powf(2.0 * i as f32 / self.head_dim as f32);
                if let Some(s) = &self.rope_scaling {
                    f = llama3_scale(f, s);
                }
                if let Some(ff) = freq_factors.and_then(|ff| ff.get(i)) {
                    f /= ff;
                }
                f
            })
            .collect()
    }

    /// Bytes of K and V for one token across all layers, stored as `dtype`.
    pub fn kv_bytes_per_token(&self, dtype: crate::kernels::dtype::KvCacheDtype) -> usize {
        2 * self.num_layers * self.num_kv_heads * dtype.head_bytes(self.head_dim)
    }
}

fn llama3_scale(freq: f32, s: &Llama3RopeScaling) -> f32 {
    let old = s.original_max_position_embeddings as f32;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    let wavelen = 2.0 * std::f32::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    rope_scaling: Option<serde_json::Value>,
    /// `transformers` 5 moved `rope_theta` and the scaling settings here.
    rope_parameters: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    // Keys that change the math; refused unless at the value sluice implements.
    hidden_act: Option<String>,
    mlp_bias: Option<bool>,
    partial_rotary_factor: Option<f32>,
    sliding_window: Option<serde_json::Value>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    num_local_experts: Option<usize>,
    num_experts: Option<usize>,
}

impl HfConfig {
    /// The sliding window attention uses, if any: `sliding_window` (null when off), unless
    /// `use_sliding_window` is false, as it is by default for Qwen2 (which names a window it
    /// does not use).
    fn applied_sliding_window(&self, arch: &str) -> Option<usize> {
        if !self.use_sliding_window.unwrap_or(arch != "qwen2") {
            return None;
        }
        self.sliding_window
            .as_ref()
            .and_then(serde_json::Value::as_u64)
            .map(|w| w as usize)
    }
}

/// Refuses the config keys that change the math away from what sluice implements, naming
/// each: a model that loads must compute what `transformers` computes.
fn refuse_unimplemented(raw: &HfConfig, arch: &str, source: &str) -> Result<(), ModelError> {
    let refuse = |what: String| {
        Err(ModelError::Unsupported(format!(
            "{source}: {what} is not supported"
        )))
    };
    // (Gemma 2 reads `hidden_activation` instead: `Gemma2::from_hf`.)
    let act = raw.hidden_act.as_deref().filter(|_| arch != "gemma2");
    if let Some(act) = act.filter(|a| *a != "silu") {
        return refuse(format!("hidden_act {act:?} (supported: \"silu\")"));
    }
    if raw.mlp_bias == Some(true) {
        return refuse("mlp_bias true".into());
    }
    if let Some(f) = raw.partial_rotary_factor.filter(|f| *f != 1.0) {
        return refuse(format!("partial_rotary_factor {f}"));
    }
    if let Some(n) = raw.num_local_experts.or(raw.num_experts).filter(|n| *n > 0) {
        return refuse(format!("a mixture of {n} experts"));
    }
    Ok(())
}

/// RoPE's base and scaling from either layout: `rope_theta` and `rope_scaling` at the top
/// level (`transformers` 4), or `rope_parameters` (`transformers` 5). Both present and
/// different is an error, as is any RoPE type but the default and Llama 3's.
fn hf_rope(raw: &HfConfig, source: &str) -> Result<(f32, Option<Llama3RopeScaling>), ModelError> {
    let params = raw
        .rope_parameters
        .as_ref()
        .filter(|v| !v.is_null())
        .map(|v| match v {
            serde_json::Value::Object(m) => Ok(m),
            _ => Err(ModelError::Invalid(format!(
                "{source}: rope_parameters is not an object"
            ))),
        })
        .transpose()?;
    let nested_theta = match params.and_then(|m| m.get("rope_theta")) {
        None => None,
        Some(t) => Some(t.as_f64().ok_or_else(|| {
            ModelError::Invalid(format!(
                "{source}: rope_parameters.rope_theta is not a number"
            ))
        })? as f32),
    };
    let theta = match (raw.rope_theta, nested_theta) {
        (Some(a), Some(b)) if a != b => {
            return Err(ModelError::Invalid(format!(
                "{source}: rope_theta {a} and rope_parameters.rope_theta {b} disagree"
            )))
        }
        (a, b) => a.or(b).unwrap_or(10_000.0),
    };
    let scaling = [raw.rope_scaling.as_ref(), raw.rope_parameters.as_ref()];
    let mut llama3 = None;
    for (key, v) in ["rope_scaling", "rope_parameters"].into_iter().zip(scaling) {
        let Some(v) = v.filter(|v| !v.is_null()) else {
            continue;
        };
        let ty = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        match ty {
            "llama3" => {
                let s: Llama3RopeScaling = serde_json::from_value(v.clone())
                    .map_err(|e| ModelError::Invalid(format!("{source}: {key}: {e}")))?;
                if llama3.is_some_and(|l| l != s) {
                    return Err(ModelError::Invalid(format!(
                        "{source}: rope_scaling and rope_parameters disagree"
                    )));
                }
                llama3 = Some(s);
            }
            "default" => {}
            other => {
                return Err(ModelError::Unsupported(format!(
                    "{source}: {key} type {other:?} is not supported (supported: default, llama3)"
                )))
            }
        }
    }
    Ok((theta, llama3))
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
