//! Per-step metadata on the device: token ids, positions, slots, RoPE frequencies, and the
//! per-sequence arrays and padded block tables the attention kernels read. Uploaded once per
//! forward pass by `prepare_step`; the prefill tile list depends on the GQA group size, so it is
//! built on first use and kept for the other layers.

use std::collections::HashMap;
use std::sync::Mutex;

use cudarc::driver::CudaSlice;

use super::context::Gpu;
use crate::kernels::{ForwardBatch, KernelError, Rope};

pub struct StepBuffers {
    pub token_ids: CudaSlice<u32>,
    pub positions: CudaSlice<u32>,
    pub slots: CudaSlice<u32>,
    pub inv_freqs: CudaSlice<f32>,
    pub query_start: CudaSlice<u32>,
    pub query_len: CudaSlice<u32>,
    pub context_len: CudaSlice<u32>,
    /// `[num_seqs, bt_stride]`, padded with block 0 (never read past a context).
    pub block_tables: CudaSlice<u32>,
    pub logits_rows: CudaSlice<u32>,
}

pub struct CudaStep {
    pub num_tokens: usize,
    pub num_seqs: usize,
    pub num_logits_rows: usize,
    pub interleaved: bool,
    pub bt_stride: usize,
    /// Longest context among decode sequences (`query_len == 1`), 0 when none.
    pub max_decode_ctx: usize,
    /// `(sequence, query_len)` of the sequences the prefill kernel serves.
    pub prefill_seqs: Vec<(u32, u32)>,
    pub bufs: Result<StepBuffers, KernelError>,
    /// Prefill tiles per `tokens_per_tile`: `[(sequence, first query)]` flattened, and count.
    pub tiles: Mutex<HashMap<usize, (CudaSlice<u32>, usize)>>,
}

impl CudaStep {
    pub fn new(gpu: &Gpu, batch: &ForwardBatch, rope: &Rope) -> Self {
        let bt_stride = batch
            .seqs
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut tables = vec![0u32; batch.seqs.len() * bt_stride];
        for (i, s) in batch.seqs.iter().enumerate() {
            tables[i * bt_stride..i * bt_stride + s.block_table.len()]
                .copy_from_slice(&s.block_table);
        }
        let col = |f: fn(&crate::kernels::BatchSeq) -> usize| -> Vec<u32> {
            batch.seqs.iter().map(|s| f(s) as u32).collect()
        };
        let bufs = (|| {
            Ok(StepBuffers {
                token_ids: gpu.upload(&batch.token_ids)?,
                positions: gpu.upload(&batch.positions)?,
                slots: gpu.upload(&batch.slot_mapping)?,
                inv_freqs: gpu.upload(&rope.inv_freqs)?,
                query_start: gpu.upload(&col(|s| s.query_start))?,
                query_len: gpu.upload(&col(|s| s.query_len))?,
                context_len: gpu.upload(&col(|s| s.context_len))?,
                block_tables: gpu.upload(&tables)?,
                logits_rows: gpu.upload(&batch.logits_rows)?,
            })
        })();
        Self {
            num_tokens: batch.num_tokens(),
            num_seqs: batch.seqs.len(),
            num_logits_rows: batch.logits_rows.len(),
            interleaved: rope.interleaved,
            bt_stride,
            max_decode_ctx: batch
                .seqs
                .iter()
                .filter(|s| s.query_len == 1)
                .map(|s| s.context_len)
                .max()
                .unwrap_or(0),
            prefill_seqs: batch
                .seqs
                .iter()
                .enumerate()
                .filter(|(_, s)| s.query_len > 1)
                .map(|(i, s)| (i as u32, s.query_len as u32))
                .collect(),
            bufs,
            tiles: Mutex::new(HashMap::new()),
        }
    }

    pub fn bufs(&self) -> Result<&StepBuffers, KernelError> {
        self.bufs
            .as_ref()
            .map_err(|e| KernelError::Invalid(format!("step upload failed: {e}")))
    }

    /// The prefill tile list for `tokens_per_tile`, uploaded once per step; returns its
    /// device address and length.
    pub fn tiles(&self, gpu: &Gpu, tokens_per_tile: usize) -> Result<(u64, usize), KernelError> {
        let mut map = self.tiles.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((b, n)) = map.get(&tokens_per_tile) {
            return Ok((super::context::ptr(b, &gpu.stream), *n));
        }
        let list = tile_list(&self.prefill_seqs, tokens_per_tile);
        let n = list.len() / 2;
        let b = gpu.upload(&list)?;
        let p = super::context::ptr(&b, &gpu.stream);
        map.insert(tokens_per_tile, (b, n));
        Ok((p, n))
    }
}

/// `[(sequence, first query)]` flattened: each prefill sequence's new tokens cut into tiles.
pub fn tile_list(prefill_seqs: &[(u32, u32)], tokens_per_tile: usize) -> Vec<u32> {
    let mut out = Vec::new();
    for &(seq, len) in prefill_seqs {
        let mut q = 0;
        while q < len {
            out.extend([seq, q]);
            q += tokens_per_tile as u32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn tiles_cover_every_query_once() {
        let t = super::tile_list(&[(0, 5), (2, 1), (3, 16)], 4);
        assert_eq!(t, vec![0, 0, 0, 4, 2, 0, 3, 0, 3, 4, 3, 8, 3, 12]);
    }
}
