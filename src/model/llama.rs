//! The Llama-family forward pass, written once against `Backend`.
//!
//! One call runs every token of a `ForwardBatch` (prefill chunks and decode tokens of many
//! sequences alike) through all layers and returns the logits of the rows the batch asks for.
//!
//! ```text
//! x = embed(ids)
//! for each layer:  h = rms_norm(x);  x += o(attention(rope(qkv(h))))
//!                  h = rms_norm(x);  x += down(silu(gate(h)) * up(h))
//! logits = lm_head(rms_norm(x)[logits_rows])
//! ```
//! Q, K and V are one fused linear, as are gate and up; a residual add is fused into the
//! next norm.

use super::config::ModelConfig;
use super::weights::WeightSource;
use super::ModelError;
use crate::kernels::{AttentionShape, Backend, ForwardBatch, KvCacheShape, Rope};

struct Layer<B: Backend> {
    attn_norm: B::Vector,
    qkv: B::Linear,
    qkv_bias: Option<B::Vector>,
    o: B::Linear,
    ffn_norm: B::Vector,
    gate_up: B::Linear,
    down: B::Linear,
}

/// Reused activation buffers of one forward pass.
struct Buffers<B: Backend> {
    residual: B::Tensor,
    normed: B::Tensor,
    qkv: B::Tensor,
    attn: B::Tensor,
    delta: B::Tensor,
    gate_up: B::Tensor,
    act: B::Tensor,
    last: B::Tensor,
    logits: B::Tensor,
}

pub struct Llama<B: Backend> {
    pub config: ModelConfig,
    backend: B,
    embed: B::Embedding,
    layers: Vec<Layer<B>>,
    norm: B::Vector,
    lm_head: B::Linear,
    rope: Rope,
    attn_shape: AttentionShape,
    buffers: Buffers<B>,
}

impl<B: Backend> Llama<B> {
    pub fn load(
        config: ModelConfig,
        weights: &dyn WeightSource,
        backend: B,
    ) -> Result<Self, ModelError> {
        let c = &config;
        let (hid, h, kv, d) = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim);
        let kernel = |e: crate::kernels::KernelError| {
            ModelError::Invalid(format!("{}: {e}", weights.describe()))
        };
        let vector = |name: &str, len: usize| -> Result<B::Vector, ModelError> {
            backend
                .vector(&weights.require(name, 1, len)?)
                .map_err(kernel)
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let name = |t: &str| format!("blk.{l}.{t}");
            let qkv = backend
                .linear(vec![
                    weights.require(&name("attn_q.weight"), h * d, hid)?,
                    weights.require(&name("attn_k.weight"), kv * d, hid)?,
                    weights.require(&name("attn_v.weight"), kv * d, hid)?,
                ])
                .map_err(kernel)?;
            let qkv_bias = if c.attention_bias {
                let mut b = Vec::with_capacity((h + 2 * kv) * d);
                for (t, n) in [
                    ("attn_q.bias", h * d),
                    ("attn_k.bias", kv * d),
                    ("attn_v.bias", kv * d),
                ] {
                    b.extend(weights.require(&name(t), 1, n)?.to_f32());
                }
                let joined = crate::kernels::host::HostTensor::from_f32(1, b.len(), &b);
                Some(backend.vector(&joined).map_err(kernel)?)
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: vector(&name("attn_norm.weight"), hid)?,
                qkv,
                qkv_bias,
                o: backend
                    .linear(vec![weights.require(
                        &name("attn_output.weight"),
                        hid,
                        h * d,
                    )?])
                    .map_err(kernel)?,
                ffn_norm: vector(&name("ffn_norm.weight"), hid)?,
                gate_up: backend
                    .linear(vec![
                        weights.require(&name("ffn_gate.weight"), c.intermediate_size, hid)?,
                        weights.require(&name("ffn_up.weight"), c.intermediate_size, hid)?,
                    ])
                    .map_err(kernel)?,
                down: backend
                    .linear(vec![weights.require(
                        &name("ffn_down.weight"),
                        hid,
                        c.intermediate_size,
                    )?])
                    .map_err(kernel)?,
            });
        }
        let embed_t = weights.require("token_embd.weight", c.vocab_size, hid)?;
        let lm_head_t = match weights.get("output.weight")? {
            Some(_) => weights.require("output.weight", c.vocab_size, hid)?,
            None => embed_t.clone(),
        };
        let freq_factors = weights.get("rope_freqs.weight")?.map(|t| t.to_f32());
        let rope = Rope {
            inv_freqs: c.rope_inv_freqs(freq_factors.as_deref()),
            interleaved: c.rope_style == super::config::RopeStyle::Interleaved,
        };
        let attn_shape = AttentionShape {
            num_heads: h,
            num_kv_heads: kv,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let buffers = Buffers {
            residual: backend.tensor(),
            normed: backend.tensor(),
            qkv: backend.tensor(),
            attn: backend.tensor(),
            delta: backend.tensor(),
            gate_up: backend.tensor(),
            act: backend.tensor(),
            last: backend.tensor(),
            logits: backend.tensor(),
        };
        Ok(Self {
            embed: backend.embedding(embed_t).map_err(kernel)?,
            lm_head: backend.linear(vec![lm_head_t]).map_err(kernel)?,
            norm: vector("output_norm.weight", hid)?,
            layers,
            rope,
            attn_shape,
            buffers,
            backend,
            config,
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// A KV cache of `num_blocks` blocks of `block_size` tokens for this model.
    pub fn kv_cache(&self, num_blocks: usize, block_size: usize) -> Result<B::KvCache, ModelError> {
        self.backend
            .kv_cache(KvCacheShape {
                num_layers: self.config.num_layers,
                num_blocks,
                block_size,
                num_kv_heads: self.config.num_kv_heads,
                head_dim: self.config.head_dim,
            })
            .map_err(|e| ModelError::Invalid(e.to_string()))
    }

    /// Runs the batch and returns the logits of its `logits_rows`, `[rows, vocab]` row-major.
    pub fn forward(&mut self, batch: &ForwardBatch, kv: &mut B::KvCache) -> Vec<f32> {
        let be = &self.backend;
        let eps = self.config.rms_norm_eps;
        let b = &mut self.buffers;
        let step = be.prepare_step(batch, &self.rope);
        be.embed(&self.embed, &step, &mut b.residual);
        for (i, layer) in self.layers.iter().enumerate() {
            if i == 0 {
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
            be.attention(&mut b.qkv, self.attn_shape, i, kv, &step, &mut b.attn);
            be.matmul(&b.attn, &layer.o, None, &mut b.delta);
            be.add_rms_norm(
                &mut b.residual,
                &b.delta,
                &layer.ffn_norm,
                eps,
                &mut b.normed,
            );
            be.matmul(&b.normed, &layer.gate_up, None, &mut b.gate_up);
            be.silu_mul(&b.gate_up, &mut b.act);
            be.matmul(&b.act, &layer.down, None, &mut b.delta);
        }
        if batch.logits_rows.is_empty() {
            return Vec::new();
        }
        be.add_rms_norm(&mut b.residual, &b.delta, &self.norm, eps, &mut b.normed);
        be.gather_logits_rows(&b.normed, &step, &mut b.last);
        be.matmul(&b.last, &self.lm_head, None, &mut b.logits);
        be.to_host(&b.logits)
    }

    /// Copies KV blocks `(src, dst)` in every layer (copy-on-write of shared blocks).
    pub fn copy_blocks(&self, kv: &mut B::KvCache, copies: &[(u32, u32)]) {
        if !copies.is_empty() {
            self.backend.copy_blocks(kv, copies);
        }
    }
}
