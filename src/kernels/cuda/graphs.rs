//! Decode steps as captured CUDA graphs, one per batch size of a ladder (1, 2, 4, 8, 16, then
//! steps of 16 up to 256 and of 32 beyond, up to `max_num_seqs`), as vLLM does.
//!
//! A pure-decode step (every sequence one new token, every row's logits wanted) is padded to
//! the next captured size (`step.rs` says what padded rows hold: they write K/V only to the
//! KV cache's reserved scratch block and their logits are cut off). Prefill and mixed steps,
//! and decode batches above the ladder, run eagerly.
//!
//! A graph bakes in device addresses, so it is replayed only while they all hold:
//! * every buffer the ops address was allocated before it (the GPU's reallocation epoch is
//!   the one it was captured in: activations, scratch and the step arena bump it when they
//!   grow),
//! * the same KV cache and the same logits tensor.
//!
//! Every per-step quantity a kernel reads comes from the step arena (token ids, positions,
//! slots, contexts, block tables, logits rows) or is fixed for the size: the decode split
//! count is sized for the arena's longest possible context (its block-table stride), and
//! partitions past a sequence's context exit at once (`attention_decode.cu`).
//!
//! Capture is lazy: the first step of a size (at an epoch) runs eagerly, which sizes every
//! buffer, so the second can be captured without allocating (capture forbids it); the graph
//! is then launched for that step and replayed for later ones. `decode_graph_warmup` gives
//! batches that do this for every size at start-up.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;

use super::backend::{CudaBackend, CudaKvCache, CudaTensor};
use super::context::ptr;
use super::step::{CudaStep, Padding};
use crate::kernels::{BatchSeq, ForwardBatch, KernelError};

/// The captured batch sizes for `max_num_seqs`: 1, 2, 4, 8, 16, 32, 48, … 256, 288, 320, …,
/// and `max_num_seqs` itself.
pub fn capture_sizes(max_num_seqs: usize) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut s = 1;
    while s <= max_num_seqs {
        sizes.push(s);
        s = match s {
            1..=8 => s * 2,
            16..=255 => s + 16,
            _ => s + 32,
        };
    }
    if max_num_seqs > 0 && sizes.last() != Some(&max_num_seqs) {
        sizes.push(max_num_seqs);
    }
    sizes
}

/// The padding of `batch` to a captured size, when it is a pure-decode step that fits one and
/// a scratch block `(block, slot)` exists.
pub fn decode_padding(
    batch: &ForwardBatch,
    sizes: &[usize],
    scratch: Option<(u32, u32)>,
) -> Option<Padding> {
    let (scratch_block, scratch_slot) = scratch?;
    let n = batch.seqs.len();
    let pure_decode = n > 0
        && batch.num_tokens() == n
        && batch
            .seqs
            .iter()
            .enumerate()
            .all(|(i, s)| s.query_len == 1 && s.query_start == i)
        && batch.logits_rows.len() == n
        && batch.logits_rows.iter().all(|&r| (r as usize) < n);
    if !pure_decode {
        return None;
    }
    let size = *sizes.iter().find(|&&s| s >= n)?;
    Some(Padding {
        size,
        scratch_block,
        scratch_slot,
    })
}

/// What a captured graph was captured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphKey {
    pub epoch: u64,
    /// K cache address of layer 0.
    pub kv: u64,
    /// The logits tensor's address.
    pub logits: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Eager,
    /// Record the ops instead of running them; the graph then runs once for this step.
    Capture,
    Replay,
}

/// Totals over every capture, for the start-up log.
#[derive(Debug, Clone, Copy, Default)]
pub struct GraphStats {
    pub num_captured: usize,
    pub capture_time: Duration,
    /// Device memory that capturing and instantiating took (free memory before - after).
    pub memory_bytes: i64,
    pub num_replays: usize,
}

struct Capture {
    size: usize,
    key: GraphKey,
    started: Instant,
    free_before: usize,
}

/// A captured graph; used only under the backend's `graphs` mutex.
struct SendGraph(CudaGraph);
// SAFETY: the graph is only touched while holding the `DecodeGraphs` mutex (CUDA graphs must
// not be used from two threads at once; moving between threads is fine).
unsafe impl Send for SendGraph {}

/// The graphs of one backend and the bookkeeping that decides replay, capture or eager.
pub struct DecodeGraphs {
    pub enabled: bool,
    pub sizes: Vec<usize>,
    keys: HashMap<usize, GraphKey>,
    graphs: HashMap<usize, SendGraph>,
    /// The epoch of the last eager run at each size.
    warmed: HashMap<usize, u64>,
    capturing: Option<Capture>,
    pub stats: GraphStats,
}

impl DecodeGraphs {
    pub fn new(enabled: bool, max_num_seqs: usize) -> Self {
        Self {
            enabled,
            sizes: capture_sizes(max_num_seqs),
            keys: HashMap::new(),
            graphs: HashMap::new(),
            warmed: HashMap::new(),
            capturing: None,
            stats: GraphStats::default(),
        }
    }

    /// Replay when a graph of `size` was captured against `key`; capture when an eager run at
    /// `size` completed in this epoch (so nothing will be allocated); else eager.
    pub fn decide(&self, size: usize, key: GraphKey) -> Mode {
        if !self.enabled || key.kv == 0 || key.logits == 0 {
            return Mode::Eager;
        }
        if self.keys.get(&size) == Some(&key) {
            Mode::Replay
        } else if self.warmed.get(&size) == Some(&key.epoch) {
            Mode::Capture
        } else {
            Mode::Eager
        }
    }

    /// Records an eager run at `size` that ended in `epoch`.
    pub fn warmed(&mut self, size: usize, epoch: u64) {
        self.warmed.insert(size, epoch);
    }

    fn store(&mut self, size: usize, key: GraphKey, graph: CudaGraph) {
        self.keys.insert(size, key);
        self.graphs.insert(size, SendGraph(graph));
    }

    /// Drops every graph (graphs turned off, or a capture failed).
    pub fn clear(&mut self) {
        self.keys.clear();
        self.graphs.clear();
        self.warmed.clear();
    }
}

fn kv_address(kv: &CudaKvCache, b: &CudaBackend) -> u64 {
    kv.k.first().map_or(0, |k| ptr(k, &b.gpu.stream))
}

impl CudaBackend {
    /// Turns decode graphs on or off (off: every step runs eagerly, as `--enforce-eager`).
    pub fn set_cuda_graphs(&self, on: bool) {
        let mut g = self.graphs.lock().unwrap_or_else(|p| p.into_inner());
        g.enabled = on;
        if !on {
            g.clear();
        }
    }

    pub fn cuda_graphs_enabled(&self) -> bool {
        self.graphs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enabled
    }

    pub fn graph_stats(&self) -> GraphStats {
        self.graphs.lock().unwrap_or_else(|p| p.into_inner()).stats
    }

    /// One pure-decode batch per captured size, over the scratch block only (contexts of 1):
    /// run each through the model twice at start-up (the first sizes the buffers eagerly, the
    /// second captures), so that serving never pays a capture. Empty before a KV cache exists
    /// or with graphs off.
    pub fn decode_graph_warmup(&self) -> Vec<ForwardBatch> {
        let pad_slot = self
            .scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pad_slot;
        let g = self.graphs.lock().unwrap_or_else(|p| p.into_inner());
        let Some((block, slot)) = pad_slot else {
            return Vec::new();
        };
        if !g.enabled {
            return Vec::new();
        }
        g.sizes
            .iter()
            .rev()
            .map(|&n| ForwardBatch {
                token_ids: vec![0; n],
                positions: vec![0; n],
                slot_mapping: vec![slot; n],
                seqs: (0..n)
                    .map(|i| BatchSeq {
                        query_start: i,
                        query_len: 1,
                        context_len: 1,
                        block_table: vec![block],
                        prompt_len: 0,
                    })
                    .collect(),
                logits_rows: (0..n as u32).collect(),
                hidden_rows: Vec::new(),
            })
            .collect()
    }

    /// The padding `prepare_step` applies to `batch` (none with graphs off).
    pub(crate) fn padding_for(&self, batch: &ForwardBatch) -> Option<Padding> {
        let scratch = self
            .scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pad_slot;
        let g = self.graphs.lock().unwrap_or_else(|p| p.into_inner());
        if !g.enabled {
            return None;
        }
        decode_padding(batch, &g.sizes, scratch)
    }

    pub(crate) fn begin_ops_impl(
        &self,
        step: &CudaStep,
        kv: &CudaKvCache,
        logits: &mut CudaTensor,
    ) -> Result<bool, KernelError> {
        let Some(pad) = step.pad else {
            return Ok(false);
        };
        let gpu = &self.gpu;
        let key = GraphKey {
            epoch: gpu.epoch(),
            kv: kv_address(kv, self),
            logits: logits.buf.as_ref().map_or(0, |b| ptr(b, &gpu.stream)),
        };
        let mut g = self.graphs.lock().unwrap_or_else(|p| p.into_inner());
        match g.decide(pad.size, key) {
            Mode::Eager => Ok(false),
            Mode::Replay => {
                let graph = g
                    .graphs
                    .get(&pad.size)
                    .ok_or_else(|| KernelError::Invalid("a graph key without its graph".into()))?;
                graph.0.launch().map_err(super::context::kerr)?;
                g.stats.num_replays += 1;
                logits.rows = step.num_batch_logits_rows;
                Ok(true)
            }
            Mode::Capture => {
                let free_before = cudarc::driver::result::mem_get_info().map_or(0, |(f, _)| f);
                gpu.stream
                    .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(super::context::kerr)?;
                g.capturing = Some(Capture {
                    size: pad.size,
                    key,
                    started: Instant::now(),
                    free_before,
                });
                Ok(false)
            }
        }
    }

    pub(crate) fn end_ops_impl(
        &self,
        step: &CudaStep,
        logits: &mut CudaTensor,
    ) -> Result<(), KernelError> {
        let Some(pad) = step.pad else {
            return Ok(());
        };
        let gpu = &self.gpu;
        let mut g = self.graphs.lock().unwrap_or_else(|p| p.into_inner());
        let result = match g.capturing.take() {
            Some(c) => {
                let ended = gpu
                    .stream
                    .end_capture(CUgraphInstantiate_flags(0))
                    .map_err(super::context::kerr);
                let moved = gpu.epoch() != c.key.epoch;
                match ended {
                    Ok(Some(graph)) if !moved && c.size == pad.size => {
                        // Capture recorded the ops without running them: run them now.
                        let launched = graph.launch().map_err(super::context::kerr);
                        let free_after =
                            cudarc::driver::result::mem_get_info().map_or(0, |(f, _)| f);
                        let took = c.started.elapsed();
                        let bytes = c.free_before as i64 - free_after as i64;
                        g.stats.num_captured += 1;
                        g.stats.capture_time += took;
                        g.stats.memory_bytes += bytes;
                        tracing::info!(
                            "cuda graph for decode batch {} captured in {took:.1?} ({:.1} MiB)",
                            c.size,
                            bytes as f64 / (1 << 20) as f64
                        );
                        g.store(c.size, c.key, graph);
                        launched
                    }
                    Ok(_) => Err(KernelError::Invalid(format!(
                        "capturing the decode graph of batch {} failed (a buffer moved: {moved})",
                        c.size
                    ))),
                    Err(e) => Err(e),
                }
            }
            None => {
                g.warmed(pad.size, gpu.epoch());
                Ok(())
            }
        };
        if result.is_err() {
            // The step's ops were recorded, not run: this step fails, later ones run eagerly.
            tracing::error!("turning CUDA graphs off after a failed capture");
            g.enabled = false;
            g.clear();
        }
        logits.rows = step.num_batch_logits_rows;
        result
    }
}

#[cfg(test)]
#[path = "graphs_tests.rs"]
mod tests;
