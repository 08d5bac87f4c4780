//! Which part of the model each rank holds.
//!
//! Tensor parallelism (`tp` ranks per stage):
//! * Attention is split by whole GQA groups while `tp ≤ num_kv_heads`: rank `r` holds a
//!   contiguous run of KV heads with all their query heads; when the KV heads do not divide by
//!   `tp` the runs differ by one group (SmolLM2-135M at TP=2: 2 groups and 1 group, i.e. 6 and
//!   3 query heads). When `tp > num_kv_heads`, `tp` must be a multiple of `num_kv_heads`, and
//!   each KV head is replicated on the `tp / num_kv_heads` ranks that share its query heads
//!   (vLLM's rule); the query heads of a group must then divide evenly.
//! * The MLP's intermediate columns are split in whole quantization blocks of the down
//!   projection (its input columns), as evenly as the blocks allow.
//! * The vocabulary (embedding rows, LM-head rows) is split into contiguous ranges.
//!
//! Pipeline parallelism (`pp` stages): contiguous layer ranges chosen to minimise the largest
//! stage's parameter count, counting the embedding on the first stage and the LM head on the
//! last (a tied table counts on both: each holds it).

use std::ops::Range;

use super::ParallelError;

/// How a tensor-parallel layer combines its ranks' attention and MLP outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TpMode {
    /// Row-parallel O and down (each rank multiplies its own input columns) and one
    /// all-reduce of the partial sums after each: the least traffic (Megatron, vLLM). The sum
    /// of partial sums rounds differently from one rank's single chain, and the CPU's 8-bit
    /// activation quantization amplifies those last-bit differences layer by layer.
    AllReduce,
    /// The attention output (and the MLP activation) all-gathered, then O and down split by
    /// output features and the hidden state all-gathered: every value computed by exactly the
    /// same operations as on one rank, so the logits are bit-identical. About 2.5× the
    /// all-reduce mode's traffic at SmolLM2's shape; the CPU default.
    #[default]
    Gather,
}

/// The requested sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelConfig {
    pub tp_size: usize,
    pub pp_size: usize,
    pub tp_mode: TpMode,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self {
            tp_size: 1,
            pp_size: 1,
            tp_mode: TpMode::Gather,
        }
    }
}

impl ParallelConfig {
    pub fn num_ranks(&self) -> usize {
        self.tp_size * self.pp_size
    }
}

/// The model dimensions the partition depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelDims {
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    /// Values per quantization block of the down projection's input columns (1 for float).
    pub down_block_len: usize,
    /// Values per quantization block of the attention output's input columns.
    pub o_block_len: usize,
    pub head_dim: usize,
    /// Parameters of one layer, of the embedding table and of the LM head.
    pub layer_params: usize,
    pub embed_params: usize,
    pub lm_head_params: usize,
}

/// One rank's part of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankShard {
    pub rank: usize,
    pub tp_rank: usize,
    pub tp_size: usize,
    pub stage: usize,
    pub pp_size: usize,
    pub tp_mode: TpMode,
    pub q_heads: Range<usize>,
    pub kv_heads: Range<usize>,
    /// Intermediate (MLP) columns.
    pub inter: Range<usize>,
    /// Vocabulary rows of the embedding and LM head.
    pub vocab: Range<usize>,
    /// Hidden features (output rows of O and down) in `TpMode::Gather`.
    pub hidden: Range<usize>,
    pub layers: Range<usize>,
}

impl RankShard {
    pub fn is_first_stage(&self) -> bool {
        self.stage == 0
    }
    pub fn is_last_stage(&self) -> bool {
        self.stage + 1 == self.pp_size
    }
    pub fn is_whole(&self) -> bool {
        self.tp_size == 1 && self.pp_size == 1
    }
}

/// `n` items cut into `parts` contiguous ranges in units of `unit`, sizes differing by at most
/// one unit (the larger first). `None` when some part would be empty.
fn split_units(n: usize, unit: usize, parts: usize, index: usize) -> Option<Range<usize>> {
    let units = n / unit;
    if units < parts || !n.is_multiple_of(unit) {
        return None;
    }
    let (base, extra) = (units / parts, units % parts);
    let start = index * base + index.min(extra);
    let len = base + usize::from(index < extra);
    Some(start * unit..(start + len) * unit)
}

/// Query and KV heads of TP rank `t`, or why `tp` cannot split the attention.
fn head_split(d: &ModelDims, tp: usize, t: usize) -> Result<(Range<usize>, Range<usize>), String> {
    let (h, kv) = (d.num_heads, d.num_kv_heads);
    let group = h / kv;
    let (q, k) = if tp <= kv {
        let k = split_units(kv, 1, tp, t).ok_or("fewer KV heads than ranks")?;
        (k.start * group..k.end * group, k)
    } else {
        if !tp.is_multiple_of(kv) {
            return Err(format!(
                "{tp} ranks do not divide into the {kv} KV heads' replicas"
            ));
        }
        let reps = tp / kv;
        if !group.is_multiple_of(reps) {
            return Err(format!(
                "{group} query heads per KV head do not split over {reps} ranks"
            ));
        }
        let k = t / reps;
        let per = group / reps;
        let q0 = k * group + (t % reps) * per;
        (q0..q0 + per, k..k + 1)
    };
    if !(q.start * d.head_dim).is_multiple_of(d.o_block_len)
        || !(q.end * d.head_dim).is_multiple_of(d.o_block_len)
    {
        return Err(format!(
            "the attention output's input columns would be cut at {}, inside a quantization block of {}",
            q.end * d.head_dim,
            d.o_block_len
        ));
    }
    Ok((q, k))
}

/// Layer ranges of `pp` stages minimising the largest stage's parameters.
pub fn stage_layers(d: &ModelDims, pp: usize) -> Option<Vec<Range<usize>>> {
    let n = d.num_layers;
    if pp == 0 || pp > n {
        return None;
    }
    let cost = |s: usize, a: usize, b: usize| {
        (b - a) * d.layer_params
            + if s == 0 { d.embed_params } else { 0 }
            + if s + 1 == pp { d.lm_head_params } else { 0 }
    };
    // best[s][i]: the smallest max cost of stages s.. over layers i.. ; choice[s][i]: the end
    // of stage s. Layer counts are small (tens), so O(pp · n²) is nothing.
    let inf = usize::MAX;
    let mut best = vec![vec![inf; n + 1]; pp + 1];
    let mut choice = vec![vec![0; n + 1]; pp + 1];
    best[pp][n] = 0;
    for s in (0..pp).rev() {
        for i in 0..n {
            for e in i + 1..=n {
                if best[s + 1][e] == inf {
                    continue;
                }
                let c = cost(s, i, e).max(best[s + 1][e]);
                if c < best[s][i] {
                    best[s][i] = c;
                    choice[s][i] = e;
                }
            }
        }
    }
    let mut ranges = Vec::with_capacity(pp);
    let mut i = 0;
    for row in choice.iter().take(pp) {
        let e = row[i];
        ranges.push(i..e);
        i = e;
    }
    Some(ranges)
}

/// Why `tp` cannot split the model, if it cannot.
fn tp_problem(d: &ModelDims, tp: usize) -> Option<String> {
    for t in 0..tp {
        if let Err(e) = head_split(d, tp, t) {
            return Some(e);
        }
    }
    if split_units(d.intermediate_size, d.down_block_len, tp, 0).is_none() {
        return Some(format!(
            "the {} intermediate columns do not split into {tp} runs of whole {}-value blocks",
            d.intermediate_size, d.down_block_len
        ));
    }
    if d.vocab_size < tp {
        return Some("fewer vocabulary rows than ranks".into());
    }
    None
}

/// Every rank's shard, in rank order, or a start-up error naming the valid sizes.
pub fn plan(d: &ModelDims, cfg: ParallelConfig) -> Result<Vec<RankShard>, ParallelError> {
    let (tp, pp) = (cfg.tp_size, cfg.pp_size);
    if tp == 0 || pp == 0 {
        return Err(ParallelError::BadSize(
            "--tensor-parallel-size and --pipeline-parallel-size must be at least 1".into(),
        ));
    }
    if let Some(why) = tp_problem(d, tp) {
        let valid: Vec<String> = (1..=d.num_heads.max(1))
            .filter(|&n| tp_problem(d, n).is_none())
            .map(|n| n.to_string())
            .collect();
        return Err(ParallelError::BadSize(format!(
            "--tensor-parallel-size {tp} does not fit this model ({} query heads, {} KV heads, \
             intermediate {}): {why}; valid sizes: {}",
            d.num_heads,
            d.num_kv_heads,
            d.intermediate_size,
            valid.join(", ")
        )));
    }
    let stages = stage_layers(d, pp).ok_or_else(|| {
        ParallelError::BadSize(format!(
            "--pipeline-parallel-size {pp} does not fit this model: each stage needs at least \
             one of its {} layers; valid sizes: 1 to {}",
            d.num_layers, d.num_layers
        ))
    })?;
    let mut shards = Vec::with_capacity(tp * pp);
    for (stage, layers) in stages.into_iter().enumerate() {
        for t in 0..tp {
            let (q_heads, kv_heads) = head_split(d, tp, t).map_err(ParallelError::BadSize)?;
            let bad = || ParallelError::BadSize(format!("no split for TP rank {t}"));
            shards.push(RankShard {
                rank: stage * tp + t,
                tp_rank: t,
                tp_size: tp,
                stage,
                pp_size: pp,
                q_heads,
                kv_heads,
                inter: split_units(d.intermediate_size, d.down_block_len, tp, t).ok_or_else(bad)?,
                vocab: split_units(d.vocab_size, 1, tp, t).ok_or_else(bad)?,
                hidden: split_units(d.hidden_size, 1, tp, t).ok_or_else(bad)?,
                tp_mode: cfg.tp_mode,
                layers: layers.clone(),
            });
        }
    }
    Ok(shards)
}

#[cfg(test)]
#[path = "partition_tests.rs"]
mod tests;
