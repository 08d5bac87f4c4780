//! The Llama-family forward pass, written once against `Backend`.
//!
//! One call runs every token of a `ForwardBatch` (prefill chunks and decode tokens of many
//! sequences alike) through all layers and returns the logits of the rows the batch asks for
//! (`forward_logits` leaves them on the device, for the backend to sample there).
//!
//! ```text
//! x = embed(ids)
//! for each layer:  h = rms_norm(x);  x += o(attention(rope(qkv(h))))
//!                  h = rms_norm(x);  x += down(silu(gate(h)) * up(h))
//! logits = lm_head(rms_norm(x)[logits_rows])
//! ```
//! Q, K and V are one fused linear, as are gate and up; a residual add is fused into the
//! next norm. Gemma 2 (`ModelConfig::gemma2`) scales the embeddings, norms each sublayer's
//! output before it joins `x`, gates with GELU and soft-caps scores and logits.
//!
//! A `Llama` is one rank's part of the model (`RankShard`; the whole model for one rank). On a
//! tensor-parallel rank Q/K/V and gate/up hold its heads' and columns' output features, O and
//! down its input features: their outputs are partial sums, all-reduced (the only two
//! collectives of a layer). The embedding and LM head hold its vocabulary rows: the embedding
//! is all-reduced (one rank holds each token's row, the others add zeros), the logits are
//! all-gathered. A pipeline stage holds its layers only; it receives the residual stream and
//! the pending delta from the previous stage and sends them to the next, so the fused
//! add+norm runs exactly as in one rank.

use super::config::ModelConfig;
use super::layer::{load_layer, Layer};
use super::shard::{embedding_shard, remap_token_ids, row_parallel_matmul};
use super::weights::WeightSource;
use super::{HostOutput, ModelError};
use crate::kernels::dtype::WeightDType;
use crate::kernels::{AttentionShape, Backend, ForwardBatch, KvCacheShape, Rope};
use crate::parallel::{Communicator, RankShard, SoloComm, TpMode};

/// Reused activation buffers of one forward pass.
struct Buffers<B: Backend> {
    residual: B::Tensor,
    normed: B::Tensor,
    qkv: B::Tensor,
    attn: B::Tensor,
    delta: B::Tensor,
    /// A sublayer's output after its own norm (Gemma 2), swapped into `delta`.
    post_normed: B::Tensor,
    gate_up: B::Tensor,
    act: B::Tensor,
    last: B::Tensor,
    logits: B::Tensor,
}

pub struct Llama<B: Backend> {
    pub config: ModelConfig,
    shard: RankShard,
    comm: Box<dyn Communicator<B>>,
    backend: B,
    /// First stage only.
    embed: Option<B::Embedding>,
    /// This stage's layers, `shard.layers`.
    layers: Vec<Layer<B>>,
    /// Last stage only: the final norm and this rank's vocabulary rows of the LM head.
    head: Option<(B::Vector, B::Linear)>,
    rope: Rope,
    attn_shape: AttentionShape,
    /// Gemma 2's embedding scale, √hidden rounded to the table's type.
    embed_scale: Option<f32>,
    buffers: Buffers<B>,
    /// The batch with token ids remapped to this rank's vocabulary rows (vocabulary split).
    local_batch: ForwardBatch,
    /// Gathered activations (`TpMode::Gather`) and logits.
    gathered: B::Tensor,
    /// Which buffer holds the last pass's logits.
    logits_at: LogitsAt,
    /// The last pass's final-norm rows its batch asked for (`hidden_rows`), on the host.
    hidden: Vec<f32>,
}

/// Where the last forward pass left its logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogitsAt {
    Nowhere,
    /// `buffers.logits` (one TP rank).
    Logits,
    /// `gathered` (the TP ranks' vocabulary columns joined).
    Gathered,
}

/// The whole model's shard: one rank, every layer.
pub fn whole_shard(c: &ModelConfig) -> RankShard {
    RankShard {
        rank: 0,
        tp_rank: 0,
        tp_size: 1,
        stage: 0,
        pp_size: 1,
        tp_mode: TpMode::Gather,
        q_heads: 0..c.num_heads,
        kv_heads: 0..c.num_kv_heads,
        inter: 0..c.intermediate_size,
        vocab: 0..c.vocab_size,
        hidden: 0..c.hidden_size,
        layers: 0..c.num_layers,
    }
}

/// A sequence no longer than the sliding window attends exactly as with full attention, so on
/// a backend without windowed attention a windowed model is served up to its window.
fn serve_within_the_window(config: &mut ModelConfig, backend: &str) {
    if let Some(window) = config.sliding_window.take() {
        tracing::warn!(
            "sliding_window {}: {backend} has no windowed attention, so it serves up to {} \
             tokens of context (the model was trained for {})",
            window.size,
            window.size,
            config.max_position_embeddings
        );
        config.max_position_embeddings = window.size;
    }
}

impl<B: Backend> Llama<B> {
    /// The whole model on one rank.
    pub fn load(
        config: ModelConfig,
        weights: &dyn WeightSource,
        backend: B,
    ) -> Result<Self, ModelError> {
        let shard = whole_shard(&config);
        Self::load_rank(config, weights, backend, shard, Box::new(SoloComm))
    }

    /// One rank's part of the model, reading only its shard of each tensor.
    pub fn load_rank(
        config: ModelConfig,
        weights: &dyn WeightSource,
        backend: B,
        shard: RankShard,
        comm: Box<dyn Communicator<B>>,
    ) -> Result<Self, ModelError> {
        let mut config = config;
        if config.gemma2.is_some() && !backend.runs_gemma2() {
            return Err(ModelError::Unsupported(format!(
                "{}: Gemma 2 runs on the CPU backend with sluice's numerics only, not on {}",
                weights.describe(),
                backend.describe()
            )));
        }
        if !backend.attends_sliding_windows() {
            serve_within_the_window(&mut config, &backend.describe());
        }
        let c = &config;
        let hid = c.hidden_size;
        let kernel = |e: crate::kernels::KernelError| {
            ModelError::Invalid(format!("{}: {e}", weights.describe()))
        };
        let layers = shard
            .layers
            .clone()
            .map(|l| load_layer(c, weights, &backend, &shard, l))
            .collect::<Result<Vec<_>, _>>()?;
        let mut embed_scale = None;
        let embed = if shard.is_first_stage() {
            let t = embedding_shard(weights, "token_embd.weight", c, &shard)?;
            if c.gemma2.is_some() {
                embed_scale = Some(gemma2_embed_scale(hid, t.dtype));
            }
            Some(backend.embedding(t).map_err(kernel)?)
        } else {
            None
        };
        let head = if shard.is_last_stage() {
            let name = match weights.dtype_of("output.weight")? {
                Some(_) => "output.weight",
                None => "token_embd.weight",
            };
            let t = weights.require_rows(name, c.vocab_size, hid, shard.vocab.clone())?;
            let norm = weights.require("output_norm.weight", 1, hid)?;
            Some((
                backend.vector(&norm).map_err(kernel)?,
                backend.linear(vec![t]).map_err(kernel)?,
            ))
        } else {
            None
        };
        let freq_factors = weights.get("rope_freqs.weight")?.map(|t| t.to_f32());
        let rope = Rope {
            inv_freqs: c.rope_inv_freqs(freq_factors.as_deref()),
            interleaved: c.rope_style == super::config::RopeStyle::Interleaved,
            theta_base: c.rope_theta,
            freq_factors,
        };
        let attn_shape = AttentionShape {
            num_heads: shard.q_heads.len(),
            num_kv_heads: shard.kv_heads.len(),
            head_dim: c.head_dim,
            scale: match c.gemma2 {
                Some(g) => 1.0 / g.query_pre_attn_scalar.sqrt(),
                None => 1.0 / (c.head_dim as f32).sqrt(),
            },
            window: None,
            softcap: c.gemma2.and_then(|g| g.attn_logit_softcap),
        };
        let gathered = backend.tensor();
        let buffers = Buffers {
            residual: backend.tensor(),
            normed: backend.tensor(),
            qkv: backend.tensor(),
            attn: backend.tensor(),
            delta: backend.tensor(),
            post_normed: backend.tensor(),
            gate_up: backend.tensor(),
            act: backend.tensor(),
            last: backend.tensor(),
            logits: backend.tensor(),
        };
        Ok(Self {
            embed,
            layers,
            head,
            rope,
            attn_shape,
            embed_scale,
            buffers,
            backend,
            config,
            shard,
            comm,
            local_batch: ForwardBatch::default(),
            gathered,
            logits_at: LogitsAt::Nowhere,
            hidden: Vec::new(),
        })
    }

    pub fn shard(&self) -> &RankShard {
        &self.shard
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// A KV cache of `num_blocks` blocks of `block_size` tokens for this rank's layers and
    /// KV heads.
    pub fn kv_cache(&self, num_blocks: usize, block_size: usize) -> Result<B::KvCache, ModelError> {
        self.backend
            .kv_cache(KvCacheShape {
                num_layers: self.layers.len(),
                num_blocks,
                block_size,
                num_kv_heads: self.shard.kv_heads.len(),
                head_dim: self.config.head_dim,
            })
            .map_err(ModelError::Kernel)
    }

    /// Runs the batch and returns the logits of its `logits_rows`, `[rows, vocab]` row-major.
    ///
    /// For a model of one rank (whose communicator never fails); ranks use `forward_rank`.
    pub fn forward(&mut self, batch: &ForwardBatch, kv: &mut B::KvCache) -> Vec<f32> {
        match self.forward_rank(batch, kv) {
            Ok(out) => out.logits,
            Err(e) => {
                tracing::error!("forward pass failed: {e}");
                Vec::new()
            }
        }
    }

    /// This rank's part of the forward pass. Returns the gathered logits and the asked-for
    /// hidden rows on the last stage (every TP rank of it), nothing on earlier stages (their
    /// output went to the next stage). Every rank of the group must run the same batch.
    pub fn forward_rank(
        &mut self,
        batch: &ForwardBatch,
        kv: &mut B::KvCache,
    ) -> Result<HostOutput, ModelError> {
        self.forward_logits(batch, kv)?;
        Ok(HostOutput {
            logits: (self.logits()).map_or_else(Vec::new, |t| self.backend.to_host(t)),
            hidden: self.take_hidden(),
        })
    }

    /// The final-norm rows the last pass's batch asked for (`hidden_rows`), `[rows, hidden]`;
    /// empty on earlier stages and once taken.
    pub fn take_hidden(&mut self) -> Vec<f32> {
        std::mem::take(&mut self.hidden)
    }

    /// The logits of the last forward pass where the backend left them (`[rows, vocab]`),
    /// until the next pass: `None` on earlier stages or when no row asked for logits.
    pub fn logits(&self) -> Option<&B::Tensor> {
        match self.logits_at {
            LogitsAt::Nowhere => None,
            LogitsAt::Logits => Some(&self.buffers.logits),
            LogitsAt::Gathered => Some(&self.gathered),
        }
    }

    /// `forward_rank` without the download: the logits stay on the device (`logits()`), so
    /// the backend can sample them there.
    pub fn forward_logits(
        &mut self,
        batch: &ForwardBatch,
        kv: &mut B::KvCache,
    ) -> Result<(), ModelError> {
        self.logits_at = LogitsAt::Nowhere;
        self.hidden.clear();
        let be = &self.backend;
        let comm = &mut self.comm;
        let eps = self.config.rms_norm_eps;
        // Gemma 2 gates with GELU (tanh), the others with SiLU.
        let gelu = self.config.gemma2.is_some();
        let b = &mut self.buffers;
        let g = &mut self.gathered;
        let gather = match (self.shard.tp_size, self.shard.tp_mode) {
            (1, _) => None,
            (_, TpMode::AllReduce) => Some(false),
            (_, TpMode::Gather) => Some(true),
        };
        let split_vocab = self.shard.tp_size > 1 && self.embed.is_some();
        let step = if split_vocab {
            self.local_batch.clone_from(batch);
            remap_token_ids(&self.shard, &mut self.local_batch.token_ids);
            be.prepare_step(&self.local_batch, &self.rope)
        } else {
            be.prepare_step(batch, &self.rope)
        };
        // CUDA graphs (one rank only: collectives are not recorded): a replay skips the ops.
        let solo = self.shard.tp_size == 1 && self.shard.pp_size == 1;
        // (A graph has no op that brings hidden rows back: steps that want them run the ops.)
        let graphs = solo && batch.hidden_rows.is_empty();
        if graphs && be.begin_step_ops(&step, kv, &mut b.logits) {
            self.logits_at = LogitsAt::Logits;
            return Ok(());
        }
        let first_stage = match &self.embed {
            Some(embed) => {
                be.embed(embed, &step, &mut b.residual);
                if split_vocab {
                    comm.all_reduce_sum(be, &mut b.residual)?;
                }
                if let Some(by) = self.embed_scale {
                    be.scale(&mut b.residual, by);
                }
                true
            }
            None => {
                comm.recv_prev(be, &mut b.residual)?;
                comm.recv_prev(be, &mut b.delta)?;
                false
            }
        };
        for (i, layer) in self.layers.iter().enumerate() {
            if first_stage && i == 0 {
                be.rms_norm(&b.residual, &layer.attn_norm, eps, &mut b.normed);
            } else {
                be.add_rms_norm(
                    &mut b.residual,
                    &b.delta,
                    &layer.attn_norm,
                    eps,
                    &mut b.normed,
                );
            }
            be.matmul(&b.normed, &layer.qkv, layer.qkv_bias.as_ref(), &mut b.qkv);
            let shape = AttentionShape {
                window: layer.window,
                ..self.attn_shape
            };
            be.attention(&mut b.qkv, shape, i, kv, &step, &mut b.attn);
            row_parallel_matmul(be, comm, gather, &b.attn, &layer.o, &mut b.delta, g)?;
            if let Some((post_attn, _)) = &layer.post_norms {
                be.rms_norm(&b.delta, post_attn, eps, &mut b.post_normed);
                std::mem::swap(&mut b.delta, &mut b.post_normed);
            }
            be.add_rms_norm(
                &mut b.residual,
                &b.delta,
                &layer.ffn_norm,
                eps,
                &mut b.normed,
            );
            be.matmul(&b.normed, &layer.gate_up, None, &mut b.gate_up);
            if gelu {
                be.gelu_tanh_mul(&b.gate_up, &mut b.act);
            } else {
                be.silu_mul(&b.gate_up, &mut b.act);
            }
            row_parallel_matmul(be, comm, gather, &b.act, &layer.down, &mut b.delta, g)?;
            if let Some((_, post_ffn)) = &layer.post_norms {
                be.rms_norm(&b.delta, post_ffn, eps, &mut b.post_normed);
                std::mem::swap(&mut b.delta, &mut b.post_normed);
            }
        }
        let Some((norm, lm_head)) = &self.head else {
            comm.send_next(be, &b.residual)?;
            comm.send_next(be, &b.delta)?;
            return Ok(());
        };
        if batch.logits_rows.is_empty() && batch.hidden_rows.is_empty() {
            return Ok(());
        }
        be.add_rms_norm(&mut b.residual, &b.delta, norm, eps, &mut b.normed);
        if !batch.hidden_rows.is_empty() {
            let normed = be.to_host(&b.normed);
            let hid = self.config.hidden_size;
            for &r in &batch.hidden_rows {
                let r = r as usize * hid;
                self.hidden.extend_from_slice(&normed[r..r + hid]);
            }
        }
        if batch.logits_rows.is_empty() {
            return Ok(());
        }
        be.gather_logits_rows(&b.normed, &step, &mut b.last);
        be.matmul(&b.last, lm_head, None, &mut b.logits);
        if let Some(cap) = self.config.gemma2.and_then(|g| g.final_logit_softcap) {
            be.softcap(&mut b.logits, cap);
        }
        if graphs {
            be.end_step_ops(&step, &mut b.logits);
        }
        if self.shard.tp_size == 1 {
            self.logits_at = LogitsAt::Logits;
            return Ok(());
        }
        comm.all_gather_cols(be, &b.logits, g)?;
        self.logits_at = LogitsAt::Gathered;
        Ok(())
    }

    /// Marks this rank's group broken (after a failed or abandoned step), so that peers
    /// blocked in a collective return instead of waiting.
    pub fn abort(&mut self) {
        self.comm.abort();
    }

    /// Copies KV blocks `(src, dst)` in every layer (copy-on-write of shared blocks).
    pub fn copy_blocks(&self, kv: &mut B::KvCache, copies: &[(u32, u32)]) {
        if !copies.is_empty() {
            self.backend.copy_blocks(kv, copies);
        }
    }
}

/// Gemma 2's embedding scale: √hidden in the embedding table's type, as `transformers`
/// multiplies (`bf16(√2304)` = 48, `bf16(√3584)` = 60).
fn gemma2_embed_scale(hidden: usize, table: WeightDType) -> f32 {
    let s = (hidden as f32).sqrt();
    match table {
        WeightDType::BF16 => half::bf16::from_f32(s).to_f32(),
        WeightDType::F16 => half::f16::from_f32(s).to_f32(),
        _ => s,
    }
}
