//! The 8-bit KV cache (`--kv-cache-dtype int8`) against the f16 one on the default model:
//! teacher-forced next-token distributions over the fixtures' texts (the teacher-forced text
//! and the two long greedy fixtures, prompt and continuation), computed through each
//! attention path (a whole prompt at once, chunks over a cached prefix, one token at a time).
//! Reported: the mean KL divergence of the 8-bit cache's distributions from the f16 cache's,
//! and top-1 agreement: at least 95% of positions, a different top-1 only where f16's top
//! two are within 0.5 (the 8-bit rounding moves logits by up to ~0.3, so which of the
//! near-ties flip changes with the last bits of the matmuls).

use crate::common;

use sluice::kernels::cpu::CpuBackend;
use sluice::kernels::dtype::KvCacheDtype;
use sluice::kernels::{BatchSeq, ForwardBatch};
use sluice::model::config::ModelConfig;
use sluice::model::llama::Llama;

const BLOCK_SIZE: usize = 16;
/// The f16 cache's top-2 logit margin below which the 8-bit cache may pick another top-1:
/// its rounding moves a logit by up to about 0.3 here, so which near-ties flip depends on
/// the last bits of everything else (the AVX2 and AVX-512 matmuls, say).
const NEAR_TIE: f32 = 0.5;
/// Least share of positions whose top-1 is f16's (llama.cpp's `--kl-divergence` "same top").
const MIN_SAME_TOP: f64 = 0.95;
/// Bound on the mean KL divergence (nats) per position; measured 2026-12-07: see
/// `docs/benchmarks.md` ("8-bit KV cache").
const MEAN_KL_BOUND: f64 = 0.01;

fn model(dtype: KvCacheDtype) -> Llama<CpuBackend> {
    let f = common::default_gguf();
    let config = ModelConfig::from_gguf(&f).unwrap();
    Llama::load(config, &f, CpuBackend::new(2).with_kv_cache_dtype(dtype)).unwrap()
}

/// Every position's logits of `ids` as one sequence, fed `chunk` tokens per step (a prompt
/// chunk attends over the cached ones; 1 is decoding).
fn logits_by_chunks(model: &mut Llama<CpuBackend>, ids: &[u32], chunk: usize) -> Vec<Vec<f32>> {
    let n = ids.len();
    let blocks = n.div_ceil(BLOCK_SIZE);
    let mut kv = model.kv_cache(blocks, BLOCK_SIZE).unwrap();
    // Blocks in reverse order, so the table is really read through.
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let slot = |p: usize| table[p / BLOCK_SIZE] * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32;
    let mut rows = Vec::new();
    for start in (0..n).step_by(chunk) {
        let end = (start + chunk).min(n);
        let batch = ForwardBatch {
            token_ids: ids[start..end].to_vec(),
            positions: (start as u32..end as u32).collect(),
            slot_mapping: (start..end).map(slot).collect(),
            seqs: vec![BatchSeq {
                query_start: 0,
                query_len: end - start,
                context_len: end,
                block_table: table.clone(),
                prompt_len: n,
            }],
            logits_rows: (0..(end - start) as u32).collect(),
            hidden_rows: Vec::new(),
        };
        let logits = model.forward(&batch, &mut kv);
        rows.extend(
            logits
                .chunks_exact(model.config.vocab_size)
                .map(<[f32]>::to_vec),
        );
    }
    rows
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + row
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// `KL(p || q)` of two rows of logits.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}

fn top2(row: &[f32]) -> (usize, f32) {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    (idx[0], row[idx[0]] - row[idx[1]])
}

#[test]
fn int8_cache_stays_near_f16_on_every_attention_path() {
    let mut texts = vec![common::teacher_forced_fixture().ids];
    for f in common::greedy_long_fixtures() {
        texts.push([f.prompt_ids, f.greedy_ids].concat());
    }
    let (mut f16, mut int8) = (model(KvCacheDtype::F16), model(KvCacheDtype::Int8));
    let mut report = String::new();
    for (path, chunk) in [("prompt", usize::MAX), ("chunks of 48", 48), ("decode", 1)] {
        let (mut kl_sum, mut kl_max, mut positions, mut agree) = (0.0, 0.0f64, 0, 0);
        for ids in &texts {
            // Decoding every position of the long texts adds minutes; 160 suffice.
            let ids = if chunk == 1 {
                &ids[..ids.len().min(160)]
            } else {
                &ids[..]
            };
            let reference = logits_by_chunks(&mut f16, ids, chunk.min(ids.len()));
            let ours = logits_by_chunks(&mut int8, ids, chunk.min(ids.len()));
            for (pos, (r, o)) in reference.iter().zip(&ours).enumerate() {
                let d = kl(r, o);
                kl_sum += d;
                kl_max = kl_max.max(d);
                positions += 1;
                let ((rt, margin), (ot, _)) = (top2(r), top2(o));
                if rt == ot {
                    agree += 1;
                } else {
                    assert!(
                        margin < NEAR_TIE,
                        "{path}, position {pos}: top-1 {ot} against f16's {rt}, whose margin \
                         {margin:.3} is no near-tie"
                    );
                }
            }
        }
        let mean = kl_sum / positions as f64;
        report.push_str(&format!(
            "{path}: {positions} positions, mean KL {mean:.2e} nats (max {kl_max:.2e}), top-1 \
             equal at {agree}\n"
        ));
        assert!(
            mean < MEAN_KL_BOUND,
            "{path}: mean KL {mean} nats\n{report}"
        );
        assert!(
            agree as f64 >= MIN_SAME_TOP * positions as f64,
            "{path}: the same top-1 at only {agree} of {positions} positions\n{report}"
        );
    }
    eprintln!("8-bit KV cache against f16:\n{report}");
}

/// An 8-bit cache needs whole groups of 32 values per head; a model whose head dimension is
/// not is refused at cache creation, naming the flag.
#[test]
fn int8_cache_refuses_a_head_dim_off_its_groups() {
    use sluice::kernels::cpu::attention::CpuKvCache;
    use sluice::kernels::KvCacheShape;
    let shape = KvCacheShape {
        num_layers: 1,
        num_blocks: 2,
        block_size: 16,
        num_kv_heads: 1,
        head_dim: 48,
    };
    let err = match CpuKvCache::with_dtype(shape, KvCacheDtype::Int8) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a head dimension of 48 was accepted"),
    };
    assert!(
        err.contains("--kv-cache-dtype int8") && err.contains("48"),
        "{err}"
    );
}

/// `--cpu-numerics ggml` is llama.cpp's f16-cache arithmetic; an 8-bit cache is refused
/// with it, naming both flags.
#[test]
fn ggml_numerics_refuse_an_int8_cache() {
    use sluice::kernels::cpu::CpuNumerics;
    use sluice::kernels::{Backend, KvCacheShape};
    let backend =
        CpuBackend::with_numerics(1, CpuNumerics::Ggml).with_kv_cache_dtype(KvCacheDtype::Int8);
    let shape = KvCacheShape {
        num_layers: 1,
        num_blocks: 2,
        block_size: 16,
        num_kv_heads: 1,
        head_dim: 64,
    };
    let err = match backend.kv_cache(shape) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("the ggml numerics accepted an 8-bit cache"),
    };
    assert!(
        err.contains("--cpu-numerics ggml") && err.contains("int8"),
        "{err}"
    );
}
