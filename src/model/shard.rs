//! A rank's part of the model read from its weight source: the partition (`parallel::
//! partition`) applied to tensor names. Column-parallel weights (Q/K/V, gate/up, the LM head
//! and the embedding by vocabulary) are row ranges of the file; row-parallel weights (O, down)
//! are column ranges on quantization-block boundaries.

use std::sync::Arc;

use super::config::ModelConfig;
use super::weights::WeightSource;
use super::ModelError;
use crate::kernels::host::{HostTensor, WeightBytes};
use crate::kernels::Backend;
use crate::parallel::comm::Communicator;
use crate::parallel::partition::{self, ModelDims};
use crate::parallel::{ParallelConfig, RankShard, TpMode};

/// The model's dimensions as the partition needs them, with the block sizes of the weights
/// split by input columns.
pub fn model_dims(c: &ModelConfig, weights: &dyn WeightSource) -> Result<ModelDims, ModelError> {
    let block_len = |name: &str| -> Result<usize, ModelError> {
        Ok(weights.dtype_of(name)?.map_or(1, |d| d.block_len()))
    };
    // Every layer is checked: GGUF files may mix types per layer (Q4_K_M keeps some in Q6_K).
    let mut down_block_len = 1;
    let mut o_block_len = 1;
    for l in 0..c.num_layers {
        down_block_len = down_block_len.max(block_len(&format!("blk.{l}.ffn_down.weight"))?);
        o_block_len = o_block_len.max(block_len(&format!("blk.{l}.attn_output.weight"))?);
    }
    let (hid, h, kv, d) = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim);
    let embed_params = c.vocab_size * hid;
    Ok(ModelDims {
        num_layers: c.num_layers,
        hidden_size: hid,
        num_heads: h,
        num_kv_heads: kv,
        intermediate_size: c.intermediate_size,
        vocab_size: c.vocab_size,
        down_block_len,
        o_block_len,
        head_dim: d,
        layer_params: hid * (2 * h * d + 2 * kv * d) + 3 * hid * c.intermediate_size + 2 * hid,
        embed_params,
        lm_head_params: embed_params + hid,
    })
}

/// Every rank's shard, or a start-up error naming the valid sizes.
pub fn plan_ranks(
    c: &ModelConfig,
    weights: &dyn WeightSource,
    cfg: ParallelConfig,
) -> Result<Vec<RankShard>, ModelError> {
    if c.num_heads == 0 || c.num_kv_heads == 0 || !c.num_heads.is_multiple_of(c.num_kv_heads) {
        return Err(ModelError::Invalid(format!(
            "{} query heads do not group over {} KV heads",
            c.num_heads, c.num_kv_heads
        )));
    }
    partition::plan(&model_dims(c, weights)?, cfg).map_err(|e| ModelError::Invalid(e.to_string()))
}

/// The `[hidden, vocab rows]` part of a table held by a vocabulary-split rank, with one zero
/// row appended when the rank holds only part of the vocabulary: tokens outside its range
/// are looked up there, so the all-reduce of the embeddings adds one real row and zeros
/// (exact). An all-zero block is zero in every GGML type.
pub fn embedding_shard(
    weights: &dyn WeightSource,
    name: &str,
    c: &ModelConfig,
    shard: &RankShard,
) -> Result<HostTensor, ModelError> {
    let t = weights.require_rows(name, c.vocab_size, c.hidden_size, shard.vocab.clone())?;
    if shard.tp_size == 1 {
        return Ok(t);
    }
    let mut bytes = Vec::with_capacity((t.rows + 1) * t.row_bytes());
    bytes.extend_from_slice(&t.bytes);
    bytes.resize(bytes.len() + t.row_bytes(), 0);
    Ok(HostTensor {
        dtype: t.dtype,
        rows: t.rows + 1,
        cols: t.cols,
        bytes: WeightBytes::Owned(Arc::new(bytes)),
    })
}

/// Token ids as the vocabulary-split embedding of `shard` reads them: ids in its range
/// shifted to its first row, the others sent to the zero row.
pub fn remap_token_ids(shard: &RankShard, ids: &mut [u32]) {
    let (lo, hi) = (shard.vocab.start as u32, shard.vocab.end as u32);
    for id in ids {
        *id = if (lo..hi).contains(id) {
            *id - lo
        } else {
            hi - lo
        };
    }
}

/// Loads every rank of `cfg` in parallel, each on the backend `backend_for` makes for its
/// shard and with its communicator (`comms`, one per rank in rank order). The model names no
/// concrete backend: the caller (the CLI's device selection, a test) picks them.
pub fn load_ranks<B: Backend>(
    config: &ModelConfig,
    weights: &dyn WeightSource,
    cfg: ParallelConfig,
    backend_for: impl Fn(&RankShard) -> B + Sync,
    comms: Vec<Box<dyn Communicator<B>>>,
) -> Result<super::rank_group::ModelRanks<B>, ModelError> {
    let shards = plan_ranks(config, weights, cfg)?;
    if comms.len() != shards.len() {
        return Err(ModelError::Invalid(format!(
            "{} communicators for {} ranks",
            comms.len(),
            shards.len()
        )));
    }
    let backend_for = &backend_for;
    let ranks = std::thread::scope(|s| {
        let handles: Vec<_> = shards
            .into_iter()
            .zip(comms)
            .map(|(shard, comm)| {
                s.spawn(move || {
                    let backend = backend_for(&shard);
                    super::llama::Llama::load_rank(config.clone(), weights, backend, shard, comm)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(ModelError::Invalid("a rank's loader panicked".into())))
            })
            .collect::<Result<Vec<_>, _>>()
    })?;
    Ok(super::rank_group::ModelRanks {
        config: config.clone(),
        ranks,
    })
}

/// O or down (`[hidden, in_features]`): this rank's input columns `cols` in
/// `TpMode::AllReduce`, its hidden rows (all input columns) in `TpMode::Gather`.
pub(super) fn row_parallel(
    weights: &dyn WeightSource,
    shard: &RankShard,
    name: &str,
    rows: usize,
    cols: usize,
    own_cols: std::ops::Range<usize>,
) -> Result<HostTensor, ModelError> {
    match shard.tp_mode {
        TpMode::AllReduce => weights.require_cols(name, rows, cols, own_cols),
        TpMode::Gather => weights.require_rows(name, rows, cols, shard.hidden.clone()),
    }
}

/// `out = x · Wᵀ` for O or down, combined over the TP group: `gather` is `None` on one rank,
/// `Some(false)` for `TpMode::AllReduce` (partial sums, all-reduced), `Some(true)` for
/// `TpMode::Gather` (`x`'s columns gathered first, this rank's output columns gathered after).
pub(super) fn row_parallel_matmul<B: Backend>(
    be: &B,
    comm: &mut Box<dyn Communicator<B>>,
    gather: Option<bool>,
    x: &B::Tensor,
    w: &B::Linear,
    out: &mut B::Tensor,
    scratch: &mut B::Tensor,
) -> Result<(), ModelError> {
    match gather {
        None => be.matmul(x, w, None, out),
        Some(false) => {
            be.matmul(x, w, None, out);
            comm.all_reduce_sum(be, out)?;
        }
        Some(true) => {
            comm.all_gather_cols(be, x, scratch)?;
            be.matmul(scratch, w, None, out);
            std::mem::swap(scratch, out);
            comm.all_gather_cols(be, scratch, out)?;
        }
    }
    Ok(())
}
