//! Sampling on the GPU: the launch of `sample_rows` (`kernels-cuda/sampling.cu`) over a
//! device-neutral `kernels::sampling::SamplingBatch` (its types are re-exported here).
//! Only the sampled ids, their logprobs and the requested top logprobs come back.
//! `reference::sample_rows` is the same math on the host.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::backend::{grow, launch, CudaBackend, CudaTensor};
use super::context::ptr;
use super::params::SamplingParams;
pub use crate::kernels::sampling::{
    PenaltyToken, SampleRow, SampledRow, SamplingBatch, GREEDY_TEMPERATURE, MAX_TOP_LOGPROBS,
    SAMPLE_THREADS,
};
use crate::kernels::KernelError;

impl CudaBackend {
    /// Samples one token per row of `logits` (`[batch.len(), vocab]`, e.g. the output of the
    /// LM head) with `batch`'s parameters; one download of ids and logprobs at the end.
    pub fn sample_rows(
        &self,
        logits: &CudaTensor,
        batch: &SamplingBatch,
    ) -> Result<Vec<SampledRow>, KernelError> {
        let gpu = &self.gpu;
        let n = batch.len();
        if logits.rows != n {
            return Err(KernelError::Invalid(format!(
                "sample_rows: {} logits rows, {n} sampling rows",
                logits.rows
            )));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let vocab = logits.cols;
        // `SampleRow` is the kernel's row layout (`#[repr(C)]`): uploaded without a copy.
        let rows = gpu.upload(&batch.rows)?;
        let penalty_ids = gpu.upload(&batch.penalty_ids)?;
        let penalty_info = gpu.upload(&batch.penalty_info)?;
        let bias_ids = gpu.upload(&batch.bias_ids)?;
        let bias_values = gpu.upload(&batch.bias_values)?;
        let out_ids = gpu.alloc::<u32>(n)?;
        let out_logprobs = gpu.alloc::<f32>(n)?;
        let out_top_ids = gpu.alloc::<u32>(n * MAX_TOP_LOGPROBS)?;
        let out_top_logprobs = gpu.alloc::<f32>(n * MAX_TOP_LOGPROBS)?;
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let s = &gpu.stream;
        let p = SamplingParams {
            logits: logits.ptr(gpu)?,
            work: grow(gpu, &mut scratch.split, n * vocab)?,
            rows: ptr(&rows, s),
            penalty_ids: ptr(&penalty_ids, s),
            penalty_info: ptr(&penalty_info, s),
            bias_ids: ptr(&bias_ids, s),
            bias_values: ptr(&bias_values, s),
            out_ids: ptr(&out_ids, s),
            out_logprobs: ptr(&out_logprobs, s),
            out_top_ids: ptr(&out_top_ids, s),
            out_top_logprobs: ptr(&out_top_logprobs, s),
            vocab: vocab as i32,
        };
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (SAMPLE_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(gpu, "sample_rows", cfg, &p)?;
        drop(scratch);
        let ids = gpu.download(&out_ids, n)?;
        let logprobs = gpu.download(&out_logprobs, n)?;
        let any_top = batch.rows.iter().any(|r| r.num_top_logprobs > 0);
        let (top_ids, top_lp) = if any_top {
            (
                gpu.download(&out_top_ids, n * MAX_TOP_LOGPROBS)?,
                gpu.download(&out_top_logprobs, n * MAX_TOP_LOGPROBS)?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        if let Some(e) = gpu.take_error() {
            return Err(KernelError::Invalid(e));
        }
        Ok((0..n)
            .map(|r| {
                let k = batch.rows[r].num_top_logprobs.max(0) as usize;
                let base = r * MAX_TOP_LOGPROBS;
                SampledRow {
                    token_id: ids[r],
                    logprob: logprobs[r],
                    top_logprobs: (base..base + k).map(|i| (top_ids[i], top_lp[i])).collect(),
                }
            })
            .collect())
    }
}
