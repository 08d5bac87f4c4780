//! The plan itself: pure arithmetic over a model's footprint, a step cost and a workload.
//!
//! Memory: the budget less the weights, an estimate of activations and a runtime reserve is
//! the KV budget; `sluice serve` turns a KV budget into `floor(budget / bytes_per_block)`
//! blocks, and a sequence of `c` tokens holds `ceil(c / block_size)` of them whole, so the
//! concurrency that fits is `floor(num_blocks / blocks_per_seq)`. The recommended
//! `--kv-cache-memory` is exactly the blocks of `--max-num-seqs` such sequences, and
//! `--max-model-len` is the context rounded up to whole blocks (serve caps its pool at the
//! blocks `max_num_seqs` sequences of `max_model_len` tokens can use, and refuses a pool that
//! cannot hold one sequence of `max_model_len`).
//!
//! Time: decode rate from the step cost of `concurrency` rows at the mean decode context
//! (`input + (output - 1) / 2`); TTFT for a prompt arriving alone into the running batch, and
//! for a burst of `concurrency` prompts at once (closed-loop clients with equal lengths start
//! in lockstep), queued over steps of `max_num_batched_tokens`.

use serde::Serialize;

use super::probe::{StepCost, StepShape};
use super::{Footprint, PlanError};

/// How requests arrive.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Load {
    /// this many requests in flight at all times (closed loop)
    Concurrency(usize),
    /// requests per second (open loop)
    RequestRate(f64),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Workload {
    /// prompt tokens per request
    pub input_len: usize,
    /// generated tokens per request
    pub output_len: usize,
    pub load: Load,
}

/// What the plan is computed against besides the model and workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub cost: StepCost,
    /// total memory for weights, activations and KV cache, in bytes
    pub memory_bytes: u64,
    /// set aside before anything else (a GPU's CUDA context and library workspaces), in bytes
    pub reserve_bytes: u64,
    pub block_size: usize,
}

/// Memory, in bytes unless said.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryPlan {
    pub budget_bytes: u64,
    pub weights_bytes: u64,
    /// an estimate: activation buffers of a step of `max_num_batched_tokens` and the logits
    /// of `max_num_seqs` rows, in f32
    pub activation_bytes: u64,
    pub reserve_bytes: u64,
    pub kv_budget_bytes: u64,
    pub kv_bytes_per_token: u64,
    /// tokens per block
    pub block_size: usize,
    pub bytes_per_block: u64,
    /// blocks one sequence of the workload's context holds
    pub blocks_per_seq: usize,
    /// blocks the KV budget makes
    pub num_blocks: u64,
    /// the most sequences of the workload's context that fit at once
    pub max_concurrency: usize,
}

/// Decode throughput, in tokens per second.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecodePlan {
    /// the mean context a decode step reads per sequence, in tokens
    pub mean_context: f64,
    /// one sequence alone
    pub batch1_tok_s: f64,
    /// sequences decoding together (the planned concurrency, capped by what fits)
    pub batch: usize,
    /// one decode step of `batch` sequences, in ms: the inter-token latency between prefills
    pub step_ms: f64,
    /// every sequence of the batch together: batch / step
    pub batch_tok_s: f64,
    /// one stream's rate: 1 / step
    pub per_stream_tok_s: f64,
}

/// Time to first token, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TtftPlan {
    /// a prompt arriving alone while the batch decodes: half a step's wait, then a step with
    /// its prompt beside the other decodes
    pub isolated_ms: f64,
    /// mean over `batch` prompts arriving at once, admitted `prompts_per_step` a step
    pub burst_ms: f64,
    pub prompts_per_step: usize,
    /// mean wait for a seat when the concurrency exceeds what fits (0 otherwise)
    pub seat_wait_ms: f64,
}

/// The flags to start `sluice serve` with for this workload.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Flags {
    pub kv_cache_memory: u64,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_model_len: usize,
    pub block_size: usize,
}

impl Flags {
    /// As command-line arguments.
    pub fn to_args(&self) -> Vec<String> {
        [
            ("--kv-cache-memory", self.kv_cache_memory.to_string()),
            ("--max-num-seqs", self.max_num_seqs.to_string()),
            (
                "--max-num-batched-tokens",
                self.max_num_batched_tokens.to_string(),
            ),
            ("--max-model-len", self.max_model_len.to_string()),
            ("--block-size", self.block_size.to_string()),
        ]
        .into_iter()
        .flat_map(|(f, v)| [f.to_string(), v])
        .collect()
    }
}

/// Everything `sluice plan` prints (`--json` is this, serialised; see `docs/scale-out.md`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub input_len: usize,
    pub output_len: usize,
    /// prompt + output, in tokens
    pub context_len: usize,
    /// requests per second, when planned for a rate
    pub request_rate: Option<f64>,
    /// requests in flight: as asked, or from Little's law for a rate
    pub concurrency: usize,
    pub memory: MemoryPlan,
    pub decode: DecodePlan,
    pub ttft: TtftPlan,
    /// one request from arrival to its last token, in ms (isolated TTFT for a rate, burst
    /// TTFT for a concurrency)
    pub e2e_ms: f64,
    pub flags: Flags,
    /// what does not fit or cannot keep up, in words
    pub warnings: Vec<String>,
}

/// Activation buffers of one step, estimated: the residual stream, norms, Q/K/V, attention
/// output, the MLP's gate and up per token, and the logits rows, all f32.
fn activation_bytes(fp: &Footprint, max_tokens: usize, max_seqs: usize) -> u64 {
    let c = &fp.config;
    let q = c.num_heads * c.head_dim;
    let kv = c.num_kv_heads * c.head_dim;
    let per_token = 4 * c.hidden_size + 2 * q + 2 * kv + 2 * c.intermediate_size;
    (4 * (max_tokens * per_token + max_seqs.min(max_tokens) * c.vocab_size)) as u64
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// The step budget that holds every decode of the batch and one whole prompt.
fn batched_tokens(seqs: usize, input_len: usize) -> usize {
    round_up(seqs + input_len, 256)
}

/// The plan for `workload` on `target`.
pub fn plan(fp: &Footprint, target: &Target, workload: Workload) -> Result<Plan, PlanError> {
    let Workload {
        input_len,
        output_len,
        load,
    } = workload;
    if input_len == 0 || output_len == 0 {
        return Err(PlanError::Workload(
            "--input-len and --output-len must be at least 1".into(),
        ));
    }
    if !target.block_size.is_power_of_two() || target.block_size > 256 {
        return Err(PlanError::Workload(
            "--block-size must be a power of two up to 256".into(),
        ));
    }
    let context_len = input_len + output_len;
    let blocks_per_seq = context_len.div_ceil(target.block_size);
    let max_model_len = blocks_per_seq * target.block_size;
    if max_model_len > fp.config.max_position_embeddings {
        return Err(PlanError::Workload(format!(
            "input + output = {context_len} tokens (rounded to {max_model_len}) exceeds the \
             model's context of {}",
            fp.config.max_position_embeddings
        )));
    }
    let mut warnings = Vec::new();
    let asked = match load {
        Load::Concurrency(0) => {
            return Err(PlanError::Workload(
                "--concurrency must be at least 1".into(),
            ))
        }
        Load::Concurrency(c) => c,
        Load::RequestRate(r) if !(r > 0.0 && r.is_finite()) => {
            return Err(PlanError::Workload(
                "--request-rate must be positive".into(),
            ))
        }
        // Sized below, once the memory is known.
        Load::RequestRate(_) => 1,
    };
    let kv_bytes_per_token = fp.kv_bytes_per_token();
    let bytes_per_block = kv_bytes_per_token * target.block_size as u64;
    let memory_for = |seqs: usize| -> MemoryPlan {
        let activation_bytes = activation_bytes(fp, batched_tokens(seqs, input_len), seqs);
        let kv_budget_bytes = target
            .memory_bytes
            .saturating_sub(fp.weights_bytes + activation_bytes + target.reserve_bytes);
        let num_blocks = kv_budget_bytes / bytes_per_block;
        MemoryPlan {
            budget_bytes: target.memory_bytes,
            weights_bytes: fp.weights_bytes,
            activation_bytes,
            reserve_bytes: target.reserve_bytes,
            kv_budget_bytes,
            kv_bytes_per_token,
            block_size: target.block_size,
            bytes_per_block,
            blocks_per_seq,
            num_blocks,
            max_concurrency: (num_blocks / blocks_per_seq as u64).min(usize::MAX as u64) as usize,
        }
    };
    let cost = &target.cost;
    let timing = |seqs: usize, fits: usize, lockstep: bool| {
        timing(cost, input_len, output_len, seqs, fits, lockstep)
    };
    let (concurrency, memory) = match load {
        Load::Concurrency(c) => (c, memory_for(c)),
        Load::RequestRate(rate) => {
            // Little's law, L = λ·W, with W the predicted latency at L: iterate to a fixed
            // point (W grows with L, so this climbs monotonically or stops at what fits).
            let fits = memory_for(asked).max_concurrency.max(1);
            let mut c = 1usize;
            for _ in 0..64 {
                let (_, _, e2e) = timing(c, fits, false);
                let next = ((rate * e2e / 1e3).ceil() as usize).max(1);
                if next == c || next > fits {
                    c = next;
                    break;
                }
                c = next;
            }
            if c > fits {
                warnings.push(format!(
                    "{rate} requests/s needs more than the {fits} sequences that fit: the \
                     queue grows without bound (plan for fewer requests or more memory)"
                ));
                c = fits;
            }
            (c, memory_for(c))
        }
    };
    if memory.max_concurrency == 0 {
        return Err(PlanError::Workload(format!(
            "not one sequence of {context_len} tokens fits: {} bytes of memory less {} of \
             weights and {} of activations leave {} for the KV cache, and one sequence needs \
             {} ({blocks_per_seq} blocks of {bytes_per_block} bytes)",
            memory.budget_bytes,
            memory.weights_bytes,
            memory.activation_bytes,
            memory.kv_budget_bytes,
            blocks_per_seq as u64 * bytes_per_block
        )));
    }
    let max_num_seqs = concurrency.min(memory.max_concurrency);
    if concurrency > memory.max_concurrency {
        warnings.push(format!(
            "{concurrency} sequences of {context_len} tokens do not fit: {} do; the rest wait \
             for a seat",
            memory.max_concurrency
        ));
    }
    let lockstep = matches!(load, Load::Concurrency(_));
    let (decode, ttft, e2e_ms) = timing(concurrency, max_num_seqs, lockstep);
    let flags = Flags {
        kv_cache_memory: max_num_seqs as u64 * blocks_per_seq as u64 * bytes_per_block,
        max_num_seqs,
        max_num_batched_tokens: batched_tokens(max_num_seqs, input_len),
        max_model_len,
        block_size: target.block_size,
    };
    Ok(Plan {
        input_len,
        output_len,
        context_len,
        request_rate: match load {
            Load::RequestRate(r) => Some(r),
            Load::Concurrency(_) => None,
        },
        concurrency,
        memory,
        decode,
        ttft,
        e2e_ms,
        flags,
        warnings,
    })
}

/// Decode rates, TTFT and end-to-end latency of `seqs` streams of which `fits` run at once.
fn timing(
    cost: &StepCost,
    input_len: usize,
    output_len: usize,
    seqs: usize,
    fits: usize,
    lockstep: bool,
) -> (DecodePlan, TtftPlan, f64) {
    let batch = seqs.min(fits).max(1);
    let mean_context = input_len as f64 + (output_len as f64 - 1.0) / 2.0;
    let decode_step = |rows: usize| cost.step_s(StepShape::decode(rows, mean_context));
    let step_s = decode_step(batch);
    let decode = DecodePlan {
        mean_context,
        batch1_tok_s: 1.0 / decode_step(1),
        batch,
        step_ms: step_s * 1e3,
        batch_tok_s: batch as f64 / step_s,
        per_stream_tok_s: 1.0 / step_s,
    };
    let isolated_s = step_s / 2.0
        + cost.step_s(StepShape::decode(batch - 1, mean_context).with_prompts(1, input_len));
    // A burst: `batch` prompts at once, as many whole prompts per step as the budget holds.
    let budget = batched_tokens(batch, input_len);
    let prompts_per_step = (budget / input_len).clamp(1, batch);
    let mut done_s = 0.0;
    let mut burst_sum_s = 0.0;
    let mut left = batch;
    while left > 0 {
        let n = left.min(prompts_per_step);
        done_s += cost.step_s(StepShape::default().with_prompts(n, input_len));
        burst_sum_s += done_s * n as f64;
        left -= n;
    }
    let burst_s = burst_sum_s / batch as f64;
    let ttft_s = if lockstep { burst_s } else { isolated_s };
    let request_s = ttft_s + (output_len as f64 - 1.0) * step_s;
    // Waves of `batch` beyond the first wait for whole requests ahead of them.
    let waves = seqs.div_ceil(batch);
    let seat_wait_s = (waves - 1) as f64 / 2.0 * request_s;
    let ttft = TtftPlan {
        isolated_ms: isolated_s * 1e3,
        burst_ms: burst_s * 1e3,
        prompts_per_step,
        seat_wait_ms: seat_wait_s * 1e3,
    };
    (decode, ttft, (request_s + seat_wait_s) * 1e3)
}

#[cfg(test)]
#[path = "estimate_tests.rs"]
mod tests;
