//! The ops the model's forward pass is written against.
//!
//! The Llama forward pass (`model/llama.rs`) is written once against `Backend`; the CPU
//! backend (`cpu/`) and the CUDA backend supply the ops. A backend owns the memory of its
//! activations, weights and KV cache; the model only names them through associated types.
//!
//! Activations are 2-D, `[rows, cols]`, one row per token of the batch. Linear layers follow
//! the `y = x · Wᵀ` convention with `W` stored `[out_features, in_features]`, so splitting a
//! layer by output features (column parallel) or input features (row parallel) across
//! tensor-parallel ranks is a matter of which rows or columns the loader hands over.

use super::host::HostTensor;
use super::sampling::{SampledRow, SamplingBatch};
use super::KernelError;

/// The geometry of the paged KV cache, shared by every layer.
///
/// Layout per layer, for K and for V: `[num_blocks, num_kv_heads, block_size, head_dim]`, so a
/// block's keys for one KV head are contiguous. A token's slot is
/// `block_id * block_size + offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheShape {
    pub num_layers: usize,
    pub num_blocks: usize,
    /// In tokens.
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// One sequence's part of a forward batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSeq {
    /// First row of this sequence's tokens in the batch.
    pub query_start: usize,
    /// Number of new tokens this step (1 for decode, a chunk or whole prompt for prefill).
    pub query_len: usize,
    /// Tokens in the KV cache once this step's tokens are written (cached prefix + new).
    pub context_len: usize,
    /// Block ids holding the sequence's KV, in token order.
    pub block_table: Vec<u32>,
    /// Length of the sequence's prompt (0 where unknown). Only the ggml-compatible CPU
    /// numerics read it: llama.cpp attends from prompt tokens it processes in batches of 64 or
    /// more with another kernel than from tokens it decodes one at a time.
    pub prompt_len: usize,
}

/// Everything one forward pass needs, flat: what the engine's runner builds from a step plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardBatch {
    /// `[num_tokens]`
    pub token_ids: Vec<u32>,
    /// `[num_tokens]` position of each token in its sequence.
    pub positions: Vec<u32>,
    /// `[num_tokens]` KV-cache slot each token's K and V are written to.
    pub slot_mapping: Vec<u32>,
    pub seqs: Vec<BatchSeq>,
    /// Rows whose logits are wanted (usually each sequence's last token), in output order.
    pub logits_rows: Vec<u32>,
    /// Rows whose final-norm hidden states are wanted (embeddings), in output order.
    pub hidden_rows: Vec<u32>,
}

impl ForwardBatch {
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// A synthetic batch for timing a forward pass (the forward bench, the planner's probe):
    /// `rows` sequences, sequence `i` owning blocks `[i * per_seq, (i + 1) * per_seq)` of
    /// `block_size` slots, each computing positions `start..end`, with token ids below 1,010
    /// (valid in any real vocabulary; the speed does not depend on them).
    pub fn synthetic(
        rows: usize,
        per_seq: usize,
        block_size: usize,
        start: usize,
        end: usize,
    ) -> Self {
        let mut b = ForwardBatch::default();
        for i in 0..rows {
            let table: Vec<u32> = (0..per_seq).map(|j| (i * per_seq + j) as u32).collect();
            let query_start = b.token_ids.len();
            for p in start..end {
                b.token_ids.push(((p * 31 + i * 7) % 1000 + 10) as u32);
                b.positions.push(p as u32);
                b.slot_mapping
                    .push(table[p / block_size] * block_size as u32 + (p % block_size) as u32);
            }
            b.logits_rows.push((b.token_ids.len() - 1) as u32);
            b.seqs.push(BatchSeq {
                query_start,
                query_len: end - start,
                context_len: end,
                block_table: table,
                prompt_len: 0,
            });
        }
        b
    }
}

/// How RoPE rotates a head's dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// Inverse frequency per rotated pair, `[head_dim / 2]`.
    pub inv_freqs: Vec<f32>,
    /// Pairs `(2i, 2i+1)` when true, `(i, i + d/2)` when false.
    pub interleaved: bool,
    /// The frequency base and per-pair frequency divisors (GGUF `rope_freqs`) that
    /// `inv_freqs` came from: ggml-compatible numerics derive the angles from these.
    pub theta_base: f32,
    pub freq_factors: Option<Vec<f32>>,
}

/// Attention geometry of one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// A sliding window: each query attends to its last `window` positions, its own included
    /// (transformers' `kv_idx > q_idx - sliding_window`). Only where
    /// [`Backend::attends_sliding_windows`]; `None` attends to the whole context.
    pub window: Option<usize>,
    /// Scores become `cap · tanh(score / cap)` before the mask (Gemma 2). Only where
    /// [`Backend::runs_gemma2`].
    pub softcap: Option<f32>,
}

pub trait Backend: Send + Sync + 'static {
    /// Activations `[rows, cols]` in f32 (or the backend's compute type).
    type Tensor: Send;
    /// A linear layer's weight in the backend's storage format.
    type Linear: Send + Sync;
    /// A 1-D weight (norm gains, biases).
    type Vector: Send + Sync;
    /// A token-embedding table, read by rows (never multiplied, so never prepared for matmul).
    type Embedding: Send + Sync;
    /// The KV cache of all layers.
    type KvCache: Send;
    /// Per-step metadata moved to where the ops need it (positions, slots, block tables).
    type Step;

    /// A short description for logs, e.g. `cpu (2 threads, avx512-vnni)`.
    fn describe(&self) -> String;

    /// A linear layer whose output features are the concatenation of `parts` (fused QKV or
    /// gate/up), each `[out_i, in]`, possibly of different storage types.
    fn linear(&self, parts: Vec<HostTensor>) -> Result<Self::Linear, KernelError>;
    fn vector(&self, t: &HostTensor) -> Result<Self::Vector, KernelError>;
    /// A `[vocab, hidden]` embedding table.
    fn embedding(&self, table: HostTensor) -> Result<Self::Embedding, KernelError>;
    fn kv_cache(&self, shape: KvCacheShape) -> Result<Self::KvCache, KernelError>;
    /// What [`Backend::kv_cache`] stores, which sizes the KV budget (f16 and bf16 alike
    /// take two bytes a value).
    fn kv_cache_dtype(&self) -> super::dtype::KvCacheDtype {
        super::dtype::KvCacheDtype::F16
    }
    /// Whether `attention` honours `AttentionShape::window`. Where it does not, a model with
    /// a sliding window is served only up to the window, where windowed attention equals full.
    fn attends_sliding_windows(&self) -> bool {
        false
    }
    /// Whether this backend has Gemma 2's ops: [`Backend::gelu_tanh_mul`],
    /// [`Backend::scale`], [`Backend::softcap`] and `AttentionShape::softcap`. The model
    /// refuses to load Gemma 2 where it does not, so the others are never called.
    fn runs_gemma2(&self) -> bool {
        false
    }
    /// An empty activation tensor, resized by the ops as needed.
    fn tensor(&self) -> Self::Tensor;

    /// A second backend on the same device with the same settings, for a second model that
    /// runs in turn with this one's (a speculative draft model); on the CPU it shares the
    /// thread pool.
    fn sibling(&self) -> Result<Self, KernelError>
    where
        Self: Sized,
    {
        Err(KernelError::Unsupported(format!(
            "a second model (a draft model) on {} is not built yet",
            self.describe()
        )))
    }

    fn prepare_step(&self, batch: &ForwardBatch, rope: &Rope) -> Self::Step;

    /// `out[t] = table[token_ids[t]]`, the table being `[vocab, hidden]`.
    fn embed(&self, table: &Self::Embedding, step: &Self::Step, out: &mut Self::Tensor);
    /// `out = rms_norm(x) * w`.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Vector, eps: f32, out: &mut Self::Tensor);
    /// `residual += delta; out = rms_norm(residual) * w`.
    fn add_rms_norm(
        &self,
        residual: &mut Self::Tensor,
        delta: &Self::Tensor,
        w: &Self::Vector,
        eps: f32,
        out: &mut Self::Tensor,
    );
    /// `out = x · Wᵀ (+ bias)`.
    fn matmul(
        &self,
        x: &Self::Tensor,
        w: &Self::Linear,
        bias: Option<&Self::Vector>,
        out: &mut Self::Tensor,
    );
    /// Takes `qkv` (`[tokens, (heads + 2 kv_heads) * head_dim]`), rotates Q and K by each
    /// token's position, writes K and V into their KV-cache slots, and attends each query
    /// over its sequence's cached context (causal), writing `[tokens, heads * head_dim]`.
    fn attention(
        &self,
        qkv: &mut Self::Tensor,
        shape: AttentionShape,
        layer: usize,
        kv: &mut Self::KvCache,
        step: &Self::Step,
        out: &mut Self::Tensor,
    );
    /// `out = silu(gate) * up` for `gate_up = [gate | up]` (`[tokens, 2 * inter]`).
    fn silu_mul(&self, gate_up: &Self::Tensor, out: &mut Self::Tensor);
    /// `out = gelu_tanh(gate) * up` for `gate_up = [gate | up]` (Gemma 2; only where
    /// [`Backend::runs_gemma2`]).
    fn gelu_tanh_mul(&self, _gate_up: &Self::Tensor, _out: &mut Self::Tensor) {
        unreachable!("{}: no Gemma 2 ops (runs_gemma2 is false)", self.describe())
    }
    /// `x *= by` (Gemma 2's embedding scale; only where [`Backend::runs_gemma2`]).
    fn scale(&self, _x: &mut Self::Tensor, _by: f32) {
        unreachable!("{}: no Gemma 2 ops (runs_gemma2 is false)", self.describe())
    }
    /// `x = cap · tanh(x / cap)` (Gemma 2's final logits; only where
    /// [`Backend::runs_gemma2`]).
    fn softcap(&self, _x: &mut Self::Tensor, _cap: f32) {
        unreachable!("{}: no Gemma 2 ops (runs_gemma2 is false)", self.describe())
    }
    /// Keeps only the rows named by the step's `logits_rows`.
    fn gather_logits_rows(&self, x: &Self::Tensor, step: &Self::Step, out: &mut Self::Tensor);
    /// Copies whole KV blocks `(src, dst)` in every layer (copy-on-write forks).
    fn copy_blocks(&self, kv: &mut Self::KvCache, copies: &[(u32, u32)]);
    /// The tensor's values on the host, row-major.
    fn to_host(&self, x: &Self::Tensor) -> Vec<f32>;

    /// Runs `f(i)` for every `i` in `0..tasks` on the backend's host threads (the CPU's
    /// pool), or in order on the caller where the backend has none: for host work beside the
    /// model, like sampling many rows.
    fn host_parallel(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        (0..tasks).for_each(f);
    }

    /// Called by the model before issuing a step's ops (one rank only): `true` when the
    /// backend replayed a recorded copy of them (a CUDA graph) and `logits` already holds the
    /// step's logits, so the ops must not be issued. A backend may instead start recording.
    fn begin_step_ops(
        &self,
        _step: &Self::Step,
        _kv: &Self::KvCache,
        _logits: &mut Self::Tensor,
    ) -> bool {
        false
    }

    /// Called after the LM head of a step whose ops were issued: ends a recording (and runs
    /// it) and drops any padding rows from `logits`.
    fn end_step_ops(&self, _step: &Self::Step, _logits: &mut Self::Tensor) {}

    /// Whether `sample` runs on this device. When false, the caller downloads the logits
    /// (`to_host`) and samples on the host with its per-sequence samplers (the CPU: its
    /// sampler is tuned for the host and keeps its own generators).
    fn samples_on_device(&self) -> bool {
        false
    }

    /// Samples one token per row of `logits` (`[rows.len(), vocab]`, the LM head's output)
    /// with `rows`' parameters, where the logits are: only ids and the requested logprobs
    /// cross to the host. A NaN row gives a NaN `logprob`.
    fn sample(
        &self,
        logits: &Self::Tensor,
        rows: &SamplingBatch,
    ) -> Result<Vec<SampledRow>, KernelError> {
        let _ = (logits, rows);
        Err(KernelError::Unsupported(format!(
            "{} does not sample on the device",
            self.describe()
        )))
    }
}
