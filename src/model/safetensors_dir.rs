//! A Hugging Face model directory's `*.safetensors` files as a [`WeightSource`]: tensors by
//! their `transformers` names, memory-mapped, and the parts of fused projections (Phi-3's
//! `qkv_proj`, `gate_up_proj`) as row ranges of the fused tensor. They are served by their
//! GGUF names and in GGUF's conventions: Gemma 2's norm gains `1 + weight` are added up here,
//! as llama.cpp's converter does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::config::ModelConfig;
use super::weights::WeightSource;
use super::ModelError;
use crate::kernels::dtype::WeightDType;
use crate::kernels::host::{HostTensor, WeightBytes};

/// The Hugging Face name of a GGUF tensor name in a model of architecture `arch`.
fn hf_name(gguf: &str, arch: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let hf_tail = match (tail, arch) {
        // Gemma 2 norms the attention's output, then the feed-forward's input.
        ("ffn_norm.weight", "gemma2") => "pre_feedforward_layernorm.weight",
        ("post_attention_norm.weight", "gemma2") => "post_attention_layernorm.weight",
        ("post_ffw_norm.weight", "gemma2") => "post_feedforward_layernorm.weight",
        ("attn_norm.weight", _) => "input_layernorm.weight",
        ("ffn_norm.weight", _) => "post_attention_layernorm.weight",
        ("attn_q.weight", _) => "self_attn.q_proj.weight",
        ("attn_k.weight", _) => "self_attn.k_proj.weight",
        ("attn_v.weight", _) => "self_attn.v_proj.weight",
        ("attn_q.bias", _) => "self_attn.q_proj.bias",
        ("attn_k.bias", _) => "self_attn.k_proj.bias",
        ("attn_v.bias", _) => "self_attn.v_proj.bias",
        ("attn_output.weight", _) => "self_attn.o_proj.weight",
        ("ffn_gate.weight", _) => "mlp.gate_proj.weight",
        ("ffn_up.weight", _) => "mlp.up_proj.weight",
        ("ffn_down.weight", _) => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_tail}"))
}

/// Where a fused projection keeps the rows of each of its parts (Phi-3's `qkv_proj` and
/// `gate_up_proj`): (the fused tensor's name, first row, rows).
fn fused_part(gguf: &str, c: &ModelConfig) -> Option<(String, usize, usize)> {
    let (layer, tail) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let (q, kv, ff) = (
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    let (fused, start, rows) = match tail {
        "attn_q.weight" => ("self_attn.qkv_proj.weight", 0, q),
        "attn_k.weight" => ("self_attn.qkv_proj.weight", q, kv),
        "attn_v.weight" => ("self_attn.qkv_proj.weight", q + kv, kv),
        "ffn_gate.weight" => ("mlp.gate_up_proj.weight", 0, ff),
        "ffn_up.weight" => ("mlp.gate_up_proj.weight", ff, ff),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{fused}"), start, rows))
}

/// The `*.safetensors` files of a Hugging Face model directory, memory-mapped.
pub struct SafetensorsDir {
    dir: PathBuf,
    tensors: HashMap<String, HostTensor>,
    /// The model's shape, to find the parts of fused projections.
    config: ModelConfig,
}

impl SafetensorsDir {
    pub fn open(dir: &Path, config: &ModelConfig) -> Result<Self, ModelError> {
        let io = |e: std::io::Error| ModelError::Io(format!("{}: {e}", dir.display()));
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ModelError::Invalid(format!(
                "{}: no *.safetensors files",
                dir.display()
            )));
        }
        let mut tensors = HashMap::new();
        for path in files {
            let file = std::fs::File::open(&path).map_err(io)?;
            // SAFETY: read-only map of a model file nobody writes while we serve it.
            let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?);
            let st = safetensors::SafeTensors::deserialize(&map[..])
                .map_err(|e| ModelError::Invalid(format!("{}: {e}", path.display())))?;
            let base = map.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let dtype = match view.dtype() {
                    safetensors::Dtype::F32 => WeightDType::F32,
                    safetensors::Dtype::F16 => WeightDType::F16,
                    safetensors::Dtype::BF16 => WeightDType::BF16,
                    other => {
                        return Err(ModelError::Unsupported(format!(
                            "{}: tensor {name} has dtype {other:?} (supported: F32, F16, BF16)",
                            path.display()
                        )))
                    }
                };
                let shape = view.shape();
                let (rows, cols) = match shape {
                    [n] => (1, *n),
                    [r, c] => (*r, *c),
                    _ => {
                        return Err(ModelError::Unsupported(format!(
                            "{}: tensor {name} has shape {shape:?}",
                            path.display()
                        )))
                    }
                };
                let offset = view.data().as_ptr() as usize - base;
                tensors.insert(
                    name,
                    HostTensor {
                        dtype,
                        rows,
                        cols,
                        bytes: WeightBytes::Mapped {
                            map: map.clone(),
                            offset,
                            len: view.data().len(),
                        },
                    },
                );
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            tensors,
            config: config.clone(),
        })
    }
}

impl WeightSource for SafetensorsDir {
    fn get(&self, name: &str) -> Result<Option<HostTensor>, ModelError> {
        let arch = self.config.architecture.as_str();
        if let Some(t) = hf_name(name, arch).and_then(|n| self.tensors.get(&n)) {
            if arch == "gemma2" && name.ends_with("norm.weight") {
                let gains: Vec<f32> = t.to_f32().iter().map(|w| 1.0 + w).collect();
                return Ok(Some(HostTensor::from_f32(t.rows, t.cols, &gains)));
            }
            return Ok(Some(t.clone()));
        }
        let Some((fused, start, rows)) = fused_part(name, &self.config) else {
            return Ok(None);
        };
        let Some(t) = self.tensors.get(&fused) else {
            return Ok(None);
        };
        if start + rows > t.rows {
            return Err(ModelError::Invalid(format!(
                "{}: tensor {fused} has {} rows; the config puts {name} at rows {start}..{}",
                self.dir.display(),
                t.rows,
                start + rows
            )));
        }
        Ok(Some(t.slice_rows(start, rows)))
    }
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight", "llama").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("output.weight", "llama").as_deref(),
            Some("lm_head.weight")
        );
        assert_eq!(hf_name("blk.x", "llama"), None);
        assert_eq!(
            hf_name("blk.1.ffn_norm.weight", "llama").as_deref(),
            Some("model.layers.1.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_name("blk.1.ffn_norm.weight", "gemma2").as_deref(),
            Some("model.layers.1.pre_feedforward_layernorm.weight")
        );
        assert_eq!(
            hf_name("blk.1.post_attention_norm.weight", "gemma2").as_deref(),
            Some("model.layers.1.post_attention_layernorm.weight")
        );
        assert_eq!(hf_name("blk.1.post_ffw_norm.weight", "llama"), None);
    }
}
