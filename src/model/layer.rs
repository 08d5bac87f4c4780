//! One transformer block's weights on one rank, loaded from a [`WeightSource`] by their GGUF
//! names: the fused QKV (with its bias, for Qwen2), O, the fused gate/up and down, the norms
//! (Gemma 2's sandwich norms too) and the layer's sliding window.

use super::config::ModelConfig;
use super::shard::row_parallel;
use super::weights::WeightSource;
use super::ModelError;
use crate::kernels::host::HostTensor;
use crate::kernels::Backend;
use crate::parallel::RankShard;

pub(super) struct Layer<B: Backend> {
    pub attn_norm: B::Vector,
    pub qkv: B::Linear,
    pub qkv_bias: Option<B::Vector>,
    pub o: B::Linear,
    pub ffn_norm: B::Vector,
    pub gate_up: B::Linear,
    pub down: B::Linear,
    /// Its sliding window, if it has one.
    pub window: Option<usize>,
    /// Gemma 2's norms of the attention's and the feed-forward's outputs, before each joins
    /// the residual.
    pub post_norms: Option<(B::Vector, B::Vector)>,
}

pub(super) fn load_layer<B: Backend>(
    c: &ModelConfig,
    weights: &dyn WeightSource,
    backend: &B,
    shard: &RankShard,
    l: usize,
) -> Result<Layer<B>, ModelError> {
    let (hid, h, kv, d) = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim);
    let kernel = |e: crate::kernels::KernelError| {
        ModelError::Invalid(format!("{}: {e}", weights.describe()))
    };
    let name = |t: &str| format!("blk.{l}.{t}");
    let q_rows = shard.q_heads.start * d..shard.q_heads.end * d;
    let kv_rows = shard.kv_heads.start * d..shard.kv_heads.end * d;
    let inter = c.intermediate_size;
    let vector = |t: &str| -> Result<B::Vector, ModelError> {
        backend
            .vector(&weights.require(&name(t), 1, hid)?)
            .map_err(kernel)
    };
    let qkv = backend
        .linear(vec![
            weights.require_rows(&name("attn_q.weight"), h * d, hid, q_rows.clone())?,
            weights.require_rows(&name("attn_k.weight"), kv * d, hid, kv_rows.clone())?,
            weights.require_rows(&name("attn_v.weight"), kv * d, hid, kv_rows.clone())?,
        ])
        .map_err(kernel)?;
    let qkv_bias = if c.attention_bias {
        let mut b = Vec::with_capacity(q_rows.len() + 2 * kv_rows.len());
        for (t, n, range) in [
            ("attn_q.bias", h * d, &q_rows),
            ("attn_k.bias", kv * d, &kv_rows),
            ("attn_v.bias", kv * d, &kv_rows),
        ] {
            b.extend(
                weights
                    .require_cols(&name(t), 1, n, range.clone())?
                    .to_f32(),
            );
        }
        let joined = HostTensor::from_f32(1, b.len(), &b);
        Some(backend.vector(&joined).map_err(kernel)?)
    } else {
        None
    };
    let post_norms = match c.gemma2 {
        Some(_) => Some((
            vector("post_attention_norm.weight")?,
            vector("post_ffw_norm.weight")?,
        )),
        None => None,
    };
    Ok(Layer {
        window: c.sliding_window.as_ref().and_then(|w| w.of_layer(l)),
        post_norms,
        attn_norm: vector("attn_norm.weight")?,
        qkv,
        qkv_bias,
        o: backend
            .linear(vec![row_parallel(
                weights,
                shard,
                &name("attn_output.weight"),
                hid,
                h * d,
                q_rows,
            )?])
            .map_err(kernel)?,
        ffn_norm: vector("ffn_norm.weight")?,
        gate_up: backend
            .linear(vec![
                weights.require_rows(&name("ffn_gate.weight"), inter, hid, shard.inter.clone())?,
                weights.require_rows(&name("ffn_up.weight"), inter, hid, shard.inter.clone())?,
            ])
            .map_err(kernel)?,
        down: backend
            .linear(vec![row_parallel(
                weights,
                shard,
                &name("ffn_down.weight"),
                hid,
                inter,
                shard.inter.clone(),
            )?])
            .map_err(kernel)?,
    })
}
