//! The CPU backend's paged KV cache, f16 per layer: K `[num_blocks, num_kv_heads, head_dim,
//! block_size]` (transposed within a block) and V `[num_blocks, num_kv_heads, block_size,
//! head_dim]`; and [`rope_and_store`], which rotates each new token's Q and K and writes its K
//! and V into the token's slot.

use half::{f16, slice::HalfFloatSliceExt};

use super::step::CpuStep;
use crate::kernels::cpu::backend::{CpuNumerics, CpuTensor};
use crate::kernels::cpu::pool::{SyncPtr, ThreadPool};
use crate::kernels::cpu::rows;
use crate::kernels::{AttentionShape, KvCacheShape};

/// Most tokens per RoPE/store task.
const ROPE_CHUNK: usize = 32;

/// K and V of every layer, f16 (the precision of llama.cpp's default cache and of a GPU one).
pub struct CpuKvCache {
    pub shape: KvCacheShape,
    pub(super) k: Vec<Vec<f16>>,
    pub(super) v: Vec<Vec<f16>>,
}

impl CpuKvCache {
    pub fn new(shape: KvCacheShape) -> Self {
        let per_layer = shape.num_blocks * shape.num_kv_heads * shape.block_size * shape.head_dim;
        let zeros = || -> Vec<Vec<f16>> {
            (0..shape.num_layers)
                .map(|_| vec![f16::ZERO; per_layer])
                .collect()
        };
        Self {
            shape,
            k: zeros(),
            v: zeros(),
        }
    }

    /// Offset of (block, KV head) in a layer's K or V buffer; the region is
    /// `block_size * head_dim` long in both.
    pub(super) fn head_base(&self, block: usize, head: usize) -> usize {
        let s = &self.shape;
        (block * s.num_kv_heads + head) * s.block_size * s.head_dim
    }

    pub fn copy_blocks(&mut self, copies: &[(u32, u32)]) {
        let block_len = self.shape.num_kv_heads * self.shape.block_size * self.shape.head_dim;
        for layer in self.k.iter_mut().chain(self.v.iter_mut()) {
            for &(src, dst) in copies {
                let (src, dst) = (src as usize * block_len, dst as usize * block_len);
                layer.copy_within(src..src + block_len, dst);
            }
        }
    }
}
/// Rounds values to f16 precision. Queries meet the f16 keys at that precision too, so
/// results agree with engines that attend in f16 to near-ties rather than drifting apart.
#[inline]
fn round_to_f16(x: &mut [f32], tmp: &mut [f16]) {
    let n = tmp.len();
    for x in x.chunks_mut(n) {
        let tmp = &mut tmp[..x.len()];
        // The slice conversions use F16C vectors where the CPU has them.
        tmp.convert_from_f32_slice(x);
        tmp.convert_to_f32_slice(x);
    }
}

/// Rotates Q and K in `qkv` and writes K and V into their cache slots.
pub fn rope_and_store(
    pool: &ThreadPool,
    qkv: &mut CpuTensor,
    shape: AttentionShape,
    layer: usize,
    kv: &mut CpuKvCache,
    step: &CpuStep,
) {
    let (h, kvh, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    let half = d / 2;
    let cols = qkv.cols;
    let n = qkv.rows;
    let bs = kv.shape.block_size;
    let qkv_ptr = SyncPtr::new(&mut qkv.data);
    // (region of KV head 0 of the slot's block, offset in the block) per token.
    let slots: Vec<(usize, usize)> = step
        .batch
        .slot_mapping
        .iter()
        .map(|&slot| (kv.head_base(slot as usize / bs, 0), slot as usize % bs))
        .collect();
    let head_stride = bs * d;
    let k_ptr = SyncPtr::new(&mut kv.k[layer]);
    let v_ptr = SyncPtr::new(&mut kv.v[layer]);
    // A decode step's few tokens are still split over the threads.
    let chunk = n.div_ceil(pool.num_threads()).clamp(1, ROPE_CHUNK);
    pool.run(n.div_ceil(chunk), |task| {
        let first = task * chunk;
        let last = ((task + 1) * chunk).min(n);
        for (t, &(base, offset)) in slots.iter().enumerate().take(last).skip(first) {
            // SAFETY: each token row, and each token's cache slot, belongs to one task.
            let row = unsafe { qkv_ptr.slice(t * cols, cols) };
            let (cos, sin) = (&step.cos[t * half..][..half], &step.sin[t * half..][..half]);
            for head in row[..(h + kvh) * d].chunks_exact_mut(d) {
                match step.numerics {
                    CpuNumerics::Fast => rows::rope_head(head, cos, sin, step.interleaved),
                    CpuNumerics::Ggml => rows::ggml::rope_head(head, cos, sin, step.interleaved),
                }
            }
            let mut tmp = [f16::ZERO; 256];
            // (The ggml numerics round queries where llama.cpp does, in attention.)
            if step.numerics == CpuNumerics::Fast {
                round_to_f16(&mut row[..h * d], &mut tmp);
            }
            for g in 0..kvh {
                let at = base + g * head_stride;
                let (k_row, v_row) = (&row[(h + g) * d..][..d], &row[(h + kvh + g) * d..][..d]);
                // SAFETY: slots are distinct per token; see above. K's dimension `i` of this
                // token sits at `i * bs + offset` of its block region (transposed).
                unsafe {
                    let k = k_ptr.slice(at, head_stride);
                    for (c, k_part) in k_row.chunks(tmp.len()).enumerate() {
                        let kh = &mut tmp[..k_part.len()];
                        kh.convert_from_f32_slice(k_part);
                        for (i, &x) in kh.iter().enumerate() {
                            k[(c * 256 + i) * bs + offset] = x;
                        }
                    }
                    let v = v_ptr.slice(at + offset * d, d);
                    v.convert_from_f32_slice(v_row);
                }
            }
        }
    });
}
