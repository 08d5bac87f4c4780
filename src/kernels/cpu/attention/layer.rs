//! One layer of the cache as the attention loop reads it: a (block, KV head) region, and the
//! kernels for its storage type, so that one loop (`attend_tasks`) serves every type.

use half::f16;

use super::kernels::{accumulate_v, block_pair_scores, block_scores, GroupQuery, KvBlock, Scratch};
use super::kernels_q8::{accumulate_v_q8, block_scores_q8, KvBlockQ8, GROUP};
use super::kv_cache::{CpuKvCache, KvStore};

/// A layer's K and V and the kernels that read them.
pub(super) trait KvLayer: Sync {
    type Block<'a>: Copy
    where
        Self: 'a;

    /// Whether the scores take the query as 16-bit codes (`GroupQuery::q16`).
    const QUANTIZED_QUERY: bool = false;

    fn block_size(&self) -> usize;

    /// Starts loading `part` of the block into the cache.
    fn prefetch(blk: Self::Block<'_>, part: Part);

    /// The region of (`block`, `head`), whose first `n` keys are in the context.
    fn block(&self, block: usize, head: usize, n: usize) -> Self::Block<'_>;

    /// `scores[h * stride + j] = scale * q_h · k_j` for the block's keys.
    fn scores(
        gq: GroupQuery<'_>,
        blk: Self::Block<'_>,
        scores: &mut [f32],
        stride: usize,
        scratch: &mut Scratch,
    );

    /// [`KvLayer::scores`] of two consecutive blocks (`first` full), `second`'s scores
    /// `block_size` further along each row; the same bits as one block at a time.
    fn pair_scores(
        gq: GroupQuery<'_>,
        first: Self::Block<'_>,
        second: Self::Block<'_>,
        scores: &mut [f32],
        stride: usize,
        scratch: &mut Scratch,
    );

    /// `out_h += Σ_j p[h * stride + j] · v_j` in key order; `out` is `[heads][head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn accumulate_v(
        heads: usize,
        p: &[f32],
        stride: usize,
        blk: Self::Block<'_>,
        d: usize,
        out: &mut [f32],
        scratch: &mut Scratch,
    );
}

/// An f16 layer.
pub(super) struct F16Layer<'a> {
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub cache: &'a CpuKvCache,
}

impl KvLayer for F16Layer<'_> {
    type Block<'a>
        = KvBlock<'a>
    where
        Self: 'a;

    fn block_size(&self) -> usize {
        self.cache.shape.block_size
    }

    fn prefetch(blk: KvBlock<'_>, part: Part) {
        prefetch_slice(if part == Part::K { blk.k } else { blk.v });
    }

    fn block(&self, block: usize, head: usize, n: usize) -> KvBlock<'_> {
        let (bs, d) = (self.cache.shape.block_size, self.cache.shape.head_dim);
        let base = self.cache.head_base(block, head);
        KvBlock {
            k: &self.k[base..][..bs * d],
            v: &self.v[base..][..bs * d],
            block_size: bs,
            n,
        }
    }

    fn scores(g: GroupQuery<'_>, b: KvBlock<'_>, s: &mut [f32], st: usize, sc: &mut Scratch) {
        block_scores(g, b, s, st, sc);
    }

    fn pair_scores(
        g: GroupQuery<'_>,
        first: KvBlock<'_>,
        second: KvBlock<'_>,
        s: &mut [f32],
        st: usize,
        sc: &mut Scratch,
    ) {
        block_pair_scores(g, first, second, s, st, sc);
    }

    fn accumulate_v(
        heads: usize,
        p: &[f32],
        st: usize,
        b: KvBlock<'_>,
        d: usize,
        out: &mut [f32],
        sc: &mut Scratch,
    ) {
        accumulate_v(heads, p, st, b, d, out, sc);
    }
}

/// An 8-bit layer (`kernels_q8.rs`).
pub(super) struct Q8Layer<'a> {
    pub k: &'a [i8],
    pub k_scales: &'a [f16],
    pub v: &'a [i8],
    pub v_scales: &'a [f16],
    pub cache: &'a CpuKvCache,
}

impl KvLayer for Q8Layer<'_> {
    type Block<'a>
        = KvBlockQ8<'a>
    where
        Self: 'a;

    const QUANTIZED_QUERY: bool = true;

    fn block_size(&self) -> usize {
        self.cache.shape.block_size
    }

    fn prefetch(blk: KvBlockQ8<'_>, part: Part) {
        match part {
            Part::K => {
                prefetch_slice(blk.k);
                prefetch_slice(blk.k_scales);
            }
            Part::V => {
                prefetch_slice(blk.v);
                prefetch_slice(blk.v_scales);
            }
        }
    }

    fn block(&self, block: usize, head: usize, n: usize) -> KvBlockQ8<'_> {
        let (bs, d) = (self.cache.shape.block_size, self.cache.shape.head_dim);
        let base = self.cache.head_base(block, head);
        let scales = bs * d / GROUP;
        KvBlockQ8 {
            k: &self.k[base..][..bs * d],
            k_scales: &self.k_scales[base / GROUP..][..scales],
            v: &self.v[base..][..bs * d],
            v_scales: &self.v_scales[base / GROUP..][..scales],
            block_size: bs,
            n,
        }
    }

    fn scores(g: GroupQuery<'_>, b: KvBlockQ8<'_>, s: &mut [f32], st: usize, _: &mut Scratch) {
        block_scores_q8(g, b, s, st);
    }

    fn pair_scores(
        g: GroupQuery<'_>,
        first: KvBlockQ8<'_>,
        second: KvBlockQ8<'_>,
        s: &mut [f32],
        st: usize,
        _: &mut Scratch,
    ) {
        block_scores_q8(g, first, s, st);
        block_scores_q8(g, second, &mut s[first.block_size..], st);
    }

    fn accumulate_v(
        heads: usize,
        p: &[f32],
        st: usize,
        b: KvBlockQ8<'_>,
        d: usize,
        out: &mut [f32],
        _: &mut Scratch,
    ) {
        accumulate_v_q8(heads, p, st, b, d, out);
    }
}

impl CpuKvCache {
    /// Runs `f` on `layer` as its storage type's [`KvLayer`].
    pub(super) fn with_layer<R>(&self, layer: usize, f: impl LayerFn<Output = R>) -> R {
        match &self.store {
            KvStore::F16 { k, v } => f.call(F16Layer {
                k: &k[layer],
                v: &v[layer],
                cache: self,
            }),
            KvStore::Int8 {
                k,
                k_scales,
                v,
                v_scales,
            } => f.call(Q8Layer {
                k: &k[layer],
                k_scales: &k_scales[layer],
                v: &v[layer],
                v_scales: &v_scales[layer],
                cache: self,
            }),
        }
    }
}

/// Work over a layer of any storage type (a closure cannot be generic over it).
pub(super) trait LayerFn {
    type Output;
    fn call<L: KvLayer>(self, layer: L) -> Self::Output;
}

/// Which half of a block [`KvLayer::prefetch`] loads.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    K,
    V,
}

/// Asks for the cache lines of `s`.
#[inline(always)]
fn prefetch_slice<T>(s: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let (p, len) = (s.as_ptr() as *const i8, std::mem::size_of_val(s));
        for off in (0..len).step_by(64) {
            // SAFETY: a prefetch of an address inside `s` never faults and changes nothing.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(off)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = s;
}
