//! Per-step metadata on the device: token ids, positions, slots, the per-sequence arrays and
//! padded block tables the attention kernels read, and the RoPE frequencies.
//!
//! Invariants:
//! * Every per-step array lives in one persistent `u32` device buffer (the arena) at offsets
//!   fixed by its `StepLayout` capacities (tokens, sequences, block-table stride). Its address
//!   changes only when a step exceeds a capacity: then it grows (to the next power of two) and
//!   the GPU's reallocation epoch moves on, which retires every captured graph (they read these
//!   addresses).
//! * The host writes a page-locked staging twin of the same layout and copies the used spans
//!   (neighbours closer than `MAX_GAP` merged into one copy) with async copies on the stream:
//!   no host sync. Before writing the staging again it waits on the event recorded after its
//!   last copies (normally long done). Stream order makes the device buffer safe to overwrite
//!   while the previous step's kernels are still queued.
//! * A `CudaStep` names the arena's contents, so it is valid until the next `prepare_step`;
//!   ops given an older one fail (`bufs()` checks the generation) instead of reading another
//!   step's data.
//! * A pure-decode step padded to a captured graph size (`pad`) fills rows `n..size` with token
//!   0 at position 0 writing K/V to the reserved scratch slot (a block no sequence owns), a
//!   context of 1 over that block, and logits rows `n..size` that are never returned.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaEvent, CudaSlice, PinnedHostSlice};

use super::context::{kerr, ptr, Gpu};
use crate::kernels::{ForwardBatch, KernelError, Rope};

/// Spans of the staging closer than this (in `u32`s, 64 KiB) are copied as one: a copy call
/// costs about what 64 KiB of PCIe transfer does.
pub const MAX_GAP: usize = 16 * 1024;

/// Initial capacities of the step arena; a step that exceeds one grows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLimits {
    pub max_num_seqs: usize,
    /// In tokens.
    pub max_num_batched_tokens: usize,
    pub max_blocks_per_seq: usize,
}

impl Default for StepLimits {
    fn default() -> Self {
        Self {
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            max_blocks_per_seq: 64,
        }
    }
}

/// Capacities of the arena and the offset of each array in it (in `u32`s):
/// `[query_start S][query_len S][context_len S][block_tables S·B][token_ids T][positions T]
/// [slots T][logits_rows T]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLayout {
    pub tokens: usize,
    pub seqs: usize,
    /// Block-table row stride, in blocks.
    pub bt_stride: usize,
}

/// The arrays of the arena, in layout order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    QueryStart,
    QueryLen,
    ContextLen,
    BlockTables,
    TokenIds,
    Positions,
    Slots,
    LogitsRows,
}

impl StepLayout {
    pub fn from_limits(l: StepLimits) -> Self {
        Self {
            tokens: l.max_num_batched_tokens.max(1),
            seqs: l.max_num_seqs.max(1),
            bt_stride: l.max_blocks_per_seq.max(1),
        }
    }

    pub fn offset(&self, r: Region) -> usize {
        let (s, t, b) = (self.seqs, self.tokens, self.bt_stride);
        match r {
            Region::QueryStart => 0,
            Region::QueryLen => s,
            Region::ContextLen => 2 * s,
            Region::BlockTables => 3 * s,
            Region::TokenIds => 3 * s + s * b,
            Region::Positions => 3 * s + s * b + t,
            Region::Slots => 3 * s + s * b + 2 * t,
            Region::LogitsRows => 3 * s + s * b + 3 * t,
        }
    }

    pub fn len(&self) -> usize {
        self.offset(Region::LogitsRows) + self.tokens
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn fits(&self, need: StepLayout) -> bool {
        need.tokens <= self.tokens && need.seqs <= self.seqs && need.bt_stride <= self.bt_stride
    }

    /// This layout grown to hold `need`: each capacity that is too small becomes the next
    /// power of two at or above the need (so a run of growing contexts reallocates rarely).
    pub fn grown(&self, need: StepLayout) -> Self {
        let g = |have: usize, want: usize| {
            if want <= have {
                have
            } else {
                want.next_power_of_two()
            }
        };
        Self {
            tokens: g(self.tokens, need.tokens),
            seqs: g(self.seqs, need.seqs),
            bt_stride: g(self.bt_stride, need.bt_stride),
        }
    }
}

/// Padding of a pure-decode step up to a captured graph size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Padding {
    /// Rows (sequences, tokens and logits rows) after padding.
    pub size: usize,
    /// The reserved block padded rows read, and the slot (its first) they write.
    pub scratch_block: u32,
    pub scratch_slot: u32,
}

/// What a step occupies in a layout: sequences, tokens, logits rows (after padding) and the
/// longest block table.
pub fn step_needs(batch: &ForwardBatch, pad: Option<Padding>) -> StepLayout {
    let size = pad.map_or(0, |p| p.size);
    StepLayout {
        tokens: batch
            .num_tokens()
            .max(batch.logits_rows.len())
            .max(size)
            .max(1),
        seqs: batch.seqs.len().max(size).max(1),
        bt_stride: batch
            .seqs
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(0)
            .max(1),
    }
}

/// Writes the step into `staging` (laid out as `layout`, which must fit it) and returns the
/// used spans `(start, end)` in layout order.
pub fn fill(
    layout: &StepLayout,
    staging: &mut [u32],
    batch: &ForwardBatch,
    pad: Option<Padding>,
) -> Vec<(usize, usize)> {
    let (n_seqs, n_tokens, n_rows) = (
        batch.seqs.len(),
        batch.num_tokens(),
        batch.logits_rows.len(),
    );
    let size = pad.map_or(0, |p| p.size);
    let (s_used, t_used, r_used) = (n_seqs.max(size), n_tokens.max(size), n_rows.max(size));
    let b = layout.bt_stride;
    let at = |r: Region| layout.offset(r);
    for (i, s) in batch.seqs.iter().enumerate() {
        staging[at(Region::QueryStart) + i] = s.query_start as u32;
        staging[at(Region::QueryLen) + i] = s.query_len as u32;
        staging[at(Region::ContextLen) + i] = s.context_len as u32;
        let row = at(Region::BlockTables) + i * b;
        staging[row..row + s.block_table.len()].copy_from_slice(&s.block_table);
        // Past a context nothing is read; zeros keep the row deterministic.
        staging[row + s.block_table.len()..row + b].fill(0);
    }
    let tok = |r: Region| at(r)..at(r) + n_tokens;
    staging[tok(Region::TokenIds)].copy_from_slice(&batch.token_ids);
    staging[tok(Region::Positions)].copy_from_slice(&batch.positions);
    staging[tok(Region::Slots)].copy_from_slice(&batch.slot_mapping);
    staging[at(Region::LogitsRows)..at(Region::LogitsRows) + n_rows]
        .copy_from_slice(&batch.logits_rows);
    if let Some(p) = pad {
        for i in n_seqs..p.size {
            staging[at(Region::QueryStart) + i] = i as u32;
            staging[at(Region::QueryLen) + i] = 1;
            staging[at(Region::ContextLen) + i] = 1;
            let row = at(Region::BlockTables) + i * b;
            staging[row] = p.scratch_block;
            staging[row + 1..row + b].fill(0);
        }
        for i in n_tokens..p.size {
            staging[at(Region::TokenIds) + i] = 0;
            staging[at(Region::Positions) + i] = 0;
            staging[at(Region::Slots) + i] = p.scratch_slot;
        }
        for i in n_rows..p.size {
            staging[at(Region::LogitsRows) + i] = i as u32;
        }
    }
    vec![
        (at(Region::QueryStart), at(Region::QueryStart) + s_used),
        (at(Region::QueryLen), at(Region::QueryLen) + s_used),
        (at(Region::ContextLen), at(Region::ContextLen) + s_used),
        (
            at(Region::BlockTables),
            at(Region::BlockTables) + s_used * b,
        ),
        (at(Region::TokenIds), at(Region::TokenIds) + t_used),
        (at(Region::Positions), at(Region::Positions) + t_used),
        (at(Region::Slots), at(Region::Slots) + t_used),
        (at(Region::LogitsRows), at(Region::LogitsRows) + r_used),
    ]
}

/// Sorted spans merged where the gap between two is at most `max_gap`; empty spans dropped.
pub fn coalesce(spans: &[(usize, usize)], max_gap: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &(s, e) in spans.iter().filter(|(s, e)| e > s) {
        match out.last_mut() {
            Some(last) if s <= last.1 + max_gap => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The persistent device buffers of per-step metadata and their page-locked staging.
pub struct StepArena {
    layout: StepLayout,
    dev: CudaSlice<u32>,
    staging: PinnedHostSlice<u32>,
    /// Recorded after the last copies out of `staging`.
    copied: CudaEvent,
    inv_freqs: Option<(Vec<f32>, CudaSlice<f32>)>,
    /// Bumped by every `prepare_step`; a `CudaStep` keeps the value it was made with.
    generation: Arc<AtomicU64>,
}

fn alloc_pair(
    gpu: &Gpu,
    layout: StepLayout,
) -> Result<(CudaSlice<u32>, PinnedHostSlice<u32>), KernelError> {
    let dev = gpu.alloc::<u32>(layout.len())?;
    // SAFETY: the staging is fully written (`fill`) before any span of it is copied.
    let staging = unsafe { gpu.ctx.alloc_pinned::<u32>(layout.len()) }
        .map_err(|e| KernelError::OutOfMemory(format!("pinned staging: {e:?}")))?;
    Ok((dev, staging))
}

impl StepArena {
    pub fn new(gpu: &Gpu, limits: StepLimits) -> Result<Self, KernelError> {
        let layout = StepLayout::from_limits(limits);
        let (dev, staging) = alloc_pair(gpu, layout)?;
        let copied = gpu.ctx.new_event(None).map_err(kerr)?;
        Ok(Self {
            layout,
            dev,
            staging,
            copied,
            inv_freqs: None,
            generation: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn layout(&self) -> StepLayout {
        self.layout
    }

    /// Writes the step and queues its copies; returns the arrays' device addresses.
    fn load(
        &mut self,
        gpu: &Gpu,
        batch: &ForwardBatch,
        rope: &Rope,
        pad: Option<Padding>,
    ) -> Result<StepPtrs, KernelError> {
        let need = step_needs(batch, pad);
        if !self.layout.fits(need) {
            let layout = self.layout.grown(need);
            tracing::debug!("step arena grows to {layout:?}");
            self.copied.synchronize().map_err(kerr)?;
            (self.dev, self.staging) = alloc_pair(gpu, layout)?;
            self.layout = layout;
            gpu.note_realloc();
        }
        if self
            .inv_freqs
            .as_ref()
            .is_none_or(|(v, _)| *v != rope.inv_freqs)
        {
            let dev = gpu.upload(&rope.inv_freqs)?;
            self.inv_freqs = Some((rope.inv_freqs.clone(), dev));
            gpu.note_realloc();
        }
        // The previous step's copies out of the staging must have finished before it is
        // rewritten (they ran at that step's start, so this rarely waits).
        self.copied.synchronize().map_err(kerr)?;
        let staging = self.staging.as_mut_slice().map_err(kerr)?;
        let spans = fill(&self.layout, staging, batch, pad);
        let base = ptr(&self.dev, &gpu.stream);
        for (s, e) in coalesce(&spans, MAX_GAP) {
            // SAFETY: `s..e` lies inside both the staging and the device buffer (same layout);
            // the staging stays alive and unwritten until `copied` (recorded below) completes.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    base + (s * 4) as u64,
                    &staging[s..e],
                    gpu.stream.cu_stream(),
                )
            }
            .map_err(kerr)?;
        }
        self.copied.record(&gpu.stream).map_err(kerr)?;
        let at = |r: Region| base + (self.layout.offset(r) * 4) as u64;
        Ok(StepPtrs {
            token_ids: at(Region::TokenIds),
            positions: at(Region::Positions),
            slots: at(Region::Slots),
            inv_freqs: self
                .inv_freqs
                .as_ref()
                .map(|(_, d)| ptr(d, &gpu.stream))
                .unwrap_or(0),
            query_start: at(Region::QueryStart),
            query_len: at(Region::QueryLen),
            context_len: at(Region::ContextLen),
            block_tables: at(Region::BlockTables),
            logits_rows: at(Region::LogitsRows),
        })
    }
}

/// Device addresses of a step's arrays (inside the arena).
#[derive(Debug, Clone, Copy)]
pub struct StepPtrs {
    pub token_ids: u64,
    pub positions: u64,
    pub slots: u64,
    pub inv_freqs: u64,
    pub query_start: u64,
    pub query_len: u64,
    pub context_len: u64,
    /// `[num_seqs, bt_stride]`, padded with block 0 (never read past a context).
    pub block_tables: u64,
    pub logits_rows: u64,
}

pub struct CudaStep {
    /// Rows after padding (what the ops run over).
    pub num_tokens: usize,
    pub num_seqs: usize,
    pub num_logits_rows: usize,
    /// Logits rows of the batch itself (the rows a caller gets back).
    pub num_batch_logits_rows: usize,
    pub interleaved: bool,
    /// The arena's block-table stride (its capacity, not this step's longest table).
    pub bt_stride: usize,
    /// Longest context among decode sequences (`query_len == 1`), 0 when none.
    pub max_decode_ctx: usize,
    /// `(sequence, query_len)` of the sequences the prefill kernel serves.
    pub prefill_seqs: Vec<(u32, u32)>,
    /// Set when this pure-decode step is padded to a captured graph size.
    pub pad: Option<Padding>,
    bufs: Result<StepPtrs, KernelError>,
    generation: u64,
    current: Arc<AtomicU64>,
    /// Prefill tiles per `tokens_per_tile`: `[(sequence, first query)]` flattened, and count.
    pub tiles: Mutex<HashMap<usize, (CudaSlice<u32>, usize)>>,
}

impl CudaStep {
    pub fn new(
        gpu: &Gpu,
        arena: &mut StepArena,
        batch: &ForwardBatch,
        rope: &Rope,
        pad: Option<Padding>,
    ) -> Self {
        let generation = arena.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let bufs = arena.load(gpu, batch, rope, pad);
        let size = pad.map_or(0, |p| p.size);
        Self {
            num_tokens: batch.num_tokens().max(size),
            num_seqs: batch.seqs.len().max(size),
            num_logits_rows: batch.logits_rows.len().max(size),
            num_batch_logits_rows: batch.logits_rows.len(),
            interleaved: rope.interleaved,
            bt_stride: arena.layout.bt_stride,
            max_decode_ctx: batch
                .seqs
                .iter()
                .filter(|s| s.query_len == 1)
                .map(|s| s.context_len)
                .max()
                .unwrap_or(0)
                .max(if pad.is_some() { 1 } else { 0 }),
            prefill_seqs: batch
                .seqs
                .iter()
                .enumerate()
                .filter(|(_, s)| s.query_len > 1)
                .map(|(i, s)| (i as u32, s.query_len as u32))
                .collect(),
            pad,
            bufs,
            generation,
            current: arena.generation.clone(),
            tiles: Mutex::new(HashMap::new()),
        }
    }

    /// The step's device arrays, unless loading them failed or a later step replaced them.
    pub fn bufs(&self) -> Result<&StepPtrs, KernelError> {
        if self.current.load(Ordering::Relaxed) != self.generation {
            return Err(KernelError::Invalid(
                "a step was used after a later prepare_step replaced its metadata".into(),
            ));
        }
        self.bufs
            .as_ref()
            .map_err(|e| KernelError::Invalid(format!("step upload failed: {e}")))
    }

    /// The prefill tile list for `tokens_per_tile`, uploaded once per step; returns its
    /// device address and length.
    pub fn tiles(&self, gpu: &Gpu, tokens_per_tile: usize) -> Result<(u64, usize), KernelError> {
        let mut map = self.tiles.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((b, n)) = map.get(&tokens_per_tile) {
            return Ok((ptr(b, &gpu.stream), *n));
        }
        let list = tile_list(&self.prefill_seqs, tokens_per_tile);
        let n = list.len() / 2;
        let b = gpu.upload(&list)?;
        let p = ptr(&b, &gpu.stream);
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
#[path = "step_tests.rs"]
mod tests;
