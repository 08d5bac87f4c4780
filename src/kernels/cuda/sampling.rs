//! Sampling on the GPU: the host-side batch of per-row parameters that `sample_rows`
//! (`kernels-cuda/sampling.cu`) reads, and its launch.
//!
//! A `SamplingBatch` holds one `SamplingRow` per logits row, in the order of the logits rows,
//! plus the flat penalty and bias lists the rows index by `[begin, end)` ranges. Invariant: a
//! row's penalty list names each token once (`count` generated occurrences, `in_prompt`), so
//! the kernel may apply penalties in parallel; its bias list may repeat a token (applied in
//! order). Only the sampled ids, their logprobs and the requested top logprobs come back.
//! `reference::sample_rows` is the same math on the host.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::backend::{grow, launch, CudaBackend, CudaTensor};
use super::context::ptr;
use super::params::{SamplingParams, SamplingRow};
use crate::kernels::KernelError;

/// Alternatives per row the kernel can report (`MAX_TOP_LOGPROBS` in sampling.cu).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Threads of one `sample_rows` CTA (`SAMPLE_THREADS`).
pub const SAMPLE_THREADS: usize = 1024;
/// Below this temperature a row is greedy (`GREEDY_TEMPERATURE`, as `model/sampling.rs`).
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// One row's filtering and drawing parameters (what `model::sampling::SamplingParams` holds,
/// minus the lists, plus the draw's position).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowParams {
    pub seed: u64,
    /// Tokens this sequence generated so far: the draw's index, so a seed replays.
    pub counter: u64,
    /// Below `GREEDY_TEMPERATURE`: greedy.
    pub temperature: f32,
    /// 0: no cut.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Alternatives to report, at most `MAX_TOP_LOGPROBS`.
    pub num_top_logprobs: usize,
}

impl Default for RowParams {
    fn default() -> Self {
        Self {
            seed: 0,
            counter: 0,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            num_top_logprobs: 0,
        }
    }
}

/// A token the penalties look at: generated `count` times, and whether the prompt holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PenaltyToken {
    pub token_id: u32,
    pub count: u32,
    pub in_prompt: bool,
}

/// The rows of one sampling launch, flat as the kernel reads them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingBatch {
    pub rows: Vec<SamplingRow>,
    pub penalty_ids: Vec<u32>,
    /// `count | in_prompt << 31`.
    pub penalty_info: Vec<u32>,
    pub bias_ids: Vec<u32>,
    pub bias_values: Vec<f32>,
}

impl SamplingBatch {
    /// Appends a row. `penalties` must name each token once (see the module doc); a count is
    /// capped at 2³¹ - 1. Suppressed tokens (EOS under `min_tokens`) go in `bias` as `-inf`.
    pub fn push(&mut self, p: &RowParams, penalties: &[PenaltyToken], bias: &[(u32, f32)]) {
        let penalty_begin = self.penalty_ids.len() as u32;
        for t in penalties {
            self.penalty_ids.push(t.token_id);
            self.penalty_info
                .push(t.count.min(0x7fff_ffff) | (u32::from(t.in_prompt) << 31));
        }
        let bias_begin = self.bias_ids.len() as u32;
        for &(id, v) in bias {
            self.bias_ids.push(id);
            self.bias_values.push(v);
        }
        self.rows.push(SamplingRow {
            seed: p.seed,
            counter: p.counter,
            temperature: p.temperature,
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            top_k: p.top_k.min(i32::MAX as usize) as i32,
            num_top_logprobs: p.num_top_logprobs.min(MAX_TOP_LOGPROBS) as i32,
            penalty_begin,
            penalty_end: self.penalty_ids.len() as u32,
            bias_begin,
            bias_end: self.bias_ids.len() as u32,
        });
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// What sampling one row produced.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledRow {
    pub token_id: u32,
    /// Log-probability of `token_id` under the raw logits.
    pub logprob: f32,
    /// The most probable tokens of the raw logits, best first, as `(id, logprob)`.
    pub top_logprobs: Vec<(u32, f32)>,
}

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
