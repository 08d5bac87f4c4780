//! Moving activations and KV contents between the host and a `CudaBackend` outside the
//! `Backend` ops: for tests that feed both backends the same inputs, and for benches that need
//! a filled KV cache without running a prefill.

use super::backend::{CudaBackend, CudaKvCache, CudaTensor};
use crate::kernels::KernelError;

impl CudaBackend {
    /// A `[rows, cols]` activation tensor holding `values` (row-major).
    pub fn upload_tensor(
        &self,
        rows: usize,
        cols: usize,
        values: &[f32],
    ) -> Result<CudaTensor, KernelError> {
        if values.len() != rows * cols {
            return Err(KernelError::Invalid(format!(
                "upload_tensor: {} values for [{rows}, {cols}]",
                values.len()
            )));
        }
        Ok(CudaTensor {
            buf: Some(self.gpu.upload(values)?),
            rows,
            cols,
        })
    }

    /// Overwrites layer `layer`'s K and V with raw 16-bit values (f16 or bf16 bits, as the
    /// cache's `KvDType`), each `[num_blocks, num_kv_heads, block_size, head_dim]` long.
    pub fn write_kv_layer(
        &self,
        kv: &mut CudaKvCache,
        layer: usize,
        k: &[u16],
        v: &[u16],
    ) -> Result<(), KernelError> {
        let s = kv.shape;
        let len = s.num_blocks * s.num_kv_heads * s.block_size * s.head_dim;
        if layer >= kv.k.len() || k.len() != len || v.len() != len {
            return Err(KernelError::Invalid(format!(
                "write_kv_layer: layer {layer}, {} and {} values for {len}",
                k.len(),
                v.len()
            )));
        }
        let stream = &self.gpu.stream;
        stream
            .memcpy_htod(k, &mut kv.k[layer])
            .map_err(super::context::kerr)?;
        stream
            .memcpy_htod(v, &mut kv.v[layer])
            .map_err(super::context::kerr)?;
        stream.synchronize().map_err(super::context::kerr)
    }
}
