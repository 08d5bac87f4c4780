//! The CPU backend's paged KV cache, per layer: K `[num_blocks, num_kv_heads, head_dim,
//! block_size]` (transposed within a block; in pairs of dimensions when 8-bit) and V
//! `[num_blocks, num_kv_heads, block_size, head_dim]`, as f16 values or as 8-bit codes with
//! their scales (`kernels_q8.rs`); and [`rope_and_store`], which rotates each new token's Q and
//! K and writes its K and V into the token's slot.

use half::{f16, slice::HalfFloatSliceExt};

use super::kernels_q8::{k_index, quantize_group, GROUP};
use super::step::CpuStep;
use crate::kernels::cpu::backend::{CpuNumerics, CpuTensor};
use crate::kernels::cpu::pool::{SyncPtr, ThreadPool};
use crate::kernels::cpu::rows;
use crate::kernels::dtype::KvCacheDtype;
use crate::kernels::{AttentionShape, KernelError, KvCacheShape};

/// A zeroed buffer of `n` values, backed by huge pages where the kernel allows (Linux's
/// transparent huge pages in `madvise` mode): a sequence's blocks lie anywhere in the pool,
/// and with 4 KiB pages attention over 16 × 1,024 tokens took about 1.2× as long
/// (`attention_probe`, likely TLB misses: this VM exposes no counters to say).
fn zeroed<T: bytemuck::Zeroable>(n: usize) -> Vec<T> {
    // Zeroed by the allocator (fresh pages from the OS), not written here: pages touched
    // before the advice would stay 4 KiB ones.
    let layout = std::alloc::Layout::array::<T>(n).expect("a KV cache within the address space");
    let mut v = if layout.size() == 0 {
        Vec::new()
    } else {
        // SAFETY: the layout is non-zero; all-zero bytes are a valid `T` (`Zeroable`); the
        // vector owns the allocation, made by the global allocator with `T`'s array layout.
        unsafe {
            let p = std::alloc::alloc_zeroed(layout) as *mut T;
            if p.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            Vec::from_raw_parts(p, n, n)
        }
    };
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let (start, len) = (v.as_ptr() as usize, std::mem::size_of_val(v.as_slice()));
        let aligned = start.next_multiple_of(PAGE);
        if len > aligned - start + PAGE {
            let span = (len - (aligned - start)) / PAGE * PAGE;
            // SAFETY: advice on pages inside this live allocation; it changes no contents.
            unsafe { libc::madvise(aligned as *mut libc::c_void, span, libc::MADV_HUGEPAGE) };
        }
    }
    commit_pages(&mut v);
    v
}

/// Writes a zero into every page of `v`, so that the pool is resident from the start, as
/// large as the KV budget made it: left to fault in as the free queue first reaches each
/// block, the server's RSS grew for minutes under load (720 MiB of it in a long
/// `sluice bench soak`, which reads as a leak) and steps paid the page faults.
fn commit_pages<T: bytemuck::Zeroable>(v: &mut [T]) {
    const PAGE: usize = 4096;
    let (p, len) = (v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v));
    for at in (0..len).step_by(PAGE) {
        // SAFETY: `at < len`, inside the slice; a zero byte is what the page already holds,
        // and the volatile write keeps the compiler from dropping it as such.
        unsafe { std::ptr::write_volatile(p.add(at), 0) };
    }
}

/// Most tokens per RoPE/store task.
const ROPE_CHUNK: usize = 32;

/// K and V of every layer: f16 by default (the precision of llama.cpp's default cache and of
/// a GPU one), or llama.cpp's q8_0.
pub struct CpuKvCache {
    pub shape: KvCacheShape,
    pub(super) store: KvStore,
}

/// Per layer, in the layouts of the module docs; an 8-bit layer's scales are `[num_blocks,
/// num_kv_heads, head_dim / 32, block_size]` for K and `[num_blocks, num_kv_heads,
/// block_size, head_dim / 32]` for V.
pub(super) enum KvStore {
    F16 {
        k: Vec<Vec<f16>>,
        v: Vec<Vec<f16>>,
    },
    Int8 {
        k: Vec<Vec<i8>>,
        k_scales: Vec<Vec<f16>>,
        v: Vec<Vec<i8>>,
        v_scales: Vec<Vec<f16>>,
    },
}

impl CpuKvCache {
    /// An f16 cache.
    pub fn new(shape: KvCacheShape) -> Self {
        let per_layer = shape.num_blocks * shape.num_kv_heads * shape.block_size * shape.head_dim;
        let layers =
            || -> Vec<Vec<f16>> { (0..shape.num_layers).map(|_| zeroed(per_layer)).collect() };
        Self {
            shape,
            store: KvStore::F16 {
                k: layers(),
                v: layers(),
            },
        }
    }

    /// A cache of `dtype`; an 8-bit one needs a head dimension of whole groups of 32.
    pub fn with_dtype(shape: KvCacheShape, dtype: KvCacheDtype) -> Result<Self, KernelError> {
        if dtype == KvCacheDtype::F16 {
            return Ok(Self::new(shape));
        }
        if !shape.head_dim.is_multiple_of(GROUP) {
            return Err(KernelError::Unsupported(format!(
                "--kv-cache-dtype {dtype} stores groups of {GROUP} values of a head, and this \
                 model's head dimension is {}; use --kv-cache-dtype f16",
                shape.head_dim
            )));
        }
        let per_layer = shape.num_blocks * shape.num_kv_heads * shape.block_size * shape.head_dim;
        let layers =
            |n: usize| -> Vec<Vec<i8>> { (0..shape.num_layers).map(|_| zeroed(n)).collect() };
        let scales = || -> Vec<Vec<f16>> {
            (0..shape.num_layers)
                .map(|_| zeroed(per_layer / GROUP))
                .collect()
        };
        Ok(Self {
            shape,
            store: KvStore::Int8 {
                k: layers(per_layer),
                k_scales: scales(),
                v: layers(per_layer),
                v_scales: scales(),
            },
        })
    }

    pub fn dtype(&self) -> KvCacheDtype {
        match self.store {
            KvStore::F16 { .. } => KvCacheDtype::F16,
            KvStore::Int8 { .. } => KvCacheDtype::Int8,
        }
    }

    /// A layer's f16 K and V, if the cache is f16.
    pub(super) fn f16_layer(&self, layer: usize) -> Option<(&[f16], &[f16])> {
        match &self.store {
            KvStore::F16 { k, v } => Some((&k[layer], &v[layer])),
            KvStore::Int8 { .. } => None,
        }
    }

    /// Offset of (block, KV head) in a layer's K or V buffer; the region is
    /// `block_size * head_dim` long in both (and `1 / 32` of that in the scales).
    pub(super) fn head_base(&self, block: usize, head: usize) -> usize {
        let s = &self.shape;
        (block * s.num_kv_heads + head) * s.block_size * s.head_dim
    }

    pub fn copy_blocks(&mut self, copies: &[(u32, u32)]) {
        let block_len = self.shape.num_kv_heads * self.shape.block_size * self.shape.head_dim;
        fn copy<T: Copy>(layers: &mut [Vec<T>], copies: &[(u32, u32)], len: usize) {
            for layer in layers {
                for &(src, dst) in copies {
                    let (src, dst) = (src as usize * len, dst as usize * len);
                    layer.copy_within(src..src + len, dst);
                }
            }
        }
        match &mut self.store {
            KvStore::F16 { k, v } => {
                copy(k, copies, block_len);
                copy(v, copies, block_len);
            }
            KvStore::Int8 {
                k,
                k_scales,
                v,
                v_scales,
            } => {
                copy(k, copies, block_len);
                copy(v, copies, block_len);
                copy(k_scales, copies, block_len / GROUP);
                copy(v_scales, copies, block_len / GROUP);
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
    let writer = match &mut kv.store {
        KvStore::F16 { k, v } => SlotWriter::F16 {
            k: SyncPtr::new(&mut k[layer]),
            v: SyncPtr::new(&mut v[layer]),
        },
        KvStore::Int8 {
            k,
            k_scales,
            v,
            v_scales,
        } => SlotWriter::Int8 {
            k: SyncPtr::new(&mut k[layer]),
            k_scales: SyncPtr::new(&mut k_scales[layer]),
            v: SyncPtr::new(&mut v[layer]),
            v_scales: SyncPtr::new(&mut v_scales[layer]),
        },
    };
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
                let (k_row, v_row) = (&row[(h + g) * d..][..d], &row[(h + kvh + g) * d..][..d]);
                // SAFETY: slots are distinct per token, so each token's writes are its own.
                unsafe { writer.write(base + g * head_stride, bs, offset, k_row, v_row, &mut tmp) };
            }
        }
    });
}

/// Where one layer's K and V go, as the cache stores them.
enum SlotWriter {
    F16 {
        k: SyncPtr<f16>,
        v: SyncPtr<f16>,
    },
    Int8 {
        k: SyncPtr<i8>,
        k_scales: SyncPtr<f16>,
        v: SyncPtr<i8>,
        v_scales: SyncPtr<f16>,
    },
}

impl SlotWriter {
    /// Writes one token's K and V rows (`head_dim` long) of one KV head into slot `offset` of
    /// the (block, head) region at `at`. K's dimension `i` sits at `i * bs + offset` of an
    /// f16 region (transposed), at `k_index(i, offset, bs)` of an 8-bit one (transposed in
    /// pairs), and its group `g`'s scale at `g * bs + offset` of the scales' region.
    ///
    /// # Safety
    /// The region must be in bounds, and the slot written by no other task at the same time.
    unsafe fn write(
        &self,
        at: usize,
        bs: usize,
        offset: usize,
        k_row: &[f32],
        v_row: &[f32],
        tmp: &mut [f16; 256],
    ) {
        let d = k_row.len();
        match self {
            Self::F16 { k, v } => {
                let k = k.slice(at, bs * d);
                for (c, k_part) in k_row.chunks(tmp.len()).enumerate() {
                    let kh = &mut tmp[..k_part.len()];
                    kh.convert_from_f32_slice(k_part);
                    for (i, &x) in kh.iter().enumerate() {
                        k[(c * 256 + i) * bs + offset] = x;
                    }
                }
                v.slice(at + offset * d, d).convert_from_f32_slice(v_row);
            }
            Self::Int8 {
                k,
                k_scales,
                v,
                v_scales,
            } => {
                let groups = d / GROUP;
                let (k, ks) = (k.slice(at, bs * d), k_scales.slice(at / GROUP, bs * groups));
                let mut codes = [0i8; GROUP];
                for (g, part) in k_row.chunks_exact(GROUP).enumerate() {
                    ks[g * bs + offset] = quantize_group(part, &mut codes);
                    for (i, &c) in codes.iter().enumerate() {
                        k[k_index(g * GROUP + i, offset, bs)] = c;
                    }
                }
                let v = v.slice(at + offset * d, d);
                let vs = v_scales.slice((at + offset * d) / GROUP, groups);
                for ((part, out), scale) in v_row
                    .chunks_exact(GROUP)
                    .zip(v.chunks_exact_mut(GROUP))
                    .zip(vs.iter_mut())
                {
                    *scale = quantize_group(part, &mut codes);
                    out.copy_from_slice(&codes);
                }
            }
        }
    }
}
