//! Decode steps replayed from captured CUDA graphs against the same steps run eagerly (a
//! second backend with graphs off), on seeded dummy weights at the default model's shape.
//!
//! Twelve sequences are prefilled (ragged prompts), then 48 decode steps run with a changing
//! set of sequences (1 to 12 a step, so the batch is padded to 1, 2, 4, 8 or 16) and growing
//! contexts that cross block boundaries, both models fed the eager model's greedy token. The
//! graph backend must have captured graphs and replayed them. Tolerance: the replayed step
//! runs at the padded size with the decode split count sized for the arena's longest context,
//! so cuBLAS and the split-KV merge may sum in another order than the eager step:
//! 1e-3 · max|logit| (f32 weights, f16 KV), and the same greedy token.

use sluice::kernels::cuda::KvDType;
use sluice::kernels::dtype::WeightDType;
use sluice::kernels::{BatchSeq, ForwardBatch};
use sluice::model::llama::Llama;
use sluice::model::weights::DummyWeights;

use crate::e2e::smollm2_135m_config;

const BLOCK_SIZE: usize = 16;
const SEQS: usize = 12;
const STEPS: usize = 48;

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// The sequences decoding at `step`: a count cycling through 1..=12, starting at a moving
/// offset, so batch sizes and members change every step.
fn active(step: usize) -> Vec<usize> {
    let n = [5, 1, 12, 3, 8, 2, 9, 16, 7, 4, 11, 6][step % 12].min(SEQS);
    (0..n)
        .map(|i| (i * 5 + step) % SEQS)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn batch(
    tokens: &[Vec<u32>],
    cached: &mut [usize],
    blocks: &[Vec<u32>],
    seqs: &[usize],
) -> ForwardBatch {
    let mut b = ForwardBatch::default();
    for &s in seqs {
        let start = b.token_ids.len();
        for pos in cached[s]..tokens[s].len() {
            b.token_ids.push(tokens[s][pos]);
            b.positions.push(pos as u32);
            b.slot_mapping
                .push(blocks[s][pos / BLOCK_SIZE] * BLOCK_SIZE as u32 + (pos % BLOCK_SIZE) as u32);
        }
        cached[s] = tokens[s].len();
        b.seqs.push(BatchSeq {
            query_start: start,
            query_len: b.token_ids.len() - start,
            context_len: cached[s],
            block_table: blocks[s][..cached[s].div_ceil(BLOCK_SIZE)].to_vec(),
            prompt_len: 0,
        });
        b.logits_rows.push((b.token_ids.len() - 1) as u32);
    }
    b
}

#[test]
fn graph_replayed_decode_matches_eager() {
    let Some(graphs) = crate::gpu(KvDType::F16) else {
        return;
    };
    let Some(eager) = crate::gpu_eager(KvDType::F16) else {
        return;
    };
    let config = smollm2_135m_config();
    let weights = DummyWeights::new(config.clone(), WeightDType::F32, 11).expect("dummy weights");
    let mut gm = Llama::load(config.clone(), &weights, graphs).expect("graph model");
    let mut em = Llama::load(config.clone(), &weights, eager).expect("eager model");
    let mut tokens: Vec<Vec<u32>> = (0..SEQS)
        .map(|s| {
            (0..3 + 7 * s as u32)
                .map(|i| (i * 31 + s as u32 * 101) % 49_152)
                .collect()
        })
        .collect();
    let per_seq = (3 + 7 * SEQS + STEPS + 1).div_ceil(BLOCK_SIZE) as u32;
    let blocks: Vec<Vec<u32>> = (0..SEQS as u32)
        .map(|s| (s * per_seq..(s + 1) * per_seq).rev().collect())
        .collect();
    let num_blocks = (SEQS as u32 * per_seq) as usize;
    let mut gkv = gm.kv_cache(num_blocks, BLOCK_SIZE).expect("KV cache");
    let mut ekv = em.kv_cache(num_blocks, BLOCK_SIZE).expect("KV cache");
    let (mut gc, mut ec) = (vec![0; SEQS], vec![0; SEQS]);
    let all: Vec<usize> = (0..SEQS).collect();
    let vocab = config.vocab_size;
    let mut worst = 0.0f32;
    for step in 0..=STEPS {
        let seqs = if step == 0 { all.clone() } else { active(step) };
        let gb = batch(&tokens, &mut gc, &blocks, &seqs);
        let eb = batch(&tokens, &mut ec, &blocks, &seqs);
        let (gl, el) = (gm.forward(&gb, &mut gkv), em.forward(&eb, &mut ekv));
        assert_eq!(gl.len(), seqs.len() * vocab, "step {step}: logits rows");
        for (r, &s) in seqs.iter().enumerate() {
            let (g, e) = (
                &gl[r * vocab..(r + 1) * vocab],
                &el[r * vocab..(r + 1) * vocab],
            );
            let scale = e.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
            let diff = g
                .iter()
                .zip(e)
                .fold(0.0f32, |m, (&a, &b)| m.max((a - b).abs()));
            worst = worst.max(diff / scale);
            assert!(
                diff <= 1e-3 * scale,
                "step {step} ({} seqs) seq {s}: replayed logits differ by {diff} (scale {scale})",
                seqs.len()
            );
            assert_eq!(argmax(g), argmax(e), "step {step} seq {s}: greedy token");
            tokens[s].push(argmax(e));
        }
    }
    let stats = gm.backend().graph_stats();
    println!(
        "graphs: {} captured in {:.1?} ({:.1} MiB), {} replays; worst difference {worst:.2e} of max|logit|",
        stats.num_captured,
        stats.capture_time,
        stats.memory_bytes as f64 / (1 << 20) as f64,
        stats.num_replays
    );
    assert!(stats.num_captured >= 4, "{stats:?}");
    assert!(stats.num_replays >= STEPS / 2, "{stats:?}");
}

#[test]
fn warmup_batches_capture_every_size() {
    let Some(g) = crate::gpu(KvDType::F16) else {
        return;
    };
    let config = smollm2_135m_config();
    let weights = DummyWeights::new(config.clone(), WeightDType::BF16, 3).expect("dummy weights");
    let mut m = Llama::load(config, &weights, g).expect("model");
    let mut kv = m.kv_cache(64, BLOCK_SIZE).expect("KV cache");
    let batches = m.backend().decode_graph_warmup();
    assert!(!batches.is_empty());
    for b in &batches {
        // The first run sizes the buffers eagerly, the second captures.
        m.forward(b, &mut kv);
        m.forward(b, &mut kv);
    }
    let stats = m.backend().graph_stats();
    println!("warm-up: {stats:?}");
    assert_eq!(stats.num_captured, batches.len(), "{stats:?}");
}
