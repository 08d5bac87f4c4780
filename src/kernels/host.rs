//! Weight tensors as they sit in host memory: either borrowed from a memory-mapped file
//! (GGUF, safetensors) or owned (dummy weights, converted tensors). The CPU backend computes
//! on them directly; a device backend uploads them.

use std::ops::Deref;
use std::sync::Arc;

use super::dtype::WeightDType;

/// Bytes of a tensor: a window of a shared memory map, or an owned buffer.
#[derive(Clone)]
pub enum WeightBytes {
    Mapped {
        map: Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
    },
    Owned(Arc<Vec<u8>>),
}

impl Deref for WeightBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped { map, offset, len } => &map[*offset..*offset + *len],
            Self::Owned(v) => v,
        }
    }
}

impl std::fmt::Debug for WeightBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightBytes({} bytes)", self.len())
    }
}

/// A 2-D (or 1-D, `rows == 1`) weight tensor in its storage format.
///
/// Row-major: `rows` rows of `cols` values. For a linear layer `rows` is the number of output
/// features and `cols` the number of input features (GGUF's `ne[1]` and `ne[0]`).
#[derive(Clone, Debug)]
pub struct HostTensor {
    pub dtype: WeightDType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: WeightBytes,
}

impl HostTensor {
    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Self {
        assert_eq!(values.len(), rows * cols);
        Self {
            dtype: WeightDType::F32,
            rows,
            cols,
            bytes: WeightBytes::Owned(Arc::new(bytemuck::cast_slice(values).to_vec())),
        }
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_len() * self.dtype.block_bytes()
    }

    /// The raw bytes of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.bytes[r * n..(r + 1) * n]
    }

    /// A contiguous range of rows as a new tensor sharing the same bytes (used to shard by
    /// output features without copying).
    pub fn slice_rows(&self, start: usize, len: usize) -> Self {
        let n = self.row_bytes();
        let bytes = match &self.bytes {
            WeightBytes::Mapped { map, offset, .. } => WeightBytes::Mapped {
                map: map.clone(),
                offset: offset + start * n,
                len: len * n,
            },
            WeightBytes::Owned(v) => {
                WeightBytes::Owned(Arc::new(v[start * n..(start + len) * n].to_vec()))
            }
        };
        Self {
            dtype: self.dtype,
            rows: len,
            cols: self.cols,
            bytes,
        }
    }
}

impl HostTensor {
    /// All values as f32 (small tensors: norms, biases, frequency factors).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            super::cpu::matmul::dequantize_row(self.dtype, self.row(r), o);
        }
        out
    }
}
