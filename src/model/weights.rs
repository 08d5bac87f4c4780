//! Where a model's weights come from: a GGUF file, a Hugging Face safetensors directory, or
//! random (`dummy`) values at a configured shape. Each source hands out `HostTensor`s by
//! GGUF tensor name (`blk.3.attn_q.weight`), checked against the shape the config expects;
//! the model uploads them to its backend.
//!
//! (The safetensors directory is `safetensors_dir.rs`.)
//!
//! Tensor-parallel ranks read ranges: `require_rows` (output features: a contiguous byte range
//! of the file, shared, never copied) and `require_cols` (input features: the same column
//! window of every row, copied into a buffer the size of the shard). A column range must start
//! and end on a quantization block (32 values for Q4_0/Q4_1/Q8_0, 256 for K-quants); a rank
//! never materialises the whole tensor.

use std::ops::Range;
use std::sync::Arc;

use half::{bf16, f16};
use rand::{Rng, SeedableRng};

use super::config::ModelConfig;
use super::ModelError;
use crate::gguf::GgufFile;
use crate::kernels::dtype::WeightDType;
use crate::kernels::host::{HostTensor, WeightBytes};

pub trait WeightSource: Send + Sync {
    /// The tensor named `name` (GGUF naming), or `None` when the file does not have it.
    fn get(&self, name: &str) -> Result<Option<HostTensor>, ModelError>;
    /// Where the weights come from, for error messages.
    fn describe(&self) -> String;

    /// The tensor, which must exist and be `[rows, cols]`.
    fn require(&self, name: &str, rows: usize, cols: usize) -> Result<HostTensor, ModelError> {
        let t = self.get(name)?.ok_or_else(|| {
            ModelError::Invalid(format!("{}: missing tensor {name}", self.describe()))
        })?;
        if (t.rows, t.cols) != (rows, cols) {
            return Err(ModelError::Invalid(format!(
                "{}: tensor {name} is [{}, {}], the config says [{rows}, {cols}]",
                self.describe(),
                t.rows,
                t.cols
            )));
        }
        Ok(t)
    }

    /// Rows `range` of the `[rows, cols]` tensor `name`.
    fn require_rows(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        range: Range<usize>,
    ) -> Result<HostTensor, ModelError> {
        let t = self.require(name, rows, cols)?;
        check_range(name, "rows", &range, rows)?;
        Ok(t.slice_rows(range.start, range.len()))
    }

    /// Columns `range` of the `[rows, cols]` tensor `name`, on quantization-block boundaries.
    fn require_cols(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        range: Range<usize>,
    ) -> Result<HostTensor, ModelError> {
        let t = self.require(name, rows, cols)?;
        slice_cols(name, &t, range)
    }

    /// The storage type of `name`, if present (to check block boundaries before splitting).
    fn dtype_of(&self, name: &str) -> Result<Option<WeightDType>, ModelError> {
        Ok(self.get(name)?.map(|t| t.dtype))
    }
}

fn check_range(name: &str, what: &str, range: &Range<usize>, n: usize) -> Result<(), ModelError> {
    if range.start > range.end || range.end > n {
        return Err(ModelError::Invalid(format!(
            "tensor {name}: {what} {range:?} out of 0..{n}"
        )));
    }
    Ok(())
}

/// Columns `range` of every row of `t`, copied (only the shard's bytes).
pub fn slice_cols(
    name: &str,
    t: &HostTensor,
    range: Range<usize>,
) -> Result<HostTensor, ModelError> {
    check_range(name, "columns", &range, t.cols)?;
    if range == (0..t.cols) {
        return Ok(t.clone());
    }
    let block = t.dtype.block_len();
    if !range.start.is_multiple_of(block) || !range.end.is_multiple_of(block) {
        return Err(ModelError::Unsupported(format!(
            "tensor {name} is {} (blocks of {block} values): a tensor-parallel split at columns \
             {range:?} would cut a block; choose a size whose shards hold whole blocks",
            t.dtype
        )));
    }
    let per_block = t.dtype.block_bytes();
    let (b0, b1) = (
        range.start / block * per_block,
        range.end / block * per_block,
    );
    let mut bytes = Vec::with_capacity(t.rows * (b1 - b0));
    for r in 0..t.rows {
        bytes.extend_from_slice(&t.row(r)[b0..b1]);
    }
    Ok(HostTensor {
        dtype: t.dtype,
        rows: t.rows,
        cols: range.len(),
        bytes: WeightBytes::Owned(Arc::new(bytes)),
    })
}

impl WeightSource for GgufFile {
    fn get(&self, name: &str) -> Result<Option<HostTensor>, ModelError> {
        if !self.has_tensor(name) {
            return Ok(None);
        }
        Ok(Some(self.tensor(name)?))
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Random weights at the configured shape, reproducible from a seed: benchmarking a model's
/// real shape without its weights (vLLM's `--load-format dummy`).
pub struct DummyWeights {
    config: ModelConfig,
    dtype: WeightDType,
    seed: u64,
}

impl DummyWeights {
    pub fn new(config: ModelConfig, dtype: WeightDType, seed: u64) -> Result<Self, ModelError> {
        if !matches!(
            dtype,
            WeightDType::F32 | WeightDType::F16 | WeightDType::BF16
        ) {
            return Err(ModelError::Unsupported(format!(
                "dummy weights come in f32, f16 or bf16, not {dtype}"
            )));
        }
        Ok(Self {
            config,
            dtype,
            seed,
        })
    }

    fn shape(&self, name: &str) -> Option<(usize, usize)> {
        let c = &self.config;
        let (h, kv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        Some(match name {
            "token_embd.weight" => (c.vocab_size, c.hidden_size),
            "output.weight" if !c.tie_word_embeddings => (c.vocab_size, c.hidden_size),
            "output_norm.weight" => (1, c.hidden_size),
            _ => {
                let tail = name.strip_prefix("blk.")?.split_once('.')?.1;
                match tail {
                    "attn_norm.weight" | "ffn_norm.weight" => (1, c.hidden_size),
                    "post_attention_norm.weight" | "post_ffw_norm.weight" if c.gemma2.is_some() => {
                        (1, c.hidden_size)
                    }
                    "attn_q.weight" => (h * d, c.hidden_size),
                    "attn_k.weight" | "attn_v.weight" => (kv * d, c.hidden_size),
                    "attn_q.bias" if c.attention_bias => (1, h * d),
                    "attn_k.bias" | "attn_v.bias" if c.attention_bias => (1, kv * d),
                    "attn_output.weight" => (c.hidden_size, h * d),
                    "ffn_gate.weight" | "ffn_up.weight" => (c.intermediate_size, c.hidden_size),
                    "ffn_down.weight" => (c.hidden_size, c.intermediate_size),
                    _ => return None,
                }
            }
        })
    }
}

impl DummyWeights {
    /// The window `rows × cols` of tensor `name`: the same values as the whole tensor holds
    /// there (the generator seeks to each row's first value), so shards of a dummy model
    /// match the unsharded one.
    fn generate(
        &self,
        name: &str,
        rows: Range<usize>,
        cols: Range<usize>,
        full_cols: usize,
    ) -> HostTensor {
        // One stream per tensor, keyed by its name, so a tensor's values do not depend on the
        // order tensors are asked for.
        let key = name
            .bytes()
            .fold(self.seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(key);
        let is_norm = name.ends_with("norm.weight");
        let mut values = Vec::with_capacity(rows.len() * cols.len());
        for r in rows.clone() {
            // One 32-bit word per value (`random::<f32>` draws one `u32`).
            rng.set_word_pos((r * full_cols + cols.start) as u128);
            for _ in cols.clone() {
                values.push(if is_norm {
                    1.0
                } else {
                    (rng.random::<f32>() * 2.0 - 1.0) * 0.05
                });
            }
        }
        let bytes: Vec<u8> = match self.dtype {
            WeightDType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            WeightDType::F16 => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            _ => values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        };
        HostTensor {
            dtype: self.dtype,
            rows: rows.len(),
            cols: cols.len(),
            bytes: WeightBytes::Owned(Arc::new(bytes)),
        }
    }

    fn window(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        row_range: Range<usize>,
        col_range: Range<usize>,
    ) -> Result<HostTensor, ModelError> {
        match self.shape(name) {
            Some(shape) if shape == (rows, cols) => {}
            Some((r, c)) => {
                return Err(ModelError::Invalid(format!(
                    "{}: tensor {name} is [{r}, {c}], the config says [{rows}, {cols}]",
                    self.describe()
                )))
            }
            None => {
                return Err(ModelError::Invalid(format!(
                    "{}: missing tensor {name}",
                    self.describe()
                )))
            }
        }
        check_range(name, "rows", &row_range, rows)?;
        check_range(name, "columns", &col_range, cols)?;
        Ok(self.generate(name, row_range, col_range, cols))
    }
}

impl WeightSource for DummyWeights {
    fn get(&self, name: &str) -> Result<Option<HostTensor>, ModelError> {
        Ok(self
            .shape(name)
            .map(|(rows, cols)| self.generate(name, 0..rows, 0..cols, cols)))
    }
    fn require_rows(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        range: Range<usize>,
    ) -> Result<HostTensor, ModelError> {
        self.window(name, rows, cols, range, 0..cols)
    }
    fn require_cols(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        range: Range<usize>,
    ) -> Result<HostTensor, ModelError> {
        self.window(name, rows, cols, 0..rows, range)
    }
    fn dtype_of(&self, name: &str) -> Result<Option<WeightDType>, ModelError> {
        Ok(self.shape(name).map(|_| self.dtype))
    }
    fn describe(&self) -> String {
        format!("dummy {} weights (seed {})", self.dtype, self.seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_config() -> ModelConfig {
        ModelConfig {
            architecture: "llama".into(),
            hidden_size: 64,
            intermediate_size: 96,
            num_layers: 1,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            vocab_size: 10,
            max_position_embeddings: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_style: super::super::config::RopeStyle::Interleaved,
            rope_scaling: None,
            tie_word_embeddings: true,
            attention_bias: false,
            sliding_window: None,
            gemma2: None,
        }
    }

    #[test]
    fn dummy_windows_match_the_whole_tensor() {
        let w = DummyWeights::new(small_config(), WeightDType::F32, 7).unwrap();
        let name = "blk.0.ffn_down.weight";
        let whole = w.require(name, 64, 96).unwrap().to_f32();
        let rows = w.require_rows(name, 64, 96, 10..20).unwrap().to_f32();
        assert_eq!(rows, whole[10 * 96..20 * 96]);
        let cols = w.require_cols(name, 64, 96, 32..64).unwrap().to_f32();
        let expected: Vec<f32> = (0..64)
            .flat_map(|r| whole[r * 96 + 32..r * 96 + 64].to_vec())
            .collect();
        assert_eq!(cols, expected);
    }

    #[test]
    fn column_splits_refuse_to_cut_a_quantization_block() {
        // One row of Q8_0: two blocks of 32 values (34 bytes each).
        let t = HostTensor {
            dtype: WeightDType::Q8_0,
            rows: 1,
            cols: 64,
            bytes: WeightBytes::Owned(Arc::new((0..68).map(|i| i as u8).collect())),
        };
        let half = slice_cols("t", &t, 32..64).unwrap();
        assert_eq!(&half.bytes[..], &t.bytes[34..68]);
        let err = slice_cols("t", &t, 16..64).unwrap_err().to_string();
        assert!(err.contains("blocks of 32 values"), "{err}");
    }
}
