//! Per-step data of the CPU ops, prepared once per forward pass: each token's RoPE angles, in
//! the step's numerics, and the split of attention into tasks of (sequence, up to
//! `QUERY_CHUNK` queries).

use crate::kernels::cpu::backend::CpuNumerics;
use crate::kernels::cpu::rows;
use crate::kernels::ForwardBatch;

/// Queries per attention task.
const QUERY_CHUNK: usize = 16;

/// A unit of attention work.
#[derive(Debug, Clone, Copy)]
pub struct AttentionTask {
    pub seq: usize,
    /// Query range within the sequence's new tokens.
    pub q_begin: usize,
    pub q_end: usize,
}

/// Per-step data for the CPU ops, prepared once per forward pass.
pub struct CpuStep {
    pub batch: ForwardBatch,
    /// `[tokens, head_dim / 2]` cosines and sines of each token's rotation angles.
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub interleaved: bool,
    pub tasks: Vec<AttentionTask>,
    pub numerics: CpuNumerics,
}

impl CpuStep {
    pub fn new(batch: &ForwardBatch, rope: &crate::kernels::Rope, numerics: CpuNumerics) -> Self {
        let half = rope.inv_freqs.len();
        let n = batch.num_tokens();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for &p in &batch.positions {
            match numerics {
                CpuNumerics::Fast => rows::rope_angles(p, &rope.inv_freqs, &mut cos, &mut sin),
                CpuNumerics::Ggml => rows::ggml::rope_angles(
                    p,
                    rope.theta_base,
                    2 * half,
                    rope.freq_factors.as_deref(),
                    &mut cos,
                    &mut sin,
                ),
            }
        }
        let mut tasks = Vec::new();
        for (seq, s) in batch.seqs.iter().enumerate() {
            let mut q = 0;
            while q < s.query_len {
                let end = (q + QUERY_CHUNK).min(s.query_len);
                tasks.push(AttentionTask {
                    seq,
                    q_begin: q,
                    q_end: end,
                });
                q = end;
            }
        }
        Self {
            batch: batch.clone(),
            cos,
            sin,
            interleaved: rope.interleaved,
            tasks,
            numerics,
        }
    }
}
