//! What a model weighs: its shape, its weights' bytes and parameter count, read from a GGUF
//! file (the tensors' real sizes), a Hugging Face directory (the safetensors headers) or a
//! bare `config.json` (parameters counted from the shape, times a storage type's bytes).

use std::io::Read;
use std::path::Path;

use super::PlanError;
use crate::gguf::GgufFile;
use crate::kernels::dtype::KvCacheDtype;
use crate::model::config::ModelConfig;

/// The cache a plan sizes: sluice's default, K and V in 16 bits (f16 on the CPU, f16 or bf16
/// on a GPU), as `cli::engine_args` sizes `serve`'s blocks by default (the CPU's
/// `--kv-cache-dtype int8` is not planned yet).
pub const KV_DTYPE: KvCacheDtype = KvCacheDtype::F16;

/// A model's memory-relevant facts.
#[derive(Debug, Clone, PartialEq)]
pub struct Footprint {
    pub config: ModelConfig,
    /// `gguf`, `safetensors` or `config.json`
    pub source: &'static str,
    /// The weights' storage type as read or assumed (`Q4_1`, `BF16`, `mixed: Q4_1, Q8_0`, ...).
    pub weights_dtype: String,
    /// in bytes, as stored (quantization blocks and scales included)
    pub weights_bytes: u64,
    pub num_params: u64,
}

impl Footprint {
    /// Bytes of K and V of one token over all layers.
    pub fn kv_bytes_per_token(&self) -> u64 {
        self.config.kv_bytes_per_token(KV_DTYPE) as u64
    }

    /// Parameters that take part in a matmul per token: all but an untied input embedding,
    /// which is only looked up (a tied one is the LM head too).
    pub fn matmul_params(&self) -> u64 {
        let c = &self.config;
        let embed = (c.vocab_size * c.hidden_size) as u64;
        if c.tie_word_embeddings {
            self.num_params
        } else {
            self.num_params.saturating_sub(embed)
        }
    }

    /// Bytes a decode step streams from memory for the weights: the matmul share of them.
    pub fn streamed_weight_bytes(&self) -> u64 {
        if self.num_params == 0 {
            return self.weights_bytes;
        }
        (self.weights_bytes as f64 * self.matmul_params() as f64 / self.num_params as f64) as u64
    }

    /// Reads `path`: a GGUF file, a directory (config.json with or without safetensors), or a
    /// `config.json`. `dtype` names the storage type when only a config gives the shape (else
    /// its `torch_dtype`).
    pub fn read(path: &Path, dtype: Option<&str>) -> Result<Self, PlanError> {
        let file_err = |message: String| PlanError::File {
            path: path.to_path_buf(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| file_err(e.to_string()))?;
        if meta.is_dir() {
            let config_path = path.join("config.json");
            let config = ModelConfig::from_hf_config(&config_path)?;
            let shards = safetensors_files(path).map_err(|e| file_err(e.to_string()))?;
            if shards.is_empty() {
                return from_config(config, &config_path, dtype);
            }
            let mut sum = TensorSum::default();
            for shard in &shards {
                read_safetensors_header(shard, &mut sum)?;
            }
            return Ok(sum.into_footprint(config, "safetensors"));
        }
        if path.extension().is_some_and(|x| x == "json") {
            let config = ModelConfig::from_hf_config(path)?;
            return from_config(config, path, dtype);
        }
        let f = GgufFile::open(path).map_err(crate::model::ModelError::from)?;
        let config = ModelConfig::from_gguf(&f)?;
        let mut sum = TensorSum::default();
        for t in f.tensors.values() {
            sum.add(
                &t.dtype.to_string(),
                t.dims.iter().product::<usize>() as u64,
                t.len as u64,
            );
        }
        Ok(sum.into_footprint(config, "gguf"))
    }
}

/// Totals over a model's tensors, with the storage types seen.
#[derive(Default)]
struct TensorSum {
    bytes: u64,
    params: u64,
    /// (dtype, bytes), largest first once finished
    dtypes: Vec<(String, u64)>,
}

impl TensorSum {
    fn add(&mut self, dtype: &str, params: u64, bytes: u64) {
        self.bytes += bytes;
        self.params += params;
        match self.dtypes.iter_mut().find(|(d, _)| d == dtype) {
            Some((_, b)) => *b += bytes,
            None => self.dtypes.push((dtype.to_string(), bytes)),
        }
    }

    fn into_footprint(mut self, config: ModelConfig, source: &'static str) -> Footprint {
        self.dtypes.sort_by_key(|d| std::cmp::Reverse(d.1));
        let names: Vec<&str> = self.dtypes.iter().map(|(d, _)| d.as_str()).collect();
        let weights_dtype = match names.as_slice() {
            [one] => one.to_string(),
            many => format!("mixed: {}", many.join(", ")),
        };
        Footprint {
            config,
            source,
            weights_dtype,
            weights_bytes: self.bytes,
            num_params: self.params,
        }
    }
}

fn safetensors_files(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

/// A safetensors header is its first 8 bytes (little-endian length) and that much JSON; its
/// `data_offsets` give each tensor's bytes. Only the header is read, never the weights.
fn read_safetensors_header(path: &Path, sum: &mut TensorSum) -> Result<(), PlanError> {
    let err = |message: String| PlanError::File {
        path: path.to_path_buf(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let file_len = file.metadata().map_err(|e| err(e.to_string()))?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| err(format!("no safetensors header: {e}")))?;
    let len = u64::from_le_bytes(len);
    // The format caps headers at 100 MB; a larger length is a corrupt file, not an allocation.
    if len > 100_000_000 || len + 8 > file_len {
        return Err(err(format!("header length {len} exceeds the file")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| err(e.to_string()))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| err(format!("header: {e}")))?;
    for (name, t) in header.iter().filter(|(n, _)| *n != "__metadata__") {
        let dtype = t["dtype"].as_str().unwrap_or("?");
        let params = t["shape"]
            .as_array()
            .map(|s| s.iter().filter_map(|d| d.as_u64()).product::<u64>())
            .ok_or_else(|| err(format!("tensor {name}: no shape")))?;
        let bytes = match t["data_offsets"].as_array().map(|o| o.as_slice()) {
            Some([start, end]) => end
                .as_u64()
                .zip(start.as_u64())
                .and_then(|(e, s)| e.checked_sub(s)),
            _ => None,
        }
        .ok_or_else(|| err(format!("tensor {name}: bad data_offsets")))?;
        sum.add(dtype, params, bytes);
    }
    Ok(())
}

/// A shape without weights: parameters counted from the config, bytes from the storage type.
fn from_config(
    config: ModelConfig,
    config_path: &Path,
    dtype: Option<&str>,
) -> Result<Footprint, PlanError> {
    let torch_dtype = match dtype {
        Some(_) => None,
        None => read_torch_dtype(config_path),
    };
    let name = dtype
        .or(torch_dtype.as_deref())
        .ok_or_else(|| PlanError::File {
            path: config_path.to_path_buf(),
            message: "no weights to measure and no torch_dtype: pass --weights-dtype".into(),
        })?;
    let (canonical, per_param) = bytes_per_param(name).ok_or_else(|| {
        PlanError::Workload(format!(
            "--weights-dtype {name:?} is not known (known: {})",
            KNOWN_DTYPES.join(", ")
        ))
    })?;
    let num_params = count_params(&config);
    Ok(Footprint {
        config,
        source: "config.json",
        weights_dtype: canonical.to_string(),
        weights_bytes: (num_params as f64 * per_param).ceil() as u64,
        num_params,
    })
}

fn read_torch_dtype(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("torch_dtype")?.as_str().map(str::to_string)
}

const KNOWN_DTYPES: &[&str] = &[
    "f32", "f16", "bf16", "fp8", "int8", "int4", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl",
    "q4_k", "q6_k",
];

/// A storage type's short name and bytes per parameter, quantization scales included.
pub fn bytes_per_param(name: &str) -> Option<(&'static str, f64)> {
    Some(match name.to_ascii_lowercase().as_str() {
        "f32" | "float32" => ("F32", 4.0),
        "f16" | "float16" => ("F16", 2.0),
        "bf16" | "bfloat16" => ("BF16", 2.0),
        "fp8" | "float8" | "float8_e4m3fn" => ("FP8", 1.0),
        "int8" => ("INT8", 1.0),
        "int4" => ("INT4", 0.5),
        "q8_0" => ("Q8_0", 34.0 / 32.0),
        "q4_0" => ("Q4_0", 18.0 / 32.0),
        "q4_1" => ("Q4_1", 20.0 / 32.0),
        "q5_0" => ("Q5_0", 22.0 / 32.0),
        "q5_1" => ("Q5_1", 24.0 / 32.0),
        "iq4_nl" => ("IQ4_NL", 18.0 / 32.0),
        "q3_k" => ("Q3_K", 110.0 / 256.0),
        "q4_k" => ("Q4_K", 144.0 / 256.0),
        "q5_k" => ("Q5_K", 176.0 / 256.0),
        "q6_k" => ("Q6_K", 210.0 / 256.0),
        _ => return None,
    })
}

/// Parameters of a Llama-family decoder of this shape (what sluice loads: embeddings, the
/// attention and MLP projections with their biases, the norms, and an untied LM head).
pub fn count_params(c: &ModelConfig) -> u64 {
    let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
    let q = (c.num_heads * c.head_dim) as u64;
    let kv = (c.num_kv_heads * c.head_dim) as u64;
    let attn = h * q + 2 * h * kv + q * h + if c.attention_bias { q + 2 * kv } else { 0 };
    let mlp = 3 * h * i;
    let layer = attn + mlp + 2 * h;
    let embed = c.vocab_size as u64 * h;
    let head = if c.tie_word_embeddings { 0 } else { embed };
    embed + c.num_layers as u64 * layer + h + head
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmp() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("sluice-plan-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const SMOLLM2: &str = r#"{"model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": true,
        "torch_dtype": "bfloat16"}"#;

    #[test]
    fn a_bare_config_counts_parameters_and_takes_torch_dtype() {
        let d = tmp();
        let f = Footprint::read(&write(&d, "config.json", SMOLLM2), None).unwrap();
        // SmolLM2-135M: 134,515,008 parameters (the model card's 135M).
        assert_eq!(f.num_params, 134_515_008);
        assert_eq!(f.weights_bytes, 2 * 134_515_008);
        assert_eq!(
            (f.source, f.weights_dtype.as_str()),
            ("config.json", "BF16")
        );
        // 30 layers × 3 KV heads × 64 dims × (K and V) × 2 bytes.
        assert_eq!(f.kv_bytes_per_token(), 23_040);
        let q4 = Footprint::read(&d.join("config.json"), Some("q4_0")).unwrap();
        assert_eq!(
            q4.weights_bytes,
            (134_515_008f64 * 18.0 / 32.0).ceil() as u64
        );
        assert!(Footprint::read(&d.join("config.json"), Some("q3")).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_directory_sums_its_safetensors_headers() {
        let d = tmp();
        write(&d, "config.json", SMOLLM2);
        let header = br#"{"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"b":{"dtype":"F32","shape":[4],"data_offsets":[12,28]},"__metadata__":{"format":"pt"}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0u8; 28]);
        std::fs::write(d.join("model.safetensors"), &bytes).unwrap();
        let f = Footprint::read(&d, None).unwrap();
        assert_eq!((f.weights_bytes, f.num_params), (28, 10));
        assert_eq!(f.source, "safetensors");
        assert_eq!(f.weights_dtype, "mixed: F32, BF16");
        // A header longer than its file is refused, not allocated.
        let mut bad = (u64::MAX / 2).to_le_bytes().to_vec();
        bad.extend_from_slice(b"{}");
        std::fs::write(d.join("model.safetensors"), &bad).unwrap();
        assert!(Footprint::read(&d, None).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
