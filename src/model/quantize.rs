//! Quantization at load (`--quantization q8_0|q4_0`, the seeds' "dynamic quantization"):
//! float weights (a safetensors directory, an F16/BF16/F32 GGUF) become the 8- or 4-bit
//! blocks the quantized kernels run, as they are read, so a float model is served at the
//! quantized types' speed and memory. Tensors already quantized are left as they are, and so
//! are vectors (norms, biases). With `q4_0` the token embedding and the LM head become Q8_0:
//! like `llama-quantize`, which keeps the output layer at a higher precision, since its
//! errors reach every logit.
//!
//! The blocks are llama.cpp's reference quantizers' (round to nearest; Q4_0 maps the value of
//! largest magnitude to −8), computed on every core. The time it took is logged when the
//! model has loaded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::weights::WeightSource;
use super::ModelError;
use crate::kernels::cpu::matmul::dequantize_row;
use crate::kernels::cpu::matmul::quantize_weights::quantize_row;
use crate::kernels::dtype::WeightDType;
use crate::kernels::host::{HostTensor, WeightBytes};

/// The block type float weights are quantized to at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Quantization {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
}

impl Quantization {
    /// The type tensor `name` is stored in after loading, given its type in the file.
    fn target(self, name: &str, t: &HostTensor) -> Option<WeightDType> {
        let float = matches!(
            t.dtype,
            WeightDType::F32 | WeightDType::F16 | WeightDType::BF16
        );
        if !float || t.rows < 2 || !t.cols.is_multiple_of(32) {
            return None;
        }
        let head = name == "token_embd.weight" || name == "output.weight";
        Some(match self {
            Self::Q4_0 if !head => WeightDType::Q4_0,
            _ => WeightDType::Q8_0,
        })
    }
}

/// A weight source whose float matrices come out quantized (see the module docs).
pub struct QuantizeAtLoad {
    inner: Box<dyn WeightSource>,
    quantization: Quantization,
    tensors: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    micros: AtomicU64,
}

impl QuantizeAtLoad {
    pub fn new(inner: Box<dyn WeightSource>, quantization: Quantization) -> Self {
        Self {
            inner,
            quantization,
            tensors: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            micros: AtomicU64::new(0),
        }
    }
}

impl WeightSource for QuantizeAtLoad {
    fn get(&self, name: &str) -> Result<Option<HostTensor>, ModelError> {
        let Some(t) = self.inner.get(name)? else {
            return Ok(None);
        };
        let Some(dtype) = self.quantization.target(name, &t) else {
            return Ok(Some(t));
        };
        let start = Instant::now();
        let out = quantize(name, &t, dtype)?;
        let add = |c: &AtomicU64, v: usize| c.fetch_add(v as u64, Ordering::Relaxed);
        add(&self.tensors, 1);
        add(&self.bytes_in, t.bytes.len());
        add(&self.bytes_out, out.bytes.len());
        add(&self.micros, start.elapsed().as_micros() as usize);
        Ok(Some(out))
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn dtype_of(&self, name: &str) -> Result<Option<WeightDType>, ModelError> {
        // Without quantizing it: the type only depends on the tensor's own.
        let Some(t) = self.inner.get(name)? else {
            return Ok(None);
        };
        Ok(Some(self.quantization.target(name, &t).unwrap_or(t.dtype)))
    }
}

impl Drop for QuantizeAtLoad {
    fn drop(&mut self) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mb = |b: u64| b as f64 / 1e6;
        tracing::info!(
            "quantized {} tensors of {} at load to {:?}: {:.1} MB -> {:.1} MB in {:.2} s",
            get(&self.tensors),
            self.inner.describe(),
            self.quantization,
            mb(get(&self.bytes_in)),
            mb(get(&self.bytes_out)),
            get(&self.micros) as f64 / 1e6
        );
    }
}

/// `t`'s rows in `dtype` (`t` a float matrix of whole blocks), the rows shared out over the
/// machine's cores.
fn quantize(name: &str, t: &HostTensor, dtype: WeightDType) -> Result<HostTensor, ModelError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = t.rows.div_ceil(threads).max(1);
    let parts: Vec<Option<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..t.rows)
            .step_by(per)
            .map(|r0| {
                s.spawn(move || {
                    let mut values = vec![0.0f32; t.cols];
                    let mut out = Vec::new();
                    for r in r0..(r0 + per).min(t.rows) {
                        dequantize_row(t.dtype, t.row(r), &mut values);
                        out.extend(quantize_row(dtype, &values));
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().ok()).collect()
    });
    let bytes: Vec<u8> = parts.into_iter().flatten().flatten().collect();
    if Some(bytes.len()) != dtype.row_bytes(t.cols).map(|b| b * t.rows) {
        return Err(ModelError::Invalid(format!(
            "tensor {name}: quantizing [{}, {}] to {dtype} failed",
            t.rows, t.cols
        )));
    }
    Ok(HostTensor {
        dtype,
        rows: t.rows,
        cols: t.cols,
        bytes: WeightBytes::Owned(Arc::new(bytes)),
    })
}
