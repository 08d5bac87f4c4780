//! What one engine step costs: measured on this CPU with sluice's own forward pass, or the
//! roofline bound of a named GPU.
//!
//! The CPU probe loads the model with the same CPU backend `serve` uses and times real steps
//! (`Llama::forward_rank` over a `ForwardBatch`: the engine's per-step work less sampling,
//! scheduling and streaming): decode steps of 1, 4 and `PROBE_ROWS` sequences at a short
//! context, `PROBE_ROWS` at a long one, and one prompt of `PREFILL_TOKENS`, taking turns
//! (so other load on the machine slows them alike), and keeps each shape's median. Then
//!
//! ```text
//! step = rows(decode rows + prompt tokens) + per_context_token · (context tokens read)
//! ```
//!
//! `per_context_token` (attention) is the long and short 16-row steps' difference per
//! context token; `rows(n)` is the rest of a step at 1, 4, 16 and 64 rows, linear between
//! them. Its value at 1 row is mostly streaming the weights once, and its slope the matmul
//! work each row adds: a bandwidth-bound device shows a flat start, a compute-bound one a
//! straight line. The cache's blocks are never filled: attention costs the same over any
//! values.

use std::time::Instant;

use serde::Serialize;

use super::{Footprint, GpuSpec, PlanError};
use crate::kernels::cpu::{CpuBackend, CpuNumerics};
use crate::kernels::ForwardBatch;
use crate::model::llama::Llama;
use crate::model::loader::{self, ModelSpec};

/// Rows of the probe's larger decode batch.
pub const PROBE_ROWS: usize = 16;
/// Context of the short and the long decode probes, in tokens.
const SHORT_CTX: usize = 32;
const LONG_CTX: usize = 544;
/// Prompt length of the prefill probe, in tokens.
const PREFILL_TOKENS: usize = 64;
const BLOCK_SIZE: usize = 16;

/// A step's shape, as the cost model sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepShape {
    /// sequences decoding one token each
    pub decode_rows: f64,
    /// context tokens each decode row's attention reads
    pub decode_ctx: f64,
    /// prompt tokens computed in the step (prefill rows)
    pub prefill_tokens: f64,
    /// context tokens the prompt tokens' attention reads (a prompt of n: n(n+1)/2)
    pub prefill_pairs: f64,
}

impl StepShape {
    /// `rows` sequences decoding at `ctx` tokens of context each.
    pub fn decode(rows: usize, ctx: f64) -> Self {
        Self {
            decode_rows: rows as f64,
            decode_ctx: ctx,
            ..Self::default()
        }
    }

    /// This step plus `prompts` whole prompts of `len` tokens.
    pub fn with_prompts(self, prompts: usize, len: usize) -> Self {
        let (n, l) = (prompts as f64, len as f64);
        Self {
            prefill_tokens: self.prefill_tokens + n * l,
            prefill_pairs: self.prefill_pairs + n * l * (l + 1.0) / 2.0,
            ..self
        }
    }
}

/// Step times measured on this CPU: the matmul work of a step as a function of its rows
/// (decode tokens and prompt tokens alike: a row is a row of every matmul), and attention
/// per context token read. See the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeasuredCost {
    /// `[rows, seconds]`: a step's time at that many rows with its attention taken out, at
    /// the probed row counts; linear between them and beyond the last two
    pub row_points: [[f64; 2]; 4],
    /// seconds per context token one row's attention reads
    pub per_context_token_s: f64,
    /// CPU threads the probe ran with
    pub threads: usize,
    /// the probe's own medians, in seconds: what the fit came from
    pub samples: ProbeSamples,
}

impl MeasuredCost {
    /// Seconds of a step's matmul work at `rows` rows: through the measured points, and by
    /// the nearest segment's slope outside them (never below zero).
    pub fn rows_s(&self, rows: f64) -> f64 {
        let p = &self.row_points;
        let seg = p
            .windows(2)
            .position(|w| rows <= w[1][0])
            .unwrap_or(p.len() - 2);
        let ([x0, y0], [x1, y1]) = (p[seg], p[seg + 1]);
        let slope = if x1 > x0 { (y1 - y0) / (x1 - x0) } else { 0.0 };
        (y0 + slope * (rows - x0)).max(0.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProbeSamples {
    pub decode_1_short_s: f64,
    pub decode_4_short_s: f64,
    pub decode_n_short_s: f64,
    pub decode_n_long_s: f64,
    pub prefill_s: f64,
    pub rows: usize,
    pub short_ctx: usize,
    pub long_ctx: usize,
    pub prefill_tokens: usize,
}

/// A named GPU's peaks and the model's per-token work: a step takes the longer of its bytes
/// over the bandwidth and its FLOPs over the BF16 tensor peak.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Roofline {
    pub bandwidth_bytes_s: f64,
    pub flops: f64,
    /// bytes the weights stream per step
    pub weight_bytes: f64,
    /// FLOPs of the matmuls per token (2 per parameter)
    pub flops_per_token: f64,
    /// KV bytes per context token read (all layers, K and V)
    pub kv_bytes_per_token: f64,
    /// attention FLOPs per query token per context token (QKᵀ and PV, all layers and heads)
    pub attn_flops_per_pair: f64,
}

/// How long steps take on the planned device.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StepCost {
    Measured(MeasuredCost),
    Roofline(Roofline),
}

impl StepCost {
    /// Seconds of one step of this shape.
    pub fn step_s(&self, s: StepShape) -> f64 {
        let prefill_pairs = s.prefill_pairs;
        match self {
            StepCost::Measured(m) => {
                m.rows_s(s.decode_rows + s.prefill_tokens)
                    + m.per_context_token_s * (s.decode_rows * s.decode_ctx + prefill_pairs)
            }
            StepCost::Roofline(r) => {
                let tokens = s.decode_rows + s.prefill_tokens;
                let pairs = s.decode_rows * s.decode_ctx + prefill_pairs;
                let bytes = r.weight_bytes + r.kv_bytes_per_token * s.decode_rows * s.decode_ctx;
                let flops = r.flops_per_token * tokens + r.attn_flops_per_pair * pairs;
                (bytes / r.bandwidth_bytes_s).max(flops / r.flops)
            }
        }
    }

    /// The roofline of `gpu` for the model of `fp`.
    pub fn roofline(fp: &Footprint, gpu: &GpuSpec) -> StepCost {
        let c = &fp.config;
        StepCost::Roofline(Roofline {
            bandwidth_bytes_s: gpu.bandwidth_bytes_s,
            flops: gpu.bf16_flops,
            weight_bytes: fp.streamed_weight_bytes() as f64,
            flops_per_token: 2.0 * fp.matmul_params() as f64,
            kv_bytes_per_token: fp.kv_bytes_per_token() as f64,
            attn_flops_per_pair: (4 * c.num_layers * c.num_heads * c.head_dim) as f64,
        })
    }
}

/// Fits the cost terms to the probe's medians (pure; a negative attention term from noise
/// becomes 0).
pub fn fit(s: ProbeSamples, threads: usize) -> MeasuredCost {
    let n = s.rows as f64;
    let (short, long) = (s.short_ctx as f64, s.long_ctx as f64);
    let c = ((s.decode_n_long_s - s.decode_n_short_s) / (n * (long - short))).max(0.0);
    let p = s.prefill_tokens as f64;
    MeasuredCost {
        row_points: [
            [1.0, s.decode_1_short_s - c * short],
            [4.0, s.decode_4_short_s - c * 4.0 * short],
            [n, s.decode_n_short_s - c * n * short],
            [p, s.prefill_s - c * p * (p + 1.0) / 2.0],
        ],
        per_context_token_s: c,
        threads,
        samples: s,
    }
}

fn batch(rows: usize, per_seq: usize, start: usize, end: usize) -> ForwardBatch {
    ForwardBatch::synthetic(rows, per_seq, BLOCK_SIZE, start, end)
}

/// Loads the model `spec` names on the CPU with `threads` threads and times
/// its steps, `reps` of each shape (the median is kept). A few seconds for a small model.
pub fn probe_cpu(spec: &ModelSpec, threads: usize, reps: usize) -> Result<MeasuredCost, PlanError> {
    let opened = loader::open(spec)?;
    let backend = CpuBackend::with_numerics(threads, CpuNumerics::Fast);
    let mut model = Llama::load(opened.config, opened.weights.as_ref(), backend)?;
    let per_seq = (LONG_CTX + 1).div_ceil(BLOCK_SIZE);
    let mut kv = model.kv_cache(PROBE_ROWS * per_seq, BLOCK_SIZE)?;
    let shapes = [
        batch(1, per_seq, SHORT_CTX, SHORT_CTX + 1),
        batch(4, per_seq, SHORT_CTX, SHORT_CTX + 1),
        batch(PROBE_ROWS, per_seq, SHORT_CTX, SHORT_CTX + 1),
        batch(PROBE_ROWS, per_seq, LONG_CTX, LONG_CTX + 1),
        batch(1, per_seq, 0, PREFILL_TOKENS),
    ];
    // One untimed round first (buffers grow to each shape on first use); then the shapes
    // take turns, so that other work on the machine slows them alike.
    let mut times = vec![Vec::with_capacity(reps); shapes.len()];
    for round in 0..=reps.max(1) {
        for (shape, t) in shapes.iter().zip(&mut times) {
            let started = Instant::now();
            model.forward_rank(shape, &mut kv)?;
            if round > 0 {
                t.push(started.elapsed().as_secs_f64());
            }
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut medians = times.into_iter().map(median);
    let mut next = || medians.next().unwrap_or(0.0);
    let samples = ProbeSamples {
        decode_1_short_s: next(),
        decode_4_short_s: next(),
        decode_n_short_s: next(),
        decode_n_long_s: next(),
        prefill_s: next(),
        rows: PROBE_ROWS,
        short_ctx: SHORT_CTX,
        long_ctx: LONG_CTX,
        prefill_tokens: PREFILL_TOKENS,
    };
    Ok(fit(samples, threads))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10 ms a step, 2 ms a row, 1 µs a context token.
    fn truth(rows: f64, pairs: f64) -> f64 {
        0.010 + 0.002 * rows + 1e-6 * pairs
    }

    fn samples() -> ProbeSamples {
        ProbeSamples {
            decode_1_short_s: truth(1.0, 32.0),
            decode_4_short_s: truth(4.0, 4.0 * 32.0),
            decode_n_short_s: truth(16.0, 16.0 * 32.0),
            decode_n_long_s: truth(16.0, 16.0 * 544.0),
            prefill_s: truth(64.0, 64.0 * 65.0 / 2.0),
            rows: 16,
            short_ctx: 32,
            long_ctx: 544,
            prefill_tokens: 64,
        }
    }

    #[test]
    fn the_fit_recovers_the_terms_that_made_the_samples() {
        let m = fit(samples(), 2);
        assert!((m.per_context_token_s - 1e-6).abs() < 1e-12, "{m:?}");
        for [rows, s] in m.row_points {
            assert!((s - truth(rows, 0.0)).abs() < 1e-9, "{m:?}");
        }
        // Between the points, beyond them and below them, the line holds.
        for rows in [0.0, 2.0, 10.0, 40.0, 200.0] {
            assert!((m.rows_s(rows) - truth(rows, 0.0)).abs() < 1e-9, "{rows}");
        }
        let cost = StepCost::Measured(m);
        let shape = StepShape::decode(4, 100.0).with_prompts(1, 8);
        assert!((cost.step_s(shape) - truth(12.0, 400.0 + 36.0)).abs() < 1e-9);
    }

    #[test]
    fn rows_follow_a_bent_curve_piece_by_piece() {
        // Bandwidth-bound below 4 rows (flat), compute-bound above.
        let mut s = samples();
        (s.decode_1_short_s, s.decode_4_short_s, s.decode_n_short_s) = (0.010, 0.010, 0.034);
        s.decode_n_long_s = s.decode_n_short_s;
        s.prefill_s = 0.130;
        let m = fit(s, 2);
        assert_eq!(m.per_context_token_s, 0.0);
        assert!((m.rows_s(2.0) - 0.010).abs() < 1e-12);
        assert!((m.rows_s(10.0) - 0.022).abs() < 1e-12);
        assert!((m.rows_s(40.0) - 0.082).abs() < 1e-12);
        assert!((m.rows_s(100.0) - 0.202).abs() < 1e-12);
    }
}
