//! The row-wise and attention launches of `CudaBackend` (shapes checked, then one launch each).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::backend::{
    elementwise, grid1, grow, launch, quant_suffix, CudaBackend, CudaEmbedding, CudaKvCache,
    CudaTensor, CudaVector,
};
use super::context::{kerr, ptr};
use super::params::{DecodeParams, PrefillParams};
use super::step::CudaStep;
use crate::kernels::{AttentionShape, KernelError};

/// Query heads of one KV head per decode CTA (`DECODE_MAX_GROUP`).
const DECODE_MAX_GROUP: usize = 8;
/// (token, head) rows per prefill CTA (`PREFILL_ROWS`).
const PREFILL_ROWS: usize = 16;

/// Tokens per decode partition: 512, halved while the grid would leave SMs idle.
pub fn partition_size(units: usize, max_ctx: usize, num_sms: usize) -> usize {
    let mut p = 512;
    while p > 64 && units * max_ctx.div_ceil(p) < 2 * num_sms {
        p /= 2;
    }
    p
}

/// The context the decode grid is sized for: the step's longest, or for a padded (graph)
/// step the longest the arena can hold, so that a replay is right for any contexts (the
/// partitions past a sequence's context exit at once).
pub fn decode_ctx_bound(step: &CudaStep, block_size: usize) -> usize {
    match step.pad {
        Some(_) => step.bt_stride * block_size,
        None => step.max_decode_ctx,
    }
}

impl CudaBackend {
    pub(crate) fn embed_impl(
        &self,
        table: &CudaEmbedding,
        step: &CudaStep,
        out: &mut CudaTensor,
    ) -> Result<(), KernelError> {
        let gpu = &self.gpu;
        out.ensure(gpu, step.num_tokens, table.cols)?;
        if step.num_tokens == 0 {
            return Ok(());
        }
        let name = format!("embed_{}", quant_suffix(table.dtype)?);
        let (tp, ids, op) = (
            ptr(&table.data, &gpu.stream),
            step.bufs()?.token_ids,
            out.ptr(gpu)?,
        );
        let (vocab, cols) = (table.rows as i32, table.cols as i32);
        let row_bytes = table.dtype.row_bytes(table.cols).unwrap_or(0) as u64;
        launch!(
            gpu,
            &name,
            grid1(step.num_tokens, 128),
            &tp,
            &ids,
            &vocab,
            &cols,
            &row_bytes,
            &op
        )
    }

    pub(crate) fn rms_norm_impl(
        &self,
        x: &CudaTensor,
        w: &CudaVector,
        eps: f32,
        out: &mut CudaTensor,
    ) -> Result<(), KernelError> {
        let gpu = &self.gpu;
        out.ensure(gpu, x.rows, x.cols)?;
        if x.rows == 0 {
            return Ok(());
        }
        let (xp, wp, op, cols) = (
            x.ptr(gpu)?,
            ptr(&w.data, &gpu.stream),
            out.ptr(gpu)?,
            x.cols as i32,
        );
        launch!(
            gpu,
            "rms_norm_f32",
            grid1(x.rows, 256),
            &xp,
            &wp,
            &eps,
            &cols,
            &op
        )
    }

    pub(crate) fn add_rms_norm_impl(
        &self,
        residual: &mut CudaTensor,
        delta: &CudaTensor,
        w: &CudaVector,
        eps: f32,
        out: &mut CudaTensor,
    ) -> Result<(), KernelError> {
        let gpu = &self.gpu;
        out.ensure(gpu, residual.rows, residual.cols)?;
        if residual.rows == 0 {
            return Ok(());
        }
        let (rp, dp, wp, op) = (
            residual.ptr(gpu)?,
            delta.ptr(gpu)?,
            ptr(&w.data, &gpu.stream),
            out.ptr(gpu)?,
        );
        let cols = residual.cols as i32;
        launch!(
            gpu,
            "add_rms_norm_f32",
            grid1(residual.rows, 256),
            &rp,
            &dp,
            &wp,
            &eps,
            &cols,
            &op
        )
    }

    pub(crate) fn silu_mul_impl(
        &self,
        gate_up: &CudaTensor,
        out: &mut CudaTensor,
    ) -> Result<(), KernelError> {
        let gpu = &self.gpu;
        let inter = gate_up.cols / 2;
        out.ensure(gpu, gate_up.rows, inter)?;
        if gate_up.rows == 0 {
            return Ok(());
        }
        let (gp, op, rows, ii) = (
            gate_up.ptr(gpu)?,
            out.ptr(gpu)?,
            gate_up.rows as i32,
            inter as i32,
        );
        launch!(
            gpu,
            "silu_mul_f32",
            elementwise(gate_up.rows * inter),
            &gp,
            &rows,
            &ii,
            &op
        )
    }

    pub(crate) fn gather_impl(
        &self,
        x: &CudaTensor,
        step: &CudaStep,
        out: &mut CudaTensor,
    ) -> Result<(), KernelError> {
        let gpu = &self.gpu;
        out.ensure(gpu, step.num_logits_rows, x.cols)?;
        if step.num_logits_rows == 0 {
            return Ok(());
        }
        let (xp, rp, op, cols) = (
            x.ptr(gpu)?,
            step.bufs()?.logits_rows,
            out.ptr(gpu)?,
            x.cols as i32,
        );
        launch!(
            gpu,
            "gather_rows_f32",
            grid1(step.num_logits_rows, 256),
            &xp,
            &rp,
            &cols,
            &op
        )
    }

    pub(crate) fn copy_blocks_impl(
        &self,
        kv: &mut CudaKvCache,
        copies: &[(u32, u32)],
    ) -> Result<(), KernelError> {
        let s = kv.shape;
        let block = s.num_kv_heads * s.block_size * s.head_dim;
        for layer in kv.k.iter_mut().chain(kv.v.iter_mut()) {
            for &(src, dst) in copies {
                let (src, dst) = (src as usize * block, dst as usize * block);
                if src.max(dst) + block > layer.len() {
                    return Err(KernelError::Invalid(format!(
                        "copy_blocks: block out of range ({src}, {dst})"
                    )));
                }
                let base = ptr(layer, &self.gpu.stream);
                // SAFETY: both ranges lie inside this layer's buffer (checked above) and do
                // not overlap unless src == dst; the copy is ordered on the backend's stream.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        base + (dst * 2) as u64,
                        base + (src * 2) as u64,
                        block * 2,
                        self.gpu.stream.cu_stream(),
                    )
                }
                .map_err(kerr)?;
            }
        }
        Ok(())
    }

    pub(crate) fn attention_impl(
        &self,
        qkv: &mut CudaTensor,
        shape: AttentionShape,
        layer: usize,
        kv: &mut CudaKvCache,
        step: &CudaStep,
        out: &mut CudaTensor,
    ) -> Result<(), KernelError> {
        let gpu = &self.gpu;
        let (h, kvh, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        if kvh == 0 || h % kvh != 0 || qkv.cols != (h + 2 * kvh) * d || !matches!(d, 64 | 128) {
            return Err(KernelError::Invalid(format!(
                "attention shape {shape:?} for qkv with {} cols",
                qkv.cols
            )));
        }
        out.ensure(gpu, qkv.rows, h * d)?;
        if step.num_tokens == 0 {
            return Ok(());
        }
        let b = step.bufs()?;
        let sfx = self.kv_dtype.suffix();
        let (kp, vp) = (
            ptr(&kv.k[layer], &gpu.stream),
            ptr(&kv.v[layer], &gpu.stream),
        );
        let qp = qkv.ptr(gpu)?;
        let op = out.ptr(gpu)?;
        let s = kv.shape;
        if let Some(pad) = step.pad {
            // Padded rows write the reserved block, which must be this cache's.
            if pad.scratch_block as usize != s.num_blocks {
                return Err(KernelError::Invalid(format!(
                    "step padded for a KV cache of {} blocks, given one of {}",
                    pad.scratch_block, s.num_blocks
                )));
            }
        }
        {
            let (pp, sp, fp) = (b.positions, b.slots, b.inv_freqs);
            let (il, hi, kvi, di, bsi) = (
                step.interleaved as i32,
                h as i32,
                kvh as i32,
                d as i32,
                s.block_size as i32,
            );
            let name = format!("rope_store_{sfx}");
            launch!(
                gpu,
                &name,
                grid1(step.num_tokens, 128),
                &qp,
                &pp,
                &sp,
                &fp,
                &il,
                &hi,
                &kvi,
                &di,
                &bsi,
                &kp,
                &vp
            )?;
        }
        let group = h / kvh;
        let common = |p: &mut DecodeParams| {
            p.q = qp;
            p.k_cache = kp;
            p.v_cache = vp;
            p.query_start = b.query_start;
            p.query_len = b.query_len;
            p.context_len = b.context_len;
            p.block_tables = b.block_tables;
            p.out = op;
            p.scale = shape.scale;
            p.q_stride = qkv.cols as i32;
            p.heads = h as i32;
            p.kv_heads = kvh as i32;
            p.block_size = s.block_size as i32;
            p.bt_stride = step.bt_stride as i32;
        };
        if step.max_decode_ctx > 0 {
            let gn = group.min(DECODE_MAX_GROUP);
            let groups = group.div_ceil(gn);
            let units = step.num_seqs * kvh * groups;
            let ctx = decode_ctx_bound(step, s.block_size);
            let part = partition_size(units, ctx, gpu.num_sms);
            let splits = ctx.div_ceil(part);
            let mut p = DecodeParams::default();
            common(&mut p);
            p.heads_per_cta = gn as i32;
            p.partition_size = part as i32;
            p.num_splits = splits as i32;
            let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
            if splits > 1 {
                let n = step.num_seqs * h * splits;
                let base = grow(gpu, &mut scratch.split, n * d + 2 * n)?;
                p.tmp_out = base;
                p.tmp_max = base + (n * d * 4) as u64;
                p.tmp_sum = p.tmp_max + (n * 4) as u64;
            }
            let cfg = LaunchConfig {
                grid_dim: ((kvh * groups) as u32, step.num_seqs as u32, splits as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: (gn * part * 4) as u32,
            };
            let name = format!("paged_attention_decode_{sfx}_d{d}");
            launch!(gpu, &name, cfg, &p)?;
            if splits > 1 {
                let cfg = LaunchConfig {
                    grid_dim: (h as u32, step.num_seqs as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                };
                launch!(gpu, &format!("paged_attention_reduce_d{d}"), cfg, &p)?;
            }
        }
        if !step.prefill_seqs.is_empty() {
            let gn = group.min(PREFILL_ROWS);
            let groups = group.div_ceil(gn);
            let tokens_per_tile = (PREFILL_ROWS / gn).max(1);
            let (tiles, num_tiles) = step.tiles(gpu, tokens_per_tile)?;
            let mut d_p = DecodeParams::default();
            common(&mut d_p);
            let p = PrefillParams {
                q: d_p.q,
                k_cache: d_p.k_cache,
                v_cache: d_p.v_cache,
                query_start: d_p.query_start,
                query_len: d_p.query_len,
                context_len: d_p.context_len,
                block_tables: d_p.block_tables,
                tiles,
                out: op,
                scale: shape.scale,
                q_stride: d_p.q_stride,
                heads: d_p.heads,
                kv_heads: d_p.kv_heads,
                heads_per_cta: gn as i32,
                tokens_per_tile: tokens_per_tile as i32,
                block_size: d_p.block_size,
                bt_stride: d_p.bt_stride,
            };
            let cfg = LaunchConfig {
                grid_dim: (num_tiles as u32, (kvh * groups) as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(gpu, &format!("paged_attention_prefill_{sfx}_d{d}"), cfg, &p)?;
        }
        Ok(())
    }
}
