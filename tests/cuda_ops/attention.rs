//! Paged attention (RoPE, the K/V write into slots, prefill and decode kernels) of
//! `CudaBackend` against the CPU backend, step after step on one KV cache:
//!
//! ```text
//! step A  prefill  s0: 37 tokens (2 blocks + 5)   s1: 16 (exactly one block)   s2: 1
//! step B  chunk    s0: +20 over a cached 37       s1: decode   s2: +40   s3: prefill 5
//! fork    s4 = copy of s1's blocks (copy_blocks), then decodes on the copies
//! step C  decode   s0..s4, contexts ≤ 64: one partition (split-KV off)
//! step D  chunk    s0: +600, then decode s0 and s1: contexts ~660, split-KV on
//! ```
//! Block ids are shuffled, so no table is contiguous. Both caches hold f16 (the GPU one also
//! bf16 in one case); outputs are compared, never cache contents (the layouts differ).

use rand::seq::SliceRandom;
use sluice::kernels::cpu::attention::CpuKvCache;
use sluice::kernels::cuda::backend::CudaKvCache;
use sluice::kernels::cuda::KvDType;
use sluice::kernels::{AttentionShape, Backend, BatchSeq, ForwardBatch, KvCacheShape, Rope};

use crate::{assert_close, cpu, cpu_tensor, gpu_tensor, host_pair, rng, uniform};

const NUM_BLOCKS: usize = 160;

struct Case {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    kv: KvDType,
    interleaved: bool,
}

/// A sequence's cached tokens and its blocks (allocated up front, enough for every step).
struct Seq {
    len: usize,
    blocks: Vec<u32>,
}

/// The batch of `(sequence, new tokens)` in order, advancing each sequence's length.
fn batch(seqs: &mut [Seq], work: &[(usize, usize)], bs: usize) -> ForwardBatch {
    let mut b = ForwardBatch::default();
    for &(s, q) in work {
        let seq = &mut seqs[s];
        let start = b.token_ids.len();
        for pos in seq.len..seq.len + q {
            b.token_ids.push(0);
            b.positions.push(pos as u32);
            b.slot_mapping
                .push(seq.blocks[pos / bs] * bs as u32 + (pos % bs) as u32);
        }
        seq.len += q;
        b.seqs.push(BatchSeq {
            query_start: start,
            query_len: q,
            context_len: seq.len,
            block_table: seq.blocks[..seq.len.div_ceil(bs)].to_vec(),
            prompt_len: 0,
        });
        b.logits_rows.push((b.token_ids.len() - 1) as u32);
    }
    b
}

/// The CPU half runs without a GPU too (it checks the batches are well formed); the
/// comparison when a GPU is usable.
fn run_case(case: &Case, seed: u64) {
    let g = crate::gpu_eager(case.kv);
    let c = cpu();
    let (h, kvh, d, bs) = (case.heads, case.kv_heads, case.head_dim, case.block_size);
    let shape = AttentionShape {
        num_heads: h,
        num_kv_heads: kvh,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
        window: None,
        softcap: None,
    };
    let kv_shape = KvCacheShape {
        num_layers: 2,
        num_blocks: NUM_BLOCKS,
        block_size: bs,
        num_kv_heads: kvh,
        head_dim: d,
    };
    let rope = Rope {
        inv_freqs: (0..d / 2)
            .map(|i| 10_000f32.powf(-2.0 * i as f32 / d as f32))
            .collect(),
        interleaved: case.interleaved,
        theta_base: 10_000.0,
        freq_factors: None,
    };
    let mut ids: Vec<u32> = (0..NUM_BLOCKS as u32).collect();
    ids.shuffle(&mut rng(seed));
    let mut free = ids.into_iter();
    let mut take = |n: usize| -> Vec<u32> { free.by_ref().take(n).collect() };
    let mut seqs: Vec<Seq> = [700, 40, 64, 16]
        .iter()
        .map(|&max| Seq {
            len: 0,
            blocks: take(max / bs + 1),
        })
        .collect();
    let fork_blocks = take(3);
    let mut gkv = g.as_ref().map(|g| g.kv_cache(kv_shape).unwrap());
    let mut ckv = c.kv_cache(kv_shape).unwrap();
    // Both layers run, on different values, so a wrong layer index shows.
    let mut r = rng(seed + 1);
    let mut step = |seqs: &mut [Seq],
                    work: &[(usize, usize)],
                    name: &str,
                    gkv: &mut Option<CudaKvCache>,
                    ckv: &mut CpuKvCache| {
        let b = batch(seqs, work, bs);
        let cs = c.prepare_step(&b, &rope);
        let gs = g.as_ref().map(|g| g.prepare_step(&b, &rope));
        let n = b.num_tokens();
        let cols = (h + 2 * kvh) * d;
        for layer in [0, 1] {
            // Q larger than K so that softmax peaks: a wrong mask or block shows clearly.
            let qkv: Vec<f32> = (0..n * cols)
                .map(|i| uniform(&mut r, 1, if i % cols < h * d { 3.0 } else { 1.0 })[0])
                .collect();
            let mut cq = cpu_tensor(n, cols, &qkv);
            let mut co = c.tensor();
            c.attention(&mut cq, shape, layer, ckv, &cs, &mut co);
            let (Some(g), Some(gs), Some(gkv)) = (&g, &gs, gkv.as_mut()) else {
                continue;
            };
            let mut gq = gpu_tensor(g, n, cols, &qkv);
            let mut go = g.tensor();
            g.attention(&mut gq, shape, layer, gkv, gs, &mut go);
            let (got, want) = host_pair(g, &go, &c, &co);
            // f16 caches hold the same rounded values up to a rare last-bit difference of
            // RoPE's sin/cos; a bf16 cache rounds K and V to 2⁻⁹ relative.
            let tol = if case.kv == KvDType::BF16 {
                1.5e-2
            } else {
                1.5e-3
            };
            let what = format!(
                "attention h={h} kv={kvh} d={d} bs={bs} {:?} step {name} layer {layer}",
                case.kv
            );
            assert_close(&what, &got, &want, tol, tol);
        }
    };
    step(
        &mut seqs,
        &[(0, 37), (1, 16), (2, 1)],
        "A",
        &mut gkv,
        &mut ckv,
    );
    step(
        &mut seqs,
        &[(0, 20), (1, 1), (2, 40), (3, 5)],
        "B",
        &mut gkv,
        &mut ckv,
    );
    // Fork s1 (17 tokens, two blocks at block size 16) onto fresh blocks.
    let nb = seqs[1].len.div_ceil(bs);
    let copies: Vec<(u32, u32)> = (0..nb)
        .map(|i| (seqs[1].blocks[i], fork_blocks[i]))
        .collect();
    if let (Some(g), Some(gkv)) = (&g, gkv.as_mut()) {
        g.copy_blocks(gkv, &copies);
    }
    c.copy_blocks(&mut ckv, &copies);
    seqs.push(Seq {
        len: seqs[1].len,
        blocks: fork_blocks,
    });
    step(
        &mut seqs,
        &[(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)],
        "C",
        &mut gkv,
        &mut ckv,
    );
    step(&mut seqs, &[(0, 600)], "D chunk", &mut gkv, &mut ckv);
    step(&mut seqs, &[(0, 1), (1, 1)], "D decode", &mut gkv, &mut ckv);
    step(
        &mut seqs,
        &[(1, 1), (0, 1)],
        "D decode again",
        &mut gkv,
        &mut ckv,
    );
}

#[test]
fn gqa_1_head_dim_64() {
    run_case(
        &Case {
            heads: 4,
            kv_heads: 4,
            head_dim: 64,
            block_size: 16,
            kv: KvDType::F16,
            interleaved: false,
        },
        1,
    );
}

#[test]
fn gqa_3_head_dim_64_smollm2_shape_interleaved() {
    run_case(
        &Case {
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            block_size: 16,
            kv: KvDType::F16,
            interleaved: true,
        },
        2,
    );
}

#[test]
fn gqa_4_head_dim_128_block_32() {
    run_case(
        &Case {
            heads: 8,
            kv_heads: 2,
            head_dim: 128,
            block_size: 32,
            kv: KvDType::F16,
            interleaved: false,
        },
        3,
    );
}

#[test]
fn gqa_8_head_dim_128_llama3_shape_bf16() {
    run_case(
        &Case {
            heads: 32,
            kv_heads: 4,
            head_dim: 128,
            block_size: 16,
            kv: KvDType::BF16,
            interleaved: false,
        },
        4,
    );
}

#[test]
fn gqa_8_head_dim_64() {
    run_case(
        &Case {
            heads: 16,
            kv_heads: 2,
            head_dim: 64,
            block_size: 16,
            kv: KvDType::F16,
            interleaved: true,
        },
        5,
    );
}

#[test]
fn gqa_3_head_dim_128_bf16() {
    run_case(
        &Case {
            heads: 12,
            kv_heads: 4,
            head_dim: 128,
            block_size: 16,
            kv: KvDType::BF16,
            interleaved: false,
        },
        6,
    );
}
